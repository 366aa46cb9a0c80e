//! The presence engine: beacon sightings in, `enter` / `exit` / `dwell` / `unknown` per zone out.
//!
//! Pure and synchronous (no I/O, time comes with the sightings), so that replay, the store
//! simulator and the live component run the same code. Per tag:
//!
//! 1. **Smoothing** per (tag, receiver): the RSSI samples of the last `window_ms` are fenced by
//!    their interquartile range (Tukey's 1.5 IQR: a multipath burst of -6 dB on 10 % of samples
//!    falls out) and averaged, and that robust value goes through an EWMA (`ewma_alpha`).
//! 2. **Distance** from the log-distance path-loss model calibrated by the beacon's measured
//!    power at 1 m: `d = 10 ^ ((tx_power - rssi) / (10 n))`, `n` = `path_loss_exponent`.
//! 3. **Zones** from config: each zone lists its receivers and a distance (or RSSI) threshold. A
//!    zone's distance is that of its nearest fresh receiver within the threshold.
//! 4. **Hysteresis with a margin and persistence**: a challenger zone wins at once when it is
//!    `margin` (30 %) closer than the current zone, or when it is `soft_margin` (15 %) closer for
//!    `persistence` (5) consecutive samples; the current zone is left when it has not qualified
//!    for `persistence` samples. A bare "closest wins" is what makes every anchor flap.
//! 5. **Exits by timeout**: nothing ever says "I cannot see it", so a tag no receiver of its zone
//!    heard for `exit_timeout_ms` has left ([`Engine::tick`]).
//! 6. **Events** carry a confidence in [0, 1]: how much nearer the chosen zone is than the next
//!    one, scaled down while few samples back it. A tag heard too weakly for any zone (fewer than
//!    `min_samples`, or no zone within its threshold) gets one explicit `unknown`.
//!
//! Memory is bounded: at most `max_tags` tags (the least recently heard one is forgotten, and
//! counted), each with at most a window of samples per receiver.

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};

/// One advertisement heard by one receiver.
#[derive(Debug, Clone, PartialEq)]
pub struct Sighting {
    pub tag: String,
    pub receiver: String,
    pub rssi: f64,
    /// Calibrated power at 1 m (dBm); `None` uses [`PresenceConfig::default_tx_power`].
    pub tx_power: Option<f64>,
    pub ts_ms: i64,
    /// Advertisements this reading stands for: 1 for one reading, the count of a window
    /// aggregated upstream (`beacon.sightings` records carry it as `samples`). `min_samples`
    /// and the confidence's support count advertisements, so aggregation upstream does not
    /// starve a zone of evidence.
    pub samples: u32,
}

/// A zone: its receivers and how near one of them the tag must be.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneConfig {
    pub name: String,
    /// Receivers that cover the zone (their ids as in the sightings).
    pub receivers: Vec<String>,
    /// Nearest allowed distance estimate, metres (default 4 m).
    #[serde(default = "default_max_distance")]
    pub max_distance_m: f64,
    /// Weakest allowed smoothed RSSI, dBm (none by default).
    #[serde(default)]
    pub min_rssi: Option<f64>,
}

fn default_max_distance() -> f64 {
    4.0
}

/// A receiver's place on the floor plan, metres.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverPosition {
    pub id: String,
    pub position: [f64; 2],
}

/// A beacon fixed at a known place: the self-calibration's ground truth. It never gets events.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceBeacon {
    pub tag: String,
    pub position: [f64; 2],
}

/// One receiver's fitted radio: `rssi = tx_power + offset_db - 10 n log10(d)`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Calibration {
    /// How much hotter (positive) or deafer this receiver reads than the beacons' calibration.
    pub offset_db: f64,
    /// Its path-loss exponent (fitted with two or more reference distances, else the default).
    pub path_loss_exponent: f64,
    /// Reference beacons the fit used.
    pub references: usize,
}

/// `[[drivers]] type = "presence"`: the driver (`presence_driver.rs`) and its engine.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PresenceConfig {
    /// Component name in status and metrics.
    pub name: String,
    /// Stream of `beacon.sighting/1` records read from a durable cursor.
    pub input: String,
    /// Stream the events go to.
    pub output: String,
    pub zones: Vec<ZoneConfig>,
    pub window_ms: u64,
    pub ewma_alpha: f64,
    pub path_loss_exponent: f64,
    pub default_tx_power: f64,
    pub margin: f64,
    pub soft_margin: f64,
    pub persistence: u32,
    pub exit_timeout_ms: u64,
    pub dwell_every_ms: u64,
    pub min_samples: usize,
    pub max_tags: usize,
    /// Receiver positions: events carry a weighted-centroid `position` when the receivers that
    /// hear a tag have one, and the self-calibration needs them.
    pub receivers: Vec<ReceiverPosition>,
    /// Fixed reference beacons: each receiver's RSSI offset and path-loss exponent are refitted
    /// from what it hears of them every `calibrate_every_ms` (aisles change with stock).
    pub references: Vec<ReferenceBeacon>,
    pub calibrate_every_ms: u64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            name: "presence".into(),
            input: "beacon.sightings".into(),
            output: "presence.events".into(),
            zones: Vec::new(),
            window_ms: 3_000,
            ewma_alpha: 0.4,
            path_loss_exponent: 2.2,
            default_tx_power: -59.0,
            margin: 0.30,
            soft_margin: 0.15,
            persistence: 5,
            exit_timeout_ms: 8_000,
            dwell_every_ms: 30_000,
            min_samples: 3,
            max_tags: 10_000,
            receivers: Vec::new(),
            references: Vec::new(),
            calibrate_every_ms: 60_000,
        }
    }
}

