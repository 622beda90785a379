//! Harness for walvault's integration tests: real PostgreSQL clusters ([`pg::PgCluster`]) and a
//! real S3-compatible server ([`s3server::S3Server`]), each with its own ports and directories
//! under [`test_root`]. A missing binary or server fails the test with an install hint; nothing
//! passes by skipping.

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::{Context, Result};

pub mod agent;
pub mod cli;
pub mod pg;
pub mod s3server;

/// Where test clusters and servers live: `WALVAULT_TEST_DIR` or `/tmp/walvault-tests`. It must
/// be traversable by the PostgreSQL user, so never under /root.
pub fn test_root() -> Result<PathBuf> {
    let root = std::env::var_os("WALVAULT_TEST_DIR").map(PathBuf::from).unwrap_or_else(|| "/tmp/walvault-tests".into());
    std::fs::create_dir_all(&root).with_context(|| format!("create {}", root.display()))?;
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o1777));
    Ok(root)
}

/// Whether a test's directories and logs are kept: always with `WALVAULT_KEEP_TEST_DIRS=1`,
/// and when the test is failing (the thread is panicking), so that its logs can be read; the
/// kept path is printed.
pub fn keep_for(what: &str, path: &std::path::Path) -> bool {
    if std::env::var_os("WALVAULT_KEEP_TEST_DIRS").is_some() {
        return true;
    }
    if std::thread::panicking() {
        eprintln!("test failed: kept {what} at {}", path.display());
        return true;
    }
    false
}

/// A new local archive for one test: `(its temp dir, the archive URL, the archive root)`.
///
/// The root is created the way an operator shares an archive between the agent's user and
/// PostgreSQL's (whose `restore_command` reads it): mode 2750, group of the PostgreSQL user, so
/// that every object the store writes is readable by that group and by nobody else.
pub fn local_archive() -> Result<(tempfile::TempDir, String, PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new().prefix("archive-").tempdir_in(test_root()?)?;
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
    let root = dir.path().join("repo");
    std::fs::create_dir(&root)?;
    if let Some(u) = pg::pg_user()? {
        std::os::unix::fs::chown(&root, None, Some(u.gid))?;
    }
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o2750))?;
    Ok((dir, format!("file://{}", root.display()), root))
}

/// A loopback port that is free now. Test processes run in parallel, so ports are drawn at
/// random from a range the kernel does not hand out on its own (below the ephemeral range)
/// rather than asking for port 0 and racing other processes for the same answers.
pub fn free_port() -> Result<u16> {
    for _ in 0..200 {
        let port: u16 = rand::random::<u16>() % 20000 + 10000;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free loopback port found")
}

/// Log to the test's output (captured by the runner), once per process.
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_test_writer()
        .try_init();
}

/// Check `cond` every 100 ms until it holds or `timeout` has passed; whether it held.
pub async fn eventually(timeout: std::time::Duration, mut cond: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    loop {
        if cond() {
            return true;
        }
        if t0.elapsed() > timeout {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Whether the agent put the fault command `cmd` of the fault file `faults` in force within
/// `timeout` (it writes the command to `<faults>.applied` once it is).
pub async fn fault_applied(faults: &std::path::Path, cmd: &str, timeout: std::time::Duration) -> bool {
    let applied = walvault_shared::storage::faulty::applied_path(faults);
    eventually(timeout, || std::fs::read_to_string(&applied).is_ok_and(|t| t == cmd)).await
}
