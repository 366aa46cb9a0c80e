//! The downlink: HQ topics (prices, campaigns, models, commands) into local streams.
//!
//! Invariants:
//! * **Exactly-once apply.** The records of a batch and the consumed offsets of every partition
//!   they came from are one log request, so they commit in one SQLite transaction: after a crash
//!   the downlink seeks to the stored offsets and neither loses nor repeats a record. No consumer
//!   group offsets are used (the log is the only place offsets live).
//! * **Only this store's records, only HQ's.** Each record passes [`edge_core::downlink::admit`]:
//!   it is for this store (`edge.store` header, else its key), its signature verifies against the
//!   configured HQ keys (`[[kafka.downlink.keys]]`; required on `hq.commands` by default), and a
//!   command names this store and parses. Skipped records still move the stored offset.
//! * **One bad record costs one record.** A refused record goes to `deadletter` with its reason in
//!   the same transaction as the batch, and its offset is committed with it: it is counted
//!   (`edge_downlink_refused_total{reason}`, status `refused_records`) and never retried.
//! * **read_committed**: aborted HQ transactions never reach the store.
//! * Memory is bounded by librdkafka's fetch queue (`queued.max.messages.kbytes`) and one batch.

use super::checkpoint::ArcContext;
use super::client::{Backoff, LinkContext};
use super::config::{KafkaConfig, KafkaConfigError, StartFrom};
use super::record::{H_EVENT_ID, H_SCHEMA};
use edge_core::Event;
use edge_core::component::{ComponentContext, ComponentError, Task};
use edge_core::deadletter::{DEFAULT_KEEP_BYTES, DeadLetter};
use edge_core::downlink::{Admission, Incoming, Refusal, TopicPolicy, admit};
use edge_core::log::{AppendRequest, LogError};
use edge_core::signing::Verifier;
use edge_core::status::State;
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::Headers;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Errors that stop the downlink.
#[derive(Debug, thiserror::Error)]
pub enum DownlinkError {
    #[error(transparent)]
    Config(#[from] KafkaConfigError),
    #[error("the Kafka consumer could not be created: {0}; check kafka.client_properties")]
    Client(String),
    #[error("the local log failed ({0}); the downlink stops")]
    Log(#[from] LogError),
}

/// The downlink component.
#[derive(Debug, Clone)]
pub struct Downlink {
    cfg: KafkaConfig,
}

/// The kv key holding the next offset of a partition.
pub fn offset_key(topic: &str, partition: i32) -> String {
    format!("downlink.offset.{topic}.{partition}")
}

pub use edge_core::downlink::for_store;

enum Stop {
    Shutdown,
    Retry(String),
    Fatal(DownlinkError),
}

impl From<LogError> for Stop {
    fn from(e: LogError) -> Stop {
        match e {
            LogError::Closed => Stop::Shutdown,
            e => Stop::Fatal(DownlinkError::Log(e)),
        }
    }
}

/// One consumed record, detached from the consumer.
struct Consumed {
    topic: String,
    partition: i32,
    offset: i64,
    verdict: Verdict,
}

impl Consumed {
    /// Bytes the record holds in memory until its batch is applied.
    fn bytes(&self) -> usize {
        let event = match &self.verdict {
            Verdict::Apply(e) => e,
            Verdict::Refuse { dead_letter, .. } => dead_letter,
            Verdict::Skip => return 0,
        };
        event.payload.len()
            + event.key.as_ref().map_or(0, String::len)
            + event
                .headers
                .iter()
                .map(|h| h.key.len() + h.value.len())
                .sum::<usize>()
    }
}

enum Verdict {
    Apply(Event),
    /// Another store's record (or a topic no longer configured).
    Skip,
    /// Not applied: its dead letter goes to the log instead.
    Refuse {
        refusal: Refusal,
        dead_letter: Event,
    },
}

/// The most recent refusal, for `status`.
#[derive(Debug, Clone, serde::Serialize)]
struct LastRefusal {
    reason: &'static str,
    detail: String,
    topic: String,
    partition: i32,
    offset: i64,
    at_ms: i64,
}

/// What the downlink applies each topic with.
struct Policies {
    topics: HashMap<String, TopicPolicy>,
    verifier: Verifier,
}

impl Downlink {
    pub fn new(cfg: KafkaConfig) -> Downlink {
        Downlink { cfg }
    }

    /// Checks the config and reads the secret files now; returns the running task.
    pub fn build(self, ctx: ComponentContext) -> Result<Task, DownlinkError> {
        self.cfg.check()?;
        let base = self
            .cfg
            .base_client_config(&format!("edge-agent.{}.downlink", ctx.store_id))?;
        let cfg = Arc::new(self.cfg);
        Ok(Box::pin(async move {
            run(cfg, base, ctx)
                .await
                .map_err(|e| Box::new(e) as ComponentError)
        }))
    }
}

async fn run(
    cfg: Arc<KafkaConfig>,
    base: ClientConfig,
    ctx: ComponentContext,
) -> Result<(), DownlinkError> {
    let link = Arc::new(LinkContext::new("downlink"));
    let mut backoff = Backoff::new(
        Duration::from_millis(200),
        Duration::from_millis(cfg.reconnect_backoff_max_ms.max(1000)),
    );
    let routes = Policies {
        topics: cfg.downlink_policies().into_iter().collect(),
        verifier: cfg.downlink_verifier(),
    };
    let mut signed_topics: Vec<&str> = routes
        .topics
        .iter()
        .filter(|(_, p)| p.require_signature)
        .map(|(t, _)| t.as_str())
        .collect();
    signed_topics.sort_unstable();
    ctx.status
        .field("signature_keys", routes.verifier.keys().len());
    ctx.status
        .field("signature_required", signed_topics.clone());
    if routes.verifier.is_empty() && !signed_topics.is_empty() {
        tracing::warn!(
            component = "downlink",
            topics = signed_topics.join(","),
            "no HQ public key is configured ([[kafka.downlink.keys]]): every record of these topics is refused as unsigned"
        );
    }
    ctx.status.field(
        "topics",
        cfg.downlink
            .topics
            .iter()
            .map(|t| t.topic.clone())
            .collect::<Vec<_>>(),
    );
    let mut stats = Stats::default();
    loop {
        match session(&cfg, &base, &ctx, &link, &routes, &mut stats).await {
            Stop::Shutdown => break,
            Stop::Fatal(e) => {
                ctx.status.set(State::Down, e.to_string());
                return Err(e);
            }
            Stop::Retry(detail) => {
                ctx.status.set(State::Down, detail);
                if !backoff.sleep(ctx.shutdown.intake()).await {
                    break;
                }
            }
        }
        if stats.applied_in_session > 0 {
            backoff.reset();
            stats.applied_in_session = 0;
        }
    }
    ctx.status.set(State::Stopped, "stopped");
    Ok(())
}

#[derive(Default)]
struct Stats {
    applied: u64,
    skipped: u64,
    refused: u64,
    refused_by_reason: BTreeMap<&'static str, u64>,
    last_refusal: Option<LastRefusal>,
    applied_in_session: u64,
    /// Local transactions applied, and the most bytes one of them held (`batch_max_bytes`).
    batches: u64,
    largest_batch_bytes: usize,
}

fn trouble_detail(link: &LinkContext, what: &str, cfg: &KafkaConfig) -> String {
    match link.recent_error(Duration::from_secs(60)) {
        Some(e) => format!(
            "{what} at {} failed: {} ({}); prices and campaigns already applied stay active; retrying",
            cfg.brokers.join(","),
            e.trouble.as_str(),
            e.trouble.advice()
        ),
        None => format!(
            "{what} at {} failed; prices and campaigns already applied stay active; retrying",
            cfg.brokers.join(",")
        ),
    }
}

async fn session(
    cfg: &KafkaConfig,
    base: &ClientConfig,
    ctx: &ComponentContext,
    link: &Arc<LinkContext>,
    routes: &Policies,
    stats: &mut Stats,
) -> Stop {
    let mut c = base.clone();
    c.set("group.id", format!("edge-agent.{}.downlink", ctx.store_id))
        .set("isolation.level", "read_committed")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("allow.auto.create.topics", "false")
        .set(
            "auto.offset.reset",
            match cfg.downlink.start_from {
                StartFrom::Earliest => "earliest",
                StartFrom::Latest => "latest",
            },
        )
        .set("queued.max.messages.kbytes", "8192")
        .set("fetch.max.bytes", "8388608");
    let consumer: StreamConsumer<ArcContext> = match c.create_with_context(ArcContext(link.clone()))
    {
        Ok(c) => c,
        Err(e) => return Stop::Fatal(DownlinkError::Client(e.to_string())),
    };
    let consumer = Arc::new(consumer);
    // topic -> partition -> next offset
    let mut assigned: BTreeMap<String, BTreeMap<i32, i64>> = BTreeMap::new();
    let refresh = Duration::from_millis(cfg.downlink.metadata_refresh_ms);
    let mut next_refresh = Instant::now();
    let max_wait = Duration::from_millis(cfg.downlink.batch_max_wait_ms);
    // The downlink is a source: it stops with intake (what it applied is committed already).
    let cancel = ctx.shutdown.intake().clone();
    let mut batch: Vec<Consumed> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut batch_deadline: Option<Instant> = None;
    let mut next_health = Instant::now() + Duration::from_secs(1);
    let mut troubled = false;
    loop {
        if Instant::now() >= next_health {
            next_health = Instant::now() + Duration::from_secs(1);
            // librdkafka reconnects by itself; the status tells the truth meanwhile.
            match link.recent_error(Duration::from_secs(3)) {
                Some(_) => {
                    troubled = true;
                    ctx.status.set(
                        State::Down,
                        trouble_detail(link, "consuming HQ topics", cfg),
                    );
                }
                None if troubled => {
                    troubled = false;
                    next_refresh = Instant::now();
                }
                None => {}
            }
        }
        if Instant::now() >= next_refresh {
            next_refresh = Instant::now() + refresh;
            match discover(cfg, ctx, &consumer, &mut assigned).await {
                Ok(missing) => {
                    let parts: usize = assigned.values().map(BTreeMap::len).sum();
                    ctx.status.field("partitions", parts);
                    if missing.is_empty() {
                        ctx.status.set(
                            State::Up,
                            format!("applying HQ topics from {}", cfg.describe()),
                        );
                    } else {
                        ctx.status.set(
                            State::Degraded,
                            format!(
                                "HQ topic(s) {} do not exist yet; the others are applied; checking again every {}s",
                                missing.join(", "),
                                refresh.as_secs()
                            ),
                        );
                    }
                }
                Err(Stop::Retry(_)) => {
                    return Stop::Retry(trouble_detail(link, "discovering HQ topics", cfg));
                }
                Err(other) => return other,
            }
        }
        let wake = match batch_deadline {
            Some(d) => d.min(next_refresh),
            None => next_refresh,
        }
        .min(next_health);
        tokio::select! {
            _ = cancel.cancelled() => {
                // What was consumed but not applied is consumed again after the restart.
                return Stop::Shutdown;
            }
            m = consumer.recv() => match m {
                Ok(m) => {
                    let c = detach(&ctx.store_id, routes, &m);
                    batch_bytes += c.bytes();
                    batch.push(c);
                    batch_deadline.get_or_insert_with(|| Instant::now() + max_wait);
                }
                Err(e) => {
                    link.warn_once(&format!("consuming from HQ failed: {e}; retrying"));
                    link.record_error(e.rdkafka_error_code(), &e.to_string());
                    if e.rdkafka_error_code().is_some_and(|c| matches!(c, RDKafkaErrorCode::Fatal)) {
                        return Stop::Retry(trouble_detail(link, "consuming", cfg));
                    }
                }
            },
            _ = tokio::time::sleep_until(wake.into()) => {}
        }
        let full = batch.len() >= cfg.downlink.batch_max_records
            || batch_bytes as u64 >= cfg.downlink.batch_max_bytes.as_u64();
        let due = batch_deadline.is_some_and(|d| Instant::now() >= d);
        if !batch.is_empty() && (full || due) {
            match apply(ctx, std::mem::take(&mut batch), &mut assigned, stats).await {
                Ok(()) => {}
                Err(e) => return e.into(),
            }
            stats.batches += 1;
            stats.largest_batch_bytes = stats.largest_batch_bytes.max(batch_bytes);
            batch_deadline = None;
            batch_bytes = 0;
            ctx.status.field("batches_applied_total", stats.batches);
            ctx.status
                .field("largest_batch_bytes", stats.largest_batch_bytes);
            ctx.status.field("records_applied_total", stats.applied);
            ctx.status.field("records_skipped_total", stats.skipped);
            ctx.status.field("refused_records", stats.refused);
            if let Some(last) = &stats.last_refusal {
                ctx.status.field(
                    "refused_by_reason",
                    serde_json::json!(stats.refused_by_reason),
                );
                ctx.status.field("last_refusal", serde_json::json!(last));
            }
        }
    }
}

/// Assigns partitions of the configured topics that are not assigned yet, at their stored
/// offsets. Returns the topics that do not exist.
async fn discover(
    cfg: &KafkaConfig,
    ctx: &ComponentContext,
    consumer: &Arc<StreamConsumer<ArcContext>>,
    assigned: &mut BTreeMap<String, BTreeMap<i32, i64>>,
) -> Result<Vec<String>, Stop> {
    let mut missing = Vec::new();
    let mut add = TopicPartitionList::new();
    for t in &cfg.downlink.topics {
        let c = consumer.clone();
        let topic = t.topic.clone();
        let md = tokio::task::spawn_blocking(move || {
            c.fetch_metadata(Some(&topic), Duration::from_secs(10))
        })
        .await;
        let md = match md {
            Ok(Ok(md)) => md,
            Ok(Err(_)) => return Err(Stop::Retry(String::new())),
            Err(e) => return Err(Stop::Fatal(DownlinkError::Client(e.to_string()))),
        };
        let Some(tm) = md.topics().iter().find(|x| x.name() == t.topic) else {
            missing.push(t.topic.clone());
            continue;
        };
        if tm.error().is_some() || tm.partitions().is_empty() {
            missing.push(t.topic.clone());
            continue;
        }
        let ids: Vec<i32> = tm.partitions().iter().map(|p| p.id()).collect();
        drop(md);
        let known = assigned.entry(t.topic.clone()).or_default();
        for id in ids {
            if known.contains_key(&id) {
                continue;
            }
            let stored = ctx
                .log
                .kv_get(&offset_key(&t.topic, id))
                .await
                .map_err(Stop::from)?
                .and_then(|v| String::from_utf8(v).ok())
                .and_then(|s| s.parse::<i64>().ok());
            let offset = match stored {
                Some(o) => Offset::Offset(o),
                None => match cfg.downlink.start_from {
                    StartFrom::Earliest => Offset::Beginning,
                    StartFrom::Latest => Offset::End,
                },
            };
            if let Err(e) = add.add_partition_offset(&t.topic, id, offset) {
                return Err(Stop::Fatal(DownlinkError::Client(e.to_string())));
            }
            // -1: not applied anything yet (the stored offset, if any, stays as it is).
            known.insert(id, stored.unwrap_or(-1));
        }
    }
    if add.count() > 0 {
        tracing::info!(
            component = "downlink",
            partitions = add.count(),
            "assigning HQ partitions at the stored offsets"
        );
        if let Err(e) = consumer.incremental_assign(&add) {
            return Err(Stop::Fatal(DownlinkError::Client(e.to_string())));
        }
    }
    Ok(missing)
}

fn detach(store: &str, routes: &Policies, m: &rdkafka::message::BorrowedMessage<'_>) -> Consumed {
    let topic = m.topic().to_string();
    let raw: Vec<(&str, Option<&[u8]>)> = m
        .headers()
        .map(|h| h.iter().map(|x| (x.key, x.value)).collect())
        .unwrap_or_default();
    let verdict = match routes.topics.get(&topic) {
        None => Verdict::Skip,
        Some(policy) => {
            let rec = Incoming {
                key: m.key(),
                payload: m.payload(),
                headers: &raw,
            };
            match admit(
                store,
                policy,
                &routes.verifier,
                &rec,
                edge_core::time::now_ms(),
            ) {
                Admission::OtherStore => Verdict::Skip,
                Admission::Apply { .. } => Verdict::Apply(to_event(&policy.stream, m, &raw)),
                Admission::Refuse(refusal) => {
                    let dead_letter = dead_letter(&policy.stream, m, &raw, &refusal);
                    Verdict::Refuse {
                        refusal,
                        dead_letter,
                    }
                }
            }
        }
    };
    Consumed {
        topic,
        partition: m.partition(),
        offset: m.offset(),
        verdict,
    }
}

fn utf8_headers<'a>(
    raw: &'a [(&'a str, Option<&'a [u8]>)],
) -> impl Iterator<Item = (&'a str, &'a str)> {
    raw.iter()
        .filter_map(|(k, v)| Some((*k, std::str::from_utf8((*v)?).ok()?)))
}

fn to_event(
    stream: &Arc<str>,
    m: &rdkafka::message::BorrowedMessage<'_>,
    raw: &[(&str, Option<&[u8]>)],
) -> Event {
    let topic = m.topic();
    let mut e = Event::new(stream.clone(), m.payload().unwrap_or_default().to_vec());
    if let Some(ts) = m.timestamp().to_millis() {
        e = e.with_event_ts(ts);
    }
    if let Some(k) = m.key() {
        e = e.with_key(String::from_utf8_lossy(k).into_owned());
    }
    e = e.with_source(format!("kafka:{topic}"));
    for (k, v) in utf8_headers(raw) {
        match k {
            H_EVENT_ID => e = e.with_event_id(v),
            H_SCHEMA => e = e.with_schema(v),
            _ => {}
        }
        e = e.with_header(k, v);
    }
    e = e
        .with_header("kafka.topic", topic)
        .with_header("kafka.partition", m.partition().to_string())
        .with_header("kafka.offset", m.offset().to_string());
    if m.payload().is_none() {
        e = e.with_header("kafka.tombstone", "1");
    }
    e
}

/// The `deadletter/1` record of a refused HQ record: the reason, where it came from, its key and
/// headers, and its payload (truncated).
fn dead_letter(
    stream: &str,
    m: &rdkafka::message::BorrowedMessage<'_>,
    raw: &[(&str, Option<&[u8]>)],
    refusal: &Refusal,
) -> Event {
    let headers: serde_json::Map<String, serde_json::Value> = utf8_headers(raw)
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(v)))
        .collect();
    DeadLetter::new(
        "downlink",
        format!("{refusal}; the HQ record is not applied"),
    )
    .field("refusal", refusal.reason())
    .field("topic", m.topic())
    .field("partition", m.partition())
    .field("offset", m.offset())
    .field("stream", stream)
    .field(
        "key",
        m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
    )
    .field("headers", headers)
    .original(m.payload().unwrap_or_default(), DEFAULT_KEEP_BYTES)
    .into_event()
}

