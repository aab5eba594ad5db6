#!/usr/bin/env bash
# Footprint of the node binary against the sink binary on loopback:
#   idle:    the Go node's default load (1 sensor, 5 readings/s, 1 request/s)
#   scaling: 100 to 100,000 sensors at one total rate (TOTAL readings/s; a
#            sensor gives at most 1000 a second, so TOTAL/100 at most that)
# For each run: node CPU per reading (from /proc/<pid>/stat) and peak RSS
# (VmHWM). Usage: benches/footprint.sh [seconds per run] [total rate]
set -euo pipefail
cd "$(dirname "$0")/.."
SECONDS_PER_RUN=${1:-20}
TOTAL=${2:-100000}
cargo build --profile dist --quiet --bins
BIN=target/dist
WORK=$(mktemp -d)
PORT=$((20000 + RANDOM % 20000))
TICKS=$(getconf CLK_TCK)

GRPC_SERVER_SOCKET=127.0.0.1:$PORT FILE_PATH=$WORK LOGGER_MIN_LOG_LEVEL=warn "$BIN/telemetry-sink" >"$WORK/sink.out" &
SINK=$!
trap 'kill $SINK 2>/dev/null; wait $SINK 2>/dev/null; rm -rf "$WORK"' EXIT
for _ in $(seq 100); do (exec 3<>/dev/tcp/127.0.0.1/$PORT) 2>/dev/null && break; sleep 0.1; done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }

# run LABEL VAR=VALUE...: runs the node for SECONDS_PER_RUN, prints one row.
run() {
    local label=$1; shift
    env GRPC_SERVER_SOCKET=127.0.0.1:$PORT LOGGER_MIN_LOG_LEVEL=warn "$@" "$BIN/telemetry-node" >"$WORK/node.out" &
    local node=$!
    sleep 2 # start-up and first batches are not the steady state
    local t0; t0=$(cpu_ticks $node)
    local p0; p0=$(curl -s "127.0.0.1:$METRICS/metrics" | awk '/^telemetry_node_readings_produced_total/ {print $2}')
    sleep "$SECONDS_PER_RUN"
    local t1; t1=$(cpu_ticks $node)
    local p1; p1=$(curl -s "127.0.0.1:$METRICS/metrics" | awk '/^telemetry_node_readings_produced_total/ {print $2}')
    local hwm; hwm=$(awk '/VmHWM/ {print $2}' "/proc/$node/status")
    kill -TERM $node; wait $node || true
    local readings=$((p1 - p0)) cpu_ms=$(( (t1 - t0) * 1000 / TICKS ))
    awk -v l="$label" -v r="$readings" -v c="$cpu_ms" -v h="$hwm" -v s="$SECONDS_PER_RUN" 'BEGIN {
        printf "%-28s %12.0f %10.2f %14.3f %10.1f\n", l, r / s, c / (s * 10), (r > 0 ? c * 1000 / r : 0), h / 1024 }'
}

METRICS=$((PORT + 1))
printf "%-28s %12s %10s %14s %10s\n" "run" "readings/s" "cpu %" "cpu µs/reading" "rss MiB"
run "idle (1 sensor, 5/s, 1 rps)" METRICS_ADDR=127.0.0.1:$METRICS
for sensors in 100 1000 10000 100000; do
    rate=$(awk -v t="$TOTAL" -v n="$sensors" 'BEGIN { printf "%.6f", t / n }')
    run "$sensors sensors x $rate/s" METRICS_ADDR=127.0.0.1:$METRICS SENSOR_COUNT=$sensors \
        SENSOR_VALUE_RATE_PER_SECOND=$rate REQUEST_RATE_PER_SECOND=inf BATCH_SIZE=1000
done
ls -l "$BIN/telemetry-node" "$BIN/telemetry-sink" | awk '{printf "%s: %.1f MiB\n", $NF, $5 / 1048576}'
