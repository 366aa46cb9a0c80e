//! What an ESC/POS printer says about itself: the replies to `DLE EOT n` (real-time status,
//! n = 1..4) and Automatic Status Back (ASB, 4 bytes pushed on every change once `GS a` enabled
//! it), read from the printer-to-POS byte stream. No I/O.
//!
//! The bytes a printer sends are told apart by their fixed bits (ESC/POS reference, "transmission
//! status identification"):
//!
//! | sent | pattern | |
//! |---|---|---|
//! | `DLE EOT n` reply | `0xx1 xx10` | one byte; which `n` it answers is the order of the requests |
//! | ASB, first byte | `0xx1 xx00` | three more bytes `0xx0 xxxx` follow |
//! | `GS r` reply, XON/XOFF | `0xx0 xxxx` | not read here |
//! | `GS I` / `GS ( E` block | header `0x5F` or `0x37`, data, `NUL` | skipped |
//!
//! Bit layouts read (the rest is undefined or model specific, and ignored):
//!
//! | source | bit | fault |
//! |---|---|---|
//! | `DLE EOT 1` (printer) | 3 | `offline` |
//! | `DLE EOT 2` (offline cause) | 2 | `cover_open` |
//! | | 5 | `paper_out` (printing stopped at paper end) |
//! | `DLE EOT 3` (error cause) | 3 | `cutter_error` |
//! | | 5 | `unrecoverable_error` |
//! | | 6 | `auto_recoverable_error` (e.g. head too hot) |
//! | `DLE EOT 4` (roll paper sensor) | 2, 3 | `paper_near_end` |
//! | | 5, 6 | `paper_out` |
//! | ASB byte 1 | 3 / 5 | `offline` / `cover_open` |
//! | ASB byte 2 | 3 / 5 / 6 | `cutter_error` / `unrecoverable_error` / `auto_recoverable_error` |
//! | ASB byte 3 | 0, 1 / 2, 3 | `paper_near_end` / `paper_out` |
//!
//! Invariants: each reply is an [`Observation`] that says which faults it covers and which of
//! those are present; applying observations in order gives the printer's faults, the newest
//! word on each fault winning (a stale ASB from an earlier POS connection is overruled by the
//! next status reply that covers the same fault). Memory is bounded whatever the printer sends.

use std::collections::VecDeque;

/// A printer fault an operator acts on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Fault {
    PaperOut,
    CoverOpen,
    CutterError,
    UnrecoverableError,
    AutoRecoverableError,
    PaperNearEnd,
    Offline,
}

impl Fault {
    /// Every fault, most urgent first (the order of status sentences).
    pub const ALL: [Fault; 7] = [
        Fault::PaperOut,
        Fault::CoverOpen,
        Fault::CutterError,
        Fault::UnrecoverableError,
        Fault::AutoRecoverableError,
        Fault::PaperNearEnd,
        Fault::Offline,
    ];

    /// The label in status, metrics and records.
    pub fn label(self) -> &'static str {
        match self {
            Fault::PaperOut => "paper_out",
            Fault::CoverOpen => "cover_open",
            Fault::CutterError => "cutter_error",
            Fault::UnrecoverableError => "unrecoverable_error",
            Fault::AutoRecoverableError => "auto_recoverable_error",
            Fault::PaperNearEnd => "paper_near_end",
            Fault::Offline => "offline",
        }
    }

    /// The words for a status sentence ("lane 3 printer: out of paper").
    pub fn words(self) -> &'static str {
        match self {
            Fault::PaperOut => "out of paper",
            Fault::CoverOpen => "cover open",
            Fault::CutterError => "autocutter error (paper jam?)",
            Fault::UnrecoverableError => "unrecoverable error (needs service)",
            Fault::AutoRecoverableError => {
                "auto-recoverable error (print head too hot?), waits to recover"
            }
            Fault::PaperNearEnd => "paper roll nearly empty",
            Fault::Offline => "offline",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

/// A set of faults.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Faults(u8);

impl Faults {
    pub const NONE: Faults = Faults(0);

    pub fn of(faults: &[Fault]) -> Faults {
        Faults(faults.iter().fold(0, |a, f| a | f.bit()))
    }

    pub fn contains(self, f: Fault) -> bool {
        self.0 & f.bit() != 0
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    fn with(self, f: Fault, on: bool) -> Faults {
        if on { Faults(self.0 | f.bit()) } else { self }
    }

    pub fn union(self, other: Faults) -> Faults {
        Faults(self.0 | other.0)
    }

    pub fn minus(self, other: Faults) -> Faults {
        Faults(self.0 & !other.0)
    }

    /// The faults in [`Fault::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Fault> {
        Fault::ALL.into_iter().filter(move |f| self.contains(*f))
    }

    pub fn labels(self) -> Vec<&'static str> {
        self.iter().map(Fault::label).collect()
    }

    /// "out of paper, cover open".
    pub fn words(self) -> String {
        self.iter().map(Fault::words).collect::<Vec<_>>().join(", ")
    }

    /// The faults after `obs`: the covered ones as `obs` says, the others unchanged.
    pub fn apply(self, obs: Observation) -> Faults {
        self.minus(obs.covers)
            .union(Faults(obs.present.0 & obs.covers.0))
    }
}

