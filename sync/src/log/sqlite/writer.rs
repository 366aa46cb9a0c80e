//! The single writer thread of the SQLite log.
//!
//! Every write (appends, cursor moves, quarantine, eviction, retention) goes through this thread, so
//! there is never write contention and `seq` assignment is a plain counter.
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
use super::queries::{self, refusal, row_id, seq_of, storage};
use crate::deadletter;
use crate::log::{AppendOutcome, AppendRequest, Appended, LogConfig, LogError, MaintenanceReport};
use edge_core::{Event, Priority};
use rusqlite::{Connection, OptionalExtension, params};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Records deleted per eviction/retention transaction.
const EVICT_CHUNK: i64 = 5_000;
/// Dedup entries forgotten per maintenance pass at most (bounds the pass's duration).
const DEDUP_PRUNE_CHUNK: i64 = 200_000;
/// Evict down to this fraction of the budget, so eviction does not run on every commit.
const LOW_WATER: f64 = 0.95;
/// How often the filesystem free space is checked on the commit path.
const FS_CHECK_EVERY: Duration = Duration::from_secs(1);

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
struct StreamState {
    id: i64,
    next_seq: u64,
    count: i64,
    bytes: i64,
}

pub(super) struct Writer {
    conn: Connection,
    cfg: LogConfig,
    data_dir: PathBuf,
    shared: Arc<Shared>,
    streams: HashMap<String, StreamState>,
    max_stream_id: i64,
    full: bool,
    last_fs_check: Option<Instant>,
    fs_low: bool,
}

impl Writer {
    pub(super) fn new(
        conn: Connection,
        cfg: LogConfig,
        data_dir: PathBuf,
        shared: Arc<Shared>,
    ) -> Result<Writer, LogError> {
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
        let w = Writer {
            conn,
            cfg,
            data_dir,
            shared,
            streams,
            max_stream_id,
            full: false,
            last_fs_check: None,
            fs_low: false,
        };
        w.publish_heads();
        Ok(w)
    }

