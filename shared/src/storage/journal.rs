//! The local store's commit journal: what makes a synchronous commit cost one `fdatasync`.
//!
//! A normal local put is a new file: written, fsynced, linked under its key, and the key's
//! directory fsynced; on ext4 that is two journal commits of the file system per object. In
//! synchronous mode (`walvault-agent run --synchronous`) every group of commits is one small
//! chunk object, so those two commits are on every commit's path. pg_receivewal `--synchronous`
//! instead overwrites a preallocated segment file and `fdatasync`s it: no metadata changes.
//! The journal does the same for the archive: the agent opens its local store with
//! [`super::local::LocalStore::with_journal`], and small write-once puts of WAL objects are
//! appended to a preallocated file under `ROOT/.journal/` and `fdatasync`ed: one flush of data
//! blocks, no file created, no directory changed.
//!
//! # Format
//!
//! `ROOT/.journal/<generation, 16 hex digits>.wvj`, created as [`FILE_SIZE`] bytes of zeros,
//! fsynced, its directory fsynced, before the first record goes in. Records follow one another
//! from offset 0 (little-endian):
//!
//! | bytes | field |
//! |---|---|
//! | 4 | magic `WVJ1` |
//! | 1 | kind: 1 = put, 2 = delete (a tombstone, no data) |
//! | 3 | zero |
//! | 8 | generation of the file (a record copied into another file does not validate) |
//! | 8 | time written, µs since the Unix epoch: the object's last-modified time |
//! | 4 | key length |
//! | 4 | data length |
//! | 4 | CRC-32 of the 32 bytes above, the key and the data |
//! | key length | the key |
//! | data length | the object, byte for byte what a file under the key would hold |
//!
//! A scan reads the files in generation order and each from offset 0, and stops a file at the
//! first record that does not validate (zeros: the end; anything else: a write the crash cut
//! short, which was never acknowledged). Puts add an object, tombstones remove it; an object
//! that also exists as a file is the file's (identical content: puts are write-once).
//!
//! # Contract
//!
//! * A journaled put returns only after the `fdatasync` that covers its record (a record is
//!   written, under a lock, after every earlier record, so a flush that covers it covers them:
//!   a scan never finds an acknowledged record after a torn one). Flushes run one at a time;
//!   once one fails, no later put in that file is acknowledged (Linux reports a writeback
//!   error to one flush only), what was not flushed is forgotten and retried into a new file.
//!   A put of a key already journaled (the retry of a put whose caller stopped waiting) is
//!   told `AlreadyExists` only once that record is flushed.
//! * One writer: [`Journal::open`] takes `flock` on `ROOT/.journal/LOCK`; a second agent on
//!   the archive gets no journal and writes files, and a put of a key journaled by the first
//!   is refused as existing (write-once across processes).
//! * Every reader of the store sees journaled objects as objects: `get`, `get_range`, `head`,
//!   `list` (the store merges them with its files), in this process and in others
//!   (`walvault-recover` reading the archive while the agent writes, or after it was killed).
//!   Only chunk keys are looked up there. Other processes scan the journal files; a scan is
//!   cached and redone on a listing, when a key is not found, and when a cached record is
//!   gone or no longer validates; a scan that finds a file vanished starts again (its live
//!   records were copied into a newer file first).
//! * Deleting a journaled object (the agent consolidating a segment, removing its chunks)
//!   appends a tombstone (not flushed: a tombstone lost in a crash brings back a redundant
//!   chunk, which the agent deletes at its next start, as it does files). A journal file is
//!   removed once it holds no live object and no older journal file remains. When a new file
//!   is started, the live objects of older files that are mostly dead (live records at most a
//!   quarter of the file) are copied into it, flushed, and those files removed (compaction):
//!   chunks that are never deleted (the last chunks of a timeline that ended) keep no file
//!   alive, and a file still mostly live (the segment being filled) is left to empty itself.
//!   The next file is preallocated by a thread beforehand.
//! * Generations only grow, across restarts too (the next is at least the time in µs).
//! * Only the agent writes the journal; other processes only read it, and a delete from
//!   another process does not reach journaled objects (they are only ever chunks of segments
//!   the agent is filling, which the agent deletes; a separate `walvault-agent expire` that
//!   removes an ended timeline's last chunks leaves their journal copies to be listed until the
//!   agent's own retention removes them).
//! * Puts larger than [`MAX_DATA`] (whole segments, backup parts) and overwrites are files,
//!   as without a journal.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};

