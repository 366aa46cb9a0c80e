//! Manual pages generated from the clap definition (`edge-agent manpages DIR`, run by
//! scripts/build-deb.sh): one page per subcommand, and `edge-agent(1)` with the FILES, ENVIRONMENT,
//! EXIT STATUS and SEE ALSO sections an operator looks for.

use clap_mangen::Man;
use clap_mangen::roff::{Roff, bold, roman};
use std::path::Path;

const FILES: &[(&str, &str)] = &[
    (
        "/etc/edge-agent/config.toml",
        "The configuration. Every option is described in /usr/share/doc/edge-agent/examples/edge-agent.example.toml.",
    ),
    (
        "/var/lib/edge-agent/",
        "The local log (SQLite database, write-ahead log) and its lock file. Deleted only by a purge of the package.",
    ),
    (
        "/etc/mosquitto/conf.d/edge-agent-tuning.conf",
        "Mosquitto settings the agent relies on (in-flight window, queue limits, persistence).",
    ),
    (
        "/usr/share/doc/edge-agent/OPERATIONS.md",
        "How to install, configure, upgrade, observe and troubleshoot the agent.",
    ),
];

const ENVIRONMENT: &[(&str, &str)] = &[
    (
        "EDGE_AGENT_CONFIG",
        "The configuration file used when --config is not given.",
    ),
    (
        "RUST_LOG",
        "Log filter (e.g. info,edge_sync=debug); overrides agent.log_level.",
    ),
    (
        "MALLOC_ARENA_MAX",
        "glibc malloc arenas. When it is unset, run limits them to 2 (fewer arenas hold less memory); a value set here is kept.",
    ),
    (
        "NOTIFY_SOCKET, WATCHDOG_USEC, JOURNAL_STREAM",
        "Set by systemd: readiness, status and watchdog notifications, and logging to the journal.",
    ),
];

const EXIT_STATUS: &[(&str, &str)] = &[
    ("0", "Success."),
    (
        "1",
        "Failure; for doctor, at least one check failed. The message says what to do.",
    ),
    (
        "2",
        "The configuration has problems; each is printed with its path (e.g. drivers[2].path).",
    ),
];

fn tagged(roff: &mut Roff, title: &str, items: &[(&str, &str)]) {
    roff.control("SH", [title]);
    for (tag, text) in items {
        roff.control("TP", [])
            .text([bold(*tag)])
            .text([roman(*text)]);
    }
}

/// Writes `edge-agent.1` and `edge-agent-<subcommand>.1` (nested subcommands included) into `dir`.
pub fn write_all(cmd: clap::Command, dir: &Path) -> std::io::Result<()> {
    clap_mangen::generate_to(cmd.clone(), dir)?;
    let mut cmd = cmd.disable_help_subcommand(true);
    cmd.build();
    let man = Man::new(cmd);
    let mut out = Vec::new();
    man.render_title(&mut out)?;
    man.render_name_section(&mut out)?;
    man.render_synopsis_section(&mut out)?;
    man.render_description_section(&mut out)?;
    man.render_options_section(&mut out)?;
    man.render_subcommands_section(&mut out)?;
    let mut roff = Roff::new();
    tagged(&mut roff, "FILES", FILES);
    tagged(&mut roff, "ENVIRONMENT", ENVIRONMENT);
    tagged(&mut roff, "EXIT STATUS", EXIT_STATUS);
    roff.control("SH", ["SEE ALSO"]).text([roman(
        "systemctl(1), journalctl(1), mosquitto.conf(5); systemctl status edge-agent; journalctl -u edge-agent",
    )]);
    roff.to_writer(&mut out)?;
    man.render_version_section(&mut out)?;
    std::fs::write(dir.join(man.get_filename()), out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory as _;

    #[test]
    fn every_subcommand_gets_a_page_and_the_main_page_has_files() {
        let dir = tempfile::tempdir().unwrap();
        write_all(crate::cli::Cli::command(), dir.path()).unwrap();
        for page in [
            "edge-agent.1",
            "edge-agent-run.1",
            "edge-agent-check-config.1",
            "edge-agent-status.1",
            "edge-agent-doctor.1",
            "edge-agent-log-export.1",
            "edge-agent-completions.1",
            "edge-agent-keygen.1",
            "edge-agent-sign.1",
        ] {
            assert!(dir.path().join(page).is_file(), "missing {page}");
        }
        assert!(
            !dir.path().join("edge-agent-manpages.1").exists(),
            "hidden command documented"
        );
        let main = std::fs::read_to_string(dir.path().join("edge-agent.1")).unwrap();
        for section in [
            ".SH FILES",
            ".SH ENVIRONMENT",
            ".SH \"EXIT STATUS\"",
            "config.toml",
        ] {
            assert!(
                main.contains(section),
                "edge-agent.1 lacks {section}:\n{main}"
            );
        }
    }
}
