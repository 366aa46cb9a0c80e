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
