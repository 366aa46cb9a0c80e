//! Barcode scanners on a serial line (`type = "scanner"`) -> `pos.scans`.
//!
//! A scanner sends one frame per read: `[prefix] [AIM id] data suffix`. The parser checks what it
//! can: AIM symbology identifiers (`]E0` EAN-13, `]C1` GS1-128, `]d2` GS1 DataMatrix...), GTIN check
//! digits (EAN-8, UPC-A, EAN-13, GTIN-14), GS1 element strings (GTIN, batch, expiry, serial, weight,
//! price), and variable-measure (weighed-item) EAN-13 codes whose prefix the store's scale labels
//! use (`02`, `2x`), laid out per config. A frame that fails any check is dead-lettered with the
//! reason; frames never grow beyond `max_frame_bytes`.

use crate::deadletters::{DeadLetters, default_repeat_interval_ms};
use crate::link::{DeviceLink, store};
use crate::serial::{LineSettings, SerialConfig};
use crate::{Driver, DriverError};
use edge_core::component::{ComponentContext, Task};
use edge_core::config::{Problems, join};
use edge_core::{Event, State};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::time::Instant;

/// What the value digits of a variable-measure code mean.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MeasureValue {
    /// Price in minor units (cents).
    Price,
    /// Weight in grams.
    WeightG,
}

/// `[[drivers.weighed_prefixes]]`: one variable-measure EAN-13 layout:
/// `prefix | item | [price check digit] | value | check digit` = 13 digits.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeighedPrefix {
    /// Leading digits, e.g. `"02"` or `"21"` (of the 13-digit code).
    pub prefix: String,
    /// Digits after the prefix that identify the item (PLU).
    pub item_digits: usize,
    #[serde(default)]
    pub price_check_digit: bool,
    pub value: MeasureValue,
}

impl WeighedPrefix {
    fn value_digits(&self) -> usize {
        13usize.saturating_sub(
            self.prefix.len() + self.item_digits + usize::from(self.price_check_digit) + 1,
        )
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScannerConfig {
    pub name: String,
    pub lane: String,
    pub serial: SerialConfig,
    /// Bytes the scanner sends before each code (often empty, sometimes STX `"\u0002"`).
    #[serde(default)]
    pub prefix: String,
    /// Bytes that end a frame (`"\r"`, `"\r\n"`, `"\n"`, ETX `"\u0003"`).
    #[serde(default = "default_suffix")]
    pub suffix: String,
    /// The scanner prefixes AIM symbology identifiers (`]E0`...). Frames without one are refused.
    #[serde(default)]
    pub aim_ids: bool,
    /// Check GTIN check digits (EAN/UPC codes and GS1 AI 01) and the price check digit of
    /// weighed-item codes whose layout has one.
    #[serde(default = "yes")]
    pub validate_gtin: bool,
    /// The scanner sends GS1 element strings without an AIM identifier (a GS1-only scanner):
    /// a frame that starts with AI 00, 01 or 02 and is longer than a plain GTIN is read as one.
    /// A frame that starts with GS (FNC1) is read as one whatever this says.
    #[serde(default)]
    pub gs1_without_aim: bool,
    #[serde(default = "default_max_frame")]
    pub max_frame_bytes: usize,
    /// A frame without its suffix is dropped (and dead-lettered) after this long.
    #[serde(default = "default_frame_timeout")]
    pub frame_timeout_ms: u64,
    #[serde(default = "default_weighed")]
    pub weighed_prefixes: Vec<WeighedPrefix>,
    /// A repeated identical dead letter is written once per this interval, with a count.
    #[serde(default = "default_repeat_interval_ms")]
    pub deadletter_repeat_interval_ms: u64,
}

fn default_suffix() -> String {
    "\r".into()
}
fn yes() -> bool {
    true
}
fn default_max_frame() -> usize {
    4096
}
fn default_frame_timeout() -> u64 {
    1000
}
/// The common US layout: a UPC-A with number system 2, `2 IIIII P VVVV C`, read as EAN-13
/// `02 IIIII P VVVV C`: prefix "02", 5 item digits, a price check digit, a 4-digit price.
fn default_weighed() -> Vec<WeighedPrefix> {
    vec![WeighedPrefix {
        prefix: "02".into(),
        item_digits: 5,
        price_check_digit: true,
        value: MeasureValue::Price,
    }]
}

impl Driver for ScannerConfig {
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
        if self.suffix.is_empty() {
            problems.push(
                join(path, "suffix"),
                "must not be empty: frames need an end (\"\\r\" for most scanners)",
            );
        }
        if !(16..=65536).contains(&self.max_frame_bytes) {
            problems.push(
                join(path, "max_frame_bytes"),
                "must be between 16 and 65536",
            );
        }
        crate::deadletters::validate_repeat_interval(
            path,
            self.deadletter_repeat_interval_ms,
            problems,
        );
        for (i, w) in self.weighed_prefixes.iter().enumerate() {
            let p = format!("{}[{i}]", join(path, "weighed_prefixes"));
            if w.prefix.is_empty() || !w.prefix.bytes().all(|b| b.is_ascii_digit()) {
                problems.push(
                    join(&p, "prefix"),
                    "must be one or more digits, e.g. \"02\" or \"21\"",
                );
            }
            let used = w.prefix.len() + w.item_digits + usize::from(w.price_check_digit) + 1;
            if used >= 13 || w.value_digits() < 3 {
                problems.push(
                    p,
                    format!("prefix ({}) + item_digits ({}) + price check digit + check digit leave {} value digits of 13; at least 3 are needed", w.prefix.len(), w.item_digits, 13usize.saturating_sub(used)),
                );
            }
        }
    }
}

/// Why a frame is not a scan.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("empty frame")]
    Empty,
    #[error(
        "frame of {0} bytes without the configured suffix (line noise or a wrong suffix setting?)"
    )]
    TooLong(usize),
    #[error("frame does not start with the configured prefix")]
    NoPrefix,
    #[error("frame contains control byte 0x{0:02x} (line noise or a wrong baud rate?)")]
    Control(u8),
    #[error("frame has no AIM symbology identifier (]Xn) although aim_ids is set")]
    NoAim,
    #[error("GTIN {0} has a wrong check digit (misread or line noise)")]
    CheckDigit(String),
    #[error(
        "weighed-item code {0} has a wrong price check digit (misread, or a layout in weighed_prefixes that does not match the scale labels)"
    )]
    PriceCheckDigit(String),
    #[error("GS1 element string is malformed: {0}")]
    Gs1(String),
}

