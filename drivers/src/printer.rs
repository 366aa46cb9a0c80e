//! Receipt-printer drivers: the serial tap (`escpos_tap`) sniffs the POS-to-printer line; the
//! pass-through proxy (`printer_proxy`) listens where the POS prints (TCP 9100), forwards every byte
//! unchanged to the real printer (TCP or serial) and relays the printer's replies (DLE EOT, GS r,
//! ASB) back, so that printing and printer errors work exactly as before.
//!
//! Both segment the stream into receipts and write, per receipt: the raw receipt to
//! `pos.receipts` (always, with the parse outcome and the reason when it failed), the transaction to
//! `pos.transactions` when the template parsed it, and loss-prevention exceptions to
//! `pos.exceptions`. Bytes that form no receipt are dead-lettered with a reason.
//!
//! Ack after commit (PRODUCT.md guarantee 1) for the proxy: the byte that completes a receipt's cut
//! command, and everything after it, is forwarded only once the receipt's records are durable, so the
//! POS sees a finished print only for a stored receipt. If storing fails or takes longer than
//! `store_timeout_ms`, the bytes are forwarded anyway (printing never depends on the agent's disk),
//! and the miss is counted and shown in status.
//!
//! The proxy also reads what the printer says about itself, the `DLE EOT` replies and ASB
//! messages on their way to the POS, and probes the printer between jobs (`probe_interval_ms`),
//! so paper-out, cover-open and a printer that was switched off show in status, metrics and
//! `agent.device` records while no POS prints.
//!
//! This module holds the configs and the receipt processing both share; `tap` runs the serial
//! tap, `proxy` the proxy's connections (relay and probe), `health` the printer's state and faults.
//!
//! Who may print through the proxy: POS addresses in `allow` (default: any). One POS connection
//! is served at a time, like a printer. One more may wait for it (a POS that closes and at once
//! reconnects for the next job is served in turn); any further one is refused at once (closed,
//! logged, counted as `busy`) instead of waiting unanswered in the listen backlog. A connection
//! with no byte in either direction for `idle_timeout_ms` is closed, so a vanished or idle
//! client holds the printer for at most that long.

use crate::deadletters::{
    DEFAULT_REPEAT_INTERVAL_MS, DeadLetters, default_repeat_interval_ms, validate_repeat_interval,
};
use crate::escpos::{CodePage, Receipt, Segmenter, SegmenterConfig};
use crate::link::fnv64;
use crate::receipt::{self, LineKind, Template, TemplateConfig, TxContext};
use crate::serial::SerialConfig;
use crate::{Driver, DriverError};
use edge_core::component::{ComponentContext, Task};
use edge_core::config::{Problems, join};
use edge_core::event::base64_encode;
use edge_core::{Event, State};
use regex::Regex;
use serde::{Deserialize, Serialize};
use serde_json::json;
use std::net::IpAddr;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

mod health;
mod proxy;
mod tap;

/// The receipt template of a printer driver, its problems in one sentence for the build error.
fn compile_template(t: &TemplateConfig) -> Result<Template, String> {
    t.compile().map_err(|e| {
        format!(
            "template: {}",
            e.into_iter()
                .map(|(f, m)| format!("{f} {m}"))
                .collect::<Vec<_>>()
                .join("; ")
        )
    })
}

pub use proxy::build_proxy;
pub use tap::build_tap;

/// `[drivers.receipt]`: how the byte stream is cut into receipts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiptOptions {
    /// Code page in force after `ESC @` (`cp437` is the ESC/POS power-on default).
    pub code_page: String,
    /// A receipt in progress ends after this long without bytes (POS that never cut).
    pub idle_gap_ms: u64,
    /// `ESC @` ends the receipt in progress (most POS send it before each receipt).
    pub split_on_init: bool,
    /// A line matching this starts a new receipt.
    pub begin_pattern: Option<String>,
    /// A line matching this ends the receipt.
    pub end_pattern: Option<String>,
    /// A receipt is closed (flagged `size_limit`) after this many bytes without an end.
    pub max_receipt_bytes: u64,
    /// Raw bytes kept per receipt in `pos.receipts` (`raw_truncated` says when more arrived).
    pub raw_keep_bytes: usize,
    /// A drawer kick this soon after a cash sale belongs to that sale (POS that kick after the cut).
    pub drawer_grace_ms: u64,
}

