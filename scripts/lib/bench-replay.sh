#!/usr/bin/env bash
# `scripts/bench replay`: the replay tools on N rows, on the stack scripts/bench started
# (CDC_TEST_PG_URL, CDC_TEST_KAFKA_BROKERS, release binaries in $BIN). A reader and a projector run
# throughout; N users are written and projected; then, timed, each as its command:
#   projector replay --earliest --rebuild   (fresh tables filled and swapped in)
#   projector replay --earliest             (repair in place; the projector is paused meanwhile)
#   cdc-reader snapshot                     (every row published again while streaming)
# Prints a BENCH line: replay_rows, rebuild_events_per_s, repair_events_per_s, snapshot_rows_per_s.
set -euo pipefail
N=1000000
while [ $# -gt 0 ]; do
  case $1 in
    --changes) N=$2; shift 2 ;;
    *) shift ;;
  esac
done
: "${BIN:?}" "${PSQL:?}" "${CDC_TEST_PG_URL:?}" "${CDC_TEST_KAFKA_BROKERS:?}"
base=${CDC_TEST_PG_URL%/postgres}
suffix=$(date +%s)
users_db=bench_replay_u_$suffix views_db=bench_replay_v_$suffix topic=bench-replay-$suffix
"$PSQL" -X -q "$CDC_TEST_PG_URL" -c "CREATE DATABASE $users_db" -c "CREATE DATABASE $views_db"
"$BIN/migrate" --user-db-url "$base/$users_db" --view-db-url "$base/$views_db" >/dev/null 2>&1
export KAFKA_BROKERS=$CDC_TEST_KAFKA_BROKERS RUST_LOG=warn
export CDC_READER_DATABASE_URL=$base/$users_db CDC_READER_SLOT=$users_db
export VIEW_DB_URL=$base/$views_db PROJECTOR_TOPIC=$topic PROJECTOR_GROUP=bench-replay
CDC_READER_PUBLICATION=$users_db CDC_READER_TOPICS=public.users=$topic \
  CDC_READER_HTTP_LISTEN=127.0.0.1:0 "$BIN/cdc-reader" 2>"$STACK/bench-replay-reader.log" &
reader=$!
PROJECTOR_HTTP_LISTEN=127.0.0.1:0 "$BIN/projector" \
  2>"$STACK/bench-replay-projector.log" &
projector=$!
trap 'kill "$reader" "$projector" 2>/dev/null || true' EXIT
until "$PSQL" -X -tA "$base/$users_db" -c "SELECT 1 FROM cdc_reader_snapshots" | grep -q 1; do sleep 0.2; done
echo "writing and projecting $N users..."
"$PSQL" -X -q "$base/$users_db" -c "INSERT INTO users (name, email, department, status)
  SELECT 'User ' || i, 'u' || i || '@example.org', 'Dept ' || (i % 20),
         CASE WHEN i % 4 = 0 THEN 'INACTIVE' ELSE 'ACTIVE' END FROM generate_series(1, $N) i"
until [ "$("$PSQL" -X -tA "$base/$views_db" -c 'SELECT count(*) FROM user_view')" = "$N" ]; do
  sleep 0.5
done
# timed LABEL COMMAND...: runs it, prints its last line, sets SECONDS_TAKEN.
timed() {
  local label=$1 start end
  shift
  start=$(date +%s%N)
  "$@" 2>&1 | tail -n 1
  end=$(date +%s%N)
  SECONDS_TAKEN=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.2f", (b - a) / 1e9 }')
  echo "$label: $SECONDS_TAKEN s"
}
rate() { awk -v n="$N" -v s="$1" 'BEGIN { printf "%.0f", n / s }'; }
timed rebuild "$BIN/projector" replay --earliest --rebuild --yes
rebuild=$SECONDS_TAKEN
timed repair "$BIN/projector" replay --earliest --yes
repair=$SECONDS_TAKEN
timed snapshot "$BIN/cdc-reader" snapshot
snapshot=$SECONDS_TAKEN
echo "BENCH {\"replay_rows\":$N,\"rebuild_s\":$rebuild,\"rebuild_events_per_s\":$(rate "$rebuild"),\"repair_s\":$repair,\"repair_events_per_s\":$(rate "$repair"),\"snapshot_s\":$snapshot,\"snapshot_rows_per_s\":$(rate "$snapshot")}"
