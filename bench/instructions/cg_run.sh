#!/usr/bin/env bash
# cg_run.sh BIN OUT N WINDOW [valgrind|native]: one embedded instance (threads 1,
# no auth, no rate limit, pings and idle timeout out of the way), the fixed
# DM workload of dm_driver.py, then SIGTERM; callgrind output in OUT.
bin=$1; out=$2; n=$3; win=$4; mode=${5:-valgrind}
port=18095
log=$out.log
flags="--listen 127.0.0.1:$port --auth none --rate-limit 0 --threads 1 --ping-interval-ms 600000 --idle-timeout-ms 900000"
if [ "$mode" = valgrind ]; then
  valgrind --tool=callgrind --callgrind-out-file=$out $bin $flags 2>$log &
else
  $bin $flags 2>$log &
fi
pid=$!
# Wait for the "listening" log line: no request reaches the server before the workload.
for i in $(seq 1 600); do grep -q listening $log && break; sleep 0.1; done
python3 "$(dirname "$0")/dm_driver.py" $port $n $win || echo DRIVER FAILED
kill -TERM $pid; wait $pid
grep -E "^==[0-9]+== (Collected|Events)" $log