impl ScanError {
    pub fn label(&self) -> &'static str {
        match self {
            ScanError::Empty => "empty",
            ScanError::TooLong(_) => "too_long",
            ScanError::NoPrefix => "no_prefix",
            ScanError::Control(_) => "control_byte",
            ScanError::NoAim => "no_aim",
            ScanError::CheckDigit(_) => "check_digit",
            ScanError::PriceCheckDigit(_) => "price_check_digit",
            ScanError::Gs1(_) => "gs1",
        }
    }
}

/// Splits a byte stream into suffix-terminated frames. Memory is bounded by `max`: a frame that
/// grows past it is cut, the rest is skipped up to the next suffix and reported as an overflow.
#[derive(Debug)]
pub struct Framer {
    suffix: Vec<u8>,
    max: usize,
    buf: Vec<u8>,
    /// Bytes skipped of the frame in progress after it overflowed (0: not overflowing).
    skipped: usize,
    /// The last bytes seen while skipping (to find the suffix).
    tail: Vec<u8>,
}

/// A frame, or what is left of one that overflowed or never ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Data(Vec<u8>),
    Overflow { kept: Vec<u8>, total: usize },
}

impl Framer {
    pub fn new(suffix: &[u8], max: usize) -> Framer {
        Framer {
            suffix: if suffix.is_empty() {
                b"\r".to_vec()
            } else {
                suffix.to_vec()
            },
            max: max.max(1),
            buf: Vec::new(),
            skipped: 0,
            tail: Vec::new(),
        }
    }

    pub fn pending(&self) -> bool {
        !self.buf.is_empty() || self.skipped > 0
    }

    pub fn push(&mut self, data: &[u8], out: &mut Vec<Frame>) {
        for &b in data {
            if self.skipped > 0 {
                self.skipped += 1;
                self.tail.push(b);
                if self.tail.len() > self.suffix.len() {
                    self.tail.remove(0);
                }
                if self.tail == self.suffix {
                    out.push(Frame::Overflow {
                        kept: std::mem::take(&mut self.buf),
                        total: self.max + self.skipped - self.suffix.len(),
                    });
                    self.skipped = 0;
                    self.tail.clear();
                }
                continue;
            }
            self.buf.push(b);
            if self.buf.ends_with(&self.suffix) {
                self.buf.truncate(self.buf.len() - self.suffix.len());
                out.push(Frame::Data(std::mem::take(&mut self.buf)));
            } else if self.buf.len() > self.max + self.suffix.len() {
                // Keep `max` bytes for the dead letter, remember the last few to find the suffix.
                let extra = self.buf.split_off(self.max);
                self.skipped = extra.len();
                let keep = self.suffix.len().min(extra.len());
                self.tail = extra[extra.len() - keep..].to_vec();
            }
        }
    }

    /// Takes an unterminated frame (after the frame timeout).
    pub fn take_partial(&mut self) -> Option<Frame> {
        if !self.pending() {
            return None;
        }
        let total = self.buf.len() + self.skipped;
        self.skipped = 0;
        self.tail.clear();
        Some(Frame::Overflow {
            kept: std::mem::take(&mut self.buf),
            total,
        })
    }
}

/// A decoded scan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Scan {
    pub code: String,
    pub symbology: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aim: Option<String>,
    /// GTIN-14 (zero-padded) when the code carries one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gtin: Option<String>,
    #[serde(skip_serializing_if = "Map::is_empty")]
    pub gs1: Map<String, Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub variable_measure: Option<Value>,
}

/// Parses frames per config.
#[derive(Debug, Clone)]
pub struct ScanParser {
    prefix: Vec<u8>,
    aim_ids: bool,
    validate_gtin: bool,
    gs1_without_aim: bool,
    weighed: Vec<WeighedPrefix>,
}

impl ScanParser {
    pub fn new(cfg: &ScannerConfig) -> ScanParser {
        ScanParser {
            prefix: cfg.prefix.as_bytes().to_vec(),
            aim_ids: cfg.aim_ids,
            validate_gtin: cfg.validate_gtin,
            gs1_without_aim: cfg.gs1_without_aim,
            weighed: cfg.weighed_prefixes.clone(),
        }
    }

