//! Base backups inside `walvault-agent run`, and what `/status` and `/metrics` say about backups.
//!
//! * Backups: the first one when the archive has none, then on an interval, at a daily UTC time,
//!   and whenever the WAL archived since the last backup exceeds a volume (which bounds replay
//!   time at restore). Retention runs after each backup. A failed backup is logged (and shown in
//!   /status) and retried at the next check after 30 s; it never stops WAL streaming.
//! * Drills: the newest passed restore drill recorded in the archive (by `walvault-recover
//!   verify`, wherever it ran) is looked up with the backups, for
//!   `walvault_last_drill_success_timestamp_seconds` and `walvault_last_drill_rto_seconds`.
//! * Status: the newest complete backup *in the archive* (whoever took it: this agent, a
//!   `walvault-agent backup` from cron, another host) is looked up at start and every
//!   [`REFRESH`], so `walvault_last_backup_timestamp_seconds` is true for cron-style setups too,
//!   and the schedule counts from it.
//!
//! The task is owned: [`Task::start`] returns a handle whose [`Task::join`] waits for it after
//! its token is cancelled (a backup in progress is abandoned; its leftovers are removed by the
//! next one).

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use walvault_shared::archive::backup::{self, BackupDescription};
use walvault_shared::archive::read::Reader;
use walvault_shared::archive::write::Writer;
use walvault_shared::lsn::Lsn;

use crate::basebackup::{self, BackupConfig};
use crate::config::Schedule;
use crate::metrics::Metrics;
use crate::replication::conninfo::ConnParams;
use crate::retention::{self, RetentionPolicy};

/// How often the archive's newest backup is looked up for the status (one listing of
/// `backups/`, and one read when it changed).
pub const REFRESH: Duration = Duration::from_secs(10);

/// What the task needs to take backups.
pub struct Context {
    pub params: ConnParams,
    pub writer: Writer,
    pub cfg: BackupConfig,
    pub policy: RetentionPolicy,
    pub metrics: Arc<Metrics>,
}

/// The running task.
pub struct Task {
    handle: tokio::task::JoinHandle<()>,
    cancel: CancellationToken,
}

impl Task {
    pub fn start(ctx: Context, schedule: Schedule, cancel: CancellationToken) -> Self {
        let token = cancel.clone();
        let handle = tokio::spawn(async move {
            tokio::select! {
                biased;
                _ = token.cancelled() => {}
                _ = run(ctx, schedule) => {}
            }
        });
        Task { handle, cancel }
    }

    pub async fn join(self) {
        self.cancel.cancel();
        let _ = self.handle.await;
    }
}

/// Next daily run strictly after `now`.
pub fn next_daily(now: chrono::DateTime<chrono::Utc>, at: chrono::NaiveTime) -> chrono::DateTime<chrono::Utc> {
    let today = now.date_naive().and_time(at).and_utc();
    if today > now {
        today
    } else {
        today + chrono::Duration::days(1)
    }
}

/// The last backup as the schedule needs it: when it stopped, and where.
type Last = Option<(chrono::DateTime<chrono::Utc>, Lsn)>;

/// Publish the newest backup in the archive; its stop time and LSN.
fn publish(metrics: &Metrics, newest: Option<&BackupDescription>) -> Last {
    let b = newest?;
    metrics.last_backup_unix.set(b.stop_time.timestamp().max(0) as u64);
    metrics.last_backup_seconds.set((b.duration_seconds * 1000.0) as u64);
    metrics.last_backup_bytes.set(b.raw_bytes);
    *metrics.last_backup_id.lock().unwrap() = b.id.clone();
    Some((b.stop_time, b.stop_lsn))
}

/// Why a backup is due now, if it is.
fn due(
    schedule: &Schedule,
    last: Last,
    next_daily_at: Option<chrono::DateTime<chrono::Utc>>,
    archived: u64,
    seg: u64,
) -> Option<String> {
    let now = chrono::Utc::now();
    match last {
        None if schedule.initial => Some("the archive has no base backup".to_string()),
        None => None,
        Some((t, lsn)) => {
            if schedule.interval.is_some_and(|i| now - t >= chrono::Duration::from_std(i).unwrap_or_default()) {
                Some("backup interval elapsed".into())
            } else if next_daily_at.is_some_and(|d| now >= d) {
                Some("daily backup time".into())
            } else if schedule.wal_volume.is_some_and(|v| {
                // Measured from the segment after the backup's end: the backup itself switches
                // to a new segment, which is not WAL to replay.
                let base = lsn.segment_start(seg).0 + seg;
                archived.saturating_sub(base) >= v
            }) {
                Some("WAL volume since the last backup exceeded".into())
            } else {
                None
            }
        }
    }
}

