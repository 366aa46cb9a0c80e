//! The disk budget and the free-space floor, on the writer thread (`writer.rs`).
//!
//! Two limits, checked after every commit (the filesystem at most once a second) and at every
//! maintenance pass:
//! * **the budget** bounds the database pages in use plus a moved-aside damaged database;
//! * **the floor** (`min_free_disk`) is met when the filesystem's free space *plus the free
//!   pages inside the database file* is at least the floor. Free pages count because they are
//!   ours to give back at once; counting them is what keeps the agent from evicting everything
//!   and then pausing intake on an empty log whose file has not shrunk yet.
//!
//! Over either limit the log evicts: mirrored records first (any class, lowest first), then the
//! moved-aside database, then unmirrored records of the low, normal and high classes, oldest
//! first, each range recorded as a gap. Never an unmirrored protected record: when only those
//! are left over a limit the log is **full** and intake pauses (`LogError::Full`); the usage
//! report says which limit and what holds the space.
//!
//! When the filesystem itself is below the floor, the free pages are **given back** (`reclaim`):
//! `PRAGMA incremental_vacuum` in steps, each followed by a `wal_checkpoint(TRUNCATE)`, which
//! copies the moved pages into the database, truncates the file to its new size and empties
//! the WAL. On a filesystem at 0 bytes free none of this could run (SQLite needs WAL room to
//! delete), so the reserve file (`space.rs`) is deleted first and recreated after. In the
//! reserve's room the WAL is checkpointed and emptied before anything is deleted (and again
//! between eviction chunks): pages it still holds may grow the database file when copied, and
//! deletes appended behind them would take that room for good.

use super::queries::{self, row_id, seq_of, storage};
use super::space::{RESERVE_BYTES, fs_free};
use super::writer::{StreamState, Writer};
use crate::log::{ClassUsages, DiskUsage, FullCause, LogError, MaintenanceReport};
use edge_core::Priority;
use rusqlite::{OptionalExtension, params};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Records deleted per eviction/retention transaction.
pub(super) const EVICT_CHUNK: i64 = 5_000;
/// Evict down to this fraction of the budget, so eviction does not run on every commit.
const LOW_WATER: f64 = 0.95;
/// How often the filesystem free space is checked on the commit path.
const FS_CHECK_EVERY: Duration = Duration::from_secs(1);
/// Fewest free pages given back per reclaim step.
const RECLAIM_STEP_MIN_PAGES: u64 = 64;
/// Reclaim steps per call at most (the rest waits for the next check).
const RECLAIM_MAX_STEPS: usize = 64;
/// Longest wait of a reclaim checkpoint for readers to leave the WAL.
const RECLAIM_CHECKPOINT_WAIT: Duration = Duration::from_millis(200);

/// The database's pages at one moment.
#[derive(Clone, Copy)]
pub(super) struct Pages {
    /// Bytes of pages in use.
    pub(super) used: u64,
    /// Bytes of free pages inside the file.
    pub(super) free: u64,
    pub(super) file: u64,
}

/// Space state of the writer.
pub(super) struct Space {
    pub(super) full: bool,
    pub(super) full_cause: Option<FullCause>,
    pub(super) last_fs_check: Option<Instant>,
    pub(super) last_reclaim: Option<Instant>,
    /// Filesystem free bytes at the last check.
    pub(super) fs_free: Option<u64>,
    /// A commit failed; check the filesystem at once rather than within a second.
    pub(super) recheck: bool,
    pub(super) reserve: super::space::Reserve,
    pub(super) aside: super::space::MovedAside,
    pub(super) classes: ClassUsages,
}

impl Writer {
    /// Bytes a record costs beyond its payload (row header, key columns, B-tree share).
    fn shared_page_overhead(&self) -> i64 {
        48
    }

    fn budget(&self) -> u64 {
        self.cfg.disk_budget.as_u64()
    }

