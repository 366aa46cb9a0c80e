//! The beacon pipeline under a store's full load, through a real log:
//! `cargo run --release -p edge-drivers --example presence_pipeline [seconds]` (default 30).
//!
//! 500 tags x 8 receivers at 10 Hz (40,000 advertisements/s) are generated in real time as AD
//! bytes, go through the `beacons` driver's ingest (identification, allow-list, aggregation into
//! 1 s windows) on this thread, and the closed windows are appended to a SQLite log
//! (`synchronous = full`) where the real presence driver reads them from its cursor. Each tag
//! moves to the next receiver's zone every 20 s (staggered), so enters and exits flow all the
//! time. Measured:
//! * ingest CPU per advertisement (this thread's time in the aggregator), as advertisements/s
//!   per core;
//! * sighting -> `presence.events` committed: for every event caused by a sighting record, its
//!   commit time minus the commit time of that record (ms clock of the log), p50/p99/max;
//! * the process's peak RSS, and the engine's tag count (bounded by `max_tags`).
//!
//! Prints a Markdown table for docs/BENCHMARKS.md ("Beacon pipeline").
#![allow(clippy::unwrap_used, clippy::expect_used)]

use edge_core::component::ComponentContext;
use edge_core::log::{AppendRequest, Log, ReadLimits};
use edge_core::status::Status;
use edge_drivers::DriverConfig;
use edge_drivers::ble::beacon::{Beacon, IBeacon};
use edge_drivers::ble::beacons::{Aggregator, BeaconsConfig, Closed};
use edge_drivers::ble::source::{Drops, Heard, RawSighting, parse_uuid};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

const TAGS: u16 = 500;
const RECEIVERS: usize = 8;
const HZ: u64 = 10;
const UUID: &str = "f7826da6-4fa2-4e98-8024-bc5b71e0893e";

fn peak_rss_mb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

