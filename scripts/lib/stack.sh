# shellcheck shell=bash
# Shared by scripts/dev and scripts/test: find or install PostgreSQL, Java and the pinned Apache Kafka,
# run a private PostgreSQL cluster and Kafka KRaft nodes, start and stop processes by pid.
#
# Nothing here looks processes up by name: every process we start has a pid file, and stopping checks
# that the pid still runs the program we started before signalling it.

STACK_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
TOOLS_DIR=${CDC_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-pipeline}
# Apache Kafka: the version is the pom's (scripts/kafka/pom.xml); its jars land in a folder named
# after the pom's content, so a changed pom fetches again and every clone shares the folder.
KAFKA_POM=$STACK_ROOT/scripts/kafka/pom.xml
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM")
KAFKA_LIBS=$TOOLS_DIR/kafka-$KAFKA_VERSION-$(md5sum <"$KAFKA_POM" | cut -c1-8)
# Heap of each Kafka node (a few hundred MB is plenty for these loads).
KAFKA_HEAP=${KAFKA_HEAP:-384m}

# The private cluster's superuser (its password is random per cluster: pg_superuser_password).
PG_SUPERUSER=postgres
# The service roles and databases come from the compose stack's init script, so both stacks grant
# the same least-privilege roles; here each password is the role's name (dev only: the cluster
# listens on 127.0.0.1 only).
PG_INIT_SCRIPT=$STACK_ROOT/compose/postgres/10-cdc-pipeline.sh

log() { printf '%s\n' "$*" >&2; }
die() { printf 'error: %s\n' "$*" >&2; exit 1; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null; then sudo "$@"
  else die "need root (or sudo) to run: $*"
  fi
}

apt_install() {
  log "installing with apt: $*"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || die "apt-get update failed"
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
    || die "apt-get install $* failed"
}

# Sets PG_BIN to a directory holding the PostgreSQL server binaries (newest version found),
# installing the Debian server package when there is none. PG_BINDIR overrides the search.
ensure_postgres() {
  local dir
  if [ -n "${PG_BINDIR:-}" ]; then
    [ -x "$PG_BINDIR/postgres" ] || die "PG_BINDIR=$PG_BINDIR has no postgres binary"
    PG_BIN=$PG_BINDIR
    PSQL=$PG_BIN/psql
    [ -x "$PSQL" ] || PSQL=$(command -v psql) || die "psql not found"
    return
  fi
  PG_BIN=
  for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5V); do
    [ -x "$dir/postgres" ] && [ -x "$dir/initdb" ] && PG_BIN=$dir
  done
  if [ -z "$PG_BIN" ]; then
    # Keep the package from creating and starting its own cluster on 5432: we run a private one.
    as_root mkdir -p /etc/postgresql-common/createcluster.d
    echo 'create_main_cluster = false' \
      | as_root tee /etc/postgresql-common/createcluster.d/cdc-pipeline.conf >/dev/null
    apt_install postgresql postgresql-client
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -t/ -k5,5V); do
      [ -x "$dir/postgres" ] && PG_BIN=$dir
    done
    [ -n "$PG_BIN" ] || die "PostgreSQL server binaries still not found after apt install"
  fi
  PSQL=$PG_BIN/psql
  [ -x "$PSQL" ] || PSQL=$(command -v psql) || die "psql not found"
}

# A C toolchain: librdkafka (bundled by rdkafka) is built from source.
ensure_build_tools() {
  command -v cc >/dev/null && command -v make >/dev/null && return
  apt_install build-essential
}

# curl, for the walkthrough, `scripts/dev check` and the end-to-end tests that run them.
ensure_curl() {
  command -v curl >/dev/null && return
  apt_install curl ca-certificates
}

# Debian's kcat, which users inspect topics with (tests/tests/broker.rs checks that it reads ours).
ensure_kcat() {
  command -v kcat >/dev/null && return
  apt_install kcat
}

# Debian's docker-compose (1.29): validates compose files without a Docker engine.
ensure_docker_compose() {
  command -v docker-compose >/dev/null && return
  apt_install docker-compose
}

# --- processes ---------------------------------------------------------------------------------

# pid_alive PIDFILE: true when the pid in PIDFILE runs and is still the program recorded beside it.
pid_alive() {
  local pidfile=$1 pid exe
  [ -s "$pidfile" ] || return 1
  pid=$(head -n 1 "$pidfile")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  if [ -s "$pidfile.exe" ]; then
    exe=$(readlink "/proc/$pid/exe" 2>/dev/null) || return 1
    [ "${exe% (deleted)}" = "$(cat "$pidfile.exe")" ] || return 1
  fi
}

