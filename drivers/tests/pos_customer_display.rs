//! The customer display over a real socat PTY: offers for the lane are shown, rate-limited, then
//! the idle text comes back; the durable cursor keeps a restart from showing an offer twice.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns
mod common;

use common::{Harness, PtyPair, open_end};
use edge_core::Event;
use edge_core::State;
use edge_core::log::{AppendRequest, Log};
use edge_drivers::display::{CustomerDisplayConfig, DisplayCommandSet, build, screen};
use edge_drivers::serial::SerialConfig;
use serde_json::json;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncReadExt;

const T: Duration = Duration::from_secs(20);

fn config(path: &std::path::Path) -> CustomerDisplayConfig {
    CustomerDisplayConfig {
        name: "pole3".into(),
        lane: "3".into(),
        serial: SerialConfig::new(path.to_string_lossy()),
        command_set: DisplayCommandSet::Cd5220,
        columns: 20,
        stream: "offers.decisions".into(),
        lane_field: "lane".into(),
        show_ms: 300,
        min_interval_ms: 60_000,
        max_age_ms: 60_000,
        idle_lines: vec!["WELCOME TO".into(), "GROCERY CO".into()],
    }
}

async fn offer(h: &Harness, lane: &str, text: &str) {
    let v = json!({"schema": "offers.decision/1", "lane": lane, "display_text": text});
    h.log
        .append(AppendRequest::one(
            Event::new("offers.decisions", serde_json::to_vec(&v).unwrap())
                .with_schema("offers.decision/1"),
        ))
        .await
        .unwrap();
}

/// Collects what the display receives.
fn capture(path: &std::path::Path) -> Arc<Mutex<Vec<u8>>> {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let s2 = seen.clone();
    let mut port = open_end(path);
    tokio::spawn(async move {
        let mut buf = [0u8; 256];
        while let Ok(n) = port.read(&mut buf).await {
            if n == 0 {
                return;
            }
            s2.lock().unwrap().extend_from_slice(&buf[..n]);
        }
    });
    seen
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

async fn wait_count(seen: &Arc<Mutex<Vec<u8>>>, needle: &[u8], n: usize) {
    let deadline = tokio::time::Instant::now() + T;
    loop {
        let have = count(&seen.lock().unwrap(), needle);
        if have >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "display shows {:?} {n} times (saw {have}): {:?}",
            String::from_utf8_lossy(needle),
            String::from_utf8_lossy(&seen.lock().unwrap())
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offers_for_the_lane_are_shown_rate_limited_then_restored() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "vfd").await;
    let seen = capture(&pty.b);
    // An offer from before the display existed is not replayed.
    offer(&h, "3", "OLD OFFER\nIGNORE").await;
    let task = tokio::spawn(build(config(&pty.a), h.ctx("pole3", "customer_display")));
    h.wait_status("pole3", T, |s| s.state == State::Up).await;
    let idle = screen(DisplayCommandSet::Cd5220, 20, "WELCOME TO", "GROCERY CO");
    wait_count(&seen, &idle, 1).await;
    offer(&h, "4", "OTHER LANE\n1.00").await;
    offer(&h, "3", "COLA 2 FOR 3.00\nTODAY ONLY").await;
    offer(&h, "3", "TOO SOON\n0.50").await;
    let shown = screen(
        DisplayCommandSet::Cd5220,
        20,
        "COLA 2 FOR 3.00",
        "TODAY ONLY",
    );
    wait_count(&seen, &shown, 1).await;
    // show_ms later the idle text is back.
    wait_count(&seen, &idle, 2).await;
    h.wait_status("pole3", T, |s| {
        s.fields.get("offers_rate_limited") == Some(&json!(1))
    })
    .await;
    {
        let all = seen.lock().unwrap();
        assert_eq!(count(&all, b"OTHER LANE"), 0);
        assert_eq!(count(&all, b"TOO SOON"), 0);
        assert_eq!(count(&all, b"OLD OFFER"), 0);
        let at = all.windows(shown.len()).position(|w| w == shown).unwrap();
        assert!(count(&all[at..], &idle) >= 1, "restored after the offer");
    }
    // Restart: the durable cursor is past the shown offer, so it is not shown again.
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
    let cursor = h
        .log
        .cursor("display.pole3", "offers.decisions")
        .await
        .unwrap();
    assert_eq!(cursor, Some(5), "cursor past the four offers");
    let h2 = Harness {
        shutdown: edge_core::Shutdown::new(),
        ..h
    };
    let task = tokio::spawn(build(config(&pty.a), h2.ctx("pole3", "customer_display")));
    wait_count(&seen, &idle, 3).await;
    offer(&h2, "3", "NEW OFFER\n2.00").await;
    let fresh = screen(DisplayCommandSet::Cd5220, 20, "NEW OFFER", "2.00");
    wait_count(&seen, &fresh, 1).await;
    assert_eq!(
        count(&seen.lock().unwrap(), &shown),
        1,
        "no offer shown twice"
    );
    h2.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_display_comes_back_with_the_idle_text() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "epson").await;
    let mut cfg = config(&pty.a);
    cfg.command_set = DisplayCommandSet::Epson;
    let seen = capture(&pty.b);
    let task = tokio::spawn(build(cfg, h.ctx("pole3", "customer_display")));
    let idle = screen(DisplayCommandSet::Epson, 20, "WELCOME TO", "GROCERY CO");
    wait_count(&seen, &idle, 1).await;
    let (a, b) = pty.unplug().await;
    h.wait_status("pole3", T, |s| s.state == State::Down).await;
    let pty = PtyPair::at(a, b).await;
    let seen = capture(&pty.b);
    wait_count(&seen, &idle, 1).await;
    h.wait_status("pole3", T, |s| s.state == State::Up).await;
    offer(&h, "3", "BACK AGAIN\n1.99").await;
    wait_count(
        &seen,
        &screen(DisplayCommandSet::Epson, 20, "BACK AGAIN", "1.99"),
        1,
    )
    .await;
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}
