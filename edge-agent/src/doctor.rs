//! `edge-agent doctor`: checks the things a store install gets wrong, each with the reason and what
//! to do about it.
//!
//! The checks are a plain list ([`checks`]); a component that brings a peer (the Kafka uplink) adds
//! one entry. Every check returns findings and never panics: a check that cannot run says why.
//! Doctor reads the configuration but changes nothing except a scratch file in the data directory
//! (the fsync self-test), which it removes.

use crate::config::AgentConfig;
use bytes::BytesMut;
use rumqttc::mqttbytes::Error as MqttError;
use rumqttc::mqttbytes::v4::{Connect, ConnectReturnCode, Disconnect, Packet};
use serde::Serialize;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Level {
    Ok,
    Info,
    Warn,
    Fail,
}

impl Level {
    fn label(self) -> &'static str {
        match self {
            Level::Ok => "OK",
            Level::Info => "INFO",
            Level::Warn => "WARN",
            Level::Fail => "FAIL",
        }
    }
}

/// One result: what was found and, when it is not OK, what to do.
#[derive(Debug, Clone, Serialize)]
pub struct Finding {
    pub check: &'static str,
    pub level: Level,
    pub summary: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

impl Finding {
    fn new(check: &'static str, level: Level, summary: impl Into<String>) -> Self {
        Finding {
            check,
            level,
            summary: summary.into(),
            advice: None,
        }
    }
    fn advice(mut self, a: impl Into<String>) -> Self {
        self.advice = Some(a.into());
        self
    }
}

/// Knobs of a doctor run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Upper bound of the fsync self-test (it stops earlier after `fsync_samples` writes).
    pub fsync_budget: Duration,
    pub fsync_samples: usize,
    /// Timeout of each network probe.
    pub net_timeout: Duration,
    /// The account the service runs as (device permissions are checked for it).
    pub service_user: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            fsync_budget: Duration::from_secs(3),
            fsync_samples: 200,
            net_timeout: Duration::from_secs(3),
            service_user: "edge-agent".into(),
        }
    }
}

/// One check of the list.
pub struct Check {
    pub name: &'static str,
    pub run: fn(&AgentConfig, &Options) -> Vec<Finding>,
}

/// Every check, in the order they are printed.
pub fn checks() -> Vec<Check> {
    vec![
        Check {
            name: "daemon",
            run: daemon,
        },
        Check {
            name: "data-disk",
            run: data_disk,
        },
        Check {
            name: "mqtt",
            run: mqtt,
        },
        Check {
            name: "kafka",
            run: kafka,
        },
        Check {
            name: "devices",
            run: devices,
        },
        Check {
            name: "clock",
            run: clock,
        },
    ]
}

pub fn run(cfg: &AgentConfig, opts: &Options) -> Vec<Finding> {
    checks().iter().flat_map(|c| (c.run)(cfg, opts)).collect()
}

/// The human form.
pub fn render(findings: &[Finding]) -> String {
    use std::fmt::Write as _;
    let mut o = String::new();
    for f in findings {
        let _ = writeln!(o, "{:<5} {:<10} {}", f.level.label(), f.check, f.summary);
        if let Some(a) = &f.advice {
            let _ = writeln!(o, "{:<16}-> {a}", "");
        }
    }
    let fails = findings.iter().filter(|f| f.level == Level::Fail).count();
    let warns = findings.iter().filter(|f| f.level == Level::Warn).count();
    let _ = writeln!(
        o,
        "\n{}",
        match (fails, warns) {
            (0, 0) => "no problem found".to_string(),
            (0, w) => format!("no problem that stops the agent; {w} warning(s)"),
            (f, w) => format!("{f} problem(s), {w} warning(s)"),
        }
    );
    o
}

// --- daemon -----------------------------------------------------------------------------------

fn daemon(cfg: &AgentConfig, opts: &Options) -> Vec<Finding> {
    const NAME: &str = "daemon";
    if !cfg.http.enabled {
        return vec![Finding::new(
            NAME,
            Level::Info,
            "http.enabled = false: the daemon's health endpoint is off, so doctor cannot ask it",
        )];
    }
    let addr = cfg.http.listen;
    let exposure = cfg.http.exposure_warning().map(|w| {
        Finding::new(NAME, Level::Warn, w).advice(
            "set http.listen = \"127.0.0.1:9464\" unless a scraper on another host needs it, and then firewall the port to that host",
        )
    });
    let mut findings = match crate::cli::http_request(addr, "/readyz", opts.net_timeout) {
        Ok((200, _)) => vec![Finding::new(
            NAME,
            Level::Ok,
            format!("the agent runs and is ready (http://{addr}/readyz)"),
        )],
        Ok((code, body)) => vec![
            Finding::new(
                NAME,
                Level::Warn,
                format!("the agent answers on {addr} but is not ready ({code}: {})", body.trim()),
            )
            .advice("it is starting or stopping; `journalctl -u edge-agent -n 50` shows why"),
        ],
        Err(e) => vec![
            Finding::new(NAME, Level::Warn, format!("no agent answers on {addr}: {e}")).advice(
                "start it with `systemctl start edge-agent`; `systemctl status edge-agent` and `journalctl -u edge-agent` show why it stopped",
            ),
        ],
    };
    findings.extend(exposure);
    findings
}

