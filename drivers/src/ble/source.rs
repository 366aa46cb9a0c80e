//! What every beacon source yields, the beacon identities, and the privacy allow-list.
//!
//! A source ([`SightingSource`]: a replay file, remote receivers over MQTT, later BlueZ) yields
//! [`RawSighting`]s: a receiver heard something at a time with a signal strength. What it heard
//! is either the raw AD structures of an advertisement (HCI reports, our receiver schema) or a
//! beacon identity a receiver decoded itself (ESPresense). [`identify`] turns both into a
//! [`BeaconId`] and applies the [`AllowList`]: anything else is dropped at ingest, counted by
//! [`Drop`] reason, and its address is neither stored nor logged.

use super::ad::Advertisement;
use super::beacon::{Beacon, format_uuid};
use super::eddystone::Eddystone;
use edge_core::status::StatusHandle;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::future::Future;

/// One advertisement heard by one receiver.
#[derive(Debug, Clone, PartialEq)]
pub struct RawSighting {
    /// The receiver's id (a remote node's id, or an adapter of this computer).
    pub receiver: String,
    /// When it was heard, ms since the Unix epoch.
    pub ts_ms: i64,
    /// dBm.
    pub rssi: i16,
    pub heard: Heard,
}

/// What a receiver heard.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    /// The AD structures of the advertisement (legacy or extended).
    Advertisement(Vec<u8>),
    /// An identity the receiver decoded itself, with its calibrated power at 1 m if it sent one.
    Decoded { id: BeaconId, tx_power: Option<i8> },
}

/// A beacon identity: what `beacon.sightings` and `presence.events` call a tag.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BeaconId {
    IBeacon {
        uuid: [u8; 16],
        major: u16,
        minor: u16,
    },
    AltBeacon {
        company_id: u16,
        id: [u8; 20],
    },
    EddystoneUid {
        namespace: [u8; 10],
        instance: [u8; 6],
    },
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl BeaconId {
    /// The tag name: `ibeacon:<uuid>:<major>:<minor>`, `altbeacon:<company>:<id hex>`,
    /// `eddystone:<namespace hex>:<instance hex>`.
    pub fn tag(&self) -> String {
        match self {
            BeaconId::IBeacon { uuid, major, minor } => {
                format!("ibeacon:{}:{major}:{minor}", format_uuid(uuid))
            }
            BeaconId::AltBeacon { company_id, id } => {
                format!("altbeacon:{company_id:04x}:{}", hex(id))
            }
            BeaconId::EddystoneUid {
                namespace,
                instance,
            } => format!("eddystone:{}:{}", hex(namespace), hex(instance)),
        }
    }

    /// The identity's own fields for the sighting record.
    pub fn fields(&self, v: &mut serde_json::Value) {
        match self {
            BeaconId::IBeacon { uuid, major, minor } => {
                v["kind"] = "ibeacon".into();
                v["uuid"] = format_uuid(uuid).into();
                v["major"] = (*major).into();
                v["minor"] = (*minor).into();
            }
            BeaconId::AltBeacon { company_id, id } => {
                v["kind"] = "altbeacon".into();
                v["company_id"] = (*company_id).into();
                v["id"] = hex(id).into();
            }
            BeaconId::EddystoneUid {
                namespace,
                instance,
            } => {
                v["kind"] = "eddystone_uid".into();
                v["namespace"] = hex(namespace).into();
                v["instance"] = hex(instance).into();
            }
        }
    }
}

/// Why a sighting did not become part of `beacon.sightings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Drop {
    /// A beacon whose UUID, namespace or company is not on the allow-list.
    NotAllowed,
    /// An advertisement without a beacon identity (a phone, a headset, Eddystone URL/TLM/EID).
    NoBeacon,
    /// AD structures or a beacon frame that do not parse.
    Malformed,
    /// Weaker than `rssi_floor`.
    Weak,
    /// From a receiver that is not configured (remote receivers only).
    UnknownReceiver,
    /// A receiver message that is not in a known format (nothing of it is kept).
    BadMessage,
    /// More distinct beacons in one window than `max_beacons`.
    OverCap,
    /// The local log was full: raw sightings are shed first.
    LogFull,
}

