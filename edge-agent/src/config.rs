//! The agent's TOML configuration: one file, typed sections owned by the component crates, and a
//! validation pass that reports every problem with its path.

use edge_core::config::{Problems, join};
use edge_drivers::DriverConfig;
use edge_sync::kafka::KafkaConfig;
use edge_sync::log::LogConfig;
use edge_sync::mqtt::MqttConfig;
use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the packaged agent looks for its configuration.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/edge-agent/config.toml";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    pub agent: AgentSection,
    pub log: LogConfig,
    pub mqtt: MqttConfig,
    pub http: HttpConfig,
    pub drivers: Vec<DriverConfig>,
    /// The offers engine (off unless `enabled`).
    pub offers: edge_models::offers::OffersConfig,
    /// HQ's Kafka: uplink (mirror) and downlink. Absent = the store runs offline-only.
    pub kafka: Option<KafkaConfig>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// journald when systemd connected stderr to the journal (`JOURNAL_STREAM` is set), else text.
    #[default]
    Auto,
    /// Structured journal entries (fields as `F_*` journal fields); text on stderr where journald
    /// is absent.
    Journald,
    /// Human-readable lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentSection {
    /// This store's id: `edge.store` at HQ, part of the MQTT client id and Kafka keys.
    pub store_id: String,
    /// State directory: the local log and its lock file live here.
    pub data_dir: PathBuf,
    /// Budget for a graceful stop (SIGTERM): stop intake, ack what is committed, flush, exit.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
    /// Interval of the `agent.health` summary record (0 disables it).
    #[serde(with = "humantime_serde")]
    pub health_interval: Duration,
    /// Log verbosity (`RUST_LOG` syntax, e.g. `info` or `info,edge_sync=debug`); `RUST_LOG` wins.
    pub log_level: String,
    pub log_format: LogFormat,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            store_id: "store-0001".into(),
            data_dir: PathBuf::from("/var/lib/edge-agent"),
            shutdown_timeout: Duration::from_secs(5),
            health_interval: Duration::from_secs(60),
            log_level: "info".into(),
            log_format: LogFormat::Auto,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    pub enabled: bool,
    /// Health, status and Prometheus metrics. Keep it on localhost (there is no authentication).
    pub listen: SocketAddr,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            enabled: true,
            listen: SocketAddr::from(([127, 0, 0, 1], 9464)),
        }
    }
}

impl HttpConfig {
    /// The warning when the endpoint listens beyond this machine: it has no authentication, and
    /// `/status` and `/metrics` tell anyone on the store LAN about the store's streams and devices.
    /// Logged at start and reported by `doctor`.
    pub fn exposure_warning(&self) -> Option<String> {
        (self.enabled && !self.listen.ip().is_loopback()).then(|| {
            format!(
                "http.listen {} is not a loopback address: health, status and metrics (no authentication) are open to the network",
                self.listen
            )
        })
    }
}

/// Store ids become Kafka keys, topic parts and MQTT client ids.
fn check_store_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > 64 {
        return Err("must be 1 to 64 characters".into());
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{id:?} contains {c:?}; use letters, digits, '-', '_' and '.'"
        ));
    }
    Ok(())
}

impl AgentConfig {
    /// Reads and parses a config file. A syntax or type error is one problem with its location.
    pub fn load(path: &Path) -> Result<AgentConfig, Problems> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            let mut p = Problems::new();
            p.push(
                path.display().to_string(),
                format!("cannot read the config file: {e}"),
            );
            p
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<AgentConfig, Problems> {
        toml::from_str(text).map_err(|e| {
            let mut p = Problems::new();
            let location = e
                .span()
                .map(|s| {
                    let line = text[..s.start.min(text.len())].matches('\n').count() + 1;
                    format!("{origin}:{line}")
                })
                .unwrap_or_else(|| origin.to_string());
            p.push(location, e.message().to_string());
            p
        })
    }

