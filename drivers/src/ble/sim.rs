//! A seeded store simulator for the presence engine: a row of zones (aisles) with one receiver
//! each, tags walking scripted paths, and a radio model, scored against the ground truth.
//!
//! **Radio model.** Log-distance path loss from the tag's measured power at 1 m
//! (`rssi = tx_power - 10 n log10(d)`, `d` including the receiver's mounting height), shadowing
//! noise (Gaussian, `sigma_db` 2.5), multipath bursts (`burst_fraction` 10 % of samples at
//! `burst_db` -6 dB), packet loss (`loss`), and `wall_db` per wall between the tag's zone and the
//! receiver's (0 for open aisles).
//!
//! **Scores.** Sampled every 100 ms while the tag is in a zone:
//! * *mis-identification*: of the samples where the engine names a zone, the share where it names
//!   the wrong one (the time before its first decision and while it says nothing is latency, not
//!   error);
//! * *enter latency*: from the tag entering a zone to the engine's `enter` of that zone;
//! * *exit latency*: from the tag leaving a zone (for another zone, or out of every receiver's
//!   range and silent) to the engine's `exit` of it;
//! * *flaps*: `exit` events of a tag that never moves.
//!
//! `cargo run --release -p edge-drivers --example presence_accuracy` prints the full report and
//! the confusion matrix; `tests` below hold the thresholds CI enforces.

use super::presence::{Engine, EventKind, PresenceConfig, PresenceEvent, Sighting, ZoneConfig};
use std::collections::BTreeMap;

/// The floor plan and the radio.
#[derive(Debug, Clone)]
pub struct Store {
    /// Zones in a row along x, each `zone_width_m` wide; receiver `rx-i` at the centre of zone i.
    pub zones: usize,
    pub zone_width_m: f64,
    pub receiver_height_m: f64,
    pub tx_power: f64,
    pub path_loss_exponent: f64,
    pub sigma_db: f64,
    pub burst_fraction: f64,
    pub burst_db: f64,
    pub loss: f64,
    pub wall_db: f64,
    /// Receivers that hear nothing (a receiver lost).
    pub dead_receivers: Vec<usize>,
    /// Advertisements per second per tag.
    pub adv_hz: f64,
}

impl Default for Store {
    fn default() -> Self {
        Store {
            zones: 4,
            zone_width_m: 6.0,
            receiver_height_m: 1.5,
            tx_power: -59.0,
            path_loss_exponent: 2.2,
            sigma_db: 2.5,
            burst_fraction: 0.10,
            burst_db: -6.0,
            loss: 0.2,
            wall_db: 0.0,
            dead_receivers: Vec::new(),
            adv_hz: 10.0,
        }
    }
}

impl Store {
    /// What receiver `r` hears of one advertisement sent at `x`: the RSSI in dBm, or `None`
    /// when the receiver is dead, the packet is lost, or it is below -100 dBm.
    pub fn hear(&self, rng: &mut fastrand::Rng, x: f64, r: usize) -> Option<f64> {
        if self.dead_receivers.contains(&r) || rng.f64() < self.loss {
            return None;
        }
        let rx = (r as f64 + 0.5) * self.zone_width_m;
        let d = ((x - rx).powi(2) + self.receiver_height_m.powi(2)).sqrt();
        let walls = match self.zone_at(x) {
            Some(z) => z.abs_diff(r) as f64,
            None => 1.0,
        };
        let mut rssi = self.tx_power - 10.0 * self.path_loss_exponent * d.log10()
            + self.sigma_db * gaussian(rng)
            - walls * self.wall_db;
        if rng.f64() < self.burst_fraction {
            rssi += self.burst_db;
        }
        (rssi >= -100.0).then_some(rssi)
    }

