#!/usr/bin/env bash
# Kafka drain benchmark: starts a local broker (scripts/kafka.sh), drains a 1M-record backlog of
# 300-byte records with the real agent binary (uplink in both modes) and with a bare librdkafka
# producer in the same run, prints JSON lines (the last one has the ratios), stops the broker.
#
#   scripts/bench-kafka.sh [--records N] [--payload-bytes B] [--rounds R] [--modes a,b]
#                          [--kafka-toml 'producer_queue_bytes = "4 MiB"']
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
dir="$(mktemp -d /tmp/edge-bench-kafka.XXXXXX)"
cleanup() { bash scripts/kafka.sh stop "$dir/broker" --kill || true; rm -rf "$dir"; }
trap cleanup EXIT
cargo build --release -p edge-bench --bin kafka_drain -p edge-agent --bin edge-agent
bash scripts/kafka.sh start "$dir/broker" > "$dir/broker.out"
bootstrap="$(sed -n 's/^BOOTSTRAP=//p' "$dir/broker.out")"
echo "broker at $bootstrap" >&2
target="${CARGO_TARGET_DIR:-target}"
"$target/release/kafka_drain" --bootstrap "$bootstrap" --dir "$dir" \
  --agent "${EDGE_AGENT_BIN:-$target/release/edge-agent}" "$@"