    /// Every problem of the configuration, with its path.
    pub fn validate(&self) -> Problems {
        let mut p = Problems::new();
        if let Err(e) = check_store_id(&self.agent.store_id) {
            p.push("agent.store_id", e);
        }
        if self.agent.data_dir.as_os_str().is_empty() {
            p.push("agent.data_dir", "must name the state directory");
        }
        if self.agent.shutdown_timeout < Duration::from_secs(1)
            || self.agent.shutdown_timeout > Duration::from_secs(300)
        {
            p.push("agent.shutdown_timeout", "must be between 1s and 300s");
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.agent.log_level) {
            p.push("agent.log_level", format!("is not a valid filter: {e}"));
        }
        self.log.validate("log", &mut p);
        self.mqtt.validate("mqtt", &mut p);
        edge_drivers::validate_drivers(&self.drivers, "drivers", &mut p);
        if self.offers.enabled {
            self.offers.validate("offers", &mut p);
            if self.drivers.iter().any(|d| d.name() == self.offers.name) {
                p.push("offers.name", "is also a driver's name");
            }
        }
        if let Some(k) = &self.kafka {
            let before = p.len();
            k.validate("kafka", &mut p);
            // `kafka.topic_template` is checked with a sample store id; with this store's id
            // (up to 64 characters, once per `{store}`) and the longest stream name it may
            // still give a name Kafka refuses for every record (found by the `config` fuzz
            // target).
            if p.len() == before && check_store_id(&self.agent.store_id).is_ok() {
                let longest = self.longest_stream();
                let topic = k.topic(&self.agent.store_id, longest);
                if topic.len() > 249 {
                    p.push(
                        join("kafka", "topic_template"),
                        format!(
                            "gives the {}-character topic {topic:?} for store {:?} and stream {longest:?}; Kafka allows 249",
                            topic.len(),
                            self.agent.store_id
                        ),
                    );
                }
            }
        }
        if self.http.enabled && self.http.listen.port() == 0 {
            p.push(
                join("http", "listen"),
                "needs a fixed port so the CLI can find the daemon",
            );
        }
        p
    }

    /// The longest name of a stream this config can write: the product's streams and those
    /// named in the log and MQTT ingress sections.
    fn longest_stream(&self) -> &str {
        const FIXED: &[&str] = &[
            "pos.transactions",
            "presence.events",
            "beacon.sightings",
            "offers.decisions",
            "agent.health",
            "deadletter",
        ];
        FIXED
            .iter()
            .copied()
            .chain(self.log.streams.keys().map(String::as_str))
            .chain(self.mqtt.ingress.iter().map(|r| r.stream.as_str()))
            .max_by_key(|s| s.len())
            .unwrap_or("pos.transactions")
    }