impl PresenceConfig {
    /// Problems of this config, each as (field, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut bad = |f: &str, m: &str| p.push((f.to_string(), m.to_string()));
        if self.zones.is_empty() {
            bad("zones", "must list at least one zone");
        }
        let mut names = std::collections::HashSet::new();
        for (i, z) in self.zones.iter().enumerate() {
            if z.name.is_empty() || !names.insert(z.name.as_str()) {
                bad(&format!("zones[{i}].name"), "must be non-empty and unique");
            }
            if z.receivers.is_empty() {
                bad(
                    &format!("zones[{i}].receivers"),
                    "must list at least one receiver",
                );
            }
            if !(z.max_distance_m > 0.0 && z.max_distance_m.is_finite()) {
                bad(
                    &format!("zones[{i}].max_distance_m"),
                    "must be a positive number",
                );
            }
        }
        if !(self.ewma_alpha > 0.0 && self.ewma_alpha <= 1.0) {
            bad("ewma_alpha", "must be in (0, 1]");
        }
        if !(1.0..=6.0).contains(&self.path_loss_exponent) {
            bad("path_loss_exponent", "must be between 1 and 6");
        }
        if !(0.0 < self.soft_margin && self.soft_margin <= self.margin && self.margin < 1.0) {
            bad("margin", "needs 0 < soft_margin <= margin < 1");
        }
        if self.persistence == 0 {
            bad("persistence", "must be at least 1");
        }
        if self.window_ms < 100 || self.exit_timeout_ms < self.window_ms {
            bad(
                "exit_timeout_ms",
                "must be at least window_ms, which must be at least 100",
            );
        }
        if self.max_tags == 0 {
            bad("max_tags", "must be at least 1");
        }
        let finite = |p: &[f64; 2]| p.iter().all(|x| x.is_finite());
        let mut ids = std::collections::HashSet::new();
        for (i, r) in self.receivers.iter().enumerate() {
            if r.id.is_empty() || !ids.insert(r.id.as_str()) {
                bad(
                    &format!("receivers[{i}].id"),
                    "must be non-empty and unique",
                );
            }
            if !finite(&r.position) {
                bad(
                    &format!("receivers[{i}].position"),
                    "must be two numbers (metres)",
                );
            }
        }
        for (i, r) in self.references.iter().enumerate() {
            if r.tag.is_empty() || !finite(&r.position) {
                bad(
                    &format!("references[{i}]"),
                    "needs a tag and a position (metres)",
                );
            }
        }
        if !self.references.is_empty() && self.receivers.is_empty() {
            bad(
                "references",
                "need the receivers' positions (receivers = [{ id, position }])",
            );
        }
        if self.calibrate_every_ms < 1_000 {
            bad("calibrate_every_ms", "must be at least 1000");
        }
        p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Enter,
    Exit,
    Dwell,
    Unknown,
}

/// One `presence.event/1`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PresenceEvent {
    pub kind: EventKind,
    pub tag: String,
    /// `None` for `unknown`.
    pub zone: Option<String>,
    pub ts_ms: i64,
    /// Time in the zone (exit and dwell).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dwell_ms: Option<i64>,
    pub confidence: f64,
    /// Why a tag left (`timeout` or `moved`), or why it is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
    /// Weighted centroid (weights 1/d) of the receivers with a position that hear the tag, metres
    /// (enter and dwell).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<[f64; 2]>,
}

#[derive(Debug, Default)]
struct Track {
    /// (ts, rssi, advertisements behind it) of the last window.
    samples: VecDeque<(i64, f64, u32)>,
    /// Sum of the advertisements in `samples`.
    support: usize,
    smoothed: Option<f64>,
    tx_power: f64,
    last_ms: i64,
}

#[derive(Debug, Default)]
struct TagState {
    tracks: HashMap<String, Track>,
    zone: Option<(usize, i64)>,
    last_dwell_ms: i64,
    last_ms: i64,
    /// Consecutive samples a soft challenger led: (zone, count).
    challenger: Option<(usize, u32)>,
    /// Consecutive samples the current zone did not qualify.
    lost: u32,
    unknown_sent: bool,
    first_ms: Option<i64>,
}

