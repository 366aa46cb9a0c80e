#!/usr/bin/env bash
# A peer side by side: the same MQTT QoS 1 -> Kafka workload through Telegraf (inputs.mqtt_consumer
# -> outputs.kafka) and through edge-agent ([mqtt] ingress -> [kafka] uplink), in one run, against
# the same Mosquitto (the shipped tuning file) and the same Kafka broker (scripts/kafka.sh), rounds
# alternating. Not product code: the numbers land in docs/BENCHMARKS.md ("Peer side by side:
# Telegraf").
#
#   bash scripts/bench-peer.sh
#
# Environment (defaults in brackets):
#   MESSAGES [100000]  PAYLOAD [300]  WINDOW [1000]  ROUNDS [2]
#   SYSTEMS ["telegraf agent"]  also "telegraf-disk" (Telegraf with buffer_strategy = "disk")
#   EDGE_AGENT [target/release/edge-agent]  PEER_PUBLISH [target/release/peer_publish]
#   OUT [bench-data/peer]  (Kafka, Mosquitto, configs, logs and results.jsonl go here)
#   KILL9_AFTER_S []   if set: kill -9 the system this many seconds after the first publish and
#                      start it again on the same config and state (the JSON line then has
#                      "kill9_after_s"; its CPU and RSS figures are the restarted process's only)
#
# Per system and round: one JSON line in $OUT/results.jsonl with the publisher's view (publish time,
# first publish -> last record visible at HQ under read_committed, HQ distinct/duplicate/missing
# event ids, from bench/src/bin/peer_publish.rs) and the system process's peak RSS (VmHWM) and CPU
# seconds (utime+stime, from just before the first publish to the last record at HQ).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
MESSAGES="${MESSAGES:-100000}"
PAYLOAD="${PAYLOAD:-300}"
WINDOW="${WINDOW:-1000}"
ROUNDS="${ROUNDS:-2}"
SYSTEMS="${SYSTEMS:-telegraf agent}"
EDGE_AGENT="${EDGE_AGENT:-target/release/edge-agent}"
PEER_PUBLISH="${PEER_PUBLISH:-target/release/peer_publish}"
OUT="${OUT:-bench-data/peer}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
RESULTS="$OUT/results.jsonl"
TCK="$(getconf CLK_TCK)"

die() { echo "bench-peer: $*" >&2; exit 1; }
[ -x "$EDGE_AGENT" ] || die "no agent binary at $EDGE_AGENT (cargo build --release -p edge-agent)"
[ -x "$PEER_PUBLISH" ] || die "no $PEER_PUBLISH (cargo build --release -p edge-bench --bin peer_publish)"
command -v mosquitto >/dev/null || die "mosquitto is needed"
TELEGRAF="$(bash scripts/build-telegraf.sh)"

free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 40000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  die "no free port"
}

SYS_PID=""
MOSQ_PID=""
cleanup() {
  [ -n "$SYS_PID" ] && kill -KILL "$SYS_PID" 2>/dev/null || true
  [ -n "$MOSQ_PID" ] && kill -TERM "$MOSQ_PID" 2>/dev/null || true
  bash scripts/kafka.sh stop "$OUT/kafka" --kill >/dev/null 2>&1 || true
}
trap cleanup EXIT

# Kafka
bash scripts/kafka.sh start "$OUT/kafka" >&2
# shellcheck disable=SC1091
BOOTSTRAP="$(. "$OUT/kafka/broker.env"; echo "$BOOTSTRAP")"

# Mosquitto with the shipped tuning file
MQTT_PORT="$(free_port)"
rm -rf "$OUT/mosquitto"; mkdir -p "$OUT/mosquitto"
{
  cat packaging/mosquitto/edge-agent-tuning.conf
  printf '\n# bench-peer\nuser root\npersistence_location %s/\nlog_dest file %s/mosquitto.log\n' "$OUT/mosquitto" "$OUT/mosquitto"
  printf 'log_type error\nlog_type warning\nlog_type notice\nlistener %s 127.0.0.1\nallow_anonymous true\n' "$MQTT_PORT"
  # The publisher bursts faster than either system drains, so the subscriber's queue must hold a
  # whole run: otherwise Mosquitto drops QoS 1 messages past max_queued_messages (100000 shipped).
  printf 'max_queued_messages %s\n' "$(( MESSAGES + WINDOW + 1000 ))"
} > "$OUT/mosquitto/mosquitto.conf"
mosquitto -c "$OUT/mosquitto/mosquitto.conf" >/dev/null 2>&1 &
MOSQ_PID=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$MQTT_PORT") 2>/dev/null && break; sleep 0.1; done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
hwm_kib() { awk '/^VmHWM/ {print $2}' "/proc/$1/status"; }

# Waits until Mosquitto logged a connect of client id $1, then a moment for its SUBSCRIBE.
wait_client() {
  for _ in $(seq 1 300); do
    grep -q " as $1 " "$OUT/mosquitto/mosquitto.log" 2>/dev/null && { sleep 1; return 0; }
    kill -0 "$SYS_PID" 2>/dev/null || die "the system under test exited (see $OUT/$2)"
    sleep 0.1
  done
  die "client $1 never connected"
}

