//! The uplink: mirrors every mirrored local stream to HQ's Kafka.
//!
//! Invariants:
//! * **The local log is the only buffer.** Records are read from the log at the uplink cursor in
//!   chunks of [`READ_CHUNK_RECORDS`] / [`READ_CHUNK_BYTES`]; librdkafka holds at most
//!   `producer_queue_bytes` (and [`KafkaConfig::producer_queue_messages`] messages), so memory
//!   does not grow with the backlog, the transaction or the batch settings. Nothing is dropped on a
//!   timer: a batch that fails is read again from the log.
//! * **The cursor moves only after success was observed**: after the Kafka transaction that holds
//!   the records committed (exactly_once), or after their delivery reports (at_least_once). The
//!   cursor is the log's `mirror_cursor`, so retention and the disk budget never remove a record HQ
//!   does not have.
//! * **Exactly once** (see [`eos`]): every transaction carries a checkpoint; on start the uplink
//!   fences older incarnations, reads the checkpoint back and resumes at
//!   `max(local cursor, checkpoint)`, so a crash between the Kafka commit and the local cursor commit
//!   neither loses nor repeats a record.
//! * **Order** per (store, stream) is the seq order: one stream is one lane read in order, sent to one
//!   topic with the store as key (one partition).
//! * **Fairness**: each batch is shared between all streams with pending records, so a live stream
//!   is not starved while another drains a backlog.

mod alo;
mod eos;
pub mod progress;

use super::checkpoint::Checkpoint;
use super::client::{Backoff, LinkContext, LinkTrouble};
use super::command::{self, Command};
use super::config::{DeliveryMode, KafkaConfig, KafkaConfigError};
use super::record::{self, H_EPOCH, H_STORE, H_STREAM};
use super::topics::{TopicSpec, ensure_topics};
use edge_core::Record;
use edge_core::component::{ComponentContext, ComponentError, Task};
use edge_core::log::{AppendRequest, CursorMove, Gap, Log, LogError, ReadLimits};
use edge_core::status::State;
use progress::{Bandwidth, Figures, Link, Progress, report};
use rdkafka::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, ProducerContext, ThreadedProducer};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Errors that stop the uplink.
#[derive(Debug, thiserror::Error)]
pub enum UplinkError {
    #[error(transparent)]
    Config(#[from] KafkaConfigError),
    #[error("the Kafka producer could not be created: {0}; check kafka.client_properties")]
    Client(String),
    #[error("the local log failed ({0}); the uplink stops and the records stay in the log")]
    Log(#[from] LogError),
}

/// The uplink component.
#[derive(Debug, Clone)]
pub struct Uplink {
    cfg: KafkaConfig,
    cursor: String,
}

impl Uplink {
    /// `mirror_cursor` must be the log's `mirror_cursor` (default `"uplink"`).
    pub fn new(cfg: KafkaConfig, mirror_cursor: impl Into<String>) -> Uplink {
        Uplink {
            cfg,
            cursor: mirror_cursor.into(),
        }
    }

    /// Checks the config and reads the secret files now, so that a bad config fails at start-up,
    /// then returns the running task.
    pub fn build(self, ctx: ComponentContext) -> Result<Task, UplinkError> {
        self.cfg.check()?;
        let base = self
            .cfg
            .base_client_config(&format!("edge-agent.{}", ctx.store_id))?;
        let runner = Runner::new(self.cfg, self.cursor, base, ctx);
        Ok(Box::pin(async move {
            runner
                .run()
                .await
                .map_err(|e| Box::new(e) as ComponentError)
        }))
    }
}

/// Records read from the log at once. The uplink streams a transaction (exactly_once) or its
/// window (at_least_once) in chunks of this size, so the records it holds in memory do not grow
/// with the batch: a few chunks plus librdkafka's bounded queue.
pub(crate) const READ_CHUNK_RECORDS: usize = 1000;
/// Bytes (approximate wire size) read from the log at once.
pub(crate) const READ_CHUNK_BYTES: usize = 512 * 1024;

/// librdkafka's `batch.size`: the uncompressed size of one produce request per partition. Each
/// request in flight holds a buffer of this size (and its compressed copy); smaller requests also
/// keep several in flight within the small producer queue. `kafka.client_properties` may set
/// another one.
pub(crate) const PRODUCER_BATCH_BYTES: usize = 256 * 1024;

/// Lane id of gap records in delivery tokens.
pub(crate) const GAP_LANE: u32 = u32::MAX;
/// Lane id of records whose delivery is not tracked (heartbeats, checkpoints).
pub(crate) const UNTRACKED_LANE: u32 = u32::MAX - 1;

/// What a delivery report refers to.
#[derive(Debug)]
pub(crate) struct Token {
    pub lane: u32,
    pub seq: u64,
    pub bytes: u32,
}

/// Delivery outcomes, shared with the producer's polling thread.
#[derive(Debug, Default)]
pub(crate) struct Deliveries {
    /// Records the broker refused for good, by (lane, seq): sent as gaps with the reason next
    /// time, and dead-lettered locally. Forgotten once HQ is past them.
    pub refused: HashMap<(u32, u64), Refusal>,
    /// Permanent refusals reported since the last read, per lane, not yet attributed: one alone
    /// is poison; several at once (a broker refuses a whole produce batch) are sent again one
    /// record at a time to find the poison among them ([`Lane::isolate_until`]).
    pub suspects: HashMap<u32, Vec<(u64, Refusal)>>,
    /// at_least_once: in-flight records per lane, in send order.
    pub lanes: HashMap<u32, std::collections::VecDeque<Inflight>>,
    pub inflight_bytes: u64,
    pub inflight_records: u64,
    /// Delivery failures since the last look (lane, error), for the log.
    pub failed: Vec<(u32, String)>,
    /// Lanes whose permanent refusals were attributed (a transaction that aborted with one of
    /// them was productive: it is retried at once, not after a backoff).
    pub refusals_seen: u64,
    /// exactly_once: a transaction is in flight, so its delivery reports may still be arriving;
    /// refusals are attributed only once it has ended.
    pub txn_open: bool,
    pub delivered: u64,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Inflight {
    pub seq: u64,
    /// Read position after this record (skips holes after it).
    pub next: u64,
    pub bytes: u32,
    pub done: bool,
    pub failed: bool,
}

/// Why the broker refused a record for good: retrying the same record can never succeed, so it
/// must not block the records behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// Metric label (`edge_uplink_records_dropped_total{reason}`).
    pub label: &'static str,
    /// The broker's answer.
    pub message: String,
}

impl Refusal {
    /// The refusals that are about the record itself. Everything else (the broker away, a
    /// timeout, a fenced producer, an authorization problem of the whole store) is retried.
    pub fn of(e: &KafkaError) -> Option<Refusal> {
        use rdkafka::error::RDKafkaErrorCode as C;
        let label = match e.rdkafka_error_code()? {
            C::MessageSizeTooLarge | C::MessageBatchTooLarge => "too_large",
            C::InvalidTimestamp => "invalid_timestamp",
            C::InvalidRecord => "invalid_record",
            C::InvalidMessage | C::InvalidMessageSize => "corrupt",
            C::PolicyViolation => "policy_violation",
            _ => return None,
        };
        Some(Refusal {
            label,
            message: e.to_string(),
        })
    }

    fn too_large(bytes: usize) -> Refusal {
        Refusal {
            label: "too_large",
            message: format!("record of {bytes} bytes exceeds the largest message Kafka accepts"),
        }
    }
}

/// A record the uplink does not send: larger than Kafka accepts, or refused by the broker for
/// good. It leaves a gap with the reason on `edge.gaps` and a dead letter in the local log.
#[derive(Debug, Clone)]
pub(crate) struct Refused {
    pub record: Record,
    pub bytes: usize,
    pub why: Refusal,
}

/// The producer's context: link errors and delivery reports.
pub(crate) struct UplinkContext {
    pub link: Arc<LinkContext>,
    pub deliveries: Arc<(Mutex<Deliveries>, tokio::sync::Notify)>,
}

impl rdkafka::client::ClientContext for UplinkContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        self.link.log(level, fac, message)
    }
    fn error(&self, error: KafkaError, reason: &str) {
        self.link.error(error, reason)
    }
}

