//! The real agent's offers engine on a real Mosquitto: presence events in a zone with an active
//! campaign become offers on MQTT (through an egress rule on `offers.decisions`); the budget
//! lease pays for two offers and then the zone's fallback takes over; after kill -9 the lease
//! is still spent (rebuilt from the committed decisions) and a per-visit cap still holds.
#![allow(clippy::unwrap_used)] // test helpers

use edge_tests::agent::{Agent, wait_records};
use edge_tests::mosquitto::{Mosquitto, publish_lines};
use edge_tests::{agent_bin, require_program, wait_for};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

/// Collects every message on `filter` as (topic, JSON payload).
fn subscribe(port: u16, filter: &str) -> Arc<Mutex<Vec<(String, Value)>>> {
    let got = Arc::new(Mutex::new(Vec::new()));
    let mut child = Command::new(require_program("mosquitto_sub", "mosquitto-clients"))
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-v",
            // Gone by itself after 10 minutes: the test cannot kill it (its reader thread owns
            // it), and an orphaned subscriber outlived every test run.
            "-W",
            "600",
            "-t",
            filter,
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let out = child.stdout.take().unwrap();
    let g = got.clone();
    std::thread::spawn(move || {
        let _child = child;
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { return };
            if let Some((t, p)) = line.split_once(' ')
                && let Ok(v) = serde_json::from_str(p)
            {
                g.lock().unwrap().push((t.to_string(), v));
            }
        }
    });
    got
}

fn enter(tag: &str, ts: i64) -> Value {
    json!({"schema": "presence.event/1", "kind": "enter", "tag": tag, "zone": "aisle-3", "ts": ts, "confidence": 0.9})
}

#[test]
fn presence_in_a_campaign_zone_becomes_an_offer_on_mqtt_and_the_lease_holds_across_kill_9() {
    let broker = Mosquitto::start();
    let extra = r#"
[[mqtt.ingress]]
topic = "store/presence"
stream = "presence.events"
schema = "presence.event/1"

[[mqtt.egress]]
stream = "offers.decisions"
topic = "store/{store}/offers/{key}"

[offers]
enabled = true
zones = [{ name = "aisle-3", display = "shelf_screen", lane = "3" }]
prices = { "4011" = 150 }

[[offers.campaigns]]
id = "cola"
version = 1
zones = ["aisle-3"]
priority = 5
offer = { headline = "COLA 2 FOR {price}", display_lines = ["COLA 2 FOR {price}", "TODAY ONLY"], sku = "4011" }
caps = { per_visit = 1 }
budget = { lease_id = "L-1", amount_minor = 100, cost_minor = 50 }

[[offers.campaigns]]
id = "welcome"
version = 1
fallback = true
offer = { headline = "WELCOME", display_lines = ["WELCOME", "FRESH BREAD AISLE 1"] }
caps = { per_visit = 1 }
"#;
    let mut agent = Agent::start_with(agent_bin!(), broker.port, extra);
    wait_for("the offers engine", T, || {
        agent.status()["components"]["offers"]["state"] == "up"
    });
    let offers = subscribe(broker.port, "store/test-store/offers/#");
    std::thread::sleep(Duration::from_millis(300));
    let now = edge_core::time::now_ms();
    publish_lines(
        broker.port,
        1,
        "store/presence",
        &[enter("t1", now), enter("t2", now + 1), enter("t3", now + 2)],
    );
    wait_records(&agent, "offers.decisions", 3, T);
    wait_for("three offers on MQTT", T, || {
        offers.lock().unwrap().len() >= 3
    });
    let got = offers.lock().unwrap().clone();
    let by_tag = |t: &str| {
        got.iter()
            .find(|(topic, _)| topic.ends_with(&format!("/{t}")))
            .map(|(_, v)| v.clone())
            .unwrap()
    };
    assert_eq!(by_tag("t1")["campaign"], "cola");
    assert_eq!(
        by_tag("t1")["display_lines"],
        json!(["COLA 2 FOR 1.50", "TODAY ONLY"])
    );
    assert_eq!(by_tag("t1")["lane"], "3");
    assert_eq!(by_tag("t2")["spent_minor"], 100);
    assert_eq!(
        by_tag("t3")["outcome"],
        "fallback",
        "the lease of 100 paid for two offers"
    );
    assert_eq!(by_tag("t3")["campaign"], "welcome");

    // kill -9, then more shoppers: the lease is still spent, t1's visit is still capped.
    agent.kill9();
    agent.spawn();
    wait_for("the offers engine again", T, || {
        agent.status()["components"]["offers"]["state"] == "up"
    });
    publish_lines(
        broker.port,
        1,
        "store/presence",
        &[enter("t4", now + 10), enter("t1", now + 11)],
    );
    wait_records(&agent, "offers.decisions", 5, T);
    let decisions: Vec<Value> = agent
        .read_stream("offers.decisions")
        .iter()
        .map(|r| serde_json::from_slice(&r.event.payload).unwrap())
        .collect();
    assert_eq!(
        decisions.len(),
        5,
        "no decision repeated after kill -9: {decisions:#?}"
    );
    let d4 = decisions.iter().find(|d| d["tag"] == "t4").unwrap();
    assert_eq!(d4["outcome"], "fallback", "{d4}");
    let d1 = decisions.iter().rev().find(|d| d["tag"] == "t1").unwrap();
    assert_eq!(
        d1["outcome"], "fallback",
        "cola is capped per visit for t1: {d1}"
    );
    let spent: i64 = decisions
        .iter()
        .filter_map(|d| d["cost_minor"].as_i64())
        .sum();
    assert_eq!(spent, 100, "never over the lease");
    for d in &decisions {
        assert!(
            d["candidates"].as_array().is_some_and(|c| !c.is_empty()),
            "{d}"
        );
        assert_eq!(d["scorer"]["name"], "priority");
    }
}
