//! Base backups inside `walvault-agent run`: the first one when the archive has none, then on
//! an interval, at a daily UTC time, and whenever the WAL archived since the last backup exceeds
//! a volume (which bounds replay time at restore). Retention runs after each backup.
//! A failed backup is logged (and shown in /status) and retried at the next check; it never
//! stops WAL streaming.

use std::sync::Arc;
use std::time::Duration;

use walvault_shared::archive::backup;
use walvault_shared::lsn::Lsn;
use walvault_shared::storage::ObjectStore;

use crate::basebackup::{self, BackupConfig};
use crate::config::Schedule;
use crate::metrics::Metrics;
use crate::replication::conninfo::ConnParams;
use crate::retention::{self, RetentionPolicy};

/// Next daily run strictly after `now`.
pub fn next_daily(now: chrono::DateTime<chrono::Utc>, at: chrono::NaiveTime) -> chrono::DateTime<chrono::Utc> {
    let today = now.date_naive().and_time(at).and_utc();
    if today > now {
        today
    } else {
        today + chrono::Duration::days(1)
    }
}

pub async fn run(
    params: ConnParams,
    store: Arc<dyn ObjectStore>,
    schedule: Schedule,
    cfg: BackupConfig,
    policy: RetentionPolicy,
    metrics: Arc<Metrics>,
) {
    let mut last: Option<(chrono::DateTime<chrono::Utc>, Lsn)> = None;
    let mut next_daily_at = schedule.daily_at.map(|t| next_daily(chrono::Utc::now(), t));
    let mut loaded = false;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        if metrics.up.get() != 1 {
            continue; // back up only while WAL is being archived
        }
        let segment_size = metrics.segment_size.get();
        if !loaded {
            match backup::complete(&*store, segment_size).await {
                Ok(list) => {
                    last = list.last().map(|b| {
                        let t = chrono::DateTime::parse_from_rfc3339(&b.stop_time)
                            .map(|t| t.with_timezone(&chrono::Utc))
                            .unwrap_or_default();
                        (t, b.stop_lsn)
                    });
                    if let Some((t, _)) = last {
                        metrics.last_backup_unix.set(t.timestamp() as u64);
                    }
                    loaded = true;
                }
                Err(e) => {
                    tracing::warn!("cannot list backups: {e:#}");
                    continue;
                }
            }
        }
        let now = chrono::Utc::now();
        let reason = match last {
            None if schedule.initial => Some("the archive has no base backup".to_string()),
            None => None,
            Some((t, lsn)) => {
                if schedule.interval.is_some_and(|i| now - t >= chrono::Duration::from_std(i).unwrap_or_default()) {
                    Some("backup interval elapsed".into())
                } else if next_daily_at.is_some_and(|d| now >= d) {
                    Some("daily backup time".into())
                } else if schedule.wal_volume.is_some_and(|v| {
                    // Measured from the segment after the backup's end: the backup itself
                    // switches to a new segment, which is not WAL to replay.
                    let base = lsn.segment_start(segment_size).0 + segment_size;
                    metrics.archived_lsn.get().saturating_sub(base) >= v
                }) {
                    Some("WAL volume since the last backup exceeded".into())
                } else {
                    None
                }
            }
        };
        let next = [
            schedule.interval.and_then(|i| last.map(|(t, _)| t + chrono::Duration::from_std(i).unwrap_or_default())),
            next_daily_at,
        ]
        .into_iter()
        .flatten()
        .min();
        metrics.next_backup_unix.set(next.map(|t| t.timestamp().max(0) as u64).unwrap_or(0));
        let Some(reason) = reason else { continue };
        tracing::info!("starting a base backup: {reason}");
        let t0 = std::time::Instant::now();
        match basebackup::take_backup(&params, store.clone(), &cfg).await {
            Ok(d) => {
                let t = chrono::DateTime::parse_from_rfc3339(&d.stop_time)
                    .map(|t| t.with_timezone(&chrono::Utc))
                    .unwrap_or(now);
                last = Some((t, d.stop_lsn));
                metrics.last_backup_unix.set(t.timestamp() as u64);
                metrics.last_backup_seconds.set(t0.elapsed().as_millis() as u64);
                metrics.last_backup_bytes.set(d.raw_bytes);
                metrics.backups_taken.inc();
                if let Some(at) = schedule.daily_at {
                    next_daily_at = Some(next_daily(chrono::Utc::now(), at));
                }
                if policy.is_set() {
                    if let Err(e) = retention::expire(&*store, segment_size, &policy, false).await {
                        tracing::error!("retention failed: {e:#}");
                        metrics.set_error(format!("retention: {e:#}"));
                    }
                }
            }
            Err(e) => {
                tracing::error!("base backup failed: {e:#}");
                metrics.set_error(format!("base backup: {e:#}"));
                metrics.backup_failures.inc();
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
}