impl Default for ReceiptOptions {
    fn default() -> Self {
        ReceiptOptions {
            code_page: "cp437".into(),
            idle_gap_ms: 2000,
            split_on_init: true,
            begin_pattern: None,
            end_pattern: None,
            max_receipt_bytes: 1 << 20,
            raw_keep_bytes: 64 << 10,
            drawer_grace_ms: 5000,
        }
    }
}

impl ReceiptOptions {
    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if CodePage::from_name(&self.code_page).is_none() {
            problems.push(
                join(path, "code_page"),
                format!("{:?} is not a known code page (cp437, cp850, cp858, windows-1252, iso-8859-15, shift_jis, ...)", self.code_page),
            );
        }
        for (field, p) in [
            ("begin_pattern", &self.begin_pattern),
            ("end_pattern", &self.end_pattern),
        ] {
            if let Some(p) = p
                && let Err(e) = Regex::new(p)
            {
                problems.push(
                    join(path, field),
                    format!("is not a valid regular expression: {e}"),
                );
            }
        }
        if !(50..=600_000).contains(&self.idle_gap_ms) {
            problems.push(join(path, "idle_gap_ms"), "must be between 50 and 600000");
        }
        if self.max_receipt_bytes < 1024 {
            problems.push(join(path, "max_receipt_bytes"), "must be at least 1024");
        }
        if self.raw_keep_bytes > 1 << 20 {
            problems.push(
                join(path, "raw_keep_bytes"),
                "must be at most 1048576 (records stay small)",
            );
        }
    }

    pub fn segmenter(&self) -> SegmenterConfig {
        SegmenterConfig {
            split_on_init: self.split_on_init,
            begin_pattern: self
                .begin_pattern
                .as_deref()
                .and_then(|p| Regex::new(p).ok()),
            end_pattern: self.end_pattern.as_deref().and_then(|p| Regex::new(p).ok()),
            max_receipt_bytes: self.max_receipt_bytes,
            raw_keep_bytes: self.raw_keep_bytes,
            code_page: CodePage::from_name(&self.code_page).unwrap_or(CodePage::DEFAULT),
            ..SegmenterConfig::default()
        }
    }
}

/// `type = "escpos_tap"`: a read-only tap on the serial line between POS and printer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EscposTapConfig {
    pub name: String,
    /// Lane / terminal id written into every record.
    pub lane: String,
    pub serial: SerialConfig,
    #[serde(default)]
    pub receipt: ReceiptOptions,
    #[serde(default)]
    pub template: TemplateConfig,
    /// A repeated identical dead letter is written once per this interval, with a count.
    #[serde(default = "default_repeat_interval_ms")]
    pub deadletter_repeat_interval_ms: u64,
}

/// The real printer behind the proxy: exactly one of `tcp` or `serial`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct PrinterUpstream {
    /// `host:port` of a network printer, e.g. `192.0.2.10:9100`.
    pub tcp: Option<String>,
    pub serial: Option<SerialConfig>,
}

/// `type = "printer_proxy"`: TCP pass-through in front of the real printer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrinterProxyConfig {
    pub name: String,
    pub lane: String,
    /// Where the POS prints to.
    #[serde(default = "default_listen")]
    pub listen: String,
    pub printer: PrinterUpstream,
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// How long the end of a receipt waits for its records to be durable before it is forwarded
    /// anyway.
    #[serde(default = "default_store_timeout")]
    pub store_timeout_ms: u64,
    /// POS addresses allowed to print (IPv4 or IPv6, e.g. `["10.0.3.21"]`); empty: any. A
    /// connection from another address is closed at once, logged and counted.
    #[serde(default)]
    pub allow: Vec<String>,
    /// A POS connection with no byte in either direction for this long is closed, so a POS that
    /// went away without closing (or an idle client) cannot hold the printer.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_ms: u64,
    /// Between jobs the printer is probed this often (a network printer: connect and `DLE EOT
    /// 1..4`; a serial one: open its port), so a printer switched off or out of paper shows
    /// while no POS prints.
    #[serde(default = "default_probe_interval")]
    pub probe_interval_ms: u64,
    #[serde(default)]
    pub receipt: ReceiptOptions,
    #[serde(default)]
    pub template: TemplateConfig,
    /// A repeated identical dead letter is written once per this interval, with a count.
    #[serde(default = "default_repeat_interval_ms")]
    pub deadletter_repeat_interval_ms: u64,
}

