//! Flash wear: bytes the real release agent writes to storage per acknowledged record, at fixed
//! MQTT QoS 1 rates into `pos.transactions` with the shipped log defaults (`synchronous = "full"`,
//! the 10 ms commit window, event ids and their dedup window).
//!
//! Bytes written are the agent process's `write_bytes` in `/proc/<pid>/io` (what it sent to the
//! block layer: WAL frames, the checkpoint into the database file, everything else), over a
//! measured interval after a warm-up, including the housekeeper's checkpoints of that interval.
//! The baseline is the payload itself: the amplification is bytes written / payload bytes
//! acknowledged. Prints one JSON line per rate.
//!
//! The data directory must be on a real block device (not tmpfs: nothing is counted there).

use clap::Parser;
use edge_tests::agent::{Agent, http_get};
use edge_tests::mosquitto::Mosquitto;
use edge_tests::publisher::{json_message, spawn_paced_publisher};
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// The agent binary (a release build).
    #[arg(long)]
    agent: PathBuf,
    /// Where the agents' data directories go (a real disk).
    #[arg(long, default_value = "bench-data/flash")]
    dir: PathBuf,
    /// Records per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "50,500,5000")]
    rates: Vec<u32>,
    /// Measured seconds per rate.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Warm-up seconds per rate (not measured).
    #[arg(long, default_value_t = 5)]
    warmup: u64,
    #[arg(long, default_value_t = 300)]
    payload_bytes: usize,
    /// Extra TOML appended to the agent's config (`[log]` settings under test, say).
    #[arg(long, default_value = "")]
    extra: String,
}

/// The agent's `write_bytes` and `cancelled_write_bytes` (truncated before writeback).
fn io_bytes(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap_or_default();
    let field = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(k))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    (field("write_bytes:"), field("cancelled_write_bytes:"))
}

/// Sum of a metric's samples whose name starts with `name` (labels ignored).
fn metric(port: u16, name: &str) -> f64 {
    let text = http_get(port, "/metrics").map(|x| x.1).unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|r| r.starts_with(' ') || r.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn publish(port: u16, id: &str, from: usize, n: usize, size: usize, rate: u32) {
    let msgs = (from..from + n)
        .map(|i| {
            json_message(
                "store/s1/pos/lane-1/transactions",
                &format!("tx-{i}"),
                i,
                size,
            )
        })
        .collect();
    let (h, _) = spawn_paced_publisher(
        port,
        id,
        msgs,
        1000,
        Duration::from_secs(600),
        Some(rate as f64),
    );
    let r = h.join().expect("publisher");
    assert_eq!(r.acked, n, "every record acknowledged");
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    std::fs::create_dir_all(&a.dir)?;
    let broker = Mosquitto::start();
    for &rate in &a.rates {
        let data = std::fs::canonicalize(&a.dir)?.join(format!("rate-{rate}"));
        let _ = std::fs::remove_dir_all(&data);
        let ingress = r#"[[mqtt.ingress]]
topic = "store/+/pos/{device}/transactions"
stream = "pos.transactions"
"#;
        let config = edge_bench::agent_config(
            broker.port,
            &format!("{ingress}\n{}", a.extra.replace("\\n", "\n")),
        );
        let agent = Agent::start_on(a.agent.clone(), &config, Some(&data));
        let pid = agent.pid().expect("agent pid");
        let warm = (rate as u64 * a.warmup) as usize;
        publish(broker.port, "flash-warm", 0, warm, a.payload_bytes, rate);
        let (w0, c0) = io_bytes(pid);
        let commits0 = metric(agent.http_port, "edge_log_commit_seconds_count");
        let n = (rate as u64 * a.seconds) as usize;
        let t0 = Instant::now();
        publish(
            broker.port,
            "flash-measured",
            warm,
            n,
            a.payload_bytes,
            rate,
        );
        // The housekeeper checkpoints every 250 ms: let the interval's last frames reach the
        // database file, as the warm-up's did at the start.
        std::thread::sleep(Duration::from_millis(1000));
        let secs = t0.elapsed().as_secs_f64();
        let (w1, c1) = io_bytes(pid);
        let commits = metric(agent.http_port, "edge_log_commit_seconds_count") - commits0;
        let written = (w1 - w0).saturating_sub(c1 - c0) as f64;
        let payload = (n * a.payload_bytes) as f64;
        let wal = std::fs::metadata(data.join("log.db-wal")).map_or(0, |m| m.len());
        let db = std::fs::metadata(data.join("log.db")).map_or(0, |m| m.len());
        println!(
            "{}",
            serde_json::json!({
                "bench": "flash_wear",
                "rate_per_sec": rate,
                "records": n,
                "payload_bytes": a.payload_bytes,
                "seconds": (secs * 10.0).round() / 10.0,
                "bytes_written": written,
                "bytes_per_record": (written / n as f64).round(),
                "amplification_x": (written / payload * 10.0).round() / 10.0,
                "write_mb_per_sec": (written / secs / 1e5).round() / 10.0,
                "commits": commits,
                "bytes_per_commit": if commits > 0.0 { (written / commits).round() } else { 0.0 },
                "records_per_commit": if commits > 0.0 { ((n as f64 / commits) * 10.0).round() / 10.0 } else { 0.0 },
                "db_file_bytes": db,
                "wal_file_bytes": wal,
                "extra": a.extra,
            })
        );
        drop(agent);
    }
    Ok(())
}
