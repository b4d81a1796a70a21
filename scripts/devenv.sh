#!/usr/bin/env bash
# Local environment for idemsink: PostgreSQL 15, MariaDB 10.11 and Apache Kafka 4 (one KRaft
# node, broker and controller in one JVM), all on 127.0.0.1 with their data under .devenv/ in
# the repository.
#
#   scripts/devenv.sh install   install what is missing (apt packages; Kafka's jars from Maven Central)
#   scripts/devenv.sh up        install if needed, then start PostgreSQL, MariaDB and Kafka (idempotent)
#   scripts/devenv.sh down      stop what `up` started (by PID)
#   scripts/devenv.sh env       print the environment variables the tests and demo use
#   scripts/devenv.sh start|stop postgres|mariadb|broker   one server alone (tests that restart one)
#   scripts/devenv.sh kill broker                          SIGKILL the broker (tests of a crash)
#   scripts/devenv.sh connect-lib   fetch (once) Kafka Connect and Debezium's PostgreSQL source
#                                   connector, and print the folder of their jars (the tests run
#                                   a standalone worker from it: tests/debezium.rs)
#   scripts/devenv.sh jdbc-sink-lib the same for Debezium's JDBC sink connector (the benchmark's
#                                   comparison, benches/debezium.rs)
#
# Ports can be moved with IDEMSINK_PG_PORT (default 55432), IDEMSINK_MYSQL_PORT (default 53306),
# IDEMSINK_KAFKA_PORT (default 9092) and IDEMSINK_KAFKA_CONTROLLER_PORT (default: Kafka's + 1).
# IDEMSINK_KAFKA_BROKERS=host:port uses an existing Kafka instead: nothing is started for it.
# IDEMSINK_MYSQL_OPTIONS adds mariadbd options (e.g. --max-allowed-packet=1M, as a server
# in production may have).
# Kafka's jars are resolved by Maven from scripts/kafka/pom.xml (the version is pinned there)
# into .devenv/ once; the broker's storage (.devenv/kafka-data) is kept across restarts. The same
# for Kafka Connect and Debezium, from scripts/connect/pom.xml. PostgreSQL runs with
# wal_level=logical, so Debezium can capture a database of it.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE="${IDEMSINK_DEVENV_DIR:-$ROOT/.devenv}"
PG_PORT="${IDEMSINK_PG_PORT:-55432}"
KAFKA_PORT="${IDEMSINK_KAFKA_PORT:-9092}"
KAFKA_CONTROLLER_PORT="${IDEMSINK_KAFKA_CONTROLLER_PORT:-$((KAFKA_PORT + 1))}"
EXTERNAL_KAFKA="${IDEMSINK_KAFKA_BROKERS:-}"
MYSQL_PORT="${IDEMSINK_MYSQL_PORT:-53306}"
PG_BIN=/usr/lib/postgresql/15/bin
APT_PACKAGES=(postgresql postgresql-client mariadb-server mariadb-client build-essential pkg-config libssl-dev zlib1g-dev libzstd-dev)
# Kafka runs on Java 17; its jars come through Maven.
command -v java >/dev/null || APT_PACKAGES+=(openjdk-17-jre-headless)
command -v mvn >/dev/null || APT_PACKAGES+=(maven)
KAFKA_POM="$ROOT/scripts/kafka/pom.xml"
KAFKA_VERSION=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$KAFKA_POM")
# One copy of the jars for every broker of this checkout (tests start brokers of their own,
# each with its own IDEMSINK_DEVENV_DIR).
KAFKA_LIB="$ROOT/.devenv/kafka-$KAFKA_VERSION"
CONNECT_POM="$ROOT/scripts/connect/pom.xml"
pom_versions() { sed -n 's:.*<\(kafka\|debezium\).version>\(.*\)</.*:\2:p' "$1" | paste -sd-; }
CONNECT_LIB="$ROOT/.devenv/connect-$(pom_versions "$CONNECT_POM")"
JDBC_SINK_POM="$ROOT/scripts/connect/jdbc-sink/pom.xml"
JDBC_SINK_LIB="$ROOT/.devenv/jdbc-sink-$(pom_versions "$JDBC_SINK_POM")"
KAFKA_DATA="$STATE/kafka-data"
KAFKA_PID="$STATE/kafka.pid"