/// The journal's directory under the repository root (never listed as keys).
pub const DIR: &str = ".journal";
/// Size of one journal file.
pub const FILE_SIZE: u64 = 16 << 20;
/// Largest object that is journaled; larger ones are written as files.
pub const MAX_DATA: usize = 1 << 20;

const MAGIC: &[u8; 4] = b"WVJ1";
const HEADER: usize = 36;
const PUT: u8 = 1;
const DELETE: u8 = 2;

/// Where a live journaled object is.
#[derive(Clone, Debug)]
pub struct Entry {
    pub generation: u64,
    /// Offset of the record (its header) in the file.
    pub offset: u64,
    pub key_len: u32,
    pub data_len: u32,
    pub written: DateTime<Utc>,
}

impl Entry {
    fn record_len(&self) -> u64 {
        HEADER as u64 + self.key_len as u64 + self.data_len as u64
    }
}

/// The live objects of a set of journal files.
#[derive(Clone, Debug, Default)]
pub struct View {
    pub entries: BTreeMap<String, Entry>,
    /// Live objects per generation (every file scanned has an entry, possibly 0).
    live: BTreeMap<u64, usize>,
}

impl View {
    fn add(&mut self, key: String, e: Entry) {
        *self.live.entry(e.generation).or_default() += 1;
        if let Some(old) = self.entries.insert(key, e) {
            self.dec(old.generation);
        }
    }

    fn remove(&mut self, key: &str) -> bool {
        match self.entries.remove(key) {
            Some(old) => {
                self.dec(old.generation);
                true
            }
            None => false,
        }
    }

    fn dec(&mut self, generation: u64) {
        if let Some(n) = self.live.get_mut(&generation) {
            *n = n.saturating_sub(1);
        }
    }
}

pub fn file_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("{generation:016x}.wvj"))
}

/// Generations of the journal files in `dir`, ascending (none if the directory is missing).
pub fn generations(dir: &Path) -> io::Result<Vec<u64>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for ent in rd {
        let name = ent?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(hex) = name.strip_suffix(".wvj") {
            if let Ok(g) = u64::from_str_radix(hex, 16) {
                if hex.len() == 16 {
                    out.push(g);
                }
            }
        }
    }
    out.sort_unstable();
    Ok(out)
}

