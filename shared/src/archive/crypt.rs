//! Encryption at rest: epoch data keys wrapped to age recipients, and the per-object AEAD.
//!
//! * **Recipients.** The agent is given only public keys: age X25519 recipients (`age1…`),
//!   or a passphrase (age's scrypt recipient). It never holds anything that decrypts.
//! * **Epoch keys.** The agent draws a random 32-byte data key when it starts and again every
//!   `key_rotation_interval`, and writes it — age-encrypted to the recipients — as
//!   `keys/<epoch id>` *before* the first object that uses it. It keeps only the current one,
//!   so a stolen agent host reveals nothing written before its current epoch.
//! * **Objects.** Each object's content (compressed first) is encrypted with
//!   XChaCha20-Poly1305 in the STREAM construction (RFC-style BE32 counter, 64 KiB segments,
//!   so memory stays bounded whatever the object's size) under a key and nonce derived with
//!   HKDF-SHA256 from the epoch key, a random 32-byte salt, and the object's *name*: an object
//!   moved or renamed in the bucket fails to decrypt.
//! * **Readers** (`walvault-recover --identity FILE` or `--passphrase-file FILE`) unwrap the
//!   epoch keys they need, once each.
//!
//! The envelope's encryption block (scheme 1, [`BLOCK_LEN`] bytes):
//!
//! ```text
//! offset size field
//!      0   16 epoch id (the key object is keys/<32 hex digits of it>)
//!     16   32 HKDF salt, random per object
//! ```
//!
//! The header's crc32 of the plain content stays in clear: it is how the agent, which cannot
//! decrypt, compares content — a write-once retry, and the split-brain check of the archived
//! part of the current segment when it resumes.
//!
//! What stays in clear, and why: object names (LSN ranges, backup ids: a listing must tell what
//! is there without a key), the envelope header (sizes; the plain crc32 is zeroed), the
//! metadata (LSN ranges, commit counts and times, backup descriptions — what `list` and
//! `audit` need), history files and the commit index (the same metadata), and the crc32 of
//! each object's plain content (32 bits: it can confirm a guess of a whole object, which for
//! WAL — full of LSNs, xids, timestamps and record checksums — is not a practical attack).

use std::io::{Read, Write};
use std::str::FromStr;

use anyhow::{bail, Context, Result};
use chacha20poly1305::aead::generic_array::GenericArray;
use chacha20poly1305::aead::stream::{DecryptorBE32, EncryptorBE32};
use chacha20poly1305::aead::KeyInit;
use chacha20poly1305::XChaCha20Poly1305;
use sha2::Digest;
use zeroize::{Zeroize, Zeroizing};

/// The encryption code of the envelope header for this scheme.
pub const SCHEME: u8 = 1;
/// Bytes of the encryption block.
pub const BLOCK_LEN: usize = 16 + 32;
/// Plain bytes per STREAM segment; each gets a 16-byte tag.
pub const SEGMENT: usize = 64 << 10;
const TAG: usize = 16;
const STREAM_NONCE: usize = 19;
const HKDF_INFO: &[u8] = b"walvault-object-key-1\0";

/// An epoch's data key (zeroed when dropped).
pub struct EpochKey {
    pub id: [u8; 16],
    key: Zeroizing<[u8; 32]>,
}

impl std::fmt::Debug for EpochKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EpochKey({})", hex::encode(self.id))
    }
}

impl EpochKey {
    /// A new random epoch.
    pub fn generate() -> Self {
        EpochKey { id: rand::random(), key: Zeroizing::new(rand::random()) }
    }

    pub fn from_parts(id: [u8; 16], key: [u8; 32]) -> Self {
        EpochKey { id, key: Zeroizing::new(key) }
    }

    pub fn id_hex(&self) -> String {
        hex::encode(self.id)
    }

    /// The object key and nonce for `name` with `salt`.
    fn object_key(&self, name: &str, salt: &[u8; 32]) -> Zeroizing<[u8; 32 + STREAM_NONCE]> {
        let hk = hkdf::Hkdf::<sha2::Sha256>::new(Some(salt), &self.key[..]);
        let mut info = HKDF_INFO.to_vec();
        info.extend_from_slice(name.as_bytes());
        let mut okm = Zeroizing::new([0u8; 32 + STREAM_NONCE]);
        hk.expand(&info, &mut okm[..]).expect("51 bytes is a valid HKDF-SHA256 length");
        okm
    }

