//! `walvault-recover restore`: a base backup plus archived WAL, to a point in time.
//!
//! Plan first, then touch the disk:
//! 1. read the identity, the complete backups, one listing of the WAL and the history files
//!    ([`plan::ArchiveView`]); with `--verify-key`, every object read is authenticated;
//! 2. choose the newest backup that ends at or before the target (`--backup ID` to force one)
//!    and the timeline path to the target ([`plan::plan`]); for `--target-xid`, the
//!    transaction's end record is found in the archived WAL first ([`xid`]); for
//!    `--target-time`, backups are judged by the server's commit times ([`timepick`]);
//! 3. prove, before downloading anything, that the WAL from the backup's start up to the target
//!    is present and contiguous along that path, or say exactly which LSN is missing and what
//!    the recoverable window is; a time target must not lie beyond the archived WAL;
//! 4. decide where each tar archive goes ([`extract::destinations`]: tablespaces only to their
//!    own normalised locations or a `--tablespace-mapping`) and check every destination: no
//!    running server uses it, it is empty or `--force` may empty it ([`extract::check`]);
//! 5. only then: empty what `--force` allows, create PGDATA with mode 0700 owned by `--owner`,
//!    download the parts in parallel (each bounded, checksum- and signature-verified), and
//!    unpack them with owner-only modes, the main archive first (its `pg_tblspc` links are
//!    checked against the description before any tablespace is written);
//! 6. store the server's `backup_manifest`, write `recovery.signal` (removing a standby's
//!    `standby.signal`) and the recovery settings ([`conf`]), and give everything to `--owner`
//!    (with `lchown`, never `chown` the program).
//!
//! An incremental backup restores with its chain ([`combine`]): in step 4, every member's parts
//! are listed with their recorded sizes and every part of every incremental member (of the tar
//! archives the newest backup has) is read once and checked as stored, without decompressing
//! or decrypting it (header checksum, signature with `--verify-key`, the payload's checksum and
//! signed SHA-256, and the plain length and CRC its description records; encrypted parts'
//! epoch keys unwrapped), so that a missing or damaged member (a replaced one too, with
//! `--verify-key`) stops the restore before anything is written; in step 5 the
//! newest backup is unpacked and the older ones, newest first, supply only the blocks still
//! missing, each block written once (the `INCREMENTAL.*` headers are checked as they are read:
//! a malformed one, which only a faulty server could have sent under a valid checksum, stops
//! the restore there); in step 6 `backup_label` loses its `INCREMENTAL FROM` lines and a new
//! `backup_manifest` describes the reconstructed files ([`manifest`]), with the CRC32C the
//! combine computed while completing each file. Each phase's time is printed on stderr.

pub mod combine;
pub mod conf;
pub mod extract;
pub mod manifest;
pub mod plan;
pub mod timepick;
pub mod xid;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use futures::stream::{FuturesOrdered, StreamExt};
use walvault_shared::archive::backup::{ArchiveInfo, BackupDescription};
use walvault_shared::archive::envelope::{self, ObjectKind};
use walvault_shared::archive::names;
use walvault_shared::archive::read::{Reader, Want};
use walvault_shared::archive::walcat::WalObjectMeta;
use walvault_shared::lsn::{Lsn, TimelineId};

use crate::pgtools::Owner;
use conf::{Recovery, TargetAction};
use extract::Destination;
use plan::{ArchiveView, PathStep, Plan, Target};

#[derive(Clone, Debug)]
pub struct RestoreOptions {
    pub pgdata: PathBuf,
    pub target: Target,
    pub action: TargetAction,
    pub target_timeline: Option<TimelineId>,
    pub inclusive: bool,
    pub force: bool,
    pub owner: Option<Owner>,
    pub backup_id: Option<String>,
    /// The restore_command text, built by main from this binary's path and the archive flags.
    pub restore_command: String,
    pub parallel: usize,
    pub tablespace_mapping: Vec<(PathBuf, PathBuf)>,
    /// Restore every tablespace to `<root>/<oid>` (drills), whatever the mapping says.
    pub tablespace_root: Option<PathBuf>,
    /// Take a lease for this long on the backups and WAL read ([`take_lease`]); `None`: none.
    pub lease: Option<std::time::Duration>,
    /// Who takes the lease: restore, verify or dump.
    pub purpose: &'static str,
}

