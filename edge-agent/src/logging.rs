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

/// Whether `JOURNAL_STREAM` ("device:inode", set by systemd) names the stream stderr is connected to.
/// A child of a service inherits the variable with a different stderr (a file, a pipe): then it is
/// not the journal.
pub fn stderr_is_journal(journal_stream: Option<&std::ffi::OsStr>) -> bool {
    use std::os::fd::AsFd as _;
    let Some((dev, ino)) = journal_stream
        .and_then(|v| v.to_str())
        .and_then(|v| v.split_once(':'))
        .and_then(|(d, i)| Some((d.parse::<u64>().ok()?, i.parse::<u64>().ok()?)))
    else {
        return false;
    };
    // dev_t/ino_t are 32-bit on some targets (armv7), 64-bit on others.
    #[allow(clippy::unnecessary_cast)]
    match nix::sys::stat::fstat(std::io::stderr().as_fd()) {
        Ok(st) => st.st_dev as u64 == dev && st.st_ino as u64 == ino,
        Err(_) => false,
    }
}

/// Resolves `auto`: journald when stderr is the journal stream systemd set up.
pub fn resolve(format: LogFormat, stderr_is_journal: bool) -> Resolved {
    match format {
        LogFormat::Auto if stderr_is_journal => Resolved::Journald,
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
        stderr_is_journal(std::env::var_os("JOURNAL_STREAM").as_deref()),
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
        assert_eq!(resolve(LogFormat::Auto, false), Resolved::Text);
        assert_eq!(resolve(LogFormat::Auto, true), Resolved::Journald);
        assert_eq!(resolve(LogFormat::Text, true), Resolved::Text);
        assert_eq!(resolve(LogFormat::Journald, false), Resolved::Journald);
        assert_eq!(resolve(LogFormat::Json, false), Resolved::Json);
    }

    #[test]
    fn journal_stream_must_name_our_stderr() {
        use std::os::fd::AsFd as _;
        assert!(!stderr_is_journal(None));
        assert!(!stderr_is_journal(Some(OsStr::new("garbage"))));
        // An inherited variable that names another stream (a parent's journal socket).
        assert!(!stderr_is_journal(Some(OsStr::new("1:1"))));
        let st = nix::sys::stat::fstat(std::io::stderr().as_fd()).unwrap();
        let ours = format!("{}:{}", st.st_dev, st.st_ino);
        assert!(stderr_is_journal(Some(OsStr::new(&ours))));
    }
}
