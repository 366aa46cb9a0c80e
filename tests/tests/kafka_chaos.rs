//! Chaos: four POS lanes publish sales over MQTT to the real agent while poison of several kinds
//! is mixed in and the agent is killed with SIGKILL at random, at least 20 times (issue 12's chaos
//! test). Every good record reaches HQ exactly once, in seq order; every poison record is
//! dead-lettered once, and the ones that were due at HQ are visible there as a gap with their
//! reason.
//!
//! Poison, about one message in 200:
//! * not JSON: dead-lettered at MQTT ingress (`origin: "mqtt"`), never stored in the stream;
//! * a clock 10 minutes ahead, on a topic whose broker refuses more than 1 minute ahead (the agent
//!   is set to trust an hour): stored, refused by Kafka, dead-lettered by the uplink, a gap at HQ;
//! * 200 kB of incompressible text on a topic that takes 100 kB: the same, as `too_large`;
//! * a clock 3 hours ahead: not poison any more: the agent sends the ingest time and keeps the
//!   device's time in `edge.event_ts`.

#![allow(clippy::unwrap_used)] // test code: a failed set-up step should fail the test loudly

use edge_tests::agent::{Agent, event_id_counts, wait_records};
use edge_tests::agent_bin;
use edge_tests::kafka::{
    HqConsumer, check_exactly_once_except, create_topic_with, shared_broker, unique,
};
use edge_tests::mosquitto::Mosquitto;
use edge_tests::publisher::{Message, json_message, spawn_paced_publisher};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

const S: &str = "pos.transactions";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Poison {
    NotJson,
    ClockAheadRefused,
    TooLarge,
    ClockAheadCorrected,
}

fn poison_message(topic: &str, kind: Poison, i: usize) -> Message {
    let now = edge_core::time::now_ms();
    let payload = match kind {
        Poison::NotJson => format!("\u{1}garbage from the lane {i} {{not json"),
        Poison::ClockAheadRefused => serde_json::json!({
            "event_id": format!("poison-ts-{i}"), "i": i, "ts": now + 600_000,
        })
        .to_string(),
        Poison::TooLarge => serde_json::json!({
            "event_id": format!("poison-big-{i}"), "i": i,
            "pad": (0..200_000).map(|_| fastrand::alphanumeric()).collect::<String>(),
        })
        .to_string(),
        Poison::ClockAheadCorrected => serde_json::json!({
            "event_id": format!("wrongclock-{i}"), "i": i, "ts": now + 3 * 3_600_000,
        })
        .to_string(),
    };
    Message {
        topic: topic.to_string(),
        payload: payload.into_bytes().into(),
    }
}