pub struct RestoreReport {
    pub backup: BackupDescription,
    /// The ids of the backup's chain, full backup first (one id for a full backup).
    pub chain: Vec<String>,
    pub bytes: u64,
    pub seconds: f64,
    pub reachable: (TimelineId, Lsn),
    /// The timeline recovery follows to the target.
    pub timeline: TimelineId,
    /// For a time target: the last commit at or before it (time, xid, LSN, timeline).
    pub last_commit: Option<(DateTime<Utc>, u32, Lsn, TimelineId)>,
    /// Whether the backup held a postgresql.conf (else an empty one was created).
    pub had_postgresql_conf: bool,
    /// The key of the lease taken, if one was.
    pub lease: Option<String>,
}

/// When the WAL just before `end` on `tli` was sealed by the agent (from the object's
/// metadata; one ranged read).
async fn sealed_time_at(reader: &Reader, view: &ArchiveView, tli: TimelineId, end: Lsn) -> Option<DateTime<Utc>> {
    let p = view.catalog().piece_at(tli, Lsn(end.0.checked_sub(1)?))?;
    let kind = if p.whole_segment { ObjectKind::WalSegment } else { ObjectKind::WalChunk };
    let (_, meta) = reader.read_meta(&p.key, kind).await.ok()?;
    let m: WalObjectMeta = envelope::metadata_as(&p.key, &meta).ok()?;
    // A consolidated segment keeps its chunks' times; the chunk holding `end - 1` is the last
    // one starting before it.
    Some(m.chunks.iter().rev().find(|c| c.start_lsn < end).map(|c| c.sealed_at).unwrap_or(m.sealed_at))
}

/// The last commit at or before `target` along `path` (up to `reach`), found from the chunk
/// records and then exactly by reading the WAL of the chunk that holds it.
async fn last_commit_before(
    reader: &Reader,
    view: &ArchiveView,
    records: &[walvault_shared::archive::walcat::ChunkRecord],
    path: &[PathStep],
    reach: (TimelineId, Lsn),
    target: DateTime<Utc>,
) -> Result<Option<(DateTime<Utc>, u32, Lsn, TimelineId)>> {
    let seg = view.catalog().segment_size;
    // The newest chunk on the path whose first commit is at or before the target.
    let best = records
        .iter()
        .filter(|r| {
            let Some(step) = path.iter().find(|s| s.timeline == r.timeline) else { return false };
            let until = step.until.unwrap_or(reach.1);
            r.start_lsn >= step.from.segment_start(seg) && r.end_lsn <= until.max(reach.1)
        })
        .filter(|r| r.commits.as_ref().is_some_and(|c| c.count > 0 && c.first.is_some_and(|f| f <= target)))
        .max_by_key(|r| (r.timeline, r.end_lsn));
    let Some(r) = best else { return Ok(None) };
    let seg_start = r.start_lsn.segment_start(seg);
    let wal = reader.read_wal(&view.listing, r.timeline, seg_start, r.end_lsn).await?;
    let mut wr = walvault_shared::walreader::WalReader::new(seg_start, seg);
    let found = wr.feed(&wal.bytes).into_iter().rfind(|e| e.is_commit() && e.time() <= target);
    Ok(found.map(|e| (e.time(), e.xid, e.lsn, r.timeline)))
}

