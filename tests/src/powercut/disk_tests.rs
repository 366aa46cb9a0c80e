//! The disk model against a reference made of two byte vectors per file (what programs see, what
//! survives a cut), under random writes, truncations, fsyncs and cuts. No FUSE, no kernel.

#![allow(clippy::unwrap_used)]

use super::disk::{Disk, ROOT};
use std::ffi::OsStr;

struct Reference {
    volatile: Vec<u8>,
    durable: Vec<u8>,
}

fn check(d: &Disk, ino: u64, r: &Reference, step: usize) {
    let got = d.read(ino, 0, (r.volatile.len() + 100) as u32).unwrap();
    assert_eq!(got, r.volatile, "step {step}: the volatile view");
    // Partial reads across extent edges.
    for _ in 0..4 {
        let off = fastrand::u64(0..=r.volatile.len() as u64 + 10);
        let len = fastrand::u32(0..5000);
        let got = d.read(ino, off, len).unwrap();
        let from = (off as usize).min(r.volatile.len());
        let to = (off as usize + len as usize).min(r.volatile.len());
        assert_eq!(got, &r.volatile[from..to], "step {step}: read {off}+{len}");
    }
}

#[test]
fn random_writes_truncations_syncs_and_cuts_match_the_reference() {
    let seed = fastrand::u64(..);
    fastrand::seed(seed);
    eprintln!("seed {seed}");
    let t = tempfile::tempdir().unwrap();
    let name = OsStr::new("f");
    let mut d = Disk::power_on(t.path()).unwrap();
    let mut ino = d.create(ROOT, name, 0o644, 0, 0).unwrap();
    d.fsyncdir(ROOT).unwrap();
    let mut r = Reference {
        volatile: Vec::new(),
        durable: Vec::new(),
    };
    for step in 0..3000 {
        match fastrand::u8(..100) {
            0..60 => {
                let off = fastrand::usize(0..=r.volatile.len() + 3000);
                let data: Vec<u8> = (0..fastrand::usize(1..4200))
                    .map(|_| fastrand::u8(..))
                    .collect();
                d.write(ino, off as u64, &data).unwrap();
                if r.volatile.len() < off + data.len() {
                    r.volatile.resize(off + data.len(), 0);
                }
                r.volatile[off..off + data.len()].copy_from_slice(&data);
            }
            60..75 => {
                let size = fastrand::usize(0..=r.volatile.len() + 2000);
                d.truncate(ino, size as u64).unwrap();
                r.volatile.resize(size, 0);
            }
            75..93 => {
                d.fsync(ino).unwrap();
                r.durable = r.volatile.clone();
            }
            _ => {
                let cut = d.power_off();
                assert!(d.read(ino, 0, 1).is_err(), "EIO after the cut");
                d = Disk::power_on(t.path()).unwrap();
                ino = d.lookup(ROOT, name).unwrap();
                r.volatile = r.durable.clone();
                assert!(cut.unsynced_bytes < 1 << 30);
            }
        }
        check(&d, ino, &r, step);
    }
}
