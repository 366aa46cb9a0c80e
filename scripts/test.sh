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
echo "== cargo clippy -p edge-drivers --no-default-features (POS-only build: no ble, no camera)"
cargo clippy -p edge-drivers --no-default-features --all-targets --locked -- -D warnings
echo "== cargo clippy -p edge-drivers --features bluez (the BlueZ source; links libdbus, not a default)"
cargo clippy -p edge-drivers --features bluez --all-targets --locked -- -D warnings
# Licences, banned crates and crate sources of everything we build and ship (deny.toml). Advisories
# are left out: `cargo deny check advisories` fetches the RustSec database from GitHub, and the
# CI machines cannot reach it (run it where they can: `cargo deny check advisories`).
if cargo deny --version >/dev/null 2>&1; then
  echo "== cargo deny check licenses bans sources"
  cargo deny --locked check licenses bans sources
elif [ "${CI:-}" = true ]; then
  echo "cargo-deny is missing: run scripts/install-deps.sh" >&2
  exit 1
else
  echo "== cargo deny: not installed, skipped (scripts/install-deps.sh installs it)"
fi
echo "== Kafka broker jars (scripts/kafka.sh fetch; cached outside the clone)"
bash scripts/kafka.sh fetch
echo "== cargo test"
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"
echo "== cargo test -p edge-drivers --no-default-features"
cargo test -p edge-drivers --no-default-features --locked -- --test-threads="${TEST_THREADS:-2}"
# The BlueZ source against python-dbusmock's bluez5 on a private bus (fails in CI without them).
echo "== cargo test -p edge-drivers --features bluez --test ble_bluez"
cargo test -p edge-drivers --features bluez --locked --test ble_bluez

# --- The input surface: coverage-guided fuzzing -------------------------------------------------
# POS and BLE drivers, downlink admission, MQTT ingress and topics, the config loader. The
# committed seed corpora plus seeded mutations already run in every `cargo test`
# (<crate>/tests/fuzz_corpus.rs, a few seconds each). On top, each cargo-fuzz target runs coverage-guided for EDGE_FUZZ_SECONDS
# (default 15 s in CI, off elsewhere). Nightly sanitizer builds are cached after the first: the
# drivers crate ~2.5 minutes cold on the 2-core machine; sync (without librdkafka, with SQLite's C)
# 10.5 CPU-minutes; edge-agent (everything, librdkafka included) is the heaviest, see
# edge-agent/fuzz/README.md.
fuzz_seconds="${EDGE_FUZZ_SECONDS:-}"
if [ -z "$fuzz_seconds" ] && [ "${CI:-}" = true ]; then fuzz_seconds=15; fi
if [ -n "$fuzz_seconds" ] && [ "$fuzz_seconds" != 0 ]; then
  if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "== installing the nightly toolchain and cargo-fuzz (fuzz targets)"
    rustup toolchain install nightly --profile minimal
    cargo install cargo-fuzz --locked
  fi
  # <crate dir>:<target>; core:downlink_record is the downlink's admission (signatures, commands).
  # sync:mqtt_* are the MQTT bridge's ingress and topic mapping; edge-agent:config the config loader;
  # drivers:ble_* / hci_event / btsnoop_capture the BLE parsers (docs/BLE.md); drivers:printer_status
  # the printer's status replies.
  for ct in drivers:escpos_tokenizer drivers:scanner_frame drivers:scale_frame drivers:printer_status core:downlink_record \
      drivers:ble_advertising drivers:hci_event drivers:btsnoop_capture \
      sync:mqtt_ingress sync:mqtt_topic edge-agent:config; do
    crate="${ct%%:*}" t="${ct#*:}"
    echo "== cargo fuzz run $t (${fuzz_seconds}s)"
    work="$(mktemp -d)"
    (cd "$crate" && cargo +nightly fuzz run -O "$t" "$work" "fuzz/corpus/$t" -- \
      -max_total_time="$fuzz_seconds" -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 2>&1 \
      | grep -E "^(stat::number_of_executed_units|Done|==[0-9]+==|SUMMARY|.*panicked)" ) \
      || { echo "fuzz target $t failed"; exit 1; }
    rm -rf "$work"
  done
fi

# Packaging: the amd64 .deb and its install test (dpkg -i on this machine, so root and CI only
# unless asked for with EDGE_AGENT_PACKAGE_TESTS=1), then the arm64 build run under qemu.
if [ "${CI:-}" = true ] || [ "${EDGE_AGENT_PACKAGE_TESTS:-}" = 1 ]; then
  target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
  echo "== amd64 .deb (release build)"
  t0=$SECONDS
  deb="$(bash scripts/build-deb.sh | tail -n 1)"
  # The same build as revision 2: what an upgrade installs over the first.
  upgrade="$(bash scripts/build-deb.sh --no-build --deb-revision 2 --out "$target_dir/deb-upgrade" | tail -n 1)"
  echo "== amd64 .deb: $deb ($((SECONDS - t0)) s)"
  echo "== install test"
  bash scripts/test-install.sh "$deb" "$upgrade"
  echo "== arm64 build, qemu run and .deb"
  t0=$SECONDS
  bash scripts/build-arm64.sh
  echo "== arm64: $((SECONDS - t0)) s"
fi
