//! systemd integration: readiness, `STATUS=` lines and the watchdog (`sd_notify(3)` protocol).
//!
//! * `READY=1` is sent once, after the local log is open and every component was started (the
//!   daemon calls [`Notifier::ready`] at its "edge-agent ready" point); `Type=notify` units are
//!   "active" only from then on, so `systemctl start` returns when the agent can take data.
//! * `STATUS=` is a one-line summary (links, devices, backlog, disk) refreshed every
//!   [`STATUS_EVERY`]; `systemctl status edge-agent` shows it.
//! * `WATCHDOG=1` is sent only after a health probe succeeded: the log writer answered a round
//!   trip (an empty request goes through the writer's queue and a commit) within the probe
//!   timeout, on a reactor that scheduled the probe on time, and no component was given up after a
//!   crash loop (`supervise`). A wedged writer, a blocked runtime or a crash-looping component
//!   stops the pings, and systemd restarts the service after `WatchdogSec`.
//! * `STOPPING=1` is sent when a stop was requested.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd: a terminal, a test) every call is a no-op.

use crate::report::StatusReport;
use crate::state::DaemonState;
use edge_core::log::{AppendRequest, Log};
use sd_notify::NotifyState;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How often the `STATUS=` line is refreshed.
pub const STATUS_EVERY: Duration = Duration::from_secs(15);

/// Sends notifications to the service manager named by `NOTIFY_SOCKET`.
#[derive(Clone, Debug)]
pub struct Notifier {
    enabled: bool,
    /// A failed send is logged once, not every tick.
    warned: Arc<AtomicBool>,
}

impl Notifier {
    pub fn from_env() -> Self {
        Notifier {
            enabled: std::env::var_os("NOTIFY_SOCKET").is_some(),
            warned: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn is_enabled(&self) -> bool {
        self.enabled
    }

    fn send(&self, states: &[NotifyState<'_>]) {
        if !self.enabled {
            return;
        }
        match sd_notify::notify(states) {
            Ok(()) => {
                self.warned.store(false, Ordering::Relaxed);
            }
            Err(e) => {
                if !self.warned.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        error = %e,
                        "cannot notify systemd (NOTIFY_SOCKET); readiness and watchdog pings are not delivered"
                    );
                }
            }
        }
    }

    /// Start-up is complete: the log is open and the components are started.
    pub fn ready(&self, status: &str) {
        self.send(&[NotifyState::Ready, NotifyState::Status(&one_line(status))]);
    }

    pub fn status(&self, status: &str) {
        self.send(&[NotifyState::Status(&one_line(status))]);
    }

    pub fn watchdog(&self) {
        self.send(&[NotifyState::Watchdog]);
    }

    pub fn stopping(&self, status: &str) {
        self.send(&[
            NotifyState::Stopping,
            NotifyState::Status(&one_line(status)),
        ]);
    }
}

/// `STATUS=` is one line of the datagram protocol; a newline would end it early.
fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The watchdog interval systemd asked for (`WatchdogSec=`), if any.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().filter(|d| !d.is_zero())
}

/// Runs until `stop`: every `interval / 3`, runs `probe` (bounded by `interval / 3`) and calls
/// `ping` only when the probe succeeded. Returns the number of pings sent.
pub async fn watchdog_loop<P, F>(
    interval: Duration,
    mut probe: P,
    mut ping: impl FnMut(),
    mut on_failure: impl FnMut(&str),
    stop: CancellationToken,
) -> u64
where
    P: FnMut() -> F,
    F: Future<Output = Result<(), String>>,
{
    let every = (interval / 3).max(Duration::from_millis(50));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut pings = 0u64;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return pings,
            _ = tick.tick() => {}
        }
        let started = Instant::now();
        let outcome = tokio::select! {
            _ = stop.cancelled() => return pings,
            r = tokio::time::timeout(every, probe()) => r,
        };
        match outcome {
            Ok(Ok(())) => {
                ping();
                pings += 1;
                metrics::counter!("edge_watchdog_pings_total").increment(1);
            }
            Ok(Err(reason)) => {
                metrics::counter!("edge_watchdog_probe_failures_total").increment(1);
                on_failure(&reason);
            }
            Err(_) => {
                metrics::counter!("edge_watchdog_probe_failures_total").increment(1);
                on_failure(&format!(
                    "the health probe did not finish in {:?}",
                    started.elapsed()
                ));
            }
        }
    }
}

