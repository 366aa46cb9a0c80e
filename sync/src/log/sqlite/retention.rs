//! Periodic maintenance on the writer thread: retention of mirrored records, the dedup window,
//! then the disk budget (`evict.rs`).

use super::evict::EVICT_CHUNK;
use super::queries::storage;
use super::writer::Writer;
use crate::log::{LogError, MaintenanceReport};
use rusqlite::{OptionalExtension, params};

/// Dedup entries forgotten per maintenance pass at most (bounds the pass's duration).
const DEDUP_PRUNE_CHUNK: i64 = 200_000;
/// Reported gap markers pruned per maintenance pass at most.
const GAP_PRUNE_CHUNK: i64 = 10_000;

impl Writer {
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

    /// The id of the last gap the uplink reported to HQ (`<mirror_cursor>.gap_id`, written by
    /// the uplink after the Kafka commit that carried it).
    fn reported_gap_id(&self) -> Result<i64, LogError> {
        let v: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT value FROM kv WHERE key = ?1")
            .and_then(|mut s| {
                s.query_row([format!("{}.gap_id", self.cfg.mirror_cursor)], |r| r.get(0))
                    .optional()
            })
            .map_err(storage("reading the reported gap id"))?;
        Ok(v.and_then(|v| String::from_utf8(v).ok())
            .and_then(|s| s.trim().parse::<i64>().ok())
            .unwrap_or(0)
            .max(0))
    }

    /// Deletes gap markers HQ already has, folding their counts into `gap_totals` in the same
    /// transaction, so the summary in status keeps counting them.
    fn prune_gaps(&mut self, report: &mut MaintenanceReport) -> Result<(), LogError> {
        let reported = self.reported_gap_id()?;
        if reported == 0 {
            return Ok(());
        }
        self.conn
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(storage("beginning to prune gaps"))?;
        let r = (|| -> Result<u64, LogError> {
            let upto: Option<i64> = self
                .conn
                .query_row(
                    "SELECT max(id) FROM (SELECT id FROM gaps WHERE id <= ?1 ORDER BY id LIMIT ?2)",
                    params![reported, GAP_PRUNE_CHUNK],
                    |r| r.get(0),
                )
                .map_err(storage("selecting reported gaps"))?;
            let Some(upto) = upto else {
                return Ok(0);
            };
            self.conn
                .execute(
                    "INSERT INTO gap_totals (stream_id, kind, ranges, records)
                     SELECT stream_id, substr(reason, 1, instr(reason || ':', ':') - 1) AS k,
                            count(*), coalesce(sum(count), 0)
                       FROM gaps WHERE id <= ?1 GROUP BY stream_id, k
                     ON CONFLICT (stream_id, kind) DO UPDATE SET
                       ranges = ranges + excluded.ranges, records = records + excluded.records",
                    [upto],
                )
                .map_err(storage("counting pruned gaps"))?;
            let n = self
                .conn
                .execute("DELETE FROM gaps WHERE id <= ?1", [upto])
                .map_err(storage("pruning reported gaps"))?;
            Ok(n as u64)
        })();
        match r {
            Ok(n) => {
                self.conn
                    .execute_batch("COMMIT")
                    .map_err(storage("committing pruned gaps"))?;
                report.gaps_pruned += n;
                Ok(())
            }
            Err(e) => {
                let _ = self.conn.execute_batch("ROLLBACK");
                Err(e)
            }
        }
    }

    pub(super) fn maintain(&mut self) -> Result<MaintenanceReport, LogError> {
        let mut report = MaintenanceReport::default();
        self.retention(&mut report)?;
        self.prune_dedup(&mut report)?;
        self.prune_gaps(&mut report)?;
        self.refresh_fs(true);
        self.measure_classes();
        if self.over_limits()? {
            self.evict(&mut report)?;
        } else {
            self.set_full(None);
            self.reclaim(&mut report)?;
        }
        report.full = self.space.full;
        if report.retention_deleted + report.mirrored_evicted + report.unmirrored_evicted > 0 {
            self.shared.generation.send_modify(|g| *g += 1);
        }
        Ok(report)
    }
}
