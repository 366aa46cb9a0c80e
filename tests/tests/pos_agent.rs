//! The real agent with POS drivers from its config file: the Complete Journey receipts arrive over a
//! socat PTY (serial tap) and over TCP (printer proxy in front of a network printer), every byte
//! still reaches the printer, and after kill -9 every stored transaction is there exactly once.
#![allow(clippy::unwrap_used)] // test helpers

use edge_tests::agent::{Agent, event_id_counts, wait_records};
use edge_tests::mosquitto::Mosquitto;
use edge_tests::{agent_bin, free_port, require_program, wait_for};
use serde_json::Value;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const T: Duration = Duration::from_secs(60);

fn fixture() -> (Vec<u8>, Vec<Value>) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../drivers/fixtures/cj");
    let bytes = std::fs::read(dir.join("receipts.escpos")).unwrap();
    let meta: Value =
        serde_json::from_slice(&std::fs::read(dir.join("baskets.json")).unwrap()).unwrap();
    (bytes, meta["baskets"].as_array().unwrap().clone())
}

#[test]
fn agent_runs_pos_drivers_and_keeps_every_transaction_once_across_kill_9() {
    let (bytes, baskets) = fixture();
    let broker = Mosquitto::start();
    // The serial line between a POS and its printer, as a PTY pair.
    let ptys = tempfile::tempdir().unwrap();
    let (a, b) = (ptys.path().join("lane3-a"), ptys.path().join("lane3-b"));
    let mut socat = Command::new(require_program("socat", "socat"))
        .args(["-d", "-d"])
        .arg(format!("pty,raw,echo=0,link={}", a.display()))
        .arg(format!("pty,raw,echo=0,link={}", b.display()))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for("socat PTYs", Duration::from_secs(10), || {
        a.exists() && b.exists()
    });
    // A network printer that keeps what it prints, per connection (the proxy's idle status
    // probes come on connections of their own; this printer does not answer them).
    let printer = TcpListener::bind("127.0.0.1:0").unwrap();
    let printer_addr = printer.local_addr().unwrap();
    let printed: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::new()));
    let p2 = printed.clone();
    std::thread::spawn(move || {
        for conn in printer.incoming() {
            let Ok(mut conn) = conn else { return };
            let i = {
                let mut p = p2.lock().unwrap();
                p.push(Vec::new());
                p.len() - 1
            };
            let p3 = p2.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    p3.lock().unwrap()[i].extend_from_slice(&buf[..n]);
                }
            });
        }
    });
    let proxy_port = free_port();
    let drivers = format!(
        r#"
[[drivers]]
type = "escpos_tap"
name = "lane3-printer"
lane = "3"
serial = {{ path = "{}" }}

[[drivers]]
type = "printer_proxy"
name = "lane4-printer"
lane = "4"
listen = "127.0.0.1:{proxy_port}"
printer = {{ tcp = "{printer_addr}" }}
"#,
        a.display()
    );
    let mut agent = Agent::start_with(agent_bin!(), broker.port, &drivers);
    wait_for("both drivers up", T, || {
        let s = agent.status().to_string();
        s.contains("tapping") && s.contains("listening on 127.0.0.1")
    });
    // Lane 3 prints over the serial line, lane 4 over TCP.
    let mut line = std::fs::OpenOptions::new().write(true).open(&b).unwrap();
    for chunk in bytes.chunks(512) {
        line.write_all(chunk).unwrap();
    }
    let mut pos = TcpStream::connect(("127.0.0.1", proxy_port)).unwrap();
    pos.write_all(&bytes).unwrap();
    pos.shutdown(std::net::Shutdown::Write).unwrap();
    wait_records(&agent, "pos.transactions", 2 * baskets.len() as u64, T);
    wait_for("the printer got every byte", T, || {
        printed
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.len() >= bytes.len())
    });
    assert!(
        printed.lock().unwrap().contains(&bytes),
        "the proxy forwards the POS's bytes unchanged on one connection"
    );

    agent.kill9();
    agent.spawn();
    let txs = agent.read_stream("pos.transactions");
    assert_eq!(txs.len(), 2 * baskets.len());
    assert!(
        event_id_counts(&txs).values().all(|&n| n == 1),
        "no duplicates"
    );
    for lane in ["3", "4"] {
        let got: Vec<Value> = txs
            .iter()
            .map(|r| serde_json::from_slice::<Value>(&r.event.payload).unwrap())
            .filter(|v| v["lane"] == lane)
            .collect();
        assert_eq!(got.len(), baskets.len(), "lane {lane}");
        for (tx, b) in got.iter().zip(&baskets) {
            assert_eq!(tx["receipt_no"], b["receipt_no"]);
            assert_eq!(tx["total_minor"], b["total_minor"]);
            assert_eq!(
                tx["lines"].as_array().unwrap().len(),
                b["lines"].as_array().unwrap().len()
            );
            assert_eq!(tx["totals_consistent"], true);
        }
    }
    assert_eq!(agent.read_stream("pos.receipts").len(), 2 * baskets.len());
    // After the restart the tap is back on its port.
    wait_for("the tap reopened its port", T, || {
        agent.status().to_string().contains("tapping")
    });
    let _ = socat.kill();
    let _ = socat.wait();
}