/// An encrypted archive: the identity given must unwrap the epoch keys of the backup's parts and
/// of the newest WAL on the path (each read from the objects' headers), so that a wrong or
/// missing identity stops the restore before anything is written, naming the recipients
/// expected.
async fn check_keys(reader: &Reader, view: &ArchiveView, plan: &Plan) -> Result<()> {
    if !reader.has_identities() {
        bail!("the archive is encrypted, and no key to read it was given\nHINT: pass the age identity it is encrypted to (--identity FILE) or its passphrase (--passphrase-file FILE)");
    }
    let mut keys: Vec<(String, ObjectKind)> = plan
        .backup
        .archives
        .iter()
        .filter_map(|a| a.parts.first())
        .map(|p| (names::backup_part(&plan.backup.id, p.n), ObjectKind::BackupPart))
        .collect();
    let newest = plan.reachable.1 .0.checked_sub(1).and_then(|l| view.catalog().piece_at(plan.reachable.0, Lsn(l)));
    if let Some(p) = newest {
        keys.push((p.key.clone(), if p.whole_segment { ObjectKind::WalSegment } else { ObjectKind::WalChunk }));
    }
    for (key, kind) in keys {
        let (h, _) = reader.read_meta(&key, kind).await?;
        match h.encryption_block {
            Some(b) => {
                reader.epoch_key(&b.epoch).await.with_context(|| format!("the key of {key}"))?;
            }
            None => return Err(envelope::EnvelopeError::NotEncrypted { key }.into()),
        }
    }
    Ok(())
}

/// Every restore point recorded in the archive's WAL metadata: (timeline, point), in WAL
/// order, and whether every record had them (archives written before walvault 0.2 did not
/// record restore points).
pub async fn restore_points(
    reader: &Reader,
    view: &ArchiveView,
) -> Result<(Vec<(TimelineId, walvault_shared::archive::walcat::RestorePoint)>, bool)> {
    let (records, _) = reader.chunk_records(&view.listing).await?;
    let complete = records.iter().all(|r| r.commits.as_ref().is_some_and(|c| c.restore_points.is_some()));
    let mut out: Vec<_> = records
        .iter()
        .flat_map(|r| {
            let pts = r.commits.as_ref().and_then(|c| c.restore_points.clone()).unwrap_or_default();
            pts.into_iter().map(move |p| (r.timeline, p))
        })
        .collect();
    out.sort_by_key(|(t, p)| (*t, p.lsn));
    out.dedup_by(|a, b| a.0 == b.0 && a.1.lsn == b.1.lsn);
    Ok((out, complete))
}

/// `--target-name`: the restore point must exist on the recovery path after the backup's start
/// (PostgreSQL stops at the first one it meets). Absent: refused before anything is written.
/// Several: the first is named, with the others.
async fn check_restore_point(reader: &Reader, view: &ArchiveView, plan: &Plan, name: &str) -> Result<()> {
    let (points, complete) = restore_points(reader, view).await?;
    let on_path = |tli: TimelineId, lsn: Lsn| {
        plan.path.iter().any(|s| s.timeline == tli && lsn >= s.from && s.until.is_none_or(|u| lsn < u))
            && lsn >= plan.backup.start_lsn
    };
    let candidates: Vec<_> = points.iter().filter(|(t, p)| on_path(*t, p.lsn)).collect();
    let named: Vec<_> = candidates.iter().filter(|(_, p)| p.name == name).collect();
    let describe = |(t, p): &(TimelineId, walvault_shared::archive::walcat::RestorePoint)| {
        format!("{} at {} ({}, timeline {t})", p.name, p.lsn, walvault_shared::time::text(p.time))
    };
    match named.as_slice() {
        [] if !complete => eprintln!(
            "restore: note: restore point {name:?} cannot be checked before the restore: part of this archive was written by an agent that did not record restore points"
        ),
        [] => {
            let known: Vec<String> = candidates.iter().map(|c| format!("{:?}", c.1.name)).collect();
            bail!(
                "no restore point {name:?} in the archived WAL after backup {} (start {}) on the recovery path\nHINT: {}",
                plan.backup.id,
                plan.backup.start_lsn,
                if known.is_empty() {
                    "there is none; `walvault-recover list --restore-points` lists them".to_string()
                } else {
                    format!("restore points there: {} (`walvault-recover list --restore-points`)", known.join(", "))
                }
            );
        }
        [one] => eprintln!("restore: recovering to restore point {}", describe(one)),
        [first, rest @ ..] => eprintln!(
            "restore: restore point {name:?} exists {} times after the backup; PostgreSQL stops at the first: {} (the others: {})",
            rest.len() + 1,
            describe(first),
            rest.iter().map(|r| describe(r)).collect::<Vec<_>>().join("; ")
        ),
    }
    Ok(())
}

