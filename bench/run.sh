#!/usr/bin/env bash
# Benchmarks of walvault against the tools users compare it with, side by side in one run,
# reported as ratios in bench/RESULTS.md. Needs what tests/run.sh installs (PostgreSQL 15).
#
#   bench/run.sh            full run (medians of 3; about 20-30 minutes on 2 cores)
#   bench/run.sh --quick    smaller workloads, one run each (a few minutes; a smoke test)
#
# What is compared (see the module docs of bench/src/main.rs and bench/src/bin/backup.rs):
#   1. WAL streaming under pgbench: walvault-agent vs pg_receivewal (lag, CPU/GiB, RSS, stored size)
#   2. base backup: walvault-agent backup vs pg_basebackup -Ft -Z client-zstd vs pgbackrest
#      backup --type=full (zst, process-max 1 and 2)
#   3. restore MB/s (vs pgbackrest restore), and replay of the WAL after the backup: wal-fetch
#      with/without prefetch vs pg_wal
# Not yet compared: pgBackRest archive-push (async) for streaming, archive-get for replay.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
[ "${1:-}" = "--quick" ] && quick=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/walvault-target}
if ! command -v pgbackrest >/dev/null; then
  sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
  sudo_ apt-get update -qq && sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq pgbackrest
fi
cargo build --release -p walvault-agent -p walvault-recover
cargo build -p walvault-bench
out=$(mktemp -d)
if [ $quick = 1 ]; then
  "$CARGO_TARGET_DIR/debug/walvault-bench" --scale 5 --seconds 5 --runs 1 --out "$out/stream.md"
  "$CARGO_TARGET_DIR/debug/walvault-bench-backup" --scale 5 --wal-mib 64 --runs 1 --out "$out/backup.md"
else
  "$CARGO_TARGET_DIR/debug/walvault-bench" --scale 20 --seconds 20 --runs 3 --out "$out/stream.md"
  "$CARGO_TARGET_DIR/debug/walvault-bench-backup" --scale 50 --wal-mib 512 --runs 3 --out "$out/backup.md"
fi
results=bench/RESULTS.md
[ $quick = 1 ] && results="$out/RESULTS.md"
{
  echo "# walvault benchmark results"
  echo
  echo "Machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(uname -sr); PostgreSQL $(/usr/lib/postgresql/15/bin/postgres --version | awk '{print $3}'); $(date -u +%Y-%m-%dT%H:%MZ)."
  echo "Command: bench/run.sh$([ $quick = 1 ] && echo ' --quick'). Timings on this shared 2-core machine are noisy; compare only within one run."
  echo
  cat "$out/stream.md"
  echo
  cat "$out/backup.md"
} > "$results"
echo "wrote $results"
