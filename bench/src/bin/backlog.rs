//! Start-up time and resident memory with a large backlog, against the same agent with an empty log.
//!
//! 1. Builds (once, reused from `--dir`) a log holding `--records` unmirrored 300-byte records.
//! 2. Start-up: spawn the release agent binary, time until `/readyz` answers 200; median of
//!    `--starts` runs, with the backlog and with an empty log.
//! 3. Memory: the agent ingests `--rate` MQTT messages/s for `--seconds` through a real Mosquitto;
//!    peak and final VmRSS sampled every 250 ms, with the backlog and with an empty log.
//!
//! Prints one JSON line.

use clap::Parser;
use edge_bench::rss_kib;
use edge_core::Event;
use edge_core::log::{AppendRequest, Log};
use edge_sync::log::{LogConfig, SqliteLog, Synchronous};
use edge_tests::mosquitto::Mosquitto;
use edge_tests::publisher::{json_message, spawn_paced_publisher};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 10_000_000)]
    records: u64,
    /// Where the backlog database is kept between runs.
    #[arg(long, default_value = "bench-data/backlog")]
    dir: PathBuf,
    /// The agent binary (build it with `cargo build --release -p edge-agent`).
    #[arg(long, default_value = "target/release/edge-agent")]
    agent: PathBuf,
    #[arg(long, default_value_t = 5)]
    starts: usize,
    #[arg(long, default_value_t = 5000.0)]
    rate: f64,
    #[arg(long, default_value_t = 60)]
    seconds: u64,
}

fn build_backlog(dir: &Path, records: u64) -> anyhow::Result<f64> {
    let done = dir.join("READY");
    if done.exists() {
        return Ok(0.0);
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let t0 = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let log = SqliteLog::open(
            &dir.join("data"),
            LogConfig {
                synchronous: Synchronous::Normal,
                disk_budget: edge_core::config::ByteSize::gib(100),
                min_free_disk: edge_core::config::ByteSize::b(0),
                integrity_check: edge_sync::log::IntegrityCheck::Off,
                ..LogConfig::default()
            },
        )?;
        let payload = bytes::Bytes::from(vec![b'x'; 300]);
        let streams = [
            "pos.transactions",
            "pos.scans",
            "beacon.sightings",
            "camera.counts",
        ];
        let mut pending = std::collections::VecDeque::new();
        let mut i = 0u64;
        while i < records {
            let n = 5000.min(records - i);
            let events: Vec<Event> = (0..n)
                .map(|k| {
                    Event::new(streams[((i + k) % 4) as usize], payload.clone())
                        .with_key("lane-1")
                        .with_event_id(format!("b-{}", i + k))
                })
                .collect();
            pending.push_back(log.submit(AppendRequest::events(events)).await?);
            if pending.len() > 8 {
                pending.pop_front().expect("ticket").await?;
            }
            i += n;
        }
        while let Some(t) = pending.pop_front() {
            t.await?;
        }
        log.close().await?;
        anyhow::Ok(())
    })?;
    std::fs::write(&done, records.to_string())?;
    Ok(t0.elapsed().as_secs_f64())
}

fn write_config(dir: &Path, data: &Path, mqtt_port: u16, http_port: u16) -> PathBuf {
    let cfg = format!(
        r#"[agent]
store_id = "bench"
data_dir = "{}"
health_interval = "0s"
log_level = "warn"
[log]
disk_budget = "100 GiB"
min_free_disk = "0 B"
[mqtt]
port = {mqtt_port}
[[mqtt.ingress]]
topic = "store/+/pos/{{device}}/transactions"
stream = "pos.transactions"
[http]
listen = "127.0.0.1:{http_port}"
"#,
        data.display()
    );
    let p = dir.join(format!("config-{http_port}.toml"));
    std::fs::write(&p, cfg).expect("config");
    p
}

fn spawn(agent: &Path, config: &Path) -> Child {
    Command::new(agent)
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("agent")
}

