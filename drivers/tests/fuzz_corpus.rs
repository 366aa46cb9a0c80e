//! Replays the committed fuzz seed corpora (`drivers/fuzz/corpus/`) and a few thousand seeded
//! pseudo-random inputs through the fuzz targets' properties on every test run, so CI checks them
//! without nightly or cargo-fuzz. `scripts/test.sh` adds a short coverage-guided run when
//! cargo-fuzz is installed.
#![allow(clippy::unwrap_used)]

use edge_drivers::fuzzing;
use std::path::Path;

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| std::fs::read(e.unwrap().path()).unwrap())
        .collect();
    assert!(out.len() >= 5, "{target}: seed corpus is committed");
    out.sort();
    out
}

/// Seeded mutations of the corpus: byte flips, truncations, splices and random bytes.
fn mutations(seeds: &[Vec<u8>], n: usize) -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    (0..n)
        .map(|_| {
            let mut v = seeds[rng.usize(..seeds.len())].clone();
            match rng.u8(..4) {
                0 => {
                    for _ in 0..rng.usize(1..8) {
                        if !v.is_empty() {
                            let i = rng.usize(..v.len());
                            v[i] = rng.u8(..);
                        }
                    }
                }
                1 => v.truncate(rng.usize(..=v.len())),
                2 => {
                    let other = &seeds[rng.usize(..seeds.len())];
                    let at = rng.usize(..=v.len());
                    v.splice(at..at, other.iter().copied());
                }
                _ => v = (0..rng.usize(..2048)).map(|_| rng.u8(..)).collect(),
            }
            v
        })
        .collect()
}

#[test]
fn escpos_tokenizer_corpus() {
    let seeds = corpus("escpos_tokenizer");
    for s in seeds.iter().chain(&mutations(&seeds, 3000)) {
        fuzzing::escpos(s);
    }
}

#[test]
fn scanner_frame_corpus() {
    let seeds = corpus("scanner_frame");
    for s in seeds.iter().chain(&mutations(&seeds, 5000)) {
        fuzzing::scanner(s);
    }
}

#[test]
fn scale_frame_corpus() {
    let seeds = corpus("scale_frame");
    for s in seeds.iter().chain(&mutations(&seeds, 5000)) {
        fuzzing::scale(s);
    }
}

/// The BLE targets' seeds, generated from the crate's own encoders (no hand-made binary files):
/// every beacon format, generic AD, legacy and extended report events, and btsnoop captures of
/// each datalink, plus a few broken ones so the fuzzer starts on the error paths too.
#[cfg(feature = "ble")]
mod ble {
    use edge_drivers::ble::ad::{ad_type, push_structure};
    use edge_drivers::ble::beacon::{AltBeacon, Beacon, IBeacon};
    use edge_drivers::ble::btsnoop::{Datalink, Writer};
    use edge_drivers::ble::eddystone::{Eddystone, Tlm};
    use edge_drivers::ble::hci::{
        Address, AddressType, AdvertisingReport, ExtendedInfo, LegacyEventType, Phy, ReportKind,
        encode_le_advertising_report,
    };
    use edge_drivers::fuzzing;
    use std::path::{Path, PathBuf};

    const UUID: [u8; 16] = [
        0xE2, 0xC5, 0x6D, 0xB5, 0xDF, 0xFB, 0x48, 0xD2, 0xB0, 0x60, 0xD0, 0xF5, 0xA7, 0x10, 0x96,
        0xE0,
    ];

    fn beacons() -> Vec<(&'static str, Beacon)> {
        let mut alt_id = [0u8; 20];
        alt_id[..16].copy_from_slice(&UUID);
        alt_id[17] = 1;
        alt_id[19] = 2;
        vec![
            (
                "ibeacon",
                Beacon::IBeacon(IBeacon {
                    uuid: UUID,
                    major: 1,
                    minor: 2,
                    measured_power: -59,
                }),
            ),
            (
                "altbeacon",
                Beacon::AltBeacon(AltBeacon {
                    company_id: 0x0118,
                    id: alt_id,
                    reference_rssi: -59,
                    mfg_reserved: 0,
                }),
            ),
            (
                "eddystone_uid",
                Beacon::Eddystone(Eddystone::Uid {
                    tx_power_0m: -18,
                    namespace: [0x8B, 0x0C, 0xA7, 0x50, 0x09, 0x54, 0x77, 0xCB, 0x3E, 0x77],
                    instance: [0, 0, 0, 0, 0, 1],
                }),
            ),
            (
                "eddystone_url",
                Beacon::Eddystone(Eddystone::Url {
                    tx_power_0m: -20,
                    url: "https://www.example.com/aisle.info".into(),
                }),
            ),
            (
                "eddystone_tlm",
                Beacon::Eddystone(Eddystone::Tlm(Tlm::Plain {
                    battery_mv: Some(3000),
                    temperature_8_8: Some(0x1980),
                    adv_count: 0x12345,
                    uptime_deciseconds: 0xABCDE,
                })),
            ),
            (
                "eddystone_etlm",
                Beacon::Eddystone(Eddystone::Tlm(Tlm::Encrypted {
                    etlm: [7; 12],
                    salt: 0xABCD,
                    mic: 0x1234,
                })),
            ),
            (
                "eddystone_eid",
                Beacon::Eddystone(Eddystone::Eid {
                    tx_power_0m: -10,
                    eid: [0xDE, 0xAD, 0xBE, 0xEF, 1, 2, 3, 4],
                }),
            ),
        ]
    }

