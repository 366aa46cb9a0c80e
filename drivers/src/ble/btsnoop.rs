//! btsnoop capture files (`btmon -w`, Android's `btsnoop_hci.log`, Wireshark): reader and writer.
//!
//! Layout (all integers big-endian), after RFC 1761 "snoop" as modified for Bluetooth:
//! * File header, 16 bytes: `"btsnoop\0"`, version (1), datalink type.
//! * Each record: original length, included length, packet flags, cumulative drops (4 bytes
//!   each), timestamp (signed 8 bytes, microseconds since 0000-01-01 00:00 "AD", which is
//!   [`EPOCH_OFFSET_US`] before the Unix epoch), then the included bytes.
//!
//! Datalinks read here and what an HCI event looks like in each:
//!
//! | datalink | written by | event record |
//! |---|---|---|
//! | 1001, HCI unencapsulated | some stacks | flags 0x03 (received, command/event) |
//! | 1002, HCI UART (H4) | Android | first byte 0x04 (the H4 packet type), then the event |
//! | 2001, Linux monitor | `btmon -w` | flags `(adapter index << 16) \| opcode`, opcode 3 = event |
//!
//! Invariants: the reader never trusts a length for an allocation beyond [`MAX_RECORD_BYTES`];
//! a short header, an included length above the original length or the limit, and a record cut
//! short at the end of the file are [`BtsnoopError`]s, after which the reader yields nothing more
//! (a `btmon -w` capture still being written may end mid-record). A malformed HCI event inside a
//! good record is an error item of [`AdvertisingReports`] and reading goes on.

use super::hci::{AdvertisingReport, HciError, parse_advertising_reports};
use std::io::{self, Read, Write};

pub const MAGIC: &[u8; 8] = b"btsnoop\0";
pub const VERSION: u32 = 1;
/// Microseconds from the format's "0 AD" epoch to 1970-01-01: the constant BlueZ, Android and
/// Wireshark use (0x00dcddb30f2f8000 = 719 540 days; a proleptic Gregorian count would give
/// 719 528, but files carry this one).
pub const EPOCH_OFFSET_US: i64 = 0x00dc_ddb3_0f2f_8000;
/// Longest record read: an HCI ACL packet (65 535 + 4 header bytes) plus an H4 or monitor prefix,
/// rounded up.
pub const MAX_RECORD_BYTES: u32 = 0x1_0100;

/// Monitor (2001) opcode of an HCI event packet.
pub const MONITOR_EVENT_PKT: u16 = 3;
/// H4 packet type of an HCI event.
pub const H4_EVENT: u8 = 0x04;
/// HCI (1001) / H4 (1002) flags of a received command/event record.
pub const FLAGS_RECEIVED_EVENT: u32 = 0x03;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datalink {
    /// 1001: HCI packets without a type byte; the flags say command/event and direction.
    Hci,
    /// 1002: HCI UART (H4): each packet starts with its H4 type byte.
    H4,
    /// 2001: Linux Bluetooth monitor (btmon): opcode and adapter index in the flags.
    Monitor,
}

impl Datalink {
    pub fn code(self) -> u32 {
        match self {
            Datalink::Hci => 1001,
            Datalink::H4 => 1002,
            Datalink::Monitor => 2001,
        }
    }

    pub fn from_code(code: u32) -> Option<Self> {
        match code {
            1001 => Some(Datalink::Hci),
            1002 => Some(Datalink::H4),
            2001 => Some(Datalink::Monitor),
            _ => None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BtsnoopError {
    #[error("btsnoop capture: {0}")]
    Io(#[from] io::Error),
    #[error("not a btsnoop capture: the file does not start with \"btsnoop\\0\"")]
    Magic,
    #[error("btsnoop capture is shorter than its 16-byte file header")]
    ShortHeader,
    #[error("btsnoop capture has version {0}; only version 1 is read")]
    Version(u32),
    #[error(
        "btsnoop capture has datalink {0}; supported are 1001 (HCI), 1002 (HCI UART, H4, as Android writes) and 2001 (Linux monitor, as btmon -w writes)"
    )]
    Datalink(u32),
    #[error(
        "btsnoop record {index} ends inside its {part} (the capture is truncated, or still being written); reading stops here"
    )]
    TruncatedRecord { index: u64, part: &'static str },
    #[error(
        "btsnoop record {index} declares {included} included bytes (original {original}, limit {MAX_RECORD_BYTES}); the capture is corrupt from here and reading stops"
    )]
    RecordLength {
        index: u64,
        included: u32,
        original: u32,
    },
    #[error("btsnoop record {index}: {source}")]
    Hci {
        index: u64,
        #[source]
        source: HciError,
    },
}

