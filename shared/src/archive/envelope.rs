//! The envelope every archive object is stored in: a versioned header, metadata, and the
//! (compressed) content. The layout is documented, with a worked example, in
//! `docs/archive-format.md`; this module is its one implementation.
//!
//! ```text
//! offset size field
//!      0    4 magic "WVLT"
//!      4    2 format version, u16 LE (this code writes 1, reads 1)
//!      6    1 kind (ObjectKind)
//!      7    1 compression: 0 none, 1 zstd
//!      8    1 encryption: 0 none (values above 0 are reserved for encryption at rest)
//!      9    3 reserved, zero
//!     12    8 plain length: bytes of the content before compression, u64 LE
//!     20    4 crc32 (IEEE) of the plain content, u32 LE
//!     24    4 metadata length M, u32 LE (at most 16 MiB)
//!     28    8 payload length P: stored bytes after the metadata, u64 LE
//!     36    4 crc32 of the stored payload, u32 LE
//!     40    4 crc32 of bytes 0..40 followed by the metadata
//!     44    M metadata: UTF-8 JSON object, the kind's own fields
//!   44+M    P payload: the content, compressed as `compression` says
//! ```
//!
//! Reading checks, in order: magic, version, header crc (a flipped bit in the header or
//! metadata is caught before anything is trusted), reserved bytes, payload length and crc (any
//! flipped or missing stored byte is caught before decompressing), then the payload
//! decompresses to exactly `plain length` bytes (never more is allocated) whose crc32 matches.
//! Any failure is an [`EnvelopeError`] naming the object.

use std::io::Read;

use serde::{de::DeserializeOwned, Serialize};

pub const MAGIC: &[u8; 4] = b"WVLT";
pub const FORMAT_VERSION: u16 = 1;
pub const HEADER_LEN: usize = 44;
pub const MAX_METADATA_LEN: u32 = 16 << 20;

/// What an object holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[repr(u8)]
pub enum ObjectKind {
    /// Repository identity (`walvault.repository`).
    Identity = 1,
    /// A byte range of WAL inside one segment.
    WalChunk = 2,
    /// One whole WAL segment.
    WalSegment = 3,
    /// A timeline history file.
    History = 4,
    /// A part of a base backup's tar stream.
    BackupPart = 5,
    /// Metadata: backup descriptions, manifests, indexes.
    Metadata = 6,
}

