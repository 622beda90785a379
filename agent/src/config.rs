//! `walvault-agent` settings: flags, `WALVAULT_*` environment variables and a TOML file.
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
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Deserialize;
use walvault_shared::archive::crypt::Recipients;
use walvault_shared::archive::sign::SigningKey;

use crate::cli::{ArchiveOpts, BackupOpts, RetentionOpts, ScheduleOpts, ServerOpts, StreamOpts};
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
    #[serde(default, with = "humantime_serde")]
    pub shutdown_timeout: Option<Duration>,
    pub listen: Option<String>,
    /// `true`: synchronous mode (the flag `--synchronous`).
    pub synchronous: Option<bool>,
    /// The application_name to connect with (`--application-name`).
    pub application_name: Option<String>,
    /// Path of the Ed25519 signing key (the flag `--signing-key`).
    pub signing_key: Option<PathBuf>,
    /// age recipients to encrypt to (the flag `--encrypt-recipient`, repeatable).
    pub encrypt_recipients: Option<Vec<String>>,
    pub encrypt_recipients_file: Option<PathBuf>,
    pub encrypt_passphrase_file: Option<PathBuf>,
    #[serde(default, with = "humantime_serde")]
    pub key_rotation_interval: Option<Duration>,
    pub log_format: Option<String>,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub s3_force_path_style: Option<bool>,
    pub s3_sse: Option<String>,
    pub s3_sse_kms_key_id: Option<String>,
    pub backup_storage_class: Option<String>,
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
    /// `true`: incremental backups (the flag `--incremental`).
    pub incremental: Option<bool>,
    /// A full backup when the chain's full one is this old ("7d"; the flag `--full-every`).
    #[serde(default, with = "humantime_serde")]
    pub full_every: Option<Duration>,
    /// `true`: a full backup when an incremental cannot be taken (`--fallback-full`).
    pub fallback_full: Option<bool>,
    /// Where the agent keeps copies of its backups' manifests (`--state-dir`).
    pub state_dir: Option<PathBuf>,
}

impl FileConfig {
    pub fn load(path: &PathBuf) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("read config file {}", path.display()))?;
        toml::from_str(&text).with_context(|| format!("invalid config file {}", path.display()))
    }
}

/// Settings every subcommand shares.
#[derive(Debug)]
pub struct Common {
    pub archive: String,
    pub s3: walvault_shared::storage::s3::S3Options,
    pub log_json: bool,
}

/// Read the config file (if any) and the archive settings.
pub fn common(a: &ArchiveOpts) -> Result<(FileConfig, Common)> {
    let file = match &a.config {
        Some(p) => FileConfig::load(p)?,
        None => FileConfig::default(),
    };
    let archive = a.archive.clone().or(file.archive.clone()).context(
        "no archive given\nHINT: --archive file:///var/lib/walvault/archive (or s3://bucket/prefix), or archive = … in the config file",
    )?;
    walvault_shared::storage::RepoUrl::parse(&archive)?;
    let log_json = match a.log_format.clone().or(file.log_format.clone()).as_deref().unwrap_or("plain") {
        "plain" => false,
        "json" => true,
        o => bail!("invalid log format {o:?}: use plain or json"),
    };
    let s3 = walvault_shared::storage::s3::S3Options {
        endpoint: a.s3_endpoint.clone().or(file.s3_endpoint.clone()),
        region: a.s3_region.clone().or(file.s3_region.clone()),
        force_path_style: a.s3_force_path_style || file.s3_force_path_style.unwrap_or(false),
        sse: a
            .s3_sse
            .clone()
            .or(file.s3_sse.clone())
            .map(|s| walvault_shared::storage::s3::parse_sse(&s))
            .transpose()?,
        sse_kms_key_id: a.s3_sse_kms_key_id.clone().or(file.s3_sse_kms_key_id.clone()),
        backup_storage_class: a
            .backup_storage_class
            .clone()
            .or(file.backup_storage_class.clone())
            .map(|s| walvault_shared::storage::s3::parse_storage_class(&s))
            .transpose()?,
        ..Default::default()
    };
    Ok((file, Common { archive, s3, log_json }))
}

