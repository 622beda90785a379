//! The envelope every archive object is stored in: a versioned header, metadata, an optional
//! signature, and the (compressed) content. The layout is documented, with worked examples, in
//! `docs/archive-format.md`; this module is its one implementation.
//!
//! ```text
//! offset   size field
//!      0      4 magic "WVLT"
//!      4      2 format version, u16 LE (this code writes 2, reads 1 and 2)
//!      6      1 kind (ObjectKind)
//!      7      1 compression: 0 none, 1 zstd
//!      8      1 encryption: 0 none, 1 epoch key + XChaCha20-Poly1305 STREAM (see `crypt`)
//!      9      1 signature: 0 none, 1 Ed25519 (version 1: reserved, zero)
//!     10      2 reserved, zero
//!     12      8 plain length: bytes of the content before compression, u64 LE
//!     20      4 crc32 (IEEE) of the plain content, u32 LE
//!     24      4 metadata length M, u32 LE (at most 16 MiB)
//!     28      8 payload length P: stored content bytes, u64 LE
//!     36      4 crc32 of the stored payload, u32 LE
//!     40      4 header crc: crc32 of bytes 0..40, then of bytes 44..payload start
//!     44      M metadata: UTF-8 JSON object, the kind's own fields
//!   44+M      E encryption block (E = 48 with encryption: epoch id and salt; 0 without)
//! 44+M+E      S signature block (S = 96 with an Ed25519 signature: SHA-256 of the payload, 32
//!               bytes, then the signature, 64 bytes; S = 0 unsigned)
//! 44+M+E+S    P payload: the content, compressed as `compression` says, then (encrypted
//!               objects) encrypted; the lengths and crcs of the header are of the plain
//!               content and of the stored payload
//! ```
//!
//! The signature is Ed25519 over
//! `"walvault-object-signature-1\0" ‖ object name ‖ "\0" ‖ bytes 0..40 ‖ metadata ‖ encryption block ‖ SHA-256(payload)`:
//! it binds the header, the metadata and the payload to the object's *name*, so a signed object
//! copied or renamed to another name fails verification. The header crc covers the signature
//! block too, so a flipped bit anywhere is caught even by a reader without a verify key.
//!
//! Reading checks, in order: magic, version, header crc (a flipped bit in the header, metadata
//! or signature block is caught before anything is trusted), reserved bytes and codes; with a
//! verify key, the signature (an unsigned object is refused); the plain length against the
//! caller's bound for this kind of object (a forged length cannot make a reader allocate);
//! payload length, crc and SHA-256 (any flipped or missing stored byte is caught before
//! decompressing); then the payload decompresses to exactly `plain length` bytes, never more
//! allocated, whose crc32 matches. Any failure is an [`EnvelopeError`] naming the object.

use std::io::Read;

use serde::{de::DeserializeOwned, Serialize};
use sha2::Digest;

use super::crypt::{self, EpochKey};
use super::sign::{SigningKey, VerifyKeys};

pub const MAGIC: &[u8; 4] = b"WVLT";
/// The version this code writes.
pub const FORMAT_VERSION: u16 = 2;
pub const HEADER_LEN: usize = 44;
pub const MAX_METADATA_LEN: u32 = 16 << 20;
/// Bytes of an Ed25519 signature block: SHA-256 of the payload, then the signature.
pub const SIGNATURE_BLOCK_LEN: usize = 32 + 64;
const SIGNATURE_DOMAIN: &[u8] = b"walvault-object-signature-1\0";

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
    /// An epoch data key, age-encrypted to the archive's recipients (`keys/<epoch id>`).
    Key = 7,
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
            7 => ObjectKind::Key,
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

/// The fixed header, parsed, with what the blocks after the metadata said.
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
    /// The encryption block, when the object is encrypted.
    pub encryption_block: Option<crypt::Block>,
    /// The signature block, when the object is signed: SHA-256 of the payload and signature.
    pub signature: Option<([u8; 32], [u8; 64])>,
}

