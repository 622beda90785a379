//! Where a backup's tar archives go, and unpacking them there safely.
//!
//! The archive is not trusted to say where to write: a tablespace is restored to its recorded
//! location only if that location is an absolute, normalised path, the backup's own
//! `pg_tblspc/<oid>` link in `base.tar` points to exactly it, and (unless `--tablespace-mapping
//! OLD=NEW` moves it) it is absent or empty — even `--force` never empties a tablespace location
//! that was not mapped, since it may belong to a live server. Tar entries are unpacked by the
//! `tar` crate's `unpack_in` (no `..`, no absolute paths, no writes through symlinks or hard
//! links) with every mode masked to the owner (`& 0700`, no setuid/setgid/sticky), without the
//! archive's ownerships; the tree is then given to `--owner` with `lchown`, never by running
//! `chown`. The `pg_tblspc` links are made by us, pointing to the destination.

use std::io::Read;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, Context, Result};
use walvault_shared::archive::backup::BackupDescription;

/// Mode bits never taken from the archive: setuid, setgid, sticky, and everything for group
/// and others.
pub const MODE_MASK: u32 = 0o7077;

/// Where one tar archive of the backup is unpacked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Index into the backup's `archives`.
    pub archive: usize,
    pub dir: PathBuf,
    /// For a tablespace: its OID and the location recorded at backup time.
    pub tablespace: Option<(u32, PathBuf)>,
}

/// An absolute path without `.`/`..` components or repeated separators, or why not.
fn normalised(s: &str) -> Result<PathBuf> {
    let p = Path::new(s);
    let ok = s.len() > 1
        && s.starts_with('/')
        && s[1..].split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && !s.chars().any(|c| c.is_control());
    if !ok {
        bail!("tablespace location {s:?} is not an absolute, normalised path\nHINT: the backup description was forged or damaged; do not restore it");
    }
    Ok(p.to_path_buf())
}

/// Parse `--tablespace-mapping OLD=NEW` (both absolute).
pub fn parse_mapping(s: &str) -> Result<(PathBuf, PathBuf)> {
    let (old, new) = s
        .split_once('=')
        .with_context(|| format!("invalid --tablespace-mapping {s:?}\nHINT: write OLD=NEW, both absolute paths"))?;
    Ok((normalised(old)?, normalised(new)?))
}

/// A mapping that puts every tablespace of `backup` under `root/<oid>`.
pub fn map_all_under(backup: &BackupDescription, root: &Path) -> Result<Vec<(PathBuf, PathBuf)>> {
    let mut m = Vec::new();
    for a in backup.archives.iter().filter(|a| !a.location.is_empty()) {
        let oid = a.name.strip_suffix(".tar").unwrap_or(&a.name);
        m.push((normalised(&a.location)?, root.join(oid)));
    }
    Ok(m)
}

/// The destination of every archive of `backup`: the main one into `pgdata` (listed first, as
/// it is unpacked first), each tablespace to its location or its mapping.
pub fn destinations(
    backup: &BackupDescription,
    pgdata: &Path,
    mapping: &[(PathBuf, PathBuf)],
) -> Result<Vec<Destination>> {
    let mut out = Vec::new();
    let mut used = Vec::new();
    for (i, a) in backup.archives.iter().enumerate() {
        if a.location.is_empty() {
            out.insert(0, Destination { archive: i, dir: pgdata.to_path_buf(), tablespace: None });
            continue;
        }
        let oid: u32 = a.name.strip_suffix(".tar").and_then(|n| n.parse().ok()).with_context(|| {
            format!("backup {}: tablespace archive {:?} is not named OID.tar\nHINT: the backup description was forged or damaged", backup.id, a.name)
        })?;
        let location = normalised(&a.location)?;
        let dir =
            mapping.iter().find(|(old, _)| *old == location).map(|(_, new)| new.clone()).unwrap_or(location.clone());
        if dir.starts_with(pgdata) || pgdata.starts_with(&dir) {
            bail!("tablespace {oid} would be restored to {}, inside or around the data directory {}\nHINT: map it elsewhere with --tablespace-mapping {}=NEW", dir.display(), pgdata.display(), location.display());
        }
        used.push(location.clone());
        out.push(Destination { archive: i, dir, tablespace: Some((oid, location)) });
    }
    if out.first().is_none_or(|d| d.tablespace.is_some()) {
        bail!("backup {} has no main data directory archive (base.tar)", backup.id);
    }
    for (old, _) in mapping {
        if !used.contains(old) {
            bail!(
                "--tablespace-mapping {}: the backup has no tablespace there\nHINT: its tablespaces are at: {}",
                old.display(),
                used.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
            );
        }
    }
    Ok(out)
}

