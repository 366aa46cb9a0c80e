//! The `[kafka]` section of the agent config: where HQ's Kafka is, how records are mirrored to it and
//! what the downlink consumes. Every option is documented with an example in `docs/KAFKA.md`.
//!
//! Secrets (SASL password, TLS key password) are never in the config file itself: the config names
//! files that hold them, read when the component starts, and nothing here prints their contents.

use edge_core::config::{ByteSize, Problems, check_stream_name, join};
use edge_core::downlink::TopicPolicy;
use edge_core::signing::{KeyError, PublicKey, Verifier};
use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// How records are delivered to Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryMode {
    /// Transactional producer: each batch commits together with its checkpoint; HQ consumers reading
    /// `read_committed` see every record once.
    #[default]
    ExactlyOnce,
    /// Idempotent producer, acks=all, the cursor moves on delivery reports. A crash can resend the
    /// records of the last moments; the identity headers make them removable downstream. For brokers
    /// without transactions.
    AtLeastOnce,
}

impl DeliveryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::ExactlyOnce => "exactly_once",
            DeliveryMode::AtLeastOnce => "at_least_once",
        }
    }
}

/// What the Kafka message key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum KeyMode {
    /// The store id: all of a store's records of a stream land in one partition, in seq order.
    #[default]
    Store,
    /// `store/device` (the event's key, else its source): spreads a store over partitions; order is
    /// then kept per device only.
    StoreDevice,
}

/// Compression of produced batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Compression {
    #[default]
    Zstd,
    Lz4,
    None,
}

impl Compression {
    fn librdkafka(self) -> &'static str {
        match self {
            Compression::Zstd => "zstd",
            Compression::Lz4 => "lz4",
            Compression::None => "none",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum SecurityProtocol {
    #[default]
    Plaintext,
    Ssl,
    SaslPlaintext,
    SaslSsl,
}

impl SecurityProtocol {
    pub fn librdkafka(self) -> &'static str {
        match self {
            SecurityProtocol::Plaintext => "plaintext",
            SecurityProtocol::Ssl => "ssl",
            SecurityProtocol::SaslPlaintext => "sasl_plaintext",
            SecurityProtocol::SaslSsl => "sasl_ssl",
        }
    }
    fn uses_tls(self) -> bool {
        matches!(self, SecurityProtocol::Ssl | SecurityProtocol::SaslSsl)
    }
    pub fn uses_sasl(self) -> bool {
        matches!(
            self,
            SecurityProtocol::SaslPlaintext | SecurityProtocol::SaslSsl
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SaslMechanism {
    #[serde(rename = "PLAIN")]
    Plain,
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    #[serde(rename = "SCRAM-SHA-512")]
    ScramSha512,
}

impl SaslMechanism {
    fn librdkafka(self) -> &'static str {
        match self {
            SaslMechanism::Plain => "PLAIN",
            SaslMechanism::ScramSha256 => "SCRAM-SHA-256",
            SaslMechanism::ScramSha512 => "SCRAM-SHA-512",
        }
    }
}

/// `[kafka.security]`: TLS, mTLS and SASL. Secrets are read from files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    pub protocol: SecurityProtocol,
    /// CA certificate(s) (PEM) that signed the brokers' certificates. Default: the system store.
    pub ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mTLS; needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// Client private key (PEM) for mTLS.
    pub key_file: Option<PathBuf>,
    /// File holding the password of an encrypted `key_file`.
    pub key_password_file: Option<PathBuf>,
    /// Check that the broker certificate matches its host name (default true).
    pub verify_hostname: Option<bool>,
    pub sasl_mechanism: Option<SaslMechanism>,
    pub username: Option<String>,
    /// File holding the SASL password (a trailing newline is ignored).
    pub password_file: Option<PathBuf>,
}

/// One HQ topic the downlink consumes and the local stream it writes into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DownlinkTopic {
    pub topic: String,
    pub stream: String,
    /// Refuse (dead-letter) records without a valid HQ signature. Default: true for the commands
    /// stream (`kafka.commands_stream`), false for the others. Signed records are verified on
    /// every topic, so a bad signature is refused whatever this says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_signature: Option<bool>,
}

impl DownlinkTopic {
    /// A topic with the default signature policy.
    pub fn new(topic: impl Into<String>, stream: impl Into<String>) -> DownlinkTopic {
        DownlinkTopic {
            topic: topic.into(),
            stream: stream.into(),
            require_signature: None,
        }
    }

    /// Whether this topic refuses unsigned records (`commands_stream`: the uplink's commands).
    pub fn requires_signature(&self, commands_stream: &str) -> bool {
        self.require_signature
            .unwrap_or(self.stream == commands_stream)
    }
}

/// `[[kafka.downlink.keys]]`: one HQ public key the store trusts for signed downlink records.
/// Several keys may be listed at once (rotation); records name theirs in `edge.sig.key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HqKey {
    /// The key id, e.g. `hq-2026-11` (letters, digits, `.`, `_`, `-`).
    pub id: String,
    /// Base64 of the 32-byte ed25519 public key (what `edge-agent keygen` prints), or of its DER
    /// SubjectPublicKeyInfo (the body of an openssl `PUBLIC KEY` PEM).
    pub public_key: String,
    /// After this time (RFC 3339, e.g. "2027-06-01T00:00:00Z") the key verifies nothing, whatever
    /// a record claims about when it was signed.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub not_after: Option<std::time::SystemTime>,
}

