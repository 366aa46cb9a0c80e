//! The log contract: one generic test body per behaviour, run against every engine and durability
//! mode (the `contract_suite!` invocations at the bottom). A new engine adds one line there.
#![cfg(test)]

use super::*;
use edge_core::{Event, Record};
use std::path::Path;
use std::time::Duration;

/// A storage engine under test.
pub(crate) trait Engine {
    type L: Log + std::fmt::Debug;
    fn config() -> LogConfig;
    fn open(dir: &Path, cfg: LogConfig) -> Result<Self::L, LogError>;
    /// Damages one stored record the way bit rot would.
    fn corrupt_record(dir: &Path, cfg: &LogConfig, stream: &str, seq: u64);
    /// Damages the database file beyond opening.
    fn corrupt_file(dir: &Path, cfg: &LogConfig);
    /// Overwrites one storage page in the middle of the file (damage a per-record CRC cannot see).
    fn corrupt_page(dir: &Path, cfg: &LogConfig);
    /// From now on, the open log refuses any record with this payload while writing it, inside
    /// the commit (as storage refuses a value too big or a constraint it breaks), not in the
    /// checks before it.
    fn refuse_in_commit(dir: &Path, cfg: &LogConfig, payload: &[u8]);
    /// Longest entry of the dedup index in bytes (id and source together).
    fn longest_dedup_entry(dir: &Path, cfg: &LogConfig) -> u64;
}

pub(crate) struct SqliteFull;
pub(crate) struct SqliteNormal;

fn sqlite_corrupt_record(dir: &Path, cfg: &LogConfig, stream: &str, seq: u64) {
    let path = sqlite::db_path(dir, cfg);
    let conn = rusqlite::Connection::open(path).expect("open for corruption");
    let sid: i64 = conn
        .query_row("SELECT id FROM streams WHERE name = ?1", [stream], |r| {
            r.get(0)
        })
        .expect("stream exists");
    let n = conn
        .execute(
            "UPDATE records SET payload = CAST('bit rot' AS BLOB) WHERE id = ?1",
            [sqlite::queries::row_id(sid, seq)],
        )
        .expect("corrupt");
    assert_eq!(n, 1, "the record to corrupt exists");
}

fn sqlite_corrupt_page(dir: &Path, cfg: &LogConfig) {
    use std::io::{Seek, SeekFrom, Write};
    let path = sqlite::db_path(dir, cfg);
    let len = std::fs::metadata(&path).expect("db").len();
    let page = 4096u64;
    let pages = len / page;
    assert!(
        pages > 20,
        "the test needs a database of more than 20 pages"
    );
    // A leaf of the records tree near the end of the file (streams and meta live at the start).
    let target = (pages - 5) * page;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .expect("open db");
    f.seek(SeekFrom::Start(target)).expect("seek");
    f.write_all(&[0xA5; 4096]).expect("write");
    f.sync_all().expect("sync");
}

fn sqlite_refuse_in_commit(dir: &Path, cfg: &LogConfig, payload: &[u8]) {
    let conn = rusqlite::Connection::open(sqlite::db_path(dir, cfg)).expect("open");
    conn.busy_timeout(Duration::from_secs(5))
        .expect("busy timeout");
    let hex: String = payload.iter().map(|b| format!("{b:02x}")).collect();
    // The writer's prepared statements are re-prepared by SQLite after the schema change.
    conn.execute_batch(&format!(
        "CREATE TRIGGER refuse_in_commit BEFORE INSERT ON records WHEN NEW.payload = X'{hex}'
         BEGIN SELECT RAISE(ABORT, 'refused by the test'); END"
    ))
    .expect("create trigger");
}

fn sqlite_longest_dedup_entry(dir: &Path, cfg: &LogConfig) -> u64 {
    let conn = rusqlite::Connection::open(sqlite::db_path(dir, cfg)).expect("open");
    conn.query_row(
        "SELECT coalesce(max(length(CAST(event_id AS BLOB)) + length(CAST(source AS BLOB))), 0) FROM dedup",
        [],
        |r| r.get::<_, i64>(0),
    )
    .expect("dedup entries") as u64
}

fn sqlite_corrupt_file(dir: &Path, cfg: &LogConfig) {
    let path = sqlite::db_path(dir, cfg);
    let _ = std::fs::remove_file(format!("{}-wal", path.display()));
    let _ = std::fs::remove_file(format!("{}-shm", path.display()));
    std::fs::write(&path, vec![0x5a; 64 * 1024]).expect("overwrite");
}

impl Engine for SqliteFull {
    type L = SqliteLog;
    fn config() -> LogConfig {
        LogConfig {
            integrity_check: IntegrityCheck::Off,
            ..LogConfig::default()
        }
    }
    fn open(dir: &Path, cfg: LogConfig) -> Result<SqliteLog, LogError> {
        SqliteLog::open(dir, cfg)
    }
    fn corrupt_record(dir: &Path, cfg: &LogConfig, stream: &str, seq: u64) {
        sqlite_corrupt_record(dir, cfg, stream, seq)
    }
    fn corrupt_file(dir: &Path, cfg: &LogConfig) {
        sqlite_corrupt_file(dir, cfg)
    }
    fn corrupt_page(dir: &Path, cfg: &LogConfig) {
        sqlite_corrupt_page(dir, cfg)
    }
    fn refuse_in_commit(dir: &Path, cfg: &LogConfig, payload: &[u8]) {
        sqlite_refuse_in_commit(dir, cfg, payload)
    }
    fn longest_dedup_entry(dir: &Path, cfg: &LogConfig) -> u64 {
        sqlite_longest_dedup_entry(dir, cfg)
    }
}

impl Engine for SqliteNormal {
    type L = SqliteLog;
    fn config() -> LogConfig {
        LogConfig {
            synchronous: Synchronous::Normal,
            integrity_check: IntegrityCheck::Blocking,
            ..LogConfig::default()
        }
    }
    fn open(dir: &Path, cfg: LogConfig) -> Result<SqliteLog, LogError> {
        SqliteLog::open(dir, cfg)
    }
    fn corrupt_record(dir: &Path, cfg: &LogConfig, stream: &str, seq: u64) {
        sqlite_corrupt_record(dir, cfg, stream, seq)
    }
    fn corrupt_file(dir: &Path, cfg: &LogConfig) {
        sqlite_corrupt_file(dir, cfg)
    }
    fn corrupt_page(dir: &Path, cfg: &LogConfig) {
        sqlite_corrupt_page(dir, cfg)
    }
    fn refuse_in_commit(dir: &Path, cfg: &LogConfig, payload: &[u8]) {
        sqlite_refuse_in_commit(dir, cfg, payload)
    }
    fn longest_dedup_entry(dir: &Path, cfg: &LogConfig) -> u64 {
        sqlite_longest_dedup_entry(dir, cfg)
    }
}

