//! The command line: subcommands and their option groups. Each subcommand shows only the
//! options it uses; every option is also a `WALVAULT_*` variable and a config-file key (see
//! [`crate::config`]).

use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

pub const EXIT_CODES: &str = "Exit codes: 0 success (run: clean shutdown, everything received archived); 1 failure; 2 usage or configuration error.";

#[derive(Parser)]
#[command(name = "walvault-agent", version, about = "Stream PostgreSQL WAL into a walvault archive, take base backups, apply retention.", after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Stream WAL continuously (until SIGINT/SIGTERM); take scheduled base backups and apply retention.
    Run(Box<RunArgs>),
    /// Take one base backup now and exit 0 once it is complete (needs `run` streaming into the
    /// same archive). With --retain-full/--retain-days, then apply retention: older backups and
    /// the WAL only they need are deleted.
    Backup(BackupCmdArgs),
    /// Apply retention now: delete expired backups and the WAL only they needed.
    Expire(ExpireArgs),
    /// Keep a second archive (another provider or region) a verified, restorable replica of
    /// the first: continuously, or one pass with --once. The copy keeps its own retention.
    Copy(Box<CopyArgs>),
    /// Create an Ed25519 signing key for --signing-key (mode 0600) and print its verify key,
    /// the one line readers give to --verify-key.
    Keygen(KeygenArgs),
    /// (packaging) write the man page and shell completions into DIR.
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
}

/// Where the archive is, and the settings every subcommand shares.
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Archive")]
pub struct ArchiveOpts {
    /// TOML config file; flags and WALVAULT_* variables override its keys.
    #[arg(long, env = "WALVAULT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Archive: file:///path, a plain path, or s3://bucket/prefix.
    #[arg(long, env = "WALVAULT_ARCHIVE")]
    pub archive: Option<String>,
    /// S3 endpoint URL (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS).
    #[arg(long, env = "WALVAULT_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region (else AWS_REGION, else us-east-1).
    #[arg(long, env = "WALVAULT_S3_REGION")]
    pub s3_region: Option<String>,
    /// Address buckets as endpoint/bucket (MinIO, SeaweedFS, Ceph, most self-hosted stores).
    #[arg(long, env = "WALVAULT_S3_FORCE_PATH_STYLE")]
    pub s3_force_path_style: bool,
    /// Ask S3 to encrypt every object server-side too: aes256 (SSE-S3) or aws:kms (SSE-KMS). A
    /// complement to --encrypt-recipient, not a substitute.
    #[arg(long, env = "WALVAULT_S3_SSE")]
    pub s3_sse: Option<String>,
    /// The KMS key id for --s3-sse aws:kms (else the bucket's default key).
    #[arg(long, env = "WALVAULT_S3_SSE_KMS_KEY_ID")]
    pub s3_sse_kms_key_id: Option<String>,
    /// S3 storage class of base backup parts and manifests (STANDARD_IA, INTELLIGENT_TIERING,
    /// GLACIER_IR, …); WAL stays in the bucket's default class.
    #[arg(long, env = "WALVAULT_BACKUP_STORAGE_CLASS")]
    pub backup_storage_class: Option<String>,
    /// Log format: plain or json [default: plain]. Level from RUST_LOG (default info).
    #[arg(long, env = "WALVAULT_LOG_FORMAT")]
    pub log_format: Option<String>,
}

/// How to reach PostgreSQL, and how to sign what is written.
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "PostgreSQL and signing")]
pub struct ServerOpts {
    /// PostgreSQL connection (URL or key=value; default DATABASE_URL, then libpq's PG* variables).
    /// Keep passwords out of it: use PGPASSWORD, ~/.pgpass or the config file.
    #[arg(long, env = "WALVAULT_PG_URL", hide_env_values = true)]
    pub pg_url: Option<String>,
    /// Sign every object written with this Ed25519 key (made by `walvault-agent keygen`); readers
    /// then check it with --verify-key.
    #[arg(long, env = "WALVAULT_SIGNING_KEY")]
    pub signing_key: Option<PathBuf>,
    /// Encrypt to this age recipient (age1…, repeatable): the agent holds public keys only.
    #[arg(long = "encrypt-recipient", env = "WALVAULT_ENCRYPT_RECIPIENT", value_delimiter = ',')]
    pub encrypt_recipients: Vec<String>,
    /// Encrypt to the recipients listed in this file (one age1… per line, as age-keygen -y prints).
    #[arg(long = "encrypt-recipients-file", env = "WALVAULT_ENCRYPT_RECIPIENTS_FILE")]
    pub encrypt_recipients_file: Option<PathBuf>,
    /// Encrypt with the passphrase in this file (mode 0600; never give a passphrase as a flag).
    #[arg(long, env = "WALVAULT_ENCRYPT_PASSPHRASE_FILE")]
    pub encrypt_passphrase_file: Option<PathBuf>,
}

