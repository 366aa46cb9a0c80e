//! What every device driver does around its device: report it up or down (status, the
//! `edge_device_up` metric and an `agent.device/1` record in `agent.health`), back off with jitter
//! between attempts ([`device_backoff`]), and store events with backpressure. What a driver
//! cannot parse goes to [`crate::deadletters`].

use edge_core::backoff::{Backoff, Jitter, sleep_unless_cancelled};
use edge_core::component::ComponentContext;
use edge_core::log::{AppendOutcome, AppendRequest, LogError};
use edge_core::{Event, State};
use serde_json::json;
use std::time::Duration;

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

/// FNV-1a, 64 bit: content identities for event ids (not security relevant).
pub fn fnv64(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}
