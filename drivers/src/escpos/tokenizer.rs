//! A streaming ESC/POS tokenizer.
//!
//! It knows the length of every command it meets, so that image, barcode and 2D-code bytes never
//! leak into text: fixed-length commands, commands with a length prefix (`GS ( k`, `GS ( L`, `GS 8 L`,
//! `ESC ( A`...), raster and bit images (`GS v 0`, `ESC *`, `GS *`, `FS q`, `GS Q 0`), NUL-terminated
//! barcodes (`GS k m d... NUL`) and counted ones (`GS k m n d...`), user-defined characters
//! (`ESC &`), and the real-time `DLE` commands, which may arrive between any two commands, in the
//! middle of a printed line.
//!
//! Invariants:
//! * Memory is bounded whatever arrives: a text run is flushed every [`MAX_TEXT_RUN`] bytes, barcode
//!   and 2D-code data is kept up to [`MAX_CODE_DATA`] bytes (the rest is skipped), image data is
//!   counted, never stored, and a declared length above [`MAX_DECLARED_LEN`] is treated as garbage
//!   (the tokenizer resynchronises right after the header instead of swallowing the stream).
//! * Every byte belongs to exactly one token; `push` can be fed any split of the same stream and
//!   produces the same tokens (text runs may be split differently).
//! * Unknown commands are reported as [`Token::Unknown`] (two bytes consumed), never guessed at.
//!
//! Bytes inside a command's data are data: a `DLE EOT` inside image data is not a real-time command.
//! Epson documents that its printers may misinterpret such a sequence; POS software avoids it, and
//! treating it as data keeps the byte count right.

use super::codepage::CodePage;

/// Longest text run kept in one [`Token::Text`].
pub const MAX_TEXT_RUN: usize = 4096;
/// Barcode / 2D-code data kept per code (a QR code holds at most 7089 characters).
pub const MAX_CODE_DATA: usize = 8192;
/// Larger declared lengths are treated as garbage (a 576-dot-wide 80 mm logo is ~40 KB).
pub const MAX_DECLARED_LEN: u64 = 4 << 20;
/// A NUL-terminated barcode longer than this has no terminator.
const MAX_NUL_BARCODE: usize = 255;

const ESC: u8 = 0x1B;
const FS: u8 = 0x1C;
const GS: u8 = 0x1D;
const DLE: u8 = 0x10;

/// A real-time command (`DLE ...`): executed by the printer as soon as it arrives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RealTime {
    /// `DLE EOT n [a]`: transmit real-time status; the printer answers with one byte.
    StatusRequest(u8),
    /// `DLE ENQ n`: real-time request to the printer.
    Request(u8),
    /// `DLE DC4 fn ...`: pulse, power-off, buzzer, clear buffer...
    Function(u8),
}

