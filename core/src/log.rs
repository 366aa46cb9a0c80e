//! The local log's interface: the trait every storage engine implements and the types that cross
//! it. Implementations live in `edge-sync` (SQLite); every component that reads or writes records
//! depends only on this trait.
//!
//! Invariants every implementation keeps (the contract suite in `edge-sync` checks each one):
//!
//! * **Ack after durable commit.** [`Log::submit`] returns an [`AppendTicket`] that resolves only after
//!   the commit holding the request is durable. Requests are applied in submission order.
//! * **Dense, monotonic seq.** Within a stream, `seq` starts at 1 and increases by exactly one per
//!   stored record. Holes appear only through eviction, corruption quarantine or retention, and every
//!   hole of an unmirrored record is recorded as a [`Gap`].
//! * **One epoch per incarnation.** [`Log::epoch`] is created with the database and never changes.
//! * **Stored once per event id.** An event whose `event_id` is already in the stream's dedup window
//!   is not stored again; its ticket reports [`Appended::Duplicate`] with the original seq.
//! * **Atomic side effects.** Cursor moves and key/value writes carried by a request commit in the same
//!   transaction as its events.
//! * **Nothing expires on a timer** unless it is mirrored: retention removes only records below the
//!   mirror cursor; the disk budget evicts lowest class first and never an unmirrored protected record.

use crate::{Event, Priority, Record};
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::sync::{oneshot, watch};
use uuid::Uuid;

/// Name of the stream that receives records the agent could not accept or read back.
pub const DEADLETTER_STREAM: &str = "deadletter";

/// Errors of the local log.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LogError {
    #[error("the local log is closed; the agent is shutting down")]
    Closed,
    /// Intake is paused: the budget or the free-space floor is reached and nothing more may be
    /// evicted. [`DiskUsage::full_cause`] and the rest of [`DiskUsage`] say what holds the space.
    #[error(
        "the local log is full: the disk budget or the free-space floor is reached and only unmirrored protected records are left to evict; intake is paused until the uplink catches up or space is freed (status shows what holds the space)"
    )]
    Full,
    #[error("the local log at {path} could not be opened: {reason}")]
    Open { path: String, reason: String },
    #[error("the local log at {path} is in use by another edge-agent process (lock file {lock})")]
    Locked { path: String, lock: String },
    #[error("local log storage error during {op}: {reason}")]
    Storage { op: &'static str, reason: String },
    #[error("invalid request to the local log: {0}")]
    Invalid(String),
}

impl LogError {
    /// Whether retrying the same request later can succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self, LogError::Full | LogError::Storage { .. })
    }
}

/// Moves a named cursor; applied in the same transaction as the request's events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorMove {
    pub cursor: String,
    pub stream: String,
    /// The next seq this cursor's owner will read (everything below is done).
    pub next_seq: u64,
}

/// One unit of work for the log: events to append plus side effects that must commit with them.
#[derive(Debug, Clone, Default)]
pub struct AppendRequest {
    pub events: Vec<Event>,
    pub cursors: Vec<CursorMove>,
    /// Key/value writes (e.g. consumed Kafka offsets of the downlink), same transaction.
    pub kv: Vec<(String, Vec<u8>)>,
}

impl AppendRequest {
    pub fn events(events: Vec<Event>) -> Self {
        AppendRequest {
            events,
            ..Default::default()
        }
    }
    pub fn one(event: Event) -> Self {
        Self::events(vec![event])
    }
    pub fn cursor(cursor: &str, stream: &str, next_seq: u64) -> Self {
        AppendRequest {
            cursors: vec![CursorMove {
                cursor: cursor.into(),
                stream: stream.into(),
                next_seq,
            }],
            ..Default::default()
        }
    }
}

/// Outcome of one event of a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Appended {
    /// Stored under this seq.
    New { seq: u64 },
    /// Its event id was already stored under this seq; nothing was written.
    Duplicate { seq: u64 },
}

impl Appended {
    pub fn seq(self) -> u64 {
        match self {
            Appended::New { seq } | Appended::Duplicate { seq } => seq,
        }
    }
    pub fn is_duplicate(self) -> bool {
        matches!(self, Appended::Duplicate { .. })
    }
}

/// Result of a durable request: one entry per event, in request order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AppendOutcome {
    pub appended: Vec<Appended>,
}

/// Resolves when the request it stands for is durable (or failed).
#[derive(Debug)]
pub struct AppendTicket {
    rx: oneshot::Receiver<Result<AppendOutcome, LogError>>,
}

impl AppendTicket {
    pub fn new(rx: oneshot::Receiver<Result<AppendOutcome, LogError>>) -> Self {
        AppendTicket { rx }
    }
}

