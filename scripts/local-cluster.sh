#!/usr/bin/env bash
# A three-node uigniter cluster on this machine, for trying it out:
#   scripts/local-cluster.sh up       start it (or what of it is missing)
#   scripts/local-cluster.sh status   where each node's API is, and how to point the CLI at one
#   scripts/local-cluster.sh down     stop everything and remove it
# Each node is a network namespace (uigdemo-n1..3) on an underlay bridge in
# this namespace (uigdemo0, 192.168.250.1/24); node i is 192.168.250.(10+i),
# runs etcd member i and one uigniter daemon, and has VM subnet 10.78.i.0/24,
# routed from here, so that this shell reaches every VM directly. The layout
# is the cluster tests' lab (test/helpers/cluster-lab.ts) with its own names.
# Needs root, Debian's etcd-server and a build (npx tsc -p .). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)

PREFIX=uigdemo
BRIDGE=${PREFIX}0
NET=${UIGNITER_DEMO_NET:-192.168.250}
NODES=3
STATE=${UIGNITER_DEMO_DIR:-/var/tmp/uigniter-local-cluster}
CACHE=${UIGNITER_CACHE_DIR:-/var/cache/uigniter}
ALIAS="uigniter-local-cluster"
ZONES=(a b c)

say() { printf '%s\n' "$*"; }
die() { printf 'local-cluster: %s\n' "$*" >&2; exit 1; }
ns() { echo "${PREFIX}-n$1"; }
addr() { echo "${NET}.$((10 + $1))"; }
alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }
etcd_urls() { local i out=(); for i in $(seq 1 $NODES); do out+=("http://$(addr "$i"):2379"); done; (IFS=,; echo "${out[*]}"); }

require_root() { [[ $(id -u) == 0 ]] || die "run as root (network namespaces, a bridge, routes)"; }

# Starts a program in a node's namespace, detached, with a pidfile and a log.
# ip netns exec and setsid both exec (no fork here: the job leads no group), so $! is the program.
start_in() {
  local n=$1 name=$2; shift 2
  local pidfile="$STATE/n$n/$name.pid" log="$STATE/n$n/$name.log"
  if alive "$pidfile"; then say "n$n: $name runs already (pid $(cat "$pidfile"))"; return; fi
  ip netns exec "$(ns "$n")" setsid "$@" >>"$log" 2>&1 </dev/null &
  echo $! >"$pidfile"
  say "n$n: $name started (pid $!, log $log)"
}

# Waits for a condition with a deadline, instead of sleeping blindly.
wait_for() {
  local what=$1 seconds=$2; shift 2
  local deadline=$((SECONDS + seconds))
  until "$@" >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "$what did not happen within ${seconds}s (logs: $STATE/n*/*.log)"
    sleep 0.2
  done
}

