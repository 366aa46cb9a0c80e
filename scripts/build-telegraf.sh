#!/usr/bin/env bash
# Build a custom Telegraf (only inputs.mqtt_consumer and outputs.kafka) from
# the Go module proxy, for scripts/bench-peer.sh.  Idempotent: the binary is
# cached under $CACHE and reused when present.  Not product code.
#
#   bash scripts/build-telegraf.sh          # prints the binary's path
#
# Needs Go (>= the version telegraf's go.mod asks for) and GOPROXY reaching
# proxy.golang.org; no github.com access is needed.
set -euo pipefail

VERSION="${TELEGRAF_VERSION:-1.37.2}"
CACHE="${TELEGRAF_CACHE:-/var/cache/edge-agent-ci/telegraf-$VERSION}"
BIN="$CACHE/telegraf"
# parsers.value + serializers.template pass the MQTT payload through to Kafka byte for byte.
TAGS="custom,inputs.mqtt_consumer,outputs.kafka,parsers.value,serializers.template"

if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
    echo "$BIN"
    exit 0
fi

mkdir -p "$CACHE"
work="$(mktemp -d "${TMPDIR:-/tmp}/telegraf-src.XXXXXX")"
trap 'chmod -R u+w "$work" 2>/dev/null; rm -rf "$work"' EXIT

dir="$(cd "$work" && GOFLAGS=-mod=mod go mod download -json \
    "github.com/influxdata/telegraf@v$VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
[[ -d "$dir" ]] || { echo "build-telegraf: module download gave no Dir" >&2; exit 1; }

cp -r "$dir" "$work/src"
chmod -R u+w "$work/src"
cd "$work/src"
# The module zip has no .git, so the version is stamped by ldflags the way
# telegraf's Makefile does it.
GOFLAGS=-mod=mod CGO_ENABLED=0 go build -trimpath \
    -tags "$TAGS" \
    -ldflags "-s -w -X github.com/influxdata/telegraf/internal.Version=$VERSION -X github.com/influxdata/telegraf/internal.Branch=module-proxy" \
    -o "$BIN.tmp" ./cmd/telegraf >&2
mv "$BIN.tmp" "$BIN"
"$BIN" --version >&2
echo "$BIN"
