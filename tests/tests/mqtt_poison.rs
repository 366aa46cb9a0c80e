//! One bad record costs one record on the MQTT paths (PRODUCT.md guarantee 6), against a real
//! Mosquitto: an egress record whose key gives no valid topic, and an ingress message the local
//! log refuses.

#![allow(clippy::unwrap_used)] // test code: a failed set-up step should fail the test loudly

use edge_core::Event;
use edge_core::log::{AppendRequest, Log};
use edge_sync::log::SqliteLog;
use edge_tests::agent::{Agent, wait_records};
use edge_tests::kafka::test_log_config;
use edge_tests::mosquitto::Mosquitto;
use edge_tests::{agent_bin, wait_for};
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

fn backlog(agent: &Agent, stream: &str, cursor: &str) -> serde_json::Value {
    let st = agent.status();
    st["streams"]
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == stream))
        .map(|s| s["cursors"][cursor]["backlog"].clone())
        .unwrap_or(serde_json::Value::Null)
}

/// Appends records while the agent is stopped (the log is the agent's, opened as it opens it).
fn append(agent: &Agent, events: Vec<Event>) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let log = SqliteLog::open(&agent.data_dir(), test_log_config()).unwrap();
        log.append(AppendRequest::events(events)).await.unwrap();
        log.close().await.unwrap();
    });
}

