//! The downlink against a real Kafka broker: HQ records for this store (or all stores) reach the
//! local streams exactly once, with their offsets in the same SQLite transaction; aborted HQ
//! transactions never arrive; a signed `hq.commands` remirror makes the uplink send a stream again.

#![allow(clippy::unwrap_used)] // test code: a failed set-up step should fail the test loudly

use edge_core::Record;
use edge_core::log::{Log, ReadLimits};
use edge_sync::kafka::{DeliveryMode, DownlinkTopic, KafkaConfig};
use edge_tests::kafka::{
    HqConsumer, Store, append, create_topic, hq_producer, hq_send, hq_signature, hq_signing_key,
    private_config, shared_broker, trust_hq_key, unique, wait_until_async,
};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use std::time::Duration;

async fn read_stream(log: &dyn Log, stream: &str) -> Vec<Record> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let b = log
            .read(stream, from, ReadLimits::default())
            .await
            .expect("read");
        if b.records.is_empty() && b.quarantined.is_empty() {
            return out;
        }
        from = b.next_seq;
        out.extend(b.records);
    }
}

fn downlink_config(base: KafkaConfig, prices: &str, commands: &str) -> KafkaConfig {
    let mut cfg = base;
    cfg.downlink.topics = vec![
        DownlinkTopic::new(prices, "hq.prices"),
        DownlinkTopic::new(commands, "hq.commands"),
    ];
    cfg.downlink.metadata_refresh_ms = 1000;
    cfg
}

async fn wait_count(store: &Store, stream: &str, n: usize) -> Vec<Record> {
    let log = store.log.clone();
    let stream = stream.to_string();
    wait_until_async(
        &format!("{n} records in {stream}"),
        Duration::from_secs(60),
        || {
            let log = log.clone();
            let stream = stream.clone();
            async move {
                let r = read_stream(&*log, &stream).await;
                (r.len() >= n).then_some(r)
            }
        },
    )
    .await
}

