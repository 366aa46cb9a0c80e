//! `source = { kind = "mqtt", ... }`: remote receivers (ESP32 nodes) publishing to the store's
//! broker, in our `beacon.receiver/1` schema or the ESPresense format ([`super::receivers`]).
//!
//! The subscription is QoS 0 with a clean session: a sighting is worth something only now, the
//! nodes publish at QoS 0 themselves, and nothing is acknowledged to anyone, so no queue builds
//! up in the broker while the agent is away. The connection (TLS, user and password file) is
//! configured like the agent's own `[mqtt]`; a lost broker is retried with backoff and shown in
//! status.

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
                Some(f) => std::fs::read_to_string(f)
                    .map_err(|e| format!("cannot read password_file {}: {e}", f.display()))?
                    .trim_end_matches(['\r', '\n'])
                    .to_string(),
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

/// The running subscription.
pub struct MqttSource {
    client: AsyncClient,
    eventloop: EventLoop,
    topics: Vec<String>,
    broker: String,
    backoff: Backoff,
    connected: bool,
    messages: u64,
}

impl std::fmt::Debug for MqttSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MqttSource")
            .field("broker", &self.broker)
            .finish()
    }
}

impl MqttSource {
    /// Fails only on what cannot work (an unreadable password file, unusable TLS material); an
    /// unreachable broker is retried for ever.
    pub fn new(cfg: &MqttSourceConfig, client_id: &str) -> Result<MqttSource, String> {
        let (client, eventloop) = AsyncClient::new(cfg.options(client_id)?, 64);
        Ok(MqttSource {
            client,
            eventloop,
            topics: cfg.topics.clone(),
            broker: format!("{}:{}", cfg.host, cfg.port),
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(30)),
            connected: false,
            messages: 0,
        })
    }
}

impl SightingSource for MqttSource {
    async fn next(&mut self, status: &StatusHandle, drops: &mut Drops) -> Option<Vec<RawSighting>> {
        loop {
            match self.eventloop.poll().await {
                Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                    self.connected = true;
                    self.backoff.reset();
                    for t in &self.topics {
                        // The request queue has room: it was just drained by the connect.
                        let _ = self.client.try_subscribe(t.clone(), QoS::AtMostOnce);
                    }
                    status.set(
                        State::Up,
                        format!(
                            "subscribed to {} at {}",
                            self.topics.join(", "),
                            self.broker
                        ),
                    );
                }
                Ok(Event::Incoming(Incoming::Publish(p))) => {
                    self.messages += 1;
                    let topic = &p.topic;
                    match parse_message(topic, &p.payload, edge_core::time::now_ms()) {
                        Ok(v) => return Some(v),
                        Err(r) => {
                            drops.add(r.drop, 1);
                            // The reason names no address and quotes no payload.
                            status.field("last_refused", r.reason);
                        }
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if self.connected || status.state() != Some(State::Down) {
                        status.set(
                            State::Down,
                            format!("the receivers' broker {} is unreachable: {e}", self.broker),
                        );
                    }
                    self.connected = false;
                    tokio::time::sleep(self.backoff.next_delay()).await;
                }
            }
        }
    }
}
