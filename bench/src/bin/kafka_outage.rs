//! Drain start after a Kafka outage (PRODUCT.md: "Kafka down, then back: drain starts <= 2 s after
//! the broker is reachable"), against a named baseline in the same run.
//!
//! A real broker (scripts/kafka.sh, started by the tests' harness) and the real uplink
//! (`exactly_once`, the harness's fast-reacting test settings) on a local log while a POS lane
//! writes ~400 records/s. Each round stops the broker for `--outage-s`, starts it again on the same
//! data and measures, from the moment it answers metadata requests:
//! * `drain_start_s`: until the uplink's cursor moves (the first transaction of the backlog
//!   committed at HQ and recorded locally);
//! * `baseline_s`: until a **new bare librdkafka transactional producer** started at the same
//!   moment has run `init_transactions`, sent one record and committed. That is what the broker
//!   lets any transactional client do after a restart (coordinator load, recovery of the
//!   transaction that was open when it stopped), so the difference is the uplink's own delay.
//!
//! Prints one JSON line per round and a summary (median and worst of both, and their ratio).
//! `cargo run --release -p edge-bench --bin kafka_outage -- --rounds 5 --outage-s 20`

use clap::Parser;
use edge_core::log::{AppendRequest, Log};
use edge_sync::kafka::DeliveryMode;
use edge_tests::kafka::{KafkaBroker, Store, event, private_config, unique};
use rdkafka::ClientConfig;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Seconds the broker is down in each round.
    #[arg(long, default_value_t = 20)]
    outage_s: u64,
}

const S: &str = "pos.transactions";

fn bare_first_commit(bootstrap: &str, topic: &str) -> anyhow::Result<()> {
    let p: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", unique("bench-bare"))
        .set("enable.idempotence", "true")
        .set("reconnect.backoff.max.ms", "500")
        .create()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match p.init_transactions(Duration::from_secs(5)) {
            Ok(()) => break,
            // The coordinator is still loading: retried, as the uplink does.
            Err(_) if Instant::now() < deadline => continue,
            Err(e) => return Err(e.into()),
        }
    }
    p.begin_transaction()?;
    p.send(BaseRecord::<str, str>::to(topic).payload("x"))
        .map_err(|(e, _)| e)?;
    p.commit_transaction(Duration::from_secs(60))?;
    Ok(())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut b = KafkaBroker::start();
    let cfg = private_config(&b, DeliveryMode::ExactlyOnce);
    let bare_topic = unique("bench-outage-bare");
    let mut store = Store::open();
    store.start_uplink(cfg.clone());
    let written = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let log = store.log.clone();
        let written = written.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i = 0;
            let mut tick = tokio::time::interval(Duration::from_millis(10));
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let evs = (i..i + 4).map(|k| event(S, k)).collect();
                if log.append(AppendRequest::events(evs)).await.is_err() {
                    break;
                }
                i += 4;
                written.store(i, Ordering::SeqCst);
            }
        })
    };
    // Warm up: the uplink mirrors, the bare topic exists.
    store.wait_cursor(S, 500, Duration::from_secs(60)).await;
    {
        let boot = b.bootstrap();
        let t = bare_topic.clone();
        tokio::task::spawn_blocking(move || bare_first_commit(&boot, &t)).await??;
    }
    let (mut starts, mut bases) = (Vec::new(), Vec::new());
    for round in 1..=args.rounds {
        b.stop(false);
        tokio::time::sleep(Duration::from_secs(args.outage_s)).await;
        let at_stop = store.cursor(S).await;
        b.restart();
        let back = Instant::now();
        let baseline = {
            let boot = b.bootstrap();
            let t = bare_topic.clone();
            tokio::task::spawn_blocking(move || {
                bare_first_commit(&boot, &t).map(|()| back.elapsed())
            })
        };
        let drain_start = loop {
            if store.cursor(S).await > at_stop {
                break back.elapsed();
            }
            anyhow::ensure!(
                back.elapsed() < Duration::from_secs(120),
                "the drain did not start within 120 s"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        let baseline = baseline.await??;
        let (d, base) = (drain_start.as_secs_f64(), baseline.as_secs_f64());
        println!(
            "{}",
            serde_json::json!({"round": round, "outage_s": args.outage_s,
                "drain_start_s": d, "baseline_s": base, "backlog_records": written.load(Ordering::SeqCst).saturating_sub(at_stop)})
        );
        starts.push(d);
        bases.push(base);
        // Let the backlog drain before the next outage.
        let n = written.load(Ordering::SeqCst);
        store.wait_cursor(S, n + 1, Duration::from_secs(120)).await;
    }
    stop.store(true, Ordering::Relaxed);
    writer.await?;
    let worst = |v: &[f64]| v.iter().cloned().fold(0.0, f64::max);
    let (ws, wb) = (worst(&starts), worst(&bases));
    let (ms, mb) = (median(&mut starts), median(&mut bases));
    println!(
        "{}",
        serde_json::json!({"summary": "kafka_outage", "rounds": args.rounds, "outage_s": args.outage_s,
            "drain_start_median_s": ms, "drain_start_worst_s": ws,
            "baseline_median_s": mb, "baseline_worst_s": wb,
            "median_minus_baseline_s": ms - mb})
    );
    store.stop_components().await;
    Ok(())
}