fn payloads(rs: &[Record]) -> Vec<String> {
    rs.iter()
        .map(|r| String::from_utf8_lossy(&r.event.payload).into_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_this_stores_records_are_applied_once_with_their_offsets() {
    let b = shared_broker();
    let prices = unique("hq.prices");
    let commands = unique("hq.commands");
    create_topic(&b.bootstrap(), &prices).await;
    create_topic(&b.bootstrap(), &commands).await;
    let mut store = Store::open();
    let me = store.id.clone();
    let p = hq_producer(&b.bootstrap());
    let mut want = Vec::new();
    for i in 0..12 {
        let payload = format!("{{\"sku\":\"{i}\",\"price\":{i}}}");
        match i % 6 {
            0 => hq_send(&p, &prices, Some(&me), &payload, &[]),
            1 => hq_send(&p, &prices, Some("some-other-store"), &payload, &[]),
            2 => hq_send(&p, &prices, Some("*"), &payload, &[]),
            3 => hq_send(
                &p,
                &prices,
                Some(&format!("sku-{i}")),
                &payload,
                &[("edge.store", &me)],
            ),
            4 => hq_send(&p, &prices, None, &payload, &[("edge.store", "other")]),
            _ => hq_send(&p, &prices, None, &payload, &[("edge.schema", "price/1")]),
        }
        if matches!(i % 6, 0 | 2 | 3 | 5) {
            want.push(payload);
        }
    }
    // An HQ transaction that aborts never reaches the store.
    let txp: ThreadedProducer<rdkafka::producer::DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", b.bootstrap())
        .set("transactional.id", unique("hq-txn"))
        .create()
        .unwrap();
    let pr = prices.clone();
    tokio::task::spawn_blocking(move || {
        txp.init_transactions(Duration::from_secs(30)).unwrap();
        txp.begin_transaction().unwrap();
        txp.send(
            BaseRecord::<str, str>::to(&pr)
                .key("*")
                .payload("{\"aborted\":true}"),
        )
        .map_err(|(e, _)| e)
        .unwrap();
        txp.flush(Duration::from_secs(30)).unwrap();
        txp.abort_transaction(Duration::from_secs(30)).unwrap();
    })
    .await
    .unwrap();

    let cfg = downlink_config(
        private_config(b, DeliveryMode::ExactlyOnce),
        &prices,
        &commands,
    );
    store.start_downlink(cfg.clone());
    let got = wait_count(&store, "hq.prices", want.len()).await;
    assert_eq!(payloads(&got), want);
    let r = &got[3];
    assert_eq!(r.event.schema.as_deref(), Some("price/1"));
    assert_eq!(
        r.event.source.as_deref(),
        Some(format!("kafka:{prices}").as_str())
    );
    assert!(
        r.event
            .headers
            .iter()
            .any(|h| h.key == "kafka.offset" && h.value == "5")
    );
    // The stored offset covers the skipped and the aborted records too.
    let stored = store
        .log
        .kv_get(&edge_sync::kafka::downlink::offset_key(&prices, 0))
        .await
        .unwrap()
        .map(|v| String::from_utf8(v).unwrap());
    let log = store.log.clone();
    let pr = prices.clone();
    wait_until_async(
        "the offset to pass the aborted transaction",
        Duration::from_secs(10),
        || {
            let log = log.clone();
            let pr = pr.clone();
            async move {
                let v = log
                    .kv_get(&edge_sync::kafka::downlink::offset_key(&pr, 0))
                    .await
                    .ok()??;
                (String::from_utf8(v).ok()?.parse::<i64>().ok()? >= 12).then_some(())
            }
        },
    )
    .await;
    assert!(stored.is_some());

    // Restart: nothing is applied twice; new records arrive.
    store.stop_components().await;
    hq_send(&p, &prices, Some(&me), "{\"sku\":\"late\"}", &[]);
    want.push("{\"sku\":\"late\"}".into());
    store.start_downlink(cfg.clone());
    let got = wait_count(&store, "hq.prices", want.len()).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got2 = read_stream(&*store.log, "hq.prices").await;
    assert_eq!(got.len(), got2.len());
    assert_eq!(payloads(&got2), want);
    store.stop_components().await;
}

/// Issue 12: a downlink batch was bounded in records only, so 1,000 large records (model chunks,
/// a big campaign) were held in memory and applied in one transaction. `batch_max_bytes` seals
/// a batch at its size: 40 records of 100 KB with a 1 MiB bound and a long wait are applied in
/// several transactions of at most the bound plus one record, each record once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn downlink_batches_are_bounded_in_bytes() {
    let b = shared_broker();
    let prices = unique("hq.prices");
    let commands = unique("hq.commands");
    create_topic(&b.bootstrap(), &prices).await;
    create_topic(&b.bootstrap(), &commands).await;
    let mut store = Store::open();
    let p = hq_producer(&b.bootstrap());
    let filler = "x".repeat(100_000);
    for i in 0..40 {
        hq_send(
            &p,
            &prices,
            Some("*"),
            &format!("{{\"sku\":\"{i}\",\"f\":\"{filler}\"}}"),
            &[],
        );
    }
    let mut cfg = downlink_config(
        private_config(b, DeliveryMode::ExactlyOnce),
        &prices,
        &commands,
    );
    cfg.downlink.batch_max_bytes = edge_core::config::ByteSize::mib(1);
    cfg.downlink.batch_max_wait_ms = 5_000;
    store.start_downlink(cfg);
    let got = wait_count(&store, "hq.prices", 40).await;
    let skus: Vec<String> = got
        .iter()
        .map(|r| {
            let v: serde_json::Value = serde_json::from_slice(&r.event.payload).unwrap();
            v["sku"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(
        skus,
        (0..40).map(|i| i.to_string()).collect::<Vec<_>>(),
        "every record once, in order"
    );
    let status = store.status.clone();
    wait_until_async(
        "status to count 40 records",
        Duration::from_secs(10),
        || {
            let status = status.clone();
            async move {
                let s = status.get("downlink")?;
                (s.fields.get("records_applied_total")? == 40).then_some(())
            }
        },
    )
    .await;
    let batches = store.field("downlink", "batches_applied_total");
    let largest = store.field("downlink", "largest_batch_bytes");
    eprintln!("{batches} batches, the largest {largest} bytes");
    assert!(
        largest.as_u64().unwrap() <= (1 << 20) + 100_100,
        "no batch held more than the bound plus one record: {largest}"
    );
    assert!(
        batches.as_u64().unwrap() >= 4,
        "4 MB in batches of 1 MiB: {batches}"
    );
    store.stop_components().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crashes_during_apply_leave_no_half_batch_and_no_duplicate() {
    let b = shared_broker();
    let prices = unique("hq.prices");
    let commands = unique("hq.commands");
    create_topic(&b.bootstrap(), &prices).await;
    create_topic(&b.bootstrap(), &commands).await;
    let n = 30_000usize;
    {
        let p = hq_producer(&b.bootstrap());
        for i in 0..n {
            let payload = format!("{i}");
            let r = BaseRecord::<str, str>::to(&prices)
                .key("*")
                .payload(&payload);
            let mut r = r;
            loop {
                match p.send(r) {
                    Ok(()) => break,
                    Err((_, back)) => {
                        r = back;
                        std::thread::sleep(Duration::from_millis(5));
                    }
                }
            }
        }
        p.flush(Duration::from_secs(60)).unwrap();
    }
    let mut cfg = downlink_config(
        private_config(b, DeliveryMode::ExactlyOnce),
        &prices,
        &commands,
    );
    cfg.downlink.batch_max_records = 500;
    let mut store = Store::open();
    for _ in 0..10 {
        store.start_downlink(cfg.clone());
        let have = read_stream(&*store.log, "hq.prices").await.len();
        let target = (have + fastrand::usize(500..2500)).min(n);
        wait_count(&store, "hq.prices", target).await;
        tokio::time::sleep(Duration::from_millis(fastrand::u64(0..50))).await;
        store.abort_components().await;
    }
    store.start_downlink(cfg.clone());
    wait_count(&store, "hq.prices", n).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let got = read_stream(&*store.log, "hq.prices").await;
    let want: Vec<String> = (0..n).map(|i| i.to_string()).collect();
    assert_eq!(got.len(), n, "no duplicate, no loss");
    assert!(payloads(&got) == want, "applied in HQ order, once each");
    store.stop_components().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remirror_command_from_hq_sends_a_stream_again() {
    let b = shared_broker();
    let prices = unique("hq.prices");
    let commands = unique("hq.commands");
    create_topic(&b.bootstrap(), &prices).await;
    create_topic(&b.bootstrap(), &commands).await;
    let mut cfg = downlink_config(
        private_config(b, DeliveryMode::ExactlyOnce),
        &prices,
        &commands,
    );
    let hq_key = hq_signing_key();
    trust_hq_key(&mut cfg, &hq_key);
    let mut store = Store::open();
    let s = "pos.transactions";
    append(&*store.log, s, 0..300).await;
    store.start_uplink(cfg.clone());
    store.start_downlink(cfg.clone());
    let topic = cfg.topic(&store.id, s);
    let mut hq = HqConsumer::new(&b.bootstrap(), &[&topic], true);
    assert_eq!(hq.wait_for_count(&topic, 300, Duration::from_secs(60)), 300);
    // HQ lost seq >= 251 and asks for them again (commands are signed).
    let p = hq_producer(&b.bootstrap());
    let cmd = format!(
        "{{\"schema\":\"edge.command/1\",\"command\":\"remirror\",\"stream\":\"{s}\",\"from_seq\":251}}"
    );
    let sig = hq_signature(&hq_key, "hq.commands", Some(&store.id), None, &cmd);
    let sig: Vec<(&str, &str)> = sig.iter().map(|(k, v)| (*k, v.as_str())).collect();
    hq_send(&p, &commands, Some(&store.id), &cmd, &sig);
    assert_eq!(hq.wait_for_count(&topic, 350, Duration::from_secs(60)), 350);
    hq.poll_for(Duration::from_secs(2));
    let seen = hq.on(&topic);
    assert_eq!(seen.len(), 350, "exactly the requested range is sent again");
    for (i, m) in seen[300..].iter().enumerate() {
        assert_eq!(m.header("edge.seq"), (251 + i).to_string());
        assert_eq!(m.header("edge.replay"), "1");
    }
    assert!(
        seen[..300]
            .iter()
            .all(|m| m.header("edge.replay").is_empty())
    );
    // Records after the replayed range are normal again, and the command is not re-executed after
    // a restart.
    store.stop_components().await;
    append(&*store.log, s, 300..310).await;
    store.start_uplink(cfg.clone());
    store.start_downlink(cfg.clone());
    assert_eq!(hq.wait_for_count(&topic, 360, Duration::from_secs(60)), 360);
    hq.poll_for(Duration::from_secs(2));
    let seen = hq.on(&topic);
    assert_eq!(seen.len(), 360);
    assert_eq!(seen[350].header("edge.seq"), "301");
    assert_eq!(seen[350].header("edge.replay"), "");
    store.stop_components().await;
}
