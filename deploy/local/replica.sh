#!/usr/bin/env bash
# A streaming hot standby of the local PostgreSQL, on this machine, with PostgreSQL's own tools.
#
#   deploy/local/replica.sh up       base backup of the primary, then start the standby (idempotent)
#   deploy/local/replica.sh stop     stop the standby, keep its data and slot (start resumes streaming)
#   deploy/local/replica.sh start    start a stopped standby
#   deploy/local/replica.sh status   running? in recovery? replay lag?
#   deploy/local/replica.sh down     stop it, delete its data directory and its replication slot
#
# Then: TALLY_DATABASE_READ_URL=postgresql://127.0.0.1:5433/tally
#
# Environment: TALLY_PRIMARY_HOST/PORT (127.0.0.1/5432), TALLY_REPLICA_PORT (5433),
# TALLY_LOCAL_DIR (/tmp/tally-local: data directory, socket, log), TALLY_REPLICA_SLOT
# (tally_standby). Running as root, the server runs as the postgres user.
#
# The primary needs wal_level replica (PostgreSQL's default), max_wal_senders > 0 (default
# 10) and a pg_hba.conf line admitting replication connections from 127.0.0.1. When that
# line is missing, `up` appends it (marked, once) and reloads the primary's configuration:
# a reload, never a restart, and nothing else on the primary changes. The physical slot keeps
# the WAL the standby still needs while it is stopped; `down` drops it so that the primary
# never retains WAL for a standby that is gone.
set -euo pipefail

PRIMARY_HOST=${TALLY_PRIMARY_HOST:-127.0.0.1}
PRIMARY_PORT=${TALLY_PRIMARY_PORT:-5432}
PORT=${TALLY_REPLICA_PORT:-5433}
BASE=${TALLY_LOCAL_DIR:-/tmp/tally-local}
SLOT=${TALLY_REPLICA_SLOT:-tally_standby}
DATA="$BASE/replica-$PORT"
LOG="$BASE/replica-$PORT.log"
SOCK="$BASE/replica-$PORT-socket"
HBA_MARK="# tally deploy/local/replica.sh: streaming standby on this machine"

pgbin() {
  local dir
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/pg_basebackup" ]; then
    pg_config --bindir
    return
  fi
  dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
  [ -n "$dir" ] || { echo "replica: PostgreSQL's binaries (pg_basebackup, pg_ctl) not found" >&2; exit 1; }
  echo "$dir"
}
BIN=$(pgbin)

# Run a command as the server's OS user (postgres when we are root), from / : in a folder that
# user cannot read (a clone in a mode-0700 `mktemp -d`) PostgreSQL's tools warn that they
# cannot change back to it.
as_pg() {
  if [ "$(id -u)" = 0 ]; then (cd / && runuser -u postgres -- "$@"); else (cd / && "$@"); fi
}
primary_sql() { psql -X -q -At -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U postgres -d postgres -c "$1"; }
replica_sql() { psql -X -q -At -h 127.0.0.1 -p "$PORT" -U postgres -d postgres -c "$1"; }
running() { [ -f "$DATA/postmaster.pid" ] && as_pg "$BIN/pg_ctl" -D "$DATA" status >/dev/null 2>&1; }

allow_replication() {
  if psql -X -q -At "host=$PRIMARY_HOST port=$PRIMARY_PORT user=postgres dbname=postgres replication=true" \
      -c "IDENTIFY_SYSTEM" >/dev/null 2>&1; then
    return
  fi
  local hba
  hba=$(primary_sql "SHOW hba_file")
  if ! grep -qF "$HBA_MARK" "$hba"; then
    echo "replica: the primary refuses replication connections from $PRIMARY_HOST; adding to $hba:"
    printf '%s\nhost replication all %s/32 trust\n' "$HBA_MARK" "$PRIMARY_HOST" | tee -a "$hba"
  fi
  primary_sql "SELECT pg_reload_conf()" >/dev/null
  for _ in $(seq 1 50); do
    psql -X -q -At "host=$PRIMARY_HOST port=$PRIMARY_PORT user=postgres dbname=postgres replication=true" \
      -c "IDENTIFY_SYSTEM" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "replica: the primary still refuses replication connections (see $hba)" >&2
  exit 1
}

check_primary() {
  local level senders
  level=$(primary_sql "SHOW wal_level")
  senders=$(primary_sql "SHOW max_wal_senders")
  if [ "$level" = minimal ] || [ "$senders" = 0 ]; then
    echo "replica: the primary has wal_level=$level, max_wal_senders=$senders; streaming needs wal_level=replica" \
      "and max_wal_senders>0, which take a restart of the primary: not done by this script" >&2
    exit 1
  fi
}

