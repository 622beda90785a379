//! `walvault-recover restore`: a base backup plus archived WAL, to a point in time.
//!
//! Plan first, then touch the disk:
//! 1. read the identity, the complete backups and one listing of the WAL;
//! 2. choose the newest backup that ends at or before the target (`--backup ID` to force one);
//! 3. prove, before downloading anything, that the WAL from the backup's start up to the target
//!    is present and contiguous along the target's timeline path, or say exactly which LSN is
//!    missing and what the recoverable window is;
//! 4. refuse a non-empty PGDATA unless `--force` (which empties it);
//! 5. download the parts in parallel (each checksum-verified by the envelope reader) and extract
//!    them in order into PGDATA (and tablespace archives to their recorded locations);
//! 6. store the server's `backup_manifest`, write `recovery.signal` and the recovery settings
//!    into `postgresql.auto.conf`: `restore_command` calls this binary's `wal-fetch` by its
//!    absolute path with the archive URL and S3 settings, never a secret (credentials come from
//!    the PostgreSQL server's environment, e.g. `AWS_*` or `~/.aws/credentials` of its user);
//! 7. set PGDATA to mode 0700 and, with `--owner`, give it to that user.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use futures::stream::{FuturesOrdered, StreamExt};
use walvault_shared::archive::backup::{self, BackupDescription};
use walvault_shared::archive::envelope;
use walvault_shared::archive::names;
use walvault_shared::archive::walcat::WalCatalog;
use walvault_shared::lsn::{Lsn, TimelineId};
use walvault_shared::storage::ObjectStore;
use walvault_shared::wal::TimelineHistory;

#[derive(Clone, Debug, PartialEq)]
pub enum Target {
    Time(chrono::DateTime<chrono::FixedOffset>),
    Lsn(Lsn),
    Xid(u64),
    Name(String),
    Latest,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Time(t) => write!(f, "time {}", t.to_rfc3339()),
            Target::Lsn(l) => write!(f, "LSN {l}"),
            Target::Xid(x) => write!(f, "xid {x}"),
            Target::Name(n) => write!(f, "restore point {n:?}"),
            Target::Latest => write!(f, "the end of the archived WAL"),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    pub target: Target,
    pub action: String,
    pub target_timeline: Option<TimelineId>,
    pub inclusive: bool,
    pub force: bool,
    pub owner: Option<String>,
    pub backup_id: Option<String>,
    /// The restore_command text (without %f %p), built by main from the archive URL and flags.
    pub wal_fetch_command: String,
    pub parallel: usize,
}

/// A timeline path: the timelines to replay, each with where it starts being read.
#[derive(Debug, Clone)]
pub struct PathStep {
    pub timeline: TimelineId,
    pub from: Lsn,
    /// Where this timeline is left for the next (None: the last one).
    pub until: Option<Lsn>,
}

pub fn parse_time(s: &str) -> Result<chrono::DateTime<chrono::FixedOffset>> {
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t);
    }
    for f in ["%Y-%m-%d %H:%M:%S%.f%#z", "%Y-%m-%d %H:%M:%S%#z", "%Y-%m-%d %H:%M:%S%.f %#z", "%Y-%m-%d %H:%M:%S %#z"] {
        if let Ok(t) = chrono::DateTime::parse_from_str(s, f) {
            return Ok(t);
        }
    }
    bail!(
        "invalid target time {s:?}: not a valid date and time with a zone\nHINT: e.g. 2026-11-26T14:03:27Z or '2026-11-26 14:03:27+01' (a zone is required)"
    )
}