impl Future for AppendTicket {
    type Output = Result<AppendOutcome, LogError>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or(Err(LogError::Closed)))
    }
}

/// Bounds of one read.
#[derive(Debug, Clone, Copy)]
pub struct ReadLimits {
    pub max_records: usize,
    pub max_bytes: usize,
}

impl Default for ReadLimits {
    fn default() -> Self {
        ReadLimits {
            max_records: 1000,
            max_bytes: 1 << 20,
        }
    }
}

/// Records read from one stream.
#[derive(Debug, Clone, Default)]
pub struct ReadBatch {
    /// Verified records in seq order.
    pub records: Vec<Record>,
    /// Where the next read should start: one past the last row examined (records, holes and
    /// quarantined rows included), or the requested seq when nothing was found.
    pub next_seq: u64,
    /// Rows that failed verification; they were sent to `deadletter` and removed with a gap.
    pub quarantined: Vec<(u64, String)>,
}

/// A named cursor's position on one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CursorInfo {
    pub cursor: String,
    pub stream: String,
    pub next_seq: u64,
    pub updated_ts_ms: i64,
}

/// State of one stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StreamInfo {
    pub name: String,
    pub priority: Priority,
    pub mirrored: bool,
    /// Lowest seq still stored (== `next_seq` when the stream is empty).
    pub first_seq: u64,
    /// Seq the next record will get.
    pub next_seq: u64,
    pub records: u64,
    pub payload_bytes: u64,
    pub oldest_ingest_ts_ms: Option<i64>,
}

/// Records that left the store without reaching HQ (eviction, corruption). HQ sees these on
/// `edge.gaps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Gap {
    pub id: u64,
    pub stream: String,
    pub first_seq: u64,
    pub last_seq: u64,
    /// Records actually removed in the range (holes already in it are not counted).
    pub count: u64,
    pub reason: String,
    pub ts_ms: i64,
}

/// Gaps of one stream and kind (the reason's text before its first `:`, e.g. `evicted`, `corrupt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct GapSummary {
    pub stream: String,
    pub kind: String,
    /// Gap rows (seq ranges).
    pub ranges: u64,
    /// Records in them.
    pub records: u64,
}

/// Disk use of the log: what holds its share of the filesystem, and why intake is paused if it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub struct DiskUsage {
    /// Database pages in use (what the budget bounds, with `moved_aside_bytes`).
    pub used_bytes: u64,
    /// Size of the database file (used + free pages).
    pub file_bytes: u64,
    /// Free pages inside the database file (`file_bytes - used_bytes`). New records reuse them;
    /// they count as free space against `min_free_disk`, and are given back to the filesystem
    /// when it really runs below that floor.
    pub reclaimable_bytes: u64,
    pub wal_bytes: u64,
    /// A preallocated file the log deletes to make room for an eviction on a full filesystem,
    /// and recreates after.
    pub reserve_bytes: u64,
    /// Damaged databases moved aside at open (the newest is kept for forensics). Counted
    /// against the budget; deleted before any unmirrored record is evicted.
    pub moved_aside_bytes: u64,
    pub budget_bytes: u64,
    /// Free space on the data filesystem for unprivileged users.
    pub fs_free_bytes: u64,
    /// The free-space floor (`min_free_disk`; 0 = none).
    pub min_free_bytes: u64,
    /// Records and payload per priority class, and how much of it is not mirrored yet.
    pub classes: ClassUsages,
    /// True while intake is refused because nothing more can be evicted.
    pub full: bool,
    /// Which limit holds intake while `full`.
    pub full_cause: Option<FullCause>,
}

/// Why the log refuses new records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FullCause {
    /// Unmirrored protected records (plus the log's own tables and any moved-aside database)
    /// fill the disk budget.
    Budget,
    /// The filesystem is below `min_free_disk` with everything evictable gone and the free
    /// pages given back: what is left is unmirrored protected records and files that are not
    /// the log's.
    FreeSpace,
}

impl std::fmt::Display for FullCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            FullCause::Budget => "unmirrored protected records fill the disk budget",
            FullCause::FreeSpace => {
                "the filesystem is below min_free_disk and the log has nothing left it may evict"
            }
        })
    }
}

/// Records of one priority class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClassUsage {
    pub records: u64,
    pub payload_bytes: u64,
    /// At or past the mirror cursor of a mirrored stream (what eviction leaves a gap for).
    pub unmirrored_records: u64,
    /// Estimated from each stream's average record size.
    pub unmirrored_payload_bytes: u64,
}

