//! exactly_once: one transactional producer per store; each transaction holds a batch of records,
//! the gap and heartbeat records that go with it, and the checkpoint.
//!
//! Session: `init_transactions` (fences every older producer of this store and finishes or aborts
//! its last transaction) -> read the checkpoint (`read_committed`) -> resume each stream at
//! `max(local cursor, checkpoint)` -> loop { begin; stream fair chunks of records from the log
//! into the transaction until `batch_max_records`, `batch_max_bytes` or [`TXN_MAX_OPEN_MS`] is
//! reached or nothing is pending; gaps, heartbeat, checkpoint; commit; then move the local
//! cursor }. Reading the next chunk overlaps with sending the last one, and the first chunk of the
//! next transaction is read while a commit is in flight. A failed transaction is aborted and its records are read
//! again from the log; a fatal producer error (fenced, epoch lost) ends the session and the next
//! one starts over from the checkpoint.

use super::progress::{Link, report};
use super::record::{H_EPOCH, H_STORE};
use super::{
    Batch, Extra, KafkaProducer, Lanes, Part, RecordShape, Refused, Runner, Stop, Token,
    UNTRACKED_LANE, UplinkError, extra_headers, send_blocking, send_record,
};
use crate::kafka::checkpoint::{
    Checkpoint, CheckpointError, OffsetLookup, StreamCheckpoint, checkpoint_group_metadata,
    checkpoint_offsets, lookup_checkpoint_offset, read_checkpoint,
};
use crate::kafka::config::TXN_MAX_OPEN_MS;
use edge_core::backoff::Backoff;
use edge_core::log::AppendTicket;
use rdkafka::TopicPartitionList;
use rdkafka::consumer::ConsumerGroupMetadata;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::Producer;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// How long one blocking librdkafka call may take before the loop looks at shutdown again.
const CALL_SLICE: Duration = Duration::from_secs(5);
/// Interval of checks for new streams and new gaps while busy.
const REFRESH_EVERY: Duration = Duration::from_secs(1);

/// What the blocking sender of a transaction receives, in order: chunks of records, then the
/// extras (gaps, heartbeat, checkpoint) with the order to commit. A closed channel without
/// `Commit` aborts the transaction.
enum TxnInput {
    Records(Vec<Part>),
    /// The extras, and the checkpoint's group offset to commit with them.
    Commit(Vec<Extra>, Option<TopicPartitionList>),
}

enum TxnFailure {
    /// Nothing of the transaction is visible; its records are read again.
    Aborted(String),
    /// The producer is unusable (fenced, or a fatal idempotence error).
    Fatal {
        fenced: bool,
        message: String,
    },
    Cancelled,
}

fn is_fenced(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::ProducerFenced
                | RDKafkaErrorCode::InvalidProducerEpoch
                | RDKafkaErrorCode::Fenced
                | RDKafkaErrorCode::TransactionalIdAuthorizationFailed
        )
    )
}

/// (fatal, requires abort, retriable) of an error of a transactional call.
fn txn_flags(e: &KafkaError) -> (bool, bool, bool) {
    match e {
        KafkaError::Transaction(t) => (t.is_fatal(), t.txn_requires_abort(), t.is_retriable()),
        // rdkafka flushes before committing; a flush that timed out (broker away) is retried.
        KafkaError::Flush(RDKafkaErrorCode::OperationTimedOut) => (false, false, true),
        _ => (true, false, false),
    }
}

fn fatal(e: &KafkaError) -> TxnFailure {
    TxnFailure::Fatal {
        fenced: is_fenced(e),
        message: e.to_string(),
    }
}

