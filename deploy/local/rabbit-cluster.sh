#!/usr/bin/env bash
# A three-node RabbitMQ cluster on this machine, beside (never touching) a RabbitMQ on 5672.
#
#   deploy/local/rabbit-cluster.sh up            start tally1..3@localhost and cluster them (idempotent)
#   deploy/local/rabbit-cluster.sh status        nodes, cluster membership, queue leaders
#   deploy/local/rabbit-cluster.sh stop-node N   stop node N (1-3), as a failure would
#   deploy/local/rabbit-cluster.sh start-node N  start node N again: it rejoins the cluster
#   deploy/local/rabbit-cluster.sh leader QUEUE  the node that leads a quorum queue (e.g. tally.ingest)
#   deploy/local/rabbit-cluster.sh queues        every queue's type, leader, members, consumers (JSON)
#   deploy/local/rabbit-cluster.sh down          stop all three and delete their data
#
# Then: TALLY_AMQP_URL=amqp://guest:guest@127.0.0.1:5681/,amqp://guest:guest@127.0.0.1:5682/,amqp://guest:guest@127.0.0.1:5683/
#
# Node N: name tallyN@localhost, AMQP on 127.0.0.1:568N, distribution on 2568N, its own
# configuration, data, logs and pid file under $TALLY_LOCAL_DIR/rabbit (default
# /tmp/tally-local), no plugins (the management UI stays the main RabbitMQ's). The nodes share
# the Erlang cookie of the user that runs them (rabbitmq when this runs as root). Needs the
# rabbitmq-server package (rabbitmq-server and rabbitmqctl under /usr/lib/rabbitmq/bin).
set -euo pipefail

BASE=${TALLY_LOCAL_DIR:-/tmp/tally-local}/rabbit
RMQ_BIN=${RABBITMQ_BIN:-/usr/lib/rabbitmq/bin}
[ -x "$RMQ_BIN/rabbitmq-server" ] || RMQ_BIN=$(dirname "$(command -v rabbitmq-server)")
NODES=(1 2 3)

# RabbitMQ's commands, as the user whose cookie the nodes share, run from / : Erlang looks
# for modules in the working directory first, and in a folder that user cannot read (a clone
# in a mode-0700 `mktemp -d`, as CI runners make) every command prints an `eacces ./epp.beam`
# error report into its output, JSON included.
as_rabbit() {
  if [ "$(id -u)" = 0 ]; then
    (cd / && runuser -u rabbitmq -- env HOME="$(getent passwd rabbitmq | cut -d: -f6)" "$@")
  else
    (cd / && "$@")
  fi
}
# A command's JSON output, parsed and printed again: only the tool's data reaches stdout, and
# anything else in it (an error report) fails here, naming the command, instead of in a parser.
json_only() {
  python3 -c 'import json, sys; json.dump(json.load(sys.stdin), sys.stdout); print()'
}
node() { echo "tally$1@localhost"; }
ctl() { local n=$1; shift; as_rabbit "$RMQ_BIN/rabbitmqctl" -q -n "$(node "$n")" "$@"; }
alive() { ctl "$1" status >/dev/null 2>&1; }

start_node() {
  local n=$1 dir="$BASE/tally$1"
  alive "$n" && return
  mkdir -p "$dir/mnesia" "$dir/log"
  printf 'listeners.tcp.default = 127.0.0.1:568%s\nloopback_users.guest = true\n' "$n" >"$dir/rabbitmq.conf"
  echo '[].' >"$dir/enabled_plugins"
  : >"$dir/rabbitmq-env.conf"
  [ "$(id -u)" = 0 ] && chown -R rabbitmq: "$BASE"
  if ! as_rabbit test -w "$dir/mnesia"; then
    echo "rabbit-cluster: the rabbitmq user cannot write $dir (is a folder above it private?);" \
      "set TALLY_LOCAL_DIR to a folder it can reach" >&2
    exit 1
  fi
  as_rabbit env \
    RABBITMQ_NODENAME="$(node "$n")" \
    RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
    RABBITMQ_NODE_PORT="568$n" \
    RABBITMQ_DIST_PORT="2568$n" \
    RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
    RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
    RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
    RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
    RABBITMQ_MNESIA_BASE="$dir/mnesia" \
    RABBITMQ_LOG_BASE="$dir/log" \
    RABBITMQ_PID_FILE="$dir/pid" \
    ERL_EPMD_ADDRESS=127.0.0.1 \
    RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}" \
    "$RMQ_BIN/rabbitmq-server" -detached
  for _ in $(seq 1 120); do
    ctl "$n" await_startup --timeout 5 >/dev/null 2>&1 && return
    sleep 1
  done
  echo "rabbit-cluster: $(node "$n") did not start (logs: $dir/log)" >&2
  exit 1
}

