//! The uplink against a real Kafka broker: every record arrives exactly once, in order, with the
//! documented key, timestamp and headers; checkpoints, heartbeats and gaps follow the topic
//! contract; the local cursor moves only after HQ has the records.

#![allow(clippy::unwrap_used)] // test code: a failed set-up step should fail the test loudly

use edge_core::log::Log;
use edge_sync::kafka::DeliveryMode;
use edge_tests::kafka::{
    HqConsumer, Store, append, check_exactly_once, event_time, kcat_read, private_config,
    shared_broker, wait_until_async,
};
use std::time::Duration;

async fn mirrors_every_record_once(mode: DeliveryMode) {
    let b = shared_broker();
    let cfg = private_config(b, mode);
    let mut store = Store::open();
    let (s1, s2) = ("pos.transactions", "pos.scans");
    append(&*store.log, s1, 0..3000).await;
    append(&*store.log, s2, 0..1000).await;
    store.start_uplink(cfg.clone());
    // Live records while the backlog drains.
    append(&*store.log, s1, 3000..4000).await;
    append(&*store.log, s2, 1000..1500).await;

    let t1 = cfg.topic(&store.id, s1);
    let t2 = cfg.topic(&store.id, s2);
    let mut hq = HqConsumer::new(&b.bootstrap(), &[&t1, &t2], true);
    assert_eq!(hq.wait_for_count(&t1, 4000, Duration::from_secs(60)), 4000);
    assert_eq!(hq.wait_for_count(&t2, 1500, Duration::from_secs(60)), 1500);
    // Anything more would be a duplicate.
    hq.poll_for(Duration::from_secs(2));
    check_exactly_once(&hq.on(&t1), &store.id, s1, 4000).unwrap();
    check_exactly_once(&hq.on(&t2), &store.id, s2, 1500).unwrap();

    // Key, timestamp and headers of one record.
    let r = hq.on(&t1)[7];
    assert_eq!(r.key.as_deref(), Some(store.id.as_str()));
    assert_eq!(r.timestamp, Some(event_time(7)), "the event time");
    assert_eq!(r.header("edge.seq"), "8");
    assert_eq!(r.header("edge.epoch"), store.log.epoch().to_string());
    assert_eq!(r.header("edge.src"), "pos-1");
    assert_eq!(r.header("edge.event_id"), "tx-7");
    assert_eq!(r.header("edge.schema"), "pos.transaction/1");
    assert!(r.header("edge.ingest_ts").parse::<i64>().unwrap() > event_time(0));
    assert_eq!(
        r.header("edge.event_ts"),
        "",
        "no clock correction for a plausible time"
    );
    assert_eq!(
        String::from_utf8_lossy(&r.payload),
        "{\"schema\":\"pos.transaction/1\",\"i\":7}"
    );

    // The local cursor reaches the end only because HQ has everything.
    let log = store.log.clone();
    wait_until_async(
        "the uplink cursor to reach the end",
        Duration::from_secs(20),
        || {
            let log = log.clone();
            async move {
                let a = log.cursor("uplink", s1).await.unwrap();
                let b = log.cursor("uplink", s2).await.unwrap();
                (a == Some(4001) && b == Some(1501)).then_some(())
            }
        },
    )
    .await;

    if mode == DeliveryMode::ExactlyOnce {
        // The newest checkpoint of this store says the same.
        let cps = kcat_read(&b.bootstrap(), &cfg.checkpoint_topic, &[]);
        let last = cps
            .iter()
            .rev()
            .find(|m| m["key"] == store.id.as_str())
            .expect("a checkpoint of this store");
        let v: serde_json::Value = serde_json::from_str(last["payload"].as_str().unwrap()).unwrap();
        assert_eq!(v["schema"], "edge.checkpoint/1");
        assert_eq!(v["epoch"], store.log.epoch().to_string());
        assert_eq!(v["streams"][s1]["next_seq"], 4001);
        assert_eq!(v["streams"][s2]["next_seq"], 1501);
    }
    // Heartbeats carry the backlog.
    let hbs = kcat_read(&b.bootstrap(), &cfg.heartbeat_topic, &[]);
    let hb = hbs
        .iter()
        .find(|m| m["key"] == store.id.as_str())
        .expect("a heartbeat of this store");
    let v: serde_json::Value = serde_json::from_str(hb["payload"].as_str().unwrap()).unwrap();
    assert_eq!(v["schema"], "edge.heartbeat/1");
    assert!(v["backlog_records"].is_u64());
    assert!(v["disk"]["budget_bytes"].as_u64().unwrap() > 0);

    let st = &store;
    wait_until_async(
        "status to show an empty backlog",
        Duration::from_secs(10),
        || async move {
            (st.field("uplink", "backlog_records") == 0 && st.field("uplink", "link") == "up")
                .then_some(())
        },
    )
    .await;
    store.stop_components().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exactly_once_mirrors_every_record_once_in_order() {
    mirrors_every_record_once(DeliveryMode::ExactlyOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_mirrors_every_record() {
    mirrors_every_record_once(DeliveryMode::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evicted_records_are_reported_as_gaps_once_and_everything_else_arrives() {
    use edge_core::Event;
    use edge_core::log::AppendRequest;
    let b = shared_broker();
    let cfg = private_config(b, DeliveryMode::ExactlyOnce);
    let mut store = Store::open_with(edge_sync::log::LogConfig {
        disk_budget: edge_core::config::ByteSize::mib(2),
        ..edge_tests::kafka::test_log_config()
    });
    // Raw beacon sightings (low priority) while HQ is unreachable: the budget evicts the oldest.
    let s = "beacon.sightings";
    let n = 6000u64;
    for chunk in (0..n).collect::<Vec<_>>().chunks(200) {
        let evs = chunk
            .iter()
            .map(|i| Event::new(s, format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(900))))
            .collect();
        store.log.append(AppendRequest::events(evs)).await.unwrap();
    }
    store.log.maintain().await.unwrap();
    let gaps = store.log.gaps(0, 1000).await.unwrap();
    assert!(!gaps.is_empty(), "the budget evicted unmirrored records");
    store.start_uplink(cfg.clone());
    let topic = cfg.topic(&store.id, s);
    let mut hq = HqConsumer::new(&b.bootstrap(), &[&topic, &cfg.gap_topic], true);
    let evicted: u64 = gaps.iter().map(|g| g.count).sum();
    let expect_data = (n - evicted) as usize;
    assert_eq!(
        hq.wait_for_count(&topic, expect_data, Duration::from_secs(60)),
        expect_data
    );
    hq.wait_for_count(&cfg.gap_topic, gaps.len(), Duration::from_secs(30));
    // A restart reports nothing twice.
    store.stop_components().await;
    store.start_uplink(cfg.clone());
    hq.poll_for(Duration::from_secs(4));
    let reported: Vec<serde_json::Value> = hq
        .on(&cfg.gap_topic)
        .iter()
        .map(|m| serde_json::from_slice(&m.payload).unwrap())
        .filter(|v: &serde_json::Value| v["store"] == store.id.as_str())
        .collect();
    let ids: Vec<u64> = reported
        .iter()
        .map(|v| v["gap_id"].as_u64().unwrap())
        .collect();
    let want: Vec<u64> = gaps.iter().map(|g| g.id).collect();
    assert_eq!(ids, want, "every gap reported once, in order");
    assert_eq!(reported[0]["schema"], "edge.gap/1");
    assert_eq!(reported[0]["stream"], s);
    // Every seq is either at HQ or inside a reported gap.
    let mut covered = vec![false; n as usize + 1];
    for m in hq.on(&topic) {
        let seq: usize = m.header("edge.seq").parse().unwrap();
        assert!(!covered[seq], "seq {seq} twice");
        covered[seq] = true;
    }
    for g in &reported {
        for seq in g["first_seq"].as_u64().unwrap()..=g["last_seq"].as_u64().unwrap() {
            assert!(
                !covered[seq as usize],
                "seq {seq} both mirrored and in a gap"
            );
            covered[seq as usize] = true;
        }
    }
    assert!(covered[1..].iter().all(|c| *c), "no seq unaccounted for");
    store.stop_components().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_records_are_not_starved_by_a_backlog() {
    let b = shared_broker();
    let mut cfg = private_config(b, DeliveryMode::ExactlyOnce);
    cfg.heartbeat_interval_ms = 0;
    // Smaller transactions than the default: this (unoptimised) test build is slow, and a live
    // record's wait is about two transactions.
    cfg.batch_max_records = 5000;
    let mut store = Store::open();
    let (backlog, live) = ("presence.events", "pos.transactions");
    let n = 200_000;
    append(&*store.log, backlog, 0..n).await;
    append(&*store.log, live, 0..1).await;
    let started = std::time::Instant::now();
    store.start_uplink(cfg.clone());
    let t_live = cfg.topic(&store.id, live);
    // Both topics exist and the HQ consumer reads the live one before the measurement starts.
    let mut hq = HqConsumer::new(&b.bootstrap(), &[&t_live], true);
    tokio::task::block_in_place(|| hq.wait_for_count(&t_live, 1, Duration::from_secs(30)));
    // A live lane appends one record every 20 ms while the backlog drains, noting when and
    // whether the backlog was still draining.
    let samples = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let writer = {
        let log = store.log.clone();
        let samples = samples.clone();
        tokio::spawn(async move {
            let mut i = 1u64;
            loop {
                let draining = log.cursor("uplink", backlog).await.unwrap().unwrap_or(1) <= n;
                append(&*log, live, i..i + 1).await;
                samples
                    .lock()
                    .unwrap()
                    .push((i + 1, std::time::Instant::now(), draining));
                i += 1;
                if !draining {
                    return i;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    while !writer.is_finished() {
        // Off the runtime's worker, so the uplink and the writer keep both workers.
        tokio::task::block_in_place(|| hq.poll_for(Duration::from_millis(20)));
    }
    let total = writer.await.unwrap();
    let drain = started.elapsed();
    assert_eq!(
        hq.wait_for_count(&t_live, total as usize, Duration::from_secs(30)),
        total as usize
    );
    let arrived: std::collections::HashMap<u64, std::time::Instant> = hq
        .on(&t_live)
        .iter()
        .map(|m| (m.header("edge.seq").parse().unwrap(), m.arrived))
        .collect();
    let mut lat: Vec<Duration> = samples
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, _, draining)| *draining)
        .map(|(seq, at, _)| arrived[seq].saturating_duration_since(*at))
        .collect();
    assert!(
        lat.len() >= 10,
        "only {} live records during the drain",
        lat.len()
    );
    let backlog_left = lat.len();
    lat.sort();
    let p90 = lat[lat.len() * 9 / 10 - 1];
    // Without fairness a live record would wait for the rest of the backlog (on average half the
    // drain).
    assert!(
        drain > Duration::from_secs(2),
        "the drain took only {drain:?}; grow n"
    );
    assert!(
        p90 < Duration::from_secs(1),
        "live records waited {p90:?} (p90) behind a backlog of {n} that took {drain:?}"
    );
    eprintln!("live latency p90 {p90:?} over {backlog_left} live records during a {drain:?} drain");
    store.stop_components().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandwidth_cap_is_kept() {
    let b = shared_broker();
    let mut cfg = private_config(b, DeliveryMode::ExactlyOnce);
    cfg.heartbeat_interval_ms = 0;
    cfg.max_bytes_per_sec = edge_core::config::ByteSize::kib(200);
    let mut store = Store::open();
    let s = "pos.transactions";
    append(&*store.log, s, 0..3000).await;
    let bytes: usize = {
        let rb = store
            .log
            .read(
                s,
                1,
                edge_core::log::ReadLimits {
                    max_records: 5000,
                    max_bytes: 1 << 30,
                },
            )
            .await
            .unwrap();
        rb.records
            .iter()
            .map(edge_sync::kafka::record::wire_size)
            .sum()
    };
    let t0 = std::time::Instant::now();
    store.start_uplink(cfg.clone());
    let log = store.log.clone();
    wait_until_async("the capped drain", Duration::from_secs(60), || {
        let log = log.clone();
        async move { (log.cursor("uplink", s).await.ok()?? == 3001).then_some(()) }
    })
    .await;
    let took = t0.elapsed().as_secs_f64();
    let cap = 200.0 * 1024.0;
    // The first second's worth may go at once (the bucket starts full).
    let min = (bytes as f64 - cap) / cap;
    assert!(
        took >= min * 0.9,
        "{bytes} bytes took {took:.1}s; the cap allows no less than {min:.1}s"
    );
    assert!(
        took <= min + 8.0,
        "{bytes} bytes took {took:.1}s at a cap allowing {min:.1}s"
    );
    store.stop_components().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_view_tells_which_stores_are_behind_silent_or_lost_records() {
    use edge_core::Event;
    use edge_core::log::AppendRequest;
    let b = shared_broker();
    let cfg = private_config(b, DeliveryMode::ExactlyOnce);
    assert_eq!(cfg.heartbeat_interval_ms, 2000);
    let s = "pos.transactions";
    // A store that keeps up.
    let mut ok = Store::open();
    append(&*ok.log, s, 0..100).await;
    ok.start_uplink(cfg.clone());
    // A store behind a 16 KiB/s link (the smallest transaction under a cap is 16 KiB) with a
    // backlog of minutes.
    let mut behind = Store::open();
    append(&*behind.log, s, 0..20_000).await;
    behind.start_uplink(edge_sync::kafka::KafkaConfig {
        max_bytes_per_sec: edge_core::config::ByteSize::kib(16),
        ..cfg.clone()
    });
    // A store whose disk budget evicted unmirrored beacon sightings before the link came up.
    let mut lossy = Store::open_with(edge_sync::log::LogConfig {
        disk_budget: edge_core::config::ByteSize::mib(2),
        ..edge_tests::kafka::test_log_config()
    });
    for chunk in (0..6000u64).collect::<Vec<_>>().chunks(200) {
        let evs = chunk
            .iter()
            .map(|i| {
                Event::new(
                    "beacon.sightings",
                    format!("{{\"i\":{i},\"pad\":\"{}\"}}", "x".repeat(900)),
                )
            })
            .collect();
        lossy.log.append(AppendRequest::events(evs)).await.unwrap();
    }
    lossy.log.maintain().await.unwrap();
    let evicted: u64 = lossy
        .log
        .gaps(0, 1000)
        .await
        .unwrap()
        .iter()
        .map(|g| g.count)
        .sum();
    assert!(evicted > 0);
    lossy.start_uplink(cfg.clone());
    // A store that mirrored, then went quiet.
    let mut quiet = Store::open();
    append(&*quiet.log, s, 0..10).await;
    quiet.start_uplink(cfg.clone());
    quiet.wait_cursor(s, 11, Duration::from_secs(60)).await;
    ok.wait_cursor(s, 101, Duration::from_secs(60)).await;
    lossy
        .wait_cursor("beacon.sightings", 6001, Duration::from_secs(60))
        .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    quiet.stop_components().await;
    // Past the silence threshold for the quiet store; the others beat every 2 s.
    tokio::time::sleep(Duration::from_secs(6)).await;

    let out = std::process::Command::new(edge_tests::agent_bin!())
        .args(["fleet", "--bootstrap", &b.bootstrap()])
        .args(["--heartbeat-topic", &cfg.heartbeat_topic])
        .args(["--gap-topic", &cfg.gap_topic])
        .args(["--checkpoint-topic", &cfg.checkpoint_topic])
        .args(["--silent-after", "5s", "--behind-after", "2s", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let row = |id: &str| {
        r["rows"]
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["store"] == id)
            .cloned()
            .unwrap_or_else(|| panic!("{id} is not in the fleet view: {r}"))
    };
    assert_eq!(r["stores"], 4, "{r}");
    let v = row(&ok.id);
    assert_eq!(v["state"], "ok", "{v}");
    assert_eq!(v["gaps"], 0);
    assert_eq!(v["agent_version"], env!("CARGO_PKG_VERSION"));
    assert!(v["checkpoint_txn"].as_u64().unwrap() >= 1, "{v}");
    let v = row(&behind.id);
    assert_eq!(v["state"], "behind", "{v}");
    assert!(v["backlog_records"].as_u64().unwrap() > 10_000, "{v}");
    assert!(v["oldest_unsent_age_ms"].as_u64().unwrap() > 2000, "{v}");
    let v = row(&quiet.id);
    assert_eq!(v["state"], "silent", "{v}");
    let v = row(&lossy.id);
    assert_eq!(v["state"], "ok", "{v}");
    assert_eq!(v["gap_records"].as_u64().unwrap(), evicted, "{v}");
    let reasons = v["gap_reasons"].as_object().unwrap();
    assert!(reasons.keys().all(|k| k.contains("evicted")), "{reasons:?}");
    assert_eq!(r["silent"], 1);
    assert_eq!(r["behind"], 1);
    assert_eq!(r["with_gaps"], 1);
    assert_eq!(r["gap_records"].as_u64().unwrap(), evicted);
    // The table says the same, worst first.
    let out = std::process::Command::new(edge_tests::agent_bin!())
        .args(["fleet", "--bootstrap", &b.bootstrap()])
        .args(["--heartbeat-topic", &cfg.heartbeat_topic])
        .args(["--gap-topic", &cfg.gap_topic])
        .args(["--checkpoint-topic", &cfg.checkpoint_topic])
        .args(["--silent-after", "5s", "--behind-after", "2s"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[1].starts_with(&quiet.id), "{text}");
    assert!(lines[2].starts_with(&behind.id), "{text}");
    assert!(
        lines
            .last()
            .unwrap()
            .starts_with("4 stores: 1 silent, 1 behind, 1 with gaps"),
        "{text}"
    );
    for st in [&mut ok, &mut behind, &mut lossy] {
        st.stop_components().await;
    }
}
