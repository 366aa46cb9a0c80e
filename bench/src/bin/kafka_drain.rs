//! Drain of a backlog to a local Kafka broker: the uplink in `exactly_once` and `at_least_once`
//! mode against a bare librdkafka producer sending the same records (same payload, key and
//! headers, same compression) in the same run. Prints one JSON line per run and a summary line
//! with the ratios and the peak resident memory of this process during each drain.
//!
//! Run it with `scripts/bench-kafka.sh` (starts and stops the broker).

use clap::Parser;
use edge_core::component::ComponentContext;
use edge_core::log::{AppendRequest, Log};
use edge_core::{Event, Shutdown, Status};
use edge_sync::kafka::{DeliveryMode, KafkaConfig, Uplink};
use edge_sync::log::{IntegrityCheck, LogConfig, SqliteLog, Synchronous};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Kafka bootstrap address (scripts/bench-kafka.sh starts a broker and passes it).
    #[arg(long)]
    bootstrap: String,
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    #[arg(long, default_value_t = 300)]
    payload_bytes: usize,
    /// Rounds of (baseline, exactly_once, at_least_once); the best time of each is compared.
    #[arg(long, default_value_t = 2)]
    rounds: u32,
    /// Directory for the log (default: a temp dir in the current directory).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

const STREAM: &str = "pos.transactions";

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Samples RSS every 50 ms until stopped; returns the peak.
fn rss_sampler() -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let mut peak = rss_bytes();
        while !s.load(Ordering::Relaxed) {
            peak = peak.max(rss_bytes());
            std::thread::sleep(Duration::from_millis(50));
        }
        peak.max(rss_bytes())
    });
    (stop, h)
}

fn payload(i: u64, n: usize) -> Vec<u8> {
    let mut p = format!("{{\"schema\":\"pos.transaction/1\",\"i\":{i},\"pad\":\"").into_bytes();
    p.resize(n.saturating_sub(2), b'x');
    p.extend_from_slice(b"\"}");
    p
}

struct Run {
    mode: &'static str,
    seconds: f64,
    peak_rss: u64,
}

