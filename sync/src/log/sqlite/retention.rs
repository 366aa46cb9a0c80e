//! Periodic maintenance on the writer thread: retention of mirrored records, the dedup window,
//! then the disk budget (`evict.rs`).

use super::evict::EVICT_CHUNK;
use super::queries::{row_id, seq_of, storage};
use super::writer::{StreamState, Writer};
use crate::log::{LogError, MaintenanceReport};
use rusqlite::{OptionalExtension, params};
use std::collections::HashSet;

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

    /// Compacts the streams with `keep_latest_per_key` (the `hq.*` streams by default): of the
    /// records older than the newest `history`, deletes those a newer record has the entity key
    /// of (the key of a record routed by its `edge.store` header, or a `<store>/<entity>` key;
    /// a routing key such as `*` or the store id names no entity, and such records stay).
    /// Records the mirror cursor has not passed stay (a stream mirrored to HQ gets no hole). A stream is rescanned once it
    /// has doubled since its last compaction, so the scan costs O(1) per record and the stream
    /// stays below twice its live keys plus its history.
    fn compact(&mut self, report: &mut MaintenanceReport) -> Result<(), LogError> {
        let names: Vec<String> = self.streams.keys().cloned().collect();
        for name in names {
            let Some(history) = self.shared.policy(&name).compact_history else {
                continue;
            };
            let st = self.streams[&name];
            let kept = self.compacted.get(&name).copied().unwrap_or(0);
            let count = st.count.max(0) as u64;
            if count <= history || count < kept.saturating_mul(2) {
                continue;
            }
            let n = self.compact_stream(&name, st, history)?;
            report.compacted += n;
            let left = self.streams[&name].count.max(0) as u64;
            self.compacted.insert(name, left);
        }
        if report.compacted > 0 {
            metrics::counter!("edge_log_compacted_total").increment(report.compacted);
        }
        Ok(())
    }

    fn compact_stream(
        &mut self,
        name: &str,
        st: StreamState,
        history: u64,
    ) -> Result<u64, LogError> {
        let (lo, hi) = (row_id(st.id, 1), row_id(st.id + 1, 0));
        // Superseded records may go up to the mirror cursor (all of them when the stream is
        // not mirrored or no uplink mirrors it).
        let mirror: Option<i64> = self
            .conn
            .prepare_cached("SELECT next_seq FROM cursors WHERE name = ?1 AND stream_id = ?2")
            .and_then(|mut s| {
                s.query_row(params![self.cfg.mirror_cursor, st.id], |r| r.get(0))
                    .optional()
            })
            .map_err(storage("reading the mirror cursor"))?;
        let mirror_bound = match mirror {
            Some(c) if self.shared.policy(name).mirrored => c.max(0) as u64,
            _ => st.next_seq,
        };
        let mut doomed: Vec<(i64, i64)> = Vec::new();
        {
            let mut seen: HashSet<String> = HashSet::new();
            let mut stmt = self
                .conn
                .prepare_cached(
                    "SELECT id, key, length(payload), instr(coalesce(headers, ''), '\"edge.store\"') > 0
                       FROM records WHERE id >= ?1 AND id < ?2 ORDER BY id DESC",
                )
                .map_err(storage("scanning a compacted stream"))?;
            let mut rows = stmt
                .query(params![lo, hi])
                .map_err(storage("scanning a compacted stream"))?;
            let mut newest = 0u64;
            while let Some(r) = rows
                .next()
                .map_err(storage("scanning a compacted stream"))?
            {
                let id: i64 = r.get(0).map_err(storage("scanning a compacted stream"))?;
                let key: Option<String> =
                    r.get(1).map_err(storage("scanning a compacted stream"))?;
                let len: i64 = r.get(2).map_err(storage("scanning a compacted stream"))?;
                let routed_by_header: bool =
                    r.get(3).map_err(storage("scanning a compacted stream"))?;
                newest += 1;
                let seq = seq_of(id);
                let in_history = newest <= history;
                // Only an entity key supersedes: a key under an `edge.store` header, or a
                // `<store>/<entity>` key. A key that only routes the record (`*`, empty, the
                // store id) names no entity: two prices for all stores are two prices.
                let entity = key.filter(|k| routed_by_header || k.contains('/'));
                let delete = match entity {
                    Some(k) => !seen.insert(k) && !in_history && seq < mirror_bound,
                    None => false,
                };
                if delete {
                    doomed.push((id, len));
                }
            }
        }
        let mut deleted = 0u64;
        for chunk in doomed.chunks(EVICT_CHUNK as usize) {
            let bytes: i64 = chunk.iter().map(|(_, l)| l).sum();
            self.conn
                .execute_batch("BEGIN IMMEDIATE")
                .map_err(storage("beginning a compaction"))?;
            let r = (|| -> Result<(), LogError> {
                let mut del = self
                    .conn
                    .prepare_cached("DELETE FROM records WHERE id = ?1")
                    .map_err(storage("compacting records"))?;
                for (id, _) in chunk {
                    del.execute([id]).map_err(storage("compacting records"))?;
                }
                self.conn
                    .prepare_cached(
                        "UPDATE streams SET record_count = record_count - ?1, payload_bytes = payload_bytes - ?2 WHERE id = ?3",
                    )
                    .and_then(|mut s| s.execute(params![chunk.len() as i64, bytes, st.id]))
                    .map_err(storage("updating stream counters"))?;
                self.conn
                    .execute_batch("COMMIT")
                    .map_err(storage("committing a compaction"))
            })();
            if let Err(e) = r {
                let _ = self.conn.execute_batch("ROLLBACK");
                return Err(e);
            }
            if let Some(s) = self.streams.get_mut(name) {
                s.count -= chunk.len() as i64;
                s.bytes -= bytes;
            }
            deleted += chunk.len() as u64;
        }
        if deleted > 0 {
            tracing::debug!(
                stream = name,
                deleted,
                "compacted: superseded records removed"
            );
        }
        Ok(deleted)
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
        self.compact(&mut report)?;
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
        if report.retention_deleted
            + report.compacted
            + report.mirrored_evicted
            + report.unmirrored_evicted
            > 0
        {
            self.shared.generation.send_modify(|g| *g += 1);
        }
        Ok(report)
    }
}