fn ev(stream: &str, i: u64) -> Event {
    Event::new(stream, format!("{{\"i\":{i}}}").into_bytes())
        .with_event_ts(1_700_000_000_000 + i as i64)
        .with_key("lane-1")
}

fn open<E: Engine>(dir: &Path) -> E::L {
    E::open(dir, E::config()).expect("open log")
}

async fn read_all<L: Log>(log: &L, stream: &str) -> Vec<Record> {
    let mut out = Vec::new();
    let mut from = 1;
    loop {
        let b = log
            .read(
                stream,
                from,
                ReadLimits {
                    max_records: 333,
                    max_bytes: 1 << 20,
                },
            )
            .await
            .expect("read");
        if b.records.is_empty() && b.quarantined.is_empty() {
            return out;
        }
        from = b.next_seq;
        out.extend(b.records);
    }
}

pub(crate) async fn seq_is_dense_per_stream_and_payloads_round_trip<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let log = open::<E>(dir.path());
    let mut events = Vec::new();
    for i in 0..500 {
        events.push(ev(if i % 3 == 0 { "a.one" } else { "b.two" }, i).with_header("h", "v"));
    }
    let out = log
        .append(AppendRequest::events(events.clone()))
        .await
        .unwrap();
    let (mut a, mut b) = (0, 0);
    for (e, r) in events.iter().zip(&out.appended) {
        let expect = if &*e.stream == "a.one" {
            a += 1;
            a
        } else {
            b += 1;
            b
        };
        assert_eq!(*r, Appended::New { seq: expect });
    }
    let got = read_all(&log, "b.two").await;
    assert_eq!(got.len(), b as usize);
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.seq, i as u64 + 1);
    }
    let src: Vec<&Event> = events.iter().filter(|e| &*e.stream == "b.two").collect();
    for (r, e) in got.iter().zip(src) {
        assert_eq!(&r.event, e, "stored event equals the submitted one");
    }
    assert_eq!(log.next_seq("a.one"), Some(a + 1));
    log.close().await.unwrap();
}

pub(crate) async fn requests_apply_in_submission_order<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let log = open::<E>(dir.path());
    let mut tickets = Vec::new();
    for i in 0..2000 {
        tickets.push(log.submit(AppendRequest::one(ev("s", i))).await.unwrap());
    }
    for (i, t) in tickets.into_iter().enumerate() {
        assert_eq!(t.await.unwrap().appended[0].seq(), i as u64 + 1);
    }
    let got = read_all(&log, "s").await;
    for (i, r) in got.iter().enumerate() {
        assert_eq!(r.event.payload, ev("s", i as u64).payload);
    }
    log.close().await.unwrap();
}

pub(crate) async fn concurrent_writers_get_unique_dense_seqs<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let log = std::sync::Arc::new(open::<E>(dir.path()));
    let mut tasks = Vec::new();
    for w in 0..8u64 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..250 {
                let o = log
                    .append(AppendRequest::one(ev("shared", w * 1000 + i)))
                    .await
                    .unwrap();
                seqs.push(o.appended[0].seq());
            }
            seqs
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        let seqs = t.await.unwrap();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "one writer's seqs increase"
        );
        all.extend(seqs);
    }
    all.sort_unstable();
    assert_eq!(all, (1..=2000).collect::<Vec<u64>>());
    log.close().await.unwrap();
}

pub(crate) async fn records_epoch_and_seq_survive_reopen<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let log = open::<E>(dir.path());
    let epoch = log.epoch();
    log.append(AppendRequest::events((0..10).map(|i| ev("s", i)).collect()))
        .await
        .unwrap();
    log.close().await.unwrap();
    assert!(matches!(
        log.append(AppendRequest::one(ev("s", 99))).await,
        Err(LogError::Closed)
    ));
    drop(log);
    let log = open::<E>(dir.path());
    assert_eq!(log.epoch(), epoch, "reopening keeps the epoch");
    let o = log.append(AppendRequest::one(ev("s", 10))).await.unwrap();
    assert_eq!(o.appended[0], Appended::New { seq: 11 }, "seq continues");
    assert_eq!(read_all(&log, "s").await.len(), 11);
    log.close().await.unwrap();
    drop(log);
    // A wiped disk is a new incarnation.
    let dir2 = tempfile::tempdir().unwrap();
    let other = open::<E>(dir2.path());
    assert_ne!(other.epoch(), epoch);
    other.close().await.unwrap();
}

pub(crate) async fn second_open_of_same_log_is_refused<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let log = open::<E>(dir.path());
    match E::open(dir.path(), E::config()) {
        Err(LogError::Locked { .. }) => {}
        other => panic!("expected Locked, got {other:?}"),
    }
    log.close().await.unwrap();
}

pub(crate) async fn event_ids_are_stored_once_per_stream<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let log = open::<E>(dir.path());
    let first = log
        .append(AppendRequest::one(
            ev("pos.transactions", 1).with_event_id("tx-1"),
        ))
        .await
        .unwrap();
    let again = log
        .append(AppendRequest::events(vec![
            ev("pos.transactions", 2).with_event_id("tx-1"),
            ev("pos.transactions", 3).with_event_id("tx-2"),
            ev("pos.transactions", 4).with_event_id("tx-2"),
            ev("other.stream", 5).with_event_id("tx-1"),
        ]))
        .await
        .unwrap();
    assert_eq!(first.appended[0], Appended::New { seq: 1 });
    assert_eq!(
        again.appended,
        vec![
            Appended::Duplicate { seq: 1 },
            Appended::New { seq: 2 },
            Appended::Duplicate { seq: 2 },
            Appended::New { seq: 1 },
        ]
    );
    log.close().await.unwrap();
    drop(log);
    let log = open::<E>(dir.path());
    let after = log
        .append(AppendRequest::one(
            ev("pos.transactions", 9).with_event_id("tx-2"),
        ))
        .await
        .unwrap();
    assert_eq!(
        after.appended[0],
        Appended::Duplicate { seq: 2 },
        "dedup survives restart"
    );
    assert_eq!(read_all(&log, "pos.transactions").await.len(), 2);
    log.close().await.unwrap();
}

