//! The proxy's view of its printer: up or down, its faults (paper out, cover open, ...) as read
//! from the status replies and ASB messages that pass through ([`crate::escpos::status`]), and a
//! probe between jobs, so the printer's state changes when the printer does, not when a POS prints.
//!
//! One place reports it all: the component's state (`degraded` with a sentence such as "lane 3
//! printer: out of paper" while the printer has a fault), the `faults` status field, the gauge
//! `edge_printer_fault{driver,lane,fault}` and an `agent.device/1` record per change (a fault
//! appearing or clearing, the printer going down or coming back).

use crate::escpos::status::PROBE_REQUEST;
use crate::escpos::{Fault, Faults, StatusReader, StatusReply};
use crate::link::DeviceLink;
use edge_core::component::ComponentContext;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// The printer behind one proxy.
#[derive(Debug)]
pub(super) struct PrinterHealth {
    pub link: DeviceLink,
    lane: String,
    faults: Faults,
    /// What the proxy does now ("listening on ...", "forwarding POS ..."): the status sentence.
    activity: String,
}

impl PrinterHealth {
    pub fn new(ctx: &ComponentContext, lane: &str, printer: &str) -> PrinterHealth {
        let h = PrinterHealth {
            link: DeviceLink::new(ctx.clone(), "receipt_printer", printer).with_faults(),
            lane: lane.to_string(),
            faults: Faults::NONE,
            activity: String::new(),
        };
        h.gauges();
        ctx.status.field("faults", Vec::<&str>::new());
        h
    }

    fn ctx(&self) -> &ComponentContext {
        &self.link.ctx
    }

    /// Every fault's gauge, 1 while present, so a dashboard has a series per fault from the start.
    fn gauges(&self) {
        let driver = self.ctx().status.name().to_string();
        for f in Fault::ALL {
            metrics::gauge!("edge_printer_fault", "driver" => driver.clone(), "lane" => self.lane.clone(), "fault" => f.label())
                .set(if self.faults.contains(f) { 1.0 } else { 0.0 });
        }
    }

    /// The status sentence: the faults first, in words an operator acts on.
    fn detail(&self) -> String {
        if self.faults.is_empty() {
            self.activity.clone()
        } else {
            format!(
                "lane {} printer: {}; {}",
                self.lane,
                self.faults.words(),
                self.activity
            )
        }
    }

    /// The printer works; `activity` says what the proxy does with it.
    pub async fn up(&mut self, activity: impl Into<String>) {
        self.activity = activity.into();
        let detail = self.detail();
        self.link.up(detail).await;
    }

    /// Status messages the printer sent: the faults they report, changes recorded. A change
    /// waits for its record at most 2 s (a slow log); it is rare, and the printer is not printing
    /// while it has a new fault.
    pub async fn observe(&mut self, replies: &[StatusReply]) {
        let faults = replies
            .iter()
            .filter_map(|r| r.observation())
            .fold(self.faults, Faults::apply);
        if faults == self.faults {
            return;
        }
        self.set(faults).await;
    }

    async fn set(&mut self, faults: Faults) {
        let (appeared, cleared) = (faults.minus(self.faults), self.faults.minus(faults));
        self.faults = faults;
        self.gauges();
        self.ctx().status.field("faults", faults.labels());
        if !appeared.is_empty() {
            tracing::warn!(component = self.ctx().status.name(), lane = %self.lane, faults = ?appeared.labels(), "printer fault: {}", appeared.words());
        }
        if !cleared.is_empty() {
            tracing::info!(component = self.ctx().status.name(), lane = %self.lane, faults = ?cleared.labels(), "printer fault cleared: {}", cleared.words());
        }
        let detail = self.detail();
        self.link.set_faults(faults.labels(), detail).await;
    }

    /// The printer cannot be used: down at once, without a backoff sleep (the next POS connection
    /// and the next probe retry; the POS paces its own retries). Its faults are unknown until it
    /// answers again.
    pub async fn down(&mut self, why: impl std::fmt::Display) {
        if !self.faults.is_empty() {
            self.faults = Faults::NONE;
            self.gauges();
            self.ctx().status.field("faults", Vec::<&str>::new());
        }
        self.link.backoff = crate::link::device_backoff(Duration::ZERO, Duration::ZERO);
        self.link.down_and_wait(why).await;
    }
}

/// Probes a network printer between jobs: connect, send `DLE EOT 1` to `4`, and read the replies
/// (and any ASB message) within `timeout`. A printer that refuses the connection is an error with
/// the sentence for status; one that accepts it and answers no status request is up, with no
/// replies (it may not implement `DLE EOT`; a POS relying on it would see the same).
pub(super) async fn probe_tcp(addr: &str, timeout: Duration) -> Result<Vec<StatusReply>, String> {
    let deadline = Instant::now() + timeout;
    let mut s = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return Err(format!("printer {addr} refused the connection: {e}")),
        Err(_) => {
            return Err(format!(
                "printer {addr} did not accept a connection within {} ms",
                timeout.as_millis()
            ));
        }
    };
    s.set_nodelay(true).ok();
    let mut reader = StatusReader::new();
    for n in 1..=4 {
        reader.requested(n);
    }
    let no_answer = || {
        format!(
            "printer {addr} accepts connections but did not answer the status request (DLE EOT) within {} ms",
            timeout.as_millis()
        )
    };
    match tokio::time::timeout_at(deadline, s.write_all(&PROBE_REQUEST)).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("writing to printer {addr} failed: {e}")),
        Err(_) => return Err(no_answer()),
    }
    let mut replies = Vec::new();
    let mut buf = [0u8; 256];
    while reader.outstanding() > 0 {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Err(_) => break,
            Ok(Ok(n)) => reader.push(&buf[..n], &mut replies),
            Ok(Err(e)) => return Err(format!("reading from printer {addr} failed: {e}")),
        }
    }
    if reader.outstanding() == 4 {
        // It takes connections, so it may well print: some printers and print servers do not
        // implement the real-time status commands. Up, with its faults unknown.
        tracing::debug!(printer = addr, "{}; its faults cannot be seen", no_answer());
    }
    Ok(replies)
}
