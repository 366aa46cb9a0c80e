//! Load generator and HQ-side audit for `scripts/bench-peer.sh` (a peer side by side: Telegraf and
//! edge-agent on the same MQTT QoS 1 -> Kafka workload). Not a benchmark on its own: the script
//! starts the brokers and the system under test, and reads its CPU and memory from /proc.
//!
//! One run: (optionally) create the HQ topic, start an independent `read_committed` consumer at the
//! topic's end, publish `--messages` JSON messages at QoS 1 (window `--window`, PUBACK-tracked by
//! `edge_tests::publisher::publish_all`) on `store/<store>/pos/<device>/transactions`, and wait
//! until every event id of this run is visible at HQ (or `--idle-timeout` passes with nothing new).
//! Prints one JSON line: publish time, time from the first publish to the last record visible at
//! HQ, distinct / duplicate / missing event ids.

use clap::Parser;
use edge_tests::publisher::{Message, Progress, json_message, publish_all};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Message as _, Offset, TopicPartitionList};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    mqtt_port: u16,
    #[arg(long)]
    bootstrap: String,
    /// HQ topic the system under test writes to.
    #[arg(long)]
    topic: String,
    /// Create the topic with this many partitions first (already existing is fine).
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Event ids are `<prefix>-<i>`; only this run's ids are counted at HQ.
    #[arg(long)]
    prefix: String,
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    #[arg(long, default_value_t = 300)]
    payload_bytes: usize,
    #[arg(long, default_value_t = 1000)]
    window: usize,
    #[arg(long, default_value_t = 4)]
    devices: usize,
    #[arg(long, default_value = "s1")]
    store: String,
    /// Give up waiting at HQ after this long without a new record.
    #[arg(long, default_value_t = 60)]
    idle_timeout: u64,
}

fn event_index(payload: &[u8], prefix: &str) -> Option<usize> {
    let s = std::str::from_utf8(payload).ok()?;
    let at = s.find("\"event_id\":\"")? + "\"event_id\":\"".len();
    let rest = &s[at..];
    let id = &rest[..rest.find('"')?];
    id.strip_prefix(prefix)?.strip_prefix('-')?.parse().ok()
}

async fn create_topic(a: &Args) -> anyhow::Result<()> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &a.bootstrap)
        .create()?;
    for r in admin
        .create_topics(
            &[NewTopic::new(
                &a.topic,
                a.partitions,
                TopicReplication::Fixed(1),
            )],
            &AdminOptions::new(),
        )
        .await?
    {
        if let Err((t, e)) = r {
            anyhow::ensure!(
                e == rdkafka::error::RDKafkaErrorCode::TopicAlreadyExists,
                "creating {t}: {e}"
            );
        }
    }
    Ok(())
}

struct Audit {
    distinct: usize,
    total: usize,
    /// Records of this run whose value is not the published payload's length (changed on the way).
    altered: usize,
    /// Seconds after `t0` when the last new event id of this run became visible.
    last_new_s: f64,
}

fn consume(
    a: &Args,
    t0_cell: Arc<std::sync::OnceLock<Instant>>,
    ready: Arc<AtomicBool>,
) -> anyhow::Result<Audit> {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &a.bootstrap)
        .set("group.id", format!("peer-audit-{}", a.prefix))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("fetch.wait.max.ms", "20")
        .create()?;
    let mut tpl = TopicPartitionList::new();
    for p in 0..a.partitions {
        tpl.add_partition_offset(&a.topic, p, Offset::End)?;
    }
    c.assign(&tpl)?;
    // Let the logical End offsets resolve before anything of this run is published.
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(1500) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100))
            && event_index(m.payload().unwrap_or_default(), &a.prefix).is_some()
        {
            anyhow::bail!("records of run {} already on {}", a.prefix, a.topic);
        }
    }
    ready.store(true, Ordering::Release);
    let mut seen = vec![false; a.messages];
    let (mut distinct, mut total, mut altered) = (0usize, 0usize, 0usize);
    let mut last_new = Instant::now();
    let mut last_new_s = 0.0;
    while distinct < a.messages && last_new.elapsed() < Duration::from_secs(a.idle_timeout) {
        match c.poll(Duration::from_millis(100)) {
            Some(Ok(m)) => {
                let v = m.payload().unwrap_or_default();
                if let Some(i) = event_index(v, &a.prefix) {
                    total += 1;
                    if v.len() != a.payload_bytes {
                        altered += 1;
                    }
                    if i < seen.len() && !seen[i] {
                        seen[i] = true;
                        distinct += 1;
                        last_new = Instant::now();
                        if let Some(t0) = t0_cell.get() {
                            last_new_s = t0.elapsed().as_secs_f64();
                        }
                    }
                }
            }
            Some(Err(e)) => eprintln!("peer_publish: consumer: {e}"),
            None => {}
        }
    }
    // A short tail to catch duplicates delivered after the last new id.
    let tail = Instant::now();
    while tail.elapsed() < Duration::from_secs(2) {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(100))
            && event_index(m.payload().unwrap_or_default(), &a.prefix).is_some()
        {
            total += 1;
        }
    }
    Ok(Audit {
        distinct,
        total,
        altered,
        last_new_s,
    })
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Arc::new(Args::parse());
    if a.partitions > 0 {
        create_topic(&a).await?;
    }
    let msgs: Vec<Message> = (0..a.messages)
        .map(|i| {
            let topic = format!("store/{}/pos/dev{}/transactions", a.store, i % a.devices);
            json_message(&topic, &format!("{}-{i}", a.prefix), i, a.payload_bytes)
        })
        .collect();
    let t0_cell = Arc::new(std::sync::OnceLock::new());
    let ready = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (a, t0_cell, ready) = (a.clone(), t0_cell.clone(), ready.clone());
        std::thread::spawn(move || consume(&a, t0_cell, ready))
    };
    while !ready.load(Ordering::Acquire) {
        anyhow::ensure!(!consumer.is_finished(), "HQ consumer failed to start");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    let _ = t0_cell.set(t0);
    let start_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis();
    let r = publish_all(
        a.mqtt_port,
        &format!("peer-publisher-{}", a.prefix),
        msgs,
        a.window,
        Duration::from_secs(900),
        Progress::default(),
        None,
    )
    .await;
    let audit = consumer
        .join()
        .map_err(|_| anyhow::anyhow!("consumer panicked"))??;
    let n = a.messages;
    println!(
        "{}",
        serde_json::json!({
            "prefix": a.prefix,
            "topic": a.topic,
            "messages": n,
            "payload_bytes": a.payload_bytes,
            "window": a.window,
            "start_unix_ms": start_unix_ms as u64,
            "publish_s": (r.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
            "publish_msgs_per_sec": (n as f64 / r.elapsed.as_secs_f64()).round(),
            "visible_s": (audit.last_new_s * 1000.0).round() / 1000.0,
            "end_to_end_msgs_per_sec": if audit.distinct > 0 { (audit.distinct as f64 / audit.last_new_s).round() } else { 0.0 },
            "publisher_reconnects": r.reconnects,
            "hq_distinct": audit.distinct,
            "hq_total": audit.total,
            "hq_duplicates": audit.total - audit.distinct,
            "hq_missing": n - audit.distinct,
            "hq_altered_payloads": audit.altered,
        })
    );
    Ok(())
}