    pub fn parse(&self, frame: &[u8]) -> Result<Scan, ScanError> {
        let mut f = frame;
        // Scanners that send CRLF with suffix "\r" leave a leading LF on the next frame.
        while let [b'\n' | b'\r', rest @ ..] = f {
            f = rest;
        }
        if !self.prefix.is_empty() {
            f = f
                .strip_prefix(&self.prefix[..])
                .ok_or(ScanError::NoPrefix)?;
        }
        while let [rest @ .., b'\n' | b'\r'] = f {
            f = rest;
        }
        if f.is_empty() {
            return Err(ScanError::Empty);
        }
        // GS (FNC1 separator in GS1 codes) is the one control byte a code may carry.
        if let Some(&c) = f.iter().find(|&&c| (c < 0x20 && c != 0x1D) || c == 0x7F) {
            return Err(ScanError::Control(c));
        }
        let (aim, data) = if f.len() >= 3 && f[0] == b']' {
            (Some(String::from_utf8_lossy(&f[..3]).into_owned()), &f[3..])
        } else if self.aim_ids {
            return Err(ScanError::NoAim);
        } else {
            (None, f)
        };
        if data.is_empty() {
            return Err(ScanError::Empty);
        }
        let text = String::from_utf8_lossy(data).into_owned();
        let digits = data.iter().all(u8::is_ascii_digit);
        let aim_b = aim.as_deref().map(str::as_bytes);
        let gs1_aim = matches!(
            aim_b,
            Some([b']', b'C', b'1'] | [b']', b'd', b'2'] | [b']', b'Q', b'3'] | [b']', b'e', b'0'])
        );
        // Without an AIM id: FNC1 sent as GS before the data, or (a GS1-only scanner) an
        // element string that starts with a GTIN or SSCC and is longer than a plain GTIN.
        let gs1_bare =
            aim_b.is_none() && (data[0] == 0x1D || (self.gs1_without_aim && starts_like_gs1(data)));
        let gs1 = gs1_aim || gs1_bare;
        let mut scan = Scan {
            code: text.replace('\u{1d}', "<GS>"),
            symbology: if gs1_bare {
                "gs1"
            } else {
                symbology(aim_b, data.len(), digits)
            },
            aim,
            gtin: None,
            gs1: Map::new(),
            variable_measure: None,
        };
        if gs1 {
            scan.gs1 = parse_gs1(data)?;
            if let Some(Value::String(g)) = scan.gs1.get("01") {
                if self.validate_gtin && !gtin_ok(g) {
                    return Err(ScanError::CheckDigit(g.clone()));
                }
                scan.gtin = Some(g.clone());
            }
        } else if digits
            && matches!(data.len(), 8 | 12 | 13 | 14)
            && !matches!(
                scan.symbology,
                "code128"
                    | "code39"
                    | "codabar"
                    | "code93"
                    | "qr"
                    | "datamatrix"
                    | "pdf417"
                    | "other"
            )
        {
            // UPC-E carries the check digit of the UPC-A it abbreviates.
            let full = if scan.symbology == "upc_e" {
                upce_to_upca(&text).unwrap_or_else(|| text.clone())
            } else {
                text.clone()
            };
            if self.validate_gtin && !gtin_ok(&full) {
                return Err(ScanError::CheckDigit(text));
            }
            scan.gtin = Some(format!("{full:0>14}"));
            let ean13 = format!("{text:0>13}");
            if text.len() <= 13
                && let Some(w) = self.weighed.iter().find(|w| ean13.starts_with(&w.prefix))
            {
                if self.validate_gtin && !price_check_ok(w, &ean13) {
                    return Err(ScanError::PriceCheckDigit(text));
                }
                scan.variable_measure = Some(variable_measure(w, &ean13));
            }
        }
        Ok(scan)
    }
}

fn symbology(aim: Option<&[u8]>, len: usize, digits: bool) -> &'static str {
    match aim {
        Some([_, b'A', _]) => "code39",
        Some([_, b'C', b'1']) => "gs1_128",
        Some([_, b'C', _]) => "code128",
        Some([_, b'E', b'4']) => "ean8",
        Some([_, b'E', _]) => match len {
            12 => "upc_a",
            8 => "upc_e",
            _ => "ean13",
        },
        Some([_, b'e', _]) => "gs1_databar",
        Some([_, b'd', b'2']) => "gs1_datamatrix",
        Some([_, b'd', _]) => "datamatrix",
        Some([_, b'Q', b'3']) => "gs1_qr",
        Some([_, b'Q', _]) => "qr",
        Some([_, b'I', _]) => "itf",
        Some([_, b'F', _]) => "codabar",
        Some([_, b'G', _]) => "code93",
        Some([_, b'L', _]) => "pdf417",
        Some(_) => "other",
        None if digits => match len {
            8 => "ean8",
            12 => "upc_a",
            13 => "ean13",
            14 => "gtin",
            _ => "unknown",
        },
        None => "unknown",
    }
}

/// Expands an 8-digit UPC-E (number system, 6 digits, check digit) to its 12-digit UPC-A.
pub fn upce_to_upca(e: &str) -> Option<String> {
    let d = e.as_bytes();
    if d.len() != 8 || !d.iter().all(u8::is_ascii_digit) || !matches!(d[0], b'0' | b'1') {
        return None;
    }
    let s = |r: std::ops::Range<usize>| std::str::from_utf8(&d[r]).unwrap_or("");
    let (n, x, c) = (s(0..1), &d[1..7], s(7..8));
    let x = |i: usize| (x[i] as char).to_string();
    let body = match d[6] {
        b'0'..=b'2' => format!("{}{}{}0000{}{}{}", x(0), x(1), x(5), x(2), x(3), x(4)),
        b'3' => format!("{}{}{}00000{}{}", x(0), x(1), x(2), x(3), x(4)),
        b'4' => format!("{}{}{}{}00000{}", x(0), x(1), x(2), x(3), x(4)),
        _ => format!("{}{}{}{}{}0000{}", x(0), x(1), x(2), x(3), x(4), x(5)),
    };
    Some(format!("{n}{body}{c}"))
}

