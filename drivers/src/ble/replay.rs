//! `source = { kind = "replay", ... }`: sightings from a capture file, at real or accelerated
//! speed, for tests, the demo and the accuracy simulator's captures.
//!
//! * **btsnoop** (`btmon -w`, Android HCI logs, [`super::sim`] captures): every LE (Extended)
//!   Advertising Report of the file, byte for byte. A monitor (btmon) capture holds several
//!   adapters; `adapters` names the receiver of each adapter index.
//! * **JSONL**: one `beacon.receiver/1` message per line (the remote receivers' schema,
//!   [`super::receivers`]).
//!
//! The file is read on its own thread (blocking reads stay off the reactor) and handed over in
//! chunks through a small bounded channel, so memory stays flat for captures of any length.
//! A record that does not parse is counted (`malformed`, `bad_message`) and skipped; a file
//! that ends in the middle of a record ends the replay with that reason in status.

use super::btsnoop::{Datalink, Reader};
use super::hci::parse_advertising_reports;
use super::receivers::parse_message;
use super::source::{Drop, Drops, Heard, RawSighting, SightingSource};
use edge_core::State;
use edge_core::status::StatusHandle;
use serde::{Deserialize, Serialize};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Sightings per chunk handed from the reading thread.
const CHUNK: usize = 512;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReplayFormat {
    /// By extension: `.jsonl`, `.ndjson`, `.json` are JSONL, anything else btsnoop.
    #[default]
    Auto,
    Btsnoop,
    Jsonl,
}

/// The event time a replayed sighting carries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Timestamps {
    /// The time it is replayed at (so a replayed walk is a live walk for the presence engine).
    #[default]
    Replayed,
    /// The time in the file (for reproducible tests).
    Original,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayConfig {
    pub path: PathBuf,
    #[serde(default)]
    pub format: ReplayFormat,
    /// 1 = real time, 10 = ten times faster, 0 = as fast as the log takes it.
    #[serde(default = "default_speed")]
    pub speed: f64,
    /// Start again at the end (the demo).
    #[serde(default, rename = "loop")]
    pub repeat: bool,
    /// The receiver id of each btsnoop adapter index (0, 1, ...); an index without one is the
    /// driver's name (index 0) or `<driver>-hci<index>`.
    #[serde(default)]
    pub adapters: Vec<String>,
    #[serde(default)]
    pub timestamps: Timestamps,
}

fn default_speed() -> f64 {
    1.0
}

impl ReplayConfig {
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if !(self.speed.is_finite() && self.speed >= 0.0) {
            p.push((
                "speed".into(),
                "must be 0 (as fast as possible) or a positive factor".into(),
            ));
        }
        if self.path.as_os_str().is_empty() {
            p.push(("path".into(), "must name a capture file".into()));
        }
        for (i, a) in self.adapters.iter().enumerate() {
            if !super::receivers::valid_id(a) {
                p.push((
                    format!("adapters[{i}]"),
                    "must be a receiver id (1-64 of A-Z a-z 0-9 . _ -)".into(),
                ));
            }
        }
        p
    }

    fn format(&self) -> ReplayFormat {
        match self.format {
            ReplayFormat::Auto => match self.path.extension().and_then(|e| e.to_str()) {
                Some("jsonl" | "ndjson" | "json") => ReplayFormat::Jsonl,
                _ => ReplayFormat::Btsnoop,
            },
            f => f,
        }
    }
}

enum Chunk {
    Sightings(Vec<RawSighting>),
    Dropped(Drop, u64),
    /// The file starts again (`loop`).
    Again,
    /// The end: `Err` says why the file could not be read to its end.
    End(Result<(), String>),
}

/// The running replay.
#[derive(Debug)]
pub struct Replay {
    rx: mpsc::Receiver<ChunkBox>,
    speed: f64,
    timestamps: Timestamps,
    path: PathBuf,
    /// (wall start, file time of the first sighting) of the current pass.
    origin: Option<(Instant, i64, i64)>,
    pending: std::collections::VecDeque<RawSighting>,
    ended: bool,
    passes: u64,
}

/// `Chunk` behind a Debug-able wrapper.
struct ChunkBox(Chunk);

impl std::fmt::Debug for ChunkBox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Chunk")
    }
}

impl Replay {
    /// Starts reading `cfg.path` on its own thread; `name` is the driver's name (the default
    /// receiver id).
    pub fn start(cfg: &ReplayConfig, name: &str) -> Replay {
        let (tx, rx) = mpsc::channel(4);
        let format = cfg.format();
        let path = cfg.path.clone();
        let adapters = cfg.adapters.clone();
        let repeat = cfg.repeat;
        let name = name.to_string();
        std::thread::Builder::new()
            .name(format!("replay-{name}"))
            .spawn(move || {
                let receiver = |i: u16| -> String {
                    adapters.get(usize::from(i)).cloned().unwrap_or_else(|| {
                        if i == 0 {
                            name.clone()
                        } else {
                            format!("{name}-hci{i}")
                        }
                    })
                };
                loop {
                    let r = match format {
                        ReplayFormat::Jsonl => read_jsonl(&path, &tx),
                        _ => read_btsnoop(&path, &receiver, &tx),
                    };
                    let again = repeat && r.is_ok();
                    let msg = if again { Chunk::Again } else { Chunk::End(r) };
                    if tx.blocking_send(ChunkBox(msg)).is_err() || !again {
                        return;
                    }
                }
            })
            .ok();
        Replay {
            rx,
            speed: cfg.speed,
            timestamps: cfg.timestamps,
            path: cfg.path.clone(),
            origin: None,
            pending: Default::default(),
            ended: false,
            passes: 0,
        }
    }

