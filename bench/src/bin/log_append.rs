//! Local log append throughput and commit latency.
//!
//! Each writer task submits one-record requests back to back, keeping up to `--inflight`
//! unacknowledged (like an MQTT session with that receive window) and measures, per record, the time
//! from submit to durable ack. Prints one JSON line per run.

use clap::Parser;
use edge_core::Event;
use edge_sync::Log;
use edge_sync::log::{AppendRequest, LogConfig, SqliteLog, Synchronous};
use hdrhistogram::Histogram;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// Records to append in total.
    #[arg(long, default_value_t = 1_000_000)]
    records: u64,
    #[arg(long, default_value_t = 300)]
    payload_bytes: usize,
    #[arg(long, default_value_t = 1)]
    writers: u64,
    /// Unacknowledged records per writer.
    #[arg(long, default_value_t = 4096)]
    inflight: usize,
    #[arg(long, default_value = "full")]
    synchronous: String,
    #[arg(long, default_value_t = 10)]
    commit_window_ms: u64,
    /// Directory for the database (default: a temp dir on the data disk).
    #[arg(long)]
    dir: Option<std::path::PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let tmp = match &a.dir {
        Some(d) => tempfile::tempdir_in(d)?,
        None => tempfile::tempdir_in(".")?,
    };
    let cfg = LogConfig {
        synchronous: if a.synchronous == "normal" {
            Synchronous::Normal
        } else {
            Synchronous::Full
        },
        commit_window_ms: a.commit_window_ms,
        disk_budget: edge_core::config::ByteSize::gib(50),
        min_free_disk: edge_core::config::ByteSize::b(0),
        integrity_check: edge_sync::log::IntegrityCheck::Off,
        ..LogConfig::default()
    };
    let log = Arc::new(SqliteLog::open(tmp.path(), cfg)?);
    let per_writer = a.records / a.writers;
    let payload = bytes::Bytes::from(vec![b'x'; a.payload_bytes]);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..a.writers {
        let log = log.clone();
        let payload = payload.clone();
        let inflight = a.inflight;
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram");
            let mut q = VecDeque::with_capacity(inflight);
            let stream = format!("bench.w{w}");
            for i in 0..per_writer {
                if q.len() >= inflight {
                    let (t0, ticket): (Instant, edge_sync::log::AppendTicket) =
                        q.pop_front().expect("non-empty");
                    ticket.await.expect("append");
                    h.record(t0.elapsed().as_micros() as u64).ok();
                }
                let ev = Event::new(stream.as_str(), payload.clone())
                    .with_key("lane-1")
                    .with_event_ts(i as i64);
                let t0 = Instant::now();
                q.push_back((
                    t0,
                    log.submit(AppendRequest::one(ev)).await.expect("submit"),
                ));
            }
            while let Some((t0, ticket)) = q.pop_front() {
                ticket.await.expect("append");
                h.record(t0.elapsed().as_micros() as u64).ok();
            }
            h
        }));
    }
    let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    for t in tasks {
        h.add(t.await?)?;
    }
    let secs = start.elapsed().as_secs_f64();
    log.close().await?;
    let n = per_writer * a.writers;
    println!(
        "{}",
        serde_json::json!({
            "bench": "log_append",
            "records": n,
            "payload_bytes": a.payload_bytes,
            "writers": a.writers,
            "synchronous": a.synchronous,
            "commit_window_ms": a.commit_window_ms,
            "seconds": secs,
            "records_per_sec": (n as f64 / secs).round(),
            "ack_latency_ms_p50": h.value_at_quantile(0.50) as f64 / 1000.0,
            "ack_latency_ms_p99": h.value_at_quantile(0.99) as f64 / 1000.0,
            "ack_latency_ms_max": h.max() as f64 / 1000.0,
        })
    );
    Ok(())
}
