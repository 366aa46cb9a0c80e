//! The durable local log: configuration and the SQLite engine. The interface (trait [`Log`] and
//! the request/response types) lives in `edge_core::log` so that drivers and models depend only on
//! the core crate; it is re-exported here.

mod contract;
pub mod sqlite;

pub use edge_core::log::*;

use edge_core::Priority;
use edge_core::config::{ByteSize, Problems, join};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::Duration;

pub use sqlite::{LogInspector, SqliteLog};

/// SQLite `synchronous` mode. `full` is the product default: a committed record survives a power cut.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Synchronous {
    #[default]
    Full,
    /// Survives an agent crash but not a power cut (the last commits may be lost). For benchmarks
    /// and for hardware with a power-loss-protected disk.
    Normal,
}

/// When to run SQLite's `quick_check` over the whole database.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum IntegrityCheck {
    /// In a background thread after start-up, so start-up time stays independent of the backlog.
    #[default]
    Background,
    /// Before the log opens (start-up time then grows with the database size).
    Blocking,
    Off,
}

/// What to do when the database file cannot be opened because it is corrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnCorruptOpen {
    /// Move the damaged file aside (`log.db.corrupt-<time>`) for forensics and start a new log with a
    /// new epoch, so the store keeps working and HQ sees the epoch change.
    #[default]
    MoveAside,
    /// Refuse to start (the operator decides).
    Fail,
}

/// Per-stream policy overrides (`[log.streams."name"]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct StreamSettings {
    /// Eviction class; default from PRODUCT.md's stream table (unknown streams: normal).
    pub priority: Option<Priority>,
    /// Whether the stream is mirrored to HQ. A stream that is not mirrored has nothing to protect:
    /// retention and the budget treat all of its records as mirrored. Default: true.
    pub mirror: Option<bool>,
    /// Keep only the newest record of each key (plus the newest `history` records), like a
    /// compacted Kafka topic. Default: on for the `hq.*` streams the downlink writes (prices,
    /// campaigns, models, commands), which are protected and never mirrored, so they would
    /// otherwise keep every price update ever; off for every other stream.
    pub keep_latest_per_key: Option<bool>,
    /// With `keep_latest_per_key`: the newest records kept whatever their key (default
    /// [`DEFAULT_HISTORY`]).
    pub history: Option<u64>,
}

/// Records of a compacted stream kept whatever their key (`[log.streams."name"] history`).
pub const DEFAULT_HISTORY: u64 = 100;

/// The resolved policy of one stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPolicy {
    pub priority: Priority,
    pub mirrored: bool,
    /// Compacted by key, keeping this many newest records whatever their key.
    pub compact_history: Option<u64>,
}

/// `[log]` section of the agent config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// Database file name inside the agent's data directory (or an absolute path).
    pub file: String,
    pub synchronous: Synchronous,
    /// Longest time a record waits for its batch to be sealed under continuous load. An idle log
    /// commits as soon as its queue runs empty, so a lone record never waits for the window.
    pub commit_window_ms: u64,
    /// A batch is sealed at this many records even inside the window.
    pub max_batch_records: usize,
    /// Shortest time from the start of one commit to the start of the next (0 to 1000 ms). A
    /// record arriving sooner waits for the rest of it, and whatever arrives meanwhile shares its
    /// commit: fewer, fuller commits write fewer bytes per record (flash wear) at the price of
    /// up to this much added acknowledgement latency. 0 commits as soon as the queue runs empty.
    pub commit_interval_ms: u64,
    /// Requests that may wait in front of the writer before submitters block (backpressure).
    pub queue_depth: usize,
    /// Budget for the database pages (the WAL adds at most `wal_size_limit` transiently).
    pub disk_budget: ByteSize,
    /// Free space to keep on the data filesystem; below it the log evicts like over budget.
    /// Free pages inside the database file count as free (they are given back when the
    /// filesystem is really below the floor). At least `wal_size_limit`, or 0 for no floor.
    pub min_free_disk: ByteSize,
    /// How long mirrored records stay for local replay. `forever` keeps them until the budget needs
    /// the room.
    #[serde(with = "retention_serde")]
    pub retention: Option<Duration>,
    /// Event ids remembered for deduplication (across all streams), oldest forgotten first.
    pub dedup_window: u64,
    /// The cursor whose position defines "mirrored" (the uplink's cursor).
    pub mirror_cursor: String,
    pub integrity_check: IntegrityCheck,
    pub on_corrupt_open: OnCorruptOpen,
    /// SQLite page cache of the writer connection.
    pub cache_size: ByteSize,
    /// SQLite page size of a new database (bytes, a power of two from 512 to 65536). An existing
    /// database keeps the page size it was created with. Smaller pages write fewer bytes per small
    /// commit (flash wear) at some cost in peak append throughput: see docs/BENCHMARKS.md.
    pub page_size: u32,
    /// WAL file size kept after a checkpoint (`journal_size_limit`).
    pub wal_size_limit: ByteSize,
    /// Interval of retention, budget and dedup-window maintenance.
    #[serde(with = "humantime_serde")]
    pub maintenance_interval: Duration,
    pub streams: BTreeMap<String, StreamSettings>,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            file: "log.db".into(),
            synchronous: Synchronous::Full,
            commit_window_ms: 10,
            max_batch_records: 20_000,
            commit_interval_ms: 0,
            queue_depth: 4096,
            disk_budget: ByteSize::gib(2),
            min_free_disk: ByteSize::mib(256),
            retention: Some(Duration::from_secs(7 * 24 * 3600)),
            dedup_window: 1_000_000,
            mirror_cursor: "uplink".into(),
            integrity_check: IntegrityCheck::Background,
            on_corrupt_open: OnCorruptOpen::MoveAside,
            cache_size: ByteSize::mib(8),
            page_size: 4096,
            wal_size_limit: ByteSize::mib(64),
            maintenance_interval: Duration::from_secs(5),
            streams: BTreeMap::new(),
        }
    }
}