/// Counters for status and metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EngineStats {
    pub sightings: u64,
    pub events: u64,
    pub tags: usize,
    pub tags_forgotten: u64,
}

/// The engine. See the module docs.
#[derive(Debug)]
pub struct Engine {
    cfg: PresenceConfig,
    receiver_zones: HashMap<String, Vec<usize>>,
    tags: HashMap<String, TagState>,
    stats: EngineStats,
    positions: HashMap<String, [f64; 2]>,
    references: HashMap<String, [f64; 2]>,
    calibration: HashMap<String, Calibration>,
    last_calibration_ms: Option<i64>,
}

impl Engine {
    pub fn new(cfg: PresenceConfig) -> Engine {
        let mut receiver_zones: HashMap<String, Vec<usize>> = HashMap::new();
        for (i, z) in cfg.zones.iter().enumerate() {
            for r in &z.receivers {
                receiver_zones.entry(r.clone()).or_default().push(i);
            }
        }
        Engine {
            positions: cfg
                .receivers
                .iter()
                .map(|r| (r.id.clone(), r.position))
                .collect(),
            references: cfg
                .references
                .iter()
                .map(|r| (r.tag.clone(), r.position))
                .collect(),
            cfg,
            receiver_zones,
            tags: HashMap::new(),
            stats: EngineStats::default(),
            calibration: HashMap::new(),
            last_calibration_ms: None,
        }
    }

    pub fn stats(&self) -> EngineStats {
        EngineStats {
            tags: self.tags.len(),
            ..self.stats
        }
    }

    /// The zone a tag is in now.
    pub fn zone_of(&self, tag: &str) -> Option<&str> {
        let (z, _) = self.tags.get(tag)?.zone?;
        Some(self.cfg.zones[z].name.as_str())
    }

    /// The distance estimate of `rssi` heard by `receiver` from a beacon calibrated at
    /// `tx_power`, with the receiver's fitted radio when self-calibration has one.
    pub fn distance(&self, receiver: &str, tx_power: f64, rssi: f64) -> f64 {
        let (offset, n) = match self.calibration.get(receiver) {
            Some(c) => (c.offset_db, c.path_loss_exponent),
            None => (0.0, self.cfg.path_loss_exponent),
        };
        10f64.powf((tx_power + offset - rssi) / (10.0 * n))
    }

    /// The receivers' fitted radios, by receiver id.
    pub fn calibration(&self) -> &HashMap<String, Calibration> {
        &self.calibration
    }

    /// Refits every receiver with a position from the fresh smoothed RSSI of the reference
    /// beacons it hears: least squares of `rssi - tx_power` on `log10(d)` (offset and exponent)
    /// with two or more distinct distances, the offset alone at the default exponent with one.
    /// A receiver that hears no reference keeps its last fit.
    pub fn calibrate(&mut self, now_ms: i64) {
        let fresh = 4 * self.cfg.window_ms as i64;
        let mut pairs: HashMap<&str, Vec<(f64, f64)>> = HashMap::new();
        for (tag, at) in &self.references {
            let Some(t) = self.tags.get(tag) else {
                continue;
            };
            for (rx, track) in &t.tracks {
                let (Some(p), Some(rssi)) = (self.positions.get(rx), track.smoothed) else {
                    continue;
                };
                if now_ms - track.last_ms > fresh || track.support < self.cfg.min_samples {
                    continue;
                }
                let d = ((p[0] - at[0]).powi(2) + (p[1] - at[1]).powi(2))
                    .sqrt()
                    .max(0.3);
                pairs
                    .entry(rx.as_str())
                    .or_default()
                    .push((d.log10(), rssi - track.tx_power));
            }
        }
        for (rx, v) in pairs {
            let k = v.len() as f64;
            let mx = v.iter().map(|p| p.0).sum::<f64>() / k;
            let my = v.iter().map(|p| p.1).sum::<f64>() / k;
            let sxx: f64 = v.iter().map(|p| (p.0 - mx).powi(2)).sum();
            let sxy: f64 = v.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
            let n = if v.len() >= 2 && sxx > 0.01 {
                (-sxy / sxx / 10.0).clamp(1.2, 6.0)
            } else {
                self.cfg.path_loss_exponent
            };
            let offset = (my + 10.0 * n * mx).clamp(-25.0, 25.0);
            self.calibration.insert(
                rx.to_string(),
                Calibration {
                    offset_db: offset,
                    path_loss_exponent: n,
                    references: v.len(),
                },
            );
        }
        self.last_calibration_ms = Some(now_ms);
    }