/// What one status reply tells: the faults it covers, and which of those are present.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub covers: Faults,
    pub present: Faults,
}

/// A status message the printer sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusReply {
    /// The reply `byte` to `DLE EOT n`.
    RealTime { n: u8, byte: u8 },
    /// An Automatic Status Back message.
    Asb([u8; 4]),
}

fn bit(b: u8, i: u8) -> bool {
    b & (1 << i) != 0
}

impl StatusReply {
    /// The faults this reply reports on (`None` for a `DLE EOT n` this reader does not
    /// interpret, e.g. n = 7, ink).
    pub fn observation(self) -> Option<Observation> {
        use Fault::*;
        let (covers, present) = match self {
            StatusReply::RealTime { n: 1, byte } => (
                Faults::of(&[Offline]),
                Faults::NONE.with(Offline, bit(byte, 3)),
            ),
            // Bit 5 says printing stopped at the paper end; whether paper is present is DLE EOT 4's
            // word, so this reply covers paper_out only when it reports it.
            StatusReply::RealTime { n: 2, byte } => (
                Faults::of(&[CoverOpen]).with(PaperOut, bit(byte, 5)),
                Faults::NONE
                    .with(CoverOpen, bit(byte, 2))
                    .with(PaperOut, bit(byte, 5)),
            ),
            StatusReply::RealTime { n: 3, byte } => (
                Faults::of(&[CutterError, UnrecoverableError, AutoRecoverableError]),
                Faults::NONE
                    .with(CutterError, bit(byte, 3))
                    .with(UnrecoverableError, bit(byte, 5))
                    .with(AutoRecoverableError, bit(byte, 6)),
            ),
            StatusReply::RealTime { n: 4, byte } => (
                Faults::of(&[PaperNearEnd, PaperOut]),
                Faults::NONE
                    .with(PaperNearEnd, byte & 0x0C != 0)
                    .with(PaperOut, byte & 0x60 != 0),
            ),
            StatusReply::RealTime { .. } => return None,
            StatusReply::Asb([b1, b2, b3, _]) => (
                Faults::of(&Fault::ALL),
                Faults::NONE
                    .with(Offline, bit(b1, 3))
                    .with(CoverOpen, bit(b1, 5))
                    .with(CutterError, bit(b2, 3))
                    .with(UnrecoverableError, bit(b2, 5))
                    .with(AutoRecoverableError, bit(b2, 6))
                    .with(PaperNearEnd, b3 & 0x03 != 0)
                    .with(PaperOut, b3 & 0x0C != 0),
            ),
        };
        Some(Observation { covers, present })
    }
}

/// Requests remembered while their replies are outstanding; older ones are forgotten (a printer
/// that answers none of them must not grow the queue).
const MAX_PENDING: usize = 32;
/// A block reply (`GS I`, `GS ( E`) longer than this has lost its NUL; reading resumes.
const MAX_BLOCK: usize = 128;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Idle,
    /// Inside an ASB message: bytes so far.
    Asb([u8; 4], usize),
    /// Inside a NUL-terminated block reply: bytes skipped so far.
    Block(usize),
}

/// Reads the printer-to-POS stream of one connection. Feed it the `DLE EOT n` requests the POS (or
/// the agent) sent, in order, with [`StatusReader::requested`], and the printer's bytes with
/// [`StatusReader::push`]; any split of the bytes gives the same replies.
#[derive(Debug, Clone)]
pub struct StatusReader {
    pending: VecDeque<u8>,
    mode: Mode,
    /// Bytes that were no status reply this reader knows (GS r replies, block data, noise).
    pub other_bytes: u64,
}

impl Default for StatusReader {
    fn default() -> Self {
        Self::new()
    }
}

impl StatusReader {
    pub fn new() -> StatusReader {
        StatusReader {
            pending: VecDeque::new(),
            mode: Mode::Idle,
            other_bytes: 0,
        }
    }

