//! Replays the committed seed corpus of the `downlink_record` fuzz target (`core/fuzz/corpus/`)
//! and a few thousand seeded mutations through its properties on every test run, so CI checks
//! them without nightly or cargo-fuzz. `scripts/test.sh` adds a short coverage-guided run when
//! cargo-fuzz is installed.
#![allow(clippy::unwrap_used)]

use edge_core::downlink::Admission;
use edge_core::fuzzing::{self, FuzzRecord, STORE};
use std::path::{Path, PathBuf};

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus/downlink_record")
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
                _ => v = (0..rng.usize(..512)).map(|_| rng.u8(..)).collect(),
            }
            v
        })
        .collect()
}

#[test]
fn downlink_record_corpus() {
    let seeds: Vec<Vec<u8>> = corpus().into_iter().map(|(_, s)| s).collect();
    for s in seeds.iter().chain(&mutations(&seeds, 3000)) {
        fuzzing::downlink_record(s);
    }
}

/// The seeds are what their names say: `apply_*` are applied (the signed ones verified),
/// `refuse_<reason>*` are refused for that reason, `other_*` belong to another store. So the
/// fuzzer starts from records on every path, including validly signed ones.
#[test]
fn seeds_reach_every_verdict() {
    for (name, data) in corpus() {
        let v = FuzzRecord::decode(&data).admit();
        let ok = match (&v, name.split('_').next()) {
            (Admission::Apply { signed_by }, Some("apply")) => {
                !name.starts_with("apply_signed") || signed_by.is_some()
            }
            (Admission::Refuse(r), Some("refuse")) => {
                name.starts_with(&format!("refuse_{}", r.reason()))
            }
            (Admission::OtherStore, Some("other")) => true,
            _ => false,
        };
        assert!(ok, "seed {name}: {v:?}");
    }
}

const REMIRROR: &str = r#"{"schema":"edge.command/1","command":"remirror","stream":"pos.transactions","from_seq":1200}"#;
const PRICE: &str = r#"{"schema":"price/1","sku":"4006381333931","price_cents":199}"#;

fn rec(
    topic: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
    payload: Option<&str>,
) -> FuzzRecord {
    FuzzRecord {
        topic: topic.into(),
        key: key.map(|k| k.as_bytes().to_vec()),
        headers: headers
            .iter()
            .map(|(k, v)| (k.to_string(), Some(v.as_bytes().to_vec())))
            .collect(),
        payload: payload.map(|p| p.as_bytes().to_vec()),
    }
}

/// The seed corpus, generated (the signed seeds need the fuzz key).
fn seeds() -> Vec<(&'static str, FuzzRecord)> {
    let signed = |mut r: FuzzRecord, exp: Option<i64>| {
        r.sign(exp);
        r
    };
    let mut forged = signed(rec("prices", Some(STORE), &[], Some(PRICE)), None);
    forged.payload = Some(PRICE.replace("199", "1").into_bytes());
    let mut replayed = signed(
        rec("commands", Some("store-0002"), &[], Some(REMIRROR)),
        None,
    );
    replayed.key = Some(STORE.as_bytes().to_vec());
    let mut wrong_key = signed(rec("prices", Some(STORE), &[], Some(PRICE)), None);
    for h in &mut wrong_key.headers {
        if h.0 == "edge.sig.key" {
            h.1 = Some(b"hq-gone".to_vec());
        }
    }
    let seeds: Vec<(&str, FuzzRecord)> = vec![
        (
            "apply_signed_command",
            signed(rec("commands", Some(STORE), &[], Some(REMIRROR)), None),
        ),
        (
            "apply_signed_command_by_header",
            signed(
                rec(
                    "commands",
                    Some("x"),
                    &[("edge.store", STORE), ("edge.schema", "edge.command/1")],
                    Some(REMIRROR),
                ),
                Some(fuzzing::NOW_MS + 3_600_000),
            ),
        ),
        (
            "apply_signed_price",
            signed(
                rec("prices", Some(&format!("{STORE}/lane-2")), &[], Some(PRICE)),
                None,
            ),
        ),
        (
            "apply_signed_tombstone",
            signed(rec("prices", Some(STORE), &[], None), None),
        ),
        (
            "apply_unsigned_campaign",
            rec(
                "campaigns",
                Some("*"),
                &[("edge.schema", "campaign/1")],
                Some(r#"{"schema":"campaign/1","id":"c-7"}"#),
            ),
        ),
        (
            "other_store_price",
            rec("prices", Some("store-0002"), &[], Some(PRICE)),
        ),
        (
            "other_store_by_header",
            rec(
                "commands",
                Some(STORE),
                &[("edge.store", "store-0002")],
                Some(REMIRROR),
            ),
        ),
        (
            "refuse_unsigned_command",
            rec("commands", Some(STORE), &[], Some(REMIRROR)),
        ),
        ("refuse_bad_signature_forged_price", forged),
        ("refuse_bad_signature_replayed_command", replayed),
        ("refuse_unknown_key", wrong_key),
        (
            "refuse_expired",
            signed(
                rec("prices", Some(STORE), &[], Some(PRICE)),
                Some(fuzzing::NOW_MS - 1),
            ),
        ),
        (
            "refuse_unaddressed_command",
            signed(rec("commands", Some("*"), &[], Some(REMIRROR)), None),
        ),
        (
            "refuse_malformed_command",
            signed(
                rec(
                    "commands",
                    Some(STORE),
                    &[],
                    Some(r#"{"command":"remirror","stream":"*","from_seq":0}"#),
                ),
                None,
            ),
        ),
        (
            "refuse_malformed_signature",
            rec(
                "campaigns",
                Some(STORE),
                &[
                    ("edge.sig", "not base64"),
                    ("edge.sig.key", "hq-fuzz"),
                    ("edge.sig.ts", "1"),
                ],
                Some("{}"),
            ),
        ),
        (
            "refuse_ambiguous_store",
            rec(
                "campaigns",
                None,
                &[("edge.store", STORE), ("edge.store", "*")],
                Some("{}"),
            ),
        ),
    ];
    seeds
}

/// The committed corpus is what the generator makes, byte for byte (signatures are
/// deterministic). `EDGE_WRITE_FUZZ_SEEDS=1 cargo test -p edge-core --test fuzz_corpus` rewrites
/// it after a change of the record format.
#[test]
fn the_committed_seeds_are_the_generated_ones() {
    let dir = corpus_dir();
    let write = std::env::var_os("EDGE_WRITE_FUZZ_SEEDS").is_some();
    if write {
        std::fs::create_dir_all(&dir).unwrap();
    }
    for (name, r) in seeds() {
        let path = dir.join(name);
        if write {
            std::fs::write(&path, r.encode()).unwrap();
        }
        let committed = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert_eq!(
            committed,
            r.encode(),
            "{name} differs from the generator; regenerate with EDGE_WRITE_FUZZ_SEEDS=1"
        );
    }
}
