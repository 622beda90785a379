//! The embedded default: a repository in a local directory (`file:///path`).
//!
//! Key `a/b/c` is the file `ROOT/a/b/c`. A put writes `ROOT/.tmp/<random>`, fsyncs it, then
//! publishes it under its key and fsyncs the key's directory, so a crash leaves either the whole
//! object or none (and at worst a stray file in `ROOT/.tmp`, which is never listed).
//!
//! * [`PutMode::IfAbsent`] publishes with `link(2)`, which fails with `EEXIST` atomically when
//!   the name exists: two writers racing for one key cannot both win, and neither can clobber.
//! * [`PutMode::Overwrite`] publishes with `rename(2)`, atomic replacement.
//!
//! A read-only or permission error is permanent and says so with a hint; a full disk (`ENOSPC`)
//! is transient (space can be freed) and says so too; either way the partial temp file is
//! removed, and nothing already in the repository is touched.
//!
//! Modes: the archive holds every row of the database, so a repository directory the store
//! creates is `0700` and its files `0600`. An operator who wants a group to read it (PostgreSQL's
//! `restore_command` running as another user than the agent) makes the root directory
//! group-readable, usually setgid to that group (`chgrp postgres DIR; chmod 2750 DIR`): files
//! are then created `0640` and directories `0750` (with the setgid bit inherited), never
//! readable by others whatever the root's mode.
//!
//! Symlinks inside the repository are refused (reads and writes say so; listings skip them):
//! an archive directory is not a place to point elsewhere. The root itself may be a symlink.

use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};

use super::journal::{self, Journal};
use super::{validate_key, ByteStream, ObjectMeta, ObjectStore, PutMode, StorageError};

const TMP_DIR: &str = ".tmp";

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
    /// Modes for new directories and files (see the module doc).
    dir_mode: u32,
    file_mode: u32,
    /// The writer's journal (the agent in synchronous mode), see [`journal`].
    journal: Option<Arc<Journal>>,
    /// Whether puts go through [`Self::journal`] (otherwise only deletes do).
    journal_puts: bool,
    /// Another process's last scan of the journal.
    journal_cache: Arc<Mutex<Option<journal::View>>>,
}

/// Modes for new directories and files under a root of mode `root_mode`: owner-only, plus
/// group read (and traverse) when the root grants it; never anything for others.
fn modes_for(root_mode: u32) -> (u32, u32) {
    let group_read = root_mode & 0o040 != 0;
    if group_read {
        (0o750, 0o640)
    } else {
        (0o700, 0o600)
    }
}

impl LocalStore {
    fn new(root: PathBuf, dir_mode: u32, file_mode: u32) -> Self {
        LocalStore { root, dir_mode, file_mode, journal: None, journal_puts: false, journal_cache: Default::default() }
    }

    /// Open (creating if needed, mode 0700) a repository directory.
    pub fn open(root: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
        let root = if root.is_absolute() { root.to_path_buf() } else { std::env::current_dir()?.join(root) };
        let hint = |e: io::Error| {
            anyhow::anyhow!(
                "cannot create archive directory {}: {e}\nHINT: check that the path is writable by this user",
                root.display()
            )
        };
        fs::DirBuilder::new().recursive(true).mode(0o700).create(&root).map_err(hint)?;
        let mode = fs::metadata(&root).map_err(hint)?.permissions().mode();
        let (dir_mode, file_mode) = modes_for(mode);
        fs::DirBuilder::new().recursive(true).mode(dir_mode).create(root.join(TMP_DIR)).map_err(hint)?;
        Ok(LocalStore::new(root, dir_mode, file_mode))
    }

    /// Write WAL chunk objects (write-once, up to [`journal::MAX_DATA`] bytes; not segments,
    /// which stay for the retention period) through the commit journal: one `fdatasync` of a preallocated file per put
    /// instead of a new file and two file-system journal commits. For the agent in
    /// synchronous mode, the only writer of the archive; every reader sees the objects as it
    /// sees files (see [`journal`]).
    pub fn with_journal(self) -> anyhow::Result<Self> {
        self.with_journal_size(journal::FILE_SIZE)
    }

