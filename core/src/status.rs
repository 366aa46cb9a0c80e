//! Component status: every long-running component reports its state here; `status`, `/readyz`,
//! the heartbeat and the metrics read it. A state change is logged once (one line per change, not
//! per record).

use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Not yet connected/opened for the first time.
    Starting,
    /// Working.
    Up,
    /// Working with a problem (e.g. dropping data it cannot store, slow peer).
    Degraded,
    /// Not working; the component retries on its own.
    Down,
    /// Stopped on purpose (shutdown or disabled).
    Stopped,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Starting => "starting",
            State::Up => "up",
            State::Degraded => "degraded",
            State::Down => "down",
            State::Stopped => "stopped",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ComponentStatus {
    pub kind: String,
    pub state: State,
    /// A sentence: what is happening and, when not up, why and what the component does next.
    pub detail: String,
    /// When the state last changed (ms since the Unix epoch).
    pub since_ms: i64,
    /// Component-specific figures (peer address, counters, lag).
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub fields: BTreeMap<String, Value>,
    /// Set while the component runs but makes no progress it should (the uplink with records
    /// waiting on an up link and nothing committed): why. The agent is then unhealthy, so the
    /// watchdog lets systemd restart it and `/readyz` tells a load balancer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wedged: Option<String>,
}

/// The registry of all components' status.
#[derive(Debug, Clone, Default)]
pub struct Status(Arc<RwLock<BTreeMap<String, ComponentStatus>>>);

impl Status {
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers a component (state `starting`) and returns its handle.
    pub fn register(&self, name: impl Into<String>, kind: impl Into<String>) -> StatusHandle {
        let name = name.into();
        let kind = kind.into();
        self.0.write().unwrap_or_else(|e| e.into_inner()).insert(
            name.clone(),
            ComponentStatus {
                kind,
                state: State::Starting,
                detail: "starting".into(),
                since_ms: crate::time::now_ms(),
                fields: BTreeMap::new(),
                wedged: None,
            },
        );
        metrics::gauge!("edge_component_up", "component" => name.clone()).set(0.0);
        StatusHandle {
            name: Arc::from(name),
            registry: self.clone(),
        }
    }

    pub fn snapshot(&self) -> BTreeMap<String, ComponentStatus> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn get(&self, name: &str) -> Option<ComponentStatus> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
    }
}

/// One component's handle on the registry.
#[derive(Debug, Clone)]
pub struct StatusHandle {
    name: Arc<str>,
    registry: Status,
}

impl StatusHandle {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The registry this handle reports to (the uplink's heartbeats carry every component's state).
    pub fn registry(&self) -> &Status {
        &self.registry
    }

    /// Sets the state. Logs only when the state or the detail changes.
    pub fn set(&self, state: State, detail: impl Into<String>) {
        let detail = detail.into();
        let mut map = self.registry.0.write().unwrap_or_else(|e| e.into_inner());
        let Some(s) = map.get_mut(&*self.name) else {
            return;
        };
        if s.state == state && s.detail == detail {
            return;
        }
        let changed = s.state != state;
        if changed {
            s.since_ms = crate::time::now_ms();
        }
        let prev = s.state;
        s.state = state;
        s.detail = detail.clone();
        drop(map);
        metrics::gauge!("edge_component_up", "component" => self.name.to_string())
            .set(if state == State::Up { 1.0 } else { 0.0 });
        let name = &*self.name;
        match state {
            State::Down | State::Degraded => {
                tracing::warn!(
                    component = name,
                    state = state.as_str(),
                    previous = prev.as_str(),
                    "{detail}"
                )
            }
            _ => tracing::info!(
                component = name,
                state = state.as_str(),
                previous = prev.as_str(),
                "{detail}"
            ),
        }
    }

    pub fn state(&self) -> Option<State> {
        self.registry.get(&self.name).map(|s| s.state)
    }

    /// Marks the component wedged (`Some(why)`) or not. Logs when that changes.
    pub fn set_wedged(&self, why: Option<String>) {
        let mut map = self.registry.0.write().unwrap_or_else(|e| e.into_inner());
        let Some(s) = map.get_mut(&*self.name) else {
            return;
        };
        if s.wedged.is_some() == why.is_some() {
            s.wedged = why;
            return;
        }
        s.wedged = why.clone();
        drop(map);
        metrics::gauge!("edge_component_wedged", "component" => self.name.to_string())
            .set(if why.is_some() { 1.0 } else { 0.0 });
        match why {
            Some(why) => tracing::error!(component = &*self.name, "{why}"),
            None => tracing::info!(component = &*self.name, "progress again; no longer wedged"),
        }
    }

    /// Sets a component-specific field (no log line).
    pub fn field(&self, key: &str, value: impl Into<Value>) {
        if let Some(s) = self
            .registry
            .0
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .get_mut(&*self.name)
        {
            s.fields.insert(key.to_string(), value.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_changes_are_recorded() {
        let reg = Status::new();
        let h = reg.register("mqtt", "mqtt");
        assert_eq!(h.state(), Some(State::Starting));
        h.set(
            State::Down,
            "connection refused by 127.0.0.1:1883; retrying in 1s",
        );
        h.field("broker", "127.0.0.1:1883");
        let s = reg.get("mqtt").unwrap();
        assert_eq!(s.state, State::Down);
        assert!(s.detail.contains("refused"));
        assert_eq!(s.fields["broker"], "127.0.0.1:1883");
    }
}
