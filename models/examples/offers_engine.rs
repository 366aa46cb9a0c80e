//! The offers engine alone, in process: how many presence events a second it decides on one core,
//! the time of one decision, and the memory of the cap state of 10,000 identified shoppers.
//! `cargo run --release -p edge-models --example offers_engine [shoppers] [events]`
//! (defaults 10000 and 500000).
//!
//! 10 zones, 20 campaigns (two per zone, with per-visit, lifetime and per-window caps, half of
//! them on a budget lease), a fallback, a price set; the shoppers are identified (`app:` tags, so
//! every cap is kept per shopper) and walk from zone to zone: every event is an `enter` or a
//! `dwell` that asks for an offer. A decision's time includes parsing its event from JSON; the
//! baseline is parsing alone, which the component does for every record anyway. Prints one JSON
//! line.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use edge_models::offers::engine::{EngineConfig, OffersEngine, ZoneInfo};
use serde_json::{Value, json};
use std::time::Instant;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(v: &mut [u64], p: f64) -> u64 {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * p) as usize]
}

fn main() {
    let mut args = std::env::args().skip(1);
    let shoppers: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let events: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(500_000);
    let zones: Vec<String> = (0..10).map(|z| format!("aisle-{z}")).collect();
    let mut engine = OffersEngine::new(EngineConfig {
        identified_tags: vec!["app:".into()],
        zones: zones
            .iter()
            .enumerate()
            .map(|(i, z)| ZoneInfo {
                name: z.clone(),
                display: Some("shelf_screen".into()),
                lane: Some(format!("{}", i % 4 + 1)),
            })
            .collect(),
        ..Default::default()
    });
    for i in 0..20 {
        engine
            .apply_price(
                format!(
                    r#"{{"schema":"price/1","sku":"sku-{i}","price_cents":{}}}"#,
                    100 + i
                )
                .as_bytes(),
            )
            .unwrap();
        let budget = if i % 2 == 0 {
            r#","budget":{"lease_id":"L1","amount_minor":100000000,"cost_minor":5}"#
        } else {
            ""
        };
        engine
            .apply_campaign(
                format!(
                    r#"{{"id":"c{i}","version":1,"zones":["{}"],"priority":{},
                    "offer":{{"headline":"SKU {i} FOR {{price}}","sku":"sku-{i}"}},
                    "caps":{{"per_visit":1,"lifetime":50,"per_window":{{"count":5,"window_s":86400}}}}{budget}}}"#,
                    zones[i % 10],
                    i % 7
                )
                .as_bytes(),
            )
            .unwrap();
    }
    engine
        .apply_campaign(
            br#"{"id":"welcome","version":1,"fallback":true,"offer":{"headline":"WELCOME"},"caps":{"per_visit":1}}"#,
        )
        .unwrap();
    let text: Vec<String> = (0..events)
        .map(|i| {
            let s = i % shoppers;
            let step = i / shoppers;
            json!({
                "schema": "presence.event/1",
                "kind": if step % 3 == 2 { "dwell" } else { "enter" },
                "tag": format!("app:{s:08x}"),
                "zone": zones[(s + step) % zones.len()],
                "ts": 1_800_000_000_000i64 + (i as i64) * 10,
                "confidence": 0.9,
            })
            .to_string()
        })
        .collect();
    // Baseline: parsing the events only.
    let t = Instant::now();
    let mut n = 0usize;
    for e in &text {
        let v: Value = serde_json::from_str(e).unwrap();
        n += v["kind"].as_str().map_or(0, str::len);
    }
    let parse_s = t.elapsed().as_secs_f64();
    assert!(n > 0);
    // Filled before the first RSS reading, so its pages are not counted as cap state.
    let mut lat = vec![1u64; events];
    let rss_before = rss_kib();
    let mut decided = 0usize;
    let t = Instant::now();
    for (e, l) in text.iter().zip(lat.iter_mut()) {
        let t0 = Instant::now();
        let v: Value = serde_json::from_str(e).unwrap();
        if engine.decide(&v).is_some() {
            decided += 1;
        }
        *l = t0.elapsed().as_nanos() as u64;
    }
    let secs = t.elapsed().as_secs_f64();
    let rss_after = rss_kib();
    println!(
        "{}",
        json!({
            "bench": "offers_engine",
            "shoppers": shoppers,
            "events": events,
            "decisions": decided,
            "events_per_sec": (events as f64 / secs).round(),
            "parse_only_events_per_sec": (events as f64 / parse_s).round(),
            "decide_p50_us": percentile(&mut lat, 0.5) as f64 / 1000.0,
            "decide_p99_us": percentile(&mut lat, 0.99) as f64 / 1000.0,
            "shoppers_in_state": engine.shoppers(),
            // RSS growth while the shoppers' visits, caps and spend accumulate.
            "cap_state_kib": rss_after.saturating_sub(rss_before),
            "rss_kib": rss_after,
        })
    );
}
