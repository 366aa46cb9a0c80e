//! HCI LE Advertising Reports, byte for byte (Core spec Vol 4 Part E §5.4.4 event packets,
//! §7.7.65.2 LE Advertising Report, §7.7.65.13 LE Extended Advertising Report).
//!
//! An HCI event packet is `event code, parameter total length, parameters`. Advertising reports
//! come in the LE Meta event (0x3E) whose first parameter is the subevent code:
//! * 0x02, legacy: `Num_Reports`, then per report `Event_Type, Address_Type, Address[6],
//!   Data_Length, Data, RSSI`. Controllers, BlueZ and the Linux kernel lay several reports out
//!   one after another like this (not as the per-field arrays a literal reading of the spec's
//!   table suggests); most controllers send one report per event.
//! * 0x0D, extended: `Num_Reports`, then per report `Event_Type[2], Address_Type, Address[6],
//!   Primary_PHY, Secondary_PHY, Advertising_SID, TX_Power, RSSI, Periodic_Advertising_Interval[2],
//!   Direct_Address_Type, Direct_Address[6], Data_Length, Data`.
//!
//! Invariants: every length is checked against the bytes present (a short packet, a data length
//! past the end, bytes left over after the last report, a packet longer than its parameter total
//! length are [`HciError`]s, never panics); a report's data is at most 31 bytes (legacy) or what
//! fits in one event (extended). Values the spec reserves are kept, not refused, so that a
//! parsed event re-encodes to the same bytes ([`encode_le_advertising_report`]).
//! Addresses are stored as printed (most significant byte first); HCI sends them LSB first.

use std::fmt;

pub const EVENT_LE_META: u8 = 0x3E;
pub const SUBEVENT_ADVERTISING_REPORT: u8 = 0x02;
pub const SUBEVENT_EXTENDED_ADVERTISING_REPORT: u8 = 0x0D;
/// Legacy advertising data is at most 31 bytes.
pub const MAX_LEGACY_DATA: usize = 31;
const LEGACY_FIXED: usize = 1 + 1 + 6 + 1 + 1;
const EXTENDED_FIXED: usize = 2 + 1 + 6 + 1 + 1 + 1 + 1 + 1 + 2 + 1 + 6 + 1;
/// RSSI / TX power value meaning "not available".
const NOT_AVAILABLE: i8 = 127;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HciError {
    #[error(
        "HCI event packet of {0} bytes is shorter than its 2-byte header; the packet is dropped"
    )]
    ShortHeader(usize),
    #[error(
        "HCI event {code:#04x} declares {declared} parameter bytes but {present} are present; the packet is dropped"
    )]
    ParameterLength {
        code: u8,
        declared: usize,
        present: usize,
    },
    #[error("LE Meta event without a subevent code; the packet is dropped")]
    NoSubevent,
    #[error(
        "LE advertising report event ({subevent:#04x}) with 0 reports (1-25 allowed); the packet is dropped"
    )]
    NoReports { subevent: u8 },
    #[error(
        "LE advertising report {index} of {count} ({subevent:#04x}) is cut short at byte {offset}; the packet is dropped"
    )]
    Truncated {
        subevent: u8,
        index: usize,
        count: usize,
        offset: usize,
    },
    #[error(
        "legacy LE advertising report {index} declares {len} data bytes (at most 31); the packet is dropped"
    )]
    LegacyDataLength { index: usize, len: usize },
    #[error(
        "LE advertising report event ({subevent:#04x}) has {extra} bytes after its last report; the packet is dropped"
    )]
    TrailingBytes { subevent: u8, extra: usize },
    #[error("{0} reports or {1} parameter bytes do not fit in one HCI event")]
    TooLarge(usize, usize),
}

/// A Bluetooth device address, most significant byte first (as printed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct Address(pub [u8; 6]);

impl Address {
    /// From the LSB-first bytes of an HCI packet.
    pub fn from_hci(b: &[u8]) -> Address {
        let mut a = [0u8; 6];
        for (dst, src) in a.iter_mut().zip(b.iter().rev()) {
            *dst = *src;
        }
        Address(a)
    }

    /// The LSB-first bytes an HCI packet carries.
    pub fn to_hci(self) -> [u8; 6] {
        let mut b = self.0;
        b.reverse();
        b
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = self.0;
        write!(
            f,
            "{:02X}:{:02X}:{:02X}:{:02X}:{:02X}:{:02X}",
            a[0], a[1], a[2], a[3], a[4], a[5]
        )
    }
}

