#!/usr/bin/env bash
# The original example's replay script, against any broker (no docker exec).
#
#   scripts/kafka-replay.sh -t TOPIC [-s SERVERS] [-o earliest|latest|OFFSET] [-p PARTITION] [-f]
#   scripts/kafka-replay.sh -t TOPIC [-s SERVERS] -o earliest|OFFSET [-p PARTITION] -r GROUP [-y]
#
# Without -r: prints partition:offset, key and value of each record from the offset, and exits at
# the end of the topic (-f follows new records).
# With -r GROUP: replays the projector of consumer group GROUP from the offset (`projector replay`,
# which works while the projector runs): from earliest it rebuilds the views into fresh tables and
# swaps them in; from OFFSET (in every partition, or in -p's) it re-applies the events from there
# over the live views. It shows the plan and asks first; -y answers yes.
#
# -s defaults to KAFKA_BROKERS, else the dev broker 127.0.0.1:19092; -r uses VIEW_DB_URL, else the
# dev stack's materialized_view_db. Binaries come from CDC_BIN_DIR when set, else a release build.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
topic="" servers=${KAFKA_BROKERS:-127.0.0.1:19092} offset=earliest partition="" follow=0 group="" yes=0
while getopts "t:s:o:p:r:yfh" opt; do
  case $opt in
    t) topic=$OPTARG ;;
    s) servers=$OPTARG ;;
    o) offset=$OPTARG ;;
    p) partition=$OPTARG ;;
    f) follow=1 ;;
    r) group=$OPTARG ;;
    y) yes=1 ;;
    h) sed -n '2,16p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) exit 2 ;;
  esac
done
die() { printf 'error: %s\n' "$*" >&2; exit 2; }
[ -n "$topic" ] || die "-t TOPIC is required (-h for help)"
case $offset in
  earliest | latest) ;;
  *) [[ $offset =~ ^[0-9]+$ ]] || die "-o takes earliest, latest or an offset, not '$offset'" ;;
esac
[ -z "$partition" ] || [[ $partition =~ ^[0-9]+$ ]] || die "-p takes a partition number, not '$partition'"

# binary NAME PACKAGE: the path of a workspace binary, built (release) unless CDC_BIN_DIR has it.
binary() {
  if [ -n "${CDC_BIN_DIR:-}" ]; then
    [ -x "$CDC_BIN_DIR/$1" ] || die "$CDC_BIN_DIR/$1 does not exist"
    printf '%s\n' "$CDC_BIN_DIR/$1"
    return
  fi
  (cd "$ROOT" && cargo build --release --quiet -p "$2" --bin "$1")
  printf '%s\n' "$ROOT/target/release/$1"
}

if [ -z "$group" ]; then
  args=(-t "$topic" -s "$servers" -o "$offset")
  [ -z "$partition" ] || args+=(-p "$partition")
  [ "$follow" = 0 ] || args+=(-f)
  exec "$(binary kafka-print kafka-tools)" "${args[@]}"
fi

[ "$follow" = 0 ] || die "-f does not go with -r"
case $offset in
  earliest)
    [ -z "$partition" ] || die "-o earliest -r rebuilds the views from every partition: leave out -p"
    from=(--earliest --rebuild) ;;
  latest) die "-o latest -r would skip events; the projector keeps its own position with the views (nothing to replay)" ;;
  *) if [ -n "$partition" ]; then from=(--offset "$partition:$offset"); else from=(--offset "$offset"); fi ;;
esac
[ "$yes" = 0 ] || from+=(--yes)
export KAFKA_BROKERS=$servers PROJECTOR_TOPIC=$topic PROJECTOR_GROUP=$group
export VIEW_DB_URL=${VIEW_DB_URL:-postgres://view_service:view_service@127.0.0.1:55432/materialized_view_db}
exec "$(binary projector projector)" replay "${from[@]}"
