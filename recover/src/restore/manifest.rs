//! The `backup_manifest` of a combined restore: the newest backup's manifest with each
//! `INCREMENTAL.<name>` entry replaced by `<name>` as reconstructed (its size and CRC32C as the
//! combine computed them while completing the file, [`combine::Checksums`]; read back from disk
//! for any file it has no figures for) and `backup_label` as rewritten, in PostgreSQL's manifest format (version 2,
//! `System-Identifier`, the newest backup's `WAL-Ranges`, and the SHA-256 `Manifest-Checksum`
//! over everything before its line), so `pg_verifybackup` checks it like a plain backup.
//!
//! CRC32C is written as PostgreSQL does: the finalised CRC's bytes in the server's (little)
//! endianness, as lowercase hex.

use std::io::Read;
use std::path::Path;

use anyhow::{bail, Context, Result};
use serde_json::Value;
use sha2::Digest;

use super::combine::{self, is_relation_dir, PREFIX};

/// CRC32C of a file, as a manifest spells it.
pub fn crc32c_file(path: &Path) -> Result<(u64, String)> {
    let mut f = std::fs::File::open(path).with_context(|| format!("read {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let (mut crc, mut size) = (0u32, 0u64);
    loop {
        let n = f.read(&mut buf).with_context(|| format!("read {}", path.display()))?;
        if n == 0 {
            break;
        }
        crc = crc32c::crc32c_append(crc, &buf[..n]);
        size += n as u64;
    }
    Ok((size, hex::encode(crc.to_le_bytes())))
}

/// A manifest path of an incremental relation file → the reconstructed file's path.
fn reconstructed_path(p: &str) -> Option<String> {
    let path = Path::new(p);
    let name = path.file_name()?.to_str()?;
    let plain = name.strip_prefix(PREFIX)?;
    let dir = path.parent()?;
    let rel_ok = is_relation_dir(dir, false) || {
        // pg_tblspc/<oid>/PG_*/<db>
        let c: Vec<&str> = dir.components().filter_map(|c| c.as_os_str().to_str()).collect();
        c.len() == 4 && c[0] == "pg_tblspc" && is_relation_dir(Path::new(&format!("{}/{}", c[2], c[3])), true)
    };
    if plain.is_empty() || !rel_ok {
        return None;
    }
    Some(dir.join(plain).to_str()?.to_string())
}

fn json_str(s: &str) -> String {
    serde_json::to_string(s).expect("a string serialises")
}

/// Size and CRC32C of a restored file: from `known` when it holds the file (same device, inode
/// and size), else read from disk.
fn size_and_crc(path: &Path, known: &combine::Checksums) -> Result<(u64, String)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).with_context(|| format!("stat {}", path.display()))?;
    match known.get(&(m.dev(), m.ino())) {
        Some((size, crc)) if *size == m.len() => Ok((*size, hex::encode(crc.to_le_bytes()))),
        _ => crc32c_file(path),
    }
}

