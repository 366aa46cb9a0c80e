//! `[mqtt]` configuration.

use super::topic::{TopicPattern, egress_template_problems};
use edge_core::config::{ByteSize, Problems, check_stream_name, join};
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::time::Duration;

/// Connection to the store's MQTT broker, and what flows over it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub enabled: bool,
    pub host: String,
    pub port: u16,
    /// Stable client id, so the broker keeps our session (and queues QoS 1 messages) across
    /// restarts. `{store}` is replaced by the store id.
    pub client_id: String,
    pub username: Option<String>,
    /// File holding the password (never put the password itself in the config).
    pub password_file: Option<PathBuf>,
    pub tls: Option<MqttTls>,
    #[serde(with = "humantime_serde")]
    pub keep_alive: Duration,
    /// MQTT 5 session expiry: how long the broker keeps our subscriptions and queued messages
    /// while the agent is away. Must be > 0 for a persistent session.
    #[serde(with = "humantime_serde")]
    pub session_expiry: Duration,
    /// MQTT 5 receive maximum: unacknowledged QoS 1 messages the broker may send us at once. With
    /// ack-after-commit this is the ingest window; too small and throughput collapses.
    pub receive_maximum: u16,
    /// Largest MQTT packet we accept (MQTT 5 maximum packet size).
    pub max_packet_size: ByteSize,
    /// Payloads above this are dead-lettered (truncated) instead of stored.
    pub max_payload: ByteSize,
    /// Bytes of an offending payload kept in its dead letter.
    pub deadletter_keep: ByteSize,
    #[serde(with = "humantime_serde")]
    pub reconnect_min: Duration,
    #[serde(with = "humantime_serde")]
    pub reconnect_max: Duration,
    pub ingress: Vec<IngressRule>,
    pub egress: Vec<EgressRule>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            enabled: true,
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: "edge-agent-{store}".into(),
            username: None,
            password_file: None,
            tls: None,
            keep_alive: Duration::from_secs(30),
            session_expiry: Duration::from_secs(7 * 24 * 3600),
            receive_maximum: 1000,
            max_packet_size: ByteSize::mib(1),
            max_payload: ByteSize::kib(256),
            deadletter_keep: ByteSize::kib(64),
            reconnect_min: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            ingress: Vec::new(),
            egress: Vec::new(),
        }
    }
}

/// The `[mqtt.tls]` table.
pub type MqttTls = edge_core::tls::TlsFiles;

/// MQTT topics -> a local stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngressRule {
    /// Topic filter; single-level wildcards may be named, e.g. `store/+/pos/{device}/transactions`.
    pub topic: String,
    pub stream: String,
    /// Payload must be a JSON object (else dead-lettered). Default true.
    #[serde(default = "yes")]
    pub require_json: bool,
    /// Store the MQTT topic as the record header `mqtt.topic` (costs ~50 bytes per record).
    #[serde(default)]
    pub topic_header: bool,
    /// Placeholder whose value becomes the record key (and source); default: `device` if the
    /// topic has it, else the first placeholder.
    pub key: Option<String>,
    /// Schema when the payload has no `schema` field.
    pub schema: Option<String>,
    /// JSON field holding the event id (dedup across redelivery). Default `event_id`; the MQTT 5
    /// user property `event_id` is used too.
    #[serde(default = "default_event_id_field")]
    pub event_id_field: String,
    /// JSON field holding the event time in ms since the Unix epoch. Default `ts`; absent or not
    /// an integer means "now".
    #[serde(default = "default_ts_field")]
    pub event_ts_field: String,
}

fn yes() -> bool {
    true
}
fn default_event_id_field() -> String {
    "event_id".into()
}
fn default_ts_field() -> String {
    "ts".into()
}

/// Where a new egress cursor starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartAt {
    /// From the oldest stored record.
    #[default]
    Earliest,
    /// From the next new record.
    Latest,
}

/// A local stream -> MQTT topics.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EgressRule {
    pub stream: String,
    /// Topic template: `{store}`, `{stream}`, `{key}`, `{source}`.
    pub topic: String,
    /// Publish retained, so a kiosk that (re)subscribes gets the latest at once.
    #[serde(default)]
    pub retain: bool,
    #[serde(default)]
    pub start_at: StartAt,
    /// Skip (and count) records older than this when publishing; stale offers are useless.
    #[serde(default, with = "humantime_serde")]
    pub max_age: Option<Duration>,
    /// Cursor name; default `mqtt.egress.<stream>`. Two rules on one stream need distinct names.
    pub cursor: Option<String>,
}

impl EgressRule {
    pub fn cursor_name(&self) -> String {
        self.cursor
            .clone()
            .unwrap_or_else(|| format!("mqtt.egress.{}", self.stream))
    }
}