impl HqKey {
    fn not_after_ms(&self) -> Option<i64> {
        self.not_after.map(|t| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        })
    }

    pub fn public_key(&self) -> Result<PublicKey, KeyError> {
        PublicKey::from_base64(&self.id, &self.public_key, self.not_after_ms())
    }
}

/// Where the downlink starts on a partition it has no stored offset for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum StartFrom {
    /// Everything HQ still has (compacted price and campaign topics hold the current set).
    #[default]
    Earliest,
    Latest,
}

/// `[kafka.downlink]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownlinkConfig {
    pub enabled: bool,
    pub topics: Vec<DownlinkTopic>,
    /// HQ's public keys (`[[kafka.downlink.keys]]`).
    pub keys: Vec<HqKey>,
    pub start_from: StartFrom,
    /// Records applied per local transaction at most.
    pub batch_max_records: usize,
    /// Bytes (payloads, keys and headers) held and applied per local transaction at most; a
    /// single larger record is applied alone. Bounds the downlink's memory whatever HQ sends
    /// (a batch of model chunks, say).
    pub batch_max_bytes: ByteSize,
    /// How long a batch waits for more records before it is applied.
    pub batch_max_wait_ms: u64,
    /// Interval of partition discovery (new topics and partitions at HQ).
    pub metadata_refresh_ms: u64,
}

impl Default for DownlinkConfig {
    fn default() -> Self {
        DownlinkConfig {
            enabled: true,
            topics: ["hq.prices", "hq.campaigns", "hq.models", "hq.commands"]
                .into_iter()
                .map(|t| DownlinkTopic::new(t, t))
                .collect(),
            keys: Vec::new(),
            start_from: StartFrom::Earliest,
            batch_max_records: 1000,
            batch_max_bytes: ByteSize::mib(16),
            batch_max_wait_ms: 20,
            metadata_refresh_ms: 30_000,
        }
    }
}