/// Build the combined restore's manifest from the newest backup's `manifest` and the restored
/// files under `pgdata` (tablespaces through its `pg_tblspc` links).
pub fn combined(manifest: &[u8], pgdata: &Path, known: &combine::Checksums) -> Result<Vec<u8>> {
    let v: Value = serde_json::from_slice(manifest).context("parse the newest backup's backup_manifest")?;
    if v.get("PostgreSQL-Backup-Manifest-Version").and_then(Value::as_u64) != Some(2) {
        bail!("the newest backup's manifest is not a version 2 manifest");
    }
    let sysid = v.get("System-Identifier").and_then(Value::as_u64).context("manifest without System-Identifier")?;
    let files = v.get("Files").and_then(Value::as_array).context("manifest without Files")?;
    let ranges = v.get("WAL-Ranges").and_then(Value::as_array).context("manifest without WAL-Ranges")?;
    let mut out =
        format!("{{ \"PostgreSQL-Backup-Manifest-Version\": 2,\n\"System-Identifier\": {sysid},\n\"Files\": [");
    for (i, f) in files.iter().enumerate() {
        out.push_str(if i == 0 { "\n" } else { ",\n" });
        let path = f.get("Path").and_then(Value::as_str);
        let modified = f.get("Last-Modified").and_then(Value::as_str).unwrap_or("1970-01-01 00:00:00 GMT");
        let recomputed = match path {
            Some("backup_label") => Some("backup_label".to_string()),
            Some(p) => reconstructed_path(p),
            None => None,
        };
        match recomputed {
            Some(p) => {
                let (size, crc) = size_and_crc(&pgdata.join(&p), known)?;
                out.push_str(&format!(
                    "{{ \"Path\": {}, \"Size\": {size}, \"Last-Modified\": {}, \"Checksum-Algorithm\": \"CRC32C\", \"Checksum\": \"{crc}\" }}",
                    json_str(&p),
                    json_str(modified)
                ));
            }
            None => {
                // As the server wrote it (key order of PostgreSQL's writer).
                let mut e = String::from("{ ");
                let mut first = true;
                for k in ["Path", "Encoded-Path", "Size", "Last-Modified", "Checksum-Algorithm", "Checksum"] {
                    if let Some(x) = f.get(k) {
                        if !first {
                            e.push_str(", ");
                        }
                        first = false;
                        e.push_str(&format!("{}: {}", json_str(k), x));
                    }
                }
                e.push_str(" }");
                out.push_str(&e);
            }
        }
    }
    out.push_str("\n],\n\"WAL-Ranges\": [\n");
    for (i, r) in ranges.iter().enumerate() {
        if i > 0 {
            out.push_str(",\n");
        }
        out.push_str(&format!(
            "{{ \"Timeline\": {}, \"Start-LSN\": {}, \"End-LSN\": {} }}",
            r.get("Timeline").context("WAL range without Timeline")?,
            r.get("Start-LSN").context("WAL range without Start-LSN")?,
            r.get("End-LSN").context("WAL range without End-LSN")?
        ));
    }
    out.push_str("\n],\n");
    let sum = hex::encode(sha2::Sha256::digest(out.as_bytes()));
    out.push_str(&format!("\"Manifest-Checksum\": \"{sum}\"}}\n"));
    Ok(out.into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_is_written_as_postgresql_does() {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().join("f");
        std::fs::write(&p, b"123456789").unwrap();
        // CRC-32C check value 0xe3069283, little-endian bytes.
        assert_eq!(crc32c_file(&p).unwrap(), (9, "839206e3".to_string()));
    }

    #[test]
    fn paths_of_reconstructed_files() {
        assert_eq!(reconstructed_path("base/5/INCREMENTAL.16384.1").as_deref(), Some("base/5/16384.1"));
        assert_eq!(reconstructed_path("global/INCREMENTAL.1262").as_deref(), Some("global/1262"));
        assert_eq!(
            reconstructed_path("pg_tblspc/16390/PG_17_202406281/5/INCREMENTAL.16391").as_deref(),
            Some("pg_tblspc/16390/PG_17_202406281/5/16391")
        );
        assert_eq!(reconstructed_path("pg_xact/INCREMENTAL.0000"), None);
        assert_eq!(reconstructed_path("base/5/16384"), None);
    }

    #[test]
    fn manifest_checksum_covers_everything_before_its_line() {
        let t = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(t.path().join("base/5")).unwrap();
        std::fs::write(t.path().join("base/5/1"), vec![0u8; 8192]).unwrap();
        std::fs::write(
            t.path().join("backup_label"),
            "START WAL LOCATION: 0/2000028 (file 000000010000000000000002)\n",
        )
        .unwrap();
        let m = br#"{ "PostgreSQL-Backup-Manifest-Version": 2, "System-Identifier": 7,
"Files": [
{ "Path": "backup_label", "Size": 1, "Last-Modified": "2026-11-30 00:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "00000000" },
{ "Path": "base/5/INCREMENTAL.1", "Size": 12, "Last-Modified": "2026-11-30 00:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "00000000" },
{ "Path": "PG_VERSION", "Size": 3, "Last-Modified": "2026-11-30 00:00:00 GMT", "Checksum-Algorithm": "CRC32C", "Checksum": "abcdef01" }
],
"WAL-Ranges": [
{ "Timeline": 1, "Start-LSN": "0/2000028", "End-LSN": "0/2000100" }
],
"Manifest-Checksum": "x"}
"#;
        let out = String::from_utf8(combined(m, t.path(), &Default::default()).unwrap()).unwrap();
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["Files"][1]["Path"], "base/5/1");
        assert_eq!(v["Files"][1]["Size"], 8192);
        assert_eq!(v["Files"][2]["Checksum"], "abcdef01");
        let (body, last) = out.trim_end_matches('\n').rsplit_once('\n').unwrap();
        let want = hex::encode(sha2::Sha256::digest(format!("{body}\n").as_bytes()));
        assert!(last.contains(&want), "{last}");
    }
}
