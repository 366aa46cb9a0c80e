#!/usr/bin/env bash
# Install test of the edge-agent .deb on this machine, as store IT would use it:
#   static checks   lintian (errors and warnings fail; overrides are justified in the package),
#                   systemd-analyze verify on the unpacked package (no output allowed) and the
#                   security exposure score (must stay "OK": <= 2.5 here)
#   install         dpkg -i; files, service account, groups, permissions, conffiles, man page
#   run             check-config and the agent as the service user against a local Mosquitto until
#                   /readyz is green; a QoS 1 message reaches the log; doctor passes; metrics answer
#   upgrade         to a second build of the package (when given): the admin's config edit, the log
#                   and its epoch survive
#   remove/purge    remove keeps config, account and log; purge removes them all, nothing is left
#
# usage: scripts/test-install.sh PACKAGE.deb [UPGRADE.deb]      (root; changes this machine's dpkg state)
# Refuses to touch a real installation unless CI=true (CI purges a leftover of an aborted run).
set -euo pipefail
cd "$(dirname "$0")/.."

deb="$(realpath "${1:?usage: test-install.sh PACKAGE.deb [UPGRADE.deb]}")"
upgrade="${2:+$(realpath "$2")}"
pass=0
ok() { pass=$((pass + 1)); echo "  ok: $*"; }
fail() { echo "  FAILED: $*" >&2; echo "install test: $pass passed, 1 failed" >&2; exit 1; }
need() { command -v "$1" >/dev/null 2>&1 || fail "missing tool: $1 (scripts/install-deps.sh installs it)"; }

[ "$(id -u)" = 0 ] || fail "the install test needs root (dpkg -i, adduser)"
for t in dpkg dpkg-deb lintian systemd-analyze mosquitto mosquitto_pub mosquitto_sub mosquitto_passwd openssl curl runuser setpriv man; do need "$t"; done

if dpkg-query -W -f='${Status}' edge-agent 2>/dev/null | grep -qv "not-installed"; then
  if [ "${CI:-}" = true ]; then
    echo "install test: purging a leftover edge-agent installation"
    dpkg --purge edge-agent >/dev/null
  else
    fail "edge-agent is installed on this machine; the test would purge it and its log (run it in CI or purge it yourself)"
  fi
fi

work="$(mktemp -d /tmp/edge-agent-install-test.XXXXXX)"
chmod 0755 "$work"
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  if dpkg-query -W -f='${Status}' edge-agent 2>/dev/null | grep -q "install ok"; then
    dpkg --purge edge-agent >/dev/null 2>&1 || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

echo "== static checks of $(basename "$deb")"
lintian --fail-on error,warning -I "$deb" || fail "lintian reports errors or warnings"
ok "lintian: no error or warning (informational tags are overridden with reasons)"

root="$work/root"
dpkg-deb -x "$deb" "$root"
# verify needs the units the package refers to (targets, mosquitto.service may be absent: After= only).
cp -an /lib/systemd/system/. "$root/usr/lib/systemd/system/"
out="$(systemd-analyze verify --man=no --root="$root" edge-agent.service 2>&1)" || fail "systemd-analyze verify: $out"
[ -z "$out" ] || fail "systemd-analyze verify printed: $out"
ok "systemd-analyze verify --root (unpacked package): no output"
sec="$(systemd-analyze security --offline=true --root="$root" --threshold=25 edge-agent.service 2>&1)" \
  || fail "exposure above 2.5: $(echo "$sec" | tail -n 1)"
score="$(echo "$sec" | grep -o 'Overall exposure level for edge-agent.service: .*' | sed 's/ *$//')"
ok "systemd-analyze security: ${score#Overall exposure level for edge-agent.service: }"

echo "== install"
dpkg -i "$deb" >/dev/null || fail "dpkg -i"
ok "dpkg -i"
IFS=: read -r _ _ uid _ _ home shell < <(getent passwd edge-agent) || fail "no edge-agent user"
[ "$uid" -lt 1000 ] || fail "edge-agent is not a system user (uid $uid)"
[ "$home" = /var/lib/edge-agent ] && [ "$shell" = /usr/sbin/nologin ] || fail "home $home, shell $shell"
groups=" $(id -nG edge-agent) "
for g in edge-agent dialout video bluetooth; do
  [[ "$groups" == *" $g "* ]] || fail "edge-agent is not in group $g ($groups)"
