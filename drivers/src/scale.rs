//! Scales on a serial line (`type = "scale"`) -> `scale.weights`.
//!
//! Polled request/response protocols:
//! * **Toledo 8217** (also 8213; NCR/Datalogic POS scales): the host sends `W`; the scale answers
//!   `STX weight CR` when the weight is valid, or `STX ? status CR` when it is not (motion, over
//!   capacity, under zero...). Only the low five status bits are read as flags (bit 0 motion,
//!   1 over capacity, 2 under zero, 3 outside the zero capture range, 4 centre of zero): devices
//!   disagree on the upper bits (always-1 bits, parity). The weight carries no unit: `unit` says it.
//! * **SMA** (Scale Manufacturers Association standard, e.g. Cardinal, Sartorius, Brecknell): the
//!   host sends `LF W CR`; the scale answers `LF s r n m f xxxxxx.xxx uuu CR`: status (`Z` centre of
//!   zero, `O` over, `U` under, `E` zero error, `T` tare error), range, `G`ross/`N`et, `M`otion,
//!   a reserved byte, a 10-character weight and a 3-character unit.
//!
//! Only stable weights are emitted: a reading without motion or error, seen `stable_readings`
//! times in a row, and different from the last emitted one. A scale that stops answering is
//! reported down after `offline_after` missed polls and up again at the first answer.

use crate::link::{DeviceLink, dead_letter, store};
use crate::serial::{LineSettings, SerialConfig};
use crate::{Driver, DriverError};
use edge_core::component::{ComponentContext, Task};
use edge_core::config::{Problems, join};
use edge_core::{Event, State};
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ScaleProtocol {
    Toledo,
    Sma,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScaleConfig {
    pub name: String,
    pub lane: String,
    /// Serial line; Toledo defaults to 9600 7E1, SMA to 9600 8N1.
    pub serial: SerialConfig,
    pub protocol: ScaleProtocol,
    /// Unit of Toledo weights (the protocol does not send one): `lb` or `kg`.
    #[serde(default = "default_unit")]
    pub unit: String,
    /// Toledo weights without a decimal point have this many implied decimals.
    #[serde(default = "default_decimals")]
    pub implied_decimals: u32,
    #[serde(default = "default_poll")]
    pub poll_interval_ms: u64,
    #[serde(default = "default_response")]
    pub response_timeout_ms: u64,
    /// Equal stable readings in a row before a weight is emitted.
    #[serde(default = "default_stable")]
    pub stable_readings: u32,
    /// Emit a stable zero after a weight was removed.
    #[serde(default)]
    pub emit_zero: bool,
    /// Missed polls in a row before the scale is reported down.
    #[serde(default = "default_offline")]
    pub offline_after: u32,
}

fn default_unit() -> String {
    "lb".into()
}
fn default_decimals() -> u32 {
    2
}
fn default_poll() -> u64 {
    200
}
fn default_response() -> u64 {
    500
}
fn default_stable() -> u32 {
    2
}
fn default_offline() -> u32 {
    5
}

impl ScaleConfig {
    pub fn line_defaults(&self) -> LineSettings {
        match self.protocol {
            ScaleProtocol::Toledo => LineSettings::E71_9600,
            ScaleProtocol::Sma => LineSettings::N81_9600,
        }
    }
}

impl Driver for ScaleConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn exclusive_resources(&self) -> Vec<String> {
        vec![self.serial.path.clone()]
    }

    fn build(&self, ctx: ComponentContext) -> Result<Task, DriverError> {
        Ok(build(self.clone(), ctx))
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        self.serial.validate(&join(path, "serial"), problems);
        if self.lane.trim().is_empty() {
            problems.push(join(path, "lane"), "must name the lane, e.g. \"3\"");
        }
        if !matches!(self.unit.as_str(), "lb" | "kg" | "g" | "oz") {
            problems.push(
                join(path, "unit"),
                format!("{:?} must be lb, kg, g or oz", self.unit),
            );
        }
        if self.implied_decimals > 4 {
            problems.push(join(path, "implied_decimals"), "must be 0 to 4");
        }
        if !(20..=60_000).contains(&self.poll_interval_ms) {
            problems.push(
                join(path, "poll_interval_ms"),
                "must be between 20 and 60000",
            );
        }
        if !(20..=10_000).contains(&self.response_timeout_ms) {
            problems.push(
                join(path, "response_timeout_ms"),
                "must be between 20 and 10000",
            );
        }
        if self.stable_readings == 0 {
            problems.push(join(path, "stable_readings"), "must be at least 1");
        }
        if self.offline_after == 0 {
            problems.push(join(path, "offline_after"), "must be at least 1");
        }
    }
}