/// The data kind a barcode or 2D command carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CodeKind {
    Barcode(u8),
    TwoD,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Token {
    /// Printable text decoded with the active code page (no control characters).
    Text(String),
    /// End of a printed line: LF, FF, or a print-and-feed command (`ESC J`, `ESC d`, `ESC e`).
    LineFeed,
    /// `ESC @`: the printer is reset to its defaults (code page included).
    Init,
    /// `GS V`, `ESC i`, `ESC m`.
    Cut {
        partial: bool,
    },
    /// `ESC p m t1 t2` or `DLE DC4 1 m t`: a cash-drawer pulse on connector pin 2 or 5.
    DrawerKick {
        pin: u8,
    },
    /// `ESC t n`: the code page changed.
    CodePage(u8),
    /// `GS k`: a 1D barcode (`symbology` is the `m` byte) with its data.
    Barcode {
        symbology: u8,
        data: Vec<u8>,
    },
    /// `GS ( k` store-data function: the data of a QR / PDF417 / MaxiCode / DataMatrix code.
    Code2D {
        data: Vec<u8>,
    },
    /// A raster or bit image (`bytes` of image data were skipped), or the print of a stored one.
    Image {
        bytes: u64,
    },
    RealTime(RealTime),
    /// `GS r n` / `GS I n` / `ESC v`: a queued status request; the printer replies.
    StatusRequest {
        command: u8,
        n: u8,
    },
    /// A known command that does not change the content (styles, spacing, alignment, setup).
    Setting,
    /// A control byte outside any command (NUL, CR, CAN, HT, BEL...).
    Control(u8),
    /// An `ESC`/`FS`/`GS`/`DLE` sequence this tokenizer does not know; two bytes were consumed.
    Unknown {
        prefix: u8,
        command: u8,
    },
    /// A command whose parameters make no sense; the tokenizer resynchronised after its header.
    Malformed(&'static str),
}

/// What the classifier decided about the header bytes collected so far.
enum Step {
    More,
    Emit(Token),
    /// Emit the token for the prefix byte alone and process the last byte again from scratch.
    Reject(Token),
    Skip {
        len: u64,
        image: bool,
    },
    Collect {
        len: usize,
        kind: CodeKind,
    },
    UntilNul {
        kind: Option<CodeKind>,
        max: usize,
    },
    UserChars {
        y: u8,
        count: u16,
    },
    NvImages {
        count: u8,
    },
    Malformed(&'static str),
}

#[derive(Debug)]
enum State {
    Ground,
    Header,
    Skip {
        remaining: u64,
        total: u64,
        image: bool,
    },
    Collect {
        remaining: usize,
        kind: CodeKind,
    },
    /// Data until NUL; `kind` None for setting lists (`ESC D`), which are dropped.
    UntilNul {
        kind: Option<CodeKind>,
        max: usize,
        seen: usize,
    },
    /// `ESC & y c1 c2 [x d1...d(y*x)]...`: `count` characters remain; 0 pending means "read x".
    UserChars {
        y: u8,
        count: u16,
        pending: u64,
    },
    /// `FS q n [xL xH yL yH d...]...`: images remaining, header bytes of the current one.
    NvImages {
        count: u8,
        hdr: [u8; 4],
        hdr_len: u8,
        pending: u64,
    },
}

/// Counters a driver reports in its status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenizerStats {
    pub bytes: u64,
    pub unknown_commands: u64,
    pub malformed_commands: u64,
    pub image_bytes: u64,
}

#[derive(Debug)]
pub struct Tokenizer {
    state: State,
    hdr: [u8; 12],
    hdr_len: usize,
    text: Vec<u8>,
    data: Vec<u8>,
    default_page: CodePage,
    page: CodePage,
    stats: TokenizerStats,
}

impl Tokenizer {
    pub fn new(default_page: CodePage) -> Tokenizer {
        Tokenizer {
            state: State::Ground,
            hdr: [0; 12],
            hdr_len: 0,
            text: Vec::new(),
            data: Vec::new(),
            default_page,
            page: default_page,
            stats: TokenizerStats::default(),
        }
    }

    pub fn stats(&self) -> TokenizerStats {
        self.stats
    }

    /// The code page text is currently decoded with.
    pub fn code_page(&self) -> CodePage {
        self.page
    }

    /// True when no command is half-way through (a receipt can end here).
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, State::Ground)
    }

    /// Feeds bytes. `emit(token, end)` is called for every complete token; `end` is the index in
    /// `input` just past the token's last byte (0 for a token completed by an earlier push, e.g. text
    /// flushed by a control byte at index 0).
    pub fn push(&mut self, input: &[u8], mut emit: impl FnMut(Token, usize)) {
        self.stats.bytes += input.len() as u64;
        let mut i = 0;
        while i < input.len() {
            match &mut self.state {
                State::Ground => {
                    let b = input[i];
                    if is_text(b) {
                        // Fast path: take the whole printable run.
                        let run = input[i..].iter().take_while(|&&c| is_text(c)).count();
                        let mut take = &input[i..i + run];
                        while !take.is_empty() {
                            let room = MAX_TEXT_RUN - self.text.len();
                            let n = room.min(take.len());
                            self.text.extend_from_slice(&take[..n]);
                            take = &take[n..];
                            if self.text.len() >= MAX_TEXT_RUN {
                                self.flush_text_at(i + run - take.len(), &mut emit);
                            }
                        }
                        i += run;
                        continue;
                    }
                    self.flush_text_at(i, &mut emit);
                    i += 1;
                    match b {
                        b'\n' | 0x0C => emit(Token::LineFeed, i),
                        ESC | FS | GS | DLE => {
                            self.hdr[0] = b;
                            self.hdr_len = 1;
                            self.state = State::Header;
                        }
                        other => emit(Token::Control(other), i),
                    }
                }
                State::Header => {
                    let b = input[i];
                    i += 1;
                    self.hdr[self.hdr_len] = b;
                    self.hdr_len += 1;
                    let step = classify(&self.hdr[..self.hdr_len]);
                    if !matches!(step, Step::More) {
                        self.hdr_len = 0;
                        self.state = State::Ground;
                    }
                    match step {
                        Step::More => {
                            if self.hdr_len == self.hdr.len() {
                                // classify never needs more than the buffer; defensive resync.
                                self.hdr_len = 0;
                                self.state = State::Ground;
                                self.malformed("command header too long", i, &mut emit);
                            }
                        }
                        Step::Emit(t) => self.apply(t, i, &mut emit),
                        Step::Reject(t) => {
                            self.note(&t);
                            emit(t, i - 1);
                            i -= 1;
                        }
                        Step::Malformed(why) => self.malformed(why, i, &mut emit),
                        Step::Skip { len, image } => {
                            if len > MAX_DECLARED_LEN {
                                self.malformed("declared data length is implausibly large (line noise or a wrong baud rate?)", i, &mut emit);
                            } else if len == 0 {
                                self.finish_skip(0, image, i, &mut emit);
                            } else {
                                self.state = State::Skip {
                                    remaining: len,
                                    total: len,
                                    image,
                                };
                            }
                        }
                        Step::Collect { len, kind } => {
                            self.data.clear();
                            if len == 0 {
                                self.finish_code(kind, i, &mut emit);
                            } else if len as u64 > MAX_DECLARED_LEN {
                                self.malformed(
                                    "declared code length is implausibly large",
                                    i,
                                    &mut emit,
                                );
                            } else {
                                self.state = State::Collect {
                                    remaining: len,
                                    kind,
                                };
                            }
                        }
                        Step::UntilNul { kind, max } => {
                            self.data.clear();
                            self.state = State::UntilNul { kind, max, seen: 0 };
                        }
                        Step::UserChars { y, count } => {
                            self.state = if count == 0 {
                                emit(Token::Setting, i);
                                State::Ground
                            } else {
                                State::UserChars {
                                    y,
                                    count,
                                    pending: 0,
                                }
                            };
                        }
                        Step::NvImages { count } => {
                            self.state = if count == 0 {
                                emit(Token::Setting, i);
                                State::Ground
                            } else {
                                State::NvImages {
                                    count,
                                    hdr: [0; 4],
                                    hdr_len: 0,
                                    pending: 0,
                                }
                            };
                        }
                    }
                }
                State::Skip {
                    remaining,
                    total,
                    image,
                } => {
                    let n = (*remaining).min((input.len() - i) as u64);
                    *remaining -= n;
                    i += n as usize;
                    if *remaining == 0 {
                        let (total, image) = (*total, *image);
                        self.state = State::Ground;
                        self.finish_skip(total, image, i, &mut emit);
                    }
                }
                State::Collect { remaining, kind } => {
                    let n = (*remaining).min(input.len() - i);
                    let keep = n.min(MAX_CODE_DATA.saturating_sub(self.data.len()));
                    self.data.extend_from_slice(&input[i..i + keep]);
                    *remaining -= n;
                    i += n;
                    if *remaining == 0 {
                        let kind = *kind;
                        self.state = State::Ground;
                        self.finish_code(kind, i, &mut emit);
                    }
                }
                State::UntilNul { kind, max, seen } => {
                    let b = input[i];
                    i += 1;
                    if b == 0 {
                        let kind = *kind;
                        self.state = State::Ground;
                        match kind {
                            Some(k) => self.finish_code(k, i, &mut emit),
                            None => emit(Token::Setting, i),
                        }
                    } else {
                        *seen += 1;
                        if *seen > *max {
                            self.state = State::Ground;
                            self.data.clear();
                            self.malformed(
                                "barcode or tab list without its NUL terminator",
                                i,
                                &mut emit,
                            );
                        } else if kind.is_some() {
                            self.data.push(b);
                        }
                    }
                }
                State::UserChars { y, count, pending } => {
                    if *pending == 0 {
                        // Read x (dots wide) of the next character.
                        let x = u64::from(input[i]);
                        i += 1;
                        *pending = u64::from(*y) * x;
                        if *pending == 0 {
                            *count -= 1;
                        }
                    } else {
                        let n = (*pending).min((input.len() - i) as u64);
                        *pending -= n;
                        i += n as usize;
                        if *pending == 0 {
                            *count -= 1;
                        }
                    }
                    if let State::UserChars {
                        count: 0,
                        pending: 0,
                        ..
                    } = self.state
                    {
                        self.state = State::Ground;
                        emit(Token::Setting, i);
                    }
                }
                State::NvImages {
                    count,
                    hdr,
                    hdr_len,
                    pending,
                } => {
                    if *pending == 0 && *hdr_len < 4 {
                        hdr[usize::from(*hdr_len)] = input[i];
                        *hdr_len += 1;
                        i += 1;
                        if *hdr_len == 4 {
                            let x = u64::from(u16::from_le_bytes([hdr[0], hdr[1]]));
                            let y = u64::from(u16::from_le_bytes([hdr[2], hdr[3]]));
                            *pending = x * y * 8;
                            if *pending == 0 {
                                *count -= 1;
                                *hdr_len = 0;
                            }
                        }
                    } else {
                        let n = (*pending).min((input.len() - i) as u64);
                        *pending -= n;
                        self.stats.image_bytes += n;
                        i += n as usize;
                        if *pending == 0 {
                            *count -= 1;
                            *hdr_len = 0;
                        }
                    }
                    if let State::NvImages { count: 0, .. } = self.state {
                        self.state = State::Ground;
                        emit(Token::Image { bytes: 0 }, i);
                    }
                }
            }
        }
    }

    /// Emits buffered text (call on an idle gap, before a receipt is closed without a line feed).
    pub fn flush(&mut self, mut emit: impl FnMut(Token, usize)) {
        self.flush_text_at(0, &mut emit);
    }

    /// Forgets a half-received command and buffered text (after a reconnect: the stream restarts).
    pub fn reset(&mut self) {
        self.state = State::Ground;
        self.hdr_len = 0;
        self.text.clear();
        self.data.clear();
        self.page = self.default_page;
    }

    fn flush_text_at(&mut self, at: usize, emit: &mut impl FnMut(Token, usize)) {
        if self.text.is_empty() {
            return;
        }
        let mut s = String::with_capacity(self.text.len());
        self.page.decode_into(&self.text, &mut s);
        self.text.clear();
        emit(Token::Text(s), at);
    }

    fn note(&mut self, t: &Token) {
        if matches!(t, Token::Unknown { .. }) {
            self.stats.unknown_commands += 1;
        }
    }

    fn apply(&mut self, t: Token, at: usize, emit: &mut impl FnMut(Token, usize)) {
        match &t {
            Token::Init => self.page = self.default_page,
            Token::CodePage(n) => self.page = CodePage::from_esc_t(*n),
            _ => {}
        }
        self.note(&t);
        emit(t, at);
    }

    fn malformed(&mut self, why: &'static str, at: usize, emit: &mut impl FnMut(Token, usize)) {
        self.stats.malformed_commands += 1;
        emit(Token::Malformed(why), at);
    }

    fn finish_skip(
        &mut self,
        total: u64,
        image: bool,
        at: usize,
        emit: &mut impl FnMut(Token, usize),
    ) {
        if image {
            self.stats.image_bytes += total;
            emit(Token::Image { bytes: total }, at);
        } else {
            emit(Token::Setting, at);
        }
    }

    fn finish_code(&mut self, kind: CodeKind, at: usize, emit: &mut impl FnMut(Token, usize)) {
        let data = std::mem::take(&mut self.data);
        match kind {
            CodeKind::Barcode(symbology) => emit(Token::Barcode { symbology, data }, at),
            CodeKind::TwoD => emit(Token::Code2D { data }, at),
        }
    }
}

