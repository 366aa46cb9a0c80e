//! Checkpoints: what HQ has committed from this store, stored in Kafka itself.
//!
//! In `exactly_once` mode every transaction ends with one record on the compacted checkpoint topic
//! (`edge.__checkpoints`), key = the store id, value = [`Checkpoint`] (JSON): the store's epoch,
//! and per stream the next seq to send (everything below is committed at HQ), plus the id of the
//! last gap reported on `edge.gaps`. Because the checkpoint commits atomically with the records it
//! covers, it is never ahead of or behind what HQ sees.
//!
//! On start the uplink reads the checkpoint back with `read_committed` ([`read_checkpoint`]),
//! *after* `init_transactions` has fenced any earlier incarnation and completed or aborted its last
//! transaction, and reads each partition up to the high watermark it had at that moment, so a
//! committed checkpoint cannot be missed.

use super::client::LinkContext;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use uuid::Uuid;

pub const CHECKPOINT_SCHEMA: &str = "edge.checkpoint/1";

/// One stream's position in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamCheckpoint {
    /// The next seq the uplink will send; every record below it is committed at HQ (or was a gap).
    pub next_seq: u64,
}

/// The value of a checkpoint record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub schema: String,
    pub store: String,
    /// The local log incarnation the positions belong to.
    pub epoch: Uuid,
    pub streams: BTreeMap<String, StreamCheckpoint>,
    /// Id of the last local gap reported on the gaps topic.
    pub gap_id: u64,
    /// Transaction counter of this store's uplink; the highest one is the newest checkpoint.
    pub txn: u64,
    pub ts_ms: i64,
    pub agent_version: String,
}

impl Checkpoint {
    pub fn new(store: &str, epoch: Uuid) -> Checkpoint {
        Checkpoint {
            schema: CHECKPOINT_SCHEMA.into(),
            store: store.into(),
            epoch,
            streams: BTreeMap::new(),
            gap_id: 0,
            txn: 0,
            ts_ms: 0,
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    pub fn next_seq(&self, stream: &str) -> Option<u64> {
        self.streams.get(stream).map(|s| s.next_seq)
    }
}

/// Errors of reading checkpoints back.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("cannot read checkpoints from topic {topic}: {reason}")]
    Kafka { topic: String, reason: String },
    #[error(
        "checkpoint topic {topic} was not readable up to its end within {secs}s (an open transaction of another producer?); retrying"
    )]
    Timeout { topic: String, secs: u64 },
}

fn kafka_err(topic: &str) -> impl Fn(KafkaError) -> CheckpointError + '_ {
    move |e| CheckpointError::Kafka {
        topic: topic.to_string(),
        reason: e.to_string(),
    }
}

