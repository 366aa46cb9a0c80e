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

/// Powers on over `backing`; no FUSE is a failure with the fix in the message, never a skip.
fn mount(backing: &Path, mountpoint: &Path) -> PowerCutFs {
    PowerCutFs::mount(backing, mountpoint).unwrap_or_else(|e| {
        panic!(
            "cannot mount the power-cut filesystem at {}: {e}. It needs /dev/fuse and root, or \
             fusermount3 from the Debian package fuse3 (scripts/install-deps.sh installs it)",
            mountpoint.display()
        )
    })
}

fn disk() -> (tempfile::TempDir, PowerCutFs) {
    let t = tempfile::tempdir().unwrap();
    let fs = mount(&t.path().join("backing"), &t.path().join("mnt"));
    (t, fs)
}

fn remount(t: &tempfile::TempDir) -> PowerCutFs {
    mount(&t.path().join("backing"), &t.path().join("mnt"))
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
    assert!(
        !m.join("sub/late").exists(),
        "created after the last dir fsync"
    );
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
    assert_eq!(
        names,
        ["new", "sub"],
        "the staging area is hidden and empty"
    );
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

/// Agent config: MQTT ingest of POS sales only (no Kafka), the given `synchronous` mode.
fn agent_config(store: &str, mqtt_port: u16, synchronous: &str) -> String {
    format!(
        r#"[agent]
store_id = "{store}"
data_dir = "{{data_dir}}"
health_interval = "0s"
log_level = "info"

[log]
min_free_disk = "0 B"
integrity_check = "off"
synchronous = "{synchronous}"

[mqtt]
host = "127.0.0.1"
port = {mqtt_port}
reconnect_min = "100ms"
reconnect_max = "1s"

[[mqtt.ingress]]
topic = "store/+/pos/{{device}}/transactions"
stream = "{S}"

[http]
listen = "127.0.0.1:{{http_port}}"
"#
    )
}

const LANES: usize = 4;

/// One batch of 300-byte sales per lane: `per_lane` messages with event ids `{tag}-{lane}-{i}`.
fn lane_batches(store: &str, tag: &str, per_lane: usize) -> Vec<Vec<Message>> {
    (0..LANES)
        .map(|lane| {
            (0..per_lane)
                .map(|i| {
                    json_message(
                        &format!("store/{store}/pos/lane-{lane}/transactions"),
                        &format!("{tag}-{lane}-{i}"),
                        i,
                        300,
                    )
                })
                .collect()
        })
        .collect()
}

fn event_ids(batches: &[Vec<Message>]) -> Vec<String> {
    batches
        .iter()
        .flatten()
        .map(|m| {
            let v: serde_json::Value = serde_json::from_slice(&m.payload).unwrap();
            v["event_id"].as_str().unwrap().to_string()
        })
        .collect()
}

/// Readiness does not wait for the broker's SUBACK, and a message published before the agent's
/// first subscription exists is not queued for it: probe until one reaches the log.
fn wait_subscribed(agent: &Agent, port: u16, store: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    for k in 0.. {
        let id = format!("probe-{k}");
        let m = json_message(
            &format!("store/{store}/pos/probe/transactions"),
            &id,
            k,
            100,
        );
        let (p, _) = spawn_paced_publisher(
            port,
            &format!("{store}-probe"),
            vec![m],
            1,
            Duration::from_secs(30),
            None,
        );
        assert_eq!(p.join().unwrap().acked, 1);
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            if event_id_counts(&agent.read_stream(S)).contains_key(&id) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert!(
            Instant::now() < deadline,
            "the agent never subscribed\n{}",
            agent.log()
        );
    }
}

/// What a run of power cuts left.
struct Outcome {
    cycles: usize,
    acked: usize,
    /// Acknowledged sales not in the log at the end, by the cycle whose batch they were in.
    lost_by_cycle: HashMap<String, usize>,
    lost: usize,
    /// Cuts that found unsynced bytes in the WAL (a commit was being written).
    cuts_mid_commit: usize,
    wal_bytes_dropped: u64,
    records: usize,
    elapsed: Duration,
}

/// The log on disk is consistent: seq 1..=n with no hole, each event id once.
fn check_consistent(data_dir: &Path, when: &str) -> Vec<String> {
    let recs = read_stream(data_dir, S);
    for (i, r) in recs.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1, "{when}: seq not dense at record {i}");
    }
    let counts = event_id_counts(&recs);
    let dups: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.is_empty(),
        "{when}: duplicate sales in the log: {dups:?}"
    );
    recs.into_iter()
        .filter_map(|r| r.event.event_id.clone())
        .collect()
}

