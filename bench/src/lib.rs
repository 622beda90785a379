//! What the benchmark binaries share: statistics, process accounting, and a pgBackRest set-up
//! whose CPU use can be measured even though its asynchronous processes detach themselves.
//!
//! Statistics: every figure in a report is the median of the runs, shown with the minimum and
//! maximum (`median (min–max)`); ratios are ratios of medians taken in the same invocation.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use walvault_tests::pg::{chown_to_pg, pg_command, PgCluster};

/// A walvault binary: the release build beside this (debug) binary's target directory if there
/// is one, else the debug build. Benchmarks measure release builds; bench/run.sh builds them.
pub fn bin(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let target = exe.parent().and_then(|p| p.parent()).context("exe dir")?;
    for profile in ["release", "debug"] {
        let p = target.join(profile).join(name);
        if p.exists() {
            return Ok(p);
        }
    }
    bail!("{name} not built\nHINT: cargo build --release -p walvault-agent -p walvault-recover (bench/run.sh does)")
}

/// Nearest-rank percentile (`p` in 0..=100); NaN for no values.
pub fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
    s[i.min(s.len() - 1)]
}

pub fn median(v: &[f64]) -> f64 {
    percentile(v, 50.0)
}

/// `median (min–max)` with `prec` decimals, or just the value for one run.
pub fn mmm(v: &[f64], prec: usize) -> String {
    if v.is_empty() || v.iter().all(|x| x.is_nan()) {
        return "–".into();
    }
    let med = median(v);
    if v.len() == 1 {
        return format!("{med:.prec$}");
    }
    format!("{med:.prec$} ({:.prec$}–{:.prec$})", percentile(v, 0.0), percentile(v, 100.0))
}

/// Bytes of all files under `p`.
pub fn dir_size(p: &Path) -> u64 {
    let mut n = 0;
    if let Ok(rd) = std::fs::read_dir(p) {
        for e in rd.flatten() {
            if let Ok(md) = e.metadata() {
                n += if md.is_dir() { dir_size(&e.path()) } else { md.len() };
            }
        }
    }
    n
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    unsafe { libc::sysconf(libc::_SC_CLK_TCK) as f64 }
}

/// A process's own CPU seconds (utime+stime) and its peak RSS in KiB, from /proc.
pub fn proc_usage(pid: u32) -> Result<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = stat.rsplit_once(')').context("stat")?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state(0) ... utime(11) stime(12).
    let t = |i: usize| f[i].parse::<u64>().unwrap_or(0) as f64 / clock_ticks();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let hwm = status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok((t(11) + t(12), hwm))
}

/// PIDs of live processes whose command name is `comm`.
pub fn pids_named(comm: &str) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir("/proc") {
        for e in rd.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if std::fs::read_to_string(e.path().join("comm")).is_ok_and(|c| c.trim_end() == comm) {
                out.push(pid);
            }
        }
    }
    out
}

/// SIGKILL a child of ours when dropped, unless disarmed (after it was reaped, its PID may be
/// reused).
pub struct KillOnDrop(pub Option<u32>);

impl KillOnDrop {
    pub fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            // SAFETY: kill(2) on our own child's PID, not yet reaped.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// Make this process the reaper of its orphaned descendants (PR_SET_CHILD_SUBREAPER): the
/// PostgreSQL servers it starts, and the processes those detach (pgBackRest's asynchronous
/// archive-push/archive-get), are then re-parented to it when their parents exit, and
/// [`reap_orphans`] collects their resource use when they end. Call before starting anything.
pub fn become_subreaper() -> Result<()> {
    // SAFETY: prctl with an integer argument; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        bail!("prctl(PR_SET_CHILD_SUBREAPER): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Reap the exited (zombie) children of this process whose command name is one of `comms`
/// (never other children: std::process::Child handles wait for those), returning for each the
/// CPU seconds and peak RSS (KiB) of it and its own reaped descendants.
pub fn reap_orphans(comms: &[&str]) -> Vec<(String, f64, u64)> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir("/proc") else { return out };
    for e in rd.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else { continue };
        let Some((head, after)) = stat.rsplit_once(')') else { continue };
        let comm = head.split_once('(').map(|x| x.1).unwrap_or("");
        let f: Vec<&str> = after.split_whitespace().collect();
        if f.len() < 2 || f[0] != "Z" || f[1] != me || !comms.contains(&comm) {
            continue;
        }
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: wait4 on a zombie child of ours, filling our rusage struct.
        if unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) } == pid {
            let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            out.push((comm.to_string(), tv(ru.ru_utime) + tv(ru.ru_stime), ru.ru_maxrss as u64));
        }
    }
    out
}