/// One answer of the scale.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Reading {
    /// Weight in thousandths of `unit` (`None` when the scale reported only a status).
    pub weight_milli: Option<i64>,
    pub unit: String,
    /// `gross` or `net`.
    pub mode: &'static str,
    pub motion: bool,
    /// Conditions reported with the reading (`over_capacity`, `under_zero`, `center_of_zero`...).
    pub flags: Vec<&'static str>,
}

impl Reading {
    /// A weight a customer can be charged for.
    pub fn is_stable(&self) -> bool {
        self.weight_milli.is_some()
            && !self.motion
            && !self.flags.iter().any(|f| {
                matches!(
                    *f,
                    "over_capacity"
                        | "under_zero"
                        | "zero_error"
                        | "tare_error"
                        | "outside_zero_capture_range"
                )
            })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScaleError {
    #[error("scale answer {0:?} is not a weight or status frame")]
    Garbled(String),
    #[error(
        "scale answer of {0} bytes exceeds the longest valid frame (line noise or a wrong baud rate?)"
    )]
    TooLong(usize),
}

impl ScaleError {
    pub fn label(&self) -> &'static str {
        match self {
            ScaleError::Garbled(_) => "garbled",
            ScaleError::TooLong(_) => "too_long",
        }
    }
}

const TOLEDO_FLAGS: [&str; 5] = [
    "motion",
    "over_capacity",
    "under_zero",
    "outside_zero_capture_range",
    "center_of_zero",
];

fn garbled(b: &[u8]) -> ScaleError {
    ScaleError::Garbled(String::from_utf8_lossy(b).chars().take(40).collect())
}

/// Parses a decimal weight ("012.34", " -1.5", "01234" with implied decimals) into thousandths.
fn parse_weight(s: &[u8], implied_decimals: u32) -> Option<i64> {
    let t = std::str::from_utf8(s).ok()?.trim();
    let (neg, t) = match t.strip_prefix('-') {
        Some(r) => (true, r.trim_start()),
        None => (false, t),
    };
    if t.is_empty() || t.len() > 12 {
        return None;
    }
    let v = match t.split_once('.') {
        Some((i, f)) => {
            if !i.bytes().all(|b| b.is_ascii_digit())
                || !f.bytes().all(|b| b.is_ascii_digit())
                || f.len() > 3
                || (i.is_empty() && f.is_empty())
            {
                return None;
            }
            let ip: i64 = if i.is_empty() { 0 } else { i.parse().ok()? };
            let mut fs = f.to_string();
            while fs.len() < 3 {
                fs.push('0');
            }
            ip * 1000 + fs.parse::<i64>().ok()?
        }
        None => {
            if !t.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let raw: i64 = t.parse().ok()?;
            if implied_decimals >= 3 {
                raw / 10_i64.pow(implied_decimals - 3)
            } else {
                raw * 10_i64.pow(3 - implied_decimals)
            }
        }
    };
    Some(if neg { -v } else { v })
}

/// Parses a Toledo 8217 answer between STX and CR.
pub fn parse_toledo(
    frame: &[u8],
    unit: &str,
    implied_decimals: u32,
) -> Result<Reading, ScaleError> {
    match frame {
        [b'?', status, ..] => {
            let bits = status & 0x1F;
            let flags: Vec<&'static str> = (0..5)
                .filter(|i| bits & (1 << i) != 0)
                .map(|i| TOLEDO_FLAGS[i])
                .collect();
            Ok(Reading {
                weight_milli: None,
                unit: unit.into(),
                mode: "gross",
                motion: bits & 1 != 0,
                flags,
            })
        }
        _ => {
            let w = parse_weight(frame, implied_decimals).ok_or_else(|| garbled(frame))?;
            Ok(Reading {
                weight_milli: Some(w),
                unit: unit.into(),
                mode: "gross",
                motion: false,
                flags: Vec::new(),
            })
        }
    }
}

