//! The serial receipt-printer tap over real socat PTY pairs: Complete Journey baskets parse exactly,
//! an unplugged device is reported down and comes back without a restart, garbage costs only
//! itself.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns
mod common;

use common::{Harness, PtyPair, open_end};
use edge_core::State;
use edge_drivers::printer::{EscposTapConfig, ReceiptOptions, build_tap};
use edge_drivers::receipt::TemplateConfig;
use edge_drivers::serial::SerialConfig;
use serde_json::Value;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

fn tap_config(path: &std::path::Path) -> EscposTapConfig {
    EscposTapConfig {
        name: "lane3-printer".into(),
        lane: "3".into(),
        serial: SerialConfig::new(path.to_string_lossy()),
        receipt: ReceiptOptions {
            idle_gap_ms: 300,
            ..Default::default()
        },
        template: TemplateConfig::default(),
        deadletter_repeat_interval_ms: 60_000,
    }
}

const T: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serial_tap_parses_complete_journey_baskets_exactly() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "printer").await;
    let task =
        tokio::spawn(build_tap(tap_config(&pty.a), h.ctx("lane3-printer", "escpos_tap")).unwrap());
    h.wait_status("lane3-printer", T, |s| s.state == State::Up)
        .await;
    let (bytes, baskets) = common::cj_fixture();
    let mut pos = open_end(&pty.b);
    // Uneven writes, as a POS driver flushes them.
    let mut rng = fastrand::Rng::with_seed(7);
    let mut rest = &bytes[..];
    while !rest.is_empty() {
        let n = rng.usize(1..700).min(rest.len());
        pos.write_all(&rest[..n]).await.unwrap();
        rest = &rest[n..];
    }
    h.wait_for("pos.transactions", baskets.len() as u64, T)
        .await;
    h.wait_for("pos.receipts", baskets.len() as u64, T).await;
    let txs = h.payloads("pos.transactions").await;
    assert_eq!(txs.len(), baskets.len());
    for (tx, b) in txs.iter().zip(&baskets) {
        common::assert_transaction_matches(tx, b);
        assert_eq!(tx["lane"], "3");
        assert_eq!(tx["store"], "store-7");
        assert_eq!(tx["schema"], "pos.transaction/1");
    }
    let receipts = h.payloads("pos.receipts").await;
    for (r, b) in receipts.iter().zip(&baskets) {
        assert_eq!(r["parse"]["status"], "parsed", "{r}");
        assert_eq!(r["end"], "cut");
        assert_eq!(r["raw_bytes"], b["bytes"]);
        assert_eq!(r["codes"][0]["data"], b["receipt_no"]);
    }
    // Cash sales kick the drawer and card sales do not: no loss-prevention exception.
    assert!(h.payloads("pos.exceptions").await.is_empty());
    assert!(h.payloads("deadletter").await.is_empty());
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
    assert_eq!(h.status.get("lane3-printer").unwrap().state, State::Stopped);
}

fn receipt(no: u32, body: &str) -> Vec<u8> {
    let mut v = b"\x1b@".to_vec();
    v.extend_from_slice(body.as_bytes());
    v.extend_from_slice(format!("TRANS# {no}\n\x1dV\x00").as_bytes());
    v
}

