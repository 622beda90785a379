//! A fault-injecting wrapper around any [`ObjectStore`], for crash and retry tests.
//!
//! Faults apply to every operation (optionally only to some, by name: `put`, `get`, `head`,
//! `list`, `delete`):
//! * [`FaultyStore::fail_next`]: the next N calls fail with a transient error *before* reaching
//!   the inner store (nothing happens);
//! * [`FaultyStore::fail_next_after`]: the next N calls reach the inner store and then report a
//!   timeout: the write happened but the caller cannot know (an indeterminate outcome);
//! * [`FaultyStore::fail_with_probability`]: each call fails with probability p;
//! * [`FaultyStore::hang`]: calls block until the hang is lifted (or the caller gives up);
//! * [`FaultyStore::list_lag`]: listings leave out objects written less than a given time ago
//!   (an eventually consistent listing); reads of those objects still succeed.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt;

use super::{ByteStream, ObjectMeta, ObjectStore, PutMode, StorageError};

#[derive(Default, Debug)]
struct Faults {
    fail_before: u32,
    fail_after: u32,
    probability: f64,
    only_ops: Option<HashSet<&'static str>>,
    list_lag: Option<std::time::Duration>,
}

#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: Mutex<Faults>,
    hang: tokio::sync::watch::Sender<bool>,
    injected: AtomicU64,
    /// Keys written recently and when (for `list_lag`); entries older than a minute are pruned.
    written: Mutex<Vec<(String, std::time::Instant)>>,
}

enum Injection {
    None,
    Before(StorageError),
    After,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Self {
        FaultyStore {
            inner,
            faults: Mutex::default(),
            hang: tokio::sync::watch::channel(false).0,
            injected: AtomicU64::new(0),
            written: Mutex::default(),
        }
    }
    pub fn fail_next(&self, n: u32) {
        self.faults.lock().unwrap().fail_before = n;
    }
    pub fn fail_next_after(&self, n: u32) {
        self.faults.lock().unwrap().fail_after = n;
    }
    pub fn fail_with_probability(&self, p: f64) {
        self.faults.lock().unwrap().probability = p.clamp(0.0, 1.0);
    }
    /// Restrict faults to these operations (`None`: all).
    pub fn only_ops(&self, ops: Option<&[&'static str]>) {
        self.faults.lock().unwrap().only_ops = ops.map(|o| o.iter().copied().collect());
    }
    /// Listings leave out what was written less than `lag` ago (`None`: listings are current).
    pub fn list_lag(&self, lag: Option<std::time::Duration>) {
        self.faults.lock().unwrap().list_lag = lag;
    }
    fn note_written(&self, key: &str) {
        let now = std::time::Instant::now();
        let mut w = self.written.lock().unwrap();
        w.retain(|(_, t)| now.duration_since(*t) < std::time::Duration::from_secs(60));
        w.push((key.to_string(), now));
    }
    fn hidden_from_listing(&self) -> HashSet<String> {
        let Some(lag) = self.faults.lock().unwrap().list_lag else { return HashSet::new() };
        let now = std::time::Instant::now();
        self.written
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, t)| now.duration_since(*t) < lag)
            .map(|(k, _)| k.clone())
            .collect()
    }
    pub fn hang(&self, on: bool) {
        self.hang.send_replace(on);
    }
    pub fn clear(&self) {
        *self.faults.lock().unwrap() = Faults::default();
        self.hang(false);
    }
    /// How many faults have been injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    async fn enter(&self, op: &'static str, key: &str) -> Injection {
        let mut rx = self.hang.subscribe();
        while *rx.borrow_and_update() {
            if rx.changed().await.is_err() {
                break;
            }
        }
        let mut f = self.faults.lock().unwrap();
        if f.only_ops.as_ref().is_some_and(|o| !o.contains(op)) {
            return Injection::None;
        }
        let inj = if f.fail_before > 0 {
            f.fail_before -= 1;
            Injection::Before(StorageError::transient(op, key, "injected fault"))
        } else if f.fail_after > 0 {
            f.fail_after -= 1;
            Injection::After
        } else if f.probability > 0.0 && rand::random::<f64>() < f.probability {
            Injection::Before(StorageError::transient(op, key, "injected fault (random)"))
        } else {
            Injection::None
        };
        if !matches!(inj, Injection::None) {
            self.injected.fetch_add(1, Ordering::SeqCst);
        }
        inj
    }

    async fn wrap<T>(
        &self,
        op: &'static str,
        key: &str,
        call: impl std::future::Future<Output = Result<T, StorageError>>,
    ) -> Result<T, StorageError> {
        match self.enter(op, key).await {
            Injection::Before(e) => Err(e),
            Injection::None => call.await,
            Injection::After => {
                call.await?;
                Err(StorageError::Timeout { op, key: key.to_string() })
            }
        }
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    fn url(&self) -> String {
        self.inner.url()
    }
    async fn put(&self, key: &str, data: Bytes, mode: PutMode) -> Result<(), StorageError> {
        self.note_written(key);
        self.wrap("put", key, self.inner.put(key, data, mode)).await
    }
    async fn put_stream(&self, key: &str, data: ByteStream, mode: PutMode) -> Result<u64, StorageError> {
        self.note_written(key);
        self.wrap("put", key, self.inner.put_stream(key, data, mode)).await
    }
    async fn get_stream(&self, key: &str) -> Result<ByteStream, StorageError> {
        self.wrap("get", key, self.inner.get_stream(key)).await
    }
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes, StorageError> {
        self.wrap("get", key, self.inner.get_range(key, range)).await
    }
    async fn head(&self, key: &str) -> Result<ObjectMeta, StorageError> {
        self.wrap("head", key, self.inner.head(key)).await
    }
    fn list(&self, prefix: &str) -> BoxStream<'_, Result<ObjectMeta, StorageError>> {
        let prefix = prefix.to_string();
        futures::stream::once(async move {
            match self.enter("list", &prefix).await {
                Injection::Before(e) => futures::stream::once(async { Err(e) }).boxed(),
                _ => {
                    let hidden = self.hidden_from_listing();
                    self.inner
                        .list(&prefix)
                        .filter(move |r| futures::future::ready(!matches!(r, Ok(m) if hidden.contains(&m.key))))
                        .boxed()
                }
            }
        })
        .flatten()
        .boxed()
    }
    async fn delete(&self, keys: &[String]) -> Result<(), StorageError> {
        let first = keys.first().cloned().unwrap_or_default();
        self.wrap("delete", &first, self.inner.delete(keys)).await
    }
}