/// `cycles` power cuts of the agent while four POS lanes publish QoS 1 sales through Mosquitto.
/// Each cycle: start publishing a batch (`per_lane` sales per lane at `rate` sales/s in all),
/// cut the power at a random moment while it is published (kill -9 + drop unsynced + unmount),
/// power on, check what survived, restart the agent; the broker acknowledges the rest of the
/// batch meanwhile and queues it for the agent's session. At the end every sale the broker
/// acknowledged must be in the log exactly once (when `expect_all`), or the harness reports
/// which were lost.
fn run_power_cuts(synchronous: &str, cycles: usize, per_lane: usize, rate: f64) -> Outcome {
    let t0 = Instant::now();
    let mosq = Mosquitto::start();
    let store = format!("pc-{}", fastrand::u32(..));
    let mut agent = Agent::configure(agent_bin!(), &agent_config(&store, mosq.port, synchronous));
    let backing = agent.dir.path().join("backing");
    let data = agent.data_dir();
    let mut fs = mount(&backing, &data);
    agent.spawn();
    wait_subscribed(&agent, mosq.port, &store);
    let batch_secs = (per_lane * LANES) as f64 / rate;
    let mut acked: Vec<String> = Vec::new();
    let mut durable: HashSet<String> = HashSet::new();
    let (mut cuts_mid_commit, mut wal_bytes_dropped) = (0, 0);
    for c in 0..cycles {
        let batches = lane_batches(&store, &format!("c{c}"), per_lane);
        let ids = event_ids(&batches);
        let publishers: Vec<_> = batches
            .into_iter()
            .enumerate()
            .map(|(lane, msgs)| {
                spawn_paced_publisher(
                    mosq.port,
                    &format!("{store}-lane-{lane}"),
                    msgs,
                    100,
                    Duration::from_secs(120),
                    Some(rate / LANES as f64),
                )
            })
            .collect();
        std::thread::sleep(Duration::from_secs_f64(
            batch_secs * (0.1 + 0.8 * fastrand::f64()),
        ));
        // The rate cap makes this hold by construction: the cut lands during live ingest.
        assert!(publishers.iter().all(|(_, p)| p.acked() < per_lane));
        agent.kill9();
        let cut = fs.power_cut();
        let wal = cut
            .unsynced_by_file
            .iter()
            .filter(|(f, _)| f.ends_with("-wal"))
            .map(|(_, b)| *b)
            .sum::<u64>();
        if wal > 0 {
            cuts_mid_commit += 1;
        }
        wal_bytes_dropped += wal;
        eprintln!(
            "{synchronous} cut {c}: dropped {} unsynced bytes ({:?}), {} uncommitted namespace changes; {} fsyncs, {} directory fsyncs since power-on",
            cut.unsynced_bytes,
            cut.unsynced_by_file,
            cut.uncommitted_namespace_ops,
            cut.stats.fsyncs,
            cut.stats.dir_fsyncs
        );
        fs = mount(&backing, &data);
        // What survived is a consistent log that still holds everything that survived before.
        let now: HashSet<String> = check_consistent(&data, &format!("after cut {c}"))
            .into_iter()
            .collect();
        let gone: Vec<_> = durable.difference(&now).take(5).collect();
        assert!(
            gone.is_empty(),
            "cut {c}: records that had survived earlier cuts vanished, e.g. {gone:?}"
        );
        durable = now;
        agent.spawn();
        for (p, _) in publishers {
            assert_eq!(p.join().unwrap().acked, per_lane);
        }
        acked.extend(ids);
    }
    // A last sale per lane after the last restart: Mosquitto delivers a session's messages in
    // order, so once these are in the log, everything queued before them was delivered.
    let last = lane_batches(&store, "last", 1);
    acked.extend(event_ids(&last));
    for (lane, msgs) in last.into_iter().enumerate() {
        let (p, _) = spawn_paced_publisher(
            mosq.port,
            &format!("{store}-lane-{lane}"),
            msgs,
            1,
            Duration::from_secs(60),
            None,
        );
        assert_eq!(p.join().unwrap().acked, 1);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let have: HashSet<String> = check_consistent(&data, "at the end").into_iter().collect();
        if (0..LANES).all(|l| have.contains(&format!("last-{l}-0"))) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the last sales never reached the log\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    if synchronous == "full" {
        wait_records(&agent, S, acked.len() as u64, Duration::from_secs(60));
    }
    let have: HashSet<String> = check_consistent(&data, "at the end")
        .into_iter()
        .filter(|id| !id.starts_with("probe-"))
        .collect();
    let mut lost_by_cycle: HashMap<String, usize> = HashMap::new();
    let mut lost = 0;
    for id in &acked {
        if !have.contains(id) {
            lost += 1;
            *lost_by_cycle
                .entry(id.split('-').next().unwrap_or("").to_string())
                .or_default() += 1;
        }
    }
    let unexpected = have.len() + lost - acked.len();
    assert_eq!(unexpected, 0, "the log holds sales nobody published");
    agent.kill9();
    fs.power_cut();
    Outcome {
        cycles,
        acked: acked.len(),
        lost_by_cycle,
        lost,
        cuts_mid_commit,
        wal_bytes_dropped,
        records: have.len(),
        elapsed: t0.elapsed(),
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut by: Vec<_> = self.lost_by_cycle.iter().collect();
        by.sort();
        write!(
            f,
            "{} power cuts in {:.1?}: {} sales acknowledged by the broker, {} in the log, {} lost \
             (by batch: {by:?}); {} cuts dropped unsynced WAL bytes ({} bytes in all)",
            self.cycles,
            self.elapsed,
            self.acked,
            self.records,
            self.lost,
            self.cuts_mid_commit,
            self.wal_bytes_dropped
        )
    }
}

/// PRODUCT.md guarantee 1 under 20 simulated power cuts: with `synchronous = "full"` (the
/// default) no acknowledged sale is lost, none is stored twice, and seq stays dense.
#[test]
fn twenty_power_cuts_during_ingest_lose_no_acknowledged_sale() {
    let o = run_power_cuts("full", 20, 150, 600.0);
    eprintln!("synchronous=full: {o}");
    assert_eq!(o.lost, 0, "{o}");
    assert_eq!(o.records, o.acked, "{o}");
}

/// The negative control: the same cycle with `synchronous = "normal"` must lose acknowledged
/// sales, or the test above could not fail. With NORMAL, SQLite does not fsync the WAL at a
/// commit, only before a checkpoint (the agent's housekeeper runs one every 250 ms), so the agent
/// acknowledges sales whose commit is still only in the page cache; the cut drops it, and the
/// broker, which got the PUBACK, never sends them again.
#[test]
fn the_control_with_synchronous_normal_loses_acknowledged_sales() {
    let o = run_power_cuts("normal", 10, 150, 600.0);
    eprintln!("synchronous=normal (control): {o}");
    assert!(o.lost > 0, "the harness did not detect a loss: {o}");
}
