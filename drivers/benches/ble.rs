//! BLE parsing throughput (plain `main`, `cargo bench -p edge-drivers --bench ble`): a btsnoop
//! capture in memory read down to beacon frames, beside named baselines on the same bytes so that
//! ratios hold on a noisy machine:
//!
//! 1. records: the btsnoop reader alone (record headers, copies of the packets);
//! 2. reports: reader + HCI event framing + LE (Extended) Advertising Report parsing;
//! 3. beacons: all of that + AD structures + beacon frame decoding (what a source does per
//!    advertisement before smoothing).
//!
//! The capture holds 200 000 reports: iBeacon, AltBeacon and Eddystone UID/URL/TLM, 80 % in
//! legacy events of 1-3 reports, 20 % in extended ones, in H4 framing (Android's datalink).
//! Prints a Markdown table for `docs/BENCHMARKS.md`. One core: everything runs on this thread.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use edge_drivers::ble::ad::Advertisement;
use edge_drivers::ble::beacon::{AltBeacon, Beacon, IBeacon};
use edge_drivers::ble::btsnoop::{Datalink, Reader, Writer};
use edge_drivers::ble::eddystone::{Eddystone, Tlm};
use edge_drivers::ble::hci::{
    Address, AddressType, AdvertisingReport, ExtendedInfo, LegacyEventType, Phy, ReportKind,
    encode_le_advertising_report,
};
use std::time::Instant;

const REPORTS: usize = 200_000;

fn beacons() -> Vec<Beacon> {
    let uuid = [
        0xE2, 0xC5, 0x6D, 0xB5, 0xDF, 0xFB, 0x48, 0xD2, 0xB0, 0x60, 0xD0, 0xF5, 0xA7, 0x10, 0x96,
        0xE0,
    ];
    let mut id = [0u8; 20];
    id[..16].copy_from_slice(&uuid);
    vec![
        Beacon::IBeacon(IBeacon {
            uuid,
            major: 1,
            minor: 2,
            measured_power: -59,
        }),
        Beacon::AltBeacon(AltBeacon {
            company_id: 0x0118,
            id,
            reference_rssi: -60,
            mfg_reserved: 0,
        }),
        Beacon::Eddystone(Eddystone::Uid {
            tx_power_0m: -18,
            namespace: [7; 10],
            instance: [1; 6],
        }),
        Beacon::Eddystone(Eddystone::Url {
            tx_power_0m: -20,
            url: "https://www.example.com/offers".into(),
        }),
        Beacon::Eddystone(Eddystone::Tlm(Tlm::Plain {
            battery_mv: Some(3000),
            temperature_8_8: Some(0x1980),
            adv_count: 1,
            uptime_deciseconds: 2,
        })),
    ]
}

fn capture() -> Vec<u8> {
    let bs = beacons();
    let mut rng = fastrand::Rng::with_seed(9);
    let mut w = Writer::new(Vec::new(), Datalink::H4).unwrap();
    let mut n = 0;
    let mut ts = 1_796_083_200_000_000i64;
    while n < REPORTS {
        let extended = rng.u8(..10) < 2;
        let k = rng.usize(1..=3).min(REPORTS - n);
        let batch: Vec<AdvertisingReport> = (0..k)
            .map(|_| {
                let b = &bs[rng.usize(..bs.len())];
                AdvertisingReport {
                    kind: if extended {
                        ReportKind::Extended(ExtendedInfo {
                            event_type: 0x10,
                            primary_phy: Phy::Le1M,
                            secondary_phy: None,
                            sid: None,
                            tx_power: None,
                            periodic_interval: None,
                            direct_address_type: AddressType::Public,
                            direct_address: Address::default(),
                        })
                    } else {
                        ReportKind::Legacy(LegacyEventType::AdvNonconnInd)
                    },
                    address_type: AddressType::Random,
                    address: Address([0xC4, 0, 0, 0, rng.u8(..), rng.u8(..)]),
                    rssi: Some(-40 - rng.i8(0..50)),
                    data: b.to_advertising_data().unwrap(),
                }
            })
            .collect();
        w.write_hci_event(ts, &encode_le_advertising_report(&batch, extended).unwrap())
            .unwrap();
        ts += 1_000;
        n += k;
    }
    w.into_inner()
}

/// Best of 5 runs of `f`, in seconds; `f` returns a count that must not change between runs.
fn best_of_5(f: impl Fn() -> usize) -> (f64, usize) {
    let mut best = f64::MAX;
    let mut count = 0;
    for _ in 0..5 {
        let t = Instant::now();
        count = std::hint::black_box(f());
        best = best.min(t.elapsed().as_secs_f64());
    }
    (best, count)
}

fn main() {
    let data = capture();
    let records = || {
        Reader::new(&data[..]).unwrap().fold(0, |n, r| {
            std::hint::black_box(r.unwrap());
            n + 1
        })
    };
    let reports = || {
        Reader::new(&data[..])
            .unwrap()
            .advertising_reports()
            .fold(0, |n, r| {
                std::hint::black_box(r.unwrap());
                n + 1
            })
    };
    let beacons = || {
        let mut n = 0;
        for r in Reader::new(&data[..]).unwrap().advertising_reports() {
            let (_, report) = r.unwrap();
            let ad = Advertisement::parse(&report.data).unwrap();
            for b in ad.beacons() {
                std::hint::black_box(b.unwrap().rssi_at_1m());
                n += 1;
            }
        }
        n
    };
    let (t_rec, n_rec) = best_of_5(records);
    let (t_rep, n_rep) = best_of_5(reports);
    let (t_bea, n_bea) = best_of_5(beacons);
    assert_eq!(n_rep, REPORTS);
    assert_eq!(n_bea, REPORTS);
    let mb = data.len() as f64 / 1e6;
    println!(
        "capture: {mb:.1} MB, {n_rec} records, {REPORTS} reports (H4, best of 5, one thread)\n"
    );
    println!("| stage | time | reports/s (200 000 / time) | MB/s |");
    println!("|---|---|---|---|");
    for (name, t) in [
        ("records (btsnoop reader alone, baseline)", t_rec),
        ("reports (+ HCI LE advertising report parsing)", t_rep),
        ("beacons (+ AD structures + beacon frames)", t_bea),
    ] {
        println!(
            "| {name} | {:.1} ms | {:.0} | {:.0} |",
            t * 1e3,
            REPORTS as f64 / t,
            mb / t
        );
    }
}
