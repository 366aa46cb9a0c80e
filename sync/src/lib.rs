//! The data spine of edge-agent: the durable local log every source writes into and every consumer
//! reads from, and the bridges that move records between the log and the store's MQTT broker.
//!
//! Nothing moves between components except through the [`log`] or a bounded channel in front of it.

pub mod deadletter;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod log;
pub mod mqtt;

pub use log::{Log, LogError};
