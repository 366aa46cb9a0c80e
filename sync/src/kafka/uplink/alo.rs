//! at_least_once: an idempotent producer (acks=all, retries forever) and delivery reports.
//!
//! Records are read from the log into a bounded window (bytes and records in flight); each lane
//! keeps its in-flight records in seq order and its cursor moves to the end of the longest
//! delivered prefix. A record whose delivery failed stops its lane's cursor; once nothing of the
//! lane is in flight the lane is read again from its cursor (duplicates at HQ are possible in this
//! mode, never loss).

use super::progress::{Link, report};
use super::record;
use super::{
    Batch, Extra, GAP_LANE, Inflight, KafkaProducer, Lanes, Runner, Stop, Token, UNTRACKED_LANE,
    UplinkError, extra_headers, send_blocking, send_record,
};
use edge_core::log::{AppendTicket, LogError};
use rdkafka::producer::Producer;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

const REFRESH_EVERY: Duration = Duration::from_secs(1);
/// Cursor moves are batched at most this often while deliveries stream in.
const CURSOR_EVERY: Duration = Duration::from_millis(50);

impl Runner {
    pub(crate) async fn alo_session(self: &Arc<Self>) -> Stop {
        let producer = match self.create_producer(false) {
            Ok(p) => p,
            Err(e) => return Stop::Fatal(e),
        };
        {
            let mut d = self.deliveries.0.lock().unwrap_or_else(|e| e.into_inner());
            d.lanes.clear();
            d.failed.clear();
            d.inflight_bytes = 0;
            d.inflight_records = 0;
        }
        report(
            &self.ctx.status,
            Link::Connecting,
            format!("connecting to Kafka at {}", self.cfg.describe()),
        );
        // Wait until the cluster answers, so that status tells the truth from the start.
        loop {
            if self.cancel().is_cancelled() {
                return Stop::Shutdown;
            }
            let p = producer.clone();
            match tokio::task::spawn_blocking(move || {
                p.client().fetch_metadata(None, Duration::from_secs(5))
            })
            .await
            {
                Ok(Ok(_)) => break,
                Ok(Err(e)) => self.report_trouble("fetching cluster metadata", &e.to_string()),
                Err(e) => return Stop::Fatal(UplinkError::Client(e.to_string())),
            }
        }
        self.ensure_side_topics().await;
        match self.alo_loop(producer).await {
            Ok(stop) => stop,
            Err(e) => e.into(),
        }
    }

