//! Eddystone frames (github.com/google/eddystone): service data for the 16-bit UUID 0xFEAA whose
//! first byte is the frame type. All multi-byte values are big-endian.
//!
//! | frame | type | layout after the type byte | frame length |
//! |---|---|---|---|
//! | UID | 0x00 | tx power at 0 m, namespace 10, instance 6, RFU 2 | 20 (18: RFU omitted, accepted) |
//! | URL | 0x10 | tx power at 0 m, scheme prefix, encoded URL 0-17 | 3-20 |
//! | TLM plain | 0x20 | version 0x00, VBATT mV 2, TEMP 8.8 2, ADV_CNT 4, SEC_CNT 4 (0.1 s) | 14 |
//! | TLM encrypted | 0x20 | version 0x01, ETLM 12, salt 2, MIC 2 | 18 |
//! | EID | 0x30 | tx power at 0 m, ephemeral id 8 | 10 |
//!
//! Lengths are exact: the specs say each frame "must be truncated" after its last field, so a
//! longer frame is as much an error as a shorter one. The RFU bytes of a UID frame are not
//! checked (the spec asks senders for zeros) and are written as zeros.

use super::beacon::FrameError;

pub const EDDYSTONE_UUID: u16 = 0xFEAA;

pub const FRAME_UID: u8 = 0x00;
pub const FRAME_URL: u8 = 0x10;
pub const FRAME_TLM: u8 = 0x20;
pub const FRAME_EID: u8 = 0x30;

/// URL scheme prefixes (Eddystone-URL "URL Scheme Prefix").
pub const URL_SCHEMES: [&str; 4] = ["http://www.", "https://www.", "http://", "https://"];
/// Expansion codes 0x00-0x0D (Eddystone-URL "HTTP URL encoding").
pub const URL_EXPANSIONS: [&str; 14] = [
    ".com/", ".org/", ".edu/", ".net/", ".info/", ".biz/", ".gov/", ".com", ".org", ".edu", ".net",
    ".info", ".biz", ".gov",
];
/// Longest encoded URL after the scheme byte.
pub const MAX_URL_BYTES: usize = 17;

/// Temperature value meaning "not supported" (-128 °C).
const TEMP_UNSUPPORTED: i16 = i16::MIN;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Eddystone {
    Uid {
        /// Calibrated TX power at 0 m, dBm.
        tx_power_0m: i8,
        namespace: [u8; 10],
        instance: [u8; 6],
    },
    Url {
        tx_power_0m: i8,
        /// The decoded URL (scheme and expansions applied).
        url: String,
    },
    Tlm(Tlm),
    Eid {
        tx_power_0m: i8,
        eid: [u8; 8],
    },
}

/// Telemetry. Plain TLM identifies nothing by itself: a receiver pairs it with the UID or URL
/// frames of the same address. Encrypted TLM pairs with EID and needs the beacon's identity key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Tlm {
    Plain {
        /// Battery voltage in mV; `None` when the beacon sends 0 (no battery, e.g. USB powered).
        battery_mv: Option<u16>,
        /// Temperature in signed 8.8 fixed point (1/256 °C); `None` when sent as 0x8000.
        temperature_8_8: Option<i16>,
        /// Advertising PDUs sent since power-up or reboot.
        adv_count: u32,
        /// Time since power-up or reboot, in 0.1 s units.
        uptime_deciseconds: u32,
    },
    /// eTLM: opaque without the identity key (AES-EAX), kept as sent.
    Encrypted { etlm: [u8; 12], salt: u16, mic: u16 },
}

impl Tlm {
    /// Temperature in °C (8.8 fixed point divided by 256).
    pub fn temperature_c(&self) -> Option<f32> {
        match self {
            Tlm::Plain {
                temperature_8_8: Some(t),
                ..
            } => Some(f32::from(*t) / 256.0),
            _ => None,
        }
    }

    /// Time since power-up or reboot in milliseconds.
    pub fn uptime_ms(&self) -> Option<u64> {
        match self {
            Tlm::Plain {
                uptime_deciseconds, ..
            } => Some(u64::from(*uptime_deciseconds) * 100),
            Tlm::Encrypted { .. } => None,
        }
    }
}

