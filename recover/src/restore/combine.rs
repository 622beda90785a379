//! Native combine of an incremental backup chain while it streams from the archive: what
//! `pg_combinebackup` does (PostgreSQL 17's `src/bin/pg_combinebackup/reconstruct.c`), without
//! the backups on local disk first, writing each output block once.
//!
//! The chain is read newest backup first:
//! 1. The newest backup is unpacked as a full backup would be, except `INCREMENTAL.<name>` files
//!    in relation directories (`global`, `base/<db>`, and `PG_<major>_<catversion>/<db>` in a
//!    tablespace): each starts the reconstruction of `<name>`. Its header gives the blocks it
//!    carries and the *truncation length* `T` (the file's minimum length in blocks); its blocks
//!    are written at their offsets, and the output length is `max(T, highest listed block + 1)`.
//! 2. Each older backup is then read only for the files still being reconstructed: from an
//!    older `INCREMENTAL.<name>`, the listed blocks below `T` not written yet; from a whole
//!    `<name>` (in a full backup, or sent whole by an incremental), every block below `T`
//!    and below its length not written yet, and that file is then complete. Files of older
//!    backups that the newest one does not list are never written: absence from the newest
//!    backup is how a dropped relation shows.
//! 3. Blocks that no backup supplies (below the output length) are written as zeros, as
//!    `pg_combinebackup` does.
//! 4. `backup_label` loses its `INCREMENTAL FROM` lines; a new `backup_manifest` (version 2,
//!    CRC32C per file, SHA-256 manifest checksum) describes the reconstructed files, so that
//!    `pg_verifybackup` checks the result like any plain backup.
//!
//! `INCREMENTAL.*` format (`basebackup_incremental.h`; little-endian on every platform
//! PostgreSQL ships binaries for): magic `0xd3ae1f0d` u32, block count `n` u32, truncation
//! length u32, `n` block numbers u32 (relative to the segment file, ascending), zero padding to
//! a multiple of BLCKSZ when `n > 0`, then `n` blocks. Counts and lengths above RELSEG_SIZE,
//! unsorted or repeated block numbers, and sizes that do not add up are refused (17.0–17.x
//! servers could emit a truncation length above RELSEG_SIZE: it is clamped, as 18 does).
//!
//! Files are created with `O_EXCL` under directories checked not to be symbolic links, so a
//! hostile archive cannot make the combine write outside the destination.

use std::collections::{BTreeSet, HashMap};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};

pub const INCREMENTAL_MAGIC: u32 = 0xd3ae_1f0d;
pub const PREFIX: &str = "INCREMENTAL.";

/// Block size and segment size in blocks of the server the chain comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub blcksz: u32,
    pub relseg: u32,
}

/// An `INCREMENTAL.*` file's header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IncrementalHeader {
    pub blocks: Vec<u32>,
    pub truncation: u32,
    /// Header bytes including padding: where the first block starts.
    pub header_len: u64,
}