    async fn alo_loop(self: &Arc<Self>, producer: KafkaProducer) -> Result<Stop, LogError> {
        let mut lanes = Lanes::default();
        let req = self.refresh_lanes(&mut lanes, None).await?;
        if !req.cursors.is_empty() || !req.kv.is_empty() {
            self.log().append(req).await?;
        }
        let mut gap_id = self.initial_gap_id(None).await?;
        self.report_up();
        let hb_every = (self.cfg.heartbeat_interval_ms > 0)
            .then(|| Duration::from_millis(self.cfg.heartbeat_interval_ms));
        let mut next_hb = Instant::now();
        let mut next_gap_check = Instant::now();
        let mut last_cursor_submit = Instant::now();
        let mut last_delivery = Instant::now();
        let mut dirty: Vec<u32> = Vec::new();
        let mut gap_dirty = false;
        let mut ticket: Option<AppendTicket> = None;
        let mut commits = self.log().subscribe();
        let cancel = self.cancel().clone();
        // The window stays within half of librdkafka's queue bounds, so a send rarely waits.
        let max_inflight_bytes = self.cfg.producer_queue_bytes.as_u64() / 2;
        let max_inflight_records = self.cfg.producer_queue_messages() / 2;
        let stop = loop {
            if cancel.is_cancelled() {
                break Stop::Shutdown;
            }
            if let Some((code, reason)) = producer.client().fatal_error() {
                let (link, _) = self.trouble("the idempotent producer");
                break Stop::Retry {
                    link,
                    detail: format!(
                        "the idempotent producer failed ({code:?}: {reason}); starting a new one and re-sending from the cursor"
                    ),
                };
            }
            commits.borrow_and_update();

            // 1. Deliveries: advance each lane over its delivered prefix; rewind failed lanes.
            let delivered = self.settle(&mut lanes, &mut dirty, &mut gap_id, &mut gap_dirty);
            if delivered {
                last_delivery = Instant::now();
                self.made_progress
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                if self.progress.link() != Link::Up {
                    self.report_up();
                }
            }
            let (inflight_bytes, inflight_records) = {
                let d = self.deliveries.0.lock().unwrap_or_else(|e| e.into_inner());
                (d.inflight_bytes, d.inflight_records)
            };
            if inflight_records > 0
                && last_delivery.elapsed() > Duration::from_secs(5)
                && self.link.recent_error(Duration::from_secs(10)).is_some()
            {
                self.report_trouble("delivering records", "no delivery reports for 5s");
            }
            if (!dirty.is_empty() || gap_dirty)
                && (last_cursor_submit.elapsed() >= CURSOR_EVERY || inflight_records == 0)
            {
                let mut req = self.progress_request(&mut lanes, &dirty);
                if gap_dirty {
                    req.kv.push(self.gap_kv(gap_id));
                }
                if let Some(t) = ticket.take() {
                    t.await?;
                }
                ticket = Some(self.log().submit(req).await?);
                dirty.clear();
                gap_dirty = false;
                last_cursor_submit = Instant::now();
            }

            // 2. New streams, commands, gaps, heartbeats.
            if lanes.refreshed.is_none_or(|t| t.elapsed() >= REFRESH_EVERY) {
                let req = self.refresh_lanes(&mut lanes, None).await?;
                if !req.cursors.is_empty() || !req.kv.is_empty() {
                    self.log().append(req).await?;
                }
                let deliveries = self.deliveries.clone();
                let busy = move |lane: u32| {
                    let d = deliveries.0.lock().unwrap_or_else(|e| e.into_inner());
                    d.lanes.get(&lane).is_some_and(|q| !q.is_empty())
                };
                self.apply_commands(&mut lanes, 0, &busy).await?;
            }
            let mut extras: Vec<Extra> = Vec::new();
            let gaps_idle = {
                let d = self.deliveries.0.lock().unwrap_or_else(|e| e.into_inner());
                d.lanes.get(&GAP_LANE).is_none_or(|q| q.is_empty())
            };
            if gaps_idle && Instant::now() >= next_gap_check {
                next_gap_check = Instant::now() + REFRESH_EVERY;
                for g in self.log().gaps(gap_id, 100).await? {
                    extras.push(self.gap_extra(&g));
                }
            }
            if let Some(every) = hb_every
                && Instant::now() >= next_hb
            {
                extras.push(self.heartbeat_extra().await);
                next_hb = Instant::now() + every;
            }

            // 3. New records, while the window has room.
            let room =
                inflight_bytes < max_inflight_bytes && inflight_records < max_inflight_records;
            let batch = if room {
                let (max_records, max_bytes) = self.batch_limits().await;
                let max_records =
                    max_records.min((max_inflight_records - inflight_records) as usize);
                let max_bytes = max_bytes.min((max_inflight_bytes - inflight_bytes) as usize);
                let (max_records, max_bytes) = self.chunk_limits(max_records, max_bytes);
                self.read_batch(&mut lanes, max_records, max_bytes).await?
            } else {
                Batch::default()
            };
            if batch.is_empty() && extras.is_empty() {
                if self.progress.link() == Link::Up
                    && let Some(e) = self.link.recent_error(Duration::from_secs(3))
                {
                    self.report_trouble("keeping the connection", &e.message);
                }
                let wake = next_hb.min(Instant::now() + REFRESH_EVERY);
                let notify = self.deliveries.1.notified();
                let wake = if dirty.is_empty() && !gap_dirty {
                    wake
                } else {
                    wake.min(last_cursor_submit + CURSOR_EVERY)
                };
                tokio::select! {
                    _ = cancel.cancelled() => break Stop::Shutdown,
                    _ = notify => {}
                    r = commits.changed(), if room => if r.is_err() { break Stop::Shutdown },
                    _ = tokio::time::sleep_until(wake.into()) => {}
                }
                continue;
            }
            {
                let mut bw = self.bandwidth.lock().await;
                if let Some(bw) = bw.as_mut()
                    && !bw.take(batch.bytes, &cancel).await
                {
                    break Stop::Shutdown;
                }
            }
            let mut refused = Vec::new();
            for part in &batch.parts {
                for r in &part.refused {
                    extras.push(self.refused_extra(&part.stream, r));
                    refused.push((part.stream.clone(), r.clone()));
                }
            }
            self.write_refused_deadletters(&refused).await;
            self.track(&batch, &extras);
            let sent = {
                let p = producer.clone();
                let this = self.clone();
                let cancel = cancel.clone();
                tokio::task::spawn_blocking(move || send_batch(&p, &this, batch, extras, &cancel))
                    .await
            };
            match sent {
                Ok(Ok(())) => {}
                Ok(Err(unsent)) => {
                    // Records that never reached librdkafka: take them off the books and read
                    // them again.
                    {
                        let mut d = self.deliveries.0.lock().unwrap_or_else(|e| e.into_inner());
                        let d = &mut *d;
                        for (lane, first_unsent) in unsent.lanes {
                            if let Some(q) = d.lanes.get_mut(&lane) {
                                while q.back().is_some_and(|e| e.seq >= first_unsent) {
                                    if let Some(e) = q.pop_back()
                                        && !e.done
                                    {
                                        d.inflight_records = d.inflight_records.saturating_sub(1);
                                        d.inflight_bytes =
                                            d.inflight_bytes.saturating_sub(u64::from(e.bytes));
                                    }
                                }
                            }
                            if let Some(l) = lanes.map.values_mut().find(|l| l.id == lane) {
                                l.next = first_unsent;
                            }
                        }
                    }
                    if unsent.cancelled {
                        break Stop::Shutdown;
                    }
                    self.report_trouble("sending records", &unsent.error);
                    tokio::select! {
                        _ = cancel.cancelled() => break Stop::Shutdown,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                    }
                }
                Err(e) => break Stop::Fatal(UplinkError::Client(e.to_string())),
            }
        };
        // Deliver what is in flight (bounded), then record it.
        if matches!(stop, Stop::Shutdown) {
            let p = producer.clone();
            let _ = tokio::task::spawn_blocking(move || p.flush(Duration::from_secs(5))).await;
            self.settle(&mut lanes, &mut dirty, &mut gap_id, &mut gap_dirty);
        }
        if !dirty.is_empty() || gap_dirty {
            let mut req = self.progress_request(&mut lanes, &dirty);
            if gap_dirty {
                req.kv.push(self.gap_kv(gap_id));
            }
            self.log().append(req).await?;
        }
        if let Some(t) = ticket.take() {
            t.await?;
        }
        Ok(stop)
    }