    fn floor(&self) -> u64 {
        self.cfg.min_free_disk.as_u64()
    }

    /// Measures the pages and publishes the whole usage report.
    pub(super) fn pages(&self) -> Result<Pages, LogError> {
        let (used, file) =
            queries::page_usage(&self.conn).map_err(storage("measuring disk use"))?;
        let p = Pages {
            used,
            free: file.saturating_sub(used),
            file,
        };
        self.publish_usage(&p);
        Ok(p)
    }

    fn publish_usage(&self, p: &Pages) {
        let mut u = self.shared.usage.lock().unwrap_or_else(|e| e.into_inner());
        *u = DiskUsage {
            used_bytes: p.used,
            file_bytes: p.file,
            reclaimable_bytes: p.free,
            wal_bytes: u.wal_bytes,
            reserve_bytes: self.space.reserve.held(),
            moved_aside_bytes: self.space.aside.bytes(),
            budget_bytes: self.budget(),
            fs_free_bytes: self.space.fs_free.unwrap_or(0),
            min_free_bytes: self.floor(),
            classes: self.space.classes,
            full: self.space.full,
            full_cause: self.space.full_cause,
        };
    }

    /// Re-reads the filesystem's free space when due (or `force`). Returns whether it did.
    pub(super) fn refresh_fs(&mut self, force: bool) -> bool {
        // Near the floor a second of ingest can fill what is left: check at every commit then
        // (statvfs is one cheap system call).
        let near = self.space.fs_free.is_some_and(|f| {
            f < 2 * (self.fs_need() + self.cfg.wal_size_limit.as_u64()).max(RESERVE_BYTES)
        });
        let due = force
            || near
            || std::mem::take(&mut self.space.recheck)
            || self
                .space
                .last_fs_check
                .is_none_or(|t| t.elapsed() >= FS_CHECK_EVERY);
        if !due {
            return false;
        }
        self.space.last_fs_check = Some(Instant::now());
        if let Some(free) = fs_free(&self.data_dir) {
            self.space.fs_free = Some(free);
            // Room came back (or was never used): put the reserve in place.
            self.space.reserve.restore(free, self.floor());
            if self.space.reserve.held() > 0 {
                self.space.fs_free = fs_free(&self.data_dir).or(Some(free));
            }
        }
        true
    }

    fn over_budget(&self, p: &Pages, target: u64) -> bool {
        p.used + self.space.aside.bytes() > target
    }

    /// Free space the log needs on the filesystem: the floor, plus room to put back a released
    /// reserve (so that eviction makes that room too, and the reserve is not lost for good on
    /// a filesystem that sits at the floor). Without a floor, only the reserve's room.
    fn fs_need(&self) -> u64 {
        self.floor() + RESERVE_BYTES.saturating_sub(self.space.reserve.held())
    }

    /// Below the floor even after counting the free pages we can give back.
    fn below_floor(&self, p: &Pages) -> bool {
        self.floor() > 0
            && self
                .space
                .fs_free
                .is_some_and(|f| f + p.free < self.fs_need())
    }

    /// Below the floor itself, not counting the room a released reserve would take back: only
    /// this pauses intake. (Eviction also makes the reserve's room, but a log with nothing left to
    /// evict and the floor met keeps taking sales without its reserve.)
    fn below_strict_floor(&self, p: &Pages) -> bool {
        self.floor() > 0
            && self
                .space
                .fs_free
                .is_some_and(|f| f + p.free < self.floor())
    }

    /// The filesystem itself is short: below what the log needs there, or nearly full.
    fn fs_short(&self) -> bool {
        self.space
            .fs_free
            .is_some_and(|f| f < self.fs_need().max(RESERVE_BYTES))
    }

    pub(super) fn over_limits(&mut self) -> Result<bool, LogError> {
        let p = self.pages()?;
        Ok(self.over_budget(&p, self.budget()) || self.below_floor(&p))
    }

