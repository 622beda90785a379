//! The archive: what is stored, under which names, in which envelope.
//!
//! * [`names`]: the catalogue of object names (grammar and examples).
//! * [`envelope`]: the versioned, checksummed, compressed container every object is stored in.
//! * [`identity`]: the repository's identity stamp, which keeps WAL of one cluster out of
//!   another cluster's archive.

pub mod envelope;
pub mod identity;
pub mod names;
