//! Dead-letter records: what could not be accepted or read back, with the reason and the original
//! bytes (truncated), in the `deadletter` stream. Schema `deadletter/1`, documented in
//! `docs/schemas/deadletter.md`.

use crate::Event;
use crate::event::base64_encode;
use crate::log::DEADLETTER_STREAM;
use serde_json::{Map, Value, json};

/// Original bytes kept in a dead letter by default.
pub const DEFAULT_KEEP_BYTES: usize = 64 * 1024;

/// Builder for one dead letter.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    origin: &'static str,
    reason: String,
    fields: Map<String, Value>,
    original: Vec<u8>,
    keep_bytes: usize,
}

impl DeadLetter {
    /// `origin` names the component (`mqtt`, `log`, `serial`, ...); `reason` is a sentence.
    pub fn new(origin: &'static str, reason: impl Into<String>) -> Self {
        DeadLetter {
            origin,
            reason: reason.into(),
            fields: Map::new(),
            original: Vec::new(),
            keep_bytes: DEFAULT_KEEP_BYTES,
        }
    }

    pub fn field(mut self, key: &str, value: impl Into<Value>) -> Self {
        self.fields.insert(key.to_string(), value.into());
        self
    }

    pub fn original(mut self, bytes: &[u8], keep_bytes: usize) -> Self {
        self.original = bytes.to_vec();
        self.keep_bytes = keep_bytes;
        self
    }

    pub fn into_event(self) -> Event {
        let kept = &self.original[..self.original.len().min(self.keep_bytes)];
        let mut m = self.fields;
        m.insert("schema".into(), json!("deadletter/1"));
        m.insert("origin".into(), json!(self.origin));
        m.insert("reason".into(), json!(self.reason));
        m.insert("original_bytes".into(), json!(self.original.len()));
        m.insert("truncated".into(), json!(kept.len() < self.original.len()));
        m.insert("original_b64".into(), json!(base64_encode(kept)));
        let payload = serde_json::to_vec(&Value::Object(m)).unwrap_or_default();
        Event::new(DEADLETTER_STREAM, payload)
            .with_schema("deadletter/1")
            .with_source(self.origin)
            .with_header("edge.reason", truncate_reason(&self.reason))
    }
}

fn truncate_reason(r: &str) -> String {
    let mut s: String = r.chars().take(200).collect();
    if s.len() < r.len() {
        s.push('…');
    }
    s
}

/// A record the log could not read back (CRC mismatch, damaged column).
pub fn from_log(stream: &str, seq: u64, reason: &str, payload: &[u8]) -> Event {
    DeadLetter::new(
        "log",
        format!("stored record failed verification: {reason}"),
    )
    .field("stream", stream)
    .field("seq", seq)
    .original(payload, DEFAULT_KEEP_BYTES)
    .into_event()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dead_letter_keeps_reason_and_truncates() {
        let ev = DeadLetter::new("mqtt", "payload is not JSON")
            .field("topic", "store/1/pos/a/transactions")
            .original(&[b'x'; 100], 10)
            .into_event();
        assert_eq!(&*ev.stream, "deadletter");
        let v: Value = serde_json::from_slice(&ev.payload).unwrap();
        assert_eq!(v["reason"], "payload is not JSON");
        assert_eq!(v["topic"], "store/1/pos/a/transactions");
        assert_eq!(v["original_bytes"], 100);
        assert_eq!(v["truncated"], true);
        assert_eq!(v["original_b64"], base64_encode(&[b'x'; 10]));
        assert_eq!(ev.schema.as_deref(), Some("deadletter/1"));
    }
}
