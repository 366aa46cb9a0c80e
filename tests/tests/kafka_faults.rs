//! Faults against a real Kafka broker: crashes between the Kafka commit and the local cursor
//! commit, uplink crashes in the middle of a drain, zombie producers, a broker killed in the middle
//! of a transaction. HQ (an independent `read_committed` consumer) must see every record exactly
//! once, in order.

#![allow(clippy::unwrap_used)] // test code: a failed set-up step should fail the test loudly

use edge_core::log::{AppendRequest, Log};
use edge_sync::kafka::DeliveryMode;
use edge_tests::kafka::{
    HqConsumer, KafkaBroker, Store, append, check_exactly_once, private_config, shared_broker,
    wait_until_async,
};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use std::time::Duration;

const S: &str = "pos.transactions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_cursor_behind_the_checkpoint_resends_nothing() {
    let b = shared_broker();
    let cfg = private_config(b, DeliveryMode::ExactlyOnce);
    let mut store = Store::open();
    append(&*store.log, S, 0..2000).await;
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, 2001, Duration::from_secs(60)).await;
    store.stop_components().await;
    // The crash window: Kafka committed, the local cursor commit was lost.
    store
        .log
        .append(AppendRequest::cursor("uplink", S, 1))
        .await
        .unwrap();
    append(&*store.log, S, 2000..2500).await;
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, 2501, Duration::from_secs(60)).await;
    hq_has_exactly_once(b, &cfg, &store, 2500);
    store.stop_components().await;
}

/// HQ's read_committed view of `store`'s stream `S` in `cfg`: exactly `n` records, once each, in order.
fn hq_has_exactly_once(
    b: &KafkaBroker,
    cfg: &edge_sync::kafka::KafkaConfig,
    store: &Store,
    n: u64,
) {
    let topic = cfg.topic(&store.id, S);
    let mut hq = HqConsumer::new(&b.bootstrap(), &[&topic], true);
    hq.wait_for_count(&topic, n as usize, Duration::from_secs(30));
    hq.poll_for(Duration::from_secs(2));
    check_exactly_once(&hq.on(&topic), &store.id, S, n).unwrap();
}

/// The checkpoint committed as the offset of the store's consumer group (offset, metadata).
fn group_checkpoint(b: &KafkaBroker, topic: &str, store: &str) -> (i64, serde_json::Value) {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = b
        .client_config()
        .set("group.id", edge_sync::kafka::checkpoint_group(store))
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = c.committed_offsets(tpl, Duration::from_secs(30)).unwrap();
    let e = got.find_partition(topic, 0).unwrap();
    let rdkafka::Offset::Offset(o) = e.offset() else {
        panic!(
            "no committed checkpoint offset for {store}: {:?}",
            e.offset()
        );
    };
    (o, serde_json::from_str(e.metadata()).unwrap())
}

