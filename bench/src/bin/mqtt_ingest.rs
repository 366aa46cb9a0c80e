//! MQTT QoS 1 ingest through a real Mosquitto: the agent's bridge (ack after durable commit into the
//! SQLite log, FULL durability) against a plain rumqttc subscriber that acks on receipt and persists
//! nothing. Same broker config (the shipped tuning file), same publisher, same message set, rounds
//! alternating in one run so the ratio holds on a noisy machine. Prints one JSON line.

use clap::Parser;
use edge_core::component::ComponentContext;
use edge_core::log::Log;
use edge_core::{Shutdown, Status};
use edge_sync::log::{LogConfig, SqliteLog};
use edge_sync::mqtt::{IngressRule, MqttConfig};
use edge_tests::mosquitto::Mosquitto;
use edge_tests::publisher::{Message, Progress, json_message, publish_all};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 100_000)]
    messages: usize,
    #[arg(long, default_value_t = 300)]
    payload_bytes: usize,
    /// Publisher's unacknowledged window.
    #[arg(long, default_value_t = 1000)]
    window: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// receive_maximum announced by both subscribers.
    #[arg(long, default_value_t = 1000)]
    receive_maximum: u16,
}

fn messages(n: usize, size: usize, round: usize, topic: &str) -> Vec<Message> {
    (0..n)
        .map(|i| json_message(topic, &format!("r{round}-{i}"), i, size))
        .collect()
}

async fn publish(port: u16, msgs: Vec<Message>, window: usize) -> Duration {
    let r = publish_all(
        port,
        "bench-publisher",
        msgs,
        window,
        Duration::from_secs(600),
        Progress::default(),
        None,
    )
    .await;
    r.elapsed
}

/// Plain subscriber: acks on receipt (rumqttc default), persists nothing.
async fn baseline(port: u16, a: &Args, round: usize) -> f64 {
    let mut o = MqttOptions::new(format!("bench-plain-{round}"), "127.0.0.1", port);
    o.set_receive_maximum(Some(a.receive_maximum));
    o.set_max_packet_size(Some(1 << 20));
    o.set_keep_alive(Duration::from_secs(30));
    let (client, mut el) = AsyncClient::new(o, 1024);
    let topic = format!("bench/plain/{round}");
    client
        .subscribe(topic.clone(), QoS::AtLeastOnce)
        .await
        .expect("subscribe");
    loop {
        if let Ok(Event::Incoming(Packet::SubAck(_))) = el.poll().await {
            break;
        }
    }
    let msgs = messages(a.messages, a.payload_bytes, round, &topic);
    let (n, window) = (a.messages, a.window);
    let pubber = tokio::spawn(publish(port, msgs, window));
    let t0 = Instant::now();
    let mut got = 0usize;
    while got < n {
        if let Ok(Event::Incoming(Packet::Publish(_))) = el.poll().await {
            got += 1;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    pubber.await.expect("publisher");
    let _ = client.disconnect().await;
    n as f64 / secs
}

/// The agent's bridge into a durable log.
async fn agent(port: u16, a: &Args, round: usize) -> (f64, f64) {
    let dir = tempfile::tempdir_in(".").expect("temp dir");
    let log = Arc::new(
        SqliteLog::open(
            dir.path(),
            LogConfig {
                integrity_check: edge_sync::log::IntegrityCheck::Off,
                min_free_disk: edge_core::config::ByteSize::b(0),
                ..LogConfig::default()
            },
        )
        .expect("log"),
    );
    let shutdown = Shutdown::new();
    let status = Status::new();
    let topic = format!("bench/agent/{round}");
    let cfg = MqttConfig {
        port,
        client_id: format!("bench-agent-{round}"),
        receive_maximum: a.receive_maximum,
        ingress: vec![IngressRule {
            topic: format!("bench/agent/{round}"),
            stream: "bench.ingest".into(),
            require_json: true,
            topic_header: false,
            key: None,
            schema: None,
            event_id_field: "event_id".into(),
            event_ts_field: "ts".into(),
        }],
        ..MqttConfig::default()
    };
    let ctx = ComponentContext::for_test(log.clone(), "mqtt")
        .with_store("bench")
        .with_shutdown(&shutdown)
        .with_status(&status, "mqtt")
        .with_data_dir(dir.path());
    let task = tokio::spawn(edge_sync::mqtt::build(cfg, ctx).expect("bridge"));
    while status.get("mqtt").map(|s| s.state) != Some(edge_core::State::Up) {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The subscription is queued at connect; give the SUBACK a moment to land.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let msgs = messages(a.messages, a.payload_bytes, round, &topic);
    let n = a.messages as u64;
    let pubber = tokio::spawn(publish(port, msgs, a.window));
    let t0 = Instant::now();
    let mut commits = log.subscribe();
    while log.next_seq("bench.ingest").unwrap_or(1) <= n {
        let _ = tokio::time::timeout(Duration::from_millis(50), commits.changed()).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    pubber.await.expect("publisher");
    shutdown.stop_intake();
    let _ = shutdown.wait_intake_drained(Duration::from_secs(5)).await;
    shutdown.stop_all();
    let _ = task.await;
    let bytes = log.usage().await.map(|u| u.used_bytes).unwrap_or(0) as f64;
    log.close().await.expect("close");
    (n as f64 / secs, bytes / n as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let broker = Mosquitto::start();
    let (mut base, mut ours, mut per_record) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..a.rounds {
        base.push(baseline(broker.port, &a, round).await);
        let (rate, bytes) = agent(broker.port, &a, round).await;
        ours.push(rate);
        per_record.push(bytes);
    }
    let (b, o) = (median(base.clone()), median(ours.clone()));
    println!(
        "{}",
        serde_json::json!({
            "bench": "mqtt_ingest",
            "messages": a.messages,
            "payload_bytes": a.payload_bytes,
            "publisher_window": a.window,
            "receive_maximum": a.receive_maximum,
            "rounds": a.rounds,
            "plain_subscriber_msgs_per_sec": base.iter().map(|x| x.round()).collect::<Vec<_>>(),
            "agent_ack_after_commit_msgs_per_sec": ours.iter().map(|x| x.round()).collect::<Vec<_>>(),
            "median_plain": b.round(),
            "median_agent": o.round(),
            "ratio": (o / b * 100.0).round() / 100.0,
            "db_bytes_per_record": median(per_record).round(),
        })
    );
    Ok(())
}