fn need(
    frame: &'static str,
    data: &[u8],
    expected: &'static str,
    ok: bool,
) -> Result<(), FrameError> {
    if ok {
        Ok(())
    } else {
        Err(FrameError::Length {
            format: frame,
            len: data.len(),
            expected,
        })
    }
}

fn be16(d: &[u8]) -> u16 {
    u16::from_be_bytes([d[0], d[1]])
}

fn be32(d: &[u8]) -> u32 {
    u32::from_be_bytes([d[0], d[1], d[2], d[3]])
}

impl Eddystone {
    /// Parses one frame (service data after the 0xFEAA UUID).
    pub fn parse(frame: &[u8]) -> Result<Eddystone, FrameError> {
        let Some(&kind) = frame.first() else {
            return Err(FrameError::Length {
                format: "Eddystone",
                len: 0,
                expected: "a frame type byte",
            });
        };
        match kind {
            FRAME_UID => {
                need(
                    "Eddystone-UID",
                    frame,
                    "20 (or 18 without RFU)",
                    matches!(frame.len(), 18 | 20),
                )?;
                let mut namespace = [0u8; 10];
                namespace.copy_from_slice(&frame[2..12]);
                let mut instance = [0u8; 6];
                instance.copy_from_slice(&frame[12..18]);
                Ok(Eddystone::Uid {
                    tx_power_0m: frame[1] as i8,
                    namespace,
                    instance,
                })
            }
            FRAME_URL => {
                need(
                    "Eddystone-URL",
                    frame,
                    "3 to 20",
                    (3..=3 + MAX_URL_BYTES).contains(&frame.len()),
                )?;
                Ok(Eddystone::Url {
                    tx_power_0m: frame[1] as i8,
                    url: decode_url(frame[2], &frame[3..])?,
                })
            }
            FRAME_TLM => {
                need("Eddystone-TLM", frame, "at least 2", frame.len() >= 2)?;
                match frame[1] {
                    0x00 => {
                        need("Eddystone-TLM", frame, "14 (plain)", frame.len() == 14)?;
                        let vbatt = be16(&frame[2..]);
                        let temp = be16(&frame[4..]) as i16;
                        Ok(Eddystone::Tlm(Tlm::Plain {
                            battery_mv: (vbatt != 0).then_some(vbatt),
                            temperature_8_8: (temp != TEMP_UNSUPPORTED).then_some(temp),
                            adv_count: be32(&frame[6..]),
                            uptime_deciseconds: be32(&frame[10..]),
                        }))
                    }
                    0x01 => {
                        need("Eddystone-TLM", frame, "18 (encrypted)", frame.len() == 18)?;
                        let mut etlm = [0u8; 12];
                        etlm.copy_from_slice(&frame[2..14]);
                        Ok(Eddystone::Tlm(Tlm::Encrypted {
                            etlm,
                            salt: be16(&frame[14..]),
                            mic: be16(&frame[16..]),
                        }))
                    }
                    v => Err(FrameError::TlmVersion(v)),
                }
            }
            FRAME_EID => {
                need("Eddystone-EID", frame, "10", frame.len() == 10)?;
                let mut eid = [0u8; 8];
                eid.copy_from_slice(&frame[2..10]);
                Ok(Eddystone::Eid {
                    tx_power_0m: frame[1] as i8,
                    eid,
                })
            }
            other => Err(FrameError::EddystoneFrameType(other)),
        }
    }

    /// Calibrated TX power at 0 m (TLM frames carry none).
    pub fn tx_power_0m(&self) -> Option<i8> {
        match self {
            Eddystone::Uid { tx_power_0m, .. }
            | Eddystone::Url { tx_power_0m, .. }
            | Eddystone::Eid { tx_power_0m, .. } => Some(*tx_power_0m),
            Eddystone::Tlm(_) => None,
        }
    }

