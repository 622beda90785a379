//! Running walvault's binaries from tests, and the restore-then-start step many tests share.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Result};

use crate::agent::workspace_binary;
use crate::pg::{pg_command, pg_program, PgCluster};

/// Run a workspace binary: (exit code, stdout, stderr).
pub fn run(bin: &str, args: &[&str]) -> (i32, String, String) {
    run_env(bin, args, &[])
}

/// [`run`] with extra environment variables.
pub fn run_env(bin: &str, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = Command::new(workspace_binary(bin).unwrap())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("run {bin}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// pg_verifybackup on a restored data directory (recovery settings excepted).
pub fn verifybackup(data: &Path) -> Result<()> {
    let out = pg_command(&pg_program("pg_verifybackup")?)?
        .args(["-n", "-i", "postgresql.auto.conf", "-i", "recovery.signal"])
        .arg(data)
        .output()?;
    if !out.status.success() {
        bail!("pg_verifybackup: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Start a restored data directory and wait until recovery has ended (promotion).
pub async fn start_recovered(dir: std::path::PathBuf, data: std::path::PathBuf) -> Result<PgCluster> {
    let pg = PgCluster::from_data_dir("restored", dir, data, vec![])?;
    pg.start()?;
    for _ in 0..1200 {
        if let Ok(r) = pg.query_one_text("SELECT pg_is_in_recovery()").await {
            if r == "f" {
                return Ok(pg);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!(
        "restored cluster still in recovery after 120 s; log:\n{}",
        std::fs::read_to_string(&pg.log).unwrap_or_default()
    )
}

/// `walvault-recover restore` into a fresh directory as the PostgreSQL user, checked with
/// pg_verifybackup, started and recovered. Returns the cluster and restore's stdout.
pub async fn restore_and_start(archive: &str, extra: &[&str]) -> (PgCluster, String) {
    let dir = PgCluster::fresh_dir("restored").unwrap();
    let data = dir.join("data");
    let owner = PgCluster::pg_user_name();
    // No lease: this helper waits for the replay itself (tests of leases take one explicitly).
    let mut args =
        vec!["restore", "--archive", archive, "--pgdata", data.to_str().unwrap(), "--owner", &owner, "--lease", "0s"];
    args.extend_from_slice(extra);
    let (code, out, err) = run("walvault-recover", &args);
    assert_eq!(code, 0, "restore failed:\n{out}\n{err}");
    verifybackup(&data).unwrap();
    (start_recovered(dir, data).await.unwrap(), out)
}

/// Peak resident memory (KiB) and exit code of a command, from wait4's rusage of that child.
pub fn run_measured(cmd: &mut Command) -> Result<(i32, u64, String)> {
    let child = cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn()?;
    let pid = child.id() as libc::pid_t;
    let mut stderr = child.stderr.expect("piped");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let mut status = 0;
    // SAFETY: an all-zero rusage is valid; wait4 on our own child's pid fills it.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: pid is our child, not yet waited for; pointers are to live locals.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    if r != pid {
        bail!("wait4 failed: {}", std::io::Error::last_os_error());
    }
    let code = if libc::WIFEXITED(status) { libc::WEXITSTATUS(status) } else { 128 + libc::WTERMSIG(status) };
    Ok((code, usage.ru_maxrss as u64, reader.join().unwrap_or_default()))
}