const SALE: &str = "BREAD                      2.49\nSUBTOTAL                   2.49\nTAX                        0.00\nTOTAL                      2.49\nCASH                       5.00\nCHANGE                     2.51\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unplugged_tap_is_reported_down_and_resumes_after_replug() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "usb").await;
    let task = tokio::spawn(build_tap(tap_config(&pty.a), h.ctx("tap", "escpos_tap")).unwrap());
    h.wait_status("tap", T, |s| s.state == State::Up).await;
    let mut pos = open_end(&pty.b);
    pos.write_all(&receipt(1, SALE)).await.unwrap();
    h.wait_for("pos.transactions", 1, T).await;
    drop(pos);
    let (a, b) = pty.unplug().await;
    h.wait_status("tap", T, |s| s.state == State::Down).await;
    let detail = h.status.get("tap").unwrap().detail;
    assert!(detail.contains("retrying in"), "{detail}");
    // Replug: the same by-id path comes back.
    let pty = PtyPair::at(a, b).await;
    h.wait_status("tap", T, |s| s.state == State::Up).await;
    let mut pos = open_end(&pty.b);
    pos.write_all(&receipt(2, SALE)).await.unwrap();
    h.wait_for("pos.transactions", 2, T).await;
    let txs = h.payloads("pos.transactions").await;
    assert_eq!(txs[1]["receipt_no"], "2");
    let health: Vec<Value> = h.payloads("agent.health").await;
    let states: Vec<&str> = health
        .iter()
        .filter(|v| v["component"] == "tap")
        .map(|v| v["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["up", "down", "up"], "{health:?}");
    assert_eq!(health[1]["schema"], "agent.device/1");
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_the_line_costs_only_itself() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "noisy").await;
    let task = tokio::spawn(build_tap(tap_config(&pty.a), h.ctx("noisy", "escpos_tap")).unwrap());
    h.wait_status("noisy", T, |s| s.state == State::Up).await;
    let mut pos = open_end(&pty.b);
    let mut rng = fastrand::Rng::with_seed(42);
    // 1. Binary junk / a wrong baud rate's garbage, then a good receipt.
    let junk: Vec<u8> = (0..20_000).map(|_| rng.u8(..)).collect();
    pos.write_all(&junk).await.unwrap();
    pos.write_all(b"\x1dV\x00").await.unwrap();
    pos.write_all(&receipt(10, SALE)).await.unwrap();
    // 2. A truncated receipt (the POS died mid-print): closed by the idle gap.
    pos.write_all(b"\x1b@MILK                 3.89\nSUBTOT")
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + T;
    while !h
        .payloads("pos.receipts")
        .await
        .iter()
        .any(|r| r["end"] == "idle_gap" && r["lines"][0] == "MILK                 3.89")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the truncated receipt is closed by the idle gap"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // 3. A 1 MB line without a terminator, then a good receipt.
    pos.write_all(&vec![b'A'; 1 << 20]).await.unwrap();
    pos.write_all(b"\n\x1dV\x00").await.unwrap();
    pos.write_all(&receipt(11, SALE)).await.unwrap();
    h.wait_for("pos.transactions", 2, T).await;
    let txs = h.payloads("pos.transactions").await;
    let nos: Vec<&str> = txs
        .iter()
        .map(|t| t["receipt_no"].as_str().unwrap())
        .collect();
    assert_eq!(
        nos,
        vec!["10", "11"],
        "good receipts survive the garbage around them"
    );
    let receipts = h.records("pos.receipts").await;
    for r in &receipts {
        assert!(r.event.payload.len() < 200_000, "records stay bounded");
    }
    let failed: Vec<Value> = h
        .payloads("pos.receipts")
        .await
        .into_iter()
        .filter(|r| r["parse"]["status"] == "failed")
        .collect();
    assert!(
        failed.len() >= 2,
        "junk and the truncated receipt are stored raw"
    );
    for f in &failed {
        assert!(
            f["parse"]["reason"].as_str().unwrap().contains("total"),
            "{f}"
        );
    }
    assert!(failed.iter().any(|f| f["end"] == "idle_gap"));
    assert!(
        failed.iter().any(|f| f["lines_truncated"] == true),
        "{:?}",
        failed
            .iter()
            .map(|f| (
                f["end"].clone(),
                f["raw_bytes"].clone(),
                f["lines"].as_array().map(|l| l.len())
            ))
            .collect::<Vec<_>>()
    );
    let dl = h.payloads("deadletter").await;
    assert!(
        dl.len() >= failed.len(),
        "every failure is also dead-lettered"
    );
    for d in &dl {
        assert!(!d["reason"].as_str().unwrap().is_empty());
        assert_eq!(d["driver"], "noisy");
    }
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identical_receipts_without_a_number_are_each_stored() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "same").await;
    let task = tokio::spawn(build_tap(tap_config(&pty.a), h.ctx("same", "escpos_tap")).unwrap());
    h.wait_status("same", T, |s| s.state == State::Up).await;
    let mut pos = open_end(&pty.b);
    let sale = format!("\x1b@{SALE}\x1dV\x00");
    // A reprint right after the sale, then a third copy after the commit: three records each.
    pos.write_all(sale.repeat(2).as_bytes()).await.unwrap();
    h.wait_for("pos.transactions", 2, T).await;
    pos.write_all(sale.as_bytes()).await.unwrap();
    h.wait_for("pos.transactions", 3, T).await;
    assert_eq!(h.records("pos.receipts").await.len(), 3);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_held_by_a_driver_cannot_be_opened_twice() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "excl").await;
    let task = tokio::spawn(build_tap(tap_config(&pty.a), h.ctx("first", "escpos_tap")).unwrap());
    h.wait_status("first", T, |s| s.state == State::Up).await;
    let second = SerialConfig::new(pty.a.to_string_lossy())
        .open(edge_drivers::serial::LineSettings::N81_9600);
    let Err(err) = second else {
        panic!("a second open of the same port must fail");
    };
    assert!(err.to_string().contains(&*pty.a.to_string_lossy()), "{err}");
    // A second driver on the same port stays down (and says why) instead of stealing bytes.
    let task2 = tokio::spawn(build_tap(tap_config(&pty.a), h.ctx("second", "escpos_tap")).unwrap());
    h.wait_status("second", T, |s| s.state == State::Down).await;
    let mut pos = open_end(&pty.b);
    pos.write_all(&receipt(5, SALE)).await.unwrap();
    h.wait_for("pos.transactions", 1, T).await;
    let txs = h.records("pos.transactions").await;
    assert_eq!(txs[0].event.source.as_deref(), Some("first"));
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
    task2.await.unwrap().unwrap();
}
