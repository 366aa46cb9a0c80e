//! `[[drivers]] type = "beacons"`: a beacon source to `beacon.sightings`, with the privacy
//! allow-list applied at ingest and the raw sightings aggregated so that a busy store cannot
//! flood the log.
//!
//! Per `window_ms` (default 1 s) the driver writes **one record per beacon**: for each receiver
//! that heard it the median, the strongest RSSI and the number of samples, plus the strongest
//! receiver at the top level. 500 tags heard by 8 receivers at 10 Hz are 40,000 advertisements
//! a second and 500 records a second. More distinct beacons in a window than `max_beacons` are
//! shed (`over_cap`); a full log sheds the window (`log_full`): `beacon.sightings` is class
//! low, and nothing waits for it. Every drop is counted by reason in status and
//! `edge_beacon_dropped_total`, and no address of any device is stored or logged.

use super::mqtt_source::{MqttSource, MqttSourceConfig};
use super::receivers::valid_id;
use super::replay::{Replay, ReplayConfig};
use super::source::{
    AllowList, Allowed, BeaconId, Drop, Drops, RawSighting, SightingSource, identify,
};
use crate::{Driver, DriverError};
use edge_core::component::{ComponentContext, ComponentError, Task};
use edge_core::config::{Problems, join};
use edge_core::log::{AppendRequest, LogError};
use edge_core::{Event, State};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// RSSI samples kept per (beacon, receiver) and window; more are counted, not stored.
const SAMPLES_KEPT: usize = 64;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BeaconsConfig {
    pub name: String,
    #[serde(default = "default_output")]
    pub output: String,
    pub source: SourceConfig,
    #[serde(default)]
    pub allow: AllowList,
    /// Aggregation window, ms.
    #[serde(default = "default_window")]
    pub window_ms: u64,
    /// Sightings weaker than this (after the receiver's `rssi_offset`) are dropped, dBm.
    #[serde(default = "default_floor")]
    pub rssi_floor: i16,
    /// Distinct beacons per window; more are shed and counted.
    #[serde(default = "default_max_beacons")]
    pub max_beacons: usize,
    /// The receivers: required for remote receivers (a node that is not listed could be anyone
    /// on the store network), optional for a replay.
    #[serde(default)]
    pub receivers: Vec<ReceiverConfig>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    pub id: String,
    /// The zone it stands in (documentation for store IT; zones are the presence engine's).
    #[serde(default)]
    pub zone: Option<String>,
    /// Its position on the floor plan, metres.
    #[serde(default)]
    pub position: Option<[f64; 2]>,
    /// Added to every RSSI it reports (antennas and enclosures differ), dB.
    #[serde(default)]
    pub rssi_offset: i16,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SourceConfig {
    Replay(ReplayConfig),
    Mqtt(MqttSourceConfig),
    /// This computer's adapter through bluetoothd (feature `bluez`).
    Bluez(BluezSourceConfig),
}

/// `kind = "bluez"`: the BlueZ source's config, or in a build without the `bluez` feature a
/// config that parses any keys and reports one problem at `source.kind`.
#[cfg(feature = "bluez")]
pub type BluezSourceConfig = super::bluez::BluezConfig;
#[cfg(not(feature = "bluez"))]
pub type BluezSourceConfig = crate::family::Unavailable<crate::family::Bluez>;

fn default_output() -> String {
    "beacon.sightings".into()
}

fn default_window() -> u64 {
    1_000
}

fn default_floor() -> i16 {
    -100
}

fn default_max_beacons() -> usize {
    2_000
}

impl Driver for BeaconsConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        if let Err(e) = edge_core::config::check_stream_name(&self.output) {
            problems.push(join(path, "output"), e);
        }
        if !(100..=60_000).contains(&self.window_ms) {
            problems.push(join(path, "window_ms"), "must be 100 to 60000");
        }
        if !(-130..=0).contains(&self.rssi_floor) {
            problems.push(join(path, "rssi_floor"), "must be -130 to 0 dBm");
        }
        if self.max_beacons == 0 {
            problems.push(join(path, "max_beacons"), "must be at least 1");
        }
        for (field, message) in self.allow.problems() {
            problems.push(join(&join(path, "allow"), &field), message);
        }
        let (kind, source_problems) = match &self.source {
            SourceConfig::Replay(r) => ("replay", r.problems()),
            SourceConfig::Mqtt(m) => ("mqtt", m.problems()),
            SourceConfig::Bluez(b) => ("bluez", b.problems()),
        };
        for (field, message) in source_problems {
            problems.push(join(&join(path, "source"), &field), message);
        }
        if kind == "mqtt" && self.receivers.is_empty() {
            problems.push(
                join(path, "receivers"),
                "list the remote receivers (id, zone): a node that is not listed could be anyone on the store network",
            );
        }
        #[cfg(feature = "bluez")]
        if let SourceConfig::Bluez(b) = &self.source {
            let id = b.receiver_id(&self.name);
            if !self.receivers.is_empty() && !self.receivers.iter().any(|r| r.id == id) {
                problems.push(
                    join(path, "receivers"),
                    format!("the BlueZ source's receiver {id:?} is not listed, so every sighting would be dropped: list it, or leave receivers out"),
                );
            }
        }
        let mut seen = std::collections::HashSet::new();
        for (i, r) in self.receivers.iter().enumerate() {
            let p = join(path, &format!("receivers[{i}]"));
            if !valid_id(&r.id) {
                problems.push(join(&p, "id"), "must be 1-64 of A-Z a-z 0-9 . _ -");
            } else if !seen.insert(r.id.as_str()) {
                problems.push(join(&p, "id"), format!("{:?} is listed twice", r.id));
            }
            if !(-40..=40).contains(&r.rssi_offset) {
                problems.push(join(&p, "rssi_offset"), "must be -40 to 40 dB");
            }
        }
    }

    fn build(&self, ctx: ComponentContext) -> Result<Task, DriverError> {
        let cfg = self.clone();
        match &self.source {
            SourceConfig::Replay(r) => {
                let src = Replay::start(r, &self.name);
                Ok(Box::pin(async move { pump(cfg, ctx, src).await }))
            }
            SourceConfig::Mqtt(m) => {
                let id = m
                    .client_id
                    .clone()
                    .unwrap_or_else(|| format!("{}-beacons-{}", ctx.store_id, self.name));
                let src = MqttSource::new(m, &id).map_err(|reason| DriverError::Build {
                    name: self.name.clone(),
                    reason,
                })?;
                Ok(Box::pin(async move { pump(cfg, ctx, src).await }))
            }
            #[cfg(feature = "bluez")]
            SourceConfig::Bluez(b) => {
                let src = super::bluez::BluezSource::new(b, &self.name);
                Ok(Box::pin(async move { pump(cfg, ctx, src).await }))
            }
            #[cfg(not(feature = "bluez"))]
            SourceConfig::Bluez(_) => Err(DriverError::Build {
                name: self.name.clone(),
                reason: crate::family::missing::<crate::family::Bluez>("source kind = \"bluez\""),
            }),
        }
    }
}

