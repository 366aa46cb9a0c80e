//! The single writer thread of the SQLite log.
//!
//! Every write (appends, cursor moves, quarantine, eviction, retention) goes through this thread, so
//! there is never write contention and `seq` assignment is a plain counter. This file is the
//! group-commit path and quarantine; the disk budget and eviction are in `evict.rs`, retention and
//! the other periodic maintenance in `retention.rs` (more `impl Writer` on the same thread).
//!
//! Group commit: the thread blocks for the first request, then keeps taking queued requests without
//! waiting until the queue is empty, the batch holds `max_batch_records`, or `commit_window` has
//! passed since the batch began. The batch is one transaction and one fsync (WAL, synchronous=FULL).
//! While that fsync runs, new requests queue up and form the next batch, so batches grow with load
//! and a lone record never waits for a timer. Tickets are resolved only after COMMIT returned.
//!
//! Poison: one request that fails inside the transaction (a constraint, a value too big, the
//! stream limit) must not fail the others of its batch. The batch is then rolled back and
//! applied again with a SAVEPOINT per request; the failing request alone gets its error.

use super::Shared;
use super::evict::Space;
use super::queries::{self, refusal, row_id, storage};
use super::space::{MovedAside, Reserve};
use crate::log::{AppendOutcome, AppendRequest, Appended, LogConfig, LogError, MaintenanceReport};
use edge_core::Event;
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;
use tokio::sync::{mpsc, oneshot};

/// Where a request's outcome goes.
type Reply = oneshot::Sender<Result<AppendOutcome, LogError>>;

/// How the requests of one batch share its transaction.
#[derive(Clone, Copy)]
enum Isolation {
    /// One transaction, no savepoints (the common case).
    Batch,
    /// A savepoint per request, after a request failed the batch.
    PerRequest,
}

enum ApplyError {
    /// A statement of one request failed (only with [`Isolation::Batch`]).
    Request(LogError),
    /// The transaction itself failed (begin, savepoint, counters, commit): every request fails.
    Batch(LogError),
}

pub(super) enum WriterMsg {
    /// Makes the writer thread panic (tests of what a dead writer looks like from outside).
    #[cfg(test)]
    Panic,
    Append(
        AppendRequest,
        oneshot::Sender<Result<AppendOutcome, LogError>>,
    ),
    /// A reader found a damaged row: dead-letter it, remove it, record a gap.
    Quarantine {
        stream: String,
        seq: u64,
        reason: String,
    },
    Maintain(Option<oneshot::Sender<Result<MaintenanceReport, LogError>>>),
    Close(oneshot::Sender<Result<(), LogError>>),
}

impl WriterMsg {
    fn records(&self) -> usize {
        match self {
            WriterMsg::Append(r, _) => r.events.len().max(1),
            _ => 1,
        }
    }
}

#[derive(Clone, Copy)]
pub(super) struct StreamState {
    pub(super) id: i64,
    pub(super) next_seq: u64,
    pub(super) count: i64,
    pub(super) bytes: i64,
}