pub(crate) async fn dedup_window_is_bounded<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        dedup_window: 10,
        ..E::config()
    };
    let log = E::open(dir.path(), cfg).unwrap();
    for i in 0..50 {
        log.append(AppendRequest::one(
            ev("s", i).with_event_id(format!("e{i}")),
        ))
        .await
        .unwrap();
    }
    let r = log.maintain().await.unwrap();
    assert_eq!(r.dedup_forgotten, 40);
    // Recent ids are still recognised, the oldest are forgotten (and would be stored again).
    let recent = log
        .append(AppendRequest::one(ev("s", 49).with_event_id("e49")))
        .await
        .unwrap();
    assert!(recent.appended[0].is_duplicate());
    let old = log
        .append(AppendRequest::one(ev("s", 0).with_event_id("e0")))
        .await
        .unwrap();
    assert!(!old.appended[0].is_duplicate());
    log.close().await.unwrap();
}

pub(crate) async fn cursors_and_kv_commit_with_events<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let log = open::<E>(dir.path());
    assert_eq!(log.cursor("uplink", "s").await.unwrap(), None);
    log.append(AppendRequest {
        events: vec![ev("s", 1), ev("s", 2)],
        cursors: vec![CursorMove {
            cursor: "uplink".into(),
            stream: "s".into(),
            next_seq: 2,
        }],
        kv: vec![("downlink.offsets".into(), b"p0=42".to_vec())],
    })
    .await
    .unwrap();
    log.append(AppendRequest::cursor("egress", "s", 3))
        .await
        .unwrap();
    log.close().await.unwrap();
    drop(log);
    let log = open::<E>(dir.path());
    assert_eq!(log.cursor("uplink", "s").await.unwrap(), Some(2));
    assert_eq!(log.cursor("egress", "s").await.unwrap(), Some(3));
    assert_eq!(
        log.kv_get("downlink.offsets").await.unwrap().as_deref(),
        Some(&b"p0=42"[..])
    );
    let names: Vec<String> = log
        .cursors()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.cursor)
        .collect();
    assert_eq!(names, vec!["egress".to_string(), "uplink".to_string()]);
    log.close().await.unwrap();
}

pub(crate) async fn invalid_requests_fail_alone<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let log = open::<E>(dir.path());
    let bad = log
        .submit(AppendRequest::one(ev("Not A Stream", 1)))
        .await
        .unwrap();
    let good = log.submit(AppendRequest::one(ev("s", 1))).await.unwrap();
    assert!(matches!(bad.await, Err(LogError::Invalid(_))));
    assert_eq!(good.await.unwrap().appended[0].seq(), 1);
    log.close().await.unwrap();
}

/// A request the log refuses while writing it (inside the group commit, after the checks before
/// it) fails alone: the requests that shared its batch commit, with dense seqs.
pub(crate) async fn a_request_refused_in_the_commit_fails_alone<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = E::config();
    let log = E::open(dir.path(), cfg.clone()).unwrap();
    log.append(AppendRequest::one(ev("s", 0))).await.unwrap();
    let poison = b"{\"poison\":true}".to_vec();
    E::refuse_in_commit(dir.path(), &cfg, &poison);
    // Submitted without waiting, so that the writer seals many of them into each batch.
    let mut tickets = Vec::new();
    for i in 1..=600u64 {
        let req = if i % 20 == 0 {
            AppendRequest {
                events: vec![ev("s", i), Event::new("s", poison.clone())],
                cursors: vec![CursorMove {
                    cursor: "poisoned".into(),
                    stream: "s".into(),
                    next_seq: i,
                }],
                kv: vec![(format!("poisoned.{i}"), b"x".to_vec())],
            }
        } else {
            AppendRequest {
                events: vec![ev("s", i), ev("other.stream", i)],
                cursors: vec![CursorMove {
                    cursor: "good".into(),
                    stream: "s".into(),
                    next_seq: i,
                }],
                kv: vec![],
            }
        };
        tickets.push((i, log.submit(req).await.unwrap()));
    }
    let mut seqs = Vec::new();
    for (i, t) in tickets {
        match t.await {
            Ok(o) if i % 20 != 0 => seqs.push(o.appended[0].seq()),
            Err(LogError::Invalid(_)) if i % 20 == 0 => {}
            other => panic!("request {i}: unexpected outcome {other:?}"),
        }
    }
    assert_eq!(
        seqs,
        (2..=571).collect::<Vec<u64>>(),
        "good requests, dense seqs"
    );
    let got = read_all(&log, "s").await;
    assert_eq!(got.len(), 571);
    assert!(got.iter().all(|r| r.event.payload != poison));
    let want: Vec<u64> = (0..=600).filter(|i| i % 20 != 0 || *i == 0).collect();
    for (r, i) in got.iter().zip(want) {
        assert_eq!(r.event.payload, ev("s", i).payload, "record {i} in order");
    }
    assert_eq!(read_all(&log, "other.stream").await.len(), 570);
    // A refused request's side effects are rolled back with it; the others' are committed.
    assert_eq!(log.cursor("good", "s").await.unwrap(), Some(599));
    assert_eq!(log.cursor("poisoned", "s").await.unwrap(), None);
    assert_eq!(log.kv_get("poisoned.20").await.unwrap(), None);
    // Seqs continue densely after the refusals.
    let o = log.append(AppendRequest::one(ev("s", 601))).await.unwrap();
    assert_eq!(o.appended[0], Appended::New { seq: 572 });
    log.close().await.unwrap();
    drop(log);
    let log = E::open(dir.path(), cfg).unwrap();
    assert_eq!(
        log.next_seq("s"),
        Some(573),
        "stream counters committed as applied"
    );
    assert_eq!(read_all(&log, "s").await.len(), 572);
    log.close().await.unwrap();
}