fn default_idle_timeout() -> u64 {
    30_000
}

fn default_probe_interval() -> u64 {
    10_000
}

fn default_listen() -> String {
    "0.0.0.0:9100".into()
}
fn default_connect_timeout() -> u64 {
    3000
}
fn default_store_timeout() -> u64 {
    1000
}

fn validate_common(
    lane: &str,
    receipt: &ReceiptOptions,
    template: &TemplateConfig,
    path: &str,
    problems: &mut Problems,
) {
    if lane.trim().is_empty() {
        problems.push(
            join(path, "lane"),
            "must name the lane or terminal, e.g. \"3\"",
        );
    }
    receipt.validate(&join(path, "receipt"), problems);
    template.validate(&join(path, "template"), problems);
}

impl Driver for EscposTapConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn exclusive_resources(&self) -> Vec<String> {
        vec![self.serial.path.clone()]
    }

    fn build(&self, ctx: ComponentContext) -> Result<Task, DriverError> {
        build_tap(self.clone(), ctx).map_err(|reason| DriverError::Build {
            name: self.name.clone(),
            reason,
        })
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        self.serial.validate(&join(path, "serial"), problems);
        validate_common(&self.lane, &self.receipt, &self.template, path, problems);
        validate_repeat_interval(path, self.deadletter_repeat_interval_ms, problems);
    }
}

impl PrinterProxyConfig {
    /// Whether a POS at `ip` may print (an IPv4 peer of an IPv6 listener counts as IPv4).
    pub fn allows(&self, ip: IpAddr) -> bool {
        self.allow.is_empty()
            || self
                .allow
                .iter()
                .filter_map(|a| a.parse::<IpAddr>().ok())
                .any(|a| a.to_canonical() == ip.to_canonical())
    }
}

impl Driver for PrinterProxyConfig {
    fn name(&self) -> &str {
        &self.name
    }

    fn build(&self, ctx: ComponentContext) -> Result<Task, DriverError> {
        build_proxy(self.clone(), ctx).map_err(|reason| DriverError::Build {
            name: self.name.clone(),
            reason,
        })
    }

    fn validate(&self, path: &str, problems: &mut Problems) {
        validate_common(&self.lane, &self.receipt, &self.template, path, problems);
        validate_repeat_interval(path, self.deadletter_repeat_interval_ms, problems);
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            problems.push(
                join(path, "listen"),
                format!(
                    "{:?} is not an address:port such as 0.0.0.0:9100",
                    self.listen
                ),
            );
        }
        let p = join(path, "printer");
        match (&self.printer.tcp, &self.printer.serial) {
            (Some(_), Some(_)) | (None, None) => problems.push(
                p,
                "set exactly one of printer.tcp (host:port) or printer.serial (a serial port)",
            ),
            (Some(a), None) => {
                if !a.contains(':') {
                    problems.push(
                        join(&p, "tcp"),
                        format!("{a:?} must be host:port, e.g. 192.0.2.10:9100"),
                    );
                }
            }
            (None, Some(s)) => s.validate(&join(&p, "serial"), problems),
        }
        if !(100..=60_000).contains(&self.connect_timeout_ms) {
            problems.push(
                join(path, "connect_timeout_ms"),
                "must be between 100 and 60000",
            );
        }
        if !(10..=60_000).contains(&self.store_timeout_ms) {
            problems.push(
                join(path, "store_timeout_ms"),
                "must be between 10 and 60000",
            );
        }
        if !(1_000..=3_600_000).contains(&self.idle_timeout_ms) {
            problems.push(
                join(path, "idle_timeout_ms"),
                "must be between 1000 and 3600000",
            );
        }
        if !(500..=3_600_000).contains(&self.probe_interval_ms) {
            problems.push(
                join(path, "probe_interval_ms"),
                "must be between 500 and 3600000",
            );
        }
        for (i, a) in self.allow.iter().enumerate() {
            if a.parse::<IpAddr>().is_err() {
                problems.push(
                    format!("{}[{i}]", join(path, "allow")),
                    format!("{a:?} is not an IP address such as 10.0.3.21"),
                );
            }
        }
    }

    fn exclusive_resources(&self) -> Vec<String> {
        let mut v = vec![format!("tcp-listen:{}", self.listen)];
        if let Some(s) = &self.printer.serial {
            v.push(s.path.clone());
        }
        v
    }
}