/// The writer thread's state. Eviction and retention (`evict.rs`, `retention.rs`) are further
/// `impl Writer` blocks on the same thread.
pub(super) struct Writer {
    pub(super) conn: Connection,
    pub(super) cfg: LogConfig,
    pub(super) data_dir: PathBuf,
    pub(super) shared: Arc<Shared>,
    pub(super) streams: HashMap<String, StreamState>,
    pub(super) max_stream_id: i64,
    pub(super) space: Space,
    /// Records a compacted stream held after its last compaction (`retention.rs`).
    pub(super) compacted: HashMap<String, u64>,
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        cfg: LogConfig,
        db: &Path,
        shared: Arc<Shared>,
    ) -> Result<Writer, LogError> {
        let data_dir = db.parent().unwrap_or(Path::new(".")).to_path_buf();
        let mut streams = HashMap::new();
        let mut max_stream_id = 0;
        {
            let mut stmt = conn
                .prepare("SELECT id, name, next_seq, record_count, payload_bytes FROM streams")
                .map_err(storage("loading streams"))?;
            let rows = stmt
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(1)?,
                        StreamState {
                            id: r.get(0)?,
                            next_seq: r.get::<_, i64>(2)? as u64,
                            count: r.get(3)?,
                            bytes: r.get(4)?,
                        },
                    ))
                })
                .map_err(storage("loading streams"))?;
            for row in rows {
                let (name, st) = row.map_err(storage("loading streams"))?;
                max_stream_id = max_stream_id.max(st.id);
                streams.insert(name, st);
            }
        }
        let mut w = Writer {
            conn,
            cfg,
            data_dir,
            shared,
            streams,
            max_stream_id,
            space: Space {
                full: false,
                full_cause: None,
                last_fs_check: None,
                last_reclaim: None,
                fs_free: None,
                recheck: false,
                reserve: Reserve::open(db),
                aside: MovedAside::rotate(db),
                classes: Default::default(),
            },
            compacted: HashMap::new(),
        };
        w.publish_heads();
        // The usage report is true from the start (status right after open, the first check).
        w.refresh_fs(true);
        w.measure_classes();
        w.pages()?;
        Ok(w)
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        let window = self.cfg.commit_window();
        let max_records = self.cfg.max_batch_records;
        // Budget state of an existing database is known before the first append.
        self.measure_classes();
        self.check_budget();
        // The housekeeper asks for maintenance with a `try_send` that skips a tick when the
        // queue is full, and under a sustained flood the queue is always full: retention, the
        // dedup window and gap pruning then never ran, and the dedup index grew with intake.
        // A maintenance overdue by twice its interval runs between batches instead.
        let overdue = self.cfg.maintenance_interval * 2;
        let mut last_maintenance = Instant::now();
        let interval = self.cfg.commit_interval();
        let mut last_commit: Option<Instant> = None;
        while let Some(first) = rx.blocking_recv() {
            // Flash wear: a record that arrives soon after the previous commit waits for the rest
            // of `commit_interval_ms`, so the records of that interval share one commit's pages.
            if matches!(first, WriterMsg::Append(..))
                && let Some(hold) =
                    last_commit.and_then(|t| (t + interval).checked_duration_since(Instant::now()))
            {
                std::thread::sleep(hold);
            }
            let started = Instant::now();
            let mut n = first.records();
            let mut batch = vec![first];
            while n < max_records && started.elapsed() < window {
                match rx.try_recv() {
                    Ok(m) => {
                        n += m.records();
                        batch.push(m);
                    }
                    Err(_) => break,
                }
            }
            let mut work = Vec::with_capacity(batch.len());
            let mut maintain = Vec::new();
            let mut close = None;
            for m in batch {
                match m {
                    #[cfg(test)]
                    WriterMsg::Panic => panic!("writer panic requested by a test"),
                    WriterMsg::Maintain(reply) => maintain.push(reply),
                    WriterMsg::Close(reply) => close = Some(reply),
                    other => work.push(other),
                }
            }
            if !work.is_empty() {
                if !interval.is_zero() {
                    last_commit = Some(started);
                }
                self.commit_batch(work, started);
                self.check_budget();
            }
            if maintain.is_empty() && last_maintenance.elapsed() >= overdue {
                metrics::counter!("edge_log_maintenance_overdue_total").increment(1);
                maintain.push(None);
            }
            if !maintain.is_empty() {
                last_maintenance = Instant::now();
            }
            for reply in maintain {
                let r = self.maintain();
                if let Some(reply) = reply {
                    let _ = reply.send(r); // the caller may have given up waiting; nothing to undo
                } else if let Err(e) = r {
                    tracing::warn!(error = %e, "periodic log maintenance failed; it will be retried");
                }
            }
            if let Some(reply) = close {
                // Everything queued before Close was in this or an earlier batch (FIFO queue).
                rx.close();
                while let Ok(m) = rx.try_recv() {
                    self.reject(m, LogError::Closed);
                }
                let r = self.shutdown();
                let _ = reply.send(r);
                return;
            }
        }
    }

    fn reject(&self, m: WriterMsg, e: LogError) {
        match m {
            WriterMsg::Append(_, reply) => {
                let _ = reply.send(Err(e));
            }
            WriterMsg::Maintain(Some(reply)) => {
                let _ = reply.send(Err(e));
            }
            WriterMsg::Close(reply) => {
                let _ = reply.send(Ok(()));
            }
            _ => {}
        }
    }

    fn shutdown(&mut self) -> Result<(), LogError> {
        // Fold the WAL into the database so the next start replays nothing.
        let busy: i64 = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| r.get(0))
            .map_err(storage("checkpointing at shutdown"))?;
        if busy != 0 {
            // Nothing is lost (the WAL is replayed at the next start), but the start pays for it.
            tracing::warn!(
                "a reader still held the local log at shutdown; the WAL was not truncated and is replayed at the next start"
            );
        }
        Ok(())
    }

    pub(super) fn publish_heads(&self) {
        let mut heads = self.shared.heads.write().unwrap_or_else(|e| e.into_inner());
        for (name, st) in &self.streams {
            heads.insert(name.clone(), (st.id, st.next_seq));
        }
    }

    /// One transaction for every request of the batch.
    fn commit_batch(&mut self, work: Vec<WriterMsg>, started: Instant) {
        let mut replies: Vec<(Reply, Result<AppendOutcome, LogError>)> =
            Vec::with_capacity(work.len());
        let mut accepted = Vec::with_capacity(work.len());
        let mut quarantines = Vec::new();
        for m in work {
            match m {
                WriterMsg::Append(req, reply) => {
                    if let Some(e) = validate(&req) {
                        replies.push((reply, Err(e)));
                    } else if self.space.full && !req.events.is_empty() {
                        metrics::counter!("edge_log_appends_refused_total", "reason" => "full")
                            .increment(req.events.len() as u64);
                        replies.push((reply, Err(LogError::Full)));
                    } else {
                        accepted.push((req, reply));
                    }
                }
                WriterMsg::Quarantine {
                    stream,
                    seq,
                    reason,
                } => quarantines.push((stream, seq, reason)),
                _ => {}
            }
        }
        // Replies to refused requests do not wait for the commit.
        for (reply, r) in replies.drain(..) {
            let _ = reply.send(r);
        }
        if !accepted.is_empty() {
            self.commit_appends(accepted, started);
        }
        // Damage handling never shares a transaction with appends: a damaged page must not make
        // intake fail. Each quarantine commits (or rolls back) on its own.
        for (stream, seq, reason) in quarantines {
            self.commit_quarantine(&stream, seq, &reason);
        }
    }

    fn commit_appends(&mut self, accepted: Vec<(AppendRequest, Reply)>, started: Instant) {
        let before = self.streams.clone();
        let max_id_before = self.max_stream_id;
        let commit_started = Instant::now();
        // Fast path: the whole batch in one transaction, no savepoints. When a statement of one
        // request fails, the transaction is rolled back and the batch applied again with a
        // savepoint per request, so that request fails alone and the others still commit in
        // this batch's single fsync. Poison costs one replay of its batch, and nothing when
        // there is none.
        let result = match self.apply(&accepted, Isolation::Batch) {
            Err(ApplyError::Request(e)) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.streams = before.clone();
                self.max_stream_id = max_id_before;
                metrics::counter!("edge_log_batch_replays_total").increment(1);
                tracing::debug!(error = %e, "a request of the batch failed; applying the batch again with a savepoint per request");
                self.apply(&accepted, Isolation::PerRequest)
            }
            other => other,
        };
        match result {
            Ok(outcomes) => {
                let commit_secs = commit_started.elapsed().as_secs_f64();
                metrics::histogram!("edge_log_commit_seconds").record(commit_secs);
                metrics::histogram!("edge_log_batch_records")
                    .record(accepted.iter().map(|(r, _)| r.events.len()).sum::<usize>() as f64);
                self.publish_heads();
                self.shared.generation.send_modify(|g| *g += 1);
                for ((req, reply), outcome) in accepted.into_iter().zip(outcomes) {
                    if let Err(e) = &outcome {
                        let reason = if matches!(e, LogError::Invalid(_)) {
                            "invalid"
                        } else {
                            "storage"
                        };
                        metrics::counter!("edge_log_appends_refused_total", "reason" => reason)
                            .increment(req.events.len().max(1) as u64);
                        tracing::warn!(error = %e, events = req.events.len(), "the log refused one request of a batch; the rest of the batch committed");
                    }
                    let _ = reply.send(outcome);
                }
                metrics::histogram!("edge_log_append_wait_seconds")
                    .record(started.elapsed().as_secs_f64());
            }
            Err(ApplyError::Request(e) | ApplyError::Batch(e)) => {
                tracing::error!(error = %e, "a log commit failed; the batch is rejected and its sources will retry");
                metrics::counter!("edge_log_commit_failures_total").increment(1);
                // A full filesystem is the usual cause: look at it now, not within a second.
                self.space.recheck = true;
                let _ = self.conn.execute_batch("ROLLBACK");
                self.streams = before;
                self.max_stream_id = max_id_before;
                for (_, reply) in accepted {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }

    /// Applies and commits the batch. With [`Isolation::Batch`] the first failing statement fails
    /// the batch ([`ApplyError::Request`]); with [`Isolation::PerRequest`] each request runs in
    /// its own savepoint and a failing one is rolled back alone (its `Err` is in the result).
    fn apply(
        &mut self,
        accepted: &[(AppendRequest, Reply)],
        isolation: Isolation,
    ) -> Result<Vec<Result<AppendOutcome, LogError>>, ApplyError> {
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(|e| ApplyError::Batch(storage("beginning a commit")(e)))?;
        let now = edge_core::time::now_ms();
        let mut touched: Vec<i64> = Vec::new();
        let mut outcomes = Vec::with_capacity(accepted.len());
        {
            // Disjoint borrows: statements borrow the connection, inserts update the stream table.
            let Writer {
                conn,
                streams,
                max_stream_id,
                ..
            } = self;
            let batch = |e| ApplyError::Batch(e);
            let mut ins = Inserter::new(conn).map_err(batch)?;
            for (req, _) in accepted {
                match isolation {
                    Isolation::Batch => {
                        let o =
                            apply_request(&mut ins, streams, max_stream_id, req, now, &mut touched)
                                .map_err(ApplyError::Request)?;
                        outcomes.push(Ok(o));
                    }
                    Isolation::PerRequest => {
                        let streams_before = streams.clone();
                        let max_id_before = *max_stream_id;
                        let touched_len = touched.len();
                        savepoint(conn, "SAVEPOINT request").map_err(batch)?;
                        match apply_request(
                            &mut ins,
                            streams,
                            max_stream_id,
                            req,
                            now,
                            &mut touched,
                        ) {
                            Ok(o) => {
                                savepoint(conn, "RELEASE request").map_err(batch)?;
                                outcomes.push(Ok(o));
                            }
                            Err(e) => {
                                savepoint(conn, "ROLLBACK TO request").map_err(batch)?;
                                savepoint(conn, "RELEASE request").map_err(batch)?;
                                *streams = streams_before;
                                *max_stream_id = max_id_before;
                                touched.truncate(touched_len);
                                outcomes.push(Err(e));
                            }
                        }
                    }
                }
            }
        }
        self.flush_stream_rows(&touched)
            .map_err(ApplyError::Batch)?;
        self.conn
            .execute_batch("COMMIT")
            .map_err(|e| ApplyError::Batch(storage("committing")(e)))?;
        Ok(outcomes)
    }

    pub(super) fn flush_stream_rows(&mut self, touched: &[i64]) -> Result<(), LogError> {
        for st in self.streams.values().filter(|s| touched.contains(&s.id)) {
            self.conn
                .prepare_cached(
                    "UPDATE streams SET next_seq = ?1, record_count = ?2, payload_bytes = ?3 WHERE id = ?4",
                )
                .and_then(|mut s| s.execute(params![st.next_seq as i64, st.count, st.bytes, st.id]))
                .map_err(storage("updating stream counters"))?;
        }
        Ok(())
    }

    pub(super) fn record_gap(
        &self,
        stream_id: i64,
        first: u64,
        last: u64,
        count: u64,
        reason: &str,
        now: i64,
    ) -> Result<(), LogError> {
        self.conn
            .prepare_cached(
                "INSERT INTO gaps (stream_id, first_seq, last_seq, count, reason, ts) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            )
            .and_then(|mut s| {
                s.execute(params![stream_id, first as i64, last as i64, count as i64, reason, now])
            })
            .map_err(storage("recording a gap"))?;
        Ok(())
    }
}

const INSERT_RECORD: &str = "INSERT INTO records (id, event_ts, ingest_ts, key, source, event_id, schema, headers, payload, crc)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)";

/// The stream's id, creating the stream (in the current transaction) if it is new.
fn ensure_stream(
    conn: &Connection,
    streams: &mut HashMap<String, StreamState>,
    max_stream_id: &mut i64,
    name: &str,
    now: i64,
    touched: &mut Vec<i64>,
) -> Result<i64, LogError> {
    if let Some(st) = streams.get(name) {
        return Ok(st.id);
    }
    if *max_stream_id >= queries::MAX_STREAM_ID {
        return Err(LogError::Invalid(format!(
            "cannot create stream {name:?}: the log already holds the maximum number of streams"
        )));
    }
    let id = *max_stream_id + 1;
    conn.execute(
        "INSERT INTO streams (id, name, next_seq, created_ts) VALUES (?1, ?2, 1, ?3)",
        params![id, name, now],
    )
    .map_err(storage("creating a stream"))?;
    *max_stream_id = id;
    streams.insert(
        name.to_string(),
        StreamState {
            id,
            next_seq: 1,
            count: 0,
            bytes: 0,
        },
    );
    touched.push(id);
    Ok(id)
}

fn savepoint(conn: &Connection, sql: &str) -> Result<(), LogError> {
    conn.prepare_cached(sql)
        .and_then(|mut s| s.execute([]))
        .map(|_| ())
        .map_err(storage("isolating a request"))
}

/// The events, cursor moves and key writes of one request, inside the open transaction.
fn apply_request(
    ins: &mut Inserter<'_>,
    streams: &mut HashMap<String, StreamState>,
    max_stream_id: &mut i64,
    req: &AppendRequest,
    now: i64,
    touched: &mut Vec<i64>,
) -> Result<AppendOutcome, LogError> {
    let conn = ins.conn;
    let mut appended = Vec::with_capacity(req.events.len());
    for ev in &req.events {
        appended.push(ins.insert(streams, max_stream_id, ev, now, touched)?);
    }
    for c in &req.cursors {
        let sid = ensure_stream(conn, streams, max_stream_id, &c.stream, now, touched)?;
        conn.prepare_cached(
            "INSERT INTO cursors (name, stream_id, next_seq, updated_ts) VALUES (?1, ?2, ?3, ?4)
             ON CONFLICT (name, stream_id) DO UPDATE SET next_seq = excluded.next_seq, updated_ts = excluded.updated_ts",
        )
        .and_then(|mut s| s.execute(params![c.cursor, sid, c.next_seq as i64, now]))
        .map_err(refusal("moving a cursor"))?;
    }
    for (k, v) in &req.kv {
        conn.prepare_cached(
            "INSERT INTO kv (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .and_then(|mut s| s.execute(params![k, v]))
        .map_err(refusal("writing a key"))?;
    }
    Ok(AppendOutcome { appended })
}

/// Prepared statements for one batch: looked up once, not once per record.
pub(super) struct Inserter<'c> {
    conn: &'c Connection,
    record: rusqlite::CachedStatement<'c>,
    dedup_check: Option<rusqlite::CachedStatement<'c>>,
    dedup_add: Option<rusqlite::CachedStatement<'c>>,
}

impl<'c> Inserter<'c> {
    pub(super) fn new(conn: &'c Connection) -> Result<Self, LogError> {
        Ok(Inserter {
            conn,
            record: conn
                .prepare_cached(INSERT_RECORD)
                .map_err(storage("preparing inserts"))?,
            dedup_check: None,
            dedup_add: None,
        })
    }

    pub(super) fn insert(
        &mut self,
        streams: &mut HashMap<String, StreamState>,
        max_stream_id: &mut i64,
        ev: &Event,
        now: i64,
        touched: &mut Vec<i64>,
    ) -> Result<Appended, LogError> {
        let sid = ensure_stream(self.conn, streams, max_stream_id, &ev.stream, now, touched)?;
        // Dedup is scoped per (stream, source): one device's ids never suppress another's.
        let dedup_source = queries::dedup_key(ev.source.as_deref().unwrap_or(""));
        if let Some(eid) = &ev.event_id {
            if self.dedup_check.is_none() {
                self.dedup_check = Some(
                    self.conn
                        .prepare_cached(
                            "SELECT seq FROM dedup WHERE stream_id = ?1 AND source = ?2 AND event_id = ?3",
                        )
                        .map_err(storage("checking the dedup window"))?,
                );
            }
            let dup: Option<i64> = self
                .dedup_check
                .as_mut()
                .map(|s| {
                    s.query_row(params![sid, dedup_source, queries::dedup_key(eid)], |r| {
                        r.get(0)
                    })
                    .optional()
                })
                .transpose()
                .map_err(storage("checking the dedup window"))?
                .flatten();
            if let Some(seq) = dup {
                metrics::counter!("edge_log_duplicates_total").increment(1);
                return Ok(Appended::Duplicate { seq: seq as u64 });
            }
        }
        let st = streams
            .get_mut(&*ev.stream)
            .ok_or_else(|| LogError::Invalid("stream vanished".into()))?;
        let seq = st.next_seq;
        if seq > queries::MAX_SEQ {
            return Err(LogError::Invalid(format!(
                "stream {} has used every seq of this epoch",
                ev.stream
            )));
        }
        let headers = queries::encode_headers(&ev.headers);
        let crc = queries::record_crc(
            &ev.stream,
            seq,
            ev.event_ts_ms,
            now,
            ev.key.as_deref(),
            ev.source.as_deref(),
            ev.event_id.as_deref(),
            ev.schema.as_deref(),
            headers.as_deref(),
            &ev.payload,
        );
        self.record
            .execute(params![
                row_id(sid, seq),
                ev.event_ts_ms,
                now,
                ev.key,
                ev.source,
                ev.event_id,
                ev.schema,
                headers,
                &ev.payload[..],
                i64::from(crc)
            ])
            .map_err(refusal("inserting a record"))?;
        if let Some(eid) = &ev.event_id {
            if self.dedup_add.is_none() {
                self.dedup_add = Some(
                    self.conn
                        .prepare_cached(
                            "INSERT INTO dedup (stream_id, source, event_id, seq) VALUES (?1, ?2, ?3, ?4)",
                        )
                        .map_err(storage("remembering an event id"))?,
                );
            }
            if let Some(s) = self.dedup_add.as_mut() {
                s.execute(params![
                    sid,
                    dedup_source,
                    queries::dedup_key(eid),
                    seq as i64
                ])
                .map_err(refusal("remembering an event id"))?;
            }
        }
        st.next_seq += 1;
        st.count += 1;
        st.bytes += ev.payload.len() as i64;
        if !touched.contains(&sid) {
            touched.push(sid);
        }
        Ok(Appended::New { seq })
    }
}

/// A request is refused as a whole when any of its events is malformed.
fn validate(req: &AppendRequest) -> Option<LogError> {
    for ev in &req.events {
        if let Err(e) = edge_core::config::check_stream_name(&ev.stream) {
            return Some(LogError::Invalid(e));
        }
    }
    for c in &req.cursors {
        if let Err(e) = edge_core::config::check_stream_name(&c.stream) {
            return Some(LogError::Invalid(e));
        }
    }
    None
}