    /// [`Self::with_journal`] with journal files of `size` bytes (tests).
    pub fn with_journal_size(mut self, size: u64) -> anyhow::Result<Self> {
        let j = Journal::open(&self.root, self.dir_mode, self.file_mode, size).map_err(|e| {
            anyhow::anyhow!(
                "cannot open the commit journal in {}: {e}\nHINT: check that the archive directory is writable by this user",
                self.root.join(journal::DIR).display()
            )
        })?;
        match j {
            Some(j) => {
                self.journal = Some(Arc::new(j));
                self.journal_puts = true;
            }
            None => tracing::warn!(
                "another process holds the commit journal of {} (another walvault-agent on this archive?): writing chunks as files",
                self.root.display()
            ),
        }
        Ok(self)
    }

    /// Keep the journal's objects readable and deletable, but write new objects as files (the
    /// asynchronous agent, after a synchronous run).
    pub fn without_journal_puts(mut self) -> Self {
        self.journal_puts = false;
        self
    }

    /// The journal's writer, if this store has one.
    pub fn journal(&self) -> Option<&Journal> {
        self.journal.as_deref()
    }

    /// The live journaled object under `key`: the writer's own view, or (in another process)
    /// the cached scan, scanned again when the key is not in it.
    fn journaled(&self, key: &str) -> io::Result<Option<journal::Entry>> {
        if !crate::archive::names::is_chunk_key(key) {
            return Ok(None); // only chunks are ever journaled
        }
        if let Some(j) = &self.journal {
            return Ok(j.entry(key));
        }
        if let Some(e) = self.journal_cache.lock().unwrap().as_ref().and_then(|v| v.entries.get(key)) {
            return Ok(Some(e.clone()));
        }
        let dir = self.root.join(journal::DIR);
        if !dir.exists() {
            return Ok(None);
        }
        let v = journal::scan(&dir)?;
        let e = v.entries.get(key).cloned();
        *self.journal_cache.lock().unwrap() = Some(v);
        Ok(e)
    }

