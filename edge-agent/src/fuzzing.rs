//! Properties the fuzz target `config` (`edge-agent/fuzz/`) checks on arbitrary TOML text, shared
//! with `edge-agent/tests/fuzz_corpus.rs`, which replays the committed seed corpus on every test
//! run. Each function panics only when a property is violated; the loader never panics.
//!
//! The input is the config file's bytes (invalid UTF-8 is replaced, as the loader would refuse
//! it before parsing). Validation looks at the file system only to ask whether named files exist.

use crate::config::AgentConfig;
use edge_core::config::Problems;

/// Where the fuzzed config claims to come from.
pub const ORIGIN: &str = "fuzz.toml";

/// The config sections a problem's path may start with.
const SECTIONS: &[&str] = &["agent", "log", "mqtt", "http", "drivers", "kafka"];

fn check_problems(problems: &Problems, text: &str, parsed: bool) {
    assert!(!problems.is_empty());
    for p in problems.iter() {
        assert!(
            !p.message.is_empty(),
            "a problem without a message at {}",
            p.path
        );
        if parsed {
            let section = p.path.split(['.', '[']).next().unwrap_or_default();
            assert!(
                SECTIONS.contains(&section),
                "problem outside any section: {p}"
            );
        } else {
            // A syntax or type error names the file and, when it has one, the line.
            let line = p.path.strip_prefix(ORIGIN).expect("the file is named");
            if let Some(n) = line.strip_prefix(':') {
                let n: usize = n.parse().expect("a line number");
                assert!(n >= 1 && n <= text.lines().count() + 1, "{p}");
            } else {
                assert!(line.is_empty(), "{p}");
            }
        }
    }
}

/// Whether `name` is a legal Kafka topic name.
fn kafka_topic_ok(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 249
        && name != "."
        && name != ".."
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// The config loader on arbitrary text: parsing and validation never panic and are
/// deterministic; a refusal is a list of problems, each with a message and a path (a file line
/// for syntax, a config path otherwise). A config that validates gives the components what they
/// assume without checking again: ingress patterns that compile, egress templates that can
/// publish, a fixed HTTP port, and Kafka topic names HQ's broker accepts for this store.
pub fn config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let cfg = match AgentConfig::parse(&text, ORIGIN) {
        Ok(c) => c,
        Err(problems) => {
            check_problems(&problems, &text, false);
            let again = AgentConfig::parse(&text, ORIGIN)
                .err()
                .map(|p| p.to_string());
            assert_eq!(again, Some(problems.to_string()), "deterministic");
            return;
        }
    };
    let problems = cfg.validate();
    assert_eq!(
        problems.to_string(),
        cfg.validate().to_string(),
        "deterministic"
    );
    let _ = cfg.db_path();
    if !problems.is_empty() {
        check_problems(&problems, &text, true);
        return;
    }
    for r in &cfg.mqtt.ingress {
        let p = edge_sync::mqtt::topic::TopicPattern::parse(&r.topic);
        assert!(p.is_ok(), "valid config, bad ingress topic {:?}", r.topic);
    }
    for r in &cfg.mqtt.egress {
        let p = edge_sync::mqtt::topic::egress_template_problems(&r.topic);
        assert!(
            p.is_empty(),
            "valid config, egress topic {:?}: {p:?}",
            r.topic
        );
    }
    if cfg.http.enabled {
        assert_ne!(cfg.http.listen.port(), 0);
    }
    if let Some(k) = &cfg.kafka {
        assert!(k.check().is_ok(), "validate and check disagree");
        let _ = k.downlink_policies();
        let _ = k.downlink_verifier();
        let longest = cfg
            .mqtt
            .ingress
            .iter()
            .map(|r| r.stream.as_str())
            .chain(["pos.transactions", "agent.health", "deadletter"])
            .max_by_key(|s| s.len())
            .unwrap_or("pos.transactions");
        let topic = k.topic(&cfg.agent.store_id, longest);
        assert!(
            kafka_topic_ok(&topic),
            "valid config, but stream {longest:?} of store {:?} mirrors to {topic:?}, which Kafka refuses",
            cfg.agent.store_id
        );
    }
}
