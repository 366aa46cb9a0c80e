//! Shutdown plumbing: one [`Shutdown`] handle per daemon, cloned into every task.
//!
//! Order on SIGTERM (the binary drives it): cancel `intake` (sources stop reading and stop acking),
//! wait for the log to flush what was accepted, then cancel `all` (consumers, uplink), then close the
//! log. Every loop selects on one of the two tokens.

use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default)]
pub struct Shutdown {
    intake: CancellationToken,
    all: CancellationToken,
}

impl Shutdown {
    pub fn new() -> Self {
        let all = CancellationToken::new();
        // Cancelling everything also stops intake.
        let intake = all.child_token();
        Shutdown { intake, all }
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
