//! The real agent as a child process: start with a config, wait for `/readyz`, read `/status`,
//! SIGTERM or kill -9 it, and inspect its log afterwards (read-only, as the CLI does).

use crate::free_port;
use edge_core::Record;
use edge_core::log::ReadLimits;
use edge_sync::log::{LogConfig, LogInspector};
use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Path of the agent binary built for this test crate.
#[macro_export]
macro_rules! agent_bin {
    () => {
        std::path::PathBuf::from(env!("CARGO_BIN_EXE_edge-agent-e2e"))
    };
}

pub struct Agent {
    pub bin: PathBuf,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub http_port: u16,
    /// The agent's data directory (inside `dir` unless the test chose one).
    data: PathBuf,
    child: Option<Child>,
    starts: u32,
}

/// The common part of a test config: store id, data dir, MQTT broker, HTTP port. Tests append
/// their own sections (ingress rules, drivers, ...) as TOML text.
pub fn base_config(data_dir: &Path, mqtt_port: u16, http_port: u16) -> String {
    format!(
        r#"[agent]
store_id = "test-store"
data_dir = "{}"
health_interval = "0s"
log_level = "info,edge_sync=debug"

[log]
min_free_disk = "0 B"
integrity_check = "off"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
client_id = "edge-agent-{{store}}"
reconnect_min = "100ms"
reconnect_max = "1s"

[http]
listen = "127.0.0.1:{http_port}"
"#,
        data_dir.display()
    )
}

impl Agent {
    /// Writes `config` (with `{data_dir}` and `{http_port}` replaced) and starts the agent.
    pub fn start(bin: PathBuf, config: &str) -> Agent {
        Self::start_on(bin, config, None)
    }

    /// [`Agent::start`] with the data directory at `data_dir` (e.g. on a small filesystem).
    pub fn start_on(bin: PathBuf, config: &str, data_dir: Option<&Path>) -> Agent {
        let mut a = Self::configure_on(bin, config, data_dir);
        a.spawn();
        a
    }

    /// Like [`Agent::start`] without starting it: for tests that prepare the data directory
    /// (mount a filesystem on it, say) before the first [`Agent::spawn`].
    pub fn configure(bin: PathBuf, config: &str) -> Agent {
        Self::configure_on(bin, config, None)
    }

