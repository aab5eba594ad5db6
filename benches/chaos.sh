#!/usr/bin/env bash
# A chaos run: two nodes sending to two sink replicas behind one spread
# address (as a Kubernetes Service), the replicas relaying to
# VictoriaMetrics, and a third node writing to VictoriaMetrics itself, each
# on a host of its own (network namespaces on a switch). Under steady load a
# seeded random schedule cuts links (silently, both ways), kills and
# restarts nodes and sinks (SIGKILL and SIGTERM), restarts the database
# (SIGTERM), and stops processes for a while (SIGSTOP/SIGCONT). At the end
# everything is healed, the nodes are stopped, and every run of every node
# is audited against the database:
#   - produced = acked + dropped (each drop with its reason), from the run's summary;
#   - every acknowledged reading is stored: stored >= acked, and stored <= produced;
#   - within a series, no reading is missing between two stored ones unless dropped;
# a run ended by SIGKILL has no summary: what it held in memory is lost with
# it, and the audit reports that window apart. (SIGKILL of VictoriaMetrics
# loses its own window of acknowledged samples: benches/durability.sh
# measures it; it is not part of this run.) Memory of nodes and sinks is
# sampled through the run and must not grow.
#
# Usage (root): benches/chaos.sh [minutes] [seed]
# Needs: ip (iproute2), nft (nftables), victoria-metrics, curl, python3.
# Prints the seed first: the same seed gives the same schedule.
set -u
cd "$(dirname "$0")/.."
MINUTES=${1:-3}
SEED=${2:-$(( $(date +%s) % 100000 ))}
echo "chaos: seed=$SEED minutes=$MINUTES"
for tool in ip nft victoria-metrics curl python3; do
    command -v "$tool" >/dev/null || { echo "chaos: $tool not installed"; exit 2; }
done
[ "$(id -u)" = 0 ] || { echo "chaos: network namespaces need root"; exit 2; }
cargo build --release --quiet --locked --bins || exit 1
NODE_BIN=$PWD/target/release/telemetry-node
SINK_BIN=$PWD/target/release/telemetry-sink
VM_BIN=$(command -v victoria-metrics)

W=$(mktemp -d /tmp/chaos.XXXXXX)
P=chaos$$
declare -A PID NS ADDR RUN KILLED_AT
NS[switch]=$P-switch
HOSTS=(db s1 s2 n1 n2 n3)
RATE=5            # readings a second per sensor (the default)
SENSORS=20        # per node

cleanup() {
    for name in "${!PID[@]}"; do kill -CONT "${PID[$name]}" 2>/dev/null; kill -KILL "${PID[$name]}" 2>/dev/null; done
    wait 2>/dev/null
    for host in "${HOSTS[@]}" switch; do ip netns delete "${NS[$host]}" 2>/dev/null; done
    [ -n "${KEEP:-}" ] || rm -rf "$W"
}
trap cleanup EXIT

# --- the network -----------------------------------------------------------
ip netns add "${NS[switch]}"
ip -n "${NS[switch]}" link add br0 type bridge
ip -n "${NS[switch]}" link set br0 up
n=2
for host in "${HOSTS[@]}"; do
    NS[$host]=$P-$host; ADDR[$host]=10.0.0.$n
    ip netns add "${NS[$host]}"
    ip -n "${NS[switch]}" link add "p$n" type veth peer name eth0 netns "${NS[$host]}"
    ip -n "${NS[switch]}" link set "p$n" master br0 up
    ip -n "${NS[$host]}" addr add "${ADDR[$host]}/24" dev eth0
    ip -n "${NS[$host]}" link set eth0 up
    ip -n "${NS[$host]}" link set lo up
    n=$((n + 1))
done
in_ns() { local host=$1; shift; ip netns exec "${NS[$host]}" "$@"; }
# The replicas' spread address, seen from the two sink-bound nodes.
SERVICE=10.0.0.100
for node in n1 n2; do
    in_ns "$node" nft add table ip spread
    in_ns "$node" nft add chain ip spread output '{ type nat hook output priority -100; }'
    in_ns "$node" nft add rule ip spread output ip daddr $SERVICE tcp dport 8000 \
        dnat to numgen inc mod 2 map "{ 0 : ${ADDR[s1]}, 1 : ${ADDR[s2]} }"
