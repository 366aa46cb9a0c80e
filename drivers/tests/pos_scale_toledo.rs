//! The Toledo 8217 scale over real socat PTY pairs, with the frames a third-party simulator sent
//! (issue 11): net weights after a tare, over capacity as `STX ? 0x02 CR` and the real 8217 status
//! bytes, a flood of one garbled answer, and a simulator that comes back on another PTY.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns
mod common;

use common::{Harness, PtyPair, fake_scale_on, open_end, wait_requests};
use edge_core::State;
use edge_core::event::base64_encode;
use edge_drivers::scale::{ScaleConfig, ScaleProtocol, build};
use edge_drivers::serial::SerialConfig;
use serde_json::Value;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(20);

type Script = Arc<Mutex<Vec<Option<Vec<u8>>>>>;

fn weight(s: &str) -> Option<Vec<u8>> {
    Some(format!("\x02{s}\r").into_bytes())
}

fn status(b: u8) -> Option<Vec<u8>> {
    Some(vec![0x02, b'?', b, b'\r'])
}

fn config(path: &Path) -> ScaleConfig {
    ScaleConfig {
        name: "scale".into(),
        lane: "3".into(),
        serial: SerialConfig::new(path.to_string_lossy()),
        protocol: ScaleProtocol::Toledo,
        unit: "kg".into(),
        implied_decimals: 2,
        poll_interval_ms: 20,
        response_timeout_ms: 100,
        stable_readings: 2,
        emit_zero: false,
        offline_after: 3,
        reopen_after: 6,
        deadletter_repeat_interval_ms: 60_000,
    }
}

/// A fake 8217 on the far end of `pty`, answering from `script`. The end is open when this
/// returns, so the driver's first poll finds the scale there.
fn simulator(pty: &PtyPair, script: Vec<Option<Vec<u8>>>) -> (Script, Arc<Mutex<usize>>) {
    let script = Arc::new(Mutex::new(script));
    let requests = Arc::new(Mutex::new(0));
    tokio::spawn(fake_scale_on(
        open_end(&pty.b),
        b"W",
        script.clone(),
        requests.clone(),
    ));
    (script, requests)
}

fn last_reading(h: &Harness) -> Value {
    h.status
        .get("scale")
        .and_then(|s| s.fields.get("last_reading").cloned())
        .unwrap_or_default()
}