impl Drop {
    pub const ALL: [Drop; 8] = [
        Drop::NotAllowed,
        Drop::NoBeacon,
        Drop::Malformed,
        Drop::Weak,
        Drop::UnknownReceiver,
        Drop::BadMessage,
        Drop::OverCap,
        Drop::LogFull,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Drop::NotAllowed => "not_allowed",
            Drop::NoBeacon => "no_beacon",
            Drop::Malformed => "malformed",
            Drop::Weak => "weak",
            Drop::UnknownReceiver => "unknown_receiver",
            Drop::BadMessage => "bad_message",
            Drop::OverCap => "over_cap",
            Drop::LogFull => "log_full",
        }
    }
}

/// `[drivers.allow]`: the beacons the store owns. Everything else is dropped at ingest.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowList {
    /// iBeacon proximity UUIDs (and AltBeacon ids whose first 16 bytes are one of them).
    #[serde(default)]
    pub ibeacon_uuids: Vec<String>,
    /// Eddystone-UID namespaces, 20 hex digits.
    #[serde(default)]
    pub eddystone_namespaces: Vec<String>,
    /// AltBeacon manufacturer company ids (any beacon of that company).
    #[serde(default)]
    pub company_ids: Vec<u16>,
    /// Keep every beacon (for a survey of what is on air; never in production).
    #[serde(default)]
    pub all: bool,
}

/// An [`AllowList`] parsed for lookups.
#[derive(Debug, Clone, Default)]
pub struct Allowed {
    uuids: HashSet<[u8; 16]>,
    namespaces: HashSet<[u8; 10]>,
    companies: HashSet<u16>,
    all: bool,
}

/// A UUID with or without dashes, any case.
pub fn parse_uuid(s: &str) -> Option<[u8; 16]> {
    parse_hex::<16>(&s.replace('-', ""))
}

fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let s = s.trim();
    if s.len() != 2 * N || !s.is_ascii() {
        return None;
    }
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

impl AllowList {
    /// Every problem, as (field, message).
    pub fn problems(&self) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (i, u) in self.ibeacon_uuids.iter().enumerate() {
            if parse_uuid(u).is_none() {
                p.push((
                    format!("ibeacon_uuids[{i}]"),
                    format!("{u:?} is not a UUID (32 hex digits, dashes optional)"),
                ));
            }
        }
        for (i, n) in self.eddystone_namespaces.iter().enumerate() {
            if parse_hex::<10>(n).is_none() {
                p.push((
                    format!("eddystone_namespaces[{i}]"),
                    format!("{n:?} is not an Eddystone namespace (20 hex digits)"),
                ));
            }
        }
        if !self.all
            && self.ibeacon_uuids.is_empty()
            && self.eddystone_namespaces.is_empty()
            && self.company_ids.is_empty()
        {
            p.push((
                String::new(),
                "the allow-list is empty, so every beacon would be dropped: list the store's ibeacon_uuids, eddystone_namespaces or company_ids (or set all = true for a survey)".into(),
            ));
        }
        p
    }

    pub fn compile(&self) -> Allowed {
        Allowed {
            uuids: self
                .ibeacon_uuids
                .iter()
                .filter_map(|u| parse_uuid(u))
                .collect(),
            namespaces: self
                .eddystone_namespaces
                .iter()
                .filter_map(|n| parse_hex::<10>(n))
                .collect(),
            companies: self.company_ids.iter().copied().collect(),
            all: self.all,
        }
    }
}

impl Allowed {
    pub fn allows(&self, id: &BeaconId) -> bool {
        self.all
            || match id {
                BeaconId::IBeacon { uuid, .. } => self.uuids.contains(uuid),
                BeaconId::AltBeacon { company_id, id } => {
                    self.companies.contains(company_id)
                        || id[..16]
                            .try_into()
                            .is_ok_and(|u: [u8; 16]| self.uuids.contains(&u))
                }
                BeaconId::EddystoneUid { namespace, .. } => self.namespaces.contains(namespace),
            }
    }
}

/// The identity in `heard` and its calibrated power at 1 m, if the allow-list keeps it.
pub fn identify(heard: &Heard, allowed: &Allowed) -> Result<(BeaconId, Option<i8>), Drop> {
    let (id, tx_power) = match heard {
        Heard::Decoded { id, tx_power } => (id.clone(), *tx_power),
        Heard::Advertisement(data) => {
            let adv = Advertisement::parse(data).map_err(|_| Drop::Malformed)?;
            let mut found = None;
            let mut malformed = false;
            for b in adv.beacons() {
                match b {
                    Ok(b) => {
                        if let Some(id) = beacon_id(&b) {
                            found = Some((id, b.rssi_at_1m()));
                            break;
                        }
                    }
                    Err(_) => malformed = true,
                }
            }
            match found {
                Some(f) => f,
                None if malformed => return Err(Drop::Malformed),
                None => return Err(Drop::NoBeacon),
            }
        }
    };
    if allowed.allows(&id) {
        Ok((id, tx_power))
    } else {
        Err(Drop::NotAllowed)
    }
}

