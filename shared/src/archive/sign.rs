//! Object signatures: proof of who wrote an archive object.
//!
//! The agent holds an Ed25519 *signing key* (`walvault-agent keygen --signing-key FILE`); every
//! object it writes carries a signature over its header, metadata and the SHA-256 of its payload,
//! bound to the object's name (see [`super::envelope`]). A reader given the matching *verify
//! key* (`--verify-key`) refuses any object whose signature is missing or wrong before it uses a
//! byte of it. The verify key is never read from the archive: a bucket writer could replace it.
//!
//! Text forms (one line each, 64 hex digits of the 32-byte key):
//!
//! ```text
//! walvault-signing-key-1:9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60
//! walvault-verify-key-1:d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a
//! ```
//!
//! (RFC 8032 test vector 1.) The signing key file is written with mode 0600; loading one that
//! others can read is refused with a hint, as ssh does.

use std::path::Path;

use anyhow::{bail, Context, Result};
use ed25519_dalek::{Signer as _, Verifier as _};

const SIGNING_PREFIX: &str = "walvault-signing-key-1:";
const VERIFY_PREFIX: &str = "walvault-verify-key-1:";

/// The agent's private key.
pub struct SigningKey(ed25519_dalek::SigningKey);

/// The public half, given to readers.
#[derive(Clone, PartialEq, Eq)]
pub struct VerifyKey(ed25519_dalek::VerifyingKey);

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey({})", self.verify_key().id())
    }
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyKey({})", self.id())
    }
}

impl std::fmt::Display for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{VERIFY_PREFIX}{}", hex::encode(self.0.as_bytes()))
    }
}

fn parse_hex32(s: &str, what: &str) -> Result<[u8; 32]> {
    let bytes = hex::decode(s.trim()).with_context(|| format!("{what}: not hex"))?;
    bytes.try_into().map_err(|_| anyhow::anyhow!("{what}: not 32 bytes"))
}

impl SigningKey {
    /// A new random key (from the operating system's generator).
    pub fn generate() -> Self {
        SigningKey(ed25519_dalek::SigningKey::generate(&mut rand::rngs::OsRng))
    }

    pub fn from_bytes(b: &[u8; 32]) -> Self {
        SigningKey(ed25519_dalek::SigningKey::from_bytes(b))
    }

    /// The key file's text (keep it secret).
    pub fn to_file_text(&self) -> String {
        format!("{SIGNING_PREFIX}{}\n", hex::encode(self.0.to_bytes()))
    }

    pub fn parse(text: &str) -> Result<Self> {
        let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
        let hex = line
            .strip_prefix(SIGNING_PREFIX)
            .with_context(|| format!("not a walvault signing key (expected a line starting with {SIGNING_PREFIX})"))?;
        Ok(Self::from_bytes(&parse_hex32(hex, "signing key")?))
    }

    /// Load a key file; refused when group or others may read it.
    pub fn load(path: &Path) -> Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        let meta = std::fs::metadata(path).with_context(|| {
            format!(
                "read signing key {}\nHINT: create one with walvault-agent keygen --signing-key FILE",
                path.display()
            )
        })?;
        if meta.permissions().mode() & 0o077 != 0 {
            bail!(
                "signing key {} is readable by other users (mode {:o})\nHINT: chmod 600 {}",
                path.display(),
                meta.permissions().mode() & 0o777,
                path.display()
            );
        }
        let text = std::fs::read_to_string(path).with_context(|| format!("read signing key {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("signing key {}", path.display()))
    }

    /// Write a new key file (mode 0600, never over an existing file).
    pub fn write_new(&self, path: &Path) -> Result<()> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut f =
            std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).with_context(|| {
                format!("create {}\nHINT: the file must not exist yet; keygen never overwrites a key", path.display())
            })?;
        f.write_all(self.to_file_text().as_bytes())?;
        f.sync_all()?;
        Ok(())
    }

    pub fn verify_key(&self) -> VerifyKey {
        VerifyKey(self.0.verifying_key())
    }

    pub fn sign(&self, msg: &[u8]) -> [u8; 64] {
        self.0.sign(msg).to_bytes()
    }
}