async fn read_history(store: &dyn ObjectStore, tli: TimelineId) -> Result<Option<TimelineHistory>> {
    let key = names::history(tli);
    match store.get(&key).await {
        Ok(raw) => {
            let c = envelope::decode(&key, &raw)?.content;
            Ok(Some(TimelineHistory::parse(std::str::from_utf8(&c)?)?))
        }
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// The timelines from `backup_tli` to `target`, following `target`'s history.
pub async fn timeline_path(
    store: &dyn ObjectStore,
    backup: &BackupDescription,
    target_tli: TimelineId,
) -> Result<Vec<PathStep>> {
    let seg = backup.wal_segment_size;
    if target_tli == backup.timeline {
        return Ok(vec![PathStep { timeline: target_tli, from: backup.start_lsn, until: None }]);
    }
    let history = read_history(store, target_tli)
        .await?
        .with_context(|| format!("the archive has no history file for timeline {target_tli}"))?;
    let mut steps = Vec::new();
    let mut from = backup.start_lsn;
    let mut on_path = false;
    for e in &history.entries {
        if e.parent == backup.timeline {
            on_path = true;
        }
        if !on_path {
            continue;
        }
        if e.switchpoint < from {
            bail!(
                "backup {} (timeline {}, start {}) is not on the history of timeline {target_tli}: timeline {} ended at {}",
                backup.id, backup.timeline, backup.start_lsn, e.parent, e.switchpoint
            );
        }
        steps.push(PathStep { timeline: e.parent, from, until: Some(e.switchpoint) });
        // The next timeline's file for the switch segment holds the bytes before the switch too.
        from = e.switchpoint.segment_start(seg);
    }
    if !on_path {
        bail!("timeline {target_tli} does not descend from timeline {} of backup {}", backup.timeline, backup.id);
    }
    steps.push(PathStep { timeline: target_tli, from, until: None });
    Ok(steps)
}

/// How far the archive lets a restore go along `path`: the timeline and LSN where contiguous
/// WAL ends.
pub fn reachable_end(cat: &WalCatalog, path: &[PathStep]) -> (TimelineId, Lsn) {
    let mut last = (path[0].timeline, path[0].from);
    for step in path {
        let end = cat.contiguous_end(step.timeline, step.from);
        match step.until {
            Some(u) if end >= u => last = (step.timeline, u),
            _ => return (step.timeline, end),
        }
    }
    last
}

/// The highest timeline in the archive that descends from `tli` (or `tli` itself).
pub async fn latest_timeline(store: &dyn ObjectStore, cat: &WalCatalog, tli: TimelineId) -> Result<TimelineId> {
    let mut best = tli;
    let candidates: Vec<TimelineId> =
        cat.histories.iter().chain(cat.timelines.keys()).copied().filter(|t| *t > tli).collect();
    for t in candidates {
        if t <= best {
            continue;
        }
        if let Some(h) = read_history(store, t).await? {
            if h.entries.iter().any(|e| e.parent == tli) {
                best = t;
            }
        }
    }
    Ok(best)
}

fn describe_window(backups: &[BackupDescription], cat: &WalCatalog) -> String {
    let Some(first) = backups.first() else { return "no complete base backup in the archive".into() };
    let last_tli = cat.highest_timeline().unwrap_or(first.timeline);
    let end = cat.ranges(last_tli).last().map(|r| r.1).unwrap_or(first.stop_lsn);
    format!(
        "the recoverable window is from {} (end of backup {}, {}) to {} on timeline {} (end of the archived WAL)",
        first.stop_lsn, first.id, first.stop_time, end, last_tli
    )
}

/// Choose the backup for `target`.
pub fn choose_backup<'a>(
    backups: &'a [BackupDescription],
    target: &Target,
    cat: &WalCatalog,
) -> Result<&'a BackupDescription> {
    let pick = match target {
        Target::Lsn(l) => backups.iter().rev().find(|b| b.stop_lsn <= *l),
        Target::Time(t) => backups
            .iter()
            .rev()
            .find(|b| chrono::DateTime::parse_from_rfc3339(&b.stop_time).map(|s| s <= *t).unwrap_or(false)),
        _ => backups.last(),
    };
    pick.ok_or_else(|| {
        anyhow::anyhow!(
            "no base backup ends at or before the target ({target})\nHINT: {}",
            describe_window(backups, cat)
        )
    })
}

/// When the WAL just before `end` on `tli` was sealed by the agent (from the object's metadata;
/// one ranged GET).
async fn sealed_time_at(
    store: &dyn ObjectStore,
    cat: &WalCatalog,
    tli: TimelineId,
    end: Lsn,
) -> Option<chrono::DateTime<chrono::FixedOffset>> {
    let p = cat.piece_at(tli, Lsn(end.0.checked_sub(1)?))?;
    let raw = store.get_range(&p.key, 0..envelope::HEADER_LEN as u64 + 64 * 1024).await.ok()?;
    let (_, meta) = envelope::decode_header(&p.key, &raw).ok()?;
    let m: walvault_shared::archive::walcat::WalObjectMeta = serde_json::from_slice(meta).ok()?;
    // A consolidated segment keeps its chunks' times; the chunk holding `end - 1` is the last
    // one starting before it.
    let sealed = m.chunks.iter().rev().find(|c| c.start_lsn < end).map(|c| c.sealed_at.clone()).unwrap_or(m.sealed_at);
    chrono::DateTime::parse_from_rfc3339(&sealed).ok()
}

