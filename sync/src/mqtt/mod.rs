//! The MQTT bridge to the store's broker: ingress (topics -> local streams, ack after durable
//! commit) and egress (local streams -> topics, from durable cursors).
//!
//! One MQTT 5 connection with a persistent session (stable client id, clean start off, session
//! expiry > 0) and manual acks. Four tasks share it:
//!
//! * the **poller** owns rumqttc's event loop: it (re)connects with jittered backoff, subscribes on a
//!   new session, hands publishes to the processor and counts PUBACKs for egress;
//! * the **processor** turns each publish into a log request (the event, or a dead letter with the
//!   reason) and submits it in arrival order;
//! * the **acker** waits for each request's durable commit, in order, and only then sends PUBACK.
//!   An ack is sent only on the connection the message arrived on: after a reconnect the broker
//!   redelivers unacked messages, and the log stores a redelivered message with an event id once;
//! * the **egress** task publishes configured streams from their cursors and moves a cursor only
//!   after the broker acknowledged every message before it.
//!
//! Flow control: poller -> ingest queue (`2 x receive_maximum`) -> processor -> pending queue
//! (same) -> acker -> rumqttc request channel -> poller. Mosquitto 2.0.11 (Debian 12) can exceed our
//! `receive_maximum` after a session resume (its `db__message_delete_outgoing` moves up to a whole
//! window of queued messages into flight per PUBACK), so the design does not rely on the broker
//! honouring it: the poller *waits* when the ingest queue is full (TCP backpressure on the broker,
//! nothing dropped), and the acker never blocks: acks that do not fit into the request channel wait
//! in a local FIFO of packet ids (at most 65,535 tiny entries, the MQTT packet-id space), flushed in
//! order as the poller drains the channel. No cycle of blocking waits can form.

pub mod config;
mod egress;
pub(crate) mod ingress;
pub mod topic;

pub use config::{EgressRule, IngressRule, MqttConfig, MqttTls, StartAt};

use edge_core::State;
use edge_core::backoff::{Backoff, Jitter};
use edge_core::component::{ComponentContext, Task};
use edge_core::log::{AppendRequest, AppendTicket, LogError};
use ingress::{CompiledRule, Limits, Rejection};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::{Filter, Packet, Publish, SubscribeReasonCode};
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;
use tokio::sync::{Notify, mpsc, watch};
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("MQTT configuration: {0}")]
    Config(String),
}

/// Connection facts shared by the bridge's tasks.
pub(crate) struct Link {
    /// Incremented at every CONNACK; an ack is only valid on the connection its message came on.
    generation: AtomicU64,
    /// Some(generation) while connected.
    connected: watch::Sender<Option<u64>>,
    /// PUBACKs received for our own publishes (egress).
    pubacks: AtomicU64,
    puback_notify: Notify,
}

impl Link {
    fn new() -> Self {
        let (tx, _) = watch::channel(None);
        Link {
            generation: AtomicU64::new(0),
            connected: tx,
            pubacks: AtomicU64::new(0),
            puback_notify: Notify::new(),
        }
    }
    fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }
}

fn mqtt_options(cfg: &MqttConfig, store: &str) -> Result<MqttOptions, MqttError> {
    let mut o = MqttOptions::new(cfg.client_id_for(store), cfg.host.clone(), cfg.port);
    o.set_keep_alive(cfg.keep_alive);
    // Persistent session: the broker keeps our subscriptions and queues QoS 1 messages while we
    // are away (up to its max_queued_messages).
    o.set_clean_start(false);
    o.set_session_expiry_interval(Some(cfg.session_expiry.as_secs() as u32));
    o.set_receive_maximum(Some(cfg.receive_maximum));
    o.set_max_packet_size(Some(cfg.max_packet_size.as_u64() as u32));
    o.set_manual_acks(true);
    o.set_connection_timeout(10);
    // No Nagle: a PUBACK or an egress publish is a few bytes, and held back for the broker's
    // delayed ACK it waited tens of milliseconds (docs/BENCHMARKS.md, "Offers engine").
    let mut net = rumqttc::NetworkOptions::new();
    net.set_tcp_nodelay(true);
    o.set_network_options(net);
    // Outgoing (egress) publishes waiting for PUBACK; bounded like everything else.
    o.set_outgoing_inflight_upper_limit(256);
    if let Some(user) = &cfg.username {
        let password = match &cfg.password_file {
            Some(f) => edge_core::tls::read_secret_file(f).map_err(|e| {
                MqttError::Config(format!(
                    "cannot read mqtt.password_file {}: {e}",
                    f.display()
                ))
            })?,
            None => String::new(),
        };
        o.set_credentials(user.clone(), password);
    }
    if let Some(t) = &cfg.tls {
        let config = edge_core::tls::client_config(t).map_err(MqttError::Config)?;
        o.set_transport(rumqttc::Transport::tls_with_config(
            rumqttc::TlsConfiguration::Rustls(config),
        ));
    }
    Ok(o)
}

