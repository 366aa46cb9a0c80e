//! HQ's fleet view: for every store, its newest heartbeat, the gaps it reported and its newest
//! checkpoint, read from the side topics (`edge.heartbeats`, `edge.gaps`, `edge.__checkpoints`)
//! with `read_committed`. Used by `edge-agent fleet`; answers "which stores are behind, and did we
//! lose anything?".

use super::checkpoint::{CheckpointError, read_to_end};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::BaseConsumer;
use serde::Serialize;
use serde_json::Value;
use std::collections::BTreeMap;
use std::time::Duration;

/// What to read.
#[derive(Debug, Clone)]
pub struct FleetQuery {
    pub heartbeat_topic: String,
    pub gap_topic: String,
    pub checkpoint_topic: String,
    /// Heartbeats from this time on (ms since the epoch); stores send one every 30 s by default.
    pub heartbeats_since_ms: i64,
    /// Gaps from this time on.
    pub gaps_since_ms: i64,
    /// Longest time reading one topic to its end may take.
    pub timeout: Duration,
}

/// One store as HQ sees it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct StoreView {
    pub store: String,
    /// Time of the newest heartbeat (the store's clock), ms since the epoch.
    pub last_heartbeat_ms: Option<i64>,
    pub agent_version: Option<String>,
    pub mode: Option<String>,
    /// Records not yet at HQ when the heartbeat was sent.
    pub backlog_records: Option<u64>,
    pub oldest_unsent_age_ms: Option<u64>,
    pub time_to_drain_s: Option<f64>,
    pub disk_full: Option<bool>,
    /// Components whose state was not `up`: `name: state (detail)`.
    pub components_not_up: Vec<String>,
    /// Gap records reported since `gaps_since_ms`, and the records they cover, by reason.
    pub gaps: u64,
    pub gap_records: u64,
    pub gap_reasons: BTreeMap<String, u64>,
    pub last_gap_ms: Option<i64>,
    /// The newest checkpoint (exactly_once stores): its time and transaction counter.
    pub checkpoint_ms: Option<i64>,
    pub checkpoint_txn: Option<u64>,
}

fn consumer(client: &ClientConfig) -> Result<BaseConsumer, CheckpointError> {
    let mut cfg = client.clone();
    cfg.set("group.id", "edge-agent.fleet-view")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("allow.auto.create.topics", "false")
        .set("fetch.wait.max.ms", "50");
    cfg.create().map_err(|e| CheckpointError::Kafka {
        topic: "-".into(),
        reason: e.to_string(),
    })
}

fn store_of<'a>(key: Option<&'a [u8]>, v: &'a Value) -> Option<String> {
    v.get("store")
        .and_then(Value::as_str)
        .map(str::to_string)
        .or_else(|| {
            key.and_then(|k| std::str::from_utf8(k).ok())
                .map(str::to_string)
        })
        .filter(|s| !s.is_empty())
}

fn entry(stores: &mut BTreeMap<String, StoreView>, id: String) -> &mut StoreView {
    stores.entry(id.clone()).or_insert_with(|| StoreView {
        store: id,
        ..StoreView::default()
    })
}

/// Reads the three side topics (blocking). Stores are sorted by id.
pub fn fleet_view(
    client: &ClientConfig,
    q: &FleetQuery,
) -> Result<Vec<StoreView>, CheckpointError> {
    let mut stores: BTreeMap<String, StoreView> = BTreeMap::new();
    // Checkpoints: the topic is compacted; the highest txn per store is the newest.
    let c = consumer(client)?;
    let mut checkpoints: Vec<(String, Value)> = Vec::new();
    read_to_end(&c, &q.checkpoint_topic, None, q.timeout, |m| {
        if let Some(v) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<Value>(p).ok())
            && let Some(id) = store_of(m.key(), &v)
        {
            checkpoints.push((id, v));
        }
    })?;
    for (id, v) in checkpoints {
        let txn = v.get("txn").and_then(Value::as_u64);
        let s = entry(&mut stores, id);
        if s.checkpoint_txn.is_none() || txn >= s.checkpoint_txn {
            s.checkpoint_txn = txn;
            s.checkpoint_ms = v.get("ts_ms").and_then(Value::as_i64);
        }
    }
    // Heartbeats: the newest per store.
    let c = consumer(client)?;
    let mut beats: Vec<(String, Value)> = Vec::new();
    read_to_end(
        &c,
        &q.heartbeat_topic,
        Some(q.heartbeats_since_ms),
        q.timeout,
        |m| {
            if let Some(v) = m
                .payload()
                .and_then(|p| serde_json::from_slice::<Value>(p).ok())
                && let Some(id) = store_of(m.key(), &v)
            {
                beats.push((id, v));
            }
        },
    )?;
    for (id, v) in beats {
        let ts = v.get("ts").and_then(Value::as_i64);
        let s = entry(&mut stores, id);
        if s.last_heartbeat_ms.is_some() && ts < s.last_heartbeat_ms {
            continue;
        }
        s.last_heartbeat_ms = ts;
        s.agent_version = v
            .get("agent_version")
            .and_then(Value::as_str)
            .map(str::to_string);
        s.mode = v.get("mode").and_then(Value::as_str).map(str::to_string);
        s.backlog_records = v.get("backlog_records").and_then(Value::as_u64);
        s.oldest_unsent_age_ms = v.get("oldest_unsent_age_ms").and_then(Value::as_u64);
        s.time_to_drain_s = v.get("time_to_drain_s").and_then(Value::as_f64);
        s.disk_full = v.pointer("/disk/full").and_then(Value::as_bool);
        s.components_not_up = v
            .get("components")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(name, c)| {
                        let state = c.get("state").and_then(Value::as_str).unwrap_or("?");
                        (state != "up").then(|| {
                            let detail = c.get("detail").and_then(Value::as_str).unwrap_or("");
                            format!("{name}: {state} ({detail})")
                        })
                    })
                    .collect()
            })
            .unwrap_or_default();
    }
    // Gaps since the given time.
    let c = consumer(client)?;
    let mut gaps: Vec<(String, Value)> = Vec::new();
    read_to_end(&c, &q.gap_topic, Some(q.gaps_since_ms), q.timeout, |m| {
        if let Some(v) = m
            .payload()
            .and_then(|p| serde_json::from_slice::<Value>(p).ok())
            && let Some(id) = store_of(m.key(), &v)
        {
            gaps.push((id, v));
        }
    })?;
    for (id, v) in gaps {
        let count = v.get("count").and_then(Value::as_u64).unwrap_or(1);
        let reason = v
            .get("reason")
            .and_then(Value::as_str)
            .unwrap_or("unknown")
            .to_string();
        let ts = v.get("ts").and_then(Value::as_i64);
        let s = entry(&mut stores, id);
        s.gaps += 1;
        s.gap_records += count;
        *s.gap_reasons.entry(reason).or_insert(0) += count;
        if ts > s.last_gap_ms {
            s.last_gap_ms = ts;
        }
    }
    Ok(stores.into_values().collect())
}
