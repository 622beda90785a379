//! The one retry helper: exponential backoff with full jitter, retrying only what
//! [`StorageError::is_permanent`] says may succeed on another try.
//!
//! Callers that must never give up (the WAL uploader: the slot holds WAL while the archive is
//! down) pass `max_attempts: None` and watch [`RetryPolicy::on_retry`] logs; callers with a user
//! waiting pass a bound.

use std::future::Future;
use std::time::Duration;

use super::StorageError;

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub initial: Duration,
    pub max: Duration,
    /// `None`: retry transient errors forever.
    pub max_attempts: Option<u32>,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(30), max_attempts: Some(10) }
    }
}

impl RetryPolicy {
    /// Delay before attempt `attempt + 1` (attempt counts from 1): uniform in
    /// `[0, min(max, initial * 2^(attempt-1))]` ("full jitter").
    pub fn delay(&self, attempt: u32) -> Duration {
        let exp = self.initial.saturating_mul(1u32 << attempt.saturating_sub(1).min(20));
        let cap = exp.min(self.max);
        cap.mul_f64(rand::random::<f64>())
    }

    /// Run `f` until it succeeds, fails permanently, or attempts run out. Each retry is logged
    /// at WARN with `what`.
    pub async fn run<T, F, Fut>(&self, what: &str, mut f: F) -> Result<T, StorageError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, StorageError>>,
    {
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if e.is_permanent() => return Err(e),
                Err(e) if self.max_attempts.is_some_and(|m| attempt >= m) => return Err(e),
                Err(e) => {
                    let d = self.delay(attempt);
                    tracing::warn!(attempt, delay_ms = d.as_millis() as u64, "{what}: {e}; retrying");
                    tokio::time::sleep(d).await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn retries_transient_then_succeeds() {
        let p = RetryPolicy { initial: Duration::from_millis(1), max: Duration::from_millis(2), max_attempts: Some(5) };
        let n = AtomicU32::new(0);
        let r = p
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
        let p = RetryPolicy { initial: Duration::from_millis(1), max: Duration::from_millis(2), max_attempts: Some(3) };
        let n = AtomicU32::new(0);
        let r: Result<(), _> = p
            .run("t", || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err(StorageError::NotFound { op: "get", key: "k".into() })
            })
            .await;
        assert!(r.unwrap_err().is_not_found());
        assert_eq!(n.load(Ordering::SeqCst), 1);
        n.store(0, Ordering::SeqCst);
        let r: Result<(), _> = p
            .run("t", || async {
                n.fetch_add(1, Ordering::SeqCst);
                Err(StorageError::Timeout { op: "put", key: "k".into() })
            })
            .await;
        assert!(matches!(r, Err(StorageError::Timeout { .. })));
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn delay_is_bounded() {
        let p = RetryPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(1), max_attempts: None };
        for a in 1..100 {
            assert!(p.delay(a) <= Duration::from_secs(1));
        }
    }
}
