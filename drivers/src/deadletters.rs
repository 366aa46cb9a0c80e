//! Dead letters of the device drivers: what a device sent that the driver could not use, with
//! the reason and the bytes as sent (`deadletter/1`, `docs/schemas/deadletter.md`), counted in
//! `edge_driver_dead_letters_total{driver, reason}`.
//!
//! A device that repeats one error on every poll or scan must not flood the log, so drivers that
//! can see repeats go through [`DeadLetters`]: one dead letter per distinct error per interval,
//! with a `count`. [`dead_letter`] writes one as is.

use crate::link::fnv64;
use edge_core::Event;
use edge_core::component::ComponentContext;
use edge_core::config::{Problems, join};
use edge_core::deadletter::DeadLetter;
use edge_core::log::AppendRequest;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// Original bytes a driver keeps in a dead letter.
pub const DEAD_LETTER_KEEP_BYTES: usize = 4096;

/// Default of the drivers' `deadletter_repeat_interval_ms`.
pub const DEFAULT_REPEAT_INTERVAL_MS: u64 = 60_000;

pub fn default_repeat_interval_ms() -> u64 {
    DEFAULT_REPEAT_INTERVAL_MS
}

/// Checks a driver's `deadletter_repeat_interval_ms` (100 ms to 1 h).
pub fn validate_repeat_interval(path: &str, interval_ms: u64, problems: &mut Problems) {
    if !(100..=3_600_000).contains(&interval_ms) {
        problems.push(
            join(path, "deadletter_repeat_interval_ms"),
            format!("{interval_ms} must be between 100 (0.1 s) and 3600000 (1 h)"),
        );
    }
}

fn count_dead_letter(ctx: &ComponentContext, reason_label: &'static str) {
    metrics::counter!("edge_driver_dead_letters_total", "driver" => ctx.status.name().to_string(), "reason" => reason_label)
        .increment(1);
}

/// What a driver could not use: the reason and the bytes the device sent.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Letter {
    origin: &'static str,
    reason_label: &'static str,
    reason: String,
    original: Vec<u8>,
}

impl Letter {
    /// `count` occurrences, the first at `first_ms` and the last at `last_ms`.
    fn event(&self, ctx: &ComponentContext, count: u64, first_ms: i64, last_ms: i64) -> Event {
        DeadLetter::new(self.origin, self.reason.clone())
            .field("driver", ctx.status.name())
            .field("reason_label", self.reason_label)
            .field("store", &*ctx.store_id)
            .field("count", count)
            .field("first_seen_ms", first_ms)
            .field("last_seen_ms", last_ms)
            .original(&self.original, DEAD_LETTER_KEEP_BYTES)
            .into_event()
            .with_event_ts(last_ms)
    }
}

/// A dead letter from a driver, counted by reason, written as is (`count` 1). Drivers that can
/// see the same error repeat (a device answering every poll) use [`DeadLetters`] instead.
pub fn dead_letter(
    ctx: &ComponentContext,
    origin: &'static str,
    reason_label: &'static str,
    reason: impl Into<String>,
    original: &[u8],
) -> Event {
    count_dead_letter(ctx, reason_label);
    let now = edge_core::time::now_ms();
    Letter {
        origin,
        reason_label,
        reason: reason.into(),
        original: original.to_vec(),
    }
    .event(ctx, 1, now, now)
}

/// Distinct dead letters tracked at once; a new one beyond this closes the oldest window first.
const MAX_OPEN_WINDOWS: usize = 64;

/// The dead letters of one driver, with repeats aggregated, so that a device repeating one error
/// on every poll writes one dead letter per interval instead of hundreds a minute.
///
/// Invariants:
/// * Every distinct dead letter (origin, reason label, reason and original bytes) is written, the
///   first occurrence at once with `count` 1. Distinct ones are never folded together.
/// * Repeats of a written one within its window (`interval`) are only counted. When the window
///   closes ([`DeadLetters::due`]), one dead letter carries their `count`, `first_seen_ms` and
///   `last_seen_ms`, and a new window opens; a window without repeats closes silently. So the
///   `count`s of the written dead letters add up to the occurrences, once [`DeadLetters::drain`]
///   has taken what is still open (the driver does that when it stops).
/// * Memory is bounded: at most [`MAX_OPEN_WINDOWS`] windows are open; the metric
///   `edge_driver_dead_letters_total` counts every occurrence.
#[derive(Debug)]
pub struct DeadLetters {
    ctx: ComponentContext,
    origin: &'static str,
    record_key: String,
    interval: Duration,
    open: HashMap<u64, Window>,
    ready: Vec<Event>,
}