/// Parses an SMA answer between LF and CR: `s r n m f xxxxxx.xxx uuu`.
pub fn parse_sma(frame: &[u8]) -> Result<Reading, ScaleError> {
    if frame.len() < 15 || frame.len() > 19 {
        return Err(garbled(frame));
    }
    let (s, r, n, m) = (frame[0], frame[1], frame[2], frame[3]);
    if !r.is_ascii_digit() {
        return Err(garbled(frame));
    }
    let mut flags = Vec::new();
    match s {
        b'Z' => flags.push("center_of_zero"),
        b'O' => flags.push("over_capacity"),
        b'U' => flags.push("under_zero"),
        b'E' => flags.push("zero_error"),
        b'T' => flags.push("tare_error"),
        b'e' => flags.push("not_displayed"),
        b' ' => {}
        _ => return Err(garbled(frame)),
    }
    let mode = match n {
        b'G' | b'g' => "gross",
        b'N' | b'n' => "net",
        b'T' => "tare",
        _ => return Err(garbled(frame)),
    };
    let motion = match m {
        b'M' => true,
        b' ' => false,
        _ => return Err(garbled(frame)),
    };
    let weight = frame.get(5..15).ok_or_else(|| garbled(frame))?;
    let unit = String::from_utf8_lossy(frame.get(15..).unwrap_or(&[]))
        .trim()
        .to_lowercase();
    let weight_milli = if weight.iter().all(|&b| b == b'-' || b == b' ') {
        None
    } else {
        Some(parse_weight(weight, 3).ok_or_else(|| garbled(frame))?)
    };
    Ok(Reading {
        weight_milli,
        unit,
        mode,
        motion,
        flags,
    })
}

/// Extracts frames `start .. CR` from the byte stream, bounded; bytes outside a frame are junk.
#[derive(Debug)]
pub struct ScaleFramer {
    start: u8,
    buf: Vec<u8>,
    inside: bool,
    pub junk: u64,
}

pub const MAX_SCALE_FRAME: usize = 32;

impl ScaleFramer {
    pub fn new(protocol: ScaleProtocol) -> Self {
        ScaleFramer {
            start: match protocol {
                ScaleProtocol::Toledo => 0x02,
                ScaleProtocol::Sma => b'\n',
            },
            buf: Vec::new(),
            inside: false,
            junk: 0,
        }
    }

    pub fn push(&mut self, data: &[u8], out: &mut Vec<Result<Vec<u8>, ScaleError>>) {
        for &b in data {
            if b == self.start {
                if self.inside && !self.buf.is_empty() {
                    out.push(Err(garbled(&self.buf)));
                }
                self.inside = true;
                self.buf.clear();
            } else if !self.inside {
                self.junk += 1;
            } else if b == b'\r' {
                self.inside = false;
                out.push(Ok(std::mem::take(&mut self.buf)));
            } else if self.buf.len() >= MAX_SCALE_FRAME {
                self.inside = false;
                out.push(Err(ScaleError::TooLong(self.buf.len() + 1)));
                self.buf.clear();
            } else {
                self.buf.push(b);
            }
        }
    }
}

