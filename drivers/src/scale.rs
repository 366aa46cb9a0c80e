//! Scales on a serial line (`type = "scale"`) -> `scale.weights`.
//!
//! Polled request/response protocols:
//! * **Toledo 8217** (also 8213; NCR/Datalogic POS scales): the host sends `W`; the scale answers
//!   `STX weight CR` when the weight is valid (`STX 01.234 CR`; a net weight after a tare carries an
//!   `N` suffix, `STX 00.300N CR`), or `STX ? status CR` when it is not (motion, over capacity,
//!   under zero...). The status byte is always data, even when it equals STX (`STX ? 0x02 CR`:
//!   over capacity without the always-1 bits) or CR, so the framer never reads it as a frame
//!   boundary. Only the low five status bits are read as flags (bit 0 motion, 1 over capacity,
//!   2 under zero, 3 outside the zero capture range, 4 centre of zero): bits 5 and 6 are always 1
//!   on an 8217 (`0x61` motion, `0x62` over capacity) and bit 7 is parity on an 8-bit line
//!   (`0xE2`); some simulators leave them 0. The weight carries no unit: `unit` says it.
//! * **SMA** (Scale Manufacturers Association standard, e.g. Cardinal, Sartorius, Brecknell): the
//!   host sends `LF W CR`; the scale answers `LF s r n m f xxxxxx.xxx uuu CR`: status (`Z` centre of
//!   zero, `O` over, `U` under, `E` zero error, `T` tare error), range, `G`ross/`N`et, `M`otion,
//!   a reserved byte, a 10-character weight and a 3-character unit.
//!
//! Only stable weights are emitted: a reading without motion or error, seen `stable_readings`
//! times in a row, and different from the last emitted one. A scale that stops answering is
//! reported down after `offline_after` missed polls and up again at the first answer.
//!
//! A stale handle is reopened: after `reopen_after` missed polls in a row (and again every
//! `reopen_after`), or at once when the configured path now resolves to another device (a
//! `by-id` link after a replug, a PTY link after a simulator restart). Answers that are not
//! frames become dead letters holding the bytes the scale sent, one per distinct error per
//! `deadletter_repeat_interval_ms` with a count ([`DeadLetters`]).