impl Header {
    /// Bytes before the payload: header, metadata, encryption and signature blocks.
    pub fn payload_offset(&self) -> usize {
        HEADER_LEN
            + self.metadata_len as usize
            + if self.encryption_block.is_some() { crypt::BLOCK_LEN } else { 0 }
            + if self.signature.is_some() { SIGNATURE_BLOCK_LEN } else { 0 }
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
    #[error("object {key}: encrypted with an unknown scheme {scheme}\nHINT: upgrade walvault")]
    UnknownEncryption { key: String, scheme: u8 },
    #[error("object {key}: is encrypted (epoch key {epoch}), and no key to read it was given\nHINT: pass walvault-recover the age identity the archive is encrypted to (--identity FILE) or its passphrase (--passphrase-file FILE)")]
    Encrypted { key: String, epoch: String },
    #[error("object {key}: does not decrypt with its epoch key {epoch}\nHINT: the object was altered, or moved or renamed in the archive (its key is bound to its name); do not trust it")]
    Decrypt { key: String, epoch: String },
    #[error("object {key}: should be encrypted (the archive is) but is stored in clear\nHINT: someone without the keys wrote it; do not trust it")]
    NotEncrypted { key: String },
    #[error("object {key}: expected a {expected:?} object, found {found:?}")]
    WrongKind { key: String, expected: ObjectKind, found: ObjectKind },
    #[error("object {key}: claims {claimed} bytes of content, more than the {limit} a {what} may hold; refused before reading it\nHINT: the object was forged or damaged; do not trust this archive location")]
    TooLarge { key: String, what: &'static str, claimed: u64, limit: u64 },
    #[error("object {key}: not signed, and a verify key was given (key {expected})\nHINT: this object was written without --signing-key, or by someone else; refusing it")]
    Unsigned { key: String, expected: String },
    #[error("object {key}: signature does not verify with key {expected}\nHINT: the object was written or altered by someone without the agent's signing key (or under another name); refusing it")]
    BadSignature { key: String, expected: String },
}

impl EnvelopeError {
    /// A failure of authenticity (as opposed to plain damage).
    pub fn is_authenticity(&self) -> bool {
        matches!(
            self,
            EnvelopeError::Unsigned { .. } | EnvelopeError::BadSignature { .. } | EnvelopeError::Decrypt { .. }
        )
    }
}

/// How an object is sealed when written: its name (the signature and the encryption key bind
/// it), the agent's signing key and the epoch key to encrypt with, if any.
#[derive(Clone, Copy)]
pub struct Seal<'a> {
    pub key: &'a str,
    pub signer: Option<&'a SigningKey>,
    pub epoch: Option<&'a EpochKey>,
}

impl<'a> Seal<'a> {
    pub fn unsigned(key: &'a str) -> Self {
        Seal { key, signer: None, epoch: None }
    }
}

/// What a reader accepts for one object: its kind, an upper bound on its plain length, the
/// keys its signature must verify with (`None`: signatures are not checked), and the epoch key
/// to decrypt it with (an encrypted object without one is refused as encrypted).
#[derive(Clone, Copy, Debug)]
pub struct Expect<'a> {
    pub kind: Option<ObjectKind>,
    /// Largest plain content accepted, and what to call the object in the refusal.
    pub max_plain: u64,
    pub what: &'static str,
    pub verify: Option<&'a VerifyKeys>,
    pub epoch: Option<&'a EpochKey>,
}

impl<'a> Expect<'a> {
    pub fn new(kind: ObjectKind, max_plain: u64, what: &'static str, verify: Option<&'a VerifyKeys>) -> Self {
        Expect { kind: Some(kind), max_plain, what, verify, epoch: None }
    }
}

fn signed_message(key: &str, head40: &[u8], blocks: &[u8], payload_sha: &[u8; 32]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNATURE_DOMAIN.len() + key.len() + 1 + 40 + blocks.len() + 32);
    m.extend_from_slice(SIGNATURE_DOMAIN);
    m.extend_from_slice(key.as_bytes());
    m.push(0);
    m.extend_from_slice(head40);
    m.extend_from_slice(blocks);
    m.extend_from_slice(payload_sha);
    m
}