/// One record as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Length of the packet as captured on the wire (`data` may be shorter: a snap length).
    pub original_len: u32,
    pub flags: u32,
    pub drops: u32,
    /// Microseconds since 0000-01-01 (the file's own clock).
    pub timestamp: i64,
    pub data: Vec<u8>,
}

impl Record {
    /// Microseconds since the Unix epoch.
    pub fn unix_us(&self) -> i64 {
        self.timestamp.wrapping_sub(EPOCH_OFFSET_US)
    }

    /// The HCI event packet (event code first) this record holds under `datalink`, if it is a
    /// complete event record.
    pub fn hci_event(&self, datalink: Datalink) -> Option<&[u8]> {
        if self.data.len() as u64 != u64::from(self.original_len) {
            return None;
        }
        match datalink {
            Datalink::Hci => (self.flags & 0x03 == FLAGS_RECEIVED_EVENT).then_some(&self.data[..]),
            Datalink::H4 => match self.data.split_first() {
                Some((&H4_EVENT, event)) => Some(event),
                _ => None,
            },
            Datalink::Monitor => {
                ((self.flags & 0xFFFF) as u16 == MONITOR_EVENT_PKT).then_some(&self.data[..])
            }
        }
    }

    /// Adapter index of a monitor (2001) record.
    pub fn adapter_index(&self) -> u16 {
        (self.flags >> 16) as u16
    }
}

/// Reads records from a btsnoop stream.
#[derive(Debug)]
pub struct Reader<R> {
    inner: R,
    datalink: Datalink,
    index: u64,
    done: bool,
}

