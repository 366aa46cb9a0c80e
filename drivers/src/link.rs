//! What every device driver does around its device: report it up or down (status, the
//! `edge_device_up` metric and an `agent.device/1` record in `agent.health`), back off with jitter
//! between attempts ([`device_backoff`]), store events with backpressure, and
//! dead-letter what it cannot parse, with repeats of one error aggregated ([`DeadLetters`]).

use edge_core::backoff::{Backoff, Jitter, sleep_unless_cancelled};
use edge_core::component::ComponentContext;
use edge_core::config::{Problems, join};
use edge_core::deadletter::DeadLetter;
use edge_core::log::{AppendOutcome, AppendRequest, LogError};
use edge_core::{Event, State};
use serde_json::json;
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

/// The backoff of device drivers: full jitter in `[min, ceiling]`, the ceiling doubling to `max`,
/// so that devices that failed together do not retry together.
pub fn device_backoff(min: Duration, max: Duration) -> Backoff {
    Backoff::new(min, max).with_jitter(Jitter::Full)
}

/// One device of a driver: its up/down state as status, metric and health records.
#[derive(Debug)]
pub struct DeviceLink {
    pub ctx: ComponentContext,
    kind: &'static str,
    device: String,
    up: Option<bool>,
    pub backoff: Backoff,
}

impl DeviceLink {
    pub fn new(ctx: ComponentContext, kind: &'static str, device: impl Into<String>) -> Self {
        let device = device.into();
        ctx.status.field("device", device.clone());
        DeviceLink {
            ctx,
            kind,
            device,
            up: None,
            backoff: device_backoff(Duration::from_millis(200), Duration::from_secs(10)),
        }
    }

    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = device_backoff(min, max);
        self
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// Whether the device was last reported up.
    pub fn is_up(&self) -> bool {
        self.up == Some(true)
    }

    fn gauge(&self, v: f64) {
        metrics::gauge!("edge_device_up", "driver" => self.ctx.status.name().to_string(), "device" => self.device.clone()).set(v);
    }

    /// The device works. Records the transition once.
    pub async fn up(&mut self, detail: impl Into<String>) {
        let detail = detail.into();
        self.backoff.reset();
        self.ctx.status.set(State::Up, detail.clone());
        if self.up != Some(true) {
            self.up = Some(true);
            self.gauge(1.0);
            self.health("up", &detail).await;
        }
    }

    /// The device failed; returns after the backoff delay, or `false` when the agent is stopping.
    pub async fn down_and_wait(&mut self, reason: impl std::fmt::Display) -> bool {
        let delay = self.backoff.next_delay();
        let detail = format!("{reason}; retrying in {} ms", delay.as_millis());
        self.ctx.status.set(State::Down, detail.clone());
        if self.up != Some(false) {
            self.up = Some(false);
            self.gauge(0.0);
            metrics::counter!("edge_device_down_total", "driver" => self.ctx.status.name().to_string())
                .increment(1);
            self.health("down", &reason.to_string()).await;
        }
        sleep_unless_cancelled(delay, self.ctx.shutdown.intake()).await
    }

    /// Writes the state change to `agent.health`. Best effort with a short deadline: a full or
    /// closed log must not keep a driver from reconnecting; the status and metric still change.
    async fn health(&self, state: &str, detail: &str) {
        let payload = json!({
            "schema": "agent.device/1",
            "store": &*self.ctx.store_id,
            "component": self.ctx.status.name(),
            "kind": self.kind,
            "device": self.device,
            "state": state,
            "detail": detail,
            "ts": edge_core::time::now_ms(),
        });
        let ev = Event::new(
            "agent.health",
            serde_json::to_vec(&payload).unwrap_or_default(),
        )
        .with_schema("agent.device/1")
        .with_source(self.ctx.status.name())
        .with_key(self.device.clone());
        let r = tokio::time::timeout(
            Duration::from_secs(2),
            self.ctx.log.append(AppendRequest::one(ev)),
        )
        .await;
        if !matches!(r, Ok(Ok(_))) {
            tracing::warn!(
                component = self.ctx.status.name(),
                device = %self.device,
                state,
                "could not record the device state change in agent.health (the local log is full or closing); status and metrics still show it"
            );
        }
    }
}

/// Appends with backpressure: a full log is retried with backoff until it has room or intake
/// stops. `Ok(None)` means the agent is stopping and nothing was stored.
pub async fn store(
    ctx: &ComponentContext,
    events: Vec<Event>,
) -> Result<Option<AppendOutcome>, LogError> {
    let mut backoff = device_backoff(Duration::from_millis(50), Duration::from_secs(5));
    let mut paused = false;
    loop {
        match ctx.log.append(AppendRequest::events(events.clone())).await {
            Ok(o) => {
                if paused {
                    ctx.status
                        .set(State::Up, "the local log has room again; intake resumed");
                }
                return Ok(Some(o));
            }
            Err(LogError::Full) => {
                if !paused {
                    paused = true;
                    ctx.status.set(
                        State::Degraded,
                        "the local log is full; this device's events wait until the uplink frees space",
                    );
                }
                if !backoff.sleep(ctx.shutdown.intake()).await {
                    return Ok(None);
                }
            }
            Err(e) => return Err(e),
        }
    }
}

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

/// FNV-1a, 64 bit: content identities for event ids (not security relevant).
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
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