    /// The engine's zones for this floor plan: one per receiver, reaching just past the zone's
    /// edge.
    pub fn zone_configs(&self) -> Vec<ZoneConfig> {
        let reach = ((self.zone_width_m / 2.0).powi(2) + self.receiver_height_m.powi(2)).sqrt();
        (0..self.zones)
            .map(|i| ZoneConfig {
                name: format!("zone-{i}"),
                receivers: vec![format!("rx-{i}")],
                max_distance_m: reach * 1.25,
                min_rssi: None,
            })
            .collect()
    }

    fn zone_at(&self, x: f64) -> Option<usize> {
        let z = (x / self.zone_width_m).floor();
        (z >= 0.0 && (z as usize) < self.zones).then_some(z as usize)
    }
}

/// A path: (time s, x m) waypoints, linear in between; the tag is silent after the last one
/// when `leaves` (it left the store).
#[derive(Debug, Clone)]
pub struct Path {
    pub waypoints: Vec<(f64, f64)>,
    pub leaves: bool,
}

impl Path {
    fn x_at(&self, t: f64) -> Option<f64> {
        let w = &self.waypoints;
        let (&(t0, _), &(t1, x1)) = (w.first()?, w.last()?);
        if t < t0 {
            return None;
        }
        if t >= t1 {
            return (!self.leaves).then_some(x1);
        }
        let i = w.iter().position(|&(ti, _)| ti > t)?;
        let ((ta, xa), (tb, xb)) = (w[i - 1], w[i]);
        Some(xa + (xb - xa) * (t - ta) / (tb - ta))
    }

    fn end(&self) -> f64 {
        self.waypoints.last().map_or(0.0, |w| w.0)
    }

    /// A shopper walking through every zone in order at `speed` m/s, stopping at each zone's
    /// centre for a random 30-90 s, then out of the store past the last zone.
    pub fn shopper(store: &Store, rng: &mut fastrand::Rng, speed: f64) -> Path {
        let w = store.zone_width_m;
        let mut t = 0.0;
        let mut x = w / 2.0;
        let mut wp = vec![(t, x)];
        for z in 0..store.zones {
            let centre = (z as f64 + 0.5) * w;
            t += (centre - x).abs() / speed;
            x = centre;
            wp.push((t, x));
            t += 30.0 + 60.0 * rng.f64();
            wp.push((t, x));
        }
        // Out past the last receiver's reach.
        let out = store.zones as f64 * w + 25.0;
        t += (out - x) / speed;
        wp.push((t, out));
        Path {
            waypoints: wp,
            leaves: true,
        }
    }

    /// A tag that stays at `x` for `secs`.
    pub fn still(x: f64, secs: f64) -> Path {
        Path {
            waypoints: vec![(0.0, x), (secs, x)],
            leaves: false,
        }
    }
}

/// What one simulation measured.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// (true zone, engine zone or "none") -> samples.
    pub confusion: BTreeMap<(String, String), u64>,
    pub decided_samples: u64,
    pub wrong_samples: u64,
    pub enter_latency_ms: Vec<i64>,
    pub exit_latency_ms: Vec<i64>,
    pub missed_enters: u64,
    pub missed_exits: u64,
    pub flaps: u64,
    pub sightings: u64,
    pub events: u64,
}

impl Report {
    pub fn mis_id_percent(&self) -> f64 {
        100.0 * self.wrong_samples as f64 / self.decided_samples.max(1) as f64
    }

    pub fn percentile(v: &[i64], p: f64) -> Option<i64> {
        if v.is_empty() {
            return None;
        }
        let mut s = v.to_vec();
        s.sort_unstable();
        let i = ((p / 100.0) * (s.len() - 1) as f64).round() as usize;
        Some(s[i.min(s.len() - 1)])
    }

    fn merge(&mut self, o: Report) {
        for (k, v) in o.confusion {
            *self.confusion.entry(k).or_default() += v;
        }
        self.decided_samples += o.decided_samples;
        self.wrong_samples += o.wrong_samples;
        self.enter_latency_ms.extend(o.enter_latency_ms);
        self.exit_latency_ms.extend(o.exit_latency_ms);
        self.missed_enters += o.missed_enters;
        self.missed_exits += o.missed_exits;
        self.flaps += o.flaps;
        self.sightings += o.sightings;
        self.events += o.events;
    }
}