/// Applies a batch: its records for this store and the next offset of every partition it
/// touched, in one log request (one SQLite transaction).
async fn apply(
    ctx: &ComponentContext,
    batch: Vec<Consumed>,
    assigned: &mut BTreeMap<String, BTreeMap<i32, i64>>,
    stats: &mut Stats,
) -> Result<(), LogError> {
    let mut next: BTreeMap<(String, i32), i64> = BTreeMap::new();
    let mut req = AppendRequest::default();
    let mut skipped = 0u64;
    let mut refused = Vec::new();
    for c in batch {
        let known = assigned
            .get(&c.topic)
            .and_then(|p| p.get(&c.partition))
            .copied()
            .unwrap_or(-1);
        // A record at or below what was applied (a re-delivery after a seek) is not applied again.
        let already = next
            .get(&(c.topic.clone(), c.partition))
            .copied()
            .unwrap_or(known);
        if already >= 0 && c.offset < already {
            metrics::counter!("edge_downlink_redelivered_total").increment(1);
            continue;
        }
        next.insert((c.topic.clone(), c.partition), c.offset + 1);
        match c.verdict {
            Verdict::Apply(e) => req.events.push(e),
            Verdict::Skip => skipped += 1,
            Verdict::Refuse {
                refusal,
                dead_letter,
            } => {
                req.events.push(dead_letter);
                refused.push((
                    refusal.reason(),
                    LastRefusal {
                        reason: refusal.reason(),
                        detail: refusal.to_string(),
                        topic: c.topic.clone(),
                        partition: c.partition,
                        offset: c.offset,
                        at_ms: edge_core::time::now_ms(),
                    },
                ));
            }
        }
    }
    if next.is_empty() {
        return Ok(());
    }
    for ((t, p), o) in &next {
        req.kv.push((offset_key(t, *p), o.to_string().into_bytes()));
    }
    let applied = (req.events.len() - refused.len()) as u64;
    ctx.log.append(req).await?;
    for ((t, p), o) in next {
        assigned.entry(t).or_default().insert(p, o);
    }
    stats.applied += applied;
    stats.applied_in_session += applied + skipped + refused.len() as u64;
    stats.skipped += skipped;
    if let Some((_, last)) = refused.last() {
        tracing::warn!(
            component = "downlink",
            refused = refused.len(),
            topic = last.topic,
            offset = last.offset,
            "refused HQ record(s) and wrote them to deadletter; the downlink goes on: {}",
            last.detail
        );
    }
    for (reason, last) in refused {
        metrics::counter!("edge_downlink_refused_total", "reason" => reason).increment(1);
        *stats.refused_by_reason.entry(reason).or_default() += 1;
        stats.refused += 1;
        stats.last_refusal = Some(last);
    }
    metrics::counter!("edge_downlink_records_applied_total").increment(applied);
    metrics::counter!("edge_downlink_records_skipped_total", "reason" => "other_store")
        .increment(skipped);
    Ok(())
}
