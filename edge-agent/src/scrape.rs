//! Point-in-time gauges refreshed on every `/metrics` scrape, from the same report `status` prints.
//!
//! Event-driven figures (commit latency, ingest and dead-letter counters, evictions, MQTT link) are
//! recorded where they happen, in the library crates. What only exists as state in the database
//! (per-stream heads, backlog and oldest unsent age per cursor, gaps, disk use, component states) is
//! read here, so a scrape costs a handful of indexed queries and never walks the records.
//!
//! Names: `edge_` prefix, base units in the name (`_bytes`, `_seconds`, `_records`).

use crate::state::DaemonState;
use edge_core::State;
use edge_core::log::Log;

const STATES: [State; 5] = [
    State::Starting,
    State::Up,
    State::Degraded,
    State::Down,
    State::Stopped,
];

/// Refreshes the gauges. Errors (a closing log) leave the previous values in place.
pub async fn refresh(d: &DaemonState) {
    metrics::gauge!("edge_agent_ready").set(
        if d.ready.load(std::sync::atomic::Ordering::Acquire) {
            1.0
        } else {
            0.0
        },
    );
    metrics::gauge!("edge_agent_uptime_seconds").set(d.started.elapsed().as_secs_f64());
    metrics::gauge!(
        "edge_agent_info",
        "version" => env!("CARGO_PKG_VERSION"),
        "store" => d.config.agent.store_id.clone(),
        "epoch" => d.log.epoch().to_string()
    )
    .set(1.0);

    for (name, c) in d.status.snapshot() {
        for s in STATES {
            metrics::gauge!(
                "edge_component_state",
                "component" => name.clone(),
                "kind" => c.kind.clone(),
                "state" => s.as_str()
            )
            .set(if c.state == s { 1.0 } else { 0.0 });
        }
    }

    let Ok(r) = d.report().await else {
        return;
    };
    metrics::gauge!("edge_log_used_bytes").set(r.log.used_bytes as f64);
    metrics::gauge!("edge_log_file_bytes").set(r.log.file_bytes as f64);
    metrics::gauge!("edge_log_wal_bytes").set(r.log.wal_bytes as f64);
    metrics::gauge!("edge_log_budget_bytes").set(r.log.budget_bytes as f64);
    metrics::gauge!("edge_fs_free_bytes").set(r.log.fs_free_bytes as f64);
    let integrity = r.log.integrity["state"].as_str().unwrap_or("unknown");
    metrics::gauge!("edge_log_integrity_failed").set(if integrity == "failed" { 1.0 } else { 0.0 });

    for s in &r.streams {
        let (stream, class) = (s.name.clone(), s.priority.clone());
        // seq is dense per stream and survives restarts: next_seq - 1 is every record ever
        // appended to this stream in this epoch, a counter whose rate() is the ingest rate.
        metrics::counter!("edge_log_appended_records_total", "stream" => stream.clone(), "class" => class.clone())
            .absolute(s.next_seq.saturating_sub(1));
        metrics::gauge!("edge_log_stream_next_seq", "stream" => stream.clone())
            .set(s.next_seq as f64);
        metrics::gauge!("edge_log_stream_records", "stream" => stream.clone(), "class" => class)
            .set(s.records as f64);
        metrics::gauge!("edge_log_stream_payload_bytes", "stream" => stream.clone())
            .set(s.payload_bytes as f64);
        metrics::gauge!("edge_log_stream_oldest_age_seconds", "stream" => stream.clone())
            .set(s.oldest_age_s.unwrap_or(0.0));
        for (cursor, c) in &s.cursors {
            metrics::gauge!("edge_log_cursor_backlog_records", "stream" => stream.clone(), "cursor" => cursor.clone())
                .set(c.backlog as f64);
            metrics::gauge!("edge_log_cursor_oldest_unsent_age_seconds", "stream" => stream.clone(), "cursor" => cursor.clone())
                .set(c.oldest_unsent_age_s.unwrap_or(0.0));
        }
    }

    // Records that left the store without reaching HQ, by stream and reason (eviction, corruption).
    // The label is the reason's kind ("evicted", "corrupt"); the text after the colon is
    // free-form and would make a series per record.
    if let Ok(summary) = d.log.gap_summary().await {
        for g in summary {
            metrics::gauge!("edge_log_gaps", "stream" => g.stream.clone(), "reason" => g.kind.clone())
                .set(g.ranges as f64);
            metrics::gauge!("edge_log_gap_records", "stream" => g.stream, "reason" => g.kind)
                .set(g.records as f64);
        }
    }
}