fn encode(kind: u8, generation: u64, written: DateTime<Utc>, key: &str, data: &[u8]) -> Vec<u8> {
    let mut rec = Vec::with_capacity(HEADER + key.len() + data.len());
    rec.extend_from_slice(MAGIC);
    rec.extend_from_slice(&[kind, 0, 0, 0]);
    rec.extend_from_slice(&generation.to_le_bytes());
    rec.extend_from_slice(&written.timestamp_micros().to_le_bytes());
    rec.extend_from_slice(&(key.len() as u32).to_le_bytes());
    rec.extend_from_slice(&(data.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&rec);
    h.update(key.as_bytes());
    h.update(data);
    rec.extend_from_slice(&h.finalize().to_le_bytes());
    rec.extend_from_slice(key.as_bytes());
    rec.extend_from_slice(data);
    rec
}

struct Header {
    kind: u8,
    generation: u64,
    written: DateTime<Utc>,
    key_len: u32,
    data_len: u32,
    crc: u32,
}

fn parse_header(h: &[u8; HEADER]) -> Option<Header> {
    if &h[0..4] != MAGIC || h[5..8] != [0, 0, 0] {
        return None;
    }
    let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
    let micros = i64::from_le_bytes(h[16..24].try_into().unwrap());
    Some(Header {
        kind: h[4],
        generation: u64::from_le_bytes(h[8..16].try_into().unwrap()),
        written: DateTime::from_timestamp_micros(micros)?,
        key_len: u32_at(24),
        data_len: u32_at(28),
        crc: u32_at(32),
    })
}

fn crc_ok(h: &[u8; HEADER], key: &[u8], data: &[u8], crc: u32) -> bool {
    let mut c = crc32fast::Hasher::new();
    c.update(&h[..32]);
    c.update(key);
    c.update(data);
    c.finalize() == crc
}

/// Apply one journal file's valid records to `view`; `false` if the file is gone (retired
/// since the directory was read).
fn scan_file(dir: &Path, generation: u64, view: &mut View) -> io::Result<bool> {
    let f = match File::open(file_path(dir, generation)) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    let size = f.metadata()?.len();
    let mut r = io::BufReader::with_capacity(1 << 20, f);
    view.live.entry(generation).or_default();
    let mut offset = 0u64;
    let mut h = [0u8; HEADER];
    let mut body = Vec::new();
    while offset + HEADER as u64 <= size {
        r.read_exact(&mut h)?;
        let Some(hd) = parse_header(&h) else { break };
        let len = hd.key_len as u64 + hd.data_len as u64;
        if hd.generation != generation
            || hd.data_len as usize > MAX_DATA
            || hd.key_len > 1024
            || offset + HEADER as u64 + len > size
            || !(hd.kind == PUT || (hd.kind == DELETE && hd.data_len == 0))
        {
            break;
        }
        body.resize(len as usize, 0);
        r.read_exact(&mut body)?;
        let (key, data) = body.split_at(hd.key_len as usize);
        if !crc_ok(&h, key, data, hd.crc) {
            break;
        }
        let Ok(key) = std::str::from_utf8(key) else { break };
        if hd.kind == PUT {
            let e = Entry { generation, offset, key_len: hd.key_len, data_len: hd.data_len, written: hd.written };
            view.add(key.to_string(), e);
        } else {
            view.remove(key);
        }
        offset += HEADER as u64 + len;
    }
    Ok(true)
}

/// Scan every journal file in `dir` (none: an empty view). A file retired during the scan
/// had its live objects copied into a newer file first (compaction), which a directory read
/// after the retirement lists: the scan starts again then.
pub fn scan(dir: &Path) -> io::Result<View> {
    for _ in 0..8 {
        let mut view = View::default();
        let mut whole = true;
        for g in generations(dir)? {
            whole &= scan_file(dir, g, &mut view)?;
        }
        if whole {
            return Ok(view);
        }
    }
    Err(io::Error::other(format!("the journal in {} changed during 8 scans in a row", dir.display())))
}

/// Read a journaled object's data, checking its record again (a file retired since the scan
/// is `NotFound`; a record that no longer validates is an error).
pub fn read(dir: &Path, key: &str, e: &Entry) -> io::Result<Vec<u8>> {
    let f = File::open(file_path(dir, e.generation))?;
    let mut rec = vec![0u8; e.record_len() as usize];
    f.read_exact_at(&mut rec, e.offset)?;
    let h: [u8; HEADER] = rec[..HEADER].try_into().unwrap();
    let (k, data) = rec[HEADER..].split_at(e.key_len as usize);
    let valid = parse_header(&h)
        .map(|hd| hd.kind == PUT && hd.generation == e.generation && k == key.as_bytes() && crc_ok(&h, k, data, hd.crc))
        .unwrap_or(false);
    if !valid {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("journal record of {key} in {} does not validate", file_path(dir, e.generation).display()),
        ));
    }
    rec.drain(..HEADER + e.key_len as usize);
    Ok(rec)
}

/// A journal file the writer has open.
struct Open {
    file: Arc<File>,
    /// Where the next record goes.
    written: u64,
    /// Records up to here are known flushed.
    synced: u64,
}

struct State {
    view: View,
    files: BTreeMap<u64, Open>,
    current: Option<u64>,
    next_generation: u64,
    /// Files a flush of which failed: what was written to them after their last good flush is
    /// not durable, and no later flush may say otherwise (Linux reports a writeback error to
    /// one flush only).
    failed: std::collections::BTreeSet<u64>,
    /// Older files hold live objects: copy them into the current file (see [`Journal::compact`]).
    compact_due: bool,
}