/// Emits stable weights once.
#[derive(Debug, Default)]
pub struct Stability {
    candidate: Option<(i64, String, &'static str)>,
    seen: u32,
    last_emitted: Option<(i64, String, &'static str)>,
}

impl Stability {
    /// Returns the reading to emit, if this one completes a new stable weight.
    pub fn observe(&mut self, r: &Reading, needed: u32, emit_zero: bool) -> bool {
        if !r.is_stable() {
            self.candidate = None;
            self.seen = 0;
            return false;
        }
        let key = (r.weight_milli.unwrap_or(0), r.unit.clone(), r.mode);
        if self.candidate.as_ref() == Some(&key) {
            self.seen += 1;
        } else {
            self.candidate = Some(key.clone());
            self.seen = 1;
        }
        if self.seen < needed || self.last_emitted.as_ref() == Some(&key) {
            return false;
        }
        self.last_emitted = Some(key.clone());
        key.0 != 0 || emit_zero
    }
}

pub fn build(cfg: ScaleConfig, ctx: ComponentContext) -> Task {
    Box::pin(async move {
        run(&cfg, &ctx).await;
        ctx.status.set(State::Stopped, "stopped");
        Ok(())
    })
}

async fn run(cfg: &ScaleConfig, ctx: &ComponentContext) {
    let mut link = DeviceLink::new(ctx.clone(), "scale", cfg.serial.path.clone());
    let settings = cfg.serial.settings(cfg.line_defaults());
    let request: &[u8] = match cfg.protocol {
        ScaleProtocol::Toledo => b"W",
        ScaleProtocol::Sma => b"\nW\r",
    };
    let mut seq = 0u64;
    while !ctx.shutdown.intake().is_cancelled() {
        let mut port = match cfg.serial.open(cfg.line_defaults()) {
            Ok(p) => p,
            Err(e) => {
                if !link.down_and_wait(e).await {
                    return;
                }
                continue;
            }
        };
        let mut framer = ScaleFramer::new(cfg.protocol);
        let mut stability = Stability::default();
        let mut missed = 0u32;
        let mut answered_once = false;
        let mut tick = tokio::time::interval(Duration::from_millis(cfg.poll_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = [0u8; 256];
        let why: String = 'conn: loop {
            tokio::select! {
                _ = ctx.shutdown.intake().cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = port.write_all(request).await {
                break format!(
                    "writing the weight request to {} failed: {e} (scale unplugged?)",
                    cfg.serial.path
                );
            }
            // Read until one frame (or the response timeout).
            let deadline =
                tokio::time::Instant::now() + Duration::from_millis(cfg.response_timeout_ms);
            let mut frames = Vec::new();
            while frames.is_empty() {
                tokio::select! {
                    _ = ctx.shutdown.intake().cancelled() => return,
                    _ = tokio::time::sleep_until(deadline) => break,
                    r = port.read(&mut buf) => match r {
                        Ok(0) => break 'conn "the serial port reported end of file (scale unplugged?)".to_string(),
                        Ok(n) => framer.push(&buf[..n], &mut frames),
                        Err(e) => break 'conn format!("reading {} failed: {e} (scale unplugged?)", cfg.serial.path),
                    },
                }
            }
            if frames.is_empty() {
                missed += 1;
                if missed == cfg.offline_after
                    || (!answered_once && missed == 1 && link_is_starting(ctx))
                {
                    link.backoff = crate::link::device_backoff(Duration::ZERO, Duration::ZERO);
                    // Keep polling: a scale that is switched off answers again when switched on.
                    let _ = link.down_and_wait(format!("the scale on {} does not answer ({settings}; is it switched on and set to the {:?} protocol?)", cfg.serial.path, cfg.protocol)).await;
                }
                continue;
            }
            if missed > 0 || !answered_once {
                missed = 0;
                answered_once = true;
                link.up(format!(
                    "polling the scale on {} ({settings}, {:?})",
                    cfg.serial.path, cfg.protocol
                ))
                .await;
            }
            let now = edge_core::time::now_ms();
            let mut events = Vec::new();
            for f in frames {
                let parsed = f.and_then(|b| match cfg.protocol {
                    ScaleProtocol::Toledo => parse_toledo(&b, &cfg.unit, cfg.implied_decimals),
                    ScaleProtocol::Sma => parse_sma(&b),
                });
                match parsed {
                    Ok(r) => {
                        ctx.status
                            .field("last_reading", serde_json::to_value(&r).unwrap_or_default());
                        if stability.observe(&r, cfg.stable_readings, cfg.emit_zero) {
                            seq += 1;
                            events.push(weight_event(ctx, cfg, &r, now, seq));
                        }
                    }
                    Err(e) => events.push(
                        dead_letter(
                            ctx,
                            "scale",
                            e.label(),
                            format!("scale answer refused: {e}"),
                            e.to_string().as_bytes(),
                        )
                        .with_key(cfg.lane.clone()),
                    ),
                }
            }
            if !events.is_empty() {
                match store(ctx, events).await {
                    Ok(Some(_)) => ctx.status.field("weights", seq),
                    Ok(None) => return,
                    Err(e) => ctx
                        .status
                        .set(State::Degraded, format!("weights could not be stored: {e}")),
                }
            }
        };
        drop(port);
        link.backoff =
            crate::link::device_backoff(Duration::from_millis(200), Duration::from_secs(10));
        if !link.down_and_wait(why).await {
            return;
        }
    }
}

fn link_is_starting(ctx: &ComponentContext) -> bool {
    ctx.status.state() == Some(State::Starting)
}

fn weight_event(
    ctx: &ComponentContext,
    cfg: &ScaleConfig,
    r: &Reading,
    ts: i64,
    seq: u64,
) -> Event {
    let id = format!("weight:{}:{ts}:{seq}", cfg.name);
    let milli = r.weight_milli.unwrap_or(0);
    let grams_per_unit = match r.unit.as_str() {
        "kg" => 1000.0,
        "lb" => 453.592_37,
        "oz" => 28.349_523_125,
        _ => 1.0,
    };
    let weight_g = ((milli as f64) / 1000.0 * grams_per_unit * 10.0).round() / 10.0;
    let v = json!({
        "schema": "scale.weight/1", "event_id": id, "store": &*ctx.store_id, "lane": cfg.lane,
        "device": cfg.name, "ts": ts, "protocol": cfg.protocol, "weight_milli": milli,
        "unit": r.unit, "weight_g": weight_g, "mode": r.mode, "stable": true, "flags": r.flags,
    });
    Event::new("scale.weights", serde_json::to_vec(&v).unwrap_or_default())
        .with_event_ts(ts)
        .with_key(cfg.lane.clone())
        .with_source(cfg.name.clone())
        .with_event_id(id)
        .with_schema("scale.weight/1")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toledo_weights_and_status_use_only_the_low_five_bits() {
        let r = parse_toledo(b"01.234", "lb", 2).unwrap();
        assert_eq!(r.weight_milli, Some(1234));
        assert!(r.is_stable());
        assert_eq!(
            parse_toledo(b"00125", "lb", 2).unwrap().weight_milli,
            Some(1250)
        );
        // 0x61 = 0b0110_0001: motion, plus the always-1 upper bits that must be ignored.
        let s = parse_toledo(b"?\x61", "lb", 2).unwrap();
        assert_eq!(s.flags, vec!["motion"]);
        assert!(!s.is_stable());
        let s = parse_toledo(b"?\xe2", "lb", 2).unwrap();
        assert_eq!(s.flags, vec!["over_capacity"]);
        let s = parse_toledo(b"?\x34", "lb", 2).unwrap();
        assert_eq!(s.flags, vec!["under_zero", "center_of_zero"]);
        assert_eq!(
            parse_toledo(b"1x.3", "lb", 2).unwrap_err().label(),
            "garbled"
        );
    }

    fn sma(s: char, n: char, m: char, w: &str, u: &str) -> Vec<u8> {
        format!("{s}1{n}{m} {w:>10}{u:<3}").into_bytes()
    }

    #[test]
    fn sma_frames() {
        let r = parse_sma(&sma(' ', 'G', ' ', "5.025", "lb")).unwrap();
        assert_eq!(
            (r.weight_milli, r.unit.as_str(), r.mode),
            (Some(5025), "lb", "gross")
        );
        assert!(r.is_stable());
        let m = parse_sma(&sma(' ', 'N', 'M', "7.650", "kg")).unwrap();
        assert!(m.motion && !m.is_stable());
        assert_eq!(m.mode, "net");
        let e = parse_sma(&sma('E', 'G', ' ', "----------", "lb")).unwrap();
        assert_eq!(
            (e.weight_milli, e.flags.clone()),
            (None, vec!["zero_error"])
        );
        assert!(!e.is_stable());
        assert!(parse_sma(b"garbage").is_err());
        assert!(parse_sma(&sma('X', 'G', ' ', "5.025", "lb")).is_err());
        assert!(parse_sma(&sma(' ', 'G', ' ', "5.0x5", "lb")).is_err());
    }

    #[test]
    fn only_new_stable_weights_are_emitted() {
        let w = |milli, motion| Reading {
            weight_milli: Some(milli),
            unit: "lb".into(),
            mode: "gross",
            motion,
            flags: Vec::new(),
        };
        let mut s = Stability::default();
        let seq = [
            w(500, true),
            w(1000, false),
            w(1000, false),
            w(1000, false),
            w(0, false),
            w(0, false),
            w(1000, false),
            w(1000, false),
        ];
        let emitted: Vec<bool> = seq.iter().map(|r| s.observe(r, 2, false)).collect();
        assert_eq!(
            emitted,
            vec![false, false, true, false, false, false, false, true]
        );
    }

    #[test]
    fn framer_bounds_frames_and_counts_junk() {
        let mut f = ScaleFramer::new(ScaleProtocol::Toledo);
        let mut out = Vec::new();
        f.push(b"zz\x0201.234\r\x02", &mut out);
        f.push(&[b'9'; 100], &mut out);
        f.push(b"\r\x02?\x21\r", &mut out);
        assert_eq!(out[0], Ok(b"01.234".to_vec()));
        assert!(matches!(out[1], Err(ScaleError::TooLong(_))));
        assert_eq!(out[2], Ok(b"?\x21".to_vec()));
        assert!(f.junk >= 2);
    }
}
