//! The data spine of edge-agent: the durable local log every source writes into and every consumer
//! reads from, the bridge to the store's MQTT broker, and the Kafka uplink/downlink to HQ.
//!
//! Nothing moves between components except through the [`log`] or a bounded channel in front of it.

pub mod fuzzing;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod log;
pub mod mqtt;

pub use edge_core::deadletter;
pub use log::{Log, LogError};
