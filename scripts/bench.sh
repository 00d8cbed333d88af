#!/usr/bin/env bash
# Benchmark matrix: for each routing mode (and, with --peer socketio, each
# Redis adapter of the Socket.IO peer in bench/peers/socketio) and instance
# count, a fresh redis-server and N instances on loopback ports, driven by
# switchboard-load; writes target/bench-results/<name>/<name>.{json,md,svg}
# (untracked) and keeps every process's log in target/bench-results/<name>/logs/.
# --publish also writes the result files into bench/results/ (tracked, cited by
# docs/BENCHMARKS.md).
#
#   scripts/bench.sh                                   # routed,broadcast x N=1,2,4,8, DM 20k/s, 10 s
#   scripts/bench.sh --nodes 1,2 --rate 5000 --duration 3 --name smoke
#   scripts/bench.sh --modes routed,broadcast,user-channel --nodes 2,4
#   scripts/bench.sh --find-max --nodes 2,4            # highest sustained rate per cell
#   scripts/bench.sh --modes routed --nodes 2,4 --rate 5000 --dm-store true,false
#                                                      # stored and "store":false DMs, rows side by side
#   scripts/bench.sh --modes routed,broadcast,user-channel --nodes 4,8 --redis-cluster 0,3
#                                                      # one redis-server and a 3-master Redis Cluster
#                                                      # (rows <mode>-cluster3; needs redis-cli), per-node figures
#   scripts/bench.sh --workload room --rooms 20 --room-members 10 --room-spread 2
#   scripts/bench.sh --workload churn --churn-rate 20
#   scripts/bench.sh --nodes 2,4 --name dm-2-4 --publish  # results into bench/results/ too
#   scripts/bench.sh --peer socketio --nodes 1,2 --rate 1000 --duration 3 --name smoke-peer
#                                                      # the Socket.IO peer, classic and sharded
#                                                      # adapter (needs node and npm; npm ci on first use)
#   scripts/bench.sh --modes routed,broadcast --peer socketio --nodes 1,2,4 --name both
#                                                      # Switchboard and the peer in one report
#   scripts/bench.sh --merge target/bench-results/a/a.json,target/bench-results/b/b.json --name ab
#                                                      # the rows of two runs in one report
#   scripts/bench.sh --workload connections --name conn-19k  # idle connections: RSS per connection
#                                                      # at 1k/5k/10k/19k, after close, connect rate, drain, storm
#   scripts/bench.sh --workload connections --steps 1000,5000 --name conn-smoke   # the same, small
#   scripts/bench.sh --workload connections --phases hold-all --name conn-57k     # 19k on each of 3, held 60 s
#   scripts/bench.sh --workload presence --nodes 4 --presence-control --name presence-n4
#                                                      # presence events under churn (issue 14): 200 users
#                                                      # online/offline at 200/s on all 4, 10 watchers each on
#                                                      # n1,n2 only; events/s, CPU per event, and n3,n4 must
#                                                      # receive no event (plus a control row, nobody watching)
#   scripts/bench.sh --workload ingest --nodes 1,2 --name ingest-n12 --publish
#                                                      # queue ingestion end to end (issue 15): 20,000 DMs
#                                                      # from a Redis stream, a Kafka topic (a private Tansu:
#                                                      # scripts/install-tansu.sh or --tansu-bin) and the
#                                                      # publish API (the baseline) to 200 receivers; records/s,
#                                                      # latency, loss, CPU per record (--ingest-sources to pick)
#   scripts/bench.sh --help                            # every flag
#
# Every argument goes to target/release/switchboard-bench unchanged.
# SKIP_BUILD=1 uses the binaries already built. The benchmark stops every
# process it started, by pid, on success, on error and on Ctrl-C.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"

if ! command -v redis-server >/dev/null 2>&1; then
  echo "bench.sh: redis-server not found in PATH." >&2
  echo "  Debian/Ubuntu: apt-get install -y redis-server   (the benchmark starts its own instances;" >&2
  echo "  the system service is not used and can stay stopped)" >&2
  exit 1
fi

for arg in "$@"; do
  case "$arg" in
    --peer | --peer=*)
      # npm only installs the peer's pinned dependencies (npm ci, on first use).
      tools=node
      [ -d bench/peers/socketio/node_modules ] || tools="node npm"
      for tool in $tools; do
        if ! command -v "$tool" >/dev/null 2>&1; then
          echo "bench.sh: --peer socketio needs Node.js 18 or later (and npm for the first" >&2
          echo "  npm ci in bench/peers/socketio); $tool is not in PATH." >&2
          echo "  Debian/Ubuntu: apt-get install -y nodejs npm   (or https://nodejs.org)" >&2
          exit 1
        fi
      done
      ;;
  esac
done

if [ "${SKIP_BUILD:-0}" != 1 ]; then
  echo "bench.sh: building release binaries..." >&2
  CARGO_BUILD_JOBS=${CARGO_BUILD_JOBS:-2} cargo build --release --quiet \
    -p switchboard -p switchboard-load -p switchboard-bench
fi

bin_dir=${CARGO_TARGET_DIR:-$root/target}/release
for b in switchboard switchboard-load switchboard-bench; do
  if [ ! -x "$bin_dir/$b" ]; then
    echo "bench.sh: $bin_dir/$b is missing (did the build succeed?)" >&2
    exit 1
  fi
done

exec "$bin_dir/switchboard-bench" \
  --server-bin "$bin_dir/switchboard" \
  --loader-bin "$bin_dir/switchboard-load" \
  "$@"