    /// [`Agent::configure`] with the data directory at `data_dir`.
    pub fn configure_on(bin: PathBuf, config: &str, data_dir: Option<&Path>) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let http_port = free_port();
        let data = data_dir.map_or_else(|| dir.path().join("data"), Path::to_path_buf);
        let text = config
            .replace("{data_dir}", &data.display().to_string())
            .replace("{http_port}", &http_port.to_string());
        let path = dir.path().join("config.toml");
        std::fs::write(&path, text).expect("write config");
        Agent {
            bin,
            dir,
            config: path,
            http_port,
            data,
            child: None,
            starts: 0,
        }
    }

    /// Standard config for a broker on `mqtt_port` plus `extra` TOML.
    pub fn start_with(bin: PathBuf, mqtt_port: u16, extra: &str) -> Agent {
        let cfg = format!(
            "{}\n{extra}",
            base_config(Path::new("{data_dir}"), mqtt_port, 0).replace(
                "listen = \"127.0.0.1:0\"",
                "listen = \"127.0.0.1:{http_port}\""
            )
        );
        Self::start(bin, &cfg)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.data.clone()
    }

    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "agent already running");
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("agent.log"))
            .expect("agent log");
        let child = Command::new(&self.bin)
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the agent");
        self.child = Some(child);
        self.wait_ready();
    }

    pub fn wait_ready(&mut self) {
        let port = self.http_port;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if http_get(port, "/readyz").is_some_and(|(code, _)| code == 200) {
                return;
            }
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(st)) = c.try_wait()
            {
                panic!(
                    "the agent exited during start-up ({st}); its log:\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "agent not ready after 20 s; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// kill -9: no chance to flush, ack or close anything.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait; returns the exit status and how long the stop took.
    pub fn sigterm(&mut self) -> (ExitStatus, Duration) {
        let mut c = self.child.take().expect("agent running");
        let t0 = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(c.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .expect("signal");
        let st = c.wait().expect("wait");
        (st, t0.elapsed())
    }

    pub fn status(&self) -> serde_json::Value {
        let (code, body) = http_get(self.http_port, "/status").expect("status answers");
        assert_eq!(code, 200, "status: {body}");
        serde_json::from_str(&body).expect("status is JSON")
    }

    pub fn metrics(&self) -> String {
        http_get(self.http_port, "/metrics")
            .map(|(_, b)| b)
            .unwrap_or_default()
    }

    /// Value of a Prometheus sample (sum over label sets matching `selector`, e.g.
    /// `edge_mqtt_deadletters_total{reason="not_json"}` or a bare name).
    pub fn metric(&self, selector: &str) -> f64 {
        let m = self.metrics();
        m.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| {
                if selector.contains('{') {
                    let (name, labels) = selector.split_once('{').unwrap_or((selector, ""));
                    let labels = labels.trim_end_matches('}');
                    l.starts_with(name) && labels.split(',').all(|kv| l.contains(kv))
                } else {
                    l.split(['{', ' ']).next() == Some(selector)
                }
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    pub fn starts(&self) -> u32 {
        self.starts
    }

    /// Reads a whole stream from the agent's log (works while it runs or after it stopped).
    pub fn read_stream(&self, stream: &str) -> Vec<Record> {
        read_stream(&self.data_dir(), stream)
    }

    /// Records per stream, from the database.
    pub fn count(&self, stream: &str) -> u64 {
        let Ok(i) = LogInspector::open(&self.data_dir(), LogConfig::default()) else {
            return 0;
        };
        i.streams()
            .ok()
            .and_then(|s| s.into_iter().find(|s| s.name == stream))
            .map_or(0, |s| s.records)
    }

    /// Runs a CLI command of the agent binary (e.g. `["status", "--json"]`) with this config.
    pub fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(&self.bin)
            .args(args)
            .env("EDGE_AGENT_CONFIG", &self.config)
            .output()
            .expect("run the CLI")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            eprintln!("---- agent log ----\n{}", self.log());
        }
    }
}

pub fn read_stream(data_dir: &Path, stream: &str) -> Vec<Record> {
    let Ok(i) = LogInspector::open(data_dir, LogConfig::default()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let Ok(b) = i.read(
            stream,
            from,
            ReadLimits {
                max_records: 10_000,
                max_bytes: 16 << 20,
            },
        ) else {
            return out;
        };
        if b.next_seq <= from {
            return out;
        }
        from = b.next_seq;
        out.extend(b.records);
    }
}

/// Event ids of the records, with how often each occurs.
pub fn event_id_counts(records: &[Record]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in records {
        if let Some(id) = &r.event.event_id {
            *m.entry(id.clone()).or_insert(0) += 1;
        }
    }
    m
}

/// Minimal HTTP/1.1 GET on loopback: (status code, body).
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut s = std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_millis(500),
    )
    .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).to_string();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// Waits until the stream holds at least `n` records.
pub fn wait_records(agent: &Agent, stream: &str, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while agent.count(stream) < n {
        if Instant::now() >= deadline {
            let m = agent.metrics();
            let mqtt: Vec<&str> = m.lines().filter(|l| l.starts_with("edge_mqtt")).collect();
            panic!(
                "timed out after {timeout:?} waiting for {n} records in {stream}: {} stored\nmetrics:\n{}\nstatus: {}",
                agent.count(stream),
                mqtt.join("\n"),
                crate::agent::http_get(agent.http_port, "/status")
                    .map(|x| x.1)
                    .unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}
