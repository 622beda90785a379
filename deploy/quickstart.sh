#!/usr/bin/env bash
# See walvault work in one command on a fresh Debian 12 machine (as root, or with sudo):
# builds walvault-agent and walvault-recover, starts a scratch PostgreSQL 15 cluster (as an
# unprivileged user) on port 54329, streams its WAL into a local archive while pgbench writes,
# shows the agent's status and the archive, then stops everything it started — also when a
# step fails, in which case it prints the end of the log that explains why.
#
# Besides /tmp/walvault-quickstart it installs what is missing from Debian (postgresql-15,
# whose default cluster it stops and removes, and build-essential), creates the system user
# walvault-pg (PostgreSQL refuses to run as root), and builds into /var/tmp/walvault-target.
# Needs a Rust toolchain 1.85 or newer (rustup).
#
# Settings (environment): QUICKSTART_PG_PORT (54329), QUICKSTART_LISTEN_PORT (9187, the agent's
# status endpoint), QUICKSTART_BIN_DIR (use walvault binaries already built there instead of
# building), QUICKSTART_PROFILE (release; debug builds faster).
set -euo pipefail
cd "$(dirname "$0")/.."
PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
DIR=/tmp/walvault-quickstart
PORT=${QUICKSTART_PG_PORT:-54329}
LISTEN_PORT=${QUICKSTART_LISTEN_PORT:-9187}
PROFILE=${QUICKSTART_PROFILE:-release}
agent_pid=
pg_started=
sudo_() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# PostgreSQL refuses to run as root: as root, its programs run as walvault-pg.
if [ "$(id -u)" = 0 ]; then
  as_pg() { setpriv --reuid=walvault-pg --regid=walvault-pg --init-groups -- "$@"; }
else
  as_pg() { "$@"; }
fi

# Stop whatever this script started, whatever happened; never fails itself.
cleanup() {
  local rc=$?
  set +e
  if [ -n "$agent_pid" ] && kill -0 "$agent_pid" 2>/dev/null; then
    kill -TERM "$agent_pid"
    wait "$agent_pid" 2>/dev/null
  fi
  if [ -n "$pg_started" ]; then
    as_pg "$PG_BIN/pg_ctl" -D "$DIR/pgdata" -m fast -w -t 60 stop >/dev/null 2>&1 || {
      pid=$(head -n1 "$DIR/pgdata/postmaster.pid" 2>/dev/null)
      [ -n "$pid" ] && kill -KILL "$pid" 2>/dev/null
    }
  fi
  [ "$rc" = 0 ] || echo "quickstart: stopped everything it had started; files are in $DIR" >&2
  exit "$rc"
}
trap cleanup EXIT

# fail MESSAGE [LOG]: say what failed, show the end of the log that says why, exit 1.
fail() {
  echo "quickstart: $1" >&2
  if [ -n "${2:-}" ] && [ -s "$2" ]; then
    echo "--- last lines of $2:" >&2
    tail -n 20 "$2" >&2
  fi
  exit 1
}

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
who_listens() { command -v ss >/dev/null && ss -ltnpH "sport = :$1" 2>/dev/null | sed -n 's/.*users:((\("[^"]*",pid=[0-9]*\).*/\1/p' | head -n1; }

# A cluster left running by an earlier run that was killed: stop it rather than delete its files.
if [ -f "$DIR/pgdata/postmaster.pid" ]; then
  old=$(head -n1 "$DIR/pgdata/postmaster.pid")
  if [ -n "$old" ] && kill -0 "$old" 2>/dev/null; then
    echo "== stopping the PostgreSQL an earlier quickstart left running (pid $old)"
    as_pg "$PG_BIN/pg_ctl" -D "$DIR/pgdata" -m fast -w stop >/dev/null 2>&1 || kill -KILL "$old" 2>/dev/null || true
  fi
fi
for p in "$PORT" "$LISTEN_PORT"; do
  if port_in_use "$p"; then
    w=$(who_listens "$p" || true)
    fail "port $p on 127.0.0.1 is already in use${w:+ (by $w)}
HINT: stop what listens there, or choose other ports: QUICKSTART_PG_PORT=… QUICKSTART_LISTEN_PORT=… $0"
  fi
done

