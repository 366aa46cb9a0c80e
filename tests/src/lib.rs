//! Harnesses for end-to-end tests: real Mosquitto brokers on free ports, the real agent as a child
//! process, a FUSE filesystem that loses unsynced writes at a simulated power cut, and an MQTT publisher that knows which of its messages the broker acknowledged.
//!
//! Tests poll for conditions with deadlines ([`wait_for`]); nothing sleeps to synchronise.

pub mod agent;
pub mod kafka;
pub mod mosquitto;
pub mod powercut;
pub mod publisher;
pub mod tmpfs;

use std::time::{Duration, Instant};

/// A free TCP port on loopback (bound and released; the small reuse race is acceptable in tests).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// Polls `cond` until it holds or `timeout` passes; panics with `what` on timeout.
pub fn wait_for(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// True when running under CI: a missing tool is then a failure, never a skip.
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// Path of a program on PATH, or a panic that says how to install it.
pub fn require_program(name: &str, package: &str) -> std::path::PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    for dir in ["/usr/sbin", "/sbin"] {
        let p = std::path::Path::new(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "{name} is required by this test: install the Debian package {package} (scripts/install-deps.sh does)"
    );
}