/// The identity of a beacon frame; Eddystone URL, TLM and EID frames identify no tag by
/// themselves.
pub fn beacon_id(b: &Beacon) -> Option<BeaconId> {
    match b {
        Beacon::IBeacon(i) => Some(BeaconId::IBeacon {
            uuid: i.uuid,
            major: i.major,
            minor: i.minor,
        }),
        Beacon::AltBeacon(a) => Some(BeaconId::AltBeacon {
            company_id: a.company_id,
            id: a.id,
        }),
        Beacon::Eddystone(Eddystone::Uid {
            namespace,
            instance,
            ..
        }) => Some(BeaconId::EddystoneUid {
            namespace: *namespace,
            instance: *instance,
        }),
        Beacon::Eddystone(_) => None,
    }
}

/// A source of sightings. It owns its transport: reconnects with backoff and reports its state
/// in `status`; a message it cannot read is counted in `drops` and skipped.
pub trait SightingSource: Send {
    /// The next sightings, as soon as some are there. `None`: the source has ended (a replay
    /// without `loop`).
    fn next(
        &mut self,
        status: &StatusHandle,
        drops: &mut Drops,
    ) -> impl Future<Output = Option<Vec<RawSighting>>> + Send;
}

/// Dropped sightings by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Drops(pub std::collections::BTreeMap<Drop, u64>);

impl Drops {
    pub fn add(&mut self, d: Drop, n: u64) {
        *self.0.entry(d).or_default() += n;
    }

    pub fn get(&self, d: Drop) -> u64 {
        self.0.get(&d).copied().unwrap_or(0)
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ble::beacon::IBeacon;

    const UUID: &str = "f7826da6-4fa2-4e98-8024-bc5b71e0893e";

    fn ibeacon_adv(uuid: &str, major: u16, minor: u16) -> Vec<u8> {
        let b = Beacon::IBeacon(IBeacon {
            uuid: parse_uuid(uuid).unwrap(),
            major,
            minor,
            measured_power: -59,
        });
        b.to_advertising_data().unwrap()
    }

    fn allow(uuids: &[&str]) -> Allowed {
        AllowList {
            ibeacon_uuids: uuids.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
        .compile()
    }

    #[test]
    fn an_allowed_ibeacon_is_identified_and_others_are_dropped_by_reason() {
        let a = allow(&[UUID]);
        let (id, tx) = identify(&Heard::Advertisement(ibeacon_adv(UUID, 7, 42)), &a).unwrap();
        assert_eq!(
            id.tag(),
            "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:7:42"
        );
        assert_eq!(tx, Some(-59));
        let other = ibeacon_adv("e2c56db5-dffb-48d2-b060-d0f5a71096e0", 1, 1);
        assert_eq!(
            identify(&Heard::Advertisement(other), &a),
            Err(Drop::NotAllowed)
        );
        // Flags and a name only: a phone, not a beacon.
        let phone = vec![0x02, 0x01, 0x06, 0x04, 0x09, b'P', b'h', b'o'];
        assert_eq!(
            identify(&Heard::Advertisement(phone), &a),
            Err(Drop::NoBeacon)
        );
        // An AD structure whose length runs past the end.
        assert_eq!(
            identify(&Heard::Advertisement(vec![0x1a, 0xff, 0x4c]), &a),
            Err(Drop::Malformed)
        );
    }

    #[test]
    fn an_empty_allow_list_is_a_config_problem_and_bad_entries_name_their_index() {
        let empty = AllowList::default();
        assert!(empty.problems()[0].1.contains("allow-list is empty"));
        let bad = AllowList {
            ibeacon_uuids: vec![UUID.into(), "not-a-uuid".into()],
            eddystone_namespaces: vec!["00112233445566778899".into(), "0011".into()],
            ..Default::default()
        };
        let p = bad.problems();
        assert_eq!(
            p.iter().map(|(f, _)| f.as_str()).collect::<Vec<_>>(),
            ["ibeacon_uuids[1]", "eddystone_namespaces[1]"]
        );
        assert!(
            AllowList {
                all: true,
                ..Default::default()
            }
            .problems()
            .is_empty()
        );
        assert_eq!(parse_uuid(&UUID.to_uppercase()), parse_uuid(UUID));
    }
}
