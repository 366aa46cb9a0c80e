#!/usr/bin/env bash
# Installs everything building and testing edge-agent needs on Debian/Ubuntu. Idempotent: skips what
# is present. Needs root (or sudo) for apt.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Debian packages: brokers and clients the tests run against, and the C toolchain pieces the
# bundled librdkafka / SQLite builds need.
APT_PACKAGES=(
  mosquitto mosquitto-clients   # the store's MQTT broker and an independent client
  socat                         # serial PTY pairs for driver tests
  sqlite3                       # inspecting logs by hand in docs and tests
  fuse3                         # fusermount3 for the power-cut test's FUSE filesystem (tests/src/powercut/)
  build-essential pkg-config cmake
  libssl-dev libcurl4-openssl-dev libsasl2-dev zlib1g-dev
  # packaging checks (scripts/build-deb.sh, scripts/test-install.sh): lintian, systemd-analyze
  # (the systemd package; nothing is started), man pages, the install test's HTTP probes
  lintian systemd man-db curl file util-linux openssl
  # the BlueZ beacon source (edge-drivers feature `bluez`) links libdbus; its test
  # (drivers/tests/ble_bluez.rs) runs python-dbusmock's bluez5 template on a private dbus-daemon
  libdbus-1-dev python3-dbusmock dbus-daemon
)
missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
# --- Apache Kafka for the Kafka tests and benchmarks (scripts/kafka.sh) -------------------------
# Java 17 runs the broker, Maven resolves its jars into a cache outside the clone, kcat is the
# independent client the tests check with, openssl makes the TLS certificates.
KAFKA_APT_PACKAGES=(default-jre-headless maven kcat openssl)
missing=()
for p in "${KAFKA_APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "install-deps: installing ${missing[*]} (Kafka tests)"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
java_major="$(java -XshowSettings:properties -version 2>&1 | sed -n 's/^ *java.specification.version = //p')"
if [ "${java_major%%.*}" -lt 17 ] 2>/dev/null; then
  echo "install-deps: Kafka 4 needs Java 17 or newer, found ${java_major:-none}" >&2
  exit 1
fi
bash scripts/kafka.sh fetch
# ------------------------------------------------------------------------------------------------
# --- btmon, BlueZ's HCI decoder, for the btsnoop capture tests (drivers/tests/ble_capture.rs) ----
# Unpacked from the Debian bluez package into the tools cache instead of installed: installing
# bluez pulls in udev and a systemd upgrade, and the tests need only btmon reading files (it runs
# on the libglib/libudev already present).
tools="${EDGE_AGENT_TOOLS:-/var/cache/edge-agent-ci/tools}"
if [ ! -x "$tools/bluez/usr/bin/btmon" ] && ! command -v btmon >/dev/null 2>&1; then
  echo "install-deps: unpacking btmon from the bluez package into $tools/bluez"
  $SUDO apt-get update -qq
  dl="$(mktemp -d)"
  (cd "$dl" && apt-get download -qq bluez 2>/dev/null)
  $SUDO mkdir -p "$tools/bluez"
  $SUDO dpkg-deb -x "$dl"/bluez_*.deb "$tools/bluez"
  rm -rf "$dl"
fi
# ------------------------------------------------------------------------------------------------

# The packaged Mosquitto service is not used: tests start their own brokers on free ports.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet mosquitto 2>/dev/null; then
  true
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "install-deps: installing the Rust toolchain with rustup"
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs | sh -s -- -y --profile minimal
  # shellcheck disable=SC1091
  . "$HOME/.cargo/env"
fi

# The pinned toolchain (rust-toolchain.toml) with rustfmt and clippy; rustup installs it on first
# use too, but not every rustup version does so implicitly.
if command -v rustup >/dev/null 2>&1; then
  channel="$(sed -n 's/^channel = "\(.*\)"$/\1/p' rust-toolchain.toml)"
  if ! rustup toolchain list | grep -q "^$channel-"; then
    echo "install-deps: installing Rust $channel (rust-toolchain.toml)"
    rustup toolchain install "$channel" --profile minimal --component rustfmt,clippy
  fi
fi

# cargo-deny: licence, ban and source checks in scripts/test.sh (deny.toml). Built from source
# once; the cold `cargo install` of 0.20.2 took 7 min (5.2 CPU-minutes) on the 2-core machine.
if ! cargo deny --version >/dev/null 2>&1; then
  echo "install-deps: installing cargo-deny (cargo install, several minutes the first time)"
  cargo install cargo-deny --locked
fi