/// GS1 mod-10 check digit over the whole code (EAN-8, UPC-A, EAN-13, GTIN-14).
pub fn gtin_ok(code: &str) -> bool {
    let b = code.as_bytes();
    if !matches!(b.len(), 8 | 12 | 13 | 14) || !b.iter().all(u8::is_ascii_digit) {
        return false;
    }
    let (body, check) = b.split_at(b.len() - 1);
    let sum: u32 = body
        .iter()
        .rev()
        .enumerate()
        .map(|(i, d)| u32::from(d - b'0') * if i % 2 == 0 { 3 } else { 1 })
        .sum();
    (10 - sum % 10) % 10 == u32::from(check[0] - b'0')
}

/// Whether an element string without an AIM id starts like GS1 data: AI 01 or 02 (14 digits)
/// or AI 00 (18 digits), with more after it than a plain GTIN-14 would have.
fn starts_like_gs1(data: &[u8]) -> bool {
    let fixed = match data.get(..2) {
        Some(b"01" | b"02") => 14,
        Some(b"00") => 18,
        _ => return false,
    };
    data.len() > 14 && data.len() >= 2 + fixed && data[2..2 + fixed].iter().all(u8::is_ascii_digit)
}

const TWO_MINUS: [u8; 10] = [0, 2, 4, 6, 8, 9, 1, 3, 5, 7];
const THREE: [u8; 10] = [0, 3, 6, 9, 2, 5, 8, 1, 4, 7];
const FIVE_PLUS: [u8; 10] = [0, 5, 1, 6, 2, 7, 3, 8, 4, 9];
const FIVE_MINUS: [u8; 10] = [0, 5, 9, 4, 8, 3, 7, 2, 6, 1];

/// The digits of `value` as table indexes, when it has exactly `N` and all are digits.
fn digits<const N: usize>(value: &[u8]) -> Option<[usize; N]> {
    let d: [u8; N] = value.try_into().ok()?;
    d.iter()
        .all(u8::is_ascii_digit)
        .then(|| d.map(|b| usize::from(b - b'0')))
}

/// The GS1 price check digit of a 4-digit price or weight (GS1 General Specifications 7.9.3):
/// weights 2-, 2-, 3, 5- per digit, the sum times 3, its last digit.
pub fn price_check_digit_4(value: &[u8]) -> Option<u8> {
    let [a, b, c, e] = digits::<4>(value)?;
    let sum = u32::from(TWO_MINUS[a])
        + u32::from(TWO_MINUS[b])
        + u32::from(THREE[c])
        + u32::from(FIVE_MINUS[e]);
    u8::try_from(sum * 3 % 10).ok()
}

/// The GS1 price check digit of a 5-digit price or weight (GS1 General Specifications 7.9.4):
/// weights 5+, 2-, 5-, 5+, 2- per digit. The check digit sits in a 5- position, so it is the
/// digit whose 5- product brings the sum to a multiple of ten.
pub fn price_check_digit_5(value: &[u8]) -> Option<u8> {
    let [a, b, c, d, e] = digits::<5>(value)?;
    let sum = u32::from(FIVE_PLUS[a])
        + u32::from(TWO_MINUS[b])
        + u32::from(FIVE_MINUS[c])
        + u32::from(FIVE_PLUS[d])
        + u32::from(TWO_MINUS[e]);
    let wanted = ((10 - sum % 10) % 10) as u8;
    FIVE_MINUS
        .iter()
        .position(|&p| p == wanted)
        .and_then(|c| u8::try_from(c).ok())
}

/// Whether the price check digit of a weighed-item code is right. Checked for 4- and 5-digit
/// values (`02 IIIII P VVVV C`, `2x IIII P VVVVV C`); a layout with a shorter value has no
/// GS1 price check digit calculation and is not checked.
fn price_check_ok(w: &WeighedPrefix, ean13: &str) -> bool {
    let n = w.value_digits();
    if !w.price_check_digit || !(4..=5).contains(&n) {
        return true;
    }
    let at = w.prefix.len() + w.item_digits;
    let b = ean13.as_bytes();
    let (Some(&p), Some(v)) = (b.get(at), b.get(at + 1..at + 1 + n)) else {
        return false;
    };
    let expected = if n == 4 {
        price_check_digit_4(v)
    } else {
        price_check_digit_5(v)
    };
    expected == Some(p.wrapping_sub(b'0'))
}

fn variable_measure(w: &WeighedPrefix, ean13: &str) -> Value {
    let item_start = w.prefix.len();
    let item = &ean13[item_start..item_start + w.item_digits];
    let vstart = item_start + w.item_digits + usize::from(w.price_check_digit);
    let value: i64 = ean13[vstart..12].parse().unwrap_or(0);
    let mut v = json!({"prefix": w.prefix, "item": item});
    match w.value {
        MeasureValue::Price => v["price_minor"] = json!(value),
        MeasureValue::WeightG => v["weight_g"] = json!(value),
    }
    v
}

