//! Accuracy and throughput of the presence engine on the seeded store simulator
//! (`edge_drivers::ble::sim`): `cargo run --release -p edge-drivers --example presence_accuracy`.
//! The figures go to docs/BENCHMARKS.md ("Presence").

use edge_drivers::ble::presence::{Engine, PresenceConfig, Sighting, ZoneConfig};
use edge_drivers::ble::sim::{Report, Store, confusion_table, shoppers, still_tags};
use std::time::Instant;

fn line(name: &str, r: &Report) {
    let p = |v: &[i64], q| {
        Report::percentile(v, q).map_or("-".to_string(), |x| format!("{:.1} s", x as f64 / 1000.0))
    };
    println!(
        "| {name} | {:.2} % | {} / {} | {} / {} | {} | {} | {} |",
        r.mis_id_percent(),
        p(&r.enter_latency_ms, 50.0),
        p(&r.enter_latency_ms, 95.0),
        p(&r.exit_latency_ms, 50.0),
        p(&r.exit_latency_ms, 95.0),
        r.missed_enters,
        r.missed_exits,
        r.sightings
    );
}

fn main() {
    let cfg = PresenceConfig::default();
    let tags = 50;
    println!(
        "Presence accuracy: {tags} shoppers per scenario (seeded), 4 zones of 6 m, 10 Hz, 20 % loss,"
    );
    println!("shadowing sigma 2.5 dB, multipath bursts on 10 % of samples at -6 dB.\n");
    println!(
        "| scenario | mis-id | enter p50 / p95 | exit p50 / p95 | missed enters | missed exits | sightings |"
    );
    println!("|---|---|---|---|---|---|---|");
    let open = Store::default();
    let r_open = shoppers(&open, &cfg, tags, 1);
    line("open aisles", &r_open);
    let walls = Store {
        wall_db: 6.0,
        ..Store::default()
    };
    line(
        "a 6 dB wall between zones",
        &shoppers(&walls, &cfg, tags, 1),
    );
    let lost = Store {
        dead_receivers: vec![1],
        ..Store::default()
    };
    line("receiver of zone-1 lost", &shoppers(&lost, &cfg, tags, 1));
    println!();
    for (name, x) in [("a zone's centre", 3.0), ("1 m from a boundary", 7.0)] {
        let r = still_tags(&open, &cfg, x, 3600.0, 1);
        println!(
            "still tag at {name}, 1 h: {} flaps, {} events",
            r.flaps, r.events
        );
    }
    println!(
        "\nConfusion matrix (open aisles; rows: true zone, columns: the engine's answer, share of 100 ms samples):\n"
    );
    print!("{}", confusion_table(&r_open, open.zones));

    // Throughput: 500 tags x 8 receivers, pre-generated sightings, one core.
    let zones: Vec<ZoneConfig> = (0..8)
        .map(|i| ZoneConfig {
            name: format!("z{i}"),
            receivers: vec![format!("rx-{i}")],
            max_distance_m: 4.0,
            min_rssi: None,
        })
        .collect();
    let mut engine = Engine::new(PresenceConfig {
        zones,
        ..PresenceConfig::default()
    });
    let mut rng = fastrand::Rng::with_seed(5);
    let tags: Vec<String> = (0..500).map(|t| format!("tag-{t}")).collect();
    let receivers: Vec<String> = (0..8).map(|r| format!("rx-{r}")).collect();
    let n = 2_000_000usize;
    let sightings: Vec<Sighting> = (0..n)
        .map(|i| Sighting {
            tag: tags[i % 500].clone(),
            receiver: receivers[(i / 500) % 8].clone(),
            rssi: -55.0 - 30.0 * rng.f64(),
            tx_power: Some(-59.0),
            ts_ms: (i / 4_000) as i64 * 100,
            samples: 1,
        })
        .collect();
    let t0 = Instant::now();
    let mut events = 0usize;
    for (i, s) in sightings.iter().enumerate() {
        events += engine.observe(s).len();
        if i % 40_000 == 0 {
            events += engine.tick(s.ts_ms).len();
        }
    }
    let dt = t0.elapsed().as_secs_f64();
    println!(
        "\nthroughput: {n} sightings (500 tags x 8 receivers at 10 Hz, {:.0} s of store time) in {dt:.2} s on one core: {:.0} sightings/s; {events} events; {} tags tracked",
        n as f64 / 40_000.0,
        n as f64 / dt,
        engine.stats().tags
    );
}