done
# A silent cut of a and b: each drops what comes from the other.
cut() {
    in_ns "$1" nft add table inet "cut_$2" 2>/dev/null
    in_ns "$1" nft add chain inet "cut_$2" input '{ type filter hook input priority 0; }'
    in_ns "$1" nft add rule inet "cut_$2" input ip saddr "${ADDR[$2]}" drop
    in_ns "$2" nft add table inet "cut_$1" 2>/dev/null
    in_ns "$2" nft add chain inet "cut_$1" input '{ type filter hook input priority 0; }'
    in_ns "$2" nft add rule inet "cut_$1" input ip saddr "${ADDR[$1]}" drop
}
heal() {
    in_ns "$1" nft delete table inet "cut_$2" 2>/dev/null
    in_ns "$2" nft delete table inet "cut_$1" 2>/dev/null
}

# --- the processes ------------------------------------------------------------
DB_URL=http://${ADDR[db]}:8428/api/v1/write
start_db() {
    # Started by `ip netns exec` itself (not a shell function, which would
    # run in a subshell): it execs the program, so $! is the program.
    ip netns exec "${NS[db]}" "$VM_BIN" -storageDataPath="$W/vm" -httpListenAddr=0.0.0.0:8428 -loggerLevel=ERROR \
        -dedup.minScrapeInterval=1ms >>"$W/db.log" 2>&1 &
    PID[db]=$!
    for _ in $(seq 100); do in_ns db curl -sf 127.0.0.1:8428/health >/dev/null && return; sleep 0.1; done
}
start_sink() {
    ip netns exec "${NS[$1]}" env -i GRPC_SERVER_SOCKET=0.0.0.0:8000 OUTPUT=remote-write REMOTE_WRITE_URL="$DB_URL" \
        "$SINK_BIN" >>"$W/$1.out" 2>>"$W/$1.err" &
    PID[$1]=$!
}
# Each run of a node has an identity of its own, so that the audit can hold
# each run to its own summary.
start_node() {
    local node=$1 run=$(( ${RUN[$1]:-0} + 1 ))
    RUN[$node]=$run
    local id=$node-r$run
    local env=(NODE_ID="$id" SENSOR_COUNT=$SENSORS SENSOR_VALUE_RATE_PER_SECOND=$RATE)
    if [ "$node" = n3 ]; then
        env+=(DESTINATION=remote-write REMOTE_WRITE_URL="$DB_URL")
    else
        env+=(GRPC_SERVER_SOCKET=$SERVICE:8000)
    fi
    ip netns exec "${NS[$node]}" env -i "${env[@]}" "$NODE_BIN" >"$W/$id.out" 2>"$W/$id.err" &
    PID[$node]=$!
}
# Rows the database inserted, over its restarts (its counter starts again
# at each): more than it stores is what was sent more than once.
INSERTED=0
db_inserted() {
    in_ns db curl -s 127.0.0.1:8428/metrics |
        awk '/^vm_rows_inserted_total\{type="promremotewrite"\}/ {n += $2} END {printf "%d", n}'
}
# Stops `name` with `signal` and waits for it; a node's run is recorded as
# killed (no summary) or stopped.
stop() {
    local name=$1 signal=$2
    if [ "$name" = db ]; then INSERTED=$((INSERTED + $(db_inserted))); fi
    kill -CONT "${PID[$name]}" 2>/dev/null
    kill "-$signal" "${PID[$name]}" 2>/dev/null
    wait "${PID[$name]}" 2>/dev/null
    if [ "$signal" = KILL ] && [[ $name == n* ]]; then KILLED_AT[$name-r${RUN[$name]}]=$(date +%s.%N); fi
}

start_db
start_sink s1; start_sink s2
sleep 0.5
start_node n1; start_node n2; start_node n3
echo "chaos: running; work folder $W"

# --- the schedule -------------------------------------------------------------
RANDOM=$SEED
LINKS=("n1 s1" "n1 s2" "n2 s1" "n2 s2" "s1 db" "s2 db" "n3 db")
declare -a UNDO_AT UNDO_DO
EVENTS=0
declare -A COUNT
schedule_undo() { UNDO_AT+=("$1"); UNDO_DO+=("$2"); }
busy() { local name=$1; for action in "${UNDO_DO[@]}"; do [[ $action == *" $name"* || $action == *"$name "* ]] && return 0; done; return 1; }
RSS_LOG=$W/rss.log
rss() { for name in s1 s2 n1 n2 n3; do
    local kib; kib=$(awk '/VmRSS/ {print $2}' "/proc/${PID[$name]}/status" 2>/dev/null) || continue
    [ -n "$kib" ] && echo "$SECONDS $name $kib" >>"$RSS_LOG"; done; }
