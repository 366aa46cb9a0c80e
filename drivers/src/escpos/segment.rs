//! Segmentation of a printer byte stream into receipts.
//!
//! A receipt ends at a paper cut, at `ESC @` (when `split_on_init`), when a line matches the end
//! pattern, before a line that matches the begin pattern, at an idle gap (the driver calls
//! [`Segmenter::idle`]), or when it exceeds the size limit. Segments with no content (no text, no
//! code, no drawer kick) and no noise are dropped: printers receive `ESC @` and settings between
//! receipts. Segments with only noise (unknown commands, stray control bytes, malformed commands)
//! are returned ([`Receipt::is_noise`]) so that the driver dead-letters them.
//!
//! Memory is bounded: at most `max_lines` lines of at most `max_line_chars` characters and
//! `raw_keep_bytes` raw bytes are kept per receipt, and a receipt is closed once `max_receipt_bytes`
//! arrived without an end.

use super::codepage::CodePage;
use super::tokenizer::{RealTime, Token, Tokenizer, TokenizerStats};
use regex::Regex;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndReason {
    Cut,
    Init,
    EndPattern,
    BeginPattern,
    IdleGap,
    SizeLimit,
    /// The connection or port closed (or the agent stopped) with a receipt in progress.
    StreamEnd,
}

impl EndReason {
    pub fn as_str(self) -> &'static str {
        match self {
            EndReason::Cut => "cut",
            EndReason::Init => "init",
            EndReason::EndPattern => "end_pattern",
            EndReason::BeginPattern => "begin_pattern",
            EndReason::IdleGap => "idle_gap",
            EndReason::SizeLimit => "size_limit",
            EndReason::StreamEnd => "stream_end",
        }
    }
}

/// A barcode or 2D code printed on a receipt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrintedCode {
    /// `GS k` m value, or `None` for 2D codes.
    pub symbology: Option<u8>,
    pub data: String,
}

impl PrintedCode {
    pub fn kind(&self) -> &'static str {
        match self.symbology {
            None => "2d",
            Some(0 | 65) => "upc_a",
            Some(1 | 66) => "upc_e",
            Some(2 | 67) => "ean13",
            Some(3 | 68) => "ean8",
            Some(4 | 69) => "code39",
            Some(5 | 70) => "itf",
            Some(6 | 71) => "codabar",
            Some(72) => "code93",
            Some(73) => "code128",
            Some(74..=78) => "gs1_databar",
            Some(_) => "other",
        }
    }

    /// The human-readable content: CODE128 data starts with a code-set selector (`{A`/`{B`/`{C`).
    pub fn text(&self) -> &str {
        if self.symbology == Some(73) && self.data.len() >= 2 && self.data.starts_with('{') {
            self.data.get(2..).unwrap_or("")
        } else {
            &self.data
        }
    }
}

/// One segmented receipt.
#[derive(Debug, Clone, PartialEq)]
pub struct Receipt {
    pub lines: Vec<String>,
    pub codes: Vec<PrintedCode>,
    pub drawer_kicks: u32,
    pub images: u32,
    pub cuts: u32,
    pub unknown_commands: u32,
    /// Control bytes outside any command other than CR and HT (line noise shows up here).
    pub stray_controls: u32,
    pub malformed: Vec<&'static str>,
    /// Lines cut to `max_line_chars` or dropped beyond `max_lines`.
    pub lines_truncated: bool,
    pub raw: Vec<u8>,
    /// Bytes that belonged to this receipt (`raw` keeps the first `raw_keep_bytes`).
    pub raw_len: u64,
    pub code_page: String,
    pub end: EndReason,
    /// For receipts closed inside [`Segmenter::push`]: index in the chunk just past the byte that
    /// ended the receipt (the proxy holds bytes from there until the receipt is durable).
    pub end_offset: Option<usize>,
}

impl Receipt {
    pub fn has_text(&self) -> bool {
        !self.lines.is_empty()
    }

    /// Neither text, nor a code, nor a drawer kick: only noise (returned so it can be
    /// dead-lettered, never silently dropped).
    pub fn is_noise(&self) -> bool {
        self.lines.is_empty() && self.codes.is_empty() && self.drawer_kicks == 0
    }
}

