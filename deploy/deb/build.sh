#!/usr/bin/env bash
# Build the walvault Debian package (both binaries, stripped; man pages and shell completions
# generated from the command lines; the systemd units; example configs; a `walvault` system user
# created on install) with dpkg-deb only.
#
#   deploy/deb/build.sh [--profile release|dev] [--out DIR]     → DIR/walvault_<version>_amd64.deb
#
# --profile dev packages the debug build (what the package test in tests/run.sh uses, to save a
# release build); releases use the default, release.
set -euo pipefail
cd "$(dirname "$0")/../.."
profile=release
out=${CARGO_TARGET_DIR:-/var/tmp/walvault-target}/deb
while [ $# -gt 0 ]; do
  case "$1" in
    --profile) profile=$2; shift ;;
    --out) out=$2; shift ;;
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
target=${CARGO_TARGET_DIR:-/var/tmp/walvault-target}
if [ "$profile" = release ]; then
  cargo build --release --locked -p walvault-agent -p walvault-recover
  bindir=$target/release
else
  cargo build --locked -p walvault-agent -p walvault-recover
  bindir=$target/debug
fi
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
for b in walvault-agent walvault-recover; do
  install -D -m 755 "$bindir/$b" "$stage/usr/bin/$b"
  strip --strip-unneeded "$stage/usr/bin/$b"
  "$stage/usr/bin/$b" generate-docs "$stage/gen-$b"
  install -D -m 644 "$stage/gen-$b/man/$b.1" "$stage/usr/share/man/man1/$b.1"
  gzip -9n "$stage/usr/share/man/man1/$b.1"
  install -D -m 644 "$stage/gen-$b/completions/$b.bash" "$stage/usr/share/bash-completion/completions/$b"
  install -D -m 644 "$stage/gen-$b/completions/_$b" "$stage/usr/share/zsh/vendor-completions/_$b"
  install -D -m 644 "$stage/gen-$b/completions/$b.fish" "$stage/usr/share/fish/vendor_completions.d/$b.fish"
  rm -rf "$stage/gen-$b"
done
for u in deploy/systemd/*.service deploy/systemd/*.timer; do
  install -D -m 644 "$u" "$stage/lib/systemd/system/$(basename "$u")"
  sed -i 's|/usr/local/bin/|/usr/bin/|g' "$stage/lib/systemd/system/$(basename "$u")"
done
for f in deploy/config/*.toml deploy/observability/*; do
  install -D -m 644 "$f" "$stage/usr/share/doc/walvault/examples/$(basename "$f")"
done
install -D -m 644 README.md "$stage/usr/share/doc/walvault/README.md"
install -D -m 644 docs/operations.md "$stage/usr/share/doc/walvault/operations.md"
install -D -m 644 docs/archive-format.md "$stage/usr/share/doc/walvault/archive-format.md"
mkdir -p "$stage/DEBIAN"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: walvault
Version: $version
Architecture: $arch
Maintainer: walvault developers <walvault@localhost>
Installed-Size: $size
Depends: libc6 (>= 2.34), adduser
Recommends: postgresql-client
Suggests: age
Section: database
Priority: optional
Homepage: https://github.com/walvault/walvault
Description: PostgreSQL point-in-time recovery to object storage, RPO in seconds
 walvault-agent streams PostgreSQL's WAL into S3-compatible object storage (or a local
 directory) in small chunks, reporting WAL as flushed only once it is durable in the archive,
 takes base backups (incremental on PostgreSQL 17+) and applies retention.
 walvault-recover restores to any point in time, serves as restore_command, audits the RPO
 achieved, runs restore drills and makes logical exports at a point in time.
CONTROL
cat > "$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
  if ! getent passwd walvault >/dev/null; then
    adduser --system --group --home /var/lib/walvault --shell /usr/sbin/nologin \
      --gecos "walvault WAL archiver" walvault >/dev/null
  fi
  install -d -m 0750 -o root -g walvault /etc/walvault
  install -d -m 0700 -o walvault -g walvault /var/lib/walvault
  if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null || true; fi
fi
exit 0
POSTINST
cat > "$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then systemctl daemon-reload >/dev/null || true; fi
if [ "$1" = purge ]; then
  # /var/lib/walvault may hold a local archive: it is never removed by the package.
  if getent passwd walvault >/dev/null && command -v deluser >/dev/null; then deluser --system walvault >/dev/null 2>&1 || true; fi
fi
exit 0
POSTRM
chmod 755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/postrm"
mkdir -p "$out"
deb="$out/walvault_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
