//! The TCP 9100 pass-through proxy with real sockets (and a serial printer on a socat PTY): every
//! byte reaches the printer unchanged, status replies and ASB reach the POS, a receipt's cut is
//! forwarded only after its records are durable, and printing goes on when storing cannot.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns
mod common;

use common::{Harness, PtyPair, open_end};
use edge_core::State;
use edge_core::log::Log;
use edge_drivers::Driver as _;
use edge_drivers::escpos::status::PROBE_REQUEST;
use edge_drivers::escpos::{CodePage, Token, Tokenizer, tokenizer::RealTime};
use edge_drivers::printer::{PrinterProxyConfig, PrinterUpstream, ReceiptOptions, build_proxy};
use edge_drivers::receipt::TemplateConfig;
use edge_drivers::serial::SerialConfig;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(20);
const ASB: [u8; 4] = [0x14, 0x00, 0x00, 0x0F];

/// What the fake printer saw, and the status it reports.
struct Printed {
    /// The bytes of each connection, in the order they were accepted.
    conns: Vec<Vec<u8>>,
    cuts: usize,
    /// Cuts that arrived before the receipt they end was in the local log.
    cuts_before_commit: usize,
    /// The replies to DLE EOT 1 to 4 (a healthy printer: `0x12` each, as the tests' POS expects).
    status: [u8; 4],
}

impl Default for Printed {
    fn default() -> Self {
        Printed {
            conns: Vec::new(),
            cuts: 0,
            cuts_before_commit: 0,
            status: [0x12; 4],
        }
    }
}

impl Printed {
    /// What the POS connections printed: every connection but the proxy's status probes.
    fn bytes(&self) -> Vec<u8> {
        self.conns
            .iter()
            .filter(|c| c.as_slice() != PROBE_REQUEST)
            .flatten()
            .copied()
            .collect()
    }

    fn probes(&self) -> usize {
        self.conns
            .iter()
            .filter(|c| c.as_slice() == PROBE_REQUEST)
            .count()
    }
}

/// Plays an ESC/POS printer on one connection: answers DLE EOT n with its status byte n and GS r
/// with 0, sends an ASB message when ASB is enabled (GS a), and checks at every cut that the proxy
/// already stored the receipt.
async fn printer<S: AsyncRead + AsyncWrite + Unpin>(
    mut io: S,
    seen: Arc<Mutex<Printed>>,
    log: Option<Arc<edge_sync::log::SqliteLog>>,
) {
    let conn = {
        let mut s = seen.lock().unwrap();
        s.conns.push(Vec::new());
        s.conns.len() - 1
    };
    let mut tok = Tokenizer::new(CodePage::DEFAULT);
    let mut buf = vec![0u8; 4096];
    loop {
        let n = match io.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let status = seen.lock().unwrap().status;
        let mut replies = Vec::new();
        let mut cuts = 0;
        tok.push(&buf[..n], |t, _| match t {
            Token::RealTime(RealTime::StatusRequest(k @ 1..=4)) => {
                replies.push(status[usize::from(k) - 1])
            }
            Token::RealTime(RealTime::StatusRequest(_)) => replies.push(0x12),
            Token::StatusRequest { command: b'r', .. } => replies.push(0x00),
            Token::Setting => {}
            Token::Cut { .. } => cuts += 1,
            _ => {}
        });
        if buf[..n].windows(2).any(|w| w == b"\x1da") {
            replies.extend_from_slice(&ASB);
        }
        {
            let mut s = seen.lock().unwrap();
            s.conns[conn].extend_from_slice(&buf[..n]);
            s.cuts += cuts;
            if let Some(log) = &log {
                let stored = log.next_seq("pos.receipts").unwrap_or(1) - 1;
                if cuts > 0 && (stored as usize) < s.cuts {
                    s.cuts_before_commit += 1;
                }
            }
        }
        if !replies.is_empty() && io.write_all(&replies).await.is_err() {
            return;
        }
    }
}

fn proxy_config(upstream: PrinterUpstream) -> PrinterProxyConfig {
    PrinterProxyConfig {
        name: "proxy".into(),
        lane: "3".into(),
        listen: "127.0.0.1:0".into(),
        printer: upstream,
        connect_timeout_ms: 2000,
        store_timeout_ms: 2000,
        allow: Vec::new(),
        idle_timeout_ms: 30_000,
        // Only the probe at start, unless a test asks for more.
        probe_interval_ms: 3_600_000,
        receipt: ReceiptOptions::default(),
        template: TemplateConfig::default(),
        deadletter_repeat_interval_ms: 60_000,
    }
}

async fn proxy_addr(h: &Harness) -> String {
    h.wait_status("proxy", T, |s| s.fields.contains_key("listen"))
        .await;
    h.status.get("proxy").unwrap().fields["listen"]
        .as_str()
        .unwrap()
        .to_string()
}