#[derive(Debug, Default)]
struct PerReceiver {
    samples: Vec<i16>,
    count: u64,
}

#[derive(Debug)]
struct PerBeacon {
    tx_power: Option<i8>,
    first_ts: i64,
    last_ts: i64,
    receivers: Vec<(String, PerReceiver)>,
}

/// The open window of sightings, by beacon.
#[derive(Debug)]
pub struct Aggregator {
    window_ms: i64,
    max_beacons: usize,
    floor: i16,
    allowed: Allowed,
    offsets: HashMap<String, i16>,
    /// Listed receivers only (empty: any).
    listed: bool,
    start: Option<i64>,
    beacons: HashMap<BeaconId, PerBeacon>,
    /// The newest sighting time seen, and when it was seen (the source's clock).
    latest: Option<(i64, Instant)>,
    /// Sightings accepted into windows.
    pub accepted: u64,
}

/// One closed window: the records and the number of sightings in them.
#[derive(Debug, Default)]
pub struct Closed {
    pub events: Vec<Event>,
    pub sightings: u64,
}

fn median(v: &mut [i16]) -> i16 {
    v.sort_unstable();
    match v.len() {
        0 => 0,
        n if n % 2 == 1 => v[n / 2],
        n => ((i32::from(v[n / 2 - 1]) + i32::from(v[n / 2])) / 2) as i16,
    }
}

impl Aggregator {
    pub fn new(cfg: &BeaconsConfig) -> Aggregator {
        Aggregator {
            window_ms: cfg.window_ms.max(1) as i64,
            max_beacons: cfg.max_beacons,
            floor: cfg.rssi_floor,
            allowed: cfg.allow.compile(),
            offsets: cfg
                .receivers
                .iter()
                .map(|r| (r.id.clone(), r.rssi_offset))
                .collect(),
            listed: !cfg.receivers.is_empty(),
            start: None,
            beacons: HashMap::new(),
            latest: None,
            accepted: 0,
        }
    }