    fn ad(b: &Beacon) -> Vec<u8> {
        b.to_advertising_data().unwrap()
    }

    fn advertising_seeds() -> Vec<(String, Vec<u8>)> {
        let mut out: Vec<(String, Vec<u8>)> = beacons()
            .iter()
            .map(|(n, b)| (n.to_string(), ad(b)))
            .collect();
        let mut generic = Vec::new();
        push_structure(&mut generic, ad_type::FLAGS, &[0x1A]).unwrap();
        push_structure(
            &mut generic,
            ad_type::UUID16_COMPLETE,
            &[0x0F, 0x18, 0xAA, 0xFE],
        )
        .unwrap();
        push_structure(&mut generic, ad_type::COMPLETE_NAME, b"trolley-17").unwrap();
        push_structure(&mut generic, ad_type::TX_POWER, &[0xF4]).unwrap();
        push_structure(&mut generic, ad_type::SERVICE_DATA_16, &[0x0F, 0x18, 0x5A]).unwrap();
        out.push(("generic_fields".into(), generic.clone()));
        let mut padded = generic;
        padded.resize(31, 0);
        out.push(("generic_padded".into(), padded));
        let mut cut = ad(&beacons()[0].1);
        cut.truncate(20);
        out.push(("broken_truncated_ibeacon".into(), cut));
        let mut long = ad(&beacons()[1].1);
        long[3] += 1;
        long.push(0);
        out.push(("broken_long_altbeacon".into(), long));
        out
    }

    fn report(b: &Beacon, addr: u8, rssi: i8, kind: ReportKind) -> AdvertisingReport {
        AdvertisingReport {
            kind,
            address_type: AddressType::Random,
            address: Address([0xC4, 0x7C, 0x8D, 0x6A, 0x3B, addr]),
            rssi: Some(rssi),
            data: ad(b),
        }
    }

    const NONCONN: ReportKind = ReportKind::Legacy(LegacyEventType::AdvNonconnInd);

    fn extended(sid: u8) -> ReportKind {
        ReportKind::Extended(ExtendedInfo {
            event_type: 0x0000,
            primary_phy: Phy::Le1M,
            secondary_phy: Some(Phy::Le2M),
            sid: Some(sid),
            tx_power: Some(4),
            periodic_interval: None,
            direct_address_type: AddressType::Public,
            direct_address: Address::default(),
        })
    }

    fn event_seeds() -> Vec<(String, Vec<u8>)> {
        let bs = beacons();
        let legacy = |i: usize| report(&bs[i].1, i as u8, -60 - i as i8, NONCONN);
        let mut out = vec![
            (
                "legacy_ibeacon".to_string(),
                encode_le_advertising_report(&[legacy(0)], false).unwrap(),
            ),
            (
                "legacy_three_reports".into(),
                encode_le_advertising_report(&[legacy(2), legacy(4), legacy(6)], false).unwrap(),
            ),
            (
                "extended_altbeacon".into(),
                encode_le_advertising_report(&[report(&bs[1].1, 1, -71, extended(3))], true)
                    .unwrap(),
            ),
            (
                "extended_two_eddystone".into(),
                encode_le_advertising_report(
                    &[
                        report(&bs[3].1, 3, -80, extended(1)),
                        report(&bs[5].1, 5, -81, extended(2)),
                    ],
                    true,
                )
                .unwrap(),
            ),
            (
                "command_complete".into(),
                vec![0x0E, 0x04, 0x01, 0x0C, 0x20, 0x00],
            ),
        ];
        let mut short = out[0].1.clone();
        short[3] = 2;
        out.push(("broken_missing_report".into(), short));
        out
    }

