//! The real agent with remote BLE receivers on a real Mosquitto: an ESPresense node and a node
//! speaking our `beacon.receiver/1` schema publish sightings of the store's tag; the agent's
//! `beacons` driver writes aggregated `beacon.sightings` and its presence engine an enter into
//! the node's aisle. A foreign beacon, a phone, a garbled message and a node that is not in the
//! config are dropped and counted by reason in status, and no device address is stored.
#![allow(clippy::unwrap_used)] // test helpers

use edge_tests::agent::{Agent, wait_records};
use edge_tests::mosquitto::{Mosquitto, publish_lines};
use edge_tests::{agent_bin, wait_for};
use serde_json::Value;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const OURS: &str = "f7826da6-4fa2-4e98-8024-bc5b71e0893e";
const FOREIGN: &str = "e2c56db5-dffb-48d2-b060-d0f5a71096e0";
/// Flags, then an iBeacon of ours: major 1, minor 7, -59 dBm at 1 m.
const ADV: &str = "0201061aff4c000215f7826da64fa24e988024bc5b71e0893e00010007c5";

#[test]
fn remote_receivers_over_mqtt_become_sightings_and_presence_and_strangers_are_dropped() {
    let broker = Mosquitto::start();
    let extra = format!(
        r#"
[[drivers]]
type = "beacons"
name = "receivers"
window_ms = 500
receivers = [{{ id = "aisle-1", zone = "aisle-1" }}, {{ id = "esp-aisle-2", zone = "aisle-2", rssi_offset = 2 }}]
[drivers.allow]
ibeacon_uuids = ["{OURS}"]
[drivers.source]
kind = "mqtt"
port = {port}

[[drivers]]
type = "presence"
name = "presence"
exit_timeout_ms = 5000
zones = [
  {{ name = "aisle-1", receivers = ["aisle-1"], max_distance_m = 4.0 }},
  {{ name = "aisle-2", receivers = ["esp-aisle-2"], max_distance_m = 4.0 }},
]
"#,
        port = broker.port
    );
    let agent = Agent::start_with(agent_bin!(), broker.port, &extra);
    wait_for("the receivers' subscription", T, || {
        agent.status()["components"]["receivers"]["state"] == "up"
    });
    // Four seconds of an ESPresense node in aisle 1 hearing our tag at about 1.5 m, at 10 Hz.
    let tag_topic = format!("espresense/devices/iBeacon:{OURS}-1-7/aisle-1");
    for _ in 0..4 {
        let near: Vec<String> = (0..10)
            .map(|i| format!(r#"{{"id":"iBeacon:{OURS}-1-7","rssi@1m":-59,"rssi":{},"raw":1.5,"distance":1.5,"mac":"c0ffee000001"}}"#, -63 - i % 3))
            .collect();
        publish_lines(broker.port, 0, &tag_topic, &near);
        // Our own schema from the node in aisle 2: the same tag, far away.
        let far = vec![format!(
            r#"{{"schema":"beacon.receiver/1","receiver":"esp-aisle-2","reports":[{{"adv":"{ADV}","rssi":-84}},{{"adv":"{ADV}","rssi":-86}}]}}"#
        )];
        publish_lines(broker.port, 0, "edge/beacons/esp-aisle-2", &far);
        std::thread::sleep(Duration::from_millis(1000));
    }
    // Strangers: a foreign beacon, a phone, garbage, and a node nobody configured.
    publish_lines(
        broker.port,
        0,
        &format!("espresense/devices/iBeacon:{FOREIGN}-3-3/aisle-1"),
        &[format!(
            r#"{{"id":"iBeacon:{FOREIGN}-3-3","rssi":-60,"mac":"c0ffee000002"}}"#
        )],
    );
    publish_lines(
        broker.port,
        0,
        "espresense/devices/apple:1005:9-26/aisle-1",
        &[r#"{"id":"apple:1005:9-26","rssi":-55,"mac":"c0ffee000003"}"#.to_string()],
    );
    publish_lines(
        broker.port,
        0,
        "edge/beacons/esp-aisle-2",
        &["{\"adv\":".to_string()],
    );
    publish_lines(
        broker.port,
        0,
        "edge/beacons/esp-rogue",
        &[format!(r#"{{"adv":"{ADV}","rssi":-40}}"#)],
    );

    wait_records(&agent, "presence.events", 1, T);
    wait_for("the strangers counted", T, || {
        let d = &agent.status()["components"]["receivers"]["fields"]["dropped"];
        [
            "not_allowed",
            "no_beacon",
            "bad_message",
            "unknown_receiver",
        ]
        .iter()
        .all(|k| d[k].as_u64().unwrap_or(0) >= 1)
    });
    let events: Vec<Value> = agent
        .read_stream("presence.events")
        .iter()
        .map(|r| serde_json::from_slice(&r.event.payload).unwrap())
        .collect();
    assert_eq!(events[0]["kind"], "enter", "{events:#?}");
    assert_eq!(events[0]["zone"], "aisle-1", "{events:#?}");
    assert_eq!(events[0]["tag"], format!("ibeacon:{OURS}:1:7"));
    let sightings = agent.read_stream("beacon.sightings");
    assert!(!sightings.is_empty());
    let mut heard_by = std::collections::BTreeSet::new();
    for r in &sightings {
        let v: Value = serde_json::from_slice(&r.event.payload).unwrap();
        assert_eq!(v["beacon"], format!("ibeacon:{OURS}:1:7"), "{v}");
        for h in v["receivers"].as_array().unwrap() {
            heard_by.insert(h["receiver"].as_str().unwrap().to_string());
            if h["receiver"] == "esp-aisle-2" {
                // -85 median plus the node's +2 dB offset.
                assert_eq!(h["rssi"], -83, "{v}");
            }
        }
    }
    assert_eq!(
        heard_by.into_iter().collect::<Vec<_>>(),
        ["aisle-1", "esp-aisle-2"]
    );
    // 40 + 8 sightings of our tag in 4 rounds: aggregated, at most one record per 2 sightings
    // however slowly the rounds were published (one per message would be 48).
    assert!(sightings.len() <= 24, "{} records", sightings.len());
    for stream in [
        "beacon.sightings",
        "presence.events",
        "deadletter",
        "agent.health",
    ] {
        for r in agent.read_stream(stream) {
            let text = String::from_utf8_lossy(&r.event.payload).to_lowercase();
            assert!(
                !text.contains("c0ffee") && !text.contains(FOREIGN),
                "{stream}: {text}"
            );
        }
    }
    assert!(
        agent.metric("edge_beacon_dropped_total{driver=\"receivers\",reason=\"not_allowed\"}")
            >= 1.0,
        "{}",
        agent.metrics()
    );
}
