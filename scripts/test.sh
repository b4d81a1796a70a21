#!/usr/bin/env bash
# The test command: installs and starts what the tests need (scripts/devenv.sh up: PostgreSQL,
# MariaDB, Apache Kafka), checks formatting and lints, the Dockerfile and the Helm chart
# (scripts/check-deploy.sh), then runs every test against the real broker and both databases.
# IDEMSINK_KAFKA_BROKERS=host:port runs them against a Kafka of your own instead; it must let
# group sessions be 1 s to 2 s and abort timed-out transactions promptly, as the development
# broker does (see scripts/devenv.sh), or the tests of rebalances and transactions time out.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/devenv.sh up
eval "$(scripts/devenv.sh env)"
export IDEMSINK_TEST_BROKERS IDEMSINK_TEST_DATABASE_URL IDEMSINK_TEST_MYSQL_URL
command -v cargo-nextest >/dev/null || cargo install cargo-nextest --locked
cargo fmt --check
cargo clippy --all-targets --locked -- -D warnings
scripts/check-deploy.sh
cargo nextest run --locked
