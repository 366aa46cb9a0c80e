//! Process-wide memory settings, applied before the runtime starts its threads.
//!
//! glibc's malloc gives every thread that meets a locked heap an arena of its own, up to eight
//! per core. The agent has many threads that allocate: tokio workers and blocking threads (SQLite
//! reads, the Kafka sender), the log writer, librdkafka's broker threads. Memory freed in one arena
//! is not reused by another, so a drain to Kafka held 2-3x its live data resident (see
//! `docs/BENCHMARKS.md`, "Kafka drain"). Two arenas keep contention low and memory small; the C
//! libraries (SQLite, librdkafka) allocate through the same malloc, so no Rust allocator swap would
//! do this.

/// glibc's environment variable for the same limit; when the operator sets it, it wins.
pub const ARENA_ENV: &str = "MALLOC_ARENA_MAX";
/// The agent's limit.
pub const ARENA_MAX: i32 = 2;

/// Limits glibc's malloc to [`ARENA_MAX`] arenas unless [`ARENA_ENV`] is set (glibc Linux only;
/// elsewhere, e.g. musl, nothing to do). Call it first in `main`, before any thread is spawned.
/// Returns whether the limit was applied.
pub fn limit_malloc_arenas() -> bool {
    if std::env::var_os(ARENA_ENV).is_some() {
        return false;
    }
    set_arena_max(ARENA_MAX)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn set_arena_max(n: i32) -> bool {
    // SAFETY: `mallopt` only stores a malloc tuning parameter (glibc documents it as MT-safe); it
    // takes two integers and touches no memory of ours. A failure returns 0 and changes nothing.
    let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, n) };
    if ok != 1 {
        eprintln!(
            "edge-agent: could not limit malloc arenas to {n}; running with glibc's default, which holds more memory"
        );
    }
    ok == 1
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set_arena_max(_n: i32) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_applied_unless_the_operator_set_one() {
        let applied = limit_malloc_arenas();
        let expected = std::env::var_os(ARENA_ENV).is_none()
            && cfg!(all(target_os = "linux", target_env = "gnu"));
        assert_eq!(applied, expected);
    }
}
