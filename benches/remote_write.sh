#!/usr/bin/env bash
# Remote-write relays measured in one run, on loopback, into one
# VictoriaMetrics: (a) the ceiling, a bare client posting pre-encoded
# remote-write requests of 1000 samples; (b) the sink relaying the same
# samples, sent to it as pre-encoded sensor.v1 requests; (c) vmagent relaying
# the same samples, posted to it as pre-encoded remote-write. Samples landed
# are VictoriaMetrics' own count (vm_rows_inserted_total); relay CPU is from
# /proc/<pid>/stat. Then (d), the whole way: the node binary's own pipeline
# through the sink into VictoriaMetrics; and (e) the node writing to
# VictoriaMetrics itself (DESTINATION=remote-write).
#
#   benches/remote_write.sh [seconds per phase, default 10]
#
# LOAD_LOOPS=N sets how many requests the load client keeps in flight
# (default 4, one node's MAX_IN_FLIGHT), in every phase alike. PROFILE=name
# builds and measures another cargo profile (`profiling`: dist with line
# tables, for perf) instead of `dist`.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-10}
for binary in victoria-metrics vmagent; do
    command -v "$binary" >/dev/null || { echo "skipped: $binary not installed (apt-get install victoria-metrics)"; exit 0; }
done
profile=${PROFILE:-dist}
cargo build --profile "$profile" --quiet --bins
cargo bench --quiet --no-run --bench remote_write_load 2>/dev/null
load=$(ls -t target/release/deps/remote_write_load-* | grep -v '\.d$' | head -n 1)

