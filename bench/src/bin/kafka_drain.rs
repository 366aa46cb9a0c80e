//! Drain of a backlog to a local Kafka broker: the uplink in `exactly_once` and `at_least_once`
//! mode against a bare librdkafka producer sending the same records (same payload, key and
//! headers, same compression) in the same run. Prints one JSON line per run and a summary line
//! with the ratios and the peak resident memory of each drain.
//!
//! The uplink drains run the real release agent binary (`edge-agent run`, its default `[kafka]`
//! settings, an idle MQTT connection to a real Mosquitto, the downlink consumer and the HTTP
//! server), so the memory figure is the whole agent's, with its allocator. The bare producer runs
//! in a child process of this binary (`--child bare_librdkafka`). Peak memory is the kernel's
//! high-water mark of resident memory (`VmHWM`) of that process. Run it with
//! `scripts/bench-kafka.sh` (builds both binaries, starts and stops the broker).

use clap::Parser;
use edge_core::Event;
use edge_core::log::{AppendRequest, Log};
use edge_sync::log::{IntegrityCheck, LogConfig, SqliteLog, Synchronous};
use rdkafka::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Event time of record `i`: an hour before the benchmark started, plus `i` ms. A plausible time,
/// so the uplink sends it as the Kafka timestamp (an implausible one would cost an extra
/// `edge.event_ts` header that the baseline does not send).
fn event_ts(i: u64) -> i64 {
    static T0: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    *T0.get_or_init(|| edge_core::time::now_ms() - 3_600_000) + i as i64
}

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
    /// The agent binary (`cargo build --release -p edge-agent`).
    #[arg(long, default_value = "target/release/edge-agent")]
    agent: PathBuf,
    /// Modes to run, comma-separated (`bare_librdkafka`, `exactly_once`, `at_least_once`).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "bare_librdkafka,exactly_once,at_least_once"
    )]
    modes: Vec<String>,
    /// Extra TOML lines for the agent's `[kafka]` section (tuning experiments, e.g.
    /// `producer_queue_bytes = "4 MiB"`); default: the shipped defaults.
    #[arg(long, default_value = "")]
    kafka_toml: String,
    /// Unmeasured rounds of every mode first, so the broker's JIT is warm for plain and
    /// transactional produce alike.
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

