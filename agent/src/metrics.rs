//! The agent's counters and gauges, rendered as Prometheus text (`/metrics`) and JSON
//! (`/status`). Counters and gauges are atomics; the one lock (the receive-time samples behind
//! `archive_lag_seconds`) is taken at most once per 100 ms of streaming, not per message.
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `walvault_received_lsn` | gauge | end of WAL received from PostgreSQL |
//! | `walvault_archived_lsn` | gauge | archived watermark: everything below is durable in the archive |
//! | `walvault_server_lsn` | gauge | the server's end of WAL, from its last message |
//! | `walvault_timeline` | gauge | timeline being streamed |
//! | `walvault_archive_lag_bytes` | gauge | server LSN − archived LSN |
//! | `walvault_archive_lag_seconds` | gauge | how long received WAL has been waiting to become durable (0 when caught up) |
//! | `walvault_wal_bytes_archived_total` | counter | WAL bytes written as chunks |
//! | `walvault_chunks_archived_total` | counter | chunk objects written |
//! | `walvault_segments_archived_total` | counter | whole-segment objects written |
//! | `walvault_bytes_uploaded_total` | counter | stored (compressed) bytes written |
//! | `walvault_upload_retries_total` | counter | failed upload attempts that were retried |
//! | `walvault_upload_errors_total` | counter | uploads that failed for good (split brain) |
//! | `walvault_reconnects_total` | counter | replication connections re-opened |
//! | `walvault_up` | gauge | 1 while a replication connection is streaming |
//! | `walvault_last_backup_timestamp_seconds` | gauge | when the newest complete backup in the archive finished (whoever took it) |
//! | `walvault_last_backup_duration_seconds` | gauge | how long it took |
//! | `walvault_last_backup_bytes` | gauge | its size (database bytes) |
//! | `walvault_next_backup_timestamp_seconds` | gauge | when the next scheduled backup is due |
//! | `walvault_backups_total`, `walvault_backup_failures_total` | counter | backups taken / failed |

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use walvault_shared::lsn::Lsn;

