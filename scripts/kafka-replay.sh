#!/usr/bin/env bash
# Print the records of a topic, as the original example's script did, against any broker (no
# docker exec): key and value of each record from the offset, exiting at the end of the topic.
#
#   scripts/kafka-replay.sh -t user-events [-s SERVERS] [-o earliest|latest|OFFSET] [-p PARTITION] [-f]
#
# -s defaults to KAFKA_BROKERS, else the dev broker 127.0.0.1:19092. -f follows new records.
# -r GROUP (replaying the projector from the offset) is not built yet: the projector reads its
# offsets from materialized_view_db.projector_offsets, and the replay tooling is still to come.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
args=()
while getopts "t:s:o:p:r:yfh" opt; do
  case $opt in
    t) args+=(-t "$OPTARG") ;;
    s) args+=(-s "$OPTARG") ;;
    o) args+=(-o "$OPTARG") ;;
    p) args+=(-p "$OPTARG") ;;
    f) args+=(-f) ;;
    r) echo "error: -r (replay the projector's group) is not built yet; the projector's offsets live in materialized_view_db.projector_offsets" >&2; exit 2 ;;
    y) ;;
    h) sed -n '2,9p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) exit 2 ;;
  esac
done
(cd "$ROOT" && cargo build --release --quiet -p kafka-tools --bin kafka-print)
exec "$ROOT/target/release/kafka-print" "${args[@]}"
