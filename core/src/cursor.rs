//! The one durable-cursor reader: "read the records of stream S after my cursor, wait for new
//! commits when caught up, commit my cursor".
//!
//! Invariants:
//!
//! * **At least once.** Reading does not move the cursor; only [`CursorReader::commit`] does. Until
//!   the consumer commits, every read returns the same records again, so a consumer that commits
//!   after it has done its work (published, shown, forwarded) never loses a record, and a crash
//!   repeats at most the uncommitted batch.
//! * **Durable position.** A commit is a cursor move in the log ([`AppendRequest::cursor`]) and
//!   returns after it is durable; a reader opened again with the same names resumes there.
//! * **No polling.** A caught-up reader waits on the log's commit notification
//!   ([`Log::subscribe`]); no read is issued while the stream has nothing past the cursor.

use crate::Event;
use crate::log::{AppendRequest, AppendTicket, Log, LogError, ReadBatch, ReadLimits};
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Where a cursor that was never committed starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// At seq 1: everything still stored.
    Earliest,
    /// At the stream's head: what was stored before the first start is skipped.
    Latest,
}

/// Reads one stream from one named durable cursor. See the module docs.
pub struct CursorReader {
    log: Arc<dyn Log>,
    cursor: String,
    stream: String,
    /// The next seq to read: the committed position.
    next_seq: u64,
    /// No cursor was committed when the reader was opened (and none since).
    new: bool,
    limits: ReadLimits,
    commits: watch::Receiver<u64>,
}

impl std::fmt::Debug for CursorReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CursorReader")
            .field("cursor", &self.cursor)
            .field("stream", &self.stream)
            .field("next_seq", &self.next_seq)
            .finish()
    }
}

impl CursorReader {
    /// Opens `cursor` on `stream` at its committed position or, if it was never committed, at
    /// `start` (nothing is written; see [`CursorReader::remember_start`]).
    pub async fn open(
        log: Arc<dyn Log>,
        cursor: impl Into<String>,
        stream: impl Into<String>,
        start: Start,
    ) -> Result<CursorReader, LogError> {
        let cursor = cursor.into();
        let stream = stream.into();
        // Subscribe before reading the position, so no commit after it goes unnoticed.
        let commits = log.subscribe();
        let committed = log.cursor(&cursor, &stream).await?;
        let next_seq = committed.unwrap_or_else(|| match start {
            Start::Earliest => 1,
            Start::Latest => log.next_seq(&stream).unwrap_or(1),
        });
        Ok(CursorReader {
            log,
            cursor,
            stream,
            next_seq,
            new: committed.is_none(),
            limits: ReadLimits::default(),
            commits,
        })
    }

    /// Bounds of every read (default [`ReadLimits::default`]).
    pub fn with_limits(mut self, limits: ReadLimits) -> CursorReader {
        self.limits = limits;
        self
    }

    pub fn cursor(&self) -> &str {
        &self.cursor
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    /// The next seq a read returns (the committed position, or the start of a new cursor).
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Commits the start position of a cursor that was never committed, so that a restart neither
    /// skips nor replays what arrives in between. Does nothing for a committed cursor.
    pub async fn remember_start(&mut self) -> Result<(), LogError> {
        if self.new {
            self.commit(self.next_seq).await?;
        }
        Ok(())
    }

    /// Reads what is past the cursor, without waiting. `None` when there is nothing: the stream's
    /// head is at the cursor (no I/O then), or the read found nothing. A batch may hold no records
    /// and still move `next_seq` (holes, quarantined rows); commit it like any other.
    pub async fn try_batch(&mut self) -> Result<Option<ReadBatch>, LogError> {
        // Seen before the read: a commit after this point wakes `wait_for_commit`.
        self.commits.borrow_and_update();
        if self.log.next_seq(&self.stream).unwrap_or(1) <= self.next_seq {
            return Ok(None);
        }
        let batch = self
            .log
            .read(&self.stream, self.next_seq, self.limits)
            .await?;
        Ok((batch.next_seq > self.next_seq).then_some(batch))
    }

    /// Waits until the log commits anything after the last [`CursorReader::try_batch`]. Returns
    /// `false` when the log is closed.
    pub async fn wait_for_commit(&mut self) -> bool {
        self.commits.changed().await.is_ok()
    }

    /// The next batch past the cursor, waiting for new commits while caught up. `None` when
    /// `cancel` fires or the log closes first.
    pub async fn next_batch(
        &mut self,
        cancel: &CancellationToken,
    ) -> Result<Option<ReadBatch>, LogError> {
        loop {
            if cancel.is_cancelled() {
                return Ok(None);
            }
            if let Some(b) = self.try_batch().await? {
                return Ok(Some(b));
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ok(None),
                open = self.wait_for_commit() => if !open { return Ok(None) },
            }
        }
    }

    /// Moves the read position to `next_seq` without committing it: for a reader whose state is
    /// rebuilt from the stream at every start (the cursor is never stored).
    pub fn advance(&mut self, next_seq: u64) {
        self.next_seq = self.next_seq.max(next_seq);
    }

    /// Moves the cursor durably to `next_seq` (normally a batch's `next_seq`: everything below it
    /// is done). Returns after the move is durable.
    pub async fn commit(&mut self, next_seq: u64) -> Result<(), LogError> {
        self.commit_with(next_seq, Vec::new()).await
    }

    /// [`CursorReader::commit`] with events appended in the same transaction (e.g. the dead
    /// letters of records the reader could not deliver): they are stored once, with the move
    /// past them, even across a crash.
    pub async fn commit_with(&mut self, next_seq: u64, events: Vec<Event>) -> Result<(), LogError> {
        let mut req = AppendRequest::cursor(&self.cursor, &self.stream, next_seq);
        req.events = events;
        self.log.append(req).await?;
        self.next_seq = next_seq;
        self.new = false;
        Ok(())
    }

    /// [`CursorReader::commit_with`] without waiting for durability: the commit is queued in
    /// the log's FIFO and the reader reads on from `next_seq` at once. The returned ticket
    /// resolves when the cursor move (and `events`) is durable; a failure there means the durable
    /// cursor is still behind, so the caller must stop and reopen it (at-least-once consumers
    /// then see the records again). Await one ticket before submitting the next, so a failed
    /// move is seen before a later one.
    pub async fn submit_with(
        &mut self,
        next_seq: u64,
        events: Vec<Event>,
    ) -> Result<AppendTicket, LogError> {
        let mut req = AppendRequest::cursor(&self.cursor, &self.stream, next_seq);
        req.events = events;
        let ticket = self.log.submit(req).await?;
        self.next_seq = next_seq;
        self.new = false;
        Ok(ticket)
    }
}
