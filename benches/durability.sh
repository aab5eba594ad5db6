#!/usr/bin/env bash
# What a database killed with SIGKILL keeps of what it acknowledged: a node
# (4 sensors x 250 readings/s) writes through the sink for SECONDS, is
# frozen, the database is killed, restarted, and its samples counted.
# Usage: benches/durability.sh [seconds] [victoria-metrics|prometheus] [database flags...]
set -u
cd "$(dirname "$0")/.."
SECONDS_RUN=${1:-20}
KIND=${2:-victoria-metrics}
shift 2 2>/dev/null || shift $#
cargo build --release --quiet --bins
W=$(mktemp -d)
DB=$((30000 + RANDOM % 10000)); SINK=$((DB + 1))
trap 'rm -rf "$W"' EXIT
printf 'global:\n  scrape_interval: 1h\n' > "$W/prometheus.yml"
database() {
    if [ "$KIND" = prometheus ]; then
        prometheus --config.file="$W/prometheus.yml" --storage.tsdb.path="$W/data" --web.listen-address=127.0.0.1:$DB \
            --web.enable-remote-write-receiver --log.level=error "$@" >>"$W/db.log" 2>&1 &
    else
        victoria-metrics -storageDataPath="$W/data" -httpListenAddr=127.0.0.1:$DB -loggerLevel=ERROR \
            -dedup.minScrapeInterval=1ms "$@" >>"$W/db.log" 2>&1 &
    fi
    echo $!
}
stored() {
    if [ "$KIND" = prometheus ]; then
        curl -s "127.0.0.1:$DB/api/v1/query" --data-urlencode 'query=sum(count_over_time(sensor_value[1h]))' |
            python3 -c 'import sys,json; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else 0)'
    else
        curl -s "127.0.0.1:$DB/api/v1/export" -d 'match[]={__name__!=""}' |
            python3 -c 'import sys,json; print(sum(len(json.loads(l)["values"]) for l in sys.stdin if l.strip()))'
    fi
}
D=$(database "$@"); sleep 3
GRPC_SERVER_SOCKET=127.0.0.1:$SINK OUTPUT=remote-write REMOTE_WRITE_URL=http://127.0.0.1:$DB/api/v1/write \
    LOGGER_MIN_LOG_LEVEL=warn target/release/telemetry-sink >"$W/sink.log" 2>&1 &
S=$!; sleep 0.5
GRPC_SERVER_SOCKET=127.0.0.1:$SINK NODE_ID=n SENSOR_COUNT=4 SENSOR_VALUE_RATE_PER_SECOND=250 \
    LOGGER_MIN_LOG_LEVEL=warn target/release/telemetry-node >"$W/node.out" 2>&1 &
N=$!
sleep "$SECONDS_RUN"
kill -STOP $N; sleep 0.3      # nothing more is acknowledged
kill -KILL $D; wait $D 2>/dev/null
kill -CONT $N; kill -TERM $N; wait $N
kill -TERM $S; wait $S
acked=$(grep -o 'acked=[0-9]*' "$W/node.out" | tail -n 1 | cut -d= -f2)
D=$(database "$@"); sleep 5
kept=$(stored)
kill $D; wait $D 2>/dev/null
awk -v k="$KIND" -v a="$acked" -v s="$kept" 'BEGIN {
    printf "durability: database=%s acked=%d stored_after_sigkill=%d lost=%d lost_seconds=%.1f\n", k, a, s, a - s, (a - s) / 1000 }'