/// Writes a checkpoint record for `store` on the topic (not transactional, not in the group).
fn forge_topic_checkpoint(b: &KafkaBroker, topic: &str, cp: &serde_json::Value, store: &str) {
    let p = edge_tests::kafka::hq_producer(&b.bootstrap());
    edge_tests::kafka::hq_send(&p, topic, Some(store), &cp.to_string(), &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_start_takes_the_checkpoint_from_the_group_offset_not_a_topic_scan() {
    let b = shared_broker();
    let cfg = private_config(b, DeliveryMode::ExactlyOnce);
    assert!(cfg.checkpoint_offsets, "the group offset is the default");
    let mut store = Store::open();
    append(&*store.log, S, 0..2000).await;
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, 2001, Duration::from_secs(60)).await;
    store.stop_components().await;
    // The transaction that moved the stream committed its checkpoint into the group offset too.
    let (offset, cp) = group_checkpoint(b, &cfg.checkpoint_topic, &store.id);
    assert_eq!(cp["schema"], "edge.checkpoint/1");
    assert_eq!(cp["store"], store.id.as_str());
    assert_eq!(cp["streams"][S]["next_seq"], 2001);
    assert_eq!(Some(offset as u64), cp["txn"].as_u64());
    // A newer checkpoint on the topic that claims nothing was sent: a topic scan would take it
    // (highest txn) and send all 2000 records again. The group offset is what a start reads.
    let mut forged = cp.clone();
    forged["txn"] = serde_json::json!(offset + 1000);
    forged["streams"][S]["next_seq"] = serde_json::json!(1);
    forge_topic_checkpoint(b, &cfg.checkpoint_topic, &forged, &store.id);
    // And the crash window: Kafka committed, the local cursor commit was lost.
    store
        .log
        .append(AppendRequest::cursor("uplink", S, 1))
        .await
        .unwrap();
    append(&*store.log, S, 2000..2500).await;
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, 2501, Duration::from_secs(60)).await;
    hq_has_exactly_once(b, &cfg, &store, 2500);
    let (_, cp) = group_checkpoint(b, &cfg.checkpoint_topic, &store.id);
    assert_eq!(cp["streams"][S]["next_seq"], 2501);
    store.stop_components().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_offset_left_behind_by_a_run_without_it_is_not_trusted() {
    let b = shared_broker();
    let cfg = private_config(b, DeliveryMode::ExactlyOnce);
    let mut store = Store::open();
    append(&*store.log, S, 0..1000).await;
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, 1001, Duration::from_secs(60)).await;
    store.stop_components().await;
    // A run that commits checkpoints to the topic only (an older agent version after a rollback,
    // or checkpoint_offsets = false): the group offset stays at 1001.
    append(&*store.log, S, 1000..2000).await;
    let without = edge_sync::kafka::KafkaConfig {
        checkpoint_offsets: false,
        ..cfg.clone()
    };
    store.start_uplink(without);
    store.wait_cursor(S, 2001, Duration::from_secs(60)).await;
    store.stop_components().await;
    assert_eq!(
        group_checkpoint(b, &cfg.checkpoint_topic, &store.id).1["streams"][S]["next_seq"],
        1001
    );
    // A lost local cursor commit puts the cursor between the two: trusting the stale group
    // offset would resume at 1500 and send 1500..2000 twice.
    store
        .log
        .append(AppendRequest::cursor("uplink", S, 1500))
        .await
        .unwrap();
    append(&*store.log, S, 2000..2500).await;
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, 2501, Duration::from_secs(60)).await;
    hq_has_exactly_once(b, &cfg, &store, 2500);
    store.stop_components().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uplink_crashes_during_a_drain_lose_and_repeat_nothing() {
    let b = shared_broker();
    let mut cfg = private_config(b, DeliveryMode::ExactlyOnce);
    cfg.batch_max_records = 2000;
    let mut store = Store::open();
    // 12 crashes each after 1000-6000 records of progress plus up to 150 ms more: ~80k records
    // with the streamed uplink; 150k leaves a margin of two.
    let n = 150_000;
    append(&*store.log, S, 0..n).await;
    append(&*store.log, "pos.scans", 0..5000).await;
    let mut crashes = 0;
    let mut last = 1;
    while crashes < 12 {
        store.start_uplink(cfg.clone());
        // Crash at a random moment after some progress.
        let target = last + 1 + fastrand::u64(1000..6000);
        let log = store.log.clone();
        let reached =
            wait_until_async("progress before the crash", Duration::from_secs(60), || {
                let log = log.clone();
                async move {
                    let c = log.cursor("uplink", S).await.ok()??;
                    (c >= target || c == n + 1).then_some(c)
                }
            })
            .await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..150))).await;
        store.abort_components().await;
        crashes += 1;
        last = reached;
        if reached == n + 1 {
            break;
        }
    }
    eprintln!("{crashes} crashes; the cursor was at {last} of {n} at the last one");
    assert!(
        crashes >= 10,
        "only {crashes} crashes happened before the drain finished; grow n"
    );
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, n + 1, Duration::from_secs(120)).await;
    store
        .wait_cursor("pos.scans", 5001, Duration::from_secs(60))
        .await;
    let t1 = cfg.topic(&store.id, S);
    let t2 = cfg.topic(&store.id, "pos.scans");
    let mut hq = HqConsumer::new(&b.bootstrap(), &[&t1, &t2], true);
    hq.wait_for_count(&t1, n as usize, Duration::from_secs(60));
    hq.wait_for_count(&t2, 5000, Duration::from_secs(60));
    hq.poll_for(Duration::from_secs(2));
    check_exactly_once(&hq.on(&t1), &store.id, S, n).unwrap();
    check_exactly_once(&hq.on(&t2), &store.id, "pos.scans", 5000).unwrap();
    store.stop_components().await;
}

