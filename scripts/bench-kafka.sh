#!/usr/bin/env bash
# Kafka drain benchmark: starts a local broker (scripts/kafka.sh), drains a 1M-record backlog of
# 300-byte records with the uplink in both modes and with a bare librdkafka producer in the same
# run, prints JSON lines (the last one has the ratios), stops the broker.
#
#   scripts/bench-kafka.sh [--records N] [--payload-bytes B] [--rounds R]
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
dir="$(mktemp -d /tmp/edge-bench-kafka.XXXXXX)"
cleanup() { bash scripts/kafka.sh stop "$dir/broker" --kill || true; rm -rf "$dir"; }
trap cleanup EXIT
cargo build --release -p edge-bench --bin kafka_drain
bash scripts/kafka.sh start "$dir/broker" > "$dir/broker.out"
bootstrap="$(sed -n 's/^BOOTSTRAP=//p' "$dir/broker.out")"
echo "broker at $bootstrap" >&2
"${CARGO_TARGET_DIR:-target}/release/kafka_drain" --bootstrap "$bootstrap" --dir "$dir" "$@"