/// Whether a directory is absent or empty.
pub fn is_empty_dir(p: &Path) -> Result<bool> {
    match std::fs::read_dir(p) {
        Ok(mut rd) => Ok(rd.next().is_none()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e).with_context(|| format!("read {}", p.display())),
    }
}

/// Every check on the destinations, before anything is written: no running server uses them;
/// the data directory is empty (or `--force`); a tablespace destination is empty, or mapped and
/// `--force`.
pub fn check(dests: &[Destination], mapping: &[(PathBuf, PathBuf)], force: bool) -> Result<()> {
    for d in dests {
        if let Some(live) = crate::pgdata::running_server(&d.dir) {
            bail!(
                "{} is in use by a running server: {live}\nHINT: restore into another directory; stop that server first only if you mean to replace its data (even --force never touches a running server's files)",
                d.dir.display()
            );
        }
        if is_empty_dir(&d.dir)? {
            continue;
        }
        match &d.tablespace {
            None if force => {}
            None => bail!(
                "target directory {} is not empty\nHINT: restore into an empty directory, or pass --force to empty it first (its contents are deleted)",
                d.dir.display()
            ),
            Some((oid, loc)) => {
                let mapped = mapping.iter().any(|(old, _)| old == loc);
                if !(mapped && force) {
                    bail!(
                        "tablespace {oid} would be restored to {}, which is not empty\nHINT: {}",
                        d.dir.display(),
                        if mapped {
                            "empty it, or pass --force to empty it first".to_string()
                        } else {
                            format!("restore it elsewhere with --tablespace-mapping {}=/new/empty/dir (--force never empties an unmapped tablespace location)", loc.display())
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

/// Empty a directory (after every check passed), keeping the directory itself.
pub fn empty_dir(dir: &Path) -> Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).with_context(|| format!("read {}", dir.display())),
    };
    for e in rd {
        let p = e?.path();
        let ft = std::fs::symlink_metadata(&p)?.file_type();
        if ft.is_dir() {
            std::fs::remove_dir_all(&p).with_context(|| format!("remove {}", p.display()))?;
        } else {
            std::fs::remove_file(&p).with_context(|| format!("remove {}", p.display()))?;
        }
    }
    Ok(())
}

/// Create `dir` (and missing parents) with mode 0700, owned by `owner`.
pub fn create_private_dir(dir: &Path, owner: Option<(u32, u32)>) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("create {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(dir, Some(uid), Some(gid)).with_context(|| format!("chown {}", dir.display()))?;
    }
    Ok(())
}

/// Unpack one tar stream into `dest`. For the main archive, `pg_tblspc/<oid>` links are not
/// taken from the tar: their targets are returned (to be checked against the description) and
/// links to `links[oid]` are made instead.
pub fn unpack(reader: impl Read, dest: &Path, links: &[(u32, PathBuf)]) -> Result<Vec<(u32, PathBuf)>> {
    unpack_with(reader, dest, links, None)
}

/// What [`unpack_with`] needs to start reconstructions: the combiner, the archive's name, and
/// whether it is a tablespace's.
pub type CombineHook<'a> = (&'a mut super::combine::Combiner, &'a str, bool);

/// [`unpack`], and with `combine` (the newest backup of an incremental chain), each
/// `INCREMENTAL.*` relation file starts a reconstruction instead of being unpacked as is.
pub fn unpack_with(
    reader: impl Read,
    dest: &Path,
    links: &[(u32, PathBuf)],
    mut combine: Option<CombineHook<'_>>,
) -> Result<Vec<(u32, PathBuf)>> {
    let mut ar = tar::Archive::new(reader);
    ar.set_preserve_permissions(true);
    ar.set_mask(MODE_MASK);
    ar.set_preserve_ownerships(false);
    ar.set_unpack_xattrs(false);
    ar.set_overwrite(false);
    let mut seen = Vec::new();
    for entry in ar.entries().with_context(|| format!("read the tar stream for {}", dest.display()))? {
        let mut entry = entry.with_context(|| format!("read the tar stream for {}", dest.display()))?;
        let path = entry.path()?.into_owned();
        if let Some(oid) = tablespace_link(&path) {
            if entry.header().entry_type() != tar::EntryType::Symlink {
                bail!("{} in the backup is not a symbolic link", path.display());
            }
            let target = entry.link_name()?.context("tablespace link without a target")?.into_owned();
            seen.push((oid, target));
            if let Some((_, to)) = links.iter().find(|(o, _)| *o == oid) {
                let dir = dest.join("pg_tblspc");
                std::fs::create_dir_all(&dir)?;
                let at = dir.join(oid.to_string());
                std::os::unix::fs::symlink(to, &at)
                    .with_context(|| format!("link {} -> {}", at.display(), to.display()))?;
            }
            continue;
        }
        if let Some((combiner, archive, tablespace)) = combine.as_mut() {
            if entry.header().entry_type() == tar::EntryType::Regular {
                if let Some(target) = super::combine::incremental_target(&path, *tablespace) {
                    let size = entry.header().size()?;
                    combiner.start(archive, dest, &path, &target, size, &mut entry)?;
                    continue;
                }
            }
        }
        if !entry.unpack_in(dest).with_context(|| format!("extract {} into {}", path.display(), dest.display()))? {
            bail!("the backup's tar entry {} points outside {}; refusing it", path.display(), dest.display());
        }
    }
    Ok(seen)
}

/// `pg_tblspc/<oid>` → oid.
fn tablespace_link(path: &Path) -> Option<u32> {
    let mut c = path.components();
    match (c.next(), c.next(), c.next()) {
        (Some(Component::Normal(a)), Some(Component::Normal(b)), None) if a == "pg_tblspc" => b.to_str()?.parse().ok(),
        _ => None,
    }
}

/// The links found in `base.tar` must point where the description says each tablespace was.
pub fn check_links(dests: &[Destination], seen: &[(u32, PathBuf)]) -> Result<()> {
    for d in dests {
        let Some((oid, loc)) = &d.tablespace else { continue };
        match seen.iter().find(|(o, _)| o == oid) {
            Some((_, target)) if target == loc => {}
            Some((_, target)) => bail!(
                "backup description says tablespace {oid} was at {}, but the backup's own pg_tblspc/{oid} link points to {}; refusing both\nHINT: the backup was forged or damaged; do not restore it",
                loc.display(),
                target.display()
            ),
            None => bail!(
                "backup description names tablespace {oid} at {}, but the backup has no pg_tblspc/{oid} link; refusing it\nHINT: the backup was forged or damaged; do not restore it",
                loc.display()
            ),
        }
    }
    Ok(())
}

/// Give `root` and everything under it to `uid:gid`, links themselves (never their targets).
pub fn chown_tree(root: &Path, uid: u32, gid: u32) -> Result<()> {
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        std::os::unix::fs::lchown(&p, Some(uid), Some(gid)).with_context(|| format!("chown {}", p.display()))?;
        let ft = std::fs::symlink_metadata(&p)?.file_type();
        if ft.is_dir() {
            for e in std::fs::read_dir(&p)? {
                stack.push(e?.path());
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use walvault_shared::archive::backup::ArchiveInfo;

    fn desc(archives: &[(&str, &str)]) -> BackupDescription {
        BackupDescription {
            format_version: 2,
            id: "20261126T141500Z".into(),
            label: String::new(),
            start_lsn: walvault_shared::lsn::Lsn(0),
            stop_lsn: walvault_shared::lsn::Lsn(0),
            timeline: walvault_shared::lsn::TimelineId(1),
            stop_timeline: walvault_shared::lsn::TimelineId(1),
            start_time: chrono::Utc::now(),
            stop_time: chrono::Utc::now(),
            pg_version_num: 150000,
            system_identifier: "1".into(),
            wal_segment_size: 16 << 20,
            archives: archives
                .iter()
                .map(|(n, l)| ArchiveInfo { name: n.to_string(), location: l.to_string(), parts: vec![], raw_bytes: 0 })
                .collect(),
            manifest_bytes: 0,
            raw_bytes: 0,
            stored_bytes: 0,
            duration_seconds: 0.0,
            parent: None,
            incremental_from: None,
            chain_depth: 0,
            manifest_sha256: None,
            block_size: None,
            relseg_blocks: None,
        }
    }

    #[test]
    fn hostile_locations_are_refused_and_mappings_apply() {
        let pg = Path::new("/srv/restore/data");
        let d = destinations(&desc(&[("16384.tar", "/srv/ts1"), ("base.tar", "")]), pg, &[]).unwrap();
        assert_eq!(d[0].dir, pg, "the main archive comes first");
        assert_eq!(d[1].dir, Path::new("/srv/ts1"));
        let m = vec![parse_mapping("/srv/ts1=/srv/restore/ts1").unwrap()];
        let d = destinations(&desc(&[("16384.tar", "/srv/ts1"), ("base.tar", "")]), pg, &m).unwrap();
        assert_eq!(d[1].dir, Path::new("/srv/restore/ts1"));
        for bad in ["relative/dir", "/srv/../root/.ssh", "/srv//x", "/srv/./x", "/srv/x\n"] {
            assert!(destinations(&desc(&[("16384.tar", bad), ("base.tar", "")]), pg, &[]).is_err(), "{bad:?}");
        }
        assert!(destinations(&desc(&[("evil.tar", "/srv/ts"), ("base.tar", "")]), pg, &[]).is_err());
        assert!(destinations(&desc(&[("16384.tar", "/srv/restore/data/x"), ("base.tar", "")]), pg, &[]).is_err());
        assert!(destinations(&desc(&[("16384.tar", "/srv/ts1")]), pg, &[]).is_err(), "no base.tar");
        let unknown = vec![parse_mapping("/nope=/x").unwrap()];
        assert!(destinations(&desc(&[("base.tar", "")]), pg, &unknown)
            .unwrap_err()
            .to_string()
            .contains("no tablespace there"));
        assert!(parse_mapping("rel=/x").is_err() && parse_mapping("/x").is_err());
    }

    #[test]
    fn unmapped_non_empty_tablespace_is_refused_even_with_force() {
        let t = tempfile::tempdir().unwrap();
        let ts = t.path().join("ts");
        std::fs::create_dir(&ts).unwrap();
        std::fs::write(ts.join("precious"), b"x").unwrap();
        let dests = vec![
            Destination { archive: 1, dir: t.path().join("data"), tablespace: None },
            Destination { archive: 0, dir: ts.clone(), tablespace: Some((16384, ts.clone())) },
        ];
        let e = check(&dests, &[], true).unwrap_err().to_string();
        assert!(e.contains("--tablespace-mapping") && e.contains("never empties"), "{e}");
        // Mapped (to itself, for the test) and --force: allowed.
        check(&dests, &[(ts.clone(), ts.clone())], true).unwrap();
        assert!(check(&dests, &[(ts.clone(), ts.clone())], false).is_err());
    }

    #[test]
    fn unpack_masks_modes_and_checks_tablespace_links() {
        let t = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o4755);
        h.set_entry_type(tar::EntryType::Regular);
        b.append_data(&mut h, "bin/setuid", &b"abc"[..]).unwrap();
        let mut l = tar::Header::new_gnu();
        l.set_entry_type(tar::EntryType::Symlink);
        l.set_size(0);
        b.append_link(&mut l, "pg_tblspc/16384", "/srv/original").unwrap();
        let data = b.into_inner().unwrap();
        let dest = t.path().join("data");
        create_private_dir(&dest, None).unwrap();
        std::fs::create_dir(dest.join("pg_tblspc")).unwrap();
        let to = t.path().join("mapped");
        let seen = unpack(&data[..], &dest, &[(16384, to.clone())]).unwrap();
        assert_eq!(seen, vec![(16384, PathBuf::from("/srv/original"))]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dest.join("bin/setuid")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "setuid and group/other bits masked");
        assert_eq!(std::fs::read_link(dest.join("pg_tblspc/16384")).unwrap(), to);
        let ok = vec![Destination {
            archive: 0,
            dir: to.clone(),
            tablespace: Some((16384, PathBuf::from("/srv/original"))),
        }];
        check_links(&ok, &seen).unwrap();
        let lie = vec![Destination { archive: 0, dir: to, tablespace: Some((16384, PathBuf::from("/root/.ssh"))) }];
        assert!(check_links(&lie, &seen).unwrap_err().to_string().contains("forged"));
    }
}