    /// Weighted centroid (weights 1/d: exact for a tag on the line between two receivers) of the
    /// fresh receivers with a position that hear `tag`.
    fn centroid(&self, tag: &TagState, now_ms: i64) -> Option<[f64; 2]> {
        let fresh = self.cfg.window_ms as i64;
        let (mut w, mut x, mut y) = (0.0, 0.0, 0.0);
        for (rx, t) in &tag.tracks {
            let (Some(p), Some(rssi)) = (self.positions.get(rx), t.smoothed) else {
                continue;
            };
            if now_ms - t.last_ms > fresh {
                continue;
            }
            let d = self.distance(rx, t.tx_power, rssi).max(0.3);
            let wi = 1.0 / d;
            w += wi;
            x += wi * p[0];
            y += wi * p[1];
        }
        (w > 0.0).then(|| {
            [
                (x / w * 100.0).round() / 100.0,
                (y / w * 100.0).round() / 100.0,
            ]
        })
    }

    /// Feeds one sighting; returns the events it causes. Sightings of receivers no zone lists
    /// still count for the tag's liveness but decide nothing.
    pub fn observe(&mut self, s: &Sighting) -> Vec<PresenceEvent> {
        self.stats.sightings += 1;
        if !s.rssi.is_finite() {
            return Vec::new();
        }
        if !self.tags.contains_key(&s.tag) && self.tags.len() >= self.cfg.max_tags {
            self.forget_oldest();
        }
        let window = self.cfg.window_ms as i64;
        let alpha = self.cfg.ewma_alpha;
        let tx = s.tx_power.unwrap_or(self.cfg.default_tx_power);
        let tag = self.tags.entry(s.tag.clone()).or_default();
        tag.last_ms = tag.last_ms.max(s.ts_ms);
        tag.first_ms.get_or_insert(s.ts_ms);
        let t = tag.tracks.entry(s.receiver.clone()).or_default();
        let n = s.samples.max(1);
        t.samples.push_back((s.ts_ms, s.rssi, n));
        t.support += n as usize;
        while t
            .samples
            .front()
            .is_some_and(|(ts, _, _)| *ts < s.ts_ms - window)
        {
            if let Some((_, _, n)) = t.samples.pop_front() {
                t.support -= n as usize;
            }
        }
        t.tx_power = tx;
        t.last_ms = t.last_ms.max(s.ts_ms);
        if let Some(robust) = fenced_mean(&t.samples) {
            t.smoothed = Some(match t.smoothed {
                Some(prev) => prev + alpha * (robust - prev),
                None => robust,
            });
        }
        if !self.receiver_zones.contains_key(&s.receiver) || self.references.contains_key(&s.tag) {
            return Vec::new();
        }
        let out = self.decide(&s.tag, s.ts_ms);
        self.stats.events += out.len() as u64;
        out
    }

    /// Exits by timeout and periodic dwell updates at `now_ms`; call it at least once a second.
    pub fn tick(&mut self, now_ms: i64) -> Vec<PresenceEvent> {
        if !self.references.is_empty()
            && self
                .last_calibration_ms
                .is_none_or(|t| now_ms - t >= self.cfg.calibrate_every_ms as i64)
        {
            self.calibrate(now_ms);
        }
        let timeout = self.cfg.exit_timeout_ms as i64;
        let dwell_every = self.cfg.dwell_every_ms as i64;
        let mut out = Vec::new();
        let dwelling: HashMap<String, Option<[f64; 2]>> = if self.positions.is_empty() {
            HashMap::new()
        } else {
            self.tags
                .iter()
                .filter(|(_, t)| t.zone.is_some())
                .map(|(k, t)| (k.clone(), self.centroid(t, now_ms)))
                .collect()
        };
        let mut gone = Vec::new();
        for (name, tag) in self.tags.iter_mut() {
            if let Some((z, since)) = tag.zone {
                let heard = self.cfg.zones[z]
                    .receivers
                    .iter()
                    .filter_map(|r| tag.tracks.get(r))
                    .map(|t| t.last_ms)
                    .max()
                    .unwrap_or(i64::MIN);
                if now_ms - heard >= timeout {
                    // The exit happened when the tag was last heard there, not when we noticed.
                    let at = heard.max(since);
                    out.push(PresenceEvent {
                        kind: EventKind::Exit,
                        tag: name.clone(),
                        zone: Some(self.cfg.zones[z].name.clone()),
                        ts_ms: at,
                        dwell_ms: Some(at - since),
                        confidence: 1.0,
                        reason: Some("timeout"),
                        position: None,
                    });
                    tag.zone = None;
                    tag.challenger = None;
                    tag.lost = 0;
                    tag.unknown_sent = false;
                } else if dwell_every > 0 && now_ms - tag.last_dwell_ms >= dwell_every {
                    tag.last_dwell_ms = now_ms;
                    out.push(PresenceEvent {
                        kind: EventKind::Dwell,
                        tag: name.clone(),
                        zone: Some(self.cfg.zones[z].name.clone()),
                        ts_ms: now_ms,
                        dwell_ms: Some(now_ms - since),
                        confidence: 1.0,
                        reason: None,
                        position: dwelling.get(name).copied().flatten(),
                    });
                }
            }
            if tag.zone.is_none() && now_ms - tag.last_ms >= timeout * 4 {
                gone.push(name.clone());
            }
        }
        for g in gone {
            self.tags.remove(&g);
        }
        self.stats.events += out.len() as u64;
        out
    }