// --- data disk --------------------------------------------------------------------------------

/// Latency figures of the fsync self-test.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FsyncStats {
    pub samples: usize,
    pub p50: Duration,
    pub p99: Duration,
    pub max: Duration,
}

/// Writes a 4 KiB block and `fdatasync`s it, like one WAL commit, until `samples` writes or
/// `budget` elapsed (at least 5 writes).
pub fn fsync_self_test(
    dir: &Path,
    samples: usize,
    budget: Duration,
) -> std::io::Result<FsyncStats> {
    let path = dir.join(format!(".edge-agent-doctor-{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)?;
        let block = vec![0x5au8; 4096];
        let mut lat = Vec::with_capacity(samples);
        let started = Instant::now();
        while lat.len() < samples.max(5) && (lat.len() < 5 || started.elapsed() < budget) {
            let t = Instant::now();
            f.write_all(&block)?;
            f.sync_data()?;
            lat.push(t.elapsed());
        }
        lat.sort();
        let at = |q: f64| lat[((lat.len() as f64 * q).ceil() as usize).clamp(1, lat.len()) - 1];
        Ok(FsyncStats {
            samples: lat.len(),
            p50: at(0.50),
            p99: at(0.99),
            max: lat[lat.len() - 1],
        })
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// The commit window that fits a disk: one window should cover a typical fsync, so a batch is
/// being filled while the previous one is flushed; bounded to 2..=50 ms (the product's p99 commit
/// target is 15 ms; longer windows only add latency).
pub fn recommended_commit_window_ms(s: &FsyncStats) -> u64 {
    let p99_ms = s.p99.as_secs_f64() * 1000.0;
    (p99_ms.ceil() as u64).clamp(2, 50)
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

fn data_disk(cfg: &AgentConfig, opts: &Options) -> Vec<Finding> {
    const NAME: &str = "data-disk";
    let dir = &cfg.agent.data_dir;
    let mut out = Vec::new();
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return vec![
                Finding::new(
                    NAME,
                    Level::Fail,
                    format!("{} is not a directory", dir.display()),
                )
                .advice("point agent.data_dir at a directory on the data disk"),
            ];
        }
        Err(e) => {
            return vec![
                Finding::new(NAME, Level::Fail, format!("{}: {e}", dir.display())).advice(
                    "the package creates /var/lib/edge-agent; for another agent.data_dir create it and `chown edge-agent:edge-agent` it",
                ),
            ];
        }
    }
    match fsync_self_test(dir, opts.fsync_samples, opts.fsync_budget) {
        Ok(s) => {
            let rec = recommended_commit_window_ms(&s);
            let window = cfg.log.commit_window_ms;
            let summary = format!(
                "{}: fsync p50 {}, p99 {}, max {} over {} writes",
                dir.display(),
                ms(s.p50),
                ms(s.p99),
                ms(s.max),
                s.samples
            );
            let p99_ms = s.p99.as_secs_f64() * 1000.0;
            let (level, advice) = if p99_ms > 100.0 {
                (
                    Level::Warn,
                    format!(
                        "this disk is very slow to make writes durable: every acknowledgement waits for it. Use an SSD or an A2-class SD card; set log.commit_window_ms = {rec}"
                    ),
                )
            } else if window < rec / 2 {
                (
                    Level::Warn,
                    format!(
                        "log.commit_window_ms = {window} is shorter than a flush of this disk, so batches stay small; set it to {rec}"
                    ),
                )
            } else if window > rec * 4 && window > 10 {
                (
                    Level::Info,
                    format!(
                        "log.commit_window_ms = {window} adds latency this disk does not need under load; {rec} is enough"
                    ),
                )
            } else {
                (
                    Level::Ok,
                    format!("log.commit_window_ms = {window} suits this disk (recommended {rec})"),
                )
            };
            out.push(Finding::new(NAME, level, summary).advice(advice));
        }
        Err(e) => out.push(
            Finding::new(
                NAME,
                Level::Fail,
                format!("cannot write in {}: {e}", dir.display()),
            )
            .advice(format!(
                "the agent must write there: run doctor as the service user (`sudo -u {} edge-agent doctor`) and check the owner of {}",
                opts.service_user,
                dir.display()
            )),
        ),
    }
    out.extend(disk_space(cfg));
    out
}

fn disk_space(cfg: &AgentConfig) -> Vec<Finding> {
    const NAME: &str = "data-disk";
    let dir = &cfg.agent.data_dir;
    let st = match nix::sys::statvfs::statvfs(dir.as_path()) {
        Ok(s) => s,
        Err(e) => {
            return vec![Finding::new(
                NAME,
                Level::Warn,
                format!("cannot read the free space of {}: {e}", dir.display()),
            )];
        }
    };
    let free = st.blocks_available() as u64 * st.fragment_size() as u64;
    let db = cfg.db_path();
    let used: u64 = ["", "-wal"]
        .iter()
        .filter_map(|s| std::fs::metadata(format!("{}{s}", db.display())).ok())
        .map(|m| m.len())
        .sum();
    let budget = cfg.log.disk_budget.as_u64();
    let floor = cfg.log.min_free_disk.as_u64();
    let b = |n: u64| edge_core::config::ByteSize::b(n).to_string();
    if free < floor {
        return vec![
            Finding::new(
                NAME,
                Level::Fail,
                format!(
                    "{} free, below log.min_free_disk {}: the log evicts and may pause intake",
                    b(free),
                    b(floor)
                ),
            )
            .advice("free space on the data disk or lower log.min_free_disk"),
        ];
    }
    let reachable = used + free.saturating_sub(floor);
    if reachable < budget {
        vec![
            Finding::new(
                NAME,
                Level::Warn,
                format!(
                    "log.disk_budget {} is more than the disk can give ({} used by the log + {} free above the {} floor)",
                    b(budget),
                    b(used),
                    b(free.saturating_sub(floor)),
                    b(floor)
                ),
            )
            .advice(format!(
                "set log.disk_budget to at most {} so eviction follows the priority classes instead of the free-space floor",
                b(reachable)
            )),
        ]
    } else {
        vec![Finding::new(
            NAME,
            Level::Ok,
            format!(
                "{} free; the log uses {} of its {} budget",
                b(free),
                b(used),
                b(budget)
            ),
        )]
    }
}

// --- MQTT -------------------------------------------------------------------------------------

fn resolve(host: &str, port: u16) -> Result<Vec<SocketAddr>, String> {
    (host, port)
        .to_socket_addrs()
        .map(|a| a.collect::<Vec<_>>())
        .map_err(|e| format!("cannot resolve {host}: {e}"))
        .and_then(|a| {
            if a.is_empty() {
                Err(format!("{host} resolves to no address"))
            } else {
                Ok(a)
            }
        })
}

/// Connects to the first address that accepts; the error names the reason of the last refusal.
pub fn tcp_reach(host: &str, port: u16, timeout: Duration) -> Result<TcpStream, String> {
    let addrs = resolve(host, port)?;
    let mut last = String::new();
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => return Ok(s),
            Err(e) => {
                last = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => {
                        format!("{a}: connection refused (nothing listens on that port)")
                    }
                    std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => format!(
                        "{a}: no answer in {timeout:?} (host down, or a firewall drops the packets)"
                    ),
                    _ => format!("{a}: {e}"),
                }
            }
        }
    }
    Err(last)
}

