//! Shared vocabulary of edge-agent.
//!
//! * [`Event`] is the one envelope every source hands to the local log, and [`Record`] is what every
//!   consumer reads back (an event plus its identity in the log).
//! * [`Priority`] is the eviction class of a stream (see PRODUCT.md, guarantee 2).
//! * [`config`] holds the small config primitives (problem collection with paths, byte sizes).
//! * [`shutdown`] is the cancellation plumbing every long-running task selects on.
//! * [`log`] is the interface of the local log; [`component`] what every component receives;
//!   [`status`] where components report their state.
//! * [`signing`] verifies HQ's ed25519 signatures (downlink records, models); [`downlink`] decides
//!   which HQ records a store applies, and [`command`] parses HQ's commands.
//! * [`backoff`] is the one retry backoff, [`cursor`] the one durable-cursor reader of a stream.
//!
//! This crate depends on nothing heavy so that drivers, models and sync never depend on the binary or
//! on each other.

pub mod backoff;
pub mod command;
pub mod component;
pub mod config;
pub mod cursor;
pub mod deadletter;
pub mod downlink;
pub mod event;
pub mod fuzzing;
pub mod log;
pub mod priority;
pub mod shutdown;
pub mod signing;
pub mod status;
pub mod time;
pub mod tls;

pub use event::{Event, Header, Record};
pub use priority::Priority;
pub use shutdown::Shutdown;
pub use status::{State, Status, StatusHandle};
