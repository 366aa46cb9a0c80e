//! Advertising data (AD): the list of AD structures an advertiser puts in its advertising and scan
//! response PDUs (Core spec Vol 3 Part C §11, data types in the Core Specification Supplement Part A).
//!
//! Each structure is `length, type, data[length - 1]`; `length` counts the type byte. A length of
//! zero ends the list early (the rest is padding, which controllers send as zeros). Invariants:
//! * A structure whose length runs past the end of the data is an [`AdError::Overrun`], never a
//!   panic and never a silently shortened field.
//! * The known types below are checked for their size (a 16-bit UUID list of odd length, an empty
//!   Flags field...) and refused as [`AdError::FieldLength`]; unknown types are kept as
//!   [`AdField::Other`] with their bytes.
//! * Fields borrow from the input: parsing allocates only the field list and UUID lists.
//!
//! Multi-byte values in AD are little-endian (company ids, UUIDs); 128-bit UUIDs are returned in
//! the usual big-endian (textual) order.

use super::beacon::{Beacon, FrameError};

/// AD type codes (Assigned Numbers, "Common Data Types").
pub mod ad_type {
    pub const FLAGS: u8 = 0x01;
    pub const UUID16_INCOMPLETE: u8 = 0x02;
    pub const UUID16_COMPLETE: u8 = 0x03;
    pub const UUID32_INCOMPLETE: u8 = 0x04;
    pub const UUID32_COMPLETE: u8 = 0x05;
    pub const UUID128_INCOMPLETE: u8 = 0x06;
    pub const UUID128_COMPLETE: u8 = 0x07;
    pub const SHORT_NAME: u8 = 0x08;
    pub const COMPLETE_NAME: u8 = 0x09;
    pub const TX_POWER: u8 = 0x0A;
    pub const SERVICE_DATA_16: u8 = 0x16;
    pub const APPEARANCE: u8 = 0x19;
    pub const SERVICE_DATA_32: u8 = 0x20;
    pub const SERVICE_DATA_128: u8 = 0x21;
    pub const MANUFACTURER: u8 = 0xFF;
}

/// Flags bits (CSS Part A §1.3).
pub mod flags {
    pub const LE_LIMITED_DISCOVERABLE: u8 = 0x01;
    pub const LE_GENERAL_DISCOVERABLE: u8 = 0x02;
    pub const BR_EDR_NOT_SUPPORTED: u8 = 0x04;
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdError {
    #[error(
        "AD structure at byte {offset} declares {declared} bytes but only {available} remain: the advertising data is truncated or its length byte is wrong; the advertisement is dropped"
    )]
    Overrun {
        offset: usize,
        declared: usize,
        available: usize,
    },
    #[error(
        "AD structure of type {ad_type:#04x} at byte {offset} has {len} data bytes, which this type cannot have ({expected}); the advertisement is dropped"
    )]
    FieldLength {
        offset: usize,
        ad_type: u8,
        len: usize,
        expected: &'static str,
    },
}

/// One raw AD structure: its type and data (the length byte is `data.len() + 1`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdStructure<'a> {
    /// Byte offset of the length byte in the advertising data.
    pub offset: usize,
    pub ad_type: u8,
    pub data: &'a [u8],
}

/// The AD structures of `data`, in order. Stops after the first error.
pub fn structures(data: &[u8]) -> Structures<'_> {
    Structures {
        data,
        pos: 0,
        failed: false,
    }
}

/// Iterator over raw AD structures; see [`structures`].
#[derive(Debug, Clone)]
pub struct Structures<'a> {
    data: &'a [u8],
    pos: usize,
    failed: bool,
}

impl<'a> Structures<'a> {
    /// Bytes consumed so far, early-termination padding included once the list has ended.
    pub fn consumed(&self) -> usize {
        self.pos
    }
}

impl<'a> Iterator for Structures<'a> {
    type Item = Result<AdStructure<'a>, AdError>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed || self.pos >= self.data.len() {
            return None;
        }
        let offset = self.pos;
        let len = usize::from(self.data[offset]);
        if len == 0 {
            // Early termination: the remainder is padding.
            self.pos = self.data.len();
            return None;
        }
        let available = self.data.len() - offset - 1;
        if len > available {
            self.failed = true;
            return Some(Err(AdError::Overrun {
                offset,
                declared: len,
                available,
            }));
        }
        let ad_type = self.data[offset + 1];
        let body = &self.data[offset + 2..offset + 1 + len];
        self.pos = offset + 1 + len;
        Some(Ok(AdStructure {
            offset,
            ad_type,
            data: body,
        }))
    }
}

