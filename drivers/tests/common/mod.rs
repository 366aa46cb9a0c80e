//! Shared pieces of the driver tests: real socat PTY pairs, a real SQLite log, the Complete Journey
//! fixture and polling with deadlines (never sleeps as synchronisation).
#![allow(dead_code)]

use edge_core::component::ComponentContext;
use edge_core::log::Log;
use edge_core::{Record, Shutdown, Status};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};

pub fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// The Complete Journey sample: the ESC/POS stream and the baskets it must parse into.
pub fn cj_fixture() -> (Vec<u8>, Vec<Value>) {
    let dir = fixture_dir().join("cj");
    let bytes = std::fs::read(dir.join("receipts.escpos")).expect("fixture stream");
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.join("baskets.json")).expect("fixture json"))
            .expect("fixture json parses");
    let baskets = meta["baskets"].as_array().expect("baskets").clone();
    (bytes, baskets)
}

/// Asserts that a `pos.transaction/1` payload equals its source basket exactly.
pub fn assert_transaction_matches(tx: &Value, basket: &Value) {
    let id = &basket["receipt_no"];
    assert_eq!(tx["receipt_no"], *id, "receipt number");
    assert_eq!(tx["printed_at"], basket["printed_at"], "{id}: printed time");
    let got = tx["lines"].as_array().expect("lines");
    let want = basket["lines"].as_array().expect("lines");
    assert_eq!(got.len(), want.len(), "{id}: number of lines");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g["kind"], w["kind"], "{id}: kind of {w}");
        assert_eq!(g["description"], w["description"], "{id}: description");
        assert_eq!(g["amount_minor"], w["amount_minor"], "{id}: amount of {w}");
        if w["kind"] == "item" {
            assert_eq!(g["quantity"], w["quantity"], "{id}: quantity of {w}");
            let unit = g.get("unit_price_minor").cloned().unwrap_or(Value::Null);
            assert_eq!(unit, w["unit_price_minor"], "{id}: unit price of {w}");
            let taxed = g.get("flag").and_then(Value::as_str) == Some("T");
            assert_eq!(Value::Bool(taxed), w["taxable"], "{id}: tax flag of {w}");
        }
    }
    for k in ["subtotal_minor", "tax_minor", "total_minor", "change_minor"] {
        assert_eq!(tx[k], basket[k], "{id}: {k}");
    }
    let tenders: Vec<(Value, Value)> = tx["tenders"]
        .as_array()
        .expect("tenders")
        .iter()
        .map(|t| (t["type"].clone(), t["amount_minor"].clone()))
        .collect();
    let want_t: Vec<(Value, Value)> = basket["tenders"]
        .as_array()
        .expect("tenders")
        .iter()
        .map(|t| (t["type"].clone(), t["amount_minor"].clone()))
        .collect();
    assert_eq!(tenders, want_t, "{id}: tenders");
    assert_eq!(tx["totals_consistent"], true, "{id}: {}", tx["flags"]);
    // What the shopper paid per the source data equals what the receipt's lines add up to.
    let net: i64 = got
        .iter()
        .map(|l| l["amount_minor"].as_i64().unwrap_or(0))
        .sum();
    assert_eq!(
        Value::from(net),
        basket["source_net_minor"],
        "{id}: net vs source"
    );
}

pub struct Harness {
    pub dir: tempfile::TempDir,
    pub log: Arc<edge_sync::log::SqliteLog>,
    pub shutdown: Shutdown,
    pub status: Status,
}

impl Harness {
    pub fn new() -> Harness {
        let dir = tempfile::tempdir().expect("tempdir");
        let log = Arc::new(
            edge_sync::log::SqliteLog::open(dir.path(), edge_sync::log::LogConfig::default())
                .expect("log opens"),
        );
        Harness {
            dir,
            log,
            shutdown: Shutdown::new(),
            status: Status::new(),
        }
    }

    pub fn ctx(&self, name: &str, kind: &str) -> ComponentContext {
        ComponentContext::for_test(self.log.clone(), name)
            .with_store("store-7")
            .with_shutdown(&self.shutdown)
            .with_status(&self.status, kind)
            .with_data_dir(self.dir.path())
    }

    /// All records of a stream.
    pub async fn records(&self, stream: &str) -> Vec<Record> {
        let mut out = Vec::new();
        let mut from = 1;
        loop {
            let b = self
                .log
                .read(stream, from, Default::default())
                .await
                .expect("read");
            if b.records.is_empty() {
                return out;
            }
            from = b.next_seq;
            out.extend(b.records);
        }
    }