/// The doctor's MQTT 3.1.1 CONNECT (clean session, so the probe leaves no session behind),
/// encoded by rumqttc.
pub fn mqtt_connect(client_id: &str, login: Option<(&str, &str)>) -> Connect {
    let mut c = Connect::new(client_id);
    c.clean_session = true;
    c.keep_alive = 10;
    if let Some((user, password)) = login {
        c.set_login(user, password);
    }
    c
}

/// What a broker answered to the doctor's CONNECT.
#[derive(Debug)]
pub enum Handshake {
    Ack(ConnectReturnCode),
    /// An MQTT packet other than CONNACK, or bytes that are no MQTT packet.
    NotConnack(String),
    Io(std::io::Error),
}

/// Sends `connect` and reads the answer with rumqttc's packet codec (timeouts: the stream's).
pub fn mqtt_handshake(stream: &mut TcpStream, connect: &Connect) -> Handshake {
    let mut out = BytesMut::new();
    if let Err(e) = connect.write(&mut out) {
        return Handshake::NotConnack(format!("no CONNECT could be encoded ({e})"));
    }
    if let Err(e) = stream.write_all(&out) {
        return Handshake::Io(e);
    }
    let mut buf = BytesMut::new();
    let mut chunk = [0u8; 256];
    loop {
        match Packet::read(&mut buf, 4096) {
            Ok(Packet::ConnAck(ack)) => return Handshake::Ack(ack.code),
            Ok(other) => return Handshake::NotConnack(format!("an MQTT {other:?}")),
            Err(MqttError::InsufficientBytes(_)) => {}
            Err(e) => return Handshake::NotConnack(format!("bytes that are no MQTT packet ({e})")),
        }
        match stream.read(&mut chunk) {
            Ok(0) if !buf.is_empty() => {
                return Handshake::NotConnack(format!(
                    "{} bytes that form no complete MQTT packet, then closed the connection",
                    buf.len()
                ));
            }
            Ok(0) => {
                return Handshake::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the broker closed the connection",
                ));
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => return Handshake::Io(e),
        }
    }
}

