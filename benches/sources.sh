#!/usr/bin/env bash
# What the host source costs at HOST_INTERVAL=1s: two nodes against one sink
# on loopback for the same time, side by side,
#   host:     SENSOR_COUNT=0 HOST_INTERVAL=1s (the host source alone)
#   baseline: one simulated sensor at 1 reading/s (the least a node does)
# For each: CPU share of one core over the run (from /proc/<pid>/stat), and
# RSS after the first minute and at the end, to show it does not grow.
# Usage: benches/sources.sh [seconds, default 600]
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-600}
cargo build --profile dist --quiet --bins
BIN=target/dist
WORK=$(mktemp -d)
PORT=$((20000 + RANDOM % 20000))
TICKS=$(getconf CLK_TCK)

GRPC_SERVER_SOCKET=127.0.0.1:$PORT FILE_PATH=$WORK LOGGER_MIN_LOG_LEVEL=warn "$BIN/telemetry-sink" >"$WORK/sink.out" &
PIDS=($!)
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done

node() { env GRPC_SERVER_SOCKET=127.0.0.1:$PORT LOGGER_MIN_LOG_LEVEL=warn "$@" "$BIN/telemetry-node" >/dev/null & }
node NODE_ID=host SENSOR_COUNT=0 HOST_INTERVAL=1s
HOST=$!
node NODE_ID=baseline SENSOR_COUNT=1 SENSOR_VALUE_RATE_PER_SECOND=1
BASE=$!
PIDS+=("$HOST" "$BASE")

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
sleep 60
h0=$(cpu_ticks "$HOST") b0=$(cpu_ticks "$BASE") hr0=$(rss_kb "$HOST") br0=$(rss_kb "$BASE")
sleep $((RUN > 60 ? RUN - 60 : 1))
h1=$(cpu_ticks "$HOST") b1=$(cpu_ticks "$BASE") hr1=$(rss_kb "$HOST") br1=$(rss_kb "$BASE")
span=$((RUN > 60 ? RUN - 60 : 1))
# The nodes first, so that they deliver what they hold before the sink goes.
kill -TERM "$HOST" "$BASE"; wait "$HOST" "$BASE" 2>/dev/null || true
host_lines=$(grep -c '"sensor_name":"host_' "$WORK/readings.jsonl" || true)
for row in "host $h0 $h1 $hr0 $hr1" "baseline $b0 $b1 $br0 $br1"; do
    set -- $row
    awk -v l="$1" -v t0="$2" -v t1="$3" -v r0="$4" -v r1="$5" -v s="$span" -v hz="$TICKS" 'BEGIN {
        printf "%-9s cpu=%.3f%% of a core  rss_after_1m=%.1f MiB  rss_at_end=%.1f MiB\n",
            l, (t1 - t0) * 100 / hz / s, r0 / 1024, r1 / 1024 }'
done
echo "host readings written by the sink: $host_lines"