    pub(super) fn run(mut self, mut rx: mpsc::Receiver<WriterMsg>) {
        let window = self.cfg.commit_window();
        let max_records = self.cfg.max_batch_records;
        // Budget state of an existing database is known before the first append.
        self.check_budget();
        while let Some(first) = rx.blocking_recv() {
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
                    WriterMsg::Maintain(reply) => maintain.push(reply),
                    WriterMsg::Close(reply) => close = Some(reply),
                    other => work.push(other),
                }
            }
            if !work.is_empty() {
                self.commit_batch(work, started);
                self.check_budget();
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

    fn publish_heads(&self) {
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
                    } else if self.full && !req.events.is_empty() {
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

    fn commit_quarantine(&mut self, stream: &str, seq: u64, reason: &str) {
        let before = self.streams.clone();
        let max_id_before = self.max_stream_id;
        let r = (|| -> Result<(), LogError> {
            self.conn
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(storage("beginning a quarantine"))?;
            let now = edge_core::time::now_ms();
            let mut touched = Vec::new();
            self.quarantine(stream, seq, reason, now, &mut touched)?;
            self.flush_stream_rows(&touched)?;
            self.conn
                .execute_batch("COMMIT")
                .map_err(storage("committing a quarantine"))
        })();
        match r {
            Ok(()) => {
                self.publish_heads();
                self.shared.generation.send_modify(|g| *g += 1);
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                self.streams = before;
                self.max_stream_id = max_id_before;
                metrics::counter!("edge_log_quarantine_failures_total").increment(1);
                tracing::error!(stream, seq, error = %e, "a damaged record could not be quarantined; it stays in place and is reported again when read (see the integrity state)");
            }
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

    /// Inserts one event outside the batch path (dead letters of quarantined rows).
    fn insert(
        &mut self,
        ev: &Event,
        now: i64,
        touched: &mut Vec<i64>,
    ) -> Result<Appended, LogError> {
        let Writer {
            conn,
            streams,
            max_stream_id,
            ..
        } = self;
        Inserter::new(conn)?.insert(streams, max_stream_id, ev, now, touched)
    }

    fn flush_stream_rows(&mut self, touched: &[i64]) -> Result<(), LogError> {
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

    fn quarantine(
        &mut self,
        stream: &str,
        seq: u64,
        reason: &str,
        now: i64,
        touched: &mut Vec<i64>,
    ) -> Result<(), LogError> {
        let Some(st) = self.streams.get(stream).copied() else {
            return Ok(());
        };
        let rid = row_id(st.id, seq);
        if reason == queries::UNREADABLE {
            // Reading it again inside a write transaction would only hit the damaged page again.
            return self.record_unreadable(stream, st.id, seq, now, touched);
        }
        let raw = match self
            .conn
            .prepare_cached(&format!(
                "SELECT {} FROM records WHERE id = ?1",
                queries::RECORD_COLUMNS
            ))
            .and_then(|mut s| s.query_row([rid], queries::raw_row).optional())
        {
            Ok(r) => r,
            Err(e) if queries::is_corruption(&e) => {
                return self.record_unreadable(stream, st.id, seq, now, touched);
            }
            Err(e) => return Err(storage("reading a damaged record")(e)),
        };
        let Some(raw) = raw else {
            return Ok(()); // already quarantined by another reader
        };
        let name: Arc<str> = Arc::from(stream);
        if queries::decode_row(&name, &raw).is_ok() {
            // Re-read is clean: the reader saw a transient fault, not a damaged row.
            return Ok(());
        }
        let payload = queries::raw_payload(&raw);
        self.conn
            .execute("DELETE FROM records WHERE id = ?1", [rid])
            .map_err(storage("removing a damaged record"))?;
        if let Some(s) = self.streams.get_mut(stream) {
            s.count -= 1;
            s.bytes -= payload.len() as i64;
        }
        if !touched.contains(&st.id) {
            touched.push(st.id);
        }
        self.record_gap(st.id, seq, seq, 1, &format!("corrupt: {reason}"), now)?;
        let dl = deadletter::from_log(stream, seq, reason, &payload);
        self.insert(&dl, now, touched)?;
        metrics::counter!("edge_log_quarantined_total", "stream" => stream.to_string())
            .increment(1);
        tracing::error!(
            stream,
            seq,
            reason,
            "a damaged record was moved to the deadletter stream"
        );
        Ok(())
    }

    /// A row SQLite cannot read (damaged page): it cannot be moved or deleted, so it is recorded
    /// once as a gap with a dead letter, and readers move past it.
    fn record_unreadable(
        &mut self,
        stream: &str,
        stream_id: i64,
        seq: u64,
        now: i64,
        touched: &mut Vec<i64>,
    ) -> Result<(), LogError> {
        let reason = format!("corrupt: {}", queries::UNREADABLE);
        let known: bool = self
            .conn
            .prepare_cached(
                "SELECT EXISTS (SELECT 1 FROM gaps WHERE stream_id = ?1 AND first_seq = ?2 AND last_seq = ?2 AND reason = ?3)",
            )
            .and_then(|mut s| s.query_row(params![stream_id, seq as i64, reason], |r| r.get(0)))
            .map_err(storage("checking recorded gaps"))?;
        if known {
            return Ok(());
        }
        self.record_gap(stream_id, seq, seq, 1, &reason, now)?;
        let dl = deadletter::from_log(stream, seq, queries::UNREADABLE, &[]);
        self.insert(&dl, now, touched)?;
        metrics::counter!("edge_log_quarantined_total", "stream" => stream.to_string())
            .increment(1);
        tracing::error!(
            stream,
            seq,
            "a record is unreadable (damaged database page); recorded as a gap, readers move past it"
        );
        Ok(())
    }

    fn record_gap(
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

    // ---- budget, eviction, retention -------------------------------------------------------

    /// Bytes a record costs beyond its payload (row header, key columns, B-tree share).
    fn shared_page_overhead(&self) -> i64 {
        48
    }

    fn budget(&self) -> u64 {
        self.cfg.disk_budget.as_u64()
    }

    fn used_bytes(&self) -> Result<u64, LogError> {
        let (used, file) =
            queries::page_usage(&self.conn).map_err(storage("measuring disk use"))?;
        let mut u = self.shared.usage.lock().unwrap_or_else(|e| e.into_inner());
        u.used_bytes = used;
        u.file_bytes = file;
        u.budget_bytes = self.budget();
        Ok(used)
    }

    fn fs_free(&self) -> Option<u64> {
        let st = nix::sys::statvfs::statvfs(&self.data_dir).ok()?;
        Some(st.blocks_available() as u64 * st.fragment_size() as u64)
    }

    fn refresh_fs_low(&mut self, force: bool) {
        let due = force
            || self
                .last_fs_check
                .is_none_or(|t| t.elapsed() >= FS_CHECK_EVERY);
        if due {
            self.last_fs_check = Some(Instant::now());
            if let Some(free) = self.fs_free() {
                self.shared
                    .usage
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .fs_free_bytes = free;
                self.fs_low = free < self.cfg.min_free_disk.as_u64();
            }
        }
    }

    fn over_limits(&mut self) -> Result<bool, LogError> {
        Ok(self.used_bytes()? > self.budget() || self.fs_low)
    }

    /// Called after every commit: evict when over budget, set or clear `full`.
    fn check_budget(&mut self) {
        self.refresh_fs_low(false);
        match self.over_limits() {
            Ok(false) => self.set_full(false),
            Ok(true) => {
                let mut report = MaintenanceReport::default();
                if let Err(e) = self.evict(&mut report) {
                    tracing::error!(error = %e, "eviction failed; intake may pause until it succeeds");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not measure the log's disk use"),
        }
    }

    fn set_full(&mut self, full: bool) {
        if full != self.full {
            if full {
                tracing::error!(
                    budget = %self.cfg.disk_budget,
                    "the disk budget is exhausted by unmirrored protected records; intake is paused (backpressure) until the uplink drains"
                );
            } else {
                tracing::info!("the log is below its disk budget again; intake resumed");
            }
        }
        self.full = full;
        self.shared.full.store(full, Ordering::Relaxed);
        self.shared
            .usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .full = full;
        metrics::gauge!("edge_log_full").set(if full { 1.0 } else { 0.0 });
    }

    /// The seq below which a stream's records are mirrored (safe to drop without a gap).
    fn mirror_bound(&self, name: &str, st: &StreamState) -> Result<u64, LogError> {
        if !self.shared.policy(name).mirrored {
            return Ok(st.next_seq);
        }
        let c: Option<i64> = self
            .conn
            .prepare_cached("SELECT next_seq FROM cursors WHERE name = ?1 AND stream_id = ?2")
            .and_then(|mut s| {
                s.query_row(params![self.cfg.mirror_cursor, st.id], |r| r.get(0))
                    .optional()
            })
            .map_err(storage("reading the mirror cursor"))?;
        Ok(c.map_or(0, |v| (v.max(0) as u64).min(st.next_seq)))
    }

    /// First stored seq of a stream and its ingest time.
    fn first_record(&self, st: &StreamState) -> Result<Option<(u64, i64)>, LogError> {
        self.conn
            .prepare_cached(
                "SELECT id, ingest_ts FROM records WHERE id >= ?1 AND id < ?2 ORDER BY id LIMIT 1",
            )
            .and_then(|mut s| {
                s.query_row(params![row_id(st.id, 1), row_id(st.id + 1, 0)], |r| {
                    Ok((seq_of(r.get(0)?), r.get(1)?))
                })
                .optional()
            })
            .map_err(storage("finding a stream's first record"))
    }

    /// Deletes up to `EVICT_CHUNK` records of a stream with seq in [from, below), optionally only
    /// those ingested before `older_than`, in its own transaction. Returns (count, first, last).
    fn delete_chunk(
        &mut self,
        name: &str,
        below: u64,
        older_than: Option<i64>,
        gap_reason: Option<&str>,
        limit: i64,
    ) -> Result<(u64, u64, u64), LogError> {
        let Some(st) = self.streams.get(name).copied() else {
            return Ok((0, 0, 0));
        };
        let lo = row_id(st.id, 1);
        let hi = row_id(st.id, below.max(1));
        let (count, bytes, min_id, max_id): (i64, i64, Option<i64>, Option<i64>) = self
            .conn
            .prepare_cached(
                // The oldest `limit` rows by position first, then the age filter: filtering
                // inside the LIMIT would scan the whole range when nothing is old enough.
                "SELECT count(*), coalesce(sum(length(payload)), 0), min(id), max(id) FROM
                   (SELECT id, payload, ingest_ts FROM records WHERE id >= ?1 AND id < ?2
                    ORDER BY id LIMIT ?3)
                 WHERE ?4 IS NULL OR ingest_ts < ?4",
            )
            .and_then(|mut s| {
                s.query_row(
                    params![lo, hi, limit.clamp(1, EVICT_CHUNK), older_than],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
                )
            })
            .map_err(storage("selecting records to evict"))?;
        let (Some(min_id), Some(max_id)) = (min_id, max_id) else {
            return Ok((0, 0, 0));
        };
        if count == 0 {
            return Ok((0, 0, 0));
        }
        let now = edge_core::time::now_ms();
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(storage("beginning an eviction"))?;
        let r = (|| -> Result<(), LogError> {
            self.conn
                .prepare_cached(
                    "DELETE FROM records WHERE id >= ?1 AND id <= ?2 AND (?3 IS NULL OR ingest_ts < ?3)",
                )
                .and_then(|mut s| s.execute(params![min_id, max_id, older_than]))
                .map_err(storage("evicting records"))?;
            if let Some(reason) = gap_reason {
                self.record_gap(
                    st.id,
                    seq_of(min_id),
                    seq_of(max_id),
                    count as u64,
                    reason,
                    now,
                )?;
            }
            self.conn
                .prepare_cached(
                    "UPDATE streams SET record_count = record_count - ?1, payload_bytes = payload_bytes - ?2 WHERE id = ?3",
                )
                .and_then(|mut s| s.execute(params![count, bytes, st.id]))
                .map_err(storage("updating stream counters"))?;
            self.conn
                .execute_batch("COMMIT")
                .map_err(storage("committing an eviction"))
        })();
        if let Err(e) = r {
            let _ = self.conn.execute_batch("ROLLBACK");
            return Err(e);
        }
        if let Some(s) = self.streams.get_mut(name) {
            s.count -= count;
            s.bytes -= bytes;
        }
        Ok((count as u64, seq_of(min_id), seq_of(max_id)))
    }

    /// Evicts until under the low-water mark: mirrored records first (any class, lowest first),
    /// then unmirrored records of low, normal and high classes, oldest first, each recorded as a gap.
    /// Never an unmirrored protected record: if those alone exceed the budget, the log is `full`.
    fn evict(&mut self, report: &mut MaintenanceReport) -> Result<(), LogError> {
        let target = (self.budget() as f64 * LOW_WATER) as u64;
        let mut freed_fs_pages = false;
        let under = |w: &mut Writer| -> Result<bool, LogError> {
            Ok(w.used_bytes()? <= target && !w.fs_low)
        };
        for mirrored_pass in [true, false] {
            for class in Priority::ALL {
                if !mirrored_pass && class == Priority::Protected {
                    continue;
                }
                loop {
                    if under(self)? {
                        self.set_full(false);
                        return Ok(());
                    }
                    // The stream of this class with the oldest evictable record.
                    let mut best: Option<(String, u64, i64)> = None;
                    let names: Vec<String> = self.streams.keys().cloned().collect();
                    for name in names {
                        if self.shared.policy(&name).priority != class {
                            continue;
                        }
                        let st = self.streams[&name];
                        let bound = self.mirror_bound(&name, &st)?;
                        let Some((first, ts)) = self.first_record(&st)? else {
                            continue;
                        };
                        let (evictable, below) = if mirrored_pass {
                            (first < bound, bound)
                        } else {
                            (first >= bound && first < st.next_seq, st.next_seq)
                        };
                        if evictable && best.as_ref().is_none_or(|b| ts < b.2) {
                            best = Some((name, below, ts));
                        }
                    }
                    let Some((name, below, _)) = best else {
                        break;
                    };
                    let reason = if mirrored_pass {
                        None
                    } else {
                        Some(if self.fs_low {
                            "evicted: free disk space below min_free_disk"
                        } else {
                            "evicted: disk budget exceeded"
                        })
                    };
                    // Size the chunk to the bytes still to free, so eviction removes little more
                    // than it must.
                    let st = self.streams[&name];
                    let per_record =
                        (self.shared_page_overhead() + st.bytes.max(1) / st.count.max(1)).max(1);
                    let need = self.used_bytes()?.saturating_sub(target) as i64;
                    let limit = if self.fs_low {
                        EVICT_CHUNK
                    } else {
                        need / per_record + 1
                    };
                    let (n, first, last) = self.delete_chunk(&name, below, None, reason, limit)?;
                    if n == 0 {
                        break;
                    }
                    if mirrored_pass {
                        report.mirrored_evicted += n;
                        metrics::counter!("edge_log_evicted_total", "stream" => name.clone(), "mirrored" => "true").increment(n);
                    } else {
                        report.unmirrored_evicted += n;
                        metrics::counter!("edge_log_evicted_total", "stream" => name.clone(), "mirrored" => "false").increment(n);
                        tracing::warn!(stream = %name, first_seq = first, last_seq = last, count = n, class = %class,
                            "unmirrored records evicted to stay within the disk budget; a gap was recorded for HQ");
                    }
                    if self.fs_low && !freed_fs_pages {
                        // Give freed pages back to the filesystem when the floor, not the budget, is hit.
                        let _ = self.conn.execute_batch("PRAGMA incremental_vacuum(2000)");
                        self.refresh_fs_low(true);
                        freed_fs_pages = !self.fs_low;
                    }
                }
            }
        }
        if self.fs_low {
            let _ = self.conn.execute_batch("PRAGMA incremental_vacuum");
            self.refresh_fs_low(true);
        }
        let still_over = self.over_limits()?;
        self.set_full(still_over);
        report.full = still_over;
        Ok(())
    }

    fn retention(&mut self, report: &mut MaintenanceReport) -> Result<(), LogError> {
        let Some(keep) = self.cfg.retention else {
            return Ok(());
        };
        let cutoff = edge_core::time::now_ms() - keep.as_millis() as i64;
        let names: Vec<String> = self.streams.keys().cloned().collect();
        for name in names {
            let st = self.streams[&name];
            let bound = self.mirror_bound(&name, &st)?;
            loop {
                let (n, _, _) = self.delete_chunk(&name, bound, Some(cutoff), None, EVICT_CHUNK)?;
                report.retention_deleted += n;
                if n < EVICT_CHUNK as u64 {
                    break;
                }
            }
        }
        if report.retention_deleted > 0 {
            metrics::counter!("edge_log_retention_deleted_total")
                .increment(report.retention_deleted);
        }
        Ok(())
    }

    fn prune_dedup(&mut self, report: &mut MaintenanceReport) -> Result<(), LogError> {
        let window = self.cfg.dedup_window as i64;
        let n = self
            .conn
            .execute(
                "DELETE FROM dedup WHERE id IN (SELECT id FROM dedup WHERE id <= (SELECT max(id) FROM dedup) - ?1 ORDER BY id LIMIT ?2)",
                params![window, DEDUP_PRUNE_CHUNK],
            )
            .map_err(storage("pruning the dedup window"))?;
        report.dedup_forgotten = n as u64;
        Ok(())
    }

    fn maintain(&mut self) -> Result<MaintenanceReport, LogError> {
        let mut report = MaintenanceReport::default();
        self.retention(&mut report)?;
        self.prune_dedup(&mut report)?;
        self.refresh_fs_low(true);
        if self.over_limits()? {
            self.evict(&mut report)?;
        } else {
            self.set_full(false);
        }
        report.full = self.full;
        if report.retention_deleted + report.mirrored_evicted + report.unmirrored_evicted > 0 {
            self.shared.generation.send_modify(|g| *g += 1);
        }
        Ok(report)
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
struct Inserter<'c> {
    conn: &'c Connection,
    record: rusqlite::CachedStatement<'c>,
    dedup_check: Option<rusqlite::CachedStatement<'c>>,
    dedup_add: Option<rusqlite::CachedStatement<'c>>,
}

impl<'c> Inserter<'c> {
    fn new(conn: &'c Connection) -> Result<Self, LogError> {
        Ok(Inserter {
            conn,
            record: conn
                .prepare_cached(INSERT_RECORD)
                .map_err(storage("preparing inserts"))?,
            dedup_check: None,
            dedup_add: None,
        })
    }

    fn insert(
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
