//! `walvault-shared`: the archive's vocabulary, used by `walvault-agent` and `walvault-recover`.
//!
//! * [`lsn`]: [`lsn::Lsn`], timelines, segment numbers; segment size always a parameter.
//! * [`wal`]: WAL file names and timeline history files, as PostgreSQL spells them.
//! * [`walreader`]: WAL page/record reader that finds commits, aborts and restore points.
//! * [`archive`]: object names, the object envelope and its signatures, repository identity,
//!   backups, the commit index, and the one layer that reads the archive back
//!   ([`archive::read`]) and the one that writes it ([`archive::write`]).
//! * [`storage`]: the [`storage::ObjectStore`] trait, local-directory and S3 backends, a
//!   fault-injecting wrapper, the retry helper.
//! * [`time`]: how times are stored (RFC 3339, µs) and PostgreSQL's epoch.
//! * [`exit`]: the exit codes both binaries share.
//! * [`fsutil`]: crash-safe file writes.
#![deny(unsafe_code)]

pub mod archive;
pub mod cligen;
pub mod exit;
pub mod fsutil;
pub mod lsn;
pub mod storage;
pub mod time;
pub mod wal;
pub mod walreader;