/// Dedup is scoped per (stream, source): one device's event ids never suppress another's, and
/// an id of any length is recognised while the dedup index stays bounded per entry.
pub(crate) async fn event_ids_are_scoped_per_source<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = E::config();
    let log = E::open(dir.path(), cfg.clone()).unwrap();
    let sale =
        |src: &str, id: &str, i: u64| ev("pos.receipts", i).with_source(src).with_event_id(id);
    let long_a = format!("{}a", "r".repeat(4000));
    let long_b = format!("{}b", "r".repeat(4000));
    let long_src = "printer-".repeat(100);
    let out = log
        .append(AppendRequest::events(vec![
            sale("printer-1", "0001", 1),
            sale("printer-2", "0001", 2),
            sale("printer-1", "0001", 3),
            ev("pos.receipts", 4).with_event_id("0001"),
            sale("printer-1", &long_a, 5),
            sale("printer-1", &long_b, 6),
            sale("printer-1", &long_a, 7),
            sale(&long_src, "0001", 8),
            sale(&long_src, "0001", 9),
        ]))
        .await
        .unwrap();
    assert_eq!(
        out.appended,
        vec![
            Appended::New { seq: 1 },
            Appended::New { seq: 2 },
            Appended::Duplicate { seq: 1 },
            Appended::New { seq: 3 },
            Appended::New { seq: 4 },
            Appended::New { seq: 5 },
            Appended::Duplicate { seq: 4 },
            Appended::New { seq: 6 },
            Appended::Duplicate { seq: 6 },
        ]
    );
    let got = read_all(&log, "pos.receipts").await;
    assert_eq!(
        got[3].event.event_id.as_deref(),
        Some(long_a.as_str()),
        "the record keeps its full id"
    );
    assert_eq!(got[5].event.source.as_deref(), Some(long_src.as_str()));
    log.close().await.unwrap();
    drop(log);
    assert!(
        E::longest_dedup_entry(dir.path(), &cfg) <= 2 * 71,
        "dedup entries are bounded in bytes"
    );
    let log = E::open(dir.path(), cfg).unwrap();
    let again = log
        .append(AppendRequest::events(vec![
            sale("printer-2", "0001", 10),
            sale("printer-1", &long_b, 11),
            sale("printer-3", "0001", 12),
        ]))
        .await
        .unwrap();
    assert_eq!(
        again.appended,
        vec![
            Appended::Duplicate { seq: 2 },
            Appended::Duplicate { seq: 5 },
            Appended::New { seq: 7 },
        ],
        "the scope survives a restart"
    );
    log.close().await.unwrap();
}

pub(crate) async fn reads_respect_limits_and_resume<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let log = open::<E>(dir.path());
    log.append(AppendRequest::events(
        (0..100).map(|i| ev("s", i)).collect(),
    ))
    .await
    .unwrap();
    let b = log
        .read(
            "s",
            41,
            ReadLimits {
                max_records: 10,
                max_bytes: 1 << 20,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        b.records.iter().map(|r| r.seq).collect::<Vec<_>>(),
        (41..=50).collect::<Vec<_>>()
    );
    assert_eq!(b.next_seq, 51);
    let b = log
        .read(
            "s",
            95,
            ReadLimits {
                max_records: 1,
                max_bytes: 1,
            },
        )
        .await
        .unwrap();
    assert_eq!(
        b.records.len(),
        1,
        "a read returns at least one record even over max_bytes"
    );
    let b = log.read("s", 101, ReadLimits::default()).await.unwrap();
    assert!(b.records.is_empty());
    assert_eq!(b.next_seq, 101);
    let b = log.read("unknown", 1, ReadLimits::default()).await.unwrap();
    assert!(b.records.is_empty());
    log.close().await.unwrap();
}

pub(crate) async fn subscribers_wake_on_commit<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let log = std::sync::Arc::new(open::<E>(dir.path()));
    let mut rx = log.subscribe();
    rx.borrow_and_update();
    let l2 = log.clone();
    let waiter = tokio::spawn(async move {
        rx.changed().await.unwrap();
        l2.next_seq("s")
    });
    log.append(AppendRequest::one(ev("s", 1))).await.unwrap();
    let seen = tokio::time::timeout(Duration::from_secs(5), waiter)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(seen, Some(2));
    log.close().await.unwrap();
}

pub(crate) async fn retention_removes_only_old_mirrored_records<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        retention: Some(Duration::from_millis(1)),
        ..E::config()
    };
    let log = E::open(dir.path(), cfg).unwrap();
    log.append(AppendRequest::events(
        (0..100).map(|i| ev("pos.transactions", i)).collect(),
    ))
    .await
    .unwrap();
    log.append(AppendRequest::events(
        (0..10).map(|i| ev("local.only", i)).collect(),
    ))
    .await
    .unwrap();
    // The uplink has mirrored seq 1..=60.
    log.append(AppendRequest::cursor("uplink", "pos.transactions", 61))
        .await
        .unwrap();
    // Let the records age past the 1 ms retention (time passing is the subject here).
    tokio::time::sleep(Duration::from_millis(20)).await;
    let r = log.maintain().await.unwrap();
    assert_eq!(r.retention_deleted, 60, "only mirrored records expire");
    let left = read_all(&log, "pos.transactions").await;
    assert_eq!(left.first().map(|r| r.seq), Some(61));
    assert_eq!(left.len(), 40);
    assert!(
        log.gaps(0, 10).await.unwrap().is_empty(),
        "retention of mirrored records is no gap"
    );
    let s = log.streams().await.unwrap();
    let t = s.iter().find(|s| s.name == "pos.transactions").unwrap();
    assert_eq!((t.first_seq, t.next_seq, t.records), (61, 101, 40));
    log.close().await.unwrap();
}

/// Issue 12: the `hq.*` streams are protected and never mirrored, so they kept every price
/// update ever. They keep the newest record of each entity key plus a history. A key that only
/// routes a record to stores (`*`, the store id: HQ's downlink addressing) names no entity, so
/// such records are all kept; other streams are not touched.
pub(crate) async fn downlink_streams_keep_the_latest_record_per_key<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = E::config();
    cfg.streams.insert(
        "hq.prices".into(),
        StreamSettings {
            history: Some(10),
            ..Default::default()
        },
    );
    let log = E::open(dir.path(), cfg).unwrap();
    let price = |k: u64, v: u64| {
        Event::new(
            "hq.prices",
            format!("{{\"sku\":{k},\"v\":{v}}}").into_bytes(),
        )
        .with_event_ts(1_700_000_000_000)
        .with_key(format!("sku-{k}"))
        .with_header("edge.store", "*")
    };
    // 30 price sets of 20 products, oldest first.
    for v in 0..30 {
        log.append(AppendRequest::events(
            (0..20).map(|k| price(k, v)).collect(),
        ))
        .await
        .unwrap();
    }
    log.append(AppendRequest::events(
        (0..600).map(|i| ev("pos.transactions", i)).collect(),
    ))
    .await
    .unwrap();
    log.append(AppendRequest::events(
        (0..300)
            .map(|i| {
                let e = Event::new("hq.commands", format!("{{\"n\":{i}}}").into_bytes());
                // Routed by key: for all stores, or for this one.
                if i % 2 == 0 {
                    e.with_key("*")
                } else {
                    e.with_key("store-7")
                }
            })
            .collect(),
    ))
    .await
    .unwrap();
    log.append(AppendRequest::cursor("commands", "hq.commands", 151))
        .await
        .unwrap();
    let r = log.maintain().await.unwrap();
    let prices = read_all(&log, "hq.prices").await;
    assert_eq!(prices.len(), 20, "one record per product is left");
    let mut skus: Vec<String> = prices.iter().filter_map(|r| r.event.key.clone()).collect();
    skus.sort();
    skus.dedup();
    assert_eq!(skus.len(), 20, "every product keeps its price");
    assert!(
        prices
            .iter()
            .all(|r| String::from_utf8_lossy(&r.event.payload).contains("\"v\":29")),
        "the kept record of each product is its newest"
    );
    assert_eq!(
        read_all(&log, "hq.commands").await.len(),
        300,
        "records whose key only routes them (`*`, the store id) are all kept"
    );
    assert_eq!(
        read_all(&log, "pos.transactions").await.len(),
        600,
        "a stream that is not compacted keeps every record"
    );
    assert_eq!(r.compacted, 580);
    assert!(
        log.gaps(0, 10).await.unwrap().is_empty(),
        "compaction is no gap"
    );
    let s = log.streams().await.unwrap();
    let t = s.iter().find(|s| s.name == "hq.prices").unwrap();
    assert_eq!((t.records, t.next_seq), (20, 601));
    // A new price for one product: the stream does not grow past its keys plus its history.
    for v in 30..100 {
        log.append(AppendRequest::events(vec![price(3, v)]))
            .await
            .unwrap();
        log.maintain().await.unwrap();
    }
    let prices = read_all(&log, "hq.prices").await;
    assert!(
        prices.len() <= 2 * (20 + 10),
        "the stream stays bounded: {} records",
        prices.len()
    );
    assert!(
        prices
            .iter()
            .any(|r| String::from_utf8_lossy(&r.event.payload).contains("\"v\":99")),
        "the newest price is there"
    );
    log.close().await.unwrap();
}