    /// Takes one sighting; returns the window it closed, if its time starts a new one.
    pub fn push(&mut self, s: RawSighting, drops: &mut Drops, out: &mut dyn FnMut(Closed)) {
        let offset = match self.offsets.get(&s.receiver) {
            Some(o) => *o,
            None if self.listed => return drops.add(Drop::UnknownReceiver, 1),
            None => 0,
        };
        let rssi = s.rssi.saturating_add(offset);
        if rssi < self.floor {
            return drops.add(Drop::Weak, 1);
        }
        let (id, tx_power) = match identify(&s.heard, &self.allowed) {
            Ok(x) => x,
            Err(d) => return drops.add(d, 1),
        };
        let window = s.ts_ms.div_euclid(self.window_ms) * self.window_ms;
        match self.start {
            Some(start) if window > start => {
                out(self.close());
                self.start = Some(window);
            }
            None => self.start = Some(window),
            // A sighting of an earlier window (receivers' clocks differ) joins the open one.
            Some(_) => {}
        }
        if self.latest.is_none_or(|(t, _)| s.ts_ms >= t) {
            self.latest = Some((s.ts_ms, Instant::now()));
        }
        if !self.beacons.contains_key(&id) && self.beacons.len() >= self.max_beacons {
            return drops.add(Drop::OverCap, 1);
        }
        let b = self.beacons.entry(id).or_insert_with(|| PerBeacon {
            tx_power,
            first_ts: s.ts_ms,
            last_ts: s.ts_ms,
            receivers: Vec::new(),
        });
        b.tx_power = tx_power.or(b.tx_power);
        b.first_ts = b.first_ts.min(s.ts_ms);
        b.last_ts = b.last_ts.max(s.ts_ms);
        let r = match b.receivers.iter().position(|(id, _)| *id == s.receiver) {
            Some(i) => &mut b.receivers[i].1,
            None => {
                b.receivers.push((s.receiver, PerReceiver::default()));
                &mut b.receivers.last_mut().expect("just pushed").1
            }
        };
        r.count += 1;
        if r.samples.len() < SAMPLES_KEPT {
            r.samples.push(rssi);
        }
        self.accepted += 1;
    }

    /// Whether the open window is over by the source's clock (its newest time, advanced by the
    /// time since), with `grace` for late receivers.
    pub fn due(&self, grace: Duration) -> bool {
        match (self.start, self.latest) {
            (Some(start), Some((t, at))) => {
                t + at.elapsed().as_millis() as i64
                    >= start + self.window_ms + grace.as_millis() as i64
            }
            _ => false,
        }
    }

    /// Closes the open window (nothing when it is empty).
    pub fn close(&mut self) -> Closed {
        let start = self.start.take().unwrap_or(0);
        let mut closed = Closed::default();
        let mut beacons: Vec<_> = self.beacons.drain().collect();
        beacons.sort_by(|a, b| a.0.cmp(&b.0));
        for (id, mut b) in beacons {
            let mut receivers: Vec<serde_json::Value> = Vec::with_capacity(b.receivers.len());
            let mut best: Option<(i16, String)> = None;
            b.receivers.sort_by(|x, y| x.0.cmp(&y.0));
            for (rid, r) in &mut b.receivers {
                let max = r.samples.iter().copied().max().unwrap_or(0);
                let med = median(&mut r.samples);
                closed.sightings += r.count;
                if best.as_ref().is_none_or(|(m, _)| med > *m) {
                    best = Some((med, rid.clone()));
                }
                receivers.push(
                    json!({"receiver": rid, "rssi": med, "rssi_max": max, "samples": r.count}),
                );
            }
            let (rssi, receiver) = best.unwrap_or_default();
            let tag = id.tag();
            let mut v = json!({
                "schema": "beacon.sighting/1", "beacon": tag, "receiver": receiver, "rssi": rssi,
                "receivers": receivers, "ts": b.last_ts, "first_ts": b.first_ts,
                "window_start": start, "window_ms": self.window_ms,
            });
            id.fields(&mut v);
            if let Some(p) = b.tx_power {
                v["tx_power"] = p.into();
            }
            closed.events.push(
                Event::new("", serde_json::to_vec(&v).unwrap_or_default())
                    .with_event_ts(b.last_ts)
                    .with_key(tag.clone())
                    .with_event_id(format!("bs:{tag}:{start}"))
                    .with_schema("beacon.sighting/1"),
            );
        }
        closed
    }
}