impl ObjectKind {
    pub fn from_u8(v: u8) -> Option<Self> {
        Some(match v {
            1 => ObjectKind::Identity,
            2 => ObjectKind::WalChunk,
            3 => ObjectKind::WalSegment,
            4 => ObjectKind::History,
            5 => ObjectKind::BackupPart,
            6 => ObjectKind::Metadata,
            _ => return None,
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Compression {
    None = 0,
    Zstd = 1,
}

/// The fixed header, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    pub version: u16,
    pub kind: ObjectKind,
    pub compression: Compression,
    pub encryption: u8,
    pub plain_len: u64,
    pub plain_crc: u32,
    pub metadata_len: u32,
    pub payload_len: u64,
    pub payload_crc: u32,
}

impl Header {
    /// Bytes of header plus metadata: where the payload starts.
    pub fn payload_offset(&self) -> usize {
        HEADER_LEN + self.metadata_len as usize
    }
}

/// Why an object could not be read. Every variant names the object.
#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("object {key}: truncated ({what})\nHINT: the object is incomplete or was cut; re-upload it from its source or restore it from a copy")]
    Truncated { key: String, what: String },
    #[error("object {key}: not a walvault object (bad magic)\nHINT: something other than walvault wrote under the archive prefix")]
    BadMagic { key: String },
    #[error("object {key}: format version {version} is newer than this walvault understands ({FORMAT_VERSION})\nHINT: upgrade walvault")]
    UnsupportedVersion { key: String, version: u16 },
    #[error("object {key}: corrupt: {what}\nHINT: the object was damaged in storage or transit; do not trust it")]
    Corrupt { key: String, what: String },
    #[error("object {key}: is encrypted (scheme {scheme}), and this build cannot decrypt")]
    Encrypted { key: String, scheme: u8 },
    #[error("object {key}: expected a {expected:?} object, found {found:?}")]
    WrongKind { key: String, expected: ObjectKind, found: ObjectKind },
}

/// Encode `plain` with its metadata. zstd `level` (1 is fast and compresses WAL 5-13x).
pub fn encode<M: Serialize>(
    kind: ObjectKind,
    metadata: &M,
    plain: &[u8],
    compression: Compression,
    level: i32,
) -> Vec<u8> {
    let meta = serde_json::to_vec(metadata).expect("metadata serialises");
    let payload = match compression {
        Compression::None => plain.to_vec(),
        Compression::Zstd => zstd::bulk::compress(plain, level).expect("zstd compress into memory"),
    };
    encode_raw(kind, &meta, plain.len() as u64, crc32fast::hash(plain), compression, &payload)
}

/// Assemble an envelope from already-compressed payload.
pub fn encode_raw(
    kind: ObjectKind,
    meta: &[u8],
    plain_len: u64,
    plain_crc: u32,
    compression: Compression,
    payload: &[u8],
) -> Vec<u8> {
    assert!(meta.len() <= MAX_METADATA_LEN as usize, "metadata too large");
    let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.push(kind as u8);
    out.push(compression as u8);
    out.push(0); // encryption: none
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out.extend_from_slice(&plain_crc.to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&out[..40]);
    h.update(meta);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(meta);
    out.extend_from_slice(payload);
    out
}

/// Parse and check the header and metadata. `bytes` may be just a prefix of the object (a
/// ranged read); it must hold at least the header and metadata.
pub fn decode_header<'a>(key: &str, bytes: &'a [u8]) -> Result<(Header, &'a [u8]), EnvelopeError> {
    let trunc = |what: &str| EnvelopeError::Truncated { key: key.to_string(), what: what.to_string() };
    let corrupt = |what: &str| EnvelopeError::Corrupt { key: key.to_string(), what: what.to_string() };
    if bytes.len() < 4 || &bytes[..4] != MAGIC {
        return Err(if bytes.len() < 4 && MAGIC.starts_with(bytes) {
            trunc("no header")
        } else {
            EnvelopeError::BadMagic { key: key.to_string() }
        });
    }
    if bytes.len() < HEADER_LEN {
        return Err(trunc("header shorter than 44 bytes"));
    }
    let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().expect("4 bytes"));
    let version = u16::from_le_bytes([bytes[4], bytes[5]]);
    if version > FORMAT_VERSION {
        return Err(EnvelopeError::UnsupportedVersion { key: key.to_string(), version });
    }
    let metadata_len = u32_at(24);
    if metadata_len > MAX_METADATA_LEN {
        return Err(corrupt("metadata length out of range"));
    }
    let end = HEADER_LEN + metadata_len as usize;
    if bytes.len() < end {
        return Err(trunc("metadata cut short"));
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..40]);
    h.update(&bytes[HEADER_LEN..end]);
    if h.finalize() != u32_at(40) {
        return Err(corrupt("header checksum mismatch"));
    }
    if version == 0 || bytes[9..12] != [0, 0, 0] {
        return Err(corrupt("invalid version or reserved bytes"));
    }
    let kind = ObjectKind::from_u8(bytes[6]).ok_or_else(|| corrupt("unknown object kind"))?;
    let compression = match bytes[7] {
        0 => Compression::None,
        1 => Compression::Zstd,
        _ => return Err(corrupt("unknown compression")),
    };
    let encryption = bytes[8];
    if encryption != 0 {
        return Err(EnvelopeError::Encrypted { key: key.to_string(), scheme: encryption });
    }
    let header = Header {
        version,
        kind,
        compression,
        encryption,
        plain_len: u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes")),
        plain_crc: u32_at(20),
        metadata_len,
        payload_len: u64::from_le_bytes(bytes[28..36].try_into().expect("8 bytes")),
        payload_crc: u32_at(36),
    };
    Ok((header, &bytes[HEADER_LEN..end]))
}

/// A fully read and checked object.
#[derive(Debug)]
pub struct Decoded {
    pub header: Header,
    pub metadata: Vec<u8>,
    pub content: Vec<u8>,
}

impl Decoded {
    pub fn metadata_as<M: DeserializeOwned>(&self, key: &str) -> Result<M, EnvelopeError> {
        serde_json::from_slice(&self.metadata)
            .map_err(|e| EnvelopeError::Corrupt { key: key.to_string(), what: format!("metadata: {e}") })
    }
    pub fn expect_kind(self, key: &str, kind: ObjectKind) -> Result<Self, EnvelopeError> {
        if self.header.kind != kind {
            return Err(EnvelopeError::WrongKind { key: key.to_string(), expected: kind, found: self.header.kind });
        }
        Ok(self)
    }
}

