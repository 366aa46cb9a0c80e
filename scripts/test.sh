#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, contract and end-to-end tests against real
# Mosquitto (and the other real peers the tests start themselves). This is the README's test command
# and what .ci/run calls.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== Kafka broker jars (scripts/kafka.sh fetch; cached outside the clone)"
bash scripts/kafka.sh fetch
echo "== cargo test"
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"
