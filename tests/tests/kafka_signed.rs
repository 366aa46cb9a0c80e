//! Signed downlink against a real Kafka broker: HQ's signed records are applied, forged, unsigned
//! (where required) and wildcard commands go to `deadletter` with their reason, are counted in
//! status, cost their offset and nothing else, and the downlink goes on to the records after them.

#![allow(clippy::unwrap_used)] // test code: a failed set-up step should fail the test loudly

use edge_core::Record;
use edge_core::log::{Log, ReadLimits};
use edge_sync::kafka::{DeliveryMode, DownlinkTopic, KafkaConfig};
use edge_tests::kafka::{
    HqConsumer, Store, append, create_topic, hq_producer, hq_send, hq_signature, hq_signing_key,
    private_config, shared_broker, trust_hq_key, unique, wait_until_async,
};
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

fn json(r: &Record) -> serde_json::Value {
    serde_json::from_slice(&r.event.payload).unwrap()
}

fn config(prices: &str, commands: &str) -> KafkaConfig {
    let mut cfg = private_config(shared_broker(), DeliveryMode::ExactlyOnce);
    // Prices: signatures optional (verified when present); commands: required (the default).
    cfg.downlink.topics = vec![
        DownlinkTopic::new(prices, "hq.prices"),
        DownlinkTopic::new(commands, "hq.commands"),
    ];
    cfg.downlink.metadata_refresh_ms = 1000;
    trust_hq_key(&mut cfg, &hq_signing_key());
    cfg
}