    /// Encrypt `payload` (the compressed content) of the object `name`. Returns the
    /// encryption block and the ciphertext.
    pub fn seal(&self, name: &str, payload: &[u8]) -> (Vec<u8>, Vec<u8>) {
        let salt: [u8; 32] = rand::random();
        let okm = self.object_key(name, &salt);
        let cipher = XChaCha20Poly1305::new(GenericArray::from_slice(&okm[..32]));
        let mut enc = EncryptorBE32::from_aead(cipher, GenericArray::from_slice(&okm[32..]));
        let mut out = Vec::with_capacity(payload.len() + (payload.len() / SEGMENT + 1) * TAG);
        let mut chunks = payload.chunks(SEGMENT).peekable();
        // Full segments with encrypt_next; the last one (shorter, possibly empty) with
        // encrypt_last, so a reader can tell the end and any truncation is caught.
        loop {
            match chunks.next() {
                Some(c) if c.len() == SEGMENT => {
                    out.extend_from_slice(&enc.encrypt_next(c).expect("STREAM segment count below 2^32"));
                    if chunks.peek().is_none() {
                        out.extend_from_slice(&enc.encrypt_last(&[][..]).expect("encrypt"));
                        break;
                    }
                }
                Some(c) => {
                    out.extend_from_slice(&enc.encrypt_last(c).expect("encrypt"));
                    break;
                }
                None => {
                    out.extend_from_slice(&enc.encrypt_last(&[][..]).expect("encrypt"));
                    break;
                }
            }
        }
        let mut block = Vec::with_capacity(BLOCK_LEN);
        block.extend_from_slice(&self.id);
        block.extend_from_slice(&salt);
        (block, out)
    }

    /// Decrypt the ciphertext of the object `name`; fails when the key, the name or any byte
    /// is wrong.
    pub fn open(&self, name: &str, block: &Block, ciphertext: &[u8]) -> Result<Vec<u8>, DecryptFailed> {
        let okm = self.object_key(name, &block.salt);
        let cipher = XChaCha20Poly1305::new(GenericArray::from_slice(&okm[..32]));
        let mut dec = DecryptorBE32::from_aead(cipher, GenericArray::from_slice(&okm[32..]));
        let mut out = Vec::with_capacity(ciphertext.len());
        let mut rest = ciphertext;
        loop {
            if rest.len() > SEGMENT + TAG {
                let (c, r) = rest.split_at(SEGMENT + TAG);
                out.extend_from_slice(&dec.decrypt_next(c).map_err(|_| DecryptFailed)?);
                rest = r;
            } else {
                if rest.len() < TAG {
                    return Err(DecryptFailed);
                }
                out.extend_from_slice(&dec.decrypt_last(rest).map_err(|_| DecryptFailed)?);
                return Ok(out);
            }
        }
    }
}

/// Authentication failed: wrong key, wrong name, or altered bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("decryption failed")]
pub struct DecryptFailed;

/// The encryption block of an object, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Block {
    pub epoch: [u8; 16],
    pub salt: [u8; 32],
}

impl Block {
    pub fn parse(b: &[u8]) -> Option<Block> {
        if b.len() != BLOCK_LEN {
            return None;
        }
        Some(Block { epoch: b[..16].try_into().ok()?, salt: b[16..48].try_into().ok()? })
    }
    pub fn epoch_hex(&self) -> String {
        hex::encode(self.epoch)
    }
}

/// A short, stable fingerprint of a recipient (`age1…`) or of the passphrase mode, for
/// messages and key objects: the first 8 bytes of SHA-256 of its text, hex.
pub fn fingerprint(recipient: &str) -> String {
    hex::encode(&sha2::Sha256::digest(recipient.as_bytes())[..8])
}

/// Who epoch keys are wrapped to (the agent's side).
#[derive(Clone)]
pub enum Recipients {
    /// age X25519 public keys.
    Keys(Vec<age::x25519::Recipient>),
    /// age's scrypt passphrase recipient (never logged).
    Passphrase(age::secrecy::SecretString),
}

impl std::fmt::Debug for Recipients {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Recipients::Keys(_) => write!(f, "Recipients({})", self.fingerprints().join(",")),
            Recipients::Passphrase(_) => write!(f, "Recipients(passphrase)"),
        }
    }
}