    /// When sighting time `ts` is due, and the event time it carries.
    fn schedule(&mut self, ts: i64) -> (Option<Instant>, i64) {
        let (wall, file_t0, wall_ms0) = *self
            .origin
            .get_or_insert_with(|| (Instant::now(), ts, edge_core::time::now_ms()));
        let offset_ms = (ts - file_t0).max(0) as f64;
        let (due, replayed) = if self.speed > 0.0 {
            let after = offset_ms / self.speed;
            (
                Some(wall + Duration::from_micros((after * 1000.0) as u64)),
                wall_ms0 + after as i64,
            )
        } else {
            (None, edge_core::time::now_ms())
        };
        let stamped = match self.timestamps {
            Timestamps::Original => ts,
            Timestamps::Replayed => replayed,
        };
        (due, stamped)
    }
}

impl SightingSource for Replay {
    async fn next(&mut self, status: &StatusHandle, drops: &mut Drops) -> Option<Vec<RawSighting>> {
        loop {
            if let Some(first) = self.pending.front() {
                let (due, _) = self.schedule(first.ts_ms);
                if let Some(due) = due {
                    tokio::time::sleep_until(due).await;
                }
                let now = Instant::now();
                let mut out = Vec::new();
                while let Some(s) = self.pending.front() {
                    let (due, stamped) = self.schedule(s.ts_ms);
                    if due.is_some_and(|d| d > now) {
                        break;
                    }
                    let mut s = self.pending.pop_front()?;
                    s.ts_ms = stamped;
                    out.push(s);
                }
                return Some(out);
            }
            if self.ended {
                return None;
            }
            match self.rx.recv().await.map(|c| c.0) {
                Some(Chunk::Sightings(v)) => self.pending.extend(v),
                Some(Chunk::Dropped(d, n)) => drops.add(d, n),
                Some(Chunk::Again) => {
                    self.passes += 1;
                    self.origin = None;
                    status.field("passes", self.passes);
                }
                Some(Chunk::End(r)) => {
                    self.ended = true;
                    match r {
                        Ok(()) => status.set(
                            State::Stopped,
                            format!("the replay of {} has ended", self.path.display()),
                        ),
                        Err(e) => status.set(
                            State::Degraded,
                            format!("the replay of {} stopped: {e}", self.path.display()),
                        ),
                    }
                }
                None => self.ended = true,
            }
        }
    }
}

fn send(tx: &mpsc::Sender<ChunkBox>, c: Chunk) -> Result<(), String> {
    tx.blocking_send(ChunkBox(c))
        .map_err(|_| "the driver stopped".to_string())
}

fn read_btsnoop(
    path: &Path,
    receiver: &dyn Fn(u16) -> String,
    tx: &mpsc::Sender<ChunkBox>,
) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let reader = Reader::new(std::io::BufReader::new(f)).map_err(|e| e.to_string())?;
    let datalink = reader.datalink();
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut malformed = 0u64;
    for rec in reader {
        let rec = rec.map_err(|e| e.to_string())?;
        let Some(event) = rec.hci_event(datalink) else {
            continue;
        };
        let reports = match parse_advertising_reports(event) {
            Ok(Some(r)) => r,
            Ok(None) => continue,
            Err(_) => {
                malformed += 1;
                continue;
            }
        };
        let adapter = if datalink == Datalink::Monitor {
            rec.adapter_index()
        } else {
            0
        };
        let ts_ms = rec.unix_us().div_euclid(1000);
        for r in reports {
            let Some(rssi) = r.rssi else {
                malformed += 1;
                continue;
            };
            chunk.push(RawSighting {
                receiver: receiver(adapter),
                ts_ms,
                rssi: i16::from(rssi),
                heard: Heard::Advertisement(r.data),
            });
        }
        if chunk.len() >= CHUNK {
            send(tx, Chunk::Sightings(std::mem::take(&mut chunk)))?;
            if malformed > 0 {
                send(
                    tx,
                    Chunk::Dropped(Drop::Malformed, std::mem::take(&mut malformed)),
                )?;
            }
        }
    }
    send(tx, Chunk::Sightings(chunk))?;
    send(tx, Chunk::Dropped(Drop::Malformed, malformed))
}

fn read_jsonl(path: &Path, tx: &mpsc::Sender<ChunkBox>) -> Result<(), String> {
    let f = std::fs::File::open(path).map_err(|e| format!("cannot open it: {e}"))?;
    let mut chunk = Vec::with_capacity(CHUNK);
    let mut bad = 0u64;
    let mut last_ts = 0;
    for line in std::io::BufReader::new(f).split(b'\n') {
        let line = line.map_err(|e| format!("cannot read it: {e}"))?;
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // A line without times is replayed right after the line before it.
        match parse_message("replay", &line, last_ts) {
            Ok(v) => {
                last_ts = v.last().map_or(last_ts, |s| s.ts_ms);
                chunk.extend(v);
            }
            Err(_) => bad += 1,
        }
        if chunk.len() >= CHUNK {
            send(tx, Chunk::Sightings(std::mem::take(&mut chunk)))?;
        }
    }
    send(tx, Chunk::Sightings(chunk))?;
    send(tx, Chunk::Dropped(Drop::BadMessage, bad))
}