/// The writer's side: the agent's store owns one (and holds `.journal/LOCK` while it does).
pub struct Journal {
    dir: PathBuf,
    file_mode: u32,
    size: u64,
    state: Mutex<State>,
    /// One flush at a time, so that a failed flush is recorded before the next one starts.
    flush: Mutex<()>,
    /// A preallocated next file, made off the commit path.
    spare: Arc<Mutex<Option<(u64, File)>>>,
    /// The threads making spares (joined on drop: no file appears after the writer is gone).
    spare_jobs: Mutex<Vec<std::thread::JoinHandle<()>>>,
    _lock: File,
}

impl Drop for Journal {
    fn drop(&mut self) {
        for h in self.spare_jobs.get_mut().unwrap().drain(..) {
            let _ = h.join();
        }
    }
}

impl std::fmt::Debug for Journal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Journal").field("dir", &self.dir).finish()
    }
}

fn not_durable(dir: &Path, generation: u64) -> io::Error {
    io::Error::other(format!(
        "an earlier flush of journal file {} failed: what was written after it is not durable",
        file_path(dir, generation).display()
    ))
}

/// A new preallocated journal file (zeros, fsynced, its directory fsynced).
fn create_file(dir: &Path, generation: u64, size: u64, mode: u32) -> io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    let path = file_path(dir, generation);
    let f = fs::OpenOptions::new().read(true).write(true).create_new(true).mode(mode).open(&path)?;
    let zeros = vec![0u8; 1 << 20];
    let r = (|| {
        let mut off = 0;
        while off < size {
            let n = zeros.len().min((size - off) as usize);
            f.write_all_at(&zeros[..n], off)?;
            off += n as u64;
        }
        f.sync_all()?;
        crate::fsutil::fsync_dir(dir)
    })();
    if let Err(e) = r {
        let _ = fs::remove_file(&path);
        return Err(e);
    }
    Ok(f)
}

/// Older files whose live records are a small part of them (at most a quarter): the ones
/// compaction copies from. A file mostly live holds the chunks of the segment being filled,
/// which leave when it is consolidated; copying those would rewrite most of a file at every
/// new one.
fn sparse(view: &View, current: Option<u64>, size: u64) -> std::collections::BTreeSet<u64> {
    let mut bytes: BTreeMap<u64, u64> = BTreeMap::new();
    for e in view.entries.values() {
        if Some(e.generation) != current {
            *bytes.entry(e.generation).or_default() += e.record_len();
        }
    }
    bytes.into_iter().filter(|&(_, b)| b > 0 && b <= size / 4).map(|(g, _)| g).collect()
}

/// A flush of `generation` failed: nothing more is acknowledged from it or written to it.
fn fail(st: &mut State, generation: u64) {
    st.failed.insert(generation);
    if st.current == Some(generation) {
        st.current = None;
    }
}