done
ok "system user edge-agent (uid $uid, nologin) in groups:$groups"
check_stat() { # path owner:group mode
  local s; s="$(stat -c '%U:%G %a' "$1")"
  [ "$s" = "$2 $3" ] || fail "$1 is $s, expected $2 $3"
}
check_stat /usr/bin/edge-agent root:root 755
check_stat /etc/edge-agent root:edge-agent 750
check_stat /etc/edge-agent/config.toml root:edge-agent 640
check_stat /var/lib/edge-agent edge-agent:edge-agent 750
check_stat /usr/lib/systemd/system/edge-agent.service root:root 644
check_stat /etc/mosquitto/conf.d/edge-agent-tuning.conf root:root 644
ok "owners and modes of binary, config, state directory, unit and Mosquitto snippet"
conffiles="$(dpkg-query --control-show edge-agent conffiles)"
for f in /etc/edge-agent/config.toml /etc/mosquitto/conf.d/edge-agent-tuning.conf; do
  grep -q "^$f" <<<"$conffiles" || fail "$f is not a conffile"
done
ok "conffiles: config.toml and the Mosquitto tuning"
man -w edge-agent >/dev/null && man -w edge-agent-doctor >/dev/null || fail "man pages not found"
[ -s /usr/share/bash-completion/completions/edge-agent ] || fail "bash completion missing"
out="$(systemd-analyze verify /usr/lib/systemd/system/edge-agent.service 2>&1)"
[ -z "$out" ] || fail "systemd-analyze verify (installed, man pages checked) printed: $out"
ok "man pages, completions; installed unit verifies with its Documentation= man page"
if runuser -u nobody -- cat /etc/edge-agent/config.toml >/dev/null 2>&1; then
  fail "any local account can read the configuration"
fi
runuser -u edge-agent -- /usr/bin/edge-agent check-config >/dev/null || fail "check-config of the installed config as edge-agent"
ok "check-config passes on the installed config as edge-agent (and 'nobody' cannot read it)"

echo "== run as the service user against a local Mosquitto"
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
pick_port() { local p; for _ in $(seq 50); do p=$((20000 + RANDOM % 40000)); port_free "$p" && { echo "$p"; return; }; done; fail "no free port"; }
config=/etc/edge-agent/config.toml
mqtt_port=1883 http_port=9464
if ! port_free 1883 || ! port_free 9464; then
  mqtt_port="$(pick_port)"; http_port="$(pick_port)"
  config="$work/config.toml"
  sed -e "s/^port = 1883/port = $mqtt_port/" -e "s/^listen = \"127.0.0.1:9464\"/listen = \"127.0.0.1:$http_port\"/" \
    /etc/edge-agent/config.toml >"$config"
  chgrp edge-agent "$config"; chmod 0640 "$config"
  echo "  (default ports busy: broker on $mqtt_port, agent HTTP on $http_port, config $config)"
fi
mkdir -p "$work/mosquitto"; chmod 0777 "$work/mosquitto"
{ cat /etc/mosquitto/conf.d/edge-agent-tuning.conf
  echo "listener $mqtt_port 127.0.0.1"; echo "allow_anonymous true"
  echo "persistence_location $work/mosquitto/"; } >"$work/mosquitto.conf"
mosquitto -c "$work/mosquitto.conf" >"$work/mosquitto.log" 2>&1 &
broker=$!
pids+=($broker)
for _ in $(seq 100); do port_free "$mqtt_port" || break; sleep 0.1; done
# Listening, and it is our broker (not another suite's on a port that was free a moment ago).
port_free "$mqtt_port" || ! kill -0 "$broker" 2>/dev/null \
  && fail "mosquitto did not start: $(cat "$work/mosquitto.log")"
ok "Mosquitto with the packaged tuning on 127.0.0.1:$mqtt_port"

# setpriv execs the agent itself (same PID), so SIGTERM below reaches it as systemd's would.
(cd / && exec env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin setpriv --reuid=edge-agent --regid=edge-agent \
  --init-groups -- /usr/bin/edge-agent run --config "$config") >"$work/agent.log" 2>&1 &
agent=$!
pids+=($agent)
ready=""
for _ in $(seq 200); do
  if curl -fsS "http://127.0.0.1:$http_port/readyz" >/dev/null 2>&1 \
    && curl -fsS "http://127.0.0.1:$http_port/status" 2>/dev/null | grep -q '"store_id":"store-0001"'; then
    ready=1; break
  fi
  kill -0 "$agent" 2>/dev/null || break
  sleep 0.1