/// A typed AD structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdField<'a> {
    Flags(u8),
    /// 16-bit service UUIDs (`complete` = AD type 0x03).
    Uuids16 {
        complete: bool,
        uuids: Vec<u16>,
    },
    Uuids32 {
        complete: bool,
        uuids: Vec<u32>,
    },
    /// 128-bit service UUIDs, big-endian (textual) byte order.
    Uuids128 {
        complete: bool,
        uuids: Vec<[u8; 16]>,
    },
    /// Local name bytes (UTF-8 by the spec, but not checked: see [`AdField::name_lossy`]).
    LocalName {
        complete: bool,
        name: &'a [u8],
    },
    /// TX power level in dBm.
    TxPower(i8),
    Appearance(u16),
    ServiceData16 {
        uuid: u16,
        data: &'a [u8],
    },
    ServiceData32 {
        uuid: u32,
        data: &'a [u8],
    },
    /// Service data for a 128-bit UUID (big-endian order).
    ServiceData128 {
        uuid: [u8; 16],
        data: &'a [u8],
    },
    /// Manufacturer specific data: the company identifier, then the company's bytes.
    Manufacturer {
        company_id: u16,
        data: &'a [u8],
    },
    /// Any other AD type, kept as it came.
    Other {
        ad_type: u8,
        data: &'a [u8],
    },
}

impl<'a> AdField<'a> {
    /// Types the structure. Errors only on a size the type cannot have.
    pub fn from_structure(s: AdStructure<'a>) -> Result<Self, AdError> {
        use ad_type::*;
        let d = s.data;
        let bad = |expected: &'static str| AdError::FieldLength {
            offset: s.offset,
            ad_type: s.ad_type,
            len: d.len(),
            expected,
        };
        Ok(match s.ad_type {
            FLAGS => {
                // Flags may be longer than one octet; only the first carries defined bits.
                let f = *d.first().ok_or_else(|| bad("at least 1"))?;
                AdField::Flags(f)
            }
            UUID16_INCOMPLETE | UUID16_COMPLETE => {
                if d.len() % 2 != 0 {
                    return Err(bad("a multiple of 2"));
                }
                AdField::Uuids16 {
                    complete: s.ad_type == UUID16_COMPLETE,
                    uuids: d
                        .chunks_exact(2)
                        .map(|c| u16::from_le_bytes([c[0], c[1]]))
                        .collect(),
                }
            }
            UUID32_INCOMPLETE | UUID32_COMPLETE => {
                if d.len() % 4 != 0 {
                    return Err(bad("a multiple of 4"));
                }
                AdField::Uuids32 {
                    complete: s.ad_type == UUID32_COMPLETE,
                    uuids: d
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect(),
                }
            }
            UUID128_INCOMPLETE | UUID128_COMPLETE => {
                if d.len() % 16 != 0 {
                    return Err(bad("a multiple of 16"));
                }
                AdField::Uuids128 {
                    complete: s.ad_type == UUID128_COMPLETE,
                    uuids: d.chunks_exact(16).map(uuid128_from_le).collect(),
                }
            }
            SHORT_NAME | COMPLETE_NAME => AdField::LocalName {
                complete: s.ad_type == COMPLETE_NAME,
                name: d,
            },
            TX_POWER => match d {
                [p] => AdField::TxPower(*p as i8),
                _ => return Err(bad("exactly 1")),
            },
            APPEARANCE => match d {
                [a, b] => AdField::Appearance(u16::from_le_bytes([*a, *b])),
                _ => return Err(bad("exactly 2")),
            },
            SERVICE_DATA_16 => {
                if d.len() < 2 {
                    return Err(bad("at least 2"));
                }
                AdField::ServiceData16 {
                    uuid: u16::from_le_bytes([d[0], d[1]]),
                    data: &d[2..],
                }
            }
            SERVICE_DATA_32 => {
                if d.len() < 4 {
                    return Err(bad("at least 4"));
                }
                AdField::ServiceData32 {
                    uuid: u32::from_le_bytes([d[0], d[1], d[2], d[3]]),
                    data: &d[4..],
                }
            }
            SERVICE_DATA_128 => {
                if d.len() < 16 {
                    return Err(bad("at least 16"));
                }
                AdField::ServiceData128 {
                    uuid: uuid128_from_le(&d[..16]),
                    data: &d[16..],
                }
            }
            MANUFACTURER => {
                if d.len() < 2 {
                    return Err(bad("at least 2"));
                }
                AdField::Manufacturer {
                    company_id: u16::from_le_bytes([d[0], d[1]]),
                    data: &d[2..],
                }
            }
            ad_type => AdField::Other { ad_type, data: d },
        })
    }

    /// The local name, with invalid UTF-8 replaced.
    pub fn name_lossy(&self) -> Option<String> {
        match self {
            AdField::LocalName { name, .. } => Some(String::from_utf8_lossy(name).into_owned()),
            _ => None,
        }
    }
}

