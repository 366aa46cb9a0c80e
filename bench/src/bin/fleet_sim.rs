//! Fleet simulation: many stores against one real broker, each store the real uplink code
//! (`edge_sync::kafka::Uplink`, exactly_once) over its own SQLite log, with its own store id and
//! transactional id, in one process (an in-process harness: 200 agent processes would not fit 2
//! cores next to the broker; what is shared is the process, the tokio runtime and the allocator).
//!
//! Each store appends 5-50 records/s (its rate drawn at random) to `pos.transactions`, mirrored to
//! the fleet's shared topic `fleet.pos.transactions`. At random its uplink is killed (task
//! aborted mid-transaction, like a `kill -9` of its agent) and restarted 3-15 s later. The fleet
//! grows through `--sizes`; at each size it measures over `--window-s`:
//! - session start: from a restart to the first committed transaction (the restart's pending
//!   records), p50/p99;
//! - broker CPU (cores, from `/proc/<pid>/stat`) and RSS, and requests/s by type (the broker's
//!   `RequestsPerSec` counters, scraped from `--metrics-url`, a JMX exporter);
//! - end-to-end lag (HQ's `read_committed` consumer: receive time minus the record's timestamp,
//!   its append time), for records appended while their store was up, and for those appended in an
//!   outage;
//! - RSS of this process per store;
//! - what HQ saw per store: duplicates and gaps in `edge.seq` (both must be 0);
//! - the checkpoint lookup at a session start: `--starts` restarts of one store with the group
//!   offset (the default) against the same with the topic scan (`checkpoint_offsets = false`, the
//!   previous design), on the fleet's checkpoint topic as it is at that moment.
//!
//! `--synthetic-stores N` ends with N more stores' worth of checkpoint history written straight to
//! the checkpoint topic (`--synthetic-history` records each), and the same lookup comparison: the
//! point toward 10,000 stores that 2 cores cannot run live.
//!
//! Prints one JSON line per size (and one for the synthetic point). Run with
//! `scripts/bench.sh fleet` (see docs/SCALING.md).

use anyhow::Context;
use clap::Parser;
use edge_bench::rss_kib;
use edge_core::Event;
use edge_core::log::{AppendRequest, Log};
use edge_sync::kafka::KafkaConfig;
use edge_sync::log::{LogConfig, Synchronous};
use edge_tests::kafka::{KafkaBroker, Store, test_log_config};
use hdrhistogram::Histogram;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseRecord, Producer, ThreadedProducer};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Fleet sizes to step through (stores are added, never removed).
    #[arg(long, value_delimiter = ',', default_value = "10,50,200")]
    sizes: Vec<usize>,
    /// Measurement window per size, after a warm-up.
    #[arg(long, default_value_t = 60)]
    window_s: u64,
    /// Warm-up after adding stores, before the window.
    #[arg(long, default_value_t = 15)]
    warmup_s: u64,
    /// Outages per store per hour (each 3-15 s).
    #[arg(long, default_value_t = 30.0)]
    outages_per_hour: f64,
    /// Restarts of one store per lookup kind in the comparison.
    #[arg(long, default_value_t = 10)]
    starts: usize,
    /// Partitions of the fleet topics (HQ provisions them).
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Stores whose checkpoint history is written straight to the checkpoint topic at the end.
    #[arg(long, default_value_t = 0)]
    synthetic_stores: usize,
    /// Checkpoint records per synthetic store.
    #[arg(long, default_value_t = 20)]
    synthetic_history: usize,
    /// `[kafka] transaction_interval_ms` of every store.
    #[arg(long, default_value_t = 0)]
    transaction_interval_ms: u64,
    /// `[kafka] checkpoint_offsets` of every store (false: the previous design, for the broker
    /// load it saves or costs).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    checkpoint_offsets: bool,
    /// The broker's metrics endpoint (Prometheus text, with the RequestsPerSec counters).
    #[arg(long)]
    metrics_url: Option<String>,
}

const STREAM: &str = "pos.transactions";

/// Outage intervals per store id (append-time ms; `end` is `i64::MAX` while it lasts).
type Outages = Arc<Mutex<HashMap<String, Vec<(i64, i64)>>>>;

struct SimStore {
    store: Store,
    down_until: Option<Instant>,
}

#[derive(Default)]
struct HqSeen {
    steady: Option<Histogram<u64>>,
    outage: Option<Histogram<u64>>,
    last_seq: HashMap<String, u64>,
    records: u64,
    duplicates: u64,
    gaps: u64,
}

