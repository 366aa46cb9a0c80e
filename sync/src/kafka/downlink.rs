//! The downlink: HQ topics (prices, campaigns, models, commands) into local streams.
//!
//! Invariants:
//! * **Exactly-once apply.** The records of a batch and the consumed offsets of every partition
//!   they came from are one log request, so they commit in one SQLite transaction: after a crash
//!   the downlink seeks to the stored offsets and neither loses nor repeats a record. No consumer
//!   group offsets are used (the log is the only place offsets live).
//! * **Only this store's records.** A record is kept when its `edge.store` header is this store or
//!   `*`; without that header, when its key is empty, `*`, this store id or starts with
//!   `<store>/`. Skipped records still move the stored offset.
//! * **read_committed**: aborted HQ transactions never reach the store.
//! * Memory is bounded by librdkafka's fetch queue (`queued.max.messages.kbytes`) and one batch.

use super::checkpoint::ArcContext;
use super::client::{Backoff, LinkContext};
use super::config::{KafkaConfig, KafkaConfigError, StartFrom};
use super::record::{H_EVENT_ID, H_SCHEMA, H_STORE};
use edge_core::Event;
use edge_core::component::{ComponentContext, ComponentError, Task};
use edge_core::log::{AppendRequest, LogError};
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

/// Whether a record is meant for `store` (see the module docs).
pub fn for_store(store: &str, key: Option<&[u8]>, header_store: Option<&[u8]>) -> bool {
    if let Some(h) = header_store {
        return h == b"*" || h == store.as_bytes();
    }
    match key {
        None | Some(b"") | Some(b"*") => true,
        Some(k) => {
            k == store.as_bytes()
                || (k.len() > store.len()
                    && k.starts_with(store.as_bytes())
                    && k[store.len()] == b'/')
        }
    }
}

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
    event: Option<Event>,
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
    let routes: HashMap<String, Arc<str>> = cfg
        .downlink
        .topics
        .iter()
        .map(|t| (t.topic.clone(), Arc::from(t.stream.as_str())))
        .collect();
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
    applied_in_session: u64,
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
    routes: &HashMap<String, Arc<str>>,
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
        let full = batch.len() >= cfg.downlink.batch_max_records;
        let due = batch_deadline.is_some_and(|d| Instant::now() >= d);
        if !batch.is_empty() && (full || due) {
            match apply(ctx, std::mem::take(&mut batch), &mut assigned, stats).await {
                Ok(()) => {}
                Err(e) => return e.into(),
            }
            batch_deadline = None;
            ctx.status.field("records_applied_total", stats.applied);
            ctx.status.field("records_skipped_total", stats.skipped);
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

fn detach(
    store: &str,
    routes: &HashMap<String, Arc<str>>,
    m: &rdkafka::message::BorrowedMessage<'_>,
) -> Consumed {
    let topic = m.topic().to_string();
    let mut header_store = None;
    let mut event_id = None;
    let mut schema = None;
    let mut headers = Vec::new();
    if let Some(h) = m.headers() {
        for x in h.iter() {
            let Some(v) = x.value else { continue };
            match x.key {
                H_STORE => header_store = Some(v.to_vec()),
                H_EVENT_ID => event_id = std::str::from_utf8(v).ok().map(str::to_string),
                H_SCHEMA => schema = std::str::from_utf8(v).ok().map(str::to_string),
                _ => {}
            }
            if let Ok(v) = std::str::from_utf8(v) {
                headers.push((x.key.to_string(), v.to_string()));
            }
        }
    }
    let keep = for_store(store, m.key(), header_store.as_deref());
    let event = match (keep, routes.get(&topic)) {
        (true, Some(stream)) => {
            let mut e = Event::new(stream.clone(), m.payload().unwrap_or_default().to_vec());
            if let Some(ts) = m.timestamp().to_millis() {
                e = e.with_event_ts(ts);
            }
            if let Some(k) = m.key() {
                e = e.with_key(String::from_utf8_lossy(k).into_owned());
            }
            e = e.with_source(format!("kafka:{topic}"));
            if let Some(id) = event_id {
                e = e.with_event_id(id);
            }
            if let Some(s) = schema {
                e = e.with_schema(s);
            }
            for (k, v) in headers {
                e = e.with_header(k, v);
            }
            e = e
                .with_header("kafka.topic", topic.clone())
                .with_header("kafka.partition", m.partition().to_string())
                .with_header("kafka.offset", m.offset().to_string());
            if m.payload().is_none() {
                e = e.with_header("kafka.tombstone", "1");
            }
            Some(e)
        }
        _ => None,
    };
    Consumed {
        topic,
        partition: m.partition(),
        offset: m.offset(),
        event,
    }
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
        match c.event {
            Some(e) => req.events.push(e),
            None => skipped += 1,
        }
    }
    if next.is_empty() {
        return Ok(());
    }
    for ((t, p), o) in &next {
        req.kv.push((offset_key(t, *p), o.to_string().into_bytes()));
    }
    let applied = req.events.len() as u64;
    ctx.log.append(req).await?;
    for ((t, p), o) in next {
        assigned.entry(t).or_default().insert(p, o);
    }
    stats.applied += applied;
    stats.applied_in_session += applied + skipped;
    stats.skipped += skipped;
    metrics::counter!("edge_downlink_records_applied_total").increment(applied);
    metrics::counter!("edge_downlink_records_skipped_total", "reason" => "other_store")
        .increment(skipped);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_for_this_store_or_all_stores() {
        assert!(for_store("s1", None, None));
        assert!(for_store("s1", Some(b"*"), None));
        assert!(for_store("s1", Some(b""), None));
        assert!(for_store("s1", Some(b"s1"), None));
        assert!(for_store("s1", Some(b"s1/lane-2"), None));
        assert!(!for_store("s1", Some(b"s10"), None));
        assert!(!for_store("s1", Some(b"s2"), None));
        assert!(!for_store("s1", Some(b"s1x/a"), None));
        // The header decides when present.
        assert!(for_store("s1", Some(b"sku-9"), Some(b"*")));
        assert!(for_store("s1", Some(b"sku-9"), Some(b"s1")));
        assert!(!for_store("s1", None, Some(b"s2")));
    }
}
