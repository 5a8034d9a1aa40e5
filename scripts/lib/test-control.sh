#!/usr/bin/env bash
# Lets the disruptive tests and the chaos run act on the stack scripts/test (or scripts/chaos)
# started: restart PostgreSQL; kill, stop, start, pause or resume a Kafka node.
#
#   test-control.sh pg-restart fast|immediate
#   test-control.sh kafka|kafka-cluster kill|stop|start|pause|resume NODE
#
# `kafka` is the one-node Kafka every test uses, `kafka-cluster` the three-node cluster; NODE counts
# from 1. `start` waits until the node has started. Needs CDC_TEST_STACK.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/stack.sh"
: "${CDC_TEST_STACK:?}"
usage() { die "usage: test-control.sh pg-restart fast|immediate | test-control.sh kafka|kafka-cluster kill|stop|start|pause|resume NODE"; }
case ${1:-} in
  pg-restart)
    ensure_postgres
    mode=${2:-fast}
    real=$(pg_dir "$CDC_TEST_STACK/postgres")
    pg_as "$PG_BIN/pg_ctl" -D "$real/data" -m "$mode" -w -t 60 stop >/dev/null
    pg_start "$CDC_TEST_STACK/postgres" ;;
  kafka|kafka-cluster)
    c=$CDC_TEST_STACK/$1 node=${3:-}
    [ -f "$c/cluster.env" ] || die "no Kafka cluster in $c"
    [[ $node =~ ^[0-9]+$ ]] && [ "$node" -ge 1 ] && [ "$node" -le "$(kafka_nodes "$c")" ] || usage
    ensure_java
    case ${2:-} in
      kill) kafka_node_kill "$c" "$node" ;;
      stop) kafka_node_stop "$c" "$node" ;;
      start) kafka_node_start "$c" "$node"; kafka_node_wait "$c" "$node" 120 ;;
      pause) kafka_node_signal "$c" "$node" STOP ;;
      resume) kafka_node_signal "$c" "$node" CONT ;;
      *) usage ;;
    esac ;;
  *) usage ;;
esac
