#!/usr/bin/env bash
# The demo, end to end on a fresh machine: installs and starts PostgreSQL and the broker,
# builds idemsink, produces order events (some sent twice by a "retrying producer") to a new
# topic, runs the pipeline in connectors/ until it has caught up, stops it with SIGTERM and
# shows what landed.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
COUNT="${DEMO_COUNT:-5000}"

scripts/devenv.sh up
eval "$(scripts/devenv.sh env)"
export KAFKA_BROKERS DATABASE_URL
export ORDERS_TOPIC="orders_$(date +%s)"

echo "==> building idemsink (release)"
cargo build --release --quiet --bin idemsink --example demo
BIN=target/release/idemsink
sql() { psql "$DATABASE_URL" -v ON_ERROR_STOP=1 -q "$@"; }

echo "==> fresh table orders, idemsink's offsets table, and a check of the pipeline files"
sql -c "DROP TABLE IF EXISTS orders" -f connectors/orders.sql
"$BIN" migrate --config connectors
sql -c "DELETE FROM idemsink_offsets WHERE pipeline = 'orders_pg'"
"$BIN" validate --config connectors

echo "==> running the pipeline (log: .devenv/demo-run.log) and producing $COUNT order events to $ORDERS_TOPIC"
METRICS_ADDR="127.0.0.1:${IDEMSINK_HTTP_PORT:-9464}"
"$BIN" run --config connectors --http-addr "$METRICS_ADDR" >.devenv/demo-run.log 2>&1 &
pid=$!
trap 'kill "$pid" 2>/dev/null || true' EXIT
target/release/examples/demo --brokers "$KAFKA_BROKERS" --topic "$ORDERS_TOPIC" --count "$COUNT" \
  --pipeline orders_pg --database-url "$DATABASE_URL"
echo "==> readiness and a few metrics from http://$METRICS_ADDR"
curl -sS "http://$METRICS_ADDR/readyz"
curl -sS "http://$METRICS_ADDR/metrics" | grep -E '^idemsink_(records_consumed|rows_written|rows_unchanged|batches_committed)_total' | head -8
kill -TERM "$pid"
status=0
wait "$pid" || status=$?
trap - EXIT
echo "==> idemsink exited with status $status after SIGTERM"

echo "==> what landed"
sql -c "SELECT count(*) AS rows, count(DISTINCT (kafka_partition, kafka_offset)) AS kafka_records,
               count(DISTINCT order_id) AS distinct_orders FROM orders"
sql -c "SELECT order_id, customer, amount, status, created_at, kafka_partition, kafka_offset
          FROM orders ORDER BY order_id, kafka_offset LIMIT 5"
sql -c "SELECT pipeline, topic, partition, next_offset, updated_at FROM idemsink_offsets
         WHERE pipeline = 'orders_pg' ORDER BY partition"
echo "Every Kafka record is one row, exactly once. Orders sent twice by the producer are two"
echo "records at two offsets, hence two rows in this mode; sink.mode: upsert with key: [order_id]"
echo "keeps one row per order (README, \"Business keys\")."
exit "$status"