fn gaussian(rng: &mut fastrand::Rng) -> f64 {
    // Box-Muller.
    let (u1, u2) = (rng.f64().max(1e-12), rng.f64());
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// Runs one tag on `path` through a fresh engine and scores it.
pub fn run(store: &Store, cfg: &PresenceConfig, path: &Path, seed: u64) -> Report {
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut cfg = cfg.clone();
    cfg.zones = store.zone_configs();
    let mut engine = Engine::new(cfg);
    let mut report = Report::default();
    let step_ms = (1000.0 / store.adv_hz).round() as i64;
    let end_ms = ((path.end() + 30.0) * 1000.0) as i64;
    let still = path.waypoints.windows(2).all(|w| w[0].1 == w[1].1);
    // Ground-truth zone changes: (time, zone or None).
    let mut truth: Option<usize> = None;
    let mut pending_enter: Option<(usize, i64)> = None;
    let mut pending_exits: Vec<(usize, i64)> = Vec::new();
    let handle = |ev: &PresenceEvent,
                  pending_enter: &mut Option<(usize, i64)>,
                  pending_exits: &mut Vec<(usize, i64)>,
                  report: &mut Report| {
        let zone = ev
            .zone
            .as_deref()
            .and_then(|z| z.strip_prefix("zone-"))
            .and_then(|z| z.parse::<usize>().ok());
        match (ev.kind, zone) {
            (EventKind::Enter, Some(z)) => {
                if let Some((want, since)) = *pending_enter
                    && want == z
                {
                    report.enter_latency_ms.push(ev.ts_ms - since);
                    *pending_enter = None;
                }
            }
            (EventKind::Exit, Some(z)) => {
                if still {
                    report.flaps += 1;
                }
                if let Some(i) = pending_exits.iter().position(|(want, _)| *want == z) {
                    let (_, since) = pending_exits.remove(i);
                    // The engine dates a timeout exit to when it last heard the tag; what a
                    // consumer waits for is when the event is produced, which `tick` reports
                    // at its own time: score the later of the two.
                    report.exit_latency_ms.push(ev.ts_ms.max(since) - since);
                }
            }
            _ => {}
        }
        report.events += 1;
    };
    let mut t_ms = 0i64;
    let mut last_tick = 0i64;
    while t_ms <= end_ms {
        let t = t_ms as f64 / 1000.0;
        let x = path.x_at(t);
        let now_truth = x.and_then(|x| store.zone_at(x));
        if now_truth != truth {
            if let Some(old) = truth {
                if pending_enter.take().is_some() {
                    report.missed_enters += 1;
                }
                pending_exits.push((old, t_ms));
            }
            if let Some(new) = now_truth {
                pending_enter = Some((new, t_ms));
            }
            truth = now_truth;
        }
        if let Some(x) = x {
            for r in 0..store.zones {
                let Some(rssi) = store.hear(&mut rng, x, r) else {
                    continue;
                };
                report.sightings += 1;
                for ev in engine.observe(&Sighting {
                    tag: "tag".into(),
                    receiver: format!("rx-{r}"),
                    rssi: rssi.round(),
                    tx_power: Some(store.tx_power),
                    ts_ms: t_ms + r as i64,
                    samples: 1,
                }) {
                    handle(&ev, &mut pending_enter, &mut pending_exits, &mut report);
                }
            }
        }
        if t_ms - last_tick >= 1000 {
            last_tick = t_ms;
            for ev in engine.tick(t_ms) {
                handle(&ev, &mut pending_enter, &mut pending_exits, &mut report);
            }
        }
        if let Some(tz) = truth {
            let said = engine.zone_of("tag").map(str::to_string);
            let key = (
                format!("zone-{tz}"),
                said.clone().unwrap_or_else(|| "none".into()),
            );
            *report.confusion.entry(key).or_default() += 1;
            if let Some(s) = said {
                report.decided_samples += 1;
                if s != format!("zone-{tz}") {
                    report.wrong_samples += 1;
                }
            }
        }
        t_ms += step_ms;
    }
    report.missed_enters += u64::from(pending_enter.is_some());
    report.missed_exits += pending_exits.len() as u64;
    report
}

/// `tags` shoppers with seeds `seed..seed + tags`, merged.
pub fn shoppers(store: &Store, cfg: &PresenceConfig, tags: u64, seed: u64) -> Report {
    let mut all = Report::default();
    for i in 0..tags {
        let mut rng = fastrand::Rng::with_seed(seed + i);
        let speed = 0.8 + 0.6 * rng.f64();
        let path = Path::shopper(store, &mut rng, speed);
        all.merge(run(store, cfg, &path, seed + 1_000 + i));
    }
    all
}

/// A still tag at `x` for `secs`, `runs` seeds, merged.
pub fn still_tags(store: &Store, cfg: &PresenceConfig, x: f64, secs: f64, runs: u64) -> Report {
    let mut all = Report::default();
    for i in 0..runs {
        all.merge(run(store, cfg, &Path::still(x, secs), 77 + i));
    }
    all
}

/// The confusion matrix as a Markdown table (rows: true zone; columns: the engine's answer).
pub fn confusion_table(r: &Report, zones: usize) -> String {
    let cols: Vec<String> = (0..zones)
        .map(|z| format!("zone-{z}"))
        .chain(["none".to_string()])
        .collect();
    let mut s = format!("| true \\ engine | {} |\n", cols.join(" | "));
    s.push_str(&format!("|---|{}\n", "---|".repeat(cols.len())));
    for z in 0..zones {
        let row = format!("zone-{z}");
        let total: u64 = cols
            .iter()
            .map(|c| {
                r.confusion
                    .get(&(row.clone(), c.clone()))
                    .copied()
                    .unwrap_or(0)
            })
            .sum();
        let cells: Vec<String> = cols
            .iter()
            .map(|c| {
                let n = r
                    .confusion
                    .get(&(row.clone(), c.clone()))
                    .copied()
                    .unwrap_or(0);
                format!("{:.1} %", 100.0 * n as f64 / total.max(1) as f64)
            })
            .collect();
        s.push_str(&format!("| {row} | {} |\n", cells.join(" | ")));
    }
    s
}

/// What the receivers hear of `tags` (an advertisement and the path it walks), in time order:
/// `(ms since the start, receiver index, tag index, rssi)`.
fn heard(
    store: &Store,
    tags: &[(Vec<u8>, Path)],
    seed: u64,
    mut each: impl FnMut(i64, usize, usize, i8) -> std::io::Result<()>,
) -> std::io::Result<u64> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let step_ms = (1000.0 / store.adv_hz).round() as i64;
    let end_ms = tags
        .iter()
        .map(|(_, p)| (p.end() * 1000.0) as i64)
        .max()
        .unwrap_or(0);
    let mut written = 0;
    let mut t_ms = 0i64;
    while t_ms <= end_ms {
        for (i, (_, path)) in tags.iter().enumerate() {
            let Some(x) = path.x_at(t_ms as f64 / 1000.0) else {
                continue;
            };
            for r in 0..store.zones {
                let Some(rssi) = store.hear(&mut rng, x, r) else {
                    continue;
                };
                each(
                    t_ms + r as i64,
                    r,
                    i,
                    rssi.round().clamp(-127.0, 20.0) as i8,
                )?;
                written += 1;
            }
        }
        t_ms += step_ms;
    }
    Ok(written)
}