/// scrypt work factor used to wrap epoch keys with a passphrase (2^15: about 0.1 s). Every
/// process that reads the archive derives it once per epoch it touches — and PostgreSQL starts
/// a `wal-fetch` process per WAL segment it replays — so this is the trade-off between
/// guessing cost and replay speed; a long random passphrase (or age keys) makes it moot.
const SCRYPT_LOG_N: u8 = 15;

impl Recipients {
    /// Parse recipients: each `age1…` (repeatable flag) and the lines of a recipients file
    /// (one per line, `#` comments, blank lines ignored), as the `age` tool writes them.
    pub fn parse(keys: &[String], files: &[std::path::PathBuf]) -> Result<Option<Recipients>> {
        let mut out = Vec::new();
        let mut add = |s: &str, whence: &str| -> Result<()> {
            let r = age::x25519::Recipient::from_str(s.trim())
                .map_err(|e| anyhow::anyhow!("{whence}: not an age X25519 recipient ({e}): {:?}\nHINT: make one with age-keygen (the line after \"# public key:\")", s.trim()))?;
            if !out.contains(&r) {
                out.push(r);
            }
            Ok(())
        };
        for k in keys {
            add(k, "--encrypt-recipient")?;
        }
        for f in files {
            let text = std::fs::read_to_string(f).with_context(|| format!("read recipients file {}", f.display()))?;
            for (i, line) in text.lines().enumerate() {
                let line = line.trim();
                if line.is_empty() || line.starts_with('#') {
                    continue;
                }
                add(line, &format!("{} line {}", f.display(), i + 1))?;
            }
        }
        Ok((!out.is_empty()).then_some(Recipients::Keys(out)))
    }

    /// Passphrase mode from a file (its first line; the file should be mode 0600).
    pub fn passphrase_file(path: &std::path::Path) -> Result<Recipients> {
        Ok(Recipients::Passphrase(read_passphrase(path)?))
    }

    pub fn fingerprints(&self) -> Vec<String> {
        match self {
            Recipients::Keys(k) => k.iter().map(|r| fingerprint(&r.to_string())).collect(),
            Recipients::Passphrase(_) => vec!["passphrase".to_string()],
        }
    }

    /// The epoch key, age-encrypted to these recipients.
    pub fn wrap(&self, key: &EpochKey) -> Result<Vec<u8>> {
        let enc = match self {
            Recipients::Keys(k) => age::Encryptor::with_recipients(k.iter().map(|r| r as &dyn age::Recipient))?,
            Recipients::Passphrase(p) => {
                let mut r = age::scrypt::Recipient::new(p.clone());
                r.set_work_factor(SCRYPT_LOG_N);
                age::Encryptor::with_recipients(std::iter::once(&r as &dyn age::Recipient))?
            }
        };
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out)?;
        w.write_all(&key.id)?;
        w.write_all(&key.key[..])?;
        w.finish()?;
        Ok(out)
    }
}

/// Read a passphrase: the first line of a file, which other users must not be able to read.
pub fn read_passphrase(path: &std::path::Path) -> Result<age::secrecy::SecretString> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).with_context(|| format!("read passphrase file {}", path.display()))?;
    if meta.permissions().mode() & 0o077 != 0 {
        bail!("passphrase file {} is readable by other users\nHINT: chmod 600 {}", path.display(), path.display());
    }
    let mut text = Zeroizing::new(std::fs::read_to_string(path)?);
    let line = text.lines().next().unwrap_or("").trim_end_matches('\r').to_string();
    text.zeroize();
    if line.is_empty() {
        bail!("passphrase file {} is empty", path.display());
    }
    Ok(age::secrecy::SecretString::from(line))
}

/// What unwraps epoch keys (the reader's side): age identities (with the fingerprints of their
/// public keys, for messages) or a passphrase.
pub enum Identities {
    Keys(Vec<Box<dyn age::Identity + Send + Sync>>, Vec<age::x25519::Recipient>),
    Passphrase(age::secrecy::SecretString),
}

impl std::fmt::Debug for Identities {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Identities::Keys(k, _) => write!(f, "Identities({} keys)", k.len()),
            Identities::Passphrase(_) => write!(f, "Identities(passphrase)"),
        }
    }
}