impl IncrementalHeader {
    /// Read a header from the start of an `INCREMENTAL.*` file of `size` bytes, and check that
    /// the file is exactly header plus blocks.
    pub fn read(r: &mut impl Read, size: u64, g: Geometry, name: &str) -> Result<Self> {
        let mut fixed = [0u8; 12];
        r.read_exact(&mut fixed).with_context(|| format!("incremental file {name}: shorter than its header"))?;
        let word = |i: usize| u32::from_le_bytes(fixed[i * 4..i * 4 + 4].try_into().expect("4 bytes"));
        let (magic, n, mut truncation) = (word(0), word(1), word(2));
        if magic != INCREMENTAL_MAGIC {
            bail!("incremental file {name} has a bad magic number 0x{magic:08x} (expected 0x{INCREMENTAL_MAGIC:08x})");
        }
        if n > g.relseg {
            bail!("incremental file {name} lists {n} blocks, more than a segment holds ({})", g.relseg);
        }
        if truncation > g.relseg {
            // PostgreSQL 17 before the fix that 18 carries could write a larger value.
            truncation = g.relseg;
        }
        let mut raw = vec![0u8; n as usize * 4];
        r.read_exact(&mut raw).with_context(|| format!("incremental file {name}: block list cut short"))?;
        let blocks: Vec<u32> =
            raw.chunks_exact(4).map(|c| u32::from_le_bytes(c.try_into().expect("4 bytes"))).collect();
        if blocks.windows(2).any(|w| w[0] >= w[1]) || blocks.last().is_some_and(|b| *b >= g.relseg) {
            bail!("incremental file {name}: its block list is not ascending within the segment");
        }
        let mut header_len = 12 + 4 * n as u64;
        let bs = g.blcksz as u64;
        if n > 0 && header_len % bs != 0 {
            let pad = bs - header_len % bs;
            std::io::copy(&mut r.take(pad), &mut std::io::sink())?;
            header_len += pad;
        }
        if size != header_len + n as u64 * bs {
            bail!(
                "incremental file {name} is {size} bytes; a header listing {n} blocks of {bs} bytes makes {}",
                header_len + n as u64 * bs
            );
        }
        Ok(IncrementalHeader { blocks, truncation, header_len })
    }

    /// The reconstructed file's length in blocks.
    pub fn output_blocks(&self) -> u32 {
        self.truncation.max(self.blocks.last().map(|b| b + 1).unwrap_or(0))
    }
}

/// Whether a tar member's directory holds relation files that may come incrementally:
/// `global`, `base/<digits>`; in a tablespace archive `PG_*/<digits>`.
pub fn is_relation_dir(dir: &Path, tablespace: bool) -> bool {
    let c: Vec<&str> = dir.components().filter_map(|c| c.as_os_str().to_str()).collect();
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    match c.as_slice() {
        ["global"] => !tablespace,
        ["base", db] => !tablespace && digits(db),
        [v, db] => tablespace && v.starts_with("PG_") && digits(db),
        _ => false,
    }
}

/// `dir/INCREMENTAL.name` in a relation directory → `dir/name`.
pub fn incremental_target(path: &Path, tablespace: bool) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let plain = name.strip_prefix(PREFIX)?;
    let dir = path.parent()?;
    if plain.is_empty() || !is_relation_dir(dir, tablespace) {
        return None;
    }
    Some(dir.join(plain))
}

/// `dest/rel`, after checking that `rel` is a plain relative path and that every directory on
/// the way inside `dest` is a real directory (not a link an archive could have planted).
pub fn safe_path(dest: &Path, rel: &Path) -> Result<PathBuf> {
    let mut at = dest.to_path_buf();
    let comps: Vec<Component> = rel.components().collect();
    if comps.is_empty() || comps.iter().any(|c| !matches!(c, Component::Normal(_))) {
        bail!("the backup's tar entry {} is not a plain relative path; refusing it", rel.display());
    }
    for c in &comps[..comps.len() - 1] {
        at.push(c);
        let m = std::fs::symlink_metadata(&at)
            .with_context(|| format!("{}: its directory {} is missing", rel.display(), at.display()))?;
        if !m.file_type().is_dir() {
            bail!(
                "the backup's tar entry {} goes through {}, which is not a directory; refusing it",
                rel.display(),
                at.display()
            );
        }
    }
    at.push(comps.last().expect("non-empty"));
    Ok(at)
}

/// A file being reconstructed.
#[derive(Debug)]
struct Pending {
    path: PathBuf,
    truncation: u32,
    output_blocks: u32,
    /// Blocks written so far (from newer backups).
    written: BTreeSet<u32>,
    /// Seen in the backup being read now.
    seen: bool,
}

/// The size and CRC32C of a reconstructed file, computed while it was completed (its blocks in
/// order: those written from newer backups read back, the rest from the stream as it is
/// written), keyed by the file's (device, inode) so that a path through a tablespace link finds
/// it. The manifest of the combined restore uses them instead of reading every file again.
pub type Checksums = HashMap<(u64, u64), (u64, u32)>;

