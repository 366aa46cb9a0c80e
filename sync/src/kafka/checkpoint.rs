//! Checkpoints: what HQ has committed from this store, stored in Kafka itself.
//!
//! In `exactly_once` mode every transaction ends with one record on the compacted checkpoint topic
//! (`edge.__checkpoints`), key = the store id, value = [`Checkpoint`] (JSON): the store's epoch,
//! and per stream the next seq to send (everything below is committed at HQ), plus the id of the
//! last gap reported on `edge.gaps`. Because the checkpoint commits atomically with the records it
//! covers, it is never ahead of or behind what HQ sees.
//!
//! The same transaction also commits the checkpoint as a consumer-group offset
//! (`send_offsets_to_transaction`): group [`checkpoint_group`], partition 0 of the checkpoint
//! topic, offset = the transaction counter, metadata = the checkpoint JSON. Looking that up
//! ([`lookup_checkpoint_offset`]) is one `OffsetFetch` to the group's coordinator, so a session
//! start costs the same in a fleet of ten stores or ten thousand; the topic stays the record HQ
//! reads (and the fallback).
//!
//! On start the uplink reads the checkpoint back *after* `init_transactions` has fenced any
//! earlier incarnation and completed or aborted its last transaction (so no transactional offset
//! of this store is pending). Without a usable group offset (a first start, a store upgraded from
//! a version without it, offsets expired at the broker after `offsets.retention.minutes`, or a
//! checkpoint too large for the broker's `offset.metadata.max.bytes`) it scans the topic
//! with `read_committed` ([`read_checkpoint`]), each partition up to the high watermark it had at
//! that moment, so a committed checkpoint cannot be missed.

use super::client::LinkContext;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerGroupMetadata};
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

/// The consumer group whose committed offset carries `store`'s checkpoint (HQ's ACLs must let the
/// store's principal read this group; see docs/KAFKA.md).
pub fn checkpoint_group(store: &str) -> String {
    format!("edge-agent.checkpoint.{store}")
}

/// Largest checkpoint JSON carried in an offset's metadata: the broker's default
/// `offset.metadata.max.bytes`. A larger checkpoint (about a hundred mirrored streams) is committed
/// with empty metadata, which sends the next session start to the topic scan.
pub const OFFSET_METADATA_MAX: usize = 4096;

/// The offsets to commit in the transaction that writes checkpoint `txn` (JSON `json`).
pub fn checkpoint_offsets(
    topic: &str,
    txn: u64,
    json: &[u8],
) -> Result<TopicPartitionList, KafkaError> {
    let mut tpl = TopicPartitionList::new();
    let offset = i64::try_from(txn).unwrap_or(i64::MAX);
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))?;
    let meta = match std::str::from_utf8(json) {
        Ok(s) if s.len() <= OFFSET_METADATA_MAX => s,
        _ => "",
    };
    if let Some(mut e) = tpl.find_partition(topic, 0) {
        e.set_metadata(meta);
    }
    Ok(tpl)
}

/// The group metadata `send_offsets_to_transaction` needs for [`checkpoint_group`] (a group no
/// consumer joins; the broker keeps its offsets like any simple consumer group's).
pub fn checkpoint_group_metadata(
    base: &ClientConfig,
    context: Arc<LinkContext>,
    topic: &str,
    store: &str,
) -> Result<ConsumerGroupMetadata, CheckpointError> {
    let consumer = reader(base, context, store, topic)?;
    consumer
        .group_metadata()
        .ok_or_else(|| CheckpointError::Kafka {
            topic: topic.into(),
            reason: "librdkafka returned no consumer group metadata".into(),
        })
}

/// What the group offset lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OffsetLookup {
    /// The checkpoint of the last committed transaction.
    Found(Checkpoint),
    /// No usable offset: the reason, for the log; the caller scans the topic.
    Missing(&'static str),
}

fn reader(
    base: &ClientConfig,
    context: Arc<LinkContext>,
    store: &str,
    topic: &str,
) -> Result<BaseConsumer<ArcContext>, CheckpointError> {
    let mut cfg = base.clone();
    cfg.set("group.id", checkpoint_group(store))
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
    cfg.create_with_context(ArcContext(context))
        .map_err(kafka_err(topic))
}

/// Looks up `store`'s checkpoint in its group's committed offset (blocking): one request, whatever
/// the fleet size. Errors (the coordinator away, no ACL for the group) are returned; the caller
/// decides whether to scan.
pub fn lookup_checkpoint_offset(
    base: &ClientConfig,
    context: Arc<LinkContext>,
    topic: &str,
    store: &str,
    timeout: Duration,
) -> Result<OffsetLookup, CheckpointError> {
    let consumer = reader(base, context, store, topic)?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, 0);
    let got = consumer
        .committed_offsets(tpl, timeout)
        .map_err(kafka_err(topic))?;
    let Some(e) = got.find_partition(topic, 0) else {
        return Ok(OffsetLookup::Missing("no committed offset"));
    };
    if let Err(err) = e.error() {
        return Err(kafka_err(topic)(err));
    }
    let Offset::Offset(txn) = e.offset() else {
        return Ok(OffsetLookup::Missing("no committed offset"));
    };
    if e.metadata().is_empty() {
        return Ok(OffsetLookup::Missing(
            "the committed offset carries no checkpoint (too large for its metadata)",
        ));
    }
    match serde_json::from_str::<Checkpoint>(e.metadata()) {
        Ok(cp) if cp.store == store && i64::try_from(cp.txn).ok() == Some(txn) => {
            Ok(OffsetLookup::Found(cp))
        }
        Ok(_) => Ok(OffsetLookup::Missing(
            "the committed offset holds another store's or transaction's checkpoint",
        )),
        Err(_) => {
            metrics::counter!("edge_uplink_bad_checkpoints_total").increment(1);
            Ok(OffsetLookup::Missing(
                "the committed offset's metadata is not a checkpoint",
            ))
        }
    }
}