/// The probe of the running daemon: no component given up after a crash loop, and one round trip
/// through the log writer.
async fn log_round_trip(state: &DaemonState) -> Result<(), String> {
    if let Some(why) = state.unhealthy() {
        return Err(why);
    }
    state
        .log
        .append(AppendRequest::default())
        .await
        .map(|_| ())
        .map_err(|e| format!("the log writer did not answer: {e}"))
}

/// Spawns the watchdog (when systemd asked for one) and the `STATUS=` refresher. Both stop when
/// `stop` is cancelled.
pub fn spawn(
    state: DaemonState,
    notifier: Notifier,
    stop: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut handles = Vec::new();
    if !notifier.is_enabled() {
        return handles;
    }
    if let Some(interval) = watchdog_interval() {
        tracing::info!(
            interval_ms = interval.as_millis() as u64,
            "systemd watchdog enabled: pinging while the log writer answers"
        );
        let (st, n, n2, s) = (
            state.clone(),
            notifier.clone(),
            notifier.clone(),
            stop.clone(),
        );
        handles.push(tokio::spawn(async move {
            let failing = AtomicBool::new(false);
            watchdog_loop(
                interval,
                || {
                    let st = st.clone();
                    async move { log_round_trip(&st).await }
                },
                || {
                    if failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("the health probe succeeds again; watchdog pings resume");
                    }
                    n.watchdog()
                },
                |reason| {
                    if !failing.swap(true, Ordering::Relaxed) {
                        tracing::error!(
                            reason,
                            "health probe failed: withholding systemd watchdog pings (systemd restarts the agent if this persists for WatchdogSec)"
                        );
                    }
                    n2.status(&format!("UNHEALTHY: {reason}"));
                },
                s,
            )
            .await;
        }));
    }
    handles.push(tokio::spawn(async move {
        let mut tick = tokio::time::interval(STATUS_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Ok(r) = state.report().await {
                notifier.status(&summary(&r));
            }
        }
    }));
    handles
}

fn human_age(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.0}s")
    } else if s < 7200.0 {
        format!("{:.0}m", s / 60.0)
    } else if s < 172_800.0 {
        format!("{:.1}h", s / 3600.0)
    } else {
        format!("{:.1}d", s / 86400.0)
    }
}