/// The reconstruction of one chain, across its backups' tar streams.
pub struct Combiner {
    g: Geometry,
    /// (archive name, path in the archive without the prefix) → state.
    pending: HashMap<(String, PathBuf), Pending>,
    /// Size and CRC32C of every file finished so far.
    pub checksums: Checksums,
    buf: Vec<u8>,
}

impl Combiner {
    pub fn new(g: Geometry) -> Result<Self> {
        if !g.blcksz.is_power_of_two() || !(1024..=32768).contains(&g.blcksz) || g.relseg == 0 {
            bail!("backup description gives an impossible block size {} or segment size {}", g.blcksz, g.relseg);
        }
        Ok(Combiner { g, pending: HashMap::new(), checksums: HashMap::new(), buf: vec![0; 1 << 20] })
    }

    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// The newest backup's `INCREMENTAL.*` entry `path` (inside the archive `archive`,
    /// unpacked into `dest`): create the output file, write the blocks it carries, and either
    /// finish it (nothing older is needed) or remember what it still needs.
    pub fn start(
        &mut self,
        archive: &str,
        dest: &Path,
        path: &Path,
        target: &Path,
        size: u64,
        entry: &mut impl Read,
    ) -> Result<()> {
        let name = path.display().to_string();
        let h = IncrementalHeader::read(entry, size, self.g, &name)?;
        let out = safe_path(dest, target)?;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&out)
            .with_context(|| format!("create {}", out.display()))?;
        let mut written = BTreeSet::new();
        copy_blocks(entry, &h.blocks, |b| written.insert(b), &file, self.g, &mut self.buf, &name, &out)?;
        let p = Pending { path: out, truncation: h.truncation, output_blocks: h.output_blocks(), written, seen: false };
        if p.truncation == 0 || (0..p.truncation).all(|b| p.written.contains(&b)) {
            let crc = finish_file(&file, &p, 0, 0, self.g, &mut self.buf)?;
            record(&mut self.checksums, &file, &p, crc, self.g)?;
        } else {
            self.pending.insert((archive.to_string(), target.to_path_buf()), p);
        }
        Ok(())
    }

    /// Read an older backup's tar stream of `archive` for the files still being reconstructed.
    /// `full`: the chain's full backup (an `INCREMENTAL.*` file there is an error).
    pub fn feed_older(
        &mut self,
        archive: &str,
        tablespace: bool,
        full: bool,
        backup_id: &str,
        stream: impl Read,
    ) -> Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        for p in self.pending.values_mut() {
            p.seen = false;
        }
        let mut ar = tar::Archive::new(stream);
        for entry in ar.entries().with_context(|| format!("read backup {backup_id}'s {archive}"))? {
            let mut entry = entry.with_context(|| format!("read backup {backup_id}'s {archive}"))?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let path = entry.path()?.into_owned();
            let size = entry.header().size()?;
            let (target, incremental) = match incremental_target(&path, tablespace) {
                Some(t) => (t, true),
                None => (path.clone(), false),
            };
            let key = (archive.to_string(), target);
            let Some(p) = self.pending.get_mut(&key) else { continue };
            p.seen = true;
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&p.path)
                .with_context(|| format!("open {}", p.path.display()))?;
            let name = format!("{} (backup {backup_id})", path.display());
            if incremental {
                if full {
                    bail!(
                        "the full backup {backup_id} holds an incremental file {}; the chain is inconsistent",
                        path.display()
                    );
                }
                let h = IncrementalHeader::read(&mut entry, size, self.g, &name)?;
                let (truncation, written) = (p.truncation, &mut p.written);
                let keep = |b: u32| b < truncation && written.insert(b);
                copy_blocks(&mut entry, &h.blocks, keep, &file, self.g, &mut self.buf, &name, &p.path)?;
                if (0..p.truncation).all(|b| p.written.contains(&b)) {
                    let p = self.pending.remove(&key).expect("present");
                    let crc = finish_file(&file, &p, 0, 0, self.g, &mut self.buf)?;
                    record(&mut self.checksums, &file, &p, crc, self.g)?;
                }
            } else {
                let p = self.pending.remove(&key).expect("present");
                let (have, crc) = fill_from_whole(&file, &p, &mut entry, size, self.g, &mut self.buf, &name)?;
                let crc = finish_file(&file, &p, have, crc, self.g, &mut self.buf)?;
                record(&mut self.checksums, &file, &p, crc, self.g)?;
            }
        }
        // Every file still pending must appear (whole or incremental) in every older backup.
        let missing: Vec<String> = self
            .pending
            .iter()
            .filter(|((a, _), p)| a == archive && !p.seen)
            .map(|((_, t), _)| t.display().to_string())
            .take(5)
            .collect();
        if !missing.is_empty() {
            bail!(
                "backup {backup_id} lacks files its newer incrementals build on ({}); the chain is inconsistent\nHINT: restore another backup (--backup ID)",
                missing.join(", ")
            );
        }
        Ok(())
    }

    /// After the full backup: nothing may remain pending. Returns the checksums of the
    /// reconstructed files.
    pub fn finish(self) -> Result<Checksums> {
        if let Some(((a, t), _)) = self.pending.iter().next() {
            bail!("{a}: {} could not be reconstructed: no backup of the chain holds its older blocks", t.display());
        }
        Ok(self.checksums)
    }
}

