//! `[[drivers]] type = "presence"`: the [presence engine](super::presence) as a component. It
//! reads `beacon.sighting/1` records from a durable cursor and commits the `presence.event/1`
//! records they cause in the same transaction as the cursor move, so a crash neither loses nor
//! repeats an event for the sightings before it. Exits by timeout and dwell updates are written
//! once a second. The engine's state (the tags' smoothed signals and zones) is in memory: after
//! a restart a tag that is still there enters its zone again.

use super::presence::{Engine, PresenceConfig, PresenceEvent, Sighting};
use crate::deadletters::dead_letter;
use crate::{Driver, DriverError};
use edge_core::component::{ComponentContext, ComponentError, Task};
use edge_core::config::{Problems, join};
use edge_core::cursor::{CursorReader, Start};
use edge_core::log::{AppendRequest, ReadLimits};
use edge_core::{Event, Record, State};
use serde_json::{Value, json};
use std::time::Duration;

impl Driver for PresenceConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        for (field, message) in self.problems() {
            problems.push(join(path, &field), message);
        }
        for (field, stream) in [("input", &self.input), ("output", &self.output)] {
            if let Err(e) = edge_core::config::check_stream_name(stream) {
                problems.push(join(path, field), e);
            }
        }
        if self.input == self.output {
            problems.push(join(path, "output"), "must differ from input");
        }
    }

    fn build(&self, ctx: ComponentContext) -> Result<Task, DriverError> {
        let cfg = self.clone();
        Ok(Box::pin(async move { run(cfg, ctx).await }))
    }
}

/// A `beacon.sighting/1` payload as [`Sighting`]s: `beacon` (or `tag`), `tx_power` (optional),
/// `ts` (else the record's event time), and either a `receivers` array (the `beacons` driver's
/// aggregated form: one `{receiver, rssi}` per receiver that heard the beacon in the window) or
/// one `receiver` and `rssi` at the top level.
pub fn sightings(r: &Record) -> Result<Vec<Sighting>, String> {
    let v: Value = serde_json::from_slice(&r.event.payload)
        .map_err(|e| format!("the sighting is not JSON: {e}"))?;
    let text = |v: &Value, k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
    let tag = text(&v, "beacon")
        .or_else(|| text(&v, "tag"))
        .ok_or("the sighting has no `beacon` field")?;
    let ts_ms = v
        .get("ts")
        .and_then(Value::as_i64)
        .unwrap_or(r.event.event_ts_ms);
    let tx_power = v.get("tx_power").and_then(Value::as_f64);
    let one = |h: &Value| -> Result<Sighting, String> {
        let receiver = text(h, "receiver").ok_or("the sighting has no `receiver` field")?;
        let rssi = h
            .get("rssi")
            .and_then(Value::as_f64)
            .filter(|x| (-130.0..=20.0).contains(x))
            .ok_or("the sighting has no `rssi` between -130 and 20 dBm")?;
        // An aggregated window stands for its advertisements (at least one, however many a
        // malformed record claims: beyond 10 000 in one window is not a radio).
        let samples = h
            .get("samples")
            .and_then(Value::as_u64)
            .map_or(1, |n| n.clamp(1, 10_000) as u32);
        Ok(Sighting {
            tag: tag.clone(),
            receiver,
            rssi,
            tx_power,
            ts_ms,
            samples,
        })
    };
    match v.get("receivers") {
        Some(Value::Array(hs)) => hs.iter().map(one).collect(),
        Some(_) => Err("`receivers` is not an array".into()),
        None => one(&v).map(|s| vec![s]),
    }
}

fn event(cfg: &PresenceConfig, store: &str, e: &PresenceEvent) -> Event {
    let mut v = serde_json::to_value(e).unwrap_or_else(|_| json!({}));
    v["schema"] = json!("presence.event/1");
    v["store"] = json!(store);
    v["ts"] = json!(e.ts_ms);
    if let Some(o) = v.as_object_mut() {
        o.remove("ts_ms");
    }
    Event::new(
        cfg.output.as_str(),
        serde_json::to_vec(&v).unwrap_or_default(),
    )
    .with_event_ts(e.ts_ms)
    .with_key(e.tag.clone())
    .with_source(cfg.name.clone())
    .with_schema("presence.event/1")
}