/// Reads up to `buf.len()` bytes; returns how many were read (less only at end of stream).
fn read_full<R: Read>(r: &mut R, buf: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

impl<R: Read> Reader<R> {
    /// Reads and checks the file header.
    pub fn new(mut inner: R) -> Result<Self, BtsnoopError> {
        let mut h = [0u8; 16];
        let n = read_full(&mut inner, &mut h)?;
        // A file too short to hold the magic is "short" only if what it holds is its start.
        let magic_len = n.min(MAGIC.len());
        if h[..magic_len] != MAGIC[..magic_len] {
            return Err(BtsnoopError::Magic);
        }
        if n < 16 {
            return Err(BtsnoopError::ShortHeader);
        }
        let version = u32::from_be_bytes([h[8], h[9], h[10], h[11]]);
        if version != VERSION {
            return Err(BtsnoopError::Version(version));
        }
        let code = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let datalink = Datalink::from_code(code).ok_or(BtsnoopError::Datalink(code))?;
        Ok(Reader {
            inner,
            datalink,
            index: 0,
            done: false,
        })
    }

    pub fn datalink(&self) -> Datalink {
        self.datalink
    }

    fn read_record(&mut self) -> Result<Option<Record>, BtsnoopError> {
        let index = self.index;
        let mut h = [0u8; 24];
        match read_full(&mut self.inner, &mut h)? {
            0 => return Ok(None),
            24 => {}
            _ => {
                return Err(BtsnoopError::TruncatedRecord {
                    index,
                    part: "header",
                });
            }
        }
        let be = |i: usize| u32::from_be_bytes([h[i], h[i + 1], h[i + 2], h[i + 3]]);
        let (original, included) = (be(0), be(4));
        if included > original || included > MAX_RECORD_BYTES {
            return Err(BtsnoopError::RecordLength {
                index,
                included,
                original,
            });
        }
        let mut ts = [0u8; 8];
        ts.copy_from_slice(&h[16..24]);
        let mut data = vec![0u8; included as usize];
        if read_full(&mut self.inner, &mut data)? != data.len() {
            return Err(BtsnoopError::TruncatedRecord {
                index,
                part: "packet data",
            });
        }
        self.index += 1;
        Ok(Some(Record {
            original_len: original,
            flags: be(8),
            drops: be(12),
            timestamp: i64::from_be_bytes(ts),
            data,
        }))
    }

    /// The HCI event packets (event code first) of the capture, with each record's Unix time in
    /// microseconds; records that are not received events are skipped.
    pub fn hci_events(self) -> HciEvents<R> {
        HciEvents { reader: self }
    }

    /// The advertising reports of every LE (Extended) Advertising Report event, with the
    /// record's Unix time in microseconds.
    pub fn advertising_reports(self) -> AdvertisingReports<R> {
        AdvertisingReports {
            events: self.hci_events(),
            pending: Vec::new().into_iter(),
            ts: 0,
        }
    }
}

impl<R: Read> Iterator for Reader<R> {
    type Item = Result<Record, BtsnoopError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.read_record() {
            Ok(Some(r)) => Some(Ok(r)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}

/// See [`Reader::hci_events`]. Items are `(unix_us, event packet)`.
#[derive(Debug)]
pub struct HciEvents<R> {
    reader: Reader<R>,
}

impl<R> HciEvents<R> {
    /// Index of the record the last item came from.
    fn last_index(&self) -> u64 {
        self.reader.index.saturating_sub(1)
    }
}

impl<R: Read> Iterator for HciEvents<R> {
    type Item = Result<(i64, Vec<u8>), BtsnoopError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let mut rec = match self.reader.next()? {
                Ok(rec) => rec,
                Err(e) => return Some(Err(e)),
            };
            let Some(event) = rec.hci_event(self.reader.datalink) else {
                continue;
            };
            let skip = rec.data.len() - event.len();
            rec.data.drain(..skip);
            return Some(Ok((rec.unix_us(), rec.data)));
        }
    }
}

/// See [`Reader::advertising_reports`]. Items are `(unix_us, report)`.
#[derive(Debug)]
pub struct AdvertisingReports<R> {
    events: HciEvents<R>,
    pending: std::vec::IntoIter<AdvertisingReport>,
    ts: i64,
}

impl<R: Read> Iterator for AdvertisingReports<R> {
    type Item = Result<(i64, AdvertisingReport), BtsnoopError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            if let Some(r) = self.pending.next() {
                return Some(Ok((self.ts, r)));
            }
            let (ts, event) = match self.events.next()? {
                Ok(e) => e,
                Err(e) => return Some(Err(e)),
            };
            match parse_advertising_reports(&event) {
                Ok(Some(reports)) => {
                    self.ts = ts;
                    self.pending = reports.into_iter();
                }
                Ok(None) => {}
                Err(source) => {
                    return Some(Err(BtsnoopError::Hci {
                        index: self.events.last_index(),
                        source,
                    }));
                }
            }
        }
    }
}

/// Writes a btsnoop stream: the header at creation, then records.
#[derive(Debug)]
pub struct Writer<W: Write> {
    inner: W,
    datalink: Datalink,
    adapter_index: u16,
}