async fn wait_printed(seen: &Arc<Mutex<Printed>>, n: usize) {
    let deadline = tokio::time::Instant::now() + T;
    while seen.lock().unwrap().bytes().len() < n {
        assert!(
            tokio::time::Instant::now() < deadline,
            "printer got {} of {n} bytes",
            seen.lock().unwrap().bytes().len()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn read_exactly(s: &mut TcpStream, n: usize) -> Vec<u8> {
    let mut got = vec![0u8; n];
    tokio::time::timeout(T, s.read_exact(&mut got))
        .await
        .expect("replies within the deadline")
        .expect("replies");
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_forwards_every_byte_relays_status_and_stores_baskets() {
    let h = Harness::new();
    let seen = Arc::new(Mutex::new(Printed::default()));
    let printer_addr = network_printer_with(seen.clone(), Some(h.log.clone())).await;
    let cfg = proxy_config(PrinterUpstream {
        tcp: Some(printer_addr),
        serial: None,
    });
    let task = tokio::spawn(build_proxy(cfg, h.ctx("proxy", "printer_proxy")).unwrap());
    let addr = proxy_addr(&h).await;
    let (bytes, baskets) = common::cj_fixture();
    let mut pos = TcpStream::connect(&addr).await.unwrap();
    // Enable ASB, ask for the status the way a POS does before printing.
    pos.write_all(b"\x1da\xff\x10\x04\x01").await.unwrap();
    let first = read_exactly(&mut pos, 5).await;
    assert!(
        first.contains(&0x12) && first.windows(4).any(|w| w == ASB),
        "{first:?}"
    );
    let mut sent = b"\x1da\xff\x10\x04\x01".to_vec();
    for chunk in bytes.chunks(1000) {
        pos.write_all(chunk).await.unwrap();
        sent.extend_from_slice(chunk);
    }
    pos.write_all(b"\x1dr\x01").await.unwrap();
    sent.extend_from_slice(b"\x1dr\x01");
    // One DLE EOT per fixture receipt plus the GS r: every reply reaches the POS.
    let replies = read_exactly(&mut pos, baskets.len() + 1).await;
    assert_eq!(
        replies.iter().filter(|&&b| b == 0x12).count(),
        baskets.len()
    );
    assert_eq!(*replies.last().unwrap(), 0x00, "GS r answer");
    wait_printed(&seen, sent.len()).await;
    drop(pos);
    {
        let s = seen.lock().unwrap();
        assert!(s.bytes() == sent, "the printer got every byte unchanged");
        assert_eq!(s.cuts, baskets.len());
        assert_eq!(
            s.cuts_before_commit, 0,
            "a cut reached the printer before its receipt was durable"
        );
    }
    h.wait_for("pos.transactions", baskets.len() as u64, T)
        .await;
    let txs = h.payloads("pos.transactions").await;
    for (tx, b) in txs.iter().zip(&baskets) {
        common::assert_transaction_matches(tx, b);
    }
    assert_eq!(h.status.get("proxy").unwrap().state, State::Up);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

const SALE: &[u8] = b"\x1b@BREAD                      2.49\nTOTAL                      2.49\nVISA                       2.49\nTRANS# 77\n\x10\x04\x01\x1dV\x00";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_still_prints_when_the_log_cannot_store() {
    let h = Harness::new();
    let seen = Arc::new(Mutex::new(Printed::default()));
    let printer_addr = network_printer(seen.clone()).await;
    let cfg = proxy_config(PrinterUpstream {
        tcp: Some(printer_addr),
        serial: None,
    });
    let task = tokio::spawn(build_proxy(cfg, h.ctx("proxy", "printer_proxy")).unwrap());
    let addr = proxy_addr(&h).await;
    h.log.close().await.unwrap();
    let mut pos = TcpStream::connect(&addr).await.unwrap();
    pos.write_all(SALE).await.unwrap();
    assert_eq!(read_exactly(&mut pos, 1).await, vec![0x12]);
    wait_printed(&seen, SALE.len()).await;
    assert_eq!(seen.lock().unwrap().bytes(), SALE);
    h.wait_status("proxy", T, |s| {
        s.fields.get("forwarded_unstored").and_then(|v| v.as_u64()) >= Some(1)
            || s.state == State::Degraded
    })
    .await;
    drop(pos);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_printer_is_reported_and_printing_resumes() {
    let h = Harness::new();
    // A port with nothing listening (yet).
    let probe = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let printer_addr = probe.local_addr().unwrap();
    drop(probe);
    let cfg = proxy_config(PrinterUpstream {
        tcp: Some(printer_addr.to_string()),
        serial: None,
    });
    let task = tokio::spawn(build_proxy(cfg, h.ctx("proxy", "printer_proxy")).unwrap());
    let addr = proxy_addr(&h).await;
    let mut pos = TcpStream::connect(&addr).await.unwrap();
    pos.write_all(SALE).await.unwrap();
    // The POS sees the printer offline: its connection is closed.
    let mut b = [0u8; 1];
    let r = tokio::time::timeout(T, pos.read(&mut b)).await.unwrap();
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
    h.wait_status("proxy", T, |s| s.state == State::Down).await;
    assert!(
        h.status
            .get("proxy")
            .unwrap()
            .detail
            .contains(&printer_addr.to_string())
    );
    // The printer comes back.
    let printer_l = TcpListener::bind(printer_addr).await.unwrap();
    let seen = Arc::new(Mutex::new(Printed::default()));
    let seen2 = seen.clone();
    tokio::spawn(async move {
        let (s, _) = printer_l.accept().await.unwrap();
        printer(s, seen2, None).await;
    });
    let mut pos = TcpStream::connect(&addr).await.unwrap();
    pos.write_all(SALE).await.unwrap();
    assert_eq!(read_exactly(&mut pos, 1).await, vec![0x12]);
    wait_printed(&seen, SALE.len()).await;
    h.wait_status("proxy", T, |s| s.state == State::Up).await;
    h.wait_for("pos.transactions", 1, T).await;
    let health = h.payloads("agent.health").await;
    let states: Vec<&str> = health
        .iter()
        .map(|v| v["state"].as_str().unwrap())
        .collect();
    assert_eq!(states, vec!["down", "up"]);
    drop(pos);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_to_a_serial_printer_over_a_pty() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "lpt").await;
    let seen = Arc::new(Mutex::new(Printed::default()));
    let far = open_end(&pty.b);
    let (seen2, log2) = (seen.clone(), h.log.clone());
    tokio::spawn(async move { printer(far, seen2, Some(log2)).await });
    let cfg = proxy_config(PrinterUpstream {
        tcp: None,
        serial: Some(SerialConfig::new(pty.a.to_string_lossy())),
    });
    let task = tokio::spawn(build_proxy(cfg, h.ctx("proxy", "printer_proxy")).unwrap());
    let addr = proxy_addr(&h).await;
    for round in 0..2 {
        // Two POS connections in turn share the one serial port.
        let mut pos = TcpStream::connect(&addr).await.unwrap();
        pos.write_all(SALE).await.unwrap();
        assert_eq!(read_exactly(&mut pos, 1).await, vec![0x12], "round {round}");
        wait_printed(&seen, SALE.len() * (round + 1)).await;
    }
    h.wait_for("pos.transactions", 1, T).await;
    {
        let s = seen.lock().unwrap();
        assert_eq!(s.bytes(), [SALE, SALE].concat());
        assert_eq!(s.cuts_before_commit, 0);
    }
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unplugged_serial_printer_is_reported_and_used_again_after_replug() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "usbprn").await;
    let seen = Arc::new(Mutex::new(Printed::default()));
    let far = open_end(&pty.b);
    let seen2 = seen.clone();
    tokio::spawn(async move { printer(far, seen2, None).await });
    let cfg = proxy_config(PrinterUpstream {
        tcp: None,
        serial: Some(SerialConfig::new(pty.a.to_string_lossy())),
    });
    let task = tokio::spawn(build_proxy(cfg, h.ctx("proxy", "printer_proxy")).unwrap());
    let addr = proxy_addr(&h).await;
    let mut pos = TcpStream::connect(&addr).await.unwrap();
    pos.write_all(SALE).await.unwrap();
    assert_eq!(read_exactly(&mut pos, 1).await, vec![0x12]);
    drop(pos);
    // Unplugged between jobs: the proxy notices on its idle read of the port.
    let (a, b) = pty.unplug().await;
    h.wait_status("proxy", T, |s| s.state == State::Down).await;
    let pty = PtyPair::at(a, b).await;
    let seen = Arc::new(Mutex::new(Printed::default()));
    let far = open_end(&pty.b);
    let seen2 = seen.clone();
    tokio::spawn(async move { printer(far, seen2, None).await });
    // The next job reopens the port.
    let mut pos = TcpStream::connect(&addr).await.unwrap();
    pos.write_all(SALE).await.unwrap();
    assert_eq!(read_exactly(&mut pos, 1).await, vec![0x12]);
    wait_printed(&seen, SALE.len()).await;
    h.wait_status("proxy", T, |s| s.state == State::Up).await;
    drop(pos);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

/// A fake network printer that serves every connection the proxy opens (its probes too).
async fn network_printer(seen: Arc<Mutex<Printed>>) -> String {
    network_printer_with(seen, None).await
}

async fn network_printer_with(
    seen: Arc<Mutex<Printed>>,
    log: Option<Arc<edge_sync::log::SqliteLog>>,
) -> String {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap().to_string();
    serve_printer(l, seen, log);
    addr
}

fn serve_printer(
    l: TcpListener,
    seen: Arc<Mutex<Printed>>,
    log: Option<Arc<edge_sync::log::SqliteLog>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            tokio::spawn(printer(s, seen.clone(), log.clone()));
        }
    })
}

/// Reads until the proxy closes the connection (EOF or reset), within the deadline.
async fn closed_by_proxy(s: &mut TcpStream) {
    let mut b = [0u8; 64];
    let r = tokio::time::timeout(T, s.read(&mut b))
        .await
        .expect("the proxy closes the connection");
    assert!(matches!(r, Ok(0) | Err(_)), "{r:?}");
}

fn status_count(h: &Harness, field: &str) -> u64 {
    h.status
        .get("proxy")
        .unwrap()
        .fields
        .get(field)
        .and_then(|v| v.as_u64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_pos_connection_waits_for_the_served_one_and_a_third_is_refused() {
    let h = Harness::new();
    let seen = Arc::new(Mutex::new(Printed::default()));
    let cfg = PrinterProxyConfig {
        idle_timeout_ms: 600_000,
        ..proxy_config(PrinterUpstream {
            tcp: Some(network_printer(seen.clone()).await),
            serial: None,
        })
    };
    let task = tokio::spawn(build_proxy(cfg, h.ctx("proxy", "printer_proxy")).unwrap());
    let addr = proxy_addr(&h).await;
    // The first POS is served: its status request is answered through the proxy.
    let mut first = TcpStream::connect(&addr).await.unwrap();
    first.write_all(b"\x10\x04\x01").await.unwrap();
    assert_eq!(read_exactly(&mut first, 1).await, vec![0x12]);
    // While the first stays connected (and idle), a second waits its turn...
    let mut second = TcpStream::connect(&addr).await.unwrap();
    second.write_all(SALE).await.unwrap();
    h.wait_status("proxy", T, |s| {
        s.fields.get("pos_waiting").and_then(|v| v.as_u64()) == Some(1)
    })
    .await;
    // ...and a third is closed at once, not left in the backlog.
    let mut third = TcpStream::connect(&addr).await.unwrap();
    // The proxy may have closed it already; then the write fails, which is the same answer.
    third.write_all(SALE).await.ok();
    closed_by_proxy(&mut third).await;
    h.wait_status("proxy", T, |s| s.fields.contains_key("refused_busy"))
        .await;
    assert_eq!(status_count(&h, "refused_busy"), 1);
    assert_eq!(
        seen.lock().unwrap().bytes().len(),
        3,
        "only the first printed so far"
    );
    // The first goes; the second's sale is printed and answered.
    drop(first);
    assert_eq!(read_exactly(&mut second, 1).await, vec![0x12]);
    wait_printed(&seen, 3 + SALE.len()).await;
    assert_eq!(
        seen.lock().unwrap().bytes(),
        [&b"\x10\x04\x01"[..], SALE].concat()
    );
    h.wait_for("pos.transactions", 1, T).await;
    drop(second);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_pos_connection_is_closed_and_printing_resumes() {
    let h = Harness::new();
    let seen = Arc::new(Mutex::new(Printed::default()));
    let cfg = PrinterProxyConfig {
        idle_timeout_ms: 1_000,
        ..proxy_config(PrinterUpstream {
            tcp: Some(network_printer(seen.clone()).await),
            serial: None,
        })
    };
    let task = tokio::spawn(build_proxy(cfg, h.ctx("proxy", "printer_proxy")).unwrap());
    let addr = proxy_addr(&h).await;
    let mut idle = TcpStream::connect(&addr).await.unwrap();
    idle.write_all(b"\x10\x04\x01").await.unwrap();
    assert_eq!(read_exactly(&mut idle, 1).await, vec![0x12]);
    let quiet_since = std::time::Instant::now();
    closed_by_proxy(&mut idle).await;
    assert!(
        quiet_since.elapsed() >= Duration::from_millis(900),
        "closed after {:?}, before idle_timeout_ms",
        quiet_since.elapsed()
    );
    let mut pos = TcpStream::connect(&addr).await.unwrap();
    pos.write_all(SALE).await.unwrap();
    assert_eq!(read_exactly(&mut pos, 1).await, vec![0x12]);
    h.wait_for("pos.transactions", 1, T).await;
    drop(pos);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_allowed_pos_addresses_may_print() {
    let h = Harness::new();
    let seen = Arc::new(Mutex::new(Printed::default()));
    let printer_addr = network_printer(seen.clone()).await;
    let cfg = PrinterProxyConfig {
        allow: vec!["10.0.3.21".into()],
        ..proxy_config(PrinterUpstream {
            tcp: Some(printer_addr.clone()),
            serial: None,
        })
    };
    let task = tokio::spawn(build_proxy(cfg, h.ctx("proxy", "printer_proxy")).unwrap());
    let addr = proxy_addr(&h).await;
    let mut pos = TcpStream::connect(&addr).await.unwrap();
    // The proxy may have closed it already; then the write fails, which is the same answer.
    pos.write_all(SALE).await.ok();
    closed_by_proxy(&mut pos).await;
    h.wait_status("proxy", T, |s| s.fields.contains_key("refused_not_allowed"))
        .await;
    assert_eq!(status_count(&h, "refused_not_allowed"), 1);
    assert!(
        seen.lock().unwrap().bytes().is_empty(),
        "a refused POS printed"
    );
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();

    // The same POS, allowed (an IPv4 address also matches its IPv4-mapped IPv6 form).
    let h = Harness::new();
    let cfg = PrinterProxyConfig {
        allow: vec!["10.0.3.21".into(), "127.0.0.1".into()],
        ..proxy_config(PrinterUpstream {
            tcp: Some(printer_addr),
            serial: None,
        })
    };
    assert!(cfg.allows("::ffff:127.0.0.1".parse().unwrap()));
    assert!(!cfg.allows("10.0.3.22".parse().unwrap()));
    let task = tokio::spawn(build_proxy(cfg, h.ctx("proxy", "printer_proxy")).unwrap());
    let addr = proxy_addr(&h).await;
    let mut pos = TcpStream::connect(&addr).await.unwrap();
    pos.write_all(SALE).await.unwrap();
    assert_eq!(read_exactly(&mut pos, 1).await, vec![0x12]);
    drop(pos);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

#[test]
fn allow_list_and_idle_timeout_are_validated() {
    let cfg = PrinterProxyConfig {
        allow: vec!["10.0.3.21".into(), "lane-4".into()],
        idle_timeout_ms: 10,
        probe_interval_ms: 10,
        ..proxy_config(PrinterUpstream {
            tcp: Some("192.0.2.10:9100".into()),
            serial: None,
        })
    };
    let mut p = edge_core::config::Problems::new();
    cfg.validate("drivers[0]", &mut p);
    let text = p.to_string();
    assert!(text.contains("drivers[0].allow[1]: \"lane-4\""), "{text}");
    assert!(text.contains("drivers[0].idle_timeout_ms:"), "{text}");
    assert!(text.contains("drivers[0].probe_interval_ms:"), "{text}");
    assert_eq!(p.len(), 3, "{text}");
}

/// The gauges the drivers set, read back by the tests: a process-wide recorder (metrics has one
/// per process), keyed `name{k=v,...}` with the labels in the order they were given.
mod gauges {
    use metrics::{Counter, Gauge, GaugeFn, Histogram, Key, KeyName, Metadata, SharedString, Unit};
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex, OnceLock};

    type Values = Arc<Mutex<HashMap<String, f64>>>;

    struct Slot(Values, String);

    impl GaugeFn for Slot {
        fn increment(&self, v: f64) {
            *self.0.lock().unwrap().entry(self.1.clone()).or_default() += v;
        }
        fn decrement(&self, v: f64) {
            *self.0.lock().unwrap().entry(self.1.clone()).or_default() -= v;
        }
        fn set(&self, v: f64) {
            self.0.lock().unwrap().insert(self.1.clone(), v);
        }
    }

    struct Recorder(Values);

    impl metrics::Recorder for Recorder {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, key: &Key, _: &Metadata<'_>) -> Gauge {
            let labels: Vec<String> = key
                .labels()
                .map(|l| format!("{}={}", l.key(), l.value()))
                .collect();
            let id = format!("{}{{{}}}", key.name(), labels.join(","));
            Gauge::from_arc(Arc::new(Slot(self.0.clone(), id)))
        }
        fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
            Histogram::noop()
        }
    }

    fn values() -> &'static Values {
        static V: OnceLock<Values> = OnceLock::new();
        V.get_or_init(|| {
            let v = Values::default();
            metrics::set_global_recorder(Recorder(v.clone()))
                .expect("one recorder per test binary");
            v
        })
    }

    /// Installs the recorder (before the driver starts, so its gauges are registered here).
    pub fn install() {
        values();
    }

    /// `edge_printer_fault{driver,lane,fault}`.
    pub fn printer_fault(driver: &str, fault: &str) -> Option<f64> {
        let id = format!("edge_printer_fault{{driver={driver},lane=3,fault={fault}}}");
        values().lock().unwrap().get(&id).copied()
    }
}

async fn wait_gauge(driver: &str, fault: &str, want: f64) {
    let deadline = tokio::time::Instant::now() + T;
    while gauges::printer_fault(driver, fault) != Some(want) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "edge_printer_fault{{driver={driver},fault={fault}}} is {:?}, not {want}",
            gauges::printer_fault(driver, fault)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn addr_of(h: &Harness, name: &str) -> String {
    h.wait_status(name, T, |s| s.fields.contains_key("listen"))
        .await;
    h.status.get(name).unwrap().fields["listen"]
        .as_str()
        .unwrap()
        .to_string()
}

fn faults_field(h: &Harness, name: &str) -> Vec<String> {
    h.status.get(name).unwrap().fields["faults"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

/// The printer's `agent.device` records: (state, faults, appeared, cleared).
async fn device_records(h: &Harness) -> Vec<(String, Vec<String>, Vec<String>, Vec<String>)> {
    let list = |v: &serde_json::Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().map(|x| x.as_str().unwrap().to_string()).collect())
            .unwrap_or_default()
    };
    h.payloads("agent.health")
        .await
        .iter()
        .filter(|v| v["schema"] == "agent.device/1")
        .map(|v| {
            (
                v["state"].as_str().unwrap().to_string(),
                list(&v["faults"]),
                list(&v["faults_appeared"]),
                list(&v["faults_cleared"]),
            )
        })
        .collect()
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

/// Issue 11 item 5: the POS asks for the status of a printer whose cover is open; the replies
/// pass through unchanged, and the agent's status, gauge and records show the fault and then its
/// clearing when the cover is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cover_open_in_the_replies_the_pos_asks_for_shows_and_clears() {
    gauges::install();
    let h = Harness::new();
    let seen = Arc::new(Mutex::new(Printed::default()));
    let cfg = PrinterProxyConfig {
        name: "lane3-cover".into(),
        ..proxy_config(PrinterUpstream {
            tcp: Some(network_printer(seen.clone()).await),
            serial: None,
        })
    };
    let task = tokio::spawn(build_proxy(cfg, h.ctx("lane3-cover", "printer_proxy")).unwrap());
    let addr = addr_of(&h, "lane3-cover").await;
    // The first probe found a healthy printer: up, and every fault's gauge at 0.
    h.wait_status("lane3-cover", T, |s| s.state == State::Up)
        .await;
    wait_gauge("lane3-cover", "cover_open", 0.0).await;
    // The cover opens: offline (DLE EOT 1 = 0x1A), cover open (DLE EOT 2 = 0x16).
    seen.lock().unwrap().status = [0x1A, 0x16, 0x12, 0x12];
    let mut pos = TcpStream::connect(&addr).await.unwrap();
    pos.write_all(b"\x10\x04\x01\x10\x04\x02").await.unwrap();
    assert_eq!(read_exactly(&mut pos, 2).await, vec![0x1A, 0x16]);
    h.wait_status("lane3-cover", T, |s| s.state == State::Degraded)
        .await;
    let s = h.status.get("lane3-cover").unwrap();
    assert!(
        s.detail.starts_with("lane 3 printer: cover open, offline"),
        "{}",
        s.detail
    );
    assert_eq!(
        faults_field(&h, "lane3-cover"),
        strings(&["cover_open", "offline"])
    );
    wait_gauge("lane3-cover", "cover_open", 1.0).await;
    wait_gauge("lane3-cover", "offline", 1.0).await;
    assert_eq!(gauges::printer_fault("lane3-cover", "paper_out"), Some(0.0));
    // The cover is closed; the POS asks again.
    seen.lock().unwrap().status = [0x12; 4];
    pos.write_all(b"\x10\x04\x01\x10\x04\x02").await.unwrap();
    assert_eq!(read_exactly(&mut pos, 2).await, vec![0x12, 0x12]);
    h.wait_status("lane3-cover", T, |s| s.state == State::Up)
        .await;
    assert!(faults_field(&h, "lane3-cover").is_empty());
    wait_gauge("lane3-cover", "cover_open", 0.0).await;
    wait_gauge("lane3-cover", "offline", 0.0).await;
    // The record follows the status change.
    h.wait_for("agent.health", 3, T).await;
    let none: Vec<String> = Vec::new();
    assert_eq!(
        device_records(&h).await,
        vec![
            ("up".to_string(), none.clone(), none.clone(), none.clone()),
            (
                "degraded".to_string(),
                strings(&["cover_open", "offline"]),
                strings(&["cover_open", "offline"]),
                none.clone()
            ),
            (
                "up".to_string(),
                none.clone(),
                none.clone(),
                strings(&["cover_open", "offline"])
            ),
        ]
    );
    drop(pos);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

/// Issue 11 items 5 and 6: the printer runs out of paper while no POS prints; the probe sees it
/// (status, gauge, record), and sees the new roll.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paper_out_with_no_pos_printing_is_seen_by_the_probe_and_clears() {
    gauges::install();
    let h = Harness::new();
    let seen = Arc::new(Mutex::new(Printed::default()));
    let cfg = PrinterProxyConfig {
        name: "lane3-paper".into(),
        probe_interval_ms: 500,
        ..proxy_config(PrinterUpstream {
            tcp: Some(network_printer(seen.clone()).await),
            serial: None,
        })
    };
    let task = tokio::spawn(build_proxy(cfg, h.ctx("lane3-paper", "printer_proxy")).unwrap());
    h.wait_status("lane3-paper", T, |s| s.state == State::Up)
        .await;
    // Out of paper: offline, stopped at paper end, both roll sensors.
    seen.lock().unwrap().status = [0x1A, 0x32, 0x12, 0x7E];
    h.wait_status("lane3-paper", T, |s| s.state == State::Degraded)
        .await;
    let s = h.status.get("lane3-paper").unwrap();
    assert!(
        s.detail.starts_with("lane 3 printer: out of paper"),
        "{}",
        s.detail
    );
    assert_eq!(
        faults_field(&h, "lane3-paper"),
        strings(&["paper_out", "paper_near_end", "offline"])
    );
    wait_gauge("lane3-paper", "paper_out", 1.0).await;
    wait_gauge("lane3-paper", "paper_near_end", 1.0).await;
    // A new roll.
    seen.lock().unwrap().status = [0x12; 4];
    h.wait_status("lane3-paper", T, |s| s.state == State::Up)
        .await;
    wait_gauge("lane3-paper", "paper_out", 0.0).await;
    h.wait_for("agent.health", 3, T).await;
    let none: Vec<String> = Vec::new();
    let out = strings(&["paper_out", "paper_near_end", "offline"]);
    assert_eq!(
        device_records(&h).await,
        vec![
            ("up".to_string(), none.clone(), none.clone(), none.clone()),
            (
                "degraded".to_string(),
                out.clone(),
                out.clone(),
                none.clone()
            ),
            ("up".to_string(), none.clone(), none.clone(), out.clone()),
        ]
    );
    assert!(seen.lock().unwrap().probes() >= 3);
    assert!(seen.lock().unwrap().bytes().is_empty(), "no POS printed");
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

/// Issue 11 item 5: ASB messages the printer pushes to the POS (cover open, then all clear)
/// show and clear the fault.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asb_pushes_report_a_cover_open_and_its_clearing() {
    let h = Harness::new();
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let printer_addr = l.local_addr().unwrap().to_string();
    let closed = Arc::new(tokio::sync::Notify::new());
    let closed2 = closed.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            let closed = closed2.clone();
            tokio::spawn(async move {
                let mut buf = [0u8; 64];
                let Ok(n) = s.read(&mut buf).await else {
                    return;
                };
                if buf[..n] == PROBE_REQUEST {
                    s.write_all(&[0x12; 4]).await.ok();
                    return;
                }
                // The POS enabled ASB (GS a): the first message says the cover is open
                // (offline + cover: 0x38); when it closes, the all-clear message follows.
                assert_eq!(&buf[..n], b"\x1da\xff");
                s.write_all(&[0x38, 0x00, 0x00, 0x00]).await.unwrap();
                closed.notified().await;
                s.write_all(&[0x14, 0x00, 0x00, 0x0F]).await.unwrap();
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 {
                        return;
                    }
                }
            });
        }
    });
    let cfg = PrinterProxyConfig {
        name: "lane3-asb".into(),
        ..proxy_config(PrinterUpstream {
            tcp: Some(printer_addr),
            serial: None,
        })
    };
    let task = tokio::spawn(build_proxy(cfg, h.ctx("lane3-asb", "printer_proxy")).unwrap());
    let addr = addr_of(&h, "lane3-asb").await;
    h.wait_status("lane3-asb", T, |s| s.state == State::Up)
        .await;
    let mut pos = TcpStream::connect(&addr).await.unwrap();
    pos.write_all(b"\x1da\xff").await.unwrap();
    assert_eq!(
        read_exactly(&mut pos, 4).await,
        vec![0x38, 0x00, 0x00, 0x00]
    );
    h.wait_status("lane3-asb", T, |s| s.state == State::Degraded)
        .await;
    assert!(
        h.status
            .get("lane3-asb")
            .unwrap()
            .detail
            .starts_with("lane 3 printer: cover open, offline"),
    );
    closed.notify_one();
    assert_eq!(
        read_exactly(&mut pos, 4).await,
        vec![0x14, 0x00, 0x00, 0x0F]
    );
    h.wait_status("lane3-asb", T, |s| s.state == State::Up)
        .await;
    assert!(faults_field(&h, "lane3-asb").is_empty());
    h.wait_for("agent.health", 3, T).await;
    let states: Vec<String> = device_records(&h).await.into_iter().map(|r| r.0).collect();
    assert_eq!(states, strings(&["up", "degraded", "up"]));
    drop(pos);
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

/// Issue 11 item 6: the printer is killed while no POS prints. The driver goes down within the
/// probe interval (not at the next print job), and up again when the printer returns. The first
/// record is written at start, after the first probe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_printer_killed_while_no_pos_prints_goes_down_and_comes_back() {
    let h = Harness::new();
    let seen = Arc::new(Mutex::new(Printed::default()));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let printer_addr = l.local_addr().unwrap();
    let server = serve_printer(l, seen.clone(), None);
    let cfg = PrinterProxyConfig {
        name: "lane3-killed".into(),
        probe_interval_ms: 500,
        ..proxy_config(PrinterUpstream {
            tcp: Some(printer_addr.to_string()),
            serial: None,
        })
    };
    let task = tokio::spawn(build_proxy(cfg, h.ctx("lane3-killed", "printer_proxy")).unwrap());
    h.wait_status("lane3-killed", T, |s| s.state == State::Up)
        .await;
    h.wait_for("agent.health", 1, T).await;
    assert_eq!(device_records(&h).await[0].0, "up", "recorded at start");
    // Killed: its listener is gone, connections are refused.
    server.abort();
    let _ = server.await;
    let killed = std::time::Instant::now();
    h.wait_status("lane3-killed", T, |s| s.state == State::Down)
        .await;
    // Within a probe interval (500 ms), with a loaded machine's margin; without the probe it
    // would stay up until a POS prints.
    assert!(
        killed.elapsed() < Duration::from_secs(8),
        "down after {:?}",
        killed.elapsed()
    );
    let detail = h.status.get("lane3-killed").unwrap().detail;
    assert!(
        detail.contains(&format!("printer {printer_addr} refused the connection")),
        "{detail}"
    );
    // It comes back on the same address.
    let l = TcpListener::bind(printer_addr).await.unwrap();
    let _server = serve_printer(l, seen.clone(), None);
    h.wait_status("lane3-killed", T, |s| s.state == State::Up)
        .await;
    h.wait_for("agent.health", 3, T).await;
    let states: Vec<String> = device_records(&h).await.into_iter().map(|r| r.0).collect();
    assert_eq!(states, strings(&["up", "down", "up"]));
    assert!(seen.lock().unwrap().bytes().is_empty(), "no POS printed");
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

/// Issue 11 item 6: `bytes` counts every POS connection, and once the POS left the status no
/// longer says it is being forwarded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_are_cumulative_and_the_detail_drops_the_pos_that_left() {
    let h = Harness::new();
    let seen = Arc::new(Mutex::new(Printed::default()));
    let cfg = proxy_config(PrinterUpstream {
        tcp: Some(network_printer(seen.clone()).await),
        serial: None,
    });
    let task = tokio::spawn(build_proxy(cfg, h.ctx("proxy", "printer_proxy")).unwrap());
    let addr = proxy_addr(&h).await;
    for round in 1..=2u64 {
        let mut pos = TcpStream::connect(&addr).await.unwrap();
        pos.write_all(SALE).await.unwrap();
        assert_eq!(read_exactly(&mut pos, 1).await, vec![0x12]);
        h.wait_status("proxy", T, |s| s.detail.contains("forwarding POS"))
            .await;
        drop(pos);
        let want = SALE.len() as u64 * round;
        h.wait_status("proxy", T, |s| {
            s.detail.starts_with("listening on")
                && s.fields.get("bytes").and_then(|v| v.as_u64()) == Some(want)
        })
        .await;
        let s = h.status.get("proxy").unwrap();
        assert_eq!(s.state, State::Up);
        assert!(!s.detail.contains("forwarding POS"), "{}", s.detail);
    }
    // Two receipts (one sale: the same receipt twice is a reprint).
    h.wait_for("pos.receipts", 2, T).await;
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}