impl HqSeen {
    fn reset_window(&mut self) {
        self.steady = Some(Histogram::new(3).expect("histogram"));
        self.outage = Some(Histogram::new(3).expect("histogram"));
        self.records = 0;
    }
}

fn fleet_config(bootstrap: &str, args: &Args) -> KafkaConfig {
    KafkaConfig {
        transaction_interval_ms: args.transaction_interval_ms,
        checkpoint_offsets: args.checkpoint_offsets,
        brokers: vec![bootstrap.to_string()],
        topic_template: "fleet.{stream}".into(),
        checkpoint_topic: "fleet.__checkpoints".into(),
        heartbeat_topic: "fleet.heartbeats".into(),
        gap_topic: "fleet.gaps".into(),
        topic_partitions: args.partitions,
        ..KafkaConfig::default()
    }
}

fn sim_log_config() -> LogConfig {
    // The simulation measures HQ's side: local fsyncs of hundreds of logs would only measure this
    // VM's disk (the logs live in TMPDIR, tmpfs in scripts/bench.sh).
    LogConfig {
        synchronous: Synchronous::Normal,
        ..test_log_config()
    }
}

/// utime + stime of `pid`, seconds.
fn cpu_secs(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = s.rsplit_once(')').map_or("", |(_, a)| a);
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 = f.get(11).and_then(|v| v.parse().ok()).unwrap_or(0)
        + f.get(12).and_then(|v| v.parse().ok()).unwrap_or(0);
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    ticks as f64 / hz
}

/// The broker's request counters by request type (sum over versions), from the exporter.
fn request_counts(url: &str) -> HashMap<String, f64> {
    let out = std::process::Command::new("curl")
        .args(["-s", "--max-time", "10", url])
        .output();
    let mut m = HashMap::new();
    let Ok(out) = out else { return m };
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        if line.starts_with('#') || !line.contains("RequestsPerSec") {
            continue;
        }
        let Some(req) = line
            .split("request=\"")
            .nth(1)
            .and_then(|r| r.split('"').next())
        else {
            continue;
        };
        let Some(v) = line
            .rsplit_once(' ')
            .and_then(|(_, v)| v.parse::<f64>().ok())
        else {
            continue;
        };
        *m.entry(req.to_string()).or_insert(0.0) += v;
    }
    m
}

fn pct(h: &Option<Histogram<u64>>, q: f64) -> Option<u64> {
    h.as_ref()
        .filter(|h| !h.is_empty())
        .map(|h| h.value_at_quantile(q))
}

/// Appends `n` records stamped now.
async fn append_now(log: &dyn Log, n: u64, next: &AtomicU64) -> anyhow::Result<()> {
    let now = edge_core::time::now_ms();
    let events: Vec<Event> = (0..n)
        .map(|_| {
            let i = next.fetch_add(1, Ordering::Relaxed);
            Event::new(
                STREAM,
                format!(
                    "{{\"schema\":\"pos.transaction/1\",\"i\":{i},\"total\":1299,\"items\":[\"4006381333931\"]}}"
                ),
            )
            .with_event_ts(now)
            .with_key(format!("lane-{}", i % 4))
            .with_event_id(format!("tx-{i}"))
        })
        .collect();
    log.append(AppendRequest::events(events)).await?;
    Ok(())
}

/// One store's traffic: `rate` records/s in 100 ms ticks, until `stop`.
fn spawn_traffic(log: Arc<dyn Log>, rate: f64, stop: Arc<AtomicBool>) {
    tokio::spawn(async move {
        let next = AtomicU64::new(0);
        let mut owed = 0.0;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            owed += rate / 10.0;
            let n = owed.floor();
            owed -= n;
            if n >= 1.0 && append_now(&*log, n as u64, &next).await.is_err() {
                return;
            }
        }
    });
}