/// Reads the newest committed checkpoint of `store` by scanning the checkpoint topic (blocking;
/// run it off the reactor). `Ok(None)` when the topic does not exist or holds no checkpoint of
/// this store. Its cost grows with the fleet (every store's checkpoints share the topic).
pub fn read_checkpoint(
    base: &ClientConfig,
    context: Arc<LinkContext>,
    topic: &str,
    store: &str,
    timeout: Duration,
) -> Result<Option<Checkpoint>, CheckpointError> {
    let consumer = reader(base, context, store, topic)?;
    let mut best: Option<Checkpoint> = None;
    let key = store.as_bytes();
    read_to_end(&consumer, topic, None, timeout, |m| {
        if m.key() != Some(key) {
            return;
        }
        match m.payload().map(serde_json::from_slice::<Checkpoint>) {
            Some(Ok(cp)) if cp.store == store && best.as_ref().is_none_or(|b| cp.txn >= b.txn) => {
                best = Some(cp);
            }
            Some(Ok(_)) | None => {}
            Some(Err(e)) => {
                metrics::counter!("edge_uplink_bad_checkpoints_total").increment(1);
                tracing::warn!(topic, partition = m.partition(), offset = m.offset(), error = %e,
                    "ignoring a checkpoint record of this store that is not valid JSON");
            }
        }
    })?;
    Ok(best)
}

/// Reads every partition of `topic` from `since_ms` (a timestamp; `None`: the beginning) up to the
/// high watermark it has when the read starts, handing each record to `each` (blocking). With a
/// `read_committed` consumer, a partition whose end is held back by an open transaction is waited
/// for until `timeout`. A topic that does not exist reads as empty.
pub fn read_to_end<C: rdkafka::consumer::ConsumerContext>(
    consumer: &BaseConsumer<C>,
    topic: &str,
    since_ms: Option<i64>,
    timeout: Duration,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>),
) -> Result<(), CheckpointError> {
    let deadline = Instant::now() + timeout;
    let op_timeout = Duration::from_secs(10).min(timeout);
    let md = consumer
        .fetch_metadata(Some(topic), op_timeout)
        .map_err(kafka_err(topic))?;
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Ok(());
    };
    match t.error() {
        None => {}
        Some(e) if RDKafkaErrorCode::from(e) == RDKafkaErrorCode::UnknownTopicOrPartition => {
            return Ok(());
        }
        Some(e) => {
            return Err(CheckpointError::Kafka {
                topic: topic.into(),
                reason: RDKafkaErrorCode::from(e).to_string(),
            });
        }
    }
    // Every partition up to the high watermark it has now (a store's records land in one
    // partition, but reading all of them keeps this right if the partition count ever changes).
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
    if let Some(ts) = since_ms
        && tpl.count() > 0
    {
        let mut at = TopicPartitionList::new();
        for e in tpl.elements() {
            at.add_partition_offset(topic, e.partition(), Offset::Offset(ts))
                .map_err(kafka_err(topic))?;
        }
        let found = consumer
            .offsets_for_times(at, op_timeout)
            .map_err(kafka_err(topic))?;
        let mut from = TopicPartitionList::new();
        for e in found.elements() {
            match e.offset() {
                Offset::Offset(o) => {
                    from.add_partition_offset(topic, e.partition(), Offset::Offset(o))
                        .map_err(kafka_err(topic))?;
                }
                // Nothing at or after the time in this partition.
                _ => {
                    need.remove(&e.partition());
                }
            }
        }
        tpl = from;
    }
    if need.is_empty() {
        return Ok(());
    }
    consumer.assign(&tpl).map_err(kafka_err(topic))?;
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
                each(&m);
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
    Ok(())
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

    #[test]
    fn the_group_offset_carries_the_checkpoint_when_it_fits_and_nothing_when_not() {
        let mut cp = Checkpoint::new("s1", Uuid::nil());
        cp.txn = 42;
        let json = serde_json::to_vec(&cp).unwrap();
        let tpl = checkpoint_offsets("edge.__checkpoints", 42, &json).unwrap();
        let e = tpl.find_partition("edge.__checkpoints", 0).unwrap();
        assert_eq!(e.offset(), Offset::Offset(42));
        let back: Checkpoint = serde_json::from_str(e.metadata()).unwrap();
        assert_eq!(back, cp);
        assert_eq!(tpl.count(), 1);
        // A store with so many streams that its checkpoint exceeds the broker's default metadata
        // limit: empty metadata, so the next start falls back to the topic scan instead of the
        // transaction failing on OFFSET_METADATA_TOO_LARGE at every commit.
        for i in 0..200 {
            cp.streams.insert(
                format!("store.stream.number.{i}"),
                StreamCheckpoint { next_seq: 1 << 40 },
            );
        }
        let json = serde_json::to_vec(&cp).unwrap();
        assert!(json.len() > OFFSET_METADATA_MAX);
        let tpl = checkpoint_offsets("edge.__checkpoints", 43, &json).unwrap();
        let e = tpl.find_partition("edge.__checkpoints", 0).unwrap();
        assert_eq!(e.offset(), Offset::Offset(43));
        assert_eq!(e.metadata(), "");
        assert_eq!(checkpoint_group("s1"), "edge-agent.checkpoint.s1");
    }
}
