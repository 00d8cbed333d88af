#!/usr/bin/env bash
# Starts a local redis-server (or a Redis Cluster) and N Switchboard
# instances against it, prints where to connect, and stops everything it
# started (by pid) on Ctrl-C.
#
#   scripts/cluster.sh [N]            # default N=3, ports 8081..808N
#   scripts/cluster.sh 3 --redis-cluster 3   # a Redis Cluster of 3 masters
#                                     # on ports 30001.. (and 40001.., its bus)
#   REPLICAS=1 CLUSTER_BASE_PORT=32001 scripts/cluster.sh 3 --redis-cluster 3
#   CLUSTER_NODE_TIMEOUT_MS=2000 ...  # --cluster-node-timeout (default 5000)
#   BASE_PORT=9000 scripts/cluster.sh 2
#   AUTH=jwt JWT_SECRET=s3cret scripts/cluster.sh 2
#   ROUTING=broadcast scripts/cluster.sh 4
#   API_KEY=mykey scripts/cluster.sh 2  # server-side API key (default: a fresh development key, printed)
#   INGEST_STREAM=events scripts/cluster.sh 2  # every instance consumes the Redis stream `events` (--ingest-stream)
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2
  exit "${1:-2}"
}

n=3
masters=0
while [ $# -gt 0 ]; do
  case "$1" in
    --redis-cluster) masters=${2:-}; shift 2 || usage ;;
    --redis-cluster=*) masters=${1#*=}; shift ;;
    -h | --help) usage 0 ;;
    -*) echo "unknown option $1" >&2; usage ;;
    *) n=$1; shift ;;
  esac
