#!/usr/bin/env bash
# arm64 (Raspberry Pi 4/5) build without Docker, as CI runs it:
#   * Debian's rustc-web/cargo-web toolchain with the arm64 standard library (libstd-rust-web-dev:arm64),
#     the aarch64 gcc cross linker and the arm64 -dev libraries from apt (multiarch);
#   * the release binary and the arm64 .deb;
#   * the arm64 binary under qemu-aarch64-static: --version, check-config on the packaged config,
#     and a daemon smoke run until /readyz; then the edge-sync tests (the log contract suite
#     included) built for aarch64 and run under qemu.
# cross-rs users (Docker) use cross.toml instead: see docs/OPERATIONS.md, "Building for the Pi".
#
# Build products are cached in $ARM64_TARGET_DIR (default /var/cache/edge-agent-ci/target-arm64).
# Prints the path of the arm64 .deb last.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -f "$HOME/.cargo/env" ]; then . "$HOME/.cargo/env"; fi

triple=aarch64-unknown-linux-gnu
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# --- toolchain (idempotent) --------------------------------------------------------------------
packages=(rustc-web cargo-web libstd-rust-web-dev:arm64 gcc-aarch64-linux-gnu g++-aarch64-linux-gnu
          libc6-dev-arm64-cross binutils-aarch64-linux-gnu qemu-user-static pkgconf cmake
          libc6:arm64 libssl-dev:arm64 zlib1g-dev:arm64 libcurl4-openssl-dev:arm64)
if ! dpkg --print-foreign-architectures | grep -qx arm64; then
  $SUDO dpkg --add-architecture arm64
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "build-arm64: installing ${missing[*]}"
  $SUDO apt-get update -qq
  # Installing arm64 libssl-dev moves the amd64 libssl-dev to the same version (multiarch lockstep).
  # The kafka uplink's librdkafka (cmake-build) needs curl's arm64 headers to compile (measured on
  # the kafka branch: it then links arm64 libssl, libcrypto and libz, and no libcurl).
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- environment -------------------------------------------------------------------------------
# Debian's cargo/rustc (with the arm64 std) before rustup's, which has no arm64 std installed.
export PATH="/usr/bin:$PATH"
export CARGO_TARGET_DIR="${ARM64_TARGET_DIR:-/var/cache/edge-agent-ci/target-arm64}"
mkdir -p "$CARGO_TARGET_DIR"
# The multiarch arm64 C library (libc6:arm64) is the sysroot: with "-L /usr/aarch64-linux-gnu"
# (the cross-linker's copy) threads hang at start under qemu 7.2.
qemu="qemu-aarch64-static"
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUNNER="$qemu"
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
# pkg-config must answer with the arm64 libraries, or cmake (librdkafka) and openssl-sys silently
# link the x86_64 ones. Debian 12 ships no aarch64 pkg-config wrapper: this is the same wrapper.
wrap="$CARGO_TARGET_DIR/aarch64-linux-gnu-pkg-config"
cat >"$wrap" <<'WRAP'
#!/bin/sh
PKG_CONFIG_LIBDIR=/usr/lib/aarch64-linux-gnu/pkgconfig:/usr/share/pkgconfig exec pkg-config "$@"
WRAP
chmod +x "$wrap"
export PKG_CONFIG="$wrap" PKG_CONFIG_aarch64_unknown_linux_gnu="$wrap" PKG_CONFIG_ALLOW_CROSS=1
echo "build-arm64: $(cargo --version) / $(rustc --version) -> $triple"

# --- build -------------------------------------------------------------------------------------
t0=$SECONDS
cargo build --release --locked -p edge-agent --target "$triple"
echo "build-arm64: release build $((SECONDS - t0)) s"
bin="$CARGO_TARGET_DIR/$triple/release/edge-agent"
file -b "$bin" | grep -q "ARM aarch64" || { echo "build-arm64: $bin is not an aarch64 binary: $(file -b "$bin")" >&2; exit 1; }

# --- the arm64 binary under qemu ---------------------------------------------------------------
$qemu "$bin" --version
$qemu "$bin" check-config packaging/deb/config.toml
smoke="$(mktemp -d)"
trap 'kill "${agent:-0}" 2>/dev/null || true; rm -rf "$smoke"' EXIT
# A free port (other test suites may run on this machine): nothing may answer on it yet.
for _ in $(seq 50); do
  port=$((20000 + RANDOM % 40000))
  (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || break
done
cat >"$smoke/config.toml" <<CFG
[agent]
store_id = "arm64-smoke"
data_dir = "$smoke"
[mqtt]
enabled = false
[http]
listen = "127.0.0.1:$port"
[[drivers]]
type = "simulated"
name = "lane-1"
lane = "lane-1"
transactions_per_minute = 600.0
CFG
$qemu "$bin" run --config "$smoke/config.toml" >"$smoke/agent.log" 2>&1 &
agent=$!
ready=""
for _ in $(seq 300); do
  # Ready, and it is this agent answering (its store id), not another process on the port.
  if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 \
    && curl -fsS "http://127.0.0.1:$port/status" 2>/dev/null | grep -q '"store_id":"arm64-smoke"'; then
    ready=1; break
  fi
  kill -0 "$agent" 2>/dev/null || break
  sleep 0.1
done
[ -n "$ready" ] || { echo "build-arm64: the arm64 agent never became ready under qemu:" >&2; cat "$smoke/agent.log" >&2; exit 1; }
kill -TERM "$agent"
wait "$agent" || { echo "build-arm64: the arm64 agent did not stop cleanly:" >&2; cat "$smoke/agent.log" >&2; exit 1; }
echo "build-arm64: the arm64 agent ran under qemu until /readyz and stopped cleanly on SIGTERM"

# The log's tests, contract suite included, compiled for aarch64 and run under qemu (the runner).
t0=$SECONDS
cargo test --release --locked -p edge-sync --target "$triple" -- --test-threads=2
echo "build-arm64: edge-sync tests under qemu $((SECONDS - t0)) s"

# --- package -----------------------------------------------------------------------------------
deb="$(bash scripts/build-deb.sh --no-build --target "$triple" --runner "$qemu" --out "$CARGO_TARGET_DIR/deb-out" | tail -n 1)"
dpkg-deb -f "$deb" Architecture | grep -qx arm64 || { echo "build-arm64: $deb is not an arm64 package" >&2; exit 1; }
lintian --fail-on error,warning "$deb"
echo "$deb"