    /// The frame bytes (service data after the UUID). UID frames get their two RFU zeros.
    pub fn to_frame(&self) -> Result<Vec<u8>, FrameError> {
        let mut f = Vec::with_capacity(20);
        match self {
            Eddystone::Uid {
                tx_power_0m,
                namespace,
                instance,
            } => {
                f.extend_from_slice(&[FRAME_UID, *tx_power_0m as u8]);
                f.extend_from_slice(namespace);
                f.extend_from_slice(instance);
                f.extend_from_slice(&[0, 0]);
            }
            Eddystone::Url { tx_power_0m, url } => {
                f.extend_from_slice(&[FRAME_URL, *tx_power_0m as u8]);
                f.extend_from_slice(&encode_url(url)?);
            }
            Eddystone::Tlm(Tlm::Plain {
                battery_mv,
                temperature_8_8,
                adv_count,
                uptime_deciseconds,
            }) => {
                f.extend_from_slice(&[FRAME_TLM, 0x00]);
                f.extend_from_slice(&battery_mv.unwrap_or(0).to_be_bytes());
                f.extend_from_slice(&temperature_8_8.unwrap_or(TEMP_UNSUPPORTED).to_be_bytes());
                f.extend_from_slice(&adv_count.to_be_bytes());
                f.extend_from_slice(&uptime_deciseconds.to_be_bytes());
            }
            Eddystone::Tlm(Tlm::Encrypted { etlm, salt, mic }) => {
                f.extend_from_slice(&[FRAME_TLM, 0x01]);
                f.extend_from_slice(etlm);
                f.extend_from_slice(&salt.to_be_bytes());
                f.extend_from_slice(&mic.to_be_bytes());
            }
            Eddystone::Eid { tx_power_0m, eid } => {
                f.extend_from_slice(&[FRAME_EID, *tx_power_0m as u8]);
                f.extend_from_slice(eid);
            }
        }
        Ok(f)
    }
}

/// Decodes an Eddystone-URL: scheme prefix byte, then printable ASCII (0x21-0x7E) and expansion
/// codes (0x00-0x0D). Reserved bytes (0x0E-0x20, 0x7F-0xFF) are errors.
pub fn decode_url(scheme: u8, encoded: &[u8]) -> Result<String, FrameError> {
    let prefix = URL_SCHEMES
        .get(usize::from(scheme))
        .ok_or(FrameError::UrlScheme(scheme))?;
    let mut url = String::with_capacity(prefix.len() + encoded.len() + 8);
    url.push_str(prefix);
    for &b in encoded {
        match b {
            0x00..=0x0D => url.push_str(URL_EXPANSIONS[usize::from(b)]),
            0x21..=0x7E => url.push(char::from(b)),
            _ => return Err(FrameError::UrlByte(b)),
        }
    }
    Ok(url)
}

/// Encodes a URL as scheme byte + encoded bytes, as short as the format allows: every scheme
/// that prefixes the URL is tried, and after it each position takes the longest expansion (all
/// expansions start with their only `.`, so two can never overlap and the longest match is
/// optimal). Fails when the URL has no http(s) scheme, contains a byte outside printable ASCII,
/// or needs more than 17 bytes.
pub fn encode_url(url: &str) -> Result<Vec<u8>, FrameError> {
    let mut best: Option<Result<Vec<u8>, FrameError>> = None;
    for (scheme, prefix) in URL_SCHEMES.iter().enumerate() {
        let Some(rest) = url.strip_prefix(prefix) else {
            continue;
        };
        let candidate = encode_url_rest(url, rest).map(|enc| [&[scheme as u8][..], &enc].concat());
        best = match (best, candidate) {
            (Some(Ok(b)), Ok(c)) if c.len() < b.len() => Some(Ok(c)),
            (Some(Ok(b)), _) => Some(Ok(b)),
            (_, c) => Some(c),
        };
    }
    let enc = best.unwrap_or_else(|| {
        Err(FrameError::UrlEncode(
            url.into(),
            "it does not start with http:// or https://",
        ))
    })?;
    if enc.len() - 1 > MAX_URL_BYTES {
        return Err(FrameError::UrlEncode(
            url.into(),
            "it needs more than 17 encoded bytes",
        ));
    }
    Ok(enc)
}