configure() {
  # A hot standby must allow at least the primary's counts of these (PostgreSQL refuses to start otherwise).
  local name conf="$DATA/postgresql.conf"
  {
    echo "# written by deploy/local/replica.sh"
    echo "port = $PORT"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$SOCK'"
    echo "hba_file = '$DATA/pg_hba.conf'"
    echo "ident_file = '$DATA/pg_ident.conf'"
    echo "hot_standby = on"
    # The standby tells the primary which rows its queries still read, so that vacuum on
    # the primary does not remove them and replay never cancels a read (a 5xx for a client).
    echo "hot_standby_feedback = on"
    echo "shared_buffers = 128MB"
    echo "logging_collector = off"
    for name in max_connections max_worker_processes max_wal_senders max_prepared_transactions \
      max_locks_per_transaction; do
      echo "$name = $(primary_sql "SHOW $name")"
    done
  } | as_pg tee "$conf" >/dev/null
  printf 'local all all trust\nhost all all 127.0.0.1/32 trust\n' | as_pg tee "$DATA/pg_hba.conf" >/dev/null
  as_pg touch "$DATA/pg_ident.conf"
}

start() {
  running && return
  as_pg mkdir -p "$SOCK"
  as_pg "$BIN/pg_ctl" -D "$DATA" -l "$LOG" -w -t 120 start >/dev/null
  for _ in $(seq 1 600); do
    [ "$(replica_sql "SELECT pg_is_in_recovery()" 2>/dev/null)" = t ] && return
    sleep 0.1
  done
  echo "replica: the standby did not come up on port $PORT (log: $LOG)" >&2
  exit 1
}

up() {
  check_primary
  allow_replication
  mkdir -p "$BASE"
  [ "$(id -u)" = 0 ] && chown postgres: "$BASE"
  if ! as_pg test -w "$BASE"; then
    echo "replica: the postgres user cannot write $BASE (is a folder above it private?);" \
      "set TALLY_LOCAL_DIR to a folder it can reach" >&2
    exit 1
  fi
  if [ ! -f "$DATA/standby.signal" ]; then
    as_pg rm -rf "$DATA"
    # A slot left by an earlier standby of this name (removed without `down`) is replaced.
    primary_sql "SELECT pg_drop_replication_slot('$SLOT') FROM pg_replication_slots
                 WHERE slot_name = '$SLOT' AND NOT active" >/dev/null
    as_pg "$BIN/pg_basebackup" -h "$PRIMARY_HOST" -p "$PRIMARY_PORT" -U postgres -D "$DATA" \
      -R -X stream -C -S "$SLOT" -c fast
    configure
  fi
  start
  wait_caught_up
  echo "replica: streaming standby on 127.0.0.1:$PORT (data $DATA, log $LOG)"
}

wait_caught_up() {  # replayed at least what the primary had written when we asked
  local target
  target=$(primary_sql "SELECT pg_current_wal_lsn()")
  for _ in $(seq 1 600); do
    [ "$(replica_sql "SELECT pg_last_wal_replay_lsn() >= '$target'::pg_lsn" 2>/dev/null)" = t ] && return
    sleep 0.1
  done
  echo "replica: the standby did not catch up with $target within 60 s (log: $LOG)" >&2
  exit 1
}

stop() {
  if running; then as_pg "$BIN/pg_ctl" -D "$DATA" -m fast -w -t 60 stop >/dev/null; fi
}

down() {
  stop
  as_pg rm -rf "$DATA" "$SOCK"
  rm -f "$LOG"
  for _ in $(seq 1 50); do  # the walsender may take a moment to let go of the slot
    primary_sql "SELECT pg_drop_replication_slot('$SLOT') FROM pg_replication_slots
                 WHERE slot_name = '$SLOT' AND NOT active" >/dev/null 2>&1 || true
    [ -z "$(primary_sql "SELECT 1 FROM pg_replication_slots WHERE slot_name = '$SLOT'")" ] && break
    sleep 0.1
  done
  echo "replica: removed (standby stopped, data deleted, slot $SLOT dropped)"
}

status() {
  if running; then
    echo "replica: running on 127.0.0.1:$PORT, data $DATA"
    replica_sql "SELECT 'in recovery: ' || pg_is_in_recovery() || ', replayed ' || pg_last_wal_replay_lsn()
                 || ', last replayed transaction ' || coalesce(pg_last_xact_replay_timestamp()::text, 'none')"
  else
    echo "replica: not running${DATA:+ (data $( [ -d "$DATA" ] && echo "kept in $DATA" || echo none))}"
  fi
  primary_sql "SELECT 'primary: slot ' || slot_name || ' active=' || active || ', retains '
               || pg_size_pretty(pg_current_wal_lsn() - restart_lsn) FROM pg_replication_slots
               WHERE slot_name = '$SLOT'"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  stop) stop ;;
  start) start ;;
  status) status ;;
  *) echo "usage: $0 up|down|stop|start|status" >&2; exit 2 ;;
esac