/// Turns segmented receipts into records.
#[derive(Debug)]
pub struct ReceiptProcessor {
    store: String,
    driver: String,
    lane: String,
    template: Template,
    drawer_grace_ms: i64,
    /// When the last cash sale ended, for drawer kicks that follow their sale's cut.
    last_cash_sale_ms: Option<i64>,
    /// Receipts seen by this processor: part of the receipt id, so that two identical receipts
    /// in the same millisecond (a reprint) are two records, not one deduplicated.
    seen: u64,
    pub parsed: u64,
    pub failed: u64,
    pub flagged: u64,
    /// Receipts the proxy forwarded before they were stored (the log was slow or failing).
    pub forwarded_unstored: u64,
    /// Bytes and unknown commands of the connections (or port openings) that ended: the status
    /// counters are cumulative over them, not the current one's.
    bytes_before: u64,
    unknown_before: u64,
    /// Dead letters of refused receipts, repeats aggregated (created with the first).
    dead: Option<DeadLetters>,
    dead_letter_interval: Duration,
}

impl ReceiptProcessor {
    pub fn new(
        store: &str,
        driver: &str,
        lane: &str,
        template: Template,
        opts: &ReceiptOptions,
    ) -> Self {
        ReceiptProcessor {
            store: store.into(),
            driver: driver.into(),
            lane: lane.into(),
            template,
            drawer_grace_ms: opts.drawer_grace_ms as i64,
            last_cash_sale_ms: None,
            seen: 0,
            parsed: 0,
            failed: 0,
            flagged: 0,
            forwarded_unstored: 0,
            bytes_before: 0,
            unknown_before: 0,
            dead: None,
            dead_letter_interval: Duration::from_millis(DEFAULT_REPEAT_INTERVAL_MS),
        }
    }

    /// Repeats of one dead letter within `interval` are counted into one (default 60 s).
    pub fn with_dead_letter_interval(mut self, interval: Duration) -> Self {
        self.dead_letter_interval = interval;
        self
    }

    /// A refused receipt, through the driver's aggregation: the first of its kind now, repeats
    /// (a POS sending the same bytes again and again) counted into one per interval.
    fn dead_letter(
        &mut self,
        ctx: &ComponentContext,
        label: &'static str,
        reason: String,
        raw: &[u8],
    ) -> Option<Event> {
        let interval = self.dead_letter_interval;
        let lane = self.lane.clone();
        self.dead
            .get_or_insert_with(|| DeadLetters::new(ctx, "printer", lane, interval))
            .admit(label, reason, raw)
    }

    /// When the next summary of repeated dead letters is due.
    pub fn dead_letters_due_at(&self) -> Option<Instant> {
        self.dead.as_ref().and_then(DeadLetters::next_due)
    }

    /// The summaries of repeated dead letters whose interval is over, to be stored.
    pub fn due_dead_letters(&mut self) -> Vec<Event> {
        self.dead.as_mut().map(DeadLetters::due).unwrap_or_default()
    }

    /// Stores the counts still open (the driver stops).
    pub async fn flush_dead_letters(&mut self) {
        if let Some(d) = self.dead.as_mut() {
            d.flush().await;
        }
    }

    /// The segmenter of a connection that ended: its counts go into the cumulative ones.
    pub fn segmenter_done(&mut self, seg: &Segmenter) {
        let s = seg.stats();
        self.bytes_before += s.bytes;
        self.unknown_before += s.unknown_commands;
    }

    fn event(
        &self,
        stream: &str,
        schema: &str,
        id: String,
        ts: i64,
        v: serde_json::Value,
    ) -> Event {
        Event::new(stream, serde_json::to_vec(&v).unwrap_or_default())
            .with_event_ts(ts)
            .with_key(self.lane.clone())
            .with_source(self.driver.clone())
            .with_event_id(id)
            .with_schema(schema)
    }

