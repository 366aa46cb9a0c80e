//! Simulated power cuts (PRODUCT.md's target: 20 cycles, 0 acknowledged records lost).
//!
//! `kill -9` leaves the page cache intact, so it cannot tell "acked after fsync" from "acked
//! after write". Here the agent's data directory is on [`PowerCutFs`], a FUSE filesystem that
//! keeps every change not yet fsynced in memory and drops it at a power cut (its module doc
//! states the model of a disk). A cut is: SIGKILL the agent and reap it, then drop everything
//! unsynced and unmount (in that order, so that no fsync can race the cut); then power on over
//! what survived and start the agent again.
//!
//! The first tests check the filesystem itself, then SQLite on it, then the real agent with POS
//! lanes publishing QoS 1 sales through a real Mosquitto, and the negative control: the same
//! cycle with `[log] synchronous = "normal"` must lose acknowledged sales, or the harness could
//! not detect a loss.

#![allow(clippy::unwrap_used)] // test code: a failed set-up step should fail the test loudly

use edge_tests::agent::{Agent, event_id_counts, read_stream, wait_records};
use edge_tests::agent_bin;
use edge_tests::mosquitto::Mosquitto;
use edge_tests::powercut::PowerCutFs;
use edge_tests::publisher::{Message, json_message, spawn_paced_publisher};
use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

const S: &str = "pos.transactions";

fn sync_dir(p: &Path) {
    File::open(p).unwrap().sync_all().unwrap();
}

fn disk() -> (tempfile::TempDir, PowerCutFs) {
    let t = tempfile::tempdir().unwrap();
    let fs = PowerCutFs::mount(&t.path().join("backing"), &t.path().join("mnt")).unwrap();
    (t, fs)
}

fn remount(t: &tempfile::TempDir) -> PowerCutFs {
    PowerCutFs::mount(&t.path().join("backing"), &t.path().join("mnt")).unwrap()
}

#[test]
fn unsynced_writes_are_lost_at_a_cut_and_synced_ones_survive() {
    let (t, fs) = disk();
    let m = fs.mountpoint().to_path_buf();
    let mut f = File::create(m.join("a")).unwrap();
    f.write_all(b"hello").unwrap();
    f.sync_all().unwrap();
    sync_dir(&m);
    f.write_all(b" world").unwrap();
    assert_eq!(std::fs::read(m.join("a")).unwrap(), b"hello world");
    // Written but never synced, in a file whose creation was committed by the dir fsync above.
    let mut g = File::create(m.join("b")).unwrap();
    sync_dir(&m);
    g.write_all(b"gone").unwrap();
    drop((f, g));
    let cut = fs.power_cut();
    assert_eq!(cut.unsynced_bytes, 6 + 4, "{cut:?}");
    assert!(
        !m.join("a").exists(),
        "the mount is gone after the cut: {}",
        m.display()
    );
    let fs = remount(&t);
    assert_eq!(std::fs::read(m.join("a")).unwrap(), b"hello");
    assert_eq!(std::fs::read(m.join("b")).unwrap(), b"");
    fs.power_cut();
}