    fn forget_oldest(&mut self) {
        if let Some(oldest) = self
            .tags
            .iter()
            .min_by_key(|(_, t)| t.last_ms)
            .map(|(k, _)| k.clone())
        {
            self.tags.remove(&oldest);
            self.stats.tags_forgotten += 1;
        }
    }

    /// Distance of each zone that qualifies now: (zone, metres, samples behind it).
    fn zone_distances(&self, tag: &TagState, now_ms: i64) -> Vec<(usize, f64, usize)> {
        let fresh = self.cfg.window_ms as i64;
        let mut best: Vec<(usize, f64, usize)> = Vec::new();
        for (i, z) in self.cfg.zones.iter().enumerate() {
            let mut zone_best: Option<(f64, usize)> = None;
            for r in &z.receivers {
                let Some(t) = tag.tracks.get(r) else { continue };
                let Some(rssi) = t.smoothed else { continue };
                if now_ms - t.last_ms > fresh || t.support < self.cfg.min_samples {
                    continue;
                }
                if z.min_rssi.is_some_and(|m| rssi < m) {
                    continue;
                }
                let d = self.distance(r, t.tx_power, rssi);
                if d > z.max_distance_m {
                    continue;
                }
                if zone_best.is_none_or(|(b, _)| d < b) {
                    zone_best = Some((d, t.support));
                }
            }
            if let Some((d, n)) = zone_best {
                best.push((i, d, n));
            }
        }
        best.sort_by(|a, b| a.1.total_cmp(&b.1));
        best
    }

    fn decide(&mut self, name: &str, now_ms: i64) -> Vec<PresenceEvent> {
        let Some(tag) = self.tags.get(name) else {
            return Vec::new();
        };
        let ranked = self.zone_distances(tag, now_ms);
        let position = if self.positions.is_empty() {
            None
        } else {
            self.centroid(tag, now_ms)
        };
        let min_samples = self.cfg.min_samples.max(1) as f64;
        let confidence = |ranked: &[(usize, f64, usize)], i: usize| -> f64 {
            let (_, d, n) = ranked[i];
            let next = ranked
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, r)| r.1)
                .fold(f64::INFINITY, f64::min);
            let sep = if next.is_finite() {
                ((next - d) / next).clamp(0.0, 1.0)
            } else {
                1.0
            };
            let support = (n as f64 / (2.0 * min_samples)).min(1.0);
            ((0.5 + 0.5 * sep) * support * 100.0).round() / 100.0
        };
        let (margin, soft, persistence) =
            (self.cfg.margin, self.cfg.soft_margin, self.cfg.persistence);
        let window = self.cfg.window_ms as i64;
        let zones = &self.cfg.zones;
        let Some(tag) = self.tags.get_mut(name) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let enter = |tag: &mut TagState, out: &mut Vec<PresenceEvent>, i: usize, conf: f64| {
            tag.zone = Some((i, now_ms));
            tag.last_dwell_ms = now_ms;
            tag.challenger = None;
            tag.lost = 0;
            tag.unknown_sent = false;
            out.push(PresenceEvent {
                kind: EventKind::Enter,
                tag: name.to_string(),
                zone: Some(zones[i].name.clone()),
                ts_ms: now_ms,
                dwell_ms: None,
                confidence: conf,
                reason: None,
                position,
            });
        };
        let exit = |tag: &mut TagState, out: &mut Vec<PresenceEvent>, reason: &'static str| {
            if let Some((z, since)) = tag.zone.take() {
                out.push(PresenceEvent {
                    kind: EventKind::Exit,
                    tag: name.to_string(),
                    zone: Some(zones[z].name.clone()),
                    ts_ms: now_ms,
                    dwell_ms: Some(now_ms - since),
                    confidence: 1.0,
                    reason: Some(reason),
                    position: None,
                });
            }
        };
        match tag.zone {
            None => match ranked.first() {
                Some(&(i, _, _)) => {
                    let conf = confidence(&ranked, 0);
                    enter(tag, &mut out, i, conf);
                }
                None => {
                    // Unknown only once a window of evidence has not sufficed.
                    let heard_for = now_ms - tag.first_ms.unwrap_or(now_ms);
                    if !tag.unknown_sent && heard_for >= window {
                        tag.unknown_sent = true;
                        out.push(PresenceEvent {
                            kind: EventKind::Unknown,
                            tag: name.to_string(),
                            zone: None,
                            ts_ms: now_ms,
                            dwell_ms: None,
                            confidence: 0.0,
                            reason: Some("too few samples near any zone's receivers"),
                            position: None,
                        });
                    }
                }
            },
            Some((cur, _)) => {
                let cur_d = ranked.iter().find(|r| r.0 == cur).map(|r| r.1);
                let Some(cur_d) = cur_d else {
                    // The current zone does not qualify: leave it after `persistence` samples.
                    tag.lost += 1;
                    if tag.lost >= persistence {
                        exit(tag, &mut out, "moved");
                        if let Some(&(i, _, _)) = ranked.first() {
                            let conf = confidence(&ranked, 0);
                            enter(tag, &mut out, i, conf);
                        }
                    }
                    return out;
                };
                tag.lost = 0;
                let Some(&(best, best_d, _)) = ranked.first() else {
                    return out;
                };
                if best == cur {
                    tag.challenger = None;
                    return out;
                }
                if best_d <= (1.0 - margin) * cur_d {
                    exit(tag, &mut out, "moved");
                    let conf = confidence(&ranked, 0);
                    enter(tag, &mut out, best, conf);
                } else if best_d <= (1.0 - soft) * cur_d {
                    let n = match tag.challenger {
                        Some((z, n)) if z == best => n + 1,
                        _ => 1,
                    };
                    tag.challenger = Some((best, n));
                    if n >= persistence {
                        exit(tag, &mut out, "moved");
                        let conf = confidence(&ranked, 0);
                        enter(tag, &mut out, best, conf);
                    }
                } else {
                    tag.challenger = None;
                }
            }
        }
        out
    }
}