    fn exception(
        &self,
        rid: &str,
        ts: i64,
        kind: &str,
        n: usize,
        detail: serde_json::Value,
    ) -> Event {
        let id = format!("exc:{rid}:{kind}:{n}");
        let mut v = json!({
            "schema": "pos.exception/1", "event_id": id, "store": self.store, "lane": self.lane,
            "ts": ts, "type": kind, "receipt_event_id": rid,
        });
        if let (Some(m), Some(d)) = (v.as_object_mut(), detail.as_object()) {
            m.extend(d.clone());
        }
        self.event("pos.exceptions", "pos.exception/1", id, ts, v)
    }

    /// The records for one receipt (and the dead letter when it is noise or did not parse).
    pub fn events(&mut self, r: &Receipt, ctx: &ComponentContext, ts: i64) -> Vec<Event> {
        let mut out = Vec::new();
        self.seen += 1;
        let rid = format!(
            "rcpt:{}:{ts}:{}:{:016x}",
            self.driver,
            self.seen,
            fnv64(&r.raw)
        );
        if r.is_noise() {
            let reason = format!(
                "{} bytes on the printer line formed no receipt: {} unknown commands, {} stray control bytes, malformed: {:?} (line noise, a wrong baud rate, or a printer language other than ESC/POS?)",
                r.raw_len, r.unknown_commands, r.stray_controls, r.malformed
            );
            out.extend(self.dead_letter(ctx, "not_a_receipt", reason, &r.raw));
            return out;
        }
        if !r.has_text() && r.codes.is_empty() {
            // Only a drawer kick: a "no sale" drawer open, unless it follows a cash sale.
            let covered = self
                .last_cash_sale_ms
                .is_some_and(|t| ts - t <= self.drawer_grace_ms);
            self.last_cash_sale_ms = None;
            if !covered {
                out.push(self.exception(
                    &rid,
                    ts,
                    "drawer_open_without_tender",
                    0,
                    json!({"detail": "the cash drawer was opened with no sale printed (no-sale)"}),
                ));
            }
            return out;
        }
        let parsed = receipt::parse(r, &self.template);
        let tx_id = match &parsed {
            Ok(p) => Some(match &p.receipt_no {
                Some(no) => {
                    transaction_id(&self.store, &self.lane, p.printed_at.as_deref(), ts, no)
                }
                None => format!("tx:{rid}"),
            }),
            Err(_) => None,
        };
        let (status, reason, flags) = match &parsed {
            Ok(p) if p.totals_consistent() => ("parsed", None, p.flags.clone()),
            Ok(p) => ("flagged", None, p.flags.clone()),
            Err(e) => ("failed", Some(e), Vec::new()),
        };
        let mut parse = json!({"status": status, "template": self.template.name, "flags": flags});
        if let Some(e) = reason {
            parse["reason"] = json!(e.to_string());
            parse["reason_label"] = json!(e.label());
        }
        if let Ok(p) = &parsed {
            parse["unmatched_lines"] = json!(p.unmatched_lines);
        }
        if let Some(t) = &tx_id {
            parse["transaction_event_id"] = json!(t);
        }
        let codes: Vec<_> = r
            .codes
            .iter()
            .map(|c| json!({"kind": c.kind(), "data": c.text()}))
            .collect();
        let receipt_v = json!({
            "schema": "pos.receipt/1", "event_id": rid, "store": self.store, "lane": self.lane,
            "driver": self.driver, "ts": ts, "end": r.end.as_str(), "lines": r.lines,
            "codes": codes, "drawer_kicks": r.drawer_kicks, "images": r.images, "cuts": r.cuts,
            "unknown_commands": r.unknown_commands, "stray_controls": r.stray_controls,
            "malformed": r.malformed, "lines_truncated": r.lines_truncated,
            "code_page": r.code_page, "raw_bytes": r.raw_len,
            "raw_truncated": (r.raw.len() as u64) < r.raw_len, "raw_b64": base64_encode(&r.raw),
            "parse": parse,
        });
        out.push(self.event("pos.receipts", "pos.receipt/1", rid.clone(), ts, receipt_v));
        match parsed {
            Err(e) => {
                self.failed += 1;
                metrics::counter!("edge_pos_receipts_total", "driver" => self.driver.clone(), "outcome" => "failed", "reason" => e.label()).increment(1);
                out.extend(self.dead_letter(
                    ctx,
                    e.label(),
                    format!("receipt did not parse: {e}; stored raw in pos.receipts"),
                    &r.raw,
                ));
                if r.drawer_kicks > 0 {
                    out.push(self.exception(&rid, ts, "drawer_open_without_tender", 0, json!({"detail": "the cash drawer was opened on a receipt that is not a parsed sale"})));
                }
            }
            Ok(p) => {
                let tx_id = tx_id.unwrap_or_default();
                if p.totals_consistent() {
                    self.parsed += 1;
                } else {
                    self.flagged += 1;
                }
                metrics::counter!("edge_pos_receipts_total", "driver" => self.driver.clone(), "outcome" => if p.totals_consistent() { "parsed" } else { "flagged" }, "reason" => "").increment(1);
                let c = TxContext {
                    store: &self.store,
                    lane: &self.lane,
                    ts_ms: ts,
                    event_id: &tx_id,
                    receipt_event_id: &rid,
                    template: &self.template.name,
                    currency: &self.template.currency,
                    drawer_kicks: r.drawer_kicks,
                };
                let tv = receipt::transaction_payload(&p, &c);
                out.push(self.event(
                    "pos.transactions",
                    "pos.transaction/1",
                    tx_id.clone(),
                    ts,
                    tv,
                ));
                let no = p.receipt_no.clone();
                for l in &p.lines {
                    let kind = match l.kind {
                        LineKind::Void => "void_line",
                        LineKind::Refund => "refund_line",
                        LineKind::Item if l.amount_minor < 0 => "negative_line",
                        _ => continue,
                    };
                    out.push(self.exception(
                        &rid,
                        ts,
                        kind,
                        l.line,
                        json!({
                            "receipt_no": no, "transaction_event_id": tx_id, "line": l.line,
                            "description": l.description, "amount_minor": l.amount_minor,
                        }),
                    ));
                }
                if !p.totals_consistent() {
                    out.push(self.exception(
                        &rid,
                        ts,
                        "totals_do_not_add_up",
                        0,
                        json!({
                            "receipt_no": no, "transaction_event_id": tx_id, "flags": p.flags,
                            "total_minor": p.total_minor,
                        }),
                    ));
                }
                if r.drawer_kicks > 0 && !p.cash_tendered {
                    out.push(self.exception(
                        &rid,
                        ts,
                        "drawer_open_without_tender",
                        0,
                        json!({
                            "receipt_no": no, "transaction_event_id": tx_id,
                            "detail": "the cash drawer was opened on a sale without a cash tender",
                        }),
                    ));
                }
                self.last_cash_sale_ms = (p.cash_tendered && r.drawer_kicks == 0).then_some(ts);
            }
        }
        out
    }
}

