//! `source = { kind = "mqtt", ... }`: remote receivers (ESP32 nodes) publishing to the store's
//! broker, in our `beacon.receiver/1` schema or the ESPresense format ([`super::receivers`]).
//!
//! The subscription is QoS 0 with a clean session: a sighting is worth something only now, the
//! nodes publish at QoS 0 themselves, and nothing is acknowledged to anyone, so no queue builds
//! up in the broker while the agent is away. The connection (TLS, user and password file) is
//! configured like the agent's own `[mqtt]`; a lost broker is retried with backoff (status
//! `down`, `retry_in_ms`) on the connection's own task.

use super::receivers::parse_message;
use super::source::{Drops, RawSighting, SightingSource};
use edge_core::State;
use edge_core::backoff::Backoff;
use edge_core::status::StatusHandle;
use edge_core::tls::TlsFiles;
use rumqttc::{AsyncClient, Event, EventLoop, Incoming, MqttOptions, QoS};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;
use tokio::sync::mpsc;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttSourceConfig {
    #[serde(default = "default_host")]
    pub host: String,
    #[serde(default = "default_port")]
    pub port: u16,
    /// Default: `<store>-beacons-<driver name>`.
    #[serde(default)]
    pub client_id: Option<String>,
    #[serde(default)]
    pub username: Option<String>,
    /// A file holding the password (never the password itself in config).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    #[serde(default)]
    pub tls: Option<TlsFiles>,
    /// Topic filters: our schema anywhere but under `espresense/`, ESPresense under
    /// `espresense/devices/`.
    #[serde(default = "default_topics")]
    pub topics: Vec<String>,
    /// Largest message accepted, bytes.
    #[serde(default = "default_max_message")]
    pub max_message_bytes: usize,
}

fn default_host() -> String {
    "localhost".into()
}

fn default_port() -> u16 {
    1883
}

fn default_topics() -> Vec<String> {
    vec!["edge/beacons/+".into(), "espresense/devices/+/+".into()]
}

fn default_max_message() -> usize {
    256 << 10
}

impl MqttSourceConfig {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if self.host.trim().is_empty() {
            p.push(("host".into(), "must name the broker".into()));
        }
        if self.topics.is_empty() {
            p.push((
                "topics".into(),
                "must list at least one topic filter".into(),
            ));
        }
        for (i, t) in self.topics.iter().enumerate() {
            let bad_wildcard = t
                .split('/')
                .any(|l| l.len() > 1 && (l.contains('+') || l.contains('#')))
                || t.split('/').rev().skip(1).any(|l| l == "#");
            if t.is_empty() || bad_wildcard {
                p.push((
                    format!("topics[{i}]"),
                    format!("{t:?} is not an MQTT topic filter"),
                ));
            }
        }
        if self.password_file.is_some() && self.username.is_none() {
            p.push(("password_file".into(), "needs username".into()));
        }
        if let Some(t) = &self.tls
            && t.cert_file.is_some() != t.key_file.is_some()
        {
            p.push(("tls".into(), "cert_file and key_file go together".into()));
        }
        p
    }

    fn options(&self, client_id: &str) -> Result<MqttOptions, String> {
        let mut o = MqttOptions::new(client_id, self.host.clone(), self.port);
        o.set_keep_alive(Duration::from_secs(30));
        o.set_clean_session(true);
        o.set_max_packet_size(self.max_message_bytes + 1024, 4096);
        if let Some(user) = &self.username {
            let password = match &self.password_file {
                Some(f) => edge_core::tls::read_secret_file(f)
                    .map_err(|e| format!("cannot read password_file {}: {e}", f.display()))?,
                None => String::new(),
            };
            o.set_credentials(user.clone(), password);
        }
        if let Some(t) = &self.tls {
            let config = edge_core::tls::client_config(t)?;
            o.set_transport(rumqttc::Transport::tls_with_config(
                rumqttc::TlsConfiguration::Rustls(config),
            ));
        }
        Ok(o)
    }
}

/// What the connection task hands over.
enum Batch {
    Sightings(Vec<RawSighting>),
    Refused(super::source::Drop, String),
}

/// The running subscription. The MQTT event loop runs on its own task (started at the first
/// `next`) and hands batches over a small bounded channel: the driver's window timer cancels
/// `next` every `window_ms / 4`, which must not cut a connect short or restart a backoff.
pub struct MqttSource {
    parts: Option<(AsyncClient, EventLoop)>,
    topics: Vec<String>,
    broker: String,
    rx: Option<mpsc::Receiver<Batch>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl std::fmt::Debug for MqttSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSource")
            .field("broker", &self.broker)
            .finish()
    }
}

impl Drop for MqttSource {
    fn drop(&mut self) {
        if let Some(t) = &self.task {
            t.abort();
        }
    }
}

impl MqttSource {
    /// Fails only on what cannot work (an unreadable password file, unusable TLS material); an
    /// unreachable broker is retried for ever.
    pub fn new(cfg: &MqttSourceConfig, client_id: &str) -> Result<MqttSource, String> {
        let parts = AsyncClient::new(cfg.options(client_id)?, 64);
        Ok(MqttSource {
            parts: Some(parts),
            topics: cfg.topics.clone(),
            broker: format!("{}:{}", cfg.host, cfg.port),
            rx: None,
            task: None,
        })
    }
}

async fn connection(
    client: AsyncClient,
    mut eventloop: EventLoop,
    topics: Vec<String>,
    broker: String,
    status: StatusHandle,
    tx: mpsc::Sender<Batch>,
) {
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
    let mut connected = false;
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                connected = true;
                backoff.reset();
                for t in &topics {
                    // The request queue has room: it was just drained by the connect.
                    let _ = client.try_subscribe(t.clone(), QoS::AtMostOnce);
                }
                status.set(
                    State::Up,
                    format!("subscribed to {} at {broker}", topics.join(", ")),
                );
            }
            Ok(Event::Incoming(Incoming::Publish(p))) => {
                let b = match parse_message(&p.topic, &p.payload, edge_core::time::now_ms()) {
                    Ok(v) => Batch::Sightings(v),
                    // The reason names no address and quotes no payload.
                    Err(r) => Batch::Refused(r.drop, r.reason),
                };
                if tx.send(b).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                if connected || status.state() != Some(State::Down) {
                    status.set(
                        State::Down,
                        format!("the receivers' broker {broker} is unreachable: {e}"),
                    );
                }
                connected = false;
                let wait = backoff.next_delay();
                status.field("retry_in_ms", wait.as_millis() as u64);
                tokio::time::sleep(wait).await;
            }
        }
    }
}

impl SightingSource for MqttSource {
    async fn next(&mut self, status: &StatusHandle, drops: &mut Drops) -> Option<Vec<RawSighting>> {
        if let Some((client, eventloop)) = self.parts.take() {
            let (tx, rx) = mpsc::channel(64);
            self.rx = Some(rx);
            self.task = Some(tokio::spawn(connection(
                client,
                eventloop,
                self.topics.clone(),
                self.broker.clone(),
                status.clone(),
                tx,
            )));
        }
        let rx = self.rx.as_mut()?;
        loop {
            match rx.recv().await? {
                Batch::Sightings(v) => return Some(v),
                Batch::Refused(d, reason) => {
                    drops.add(d, 1);
                    status.field("last_refused", reason);
                }
            }
        }
    }
}
