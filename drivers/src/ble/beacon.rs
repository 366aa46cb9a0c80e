//! Beacon frames inside advertising data: Apple iBeacon and AltBeacon (manufacturer specific
//! data) and Eddystone (service data of UUID 0xFEAA, see [`super::eddystone`]).
//!
//! A field is a beacon candidate when it carries the format's marker: company 0x004C with the
//! iBeacon type and length `0x02 0x15`; any company with the AltBeacon code `0xBE 0xAC`; service
//! data for 0xFEAA. A candidate that then breaks the format (wrong length, reserved values) is a
//! [`FrameError`]; a field without a marker is simply not a beacon (Apple's other manufacturer
//! data, for instance AirPods or Find My, is not an error).
//!
//! Layouts (all multi-byte beacon fields big-endian, the company id little-endian as in any AD):
//! * iBeacon: `1A FF 4C 00 02 15 <uuid 16> <major 2> <minor 2> <measured power i8 at 1 m>`.
//! * AltBeacon v1.0: `1B FF <company 2> BE AC <beacon id 20> <reference rssi i8 at 1 m> <mfg reserved>`.

use super::ad::{AdError, AdField, ad_type, push_structure};
use super::eddystone::{EDDYSTONE_UUID, Eddystone};

pub const APPLE_COMPANY_ID: u16 = 0x004C;
const IBEACON_PREFIX: [u8; 2] = [0x02, 0x15];
const IBEACON_LEN: usize = 2 + 16 + 2 + 2 + 1;
const ALTBEACON_CODE: [u8; 2] = [0xBE, 0xAC];
const ALTBEACON_LEN: usize = 2 + 20 + 1 + 1;