impl Runner {
    pub(crate) async fn eos_session(self: &Arc<Self>) -> Stop {
        let producer = match self.create_producer(true) {
            Ok(p) => p,
            Err(e) => return Stop::Fatal(e),
        };
        report(
            &self.ctx.status,
            Link::Connecting,
            format!("connecting to Kafka at {}", self.cfg.describe()),
        );
        // init_transactions waits (inside librdkafka) for the coordinator; a timeout is retried
        // at once, so the session starts as soon as the broker answers.
        loop {
            if self.cancel().is_cancelled() {
                return Stop::Shutdown;
            }
            let p = producer.clone();
            let r = tokio::task::spawn_blocking(move || p.init_transactions(CALL_SLICE)).await;
            match r {
                Ok(Ok(())) => break,
                Ok(Err(e)) => {
                    let (is_fatal, _, retriable) = txn_flags(&e);
                    if is_fatal || !retriable {
                        let (link, detail) =
                            self.trouble("initialising the transactional producer");
                        let link = if is_fenced(&e) { Link::Fenced } else { link };
                        self.progress.set_link(link, Some(e.to_string()));
                        return Stop::Retry { link, detail };
                    }
                    self.report_trouble("initialising the transactional producer", &e.to_string());
                }
                Err(e) => return Stop::Fatal(UplinkError::Client(e.to_string())),
            }
        }
        self.ensure_side_topics().await;
        let group = if self.cfg.checkpoint_offsets {
            let base = self.base.clone();
            let link = self.link.clone();
            let topic = self.cfg.checkpoint_topic.clone();
            let store = self.store.to_string();
            match tokio::task::spawn_blocking(move || {
                checkpoint_group_metadata(&base, link, &topic, &store)
            })
            .await
            {
                Ok(Ok(g)) => Some(Arc::new(g)),
                Ok(Err(e)) => {
                    let (link, _) = self.trouble("preparing the checkpoint offsets");
                    return Stop::Retry {
                        link,
                        detail: format!("{e}; records keep buffering in the local log"),
                    };
                }
                Err(e) => return Stop::Fatal(UplinkError::Client(e.to_string())),
            }
        } else {
            None
        };
        let cp = match self.session_checkpoint().await {
            Ok(Ok(cp)) => cp,
            Ok(Err(stop)) => return stop,
            Err(e) => return e.into(),
        };
        match self.eos_loop(producer, group, cp).await {
            Ok(stop) => stop,
            Err(e) => e.into(),
        }
    }

    /// The checkpoint a session resumes from: the group offset when there is a usable one (one
    /// request), else the topic scan.
    async fn session_checkpoint(
        &self,
    ) -> Result<Result<Option<Checkpoint>, Stop>, edge_core::log::LogError> {
        let timeout =
            Duration::from_millis(self.cfg.transaction_timeout_ms).max(Duration::from_secs(30));
        let started = Instant::now();
        let retry = |e: CheckpointError| {
            let (link, _) = self.trouble("reading checkpoints");
            Stop::Retry {
                link,
                detail: format!("{e}; records keep buffering in the local log"),
            }
        };
        if self.cfg.checkpoint_offsets {
            let base = self.base.clone();
            let link = self.link.clone();
            let topic = self.cfg.checkpoint_topic.clone();
            let store = self.store.to_string();
            let op_timeout = Duration::from_secs(10);
            let found = match tokio::task::spawn_blocking(move || {
                lookup_checkpoint_offset(&base, link, &topic, &store, op_timeout)
            })
            .await
            {
                Ok(Ok(f)) => f,
                Ok(Err(e)) => return Ok(Err(retry(e))),
                Err(e) => return Ok(Err(Stop::Fatal(UplinkError::Client(e.to_string())))),
            };
            let why = match found {
                OffsetLookup::Found(cp) => match self.stale_stream(&cp).await? {
                    None => {
                        self.checkpoint_read_took(started, "group_offset");
                        return Ok(Ok(Some(cp)));
                    }
                    // Only an agent that committed checkpoints without the offset since (an
                    // older version, or checkpoint_offsets = false for a while) leaves it behind.
                    Some(stream) => {
                        format!(
                            "the group offset's checkpoint is behind the local cursor of {stream}"
                        )
                    }
                },
                OffsetLookup::Missing(why) => why.to_string(),
            };
            tracing::info!(component = "uplink", reason = %why,
                "no usable checkpoint in the store's consumer group offset; scanning the checkpoint topic");
        }
        let base = self.base.clone();
        let link = self.link.clone();
        let topic = self.cfg.checkpoint_topic.clone();
        let store = self.store.to_string();
        match tokio::task::spawn_blocking(move || {
            read_checkpoint(&base, link, &topic, &store, timeout)
        })
        .await
        {
            Ok(Ok(cp)) => {
                self.checkpoint_read_took(started, "topic_scan");
                Ok(Ok(cp))
            }
            Ok(Err(e)) => Ok(Err(retry(e))),
            Err(e) => Ok(Err(Stop::Fatal(UplinkError::Client(e.to_string())))),
        }
    }

