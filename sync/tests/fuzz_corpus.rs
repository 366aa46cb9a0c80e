//! Replays the committed seed corpora of the `mqtt_ingress` and `mqtt_topic` fuzz targets
//! (`sync/fuzz/corpus/`) and a few thousand seeded mutations through their properties on every
//! test run, so CI checks them without nightly or cargo-fuzz. `scripts/test.sh` adds a short
//! coverage-guided run when cargo-fuzz is installed.
#![allow(clippy::unwrap_used)]

use edge_sync::fuzzing;
use std::path::{Path, PathBuf};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target)
}

fn corpus(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir(target);
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| {
            let e = e.unwrap();
            (
                e.file_name().to_string_lossy().into_owned(),
                std::fs::read(e.path()).unwrap(),
            )
        })
        .collect();
    assert!(out.len() >= 8, "the seed corpus of {target} is committed");
    out.sort();
    out
}

/// Seeded mutations of the corpus: byte flips, line swaps, truncations, splices and random
/// bytes.
fn mutations(seeds: &[Vec<u8>], n: usize) -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    const INTERESTING: &[u8] = b"+#/{}\n\0$:\"[],";
    (0..n)
        .map(|_| {
            let mut v = seeds[rng.usize(..seeds.len())].clone();
            match rng.u8(..5) {
                0 => {
                    for _ in 0..rng.usize(1..8) {
                        if !v.is_empty() {
                            let i = rng.usize(..v.len());
                            v[i] = if rng.bool() {
                                rng.u8(..)
                            } else {
                                INTERESTING[rng.usize(..INTERESTING.len())]
                            };
                        }
                    }
                }
                1 => v.truncate(rng.usize(..=v.len())),
                2 => {
                    let other = &seeds[rng.usize(..seeds.len())];
                    let at = rng.usize(..=v.len());
                    v.splice(at..at, other.iter().copied());
                }
                3 => {
                    let mut lines: Vec<&[u8]> = v.split(|&b| b == b'\n').collect();
                    if lines.len() > 1 {
                        let (a, b) = (rng.usize(..lines.len()), rng.usize(..lines.len()));
                        lines.swap(a, b);
                    }
                    v = lines.join(&b'\n');
                }
                _ => {
                    v = (0..rng.usize(..256))
                        .map(|_| INTERESTING[rng.usize(..INTERESTING.len())])
                        .collect()
                }
            }
            v
        })
        .collect()
}

fn replay(target: &str, property: fn(&[u8])) {
    let seeds: Vec<Vec<u8>> = corpus(target).into_iter().map(|(_, s)| s).collect();
    for s in seeds.iter().chain(&mutations(&seeds, 4000)) {
        property(s);
    }
}

#[test]
fn mqtt_ingress_corpus() {
    replay("mqtt_ingress", fuzzing::mqtt_ingress);
}

#[test]
fn mqtt_topic_corpus() {
    replay("mqtt_topic", fuzzing::mqtt_topic);
}

/// The ingress seeds are what their names say (`ok_*` accepted, otherwise the rejection label),
/// so the fuzzer starts from publishes on every path.
#[test]
fn ingress_seeds_reach_every_verdict() {
    let mut seen = std::collections::BTreeSet::new();
    for (name, data) in corpus("mqtt_ingress") {
        let label = fuzzing::verdict_label(&data);
        assert!(name.starts_with(label), "seed {name}: {label}");
        seen.insert(label);
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["no_rule", "not_json", "not_object", "ok", "oversized"]
    );
}

/// A key HQ chose that names another placeholder is published literally, not replaced by the
/// unchecked value of that placeholder (the bug the `mqtt_topic` target was written for).
#[test]
fn a_value_is_never_read_as_a_placeholder() {
    let [_, _, template, key, source] = fuzzing::topic_lines(
        &std::fs::read(corpus_dir("mqtt_topic").join("key_names_a_placeholder")).unwrap(),
    );
    let vars = [
        ("store", fuzzing::STORE),
        ("stream", fuzzing::STREAM),
        ("key", key.as_str()),
        ("source", source.as_str()),
    ];
    assert_eq!(
        edge_sync::mqtt::topic::render_checked(&template, &vars).unwrap(),
        "store/store-0001/prices/{source}"
    );
}
