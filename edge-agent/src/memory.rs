//! Process-wide memory settings that must be in place before the first allocation.
//!
//! glibc's malloc gives every thread that meets a locked heap an arena of its own, up to eight
//! per core. The agent has many threads that allocate: tokio workers and blocking threads (SQLite
//! reads, the Kafka sender), the log writer, librdkafka's broker threads. Memory freed in one arena
//! is not reused by another, so a drain to Kafka held 2-3x its live data resident (see
//! `docs/BENCHMARKS.md`, "Kafka drain"). Two arenas keep contention low and memory small.
//!
//! The limit is glibc's `MALLOC_ARENA_MAX`, read only when the process starts (setting it with
//! `mallopt` would need unsafe FFI, which the workspace forbids). So `run` re-executes the agent
//! once with the variable set, unless the environment already sets it (then the operator's value
//! wins; the systemd unit may set it directly and save the re-exec). `exec` keeps the process
//! id, so systemd, PID files and the tests' signals see one process.

use std::os::unix::process::CommandExt;

/// The glibc variable.
pub const ARENA_ENV: &str = "MALLOC_ARENA_MAX";
/// The agent's value.
pub const ARENA_MAX: &str = "2";

/// Re-executes this binary with [`ARENA_ENV`] set when it is not set yet (glibc Linux only).
/// Returns only when no re-exec happened: the variable was already set, or exec failed (then the
/// agent runs on with glibc's defaults and says so).
pub fn limit_malloc_arenas() {
    if !cfg!(all(target_os = "linux", target_env = "gnu")) || std::env::var_os(ARENA_ENV).is_some()
    {
        return;
    }
    let mut args = std::env::args_os();
    let arg0 = args.next().unwrap_or_else(|| "edge-agent".into());
    let err = std::process::Command::new("/proc/self/exe")
        .arg0(arg0)
        .args(args)
        .env(ARENA_ENV, ARENA_MAX)
        .exec();
    eprintln!(
        "edge-agent: could not restart itself with {ARENA_ENV}={ARENA_MAX} ({err}); running with glibc's default malloc arenas, which holds more memory"
    );
}