/// Address type of a report.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AddressType {
    Public,
    Random,
    /// Public identity address (the controller resolved an RPA).
    PublicIdentity,
    /// Random (static) identity address (the controller resolved an RPA).
    RandomIdentity,
    /// 0xFF in an extended report: no address was sent (anonymous advertising).
    Anonymous,
    /// A reserved value, kept as received.
    Reserved(u8),
}

impl AddressType {
    pub fn from_u8(v: u8) -> Self {
        match v {
            0x00 => Self::Public,
            0x01 => Self::Random,
            0x02 => Self::PublicIdentity,
            0x03 => Self::RandomIdentity,
            0xFF => Self::Anonymous,
            v => Self::Reserved(v),
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            Self::Public => 0x00,
            Self::Random => 0x01,
            Self::PublicIdentity => 0x02,
            Self::RandomIdentity => 0x03,
            Self::Anonymous => 0xFF,
            Self::Reserved(v) => v,
        }
    }
}

/// Event type of a legacy report (the PDU that was received).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LegacyEventType {
    /// ADV_IND: connectable and scannable undirected.
    AdvInd,
    /// ADV_DIRECT_IND: connectable directed.
    AdvDirectInd,
    /// ADV_SCAN_IND: scannable undirected.
    AdvScanInd,
    /// ADV_NONCONN_IND: non-connectable undirected (what most beacons send).
    AdvNonconnInd,
    /// SCAN_RSP: a scan response.
    ScanRsp,
    Reserved(u8),
}

impl LegacyEventType {
    pub fn from_u8(v: u8) -> Self {
        match v {
            0 => Self::AdvInd,
            1 => Self::AdvDirectInd,
            2 => Self::AdvScanInd,
            3 => Self::AdvNonconnInd,
            4 => Self::ScanRsp,
            v => Self::Reserved(v),
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            Self::AdvInd => 0,
            Self::AdvDirectInd => 1,
            Self::AdvScanInd => 2,
            Self::AdvNonconnInd => 3,
            Self::ScanRsp => 4,
            Self::Reserved(v) => v,
        }
    }
}

/// PHY of an extended report (raw value kept for reserved ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phy {
    Le1M,
    Le2M,
    LeCoded,
    Reserved(u8),
}

impl Phy {
    pub fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Le1M,
            2 => Self::Le2M,
            3 => Self::LeCoded,
            v => Self::Reserved(v),
        }
    }

    pub fn to_u8(self) -> u8 {
        match self {
            Self::Le1M => 1,
            Self::Le2M => 2,
            Self::LeCoded => 3,
            Self::Reserved(v) => v,
        }
    }
}

/// Bits 5-6 of an extended report's event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DataStatus {
    Complete,
    /// More data follows in the next report of the same advertiser and SID.
    Incomplete,
    /// The controller dropped the rest of the data.
    Truncated,
    Reserved,
}

/// The fields only an extended report has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ExtendedInfo {
    /// Event type bits: 0 connectable, 1 scannable, 2 directed, 3 scan response, 4 legacy PDU,
    /// 5-6 data status.
    pub event_type: u16,
    pub primary_phy: Phy,
    /// `None` when there is no packet on the secondary channel (value 0x00).
    pub secondary_phy: Option<Phy>,
    /// Advertising SID 0x00-0x0F; `None` when no ADI field was present (0xFF).
    pub sid: Option<u8>,
    /// TX power in dBm; `None` when not available (127).
    pub tx_power: Option<i8>,
    /// Periodic advertising interval in units of 1.25 ms; `None` when there is none (0).
    pub periodic_interval: Option<u16>,
    pub direct_address_type: AddressType,
    pub direct_address: Address,
}

