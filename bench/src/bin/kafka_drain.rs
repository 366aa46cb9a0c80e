//! Drain of a backlog to a local Kafka broker: the uplink in `exactly_once` and `at_least_once`
//! mode against a bare librdkafka producer sending the same records (same payload, key and
//! headers, same compression) in the same run. Prints one JSON line per run and a summary line
//! with the ratios and the peak resident memory of this process during each drain.
//!
//! Each drain runs in its own child process (this binary with `--child MODE`), so the peak resident
//! memory reported is that drain's alone. Run it with `scripts/bench-kafka.sh` (starts and stops
//! the broker).

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
use std::sync::atomic::{AtomicBool, Ordering};
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
    /// Uplink batch size (default: the config default).
    #[arg(long, default_value_t = KafkaConfig::default().batch_max_records)]
    batch_max_records: usize,
    #[arg(long, default_value_t = KafkaConfig::default().batch_max_bytes.as_u64() >> 20)]
    batch_max_mib: u64,
    /// Unmeasured drains of the bare producer first, so the broker's JIT is warm.
    #[arg(long, default_value_t = 1)]
    warmup: u32,
    /// Internal: run one drain (`bare_librdkafka`, `exactly_once`, `at_least_once`) on the log in
    /// `--log-dir` and print its JSON line.
    #[arg(long, hide = true)]
    child: Option<String>,
    #[arg(long, hide = true)]
    log_dir: Option<std::path::PathBuf>,
    #[arg(long, hide = true, default_value = "x")]
    tag: String,
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
        batch_max_records: a.batch_max_records,
        batch_max_bytes: edge_core::config::ByteSize::mib(a.batch_max_mib),
        producer_queue_bytes: edge_core::config::ByteSize::mib(
            (a.batch_max_mib * 2).max(KafkaConfig::default().producer_queue_bytes.as_u64() >> 20),
        ),
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

fn log_config() -> LogConfig {
    LogConfig {
        synchronous: Synchronous::Normal,
        disk_budget: edge_core::config::ByteSize::gib(50),
        min_free_disk: edge_core::config::ByteSize::b(0),
        integrity_check: IntegrityCheck::Off,
        retention: None,
        ..LogConfig::default()
    }
}

/// One drain in this (child) process.
async fn child(a: &Args, mode: &str) -> anyhow::Result<()> {
    let dir = a
        .log_dir
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--child needs --log-dir"))?;
    let log = Arc::new(SqliteLog::open(&dir, log_config())?);
    let epoch = log.epoch().to_string();
    let r = match mode {
        "bare_librdkafka" => {
            let topic = format!("{}-bare.{STREAM}", a.tag);
            let store = format!("{}-bare-store", a.tag);
            tokio::task::block_in_place(|| baseline(a, &topic, &store, &epoch))?
        }
        "exactly_once" => uplink(a, log.clone(), DeliveryMode::ExactlyOnce, &a.tag).await?,
        "at_least_once" => uplink(a, log.clone(), DeliveryMode::AtLeastOnce, &a.tag).await?,
        other => anyhow::bail!("unknown mode {other}"),
    };
    log.close().await?;
    println!(
        "{}",
        serde_json::json!({
            "bench": "kafka_drain",
            "mode": r.mode,
            "records": a.records,
            "payload_bytes": a.payload_bytes,
            "batch_max_records": a.batch_max_records,
            "batch_max_mib": a.batch_max_mib,
            "seconds": (r.seconds * 1000.0).round() / 1000.0,
            "records_per_sec": (a.records as f64 / r.seconds).round(),
            "peak_rss_mib": r.peak_rss >> 20,
        })
    );
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    if let Some(mode) = a.child.clone() {
        return child(&a, &mode).await;
    }
    let tmp = match &a.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir_in(".")?,
    };
    let log = SqliteLog::open(tmp.path(), log_config())?;
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
    log.close().await?;
    drop(log);
    eprintln!(
        "filled the log with {} records in {:.1}s",
        a.records,
        fill.elapsed().as_secs_f64()
    );
    let exe = std::env::current_exe()?;
    let mut best: std::collections::BTreeMap<String, serde_json::Value> = Default::default();
    let schedule = (0..a.warmup)
        .map(|_| (None, "bare_librdkafka"))
        .chain((0..a.rounds).flat_map(|r| {
            ["bare_librdkafka", "exactly_once", "at_least_once"]
                .into_iter()
                .map(move |m| (Some(r), m))
        }));
    for (round, mode) in schedule {
        {
            let tag = format!(
                "bench{:x}r{}{}",
                std::process::id(),
                round.map_or("w".into(), |r| r.to_string()),
                &mode[..3]
            );
            let out = std::process::Command::new(&exe)
                .args(["--bootstrap", &a.bootstrap])
                .args(["--records", &a.records.to_string()])
                .args(["--payload-bytes", &a.payload_bytes.to_string()])
                .args(["--batch-max-records", &a.batch_max_records.to_string()])
                .args(["--batch-max-mib", &a.batch_max_mib.to_string()])
                .args(["--child", mode, "--tag", &tag])
                .arg("--log-dir")
                .arg(tmp.path())
                .stderr(std::process::Stdio::inherit())
                .output()?;
            anyhow::ensure!(out.status.success(), "the {mode} drain failed");
            let line = String::from_utf8_lossy(&out.stdout).trim().to_string();
            let Some(round) = round else {
                eprintln!("warm-up: {line}");
                continue;
            };
            eprintln!("round {round}");
            println!("{line}");
            let v: serde_json::Value = serde_json::from_str(&line)?;
            let faster = best.get(mode).is_none_or(|b| {
                v["seconds"].as_f64().unwrap_or(f64::MAX)
                    < b["seconds"].as_f64().unwrap_or(f64::MAX)
            });
            if faster {
                best.insert(mode.to_string(), v);
            }
        }
    }
    let rate = |m: &str| {
        best.get(m)
            .and_then(|v| v["records_per_sec"].as_f64())
            .unwrap_or(0.0)
    };
    let rss = |m: &str| best.get(m).map(|v| v["peak_rss_mib"].clone());
    let base = rate("bare_librdkafka");
    println!(
        "{}",
        serde_json::json!({
            "bench": "kafka_drain_summary",
            "records": a.records,
            "payload_bytes": a.payload_bytes,
            "rounds": a.rounds,
            "best_records_per_sec": {
                "bare_librdkafka": base,
                "exactly_once": rate("exactly_once"),
                "at_least_once": rate("at_least_once"),
            },
            "ratio_exactly_once": ((rate("exactly_once") / base) * 100.0).round() / 100.0,
            "ratio_at_least_once": ((rate("at_least_once") / base) * 100.0).round() / 100.0,
            "peak_rss_mib": {
                "bare_librdkafka": rss("bare_librdkafka"),
                "exactly_once": rss("exactly_once"),
                "at_least_once": rss("at_least_once"),
            },
        })
    );
    Ok(())
}