/// WAL streaming (run only).
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Streaming")]
pub struct StreamOpts {
    /// Physical replication slot name [default: walvault].
    #[arg(long, env = "WALVAULT_SLOT")]
    pub slot: Option<String>,
    /// Do not create the slot if it is missing.
    #[arg(long, env = "WALVAULT_NO_CREATE_SLOT")]
    pub no_create_slot: bool,
    /// Seal and upload a chunk at least this often while WAL flows [default: 1s].
    #[arg(long, env = "WALVAULT_CHUNK_INTERVAL", value_parser = humantime::parse_duration)]
    pub chunk_interval: Option<Duration>,
    /// Largest chunk [default: 4MiB].
    #[arg(long, env = "WALVAULT_CHUNK_MAX_BYTES")]
    pub chunk_max_bytes: Option<String>,
    /// Uploads in flight [default: 4].
    #[arg(long, env = "WALVAULT_UPLOAD_CONCURRENCY")]
    pub upload_concurrency: Option<usize>,
    /// Give up on one upload attempt after this long and retry [default: 60s].
    #[arg(long, env = "WALVAULT_UPLOAD_TIMEOUT", value_parser = humantime::parse_duration)]
    pub upload_timeout: Option<Duration>,
    /// Send standby status to PostgreSQL at least this often [default: 10s].
    #[arg(long, env = "WALVAULT_STATUS_INTERVAL", value_parser = humantime::parse_duration)]
    pub status_interval: Option<Duration>,
    /// At SIGTERM, wait at most this long for received WAL to become durable before exiting
    /// (exit 1 if it could not: the slot keeps that WAL) [default: 30s].
    #[arg(long, env = "WALVAULT_SHUTDOWN_TIMEOUT", value_parser = humantime::parse_duration)]
    pub shutdown_timeout: Option<Duration>,
    /// Synchronous mode (RPO = 0): make WAL durable in the archive as soon as it arrives (group
    /// commit, no waiting for --chunk-interval) and report it at once, so that PostgreSQL with
    /// synchronous_standby_names naming this agent returns a commit only once it is archived.
    #[arg(long, env = "WALVAULT_SYNCHRONOUS")]
    pub synchronous: bool,
    /// The application_name the agent connects with: what synchronous_standby_names names
    /// [default: walvault, or application_name in --pg-url].
    #[arg(long, env = "WALVAULT_APPLICATION_NAME")]
    pub application_name: Option<String>,
    /// Serve /metrics, /healthz and /status on this address (e.g. 127.0.0.1:9187).
    #[arg(long, env = "WALVAULT_LISTEN")]
    pub listen: Option<String>,
    /// With encryption: draw a new data key this often (old ones are forgotten) [default: 24h].
    #[arg(long, env = "WALVAULT_KEY_ROTATION_INTERVAL", value_parser = humantime::parse_duration)]
    pub key_rotation_interval: Option<Duration>,
}

/// When `run` takes base backups.
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Backup schedule")]
pub struct ScheduleOpts {
    /// Take a base backup this often (e.g. 24h).
    #[arg(long, env = "WALVAULT_BACKUP_INTERVAL", value_parser = humantime::parse_duration)]
    pub backup_interval: Option<Duration>,
    /// Take a base backup every day at this UTC time (HH:MM).
    #[arg(long, env = "WALVAULT_BACKUP_AT")]
    pub backup_at: Option<String>,
    /// Take a base backup once this much WAL was archived since the last one (e.g. 10GiB).
    #[arg(long, env = "WALVAULT_BACKUP_WAL_VOLUME")]
    pub backup_wal_volume: Option<String>,
    /// Take no base backups from `run` (not even the first one).
    #[arg(long, env = "WALVAULT_NO_BACKUPS")]
    pub no_backups: bool,
}