/// Builds the bridge. Fails only on configuration that cannot work (unreadable secrets, bad TLS
/// material); an unreachable broker is retried forever by the running task.
pub fn build(cfg: MqttConfig, ctx: ComponentContext) -> Result<Task, MqttError> {
    let rules: Vec<CompiledRule> = cfg
        .ingress
        .iter()
        .map(CompiledRule::compile)
        .collect::<Result<_, _>>()
        .map_err(MqttError::Config)?;
    let options = mqtt_options(&cfg, &ctx.store_id)?;
    Ok(Box::pin(run(cfg, rules, options, ctx)))
}

async fn run(
    cfg: MqttConfig,
    rules: Vec<CompiledRule>,
    options: MqttOptions,
    ctx: ComponentContext,
) -> Result<(), edge_core::component::ComponentError> {
    let filters: Vec<Filter> = rules
        .iter()
        .map(|r| Filter::new(r.filter(), QoS::AtLeastOnce))
        .collect();
    ctx.status
        .field("broker", format!("{}:{}", cfg.host, cfg.port));
    ctx.status
        .field("client_id", cfg.client_id_for(&ctx.store_id));
    ctx.status.field(
        "subscriptions",
        filters.iter().map(|f| f.path.clone()).collect::<Vec<_>>(),
    );

    let queue = 2 * cfg.receive_maximum as usize + 16;
    let (client, eventloop) = AsyncClient::new(options, queue + 512);
    let link = Arc::new(Link::new());
    let (ingest_tx, ingest_rx) = mpsc::channel(queue);
    let (pending_tx, pending_rx) = mpsc::channel(queue);
    let stop_poller = CancellationToken::new();

    let poller = tokio::spawn(poll_loop(
        eventloop,
        client.clone(),
        link.clone(),
        filters,
        ingest_tx,
        ctx.clone(),
        cfg.clone(),
        stop_poller.clone(),
    ));
    let limits = Limits {
        max_payload: cfg.max_payload.as_u64() as usize,
        deadletter_keep: cfg.deadletter_keep.as_u64() as usize,
    };
    let processor = tokio::spawn(process_loop(
        rules,
        limits,
        ingest_rx,
        pending_tx,
        ctx.clone(),
        ctx.shutdown.intake_guard(),
    ));
    let acker = tokio::spawn(ack_loop(
        pending_rx,
        client.clone(),
        link.clone(),
        ctx.clone(),
        ctx.shutdown.intake_guard(),
    ));
    let egress = (!cfg.egress.is_empty()).then(|| {
        tokio::spawn(egress::run(
            cfg.egress.clone(),
            client.clone(),
            link.clone(),
            ctx.clone(),
        ))
    });

    // Intake side ends first (processor stops, acker acks what was committed), while the poller
    // keeps the connection up so those acks reach the broker.
    let _ = processor.await;
    let _ = acker.await;
    ctx.shutdown.all().cancelled().await;
    if let Some(e) = egress {
        let _ = e.await;
    }
    // A clean DISCONNECT after the acks (the request queue is FIFO); the session persists.
    let _ = client.try_disconnect();
    let _ = tokio::time::timeout(Duration::from_millis(500), async {
        let mut rx = link.connected.subscribe();
        while rx.borrow_and_update().is_some() {
            if rx.changed().await.is_err() {
                break;
            }
        }
    })
    .await;
    stop_poller.cancel();
    let _ = poller.await;
    ctx.status.set(State::Stopped, "MQTT bridge stopped");
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn poll_loop(
    mut eventloop: EventLoop,
    client: AsyncClient,
    link: Arc<Link>,
    filters: Vec<Filter>,
    ingest_tx: mpsc::Sender<(u64, Publish)>,
    ctx: ComponentContext,
    cfg: MqttConfig,
    stop: CancellationToken,
) {
    let broker = format!("{}:{}", cfg.host, cfg.port);
    // 0.5..1.5 times a step that doubles from reconnect_min to reconnect_max, back to
    // reconnect_min on every CONNACK.
    let mut backoff = Backoff::new(cfg.reconnect_min, cfg.reconnect_max)
        .with_jitter(Jitter::Spread(0.5))
        .may_exceed_max();
    loop {
        let ev = tokio::select! {
            _ = stop.cancelled() => break,
            ev = eventloop.poll() => ev,
        };
        match ev {
            Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                let generation = link.generation.fetch_add(1, Ordering::AcqRel) + 1;
                backoff.reset();
                if !ack.session_present && !filters.is_empty() {
                    // A new session has no subscriptions (first start, or the broker lost it).
                    if let Err(e) = client.try_subscribe_many(filters.clone()) {
                        tracing::error!(error = %e, "could not queue the MQTT subscriptions");
                    }
                }
                metrics::counter!("edge_mqtt_connects_total").increment(1);
                metrics::gauge!("edge_mqtt_connected").set(1.0);
                let _ = link.connected.send_replace(Some(generation));
                ctx.status.field("generation", generation);
                ctx.status.set(
                    State::Up,
                    format!(
                        "connected to {broker} ({})",
                        if ack.session_present {
                            "session resumed"
                        } else {
                            "new session"
                        }
                    ),
                );
            }
            Ok(Event::Incoming(Packet::Publish(p))) => {
                let generation = link.generation();
                match ingest_tx.try_send((generation, p)) {
                    Ok(()) => {}
                    // Intake has stopped: the message stays unacked and the broker keeps it.
                    Err(mpsc::error::TrySendError::Closed(_)) => {}
                    Err(mpsc::error::TrySendError::Full(m)) => {
                        metrics::counter!("edge_mqtt_ingest_queue_waits_total").increment(1);
                        tokio::select! {
                            _ = stop.cancelled() => break,
                            _ = ingest_tx.send(m) => {}
                        }
                    }
                }
            }
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                link.pubacks.fetch_add(1, Ordering::AcqRel);
                link.puback_notify.notify_waiters();
            }
            Ok(Event::Incoming(Packet::SubAck(s))) => {
                let refused: Vec<String> = s
                    .return_codes
                    .iter()
                    .zip(filters.iter())
                    .filter(|(c, _)| !matches!(c, SubscribeReasonCode::Success(_)))
                    .map(|(c, f)| format!("{} ({c:?})", f.path))
                    .collect();
                if !refused.is_empty() {
                    metrics::counter!("edge_mqtt_subscriptions_refused_total")
                        .increment(refused.len() as u64);
                    ctx.status.set(
                        State::Degraded,
                        format!(
                            "connected to {broker}, but the broker refused the subscriptions {}; check the broker ACL for this client",
                            refused.join(", ")
                        ),
                    );
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                tracing::warn!(broker = %broker, reason = ?d.reason_code, "the MQTT broker closed the session");
            }
            Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) => {
                let _ = link.connected.send_replace(None);
            }
            Ok(_) => {}
            Err(e) => {
                let _ = link.connected.send_replace(None);
                metrics::gauge!("edge_mqtt_connected").set(0.0);
                if stop.is_cancelled() {
                    break;
                }
                let what = match &e {
                    rumqttc::v5::ConnectionError::ConnectionRefused(code) => format!(
                        "the MQTT broker {broker} refused the connection ({code:?}): check mqtt.username, mqtt.password_file and the broker's ACL"
                    ),
                    rumqttc::v5::ConnectionError::Tls(t) => format!(
                        "TLS with the MQTT broker {broker} failed ({t}): check mqtt.tls.ca_file and that the broker certificate names {}",
                        cfg.host
                    ),
                    other => format!("cannot reach the MQTT broker {broker}: {other}"),
                };
                ctx.status.set(
                    State::Down,
                    format!("{what}; retrying (backoff up to {:?})", cfg.reconnect_max),
                );
                if !backoff.sleep(&stop).await {
                    break;
                }
            }
        }
    }
    let _ = link.connected.send_replace(None);
    metrics::gauge!("edge_mqtt_connected").set(0.0);
}

