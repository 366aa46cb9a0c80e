//! An MQTT 5 QoS 1 publisher that knows exactly which of its messages the broker acknowledged, and
//! republishes the rest after a reconnect that lost its session. (`mosquitto_pub -l` loses messages
//! in bulk; a load generator must wait for its PUBACKs.)

use bytes::Bytes;
use rumqttc::Outgoing;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, MqttOptions};
use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Message {
    pub topic: String,
    pub payload: Bytes,
}

/// A JSON message with an event id, padded to about `size` bytes.
pub fn json_message(topic: &str, event_id: &str, i: usize, size: usize) -> Message {
    let head = format!(
        r#"{{"event_id":"{event_id}","i":{i},"total_minor":{},"pad":""#,
        i * 7
    );
    let pad = size.saturating_sub(head.len() + 2);
    let payload = format!("{head}{}\"}}", "x".repeat(pad));
    Message {
        topic: topic.to_string(),
        payload: Bytes::from(payload),
    }
}

#[derive(Debug, Default, Clone)]
pub struct PublishReport {
    pub acked: usize,
    pub reconnects: u32,
    pub republished: usize,
    pub elapsed: Duration,
}

/// Progress visible while publishing (acked messages so far).
#[derive(Debug, Default, Clone)]
pub struct Progress(pub Arc<AtomicUsize>);

impl Progress {
    pub fn acked(&self) -> usize {
        self.0.load(Ordering::Acquire)
    }
}

/// Publishes every message at QoS 1 with at most `window` unacknowledged, until each one is
/// acknowledged or `timeout` passes.
pub async fn publish_all(
    port: u16,
    client_id: &str,
    messages: Vec<Message>,
    window: usize,
    timeout: Duration,
    progress: Progress,
    rate_per_sec: Option<f64>,
) -> PublishReport {
    let mut o = MqttOptions::new(client_id, "127.0.0.1", port);
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(600));
    o.set_keep_alive(Duration::from_secs(10));
    o.set_max_packet_size(Some(16 << 20));
    o.set_outgoing_inflight_upper_limit(window.min(u16::MAX as usize) as u16);
    let (client, mut el) = AsyncClient::new(o, window.max(16));
    let t0 = Instant::now();
    let n = messages.len();
    let mut acked = vec![false; n];
    let mut acked_count = 0usize;
    let mut to_send: VecDeque<usize> = (0..n).collect();
    // Indices requested but not yet seen as an outgoing PUBLISH, in request order.
    let mut requested: VecDeque<usize> = VecDeque::new();
    // pkid -> index for PUBLISHes on the wire awaiting PUBACK.
    let mut on_wire: HashMap<u16, usize> = HashMap::new();
    let mut report = PublishReport::default();
    let mut connected_once = false;
    while acked_count < n {
        assert!(
            t0.elapsed() < timeout,
            "publisher: only {acked_count} of {n} messages acknowledged after {timeout:?}"
        );
        // With a rate cap, only as many messages as the elapsed time allows.
        let allowed = rate_per_sec.map_or(usize::MAX, |r| {
            (t0.elapsed().as_secs_f64() * r) as usize + 1
        });
        while requested.len() + on_wire.len() < window && n - to_send.len() < allowed {
            let Some(i) = to_send.pop_front() else { break };
            let m = &messages[i];
            if client
                .try_publish(m.topic.clone(), QoS::AtLeastOnce, false, m.payload.clone())
                .is_err()
            {
                to_send.push_front(i);
                break;
            }
            requested.push_back(i);
        }
        let wait = if rate_per_sec.is_some() && !to_send.is_empty() {
            Duration::from_millis(2)
        } else {
            Duration::from_secs(5)
        };
        let ev = tokio::time::timeout(wait, el.poll()).await;
        match ev {
            Err(_) => continue,
            Ok(Ok(Event::Incoming(Packet::ConnAck(ca)))) => {
                if connected_once && !ca.session_present {
                    // The broker lost our session; rumqttc dropped what it had pending.
                    let mut lost: Vec<usize> = on_wire.drain().map(|(_, i)| i).collect();
                    lost.extend(requested.drain(..));
                    lost.sort_unstable();
                    report.republished += lost.len();
                    for i in lost.into_iter().rev() {
                        to_send.push_front(i);
                    }
                }
                connected_once = true;
            }
            Ok(Ok(Event::Outgoing(Outgoing::Publish(pkid)))) => {
                if !on_wire.contains_key(&pkid)
                    && let Some(i) = requested.pop_front()
                {
                    on_wire.insert(pkid, i);
                }
            }
            Ok(Ok(Event::Incoming(Packet::PubAck(a)))) => {
                if let Some(i) = on_wire.remove(&a.pkid)
                    && !acked[i]
                {
                    acked[i] = true;
                    acked_count += 1;
                    progress.0.store(acked_count, Ordering::Release);
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => {
                report.reconnects += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    let _ = client.disconnect().await;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while el.poll().await.is_ok() {}
    })
    .await;
    report.acked = acked_count;
    report.elapsed = t0.elapsed();
    report
}

/// Runs [`publish_all`] on its own thread and runtime, so blocking tests can fault-inject meanwhile.
pub fn spawn_publisher(
    port: u16,
    client_id: &str,
    messages: Vec<Message>,
    window: usize,
    timeout: Duration,
) -> (std::thread::JoinHandle<PublishReport>, Progress) {
    spawn_paced_publisher(port, client_id, messages, window, timeout, None)
}

/// [`spawn_publisher`] with at most `rate_per_sec` messages per second.
pub fn spawn_paced_publisher(
    port: u16,
    client_id: &str,
    messages: Vec<Message>,
    window: usize,
    timeout: Duration,
    rate_per_sec: Option<f64>,
) -> (std::thread::JoinHandle<PublishReport>, Progress) {
    let progress = Progress::default();
    let p = progress.clone();
    let id = client_id.to_string();
    let h = std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
            .block_on(publish_all(
                port,
                &id,
                messages,
                window,
                timeout,
                p,
                rate_per_sec,
            ))
    });
    (h, progress)
}
