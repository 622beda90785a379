//! Harness for walvault's integration tests: real PostgreSQL clusters ([`pg::PgCluster`]) and a
//! real S3-compatible server ([`s3server::S3Server`]), each with its own ports and directories
//! under [`test_root`]. A missing binary or server fails the test with an install hint; nothing
//! passes by skipping.

use std::net::TcpListener;
use std::path::PathBuf;

use anyhow::{Context, Result};

pub mod agent;
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