/// The PostgreSQL connection string; warns when a password was typed on the command line
/// (visible to every local user in `ps`).
pub fn pg_url(s: &ServerOpts, file: &FileConfig) -> String {
    let url =
        s.pg_url.clone().or(file.pg_url.clone()).or_else(|| std::env::var("DATABASE_URL").ok()).unwrap_or_default();
    let in_argv = s.pg_url.as_ref().is_some_and(|u| std::env::args().any(|a| a.contains(u.as_str())));
    if in_argv && has_password(&url) {
        eprintln!(
            "walvault-agent: warning: --pg-url holds a password, which any local user can read in the process list\nHINT: use PGPASSWORD, ~/.pgpass (mode 0600), WALVAULT_PG_URL or pg_url in a config file of mode 0600"
        );
    }
    url
}

/// Whether a connection string carries a password (`user:pw@` or `password=`).
pub fn has_password(url: &str) -> bool {
    if let Some(rest) = url.strip_prefix("postgresql://").or_else(|| url.strip_prefix("postgres://")) {
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        return authority.split_once('@').is_some_and(|(userinfo, _)| userinfo.contains(':'));
    }
    url.split_whitespace().any(|kv| kv.trim_start().starts_with("password="))
}

/// The application_name to connect with: `--application-name`, else the connection string's.
pub fn application_name(o: &StreamOpts, file: &FileConfig) -> Option<String> {
    o.application_name.clone().or(file.application_name.clone())
}

/// The signing key, if one is configured.
pub fn signer(s: &ServerOpts, file: &FileConfig) -> Result<Option<Arc<SigningKey>>> {
    match s.signing_key.clone().or(file.signing_key.clone()) {
        Some(p) => Ok(Some(Arc::new(SigningKey::load(&p)?))),
        None => Ok(None),
    }
}

/// Encryption at rest, if configured: age recipients or a passphrase file, never both.
pub fn encryption(s: &ServerOpts, file: &FileConfig) -> Result<Option<Recipients>> {
    let mut keys = s.encrypt_recipients.clone();
    if keys.is_empty() {
        keys = file.encrypt_recipients.clone().unwrap_or_default();
    }
    let files: Vec<PathBuf> =
        s.encrypt_recipients_file.clone().or(file.encrypt_recipients_file.clone()).into_iter().collect();
    let pass = s.encrypt_passphrase_file.clone().or(file.encrypt_passphrase_file.clone());
    let keys = Recipients::parse(&keys, &files)?;
    match (keys, pass) {
        (Some(_), Some(_)) => bail!(
            "both recipients and a passphrase file are configured for encryption\nHINT: choose one: age keys (recommended: the agent then holds no secret that decrypts) or a passphrase"
        ),
        (Some(k), None) => Ok(Some(k)),
        (None, Some(p)) => Ok(Some(Recipients::passphrase_file(&p)?)),
        (None, None) => Ok(None),
    }
}

/// How often a new epoch key is drawn.
pub fn key_rotation(o: &StreamOpts, file: &FileConfig) -> Result<Duration> {
    let d = o.key_rotation_interval.or(file.key_rotation_interval).unwrap_or(Duration::from_secs(24 * 3600));
    if d < Duration::from_secs(1) {
        bail!("key_rotation_interval {d:?} is too small (minimum 1s)");
    }
    Ok(d)
}

