//! The status report: what `edge-agent status` prints, what `/status` serves, and what the
//! `agent.health` records carry.

use edge_core::log::{ClassUsages, CursorInfo, DiskUsage, FullCause, IntegrityState, StreamInfo};
use edge_core::status::ComponentStatus;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CursorReport {
    pub next_seq: u64,
    /// Records at or after the cursor (an upper bound when the range has gaps).
    pub backlog: u64,
    /// Age of the oldest record not yet past the cursor, in seconds.
    pub oldest_unsent_age_s: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamReport {
    pub name: String,
    pub priority: String,
    pub mirrored: bool,
    pub first_seq: u64,
    pub next_seq: u64,
    pub records: u64,
    pub payload_bytes: u64,
    pub oldest_age_s: Option<f64>,
    pub cursors: BTreeMap<String, CursorReport>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogReport {
    pub path: String,
    pub epoch: String,
    pub used_bytes: u64,
    pub file_bytes: u64,
    pub wal_bytes: u64,
    pub budget_bytes: u64,
    pub fs_free_bytes: u64,
    /// Free pages inside the database file (counted as free against the floor).
    #[serde(default)]
    pub reclaimable_bytes: u64,
    #[serde(default)]
    pub reserve_bytes: u64,
    #[serde(default)]
    pub moved_aside_bytes: u64,
    #[serde(default)]
    pub min_free_bytes: u64,
    /// Records and payload per class, mirrored or not: what holds the budget.
    #[serde(default)]
    pub classes: ClassUsages,
    pub full: bool,
    #[serde(default)]
    pub full_cause: Option<FullCause>,
    pub integrity: serde_json::Value,
    pub gaps: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub store_id: String,
    pub version: String,
    /// True when the report comes from the running daemon; false when read from the database by the
    /// CLI while no daemon answered.
    pub daemon_running: bool,
    pub uptime_s: Option<f64>,
    pub log: LogReport,
    pub streams: Vec<StreamReport>,
    pub components: BTreeMap<String, serde_json::Value>,
}

pub struct Inputs<'a> {
    pub store_id: &'a str,
    pub path: String,
    pub epoch: String,
    pub usage: DiskUsage,
    pub integrity: Option<IntegrityState>,
    pub streams: Vec<StreamInfo>,
    pub cursors: Vec<CursorInfo>,
    /// (stream, cursor next_seq) -> oldest ingest ts at/after it.
    pub oldest: BTreeMap<(String, u64), Option<i64>>,
    pub gaps: u64,
    pub components: BTreeMap<String, ComponentStatus>,
    pub daemon_running: bool,
    pub uptime_s: Option<f64>,
}

fn age_s(now: i64, ts: Option<i64>) -> Option<f64> {
    ts.map(|t| ((now - t).max(0)) as f64 / 1000.0)
}

pub fn build(i: Inputs<'_>) -> StatusReport {
    let now = edge_core::time::now_ms();
    let streams = i
        .streams
        .iter()
        .map(|s| {
            let cursors = i
                .cursors
                .iter()
                .filter(|c| c.stream == s.name)
                .map(|c| {
                    let from = c.next_seq.max(s.first_seq);
                    (
                        c.cursor.clone(),
                        CursorReport {
                            next_seq: c.next_seq,
                            backlog: s.next_seq.saturating_sub(from),
                            oldest_unsent_age_s: age_s(
                                now,
                                i.oldest
                                    .get(&(s.name.clone(), c.next_seq))
                                    .copied()
                                    .flatten(),
                            ),
                        },
                    )
                })
                .collect();
            StreamReport {
                name: s.name.clone(),
                priority: s.priority.to_string(),
                mirrored: s.mirrored,
                first_seq: s.first_seq,
                next_seq: s.next_seq,
                records: s.records,
                payload_bytes: s.payload_bytes,
                oldest_age_s: age_s(now, s.oldest_ingest_ts_ms),
                cursors,
            }
        })
        .collect();
    StatusReport {
        store_id: i.store_id.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        daemon_running: i.daemon_running,
        uptime_s: i.uptime_s,
        log: LogReport {
            path: i.path,
            epoch: i.epoch,
            used_bytes: i.usage.used_bytes,
            file_bytes: i.usage.file_bytes,
            wal_bytes: i.usage.wal_bytes,
            budget_bytes: i.usage.budget_bytes,
            fs_free_bytes: i.usage.fs_free_bytes,
            reclaimable_bytes: i.usage.reclaimable_bytes,
            reserve_bytes: i.usage.reserve_bytes,
            moved_aside_bytes: i.usage.moved_aside_bytes,
            min_free_bytes: i.usage.min_free_bytes,
            classes: i.usage.classes,
            full: i.usage.full,
            full_cause: i.usage.full_cause,
            integrity: i
                .integrity
                .map(|s| serde_json::to_value(s).unwrap_or_default())
                .unwrap_or(serde_json::json!({"state": "unknown"})),
            gaps: i.gaps,
        },
        streams,
        components: i
            .components
            .into_iter()
            .map(|(k, v)| (k, serde_json::to_value(v).unwrap_or_default()))
            .collect(),
    }
}

fn human_bytes(b: u64) -> String {
    edge_core::config::ByteSize::b(b).to_string()
}

fn human_age(s: Option<f64>) -> String {
    match s {
        None => "-".into(),
        Some(s) if s < 120.0 => format!("{s:.0}s"),
        Some(s) if s < 7200.0 => format!("{:.0}m", s / 60.0),
        Some(s) if s < 172_800.0 => format!("{:.1}h", s / 3600.0),
        Some(s) => format!("{:.1}d", s / 86400.0),
    }
}

/// The human form of `status`.
pub fn render(r: &StatusReport) -> String {
    use std::fmt::Write;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "edge-agent {}  store {}  {}",
        r.version,
        r.store_id,
        if r.daemon_running {
            format!("running for {}", human_age(r.uptime_s))
        } else {
            "daemon NOT running (figures read from the database)".into()
        }
    );
    let _ = writeln!(
        o,
        "log {}  epoch {}\n    used {} of budget {} (file {}, of it free pages {}; wal {}; reserve {}; moved-aside {})\n    filesystem free {} (floor {}){}",
        r.log.path,
        r.log.epoch,
        human_bytes(r.log.used_bytes),
        human_bytes(r.log.budget_bytes),
        human_bytes(r.log.file_bytes),
        human_bytes(r.log.reclaimable_bytes),
        human_bytes(r.log.wal_bytes),
        human_bytes(r.log.reserve_bytes),
        human_bytes(r.log.moved_aside_bytes),
        human_bytes(r.log.fs_free_bytes),
        human_bytes(r.log.min_free_bytes),
        match (r.log.full, r.log.full_cause) {
            (true, Some(c)) => format!("\n    FULL: intake paused: {c}"),
            (true, None) => "\n    FULL: intake paused".to_string(),
            _ => String::new(),
        }
    );
    let c = &r.log.classes;
    let _ = writeln!(
        o,
        "    payload by class (unmirrored): protected {} ({}), high {} ({}), normal {} ({}), low {} ({})",
        human_bytes(c.protected.payload_bytes),
        human_bytes(c.protected.unmirrored_payload_bytes),
        human_bytes(c.high.payload_bytes),
        human_bytes(c.high.unmirrored_payload_bytes),
        human_bytes(c.normal.payload_bytes),
        human_bytes(c.normal.unmirrored_payload_bytes),
        human_bytes(c.low.payload_bytes),
        human_bytes(c.low.unmirrored_payload_bytes),
    );
    let _ = writeln!(
        o,
        "    integrity {}  gaps recorded {}",
        r.log.integrity["state"].as_str().unwrap_or("unknown"),
        r.log.gaps
    );
    let _ = writeln!(
        o,
        "\n{:<22} {:<9} {:>10} {:>10} {:>10} {:>9}  cursors (backlog, oldest unsent)",
        "stream", "class", "first", "next", "records", "oldest"
    );
    for s in &r.streams {
        let cursors: Vec<String> = s
            .cursors
            .iter()
            .map(|(n, c)| format!("{n}: {} ({})", c.backlog, human_age(c.oldest_unsent_age_s)))
            .collect();
        let _ = writeln!(
            o,
            "{:<22} {:<9} {:>10} {:>10} {:>10} {:>9}  {}",
            s.name,
            s.priority,
            s.first_seq,
            s.next_seq,
            s.records,
            human_age(s.oldest_age_s),
            if cursors.is_empty() {
                "-".into()
            } else {
                cursors.join(", ")
            }
        );
    }
    if !r.components.is_empty() {
        let _ = writeln!(o, "\n{:<22} {:<10} detail", "component", "state");
        for (name, c) in &r.components {
            let _ = writeln!(
                o,
                "{:<22} {:<10} {}",
                name,
                c["state"].as_str().unwrap_or("?"),
                c["detail"].as_str().unwrap_or("")
            );
        }
    }
    o
}