/// Length of the AI at the start of `s` (GS1 General Specifications, by its first two digits).
fn ai_len(s: &[u8]) -> Option<usize> {
    if s.len() < 2 {
        return None;
    }
    Some(match &s[..2] {
        b"23" | b"24" | b"25" | b"40" | b"41" | b"42" => 3,
        b"31" | b"32" | b"33" | b"34" | b"35" | b"36" | b"39" | b"43" | b"70" | b"71" | b"72"
        | b"80" | b"81" | b"82" => 4,
        _ => 2,
    })
}

/// Fixed data lengths of predefined-length AIs.
fn fixed_len(ai: &str) -> Option<usize> {
    let two = ai.get(..2)?;
    Some(match two {
        "00" => 18,
        "01" | "02" | "03" => 14,
        "04" => 16,
        "11" | "12" | "13" | "14" | "15" | "16" | "17" | "18" | "19" => 6,
        "20" => 2,
        "31" | "32" | "33" | "34" | "35" | "36" => 6,
        "41" => 13,
        _ => return None,
    })
}

const MAX_VAR_LEN: usize = 90;

/// Parses a GS1 element string (`01095011010209171719050810ABC123`, FNC1 as GS between
/// variable-length fields; a leading GS/FNC1 is allowed) into AI -> value, adding the decoded
/// meaning of the common AIs (`gtin`, `batch`, `serial`, `expiry`, `best_before`, `net_weight_g`,
/// `price_minor`, `count`).
pub fn parse_gs1(data: &[u8]) -> Result<Map<String, Value>, ScanError> {
    let mut m = Map::new();
    let mut s = data;
    while let [0x1D, rest @ ..] = s {
        s = rest;
    }
    if s.is_empty() {
        return Err(ScanError::Gs1("no element string".into()));
    }
    while !s.is_empty() {
        let n =
            ai_len(s).ok_or_else(|| ScanError::Gs1("truncated application identifier".into()))?;
        if s.len() < n || !s[..n].iter().all(u8::is_ascii_digit) {
            return Err(ScanError::Gs1(format!(
                "{:?} is not an application identifier",
                String::from_utf8_lossy(&s[..n.min(s.len())])
            )));
        }
        let ai = String::from_utf8_lossy(&s[..n]).into_owned();
        s = &s[n..];
        let value: &[u8] = match fixed_len(&ai) {
            Some(len) => {
                if s.len() < len {
                    return Err(ScanError::Gs1(format!(
                        "AI ({ai}) needs {len} characters, {} left",
                        s.len()
                    )));
                }
                let (v, rest) = s.split_at(len);
                s = rest;
                if s.first() == Some(&0x1D) {
                    s = &s[1..];
                }
                v
            }
            None => {
                let end = s.iter().position(|&c| c == 0x1D).unwrap_or(s.len());
                let (v, rest) = s.split_at(end);
                s = rest.get(1..).unwrap_or(&[]);
                if v.len() > MAX_VAR_LEN {
                    return Err(ScanError::Gs1(format!(
                        "AI ({ai}) value longer than {MAX_VAR_LEN}"
                    )));
                }
                v
            }
        };
        if value.iter().any(|&c| c < 0x20) {
            return Err(ScanError::Gs1(format!(
                "AI ({ai}) value holds a control byte"
            )));
        }
        let v = String::from_utf8_lossy(value).into_owned();
        let numeric = value.iter().all(u8::is_ascii_digit);
        match ai.as_str() {
            "01" | "02" if !numeric => {
                return Err(ScanError::Gs1(format!("AI ({ai}) must be 14 digits")));
            }
            "11" | "13" | "15" | "17" => {
                if !numeric {
                    return Err(ScanError::Gs1(format!("AI ({ai}) must be a YYMMDD date")));
                }
                let name = match ai.as_str() {
                    "11" => "production_date",
                    "13" => "packaging_date",
                    "15" => "best_before",
                    _ => "expiry",
                };
                m.insert(
                    name.into(),
                    json!(format!("20{}-{}-{}", &v[..2], &v[2..4], &v[4..6])),
                );
            }
            "10" => {
                m.insert("batch".into(), json!(v));
            }
            "21" => {
                m.insert("serial".into(), json!(v));
            }
            "30" | "37" if numeric => {
                m.insert("count".into(), json!(v.parse::<u64>().unwrap_or(0)));
            }
            a if a.starts_with("310") && numeric => {
                let dec = u32::from(a.as_bytes()[3] - b'0');
                let raw: i64 = v.parse().unwrap_or(0);
                // kg with `dec` decimals -> grams.
                let g = if dec >= 3 {
                    raw / 10_i64.pow(dec - 3)
                } else {
                    raw * 10_i64.pow(3 - dec)
                };
                m.insert("net_weight_g".into(), json!(g));
            }
            a if a.starts_with("392") && numeric => {
                let dec = u32::from(a.as_bytes()[3] - b'0');
                let raw: i64 = v.parse().unwrap_or(0);
                let minor = if dec >= 2 {
                    raw / 10_i64.pow(dec - 2)
                } else {
                    raw * 10_i64.pow(2 - dec)
                };
                m.insert("price_minor".into(), json!(minor));
            }
            _ => {}
        }
        m.insert(ai, json!(v));
    }
    Ok(m)
}