    /// A `DLE EOT n` went to the printer; its one-byte reply comes in request order.
    pub fn requested(&mut self, n: u8) {
        if self.pending.len() >= MAX_PENDING {
            self.pending.pop_front();
        }
        self.pending.push_back(n);
    }

    /// Replies still outstanding.
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// Reads printer bytes; the status messages completed in them are appended to `out`.
    pub fn push(&mut self, bytes: &[u8], out: &mut Vec<StatusReply>) {
        for &b in bytes {
            self.byte(b, out);
        }
    }

    fn byte(&mut self, b: u8, out: &mut Vec<StatusReply>) {
        match self.mode {
            Mode::Asb(mut m, i) => {
                if b & 0x90 == 0 {
                    m[i] = b;
                    if i == 3 {
                        self.mode = Mode::Idle;
                        out.push(StatusReply::Asb(m));
                    } else {
                        self.mode = Mode::Asb(m, i + 1);
                    }
                    return;
                }
                // Not an ASB continuation: the message was cut short; read this byte afresh.
                self.other_bytes += i as u64;
                self.mode = Mode::Idle;
            }
            Mode::Block(n) => {
                self.other_bytes += 1;
                self.mode = if b == 0 || n + 1 >= MAX_BLOCK {
                    Mode::Idle
                } else {
                    Mode::Block(n + 1)
                };
                return;
            }
            Mode::Idle => {}
        }
        if b & 0x93 == 0x12
            && let Some(n) = self.pending.pop_front()
        {
            out.push(StatusReply::RealTime { n, byte: b });
        } else if b & 0x93 == 0x10 {
            let mut m = [0u8; 4];
            m[0] = b;
            self.mode = Mode::Asb(m, 1);
        } else if b == 0x5F || b == 0x37 {
            self.other_bytes += 1;
            self.mode = Mode::Block(1);
        } else {
            self.other_bytes += 1;
        }
    }
}

/// What the agent's probe sends: `DLE EOT 1` to `4`, one status byte back for each.
pub const PROBE_REQUEST: [u8; 12] = [
    0x10, 0x04, 0x01, 0x10, 0x04, 0x02, 0x10, 0x04, 0x03, 0x10, 0x04, 0x04,
];

#[cfg(test)]
mod tests {
    use super::*;

    fn read(requests: &[u8], bytes: &[u8]) -> Vec<StatusReply> {
        let mut r = StatusReader::new();
        for &n in requests {
            r.requested(n);
        }
        let mut out = Vec::new();
        r.push(bytes, &mut out);
        out
    }

    fn faults_of(requests: &[u8], bytes: &[u8]) -> Faults {
        read(requests, bytes)
            .into_iter()
            .filter_map(StatusReply::observation)
            .fold(Faults::NONE, Faults::apply)
    }

    /// A TM-T88-class printer at rest: DLE EOT 1..4 answer 0x16 (drawer pin high), 0x12, 0x12, 0x12.
    #[test]
    fn a_healthy_printer_has_no_faults() {
        let f = faults_of(&[1, 2, 3, 4], &[0x16, 0x12, 0x12, 0x12]);
        assert!(f.is_empty(), "{:?}", f.labels());
    }

    /// Out of paper: offline (0x1A), stopped at paper end (0x32), both roll sensors (0x7E).
    #[test]
    fn paper_out_is_read_from_dle_eot_1_2_and_4() {
        let f = faults_of(&[1, 2, 3, 4], &[0x1A, 0x32, 0x12, 0x7E]);
        assert_eq!(f.labels(), vec!["paper_out", "paper_near_end", "offline"]);
        assert_eq!(f.words(), "out of paper, paper roll nearly empty, offline");
        // Only the near-end sensor: a warning, the printer is still online.
        let f = faults_of(&[4, 1], &[0x1E, 0x12]);
        assert_eq!(f.labels(), vec!["paper_near_end"]);
    }

    /// Cover open: offline (0x1A) with the cover bit of DLE EOT 2 (0x16).
    #[test]
    fn cover_open_is_read_from_dle_eot_2() {
        let f = faults_of(&[1, 2], &[0x1A, 0x16]);
        assert_eq!(f.labels(), vec!["cover_open", "offline"]);
    }

    /// DLE EOT 3: autocutter (0x1A), unrecoverable (0x32), auto-recoverable (0x52).
    #[test]
    fn error_causes_are_read_from_dle_eot_3() {
        assert_eq!(faults_of(&[3], &[0x1A]).labels(), vec!["cutter_error"]);
        assert_eq!(
            faults_of(&[3], &[0x32]).labels(),
            vec!["unrecoverable_error"]
        );
        assert_eq!(
            faults_of(&[3], &[0x52]).labels(),
            vec!["auto_recoverable_error"]
        );
    }