/// A POS that sends the same bytes that form no receipt, again and again, writes one dead letter
/// at once and one with the count of the repeats (at the interval, or when the driver stops),
/// not one per receipt; the bytes still reach the printer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pos_repeating_one_refused_receipt_writes_counted_dead_letters() {
    const NOISE: &[u8] = b"\x1b\x01\x1b\x02\x07\x07\x1dV\x00";
    let h = Harness::new();
    let seen = Arc::new(Mutex::new(Printed::default()));
    let cfg = proxy_config(PrinterUpstream {
        tcp: Some(network_printer(seen.clone()).await),
        serial: None,
    });
    let task = tokio::spawn(build_proxy(cfg, h.ctx("proxy", "printer_proxy")).unwrap());
    let addr = proxy_addr(&h).await;
    let mut pos = TcpStream::connect(&addr).await.unwrap();
    for _ in 0..20 {
        pos.write_all(NOISE).await.unwrap();
    }
    wait_printed(&seen, NOISE.len() * 20).await;
    drop(pos);
    h.wait_for("deadletter", 1, T).await;
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
    let dead = h.payloads("deadletter").await;
    let counts: Vec<u64> = dead.iter().map(|d| d["count"].as_u64().unwrap()).collect();
    assert_eq!(counts, vec![1, 19], "{dead:?}");
    assert!(dead.iter().all(|d| d["reason_label"] == "not_a_receipt"));
    assert_eq!(
        dead[1]["original_b64"],
        edge_core::event::base64_encode(NOISE)
    );
}

