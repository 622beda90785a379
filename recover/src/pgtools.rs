//! Running PostgreSQL's own programs for a restore: finding them for the archive's major,
//! running them as the data directory's owner, starting a restored server and waiting for it.
//!
//! Tools are looked up, for the archive's PostgreSQL major `M`: in `--pg-bin` if given (and
//! only there), else in `/usr/lib/postgresql/M/bin` (Debian, Ubuntu), `/usr/pgsql-M/bin`
//! (RHEL and the PGDG packages), `/opt/postgresql/M/bin`, then each directory of `PATH`. Each
//! tool found is asked for its `--version`, which must be of major `M` (the tools of another
//! major misread a backup: pg_verifybackup 18 on a 17 backup reports a bad pg_control CRC).
//! Every error names the paths tried.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The user PostgreSQL runs as, when walvault-recover runs as root.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Owner {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

pub fn running_as_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

impl Owner {
    /// Look `name` up in the user database.
    pub fn lookup(name: &str) -> Result<Owner> {
        let c = std::ffi::CString::new(name)?;
        // SAFETY: getpwnam returns static storage or null; the ids are copied at once.
        let pw = unsafe { libc::getpwnam(c.as_ptr()) };
        if pw.is_null() {
            bail!("no such user {name:?}\nHINT: --owner takes the name of an existing user, the one PostgreSQL runs as (e.g. postgres)");
        }
        // SAFETY: non-null getpwnam result.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        Ok(Owner { name: name.to_string(), uid, gid })
    }

    /// `--owner`, checked: as root an owner is required (PostgreSQL refuses to run as root,
    /// and a root-owned data directory cannot be started) unless `allow_root` says so; not as
    /// root, an owner other than ourselves cannot be given.
    pub fn resolve(name: Option<&str>, allow_root: bool, what: &str) -> Result<Option<Owner>> {
        match (name, running_as_root()) {
            (Some(n), true) => Ok(Some(Owner::lookup(n)?)),
            (None, true) if allow_root => Ok(None),
            (None, true) => bail!(
                "{what} as root without --owner: PostgreSQL cannot run as root, nor on files owned by root\nHINT: pass --owner with the user PostgreSQL runs as (e.g. --owner postgres){}",
                if what == "restore" { ", or --allow-root-owned to keep them root's" } else { "" }
            ),
            (Some(n), false) => {
                let o = Owner::lookup(n)?;
                // SAFETY: geteuid has no preconditions.
                if o.uid != unsafe { libc::geteuid() } {
                    bail!("--owner {n}: only root can give files to another user\nHINT: run as root, or as {n}, or drop --owner");
                }
                Ok(None)
            }
            (None, false) => Ok(None),
        }
    }
}

/// A command that runs as `owner` (when given: we are root), else as ourselves.
pub fn command(program: &Path, owner: Option<&Owner>) -> Command {
    use std::os::unix::process::CommandExt;
    let mut c = Command::new(program);
    if let Some(o) = owner {
        c.uid(o.uid).gid(o.gid);
    }
    c.stdin(std::process::Stdio::null()).env("LC_ALL", "C");
    c
}

