//! Customer pole displays (`type = "customer_display"`): a sink that shows offers to the shopper at
//! a lane, then restores the idle text.
//!
//! It reads `offers.decisions` (or another stream) from a durable cursor, so an offer is shown at
//! most once even across restarts, and the backlog of a long outage is not replayed: offers older
//! than `max_age_ms` are skipped. Only offers for the configured lane are shown, at most one per
//! `min_interval_ms` (the others are counted as rate-limited); each stays `show_ms`, then the idle
//! text comes back.
//!
//! Command sets: CD5220 (`ESC Q A text CR` / `ESC Q B text CR`) and Epson ESC/POS customer displays
//! (DM-D: `CLR`, text, `US $ 1 2`, text). 2x20 VFDs; `columns` for other widths.

use crate::link::DeviceLink;
use crate::serial::{LineSettings, SerialConfig};
use crate::{Driver, DriverError};
use edge_core::component::{ComponentContext, Task};
use edge_core::config::{Problems, check_stream_name, join};
use edge_core::cursor::{CursorReader, Start};
use edge_core::log::ReadLimits;
use edge_core::{Record, State};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DisplayCommandSet {
    Cd5220,
    Epson,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomerDisplayConfig {
    pub name: String,
    /// Offers addressed to this lane are shown.
    pub lane: String,
    pub serial: SerialConfig,
    pub command_set: DisplayCommandSet,
    #[serde(default = "default_columns")]
    pub columns: usize,
    #[serde(default = "default_stream")]
    pub stream: String,
    /// Payload field holding the lane an offer is for.
    #[serde(default = "default_lane_field")]
    pub lane_field: String,
    #[serde(default = "default_show")]
    pub show_ms: u64,
    #[serde(default = "default_interval")]
    pub min_interval_ms: u64,
    #[serde(default = "default_max_age")]
    pub max_age_ms: u64,
    /// The two lines shown when no offer is (the POS's own idle text, e.g. the store name).
    #[serde(default = "default_idle")]
    pub idle_lines: Vec<String>,
}

fn default_columns() -> usize {
    20
}
fn default_stream() -> String {
    "offers.decisions".into()
}
fn default_lane_field() -> String {
    "lane".into()
}
fn default_show() -> u64 {
    8000
}
fn default_interval() -> u64 {
    30_000
}
fn default_max_age() -> u64 {
    60_000
}
fn default_idle() -> Vec<String> {
    vec!["WELCOME".into(), String::new()]
}

impl Driver for CustomerDisplayConfig {
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
        if let Err(e) = check_stream_name(&self.stream) {
            problems.push(join(path, "stream"), e);
        }
        if !(8..=80).contains(&self.columns) {
            problems.push(join(path, "columns"), "must be between 8 and 80");
        }
        if self.idle_lines.len() > 2 {
            problems.push(join(path, "idle_lines"), "a pole display has two lines");
        }
        if !(100..=600_000).contains(&self.show_ms) {
            problems.push(join(path, "show_ms"), "must be between 100 and 600000");
        }
        if self.max_age_ms == 0 {
            problems.push(join(path, "max_age_ms"), "must be above 0");
        }
    }
}

/// The two lines an offer shows: `display_lines` (array), else `display_text` / `headline` /
/// `text` split at a newline, else `title` + `price_text`.
pub fn offer_lines(v: &Value) -> Option<[String; 2]> {
    if let Some(a) = v.get("display_lines").and_then(Value::as_array) {
        let l = |i: usize| a.get(i).and_then(Value::as_str).unwrap_or("").to_string();
        return Some([l(0), l(1)]);
    }
    for k in ["display_text", "headline", "text"] {
        if let Some(s) = v.get(k).and_then(Value::as_str) {
            let mut it = s.splitn(2, '\n');
            return Some([
                it.next().unwrap_or("").to_string(),
                it.next().unwrap_or("").to_string(),
            ]);
        }
    }
    let title = v.get("title").and_then(Value::as_str)?;
    let price = v.get("price_text").and_then(Value::as_str).unwrap_or("");
    Some([title.to_string(), price.to_string()])
}