impl<W: Write> Writer<W> {
    pub fn new(mut inner: W, datalink: Datalink) -> io::Result<Self> {
        let mut h = [0u8; 16];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_be_bytes());
        h[12..16].copy_from_slice(&datalink.code().to_be_bytes());
        inner.write_all(&h)?;
        Ok(Writer {
            inner,
            datalink,
            adapter_index: 0,
        })
    }

    /// Adapter index written into monitor (2001) records (default 0, `hci0`).
    pub fn with_adapter_index(mut self, index: u16) -> Self {
        self.adapter_index = index;
        self
    }

    /// Changes the adapter index of the monitor (2001) records written from now on (one capture
    /// of several receivers).
    pub fn set_adapter_index(&mut self, index: u16) {
        self.adapter_index = index;
    }

    /// Writes one record as given (its `data` is the included bytes).
    pub fn write_record(&mut self, r: &Record) -> io::Result<()> {
        let included = u32::try_from(r.data.len())
            .ok()
            .filter(|&n| n <= MAX_RECORD_BYTES && n <= r.original_len)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "btsnoop record data is longer than its original length or the record limit",
                )
            })?;
        let mut h = [0u8; 24];
        h[0..4].copy_from_slice(&r.original_len.to_be_bytes());
        h[4..8].copy_from_slice(&included.to_be_bytes());
        h[8..12].copy_from_slice(&r.flags.to_be_bytes());
        h[12..16].copy_from_slice(&r.drops.to_be_bytes());
        h[16..24].copy_from_slice(&r.timestamp.to_be_bytes());
        self.inner.write_all(&h)?;
        self.inner.write_all(&r.data)
    }

    /// Writes an HCI event packet (event code first) received at `unix_us`, framed for the
    /// file's datalink.
    pub fn write_hci_event(&mut self, unix_us: i64, event: &[u8]) -> io::Result<()> {
        let (flags, data) = match self.datalink {
            Datalink::Hci => (FLAGS_RECEIVED_EVENT, event.to_vec()),
            Datalink::H4 => {
                let mut d = Vec::with_capacity(event.len() + 1);
                d.push(H4_EVENT);
                d.extend_from_slice(event);
                (FLAGS_RECEIVED_EVENT, d)
            }
            Datalink::Monitor => (
                (u32::from(self.adapter_index) << 16) | u32::from(MONITOR_EVENT_PKT),
                event.to_vec(),
            ),
        };
        self.write_record(&Record {
            original_len: data.len() as u32,
            flags,
            drops: 0,
            timestamp: unix_us.wrapping_add(EPOCH_OFFSET_US),
            data,
        })
    }

    pub fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }

    pub fn into_inner(self) -> W {
        self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::super::hci::{
        Address, AddressType, LegacyEventType, ReportKind, encode_le_advertising_report,
    };
    use super::*;

    /// 2026-12-01T00:00:00Z in Unix microseconds.
    const T0: i64 = 1_796_083_200_000_000;

    fn report(addr_last: u8, rssi: i8) -> AdvertisingReport {
        AdvertisingReport {
            kind: ReportKind::Legacy(LegacyEventType::AdvNonconnInd),
            address_type: AddressType::Random,
            address: Address([0xC4, 0x7C, 0x8D, 0x6A, 0x3B, addr_last]),
            rssi: Some(rssi),
            data: vec![0x02, 0x01, 0x06],
        }
    }

    fn capture(datalink: Datalink) -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), datalink)
            .unwrap()
            .with_adapter_index(1);
        // Command Complete (not a report), then two report events, one with two reports.
        w.write_hci_event(T0, &[0x0E, 0x04, 0x01, 0x0C, 0x20, 0x00])
            .unwrap();
        let e1 = encode_le_advertising_report(&[report(1, -60)], false).unwrap();
        w.write_hci_event(T0 + 1_500, &e1).unwrap();
        let e2 = encode_le_advertising_report(&[report(2, -61), report(3, -62)], true).unwrap();
        w.write_hci_event(T0 + 2_000_000, &e2).unwrap();
        w.into_inner()
    }

    #[test]
    fn the_header_and_timestamps_follow_the_format() {
        let bytes = capture(Datalink::Monitor);
        assert_eq!(&bytes[..8], b"btsnoop\0");
        assert_eq!(
            &bytes[8..16],
            &[0, 0, 0, 1, 0, 0, 0x07, 0xD1],
            "version 1, datalink 2001"
        );
        // First record: lengths 6 and 6, flags (index 1 << 16) | 3, no drops.
        assert_eq!(
            &bytes[16..32],
            &[0, 0, 0, 6, 0, 0, 0, 6, 0, 1, 0, 3, 0, 0, 0, 0]
        );
        let ts = i64::from_be_bytes(bytes[32..40].try_into().unwrap());
        assert_eq!(ts, T0 + 0x00dc_ddb3_0f2f_8000);
        assert_eq!(EPOCH_OFFSET_US, 719_540 * 86_400 * 1_000_000);
    }

    #[test]
    fn every_datalink_round_trips_records_and_reports() {
        for dl in [Datalink::Hci, Datalink::H4, Datalink::Monitor] {
            let bytes = capture(dl);
            let reader = Reader::new(&bytes[..]).unwrap();
            assert_eq!(reader.datalink(), dl);
            let records: Vec<Record> = reader.map(Result::unwrap).collect();
            assert_eq!(records.len(), 3);
            assert_eq!(records[1].unix_us(), T0 + 1_500);
            assert_eq!(records[0].hci_event(dl).unwrap()[0], 0x0E);
            if dl == Datalink::H4 {
                assert_eq!(records[1].data[0], 0x04, "H4 packet type");
            }
            if dl == Datalink::Monitor {
                assert_eq!(records[2].adapter_index(), 1);
            }
            // Re-writing the records gives the same file.
            let mut w = Writer::new(Vec::new(), dl).unwrap();
            for r in &records {
                w.write_record(r).unwrap();
            }
            assert_eq!(w.into_inner(), bytes, "{dl:?}");

            let got: Vec<(i64, AdvertisingReport)> = Reader::new(&bytes[..])
                .unwrap()
                .advertising_reports()
                .map(Result::unwrap)
                .collect();
            assert_eq!(got.len(), 3, "{dl:?}");
            assert_eq!(got[0], (T0 + 1_500, report(1, -60)));
            assert_eq!(got[1].0, T0 + 2_000_000);
            assert_eq!(got[2].1.address.to_string(), "C4:7C:8D:6A:3B:03");
            assert_eq!(got[2].1.rssi, Some(-62));
            assert!(matches!(got[2].1.kind, ReportKind::Extended(x) if x.legacy_pdu()));
        }
    }

    #[test]
    fn hci_events_are_the_event_packets_without_their_framing() {
        for dl in [Datalink::Hci, Datalink::H4, Datalink::Monitor] {
            let bytes = capture(dl);
            let events: Vec<(i64, Vec<u8>)> = Reader::new(&bytes[..])
                .unwrap()
                .hci_events()
                .map(Result::unwrap)
                .collect();
            assert_eq!(events.len(), 3, "{dl:?}");
            assert_eq!(events[0], (T0, vec![0x0E, 0x04, 0x01, 0x0C, 0x20, 0x00]));
            assert_eq!(
                events[1],
                (
                    T0 + 1_500,
                    encode_le_advertising_report(&[report(1, -60)], false).unwrap()
                )
            );
        }
    }

    #[test]
    fn records_that_are_not_received_events_are_skipped() {
        let mut w = Writer::new(Vec::new(), Datalink::H4).unwrap();
        let ev = encode_le_advertising_report(&[report(9, -40)], false).unwrap();
        // An H4 command (type 0x01) with report-like bytes, then an ACL packet (0x02).
        let cmd = [&[0x01][..], &ev].concat();
        let acl = [&[0x02][..], &ev].concat();
        for (flags, data) in [(0x02, cmd), (0x01, acl)] {
            w.write_record(&Record {
                original_len: data.len() as u32,
                flags,
                drops: 0,
                timestamp: EPOCH_OFFSET_US,
                data,
            })
            .unwrap();
        }
        // A snapped (partial) event record is no event either.
        let mut snapped = [&[0x04][..], &ev].concat();
        let original_len = snapped.len() as u32;
        snapped.truncate(10);
        w.write_record(&Record {
            original_len,
            flags: 3,
            drops: 0,
            timestamp: EPOCH_OFFSET_US,
            data: snapped,
        })
        .unwrap();
        w.write_hci_event(5, &ev).unwrap();
        let bytes = w.into_inner();
        let got: Vec<_> = Reader::new(&bytes[..])
            .unwrap()
            .advertising_reports()
            .map(Result::unwrap)
            .collect();
        assert_eq!(got, vec![(5, report(9, -40))]);

        // Monitor: a command record (opcode 2) with event bytes is not an event.
        let rec = Record {
            original_len: ev.len() as u32,
            flags: 2,
            drops: 0,
            timestamp: 0,
            data: ev.clone(),
        };
        assert_eq!(rec.hci_event(Datalink::Monitor), None);
        assert_eq!(rec.hci_event(Datalink::Hci), None, "flags 2: sent command");
    }

    #[test]
    fn bad_headers_are_refused() {
        let good = capture(Datalink::H4);
        assert!(matches!(
            Reader::new(&b"btsnoo"[..]),
            Err(BtsnoopError::ShortHeader)
        ));
        assert!(matches!(
            Reader::new(&b"pcap"[..]),
            Err(BtsnoopError::Magic)
        ));
        assert!(matches!(
            Reader::new(&good[..12]),
            Err(BtsnoopError::ShortHeader)
        ));
        let mut v2 = good.clone();
        v2[11] = 2;
        assert!(matches!(
            Reader::new(&v2[..]),
            Err(BtsnoopError::Version(2))
        ));
        let mut dl = good.clone();
        dl[15] = 0xEB; // 1003, BCSP
        assert!(matches!(
            Reader::new(&dl[..]),
            Err(BtsnoopError::Datalink(1003))
        ));
        assert!(matches!(
            Reader::new(&[][..]),
            Err(BtsnoopError::ShortHeader)
        ));
    }

    #[test]
    fn a_capture_cut_anywhere_yields_its_whole_records_then_one_error() {
        let bytes = capture(Datalink::Monitor);
        let whole: Vec<Record> = Reader::new(&bytes[..])
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let mut ends = vec![16];
        for r in &whole {
            ends.push(ends.last().unwrap() + 24 + r.data.len());
        }
        assert_eq!(*ends.last().unwrap(), bytes.len());
        for cut in 16..bytes.len() {
            let items: Vec<_> = Reader::new(&bytes[..cut]).unwrap().collect();
            let complete = ends.iter().filter(|&&e| e <= cut).count() - 1;
            let at_boundary = ends.contains(&cut);
            assert_eq!(
                items.len(),
                complete + usize::from(!at_boundary),
                "cut {cut}"
            );
            for (i, it) in items.iter().enumerate() {
                match it {
                    Ok(r) => assert_eq!(r, &whole[i]),
                    Err(BtsnoopError::TruncatedRecord { index, .. }) => {
                        assert_eq!(*index as usize, complete);
                        assert_eq!(i, items.len() - 1);
                    }
                    Err(e) => panic!("cut {cut}: {e}"),
                }
            }
        }
    }

    #[test]
    fn impossible_record_lengths_stop_reading_without_allocating_them() {
        let mut bytes = capture(Datalink::H4);
        // Included length 0xFFFFFFFF (and original too): refused before allocation.
        bytes[16..24].copy_from_slice(&[0xFF; 8]);
        let items: Vec<_> = Reader::new(&bytes[..]).unwrap().collect();
        assert_eq!(items.len(), 1);
        assert!(matches!(
            items[0],
            Err(BtsnoopError::RecordLength {
                index: 0,
                included: u32::MAX,
                ..
            })
        ));
        // Included longer than original.
        let mut bytes = capture(Datalink::H4);
        bytes[19] = 6;
        bytes[23] = 7;
        assert!(matches!(
            Reader::new(&bytes[..]).unwrap().next(),
            Some(Err(BtsnoopError::RecordLength {
                included: 7,
                original: 6,
                ..
            }))
        ));
    }

    #[test]
    fn a_malformed_event_is_an_error_item_and_reading_goes_on() {
        let mut w = Writer::new(Vec::new(), Datalink::Monitor).unwrap();
        let mut bad = encode_le_advertising_report(&[report(1, -60)], false).unwrap();
        bad[3] = 2; // two reports announced, one present
        w.write_hci_event(1, &bad).unwrap();
        let good = encode_le_advertising_report(&[report(2, -50)], false).unwrap();
        w.write_hci_event(2, &good).unwrap();
        let bytes = w.into_inner();
        let items: Vec<_> = Reader::new(&bytes[..])
            .unwrap()
            .advertising_reports()
            .collect();
        assert_eq!(items.len(), 2);
        assert!(matches!(
            &items[0],
            Err(BtsnoopError::Hci {
                index: 0,
                source: HciError::Truncated { index: 1, .. }
            })
        ));
        assert_eq!(items[1].as_ref().unwrap(), &(2, report(2, -50)));
    }
}