fn price(key: &str, id: &str) -> Event {
    Event::new(
        "hq.prices",
        format!(r#"{{"event_id":"{id}","price_minor":59}}"#).into_bytes(),
    )
    .with_key(key)
    .with_event_id(id)
    .with_schema("hq.price/1")
}

/// HQ's price with key `<store>/promo+42` sits between two good prices. The good price after it
/// reaches the kiosk, the bad one is in `deadletter` with its reason, another egress rule and
/// ingress keep working, and the MQTT component stays up.
#[test]
fn a_price_whose_key_is_no_valid_topic_is_dead_lettered_and_egress_moves_on() {
    let broker = Mosquitto::start();
    let extra = r#"
[[mqtt.ingress]]
topic = "pos/{device}/transactions"
stream = "pos.transactions"

[[mqtt.egress]]
stream = "hq.prices"
topic = "store/{store}/prices/{key}"

[[mqtt.egress]]
stream = "offers.decisions"
topic = "store/{store}/offers/{key}"
"#;
    let mut agent = Agent::start_with(agent_bin!(), broker.port, extra);
    let (st, _) = agent.sigterm();
    assert!(st.success());
    append(
        &agent,
        vec![
            price("test-store/4011", "p1"),
            price("test-store/promo+42", "p2"),
            price("test-store/3000", "p3"),
            Event::new("offers.decisions", &br#"{"offer":"o1"}"#[..]).with_key("zone-7"),
        ],
    );
    // A kiosk subscribed before egress runs sees every publish.
    let kiosk = Command::new("mosquitto_sub")
        .args(["-p", &broker.port.to_string(), "-q", "1", "-i", "kiosk-1"])
        .args(["-t", "store/#", "-v", "-C", "3", "-W", "30"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("kiosk subscribed", Duration::from_secs(10), || {
        broker.log().contains("as kiosk-1")
    });
    agent.spawn();
    let out = kiosk.wait_with_output().unwrap();
    let mut seen: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    seen.sort();
    assert_eq!(
        seen,
        vec![
            r#"store/test-store/offers/zone-7 {"offer":"o1"}"#.to_string(),
            r#"store/test-store/prices/test-store/3000 {"event_id":"p3","price_minor":59}"#
                .to_string(),
            r#"store/test-store/prices/test-store/4011 {"event_id":"p1","price_minor":59}"#
                .to_string(),
        ],
        "the good prices and the other rule's offer reach the kiosk; agent log:\n{}",
        agent.log()
    );
    wait_for(
        "price egress cursor at the head",
        Duration::from_secs(20),
        || backlog(&agent, "hq.prices", "mqtt.egress.hq.prices") == 0,
    );
    wait_records(&agent, "deadletter", 1, Duration::from_secs(10));
    let dead = agent.read_stream("deadletter");
    assert_eq!(dead.len(), 1, "the bad price is dead-lettered once");
    let d: serde_json::Value = serde_json::from_slice(&dead[0].event.payload).unwrap();
    assert_eq!(d["origin"], "mqtt_egress");
    assert_eq!(d["stream"], "hq.prices");
    assert_eq!(d["seq"], 2);
    assert_eq!(d["key"], "test-store/promo+42");
    assert_eq!(d["problem"], "topic_wildcard");
    let reason = d["reason"].as_str().unwrap();
    assert!(
        reason.contains("promo+42") && reason.contains("wildcard"),
        "the reason names the value and the problem: {reason}"
    );
    assert_eq!(
        agent.metric(r#"edge_mqtt_egress_deadletters_total{reason="topic_wildcard"}"#),
        1.0
    );
    assert_eq!(agent.metric("edge_mqtt_egress_errors_total"), 0.0);
    // Ingress is unaffected and the component is up, not degraded.
    let st = Command::new("mosquitto_pub")
        .args(["-p", &broker.port.to_string(), "-q", "1"])
        .args([
            "-t",
            "pos/lane-1/transactions",
            "-m",
            r#"{"event_id":"t1"}"#,
        ])
        .status()
        .unwrap();
    assert!(st.success());
    wait_records(&agent, "pos.transactions", 1, Duration::from_secs(20));
    assert_eq!(agent.status()["components"]["mqtt"]["state"], "up");
    assert!(!agent.log().contains("Failed to send mqtt requests"));
}

/// A message the local log refuses while writing it is dead-lettered alone, counted as
/// `log_refused` (not `no_rule`), and the messages around it, which shared its log request, are
/// stored. The refusal is injected with a trigger on the agent's database: no real message can
/// make this log refuse a record today, but the agent must not depend on that.
#[test]
fn a_message_the_log_refuses_is_dead_lettered_alone_as_log_refused() {
    let broker = Mosquitto::start();
    let extra = r#"
[[mqtt.ingress]]
topic = "pos/{device}/transactions"
stream = "pos.transactions"
"#;
    // The first start creates the agent's persistent session with its subscription.
    let mut agent = Agent::start_with(agent_bin!(), broker.port, extra);
    wait_for("subscribed", Duration::from_secs(20), || {
        agent.status()["components"]["mqtt"]["state"] == "up"
    });
    let (st, _) = agent.sigterm();
    assert!(st.success());
    let poison = r#"{"event_id":"t100","poison":true}"#;
    let conn = rusqlite::Connection::open(agent.data_dir().join("log.db")).unwrap();
    let hex: String = poison.bytes().map(|b| format!("{b:02x}")).collect();
    conn.execute_batch(&format!(
        "CREATE TRIGGER refuse_in_commit BEFORE INSERT ON records WHEN NEW.payload = X'{hex}'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    ))
    .unwrap();
    drop(conn);
    // While the agent is away the broker queues the messages for its session; at the resume
    // they arrive in one burst, so the processor puts many of them into one log request.
    let mut publisher = Command::new("mosquitto_pub")
        .args(["-p", &broker.port.to_string(), "-q", "1"])
        .args(["-t", "pos/lane-1/transactions", "-l"])
        .stdin(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = publisher.stdin.take().unwrap();
    for i in 0..200 {
        if i == 100 {
            writeln!(stdin, "{poison}").unwrap();
        } else {
            writeln!(stdin, r#"{{"event_id":"t{i}"}}"#).unwrap();
        }
    }
    drop(stdin);
    assert!(publisher.wait().unwrap().success());
    agent.spawn();
    wait_records(&agent, "pos.transactions", 199, Duration::from_secs(20));
    wait_records(&agent, "deadletter", 1, Duration::from_secs(20));
    let ids: std::collections::BTreeSet<String> = agent
        .read_stream("pos.transactions")
        .iter()
        .filter_map(|r| r.event.event_id.clone())
        .collect();
    let want: std::collections::BTreeSet<String> = (0..200)
        .filter(|i| *i != 100)
        .map(|i| format!("t{i}"))
        .collect();
    assert_eq!(ids, want, "every good message is stored");
    let dead = agent.read_stream("deadletter");
    assert_eq!(dead.len(), 1, "only the refused message is a dead letter");
    let d: serde_json::Value = serde_json::from_slice(&dead[0].event.payload).unwrap();
    assert!(
        d["reason"]
            .as_str()
            .unwrap()
            .contains("the local log refused the record"),
        "{d}"
    );
    wait_for("counted", Duration::from_secs(10), || {
        agent.metric(r#"edge_mqtt_deadletters_total{reason="log_refused"}"#) == 1.0
    });
    assert_eq!(
        agent.metric(r#"edge_mqtt_deadletters_total{reason="no_rule"}"#),
        0.0
    );
    assert_eq!(agent.metric("edge_mqtt_ingested_total"), 199.0);
}
