//! Command line: `run`, `check-config`, `status`, `doctor`, `log tail|export`, `completions`, and
//! HQ's `keygen` and `sign` for signed downlink records and `fleet` for the fleet view.

use crate::config::{AgentConfig, DEFAULT_CONFIG_PATH};
use crate::report;
use clap::{Parser, Subcommand, ValueEnum};
use edge_core::log::ReadLimits;
use edge_sync::log::LogInspector;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// Exit code for configuration problems (systemd's ExecStartPre shows them and does not start).
const EXIT_CONFIG: u8 = 2;

#[derive(Parser, Debug)]
#[command(
    name = "edge-agent",
    version,
    about = "Store edge agent: durable local event log, MQTT bridge, mirror to HQ Kafka"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the agent in the foreground until SIGTERM/SIGINT.
    Run {
        #[arg(long, short, env = "EDGE_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
    },
    /// Check a configuration file and print every problem with its path (exit 2 on problems).
    CheckConfig {
        /// The file to check.
        #[arg(env = "EDGE_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        file: PathBuf,
    },
    /// Streams, seq ranges, backlog per cursor, disk use and component (MQTT, drivers) state.
    Status {
        #[arg(long, short, env = "EDGE_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Check this machine for the agent: data disk (fsync latency, space), MQTT broker, HQ Kafka
    /// (reachability, TLS and credentials), devices, clock, and whether the daemon answers. Exit 1
    /// when a check fails.
    Doctor {
        #[arg(long, short, env = "EDGE_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        /// Print the findings as JSON.
        #[arg(long)]
        json: bool,
        /// Longest time the fsync self-test of the data disk may take.
        #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
        fsync_time: Duration,
        /// The account the service runs as (device permissions are checked for it).
        #[arg(long, default_value = "edge-agent")]
        service_user: String,
    },
    /// Read records from the local log.
    Log {
        #[command(subcommand)]
        command: LogCommand,
    },
    /// For HQ: create an ed25519 key for signing downlink records, and print the config entry
    /// that makes stores trust it.
    Keygen {
        /// The key id records name in edge.sig.key, e.g. hq-2026-11.
        #[arg(long)]
        key_id: String,
        /// Where to write the private key (created with mode 0600; an existing file is kept).
        #[arg(long)]
        key_file: PathBuf,
    },
    /// For HQ: sign one downlink record and print the headers to send with it (edge.store when
    /// given, edge.sig, edge.sig.key, edge.sig.ts, edge.sig.expires). Format: docs/KAFKA.md.
    Sign {
        /// The private key (from keygen, or a PKCS#8 PEM from `openssl genpkey -algorithm ed25519`).
        #[arg(long)]
        key_file: PathBuf,
        #[arg(long)]
        key_id: String,
        /// The local stream the record is applied to (hq.prices, hq.campaigns, hq.models,
        /// hq.commands); the signature is not valid for another stream.
        #[arg(long)]
        stream: String,
        /// The record key (e.g. the store id); without it, the record is sent with a null key.
        #[arg(long)]
        key: Option<String>,
        /// The edge.store header to send (signed too).
        #[arg(long)]
        store: Option<String>,
        /// The payload file exactly as it is sent (`-`: standard input).
        #[arg(long, required_unless_present = "tombstone")]
        payload_file: Option<PathBuf>,
        /// Sign a tombstone (a record with a null payload).
        #[arg(long, conflicts_with = "payload_file")]
        tombstone: bool,
        /// The signature is not valid after this long (e.g. 24h); default: no expiry.
        #[arg(long, value_parser = humantime::parse_duration)]
        expires_in: Option<Duration>,
        #[arg(long, value_enum, default_value_t = HeaderFormat::Lines)]
        format: HeaderFormat,
    },
    /// For HQ: every store as the side topics show it (state, last heartbeat, backlog, oldest
    /// unsent record, gaps with reasons, the version running), worst first. Which stores are
    /// behind, and did we lose anything?
    Fleet {
        /// HQ's bootstrap brokers, host:port[,host:port].
        #[arg(long)]
        bootstrap: String,
        #[arg(long, default_value = "edge.heartbeats")]
        heartbeat_topic: String,
        #[arg(long, default_value = "edge.gaps")]
        gap_topic: String,
        #[arg(long, default_value = "edge.__checkpoints")]
        checkpoint_topic: String,
        /// Heartbeats of this last period are read (a store sends one every 30 s by default).
        #[arg(long, default_value = "15m", value_parser = humantime::parse_duration)]
        heartbeats_since: Duration,
        /// Gaps of this last period are counted.
        #[arg(long, default_value = "7d", value_parser = humantime::parse_duration)]
        gaps_since: Duration,
        /// A store without a heartbeat for this long is `silent`.
        #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
        silent_after: Duration,
        /// A store whose oldest record not at HQ is older than this is `behind`.
        #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
        behind_after: Duration,
        /// A librdkafka property for HQ's cluster (security.protocol, ssl.ca.location, sasl.*),
        /// repeatable.
        #[arg(short = 'X', long = "property", value_name = "KEY=VALUE")]
        property: Vec<String>,
        /// A file of `KEY=VALUE` lines read like -X (keeps a password off the command line).
        #[arg(long)]
        properties_file: Option<PathBuf>,
        /// Longest time reading one topic may take.
        #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
        timeout: Duration,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to standard output.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (edge-agent.1 and one per subcommand) into a directory.
    #[command(hide = true)]
    Manpages {
        /// Output directory (created if missing).
        dir: PathBuf,
    },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Format {
    /// One JSON object per line (payload embedded when it is JSON, else base64).
    Jsonl,
    /// A short human line per record.
    Text,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum HeaderFormat {
    /// One `name=value` line per header (kcat's -H syntax).
    Lines,
    /// One JSON object.
    Json,
}

#[derive(Subcommand, Debug)]
pub enum LogCommand {
    /// The newest records of a stream, optionally following new ones.
    Tail {
        #[arg(long, short, env = "EDGE_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long, short)]
        stream: String,
        /// Start at this seq instead of the last `-n` records.
        #[arg(long)]
        from_seq: Option<u64>,
        #[arg(short = 'n', default_value_t = 10)]
        lines: u64,
        /// Keep printing new records as they are committed.
        #[arg(long, short)]
        follow: bool,
        #[arg(long, value_enum, default_value_t = Format::Text)]
        format: Format,
    },
    /// Every record of a stream in a seq range.
    Export {
        #[arg(long, short, env = "EDGE_AGENT_CONFIG", default_value = DEFAULT_CONFIG_PATH)]
        config: PathBuf,
        #[arg(long, short)]
        stream: String,
        #[arg(long, default_value_t = 1)]
        from_seq: u64,
        /// Last seq to export (inclusive); default: the newest.
        #[arg(long)]
        to_seq: Option<u64>,
        #[arg(long, value_enum, default_value_t = Format::Jsonl)]
        format: Format,
        /// Write to this file instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
}

pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => {
            crate::memory::limit_malloc_arenas();
            match load(&config) {
                Ok(cfg) => match crate::daemon::run(cfg) {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("edge-agent: {e:#}");
                        ExitCode::FAILURE
                    }
                },
                Err(code) => code,
            }
        }
        Command::CheckConfig { file } => match load(&file) {
            Ok(cfg) => {
                let uplink = if cfg.kafka.is_some() {
                    "Kafka uplink"
                } else {
                    "no Kafka (offline buffering)"
                };
                let offers = if cfg.offers.enabled {
                    format!("offers on for {} zone(s)", cfg.offers.zones.len())
                } else {
                    "offers off".to_string()
                };
                println!(
                    "{}: OK (store {}, data in {}, {} MQTT ingress rule(s), {} egress rule(s), {} driver(s), {uplink}, {offers})",
                    file.display(),
                    cfg.agent.store_id,
                    cfg.agent.data_dir.display(),
                    cfg.mqtt.ingress.len(),
                    cfg.mqtt.egress.len(),
                    cfg.drivers.len()
                );
                ExitCode::SUCCESS
            }
            Err(code) => code,
        },
        Command::Status { config, json } => status(&config, json),
        Command::Doctor {
            config,
            json,
            fsync_time,
            service_user,
        } => doctor(&config, json, fsync_time, service_user),
        Command::Keygen { key_id, key_file } => match crate::hq_sign::keygen(&key_id, &key_file) {
            Ok(entry) => {
                print!("{entry}");
                eprintln!(
                    "edge-agent: wrote the private key to {} (keep it at HQ; stores need only the public key above)",
                    key_file.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("edge-agent: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Sign {
            key_file,
            key_id,
            stream,
            key,
            store,
            payload_file,
            tombstone,
            expires_in,
            format,
        } => {
            let r = crate::hq_sign::load_key(&key_id, &key_file).and_then(|k| {
                let payload = match (&payload_file, tombstone) {
                    (Some(f), false) => Some(crate::hq_sign::read_payload(f)?),
                    _ => None,
                };
                let req = crate::hq_sign::Request {
                    stream: &stream,
                    key: key.as_deref(),
                    store: store.as_deref(),
                    payload: payload.as_deref(),
                    expires_in,
                };
                crate::hq_sign::sign(&k, &req, edge_core::time::now_ms())
            });
            match r {
                Ok(h) => {
                    print!(
                        "{}",
                        match format {
                            HeaderFormat::Lines => crate::hq_sign::render_lines(&h),
                            HeaderFormat::Json => crate::hq_sign::render_json(&h),
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edge-agent: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Fleet {
            bootstrap,
            heartbeat_topic,
            gap_topic,
            checkpoint_topic,
            heartbeats_since,
            gaps_since,
            silent_after,
            behind_after,
            property,
            properties_file,
            timeout,
            json,
        } => {
            let mut props: Vec<String> = Vec::new();
            if let Some(f) = &properties_file {
                match std::fs::read_to_string(f) {
                    Ok(text) => props.extend(
                        text.lines()
                            .map(str::trim)
                            .filter(|l| !l.is_empty() && !l.starts_with('#'))
                            .map(str::to_string),
                    ),
                    Err(e) => {
                        eprintln!("edge-agent: cannot read {}: {e}", f.display());
                        return ExitCode::from(EXIT_CONFIG);
                    }
                }
            }
            props.extend(property);
            let mut client = rdkafka::ClientConfig::new();
            client.set("bootstrap.servers", &bootstrap);
            for p in &props {
                let Some((k, v)) = p.split_once('=') else {
                    eprintln!(
                        "edge-agent: property {:?} is not KEY=VALUE",
                        p.split('=').next().unwrap_or("")
                    );
                    return ExitCode::from(EXIT_CONFIG);
                };
                client.set(k.trim(), v.trim());
            }
            let now = edge_core::time::now_ms();
            let since = |d: Duration| now.saturating_sub(d.as_millis() as i64);
            let q = edge_sync::kafka::fleet::FleetQuery {
                heartbeat_topic,
                gap_topic,
                checkpoint_topic,
                heartbeats_since_ms: since(heartbeats_since),
                gaps_since_ms: since(gaps_since),
                timeout,
            };
            match edge_sync::kafka::fleet::fleet_view(&client, &q) {
                Ok(views) => {
                    let t = crate::fleet::Thresholds {
                        silent_after_ms: silent_after.as_millis() as u64,
                        behind_after_ms: behind_after.as_millis() as u64,
                    };
                    let r = crate::fleet::classify(views, t, edge_core::time::now_ms());
                    if json {
                        println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
                    } else {
                        print!("{}", crate::fleet::render_text(&r));
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("edge-agent: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "edge-agent", &mut std::io::stdout());
            ExitCode::SUCCESS
        }
        Command::Manpages { dir } => {
            let r = std::fs::create_dir_all(&dir).and_then(|_| {
                crate::man::write_all(<Cli as clap::CommandFactory>::command(), &dir)
            });
            match r {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!(
                        "edge-agent: cannot write manual pages to {}: {e}",
                        dir.display()
                    );
                    ExitCode::FAILURE
                }
            }
        }
        Command::Log { command } => match command {
            LogCommand::Tail {
                config,
                stream,
                from_seq,
                lines,
                follow,
                format,
            } => with_inspector(&config, |i| {
                tail(i, &stream, from_seq, lines, follow, format)
            }),
            LogCommand::Export {
                config,
                stream,
                from_seq,
                to_seq,
                format,
                output,
            } => with_inspector(&config, |i| {
                export(i, &stream, from_seq, to_seq, format, output.as_deref())
            }),
        },
    }
}

/// Loads and validates; prints every problem and returns the exit code on failure.
fn load(path: &Path) -> Result<AgentConfig, ExitCode> {
    let cfg = match AgentConfig::load(path) {
        Ok(c) => c,
        Err(p) => {
            eprint!("{p}");
            eprintln!(
                "{}: 1 problem; the agent will not start with this file",
                path.display()
            );
            return Err(ExitCode::from(EXIT_CONFIG));
        }
    };
    let problems = cfg.validate();
    if !problems.is_empty() {
        eprint!("{problems}");
        eprintln!(
            "{}: {} problem(s); the agent will not start with this file",
            path.display(),
            problems.len()
        );
        return Err(ExitCode::from(EXIT_CONFIG));
    }
    Ok(cfg)
}

fn with_inspector(config: &Path, f: impl FnOnce(&LogInspector) -> anyhow::Result<()>) -> ExitCode {
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let r = LogInspector::open(&cfg.agent.data_dir, cfg.log.clone())
        .map_err(anyhow::Error::from)
        .and_then(|i| f(&i));
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::BrokenPipe
            {
                return ExitCode::SUCCESS;
            }
            eprintln!("edge-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Mode of a `log export --output` file: store data, for the operator who asked for it.
pub const EXPORT_FILE_MODE: u32 = 0o600;

/// Creates (or truncates) an export file with [`EXPORT_FILE_MODE`], whatever the umask and
/// whatever mode a file it replaces had.
pub fn create_export_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let f = std::fs::File::options()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(EXPORT_FILE_MODE)
        .open(path)?;
    f.set_permissions(std::fs::Permissions::from_mode(EXPORT_FILE_MODE))?;
    Ok(f)
}

/// GET on the daemon's local HTTP endpoint (hyper's HTTP/1.1 client on a private current-thread
/// runtime; `timeout` bounds the connect, 10 s the answer): status code and body, or why there
/// was no answer. Callable from inside a runtime too (it then runs on a thread of its own).
pub(crate) fn http_request(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    let run = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the HTTP client: {e}"))?
            .block_on(http_exchange(addr, path, timeout))
    };
    if tokio::runtime::Handle::try_current().is_ok() {
        std::thread::scope(|s| {
            s.spawn(run)
                .join()
                .unwrap_or_else(|_| Err("the HTTP client thread failed".into()))
        })
    } else {
        run()
    }
}

async fn http_exchange(
    addr: std::net::SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), String> {
    use http_body_util::BodyExt;
    let stream = tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("no answer from {addr} in {timeout:?}"))?
        .map_err(|e| e.to_string())?;
    let exchange = async {
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .map_err(|e| e.to_string())?;
        let req = hyper::Request::get(path)
            .header(hyper::header::HOST, addr.to_string())
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .map_err(|e| format!("{path:?} is not a request path: {e}"))?;
        // The connection task drives the socket (hyper's client pattern); its failure shows up
        // as the request's or the body's error.
        let conn = tokio::spawn(conn);
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let code = resp.status().as_u16();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        conn.abort();
        let text =
            String::from_utf8(body.to_vec()).map_err(|_| "the answer is not UTF-8".to_string())?;
        Ok::<_, String>((code, text))
    };
    tokio::time::timeout(Duration::from_secs(10), exchange)
        .await
        .map_err(|_| format!("{addr} sent no complete answer in 10 s"))?
}

fn http_get(addr: std::net::SocketAddr, path: &str) -> Option<String> {
    match http_request(addr, path, Duration::from_secs(1)) {
        Ok((200, body)) => Some(body),
        _ => None,
    }
}

fn doctor(config: &Path, json: bool, fsync_time: Duration, service_user: String) -> ExitCode {
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let opts = crate::doctor::Options {
        fsync_budget: fsync_time,
        service_user,
        ..Default::default()
    };
    let findings = crate::doctor::run(&cfg, &opts);
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&findings).unwrap_or_default()
        );
    } else {
        println!("edge-agent doctor: {}", config.display());
        print!("{}", crate::doctor::render(&findings));
    }
    if findings
        .iter()
        .any(|f| f.level == crate::doctor::Level::Fail)
    {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

fn status(config: &Path, json: bool) -> ExitCode {
    let cfg = match load(config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let from_daemon = cfg
        .http
        .enabled
        .then(|| http_get(cfg.http.listen, "/status"))
        .flatten()
        .and_then(|b| serde_json::from_str::<report::StatusReport>(&b).ok());
    let report = match from_daemon {
        Some(r) => r,
        None => match offline_report(&cfg) {
            Ok(r) => r,
            Err(e) => {
                eprintln!(
                    "edge-agent: the daemon does not answer on {} and the log cannot be read: {e:#}",
                    cfg.http.listen
                );
                return ExitCode::FAILURE;
            }
        },
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        print!("{}", report::render(&report));
    }
    ExitCode::SUCCESS
}

fn offline_report(cfg: &AgentConfig) -> anyhow::Result<report::StatusReport> {
    let i = LogInspector::open(&cfg.agent.data_dir, cfg.log.clone())?;
    let cursors = i.cursors()?;
    let mut oldest = std::collections::BTreeMap::new();
    for c in &cursors {
        oldest.insert(
            (c.stream.clone(), c.next_seq),
            i.oldest_from(&c.stream, c.next_seq)?,
        );
    }
    Ok(report::build(report::Inputs {
        store_id: &cfg.agent.store_id,
        path: i.path().display().to_string(),
        epoch: i.epoch()?.to_string(),
        usage: i.usage()?,
        integrity: None,
        streams: i.streams()?,
        cursors,
        oldest,
        gaps: i.gap_summary()?.iter().map(|g| g.ranges).sum(),
        components: Default::default(),
        daemon_running: false,
        uptime_s: None,
    }))
}

fn print_record(
    out: &mut impl Write,
    r: &edge_core::Record,
    format: Format,
) -> std::io::Result<()> {
    match format {
        Format::Jsonl => writeln!(out, "{}", r.to_json()),
        Format::Text => {
            let payload = String::from_utf8_lossy(&r.event.payload);
            let short: String = payload.chars().take(160).collect();
            writeln!(
                out,
                "{} #{} {} key={} id={} {}",
                r.event.stream,
                r.seq,
                r.event.event_ts_ms,
                r.event.key.as_deref().unwrap_or("-"),
                r.event.event_id.as_deref().unwrap_or("-"),
                short
            )
        }
    }
}

fn tail(
    i: &LogInspector,
    stream: &str,
    from_seq: Option<u64>,
    lines: u64,
    follow: bool,
    format: Format,
) -> anyhow::Result<()> {
    let info = i
        .streams()?
        .into_iter()
        .find(|s| s.name == stream)
        .ok_or_else(|| anyhow::anyhow!("the log has no stream named {stream:?}"))?;
    let mut next =
        from_seq.unwrap_or_else(|| info.next_seq.saturating_sub(lines).max(info.first_seq));
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    loop {
        let b = i.read(stream, next, ReadLimits::default())?;
        for r in &b.records {
            print_record(&mut out, r, format)?;
        }
        for (seq, reason) in &b.quarantined {
            eprintln!("{stream} #{seq}: damaged record skipped ({reason})");
        }
        let progressed = b.next_seq > next;
        next = b.next_seq;
        if !progressed {
            if !follow {
                return Ok(());
            }
            out.flush()?;
            std::thread::sleep(Duration::from_millis(250));
        }
    }
}

fn export(
    i: &LogInspector,
    stream: &str,
    from_seq: u64,
    to_seq: Option<u64>,
    format: Format,
    output: Option<&Path>,
) -> anyhow::Result<()> {
    let mut out: Box<dyn Write> = match output {
        Some(p) => Box::new(std::io::BufWriter::new(
            create_export_file(p)
                .map_err(|e| anyhow::anyhow!("cannot create {}: {e}", p.display()))?,
        )),
        None => Box::new(std::io::BufWriter::new(std::io::stdout().lock())),
    };
    let progress = export_progress(i, stream, from_seq, to_seq, output.is_some())?;
    let mut next = from_seq;
    let mut n = 0u64;
    loop {
        let b = i.read(
            stream,
            next,
            ReadLimits {
                max_records: 5000,
                max_bytes: 8 << 20,
            },
        )?;
        for r in &b.records {
            if to_seq.is_some_and(|t| r.seq > t) {
                out.flush()?;
                progress.finish_and_clear();
                eprintln!("exported {n} record(s)");
                return Ok(());
            }
            print_record(&mut out, r, format)?;
            n += 1;
        }
        progress.set_position(b.next_seq.saturating_sub(from_seq));
        for (seq, reason) in &b.quarantined {
            eprintln!("{stream} #{seq}: damaged record skipped ({reason})");
        }
        if b.next_seq <= next {
            break;
        }
        next = b.next_seq;
    }
    out.flush()?;
    progress.finish_and_clear();
    eprintln!("exported {n} record(s)");
    Ok(())
}

/// A progress bar on stderr for long exports, only when a person watches a terminal (stderr is a
/// TTY and the records do not go to that same terminal).
fn export_progress(
    i: &LogInspector,
    stream: &str,
    from_seq: u64,
    to_seq: Option<u64>,
    to_file: bool,
) -> anyhow::Result<indicatif::ProgressBar> {
    use std::io::IsTerminal as _;
    if !std::io::stderr().is_terminal() || (!to_file && std::io::stdout().is_terminal()) {
        return Ok(indicatif::ProgressBar::hidden());
    }
    let head = i
        .streams()?
        .into_iter()
        .find(|s| s.name == stream)
        .map(|s| s.next_seq)
        .unwrap_or(from_seq);
    let last = to_seq.map_or(head.saturating_sub(1), |t| t.min(head.saturating_sub(1)));
    let total = (last + 1).saturating_sub(from_seq);
    let bar = indicatif::ProgressBar::with_draw_target(
        Some(total),
        indicatif::ProgressDrawTarget::stderr(),
    );
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} seqs  {per_sec}  eta {eta}")
    {
        bar.set_style(style);
    }
    Ok(bar)
}
