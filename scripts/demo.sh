#!/usr/bin/env bash
# The demo: installs what is missing, builds the agent, starts a local Mosquitto (unless one already
# listens on 127.0.0.1:1883) with the tuning the package ships, simulates a POS terminal that
# publishes sales over MQTT, and runs the agent in the foreground with config/demo.toml: no Kafka
# (everything buffers in the local log), a simulated lane and beacons. Ctrl-C stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"

bash scripts/install-deps.sh
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
echo "== building edge-agent (release; the first build takes several minutes)"
cargo build --release --locked -p edge-agent
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release/edge-agent"

mkdir -p demo-data
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

if (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null; then
  echo "== using the MQTT broker already listening on 127.0.0.1:1883"
else
  echo "== starting Mosquitto on 127.0.0.1:1883 (config: demo-data/mosquitto.conf)"
  mkdir -p demo-data/mosquitto
  {
    cat packaging/mosquitto/edge-agent-tuning.conf
    echo "user $(id -un)"
    echo "persistence_location $ROOT/demo-data/mosquitto/"
    echo "listener 1883 127.0.0.1"
    echo "allow_anonymous true"
  } > demo-data/mosquitto.conf
  mosquitto -c demo-data/mosquitto.conf > demo-data/mosquitto.log 2>&1 &
  pids+=($!)
  for _ in $(seq 1 50); do (exec 3<>/dev/tcp/127.0.0.1/1883) 2>/dev/null && break; sleep 0.1; done
fi

# A POS terminal on lane 2 publishing a sale every 3 s (QoS 1, with an event id).
(
  n=0
  while sleep 3; do
    n=$((n + 1))
    total=$(( (RANDOM % 5000) + 100 ))
    mosquitto_pub -q 1 -t store/demo-store/pos/lane-2/transactions -m \
      "{\"schema\":\"pos.transaction/1\",\"event_id\":\"lane-2-$$-$n\",\"ts\":$(date +%s%3N),\"lane\":\"lane-2\",\"receipt_no\":\"$n\",\"total_minor\":$total,\"currency\":\"USD\"}" \
      2>/dev/null || true
  done
) &
pids+=($!)

cat <<MSG
== edge-agent is starting with config/demo.toml (data in demo-data/). In another terminal:
     $BIN status --config config/demo.toml
     $BIN log tail --config config/demo.toml --stream pos.transactions --follow
     $BIN log tail --config config/demo.toml --stream presence.events --follow
     $BIN log tail --config config/demo.toml --stream offers.decisions --follow
     mosquitto_sub -t 'store/demo-store/offers/#' -v
     curl -s localhost:9464/metrics | grep edge_
   Ctrl-C stops the agent, the simulated terminal and the demo broker.
MSG
"$BIN" run --config config/demo.toml &
pids+=($!)
wait "${pids[-1]}"