/// Remember a finished file's size and CRC32C under its (device, inode).
fn record(sums: &mut Checksums, file: &std::fs::File, p: &Pending, crc: u32, g: Geometry) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let m = file.metadata().with_context(|| format!("stat {}", p.path.display()))?;
    sums.insert((m.dev(), m.ino()), (p.output_blocks as u64 * g.blcksz as u64, crc));
    Ok(())
}

/// Read the blocks `blocks` of an `INCREMENTAL.*` file from `entry` (just after its header) and
/// write those that `keep` accepts at their offsets in `file`: consecutive kept blocks in one
/// write of up to `buf`'s size.
#[allow(clippy::too_many_arguments)]
fn copy_blocks(
    entry: &mut impl Read,
    blocks: &[u32],
    mut keep: impl FnMut(u32) -> bool,
    file: &std::fs::File,
    g: Geometry,
    buf: &mut [u8],
    name: &str,
    out: &Path,
) -> Result<()> {
    let bs = g.blcksz as usize;
    let per = buf.len() / bs;
    // The run being gathered in `buf`: its first block and length.
    let mut run: Option<(u32, usize)> = None;
    let flush = |run: (u32, usize), buf: &[u8]| {
        file.write_all_at(&buf[..run.1 * bs], run.0 as u64 * bs as u64)
            .with_context(|| format!("write {}", out.display()))
    };
    for &b in blocks {
        let kept = keep(b);
        if let Some(r) = run {
            if !kept || b != r.0 + r.1 as u32 || r.1 == per {
                flush(r, buf)?;
                run = None;
            }
        }
        if kept {
            let (first, n) = run.unwrap_or((b, 0));
            entry.read_exact(&mut buf[n * bs..(n + 1) * bs]).with_context(|| format!("read {name}"))?;
            run = Some((first, n + 1));
        } else {
            let skipped = std::io::copy(&mut entry.take(bs as u64), &mut std::io::sink())
                .with_context(|| format!("read {name}"))?;
            if skipped != bs as u64 {
                bail!("read {name}: cut short");
            }
        }
    }
    if let Some(r) = run {
        flush(r, buf)?;
    }
    Ok(())
}

