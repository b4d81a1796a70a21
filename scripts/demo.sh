#!/usr/bin/env bash
# The demo, end to end on a fresh machine: installs and starts PostgreSQL and Apache Kafka,
# builds idemsink, and runs the pipeline in connectors/ (upsert on order_id, newer by version)
# while a transactional producer sends order events to a new topic: one transaction in five is
# aborted, and some events are sent twice, as a retrying producer does. Once the pipeline has
# caught up it shows one row per order at its newest committed version, nothing of an aborted
# transaction, and then replays the whole topic to show that a replay changes nothing.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
ORDERS="${DEMO_ORDERS:-2000}"

scripts/devenv.sh up
eval "$(scripts/devenv.sh env)"
export KAFKA_BROKERS DATABASE_URL
export ORDERS_TOPIC="orders_$(date +%s)"

echo "==> building idemsink (release)"
cargo build --release --quiet --bin idemsink --example demo
BIN=target/release/idemsink
sql() { psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -q "$@"; }
METRICS_ADDR="127.0.0.1:${IDEMSINK_HTTP_PORT:-9464}"
mkdir -p .devenv

echo "==> fresh table orders, idemsink's tables, and a check of the pipeline files"
sql -c "DROP TABLE IF EXISTS orders" -f connectors/orders.sql
"$BIN" migrate --config connectors
sql -c "DELETE FROM idemsink_offsets WHERE pipeline = 'orders_pg'"
"$BIN" validate --config connectors

pid=
trap '[[ -n "$pid" ]] && kill "$pid" 2>/dev/null || true' EXIT
start() { # log file
  "$BIN" run --config connectors --http-addr "$METRICS_ADDR" >"$1" 2>&1 &
  pid=$!
}
stop() {
  kill -TERM "$pid"
  local status=0
  wait "$pid" || status=$?
  pid=
  echo "==> idemsink exited with status $status after SIGTERM"
  return "$status"
}
offsets() { sql -Atc "SELECT string_agg(partition || ':' || next_offset, ' ' ORDER BY partition) FROM idemsink_offsets WHERE pipeline = 'orders_pg'"; }
checksum() { sql -Atc "SELECT count(*) || ' rows, md5 ' || md5(string_agg(o::text, '|' ORDER BY order_id)) FROM orders o"; }

echo "==> running the pipeline (log: .devenv/demo-run.log) while $ORDERS orders stream to $ORDERS_TOPIC"
start .devenv/demo-run.log
target/release/examples/demo --brokers "$KAFKA_BROKERS" --topic "$ORDERS_TOPIC" --orders "$ORDERS" \
  --pipeline orders_pg --database-url "$DATABASE_URL"
echo "==> readiness and a few metrics from http://$METRICS_ADDR"
curl -sS "http://$METRICS_ADDR/readyz"
curl -sS "http://$METRICS_ADDR/metrics" |
  grep -E '^idemsink_(records_consumed|rows_written|rows_updated|rows_unchanged|batches_committed)_total' | head -12
stop

echo "==> what landed: one row per order, at its newest version"
sql -c "SELECT status, count(*) AS orders, min(version) AS min_version, max(version) AS max_version
          FROM orders GROUP BY status ORDER BY max(version)"
sql -c "SELECT order_id, version, customer, amount, status, kafka_partition, kafka_offset
          FROM orders ORDER BY order_id LIMIT 5"
"$BIN" offsets list --config connectors

echo "==> replay: every offset back to the start, the pipeline run again over the whole topic"
before=$(checksum)
caught_up=$(offsets)
"$BIN" offsets reset --config connectors --to earliest
start .devenv/demo-replay.log
for _ in $(seq 1 600); do
  [[ "$(offsets)" == "$caught_up" ]] && break
  sleep 0.2
done
[[ "$(offsets)" == "$caught_up" ]] || { echo "the replay did not catch up; log: .devenv/demo-replay.log" >&2; exit 1; }
stop
after=$(checksum)
echo "table before the replay: $before"
echo "table after the replay:  $after"
[[ "$before" == "$after" ]] || { echo "the replay changed the table" >&2; exit 1; }
echo "Exactly once: aborted transactions never landed, resent events and older versions changed"
echo "nothing, and replaying the whole topic left the table as it was."