    /// Registers a batch's records as in flight before they are sent.
    fn track(&self, batch: &Batch, extras: &[Extra]) {
        let mut d = self.deliveries.0.lock().unwrap_or_else(|e| e.into_inner());
        for part in &batch.parts {
            let mut entries: Vec<Inflight> = part
                .records
                .iter()
                .map(|r| Inflight {
                    seq: r.seq,
                    next: r.seq + 1,
                    bytes: record::wire_size(r) as u32,
                    done: false,
                    failed: false,
                })
                .chain(part.refused.iter().map(|r| Inflight {
                    seq: r.record.seq,
                    next: r.record.seq + 1,
                    bytes: 0,
                    done: true,
                    failed: false,
                }))
                .collect();
            entries.sort_by_key(|e| e.seq);
            if let Some(last) = entries.last_mut() {
                last.next = part.next;
            }
            d.inflight_records += part.records.len() as u64;
            d.inflight_bytes += part
                .records
                .iter()
                .map(|r| record::wire_size(r) as u64)
                .sum::<u64>();
            d.lanes.entry(part.lane).or_default().extend(entries);
        }
        for x in extras.iter().filter(|x| x.lane == GAP_LANE) {
            d.inflight_records += 1;
            d.inflight_bytes += x.payload.len() as u64;
            d.lanes.entry(GAP_LANE).or_default().push_back(Inflight {
                seq: x.seq,
                next: x.seq,
                bytes: x.payload.len() as u32,
                done: false,
                failed: false,
            });
        }
    }

