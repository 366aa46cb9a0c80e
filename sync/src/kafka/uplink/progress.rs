//! What the uplink reports: link state, backlog, oldest unsent age, drain rate and time to drain;
//! and the bandwidth cap.

use edge_core::log::Log;
use edge_core::status::{State, StatusHandle};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// State of the link to HQ's Kafka.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    Connecting,
    Up,
    Down,
    AuthFailed,
    Fenced,
    /// Connected, but the broker refuses some records for good (they are isolated).
    Refused,
}

impl Link {
    pub fn as_str(self) -> &'static str {
        match self {
            Link::Connecting => "connecting",
            Link::Up => "up",
            Link::Down => "down",
            Link::AuthFailed => "auth_failed",
            Link::Fenced => "fenced",
            Link::Refused => "refused",
        }
    }
}

/// Exponentially weighted drain rate (records/s), updated on every commit.
#[derive(Debug, Default)]
struct Rate {
    per_sec: f64,
    window_start: Option<Instant>,
    window_records: u64,
}

impl Rate {
    fn add(&mut self, n: u64) {
        let now = Instant::now();
        let start = *self.window_start.get_or_insert(now);
        self.window_records += n;
        let dt = now.duration_since(start).as_secs_f64();
        if dt >= 1.0 {
            let r = self.window_records as f64 / dt;
            self.per_sec = if self.per_sec == 0.0 {
                r
            } else {
                0.7 * self.per_sec + 0.3 * r
            };
            self.window_start = Some(now);
            self.window_records = 0;
        }
    }
}

/// Progress shared by the uplink loop, the status ticker and heartbeats.
#[derive(Debug)]
pub struct Progress {
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    link: Link,
    /// stream -> next seq committed at HQ.
    committed: BTreeMap<String, u64>,
    rate: Rate,
    records_total: u64,
    transactions_total: u64,
    last_commit: Option<Instant>,
    last_error: Option<String>,
    /// When the link last went from not-up to up.
    up_since: Option<Instant>,
    /// Since when records have waited while the link was up ([`Progress::stalled_for`]).
    backlog_since: Option<Instant>,
}

/// Figures for `status` and heartbeats.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    pub backlog_records: u64,
    pub oldest_unsent_age_ms: Option<i64>,
    pub drain_rate_records_per_s: f64,
    /// `None` while nothing drains (link down or idle with a backlog).
    pub time_to_drain_s: Option<f64>,
    /// stream -> (next seq in the log, next seq committed at HQ)
    pub streams: BTreeMap<String, (u64, u64)>,
}