    /// ASB: byte 1 cover open + offline (0x38), byte 2 none, byte 3 paper end (0x0C), byte 4
    /// undefined; then the all-clear ASB the printer pushes when the cover closes and paper is in.
    #[test]
    fn asb_messages_report_and_clear_faults() {
        let replies = read(&[], &[0x38, 0x00, 0x0C, 0x00]);
        assert_eq!(replies, vec![StatusReply::Asb([0x38, 0x00, 0x0C, 0x00])]);
        let f = faults_of(&[], &[0x38, 0x00, 0x0C, 0x00]);
        assert_eq!(f.labels(), vec!["paper_out", "cover_open", "offline"]);
        let f = faults_of(&[], &[0x38, 0x00, 0x0C, 0x00, 0x14, 0x00, 0x00, 0x0F]);
        assert!(f.is_empty(), "{:?}", f.labels());
        // ASB byte 2: autocutter error (0x08); byte 3 near end (0x03).
        let f = faults_of(&[], &[0x14, 0x08, 0x03, 0x00]);
        assert_eq!(f.labels(), vec!["cutter_error", "paper_near_end"]);
    }

    /// The newest word on a fault wins: a paper-out ASB is overruled by a DLE EOT 4 reply that
    /// says the roll is there, and DLE EOT 4 says nothing about the cover.
    #[test]
    fn newer_replies_overrule_older_ones_per_fault() {
        let mut r = StatusReader::new();
        let mut out = Vec::new();
        r.push(&[0x38, 0x00, 0x0C, 0x00], &mut out);
        r.requested(4);
        r.push(&[0x12], &mut out);
        let f = out
            .into_iter()
            .filter_map(StatusReply::observation)
            .fold(Faults::NONE, Faults::apply);
        assert_eq!(f.labels(), vec!["cover_open", "offline"]);
    }

    /// ASB, DLE EOT replies, GS r replies and a GS I block interleaved, split byte by byte: the
    /// same replies as in one piece, each DLE EOT reply matched to its request in order.
    #[test]
    fn mixed_printer_bytes_any_split() {
        let bytes = [
            0x00, // GS r reply: not a status reply here
            0x16, // DLE EOT 1
            0x14, 0x00, 0x00, 0x0F, // ASB
            0x5F, b'T', b'M', 0x12, 0x10, 0x00, // GS I block "_TM..\0": skipped
            0x32, // DLE EOT 2
            0x1A, // DLE EOT 3
        ];
        let want = vec![
            StatusReply::RealTime { n: 1, byte: 0x16 },
            StatusReply::Asb([0x14, 0x00, 0x00, 0x0F]),
            StatusReply::RealTime { n: 2, byte: 0x32 },
            StatusReply::RealTime { n: 3, byte: 0x1A },
        ];
        assert_eq!(read(&[1, 2, 3], &bytes), want);
        let mut r = StatusReader::new();
        for n in [1, 2, 3] {
            r.requested(n);
        }
        let mut out = Vec::new();
        for b in bytes {
            r.push(&[b], &mut out);
        }
        assert_eq!(out, want);
        assert_eq!(r.outstanding(), 0);
    }

    /// A reply-shaped byte with no request outstanding is no reply; a cut-short ASB is dropped
    /// and the byte that cut it is read afresh; requests are bounded.
    #[test]
    fn unrequested_and_broken_messages_are_not_replies() {
        assert!(read(&[], &[0x12]).is_empty());
        assert_eq!(
            read(&[1], &[0x14, 0x00, 0x16]),
            vec![StatusReply::RealTime { n: 1, byte: 0x16 }]
        );
        let mut r = StatusReader::new();
        for _ in 0..1000 {
            r.requested(1);
        }
        assert_eq!(r.outstanding(), MAX_PENDING);
        // DLE EOT 7 (ink) is matched but not interpreted.
        assert_eq!(
            StatusReply::RealTime { n: 7, byte: 0x12 }.observation(),
            None
        );
    }

    #[test]
    fn the_probe_is_dle_eot_1_to_4() {
        let mut t = super::super::Tokenizer::new(super::super::CodePage::DEFAULT);
        let mut n = Vec::new();
        t.push(&PROBE_REQUEST, |tok, _| {
            if let super::super::Token::RealTime(
                super::super::tokenizer::RealTime::StatusRequest(x),
            ) = tok
            {
                n.push(x)
            }
        });
        assert_eq!(n, vec![1, 2, 3, 4]);
    }
}
