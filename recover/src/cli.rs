//! The command line of `walvault-recover`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use walvault_shared::storage::s3::S3Options;

pub const EXIT_CODES: &str = "Exit codes: 0 success; 1 failure; 2 usage error. wal-fetch: 0 written, 1 not in the archive, 126 could not fetch (or did not verify). audit: 0 target met, 1 missed, 2 error. verify: 0 passed, 1 failed.";

#[derive(Parser)]
#[command(name = "walvault-recover", version, about = "Restore PostgreSQL from a walvault archive.", after_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Which archive to read, and how to trust it.
#[derive(Args, Debug, Clone)]
#[command(next_help_heading = "Archive")]
pub struct ArchiveArgs {
    /// Archive: file:///path, a plain path, or s3://bucket/prefix.
    #[arg(long, env = "WALVAULT_ARCHIVE")]
    pub archive: String,
    /// S3 endpoint URL (else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, else AWS).
    #[arg(long, env = "WALVAULT_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// S3 region (else AWS_REGION, else us-east-1).
    #[arg(long, env = "WALVAULT_S3_REGION")]
    pub s3_region: Option<String>,
    /// Address buckets as endpoint/bucket (MinIO, SeaweedFS, Ceph, most self-hosted stores).
    #[arg(long, env = "WALVAULT_S3_FORCE_PATH_STYLE")]
    pub s3_force_path_style: bool,
    /// Refuse every object not signed by this key: the line `walvault-agent keygen` printed, or
    /// @FILE holding it. Repeat during a key rotation (any of them may verify).
    #[arg(long = "verify-key", env = "WALVAULT_VERIFY_KEY", value_delimiter = ',')]
    pub verify_keys: Vec<String>,
    /// An encrypted archive: the age identity file (age-keygen's AGE-SECRET-KEY-1… lines) that
    /// decrypts it. restore writes this file's path, never the key, into restore_command.
    #[arg(long, env = "WALVAULT_IDENTITY_FILE")]
    pub identity: Option<PathBuf>,
    /// An archive encrypted with a passphrase: the file holding it (mode 0600).
    #[arg(long, env = "WALVAULT_PASSPHRASE_FILE", conflicts_with = "identity")]
    pub passphrase_file: Option<PathBuf>,
}

impl ArchiveArgs {
    pub fn s3(&self) -> S3Options {
        S3Options {
            endpoint: self.s3_endpoint.clone(),
            region: self.s3_region.clone(),
            force_path_style: self.s3_force_path_style,
            ..Default::default()
        }
    }

    /// The same settings as arguments for another walvault-recover process (no secrets; the
    /// verify keys as their text, not their files, so the restored server needs no file).
    pub fn args(&self) -> anyhow::Result<Vec<String>> {
        let mut v = vec!["--archive".to_string(), self.archive.clone()];
        if let Some(e) = &self.s3_endpoint {
            v.extend(["--s3-endpoint".to_string(), e.clone()]);
        }
        if let Some(r) = &self.s3_region {
            v.extend(["--s3-region".to_string(), r.clone()]);
        }
        if self.s3_force_path_style {
            v.push("--s3-force-path-style".into());
        }
        if let Some(keys) = walvault_shared::archive::sign::VerifyKeys::from_args(&self.verify_keys)? {
            v.extend(keys.to_args());
        }
        let abs = |p: &PathBuf| -> anyhow::Result<String> {
            Ok(if p.is_absolute() { p.clone() } else { std::env::current_dir()?.join(p) }
                .to_string_lossy()
                .into_owned())
        };
        if let Some(p) = &self.identity {
            v.extend(["--identity".to_string(), abs(p)?]);
        }
        if let Some(p) = &self.passphrase_file {
            v.extend(["--passphrase-file".to_string(), abs(p)?]);
        }
        Ok(v)
    }

    /// The identities given, parsed.
    pub fn identities(&self) -> anyhow::Result<Option<walvault_shared::archive::crypt::Identities>> {
        use walvault_shared::archive::crypt::Identities;
        match (&self.identity, &self.passphrase_file) {
            (Some(p), _) => Ok(Some(Identities::from_file(p)?)),
            (None, Some(p)) => Ok(Some(Identities::passphrase_file(p)?)),
            (None, None) => Ok(None),
        }
    }
}