done
[ -n "$ready" ] || fail "/readyz never answered 200: $(cat "$work/agent.log")"
ok "/readyz is green (agent runs as edge-agent with the state in /var/lib/edge-agent)"
[ "$(stat -c %U /var/lib/edge-agent/log.db)" = edge-agent ] || fail "log.db not owned by edge-agent"

# A POS terminal publishes a transaction with QoS 1; it must be in the log (ack after commit).
for _ in $(seq 100); do
  grep -q '^edge_mqtt_connected 1' <<<"$(curl -fsS "http://127.0.0.1:$http_port/metrics")" && break; sleep 0.1
done
mosquitto_pub -p "$mqtt_port" -q 1 -t store/s1/pos/lane-1/transactions \
  -m '{"schema":"pos.transaction/1","event_id":"install-test-1","total_cents":1250}' || fail "mosquitto_pub"
found=""
for _ in $(seq 100); do
  if runuser -u edge-agent -- /usr/bin/edge-agent log tail -c "$config" -s pos.transactions --format jsonl 2>/dev/null \
    | grep -q install-test-1; then found=1; break; fi
  sleep 0.1
done
[ -n "$found" ] || fail "the published transaction did not reach the log: $(tail -n 20 "$work/agent.log")"
ok "a QoS 1 transaction from mosquitto_pub is in the log (edge-agent log tail as edge-agent)"
metrics="$(curl -fsS "http://127.0.0.1:$http_port/metrics")"
for m in 'edge_log_appended_records_total{stream="pos.transactions"' 'edge_mqtt_connected 1' \
         'edge_component_state{component="mqtt",kind="mqtt",state="up"} 1' 'edge_log_commit_seconds_bucket'; do
  grep -qF "$m" <<<"$metrics" || fail "/metrics lacks $m"
done
ok "/metrics: per-stream ingest, MQTT link, component state, commit latency"
doctor="$(runuser -u edge-agent -- /usr/bin/edge-agent doctor -c "$config" --fsync-time 1s)" \
  || fail "doctor found a problem: $doctor"