/// One batch of records for the writer; `ack` hears whether it became durable.
struct Batch {
    events: Vec<Event>,
    ack: Option<oneshot::Sender<bool>>,
}

/// Stores batches in order with backpressure. Ends when every sender is gone.
async fn writer(ctx: ComponentContext, mut rx: mpsc::Receiver<Batch>) {
    while let Some(b) = rx.recv().await {
        let ok = match crate::link::store(&ctx, b.events).await {
            Ok(Some(_)) => true,
            Ok(None) => false,
            Err(e) => {
                ctx.status.set(
                    State::Degraded,
                    format!("receipts could not be stored: {e}; they are counted as dropped"),
                );
                metrics::counter!("edge_pos_receipts_dropped_total", "driver" => ctx.status.name().to_string(), "reason" => "log_error").increment(1);
                false
            }
        };
        if let Some(a) = b.ack {
            // The connection may be gone already; then nobody waits for this answer.
            a.send(ok).ok();
        }
    }
}

/// Queues a batch without waiting; a full queue is counted as a drop (the tap keeps reading).
fn enqueue(ctx: &ComponentContext, tx: &mpsc::Sender<Batch>, events: Vec<Event>) {
    if events.is_empty() {
        return;
    }
    if tx.try_send(Batch { events, ack: None }).is_err() {
        metrics::counter!("edge_pos_receipts_dropped_total", "driver" => ctx.status.name().to_string(), "reason" => "queue_full").increment(1);
        ctx.status.set(
            State::Degraded,
            "receipts arrive faster than the local log stores them; a receipt was dropped (counted)",
        );
    }
}

