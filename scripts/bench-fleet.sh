#!/usr/bin/env bash
# Fleet simulation (bench/src/bin/fleet_sim.rs): a growing fleet of stores, each the real uplink
# over its own SQLite log with its own transactional id, against one local broker
# (scripts/kafka.sh, with the Prometheus JMX exporter agent from Maven Central for the broker's
# request counters). Prints one JSON line per fleet size; see docs/SCALING.md.
#
#   scripts/bench-fleet.sh [--sizes 10,50,200] [--window-s 60] [--synthetic-stores 10000] ...
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi
T="${CARGO_TARGET_DIR:-$PWD/target}"
[ -n "${FLEET_SIM_BIN:-}" ] || cargo build --release --locked -p edge-bench --bin fleet_sim >&2
tools="${EDGE_KAFKA_HOME:-/var/cache/edge-agent-ci/kafka}/tools"
ver=1.0.1
jar="$tools/jmx_prometheus_javaagent-$ver.jar"
if [ ! -f "$jar" ]; then
  mkdir -p "$tools"
  url="https://repo1.maven.org/maven2/io/prometheus/jmx/jmx_prometheus_javaagent/$ver/jmx_prometheus_javaagent-$ver.jar"
  curl -fsSL -o "$jar.part" "$url"
  echo "$(curl -fsSL "$url.sha1" | cut -c1-40)  $jar.part" | sha1sum -c --quiet -
  mv "$jar.part" "$jar"
fi
dir="$(mktemp -d /tmp/edge-bench-fleet.XXXXXX)"
logs="$(mktemp -d /dev/shm/edge-fleet-logs.XXXXXX)"
trap 'rm -rf "$dir" "$logs"' EXIT
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
cat > "$dir/jmx.yaml" <<YAML
includeObjectNames: ["kafka.network:type=RequestMetrics,name=RequestsPerSec,*"]
YAML
echo "# machine: $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB RAM, $(uname -r)" >&2
# The stores' logs live on tmpfs: the simulation measures HQ's side, not this disk.
EDGE_KAFKA_JAVA_OPTS="-javaagent:$jar=127.0.0.1:$port:$dir/jmx.yaml" TMPDIR="$logs" \
  "${FLEET_SIM_BIN:-$T/release/fleet_sim}" --metrics-url "http://127.0.0.1:$port/metrics" "$@"
