//! Exit codes both binaries share: 0 success, 1 failure, 2 usage or configuration error.
//!
//! `main() -> ExitCode` calls `run() -> anyhow::Result<ExitCode>`; an error is printed once
//! with its context chain and hints (`{:#}`), and mapped to its code by [`code_of`]: a
//! [`UsageError`] anywhere in the chain is 2, anything else 1. Subcommands with their own
//! codes (`wal-fetch`, `audit`, `verify`) return them from `run` as `Ok(code)`.

use std::process::ExitCode;

/// A bad flag value or configuration the argument parser could not catch: exit 2.
#[derive(Debug)]
pub struct UsageError(pub anyhow::Error);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:#}", self.0)
    }
}

impl std::error::Error for UsageError {}

/// Wrap any error as a usage error.
pub fn usage<E: Into<anyhow::Error>>(e: E) -> anyhow::Error {
    anyhow::Error::new(UsageError(e.into()))
}

/// The exit code for an error.
pub fn code_of(e: &anyhow::Error) -> ExitCode {
    if e.chain().any(|c| c.downcast_ref::<UsageError>().is_some()) {
        ExitCode::from(2)
    } else {
        ExitCode::from(1)
    }
}