const WRITER_QUEUE: usize = 64;

fn report(ctx: &ComponentContext, proc: &ReceiptProcessor, seg: &Segmenter) {
    ctx.status.field("receipts_parsed", proc.parsed);
    ctx.status.field("receipts_flagged", proc.flagged);
    ctx.status.field("receipts_failed", proc.failed);
    let s = seg.stats();
    ctx.status.field("bytes", proc.bytes_before + s.bytes);
    ctx.status
        .field("unknown_commands", proc.unknown_before + s.unknown_commands);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::escpos::{EndReason, Segmenter};
    use serde_json::Value;
    use std::sync::Arc;

    fn receipts(bytes: &[u8]) -> Vec<Receipt> {
        let mut s = Segmenter::new(ReceiptOptions::default().segmenter());
        let mut r = s.push(bytes);
        r.extend(s.idle(EndReason::StreamEnd));
        r
    }

    fn events_of(bytes: &[u8], start_ms: i64) -> Vec<(String, Value)> {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(
            edge_sync::log::SqliteLog::open(dir.path(), edge_sync::log::LogConfig::default())
                .unwrap(),
        );
        let ctx = ComponentContext::for_test(log, "p").with_store("s1");
        let opts = ReceiptOptions::default();
        let mut proc = ReceiptProcessor::new(
            "s1",
            "p",
            "7",
            TemplateConfig::default().compile().unwrap(),
            &opts,
        );
        let mut out = Vec::new();
        for (i, r) in receipts(bytes).iter().enumerate() {
            for e in proc.events(r, &ctx, start_ms + 1000 * i as i64) {
                out.push((
                    e.stream.to_string(),
                    serde_json::from_slice(&e.payload).unwrap(),
                ));
            }
        }
        out
    }

    fn exceptions(ev: &[(String, Value)]) -> Vec<String> {
        ev.iter()
            .filter(|(s, _)| s == "pos.exceptions")
            .map(|(_, v)| v["type"].as_str().unwrap().to_string())
            .collect()
    }

    const CARD: &str =
        "\x1b@A                    1.00\nTOTAL                1.00\nVISA                 1.00\n";
    const CASH: &str = "\x1b@A                    1.00\nTOTAL                1.00\nCASH                 5.00\nCHANGE               4.00\n";

    #[test]
    fn drawer_kicks_without_a_cash_tender_are_exceptions() {
        // Card sale with a drawer kick: exception.
        let ev = events_of(format!("{CARD}\x1bp\x00\x19\x7a\x1dV\x00").as_bytes(), 0);
        assert_eq!(exceptions(&ev), vec!["drawer_open_without_tender"]);
        // Cash sale kicking before its cut: fine.
        let ev = events_of(format!("{CASH}\x1bp\x00\x19\x7a\x1dV\x00").as_bytes(), 0);
        assert!(exceptions(&ev).is_empty());
        // Cash sale, then the kick after the cut (within the grace): fine.
        let ev = events_of(
            format!("{CASH}\x1dV\x00\x1bp\x00\x19\x7a\x1dV\x00").as_bytes(),
            0,
        );
        assert!(exceptions(&ev).is_empty(), "{ev:?}");
        // A kick alone ("no sale"): exception, and no receipt record.
        let ev = events_of(b"\x1b@\x1bp\x00\x19\xfa\x1dV\x00", 0);
        assert_eq!(exceptions(&ev), vec!["drawer_open_without_tender"]);
        assert!(ev.iter().all(|(s, _)| s != "pos.receipts"));
    }

    #[test]
    fn voids_refunds_and_bad_totals_are_exceptions_and_flagged() {
        let ev = events_of(
            b"\x1b@A                    1.00\nVOID A               1.00-\nREFUND B             2.00\nB                    3.00\nSUBTOTAL             9.99\nTOTAL                9.99\nCASH                 9.99\n\x1dV\x00",
            0,
        );
        assert_eq!(
            exceptions(&ev),
            vec!["void_line", "refund_line", "totals_do_not_add_up"]
        );
        let tx = &ev.iter().find(|(s, _)| s == "pos.transactions").unwrap().1;
        assert_eq!(tx["totals_consistent"], false);
        assert_eq!(tx["flags"][0], "lines_do_not_add_up_to_subtotal");
        let receipt = &ev.iter().find(|(s, _)| s == "pos.receipts").unwrap().1;
        assert_eq!(receipt["parse"]["status"], "flagged");
    }

    #[test]
    fn unparsed_receipts_are_stored_raw_and_dead_lettered_noise_only_dead_lettered() {
        let ev = events_of(
            b"\x1b@HELLO\nWORLD\n\x1dV\x00\x1b\x01\x1b\x02\x07\x07\x1dV\x00",
            0,
        );
        let streams: Vec<&str> = ev.iter().map(|(s, _)| s.as_str()).collect();
        assert_eq!(streams, vec!["pos.receipts", "deadletter", "deadletter"]);
        assert_eq!(ev[0].1["parse"]["status"], "failed");
        assert_eq!(ev[0].1["parse"]["reason_label"], "no_total");
        assert_eq!(ev[1].1["reason_label"], "no_total");
        assert_eq!(ev[2].1["reason_label"], "not_a_receipt");
        assert!(
            ev[2].1["reason"]
                .as_str()
                .unwrap()
                .contains("2 unknown commands")
        );
    }
}

