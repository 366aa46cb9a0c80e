//! Faults of the local log seen from outside: the disk budget under real MQTT traffic, and a record
//! damaged on disk (by the independent `sqlite3` tool) while the agent was stopped.

#![allow(clippy::unwrap_used)] // test code: a failed set-up step should fail the test loudly

use edge_tests::agent::{Agent, wait_records};
use edge_tests::mosquitto::Mosquitto;
use edge_tests::publisher::{json_message, spawn_publisher};
use edge_tests::{agent_bin, require_program, wait_for};
use std::process::{Command, Stdio};
use std::time::Duration;

#[test]
fn disk_budget_evicts_low_priority_with_gaps_and_never_protected() {
    let broker = Mosquitto::start();
    let extra = r#"
[log]
disk_budget = "2 MiB"
min_free_disk = "0 B"
integrity_check = "off"

[[mqtt.ingress]]
topic = "store/+/pos/{device}/transactions"
stream = "pos.transactions"

[[mqtt.ingress]]
topic = "store/+/beacons/{device}"
stream = "beacon.sightings"
"#;
    // base_config already has a [log] table; merge by replacing it.
    let cfg = edge_tests::agent::base_config(std::path::Path::new("{data_dir}"), broker.port, 0)
        .replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:{http_port}\"",
        )
        .replace(
            "[log]\nmin_free_disk = \"0 B\"\nintegrity_check = \"off\"\n",
            "",
        );
    let agent = Agent::start(agent_bin!(), &format!("{cfg}\n{extra}"));
    // 600 protected transactions (~0.6 MB), then 3000 low-priority sightings (~3 MB).
    let tx: Vec<_> = (0..600)
        .map(|i| {
            json_message(
                "store/test-store/pos/lane-1/transactions",
                &format!("tx-{i}"),
                i,
                1000,
            )
        })
        .collect();
    let (p, _) = spawn_publisher(broker.port, "pos", tx, 200, Duration::from_secs(60));
    p.join().unwrap();
    wait_records(&agent, "pos.transactions", 600, Duration::from_secs(30));
    let sightings: Vec<_> = (0..3000)
        .map(|i| json_message("store/test-store/beacons/rx-1", &format!("s-{i}"), i, 1000))
        .collect();
    let (p, _) = spawn_publisher(
        broker.port,
        "beacons",
        sightings,
        200,
        Duration::from_secs(60),
    );
    p.join().unwrap();
    wait_for("all sightings processed", Duration::from_secs(30), || {
        agent.metric("edge_mqtt_ingested_total{stream=\"beacon.sightings\"}") >= 3000.0
    });
    // Eviction runs right after each commit (the budget may be exceeded by one commit batch for
    // a moment): wait for it rather than race it.
    wait_for(
        "the log is back within its budget",
        Duration::from_secs(20),
        || agent.status()["log"]["used_bytes"].as_u64().unwrap() <= 2 * 1024 * 1024,
    );
    let status = agent.status();
    let log = &status["log"];
    assert_eq!(log["full"], false);
    let txs = agent.read_stream("pos.transactions");
    assert_eq!(txs.len(), 600, "no protected record evicted");
    let low = agent.read_stream("beacon.sightings");
    assert!(
        low.len() < 3000,
        "low-priority sightings were evicted ({} left)",
        low.len()
    );
    assert!(!low.is_empty(), "the newest sightings are kept");
    let first = low[0].seq;
    let evicted =
        agent.metric("edge_log_evicted_total{stream=\"beacon.sightings\",mirrored=\"false\"}");
    assert_eq!(evicted as u64, first - 1, "every evicted record is counted");
    assert!(
        log["gaps"].as_u64().unwrap() >= 1,
        "the eviction left gap markers for HQ"
    );
}