telegraf_conf() { # $1 client id, $2 buffer strategy, $3 dir
  cat <<EOF
[agent]
  interval = "10s"
  round_interval = false
  metric_batch_size = 1000
  metric_buffer_limit = 100000
  flush_interval = "1s"
  flush_jitter = "0s"
  omit_hostname = true
  buffer_strategy = "$2"
  buffer_directory = "$3/buffer"
  quiet = true

[[inputs.mqtt_consumer]]
  servers = ["tcp://127.0.0.1:$MQTT_PORT"]
  topics = ["store/+/pos/+/transactions"]
  qos = 1
  persistent_session = true
  client_id = "$1"
  ## like the agent's receive window: acked to Mosquitto only once written to Kafka
  max_undelivered_messages = $WINDOW
  topic_tag = ""
  data_format = "value"
  data_type = "string"

[[outputs.kafka]]
  brokers = ["$BOOTSTRAP"]
  topic = "pos.transactions"
  version = "3.0.0"
  required_acks = -1
  idempotent_writes = true
  max_retry = 3
  ## zstd, like the agent's default
  compression_codec = 4
  ## the MQTT payload, byte for byte
  data_format = "template"
  template = '{{ .Field "value" }}'
EOF
}

agent_conf() { # $1 client id, $2 dir
  cat <<EOF
[agent]
store_id = "s1"
data_dir = "$2/data"
log_level = "warn"

[mqtt]
host = "127.0.0.1"
port = $MQTT_PORT
client_id = "$1"
receive_maximum = $WINDOW

[[mqtt.ingress]]
topic = "store/+/pos/{device}/transactions"
stream = "pos.transactions"

[http]
listen = "127.0.0.1:$(free_port)"

[kafka]
brokers = ["$BOOTSTRAP"]
EOF
}

run_one() { # $1 system, $2 round
  local sys="$1" r="$2" dir="$OUT/$1-r$2" id topic
  rm -rf "$dir"; mkdir -p "$dir"
  id="peer-$sys-r$r-$$"
  case "$sys" in
    telegraf|telegraf-disk)
      local strat=memory; [ "$sys" = telegraf-disk ] && strat=disk
      mkdir -p "$dir/buffer"
      telegraf_conf "$id" "$strat" "$dir" > "$dir/telegraf.conf"
      "$TELEGRAF" --config "$dir/telegraf.conf" > "$dir/telegraf.log" 2>&1 &
      SYS_PID=$!
      topic="pos.transactions"
      wait_client "$id" "$sys-r$r/telegraf.log"
      ;;
    agent)
      agent_conf "$id" "$dir" > "$dir/edge-agent.toml"
      "$EDGE_AGENT" run --config "$dir/edge-agent.toml" > "$dir/edge-agent.log" 2>&1 &
      SYS_PID=$!
      topic="edge.pos.transactions"
      wait_client "$id" "$sys-r$r/edge-agent.log"
      ;;
    *) die "unknown system $sys" ;;
  esac
  local c0 c1 hwm line
  c0="$(cpu_ticks "$SYS_PID")"
  "$PEER_PUBLISH" --mqtt-port "$MQTT_PORT" --bootstrap "$BOOTSTRAP" --topic "$topic" \
      --prefix "$sys-r$r-$$" --messages "$MESSAGES" --payload-bytes "$PAYLOAD" --window "$WINDOW" \
      > "$dir/publisher.json" &
  local pub=$!
  if [ -n "${KILL9_AFTER_S:-}" ]; then
    sleep 1.5  # the publisher's HQ consumer warms up for 1.5 s before the first publish
    sleep "$KILL9_AFTER_S"
    kill -KILL "$SYS_PID"; wait "$SYS_PID" 2>/dev/null || true
    echo "bench-peer: $sys round $r: kill -9 at ${KILL9_AFTER_S}s, restarting" >&2
    case "$sys" in
      agent) "$EDGE_AGENT" run --config "$dir/edge-agent.toml" >> "$dir/edge-agent.log" 2>&1 & ;;
      *) "$TELEGRAF" --config "$dir/telegraf.conf" >> "$dir/telegraf.log" 2>&1 & ;;
    esac
    SYS_PID=$!
    c0="$(cpu_ticks "$SYS_PID")"
  fi
  wait "$pub" || die "publisher failed ($sys round $r)"
  line="$(cat "$dir/publisher.json")"
  [ -n "${KILL9_AFTER_S:-}" ] && line="${line%\}},\"kill9_after_s\":$KILL9_AFTER_S}"
  c1="$(cpu_ticks "$SYS_PID")"
  hwm="$(hwm_kib "$SYS_PID")"
  kill -TERM "$SYS_PID" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$SYS_PID" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$SYS_PID" 2>/dev/null || true
  wait "$SYS_PID" 2>/dev/null || true
  SYS_PID=""
  local cpu_s per100k
  cpu_s="$(awk -v a="$c0" -v b="$c1" -v t="$TCK" 'BEGIN {printf "%.2f", (b - a) / t}')"
  per100k="$(awk -v c="$cpu_s" -v n="$MESSAGES" 'BEGIN {printf "%.2f", c * 100000 / n}')"
  line="$(printf '%s' "$line" | sed "s/}\$/,\"system\":\"$sys\",\"round\":$r,\"rss_peak_mib\":$(awk -v k="$hwm" 'BEGIN {printf "%.1f", k / 1024}'),\"cpu_s\":$cpu_s,\"cpu_s_per_100k\":$per100k}/")"
  echo "$line" | tee -a "$RESULTS"
}

echo "bench-peer: telegraf $("$TELEGRAF" --version), agent $("$EDGE_AGENT" --version 2>/dev/null || echo '?'), $MESSAGES x $PAYLOAD B, window $WINDOW, rounds $ROUNDS, systems: $SYSTEMS, kafka $BOOTSTRAP, mosquitto :$MQTT_PORT" >&2
for r in $(seq 1 "$ROUNDS"); do
  order="$SYSTEMS"
  # even rounds run the systems in reverse order, so neither always goes first
  [ $(( r % 2 )) -eq 0 ] && order="$(echo "$SYSTEMS" | tr ' ' '\n' | tac | tr '\n' ' ')"
  for sys in $order; do
    run_one "$sys" "$r"
  done
done
