//! `edge-agent fleet`: HQ's view of every store from the side topics (see docs/KAFKA.md and
//! docs/SCALING.md). Per store: state (silent, behind, ok), last heartbeat, backlog, oldest unsent
//! record, gaps with reasons, and the version running; then a summary line.

use edge_sync::kafka::fleet::StoreView;
use serde::Serialize;
use std::collections::BTreeMap;
use std::fmt::Write;

/// Thresholds that classify a store.
#[derive(Debug, Clone, Copy)]
pub struct Thresholds {
    /// No heartbeat for this long: `silent` (the store is off, cut off, or its uplink is stuck).
    pub silent_after_ms: u64,
    /// The oldest record not at HQ is older than this: `behind`.
    pub behind_after_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    Silent,
    Behind,
    Ok,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Silent => "silent",
            State::Behind => "behind",
            State::Ok => "ok",
        }
    }
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub state: State,
    /// Age of the newest heartbeat at `now` (the store's clock against this machine's).
    pub heartbeat_age_ms: Option<u64>,
    #[serde(flatten)]
    pub view: StoreView,
}

#[derive(Debug, Serialize)]
pub struct Report {
    pub generated_ms: i64,
    pub stores: usize,
    pub silent: usize,
    pub behind: usize,
    pub with_gaps: usize,
    pub gap_records: u64,
    pub versions: BTreeMap<String, usize>,
    pub rows: Vec<Row>,
}

pub fn classify(views: Vec<StoreView>, t: Thresholds, now_ms: i64) -> Report {
    let mut rows: Vec<Row> = views
        .into_iter()
        .map(|view| {
            let heartbeat_age_ms = view
                .last_heartbeat_ms
                .map(|ts| now_ms.saturating_sub(ts).max(0) as u64);
            let state = if heartbeat_age_ms.is_none_or(|a| a > t.silent_after_ms) {
                State::Silent
            } else if view
                .oldest_unsent_age_ms
                .is_some_and(|a| a > t.behind_after_ms)
            {
                State::Behind
            } else {
                State::Ok
            };
            Row {
                state,
                heartbeat_age_ms,
                view,
            }
        })
        .collect();
    rows.sort_by(|a, b| {
        (a.state, b.view.gap_records, &a.view.store).cmp(&(
            b.state,
            a.view.gap_records,
            &b.view.store,
        ))
    });
    let mut versions = BTreeMap::new();
    for r in &rows {
        let v = r.view.agent_version.clone().unwrap_or_else(|| "?".into());
        *versions.entry(v).or_insert(0) += 1;
    }
    Report {
        generated_ms: now_ms,
        stores: rows.len(),
        silent: rows.iter().filter(|r| r.state == State::Silent).count(),
        behind: rows.iter().filter(|r| r.state == State::Behind).count(),
        with_gaps: rows.iter().filter(|r| r.view.gaps > 0).count(),
        gap_records: rows.iter().map(|r| r.view.gap_records).sum(),
        versions,
        rows,
    }
}

fn age(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 1000 => format!("{ms}ms"),
        Some(ms) => humantime::format_duration(std::time::Duration::from_secs(ms / 1000))
            .to_string()
            .split(' ')
            .take(2)
            .collect::<Vec<_>>()
            .join(" "),
    }
}

/// The human table: worst stores first, one line each, then the summary.
pub fn render_text(r: &Report) -> String {
    let mut out = String::new();
    let w = r
        .rows
        .iter()
        .map(|x| x.view.store.len())
        .max()
        .unwrap_or(5)
        .max(5);
    let _ = writeln!(
        out,
        "{:<w$}  {:<6}  {:>10}  {:>8}  {:>13}  {:>14}  {:<8}  NOTES",
        "STORE", "STATE", "HEARTBEAT", "BACKLOG", "OLDEST UNSENT", "GAPS (RECORDS)", "VERSION"
    );
    for x in &r.rows {
        let v = &x.view;
        let mut notes: Vec<String> = v
            .gap_reasons
            .iter()
            .map(|(reason, n)| format!("lost {n}: {reason}"))
            .collect();
        if v.disk_full == Some(true) {
            notes.push("disk full".into());
        }
        notes.extend(v.components_not_up.iter().cloned());
        let _ = writeln!(
            out,
            "{:<w$}  {:<6}  {:>10}  {:>8}  {:>13}  {:>14}  {:<8}  {}",
            v.store,
            x.state.as_str(),
            x.heartbeat_age_ms
                .map_or("never".into(), |a| format!("{} ago", age(Some(a)))),
            v.backlog_records.map_or("-".into(), |b| b.to_string()),
            age(v.oldest_unsent_age_ms),
            format!("{} ({})", v.gaps, v.gap_records),
            v.agent_version.as_deref().unwrap_or("?"),
            notes.join("; ")
        );
    }
    let versions: Vec<String> = r
        .versions
        .iter()
        .map(|(v, n)| format!("{v} x{n}"))
        .collect();
    let _ = writeln!(
        out,
        "{} stores: {} silent, {} behind, {} with gaps ({} records lost); versions: {}",
        r.stores,
        r.silent,
        r.behind,
        r.with_gaps,
        r.gap_records,
        versions.join(", ")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(store: &str, hb: Option<i64>, oldest: Option<u64>, gaps: u64) -> StoreView {
        StoreView {
            store: store.into(),
            last_heartbeat_ms: hb,
            agent_version: Some("0.1.0".into()),
            oldest_unsent_age_ms: oldest,
            gaps,
            gap_records: gaps * 10,
            ..StoreView::default()
        }
    }

    #[test]
    fn silent_and_behind_stores_come_first_and_are_counted() {
        let t = Thresholds {
            silent_after_ms: 120_000,
            behind_after_ms: 300_000,
        };
        let now = 10_000_000;
        let r = classify(
            vec![
                view("a-ok", Some(now - 5_000), Some(200), 0),
                view("b-behind", Some(now - 5_000), Some(600_000), 0),
                view("c-silent", Some(now - 600_000), None, 0),
                view("d-never", None, None, 0),
                view("e-gaps", Some(now - 1_000), None, 2),
            ],
            t,
            now,
        );
        let order: Vec<&str> = r.rows.iter().map(|x| x.view.store.as_str()).collect();
        assert_eq!(order, ["c-silent", "d-never", "b-behind", "e-gaps", "a-ok"]);
        assert_eq!(
            (r.silent, r.behind, r.with_gaps, r.gap_records),
            (2, 1, 1, 20)
        );
        assert_eq!(r.versions.get("0.1.0"), Some(&5));
        let text = render_text(&r);
        assert!(text.contains("5 stores: 2 silent, 1 behind, 1 with gaps (20 records lost)"));
        assert!(text.lines().nth(1).unwrap().starts_with("c-silent"));
    }
}