/// Stamps the closed window's records with the store, stream and driver, and appends them.
/// A full log sheds them (counted); only a closed or broken log is an error.
async fn write(
    cfg: &BeaconsConfig,
    ctx: &ComponentContext,
    closed: Closed,
    drops: &mut Drops,
    shedding: &mut bool,
) -> Result<(), ComponentError> {
    if closed.events.is_empty() {
        return Ok(());
    }
    let n = closed.events.len() as u64;
    let events: Vec<Event> = closed
        .events
        .into_iter()
        .map(|mut e| {
            if let Ok(mut v) = serde_json::from_slice::<serde_json::Value>(&e.payload) {
                v["store"] = json!(&*ctx.store_id);
                e.payload = serde_json::to_vec(&v).unwrap_or_default().into();
            }
            e.stream = cfg.output.as_str().into();
            e.with_source(cfg.name.clone())
        })
        .collect();
    match ctx.log.append(AppendRequest::events(events)).await {
        Ok(_) => {
            if *shedding {
                *shedding = false;
                ctx.status.set(
                    State::Up,
                    "the local log has room again; sightings are written",
                );
            }
            metrics::counter!("edge_beacon_records_total", "driver" => cfg.name.clone())
                .increment(n);
            Ok(())
        }
        Err(LogError::Full) => {
            drops.add(Drop::LogFull, closed.sightings);
            if !*shedding {
                *shedding = true;
                ctx.status.set(
                    State::Degraded,
                    "the local log is full: raw beacon sightings are shed first (counted in dropped.log_full)",
                );
            }
            Ok(())
        }
        Err(LogError::Closed) => Ok(()),
        Err(e) => Err(ComponentError::from(format!(
            "writing beacon sightings: {e}"
        ))),
    }
}