    /// Called after every commit: evict when over a limit, give pages back when the filesystem
    /// is short, set or clear `full`.
    pub(super) fn check_budget(&mut self) {
        let measured = self.refresh_fs(false);
        if measured {
            self.measure_classes();
        }
        match self.over_limits() {
            Ok(false) => {
                self.set_full(None);
                let due = self
                    .space
                    .last_reclaim
                    .is_none_or(|t| t.elapsed() >= FS_CHECK_EVERY);
                if measured && due && self.fs_short() {
                    let mut report = MaintenanceReport::default();
                    if let Err(e) = self.reclaim(&mut report) {
                        tracing::warn!(error = %e, "could not give free pages back to the filesystem; tried again at the next check");
                    }
                }
            }
            Ok(true) => {
                let mut report = MaintenanceReport::default();
                if let Err(e) = self.evict(&mut report) {
                    self.space.recheck = true;
                    tracing::error!(error = %e, "eviction failed; intake may pause until it succeeds");
                }
            }
            Err(e) => tracing::warn!(error = %e, "could not measure the log's disk use"),
        }
    }

    pub(super) fn set_full(&mut self, cause: Option<FullCause>) {
        let full = cause.is_some();
        if cause != self.space.full_cause {
            self.space.full_cause = cause;
            self.measure_classes();
            let u = *self.shared.usage.lock().unwrap_or_else(|e| e.into_inner());
            let c = &self.space.classes.protected;
            match cause {
                Some(cause) => tracing::error!(
                    %cause,
                    budget = u.budget_bytes,
                    used = u.used_bytes,
                    unmirrored_protected_records = c.unmirrored_records,
                    unmirrored_protected_bytes = c.unmirrored_payload_bytes,
                    reclaimable = u.reclaimable_bytes,
                    wal = u.wal_bytes,
                    reserve = u.reserve_bytes,
                    moved_aside = u.moved_aside_bytes,
                    fs_free = u.fs_free_bytes,
                    min_free_disk = u.min_free_bytes,
                    "the local log is full: intake is paused (backpressure) until the uplink drains or space is freed"
                ),
                None => tracing::info!("the local log is within its limits again; intake resumed"),
            }
        }
        self.space.full = full;
        self.shared.full.store(full, Ordering::Relaxed);
        {
            let mut u = self.shared.usage.lock().unwrap_or_else(|e| e.into_inner());
            u.full = full;
            u.full_cause = cause;
            u.classes = self.space.classes;
        }
        metrics::gauge!("edge_log_full").set(if full { 1.0 } else { 0.0 });
    }

    /// Records and payload per class, with the share not yet mirrored (two indexed lookups per
    /// stream; run at maintenance and on a change of the full state, not per commit).
    pub(super) fn measure_classes(&mut self) {
        let mut classes = ClassUsages::default();
        let names: Vec<String> = self.streams.keys().cloned().collect();
        for name in names {
            let st = self.streams[&name];
            let c = classes.get_mut(self.shared.policy(&name).priority);
            let (count, bytes) = (st.count.max(0) as u64, st.bytes.max(0) as u64);
            c.records += count;
            c.payload_bytes += bytes;
            let Ok(bound) = self.mirror_bound(&name, &st) else {
                continue;
            };
            let first = match self.first_record(&st) {
                Ok(Some((first, _))) => first,
                _ => continue,
            };
            // Holes below the bound come from eviction at the front; above it only from a
            // quarantined row, so the seq range is the count to within those.
            let unmirrored = st.next_seq.saturating_sub(bound.max(first)).min(count);
            c.unmirrored_records += unmirrored;
            c.unmirrored_payload_bytes += bytes.checked_div(count).unwrap_or(0) * unmirrored;
        }
        self.space.classes = classes;
        self.shared
            .usage
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .classes = classes;
    }