done
case "$n$masters" in *[!0-9]*) echo "N and --redis-cluster M must be numbers" >&2; usage ;; esac
replicas=${REPLICAS:-0}
cluster_base_port=${CLUSTER_BASE_PORT:-30001}
base_port=${BASE_PORT:-8081}
routing=${ROUTING:-routed}
auth=${AUTH:-none}
# The server-side API (POST /api/v1/publish: a backend pushing "your ticket
# was rejected" to a user) needs a key; a development cluster gets one.
api_key=${API_KEY:-dev-$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')}
root=$(cd "$(dirname "$0")/.." && pwd)

command -v redis-server >/dev/null || {
  echo "redis-server not found: install it (Debian/Ubuntu: apt-get install redis-server)" >&2
  exit 1
}

echo "building switchboard (release)..." >&2
cargo build --release --quiet --manifest-path "$root/Cargo.toml" --bin switchboard
bin="$root/target/release/switchboard"

work=$(mktemp -d -t switchboard-cluster.XXXXXX)
pids=()
cleanup() {
  trap - EXIT INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
  rm -rf "$work"
  echo "stopped." >&2
}
trap cleanup EXIT INT TERM

if [ "$masters" -eq 0 ]; then
  # Redis on a unix socket in our own directory: no port to collide with.
  redis-server --port 0 --unixsocket "$work/redis.sock" --save "" --appendonly no \
    --dir "$work" --logfile "$work/redis.log" &
  pids+=($!)
  for _ in $(seq 1 50); do
    redis-cli -s "$work/redis.sock" ping >/dev/null 2>&1 && break
    sleep 0.1
  done
  redis_flag=(--redis-url "redis+unix://$work/redis.sock")
  redis_desc="redis+unix://$work/redis.sock"
  redis_cli="redis-cli -s $work/redis.sock"
else
  # A Redis Cluster: M masters (and REPLICAS replicas each) on consecutive
  # TCP ports from CLUSTER_BASE_PORT; each node also needs its port + 10000
  # (the cluster bus).
  nodes=$((masters * (1 + replicas)))
  ports=()
  for i in $(seq 0 $((nodes - 1))); do
    port=$((cluster_base_port + i))
    if [ $((port + 10000)) -gt 65535 ]; then
      echo "CLUSTER_BASE_PORT $cluster_base_port is too high: node $port needs bus port $((port + 10000))" >&2
      exit 1
    fi
    ports+=("$port")
    redis-server --port "$port" --bind 127.0.0.1 --cluster-enabled yes \
      --cluster-config-file "$work/nodes-$port.conf" \
      --cluster-node-timeout "${CLUSTER_NODE_TIMEOUT_MS:-5000}" \
      --repl-diskless-sync-delay 0 --save "" --appendonly no \
      --dir "$work" --logfile "$work/redis-$port.log" &
    pids+=($!)
  done
  for port in "${ports[@]}"; do
    up=no
    for _ in $(seq 1 50); do
      if redis-cli -p "$port" ping >/dev/null 2>&1; then up=yes; break; fi
      sleep 0.1
    done
    if [ "$up" = no ]; then
      echo "redis node on port $port did not start (port in use? set CLUSTER_BASE_PORT); log:" >&2
      tail -5 "$work/redis-$port.log" >&2 || true
      exit 1
    fi
  done
  addrs=()
  for port in "${ports[@]}"; do addrs+=("127.0.0.1:$port"); done
  if ! redis-cli --cluster create "${addrs[@]}" --cluster-replicas "$replicas" --cluster-yes \
    >"$work/cluster-create.log" 2>&1; then
    echo "redis-cli --cluster create failed:" >&2
    cat "$work/cluster-create.log" >&2
    exit 1
  fi
  for port in "${ports[@]}"; do
    for _ in $(seq 1 100); do
      redis-cli -p "$port" cluster info 2>/dev/null | grep -q '^cluster_state:ok' && break
      sleep 0.1
    done
  done
  # The seeds: the masters, as the cluster itself says.
  seeds=$(redis-cli -p "${ports[0]}" cluster nodes |
    awk '$3 ~ /master/ && NF > 8 { split($2, a, "@"); printf "%sredis://%s", sep, a[1]; sep = "," }')
  redis_flag=(--redis-cluster "$seeds")
  redis_desc="cluster of $masters masters, $replicas replica(s) each: $seeds (logs $work/redis-*.log)"
  redis_cli="redis-cli -c -p $cluster_base_port"
fi

extra=(--api-key "$api_key")
ingest_stream=${INGEST_STREAM:-}
if [ -n "$ingest_stream" ]; then
  extra+=(--ingest-stream "$ingest_stream")
fi
if [ "$auth" = jwt ]; then
  extra+=(--auth jwt --jwt-secret "${JWT_SECRET:?set JWT_SECRET for AUTH=jwt}")
else
  extra+=(--auth none)
fi

for i in $(seq 1 "$n"); do
  port=$((base_port + i - 1))
  RUST_LOG=${RUST_LOG:-info} "$bin" --listen "127.0.0.1:$port" "${redis_flag[@]}" \
    --instance-id "node$i" --routing "$routing" "${extra[@]}" 2>"$work/node$i.log" &
  pids+=($!)
done

for i in $(seq 1 "$n"); do
  port=$((base_port + i - 1))
  for _ in $(seq 1 100); do
    curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
    sleep 0.1
  done
done

echo
echo "redis:     $redis_desc"
for i in $(seq 1 "$n"); do
  port=$((base_port + i - 1))
  if [ "$auth" = jwt ]; then
    echo "node$i:     ws://127.0.0.1:$port/ws?token=JWT   (page http://127.0.0.1:$port/, metrics http://127.0.0.1:$port/metrics)"
  else
    echo "node$i:     ws://127.0.0.1:$port/ws?user=NAME   (page http://127.0.0.1:$port/, metrics http://127.0.0.1:$port/metrics)"
  fi
done
if [ "$auth" = jwt ]; then
  echo "token:     JWT=\$($bin token --user alice --rooms 'lobby' --ttl 1h --jwt-secret \"\$JWT_SECRET\")   (--rooms: what it may join)"
fi
echo "api key:   $api_key   (development key for /api/v1/*)"
echo "publish:   curl -sS -H 'Authorization: Bearer $api_key' -H 'Content-Type: application/json' \\"
echo "             -d '{\"user\":\"bob\",\"from\":\"tickets\",\"body\":{\"text\":\"your ticket was rejected\"}}' \\"
echo "             http://127.0.0.1:$base_port/api/v1/publish"
if [ -n "$ingest_stream" ]; then
  echo "stream:    $redis_cli XADD $ingest_stream '*' v '{\"user\":\"bob\",\"body\":{\"ticket\":42,\"status\":\"rejected\"}}'"
fi
echo "logs:      $work/node*.log"
echo "Ctrl-C stops everything."
wait -n "${pids[@]}" || true
echo "a process exited; stopping the rest" >&2