/// Reads the newest committed checkpoint of `store` (blocking; run it off the reactor). `Ok(None)`
/// when the topic does not exist or holds no checkpoint of this store.
pub fn read_checkpoint(
    base: &ClientConfig,
    context: Arc<LinkContext>,
    topic: &str,
    store: &str,
    timeout: Duration,
) -> Result<Option<Checkpoint>, CheckpointError> {
    let deadline = Instant::now() + timeout;
    let mut cfg = base.clone();
    cfg.set("group.id", format!("edge-agent.checkpoint-reader.{store}"))
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("allow.auto.create.topics", "false")
        // The reader is on the drain's critical path after a restart: never let the broker hold a
        // fetch at the end of a partition.
        .set("fetch.wait.max.ms", "10")
        .set("fetch.error.backoff.ms", "50")
        // Checkpoints are small JSON records, but the topic holds every store's: librdkafka's
        // default prefetch (64 MiB queued, 50 MiB per fetch) would fill memory at each start
        // while the reader scans past other stores' checkpoints. 1 MiB keeps that bounded
        // (fetch.max.bytes follows it, at least message.max.bytes).
        .set("queued.max.messages.kbytes", "1024");
    let consumer: BaseConsumer<ArcContext> = cfg
        .create_with_context(ArcContext(context))
        .map_err(kafka_err(topic))?;
    let op_timeout = Duration::from_secs(10).min(timeout);
    let md = consumer
        .fetch_metadata(Some(topic), op_timeout)
        .map_err(kafka_err(topic))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(None);
    };
    match t.error() {
        None => {}
        Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => {
            return Ok(None);
        }
        Some(e) => {
            return Err(CheckpointError::Kafka {
                topic: topic.into(),
                reason: RDKafkaErrorCode::from(e).to_string(),
            });
        }
    }
    // Read every partition up to the high watermark it has now. A store's checkpoints land in one
    // partition, but reading all of them keeps this right if the partition count ever changes.
    let mut need: HashMap<i32, i64> = HashMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in t.partitions() {
        let (lo, hi) = consumer
            .fetch_watermarks(topic, p.id(), op_timeout)
            .map_err(kafka_err(topic))?;
        if hi > lo {
            need.insert(p.id(), hi);
            tpl.add_partition_offset(topic, p.id(), Offset::Beginning)
                .map_err(kafka_err(topic))?;
        }
    }
    if need.is_empty() {
        return Ok(None);
    }
    consumer.assign(&tpl).map_err(kafka_err(topic))?;
    let mut best: Option<Checkpoint> = None;
    let key = store.as_bytes();
    while !need.is_empty() {
        if Instant::now() >= deadline {
            return Err(CheckpointError::Timeout {
                topic: topic.into(),
                secs: timeout.as_secs(),
            });
        }
        match consumer.poll(Duration::from_millis(200)) {
            None => {}
            Some(Ok(m)) => {
                if m.key() == Some(key) {
                    match m.payload().map(serde_json::from_slice::<Checkpoint>) {
                        Some(Ok(cp))
                            if cp.store == store
                                && best.as_ref().is_none_or(|b| cp.txn >= b.txn) =>
                        {
                            best = Some(cp);
                        }
                        Some(Ok(_)) => {}
                        Some(Err(e)) => {
                            metrics::counter!("edge_uplink_bad_checkpoints_total").increment(1);
                            tracing::warn!(topic, partition = m.partition(), offset = m.offset(), error = %e,
                                "ignoring a checkpoint record of this store that is not valid JSON");
                        }
                        None => {}
                    }
                }
                if need
                    .get(&m.partition())
                    .is_some_and(|hi| m.offset() + 1 >= *hi)
                {
                    need.remove(&m.partition());
                }
            }
            Some(Err(KafkaError::PartitionEOF(p))) => {
                // At the end of what read_committed may see. Done if that end is at or past the
                // high watermark we started from (control records of the last transaction
                // included); otherwise a transaction is still open and the end will move.
                let pos = consumer.position().map_err(kafka_err(topic))?;
                let at = pos
                    .find_partition(topic, p)
                    .and_then(|e| e.offset().to_raw())
                    .unwrap_or(-1);
                if need.get(&p).is_some_and(|hi| at >= *hi) {
                    need.remove(&p);
                }
            }
            Some(Err(e)) => return Err(kafka_err(topic)(e)),
        }
    }
    Ok(best)
}

/// Lets several clients share one [`LinkContext`].
pub(crate) struct ArcContext(pub(crate) Arc<LinkContext>);

impl rdkafka::client::ClientContext for ArcContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.0.log(level, fac, message)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.0.error(error, reason)
    }
}

impl rdkafka::consumer::ConsumerContext for ArcContext {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_json_is_the_documented_shape() {
        let mut cp = Checkpoint::new("s1", Uuid::nil());
        cp.streams
            .insert("pos.transactions".into(), StreamCheckpoint { next_seq: 11 });
        cp.gap_id = 2;
        cp.txn = 7;
        let v = serde_json::to_value(&cp).unwrap();
        assert_eq!(v["schema"], "edge.checkpoint/1");
        assert_eq!(v["streams"]["pos.transactions"]["next_seq"], 11);
        assert_eq!(v["epoch"], "00000000-0000-0000-0000-000000000000");
        let back: Checkpoint = serde_json::from_value(v).unwrap();
        assert_eq!(back, cp);
        assert_eq!(back.next_seq("pos.transactions"), Some(11));
        assert_eq!(back.next_seq("x"), None);
    }
}