    fn capture(datalink: Datalink, events: &[(String, Vec<u8>)]) -> Vec<u8> {
        let mut w = Writer::new(Vec::new(), datalink).unwrap();
        for (i, (_, e)) in events.iter().enumerate() {
            w.write_hci_event(1_796_083_200_000_000 + i as i64 * 100_000, e)
                .unwrap();
        }
        w.into_inner()
    }

    fn capture_seeds() -> Vec<(String, Vec<u8>)> {
        let events = event_seeds();
        let mut out = vec![
            ("monitor".to_string(), capture(Datalink::Monitor, &events)),
            ("h4".into(), capture(Datalink::H4, &events)),
            ("hci".into(), capture(Datalink::Hci, &events[..3])),
        ];
        let mut cut = out[0].1.clone();
        cut.truncate(cut.len() - 7);
        out.push(("broken_truncated_monitor".into(), cut));
        // A record header declaring 4 GiB after two good records.
        let mut huge = capture(Datalink::H4, &events[..2]);
        huge.extend_from_slice(&[0xFF; 24]);
        out.push(("broken_record_length".into(), huge));
        out
    }

    fn dir(target: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target)
    }

    type Seeds = fn() -> Vec<(String, Vec<u8>)>;
    const TARGETS: [(&str, Seeds); 3] = [
        ("ble_advertising", advertising_seeds),
        ("hci_event", event_seeds),
        ("btsnoop_capture", capture_seeds),
    ];

    /// The committed BLE corpora are what the generators above make, byte for byte, and nothing
    /// else. `EDGE_WRITE_FUZZ_SEEDS=1 cargo test -p edge-drivers --test fuzz_corpus` rewrites them
    /// after a change of a format or a generator.
    #[test]
    fn the_committed_ble_seeds_are_the_generated_ones() {
        let write = std::env::var_os("EDGE_WRITE_FUZZ_SEEDS").is_some();
        for (target, seeds) in TARGETS {
            let d = dir(target);
            let seeds = seeds();
            if write {
                std::fs::create_dir_all(&d).unwrap();
                for (name, bytes) in &seeds {
                    std::fs::write(d.join(name), bytes).unwrap();
                }
            }
            for (name, bytes) in &seeds {
                let path = d.join(name);
                let committed =
                    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(
                    &committed, bytes,
                    "{target}/{name} differs from the generator; regenerate with EDGE_WRITE_FUZZ_SEEDS=1"
                );
            }
            let mut names: Vec<String> = std::fs::read_dir(&d)
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            let mut expected: Vec<String> = seeds.into_iter().map(|(n, _)| n).collect();
            expected.sort();
            assert_eq!(
                names, expected,
                "{target}: only generated seeds are committed"
            );
        }
    }

    /// The seeds reach what their names say: beacon seeds decode to their beacon, `broken_*`
    /// seeds fail, event seeds give reports (but the command), captures give reports.
    #[test]
    fn ble_seeds_reach_their_paths() {
        use edge_drivers::ble::ad::Advertisement;
        use edge_drivers::ble::btsnoop::Reader;
        use edge_drivers::ble::hci::parse_advertising_reports;
        let named = beacons();
        for (name, data) in advertising_seeds() {
            let parsed = Advertisement::parse(&data);
            let beacons: Vec<_> = parsed
                .as_ref()
                .map(|a| a.beacons().collect())
                .unwrap_or_default();
            if let Some((_, b)) = named.iter().find(|(n, _)| *n == name) {
                assert_eq!(beacons, vec![Ok(b.clone())], "{name}");
            } else if name.starts_with("broken_") {
                assert!(
                    parsed.is_err() || beacons.iter().any(Result::is_err),
                    "{name}"
                );
            } else {
                assert!(parsed.is_ok() && beacons.is_empty(), "{name}");
            }
        }
        for (name, data) in event_seeds() {
            let r = parse_advertising_reports(&data);
            match name.as_str() {
                "command_complete" => assert_eq!(r, Ok(None)),
                n if n.starts_with("broken_") => assert!(r.is_err(), "{name}"),
                _ => assert!(matches!(r, Ok(Some(ref v)) if !v.is_empty()), "{name}"),
            }
        }
        for (name, data) in capture_seeds() {
            let items: Vec<_> = Reader::new(&data[..])
                .unwrap()
                .advertising_reports()
                .collect();
            assert!(items.iter().any(Result::is_ok), "{name}");
            assert_eq!(
                name.starts_with("broken_"),
                items.iter().any(|i| i.is_err()
                    && !matches!(i, Err(edge_drivers::ble::btsnoop::BtsnoopError::Hci { .. }))),
                "{name}"
            );
        }
    }

    #[test]
    fn ble_advertising_corpus() {
        let seeds = super::corpus("ble_advertising");
        for s in seeds.iter().chain(&super::mutations(&seeds, 5000)) {
            fuzzing::ble_advertising(s);
        }
    }

    #[test]
    fn hci_event_corpus() {
        let seeds = super::corpus("hci_event");
        for s in seeds.iter().chain(&super::mutations(&seeds, 5000)) {
            fuzzing::hci_event(s);
        }
    }

    #[test]
    fn btsnoop_capture_corpus() {
        let seeds = super::corpus("btsnoop_capture");
        for s in seeds.iter().chain(&super::mutations(&seeds, 2000)) {
            fuzzing::btsnoop_capture(s);
        }
    }
}

