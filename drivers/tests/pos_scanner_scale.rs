//! Barcode scanner and scale drivers over real socat PTY pairs.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns
mod common;

use common::{Harness, PtyPair, fake_scale, fake_scale_on, open_end, wait_requests};
use edge_core::State;
use edge_drivers::scale::{ScaleConfig, ScaleProtocol, build as build_scale};
use edge_drivers::scanner::{MeasureValue, ScannerConfig, WeighedPrefix, build as build_scanner};
use edge_drivers::serial::SerialConfig;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const T: Duration = Duration::from_secs(20);

fn scanner_config(path: &std::path::Path) -> ScannerConfig {
    ScannerConfig {
        name: "scanner".into(),
        lane: "3".into(),
        serial: SerialConfig::new(path.to_string_lossy()),
        prefix: String::new(),
        suffix: "\r\n".into(),
        aim_ids: true,
        validate_gtin: true,
        max_frame_bytes: 256,
        frame_timeout_ms: 300,
        weighed_prefixes: vec![WeighedPrefix {
            prefix: "02".into(),
            item_digits: 5,
            price_check_digit: true,
            value: MeasureValue::Price,
        }],
        gs1_without_aim: false,
        deadletter_repeat_interval_ms: 60_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scanner_frames_become_scans_and_bad_frames_dead_letters() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "scanner").await;
    let task = tokio::spawn(build_scanner(
        scanner_config(&pty.a),
        h.ctx("scanner", "scanner"),
    ));
    h.wait_status("scanner", T, |s| s.state == State::Up).await;
    let mut dev = open_end(&pty.b);
    dev.write_all(b"]E04006381333931\r\n").await.unwrap();
    dev.write_all(b"]E0020123480499").await.unwrap(); // split frame
    dev.write_all(b"4\r\n]C1011061414100041517251231103A-7\x1d3102012345\r\n")
        .await
        .unwrap();
    dev.write_all(b"]E04006381333932\r\n").await.unwrap(); // wrong check digit
    dev.write_all(b"4006381333931\r\n").await.unwrap(); // no AIM id
    dev.write_all(&vec![b'7'; 1 << 20]).await.unwrap(); // 1 MB without terminator
    dev.write_all(b"\r\n\x00\xff\x13\r\n").await.unwrap(); // noise
    dev.write_all(b"]A0SKU-42\r\n").await.unwrap();
    dev.write_all(b"]E09638507").await.unwrap(); // never terminated: dropped after the timeout
    h.wait_for("pos.scans", 4, T).await;
    h.wait_for("deadletter", 5, T).await;
    let scans = h.payloads("pos.scans").await;
    let codes: Vec<&str> = scans.iter().map(|s| s["code"].as_str().unwrap()).collect();
    assert_eq!(codes[0], "4006381333931");
    assert_eq!(scans[0]["gtin"], "04006381333931");
    assert_eq!(scans[0]["schema"], "pos.scan/1");
    assert_eq!(scans[0]["lane"], "3");
    // The weighed item: 02 01234 8 0499 4 -> item 01234 at 4.99 (price check digit 8).
    assert_eq!(scans[1]["variable_measure"]["item"], "01234");
    assert_eq!(scans[1]["variable_measure"]["price_minor"], 499);
    assert_eq!(scans[2]["symbology"], "gs1_128");
    assert_eq!(scans[2]["gs1"]["expiry"], "2025-12-31");
    assert_eq!(scans[2]["gs1"]["net_weight_g"], 123_450);
    assert_eq!(scans[3]["code"], "SKU-42");
    assert_eq!(scans.len(), 4, "{codes:?}");
    let dl = h.payloads("deadletter").await;
    let labels: Vec<&str> = dl
        .iter()
        .map(|d| d["reason_label"].as_str().unwrap())
        .collect();
    for want in [
        "check_digit",
        "no_aim",
        "too_long",
        "control_byte",
        "too_long",
    ] {
        assert!(labels.contains(&want), "{want} in {labels:?}");
    }
    let big = dl
        .iter()
        .find(|d| d["reason"].as_str().unwrap().contains("1048576"))
        .unwrap();
    assert!(
        big["original_bytes"].as_u64().unwrap() <= 256,
        "bounded: {big}"
    );
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

fn scale_config(path: &std::path::Path, protocol: ScaleProtocol) -> ScaleConfig {
    ScaleConfig {
        name: "scale".into(),
        lane: "3".into(),
        serial: SerialConfig::new(path.to_string_lossy()),
        protocol,
        unit: "lb".into(),
        implied_decimals: 2,
        poll_interval_ms: 20,
        response_timeout_ms: 100,
        stable_readings: 2,
        emit_zero: false,
        offline_after: 3,
        reopen_after: 10,
        deadletter_repeat_interval_ms: 60_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn toledo_scale_emits_only_stable_weights_and_reports_a_silent_scale() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "scale").await;
    let w = |s: &str| Some(format!("\x02{s}\r").into_bytes());
    let status = |b: u8| Some(vec![0x02, b'?', b, b'\r']);
    let script = Arc::new(Mutex::new(vec![
        status(0x61), // motion (upper always-1 bits set, as real scales send)
        w("00.500"),  // a reading that changes before it is stable
        w("01.234"),
        w("01.234"), // stable twice: emitted once
        w("01.234"),
        status(0x62), // over capacity
        w("01.234"),  // same weight again after a blip: not a new weight
        w("01.234"),
        Some(b"\x02zz.z\r".to_vec()), // garbled: dead-lettered
        None,                         // then the scale goes silent
    ]));
    let requests = Arc::new(Mutex::new(0));
    // The scale's end is open before the driver's first poll (else it starts reported down).
    tokio::spawn(fake_scale_on(
        open_end(&pty.b),
        b"W",
        script.clone(),
        requests.clone(),
    ));
    let task = tokio::spawn(build_scale(
        scale_config(&pty.a, ScaleProtocol::Toledo),
        h.ctx("scale", "scale"),
    ));
    h.wait_for("scale.weights", 1, T).await;
    h.wait_status("scale", T, |s| s.state == State::Down).await;
    let weights = h.payloads("scale.weights").await;
    assert_eq!(weights.len(), 1, "{weights:?}");
    assert_eq!(weights[0]["weight_milli"], 1234);
    assert_eq!(weights[0]["unit"], "lb");
    assert_eq!(weights[0]["weight_g"], 559.7);
    assert_eq!(weights[0]["mode"], "gross");
    assert_eq!(weights[0]["schema"], "scale.weight/1");
    let dl = h.payloads("deadletter").await;
    assert_eq!(dl.len(), 1);
    assert_eq!(dl[0]["reason_label"], "garbled");
    // The scale answers again: up, and a new weight is emitted.
    *script.lock().unwrap() = vec![w("02.000")];
    h.wait_status("scale", T, |s| s.state == State::Up).await;
    h.wait_for("scale.weights", 2, T).await;
    assert_eq!(h.payloads("scale.weights").await[1]["weight_milli"], 2000);
    let states: Vec<Value> = h
        .payloads("agent.health")
        .await
        .iter()
        .map(|v| v["state"].clone())
        .collect();
    assert_eq!(states, vec!["up", "down", "up"]);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sma_scale_reads_net_weights_and_survives_an_unplug() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "sma").await;
    let f = |s: char, n: char, m: char, w: &str, u: &str| {
        Some(format!("\n{s}1{n}{m} {w:>10}{u:<3}\r").into_bytes())
    };
    let script = Arc::new(Mutex::new(vec![
        f(' ', 'N', 'M', "0.700", "kg"),
        f(' ', 'N', ' ', "0.455", "kg"),
        f(' ', 'N', ' ', "0.455", "kg"),
    ]));
    let requests = Arc::new(Mutex::new(0));
    tokio::spawn(fake_scale(
        pty.b.clone(),
        b"\nW\r",
        script.clone(),
        requests.clone(),
    ));
    let task = tokio::spawn(build_scale(
        scale_config(&pty.a, ScaleProtocol::Sma),
        h.ctx("scale", "scale"),
    ));
    h.wait_for("scale.weights", 1, T).await;
    let w = &h.payloads("scale.weights").await[0];
    assert_eq!(
        (
            w["weight_milli"].as_i64(),
            w["unit"].as_str(),
            w["mode"].as_str()
        ),
        (Some(455), Some("kg"), Some("net"))
    );
    wait_requests(&requests, 5).await;
    let (a, b) = pty.unplug().await;
    h.wait_status("scale", T, |s| s.state == State::Down).await;
    let pty = PtyPair::at(a, b).await;
    let requests = Arc::new(Mutex::new(0));
    *script.lock().unwrap() = vec![f(' ', 'G', ' ', "1.250", "kg")];
    tokio::spawn(fake_scale(
        pty.b.clone(),
        b"\nW\r",
        script.clone(),
        requests.clone(),
    ));
    h.wait_for("scale.weights", 2, T).await;
    assert_eq!(h.payloads("scale.weights").await[1]["weight_milli"], 1250);
    h.wait_status("scale", T, |s| s.state == State::Up).await;
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplugged_scanner_is_reported_down_and_resumes_after_replug() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "usbscan").await;
    let task = tokio::spawn(build_scanner(
        scanner_config(&pty.a),
        h.ctx("scanner", "scanner"),
    ));
    h.wait_status("scanner", T, |s| s.state == State::Up).await;
    let mut dev = open_end(&pty.b);
    dev.write_all(b"]E04006381333931\r\n").await.unwrap();
    h.wait_for("pos.scans", 1, T).await;
    drop(dev);
    let (a, b) = pty.unplug().await;
    h.wait_status("scanner", T, |s| s.state == State::Down)
        .await;
    let pty = PtyPair::at(a, b).await;
    h.wait_status("scanner", T, |s| s.state == State::Up).await;
    let mut dev = open_end(&pty.b);
    dev.write_all(b"]E496385074\r\n").await.unwrap();
    h.wait_for("pos.scans", 2, T).await;
    assert_eq!(h.payloads("pos.scans").await[1]["symbology"], "ean8");
    let states: Vec<Value> = h
        .payloads("agent.health")
        .await
        .iter()
        .map(|v| v["state"].clone())
        .collect();
    assert_eq!(states, vec!["up", "down", "up"]);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

