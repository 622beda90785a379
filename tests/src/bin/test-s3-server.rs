//! Start one SeaweedFS for a whole test run (tests/run.sh), write its endpoint to the file named
//! by the first argument, and run until SIGTERM/SIGINT, then kill it and remove its data.
//! Tests find it through `WALVAULT_TEST_S3_ENDPOINT` and create a bucket each.

use anyhow::{Context, Result};
use walvault_tests::s3server::S3Server;

#[tokio::main]
async fn main() -> Result<()> {
    let out = std::env::args().nth(1).context("usage: test-s3-server ENDPOINT_FILE")?;
    let server = S3Server::start().await?;
    std::fs::write(&out, &server.endpoint).with_context(|| format!("write {out}"))?;
    eprintln!("test-s3-server: SeaweedFS S3 at {}", server.endpoint);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    drop(server);
    Ok(())
}
