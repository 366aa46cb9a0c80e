//! How a local record becomes a Kafka message (the topic contract in `docs/KAFKA.md`).
//!
//! * topic: the config's template (`edge.{stream}` by default);
//! * key: the store id, or `store/device` in `store_device` mode;
//! * timestamp: the event time at the store;
//! * headers: `edge.store`, `edge.stream`, `edge.epoch`, `edge.seq`, `edge.ingest_ts`, then
//!   `edge.src`, `edge.event_id`, `edge.schema` when the event has them, then the event's own
//!   headers. All values are UTF-8 text (numbers in decimal).

use super::config::KeyMode;
use edge_core::Record;
use rdkafka::message::{Header, OwnedHeaders};

pub const H_STORE: &str = "edge.store";
pub const H_STREAM: &str = "edge.stream";
pub const H_EPOCH: &str = "edge.epoch";
pub const H_SEQ: &str = "edge.seq";
pub const H_INGEST_TS: &str = "edge.ingest_ts";
pub const H_SRC: &str = "edge.src";
pub const H_EVENT_ID: &str = "edge.event_id";
pub const H_SCHEMA: &str = "edge.schema";
/// Set (`"1"`) on records sent again because HQ asked for a re-mirror.
pub const H_REPLAY: &str = "edge.replay";

/// The message key of a record.
pub fn key_for(mode: KeyMode, store: &str, rec: &Record) -> String {
    match mode {
        KeyMode::Store => store.to_string(),
        KeyMode::StoreDevice => match rec.event.key.as_deref().or(rec.event.source.as_deref()) {
            Some(dev) if !dev.is_empty() => format!("{store}/{dev}"),
            _ => store.to_string(),
        },
    }
}

/// The record timestamp: event time, or ingest time when the event time is unusable (a device
/// clock before 1970).
pub fn timestamp_for(rec: &Record) -> i64 {
    if rec.event.event_ts_ms > 0 {
        rec.event.event_ts_ms
    } else {
        rec.ingest_ts_ms.max(0)
    }
}

/// The identity and provenance headers of a record.
pub fn headers_for(store: &str, epoch: &str, rec: &Record, replay: bool) -> OwnedHeaders {
    let e = &rec.event;
    let seq = rec.seq.to_string();
    let ingest = rec.ingest_ts_ms.to_string();
    let mut h = OwnedHeaders::new_with_capacity(9 + e.headers.len())
        .insert(text(H_STORE, store))
        .insert(text(H_STREAM, &e.stream))
        .insert(text(H_EPOCH, epoch))
        .insert(text(H_SEQ, &seq))
        .insert(text(H_INGEST_TS, &ingest));
    for (k, v) in [
        (H_SRC, &e.source),
        (H_EVENT_ID, &e.event_id),
        (H_SCHEMA, &e.schema),
    ] {
        if let Some(v) = v {
            h = h.insert(text(k, v));
        }
    }
    if replay {
        h = h.insert(text(H_REPLAY, "1"));
    }
    for x in &e.headers {
        // The identity headers cannot be overridden by a source.
        if !x.key.starts_with("edge.") {
            h = h.insert(text(&x.key, &x.value));
        }
    }
    h
}

fn text<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

/// Approximate bytes a record occupies on the wire (payload, key, headers, framing).
pub fn wire_size(rec: &Record) -> usize {
    rec.event.approx_size() + 160
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_core::Event;
    use rdkafka::message::Headers;

    fn rec() -> Record {
        Record {
            seq: 42,
            ingest_ts_ms: 1_700_000_000_123,
            event: Event::new("pos.transactions", &b"{}"[..])
                .with_event_ts(1_700_000_000_000)
                .with_key("lane-3")
                .with_source("pos-3")
                .with_schema("pos.transaction/1")
                .with_header("edge.seq", "999")
                .with_header("lane", "3"),
        }
    }

    #[test]
    fn headers_carry_the_identity_and_provenance() {
        let h = headers_for("s1", "e-1", &rec(), false);
        let pairs: Vec<(String, String)> = (0..h.count())
            .map(|i| {
                let x = h.get(i);
                (
                    x.key.to_string(),
                    String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                )
            })
            .collect();
        let want = [
            ("edge.store", "s1"),
            ("edge.stream", "pos.transactions"),
            ("edge.epoch", "e-1"),
            ("edge.seq", "42"),
            ("edge.ingest_ts", "1700000000123"),
            ("edge.src", "pos-3"),
            ("edge.schema", "pos.transaction/1"),
            ("lane", "3"),
        ];
        let want: Vec<(String, String)> = want
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        assert_eq!(pairs, want, "a source cannot forge edge.seq");
    }

    #[test]
    fn keys_and_timestamps() {
        let r = rec();
        assert_eq!(key_for(KeyMode::Store, "s1", &r), "s1");
        assert_eq!(key_for(KeyMode::StoreDevice, "s1", &r), "s1/lane-3");
        assert_eq!(timestamp_for(&r), 1_700_000_000_000);
        let mut r2 = r.clone();
        r2.event.event_ts_ms = 0;
        assert_eq!(timestamp_for(&r2), 1_700_000_000_123);
    }
}