/// [`ClassUsage`] per [`Priority`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct ClassUsages {
    pub low: ClassUsage,
    pub normal: ClassUsage,
    pub high: ClassUsage,
    pub protected: ClassUsage,
}

impl ClassUsages {
    pub fn get(&self, p: Priority) -> &ClassUsage {
        match p {
            Priority::Low => &self.low,
            Priority::Normal => &self.normal,
            Priority::High => &self.high,
            Priority::Protected => &self.protected,
        }
    }
    pub fn get_mut(&mut self, p: Priority) -> &mut ClassUsage {
        match p {
            Priority::Low => &mut self.low,
            Priority::Normal => &mut self.normal,
            Priority::High => &mut self.high,
            Priority::Protected => &mut self.protected,
        }
    }
}

/// What one maintenance pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct MaintenanceReport {
    /// Mirrored records removed by retention.
    pub retention_deleted: u64,
    /// Mirrored records removed to meet the budget (no gap: HQ has them).
    pub mirrored_evicted: u64,
    /// Unmirrored records removed to meet the budget (each range recorded as a gap).
    pub unmirrored_evicted: u64,
    pub dedup_forgotten: u64,
    /// Records of compacted streams (`keep_latest_per_key`) removed because a newer record has
    /// their key, or because they are keyless, older than the kept history and read by every
    /// cursor.
    pub compacted: u64,
    /// Gap markers removed because the uplink has reported them to HQ.
    pub gaps_pruned: u64,
    /// Bytes of free database pages given back to the filesystem.
    pub reclaimed_bytes: u64,
    pub full: bool,
}

/// Result of the background or blocking integrity check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum IntegrityState {
    NotRun,
    Running,
    Ok,
    Failed {
        problems: Vec<String>,
    },
    /// A background check was stopped before it finished (it would have held the WAL back for
    /// longer than the log allows); it is tried again later. Records are still CRC-checked on
    /// every read.
    Postponed {
        reason: String,
    },
}

/// The local log. One implementation per storage engine; every one passes the suite in
/// `contract.rs`.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// Identity of this incarnation of the log.
    fn epoch(&self) -> Uuid;

    /// Queues a request. Waits only for room in the writer's queue (backpressure); the returned
    /// ticket resolves when the request is durable. Requests are applied in the order in which their
    /// `submit` calls completed.
    async fn submit(&self, req: AppendRequest) -> Result<AppendTicket, LogError>;

    /// `submit` and wait for durability.
    async fn append(&self, req: AppendRequest) -> Result<AppendOutcome, LogError> {
        self.submit(req).await?.await
    }

    /// Reads verified records of `stream` starting at `from_seq`.
    async fn read(
        &self,
        stream: &str,
        from_seq: u64,
        limits: ReadLimits,
    ) -> Result<ReadBatch, LogError>;

    /// The committed position of `cursor` on `stream`, if it was ever moved.
    async fn cursor(&self, cursor: &str, stream: &str) -> Result<Option<u64>, LogError>;

    async fn cursors(&self) -> Result<Vec<CursorInfo>, LogError>;

    async fn streams(&self) -> Result<Vec<StreamInfo>, LogError>;

    /// The ingest time of the first stored record with seq >= `from_seq` (oldest unsent age).
    async fn oldest_from(&self, stream: &str, from_seq: u64) -> Result<Option<i64>, LogError>;

    /// Gaps with id greater than `after_id`, oldest first.
    async fn gaps(&self, after_id: u64, limit: usize) -> Result<Vec<Gap>, LogError>;

    /// Gaps counted per stream and kind, without reading every gap.
    async fn gap_summary(&self) -> Result<Vec<GapSummary>, LogError>;

    async fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, LogError>;

    async fn usage(&self) -> Result<DiskUsage, LogError>;

    /// Runs retention, budget enforcement and dedup-window pruning now (also runs periodically).
    async fn maintain(&self) -> Result<MaintenanceReport, LogError>;

    fn integrity(&self) -> IntegrityState;

    /// Whether the log can still commit: `false` once its writer has stopped (closed, or its
    /// thread ended on a panic). Cheap (no I/O, no queue): for health probes.
    fn writer_alive(&self) -> bool {
        true
    }

    /// Changes after every commit; consumers wait on it instead of polling.
    fn subscribe(&self) -> watch::Receiver<u64>;

    /// Seq the next record of `stream` will get, from memory (no I/O). `None` for unknown streams.
    fn next_seq(&self, stream: &str) -> Option<u64>;

    /// Flushes everything queued, checkpoints and releases the database. Later calls fail with
    /// [`LogError::Closed`].
    async fn close(&self) -> Result<(), LogError>;
}
