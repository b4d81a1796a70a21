#!/usr/bin/env bash
# Throughput benchmark: starts the environment, then compares idemsink with the database's bulk load
# (COPY, LOAD DATA) and a consume-only pass on the same records. BENCH_DB=postgres|mysql,
# BENCH_MODE=insert|upsert, BENCH_RECORDS (default 1,000,000), BENCH_RUNS (default 3).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/devenv.sh up
eval "$(scripts/devenv.sh env)"
export IDEMSINK_TEST_BROKERS IDEMSINK_TEST_DATABASE_URL IDEMSINK_TEST_MYSQL_URL
cargo bench --bench pipeline