fn uuid128_from_le(c: &[u8]) -> [u8; 16] {
    let mut u = [0u8; 16];
    for (dst, src) in u.iter_mut().zip(c.iter().rev()) {
        *dst = *src;
    }
    u
}

/// A parsed advertisement (advertising or scan-response data): every field, in order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Advertisement<'a> {
    pub fields: Vec<AdField<'a>>,
}

impl<'a> Advertisement<'a> {
    /// Parses the whole AD list; any structural or size error refuses the advertisement.
    pub fn parse(data: &'a [u8]) -> Result<Self, AdError> {
        let fields = structures(data)
            .map(|s| s.and_then(AdField::from_structure))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Advertisement { fields })
    }

    pub fn flags(&self) -> Option<u8> {
        self.fields.iter().find_map(|f| match f {
            AdField::Flags(v) => Some(*v),
            _ => None,
        })
    }

    /// The local name (complete or shortened), lossily decoded.
    pub fn local_name(&self) -> Option<String> {
        self.fields.iter().find_map(AdField::name_lossy)
    }

    pub fn tx_power(&self) -> Option<i8> {
        self.fields.iter().find_map(|f| match f {
            AdField::TxPower(p) => Some(*p),
            _ => None,
        })
    }

    /// The beacon frames this advertisement carries (iBeacon, AltBeacon, Eddystone), in AD order.
    /// A field that claims a beacon format (Apple's iBeacon prefix, the AltBeacon code, the
    /// Eddystone service UUID) but breaks it gives an error item; other fields are not beacons.
    pub fn beacons(&self) -> impl Iterator<Item = Result<Beacon, FrameError>> + '_ {
        self.fields.iter().filter_map(Beacon::from_field)
    }
}