/// The meaning of a CONNACK return code (MQTT 3.1.1, 3.2.2.3).
pub fn connack_reason(code: ConnectReturnCode) -> &'static str {
    match code {
        ConnectReturnCode::Success => "accepted",
        ConnectReturnCode::RefusedProtocolVersion => "the broker refuses MQTT 3.1.1",
        ConnectReturnCode::BadClientId => "the broker rejects the client id",
        ConnectReturnCode::ServiceUnavailable => "the broker is unavailable",
        ConnectReturnCode::BadUserNamePassword => "bad user name or password",
        ConnectReturnCode::NotAuthorized => "not authorised",
    }
}

fn mqtt(cfg: &AgentConfig, opts: &Options) -> Vec<Finding> {
    const NAME: &str = "mqtt";
    let m = &cfg.mqtt;
    if !m.enabled {
        return vec![Finding::new(NAME, Level::Info, "mqtt.enabled = false")];
    }
    let target = format!("{}:{}", m.host, m.port);
    let mut stream = match tcp_reach(&m.host, m.port, opts.net_timeout) {
        Ok(s) => s,
        Err(e) => {
            return vec![
                Finding::new(NAME, Level::Fail, format!("broker {target} unreachable: {e}")).advice(
                    "is Mosquitto running? `systemctl status mosquitto`; check mqtt.host/mqtt.port and the broker's `listener` lines",
                ),
            ];
        }
    };
    if m.tls.is_some() {
        return vec![
            Finding::new(
                NAME,
                Level::Ok,
                format!("broker {target} accepts TCP connections (TLS)"),
            )
            .advice("doctor does not run the TLS handshake; `edge-agent status` shows the agent's own connection state and error"),
        ];
    }
    let password = match (&m.username, &m.password_file) {
        (Some(_), Some(p)) => match std::fs::read_to_string(p) {
            Ok(b) => Some(b.trim_end_matches(['\n', '\r']).to_string()),
            Err(e) => {
                return vec![
                    Finding::new(
                        NAME,
                        Level::Fail,
                        format!("cannot read mqtt.password_file {}: {e}", p.display()),
                    )
                    .advice("the file must be readable by the edge-agent user (e.g. root:edge-agent, mode 0640), and hold the password as text"),
                ];
            }
        },
        _ => None,
    };
    let _ = stream.set_read_timeout(Some(opts.net_timeout));
    let _ = stream.set_write_timeout(Some(opts.net_timeout));
    let connect = mqtt_connect(
        &format!("edge-agent-doctor-{}", std::process::id()),
        m.username
            .as_deref()
            .map(|u| (u, password.as_deref().unwrap_or_default())),
    );
    match mqtt_handshake(&mut stream, &connect) {
        Handshake::Io(e) => vec![
            Finding::new(
                NAME,
                Level::Fail,
                format!("broker {target} accepted TCP but did not answer an MQTT CONNECT: {e}"),
            )
            .advice("is this port a TLS listener (then configure [mqtt.tls]) or not an MQTT broker?"),
        ],
        Handshake::NotConnack(what) => vec![Finding::new(
            NAME,
            Level::Fail,
            format!("broker {target} answered CONNECT with {what}, not CONNACK"),
        )],
        Handshake::Ack(ConnectReturnCode::Success) => {
            // A polite goodbye; the probe's verdict does not depend on it.
            let mut bye = BytesMut::new();
            if Disconnect.write(&mut bye).is_ok() {
                let _ = stream.write_all(&bye);
            }
            vec![Finding::new(
                NAME,
                Level::Ok,
                format!(
                    "broker {target} accepts an MQTT session{}",
                    m.username
                        .as_ref()
                        .map(|u| format!(" as {u}"))
                        .unwrap_or_default()
                ),
            )]
        }
        Handshake::Ack(code) => vec![
            Finding::new(
                NAME,
                Level::Fail,
                format!(
                    "broker {target} refuses the connection: {} (code {})",
                    connack_reason(code),
                    code as u8
                ),
            )
            .advice("check mqtt.username / mqtt.password_file against the broker's password_file and ACL"),
        ],
    }
}

// --- Kafka ------------------------------------------------------------------------------------

fn split_host_port(b: &str) -> Option<(&str, u16)> {
    let (host, port) = b.rsplit_once(':')?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Some((host, port.parse().ok()?))
}