/// Every member of an incremental chain is there: its parts and manifest listed with the sizes
/// its description records; every part of each incremental member read and checked as stored.
/// Nothing is written.
async fn check_chain(reader: &Reader, plan: &Plan, parallel: usize) -> Result<()> {
    let newest = &plan.backup;
    for b in &plan.chain {
        let listed: std::collections::HashMap<String, u64> =
            reader.store().list_all(&names::backup_dir(&b.id)).await?.into_iter().map(|o| (o.key, o.size)).collect();
        let missing = |what: String| {
            anyhow::anyhow!(
                "backup {} ({} of the chain of {}) is damaged: {what}\nHINT: restore another backup (--backup ID; `walvault-recover list` shows the chains)",
                b.id,
                if b.parent.is_none() { "the full backup" } else { "an incremental" },
                newest.id
            )
        };
        if !listed.contains_key(&names::backup_manifest(&b.id)) {
            return Err(missing("its backup_manifest is missing".into()));
        }
        for a in &b.archives {
            for p in &a.parts {
                let key = names::backup_part(&b.id, p.n);
                match listed.get(&key) {
                    Some(size) if *size == p.stored_len => {}
                    Some(size) => {
                        return Err(missing(format!("{key} is {size} bytes, its description says {}", p.stored_len)))
                    }
                    None => return Err(missing(format!("{key} is missing"))),
                }
            }
        }
    }
    // Every part of every incremental (of the archives the newest backup has) read once and
    // checked as stored, without decompressing or decrypting it: the header and signature, the
    // payload's checksum and signed hash, and the plain length and CRC the description
    // records. A missing, resized or damaged part is refused here (a replaced one too with
    // --verify-key: the signature binds header and payload to the name); the INCREMENTAL.*
    // headers inside are checked as the combine reads them.
    let parts = plan.chain.iter().filter(|b| b.parent.is_some()).flat_map(|b| {
        b.archives
            .iter()
            .filter(|a| newest.archives.iter().any(|n| n.name == a.name))
            .flat_map(move |a| a.parts.iter().map(move |p| (b, p)))
    });
    let mut checks = futures::stream::iter(parts)
        .map(|(b, p)| async move {
            let key = names::backup_part(&b.id, p.n);
            let damaged = || format!("backup {} (an incremental of the chain of {}) is damaged", b.id, newest.id);
            let bound = p.plain_len.min(walvault_shared::archive::read::limits::PART);
            let raw = reader.store().get_bounded(&key, envelope::max_stored_len(bound)).await.with_context(damaged)?;
            let h = envelope::check_stored(&key, &raw, reader.verify_keys()).with_context(damaged)?;
            if h.kind != ObjectKind::BackupPart
                || h.plain_len != p.plain_len
                || h.plain_len > bound
                || h.plain_crc != p.crc32
            {
                return Err(anyhow::anyhow!("object {key}: content differs from the backup description (kind, checksum or length)\nHINT: the object was replaced or damaged; do not trust it").context(damaged()));
            }
            match &h.encryption_block {
                // Not damage: the key (or the identity given) is the problem; say so as such.
                Some(e) => {
                    reader.epoch_key(&e.epoch).await.with_context(|| format!("the key of {key}"))?;
                }
                None if reader.has_identities() && names::is_confidential(&key) => {
                    return Err(anyhow::Error::from(envelope::EnvelopeError::NotEncrypted { key: key.clone() })
                        .context(damaged()));
                }
                None => {}
            }
            Ok(())
        })
        .buffer_unordered(parallel.max(1));
    while let Some(r) = checks.next().await {
        r?;
    }
    Ok(())
}

/// Everything restore checks before it writes anything: the plan, the target, the
/// destinations.
pub struct Checked {
    pub plan: Plan,
    pub dests: Vec<Destination>,
    pub last_commit: Option<(DateTime<Utc>, u32, Lsn, TimelineId)>,
}