    /// A journaled object's bytes, if `key` is one.
    fn read_journaled(&self, key: &str) -> io::Result<Option<Vec<u8>>> {
        let dir = self.root.join(journal::DIR);
        for attempt in 0..2 {
            let Some(e) = self.journaled(key)? else { return Ok(None) };
            let stale = |k: io::ErrorKind| k == io::ErrorKind::NotFound || k == io::ErrorKind::InvalidData;
            match journal::read(&dir, key, &e) {
                Ok(d) => return Ok(Some(d)),
                // Retired (or compacted) since the cached scan: scan again.
                Err(err) if stale(err.kind()) && self.journal.is_none() && attempt == 0 => {
                    *self.journal_cache.lock().unwrap() = None;
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(None),
                Err(err) => return Err(err),
            }
        }
        Ok(None)
    }

    /// Journaled objects under `prefix` (a fresh scan in another process).
    fn journaled_list(&self, prefix: &str) -> io::Result<Vec<ObjectMeta>> {
        let wal = crate::archive::names::WAL_PREFIX;
        if !(prefix.starts_with(wal) || wal.starts_with(prefix)) {
            return Ok(Vec::new()); // only chunks are ever journaled
        }
        let entries = match &self.journal {
            Some(j) => j.entries(prefix),
            None => {
                let dir = self.root.join(journal::DIR);
                if !dir.exists() {
                    return Ok(Vec::new());
                }
                let v = journal::scan(&dir)?;
                let out = v
                    .entries
                    .range(prefix.to_string()..)
                    .take_while(|(k, _)| k.starts_with(prefix))
                    .map(|(k, e)| (k.clone(), e.clone()))
                    .collect();
                *self.journal_cache.lock().unwrap() = Some(v);
                out
            }
        };
        Ok(entries
            .into_iter()
            .map(|(key, e)| ObjectMeta { key, size: e.data_len as u64, last_modified: Some(e.written) })
            .collect())
    }

    /// Open an existing repository for reading; never creates anything (a reader may run as
    /// a user that cannot write there, e.g. PostgreSQL's restore_command).
    pub fn open_existing(root: &Path) -> anyhow::Result<Self> {
        let root = if root.is_absolute() { root.to_path_buf() } else { std::env::current_dir()?.join(root) };
        let mode = match std::fs::metadata(&root) {
            Ok(m) if m.is_dir() => {
                use std::os::unix::fs::PermissionsExt;
                m.permissions().mode()
            }
            Err(e) if e.kind() == io::ErrorKind::PermissionDenied => anyhow::bail!(
                "archive directory {} is not readable by this user\nHINT: it and its parent directories need r-x for this user",
                root.display()
            ),
            _ => anyhow::bail!(
                "archive directory {} does not exist\nHINT: check the archive URL (file:///path or a plain path)",
                root.display()
            ),
        };
        let (dir_mode, file_mode) = modes_for(mode);
        Ok(LocalStore::new(root, dir_mode, file_mode))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn path(&self, op: &'static str, key: &str) -> Result<PathBuf, StorageError> {
        validate_key(op, key)?;
        if key == TMP_DIR || key.starts_with(".tmp/") || key == journal::DIR || key.starts_with(".journal/") {
            return Err(StorageError::permanent(op, key, "key reserved for temporary files and the journal"));
        }
        // No component below the root may be a symlink (a missing one is fine: not created yet).
        let mut p = self.root.clone();
        for c in key.split('/') {
            p.push(c);
            match fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(StorageError::Permanent {
                        op,
                        key: key.to_string(),
                        message: format!("{} is a symbolic link inside the archive", p.display()),
                        hint: Some("walvault never follows links inside an archive directory; replace the link by the directory or file itself".into()),
                    })
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
        Ok(self.root.join(key))
    }
}

/// Map an I/O error to the storage error a caller branches on.
fn io_err(op: &'static str, key: &str, e: io::Error) -> StorageError {
    if matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT)) {
        // Space can be freed: a writer that may wait (the WAL uploader) retries.
        return StorageError::transient(
            op,
            key,
            format!("{e}\nHINT: the archive's file system is full: free space or move the archive"),
        );
    }
    let hint = match e.raw_os_error() {
        Some(libc::EACCES) | Some(libc::EPERM) => Some(if op == "put" || op == "delete" {
            "the archive directory is not writable by this user"
        } else {
            "the archive directory is not readable by this user (it and its parents need r-x for it)"
        }),
        Some(libc::EROFS) => Some("the archive's file system is mounted read-only"),
        _ => None,
    };
    match (e.kind(), hint) {
        (io::ErrorKind::NotFound, _) => StorageError::NotFound { op, key: key.to_string() },
        (_, Some(h)) => {
            StorageError::Permanent { op, key: key.to_string(), message: e.to_string(), hint: Some(h.into()) }
        }
        _ => StorageError::transient(op, key, e),
    }
}

/// Publish a complete, fsynced temp file under `dest`; new directories get `dir_mode`.
fn publish(tmp: &Path, dest: &Path, mode: PutMode, dir_mode: u32) -> io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    let parent = dest.parent().expect("key paths have a parent");
    // A concurrent delete may remove the (empty) parent between our mkdir and link: retry.
    let mut attempt = 0;
    loop {
        fs::DirBuilder::new().recursive(true).mode(dir_mode).create(parent)?;
        let r = match mode {
            PutMode::Overwrite => fs::rename(tmp, dest),
            PutMode::IfAbsent => fs::hard_link(tmp, dest),
        };
        match r {
            Err(e) if e.kind() == io::ErrorKind::NotFound && attempt < 3 && tmp.exists() => attempt += 1,
            r => {
                if mode == PutMode::IfAbsent {
                    let _ = fs::remove_file(tmp);
                }
                r?;
                break;
            }
        }
    }
    crate::fsutil::fsync_dir(parent)
}