/// A `Read` over parts arriving on a channel, for the tar extractor.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Bytes>,
    cur: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(b) => self.cur = b,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur[..n]);
        self.cur = self.cur.slice(n..);
        Ok(n)
    }
}

fn is_empty_dir(p: &Path) -> Result<bool> {
    match std::fs::read_dir(p) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("read {}", p.display())),
    }
}

pub struct RestoreReport {
    pub backup: BackupDescription,
    pub bytes: u64,
    pub seconds: f64,
    pub reachable: (TimelineId, Lsn),
    /// For a time target: the last commit at or before it (time, xid, LSN, timeline).
    pub last_commit: Option<(chrono::DateTime<chrono::Utc>, u32, Lsn, TimelineId)>,
    /// Whether the backup held a postgresql.conf (else an empty one was created).
    pub had_postgresql_conf: bool,
}

/// The last commit at or before `target` along `path` (from `from` up to `reach`), found from
/// the commit index and then exactly by reading the WAL of the chunk that holds it.
async fn last_commit_before(
    store: &dyn ObjectStore,
    cat: &WalCatalog,
    path: &[PathStep],
    reach: (TimelineId, Lsn),
    target: chrono::DateTime<chrono::Utc>,
) -> Result<Option<(chrono::DateTime<chrono::Utc>, u32, Lsn, TimelineId)>> {
    let listing = store.list_all(names::WAL_PREFIX).await?;
    let (records, _) = crate::audit::chunk_records(store, &listing, cat.segment_size).await?;
    let parse = |s: &Option<String>| {
        s.as_deref().and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok()).map(|t| t.with_timezone(&chrono::Utc))
    };
    // The newest chunk on the path whose first commit is at or before the target.
    let mut best: Option<&walvault_shared::archive::walcat::ChunkRecord> = None;
    for r in &records {
        let Some(step) = path.iter().find(|s| s.timeline == r.timeline) else { continue };
        let until = step.until.unwrap_or(reach.1);
        if r.start_lsn < step.from.segment_start(cat.segment_size) || r.end_lsn > until.max(reach.1) {
            continue;
        }
        let Some(c) = &r.commits else { continue };
        if c.count == 0 || parse(&c.first).is_none_or(|f| f > target) {
            continue;
        }
        if best.is_none_or(|b| (r.timeline, r.end_lsn) > (b.timeline, b.end_lsn)) {
            best = Some(r);
        }
    }
    let Some(r) = best else { return Ok(None) };
    // Read that chunk's WAL from its segment's start to find the exact commit.
    let seg_start = r.start_lsn.segment_start(cat.segment_size);
    let bytes = cat.read_range(store, r.timeline, seg_start, r.end_lsn).await?;
    let mut reader = walvault_shared::walreader::WalReader::new(seg_start, cat.segment_size);
    let mut found = None;
    for e in reader.feed(&bytes) {
        use walvault_shared::walreader::EventKind;
        if matches!(e.kind, EventKind::Commit | EventKind::CommitPrepared) && e.time() <= target {
            found = Some((e.time(), e.xid, e.lsn, r.timeline));
        }
    }
    Ok(found)
}