    pub async fn payloads(&self, stream: &str) -> Vec<Value> {
        self.records(stream)
            .await
            .iter()
            .map(|r| serde_json::from_slice(&r.event.payload).expect("json payload"))
            .collect()
    }

    /// Waits until `stream` holds at least `n` records (deadline, not a sleep).
    pub async fn wait_for(&self, stream: &str, n: u64, within: Duration) {
        let deadline = tokio::time::Instant::now() + within;
        let mut sub = self.log.subscribe();
        loop {
            let have = self.log.next_seq(stream).unwrap_or(1) - 1;
            if have >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{stream}: {have} of {n} records within {within:?}; status: {:?}",
                self.status.snapshot()
            );
            let _ = tokio::time::timeout(Duration::from_millis(100), sub.changed()).await;
        }
    }

    /// Waits until a component's status satisfies `f`.
    pub async fn wait_status(
        &self,
        name: &str,
        within: Duration,
        f: impl Fn(&edge_core::status::ComponentStatus) -> bool,
    ) {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(s) = self.status.get(name)
                && f(&s)
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: status condition not met within {within:?}: {:?}",
                self.status.get(name)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// A socat PTY pair: `a` and `b` are symlinks to the two ends. Dropping it kills socat (the
/// "unplug").
pub struct PtyPair {
    pub a: PathBuf,
    pub b: PathBuf,
    child: Child,
}

impl PtyPair {
    pub async fn new(dir: &Path, name: &str) -> PtyPair {
        let a = dir.join(format!("{name}-a"));
        let b = dir.join(format!("{name}-b"));
        Self::at(a, b).await
    }

    pub async fn at(a: PathBuf, b: PathBuf) -> PtyPair {
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        let child = Command::new("socat")
            .arg("-d")
            .arg("-d")
            .arg(format!("pty,raw,echo=0,link={}", a.display()))
            .arg(format!("pty,raw,echo=0,link={}", b.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("socat is installed (scripts/install-deps.sh)");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !(a.exists() && b.exists()) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "socat created no PTYs"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        PtyPair { a, b, child }
    }

    /// Unplugs the device: socat exits and both PTYs disappear.
    pub async fn unplug(mut self) -> (PathBuf, PathBuf) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while self.a.exists() || self.b.exists() {
            assert!(tokio::time::Instant::now() < deadline, "PTYs still present");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (self.a.clone(), self.b.clone())
    }
}

/// Opens the far end of a PTY pair for the test to play the device (or the POS).
pub fn open_end(path: &Path) -> tokio_serial::SerialStream {
    let builder = tokio_serial::new(path.to_string_lossy(), 9600);
    let mut port = tokio_serial::SerialStream::open(&builder).expect("open PTY end");
    // Tests open the far end while the driver holds its end exclusively: the far end is a
    // different device, but keep it non-exclusive anyway.
    let _ = port.set_exclusive(false);
    port
}

/// Plays a scale: answers each request with the next scripted answer (`None` = stays silent);
/// the last entry repeats.
pub async fn fake_scale(
    path: std::path::PathBuf,
    request: &'static [u8],
    script: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
    requests: Arc<Mutex<usize>>,
) {
    fake_scale_on(open_end(&path), request, script, requests).await
}

/// [`fake_scale`] on a far end the test opened already (so that the scale is there before the
/// driver's first poll).
pub async fn fake_scale_on(
    mut port: tokio_serial::SerialStream,
    request: &'static [u8],
    script: Arc<Mutex<Vec<Option<Vec<u8>>>>>,
    requests: Arc<Mutex<usize>>,
) {
    let mut buf = [0u8; 64];
    let mut pending = Vec::new();
    loop {
        let n = match port.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        pending.extend_from_slice(&buf[..n]);
        while let Some(pos) = pending.windows(request.len()).position(|w| w == request) {
            pending.drain(..pos + request.len());
            *requests.lock().unwrap() += 1;
            let answer = {
                let mut s = script.lock().unwrap();
                if s.len() > 1 {
                    s.remove(0)
                } else {
                    s[0].clone()
                }
            };
            if let Some(a) = answer
                && port.write_all(&a).await.is_err()
            {
                return;
            }
        }
    }
}

pub async fn wait_requests(requests: &Arc<Mutex<usize>>, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while *requests.lock().unwrap() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "scale polled {n} times"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