impl ProducerContext for UplinkContext {
    type DeliveryOpaque = Box<Token>;

    fn delivery(&self, result: &rdkafka::message::DeliveryResult<'_>, token: Box<Token>) {
        let (lock, notify) = &*self.deliveries;
        let mut guard = lock.lock().unwrap_or_else(|e| e.into_inner());
        let d = &mut *guard;
        let err = result.as_ref().err().map(|(e, _)| e.clone());
        if let Some(e) = &err {
            metrics::counter!("edge_uplink_delivery_errors_total").increment(1);
            if let Some(r) = Refusal::of(e)
                && token.lane != UNTRACKED_LANE
                && token.lane != GAP_LANE
            {
                let list = d.suspects.entry(token.lane).or_default();
                if list.len() < 10_000 {
                    list.push((token.seq, r));
                }
            }
        }
        // Only at_least_once tracks records in flight (exactly_once learns the outcome from the
        // commit); nothing here grows while the broker is away.
        if let Some(q) = d.lanes.get_mut(&token.lane)
            && let Ok(i) = q.binary_search_by_key(&token.seq, |f| f.seq)
            && !q[i].done
            && !q[i].failed
        {
            match &err {
                None => q[i].done = true,
                Some(_) => q[i].failed = true,
            }
            d.inflight_records = d.inflight_records.saturating_sub(1);
            d.inflight_bytes = d.inflight_bytes.saturating_sub(u64::from(token.bytes));
            if let Some(e) = &err
                && d.failed.len() < 100
            {
                d.failed.push((token.lane, e.to_string()));
            }
        }
        if err.is_none() {
            d.delivered += 1;
        }
        drop(guard);
        notify.notify_one();
    }
}

pub(crate) type KafkaProducer = ThreadedProducer<UplinkContext>;

/// Why a session ended.
pub(crate) enum Stop {
    Shutdown,
    /// The link failed; a new session starts after a backoff.
    Retry {
        link: Link,
        detail: String,
    },
    Fatal(UplinkError),
}

impl From<LogError> for Stop {
    fn from(e: LogError) -> Stop {
        match e {
            LogError::Closed => Stop::Shutdown,
            e => Stop::Fatal(UplinkError::Log(e)),
        }
    }
}

/// A pending re-mirror of one stream, kept in the log's kv until it is done.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Rewind {
    pub from: u64,
    /// Records below this were mirrored before (they carry `edge.replay`).
    pub until: u64,
    /// The checkpoint transaction counter when the rewind was recorded; a checkpoint with a higher
    /// counter already reflects it.
    pub after_txn: u64,
}

/// One mirrored stream.
#[derive(Debug, Clone)]
pub(crate) struct Lane {
    pub id: u32,
    pub stream: Arc<str>,
    pub topic: Arc<str>,
    /// Next seq committed at HQ: everything below is mirrored.
    pub committed: u64,
    /// Next seq to read from the log (ahead of `committed` while records are in flight).
    pub next: u64,
    pub replay_until: u64,
    /// A rewind whose kv entry must be cleared once `committed >= until`.
    pub rewind: Option<Rewind>,
    /// Records below this are sent in probes of `probe` records, each alone in its transaction
    /// (exactly_once) or with nothing else of the lane in flight (at_least_once): the broker
    /// refused several of them at once and the poison among them is not known yet.
    pub isolate_until: u64,
    /// Records per probe while isolating: half the records refused together last time, so the
    /// poison is found by bisection in about 2 log2(n) transactions, not n.
    pub probe: usize,
}

/// Records of one lane in a batch.
#[derive(Debug)]
pub(crate) struct Part {
    pub lane: u32,
    pub stream: Arc<str>,
    pub topic: Arc<str>,
    pub records: Vec<Record>,
    /// Records not sent: too large, or refused by the broker before.
    pub refused: Vec<Refused>,
    /// Read position after this part.
    pub next: u64,
    pub replay_until: u64,
}

#[derive(Debug, Default)]
pub(crate) struct Batch {
    pub parts: Vec<Part>,
    pub records: usize,
    pub bytes: usize,
    /// One record of a lane being isolated: it must travel alone.
    pub isolating: bool,
}

