//! What every device driver does around its device: report it up or down (status, the
//! `edge_device_up` metric and an `agent.device/1` record in `agent.health`), back off with jitter
//! between attempts, store events with backpressure, and dead-letter what it cannot parse.

use edge_core::component::ComponentContext;
use edge_core::deadletter::DeadLetter;
use edge_core::log::{AppendOutcome, AppendRequest, LogError};
use edge_core::{Event, State};
use serde_json::json;
use std::time::Duration;

/// Exponential backoff with full jitter between `min` and the current ceiling.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    ceiling: Duration,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Backoff {
        Backoff {
            min,
            max: max.max(min),
            ceiling: min,
        }
    }

    /// The next delay: uniformly random in [min, ceiling], then the ceiling doubles (up to max).
    pub fn next_delay(&mut self) -> Duration {
        let lo = self.min.as_millis() as u64;
        let hi = (self.ceiling.as_millis() as u64).max(lo);
        let d = Duration::from_millis(fastrand::u64(lo..=hi));
        self.ceiling = (self.ceiling * 2).min(self.max);
        d
    }

    pub fn reset(&mut self) {
        self.ceiling = self.min;
    }
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
            backoff: Backoff::new(Duration::from_millis(200), Duration::from_secs(10)),
        }
    }

    pub fn with_backoff(mut self, min: Duration, max: Duration) -> Self {
        self.backoff = Backoff::new(min, max);
        self
    }

    pub fn device(&self) -> &str {
        &self.device
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
        tokio::select! {
            _ = self.ctx.shutdown.intake().cancelled() => false,
            _ = tokio::time::sleep(delay) => true,
        }
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
    let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
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
                tokio::select! {
                    _ = ctx.shutdown.intake().cancelled() => return Ok(None),
                    _ = tokio::time::sleep(backoff.next_delay()) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// A dead letter from a driver, counted by reason.
pub fn dead_letter(
    ctx: &ComponentContext,
    origin: &'static str,
    reason_label: &'static str,
    reason: impl Into<String>,
    original: &[u8],
) -> Event {
    metrics::counter!("edge_driver_dead_letters_total", "driver" => ctx.status.name().to_string(), "reason" => reason_label)
        .increment(1);
    DeadLetter::new(origin, reason)
        .field("driver", ctx.status.name())
        .field("reason_label", reason_label)
        .field("store", &*ctx.store_id)
        .original(original, 4096)
        .into_event()
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

    #[test]
    fn backoff_is_jittered_bounded_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(800));
        let mut seen = Vec::new();
        for _ in 0..10 {
            let d = b.next_delay();
            assert!(d >= Duration::from_millis(100) && d <= Duration::from_millis(800));
            seen.push(d);
        }
        assert!(
            seen.windows(2).any(|w| w[0] != w[1]),
            "jitter varies delays"
        );
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }
}
