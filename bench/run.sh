#!/usr/bin/env bash
# Benchmarks of walvault against the tools users compare it with, side by side in one run,
# reported as ratios in bench/RESULTS.md. Needs what tests/run.sh installs (PostgreSQL 15, and
# 17 in /opt/walvault-test-env/pg/17, SeaweedFS in /opt/walvault-test-env); installs pgbackrest
# and time from apt if missing.
#
#   bench/run.sh            full run, medians of 3, writes bench/RESULTS.md (23 minutes measured
#                           on 2 cores, after the release build)
#   bench/run.sh --single   one run each, backups/dumps of a scale-100 database, incrementals of scale 300
#                           (1.5 GiB), writes bench/RESULTS.md (about 30 minutes)
#   bench/run.sh --quick    small workloads, one run each, writes $TMPDIR/walvault-bench-quick.md
#                           (a smoke test: about 4 minutes)
#   bench/run.sh --soak     the agents' memory over 60 minutes of OLTP (WALVAULT_SOAK_MINUTES),
#                           local and S3 at once: RSS at the end against 5 minutes, bench/SOAK.md
#
# What is compared (module docs of bench/src/main.rs and bench/src/bin/backup.rs say how):
#   1. WAL archiving under a bulk load and under OLTP: walvault-agent (local dir and S3) vs
#      pg_receivewal (default and --synchronous) vs pgbackrest archive-push async vs no archiver:
#      lag, CPU per GiB, peak RSS, stored size, load time / TPS
#   2. commit-to-archive latency of walvault at chunk intervals 200ms, 1s, 5s
#   3. base backup vs pg_basebackup and pgbackrest backup; restore vs pgbackrest restore; replay
#      through wal-fetch (local archive and SeaweedFS) vs pgbackrest archive-get vs WAL in pg_wal
#   4. incremental backups on PostgreSQL 17 vs full ones and vs pgbackrest --type=incr; restore
#      of a chain vs a full restore and vs copying the chain out + pg_combinebackup
#   5. synchronous mode: commit latency and TPS with walvault-agent --synchronous (local, S3) vs
#      pg_receivewal --synchronous, at 1, 4 and 16 clients
#   6. a logical export of one table at a point in time: walvault-recover dump vs the same steps
#      by hand vs pg_dump of the live database
# Everything runs under a private directory that is removed at exit, with every server stopped.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
single=0
soak=0
[ "${1:-}" = "--quick" ] && quick=1
[ "${1:-}" = "--single" ] && single=1
[ "${1:-}" = "--soak" ] && soak=1
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/walvault-target}
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
missing=()
command -v pgbackrest >/dev/null || missing+=(pgbackrest)
[ -x /usr/bin/time ] || missing+=(time)
if [ ${#missing[@]} -gt 0 ]; then
  sudo_ apt-get update -qq
  sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi
[ -x /usr/lib/postgresql/15/bin/postgres ] || { echo "PostgreSQL 15 missing: run tests/run.sh once (it installs it)" >&2; exit 1; }
[ -x /opt/walvault-test-env/bin/weed ] || { echo "SeaweedFS missing: run tests/run.sh once (it installs it)" >&2; exit 1; }
PG17_BIN=/opt/walvault-test-env/pg/17/bin
[ -x $PG17_BIN/pg_combinebackup ] || { echo "PostgreSQL 17 missing: run tests/run.sh once (it installs it)" >&2; exit 1; }

cargo build --release -p walvault-agent -p walvault-recover
cargo build -p walvault-bench

# A private test root: every cluster, archive and S3 server of this run lives under it.
WALVAULT_TEST_DIR=$(mktemp -d /tmp/walvault-bench.XXXXXX)
export WALVAULT_TEST_DIR
chmod 1777 "$WALVAULT_TEST_DIR"
unset WALVAULT_TEST_S3_ENDPOINT
cleanup() {
  # Servers of an interrupted run: anything whose command line names our directory.
  for pid in $(pgrep -f "$WALVAULT_TEST_DIR" || true); do kill -9 "$pid" 2>/dev/null || true; done
  rm -rf "$WALVAULT_TEST_DIR"
}
trap cleanup EXIT

if [ $soak = 1 ]; then
  # The agents' memory over a long OLTP run (issue #16): WALVAULT_SOAK_MINUTES (default 60)
  # against the first 5 minutes; writes bench/SOAK.md.
  "$CARGO_TARGET_DIR/debug/walvault-bench-soak" --minutes "${WALVAULT_SOAK_MINUTES:-60}" --out "$WALVAULT_TEST_DIR/soak.md"
  {
    echo "# walvault soak result"
    echo
    echo "- machine: $(nproc) cores, $(uname -sr); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown); walvault release builds"
    echo "- command: \`WALVAULT_SOAK_MINUTES=${WALVAULT_SOAK_MINUTES:-60} bench/run.sh --soak\`"
    echo
    cat "$WALVAULT_TEST_DIR/soak.md"
  } > bench/SOAK.md
  exit 0
fi

# WALVAULT_BENCH_OUT keeps each part's table (e.g. to read the parts of an interrupted run).
out=${WALVAULT_BENCH_OUT:-$WALVAULT_TEST_DIR/out}
mkdir -p "$out"
t0=$(date +%s)
if [ $quick = 1 ]; then
  stream_args=(--bulk-scale 10 --seconds 5 --runs 1 --latency-seconds 5)
  backup_args=(--scale 10 --wal-mib 64 --runs 1)
  incr_args=(--scale 10 --runs 1)
  sync_args=(--seconds 3 --clients 1,4)
  dump_args=(--scale 10 --runs 1)
  results=${TMPDIR:-/tmp}/walvault-bench-quick.md
else
  stream_args=(--bulk-scale 100 --seconds 20 --runs 3 --latency-seconds 15)
  backup_args=(--scale 300 --wal-mib 1024 --runs 3)
  incr_args=(--scale 300 --runs 1)
  sync_args=(--seconds 10 --clients 1,4,16 --runs 3)
  dump_args=(--scale 300 --runs 4)
  if [ $single = 1 ]; then
    # One run each and scale 100 databases (1.5 GiB) for backups and dumps; incrementals at
    # the scale their issue states (300: 4.5 GiB, about 8 minutes).
    stream_args=(--bulk-scale 100 --seconds 20 --runs 1 --latency-seconds 15)
    backup_args=(--scale 100 --wal-mib 512 --runs 1)
    incr_args=(--scale 300 --runs 1)
    dump_args=(--scale 100 --runs 2)
  fi
  results=bench/RESULTS.md
fi
# With WALVAULT_BENCH_OUT, a part whose table is already there is not run again (resuming an
# interrupted invocation with the same arguments).
kept=()
part() {
  local name=$1; shift
  if [ -n "${WALVAULT_BENCH_OUT:-}" ] && [ -s "$out/$name.md" ]; then
    echo "[$name: kept from $out/$name.md]"
    kept+=("$name")
  else
    "$@" --out "$out/$name.md"
  fi
}
part stream "$CARGO_TARGET_DIR/debug/walvault-bench" "${stream_args[@]}"
part backup "$CARGO_TARGET_DIR/debug/walvault-bench-backup" "${backup_args[@]}"
part incremental env PG_BIN=$PG17_BIN "$CARGO_TARGET_DIR/debug/walvault-bench-incremental" "${incr_args[@]}"
part sync "$CARGO_TARGET_DIR/debug/walvault-bench-sync" "${sync_args[@]}"
part dump "$CARGO_TARGET_DIR/debug/walvault-bench-dump" "${dump_args[@]}"
elapsed=$(( $(date +%s) - t0 ))
{
  echo "# walvault benchmark results"
  echo
  echo "- machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB, $(uname -sr), $(. /etc/os-release && echo "$PRETTY_NAME")"
  echo "- date: $(date -u +%Y-%m-%dT%H:%MZ); commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "- versions: PostgreSQL $(/usr/lib/postgresql/15/bin/postgres --version | awk '{print $3}'), $(pgbackrest version), walvault release builds, SeaweedFS $(/opt/walvault-test-env/bin/weed version 2>/dev/null | awk '{print $3; exit}')"
  echo "- command: \`bench/run.sh$([ $quick = 1 ] && echo ' --quick')$([ $single = 1 ] && echo ' --single')\` (walvault-bench ${stream_args[*]}; walvault-bench-backup ${backup_args[*]}; walvault-bench-incremental ${incr_args[*]} with PostgreSQL $($PG17_BIN/postgres --version | awk '{print $3}'); walvault-bench-sync ${sync_args[*]}; walvault-bench-dump ${dump_args[*]}); ${elapsed} s"
  if [ $single = 1 ] || [ $quick = 1 ]; then
    echo "- every cell is one run; ratios are from this one invocation. This is a shared 2-core VM: absolute figures move between invocations (by up to about 0.2 in the ratios), compare within one file."
  else
    echo "- every cell is the median (min–max) of the runs; ratios are ratios of medians, all from this one invocation. This is a shared 2-core VM: absolute figures move between invocations, compare within one file."
  fi
  echo "- every timed step (a load, a backup, a restore, a replay, an export) starts after sync(2), so none is charged for the writeback of the step before it."
  if [ ${#kept[@]} -gt 0 ]; then
    echo "- parts kept from an earlier invocation with the same arguments (WALVAULT_BENCH_OUT): ${kept[*]}; each part's own date line says when it ran, and its ratios are within that part."
  fi
  echo
  cat "$out/stream.md"
  echo
  cat "$out/backup.md"
  echo
  cat "$out/incremental.md"
  echo
  cat "$out/sync.md"
  echo
  cat "$out/dump.md"
} > "$results"
echo "wrote $results (${elapsed} s)"