fn encode_url_rest(url: &str, rest: &str) -> Result<Vec<u8>, FrameError> {
    let mut out = Vec::with_capacity(rest.len());
    let bytes = rest.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if let Some((code, exp)) = URL_EXPANSIONS
            .iter()
            .enumerate()
            .filter(|(_, e)| bytes[i..].starts_with(e.as_bytes()))
            .max_by_key(|(_, e)| e.len())
        {
            out.push(code as u8);
            i += exp.len();
            continue;
        }
        let b = bytes[i];
        if !(0x21..=0x7E).contains(&b) {
            return Err(FrameError::UrlEncode(
                url.into(),
                "it contains a character outside printable US-ASCII",
            ));
        }
        out.push(b);
        i += 1;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::super::ad::Advertisement;
    use super::super::beacon::Beacon;
    use super::*;

    fn eddystone(ad: &[u8]) -> Result<Eddystone, FrameError> {
        let ad = Advertisement::parse(ad).unwrap();
        let mut it = ad.beacons();
        let b = it.next().expect("one beacon");
        assert!(it.next().is_none());
        b.map(|b| match b {
            Beacon::Eddystone(e) => e,
            other => panic!("{other:?}"),
        })
    }

    /// Flags, Complete List of 16-bit UUIDs `03 03 AA FE`, then service data (protocol spec,
    /// "Common Elements").
    fn ad(frame: &[u8]) -> Vec<u8> {
        let mut v = vec![0x02, 0x01, 0x06, 0x03, 0x03, 0xAA, 0xFE];
        v.push(frame.len() as u8 + 3);
        v.extend_from_slice(&[0x16, 0xAA, 0xFE]);
        v.extend_from_slice(frame);
        v
    }

    /// The elided-UUID namespace of the UID spec (8b0ca750-e7a7-4e14-bd99-095477cb3e77 minus
    /// bytes 5-10), instance 0x000000000001, TX power at 0 m -18 dBm (0xEE, the spec's example).
    const UID: [u8; 20] = [
        0x00, 0xEE, 0x8B, 0x0C, 0xA7, 0x50, 0x09, 0x54, 0x77, 0xCB, 0x3E, 0x77, 0x00, 0x00, 0x00,
        0x00, 0x00, 0x01, 0x00, 0x00,
    ];

    #[test]
    fn uid_frame_with_service_data_length_0x17() {
        let data = ad(&UID);
        assert_eq!(data[7], 0x17, "the UID spec's Service Data Length");
        assert_eq!(data.len(), 31, "a UID frame fills the advertising PDU");
        let e = eddystone(&data).unwrap();
        assert_eq!(
            e,
            Eddystone::Uid {
                tx_power_0m: -18,
                namespace: [0x8B, 0x0C, 0xA7, 0x50, 0x09, 0x54, 0x77, 0xCB, 0x3E, 0x77],
                instance: [0, 0, 0, 0, 0, 1],
            }
        );
        let b = Beacon::Eddystone(e);
        assert_eq!(b.rssi_at_1m(), Some(-59));
        assert_eq!(b.to_advertising_data().unwrap(), data);
    }

    #[test]
    fn uid_frame_without_rfu_uses_length_0x15() {
        let data = ad(&UID[..18]);
        assert_eq!(data[7], 0x15);
        assert!(matches!(
            eddystone(&data),
            Ok(Eddystone::Uid {
                tx_power_0m: -18,
                ..
            })
        ));
        for len in [0, 1, 2, 17, 19, 21] {
            let mut f = UID.to_vec();
            f.resize(len, 0);
            if len == 0 {
                assert!(matches!(
                    eddystone(&ad(&f)),
                    Err(FrameError::Length { len: 0, .. })
                ));
            } else {
                assert!(
                    matches!(eddystone(&ad(&f)), Err(FrameError::Length { format: "Eddystone-UID", len: l, .. }) if l == len),
                    "length {len}"
                );
            }
        }
    }

    #[test]
    fn url_scheme_and_expansion_codes_decode() {
        // https://goo.gl/S6zT6P, the URL spec's example: scheme 0x03 then plain text.
        let mut f = vec![FRAME_URL, 0x12, 0x03];
        f.extend_from_slice(b"goo.gl/S6zT6P");
        assert_eq!(
            eddystone(&ad(&f)).unwrap(),
            Eddystone::Url {
                tx_power_0m: 18,
                url: "https://goo.gl/S6zT6P".into()
            }
        );
        // http://www.example.com/shop, with .com/ as expansion 0x00.
        let f = [&[FRAME_URL, 0xEE, 0x00][..], b"example", &[0x00], b"shop"].concat();
        assert_eq!(
            eddystone(&ad(&f)).unwrap(),
            Eddystone::Url {
                tx_power_0m: -18,
                url: "http://www.example.com/shop".into()
            }
        );
        // Every expansion code, one after another, after https://www.
        let mut codes = vec![0x01];
        codes.extend(0x00..=0x0Du8);
        let url = decode_url(codes[0], &codes[1..]).unwrap();
        assert_eq!(
            url,
            "https://www..com/.org/.edu/.net/.info/.biz/.gov/.com.org.edu.net.info.biz.gov"
        );
        assert_eq!(decode_url(0x02, b"a").unwrap(), "http://a");
    }

    #[test]
    fn url_reserved_bytes_and_schemes_are_errors() {
        assert_eq!(decode_url(0x04, b"x"), Err(FrameError::UrlScheme(0x04)));
        for b in [0x0E, 0x20, 0x7F, 0xFF] {
            assert_eq!(decode_url(0x00, &[b'a', b]), Err(FrameError::UrlByte(b)));
        }
        // 18 encoded bytes are one too many; a frame without a scheme byte is too short.
        let mut f = vec![FRAME_URL, 0x00, 0x00];
        f.extend_from_slice(&[b'a'; 18]);
        assert!(matches!(
            eddystone(&ad(&f)),
            Err(FrameError::Length { len: 21, .. })
        ));
        assert!(matches!(
            eddystone(&ad(&[FRAME_URL, 0x00])),
            Err(FrameError::Length { len: 2, .. })
        ));
    }

    #[test]
    fn url_encoding_picks_the_longest_scheme_and_expansions() {
        assert_eq!(
            encode_url("https://www.example.com/").unwrap(),
            [&[0x01][..], b"example", &[0x00]].concat()
        );
        assert_eq!(
            encode_url("http://goo.gl/info.info/").unwrap(),
            [&[0x02][..], b"goo.gl/info", &[0x04]].concat()
        );
        for url in [
            "https://goo.gl/S6zT6P",
            "http://www.store.net/aisle.org",
            "https://a.gov/x.biz/y.edu",
        ] {
            let enc = encode_url(url).unwrap();
            assert_eq!(decode_url(enc[0], &enc[1..]).unwrap(), url);
        }
        // "http://www." would leave "info/" as five literal bytes; "http://" + "www" + ".info/"
        // takes four.
        assert_eq!(
            encode_url("http://www.info/").unwrap(),
            [&[0x02][..], b"www", &[0x04]].concat()
        );
        assert!(encode_url("ftp://x").is_err());
        assert!(encode_url("https://caf\u{e9}.fr").is_err());
        assert!(encode_url("https://a b").is_err());
        assert!(
            encode_url("https://abcdefghijklmnopqr").is_err(),
            "18 bytes"
        );
        assert!(encode_url("https://abcdefghijklmnopq").is_ok(), "17 bytes");
    }

    #[test]
    fn plain_tlm_decodes_battery_temperature_and_counters() {
        // 3000 mV, 25.5 °C (0x1980), 0x00012345 PDUs, 0x000ABCDE = 703 710 deciseconds (70 371 s).
        let f = [
            0x20, 0x00, 0x0B, 0xB8, 0x19, 0x80, 0x00, 0x01, 0x23, 0x45, 0x00, 0x0A, 0xBC, 0xDE,
        ];
        let data = ad(&f);
        assert_eq!(data[7], 0x11, "the TLM spec's Service Data Length");
        let Eddystone::Tlm(t) = eddystone(&data).unwrap() else {
            panic!()
        };
        assert_eq!(
            t,
            Tlm::Plain {
                battery_mv: Some(3000),
                temperature_8_8: Some(0x1980),
                adv_count: 0x12345,
                uptime_deciseconds: 0xABCDE,
            }
        );
        assert_eq!(t.temperature_c(), Some(25.5));
        assert_eq!(t.uptime_ms(), Some(70_371_000));
        assert_eq!(Eddystone::Tlm(t).to_frame().unwrap(), f);
    }

    #[test]
    fn tlm_temperature_is_signed_8_8_and_0x8000_means_unsupported() {
        let tlm = |vbatt: [u8; 2], temp: [u8; 2]| {
            let f = [&[0x20, 0x00][..], &vbatt, &temp, &[0, 0, 0, 1, 0, 0, 0, 2]].concat();
            match Eddystone::parse(&f).unwrap() {
                Eddystone::Tlm(t) => t,
                e => panic!("{e:?}"),
            }
        };
        // -1.25 °C = -320/256 = 0xFEC0; 0xFF00 = -1.0 °C; 0x0080 = +0.5 °C.
        assert_eq!(tlm([0, 1], [0xFE, 0xC0]).temperature_c(), Some(-1.25));
        assert_eq!(tlm([0, 1], [0xFF, 0x00]).temperature_c(), Some(-1.0));
        assert_eq!(tlm([0, 1], [0x00, 0x80]).temperature_c(), Some(0.5));
        let t = tlm([0, 0], [0x80, 0x00]);
        assert_eq!(t.temperature_c(), None);
        assert!(matches!(
            t,
            Tlm::Plain {
                battery_mv: None,
                temperature_8_8: None,
                ..
            }
        ));
        // Unsupported values encode back to the spec's markers.
        assert_eq!(
            &Eddystone::Tlm(t).to_frame().unwrap()[2..6],
            &[0, 0, 0x80, 0]
        );
    }

    #[test]
    fn encrypted_tlm_is_kept_opaque_and_wrong_versions_or_lengths_fail() {
        let mut f = vec![0x20, 0x01];
        f.extend(1..=12u8);
        f.extend_from_slice(&[0xAB, 0xCD, 0x12, 0x34]);
        let data = ad(&f);
        let e = eddystone(&data).unwrap();
        assert_eq!(
            e,
            Eddystone::Tlm(Tlm::Encrypted {
                etlm: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
                salt: 0xABCD,
                mic: 0x1234,
            })
        );
        assert_eq!(Beacon::Eddystone(e).to_advertising_data().unwrap(), data);
        assert_eq!(
            Eddystone::parse(&[0x20, 0x02, 0, 0]),
            Err(FrameError::TlmVersion(2))
        );
        // A plain TLM with an encrypted frame's length, and the reverse.
        assert!(matches!(
            Eddystone::parse(&[&[0x20, 0x00][..], &[0; 16]].concat()),
            Err(FrameError::Length { len: 18, .. })
        ));
        assert!(matches!(
            Eddystone::parse(&[&[0x20, 0x01][..], &[0; 12]].concat()),
            Err(FrameError::Length { len: 14, .. })
        ));
        assert!(matches!(
            Eddystone::parse(&[0x20]),
            Err(FrameError::Length { len: 1, .. })
        ));
    }

    #[test]
    fn eid_frame_and_unknown_frame_types() {
        let f = [0x30, 0xF6, 0xDE, 0xAD, 0xBE, 0xEF, 0x01, 0x02, 0x03, 0x04];
        let e = eddystone(&ad(&f)).unwrap();
        assert_eq!(
            e,
            Eddystone::Eid {
                tx_power_0m: -10,
                eid: [0xDE, 0xAD, 0xBE, 0xEF, 1, 2, 3, 4]
            }
        );
        assert_eq!(e.to_frame().unwrap(), f);
        assert!(matches!(
            Eddystone::parse(&f[..9]),
            Err(FrameError::Length { len: 9, .. })
        ));
        // Low nibble reserved, and types beyond EID.
        for t in [0x01, 0x40, 0x50, 0xFF] {
            assert_eq!(
                Eddystone::parse(&[t, 0, 0, 0]),
                Err(FrameError::EddystoneFrameType(t))
            );
        }
    }

    #[test]
    fn service_data_of_another_uuid_is_no_eddystone() {
        let mut data = ad(&UID);
        data[9] = 0xAB;
        assert_eq!(Advertisement::parse(&data).unwrap().beacons().count(), 0);
    }
}
