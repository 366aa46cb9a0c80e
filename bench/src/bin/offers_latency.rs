//! Presence event published on MQTT -> offer received on MQTT, through the real release agent
//! (MQTT ingress into `presence.events`, the offers engine, `offers.decisions`, an MQTT egress
//! rule), against a bare MQTT round trip through the same broker by the same client at the same
//! rate, in alternating rounds of one run. Both sides publish at QoS 1 and subscribe at QoS 1.
//! Every presence event is a new shopper entering a campaign zone, so each asks for (and gets)
//! one offer. Prints one JSON line.

use clap::Parser;
use edge_tests::agent::Agent;
use edge_tests::mosquitto::Mosquitto;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use serde_json::json;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// The agent binary (a release build).
    #[arg(long)]
    agent: PathBuf,
    /// Presence events (and echo messages) per second.
    #[arg(long, default_value_t = 200)]
    rate: u32,
    /// Seconds per round and side.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

type Sent = Arc<Mutex<HashMap<String, Instant>>>;

fn percentile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let x = v[((v.len() - 1) as f64 * p) as usize];
    (x * 100.0).round() / 100.0
}

/// Publishes `n` messages at `rate`/s, each to `topic(i)` with `payload(i)`, recording the send
/// time under `id(i)`; waits until every one came back or 10 s passed; returns latencies in ms.
#[allow(clippy::too_many_arguments)]
async fn round(
    client: &AsyncClient,
    sent: &Sent,
    got: &Arc<Mutex<Vec<f64>>>,
    n: usize,
    rate: u32,
    topic: impl Fn(usize) -> String,
    payload: impl Fn(usize) -> Vec<u8>,
    id: impl Fn(usize) -> String,
) -> Vec<f64> {
    got.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let start = Instant::now();
    for i in 0..n {
        let due = start + Duration::from_secs_f64(i as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        sent.lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id(i), Instant::now());
        client
            .publish(topic(i), QoS::AtLeastOnce, false, payload(i))
            .await
            .expect("publish");
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.lock().unwrap_or_else(|e| e.into_inner()).len() < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    got.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let broker = Mosquitto::start();
    let sections = r#"[[mqtt.ingress]]
topic = "store/presence"
stream = "presence.events"
schema = "presence.event/1"

[[mqtt.egress]]
stream = "offers.decisions"
topic = "store/{store}/offers/{key}"

[offers]
enabled = true
zones = [{ name = "aisle-3", display = "shelf_screen", lane = "3" }]
prices = { "4011" = 150 }

[[offers.campaigns]]
id = "cola"
version = 1
zones = ["aisle-3"]
priority = 5
offer = { headline = "COLA 2 FOR {price}", display_lines = ["COLA 2 FOR {price}", "TODAY ONLY"], sku = "4011" }
caps = { per_visit = 1 }

[[offers.campaigns]]
id = "welcome"
version = 1
fallback = true
offer = { headline = "WELCOME" }
"#;
    let config = edge_bench::agent_config(broker.port, sections);
    let agent = Agent::start(a.agent.clone(), &config);

    let mut o = MqttOptions::new("bench-offers-client", "127.0.0.1", broker.port);
    o.set_keep_alive(Duration::from_secs(30));
    // Like the agent's client (and any latency-minded kiosk): no Nagle.
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    let (client, mut el) = AsyncClient::new(o, 4096);
    client
        .subscribe("store/s1/offers/#", QoS::AtLeastOnce)
        .await?;
    client.subscribe("bench/echo/#", QoS::AtLeastOnce).await?;
    let sent: Sent = Arc::default();
    let got: Arc<Mutex<Vec<f64>>> = Arc::default();
    let (s2, g2) = (sent.clone(), got.clone());
    let (subacked_tx, subacked) = tokio::sync::watch::channel(0usize);
    tokio::spawn(async move {
        let mut subacks = 0;
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let now = Instant::now();
                    let topic = String::from_utf8_lossy(&p.topic).to_string();
                    let id = topic.rsplit('/').next().unwrap_or("").to_string();
                    if let Some(t) = s2.lock().unwrap_or_else(|e| e.into_inner()).remove(&id) {
                        g2.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((now - t).as_secs_f64() * 1000.0);
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => {
                    subacks += 1;
                    let _ = subacked_tx.send(subacks);
                }
                Ok(_) => {}
                Err(e) => {
                    eprintln!("mqtt: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    let mut sa = subacked.clone();
    sa.wait_for(|n| *n >= 2).await?;
    let n = (a.rate as u64 * a.seconds) as usize;
    let (mut bare, mut offers) = (Vec::new(), Vec::new());
    let mut lost = (0usize, 0usize);
    // A short warm-up of the offers path (first decisions open cursors and statements).
    let _ = round(
        &client,
        &sent,
        &got,
        50,
        a.rate,
        |_| "store/presence".into(),
        |i| presence(&format!("warm{i}")),
        |i| format!("warm{i}"),
    )
    .await;
    for r in 0..a.rounds {
        let b = round(
            &client,
            &sent,
            &got,
            n,
            a.rate,
            |i| format!("bench/echo/r{r}e{i}"),
            |i| format!(r#"{{"i":{i}}}"#).into_bytes(),
            |i| format!("r{r}e{i}"),
        )
        .await;
        lost.0 += n - b.len();
        bare.extend(b);
        let o = round(
            &client,
            &sent,
            &got,
            n,
            a.rate,
            |_| "store/presence".into(),
            |i| presence(&format!("r{r}t{i}")),
            |i| format!("r{r}t{i}"),
        )
        .await;
        lost.1 += n - o.len();
        offers.extend(o);
    }
    let decisions = agent.count("offers.decisions");
    println!(
        "{}",
        json!({
            "bench": "offers_latency",
            "rate_per_sec": a.rate,
            "samples_per_side": n * a.rounds,
            "bare_mqtt_round_trip_ms": {"p50": percentile(&mut bare, 0.5), "p99": percentile(&mut bare, 0.99), "max": percentile(&mut bare, 1.0)},
            "presence_to_offer_ms": {"p50": percentile(&mut offers, 0.5), "p99": percentile(&mut offers, 0.99), "max": percentile(&mut offers, 1.0)},
            "not_received": {"bare": lost.0, "offers": lost.1},
            "decisions_logged": decisions,
        })
    );
    drop(agent);
    Ok(())
}

fn presence(tag: &str) -> Vec<u8> {
    json!({
        "schema": "presence.event/1",
        "kind": "enter",
        "tag": tag,
        "zone": "aisle-3",
        "ts": edge_core::time::now_ms(),
        "confidence": 0.9,
    })
    .to_string()
    .into_bytes()
}
