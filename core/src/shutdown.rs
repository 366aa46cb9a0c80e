//! Shutdown plumbing: one [`Shutdown`] handle per daemon, cloned into every task.
//!
//! Order on SIGTERM (the binary drives it): cancel `intake` (sources stop reading and stop acking),
//! wait for the log to flush what was accepted, then cancel `all` (consumers, uplink), then close the
//! log. Every loop selects on one of the two tokens.

use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    intake: CancellationToken,
    all: CancellationToken,
    /// Intake work that must finish (e.g. acks of committed records) before consumers stop.
    draining: TaskTracker,
}

impl Shutdown {
    pub fn new() -> Self {
        let all = CancellationToken::new();
        // Cancelling everything also stops intake.
        let intake = all.child_token();
        Shutdown {
            intake,
            all,
            draining: TaskTracker::new(),
        }
    }

    /// Held by a source while it still has accepted-but-unacknowledged work after intake stopped
    /// (an MQTT bridge acking committed records, a printer proxy forwarding bytes). The daemon waits
    /// for every guard to drop before it stops everything else.
    pub fn intake_guard(&self) -> TaskTrackerToken {
        self.draining.token()
    }

    /// Waits until every intake guard is dropped, at most `deadline`. Returns false on timeout.
    pub async fn wait_intake_drained(&self, deadline: Duration) -> bool {
        self.draining.close();
        tokio::time::timeout(deadline, self.draining.wait())
            .await
            .is_ok()
    }

    /// Cancelled when sources must stop accepting new data.
    pub fn intake(&self) -> &CancellationToken {
        &self.intake
    }

    /// Cancelled when every task must stop.
    pub fn all(&self) -> &CancellationToken {
        &self.all
    }

    pub fn stop_intake(&self) {
        self.intake.cancel();
    }

    pub fn stop_all(&self) {
        self.all.cancel();
    }

    pub fn is_stopping(&self) -> bool {
        self.all.is_cancelled()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_guards() {
        let s = Shutdown::new();
        let g = s.intake_guard();
        s.stop_intake();
        assert!(!s.wait_intake_drained(Duration::from_millis(20)).await);
        drop(g);
        assert!(s.wait_intake_drained(Duration::from_millis(20)).await);
    }

    #[test]
    fn stopping_all_stops_intake() {
        let s = Shutdown::new();
        assert!(!s.intake().is_cancelled());
        s.stop_all();
        assert!(s.intake().is_cancelled());
        let s = Shutdown::new();
        s.stop_intake();
        assert!(!s.all().is_cancelled());
    }
}