impl MqttConfig {
    pub fn client_id_for(&self, store: &str) -> String {
        self.client_id.replace("{store}", store)
    }

    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if !self.enabled {
            return;
        }
        if self.host.is_empty() {
            problems.push(
                join(path, "host"),
                "must name the broker host, e.g. \"127.0.0.1\"",
            );
        }
        if self.port == 0 {
            problems.push(join(path, "port"), "must not be 0");
        }
        if self.client_id.is_empty() || self.client_id.len() > 128 {
            problems.push(join(path, "client_id"), "must be 1 to 128 characters");
        }
        if self.username.is_none() && self.password_file.is_some() {
            problems.push(join(path, "password_file"), "is set but username is not");
        }
        if let Some(f) = &self.password_file
            && !f.is_file()
        {
            problems.push(
                join(path, "password_file"),
                format!("{} does not exist or is not a file", f.display()),
            );
        }
        if let Some(tls) = &self.tls {
            let tp = join(path, "tls");
            for (name, f) in [
                ("ca_file", &tls.ca_file),
                ("cert_file", &tls.cert_file),
                ("key_file", &tls.key_file),
            ] {
                if let Some(f) = f
                    && !f.is_file()
                {
                    problems.push(
                        join(&tp, name),
                        format!("{} does not exist or is not a file", f.display()),
                    );
                }
            }
            if tls.cert_file.is_some() != tls.key_file.is_some() {
                problems.push(
                    tp,
                    "cert_file and key_file must be given together for mutual TLS",
                );
            }
        }
        if self.keep_alive < Duration::from_secs(5) || self.keep_alive > Duration::from_secs(65535)
        {
            problems.push(join(path, "keep_alive"), "must be between 5s and 65535s");
        }
        if self.session_expiry.is_zero() {
            problems.push(
                join(path, "session_expiry"),
                "must be > 0: with MQTT 5 a zero expiry ends the session at disconnect and the broker drops queued messages",
            );
        }
        if self.session_expiry.as_secs() > u32::MAX as u64 {
            problems.push(join(path, "session_expiry"), "must be below 136 years");
        }
        if self.receive_maximum == 0 {
            problems.push(join(path, "receive_maximum"), "must be at least 1");
        }
        if self.max_payload.as_u64() > self.max_packet_size.as_u64() {
            problems.push(join(path, "max_payload"), "must not exceed max_packet_size");
        }
        if self.max_packet_size.as_u64() > u32::MAX as u64 / 2 {
            problems.push(join(path, "max_packet_size"), "must be below 2 GiB");
        }
        if self.reconnect_min.is_zero() || self.reconnect_min > self.reconnect_max {
            problems.push(
                join(path, "reconnect_min"),
                "must be > 0 and not above reconnect_max",
            );
        }
        let mut filters = std::collections::HashMap::new();
        for (i, r) in self.ingress.iter().enumerate() {
            let p = format!("{}[{i}]", join(path, "ingress"));
            match TopicPattern::parse(&r.topic) {
                Ok(t) => {
                    if let Some(k) = &r.key
                        && !t.placeholders().contains(&k.as_str())
                    {
                        problems.push(
                            join(&p, "key"),
                            format!("{{{k}}} is not a placeholder of topic {:?}", r.topic),
                        );
                    }
                    if let Some(first) = filters.insert(t.filter(), i) {
                        problems.push(
                            join(&p, "topic"),
                            format!(
                                "subscribes to the same filter as {}[{first}]",
                                join(path, "ingress")
                            ),
                        );
                    }
                }
                Err(e) => problems.push(join(&p, "topic"), e),
            }
            if let Err(e) = check_stream_name(&r.stream) {
                problems.push(join(&p, "stream"), e);
            }
        }
        let mut cursors = std::collections::HashMap::new();
        for (i, r) in self.egress.iter().enumerate() {
            let p = format!("{}[{i}]", join(path, "egress"));
            if let Err(e) = check_stream_name(&r.stream) {
                problems.push(join(&p, "stream"), e);
            }
            for problem in egress_template_problems(&r.topic) {
                problems.push(join(&p, "topic"), problem);
            }
            if let Some(first) = cursors.insert(r.cursor_name(), i) {
                problems.push(
                    join(&p, "cursor"),
                    format!(
                        "cursor {:?} is also used by {}[{first}]; give each rule on a stream its own cursor",
                        r.cursor_name(),
                        join(path, "egress")
                    ),
                );
            }
            for ing in &self.ingress {
                if ing.stream == r.stream
                    && let Ok(t) = TopicPattern::parse(&ing.topic)
                    && t.matches(&r.topic.replace(['{', '}'], "x")).is_some()
                {
                    problems.push(
                        join(&p, "topic"),
                        format!(
                            "publishes into topics the ingress rule {:?} reads back into the same stream (a loop)",
                            ing.topic
                        ),
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let cfg = MqttConfig {
            port: 0,
            session_expiry: Duration::ZERO,
            receive_maximum: 0,
            password_file: Some("/nonexistent/secret".into()),
            ingress: vec![
                IngressRule {
                    topic: "a/#/b".into(),
                    stream: "Bad Stream".into(),
                    require_json: true,
                    topic_header: false,
                    key: None,
                    schema: None,
                    event_id_field: "event_id".into(),
                    event_ts_field: "ts".into(),
                },
                IngressRule {
                    topic: "store/{device}/x".into(),
                    stream: "pos.transactions".into(),
                    require_json: true,
                    topic_header: false,
                    key: Some("lane".into()),
                    schema: None,
                    event_id_field: "event_id".into(),
                    event_ts_field: "ts".into(),
                },
            ],
            egress: vec![EgressRule {
                stream: "offers.decisions".into(),
                topic: "offers/{nope}/#".into(),
                retain: false,
                start_at: StartAt::Earliest,
                max_age: None,
                cursor: None,
            }],
            ..Default::default()
        };
        let mut p = Problems::new();
        cfg.validate("mqtt", &mut p);
        let text = p.to_string();
        for needle in [
            "mqtt.port:",
            "mqtt.session_expiry:",
            "mqtt.receive_maximum:",
            "mqtt.password_file:",
            "mqtt.ingress[0].topic:",
            "mqtt.ingress[0].stream:",
            "mqtt.ingress[1].key:",
            "mqtt.egress[0].topic: must be a topic name without wildcards",
            "mqtt.egress[0].topic: unknown placeholder {nope}",
        ] {
            assert!(text.contains(needle), "missing {needle:?} in:\n{text}");
        }
    }

    #[test]
    fn defaults_are_valid() {
        let mut p = Problems::new();
        MqttConfig::default().validate("mqtt", &mut p);
        assert!(p.is_empty(), "{p}");
    }
}