#[derive(Default)]
pub struct Counter(AtomicU64);
impl Counter {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Gauge(AtomicU64);
impl Gauge {
    pub fn set(&self, v: u64) {
        self.0.store(v, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
pub struct Metrics {
    pub received_lsn: Gauge,
    pub archived_lsn: Gauge,
    pub server_lsn: Gauge,
    pub timeline: Gauge,
    pub up: Gauge,
    pub wal_bytes_archived: Counter,
    pub chunks_archived: Counter,
    pub segments_archived: Counter,
    pub bytes_uploaded: Counter,
    pub upload_retries: Counter,
    pub upload_errors: Counter,
    pub reconnects: Counter,
    /// Unix ms when the watermark last advanced.
    last_archived_ms: Gauge,
    /// Unix ms of the newest sample in `received_at`.
    last_sample_ms: Gauge,
    /// (end LSN received, Unix ms), oldest first, one sample per 100 ms of streaming: WAL up
    /// to the LSN had arrived by then. The first sample above the watermark dates the oldest WAL
    /// still waiting (to within 100 ms): that age is the archive lag in seconds.
    received_at: Mutex<std::collections::VecDeque<(u64, u64)>>,
    /// Why the agent is not streaming, when it is not (for /healthz and /status).
    pub state: Mutex<String>,
    last_error: Mutex<Option<(String, String)>>,
    pub system_identifier: Gauge,
    pub segment_size: Gauge,
    pub last_backup_unix: Gauge,
    pub last_backup_seconds: Gauge,
    pub last_backup_bytes: Gauge,
    pub next_backup_unix: Gauge,
    /// Id of the newest complete backup in the archive (whoever took it).
    pub last_backup_id: Mutex<String>,
    pub backups_taken: Counter,
    pub backup_failures: Counter,
    pub archive_url: Mutex<String>,
    /// Sequence number of the next chunk the watermark waits for (chunks before it are durable).
    pub durable_seq: Gauge,
    /// 1 in synchronous mode.
    pub synchronous: Gauge,
    /// The newest passed restore drill in the archive: when it finished (Unix s), its RTO (ms).
    pub last_drill_success_unix: Gauge,
    pub last_drill_rto_ms: Gauge,
}

/// One exposed series: `walvault_<name>` (counters' names end in `_total`).
#[derive(Clone, Debug)]
pub struct Series {
    pub name: &'static str,
    pub help: &'static str,
    pub counter: bool,
    pub value: f64,
}

/// Encode series in the Prometheus text format (version 0.0.4: HELP and TYPE for each series,
/// counters' names ending in `_total`), every name prefixed `walvault_`, by the `prometheus`
/// crate's registry and encoder.
pub fn expose(series: Vec<Series>) -> String {
    let registry = prometheus::Registry::new_custom(Some("walvault".into()), None).expect("a valid prefix");
    for s in series {
        let registered = if s.counter {
            prometheus::Counter::new(s.name, s.help).and_then(|c| {
                c.inc_by(s.value.max(0.0));
                registry.register(Box::new(c))
            })
        } else {
            prometheus::Gauge::new(s.name, s.help).and_then(|g| {
                g.set(s.value);
                registry.register(Box::new(g))
            })
        };
        registered.expect("each series is registered once, with a valid name");
    }
    let mut out = String::new();
    prometheus::TextEncoder::new().encode_utf8(&registry.gather(), &mut out).expect("encoding into a String");
    out
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

impl Metrics {
    /// WAL up to `lsn` has been received (called per message: two atomic operations, and a
    /// lock once per 100 ms).
    pub fn set_received(&self, lsn: Lsn) {
        self.received_lsn.set(lsn.0);
        let now = now_ms();
        if now < self.last_sample_ms.get() + 100 {
            return;
        }
        self.last_sample_ms.set(now);
        let mut q = self.received_at.lock().unwrap();
        q.push_back((lsn.0, now));
        // Bounded: merge the two oldest samples (keeping the newer LSN, older time) when it grows.
        if q.len() > 10_000 {
            if let (Some(a), Some(b)) = (q.pop_front(), q.pop_front()) {
                q.push_front((b.0, a.1));
            }
        }
    }

    /// 200 while streaming; otherwise 503 with the reason (archive unreachable, reconnecting).
    pub fn health(&self) -> Result<(), String> {
        if self.up.get() == 1 {
            return Ok(());
        }
        let state = self.state.lock().unwrap().clone();
        Err(if state.is_empty() { "not streaming".to_string() } else { format!("not streaming: {state}") })
    }

    /// Record why the agent is not streaming (empty: it is).
    pub fn set_state(&self, s: impl Into<String>) {
        *self.state.lock().unwrap() = s.into();
    }

    /// The watermark advanced: forget what it now covers.
    pub fn mark_archived_now(&self) {
        self.last_archived_ms.set(now_ms());
        let archived = self.archived_lsn.get();
        let mut q = self.received_at.lock().unwrap();
        while q.front().is_some_and(|f| f.0 <= archived) {
            q.pop_front();
        }
    }

    /// How long the oldest received-but-not-yet-durable WAL has been waiting (0: none waits).
    pub fn lag_seconds(&self) -> f64 {
        let archived = self.archived_lsn.get();
        if self.received_lsn.get() <= archived {
            return 0.0;
        }
        let q = self.received_at.lock().unwrap();
        // The WAL just above the watermark had arrived by the first sample above it.
        match q.iter().find(|e| e.0 > archived) {
            Some(e) => now_ms().saturating_sub(e.1) as f64 / 1000.0,
            None => 0.0,
        }
    }

    pub fn lag_bytes(&self) -> u64 {
        self.server_lsn.get().max(self.received_lsn.get()).saturating_sub(self.archived_lsn.get())
    }

    pub fn set_error(&self, e: String) {
        *self.last_error.lock().unwrap() = Some((chrono::Utc::now().to_rfc3339(), e));
    }

    /// Every series with its help text and type: what [`Metrics::prometheus`] exposes.
    pub fn series(&self) -> Vec<Series> {
        let mut out = Vec::new();
        let mut g = |name: &'static str, help: &'static str, kind: &'static str, v: f64| {
            out.push(Series { name, help, counter: kind == "counter", value: v });
        };
        g(
            "received_lsn",
            "End of WAL received from PostgreSQL (as a byte position).",
            "gauge",
            self.received_lsn.get() as f64,
        );
        g(
            "archived_lsn",
            "Archived watermark: all WAL below is durable in the archive.",
            "gauge",
            self.archived_lsn.get() as f64,
        );
        g("server_lsn", "The server's end of WAL from its last message.", "gauge", self.server_lsn.get() as f64);
        g("timeline", "Timeline being streamed.", "gauge", self.timeline.get() as f64);
        g("archive_lag_bytes", "Server end of WAL minus the archived watermark.", "gauge", self.lag_bytes() as f64);
        g(
            "archive_lag_seconds",
            "How long received WAL has been waiting to become durable.",
            "gauge",
            self.lag_seconds(),
        );
        g("wal_bytes_archived_total", "WAL bytes written as chunks.", "counter", self.wal_bytes_archived.get() as f64);
        g("chunks_archived_total", "Chunk objects written.", "counter", self.chunks_archived.get() as f64);
        g("segments_archived_total", "Whole-segment objects written.", "counter", self.segments_archived.get() as f64);
        g("bytes_uploaded_total", "Stored (compressed) bytes written.", "counter", self.bytes_uploaded.get() as f64);
        g(
            "upload_retries_total",
            "Upload attempts that failed and were retried.",
            "counter",
            self.upload_retries.get() as f64,
        );
        g("upload_errors_total", "Uploads that failed for good.", "counter", self.upload_errors.get() as f64);
        g("reconnects_total", "Replication connections re-opened.", "counter", self.reconnects.get() as f64);
        g("up", "1 while a replication connection is streaming.", "gauge", self.up.get() as f64);
        g(
            "last_backup_timestamp_seconds",
            "When the newest complete base backup in the archive finished, whoever took it (Unix time, 0: none).",
            "gauge",
            self.last_backup_unix.get() as f64,
        );
        g(
            "last_backup_duration_seconds",
            "How long the last base backup took.",
            "gauge",
            self.last_backup_seconds.get() as f64 / 1000.0,
        );
        g("last_backup_bytes", "Database bytes in the last base backup.", "gauge", self.last_backup_bytes.get() as f64);
        g(
            "next_backup_timestamp_seconds",
            "When the next scheduled base backup is due (Unix time, 0: none scheduled).",
            "gauge",
            self.next_backup_unix.get() as f64,
        );
        g(
            "synchronous",
            "1 in synchronous mode (commits wait for the archive when synchronous_standby_names names the agent).",
            "gauge",
            self.synchronous.get() as f64,
        );
        g(
            "sync_waiting_seconds",
            "Synchronous mode: how long the oldest received WAL has been waiting for the archive (commits wait as long); 0 otherwise.",
            "gauge",
            if self.synchronous.get() == 1 { self.lag_seconds() } else { 0.0 },
        );
        g(
            "last_drill_success_timestamp_seconds",
            "When the newest passed restore drill recorded in the archive finished (Unix time, 0: none).",
            "gauge",
            self.last_drill_success_unix.get() as f64,
        );
        g(
            "last_drill_rto_seconds",
            "The recovery time that drill measured (restore + replay + checks).",
            "gauge",
            self.last_drill_rto_ms.get() as f64 / 1000.0,
        );
        g("backups_total", "Base backups taken by this process.", "counter", self.backups_taken.get() as f64);
        g("backup_failures_total", "Base backups that failed.", "counter", self.backup_failures.get() as f64);
        out
    }

    /// The Prometheus exposition (text format, by the `prometheus` crate).
    pub fn prometheus(&self) -> String {
        expose(self.series())
    }

    pub fn status_json(&self) -> serde_json::Value {
        let ts =
            |t: u64| (t > 0).then(|| chrono::DateTime::from_timestamp(t as i64, 0).map(|d| d.to_rfc3339())).flatten();
        let last_error = self.last_error.lock().unwrap().clone();
        serde_json::json!({
            "archive": *self.archive_url.lock().unwrap(),
            "system_identifier": self.system_identifier.get().to_string(),
            "streaming": self.up.get() == 1,
            "state": if self.up.get() == 1 { "streaming".to_string() } else { self.health().err().unwrap_or_default() },
            "timeline": self.timeline.get(),
            "received_lsn": Lsn(self.received_lsn.get()).to_string(),
            "archived_lsn": Lsn(self.archived_lsn.get()).to_string(),
            "server_lsn": Lsn(self.server_lsn.get()).to_string(),
            "lag_bytes": self.lag_bytes(),
            "lag_seconds": self.lag_seconds(),
            "synchronous": self.synchronous.get() == 1,
            "sync_waiting_seconds": if self.synchronous.get() == 1 { self.lag_seconds() } else { 0.0 },
            "wal_bytes_archived": self.wal_bytes_archived.get(),
            "chunks_archived": self.chunks_archived.get(),
            "segments_archived": self.segments_archived.get(),
            "upload_retries": self.upload_retries.get(),
            "reconnects": self.reconnects.get(),
            "last_backup_at": ts(self.last_backup_unix.get()),
            "last_backup_id": Some(self.last_backup_id.lock().unwrap().clone()).filter(|s| !s.is_empty()),
            "last_backup_seconds": self.last_backup_seconds.get() as f64 / 1000.0,
            "last_backup_bytes": self.last_backup_bytes.get(),
            "next_backup_at": ts(self.next_backup_unix.get()),
            "backups_taken": self.backups_taken.get(),
            "last_error": last_error.map(|(t, e)| serde_json::json!({"at": t, "message": e})),
        })
    }
}
