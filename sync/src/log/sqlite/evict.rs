//! The disk budget and the free-space floor: measuring what the log holds, evicting (mirrored
//! records first, then unmirrored ones of the lowest class, each range recorded as a gap), and
//! pausing intake only when nothing more may go. Runs on the writer thread (`writer.rs`).

use super::queries::{self, row_id, seq_of, storage};
use super::writer::{StreamState, Writer};
use crate::log::{LogError, MaintenanceReport};
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

impl Writer {
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

    pub(super) fn refresh_fs_low(&mut self, force: bool) {
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

    pub(super) fn over_limits(&mut self) -> Result<bool, LogError> {
        Ok(self.used_bytes()? > self.budget() || self.fs_low)
    }

    /// Called after every commit: evict when over budget, set or clear `full`.
    pub(super) fn check_budget(&mut self) {
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

    pub(super) fn set_full(&mut self, full: bool) {
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

    /// Evicts until under the low-water mark: mirrored records first (any class, lowest first),
    /// then unmirrored records of low, normal and high classes, oldest first, each recorded as a gap.
    /// Never an unmirrored protected record: if those alone exceed the budget, the log is `full`.
    pub(super) fn evict(&mut self, report: &mut MaintenanceReport) -> Result<(), LogError> {
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
}