#[derive(Debug)]
struct Window {
    opened: Instant,
    letter: Letter,
    repeats: u64,
    first_ms: i64,
    last_ms: i64,
}

impl Window {
    fn summary(&self, ctx: &ComponentContext) -> Option<Event> {
        (self.repeats > 0).then(|| {
            self.letter
                .event(ctx, self.repeats, self.first_ms, self.last_ms)
        })
    }
}

impl DeadLetters {
    /// `record_key` is the record key of every dead letter (the lane).
    pub fn new(
        ctx: &ComponentContext,
        origin: &'static str,
        record_key: impl Into<String>,
        interval: Duration,
    ) -> Self {
        DeadLetters {
            ctx: ctx.clone(),
            origin,
            record_key: record_key.into(),
            interval,
            open: HashMap::new(),
            ready: Vec::new(),
        }
    }

    /// One occurrence of an error. Returns the dead letter to write now, or `None` when it repeats
    /// one written less than the interval ago (it is counted into the next summary).
    pub fn admit(
        &mut self,
        reason_label: &'static str,
        reason: impl Into<String>,
        original: &[u8],
    ) -> Option<Event> {
        count_dead_letter(&self.ctx, reason_label);
        let now = Instant::now();
        let now_ms = edge_core::time::now_ms();
        self.close_expired(now);
        let letter = Letter {
            origin: self.origin,
            reason_label,
            reason: reason.into(),
            original: original[..original.len().min(DEAD_LETTER_KEEP_BYTES)].to_vec(),
        };
        let original_len = original.len();
        let mut h = Vec::with_capacity(letter.reason.len() + letter.original.len() + 32);
        for part in [
            reason_label.as_bytes(),
            letter.reason.as_bytes(),
            &original_len.to_le_bytes(),
            &letter.original,
        ] {
            h.extend_from_slice(&part.len().to_le_bytes());
            h.extend_from_slice(part);
        }
        let id = fnv64(&h);
        if let Some(w) = self.open.get_mut(&id) {
            if w.letter == letter {
                if w.repeats == 0 {
                    w.first_ms = now_ms;
                }
                w.repeats += 1;
                w.last_ms = now_ms;
                return None;
            }
            // A hash collision between two distinct letters: write this one as is.
            return Some(self.keyed(letter.event(&self.ctx, 1, now_ms, now_ms)));
        }
        if self.open.len() >= MAX_OPEN_WINDOWS
            && let Some(oldest) = self
                .open
                .iter()
                .min_by_key(|(_, w)| w.opened)
                .map(|(k, _)| *k)
            && let Some(w) = self.open.remove(&oldest)
            && let Some(ev) = w.summary(&self.ctx)
        {
            let ev = self.keyed(ev);
            self.ready.push(ev);
        }
        let first = self.keyed(letter.event(&self.ctx, 1, now_ms, now_ms));
        self.open.insert(
            id,
            Window {
                opened: now,
                letter,
                repeats: 0,
                first_ms: now_ms,
                last_ms: now_ms,
            },
        );
        Some(first)
    }

    fn keyed(&self, ev: Event) -> Event {
        ev.with_key(self.record_key.clone())
    }

    fn close_expired(&mut self, now: Instant) {
        let interval = self.interval;
        let ctx = &self.ctx;
        let key = &self.record_key;
        let ready = &mut self.ready;
        self.open.retain(|_, w| {
            if now < w.opened + interval {
                return true;
            }
            match w.summary(ctx) {
                Some(ev) => {
                    ready.push(ev.with_key(key.clone()));
                    w.opened = now;
                    w.repeats = 0;
                    true
                }
                None => false,
            }
        });
    }