/// Writes what the receivers hear of `tags` (an advertisement and the path it walks) as a btmon
/// capture (monitor datalink, adapter index `r` = receiver `rx-r`), starting at `start_ms` (Unix
/// time): the file the `beacons` driver's replay source reads. Returns the reports written.
pub fn write_capture<W: std::io::Write>(
    store: &Store,
    tags: &[(Vec<u8>, Path)],
    seed: u64,
    start_ms: i64,
    out: W,
) -> std::io::Result<u64> {
    use super::btsnoop::{Datalink, Writer};
    use super::hci::{
        Address, AddressType, AdvertisingReport, LegacyEventType, ReportKind,
        encode_le_advertising_report,
    };
    let mut w = Writer::new(out, Datalink::Monitor)?;
    let n = heard(store, tags, seed, |t_ms, r, i, rssi| {
        let report = AdvertisingReport {
            kind: ReportKind::Legacy(LegacyEventType::AdvNonconnInd),
            address_type: AddressType::Random,
            address: Address([0xc0, 0xff, 0xee, 0, (i >> 8) as u8, i as u8]),
            rssi: Some(rssi),
            data: tags[i].0.clone(),
        };
        let event = encode_le_advertising_report(&[report], false)
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        w.set_adapter_index(r as u16);
        w.write_hci_event((start_ms + t_ms) * 1000, &event)
    })?;
    w.flush()?;
    Ok(n)
}