#[derive(Debug, Clone)]
pub struct SegmenterConfig {
    pub split_on_init: bool,
    pub begin_pattern: Option<Regex>,
    pub end_pattern: Option<Regex>,
    pub max_receipt_bytes: u64,
    pub raw_keep_bytes: usize,
    pub max_lines: usize,
    pub max_line_chars: usize,
    pub code_page: CodePage,
}

impl Default for SegmenterConfig {
    fn default() -> Self {
        SegmenterConfig {
            split_on_init: true,
            begin_pattern: None,
            end_pattern: None,
            max_receipt_bytes: 1 << 20,
            raw_keep_bytes: 64 << 10,
            max_lines: 2000,
            max_line_chars: 512,
            code_page: CodePage::DEFAULT,
        }
    }
}

#[derive(Debug)]
pub struct Segmenter {
    cfg: SegmenterConfig,
    tok: Tokenizer,
    cur: Receipt,
    line: String,
    line_chars: usize,
    /// Content seen in `cur` (text, codes or drawer kicks).
    content: bool,
    /// Where `cur`'s bytes start in the chunk being pushed.
    chunk_start: usize,
    /// Receipts closed and not yet returned.
    closed: Vec<Receipt>,
    /// `DLE EOT n` requests seen and not yet taken, in order (bounded).
    status_requests: Vec<u8>,
}

/// `DLE EOT` requests kept between two [`Segmenter::take_status_requests`].
const MAX_STATUS_REQUESTS: usize = 256;

fn empty_receipt() -> Receipt {
    Receipt {
        lines: Vec::new(),
        codes: Vec::new(),
        drawer_kicks: 0,
        images: 0,
        cuts: 0,
        unknown_commands: 0,
        stray_controls: 0,
        malformed: Vec::new(),
        lines_truncated: false,
        raw: Vec::new(),
        raw_len: 0,
        code_page: String::new(),
        end: EndReason::StreamEnd,
        end_offset: None,
    }
}

impl Segmenter {
    pub fn new(cfg: SegmenterConfig) -> Segmenter {
        Segmenter {
            tok: Tokenizer::new(cfg.code_page),
            cfg,
            cur: empty_receipt(),
            line: String::new(),
            line_chars: 0,
            content: false,
            chunk_start: 0,
            closed: Vec::new(),
            status_requests: Vec::new(),
        }
    }