/// The scale seeds of issue 11 hold what they are named for, so mutations start from real frames.
#[test]
fn scale_seeds_hold_the_8217_frames() {
    use edge_drivers::scale::{Framed, ScaleFramer, ScaleProtocol, parse_toledo};
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/scale_frame");
    let frames = |name: &str| {
        let mut f = ScaleFramer::new(ScaleProtocol::Toledo);
        let mut out = Vec::new();
        f.push(&std::fs::read(dir.join(name)).unwrap(), &mut out);
        out.into_iter()
            .map(|fr| match fr {
                Framed::Frame(body) => parse_toledo(&body, "kg", 2).unwrap(),
                Framed::Broken { error, .. } => panic!("{name}: {error}"),
            })
            .collect::<Vec<_>>()
    };
    let net = frames("toledo_net");
    assert_eq!((net[0].weight_milli, net[0].mode), (Some(300), "net"));
    assert_eq!(
        frames("toledo_over_capacity_bare")[0].flags,
        vec!["over_capacity"]
    );
    let statuses = frames("toledo_status_8217");
    assert_eq!(statuses.len(), 8);
    assert!(statuses.iter().all(|r| r.weight_milli.is_none()));
}

/// The printer status seeds (`fuzz/corpus/printer_status`): `k`, `k` DLE EOT requests, then what
/// the printer sent (`fuzzing::printer_status`). Generated here from the replies of issue 11, not
/// written by hand.
fn printer_status_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let seed = |requests: &[u8], printer: &[u8]| {
        let mut v = vec![requests.len() as u8];
        v.extend_from_slice(requests);
        v.extend_from_slice(printer);
        v
    };
    vec![
        (
            "probe_healthy",
            seed(&[1, 2, 3, 4], &[0x16, 0x12, 0x12, 0x12]),
        ),
        (
            "probe_paper_out",
            seed(&[1, 2, 3, 4], &[0x1A, 0x32, 0x12, 0x7E]),
        ),
        (
            "probe_cover_open",
            seed(&[1, 2, 3, 4], &[0x1A, 0x16, 0x12, 0x12]),
        ),
        ("probe_errors", seed(&[3, 3, 3], &[0x1A, 0x32, 0x52])),
        ("paper_near_end", seed(&[4], &[0x1E])),
        (
            "asb_cover_open_then_clear",
            seed(&[], &[0x38, 0x00, 0x0C, 0x00, 0x14, 0x00, 0x00, 0x0F]),
        ),
        ("asb_cutter_near_end", seed(&[], &[0x14, 0x08, 0x03, 0x00])),
        (
            "mixed_gs_r_asb_block",
            seed(
                &[1, 2, 3],
                &[
                    0x00, 0x16, 0x14, 0x00, 0x00, 0x0F, 0x5F, b'T', b'M', 0x12, 0x10, 0x00, 0x32,
                    0x1A,
                ],
            ),
        ),
        ("asb_cut_short", seed(&[1], &[0x14, 0x00, 0x16])),
        ("unrequested", seed(&[], &[0x12, 0x16, 0x1A])),
    ]
}

/// The committed printer status seeds are the generated ones; `EDGE_WRITE_FUZZ_SEEDS=1 cargo
/// test -p edge-drivers --test fuzz_corpus` rewrites them.
#[test]
fn printer_status_seeds_are_the_generated_ones() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/printer_status");
    let write = std::env::var_os("EDGE_WRITE_FUZZ_SEEDS").is_some();
    if write {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, bytes) in printer_status_seeds() {
        let path = dir.join(name);
        if write {
            std::fs::write(&path, &bytes).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            committed, bytes,
            "{name} differs from the generator; regenerate with EDGE_WRITE_FUZZ_SEEDS=1"
        );
    }
}

#[test]
fn printer_status_corpus() {
    let seeds = corpus("printer_status");
    for s in seeds.iter().chain(&mutations(&seeds, 5000)) {
        fuzzing::printer_status(s);
    }
}
