#!/usr/bin/env bash
# See walvault work in one command on a fresh Debian 12 machine (as root, or with sudo):
# builds walvault-agent, starts a scratch PostgreSQL 15 cluster (as an unprivileged user) on
# port 54329, streams its WAL into a local archive while pgbench writes, shows the agent's
# status and the archive, then stops everything. Nothing outside /tmp/walvault-quickstart
# is touched (PostgreSQL 15 is installed from Debian if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
DIR=/tmp/walvault-quickstart
PORT=54329
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if [ ! -x "$PG_BIN/initdb" ]; then
  sudo_ apt-get update -qq && sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql-15
fi
command -v cargo >/dev/null || { echo "needs a Rust toolchain (https://rustup.rs)" >&2; exit 1; }
cargo build --release -p walvault-agent
AGENT=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/release/walvault-agent

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
trap 'kill $agent_pid 2>/dev/null || true; wait $agent_pid 2>/dev/null || true; as_pg "$PG_BIN/pg_ctl" -D "$DIR/pgdata" -m fast -w stop >/dev/null || true' EXIT

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
python3 -c 'import json,urllib.request; print(json.dumps(json.load(urllib.request.urlopen("http://127.0.0.1:9187/status")), indent=2))'
echo "== server flush LSN: $(as_pg "$PG_BIN/psql" -h "$DIR" -p $PORT -U postgres -Atc 'select pg_current_wal_flush_lsn()' postgres)"
echo "== archive ($DIR/archive), newest objects:"
(cd "$DIR/archive" && find . -path ./.tmp -prune -o -type f -print | sort | tail -n 8)
kill -TERM $agent_pid; wait $agent_pid && echo "== agent stopped cleanly (exit 0); its log: $DIR/agent.log"