/// `[kafka]` section of the agent config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port`.
    pub brokers: Vec<String>,
    pub mode: DeliveryMode,
    /// Cloud topic of a local stream: `{stream}` and `{store}` are replaced. `edge.{stream}` (one
    /// aggregated topic per stream for all stores) or `{store}.{stream}` (MirrorMaker-2 style).
    pub topic_template: String,
    pub key: KeyMode,
    /// `transactional.id` is `<prefix>.<store id>`: one transactional producer per store.
    pub transactional_id_prefix: String,
    /// Compacted topic holding the last committed seq per store, stream and epoch.
    pub checkpoint_topic: String,
    /// Also commit each checkpoint as the offset of consumer group `edge-agent.checkpoint.<store>`
    /// inside its transaction, so a session start looks it up in one request instead of scanning
    /// the fleet's checkpoint topic. Needs group READ for that group in HQ's ACLs.
    pub checkpoint_offsets: bool,
    pub heartbeat_topic: String,
    pub gap_topic: String,
    /// Interval of `edge.heartbeats` records; 0 turns heartbeats off.
    pub heartbeat_interval_ms: u64,
    /// Local streams that are never mirrored (besides streams with `mirror = false` in `[log]`).
    pub exclude_streams: Vec<String>,
    /// Mirror the streams the downlink writes (HQ's own prices, campaigns, models, commands) back
    /// to HQ. Off by default: HQ has them. They stay protected and never expire locally; the log
    /// keeps the newest record per key plus a history (`[log.streams] keep_latest_per_key`).
    pub mirror_downlink_streams: bool,
    /// Local stream the uplink reads HQ's commands from (the downlink writes `hq.commands` there).
    pub commands_stream: String,
    pub compression: Compression,
    /// Most records per transaction (exactly_once). A transaction's records are streamed from the
    /// log in small chunks, so this costs no memory; larger transactions spread the fixed cost of a
    /// commit over more records. A transaction also ends after [`TXN_MAX_OPEN_MS`] or when no
    /// record is pending.
    pub batch_max_records: usize,
    /// Most bytes (approximate wire size) per transaction (exactly_once).
    pub batch_max_bytes: ByteSize,
    /// Shortest time from the start of one transaction to the start of the next (exactly_once).
    /// 0 (default): a transaction starts as soon as a record is pending, so a live record waits
    /// for one short transaction. A fleet sets it to gather a trickle into fewer transactions:
    /// each costs HQ's brokers about seven requests and two transaction markers whatever it
    /// holds (docs/SCALING.md). At most 10000.
    pub transaction_interval_ms: u64,
    /// librdkafka's `linger.ms`: how long it waits to fill a network batch.
    pub linger_ms: u64,
    /// Bound of librdkafka's in-memory queue (payload bytes; the message count is bounded too,
    /// see [`KafkaConfig::producer_queue_messages`]). The local log is the real buffer; this only
    /// keeps the network busy, and it is most of the uplink's memory during a drain.
    pub producer_queue_bytes: ByteSize,
    /// Largest record (payload + headers) sent; larger records are reported on `edge.gaps`.
    pub max_record_bytes: ByteSize,
    /// Transaction timeout at the broker (must not exceed the broker's `transaction.max.timeout.ms`).
    pub transaction_timeout_ms: u64,
    /// An event time further ahead of the ingest time than this (a device clock running fast) is
    /// not used as the Kafka timestamp: the record gets the ingest time and keeps the device's time
    /// in the `edge.event_ts` header. Keep it below the broker's
    /// `log.message.timestamp.after.max.ms` (1 h by default), which refuses such records.
    pub event_time_max_ahead_ms: u64,
    /// The same for an event time further behind the ingest time (a clock reset to an old date):
    /// such a timestamp would fall outside HQ's retention and be deleted on arrival. 0 = no limit.
    /// A backlog that waited offline keeps its event times: they are measured against the time
    /// the agent received the record, not the time it is sent.
    pub event_time_max_behind_ms: u64,
    /// Bandwidth cap for metered links (record bytes per second); 0 = unlimited.
    pub max_bytes_per_sec: ByteSize,
    /// Create the side topics (and data topics on first use) when they are missing.
    pub create_topics: bool,
    /// Partitions of topics this agent creates.
    pub topic_partitions: i32,
    /// Replication factor of topics this agent creates; -1 = the broker's default.
    pub topic_replication_factor: i32,
    /// Longest pause between reconnection attempts (librdkafka adds up to +50 % jitter). Keep it
    /// <= 1000 so that a drain starts within 2 s of the broker coming back.
    pub reconnect_backoff_max_ms: u64,
    /// An uplink whose link is up while records wait and nothing has been committed for this
    /// long is **wedged**: the agent reports itself unhealthy (`/healthz`, `/readyz`, the
    /// systemd watchdog), so systemd restarts it. 0 turns the check off. At least 10 s, and more
    /// than `transaction_timeout_ms` (a commit may legitimately take that long).
    pub stall_timeout_ms: u64,
    /// Extra librdkafka properties for tuning (see librdkafka's CONFIGURATION.md). Properties that
    /// the delivery guarantees depend on cannot be overridden here.
    pub client_properties: BTreeMap<String, String>,
    pub security: SecurityConfig,
    pub downlink: DownlinkConfig,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: Vec::new(),
            mode: DeliveryMode::ExactlyOnce,
            topic_template: "edge.{stream}".into(),
            key: KeyMode::Store,
            transactional_id_prefix: "edge-agent".into(),
            checkpoint_topic: "edge.__checkpoints".into(),
            checkpoint_offsets: true,
            heartbeat_topic: "edge.heartbeats".into(),
            gap_topic: "edge.gaps".into(),
            heartbeat_interval_ms: 30_000,
            exclude_streams: Vec::new(),
            mirror_downlink_streams: false,
            commands_stream: "hq.commands".into(),
            compression: Compression::Zstd,
            batch_max_records: 100_000,
            batch_max_bytes: ByteSize::mib(32),
            linger_ms: 5,
            producer_queue_bytes: ByteSize::mib(2),
            max_record_bytes: ByteSize::kib(1000),
            transaction_timeout_ms: 60_000,
            event_time_max_ahead_ms: 300_000,
            event_time_max_behind_ms: 7 * 24 * 3_600_000,
            max_bytes_per_sec: ByteSize::b(0),
            create_topics: true,
            topic_partitions: 3,
            topic_replication_factor: -1,
            reconnect_backoff_max_ms: 500,
            stall_timeout_ms: 300_000,
            transaction_interval_ms: 0,
            client_properties: BTreeMap::new(),
            security: SecurityConfig::default(),
            downlink: DownlinkConfig::default(),
        }
    }
}

/// Longest time a transaction stays open while records stream into it (exactly_once): well within
/// `transaction_timeout_ms` on a slow link, and short enough for heartbeats, gaps and commands.
pub const TXN_MAX_OPEN_MS: u64 = 1000;

/// librdkafka properties the agent sets itself; overriding them could break a guarantee.
const MANAGED_PROPERTIES: &[&str] = &[
    "bootstrap.servers",
    "metadata.broker.list",
    "transactional.id",
    "enable.idempotence",
    "acks",
    "request.required.acks",
    "message.timeout.ms",
    "delivery.timeout.ms",
    "transaction.timeout.ms",
    "isolation.level",
    "enable.auto.commit",
    "enable.auto.offset.store",
    "queue.buffering.max.kbytes",
    "queue.buffering.max.messages",
    "message.max.bytes",
    "security.protocol",
    "sasl.mechanism",
    "sasl.mechanisms",
    "sasl.username",
    "sasl.password",
    "ssl.key.password",
    "ssl.ca.location",
    "ssl.certificate.location",
    "ssl.key.location",
    "ssl.endpoint.identification.algorithm",
    // Certificate verification stays on: `security.verify_hostname` is the only switch, and it
    // only names the host check.
    "enable.ssl.certificate.verification",
    "ssl.ca.certificate.stores",
    "ssl_engine_callback_data",
    "partitioner",
];

