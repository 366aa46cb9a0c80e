//! How a local record becomes a Kafka message (the topic contract in `docs/KAFKA.md`).
//!
//! * topic: the config's template (`edge.{stream}` by default);
//! * key: the store id, or `store/device` in `store_device` mode;
//! * timestamp: the event time at the store, unless it is implausibly far from the ingest time (a
//!   device with a wrong clock): then the ingest time, and the device's time in `edge.event_ts`
//!   ([`RecordTime`]);
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
/// The device's own event time, set when the record timestamp is the ingest time instead because
/// the device's clock was implausible ([`RecordTime`]).
pub const H_EVENT_TS: &str = "edge.event_ts";
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

/// How far a record's event time may be from its ingest time before the uplink stops trusting it.
///
/// Kafka refuses a record whose timestamp is more than `log.message.timestamp.after.max.ms` (1 h
/// by default in Kafka 4) in the future, and deletes segments whose newest timestamp is older than
/// the topic's `retention.ms` as soon as they roll: a POS lane whose clock runs hours ahead would
/// be refused by the broker, and one whose clock reset to 2020 would be deleted at HQ on arrival.
/// Outside the window the record's Kafka timestamp is the ingest time (the agent's clock) and the
/// device's time travels in the `edge.event_ts` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordTime {
    /// Largest event time ahead of the ingest time that is kept.
    pub max_ahead_ms: i64,
    /// Largest event time behind the ingest time that is kept; 0 = no limit.
    pub max_behind_ms: i64,
}

impl Default for RecordTime {
    fn default() -> Self {
        RecordTime {
            max_ahead_ms: 300_000,
            max_behind_ms: 7 * 24 * 3_600_000,
        }
    }
}

impl RecordTime {
    /// The record's Kafka timestamp, and whether it is the ingest time in place of an implausible
    /// event time (then the caller adds [`H_EVENT_TS`]). An event time of 0 or less means "none":
    /// the ingest time, not counted as implausible.
    pub fn timestamp(&self, rec: &Record) -> (i64, bool) {
        let ingest = rec.ingest_ts_ms.max(0);
        let ev = rec.event.event_ts_ms;
        if ev <= 0 {
            return (ingest, false);
        }
        let ahead = ev.saturating_sub(ingest);
        let behind = ingest.saturating_sub(ev);
        if ahead > self.max_ahead_ms || (self.max_behind_ms > 0 && behind > self.max_behind_ms) {
            (ingest, true)
        } else {
            (ev, false)
        }
    }
}

/// The identity and provenance headers of a record.
/// `clamped`: the timestamp is the ingest time in place of the event time ([`RecordTime`]); the
/// event time is then kept in `edge.event_ts`.
pub fn headers_for(
    store: &str,
    epoch: &str,
    rec: &Record,
    replay: bool,
    clamped: bool,
) -> OwnedHeaders {
    let e = &rec.event;
    let seq = rec.seq.to_string();
    let ingest = rec.ingest_ts_ms.to_string();
    let mut h = OwnedHeaders::new_with_capacity(10 + e.headers.len())
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
    if clamped {
        h = h.insert(text(H_EVENT_TS, &e.event_ts_ms.to_string()));
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
        let h = headers_for("s1", "e-1", &rec(), false, false);
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
        let t = RecordTime::default();
        assert_eq!(t.timestamp(&r), (1_700_000_000_000, false));
        let mut r2 = r.clone();
        r2.event.event_ts_ms = 0;
        assert_eq!(
            t.timestamp(&r2),
            (1_700_000_000_123, false),
            "no event time"
        );
    }

    #[test]
    fn an_implausible_event_time_becomes_the_ingest_time_and_travels_in_a_header() {
        let t = RecordTime::default();
        let mut r = rec();
        // A lane whose clock runs 3 hours ahead: Kafka 4 would refuse it (1 h by default).
        r.event.event_ts_ms = r.ingest_ts_ms + 3 * 3_600_000;
        assert_eq!(t.timestamp(&r), (r.ingest_ts_ms, true));
        // 4 minutes ahead (clock drift) and a day-old offline backlog are kept as they are.
        r.event.event_ts_ms = r.ingest_ts_ms + 240_000;
        assert_eq!(t.timestamp(&r), (r.event.event_ts_ms, false));
        r.event.event_ts_ms = r.ingest_ts_ms - 24 * 3_600_000;
        assert_eq!(t.timestamp(&r), (r.event.event_ts_ms, false));
        // A clock reset to years ago would be deleted by HQ's retention on arrival.
        r.event.event_ts_ms = r.ingest_ts_ms - 3 * 365 * 24 * 3_600_000;
        assert_eq!(t.timestamp(&r), (r.ingest_ts_ms, true));
        let unlimited = RecordTime {
            max_behind_ms: 0,
            ..t
        };
        assert_eq!(unlimited.timestamp(&r), (r.event.event_ts_ms, false));
        // Extreme values do not overflow.
        r.event.event_ts_ms = i64::MAX;
        assert_eq!(t.timestamp(&r), (r.ingest_ts_ms, true));

        let h = headers_for("s1", "e-1", &r, false, true);
        let got: Vec<(String, String)> = (0..h.count())
            .map(|i| {
                let x = h.get(i);
                (
                    x.key.to_string(),
                    String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                )
            })
            .filter(|(k, _)| k == H_EVENT_TS)
            .collect();
        assert_eq!(got, vec![(H_EVENT_TS.to_string(), i64::MAX.to_string())]);
    }
}
