# shellcheck shell=bash
# Shared by scripts/dev and scripts/test: find or install PostgreSQL and the pinned broker, run a
# private PostgreSQL cluster and a tansu broker, start and stop processes by pid.
#
# Nothing here looks processes up by name: every process we start has a pid file, and stopping checks
# that the pid still runs the program we started before signalling it.

TANSU_VERSION=0.6.0
TOOLS_DIR=${CDC_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/cdc-pipeline}
TANSU_BIN=$TOOLS_DIR/tansu-$TANSU_VERSION/bin/tansu

# The private cluster's superuser (its password is random per cluster: pg_superuser_password).
PG_SUPERUSER=postgres
# The service roles and databases come from the compose stack's init script, so both stacks grant
# the same least-privilege roles; here each password is the role's name (dev only: the cluster
# listens on 127.0.0.1 only).
PG_INIT_SCRIPT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)/compose/postgres/10-cdc-pipeline.sh

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

# A C toolchain: the broker and librdkafka (bundled by rdkafka) are built from source.
ensure_build_tools() {
  command -v cc >/dev/null && command -v make >/dev/null && return
  apt_install build-essential
}

# curl, for the walkthrough, `scripts/dev check` and the end-to-end tests that run them.
ensure_curl() {
  command -v curl >/dev/null && return
  apt_install curl ca-certificates
}

# Debian's docker-compose (1.29): validates compose files without a Docker engine.
ensure_docker_compose() {
  command -v docker-compose >/dev/null && return
  apt_install docker-compose
}

# Builds the pinned broker once into $TOOLS_DIR (outside the clone, reused by every clone).
ensure_tansu() {
  [ -x "$TANSU_BIN" ] && return
  command -v cargo >/dev/null || die "cargo is needed to build the broker (tansu $TANSU_VERSION)"
  ensure_build_tools
  mkdir -p "$TOOLS_DIR"
  (
    # One build at a time, even when dev and test start together.
    exec 9>"$TOOLS_DIR/.tansu.lock"
    flock 9
    [ -x "$TANSU_BIN" ] && exit 0
    log "building the test broker tansu $TANSU_VERSION (once; 5-16 min on 2 cores); log: $TOOLS_DIR/tansu-build.log"
    cargo install --locked "tansu@$TANSU_VERSION" --features dynostore,libsql \
      --root "$TOOLS_DIR/tansu-$TANSU_VERSION" >"$TOOLS_DIR/tansu-build.log" 2>&1 \
      || { tail -n 30 "$TOOLS_DIR/tansu-build.log" >&2; die "building tansu failed"; }
  ) || exit 1
  [ -x "$TANSU_BIN" ] || die "tansu build finished but $TANSU_BIN is missing"
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

# --- broker ------------------------------------------------------------------------------------

# broker_start DIR PORT STORAGE: tansu on 127.0.0.1:PORT with STORAGE (memory or sqlite; sqlite
# keeps its file in DIR, as tansu resolves the path against its working directory).
broker_start() {
  local dir=$1 port=$2 storage=$3 engine
  mkdir -p "$dir"
  pid_alive "$dir/broker.pid" && return
  case $storage in
    memory) engine=memory://tansu/ ;;
    sqlite) engine=sqlite://tansu.db ;;
    *) die "unknown broker storage $storage" ;;
  esac
  start_process "$dir/broker.pid" "$dir/broker.log" "$dir" "$TANSU_BIN" broker \
    --listener-url "tcp://127.0.0.1:$port" --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine "$engine"
  wait_tcp 127.0.0.1 "$port" 60 || { tail -n 20 "$dir/broker.log" >&2; die "broker did not listen on $port"; }
  pid_alive "$dir/broker.pid" || { tail -n 20 "$dir/broker.log" >&2; die "broker exited"; }
}

broker_stop() { stop_process "$1/broker.pid" 15; }
