#!/usr/bin/env bash
# A single-node Apache Kafka (KRaft, combined broker + controller) on loopback for tests, benchmarks
# and the demo. Uses the machine's Java 17 and jars resolved from Maven Central by tests/kafka/pom.xml
# into a cache folder outside the clone.
#
#   scripts/kafka.sh fetch                 resolve the broker jars (idempotent)
#   scripts/kafka.sh start DIR [options]   prepare DIR (config, storage, certificates) on first use,
#                                          start the broker in the background, wait until it answers
#   scripts/kafka.sh stop DIR [--kill]     stop it (SIGTERM, or SIGKILL with --kill) and wait
#   scripts/kafka.sh status DIR            "running" or "stopped" (exit 0 / 3)
#
# start options:
#   --port N             client PLAINTEXT port (default: a free port; kept in DIR for restarts)
#   --controller-port N  KRaft controller port (default: a free port)
#   --secure             also open SASL_SSL (SCRAM-SHA-256/512 and PLAIN) and SSL with required client
#                        certificates (mTLS); certificates are generated with openssl into DIR/tls
#   --sasl-port N --ssl-port N   ports of those listeners (default: free ports)
#   --owner-pid PID      kill the broker when process PID exits (test harnesses)
#
# After start, DIR/broker.env holds BOOTSTRAP (plaintext), SASL_SSL_BOOTSTRAP, SSL_BOOTSTRAP, the
# SCRAM/PLAIN user and password and the certificate paths. The broker log is DIR/server.log.
set -euo pipefail

KAFKA_VERSION="${EDGE_KAFKA_VERSION:-4.1.1}"
KAFKA_HOME="${EDGE_KAFKA_HOME:-/var/cache/edge-agent-ci/kafka}"
LIBS="$KAFKA_HOME/libs-$KAFKA_VERSION"
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
JAVA="${JAVA:-java}"
# Users the secure listeners accept (test credentials, not secrets).
SASL_USER="edge"
SASL_PASSWORD="edgetestpassword"

die() { echo "kafka.sh: $*" >&2; exit 1; }

fetch() {
  if [ -f "$LIBS/.complete" ]; then return 0; fi
  command -v mvn >/dev/null 2>&1 || die "Maven (mvn) is needed to resolve the Kafka jars; run scripts/install-deps.sh"
  mkdir -p "$KAFKA_HOME"
  local tmp="$LIBS.tmp.$$"
  rm -rf "$tmp"
  echo "kafka.sh: resolving org.apache.kafka:kafka_2.13:$KAFKA_VERSION into $LIBS" >&2
  mvn -B -q -Dstyle.color=never -f "$ROOT/tests/kafka/pom.xml" \
    -Dmaven.repo.local="$KAFKA_HOME/m2" \
    -Dkafka.version="$KAFKA_VERSION" \
    dependency:copy-dependencies -DoutputDirectory="$tmp" >&2 \
    || die "Maven could not resolve Kafka $KAFKA_VERSION (see the output above)"
  ls "$tmp"/kafka_2.13-*.jar >/dev/null 2>&1 || die "Maven finished but no kafka_2.13 jar is in $tmp"
  touch "$tmp/.complete"
  rm -rf "$LIBS"
  mv "$tmp" "$LIBS"
}

# A TCP port nobody listens on right now (bash's /dev/tcp, no python needed).
free_port() {
  local p
  for _ in $(seq 1 200); do
    p=$(( 20000 + RANDOM % 40000 ))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then echo "$p"; return 0; fi
  done
  die "no free loopback port found"
}