    pub fn db_path(&self) -> PathBuf {
        edge_sync::log::sqlite::db_path(&self.agent.data_dir, &self.log)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_configs_are_valid() {
        for f in [
            "../config/edge-agent.example.toml",
            "../config/demo.toml",
            "../packaging/deb/config.toml",
        ] {
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(f);
            let cfg = AgentConfig::load(&path).unwrap_or_else(|p| panic!("{f}: {p}"));
            let problems = cfg.validate();
            assert!(problems.is_empty(), "{f}:\n{problems}");
        }
    }

    /// Every TOML example in the operator docs is a valid fragment of an agent config: appended
    /// to a minimal `[agent]` section it parses and validates, so the reference cannot drift
    /// from the loader.
    #[test]
    fn the_docs_toml_examples_are_valid_configs() {
        let mut checked = 0;
        for (doc, text) in [
            (
                "docs/CONFIGURATION.md",
                include_str!("../../docs/CONFIGURATION.md"),
            ),
            ("docs/KAFKA.md", include_str!("../../docs/KAFKA.md")),
            ("README.md", include_str!("../../README.md")),
        ] {
            let mut blocks: Vec<String> = Vec::new();
            let mut current: Option<String> = None;
            for line in text.lines() {
                match current.as_mut() {
                    None if line.trim_start().starts_with("```toml") => {
                        current = Some(String::new())
                    }
                    Some(_) if line.trim_start().starts_with("```") => {
                        blocks.extend(current.take());
                    }
                    Some(b) => {
                        b.push_str(line);
                        b.push('\n');
                    }
                    None => {}
                }
            }
            for b in blocks {
                let mut text = String::new();
                // A block of top-level keys only goes at the top of a file ("add one line at
                // the top of the config").
                if !b.lines().any(|l| l.trim_start().starts_with('[')) {
                    text.push_str(&b);
                }
                if !b.contains("[agent]") {
                    text.push_str("[agent]\nstore_id = \"doc-store\"\n");
                }
                // A fragment of the [kafka] table (its keys, say) needs the table's broker list.
                if b.contains("[kafka.") && !b.contains("[kafka]") {
                    text.push_str("[kafka]\nbrokers = [\"kafka.hq.example:9093\"]\n");
                }
                if b.lines().any(|l| l.trim_start().starts_with('[')) {
                    text.push_str(&b);
                }
                let cfg = AgentConfig::parse(&text, doc)
                    .unwrap_or_else(|p| panic!("{doc}: an example does not parse:\n{b}\n{p}"));
                // The examples name files of a real store (/etc/edge-agent/...), absent here.
                let problems = cfg.validate().to_string();
                let real: Vec<&str> = problems
                    .lines()
                    .filter(|l| !l.trim().is_empty())
                    .filter(|l| {
                        !(l.contains(": /etc/edge-agent/")
                            && l.ends_with(
                                "cannot be read: No such file or directory (os error 2)",
                            ))
                    })
                    .collect();
                assert!(
                    real.is_empty(),
                    "{doc}: an example is invalid:\n{b}\n{real:#?}"
                );
                checked += 1;
            }
        }
        assert!(checked >= 4, "{checked} examples found");
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = AgentConfig::parse("[agent]\nstore_id = \n", "x.toml").unwrap_err();
        assert!(e.to_string().starts_with("x.toml:2"), "{e}");
        let e = AgentConfig::parse("[agent]\nstore = \"a\"\n", "x.toml").unwrap_err();
        assert!(e.to_string().contains("unknown field `store`"), "{e}");
    }

    #[test]
    fn every_problem_is_named_with_its_path() {
        let text = r#"
[agent]
store_id = "store 12!"
shutdown_timeout = "0s"

[log]
commit_window_ms = 0

[mqtt]
port = 0
session_expiry = "0s"

[[mqtt.ingress]]
topic = "a/#/b"
stream = "pos.transactions"

[[drivers]]
type = "simulated"
name = "lane"

[[drivers]]
type = "simulated"
name = "lane"
beacons = 0
"#;
        let cfg = AgentConfig::parse(text, "t").unwrap();
        let p = cfg.validate().to_string();
        for path in [
            "agent.store_id:",
            "agent.shutdown_timeout:",
            "log.commit_window_ms:",
            "mqtt.port:",
            "mqtt.session_expiry:",
            "mqtt.ingress[0].topic:",
            "drivers[1].name:",
            "drivers[1].beacons:",
        ] {
            assert!(p.contains(path), "missing {path} in\n{p}");
        }
    }

    #[test]
    fn a_listen_address_beyond_loopback_is_a_warning() {
        let at = |listen: &str| HttpConfig {
            enabled: true,
            listen: listen.parse().unwrap(),
        };
        assert_eq!(HttpConfig::default().exposure_warning(), None);
        assert_eq!(at("[::1]:9464").exposure_warning(), None);
        for open in ["0.0.0.0:9464", "10.0.3.5:9464", "[::]:9464"] {
            let w = at(open).exposure_warning().expect(open);
            assert!(w.contains(open) && w.contains("not a loopback"), "{w}");
        }
        let off = HttpConfig {
            enabled: false,
            ..at("0.0.0.0:9464")
        };
        assert_eq!(off.exposure_warning(), None);
    }

    #[test]
    fn kafka_is_one_line_away_and_validated_with_paths() {
        let cfg = AgentConfig::parse("kafka = { brokers = [\"127.0.0.1:9092\"] }\n", "t").unwrap();
        assert!(cfg.validate().is_empty(), "{}", cfg.validate());
        let cfg = AgentConfig::parse(
            "[kafka]\nbrokers = []\ntopic_template = \"edge\"\n[kafka.security]\nprotocol = \"sasl_ssl\"\n",
            "t",
        )
        .unwrap();
        let p = cfg.validate().to_string();
        for path in [
            "kafka.brokers:",
            "kafka.topic_template:",
            "kafka.security.sasl_mechanism:",
            "kafka.security.password_file:",
        ] {
            assert!(p.contains(path), "missing {path} in\n{p}");
        }
    }
}