/// Mean of the samples inside Tukey's fences (1.5 IQR); the plain mean below 4 samples.
fn fenced_mean(samples: &VecDeque<(i64, f64, u32)>) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut v: Vec<f64> = samples.iter().map(|(_, r, _)| *r).collect();
    if v.len() < 4 {
        return Some(v.iter().sum::<f64>() / v.len() as f64);
    }
    v.sort_by(f64::total_cmp);
    let q = |p: f64| {
        let x = p * (v.len() - 1) as f64;
        let (lo, hi) = (x.floor() as usize, x.ceil() as usize);
        v[lo] + (v[hi] - v[lo]) * (x - lo as f64)
    };
    let (q1, q3) = (q(0.25), q(0.75));
    let iqr = q3 - q1;
    let (lo, hi) = (q1 - 1.5 * iqr, q3 + 1.5 * iqr);
    let kept: Vec<f64> = v.iter().copied().filter(|x| *x >= lo && *x <= hi).collect();
    if kept.is_empty() {
        return Some(v[v.len() / 2]);
    }
    Some(kept.iter().sum::<f64>() / kept.len() as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PresenceConfig {
        PresenceConfig {
            zones: vec![
                ZoneConfig {
                    name: "aisle-1".into(),
                    receivers: vec!["rx-1".into()],
                    max_distance_m: 6.0,
                    min_rssi: None,
                },
                ZoneConfig {
                    name: "aisle-2".into(),
                    receivers: vec!["rx-2".into()],
                    max_distance_m: 6.0,
                    min_rssi: None,
                },
            ],
            ..PresenceConfig::default()
        }
    }

    fn s(rx: &str, rssi: f64, ts: i64) -> Sighting {
        Sighting {
            tag: "tag-1".into(),
            receiver: rx.into(),
            rssi,
            tx_power: Some(-59.0),
            ts_ms: ts,
            samples: 1,
        }
    }

    /// RSSI of a tag `d` metres from a receiver under the model the engine inverts.
    fn rssi_at(d: f64) -> f64 {
        -59.0 - 10.0 * 2.2 * d.log10()
    }

    #[test]
    fn the_fence_drops_a_multipath_burst() {
        let mut v: VecDeque<(i64, f64, u32)> =
            (0..18).map(|i| (i, -70.0 + (i % 3) as f64, 1)).collect();
        v.push_back((18, -90.0, 1));
        v.push_back((19, -95.0, 1));
        let m = fenced_mean(&v).unwrap();
        assert!((m - -69.0).abs() < 0.2, "{m}");
    }

    #[test]
    fn an_aggregated_window_counts_its_advertisements_toward_min_samples() {
        // One reading a second, as a 500 ms aggregation window of a 1 Hz ESPresense node gives:
        // one advertisement each is not enough evidence within a 3 s window at min_samples 3
        // when the readings drift 1.6 s apart...
        let mut e = Engine::new(cfg());
        let mut events = Vec::new();
        for i in 0..4 {
            events.extend(e.observe(&s("rx-1", rssi_at(1.5), i * 1_600)));
        }
        assert_eq!(
            events.iter().map(|e| e.kind).collect::<Vec<_>>(),
            [EventKind::Unknown],
            "{events:?}"
        );
        // ...while the same readings standing for 10 advertisements each enter at once.
        let mut e = Engine::new(cfg());
        let ev = e.observe(&Sighting {
            samples: 10,
            ..s("rx-1", rssi_at(1.5), 0)
        });
        assert_eq!(ev.len(), 1, "{ev:?}");
        assert_eq!(ev[0].kind, EventKind::Enter);
        assert_eq!(ev[0].zone.as_deref(), Some("aisle-1"));
        assert!(ev[0].confidence >= 0.99, "{ev:?}");
    }

    #[test]
    fn distance_inverts_the_log_distance_model() {
        let e = Engine::new(cfg());
        for d in [1.0, 2.5, 7.0] {
            assert!((e.distance("rx-1", -59.0, rssi_at(d)) - d).abs() < 1e-9);
        }
    }

    #[test]
    fn a_walk_from_one_zone_to_the_next_is_one_enter_one_exit_one_enter() {
        let mut e = Engine::new(cfg());
        let mut events = Vec::new();
        // 10 Hz for 20 s: 2 m from rx-1 (5 m from rx-2), then 2 m from rx-2.
        for i in 0..200 {
            let ts = i * 100;
            let (d1, d2) = if i < 100 { (2.0, 5.0) } else { (5.0, 2.0) };
            events.extend(e.observe(&s("rx-1", rssi_at(d1), ts)));
            events.extend(e.observe(&s("rx-2", rssi_at(d2), ts + 50)));
            events.extend(e.tick(ts + 60));
        }
        let kinds: Vec<(EventKind, Option<String>)> =
            events.iter().map(|e| (e.kind, e.zone.clone())).collect();
        assert_eq!(
            kinds,
            vec![
                (EventKind::Enter, Some("aisle-1".into())),
                (EventKind::Exit, Some("aisle-1".into())),
                (EventKind::Enter, Some("aisle-2".into())),
            ],
            "{events:?}"
        );
        let exit = &events[1];
        assert_eq!(exit.reason, Some("moved"));
        assert!(exit.dwell_ms.unwrap() > 9_000, "{exit:?}");
        // The smoothing window and the EWMA delay the switch by about 2 s (measured by the
        // simulator benchmark, not here).
        assert!(exit.ts_ms >= 10_000 && exit.ts_ms < 14_000, "{exit:?}");
        assert!(events[0].confidence >= 0.5);
    }

    #[test]
    fn a_still_tag_between_two_receivers_does_not_flap() {
        let mut e = Engine::new(cfg());
        let mut rng = fastrand::Rng::with_seed(7);
        let mut enters = 0;
        // 10 minutes at 10 Hz, nearly midway (3.0 m and 3.3 m), shadowing sigma 2.5 dB and a
        // -6 dB multipath burst on 10 % of the samples.
        let noise = |rng: &mut fastrand::Rng| {
            let g: f64 = (0..12).map(|_| rng.f64()).sum::<f64>() - 6.0;
            2.5 * g - if rng.f64() < 0.1 { 6.0 } else { 0.0 }
        };
        for i in 0..6_000 {
            let ts = i * 100;
            for ev in e
                .observe(&s("rx-1", rssi_at(3.0) + noise(&mut rng), ts))
                .into_iter()
                .chain(e.observe(&s("rx-2", rssi_at(3.3) + noise(&mut rng), ts + 50)))
                .chain(e.tick(ts + 60))
            {
                if ev.kind == EventKind::Enter {
                    enters += 1;
                }
                assert_ne!(ev.kind, EventKind::Exit, "a flap at {ts} ms: {ev:?}");
            }
        }
        assert_eq!(enters, 1, "one enter, then it stays");
    }

    #[test]
    fn a_tag_no_receiver_hears_exits_after_the_timeout_with_its_dwell() {
        let mut e = Engine::new(cfg());
        for i in 0..50 {
            e.observe(&s("rx-1", rssi_at(1.5), i * 100));
        }
        assert_eq!(e.zone_of("tag-1"), Some("aisle-1"));
        let last = 49 * 100;
        assert!(
            e.tick(last + 7_000)
                .iter()
                .all(|x| x.kind != EventKind::Exit)
        );
        let out = e.tick(last + 8_000);
        let exit = out
            .iter()
            .find(|x| x.kind == EventKind::Exit)
            .expect("an exit");
        assert_eq!(exit.reason, Some("timeout"));
        assert_eq!(exit.ts_ms, last, "the exit is when it was last heard");
        assert!(exit.dwell_ms.unwrap() >= 4_000);
        assert_eq!(e.zone_of("tag-1"), None);
    }

    #[test]
    fn weak_evidence_is_an_explicit_unknown_once() {
        let mut e = Engine::new(cfg());
        let mut out = Vec::new();
        for i in 0..100 {
            // 20 m away: outside every zone's threshold, for 10 s.
            out.extend(e.observe(&s("rx-1", rssi_at(20.0), i * 100)));
        }
        assert_eq!(out.len(), 1, "{out:?}");
        assert_eq!(out[0].kind, EventKind::Unknown);
        assert_eq!(out[0].zone, None);
    }

    #[test]
    fn dwell_updates_come_while_the_tag_stays() {
        let mut e = Engine::new(PresenceConfig {
            dwell_every_ms: 5_000,
            ..cfg()
        });
        let mut dwell = Vec::new();
        for i in 0..200 {
            e.observe(&s("rx-1", rssi_at(1.0), i * 100));
            dwell.extend(
                e.tick(i * 100 + 10)
                    .into_iter()
                    .filter(|x| x.kind == EventKind::Dwell),
            );
        }
        assert_eq!(dwell.len(), 3, "{dwell:?}");
        assert!(dwell[2].dwell_ms.unwrap() >= 15_000);
    }

    #[test]
    fn memory_is_bounded_by_max_tags() {
        let mut e = Engine::new(PresenceConfig {
            max_tags: 100,
            ..cfg()
        });
        for i in 0..1_000 {
            e.observe(&Sighting {
                tag: format!("tag-{i}"),
                ..s("rx-1", rssi_at(1.0), i)
            });
        }
        let st = e.stats();
        assert_eq!(st.tags, 100);
        assert_eq!(st.tags_forgotten, 900);
    }

    #[test]
    fn configs_are_checked() {
        assert!(cfg().problems().is_empty());
        let bad = PresenceConfig {
            margin: 0.1,
            soft_margin: 0.2,
            ..PresenceConfig::default()
        };
        let p = bad.problems();
        assert!(p.iter().any(|(f, _)| f == "zones"));
        assert!(p.iter().any(|(f, _)| f == "margin"));
    }

    /// Self-calibration: three reference beacons at known places fit each receiver's offset and
    /// exponent (a hot receiver +8 dB with n = 2.8, a deaf one -3 dB with n = 2.0); a tag 2 m
    /// from the hot receiver is then placed at 2 m instead of the 1.05 m the defaults give, and
    /// events carry the weighted centroid.
    #[test]
    fn reference_beacons_fit_each_receivers_radio_and_events_carry_a_position() {
        let radio = |rx: usize, d: f64| {
            let (off, n) = if rx == 0 { (8.0, 2.8) } else { (-3.0, 2.0) };
            -59.0 + off - 10.0 * n * d.log10()
        };
        let mut c = cfg();
        c.zones[0].receivers = vec!["rx-0".into()];
        c.zones[1].receivers = vec!["rx-1".into()];
        c.receivers = vec![
            ReceiverPosition {
                id: "rx-0".into(),
                position: [0.0, 0.0],
            },
            ReceiverPosition {
                id: "rx-1".into(),
                position: [10.0, 0.0],
            },
        ];
        c.references = [("ref-a", 1.0), ("ref-b", 4.0), ("ref-c", 8.0)]
            .iter()
            .map(|(t, x)| ReferenceBeacon {
                tag: t.to_string(),
                position: [*x, 0.0],
            })
            .collect();
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let mut e = Engine::new(c);
        let uncalibrated = e.distance("rx-0", -59.0, radio(0, 2.0));
        assert!((uncalibrated - 2.0).abs() > 0.9, "{uncalibrated}");
        let mut events = Vec::new();
        for i in 0..40 {
            let ts = 1_000 + i * 100;
            for (t, x) in [("ref-a", 1.0), ("ref-b", 4.0), ("ref-c", 8.0)] {
                for rx in 0..2 {
                    let d = if rx == 0 { x } else { 10.0 - x };
                    events.extend(e.observe(&Sighting {
                        tag: t.into(),
                        receiver: format!("rx-{rx}"),
                        rssi: radio(rx, d),
                        tx_power: Some(-59.0),
                        ts_ms: ts,
                        samples: 1,
                    }));
                }
            }
        }
        assert!(
            events.is_empty(),
            "reference beacons get no events: {events:?}"
        );
        events.extend(e.tick(5_000));
        let hot = e.calibration()["rx-0"];
        let deaf = e.calibration()["rx-1"];
        assert_eq!(hot.references, 3);
        assert!(
            (hot.offset_db - 8.0).abs() < 0.3 && (hot.path_loss_exponent - 2.8).abs() < 0.05,
            "{hot:?}"
        );
        assert!(
            (deaf.offset_db + 3.0).abs() < 0.3 && (deaf.path_loss_exponent - 2.0).abs() < 0.05,
            "{deaf:?}"
        );
        let calibrated = e.distance("rx-0", -59.0, radio(0, 2.0));
        assert!((calibrated - 2.0).abs() < 0.1, "{calibrated}");
        // A tag 2 m from rx-0 (8 m from rx-1): it enters aisle-1 with a position near x = 2.
        for i in 0..10 {
            let ts = 5_000 + i * 100;
            for rx in 0..2 {
                let d = if rx == 0 { 2.0 } else { 8.0 };
                events.extend(e.observe(&Sighting {
                    tag: "trolley".into(),
                    receiver: format!("rx-{rx}"),
                    rssi: radio(rx, d),
                    tx_power: Some(-59.0),
                    ts_ms: ts,
                    samples: 1,
                }));
            }
        }
        let enter = events
            .iter()
            .find(|e| e.kind == EventKind::Enter)
            .expect("an enter");
        assert_eq!(enter.zone.as_deref(), Some("aisle-1"));
        let [x, y] = enter.position.expect("a position");
        assert!((x - 2.0).abs() < 0.2 && y.abs() < 1e-9, "{x} {y}");
    }
}