pub fn build(cfg: ScannerConfig, ctx: ComponentContext) -> Task {
    Box::pin(async move {
        let mut dead = DeadLetters::new(
            &ctx,
            "scanner",
            cfg.lane.clone(),
            Duration::from_millis(cfg.deadletter_repeat_interval_ms),
        );
        run(&cfg, &ctx, &mut dead).await;
        dead.flush().await;
        ctx.status.set(State::Stopped, "stopped");
        Ok(())
    })
}

async fn run(cfg: &ScannerConfig, ctx: &ComponentContext, dead: &mut DeadLetters) {
    let mut link = DeviceLink::new(ctx.clone(), "barcode_scanner", cfg.serial.path.clone());
    let parser = ScanParser::new(cfg);
    let settings = cfg.serial.settings(LineSettings::N81_9600);
    let frame_timeout = Duration::from_millis(cfg.frame_timeout_ms);
    let mut seq = 0u64;
    let (mut scans, mut rejected) = (0u64, 0u64);
    while !ctx.shutdown.intake().is_cancelled() {
        let mut port = match cfg.serial.open(LineSettings::N81_9600) {
            Ok(p) => p,
            Err(e) => {
                if !link.down_and_wait(e).await {
                    return;
                }
                continue;
            }
        };
        link.up(format!(
            "reading scans from {} ({settings})",
            cfg.serial.path
        ))
        .await;
        let mut framer = Framer::new(cfg.suffix.as_bytes(), cfg.max_frame_bytes);
        let mut buf = [0u8; 1024];
        let mut last_byte = Instant::now();
        let why = loop {
            let mut frames = Vec::new();
            let summaries_due = dead.next_due();
            tokio::select! {
                _ = ctx.shutdown.intake().cancelled() => return,
                r = port.read(&mut buf) => match r {
                    Ok(0) => break "the serial port reported end of file (scanner unplugged?)".to_string(),
                    Ok(n) => {
                        last_byte = Instant::now();
                        framer.push(&buf[..n], &mut frames);
                    }
                    Err(e) => break format!("reading {} failed: {e} (scanner unplugged?)", cfg.serial.path),
                },
                _ = tokio::time::sleep_until(last_byte + frame_timeout), if framer.pending() => {
                    frames.extend(framer.take_partial());
                }
                _ = tokio::time::sleep_until(summaries_due.unwrap_or_else(Instant::now)), if summaries_due.is_some() => {}
            }
            // Summaries of repeated dead letters whose interval is over.
            let mut events = dead.due();
            if frames.is_empty() && events.is_empty() {
                continue;
            }
            let now = edge_core::time::now_ms();
            for f in frames {
                match f {
                    Frame::Data(d) => match parser.parse(&d) {
                        Ok(s) => {
                            seq += 1;
                            scans += 1;
                            events.push(scan_event(ctx, cfg, &s, now, seq));
                        }
                        Err(e) => {
                            rejected += 1;
                            events.extend(dead.admit(
                                e.label(),
                                format!("scanner frame refused: {e}"),
                                &d,
                            ));
                        }
                    },
                    Frame::Overflow { kept, total } => {
                        rejected += 1;
                        let e = ScanError::TooLong(total);
                        events.extend(dead.admit(
                            e.label(),
                            format!("scanner frame refused: {e}"),
                            &kept,
                        ));
                    }
                }
            }
            match store(ctx, events).await {
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(e) => ctx
                    .status
                    .set(State::Degraded, format!("scans could not be stored: {e}")),
            }
            ctx.status.field("scans", scans);
            ctx.status.field("rejected_frames", rejected);
        };
        drop(port);
        if !link.down_and_wait(why).await {
            return;
        }
    }
}