etcd_healthy() { local i; for i in $(seq 1 $NODES); do curl -sf -m 1 "http://$(addr "$i"):2379/health" | grep -q '"health":"true"' || return 1; done; }
daemon_up() { curl -sf -m 2 --unix-socket "$STATE/n$1/uigniter.sock" http://daemon/healthz; }

network_up() {
  if [[ -e /sys/class/net/$BRIDGE ]]; then
    [[ $(cat "/sys/class/net/$BRIDGE/ifalias" 2>/dev/null) == "$ALIAS" ]] || die "$BRIDGE exists and is not this script's; remove it first"
  else
    if ip -4 -o addr | grep -q " ${NET//./\\.}\."; then die "${NET}.0/24 is in use on this host (the test lab?); set UIGNITER_DEMO_NET to another 192.168.X"; fi
    ip link add "$BRIDGE" type bridge
    ip link set dev "$BRIDGE" alias "$ALIAS"
    ip addr add "${NET}.1/24" dev "$BRIDGE"
    ip link set dev "$BRIDGE" up
    say "underlay: $BRIDGE ${NET}.1/24"
  fi
  local i
  for i in $(seq 1 $NODES); do
    mkdir -p "$STATE/n$i"
    if ! ip netns list | grep -qx "$(ns "$i")\( (id: [0-9]*)\)\?"; then
      ip netns add "$(ns "$i")"
      ip link add "$(ns "$i")" type veth peer name eth0 netns "$(ns "$i")"
      ip link set dev "$(ns "$i")" master "$BRIDGE" up
      ip -n "$(ns "$i")" link set dev lo up
      ip -n "$(ns "$i")" addr add "$(addr "$i")/24" dev eth0
      ip -n "$(ns "$i")" link set dev eth0 up
      ip -n "$(ns "$i")" route add default via "${NET}.1"
      ip netns exec "$(ns "$i")" sysctl -qw net.ipv4.ip_forward=1
      say "n$i: namespace $(ns "$i"), $(addr "$i")"
    fi
    ip route replace "10.78.$i.0/24" via "$(addr "$i")" dev "$BRIDGE"
  done
}

up() {
  require_root
  [[ -x /usr/bin/etcd ]] || die "/usr/bin/etcd is missing: apt-get install etcd-server (or npm run setup)"
  [[ -f $ROOT/dist/src/daemon/main.js ]] || die "no build: run npx tsc -p . first"
  mkdir -p "$STATE" "$CACHE"
  [[ -f $STATE/token ]] || { head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$STATE/token"; chmod 600 "$STATE/token"; }
  network_up
  local i initial=()
  for i in $(seq 1 $NODES); do initial+=("m$i=http://$(addr "$i"):2380"); done
  for i in $(seq 1 $NODES); do
    start_in "$i" etcd /usr/bin/etcd --name "m$i" --data-dir "$STATE/n$i/etcd" \
      --listen-client-urls "http://$(addr "$i"):2379" --advertise-client-urls "http://$(addr "$i"):2379" \
      --listen-peer-urls "http://$(addr "$i"):2380" --initial-advertise-peer-urls "http://$(addr "$i"):2380" \
      --initial-cluster "$(IFS=,; echo "${initial[*]}")" --initial-cluster-state new --initial-cluster-token "$PREFIX" \
      --logger zap --log-outputs stderr
  done
  say "waiting for etcd"
  wait_for "a healthy etcd cluster" 60 etcd_healthy
  say "etcd healthy: $(etcd_urls)"
  for i in $(seq 1 $NODES); do
    start_in "$i" uigniter env \
      UIGNITER_ETCD="$(etcd_urls)" UIGNITER_NODE="n$i" UIGNITER_NODE_ADDRESS="$(addr "$i")" \
      UIGNITER_SUBNET="10.78.$i.0/24" UIGNITER_DATA_DIR="$STATE/n$i/data" UIGNITER_SOCKET="$STATE/n$i/uigniter.sock" \
      UIGNITER_API_LISTEN="$(addr "$i"):7377" UIGNITER_TOKEN="$(cat "$STATE/token")" UIGNITER_NODE_LABELS="zone=${ZONES[$((i - 1))]}" \
      UIGNITER_CACHE_DIR="$CACHE" UIGNITER_LOG_LEVEL="${UIGNITER_LOG_LEVEL:-info}" \
      "$(command -v node)" "$ROOT/dist/src/daemon/main.js" daemon
  done
  for i in $(seq 1 $NODES); do
    say "waiting for n$i's daemon"
    wait_for "n$i's daemon answering on $STATE/n$i/uigniter.sock" 120 daemon_up "$i"
  done
  status
}

status() {
  local i state
  if [[ ! -e /sys/class/net/$BRIDGE ]]; then say "the local cluster is down (scripts/local-cluster.sh up)"; return; fi
  say "underlay $BRIDGE ${NET}.1/24; state in $STATE"
  for i in $(seq 1 $NODES); do
    state=$(alive "$STATE/n$i/uigniter.pid" && echo running || echo stopped)
    say "n$i: ns $(ns "$i"), address $(addr "$i"), VMs 10.78.$i.0/24, daemon $state, etcd $(alive "$STATE/n$i/etcd.pid" && echo running || echo stopped)"
    say "    API http://$(addr "$i"):7377  gateway http://$(addr "$i"):7380  socket $STATE/n$i/uigniter.sock"
  done
  say ""
  say "CLI on node 1 (its socket):  UIGNITER_SOCKET=$STATE/n1/uigniter.sock node dist/src/daemon/main.js node ls"
  say "or over its API:             UIGNITER_HOST=http://$(addr 1):7377 UIGNITER_TOKEN=\$(cat $STATE/token) node dist/src/daemon/main.js node ls"
  say "etcd: ETCDCTL_API=3 etcdctl --endpoints=$(etcd_urls) endpoint health"
}

# SIGNAL to all at once and a deadline (10 s), then SIGKILL: args after the signal are "pidfile:name" pairs.
stop_all() {
  local signal=$1 entry pidfile pids=() names=() k
  shift
  for entry in "$@"; do
    pidfile=${entry%%:*}
    if alive "$pidfile"; then pids+=("$(cat "$pidfile")"); names+=("${entry#*:}"); kill "-$signal" "${pids[-1]}" 2>/dev/null || true; fi
    rm -f "$pidfile"
  done
  for k in "${!pids[@]}"; do
    for _ in $(seq 1 50); do kill -0 "${pids[$k]}" 2>/dev/null || break; sleep 0.2; done
    kill -KILL "${pids[$k]}" 2>/dev/null || true
    say "${names[$k]} stopped"
  done
}

down() {
  require_root
  local i pid
  local daemons=() members=()
  for i in $(seq 1 $NODES); do daemons+=("$STATE/n$i/uigniter.pid:n$i: uigniter"); members+=("$STATE/n$i/etcd.pid:n$i: etcd"); done
  # The daemons first: they still talk to etcd on their way out.
  stop_all TERM "${daemons[@]}"
  # Their data goes too: no graceful stop (which waits on quorum as members leave).
  stop_all KILL "${members[@]}"
  for i in $(seq 1 $NODES); do
    if ip netns list | grep -qx "$(ns "$i")\( (id: [0-9]*)\)\?"; then
      # What the daemon left running there (its VMs' QEMUs) goes with the node.
      for pid in $(ip netns pids "$(ns "$i")"); do kill -KILL "$pid" 2>/dev/null || true; done
      ip netns del "$(ns "$i")"
      say "n$i: namespace removed"
    fi
    ip route del "10.78.$i.0/24" via "$(addr "$i")" dev "$BRIDGE" 2>/dev/null || true
    ip link del "$(ns "$i")" 2>/dev/null || true
  done
  if [[ -e /sys/class/net/$BRIDGE ]]; then
    [[ $(cat "/sys/class/net/$BRIDGE/ifalias" 2>/dev/null) == "$ALIAS" ]] || die "$BRIDGE is not this script's; left alone"
    ip link del "$BRIDGE"
    say "underlay $BRIDGE removed"
  fi
  rm -rf "$STATE"
  say "the local cluster is down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) status ;;
  *) die "usage: scripts/local-cluster.sh up | down | status" ;;
esac