impl Journal {
    /// Open (creating `ROOT/.journal`) for writing: `None` when another process holds the
    /// journal (a second agent on one archive: it writes files). Objects that exist as files
    /// under `root` are the files' (dropped from the view); files left with nothing live are
    /// removed.
    pub fn open(root: &Path, dir_mode: u32, file_mode: u32, size: u64) -> io::Result<Option<Journal>> {
        use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
        use std::os::unix::io::AsRawFd;
        let dir = root.join(DIR);
        fs::DirBuilder::new().recursive(true).mode(dir_mode).create(&dir)?;
        let lock = fs::OpenOptions::new().read(true).write(true).create(true).mode(file_mode).open(dir.join("LOCK"))?;
        // SAFETY: flock(2) on a descriptor this function owns (std's File::try_lock needs Rust
        // 1.89, above this crate's minimum).
        #[allow(unsafe_code)]
        let held = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0;
        if held {
            let e = io::Error::last_os_error();
            return if e.kind() == io::ErrorKind::WouldBlock { Ok(None) } else { Err(e) };
        }
        let mut view = scan(&dir)?;
        let shadowed: Vec<String> = view.entries.keys().filter(|k| root.join(k).is_file()).cloned().collect();
        for k in shadowed {
            view.remove(&k);
        }
        // Generations only grow, across restarts too (a reader's cached entry never points
        // into a different file of the same number).
        let now = Utc::now().timestamp_micros().max(0) as u64;
        let next_generation = view.live.keys().next_back().map_or(now, |g| (g + 1).max(now));
        let compact_due = !sparse(&view, None, size).is_empty();
        let state = State {
            view,
            files: BTreeMap::new(),
            current: None,
            next_generation,
            failed: Default::default(),
            compact_due,
        };
        let j = Journal {
            dir,
            file_mode,
            size,
            state: Mutex::new(state),
            flush: Mutex::new(()),
            spare: Default::default(),
            spare_jobs: Default::default(),
            _lock: lock,
        };
        let mut st = j.state.lock().unwrap();
        j.retire(&mut st);
        drop(st);
        Ok(Some(j))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The live object under `key`, if journaled.
    pub fn entry(&self, key: &str) -> Option<Entry> {
        self.state.lock().unwrap().view.entries.get(key).cloned()
    }

    /// Live objects whose key starts with `prefix`.
    pub fn entries(&self, prefix: &str) -> Vec<(String, Entry)> {
        let st = self.state.lock().unwrap();
        st.view
            .entries
            .range(prefix.to_string()..)
            .take_while(|(k, _)| k.starts_with(prefix))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect()
    }

    /// Whether an object of `len` bytes under `key` goes into the journal.
    pub fn takes(&self, key: &str, len: usize) -> bool {
        len <= MAX_DATA && (HEADER + key.len() + len) as u64 <= self.size
    }

    /// Remove journal files with nothing live, oldest first, while no older file remains
    /// (a tombstone in a file only matters while the file of the put it cancels exists).
    fn retire(&self, st: &mut State) {
        let mut removed = false;
        while let Some((&g, &n)) = st.view.live.iter().next() {
            if n > 0 || Some(g) == st.current {
                break;
            }
            match fs::remove_file(file_path(&self.dir, g)) {
                Ok(()) => removed = true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!("could not remove retired journal file {}: {e}", file_path(&self.dir, g).display());
                    break;
                }
            }
            st.view.live.remove(&g);
            st.files.remove(&g);
            st.failed.remove(&g);
        }
        if removed {
            let _ = crate::fsutil::fsync_dir(&self.dir);
        }
    }

    /// Start a new current file: the spare if one is ready, else made now.
    fn roll(&self, st: &mut State) -> io::Result<()> {
        // A spare made before a file was created inline is older than it: not used.
        let newest = st.view.live.keys().next_back().copied().max(st.files.keys().next_back().copied());
        let spare = match self.spare.lock().unwrap().take() {
            Some((g, f)) if newest.is_none_or(|n| g > n) => Some((g, f)),
            Some((g, _)) => {
                let _ = fs::remove_file(file_path(&self.dir, g));
                None
            }
            None => None,
        };
        let (generation, file) = match spare {
            Some(s) => s,
            None => {
                let g = st.next_generation;
                st.next_generation += 1;
                (g, create_file(&self.dir, g, self.size, self.file_mode)?)
            }
        };
        st.view.live.entry(generation).or_default();
        st.files.insert(generation, Open { file: Arc::new(file), written: 0, synced: 0 });
        st.current = Some(generation);
        st.compact_due |= !sparse(&st.view, Some(generation), self.size).is_empty();
        self.retire(st);
        // The next one, off the commit path (one at a time; its generation is above every
        // file made so far).
        let mut jobs = self.spare_jobs.lock().unwrap();
        jobs.retain(|h| !h.is_finished());
        if jobs.is_empty() && self.spare.lock().unwrap().is_none() {
            let (dir, g, size, mode, slot) =
                (self.dir.clone(), st.next_generation, self.size, self.file_mode, self.spare.clone());
            st.next_generation += 1;
            jobs.push(std::thread::spawn(move || match create_file(&dir, g, size, mode) {
                Ok(f) => *slot.lock().unwrap() = Some((g, f)),
                Err(e) => tracing::warn!("could not preallocate the next journal file: {e} (made when needed)"),
            }));
        }
        Ok(())
    }

