//! Damaged rows found by readers: each is moved to the deadletter stream (or, when SQLite cannot
//! read it at all, recorded once) and leaves a gap. Each quarantine commits on its own, never in a
//! batch of appends, so a damaged page cannot make intake fail.

use super::queries::{self, row_id, storage};
use super::writer::{Inserter, Writer};
use crate::deadletter;
use crate::log::{Appended, LogError};
use edge_core::Event;
use rusqlite::{OptionalExtension, params};
use std::sync::Arc;

impl Writer {
    pub(super) fn commit_quarantine(&mut self, stream: &str, seq: u64, reason: &str) {
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
}
