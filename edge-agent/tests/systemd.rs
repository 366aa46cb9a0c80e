//! The real binary under a stand-in service manager: a Unix datagram socket of our own as
//! `NOTIFY_SOCKET`, a watchdog interval in `WATCHDOG_USEC`, then SIGTERM. Checks what systemd
//! relies on: `READY=1` only once the agent serves `/readyz`, a `STATUS=` line, watchdog pings,
//! `STOPPING=1` and a clean exit; and that health and metrics answer meanwhile.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Receives datagrams until one satisfies `want` or the deadline passes; returns all received.
fn recv_until(sock: &UnixDatagram, deadline: Duration, want: impl Fn(&str) -> bool) -> Vec<String> {
    let end = Instant::now() + deadline;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < end {
        sock.set_read_timeout(Some(
            end.saturating_duration_since(Instant::now())
                .max(Duration::from_millis(1)),
        ))
        .expect("a read timeout on the notify socket");
        match sock.recv(&mut buf) {
            Ok(n) => {
                let msg = String::from_utf8_lossy(&buf[..n]).to_string();
                let done = want(&msg);
                got.push(msg);
                if done {
                    break;
                }
            }
            Err(_) => break,
        }
    }
    got
}

#[test]
fn notifies_readiness_status_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let http: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[agent]
store_id = "test-store"
data_dir = "{data}"
log_format = "journald"

[mqtt]
enabled = false

[http]
listen = "{http}"

[[drivers]]
type = "simulated"
name = "lane-1"
lane = "lane-1"
transactions_per_minute = 1200.0
sightings_per_second = 0.0
"#,
            data = dir.path().join("data").display()
        ),
    )
    .unwrap();
    std::fs::create_dir(dir.path().join("data")).unwrap();

    let mut agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &sock_path)
            .env("WATCHDOG_USEC", "600000")
            .env_remove("WATCHDOG_PID")
            .env_remove("JOURNAL_STREAM")
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );

    let msgs = recv_until(&sock, Duration::from_secs(20), |m| m.contains("READY=1"));
    let ready = msgs
        .iter()
        .find(|m| m.lines().any(|l| l == "READY=1"))
        .unwrap_or_else(|| panic!("no READY=1 within 20 s; got {msgs:?}"));
    // READY=1 means the agent takes data: the health endpoint says ready at that moment.
    assert_eq!(
        get(http, "/readyz").map(|r| r.0),
        Some(200),
        "READY=1 was sent before /readyz answered 200"
    );
    let status = ready
        .lines()
        .find_map(|l| l.strip_prefix("STATUS="))
        .unwrap_or_else(|| panic!("READY=1 without a STATUS= line: {ready:?}"));
    assert!(
        status.contains("devices 1/1 up") || status.contains("devices 0/1 up"),
        "{status}"
    );
    assert!(status.contains("backlog"), "{status}");

    // Watchdog pings at a third of WATCHDOG_USEC while the log writer answers.
    let start = Instant::now();
    let mut pings = 0;
    while pings < 3 && start.elapsed() < Duration::from_secs(10) {
        pings += recv_until(&sock, Duration::from_secs(2), |m| m.contains("WATCHDOG=1"))
            .iter()
            .filter(|m| m.lines().any(|l| l == "WATCHDOG=1"))
            .count();
    }
    assert!(
        pings >= 3,
        "{pings} watchdog pings in {:?}",
        start.elapsed()
    );

    // Health and metrics answer while running, with the per-stream and component series.
    assert_eq!(get(http, "/healthz").map(|r| r.0), Some(200));
    let deadline = Instant::now() + Duration::from_secs(10);
    let metrics = loop {
        let (code, body) = get(http, "/metrics").expect("/metrics answers");
        assert_eq!(code, 200);
        if body.contains("edge_log_appended_records_total{stream=\"pos.transactions\"")
            || Instant::now() > deadline
        {
            break body;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    for series in [
        "edge_log_appended_records_total{stream=\"pos.transactions\",class=\"protected\"}",
        "edge_log_commit_seconds_bucket",
        "edge_component_state{component=\"lane-1\",kind=\"simulated\",state=\"up\"} 1",
        "edge_agent_ready 1",
        "edge_log_budget_bytes",
        "edge_fs_free_bytes",
        "edge_watchdog_pings_total",
        "edge_agent_info{version=",
    ] {
        assert!(
            metrics.contains(series),
            "/metrics lacks {series}:\n{metrics}"
        );
    }

    dashboard_uses_only_emitted_metrics(&metrics);

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let msgs = recv_until(&sock, Duration::from_secs(10), |m| m.contains("STOPPING=1"));
    assert!(
        msgs.iter().any(|m| m.lines().any(|l| l == "STOPPING=1")),
        "no STOPPING=1 after SIGTERM: {msgs:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not exit after SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "exit status {status}");

    let mut stderr = String::new();
    agent
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    if std::path::Path::new("/run/systemd/journal/socket").exists() {
        // The journal took the lines; nothing but fallbacks may reach stderr.
        assert!(!stderr.contains("edge-agent ready"), "{stderr}");
    } else {
        // No journald here: the agent says so once and logs to stderr instead.
        assert!(
            stderr.contains("journal socket cannot be opened"),
            "{stderr}"
        );
        assert!(stderr.contains("edge-agent ready"), "{stderr}");
    }
}

#[test]
fn sigterm_right_after_ready_stops_gracefully() {
    // systemd may stop the unit the moment it reported READY=1: the stop must be the graceful one
    // (intake closed, log flushed and closed, exit 0), not the default action of SIGTERM.
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path).unwrap();
    let config = dir.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "[agent]\nstore_id = \"t\"\ndata_dir = \"{}\"\nlog_format = \"text\"\n[mqtt]\nenabled = false\n[http]\nenabled = false\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let mut agent = Agent(
        Command::new(env!("CARGO_BIN_EXE_edge-agent"))
            .args(["run", "--config"])
            .arg(&config)
            .env("NOTIFY_SOCKET", &sock_path)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let msgs = recv_until(&sock, Duration::from_secs(20), |m| m.contains("READY=1"));
    assert!(msgs.iter().any(|m| m.contains("READY=1")), "{msgs:?}");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.0.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = agent.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    agent
        .0
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert!(status.success(), "exit {status}; stderr:\n{stderr}");
    assert!(stderr.contains("local log closed"), "{stderr}");
}

#[test]
fn check_config_accepts_the_packaged_file_and_names_every_problem() {
    // check-config is what the unit's ExecStartPre runs: it must pass on the
    // packaged config and fail with exit 2 and the path of each problem on a broken one.
    let packaged = concat!(env!("CARGO_MANIFEST_DIR"), "/../packaging/deb/config.toml");
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["check-config", packaged])
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[agent]\nstore_id = \"a b\"\n[log]\ncommit_window_ms = 0\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_edge-agent"))
        .args(["check-config"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("agent.store_id") && err.contains("log.commit_window_ms"),
        "{err}"
    );
}

