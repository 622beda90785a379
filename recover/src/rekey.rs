//! `walvault-recover rekey`: new recipients for an encrypted archive, in one command, without
//! touching data.
//!
//! Every `keys/<epoch>` object (an epoch's data key, age-encrypted) is unwrapped with the
//! identity given and wrapped again for the new recipients (or passphrase); no data object is
//! read or written. Each key object is replaced atomically, so at every moment each epoch is
//! readable by the old identity or the new one. With age keys on both sides it runs in two
//! passes: first every epoch is wrapped to the old *and* the new recipients (after that pass,
//! both identities read everything), then to the new ones only. Interrupted, it leaves the
//! archive readable and is simply run again; run twice, the second run changes nothing.
//! (age cannot mix a passphrase with key recipients, so to or from a passphrase it is one
//! pass.) The rewritten key objects are signed with `--signing-key` when given; readers accept
//! unsigned key objects (see `shared::archive::read`).

use anyhow::{bail, Context, Result};
use serde::Serialize;
use walvault_shared::archive::crypt::{Identities, Recipients};
use walvault_shared::archive::envelope::{self, Compression, Expect, ObjectKind, Seal};
use walvault_shared::archive::names::{self, ArchiveKey};
use walvault_shared::archive::read::{limits, Want};
use walvault_shared::archive::sign::SigningKey;
use walvault_shared::archive::write::KeyMeta;
use walvault_shared::exit::usage;
use walvault_shared::storage::{ObjectStore, PutMode};

use crate::cli::RekeyArgs;

#[derive(Debug, Default, Serialize)]
pub struct RekeyReport {
    pub epochs: usize,
    pub rewrapped: usize,
    pub already_done: usize,
    pub recipients: Vec<String>,
}

/// The new recipients from the flags: keys or a passphrase.
fn new_recipients(a: &RekeyArgs) -> Result<Recipients> {
    let files: Vec<_> = a.to_recipients_file.iter().cloned().collect();
    let keys = Recipients::parse(&a.to_recipients, &files)?;
    match (keys, &a.to_passphrase_file) {
        (Some(k), None) => Ok(k),
        (None, Some(p)) => Recipients::passphrase_file(p),
        (Some(_), Some(_)) => bail!("give new recipients or a new passphrase, not both"),
        (None, None) => bail!("no new recipients\nHINT: --to-recipient age1… (repeatable), --to-recipients-file FILE or --to-passphrase-file FILE"),
    }
}

/// One key object, read.
struct KeyObject {
    key: String,
    meta: KeyMeta,
    wrapped: Vec<u8>,
}

async fn read_key(store: &dyn ObjectStore, key: &str) -> Result<KeyObject> {
    let raw = store.get_bounded(key, envelope::max_stored_len(limits::KEY)).await?;
    let w = Want::KEY;
    let d = envelope::decode(
        key,
        &raw,
        &Expect { kind: Some(w.kind), max_plain: w.max_plain, what: w.what, verify: None, epoch: None },
    )?;
    Ok(KeyObject { key: key.to_string(), meta: d.metadata_as(key)?, wrapped: d.content })
}

/// Re-wrap one key object to `to` unless it already is; returns whether it was rewritten.
async fn rewrap(
    store: &dyn ObjectStore,
    old: &Identities,
    to: &Recipients,
    signer: Option<&SigningKey>,
    k: &KeyObject,
) -> Result<bool> {
    let target = to.fingerprints();
    if k.meta.recipients == target {
        return Ok(false);
    }
    let Some(epoch) = old.unwrap(&k.wrapped)? else {
        bail!(
            "the identity given cannot unwrap {} (wrapped to {})\nHINT: give the identity that decrypts the archive now (--identity or --passphrase-file)",
            k.key,
            k.meta.recipients.join(", ")
        );
    };
    if epoch.id_hex() != k.meta.epoch {
        bail!("{} holds the key of another epoch; refusing to rewrap it", k.key);
    }
    let meta = KeyMeta { recipients: target, ..k.meta.clone() };
    let obj = envelope::encode(
        ObjectKind::Key,
        &meta,
        &to.wrap(&epoch)?,
        Compression::None,
        0,
        Seal { key: &k.key, signer, epoch: None },
    );
    store.put(&k.key, obj.into(), PutMode::Overwrite).await?;
    Ok(true)
}

pub async fn run(a: RekeyArgs) -> Result<()> {
    let old = a.archive.identities()?.ok_or_else(|| {
        usage(anyhow::anyhow!(
            "rekey needs what decrypts the archive now\nHINT: --identity FILE or --passphrase-file FILE"
        ))
    })?;
    let to = new_recipients(&a).map_err(usage)?;
    let signer = a.signing_key.as_deref().map(SigningKey::load).transpose()?;
    let store = walvault_shared::storage::open_existing(&a.archive.archive, &a.archive.s3()).await?;
    let reader = walvault_shared::archive::read::Reader::new(store.clone(), None);
    let id = walvault_shared::archive::identity::load_existing(&reader).await?;
    if id.encryption.is_none() {
        bail!("archive {} is not encrypted: there are no keys to rewrap", store.url());
    }
    let mut keys: Vec<String> = store
        .list_all(names::KEYS_PREFIX)
        .await?
        .into_iter()
        .filter(|o| matches!(names::parse(&o.key, id.wal_segment_size), Some(ArchiveKey::EpochKey { .. })))
        .map(|o| o.key)
        .collect();
    keys.sort();
    // Keys to keys: a first pass to old and new together, so that both read everything.
    let union = match (&to, old.recipients()) {
        (Recipients::Keys(new), Some(old_pub)) if !old_pub.is_empty() => {
            let mut all = old_pub;
            all.extend(new.iter().cloned());
            all.dedup();
            Some(Recipients::Keys(all))
        }
        _ => None,
    };
    let mut report = RekeyReport { epochs: keys.len(), recipients: to.fingerprints(), ..Default::default() };
    let mut written = 0;
    let passes: Vec<&Recipients> = union.iter().chain(std::iter::once(&to)).collect();
    let last = passes.len() - 1;
    for (i, pass) in passes.into_iter().enumerate() {
        for key in &keys {
            let k = read_key(&*store, key).await.with_context(|| format!("read {key}"))?;
            if k.meta.recipients == to.fingerprints() {
                if i == last {
                    report.already_done += 1;
                }
                continue;
            }
            if rewrap(&*store, &old, pass, signer.as_ref(), &k).await? {
                written += 1;
                if i == last {
                    report.rewrapped += 1;
                }
                if a.stop_after.is_some_and(|n| written >= n) {
                    eprintln!("rekey: stopping after {written} key objects (--stop-after)");
                    std::process::exit(3);
                }
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "rekeyed {} of {} epoch keys ({} already were) for {}; no data object was changed",
            report.rewrapped,
            report.epochs,
            report.already_done,
            report.recipients.join(", ")
        );
    }
    Ok(())
}