    /// Append a record to the current file (rolling to a new one when it does not fit):
    /// its generation, offset and end.
    fn append(
        &self,
        st: &mut State,
        kind: u8,
        written: DateTime<Utc>,
        key: &str,
        data: &[u8],
    ) -> io::Result<(u64, u64, u64)> {
        let len = (HEADER + key.len() + data.len()) as u64;
        let fits = |st: &State| st.current.and_then(|g| st.files.get(&g)).is_some_and(|o| o.written + len <= self.size);
        if !fits(st) {
            self.roll(st)?;
        }
        let g = st.current.expect("a current file");
        let o = st.files.get_mut(&g).expect("the current file is open");
        let rec = encode(kind, g, written, key, data);
        let offset = o.written;
        if let Err(e) = o.file.write_all_at(&rec, offset) {
            // What this file holds past its last flush is unknown now: leave it.
            st.current = None;
            return Err(e);
        }
        o.written += rec.len() as u64;
        Ok((g, offset, o.written))
    }

    /// Make the records of `generation` up to `end` durable (a flush already done that covers
    /// them counts).
    fn flush_through(&self, generation: u64, end: u64) -> io::Result<()> {
        let _one = self.flush.lock().unwrap();
        let (file, target) = {
            let st = self.state.lock().unwrap();
            match st.files.get(&generation) {
                // Retired: nothing in it is live any more (deleted, or copied and flushed).
                None => return Ok(()),
                Some(o) if o.synced >= end => return Ok(()),
                Some(_) if st.failed.contains(&generation) => return Err(not_durable(&self.dir, generation)),
                Some(o) => (o.file.clone(), o.written),
            }
        };
        let r = file.sync_data();
        let mut st = self.state.lock().unwrap();
        match r {
            Ok(()) => {
                if let Some(o) = st.files.get_mut(&generation) {
                    o.synced = o.synced.max(target);
                }
                Ok(())
            }
            Err(e) => {
                tracing::error!("flush of journal file {} failed: {e}", file_path(&self.dir, generation).display());
                fail(&mut st, generation);
                // Forget what was not flushed: its puts fail and are retried into a new file.
                let synced = st.files.get(&generation).map_or(0, |o| o.synced);
                let lost: Vec<String> = st
                    .view
                    .entries
                    .iter()
                    .filter(|(_, x)| x.generation == generation && x.offset >= synced)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in lost {
                    st.view.remove(&k);
                }
                Err(e)
            }
        }
    }

    /// Journal a write-once object; returns once it is durable. `AlreadyExists` if the key is
    /// journaled (made durable first: a put whose caller gave up waiting may not be flushed
    /// yet, and its retry must not be told the object exists before it does).
    pub fn put(&self, key: &str, data: &[u8]) -> io::Result<()> {
        let written = Utc::now();
        let (generation, end) = {
            let mut st = self.state.lock().unwrap();
            if let Some(e) = st.view.entries.get(key).cloned() {
                drop(st);
                self.flush_through(e.generation, e.offset + e.record_len())?;
                return Err(io::Error::new(io::ErrorKind::AlreadyExists, "journaled"));
            }
            let (g, offset, end) = self.append(&mut st, PUT, written, key, data)?;
            let e = Entry { generation: g, offset, key_len: key.len() as u32, data_len: data.len() as u32, written };
            st.view.add(key.to_string(), e);
            (g, end)
        };
        self.flush_through(generation, end)?;
        if self.state.lock().unwrap().compact_due {
            if let Err(e) = self.compact() {
                tracing::warn!("could not compact the commit journal: {e} (tried again at the next new file)");
            }
        }
        Ok(())
    }