fn kafka(cfg: &AgentConfig, opts: &Options) -> Vec<Finding> {
    const NAME: &str = "kafka";
    let Some(k) = &cfg.kafka else {
        return vec![Finding::new(
            NAME,
            Level::Info,
            "no [kafka] section: records stay in the local log until a mirror to HQ is configured",
        )];
    };
    let mut out: Vec<Finding> = k
        .brokers
        .iter()
        .map(|b| match split_host_port(b) {
            None => Finding::new(NAME, Level::Fail, format!("kafka.brokers: {b:?} is not host:port")),
            Some((host, port)) => match tcp_reach(host, port, opts.net_timeout) {
                Ok(_) => Finding::new(
                    NAME,
                    Level::Ok,
                    format!("bootstrap broker {b} accepts TCP connections"),
                ),
                Err(e) => Finding::new(
                    NAME,
                    Level::Fail,
                    format!("bootstrap broker {b} unreachable: {e}"),
                )
                .advice("check kafka.brokers, DNS, and the store's outbound firewall towards HQ; records keep buffering in the local log meanwhile"),
            },
        })
        .collect();
    // Reachable: connect as the agent would (TLS, SASL, secrets from their files) and ask for the
    // cluster metadata. Never the transactional id, so a running agent is not fenced.
    if !out.is_empty() && out.iter().all(|f| f.level == Level::Ok) {
        out.push(kafka_handshake(
            k,
            opts.net_timeout.max(Duration::from_secs(5)),
        ));
    }
    // Transaction and ACL problems surface in the running agent's uplink and downlink (librdkafka's
    // own reason); ask it rather than guess.
    if cfg.http.enabled
        && let Ok((200, body)) =
            crate::cli::http_request(cfg.http.listen, "/status", opts.net_timeout)
        && let Ok(report) = serde_json::from_str::<serde_json::Value>(&body)
    {
        for name in ["uplink", "downlink"] {
            let c = &report["components"][name];
            let Some(state) = c["state"].as_str() else {
                continue;
            };
            let detail = c["detail"].as_str().unwrap_or("");
            let level = match state {
                "up" => Level::Ok,
                "starting" | "degraded" => Level::Warn,
                _ => Level::Fail,
            };
            out.push(Finding::new(
                NAME,
                level,
                format!("{name} {state}: {detail}"),
            ));
        }
    }
    out
}

/// The HQ link as the agent would open it: security settings, credentials, metadata.
fn kafka_handshake(k: &edge_sync::kafka::KafkaConfig, timeout: Duration) -> Finding {
    const NAME: &str = "kafka";
    let how = match (&k.security.username, k.security.protocol.uses_sasl()) {
        (Some(user), true) => format!("{} as {user}", k.security.protocol.librdkafka()),
        _ => k.security.protocol.librdkafka().to_string(),
    };
    match edge_sync::kafka::probe(k, timeout) {
        Ok(r) => Finding::new(
            NAME,
            Level::Ok,
            format!(
                "HQ Kafka answered over {how}: {} broker(s); checkpoint topic {} {}",
                r.brokers,
                k.checkpoint_topic,
                if r.checkpoint_topic {
                    "present"
                } else {
                    "not created yet (the uplink creates it on first start when allowed)"
                }
            ),
        ),
        Err(edge_sync::kafka::ProbeError::Link { trouble, message }) => Finding::new(
            NAME,
            Level::Fail,
            format!("HQ Kafka over {how}: {} ({message})", trouble.as_str()),
        )
        .advice(format!(
            "{}; records keep buffering in the local log meanwhile",
            trouble.advice()
        )),
        Err(e) => Finding::new(NAME, Level::Fail, format!("HQ Kafka over {how}: {e}")),
    }
}

// --- devices ----------------------------------------------------------------------------------

/// Every device path the configured drivers open (their exclusive resources that are paths, e.g.
/// a serial port; network endpoints are not devices).
pub fn device_paths(cfg: &AgentConfig) -> Vec<(String, PathBuf)> {
    cfg.drivers
        .iter()
        .flat_map(|d| {
            d.exclusive_resources()
                .into_iter()
                .filter(|r| r.starts_with('/'))
                .map(|r| (d.name().to_string(), PathBuf::from(r)))
        })
        .collect()
}

fn user_can_open(user: &nix::unistd::User, meta: &std::fs::Metadata) -> bool {
    let mode = meta.mode();
    if user.uid.is_root() {
        return true;
    }
    if meta.uid() == user.uid.as_raw() {
        return mode & 0o600 == 0o600;
    }
    let in_group = meta.gid() == user.gid.as_raw()
        || nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(meta.gid()))
            .ok()
            .flatten()
            .is_some_and(|g| g.mem.contains(&user.name));
    if in_group {
        mode & 0o060 == 0o060
    } else {
        mode & 0o006 == 0o006
    }
}