/// Encode `plain` with its metadata. zstd `level` (1 is fast and compresses WAL 5-13x).
pub fn encode<M: Serialize>(
    kind: ObjectKind,
    metadata: &M,
    plain: &[u8],
    compression: Compression,
    level: i32,
    seal: Seal<'_>,
) -> Vec<u8> {
    let meta = serde_json::to_vec(metadata).expect("metadata serialises");
    let payload = match compression {
        Compression::None => plain.to_vec(),
        Compression::Zstd => zstd::bulk::compress(plain, level).expect("zstd compress into memory"),
    };
    encode_raw(kind, &meta, plain.len() as u64, crc32fast::hash(plain), compression, &payload, seal)
}

/// Assemble an envelope from an already-compressed payload.
pub fn encode_raw(
    kind: ObjectKind,
    meta: &[u8],
    plain_len: u64,
    plain_crc: u32,
    compression: Compression,
    payload: &[u8],
    seal: Seal<'_>,
) -> Vec<u8> {
    encode_raw_parts(kind, meta, plain_len, plain_crc, compression, &[payload], seal)
}

/// [`encode_raw`] for a payload held in pieces (a whole segment's chunk frames): the pieces
/// are written straight into the object, never joined first (unless the object is encrypted,
/// whose cipher runs over the joined payload).
pub fn encode_raw_parts(
    kind: ObjectKind,
    meta: &[u8],
    plain_len: u64,
    plain_crc: u32,
    compression: Compression,
    parts: &[&[u8]],
    seal: Seal<'_>,
) -> Vec<u8> {
    assert!(meta.len() <= MAX_METADATA_LEN as usize, "metadata too large");
    let encrypted = seal.epoch.map(|e| e.seal(seal.key, &parts.concat()));
    let ciphertext: [&[u8]; 1];
    let (enc_block, payload): (&[u8], &[&[u8]]) = match &encrypted {
        Some((block, ct)) => {
            ciphertext = [ct.as_slice()];
            (block, &ciphertext)
        }
        None => (&[], parts),
    };
    let payload_len: usize = payload.iter().map(|p| p.len()).sum();
    let mut payload_crc = crc32fast::Hasher::new();
    for p in payload {
        payload_crc.update(p);
    }
    let sig_len = if seal.signer.is_some() { SIGNATURE_BLOCK_LEN } else { 0 };
    let mut out = Vec::with_capacity(HEADER_LEN + meta.len() + enc_block.len() + sig_len + payload_len);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.push(kind as u8);
    out.push(compression as u8);
    out.push(if encrypted.is_some() { crypt::SCHEME } else { 0 });
    out.push(u8::from(seal.signer.is_some()));
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&plain_len.to_le_bytes());
    out.extend_from_slice(&plain_crc.to_le_bytes());
    out.extend_from_slice(&(meta.len() as u32).to_le_bytes());
    out.extend_from_slice(&(payload_len as u64).to_le_bytes());
    out.extend_from_slice(&payload_crc.finalize().to_le_bytes());
    let mut signed_blocks = meta.to_vec();
    signed_blocks.extend_from_slice(enc_block);
    let mut block = Vec::new();
    if let Some(signer) = seal.signer {
        let mut h = sha2::Sha256::new();
        for p in payload {
            h.update(p);
        }
        let sha: [u8; 32] = h.finalize().into();
        let sig = signer.sign(&signed_message(seal.key, &out[..40], &signed_blocks, &sha));
        block.extend_from_slice(&sha);
        block.extend_from_slice(&sig);
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&out[..40]);
    h.update(&signed_blocks);
    h.update(&block);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(&signed_blocks);
    out.extend_from_slice(&block);
    for p in payload {
        out.extend_from_slice(p);
    }
    out
}