/// Faults driven from outside the process, for integration tests of the agent: the file at
/// `path` is read every 100 ms and, when its content changes, applied to a [`FaultyStore`]
/// around `inner`. One command per file:
/// * empty or absent: no faults;
/// * `fail P [OP…]`: each call (of the operations named: put, get, head, list, delete) fails
///   with probability P;
/// * `fail-next N [OP…]`: the next N calls fail before reaching the store;
/// * `fail-after N [OP…]`: the next N calls reach the store, then report a timeout;
/// * `hang`: every call blocks until the file changes;
/// * `list-lag SECONDS`: listings leave out objects written less than SECONDS ago.
///
/// Once a command is in force, its text is written to [`applied_path`] (tests await that).
///
/// The binaries honour `WALVAULT_TEST_FAULTS` only in debug builds (what the tests run).
pub fn controlled_by_file(inner: Arc<dyn ObjectStore>, path: std::path::PathBuf) -> Arc<dyn ObjectStore> {
    let store = Arc::new(FaultyStore::new(inner));
    let weak = Arc::downgrade(&store);
    tokio::spawn(async move {
        let mut last: Option<String> = None;
        loop {
            let Some(store) = weak.upgrade() else { return };
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if last.as_deref() != Some(text.as_str()) {
                store.clear();
                if let Err(e) = apply_command(&store, text.trim()) {
                    tracing::error!("{}: {e}", path.display());
                }
                // Tell the test the command is in force (it waits for this, not for a time).
                let _ = std::fs::write(applied_path(&path), text.trim());
                last = Some(text);
            }
            drop(store);
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    });
    store
}

/// Where [`controlled_by_file`] writes the command it has just put in force: the fault file's
/// path with `.applied` appended.
pub fn applied_path(path: &std::path::Path) -> std::path::PathBuf {
    let mut p = path.as_os_str().to_owned();
    p.push(".applied");
    p.into()
}

fn apply_command(store: &FaultyStore, cmd: &str) -> Result<(), String> {
    let mut w = cmd.split_whitespace();
    let Some(verb) = w.next() else { return Ok(()) };
    let arg = if verb == "hang" { None } else { w.next() };
    if verb == "list-lag" {
        let secs = arg.and_then(|x| x.parse::<f64>().ok()).ok_or("list-lag: a number of seconds is missing")?;
        store.list_lag(Some(std::time::Duration::from_secs_f64(secs)));
        return Ok(());
    }
    let ops: Vec<&'static str> = w
        .map(|o| match o {
            "put" => Ok("put"),
            "get" => Ok("get"),
            "head" => Ok("head"),
            "list" => Ok("list"),
            "delete" => Ok("delete"),
            o => Err(format!("unknown operation {o:?}")),
        })
        .collect::<Result<_, _>>()?;
    store.only_ops(if ops.is_empty() { None } else { Some(&ops) });
    let num = |a: Option<&str>| a.and_then(|x| x.parse::<f64>().ok()).ok_or(format!("{verb}: a number is missing"));
    match verb {
        "fail" => store.fail_with_probability(num(arg)?),
        "fail-next" => store.fail_next(num(arg)? as u32),
        "fail-after" => store.fail_next_after(num(arg)? as u32),
        "hang" => store.hang(true),
        v => return Err(format!("unknown fault command {v:?}")),
    }
    Ok(())
}