pub(crate) async fn retention_forever_keeps_everything<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        retention: None,
        ..E::config()
    };
    let log = E::open(dir.path(), cfg).unwrap();
    log.append(AppendRequest::events((0..10).map(|i| ev("s", i)).collect()))
        .await
        .unwrap();
    log.append(AppendRequest::cursor("uplink", "s", 11))
        .await
        .unwrap();
    assert_eq!(log.maintain().await.unwrap().retention_deleted, 0);
    assert_eq!(read_all(&log, "s").await.len(), 10);
    log.close().await.unwrap();
}

fn big(stream: &str, i: u64) -> Event {
    Event::new(stream, vec![b'x'; 1000]).with_event_ts(i as i64)
}

pub(crate) async fn budget_evicts_lowest_class_first_with_gaps<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        disk_budget: ByteSize::mib(2),
        min_free_disk: ByteSize::b(0),
        ..E::config()
    };
    let log = E::open(dir.path(), cfg).unwrap();
    // 0.6 MB protected and 0.6 MB high fit; 1.5 MB of low sightings push past the 2 MiB budget.
    log.append(AppendRequest::events(
        (0..600).map(|i| big("pos.transactions", i)).collect(),
    ))
    .await
    .unwrap();
    log.append(AppendRequest::events(
        (0..600).map(|i| big("presence.events", i)).collect(),
    ))
    .await
    .unwrap();
    for chunk in 0..15 {
        log.append(AppendRequest::events(
            (0..100)
                .map(|i| big("beacon.sightings", chunk * 100 + i))
                .collect(),
        ))
        .await
        .unwrap();
    }
    log.maintain().await.unwrap();
    let usage = log.usage().await.unwrap();
    assert!(
        usage.used_bytes <= ByteSize::mib(2).as_u64(),
        "back under budget: {usage:?}"
    );
    assert!(!usage.full);
    assert_eq!(
        read_all(&log, "pos.transactions").await.len(),
        600,
        "protected records are never evicted"
    );
    assert_eq!(
        read_all(&log, "presence.events").await.len(),
        600,
        "high class is kept while low can go"
    );
    let low_left = read_all(&log, "beacon.sightings").await;
    assert!(
        low_left.len() < 1500 && !low_left.is_empty(),
        "low class was evicted, only as much as needed: {} left",
        low_left.len()
    );
    let first = low_left.first().unwrap().seq;
    assert_eq!(
        first,
        1500 - low_left.len() as u64 + 1,
        "oldest records go first, newest stay"
    );
    let gaps = log.gaps(0, 100).await.unwrap();
    let evicted: u64 = gaps
        .iter()
        .filter(|g| g.stream == "beacon.sightings")
        .map(|g| g.count)
        .sum();
    assert_eq!(evicted, first - 1, "every evicted record is in a gap");
    assert!(
        gaps.iter()
            .all(|g| g.reason.contains("budget") && g.stream == "beacon.sightings")
    );
    let summary = log.gap_summary().await.unwrap();
    assert_eq!(summary.len(), 1, "{summary:?}");
    assert_eq!(
        (
            summary[0].stream.as_str(),
            summary[0].kind.as_str(),
            summary[0].ranges,
            summary[0].records
        ),
        ("beacon.sightings", "evicted", gaps.len() as u64, evicted)
    );
    // When low is gone, high goes next (never protected).
    for chunk in 0..10 {
        log.append(AppendRequest::events(
            (0..100)
                .map(|i| big("presence.events", 600 + chunk * 100 + i))
                .collect(),
        ))
        .await
        .unwrap();
    }
    assert!(
        read_all(&log, "beacon.sightings").await.is_empty(),
        "low went first"
    );
    assert!(
        read_all(&log, "presence.events").await.len() < 1600,
        "then high"
    );
    assert_eq!(read_all(&log, "pos.transactions").await.len(), 600);
    log.close().await.unwrap();
}

pub(crate) async fn protected_records_apply_backpressure_until_mirrored<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        disk_budget: ByteSize::mib(1),
        min_free_disk: ByteSize::b(0),
        ..E::config()
    };
    let log = E::open(dir.path(), cfg).unwrap();
    let mut stored = 0u64;
    let mut refused = false;
    for chunk in 0..40 {
        match log
            .append(AppendRequest::events(
                (0..50)
                    .map(|i| big("pos.transactions", chunk * 50 + i))
                    .collect(),
            ))
            .await
        {
            Ok(_) => stored += 50,
            Err(LogError::Full) => {
                refused = true;
                break;
            }
            Err(e) => panic!("unexpected {e}"),
        }
    }
    assert!(
        refused,
        "intake is refused once only unmirrored protected records remain"
    );
    assert!(log.usage().await.unwrap().full);
    assert_eq!(
        read_all(&log, "pos.transactions").await.len() as u64,
        stored,
        "nothing was evicted"
    );
    assert!(log.gaps(0, 10).await.unwrap().is_empty());
    // Cursor moves are still accepted while full; once the uplink has mirrored half, room returns.
    log.append(AppendRequest::cursor(
        "uplink",
        "pos.transactions",
        stored / 2 + 1,
    ))
    .await
    .unwrap();
    // (Eviction runs after every commit, so the cursor move itself already made room.)
    let r = log.maintain().await.unwrap();
    assert!(!r.full, "mirrored protected records may be evicted: {r:?}");
    assert!(
        log.gaps(0, 10).await.unwrap().is_empty(),
        "evicting mirrored records is no loss"
    );
    log.append(AppendRequest::one(big("pos.transactions", 9999)))
        .await
        .unwrap();
    let left = read_all(&log, "pos.transactions").await;
    assert!(left.first().unwrap().seq > 1, "mirrored records made room");
    assert_eq!(
        left.iter().filter(|r| r.seq > stored / 2).count() as u64,
        stored / 2 + 1,
        "every unmirrored record is still there"
    );
    log.close().await.unwrap();
}