/// Parse and check the header and metadata (and, with `verify`, the signature over them; the
/// payload's hash is then checked by [`decode`] or [`check_payload`]). `bytes` may be just a
/// prefix of the object (a ranged read); it must hold everything before the payload.
pub fn decode_header<'a>(
    key: &str,
    bytes: &'a [u8],
    verify: Option<&VerifyKeys>,
) -> Result<(Header, &'a [u8]), EnvelopeError> {
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
    // Before the crc is checked nothing is trusted, but the block lengths follow from the codes.
    let encryption = bytes[8];
    let signature_code = if version >= 2 { bytes[9] } else { 0 };
    let encryption_len = match encryption {
        0 => 0,
        crypt::SCHEME if version >= 2 => crypt::BLOCK_LEN,
        scheme => return Err(EnvelopeError::UnknownEncryption { key: key.to_string(), scheme }),
    };
    let sig_len = if signature_code == 1 { SIGNATURE_BLOCK_LEN } else { 0 };
    let meta_end = HEADER_LEN + metadata_len as usize;
    let end = meta_end + encryption_len + sig_len;
    if bytes.len() < end {
        return Err(trunc("metadata cut short"));
    }
    let mut h = crc32fast::Hasher::new();
    h.update(&bytes[..40]);
    h.update(&bytes[HEADER_LEN..end]);
    if h.finalize() != u32_at(40) {
        return Err(corrupt("header checksum mismatch"));
    }
    let reserved_ok = match version {
        1 => bytes[9..12] == [0, 0, 0],
        _ => bytes[10..12] == [0, 0],
    };
    if version == 0 || !reserved_ok {
        return Err(corrupt("invalid version or reserved bytes"));
    }
    if signature_code > 1 {
        return Err(corrupt("unknown signature scheme"));
    }
    let kind = ObjectKind::from_u8(bytes[6]).ok_or_else(|| corrupt("unknown object kind"))?;
    let compression = match bytes[7] {
        0 => Compression::None,
        1 => Compression::Zstd,
        _ => return Err(corrupt("unknown compression")),
    };
    let encryption_block = (encryption_len > 0)
        .then(|| crypt::Block::parse(&bytes[meta_end..meta_end + encryption_len]).expect("length checked"));
    let signature = (sig_len > 0).then(|| {
        let b = &bytes[meta_end + encryption_len..end];
        (b[..32].try_into().expect("32 bytes"), b[32..].try_into().expect("64 bytes"))
    });
    if let Some(vk) = verify {
        let Some((sha, sig)) = &signature else {
            return Err(EnvelopeError::Unsigned { key: key.to_string(), expected: vk.ids() });
        };
        let msg = signed_message(key, &bytes[..40], &bytes[HEADER_LEN..meta_end + encryption_len], sha);
        if !vk.verify(&msg, sig) {
            return Err(EnvelopeError::BadSignature { key: key.to_string(), expected: vk.ids() });
        }
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
        encryption_block,
        signature,
    };
    Ok((header, &bytes[HEADER_LEN..meta_end]))
}

/// Check the stored payload against the header: length, crc32, and (for a signed object) the
/// SHA-256 the signature covers.
pub fn check_payload(key: &str, header: &Header, payload: &[u8]) -> Result<(), EnvelopeError> {
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
    if let Some((sha, _)) = &header.signature {
        let got: [u8; 32] = sha2::Sha256::digest(payload).into();
        if &got != sha {
            return Err(corrupt("payload does not match its signed SHA-256".into()));
        }
    }
    Ok(())
}

/// Check a whole stored object without decoding its content (which may be encrypted): the
/// header and metadata (their checksum; with `verify`, the signature), the payload's length,
/// checksum and signed hash. What an object copier checks before it writes a copy.
pub fn check_stored(key: &str, bytes: &[u8], verify: Option<&VerifyKeys>) -> Result<Header, EnvelopeError> {
    let (header, _) = decode_header(key, bytes, verify)?;
    let at = header.payload_offset();
    check_payload(key, &header, bytes.get(at..).unwrap_or_default())?;
    Ok(header)
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
        metadata_as(key, &self.metadata)
    }
}

/// Parse metadata JSON; a parse failure is corruption of the named object.
pub fn metadata_as<M: DeserializeOwned>(key: &str, meta: &[u8]) -> Result<M, EnvelopeError> {
    serde_json::from_slice(meta)
        .map_err(|e| EnvelopeError::Corrupt { key: key.to_string(), what: format!("metadata: {e}") })
}