    /// Copy the live objects of older files into the current one, flush it, and retire the
    /// older files: a few chunks that never die (the last chunks of a timeline that ended) do
    /// not keep every later file. Done when a new file is started, after the put that started it.
    fn compact(&self) -> io::Result<()> {
        let _one = self.flush.lock().unwrap();
        let mut st = self.state.lock().unwrap();
        st.compact_due = false;
        let Some(current) = st.current else { return Ok(()) };
        let from = sparse(&st.view, Some(current), self.size);
        let old: Vec<(String, Entry)> = st
            .view
            .entries
            .iter()
            .filter(|(_, e)| e.generation < current && from.contains(&e.generation))
            .map(|(k, e)| (k.clone(), e.clone()))
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        let mut moved = Vec::new();
        let mut result = Ok(());
        for (k, e) in old {
            let data = match read(&self.dir, &k, &e) {
                Ok(d) => d,
                Err(err) => {
                    result = Err(err);
                    break;
                }
            };
            if st.files.get(&current).is_none_or(|o| o.written + e.record_len() > self.size) {
                break; // the rest waits for the next file
            }
            match self.append(&mut st, PUT, e.written, &k, &data) {
                Ok((g, offset, _)) => {
                    st.view.add(k.clone(), Entry { generation: g, offset, ..e.clone() });
                    moved.push((k, e));
                }
                Err(err) => {
                    result = Err(err);
                    break;
                }
            }
        }
        let Some(o) = st.files.get(&current) else { return result };
        let (file, target) = (o.file.clone(), o.written);
        drop(st);
        let r = file.sync_data();
        let mut st = self.state.lock().unwrap();
        match r {
            Ok(()) => {
                if let Some(o) = st.files.get_mut(&current) {
                    o.synced = o.synced.max(target);
                }
                self.retire(&mut st);
                result
            }
            Err(e) => {
                // The originals are still durable where they were.
                fail(&mut st, current);
                for (k, e) in moved {
                    st.view.add(k, e);
                }
                Err(e)
            }
        }
    }

    /// Forget journaled objects (tombstones appended, not flushed); returns the keys that were
    /// journaled.
    pub fn delete(&self, keys: &[String]) -> Vec<String> {
        let mut st = self.state.lock().unwrap();
        let now = Utc::now();
        let mut gone = Vec::new();
        for k in keys {
            if st.view.remove(k) {
                gone.push(k.clone());
                if let Err(e) = self.append(&mut st, DELETE, now, k, &[]) {
                    tracing::warn!(
                        "could not append a journal tombstone for {k}: {e} (a redundant chunk may reappear)"
                    );
                }
            }
        }
        self.retire(&mut st);
        gone
    }

