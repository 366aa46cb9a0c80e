//! The uplink against a real Kafka broker: every record arrives exactly once, in order, with the
//! documented key, timestamp and headers; checkpoints, heartbeats and gaps follow the topic
//! contract; the local cursor moves only after HQ has the records.

use edge_core::log::Log;
use edge_sync::kafka::DeliveryMode;
use edge_tests::kafka::{
    HqConsumer, Store, append, check_exactly_once, kcat_read, private_config, shared_broker,
    wait_until_async,
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
    assert_eq!(r.timestamp, Some(1_700_000_000_007));
    assert_eq!(r.header("edge.seq"), "8");
    assert_eq!(r.header("edge.epoch"), store.log.epoch().to_string());
    assert_eq!(r.header("edge.src"), "pos-1");
    assert_eq!(r.header("edge.event_id"), "tx-7");
    assert_eq!(r.header("edge.schema"), "pos.transaction/1");
    assert!(r.header("edge.ingest_ts").parse::<i64>().unwrap() > 1_700_000_000_000);
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