impl Identities {
    /// An age identity file (`AGE-SECRET-KEY-1…` lines, as age-keygen writes them).
    pub fn from_file(path: &std::path::Path) -> Result<Identities> {
        let text =
            Zeroizing::new(std::fs::read(path).with_context(|| format!("read identity file {}", path.display()))?);
        let ids = age::IdentityFile::from_buffer(&text[..])
            .with_context(|| format!("identity file {}", path.display()))?
            .into_identities()
            .with_context(|| format!("identity file {}", path.display()))?;
        if ids.is_empty() {
            bail!("identity file {} holds no age identity\nHINT: give the file age-keygen wrote (AGE-SECRET-KEY-1… lines)", path.display());
        }
        // The public keys of its X25519 identities (for messages, and a rekey's transition).
        let publics = String::from_utf8_lossy(&text)
            .lines()
            .filter_map(|l| age::x25519::Identity::from_str(l.trim()).ok())
            .map(|i| i.to_public())
            .collect();
        Ok(Identities::Keys(ids, publics))
    }

    /// Fingerprints of the public keys of these identities (`None`: a passphrase).
    pub fn fingerprints(&self) -> Option<Vec<String>> {
        match self {
            Identities::Keys(_, p) => Some(p.iter().map(|r| fingerprint(&r.to_string())).collect()),
            Identities::Passphrase(_) => None,
        }
    }

    /// The public keys of these identities, as recipients (`None`: a passphrase).
    pub fn recipients(&self) -> Option<Vec<age::x25519::Recipient>> {
        match self {
            Identities::Keys(_, p) => Some(p.clone()),
            Identities::Passphrase(_) => None,
        }
    }

    pub fn passphrase_file(path: &std::path::Path) -> Result<Identities> {
        Ok(Identities::Passphrase(read_passphrase(path)?))
    }