use crate::deadletters::{DeadLetters, default_repeat_interval_ms};
use crate::link::{DeviceLink, store};
use crate::serial::{DeviceIdentity, LineSettings, SerialConfig};
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
    /// Missed polls in a row after which the port is closed and opened again (a stale handle).
    #[serde(default = "default_reopen")]
    pub reopen_after: u32,
    /// A repeated identical dead letter is written once per this interval, with a count.
    #[serde(default = "default_repeat_interval_ms")]
    pub deadletter_repeat_interval_ms: u64,
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
fn default_reopen() -> u32 {
    10
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
        if self.reopen_after == 0 {
            problems.push(join(path, "reopen_after"), "must be at least 1");
        }
        crate::deadletters::validate_repeat_interval(
            path,
            self.deadletter_repeat_interval_ms,
            problems,
        );
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

/// Parses a Toledo 8217 answer between STX and CR: a weight (`01.234`, `00125` with implied
/// decimals), a net weight (`00.300N`) or `?` and one status byte.
pub fn parse_toledo(
    frame: &[u8],
    unit: &str,
    implied_decimals: u32,
) -> Result<Reading, ScaleError> {
    match frame {
        [b'?', status] => {
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
            let (digits, mode) = match frame.split_last() {
                Some((b'N' | b'n', rest)) => (rest, "net"),
                Some((b'G' | b'g', rest)) => (rest, "gross"),
                _ => (frame, "gross"),
            };
            let w = parse_weight(digits, implied_decimals).ok_or_else(|| garbled(frame))?;
            Ok(Reading {
                weight_milli: Some(w),
                unit: unit.into(),
                mode,
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

/// What the framer cut from the line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Framed {
    /// A frame: the bytes between the start byte and CR.
    Frame(Vec<u8>),
    /// Bytes that formed no frame, as the device sent them (start byte included, bounded).
    Broken { error: ScaleError, raw: Vec<u8> },
}

/// Extracts frames `start .. CR` from the byte stream, bounded; bytes outside a frame are junk.
/// Toledo: the byte after a leading `?` is the status byte and always data.
#[derive(Debug)]
pub struct ScaleFramer {
    start: u8,
    status_after_question: bool,
    buf: Vec<u8>,
    inside: bool,
    status_next: bool,
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
            status_after_question: protocol == ScaleProtocol::Toledo,
            buf: Vec::new(),
            inside: false,
            status_next: false,
            junk: 0,
        }
    }

    /// The frame as it was on the wire: start byte, body, CR.
    pub fn wire(&self, body: &[u8]) -> Vec<u8> {
        let mut raw = Vec::with_capacity(body.len() + 2);
        raw.push(self.start);
        raw.extend_from_slice(body);
        raw.push(b'\r');
        raw
    }

    fn broken(&self, error: ScaleError, extra: Option<u8>) -> Framed {
        let mut raw = Vec::with_capacity(self.buf.len() + 2);
        raw.push(self.start);
        raw.extend_from_slice(&self.buf);
        raw.extend(extra);
        Framed::Broken { error, raw }
    }

    pub fn push(&mut self, data: &[u8], out: &mut Vec<Framed>) {
        for &b in data {
            if self.inside && self.status_next {
                self.status_next = false;
                self.buf.push(b);
            } else if b == self.start {
                if self.inside && !self.buf.is_empty() {
                    out.push(self.broken(garbled(&self.buf), None));
                }
                self.inside = true;
                self.buf.clear();
            } else if !self.inside {
                self.junk += 1;
            } else if b == b'\r' {
                self.inside = false;
                out.push(Framed::Frame(std::mem::take(&mut self.buf)));
            } else if self.buf.len() >= MAX_SCALE_FRAME {
                self.inside = false;
                out.push(self.broken(ScaleError::TooLong(self.buf.len() + 1), Some(b)));
                self.buf.clear();
            } else {
                self.buf.push(b);
                self.status_next = self.status_after_question && self.buf == b"?";
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
        let mut dead = DeadLetters::new(
            &ctx,
            "scale",
            cfg.lane.clone(),
            Duration::from_millis(cfg.deadletter_repeat_interval_ms),
        );
        run(&cfg, &ctx, &mut dead).await;
        dead.flush().await;
        ctx.status.set(State::Stopped, "stopped");
        Ok(())
    })
}

/// Why a connection to the scale ended.
enum End {
    /// The port failed (unplugged): report down, back off, open again.
    Failed(String),
    /// The handle is stale: close it and open the configured path again at once.
    Reopen(&'static str, String),
}

/// Whether the configured path still resolves to the device that was opened: `None` when it
/// does (or the identity at open was unknown), else why not.
fn moved(opened: Option<DeviceIdentity>, now: std::io::Result<DeviceIdentity>) -> Option<String> {
    match (opened, now) {
        (Some(a), Ok(b)) if a != b => Some("now resolves to another device".into()),
        (Some(_), Err(e)) => Some(format!("no longer resolves to a device ({e})")),
        _ => None,
    }
}

/// Stores a poll's events; `false` when the agent is stopping. A log error degrades the status
/// (the driver keeps polling).
async fn store_poll(ctx: &ComponentContext, events: Vec<Event>, weights: u64) -> bool {
    if events.is_empty() {
        return true;
    }
    match store(ctx, events).await {
        Ok(Some(_)) => ctx.status.field("weights", weights),
        Ok(None) => return false,
        Err(e) => ctx
            .status
            .set(State::Degraded, format!("weights could not be stored: {e}")),
    }
    true
}

async fn run(cfg: &ScaleConfig, ctx: &ComponentContext, dead: &mut DeadLetters) {
    let mut link = DeviceLink::new(ctx.clone(), "scale", cfg.serial.path.clone());
    let settings = cfg.serial.settings(cfg.line_defaults());
    let request: &[u8] = match cfg.protocol {
        ScaleProtocol::Toledo => b"W",
        ScaleProtocol::Sma => b"\nW\r",
    };
    let mut seq = 0u64;
    let mut reopens = 0u64;
    // Survive a reopen: a silent scale stays reported down, and is reported up at its answer.
    let mut missed = 0u32;
    let mut answered_once = false;
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
        let opened = cfg.serial.identity().ok();
        let mut framer = ScaleFramer::new(cfg.protocol);
        let mut stability = Stability::default();
        let mut tick = tokio::time::interval(Duration::from_millis(cfg.poll_interval_ms));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut buf = [0u8; 256];
        let end: End = 'conn: loop {
            tokio::select! {
                _ = ctx.shutdown.intake().cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Some(why) = moved(opened, cfg.serial.identity()) {
                break End::Reopen("path_changed", format!("{} {why}", cfg.serial.path));
            }
            if let Err(e) = port.write_all(request).await {
                break End::Failed(format!(
                    "writing the weight request to {} failed: {e} (scale unplugged?)",
                    cfg.serial.path
                ));
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
                        Ok(0) => break 'conn End::Failed("the serial port reported end of file (scale unplugged?)".to_string()),
                        Ok(n) => framer.push(&buf[..n], &mut frames),
                        Err(e) => break 'conn End::Failed(format!("reading {} failed: {e} (scale unplugged?)", cfg.serial.path)),
                    },
                }
            }
            // Summaries of repeated dead letters whose interval is over.
            let mut events = dead.due();
            if frames.is_empty() {
                missed = missed.saturating_add(1);
                if !store_poll(ctx, events, seq).await {
                    return;
                }
                if missed == cfg.offline_after
                    || (!answered_once && missed == 1 && link_is_starting(ctx))
                {
                    link.backoff = crate::link::device_backoff(Duration::ZERO, Duration::ZERO);
                    // Keep polling: a scale that is switched off answers again when switched on.
                    if !link.down_and_wait(format!("the scale on {} does not answer ({settings}; is it switched on and set to the {:?} protocol?)", cfg.serial.path, cfg.protocol)).await {
                        return;
                    }
                }
                if missed % cfg.reopen_after == 0 {
                    break End::Reopen(
                        "no_answer",
                        format!("no answer to {missed} polls in a row"),
                    );
                }
                continue;
            }
            if missed > 0 || !link.is_up() {
                missed = 0;
                answered_once = true;
                link.up(format!(
                    "polling the scale on {} ({settings}, {:?})",
                    cfg.serial.path, cfg.protocol
                ))
                .await;
            }
            let now = edge_core::time::now_ms();
            for f in frames {
                let parsed = match f {
                    Framed::Frame(body) => match cfg.protocol {
                        ScaleProtocol::Toledo => {
                            parse_toledo(&body, &cfg.unit, cfg.implied_decimals)
                        }
                        ScaleProtocol::Sma => parse_sma(&body),
                    }
                    .map_err(|e| (e, framer.wire(&body))),
                    Framed::Broken { error, raw } => Err((error, raw)),
                };
                match parsed {
                    Ok(r) => {
                        ctx.status
                            .field("last_reading", serde_json::to_value(&r).unwrap_or_default());
                        if stability.observe(&r, cfg.stable_readings, cfg.emit_zero) {
                            seq += 1;
                            events.push(weight_event(ctx, cfg, &r, now, seq));
                        }
                    }
                    Err((e, raw)) => events.extend(dead.admit(
                        e.label(),
                        format!("scale answer refused: {e}"),
                        &raw,
                    )),
                }
            }
            if !store_poll(ctx, events, seq).await {
                return;
            }
        };
        drop(port);
        match end {
            End::Failed(why) => {
                link.backoff = crate::link::device_backoff(
                    Duration::from_millis(200),
                    Duration::from_secs(10),
                );
                if !link.down_and_wait(why).await {
                    return;
                }
            }
            End::Reopen(reason, why) => {
                reopens += 1;
                ctx.status.field("reopens", reopens);
                metrics::counter!("edge_device_reopens_total", "driver" => ctx.status.name().to_string(), "reason" => reason).increment(1);
                // One line per silent period, not one per reopen of a scale switched off.
                if reason == "path_changed" || missed == cfg.reopen_after {
                    tracing::info!(
                        component = ctx.status.name(),
                        device = %cfg.serial.path,
                        reason,
                        "closing and reopening the scale's port: {why}; reopened again every {} missed polls while it stays silent",
                        cfg.reopen_after
                    );
                } else {
                    tracing::debug!(component = ctx.status.name(), device = %cfg.serial.path, reason, "reopening the scale's port: {why}");
                }
            }
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
        assert_eq!(out[0], Framed::Frame(b"01.234".to_vec()));
        let Framed::Broken { error, raw } = &out[1] else {
            panic!("{out:?}")
        };
        assert!(matches!(error, ScaleError::TooLong(_)));
        assert_eq!(raw.len(), MAX_SCALE_FRAME + 2, "the kept bytes, bounded");
        assert_eq!(out[2], Framed::Frame(b"?\x21".to_vec()));
        assert!(f.junk >= 2);
    }

    /// Issue 11 item 1: after a tare the 8217 answers `STX "00.300N" CR`.
    #[test]
    fn toledo_net_weights_are_net() {
        let mut f = ScaleFramer::new(ScaleProtocol::Toledo);
        let mut out = Vec::new();
        f.push(b"\x0200.300N\r", &mut out);
        assert_eq!(out, vec![Framed::Frame(b"00.300N".to_vec())]);
        let r = parse_toledo(b"00.300N", "kg", 2).unwrap();
        assert_eq!((r.weight_milli, r.mode), (Some(300), "net"));
        assert!(r.is_stable());
        assert_eq!(
            parse_toledo(b"00030N", "kg", 2).unwrap().weight_milli,
            Some(300),
            "implied decimals"
        );
        let g = parse_toledo(b"01.234", "lb", 2).unwrap();
        assert_eq!(g.mode, "gross");
        // A net weight and the same gross weight are different weights.
        let mut s = Stability::default();
        assert!(s.observe(&g, 1, false));
        assert!(!s.observe(&g, 1, false), "emitted once");
        let n = parse_toledo(b"01.234N", "lb", 2).unwrap();
        assert!(s.observe(&n, 1, false), "the net weight is new");
        assert_eq!(
            serde_json::to_value(&n).unwrap()["mode"],
            "net",
            "last_reading says net"
        );
        assert!(parse_toledo(b"00.300X", "kg", 2).is_err());
        assert!(parse_toledo(b"N", "kg", 2).is_err());
    }

    /// Issue 11 item 2: `STX ? 0x02 CR` (over capacity, as the simulator sends it) is one status
    /// frame, not a frame cut short by a new STX; so are the real 8217 status bytes, whose bits
    /// 5 and 6 are always 1 and bit 7 is parity on an 8-bit line.
    #[test]
    fn the_byte_after_question_mark_is_the_status_byte() {
        let cases: &[(u8, &[&str])] = &[
            (0x02, &["over_capacity"]),
            (0x62, &["over_capacity"]),
            (0xe2, &["over_capacity"]),
            (0x61, &["motion"]),
            (0xe1, &["motion"]),
            (0x64, &["under_zero"]),
            (0xe4, &["under_zero"]),
            (0x68, &["outside_zero_capture_range"]),
            (0xe8, &["outside_zero_capture_range"]),
            (0x70, &["center_of_zero"]),
            (0xf0, &["center_of_zero"]),
            (0x71, &["motion", "center_of_zero"]),
            (0x63, &["motion", "over_capacity"]),
            (0x6c, &["under_zero", "outside_zero_capture_range"]),
            (0x60, &[]),
            // Status bytes equal to the frame bytes: motion + under zero + outside the capture
            // range is CR without the always-1 bits, motion alone is 0x01.
            (
                0x0d,
                &["motion", "under_zero", "outside_zero_capture_range"],
            ),
            (0x01, &["motion"]),
        ];
        for &(status, flags) in cases {
            let mut f = ScaleFramer::new(ScaleProtocol::Toledo);
            let mut out = Vec::new();
            // Split across reads, the status byte alone in the second one.
            f.push(&[0x02, b'?'], &mut out);
            f.push(&[status], &mut out);
            f.push(b"\r\x0201.000\r", &mut out);
            assert_eq!(
                out,
                vec![
                    Framed::Frame(vec![b'?', status]),
                    Framed::Frame(b"01.000".to_vec())
                ],
                "{status:#04x}"
            );
            let r = parse_toledo(&[b'?', status], "lb", 2).unwrap();
            assert_eq!(r.flags, flags, "{status:#04x}");
            assert_eq!(r.weight_milli, None);
            assert_eq!(r.motion, flags.contains(&"motion"), "{status:#04x}");
            assert!(!r.is_stable());
        }
        // `?` not in first place is not a status: an ordinary garbled frame.
        assert!(parse_toledo(b"1?\x02", "lb", 2).is_err());
        assert!(parse_toledo(b"?\x62x", "lb", 2).is_err());
    }

    /// Issue 11 item 4: what the framer or the parser refuses keeps the bytes the scale sent.
    #[test]
    fn refused_frames_keep_the_bytes_on_the_wire() {
        let mut f = ScaleFramer::new(ScaleProtocol::Toledo);
        let mut out = Vec::new();
        f.push(b"\x0201.2\x0201.234\r", &mut out);
        assert_eq!(
            out[0],
            Framed::Broken {
                error: ScaleError::Garbled("01.2".into()),
                raw: b"\x0201.2".to_vec()
            }
        );
        assert_eq!(f.wire(b"zz.z"), b"\x02zz.z\r".to_vec());
        let s = ScaleFramer::new(ScaleProtocol::Sma);
        assert_eq!(s.wire(b"x"), b"\nx\r".to_vec());
    }

    #[test]
    fn reopen_when_the_path_names_another_device() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b, link) = (
            dir.path().join("a"),
            dir.path().join("b"),
            dir.path().join("dev"),
        );
        std::fs::write(&a, b"").unwrap();
        std::fs::write(&b, b"").unwrap();
        std::os::unix::fs::symlink(&a, &link).unwrap();
        let path = link.to_string_lossy().into_owned();
        let opened = DeviceIdentity::of(&path).ok();
        assert_eq!(moved(opened, DeviceIdentity::of(&path)), None);
        std::fs::remove_file(&link).unwrap();
        std::os::unix::fs::symlink(&b, &link).unwrap();
        assert!(
            moved(opened, DeviceIdentity::of(&path))
                .unwrap()
                .contains("another device")
        );
        std::fs::remove_file(&link).unwrap();
        assert!(
            moved(opened, DeviceIdentity::of(&path))
                .unwrap()
                .contains("no longer resolves")
        );
        assert_eq!(moved(None, DeviceIdentity::of(&path)), None);
    }
}