/// Parse, verify, bound-check and decompress a whole object.
pub fn decode(key: &str, bytes: &[u8], expect: &Expect<'_>) -> Result<Decoded, EnvelopeError> {
    let (header, meta) = decode_header(key, bytes, expect.verify)?;
    if let Some(k) = expect.kind {
        if header.kind != k {
            return Err(EnvelopeError::WrongKind { key: key.to_string(), expected: k, found: header.kind });
        }
    }
    if header.plain_len > expect.max_plain {
        return Err(EnvelopeError::TooLarge {
            key: key.to_string(),
            what: expect.what,
            claimed: header.plain_len,
            limit: expect.max_plain,
        });
    }
    let payload = &bytes[header.payload_offset()..];
    check_payload(key, &header, payload)?;
    let clear;
    let payload = match &header.encryption_block {
        None => payload,
        Some(block) => {
            let epoch = block.epoch_hex();
            let k = expect.epoch.filter(|k| k.id == block.epoch);
            let Some(k) = k else { return Err(EnvelopeError::Encrypted { key: key.to_string(), epoch }) };
            clear = k.open(key, block, payload).map_err(|_| EnvelopeError::Decrypt { key: key.to_string(), epoch })?;
            &clear[..]
        }
    };
    let content = decompress(key, &header, payload)?;
    Ok(Decoded { header, metadata: meta.to_vec(), content })
}