pid_of() { [ -s "$1" ] && head -n 1 "$1"; }

# start_process PIDFILE LOGFILE WORKDIR PROGRAM [ARGS...]: starts PROGRAM in its own session, in the
# background, appending to LOGFILE; records its pid and executable.
start_process() {
  local pidfile=$1 logfile=$2 workdir=$3
  shift 3
  mkdir -p "$(dirname "$pidfile")" "$(dirname "$logfile")"
  readlink -f "$(command -v "$1")" >"$pidfile.exe"
  rm -f "$pidfile"
  # The inner shell writes its own pid and then becomes the program, so the pid file names the
  # program itself, in a session of its own (a closed terminal does not take it down).
  (cd "$workdir" && exec setsid sh -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" \
    >>"$logfile" 2>&1 </dev/null) &
  # Not a job of this shell: its end (a kill) is no business of the shell's to report.
  disown $! 2>/dev/null || true
  local i
  for ((i = 0; i < 100; i++)); do pid_alive "$pidfile" && return; sleep 0.02; done
  tail -n 20 "$logfile" >&2
  die "could not start $1 (log: $logfile)"
}

# stop_process PIDFILE [SECONDS]: SIGTERM, then SIGKILL after SECONDS (default 15).
stop_process() {
  local pidfile=$1 grace=${2:-15} pid i
  if ! pid_alive "$pidfile"; then
    rm -f "$pidfile" "$pidfile.exe"
    return 0
  fi
  pid=$(pid_of "$pidfile")
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < grace * 10; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  if kill -0 "$pid" 2>/dev/null; then
    log "pid $pid did not stop within ${grace}s; sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile" "$pidfile.exe"
}

# wait_tcp HOST PORT SECONDS: until something accepts connections there.
wait_tcp() {
  local host=$1 port=$2 secs=$3 i
  for ((i = 0; i < secs * 10; i++)); do
    (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null && return 0
    sleep 0.1
  done
  return 1
}

# http_status HOST PORT PATH: prints the HTTP status code of a GET (no curl needed).
http_status() {
  local host=$1 port=$2 path=$3 line
  exec 3<>"/dev/tcp/$host/$port" || return 1
  printf 'GET %s HTTP/1.1\r\nHost: %s:%s\r\nConnection: close\r\n\r\n' "$path" "$host" "$port" >&3
  IFS=' ' read -r -t 5 _ line _ <&3 || { exec 3>&-; return 1; }
  exec 3>&-
  printf '%s\n' "$line"
}

# wait_healthy NAME HOST PORT PATH SECONDS PIDFILE: until GET PATH answers 200, or the process dies.
wait_healthy() {
  local name=$1 host=$2 port=$3 path=$4 secs=$5 pidfile=$6 i
  for ((i = 0; i < secs * 10; i++)); do
    pid_alive "$pidfile" || { log "$name exited during start-up"; return 1; }
    # Checked again after the answer: a 200 from a dead process's port came from someone else.
    [ "$(http_status "$host" "$port" "$path" 2>/dev/null)" = 200 ] && pid_alive "$pidfile" && return 0
    sleep 0.1
  done
  log "$name not healthy within ${secs}s"
  return 1
}

# port_free PORT: nobody accepts connections on 127.0.0.1:PORT.
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_port: a TCP port on 127.0.0.1 nobody listens on right now.
free_port() {
  local port low
  # Below the kernel's ephemeral range, so that no outgoing connection takes the port between
  # this check and the listener's bind (seen: a broker failing with "Address already in use").
  low=$(cut -f1 /proc/sys/net/ipv4/ip_local_port_range 2>/dev/null || echo 32768)
  [ "$low" -gt 12000 ] 2>/dev/null || low=32768
  while :; do
    port=$((10000 + RANDOM % (low - 10000)))
    port_free "$port" && { echo "$port"; return; }
  done
}

# free_ports N: the first of N consecutive free TCP ports on 127.0.0.1.
free_ports() {
  local n=$1 first i ok
  while :; do
    first=$(free_port)
    ok=1
    for ((i = 1; i < n; i++)); do port_free $((first + i)) || { ok=0; break; }; done
    [ "$ok" = 1 ] && { echo "$first"; return; }
  done
}

# --- PostgreSQL --------------------------------------------------------------------------------

# As root, PostgreSQL runs as the OS user postgres (it refuses to run as root).
pg_as() {
  if [ "$(id -u)" = 0 ]; then
    id "$PG_OS_USER" >/dev/null 2>&1 \
      || as_root useradd --system --no-create-home --shell /usr/sbin/nologin "$PG_OS_USER"
    runuser -u "$PG_OS_USER" -- "$@"
  else
    "$@"
  fi
}
PG_OS_USER=${PG_OS_USER:-postgres}

# pg_prepare_dir DIR: makes DIR (where the cluster lives) usable by the OS user running PostgreSQL.
# When root owns a clone the postgres user cannot reach (e.g. under /root), the cluster goes to a
# directory under /var/tmp and DIR becomes a symlink to it.
pg_prepare_dir() {
  local dir=$1 alt
  if [ -L "$dir" ] || [ -d "$dir/data" ]; then return; fi
  mkdir -p "$dir"
  if [ "$(id -u)" = 0 ]; then
    chown "$PG_OS_USER" "$dir" 2>/dev/null || { id "$PG_OS_USER" >/dev/null 2>&1 || pg_as true; chown "$PG_OS_USER" "$dir"; }
    if ! runuser -u "$PG_OS_USER" -- test -w "$dir" 2>/dev/null; then
      alt=/var/tmp/cdc-pipeline-pg-$(printf '%s' "$(readlink -f "$dir")" | md5sum | cut -c1-12)
      log "$PG_OS_USER cannot reach $dir; keeping the cluster in $alt (linked from $dir)"
      rmdir "$dir"
      mkdir -p "$alt"
      chown "$PG_OS_USER" "$alt"
      ln -s "$alt" "$dir"
    fi
  fi
}

# pg_dir DIR: the real directory of a cluster (DIR may be a symlink made by pg_prepare_dir). The
# postgres OS user may not be able to pass through the clone, so PostgreSQL only ever sees this path.
pg_dir() { readlink -f "$1"; }

# pg_socket_dir DIR: where the cluster's Unix socket lives. Socket paths are limited to ~107 bytes,
# so a deep clone gets a short directory under /tmp instead of DIR/run.
pg_socket_dir() {
  local real
  real=$(pg_dir "$1")
  if [ ${#real} -le 70 ]; then
    echo "$real/run"
  else
    echo "/tmp/cdc-pg-$(printf '%s' "$real" | md5sum | cut -c1-12)"
  fi
}

# pg_superuser_password DIR: random per cluster, kept beside it (mode 600), never a known default.
pg_superuser_password() { cat "$(pg_dir "$1")/superuser-password"; }

# pg_init DIR PORT [fast]: creates the cluster in DIR/data once. "fast" turns off fsync (tests only:
# a killed postgres process still loses nothing, only an OS crash would).
pg_init() {
  local dir=$1 port=$2 mode=${3:-} real sock pwfile
  pg_prepare_dir "$dir"
  real=$(pg_dir "$dir")
  sock=$(pg_socket_dir "$dir")
  if [ ! -f "$real/data/PG_VERSION" ]; then
    pwfile=$real/superuser-password
    (umask 077 && head -c 18 /dev/urandom | base64 | tr -d '/+=' >"$pwfile")
    if [ "$(id -u)" = 0 ]; then chown "$PG_OS_USER" "$pwfile"; fi
    pg_as "$PG_BIN/initdb" -D "$real/data" -U "$PG_SUPERUSER" --pwfile="$pwfile" \
      --auth-local=trust --auth-host=scram-sha-256 -E UTF8 --locale=C.UTF-8 >"$real/initdb.log" 2>&1 \
      || { cat "$real/initdb.log" >&2; die "initdb failed"; }
    pg_as tee -a "$real/data/postgresql.conf" >/dev/null <<EOF

# --- cdc-pipeline private cluster ---
listen_addresses = '127.0.0.1'
unix_socket_directories = '$sock'
# Only the OS user running the cluster (and root) may use the socket, where auth is trust.
unix_socket_permissions = 0700
wal_level = logical
max_replication_slots = 64
max_wal_senders = 64
max_connections = 300
wal_sender_timeout = 60s
log_line_prefix = '%m [%p] %q%u@%d '
EOF
    if [ "$mode" = fast ]; then
      pg_as tee -a "$real/data/postgresql.conf" >/dev/null <<EOF
fsync = off
full_page_writes = off
EOF
    fi
    pg_as tee "$real/data/pg_hba.conf" >/dev/null <<EOF
# local socket: trust (the socket is private to the cluster's OS user); TCP: passwords.
local   all          all                    trust
local   replication  all                    trust
host    all          all    127.0.0.1/32    scram-sha-256
host    replication  all    127.0.0.1/32    scram-sha-256
EOF
  fi
  pg_as mkdir -p "$sock"
  # The port is given at each start, so a changed port setting takes effect on the next start.
  echo "$port" >"$real/port"
}

pg_running() { pg_as "$PG_BIN/pg_ctl" -D "$(pg_dir "$1")/data" status >/dev/null 2>&1; }

pg_start() {
  local real
  real=$(pg_dir "$1")
  pg_running "$1" && return
  pg_as mkdir -p "$(pg_socket_dir "$1")"
  pg_as "$PG_BIN/pg_ctl" -D "$real/data" -l "$real/postgres.log" -o "-p $(cat "$real/port")" -w -t 60 start >/dev/null \
    || { tail -n 20 "$real/postgres.log" >&2; die "PostgreSQL did not start (log: $real/postgres.log)"; }
}

pg_stop() {
  pg_running "$1" || return 0
  pg_as "$PG_BIN/pg_ctl" -D "$(pg_dir "$1")/data" -m fast -w -t 60 stop >/dev/null
}

# pg_pid DIR: the postmaster's pid, when running.
pg_pid() {
  local f
  f=$(pg_dir "$1")/data/postmaster.pid
  [ -f "$f" ] && kill -0 "$(head -n 1 "$f")" 2>/dev/null && head -n 1 "$f"
}

# pg_psql DIR PORT DB [psql args...]: psql as the superuser over the cluster's private socket.
pg_psql() {
  local dir=$1 port=$2 db=$3
  shift 3
  "$PSQL" -X -q -v ON_ERROR_STOP=1 -h "$(pg_socket_dir "$dir")" -p "$port" -U "$PG_SUPERUSER" -d "$db" "$@"
}

# pg_bootstrap DIR PORT: the service roles and the two databases, created when missing.
pg_bootstrap() {
  local dir=$1 port=$2
  PATH="$(dirname "$PSQL"):$PATH" PGHOST=$(pg_socket_dir "$dir") PGPORT=$port \
    POSTGRES_USER=$PG_SUPERUSER USER_SERVICE_PASSWORD=user_service \
    VIEW_SERVICE_PASSWORD=view_service CDC_READER_PASSWORD=cdc_reader \
    sh "$PG_INIT_SCRIPT"
}

# --- Apache Kafka --------------------------------------------------------------------------------

# Sets JAVA to a Java 17 or newer (JAVA_HOME first), installing Debian's OpenJDK 17 when none is found.
ensure_java() {
  local candidate major
  for candidate in ${JAVA_HOME:+"$JAVA_HOME/bin/java"} "$(command -v java 2>/dev/null)" \
    /usr/lib/jvm/java-17-openjdk-*/bin/java; do
    [ -x "$candidate" ] || continue
    major=$("$candidate" -XshowSettings:properties -version 2>&1 \
      | sed -n 's/^ *java.specification.version = \([0-9]*\).*/\1/p')
    if [ "${major:-0}" -ge 17 ]; then JAVA=$(readlink -f "$candidate"); return; fi
  done
  apt_install openjdk-17-jre-headless
  JAVA=$(readlink -f /usr/lib/jvm/java-17-openjdk-*/bin/java)
  [ -x "$JAVA" ] || die "Java 17 still not found after apt install"
}

ensure_maven() {
  command -v mvn >/dev/null && return
  apt_install maven
}

# maven_fetch POM DIR WHAT: copies POM's runtime dependencies into DIR once (outside the clone,
# reused by every clone; DIR/.complete marks a finished fetch).
maven_fetch() {
  local pom=$1 dir=$2 what=$3
  [ -f "$dir/.complete" ] && return
  ensure_maven
  mkdir -p "$TOOLS_DIR"
  (
    # One download at a time, even when dev and test start together.
    exec 9>"$TOOLS_DIR/.fetch.lock"
    flock 9
    [ -f "$dir/.complete" ] && exit 0
    log "fetching $what with Maven (once); log: $TOOLS_DIR/fetch.log"
    rm -rf "$dir.tmp"
    mvn -B -q -f "$pom" dependency:copy-dependencies -DincludeScope=runtime \
      -DoutputDirectory="$dir.tmp" >"$TOOLS_DIR/fetch.log" 2>&1 \
      || { tail -n 30 "$TOOLS_DIR/fetch.log" >&2; die "fetching $what failed"; }
    rm -rf "$dir"
    mv "$dir.tmp" "$dir"
    touch "$dir/.complete"
  ) || exit 1
}

# Fetches the pinned Kafka's jars once into $KAFKA_LIBS.
ensure_kafka() {
  ensure_java
  maven_fetch "$KAFKA_POM" "$KAFKA_LIBS" "Apache Kafka $KAFKA_VERSION"
}

# kafka_tool CLASS [ARGS...]: one of Kafka's command-line tools (org.apache.kafka.tools.* or
# kafka.tools.*), from the same jars as the broker.
kafka_tool() {
  local class=$1
  shift
  "$JAVA" -Xmx256m -Dlog4j2.configurationFile="$STACK_ROOT/scripts/kafka/tools-log4j2.properties" \
    -cp "$KAFKA_LIBS/*" "$class" "$@"
}

# log4j2_rolling LOGFILE KEEP PATTERN: prints a log4j2 configuration writing everything at INFO to
# LOGFILE, rolled at 50 MB, KEEP old files kept (for the JVMs we start: Kafka nodes, Connect).
log4j2_rolling() {
  cat <<PROPS
# Written by scripts/lib/stack.sh; changes are overwritten.
status = warn
appender.file.type = RollingFile
appender.file.name = file
appender.file.fileName = $1
appender.file.filePattern = $1.%i
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = $3
appender.file.policies.type = Policies
appender.file.policies.size.type = SizeBasedTriggeringPolicy
appender.file.policies.size.size = 50MB
appender.file.strategy.type = DefaultRolloverStrategy
appender.file.strategy.max = $2
rootLogger.level = INFO
rootLogger.appenderRef.file.ref = file
PROPS
}

# A Kafka cluster lives in one directory C: C/cluster.env (id, node count, ports) and one folder per
# node, C/node-N (server.properties, data/, logs/server.log, kafka.pid). Every node is a combined
# KRaft broker and controller; the controllers form a static quorum of all nodes.

# kafka_cluster_init C NODES FIRST_PORT: a cluster of NODES nodes (1 or 3), node N listening for
# clients on FIRST_PORT + 2(N-1) and for its controller on the port after that; made once, its
# storage formatted once. Its settings are written again at every call (so a changed port applies).
kafka_cluster_init() {
  local c=$1 nodes=$2 first=$3 i voters="" port cport rf isr id
  mkdir -p "$c"
  if [ -f "$c/cluster.env" ]; then
    # shellcheck disable=SC1091
    id=$(. "$c/cluster.env" && echo "$KAFKA_CLUSTER_ID")
    [ "$(. "$c/cluster.env" && echo "$KAFKA_NODES")" = "$nodes" ] \
      || die "$c holds a Kafka cluster of $(. "$c/cluster.env" && echo "$KAFKA_NODES") node(s), not $nodes: stop it and delete $c (scripts/dev reset) to change"
  else
    id=$(kafka_tool kafka.tools.StorageTool random-uuid 2>/dev/null | tail -n 1)
    [ -n "$id" ] || die "kafka-storage random-uuid failed"
  fi
  printf 'KAFKA_CLUSTER_ID=%s\nKAFKA_NODES=%s\nKAFKA_FIRST_PORT=%s\n' "$id" "$nodes" "$first" >"$c/cluster.env"
  for ((i = 1; i <= nodes; i++)); do
    voters+="${voters:+,}$i@127.0.0.1:$((first + 2 * (i - 1) + 1))"
  done
  # Three nodes: every record on all three, acknowledged by at least two (Kafka's advice for
  # production). One node: the internal topics must make do with it.
  if [ "$nodes" -ge 3 ]; then rf=3 isr=2; else rf=$nodes isr=1; fi
  for ((i = 1; i <= nodes; i++)); do
    port=$((first + 2 * (i - 1)))
    cport=$((port + 1))
    mkdir -p "$c/node-$i/logs"
    cat >"$c/node-$i/server.properties" <<PROPS
# Written by scripts/lib/stack.sh (kafka_cluster_init); changes are overwritten.
process.roles=broker,controller
node.id=$i
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$c/node-$i/data
default.replication.factor=$rf
min.insync.replicas=$isr
offsets.topic.replication.factor=$rf
transaction.state.log.replication.factor=$rf
transaction.state.log.min.isr=$isr
# Fewer partitions for the internal topics than the default 50: a small cluster starts faster.
offsets.topic.num.partitions=10
transaction.state.log.num.partitions=10
# A group's first member gets its partitions at once (the default waits 3 s for more members).
group.initial.rebalance.delay.ms=0
PROPS
    {
      log4j2_rolling "$c/node-$i/logs/server.log" 5 '[%d] %p %m (%c)%n'
      # Each request to a state-change or authorizer logger is noise at INFO on a dev machine.
      printf 'logger.state.name = state.change.logger\nlogger.state.level = WARN\n'
    } >"$c/node-$i/log4j2.properties"
    if [ ! -f "$c/node-$i/data/meta.properties" ]; then
      kafka_tool kafka.tools.StorageTool format -t "$id" -c "$c/node-$i/server.properties" \
        >"$c/node-$i/logs/format.log" 2>&1 \
        || { cat "$c/node-$i/logs/format.log" >&2; die "formatting Kafka node $i's storage failed"; }
    fi
  done
}

# kafka_nodes C: the cluster's node count.
kafka_nodes() { (. "$1/cluster.env" && echo "$KAFKA_NODES"); }

# kafka_port C N: node N's client port.
kafka_port() { (. "$1/cluster.env" && echo $((KAFKA_FIRST_PORT + 2 * ($2 - 1)))); }

# kafka_brokers C: the bootstrap list of every node.
kafka_brokers() {
  local c=$1 i out=""
  for ((i = 1; i <= $(kafka_nodes "$c"); i++)); do out+="${out:+,}127.0.0.1:$(kafka_port "$c" "$i")"; done
  echo "$out"
}

kafka_node_running() { pid_alive "$1/node-$2/kafka.pid"; }

# kafka_node_start C N: starts node N (when not running) without waiting for it.
kafka_node_start() {
  local c=$1 n=$2 dir=$1/node-$2
  kafka_node_running "$c" "$n" && return
  # Where this start's log lines begin, for kafka_node_wait (which removes the file once started).
  stat -c %s "$dir/logs/server.log" 2>/dev/null >"$dir/logs/.starting" || echo 0 >"$dir/logs/.starting"
  start_process "$dir/kafka.pid" "$dir/logs/kafka.out" "$dir" "$JAVA" \
    "-Xms$KAFKA_HEAP" "-Xmx$KAFKA_HEAP" -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
    -XX:InitiatingHeapOccupancyPercent=35 -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" -Dkafka.logs.dir="$dir/logs" \
    -cp "$KAFKA_LIBS/*" kafka.Kafka "$dir/server.properties"
}

# kafka_node_wait C N SECONDS: until node N logs that it started (it has then joined the quorum and
# registered as a broker), or fails when it exits or the time passes.
kafka_node_wait() {
  local c=$1 n=$2 secs=$3 dir=$1/node-$2 from i size
  # Started by an earlier call, and waited for then.
  if [ ! -f "$dir/logs/.starting" ] && kafka_node_running "$c" "$n"; then return 0; fi
  from=$(cat "$dir/logs/.starting" 2>/dev/null || echo 0)
  for ((i = 0; i < secs * 10; i++)); do
    kafka_node_running "$c" "$n" || { tail -n 30 "$dir/logs/server.log" "$dir/logs/kafka.out" >&2 2>/dev/null; die "Kafka node $n exited during start-up (log: $dir/logs/server.log)"; }
    # A log rolled over since the start begins anew.
    size=$(stat -c %s "$dir/logs/server.log" 2>/dev/null || echo 0)
    [ "$size" -ge "$from" ] || from=0
    # (Not `tail | grep -q`: under pipefail, tail's SIGPIPE would fail a match.)
    if grep -q 'Kafka Server started' < <(tail -c +"$((from + 1))" "$dir/logs/server.log" 2>/dev/null); then
      rm -f "$dir/logs/.starting"
      return 0
    fi
    sleep 0.1
  done
  tail -n 30 "$dir/logs/server.log" >&2 2>/dev/null
  die "Kafka node $n did not start within ${secs}s (log: $dir/logs/server.log)"
}

# kafka_cluster_start C: starts every node that is not running, then waits for each.
kafka_cluster_start() {
  local c=$1 i nodes
  nodes=$(kafka_nodes "$c")
  for ((i = 1; i <= nodes; i++)); do kafka_node_start "$c" "$i"; done
  for ((i = 1; i <= nodes; i++)); do kafka_node_wait "$c" "$i" 120; done
}

# kafka_node_stop C N: a clean shutdown (SIGTERM: leadership moves away first), SIGKILL after 60 s.
kafka_node_stop() { stop_process "$1/node-$2/kafka.pid" 60; }

# kafka_node_kill C N: SIGKILL, as a crash.
kafka_node_kill() {
  local pidfile=$1/node-$2/kafka.pid
  pid_alive "$pidfile" || return 0
  kill -KILL "$(pid_of "$pidfile")" 2>/dev/null || true
  local i
  for ((i = 0; i < 100; i++)); do pid_alive "$pidfile" || break; sleep 0.05; done
  rm -f "$pidfile" "$pidfile.exe"
}

# kafka_node_signal C N SIGNAL: e.g. STOP and CONT (a broker that hangs without closing connections).
kafka_node_signal() { kill -"$3" "$(pid_of "$1/node-$2/kafka.pid")"; }

# kafka_cluster_stop C [kill]: every node at once (SIGTERM; SIGKILL for those still running after
# 20 s, as a node whose controller quorum left first may wait for it forever). `kill`: SIGKILL at once,
# for stacks whose data is thrown away.
kafka_cluster_stop() {
  local c=$1 mode=${2:-} i n pids=() pid
  [ -f "$c/cluster.env" ] || return 0
  n=$(kafka_nodes "$c")
  if [ "$mode" = kill ]; then
    for ((i = 1; i <= n; i++)); do kafka_node_kill "$c" "$i"; done
    return 0
  fi
  for ((i = 1; i <= n; i++)); do
    kafka_node_running "$c" "$i" || continue
    pid=$(pid_of "$c/node-$i/kafka.pid")
    pids+=("$pid")
    kill -TERM "$pid" 2>/dev/null || true
  done
  for ((i = 0; i < 200; i++)); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break
    sleep 0.1
  done
  for ((i = 1; i <= n; i++)); do
    if kafka_node_running "$c" "$i"; then
      log "Kafka node $i did not stop within 20 s; sending SIGKILL"
      kafka_node_kill "$c" "$i"
    fi
    rm -f "$c/node-$i/kafka.pid" "$c/node-$i/kafka.pid.exe"
  done
}

# --- Kafka Connect with Debezium (beside our reader, to compare with it) ----------------------

# The worker's jars and one plugin.path folder per connector, each from its pom in scripts/connect;
# the folder is named after the poms' content, as $KAFKA_LIBS is.
CONNECT_POMS=$STACK_ROOT/scripts/connect
CONNECT_PLUGINS="debezium-postgres debezium-jdbc"
CONNECT_LIBS=$TOOLS_DIR/connect-$(cat "$CONNECT_POMS/pom.xml" "$CONNECT_POMS"/plugins/*/pom.xml | md5sum | cut -c1-8)
# Heap of the Connect worker (Debezium's queue of max.queue.size records lives in it).
CONNECT_HEAP=${CONNECT_HEAP:-512m}

ensure_connect() {
  local plugin
  ensure_java
  maven_fetch "$CONNECT_POMS/pom.xml" "$CONNECT_LIBS/runtime" "Kafka Connect $KAFKA_VERSION"
  for plugin in $CONNECT_PLUGINS; do
    maven_fetch "$CONNECT_POMS/plugins/$plugin/pom.xml" "$CONNECT_LIBS/plugins/$plugin" "Connect plugin $plugin"
  done
}

# connect_start D BROKERS PORT: a standalone Connect worker in folder D (worker.properties, the
# offsets file, logs/connect.log, connect.pid) for the Kafka at BROKERS, its REST API on
# 127.0.0.1:PORT, with no connector: they are added through the REST API. Does not wait.
connect_start() {
  local d=$1 brokers=$2 port=$3
  mkdir -p "$d/logs"
  echo "$port" >"$d/rest.port"
  cat >"$d/worker.properties" <<PROPS
# Written by scripts/lib/stack.sh (connect_start); changes are overwritten.
bootstrap.servers=$brokers
listeners=http://127.0.0.1:$port
plugin.path=$CONNECT_LIBS/plugins
# Plain JSON unless a connector says otherwise (each sets its own converters).
key.converter=org.apache.kafka.connect.json.JsonConverter
value.converter=org.apache.kafka.connect.json.JsonConverter
key.converter.schemas.enable=false
value.converter.schemas.enable=false
offset.storage.file.filename=$d/offsets
offset.flush.interval.ms=1000
# Connectors may set their own producer and consumer settings (producer.override.*).
connector.client.config.override.policy=All
PROPS
  log4j2_rolling "$d/logs/connect.log" 3 '[%d] %p %X{connector.context}%m (%c)%n' >"$d/log4j2.properties"
  start_process "$d/connect.pid" "$d/logs/connect.out" "$d" "$JAVA" \
    "-Xms$CONNECT_HEAP" "-Xmx$CONNECT_HEAP" -XX:+UseG1GC -Djava.awt.headless=true \
    -Dlog4j2.configurationFile="$d/log4j2.properties" \
    -cp "$CONNECT_LIBS/runtime/*" org.apache.kafka.connect.cli.ConnectStandalone "$d/worker.properties"
}

# connect_url D: the worker's REST API.
connect_url() { echo "http://127.0.0.1:$(cat "$1/rest.port")"; }

# connect_wait D SECONDS: until the worker's REST API answers, or it exits, or the time passes.
connect_wait() {
  wait_healthy "Kafka Connect" 127.0.0.1 "$(cat "$1/rest.port")" /connectors "$2" "$1/connect.pid" \
    || { tail -n 30 "$1/logs/connect.log" "$1/logs/connect.out" >&2 2>/dev/null; die "Kafka Connect did not start (log: $1/logs/connect.log)"; }
}

connect_stop() { stop_process "$1/connect.pid" 30; }

# --- the stacks of scripts/test, scripts/chaos and scripts/bench -------------------------------

# test_stack_start STACK fast|durable [cluster] [connect]: a private PostgreSQL (fast: fsync off)
# and a one-node Kafka in STACK, on free ports; with `cluster` also a three-node Kafka cluster, with
# `connect` also a Kafka Connect worker (Debezium's connectors on its plugin path) on the one-node
# Kafka. Exports the CDC_TEST_* variables the test binaries read. test_stack_stop undoes it.
test_stack_start() {
  local stack=$1 mode=$2 cluster="" connect="" word pg_port
  shift 2
  for word in "$@"; do
    case $word in
      cluster) cluster=1 ;;
      connect) connect=1 ;;
      *) die "test_stack_start: unknown part $word" ;;
    esac
  done
  [ "$mode" = durable ] && mode=
  ensure_postgres
  ensure_kafka
  [ -z "$connect" ] || ensure_connect
  # Nothing listens on these until the processes start: draw until the ranges do not overlap.
  local k1 k3=0
  pg_port=$(free_port)
  k1=$(free_ports 2)
  while [ "$pg_port" -ge "$k1" ] && [ "$pg_port" -le $((k1 + 1)) ]; do k1=$(free_ports 2); done
  if [ -n "$cluster" ]; then
    k3=$(free_ports 6)
    while { [ "$pg_port" -ge "$k3" ] && [ "$pg_port" -le $((k3 + 5)) ]; } \
      || { [ $((k1 + 1)) -ge "$k3" ] && [ "$k1" -le $((k3 + 5)) ]; }; do
      k3=$(free_ports 6)
    done
  fi
  pg_init "$stack/postgres" "$pg_port" $mode
  kafka_cluster_init "$stack/kafka" 1 "$k1"
  [ -z "$cluster" ] || kafka_cluster_init "$stack/kafka-cluster" 3 "$k3"
  # Every JVM starts at once; PostgreSQL meanwhile.
  kafka_node_start "$stack/kafka" 1
  if [ -n "$cluster" ]; then
    kafka_node_start "$stack/kafka-cluster" 1
    kafka_node_start "$stack/kafka-cluster" 2
    kafka_node_start "$stack/kafka-cluster" 3
  fi
  pg_start "$stack/postgres"
  kafka_cluster_start "$stack/kafka"
  # Connect creates nothing on Kafka before its first connector: started once the broker runs.
  [ -z "$connect" ] || connect_start "$stack/connect" "$(kafka_brokers "$stack/kafka")" "$(free_port)"
  [ -z "$cluster" ] || kafka_cluster_start "$stack/kafka-cluster"
  if [ -n "$connect" ]; then
    connect_wait "$stack/connect" 120
    export CDC_TEST_CONNECT_URL
    CDC_TEST_CONNECT_URL=$(connect_url "$stack/connect")
  fi
  export CDC_TEST_PG_URL="postgres://$PG_SUPERUSER:$(pg_superuser_password "$stack/postgres")@127.0.0.1:$pg_port/postgres"
  export CDC_TEST_KAFKA_BROKERS
  CDC_TEST_KAFKA_BROKERS=$(kafka_brokers "$stack/kafka")
  if [ -n "$cluster" ]; then
    export CDC_TEST_CLUSTER_KAFKA_BROKERS
    CDC_TEST_CLUSTER_KAFKA_BROKERS=$(kafka_brokers "$stack/kafka-cluster")
  fi
  export CDC_TEST_STACK=$stack
  export CDC_TEST_CONTROL=$STACK_ROOT/scripts/lib/test-control.sh
  log "PostgreSQL 127.0.0.1:$pg_port, Kafka $CDC_TEST_KAFKA_BROKERS${cluster:+, Kafka cluster $CDC_TEST_CLUSTER_KAFKA_BROKERS}${connect:+, Kafka Connect $CDC_TEST_CONNECT_URL} ($stack)"
}

test_stack_stop() {
  local stack=$1
  [ ! -f "$stack/connect/connect.pid" ] || connect_stop "$stack/connect"
  kafka_cluster_stop "$stack/kafka" kill || true
  kafka_cluster_stop "$stack/kafka-cluster" kill || true
  pg_stop "$stack/postgres" || true
}