/// Run and return stdout; a failure carries stdout and stderr.
pub fn output_ok(mut c: Command, what: &str) -> Result<String> {
    let o = c.output().with_context(|| format!("run {what}"))?;
    if !o.status.success() {
        bail!("{what} failed: {}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&o.stdout).trim().to_string())
}

/// A port number nobody listens on over TCP now (for a server with a private socket).
pub fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// The major of a `--version` line (`pg_ctl (PostgreSQL) 17.6 (Debian 17.6-1)` → 17).
pub fn major_of_version(line: &str) -> Option<u32> {
    let v = line.split_whitespace().find(|w| w.chars().next().is_some_and(|c| c.is_ascii_digit()))?;
    let major: u32 = v.split(['.', 'b', 'r', 'd']).next()?.parse().ok()?;
    // 9.6 and older spell the major with two numbers.
    if major < 10 {
        return v.split('.').nth(1).and_then(|m| m.parse::<u32>().ok()).map(|m| major * 100 + m);
    }
    Some(major)
}

/// PostgreSQL programs of one major, found and checked.
#[derive(Clone, Debug)]
pub struct PgTools {
    found: Vec<(String, PathBuf)>,
}

impl PgTools {
    /// The directories searched for `major` (see the module doc).
    pub fn search_dirs(pg_bin: Option<&Path>, major: u32) -> Vec<PathBuf> {
        if let Some(b) = pg_bin {
            return vec![b.to_path_buf()];
        }
        let mut dirs = vec![
            PathBuf::from(format!("/usr/lib/postgresql/{major}/bin")),
            PathBuf::from(format!("/usr/pgsql-{major}/bin")),
            PathBuf::from(format!("/opt/postgresql/{major}/bin")),
        ];
        if let Some(path) = std::env::var_os("PATH") {
            dirs.extend(std::env::split_paths(&path));
        }
        dirs
    }

    /// Find each of `programs` for `major` and check its version.
    pub fn find(pg_bin: Option<&Path>, major: u32, programs: &[&str]) -> Result<Self> {
        let dirs = Self::search_dirs(pg_bin, major);
        let mut found = Vec::new();
        for p in programs {
            let mut tried = Vec::new();
            let mut hit = None;
            for d in &dirs {
                let path = d.join(p);
                if !path.is_file() {
                    tried.push(format!("{} (absent)", path.display()));
                    continue;
                }
                let out = Command::new(&path).arg("--version").env("LC_ALL", "C").output();
                let line = match &out {
                    Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout).trim().to_string(),
                    Ok(o) => format!("exit {}", o.status),
                    Err(e) => e.to_string(),
                };
                match major_of_version(&line) {
                    Some(m) if m == major => {
                        hit = Some(path);
                        break;
                    }
                    Some(m) => tried.push(format!("{} (PostgreSQL {m})", path.display())),
                    None => tried.push(format!("{} ({line})", path.display())),
                }
            }
            let Some(path) = hit else {
                bail!(
                    "no {p} of PostgreSQL {major} found (the archive's major); tried: {}\nHINT: install PostgreSQL {major}'s server and client programs, or give their directory with --pg-bin",
                    tried.join(", ")
                );
            };
            found.push((p.to_string(), path));
        }
        Ok(PgTools { found })
    }

    /// The path of a program found by [`PgTools::find`].
    pub fn path(&self, program: &str) -> &Path {
        self.found.iter().find(|(p, _)| p == program).map(|(_, p)| p.as_path()).expect("program asked for in find")
    }

    /// The program as a command run as `owner`.
    pub fn command(&self, program: &str, owner: Option<&Owner>) -> Command {
        command(self.path(program), owner)
    }
}

/// `restore --start`: start the restored server on a private socket in `sock_dir`, wait for
/// recovery to reach its target, and return a line saying where it stopped.
pub fn start_and_wait(
    tools: &PgTools,
    owner: Option<&Owner>,
    pgdata: &Path,
    port: u16,
    sock_dir: &Path,
    pg_user: &str,
    action: &str,
) -> Result<String> {
    let log = pgdata.join("walvault-restore-start.log");
    let opts = format!("-p {port} -c unix_socket_directories='{}' -c listen_addresses=''", sock_dir.display());
    let mut c = tools.command("pg_ctl", owner);
    c.arg("-D").arg(pgdata).args(["-o", &opts, "-l"]).arg(&log).args(["-w", "-t", "600", "start"]);
    if let Err(e) = output_ok(c, "pg_ctl start") {
        let tail = std::fs::read_to_string(&log).unwrap_or_default();
        bail!("{e:#}\n{tail}");
    }
    eprintln!(
        "restore: PostgreSQL started on port {port} (socket in {}); waiting for recovery to reach the target",
        sock_dir.display()
    );
    let t0 = std::time::Instant::now();
    loop {
        let mut q = tools.command("psql", owner);
        q.arg("-h").arg(sock_dir).args(["-p", &port.to_string(), "-U", pg_user, "-d", "postgres", "-AtX", "-c"]).arg(
            "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() ELSE '' END, \
             coalesce(pg_last_xact_replay_timestamp()::text, '-')",
        );
        let text = q.output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
        let cols: Vec<&str> = text.split('|').collect();
        let done = matches!((action, cols.as_slice()), (_, ["f", _, _]) | ("pause", ["t", "paused", _]));
        // With target-action shutdown the server stops by itself at the target.
        let stopped = action == "shutdown" && !pgdata.join("postmaster.pid").exists();
        if done || stopped {
            let last = cols.get(2).copied().unwrap_or("-");
            return Ok(format!(
                "recovery reached the target after {:.1} s; last replayed commit: {last}{}",
                t0.elapsed().as_secs_f64(),
                if stopped { " (server shut down at the target)" } else { "" }
            ));
        }
        if t0.elapsed() > std::time::Duration::from_secs(3600) {
            bail!("recovery did not reach the target within an hour; see {}", log.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
    }
}

/// A PostgreSQL server on a restored data directory, private to one scratch directory: its
/// socket there only (`listen_addresses=''`), `archive_mode=off`, and its own `pg_hba.conf`
/// (`local all all trust`: reachable only through that socket, in a directory of mode 0700)
/// so that the restored cluster's own authentication rules do not lock the tool out. Stopped
/// (fast) when dropped. Used by drills (`verify`) and `dump`.
pub struct ScratchServer<'a> {
    pub tools: &'a PgTools,
    pub owner: Option<&'a Owner>,
    pub data: PathBuf,
    pub sock: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    pub pg_user: String,
    running: bool,
}

impl<'a> ScratchServer<'a> {
    /// Start PostgreSQL on `data` with its socket and log in `scratch`.
    pub fn start(
        tools: &'a PgTools,
        owner: Option<&'a Owner>,
        data: &Path,
        scratch: &Path,
        pg_user: &str,
    ) -> Result<Self> {
        let port = free_port()?;
        let log = scratch.join("postgres.log");
        let hba = scratch.join("scratch_hba.conf");
        std::fs::write(
            &hba,
            "# walvault scratch server: its socket directory is private
local all all trust
",
        )?;
        if let Some(o) = owner {
            std::os::unix::fs::chown(&hba, Some(o.uid), Some(o.gid))?;
        }
        let o = format!(
            "-p {port} -c listen_addresses='' -c unix_socket_directories='{}' -c archive_mode=off -c hba_file='{}'",
            scratch.display(),
            hba.display()
        );
        let server = ScratchServer {
            tools,
            owner,
            data: data.to_path_buf(),
            sock: scratch.to_path_buf(),
            port,
            log: log.clone(),
            pg_user: pg_user.to_string(),
            running: true,
        };
        let mut c = tools.command("pg_ctl", owner);
        c.arg("-D").arg(data).args(["-o", &o, "-l"]).arg(&log).args(["-w", "-t", "600", "start"]);
        if let Err(e) = output_ok(c, "pg_ctl start") {
            return Err(e.context(format!("start PostgreSQL; its log ends:\n{}", server.log_tail(15))));
        }
        Ok(server)
    }

    /// The last `n` lines of the server's log.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// Connection arguments for libpq programs (`-h -p -U`).
    pub fn conn_args(&self) -> Vec<String> {
        vec![
            "-h".into(),
            self.sock.display().to_string(),
            "-p".into(),
            self.port.to_string(),
            "-U".into(),
            self.pg_user.clone(),
        ]
    }

    /// Run `sql` in `db` with psql: its unaligned output.
    pub fn psql(&self, db: &str, sql: &str) -> Result<String> {
        let mut c = self.tools.command("psql", self.owner);
        c.args(self.conn_args()).args(["-d", db, "-AtX", "-v", "ON_ERROR_STOP=1", "-c", sql]);
        output_ok(c, &format!("psql -c {sql:?}"))
    }

    /// Wait until recovery has ended (promoted) or, with `paused_ok`, is paused at its target.
    /// A server that stops meanwhile (a target it could not reach) is an error with its log.
    pub async fn wait_recovered(&self, timeout: std::time::Duration, paused_ok: bool) -> Result<()> {
        let t0 = std::time::Instant::now();
        loop {
            let q = "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN pg_get_wal_replay_pause_state() ELSE '' END";
            if let Ok(s) = self.psql("postgres", q) {
                let cols: Vec<&str> = s.split('|').collect();
                match cols.as_slice() {
                    ["f", _] => return Ok(()),
                    ["t", "paused"] if paused_ok => return Ok(()),
                    _ => {}
                }
            }
            if !self.data.join("postmaster.pid").exists() {
                bail!("PostgreSQL stopped during recovery; its log ends:\n{}", self.log_tail(10));
            }
            if t0.elapsed() > timeout {
                bail!("recovery did not end within {timeout:?}; see {}", self.log.display());
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }

    /// Stop in immediate mode: a scratch copy is discarded (or kept for inspection, where a
    /// start recovers it again), so the shutdown restartpoint of a fast stop — writing every
    /// dirty buffer of the recovered copy — would be time spent for nothing.
    pub fn stop(&mut self) {
        if self.running {
            let mut c = self.tools.command("pg_ctl", self.owner);
            let _ = c.arg("-D").arg(&self.data).args(["-m", "immediate", "-w", "-t", "120", "stop"]).output();
            self.running = false;
        }
    }
}

impl Drop for ScratchServer<'_> {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_lines() {
        assert_eq!(major_of_version("pg_ctl (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"), Some(15));
        assert_eq!(major_of_version("pg_verifybackup (PostgreSQL) 18.4"), Some(18));
        assert_eq!(major_of_version("psql (PostgreSQL) 17beta2"), Some(17));
        assert_eq!(major_of_version("postgres (PostgreSQL) 9.6.24"), Some(906));
        assert_eq!(major_of_version("garbage"), None);
    }

    #[test]
    fn missing_tools_name_what_was_tried() {
        let dir = tempfile::tempdir().unwrap();
        let e = PgTools::find(Some(dir.path()), 17, &["pg_ctl"]).unwrap_err().to_string();
        assert!(e.contains(&dir.path().join("pg_ctl").display().to_string()) && e.contains("PostgreSQL 17"), "{e}");
    }
}