fn temp_path(root: &Path) -> PathBuf {
    root.join(TMP_DIR).join(format!("{:016x}{:08x}", rand::random::<u64>(), std::process::id()))
}

/// Remove the temp file if the guarded operation did not publish it.
struct TempGuard(PathBuf);
impl Drop for TempGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn put_blocking(store: &LocalStore, key: &str, dest: &Path, data: &[u8], mode: PutMode) -> io::Result<()> {
    if mode == PutMode::IfAbsent && store.journal.is_none() && store.journaled(key)?.is_some() {
        // A chunk journaled by the agent (this store does not write the journal): write-once
        // holds across processes too.
        return Err(io::Error::new(io::ErrorKind::AlreadyExists, "journaled"));
    }
    if let (Some(j), PutMode::IfAbsent) = (&store.journal, mode) {
        let exists = || io::Error::new(io::ErrorKind::AlreadyExists, "exists");
        if j.entry(key).is_some() {
            return Err(exists());
        }
        if store.journal_puts && crate::archive::names::is_chunk_key(key) && j.takes(key, data.len()) {
            if fs::symlink_metadata(dest).is_ok() {
                return Err(exists());
            }
            return j.put(key, data);
        }
    }
    let tmp = temp_path(&store.root);
    let _guard = TempGuard(tmp.clone());
    crate::fsutil::write_new(&tmp, data, store.file_mode)?;
    publish(&tmp, dest, mode, store.dir_mode)
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn url(&self) -> String {
        format!("file://{}", self.root.display())
    }

    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), StorageError> {
        // A journaled chunk creates no file: the key is checked, not walked for links (the
        // existence check below does not follow one).
        let journaled = self.journal_puts
            && mode == PutMode::IfAbsent
            && crate::archive::names::is_chunk_key(key)
            && self.journal.as_ref().is_some_and(|j| j.takes(key, data.len()));
        let dest = if journaled {
            validate_key("put", key)?;
            self.root.join(key)
        } else {
            self.path("put", key)?
        };
        let map = |e: io::Error| match e.kind() {
            io::ErrorKind::AlreadyExists => StorageError::AlreadyExists { op: "put", key: key.to_string() },
            _ => io_err("put", key, e),
        };
        if journaled {
            // On the caller's thread, as pg_receivewal writes and flushes on its only one: a
            // journaled put is one `pwrite` and one `fdatasync`, and the hop to a blocking
            // thread and back cost two wake-ups per group of commits on a busy host (perf and
            // strace of the agent at 16 synchronous clients). The caller's runtime waits for
            // the flush meanwhile (and, at a new journal file, for its compaction); what
            // arrives in the socket then goes in the next group. A caller's timeout cannot
            // interrupt it: a flush that hangs holds the caller until it returns.
            return put_blocking(self, key, &dest, &data, mode).map_err(map);
        }
        let store = self.clone();
        let k = key.to_string();
        tokio::task::spawn_blocking(move || put_blocking(&store, &k, &dest, &data, mode))
            .await
            .map_err(|e| StorageError::transient("put", key, e))?
            .map_err(map)
    }

    async fn put_stream(&self, key: &str, mut data: ByteStream, mode: PutMode) -> Result<u64, StorageError> {
        let dest = self.path("put", key)?;
        if mode == PutMode::IfAbsent && self.journal.as_ref().is_some_and(|j| j.entry(key).is_some()) {
            return Err(StorageError::AlreadyExists { op: "put", key: key.to_string() });
        }
        let tmp = temp_path(&self.root);
        let guard = TempGuard(tmp.clone());
        let mut f = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(self.file_mode)
            .open(&tmp)
            .await
            .map_err(|e| io_err("put", key, e))?;
        let mut n = 0u64;
        while let Some(chunk) = data.try_next().await? {
            tokio::io::AsyncWriteExt::write_all(&mut f, &chunk).await.map_err(|e| io_err("put", key, e))?;
            n += chunk.len() as u64;
        }
        f.sync_all().await.map_err(|e| io_err("put", key, e))?;
        drop(f);
        let k = key.to_string();
        let dir_mode = self.dir_mode;
        tokio::task::spawn_blocking(move || {
            let r = publish(&tmp, &dest, mode, dir_mode);
            drop(guard);
            r
        })
        .await
        .map_err(|e| StorageError::transient("put", &k, e))?
        .map_err(|e| match e.kind() {
            io::ErrorKind::AlreadyExists => StorageError::AlreadyExists { op: "put", key: k.clone() },
            _ => io_err("put", &k, e),
        })?;
        Ok(n)
    }

    async fn get_stream(&self, key: &str) -> Result<ByteStream, StorageError> {
        let path = self.path("get", key)?;
        let f = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let (store, k) = (self.clone(), key.to_string());
                let d = tokio::task::spawn_blocking(move || store.read_journaled(&k))
                    .await
                    .map_err(|e| StorageError::transient("get", key, e))?
                    .map_err(|e| io_err("get", key, e))?;
                return match d {
                    Some(d) => Ok(futures::stream::once(async move { Ok(Bytes::from(d)) }).boxed()),
                    None => Err(StorageError::NotFound { op: "get", key: key.to_string() }),
                };
            }
            Err(e) => return Err(io_err("get", key, e)),
        };
        let k = key.to_string();
        Ok(tokio_util::io::ReaderStream::with_capacity(f, 1 << 20).map_err(move |e| io_err("get", &k, e)).boxed())
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StorageError> {
        let path = self.path("get", key)?;
        let k = key.to_string();
        let (store, jk) = (self.clone(), k.clone());
        tokio::task::spawn_blocking(move || -> io::Result<Bytes> {
            let mut f = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let d = store.read_journaled(&jk)?.ok_or(e)?;
                    let end = (range.end as usize).min(d.len());
                    let start = (range.start as usize).min(end);
                    return Ok(Bytes::from(d).slice(start..end));
                }
                Err(e) => return Err(e),
            };
            let size = f.metadata()?.len();
            let end = range.end.min(size);
            let start = range.start.min(end);
            f.seek(SeekFrom::Start(start))?;
            let mut buf = vec![0u8; (end - start) as usize];
            f.read_exact(&mut buf)?;
            Ok(buf.into())
        })
        .await
        .map_err(|e| StorageError::transient("get", &k, e))?
        .map_err(|e| io_err("get", &k, e))
    }

    async fn head(&self, key: &str) -> Result<ObjectMeta, StorageError> {
        let path = self.path("head", key)?;
        let md = match tokio::fs::metadata(&path).await {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                let (store, k) = (self.clone(), key.to_string());
                let entry = tokio::task::spawn_blocking(move || {
                    // Another process's cached scan may be stale: the record is read (and
                    // checked) before it is reported.
                    if store.journal.is_none() && store.read_journaled(&k)?.is_none() {
                        return Ok(None);
                    }
                    store.journaled(&k)
                })
                .await
                .map_err(|e| StorageError::transient("head", key, e))?
                .map_err(|e| io_err("head", key, e))?;
                return match entry {
                    Some(e) => {
                        Ok(ObjectMeta { key: key.to_string(), size: e.data_len as u64, last_modified: Some(e.written) })
                    }
                    None => Err(StorageError::NotFound { op: "head", key: key.to_string() }),
                };
            }
            r => r.map_err(|e| io_err("head", key, e))?,
        };
        if !md.is_file() {
            return Err(StorageError::NotFound { op: "head", key: key.to_string() });
        }
        Ok(ObjectMeta {
            key: key.to_string(),
            size: md.len(),
            last_modified: md.modified().ok().map(chrono::DateTime::from),
        })
    }

    fn list(&self, prefix: &str) -> BoxStream<'_, Result<ObjectMeta, StorageError>> {
        let store = self.clone();
        let prefix = prefix.to_string();
        futures::stream::once(async move {
            let p = prefix.clone();
            tokio::task::spawn_blocking(move || {
                // The journal first, then the files: an object retired from the journal
                // between the two was deleted, never moved (see `journal`).
                let journaled = store.journaled_list(&p)?;
                let mut files = list_blocking(&store.root, &p)?;
                if !journaled.is_empty() {
                    let names: std::collections::HashSet<String> = files.iter().map(|m| m.key.clone()).collect();
                    files.extend(journaled.into_iter().filter(|m| !names.contains(&m.key)));
                    files.sort_by(|a, b| a.key.cmp(&b.key));
                }
                Ok(files)
            })
            .await
            .map_err(|e| StorageError::transient("list", &prefix, e))?
            .map_err(|e| io_err("list", &prefix, e))
        })
        .map_ok(|v| futures::stream::iter(v.into_iter().map(Ok)))
        .try_flatten()
        .boxed()
    }

    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        let root = self.root.clone();
        let mut paths = Vec::with_capacity(keys.len());
        for k in keys {
            paths.push((k.clone(), self.path("delete", k)?));
        }
        let journal = self.journal.clone();
        let all: Vec<String> = keys.to_vec();
        tokio::task::spawn_blocking(move || {
            if let Some(j) = journal {
                j.delete(&all);
            }
            let mut dirs = std::collections::BTreeSet::new();
            for (k, p) in paths {
                match fs::remove_file(&p) {
                    Ok(()) => {
                        dirs.insert(p.parent().map(Path::to_path_buf));
                    }
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                    Err(e) => return Err(io_err("delete", &k, e)),
                }
            }
            for d in dirs.into_iter().flatten() {
                // Remove directories left empty (a deleted backup, a timeline's last segment),
                // up to the root; a directory that is not empty stops the climb.
                let mut cur = d.clone();
                while cur.starts_with(&root) && cur != root && std::fs::remove_dir(&cur).is_ok() {
                    match cur.parent() {
                        Some(p) => cur = p.to_path_buf(),
                        None => break,
                    }
                }
                let _ = crate::fsutil::fsync_dir(if cur.exists() { &cur } else { &root });
            }
            Ok(())
        })
        .await
        .map_err(|e| StorageError::transient("delete", "", e))?
    }
}

