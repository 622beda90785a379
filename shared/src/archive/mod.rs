//! The archive: what is stored, under which names, in which envelope, and the one way each is
//! read back and written.
//!
//! * [`names`]: the catalogue of object names (grammar and examples); nothing else builds a key.
//! * [`envelope`]: the versioned, checksummed, compressed, optionally signed container every
//!   object is stored in.
//! * [`sign`]: the agent's Ed25519 signing key and the readers' verify key.
//! * [`crypt`]: encryption at rest: epoch keys wrapped to age recipients, the per-object AEAD.
//! * [`identity`]: the repository's identity stamp, which keeps WAL of one cluster out of
//!   another cluster's archive.
//! * [`walcat`]: what WAL an archive holds (a catalogue of one listing) and WAL object metadata.
//! * [`backup`]: base backup descriptions and listing.
//! * [`drills`]: the records restore drills leave in the archive.
//! * [`index`]: the commit index the RPO audit reads first.
//! * [`read`]: [`read::Reader`], bounded and verified reads, WAL ranges, chunk records.
//! * [`write`]: [`write::Writer`], sealed write-once puts with the split-brain check.

pub mod backup;
pub mod crypt;
pub mod drills;
pub mod envelope;
pub mod identity;
pub mod index;
pub mod lease;
pub mod names;
pub mod read;
pub mod sign;
pub mod walcat;
pub mod write;

pub use write::{PutOnceError, PutOutcome};