    /// Unwrap an epoch key object's content; `None` when none of these identities can.
    pub fn unwrap(&self, wrapped: &[u8]) -> Result<Option<EpochKey>> {
        let d = age::Decryptor::new_buffered(wrapped).context("key object: not an age file")?;
        let reader = match self {
            Identities::Keys(ids, _) => {
                if d.is_scrypt() {
                    return Ok(None);
                }
                d.decrypt(ids.iter().map(|i| i.as_ref() as &dyn age::Identity))
            }
            Identities::Passphrase(p) => {
                if !d.is_scrypt() {
                    return Ok(None);
                }
                let mut id = age::scrypt::Identity::new(p.clone());
                id.set_max_work_factor(SCRYPT_LOG_N + 4);
                d.decrypt(std::iter::once(&id as &dyn age::Identity))
            }
        };
        let mut r = match reader {
            Ok(r) => r,
            // A wrong passphrase fails the scrypt stanza as DecryptionFailed.
            Err(age::DecryptError::NoMatchingKeys)
            | Err(age::DecryptError::KeyDecryptionFailed)
            | Err(age::DecryptError::DecryptionFailed) => return Ok(None),
            Err(e) => return Err(anyhow::Error::new(e).context("unwrap epoch key")),
        };
        let mut buf = Zeroizing::new(Vec::new());
        r.read_to_end(&mut buf).context("unwrap epoch key")?;
        if buf.len() != 48 {
            bail!("key object holds {} bytes, not an epoch key", buf.len());
        }
        let id: [u8; 16] = buf[..16].try_into().expect("16");
        let key: [u8; 32] = buf[16..48].try_into().expect("32");
        Ok(Some(EpochKey::from_parts(id, key)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_round_trip_at_segment_edges() {
        let k = EpochKey::generate();
        for len in [0usize, 1, SEGMENT - 1, SEGMENT, SEGMENT + 1, 3 * SEGMENT, 200_000] {
            let data: Vec<u8> = (0..len).map(|i| (i * 13 % 251) as u8).collect();
            let (block, ct) = k.seal("wal/x", &data);
            let b = Block::parse(&block).unwrap();
            assert_eq!(b.epoch, k.id);
            assert_eq!(k.open("wal/x", &b, &ct).unwrap(), data, "len {len}");
            // Another name, a truncation at a segment boundary, a flipped bit: all refused.
            assert!(k.open("wal/y", &b, &ct).is_err());
            if ct.len() > SEGMENT + TAG {
                assert!(k.open("wal/x", &b, &ct[..SEGMENT + TAG]).is_err(), "truncated at a segment boundary");
            }
            let mut bad = ct.clone();
            bad[ct.len() / 2] ^= 1;
            assert!(k.open("wal/x", &b, &bad).is_err());
        }
        let other = EpochKey::generate();
        let (block, ct) = k.seal("wal/x", b"abc");
        assert!(other.open("wal/x", &Block::parse(&block).unwrap(), &ct).is_err());
    }

    #[test]
    fn epoch_keys_wrap_to_recipients_and_passphrases() {
        let id = age::x25519::Identity::generate();
        let other = age::x25519::Identity::generate();
        let r = Recipients::parse(&[id.to_public().to_string()], &[]).unwrap().unwrap();
        let k = EpochKey::generate();
        let wrapped = r.wrap(&k).unwrap();
        let ids = Identities::Keys(vec![Box::new(id)], vec![]);
        let back = ids.unwrap(&wrapped).unwrap().unwrap();
        assert_eq!((back.id, *back.key), (k.id, *k.key));
        assert!(Identities::Keys(vec![Box::new(other)], vec![]).unwrap(&wrapped).unwrap().is_none());
        assert!(Recipients::parse(&["age1nope".into()], &[]).is_err());
        let dir = tempfile::tempdir().unwrap();
        let pf = dir.path().join("pass");
        std::fs::write(&pf, "correct horse battery staple\n").unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&pf, std::fs::Permissions::from_mode(0o600)).unwrap();
        let mut p = match Recipients::passphrase_file(&pf).unwrap() {
            Recipients::Passphrase(p) => p,
            _ => unreachable!(),
        };
        // A cheap work factor for the test.
        let mut rr = age::scrypt::Recipient::new(p.clone());
        rr.set_work_factor(10);
        let enc = age::Encryptor::with_recipients(std::iter::once(&rr as &dyn age::Recipient)).unwrap();
        let mut out = Vec::new();
        let mut w = enc.wrap_output(&mut out).unwrap();
        w.write_all(&k.id).unwrap();
        w.write_all(&k.key[..]).unwrap();
        w.finish().unwrap();
        let back = Identities::Passphrase(p.clone()).unwrap(&out).unwrap().unwrap();
        assert_eq!(back.id, k.id);
        p = age::secrecy::SecretString::from("wrong".to_string());
        assert!(Identities::Passphrase(p).unwrap(&out).unwrap().is_none());
        std::fs::set_permissions(&pf, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(Recipients::passphrase_file(&pf).is_err(), "a world-readable passphrase file is refused");
    }
}

#[cfg(test)]
mod example {
    use crate::archive::envelope::{self, Expect};

    /// The encrypted worked example of docs/archive-format.md decrypts, with the example's
    /// epoch key, to its content — and under any other name it does not.
    #[test]
    fn encrypted_worked_example_from_the_docs() {
        let doc = include_str!("../../../docs/archive-format.md");
        let hex_obj = "57564c54020002000100000015000000000000001b1c98950200000025000000000000003b22f5ccddb75af47b7d00112233445566778899aabbccddeefffafb874c2cea06209f7f4e9f96656a866e07327c7cb4ed8449caa3622723bf93f008b5a1daba3f5e4cb254027f52f4e0bd2b05e919970d81787839b8b732567699eae1d774";
        assert!(doc.contains(hex_obj), "docs/archive-format.md shows the encrypted example");
        let obj = hex::decode(hex_obj).unwrap();
        let k = super::EpochKey::from_parts(
            hex::decode("00112233445566778899aabbccddeeff").unwrap().try_into().unwrap(),
            [0x42; 32],
        );
        let key = "wal/00000001/000000010000000000000003.0000000003000000-0000000003000015";
        let e = Expect { kind: None, max_plain: 100, what: "t", verify: None, epoch: Some(&k) };
        assert_eq!(envelope::decode(key, &obj, &e).unwrap().content, b"hello, encrypted WAL!");
        let elsewhere = "wal/00000001/000000010000000000000003.0000000003000015-000000000300002A";
        assert!(matches!(envelope::decode(elsewhere, &obj, &e), Err(envelope::EnvelopeError::Decrypt { .. })));
        let no_key = Expect { epoch: None, ..e };
        assert!(matches!(envelope::decode(key, &obj, &no_key), Err(envelope::EnvelopeError::Encrypted { .. })));
    }
}