fn is_text(b: u8) -> bool {
    b >= 0x20 && b != 0x7F
}

fn le16(lo: u8, hi: u8) -> u64 {
    u64::from(u16::from_le_bytes([lo, hi]))
}

/// Decides how long the command whose first bytes are `h` is. `h[0]` is ESC, FS, GS or DLE.
fn classify(h: &[u8]) -> Step {
    use Step::*;
    if h.len() < 2 {
        return More;
    }
    let (p, c) = (h[0], h[1]);
    let n = h.len();
    // Fixed length: more bytes until `len`, then the token.
    let fixed = |len: usize, t: Token| if n < len { More } else { Emit(t) };
    let unknown = || {
        Emit(Token::Unknown {
            prefix: p,
            command: c,
        })
    };
    match p {
        ESC => match c {
            b'@' => Emit(Token::Init),
            b'i' => Emit(Token::Cut { partial: false }),
            b'm' => Emit(Token::Cut { partial: true }),
            0x0C => Emit(Token::LineFeed),
            b'2' | b'<' | b'L' | b'S' => Emit(Token::Setting),
            b'v' => Emit(Token::StatusRequest {
                command: b'v',
                n: 0,
            }),
            b'J' | b'd' | b'e' => fixed(3, Token::LineFeed),
            b't' => {
                if n < 3 {
                    More
                } else {
                    Emit(Token::CodePage(h[2]))
                }
            }
            b' ' | b'!' | b'%' | b'-' | b'3' | b'=' | b'?' | b'E' | b'G' | b'K' | b'M' | b'R'
            | b'T' | b'U' | b'V' | b'a' | b'r' | b'u' | b'{' => fixed(3, Token::Setting),
            b'$' | b'\\' => fixed(4, Token::Setting),
            b'c' => fixed(4, Token::Setting),
            b'p' => {
                if n < 5 {
                    More
                } else {
                    Emit(Token::DrawerKick {
                        pin: if h[2] & 1 == 0 { 2 } else { 5 },
                    })
                }
            }
            b'W' => fixed(10, Token::Setting),
            b'D' => UntilNul {
                kind: None,
                max: 33,
            },
            b'*' => {
                if n < 5 {
                    return More;
                }
                let k = le16(h[3], h[4]);
                let per_col = match h[2] {
                    0 | 1 => 1,
                    32 | 33 => 3,
                    _ => return Malformed("ESC * with an unknown bit-image mode"),
                };
                Skip {
                    len: k * per_col,
                    image: true,
                }
            }
            b'&' => {
                if n < 5 {
                    return More;
                }
                let (y, c1, c2) = (h[2], h[3], h[4]);
                if c2 < c1 || y == 0 || y > 3 {
                    return Malformed("ESC & with an invalid character range");
                }
                UserChars {
                    y,
                    count: u16::from(c2 - c1) + 1,
                }
            }
            b'(' => {
                if n < 5 {
                    More
                } else {
                    Skip {
                        len: le16(h[3], h[4]),
                        image: false,
                    }
                }
            }
            _ => unknown(),
        },
        FS => match c {
            b'&' | b'.' => Emit(Token::Setting),
            b'!' | b'-' | b'C' | b'W' => fixed(3, Token::Setting),
            b'S' => fixed(4, Token::Setting),
            b'p' => fixed(4, Token::Image { bytes: 0 }),
            b'2' => {
                if n < 4 {
                    More
                } else {
                    Skip {
                        len: 72,
                        image: false,
                    }
                }
            }
            b'q' => {
                if n < 3 {
                    More
                } else {
                    NvImages { count: h[2] }
                }
            }
            b'(' => {
                if n < 5 {
                    More
                } else {
                    Skip {
                        len: le16(h[3], h[4]),
                        image: false,
                    }
                }
            }
            b'g' => {
                if n < 3 {
                    return More;
                }
                match h[2] {
                    b'1' => {
                        if n < 10 {
                            More
                        } else {
                            Skip {
                                len: le16(h[8], h[9]),
                                image: false,
                            }
                        }
                    }
                    b'2' => fixed(10, Token::Setting),
                    _ => Malformed("FS g with an unknown function"),
                }
            }
            _ => unknown(),
        },
        GS => match c {
            b':' | b'c' => Emit(Token::Setting),
            b'!' | b'B' | b'E' | b'H' | b'T' | b'Z' | b'a' | b'b' | b'f' | b'h' | b'j' | b'w' => {
                fixed(3, Token::Setting)
            }
            b'/' => fixed(3, Token::Image { bytes: 0 }),
            b'r' | b'I' => {
                if n < 3 {
                    More
                } else {
                    Emit(Token::StatusRequest {
                        command: c,
                        n: h[2],
                    })
                }
            }
            b'$' | b'L' | b'P' | b'W' | b'\\' => fixed(4, Token::Setting),
            b'^' => fixed(5, Token::Setting),
            b'z' => fixed(5, Token::Setting),
            b'g' => fixed(6, Token::Setting),
            b'V' => {
                if n < 3 {
                    return More;
                }
                match h[2] {
                    0 | 48 => Emit(Token::Cut { partial: false }),
                    1 | 49 => Emit(Token::Cut { partial: true }),
                    65 | 97 | 103 => fixed(4, Token::Cut { partial: false }),
                    66 | 98 | 104 => fixed(4, Token::Cut { partial: true }),
                    _ => Malformed("GS V with an unknown cut mode"),
                }
            }
            b'k' => {
                if n < 3 {
                    return More;
                }
                let m = h[2];
                match m {
                    0..=6 => UntilNul {
                        kind: Some(CodeKind::Barcode(m)),
                        max: MAX_NUL_BARCODE,
                    },
                    65..=79 => {
                        if n < 4 {
                            More
                        } else {
                            Collect {
                                len: usize::from(h[3]),
                                kind: CodeKind::Barcode(m),
                            }
                        }
                    }
                    _ => Malformed("GS k with an unknown barcode system"),
                }
            }
            b'(' => {
                if n < 5 {
                    return More;
                }
                let len = le16(h[3], h[4]);
                match h[2] {
                    // GS ( k pL pH cn fn [m] d...: fn 80 stores the symbol data (after m).
                    b'k' => {
                        if n < 7 {
                            return More;
                        }
                        if h[6] == 80 {
                            if n < 8 {
                                return More;
                            }
                            if len < 3 {
                                return Malformed(
                                    "GS ( k store-data function shorter than its header",
                                );
                            }
                            Collect {
                                len: (len - 3) as usize,
                                kind: CodeKind::TwoD,
                            }
                        } else if len < 2 {
                            Malformed("GS ( k function shorter than its header")
                        } else {
                            Skip {
                                len: len - 2,
                                image: false,
                            }
                        }
                    }
                    b'L' => Skip { len, image: true },
                    _ => Skip { len, image: false },
                }
            }
            b'8' => {
                if n < 3 {
                    return More;
                }
                if h[2] != b'L' {
                    return Malformed("GS 8 with an unknown function");
                }
                if n < 7 {
                    return More;
                }
                Skip {
                    len: u64::from(u32::from_le_bytes([h[3], h[4], h[5], h[6]])),
                    image: true,
                }
            }
            b'v' => {
                if n < 3 {
                    return More;
                }
                if h[2] != b'0' && h[2] != 0 {
                    return Malformed("GS v with an unknown function");
                }
                if n < 8 {
                    return More;
                }
                Skip {
                    len: le16(h[4], h[5]) * le16(h[6], h[7]),
                    image: true,
                }
            }
            b'Q' => {
                if n < 3 {
                    return More;
                }
                if h[2] != b'0' {
                    return Malformed("GS Q with an unknown function");
                }
                if n < 8 {
                    return More;
                }
                Skip {
                    len: le16(h[4], h[5]) * le16(h[6], h[7]),
                    image: true,
                }
            }
            b'*' => {
                if n < 4 {
                    More
                } else {
                    Skip {
                        len: u64::from(h[2]) * u64::from(h[3]) * 8,
                        image: true,
                    }
                }
            }
            _ => unknown(),
        },
        DLE => match c {
            0x04 => {
                if n < 3 || (matches!(h[2], 7 | 8) && n < 4) {
                    More
                } else {
                    Emit(Token::RealTime(RealTime::StatusRequest(h[2])))
                }
            }
            0x05 => fixed(
                3,
                Token::RealTime(RealTime::Request(h.get(2).copied().unwrap_or(0))),
            ),
            0x14 => {
                if n < 3 {
                    return More;
                }
                let f = h[2];
                let len = match f {
                    1..=3 => 5,
                    7 => 4,
                    8 => 10,
                    _ => 3,
                };
                if n < len {
                    More
                } else if f == 1 {
                    Emit(Token::DrawerKick {
                        pin: if h[3] & 1 == 0 { 2 } else { 5 },
                    })
                } else {
                    Emit(Token::RealTime(RealTime::Function(f)))
                }
            }
            // A lone DLE is not a command: report it and read the next byte afresh.
            _ => Reject(Token::Unknown {
                prefix: DLE,
                command: 0,
            }),
        },
        _ => Reject(Token::Control(p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(chunks: &[&[u8]]) -> Vec<Token> {
        let mut t = Tokenizer::new(CodePage::DEFAULT);
        let mut out = Vec::new();
        for c in chunks {
            t.push(c, |tok, _| out.push(tok));
        }
        t.flush(|tok, _| out.push(tok));
        // Merge adjacent text for split-independence checks.
        let mut merged: Vec<Token> = Vec::new();
        for tok in out {
            if let (Some(Token::Text(a)), Token::Text(b)) = (merged.last_mut(), &tok) {
                a.push_str(b);
                continue;
            }
            merged.push(tok);
        }
        merged
    }

    fn text(s: &str) -> Token {
        Token::Text(s.into())
    }

    #[test]
    fn image_and_barcode_bytes_never_leak_into_text() {
        let mut s = Vec::new();
        s.extend_from_slice(b"\x1b@HELLO\n");
        // GS v 0: 2 bytes wide, 3 rows, data full of printable bytes and fake commands.
        s.extend_from_slice(b"\x1dv0\x00\x02\x00\x03\x00");
        s.extend_from_slice(b"AB\x1bi\n\x10");
        // ESC * 33: 2 columns of 3 bytes.
        s.extend_from_slice(b"\x1b*\x21\x02\x00XXXXXX");
        // GS ( k: QR model, store data, print.
        s.extend_from_slice(b"\x1d(k\x04\x001A2\x00");
        s.extend_from_slice(b"\x1d(k\x0c\x001P0https://x");
        s.extend_from_slice(b"\x1d(k\x03\x001Q0");
        // GS k CODE39 NUL-terminated and CODE128 counted.
        s.extend_from_slice(b"\x1dk\x04R-123\x00\x1dkI\x05{B123");
        s.extend_from_slice(b"TOTAL 1.00\n\x1dV\x42\x03");
        let got = tokens(&[&s]);
        assert_eq!(
            got,
            vec![
                Token::Init,
                text("HELLO"),
                Token::LineFeed,
                Token::Image { bytes: 6 },
                Token::Image { bytes: 6 },
                Token::Setting,
                Token::Code2D {
                    data: b"https://x".to_vec()
                },
                Token::Setting,
                Token::Barcode {
                    symbology: 4,
                    data: b"R-123".to_vec()
                },
                Token::Barcode {
                    symbology: 73,
                    data: b"{B123".to_vec()
                },
                text("TOTAL 1.00"),
                Token::LineFeed,
                Token::Cut { partial: true },
            ]
        );
    }

    #[test]
    fn every_split_of_a_stream_gives_the_same_tokens() {
        let s: &[u8] = b"\x1b@\x1bt\x13A\xd5B\n\x1dv0\x00\x01\x00\x02\x00\x1b@\x10\x04\x01C\x1b&\x03AB\x02abcdef\x01ghi\x1dk\x02123\x00\x1cq\x01\x01\x00\x01\x00........\x1dV\x00";
        let whole = tokens(&[s]);
        assert!(whole.contains(&text("A€B")), "{whole:?}");
        assert!(whole.contains(&Token::RealTime(RealTime::StatusRequest(1))));
        for cut in 0..s.len() {
            assert_eq!(tokens(&[&s[..cut], &s[cut..]]), whole, "split at {cut}");
        }
        let bytes: Vec<&[u8]> = s.chunks(1).collect();
        assert_eq!(tokens(&bytes), whole, "byte by byte");
    }

    #[test]
    fn real_time_commands_mid_line_do_not_break_text() {
        let got = tokens(&[b"SUBT\x10\x04\x01OTAL 5.00\n"]);
        assert_eq!(
            got,
            vec![
                text("SUBT"),
                Token::RealTime(RealTime::StatusRequest(1)),
                text("OTAL 5.00"),
                Token::LineFeed
            ]
        );
    }

    #[test]
    fn code_page_follows_esc_t_and_resets_on_init() {
        let got = tokens(&[b"\x9c\x1bt\x10\x80\x1b@\x9c"]);
        assert_eq!(
            got,
            vec![
                text("£"),
                Token::CodePage(16),
                text("€"),
                Token::Init,
                text("£")
            ]
        );
    }

    #[test]
    fn drawer_kicks_and_cuts_are_recognised_in_every_form() {
        let got = tokens(&[b"\x1bp\x00\x19\xfa\x10\x14\x01\x01\x05\x1dV1\x1dVA\x00\x1bi\x1bm"]);
        assert_eq!(
            got,
            vec![
                Token::DrawerKick { pin: 2 },
                Token::DrawerKick { pin: 5 },
                Token::Cut { partial: true },
                Token::Cut { partial: false },
                Token::Cut { partial: false },
                Token::Cut { partial: true },
            ]
        );
    }

    #[test]
    fn garbage_is_bounded_and_resynchronises() {
        // A huge declared GS 8 L length is rejected right after the header.
        let got = tokens(&[b"\x1d8L\xff\xff\xff\xffOK\n"]);
        assert!(matches!(got[0], Token::Malformed(_)));
        assert_eq!(&got[1..], &[text("OK"), Token::LineFeed]);
        // A NUL-terminated barcode without NUL ends after 255 bytes.
        let mut s = b"\x1dk\x04".to_vec();
        s.extend(std::iter::repeat_n(b'7', 300));
        s.extend_from_slice(b"\n");
        let got = tokens(&[&s]);
        assert!(matches!(got[0], Token::Malformed(_)), "{got:?}");
        // A 1 MB line is split into bounded text runs.
        let mut t = Tokenizer::new(CodePage::DEFAULT);
        let mut max = 0;
        t.push(&vec![b'x'; 1 << 20], |tok, _| {
            if let Token::Text(s) = tok {
                max = max.max(s.len());
            }
        });
        assert!(max <= MAX_TEXT_RUN);
        // Unknown commands are reported, not guessed.
        assert_eq!(
            tokens(&[b"\x1b\x01A"]),
            vec![
                Token::Unknown {
                    prefix: ESC,
                    command: 1
                },
                text("A")
            ]
        );
    }
}
