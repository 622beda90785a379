#!/usr/bin/env bash
# See walvault work in one command on a fresh Debian 12 machine (as root, or with sudo):
# builds walvault-agent, starts a scratch PostgreSQL 15 cluster (as an unprivileged user) on
# port 54329, streams its WAL into a local archive while pgbench writes, shows the agent's
# status and the archive, then stops everything. Besides /tmp/walvault-quickstart it installs
# what is missing from Debian (postgresql-15, whose default cluster it stops and removes, and
# build-essential), creates the system user walvault-pg (PostgreSQL refuses to run as root),
# and builds into /var/tmp/walvault-target. Needs a Rust toolchain 1.85 or newer (rustup).
set -euo pipefail
agent_pid=
cd "$(dirname "$0")/.."
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
DIR=/tmp/walvault-quickstart
PORT=54329
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

pkgs=()
[ -x "$PG_BIN/initdb" ] || pkgs+=(postgresql-15)
command -v cc >/dev/null || pkgs+=(build-essential)
if [ ${#pkgs[@]} -gt 0 ]; then
  sudo_ apt-get update -qq && sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
  if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q '^15 *main'; then
    sudo_ pg_dropcluster --stop 15 main || true
  fi
fi
command -v cargo >/dev/null || { echo "needs a Rust toolchain 1.85 or newer: https://rustup.rs" >&2; exit 1; }
rustc_minor=$(rustc --version | awk '{split($2, v, "."); print v[2]}')
[ "${rustc_minor:-0}" -ge 85 ] || { echo "rustc $(rustc --version) is too old: walvault needs 1.85 or newer (rustup update)" >&2; exit 1; }
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/walvault-target}
cargo build --release -p walvault-agent -p walvault-recover
AGENT=$CARGO_TARGET_DIR/release/walvault-agent
RECOVER=$CARGO_TARGET_DIR/release/walvault-recover

if [ "$(id -u)" = 0 ]; then
  id walvault-pg >/dev/null 2>&1 || useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin walvault-pg
  as_pg() { setpriv --reuid=walvault-pg --regid=walvault-pg --init-groups -- "$@"; }
else
  as_pg() { "$@"; }
fi
rm -rf "$DIR"; mkdir -p "$DIR"; chmod 755 "$DIR"
[ "$(id -u)" = 0 ] && chown walvault-pg: "$DIR"
as_pg "$PG_BIN/initdb" -D "$DIR/pgdata" -A trust -U postgres --no-sync >/dev/null
printf "port = $PORT\nunix_socket_directories = '$DIR'\nlisten_addresses = '127.0.0.1'\n" >> "$DIR/pgdata/postgresql.conf"
as_pg "$PG_BIN/pg_ctl" -D "$DIR/pgdata" -l "$DIR/postgres.log" -w start >/dev/null
trap '[ -n "$agent_pid" ] && { kill $agent_pid 2>/dev/null; wait $agent_pid 2>/dev/null; }; as_pg "$PG_BIN/pg_ctl" -D "$DIR/pgdata" -m fast -w stop >/dev/null || true' EXIT

echo "== walvault-agent run --pg-url postgresql://postgres@127.0.0.1:$PORT/postgres --archive file://$DIR/archive"
"$AGENT" run --pg-url "postgresql://postgres@127.0.0.1:$PORT/postgres" --archive "file://$DIR/archive" \
  --listen 127.0.0.1:9187 2> "$DIR/agent.log" &
agent_pid=$!
sleep 2
echo "== pgbench writes for 10 s"
as_pg "$PG_BIN/pgbench" -h "$DIR" -p $PORT -U postgres -i -s 5 -q postgres >/dev/null 2>&1
as_pg "$PG_BIN/pgbench" -h "$DIR" -p $PORT -U postgres -T 10 -c 2 -n postgres | grep -E '^tps'
sleep 2
echo "== agent status (http://127.0.0.1:9187/status)"
exec 3<>/dev/tcp/127.0.0.1/9187 && printf 'GET /status HTTP/1.0\r\n\r\n' >&3 && sed -n '/^{/p' <&3 | tr ',' '\n'; echo; exec 3<&-
echo "== server flush LSN: $(as_pg "$PG_BIN/psql" -h "$DIR" -p $PORT -U postgres -Atc 'select pg_current_wal_flush_lsn()' postgres)"
echo "== archive ($DIR/archive), newest objects:"
(cd "$DIR/archive" && find . -path ./.tmp -prune -o -type f -print | sort | tail -n 8)
echo "== walvault-recover list --archive file://$DIR/archive"
"$RECOVER" list --archive "file://$DIR/archive"
kill -TERM $agent_pid; wait $agent_pid && echo "== agent stopped cleanly (exit 0); its log: $DIR/agent.log"
agent_pid=""
