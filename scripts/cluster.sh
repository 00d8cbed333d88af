#!/usr/bin/env bash
# Starts a local redis-server and N Switchboard instances against it, prints
# where to connect, and stops everything it started (by pid) on Ctrl-C.
#
#   scripts/cluster.sh [N]            # default N=3, ports 8081..808N
#   BASE_PORT=9000 scripts/cluster.sh 2
#   AUTH=jwt JWT_SECRET=s3cret scripts/cluster.sh 2
#   ROUTING=broadcast scripts/cluster.sh 4
#   API_KEY=mykey scripts/cluster.sh 2  # server-side API key (default: a fresh development key, printed)
set -euo pipefail

n=${1:-3}
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

# Redis on a unix socket in our own directory: no port to collide with.
redis-server --port 0 --unixsocket "$work/redis.sock" --save "" --appendonly no \
  --dir "$work" --logfile "$work/redis.log" &
pids+=($!)
for _ in $(seq 1 50); do
  redis-cli -s "$work/redis.sock" ping >/dev/null 2>&1 && break
  sleep 0.1
done
redis_url="redis+unix://$work/redis.sock"

extra=(--api-key "$api_key")
if [ "$auth" = jwt ]; then
  extra+=(--auth jwt --jwt-secret "${JWT_SECRET:?set JWT_SECRET for AUTH=jwt}")
else
  extra+=(--auth none)
fi

for i in $(seq 1 "$n"); do
  port=$((base_port + i - 1))
  RUST_LOG=${RUST_LOG:-info} "$bin" --listen "127.0.0.1:$port" --redis-url "$redis_url" \
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
echo "redis:     $redis_url"
for i in $(seq 1 "$n"); do
  port=$((base_port + i - 1))
  if [ "$auth" = jwt ]; then
    echo "node$i:     ws://127.0.0.1:$port/ws?token=JWT   (page http://127.0.0.1:$port/, metrics http://127.0.0.1:$port/metrics)"
  else
    echo "node$i:     ws://127.0.0.1:$port/ws?user=NAME   (page http://127.0.0.1:$port/, metrics http://127.0.0.1:$port/metrics)"
  fi
done
echo "api key:   $api_key   (development key for /api/v1/*)"
echo "publish:   curl -sS -H 'Authorization: Bearer $api_key' -H 'Content-Type: application/json' \\"
echo "             -d '{\"user\":\"bob\",\"from\":\"tickets\",\"body\":{\"text\":\"your ticket was rejected\"}}' \\"
echo "             http://127.0.0.1:$base_port/api/v1/publish"
echo "logs:      $work/node*.log"
echo "Ctrl-C stops everything."
wait -n "${pids[@]}" || true
echo "a process exited; stopping the rest" >&2
