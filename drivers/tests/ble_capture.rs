//! btsnoop captures end to end: beacons encoded into advertising reports, written as capture
//! files of each datalink, read back from disk down to the beacon frames; and the same files
//! decoded by BlueZ's own `btmon -r` (an independent reader of the format, unpacked by
//! `scripts/install-deps.sh`), so the writer is checked against more than this crate's reader.
#![cfg(feature = "ble")]
#![allow(clippy::unwrap_used)]

use edge_drivers::ble::ad::Advertisement;
use edge_drivers::ble::beacon::{AltBeacon, Beacon, IBeacon};
use edge_drivers::ble::btsnoop::{Datalink, Reader, Writer};
use edge_drivers::ble::eddystone::{Eddystone, Tlm};
use edge_drivers::ble::hci::{
    Address, AddressType, AdvertisingReport, DataStatus, ExtendedInfo, LegacyEventType, Phy,
    ReportKind, encode_le_advertising_report,
};
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::process::Command;

/// 2026-12-01T00:00:00Z, Unix microseconds.
const T0: i64 = 1_796_083_200_000_000;

const UUID: [u8; 16] = [
    0xE2, 0xC5, 0x6D, 0xB5, 0xDF, 0xFB, 0x48, 0xD2, 0xB0, 0x60, 0xD0, 0xF5, 0xA7, 0x10, 0x96, 0xE0,
];

fn ibeacon(minor: u16) -> Beacon {
    Beacon::IBeacon(IBeacon {
        uuid: UUID,
        major: 7,
        minor,
        measured_power: -59,
    })
}

fn altbeacon() -> Beacon {
    let mut id = [0u8; 20];
    id[..16].copy_from_slice(&UUID);
    id[19] = 9;
    Beacon::AltBeacon(AltBeacon {
        company_id: 0x0118,
        id,
        reference_rssi: -62,
        mfg_reserved: 0x5A,
    })
}

fn eddystone_url() -> Beacon {
    Beacon::Eddystone(Eddystone::Url {
        tx_power_0m: -20,
        url: "https://www.example.com/offers".into(),
    })
}

fn eddystone_tlm() -> Beacon {
    Beacon::Eddystone(Eddystone::Tlm(Tlm::Plain {
        battery_mv: Some(2950),
        temperature_8_8: Some(-320),
        adv_count: 1_000_000,
        uptime_deciseconds: 36_000,
    }))
}

fn address(last: u8) -> Address {
    Address([0xC4, 0x7C, 0x8D, 0x6A, 0x3B, last])
}

fn legacy(b: &Beacon, last: u8, rssi: i8) -> AdvertisingReport {
    AdvertisingReport {
        kind: ReportKind::Legacy(LegacyEventType::AdvNonconnInd),
        address_type: AddressType::Random,
        address: address(last),
        rssi: Some(rssi),
        data: b.to_advertising_data().unwrap(),
    }
}

fn extended(b: &Beacon, last: u8, rssi: i8, sid: u8) -> AdvertisingReport {
    AdvertisingReport {
        kind: ReportKind::Extended(ExtendedInfo {
            event_type: 0x0000,
            primary_phy: Phy::LeCoded,
            secondary_phy: Some(Phy::Le2M),
            sid: Some(sid),
            // Positive: btmon 5.66 prints this signed field as unsigned.
            tx_power: Some(4),
            periodic_interval: None,
            direct_address_type: AddressType::Public,
            direct_address: Address::default(),
        }),
        address_type: AddressType::Random,
        address: address(last),
        rssi: Some(rssi),
        data: b.to_advertising_data().unwrap(),
    }
}

/// What the capture holds: (unix µs, report, the beacon its data carries), in file order.
fn sightings() -> Vec<(i64, AdvertisingReport, Beacon)> {
    vec![
        (T0, legacy(&ibeacon(1), 1, -60), ibeacon(1)),
        (T0 + 100_000, legacy(&ibeacon(2), 2, -70), ibeacon(2)),
        (T0 + 100_000, legacy(&altbeacon(), 3, -75), altbeacon()),
        (
            T0 + 250_000,
            extended(&eddystone_url(), 4, -81, 1),
            eddystone_url(),
        ),
        (
            T0 + 1_000_000,
            extended(&eddystone_tlm(), 4, -82, 1),
            eddystone_tlm(),
        ),
    ]
}

/// Writes the sightings as events (those sharing a timestamp in one event, as a controller
/// batches them), with a Command Complete in between that is not a report.
fn write_capture(path: &Path, datalink: Datalink) {
    let file = std::fs::File::create(path).unwrap();
    let mut w = Writer::new(std::io::BufWriter::new(file), datalink).unwrap();
    w.write_hci_event(T0 - 1, &[0x0E, 0x04, 0x01, 0x0C, 0x20, 0x00])
        .unwrap();
    let all = sightings();
    let mut i = 0;
    while i < all.len() {
        let ts = all[i].0;
        let batch: Vec<AdvertisingReport> = all[i..]
            .iter()
            .take_while(|s| s.0 == ts)
            .map(|s| s.1.clone())
            .collect();
        let ext = matches!(batch[0].kind, ReportKind::Extended(_));
        w.write_hci_event(ts, &encode_le_advertising_report(&batch, ext).unwrap())
            .unwrap();
        i += batch.len();
    }
    w.flush().unwrap();
}

