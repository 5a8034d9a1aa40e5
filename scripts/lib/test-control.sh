#!/usr/bin/env bash
# Lets the disruptive tests act on the stack scripts/test started (they run one at a time, after
# every other test): restart PostgreSQL, stop and start the durable broker.
#
#   test-control.sh pg-restart fast|immediate | broker-stop | broker-start
#
# Needs CDC_TEST_STACK (the stack's directory) and CDC_TEST_DURABLE_KAFKA_PORT from scripts/test.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/stack.sh"
: "${CDC_TEST_STACK:?}" "${CDC_TEST_DURABLE_KAFKA_PORT:?}"
ensure_postgres
case ${1:-} in
  pg-restart)
    mode=${2:-fast}
    real=$(pg_dir "$CDC_TEST_STACK/postgres")
    pg_as "$PG_BIN/pg_ctl" -D "$real/data" -m "$mode" -w -t 60 stop >/dev/null
    pg_start "$CDC_TEST_STACK/postgres" ;;
  broker-stop) broker_stop "$CDC_TEST_STACK/kafka-durable" ;;
  broker-start) broker_start "$CDC_TEST_STACK/kafka-durable" "$CDC_TEST_DURABLE_KAFKA_PORT" sqlite ;;
  *) die "usage: test-control.sh pg-restart fast|immediate | broker-stop | broker-start" ;;
esac
