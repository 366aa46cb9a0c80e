//! The librdkafka client context shared by the uplink's and downlink's clients.
//!
//! librdkafka reports connection trouble through log lines and error callbacks, many times a second
//! while a broker is unreachable or refuses the credentials. The context turns that into
//! *state*: the last error, classified (auth, TLS, unreachable, other), which the component shows
//! in `status`; and it logs a given kind of message once per [`LOG_REPEAT`] with a count of the
//! repeats, so an outage or a wrong password is one log line, not a loop.

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The same kind of librdkafka message is logged at most once in this interval.
const LOG_REPEAT: Duration = Duration::from_secs(300);

/// What kind of trouble the link has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkTrouble {
    /// The broker refused the credentials (SASL) or the client certificate.
    Auth,
    /// TLS handshake or certificate verification failed.
    Tls,
    /// No broker reachable / connection refused / timed out.
    Unreachable,
    /// Not authorised for a topic, the cluster or the transactional id.
    Authorization,
    Other,
}

impl LinkTrouble {
    pub fn as_str(self) -> &'static str {
        match self {
            LinkTrouble::Auth => "auth_failed",
            LinkTrouble::Tls => "tls_failed",
            LinkTrouble::Unreachable => "unreachable",
            LinkTrouble::Authorization => "not_authorized",
            LinkTrouble::Other => "error",
        }
    }

    /// What the operator should do about it.
    pub fn advice(self) -> &'static str {
        match self {
            LinkTrouble::Auth => {
                "check kafka.security.username, password_file and sasl_mechanism (or the client certificate)"
            }
            LinkTrouble::Tls => {
                "check kafka.security.ca_file, the broker certificate and kafka.security.verify_hostname"
            }
            LinkTrouble::Unreachable => "check the network link and kafka.brokers",
            LinkTrouble::Authorization => {
                "grant this store's principal write access to the edge topics and its transactional id"
            }
            LinkTrouble::Other => "see the agent log",
        }
    }
}

/// A classified client error.
#[derive(Debug, Clone)]
pub struct LinkError {
    pub trouble: LinkTrouble,
    pub message: String,
    pub at: Instant,
}

pub(crate) fn classify(code: Option<RDKafkaErrorCode>, message: &str) -> LinkTrouble {
    use RDKafkaErrorCode as C;
    // librdkafka prefixes the broker ("sasl_ssl://host:port/bootstrap: ..."): its scheme says
    // nothing about what failed, and "sasl" in it made a certificate failure read as an
    // authentication one.
    let body = match message.split_once(": ") {
        Some((broker, rest)) if broker.contains("://") => rest,
        _ => message,
    };
    let m = body.to_ascii_lowercase();
    match code {
        Some(C::Authentication | C::SaslAuthenticationFailed) => LinkTrouble::Auth,
        Some(
            C::TopicAuthorizationFailed
            | C::ClusterAuthorizationFailed
            | C::TransactionalIdAuthorizationFailed
            | C::GroupAuthorizationFailed,
        ) => LinkTrouble::Authorization,
        Some(C::SSL) => LinkTrouble::Tls,
        _ if m.contains("authentication") || m.contains("sasl") => LinkTrouble::Auth,
        _ if m.contains("ssl") || m.contains("certificate") || m.contains("handshake") => {
            LinkTrouble::Tls
        }
        Some(C::AllBrokersDown | C::BrokerTransportFailure | C::Resolve | C::MessageTimedOut) => {
            LinkTrouble::Unreachable
        }
        _ if m.contains("connection refused")
            || m.contains("brokers are down")
            || m.contains("timed out")
            || m.contains("disconnected") =>
        {
            LinkTrouble::Unreachable
        }
        _ => LinkTrouble::Other,
    }
}

#[derive(Default)]
struct LogGate {
    /// message kind -> (last logged, repeats since)
    seen: HashMap<String, (Instant, u64)>,
}

/// Client context: error state for `status`, deduplicated logging.
pub struct LinkContext {
    component: &'static str,
    last_error: Mutex<Option<LinkError>>,
    gate: Mutex<LogGate>,
}

impl LinkContext {
    pub fn new(component: &'static str) -> LinkContext {
        LinkContext {
            component,
            last_error: Mutex::new(None),
            gate: Mutex::new(LogGate::default()),
        }
    }

    /// The most recent error reported by librdkafka, if it is younger than `max_age`.
    pub fn recent_error(&self, max_age: Duration) -> Option<LinkError> {
        self.last_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .filter(|e| e.at.elapsed() <= max_age)
            .cloned()
    }