/// From a whole file of `size` bytes (read from `entry`): every block below the truncation
/// length not written yet, in runs. Returns how many blocks it covered and the CRC32C of those
/// blocks as the output file now holds them (blocks from newer backups are read back).
fn fill_from_whole(
    file: &std::fs::File,
    p: &Pending,
    entry: &mut impl Read,
    size: u64,
    g: Geometry,
    buf: &mut [u8],
    name: &str,
) -> Result<(u32, u32)> {
    let bs = g.blcksz as u64;
    if size % bs != 0 {
        bail!("{name} is {size} bytes, not a whole number of {bs}-byte blocks");
    }
    let have = ((size / bs) as u32).min(p.truncation);
    let mut b = 0u32;
    let mut crc = 0u32;
    while b < have {
        let n = ((buf.len() as u64 / bs) as u32).min(have - b);
        let chunk = &mut buf[..(n as u64 * bs) as usize];
        entry.read_exact(chunk).with_context(|| format!("read {name}"))?;
        // Blocks not written yet go to the file; blocks newer backups wrote are read back over
        // their stale copies, so the chunk is what the file now holds.
        for (from, to, newer) in runs(b, n, &p.written) {
            let (at, range) = ((b + from) as u64 * bs, (from as u64 * bs) as usize..(to as u64 * bs) as usize);
            if newer {
                file.read_exact_at(&mut chunk[range], at).with_context(|| format!("read back {}", p.path.display()))?;
            } else {
                file.write_all_at(&chunk[range], at).with_context(|| format!("write {}", p.path.display()))?;
            }
        }
        crc = crc32c::crc32c_append(crc, chunk);
        b += n;
    }
    Ok((have, crc))
}

/// Complete a reconstructed file: zeros for every block below its output length that no
/// backup supplied (blocks below `whole` came from a whole file, `crc` is theirs), then its
/// exact length. Returns the whole file's CRC32C (blocks written earlier are read back).
fn finish_file(
    file: &std::fs::File,
    p: &Pending,
    whole: u32,
    mut crc: u32,
    g: Geometry,
    buf: &mut [u8],
) -> Result<u32> {
    let bs = g.blcksz as u64;
    let mut b = whole;
    while b < p.output_blocks {
        let n = ((buf.len() as u64 / bs) as u32).min(p.output_blocks - b);
        let chunk = &mut buf[..(n as u64 * bs) as usize];
        for (from, to, written) in runs(b, n, &p.written) {
            let (at, range) = ((b + from) as u64 * bs, (from as u64 * bs) as usize..(to as u64 * bs) as usize);
            if written {
                file.read_exact_at(&mut chunk[range], at).with_context(|| format!("read back {}", p.path.display()))?;
            } else {
                chunk[range.clone()].fill(0);
                file.write_all_at(&chunk[range], at).with_context(|| format!("write {}", p.path.display()))?;
            }
        }
        crc = crc32c::crc32c_append(crc, chunk);
        b += n;
    }
    file.set_len(p.output_blocks as u64 * bs).with_context(|| format!("truncate {}", p.path.display()))?;
    Ok(crc)
}

/// The blocks `b..b + n` as runs `(from, to, in written)`, relative to `b`.
fn runs(b: u32, n: u32, written: &BTreeSet<u32>) -> Vec<(u32, u32, bool)> {
    let mut out: Vec<(u32, u32, bool)> = Vec::new();
    for i in 0..n {
        let w = written.contains(&(b + i));
        match out.last_mut() {
            Some((_, to, v)) if *v == w => *to = i + 1,
            _ => out.push((i, i + 1, w)),
        }
    }
    out
}