async fn run(ctx: Context, schedule: Schedule) {
    let reader = Reader::new(ctx.writer.store().clone(), None);
    let mut last: Last = None;
    let mut next_daily_at = schedule.daily_at.map(|t| next_daily(chrono::Utc::now(), t));
    let mut refreshed: Option<std::time::Instant> = None;
    let takes_backups = schedule.initial;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let segment_size = ctx.metrics.segment_size.get();
        if segment_size == 0 {
            continue; // the stream has not read the server's segment size yet
        }
        if refreshed.is_none_or(|t| t.elapsed() >= REFRESH) {
            match backup::newest(&reader, segment_size).await {
                Ok(b) => {
                    last = publish(&ctx.metrics, b.as_ref());
                    refreshed = Some(std::time::Instant::now());
                    if let Ok(Some(d)) = walvault_shared::archive::drills::newest_pass_quick(&reader).await {
                        ctx.metrics.last_drill_success_unix.set(d.finished_at.timestamp().max(0) as u64);
                        ctx.metrics.last_drill_rto_ms.set(d.rto_seconds.map(|r| (r * 1000.0) as u64).unwrap_or(0));
                    }
                }
                Err(e) => {
                    tracing::warn!("cannot list backups: {e:#}");
                    continue;
                }
            }
        }
        let next = [
            schedule.interval.and_then(|i| last.map(|(t, _)| t + chrono::Duration::from_std(i).unwrap_or_default())),
            next_daily_at,
        ]
        .into_iter()
        .flatten()
        .min();
        ctx.metrics.next_backup_unix.set(next.map(|t| t.timestamp().max(0) as u64).unwrap_or(0));
        if !takes_backups || ctx.metrics.up.get() != 1 {
            continue; // back up only while WAL is being archived
        }
        let Some(reason) = due(&schedule, last, next_daily_at, ctx.metrics.archived_lsn.get(), segment_size) else {
            continue;
        };
        tracing::info!("starting a base backup: {reason}");
        match basebackup::take_backup(&ctx.params, &ctx.writer, &ctx.cfg).await {
            Ok(d) => {
                last = publish(&ctx.metrics, Some(&d));
                ctx.metrics.backups_taken.inc();
                if let Some(at) = schedule.daily_at {
                    next_daily_at = Some(next_daily(chrono::Utc::now(), at));
                }
                if ctx.policy.is_set() {
                    if let Err(e) = retention::expire(&ctx.writer, segment_size, &ctx.policy, false).await {
                        tracing::error!("retention failed: {e:#}");
                        ctx.metrics.set_error(format!("retention: {e:#}"));
                    }
                }
            }
            Err(e) => {
                tracing::error!("base backup failed: {e:#}");
                ctx.metrics.set_error(format!("base backup: {e:#}"));
                ctx.metrics.backup_failures.inc();
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn daily() {
        let at = chrono::NaiveTime::from_hms_opt(2, 30, 0).unwrap();
        let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&chrono::Utc);
        assert_eq!(next_daily(t("2026-11-26T01:00:00Z"), at), t("2026-11-26T02:30:00Z"));
        assert_eq!(next_daily(t("2026-11-26T02:30:00Z"), at), t("2026-11-27T02:30:00Z"));
        assert_eq!(next_daily(t("2026-11-26T23:00:00Z"), at), t("2026-11-27T02:30:00Z"));
    }

    #[test]
    fn due_reasons() {
        let seg = 16 << 20;
        let s = Schedule { initial: true, wal_volume: Some(seg), ..Default::default() };
        assert!(due(&s, None, None, 0, seg).unwrap().contains("no base backup"));
        assert!(due(&Schedule::default(), None, None, 0, seg).is_none(), "backups off");
        let last = Some((chrono::Utc::now(), Lsn(seg + 100)));
        // The backup's own segment and the next one do not count.
        assert!(due(&s, last, None, 3 * seg - 1, seg).is_none());
        assert!(due(&s, last, None, 3 * seg, seg).unwrap().contains("WAL volume"));
        let i = Schedule { initial: true, interval: Some(Duration::from_secs(60)), ..Default::default() };
        let old = Some((chrono::Utc::now() - chrono::Duration::seconds(61), Lsn(0)));
        assert!(due(&i, old, None, 0, seg).unwrap().contains("interval"));
    }
}