fn baseline(a: &Args, topic: &str, store: &str, epoch: &str) -> anyhow::Result<Run> {
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", &a.bootstrap)
        .set("compression.codec", "zstd")
        .set("linger.ms", "5")
        .set("batch.size", "1000000")
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .create()?;
    let (stop, sampler) = rss_sampler();
    let t0 = Instant::now();
    for i in 0..a.records {
        let body = payload(i, a.payload_bytes);
        let seq = (i + 1).to_string();
        let ts = (1_700_000_000_000 + i as i64).to_string();
        let h = OwnedHeaders::new_with_capacity(8)
            .insert(Header {
                key: "edge.store",
                value: Some(store),
            })
            .insert(Header {
                key: "edge.stream",
                value: Some(STREAM),
            })
            .insert(Header {
                key: "edge.epoch",
                value: Some(epoch),
            })
            .insert(Header {
                key: "edge.seq",
                value: Some(seq.as_str()),
            })
            .insert(Header {
                key: "edge.ingest_ts",
                value: Some(ts.as_str()),
            })
            .insert(Header {
                key: "edge.src",
                value: Some("pos-1"),
            })
            .insert(Header {
                key: "edge.schema",
                value: Some("pos.transaction/1"),
            });
        let mut rec = BaseRecord::to(topic)
            .key(store)
            .payload(&body)
            .headers(h)
            .timestamp(1_700_000_000_000 + i as i64);
        loop {
            match p.send(rec) {
                Ok(()) => break,
                Err((_, r)) => {
                    rec = r;
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
        }
    }
    p.flush(Duration::from_secs(300))?;
    let seconds = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let peak_rss = sampler.join().unwrap_or(0);
    Ok(Run {
        mode: "bare_librdkafka",
        seconds,
        peak_rss,
    })
}

async fn uplink(
    a: &Args,
    log: Arc<SqliteLog>,
    mode: DeliveryMode,
    prefix: &str,
) -> anyhow::Result<Run> {
    // Start from the beginning of the backlog again.
    log.append(AppendRequest::cursor("uplink", STREAM, 1))
        .await?;
    let cfg = KafkaConfig {
        brokers: vec![a.bootstrap.clone()],
        mode,
        topic_template: format!("{prefix}.{{stream}}"),
        checkpoint_topic: format!("{prefix}.__checkpoints"),
        heartbeat_topic: format!("{prefix}.heartbeats"),
        gap_topic: format!("{prefix}.gaps"),
        topic_partitions: 1,
        ..KafkaConfig::default()
    };
    let shutdown = Shutdown::new();
    let status = Status::new();
    let ctx = ComponentContext {
        store_id: Arc::from(format!("{prefix}-store").as_str()),
        log: log.clone(),
        shutdown: shutdown.clone(),
        status: status.register("uplink", "kafka"),
        data_dir: std::env::temp_dir(),
    };
    let task = Uplink::new(cfg, "uplink").build(ctx)?;
    let (stop, sampler) = rss_sampler();
    let t0 = Instant::now();
    let handle = tokio::spawn(task);
    let end = a.records + 1;
    let mut commits = log.subscribe();
    loop {
        if log.cursor("uplink", STREAM).await? == Some(end) {
            break;
        }
        tokio::select! {
            _ = commits.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(900),
            "the drain did not finish in 15 minutes: {:?}",
            status.get("uplink")
        );
    }
    let seconds = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let peak_rss = sampler.join().unwrap_or(0);
    shutdown.stop_all();
    handle
        .await?
        .map_err(|e| anyhow::anyhow!("uplink failed: {e}"))?;
    Ok(Run {
        mode: mode.as_str(),
        seconds,
        peak_rss,
    })
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let tmp = match &a.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir_in(".")?,
    };
    let cfg = LogConfig {
        synchronous: Synchronous::Normal,
        disk_budget: edge_core::config::ByteSize::gib(50),
        min_free_disk: edge_core::config::ByteSize::b(0),
        integrity_check: IntegrityCheck::Off,
        retention: None,
        ..LogConfig::default()
    };
    let log = Arc::new(SqliteLog::open(tmp.path(), cfg)?);
    let fill = Instant::now();
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..a.records {
        batch.push(
            Event::new(STREAM, payload(i, a.payload_bytes))
                .with_event_ts(1_700_000_000_000 + i as i64)
                .with_key("lane-1")
                .with_source("pos-1")
                .with_schema("pos.transaction/1"),
        );
        if batch.len() == 10_000 {
            log.append(AppendRequest::events(std::mem::take(&mut batch)))
                .await?;
        }
    }
    if !batch.is_empty() {
        log.append(AppendRequest::events(batch)).await?;
    }
    eprintln!(
        "filled the log with {} records in {:.1}s; rss {} MiB",
        a.records,
        fill.elapsed().as_secs_f64(),
        rss_bytes() >> 20
    );
    let epoch = log.epoch().to_string();
    let run_id = AtomicU64::new(0);
    let mut best: std::collections::BTreeMap<&'static str, Run> = Default::default();
    for round in 0..a.rounds {
        let tag = format!("bench{:x}r{round}", std::process::id());
        let mut runs = Vec::new();
        let (b_args, b_topic, b_epoch) = (&a, format!("{tag}-bare.{STREAM}"), epoch.clone());
        let store = format!("{tag}-bare-store");
        runs.push(tokio::task::block_in_place(|| {
            baseline(b_args, &b_topic, &store, &b_epoch)
        })?);
        for mode in [DeliveryMode::ExactlyOnce, DeliveryMode::AtLeastOnce] {
            let n = run_id.fetch_add(1, Ordering::Relaxed);
            runs.push(uplink(&a, log.clone(), mode, &format!("{tag}-{n}")).await?);
        }
        for r in runs {
            println!(
                "{}",
                serde_json::json!({
                    "bench": "kafka_drain",
                    "round": round,
                    "mode": r.mode,
                    "records": a.records,
                    "payload_bytes": a.payload_bytes,
                    "seconds": (r.seconds * 1000.0).round() / 1000.0,
                    "records_per_sec": (a.records as f64 / r.seconds).round(),
                    "peak_rss_mib": r.peak_rss >> 20,
                })
            );
            let keep = best.get(r.mode).is_none_or(|b| r.seconds < b.seconds);
            if keep {
                best.insert(r.mode, r);
            }
        }
    }
    let rate = |m: &str| best.get(m).map_or(0.0, |r| a.records as f64 / r.seconds);
    let base = rate("bare_librdkafka");
    println!(
        "{}",
        serde_json::json!({
            "bench": "kafka_drain_summary",
            "records": a.records,
            "payload_bytes": a.payload_bytes,
            "best_records_per_sec": {
                "bare_librdkafka": base.round(),
                "exactly_once": rate("exactly_once").round(),
                "at_least_once": rate("at_least_once").round(),
            },
            "ratio_exactly_once": ((rate("exactly_once") / base) * 100.0).round() / 100.0,
            "ratio_at_least_once": ((rate("at_least_once") / base) * 100.0).round() / 100.0,
            "peak_rss_mib": best.iter().map(|(k, r)| (k.to_string(), serde_json::json!(r.peak_rss >> 20))).collect::<serde_json::Map<_, _>>(),
        })
    );
    log.close().await?;
    Ok(())
}