/// `backup_label` without the `INCREMENTAL FROM` lines (what pg_combinebackup writes).
pub fn plain_label(label: &str) -> String {
    label
        .split_inclusive('\n')
        .filter(|l| !l.starts_with("INCREMENTAL FROM LSN: ") && !l.starts_with("INCREMENTAL FROM TLI: "))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: Geometry = Geometry { blcksz: 1024, relseg: 64 };

    /// An incremental file: (block, fill byte) pairs and its truncation length.
    type Incr = (Vec<(u32, u8)>, u32);

    fn incremental(blocks: &[(u32, u8)], truncation: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&INCREMENTAL_MAGIC.to_le_bytes());
        v.extend_from_slice(&(blocks.len() as u32).to_le_bytes());
        v.extend_from_slice(&truncation.to_le_bytes());
        for (b, _) in blocks {
            v.extend_from_slice(&b.to_le_bytes());
        }
        if !blocks.is_empty() {
            while v.len() % 1024 != 0 {
                v.push(0);
            }
        }
        for (_, fill) in blocks {
            v.extend(std::iter::repeat_n(*fill, 1024));
        }
        v
    }

    fn tar_of(files: &[(&str, Vec<u8>)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_size(data.len() as u64);
            h.set_mode(0o600);
            h.set_entry_type(tar::EntryType::Regular);
            b.append_data(&mut h, name, &data[..]).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn whole(blocks: &[u8]) -> Vec<u8> {
        blocks.iter().flat_map(|f| std::iter::repeat_n(*f, 1024)).collect()
    }

    /// pg_combinebackup's rules, written the slow and obvious way (newest first, per block).
    fn reference(chain: &[Incr], full: &[u8]) -> Vec<u8> {
        // chain: newest first.
        let (newest, t) = chain[0].clone();
        let len = t.max(newest.iter().map(|(b, _)| b + 1).max().unwrap_or(0));
        let mut out = Vec::new();
        for b in 0..len {
            let mut v = None;
            for (i, c) in chain.iter().enumerate() {
                let (bl, _) = c;
                if let Some((_, f)) = bl.iter().find(|(x, _)| *x == b) {
                    if i == 0 || b < t {
                        v = Some(*f);
                        break;
                    }
                }
            }
            if v.is_none() && b < t && (b as usize) < full.len() {
                v = Some(full[b as usize]);
            }
            out.extend(std::iter::repeat_n(v.unwrap_or(0), 1024));
        }
        out
    }

    #[test]
    fn reconstructs_like_pg_combinebackup() {
        let cases: Vec<(Vec<u8>, Vec<Incr>)> = vec![
            // Unchanged (header-only) on top of a full file.
            (vec![1, 2, 3, 4], vec![(vec![], 4)]),
            // Changed blocks, newest wins; older incremental fills what the newest lacks.
            (vec![1, 2, 3, 4, 5], vec![(vec![(1, 9)], 5), (vec![(1, 7), (3, 8)], 5)]),
            // Truncated in the newest: blocks at or past T come only from the newest.
            (vec![1, 2, 3, 4, 5, 6], vec![(vec![(5, 9)], 2), (vec![(3, 8)], 6)]),
            // Extended past the full file: the gap is zeros.
            (vec![1, 2], vec![(vec![(6, 9)], 4)]),
            // Runs of consecutive blocks, some already written by the newer backup.
            (
                vec![1, 2, 3, 4, 5, 6, 7, 8],
                vec![(vec![(2, 9), (3, 9), (4, 9)], 8), (vec![(1, 7), (2, 7), (3, 7), (5, 7), (6, 7)], 8)],
            ),
            // Truncated to nothing and regrown.
            (vec![1, 2, 3], vec![(vec![(0, 5), (2, 6)], 0)]),
        ];
        for (n, (full, chain)) in cases.into_iter().enumerate() {
            let t = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(t.path().join("base/5")).unwrap();
            let mut c = Combiner::new(G).unwrap();
            let newest = incremental(&chain[0].0, chain[0].1);
            c.start(
                "base.tar",
                t.path(),
                Path::new("base/5/INCREMENTAL.16384"),
                Path::new("base/5/16384"),
                newest.len() as u64,
                &mut &newest[..],
            )
            .unwrap();
            for (blocks, tr) in &chain[1..] {
                let older =
                    tar_of(&[("base/5/INCREMENTAL.16384", incremental(blocks, *tr)), ("base/5/9999", whole(&[1]))]);
                c.feed_older("base.tar", false, false, "older", &older[..]).unwrap();
            }
            let fulltar = tar_of(&[("base/5/16384", whole(&full)), ("base/5/dropped", whole(&[7]))]);
            c.feed_older("base.tar", false, true, "full", &fulltar[..]).unwrap();
            let sums = c.finish().unwrap();
            let got = std::fs::read(t.path().join("base/5/16384")).unwrap();
            assert_eq!(got, reference(&chain, &full), "case {n}");
            use std::os::unix::fs::MetadataExt;
            let m = std::fs::metadata(t.path().join("base/5/16384")).unwrap();
            assert_eq!(
                sums.get(&(m.dev(), m.ino())),
                Some(&(got.len() as u64, crc32c::crc32c(&got))),
                "case {n}: the checksum computed while combining is the file's"
            );
            assert!(!t.path().join("base/5/dropped").exists(), "files only in older backups are not restored");
        }
    }

    #[test]
    fn bad_headers_are_refused() {
        let ok = incremental(&[(1, 1)], 3);
        IncrementalHeader::read(&mut &ok[..], ok.len() as u64, G, "x").unwrap();
        let mut bad = ok.clone();
        bad[0] ^= 1;
        assert!(IncrementalHeader::read(&mut &bad[..], bad.len() as u64, G, "x")
            .unwrap_err()
            .to_string()
            .contains("magic"));
        assert!(IncrementalHeader::read(&mut &ok[..], ok.len() as u64 + 1, G, "x").is_err(), "size must add up");
        let unsorted = incremental(&[(2, 1), (1, 1)], 3);
        assert!(IncrementalHeader::read(&mut &unsorted[..], unsorted.len() as u64, G, "x").is_err());
        let mut many = ok.clone();
        many[4..8].copy_from_slice(&1000u32.to_le_bytes());
        assert!(IncrementalHeader::read(&mut &many[..], many.len() as u64, G, "x").is_err());
        let big_t = incremental(&[], 1000);
        assert_eq!(IncrementalHeader::read(&mut &big_t[..], 12, G, "x").unwrap().truncation, 64, "clamped");
    }

    #[test]
    fn a_missing_file_in_an_older_backup_is_an_error() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("base/5")).unwrap();
        let mut c = Combiner::new(G).unwrap();
        let newest = incremental(&[], 2);
        c.start("base.tar", t.path(), Path::new("base/5/INCREMENTAL.1"), Path::new("base/5/1"), 12, &mut &newest[..])
            .unwrap();
        let full = tar_of(&[("base/5/2", whole(&[1, 1]))]);
        assert!(c.feed_older("base.tar", false, true, "full", &full[..]).unwrap_err().to_string().contains("lacks"));
    }

    #[test]
    fn relation_dirs_and_paths() {
        assert!(is_relation_dir(Path::new("base/5"), false));
        assert!(is_relation_dir(Path::new("global"), false));
        assert!(!is_relation_dir(Path::new("pg_xact"), false));
        assert!(is_relation_dir(Path::new("PG_17_202406281/5"), true));
        assert!(!is_relation_dir(Path::new("base/5"), true));
        assert_eq!(
            incremental_target(Path::new("base/5/INCREMENTAL.16384_vm"), false),
            Some(PathBuf::from("base/5/16384_vm"))
        );
        assert_eq!(incremental_target(Path::new("pg_xact/INCREMENTAL.0000"), false), None);
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir(t.path().join("real")).unwrap();
        std::os::unix::fs::symlink("/etc", t.path().join("link")).unwrap();
        assert!(safe_path(t.path(), Path::new("real/x")).is_ok());
        assert!(safe_path(t.path(), Path::new("link/passwd")).is_err());
        assert!(safe_path(t.path(), Path::new("../x")).is_err());
        assert_eq!(plain_label("A: 1\nINCREMENTAL FROM LSN: 0/2\nINCREMENTAL FROM TLI: 1\nB: 2\n"), "A: 1\nB: 2\n");
    }
}