mod retention_serde {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(v: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            None => s.serialize_str("forever"),
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let s = String::deserialize(d)?;
        if s == "forever" {
            return Ok(None);
        }
        humantime::parse_duration(&s).map(Some).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration or \"forever\": {e}"))
        })
    }
}

impl LogConfig {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if self.file.is_empty() {
            problems.push(
                join(path, "file"),
                "must name the database file, e.g. \"log.db\"",
            );
        }
        if !(1..=1000).contains(&self.commit_window_ms) {
            problems.push(
                join(path, "commit_window_ms"),
                format!("is {}; must be between 1 and 1000", self.commit_window_ms),
            );
        }
        if self.commit_interval_ms > 1000 {
            problems.push(
                join(path, "commit_interval_ms"),
                format!("is {}; must be between 0 and 1000", self.commit_interval_ms),
            );
        }
        if !(1..=1_000_000).contains(&self.max_batch_records) {
            problems.push(
                join(path, "max_batch_records"),
                format!(
                    "is {}; must be between 1 and 1000000",
                    self.max_batch_records
                ),
            );
        }
        if !(1..=1_000_000).contains(&self.queue_depth) {
            problems.push(join(path, "queue_depth"), "must be between 1 and 1000000");
        }
        if self.disk_budget.as_u64() < ByteSize::mib(1).as_u64() {
            problems.push(
                join(path, "disk_budget"),
                format!("is {}; must be at least 1 MiB", self.disk_budget),
            );
        }
        let (floor, wal) = (self.min_free_disk.as_u64(), self.wal_size_limit.as_u64());
        if floor > 0 && floor < wal {
            // The WAL may grow by wal_size_limit between two checks of the floor (and eviction
            // itself writes to it), so a smaller floor lets the log fill the filesystem to 0.
            problems.push(
                join(path, "min_free_disk"),
                format!(
                    "is {}, less than wal_size_limit ({}): the WAL can grow by that much before the floor is checked again and fill the disk; set min_free_disk to at least {} (or \"0 B\" for no floor), or lower wal_size_limit",
                    self.min_free_disk, self.wal_size_limit, self.wal_size_limit
                ),
            );
        }
        if !(512..=65536).contains(&self.page_size) || !self.page_size.is_power_of_two() {
            problems.push(
                join(path, "page_size"),
                format!(
                    "is {}; must be a power of two from 512 to 65536, e.g. 4096 or 1024",
                    self.page_size
                ),
            );
        }
        if self.mirror_cursor.is_empty() {
            problems.push(
                join(path, "mirror_cursor"),
                "must name a cursor, e.g. \"uplink\"",
            );
        }
        if self.maintenance_interval < Duration::from_millis(100) {
            problems.push(join(path, "maintenance_interval"), "must be at least 100ms");
        }
        for name in self.streams.keys() {
            if let Err(e) = edge_core::config::check_stream_name(name) {
                problems.push(join(&join(path, "streams"), &format!("{name:?}")), e);
            }
        }
    }

    /// The resolved policy of a stream: config override, else PRODUCT.md's table.
    pub fn policy(&self, stream: &str) -> StreamPolicy {
        let s = self.streams.get(stream);
        StreamPolicy {
            priority: s
                .and_then(|s| s.priority)
                .unwrap_or_else(|| Priority::default_for_stream(stream)),
            mirrored: s.and_then(|s| s.mirror).unwrap_or(true),
            compact_history: s
                .and_then(|s| s.keep_latest_per_key)
                .unwrap_or_else(|| stream.starts_with("hq."))
                .then(|| s.and_then(|s| s.history).unwrap_or(DEFAULT_HISTORY)),
        }
    }

    pub fn commit_window(&self) -> Duration {
        Duration::from_millis(self.commit_window_ms)
    }

    pub fn commit_interval(&self) -> Duration {
        Duration::from_millis(self.commit_interval_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(cfg: &LogConfig) -> Vec<(String, String)> {
        let mut p = Problems::new();
        cfg.validate("log", &mut p);
        p.iter()
            .map(|p| (p.path.clone(), p.message.clone()))
            .collect()
    }

    /// With a floor below the WAL limit a filling disk reached 0 bytes free and nothing could be
    /// evicted any more (eviction needs WAL room): such a floor is refused, naming both values.
    #[test]
    fn a_free_space_floor_below_the_wal_limit_is_refused() {
        let cfg = LogConfig {
            min_free_disk: ByteSize::mib(1),
            wal_size_limit: ByteSize::mib(4),
            ..LogConfig::default()
        };
        let p = problems(&cfg);
        assert_eq!(p.len(), 1, "{p:?}");
        assert_eq!(p[0].0, "log.min_free_disk");
        assert!(
            p[0].1.contains(&format!("is {},", ByteSize::mib(1)))
                && p[0]
                    .1
                    .contains(&format!("wal_size_limit ({})", ByteSize::mib(4))),
            "{}",
            p[0].1
        );
        for ok in [ByteSize::mib(4), ByteSize::mib(8), ByteSize::b(0)] {
            let cfg = LogConfig {
                min_free_disk: ok,
                ..cfg.clone()
            };
            assert!(problems(&cfg).is_empty(), "{ok} is a valid floor");
        }
        assert!(
            problems(&LogConfig::default()).is_empty(),
            "the defaults are valid"
        );
    }
}