pkgs=()
[ -x "$PG_BIN/initdb" ] || pkgs+=(postgresql-15)
command -v cc >/dev/null || pkgs+=(build-essential)
if [ ${#pkgs[@]} -gt 0 ]; then
  echo "== installing ${pkgs[*]} from Debian"
  sudo_ apt-get update -qq && sudo_ env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${pkgs[@]}"
  if command -v pg_lsclusters >/dev/null && pg_lsclusters -h 2>/dev/null | grep -q '^15 *main'; then
    sudo_ pg_dropcluster --stop 15 main || true
  fi
fi

if [ -n "${QUICKSTART_BIN_DIR:-}" ]; then
  AGENT=$QUICKSTART_BIN_DIR/walvault-agent
  RECOVER=$QUICKSTART_BIN_DIR/walvault-recover
else
  command -v cargo >/dev/null || fail "needs a Rust toolchain 1.85 or newer: https://rustup.rs"
  rustc_minor=$(rustc --version | awk '{split($2, v, "."); print v[2]}')
  [ "${rustc_minor:-0}" -ge 85 ] || fail "rustc $(rustc --version) is too old: walvault needs 1.85 or newer (rustup update)"
  export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-/var/tmp/walvault-target}
  out_dir=$PROFILE; cargo_profile=$PROFILE
  [ "$PROFILE" = debug ] && cargo_profile=dev
  if [ ! -x "$CARGO_TARGET_DIR/$out_dir/walvault-agent" ]; then
    echo "== building walvault ($PROFILE): about 10 minutes on 2 cores the first time (the S3 SDK is big), seconds afterwards"
  fi
  cargo build --profile "$cargo_profile" -p walvault-agent -p walvault-recover 2>"$DIR.build.log" || fail "cargo build failed" "$DIR.build.log"
  AGENT=$CARGO_TARGET_DIR/$out_dir/walvault-agent
  RECOVER=$CARGO_TARGET_DIR/$out_dir/walvault-recover
fi
[ -x "$AGENT" ] && [ -x "$RECOVER" ] || fail "walvault binaries not found at $AGENT"

if [ "$(id -u)" = 0 ]; then
  id walvault-pg >/dev/null 2>&1 || useradd --system --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin walvault-pg
fi
rm -rf "$DIR"; mkdir -p "$DIR"; chmod 755 "$DIR"
[ "$(id -u)" = 0 ] && chown walvault-pg: "$DIR"
as_pg "$PG_BIN/initdb" -D "$DIR/pgdata" -A trust -U postgres --no-sync >"$DIR/initdb.log" 2>&1 || fail "initdb failed" "$DIR/initdb.log"
printf "port = $PORT\nunix_socket_directories = '$DIR'\nlisten_addresses = '127.0.0.1'\n" >> "$DIR/pgdata/postgresql.conf"
pg_started=1
as_pg "$PG_BIN/pg_ctl" -D "$DIR/pgdata" -l "$DIR/postgres.log" -w start >/dev/null || fail "PostgreSQL did not start" "$DIR/postgres.log"

echo "== walvault-agent run --pg-url postgresql://postgres@127.0.0.1:$PORT/postgres --archive file://$DIR/archive --listen 127.0.0.1:$LISTEN_PORT"
"$AGENT" run --pg-url "postgresql://postgres@127.0.0.1:$PORT/postgres" --archive "file://$DIR/archive" \
  --listen "127.0.0.1:$LISTEN_PORT" 2> "$DIR/agent.log" &
agent_pid=$!
for _ in $(seq 1 100); do
  kill -0 "$agent_pid" 2>/dev/null || { wait "$agent_pid" || true; agent_pid=; fail "walvault-agent exited at start" "$DIR/agent.log"; }
  grep -q "starting replication" "$DIR/agent.log" 2>/dev/null && break
  sleep 0.1
done
echo "== pgbench writes for 10 s"
as_pg "$PG_BIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -i -s 5 -q postgres >"$DIR/pgbench.log" 2>&1 || fail "pgbench -i failed" "$DIR/pgbench.log"
as_pg "$PG_BIN/pgbench" -h "$DIR" -p "$PORT" -U postgres -T 10 -c 2 -n postgres 2>>"$DIR/pgbench.log" | grep -E '^tps' || fail "pgbench failed" "$DIR/pgbench.log"
sleep 2
kill -0 "$agent_pid" 2>/dev/null || fail "walvault-agent stopped" "$DIR/agent.log"
echo "== agent status (http://127.0.0.1:$LISTEN_PORT/status)"
exec 3<>"/dev/tcp/127.0.0.1/$LISTEN_PORT" && printf 'GET /status HTTP/1.0\r\n\r\n' >&3 && sed -n '/^{/p' <&3 | tr ',' '\n'; echo; exec 3<&-
echo "== server flush LSN: $(as_pg "$PG_BIN/psql" -h "$DIR" -p "$PORT" -U postgres -Atc 'select pg_current_wal_flush_lsn()' postgres)"
echo "== archive ($DIR/archive), newest objects:"
(cd "$DIR/archive" && find . -path ./.tmp -prune -o -type f -print | sort | tail -n 8)
echo "== walvault-recover list --archive file://$DIR/archive"
"$RECOVER" list --archive "file://$DIR/archive" 2>/dev/null || fail "walvault-recover list failed"
kill -TERM "$agent_pid"
if wait "$agent_pid"; then
  echo "== agent stopped cleanly (exit 0); its log: $DIR/agent.log"
else
  agent_pid=
  fail "walvault-agent did not stop cleanly" "$DIR/agent.log"
fi
agent_pid=