/// One log request covering a run of publishes, in arrival order.
struct Pending {
    /// (connection generation, publish, dead-letter reason) per message, in request order.
    messages: Vec<(u64, Publish, Option<Rejection>)>,
    request: AppendRequest,
    ticket: AppendTicket,
}

/// Messages turned into one log request at most (the rest of the queue waits for the next one).
const MAX_BATCH: usize = 512;

async fn process_loop(
    rules: Vec<CompiledRule>,
    limits: Limits,
    mut ingest_rx: mpsc::Receiver<(u64, Publish)>,
    pending_tx: mpsc::Sender<Pending>,
    ctx: ComponentContext,
    _guard: tokio_util::task::task_tracker::TaskTrackerToken,
) {
    loop {
        let first = tokio::select! {
            biased;
            _ = ctx.shutdown.intake().cancelled() => break,
            m = ingest_rx.recv() => match m {
                Some(m) => m,
                None => break,
            },
        };
        // Everything already queued goes into the same request: one submission and one durable
        // ticket per run of messages instead of per message.
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match ingest_rx.try_recv() {
                Ok(m) => batch.push(m),
                Err(_) => break,
            }
        }
        let now = edge_core::time::now_ms();
        let mut events = Vec::with_capacity(batch.len());
        let mut messages = Vec::with_capacity(batch.len());
        for (generation, publish) in batch {
            let topic = String::from_utf8_lossy(&publish.topic);
            let props: &[(String, String)] = publish
                .properties
                .as_ref()
                .map(|p| &p.user_properties[..])
                .unwrap_or(&[]);
            let (event, rejected) = match ingress::to_event(
                &rules,
                &limits,
                &topic,
                &publish.payload,
                props,
                now,
            ) {
                Ok(e) => (e, None),
                Err((why, dead_letter)) => {
                    tracing::debug!(topic = %topic, reason = why.label(), "MQTT message dead-lettered");
                    (*dead_letter, Some(why))
                }
            };
            events.push(event);
            messages.push((generation, publish, rejected));
        }
        let request = AppendRequest::events(events);
        let ticket = match ctx.log.submit(request.clone()).await {
            Ok(t) => t,
            Err(_) => break, // the log is closed: shutting down; the messages stay unacked
        };
        let p = Pending {
            messages,
            request,
            ticket,
        };
        if pending_tx.send(p).await.is_err() {
            break;
        }
    }
}

