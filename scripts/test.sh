#!/usr/bin/env bash
# The test command: installs and starts what the tests need (scripts/devenv.sh up), checks
# formatting and lints, the Dockerfile and the Helm chart (scripts/check-deploy.sh), then runs
# every test against the real broker, PostgreSQL and MariaDB.
# With IDEMSINK_TEST_KAFKA=host:port (an Apache Kafka broker) it also runs the test that
# needs aborted transactions filtered, which the local broker cannot do.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/devenv.sh up
eval "$(scripts/devenv.sh env)"
export IDEMSINK_TEST_BROKERS IDEMSINK_TEST_DATABASE_URL IDEMSINK_TEST_MYSQL_URL
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
scripts/check-deploy.sh
ignored=()
if [[ -n "${IDEMSINK_TEST_KAFKA:-}" ]]; then ignored=(--run-ignored all); fi
cargo nextest run --locked "${ignored[@]}"