/// A `/proc/<pid>/status` field in bytes (`VmRSS`, `VmHWM`, `RssAnon`, ...).
fn proc_status(pid: &str, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// Samples `RssAnon` (heap, stacks) of `pid` every 50 ms until stopped; returns its peak.
fn anon_sampler(pid: String) -> (Arc<AtomicBool>, std::thread::JoinHandle<u64>) {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let h = std::thread::spawn(move || {
        let mut peak = 0;
        while !s.load(Ordering::Relaxed) {
            peak = peak.max(proc_status(&pid, "RssAnon"));
            std::thread::sleep(Duration::from_millis(50));
        }
        peak.max(proc_status(&pid, "RssAnon"))
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
    /// Kernel high-water mark of resident memory.
    peak_rss: u64,
    /// Peak of anonymous resident memory (sampled).
    peak_anon: u64,
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
    let (stop, sampler) = anon_sampler("self".into());
    let t0 = Instant::now();
    for i in 0..a.records {
        let body = payload(i, a.payload_bytes);
        let seq = (i + 1).to_string();
        let ts = (event_ts(i)).to_string();
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
            .timestamp(event_ts(i));
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
    let peak_anon = sampler.join().unwrap_or(0);
    Ok(Run {
        mode: "bare_librdkafka",
        seconds,
        peak_rss: proc_status("self", "VmHWM"),
        peak_anon,
    })
}

/// The uplink cursor of the backlog stream, read from the agent's database (read-only, WAL).
fn uplink_cursor(db: &rusqlite::Connection) -> u64 {
    db.query_row(
        "SELECT c.next_seq FROM cursors c JOIN streams s ON s.id = c.stream_id \
         WHERE c.name = 'uplink' AND s.name = ?1",
        [STREAM],
        |r| r.get::<_, i64>(0),
    )
    .map_or(0, |v| v as u64)
}

/// One uplink drain by the real agent binary on the log in `data`.
async fn agent_drain(
    a: &Args,
    data: &Path,
    dir: &Path,
    mqtt_port: u16,
    mode: &'static str,
    prefix: &str,
) -> anyhow::Result<Run> {
    // Start from the beginning of the backlog again (the topics, the checkpoint topic and the
    // store id are new per drain, so the checkpoint does not move the start).
    {
        let log = SqliteLog::open(data, log_config())?;
        log.append(AppendRequest::cursor("uplink", STREAM, 1))
            .await?;
        log.close().await?;
    }
    tokio::task::block_in_place(|| run_agent(a, data, dir, mqtt_port, mode, prefix))
}

fn run_agent(
    a: &Args,
    data: &Path,
    dir: &Path,
    mqtt_port: u16,
    mode: &'static str,
    prefix: &str,
) -> anyhow::Result<Run> {
    let http_port = edge_tests::free_port();
    let cfg = format!(
        r#"[agent]
store_id = "{prefix}-store"
data_dir = "{data}"
health_interval = "0s"
log_level = "warn"
[log]
disk_budget = "50 GiB"
min_free_disk = "0 B"
integrity_check = "off"
synchronous = "normal"
[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
[http]
listen = "127.0.0.1:{http_port}"
[kafka]
brokers = ["{bootstrap}"]
mode = "{mode}"
topic_template = "{prefix}.{{stream}}"
checkpoint_topic = "{prefix}.__checkpoints"
heartbeat_topic = "{prefix}.heartbeats"
gap_topic = "{prefix}.gaps"
topic_partitions = 1
{extra}
"#,
        data = data.display(),
        bootstrap = a.bootstrap,
        extra = a.kafka_toml,
    );
    let cfg_path = dir.join(format!("agent-{prefix}.toml"));
    std::fs::write(&cfg_path, cfg)?;
    let db = rusqlite::Connection::open_with_flags(
        data.join("log.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )?;
    let end = a.records + 1;
    let t0 = Instant::now();
    let mut child = std::process::Command::new(&a.agent)
        .args(["run", "--config"])
        .arg(&cfg_path)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit())
        .spawn()?;
    let pid = child.id().to_string();
    let (stop, sampler) = anon_sampler(pid.clone());
    let result = loop {
        if uplink_cursor(&db) == end {
            break Ok(t0.elapsed().as_secs_f64());
        }
        if let Ok(Some(st)) = child.try_wait() {
            break Err(anyhow::anyhow!("the agent exited during the drain: {st}"));
        }
        if t0.elapsed() > Duration::from_secs(900) {
            break Err(anyhow::anyhow!("the drain did not finish in 15 minutes"));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let peak_rss = proc_status(&pid, "VmHWM");
    stop.store(true, Ordering::Relaxed);
    let peak_anon = sampler.join().unwrap_or(0);
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let st = child.wait()?;
    let seconds = result?;
    anyhow::ensure!(st.success(), "the agent did not stop cleanly: {st}");
    Ok(Run {
        mode,
        seconds,
        peak_rss,
        peak_anon,
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

fn print_run(a: &Args, r: &Run) {
    let mut out = std::io::stdout();
    print_run_to(&mut out, a, r);
}

fn print_run_to(out: &mut impl std::io::Write, a: &Args, r: &Run) {
    let _ = writeln!(
        out,
        "{}",
        serde_json::json!({
            "bench": "kafka_drain",
            "mode": r.mode,
            "records": a.records,
            "payload_bytes": a.payload_bytes,
            "kafka_toml": a.kafka_toml,
            "seconds": (r.seconds * 1000.0).round() / 1000.0,
            "records_per_sec": (a.records as f64 / r.seconds).round(),
            "peak_rss_mib": ((r.peak_rss as f64 / 1048576.0) * 10.0).round() / 10.0,
            "peak_anon_mib": ((r.peak_anon as f64 / 1048576.0) * 10.0).round() / 10.0,
        })
    );
}

/// The bare producer's drain in this (child) process.
async fn child(a: &Args, mode: &str) -> anyhow::Result<()> {
    anyhow::ensure!(mode == "bare_librdkafka", "unknown child mode {mode}");
    let dir = a
        .log_dir
        .clone()
        .ok_or_else(|| anyhow::anyhow!("--child needs --log-dir"))?;
    let log = Arc::new(SqliteLog::open(&dir, log_config())?);
    let epoch = log.epoch().to_string();
    log.close().await?;
    drop(log);
    let topic = format!("{}-bare.{STREAM}", a.tag);
    let store = format!("{}-bare-store", a.tag);
    let r = tokio::task::block_in_place(|| baseline(a, &topic, &store, &epoch))?;
    print_run(a, &r);
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
                .with_event_ts(event_ts(i))
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
    let mqtt = edge_tests::mosquitto::Mosquitto::start();
    let mut runs: std::collections::BTreeMap<String, Vec<serde_json::Value>> = Default::default();
    let modes: Vec<&'static str> = ["bare_librdkafka", "exactly_once", "at_least_once"]
        .into_iter()
        .filter(|m| a.modes.iter().any(|x| x == m))
        .collect();
    let schedule = (0..a.warmup)
        .flat_map(|_| modes.iter().map(|m| (None, *m)))
        .chain((0..a.rounds).flat_map(|r| modes.iter().map(move |m| (Some(r), *m))));
    for (round, mode) in schedule {
        let tag = format!(
            "bench{:x}r{}{}",
            std::process::id(),
            round.map_or("w".into(), |r| r.to_string()),
            &mode[..3]
        );
        let line = if mode == "bare_librdkafka" {
            let out = std::process::Command::new(&exe)
                .args(["--bootstrap", &a.bootstrap])
                .args(["--records", &a.records.to_string()])
                .args(["--payload-bytes", &a.payload_bytes.to_string()])
                .args(["--child", mode, "--tag", &tag])
                .arg("--log-dir")
                .arg(tmp.path())
                .stderr(std::process::Stdio::inherit())
                .output()?;
            anyhow::ensure!(out.status.success(), "the {mode} drain failed");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        } else {
            let r = agent_drain(&a, tmp.path(), tmp.path(), mqtt.port, mode, &tag).await?;
            let mut buf = Vec::new();
            print_run_to(&mut buf, &a, &r);
            String::from_utf8_lossy(&buf).trim().to_string()
        };
        let Some(round) = round else {
            eprintln!("warm-up: {line}");
            continue;
        };
        eprintln!("round {round}");
        println!("{line}");
        let v: serde_json::Value = serde_json::from_str(&line)?;
        runs.entry(mode.to_string()).or_default().push(v);
    }
    let best = |m: &str| {
        runs.get(m)
            .into_iter()
            .flatten()
            .filter_map(|v| v["records_per_sec"].as_f64())
            .fold(0.0, f64::max)
    };
    let peak = |m: &str| {
        runs.get(m)
            .into_iter()
            .flatten()
            .filter_map(|v| v["peak_rss_mib"].as_f64())
            .fold(0.0, f64::max)
    };
    let base = best("bare_librdkafka");
    let ratio = |m: &str| {
        if base > 0.0 {
            (best(m) / base * 100.0).round() / 100.0
        } else {
            0.0
        }
    };
    println!(
        "{}",
        serde_json::json!({
            "bench": "kafka_drain_summary",
            "records": a.records,
            "payload_bytes": a.payload_bytes,
            "rounds": a.rounds,
            "kafka_toml": a.kafka_toml,
            "best_records_per_sec": {
                "bare_librdkafka": base,
                "exactly_once": best("exactly_once"),
                "at_least_once": best("at_least_once"),
            },
            "ratio_exactly_once": ratio("exactly_once"),
            "ratio_at_least_once": ratio("at_least_once"),
            "max_peak_rss_mib": {
                "bare_librdkafka": peak("bare_librdkafka"),
                "exactly_once": peak("exactly_once"),
                "at_least_once": peak("at_least_once"),
            },
        })
    );
    Ok(())
}