async fn ack_loop(
    mut pending_rx: mpsc::Receiver<Pending>,
    client: AsyncClient,
    link: Arc<Link>,
    ctx: ComponentContext,
    _guard: tokio_util::task::task_tracker::TaskTrackerToken,
) {
    let mut degraded = false;
    // Acks in receive order, waiting for room in rumqttc's request channel: (generation, packet).
    let mut unsent: std::collections::VecDeque<(u64, Publish)> = std::collections::VecDeque::new();
    // The messages of a request the log refused, resubmitted one per request (see below); they
    // are acked before anything that arrived after them.
    let mut split: std::collections::VecDeque<Pending> = std::collections::VecDeque::new();
    loop {
        let next = if let Some(p) = split.pop_front() {
            Some(p)
        } else if unsent.is_empty() {
            pending_rx.recv().await
        } else {
            // Retry the waiting acks soon even if no new message arrives.
            tokio::select! {
                m = pending_rx.recv() => m,
                _ = tokio::time::sleep(Duration::from_millis(2)) => {
                    if !flush_acks(&client, &link, &mut unsent) {
                        return;
                    }
                    continue;
                }
            }
        };
        let Some(mut p) = next else { break };
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5))
            .with_jitter(Jitter::None);
        let outcome = loop {
            match (&mut p.ticket).await {
                Ok(o) => break Some(o),
                Err(LogError::Closed) => return,
                Err(e @ (LogError::Full | LogError::Storage { .. })) => {
                    // Hold the ack: the broker keeps the message (and, at receive_maximum,
                    // stops sending more). This is the backpressure of a full disk budget.
                    if !degraded {
                        ctx.status.set(
                            State::Degraded,
                            format!("the local log refuses writes ({e}); acks are held and the broker keeps the messages"),
                        );
                        degraded = true;
                    }
                    if !backoff.sleep(ctx.shutdown.all()).await {
                        return;
                    }
                    match ctx.log.submit(p.request.clone()).await {
                        Ok(t) => p.ticket = t,
                        Err(_) => return,
                    }
                }
                Err(_) if p.messages.len() > 1 => {
                    // The log refused the request (a record it cannot take). One message of it
                    // may be the cause: submit each message on its own, so that only the ones
                    // the log refuses become dead letters. They are stored after the requests
                    // already queued behind this one (their seqs are later than their arrival),
                    // and acked in arrival order.
                    let events = std::mem::take(&mut p.request.events);
                    for (m, event) in p.messages.drain(..).zip(events) {
                        let request = AppendRequest::one(event);
                        let ticket = match ctx.log.submit(request.clone()).await {
                            Ok(t) => t,
                            Err(_) => return,
                        };
                        split.push_back(Pending {
                            messages: vec![m],
                            request,
                            ticket,
                        });
                    }
                    break None;
                }
                Err(e) => {
                    // The log refused this message's record itself: keep the message as a dead
                    // letter instead, so it is neither lost nor retried forever.
                    if p.messages
                        .iter()
                        .all(|(_, _, r)| *r == Some(Rejection::LogRefused))
                    {
                        // Even the dead letter was refused: hold the ack and retry with backoff.
                        tracing::error!(error = %e, "the local log refused a dead letter; the message stays unacked and is retried");
                        if !backoff.sleep(ctx.shutdown.all()).await {
                            return;
                        }
                    }
                    let events = p
                        .messages
                        .iter_mut()
                        .map(|(_, publish, rejected)| {
                            *rejected = Some(Rejection::LogRefused);
                            crate::deadletter::DeadLetter::new(
                                "mqtt",
                                format!("the local log refused the record: {e}"),
                            )
                            .field("topic", String::from_utf8_lossy(&publish.topic).to_string())
                            .original(&publish.payload, crate::deadletter::DEFAULT_KEEP_BYTES)
                            .into_event()
                        })
                        .collect();
                    p.request = AppendRequest::events(events);
                    match ctx.log.submit(p.request.clone()).await {
                        Ok(t) => p.ticket = t,
                        Err(_) => return,
                    }
                }
            }
        };
        if degraded {
            degraded = false;
            if link.connected.borrow().is_some() {
                ctx.status
                    .set(State::Up, "connected; the local log accepts writes again");
            }
        }
        let Some(outcome) = outcome else { continue };
        for (i, (generation, publish, rejected)) in p.messages.into_iter().enumerate() {
            let stream = p
                .request
                .events
                .get(i)
                .map(|e| e.stream.to_string())
                .unwrap_or_default();
            match rejected {
                Some(r) => metrics::counter!("edge_mqtt_deadletters_total", "reason" => r.label())
                    .increment(1),
                None if outcome.appended.get(i).is_some_and(|a| a.is_duplicate()) => {
                    metrics::counter!("edge_mqtt_duplicates_total", "stream" => stream).increment(1)
                }
                None => {
                    metrics::counter!("edge_mqtt_ingested_total", "stream" => stream).increment(1)
                }
            }
            if publish.qos == QoS::AtMostOnce {
                continue;
            }
            // Keep only what the ack needs (packet id and QoS), not the payload.
            let mut ack = publish;
            ack.payload = bytes::Bytes::new();
            ack.topic = bytes::Bytes::new();
            ack.properties = None;
            unsent.push_back((generation, ack));
        }
        if !flush_acks(&client, &link, &mut unsent) {
            return;
        }
    }
    // Intake stopped: give the poller a moment to take the last acks.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
    while !unsent.is_empty() && tokio::time::Instant::now() < deadline {
        if !flush_acks(&client, &link, &mut unsent) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Sends waiting acks in order until rumqttc's request channel is full. An ack whose message came
/// on an earlier connection is dropped: the broker redelivers that message, and the log stores it
/// once (event id) or again (no event id: at least once). Returns false when the client is gone.
fn flush_acks(
    client: &AsyncClient,
    link: &Link,
    unsent: &mut std::collections::VecDeque<(u64, Publish)>,
) -> bool {
    let current = link.generation();
    while let Some((generation, ack)) = unsent.front() {
        if *generation != current {
            metrics::counter!("edge_mqtt_acks_skipped_total").increment(1);
            unsent.pop_front();
            continue;
        }
        match client.try_ack(ack) {
            Ok(()) => {
                unsent.pop_front();
            }
            Err(rumqttc::v5::ClientError::TryRequest(_)) => return true,
            Err(_) => return false,
        }
    }
    true
}