/// Resource use of one finished command.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub wall_s: f64,
    pub cpu_s: f64,
    pub peak_rss_mib: f64,
}

/// Write every dirty page back (`sync(2)`) before a timed step, so that the step is not charged
/// for the writeback of what came before it: a restore's gigabytes still being written out slow
/// the replay timed right after it. In two runs an hour apart (one each), the replay of WAL in
/// pg_wal (the baseline, timed after the WAL was copied in) took 2.4 s without it and 1.6 s
/// with it. It was also suspected for a chain restore taking 2.6-3.0x a full one on the host of
/// 2026-12-01; that gap stayed with it: it is the combine's own.
pub fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Run a command to completion (after [`settle`]): wall time, CPU of it and its reaped
/// descendants, peak RSS.
pub fn measured(mut c: Command) -> Result<Usage> {
    settle();
    let t0 = Instant::now();
    let mut child = c.stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    let pid = child.id() as i32;
    let mut status = 0i32;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child, filling our rusage struct.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if r < 0 {
        bail!("wait4 failed");
    }
    let wall_s = t0.elapsed().as_secs_f64();
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
        bail!("command failed: {err}");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Usage { wall_s, cpu_s: tv(ru.ru_utime) + tv(ru.ru_stime), peak_rss_mib: ru.ru_maxrss as f64 / 1024.0 })
}

/// A pgBackRest stanza `bench` for one cluster, with asynchronous archiving (archive-push and
/// archive-get, process-max 2 as in pgBackRest's user guide), zstd and a posix repository.
///
/// CPU accounting: the archive_command runs pgBackRest under `/usr/bin/time`, which logs the
/// foreground process; the asynchronous process it starts outlives its parent, so it is
/// re-parented to this benchmark process ([`become_subreaper`], which the caller must have
/// called) and its use, including the local processes it reaped, is collected by
/// [`Pgbackrest::collect`] when it exits.
pub struct Pgbackrest {
    pub dir: PathBuf,
    pub conf: PathBuf,
    pub repo: PathBuf,
    cpu_log: PathBuf,
    wrapper: PathBuf,
    orphans: std::sync::Mutex<(f64, u64)>,
}

impl Pgbackrest {
    pub fn new(pg: &PgCluster) -> Result<Self> {
        if !Path::new("/usr/bin/time").exists() || !Path::new("/usr/bin/pgbackrest").exists() {
            bail!("pgbackrest and /usr/bin/time are needed\nHINT: apt-get install pgbackrest time (bench/run.sh does)");
        }
        let dir = PgCluster::fresh_dir("bench-pgbackrest")?;
        let repo = dir.join("repo");
        let cpu_log = dir.join("cpu.log");
        let wrapper = dir.join("pgbackrest-timed");
        std::fs::write(
            &wrapper,
            format!(
                "#!/bin/sh\nexec /usr/bin/time -a -o {} -f '%U %S %M %C' /usr/bin/pgbackrest \"$@\"\n",
                cpu_log.display()
            ),
        )?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755))?;
        std::fs::write(&cpu_log, "")?;
        for p in [&wrapper, &cpu_log] {
            chown_to_pg(p)?;
        }
        let conf = dir.join("pgbackrest.conf");
        std::fs::write(
            &conf,
            format!(
                "[global]\nrepo1-path={}\ncompress-type=zst\nlog-level-console=error\nlog-level-stderr=error\n\
                 log-level-file=off\nlock-path={d}/lock\nspool-path={d}/spool\narchive-async=y\n\
                 start-fast=y\nrepo1-retention-full=99\n\n[global:archive-push]\nprocess-max=2\n\n\
                 [global:archive-get]\nprocess-max=2\n\n[bench]\npg1-path={}\npg1-port={}\npg1-socket-path={}\n\
                 pg1-user=postgres\n",
                repo.display(),
                pg.data.display(),
                pg.port,
                pg.socket_dir.display(),
                d = dir.display(),
            ),
        )?;
        chown_to_pg(&conf)?;
        Ok(Pgbackrest { dir, conf, repo, cpu_log, wrapper, orphans: Default::default() })
    }

    /// `pgbackrest --config=… --stanza=bench ARGS`, as the PostgreSQL user.
    pub fn command(&self, args: &[&str]) -> Result<Command> {
        let mut c = pg_command(Path::new("/usr/bin/pgbackrest"))?;
        c.arg(format!("--config={}", self.conf.display())).arg("--stanza=bench").args(args);
        Ok(c)
    }

    pub fn run(&self, args: &[&str]) -> Result<()> {
        let o = self.command(args)?.output()?;
        if !o.status.success() {
            bail!(
                "pgbackrest {}: {}{}",
                args.join(" "),
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
        }
        Ok(())
    }

    /// The archive_command for PostgreSQL.
    pub fn archive_command(&self) -> String {
        format!("{} --config={} --stanza=bench archive-push %p", self.wrapper.display(), self.conf.display())
    }

    /// Create the stanza and switch the running cluster's archive_command to pgBackRest
    /// (archive_mode must already be on), then `pgbackrest check`: a WAL switch archived.
    pub async fn enable_archiving(&self, pg: &PgCluster) -> Result<()> {
        self.run(&["stanza-create"])?;
        pg.execute(&format!("ALTER SYSTEM SET archive_command = '{}'", self.archive_command())).await?;
        pg.execute("SELECT pg_reload_conf()").await?;
        self.run(&["check"])
    }

    /// Reap exited detached pgBackRest processes and add up their use. Call often (every
    /// 100 ms): a zombie holds its PID until reaped.
    pub fn collect(&self) {
        let mut o = self.orphans.lock().unwrap();
        for (_, cpu, rss) in reap_orphans(&["pgbackrest"]) {
            o.0 += cpu;
            o.1 = o.1.max(rss);
        }
    }

    /// CPU seconds and peak RSS (KiB) of every pgBackRest process that has exited so far: the
    /// archive_command's (from /usr/bin/time's log) and the detached ones ([`Self::collect`]).
    pub fn usage_so_far(&self) -> (f64, u64) {
        self.collect();
        let text = std::fs::read_to_string(&self.cpu_log).unwrap_or_default();
        let (mut cpu, mut rss) = *self.orphans.lock().unwrap();
        for l in text.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            if f.len() < 4 {
                continue;
            }
            if let (Ok(u), Ok(s), Ok(m)) = (f[0].parse::<f64>(), f[1].parse::<f64>(), f[2].parse::<u64>()) {
                cpu += u + s;
                rss = rss.max(m);
            }
        }
        (cpu, rss)
    }

    /// Wait (up to `timeout`) until no pgBackRest process is left, so that every process's
    /// usage is in the log.
    pub async fn wait_idle(&self, timeout: std::time::Duration) -> bool {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            self.collect();
            if pids_named("pgbackrest").is_empty() {
                return true;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        false
    }
}

