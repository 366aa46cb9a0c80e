//! One bad record costs one record on the Kafka path (PRODUCT.md guarantee 6), against a real
//! broker: a POS lane whose clock runs hours ahead, records the broker refuses for good (a
//! timestamp outside the topic's window, a record larger than the topic takes), and a checkpoint
//! in Kafka that claims more than the local log holds. HQ (an independent `read_committed`
//! consumer) must see every good record once, in order; each refused record is in the local
//! `deadletter` stream and on `edge.gaps` with its reason.

#![allow(clippy::unwrap_used)] // test code: a failed set-up step should fail the test loudly

use edge_core::Event;
use edge_core::log::{AppendRequest, Log, ReadLimits};
use edge_sync::kafka::DeliveryMode;
use edge_tests::kafka::{
    HqConsumer, Store, check_exactly_once, check_exactly_once_except, create_topic_with, event,
    event_time, hq_producer, hq_send, private_config, shared_broker,
};
use std::collections::BTreeSet;
use std::time::Duration;

const S: &str = "pos.transactions";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lane_with_a_clock_three_hours_ahead_does_not_stop_the_mirror() {
    let b = shared_broker();
    let cfg = private_config(b, DeliveryMode::ExactlyOnce);
    let mut store = Store::open();
    // 100 normal sales, and between them one from a lane whose clock runs 3 hours ahead. Kafka 4
    // refuses timestamps more than 1 h ahead (log.message.timestamp.after.max.ms).
    let ahead = edge_core::time::now_ms() + 3 * 3_600_000;
    let mut evs: Vec<Event> = (0..50).map(|i| event(S, i)).collect();
    evs.push(event(S, 50).with_event_ts(ahead));
    evs.extend((51..101).map(|i| event(S, i)));
    store.log.append(AppendRequest::events(evs)).await.unwrap();
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, 102, Duration::from_secs(60)).await;

    let topic = cfg.topic(&store.id, S);
    let mut hq = HqConsumer::new(&b.bootstrap(), &[&topic], true);
    hq.wait_for_count(&topic, 101, Duration::from_secs(60));
    hq.poll_for(Duration::from_secs(1));
    let seen = hq.on(&topic);
    check_exactly_once(&seen, &store.id, S, 101).unwrap();
    // The odd one carries the ingest time as its Kafka timestamp and the device's time in a
    // header; its neighbours keep their event times.
    let odd = seen[50];
    assert_eq!(odd.header("edge.event_ts"), ahead.to_string());
    let ingest: i64 = odd.header("edge.ingest_ts").parse().unwrap();
    assert_eq!(odd.timestamp, Some(ingest));
    assert_eq!(seen[49].timestamp, Some(event_time(49)));
    assert_eq!(seen[51].timestamp, Some(event_time(51)));
    assert_eq!(seen[51].header("edge.event_ts"), "");
    assert!(
        store.detail("uplink").starts_with("up"),
        "{}",
        store.detail("uplink")
    );
    store.stop_components().await;
}

/// Random, incompressible text of `n` bytes (zstd cannot shrink it below the topic's limit).
fn noise(n: usize) -> String {
    (0..n).map(|_| fastrand::alphanumeric()).collect::<String>()
}