    /// Journal files the writer knows of (tests, status).
    pub fn files(&self) -> Vec<u64> {
        self.state.lock().unwrap().view.live.keys().copied().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(root: &Path, size: u64) -> Journal {
        Journal::open(root, 0o700, 0o600, size).unwrap().expect("not held elsewhere")
    }

    #[test]
    fn put_scan_delete_and_retire() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path(), 4096);
        j.put("wal/a", b"alpha").unwrap();
        j.put("wal/b", b"beta").unwrap();
        assert_eq!(j.put("wal/a", b"alpha").unwrap_err().kind(), io::ErrorKind::AlreadyExists);
        let e = j.entry("wal/a").unwrap();
        assert_eq!(read(j.dir(), "wal/a", &e).unwrap(), b"alpha");
        // Another process's scan sees both.
        let v = scan(j.dir()).unwrap();
        assert_eq!(v.entries.keys().collect::<Vec<_>>(), ["wal/a", "wal/b"]);
        // Fill past one file: a second file, the first still live.
        for i in 0..40 {
            j.put(&format!("wal/c{i:02}"), &[i as u8; 100]).unwrap();
        }
        assert!(j.files().len() >= 2, "{:?}", j.files());
        assert_eq!(scan(j.dir()).unwrap().entries.len(), 42);
        // Deleting everything in the first file retires it; tombstones hide the rest.
        let keys: Vec<String> = scan(j.dir()).unwrap().entries.keys().cloned().collect();
        let first = j.files()[0];
        assert_eq!(j.delete(&keys).len(), 42);
        assert!(!file_path(j.dir(), first).exists());
        assert!(scan(j.dir()).unwrap().entries.is_empty());
        // A restarted writer finds nothing live and keeps no file; its files are newer.
        let before = generations(j.dir()).unwrap();
        drop(j);
        let j = open(dir.path(), 4096);
        assert!(j.entries("").is_empty());
        assert!(generations(j.dir()).unwrap().is_empty(), "{:?}", generations(j.dir()));
        j.put("wal/z", b"zeta").unwrap();
        assert!(before.iter().all(|&g| g < j.entry("wal/z").unwrap().generation));
    }

    #[test]
    fn a_chunk_that_never_dies_does_not_pin_later_files() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path(), 4096);
        j.put("wal/pinned", b"keep").unwrap();
        for i in 0..200 {
            let k = format!("wal/c{i:03}");
            j.put(&k, &[1u8; 100]).unwrap();
            j.delete(&[k]);
        }
        // About 30 KiB of records went through 4 KiB files: the pinned object was copied along.
        let on_disk = generations(j.dir()).unwrap();
        assert!(on_disk.len() <= 3, "current, its preallocated successor, one not compacted yet: {on_disk:?}");
        let v = scan(j.dir()).unwrap();
        assert_eq!(v.entries.keys().collect::<Vec<_>>(), ["wal/pinned"]);
        assert_eq!(read(j.dir(), "wal/pinned", &v.entries["wal/pinned"]).unwrap(), b"keep");
        drop(j);
        let j = open(dir.path(), 4096);
        assert!(j.entry("wal/pinned").is_some());
    }

    #[test]
    fn one_writer_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path(), 4096);
        assert!(Journal::open(dir.path(), 0o700, 0o600, 4096).unwrap().is_none(), "held by the first");
        drop(j);
        assert!(Journal::open(dir.path(), 0o700, 0o600, 4096).unwrap().is_some(), "free again");
    }

    #[test]
    fn torn_tail_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path(), 1 << 16);
        j.put("wal/x", b"one").unwrap();
        j.put("wal/y", b"two").unwrap();
        let g = j.files()[0];
        let e = j.entry("wal/y").unwrap();
        drop(j);
        // A write the crash cut short: the second record's data damaged.
        let f = fs::OpenOptions::new().write(true).open(file_path(&dir.path().join(DIR), g)).unwrap();
        f.write_all_at(b"X", e.offset + HEADER as u64 + e.key_len as u64).unwrap();
        let v = scan(&dir.path().join(DIR)).unwrap();
        assert_eq!(v.entries.keys().collect::<Vec<_>>(), ["wal/x"]);
        // The writer reopens: the valid object stays, new records go into a new file.
        let j = open(dir.path(), 1 << 16);
        assert!(j.entry("wal/x").is_some() && j.entry("wal/y").is_none());
        j.put("wal/y", b"two").unwrap();
        assert_ne!(j.entry("wal/y").unwrap().generation, g);
        // An object that exists as a file is the file's.
        fs::create_dir_all(dir.path().join("wal")).unwrap();
        fs::write(dir.path().join("wal/x"), b"one").unwrap();
        drop(j);
        let j = open(dir.path(), 1 << 16);
        assert!(j.entry("wal/x").is_none());
        assert!(!file_path(j.dir(), g).exists(), "the first file held nothing live: removed");
    }

    #[test]
    fn a_record_copied_into_another_file_does_not_validate() {
        let dir = tempfile::tempdir().unwrap();
        let j = open(dir.path(), 4096);
        j.put("wal/a", b"alpha").unwrap();
        let g = j.files()[0];
        drop(j);
        let jd = dir.path().join(DIR);
        let bytes = fs::read(file_path(&jd, g)).unwrap();
        fs::write(file_path(&jd, g + 5), &bytes).unwrap();
        fs::remove_file(file_path(&jd, g)).unwrap();
        assert!(scan(&jd).unwrap().entries.is_empty());
    }
}