pub(crate) async fn corrupt_record_is_dead_lettered_and_stream_moves_on<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = E::config();
    let log = E::open(dir.path(), cfg.clone()).unwrap();
    log.append(AppendRequest::events(
        (0..20).map(|i| ev("pos.transactions", i)).collect(),
    ))
    .await
    .unwrap();
    log.close().await.unwrap();
    drop(log);
    E::corrupt_record(dir.path(), &cfg, "pos.transactions", 7);
    let log = E::open(dir.path(), cfg).unwrap();
    let b = log
        .read("pos.transactions", 1, ReadLimits::default())
        .await
        .unwrap();
    assert_eq!(b.records.len(), 19);
    assert!(b.records.iter().all(|r| r.seq != 7));
    assert_eq!(b.next_seq, 21, "the stream moves on past the bad record");
    assert_eq!(b.quarantined.len(), 1);
    assert!(b.quarantined[0].1.contains("CRC"));
    // The quarantine is asynchronous; wait for the dead letter (poll with a deadline).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let dl = loop {
        let dl = read_all(&log, DEADLETTER_STREAM).await;
        if !dl.is_empty() || tokio::time::Instant::now() > deadline {
            break dl;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(dl.len(), 1, "one dead letter for one bad record");
    let v: serde_json::Value = serde_json::from_slice(&dl[0].event.payload).unwrap();
    assert_eq!(v["stream"], "pos.transactions");
    assert_eq!(v["seq"], 7);
    assert!(v["reason"].as_str().unwrap().contains("CRC"));
    let gaps = log.gaps(0, 10).await.unwrap();
    assert_eq!(gaps.len(), 1);
    assert_eq!(
        (gaps[0].first_seq, gaps[0].last_seq, gaps[0].count),
        (7, 7, 1)
    );
    // Reading again neither returns it nor dead-letters it twice.
    let again = log
        .read("pos.transactions", 1, ReadLimits::default())
        .await
        .unwrap();
    assert!(again.quarantined.is_empty());
    assert_eq!(again.records.len(), 19);
    assert_eq!(log.maintain().await.map(|_| ()).ok(), Some(()));
    assert_eq!(read_all(&log, DEADLETTER_STREAM).await.len(), 1);
    log.close().await.unwrap();
}

pub(crate) async fn unreadable_database_is_moved_aside_with_new_epoch<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = E::config();
    let log = E::open(dir.path(), cfg.clone()).unwrap();
    let epoch = log.epoch();
    log.append(AppendRequest::one(ev("s", 1))).await.unwrap();
    log.close().await.unwrap();
    drop(log);
    E::corrupt_file(dir.path(), &cfg);
    let log = E::open(dir.path(), cfg.clone()).expect("a damaged file does not stop the agent");
    assert_ne!(log.epoch(), epoch, "a new incarnation gets a new epoch");
    assert_eq!(log.next_seq("s"), None);
    log.close().await.unwrap();
    drop(log);
    let aside = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".corrupt-"))
        .count();
    assert!(aside >= 1, "the damaged file is kept for forensics");
    let strict = LogConfig {
        on_corrupt_open: OnCorruptOpen::Fail,
        ..cfg.clone()
    };
    E::corrupt_file(dir.path(), &cfg);
    assert!(matches!(
        E::open(dir.path(), strict),
        Err(LogError::Open { .. })
    ));
}

pub(crate) async fn integrity_check_reports_a_damaged_page<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = E::config();
    let log = E::open(dir.path(), cfg.clone()).unwrap();
    for chunk in 0..10 {
        log.append(AppendRequest::events(
            (0..100)
                .map(|i| big("pos.transactions", chunk * 100 + i))
                .collect(),
        ))
        .await
        .unwrap();
    }
    log.close().await.unwrap();
    drop(log);
    E::corrupt_page(dir.path(), &cfg);
    let blocking = LogConfig {
        integrity_check: IntegrityCheck::Blocking,
        ..cfg.clone()
    };
    let log = E::open(dir.path(), blocking).expect("a damaged page does not stop the agent");
    match log.integrity() {
        IntegrityState::Failed { problems } => assert!(!problems.is_empty()),
        other => panic!("the damaged page was not detected: {other:?}"),
    }
    // The epoch (and everything readable) is kept: a damaged page is not a reason to start over.
    assert_eq!(log.next_seq("pos.transactions"), Some(1001));
    log.close().await.unwrap();
    drop(log);
    // In the background mode the result arrives after start-up.
    let bg = LogConfig {
        integrity_check: IntegrityCheck::Background,
        ..cfg
    };
    let log = E::open(dir.path(), bg).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while matches!(
        log.integrity(),
        IntegrityState::Running | IntegrityState::NotRun
    ) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "background check finished"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(matches!(log.integrity(), IntegrityState::Failed { .. }));
    // Reading the stream does not fail on the damaged page: every seq is either returned or
    // reported, and each lost one becomes exactly one gap and one dead letter.
    let mut from = 1;
    let (mut good, mut lost) = (0u64, Vec::new());
    loop {
        let b = log
            .read(
                "pos.transactions",
                from,
                ReadLimits {
                    max_records: 97,
                    max_bytes: 1 << 20,
                },
            )
            .await
            .expect("reads past a damaged page");
        if b.next_seq <= from {
            break;
        }
        good += b.records.len() as u64;
        lost.extend(b.quarantined.iter().map(|q| q.0));
        from = b.next_seq;
    }
    assert_eq!(from, 1001, "the reader reached the end");
    assert!(!lost.is_empty(), "the damaged page held records");
    assert_eq!(good + lost.len() as u64, 1000, "every seq is accounted for");
    // A second reader over the same range adds no second gap or dead letter.
    let _ = log
        .read(
            "pos.transactions",
            1,
            ReadLimits {
                max_records: 1000,
                max_bytes: 64 << 20,
            },
        )
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let dl = read_all(&log, DEADLETTER_STREAM).await;
        if dl.len() >= lost.len() || tokio::time::Instant::now() > deadline {
            assert_eq!(dl.len(), lost.len(), "one dead letter per lost record");
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    log.maintain().await.ok();
    let gaps = log.gaps(0, 10_000).await.unwrap();
    let gap_seqs: Vec<u64> = gaps.iter().map(|g| g.first_seq).collect();
    assert_eq!(
        gap_seqs.len(),
        lost.len(),
        "one gap per lost record, not per reader"
    );
    log.close().await.unwrap();
}