/// Errors of building Kafka clients from the config.
#[derive(Debug, thiserror::Error)]
pub enum KafkaConfigError {
    #[error(
        "cannot read the secret file {path} named by kafka.security.{field}: {reason}; fix the file or its permissions and restart the agent"
    )]
    Secret {
        field: &'static str,
        path: String,
        reason: String,
    },
    #[error("the [kafka] config is invalid:\n{0}")]
    Invalid(Problems),
}

/// Characters Kafka allows in topic names.
fn check_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 249 {
        return Err(format!("topic name {name:?} must be 1 to 249 characters"));
    }
    if name == "." || name == ".." {
        return Err(format!("{name:?} is not a legal topic name"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name {name:?} contains {c:?}; Kafka allows letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

fn check_file(path: &str, field: &str, file: &Option<PathBuf>, problems: &mut Problems) {
    if let Some(f) = file {
        match std::fs::metadata(f) {
            Ok(m) if m.is_file() => {}
            Ok(_) => problems.push(
                join(path, field),
                format!("{} is not a regular file", f.display()),
            ),
            Err(e) => problems.push(
                join(path, field),
                format!("{} cannot be read: {e}", f.display()),
            ),
        }
    }
}

impl KafkaConfig {
    /// Reports every problem of this section with its path (e.g. `kafka.security.password_file`).
    /// Checks that named files exist; reads no secret.
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if self.brokers.is_empty() {
            problems.push(
                join(path, "brokers"),
                "must list at least one broker, e.g. [\"kafka.hq.example:9093\"]",
            );
        }
        for (i, b) in self.brokers.iter().enumerate() {
            let ok = b
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
            if !ok {
                problems.push(
                    format!("{}[{i}]", join(path, "brokers")),
                    format!("{b:?} is not host:port"),
                );
            }
        }
        self.validate_template(path, problems);
        if self.transactional_id_prefix.is_empty() {
            problems.push(
                join(path, "transactional_id_prefix"),
                "must not be empty (the transactional.id is <prefix>.<store id>)",
            );
        }
        for (field, topic) in [
            ("checkpoint_topic", &self.checkpoint_topic),
            ("heartbeat_topic", &self.heartbeat_topic),
            ("gap_topic", &self.gap_topic),
        ] {
            if let Err(e) = check_topic_name(topic) {
                problems.push(join(path, field), e);
            }
        }
        if self.heartbeat_interval_ms != 0 && self.heartbeat_interval_ms < 1000 {
            problems.push(
                join(path, "heartbeat_interval_ms"),
                format!(
                    "is {}; must be 0 (off) or at least 1000",
                    self.heartbeat_interval_ms
                ),
            );
        }
        for (i, s) in self.exclude_streams.iter().enumerate() {
            if let Err(e) = check_stream_name(s) {
                problems.push(format!("{}[{i}]", join(path, "exclude_streams")), e);
            }
        }
        if let Err(e) = check_stream_name(&self.commands_stream) {
            problems.push(join(path, "commands_stream"), e);
        }
        if !(1..=1_000_000).contains(&self.batch_max_records) {
            problems.push(
                join(path, "batch_max_records"),
                format!(
                    "is {}; must be between 1 and 1000000",
                    self.batch_max_records
                ),
            );
        }
        if self.batch_max_bytes.as_u64() < ByteSize::kib(64).as_u64() {
            problems.push(join(path, "batch_max_bytes"), "must be at least 64 KiB");
        }
        if self.linger_ms > 1000 {
            problems.push(join(path, "linger_ms"), "must be at most 1000");
        }
        if self.producer_queue_bytes.as_u64() < self.max_record_bytes.as_u64() {
            problems.push(
                join(path, "producer_queue_bytes"),
                format!(
                    "is {}; must be at least max_record_bytes ({}), so that the largest record fits",
                    self.producer_queue_bytes, self.max_record_bytes
                ),
            );
        }
        if self.producer_queue_bytes.as_u64() > ByteSize::gib(1).as_u64() {
            problems.push(join(path, "producer_queue_bytes"), "must be at most 1 GiB");
        }
        let rec = self.max_record_bytes.as_u64();
        if !(1024..=100 * 1024 * 1024).contains(&rec) {
            problems.push(
                join(path, "max_record_bytes"),
                "must be between 1 KiB and 100 MiB",
            );
        }
        if !(1000..=900_000).contains(&self.transaction_timeout_ms) {
            problems.push(
                join(path, "transaction_timeout_ms"),
                format!(
                    "is {}; must be between 1000 and 900000 (the broker's default transaction.max.timeout.ms)",
                    self.transaction_timeout_ms
                ),
            );
        }
        let cap = self.max_bytes_per_sec.as_u64();
        if cap != 0 && cap < 1024 {
            problems.push(
                join(path, "max_bytes_per_sec"),
                "must be 0 (unlimited) or at least 1 KiB",
            );
        }
        if !(1..=10_000).contains(&self.topic_partitions) {
            problems.push(
                join(path, "topic_partitions"),
                "must be between 1 and 10000",
            );
        }
        if self.topic_replication_factor == 0 || self.topic_replication_factor < -1 {
            problems.push(
                join(path, "topic_replication_factor"),
                "must be -1 (broker default) or at least 1",
            );
        }
        if self.event_time_max_ahead_ms > 3_600_000 {
            problems.push(
                join(path, "event_time_max_ahead_ms"),
                "must be at most 3600000 (1 h, Kafka's default log.message.timestamp.after.max.ms): a broker refuses records further ahead",
            );
        }
        if self.stall_timeout_ms != 0
            && (self.stall_timeout_ms < 10_000
                || self.stall_timeout_ms <= self.transaction_timeout_ms)
        {
            problems.push(
                join(path, "stall_timeout_ms"),
                format!(
                    "must be 0 (off) or at least 10000 and more than transaction_timeout_ms ({}): a commit may take that long",
                    self.transaction_timeout_ms
                ),
            );
        }
        if self.transaction_interval_ms > 10_000 {
            problems.push(
                join(path, "transaction_interval_ms"),
                "must be at most 10000 (records wait up to this long for their transaction)",
            );
        }
        if !(100..=60_000).contains(&self.reconnect_backoff_max_ms) {
            problems.push(
                join(path, "reconnect_backoff_max_ms"),
                "must be between 100 and 60000",
            );
        }
        for key in self.client_properties.keys() {
            if MANAGED_PROPERTIES.contains(&key.as_str()) {
                problems.push(
                    join(&join(path, "client_properties"), &format!("{key:?}")),
                    "is set by the agent itself (the delivery guarantees depend on it); use the typed option instead",
                );
            }
        }
        self.validate_security(&join(path, "security"), problems);
        self.validate_downlink(&join(path, "downlink"), problems);
    }

    fn validate_template(&self, path: &str, problems: &mut Problems) {
        let field = join(path, "topic_template");
        if !self.topic_template.contains("{stream}") {
            problems.push(
                field.clone(),
                format!(
                    "{:?} must contain {{stream}}, e.g. \"edge.{{stream}}\" or \"{{store}}.{{stream}}\"",
                    self.topic_template
                ),
            );
            return;
        }
        let rest = self
            .topic_template
            .replace("{stream}", "")
            .replace("{store}", "");
        if rest.contains('{') || rest.contains('}') {
            problems.push(
                field.clone(),
                format!(
                    "{:?} has a placeholder other than {{stream}} and {{store}}",
                    self.topic_template
                ),
            );
            return;
        }
        if let Err(e) = check_topic_name(&topic_for(
            &self.topic_template,
            "store-1",
            "pos.transactions",
        )) {
            problems.push(field, e);
        }
    }

    fn validate_security(&self, path: &str, problems: &mut Problems) {
        let s = &self.security;
        for (field, file) in [
            ("ca_file", &s.ca_file),
            ("cert_file", &s.cert_file),
            ("key_file", &s.key_file),
            ("key_password_file", &s.key_password_file),
            ("password_file", &s.password_file),
        ] {
            check_file(path, field, file, problems);
        }
        if s.cert_file.is_some() != s.key_file.is_some() {
            problems.push(
                join(path, "cert_file"),
                "mTLS needs both cert_file and key_file",
            );
        }
        let tls_only = [
            ("ca_file", s.ca_file.is_some()),
            ("cert_file", s.cert_file.is_some()),
            ("key_file", s.key_file.is_some()),
            ("key_password_file", s.key_password_file.is_some()),
            ("verify_hostname", s.verify_hostname.is_some()),
        ];
        if !s.protocol.uses_tls() {
            for (field, set) in tls_only {
                if set {
                    problems.push(
                        join(path, field),
                        format!(
                            "is set but protocol is {:?}; use \"ssl\" or \"sasl_ssl\" for TLS",
                            s.protocol.librdkafka()
                        ),
                    );
                }
            }
        }
        if s.protocol.uses_sasl() {
            if s.sasl_mechanism.is_none() {
                problems.push(
                    join(path, "sasl_mechanism"),
                    "is required with SASL: \"PLAIN\", \"SCRAM-SHA-256\" or \"SCRAM-SHA-512\"",
                );
            }
            if s.username.as_deref().is_none_or(str::is_empty) {
                problems.push(join(path, "username"), "is required with SASL");
            }
            if s.password_file.is_none() {
                problems.push(
                    join(path, "password_file"),
                    "is required with SASL (a file holding the password)",
                );
            }
        } else {
            for (field, set) in [
                ("sasl_mechanism", s.sasl_mechanism.is_some()),
                ("username", s.username.is_some()),
                ("password_file", s.password_file.is_some()),
            ] {
                if set {
                    problems.push(
                        join(path, field),
                        format!(
                            "is set but protocol is {:?}; use \"sasl_plaintext\" or \"sasl_ssl\"",
                            s.protocol.librdkafka()
                        ),
                    );
                }
            }
        }
    }

    fn validate_downlink(&self, path: &str, problems: &mut Problems) {
        let d = &self.downlink;
        let mut seen = std::collections::BTreeSet::new();
        for (i, t) in d.topics.iter().enumerate() {
            let p = format!("{}[{i}]", join(path, "topics"));
            if let Err(e) = check_topic_name(&t.topic) {
                problems.push(join(&p, "topic"), e);
            }
            if let Err(e) = check_stream_name(&t.stream) {
                problems.push(join(&p, "stream"), e);
            }
            if !seen.insert(&t.topic) {
                problems.push(join(&p, "topic"), format!("{:?} is listed twice", t.topic));
            }
            if t.require_signature == Some(true) && d.keys.is_empty() {
                problems.push(
                    join(&p, "require_signature"),
                    "is true but no HQ public key is configured; add [[kafka.downlink.keys]] (edge-agent keygen prints one)",
                );
            }
        }
        let mut ids = std::collections::BTreeSet::new();
        for (i, k) in d.keys.iter().enumerate() {
            let p = format!("{}[{i}]", join(path, "keys"));
            match k.public_key() {
                Ok(_) => {}
                Err(KeyError::Id(e)) => problems.push(join(&p, "id"), e),
                Err(e) => problems.push(join(&p, "public_key"), e.to_string()),
            }
            if !ids.insert(&k.id) {
                problems.push(join(&p, "id"), format!("{:?} is listed twice", k.id));
            }
        }
        if !(1..=100_000).contains(&d.batch_max_records) {
            problems.push(
                join(path, "batch_max_records"),
                "must be between 1 and 100000",
            );
        }
        if !(ByteSize::kib(1).as_u64()..=ByteSize::gib(1).as_u64())
            .contains(&d.batch_max_bytes.as_u64())
        {
            problems.push(
                join(path, "batch_max_bytes"),
                "must be between 1 KiB and 1 GiB",
            );
        }
        if d.batch_max_wait_ms > 10_000 {
            problems.push(join(path, "batch_max_wait_ms"), "must be at most 10000");
        }
        if d.metadata_refresh_ms < 1000 {
            problems.push(join(path, "metadata_refresh_ms"), "must be at least 1000");
        }
    }

    /// Validates and fails with every problem (for builders that get an unchecked config).
    pub fn check(&self) -> Result<(), KafkaConfigError> {
        let mut p = Problems::new();
        self.validate("kafka", &mut p);
        if p.is_empty() {
            Ok(())
        } else {
            Err(KafkaConfigError::Invalid(p))
        }
    }

    /// The downlink's policy per HQ topic.
    pub fn downlink_policies(&self) -> Vec<(String, TopicPolicy)> {
        self.downlink
            .topics
            .iter()
            .map(|t| {
                (
                    t.topic.clone(),
                    TopicPolicy {
                        stream: t.stream.as_str().into(),
                        require_signature: t.requires_signature(&self.commands_stream),
                        commands: t.stream == self.commands_stream,
                    },
                )
            })
            .collect()
    }

    /// The verifier of HQ's signatures. Keys that do not parse are left out (`validate` reports
    /// them, and `check` refuses such a config).
    pub fn downlink_verifier(&self) -> Verifier {
        Verifier::new(
            self.downlink
                .keys
                .iter()
                .filter_map(|k| k.public_key().ok())
                .collect(),
        )
    }

    /// The cloud topic of a local stream for this store.
    pub fn topic(&self, store: &str, stream: &str) -> String {
        topic_for(&self.topic_template, store, stream)
    }

    /// When a record's event time is trusted as its Kafka timestamp.
    pub fn record_time(&self) -> super::record::RecordTime {
        let ms = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        super::record::RecordTime {
            max_ahead_ms: ms(self.event_time_max_ahead_ms),
            max_behind_ms: ms(self.event_time_max_behind_ms),
        }
    }

    /// `transactional.id` of a store's producer.
    pub fn transactional_id(&self, store: &str) -> String {
        format!("{}.{store}", self.transactional_id_prefix)
    }

    /// Properties common to every client: brokers, security (secrets read now), reconnect pacing
    /// and the operator's tuning properties.
    pub(crate) fn base_client_config(
        &self,
        client_id: &str,
    ) -> Result<ClientConfig, KafkaConfigError> {
        let mut c = ClientConfig::new();
        for (k, v) in &self.client_properties {
            c.set(k, v);
        }
        c.set("bootstrap.servers", self.brokers.join(","))
            .set("client.id", client_id)
            .set("reconnect.backoff.ms", "100")
            .set(
                "reconnect.backoff.max.ms",
                self.reconnect_backoff_max_ms.to_string(),
            )
            // Retries of requests (e.g. InitProducerId while the coordinator still aborts the
            // previous transaction) stay fast, so a restart resumes quickly.
            .set("retry.backoff.ms", "50")
            .set("retry.backoff.max.ms", "250")
            .set("socket.keepalive.enable", "true")
            .set("message.max.bytes", self.message_max_bytes().to_string());
        let s = &self.security;
        c.set("security.protocol", s.protocol.librdkafka());
        if s.protocol.uses_tls() {
            if let Some(ca) = &s.ca_file {
                c.set("ssl.ca.location", path_str(ca));
            }
            if let (Some(cert), Some(key)) = (&s.cert_file, &s.key_file) {
                c.set("ssl.certificate.location", path_str(cert));
                c.set("ssl.key.location", path_str(key));
            }
            if let Some(f) = &s.key_password_file {
                c.set("ssl.key.password", read_secret("key_password_file", f)?);
            }
            c.set(
                "ssl.endpoint.identification.algorithm",
                if s.verify_hostname.unwrap_or(true) {
                    "https"
                } else {
                    "none"
                },
            );
        }
        if s.protocol.uses_sasl() {
            if let Some(m) = s.sasl_mechanism {
                c.set("sasl.mechanism", m.librdkafka());
            }
            if let Some(u) = &s.username {
                c.set("sasl.username", u);
            }
            if let Some(f) = &s.password_file {
                c.set("sasl.password", read_secret("password_file", f)?);
            }
        }
        Ok(c)
    }

    /// librdkafka's client-side message size limit: the record bound plus room for the batch
    /// framing.
    pub(crate) fn message_max_bytes(&self) -> u64 {
        self.max_record_bytes.as_u64() + 64 * 1024
    }

    /// librdkafka's `queue.buffering.max.messages`. `producer_queue_bytes` bounds only the payload
    /// bytes librdkafka holds, but each message also costs ~1 KiB of its own (the message, the
    /// copied key and headers); this bounds that part too: one message per 256 bytes of the queue
    /// (16,384 for 4 MiB).
    pub fn producer_queue_messages(&self) -> u64 {
        (self.producer_queue_bytes.as_u64() / 256).clamp(1000, 1_000_000)
    }

    pub(crate) fn compression_codec(&self) -> &'static str {
        self.compression.librdkafka()
    }

    /// A short description for status and logs (no secrets).
    pub fn describe(&self) -> String {
        format!(
            "{} ({}, {})",
            self.brokers.join(","),
            self.security.protocol.librdkafka(),
            self.mode.as_str()
        )
    }
}

fn path_str(p: &Path) -> String {
    p.display().to_string()
}

fn read_secret(field: &'static str, path: &Path) -> Result<String, KafkaConfigError> {
    let s = edge_core::tls::read_secret_file(path).map_err(|reason| KafkaConfigError::Secret {
        field,
        path: path.display().to_string(),
        reason,
    })?;
    if s.is_empty() {
        return Err(KafkaConfigError::Secret {
            field,
            path: path.display().to_string(),
            reason: "the file is empty".into(),
        });
    }
    Ok(s)
}

/// Applies a topic template.
pub fn topic_for(template: &str, store: &str, stream: &str) -> String {
    template
        .replace("{store}", store)
        .replace("{stream}", stream)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<KafkaConfig, toml::de::Error> {
        toml::from_str(s)
    }

    fn problems(c: &KafkaConfig) -> Vec<String> {
        let mut p = Problems::new();
        c.validate("kafka", &mut p);
        p.iter().map(|p| p.to_string()).collect()
    }

    #[test]
    fn one_line_config_is_valid() {
        let c = parse(r#"brokers = ["127.0.0.1:9092"]"#).unwrap();
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        assert_eq!(c.mode, DeliveryMode::ExactlyOnce);
        assert_eq!(c.topic("s1", "pos.transactions"), "edge.pos.transactions");
        assert_eq!(c.transactional_id("s1"), "edge-agent.s1");
        assert_eq!(c.downlink.topics.len(), 4);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let e = parse("brokers = [\"a:1\"]\nbrokerz = 1").unwrap_err();
        assert!(e.to_string().contains("brokerz"), "{e}");
        let e = parse("[security]\npasword_file = \"/x\"").unwrap_err();
        assert!(e.to_string().contains("pasword_file"), "{e}");
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let c = parse(
            r#"
            brokers = ["nohost", "h:0"]
            topic_template = "edge.{device}"
            heartbeat_interval_ms = 10
            batch_max_records = 0
            transaction_timeout_ms = 5
            client_properties = { "enable.idempotence" = "false", "linger.ms" = "3" }
            [security]
            protocol = "sasl_ssl"
            cert_file = "/nonexistent/cert.pem"
            [downlink]
            topics = [{ topic = "hq prices", stream = "HQ" }]
            "#,
        )
        .unwrap();
        let p = problems(&c);
        let expect = [
            "kafka.brokers[0]:",
            "kafka.brokers[1]:",
            "kafka.topic_template:",
            "kafka.heartbeat_interval_ms:",
            "kafka.batch_max_records:",
            "kafka.transaction_timeout_ms:",
            "kafka.client_properties.\"enable.idempotence\":",
            "kafka.security.cert_file: /nonexistent/cert.pem cannot be read",
            "kafka.security.cert_file: mTLS needs both",
            "kafka.security.sasl_mechanism:",
            "kafka.security.username:",
            "kafka.security.password_file:",
            "kafka.downlink.topics[0].topic:",
            "kafka.downlink.topics[0].stream:",
        ];
        for e in expect {
            assert!(p.iter().any(|l| l.starts_with(e)), "missing {e} in {p:#?}");
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
    }

    const HQ_KEY: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

    #[test]
    fn commands_require_signatures_by_default_and_prices_do_not() {
        let c = parse(r#"brokers = ["127.0.0.1:9092"]"#).unwrap();
        // No keys and the default policy is a valid config: commands are refused, prices apply.
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        let p: BTreeMap<String, bool> = c
            .downlink_policies()
            .into_iter()
            .map(|(t, p)| (t, p.require_signature))
            .collect();
        assert!(p["hq.commands"]);
        assert!(!p["hq.prices"] && !p["hq.campaigns"] && !p["hq.models"]);
        assert!(c.downlink_verifier().is_empty());
        let c = parse(&format!(
            r#"
            brokers = ["127.0.0.1:9092"]
            [downlink]
            topics = [
                {{ topic = "hq.prices", stream = "hq.prices", require_signature = true }},
                {{ topic = "hq.commands", stream = "hq.commands", require_signature = false }},
            ]
            [[downlink.keys]]
            id = "hq-2026-05"
            public_key = "{HQ_KEY}"
            not_after = "2026-12-31T00:00:00Z"
            [[downlink.keys]]
            id = "hq-2026-11"
            public_key = "MCowBQYDK2VwAyEA11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
            "#
        ))
        .unwrap();
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        let p = c.downlink_policies();
        assert!(p[0].1.require_signature && !p[0].1.commands);
        assert!(!p[1].1.require_signature && p[1].1.commands);
        let v = c.downlink_verifier();
        assert_eq!(v.keys().len(), 2);
        assert_eq!(v.keys()[0].to_base64(), v.keys()[1].to_base64());
    }

    #[test]
    fn bad_keys_and_signatures_without_keys_are_reported_with_their_paths() {
        let c = parse(&format!(
            r#"
            brokers = ["127.0.0.1:9092"]
            [downlink]
            topics = [{{ topic = "hq.prices", stream = "hq.prices", require_signature = true }}]
            [[downlink.keys]]
            id = "hq 1"
            public_key = "{HQ_KEY}"
            [[downlink.keys]]
            id = "hq-2"
            public_key = "c2hvcnQ="
            [[downlink.keys]]
            id = "hq-2"
            public_key = "{HQ_KEY}"
            "#
        ))
        .unwrap();
        let p = problems(&c);
        let expect = [
            "kafka.downlink.keys[0].id:",
            "kafka.downlink.keys[1].public_key: is not an ed25519 public key",
            "kafka.downlink.keys[2].id: \"hq-2\" is listed twice",
        ];
        for e in expect {
            assert!(p.iter().any(|l| l.starts_with(e)), "missing {e} in {p:#?}");
        }
        assert_eq!(p.len(), expect.len(), "{p:#?}");
        let c = parse(
            r#"
            brokers = ["127.0.0.1:9092"]
            [downlink]
            topics = [{ topic = "hq.prices", stream = "hq.prices", require_signature = true }]
            "#,
        )
        .unwrap();
        let p = problems(&c);
        assert_eq!(p.len(), 1, "{p:#?}");
        assert!(
            p[0].starts_with(
                "kafka.downlink.topics[0].require_signature: is true but no HQ public key"
            ),
            "{p:#?}"
        );
        let e = parse("brokers = [\"a:1\"]\n[[downlink.keys]]\nid = \"k\"\npublic_key = \"x\"\nnot_after = \"soon\"")
            .unwrap_err();
        assert!(e.to_string().contains("not_after"), "{e}");
    }

    #[test]
    fn mm2_template_and_bad_characters() {
        let mut c = KafkaConfig {
            brokers: vec!["k:9092".into()],
            topic_template: "{store}.{stream}".into(),
            ..Default::default()
        };
        assert!(problems(&c).is_empty());
        assert_eq!(c.topic("s-9", "pos.scans"), "s-9.pos.scans");
        c.topic_template = "edge/{stream}".into();
        assert_eq!(problems(&c).len(), 1);
    }

    #[test]
    fn secrets_come_from_files_and_never_from_the_config() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "s3cret\n").unwrap();
        let c = KafkaConfig {
            brokers: vec!["k:9093".into()],
            security: SecurityConfig {
                protocol: SecurityProtocol::SaslSsl,
                sasl_mechanism: Some(SaslMechanism::ScramSha512),
                username: Some("edge".into()),
                password_file: Some(pw.clone()),
                ..Default::default()
            },
            ..Default::default()
        };
        assert!(problems(&c).is_empty(), "{:?}", problems(&c));
        let cc = c.base_client_config("t").unwrap();
        assert_eq!(cc.get("sasl.password"), Some("s3cret"));
        assert_eq!(cc.get("sasl.mechanism"), Some("SCRAM-SHA-512"));
        assert!(!c.describe().contains("s3cret"));
        std::fs::write(&pw, "").unwrap();
        let e = c.base_client_config("t").unwrap_err().to_string();
        assert!(
            e.contains("kafka.security.password_file") && e.contains("empty"),
            "{e}"
        );
        std::fs::remove_file(&pw).unwrap();
        let e = c.base_client_config("t").unwrap_err().to_string();
        assert!(!e.contains("s3cret") && e.contains("cannot read"), "{e}");
    }
}
