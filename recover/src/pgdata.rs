//! Guards for the directories a restore writes: never one a running PostgreSQL server uses.
//!
//! `restore --force` empties its target, and a drill or a dump writes a scratch data directory.
//! Before anything is deleted or written, [`running_server`] looks for a live server using the
//! directory, two ways:
//!
//! 1. its `postmaster.pid` names a live process (the first line is the postmaster's PID; a PID
//!    reused by an unrelated program — not `postgres` — is a stale lock file and is ignored, as
//!    PostgreSQL itself would find out at start);
//! 2. a running postmaster has it as its data directory although the lock file is gone or was
//!    never there: PostgreSQL `chdir`s into its data directory, so `/proc/PID/cwd` of every
//!    process named `postgres` tells where it lives (readable as root; otherwise the
//!    postmaster's `-D` argument in `/proc/PID/cmdline` is used), and every tablespace that
//!    server links from `pg_tblspc` counts as used by it too.
//!
//! The answer names the process, so the refusal can say which server to stop.

use std::path::{Path, PathBuf};

/// A running server that uses a directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveServer {
    pub pid: u32,
    /// How it was found, for the message.
    pub how: String,
}

impl std::fmt::Display for LiveServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PostgreSQL process {} ({})", self.pid, self.how)
    }
}

fn canonical(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

fn pid_alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn comm(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim().to_string())
}

/// Whether `pid` is (as far as /proc tells) a PostgreSQL server process.
fn is_postgres(pid: u32) -> bool {
    match comm(pid) {
        Some(c) => c.starts_with("postgres") || c.starts_with("postmaster"),
        // Gone meanwhile, or hidden from us: treat as PostgreSQL (refusing is the safe side).
        None => pid_alive(pid),
    }
}

/// The postmaster PID recorded in `dir/postmaster.pid`, if the file is there.
fn lock_file_pid(dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join("postmaster.pid")).ok()?;
    // A negative PID marks a single-user backend; the process is the same either way.
    text.lines().next()?.trim().trim_start_matches('-').parse().ok()
}

/// The data directory of every running PostgreSQL process we can see: `(pid, data dir)`.
fn running_data_dirs() -> Vec<(u32, PathBuf)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if !comm(pid).is_some_and(|c| c.starts_with("postgres") || c.starts_with("postmaster")) {
            continue;
        }
        if let Ok(cwd) = std::fs::read_link(format!("/proc/{pid}/cwd")) {
            out.push((pid, cwd));
            continue;
        }
        // Not ours to inspect: the postmaster's command line says `-D DIR` (or `-DDIR`).
        if let Ok(raw) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let args: Vec<String> = raw.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
            let mut it = args.iter();
            while let Some(a) = it.next() {
                if a == "-D" {
                    if let Some(d) = it.next() {
                        out.push((pid, PathBuf::from(d)));
                    }
                } else if let Some(d) = a.strip_prefix("-D") {
                    out.push((pid, PathBuf::from(d)));
                }
            }
        }
    }
    out
}

/// A running PostgreSQL server that uses `dir` as its data directory or as a tablespace, or
/// `None`. `dir` need not exist.
pub fn running_server(dir: &Path) -> Option<LiveServer> {
    if let Some(pid) = lock_file_pid(dir) {
        if pid_alive(pid) && is_postgres(pid) {
            return Some(LiveServer { pid, how: format!("its postmaster.pid names the live process {pid}") });
        }
    }
    let want = canonical(dir)?;
    for (pid, data) in running_data_dirs() {
        let Some(data) = canonical(&data) else { continue };
        if data == want {
            return Some(LiveServer {
                pid,
                how: format!("it is running with {} as its data directory", data.display()),
            });
        }
        // Tablespaces of that server: pg_tblspc/<oid> -> location.
        if let Ok(rd) = std::fs::read_dir(data.join("pg_tblspc")) {
            for link in rd.flatten() {
                if canonical(&link.path()).is_some_and(|t| t == want) {
                    return Some(LiveServer {
                        pid,
                        how: format!("{} is a tablespace of its data directory {}", want.display(), data.display()),
                    });
                }
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_file_of_a_live_postgres_is_found_and_a_stale_one_ignored() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(running_server(dir.path()), None);
        // Our own PID is alive but not a postgres process: a stale, reused PID.
        std::fs::write(dir.path().join("postmaster.pid"), format!("{}\n/x\n", std::process::id())).unwrap();
        assert_eq!(running_server(dir.path()), None);
        // A PID that does not exist.
        std::fs::write(dir.path().join("postmaster.pid"), "999999999\n").unwrap();
        assert_eq!(running_server(dir.path()), None);
    }

    #[test]
    fn a_missing_directory_has_no_server() {
        assert_eq!(running_server(Path::new("/nonexistent/walvault/x")), None);
    }
}
