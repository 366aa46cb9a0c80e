//! Messages of remote BLE receivers (ESP32 nodes around the store) as [`RawSighting`]s.
//!
//! Two formats, told apart by topic (`docs/BLE.md`, "Remote receivers"):
//! * **ours**, `beacon.receiver/1`, on any topic but `espresense/...`: a receiver's batch of
//!   raw advertisements, so that the agent parses every frame itself and one allow-list applies
//!   to all sources:
//!   `{"schema":"beacon.receiver/1","receiver":"esp-aisle-1","ts":1795841275579,
//!     "reports":[{"adv":"0201061aff4c0002…","rssi":-67}]}`
//!   (`receiver` defaults to the topic's last level, `ts` per report or message to the time of
//!   receipt; one report may also stand at the top level).
//! * **ESPresense**, `espresense/devices/<device id>/<room>`: one JSON object per device and
//!   node, `{"id":"iBeacon:<uuid>-<major>-<minor>","rssi":-72,"rssi@1m":-59,...}`. The room is
//!   the receiver. Only `iBeacon:` ids name a beacon; every other id (`apple:…`, MAC based, …)
//!   is dropped as `no_beacon` and nothing of it is kept.
//!
//! The parsing is written here (no crate reads either format) and is fuzzed with the other
//! BLE parsers.

use super::source::{BeaconId, Drop, Heard, RawSighting, parse_uuid};
use serde_json::Value;

/// Most reports one message may carry.
pub const MAX_REPORTS: usize = 1000;
/// Longest AD data of one report, bytes (an extended advertisement's maximum is 1650).
pub const MAX_ADV_BYTES: usize = 1650;

/// Why a receiver message was not read (nothing of it is kept).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub drop: Drop,
    pub reason: String,
}

fn refused(drop: Drop, reason: impl Into<String>) -> Refused {
    Refused {
        drop,
        reason: reason.into(),
    }
}

fn bad(reason: impl Into<String>) -> Refused {
    refused(Drop::BadMessage, reason)
}

/// The sightings in one message published on `topic`; `now_ms` stands in for a missing time.
pub fn parse_message(
    topic: &str,
    payload: &[u8],
    now_ms: i64,
) -> Result<Vec<RawSighting>, Refused> {
    let v: Value = serde_json::from_slice(payload).map_err(|e| bad(format!("not JSON: {e}")))?;
    if let Some(rest) = topic.strip_prefix("espresense/devices/") {
        espresense(rest, &v, now_ms).map(|s| vec![s])
    } else {
        ours(topic, &v, now_ms)
    }
}

fn rssi(v: &Value, what: &str) -> Result<i16, Refused> {
    v.get("rssi")
        .and_then(Value::as_f64)
        .filter(|x| (-130.0..=20.0).contains(x))
        .map(|x| x.round() as i16)
        .ok_or_else(|| bad(format!("{what} has no `rssi` between -130 and 20 dBm")))
}

fn ts(v: &Value, default: i64) -> Result<i64, Refused> {
    match v.get("ts") {
        None | Some(Value::Null) => Ok(default),
        Some(t) => t
            .as_i64()
            .filter(|t| *t > 0)
            .ok_or_else(|| bad("`ts` is not a positive integer (ms since the Unix epoch)")),
    }
}

fn ours(topic: &str, v: &Value, now_ms: i64) -> Result<Vec<RawSighting>, Refused> {
    if !v.is_object() {
        return Err(bad("not a JSON object"));
    }
    match v.get("schema").and_then(Value::as_str) {
        None | Some("beacon.receiver/1") => {}
        Some(other) => return Err(bad(format!("schema {other:?} is not beacon.receiver/1"))),
    }
    let receiver = match v.get("receiver") {
        Some(r) => r
            .as_str()
            .filter(|r| valid_id(r))
            .ok_or_else(|| bad("`receiver` is not a receiver id (1-64 of A-Z a-z 0-9 . _ -)"))?
            .to_string(),
        None => topic
            .rsplit('/')
            .next()
            .filter(|r| valid_id(r))
            .ok_or_else(|| bad("no `receiver`, and the topic's last level is not an id"))?
            .to_string(),
    };
    let msg_ts = ts(v, now_ms)?;
    let one = [v.clone()];
    let reports: &[Value] = match v.get("reports") {
        Some(Value::Array(a)) => a,
        Some(_) => return Err(bad("`reports` is not an array")),
        None => &one,
    };
    if reports.len() > MAX_REPORTS {
        return Err(bad(format!(
            "{} reports in one message; at most {MAX_REPORTS}",
            reports.len()
        )));
    }
    reports
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let what = format!("report {i}");
            let hex = r
                .get("adv")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("{what} has no `adv` (the AD data in hex)")))?;
            let adv = decode_hex(hex).ok_or_else(|| {
                bad(format!(
                    "{what}: `adv` is not hex of at most {MAX_ADV_BYTES} bytes"
                ))
            })?;
            Ok(RawSighting {
                receiver: receiver.clone(),
                ts_ms: ts(r, msg_ts)?,
                rssi: rssi(r, &what)?,
                heard: Heard::Advertisement(adv),
            })
        })
        .collect()
}