pub fn stream(o: &StreamOpts, file: &FileConfig) -> Result<StreamConfig> {
    let d = StreamConfig::default();
    let chunk_max_bytes = match o.chunk_max_bytes.clone().or(file.chunk_max_bytes.clone()) {
        Some(s) => parse_bytes(&s)?,
        None => d.chunk_max_bytes,
    };
    let c = StreamConfig {
        slot: o.slot.clone().or(file.slot.clone()).unwrap_or(d.slot.clone()),
        create_slot: !o.no_create_slot && file.create_slot.unwrap_or(true),
        chunk_interval: o.chunk_interval.or(file.chunk_interval).unwrap_or(d.chunk_interval),
        chunk_max_bytes,
        upload_concurrency: o.upload_concurrency.or(file.upload_concurrency).unwrap_or(d.upload_concurrency),
        upload_timeout: o.upload_timeout.or(file.upload_timeout).unwrap_or(d.upload_timeout),
        status_interval: o.status_interval.or(file.status_interval).unwrap_or(d.status_interval),
        shutdown_timeout: o.shutdown_timeout.or(file.shutdown_timeout).unwrap_or(d.shutdown_timeout),
        synchronous: o.synchronous || file.synchronous.unwrap_or(false),
        ..d
    };
    validate_stream(&c)?;
    Ok(c)
}

pub fn listen(o: &StreamOpts, file: &FileConfig) -> Option<String> {
    o.listen.clone().or(file.listen.clone())
}

pub fn schedule(o: &ScheduleOpts, file: &FileConfig) -> Result<Schedule> {
    if o.no_backups || file.no_backups.unwrap_or(false) {
        return Ok(Schedule::default());
    }
    let daily_at = o.backup_at.clone().or(file.backup_at.clone()).map(|s| parse_daily_time(&s)).transpose()?;
    let wal_volume =
        o.backup_wal_volume.clone().or(file.backup_wal_volume.clone()).map(|s| parse_bytes(&s)).transpose()?;
    Ok(Schedule {
        interval: o.backup_interval.or(file.backup_interval),
        daily_at,
        wal_volume: wal_volume.map(|v| v as u64),
        initial: true,
    })
}

pub fn backup(o: &BackupOpts, file: &FileConfig) -> Result<crate::basebackup::BackupConfig> {
    let d = crate::basebackup::BackupConfig::default();
    let part_size = match o.backup_part_size.clone().or(file.backup_part_size.clone()) {
        Some(s) => parse_bytes(&s)?,
        None => d.part_size,
    };
    if part_size as u64 > walvault_shared::archive::read::limits::PART || part_size < (1 << 20) {
        bail!("backup part size {part_size} is out of range: 1MiB to 1GiB");
    }
    let incremental = o.incremental || file.incremental.unwrap_or(false);
    if !incremental
        && (o.full_every.or(file.full_every).is_some() || o.fallback_full || file.fallback_full.unwrap_or(false))
    {
        bail!("--full-every and --fallback-full apply to incremental backups only\nHINT: add --incremental (incremental = true in the config file)");
    }
    Ok(crate::basebackup::BackupConfig {
        part_size,
        fast_checkpoint: !(o.spread_checkpoint || file.spread_checkpoint.unwrap_or(false)),
        incremental,
        full_every: o.full_every.or(file.full_every),
        fallback_full: o.fallback_full || file.fallback_full.unwrap_or(false),
        state_dir: o.state_dir.clone().or(file.state_dir.clone()),
        ..d
    })
}

pub fn retention(o: &RetentionOpts, file: &FileConfig) -> crate::retention::RetentionPolicy {
    crate::retention::RetentionPolicy {
        retain_full: o.retain_full.or(file.retain_full),
        retain_days: o.retain_days.or(file.retain_days),
    }
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
    fn passwords_in_connection_strings_are_noticed() {
        assert!(has_password("postgresql://walvault:secret@db/postgres"));
        assert!(has_password("host=db user=w password=secret"));
        assert!(!has_password("postgresql://walvault@db:5432/postgres?sslmode=require"));
        assert!(!has_password("postgresql://db/postgres?options=a:b@c"));
        assert!(!has_password("host=db user=w"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let e = toml::from_str::<FileConfig>("chunk_intervall = \"1s\"").unwrap_err().to_string();
        assert!(e.contains("unknown field"), "{e}");
        let c: FileConfig = toml::from_str("chunk_interval = \"250ms\"\nslot = \"x\"").unwrap();
        assert_eq!(c.chunk_interval, Some(Duration::from_millis(250)));
    }
}