/// A serial printer between jobs: the ASB messages it pushes (cover open, all clear) show and
/// clear the fault; unplugged, it is down, and the probe opens its port again when it is back,
/// with no POS printing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_serial_printer_between_jobs_reports_asb_faults_and_is_reopened_by_the_probe() {
    let h = Harness::new();
    let pty = PtyPair::new(h.dir.path(), "lpt-asb").await;
    let mut far = open_end(&pty.b);
    let cfg = PrinterProxyConfig {
        probe_interval_ms: 500,
        ..proxy_config(PrinterUpstream {
            tcp: None,
            serial: Some(SerialConfig::new(pty.a.to_string_lossy())),
        })
    };
    let task = tokio::spawn(build_proxy(cfg, h.ctx("proxy", "printer_proxy")).unwrap());
    h.wait_status("proxy", T, |s| s.state == State::Up).await;
    far.write_all(&[0x38, 0x00, 0x00, 0x00]).await.unwrap();
    h.wait_status("proxy", T, |s| s.state == State::Degraded)
        .await;
    assert!(
        h.status
            .get("proxy")
            .unwrap()
            .detail
            .starts_with("lane 3 printer: cover open, offline")
    );
    far.write_all(&[0x14, 0x00, 0x00, 0x0F]).await.unwrap();
    h.wait_status("proxy", T, |s| s.state == State::Up).await;
    assert!(faults_field(&h, "proxy").is_empty());
    drop(far);
    let (a, b) = pty.unplug().await;
    h.wait_status("proxy", T, |s| s.state == State::Down).await;
    let _pty = PtyPair::at(a, b).await;
    h.wait_status("proxy", T, |s| s.state == State::Up).await;
    h.wait_for("agent.health", 5, T).await;
    let states: Vec<String> = device_records(&h).await.into_iter().map(|r| r.0).collect();
    assert_eq!(states, strings(&["up", "degraded", "up", "down", "up"]));
    h.shutdown.stop_all();
    task.await.unwrap().unwrap();
}
