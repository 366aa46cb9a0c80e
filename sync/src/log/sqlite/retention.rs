//! Periodic maintenance on the writer thread: retention of mirrored records, the dedup window,
//! then the disk budget (`evict.rs`).

use super::evict::EVICT_CHUNK;
use super::queries::storage;
use super::writer::Writer;
use crate::log::{LogError, MaintenanceReport};
use rusqlite::params;

/// Dedup entries forgotten per maintenance pass at most (bounds the pass's duration).
const DEDUP_PRUNE_CHUNK: i64 = 200_000;

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

    pub(super) fn maintain(&mut self) -> Result<MaintenanceReport, LogError> {
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
