//! Simulated devices for demos and tests: a POS lane producing transactions and item scans, and a
//! set of BLE beacons producing sightings. Payloads follow the documented schemas
//! (`docs/schemas/`), so everything downstream sees realistic data.
//!
//! The beacon sightings belong to the `ble` family (`ble::simulated`): without the `ble`
//! feature `sightings_per_second` defaults to 0, and a config that sets it above 0 is a config
//! problem that names the feature.

use crate::{Driver, DriverError};
use edge_core::backoff::{Backoff, Jitter};
use edge_core::component::{ComponentContext, Task};
use edge_core::config::{Problems, join};
use edge_core::log::{AppendRequest, LogError};
use edge_core::{Event, State};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatedConfig {
    pub name: String,
    /// Lane / terminal id written into the events (`edge.src`, key).
    pub lane: String,
    /// Completed sales per minute (0 disables); each sale also produces one scan per line.
    pub transactions_per_minute: f64,
    /// Beacon sightings per second (0 disables), spread over `beacons` beacons. Needs the `ble`
    /// feature (default 2, or 0 in a build without `ble`).
    pub sightings_per_second: f64,
    pub beacons: u32,
    /// Receivers `sim-receiver-1..=N` the beacons walk between: each beacon stays near one for
    /// `dwell_s` seconds (strong signal there, weak at the others), then moves to the next, so
    /// a `presence` driver with one zone per receiver shows enter / exit / dwell.
    pub receivers: u32,
    pub dwell_s: u64,
    /// Stop after this many transactions (0 = run until shutdown). Useful for tests.
    pub max_transactions: u64,
}

impl Default for SimulatedConfig {
    fn default() -> Self {
        SimulatedConfig {
            name: "simulated".into(),
            lane: "lane-1".into(),
            transactions_per_minute: 12.0,
            sightings_per_second: if cfg!(feature = "ble") { 2.0 } else { 0.0 },
            beacons: 4,
            receivers: 1,
            dwell_s: 20,
            max_transactions: 0,
        }
    }
}

impl Driver for SimulatedConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn build(&self, ctx: ComponentContext) -> Result<Task, DriverError> {
        Ok(build(self.clone(), ctx))
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        if !(0.0..=600_000.0).contains(&self.transactions_per_minute) {
            problems.push(
                join(path, "transactions_per_minute"),
                "must be between 0 and 600000",
            );
        }
        if !(0.0..=100_000.0).contains(&self.sightings_per_second) {
            problems.push(
                join(path, "sightings_per_second"),
                "must be between 0 and 100000",
            );
        }
        if !cfg!(feature = "ble") && self.sightings_per_second > 0.0 {
            problems.push(
                join(path, "sightings_per_second"),
                crate::family::missing::<crate::family::Ble>("generating beacon sightings"),
            );
        }
        if !(1..=64).contains(&self.receivers) {
            problems.push(join(path, "receivers"), "must be between 1 and 64");
        }
        if self.dwell_s == 0 {
            problems.push(join(path, "dwell_s"), "must be at least 1");
        }
        if self.sightings_per_second > 0.0 && self.beacons == 0 {
            problems.push(
                join(path, "beacons"),
                "must be at least 1 when sightings_per_second > 0",
            );
        }
        if self.lane.is_empty() {
            problems.push(join(path, "lane"), "must not be empty");
        }
    }
}

const CATALOG: &[(&str, &str, i64)] = &[
    ("00012000161155", "SODA COLA 12PK", 599),
    ("00041303001073", "WHOLE MILK 1GAL", 389),
    ("00030000010204", "OATMEAL 18OZ", 429),
    ("00072250011372", "WHITE BREAD", 249),
    ("00024100100306", "CHEDDAR CRACKERS", 319),
    ("00033383401010", "BANANAS LB", 58),
    ("00011110494185", "EGGS LARGE 12CT", 299),
    ("00048500205013", "ORANGE JUICE 52OZ", 449),
];

fn transaction(store: &str, lane: &str, n: u64, now_ms: i64) -> (Event, Vec<Event>) {
    let receipt_no = format!("{lane}-{now_ms}-{n}");
    let lines_n = fastrand::usize(1..=6);
    let mut lines = Vec::new();
    let mut scans = Vec::new();
    let mut subtotal = 0i64;
    for i in 0..lines_n {
        let (gtin, desc, price) = CATALOG[fastrand::usize(..CATALOG.len())];
        let qty = fastrand::i64(1..=3);
        let amount = qty * price;
        subtotal += amount;
        lines.push(json!({
            "line": i + 1, "kind": "item", "gtin": gtin, "description": desc, "quantity": qty,
            "unit_price_minor": price, "amount_minor": amount,
        }));
        let scan_id = format!("{receipt_no}-scan-{}", i + 1);
        scans.push(
            Event::new(
                "pos.scans",
                serde_json::to_vec(&json!({
                    "schema": "pos.scan/1", "event_id": scan_id, "store": store, "lane": lane,
                    "code": gtin, "symbology": "ean13", "gtin": gtin, "valid": true, "ts": now_ms,
                }))
                .unwrap_or_default(),
            )
            .with_event_ts(now_ms)
            .with_key(lane)
            .with_source(lane)
            .with_event_id(scan_id)
            .with_schema("pos.scan/1"),
        );
    }
    let tax = subtotal * 8 / 100;
    let total = subtotal + tax;
    let event_id = format!("{receipt_no}-tx");
    let payload = json!({
        "schema": "pos.transaction/1", "event_id": event_id, "store": store, "lane": lane,
        "receipt_no": receipt_no, "ts": now_ms, "currency": "USD", "lines": lines,
        "subtotal_minor": subtotal, "tax_minor": tax, "total_minor": total,
        "tenders": [{"type": if fastrand::bool() { "cash" } else { "card" }, "amount_minor": total}],
        "change_minor": 0, "flags": [], "totals_consistent": true, "source": "simulated",
        "simulated": true,
    });
    let tx = Event::new(
        "pos.transactions",
        serde_json::to_vec(&payload).unwrap_or_default(),
    )
    .with_event_ts(now_ms)
    .with_key(lane)
    .with_source(lane)
    .with_event_id(event_id)
    .with_schema("pos.transaction/1");
    (tx, scans)
}