fn pct(v: &mut [i64], p: f64) -> i64 {
    v.sort_unstable();
    if v.is_empty() {
        return -1;
    }
    v[((v.len() - 1) as f64 * p / 100.0).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let log = Arc::new(
        edge_sync::log::SqliteLog::open(dir.path(), edge_sync::log::LogConfig::default()).unwrap(),
    );
    let zones: Vec<String> = (0..RECEIVERS)
        .map(|r| {
            format!("{{ name = \"zone-{r}\", receivers = [\"rx-{r}\"], max_distance_m = 4.0 }}")
        })
        .collect();
    let presence: DriverConfig = toml::from_str(&format!(
        "type = \"presence\"\nname = \"presence\"\nzones = [{}]\n",
        zones.join(", ")
    ))
    .unwrap();
    let beacons: BeaconsConfig = toml::from_str(&format!(
        "name = \"beacons\"\nwindow_ms = 1000\n[source]\nkind = \"replay\"\npath = \"-\"\n[allow]\nibeacon_uuids = [\"{UUID}\"]\n"
    ))
    .unwrap();
    let status = Status::new();
    let shutdown = edge_core::shutdown::Shutdown::new();
    let ctx = ComponentContext::for_test(log.clone(), "presence")
        .with_shutdown(&shutdown)
        .with_status(&status, "presence");
    let task = tokio::spawn(presence.build(ctx).unwrap());
    while status.get("presence").map(|s| s.state) != Some(edge_core::State::Up) {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let advs: Vec<Vec<u8>> = (0..TAGS)
        .map(|minor| {
            Beacon::IBeacon(IBeacon {
                uuid: parse_uuid(UUID).unwrap(),
                major: 1,
                minor,
                measured_power: -59,
            })
            .to_advertising_data()
            .unwrap()
        })
        .collect();
    let receivers: Vec<String> = (0..RECEIVERS).map(|r| format!("rx-{r}")).collect();
    let mut agg = Aggregator::new(&beacons);
    let mut drops = Drops::default();
    let mut rng = fastrand::Rng::with_seed(3);
    let mut ingest_cpu = Duration::ZERO;
    let mut adverts = 0u64;
    let mut records = 0u64;
    let t0 = Instant::now();
    let start_ms = edge_core::time::now_ms();
    let mut tick = tokio::time::interval(Duration::from_millis(1000 / HZ));
    while t0.elapsed() < Duration::from_secs(secs) {
        tick.tick().await;
        let now = edge_core::time::now_ms();
        let mut closed: Vec<Closed> = Vec::new();
        let c0 = Instant::now();
        for (t, adv) in advs.iter().enumerate() {
            // Each tag sits near one receiver and moves on every 20 s, staggered by tag.
            let step = ((now - start_ms) / 1000 + t as i64) / 20;
            let near = (step as usize + t) % RECEIVERS;
            for (r, receiver) in receivers.iter().enumerate() {
                let base = if r == near { -60 } else { -82 };
                agg.push(
                    RawSighting {
                        receiver: receiver.clone(),
                        ts_ms: now,
                        rssi: base - rng.i16(0..6),
                        heard: Heard::Advertisement(adv.clone()),
                    },
                    &mut drops,
                    &mut |c| closed.push(c),
                );
                adverts += 1;
            }
        }
        ingest_cpu += c0.elapsed();
        for c in closed {
            let events: Vec<_> = c
                .events
                .into_iter()
                .map(|mut e| {
                    e.stream = "beacon.sightings".into();
                    e
                })
                .collect();
            records += events.len() as u64;
            log.append(AppendRequest::events(events)).await.unwrap();
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let wall = t0.elapsed();
    shutdown.stop_all();
    task.await.unwrap().unwrap();

    // Commit time of each sighting record by (tag, event time); each event caused by one.
    let read_all = |stream: &'static str| {
        let log = log.clone();
        async move {
            let mut out = Vec::new();
            let mut from = 1;
            loop {
                let b = log
                    .read(
                        stream,
                        from,
                        ReadLimits {
                            max_records: 10_000,
                            max_bytes: 64 << 20,
                        },
                    )
                    .await
                    .unwrap();
                if b.records.is_empty() {
                    return out;
                }
                from = b.next_seq;
                out.extend(b.records);
            }
        }
    };
    let mut committed: HashMap<(String, i64), i64> = HashMap::new();
    for r in read_all("beacon.sightings").await {
        committed.insert(
            (r.event.key.clone().unwrap_or_default(), r.event.event_ts_ms),
            r.ingest_ts_ms,
        );
    }
    let mut lat = Vec::new();
    let mut events = 0;
    for r in read_all("presence.events").await {
        events += 1;
        let v: serde_json::Value = serde_json::from_slice(&r.event.payload).unwrap();
        let key = (
            v["tag"].as_str().unwrap_or_default().to_string(),
            v["ts"].as_i64().unwrap_or(0),
        );
        if let Some(at) = committed.get(&key) {
            lat.push(r.ingest_ts_ms - at);
        }
    }
    let st = status.get("presence").unwrap();
    println!(
        "| load | ingest, one core | records | presence events | sighting -> presence.events committed p50 / p99 / max | peak RSS | tags |"
    );
    println!("|---|---|---|---|---|---|---|");
    let matched = lat.len();
    println!(
        "| {TAGS} tags x {RECEIVERS} receivers x {HZ} Hz, {:.0} s: {adverts} advertisements ({:.0}/s) | {:.0} ns/advertisement = {:.2}M/s | {records} ({:.0}/s) | {events} ({matched} from sightings) | {} / {} / {} ms | {:.0} MB | {} |",
        wall.as_secs_f64(),
        adverts as f64 / wall.as_secs_f64(),
        ingest_cpu.as_nanos() as f64 / adverts as f64,
        adverts as f64 / ingest_cpu.as_secs_f64() / 1e6,
        records as f64 / wall.as_secs_f64(),
        pct(&mut lat, 50.0),
        pct(&mut lat, 99.0),
        pct(&mut lat, 100.0),
        peak_rss_mb(),
        st.fields.get("tags").cloned().unwrap_or_default(),
    );
    assert_eq!(drops.total(), 0, "{drops:?}");

    // Memory per tag at the cap: 10,000 tags heard by 8 receivers, 3 windows each (the engine's
    // window at the driver's aggregation), in a fresh engine.
    use edge_drivers::ble::presence::{Engine, PresenceConfig, Sighting, ZoneConfig};
    let cap = 10_000;
    let cfg = PresenceConfig {
        max_tags: cap,
        zones: (0..RECEIVERS)
            .map(|r| ZoneConfig {
                name: format!("zone-{r}"),
                receivers: vec![format!("rx-{r}")],
                max_distance_m: 4.0,
                min_rssi: None,
            })
            .collect(),
        ..PresenceConfig::default()
    };
    let before = rss_now_kb();
    let mut engine = Engine::new(cfg);
    for w in 0..3 {
        for t in 0..cap {
            for r in 0..RECEIVERS {
                engine.observe(&Sighting {
                    tag: format!("ibeacon:{UUID}:1:{t}"),
                    receiver: format!("rx-{r}"),
                    rssi: if r == t % RECEIVERS { -60.0 } else { -82.0 },
                    tx_power: Some(-59.0),
                    ts_ms: 1_000_000 + w * 1000 + r as i64,
                    samples: 1,
                });
            }
        }
    }
    let after = rss_now_kb();
    println!(
        "\nEngine memory at the cap: {} tags x {RECEIVERS} receivers x 3 samples: {:.1} MB, {:.0} bytes per tag",
        engine.stats().tags,
        (after - before) as f64 / 1024.0,
        (after - before) as f64 * 1024.0 / cap as f64
    );
}

fn rss_now_kb() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<i64>().ok())
        })
        .unwrap_or(0)
}