    /// Applies delivery reports: moves lanes over their delivered prefix; a lane whose first
    /// undelivered record failed is read again from its cursor once nothing of it is in flight.
    /// Returns whether anything was delivered.
    fn settle(
        &self,
        lanes: &mut Lanes,
        dirty: &mut Vec<u32>,
        gap_id: &mut u64,
        gap_dirty: &mut bool,
    ) -> bool {
        let mut d = self.deliveries.0.lock().unwrap_or_else(|e| e.into_inner());
        let delivered = std::mem::take(&mut d.delivered) > 0;
        for (lane, msg) in std::mem::take(&mut d.failed) {
            tracing::warn!(component = "uplink", lane, error = %msg,
                "a record could not be delivered; its stream is sent again from the cursor");
        }
        for (id, q) in d.lanes.iter_mut() {
            let mut advanced = None;
            while q.front().is_some_and(|e| e.done) {
                advanced = q.pop_front();
            }
            if let Some(e) = advanced {
                if *id == GAP_LANE {
                    *gap_id = (*gap_id).max(e.seq);
                    *gap_dirty = true;
                } else if let Some(l) = lanes.map.values_mut().find(|l| l.id == *id) {
                    l.committed = l.committed.max(e.next);
                    if !dirty.contains(id) {
                        dirty.push(*id);
                    }
                }
            }
            let blocked = q.front().is_some_and(|e| e.failed);
            if blocked && q.iter().all(|e| e.done || e.failed) {
                q.clear();
                if *id != GAP_LANE
                    && let Some(l) = lanes.map.values_mut().find(|l| l.id == *id)
                {
                    l.next = l.committed;
                }
                // Gaps are read again from the log after the last reported gap id.
            }
        }
        delivered
    }
}

/// What could not be handed to librdkafka.
struct Unsent {
    /// (lane, first seq not sent)
    lanes: Vec<(u32, u64)>,
    error: String,
    cancelled: bool,
}

fn send_batch(
    p: &KafkaProducer,
    runner: &Runner,
    batch: Batch,
    extras: Vec<Extra>,
    cancel: &CancellationToken,
) -> Result<(), Unsent> {
    let shape = runner.record_shape();
    for (i, part) in batch.parts.iter().enumerate() {
        for (j, r) in part.records.iter().enumerate() {
            if let Err(e) = send_record(p, part, r, &shape, cancel) {
                let mut lanes = vec![(part.lane, part.records[j].seq)];
                for later in &batch.parts[i + 1..] {
                    if let Some(first) = later.records.first() {
                        lanes.push((later.lane, first.seq));
                    }
                }
                return Err(Unsent {
                    lanes,
                    cancelled: matches!(e, rdkafka::error::KafkaError::Canceled),
                    error: e.to_string(),
                });
            }
        }
    }
    for x in &extras {
        let token = Box::new(Token {
            lane: if x.lane == GAP_LANE {
                GAP_LANE
            } else {
                UNTRACKED_LANE
            },
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
            let lanes = if x.lane == GAP_LANE {
                vec![(GAP_LANE, x.seq)]
            } else {
                Vec::new()
            };
            return Err(Unsent {
                lanes,
                cancelled: matches!(e, rdkafka::error::KafkaError::Canceled),
                error: e.to_string(),
            });
        }
    }
    Ok(())
}