async fn wait_reading(h: &Harness, f: impl Fn(&Value) -> bool) {
    let deadline = tokio::time::Instant::now() + T;
    while !f(&last_reading(h)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "last_reading: {}",
            last_reading(h)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Items 1 and 2: a tared scale's `STX "00.300N" CR` is a net weight (record and
/// `last_reading`); `STX ? 0x02 CR` and the real 8217 over-capacity bytes (always-1 bits, parity
/// bit) show `over_capacity`, and none of them is a dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn net_weights_and_over_capacity_are_reported_not_dead_lettered() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "8217").await;
    let (script, requests) = simulator(&pty, vec![weight("00.300N")]);
    let task = tokio::spawn(build(config(&pty.a), h.ctx("scale", "scale")));
    h.wait_for("scale.weights", 1, T).await;
    let w = &h.payloads("scale.weights").await[0];
    assert_eq!(w["weight_milli"], 300);
    assert_eq!(w["mode"], "net");
    assert_eq!(w["weight_g"], 300.0);
    assert_eq!(last_reading(&h)["mode"], "net");
    for over in [0x02, 0x62, 0xe2] {
        *script.lock().unwrap() = vec![status(over)];
        wait_reading(&h, |r| {
            r["flags"] == serde_json::json!(["over_capacity"]) && r["weight_milli"].is_null()
        })
        .await;
        // A few more polls of the same status: still no dead letter.
        let n = *requests.lock().unwrap();
        wait_requests(&requests, n + 3).await;
        *script.lock().unwrap() = vec![status(0x61)]; // motion in between
        wait_reading(&h, |r| r["flags"] == serde_json::json!(["motion"])).await;
    }
    for (byte, flags) in [
        (0xe4, vec!["under_zero"]),
        (0xe8, vec!["outside_zero_capture_range"]),
        // CR as the status byte: motion, under zero, outside the zero capture range.
        (
            0x0d,
            vec!["motion", "under_zero", "outside_zero_capture_range"],
        ),
        (0xf0, vec!["center_of_zero"]),
    ] {
        *script.lock().unwrap() = vec![status(byte)];
        wait_reading(&h, |r| r["flags"] == serde_json::json!(flags)).await;
    }
    // The tare is cleared: the same weight as gross is a new weight.
    *script.lock().unwrap() = vec![weight("00.300")];
    h.wait_for("scale.weights", 2, T).await;
    assert_eq!(h.payloads("scale.weights").await[1]["mode"], "gross");
    assert_eq!(
        h.payloads("deadletter").await,
        Vec::<Value>::new(),
        "no dead letters"
    );
    assert_eq!(h.status.get("scale").unwrap().state, State::Up);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

/// Items 3 and 4: a scale answering one garbled frame on every poll writes one dead letter at
/// once and one per interval with a count, all holding the bytes the scale sent; the counts add
/// up to every garbled answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_one_error_is_a_few_dead_letters_with_counts_and_the_original_bytes() {
    const GARBLED: usize = 120;
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "flood").await;
    let mut script = vec![Some(b"\x02zz.z\r".to_vec()); GARBLED];
    script.push(weight("01.500"));
    let (_script, requests) = simulator(&pty, script);
    let mut cfg = config(&pty.a);
    cfg.deadletter_repeat_interval_ms = 500;
    let started = Instant::now();
    let task = tokio::spawn(build(cfg, h.ctx("scale", "scale")));
    h.wait_for("scale.weights", 1, T).await;
    assert!(*requests.lock().unwrap() > GARBLED);
    // The last window's summary comes when its interval is over.
    let deadline = tokio::time::Instant::now() + T;
    let dl = loop {
        let dl = h.payloads("deadletter").await;
        let total: u64 = dl.iter().map(|d| d["count"].as_u64().unwrap()).sum();
        if total as usize == GARBLED {
            break dl;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "counts add up to {total} of {GARBLED}: {dl:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let elapsed = started.elapsed();
    // One at once, then at most one per 500 ms interval (plus the last window's).
    let bound = 2 + (elapsed.as_millis() / 500) as usize;
    assert!(
        dl.len() <= bound && dl.len() < GARBLED / 4,
        "{} dead letters for {GARBLED} garbled answers in {elapsed:?}",
        dl.len()
    );
    assert_eq!(dl[0]["count"], 1);
    for d in &dl {
        assert_eq!(d["origin"], "scale");
        assert_eq!(d["reason_label"], "garbled");
        assert_eq!(d["original_b64"], base64_encode(b"\x02zz.z\r"), "{d}");
        assert_eq!(d["original_bytes"], 6);
        assert!(
            d["first_seen_ms"].as_i64() <= d["last_seen_ms"].as_i64(),
            "{d}"
        );
    }
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

/// Points `link` at what `pty_end` (a socat link) names, replacing it atomically.
fn point(link: &Path, pty_end: &Path) {
    let target = std::fs::read_link(pty_end).unwrap();
    let tmp = link.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&target, &tmp).unwrap();
    std::fs::rename(&tmp, link).unwrap();
}

/// Item 7: the simulator is killed and comes back on another PTY while the old one stays open
/// (nobody closes it, so the old handle never fails). The silent scale is reopened after
/// `reopen_after` missed polls, and when the configured link names the new PTY the driver opens
/// that and weighs again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_that_comes_back_on_another_pty_is_reopened() {
    let h = Harness::new();
    let link = h.dir.path().join("scale");
    let first = PtyPair::new(h.dir.path(), "sim1").await;
    point(&link, &first.a);
    let (old_script, _) = simulator(&first, vec![weight("01.000")]);
    let task = tokio::spawn(build(config(&link), h.ctx("scale", "scale")));
    h.wait_for("scale.weights", 1, T).await;
    // The simulator dies: its PTY stays, silent.
    *old_script.lock().unwrap() = vec![None];
    h.wait_status("scale", T, |s| s.state == State::Down).await;
    h.wait_status("scale", T, |s| {
        s.fields.get("reopens").and_then(Value::as_u64) >= Some(1)
    })
    .await;
    // It comes back on another PTY; the configured link now names that one.
    let second = PtyPair::new(h.dir.path(), "sim2").await;
    let (_new_script, new_requests) = simulator(&second, vec![weight("02.000")]);
    point(&link, &second.a);
    h.wait_for("scale.weights", 2, T).await;
    assert_eq!(h.payloads("scale.weights").await[1]["weight_milli"], 2000);
    assert!(*new_requests.lock().unwrap() >= 2);
    h.wait_status("scale", T, |s| s.state == State::Up).await;
    let states: Vec<Value> = h
        .payloads("agent.health")
        .await
        .iter()
        .map(|v| v["state"].clone())
        .collect();
    assert_eq!(states, vec!["up", "down", "up"], "reopening does not flap");
    drop(first);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

/// Item 7, the path alone: the configured link is pointed at another device while the old one
/// still answers (a USB scale replugged under the same by-id name). Missed polls never trigger
/// here (`reopen_after` is out of reach); the driver follows the path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_names_another_device_is_reopened_at_once() {
    let h = Harness::new();
    let link = h.dir.path().join("scale");
    let first = PtyPair::new(h.dir.path(), "old").await;
    point(&link, &first.a);
    let _old = simulator(&first, vec![weight("01.000")]);
    let mut cfg = config(&link);
    cfg.reopen_after = 1_000_000;
    let task = tokio::spawn(build(cfg, h.ctx("scale", "scale")));
    h.wait_for("scale.weights", 1, T).await;
    let second = PtyPair::new(h.dir.path(), "new").await;
    let _new = simulator(&second, vec![weight("03.000")]);
    point(&link, &second.a);
    h.wait_for("scale.weights", 2, T).await;
    assert_eq!(h.payloads("scale.weights").await[1]["weight_milli"], 3000);
    let s = h.status.get("scale").unwrap();
    assert_eq!(s.fields.get("reopens").and_then(Value::as_u64), Some(1));
    assert_eq!(s.state, State::Up);
    drop(first);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}