joined() { ctl 1 cluster_status --formatter json 2>/dev/null | grep -q "\"$(node "$1")\""; }

running_nodes() {  # how many of the three the cluster sees running
  ctl 1 cluster_status --formatter json 2>/dev/null |
    python3 -c 'import json,sys; print(len(json.load(sys.stdin).get("running_nodes", [])))' 2>/dev/null || echo 0
}

up() {
  for n in "${NODES[@]}"; do start_node "$n"; done
  for n in 2 3; do
    if ! joined "$n"; then
      ctl "$n" stop_app
      ctl "$n" reset
      ctl "$n" join_cluster "$(node 1)"
      ctl "$n" start_app
      ctl "$n" await_startup --timeout 60 >/dev/null
    fi
  done
  for _ in $(seq 1 60); do
    [ "$(running_nodes)" = 3 ] && break
    sleep 1
  done
  echo "rabbit-cluster: $(node 1), $(node 2), $(node 3) clustered on 127.0.0.1:5681-5683 (data $BASE)"
}

down() {
  for n in "${NODES[@]}"; do
    if alive "$n"; then ctl "$n" stop >/dev/null 2>&1 || true; fi
  done
  for n in "${NODES[@]}"; do  # a node that did not stop cleanly is killed by its pid file
    pid_file="$BASE/tally$n/pid"
    if [ -f "$pid_file" ] && kill -0 "$(cat "$pid_file")" 2>/dev/null; then kill -9 "$(cat "$pid_file")" || true; fi
  done
  rm -rf "$BASE"
  echo "rabbit-cluster: stopped and removed"
}

stop_node() {
  local n=$1
  alive "$n" && ctl "$n" stop >/dev/null
  return 0
}

leader() {  # the node leading quorum queue $1, asked of any running node
  local n
  for n in "${NODES[@]}"; do
    if alive "$n"; then
      ctl "$n" list_queues name leader --formatter json |
        python3 -c 'import json,sys; q=sys.argv[1]; print(next(r["leader"] for r in json.load(sys.stdin) if r["name"] == q))' "$1"
      return
    fi
  done
  echo "rabbit-cluster: no node running" >&2
  exit 1
}

queues() {  # JSON, asked of any running node
  local n
  for n in "${NODES[@]}"; do
    if alive "$n"; then
      ctl "$n" list_queues name type leader members consumers messages --formatter json --timeout 30 | json_only
      return
    fi
  done
  echo "rabbit-cluster: no node running" >&2
  exit 1
}

status() {
  for n in "${NODES[@]}"; do
    if alive "$n"; then echo "$(node "$n"): running (amqp 127.0.0.1:568$n)"; else echo "$(node "$n"): stopped"; fi
  done
  for n in "${NODES[@]}"; do
    if alive "$n"; then
      echo "cluster (asked $(node "$n")): $(running_nodes) running"
      ctl "$n" list_queues name type leader members 2>/dev/null | head -n 50
      break
    fi
  done
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  stop-node) stop_node "${2:?node number 1-3}" ;;
  start-node) start_node "${2:?node number 1-3}" ;;
  leader) leader "${2:?queue name}" ;;
  queues) queues ;;
  *) echo "usage: $0 up|down|status|stop-node N|start-node N|leader QUEUE|queues" >&2; exit 2 ;;
esac