fn espresense(rest: &str, v: &Value, now_ms: i64) -> Result<RawSighting, Refused> {
    let room = rest
        .rsplit('/')
        .next()
        .filter(|r| valid_id(r) && rest.contains('/'))
        .ok_or_else(|| bad("the topic is not espresense/devices/<id>/<room>"))?;
    let id = v
        .get("id")
        .and_then(Value::as_str)
        .ok_or_else(|| bad("the ESPresense message has no `id`"))?;
    let Some(ib) = id.strip_prefix("iBeacon:") else {
        return Err(refused(
            Drop::NoBeacon,
            "an ESPresense id that is not an iBeacon",
        ));
    };
    let id = espresense_ibeacon(ib)
        .ok_or_else(|| bad("an iBeacon id that is not <uuid>-<major>-<minor>"))?;
    let tx_power = v
        .get("rssi@1m")
        .and_then(Value::as_i64)
        .and_then(|p| i8::try_from(p).ok());
    Ok(RawSighting {
        receiver: room.to_string(),
        ts_ms: now_ms,
        rssi: rssi(v, "the ESPresense message")?,
        heard: Heard::Decoded { id, tx_power },
    })
}

/// `<uuid with dashes>-<major>-<minor>`.
fn espresense_ibeacon(s: &str) -> Option<BeaconId> {
    let mut parts = s.rsplitn(3, '-');
    let minor = parts.next()?.parse().ok()?;
    let major = parts.next()?.parse().ok()?;
    let uuid = parse_uuid(parts.next()?)?;
    Some(BeaconId::IBeacon { uuid, major, minor })
}

