//! The beacons driver replaying a btmon capture written by the seeded store simulator: a
//! store-owned tag walking from the first aisle to the last becomes aggregated
//! `beacon.sightings` and then enter events in the first and the last aisle in
//! `presence.events`; a foreign beacon and a phone in the same capture are dropped at ingest,
//! counted by reason, and no device address reaches any record.
#![cfg(feature = "ble")]
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns
mod common;

use common::Harness;
use edge_drivers::DriverConfig;
use edge_drivers::ble::beacon::{Beacon, IBeacon};
use edge_drivers::ble::sim::{Path, Store, write_capture};
use edge_drivers::ble::source::parse_uuid;
use std::time::Duration;

const T: Duration = Duration::from_secs(60);
const OURS: &str = "f7826da6-4fa2-4e98-8024-bc5b71e0893e";
const FOREIGN: &str = "e2c56db5-dffb-48d2-b060-d0f5a71096e0";

fn drivers(config: &str) -> Vec<DriverConfig> {
    #[derive(serde::Deserialize)]
    struct Doc {
        drivers: Vec<DriverConfig>,
    }
    let doc: Doc = toml::from_str(config).unwrap();
    let mut p = edge_core::config::Problems::new();
    edge_drivers::validate_drivers(&doc.drivers, "drivers", &mut p);
    assert!(p.is_empty(), "{p}");
    doc.drivers
}

fn ibeacon(uuid: &str, minor: u16) -> Vec<u8> {
    Beacon::IBeacon(IBeacon {
        uuid: parse_uuid(uuid).unwrap(),
        major: 1,
        minor,
        measured_power: -59,
    })
    .to_advertising_data()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_capture_walks_a_tag_through_the_aisles_and_foreign_devices_are_dropped() {
    let h = Harness::new();
    let store = Store::default();
    let w = store.zone_width_m;
    // Our tag: 15 s in aisle 0, a walk to aisle 3, 15 s there, then it leaves.
    let walk = Path {
        waypoints: vec![
            (0.0, w / 2.0),
            (15.0, w / 2.0),
            (30.0, 3.5 * w),
            (45.0, 3.5 * w),
        ],
        leaves: true,
    };
    let capture = h.dir.path().join("walk.btsnoop");
    let file = std::fs::File::create(&capture).unwrap();
    let phone = vec![0x02, 0x01, 0x1a, 0x05, 0x09, b'P', b'i', b'x', b'l'];
    let written = write_capture(
        &store,
        &[
            (ibeacon(OURS, 17), walk),
            (ibeacon(FOREIGN, 3), Path::still(w, 45.0)),
            (phone, Path::still(2.0 * w, 45.0)),
        ],
        7,
        edge_core::time::now_ms() - 60_000,
        std::io::BufWriter::new(file),
    )
    .unwrap();
    assert!(written > 3_000, "{written} reports");
    let zones: Vec<String> = store
        .zone_configs()
        .iter()
        .map(|z| {
            format!(
                "{{ name = \"{}\", receivers = [\"{}\"], max_distance_m = {} }}",
                z.name, z.receivers[0], z.max_distance_m
            )
        })
        .collect();
    // Five times real speed: the 45 s walk takes 9 s; the replayed times are now.
    let config = format!(
        r#"
[[drivers]]
type = "presence"
name = "presence"
window_ms = 1000
exit_timeout_ms = 3000
zones = [{}]

[[drivers]]
type = "beacons"
name = "replay"
window_ms = 200
[drivers.allow]
ibeacon_uuids = ["{OURS}"]
[drivers.source]
kind = "replay"
path = "{}"
speed = 5.0
adapters = ["rx-0", "rx-1", "rx-2", "rx-3"]
"#,
        zones.join(", "),
        capture.display()
    );
    let d = drivers(&config);
    let presence = tokio::spawn(d[0].build(h.ctx("presence", "presence")).unwrap());
    h.wait_status("presence", T, |s| s.state == edge_core::State::Up)
        .await;
    let beacons = tokio::spawn(d[1].build(h.ctx("replay", "beacons")).unwrap());
    // The replay ends after about 9 s; its driver then stops on its own.
    tokio::time::timeout(T, beacons)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    // The exit of the last aisle comes by timeout.
    h.wait_status("presence", T, |s| {
        s.fields.get("tags").is_some_and(|t| t == 0)
    })
    .await;

    let sightings = h.payloads("beacon.sightings").await;
    assert!(!sightings.is_empty());
    let tag = format!("ibeacon:{OURS}:1:17");
    assert!(
        sightings.iter().all(|s| s["beacon"] == tag),
        "only our tag is kept"
    );
    // Aggregated: about 5 records a second (200 ms windows) for 45 s of capture, each with
    // several receivers' medians, instead of some 40 advertisements a second.
    assert!(
        sightings.len() < 300,
        "{} records for {written} reports",
        sightings.len()
    );
    assert!(
        sightings
            .iter()
            .any(|s| s["receivers"].as_array().unwrap().len() >= 2)
    );
    let events = h.payloads("presence.events").await;
    let enters: Vec<&str> = events
        .iter()
        .filter(|e| e["kind"] == "enter")
        .filter_map(|e| e["zone"].as_str())
        .collect();
    assert_eq!(enters.first(), Some(&"zone-0"), "{events:#?}");
    assert_eq!(enters.last(), Some(&"zone-3"), "{events:#?}");
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "exit" && e["zone"] == "zone-3"),
        "{events:#?}"
    );
    // The foreign beacon and the phone were dropped by reason, and no address is anywhere.
    let st = h.status.get("replay").unwrap();
    let dropped = &st.fields["dropped"];
    assert!(dropped["not_allowed"].as_u64().unwrap() > 500, "{dropped}");
    assert!(dropped["no_beacon"].as_u64().unwrap() > 500, "{dropped}");
    assert!(
        st.fields["sightings_total"].as_u64().unwrap() > 1_000,
        "{st:?}"
    );
    for stream in [
        "beacon.sightings",
        "presence.events",
        "deadletter",
        "agent.health",
    ] {
        for r in h.records(stream).await {
            let text = String::from_utf8_lossy(&r.event.payload).to_lowercase();
            assert!(
                !text.contains("c0:ff:ee") && !text.contains("c0ffee") && !text.contains(FOREIGN),
                "{stream}: {text}"
            );
        }
    }
    h.shutdown.stop_all();
    presence.await.unwrap().unwrap();
}