/// Check everything, then restore. Nothing is written before every check has passed.
pub async fn restore(store: Arc<dyn ObjectStore>, opts: &RestoreOptions) -> Result<RestoreReport> {
    let identity = walvault_shared::archive::identity::load_existing(&*store).await?;
    let seg = identity.wal_segment_size;
    let backups = backup::complete(&*store, seg).await?;
    let cat = WalCatalog::load(&*store, seg).await?;
    if backups.is_empty() {
        bail!("the archive {} has no complete base backup\nHINT: take one with walvault-agent backup", store.url());
    }
    let chosen = match &opts.backup_id {
        Some(id) => backups.iter().find(|b| &b.id == id).with_context(|| format!("no complete backup {id}"))?,
        None => choose_backup(&backups, &opts.target, &cat)?,
    };
    let target_tli = match opts.target_timeline {
        Some(t) => t,
        None => latest_timeline(&*store, &cat, chosen.timeline).await?,
    };
    let path = timeline_path(&*store, chosen, target_tli).await?;
    let reachable = reachable_end(&cat, &path);
    // The WAL must reach at least the backup's end (consistency) and the target.
    let need = match &opts.target {
        Target::Lsn(l) => *l,
        _ => chosen.stop_lsn,
    };
    let reach_lsn = reachable.1;
    let need_ok = reach_lsn >= need && !(reachable.0 == chosen.timeline && reach_lsn < chosen.stop_lsn);
    if !need_ok {
        bail!(
            "the archive lacks WAL needed to restore backup {} to {}: WAL is contiguous only up to {} on timeline {} (needed: {} from {})\nHINT: {}",
            chosen.id, opts.target, reach_lsn, reachable.0, need, chosen.start_lsn, describe_window(&backups, &cat)
        );
    }
    // Is there archived WAL beyond what is reachable (a gap)? Then only a target before the gap
    // can be honoured.
    let gap_resumes = cat.ranges(reachable.0).into_iter().map(|r| r.0).find(|s| *s > reach_lsn);
    let sealed_at_end = sealed_time_at(&*store, &cat, reachable.0, reach_lsn).await;
    match (&opts.target, gap_resumes) {
        (Target::Latest | Target::Xid(_) | Target::Name(_), Some(resume)) => bail!(
            "the archive is missing WAL on timeline {} from {} (archived WAL resumes at {resume}); a restore cannot reach past the gap\nHINT: restore to a target before {} (--target-lsn or --target-time), or find the missing WAL",
            reachable.0, reach_lsn, reach_lsn
        ),
        (Target::Time(t), _) => {
            if let Some(n) = sealed_at_end {
                if *t > n {
                    match gap_resumes {
                        Some(resume) => bail!(
                            "the archive is missing WAL on timeline {} from {} (archived WAL resumes at {resume}), and the target time {t} lies beyond that gap (WAL before it was sealed at {n})\nHINT: {}",
                            reachable.0, reach_lsn, describe_window(&backups, &cat)
                        ),
                        None => bail!(
                            "the target time {t} is after the newest archived WAL (sealed at {n})\nHINT: {}; use --latest to recover everything archived",
                            describe_window(&backups, &cat)
                        ),
                    }
                }
            }
        }
        _ => {}
    }
    let last_commit = match &opts.target {
        Target::Time(t) => last_commit_before(&*store, &cat, &path, reachable, t.with_timezone(&chrono::Utc)).await?,
        _ => None,
    };
    // PGDATA.
    if !is_empty_dir(&opts.pgdata)? {
        if !opts.force {
            bail!(
                "target directory {} is not empty\nHINT: restore into an empty directory, or pass --force to empty it first (its contents are deleted)",
                opts.pgdata.display()
            );
        }
        for e in std::fs::read_dir(&opts.pgdata)? {
            let p = e?.path();
            if p.is_dir() && !p.is_symlink() {
                std::fs::remove_dir_all(&p)?;
            } else {
                std::fs::remove_file(&p)?;
            }
        }
    }
    for a in chosen.archives.iter().filter(|a| !a.location.is_empty()) {
        if !is_empty_dir(Path::new(&a.location))? && !opts.force {
            bail!("tablespace directory {} is not empty\nHINT: empty it, or pass --force", a.location);
        }
    }
    std::fs::create_dir_all(&opts.pgdata).with_context(|| format!("create {}", opts.pgdata.display()))?;

    let t0 = Instant::now();
    let total: u64 = chosen.raw_bytes;
    let mut done = 0u64;
    let mut last_report = Instant::now();
    for a in &chosen.archives {
        let dest = if a.location.is_empty() { opts.pgdata.clone() } else { PathBuf::from(&a.location) };
        std::fs::create_dir_all(&dest)?;
        let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(opts.parallel.max(1));
        let dest2 = dest.clone();
        let extractor = tokio::task::spawn_blocking(move || -> Result<()> {
            let mut ar = tar::Archive::new(ChannelReader { rx, cur: Bytes::new() });
            ar.set_preserve_permissions(true);
            ar.set_overwrite(true);
            ar.unpack(&dest2).with_context(|| format!("extract into {}", dest2.display()))
        });
        let mut fetches = FuturesOrdered::new();
        let mut parts = a.parts.iter();
        loop {
            while fetches.len() < opts.parallel.max(1) {
                let Some(p) = parts.next() else { break };
                let store = store.clone();
                let key = names::backup_part(&chosen.id, p.n);
                let crc = p.crc32;
                fetches.push_back(async move {
                    let raw = store.get(&key).await?;
                    let d =
                        tokio::task::spawn_blocking(move || envelope::decode(&key, &raw).map(|d| (key, d))).await??;
                    if d.1.header.plain_crc != crc {
                        bail!("object {}: checksum differs from the backup description", d.0);
                    }
                    Ok::<Bytes, anyhow::Error>(Bytes::from(d.1.content))
                });
            }
            let Some(r) = fetches.next().await else { break };
            let data = r?;
            done += data.len() as u64;
            if tx.send(data).is_err() {
                break; // the extractor failed; its error is reported below
            }
            if last_report.elapsed().as_secs() >= 2 {
                eprintln!(
                    "restore: {:.0}% ({} of {} MiB, {:.0} MiB/s)",
                    100.0 * done as f64 / total.max(1) as f64,
                    done >> 20,
                    total >> 20,
                    (done as f64 / (1 << 20) as f64) / t0.elapsed().as_secs_f64()
                );
                last_report = Instant::now();
            }
        }
        drop(tx);
        extractor.await??;
    }
    // A cluster whose postgresql.conf lived outside its data directory (Debian keeps it in
    // /etc/postgresql) has none in the backup: PostgreSQL refuses to start without one.
    let conf = opts.pgdata.join("postgresql.conf");
    let had_postgresql_conf = conf.exists();
    if !had_postgresql_conf {
        std::fs::write(&conf, "# Created by walvault-recover restore: the backed-up cluster kept its postgresql.conf\n# outside the data directory. Copy your settings here (port, memory, ...).\n")?;
        eprintln!(
            "restore: the backup has no postgresql.conf (the server kept it outside its data directory); created an empty one in {}: add your settings before starting",
            opts.pgdata.display()
        );
    }
    // The server's manifest, for pg_verifybackup.
    let mkey = names::backup_manifest(&chosen.id);
    let manifest = envelope::decode(&mkey, &store.get(&mkey).await?)?.content;
    std::fs::write(opts.pgdata.join("backup_manifest"), manifest)?;
    std::fs::create_dir_all(opts.pgdata.join("pg_wal"))?;
    // Recovery settings.
    std::fs::write(opts.pgdata.join("recovery.signal"), b"")?;
    let mut conf = String::from("\n# Added by walvault-recover restore. No secrets here: wal-fetch takes credentials\n# from the server's environment (AWS_* variables, ~/.aws/credentials of this user).\n");
    conf.push_str(&format!("restore_command = '{} %f %p'\n", opts.wal_fetch_command.replace('\'', "''")));
    match &opts.target {
        Target::Time(t) => conf.push_str(&format!("recovery_target_time = '{}'\n", t.to_rfc3339())),
        Target::Lsn(l) => conf.push_str(&format!("recovery_target_lsn = '{l}'\n")),
        Target::Xid(x) => conf.push_str(&format!("recovery_target_xid = '{x}'\n")),
        Target::Name(n) => conf.push_str(&format!("recovery_target_name = '{}'\n", n.replace('\'', "''"))),
        Target::Latest => {}
    }
    if opts.target != Target::Latest {
        conf.push_str(&format!("recovery_target_action = '{}'\n", opts.action));
        conf.push_str(&format!("recovery_target_inclusive = {}\n", opts.inclusive));
    }
    conf.push_str(&format!(
        "recovery_target_timeline = '{}'\n",
        opts.target_timeline.map(|t| t.0.to_string()).unwrap_or_else(|| "latest".into())
    ));
    let auto = opts.pgdata.join("postgresql.auto.conf");
    let mut existing = std::fs::read_to_string(&auto).unwrap_or_default();
    existing.push_str(&conf);
    std::fs::write(&auto, existing)?;
    // Permissions as PostgreSQL requires.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&opts.pgdata, std::fs::Permissions::from_mode(0o700))?;
    if let Some(owner) = &opts.owner {
        let out =
            std::process::Command::new("chown").args(["-R", &format!("{owner}:"), "--"]).arg(&opts.pgdata).output()?;
        if !out.status.success() {
            bail!("chown -R {owner} {}: {}", opts.pgdata.display(), String::from_utf8_lossy(&out.stderr));
        }
        for a in chosen.archives.iter().filter(|a| !a.location.is_empty()) {
            let _ = std::process::Command::new("chown").args(["-R", &format!("{owner}:"), &a.location]).output();
        }
    }
    Ok(RestoreReport {
        backup: chosen.clone(),
        bytes: done,
        seconds: t0.elapsed().as_secs_f64(),
        reachable,
        last_commit,
        had_postgresql_conf,
    })
}
