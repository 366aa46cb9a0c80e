//! The edge-agent daemon and CLI: configuration, wiring of components, supervision, signals, and
//! the local HTTP endpoint for health, status and metrics. Logic lives in the library crates
//! (`edge-sync`, `edge-drivers`, `edge-models`); this crate only wires them.

pub mod cli;
pub mod config;
pub mod daemon;
pub mod doctor;
pub mod fleet;
pub mod fuzzing;
pub mod hq_sign;
pub mod http;
pub mod logging;
pub mod man;
pub mod memory;
pub mod report;
pub mod scrape;
pub mod state;
pub mod supervise;
pub mod systemd;