#[derive(Subcommand)]
pub enum Cmd {
    /// Backups (with their times), timelines and the recoverable window, by time and LSN.
    List {
        #[command(flatten)]
        archive: ArchiveArgs,
        /// Print as JSON.
        #[arg(long)]
        json: bool,
        /// Also list the restore points (name, LSN, time, timeline) found in the WAL.
        #[arg(long)]
        restore_points: bool,
    },
    /// The RPO actually achieved, gaps, timelines and the recoverable window (exit 0: target met
    /// and no gaps, 1: not, 2: error).
    Audit(AuditArgs),
    /// Restore a base backup and set up recovery to a target.
    Restore(Box<RestoreArgs>),
    /// A restore drill: restore the newest backup into a scratch directory, check it with
    /// pg_verifybackup, recover it with PostgreSQL to the end of the archive, query it, stop it.
    /// Exit 0 passed, 1 failed.
    Verify(VerifyArgs),
    /// PostgreSQL restore_command: fetch WALFILE (%f) into DEST (%p).
    WalFetch {
        #[command(flatten)]
        archive: ArchiveArgs,
        /// Segments to prefetch in the background into pg_wal/walvault-prefetch (0: off).
        #[arg(long, default_value_t = 4)]
        prefetch: u32,
        /// The file PostgreSQL asks for (%f).
        walfile: String,
        /// Where to write it (%p).
        dest: PathBuf,
    },
    /// The disaster-recovery plan as measurements: per scenario (point-in-time restore, loss of
    /// the host, loss of the archive's provider with --copy) the achieved RPO, the last
    /// measured RTO and drill age, against --rpo-target/--rto-target (exit 0 all met, 1 not,
    /// 2 error).
    Report(ReportArgs),
    /// A logical export at a point in time: restore into a scratch directory, recover to the
    /// target, pg_dump what is selected (to --file, or into a database with --into), clean up.
    Dump(Box<DumpArgs>),
    /// Write one backup's files as the server sent them (an incremental backup stays
    /// incremental: `INCREMENTAL.*` files, its backup_label's INCREMENTAL FROM lines) with its
    /// backup_manifest into an empty directory: for pg_combinebackup, pg_verifybackup or
    /// inspection. Tablespaces go to DIR/pg_tblspc/OID. `restore` needs none of this.
    ExportBackup(ExportArgs),
    /// Re-wrap every epoch key of an encrypted archive for new recipients (or a new
    /// passphrase): only the keys/ objects are rewritten, no data object is read or written.
    /// Afterwards the old identity cannot decrypt anything; the new one decrypts everything.
    /// Safe to interrupt and to run again.
    Rekey(RekeyArgs),
    /// (packaging) write the man page and shell completions into DIR.
    #[command(hide = true)]
    GenerateDocs { dir: PathBuf },
    /// (internal) the background prefetcher started by wal-fetch.
    #[command(hide = true)]
    WalPrefetch {
        #[command(flatten)]
        archive: ArchiveArgs,
        #[arg(long)]
        spool: PathBuf,
        #[arg(long)]
        count: u32,
        after: String,
    },
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// The backup to export (`walvault-recover list` shows ids).
    #[arg(long)]
    pub backup: String,
    /// Directory to write into (absent or empty).
    #[arg(long)]
    pub dir: PathBuf,
    /// Give the files to this user (as root).
    #[arg(long)]
    pub owner: Option<String>,
    /// Parts downloaded in parallel.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
}

#[derive(Args, Debug)]
pub struct RekeyArgs {
    /// The archive, and the identity (--identity or --passphrase-file) that decrypts it now.
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// New recipient (age1…, repeatable).
    #[arg(long = "to-recipient", value_delimiter = ',')]
    pub to_recipients: Vec<String>,
    /// New recipients, one age1… per line.
    #[arg(long = "to-recipients-file")]
    pub to_recipients_file: Option<PathBuf>,
    /// A new passphrase, from this file (mode 0600).
    #[arg(long = "to-passphrase-file")]
    pub to_passphrase_file: Option<PathBuf>,
    /// Sign the rewritten key objects with this key (as the agent does).
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// (tests) stop, exit 3, after rewriting this many key objects, as if killed.
    #[arg(long, hide = true)]
    pub stop_after: Option<usize>,
}

#[derive(Args, Debug)]
pub struct AuditArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// Only commits at or after this time (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Only commits before this time (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
    /// Pass/fail against this RPO (e.g. 5s).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub rpo_target: Option<std::time::Duration>,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Also write an HTML report with a chart of RPO over time.
    #[arg(long)]
    pub html: Option<PathBuf>,
}

