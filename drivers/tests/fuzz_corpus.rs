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