impl Progress {
    pub fn new() -> Progress {
        Progress {
            inner: Mutex::new(Inner {
                link: Link::Connecting,
                committed: BTreeMap::new(),
                rate: Rate::default(),
                records_total: 0,
                transactions_total: 0,
                last_commit: None,
                last_error: None,
                up_since: None,
                backlog_since: None,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn link(&self) -> Link {
        self.lock().link
    }

    pub fn set_link(&self, link: Link, error: Option<String>) {
        let mut g = self.lock();
        if link == Link::Up && g.link != Link::Up {
            g.up_since = Some(Instant::now());
        }
        g.link = link;
        if error.is_some() || link == Link::Up {
            g.last_error = error;
        }
    }

    pub fn set_committed(&self, stream: &str, next_seq: u64) {
        self.lock().committed.insert(stream.to_string(), next_seq);
    }

    /// Like [`Progress::set_committed`] unless a session already tracks the stream.
    pub fn set_committed_if_absent(&self, stream: &str, next_seq: u64) {
        self.lock()
            .committed
            .entry(stream.to_string())
            .or_insert(next_seq);
    }

    pub fn committed(&self) -> BTreeMap<String, u64> {
        self.lock().committed.clone()
    }

    /// Records a successful commit of `records` data records.
    pub fn committed_batch(&self, records: u64) {
        let mut g = self.lock();
        g.rate.add(records);
        g.records_total += records;
        g.transactions_total += 1;
        g.last_commit = Some(Instant::now());
    }

    /// How long records have waited with the link up and no transaction committed: since the
    /// latest of the last commit, the link coming up and the backlog appearing. `None` while
    /// nothing waits or the link is not up (an outage is not a stall: the link says so).
    pub fn stalled_for(&self, backlog_records: u64) -> Option<std::time::Duration> {
        let mut g = self.lock();
        if backlog_records == 0 || g.link != Link::Up {
            g.backlog_since = None;
            return None;
        }
        let since = *g.backlog_since.get_or_insert_with(Instant::now);
        let from = [Some(since), g.last_commit, g.up_since]
            .into_iter()
            .flatten()
            .max()?;
        Some(from.elapsed())
    }

    pub fn records_total(&self) -> u64 {
        self.lock().records_total
    }

    /// Backlog, oldest unsent age and time to drain, from the log's heads and the committed
    /// positions.
    pub async fn figures(&self, log: &dyn Log) -> Figures {
        let (committed, rate, link) = {
            let g = self.lock();
            let idle = g
                .last_commit
                .is_none_or(|t| t.elapsed() > Duration::from_secs(5));
            (
                g.committed.clone(),
                if idle { 0.0 } else { g.rate.per_sec },
                g.link,
            )
        };
        let mut f = Figures {
            drain_rate_records_per_s: rate,
            ..Default::default()
        };
        let now = edge_core::time::now_ms();
        for (stream, c) in committed {
            let head = log.next_seq(&stream).unwrap_or(c);
            let backlog = head.saturating_sub(c);
            f.backlog_records += backlog;
            if backlog > 0
                && let Ok(Some(ts)) = log.oldest_from(&stream, c).await
            {
                let age = (now - ts).max(0);
                f.oldest_unsent_age_ms = Some(f.oldest_unsent_age_ms.map_or(age, |a| a.max(age)));
            }
            f.streams.insert(stream, (head, c));
        }
        f.time_to_drain_s = if f.backlog_records == 0 {
            Some(0.0)
        } else if rate > 0.0 && link == Link::Up {
            Some(f.backlog_records as f64 / rate)
        } else {
            None
        };
        f
    }

    /// Writes the figures into the component's status fields.
    pub fn publish(&self, status: &StatusHandle, f: &Figures) {
        let g = self.lock();
        status.field("link", g.link.as_str());
        status.field("backlog_records", f.backlog_records);
        status.field("oldest_unsent_age_ms", json!(f.oldest_unsent_age_ms));
        status.field(
            "drain_rate_records_per_s",
            (f.drain_rate_records_per_s * 10.0).round() / 10.0,
        );
        status.field(
            "time_to_drain_s",
            json!(f.time_to_drain_s.map(|s| (s * 10.0).round() / 10.0)),
        );
        status.field("records_mirrored_total", g.records_total);
        status.field("transactions_total", g.transactions_total);
        status.field(
            "last_commit_age_ms",
            json!(g.last_commit.map(|t| t.elapsed().as_millis() as u64)),
        );
        status.field("last_error", json!(g.last_error));
        metrics::gauge!("edge_uplink_backlog_records").set(f.backlog_records as f64);
        metrics::gauge!("edge_uplink_oldest_unsent_age_seconds")
            .set(f.oldest_unsent_age_ms.unwrap_or(0) as f64 / 1000.0);
    }
}

impl Default for Progress {
    fn default() -> Self {
        Self::new()
    }
}

/// Sets the component state from the link state (one log line per change, by `StatusHandle`).
pub fn report(status: &StatusHandle, link: Link, detail: impl Into<String>) {
    let state = match link {
        Link::Up => State::Up,
        Link::Connecting => State::Starting,
        Link::Refused => State::Degraded,
        Link::Down | Link::AuthFailed | Link::Fenced => State::Down,
    };
    status.set(state, detail);
}

/// Token bucket over record bytes (the metered-link cap).
#[derive(Debug)]
pub struct Bandwidth {
    bytes_per_sec: f64,
    tokens: f64,
    burst: f64,
    last: tokio::time::Instant,
}

impl Bandwidth {
    /// `None` when unlimited.
    pub fn new(bytes_per_sec: u64) -> Option<Bandwidth> {
        (bytes_per_sec > 0).then(|| Bandwidth {
            bytes_per_sec: bytes_per_sec as f64,
            tokens: bytes_per_sec as f64,
            burst: bytes_per_sec as f64,
            last: tokio::time::Instant::now(),
        })
    }

    /// The most bytes one batch should take so the cap is kept smoothly.
    pub fn batch_bytes(&self) -> usize {
        (self.bytes_per_sec / 4.0).max(16.0 * 1024.0) as usize
    }

    /// Waits until `bytes` may be sent (or `cancel` fires; then returns false).
    pub async fn take(&mut self, bytes: usize, cancel: &CancellationToken) -> bool {
        let now = tokio::time::Instant::now();
        self.tokens = (self.tokens
            + now.duration_since(self.last).as_secs_f64() * self.bytes_per_sec)
            .min(self.burst);
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            return true;
        }
        let wait = Duration::from_secs_f64(-self.tokens / self.bytes_per_sec);
        tokio::select! {
            _ = cancel.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

#[cfg(test)]
mod tests {

    /// A wedged uplink (the link up, records waiting, nothing committed) is told from an idle
    /// one, an outage and a draining one.
    #[test]
    fn a_stall_counts_only_while_records_wait_on_an_up_link() {
        let p = Progress::new();
        assert_eq!(p.stalled_for(10), None, "connecting is not a stall");
        p.set_link(Link::Up, None);
        assert_eq!(p.stalled_for(0), None, "nothing waits");
        let first = p.stalled_for(10).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(30));
        let later = p.stalled_for(10).unwrap();
        assert!(later >= first + std::time::Duration::from_millis(30));
        p.committed_batch(5);
        assert!(
            p.stalled_for(10).unwrap() < std::time::Duration::from_millis(30),
            "a commit is progress"
        );
        p.set_link(Link::Down, None);
        assert_eq!(p.stalled_for(10), None, "an outage is not a stall");
        p.set_link(Link::Up, None);
        std::thread::sleep(std::time::Duration::from_millis(30));
        assert_eq!(p.stalled_for(0), None, "drained");
        assert!(
            p.stalled_for(10).unwrap() < std::time::Duration::from_millis(30),
            "a new backlog starts a new count"
        );
    }

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn bandwidth_cap_paces_batches() {
        let mut b = Bandwidth::new(100_000).unwrap();
        let cancel = CancellationToken::new();
        let t0 = tokio::time::Instant::now();
        // The first second's worth passes at once; the next 300 kB take ~3 s.
        for _ in 0..40 {
            assert!(b.take(10_000, &cancel).await);
        }
        let took = t0.elapsed();
        assert!(
            took >= Duration::from_millis(2900) && took <= Duration::from_millis(3200),
            "{took:?}"
        );
        assert!(Bandwidth::new(0).is_none());
    }
}