    /// The seq below which a stream's records are mirrored (safe to drop without a gap).
    pub(super) fn mirror_bound(&self, name: &str, st: &StreamState) -> Result<u64, LogError> {
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
    pub(super) fn delete_chunk(
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

    /// Evicts until under the low-water mark of the budget and above the floor (see the module
    /// doc for the order), gives pages back when the filesystem is short, and sets `full` only
    /// when nothing more may go.
    pub(super) fn evict(&mut self, report: &mut MaintenanceReport) -> Result<(), LogError> {
        let target = (self.budget() as f64 * LOW_WATER) as u64;
        if self.fs_short() {
            // Deleting needs WAL room, which a full filesystem does not have.
            self.space.reserve.release();
            self.settle_wal(
                "emptying the WAL before an eviction on a full filesystem",
                Duration::ZERO,
            )?;
            self.refresh_fs(true);
        }
        let r = self.evict_passes(target, report);
        // Give the space back even when eviction failed half way: what was deleted is free.
        let reclaimed = self.reclaim(report);
        r?;
        reclaimed?;
        let p = self.pages()?;
        let cause = if self.over_budget(&p, self.budget()) {
            Some(FullCause::Budget)
        } else if self.below_strict_floor(&p) {
            Some(FullCause::FreeSpace)
        } else {
            None
        };
        self.set_full(cause);
        report.full = cause.is_some();
        Ok(())
    }

    fn evict_passes(
        &mut self,
        target: u64,
        report: &mut MaintenanceReport,
    ) -> Result<(), LogError> {
        let under = |w: &mut Writer| -> Result<bool, LogError> {
            let p = w.pages()?;
            Ok(!w.over_budget(&p, target) && !w.below_floor(&p))
        };
        for mirrored_pass in [true, false] {
            if !mirrored_pass && self.space.aside.bytes() > 0 && !under(self)? {
                // A forensics copy is worth less than an unmirrored record HQ has not seen.
                self.space
                    .aside
                    .delete("the disk budget or the free-space floor needed the room");
                self.refresh_fs(true);
            }
            for class in Priority::ALL {
                if !mirrored_pass && class == Priority::Protected {
                    continue;
                }
                loop {
                    if under(self)? {
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
                    let p = self.pages()?;
                    let for_budget = (p.used + self.space.aside.bytes()).saturating_sub(target);
                    let for_floor = if self.below_floor(&p) {
                        self.fs_need()
                            .saturating_sub(self.space.fs_free.unwrap_or(0) + p.free)
                    } else {
                        0
                    };
                    let reason = if mirrored_pass {
                        None
                    } else {
                        Some(if for_floor > 0 {
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
                    let need = for_budget.max(for_floor) as i64;
                    let limit = need / per_record + 1;
                    let (n, first, last) = self.delete_chunk(&name, below, None, reason, limit)?;
                    if n == 0 {
                        break;
                    }
                    if self.fs_short() {
                        // The next chunk reuses this one's WAL room instead of adding to it.
                        self.settle_wal(
                            "emptying the WAL between evictions on a full filesystem",
                            Duration::ZERO,
                        )?;
                        self.refresh_fs(true);
                    }
                    if mirrored_pass {
                        report.mirrored_evicted += n;
                        metrics::counter!("edge_log_evicted_total", "stream" => name.clone(), "mirrored" => "true").increment(n);
                    } else {
                        report.unmirrored_evicted += n;
                        metrics::counter!("edge_log_evicted_total", "stream" => name.clone(), "mirrored" => "false").increment(n);
                        tracing::warn!(stream = %name, first_seq = first, last_seq = last, count = n, class = %class,
                            "unmirrored records evicted to stay within the disk budget or above the free-space floor; a gap was recorded for HQ");
                    }
                }
            }
        }
        Ok(())
    }

    /// Copies what the WAL holds into the database, truncates the file to its size and empties
    /// the WAL (a TRUNCATE checkpoint). On a short filesystem this comes before any delete: the
    /// WAL may still hold pages that grow the database file when copied (committed within a
    /// checkpoint interval of the filesystem filling up, or held back by a reader), and deletes
    /// appended behind them would take the room that copy needs, after which no checkpoint and
    /// no delete could run again (seen in CI: "database or disk is full" at every maintenance).
    /// A reader's snapshot makes it wait at most `wait` (on the commit path, none: what the
    /// readers allow is copied at once); returns whether the WAL is empty now.
    fn settle_wal(&mut self, what: &'static str, wait: Duration) -> Result<bool, LogError> {
        let _ = self.conn.busy_timeout(wait);
        let checkpoint = self
            .conn
            .query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |r| {
                r.get::<_, i64>(0)
            });
        let _ = self.conn.busy_timeout(Duration::from_secs(5));
        match checkpoint {
            Ok(busy) => Ok(busy == 0),
            Err(e) => {
                let wal = self.shared.wal_bytes.load(Ordering::Relaxed);
                tracing::error!(
                    error = %e,
                    wal_bytes = wal,
                    fs_free = self.space.fs_free.unwrap_or(0),
                    dir = %self.data_dir.display(),
                    "the log cannot copy its WAL into the database: the filesystem has no room for the pages it adds; free space on this filesystem (the agent keeps retrying)"
                );
                Err(storage(what)(e))
            }
        }
    }

    /// Gives free pages back to the filesystem while it is short: incremental vacuum in steps
    /// sized to the room there is, each followed by a TRUNCATE checkpoint (which shrinks the
    /// database file and empties the WAL). A reader holding a snapshot defers the truncation to
    /// a later check; nothing is lost.
    pub(super) fn reclaim(&mut self, report: &mut MaintenanceReport) -> Result<(), LogError> {
        self.refresh_fs(true);
        if !self.fs_short() {
            return Ok(());
        }
        self.space.last_reclaim = Some(Instant::now());
        self.space.reserve.release();
        self.settle_wal(
            "emptying the WAL before giving pages back",
            RECLAIM_CHECKPOINT_WAIT,
        )?;
        let page: u64 = self
            .conn
            .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
            .map_err(storage("reading the page size"))?
            .max(512) as u64;
        let before = self.pages()?.file;
        let mut result = Ok(());
        for _ in 0..RECLAIM_MAX_STEPS {
            let p = self.pages()?;
            let free_pages = p.free / page;
            if free_pages > 0 {
                // Each page moved costs about two WAL frames (the page, its parent or its
                // pointer-map page) until the checkpoint below.
                let room = fs_free(&self.data_dir).unwrap_or(0);
                let step = (room / (2 * (page + 24)))
                    .max(RECLAIM_STEP_MIN_PAGES)
                    .min(free_pages);
                // The pragma frees one page per step of its statement (a row each): step it to
                // the end. (`execute_batch` steps once, which freed a single page.)
                let r = self
                    .conn
                    .prepare(&format!("PRAGMA incremental_vacuum({step})"))
                    .and_then(|mut s| {
                        let mut rows = s.query([])?;
                        while rows.next()?.is_some() {}
                        Ok(())
                    });
                if let Err(e) = r {
                    result = Err(storage("giving free pages back")(e));
                    break;
                }
            }
            match self.settle_wal(
                "checkpointing after giving pages back",
                RECLAIM_CHECKPOINT_WAIT,
            ) {
                Ok(true) if free_pages > 0 => {}
                Ok(_) => break,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        self.refresh_fs(true);
        let after = self.pages()?.file;
        let freed = before.saturating_sub(after);
        if freed > 0 {
            report.reclaimed_bytes += freed;
            metrics::counter!("edge_log_reclaimed_bytes_total").increment(freed);
            tracing::info!(
                bytes = freed,
                file = after,
                fs_free = self.space.fs_free.unwrap_or(0),
                "free database pages given back to the filesystem"
            );
        }
        result
    }
}