fn raw_transactional(
    bootstrap: &str,
    txn_id: &str,
) -> ThreadedProducer<rdkafka::producer::DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", txn_id)
        .set("enable.idempotence", "true")
        .create()
        .expect("raw transactional producer")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zombie_producers_are_fenced_and_their_records_never_reach_hq() {
    let b = shared_broker();
    let cfg = private_config(b, DeliveryMode::ExactlyOnce);
    let mut store = Store::open();
    append(&*store.log, S, 0..1000).await;
    let topic = cfg.topic(&store.id, S);
    let txn_id = cfg.transactional_id(&store.id);

    // An older incarnation of this store's agent, stuck in the middle of a transaction that
    // holds copies of seq 1..=100.
    let zombie = raw_transactional(&b.bootstrap(), &txn_id);
    let epoch = store.log.epoch().to_string();
    let store_id = store.id.clone();
    let z = zombie.clone();
    let topic2 = topic.clone();
    tokio::task::spawn_blocking(move || {
        z.init_transactions(Duration::from_secs(30)).unwrap();
        z.begin_transaction().unwrap();
        for seq in 1..=100u64 {
            let s = seq.to_string();
            let h = OwnedHeaders::new()
                .insert(Header {
                    key: "edge.store",
                    value: Some(store_id.as_str()),
                })
                .insert(Header {
                    key: "edge.stream",
                    value: Some(S),
                })
                .insert(Header {
                    key: "edge.epoch",
                    value: Some(epoch.as_str()),
                })
                .insert(Header {
                    key: "edge.seq",
                    value: Some(s.as_str()),
                });
            z.send(
                BaseRecord::to(&topic2)
                    .key(store_id.as_str())
                    .payload("zombie")
                    .headers(h),
            )
            .map_err(|(e, _)| e)
            .unwrap();
        }
        z.flush(Duration::from_secs(30)).unwrap();
    })
    .await
    .unwrap();

    // The new incarnation fences it.
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, 1001, Duration::from_secs(60)).await;
    let z = zombie.clone();
    let commit = tokio::task::spawn_blocking(move || z.commit_transaction(Duration::from_secs(30)))
        .await
        .unwrap();
    assert!(
        commit.is_err(),
        "the zombie's commit must fail after it was fenced"
    );

    // Now a newer producer with this store's transactional.id fences the running uplink; the
    // uplink re-initialises (fencing it back) and carries on without duplicates.
    let usurper = raw_transactional(&b.bootstrap(), &txn_id);
    let u = usurper.clone();
    tokio::task::spawn_blocking(move || u.init_transactions(Duration::from_secs(30)).unwrap())
        .await
        .unwrap();
    append(&*store.log, S, 1000..2000).await;
    store.wait_cursor(S, 2001, Duration::from_secs(60)).await;
    let u = usurper.clone();
    let t = topic.clone();
    let begun = tokio::task::spawn_blocking(move || {
        u.begin_transaction()?;
        u.send(BaseRecord::<str, str>::to(&t).payload("zombie"))
            .map_err(|(e, _)| e)?;
        u.commit_transaction(Duration::from_secs(30))
    })
    .await
    .unwrap();
    assert!(
        begun.is_err(),
        "the uplink re-initialised and fenced the usurper"
    );

    let mut hq = HqConsumer::new(&b.bootstrap(), &[&topic], true);
    hq.wait_for_count(&topic, 2000, Duration::from_secs(30));
    hq.poll_for(Duration::from_secs(2));
    assert!(
        hq.on(&topic).iter().all(|m| m.payload != b"zombie"),
        "a zombie record is visible to read_committed consumers"
    );
    check_exactly_once(&hq.on(&topic), &store.id, S, 2000).unwrap();
    store.stop_components().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_killed_in_the_middle_of_transactions() {
    let mut b = KafkaBroker::start();
    let mut cfg = private_config(&b, DeliveryMode::ExactlyOnce);
    cfg.batch_max_records = 5000;
    let mut store = Store::open();
    let n = 150_000;
    append(&*store.log, S, 0..n).await;
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, 20_000, Duration::from_secs(60)).await;
    b.stop(true); // kill -9 while transactions are in flight
    b.restart();
    store.wait_cursor(S, n + 1, Duration::from_secs(180)).await;
    let topic = cfg.topic(&store.id, S);
    let mut hq = HqConsumer::new(&b.bootstrap(), &[&topic], true);
    hq.wait_for_count(&topic, n as usize, Duration::from_secs(60));
    hq.poll_for(Duration::from_secs(2));
    check_exactly_once(&hq.on(&topic), &store.id, S, n).unwrap();
    store.stop_components().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_interval_gathers_a_trickle_into_few_transactions() {
    let b = shared_broker();
    let mut cfg = private_config(b, DeliveryMode::ExactlyOnce);
    cfg.heartbeat_interval_ms = 0;
    cfg.transaction_interval_ms = 500;
    let mut store = Store::open();
    store.start_uplink(cfg.clone());
    // A trickle of 60 records, one every 50 ms: without the interval, about one transaction each.
    let t0 = std::time::Instant::now();
    for i in 0..60 {
        append(&*store.log, S, i..i + 1).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.wait_cursor(S, 61, Duration::from_secs(60)).await;
    let elapsed = t0.elapsed().as_millis() as u64;
    let (txns, cp) = group_checkpoint(b, &cfg.checkpoint_topic, &store.id);
    assert_eq!(cp["streams"][S]["next_seq"], 61);
    // One transaction per started 500 ms, plus the first and the last.
    let bound = elapsed / 500 + 2;
    assert!(
        (txns as u64) <= bound,
        "{txns} transactions for 60 records in {elapsed} ms; at most {bound} expected"
    );
    hq_has_exactly_once(b, &cfg, &store, 60);
    store.stop_components().await;
}