/// A receiver id: 1-64 of `A-Z a-z 0-9 . _ -`.
pub fn valid_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    let s = s.as_bytes();
    if s.len() % 2 != 0 || s.len() > 2 * MAX_ADV_BYTES {
        return None;
    }
    s.chunks(2)
        .map(|p| {
            let d = |c: u8| char::from(c).to_digit(16);
            Some((d(p[0])? * 16 + d(p[1])?) as u8)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADV: &str = "0201061aff4c000215f7826da64fa24e988024bc5b71e0893e0007002ac5";

    #[test]
    fn our_schema_batches_and_single_reports_are_read() {
        let batch = format!(
            r#"{{"schema":"beacon.receiver/1","receiver":"esp-aisle-1","ts":1000,"reports":[{{"adv":"{ADV}","rssi":-67}},{{"adv":"{ADV}","rssi":-70.4,"ts":1100}}]}}"#
        );
        let s = parse_message("edge/beacons/esp-aisle-1", batch.as_bytes(), 5).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(
            (s[0].receiver.as_str(), s[0].ts_ms, s[0].rssi),
            ("esp-aisle-1", 1000, -67)
        );
        assert_eq!((s[1].ts_ms, s[1].rssi), (1100, -70));
        let Heard::Advertisement(adv) = &s[0].heard else {
            panic!("raw advertisement expected")
        };
        assert_eq!(adv.len(), ADV.len() / 2);
        // One report at the top level; the receiver from the topic, the time of receipt.
        let one = format!(r#"{{"adv":"{ADV}","rssi":-80}}"#);
        let s = parse_message("edge/beacons/esp-7", one.as_bytes(), 5).unwrap();
        assert_eq!((s[0].receiver.as_str(), s[0].ts_ms), ("esp-7", 5));
    }

    #[test]
    fn espresense_ibeacon_messages_are_read_and_other_ids_dropped() {
        let m = br#"{"id":"iBeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e-7-42","rssi@1m":-59,"rssi":-72.6,"raw":2.5,"distance":2.1,"mac":"c0ffee000001"}"#;
        let s = parse_message(
            "espresense/devices/iBeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e-7-42/aisle-3",
            m,
            9,
        )
        .unwrap();
        assert_eq!(
            (s[0].receiver.as_str(), s[0].rssi, s[0].ts_ms),
            ("aisle-3", -73, 9)
        );
        let Heard::Decoded { id, tx_power } = &s[0].heard else {
            panic!("decoded identity expected")
        };
        assert_eq!(
            id.tag(),
            "ibeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e:7:42"
        );
        assert_eq!(*tx_power, Some(-59));
        let phone = br#"{"id":"apple:1005:9-26","rssi":-60,"mac":"c0ffee000002"}"#;
        let e = parse_message("espresense/devices/apple:1005:9-26/aisle-3", phone, 9).unwrap_err();
        assert_eq!(e.drop, Drop::NoBeacon);
        assert!(
            !e.reason.contains("c0ffee"),
            "no address in the reason: {}",
            e.reason
        );
    }

    #[test]
    fn malformed_messages_are_refused_with_a_reason() {
        let cases: &[(&str, &[u8], &str)] = &[
            ("edge/beacons/r1", b"\xff\xfe", "not JSON"),
            ("edge/beacons/r1", b"[1,2]", "not a JSON object"),
            ("edge/beacons/r1", br#"{"adv":"0g","rssi":-60}"#, "not hex"),
            (
                "edge/beacons/r1",
                br#"{"adv":"020106","rssi":-300}"#,
                "rssi",
            ),
            (
                "edge/beacons/r1",
                br#"{"adv":"020106","rssi":-60,"ts":-5}"#,
                "ts",
            ),
            (
                "edge/beacons/r1",
                br#"{"schema":"x/2","adv":"020106","rssi":-60}"#,
                "schema",
            ),
            (
                "edge/beacons/bad id",
                br#"{"adv":"020106","rssi":-60}"#,
                "topic",
            ),
            (
                "espresense/devices/x",
                br#"{"id":"iBeacon:1-2-3","rssi":-60}"#,
                "topic",
            ),
            (
                "espresense/devices/x/r",
                br#"{"id":"iBeacon:1-2-3","rssi":-60}"#,
                "iBeacon id",
            ),
        ];
        for (topic, payload, needle) in cases {
            let e = parse_message(topic, payload, 1).unwrap_err();
            assert_eq!(e.drop, Drop::BadMessage, "{topic} {needle}");
            assert!(
                e.reason.contains(needle),
                "{topic}: {:?} lacks {needle:?}",
                e.reason
            );
        }
        let many = format!(
            r#"{{"receiver":"r1","reports":[{}]}}"#,
            vec![format!(r#"{{"adv":"{ADV}","rssi":-60}}"#); MAX_REPORTS + 1].join(",")
        );
        assert!(
            parse_message("t/r1", many.as_bytes(), 1)
                .unwrap_err()
                .reason
                .contains("at most")
        );
    }

    /// Every byte of the sample messages flipped, cut or duplicated: refused or read, never a
    /// panic, and whatever is read has a valid receiver id and an RSSI in range.
    #[test]
    fn mutated_messages_never_panic() {
        let samples: Vec<(&str, Vec<u8>)> = vec![
            ("edge/beacons/r1", format!(r#"{{"schema":"beacon.receiver/1","receiver":"r1","ts":5,"reports":[{{"adv":"{ADV}","rssi":-60}}]}}"#).into_bytes()),
            ("espresense/devices/x/aisle-1", br#"{"id":"iBeacon:f7826da6-4fa2-4e98-8024-bc5b71e0893e-7-42","rssi@1m":-59,"rssi":-72}"#.to_vec()),
        ];
        let mut rng = fastrand::Rng::with_seed(11);
        for (topic, msg) in &samples {
            for _ in 0..3000 {
                let mut m = msg.clone();
                match rng.u8(0..3) {
                    0 => {
                        let i = rng.usize(0..m.len());
                        m[i] = rng.u8(..);
                    }
                    1 => m.truncate(rng.usize(0..m.len())),
                    _ => {
                        let i = rng.usize(0..m.len());
                        let b = m[i];
                        m.insert(i, b);
                    }
                }
                if let Ok(v) = parse_message(topic, &m, 1) {
                    for s in v {
                        assert!(
                            valid_id(&s.receiver) && (-130..=20).contains(&s.rssi),
                            "{s:?}"
                        );
                    }
                }
            }
        }
    }
}