pub(crate) async fn free_space_floor_evicts_like_an_exceeded_budget<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let log = E::open(dir.path(), E::config()).unwrap();
    log.append(AppendRequest::events(
        (0..200).map(|i| big("beacon.sightings", i)).collect(),
    ))
    .await
    .unwrap();
    log.append(AppendRequest::events(
        (0..20).map(|i| big("pos.transactions", i)).collect(),
    ))
    .await
    .unwrap();
    log.close().await.unwrap();
    drop(log);
    // The filesystem fills up with other data: a floor no filesystem can meet models it.
    let cfg = LogConfig {
        min_free_disk: ByteSize::tib(1 << 20),
        ..E::config()
    };
    let log = E::open(dir.path(), cfg).unwrap();
    log.maintain().await.unwrap();
    assert!(
        read_all(&log, "beacon.sightings").await.is_empty(),
        "low-priority records were evicted"
    );
    assert_eq!(
        read_all(&log, "pos.transactions").await.len(),
        20,
        "protected records stay"
    );
    let gaps = log.gaps(0, 100).await.unwrap();
    assert_eq!(gaps.iter().map(|g| g.count).sum::<u64>(), 200);
    assert!(
        gaps.iter().all(|g| g.reason.contains("min_free_disk")),
        "{gaps:?}"
    );
    // New records are refused (backpressure) rather than stored on a full disk.
    assert!(matches!(
        log.append(AppendRequest::one(big("pos.transactions", 99)))
            .await,
        Err(LogError::Full)
    ));
    assert!(log.usage().await.unwrap().full);
    log.close().await.unwrap();
}

/// Seqs of a batch's records.
fn seqs(b: &ReadBatch) -> Vec<u64> {
    b.records.iter().map(|r| r.seq).collect()
}