fn refs<'a>(h: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
    h.iter().map(|(k, v)| (*k, v.as_str())).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_unsigned_records_are_dead_lettered_and_the_good_ones_around_them_applied() {
    let b = shared_broker();
    let prices = unique("hq.prices");
    let commands = unique("hq.commands");
    create_topic(&b.bootstrap(), &prices).await;
    create_topic(&b.bootstrap(), &commands).await;
    let mut store = Store::open();
    let me = store.id.clone();
    let hq = hq_signing_key();
    let p = hq_producer(&b.bootstrap());

    let price =
        |i: u32| format!("{{\"schema\":\"price/1\",\"sku\":\"{i}\",\"price_cents\":{i}99}}");
    // prices: unsigned good, signed good, forged (signed for another payload), unsigned good
    hq_send(&p, &prices, Some(&me), &price(1), &[]);
    let sig = hq_signature(&hq, "hq.prices", Some(&me), None, &price(2));
    hq_send(&p, &prices, Some(&me), &price(2), &refs(&sig));
    let sig = hq_signature(&hq, "hq.prices", Some(&me), None, &price(3));
    let forged = "{\"schema\":\"price/1\",\"sku\":\"3\",\"price_cents\":1}";
    hq_send(&p, &prices, Some(&me), forged, &refs(&sig));
    hq_send(&p, &prices, Some(&me), &price(4), &[]);

    let cmd = |from: u64| {
        format!(
            "{{\"schema\":\"edge.command/1\",\"command\":\"remirror\",\"stream\":\"pos.nothing\",\"from_seq\":{from}}}"
        )
    };
    // commands: signed good, unsigned, signed for all stores (`*`), signed for another store but
    // re-keyed to this one, signed good
    let sig = hq_signature(&hq, "hq.commands", Some(&me), None, &cmd(1));
    hq_send(&p, &commands, Some(&me), &cmd(1), &refs(&sig));
    hq_send(&p, &commands, Some(&me), &cmd(2), &[]);
    let sig = hq_signature(&hq, "hq.commands", Some("*"), None, &cmd(3));
    hq_send(&p, &commands, Some("*"), &cmd(3), &refs(&sig));
    let sig = hq_signature(&hq, "hq.commands", Some("store-elsewhere"), None, &cmd(4));
    hq_send(&p, &commands, Some(&me), &cmd(4), &refs(&sig));
    let sig = hq_signature(&hq, "hq.commands", Some(&me), None, &cmd(5));
    hq_send(&p, &commands, Some(&me), &cmd(5), &refs(&sig));

    let cfg = config(&prices, &commands);
    store.start_downlink(cfg.clone());
    let got = wait_count(&store, "hq.prices", 3).await;
    assert_eq!(payloads(&got), vec![price(1), price(2), price(4)]);
    let got = wait_count(&store, "hq.commands", 2).await;
    assert_eq!(payloads(&got), vec![cmd(1), cmd(5)]);
    let dead = wait_count(&store, "deadletter", 4).await;
    let mut by_reason: Vec<(String, String, String)> = dead
        .iter()
        .map(|r| {
            let v = json(r);
            assert_eq!(v["origin"], "downlink");
            assert_eq!(v["schema"], "deadletter/1");
            (
                v["refusal"].as_str().unwrap().to_string(),
                v["topic"].as_str().unwrap().to_string(),
                v["offset"].to_string(),
            )
        })
        .collect();
    by_reason.sort();
    assert_eq!(
        by_reason,
        vec![
            ("bad_signature".into(), commands.clone(), "3".into()),
            ("bad_signature".into(), prices.clone(), "2".into()),
            ("unaddressed_command".into(), commands.clone(), "2".into()),
            ("unsigned".into(), commands.clone(), "1".into()),
        ]
    );
    let forged_dl = dead
        .iter()
        .map(json)
        .find(|v| v["topic"] == prices.as_str())
        .unwrap();
    assert!(
        forged_dl["reason"]
            .as_str()
            .unwrap()
            .contains("does not match the record"),
        "{forged_dl}"
    );
    assert_eq!(forged_dl["headers"]["edge.sig.key"], hq.id().as_str());
    assert_eq!(forged_dl["key"], me.as_str());

    // Status tells the refusals apart; the downlink is up.
    let status = store.status.clone();
    wait_until_async(
        "status to count 4 refusals",
        Duration::from_secs(10),
        || {
            let status = status.clone();
            async move {
                let s = status.get("downlink")?;
                (s.fields.get("refused_records")? == 4).then_some(())
            }
        },
    )
    .await;
    let by = store.field("downlink", "refused_by_reason");
    assert_eq!(by["bad_signature"], 2, "{by}");
    assert_eq!(by["unsigned"], 1, "{by}");
    assert_eq!(by["unaddressed_command"], 1, "{by}");
    let last = store.field("downlink", "last_refusal");
    assert!(
        last["reason"].is_string() && last["offset"].is_number(),
        "{last}"
    );
    assert_eq!(store.field("downlink", "signature_keys"), 1);

    // The downlink goes on, and after a restart nothing is applied or dead-lettered again.
    hq_send(&p, &prices, Some(&me), &price(5), &[]);
    wait_count(&store, "hq.prices", 4).await;
    store.stop_components().await;
    let sig = hq_signature(&hq, "hq.commands", Some(&me), None, &cmd(6));
    hq_send(&p, &commands, Some(&me), &cmd(6), &refs(&sig));
    store.start_downlink(cfg.clone());
    let got = wait_count(&store, "hq.commands", 3).await;
    assert_eq!(payloads(&got), vec![cmd(1), cmd(5), cmd(6)]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(read_stream(&*store.log, "deadletter").await.len(), 4);
    assert_eq!(read_stream(&*store.log, "hq.prices").await.len(), 4);
    store.stop_components().await;
}

/// Before: a `remirror` with key `*` reached every store and re-sent its whole history. Now it is
/// refused however it is signed, and the same command addressed to the store works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wildcard_remirror_resends_nothing() {
    let b = shared_broker();
    let prices = unique("hq.prices");
    let commands = unique("hq.commands");
    create_topic(&b.bootstrap(), &prices).await;
    create_topic(&b.bootstrap(), &commands).await;
    let cfg = config(&prices, &commands);
    let mut store = Store::open();
    let s = "pos.transactions";
    append(&*store.log, s, 0..100).await;
    store.start_uplink(cfg.clone());
    store.start_downlink(cfg.clone());
    let topic = cfg.topic(&store.id, s);
    let mut hq_view = HqConsumer::new(&b.bootstrap(), &[&topic], true);
    assert_eq!(
        hq_view.wait_for_count(&topic, 100, Duration::from_secs(60)),
        100
    );
    let hq = hq_signing_key();
    let p = hq_producer(&b.bootstrap());
    let all = format!(
        "{{\"schema\":\"edge.command/1\",\"command\":\"remirror\",\"stream\":\"{s}\",\"from_seq\":1}}"
    );
    let sig = hq_signature(&hq, "hq.commands", Some("*"), None, &all);
    hq_send(&p, &commands, Some("*"), &all, &refs(&sig));
    let sig = hq_signature(&hq, "hq.commands", None, Some("*"), &all);
    hq_send(
        &p,
        &commands,
        None,
        &all,
        &[&refs(&sig)[..], &[("edge.store", "*")]].concat(),
    );
    wait_count(&store, "deadletter", 2).await;
    // The uplink had every chance to act on the commands: it re-reads commands every transaction.
    hq_view.poll_for(Duration::from_secs(3));
    assert_eq!(
        hq_view.on(&topic).len(),
        100,
        "a wildcard remirror re-sent records"
    );
    assert!(read_stream(&*store.log, "hq.commands").await.is_empty());
    // Addressed to this store, the same command re-sends the stream.
    let sig = hq_signature(&hq, "hq.commands", Some(&store.id), None, &all);
    hq_send(&p, &commands, Some(&store.id), &all, &refs(&sig));
    assert_eq!(
        hq_view.wait_for_count(&topic, 200, Duration::from_secs(60)),
        200
    );
    store.stop_components().await;
}