/// ASCII only (VFD character sets differ above 0x7F; common accents are folded), cut or padded.
fn fit(s: &str, cols: usize) -> Vec<u8> {
    let mut out: Vec<u8> = s
        .chars()
        .map(|c| match c {
            ' '..='~' => c as u8,
            'à' | 'á' | 'â' | 'ä' | 'ã' | 'å' => b'a',
            'À' | 'Á' | 'Â' | 'Ä' | 'Ã' | 'Å' => b'A',
            'è' | 'é' | 'ê' | 'ë' => b'e',
            'È' | 'É' | 'Ê' | 'Ë' => b'E',
            'ì' | 'í' | 'î' | 'ï' => b'i',
            'ò' | 'ó' | 'ô' | 'ö' | 'õ' => b'o',
            'Ò' | 'Ó' | 'Ô' | 'Ö' | 'Õ' => b'O',
            'ù' | 'ú' | 'û' | 'ü' => b'u',
            'Ù' | 'Ú' | 'Û' | 'Ü' => b'U',
            'ç' => b'c',
            'ñ' => b'n',
            'ß' => b's',
            '€' => b'E',
            _ => b'?',
        })
        .take(cols)
        .collect();
    out.resize(cols, b' ');
    out
}

/// The bytes that put two lines on the display.
pub fn screen(set: DisplayCommandSet, cols: usize, l1: &str, l2: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 * cols + 16);
    match set {
        DisplayCommandSet::Cd5220 => {
            b.extend_from_slice(b"\x1b@\x0c\x1bQA");
            b.extend(fit(l1, cols));
            b.extend_from_slice(b"\r\x1bQB");
            b.extend(fit(l2, cols));
            b.push(b'\r');
        }
        DisplayCommandSet::Epson => {
            b.extend_from_slice(b"\x1b@\x0c\x0b");
            b.extend(fit(l1, cols));
            b.extend_from_slice(b"\x1f\x24\x01\x02");
            b.extend(fit(l2, cols));
        }
    }
    b
}

pub fn build(cfg: CustomerDisplayConfig, ctx: ComponentContext) -> Task {
    Box::pin(async move {
        let r = run(&cfg, &ctx).await;
        ctx.status.set(State::Stopped, "stopped");
        r.map_err(|e| e.into())
    })
}

struct Shown {
    until: Option<Instant>,
    last: Option<Instant>,
    shown: u64,
    rate_limited: u64,
    stale: u64,
}