/// The one-line `STATUS=`: link state, devices, backlog per cursor, disk.
pub fn summary(r: &StatusReport) -> String {
    let mut parts = Vec::new();
    let mut devices = (0usize, 0usize);
    for (name, c) in &r.components {
        let state = c["state"].as_str().unwrap_or("unknown");
        match c["kind"].as_str().unwrap_or("") {
            "mqtt" | "kafka" | "uplink" | "downlink" => parts.push(format!("{name} {state}")),
            _ => {
                devices.1 += 1;
                if state == "up" {
                    devices.0 += 1;
                }
            }
        }
    }
    if devices.1 > 0 {
        parts.push(format!("devices {}/{} up", devices.0, devices.1));
    }
    let mut backlog = 0u64;
    let mut oldest: Option<f64> = None;
    for s in &r.streams {
        for c in s.cursors.values() {
            backlog += c.backlog;
            if let Some(a) = c.oldest_unsent_age_s {
                oldest = Some(oldest.map_or(a, |o: f64| o.max(a)));
            }
        }
    }
    parts.push(match oldest {
        Some(a) if backlog > 0 => format!("backlog {backlog} (oldest {})", human_age(a)),
        _ => format!("backlog {backlog}"),
    });
    let pct = if r.log.budget_bytes > 0 {
        r.log.used_bytes as f64 * 100.0 / r.log.budget_bytes as f64
    } else {
        0.0
    };
    parts.push(format!("log {pct:.0}% of budget"));
    if r.log.full {
        parts.push("LOG FULL: intake paused".into());
    }
    parts.join("; ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    #[tokio::test(start_paused = true)]
    async fn pings_only_while_the_probe_succeeds() {
        let healthy = Arc::new(AtomicBool::new(true));
        let pings = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (h, p, f, s) = (
                healthy.clone(),
                pings.clone(),
                failures.clone(),
                stop.clone(),
            );
            async move {
                watchdog_loop(
                    Duration::from_secs(3),
                    move || {
                        let ok = h.load(Ordering::SeqCst);
                        async move {
                            if ok {
                                Ok(())
                            } else {
                                Err("writer wedged".to_string())
                            }
                        }
                    },
                    move || {
                        p.fetch_add(1, Ordering::SeqCst);
                    },
                    move |_| {
                        f.fetch_add(1, Ordering::SeqCst);
                    },
                    s,
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_millis(3500)).await;
        let healthy_pings = pings.load(Ordering::SeqCst);
        assert!(healthy_pings >= 3, "{healthy_pings} pings in 3.5 s");
        healthy.store(false, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        let before = pings.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            pings.load(Ordering::SeqCst),
            before,
            "no ping while unhealthy"
        );
        assert!(failures.load(Ordering::SeqCst) >= 9);
        healthy.store(true, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert!(pings.load(Ordering::SeqCst) > before, "pings resume");
        stop.cancel();
        assert!(task.await.unwrap() > before);
    }

    #[tokio::test(start_paused = true)]
    async fn a_probe_that_hangs_withholds_the_ping() {
        let pings = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(AtomicU64::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (p, f, s) = (pings.clone(), failures.clone(), stop.clone());
            async move {
                watchdog_loop(
                    Duration::from_secs(3),
                    std::future::pending::<Result<(), String>>,
                    move || {
                        p.fetch_add(1, Ordering::SeqCst);
                    },
                    move |_| {
                        f.fetch_add(1, Ordering::SeqCst);
                    },
                    s,
                )
                .await
            }
        });
        tokio::time::sleep(Duration::from_secs(10)).await;
        stop.cancel();
        assert_eq!(task.await.unwrap(), 0);
        assert_eq!(pings.load(Ordering::SeqCst), 0);
        assert!(failures.load(Ordering::SeqCst) >= 3);
    }

    #[test]
    fn status_line_names_links_backlog_and_disk() {
        let r: StatusReport = serde_json::from_value(serde_json::json!({
            "store_id": "s1", "version": "0.1.0", "daemon_running": true, "uptime_s": 10.0,
            "log": {"path": "/x", "epoch": "e", "used_bytes": 250, "file_bytes": 300, "wal_bytes": 0,
                    "budget_bytes": 1000, "fs_free_bytes": 1, "full": false,
                    "integrity": {"state": "ok"}, "gaps": 0},
            "streams": [{"name": "pos.transactions", "priority": "protected", "mirrored": false,
                         "first_seq": 1, "next_seq": 43, "records": 42, "payload_bytes": 1,
                         "oldest_age_s": 400.0,
                         "cursors": {"uplink": {"next_seq": 1, "backlog": 42, "oldest_unsent_age_s": 400.0}}}],
            "components": {"mqtt": {"kind": "mqtt", "state": "down", "detail": "refused"},
                           "lane-1": {"kind": "escpos", "state": "up", "detail": ""},
                           "scale": {"kind": "scale", "state": "down", "detail": ""}}
        }))
        .unwrap();
        let line = summary(&r);
        assert_eq!(
            line,
            "mqtt down; devices 1/2 up; backlog 42 (oldest 7m); log 25% of budget"
        );
        assert!(!one_line("a\nb").contains('\n'));
    }
}
