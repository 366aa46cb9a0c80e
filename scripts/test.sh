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

# --- POS drivers: coverage-guided fuzzing (opt-in) -------------------------------------------
# The committed seed corpora plus ~13k seeded mutations already run in every `cargo test`
# (drivers/tests/fuzz_corpus.rs, under a second). With EDGE_FUZZ_SECONDS set and cargo-fuzz
# installed, each target also runs coverage-guided for that long. Opt-in because the nightly
# sanitizer build of the drivers crate (it pulls in edge-sync's bundled SQLite) takes ~9 minutes
# on the 2-core CI machine; later runs reuse it (~2 s).
if [ -n "${EDGE_FUZZ_SECONDS:-}" ]; then
  if cargo +nightly fuzz --version >/dev/null 2>&1; then
    for t in escpos_tokenizer scanner_frame scale_frame; do
      echo "== cargo fuzz run $t (${EDGE_FUZZ_SECONDS}s)"
      work="$(mktemp -d)"
      (cd drivers && cargo +nightly fuzz run -O "$t" "$work" "fuzz/corpus/$t" -- \
        -max_total_time="$EDGE_FUZZ_SECONDS" -rss_limit_mb=2048 -max_len=65536)
      rm -rf "$work"
    done
  else
    echo "== fuzz: EDGE_FUZZ_SECONDS is set but 'cargo +nightly fuzz' is missing (cargo install cargo-fuzz); skipped"
  fi
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
