//! The presence driver over a real log: beacon sightings of a tag walking from one aisle to the
//! next become enter / exit (moved) / enter / exit (timeout) in `presence.events`, committed with
//! the cursor; a malformed sighting is dead-lettered and costs only itself; a restart repeats
//! no event for sightings already read.
#![cfg(feature = "ble")]
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns
mod common;

use common::Harness;
use edge_core::Event;
use edge_core::log::{AppendRequest, Log};
use edge_drivers::DriverConfig;
use serde_json::{Value, json};
use std::time::Duration;

const T: Duration = Duration::from_secs(30);

const CONFIG: &str = r#"
[[drivers]]
type = "presence"
name = "presence"
exit_timeout_ms = 4000
zones = [
  { name = "aisle-1", receivers = ["rx-1"], max_distance_m = 6.0 },
  { name = "aisle-2", receivers = ["rx-2"], max_distance_m = 6.0 },
]
"#;

fn driver() -> DriverConfig {
    #[derive(serde::Deserialize)]
    struct Doc {
        drivers: Vec<DriverConfig>,
    }
    let doc: Doc = toml::from_str(CONFIG).unwrap();
    let mut p = edge_core::config::Problems::new();
    edge_drivers::validate_drivers(&doc.drivers, "drivers", &mut p);
    assert!(p.is_empty(), "{p}");
    doc.drivers.into_iter().next().unwrap()
}

fn rssi_at(d: f64) -> f64 {
    -59.0 - 22.0 * d.log10()
}

fn sighting(rx: &str, d: f64, ts: i64) -> Event {
    Event::new(
        "beacon.sightings",
        serde_json::to_vec(&json!({
            "schema": "beacon.sighting/1", "store": "store-7", "beacon": "trolley-17",
            "receiver": rx, "rssi": rssi_at(d).round() as i64, "tx_power": -59, "ts": ts,
        }))
        .unwrap(),
    )
    .with_event_ts(ts)
}

/// 10 s at 10 Hz, 2 m from rx-1 then 2 m from rx-2 (5 m from the other), ending 20 s ago.
fn walk(from: i64, to: i64, start: i64) -> Vec<Event> {
    (from..to)
        .flat_map(|i| {
            let ts = start + i * 100;
            let (d1, d2) = if i < 50 { (2.0, 5.0) } else { (5.0, 2.0) };
            [sighting("rx-1", d1, ts), sighting("rx-2", d2, ts + 50)]
        })
        .collect()
}

fn kinds(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["kind"].as_str().unwrap_or_default().to_string(),
                e["zone"].as_str().unwrap_or("-").to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_becomes_enter_exit_enter_exit_and_a_restart_repeats_nothing() {
    let h = Harness::new();
    let d = driver();
    // The cursor starts at the head: only sightings from after the start count.
    let task = tokio::spawn(d.build(h.ctx("presence", "presence")).unwrap());
    h.wait_status("presence", T, |s| s.state == edge_core::State::Up)
        .await;
    let start = edge_core::time::now_ms() - 20_000;
    let all = walk(0, 100, start);
    // The first half, then a stop and a restart, then the rest and a bad sighting.
    h.log
        .append(AppendRequest::events(all[..80].to_vec()))
        .await
        .unwrap();
    h.wait_for("presence.events", 1, T).await;
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();

    let h2 = Harness {
        dir: h.dir,
        log: h.log,
        shutdown: edge_core::shutdown::Shutdown::new(),
        status: h.status,
    };
    let task = tokio::spawn(d.build(h2.ctx("presence", "presence")).unwrap());
    let mut rest = all[80..].to_vec();
    rest.insert(3, Event::new("beacon.sightings", b"{\"beacon\":".to_vec()));
    h2.log.append(AppendRequest::events(rest)).await.unwrap();
    // enter aisle-1 (before the restart), then after it: enter aisle-1 again (the engine's
    // state is in memory), exit moved, enter aisle-2, exit timeout.
    h2.wait_for("presence.events", 5, T).await;
    let events = h2.payloads("presence.events").await;
    assert_eq!(
        kinds(&events),
        vec![
            ("enter".into(), "aisle-1".into()),
            ("enter".into(), "aisle-1".into()),
            ("exit".into(), "aisle-1".into()),
            ("enter".into(), "aisle-2".into()),
            ("exit".into(), "aisle-2".into()),
        ],
        "{events:#?}"
    );
    let moved = &events[2];
    assert_eq!(moved["reason"], "moved");
    assert_eq!(moved["tag"], "trolley-17");
    assert_eq!(moved["schema"], "presence.event/1");
    let ts = moved["ts"].as_i64().unwrap();
    assert!(
        ts >= start + 5_000 && ts < start + 9_000,
        "the move is seen within 4 s: {moved}"
    );
    let timeout = &events[4];
    assert_eq!(timeout["reason"], "timeout");
    assert!(timeout["dwell_ms"].as_i64().unwrap() > 2_000, "{timeout}");
    let dl = h2.payloads("deadletter").await;
    assert_eq!(dl.len(), 1, "{dl:?}");
    assert_eq!(dl[0]["reason_label"], "bad_sighting", "{}", dl[0]);
    // Nothing more arrives: the sightings before the restart were not read twice.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(h2.payloads("presence.events").await.len(), 5);
    h2.shutdown.stop_all();
    task.await.unwrap().unwrap();
}