/// The same as [`write_capture`], as JSONL of `beacon.receiver/1` messages (one report per
/// line, receiver `rx-r`): the replay source's other format, and what a remote node sends.
pub fn write_capture_jsonl<W: std::io::Write>(
    store: &Store,
    tags: &[(Vec<u8>, Path)],
    seed: u64,
    start_ms: i64,
    mut out: W,
) -> std::io::Result<u64> {
    let hex: Vec<String> = tags
        .iter()
        .map(|(adv, _)| adv.iter().map(|b| format!("{b:02x}")).collect())
        .collect();
    let n = heard(store, tags, seed, |t_ms, r, i, rssi| {
        writeln!(
            out,
            r#"{{"schema":"beacon.receiver/1","receiver":"rx-{r}","ts":{},"reports":[{{"adv":"{}","rssi":{rssi}}}]}}"#,
            start_ms + t_ms,
            hex[i]
        )
    })?;
    out.flush()?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 9's thresholds, enforced in CI: mis-identification <= 5 % on walks through
    /// adjacent zones, exit latency p95 <= 10 s, and no flap of a still tag in 10 minutes.
    #[test]
    fn shoppers_walking_adjacent_zones_meet_the_accuracy_targets() {
        let store = Store::default();
        let r = shoppers(&store, &PresenceConfig::default(), 12, 1);
        let exit_p95 = Report::percentile(&r.exit_latency_ms, 95.0).unwrap();
        assert!(
            r.mis_id_percent() <= 5.0,
            "mis-id {:.2} %\n{}",
            r.mis_id_percent(),
            confusion_table(&r, store.zones)
        );
        assert!(exit_p95 <= 10_000, "exit p95 {exit_p95} ms");
        assert_eq!(r.missed_enters, 0, "{r:?}");
        assert_eq!(r.missed_exits, 0, "{r:?}");
    }

    #[test]
    fn a_still_tag_does_not_flap_in_ten_minutes() {
        let store = Store::default();
        // At a zone's centre and 1 m from a zone boundary.
        for x in [3.0, 7.0] {
            let r = still_tags(&store, &PresenceConfig::default(), x, 600.0, 3);
            assert_eq!(r.flaps, 0, "x = {x}: {} flaps", r.flaps);
        }
    }

    /// The score can fail: a bare "closest wins" engine (no margin, no persistence, no
    /// smoothing) flaps and mis-identifies under the same radio.
    #[test]
    fn without_hysteresis_and_smoothing_the_scores_fail() {
        let store = Store::default();
        let naive = PresenceConfig {
            margin: 0.0001,
            soft_margin: 0.0001,
            persistence: 1,
            ewma_alpha: 1.0,
            window_ms: 100,
            min_samples: 1,
            ..PresenceConfig::default()
        };
        let still = still_tags(&store, &naive, 5.0, 600.0, 1);
        assert!(still.flaps > 10, "{} flaps", still.flaps);
    }
}