/// Encodes one AD structure (`length, type, data`). `data` longer than 254 bytes cannot be
/// represented and is refused.
pub fn push_structure(out: &mut Vec<u8>, ad_type: u8, data: &[u8]) -> Result<(), AdError> {
    let len = u8::try_from(data.len() + 1).map_err(|_| AdError::FieldLength {
        offset: out.len(),
        ad_type,
        len: data.len(),
        expected: "at most 254",
    })?;
    out.push(len);
    out.push(ad_type);
    out.extend_from_slice(data);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An iBeacon advertisement as Apple's Proximity Beacon Specification lays it out: Flags
    /// (LE General Discoverable, BR/EDR not supported), then 0x1A 0xFF 0x4C 0x00 0x02 0x15 ...
    const IBEACON: &[u8] = &[
        0x02, 0x01, 0x06, 0x1A, 0xFF, 0x4C, 0x00, 0x02, 0x15, 0xE2, 0xC5, 0x6D, 0xB5, 0xDF, 0xFB,
        0x48, 0xD2, 0xB0, 0x60, 0xD0, 0xF5, 0xA7, 0x10, 0x96, 0xE0, 0x00, 0x01, 0x00, 0x02, 0xC5,
    ];

    #[test]
    fn splits_an_ibeacon_advertisement_into_flags_and_manufacturer_data() {
        let ad = Advertisement::parse(IBEACON).unwrap();
        assert_eq!(ad.fields.len(), 2);
        assert_eq!(ad.flags(), Some(0x06));
        match &ad.fields[1] {
            AdField::Manufacturer { company_id, data } => {
                assert_eq!(*company_id, 0x004C);
                assert_eq!(data.len(), 23);
                assert_eq!(&data[..2], &[0x02, 0x15]);
            }
            f => panic!("{f:?}"),
        }
    }

    #[test]
    fn typed_fields_decode_little_endian_values() {
        let mut data = Vec::new();
        push_structure(
            &mut data,
            ad_type::UUID16_COMPLETE,
            &[0xAA, 0xFE, 0x0F, 0x18],
        )
        .unwrap();
        push_structure(&mut data, ad_type::COMPLETE_NAME, b"cart-17").unwrap();
        push_structure(&mut data, ad_type::TX_POWER, &[0xF4]).unwrap();
        push_structure(&mut data, ad_type::APPEARANCE, &[0x40, 0x02]).unwrap();
        let u128le: Vec<u8> = (0u8..16).collect();
        push_structure(&mut data, ad_type::UUID128_INCOMPLETE, &u128le).unwrap();
        push_structure(&mut data, ad_type::SERVICE_DATA_32, &[1, 2, 3, 4, 9]).unwrap();
        push_structure(&mut data, 0x2A, &[7]).unwrap();
        let ad = Advertisement::parse(&data).unwrap();
        assert_eq!(
            ad.fields[0],
            AdField::Uuids16 {
                complete: true,
                uuids: vec![0xFEAA, 0x180F]
            }
        );
        assert_eq!(ad.local_name().as_deref(), Some("cart-17"));
        assert_eq!(ad.tx_power(), Some(-12));
        assert_eq!(ad.fields[3], AdField::Appearance(0x0240));
        let mut be: Vec<u8> = (0u8..16).collect();
        be.reverse();
        assert_eq!(
            ad.fields[4],
            AdField::Uuids128 {
                complete: false,
                uuids: vec![be.try_into().unwrap()]
            }
        );
        assert_eq!(
            ad.fields[5],
            AdField::ServiceData32 {
                uuid: 0x0403_0201,
                data: &[9]
            }
        );
        assert_eq!(
            ad.fields[6],
            AdField::Other {
                ad_type: 0x2A,
                data: &[7]
            }
        );
    }

    #[test]
    fn a_zero_length_ends_the_list_and_the_padding_is_ignored() {
        let mut data = IBEACON.to_vec();
        data.truncate(3);
        data.extend_from_slice(&[0, 0, 0, 0x05, 0xFF]);
        let ad = Advertisement::parse(&data).unwrap();
        assert_eq!(ad.fields, vec![AdField::Flags(0x06)]);
        let mut s = structures(&data);
        assert!(s.next().is_some());
        assert!(s.next().is_none());
        assert_eq!(s.consumed(), data.len());
    }

    #[test]
    fn a_truncated_advertisement_is_an_overrun_at_the_broken_structure() {
        for cut in 4..IBEACON.len() {
            let err = Advertisement::parse(&IBEACON[..cut]).unwrap_err();
            assert_eq!(
                err,
                AdError::Overrun {
                    offset: 3,
                    declared: 0x1A,
                    available: cut - 4
                },
                "cut at {cut}"
            );
        }
        // A length byte alone at the end.
        assert!(matches!(
            Advertisement::parse(&[0x02, 0x01, 0x06, 0x03]),
            Err(AdError::Overrun {
                offset: 3,
                declared: 3,
                available: 0
            })
        ));
    }

    #[test]
    fn an_over_long_length_byte_is_refused_even_when_it_fits_a_later_structure() {
        // Flags declares 4 bytes and swallows the manufacturer header: what remains is not a
        // valid structure (0x4C would declare 76 bytes).
        let mut data = IBEACON.to_vec();
        data[0] = 0x04;
        assert!(matches!(
            Advertisement::parse(&data),
            Err(AdError::Overrun { offset: 5, .. })
        ));
    }

    #[test]
    fn fields_of_impossible_size_are_refused() {
        let cases: &[(&[u8], u8)] = &[
            (&[0x01, 0x01], ad_type::FLAGS),
            (&[0x04, 0x03, 0xAA, 0xFE, 0x01], ad_type::UUID16_COMPLETE),
            (&[0x03, 0x05, 0x01, 0x02], ad_type::UUID32_COMPLETE),
            (&[0x03, 0x07, 0x01, 0x02], ad_type::UUID128_COMPLETE),
            (&[0x03, 0x0A, 0x01, 0x02], ad_type::TX_POWER),
            (&[0x02, 0x19, 0x01], ad_type::APPEARANCE),
            (&[0x02, 0x16, 0xAA], ad_type::SERVICE_DATA_16),
            (&[0x04, 0x20, 1, 2, 3], ad_type::SERVICE_DATA_32),
            (&[0x03, 0x21, 1, 2], ad_type::SERVICE_DATA_128),
            (&[0x02, 0xFF, 0x4C], ad_type::MANUFACTURER),
        ];
        for (data, t) in cases {
            match Advertisement::parse(data) {
                Err(AdError::FieldLength { ad_type, .. }) => assert_eq!(ad_type, *t),
                other => panic!("{data:02x?}: {other:?}"),
            }
        }
    }

    #[test]
    fn errors_read_as_sentences() {
        let e = Advertisement::parse(&[0x1A, 0xFF, 0x4C]).unwrap_err();
        assert_eq!(
            e.to_string(),
            "AD structure at byte 0 declares 26 bytes but only 2 remain: the advertising data is truncated or its length byte is wrong; the advertisement is dropped"
        );
    }

    #[test]
    fn push_structure_refuses_what_a_length_byte_cannot_hold() {
        let mut out = Vec::new();
        assert!(push_structure(&mut out, 0xFF, &[0; 254]).is_ok());
        assert_eq!(out[0], 255);
        assert!(push_structure(&mut out, 0xFF, &[0; 255]).is_err());
    }
}