async fn run(
    cfg: &CustomerDisplayConfig,
    ctx: &ComponentContext,
) -> Result<(), edge_core::log::LogError> {
    // First start: offers from before the display existed are not replayed.
    let mut offers = CursorReader::open(
        ctx.log.clone(),
        format!("display.{}", cfg.name),
        cfg.stream.clone(),
        Start::Latest,
    )
    .await?
    .with_limits(ReadLimits {
        max_records: 200,
        max_bytes: 1 << 20,
    });
    let mut link = DeviceLink::new(ctx.clone(), "customer_display", cfg.serial.path.clone());
    let settings = cfg.serial.settings(LineSettings::N81_9600);
    let idle = |i: usize| cfg.idle_lines.get(i).cloned().unwrap_or_default();
    let idle_screen = screen(cfg.command_set, cfg.columns, &idle(0), &idle(1));
    let mut st = Shown {
        until: None,
        last: None,
        shown: 0,
        rate_limited: 0,
        stale: 0,
    };
    while !ctx.shutdown.all().is_cancelled() {
        let mut port = match cfg.serial.open(LineSettings::N81_9600) {
            Ok(p) => p,
            Err(e) => {
                if !link.down_and_wait(e).await {
                    break;
                }
                continue;
            }
        };
        if let Err(e) = port.write_all(&idle_screen).await {
            if !link
                .down_and_wait(format!("writing to the display failed: {e}"))
                .await
            {
                break;
            }
            continue;
        }
        st.until = None;
        link.up(format!(
            "showing offers for lane {} on {} ({settings})",
            cfg.lane, cfg.serial.path
        ))
        .await;
        let mut scratch = [0u8; 64];
        let why = loop {
            // Offers first, then wait for a change, the end of a shown offer, or the device.
            if let Some(batch) = offers.try_batch().await? {
                let mut out = Vec::new();
                for r in &batch.records {
                    if let Some(bytes) = consider(cfg, r, &mut st) {
                        out = bytes;
                    }
                }
                offers.commit(batch.next_seq).await?;
                if !out.is_empty() {
                    if let Err(e) = port.write_all(&out).await {
                        break format!("writing to the display failed: {e} (unplugged?)");
                    }
                    st.until = Some(Instant::now() + Duration::from_millis(cfg.show_ms));
                }
                ctx.status.field("offers_shown", st.shown);
                ctx.status.field("offers_rate_limited", st.rate_limited);
                ctx.status.field("offers_stale", st.stale);
                continue;
            }
            let until = st.until;
            tokio::select! {
                _ = ctx.shutdown.all().cancelled() => {
                    // Leave the display as the store expects it.
                    port.write_all(&idle_screen).await.ok();
                    return Ok(());
                }
                open = offers.wait_for_commit() => {
                    if !open {
                        return Ok(()); // the log is closed
                    }
                }
                _ = tokio::time::sleep_until(until.unwrap_or_else(Instant::now)), if until.is_some() => {
                    st.until = None;
                    if let Err(e) = port.write_all(&idle_screen).await {
                        break format!("writing to the display failed: {e} (unplugged?)");
                    }
                }
                r = port.read(&mut scratch) => match r {
                    // Displays do not talk; a read ending means the port went away.
                    Ok(0) | Err(_) => break format!("the display port {} closed (unplugged?)", cfg.serial.path),
                    Ok(_) => {}
                }
            }
        };
        drop(port);
        if !link.down_and_wait(why).await {
            break;
        }
    }
    Ok(())
}

/// Decides whether an offer record is shown; returns the screen bytes if so.
fn consider(cfg: &CustomerDisplayConfig, r: &Record, st: &mut Shown) -> Option<Vec<u8>> {
    let v: Value = serde_json::from_slice(&r.event.payload).ok()?;
    let lane = v.get(&cfg.lane_field).map(|l| match l {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    })?;
    if lane != cfg.lane {
        return None;
    }
    let lines = offer_lines(&v)?;
    let age = edge_core::time::now_ms() - r.event.event_ts_ms;
    if age > cfg.max_age_ms as i64 {
        st.stale += 1;
        return None;
    }
    let now = Instant::now();
    if let Some(last) = st.last
        && now.duration_since(last) < Duration::from_millis(cfg.min_interval_ms)
    {
        st.rate_limited += 1;
        return None;
    }
    st.last = Some(now);
    st.shown += 1;
    Some(screen(cfg.command_set, cfg.columns, &lines[0], &lines[1]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn screens_for_both_command_sets() {
        let s = screen(DisplayCommandSet::Cd5220, 20, "2 FOR 5.00", "Café crème");
        assert_eq!(
            s,
            [
                &b"\x1b@\x0c\x1bQA2 FOR 5.00          \r"[..],
                &b"\x1bQBCafe creme          \r"[..]
            ]
            .concat()
        );
        let s = screen(
            DisplayCommandSet::Epson,
            20,
            "A",
            "a very long second line that is cut",
        );
        assert_eq!(
            s,
            [
                &b"\x1b@\x0c\x0bA                   "[..],
                &b"\x1f\x24\x01\x02a very long second l"[..]
            ]
            .concat()
        );
    }

    #[test]
    fn offer_text_fields() {
        assert_eq!(
            offer_lines(&json!({"display_lines": ["A", "B"]})),
            Some(["A".into(), "B".into()])
        );
        assert_eq!(
            offer_lines(&json!({"display_text": "A\nB"})),
            Some(["A".into(), "B".into()])
        );
        assert_eq!(
            offer_lines(&json!({"title": "Cola", "price_text": "0.99"})),
            Some(["Cola".into(), "0.99".into()])
        );
        assert_eq!(offer_lines(&json!({"x": 1})), None);
    }
}