impl Drop for Pgbackrest {
    fn drop(&mut self) {
        if std::env::var_os("WALVAULT_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// A fresh age key pair (made with the stock `age-keygen`) in `dir`; its recipient `age1…`.
pub fn age_recipient(dir: &std::path::Path) -> anyhow::Result<String> {
    let path = dir.join("bench-age-key.txt");
    let _ = std::fs::remove_file(&path);
    let out = std::process::Command::new("age-keygen").arg("-o").arg(&path).output()?;
    if !out.status.success() {
        anyhow::bail!("age-keygen: {}", String::from_utf8_lossy(&out.stderr));
    }
    let text = std::fs::read_to_string(&path)?;
    text.lines()
        .find_map(|l| l.strip_prefix("# public key: "))
        .map(|s| s.trim().to_string())
        .ok_or_else(|| anyhow::anyhow!("no public key in {}", path.display()))
}

/// A local archive root `dir/repo` that PostgreSQL's user can read (its `restore_command` runs as
/// that user): mode 2750 and that user's group, as docs/operations.md tells operators to share an
/// archive. Returns the archive URL.
pub fn shared_archive(dir: &Path) -> Result<String> {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join("repo");
    std::fs::create_dir_all(&root)?;
    if let Some(u) = walvault_tests::pg::pg_user()? {
        std::os::unix::fs::chown(&root, None, Some(u.gid))?;
    }
    std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o2750))?;
    Ok(format!("file://{}", root.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statistics() {
        let v = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(median(&v), 3.0);
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 100.0), 5.0);
        assert!(percentile(&[], 50.0).is_nan());
        assert_eq!(mmm(&v, 1), "3.0 (1.0–5.0)");
        assert_eq!(mmm(&[2.5], 2), "2.50");
        assert_eq!(mmm(&[], 2), "–");
        assert_eq!(mmm(&[f64::NAN, f64::NAN], 2), "–");
    }

    #[test]
    fn own_usage_is_read_from_proc() {
        // Burn some CPU, then read it back.
        let t0 = Instant::now();
        let mut x = 0u64;
        while t0.elapsed().as_millis() < 50 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let (cpu, hwm) = proc_usage(std::process::id()).unwrap();
        assert!(cpu > 0.0, "cpu {cpu}");
        assert!(hwm > 0);
    }
}