async fn pump<S: SightingSource>(
    cfg: BeaconsConfig,
    ctx: ComponentContext,
    mut src: S,
) -> Result<(), ComponentError> {
    let cancel = ctx.shutdown.intake().clone();
    let mut agg = Aggregator::new(&cfg);
    let mut drops = Drops::default();
    let mut reported = Drops::default();
    let mut shedding = false;
    let grace = Duration::from_millis((cfg.window_ms / 4).clamp(50, 500));
    let mut tick = tokio::time::interval(Duration::from_millis((cfg.window_ms / 4).max(25)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_report = Instant::now();
    ctx.status.set(
        State::Starting,
        format!("waiting for the first sightings to {}", cfg.output),
    );
    let mut ended = false;
    while !ended {
        let mut closed = Vec::new();
        tokio::select! {
            _ = cancel.cancelled() => ended = true,
            batch = src.next(&ctx.status, &mut drops) => match batch {
                Some(v) => {
                    if matches!(ctx.status.state(), Some(State::Starting)) && !v.is_empty() {
                        ctx.status.set(State::Up, format!("writing sightings to {} every {} ms", cfg.output, cfg.window_ms));
                    }
                    for s in v {
                        agg.push(s, &mut drops, &mut |c| closed.push(c));
                    }
                }
                None => ended = true,
            },
            _ = tick.tick() => {
                if agg.due(grace) {
                    closed.push(agg.close());
                }
            }
        }
        if ended {
            closed.push(agg.close());
        }
        for c in closed {
            write(&cfg, &ctx, c, &mut drops, &mut shedding).await?;
        }
        if ended || last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            report(&cfg, &ctx, &agg, &drops, &mut reported);
        }
    }
    if !matches!(ctx.status.state(), Some(State::Stopped | State::Degraded)) {
        ctx.status.set(State::Stopped, "stopped");
    }
    Ok(())
}

fn report(
    cfg: &BeaconsConfig,
    ctx: &ComponentContext,
    agg: &Aggregator,
    drops: &Drops,
    reported: &mut Drops,
) {
    ctx.status.field("sightings_total", agg.accepted);
    let mut by_reason = serde_json::Map::new();
    for d in Drop::ALL {
        let n = drops.get(d);
        by_reason.insert(d.label().into(), n.into());
        let delta = n - reported.get(d);
        if delta > 0 {
            metrics::counter!("edge_beacon_dropped_total", "driver" => cfg.name.clone(), "reason" => d.label())
                .increment(delta);
        }
    }
    ctx.status
        .field("dropped", serde_json::Value::Object(by_reason));
    metrics::gauge!("edge_beacon_sightings_accepted", "driver" => cfg.name.clone())
        .set(agg.accepted as f64);
    *reported = drops.clone();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ble::beacon::{Beacon, IBeacon};
    use crate::ble::source::{Heard, parse_uuid};

    const UUID: &str = "f7826da6-4fa2-4e98-8024-bc5b71e0893e";

    fn cfg() -> BeaconsConfig {
        toml::from_str(&format!(
            "name = \"b\"\nwindow_ms = 1000\nmax_beacons = 2\n[source]\nkind = \"replay\"\npath = \"x.btsnoop\"\n[allow]\nibeacon_uuids = [\"{UUID}\"]\n"
        ))
        .expect("config")
    }

    fn seen(receiver: &str, minor: u16, ts: i64, rssi: i16) -> RawSighting {
        let adv = Beacon::IBeacon(IBeacon {
            uuid: parse_uuid(UUID).unwrap(),
            major: 1,
            minor,
            measured_power: -59,
        })
        .to_advertising_data()
        .unwrap();
        RawSighting {
            receiver: receiver.into(),
            ts_ms: ts,
            rssi,
            heard: Heard::Advertisement(adv),
        }
    }

    fn payloads(c: &Closed) -> Vec<serde_json::Value> {
        c.events
            .iter()
            .map(|e| serde_json::from_slice(&e.payload).unwrap())
            .collect()
    }

    #[test]
    fn a_window_becomes_one_record_per_beacon_with_a_median_per_receiver() {
        let mut agg = Aggregator::new(&cfg());
        let mut drops = Drops::default();
        let mut closed = Vec::new();
        for (i, rssi) in [-70, -60, -65, -90, -64].into_iter().enumerate() {
            agg.push(
                seen("r1", 1, 10_000 + i as i64 * 100, rssi),
                &mut drops,
                &mut |c| closed.push(c),
            );
        }
        for rssi in [-80, -82] {
            agg.push(seen("r2", 1, 10_500, rssi), &mut drops, &mut |c| {
                closed.push(c)
            });
        }
        assert!(closed.is_empty(), "the window is still open");
        // The next window's first sighting closes it.
        agg.push(seen("r1", 1, 11_000, -60), &mut drops, &mut |c| {
            closed.push(c)
        });
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].sightings, 7);
        let v = payloads(&closed[0]);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0]["beacon"], format!("ibeacon:{UUID}:1:1"));
        assert_eq!(
            (v[0]["receiver"].as_str(), v[0]["rssi"].as_i64()),
            (Some("r1"), Some(-65))
        );
        assert_eq!(v[0]["receivers"][0]["rssi_max"], -60);
        assert_eq!(v[0]["receivers"][0]["samples"], 5);
        assert_eq!(v[0]["receivers"][1]["rssi"], -81);
        assert_eq!(v[0]["window_start"], 10_000);
        assert_eq!(v[0]["tx_power"], -59);
        assert_eq!(drops.total(), 0);
    }

    #[test]
    fn a_bluez_source_parses_in_every_build_and_is_a_config_problem_without_the_feature() {
        let c: BeaconsConfig = toml::from_str(&format!(
            "name = \"aisle-1\"\n[source]\nkind = \"bluez\"\nadapter = \"hci0\"\nrssi_floor = -90\n[allow]\nibeacon_uuids = [\"{UUID}\"]\n"
        ))
        .expect("config");
        let mut p = Problems::new();
        c.validate("drivers[0]", &mut p);
        if cfg!(feature = "bluez") {
            assert!(p.is_empty(), "{p}");
        } else {
            let text = p.to_string();
            assert!(
                text.contains("drivers[0].source.kind: this source needs the `bluez` feature")
                    && text.contains("not a default feature: `--features bluez`"),
                "{text}"
            );
        }
    }

    #[test]
    fn weak_unknown_and_over_cap_sightings_are_counted_not_written() {
        let mut c = cfg();
        c.receivers = vec![ReceiverConfig {
            id: "r1".into(),
            zone: None,
            position: None,
            rssi_offset: -5,
        }];
        c.rssi_floor = -90;
        let mut agg = Aggregator::new(&c);
        let mut drops = Drops::default();
        let mut sink = |_c: Closed| {};
        agg.push(seen("r1", 1, 0, -88), &mut drops, &mut sink); // -93 after the offset
        agg.push(seen("r9", 1, 0, -50), &mut drops, &mut sink);
        for minor in 1..=3 {
            agg.push(seen("r1", minor, 0, -50), &mut drops, &mut sink);
        }
        assert_eq!(drops.get(Drop::Weak), 1);
        assert_eq!(drops.get(Drop::UnknownReceiver), 1);
        assert_eq!(drops.get(Drop::OverCap), 1, "max_beacons = 2");
        assert_eq!(payloads(&agg.close()).len(), 2);
    }
}
