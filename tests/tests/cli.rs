//! The operator CLI against the real binary: check-config names every problem, status and log
//! export read a running or stopped agent.

#![allow(clippy::unwrap_used)] // test code: a failed set-up step should fail the test loudly

use edge_tests::agent::{Agent, wait_records};
use edge_tests::agent_bin;
use edge_tests::mosquitto::Mosquitto;
use edge_tests::publisher::{json_message, spawn_publisher};
use std::process::Command;
use std::time::Duration;

#[test]
fn check_config_names_every_problem_and_exits_2() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        r#"
[agent]
store_id = "store #12"
[log]
commit_window_ms = 5000
disk_budget = "10 KiB"
[mqtt]
port = 0
session_expiry = "0s"
[[mqtt.ingress]]
topic = "a/#/b"
stream = "POS"
[[drivers]]
type = "simulated"
name = "x"
[[drivers]]
type = "simulated"
name = "x"
"#,
    )
    .unwrap();
    let out = Command::new(agent_bin!())
        .arg("check-config")
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for path in [
        "agent.store_id:",
        "log.commit_window_ms:",
        "log.disk_budget:",
        "mqtt.port:",
        "mqtt.session_expiry:",
        "mqtt.ingress[0].topic:",
        "mqtt.ingress[0].stream:",
        "drivers[1].name:",
    ] {
        assert!(err.contains(path), "missing {path} in:\n{err}");
    }
    assert!(err.contains("8 problem(s)"), "{err}");
    let typo = dir.path().join("typo.toml");
    std::fs::write(&typo, "[agent]\nstore_idd = \"x\"\n").unwrap();
    let out = Command::new(agent_bin!())
        .arg("check-config")
        .arg(&typo)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown field `store_idd`"));
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/edge-agent.example.toml");
    let out = Command::new(agent_bin!())
        .arg("check-config")
        .arg(&example)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The summary says what will run: the example has no [kafka] and no [offers]; the demo
    // turns the offers engine on.
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        summary.contains("no Kafka (offline buffering), offers off)"),
        "{summary}"
    );
    let demo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/demo.toml");
    let out = Command::new(agent_bin!())
        .arg("check-config")
        .arg(&demo)
        .output()
        .unwrap();
    let summary = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(summary.contains(", offers on for "), "{summary}");
}

#[test]
fn status_and_export_work_with_and_without_the_daemon() {
    let broker = Mosquitto::start();
    let mut agent = Agent::start_with(
        agent_bin!(),
        broker.port,
        "[[mqtt.ingress]]\ntopic = \"store/+/pos/{device}/transactions\"\nstream = \"pos.transactions\"\n",
    );
    let msgs: Vec<_> = (0..50)
        .map(|i| {
            json_message(
                "store/test-store/pos/lane-2/transactions",
                &format!("c-{i}"),
                i,
                200,
            )
        })
        .collect();
    spawn_publisher(broker.port, "pos", msgs, 50, Duration::from_secs(30))
        .0
        .join()
        .unwrap();
    wait_records(&agent, "pos.transactions", 50, Duration::from_secs(20));

    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["daemon_running"], true);
    assert_eq!(s["components"]["mqtt"]["state"], "up");
    let tx = s["streams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["name"] == "pos.transactions")
        .unwrap();
    assert_eq!(tx["next_seq"], 51);
    assert_eq!(tx["priority"], "protected");
    let human = String::from_utf8_lossy(&agent.cli(&["status"]).stdout).to_string();
    assert!(
        human.contains("pos.transactions") && human.contains("mqtt"),
        "{human}"
    );

    let (st, _) = agent.sigterm();
    assert!(st.success());
    let out = agent.cli(&["status", "--json"]);
    assert!(out.status.success());
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        s["daemon_running"], false,
        "read from the database when the daemon is down"
    );
    assert_eq!(s["streams"][0]["records"], 50);

    let out = agent.cli(&[
        "log",
        "export",
        "--stream",
        "pos.transactions",
        "--from-seq",
        "11",
        "--to-seq",
        "20",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 10);
    assert_eq!(lines[0]["seq"], 11);
    assert_eq!(lines[9]["seq"], 20);
    assert_eq!(lines[0]["payload"]["event_id"], "c-10");
    assert_eq!(lines[0]["key"], "lane-2");
    let out = agent.cli(&["log", "tail", "--stream", "nope"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no stream named \"nope\""));
}