/// A scanner repeating one bad frame (a stuck trigger on a label with a wrong check digit)
/// writes one dead letter at once and the count of the repeats when the interval is over, also
/// when nothing more arrives; a distinct bad frame in between is its own dead letter.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scanner_repeating_one_bad_frame_writes_a_few_dead_letters_with_counts() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "stuck").await;
    let mut cfg = scanner_config(&pty.a);
    cfg.deadletter_repeat_interval_ms = 300;
    let task = tokio::spawn(build_scanner(cfg, h.ctx("scanner", "scanner")));
    h.wait_status("scanner", T, |s| s.state == State::Up).await;
    let mut dev = open_end(&pty.b);
    for i in 0..200 {
        dev.write_all(b"]E04006381333932\r\n").await.unwrap();
        if i == 100 {
            dev.write_all(b"]E04006381333933\r\n").await.unwrap();
        }
    }
    let deadline = tokio::time::Instant::now() + T;
    let dl = loop {
        let dl = h.payloads("deadletter").await;
        let repeated: u64 = dl
            .iter()
            .filter(|d| d["original_b64"] == edge_core::event::base64_encode(b"]E04006381333932"))
            .map(|d| d["count"].as_u64().unwrap())
            .sum();
        if repeated == 200 {
            break dl;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{repeated} of 200 counted: {dl:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(dl.len() <= 6, "{} dead letters: {dl:?}", dl.len());
    let other: Vec<&Value> = dl
        .iter()
        .filter(|d| d["original_b64"] == edge_core::event::base64_encode(b"]E04006381333933"))
        .collect();
    assert_eq!(other.len(), 1);
    assert_eq!(other[0]["count"], 1);
    assert!(dl.iter().all(|d| d["reason_label"] == "check_digit"));
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

/// Issue 11 item 8 over a PTY: a GS1-only scanner without AIM ids. Element strings with FNC1 as
/// GS or a leading AI 01 are read as GS1, and a wrong AI 01 check digit is refused; a weighed
/// item's price check digit is verified.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gs1_without_aim_ids_and_price_check_digits_over_a_pty() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "gs1scan").await;
    let mut cfg = scanner_config(&pty.a);
    cfg.aim_ids = false;
    cfg.gs1_without_aim = true;
    let task = tokio::spawn(build_scanner(cfg, h.ctx("scanner", "scanner")));
    h.wait_status("scanner", T, |s| s.state == State::Up).await;
    let mut dev = open_end(&pty.b);
    dev.write_all(b"\x1d010950110102091717171231\r\n")
        .await
        .unwrap(); // FNC1 as GS
    dev.write_all(b"010950110102091710LOT7\r\n").await.unwrap(); // leading AI 01
    dev.write_all(b"010950110102091817171231\r\n")
        .await
        .unwrap(); // bad AI 01 check digit
    dev.write_all(b"0201234928751\r\n").await.unwrap(); // 02 01234 9 2875: price check 9
    dev.write_all(b"0201234528753\r\n").await.unwrap(); // price check 5: misread price
    h.wait_for("pos.scans", 3, T).await;
    h.wait_for("deadletter", 2, T).await;
    let scans = h.payloads("pos.scans").await;
    assert_eq!(scans[0]["symbology"], "gs1");
    assert_eq!(scans[0]["gtin"], "09501101020917");
    assert_eq!(scans[0]["gs1"]["expiry"], "2017-12-31");
    assert_eq!(scans[1]["gs1"]["batch"], "LOT7");
    assert_eq!(scans[2]["variable_measure"]["price_minor"], 2875);
    assert_eq!(scans.len(), 3, "{scans:?}");
    let labels: Vec<Value> = h
        .payloads("deadletter")
        .await
        .iter()
        .map(|d| d["reason_label"].clone())
        .collect();
    assert_eq!(labels, vec!["check_digit", "price_check_digit"]);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}