impl ExtendedInfo {
    pub fn connectable(&self) -> bool {
        self.event_type & 0x01 != 0
    }
    pub fn scannable(&self) -> bool {
        self.event_type & 0x02 != 0
    }
    pub fn directed(&self) -> bool {
        self.event_type & 0x04 != 0
    }
    pub fn scan_response(&self) -> bool {
        self.event_type & 0x08 != 0
    }
    pub fn legacy_pdu(&self) -> bool {
        self.event_type & 0x10 != 0
    }
    /// For a legacy PDU reported in an extended report, the legacy event type it stands for
    /// (Core spec Vol 4 Part E §7.7.65.13, table of legacy event type values).
    pub fn legacy_event_type(&self) -> Option<LegacyEventType> {
        Some(match self.event_type {
            0x13 => LegacyEventType::AdvInd,
            0x15 => LegacyEventType::AdvDirectInd,
            0x12 => LegacyEventType::AdvScanInd,
            0x10 => LegacyEventType::AdvNonconnInd,
            0x1A | 0x1B => LegacyEventType::ScanRsp,
            _ => return None,
        })
    }

    pub fn data_status(&self) -> DataStatus {
        match (self.event_type >> 5) & 0x03 {
            0 => DataStatus::Complete,
            1 => DataStatus::Incomplete,
            2 => DataStatus::Truncated,
            _ => DataStatus::Reserved,
        }
    }
}

/// Which of the two report events a report came in, with its kind-specific fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ReportKind {
    Legacy(LegacyEventType),
    Extended(ExtendedInfo),
}

/// One advertising report: who was heard, how strongly, and the advertising data (AD).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AdvertisingReport {
    pub kind: ReportKind,
    pub address_type: AddressType,
    pub address: Address,
    /// dBm; `None` when the controller reports it as not available (127).
    pub rssi: Option<i8>,
    /// The AD structures ([`super::ad`]).
    pub data: Vec<u8>,
}

/// A borrowed HCI event packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HciEvent<'a> {
    pub code: u8,
    pub params: &'a [u8],
}

impl<'a> HciEvent<'a> {
    /// Splits an HCI event packet (event code first, no H4 type byte). The parameter total
    /// length must match the bytes present exactly.
    pub fn parse(packet: &'a [u8]) -> Result<Self, HciError> {
        let [code, len, params @ ..] = packet else {
            return Err(HciError::ShortHeader(packet.len()));
        };
        if params.len() != usize::from(*len) {
            return Err(HciError::ParameterLength {
                code: *code,
                declared: usize::from(*len),
                present: params.len(),
            });
        }
        Ok(HciEvent {
            code: *code,
            params,
        })
    }

    /// The LE Meta subevent code, if this is an LE Meta event.
    pub fn le_subevent(&self) -> Option<u8> {
        if self.code == EVENT_LE_META {
            self.params.first().copied()
        } else {
            None
        }
    }

    /// The advertising reports of an LE (Extended) Advertising Report event; `None` for any
    /// other event.
    pub fn advertising_reports(&self) -> Option<Result<Vec<AdvertisingReport>, HciError>> {
        if self.code != EVENT_LE_META {
            return None;
        }
        let Some((&sub, body)) = self.params.split_first() else {
            return Some(Err(HciError::NoSubevent));
        };
        match sub {
            SUBEVENT_ADVERTISING_REPORT => Some(parse_reports(sub, body, parse_legacy)),
            SUBEVENT_EXTENDED_ADVERTISING_REPORT => Some(parse_reports(sub, body, parse_extended)),
            _ => None,
        }
    }
}

/// Parses one HCI event packet and returns its advertising reports (`None` for other events).
pub fn parse_advertising_reports(
    packet: &[u8],
) -> Result<Option<Vec<AdvertisingReport>>, HciError> {
    HciEvent::parse(packet)?.advertising_reports().transpose()
}

struct Cursor<'a> {
    d: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.d.get(self.pos..self.pos.checked_add(n)?)?;
        self.pos += n;
        Some(s)
    }
    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|s| s[0])
    }
}