/// The Grafana dashboard shipped in the package queries series by name; a typo there is a blank
/// panel in every store. Each name must be in this scrape, or be one of the series that only
/// appear once their event happened (MQTT is off and nothing failed in this run).
fn dashboard_uses_only_emitted_metrics(scrape: &str) {
    const EVENT_DRIVEN: &[&str] = &[
        // Set by a printer_proxy driver (none in this run's config).
        "edge_printer_fault",
        "edge_mqtt_connected",
        "edge_mqtt_connects_total",
        "edge_mqtt_deadletters_total",
        "edge_log_quarantined_total",
        "edge_log_evicted_total",
        "edge_log_appends_refused_total",
        "edge_log_commit_failures_total",
        "edge_log_gap_records",
        "edge_log_cursor_backlog_records",
        "edge_log_cursor_oldest_unsent_age_seconds",
        "edge_watchdog_probe_failures_total",
        // The Kafka uplink and downlink (a [kafka] section; not configured in this run).
        "edge_uplink_records_total",
        "edge_downlink_records_applied_total",
        "edge_downlink_refused_total",
        "edge_uplink_backlog_records",
        "edge_uplink_oldest_unsent_age_seconds",
        "edge_kafka_client_errors_total",
        "edge_uplink_delivery_errors_total",
        "edge_uplink_aborted_transactions_total",
        "edge_uplink_records_dropped_total",
    ];
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../packaging/grafana/edge-agent.json"
    );
    let dash: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let mut names = std::collections::BTreeSet::new();
    for panel in dash["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(i) = rest.find("edge_") {
                let tail = &rest[i..];
                let end = tail
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(tail.len());
                names.insert(tail[..end].to_string());
                rest = &tail[end..];
            }
        }
    }
    assert!(names.len() > 15, "{names:?}");
    for n in names {
        let base = n.trim_end_matches("_bucket");
        assert!(
            scrape.contains(&format!("{base}{{"))
                || scrape.contains(&format!("{base} "))
                || EVENT_DRIVEN.contains(&base),
            "the dashboard queries {n}, which the agent does not emit"
        );
    }
}
