//! Mirror to HQ: the Kafka uplink (local streams -> HQ topics, exactly once) and downlink (HQ
//! topics -> local streams, applied atomically with their offsets).
//!
//! The topic contract for HQ consumers is in `docs/KAFKA.md`. Built with the `kafka` feature
//! (bundled librdkafka).

mod checkpoint;
pub mod client;
/// HQ's commands (parsed in `edge-core`, where the downlink's admission check and its fuzz target
/// use them too).
pub use edge_core::command;
pub mod config;
pub mod downlink;
pub mod fleet;
mod probe;
pub mod record;
mod topics;
pub mod uplink;

pub use checkpoint::{
    CHECKPOINT_SCHEMA, Checkpoint, CheckpointError, OFFSET_METADATA_MAX, OffsetLookup,
    StreamCheckpoint, checkpoint_group, lookup_checkpoint_offset, read_checkpoint,
};
pub use config::{
    Compression, DeliveryMode, DownlinkConfig, DownlinkTopic, HqKey, KafkaConfig, KafkaConfigError,
    KeyMode, SaslMechanism, SecurityConfig, SecurityProtocol, StartFrom,
};
pub use downlink::{Downlink, DownlinkError};
pub use probe::{ProbeError, ProbeReport, probe};
pub use uplink::{Uplink, UplinkError};