/// The simulator's two capture formats replay to the same sightings, byte for byte: the btmon
/// file (adapter index = receiver) and the JSONL of `beacon.receiver/1` messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_btsnoop_and_jsonl_captures_of_one_walk_replay_the_same_sightings() {
    use edge_drivers::ble::replay::{Replay, ReplayConfig, Timestamps};
    use edge_drivers::ble::sim::write_capture_jsonl;
    use edge_drivers::ble::source::{Drops, SightingSource};
    let dir = tempfile::tempdir().unwrap();
    let store = Store::default();
    let tags = [
        (ibeacon(OURS, 1), Path::still(3.0, 5.0)),
        (ibeacon(OURS, 2), Path::still(15.0, 5.0)),
    ];
    let start = 1_795_000_000_000;
    let bin = dir.path().join("walk.btsnoop");
    let jsonl = dir.path().join("walk.jsonl");
    let n1 = write_capture(
        &store,
        &tags,
        9,
        start,
        std::fs::File::create(&bin).unwrap(),
    )
    .unwrap();
    let n2 = write_capture_jsonl(
        &store,
        &tags,
        9,
        start,
        std::fs::File::create(&jsonl).unwrap(),
    )
    .unwrap();
    assert_eq!(n1, n2);
    let status = edge_core::status::Status::new().register("replay", "beacons");
    let mut replayed = Vec::new();
    for path in [bin, jsonl] {
        let cfg = ReplayConfig {
            path,
            format: Default::default(),
            speed: 0.0,
            repeat: false,
            adapters: (0..4).map(|r| format!("rx-{r}")).collect(),
            timestamps: Timestamps::Original,
        };
        let mut src = Replay::start(&cfg, "replay");
        let mut drops = Drops::default();
        let mut all = Vec::new();
        while let Some(v) = src.next(&status, &mut drops).await {
            all.extend(v);
        }
        assert_eq!(drops.total(), 0, "{drops:?}");
        replayed.push(all);
    }
    assert_eq!(replayed[0].len() as u64, n1);
    assert_eq!(replayed[0], replayed[1]);
    assert_eq!(replayed[0][0].ts_ms, start);
}

/// A broker that hangs up is retried with a growing backoff even though the driver's window timer
/// cancels `next` every few tens of milliseconds (the connection has its own task).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_receivers_broker_backs_off_while_next_is_cancelled() {
    use edge_drivers::ble::mqtt_source::{MqttSource, MqttSourceConfig};
    use edge_drivers::ble::source::{Drops, SightingSource};
    // A "broker" that hangs up at once, counting the attempts.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let attempts = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let a = attempts.clone();
    std::thread::spawn(move || {
        for c in listener.incoming() {
            a.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            drop(c);
        }
    });
    let cfg: MqttSourceConfig = toml::from_str(&format!("port = {port}")).unwrap();
    let mut src = MqttSource::new(&cfg, "backoff-test").unwrap();
    let registry = edge_core::status::Status::new();
    let status = registry.register("receivers", "beacons");
    let mut drops = Drops::default();
    let t0 = std::time::Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        let _ =
            tokio::time::timeout(Duration::from_millis(50), src.next(&status, &mut drops)).await;
    }
    let st = registry.get("receivers").unwrap();
    assert_eq!(st.state, edge_core::State::Down, "{st:?}");
    let retry = st.fields["retry_in_ms"].as_u64().unwrap();
    assert!(retry >= 400, "the backoff grew: {retry} ms");
    // 200 ms doubling: about 5 attempts in 4 s; without its own task about 80.
    let n = attempts.load(std::sync::atomic::Ordering::Relaxed);
    assert!((2..=12).contains(&n), "{n} connection attempts in 4 s");
}