fn ready_after(port: u16, t0: Instant, child: &mut Child) -> f64 {
    loop {
        if edge_tests::agent::http_get(port, "/readyz").is_some_and(|(c, _)| c == 200) {
            return t0.elapsed().as_secs_f64();
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("agent exited during start-up: {st}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "agent not ready in 60 s"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

fn stop(mut c: Child) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(c.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = c.wait();
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

struct Run {
    startup_s: f64,
    peak_rss_mib: f64,
    final_rss_mib: f64,
    ingested: u64,
}

fn measure(a: &Args, data: &Path, broker: &Mosquitto, label: &str) -> Run {
    let port = edge_tests::free_port();
    let cfg = write_config(&a.dir, data, broker.port, port);
    let mut startups = Vec::new();
    for _ in 0..a.starts {
        let t0 = Instant::now();
        let mut c = spawn(&a.agent, &cfg);
        startups.push(ready_after(port, t0, &mut c));
        stop(c);
    }
    let mut c = spawn(&a.agent, &cfg);
    ready_after(port, Instant::now(), &mut c);
    let n = (a.rate * a.seconds as f64) as usize;
    let msgs = (0..n)
        .map(|i| {
            json_message(
                "store/bench/pos/lane-1/transactions",
                &format!("{label}-{}-{i}", std::process::id()),
                i,
                300,
            )
        })
        .collect();
    let before = edge_tests::agent::http_get(port, "/status")
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|s| {
            s["streams"].as_array().and_then(|v| {
                v.iter()
                    .find(|x| x["name"] == "pos.transactions")
                    .and_then(|x| x["next_seq"].as_u64())
            })
        })
        .unwrap_or(1);
    let (p, _) = spawn_paced_publisher(
        broker.port,
        &format!("bench-{label}"),
        msgs,
        500,
        Duration::from_secs(a.seconds * 4),
        Some(a.rate),
    );
    let mut peak = 0;
    while !p.is_finished() {
        peak = peak.max(rss_kib(c.id()));
        std::thread::sleep(Duration::from_millis(250));
    }
    p.join().expect("publisher");
    std::thread::sleep(Duration::from_secs(1));
    let final_rss = rss_kib(c.id());
    peak = peak.max(final_rss);
    let after = edge_tests::agent::http_get(port, "/status")
        .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok())
        .and_then(|s| {
            s["streams"].as_array().and_then(|v| {
                v.iter()
                    .find(|x| x["name"] == "pos.transactions")
                    .and_then(|x| x["next_seq"].as_u64())
            })
        })
        .unwrap_or(1);
    stop(c);
    Run {
        startup_s: median(startups),
        peak_rss_mib: peak as f64 / 1024.0,
        final_rss_mib: final_rss as f64 / 1024.0,
        ingested: after - before,
    }
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let build_s = build_backlog(&a.dir, a.records)?;
    let db_bytes = std::fs::metadata(a.dir.join("data/log.db"))
        .map(|m| m.len())
        .unwrap_or(0);
    let broker = Mosquitto::start();
    let backlog = measure(&a, &a.dir.join("data"), &broker, "backlog");
    let empty_dir = a.dir.join("empty");
    let _ = std::fs::remove_dir_all(&empty_dir);
    let empty = measure(&a, &empty_dir, &broker, "empty");
    println!(
        "{}",
        serde_json::json!({
            "bench": "backlog",
            "backlog_records": a.records,
            "backlog_db_bytes": db_bytes,
            "backlog_build_s": build_s,
            "ingest_rate_per_s": a.rate,
            "ingest_seconds": a.seconds,
            "startup_s_with_backlog": backlog.startup_s,
            "startup_s_empty": empty.startup_s,
            "peak_rss_mib_with_backlog": (backlog.peak_rss_mib * 10.0).round() / 10.0,
            "final_rss_mib_with_backlog": (backlog.final_rss_mib * 10.0).round() / 10.0,
            "peak_rss_mib_empty": (empty.peak_rss_mib * 10.0).round() / 10.0,
            "final_rss_mib_empty": (empty.final_rss_mib * 10.0).round() / 10.0,
            "ingested_with_backlog": backlog.ingested,
            "ingested_empty": empty.ingested,
        })
    );
    Ok(())
}
