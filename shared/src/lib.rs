//! `walvault-shared`: the archive's vocabulary, used by `walvault-agent` and `walvault-recover`.
//!
//! * [`lsn`]: [`lsn::Lsn`], timelines, segment numbers; segment size always a parameter.
//! * [`wal`]: WAL file names and timeline history files, as PostgreSQL spells them.
//! * [`archive`]: object names, the object envelope, repository identity.
//! * [`walreader`]: WAL page/record reader that finds commits, aborts and restore points.
//! * [`storage`]: the [`storage::ObjectStore`] trait, local-directory and S3 backends, a
//!   fault-injecting wrapper, the retry helper.

pub mod archive;
pub mod lsn;
pub mod storage;
pub mod wal;
pub mod walreader;