async fn refused_records_cost_one_record_each(mode: DeliveryMode) {
    let b = shared_broker();
    let mut cfg = private_config(b, mode);
    // The agent trusts clocks up to an hour ahead; this topic refuses a minute ahead, and
    // batches over 300 kB.
    cfg.event_time_max_ahead_ms = 3_600_000;
    let mut store = Store::open();
    let topic = cfg.topic(&store.id, S);
    create_topic_with(
        &b.bootstrap(),
        &topic,
        &[
            ("message.timestamp.after.max.ms", "60000"),
            ("max.message.bytes", "300000"),
        ],
    )
    .await;
    let mut evs: Vec<Event> = (0..300).map(|i| event(S, i)).collect();
    // seq 301: ten minutes ahead.
    evs.push(event(S, 300).with_event_ts(edge_core::time::now_ms() + 600_000));
    evs.extend((301..600).map(|i| event(S, i)));
    // seq 601: 600 kB, under the agent's max_record_bytes, over the topic's max.message.bytes.
    let big = format!(
        "{{\"schema\":\"pos.transaction/1\",\"i\":600,\"x\":\"{}\"}}",
        noise(600_000)
    );
    evs.push(
        Event::new(S, big)
            .with_event_ts(event_time(600))
            .with_event_id("tx-600")
            .with_source("pos-0"),
    );
    evs.extend((601..900).map(|i| event(S, i)));
    for chunk in evs.chunks(200) {
        store
            .log
            .append(AppendRequest::events(chunk.to_vec()))
            .await
            .unwrap();
    }
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, 901, Duration::from_secs(180)).await;

    let mut hq = HqConsumer::new(&b.bootstrap(), &[&topic, &cfg.gap_topic], true);
    hq.wait_for_count(&topic, 898, Duration::from_secs(60));
    hq.poll_for(Duration::from_secs(2));
    match mode {
        DeliveryMode::ExactlyOnce => {
            check_exactly_once_except(&hq.on(&topic), &store.id, S, 900, &[301, 601]).unwrap()
        }
        DeliveryMode::AtLeastOnce => {
            // Duplicates are allowed (removable by identity); nothing else may be missing.
            let seqs: BTreeSet<u64> = hq.on(&topic).iter().map(|s| s.identity().3).collect();
            let want: BTreeSet<u64> = (1..=900).filter(|s| *s != 301 && *s != 601).collect();
            let missing: Vec<&u64> = want.difference(&seqs).collect();
            let extra: Vec<&u64> = seqs.difference(&want).collect();
            assert!(
                missing.is_empty() && extra.is_empty(),
                "every good record at HQ, the refused ones not: missing {missing:?}, extra {extra:?}"
            );
        }
    }
    // HQ sees each refused record as a gap with the reason.
    let gaps: Vec<serde_json::Value> = hq
        .on(&cfg.gap_topic)
        .iter()
        .filter(|s| s.header("edge.store") == store.id)
        .map(|s| serde_json::from_slice(&s.payload).unwrap())
        .collect();
    let reason_of = |seq: u64| -> String {
        gaps.iter()
            .filter(|g| g["first_seq"] == seq && g["stream"] == S)
            .map(|g| g["reason"].as_str().unwrap_or("").to_string())
            .next()
            .unwrap_or_else(|| panic!("no gap for seq {seq} at HQ: {gaps:?}"))
    };
    assert!(reason_of(301).contains("invalid_timestamp"), "{gaps:?}");
    assert!(reason_of(601).contains("too_large"), "{gaps:?}");
    // The store keeps them in its dead-letter stream, with the reason and the original bytes.
    let dl = store
        .log
        .read("deadletter", 1, ReadLimits::default())
        .await
        .unwrap();
    let letters: Vec<serde_json::Value> = dl
        .records
        .iter()
        .map(|r| serde_json::from_slice(&r.event.payload).unwrap())
        .filter(|v: &serde_json::Value| v["origin"] == "uplink")
        .collect();
    let dl_seqs: BTreeSet<u64> = letters.iter().filter_map(|v| v["seq"].as_u64()).collect();
    assert_eq!(dl_seqs, BTreeSet::from([301, 601]), "{letters:?}");
    for v in &letters {
        assert_eq!(v["stream"], S);
        assert!(
            v["reason"]
                .as_str()
                .unwrap()
                .starts_with("refused by Kafka")
        );
        assert!(!v["original_b64"].as_str().unwrap().is_empty());
    }
    if mode == DeliveryMode::ExactlyOnce {
        assert_eq!(letters.len(), 2, "each dead letter once: {letters:?}");
    }
    store.stop_components().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_broker_refuses_are_isolated_exactly_once() {
    refused_records_cost_one_record_each(DeliveryMode::ExactlyOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_the_broker_refuses_are_isolated_at_least_once() {
    refused_records_cost_one_record_each(DeliveryMode::AtLeastOnce).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_checkpoint_past_the_local_log_is_not_trusted() {
    let b = shared_broker();
    let cfg = private_config(b, DeliveryMode::ExactlyOnce);
    let mut store = Store::open();
    for i in 0..500 {
        store.log.append(AppendRequest::one(event(S, i))).await.ok();
    }
    // Someone writes a checkpoint for this store and epoch claiming a million records are at HQ,
    // with the largest transaction counter there is.
    let forged = serde_json::json!({
        "schema": "edge.checkpoint/1",
        "store": store.id,
        "epoch": store.log.epoch().to_string(),
        "streams": { S: { "next_seq": 1_000_000u64 } },
        "gap_id": 0,
        "txn": u64::MAX,
        "ts_ms": 0,
        "agent_version": "forged",
    });
    let p = hq_producer(&b.bootstrap());
    hq_send(
        &p,
        &cfg.checkpoint_topic,
        Some(&store.id),
        &forged.to_string(),
        &[],
    );
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, 501, Duration::from_secs(60)).await;
    let rejected = store.field("uplink", "checkpoint_rejected");
    assert!(
        rejected
            .as_str()
            .unwrap_or("")
            .contains("past the local head"),
        "status names the rejected checkpoint: {rejected}"
    );
    // A restart after it resumes from the agent's own checkpoint: nothing lost, nothing twice.
    store.stop_components().await;
    for i in 500..600 {
        store.log.append(AppendRequest::one(event(S, i))).await.ok();
    }
    store.start_uplink(cfg.clone());
    store.wait_cursor(S, 601, Duration::from_secs(60)).await;
    let topic = cfg.topic(&store.id, S);
    let mut hq = HqConsumer::new(&b.bootstrap(), &[&topic], true);
    hq.wait_for_count(&topic, 600, Duration::from_secs(60));
    hq.poll_for(Duration::from_secs(2));
    check_exactly_once(&hq.on(&topic), &store.id, S, 600).unwrap();
    store.stop_components().await;
}
