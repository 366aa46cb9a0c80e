#!/usr/bin/env bash
# Runs the spine's benchmarks (release builds) and prints one JSON line per result.
#   scripts/bench.sh [log|mqtt|backlog|flash|all]
# Results and the machine they were measured on go into docs/BENCHMARKS.md by hand, with the command.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
what="${1:-all}"
T="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release --locked -p edge-bench -p edge-agent >&2
mkdir -p bench-data
echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(uname -r), $(df -h bench-data | awk 'NR==2{print $1}')" >&2
if [ "$what" = log ] || [ "$what" = all ]; then
  for sync in full normal; do
    for w in 1 8; do
      "$T/release/log_append" --dir bench-data --records 1000000 --synchronous "$sync" --writers "$w" --inflight $((1000 / w))
    done
  done
fi
if [ "$what" = mqtt ] || [ "$what" = all ]; then
  (cd bench-data && "$T/release/mqtt_ingest" --messages 100000 --rounds 5)
fi
if [ "$what" = flash ] || [ "$what" = all ]; then
  # Bytes written per record at 50, 500 and 5,000 records/s: default pages, then 1 KiB pages.
  "$T/release/flash_wear" --agent "$T/release/edge-agent" --dir bench-data/flash
  "$T/release/flash_wear" --agent "$T/release/edge-agent" --dir bench-data/flash --extra '[log]\npage_size = 1024'
fi
if [ "$what" = backlog ] || [ "$what" = all ]; then
  "$T/release/backlog" --agent "$T/release/edge-agent" --dir bench-data/backlog --records 10000000
fi