work=$(mktemp -d)
pids=()
cleanup() { for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_http() { for _ in $(seq 200); do curl -sf "http://127.0.0.1:$1$2" >/dev/null && return 0; sleep 0.05; done; echo "nothing on $1"; exit 1; }
landed() { curl -s "http://127.0.0.1:$vm/metrics" | awk '/^vm_rows_inserted_total\{type="promremotewrite"\}/ {print $2}'; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
# Waits until VictoriaMetrics' count stops growing (a relay's queue drained),
# and notes when the last sample landed in $work/landed_at.
# Settled once unchanged for 3 s (vmagent writes its queue out every second).
settle() {
    local last now at quiet=0; last=$(landed); at=$(date +%s.%N)
    while [ "$quiet" -lt 15 ]; do
        sleep 0.2; now=$(landed)
        if [ "$now" != "$last" ]; then last=$now; at=$(date +%s.%N); quiet=0; else quiet=$((quiet + 1)); fi
    done
    echo "$at" >"$work/landed_at"; echo "$last"
}
# Samples per second from the start of a phase ($1) until its last sample
# landed: a relay that takes requests into a queue of its own and writes them
# later is timed until it has written them.
rate() { python3 -c "print(int($2 / max(1e-3, $(cat "$work/landed_at") - $1)))"; }
# Runs the load client, printing its CPU seconds to $work/load_cpu.
run_load() {
    python3 -c 'import resource, subprocess, sys
subprocess.run(sys.argv[2:], check=True)
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(str(usage.ru_utime + usage.ru_stime))' "$work/load_cpu" "$load" "$@"
}
# CPU seconds per million samples: ticks $1 -> $2 over $3 samples.
per_m() { python3 -c "print(f'{($2 - $1) / $hz / max(1, $3) * 1e6:.3f}')"; }
# The load client's CPU seconds per million of $1 samples.
load_per_m() { python3 -c "print(f'{$(cat "$work/load_cpu") / max(1, $1) * 1e6:.3f}')"; }
hz=$(getconf CLK_TCK)

vm=$(free_port)
victoria-metrics -storageDataPath="$work/vm" -httpListenAddr="127.0.0.1:$vm" -loggerLevel=ERROR >"$work/vm.log" 2>&1 &
pids+=($!)
wait_http "$vm" /health

vm_pid=${pids[0]}

# (a) the ceiling
before=$(landed); vm0=$(cpu_ticks "$vm_pid"); started=$(date +%s.%N)
run_load rw "http://127.0.0.1:$vm/api/v1/write" "$seconds" --bench
after=$(settle); vm1=$(cpu_ticks "$vm_pid")
ceiling=$(rate "$started" $((after - before)))
ceiling_vm_cpu=$(per_m "$vm0" "$vm1" $((after - before)))
ceiling_load_cpu=$(load_per_m $((after - before)))

# (b) the sink
sink=$(free_port)
OUTPUT=remote-write REMOTE_WRITE_URL="http://127.0.0.1:$vm/api/v1/write" GRPC_SERVER_SOCKET="127.0.0.1:$sink" \
    RATE_PER_SECOND=4000000000 LOGGER_MIN_LOG_LEVEL=warn target/$profile/telemetry-sink >"$work/sink.log" 2>&1 &
sink_pid=$!
pids+=("$sink_pid")
for _ in $(seq 200); do (echo >"/dev/tcp/127.0.0.1/$sink") 2>/dev/null && break; sleep 0.05; done
before=$(landed); cpu0=$(cpu_ticks "$sink_pid"); vm0=$(cpu_ticks "$vm_pid"); started=$(date +%s.%N)
run_load grpc "127.0.0.1:$sink" "$seconds" --bench
after=$(settle); cpu1=$(cpu_ticks "$sink_pid"); vm1=$(cpu_ticks "$vm_pid")
sink_rate=$(rate "$started" $((after - before)))
sink_cpu=$(per_m "$cpu0" "$cpu1" $((after - before)))
sink_vm_cpu=$(per_m "$vm0" "$vm1" $((after - before)))
sink_load_cpu=$(load_per_m $((after - before)))

# The node binary's own pipeline with the settings given as arguments
# (VAR=value ...), 10,000 sensors at 300 readings/s each (3 million/s
# offered, more than the way takes; each sensor at most one reading a
# millisecond, as a database needs), no request-rate limit, for $seconds,
# then SIGTERM. Sets phase_rate (samples/s landed over the whole run, the
# drain after SIGTERM included), phase_landed, phase_vm_cpu and
# phase_summary (the node's summary line).
node_phase() {
    local out="$work/node-$RANDOM.out" pid started ran before after vm0 vm1
    before=$(landed); vm0=$(cpu_ticks "$vm_pid")
    env "$@" SENSOR_COUNT=10000 SENSOR_VALUE_RATE_PER_SECOND=300 REQUEST_RATE_PER_SECOND=inf \
        LOGGER_MIN_LOG_LEVEL=error target/$profile/telemetry-node >"$out" 2>&1 &
    pid=$!
    pids+=("$pid")
    started=$(date +%s.%N)
    sleep "$seconds"
    kill -TERM "$pid"; wait "$pid" || true
    ran=$(python3 -c "import time; print(time.time() - $started)")
    after=$(settle); vm1=$(cpu_ticks "$vm_pid")
    phase_rate=$(python3 -c "print(int(($after - $before) / $ran))")
    phase_landed=$((after - before))
    phase_vm_cpu=$(per_m "$vm0" "$vm1" "$phase_landed")
    phase_summary=$(grep '^summary:' "$out" || true)
}

# (d) the whole way: the node's own pipeline -> sink -> VictoriaMetrics.
node_phase GRPC_SERVER_SOCKET="127.0.0.1:$sink" NODE_ID=bench
node_rate=$phase_rate node_landed=$phase_landed node_summary=$phase_summary

# (e) the node writing to VictoriaMetrics itself (DESTINATION=remote-write),
# no sink between.
node_phase DESTINATION=remote-write REMOTE_WRITE_URL="http://127.0.0.1:$vm/api/v1/write" NODE_ID=bench-direct
direct_rate=$phase_rate direct_landed=$phase_landed direct_vm_cpu=$phase_vm_cpu direct_summary=$phase_summary

# (c) vmagent
agent=$(free_port)
vmagent -remoteWrite.url="http://127.0.0.1:$vm/api/v1/write" -httpListenAddr="127.0.0.1:$agent" \
    -remoteWrite.tmpDataPath="$work/vmagent" -loggerLevel=ERROR >"$work/vmagent.log" 2>&1 &
agent_pid=$!
pids+=("$agent_pid")
wait_http "$agent" /health
before=$(landed); cpu0=$(cpu_ticks "$agent_pid"); vm0=$(cpu_ticks "$vm_pid"); started=$(date +%s.%N)
run_load rw "http://127.0.0.1:$agent/api/v1/write" "$seconds" --bench
after=$(settle); cpu1=$(cpu_ticks "$agent_pid"); vm1=$(cpu_ticks "$vm_pid")
agent_rate=$(rate "$started" $((after - before)))
agent_window=$(( (after - before) / seconds ))
agent_cpu=$(per_m "$cpu0" "$cpu1" $((after - before)))
agent_vm_cpu=$(per_m "$vm0" "$vm1" $((after - before)))
agent_load_cpu=$(load_per_m $((after - before)))

echo "Samples/s from the first request until the last sample landed; CPU seconds per million samples."
echo "ceiling (bare client -> VictoriaMetrics): $ceiling samples/s; CPU: client $ceiling_load_cpu, VictoriaMetrics $ceiling_vm_cpu"
echo "sink    (sensor.v1 -> sink -> VictoriaMetrics): $sink_rate samples/s; CPU: client $sink_load_cpu, sink $sink_cpu, VictoriaMetrics $sink_vm_cpu"
echo "vmagent (remote-write -> vmagent -> VictoriaMetrics): $agent_rate samples/s ($agent_window/s over the ${seconds}s it took requests, its queue written out after); CPU: client $agent_load_cpu, vmagent $agent_cpu, VictoriaMetrics $agent_vm_cpu"
echo "node    (node -> sink -> VictoriaMetrics, 10,000 sensors): $node_rate samples/s landed ($node_landed in all); $node_summary"
echo "direct  (node -> VictoriaMetrics, DESTINATION=remote-write, 10,000 sensors): $direct_rate samples/s landed ($direct_landed in all); CPU: VictoriaMetrics $direct_vm_cpu; $direct_summary"
echo "remote-write: ceiling=$ceiling sink=$sink_rate vmagent=$agent_rate sink_cpu_s_per_m=$sink_cpu vmagent_cpu_s_per_m=$agent_cpu db_cpu_ceiling=$ceiling_vm_cpu db_cpu_sink=$sink_vm_cpu db_cpu_vmagent=$agent_vm_cpu db_cpu_direct=$direct_vm_cpu"
