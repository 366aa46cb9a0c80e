//! The envelope that flows from sources through the local log to every consumer.

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// An extra key/value pair carried with an event (mirrored as a Kafka header).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub key: String,
    pub value: String,
}

/// What a source hands to the local log. The log assigns `seq` and `ingest_ts_ms`.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Local stream name, e.g. `pos.transactions`.
    pub stream: Arc<str>,
    /// Event time at the store (ms since the Unix epoch). Becomes the Kafka record timestamp.
    pub event_ts_ms: i64,
    /// Partition/ordering key below the store (usually the device), if any.
    pub key: Option<String>,
    /// The device or component that produced the event (`edge.src`).
    pub source: Option<String>,
    /// Source-supplied identity; the log stores an event with a given id once per stream.
    pub event_id: Option<String>,
    /// Payload schema, e.g. `pos.transaction/1` (`edge.schema`).
    pub schema: Option<String>,
    pub headers: Vec<Header>,
    pub payload: Bytes,
}

impl Event {
    /// A bare event with the current time as event time.
    pub fn new(stream: impl Into<Arc<str>>, payload: impl Into<Bytes>) -> Event {
        Event {
            stream: stream.into(),
            event_ts_ms: crate::time::now_ms(),
            key: None,
            source: None,
            event_id: None,
            schema: None,
            headers: Vec::new(),
            payload: payload.into(),
        }
    }

    pub fn with_event_ts(mut self, ts_ms: i64) -> Self {
        self.event_ts_ms = ts_ms;
        self
    }
    pub fn with_key(mut self, key: impl Into<String>) -> Self {
        self.key = Some(key.into());
        self
    }
    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }
    pub fn with_event_id(mut self, id: impl Into<String>) -> Self {
        self.event_id = Some(id.into());
        self
    }
    pub fn with_schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = Some(schema.into());
        self
    }
    pub fn with_header(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.push(Header {
            key: key.into(),
            value: value.into(),
        });
        self
    }

    /// Approximate stored size, used for batching limits.
    pub fn approx_size(&self) -> usize {
        64 + self.stream.len()
            + self.payload.len()
            + self.key.as_ref().map_or(0, String::len)
            + self.source.as_ref().map_or(0, String::len)
            + self.event_id.as_ref().map_or(0, String::len)
            + self.schema.as_ref().map_or(0, String::len)
            + self
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.len() + 8)
                .sum::<usize>()
    }
}

/// A committed record: an event with its identity in the local log. The global identity at HQ is
/// `(store, stream, epoch, seq)`; store and epoch are properties of the log, not of each record.
#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub seq: u64,
    pub ingest_ts_ms: i64,
    pub event: Event,
}

impl Record {
    pub fn stream(&self) -> &str {
        &self.event.stream
    }

    /// The record as one JSON object (the `log export --format jsonl` line). A payload that is valid
    /// UTF-8 JSON is embedded as JSON; anything else is base64 under `payload_b64`.
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::{Map, Value, json};
        let mut m = Map::new();
        m.insert("stream".into(), json!(&*self.event.stream));
        m.insert("seq".into(), json!(self.seq));
        m.insert("event_ts".into(), json!(self.event.event_ts_ms));
        m.insert("ingest_ts".into(), json!(self.ingest_ts_ms));
        for (k, v) in [
            ("key", &self.event.key),
            ("source", &self.event.source),
            ("event_id", &self.event.event_id),
            ("schema", &self.event.schema),
        ] {
            if let Some(v) = v {
                m.insert(k.into(), json!(v));
            }
        }
        if !self.event.headers.is_empty() {
            let h: Map<String, Value> = self
                .event
                .headers
                .iter()
                .map(|h| (h.key.clone(), json!(h.value)))
                .collect();
            m.insert("headers".into(), Value::Object(h));
        }
        match serde_json::from_slice::<Value>(&self.event.payload) {
            Ok(v) => {
                m.insert("payload".into(), v);
            }
            Err(_) => {
                m.insert(
                    "payload_b64".into(),
                    json!(base64_encode(&self.event.payload)),
                );
            }
        }
        Value::Object(m)
    }
}

/// Standard base64 with padding. Small and dependency-free because `core` stays light; the hot paths
/// never call it (only export and dead letters).
pub fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        out.push(T[(n >> 18) as usize & 63] as char);
        out.push(T[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(i.as_bytes()), o);
        }
    }

    #[test]
    fn json_export_embeds_json_and_encodes_binary() {
        let r = Record {
            seq: 7,
            ingest_ts_ms: 2,
            event: Event::new("pos.transactions", &br#"{"total":12.5}"#[..])
                .with_event_ts(1)
                .with_event_id("e-1"),
        };
        let v = r.to_json();
        assert_eq!(v["payload"]["total"], 12.5);
        assert_eq!(v["event_id"], "e-1");
        assert_eq!(v["seq"], 7);
        let r2 = Record {
            event: Event::new("x", &b"\xff\x00"[..]),
            ..r
        };
        assert_eq!(r2.to_json()["payload_b64"], "/wA=");
    }
}