#[test]
fn a_name_is_durable_only_after_its_directory_is_fsynced() {
    let (t, fs) = disk();
    let m = fs.mountpoint().to_path_buf();
    // Data fsynced, directory not: the file is an orphan after the cut.
    let mut f = File::create(m.join("orphan")).unwrap();
    f.write_all(b"data").unwrap();
    f.sync_all().unwrap();
    // A committed file renamed without a directory fsync keeps its old name.
    let mut r = File::create(m.join("old")).unwrap();
    r.write_all(b"renamed").unwrap();
    r.sync_all().unwrap();
    drop(r);
    std::fs::create_dir(m.join("sub")).unwrap();
    sync_dir(&m);
    // ... committed: old, sub, and orphan (created before the dir fsync: the fsync commits every
    // namespace change before it).
    std::fs::rename(m.join("old"), m.join("new")).unwrap();
    let mut late = File::create(m.join("sub/late")).unwrap();
    late.write_all(b"x").unwrap();
    late.sync_all().unwrap();
    drop((f, late));
    fs.power_cut();
    let fs = remount(&t);
    assert_eq!(std::fs::read(m.join("orphan")).unwrap(), b"data");
    assert_eq!(std::fs::read(m.join("old")).unwrap(), b"renamed");
    assert!(!m.join("new").exists());
    assert!(m.join("sub").is_dir());
    assert!(!m.join("sub/late").exists(), "created after the last dir fsync");
    // Now commit a rename and an unlink.
    std::fs::rename(m.join("old"), m.join("new")).unwrap();
    std::fs::remove_file(m.join("orphan")).unwrap();
    sync_dir(&m.join("sub"));
    fs.power_cut();
    let fs = remount(&t);
    let mut names: Vec<String> = std::fs::read_dir(&m)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["new", "sub"], "the staging area is hidden and empty");
    assert_eq!(std::fs::read(m.join("new")).unwrap(), b"renamed");
    fs.power_cut();
}

#[test]
fn truncation_is_data_too() {
    let (t, fs) = disk();
    let m = fs.mountpoint().to_path_buf();
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(m.join("f"))
        .unwrap();
    f.write_all_at(b"abcdef", 0).unwrap();
    f.sync_all().unwrap();
    sync_dir(&m);
    // Shrink, grow again: the cut-off bytes read back as zeros, never as the old data.
    f.set_len(2).unwrap();
    f.set_len(6).unwrap();
    f.write_all_at(b"Z", 4).unwrap();
    assert_eq!(std::fs::read(m.join("f")).unwrap(), b"ab\0\0Z\0");
    drop(f);
    fs.power_cut();
    let fs = remount(&t);
    assert_eq!(std::fs::read(m.join("f")).unwrap(), b"abcdef");
    let f = OpenOptions::new().write(true).open(m.join("f")).unwrap();
    f.set_len(3).unwrap();
    f.sync_data().unwrap();
    drop(f);
    fs.power_cut();
    let fs = remount(&t);
    assert_eq!(std::fs::read(m.join("f")).unwrap(), b"abc");
    fs.power_cut();
}

/// SQLite in WAL mode on the filesystem: with FULL every committed transaction survives a cut;
/// with NORMAL the commits since the last checkpoint are lost (the reason the agent's negative
/// control below loses acknowledged sales).
#[test]
fn sqlite_wal_commits_survive_a_cut_with_full_and_not_with_normal() {
    for (sync, expect_all) in [("FULL", true), ("NORMAL", false)] {
        let (t, fs) = disk();
        let db = fs.mountpoint().join("t.db");
        let conn = rusqlite::Connection::open(&db).unwrap();
        // Closing without a checkpoint leaves the files as a kill -9 would.
        conn.set_db_config(
            rusqlite::config::DbConfig::SQLITE_DBCONFIG_NO_CKPT_ON_CLOSE,
            true,
        )
        .unwrap();
        let mode: String = conn
            .query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal", "WAL (shared-memory -shm) works on the mount");
        conn.pragma_update(None, "synchronous", sync).unwrap();
        conn.pragma_update(None, "wal_autocheckpoint", 0).unwrap();
        conn.execute_batch("CREATE TABLE t (x INTEGER)").unwrap();
        conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
            .unwrap();
        for i in 0..200 {
            conn.execute("INSERT INTO t VALUES (?1)", [i]).unwrap();
        }
        drop(conn);
        let cut = fs.power_cut();
        let fs = remount(&t);
        let conn = rusqlite::Connection::open(&db).unwrap();
        let n: i64 = conn
            .query_row("SELECT count(*) FROM t", [], |r| r.get(0))
            .unwrap();
        drop(conn);
        if expect_all {
            assert_eq!(n, 200, "synchronous=FULL lost commits: {cut:?}");
        } else {
            assert_eq!(n, 0, "synchronous=NORMAL kept unsynced commits: {cut:?}");
        }
        fs.power_cut();
    }
}