    fn checkpoint_read_took(&self, started: Instant, how: &'static str) {
        let secs = started.elapsed().as_secs_f64();
        metrics::counter!("edge_uplink_checkpoint_reads_total", "via" => how).increment(1);
        metrics::histogram!("edge_uplink_checkpoint_read_seconds", "via" => how).record(secs);
        tracing::debug!(
            component = "uplink",
            via = how,
            ms = (secs * 1000.0) as u64,
            "checkpoint read"
        );
    }

    /// A stream whose local cursor is past `cp` (same epoch): `cp` cannot be the newest checkpoint,
    /// because the cursor moves only after the commit of a checkpoint covering it.
    async fn stale_stream(
        &self,
        cp: &Checkpoint,
    ) -> Result<Option<String>, edge_core::log::LogError> {
        if cp.epoch != self.epoch {
            return Ok(None);
        }
        for (stream, at) in &cp.streams {
            if let Some(local) = self.log().cursor(&self.cursor, stream).await?
                && local > at.next_seq
            {
                return Ok(Some(stream.clone()));
            }
        }
        Ok(None)
    }

    async fn eos_loop(
        self: &Arc<Self>,
        producer: KafkaProducer,
        group: Option<Arc<ConsumerGroupMetadata>>,
        cp: Option<Checkpoint>,
    ) -> Result<Stop, edge_core::log::LogError> {
        if let Some(c) = &cp {
            tracing::info!(
                component = "uplink",
                txn = c.txn,
                same_epoch = (c.epoch == self.epoch),
                streams = c.streams.len(),
                "read this store's checkpoint from Kafka"
            );
        }
        let mut txn = cp.as_ref().map_or(0, |c| c.txn);
        let mut gap_id = self.initial_gap_id(cp.as_ref()).await?;
        let mut lanes = Lanes::default();
        let mut req = self.refresh_lanes(&mut lanes, cp.as_ref()).await?;
        req.kv.push(self.gap_kv(gap_id));
        self.log().append(req).await?;
        self.report_up();

        let hb_every = (self.cfg.heartbeat_interval_ms > 0)
            .then(|| Duration::from_millis(self.cfg.heartbeat_interval_ms));
        let mut next_hb = Instant::now();
        let mut next_gap_check = Instant::now();
        let mut commits = self.log().subscribe();
        let mut ticket: Option<AppendTicket> = None;
        let mut prefetched: Option<Batch> = None;
        let mut abort_backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut refusal_mark = 0u64;
        let mut last_txn_start: Option<Instant> = None;
        let cancel = self.cancel().clone();
        loop {
            if cancel.is_cancelled() {
                break;
            }
            commits.borrow_and_update();
            if lanes.refreshed.is_none_or(|t| t.elapsed() >= REFRESH_EVERY) {
                let req = self.refresh_lanes(&mut lanes, cp.as_ref()).await?;
                if !req.cursors.is_empty() || !req.kv.is_empty() {
                    self.log().append(req).await?;
                }
                let before: Vec<u64> = lanes.map.values().map(|l| l.committed).collect();
                self.apply_commands(&mut lanes, txn, &|_| false).await?;
                let after: Vec<u64> = lanes.map.values().map(|l| l.committed).collect();
                if before != after {
                    prefetched = None;
                    for l in lanes.map.values_mut() {
                        l.next = l.committed;
                    }
                }
            }
            let gaps = if Instant::now() >= next_gap_check {
                next_gap_check = Instant::now() + REFRESH_EVERY;
                self.log().gaps(gap_id, 100).await?
            } else {
                Vec::new()
            };
            let hb_due = hb_every.is_some() && Instant::now() >= next_hb;
            let (max_records, max_bytes) = self.batch_limits().await;
            let (chunk_records, chunk_bytes) = self.chunk_limits(max_records, max_bytes);
            let first = match prefetched.take() {
                Some(b) => b,
                None => {
                    self.read_batch(&mut lanes, chunk_records, chunk_bytes)
                        .await?
                }
            };
            if !first.is_empty()
                && let Some(t) = last_txn_start
                && let Some(wait) = Duration::from_millis(self.cfg.transaction_interval_ms)
                    .checked_sub(t.elapsed())
                    .filter(|w| !w.is_zero())
            {
                // transaction_interval_ms: let the trickle gather; the transaction below reads
                // what arrived meanwhile after this first chunk.
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            if first.is_empty() && gaps.is_empty() && !hb_due {
                // Idle: the client still notices a broker going away; say so in status.
                if self.progress.link() == Link::Up
                    && let Some(e) = self.link.recent_error(Duration::from_secs(3))
                {
                    self.report_trouble("keeping the connection", &e.message);
                }
                let wake = next_hb.min(Instant::now() + REFRESH_EVERY);
                tokio::select! {
                    _ = cancel.cancelled() => break,
                    r = commits.changed() => if r.is_err() { break },
                    _ = tokio::time::sleep_until(wake.into()) => {}
                }
                continue;
            }

            // The transaction is open while its records stream in: chunks are read from the log
            // and handed to the blocking sender one at a time, so memory holds a few chunks and
            // librdkafka's bounded queue, however large the transaction is.
            let (chunks, chunks_rx) = tokio::sync::mpsc::channel::<TxnInput>(1);
            last_txn_start = Some(Instant::now());
            self.set_txn_open(true);
            let run = {
                let producer = producer.clone();
                let this = self.clone();
                let cancel = cancel.clone();
                let sink = self.record_shape();
                let group = group.clone();
                tokio::task::spawn_blocking(move || {
                    execute(&producer, chunks_rx, &sink, group, &this, &cancel)
                })
            };
            let mut moved: Vec<(u32, u64)> = Vec::new();
            let mut refused: Vec<(Arc<str>, Refused)> = Vec::new();
            let mut records = 0usize;
            let mut bytes = 0usize;
            let mut chunk = first;
            let opened = Instant::now();
            let max_open = Duration::from_millis(TXN_MAX_OPEN_MS)
                .min(Duration::from_millis(self.cfg.transaction_timeout_ms / 4));
            let mut read_failed = None;
            let mut stopped = false;
            loop {
                if chunk.is_empty() {
                    break;
                }
                {
                    let mut bw = self.bandwidth.lock().await;
                    if let Some(bw) = bw.as_mut()
                        && !bw.take(chunk.bytes, &cancel).await
                    {
                        stopped = true;
                        break;
                    }
                }
                records += chunk.records;
                bytes += chunk.bytes;
                for part in &chunk.parts {
                    match moved.iter_mut().find(|(id, _)| *id == part.lane) {
                        Some(m) => m.1 = part.next,
                        None => moved.push((part.lane, part.next)),
                    }
                    for r in &part.refused {
                        refused.push((part.stream.clone(), r.clone()));
                    }
                }
                let alone = chunk.isolating;
                if chunks.send(TxnInput::Records(chunk.parts)).await.is_err() {
                    break; // the sender failed; its result says why
                }
                if alone
                    || records >= max_records
                    || bytes >= max_bytes
                    || opened.elapsed() >= max_open
                {
                    break;
                }
                let (chunk_records, chunk_bytes) =
                    self.chunk_limits(max_records - records, max_bytes - bytes);
                chunk = match self
                    .read_batch(&mut lanes, chunk_records, chunk_bytes)
                    .await
                {
                    Ok(c) => c,
                    Err(e) => {
                        read_failed = Some(e);
                        break;
                    }
                };
            }
            if read_failed.is_some() || stopped {
                // Abandon the transaction: the sender aborts it when the channel closes.
                drop(chunks);
                let _ = run.await;
                self.set_txn_open(false);
                match read_failed {
                    Some(e) => return Err(e),
                    None => break,
                }
            }

            self.write_refused_deadletters(&refused).await;
            let mut extras: Vec<Extra> = gaps.iter().map(|g| self.gap_extra(g)).collect();
            for (stream, r) in &refused {
                extras.push(self.refused_extra(stream, r));
            }
            if let (true, Some(every)) = (hb_due, hb_every) {
                extras.push(self.heartbeat_extra().await);
                next_hb = Instant::now() + every;
            }
            let new_gap_id = gaps.last().map_or(gap_id, |g| g.id);
            txn = txn.saturating_add(1);
            let mut offsets = None;
            if !moved.is_empty() || new_gap_id != gap_id {
                let x = self.checkpoint_extra(&lanes, &moved, new_gap_id, txn);
                if group.is_some() {
                    match checkpoint_offsets(&x.topic, txn, &x.payload) {
                        Ok(o) => offsets = Some(o),
                        Err(e) => tracing::warn!(component = "uplink", error = %e,
                            "cannot build the checkpoint's group offset; the next start scans the topic"),
                    }
                }
                extras.push(x);
            }
            let records = records as u64;
            // If the sender already failed the channel is closed; its result says why.
            let _ = chunks.send(TxnInput::Commit(extras, offsets)).await;
            drop(chunks);
            // Read the first chunk of the next transaction while this one commits.
            let (res, pre) = if moved.is_empty() {
                (run.await, None)
            } else {
                let (max_records, max_bytes) = self.batch_limits().await;
                let (chunk_records, chunk_bytes) = self.chunk_limits(max_records, max_bytes);
                let (r, p) =
                    tokio::join!(run, self.read_batch(&mut lanes, chunk_records, chunk_bytes));
                (r, Some(p))
            };
            self.set_txn_open(false);
            match res {
                Ok(Ok(())) => {
                    metrics::counter!("edge_uplink_transactions_total").increment(1);
                    metrics::counter!("edge_uplink_records_total").increment(records);
                    let ids: Vec<u32> = moved.iter().map(|(id, _)| *id).collect();
                    for lane in lanes.map.values_mut() {
                        if let Some((_, next)) = moved.iter().find(|(id, _)| *id == lane.id) {
                            lane.committed = *next;
                        }
                    }
                    let mut req = self.progress_request(&mut lanes, &ids);
                    if new_gap_id != gap_id {
                        metrics::counter!("edge_uplink_gaps_reported_total")
                            .increment(gaps.len() as u64);
                        req.kv.push(self.gap_kv(new_gap_id));
                        gap_id = new_gap_id;
                    }
                    if let Some(t) = ticket.take() {
                        t.await?;
                    }
                    if !req.cursors.is_empty() || !req.kv.is_empty() {
                        ticket = Some(self.log().submit(req).await?);
                    }
                    self.progress.committed_batch(records);
                    self.made_progress
                        .store(true, std::sync::atomic::Ordering::Relaxed);
                    abort_backoff.reset();
                    if self.progress.link() != Link::Up {
                        self.report_up();
                    }
                    prefetched = match pre {
                        Some(Ok(b)) => Some(b),
                        Some(Err(e)) => return Err(e),
                        None => None,
                    };
                }
                Ok(Err(failure)) => {
                    for l in lanes.map.values_mut() {
                        l.next = l.committed;
                    }
                    match failure {
                        TxnFailure::Aborted(msg) => {
                            metrics::counter!("edge_uplink_aborted_transactions_total")
                                .increment(1);
                            tracing::warn!(component = "uplink", error = %msg,
                                "a Kafka transaction was aborted; its records will be sent again from the local log");
                            // An abort caused by records the broker refused for good is
                            // productive (the next attempt leaves them out or isolates them):
                            // retry at once. Any other abort backs off, so nothing spins.
                            if self.refusals_since(&mut refusal_mark) {
                                self.report_refused(&msg);
                            } else {
                                self.report_trouble("a transaction", &msg);
                                let delay = abort_backoff.next_delay();
                                tokio::select! {
                                    _ = cancel.cancelled() => break,
                                    _ = tokio::time::sleep(delay) => {}
                                }
                            }
                        }
                        TxnFailure::Cancelled => break,
                        TxnFailure::Fatal { fenced, message } => {
                            if let Some(t) = ticket.take() {
                                t.await?;
                            }
                            let (link, detail) = if fenced {
                                (
                                    Link::Fenced,
                                    format!(
                                        "another producer took over transactional.id {} (an older or duplicate agent with store id {}?); this uplink re-initialises and resumes from the checkpoint",
                                        self.cfg.transactional_id(&self.store),
                                        self.store
                                    ),
                                )
                            } else {
                                self.trouble("the transactional producer")
                            };
                            tracing::warn!(component = "uplink", error = %message, fenced,
                                "the transactional producer failed; starting a new session from the checkpoint");
                            self.progress.set_link(link, Some(message));
                            return Ok(Stop::Retry { link, detail });
                        }
                    }
                }
                Err(e) => return Ok(Stop::Fatal(UplinkError::Client(e.to_string()))),
            }
        }
        if let Some(t) = ticket.take() {
            t.await?;
        }
        Ok(Stop::Shutdown)
    }

    /// Records and bytes of the next batch (smaller under a bandwidth cap, so the cap is smooth).
    pub(crate) async fn batch_limits(&self) -> (usize, usize) {
        let bytes = self.cfg.batch_max_bytes.as_u64() as usize;
        let bytes = match self.bandwidth.lock().await.as_ref() {
            Some(b) => bytes.min(b.batch_bytes()),
            None => bytes,
        };
        (self.cfg.batch_max_records, bytes)
    }

    fn checkpoint_extra(
        &self,
        lanes: &Lanes,
        moved: &[(u32, u64)],
        gap_id: u64,
        txn: u64,
    ) -> Extra {
        let mut cp = Checkpoint::new(&self.store, self.epoch);
        cp.txn = txn;
        cp.gap_id = gap_id;
        cp.ts_ms = edge_core::time::now_ms();
        for lane in lanes.map.values() {
            let next = moved
                .iter()
                .find(|(id, _)| *id == lane.id)
                .map_or(lane.committed, |(_, n)| *n);
            cp.streams
                .insert(lane.stream.to_string(), StreamCheckpoint { next_seq: next });
        }
        Extra {
            topic: self.cfg.checkpoint_topic.clone(),
            key: self.store.to_string(),
            payload: serde_json::to_vec(&cp).unwrap_or_default(),
            headers: vec![
                (H_STORE, self.store.to_string()),
                (H_EPOCH, self.epoch_str.to_string()),
            ],
            lane: UNTRACKED_LANE,
            seq: txn,
        }
    }
}

/// Runs one transaction to its end (blocking thread): begins it, sends the records of every
/// chunk as it arrives (each chunk is dropped once librdkafka has copied it), then the extras, and
/// commits.
fn execute(
    p: &KafkaProducer,
    mut input: tokio::sync::mpsc::Receiver<TxnInput>,
    sink: &RecordShape,
    group: Option<Arc<ConsumerGroupMetadata>>,
    runner: &Runner,
    cancel: &CancellationToken,
) -> Result<(), TxnFailure> {
    let started = std::time::Instant::now();
    if let Err(e) = p.begin_transaction() {
        return Err(fatal(&e));
    }
    let (extras, offsets) = loop {
        match input.blocking_recv() {
            Some(TxnInput::Records(parts)) => {
                for part in &parts {
                    for r in &part.records {
                        if let Err(e) = send_record(p, part, r, sink, cancel) {
                            return Err(abort(p, &e, runner, cancel));
                        }
                    }
                }
            }
            Some(TxnInput::Commit(extras, offsets)) => break (extras, offsets),
            None => {
                // The reader gave up (a log error or shutdown): nothing of this transaction may
                // become visible.
                return Err(abort(p, &KafkaError::Canceled, runner, cancel));
            }
        }
    };
    for x in &extras {
        let token = Box::new(Token {
            lane: x.lane,
            seq: x.seq,
            bytes: x.payload.len() as u32,
        });
        if let Err(e) = send_blocking(
            p,
            &x.topic,
            x.key.as_bytes(),
            &x.payload,
            None,
            extra_headers(x),
            token,
            cancel,
        ) {
            return Err(abort(p, &e, runner, cancel));
        }
    }
    if let (Some(offsets), Some(group)) = (offsets, group) {
        // Commits atomically with the checkpoint record: the next session start finds it in one
        // OffsetFetch. Runs while the records are still in flight. librdkafka's call can block
        // past its timeout while the broker is away (a request in flight waits for the socket
        // timeout), so it runs on its own thread and this one keeps reporting and watching for
        // shutdown meanwhile.
        loop {
            let (tx, rx) = std::sync::mpsc::channel();
            {
                let (p, offsets, group) = (p.clone(), offsets.clone(), group.clone());
                std::thread::spawn(move || {
                    let _ = tx.send(p.send_offsets_to_transaction(&offsets, &group, CALL_SLICE));
                });
            }
            let r = loop {
                match rx.recv_timeout(CALL_SLICE + Duration::from_secs(1)) {
                    Ok(r) => break r,
                    Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                        runner.report_trouble(
                            "committing the checkpoint offset",
                            "no answer from the transaction coordinator",
                        );
                        if cancel.is_cancelled() {
                            // The call is still in progress; the next session's
                            // init_transactions aborts this transaction.
                            return Err(TxnFailure::Cancelled);
                        }
                    }
                    Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                        break Err(KafkaError::Canceled);
                    }
                }
            };
            match r {
                Ok(()) => break,
                Err(e) => {
                    let (is_fatal, requires_abort, retriable) = txn_flags(&e);
                    if is_fatal {
                        return Err(fatal(&e));
                    }
                    if requires_abort || !retriable || cancel.is_cancelled() {
                        return Err(abort(p, &e, runner, cancel));
                    }
                    runner.report_trouble("committing the checkpoint offset", &e.to_string());
                }
            }
        }
    }
    let sent = started.elapsed();
    // Wait for the deliveries here: rdkafka's commit_transaction flushes by polling in 100 ms
    // slices, which would add up to 100 ms to every transaction; the producer's own polling
    // thread serves the delivery reports meanwhile.
    let flush_until = std::time::Instant::now() + CALL_SLICE;
    while p.in_flight_count() > 0
        && std::time::Instant::now() < flush_until
        && !cancel.is_cancelled()
    {
        std::thread::sleep(Duration::from_micros(500));
    }
    loop {
        match p.commit_transaction(CALL_SLICE) {
            Ok(()) => {
                tracing::trace!(
                    component = "uplink",
                    send_ms = sent.as_millis() as u64,
                    commit_ms = (started.elapsed() - sent).as_millis() as u64,
                    "transaction committed"
                );
                return Ok(());
            }
            Err(e) => {
                let (is_fatal, requires_abort, retriable) = txn_flags(&e);
                if is_fatal {
                    return Err(fatal(&e));
                }
                if requires_abort {
                    return Err(abort(p, &e, runner, cancel));
                }
                if !retriable {
                    return Err(fatal(&e));
                }
                runner.report_trouble("committing a transaction", &e.to_string());
                if cancel.is_cancelled() {
                    // The outcome is unknown; the checkpoint read at the next start decides.
                    let _ = p.abort_transaction(Duration::from_secs(1));
                    return Err(TxnFailure::Cancelled);
                }
            }
        }
    }
}

/// Aborts the open transaction after `cause`.
fn abort(
    p: &KafkaProducer,
    cause: &KafkaError,
    runner: &Runner,
    cancel: &CancellationToken,
) -> TxnFailure {
    if matches!(cause, KafkaError::Canceled) {
        let _ = p.abort_transaction(Duration::from_secs(1));
        return TxnFailure::Cancelled;
    }
    if txn_flags(cause).0 && matches!(cause, KafkaError::Transaction(_)) {
        return fatal(cause);
    }
    loop {
        match p.abort_transaction(CALL_SLICE) {
            Ok(()) => return TxnFailure::Aborted(cause.to_string()),
            Err(e) => {
                let (is_fatal, _, retriable) = txn_flags(&e);
                if is_fatal || !retriable {
                    return fatal(&e);
                }
                runner.report_trouble("aborting a transaction", &e.to_string());
                if cancel.is_cancelled() {
                    return TxnFailure::Cancelled;
                }
            }
        }
    }
}
