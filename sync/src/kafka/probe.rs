//! A one-shot check of the HQ link for `edge-agent doctor`: connect with the configured brokers
//! and security (secrets read from their files now), authenticate, and fetch the cluster
//! metadata. It never touches the transactional id, so it cannot fence a running agent.

use super::client::{LinkContext, LinkTrouble, classify};
use super::config::{KafkaConfig, KafkaConfigError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use std::time::{Duration, Instant};

/// What the brokers answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeReport {
    /// Brokers in the cluster's metadata.
    pub brokers: usize,
    /// Whether the checkpoint topic exists yet (the uplink creates it on first start when it may).
    pub checkpoint_topic: bool,
}

/// Why the probe failed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The configuration cannot be turned into a client (e.g. an unreadable secret file).
    #[error(transparent)]
    Config(#[from] KafkaConfigError),
    /// librdkafka refused the settings.
    #[error("the Kafka client refused the settings: {0}")]
    Client(String),
    /// The brokers did not answer a metadata request; `trouble` says what kind of failure.
    #[error("{message}")]
    Link {
        trouble: LinkTrouble,
        message: String,
    },
}

/// Connects, authenticates and fetches metadata within `timeout` (blocking).
pub fn probe(cfg: &KafkaConfig, timeout: Duration) -> Result<ProbeReport, ProbeError> {
    let mut c = cfg.base_client_config("edge-agent-doctor")?;
    // One attempt's worth of waiting per broker, not librdkafka's minutes-long defaults.
    c.set(
        "socket.timeout.ms",
        timeout.as_millis().max(1000).to_string(),
    );
    let client: BaseConsumer<LinkContext> = c
        .create_with_context(LinkContext::new("doctor"))
        .map_err(|e| ProbeError::Client(e.to_string()))?;
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let err = match client.fetch_metadata(None, left.max(Duration::from_millis(100))) {
            Ok(md) => {
                return Ok(ProbeReport {
                    brokers: md.brokers().len(),
                    checkpoint_topic: md
                        .topics()
                        .iter()
                        .any(|t| t.name() == cfg.checkpoint_topic && t.error().is_none()),
                });
            }
            Err(e) => e,
        };
        // librdkafka's own reason (SASL, TLS) arrives as an error event, served by polling; the
        // request error itself is only "transport failure" or a timeout.
        let _ = client.poll(Duration::from_millis(200));
        let seen = client.context().recent_error(timeout * 2);
        let done = Instant::now() >= deadline;
        match seen {
            Some(le) if le.trouble != LinkTrouble::Unreachable || done => {
                return Err(ProbeError::Link {
                    trouble: le.trouble,
                    message: le.message,
                });
            }
            _ if done => {
                return Err(ProbeError::Link {
                    trouble: classify(err.rdkafka_error_code(), &err.to_string()),
                    message: err.to_string(),
                });
            }
            // A transport failure can be the first connection still settling: ask again.
            _ => {}
        }
    }
}
