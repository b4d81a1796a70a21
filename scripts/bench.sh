#!/usr/bin/env bash
# Throughput benchmark: starts the environment, then compares idemsink with the database's bulk load
# (COPY, LOAD DATA; for updates into a temporary table merged with one INSERT … SELECT) and a
# consume-only pass on the same records, and prints one table. Scenarios: insert, upsert with every
# key new, upsert with 80% of keys present, on PostgreSQL and MariaDB (BENCH_SCENARIOS to choose);
# BENCH_SWEEP=1 instead sweeps 1/4/16/64 partitions and 200 B/2 kB/20 kB records on both databases.
# BENCH_RECORDS (default 300,000), BENCH_RUNS (default 3); then the start-up time (process start to
# the first committed batch, group join apart; BENCH_STARTUP=0 leaves it out); see benches/pipeline.rs.
# `scripts/bench.sh debezium` instead runs benches/debezium.rs: Debezium's snapshot of a
# 1,000,000-row table through idemsink into both databases, against their bulk load and
# Debezium's JDBC sink.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/devenv.sh up
eval "$(scripts/devenv.sh env)"
export IDEMSINK_TEST_BROKERS IDEMSINK_TEST_DATABASE_URL IDEMSINK_TEST_MYSQL_URL
cargo bench --bench "${1:-pipeline}"
