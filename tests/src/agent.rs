//! Running the real `walvault-agent` binary in tests, and reading back what it archived.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use std::sync::Arc;

use walvault_shared::archive::names;
use walvault_shared::archive::read::{Reader, Want};
use walvault_shared::archive::walcat::WalCatalog;
use walvault_shared::lsn::{Lsn, SegNo, TimelineId};
use walvault_shared::storage::ObjectStore;
use walvault_shared::wal::SegmentName;

use crate::{free_port, test_root};

/// A workspace binary (`walvault-agent`, `walvault-recover`), built next to the test binary.
/// tests/run.sh builds them (`cargo build --workspace --bins`) before the tests.
pub fn workspace_binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    // target/debug/deps/it-HASH -> target/debug/NAME; a binary in target/debug itself (bench)
    // finds it beside itself.
    let beside = exe.parent().context("binary location")?;
    let dir = if beside.ends_with("deps") { beside.parent().context("test binary location")? } else { beside };
    let p = dir.join(name);
    if !p.exists() {
        bail!("{} not found\nHINT: build it first: cargo build --workspace --bins (tests/run.sh does)", p.display());
    }
    Ok(p)
}

/// A running `walvault-agent run`.
pub struct Agent {
    child: Option<Child>,
    pub listen: String,
    pub log: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
}

impl Agent {
    /// Start `walvault-agent run` with `--pg-url`, `--archive`, a free `--listen` port and
    /// `extra` flags.
    pub fn start(pg_url: &str, archive: &str, extra: &[&str]) -> Result<Self> {
        Self::start_with_env(pg_url, archive, extra, &[])
    }

    pub fn start_with_env(pg_url: &str, archive: &str, extra: &[&str], envs: &[(&str, &str)]) -> Result<Self> {
        let listen = format!("127.0.0.1:{}", free_port()?);
        let log = test_root()?.join(format!("agent-{}-{:08x}.log", std::process::id(), rand::random::<u32>()));
        let mut args: Vec<String> = vec![
            "run".into(),
            "--pg-url".into(),
            pg_url.into(),
            "--archive".into(),
            archive.into(),
            "--listen".into(),
            listen.clone(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut a = Agent {
            child: None,
            listen,
            log,
            args,
            envs: envs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        };
        a.spawn()?;
        Ok(a)
    }

    fn spawn(&mut self) -> Result<()> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(workspace_binary("walvault-agent")?)
            .args(&self.args)
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .env("RUST_LOG", std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("start walvault-agent")?;
        self.child = Some(child);
        Ok(())
    }

    /// Start again with the same arguments (after `kill9` or `stop`).
    pub fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            bail!("agent still running");
        }
        self.spawn()
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for the exit code.
    pub fn stop(&mut self) -> Result<i32> {
        let Some(mut c) = self.child.take() else { bail!("agent not running") };
        // SAFETY: kill(2) on our child's PID.
        unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if let Some(s) = c.try_wait()? {
                return Ok(s.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                let _ = c.kill();
                bail!("agent did not stop within 120 s after SIGTERM; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait for the agent to exit by itself; its exit code.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<i32> {
        let Some(c) = self.child.as_mut() else { bail!("agent not running") };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = c.try_wait()? {
                self.child = None;
                return Ok(s.code().unwrap_or(-1));
            }
            if Instant::now() > deadline {
                bail!("agent still running after {timeout:?}; log:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// GET a path on the agent's status listener.
    pub async fn http_get(&self, path: &str) -> Result<(u16, String)> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(&self.listen).await?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await?;
        let mut buf = String::new();
        s.read_to_string(&mut buf).await?;
        let code = buf.split_whitespace().nth(1).and_then(|c| c.parse().ok()).context("HTTP status")?;
        let body = buf.split_once("\r\n\r\n").map(|x| x.1.to_string()).unwrap_or_default();
        Ok((code, body))
    }

    pub async fn status(&self) -> Result<serde_json::Value> {
        let (code, body) = self.http_get("/status").await?;
        if code != 200 {
            bail!("/status answered {code}");
        }
        Ok(serde_json::from_str(&body)?)
    }

    /// The archived watermark, from /status.
    pub async fn archived_lsn(&self) -> Result<Lsn> {
        let s = self.status().await?;
        s["archived_lsn"].as_str().context("archived_lsn")?.parse().map_err(Into::into)
    }

    /// Wait until the archived watermark reaches `lsn`; the time it took.
    pub async fn wait_archived(&mut self, lsn: Lsn, timeout: Duration) -> Result<Duration> {
        let t0 = Instant::now();
        loop {
            if let Ok(a) = self.archived_lsn().await {
                if a >= lsn {
                    return Ok(t0.elapsed());
                }
            }
            if !self.is_running() {
                bail!("agent exited while waiting for {lsn} to be archived; log:\n{}", self.log_text());
            }
            if t0.elapsed() > timeout {
                bail!(
                    "{lsn} not archived after {timeout:?}; status: {:?}; log:\n{}",
                    self.status().await.ok(),
                    self.log_text()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.kill9();
        if !crate::keep_for("the agent's log", &self.log) {
            let _ = std::fs::remove_file(&self.log);
        }
    }
}

/// The WAL catalogue of an archive (one listing).
pub async fn catalog(store: &Arc<dyn ObjectStore>, segment_size: u64) -> Result<WalCatalog> {
    Ok(Reader::new(store.clone(), None).wal_listing(segment_size).await?.catalog)
}

/// Read a whole archived segment (decoded) from the archive.
pub async fn read_segment(
    store: &Arc<dyn ObjectStore>,
    tli: TimelineId,
    segno: SegNo,
    segment_size: u64,
) -> Result<Vec<u8>> {
    let key = names::segment(&SegmentName::new(tli, segno), segment_size);
    Ok(Reader::new(store.clone(), None).read(&key, Want::segment(segment_size)).await?.content)
}

/// Assemble WAL bytes `[from, to)` of `tli` from whatever objects hold them.
pub async fn read_wal(
    store: &Arc<dyn ObjectStore>,
    tli: TimelineId,
    from: Lsn,
    to: Lsn,
    segment_size: u64,
) -> Result<Vec<u8>> {
    let reader = Reader::new(store.clone(), None);
    let listing = reader.wal_listing(segment_size).await?;
    Ok(reader.read_wal(&listing, tli, from, to).await?.bytes)
}
