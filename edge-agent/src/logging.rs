//! Where the daemon's own log lines go: the systemd journal with structured fields, or stderr.
//!
//! `auto` picks the journal when systemd connected stderr to it (`JOURNAL_STREAM` is set, see
//! systemd.exec(5)) and text otherwise, so a terminal run stays readable. Every `tracing` field
//! becomes a journal field with the `F_` prefix (`journalctl -u edge-agent F_COMPONENT=mqtt`), and
//! the level maps to the journal PRIORITY. When the journal socket cannot be opened the agent
//! falls back to text on stderr and says so once.

use crate::config::{AgentConfig, LogFormat};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

/// The format actually used, after `auto` and fallbacks are resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resolved {
    Journald,
    Text,
    Json,
}

/// Resolves `auto` from the environment (no I/O).
pub fn resolve(format: LogFormat, journal_stream: Option<&std::ffi::OsStr>) -> Resolved {
    match format {
        LogFormat::Auto if journal_stream.is_some_and(|v| !v.is_empty()) => Resolved::Journald,
        LogFormat::Auto | LogFormat::Text => Resolved::Text,
        LogFormat::Journald => Resolved::Journald,
        LogFormat::Json => Resolved::Json,
    }
}

fn filter(cfg: &AgentConfig) -> EnvFilter {
    EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&cfg.agent.log_level))
        .unwrap_or_else(|_| EnvFilter::new("info"))
}

/// Installs the global subscriber. A second call (tests running several daemons) is a no-op.
pub fn init(cfg: &AgentConfig) -> Resolved {
    let wanted = resolve(
        cfg.agent.log_format,
        std::env::var_os("JOURNAL_STREAM").as_deref(),
    );
    let registry = tracing_subscriber::registry().with(filter(cfg));
    // Colours only for a person at a terminal, not in files or the journal's stderr capture.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let stderr = || {
        tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(ansi)
    };
    match wanted {
        Resolved::Journald => match tracing_journald::layer() {
            Ok(j) => {
                let j = j.with_syslog_identifier("edge-agent".into());
                let _ = registry.with(j).try_init();
                Resolved::Journald
            }
            Err(e) => {
                let _ = registry.with(stderr()).try_init();
                tracing::warn!(
                    error = %e,
                    "log_format asks for journald but the journal socket cannot be opened; logging to stderr"
                );
                Resolved::Text
            }
        },
        Resolved::Json => {
            let _ = registry.with(stderr().json()).try_init();
            Resolved::Json
        }
        Resolved::Text => {
            let _ = registry.with(stderr()).try_init();
            Resolved::Text
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn auto_uses_the_journal_only_under_systemd() {
        assert_eq!(resolve(LogFormat::Auto, None), Resolved::Text);
        assert_eq!(
            resolve(LogFormat::Auto, Some(OsStr::new("8:1234"))),
            Resolved::Journald
        );
        assert_eq!(
            resolve(LogFormat::Text, Some(OsStr::new("8:1234"))),
            Resolved::Text
        );
        assert_eq!(resolve(LogFormat::Journald, None), Resolved::Journald);
        assert_eq!(resolve(LogFormat::Json, None), Resolved::Json);
    }
}