grep -q '^OK    mqtt' <<<"$doctor" && grep -q '^OK    daemon' <<<"$doctor" || fail "doctor: $doctor"
ok "doctor as edge-agent: broker, daemon, data disk pass"
epoch="$(runuser -u edge-agent -- /usr/bin/edge-agent status --json -c "$config" | grep -o '"epoch": "[^"]*"')"
kill -TERM "$agent"
wait "$agent" || fail "the agent did not exit cleanly on SIGTERM: $(tail -n 20 "$work/agent.log")"
ok "SIGTERM: clean exit ($epoch)"

echo "== store-LAN listener example (shipped in /usr/share/doc/edge-agent/examples/mosquitto)"
# The documented set-up, with the installed example files: TLS and a password per device on the
# LAN port, the ACL, anonymous loopback for the agent. Ports and file paths are the only changes.
ex=/usr/share/doc/edge-agent/examples/mosquitto
lan="$work/lan"; mkdir -p "$lan"; chmod 0777 "$lan"
( cd "$lan"
  openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=store-ca -keyout ca.key -out ca.crt
  openssl req -newkey rsa:2048 -nodes -subj /CN=localhost -keyout broker.key -out broker.csr
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' >ext
  openssl x509 -req -in broker.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out broker.crt
  mosquitto_passwd -c -b devices.passwd pos-lane-01 lane-secret
  chmod 0644 ./* ) >/dev/null 2>&1 || fail "test certificates and password file"
lo_port="$(pick_port)"; tls_port="$(pick_port)"
{ cat /etc/mosquitto/conf.d/edge-agent-tuning.conf
  echo "persistence_location $lan/"
  sed -e "s|^listener 1883 127.0.0.1|listener $lo_port 127.0.0.1|" -e "s|^listener 8883|listener $tls_port|" \
      -e "s|/etc/mosquitto/certs/store-broker.crt|$lan/broker.crt|" -e "s|/etc/mosquitto/certs/store-broker.key|$lan/broker.key|" \
      -e "s|/etc/mosquitto/certs/store-ca.crt|$lan/ca.crt|" -e "s|/etc/mosquitto/edge-agent-devices.passwd|$lan/devices.passwd|" \
      -e "s|/etc/mosquitto/edge-agent-devices.acl|$ex/store-lan.acl|" "$ex/store-lan-listener.conf"
} >"$lan/mosquitto.conf"
mosquitto -c "$lan/mosquitto.conf" >"$lan/mosquitto.log" 2>&1 &
lan_broker=$!
pids+=($lan_broker)
for _ in $(seq 100); do port_free "$tls_port" || break; sleep 0.1; done
port_free "$tls_port" || ! kill -0 "$lan_broker" 2>/dev/null && fail "mosquitto did not start with the store-LAN example: $(cat "$lan/mosquitto.log")"
# A persistent loopback subscriber (the agent's position) records what devices get through.
mosquitto_sub -p "$lo_port" -i lan-test-sub -c -q 1 -t 'store/#' -E || fail "anonymous loopback subscribe"
dev=(-p "$tls_port" --cafile "$lan/ca.crt" -u pos-lane-01 -q 1)
mosquitto_pub "${dev[@]}" -P lane-secret -t store/s1/pos/pos-lane-02/transactions -m other-lane \
  || fail "publish outside the ACL should be accepted and dropped, not refused"
mosquitto_pub "${dev[@]}" -P lane-secret -t store/s1/pos/pos-lane-01/transactions -m own-lane \
  || fail "pos-lane-01 cannot publish its own transactions over TLS"
first="$(mosquitto_sub -p "$lo_port" -i lan-test-sub -c -q 1 -t 'store/#' -C 1 -W 5)"
[ "$first" = own-lane ] || fail "loopback subscriber got '$first' first (the ACL must drop other-lane)"
mosquitto_pub "${dev[@]}" -P wrong -t store/s1/pos/pos-lane-01/transactions -m x 2>/dev/null \
  && fail "a wrong password was accepted"
mosquitto_pub -p "$tls_port" --cafile "$lan/ca.crt" -q 1 -t store/s1/pos/x/transactions -m x 2>/dev/null \
  && fail "an anonymous device was accepted on the LAN port"
mosquitto_pub -p "$tls_port" -u pos-lane-01 -P lane-secret -q 1 -t x -m x 2>/dev/null \
  && fail "plain MQTT was accepted on the TLS port"
ok "store-LAN example: TLS + per-device password, ACL confines a device to its topics, anonymous/wrong password/plaintext refused"

if [ -n "$upgrade" ]; then
  echo "== upgrade to $(basename "$upgrade")"
  echo "# install-test: an administrator's edit" >>/etc/edge-agent/config.toml
  dpkg -i --force-confold "$upgrade" >/dev/null || fail "dpkg -i (upgrade)"
  grep -q "install-test: an administrator's edit" /etc/edge-agent/config.toml || fail "the upgrade replaced the edited config"
  check_stat /etc/edge-agent/config.toml root:edge-agent 640
  check_stat /var/lib/edge-agent edge-agent:edge-agent 750
  after="$(runuser -u edge-agent -- /usr/bin/edge-agent status --json -c "$config" | grep -o '"epoch": "[^"]*"')"
  [ "$after" = "$epoch" ] || fail "the upgrade changed the log epoch: $epoch -> $after"
  runuser -u edge-agent -- /usr/bin/edge-agent log tail -c "$config" -s pos.transactions --format jsonl \
    | grep -q install-test-1 || fail "the record is gone after the upgrade"
  ok "upgrade keeps the edited config, permissions, the log and its epoch"
fi

echo "== remove and purge"
dpkg -r edge-agent >/dev/null || fail "dpkg -r"
[ ! -e /usr/bin/edge-agent ] || fail "binary left after remove"
[ -f /etc/edge-agent/config.toml ] && [ -f /var/lib/edge-agent/log.db ] && getent passwd edge-agent >/dev/null \
  || fail "remove must keep config, log and account"
ok "dpkg -r removes the program, keeps config, log and account"
dpkg --purge edge-agent >/dev/null || fail "dpkg --purge"
getent passwd edge-agent >/dev/null && fail "user edge-agent left after purge"
getent group edge-agent >/dev/null && fail "group edge-agent left after purge"
for p in /var/lib/edge-agent /etc/edge-agent /etc/mosquitto/conf.d/edge-agent-tuning.conf \
         /usr/lib/systemd/system/edge-agent.service /usr/share/doc/edge-agent; do
  [ ! -e "$p" ] || fail "$p left after purge"
done
dpkg-statoverride --list | grep -q edge-agent && fail "statoverrides left after purge"
[ ! -e /etc/systemd/system/multi-user.target.wants/edge-agent.service ] || fail "enablement symlink left after purge"
while read -r f; do
  f="/${f#./}"
  [ "$f" = / ] || [ -d "$root$f" ] || [ ! -e "$f" ] || fail "$f left after purge"
done < <(dpkg-deb --fsys-tarfile "$deb" | tar -t)
ok "purge removes user, group, state, config, statoverrides and every packaged file"
echo "install test: $pass passed, 0 failed"
