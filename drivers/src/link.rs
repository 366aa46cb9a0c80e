//! What every device driver does around its device: report it up or down (status, the
//! `edge_device_up` metric and an `agent.device/1` record in `agent.health`), with the faults of a
//! device that reports them (a printer's paper-out: state `degraded`), back off with jitter
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
    /// The device's current faults (labels), `None` for a device that reports none. Known only
    /// while it is up; cleared when it goes down.
    faults: Option<Vec<&'static str>>,
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
            faults: None,
            backoff: device_backoff(Duration::from_millis(200), Duration::from_secs(10)),
        }
    }

    /// The device reports faults ([`DeviceLink::set_faults`]): its records carry `faults`, and
    /// it is `degraded` while it has any.
    pub fn with_faults(mut self) -> Self {
        self.faults = Some(Vec::new());
        self
    }

    fn has_faults(&self) -> bool {
        self.faults.as_ref().is_some_and(|f| !f.is_empty())
    }

    fn up_state(&self) -> (State, &'static str) {
        if self.has_faults() {
            (State::Degraded, "degraded")
        } else {
            (State::Up, "up")
        }
    }

    /// The device's faults changed to `faults` (labels); `detail` is the status sentence. While
    /// the device is up, the change is its state (`degraded` with faults, else `up`) and one
    /// `agent.device` record with the faults that appeared and cleared; before it is up, the faults
    /// go into the record of its coming up.
    pub async fn set_faults(&mut self, faults: Vec<&'static str>, detail: impl Into<String>) {
        let Some(old) = self.faults.replace(faults.clone()) else {
            return;
        };
        if old == faults || !self.is_up() {
            return;
        }
        let detail = detail.into();
        let (state, label) = self.up_state();
        self.ctx.status.set(state, detail.clone());
        let appeared: Vec<&str> = faults
            .iter()
            .copied()
            .filter(|f| !old.contains(f))
            .collect();
        let cleared: Vec<&str> = old
            .iter()
            .copied()
            .filter(|f| !faults.contains(f))
            .collect();
        self.health(label, &detail, &appeared, &cleared).await;
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

    /// The device works (`degraded` while it has faults). Records the transition once.
    pub async fn up(&mut self, detail: impl Into<String>) {
        let detail = detail.into();
        self.backoff.reset();
        let (state, label) = self.up_state();
        self.ctx.status.set(state, detail.clone());
        if self.up != Some(true) {
            self.up = Some(true);
            self.gauge(1.0);
            let faults = self.faults.clone().unwrap_or_default();
            self.health(label, &detail, &faults, &[]).await;
        }
    }

    /// The device failed; returns after the backoff delay, or `false` when the agent is stopping.
    pub async fn down_and_wait(&mut self, reason: impl std::fmt::Display) -> bool {
        let delay = self.backoff.next_delay();
        // A driver that retries on its own schedule (no backoff delay) says when in `reason`.
        let detail = if delay.is_zero() {
            reason.to_string()
        } else {
            format!("{reason}; retrying in {} ms", delay.as_millis())
        };
        self.ctx.status.set(State::Down, detail.clone());
        if self.up != Some(false) {
            self.up = Some(false);
            self.gauge(0.0);
            metrics::counter!("edge_device_down_total", "driver" => self.ctx.status.name().to_string())
                .increment(1);
            let cleared = match self.faults.as_mut() {
                Some(f) => std::mem::take(f),
                None => Vec::new(),
            };
            self.health("down", &reason.to_string(), &[], &cleared)
                .await;
        }
        sleep_unless_cancelled(delay, self.ctx.shutdown.intake()).await
    }

    /// Writes the state change to `agent.health`. Best effort with a short deadline: a full or
    /// closed log must not keep a driver from reconnecting; the status and metric still change.
    async fn health(&self, state: &str, detail: &str, appeared: &[&str], cleared: &[&str]) {
        let mut payload = json!({
            "schema": "agent.device/1",
            "store": &*self.ctx.store_id,
            "component": self.ctx.status.name(),
            "kind": self.kind,
            "device": self.device,
            "state": state,
            "detail": detail,
            "ts": edge_core::time::now_ms(),
        });
        if let Some(faults) = &self.faults {
            payload["faults"] = json!(faults);
            payload["faults_appeared"] = json!(appeared);
            payload["faults_cleared"] = json!(cleared);
        }
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