/// The `pos.transactions` event id of a receipt with a number. Receipt numbers repeat: POS
/// systems reset their counter daily or at a reinstall, and the log would then take a new sale
/// for a reprint of an old one and drop it. The printed time (whitespace folded) makes the id
/// unique while a reprint of the same receipt keeps it; without one, the UTC day of the capture.
pub fn transaction_id(
    store: &str,
    lane: &str,
    printed_at: Option<&str>,
    ts: i64,
    no: &str,
) -> String {
    let when = match printed_at.map(str::trim).filter(|s| !s.is_empty()) {
        Some(p) => p.split_whitespace().collect::<Vec<_>>().join("_"),
        None => utc_day(ts),
    };
    format!("tx:{store}:{lane}:{when}:{no}")
}

/// `YYYY-MM-DD` of a Unix time in ms (civil-from-days, proleptic Gregorian).
fn utc_day(ts_ms: i64) -> String {
    let days = ts_ms.div_euclid(86_400_000);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod transaction_id_tests {
    use super::*;

    #[test]
    fn utc_days_are_civil_dates() {
        assert_eq!(utc_day(0), "1970-01-01");
        assert_eq!(utc_day(951_782_400_000), "2000-02-29");
        assert_eq!(utc_day(1_798_761_599_999), "2026-12-31");
        assert_eq!(utc_day(1_798_761_600_000), "2027-01-01");
        assert_eq!(utc_day(-1), "1969-12-31");
    }

    /// A counter that resets gives the same number on two days: two sales, two ids. A reprint
    /// (same number, same printed time, captured later) is the same sale.
    #[test]
    fn receipt_numbers_that_repeat_across_days_are_different_sales() {
        let mon = transaction_id(
            "s",
            "3",
            Some("12/01/2026 09:15"),
            1_796_000_000_000,
            "0001",
        );
        let tue = transaction_id(
            "s",
            "3",
            Some("12/02/2026 09:20"),
            1_796_086_400_000,
            "0001",
        );
        assert_ne!(mon, tue);
        let reprint = transaction_id(
            "s",
            "3",
            Some(" 12/01/2026  09:15 "),
            1_796_003_600_000,
            "0001",
        );
        assert_eq!(mon, reprint);
        assert_eq!(mon, "tx:s:3:12/01/2026_09:15:0001");
        // No printed time: the capture day.
        let a = transaction_id("s", "3", None, 1_796_000_000_000, "7");
        let b = transaction_id("s", "3", None, 1_796_086_400_000, "7");
        assert_ne!(a, b);
        assert_eq!(a, format!("tx:s:3:{}:7", utc_day(1_796_000_000_000)));
    }
}