impl Batch {
    fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

/// How records become messages (fixed for a session).
#[derive(Debug, Clone)]
pub(crate) struct RecordShape {
    pub store: Arc<str>,
    pub epoch: Arc<str>,
    pub key_mode: super::config::KeyMode,
    pub time: record::RecordTime,
}

/// A non-record message (gap, heartbeat, checkpoint).
#[derive(Debug, Clone)]
pub(crate) struct Extra {
    pub topic: String,
    pub key: String,
    pub payload: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
    pub lane: u32,
    pub seq: u64,
}

pub(crate) struct Runner {
    pub cfg: Arc<KafkaConfig>,
    pub cursor: String,
    pub base: ClientConfig,
    pub ctx: ComponentContext,
    pub store: Arc<str>,
    pub epoch: Uuid,
    pub epoch_str: Arc<str>,
    pub link: Arc<LinkContext>,
    pub progress: Arc<Progress>,
    pub deliveries: Arc<(Mutex<Deliveries>, tokio::sync::Notify)>,
    pub lane_ids: Mutex<HashMap<Arc<str>, u32>>,
    pub topics_created: Mutex<HashSet<String>>,
    pub bandwidth: tokio::sync::Mutex<Option<Bandwidth>>,
    /// Reset to the minimum after a session that made progress.
    pub made_progress: std::sync::atomic::AtomicBool,
}

/// Positions of all lanes of a session.
#[derive(Debug, Default)]
pub(crate) struct Lanes {
    pub map: BTreeMap<Arc<str>, Lane>,
    pub rr: usize,
    pub refreshed: Option<Instant>,
}

impl Runner {
    fn new(cfg: KafkaConfig, cursor: String, base: ClientConfig, ctx: ComponentContext) -> Runner {
        let epoch = ctx.log.epoch();
        let bandwidth = Bandwidth::new(cfg.max_bytes_per_sec.as_u64());
        Runner {
            store: ctx.store_id.clone(),
            epoch,
            epoch_str: Arc::from(epoch.to_string()),
            link: Arc::new(LinkContext::new("uplink")),
            progress: Arc::new(Progress::new()),
            deliveries: Arc::new((
                Mutex::new(Deliveries::default()),
                tokio::sync::Notify::new(),
            )),
            lane_ids: Mutex::new(HashMap::new()),
            topics_created: Mutex::new(HashSet::new()),
            bandwidth: tokio::sync::Mutex::new(bandwidth),
            made_progress: std::sync::atomic::AtomicBool::new(false),
            cfg: Arc::new(cfg),
            cursor,
            base,
            ctx,
        }
    }

    pub fn log(&self) -> &dyn Log {
        &*self.ctx.log
    }

    pub(crate) fn record_shape(&self) -> RecordShape {
        RecordShape {
            store: self.store.clone(),
            epoch: self.epoch_str.clone(),
            key_mode: self.cfg.key,
            time: self.cfg.record_time(),
        }
    }

    pub fn cancel(&self) -> &CancellationToken {
        self.ctx.shutdown.all()
    }