impl VerifyKey {
    /// `walvault-verify-key-1:<hex>`, or `@FILE` holding that line.
    pub fn parse_arg(arg: &str) -> Result<Self> {
        if let Some(path) = arg.strip_prefix('@') {
            let text = std::fs::read_to_string(path).with_context(|| format!("read verify key file {path}"))?;
            return Self::parse(&text).with_context(|| format!("verify key file {path}"));
        }
        Self::parse(arg)
    }

    pub fn parse(text: &str) -> Result<Self> {
        let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
        if line.starts_with(SIGNING_PREFIX) {
            bail!("this is a private signing key, not a verify key\nHINT: give readers the line `walvault-agent keygen` printed (walvault-verify-key-1:…), and keep the signing key on the agent's host only");
        }
        let hex = line
            .strip_prefix(VERIFY_PREFIX)
            .with_context(|| format!("not a walvault verify key (expected {VERIFY_PREFIX}<64 hex digits>)"))?;
        let b = parse_hex32(hex, "verify key")?;
        Ok(VerifyKey(
            ed25519_dalek::VerifyingKey::from_bytes(&b).context("verify key: not a valid Ed25519 public key")?,
        ))
    }

    /// A short fingerprint for messages: the first 8 bytes of the key, hex.
    pub fn id(&self) -> String {
        hex::encode(&self.0.as_bytes()[..8])
    }

    /// Strict Ed25519 verification (no malleable signatures).
    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        let sig = ed25519_dalek::Signature::from_bytes(sig);
        self.0.verify_strict(msg, &sig).is_ok() && self.0.verify(msg, &sig).is_ok()
    }
}

/// The keys a reader trusts: an object verifies when any of them verifies its signature (more
/// than one during a signing-key rotation: `--verify-key` is repeatable).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VerifyKeys(pub Vec<VerifyKey>);

impl VerifyKeys {
    /// Parse each `--verify-key` argument; `None` when there are none.
    pub fn from_args(args: &[String]) -> Result<Option<Self>> {
        if args.is_empty() {
            return Ok(None);
        }
        let keys = args.iter().map(|a| VerifyKey::parse_arg(a)).collect::<Result<Vec<_>>>()?;
        Ok(Some(VerifyKeys(keys)))
    }

    pub fn verify(&self, msg: &[u8], sig: &[u8; 64]) -> bool {
        self.0.iter().any(|k| k.verify(msg, sig))
    }

    /// The keys' fingerprints, for messages.
    pub fn ids(&self) -> String {
        self.0.iter().map(VerifyKey::id).collect::<Vec<_>>().join(", ")
    }

    /// The `--verify-key` arguments that recreate this set (for restore_command).
    pub fn to_args(&self) -> Vec<String> {
        self.0.iter().flat_map(|k| ["--verify-key".to_string(), k.to_string()]).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc8032_vector_and_text_forms() {
        let sk = SigningKey::parse(
            "walvault-signing-key-1:9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
        )
        .unwrap();
        let vk = sk.verify_key();
        assert_eq!(
            vk.to_string(),
            "walvault-verify-key-1:d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
        );
        let sig = sk.sign(b"");
        assert_eq!(
            hex::encode(sig),
            "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b"
        );
        assert!(vk.verify(b"", &sig));
        assert!(!vk.verify(b"x", &sig));
        assert_eq!(VerifyKey::parse(&vk.to_string()).unwrap(), vk);
        assert!(VerifyKey::parse(&sk.to_file_text()).unwrap_err().to_string().contains("private"));
        assert_eq!(SigningKey::parse(&sk.to_file_text()).unwrap().verify_key(), vk);
    }

    #[test]
    fn key_files() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("k");
        let sk = SigningKey::generate();
        sk.write_new(&p).unwrap();
        assert!(sk.write_new(&p).is_err(), "never overwrites");
        assert_eq!(SigningKey::load(&p).unwrap().verify_key(), sk.verify_key());
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(SigningKey::load(&p).unwrap_err().to_string().contains("chmod 600"));
        let vp = dir.path().join("v");
        std::fs::write(&vp, format!("{}\n", sk.verify_key())).unwrap();
        assert_eq!(VerifyKey::parse_arg(&format!("@{}", vp.display())).unwrap(), sk.verify_key());
    }
}