log() { printf 'devenv: %s\n' "$*" >&2; }

install_deps() {
  local missing=()
  for p in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if ((${#missing[@]})); then
    log "installing apt packages: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
  # The Debian packages may start their own servers (5432, 3306); we never use them, and leave them alone.
  [[ -n "$EXTERNAL_KAFKA" ]] || kafka_jars
  connect_jars
}

# The jars a pom depends on, resolved once into a folder: a second run downloads nothing. Maven's
# own repository is kept under .devenv/ too. Brokers starting at once (tests) take turns.
maven_jars() { # pom folder what
  [[ -f "$2/.complete" ]] && return
  mkdir -p "$ROOT/.devenv"
  (
    flock 9
    [[ -f "$2/.complete" ]] && exit 0
    log "fetching $3's jars from Maven Central into $2"
    rm -rf "$2.tmp"
    mvn -B -q -Dstyle.color=never -f "$1" -Dmaven.repo.local="$ROOT/.devenv/m2" \
      org.apache.maven.plugins:maven-dependency-plugin:3.8.1:copy-dependencies \
      -DincludeScope=runtime -DoutputDirectory="$2.tmp" >&2
    touch "$2.tmp/.complete"
    rm -rf "$2" && mv "$2.tmp" "$2"
  ) 9>"$ROOT/.devenv/maven-jars.lock"
}

kafka_jars() { maven_jars "$KAFKA_POM" "$KAFKA_LIB" "Apache Kafka $KAFKA_VERSION"; }
connect_jars() { maven_jars "$CONNECT_POM" "$CONNECT_LIB" "Kafka Connect and Debezium"; }
jdbc_sink_jars() { maven_jars "$JDBC_SINK_POM" "$JDBC_SINK_LIB" "Debezium's JDBC sink"; }

wait_port() { # host port what
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null && return 0
    sleep 0.2
  done
  log "$3 did not open $1:$2"; return 1
}

alive() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

# The servers refuse to run as root, so each one's data must be reachable by its own user
# (postgres, mysql): .devenv/<name> when the checkout's parents allow it, otherwise a folder
# under /tmp.
data_dir() { # user name
  mkdir -p "$STATE"
  chmod 755 "$STATE"
  if runuser -u "$1" -- test -x "$STATE"; then
    echo "$STATE/$2"
  else
    echo "${TMPDIR:-/tmp}/idemsink-$2-$(printf '%s' "$STATE" | md5sum | cut -c1-12)"
  fi
}

pg_data_dir() { data_dir postgres pg; }

pg_up() {
  local data
  data=$(pg_data_dir)
  if [[ ! -f "$data/PG_VERSION" ]]; then
    install -d -o postgres -g postgres "$data"
    runuser -u postgres -- "$PG_BIN/initdb" -D "$data" -U postgres --auth=trust -E UTF8 --locale=C.UTF-8 >/dev/null
  fi
  if runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    log "PostgreSQL already running on 127.0.0.1:$PG_PORT"
  else
    touch "$data.log" && chown postgres "$data.log"
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" -l "$data.log" -w -t 60 start \
      -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $data -c max_connections=300 -c fsync=on -c wal_level=logical" >/dev/null
    log "PostgreSQL started on 127.0.0.1:$PG_PORT"
  fi
  wait_port 127.0.0.1 "$PG_PORT" PostgreSQL
  "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -Atqc "select 1 from pg_database where datname='idemsink'" | grep -q 1 ||
    "$PG_BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U postgres -qc "create database idemsink"
}

mysql_data_dir() { data_dir mysql mariadb; }

mysql_up() {
  local data
  data=$(mysql_data_dir)
  if [[ ! -d "$data/mysql" ]]; then
    install -d -o mysql -g mysql "$data"
    # Two installs at once (tests with servers of their own) trip over each other: one at a time.
    (
      flock 9
      mariadb-install-db --user=mysql --datadir="$data" --auth-root-authentication-method=socket \
        --skip-test-db >"$data.install.log" 2>&1
    ) 9>"${TMPDIR:-/tmp}/idemsink-mariadb-install.lock" || { cat "$data.install.log" >&2; exit 1; }
  fi
  if alive "$data/mariadb.pid"; then
    log "MariaDB already running on 127.0.0.1:$MYSQL_PORT"
  else
    nohup mariadbd --user=mysql --datadir="$data" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
      --socket="$data/mariadb.sock" --pid-file="$data/mariadb.pid" --max-connections=500 \
      --innodb-buffer-pool-size=512M --log-error="$data.log" ${IDEMSINK_MYSQL_OPTIONS:-} \
      >/dev/null 2>&1 &
    wait_port 127.0.0.1 "$MYSQL_PORT" MariaDB
    log "MariaDB started on 127.0.0.1:$MYSQL_PORT"
  fi
  for _ in $(seq 1 100); do [[ -S "$data/mariadb.sock" ]] && break; sleep 0.1; done
  mariadb --socket="$data/mariadb.sock" -u root <<'SQL'
CREATE DATABASE IF NOT EXISTS idemsink CHARACTER SET utf8mb4;
CREATE USER IF NOT EXISTS 'idemsink'@'127.0.0.1' IDENTIFIED BY 'idemsink';
GRANT ALL ON idemsink.* TO 'idemsink'@'127.0.0.1';
SQL
}

kafka_java() { # main class and arguments
  java -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" -cp "$KAFKA_LIB/*" "$@"
}

# One node that is broker and controller. Timeouts are short so that tests of rebalances and
# of open transactions take seconds: group sessions from 1 s (classic protocol; clients ask for
# theirs) and of 2 s under the consumer protocol (KIP-848), where the broker sets the session;
# a producer's timed-out transaction is aborted within a second of its timeout.
kafka_properties() {
  cat <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
inter.broker.listener.name=PLAINTEXT
log.dirs=$KAFKA_DATA
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
group.consumer.min.session.timeout.ms=1000
group.consumer.session.timeout.ms=2000
group.consumer.min.heartbeat.interval.ms=100
group.consumer.heartbeat.interval.ms=250
transaction.abort.timed.out.transaction.cleanup.interval.ms=1000
PROPS
}

# Ready when a metadata request (Metadata v4, all topics, over a plain socket) is answered with
# at least one broker.
kafka_answers() { # host port
  local reply bytes
  reply=$(timeout 5 bash -c '
    exec 3<>"/dev/tcp/$0/$1" || exit 1
    printf "\x00\x00\x00\x15\x00\x03\x00\x04\x00\x00\x00\x01\x00\x06devenv\xff\xff\xff\xff\x00" >&3
    head -c 16 <&3 | od -An -tu1' "$1" "$2" 2>/dev/null) || return 1
  # size(4) correlation id(4) throttle time(4) broker count(4)
  read -r -a bytes <<<"$reply"
  ((${#bytes[@]} == 16 && bytes[7] == 1 && (bytes[12] | bytes[13] | bytes[14] | bytes[15]) > 0))
}

kafka_up() {
  if alive "$KAFKA_PID"; then
    log "Kafka already running on 127.0.0.1:$KAFKA_PORT"
    return
  fi
  kafka_jars
  mkdir -p "$STATE"
  kafka_properties >"$STATE/kafka.properties"
  if [[ ! -f "$KAFKA_DATA/meta.properties" ]]; then
    kafka_java kafka.tools.StorageTool format -c "$STATE/kafka.properties" \
      -t "$(kafka_java kafka.tools.StorageTool random-uuid)" >"$STATE/kafka-format.log" 2>&1 ||
      { cat "$STATE/kafka-format.log" >&2; exit 1; }
  fi
  local started=$SECONDS
  nohup java -Xms256m "-Xmx${IDEMSINK_KAFKA_HEAP:-512m}" -XX:+UseG1GC \
    -Dlog4j2.configurationFile="$ROOT/scripts/kafka/log4j2.properties" -cp "$KAFKA_LIB/*" \
    kafka.Kafka "$STATE/kafka.properties" >>"$STATE/kafka.log" 2>&1 &
  echo $! >"$KAFKA_PID"
  for _ in $(seq 1 1200); do
    kafka_answers 127.0.0.1 "$KAFKA_PORT" && break
    alive "$KAFKA_PID" || { tail -20 "$STATE/kafka.log" >&2; log "Kafka exited while starting"; exit 1; }
    sleep 0.1
  done
  kafka_answers 127.0.0.1 "$KAFKA_PORT" || { log "Kafka did not answer on 127.0.0.1:$KAFKA_PORT"; exit 1; }
  log "Kafka $KAFKA_VERSION started on 127.0.0.1:$KAFKA_PORT in $((SECONDS - started)) s (log: $STATE/kafka.log)"
}

pg_down() {
  local data
  data=$(pg_data_dir)
  if [[ -f "$data/PG_VERSION" ]] && runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" status >/dev/null 2>&1; then
    runuser -u postgres -- "$PG_BIN/pg_ctl" -D "$data" -m fast -w stop >/dev/null && log "PostgreSQL stopped"
  fi
}

mysql_down() {
  local data pid
  data=$(mysql_data_dir)
  if alive "$data/mariadb.pid"; then
    pid=$(cat "$data/mariadb.pid")
    kill "$pid" && while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done && log "MariaDB stopped"
  fi
}

kafka_down() { # signal
  local pid
  if alive "$KAFKA_PID"; then
    pid=$(cat "$KAFKA_PID")
    kill "-$1" "$pid" && while kill -0 "$pid" 2>/dev/null; do sleep 0.1; done && log "Kafka stopped ($1)"
  fi
  rm -f "$KAFKA_PID"
}

down() { pg_down; mysql_down; [[ -n "$EXTERNAL_KAFKA" ]] || kafka_down TERM; }

print_env() {
  local kafka="${EXTERNAL_KAFKA:-127.0.0.1:$KAFKA_PORT}"
  cat <<ENV
export DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/idemsink
export KAFKA_BROKERS=$kafka
export IDEMSINK_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/idemsink
export IDEMSINK_TEST_BROKERS=$kafka
export MYSQL_DATABASE_URL=mysql://idemsink:idemsink@127.0.0.1:$MYSQL_PORT/idemsink
export IDEMSINK_TEST_MYSQL_URL=mysql://idemsink:idemsink@127.0.0.1:$MYSQL_PORT/idemsink
ENV
}

case "${1:-} ${2:-}" in
  "install "*) install_deps ;;
  "up "*)
    install_deps
    pg_up
    mysql_up
    if [[ -n "$EXTERNAL_KAFKA" ]]; then log "using the Kafka at $EXTERNAL_KAFKA"; else kafka_up; fi
    ;;
  "down "*) down ;;
  "env "*) print_env ;;
  "connect-lib "*) connect_jars && echo "$CONNECT_LIB" ;;
  "jdbc-sink-lib "*) jdbc_sink_jars && echo "$JDBC_SINK_LIB" ;;
  # One server on its own, for tests that stop and start a database or broker of their
  # own (with their own IDEMSINK_DEVENV_DIR and port).
  "start postgres") pg_up ;;
  "stop postgres") pg_down ;;
  "start mariadb") mysql_up ;;
  "stop mariadb") mysql_down ;;
  "start broker") kafka_up ;;
  "stop broker") kafka_down TERM ;;
  "kill broker") kafka_down KILL ;;
  *) echo "usage: $0 install|up|down|env|connect-lib|jdbc-sink-lib, start|stop postgres|mariadb|broker, or kill broker" >&2; exit 2 ;;
esac