/// How base backups are taken.
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Base backups")]
pub struct BackupOpts {
    /// Base backup part size, at most 1GiB [default: 64MiB].
    #[arg(long, env = "WALVAULT_BACKUP_PART_SIZE")]
    pub backup_part_size: Option<String>,
    /// Spread the backup's checkpoint instead of a fast one.
    #[arg(long, env = "WALVAULT_SPREAD_CHECKPOINT")]
    pub spread_checkpoint: bool,
    /// Take incremental backups (PostgreSQL 17+, summarize_wal = on): only the blocks changed
    /// since the newest backup. The first backup of an archive is full.
    #[arg(long, env = "WALVAULT_INCREMENTAL")]
    pub incremental: bool,
    /// With --incremental: take a full backup instead once the chain's full backup is this old
    /// (e.g. 7d: a full weekly, incrementals in between).
    #[arg(long, env = "WALVAULT_FULL_EVERY", value_parser = humantime::parse_duration)]
    pub full_every: Option<Duration>,
    /// With --incremental: take a full backup when an incremental one cannot be taken (server
    /// older than 17, summarize_wal off, no usable parent) instead of failing.
    #[arg(long, env = "WALVAULT_FALLBACK_FULL")]
    pub fallback_full: bool,
    /// Keep copies of the manifests of the backups taken here (mode 0600): incrementals on an
    /// encrypted archive need them, as the agent cannot decrypt the archive's copies.
    #[arg(long, env = "WALVAULT_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
}

/// What to keep.
#[derive(Args, Debug, Clone, Default)]
#[command(next_help_heading = "Retention")]
pub struct RetentionOpts {
    /// Keep the newest N full backups (older ones, and the WAL only they need, are deleted).
    #[arg(long, env = "WALVAULT_RETAIN_FULL")]
    pub retain_full: Option<usize>,
    /// Keep what is needed to recover to any point in the last D days.
    #[arg(long, env = "WALVAULT_RETAIN_DAYS")]
    pub retain_days: Option<u32>,
}

#[derive(Args, Debug)]
pub struct RunArgs {
    #[command(flatten)]
    pub archive: ArchiveOpts,
    #[command(flatten)]
    pub server: ServerOpts,
    #[command(flatten)]
    pub stream: StreamOpts,
    #[command(flatten)]
    pub schedule: ScheduleOpts,
    #[command(flatten)]
    pub backup: BackupOpts,
    #[command(flatten)]
    pub retention: RetentionOpts,
}

#[derive(Args, Debug)]
pub struct BackupCmdArgs {
    #[command(flatten)]
    pub archive: ArchiveOpts,
    #[command(flatten)]
    pub server: ServerOpts,
    #[command(flatten)]
    pub backup: BackupOpts,
    #[command(flatten)]
    pub retention: RetentionOpts,
}

#[derive(Args, Debug)]
pub struct ExpireArgs {
    #[command(flatten)]
    pub archive: ArchiveOpts,
    #[command(flatten)]
    pub retention: RetentionOpts,
    /// Say what would be deleted, delete nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct CopyArgs {
    /// The archive to copy from (file:///path, a path, s3://bucket/prefix).
    #[arg(long)]
    pub from: String,
    /// The archive to copy to (created if it is a local directory that does not exist).
    #[arg(long)]
    pub to: String,
    /// S3 endpoint of --from (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS).
    #[arg(long)]
    pub from_s3_endpoint: Option<String>,
    #[arg(long)]
    pub from_s3_region: Option<String>,
    #[arg(long)]
    pub from_s3_force_path_style: bool,
    /// S3 endpoint of --to. Its credentials: WALVAULT_TO_AWS_ACCESS_KEY_ID and
    /// WALVAULT_TO_AWS_SECRET_ACCESS_KEY if set, else the usual AWS chain.
    #[arg(long)]
    pub to_s3_endpoint: Option<String>,
    #[arg(long)]
    pub to_s3_region: Option<String>,
    #[arg(long)]
    pub to_s3_force_path_style: bool,
    /// Copy only objects signed by this key (repeatable).
    #[arg(long = "verify-key", value_delimiter = ',')]
    pub verify_keys: Vec<String>,
    /// One pass, then exit (0: the copy holds everything the source had at the pass's start,
    /// backups whose WAL was still missing excepted).
    #[arg(long)]
    pub once: bool,
    /// Time between passes.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// Serve /metrics, /healthz and /status on this address.
    #[arg(long)]
    pub listen: Option<String>,
    /// Log format: plain or json.
    #[arg(long)]
    pub log_format: Option<String>,
    #[command(flatten)]
    pub retention: RetentionOpts,
}

#[derive(Args, Debug)]
pub struct KeygenArgs {
    /// Where to write the new signing key (must not exist; written with mode 0600).
    #[arg(long)]
    pub signing_key: PathBuf,
}