/// Flags the encoders put first: LE General Discoverable, BR/EDR not supported (0x06).
pub const BEACON_FLAGS: u8 = 0x06;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error(
        "{format} frame has {len} bytes where the format needs {expected}; the frame is dropped"
    )]
    Length {
        format: &'static str,
        len: usize,
        expected: &'static str,
    },
    #[error(
        "iBeacon frame declares {0:#04x} bytes after its type where iBeacon has 0x15; the frame is dropped"
    )]
    IBeaconLength(u8),
    #[error("Eddystone frame type {0:#04x} is not UID, URL, TLM or EID; the frame is dropped")]
    EddystoneFrameType(u8),
    #[error(
        "Eddystone-TLM version {0:#04x} is neither 0x00 (plain) nor 0x01 (encrypted); the frame is dropped"
    )]
    TlmVersion(u8),
    #[error(
        "Eddystone-URL scheme prefix {0:#04x} is reserved (0x00-0x03 are defined); the frame is dropped"
    )]
    UrlScheme(u8),
    #[error(
        "Eddystone-URL byte {0:#04x} is reserved (not a printable character or expansion code); the frame is dropped"
    )]
    UrlByte(u8),
    #[error("URL {0:?} cannot be encoded as Eddystone-URL: {1}")]
    UrlEncode(String, &'static str),
    #[error(transparent)]
    Ad(#[from] AdError),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct IBeacon {
    /// Proximity UUID, big-endian as printed (`e2c56db5-dffb-...`).
    pub uuid: [u8; 16],
    pub major: u16,
    pub minor: u16,
    /// Calibrated RSSI at 1 m, dBm.
    pub measured_power: i8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AltBeacon {
    /// Manufacturer's company identifier (any company may send AltBeacon).
    pub company_id: u16,
    /// Beacon id, big-endian; by convention a 16-byte UUID then two 2-byte ids.
    pub id: [u8; 20],
    /// Average RSSI at 1 m, dBm.
    pub reference_rssi: i8,
    /// Manufacturer reserved byte, meaning defined by `company_id`.
    pub mfg_reserved: u8,
}

impl AltBeacon {
    /// The conventional split of the 20-byte id: a UUID, then two 16-bit ids.
    pub fn uuid_major_minor(&self) -> ([u8; 16], u16, u16) {
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&self.id[..16]);
        (
            uuid,
            u16::from_be_bytes([self.id[16], self.id[17]]),
            u16::from_be_bytes([self.id[18], self.id[19]]),
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Beacon {
    IBeacon(IBeacon),
    AltBeacon(AltBeacon),
    Eddystone(Eddystone),
}

impl Beacon {
    /// The beacon frame a field carries: `None` when the field has no beacon marker.
    pub fn from_field(field: &AdField<'_>) -> Option<Result<Beacon, FrameError>> {
        match field {
            AdField::Manufacturer { company_id, data } => {
                Self::from_manufacturer_data(*company_id, data)
            }
            AdField::ServiceData16 { uuid, data } if *uuid == EDDYSTONE_UUID => {
                Some(Eddystone::parse(data).map(Beacon::Eddystone))
            }
            _ => None,
        }
    }

    /// Manufacturer specific data after the company id.
    pub fn from_manufacturer_data(
        company_id: u16,
        data: &[u8],
    ) -> Option<Result<Beacon, FrameError>> {
        if company_id == APPLE_COMPANY_ID && data.first() == Some(&IBEACON_PREFIX[0]) {
            return Some(parse_ibeacon(data).map(Beacon::IBeacon));
        }
        if data.starts_with(&ALTBEACON_CODE) {
            return Some(parse_altbeacon(company_id, data).map(Beacon::AltBeacon));
        }
        None
    }

    /// Calibrated RSSI at 1 m in dBm, the input of a log-distance model. Eddystone calibrates at
    /// 0 m; its spec puts the loss over the first metre at 41 dB, which is subtracted here.
    pub fn rssi_at_1m(&self) -> Option<i8> {
        match self {
            Beacon::IBeacon(b) => Some(b.measured_power),
            Beacon::AltBeacon(b) => Some(b.reference_rssi),
            Beacon::Eddystone(e) => e.tx_power_0m().map(|p| p.saturating_sub(41)),
        }
    }

    /// The full advertising data a beacon of this frame sends: Flags, then the frame (and for
    /// Eddystone the 16-bit UUID list its spec requires). At most 31 bytes for every format.
    pub fn to_advertising_data(&self) -> Result<Vec<u8>, FrameError> {
        let mut out = Vec::with_capacity(31);
        push_structure(&mut out, ad_type::FLAGS, &[BEACON_FLAGS])?;
        match self {
            Beacon::IBeacon(b) => {
                let mut d = Vec::with_capacity(2 + IBEACON_LEN);
                d.extend_from_slice(&APPLE_COMPANY_ID.to_le_bytes());
                d.extend_from_slice(&IBEACON_PREFIX);
                d.extend_from_slice(&b.uuid);
                d.extend_from_slice(&b.major.to_be_bytes());
                d.extend_from_slice(&b.minor.to_be_bytes());
                d.push(b.measured_power as u8);
                push_structure(&mut out, ad_type::MANUFACTURER, &d)?;
            }
            Beacon::AltBeacon(b) => {
                let mut d = Vec::with_capacity(2 + ALTBEACON_LEN);
                d.extend_from_slice(&b.company_id.to_le_bytes());
                d.extend_from_slice(&ALTBEACON_CODE);
                d.extend_from_slice(&b.id);
                d.push(b.reference_rssi as u8);
                d.push(b.mfg_reserved);
                push_structure(&mut out, ad_type::MANUFACTURER, &d)?;
            }
            Beacon::Eddystone(e) => {
                push_structure(
                    &mut out,
                    ad_type::UUID16_COMPLETE,
                    &EDDYSTONE_UUID.to_le_bytes(),
                )?;
                let mut d = EDDYSTONE_UUID.to_le_bytes().to_vec();
                d.extend_from_slice(&e.to_frame()?);
                push_structure(&mut out, ad_type::SERVICE_DATA_16, &d)?;
            }
        }
        Ok(out)
    }
}

fn parse_ibeacon(data: &[u8]) -> Result<IBeacon, FrameError> {
    if data.len() >= 2 && data[1] != IBEACON_PREFIX[1] {
        return Err(FrameError::IBeaconLength(data[1]));
    }
    if data.len() != IBEACON_LEN {
        return Err(FrameError::Length {
            format: "iBeacon",
            len: data.len(),
            expected: "23 after the company id",
        });
    }
    let mut uuid = [0u8; 16];
    uuid.copy_from_slice(&data[2..18]);
    Ok(IBeacon {
        uuid,
        major: u16::from_be_bytes([data[18], data[19]]),
        minor: u16::from_be_bytes([data[20], data[21]]),
        measured_power: data[22] as i8,
    })
}

fn parse_altbeacon(company_id: u16, data: &[u8]) -> Result<AltBeacon, FrameError> {
    if data.len() != ALTBEACON_LEN {
        return Err(FrameError::Length {
            format: "AltBeacon",
            len: data.len(),
            expected: "24 after the company id",
        });
    }
    let mut id = [0u8; 20];
    id.copy_from_slice(&data[2..22]);
    Ok(AltBeacon {
        company_id,
        id,
        reference_rssi: data[22] as i8,
        mfg_reserved: data[23],
    })
}

/// Formats a 16-byte UUID as `8-4-4-4-12` lowercase hex.
pub fn format_uuid(u: &[u8; 16]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(36);
    for (i, b) in u.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            s.push('-');
        }
        s.push(char::from(HEX[usize::from(b >> 4)]));
        s.push(char::from(HEX[usize::from(b & 0x0F)]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::ad::Advertisement;
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn one_beacon(data: &[u8]) -> Result<Beacon, FrameError> {
        let ad = Advertisement::parse(data).unwrap();
        let mut it = ad.beacons();
        let b = it.next().expect("a beacon");
        assert!(it.next().is_none());
        b
    }

    /// The advertisement of Apple's "Getting Started with iBeacon" example region UUID
    /// E2C56DB5-DFFB-48D2-B060-D0F5A71096E0, major 1, minor 2, measured power -59 dBm (0xC5).
    const IBEACON_AD: &str = "020106 1AFF4C000215 E2C56DB5DFFB48D2B060D0F5A71096E0 0001 0002 C5";

    #[test]
    fn ibeacon_fields_are_big_endian_and_the_power_signed() {
        let b = one_beacon(&hex(IBEACON_AD)).unwrap();
        let Beacon::IBeacon(ib) = b else {
            panic!("{b:?}")
        };
        assert_eq!(
            format_uuid(&ib.uuid),
            "e2c56db5-dffb-48d2-b060-d0f5a71096e0"
        );
        assert_eq!((ib.major, ib.minor, ib.measured_power), (1, 2, -59));
        assert_eq!(b.rssi_at_1m(), Some(-59));
    }

    #[test]
    fn ibeacon_encodes_to_the_spec_bytes() {
        let b = one_beacon(&hex(IBEACON_AD)).unwrap();
        assert_eq!(b.to_advertising_data().unwrap(), hex(IBEACON_AD));
        let b = Beacon::IBeacon(IBeacon {
            uuid: [0xFF; 16],
            major: 0xABCD,
            minor: 0x0102,
            measured_power: -100,
        });
        let ad = b.to_advertising_data().unwrap();
        assert_eq!(ad.len(), 30);
        assert_eq!(&ad[25..], &[0xAB, 0xCD, 0x01, 0x02, 0x9C]);
        assert_eq!(one_beacon(&ad).unwrap(), b);
    }

    #[test]
    fn broken_ibeacons_are_errors_and_other_apple_data_is_not_a_beacon() {
        let good = hex(IBEACON_AD);
        // One byte short: the AD length shrinks with it.
        let mut short = good.clone();
        short.pop();
        short[3] -= 1;
        assert!(matches!(
            one_beacon(&short),
            Err(FrameError::Length { len: 22, .. })
        ));
        // One byte long.
        let mut long = good.clone();
        long.push(0);
        long[3] += 1;
        assert!(matches!(
            one_beacon(&long),
            Err(FrameError::Length { len: 24, .. })
        ));
        // The iBeacon length byte itself is wrong.
        let mut wrong = good.clone();
        wrong[8] = 0x14;
        assert_eq!(one_beacon(&wrong), Err(FrameError::IBeaconLength(0x14)));
        // Apple "Nearby" data (type 0x10) is no beacon; neither is iBeacon layout for another company.
        let nearby = hex("020106 0AFF4C001005031C0A8C22");
        assert_eq!(Advertisement::parse(&nearby).unwrap().beacons().count(), 0);
        let mut other_company = good;
        other_company[5] = 0x59;
        assert_eq!(
            Advertisement::parse(&other_company)
                .unwrap()
                .beacons()
                .count(),
            0
        );
    }

    /// AltBeacon with the Radius Networks company id 0x0118, the id of the AltBeacon spec's
    /// exploded view (UUID 2F234454-CF6D-4A0F-ADF2-F4911BA9FFA6, then 0x0001, 0x0002),
    /// reference RSSI -59 dBm (0xC5) and mfg reserved 0x00.
    const ALTBEACON_AD: &str =
        "020106 1BFF1801BEAC 2F234454CF6D4A0FADF2F4911BA9FFA6 0001 0002 C5 00";

    #[test]
    fn altbeacon_parses_and_encodes_byte_for_byte() {
        let data = hex(ALTBEACON_AD);
        let b = one_beacon(&data).unwrap();
        let Beacon::AltBeacon(ab) = &b else {
            panic!("{b:?}")
        };
        assert_eq!(ab.company_id, 0x0118);
        let (uuid, major, minor) = ab.uuid_major_minor();
        assert_eq!(format_uuid(&uuid), "2f234454-cf6d-4a0f-adf2-f4911ba9ffa6");
        assert_eq!((major, minor), (1, 2));
        assert_eq!((ab.reference_rssi, ab.mfg_reserved), (-59, 0));
        assert_eq!(b.to_advertising_data().unwrap(), data);
    }

    #[test]
    fn altbeacon_of_the_wrong_length_is_an_error() {
        let mut data = hex(ALTBEACON_AD);
        data.pop();
        data[3] = 0x1A;
        assert!(matches!(
            one_beacon(&data),
            Err(FrameError::Length {
                format: "AltBeacon",
                len: 23,
                ..
            })
        ));
    }
}