type ReportParser = fn(&mut Cursor<'_>, usize) -> Result<Option<AdvertisingReport>, HciError>;

fn parse_reports(
    subevent: u8,
    body: &[u8],
    one: ReportParser,
) -> Result<Vec<AdvertisingReport>, HciError> {
    let mut c = Cursor { d: body, pos: 0 };
    let count = usize::from(c.u8().ok_or(HciError::NoReports { subevent })?);
    if count == 0 {
        return Err(HciError::NoReports { subevent });
    }
    let mut out = Vec::with_capacity(count);
    for index in 0..count {
        match one(&mut c, index)? {
            Some(r) => out.push(r),
            None => {
                return Err(HciError::Truncated {
                    subevent,
                    index,
                    count,
                    // +1: the offset in the event parameters, counting the subevent code.
                    offset: c.pos + 1,
                });
            }
        }
    }
    if c.pos != body.len() {
        return Err(HciError::TrailingBytes {
            subevent,
            extra: body.len() - c.pos,
        });
    }
    Ok(out)
}

fn parse_legacy(c: &mut Cursor<'_>, index: usize) -> Result<Option<AdvertisingReport>, HciError> {
    let Some(fixed) = c.take(LEGACY_FIXED - 1) else {
        return Ok(None);
    };
    let len = usize::from(fixed[8]);
    if len > MAX_LEGACY_DATA {
        return Err(HciError::LegacyDataLength { index, len });
    }
    let Some(data) = c.take(len) else {
        return Ok(None);
    };
    let Some(rssi) = c.u8() else {
        return Ok(None);
    };
    Ok(Some(AdvertisingReport {
        kind: ReportKind::Legacy(LegacyEventType::from_u8(fixed[0])),
        address_type: AddressType::from_u8(fixed[1]),
        address: Address::from_hci(&fixed[2..8]),
        rssi: available(rssi as i8),
        data: data.to_vec(),
    }))
}

fn parse_extended(c: &mut Cursor<'_>, _: usize) -> Result<Option<AdvertisingReport>, HciError> {
    let Some(f) = c.take(EXTENDED_FIXED) else {
        return Ok(None);
    };
    let Some(data) = c.take(usize::from(f[23])) else {
        return Ok(None);
    };
    let interval = u16::from_le_bytes([f[14], f[15]]);
    Ok(Some(AdvertisingReport {
        kind: ReportKind::Extended(ExtendedInfo {
            event_type: u16::from_le_bytes([f[0], f[1]]),
            primary_phy: Phy::from_u8(f[9]),
            secondary_phy: (f[10] != 0).then(|| Phy::from_u8(f[10])),
            sid: (f[11] != 0xFF).then_some(f[11]),
            tx_power: available(f[12] as i8),
            periodic_interval: (interval != 0).then_some(interval),
            direct_address_type: AddressType::from_u8(f[16]),
            direct_address: Address::from_hci(&f[17..23]),
        }),
        address_type: AddressType::from_u8(f[2]),
        address: Address::from_hci(&f[3..9]),
        rssi: available(f[13] as i8),
        data: data.to_vec(),
    }))
}

fn available(v: i8) -> Option<i8> {
    (v != NOT_AVAILABLE).then_some(v)
}

/// Encodes reports as one LE Meta event packet (event code first): a legacy Advertising Report
/// (0x02) when `extended` is false, else an Extended Advertising Report (0x0D). Every report
/// must be of the matching kind (a legacy report in an extended event gets event type 0x10,
/// legacy PDU, and no secondary PHY). Fails when the event would exceed 255 parameter bytes or
/// a legacy report carries more than 31 data bytes: what the parser would refuse is not written.
pub fn encode_le_advertising_report(
    reports: &[AdvertisingReport],
    extended: bool,
) -> Result<Vec<u8>, HciError> {
    let mut p = vec![if extended {
        SUBEVENT_EXTENDED_ADVERTISING_REPORT
    } else {
        SUBEVENT_ADVERTISING_REPORT
    }];
    let count = u8::try_from(reports.len()).map_err(|_| HciError::TooLarge(reports.len(), 0))?;
    p.push(count);
    for (index, r) in reports.iter().enumerate() {
        if !extended && r.data.len() > MAX_LEGACY_DATA {
            return Err(HciError::LegacyDataLength {
                index,
                len: r.data.len(),
            });
        }
        let len = u8::try_from(r.data.len())
            .map_err(|_| HciError::TooLarge(reports.len(), r.data.len()))?;
        let rssi = r.rssi.unwrap_or(NOT_AVAILABLE) as u8;
        if extended {
            let x = match r.kind {
                ReportKind::Extended(x) => x,
                ReportKind::Legacy(_) => ExtendedInfo {
                    event_type: 0x10,
                    primary_phy: Phy::Le1M,
                    secondary_phy: None,
                    sid: None,
                    tx_power: None,
                    periodic_interval: None,
                    direct_address_type: AddressType::Public,
                    direct_address: Address::default(),
                },
            };
            p.extend_from_slice(&x.event_type.to_le_bytes());
            p.push(r.address_type.to_u8());
            p.extend_from_slice(&r.address.to_hci());
            p.push(x.primary_phy.to_u8());
            p.push(x.secondary_phy.map_or(0, Phy::to_u8));
            p.push(x.sid.unwrap_or(0xFF));
            p.push(x.tx_power.unwrap_or(NOT_AVAILABLE) as u8);
            p.push(rssi);
            p.extend_from_slice(&x.periodic_interval.unwrap_or(0).to_le_bytes());
            p.push(x.direct_address_type.to_u8());
            p.extend_from_slice(&x.direct_address.to_hci());
            p.push(len);
            p.extend_from_slice(&r.data);
        } else {
            let t = match r.kind {
                ReportKind::Legacy(t) => t,
                ReportKind::Extended(_) => LegacyEventType::AdvNonconnInd,
            };
            p.push(t.to_u8());
            p.push(r.address_type.to_u8());
            p.extend_from_slice(&r.address.to_hci());
            p.push(len);
            p.extend_from_slice(&r.data);
            p.push(rssi);
        }
    }
    let plen = u8::try_from(p.len()).map_err(|_| HciError::TooLarge(reports.len(), p.len()))?;
    let mut out = Vec::with_capacity(2 + p.len());
    out.push(EVENT_LE_META);
    out.push(plen);
    out.extend_from_slice(&p);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// An LE Advertising Report as a controller sends it for the iBeacon of `beacon.rs`:
    /// ADV_NONCONN_IND from random address C4:7C:8D:6A:3B:21 (LSB first on the wire), 30 data
    /// bytes, RSSI -67 dBm (0xBD).
    const LEGACY_IBEACON: &str = "3E 2A 02 01 03 01 213B6A8D7CC4 1E \
        020106 1AFF4C000215 E2C56DB5DFFB48D2B060D0F5A71096E0 0001 0002 C5 BD";

    #[test]
    fn legacy_report_fields_in_wire_order() {
        let pkt = hex(LEGACY_IBEACON);
        assert_eq!(pkt[1] as usize, pkt.len() - 2);
        let reports = parse_advertising_reports(&pkt).unwrap().unwrap();
        assert_eq!(reports.len(), 1);
        let r = &reports[0];
        assert_eq!(r.kind, ReportKind::Legacy(LegacyEventType::AdvNonconnInd));
        assert_eq!(r.address_type, AddressType::Random);
        assert_eq!(r.address.to_string(), "C4:7C:8D:6A:3B:21");
        assert_eq!(r.rssi, Some(-67));
        assert_eq!(r.data.len(), 30);
        assert_eq!(&r.data[..5], &[0x02, 0x01, 0x06, 0x1A, 0xFF]);
        assert_eq!(encode_le_advertising_report(&reports, false).unwrap(), pkt);
    }

    #[test]
    fn several_legacy_reports_in_one_event() {
        // An ADV_IND with a name and a SCAN_RSP with no data, from two public addresses;
        // the second RSSI is "not available" (127).
        let pkt = hex("3E 1C 02 02 \
            00 00 665544332211 06 05 09 63 61 72 74 C8 \
            04 00 CCBBAA998877 00 7F");
        assert_eq!(pkt[1] as usize, pkt.len() - 2);
        let reports = parse_advertising_reports(&pkt).unwrap().unwrap();
        assert_eq!(reports.len(), 2);
        assert_eq!(reports[0].kind, ReportKind::Legacy(LegacyEventType::AdvInd));
        assert_eq!(reports[0].address.to_string(), "11:22:33:44:55:66");
        assert_eq!(reports[0].data, hex("0509 63617274"));
        assert_eq!(reports[0].rssi, Some(-56));
        assert_eq!(
            reports[1].kind,
            ReportKind::Legacy(LegacyEventType::ScanRsp)
        );
        assert_eq!(reports[1].address_type, AddressType::Public);
        assert_eq!(reports[1].address.to_string(), "77:88:99:AA:BB:CC");
        assert!(reports[1].data.is_empty());
        assert_eq!(reports[1].rssi, None);
        assert_eq!(encode_le_advertising_report(&reports, false).unwrap(), pkt);
    }

    /// An extended report of a non-connectable, non-scannable extended advertiser (event type
    /// 0x0000) on LE 1M / LE 2M, SID 3, TX power +4 dBm, RSSI -71 dBm, no periodic advertising,
    /// data complete, carrying the AltBeacon of `beacon.rs`.
    const EXTENDED_ALTBEACON: &str = "3E 39 0D 01 \
        0000 01 213B6A8D7CC4 01 02 03 04 B9 0000 00 000000000000 1F \
        020106 1BFF1801BEAC 2F234454CF6D4A0FADF2F4911BA9FFA6 0001 0002 C5 00";

    #[test]
    fn extended_report_fields_in_wire_order() {
        let pkt = hex(EXTENDED_ALTBEACON);
        assert_eq!(pkt[1] as usize, pkt.len() - 2);
        let reports = parse_advertising_reports(&pkt).unwrap().unwrap();
        assert_eq!(reports.len(), 1);
        let r = &reports[0];
        let ReportKind::Extended(x) = r.kind else {
            panic!("{r:?}")
        };
        assert!(!x.connectable() && !x.scannable() && !x.legacy_pdu());
        assert!(!x.directed() && !x.scan_response());
        assert_eq!(x.data_status(), DataStatus::Complete);
        assert_eq!(x.primary_phy, Phy::Le1M);
        assert_eq!(x.secondary_phy, Some(Phy::Le2M));
        assert_eq!(x.sid, Some(3));
        assert_eq!(x.tx_power, Some(4));
        assert_eq!(x.periodic_interval, None);
        assert_eq!(r.rssi, Some(-71));
        assert_eq!(r.address.to_string(), "C4:7C:8D:6A:3B:21");
        assert_eq!(r.data.len(), 31);
        assert_eq!(encode_le_advertising_report(&reports, true).unwrap(), pkt);
        // The same report for a legacy ADV_IND (event type 0x0013).
        let mut legacy = pkt.clone();
        legacy[4] = 0x13;
        let r = &parse_advertising_reports(&legacy).unwrap().unwrap()[0];
        let ReportKind::Extended(x) = r.kind else {
            panic!()
        };
        assert!(x.connectable() && x.scannable() && x.legacy_pdu() && !x.directed());
        assert_eq!(x.legacy_event_type(), Some(LegacyEventType::AdvInd));
        for (bits, t) in [
            (0x10, Some(LegacyEventType::AdvNonconnInd)),
            (0x12, Some(LegacyEventType::AdvScanInd)),
            (0x15, Some(LegacyEventType::AdvDirectInd)),
            (0x1B, Some(LegacyEventType::ScanRsp)),
            (0x1A, Some(LegacyEventType::ScanRsp)),
            (0x00, None),
            (0x11, None),
        ] {
            assert_eq!(
                ExtendedInfo {
                    event_type: bits,
                    ..x
                }
                .legacy_event_type(),
                t,
                "{bits:#x}"
            );
        }
    }

    #[test]
    fn extended_report_unavailable_values_and_data_status() {
        // Anonymous, coded PHY, no secondary, no ADI, TX power and RSSI unavailable, periodic
        // interval 0x0050 (100 ms), directed to random 01:02:03:04:05:06, data truncated.
        let pkt = hex("3E 1A 0D 01 \
            4400 FF 000000000000 03 00 FF 7F 7F 5000 01 060504030201 00");
        let r = &parse_advertising_reports(&pkt).unwrap().unwrap()[0];
        let ReportKind::Extended(x) = r.kind else {
            panic!()
        };
        assert_eq!(r.address_type, AddressType::Anonymous);
        assert_eq!(x.primary_phy, Phy::LeCoded);
        assert_eq!(
            (x.secondary_phy, x.sid, x.tx_power, r.rssi),
            (None, None, None, None)
        );
        assert_eq!(x.periodic_interval, Some(0x50));
        assert!(x.directed());
        assert_eq!(x.data_status(), DataStatus::Truncated);
        assert_eq!(x.direct_address_type, AddressType::Random);
        assert_eq!(x.direct_address.to_string(), "01:02:03:04:05:06");
        assert_eq!(
            encode_le_advertising_report(std::slice::from_ref(r), true).unwrap(),
            pkt
        );
        let mut incomplete = pkt.clone();
        incomplete[4] = 0x20;
        let r = &parse_advertising_reports(&incomplete).unwrap().unwrap()[0];
        let ReportKind::Extended(x) = r.kind else {
            panic!()
        };
        assert_eq!(x.data_status(), DataStatus::Incomplete);
    }

    #[test]
    fn other_events_are_not_reports() {
        // Command Complete for LE Set Scan Enable, and an LE Connection Complete subevent.
        assert_eq!(
            parse_advertising_reports(&hex("0E 04 01 0C 20 00")),
            Ok(None)
        );
        let conn = hex("3E 13 01 00 4000 00 00 665544332211 1800 0000 C800 00");
        assert_eq!(parse_advertising_reports(&conn), Ok(None));
    }

    #[test]
    fn every_truncation_of_a_report_event_is_an_error() {
        for pkt in [hex(LEGACY_IBEACON), hex(EXTENDED_ALTBEACON)] {
            for cut in 0..pkt.len() {
                let mut p = pkt[..cut].to_vec();
                assert!(
                    parse_advertising_reports(&p).is_err(),
                    "cut {cut} of {pkt:02x?}"
                );
                // Even with the parameter length fixed up to match, the reports are short.
                if cut >= 3 {
                    p[1] = (cut - 2) as u8;
                    assert!(parse_advertising_reports(&p).is_err(), "fixed-up cut {cut}");
                }
            }
        }
    }

    #[test]
    fn wrong_lengths_are_errors() {
        let pkt = hex(LEGACY_IBEACON);
        // A parameter total length that disagrees with the packet.
        let mut p = pkt.clone();
        p[1] += 1;
        assert_eq!(
            parse_advertising_reports(&p),
            Err(HciError::ParameterLength {
                code: 0x3E,
                declared: 0x2B,
                present: 0x2A
            })
        );
        // A data length one too long eats the RSSI and leaves the report short.
        let mut p = pkt.clone();
        p[12] += 1;
        assert!(matches!(
            parse_advertising_reports(&p),
            Err(HciError::Truncated { index: 0, .. })
        ));
        // One too short leaves a byte after the last report.
        let mut p = pkt.clone();
        p[12] -= 1;
        assert_eq!(
            parse_advertising_reports(&p),
            Err(HciError::TrailingBytes {
                subevent: 2,
                extra: 1
            })
        );
        // More reports announced than present.
        let mut p = pkt.clone();
        p[3] = 2;
        assert!(matches!(
            parse_advertising_reports(&p),
            Err(HciError::Truncated {
                index: 1,
                count: 2,
                ..
            })
        ));
        // Zero reports, and a legacy data length above 31.
        assert_eq!(
            parse_advertising_reports(&hex("3E 02 02 00")),
            Err(HciError::NoReports { subevent: 2 })
        );
        let p = hex("3E 0C 02 01 00 00 665544332211 20 00");
        assert_eq!(
            parse_advertising_reports(&p),
            Err(HciError::LegacyDataLength { index: 0, len: 32 })
        );
        assert_eq!(
            parse_advertising_reports(&hex("3E 00")),
            Err(HciError::NoSubevent)
        );
        assert_eq!(
            parse_advertising_reports(&[0x3E]),
            Err(HciError::ShortHeader(1))
        );
    }

    #[test]
    fn encoding_refuses_what_one_event_cannot_carry() {
        let r = AdvertisingReport {
            kind: ReportKind::Legacy(LegacyEventType::AdvNonconnInd),
            address_type: AddressType::Public,
            address: Address([1, 2, 3, 4, 5, 6]),
            rssi: Some(-50),
            data: vec![0; 31],
        };
        assert!(encode_le_advertising_report(&vec![r.clone(); 6], false).is_ok());
        assert!(matches!(
            encode_le_advertising_report(&vec![r.clone(); 7], false),
            Err(HciError::TooLarge(7, _))
        ));
        // 32 bytes are too many for a legacy report, not for an extended one.
        let big = AdvertisingReport {
            data: vec![0; 32],
            ..r
        };
        assert_eq!(
            encode_le_advertising_report(std::slice::from_ref(&big), false),
            Err(HciError::LegacyDataLength { index: 0, len: 32 })
        );
        let ext = encode_le_advertising_report(std::slice::from_ref(&big), true).unwrap();
        let back = parse_advertising_reports(&ext).unwrap().unwrap();
        assert_eq!(back[0].data, big.data);
    }
}
