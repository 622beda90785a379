//! `walvault-agent run` settings: flags, `WALVAULT_*` environment variables and a TOML file.
//!
//! Precedence: flag > environment variable > config file > default. Every flag `--foo-bar` is
//! also the environment variable `WALVAULT_FOO_BAR` and the config key `foo_bar`. Unknown keys in
//! the file are an error (a misspelt `chunk_interval` that silently does nothing is the worst
//! failure for a backup tool). Durations are humantime (`500ms`, `1s`, `5m`); sizes accept
//! `kB`/`MB`/`GB` (and `KiB`/`MiB`/`GiB`). The PostgreSQL connection string falls back to
//! `DATABASE_URL`, then to libpq's `PG*` variables and defaults.
//!
//! Example `walvault.toml`:
//! ```toml
//! pg_url = "postgresql://walvault@db1:5432,db2:5432/postgres?target_session_attrs=read-write"
//! archive = "s3://backups/prod-main"
//! slot = "walvault"
//! chunk_interval = "1s"
//! listen = "127.0.0.1:9187"
//! s3_endpoint = "https://s3.eu-central-1.amazonaws.com"
//! ```

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;

use crate::stream::StreamConfig;

/// Parse `8MiB`, `8MB`, `512kB`, `4096` (binary multiples).
pub fn parse_bytes(s: &str) -> Result<usize> {
    Ok(crate::replication::parse_size(s)? as usize)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub pg_url: Option<String>,
    pub archive: Option<String>,
    pub slot: Option<String>,
    pub create_slot: Option<bool>,
    #[serde(default, with = "humantime_serde")]
    pub chunk_interval: Option<Duration>,
    pub chunk_max_bytes: Option<String>,
    pub upload_concurrency: Option<usize>,
    #[serde(default, with = "humantime_serde")]
    pub upload_timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub status_interval: Option<Duration>,
    pub listen: Option<String>,
    pub log_format: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_force_path_style: Option<bool>,
    /// Take a base backup this often (e.g. "24h").
    #[serde(default, with = "humantime_serde")]
    pub backup_interval: Option<Duration>,
    /// Take a base backup every day at this UTC time ("HH:MM").
    pub backup_at: Option<String>,
    /// Take a base backup once this much WAL has been archived since the last one ("10GiB").
    pub backup_wal_volume: Option<String>,
    pub backup_part_size: Option<String>,
    pub retain_full: Option<usize>,
    pub retain_days: Option<u32>,
    /// `true`: `run` takes no base backups (the flag `--no-backups`).
    pub no_backups: Option<bool>,
    /// `true`: spread the backup checkpoint (the flag `--spread-checkpoint`).
    pub spread_checkpoint: Option<bool>,
}

impl FileConfig {
    pub fn load(path: &PathBuf) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// Validated settings for `run`.
#[derive(Debug)]
pub struct RunSettings {
    pub pg_url: String,
    pub archive: String,
    pub stream: StreamConfig,
    pub listen: Option<String>,
    pub log_json: bool,
    pub s3: walvault_shared::storage::s3::S3Options,
    pub schedule: Schedule,
    pub backup: crate::basebackup::BackupConfig,
    pub retention: crate::retention::RetentionPolicy,
}

/// When `run` takes base backups. The first backup is taken as soon as streaming works when
/// the archive has none.
#[derive(Debug, Clone, Default)]
pub struct Schedule {
    pub interval: Option<Duration>,
    pub daily_at: Option<chrono::NaiveTime>,
    pub wal_volume: Option<u64>,
    /// Take a first backup when the archive has none (on unless backups are disabled).
    pub initial: bool,
}

/// Parse "HH:MM" (UTC).
pub fn parse_daily_time(s: &str) -> Result<chrono::NaiveTime> {
    chrono::NaiveTime::parse_from_str(s, "%H:%M")
        .with_context(|| format!("invalid daily time {s:?}; use HH:MM (UTC), e.g. 02:30"))
}

pub fn validate_stream(c: &StreamConfig) -> Result<()> {
    if c.chunk_interval < Duration::from_millis(10) {
        bail!("chunk_interval {:?} is too small (minimum 10ms)", c.chunk_interval);
    }
    if c.chunk_max_bytes < 8192 {
        bail!("chunk_max_bytes {} is too small (minimum 8 KiB, one WAL page)", c.chunk_max_bytes);
    }
    if c.slot.is_empty() || !c.slot.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_') {
        bail!("invalid slot name {:?}\nHINT: PostgreSQL slot names use lower-case letters, digits and _", c.slot);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_bytes("8MiB").unwrap(), 8 << 20);
        assert_eq!(parse_bytes("512kB").unwrap(), 512 << 10);
        assert_eq!(parse_bytes("4096").unwrap(), 4096);
        assert!(parse_bytes("8XB").is_err());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<FileConfig>("chunk_intervall = \"1s\"").unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        let c: FileConfig = toml::from_str("chunk_interval = \"250ms\"\nslot = \"x\"").unwrap();
        assert_eq!(c.chunk_interval, Some(Duration::from_millis(250)));
    }
}