/// Waits until the uplink's cursor passes `from` (the first commit of the new session).
async fn first_commit(log: Arc<dyn Log>, from: u64, timeout: Duration) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < timeout {
        if let Ok(Some(c)) = log.cursor("uplink", STREAM).await
            && c > from
        {
            return Some(t0.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    None
}

/// HQ's read_committed consumer of the fleet topic, on its own thread.
fn spawn_hq(bootstrap: &str, topic: &str, seen: Arc<Mutex<HqSeen>>, outages: Outages) {
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", format!("fleet-hq-{}", std::process::id()))
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", "10")
        .create()
        .expect("HQ consumer");
    c.subscribe(&[topic]).expect("subscribe");
    std::thread::spawn(move || {
        loop {
            let Some(r) = c.poll(Duration::from_millis(100)) else {
                continue;
            };
            let Ok(m) = r else { continue };
            let now = edge_core::time::now_ms();
            let ts = m.timestamp().to_millis().unwrap_or(now);
            let lag = (now - ts).max(0) as u64;
            let store = m
                .key()
                .map(|k| String::from_utf8_lossy(k).into_owned())
                .unwrap_or_default();
            let seq = m.headers().and_then(|h| {
                h.iter()
                    .find(|x| x.key == "edge.seq")
                    .and_then(|x| x.value)
                    .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u64>().ok())
            });
            let in_outage = outages
                .lock()
                .expect("outages")
                .get(&store)
                .is_some_and(|v| v.iter().any(|(a, b)| ts >= *a && ts <= *b));
            let mut s = seen.lock().expect("seen");
            s.records += 1;
            let h = if in_outage {
                s.outage.as_mut()
            } else {
                s.steady.as_mut()
            };
            if let Some(h) = h {
                let _ = h.record(lag.max(1));
            }
            if let Some(seq) = seq {
                match s.last_seq.get(&store).copied() {
                    Some(last) if seq <= last => s.duplicates += 1,
                    Some(last) => {
                        if seq > last + 1 {
                            s.gaps += seq - last - 1;
                        }
                        s.last_seq.insert(store, seq);
                    }
                    None => {
                        s.last_seq.insert(store, seq);
                    }
                }
            }
        }
    });
}

/// Records on the checkpoint topic (sum of high watermarks).
fn topic_records(bootstrap: &str, topic: &str) -> i64 {
    let c: BaseConsumer = match rdkafka::ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
    {
        Ok(c) => c,
        Err(_) => return -1,
    };
    let Ok(md) = c.fetch_metadata(Some(topic), Duration::from_secs(10)) else {
        return -1;
    };
    let mut n = 0;
    for t in md.topics() {
        for p in t.partitions() {
            if let Ok((lo, hi)) = c.fetch_watermarks(topic, p.id(), Duration::from_secs(10)) {
                n += hi - lo;
            }
        }
    }
    n
}

/// Restarts `s` `n` times with `cfg`, each with one record pending: time to its first commit.
async fn restarts(s: &mut SimStore, cfg: &KafkaConfig, n: usize) -> Vec<u64> {
    let mut ms = Vec::new();
    let next = AtomicU64::new(1 << 40);
    for _ in 0..n {
        s.store.abort_components().await;
        let log: Arc<dyn Log> = s.store.log.clone();
        let _ = append_now(&*log, 1, &next).await;
        let from = s.store.cursor(STREAM).await;
        s.store.start_uplink(cfg.clone());
        if let Some(d) = first_commit(log, from, Duration::from_secs(120)).await {
            ms.push(d.as_millis() as u64);
        }
    }
    ms.sort_unstable();
    ms
}

fn median(v: &[u64]) -> Option<u64> {
    (!v.is_empty()).then(|| v[v.len() / 2])
}

async fn lookup_comparison(
    s: &mut SimStore,
    cfg: &KafkaConfig,
    n: usize,
    bootstrap: &str,
) -> serde_json::Value {
    let scan_cfg = KafkaConfig {
        checkpoint_offsets: false,
        ..cfg.clone()
    };
    let cfg = &KafkaConfig {
        checkpoint_offsets: true,
        ..cfg.clone()
    };
    let records = topic_records(bootstrap, &cfg.checkpoint_topic);
    let group = restarts(s, cfg, n).await;
    let scan = restarts(s, &scan_cfg, n).await;
    // Leave the store running with the default.
    s.store.abort_components().await;
    s.store.start_uplink(cfg.clone());
    serde_json::json!({
        "checkpoint_topic_records": records,
        "start_group_offset_ms": {"median": median(&group), "max": group.last()},
        "start_topic_scan_ms": {"median": median(&scan), "max": scan.last()},
        "scan_over_group": match (median(&scan), median(&group)) {
            (Some(a), Some(b)) if b > 0 => Some(a as f64 / b as f64),
            _ => None,
        },
    })
}

/// Writes `stores` x `history` checkpoint records of synthetic stores to the checkpoint topic.
fn write_synthetic(
    bootstrap: &str,
    topic: &str,
    stores: usize,
    history: usize,
) -> anyhow::Result<()> {
    let p: ThreadedProducer<rdkafka::producer::DefaultProducerContext> =
        rdkafka::ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", "20")
            .set("compression.type", "zstd")
            .set("queue.buffering.max.messages", "1000000")
            .create()?;
    for h in 0..history {
        for i in 0..stores {
            let key = format!("synthetic-{i:05}");
            let v = serde_json::json!({
                "schema": "edge.checkpoint/1", "store": key,
                "epoch": "00000000-0000-0000-0000-000000000000",
                "streams": {"pos.transactions": {"next_seq": h * 100}, "pos.scans": {"next_seq": h * 40},
                            "presence.events": {"next_seq": h * 300}},
                "gap_id": 0, "txn": h, "ts_ms": edge_core::time::now_ms(), "agent_version": "0.1.0"
            })
            .to_string();
            loop {
                match p.send(BaseRecord::to(topic).key(&key).payload(&v)) {
                    Ok(()) => break,
                    Err((_, _)) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        }
    }
    p.flush(Duration::from_secs(120))?;
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let broker = KafkaBroker::start();
    let bootstrap = broker.bootstrap();
    let broker_pid: u32 = broker.var("PID").parse().context("broker PID")?;
    let cfg = fleet_config(&bootstrap, &args);
    let me = std::process::id();
    eprintln!("broker at {bootstrap} (pid {broker_pid})");

    let outages: Outages = Arc::new(Mutex::new(HashMap::new()));
    let seen = Arc::new(Mutex::new(HqSeen::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let mut stores: Vec<SimStore> = Vec::new();
    let session_ms: Arc<Mutex<Histogram<u64>>> =
        Arc::new(Mutex::new(Histogram::new(3).expect("histogram")));
    let session_timeouts = Arc::new(AtomicU64::new(0));
    let mut hq_started = false;
    let p_tick = args.outages_per_hour / 3600.0 / 10.0;

    for &size in &args.sizes {
        let rss_before = rss_kib(me);
        let added = size.saturating_sub(stores.len());
        while stores.len() < size {
            let store = Store::open_with(sim_log_config());
            let rate = 5.0 + fastrand::f64() * 45.0;
            spawn_traffic(store.log.clone(), rate, stop.clone());
            let mut s = SimStore {
                store,
                down_until: None,
            };
            s.store.start_uplink(cfg.clone());
            stores.push(s);
        }
        if !hq_started {
            // The topic exists once the first uplink has created it.
            tokio::time::sleep(Duration::from_secs(3)).await;
            spawn_hq(
                &bootstrap,
                &cfg.topic("", STREAM),
                seen.clone(),
                outages.clone(),
            );
            hq_started = true;
        }

        // Warm-up, then the window; outages run through both.
        let mut window_started: Option<(Instant, f64, HashMap<String, f64>)> = None;
        let warm_end = Instant::now() + Duration::from_secs(args.warmup_s);
        let end = warm_end + Duration::from_secs(args.window_s);
        let mut starts_in_window = 0u64;
        let mut outages_in_window = 0u64;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        while Instant::now() < end {
            tick.tick().await;
            if window_started.is_none() && Instant::now() >= warm_end {
                seen.lock().expect("seen").reset_window();
                *session_ms.lock().expect("hist") = Histogram::new(3).expect("histogram");
                let req = args
                    .metrics_url
                    .as_deref()
                    .map(request_counts)
                    .unwrap_or_default();
                window_started = Some((Instant::now(), cpu_secs(broker_pid), req));
                starts_in_window = 0;
                outages_in_window = 0;
            }
            let now_ms = edge_core::time::now_ms();
            for s in stores.iter_mut().skip(1) {
                match s.down_until {
                    None if fastrand::f64() < p_tick => {
                        s.store.abort_components().await;
                        let up = Instant::now() + Duration::from_millis(fastrand::u64(3000..15000));
                        s.down_until = Some(up);
                        outages
                            .lock()
                            .expect("outages")
                            .entry(s.store.id.clone())
                            .or_default()
                            .push((now_ms, i64::MAX));
                        outages_in_window += 1;
                    }
                    Some(t) if Instant::now() >= t => {
                        s.down_until = None;
                        let from = s.store.cursor(STREAM).await;
                        s.store.start_uplink(cfg.clone());
                        starts_in_window += 1;
                        let log: Arc<dyn Log> = s.store.log.clone();
                        let hist = session_ms.clone();
                        let timeouts = session_timeouts.clone();
                        let outages = outages.clone();
                        let id = s.store.id.clone();
                        tokio::spawn(async move {
                            let d = first_commit(log, from, Duration::from_secs(120)).await;
                            if let Some(v) = outages.lock().expect("outages").get_mut(&id)
                                && let Some(last) = v.last_mut()
                            {
                                last.1 = edge_core::time::now_ms();
                            }
                            match d {
                                Some(d) => {
                                    let _ = hist
                                        .lock()
                                        .expect("hist")
                                        .record(d.as_millis().max(1) as u64);
                                }
                                None => {
                                    timeouts.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                        });
                    }
                    _ => {}
                }
            }
        }
        let (t0, cpu0, req0) = window_started.expect("window");
        let secs = t0.elapsed().as_secs_f64();
        let cpu = (cpu_secs(broker_pid) - cpu0) / secs;
        let req1 = args
            .metrics_url
            .as_deref()
            .map(request_counts)
            .unwrap_or_default();
        let mut reqs: Vec<(String, f64)> = req1
            .iter()
            .map(|(k, v)| (k.clone(), (v - req0.get(k).copied().unwrap_or(0.0)) / secs))
            .filter(|(_, v)| *v > 0.0)
            .collect();
        reqs.sort_by(|a, b| b.1.total_cmp(&a.1));
        let total_reqs: f64 = reqs.iter().map(|(_, v)| v).sum();
        let rss_after = rss_kib(me);
        let (steady50, steady99, outage99, records, dups, gaps) = {
            let s = seen.lock().expect("seen");
            (
                pct(&s.steady, 0.5),
                pct(&s.steady, 0.99),
                pct(&s.outage, 0.99),
                s.records,
                s.duplicates,
                s.gaps,
            )
        };
        let (start50, start99, start_n) = {
            let h = session_ms.lock().expect("hist");
            (h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.len())
        };
        let cmp = lookup_comparison(&mut stores[0], &cfg, args.starts, &bootstrap).await;
        let line = serde_json::json!({
            "stores": size,
            "transaction_interval_ms": args.transaction_interval_ms,
            "checkpoint_offsets": args.checkpoint_offsets,
            "window_s": secs.round(),
            "hq_records_per_s": (records as f64 / secs).round(),
            "outages": outages_in_window,
            "session_starts": {"n": start_n, "restarted": starts_in_window,
                "p50_ms": start50, "p99_ms": start99,
                "timed_out": session_timeouts.load(Ordering::Relaxed)},
            "lag_ms": {"steady_p50": steady50, "steady_p99": steady99, "in_outage_p99": outage99},
            "hq_duplicates": dups, "hq_gaps": gaps,
            "broker": {"cpu_cores": (cpu * 1000.0).round() / 1000.0, "rss_mib": rss_kib(broker_pid) / 1024,
                "requests_per_s": total_reqs.round(),
                "top_requests_per_s": reqs.iter().take(8)
                    .map(|(k, v)| serde_json::json!({k.clone(): v.round()})).collect::<Vec<_>>()},
            "harness_rss_mib": rss_after / 1024,
            "rss_kib_per_added_store": (added > 0).then(|| rss_after.saturating_sub(rss_before) / added as u64),
            "lookup": cmp,
        });
        println!("{line}");
    }

    if args.synthetic_stores > 0 {
        eprintln!(
            "writing {} synthetic stores x {} checkpoints",
            args.synthetic_stores, args.synthetic_history
        );
        let (b, t, n, h) = (
            bootstrap.clone(),
            cfg.checkpoint_topic.clone(),
            args.synthetic_stores,
            args.synthetic_history,
        );
        tokio::task::spawn_blocking(move || write_synthetic(&b, &t, n, h)).await??;
        let cmp = lookup_comparison(&mut stores[0], &cfg, args.starts, &bootstrap).await;
        println!(
            "{}",
            serde_json::json!({
                "stores_live": stores.len(),
                "synthetic_stores": args.synthetic_stores,
                "synthetic_history": args.synthetic_history,
                "lookup": cmp,
            })
        );
    }
    stop.store(true, Ordering::Relaxed);
    for s in &mut stores {
        s.store.abort_components().await;
    }
    Ok(())
}
