//! The one retry helper: exponential backoff with full jitter, a classifier that says what may
//! succeed on another try, a bound (or none), and cancellation.
//!
//! * [`RetryPolicy::retry`] is the general form: any error type, a `retryable` classifier, and a
//!   [`CancellationToken`] that ends the wait between attempts (and the attempt itself) at once.
//! * [`RetryPolicy::run`] is the storage form: retries what [`StorageError::is_permanent`] says
//!   may succeed, not cancellable.
//! * [`RetryPolicy::delay`] alone serves loops that do more than call one function between
//!   attempts (the agent's reconnect loop).
//!
//! Callers that must never give up (the WAL uploader: the slot holds WAL while the archive is
//! down) pass `max_attempts: None` and a token, so that shutdown can still end them; callers with
//! a user waiting pass a bound. Each retry is logged at WARN with what was being done.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::StorageError;

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// `None`: retry retryable errors forever (until cancelled).
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(30), max_attempts: Some(10) }
    }
}

/// Why [`RetryPolicy::retry`] stopped without a result.
#[derive(Debug, thiserror::Error)]
pub enum RetryError<E> {
    /// The token was cancelled; the last error, if an attempt had failed.
    #[error("cancelled")]
    Cancelled(Option<E>),
    /// Not retryable, or out of attempts: the last error.
    #[error(transparent)]
    Failed(E),
}

impl<E> RetryError<E> {
    pub fn into_inner(self) -> Option<E> {
        match self {
            RetryError::Cancelled(e) => e,
            RetryError::Failed(e) => Some(e),
        }
    }
}

impl RetryPolicy {
    /// Forever, from 200 ms up to 10 s between attempts: for work that must not be given up.
    pub fn forever() -> Self {
        RetryPolicy { initial: Duration::from_millis(200), max: Duration::from_secs(10), max_attempts: None }
    }

    /// `n` attempts with the default backoff.
    pub fn attempts(n: u32) -> Self {
        RetryPolicy { max_attempts: Some(n), ..Default::default() }
    }

    /// Delay before attempt `attempt + 1` (attempt counts from 1): uniform in
    /// `[0, min(max, initial * 2^(attempt-1))]` ("full jitter").
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let cap = exp.min(self.max);
        cap.mul_f64(rand::random::<f64>())
    }

    /// Run `f(attempt)` until it succeeds, fails with an error `retryable` rejects, attempts
    /// run out, or `cancel` fires (which also abandons an attempt in progress).
    pub async fn retry<T, E, F, Fut>(
        &self,
        what: &str,
        cancel: &CancellationToken,
        retryable: impl Fn(&E) -> bool,
        mut f: F,
    ) -> Result<T, RetryError<E>>
    where
        E: std::fmt::Display,
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let mut attempt = 0u32;
        let mut last = None;
        loop {
            attempt += 1;
            let r = tokio::select! {
                biased;
                _ = cancel.cancelled() => return Err(RetryError::Cancelled(last)),
                r = f(attempt) => r,
            };
            match r {
                Ok(v) => return Ok(v),
                Err(e) if !retryable(&e) => return Err(RetryError::Failed(e)),
                Err(e) if self.max_attempts.is_some_and(|m| attempt >= m) => return Err(RetryError::Failed(e)),
                Err(e) => {
                    let d = self.delay(attempt);
                    tracing::warn!(attempt, retry_in_ms = d.as_millis() as u64, "{what}: {e}; retrying");
                    last = Some(e);
                    tokio::select! {
                        biased;
                        _ = cancel.cancelled() => return Err(RetryError::Cancelled(last)),
                        _ = tokio::time::sleep(d) => {}
                    }
                }
            }
        }
    }

    /// Run a storage call until it succeeds, fails permanently, or attempts run out.
    pub async fn run<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StorageError>>,
    {
        let never = CancellationToken::new();
        self.retry(what, &never, |e: &StorageError| !e.is_permanent(), |_| f())
            .await
            .map_err(|e| e.into_inner().expect("not cancelled: an attempt failed"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn quick(n: u32) -> RetryPolicy {
        RetryPolicy { initial: Duration::from_millis(1), max: Duration::from_millis(2), max_attempts: Some(n) }
    }

    #[tokio::test]
    async fn retries_transient_then_succeeds() {
        let n = AtomicU32::new(0);
        let r = quick(5)
            .run("t", || async {
                if n.fetch_add(1, Ordering::SeqCst) < 3 {
                    Err(StorageError::transient("put", "k", "flaky"))
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(n.load(Ordering::SeqCst), 4);
    }

    #[tokio::test]
    async fn stops_on_permanent_and_on_limit() {
        let n = AtomicU32::new(0);
        let r: Result<(), _> = quick(3)
            .run("t", || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err(StorageError::NotFound { op: "get", key: "k".into() })
            })
            .await;
        assert!(r.unwrap_err().is_not_found());
        assert_eq!(n.load(Ordering::SeqCst), 1);
        n.store(0, Ordering::SeqCst);
        let r: Result<(), _> = quick(3)
            .run("t", || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err(StorageError::Timeout { op: "put", key: "k".into() })
            })
            .await;
        assert!(matches!(r, Err(StorageError::Timeout { .. })));
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn forever_ends_when_cancelled_even_mid_attempt() {
        let cancel = CancellationToken::new();
        let c2 = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            c2.cancel();
        });
        let policy =
            RetryPolicy { initial: Duration::from_millis(1), max: Duration::from_millis(5), max_attempts: None };
        let r: Result<(), RetryError<String>> = policy
            .retry(
                "t",
                &cancel,
                |_| true,
                |attempt| async move {
                    if attempt < 3 {
                        Err(format!("attempt {attempt} failed"))
                    } else {
                        std::future::pending().await // hangs: only cancellation ends it
                    }
                },
            )
            .await;
        match r {
            Err(RetryError::Cancelled(Some(e))) => assert_eq!(e, "attempt 2 failed"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn delay_is_bounded() {
        let p = RetryPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(1), max_attempts: None };
        for a in 1..100 {
            assert!(p.delay(a) <= Duration::from_secs(1));
        }
    }
}
