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
echo "== Kafka broker jars (scripts/kafka.sh fetch; cached outside the clone)"
bash scripts/kafka.sh fetch
echo "== cargo test"
cargo test --workspace --locked -- --test-threads="${TEST_THREADS:-2}"
echo "== cargo test -p edge-drivers --no-default-features"
cargo test -p edge-drivers --no-default-features --locked -- --test-threads="${TEST_THREADS:-2}"

# --- POS drivers and downlink admission: coverage-guided fuzzing ------------------------------
# The committed seed corpora plus ~13k seeded mutations already run in every `cargo test`
# (drivers/tests/fuzz_corpus.rs, under a second). On top, each cargo-fuzz target runs
# coverage-guided for EDGE_FUZZ_SECONDS (default 15 s in CI, off elsewhere). The nightly sanitizer
# build of the drivers crate takes ~2.5 minutes cold on the 2-core machine and is cached after.
fuzz_seconds="${EDGE_FUZZ_SECONDS:-}"
if [ -z "$fuzz_seconds" ] && [ "${CI:-}" = true ]; then fuzz_seconds=15; fi
if [ -n "$fuzz_seconds" ] && [ "$fuzz_seconds" != 0 ]; then
  if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    echo "== installing the nightly toolchain and cargo-fuzz (fuzz targets)"
    rustup toolchain install nightly --profile minimal
    cargo install cargo-fuzz --locked
  fi
  # <crate dir>:<target>; core:downlink_record is the downlink's admission (signatures, commands).
  for ct in drivers:escpos_tokenizer drivers:scanner_frame drivers:scale_frame core:downlink_record; do
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