/// The recovery target: exactly one.
#[derive(Args, Debug, Clone)]
#[group(id = "target", required = false, multiple = false)]
pub struct TargetArgs {
    /// Recover to this time (RFC 3339 or PostgreSQL's text, with a zone).
    #[arg(long)]
    pub target_time: Option<String>,
    /// Recover to this WAL position (e.g. 0/3000060).
    #[arg(long)]
    pub target_lsn: Option<String>,
    /// Recover up to this transaction id (its commit included unless --inclusive false).
    #[arg(long)]
    pub target_xid: Option<u64>,
    /// Recover to a restore point made with pg_create_restore_point().
    #[arg(long)]
    pub target_name: Option<String>,
    /// Recover everything archived.
    #[arg(long)]
    pub latest: bool,
}

#[derive(Args, Debug)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// Data directory to restore into (must be empty unless --force).
    #[arg(long)]
    pub pgdata: PathBuf,
    #[command(flatten)]
    pub target: TargetArgs,
    /// What to do at the target: promote, pause or shutdown.
    #[arg(long, default_value = "promote")]
    pub target_action: String,
    /// Timeline to recover along (default: the latest descending from the backup's).
    #[arg(long)]
    pub target_timeline: Option<u32>,
    /// Stop just after (true) or just before (false) the target.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub inclusive: bool,
    /// Empty a non-empty PGDATA first (never one a running server uses).
    #[arg(long)]
    pub force: bool,
    /// Give the restored directory to this user (required when running as root).
    #[arg(long)]
    pub owner: Option<String>,
    /// Running as root without --owner: leave the files owned by root anyway.
    #[arg(long)]
    pub allow_root_owned: bool,
    /// Restore this backup instead of choosing one.
    #[arg(long)]
    pub backup: Option<String>,
    /// Restore the tablespace at OLD to NEW instead (both absolute; repeatable), as
    /// pg_basebackup --tablespace-mapping.
    #[arg(long = "tablespace-mapping", value_name = "OLD=NEW")]
    pub tablespace_mapping: Vec<String>,
    /// Parts downloaded in parallel.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Segments the restore_command prefetches ahead of replay (0: off).
    #[arg(long, default_value_t = 4)]
    pub prefetch: u32,
    /// Start PostgreSQL on the restored directory, wait until recovery reaches the target, and
    /// report the last replayed commit. The server is left running.
    #[arg(long)]
    pub start: bool,
    /// Directory of PostgreSQL's programs (pg_ctl, psql) for --start [default: found for the
    /// archive's major].
    #[arg(long)]
    pub pg_bin: Option<PathBuf>,
    /// Port for the started server.
    #[arg(long, default_value_t = 5433)]
    pub port: u16,
    /// Socket directory for the started server.
    #[arg(long, default_value = "/tmp")]
    pub socket_dir: PathBuf,
    /// Database user for the checks of --start (over the Unix socket).
    #[arg(long, default_value = "postgres")]
    pub pg_user: String,
    /// How long `expire` keeps the restored backup and the WAL after it for the replay that
    /// follows (a lease in the archive; released at once with --start when replay is over;
    /// 0: take none).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub lease: std::time::Duration,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// Directory of PostgreSQL's programs (pg_ctl, psql, pg_verifybackup) [default: found for
    /// the archive's major].
    #[arg(long)]
    pub pg_bin: Option<PathBuf>,
    /// Scratch directory for the drill (absent or empty); default $TMPDIR/walvault-verify-<pid>.
    #[arg(long)]
    pub workdir: Option<PathBuf>,
    /// Run PostgreSQL as this user (required when running as root); it owns the scratch directory.
    #[arg(long)]
    pub owner: Option<String>,
    /// Restore this backup instead of the newest.
    #[arg(long)]
    pub backup: Option<String>,
    /// A query to run on the recovered server (repeatable); the drill fails if it fails.
    #[arg(long)]
    pub check_sql: Vec<String>,
    /// Keep the scratch directory after a successful drill.
    #[arg(long)]
    pub keep: bool,
    /// Give up when recovery has not ended after this long.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Parts downloaded in parallel.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// Report as JSON.
    #[arg(long)]
    pub json: bool,
    /// The database superuser of the restored cluster to connect as.
    #[arg(long, default_value = "postgres")]
    pub pg_user: String,
    /// Drill recovery to this time instead of the archive's end (RFC 3339 or PostgreSQL's
    /// text, with a zone).
    #[arg(long, conflicts_with_all = ["backup", "all_backups"])]
    pub target_time: Option<String>,
    /// Drill every complete backup once, each to its own end (its consistency point).
    #[arg(long, conflicts_with = "backup")]
    pub all_backups: bool,
    /// Do not write the drill's record into the archive.
    #[arg(long)]
    pub no_record: bool,
    /// Sign the drill's record with this key (the agent's), for archives read with
    /// --verify-key.
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct ReportArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    /// The off-site copy (made by walvault-agent copy), read with the same keys.
    #[arg(long)]
    pub copy: Option<String>,
    /// S3 endpoint of the copy, when it differs from the archive's.
    #[arg(long)]
    pub copy_s3_endpoint: Option<String>,
    /// The period measured, back from now.
    #[arg(long, default_value = "30d", value_parser = humantime::parse_duration)]
    pub period: std::time::Duration,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub rpo_target: Option<std::time::Duration>,
    #[arg(long, value_parser = humantime::parse_duration)]
    pub rto_target: Option<std::time::Duration>,
    /// A scenario fails when its last passed drill is older than this.
    #[arg(long, default_value = "8d", value_parser = humantime::parse_duration)]
    pub max_drill_age: std::time::Duration,
    #[arg(long)]
    pub json: bool,
    /// Also write the report as an HTML page.
    #[arg(long)]
    pub html: Option<PathBuf>,
}