    /// The summaries of windows that closed by now, to be stored.
    pub fn due(&mut self) -> Vec<Event> {
        self.close_expired(Instant::now());
        std::mem::take(&mut self.ready)
    }

    /// When the next window closes (`None`: nothing is open).
    pub fn next_due(&self) -> Option<Instant> {
        if !self.ready.is_empty() {
            return Some(Instant::now());
        }
        self.open.values().map(|w| w.opened + self.interval).min()
    }

    /// The summaries of every open window with repeats, closing them all (the driver stops).
    pub fn drain(&mut self) -> Vec<Event> {
        let mut out = std::mem::take(&mut self.ready);
        for (_, w) in self.open.drain() {
            if let Some(ev) = w.summary(&self.ctx) {
                out.push(ev.with_key(self.record_key.clone()));
            }
        }
        out
    }

    /// Stores what [`DeadLetters::drain`] returns, when the driver stops. The log may be closing:
    /// a short deadline, and a warning with the number of repeats that could not be recorded.
    pub async fn flush(&mut self) {
        let events = self.drain();
        if events.is_empty() {
            return;
        }
        let n = events.len();
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            self.ctx.log.append(AppendRequest::events(events)),
        )
        .await;
        if !matches!(r, Ok(Ok(_))) {
            tracing::warn!(
                component = self.ctx.status.name(),
                summaries = n,
                "could not store the counts of repeated dead letters at stop (the local log is full or closing); edge_driver_dead_letters_total still counts them"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;
    use std::sync::Arc;

    fn ctx() -> (tempfile::TempDir, ComponentContext) {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(
            edge_sync::log::SqliteLog::open(dir.path(), edge_sync::log::LogConfig::default())
                .unwrap(),
        );
        (dir, ComponentContext::for_test(log, "lane3-scale"))
    }

    fn payload(ev: &Event) -> Value {
        serde_json::from_slice(&ev.payload).unwrap()
    }

    fn counts(evs: &[Event]) -> u64 {
        evs.iter()
            .map(|e| payload(e)["count"].as_u64().unwrap())
            .sum()
    }

    /// The issue's flood: one garbled answer per poll, 5 polls a second, for 60 s (paused clock).
    /// With the default interval that is two dead letters instead of 300, and their counts add
    /// up to every occurrence.
    #[tokio::test(start_paused = true)]
    async fn a_minute_of_one_repeated_error_is_two_dead_letters_with_counts() {
        let (_dir, ctx) = ctx();
        let mut dl = DeadLetters::new(
            &ctx,
            "scale",
            "3",
            Duration::from_millis(DEFAULT_REPEAT_INTERVAL_MS),
        );
        let mut written = Vec::new();
        for _ in 0..300 {
            written.extend(dl.admit(
                "garbled",
                "scale answer refused: \"00.300N\"",
                b"\x0200.300N\r",
            ));
            written.extend(dl.due());
            tokio::time::advance(Duration::from_millis(200)).await;
        }
        // The window of the first minute closed with the last poll: one summary.
        written.extend(dl.due());
        written.extend(dl.drain());
        assert_eq!(written.len(), 2, "one at once, one summary");
        assert_eq!(counts(&written), 300);
        let first = payload(&written[0]);
        assert_eq!(first["count"], 1);
        assert_eq!(
            first["original_b64"],
            edge_core::event::base64_encode(b"\x0200.300N\r")
        );
        let summary = payload(&written[1]);
        assert_eq!(summary["count"], 299);
        assert!(summary["first_seen_ms"].as_i64() <= summary["last_seen_ms"].as_i64());
        assert_eq!(summary["reason_label"], "garbled");
        assert_eq!(written[1].key.as_deref(), Some("3"));
    }

    /// A short interval: a summary per interval while the error repeats; every distinct error
    /// is written at once, never folded into another; a quiet error starts over.
    #[tokio::test(start_paused = true)]
    async fn distinct_errors_are_each_kept_and_summaries_come_per_interval() {
        let (_dir, ctx) = ctx();
        let mut dl = DeadLetters::new(&ctx, "scanner", "3", Duration::from_secs(1));
        let mut written = Vec::new();
        for i in 0..50u32 {
            // 10 s of one error every 200 ms, with a distinct error every 10th time.
            written.extend(dl.admit("check_digit", "wrong check digit", b"4006381333932"));
            if i % 10 == 0 {
                written.extend(dl.admit("no_aim", format!("no AIM id {i}"), b"x"));
            }
            written.extend(dl.due());
            tokio::time::advance(Duration::from_millis(200)).await;
        }
        // Quiet for longer than the interval: the last window's repeats come out, then the
        // window closes silently and the next occurrence is written at once again.
        tokio::time::advance(Duration::from_secs(5)).await;
        written.extend(dl.due());
        tokio::time::advance(Duration::from_secs(5)).await;
        assert!(dl.due().is_empty());
        assert!(dl.next_due().is_none(), "nothing is open");
        assert!(dl.drain().is_empty());
        let repeated: Vec<&Event> = written
            .iter()
            .filter(|e| payload(e)["reason_label"] == "check_digit")
            .collect();
        assert!(
            (10..=12).contains(&repeated.len()),
            "one at once plus one per second: {}",
            repeated.len()
        );
        let total: u64 = repeated
            .iter()
            .map(|e| payload(e)["count"].as_u64().unwrap())
            .sum();
        assert_eq!(total, 50);
        let distinct = written
            .iter()
            .filter(|e| payload(e)["reason_label"] == "no_aim")
            .count();
        assert_eq!(distinct, 5, "every distinct error is written");
        let again = dl.admit("check_digit", "wrong check digit", b"4006381333932");
        assert_eq!(again.map(|e| payload(&e)["count"].as_u64()), Some(Some(1)));
    }

    /// The same reason with other bytes is another error (the evidence differs).
    #[tokio::test(start_paused = true)]
    async fn the_same_reason_with_other_bytes_is_another_dead_letter() {
        let (_dir, ctx) = ctx();
        let mut dl = DeadLetters::new(&ctx, "scale", "3", Duration::from_secs(60));
        assert!(dl.admit("garbled", "garbled", b"a").is_some());
        tokio::time::advance(Duration::from_millis(1)).await;
        assert!(dl.admit("garbled", "garbled", b"b").is_some());
        assert!(dl.admit("garbled", "garbled", b"a").is_none());
        // More distinct errors than windows: the oldest window ("a") is closed first and its
        // repeat summarised, not lost.
        for i in 0..MAX_OPEN_WINDOWS {
            tokio::time::advance(Duration::from_millis(1)).await;
            assert!(
                dl.admit("garbled", "garbled", format!("{i}").as_bytes())
                    .is_some()
            );
        }
        let evicted = dl.due();
        assert_eq!(counts(&evicted), 1);
        assert_eq!(
            payload(&evicted[0])["original_b64"],
            edge_core::event::base64_encode(b"a")
        );
        assert!(dl.drain().is_empty(), "no other window has repeats");
    }

    /// What is still open when the driver stops is stored.
    #[tokio::test]
    async fn flush_stores_the_open_counts() {
        let (_dir, ctx) = ctx();
        let mut dl = DeadLetters::new(&ctx, "scale", "3", Duration::from_secs(60));
        let first = dl.admit("garbled", "garbled", b"a").unwrap();
        ctx.log.append(AppendRequest::one(first)).await.unwrap();
        for _ in 0..4 {
            assert!(dl.admit("garbled", "garbled", b"a").is_none());
        }
        dl.flush().await;
        let b = ctx
            .log
            .read(edge_core::log::DEADLETTER_STREAM, 1, Default::default())
            .await
            .unwrap();
        let c: Vec<u64> = b
            .records
            .iter()
            .map(|r| {
                serde_json::from_slice::<Value>(&r.event.payload).unwrap()["count"]
                    .as_u64()
                    .unwrap()
            })
            .collect();
        assert_eq!(c, vec![1, 4]);
    }
}