gen_certs() {
  local t="$1/tls"
  [ -f "$t/.complete" ] && return 0
  command -v openssl >/dev/null 2>&1 || die "openssl is needed for the TLS broker; run scripts/install-deps.sh"
  mkdir -p "$t"
  (
    cd "$t"
    openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=edge-test-ca" \
      -keyout ca.key -out ca.pem 2>/dev/null
    for who in server client; do
      local cn="$who" ext="extendedKeyUsage=clientAuth"
      if [ "$who" = server ]; then
        cn="localhost"
        ext="subjectAltName=DNS:localhost,IP:127.0.0.1
extendedKeyUsage=serverAuth"
      fi
      openssl req -newkey rsa:2048 -nodes -subj "/CN=$cn" -keyout "$who.key.pkcs1" -out "$who.csr" 2>/dev/null
      printf '%s\n' "$ext" > "$who.ext"
      openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
        -extfile "$who.ext" -out "$who.pem" 2>/dev/null
      # Kafka's PEM keystore wants an unencrypted PKCS#8 key followed by the certificate.
      openssl pkcs8 -topk8 -nocrypt -in "$who.key.pkcs1" -out "$who.key"
      cat "$who.key" "$who.pem" > "$who.keystore.pem"
    done
    rm -f ./*.csr ./*.ext ./*.pkcs1 ca.srl
  )
  touch "$t/.complete"
}

prepare() {
  local dir="$1" port="$2" cport="$3" secure="$4" sasl_port="$5" ssl_port="$6"
  mkdir -p "$dir/data"
  local listeners="PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport"
  local advertised="PLAINTEXT://127.0.0.1:$port"
  local protocols="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT"
  local extra=""
  if [ "$secure" = 1 ]; then
    gen_certs "$dir"
    local t="$dir/tls"
    listeners="$listeners,SASL_SSL://127.0.0.1:$sasl_port,SSL://127.0.0.1:$ssl_port"
    advertised="$advertised,SASL_SSL://127.0.0.1:$sasl_port,SSL://127.0.0.1:$ssl_port"
    protocols="$protocols,SASL_SSL:SASL_SSL,SSL:SSL"
    extra="
sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN
ssl.keystore.type=PEM
ssl.keystore.location=$t/server.keystore.pem
ssl.truststore.type=PEM
ssl.truststore.location=$t/ca.pem
listener.name.ssl.ssl.client.auth=required
listener.name.sasl_ssl.scram-sha-256.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required;
listener.name.sasl_ssl.plain.sasl.jaas.config=org.apache.kafka.common.security.plain.PlainLoginModule required user_$SASL_USER=\"$SASL_PASSWORD\";"
  fi
  cat > "$dir/server.properties" <<EOF
# Written by scripts/kafka.sh: a single-node KRaft cluster for tests on loopback.
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$cport
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=$protocols
log.dirs=$dir/data
num.partitions=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
# Tests kill producers mid-transaction; let the coordinator abort them quickly.
transaction.abort.timed.out.transaction.cleanup.interval.ms=2000
log.cleaner.backoff.ms=1000
$extra
EOF
  cat > "$dir/log4j2.properties" <<EOF
status = warn
appender.file.type = File
appender.file.name = file
appender.file.fileName = $dir/server.log
appender.file.layout.type = PatternLayout
appender.file.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.file.ref = file
logger.kafka.name = kafka
logger.kafka.level = info
logger.state.name = state.change.logger
logger.state.level = warn
logger.coord.name = org.apache.kafka.coordinator
logger.coord.level = warn
EOF
  {
    echo "PORT=$port"
    echo "CONTROLLER_PORT=$cport"
    echo "BOOTSTRAP=127.0.0.1:$port"
    if [ "$secure" = 1 ]; then
      echo "SASL_SSL_BOOTSTRAP=127.0.0.1:$sasl_port"
      echo "SSL_BOOTSTRAP=127.0.0.1:$ssl_port"
      echo "SASL_USER=$SASL_USER"
      echo "SASL_PASSWORD=$SASL_PASSWORD"
      echo "CA_PEM=$dir/tls/ca.pem"
      echo "CLIENT_CERT_PEM=$dir/tls/client.pem"
      echo "CLIENT_KEY_PEM=$dir/tls/client.key"
    fi
  } > "$dir/broker.env"
  local cluster_id="-"
  # A Kafka UUID: 16 random bytes, URL-safe base64. One starting with '-' would read as an option.
  while [ "${cluster_id#-}" != "$cluster_id" ]; do
    cluster_id="$(head -c16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')"
  done
  local scram=()
  if [ "$secure" = 1 ]; then
    scram=(--add-scram "SCRAM-SHA-256=[name=$SASL_USER,password=$SASL_PASSWORD]"
           --add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$SASL_PASSWORD]")
  fi
  "$JAVA" -Xmx256m -cp "$LIBS/*" -Dlog4j2.configurationFile="$dir/log4j2.properties" \
    kafka.tools.StorageTool format --cluster-id="$cluster_id" --config "$dir/server.properties" \
    "${scram[@]}" > "$dir/format.log" 2>&1 \
    || { cat "$dir/format.log" >&2; die "formatting the broker storage in $dir failed"; }
}

is_running() {
  local dir="$1"
  [ -f "$dir/broker.pid" ] && kill -0 "$(cat "$dir/broker.pid")" 2>/dev/null
}

start() {
  local dir="" port="" cport="" secure=0 sasl_port="" ssl_port="" owner=""
  dir="${1:-}"; [ -n "$dir" ] || die "usage: kafka.sh start DIR [options]"; shift
  while [ $# -gt 0 ]; do
    case "$1" in
      --port) port="$2"; shift 2 ;;
      --controller-port) cport="$2"; shift 2 ;;
      --secure) secure=1; shift ;;
      --sasl-port) sasl_port="$2"; shift 2 ;;
      --ssl-port) ssl_port="$2"; shift 2 ;;
      --owner-pid) owner="$2"; shift 2 ;;
      *) die "unknown option $1" ;;
    esac
  done
  command -v "$JAVA" >/dev/null 2>&1 || die "Java 17 is needed to run Kafka; run scripts/install-deps.sh"
  command -v kcat >/dev/null 2>&1 || die "kcat is needed to check the broker; run scripts/install-deps.sh"
  fetch
  mkdir -p "$dir"
  dir="$(cd "$dir" && pwd)"
  if is_running "$dir"; then die "a broker is already running from $dir (pid $(cat "$dir/broker.pid"))"; fi
  if [ ! -f "$dir/data/meta.properties" ]; then
    port="${port:-$(free_port)}"; cport="${cport:-$(free_port)}"
    if [ "$secure" = 1 ]; then sasl_port="${sasl_port:-$(free_port)}"; ssl_port="${ssl_port:-$(free_port)}"; fi
    prepare "$dir" "$port" "$cport" "$secure" "$sasl_port" "$ssl_port"
  fi
  # shellcheck disable=SC1091
  . "$dir/broker.env"
  # Extra JVM options for benchmarks (scripts/bench-fleet.sh adds a metrics exporter agent).
  local jvm_extra=()
  read -r -a jvm_extra <<< "${EDGE_KAFKA_JAVA_OPTS:-}"
  # Detached (own session, no inherited stdio) so that the caller's pipes close when this script ends.
  setsid "$JAVA" -Xms128m -Xmx512m -XX:+UseG1GC -XX:MaxGCPauseMillis=20 -Djava.awt.headless=true \
    "${jvm_extra[@]}" \
    -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$LIBS/*" \
    kafka.Kafka "$dir/server.properties" < /dev/null > "$dir/stdout.log" 2>&1 &
  local pid=$!
  echo "$pid" > "$dir/broker.pid"
  if [ -n "$owner" ]; then
    # Watchdog: a test process that dies without cleaning up does not leave a broker behind.
    setsid bash -c "while kill -0 $owner 2>/dev/null && kill -0 $pid 2>/dev/null; do sleep 1; done; kill -9 $pid 2>/dev/null" \
      < /dev/null > /dev/null 2>&1 &
  fi
  local deadline=$(( SECONDS + ${EDGE_KAFKA_START_TIMEOUT_S:-90} ))
  until kcat -b "$BOOTSTRAP" -L -m 2 2>/dev/null | grep -q "broker 1 at"; do
    if ! kill -0 "$pid" 2>/dev/null; then
      tail -n 40 "$dir/stdout.log" "$dir/server.log" >&2 2>/dev/null || true
      die "the broker exited during start-up (logs above, full log in $dir/server.log)"
    fi
    [ "$SECONDS" -lt "$deadline" ] || die "the broker did not answer on $BOOTSTRAP within the start timeout; see $dir/server.log"
    sleep 0.2
  done
  cat "$dir/broker.env"
  echo "PID=$pid"
}

stop() {
  local dir="${1:-}" sig=TERM
  [ -n "$dir" ] || die "usage: kafka.sh stop DIR [--kill]"
  [ "${2:-}" = "--kill" ] && sig=KILL
  is_running "$dir" || { rm -f "$dir/broker.pid"; return 0; }
  local pid; pid="$(cat "$dir/broker.pid")"
  kill "-$sig" "$pid" 2>/dev/null || true
  local deadline=$(( SECONDS + 60 ))
  while kill -0 "$pid" 2>/dev/null; do
    if [ "$SECONDS" -ge "$deadline" ]; then kill -KILL "$pid" 2>/dev/null || true; fi
    sleep 0.1
  done
  rm -f "$dir/broker.pid"
}

cmd="${1:-}"; shift || true
case "$cmd" in
  fetch) fetch ;;
  libs) fetch; echo "$LIBS" ;;
  start) start "$@" ;;
  stop) stop "$@" ;;
  status) if is_running "${1:?usage: kafka.sh status DIR}"; then echo running; else echo stopped; exit 3; fi ;;
  *) die "usage: kafka.sh fetch | libs | start DIR [options] | stop DIR [--kill] | status DIR" ;;
esac