#[derive(Args, Debug)]
pub struct DumpArgs {
    #[command(flatten)]
    pub archive: ArchiveArgs,
    #[command(flatten)]
    pub target: TargetArgs,
    /// Write the dump here (a file; a directory for --format directory and for --all). Must not
    /// exist unless --force.
    #[arg(long, required_unless_present = "into", conflicts_with = "into")]
    pub file: Option<PathBuf>,
    /// Restore the dump straight into this database (a libpq connection string) with
    /// pg_restore, once the dump has succeeded.
    #[arg(long)]
    pub into: Option<String>,
    /// pg_dump's format: custom, directory, plain or tar.
    #[arg(long, default_value = "custom")]
    pub format: String,
    /// The database to dump.
    #[arg(long, default_value = "postgres")]
    pub dbname: String,
    /// Dump only tables matching this pattern (pg_dump -t; repeatable).
    #[arg(long)]
    pub table: Vec<String>,
    /// Dump only schemas matching this pattern (pg_dump -n; repeatable).
    #[arg(long)]
    pub schema: Vec<String>,
    /// Leave out tables matching this pattern (pg_dump -T; repeatable).
    #[arg(long)]
    pub exclude_table: Vec<String>,
    /// Definitions only.
    #[arg(long, conflicts_with = "data_only")]
    pub schema_only: bool,
    /// Data only.
    #[arg(long)]
    pub data_only: bool,
    /// Parallel pg_dump jobs (--format directory only).
    #[arg(long)]
    pub jobs: Option<u32>,
    /// Every database (pg_dump of each beside pg_dumpall --globals-only) into the --file
    /// directory.
    #[arg(long, conflicts_with_all = ["into", "table", "schema", "exclude_table", "rename_table"])]
    pub all: bool,
    /// Rename a table in the recovered copy before dumping it (OLD=NEW, schema-qualified or
    /// not; repeatable): put it back beside the live one with --into.
    #[arg(long, value_name = "OLD=NEW")]
    pub rename_table: Vec<String>,
    /// With --into: drop the objects in the target before recreating them (pg_restore --clean
    /// --if-exists).
    #[arg(long, requires = "into")]
    pub clean: bool,
    /// Replace an existing --file.
    #[arg(long)]
    pub force: bool,
    /// Directory of PostgreSQL's programs [default: found for the archive's major].
    #[arg(long)]
    pub pg_bin: Option<PathBuf>,
    /// Run PostgreSQL as this user (required when running as root).
    #[arg(long)]
    pub owner: Option<String>,
    /// Scratch directory for the recovered copy (absent or empty); default
    /// $TMPDIR/walvault-dump-<pid>. Removed afterwards, kept on failure.
    #[arg(long)]
    pub scratch: Option<PathBuf>,
    /// The database superuser of the restored cluster to connect as.
    #[arg(long, default_value = "postgres")]
    pub pg_user: String,
    /// Give up when recovery has not reached the target after this long.
    #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
    /// Parts downloaded in parallel.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
}