/// Appends with backpressure: a full log is retried (the simulation pauses), a closed log ends it.
async fn store(ctx: &ComponentContext, events: Vec<Event>) -> Result<bool, LogError> {
    let mut backoff =
        Backoff::new(Duration::from_millis(100), Duration::from_secs(5)).with_jitter(Jitter::None);
    loop {
        match ctx.log.append(AppendRequest::events(events.clone())).await {
            Ok(_) => return Ok(true),
            Err(LogError::Full) => {
                ctx.status.set(
                    State::Degraded,
                    "the local log is full; the simulation is paused",
                );
                if !backoff.sleep(ctx.shutdown.intake()).await {
                    return Ok(false);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

#[cfg(feature = "ble")]
fn sightings(ctx: &ComponentContext, cfg: &SimulatedConfig) -> Vec<Event> {
    vec![crate::ble::simulated::sighting(
        &ctx.store_id,
        cfg.beacons,
        cfg.receivers,
        cfg.dwell_s,
        edge_core::time::now_ms(),
    )]
}

/// Without `ble` the sighting tick never runs (and validation refuses `sightings_per_second > 0`).
#[cfg(not(feature = "ble"))]
fn sightings(_ctx: &ComponentContext, _cfg: &SimulatedConfig) -> Vec<Event> {
    Vec::new()
}

pub fn build(cfg: SimulatedConfig, ctx: ComponentContext) -> Task {
    Box::pin(async move {
        let tx_every = (cfg.transactions_per_minute > 0.0)
            .then(|| Duration::from_secs_f64(60.0 / cfg.transactions_per_minute));
        let sight_every = (cfg!(feature = "ble") && cfg.sightings_per_second > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / cfg.sightings_per_second));
        let far = Duration::from_secs(365 * 24 * 3600);
        let mut tx_tick = tokio::time::interval(tx_every.unwrap_or(far));
        let mut sight_tick = tokio::time::interval(sight_every.unwrap_or(far));
        tx_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        sight_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ctx.status.set(
            State::Up,
            format!(
                "simulating lane {} ({} sales/min, {} sightings/s)",
                cfg.lane, cfg.transactions_per_minute, cfg.sightings_per_second
            ),
        );
        let mut n = 0u64;
        loop {
            let events = tokio::select! {
                _ = ctx.shutdown.intake().cancelled() => break,
                _ = tx_tick.tick(), if tx_every.is_some() && (cfg.max_transactions == 0 || n < cfg.max_transactions) => {
                    n += 1;
                    let (tx, mut scans) = transaction(&ctx.store_id, &cfg.lane, n, edge_core::time::now_ms());
                    scans.push(tx);
                    scans
                }
                _ = sight_tick.tick(), if sight_every.is_some() => sightings(&ctx, &cfg),
            };
            if !store(&ctx, events).await? {
                break;
            }
            ctx.status.field("transactions", n);
        }
        ctx.status.set(State::Stopped, "simulation stopped");
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_core::log::Log;
    use std::sync::Arc;

    #[tokio::test]
    async fn simulated_lane_writes_valid_transactions_and_scans() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(
            edge_sync::log::SqliteLog::open(dir.path(), edge_sync::log::LogConfig::default())
                .unwrap(),
        );
        let ctx = ComponentContext::for_test(log.clone(), "sim").with_store("store-42");
        let shutdown = ctx.shutdown.clone();
        let status = ctx.status.registry().clone();
        let cfg = SimulatedConfig {
            transactions_per_minute: 60_000.0,
            sightings_per_second: 0.0,
            max_transactions: 5,
            ..Default::default()
        };
        let task = tokio::spawn(build(cfg, ctx));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while log.next_seq("pos.transactions").unwrap_or(1) <= 5 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "5 transactions within 10 s"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        shutdown.stop_all();
        task.await.unwrap().unwrap();
        let b = log
            .read("pos.transactions", 1, Default::default())
            .await
            .unwrap();
        assert_eq!(b.records.len(), 5, "exactly max_transactions sales");
        let mut scans = 0;
        for r in &b.records {
            let v: serde_json::Value = serde_json::from_slice(&r.event.payload).unwrap();
            let lines = v["lines"].as_array().unwrap();
            let sum: i64 = lines
                .iter()
                .map(|l| l["amount_minor"].as_i64().unwrap())
                .sum();
            assert_eq!(
                v["subtotal_minor"].as_i64().unwrap(),
                sum,
                "lines add up to the subtotal"
            );
            assert_eq!(
                v["total_minor"].as_i64().unwrap(),
                sum + v["tax_minor"].as_i64().unwrap()
            );
            assert_eq!(r.event.event_id.as_deref(), v["event_id"].as_str());
            assert_eq!(v["store"], "store-42");
            scans += lines.len();
        }
        let s = log.read("pos.scans", 1, Default::default()).await.unwrap();
        assert_eq!(s.records.len(), scans, "one scan per line");
        assert_eq!(status.get("sim").unwrap().state, State::Stopped);
        log.close().await.unwrap();
    }
}