fn devices(cfg: &AgentConfig, opts: &Options) -> Vec<Finding> {
    const NAME: &str = "devices";
    let paths = device_paths(cfg);
    if paths.is_empty() {
        return vec![Finding::new(
            NAME,
            Level::Info,
            format!(
                "{} driver(s) configured, none names a device path",
                cfg.drivers.len()
            ),
        )];
    }
    let user = nix::unistd::User::from_name(&opts.service_user)
        .ok()
        .flatten();
    paths
        .into_iter()
        .map(|(driver, p)| check_device(&driver, &p, user.as_ref(), &opts.service_user))
        .collect()
}

/// One device: present, a character device, and openable (read and write) by the service user.
fn check_device(
    driver: &str,
    p: &Path,
    user: Option<&nix::unistd::User>,
    user_name: &str,
) -> Finding {
    const NAME: &str = "devices";
    match std::fs::metadata(p) {
            Err(e) => Finding::new(NAME, Level::Fail, format!("{driver}: {}: {e}", p.display()))
                .advice("is the device plugged in? `ls -l /dev/serial/by-id/` names USB serial adapters stably; use that path"),
            Ok(m) if !m.file_type().is_char_device() => Finding::new(
                NAME,
                Level::Warn,
                format!("{driver}: {} exists but is not a character device", p.display()),
            ),
            Ok(m) => {
                let group = nix::unistd::Group::from_gid(nix::unistd::Gid::from_raw(m.gid()))
                    .ok()
                    .flatten()
                    .map(|g| g.name)
                    .unwrap_or_else(|| m.gid().to_string());
                match user {
                    Some(u) if !user_can_open(u, &m) => Finding::new(
                        NAME,
                        Level::Fail,
                        format!(
                            "{driver}: {} (group {group}, mode {:o}) cannot be opened by {}",
                            p.display(),
                            m.mode() & 0o777,
                            u.name
                        ),
                    )
                    .advice(format!("add {} to group {group} (`usermod -aG {group} {}`) and restart the agent", u.name, u.name)),
                    Some(u) => Finding::new(
                        NAME,
                        Level::Ok,
                        format!("{driver}: {} present, usable by {} (group {group})", p.display(), u.name),
                    ),
                    None => Finding::new(
                        NAME,
                        Level::Ok,
                        format!("{driver}: {} present (group {group}); user {user_name} not found to check access", p.display()),
                    ),
                }
            }
    }
}

// --- clock ------------------------------------------------------------------------------------

/// 2025-01-01T00:00:00Z: a clock before this has never been set (a Pi without RTC before NTP).
const CLOCK_FLOOR_MS: i64 = 1_735_689_600_000;