    /// Forgets the last error (after the link proved healthy).
    pub fn clear_error(&self) {
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub(crate) fn record_error(&self, code: Option<RDKafkaErrorCode>, message: &str) {
        let trouble = classify(code, message);
        metrics::counter!("edge_kafka_client_errors_total", "component" => self.component, "kind" => trouble.as_str())
            .increment(1);
        *self.last_error.lock().unwrap_or_else(|e| e.into_inner()) = Some(LinkError {
            trouble,
            message: message.to_string(),
            at: Instant::now(),
        });
    }

    /// Logs a warning of the component, at most once per kind per [`LOG_REPEAT`].
    pub fn warn_once(&self, message: &str) {
        if let Some(repeats) = self.gate(message) {
            tracing::warn!(
                component = self.component,
                repeats_suppressed = repeats,
                "{message}"
            );
        }
    }

    /// Whether a message of this kind should be logged now; returns the repeats suppressed since
    /// the last time it was logged.
    fn gate(&self, message: &str) -> Option<u64> {
        // librdkafka appends "(after 3ms in state CONNECT, 2 identical error(s) suppressed)";
        // digits vary between repeats (ports, timings, counters). The rest is the kind.
        let kind: String = message
            .split(" (after ")
            .next()
            .unwrap_or(message)
            .chars()
            .filter(|c| !c.is_ascii_digit())
            .take(120)
            .collect();
        let mut g = self.gate.lock().unwrap_or_else(|e| e.into_inner());
        if g.seen.len() > 1000 {
            g.seen.clear();
        }
        let now = Instant::now();
        match g.seen.get_mut(&kind) {
            Some((last, repeats)) if now.duration_since(*last) < LOG_REPEAT => {
                *repeats += 1;
                None
            }
            Some((last, repeats)) => {
                let r = *repeats;
                *last = now;
                *repeats = 0;
                Some(r)
            }
            None => {
                g.seen.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

impl ClientContext for LinkContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let component = self.component;
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error
            | RDKafkaLogLevel::Warning => {
                if let Some(repeats) = self.gate(message) {
                    tracing::warn!(
                        component,
                        facility = fac,
                        repeats_suppressed = repeats,
                        "librdkafka: {message}"
                    );
                }
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::debug!(component, facility = fac, "librdkafka: {message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::trace!(component, facility = fac, "librdkafka: {message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // End of a partition is progress, not trouble (the checkpoint reader asks for it).
        if matches!(error, KafkaError::PartitionEOF(_))
            || error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF)
        {
            return;
        }
        self.record_error(error.rdkafka_error_code(), reason);
        if let Some(repeats) = self.gate(reason) {
            tracing::warn!(
                component = self.component,
                repeats_suppressed = repeats,
                "Kafka client error: {reason}"
            );
        }
    }
}

/// For group-less consumers that only ask for metadata (`probe`).
impl rdkafka::consumer::ConsumerContext for LinkContext {}

/// The reconnect backoff of the uplink and downlink: the core one, with its default +-25 % jitter.
pub use edge_core::backoff::Backoff;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_classified_for_operators() {
        assert_eq!(
            classify(
                Some(RDKafkaErrorCode::Authentication),
                "SASL authentication error: Authentication failed"
            ),
            LinkTrouble::Auth
        );
        assert_eq!(
            classify(
                Some(RDKafkaErrorCode::AllBrokersDown),
                "1/1 brokers are down"
            ),
            LinkTrouble::Unreachable
        );
        assert_eq!(
            classify(
                Some(RDKafkaErrorCode::BrokerTransportFailure),
                "SSL handshake failed: certificate verify failed"
            ),
            LinkTrouble::Tls
        );
        assert_eq!(
            classify(
                Some(RDKafkaErrorCode::BrokerTransportFailure),
                "Connect to ipv4#127.0.0.1:1 failed: Connection refused"
            ),
            LinkTrouble::Unreachable
        );
        // As librdkafka words them, broker first (seen in CI: a wrong CA classified as auth).
        assert_eq!(
            classify(
                Some(RDKafkaErrorCode::BrokerTransportFailure),
                "sasl_ssl://127.0.0.1:52724/bootstrap: error:0A000086:SSL routines::certificate verify failed (after 9ms in state SSL_HANDSHAKE)"
            ),
            LinkTrouble::Tls
        );
        assert_eq!(
            classify(
                None,
                "sasl_ssl://127.0.0.1:52724/bootstrap: SASL authentication error: Authentication failed during authentication due to invalid credentials with SASL mechanism SCRAM-SHA-512"
            ),
            LinkTrouble::Auth
        );
    }

    #[test]
    fn repeated_messages_are_logged_once() {
        let c = LinkContext::new("test");
        assert_eq!(
            c.gate("127.0.0.1:9092/bootstrap: Connect failed (after 3ms)"),
            Some(0)
        );
        assert_eq!(
            c.gate("127.0.0.1:9092/bootstrap: Connect failed (after 17ms)"),
            None
        );
        assert_eq!(c.gate("another kind of message"), Some(0));
    }
}