    async fn run(self) -> Result<(), UplinkError> {
        let this = Arc::new(self);
        let ticker_stop = this.cancel().child_token();
        let ticker = {
            let this = this.clone();
            let stop = ticker_stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {
                            this.track_unseen_streams().await;
                            let f = this.progress.figures(this.log()).await;
                            this.progress.publish(&this.ctx.status, &f);
                            this.check_stall(&f);
                        }
                    }
                }
            })
        };
        this.ctx.status.field("mode", this.cfg.mode.as_str());
        this.ctx.status.field("brokers", this.cfg.brokers.join(","));
        let mut backoff = Backoff::new(
            Duration::from_millis(200),
            Duration::from_millis(this.cfg.reconnect_backoff_max_ms),
        );
        let result = loop {
            let stop = match this.cfg.mode {
                DeliveryMode::ExactlyOnce => this.eos_session().await,
                DeliveryMode::AtLeastOnce => this.alo_session().await,
            };
            if this
                .made_progress
                .swap(false, std::sync::atomic::Ordering::Relaxed)
            {
                backoff.reset();
            }
            match stop {
                Stop::Shutdown => break Ok(()),
                Stop::Fatal(e) => {
                    this.progress.set_link(Link::Down, Some(e.to_string()));
                    this.ctx.status.set(State::Down, e.to_string());
                    break Err(e);
                }
                Stop::Retry { link, detail } => {
                    this.progress.set_link(link, None);
                    let delay = backoff.next_delay();
                    report(&this.ctx.status, link, detail);
                    tokio::select! {
                        _ = this.cancel().cancelled() => break Ok(()),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        };
        ticker_stop.cancel();
        let _ = ticker.await; // the ticker only reports; a panic there must not mask the result
        let f = this.progress.figures(this.log()).await;
        this.progress.publish(&this.ctx.status, &f);
        if result.is_ok() {
            this.ctx.status.set(State::Stopped, "stopped");
        }
        result
    }

    /// Marks the uplink wedged while records have waited on an up link with nothing committed
    /// for `stall_timeout_ms` (a session stuck in a call that never returns, say).
    fn check_stall(&self, f: &Figures) {
        let limit = Duration::from_millis(self.cfg.stall_timeout_ms);
        let stalled = self.progress.stalled_for(f.backlog_records);
        let why = stalled.filter(|d| !limit.is_zero() && *d >= limit).map(|d| {
            format!(
                "the uplink looks wedged: the link to {} is up and {} records wait, but nothing was committed for {} s (stall_timeout_ms = {}); the agent reports itself unhealthy so that systemd restarts it",
                self.cfg.brokers.join(","),
                f.backlog_records,
                d.as_secs(),
                self.cfg.stall_timeout_ms
            )
        });
        self.ctx
            .status
            .field("stalled_s", serde_json::json!(stalled.map(|d| d.as_secs())));
        self.ctx.status.set_wedged(why);
    }

    /// Counts streams no session has seen yet (the link never came up) in the backlog, from their
    /// local cursors.
    async fn track_unseen_streams(&self) {
        let Ok(streams) = self.log().streams().await else {
            return;
        };
        let known = self.progress.committed();
        for s in streams {
            if !s.mirrored || self.excluded(&s.name) || known.contains_key(&s.name) {
                continue;
            }
            if let Ok(c) = self.log().cursor(&self.cursor, &s.name).await {
                self.progress
                    .set_committed_if_absent(&s.name, c.unwrap_or(1).max(1));
            }
        }
    }

    /// The link's state and a status sentence from the client's most recent error.
    pub fn trouble(&self, what: &str) -> (Link, String) {
        let err = self.link.recent_error(Duration::from_secs(60));
        let brokers = self.cfg.brokers.join(",");
        let buffering = "records keep buffering in the local log and drain when the link is back";
        match err {
            Some(e) if e.trouble == LinkTrouble::Auth => (
                Link::AuthFailed,
                format!(
                    "Kafka at {brokers} refused this store's credentials ({}); {}; {buffering}",
                    e.message.split(" (after").next().unwrap_or(&e.message),
                    e.trouble.advice()
                ),
            ),
            Some(e) if e.trouble != LinkTrouble::Unreachable => (
                Link::Down,
                format!(
                    "{what} failed at {brokers}: {} problem ({}); {buffering}",
                    e.trouble.as_str(),
                    e.trouble.advice()
                ),
            ),
            _ => (
                Link::Down,
                format!("cannot reach Kafka at {brokers} ({what}); {buffering}"),
            ),
        }
    }

    /// Reports a link problem without ending the session (the call will be retried).
    pub fn report_trouble(&self, what: &str, error: &str) {
        let (link, detail) = self.trouble(what);
        self.progress.set_link(link, Some(error.to_string()));
        report(&self.ctx.status, link, detail);
    }

    pub(crate) fn set_txn_open(&self, open: bool) {
        let mut d = self.deliveries.0.lock().unwrap_or_else(|e| e.into_inner());
        d.txn_open = open;
    }

    /// Whether the broker refused records for good since the last call (`mark` keeps the count
    /// the caller saw last).
    pub fn refusals_since(&self, mark: &mut u64) -> bool {
        let d = self.deliveries.0.lock().unwrap_or_else(|e| e.into_inner());
        let new = d.refusals_seen != *mark || !d.suspects.is_empty();
        *mark = d.refusals_seen;
        new
    }

    /// The link is up but the broker refuses records: distinct from "cannot reach Kafka".
    pub fn report_refused(&self, error: &str) {
        self.progress
            .set_link(Link::Refused, Some(error.to_string()));
        report(
            &self.ctx.status,
            Link::Refused,
            format!(
                "Kafka at {} refused records ({error}); they go to the dead-letter stream with a gap at HQ, the records behind them carry on",
                self.cfg.brokers.join(",")
            ),
        );
    }

    pub fn report_up(&self) {
        self.link.clear_error();
        self.progress.set_link(Link::Up, None);
        report(
            &self.ctx.status,
            Link::Up,
            format!("mirroring to Kafka at {}", self.cfg.describe()),
        );
    }

    pub fn lane_id(&self, stream: &Arc<str>) -> u32 {
        let mut m = self.lane_ids.lock().unwrap_or_else(|e| e.into_inner());
        let n = m.len() as u32;
        *m.entry(stream.clone()).or_insert(n)
    }

    /// Creates a producer. `transactional` selects exactly_once settings, else idempotent.
    pub fn create_producer(&self, transactional: bool) -> Result<KafkaProducer, UplinkError> {
        let c = &self.cfg;
        let mut cfg = self.base.clone();
        if !c.client_properties.contains_key("batch.size") {
            cfg.set("batch.size", PRODUCER_BATCH_BYTES.to_string());
        }
        cfg.set("compression.codec", c.compression_codec())
            .set("linger.ms", c.linger_ms.to_string())
            .set(
                "queue.buffering.max.kbytes",
                (c.producer_queue_bytes.as_u64() / 1024).max(1).to_string(),
            )
            .set(
                "queue.buffering.max.messages",
                c.producer_queue_messages().to_string(),
            )
            .set("partitioner", "murmur2_random")
            .set("enable.idempotence", "true")
            .set("acks", "all");
        if transactional {
            cfg.set("transactional.id", c.transactional_id(&self.store))
                .set(
                    "transaction.timeout.ms",
                    c.transaction_timeout_ms.to_string(),
                );
        } else {
            // Never give up on a record: the log keeps it and librdkafka retries until delivery.
            cfg.set("message.timeout.ms", "0")
                .set("max.in.flight.requests.per.connection", "5");
        }
        let context = UplinkContext {
            link: self.link.clone(),
            deliveries: self.deliveries.clone(),
        };
        cfg.create_with_context(context)
            .map_err(|e| UplinkError::Client(e.to_string()))
    }

    /// Creates the side topics once per process (when allowed).
    pub async fn ensure_side_topics(&self) {
        let c = &self.cfg;
        let specs = [
            TopicSpec {
                name: c.checkpoint_topic.clone(),
                compacted: true,
            },
            TopicSpec {
                name: c.heartbeat_topic.clone(),
                compacted: false,
            },
            TopicSpec {
                name: c.gap_topic.clone(),
                compacted: false,
            },
        ];
        self.ensure(&specs).await;
    }

    async fn ensure(&self, specs: &[TopicSpec]) {
        if !self.cfg.create_topics {
            return;
        }
        let todo: Vec<TopicSpec> = {
            let done = self
                .topics_created
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            specs
                .iter()
                .filter(|s| !done.contains(&s.name))
                .cloned()
                .collect()
        };
        if todo.is_empty() {
            return;
        }
        let problems = ensure_topics(
            &self.base,
            self.link.clone(),
            &todo,
            self.cfg.topic_partitions,
            self.cfg.topic_replication_factor,
        )
        .await;
        for p in &problems {
            tracing::warn!(
                component = "uplink",
                "{p}; producing anyway (HQ may provision topics itself)"
            );
        }
        if problems.iter().all(|p| !p.contains("timed out")) {
            let mut done = self
                .topics_created
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            done.extend(todo.into_iter().map(|s| s.name));
        }
    }

    fn excluded(&self, stream: &str) -> bool {
        self.cfg.exclude_streams.iter().any(|s| s == stream)
            || (!self.cfg.mirror_downlink_streams
                && self.cfg.downlink.enabled
                && self.cfg.downlink.topics.iter().any(|t| t.stream == stream))
    }

    fn kv_rewind_key(&self, stream: &str) -> String {
        format!("{}.rewind.{stream}", self.cursor)
    }

    fn kv_gap_key(&self) -> String {
        format!("{}.gap_id", self.cursor)
    }

    fn commands_cursor(&self) -> String {
        format!("{}.commands", self.cursor)
    }

    /// The id of the last gap reported, from the log (and the checkpoint in exactly_once).
    pub async fn initial_gap_id(&self, cp: Option<&Checkpoint>) -> Result<u64, LogError> {
        let local = self
            .log()
            .kv_get(&self.kv_gap_key())
            .await?
            .and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| s.parse::<u64>().ok())
            .unwrap_or(0);
        let cp = cp.filter(|c| c.epoch == self.epoch).map_or(0, |c| c.gap_id);
        Ok(local.max(cp))
    }

    pub fn gap_kv(&self, gap_id: u64) -> (String, Vec<u8>) {
        (self.kv_gap_key(), gap_id.to_string().into_bytes())
    }

    /// Adds lanes for mirrored streams not seen yet. Returns cursor moves and kv writes the log
    /// needs to catch up with the checkpoint (after a crash between Kafka commit and local
    /// commit) or to drop finished rewinds.
    pub async fn refresh_lanes(
        &self,
        lanes: &mut Lanes,
        cp: Option<&Checkpoint>,
    ) -> Result<AppendRequest, LogError> {
        lanes.refreshed = Some(Instant::now());
        let mut req = AppendRequest::default();
        let mut new_topics = Vec::new();
        for info in self.log().streams().await? {
            if !info.mirrored || self.excluded(&info.name) || lanes.map.contains_key(&*info.name) {
                continue;
            }
            let stream: Arc<str> = Arc::from(info.name.as_str());
            let local = self
                .log()
                .cursor(&self.cursor, &stream)
                .await?
                .unwrap_or(1)
                .max(1);
            let cp = cp.filter(|c| c.epoch == self.epoch);
            let head = self.log().next_seq(&stream).unwrap_or(1);
            let cp_next = match cp.and_then(|c| c.next_seq(&stream)) {
                // A checkpoint can never be past what this log holds: one that is was forged,
                // or belongs to another agent that uses this store's id. Trusting it would mark
                // unsent records as mirrored.
                Some(n) if n > head => {
                    metrics::counter!("edge_uplink_checkpoint_rejected_total").increment(1);
                    tracing::error!(
                        component = "uplink",
                        stream = &*stream,
                        checkpoint_next_seq = n,
                        local_next_seq = head,
                        "the checkpoint in Kafka is past the end of the local log (another agent with this store id, or a forged checkpoint); it is not trusted and the stream resumes from the local cursor"
                    );
                    self.ctx.status.field(
                        "checkpoint_rejected",
                        format!(
                            "{stream}: checkpoint next_seq {n} is past the local head {head}; resumed from the local cursor"
                        ),
                    );
                    None
                }
                other => other,
            };
            let rewind: Option<Rewind> = self
                .log()
                .kv_get(&self.kv_rewind_key(&stream))
                .await?
                .filter(|v| !v.is_empty())
                .and_then(|v| serde_json::from_slice(&v).ok());
            let forced = match (rewind, self.cfg.mode) {
                (Some(r), DeliveryMode::ExactlyOnce) => cp.is_none_or(|c| c.txn <= r.after_txn),
                _ => false,
            };
            let committed = if forced {
                local
            } else {
                local.max(cp_next.unwrap_or(0))
            };
            if committed > local {
                tracing::info!(
                    component = "uplink",
                    stream = &*stream,
                    local_cursor = local,
                    checkpoint = committed,
                    "the last transaction committed at HQ before the local cursor moved; resuming after it"
                );
                req.cursors.push(CursorMove {
                    cursor: self.cursor.clone(),
                    stream: stream.to_string(),
                    next_seq: committed,
                });
            }
            let (replay_until, rewind) = match rewind {
                Some(r) if r.until > committed => (r.until, Some(r)),
                Some(_) => {
                    req.kv.push((self.kv_rewind_key(&stream), Vec::new()));
                    (0, None)
                }
                None => (0, None),
            };
            let topic: Arc<str> = Arc::from(self.cfg.topic(&self.store, &stream));
            new_topics.push(TopicSpec {
                name: topic.to_string(),
                compacted: false,
            });
            let id = self.lane_id(&stream);
            self.progress.set_committed(&stream, committed);
            lanes.map.insert(
                stream.clone(),
                Lane {
                    id,
                    stream,
                    topic,
                    committed,
                    next: committed,
                    replay_until,
                    rewind,
                    isolate_until: 0,
                    probe: 1,
                },
            );
        }
        self.ensure(&new_topics).await;
        Ok(req)
    }

    /// Reads the next batch fairly from all lanes with pending records, starting at each lane's
    /// `next` and moving it past what was read.
    pub async fn read_batch(
        &self,
        lanes: &mut Lanes,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Batch, LogError> {
        let refused = self.resolve_refusals(lanes);
        let mut pending: Vec<Arc<str>> = lanes
            .map
            .values()
            .filter(|l| self.log().next_seq(&l.stream).is_some_and(|h| h > l.next))
            .map(|l| l.stream.clone())
            .collect();
        let mut batch = Batch::default();
        if pending.is_empty() {
            return Ok(batch);
        }
        let n = pending.len();
        pending.rotate_left(lanes.rr % n);
        lanes.rr = lanes.rr.wrapping_add(1);
        let max_record_bytes = self.cfg.max_record_bytes.as_u64() as usize;
        // A lane being isolated sends a probe of records alone, until the poison among the
        // records the broker refused together is found (each refused probe is halved).
        for stream in &pending {
            let Some(lane) = lanes.map.get_mut(stream) else {
                continue;
            };
            if lane.isolate_until <= lane.next {
                continue;
            }
            let busy = {
                let d = self.deliveries.0.lock().unwrap_or_else(|e| e.into_inner());
                d.lanes.get(&lane.id).is_some_and(|q| !q.is_empty())
            };
            if busy {
                return Ok(batch);
            }
            let left = usize::try_from(lane.isolate_until - lane.next).unwrap_or(usize::MAX);
            let limits = ReadLimits {
                max_records: lane.probe.clamp(1, READ_CHUNK_RECORDS).min(left),
                max_bytes: max_bytes.max(1024),
            };
            let rb = self.log().read(stream, lane.next, limits).await?;
            if rb.next_seq <= lane.next {
                continue;
            }
            let mut part = self.new_part(lane, rb.next_seq);
            for r in rb.records {
                self.sort_record(&mut batch, &mut part, r, max_record_bytes, &refused);
            }
            lane.next = rb.next_seq;
            batch.parts.push(part);
            batch.isolating = true;
            return Ok(batch);
        }
        // Two passes: an equal share for every pending lane, then what is left to lanes that
        // filled their share.
        for pass in 0..2 {
            let left_records = max_records.saturating_sub(batch.records);
            let left_bytes = max_bytes.saturating_sub(batch.bytes);
            if left_records == 0 || left_bytes < 1024 {
                break;
            }
            let share = if pass == 0 { n } else { 1 };
            for stream in &pending {
                let left_records = max_records.saturating_sub(batch.records);
                let left_bytes = max_bytes.saturating_sub(batch.bytes);
                if left_records == 0 || left_bytes < 1024 {
                    break;
                }
                let Some(lane) = lanes.map.get_mut(stream) else {
                    continue;
                };
                if self.log().next_seq(stream).is_none_or(|h| h <= lane.next) {
                    continue;
                }
                let limits = ReadLimits {
                    max_records: (left_records / share).max(1),
                    max_bytes: (left_bytes / share).max(1024),
                };
                let rb = self.log().read(stream, lane.next, limits).await?;
                if rb.next_seq <= lane.next {
                    continue;
                }
                let mut part = self.new_part(lane, rb.next_seq);
                for r in rb.records {
                    self.sort_record(&mut batch, &mut part, r, max_record_bytes, &refused);
                }
                lane.next = rb.next_seq;
                // Merge with this lane's part of the first pass.
                if let Some(p) = batch.parts.iter_mut().find(|p| p.lane == part.lane) {
                    p.records.append(&mut part.records);
                    p.refused.append(&mut part.refused);
                    p.next = part.next;
                } else {
                    batch.parts.push(part);
                }
            }
        }
        Ok(batch)
    }

    fn new_part(&self, lane: &Lane, next: u64) -> Part {
        Part {
            lane: lane.id,
            stream: lane.stream.clone(),
            topic: lane.topic.clone(),
            records: Vec::new(),
            refused: Vec::new(),
            next,
            replay_until: lane.replay_until,
        }
    }

    /// Puts a record read from the log into the part: to be sent, or refused (too large, or
    /// refused by the broker before).
    fn sort_record(
        &self,
        batch: &mut Batch,
        part: &mut Part,
        r: Record,
        max_record_bytes: usize,
        refused: &HashMap<(u32, u64), Refusal>,
    ) {
        let size = record::wire_size(&r);
        batch.bytes += size;
        let why = if size > max_record_bytes {
            Some(Refusal::too_large(size))
        } else {
            refused.get(&(part.lane, r.seq)).cloned()
        };
        match why {
            Some(why) => part.refused.push(Refused {
                record: r,
                bytes: size,
                why,
            }),
            None => {
                batch.records += 1;
                part.records.push(r);
            }
        }
    }

    /// Attributes the broker's permanent refusals since the last read (see
    /// [`Deliveries::suspects`]) and returns the records known to be poison.
    fn resolve_refusals(&self, lanes: &mut Lanes) -> HashMap<(u32, u64), Refusal> {
        let mut guard = self.deliveries.0.lock().unwrap_or_else(|e| e.into_inner());
        let d = &mut *guard;
        // Attribute a lane's refusals only when every report of what was sent with them is in:
        // the reports of one refused produce batch arrive one by one, and the first of them
        // alone is not the poison.
        let settled: Vec<u32> = d
            .suspects
            .keys()
            .copied()
            .filter(|l| {
                !d.txn_open
                    && d.lanes
                        .get(l)
                        .is_none_or(|q| q.iter().all(|e| e.done || e.failed))
            })
            .collect();
        for lane_id in settled {
            let Some(mut list) = d.suspects.remove(&lane_id) else {
                continue;
            };
            let Some(lane) = lanes.map.values_mut().find(|l| l.id == lane_id) else {
                continue;
            };
            list.sort_by_key(|(seq, _)| *seq);
            list.dedup_by_key(|(seq, _)| *seq);
            if let [(seq, why)] = list.as_slice() {
                tracing::warn!(component = "uplink", stream = &*lane.stream, seq, reason = why.label,
                    error = %why.message,
                    "the broker refused a record for good; it goes to the dead-letter stream and HQ sees a gap, the records behind it carry on");
                d.refused.insert((lane_id, *seq), why.clone());
            } else if let Some((last, why)) = list.last() {
                tracing::warn!(component = "uplink", stream = &*lane.stream, records = list.len(),
                    first_seq = list[0].0, last_seq = last, error = %why.message,
                    "the broker refused several records at once; sending them again in halves to find the one it cannot take");
                lane.isolate_until = lane.isolate_until.max(last.saturating_add(1));
                lane.probe = (list.len() / 2).max(1);
            }
            d.refusals_seen += 1;
        }
        // Forget what HQ is past.
        d.refused.retain(|(l, seq), _| {
            lanes
                .map
                .values()
                .find(|x| x.id == *l)
                .is_none_or(|x| *seq >= x.committed)
        });
        d.refused.clone()
    }

    /// Limits of one read from the log within `records` and `bytes` still allowed: a chunk of at
    /// most [`READ_CHUNK_RECORDS`] / [`READ_CHUNK_BYTES`].
    pub fn chunk_limits(&self, records: usize, bytes: usize) -> (usize, usize) {
        (
            records.clamp(1, READ_CHUNK_RECORDS),
            bytes.clamp(1024, READ_CHUNK_BYTES),
        )
    }

    /// A gap record for `edge.gaps`.
    pub fn gap_extra(&self, g: &Gap) -> Extra {
        let payload = json!({
            "schema": "edge.gap/1",
            "store": &*self.store,
            "epoch": &*self.epoch_str,
            "stream": g.stream,
            "gap_id": g.id,
            "first_seq": g.first_seq,
            "last_seq": g.last_seq,
            "count": g.count,
            "reason": g.reason,
            "ts": g.ts_ms,
        });
        self.side_extra(&self.cfg.gap_topic, &g.stream, payload, GAP_LANE, g.id)
    }

    /// A gap record for a record the uplink does not send (too large, or refused by the broker).
    pub fn refused_extra(&self, stream: &str, r: &Refused) -> Extra {
        let seq = r.record.seq;
        tracing::error!(
            component = "uplink",
            stream,
            seq,
            bytes = r.bytes,
            reason = r.why.label,
            error = %r.why.message,
            "a record cannot be mirrored; it is reported on the gaps topic and kept in the dead-letter stream"
        );
        let payload = json!({
            "schema": "edge.gap/1",
            "store": &*self.store,
            "epoch": &*self.epoch_str,
            "stream": stream,
            "gap_id": null,
            "first_seq": seq,
            "last_seq": seq,
            "count": 1,
            "reason": format!("refused by Kafka ({}): {}", r.why.label, r.why.message),
            "kind": "refused",
            "ts": edge_core::time::now_ms(),
        });
        self.side_extra(&self.cfg.gap_topic, stream, payload, UNTRACKED_LANE, seq)
    }

    /// Writes the local dead letters of refused records before the gaps that report them go to
    /// HQ. Each carries the event id `uplink-refused/<epoch>/<stream>/<seq>`, so the log's dedup
    /// stores it once however often a crash makes the uplink refuse the record again. A log that
    /// is full refuses them like any normal-class record: that is counted and logged, and the gap
    /// at HQ still carries the reason; the stream is not held up for it.
    pub async fn write_refused_deadletters(&self, refused: &[(Arc<str>, Refused)]) {
        if refused.is_empty() {
            return;
        }
        let events: Vec<edge_core::Event> = refused
            .iter()
            .map(|(stream, r)| {
                metrics::counter!("edge_uplink_records_dropped_total", "reason" => r.why.label)
                    .increment(1);
                edge_core::deadletter::DeadLetter::new(
                    "uplink",
                    format!("refused by Kafka ({}): {}", r.why.label, r.why.message),
                )
                .field("stream", &**stream)
                .field("seq", r.record.seq)
                .field("epoch", &*self.epoch_str)
                .original(
                    &r.record.event.payload,
                    edge_core::deadletter::DEFAULT_KEEP_BYTES,
                )
                .into_event()
                .with_event_id(format!(
                    "uplink-refused/{}/{stream}/{}",
                    self.epoch_str, r.record.seq
                ))
            })
            .collect();
        if let Err(e) = self.log().append(AppendRequest::events(events)).await {
            metrics::counter!("edge_uplink_deadletters_lost_total").increment(refused.len() as u64);
            tracing::error!(component = "uplink", error = %e, records = refused.len(),
                "the dead letters of records Kafka refused could not be written locally; HQ's gap records keep the reason");
        }
    }

    fn side_extra(
        &self,
        topic: &str,
        stream: &str,
        payload: serde_json::Value,
        lane: u32,
        seq: u64,
    ) -> Extra {
        Extra {
            topic: topic.to_string(),
            key: self.store.to_string(),
            payload: serde_json::to_vec(&payload).unwrap_or_default(),
            headers: vec![
                (H_STORE, self.store.to_string()),
                (H_STREAM, stream.to_string()),
                (H_EPOCH, self.epoch_str.to_string()),
            ],
            lane,
            seq,
        }
    }

    /// The heartbeat record.
    pub async fn heartbeat_extra(&self) -> Extra {
        let f = self.progress.figures(self.log()).await;
        let usage = self.log().usage().await.unwrap_or_default();
        let streams: serde_json::Map<String, serde_json::Value> = f
            .streams
            .iter()
            .map(|(s, (head, committed))| {
                (
                    s.clone(),
                    json!({"next_seq": head, "mirrored_next_seq": committed}),
                )
            })
            .collect();
        let components: serde_json::Map<String, serde_json::Value> = self
            .ctx
            .status
            .registry()
            .snapshot()
            .into_iter()
            .map(|(name, c)| {
                (
                    name,
                    json!({"kind": c.kind, "state": c.state.as_str(), "detail": c.detail}),
                )
            })
            .collect();
        let payload = json!({
            "schema": "edge.heartbeat/1",
            "store": &*self.store,
            "epoch": &*self.epoch_str,
            "ts": edge_core::time::now_ms(),
            "agent_version": env!("CARGO_PKG_VERSION"),
            "mode": self.cfg.mode.as_str(),
            "backlog_records": f.backlog_records,
            "oldest_unsent_age_ms": f.oldest_unsent_age_ms,
            "time_to_drain_s": f.time_to_drain_s,
            "disk": {
                "used_bytes": usage.used_bytes,
                "budget_bytes": usage.budget_bytes,
                "fs_free_bytes": usage.fs_free_bytes,
                "full": usage.full,
            },
            "streams": streams,
            "components": components,
        });
        metrics::counter!("edge_uplink_heartbeats_total").increment(1);
        let mut e = self.side_extra(&self.cfg.heartbeat_topic, "", payload, UNTRACKED_LANE, 0);
        e.headers.retain(|(k, _)| *k != H_STREAM);
        e
    }

    /// Reads new HQ commands. Remirror commands rewind their lane (persisted with the command
    /// cursor in one log request, so a crash re-executes the command rather than losing it).
    /// Lanes in `busy` (records in flight) are not rewound now; the command waits.
    pub async fn apply_commands(
        &self,
        lanes: &mut Lanes,
        txn: u64,
        busy: &(dyn Fn(u32) -> bool + Sync),
    ) -> Result<(), LogError> {
        let stream = self.cfg.commands_stream.clone();
        let Some(head) = self.log().next_seq(&stream) else {
            return Ok(());
        };
        let ccursor = self.commands_cursor();
        let from = self.log().cursor(&ccursor, &stream).await?.unwrap_or(1);
        if head <= from {
            return Ok(());
        }
        let rb = self
            .log()
            .read(
                &stream,
                from,
                ReadLimits {
                    max_records: 100,
                    max_bytes: 1 << 20,
                },
            )
            .await?;
        let mut req = AppendRequest::default();
        let mut next = from;
        for r in &rb.records {
            match command::parse(&r.event.payload) {
                Ok(Some(Command::Remirror {
                    stream: s,
                    from_seq,
                    epoch,
                })) => {
                    if epoch.is_some_and(|e| e != self.epoch) {
                        tracing::warn!(
                            component = "uplink",
                            stream = s,
                            "ignoring a remirror command for another epoch of the local log"
                        );
                    } else if let Some(lane) = lanes.map.get_mut(s.as_str()) {
                        if busy(lane.id) {
                            break; // retried once the lane's records in flight are delivered
                        }
                        let from_seq = from_seq.max(1);
                        if from_seq < lane.committed {
                            let rw = Rewind {
                                from: from_seq,
                                until: lane.committed.max(lane.replay_until),
                                after_txn: txn,
                            };
                            tracing::info!(
                                component = "uplink",
                                stream = s,
                                from_seq,
                                until = rw.until,
                                "HQ asked to re-mirror a stream; sending it again from the requested seq"
                            );
                            metrics::counter!("edge_uplink_remirrors_total").increment(1);
                            lane.committed = from_seq;
                            lane.next = from_seq;
                            lane.replay_until = rw.until;
                            lane.rewind = Some(rw);
                            self.progress.set_committed(&lane.stream, from_seq);
                            req.cursors.push(CursorMove {
                                cursor: self.cursor.clone(),
                                stream: s.clone(),
                                next_seq: from_seq,
                            });
                            req.kv.push((
                                self.kv_rewind_key(&s),
                                serde_json::to_vec(&rw).unwrap_or_default(),
                            ));
                        }
                    } else {
                        tracing::warn!(
                            component = "uplink",
                            stream = s,
                            "ignoring a remirror command for a stream this store does not mirror"
                        );
                    }
                }
                Ok(None) => {}
                Err(reason) => {
                    metrics::counter!("edge_uplink_bad_commands_total").increment(1);
                    tracing::warn!(
                        component = "uplink",
                        seq = r.seq,
                        "ignoring an HQ command: {reason}"
                    );
                }
            }
            next = r.seq + 1;
        }
        if rb.records.is_empty() {
            next = rb.next_seq;
        }
        if next > from {
            req.cursors.push(CursorMove {
                cursor: ccursor,
                stream,
                next_seq: next,
            });
            self.log().append(req).await?;
        }
        Ok(())
    }

    /// Cursor moves and kv updates after lanes advanced to `committed`.
    pub fn progress_request(&self, lanes: &mut Lanes, moved: &[u32]) -> AppendRequest {
        let mut req = AppendRequest::default();
        for lane in lanes.map.values_mut().filter(|l| moved.contains(&l.id)) {
            req.cursors.push(CursorMove {
                cursor: self.cursor.clone(),
                stream: lane.stream.to_string(),
                next_seq: lane.committed,
            });
            self.progress.set_committed(&lane.stream, lane.committed);
            if lane.rewind.is_some() && lane.committed >= lane.replay_until {
                lane.rewind = None;
                lane.replay_until = 0;
                req.kv.push((self.kv_rewind_key(&lane.stream), Vec::new()));
            }
        }
        req
    }
}

/// Produces one log record of `part` with the documented key, timestamp and identity headers,
/// tracked by a delivery token (blocking while librdkafka's queue is full).
pub(crate) fn send_record(
    producer: &KafkaProducer,
    part: &Part,
    r: &Record,
    shape: &RecordShape,
    cancel: &CancellationToken,
) -> Result<(), KafkaError> {
    let key = record::key_for(shape.key_mode, &shape.store, r);
    let (ts, clamped) = shape.time.timestamp(r);
    if clamped {
        metrics::counter!("edge_uplink_event_time_replaced_total").increment(1);
    }
    let headers = record::headers_for(
        &shape.store,
        &shape.epoch,
        r,
        r.seq < part.replay_until,
        clamped,
    );
    let token = Box::new(Token {
        lane: part.lane,
        seq: r.seq,
        bytes: record::wire_size(r) as u32,
    });
    send_blocking(
        producer,
        &part.topic,
        key.as_bytes(),
        &r.event.payload,
        Some(ts),
        headers,
        token,
        cancel,
    )
}

/// Sends one message, waiting (briefly, in this blocking thread) while librdkafka's queue is full.
#[allow(clippy::too_many_arguments)]
pub(crate) fn send_blocking(
    producer: &KafkaProducer,
    topic: &str,
    key: &[u8],
    payload: &[u8],
    timestamp: Option<i64>,
    headers: rdkafka::message::OwnedHeaders,
    token: Box<Token>,
    cancel: &CancellationToken,
) -> Result<(), KafkaError> {
    let mut rec = BaseRecord::with_opaque_to(topic, token)
        .key(key)
        .payload(payload)
        .headers(headers);
    if let Some(ts) = timestamp {
        rec = rec.timestamp(ts);
    }
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((
                KafkaError::MessageProduction(rdkafka::error::RDKafkaErrorCode::QueueFull),
                r,
            )) => {
                if cancel.is_cancelled() {
                    return Err(KafkaError::Canceled);
                }
                rec = r;
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Headers of an extra message.
pub(crate) fn extra_headers(e: &Extra) -> rdkafka::message::OwnedHeaders {
    let mut h = rdkafka::message::OwnedHeaders::new_with_capacity(e.headers.len());
    for (k, v) in &e.headers {
        h = h.insert(rdkafka::message::Header {
            key: k,
            value: Some(v.as_str()),
        });
    }
    h
}