/// The core cursor reader on this engine: in order, again until committed, waits for commits,
/// resumes from the committed cursor after re-creation and after a reopen of the log.
pub(crate) async fn cursor_reader_reads_in_order_waits_and_resumes<E: Engine>() {
    use edge_core::cursor::{CursorReader, Start};
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = Arc::new(open::<E>(dir.path()));
    log.append(AppendRequest::events((1..=5).map(|i| ev("s", i)).collect()))
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let limits = ReadLimits {
        max_records: 2,
        max_bytes: 1 << 20,
    };
    let mut r = CursorReader::open(log.clone(), "reader", "s", Start::Earliest)
        .await
        .unwrap()
        .with_limits(limits);
    let b = r.next_batch(&cancel).await.unwrap().expect("a batch");
    assert_eq!(seqs(&b), [1, 2]);
    let again = r.next_batch(&cancel).await.unwrap().expect("a batch");
    assert_eq!(seqs(&again), [1, 2], "an uncommitted batch is read again");
    r.commit(b.next_seq).await.unwrap();
    let mut got = Vec::new();
    while let Some(b) = r.try_batch().await.unwrap() {
        got.extend(seqs(&b));
        r.commit(b.next_seq).await.unwrap();
    }
    assert_eq!(got, [3, 4, 5], "the rest, in order");
    assert_eq!(r.next_seq(), 6);
    assert_eq!(log.cursor("reader", "s").await.unwrap(), Some(6));

    // Caught up: the reader waits until a new record is committed.
    let waiting = tokio::spawn(async move {
        let c = CancellationToken::new();
        let b = r.next_batch(&c).await;
        (r, b)
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(!waiting.is_finished(), "a caught-up reader waits");
    log.append(AppendRequest::one(ev("s", 6))).await.unwrap();
    let (r, b) = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("woken by the commit")
        .unwrap();
    assert_eq!(seqs(&b.unwrap().expect("a batch")), [6]);
    drop(r); // seq 6 was read, not committed

    // Re-created with the same names: from the committed cursor.
    let mut r = CursorReader::open(log.clone(), "reader", "s", Start::Latest)
        .await
        .unwrap();
    assert_eq!(r.next_seq(), 6, "a committed cursor wins over the start");
    let b = r.try_batch().await.unwrap().expect("seq 6 again");
    assert_eq!(seqs(&b), [6]);
    r.commit(b.next_seq).await.unwrap();
    assert!(r.try_batch().await.unwrap().is_none());
    drop(r);

    // A new cursor at the head, remembered or not.
    let mut late = CursorReader::open(log.clone(), "late", "s", Start::Latest)
        .await
        .unwrap();
    assert_eq!(late.next_seq(), 7);
    assert!(late.try_batch().await.unwrap().is_none());
    assert_eq!(
        log.cursor("late", "s").await.unwrap(),
        None,
        "open writes nothing"
    );
    late.remember_start().await.unwrap();
    assert_eq!(log.cursor("late", "s").await.unwrap(), Some(7));
    drop(late);

    // Across a restart of the log.
    log.close().await.unwrap();
    drop(log);
    let log: Arc<dyn Log> = Arc::new(open::<E>(dir.path()));
    log.append(AppendRequest::one(ev("s", 7))).await.unwrap();
    let mut r = CursorReader::open(log.clone(), "reader", "s", Start::Earliest)
        .await
        .unwrap();
    let b = r
        .try_batch()
        .await
        .unwrap()
        .expect("the record after the cursor");
    assert_eq!(seqs(&b), [7]);
    drop(r);
    log.close().await.unwrap();
}

/// `submit_with` moves the reader on at once and the cursor when its ticket resolves: the next
/// batch is readable before the move is durable, the move and its events are durable together,
/// and a reader re-created after the ticket resolved resumes after the move.
pub(crate) async fn cursor_reader_submits_a_move_without_waiting<E: Engine>() {
    use edge_core::cursor::{CursorReader, Start};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = Arc::new(open::<E>(dir.path()));
    log.append(AppendRequest::events((1..=4).map(|i| ev("s", i)).collect()))
        .await
        .unwrap();
    let limits = ReadLimits {
        max_records: 2,
        max_bytes: 1 << 20,
    };
    let mut r = CursorReader::open(log.clone(), "egress", "s", Start::Earliest)
        .await
        .unwrap()
        .with_limits(limits);
    let b = r.try_batch().await.unwrap().expect("a batch");
    assert_eq!(seqs(&b), [1, 2]);
    let ticket = r
        .submit_with(b.next_seq, vec![ev("side", 1)])
        .await
        .unwrap();
    assert_eq!(r.next_seq(), 3, "the reader moved on before the commit");
    let b2 = r.try_batch().await.unwrap().expect("the next batch");
    assert_eq!(seqs(&b2), [3, 4]);
    ticket.await.unwrap();
    assert_eq!(log.cursor("egress", "s").await.unwrap(), Some(3));
    assert_eq!(
        log.next_seq("side").unwrap(),
        2,
        "the events committed with the move"
    );
    drop(r);
    let mut again = CursorReader::open(log.clone(), "egress", "s", Start::Earliest)
        .await
        .unwrap()
        .with_limits(limits);
    assert_eq!(
        seqs(&again.try_batch().await.unwrap().expect("a batch")),
        [3, 4],
        "the unmoved batch again, not the moved one"
    );
    log.close().await.unwrap();
}

/// A reader waiting for records returns when its cancel token fires.
pub(crate) async fn cursor_reader_stops_on_shutdown<E: Engine>() {
    use edge_core::cursor::{CursorReader, Start};
    use std::sync::Arc;
    use tokio_util::sync::CancellationToken;
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = Arc::new(open::<E>(dir.path()));
    log.append(AppendRequest::one(ev("s", 1))).await.unwrap();
    let mut r = CursorReader::open(log.clone(), "reader", "s", Start::Latest)
        .await
        .unwrap();
    let cancel = CancellationToken::new();
    let c = cancel.clone();
    let waiting = tokio::spawn(async move { r.next_batch(&c).await.map(|b| b.is_some()) });
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!waiting.is_finished(), "nothing after the head: it waits");
    cancel.cancel();
    let got = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("returns once cancelled")
        .unwrap()
        .unwrap();
    assert!(!got, "a cancelled wait returns no batch");
    // Cancelled before the call: no read, even with records to read.
    let mut r = CursorReader::open(log.clone(), "other", "s", Start::Earliest)
        .await
        .unwrap();
    assert!(r.next_batch(&cancel).await.unwrap().is_none());
    drop(r);
    log.close().await.unwrap();
}

/// Gap markers the uplink has reported to HQ (`<mirror_cursor>.gap_id` in the kv, written with
/// the Kafka commit that carried them) are pruned at maintenance, so the table does not grow with
/// every eviction for the life of the store; the summary in status still counts them.
pub(crate) async fn gaps_already_reported_are_pruned_and_still_counted<E: Engine>() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = LogConfig {
        disk_budget: ByteSize::mib(1),
        min_free_disk: ByteSize::b(0),
        ..E::config()
    };
    let log = E::open(dir.path(), cfg).unwrap();
    for chunk in 0..30 {
        log.append(AppendRequest::events(
            (0..100)
                .map(|i| big("beacon.sightings", chunk * 100 + i))
                .collect(),
        ))
        .await
        .unwrap();
    }
    log.maintain().await.unwrap();
    let gaps = log.gaps(0, 10_000).await.unwrap();
    assert!(gaps.len() >= 2, "evictions left gaps: {gaps:?}");
    let before = log.gap_summary().await.unwrap();
    // Nothing reported yet: nothing pruned.
    assert_eq!(log.maintain().await.unwrap().gaps_pruned, 0);
    assert_eq!(log.gaps(0, 10_000).await.unwrap().len(), gaps.len());
    // The uplink reports all but the last one.
    let reported = gaps[gaps.len() - 2].id;
    let mut req = AppendRequest::default();
    req.kv
        .push(("uplink.gap_id".into(), reported.to_string().into_bytes()));
    log.append(req).await.unwrap();
    let r = log.maintain().await.unwrap();
    assert_eq!(r.gaps_pruned, gaps.len() as u64 - 1, "{r:?}");
    let left = log.gaps(0, 10_000).await.unwrap();
    assert_eq!(
        left,
        vec![gaps[gaps.len() - 1].clone()],
        "the unreported gap stays"
    );
    assert_eq!(
        log.gaps(reported, 100).await.unwrap(),
        left,
        "the uplink still finds what it has not reported"
    );
    assert_eq!(
        log.gap_summary().await.unwrap(),
        before,
        "status still counts the pruned gaps"
    );
    // New gaps get new ids (never one of a pruned gap).
    for chunk in 30..45 {
        log.append(AppendRequest::events(
            (0..100)
                .map(|i| big("beacon.sightings", chunk * 100 + i))
                .collect(),
        ))
        .await
        .unwrap();
    }
    log.maintain().await.unwrap();
    let newer = log.gaps(0, 10_000).await.unwrap();
    assert!(newer.len() > 1 && newer.iter().all(|g| g.id > reported));
    log.close().await.unwrap();
}

macro_rules! contract_suite {
    ($name:ident, $engine:ty) => {
        mod $name {
            use super::*;
            contract_suite!(@tests $engine;
                seq_is_dense_per_stream_and_payloads_round_trip,
                requests_apply_in_submission_order,
                concurrent_writers_get_unique_dense_seqs,
                records_epoch_and_seq_survive_reopen,
                second_open_of_same_log_is_refused,
                event_ids_are_stored_once_per_stream,
                dedup_window_is_bounded,
                cursors_and_kv_commit_with_events,
                invalid_requests_fail_alone,
                a_request_refused_in_the_commit_fails_alone,
                event_ids_are_scoped_per_source,
                reads_respect_limits_and_resume,
                subscribers_wake_on_commit,
                retention_removes_only_old_mirrored_records,
                retention_forever_keeps_everything,
                downlink_streams_keep_the_latest_record_per_key,
                budget_evicts_lowest_class_first_with_gaps,
                protected_records_apply_backpressure_until_mirrored,
                corrupt_record_is_dead_lettered_and_stream_moves_on,
                unreadable_database_is_moved_aside_with_new_epoch,
                integrity_check_reports_a_damaged_page,
                free_space_floor_evicts_like_an_exceeded_budget,
                cursor_reader_reads_in_order_waits_and_resumes,
                cursor_reader_stops_on_shutdown,
                cursor_reader_submits_a_move_without_waiting,
                gaps_already_reported_are_pruned_and_still_counted,
            );
        }
    };
    (@tests $engine:ty; $($t:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $t() {
                super::$t::<$engine>().await
            }
        )*
    };
}

contract_suite!(sqlite_full, SqliteFull);
contract_suite!(sqlite_normal, SqliteNormal);