/// Parse, decompress and verify a whole object.
pub fn decode(key: &str, bytes: &[u8]) -> Result<Decoded, EnvelopeError> {
    let (header, meta) = decode_header(key, bytes)?;
    let payload = &bytes[header.payload_offset()..];
    let corrupt = |what: String| EnvelopeError::Corrupt { key: key.to_string(), what };
    if (payload.len() as u64) < header.payload_len {
        return Err(EnvelopeError::Truncated {
            key: key.to_string(),
            what: format!("payload is {} bytes, header says {}", payload.len(), header.payload_len),
        });
    }
    if payload.len() as u64 != header.payload_len {
        return Err(corrupt(format!("payload is {} bytes, header says {}", payload.len(), header.payload_len)));
    }
    if crc32fast::hash(payload) != header.payload_crc {
        return Err(corrupt("stored payload checksum mismatch".into()));
    }
    let content = match header.compression {
        Compression::None => {
            if payload.len() as u64 != header.plain_len {
                return Err(corrupt("stored length differs from plain length".into()));
            }
            payload.to_vec()
        }
        Compression::Zstd => {
            // Never allocate beyond what the (checksummed) header promises, and read one byte
            // past it to notice content that is longer than promised.
            let limit = header.plain_len;
            let mut out = Vec::with_capacity(limit.min(64 << 20) as usize);
            let dec = zstd::stream::read::Decoder::with_buffer(payload).map_err(|e| corrupt(format!("zstd: {e}")))?;
            let n = dec.take(limit + 1).read_to_end(&mut out).map_err(|e| {
                if e.kind() == std::io::ErrorKind::UnexpectedEof {
                    EnvelopeError::Truncated { key: key.to_string(), what: "compressed content cut short".into() }
                } else {
                    corrupt(format!("zstd: {e}"))
                }
            })?;
            if (n as u64) != limit {
                return Err(corrupt(format!("content is {n} bytes, header says {limit}")));
            }
            out
        }
    };
    if crc32fast::hash(&content) != header.plain_crc {
        return Err(corrupt("content checksum mismatch".into()));
    }
    Ok(Decoded { header, metadata: meta.to_vec(), content })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn round_trip_and_layout() {
        let meta = serde_json::json!({"start_lsn": "0/3000000"});
        let plain = b"hello hello hello hello".repeat(100);
        let obj = encode(ObjectKind::WalChunk, &meta, &plain, Compression::Zstd, 1);
        assert_eq!(&obj[..4], b"WVLT");
        assert_eq!(obj[6], 2);
        let d = decode("k", &obj).unwrap();
        assert_eq!(d.content, plain);
        assert_eq!(d.header.plain_len, plain.len() as u64);
        assert_eq!(d.metadata_as::<serde_json::Value>("k").unwrap(), meta);
        assert!(obj.len() < plain.len() / 4, "compressed");
        let raw = encode(ObjectKind::History, &serde_json::json!({}), b"1\t0/3\tx\n", Compression::None, 0);
        assert_eq!(decode("h", &raw).unwrap().content, b"1\t0/3\tx\n");
    }

    #[test]
    fn worked_example_from_the_docs() {
        let content = b"1\t0/3000000\tno recovery target specified\n";
        let obj = encode(ObjectKind::History, &serde_json::json!({}), content, Compression::None, 0);
        assert_eq!(obj.len(), 87);
        assert_eq!(&obj[..12], &[0x57, 0x56, 0x4c, 0x54, 1, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(&obj[12..20], &41u64.to_le_bytes());
        assert_eq!(&obj[24..28], &2u32.to_le_bytes());
        assert_eq!(&obj[28..36], &41u64.to_le_bytes());
        assert_eq!(obj[20..24], obj[36..40], "uncompressed: payload crc equals plain crc");
        assert_eq!(&obj[44..46], b"{}");
        assert_eq!(&obj[46..], content);
    }

    #[test]
    fn detects_every_single_bit_flip() {
        let plain: Vec<u8> = (0..2000u32).map(|i| (i * 7 % 251) as u8).collect();
        for compression in [Compression::None, Compression::Zstd] {
            let obj = encode(ObjectKind::WalSegment, &serde_json::json!({"a": 1}), &plain, compression, 1);
            for i in 0..obj.len() {
                for bit in 0..8 {
                    let mut bad = obj.clone();
                    bad[i] ^= 1 << bit;
                    assert!(decode("k", &bad).is_err(), "flip at byte {i} bit {bit} ({compression:?}) not detected");
                }
            }
        }
    }

    #[test]
    fn detects_truncation_and_names_the_object() {
        let obj = encode(ObjectKind::WalSegment, &serde_json::json!({}), &[7u8; 5000], Compression::Zstd, 1);
        for cut in [0, 3, 20, 40, obj.len() - 1] {
            let e = decode("wal/x", &obj[..cut]).unwrap_err();
            assert!(e.to_string().contains("wal/x"), "{e}");
        }
        let e = decode("wal/x", b"PK\x03\x04 not ours").unwrap_err();
        assert!(matches!(e, EnvelopeError::BadMagic { .. }));
    }

    #[test]
    fn newer_version_is_refused_clearly() {
        let mut obj = encode(ObjectKind::Metadata, &serde_json::json!({}), b"x", Compression::None, 0);
        obj[4] = 9;
        assert!(matches!(decode("k", &obj), Err(EnvelopeError::UnsupportedVersion { version: 9, .. })));
    }

    proptest! {
        #[test]
        fn arbitrary_round_trip(plain in proptest::collection::vec(any::<u8>(), 0..4096), zstd: bool) {
            let c = if zstd { Compression::Zstd } else { Compression::None };
            let obj = encode(ObjectKind::BackupPart, &serde_json::json!({"n": plain.len()}), &plain, c, 3);
            prop_assert_eq!(decode("k", &obj).unwrap().content, plain);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode("k", &bytes);
        }
    }
}