fn scan_event(ctx: &ComponentContext, cfg: &ScannerConfig, s: &Scan, ts: i64, seq: u64) -> Event {
    let id = format!("scan:{}:{ts}:{seq}", cfg.name);
    let mut v = serde_json::to_value(s).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        for (k, val) in [
            ("schema", json!("pos.scan/1")),
            ("event_id", json!(id)),
            ("store", json!(&*ctx.store_id)),
            ("lane", json!(cfg.lane)),
            ("device", json!(cfg.name)),
            ("ts", json!(ts)),
            ("valid", json!(true)),
        ] {
            m.insert(k.into(), val);
        }
    }
    Event::new("pos.scans", serde_json::to_vec(&v).unwrap_or_default())
        .with_event_ts(ts)
        .with_key(cfg.lane.clone())
        .with_source(cfg.name.clone())
        .with_event_id(id)
        .with_schema("pos.scan/1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> ScannerConfig {
        ScannerConfig {
            name: "s".into(),
            lane: "1".into(),
            serial: SerialConfig::new("/dev/null"),
            prefix: String::new(),
            suffix: "\r".into(),
            aim_ids: false,
            validate_gtin: true,
            max_frame_bytes: 64,
            frame_timeout_ms: 1000,
            weighed_prefixes: default_weighed(),
            gs1_without_aim: false,
            deadletter_repeat_interval_ms: default_repeat_interval_ms(),
        }
    }

    #[test]
    fn gtin_check_digits() {
        assert!(gtin_ok("4006381333931"));
        assert!(gtin_ok("036000291452"));
        assert!(gtin_ok("96385074"));
        assert!(gtin_ok("10614141000415"));
        assert!(!gtin_ok("4006381333932"));
        assert!(!gtin_ok("40063813339"));
        assert_eq!(upce_to_upca("04252614").as_deref(), Some("042100005264"));
        assert_eq!(upce_to_upca("01234565").as_deref(), Some("012345000065"));
        assert_eq!(upce_to_upca("21234565"), None);
        let p = ScanParser::new(&cfg());
        let s = p.parse(b"]E004252614").unwrap();
        assert_eq!(
            (s.symbology, s.gtin.as_deref()),
            ("upc_e", Some("00042100005264"))
        );
        assert_eq!(p.parse(b"]E004252615").unwrap_err().label(), "check_digit");
        assert_eq!(p.parse(b"]E496385074").unwrap().symbology, "ean8");
    }

    #[test]
    fn ean_upc_and_aim_ids() {
        let p = ScanParser::new(&cfg());
        let s = p.parse(b"4006381333931").unwrap();
        assert_eq!(
            (s.symbology, s.gtin.as_deref()),
            ("ean13", Some("04006381333931"))
        );
        let s = p.parse(b"]E0036000291452").unwrap();
        assert_eq!(s.symbology, "upc_a");
        assert_eq!(s.aim.as_deref(), Some("]E0"));
        assert_eq!(
            p.parse(b"4006381333932").unwrap_err().label(),
            "check_digit"
        );
        assert_eq!(
            p.parse(b"\n4006381333931").unwrap().code,
            "4006381333931",
            "CRLF leftovers"
        );
        assert_eq!(p.parse(b"40\x0763").unwrap_err().label(), "control_byte");
        let aim = ScanParser::new(&ScannerConfig {
            aim_ids: true,
            ..cfg()
        });
        assert_eq!(aim.parse(b"4006381333931").unwrap_err(), ScanError::NoAim);
        let s = ScanParser::new(&cfg()).parse(b"]C0ABC-123").unwrap();
        assert_eq!((s.symbology, s.gtin), ("code128", None));
    }

    #[test]
    fn gs1_element_strings_decode() {
        let p = ScanParser::new(&cfg());
        let s = p
            .parse(b"]C1011061414100041517251231103A-7\x1d3102012345\x1d392212990")
            .unwrap();
        assert_eq!(s.symbology, "gs1_128");
        assert_eq!(s.gtin.as_deref(), Some("10614141000415"));
        assert_eq!(s.gs1["expiry"], "2025-12-31");
        assert_eq!(s.gs1["batch"], "3A-7");
        assert_eq!(s.gs1["net_weight_g"], 123_450);
        assert_eq!(s.gs1["price_minor"], 12_990);
        assert_eq!(s.gs1["3102"], "012345");
        let s = p.parse(b"]d20110614141000415\x1d21SN-7").unwrap();
        assert_eq!(
            (s.symbology, s.gs1["serial"].as_str()),
            ("gs1_datamatrix", Some("SN-7"))
        );
        assert_eq!(
            p.parse(b"]C10110614141000416").unwrap_err().label(),
            "check_digit"
        );
        assert_eq!(p.parse(b"]C1017").unwrap_err().label(), "gs1");
        assert_eq!(p.parse(b"]C1AB12").unwrap_err().label(), "gs1");
    }

    #[test]
    fn weighed_item_prefixes() {
        let p = ScanParser::new(&cfg());
        // UPC-A 2 01234 8 0499 C: item 01234, price 4.99 (price check digit 8).
        let body = "20123480499";
        let code = with_check(body);
        let s = p.parse(code.as_bytes()).unwrap();
        let vm = s.variable_measure.unwrap();
        assert_eq!(vm["item"], "01234");
        assert_eq!(vm["price_minor"], 499);
        let eu = ScanParser::new(&ScannerConfig {
            weighed_prefixes: vec![WeighedPrefix {
                prefix: "21".into(),
                item_digits: 5,
                price_check_digit: false,
                value: MeasureValue::WeightG,
            }],
            ..cfg()
        });
        let code = with_check("210004201250");
        let vm = eu.parse(code.as_bytes()).unwrap().variable_measure.unwrap();
        assert_eq!(vm["item"], "00042");
        assert_eq!(vm["weight_g"], 1250);
    }

    /// Issue 11 item 8: the price check digit of `02 IIIII P VVVV C` codes is verified
    /// (GS1 7.9.3; 2875 -> 9 is the worked example), for the layouts that have one.
    #[test]
    fn price_check_digits_are_verified() {
        assert_eq!(price_check_digit_4(b"2875"), Some(9));
        assert_eq!(price_check_digit_4(b"0499"), Some(8));
        assert_eq!(price_check_digit_4(b"0000"), Some(0));
        assert_eq!(price_check_digit_4(b"12x4"), None);
        assert_eq!(price_check_digit_4(b"123"), None);
        let p = ScanParser::new(&cfg());
        let good = with_check("020123492875");
        let vm = p.parse(good.as_bytes()).unwrap().variable_measure.unwrap();
        assert_eq!(vm["price_minor"], 2875);
        // The same code with another price check digit (and a GTIN check digit that fits it):
        // a misread price.
        let bad = with_check("020123452875");
        assert_eq!(
            p.parse(bad.as_bytes()).unwrap_err(),
            ScanError::PriceCheckDigit(bad.clone())
        );
        assert_eq!(
            p.parse(bad.as_bytes()).unwrap_err().label(),
            "price_check_digit"
        );
        // validate_gtin = false checks neither.
        let lax = ScanParser::new(&ScannerConfig {
            validate_gtin: false,
            ..cfg()
        });
        assert!(lax.parse(bad.as_bytes()).is_ok());
        // A layout without a price check digit is not checked for one.
        let eu = ScanParser::new(&ScannerConfig {
            weighed_prefixes: vec![WeighedPrefix {
                prefix: "22".into(),
                item_digits: 5,
                price_check_digit: false,
                value: MeasureValue::Price,
            }],
            ..cfg()
        });
        let code = with_check("220004201250");
        assert_eq!(
            eu.parse(code.as_bytes()).unwrap().variable_measure.unwrap()["price_minor"],
            1250
        );
    }

    /// The 5-digit price check digit (GS1 7.9.4; 14685 -> 6 is the worked example) is verified
    /// for a `22 IIII P VVVVV C` layout, and both calculations catch every single-digit misread
    /// of the value (each weight is a permutation of the digits).
    #[test]
    fn five_digit_price_check_digits_are_verified() {
        assert_eq!(price_check_digit_5(b"14685"), Some(6));
        assert_eq!(price_check_digit_5(b"00000"), Some(0));
        assert_eq!(price_check_digit_5(b"1468"), None);
        assert_eq!(price_check_digit_5(b"1468x"), None);
        let p = ScanParser::new(&ScannerConfig {
            weighed_prefixes: vec![WeighedPrefix {
                prefix: "22".into(),
                item_digits: 4,
                price_check_digit: true,
                value: MeasureValue::Price,
            }],
            ..cfg()
        });
        let good = with_check("220042614685");
        let vm = p.parse(good.as_bytes()).unwrap().variable_measure.unwrap();
        assert_eq!(
            (vm["item"].as_str(), vm["price_minor"].as_i64()),
            (Some("0042"), Some(14685))
        );
        let bad = with_check("220042714685");
        assert_eq!(
            p.parse(bad.as_bytes()).unwrap_err(),
            ScanError::PriceCheckDigit(bad.clone())
        );
        for (n, check) in [
            (4, price_check_digit_4 as fn(&[u8]) -> Option<u8>),
            (5, price_check_digit_5),
        ] {
            for value in (0..10u32.pow(n)).step_by(7) {
                let digits = format!("{value:0w$}", w = n as usize).into_bytes();
                let right = check(&digits);
                for at in 0..digits.len() {
                    for other in b'0'..=b'9' {
                        let mut misread = digits.clone();
                        if misread[at] == other {
                            continue;
                        }
                        misread[at] = other;
                        assert_ne!(check(&misread), right, "{n}-digit {value}: misread at {at}");
                    }
                }
            }
        }
    }

    /// Issue 11 item 8: GS1 element strings without an AIM prefix are detected (FNC1 as GS
    /// always; a leading AI 01/02/00 on a scanner configured with `gs1_without_aim`), and the
    /// AI 01 GTIN check digit is verified.
    #[test]
    fn gs1_without_an_aim_prefix_is_detected_and_ai_01_validated() {
        let p = ScanParser::new(&cfg());
        let s = p.parse(b"\x1d010950110102091717171231").unwrap();
        assert_eq!(s.symbology, "gs1");
        assert_eq!(s.gtin.as_deref(), Some("09501101020917"));
        assert_eq!(s.gs1["expiry"], "2017-12-31");
        assert_eq!(
            p.parse(b"\x1d010950110102091817171231").unwrap_err(),
            ScanError::CheckDigit("09501101020918".into())
        );
        // Without the setting, digits alone stay an unknown code (not every long number is GS1).
        let s = p.parse(b"010950110102091717171231").unwrap();
        assert_eq!((s.symbology, s.gtin), ("unknown", None));
        let only = ScanParser::new(&ScannerConfig {
            gs1_without_aim: true,
            ..cfg()
        });
        let s = only.parse(b"010950110102091717171231").unwrap();
        assert_eq!(s.symbology, "gs1");
        assert_eq!(s.gtin.as_deref(), Some("09501101020917"));
        assert_eq!(
            only.parse(b"010950110102091810ABC").unwrap_err().label(),
            "check_digit",
            "a bad GTIN in a bare element string is refused"
        );
        // Plain GTINs and other codes are unchanged on a GS1-only scanner.
        assert_eq!(only.parse(b"4006381333931").unwrap().symbology, "ean13");
        assert_eq!(only.parse(b"10614141000415").unwrap().symbology, "gtin");
        assert_eq!(only.parse(b"SKU-42").unwrap().symbology, "unknown");
    }

    fn with_check(body: &str) -> String {
        (0..10)
            .map(|d| format!("{body}{d}"))
            .find(|c| gtin_ok(c))
            .unwrap()
    }

    #[test]
    fn framer_is_bounded_and_resynchronises() {
        let mut f = Framer::new(b"\r\n", 16);
        let mut out = Vec::new();
        f.push(b"123\r\n45", &mut out);
        f.push(b"6\r\n", &mut out);
        let mut long = vec![b'x'; 10_000];
        long.extend_from_slice(b"\r\n789\r\n");
        f.push(&long, &mut out);
        assert_eq!(out[0], Frame::Data(b"123".to_vec()));
        assert_eq!(out[1], Frame::Data(b"456".to_vec()));
        assert!(
            matches!(&out[2], Frame::Overflow { kept, total: 10_000 } if kept.len() == 16),
            "{:?}",
            out[2]
        );
        assert_eq!(out[3], Frame::Data(b"789".to_vec()));
        f.push(b"abc", &mut out);
        assert!(f.pending());
        assert_eq!(
            f.take_partial(),
            Some(Frame::Overflow {
                kept: b"abc".to_vec(),
                total: 3
            })
        );
    }
}