#[test]
fn poison_and_twenty_kills_cost_only_the_poison() {
    let b = shared_broker();
    let mosq = Mosquitto::start();
    let store = unique("store");
    let prefix = unique("t");
    let topic = format!("{prefix}.{S}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(create_topic_with(
        &b.bootstrap(),
        &topic,
        &[
            ("message.timestamp.after.max.ms", "60000"),
            ("max.message.bytes", "100000"),
        ],
    ));
    let cfg = format!(
        r#"[agent]
store_id = "{store}"
data_dir = "{{data_dir}}"
health_interval = "0s"
log_level = "info"

[log]
min_free_disk = "0 B"
integrity_check = "off"

[mqtt]
host = "127.0.0.1"
port = {port}
reconnect_min = "100ms"
reconnect_max = "1s"

[[mqtt.ingress]]
topic = "store/+/pos/{{device}}/transactions"
stream = "pos.transactions"

[http]
listen = "127.0.0.1:{{http_port}}"

[kafka]
brokers = ["{bootstrap}"]
mode = "exactly_once"
topic_template = "{prefix}.{{stream}}"
checkpoint_topic = "{prefix}.__checkpoints"
heartbeat_topic = "{prefix}.heartbeats"
gap_topic = "{prefix}.gaps"
topic_partitions = 1
batch_max_records = 2000
event_time_max_ahead_ms = 3600000

[kafka.downlink]
enabled = false
"#,
        port = mosq.port,
        bootstrap = b.bootstrap()
    );
    let mut agent = Agent::start(agent_bin!(), &cfg);

    // 8,000 good sales from four lanes at 400/s, and 40 poison messages among them.
    let kinds = [
        Poison::NotJson,
        Poison::ClockAheadRefused,
        Poison::TooLarge,
        Poison::ClockAheadCorrected,
    ];
    let (n_good, every) = (8000, 200);
    let mut msgs = Vec::new();
    let mut poison: Vec<(Poison, usize)> = Vec::new();
    for i in 0..n_good {
        let lane = format!("store/{store}/pos/lane-{}/transactions", i % 4);
        if i % every == every / 2 {
            let kind = kinds[(i / every) % kinds.len()];
            msgs.push(poison_message(&lane, kind, i));
            poison.push((kind, i));
        }
        msgs.push(json_message(&lane, &format!("good-{i}"), i, 300));
    }
    let total = msgs.len();
    let (publisher, progress) = spawn_paced_publisher(
        mosq.port,
        "pos-chaos",
        msgs,
        200,
        Duration::from_secs(600),
        Some(400.0),
    );
    let t0 = Instant::now();
    let kills = 20;
    for kill in 0..kills {
        std::thread::sleep(Duration::from_millis(fastrand::u64(100..700)));
        assert!(
            progress.acked() < total,
            "ingest finished before kill {kill} of {kills}; slow the publisher or grow n"
        );
        agent.kill9();
        if fastrand::u8(..4) == 0 {
            std::thread::sleep(Duration::from_millis(fastrand::u64(50..1000)));
        }
        agent.spawn();
    }
    eprintln!(
        "{kills} kills in {:?}; {} of {total} messages acknowledged by then",
        t0.elapsed(),
        progress.acked()
    );
    let report = publisher.join().unwrap();
    assert_eq!(report.acked, total, "the broker acknowledged every message");

    // Every JSON message is stored once, whatever the kills.
    let json_count = n_good + poison.iter().filter(|(k, _)| *k != Poison::NotJson).count();
    wait_records(&agent, S, json_count as u64, Duration::from_secs(180));
    let local = agent.read_stream(S);
    let ids = event_id_counts(&local);
    assert_eq!(local.len(), json_count, "stored once each");
    assert!(ids.values().all(|c| *c == 1), "no id stored twice");
    let seq_of: HashMap<String, u64> = local
        .iter()
        .filter_map(|r| r.event.event_id.clone().map(|id| (id, r.seq)))
        .collect();
    let mut refused: BTreeMap<u64, &str> = BTreeMap::new();
    for (kind, i) in &poison {
        match kind {
            Poison::ClockAheadRefused => {
                refused.insert(seq_of[&format!("poison-ts-{i}")], "invalid_timestamp");
            }
            Poison::TooLarge => {
                refused.insert(seq_of[&format!("poison-big-{i}")], "too_large");
            }
            _ => {}
        }
    }
    let missing: Vec<u64> = refused.keys().copied().collect();

    // HQ: every other record exactly once, in order.
    let gaps_topic = format!("{prefix}.gaps");
    let mut hq = HqConsumer::new(&b.bootstrap(), &[&topic, &gaps_topic], true);
    hq.wait_for_count(&topic, json_count - missing.len(), Duration::from_secs(240));
    hq.poll_for(Duration::from_secs(3));
    let seen = hq.on(&topic);
    check_exactly_once_except(&seen, &store, S, json_count as u64, &missing).unwrap();
    let at_hq: BTreeSet<&str> = seen.iter().map(|m| m.header("edge.event_id")).collect();
    for i in 0..n_good {
        assert!(
            at_hq.contains(format!("good-{i}").as_str()),
            "good-{i} at HQ"
        );
    }
    // The corrected clocks carry the device's time in a header.
    for (kind, i) in &poison {
        if *kind == Poison::ClockAheadCorrected {
            let m = seen
                .iter()
                .find(|m| m.header("edge.event_id") == format!("wrongclock-{i}"))
                .unwrap();
            assert!(!m.header("edge.event_ts").is_empty());
            assert_eq!(
                m.timestamp,
                Some(m.header("edge.ingest_ts").parse::<i64>().unwrap())
            );
        }
    }
    // Each refused record is one gap at HQ, with its reason.
    let mut gaps: BTreeMap<u64, Vec<String>> = BTreeMap::new();
    for g in hq.on(&gaps_topic) {
        if g.header("edge.store") != store {
            continue;
        }
        let v: serde_json::Value = serde_json::from_slice(&g.payload).unwrap();
        if v["stream"] == S {
            gaps.entry(v["first_seq"].as_u64().unwrap())
                .or_default()
                .push(v["reason"].as_str().unwrap_or("").to_string());
        }
    }
    assert_eq!(
        gaps.keys().copied().collect::<Vec<_>>(),
        missing,
        "one gap per refused record"
    );
    for (seq, label) in &refused {
        assert_eq!(gaps[seq].len(), 1, "seq {seq}: {:?}", gaps[seq]);
        assert!(gaps[seq][0].contains(label), "seq {seq}: {:?}", gaps[seq]);
    }
    // Each poison record is dead-lettered once: by the uplink (refused) or by MQTT ingress (not
    // JSON), however often a kill made the broker redeliver it or the uplink meet it again.
    let letters: Vec<serde_json::Value> = agent
        .read_stream("deadletter")
        .iter()
        .map(|r| serde_json::from_slice(&r.event.payload).unwrap())
        .collect();
    let mut uplink_seqs: Vec<u64> = letters
        .iter()
        .filter(|v| v["origin"] == "uplink")
        .map(|v| v["seq"].as_u64().unwrap())
        .collect();
    uplink_seqs.sort();
    assert_eq!(
        uplink_seqs, missing,
        "each refused record dead-lettered once"
    );
    let not_json = poison.iter().filter(|(k, _)| *k == Poison::NotJson).count();
    let mqtt_letters = letters.iter().filter(|v| v["origin"] == "mqtt").count();
    assert_eq!(
        mqtt_letters, not_json,
        "each malformed message dead-lettered once"
    );
    assert_eq!(agent.starts(), kills as u32 + 1);
    eprintln!(
        "chaos: {total} messages, {} good at HQ once each, {} refused (gaps + dead letters), {not_json} malformed dead-lettered, {kills} kills",
        seen.len(),
        missing.len()
    );
}
