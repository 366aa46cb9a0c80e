//! What the HTTP endpoint, the metrics scrape, the systemd integration and the health reporter
//! need from the running daemon. Its own module, so that `daemon` (which builds it), `http`,
//! `scrape` and `systemd` (which read it) do not import each other.

use crate::config::AgentConfig;
use crate::report;
use crate::supervise::Supervision;
use edge_core::Status;
use edge_core::log::Log;
use edge_sync::log::SqliteLog;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// Everything the HTTP endpoint and the health reporter need from the running daemon.
#[derive(Clone)]
pub struct DaemonState {
    pub config: Arc<AgentConfig>,
    pub log: Arc<SqliteLog>,
    pub status: Status,
    pub started: Instant,
    pub ready: Arc<std::sync::atomic::AtomicBool>,
    /// Restarts and crash loops of the supervised components.
    pub supervision: Supervision,
}

impl DaemonState {
    pub async fn report(&self) -> anyhow::Result<report::StatusReport> {
        let log = &self.log;
        let streams = log.streams().await?;
        let cursors = log.cursors().await?;
        let mut oldest = BTreeMap::new();
        for c in &cursors {
            let ts = log.oldest_from(&c.stream, c.next_seq).await?;
            oldest.insert((c.stream.clone(), c.next_seq), ts);
        }
        let gaps = log.gap_summary().await?.iter().map(|g| g.ranges).sum();
        Ok(report::build(report::Inputs {
            store_id: &self.config.agent.store_id,
            path: log.path().display().to_string(),
            epoch: log.epoch().to_string(),
            usage: log.usage().await?,
            integrity: Some(log.integrity()),
            streams,
            cursors,
            oldest,
            gaps,
            components: self.status.snapshot(),
            daemon_running: true,
            uptime_s: Some(self.started.elapsed().as_secs_f64()),
        }))
    }
}

impl DaemonState {
    /// Why the agent is unhealthy, if it is: the log writer has stopped (its thread ended on a
    /// panic: nothing can be committed, so nothing may be acknowledged), or a component was
    /// given up after a crash loop. (The writer's round trip, which also catches a wedged
    /// writer, is probed by the watchdog, where it is cheap enough.)
    pub fn unhealthy(&self) -> Option<String> {
        if !self.log.writer_alive() {
            return Some(
                "the local log's writer has stopped: nothing can be committed (see the log for its panic)"
                    .into(),
            );
        }
        let wedged: Vec<String> = self
            .status
            .snapshot()
            .into_iter()
            .filter_map(|(name, c)| c.wedged.map(|why| format!("{name}: {why}")))
            .collect();
        if !wedged.is_empty() {
            return Some(wedged.join("; "));
        }
        let gone = self.supervision.given_up();
        (!gone.is_empty()).then(|| {
            format!(
                "component(s) {} crash-looped and were given up",
                gone.join(", ")
            )
        })
    }
}