/// Reads the clock synchronisation state from whatever keeps time on this machine.
fn sync_state() -> Result<(bool, String), String> {
    if let Ok(o) = std::process::Command::new("timedatectl")
        .args(["show", "-p", "NTPSynchronized", "--value"])
        .output()
        && o.status.success()
    {
        let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
        return Ok((v == "yes", format!("timedatectl NTPSynchronized={v}")));
    }
    if Path::new("/run/systemd/timesync/synchronized").exists() {
        return Ok((true, "systemd-timesyncd reports synchronised".into()));
    }
    if let Ok(o) = std::process::Command::new("chronyc")
        .args(["-n", "tracking"])
        .output()
        && o.status.success()
    {
        let text = String::from_utf8_lossy(&o.stdout);
        let leap = text
            .lines()
            .find(|l| l.starts_with("Leap status"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        return Ok((leap == "Normal", format!("chrony leap status {leap}")));
    }
    Err("neither timedatectl, systemd-timesyncd nor chrony answered".into())
}

fn clock(_cfg: &AgentConfig, _opts: &Options) -> Vec<Finding> {
    const NAME: &str = "clock";
    let now = edge_core::time::now_ms();
    if now < CLOCK_FLOOR_MS {
        return vec![
            Finding::new(NAME, Level::Fail, "the system clock is before 2025: it was never set")
                .advice("event times and record ages would be wrong; enable NTP (`timedatectl set-ntp true`) or fit an RTC"),
        ];
    }
    match sync_state() {
        Ok((true, how)) => vec![Finding::new(NAME, Level::Ok, format!("synchronised ({how})"))],
        Ok((false, how)) => vec![
            Finding::new(NAME, Level::Warn, format!("not synchronised ({how})")).advice(
                "event times come from this clock: check NTP reachability (`timedatectl timesync-status`)",
            ),
        ],
        Err(e) => vec![
            Finding::new(NAME, Level::Warn, format!("synchronisation state unknown: {e}"))
                .advice("install and enable systemd-timesyncd or chrony"),
        ],
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn fsync_self_test_measures_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let s = fsync_self_test(dir.path(), 20, Duration::from_secs(2)).unwrap();
        assert!(s.samples >= 5);
        assert!(s.p50 <= s.p99 && s.p99 <= s.max);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
        let missing = dir.path().join("nope");
        assert!(fsync_self_test(&missing, 5, Duration::from_millis(10)).is_err());
    }

    #[test]
    fn commit_window_recommendation_follows_the_disk() {
        let s = |p99_ms: u64| FsyncStats {
            samples: 100,
            p50: Duration::from_millis(1),
            p99: Duration::from_millis(p99_ms),
            max: Duration::from_millis(p99_ms),
        };
        assert_eq!(recommended_commit_window_ms(&s(0)), 2);
        assert_eq!(recommended_commit_window_ms(&s(8)), 8);
        assert_eq!(recommended_commit_window_ms(&s(400)), 50);
    }

    #[test]
    fn unreachable_broker_names_the_reason() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        drop(l);
        let e = tcp_reach("127.0.0.1", port, Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("connection refused"), "{e}");
        let e = tcp_reach("no-such-host.invalid", 1883, Duration::from_secs(1)).unwrap_err();
        assert!(e.contains("cannot resolve"), "{e}");
    }

    /// A broker that reads the CONNECT and answers CONNACK with `code` (what Mosquitto sends to a
    /// client whose credentials or ACL it refuses).
    fn refusing_broker(code: u8) -> u16 {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut head = [0u8; 2];
                let _ = s.read_exact(&mut head);
                let mut body = vec![0u8; head[1] as usize];
                let _ = s.read_exact(&mut body);
                let _ = s.write_all(&[0x20, 0x02, 0x00, code]);
            }
        });
        port
    }

    #[test]
    fn broker_refusal_reason_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        let mut cfg = AgentConfig::default();
        cfg.mqtt.host = "127.0.0.1".into();
        cfg.mqtt.port = refusing_broker(4);
        cfg.mqtt.username = Some("edge".into());
        cfg.mqtt.password_file = Some(pw);
        let f = mqtt(&cfg, &Options::default());
        assert_eq!(f[0].level, Level::Fail);
        assert!(f[0].summary.contains("bad user name or password"), "{f:?}");
        assert!(
            !f[0].summary.contains("secret"),
            "the password leaked: {f:?}"
        );
        cfg.mqtt.port = refusing_broker(0);
        let f = mqtt(&cfg, &Options::default());
        assert_eq!(f[0].level, Level::Ok, "{f:?}");
        assert!(f[0].summary.contains("as edge"), "{f:?}");
    }

    #[test]
    fn kafka_brokers_are_probed_with_the_reason() {
        let cfg = AgentConfig::default();
        assert_eq!(kafka(&cfg, &Options::default())[0].level, Level::Info);
        let up = TcpListener::bind("127.0.0.1:0").unwrap();
        let down = TcpListener::bind("127.0.0.1:0").unwrap();
        let down_port = down.local_addr().unwrap().port();
        drop(down);
        let text = format!(
            "kafka = {{ brokers = [\"{}\", \"127.0.0.1:{down_port}\"] }}\n[http]\nenabled = false\n",
            up.local_addr().unwrap()
        );
        let cfg = AgentConfig::parse(&text, "t").unwrap();
        let f = kafka(&cfg, &Options::default());
        assert_eq!(f.len(), 2, "{f:?}");
        assert_eq!(f[0].level, Level::Ok, "{f:?}");
        assert_eq!(f[1].level, Level::Fail, "{f:?}");
        assert!(f[1].summary.contains("connection refused"), "{f:?}");
        assert_eq!(split_host_port("[::1]:9093"), Some(("::1", 9093)));
        assert_eq!(split_host_port("kafka.hq"), None);
    }

    #[test]
    fn an_http_endpoint_open_to_the_network_is_a_warning() {
        let mut cfg = AgentConfig::default();
        let f = daemon(&cfg, &Options::default());
        assert!(!f.iter().any(|f| f.summary.contains("loopback")), "{f:?}");
        // Nothing listens there: the readiness finding plus the exposure warning.
        cfg.http.listen = "0.0.0.0:1".parse().unwrap();
        let f = daemon(&cfg, &Options::default());
        let w = f
            .iter()
            .find(|f| f.summary.contains("not a loopback address"))
            .unwrap_or_else(|| panic!("{f:?}"));
        assert_eq!(w.level, Level::Warn);
        assert!(
            w.advice
                .as_deref()
                .unwrap_or_default()
                .contains("127.0.0.1")
        );
    }

    #[test]
    fn connect_packet_is_well_formed() {
        let mut wire = BytesMut::new();
        mqtt_connect("doc", Some(("u", "pw")))
            .write(&mut wire)
            .unwrap();
        assert_eq!(wire[0], 0x10);
        assert_eq!(wire[1] as usize, wire.len() - 2);
        assert_eq!(&wire[2..8], b"\x00\x04MQTT");
        assert_eq!(wire[8], 4);
        assert_eq!(wire[9], 0x80 | 0x40 | 0x02);
        assert!(wire.ends_with(b"\x00\x01u\x00\x02pw"));
        assert_eq!(
            connack_reason(ConnectReturnCode::NotAuthorized),
            "not authorised"
        );
    }

    #[test]
    fn an_answer_that_is_not_connack_is_named() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        std::thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut head = [0u8; 64];
                let _ = s.read(&mut head);
                let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            }
        });
        let mut cfg = AgentConfig::default();
        cfg.mqtt.host = "127.0.0.1".into();
        cfg.mqtt.port = port;
        let f = mqtt(&cfg, &Options::default());
        assert_eq!(f[0].level, Level::Fail, "{f:?}");
        assert!(f[0].summary.contains("not CONNACK"), "{f:?}");
    }

    #[test]
    fn device_paths_come_from_the_driver_config() {
        let cfg = AgentConfig {
            drivers: AgentConfig::parse("[[drivers]]\ntype = \"simulated\"\nname = \"sim\"\n", "t")
                .unwrap()
                .drivers,
            ..Default::default()
        };
        assert!(device_paths(&cfg).is_empty());
        let f = devices(&cfg, &Options::default());
        assert_eq!(f[0].level, Level::Info);
    }

    #[test]
    fn configured_serial_devices_are_checked() {
        let cfg = AgentConfig::parse(
            r#"
[[drivers]]
type = "scanner"
name = "lane3-scanner"
lane = "3"
serial = { path = "/dev/serial/by-id/usb-Datalogic_Scanner-if00-missing" }

[[drivers]]
type = "scale"
name = "lane3-scale"
lane = "3"
protocol = "sma"
serial = { path = "/dev/null" }
"#,
            "t",
        )
        .unwrap();
        let paths = device_paths(&cfg);
        assert_eq!(paths.len(), 2, "{paths:?}");
        let opts = Options {
            service_user: "nobody".into(),
            ..Options::default()
        };
        let f = devices(&cfg, &opts);
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].level, Level::Fail, "{f:?}");
        assert!(
            f[0].summary
                .starts_with("lane3-scanner: /dev/serial/by-id/"),
            "{f:?}"
        );
        assert_eq!(f[1].level, Level::Ok, "{f:?}");
        assert!(f[1].summary.contains("usable by nobody"), "{f:?}");
    }

    #[test]
    fn devices_are_checked_for_the_service_user() {
        let nobody = nix::unistd::User::from_name("nobody").unwrap().unwrap();
        // World read-write character device: usable.
        let f = check_device("d", Path::new("/dev/null"), Some(&nobody), "nobody");
        assert_eq!(f.level, Level::Ok, "{f:?}");
        // Missing: a failure that says what to do.
        let f = check_device(
            "scanner",
            Path::new("/dev/ttyUSB-none"),
            Some(&nobody),
            "nobody",
        );
        assert_eq!(f.level, Level::Fail);
        assert!(f.summary.starts_with("scanner: /dev/ttyUSB-none"), "{f:?}");
        assert!(f.advice.unwrap().contains("/dev/serial/by-id"));
        // Not a device.
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("plain");
        std::fs::write(&file, "").unwrap();
        assert_eq!(
            check_device("d", &file, Some(&nobody), "nobody").level,
            Level::Warn
        );
        // A device only root or its group may open (mode 0660 or stricter): nobody cannot.
        let restricted = ["/dev/ttyS0", "/dev/mem", "/dev/kmsg"]
            .into_iter()
            .map(Path::new)
            .find(|p| {
                std::fs::metadata(p)
                    .is_ok_and(|m| m.file_type().is_char_device() && m.mode() & 0o006 == 0)
            });
        if let Some(p) = restricted {
            let f = check_device("d", p, Some(&nobody), "nobody");
            assert_eq!(f.level, Level::Fail, "{f:?}");
            assert!(f.advice.unwrap().contains("usermod -aG"));
        }
    }

    #[test]
    fn missing_data_dir_is_a_failure_with_advice() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = AgentConfig::default();
        cfg.agent.data_dir = dir.path().join("absent");
        let f = data_disk(&cfg, &Options::default());
        assert_eq!(f[0].level, Level::Fail);
        assert!(f[0].advice.as_deref().unwrap_or("").contains("chown"));
        cfg.agent.data_dir = dir.path().to_path_buf();
        let f = data_disk(
            &cfg,
            &Options {
                fsync_samples: 5,
                fsync_budget: Duration::from_millis(100),
                ..Options::default()
            },
        );
        assert!(f.iter().all(|x| x.level != Level::Fail), "{f:?}");
        assert!(f[0].summary.contains("fsync p50"), "{f:?}");
    }
}