const DATALINKS: [(Datalink, &str); 3] = [
    (Datalink::Hci, "hci"),
    (Datalink::H4, "h4"),
    (Datalink::Monitor, "monitor"),
];

#[test]
fn a_capture_on_disk_reads_back_to_the_beacons_it_was_made_of() {
    let dir = tempfile::tempdir().unwrap();
    for (dl, name) in DATALINKS {
        let path = dir.path().join(format!("{name}.btsnoop"));
        write_capture(&path, dl);
        let reader = Reader::new(BufReader::new(std::fs::File::open(&path).unwrap())).unwrap();
        assert_eq!(reader.datalink(), dl);
        let got: Vec<(i64, AdvertisingReport)> =
            reader.advertising_reports().map(Result::unwrap).collect();
        let want = sightings();
        assert_eq!(got.len(), want.len(), "{name}");
        for ((ts, report), (wts, wreport, beacon)) in got.iter().zip(&want) {
            assert_eq!((ts, report), (wts, wreport), "{name}");
            let ad = Advertisement::parse(&report.data).unwrap();
            let beacons: Vec<_> = ad.beacons().collect();
            assert_eq!(beacons, vec![Ok(beacon.clone())], "{name}");
        }
        // The decoded values a presence engine uses.
        let (_, url_report) = &got[3];
        let ReportKind::Extended(x) = url_report.kind else {
            panic!("{url_report:?}")
        };
        assert_eq!(x.primary_phy, Phy::LeCoded);
        assert_eq!(x.data_status(), DataStatus::Complete);
        assert_eq!(ibeacon(1).rssi_at_1m(), Some(-59), "iBeacon measured power");
        assert_eq!(eddystone_url().rssi_at_1m(), Some(-61), "0 m power - 41 dB");
    }
}

fn btmon() -> PathBuf {
    if let Some(p) = std::env::var_os("EDGE_BTMON") {
        return p.into();
    }
    let tools = std::env::var_os("EDGE_AGENT_TOOLS")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/var/cache/edge-agent-ci/tools".into());
    let cached = tools.join("bluez/usr/bin/btmon");
    if cached.exists() {
        return cached;
    }
    "btmon".into()
}

/// `btmon -r` decodes what the writer wrote, for every datalink: the absolute time (so the
/// 0 AD epoch offset is the one BlueZ uses), each report's header fields, and the AD inside.
#[test]
fn btmon_decodes_the_written_captures() {
    let dir = tempfile::tempdir().unwrap();
    for (dl, name) in DATALINKS {
        let path = dir.path().join(format!("{name}.btsnoop"));
        write_capture(&path, dl);
        let out = Command::new(btmon())
            .args(["-T", "-r"])
            .arg(&path)
            .env("TZ", "UTC")
            .env("NO_COLOR", "1")
            .output()
            .expect("btmon is installed (scripts/install-deps.sh unpacks it)");
        assert!(out.status.success(), "{name}: {out:?}");
        let text = String::from_utf8_lossy(&out.stdout);
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let has = |want: &str| lines.iter().any(|l| l.contains(want));
        let count = |want: &str| lines.iter().filter(|l| l.contains(want)).count();
        for want in [
            // The Command Complete (btmon shortens the event name to fit the monitor's columns).
            "LE Set Scan Enable (0x08|0x000c) ncmd 1",
            "2026-12-01 00:00:00.000000",
            "2026-12-01 00:00:00.100000",
            "2026-12-01 00:00:01.000000",
            "LE Advertising Report (0x02)",
            "Num reports: 2",
            "Non connectable undirected - ADV_NONCONN_IND (0x03)",
            "Address: C4:7C:8D:6A:3B:01",
            "Address: C4:7C:8D:6A:3B:03",
            "RSSI: -60 dBm (0xc4)",
            "RSSI: -75 dBm (0xb5)",
            "Company: Apple, Inc. (76)",
            "Type: iBeacon (2)",
            "TX power: -59 dB",
            "Company: Radius Networks, Inc. (280)",
            "Data: beace2c56db5dffb48d2b060d0f5a71096e000000009c25a",
            "LE Extended Advertising Report (0x0d)",
            "Primary PHY: LE Coded",
            "Secondary PHY: LE 2M",
            "SID: 0x01",
            "TX power: 4 dBm",
            "RSSI: -81 dBm (0xaf)",
            "Service Data: Google (0xfeaa)",
            // Eddystone-URL: frame 0x10, -20 dBm, https://www., "example", .com/, "offers".
            "Data: 10ec016578616d706c65006f6666657273",
            // Plain TLM: 2950 mV, -1.25 °C, 1 000 000 PDUs, 36 000 deciseconds.
            "Data: 20000b86fec0000f424000008ca0",
        ] {
            assert!(has(want), "{name}: btmon printed no {want:?}:\n{text}");
        }
        assert_eq!(
            count("HCI Event: LE Meta Event (0x3e)"),
            4,
            "{name}:\n{text}"
        );
        assert_eq!(count("LE Advertising Report (0x02)"), 2, "{name}");
        assert_eq!(count("LE Extended Advertising Report (0x0d)"), 2, "{name}");
        assert_eq!(count("Type: iBeacon (2)"), 2, "{name}");
    }
}