async fn run(cfg: PresenceConfig, ctx: ComponentContext) -> Result<(), ComponentError> {
    let cancel = ctx.shutdown.intake().clone();
    let mut reader = CursorReader::open(
        ctx.log.clone(),
        format!("presence.{}", cfg.name),
        cfg.input.clone(),
        Start::Latest,
    )
    .await
    .map_err(|e| ComponentError::from(format!("opening the sightings cursor: {e}")))?
    // Small batches: each batch's events are committed together, so its last record waits for
    // the whole batch; 256 aggregated records (up to 2,048 receiver samples) keep the sighting
    // -> event latency in milliseconds at a store's full load (docs/BENCHMARKS.md).
    .with_limits(ReadLimits {
        max_records: 256,
        max_bytes: 4 << 20,
    });
    reader
        .remember_start()
        .await
        .map_err(|e| ComponentError::from(format!("remembering the sightings cursor: {e}")))?;
    let mut engine = Engine::new(cfg.clone());
    ctx.status.set(
        State::Up,
        format!(
            "{} zones from {} to {}",
            cfg.zones.len(),
            cfg.input,
            cfg.output
        ),
    );
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut bad = 0u64;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            b = reader.next_batch(&cancel) => {
                let batch = match b {
                    Ok(Some(b)) => b,
                    Ok(None) => break,
                    Err(e) => return Err(ComponentError::from(format!("reading sightings: {e}"))),
                };
                let mut out = Vec::new();
                for r in &batch.records {
                    match sightings(r) {
                        Ok(v) => {
                            for s in &v {
                                out.extend(
                                    engine.observe(s).iter().map(|e| event(&cfg, &ctx.store_id, e)),
                                );
                            }
                        }
                        Err(reason) => {
                            bad += 1;
                            out.push(dead_letter(&ctx, "presence", "bad_sighting", reason, &r.event.payload));
                        }
                    }
                }
                let n = out.len() as u64;
                reader
                    .commit_with(batch.next_seq, out)
                    .await
                    .map_err(|e| ComponentError::from(format!("committing presence events: {e}")))?;
                metrics::counter!("edge_presence_events_total").increment(n);
            }
            _ = tick.tick() => {
                let events: Vec<Event> = engine
                    .tick(edge_core::time::now_ms())
                    .iter()
                    .map(|e| event(&cfg, &ctx.store_id, e))
                    .collect();
                if !events.is_empty() {
                    let n = events.len() as u64;
                    ctx.log
                        .append(AppendRequest::events(events))
                        .await
                        .map_err(|e| ComponentError::from(format!("committing presence events: {e}")))?;
                    metrics::counter!("edge_presence_events_total").increment(n);
                }
                let st = engine.stats();
                ctx.status.field("tags", st.tags);
                ctx.status.field("sightings_total", st.sightings);
                ctx.status.field("events_total", st.events);
                ctx.status.field("tags_forgotten_total", st.tags_forgotten);
                ctx.status.field("bad_sightings_total", bad);
                if !cfg.references.is_empty() {
                    ctx.status.field("calibration", json!(engine.calibration()));
                }
                metrics::gauge!("edge_presence_tags").set(st.tags as f64);
            }
        }
    }
    ctx.status.set(State::Stopped, "stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &str) -> Record {
        Record {
            seq: 1,
            ingest_ts_ms: 5,
            event: Event::new("beacon.sightings", payload.as_bytes().to_vec()).with_event_ts(5),
        }
    }

    #[test]
    fn an_aggregated_record_gives_one_sighting_per_receiver_with_its_sample_count() {
        let r = record(
            r#"{"beacon":"ibeacon:x:1:7","ts":1000,"tx_power":-59,"receivers":[
                {"receiver":"aisle-1","rssi":-63,"rssi_max":-61,"samples":10},
                {"receiver":"aisle-2","rssi":-83,"samples":0},
                {"receiver":"aisle-3","rssi":-70,"samples":99999999999}]}"#,
        );
        let s = sightings(&r).unwrap();
        let got: Vec<(&str, f64, u32, i64)> = s
            .iter()
            .map(|s| (s.receiver.as_str(), s.rssi, s.samples, s.ts_ms))
            .collect();
        assert_eq!(
            got,
            [
                ("aisle-1", -63.0, 10, 1000),
                ("aisle-2", -83.0, 1, 1000),
                ("aisle-3", -70.0, 10_000, 1000)
            ]
        );
        // One bare reading (an older producer) stands for one advertisement.
        let one = sightings(&record(r#"{"tag":"t","receiver":"rx","rssi":-70}"#)).unwrap();
        assert_eq!((one[0].samples, one[0].ts_ms), (1, 5));
        assert!(sightings(&record(r#"{"beacon":"t","receivers":{}}"#)).is_err());
        assert!(sightings(&record(r#"{"beacon":"t","receivers":[{"receiver":"rx"}]}"#)).is_err());
    }
}