/// Decompress a checked payload to exactly `plain_len` bytes (never allocating more) and check
/// the plain crc32.
fn decompress(key: &str, header: &Header, payload: &[u8]) -> Result<Vec<u8>, EnvelopeError> {
    let corrupt = |what: String| EnvelopeError::Corrupt { key: key.to_string(), what };
    let content = match header.compression {
        Compression::None => {
            // (Encrypted or not, `payload` here is the plain content's stored form.)
            if payload.len() as u64 != header.plain_len {
                return Err(corrupt("stored length differs from plain length".into()));
            }
            payload.to_vec()
        }
        Compression::Zstd => {
            // Read one byte past the promised length to notice content that is longer.
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
    Ok(content)
}

/// The most stored bytes an object whose plain content is at most `max_plain` can occupy:
/// header, the largest metadata, the blocks, and zstd's worst-case expansion. Readers fetch at
/// most this much, so a forged object cannot make them buffer more.
pub fn max_stored_len(max_plain: u64) -> u64 {
    let zstd_bound = max_plain + (max_plain >> 7) + (128 << 10);
    HEADER_LEN as u64 + MAX_METADATA_LEN as u64 + SIGNATURE_BLOCK_LEN as u64 + 4096 + zstd_bound
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn loose(max: u64) -> Expect<'static> {
        Expect { kind: None, max_plain: max, what: "test object", verify: None, epoch: None }
    }

    #[test]
    fn round_trip_and_layout() {
        let meta = serde_json::json!({"start_lsn": "0/3000000"});
        let plain = b"hello hello hello hello".repeat(100);
        let obj = encode(ObjectKind::WalChunk, &meta, &plain, Compression::Zstd, 1, Seal::unsigned("k"));
        assert_eq!(&obj[..4], b"WVLT");
        assert_eq!(obj[6], 2);
        let d = decode("k", &obj, &loose(1 << 20)).unwrap();
        assert_eq!(d.content, plain);
        assert_eq!(d.header.plain_len, plain.len() as u64);
        assert_eq!(d.metadata_as::<serde_json::Value>("k").unwrap(), meta);
        assert!(obj.len() < plain.len() / 4, "compressed");
        let raw = encode(
            ObjectKind::History,
            &serde_json::json!({}),
            b"1\t0/3\tx\n",
            Compression::None,
            0,
            Seal::unsigned("h"),
        );
        assert_eq!(decode("h", &raw, &loose(100)).unwrap().content, b"1\t0/3\tx\n");
    }

    #[test]
    fn worked_example_from_the_docs() {
        let content = b"1\t0/3000000\tno recovery target specified\n";
        let obj = encode(
            ObjectKind::History,
            &serde_json::json!({}),
            content,
            Compression::None,
            0,
            Seal::unsigned("wal/00000002.history"),
        );
        assert_eq!(obj.len(), 87);
        assert_eq!(&obj[..12], &[0x57, 0x56, 0x4c, 0x54, 2, 0, 4, 0, 0, 0, 0, 0]);
        assert_eq!(&obj[12..20], &41u64.to_le_bytes());
        assert_eq!(&obj[24..28], &2u32.to_le_bytes());
        assert_eq!(&obj[28..36], &41u64.to_le_bytes());
        assert_eq!(obj[20..24], obj[36..40], "uncompressed: payload crc equals plain crc");
        assert_eq!(&obj[44..46], b"{}");
        assert_eq!(&obj[46..], content);
    }

    /// The signed worked example of docs/archive-format.md, byte for byte (Ed25519 signatures
    /// are deterministic).
    #[test]
    fn signed_worked_example_from_the_docs() {
        let sk = SigningKey::parse(
            "walvault-signing-key-1:9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        )
        .unwrap();
        let content = b"1\t0/3000000\tno recovery target specified\n";
        let key = "wal/00000002.history";
        let obj = encode(
            ObjectKind::History,
            &serde_json::json!({}),
            content,
            Compression::None,
            0,
            Seal { key, signer: Some(&sk), epoch: None },
        );
        assert_eq!(obj.len(), 87 + 96);
        assert_eq!(&obj[..12], &[0x57, 0x56, 0x4c, 0x54, 2, 0, 4, 0, 0, 1, 0, 0]);
        let sha = hex::encode(&obj[46..78]);
        assert_eq!(sha, hex::encode(sha2::Sha256::digest(content)));
        let doc = include_str!("../../../docs/archive-format.md");
        let dump = hex::encode(&obj);
        assert!(doc.contains(&dump), "docs/archive-format.md must show the signed example's bytes:\n{dump}");
        let vk = VerifyKeys(vec![sk.verify_key()]);
        let e = Expect { verify: Some(&vk), ..loose(100) };
        assert_eq!(decode(key, &obj, &e).unwrap().content, content);
        // Under another name the same bytes do not verify.
        assert!(matches!(decode("wal/00000003.history", &obj, &e), Err(EnvelopeError::BadSignature { .. })));
        // An unsigned object is refused when a key is given.
        let plain =
            encode(ObjectKind::History, &serde_json::json!({}), content, Compression::None, 0, Seal::unsigned(key));
        assert!(matches!(decode(key, &plain, &e), Err(EnvelopeError::Unsigned { .. })));
        // Another key does not verify.
        let other = VerifyKeys(vec![SigningKey::generate().verify_key()]);
        assert!(matches!(
            decode(key, &obj, &Expect { verify: Some(&other), ..loose(100) }),
            Err(EnvelopeError::BadSignature { .. })
        ));
    }

    #[test]
    fn forged_content_with_recomputed_checksums_fails_the_signature() {
        let sk = SigningKey::generate();
        let vk = VerifyKeys(vec![sk.verify_key()]);
        let key = "backups/20261126T141500Z/part-000000";
        let good = encode(
            ObjectKind::BackupPart,
            &serde_json::json!({"part": 0}),
            b"real data",
            Compression::Zstd,
            1,
            Seal { key, signer: Some(&sk), epoch: None },
        );
        // A bucket writer re-encodes other content and keeps the old signature block.
        let (h, _) = decode_header(key, &good, None).unwrap();
        let forged_unsigned = encode(
            ObjectKind::BackupPart,
            &serde_json::json!({"part": 0}),
            b"evil data",
            Compression::Zstd,
            1,
            Seal::unsigned(key),
        );
        let (fh, fmeta) = decode_header(key, &forged_unsigned, None).unwrap();
        let (sha, sig) = h.signature.unwrap();
        let mut forged = forged_unsigned[..40].to_vec();
        forged[9] = 1;
        let mut block = sha.to_vec();
        block.extend_from_slice(&sig);
        let mut c = crc32fast::Hasher::new();
        c.update(&forged[..40]);
        c.update(fmeta);
        c.update(&block);
        forged.extend_from_slice(&c.finalize().to_le_bytes());
        forged.extend_from_slice(fmeta);
        forged.extend_from_slice(&block);
        forged.extend_from_slice(&forged_unsigned[fh.payload_offset()..]);
        let e = Expect { verify: Some(&vk), ..loose(100) };
        let err = decode(key, &forged, &e).unwrap_err();
        assert!(matches!(err, EnvelopeError::BadSignature { .. } | EnvelopeError::Corrupt { .. }), "{err}");
        // Without a verify key the forgery is still caught: the payload hash no longer matches.
        assert!(decode(key, &forged, &loose(100)).is_err());
        assert_eq!(decode(key, &good, &e).unwrap().content, b"real data");
    }

    #[test]
    fn plain_length_bound_is_checked_before_decompressing() {
        let obj = encode(
            ObjectKind::Metadata,
            &serde_json::json!({}),
            &vec![0u8; 1 << 20],
            Compression::Zstd,
            1,
            Seal::unsigned("k"),
        );
        let e = decode("k", &obj, &loose(4096)).unwrap_err();
        assert!(matches!(e, EnvelopeError::TooLarge { claimed, limit: 4096, .. } if claimed == 1 << 20), "{e}");
        assert!(e.to_string().contains("refused before reading"));
    }

    #[test]
    fn detects_every_single_bit_flip() {
        let plain: Vec<u8> = (0..2000u32).map(|i| (i * 7 % 251) as u8).collect();
        let sk = SigningKey::generate();
        for signer in [None, Some(&sk)] {
            for compression in [Compression::None, Compression::Zstd] {
                let obj = encode(
                    ObjectKind::WalSegment,
                    &serde_json::json!({"a": 1}),
                    &plain,
                    compression,
                    1,
                    Seal { key: "k", signer, epoch: None },
                );
                for i in 0..obj.len() {
                    for bit in 0..8 {
                        let mut bad = obj.clone();
                        bad[i] ^= 1 << bit;
                        assert!(
                            decode("k", &bad, &loose(1 << 20)).is_err(),
                            "flip at byte {i} bit {bit} ({compression:?}) not detected"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn detects_truncation_and_names_the_object() {
        let obj = encode(
            ObjectKind::WalSegment,
            &serde_json::json!({}),
            &[7u8; 5000],
            Compression::Zstd,
            1,
            Seal::unsigned("wal/x"),
        );
        for cut in [0, 3, 20, 40, obj.len() - 1] {
            let e = decode("wal/x", &obj[..cut], &loose(1 << 20)).unwrap_err();
            assert!(e.to_string().contains("wal/x"), "{e}");
        }
        let e = decode("wal/x", b"PK\x03\x04 not ours", &loose(100)).unwrap_err();
        assert!(matches!(e, EnvelopeError::BadMagic { .. }));
    }

    #[test]
    fn newer_version_is_refused_clearly_and_version_1_still_reads() {
        let mut obj =
            encode(ObjectKind::Metadata, &serde_json::json!({}), b"x", Compression::None, 0, Seal::unsigned("k"));
        obj[4] = 9;
        assert!(matches!(decode("k", &obj, &loose(10)), Err(EnvelopeError::UnsupportedVersion { version: 9, .. })));
        // A version-1 object (as walvault 0.1 wrote it): same layout without a signature byte.
        let mut v1 =
            encode(ObjectKind::Metadata, &serde_json::json!({}), b"x", Compression::None, 0, Seal::unsigned("k"));
        v1[4] = 1;
        let mut c = crc32fast::Hasher::new();
        c.update(&v1[..40]);
        c.update(&v1[44..46]);
        let crc = c.finalize().to_le_bytes();
        v1[40..44].copy_from_slice(&crc);
        assert_eq!(decode("k", &v1, &loose(10)).unwrap().content, b"x");
    }

    proptest! {
        #[test]
        fn arbitrary_round_trip(plain in proptest::collection::vec(any::<u8>(), 0..4096), zstd: bool) {
            let c = if zstd { Compression::Zstd } else { Compression::None };
            let obj = encode(ObjectKind::BackupPart, &serde_json::json!({"n": plain.len()}), &plain, c, 3, Seal::unsigned("k"));
            prop_assert_eq!(decode("k", &obj, &loose(4096)).unwrap().content, plain);
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = decode("k", &bytes, &loose(1 << 30));
        }
    }
}