    /// The `DLE EOT n` requests in the bytes pushed since the last call, in order: the printer
    /// answers each with one status byte ([`super::StatusReader`]).
    pub fn take_status_requests(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.status_requests)
    }

    pub fn stats(&self) -> TokenizerStats {
        self.tok.stats()
    }

    /// True while a receipt with content is in progress (an idle gap would close it).
    pub fn in_progress(&self) -> bool {
        self.content
            || !self.line.is_empty()
            || self.cur.unknown_commands > 0
            || self.cur.stray_controls > 0
            || !self.cur.malformed.is_empty()
    }

    /// Feeds bytes; returns the receipts that ended inside them.
    pub fn push(&mut self, chunk: &[u8]) -> Vec<Receipt> {
        self.chunk_start = 0;
        let mut tok = std::mem::replace(&mut self.tok, Tokenizer::new(self.cfg.code_page));
        tok.push(chunk, |t, end| self.on_token(t, end, chunk));
        self.tok = tok;
        let rest = &chunk[self.chunk_start.min(chunk.len())..];
        self.keep_raw(rest);
        if self.cur.raw_len > self.cfg.max_receipt_bytes {
            self.flush_text();
            self.close(EndReason::SizeLimit, None);
        }
        std::mem::take(&mut self.closed)
    }

    fn flush_text(&mut self) {
        let mut flushed = Vec::new();
        self.tok.flush(|t, _| flushed.push(t));
        for t in flushed {
            if let Token::Text(s) = t {
                self.add_text(&s);
            }
        }
    }

    /// Closes the receipt in progress after an idle gap (`reason` IdleGap) or at the end of the
    /// stream (StreamEnd). A half-received command is dropped.
    pub fn idle(&mut self, reason: EndReason) -> Vec<Receipt> {
        self.flush_text();
        if !self.tok.at_boundary() {
            self.cur
                .malformed
                .push("the stream stopped in the middle of a command (truncated receipt)");
            self.tok.reset();
            self.content = true;
        }
        self.close(reason, None);
        std::mem::take(&mut self.closed)
    }

    fn keep_raw(&mut self, bytes: &[u8]) {
        let room = self.cfg.raw_keep_bytes.saturating_sub(self.cur.raw.len());
        self.cur
            .raw
            .extend_from_slice(&bytes[..room.min(bytes.len())]);
        self.cur.raw_len += bytes.len() as u64;
    }

    fn on_token(&mut self, t: Token, end: usize, chunk: &[u8]) {
        match t {
            Token::Text(s) => self.add_text(&s),
            Token::LineFeed => {
                if let Some(reason) = self.end_line() {
                    match reason {
                        EndReason::BeginPattern => {}
                        _ => self.close_at(reason, end, chunk),
                    }
                }
            }
            Token::Init => {
                if self.cfg.split_on_init && self.in_progress() {
                    // The ESC @ belongs to the next receipt: close before it.
                    let start = end.saturating_sub(2).max(self.chunk_start);
                    self.close_at(EndReason::Init, start, chunk);
                }
            }
            Token::Cut { .. } => {
                self.cur.cuts += 1;
                self.end_line();
                self.close_at(EndReason::Cut, end, chunk);
            }
            Token::DrawerKick { .. } => {
                self.cur.drawer_kicks += 1;
                self.content = true;
            }
            Token::Barcode { symbology, data } => {
                self.cur.codes.push(PrintedCode {
                    symbology: Some(symbology),
                    data: String::from_utf8_lossy(&data).into_owned(),
                });
                self.content = true;
            }
            Token::Code2D { data } => {
                self.cur.codes.push(PrintedCode {
                    symbology: None,
                    data: String::from_utf8_lossy(&data).into_owned(),
                });
                self.content = true;
            }
            Token::Image { .. } => self.cur.images += 1,
            Token::Unknown { .. } => self.cur.unknown_commands += 1,
            Token::Malformed(why) => {
                if self.cur.malformed.len() < 16 {
                    self.cur.malformed.push(why);
                }
            }
            Token::RealTime(RealTime::StatusRequest(n)) => {
                if self.status_requests.len() < MAX_STATUS_REQUESTS {
                    self.status_requests.push(n);
                }
            }
            Token::CodePage(_)
            | Token::RealTime(_)
            | Token::StatusRequest { .. }
            | Token::Setting => {}
            Token::Control(b'\r' | b'\t') => {}
            Token::Control(_) => self.cur.stray_controls += 1,
        }
    }

    fn add_text(&mut self, s: &str) {
        for c in s.chars() {
            if self.line_chars < self.cfg.max_line_chars {
                self.line.push(c);
                self.line_chars += 1;
            } else {
                self.cur.lines_truncated = true;
                break;
            }
        }
    }

    /// Ends the current printed line; returns a reason to close the receipt if a pattern says so.
    fn end_line(&mut self) -> Option<EndReason> {
        let line = std::mem::take(&mut self.line);
        self.line_chars = 0;
        let line = line.trim_end();
        if line.trim().is_empty() {
            return None;
        }
        if let Some(begin) = &self.cfg.begin_pattern
            && begin.is_match(line)
            && self.content
        {
            // Close what came before this line; the line starts the next receipt. The raw bytes of
            // this line stay with the previous receipt (the split point inside the raw stream is not
            // tracked line by line).
            let mut prev = std::mem::replace(&mut self.cur, empty_receipt());
            prev.end = EndReason::BeginPattern;
            prev.code_page = self.tok.code_page().name();
            self.closed.push(prev);
            self.content = false;
        }
        if self.cur.lines.len() < self.cfg.max_lines {
            self.cur.lines.push(line.to_string());
        } else {
            self.cur.lines_truncated = true;
        }
        self.content = true;
        match &self.cfg.end_pattern {
            Some(end) if end.is_match(line) => Some(EndReason::EndPattern),
            _ => None,
        }
    }

    fn close_at(&mut self, reason: EndReason, end: usize, chunk: &[u8]) {
        let end = end.clamp(self.chunk_start, chunk.len());
        self.keep_raw(&chunk[self.chunk_start..end]);
        self.chunk_start = end;
        self.close(reason, Some(end));
    }

    fn close(&mut self, reason: EndReason, end_offset: Option<usize>) {
        if !self.line.is_empty() {
            self.end_line();
        }
        let mut r = std::mem::replace(&mut self.cur, empty_receipt());
        let noisy = r.unknown_commands > 0 || r.stray_controls > 0 || !r.malformed.is_empty();
        let had = self.content || noisy;
        self.content = false;
        if had {
            r.end = reason;
            r.end_offset = end_offset;
            r.code_page = self.tok.code_page().name();
            self.closed.push(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(cfg: SegmenterConfig, chunks: &[&[u8]]) -> Vec<Receipt> {
        let mut s = Segmenter::new(cfg);
        let mut out = Vec::new();
        for c in chunks {
            out.extend(s.push(c));
        }
        out.extend(s.idle(EndReason::StreamEnd));
        out
    }

    #[test]
    fn cut_init_and_idle_split_receipts_and_raw_bytes_add_up() {
        let stream: &[u8] =
            b"\x1b@A 1.00\nTOTAL 1.00\n\x1bp\x00\x19\xfa\x1dV\x00\x1b@\x1b@B\nTOTAL 2.00\n\x1b@C\n";
        for split in 0..stream.len() {
            let r = seg(
                SegmenterConfig::default(),
                &[&stream[..split], &stream[split..]],
            );
            assert_eq!(r.len(), 3, "split {split}: {r:?}");
            assert_eq!(r[0].lines, vec!["A 1.00", "TOTAL 1.00"]);
            assert_eq!(r[0].end, EndReason::Cut);
            assert_eq!(r[0].drawer_kicks, 1);
            assert_eq!(r[1].lines, vec!["B", "TOTAL 2.00"]);
            assert_eq!(r[1].end, EndReason::Init);
            assert_eq!(r[2].lines, vec!["C"]);
            assert_eq!(r[2].end, EndReason::StreamEnd);
            let total: u64 = r.iter().map(|x| x.raw_len).sum();
            assert_eq!(
                total,
                stream.len() as u64,
                "every byte belongs to one receipt"
            );
            let joined: Vec<u8> = r.iter().flat_map(|x| x.raw.clone()).collect();
            assert_eq!(joined, stream);
        }
    }

    #[test]
    fn begin_and_end_patterns_split_without_cuts() {
        let cfg = SegmenterConfig {
            split_on_init: false,
            begin_pattern: Regex::new("^STORE ").ok(),
            end_pattern: Regex::new("^THANK YOU").ok(),
            ..Default::default()
        };
        let r = seg(
            cfg,
            &[b"STORE 1\nX 1.00\nSTORE 1\nY 2.00\nTHANK YOU\n\n\nSTORE 1\nZ\n"],
        );
        let lines: Vec<Vec<String>> = r.iter().map(|x| x.lines.clone()).collect();
        assert_eq!(
            lines,
            vec![
                vec!["STORE 1", "X 1.00"],
                vec!["STORE 1", "Y 2.00", "THANK YOU"],
                vec!["STORE 1", "Z"]
            ]
        );
        assert_eq!(r[0].end, EndReason::BeginPattern);
        assert_eq!(r[1].end, EndReason::EndPattern);
    }

    #[test]
    fn memory_stays_bounded_without_terminators() {
        let cfg = SegmenterConfig {
            max_receipt_bytes: 100_000,
            ..Default::default()
        };
        let mut s = Segmenter::new(cfg);
        let chunk = vec![b'x'; 64 << 10];
        let mut closed = Vec::new();
        for _ in 0..16 {
            closed.extend(s.push(&chunk));
        }
        assert!(!closed.is_empty());
        for r in &closed {
            assert_eq!(r.end, EndReason::SizeLimit);
            assert!(r.raw.len() <= 64 << 10);
            assert!(r.lines.iter().all(|l| l.chars().count() <= 512));
            assert!(r.lines_truncated);
        }
    }

    #[test]
    fn truncated_command_at_idle_is_reported() {
        let r = seg(
            SegmenterConfig::default(),
            &[b"A\n\x1dv0\x00\x10\x00\x10\x00abc"],
        );
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].lines, vec!["A"]);
        assert!(!r[0].malformed.is_empty());
    }
}