/// Every file under `root` whose key starts with `prefix`, sorted by key bytes (as S3 lists).
fn list_blocking(root: &Path, prefix: &str) -> io::Result<Vec<ObjectMeta>> {
    // Start the walk at the deepest directory the prefix names in full.
    let start_rel = match prefix.rfind('/') {
        Some(i) => &prefix[..i],
        None => "",
    };
    let mut out = Vec::new();
    let mut stack = vec![(root.join(start_rel), start_rel.to_string())];
    while let Some((dir, rel)) = stack.pop() {
        let rd = match fs::read_dir(&dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound || e.raw_os_error() == Some(libc::ENOTDIR) => continue,
            Err(e) => return Err(e),
        };
        for ent in rd {
            let ent = ent?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if rel.is_empty() && (name == TMP_DIR || name == journal::DIR) {
                continue;
            }
            let key = if rel.is_empty() { name.to_string() } else { format!("{rel}/{name}") };
            let ft = ent.file_type()?;
            if ft.is_dir() {
                // Only descend where keys under it could match the prefix.
                let as_dir = format!("{key}/");
                if as_dir.starts_with(prefix) || prefix.starts_with(&as_dir) {
                    stack.push((ent.path(), key));
                }
            } else if ft.is_file() && key.starts_with(prefix) {
                let md = match ent.metadata() {
                    Ok(md) => md,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => continue, // deleted meanwhile
                    Err(e) => return Err(e),
                };
                out.push(ObjectMeta {
                    key,
                    size: md.len(),
                    last_modified: md.modified().ok().map(chrono::DateTime::from),
                });
            }
        }
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}