/// Steps 1–4 of the module doc: nothing is written.
pub async fn check(reader: &Reader, opts: &RestoreOptions) -> Result<Checked> {
    let view = ArchiveView::load(reader).await?;
    // Time targets judge backups and report the last commit from the chunk records (one read).
    let records = match &opts.target {
        Target::Time(_) => Some(reader.chunk_records(&view.listing).await?.0),
        _ => None,
    };
    let mut plan = match (&opts.target, opts.backup_id.as_deref(), &records) {
        (Target::Time(t), None, Some(records)) => {
            let t = t.with_timezone(&Utc);
            timepick::plan_for_time(reader, &view, records, &opts.target, t, opts.target_timeline).await?
        }
        _ => plan::plan(&view, &opts.target, opts.target_timeline, opts.backup_id.as_deref())?,
    };
    if let Target::Xid(x) = &opts.target {
        plan = xid::plan_for_xid(reader, &view, plan, *x, opts.target_timeline, opts.backup_id.as_deref()).await?;
    }
    let mut last_commit = None;
    if let Target::Name(name) = &opts.target {
        check_restore_point(reader, &view, &plan, name).await?;
    }
    if let Target::Time(t) = &opts.target {
        let t = t.with_timezone(&Utc);
        let sealed = sealed_time_at(reader, &view, plan.reachable.0, plan.reachable.1).await;
        plan::check_time_target(&view, &plan, t, sealed)?;
        let records = records.as_deref().unwrap_or_default();
        last_commit = last_commit_before(reader, &view, records, &plan.path, plan.reachable, t).await?;
    }
    let mapping = match &opts.tablespace_root {
        Some(root) => extract::map_all_under(&plan.backup, root)?,
        None => opts.tablespace_mapping.clone(),
    };
    if view.identity.encryption.is_some() {
        check_keys(reader, &view, &plan).await?;
    }
    let dests = extract::destinations(&plan.backup, &opts.pgdata, &mapping)?;
    extract::check(&dests, &mapping, opts.force)?;
    if plan.chain.len() > 1 {
        let t = Instant::now();
        check_chain(reader, &plan, opts.parallel).await?;
        eprintln!(
            "restore: chain of {} backups checked (every part listed, the incrementals read) in {:.1} s",
            plan.chain.len(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(Checked { plan, dests, last_commit })
}

/// Check everything, then restore. Nothing is written before every check has passed.
pub async fn restore(reader: &Reader, opts: &RestoreOptions) -> Result<RestoreReport> {
    let checked = check(reader, opts).await?;
    apply(reader, opts, checked).await
}

/// Steps 5 and 6 of the module doc.
pub async fn apply(reader: &Reader, opts: &RestoreOptions, checked: Checked) -> Result<RestoreReport> {
    let lease = match opts.lease {
        Some(ttl) => take_lease(reader, &checked.plan, ttl, opts.purpose).await,
        None => None,
    };
    match write(reader, opts, checked).await {
        Ok(mut r) => {
            r.lease = lease;
            Ok(r)
        }
        Err(e) => {
            // A failed restore needs nothing from the archive any more.
            release_lease(reader, lease.as_deref()).await;
            Err(e)
        }
    }
}

/// Steps 5 and 6 (the writing part of [`apply`]).
async fn write(reader: &Reader, opts: &RestoreOptions, checked: Checked) -> Result<RestoreReport> {
    let Checked { plan, dests, last_commit, .. } = checked;
    let backup = &plan.backup;
    let ids = opts.owner.as_ref().map(|o| (o.uid, o.gid));
    if opts.force {
        for d in &dests {
            // `check` allowed this: the data directory, or a mapped tablespace destination.
            extract::empty_dir(&d.dir)?;
        }
    }
    let t0 = Instant::now();
    let in_newest = |name: &str| backup.archives.iter().any(|a| a.name == name);
    let total: u64 =
        plan.chain.iter().flat_map(|b| &b.archives).filter(|a| in_newest(&a.name)).map(|a| a.raw_bytes).sum();
    let mut progress = Progress::new(total);
    let links: Vec<(u32, PathBuf)> =
        dests.iter().filter_map(|d| d.tablespace.as_ref().map(|(oid, _)| (*oid, d.dir.clone()))).collect();
    let mut combiner = if plan.chain.len() > 1 {
        Some(combine::Combiner::new(combine::Geometry { blcksz: backup.block_size(), relseg: backup.relseg_blocks() })?)
    } else {
        None
    };
    // The main archive comes first: a tablespace directory is created only once base.tar's own
    // links have confirmed where it goes.
    for d in &dests {
        extract::create_private_dir(&d.dir, ids)?;
        let archive = &backup.archives[d.archive];
        let (dir, links, tablespace, name) =
            (d.dir.clone(), links.clone(), d.tablespace.is_some(), archive.name.clone());
        let taken = combiner.take();
        let (seen, back) = fetch_into(reader, backup, archive, opts.parallel, &mut progress, move |stream| {
            let mut c = taken;
            let seen = extract::unpack_with(stream, &dir, &links, c.as_mut().map(|c| (c, name.as_str(), tablespace)))?;
            Ok((seen, c))
        })
        .await?;
        combiner = back;
        if d.tablespace.is_none() {
            extract::check_links(&dests, &seen)?;
        }
    }
    // Older members of the chain, newest first, for the blocks still missing.
    if let Some(c) = &combiner {
        progress.note(&format!(
            "restore: newest backup {} unpacked in {:.1} s; {} files wait for older blocks",
            backup.id,
            t0.elapsed().as_secs_f64(),
            c.pending()
        ));
    }
    for older in plan.chain.iter().rev().skip(1) {
        let Some(c) = combiner.take() else { break };
        if c.pending() == 0 {
            combiner = Some(c);
            break;
        }
        let t = Instant::now();
        let mut c = Some(c);
        for d in &dests {
            let name = backup.archives[d.archive].name.clone();
            let Some(a) = older.archives.iter().find(|a| a.name == name) else { continue };
            let (tablespace, full, id) = (d.tablespace.is_some(), older.parent.is_none(), older.id.clone());
            let mut taken = c.take().expect("combiner");
            c = Some(
                fetch_into(reader, older, a, opts.parallel, &mut progress, move |stream| {
                    taken.feed_older(&name, tablespace, full, &id, stream)?;
                    Ok(taken)
                })
                .await?,
            );
        }
        if let Some(c) = &c {
            progress.note(&format!(
                "restore: backup {} read in {:.1} s; {} files still wait",
                older.id,
                t.elapsed().as_secs_f64(),
                c.pending()
            ));
        }
        combiner = c;
    }
    let reconstructed = match combiner {
        Some(c) => Some(c.finish()?),
        None => None,
    };
    let had_postgresql_conf = finish_data_dir(reader, backup, &opts.pgdata, reconstructed).await?;
    Recovery {
        restore_command: &opts.restore_command,
        target: &opts.target,
        action: opts.action,
        inclusive: opts.inclusive,
        target_timeline: opts.target_timeline,
    }
    .write(&opts.pgdata)?;
    if let Some((uid, gid)) = ids {
        for d in &dests {
            extract::chown_tree(&d.dir, uid, gid)?;
        }
    }
    Ok(RestoreReport {
        backup: backup.clone(),
        chain: plan.chain.iter().map(|b| b.id.clone()).collect(),
        bytes: progress.done,
        seconds: t0.elapsed().as_secs_f64(),
        reachable: plan.reachable,
        timeline: plan.target_timeline,
        last_commit,
        had_postgresql_conf,
        lease: None,
    })
}

/// Take a lease on the plan's chain and the WAL from its full backup's start, so that `expire`
/// leaves them while this restore and its replay need them. Best effort: a store that refuses
/// the write (read-only credentials) leaves the restore unprotected, with a warning.
pub async fn take_lease(reader: &Reader, plan: &Plan, ttl: std::time::Duration, purpose: &str) -> Option<String> {
    use walvault_shared::archive::lease::{self, Lease};
    let now = walvault_shared::time::now();
    let l = Lease {
        purpose: purpose.to_string(),
        host: walvault_shared::archive::lease::this_host(),
        pid: std::process::id(),
        backups: plan.chain.iter().map(|b| b.id.clone()).collect(),
        timeline: plan.target_timeline,
        wal_from: plan.chain[0].start_lsn,
        taken_at: now,
        expires_at: now + chrono::Duration::from_std(ttl).unwrap_or(lease::MAX_TTL),
    };
    match lease::take(reader.store(), &l).await {
        Ok(key) => {
            eprintln!(
                "{purpose}: lease {key} keeps backup {} and the WAL after it from expire until {}",
                plan.backup.id,
                walvault_shared::time::text(l.honoured_until())
            );
            Some(key)
        }
        Err(e) => {
            eprintln!(
                "{purpose}: WARNING: could not take a lease in the archive ({e:#}): an expire running meanwhile may delete what this {purpose} reads"
            );
            None
        }
    }
}

/// Release a lease taken by [`apply`] (failures are reported, not fatal: it expires anyway).
pub async fn release_lease(reader: &Reader, key: Option<&str>) {
    if let Some(k) = key {
        if let Err(e) = walvault_shared::archive::lease::release(reader.store(), k).await {
            eprintln!("WARNING: could not remove lease {k} ({e:#}); it expires on its own");
        }
    }
}

/// Restore progress: a bar (bytes, rate, ETA) on a terminal, else a line every 2 s.
struct Progress {
    total: u64,
    done: u64,
    t0: Instant,
    last: Instant,
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(total: u64) -> Self {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "restore [{bar:40}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            b
        });
        Progress { total, done: 0, t0: Instant::now(), last: Instant::now(), bar }
    }
    /// A line on stderr, above the progress bar when there is one.
    fn note(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }
    fn add(&mut self, n: u64) {
        self.done += n;
        if let Some(b) = &self.bar {
            b.inc(n);
            return;
        }
        if self.last.elapsed().as_secs() >= 2 {
            eprintln!(
                "restore: {:.0}% ({} of {} MiB, {:.0} MiB/s)",
                100.0 * self.done as f64 / self.total.max(1) as f64,
                self.done >> 20,
                self.total >> 20,
                (self.done as f64 / (1 << 20) as f64) / self.t0.elapsed().as_secs_f64()
            );
            self.last = Instant::now();
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// A `Read` over parts arriving on a channel, for the tar extractor.
pub struct ChannelReader {
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

/// Download one tar archive's parts (`parallel` at once, each bounded by its recorded size and
/// checked) and give them, in order, as one stream to `consume` (on a blocking thread).
async fn fetch_into<T: Send + 'static>(
    reader: &Reader,
    backup: &BackupDescription,
    archive: &ArchiveInfo,
    parallel: usize,
    progress: &mut Progress,
    consume: impl FnOnce(ChannelReader) -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Bytes>(parallel.max(1));
    let consumer = tokio::task::spawn_blocking(move || consume(ChannelReader { rx, cur: Bytes::new() }));
    let mut fetches = FuturesOrdered::new();
    let mut parts = archive.parts.iter();
    loop {
        while fetches.len() < parallel.max(1) {
            let Some(p) = parts.next() else { break };
            let (reader, key, want_crc, len) =
                (reader.clone(), names::backup_part(&backup.id, p.n), p.crc32, p.plain_len);
            fetches.push_back(async move {
                let d = reader.read(&key, Want::part(len)).await?;
                if d.header.plain_crc != want_crc || d.content.len() as u64 != len {
                    bail!("object {key}: content differs from the backup description (checksum or length)\nHINT: the object was replaced or damaged; do not trust it");
                }
                Ok::<Bytes, anyhow::Error>(Bytes::from(d.content))
            });
        }
        let Some(r) = fetches.next().await else { break };
        let data = r?;
        progress.add(data.len() as u64);
        if tx.send(data).is_err() {
            break; // the consumer failed; its error is reported below
        }
    }
    drop(tx);
    consumer.await.context("extract task")?
}

/// After the archives: a postgresql.conf if the backup had none, the server's manifest (for
/// pg_verifybackup), pg_wal. Returns whether the backup held a postgresql.conf.
/// `combined`: the checksums of the files a chain's combine reconstructed.
async fn finish_data_dir(
    reader: &Reader,
    backup: &BackupDescription,
    pgdata: &Path,
    combined: Option<combine::Checksums>,
) -> Result<bool> {
    // A cluster whose postgresql.conf lived outside its data directory (Debian keeps it in
    // /etc/postgresql) has none in the backup: PostgreSQL refuses to start without one.
    let conf = pgdata.join("postgresql.conf");
    let had = conf.exists();
    if !had {
        std::fs::write(&conf, "# Created by walvault-recover restore: the backed-up cluster kept its postgresql.conf\n# outside the data directory. Copy your settings here (port, memory, ...).\n")?;
        eprintln!(
            "restore: the backup has no postgresql.conf (the server kept it outside its data directory); created an empty one in {}: add your settings before starting",
            pgdata.display()
        );
    }
    let mkey = names::backup_manifest(&backup.id);
    let manifest = reader.read(&mkey, Want::manifest(backup.manifest_bytes)).await?.content;
    if let Some(known) = combined {
        let label_path = pgdata.join("backup_label");
        let label = std::fs::read_to_string(&label_path).context("read the restored backup_label")?;
        walvault_shared::fsutil::write_atomically(&label_path, combine::plain_label(&label).as_bytes(), 0o600)?;
        let (pd, t, computed) = (pgdata.to_path_buf(), Instant::now(), known.len());
        let combined = tokio::task::spawn_blocking(move || manifest::combined(&manifest, &pd, &known)).await??;
        eprintln!(
            "restore: backup_manifest of the combined files written in {:.1} s ({computed} checksums computed while combining)",
            t.elapsed().as_secs_f64()
        );
        std::fs::write(pgdata.join("backup_manifest"), combined)?;
    } else {
        std::fs::write(pgdata.join("backup_manifest"), manifest)?;
    }
    std::fs::create_dir_all(pgdata.join("pg_wal"))?;
    Ok(had)
}

/// `export-backup`: one backup's archives as the server sent them, into an empty `dir` (the
/// main archive) and `dir/pg_tblspc/<oid>` (tablespaces), with its `backup_manifest`. Returns
/// the bytes written.
pub async fn export(reader: &Reader, id: &str, dir: &Path, owner: Option<&Owner>, parallel: usize) -> Result<u64> {
    let view = ArchiveView::load(reader).await?;
    let b = view.backups.iter().find(|b| b.id == id).with_context(|| {
        format!("no complete backup {id} in the archive\nHINT: walvault-recover list shows the backups")
    })?;
    if !extract::is_empty_dir(dir)? {
        bail!("{} is not empty\nHINT: export into an empty directory", dir.display());
    }
    if let Some(live) = crate::pgdata::running_server(dir) {
        bail!("{} is in use by a running server: {live}", dir.display());
    }
    let ids = owner.map(|o| (o.uid, o.gid));
    extract::create_private_dir(dir, ids)?;
    let mut progress = Progress::new(b.raw_bytes);
    let mut order: Vec<&ArchiveInfo> = b.archives.iter().collect();
    order.sort_by_key(|a| !a.location.is_empty());
    for a in order {
        let dest = if a.location.is_empty() {
            dir.to_path_buf()
        } else {
            let oid: u32 = a
                .name
                .strip_suffix(".tar")
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("backup {id}: tablespace archive {:?} is not named OID.tar", a.name))?;
            let d = dir.join("pg_tblspc").join(oid.to_string());
            // base.tar made pg_tblspc/<oid> a link to the original location: replace it.
            if std::fs::symlink_metadata(&d).is_ok_and(|m| m.file_type().is_symlink()) {
                std::fs::remove_file(&d)?;
            }
            extract::create_private_dir(&d, ids)?;
            d
        };
        let d2 = dest.clone();
        fetch_into(reader, b, a, parallel, &mut progress, move |stream| {
            // No links are made: a tablespace's files land in pg_tblspc/<oid> itself.
            extract::unpack(stream, &d2, &[])
        })
        .await?;
    }
    let mkey = names::backup_manifest(&b.id);
    let manifest = reader.read(&mkey, Want::manifest(b.manifest_bytes)).await?.content;
    std::fs::write(dir.join("backup_manifest"), manifest)?;
    if let Some((uid, gid)) = ids {
        extract::chown_tree(dir, uid, gid)?;
    }
    Ok(progress.done)
}
