//! Replays the committed seed corpus of the `config` fuzz target (`edge-agent/fuzz/corpus/`) and
//! a few thousand seeded mutations through its properties on every test run, so CI checks them
//! without nightly or cargo-fuzz. `scripts/test.sh` adds a short coverage-guided run when
//! cargo-fuzz is installed.
#![allow(clippy::unwrap_used)]

use edge_agent::config::AgentConfig;
use edge_agent::fuzzing;
use std::path::{Path, PathBuf};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/config")
}

fn corpus() -> Vec<(String, Vec<u8>)> {
    let dir = corpus_dir();
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
    assert!(out.len() >= 8, "the seed corpus is committed");
    out.sort();
    out
}

/// Seeded mutations: byte flips towards TOML's syntax, line drops and swaps, truncations and
/// splices of two configs.
fn mutations(seeds: &[Vec<u8>], n: usize) -> Vec<Vec<u8>> {
    let mut rng = fastrand::Rng::with_seed(0x5eed);
    const INTERESTING: &[u8] = b"[]{}=\"'#.,\n0-+:";
    (0..n)
        .map(|_| {
            let mut v = seeds[rng.usize(..seeds.len())].clone();
            match rng.u8(..4) {
                0 => {
                    for _ in 0..rng.usize(1..8) {
                        if !v.is_empty() {
                            let i = rng.usize(..v.len());
                            v[i] = INTERESTING[rng.usize(..INTERESTING.len())];
                        }
                    }
                }
                1 => {
                    let mut lines: Vec<&[u8]> = v.split(|&b| b == b'\n').collect();
                    if lines.len() > 1 {
                        let (a, b) = (rng.usize(..lines.len()), rng.usize(..lines.len()));
                        if rng.bool() {
                            lines.swap(a, b);
                        } else {
                            lines.remove(a);
                        }
                    }
                    v = lines.join(&b'\n');
                }
                2 => v.truncate(rng.usize(..=v.len())),
                _ => {
                    let other = &seeds[rng.usize(..seeds.len())];
                    let at = rng.usize(..=v.len());
                    v.splice(at..at, other.iter().copied());
                }
            }
            v
        })
        .collect()
}

#[test]
fn config_corpus() {
    let seeds: Vec<Vec<u8>> = corpus().into_iter().map(|(_, s)| s).collect();
    for s in seeds.iter().chain(&mutations(&seeds, 2000)) {
        fuzzing::config(s);
    }
}

/// The seeds are what their names say: `valid_*` validate, `invalid_*` parse with problems,
/// `syntax_*` do not parse (so the fuzzer starts on every path).
#[test]
fn seeds_reach_every_verdict() {
    for (name, data) in corpus() {
        let text = String::from_utf8_lossy(&data);
        let verdict = match AgentConfig::parse(&text, fuzzing::ORIGIN) {
            Err(_) => "syntax",
            Ok(c) if c.validate().is_empty() => "valid",
            Ok(_) => "invalid",
        };
        assert!(
            name.starts_with(verdict) || name.starts_with("other"),
            "seed {name}: {verdict}"
        );
    }
}