#[test]
fn protected_records_pause_intake_instead_of_being_evicted() {
    let broker = Mosquitto::start();
    let cfg = edge_tests::agent::base_config(std::path::Path::new("{data_dir}"), broker.port, 0)
        .replace(
            "listen = \"127.0.0.1:0\"",
            "listen = \"127.0.0.1:{http_port}\"",
        )
        .replace(
            "min_free_disk = \"0 B\"",
            "min_free_disk = \"0 B\"\ndisk_budget = \"1 MiB\"",
        );
    let agent = Agent::start(
        agent_bin!(),
        &format!(
            "{cfg}\n[[mqtt.ingress]]\ntopic = \"store/+/pos/{{device}}/transactions\"\nstream = \"pos.transactions\"\n"
        ),
    );
    let tx: Vec<_> = (0..2500)
        .map(|i| {
            json_message(
                "store/test-store/pos/lane-1/transactions",
                &format!("tx-{i}"),
                i,
                1000,
            )
        })
        .collect();
    let (p, _) = spawn_publisher(broker.port, "pos", tx, 200, Duration::from_secs(60));
    // The broker takes every message (it queues for the agent's session)...
    p.join().unwrap();
    // ...while the agent stops acking once the budget is full of unmirrored protected records.
    wait_for("the log reports full", Duration::from_secs(30), || {
        agent.status()["log"]["full"] == true
    });
    wait_for("mqtt reports degraded", Duration::from_secs(30), || {
        agent.status()["components"]["mqtt"]["state"] == "degraded"
    });
    let stored = agent.read_stream("pos.transactions");
    assert!(stored.len() < 2500);
    assert_eq!(stored[0].seq, 1, "nothing was evicted");
    assert_eq!(
        stored.len() as u64,
        stored.last().unwrap().seq,
        "dense, no holes"
    );
    assert_eq!(agent.status()["log"]["gaps"], 0, "no gap: nothing was lost");
    assert!(agent.metric("edge_log_appends_refused_total") > 0.0);
}

#[test]
fn damaged_record_is_dead_lettered_and_the_stream_moves_on() {
    let sqlite3 = require_program("sqlite3", "sqlite3");
    let broker = Mosquitto::start();
    let ingress = r#"
[[mqtt.ingress]]
topic = "store/+/pos/{device}/transactions"
stream = "pos.transactions"
"#;
    let mut agent = Agent::start_with(agent_bin!(), broker.port, ingress);
    let msgs: Vec<_> = (0..20)
        .map(|i| {
            json_message(
                "store/test-store/pos/lane-1/transactions",
                &format!("d-{i}"),
                i,
                200,
            )
        })
        .collect();
    let (p, _) = spawn_publisher(broker.port, "pos", msgs, 20, Duration::from_secs(30));
    p.join().unwrap();
    wait_records(&agent, "pos.transactions", 20, Duration::from_secs(20));
    let (st, _) = agent.sigterm();
    assert!(st.success());
    // Bit rot in record #7, written by an independent tool.
    let db = agent.data_dir().join("log.db");
    let out = Command::new(&sqlite3)
        .arg(&db)
        .arg("UPDATE records SET payload = CAST('bit rot' AS BLOB) WHERE id = (((SELECT id FROM streams WHERE name = 'pos.transactions') << 44) | 7);")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Restart with an egress rule that reads the stream from the start; a subscriber counts.
    let config = std::fs::read_to_string(&agent.config).unwrap();
    std::fs::write(
        &agent.config,
        format!("{config}\n[[mqtt.egress]]\nstream = \"pos.transactions\"\ntopic = \"mirror/{{store}}/{{key}}\"\nstart_at = \"earliest\"\n"),
    )
    .unwrap();
    let sub = Command::new("mosquitto_sub")
        .args([
            "-p",
            &broker.port.to_string(),
            "-q",
            "1",
            "-t",
            "mirror/#",
            "-C",
            "19",
            "-W",
            "30",
            "-v",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("subscriber connected", Duration::from_secs(10), || {
        broker.log().matches("New client connected").count() >= 3
    });
    agent.spawn();
    let out = sub.wait_with_output().unwrap();
    let lines = String::from_utf8_lossy(&out.stdout).lines().count();
    assert_eq!(
        lines, 19,
        "egress delivered every intact record and skipped the damaged one"
    );
    wait_records(&agent, "deadletter", 1, Duration::from_secs(20));
    let dl: serde_json::Value =
        serde_json::from_slice(&agent.read_stream("deadletter")[0].event.payload).unwrap();
    assert_eq!(dl["stream"], "pos.transactions");
    assert_eq!(dl["seq"], 7);
    assert!(
        dl["reason"].as_str().unwrap().contains("CRC mismatch"),
        "{dl}"
    );
    assert_eq!(
        dl["original_b64"], "Yml0IHJvdA==",
        "the damaged bytes are kept for forensics"
    );
    assert_eq!(
        agent.status()["log"]["gaps"],
        1,
        "the hole is a recorded gap"
    );
    let ids: Vec<u64> = agent
        .read_stream("pos.transactions")
        .iter()
        .map(|r| r.seq)
        .collect();
    assert_eq!(ids.len(), 19);
    assert!(!ids.contains(&7));
}