START=$SECONDS
END=$((START + MINUTES * 60))
NEXT=$((START + 5))
LAST_RSS=0
while [ $SECONDS -lt $END ]; do
    now=$SECONDS
    # Undo what is due.
    for i in "${!UNDO_AT[@]}"; do
        if [ "${UNDO_AT[$i]}" -le "$now" ]; then eval "${UNDO_DO[$i]}"; unset 'UNDO_AT[i]' 'UNDO_DO[i]'; fi
    done
    UNDO_AT=("${UNDO_AT[@]}"); UNDO_DO=("${UNDO_DO[@]}")
    if [ $((now - LAST_RSS)) -ge 10 ]; then rss; LAST_RSS=$now; fi
    if [ "$now" -ge "$NEXT" ] && [ "$now" -lt $((END - 25)) ]; then
        kind=$((RANDOM % 8))
        case $kind in
            0|1|2)  # a link cut for 2 to 20 s
                link=${LINKS[$((RANDOM % ${#LINKS[@]}))]}; set -- $link
                if ! busy "$1 $2"; then
                    cut "$1" "$2"; schedule_undo $((now + 2 + RANDOM % 19)) "heal $1 $2"; COUNT[cut]=$((${COUNT[cut]:-0} + 1))
                fi ;;
            3)  # a sink killed or stopped, and started again 1 to 5 s later
                sink=s$((1 + RANDOM % 2)); signal=$([ $((RANDOM % 2)) = 0 ] && echo KILL || echo TERM)
                if ! busy "$sink"; then
                    stop "$sink" "$signal"; schedule_undo $((now + 1 + RANDOM % 5)) "start_sink $sink"
                    COUNT[sink_$signal]=$((${COUNT[sink_$signal]:-0} + 1))
                fi ;;
            4)  # a sink hung for 5 to 30 s
                sink=s$((1 + RANDOM % 2))
                if ! busy "$sink"; then
                    kill -STOP "${PID[$sink]}"; schedule_undo $((now + 5 + RANDOM % 26)) "kill -CONT \${PID[$sink]} # $sink"
                    COUNT[sink_STOP]=$((${COUNT[sink_STOP]:-0} + 1))
                fi ;;
            5|6)  # a node stopped (SIGTERM) or killed (SIGKILL), started again
                node=n$((1 + RANDOM % 3)); signal=$([ $((RANDOM % 3)) = 0 ] && echo KILL || echo TERM)
                if ! busy "$node"; then
                    stop "$node" "$signal"; start_node "$node"; COUNT[node_$signal]=$((${COUNT[node_$signal]:-0} + 1))
                fi ;;
            7)  # the database restarted (SIGTERM)
                if ! busy "db"; then
                    stop db TERM; schedule_undo $((now + 1 + RANDOM % 4)) "start_db # db"
                    COUNT[db_TERM]=$((${COUNT[db_TERM]:-0} + 1))
                fi ;;
        esac
        EVENTS=$((EVENTS + 1))
        NEXT=$((now + 2 + RANDOM % 5))
    fi
    sleep 0.2
done

# --- the end: heal, drain, stop, audit ---------------------------------------------
for action in "${UNDO_DO[@]}"; do eval "$action"; done
for link in "${LINKS[@]}"; do heal $link; done
for name in s1 s2 n1 n2 n3; do kill -CONT "${PID[$name]}" 2>/dev/null; done
kill -0 "${PID[db]}" 2>/dev/null || start_db
for sink in s1 s2; do kill -0 "${PID[$sink]}" 2>/dev/null || start_sink "$sink"; done
rss
sleep 15
for node in n1 n2 n3; do stop "$node" TERM; done
for sink in s1 s2; do stop "$sink" TERM; done
echo -n "chaos: events:"; for kind in "${!COUNT[@]}"; do echo -n " $kind=${COUNT[$kind]}"; done; echo
# What the database holds, once its count settles.
export_all() { in_ns db curl -s 127.0.0.1:8428/api/v1/export -d 'match[]={node!=""}'; }
previous=-1
for _ in $(seq 60); do
    in_ns db curl -s 127.0.0.1:8428/internal/force_flush >/dev/null
    count=$(export_all | python3 -c 'import sys,json; print(sum(len(json.loads(l)["values"]) for l in sys.stdin if l.strip()))')
    [ "$count" = "$previous" ] && break
    previous=$count; sleep 2
done
export_all >"$W/export.jsonl"
inserted=$((INSERTED + $(db_inserted)))
for id in "${!KILLED_AT[@]}"; do echo "$id ${KILLED_AT[$id]}"; done >"$W/killed.txt"

python3 - "$W" "$RATE" "${inserted:-0}" <<'EOF'
import json, os, sys, collections
work, rate, inserted = sys.argv[1], float(sys.argv[2]), int(float(sys.argv[3]))
killed = dict(line.split() for line in open(os.path.join(work, "killed.txt")) if line.strip())
series = collections.defaultdict(list)
for line in open(os.path.join(work, "export.jsonl")):
    if line.strip():
        row = json.loads(line)
        sensor = row["metric"].get("sensor", row["metric"]["__name__"])
        series[(row["metric"]["node"], sensor)].extend(row["timestamps"])
stored = collections.Counter()
holes = collections.Counter()
last_ms = collections.defaultdict(int)
step = 1000.0 / rate
for (run, sensor), times in series.items():
    times.sort()
    stored[run] += len(times)
    for a, b in zip(times, times[1:]):
        holes[run] += max(0, round((b - a) / step) - 1)
    last_ms[run] = max(last_ms[run], times[-1]) if times else last_ms[run]
failures = []
totals = collections.Counter()
runs = sorted({f[:-4] for f in os.listdir(work) if f.endswith(".out") and f.startswith("n")})
for run in runs:
    text = open(os.path.join(work, run + ".out")).read()
    summary = next((l[len("summary: "):] for l in text.splitlines() if l.startswith("summary: ")), None)
    if run in killed:
        window = float(killed[run]) - last_ms[run] / 1000.0 if last_ms[run] else float("nan")
        print(f"  {run}: SIGKILL, no summary; stored={stored[run]} holes={holes[run]}; "
              f"its last stored reading {window:.1f} s before the kill (held in memory, lost with the process)")
        totals["killed_runs"] += 1
        continue
    if summary is None:
        failures.append(f"{run}: no summary line")
        continue
    fields = dict(f.split("=", 1) for f in summary.split())
    n = {k: int(v) for k, v in fields.items() if k != "dropped_by"}
    produced, acked, dropped = n["produced"], n["acked"], n["dropped"]
    totals["produced"] += produced; totals["acked"] += acked; totals["dropped"] += dropped; totals["stored"] += stored[run]
    line = (f"  {run}: produced={produced} acked={acked} dropped={dropped} {fields.get('dropped_by', '')} "
            f"stored={stored[run]} holes={holes[run]}")
    print(line)
    if produced != acked + dropped + n.get("in_spool", 0):
        failures.append(f"{run}: produced != acked + dropped")
    if stored[run] < acked:
        failures.append(f"{run}: {acked - stored[run]} acknowledged readings are not stored")
    if stored[run] > produced:
        failures.append(f"{run}: more stored than produced")
    if holes[run] > dropped + n["missed"]:
        failures.append(f"{run}: {holes[run]} readings missing between stored ones, {dropped} dropped, {n['missed']} missed")
rss = collections.defaultdict(list)
for line in open(os.path.join(work, "rss.log")):
    t, name, kib = line.split()
    rss[name].append((int(t), int(kib)))
for name, samples in sorted(rss.items()):
    if len(samples) < 4:
        continue
    half = len(samples) // 2
    early, late = max(k for _, k in samples[:half]), max(k for _, k in samples[half:])
    print(f"  memory {name}: first half peak {early / 1024:.1f} MiB, second half peak {late / 1024:.1f} MiB")
    # A restarted process starts small: growth is judged against the larger
    # of the first half's peak and 32 MiB.
    if late > max(early, 32 * 1024) * 1.5:
        failures.append(f"{name}: memory grew from {early} KiB to {late} KiB")
print(f"chaos: runs audited={len(runs) - totals['killed_runs']} killed={totals['killed_runs']} "
      f"produced={totals['produced']} acked={totals['acked']} dropped={totals['dropped']} "
      f"stored={totals['stored']} rows_inserted={inserted} (sent more than once and stored once: "
      f"{max(0, inserted - sum(stored.values()))})")
for failure in failures:
    print("chaos: FAILED:", failure)
sys.exit(1 if failures else 0)
EOF
status=$?
[ $status = 0 ] && echo "chaos: ok (seed $SEED)" || { echo "chaos: failed (seed $SEED; KEEP=1 keeps $W)"; }
exit $status
