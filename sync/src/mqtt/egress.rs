//! Local streams -> MQTT, at least once, from durable cursors.
//!
//! One task serves every egress rule in turn: read a batch from the rule's cursor, publish it at
//! QoS 1, wait until the broker acknowledged every message of the batch, then move the cursor in the
//! log. A crash or a lost session republishes at most the unacknowledged batch; kiosks that need the
//! latest value after a restart subscribe to retained topics.
//!
//! Poison: a record whose values give no valid MQTT publish (its key substituted into the topic
//! holds a wildcard, U+0000, ...; see [`super::topic::render_checked`]) is not published. It goes
//! to the `deadletter` stream with the reason, in the same log request that moves the cursor past
//! its batch, and is counted in `edge_mqtt_egress_deadletters_total{stream, reason}`. The rule and
//! every other rule and ingress carry on; before this, the client's refusal failed egress and it
//! restarted at the same cursor forever.

use super::Link;
use super::config::{EgressRule, StartAt};
use super::topic::{
    MAX_MQTT_STRING_BYTES, TopicProblem, TopicRefusal, check_mqtt_chars, render_checked,
};
use edge_core::Record;
use edge_core::State;
use edge_core::backoff::{Backoff, Jitter, sleep_unless_cancelled};
use edge_core::component::{ComponentContext, ComponentError};
use edge_core::cursor::{CursorReader, Start};
use edge_core::deadletter::{DEFAULT_KEEP_BYTES, DeadLetter};
use edge_core::log::ReadLimits;
use rumqttc::v5::AsyncClient;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const BATCH: usize = 200;
/// How long to wait for the broker's acks before republishing the batch.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

struct RuleState {
    rule: EgressRule,
    reader: CursorReader,
    /// The last cursor move, queued but maybe not yet durable: the next batch is published
    /// while it commits (its fsync is off the path of the next offer), and it is awaited before
    /// the next move is queued.
    pending: Option<edge_core::log::AppendTicket>,
}

/// Runs egress until shutdown; an error (a log read failing, the client gone) is reported and the
/// loop restarts from the durable cursors after a backoff.
pub(crate) async fn run(
    rules: Vec<EgressRule>,
    client: AsyncClient,
    link: Arc<Link>,
    ctx: ComponentContext,
) {
    let mut backoff =
        Backoff::new(Duration::from_millis(500), Duration::from_secs(30)).with_jitter(Jitter::None);
    loop {
        match run_once(&rules, &client, &link, &ctx).await {
            Ok(()) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                metrics::counter!("edge_mqtt_egress_errors_total").increment(1);
                ctx.status.set(
                    State::Degraded,
                    format!(
                        "MQTT egress failed: {e}; restarting from the durable cursors in {delay:?}"
                    ),
                );
                if !sleep_unless_cancelled(delay, ctx.shutdown.all()).await {
                    return;
                }
            }
        }
    }
}

async fn run_once(
    rules: &[EgressRule],
    client: &AsyncClient,
    link: &Arc<Link>,
    ctx: &ComponentContext,
) -> Result<(), ComponentError> {
    let mut states = Vec::new();
    for rule in rules.iter().cloned() {
        let start = match rule.start_at {
            StartAt::Earliest => Start::Earliest,
            StartAt::Latest => Start::Latest,
        };
        let mut reader = CursorReader::open(
            ctx.log.clone(),
            rule.cursor_name(),
            rule.stream.clone(),
            start,
        )
        .await?
        .with_limits(ReadLimits {
            max_records: BATCH,
            max_bytes: 4 << 20,
        });
        // Remember the start so a restart neither skips nor replays.
        reader.remember_start().await?;
        states.push(RuleState {
            rule,
            reader,
            pending: None,
        });
    }
    let mut commits = ctx.log.subscribe();
    let mut connected = link.connected.subscribe();
    let stop = ctx.shutdown.all().clone();
    loop {
        // Publish only while connected; otherwise wait for the connection.
        while connected.borrow_and_update().is_none() {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = connected.changed() => if r.is_err() { return Ok(()) },
            }
        }
        commits.borrow_and_update();
        let mut published_any = false;
        for st in &mut states {
            if stop.is_cancelled() {
                return Ok(());
            }
            let Some(batch) = st.reader.try_batch().await? else {
                continue;
            };
            let baseline = link.pubacks.load(Ordering::Acquire);
            let mut sent = 0u64;
            let mut skipped = 0u64;
            let mut dead = Vec::new();
            let now = edge_core::time::now_ms();
            for r in &batch.records {
                if let Some(max_age) = st.rule.max_age
                    && now - r.event.event_ts_ms > max_age.as_millis() as i64
                {
                    skipped += 1;
                    continue;
                }
                let key = r.event.key.as_deref().unwrap_or("none");
                let source = r.event.source.as_deref().unwrap_or("none");
                let topic = render_checked(
                    &st.rule.topic,
                    &[
                        ("store", &ctx.store_id),
                        ("stream", &st.rule.stream),
                        ("key", key),
                        ("source", source),
                    ],
                )
                .and_then(|t| check_event_id(r).map(|()| t));
                let topic = match topic {
                    Ok(t) => t,
                    Err(refusal) => {
                        metrics::counter!("edge_mqtt_egress_deadletters_total", "stream" => st.rule.stream.clone(), "reason" => refusal.problem.label())
                            .increment(1);
                        dead.push(dead_letter(&st.rule, r, refusal));
                        continue;
                    }
                };
                let mut props = PublishProperties {
                    content_type: r
                        .event
                        .schema
                        .as_ref()
                        .map(|_| "application/json".to_string()),
                    ..Default::default()
                };
                props
                    .user_properties
                    .push(("edge.stream".into(), st.rule.stream.clone()));
                props
                    .user_properties
                    .push(("edge.seq".into(), r.seq.to_string()));
                if let Some(id) = &r.event.event_id {
                    props
                        .user_properties
                        .push(("edge.event_id".into(), id.clone()));
                }
                client
                    .publish_with_properties(
                        topic,
                        QoS::AtLeastOnce,
                        st.rule.retain,
                        r.event.payload.clone(),
                        props,
                    )
                    .await?;
                sent += 1;
            }
            if skipped > 0 {
                metrics::counter!("edge_mqtt_egress_skipped_stale_total", "stream" => st.rule.stream.clone())
                    .increment(skipped);
            }
            // Every message of the batch acknowledged by the broker, or republish the batch.
            let target = baseline + sent;
            let acked = tokio::time::timeout(ACK_TIMEOUT, async {
                loop {
                    let waiter = link.puback_notify.notified();
                    if link.pubacks.load(Ordering::Acquire) >= target {
                        return;
                    }
                    waiter.await;
                }
            })
            .await
            .is_ok();
            if !acked {
                ctx.status.set(
                    State::Degraded,
                    format!(
                        "the broker did not acknowledge egress of {} within {ACK_TIMEOUT:?}; republishing",
                        st.rule.stream
                    ),
                );
                continue;
            }
            if !dead.is_empty() {
                tracing::warn!(stream = %st.rule.stream, records = dead.len(), "MQTT egress cannot publish records whose values give no valid MQTT topic; they went to the deadletter stream and egress moved on");
            }
            // The dead letters commit with the cursor move: once each, even across a crash.
            if let Some(previous) = st.pending.take() {
                previous.await?;
            }
            st.pending = Some(st.reader.submit_with(batch.next_seq, dead).await?);
            metrics::counter!("edge_mqtt_egress_published_total", "stream" => st.rule.stream.clone())
                .increment(sent);
            published_any = true;
        }
        if !published_any {
            // Idle: let the last moves become durable (and fail here, not later) before sleeping.
            for st in &mut states {
                if let Some(previous) = st.pending.take() {
                    previous.await?;
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = commits.changed() => if r.is_err() { return Ok(()) },
                _ = connected.changed() => {}
            }
        }
    }
}

/// The event id goes out as a user property, an MQTT string like the topic.
fn check_event_id(r: &Record) -> Result<(), TopicRefusal> {
    let Some(id) = &r.event.event_id else {
        return Ok(());
    };
    let problem = if id.len() > MAX_MQTT_STRING_BYTES {
        Some(TopicProblem::TooLong)
    } else {
        check_mqtt_chars(id).err()
    };
    match problem {
        None => Ok(()),
        Some(problem) => Err(TopicRefusal {
            problem,
            reason: format!(
                "the event id {:?} cannot be sent as an MQTT user property",
                id.chars().take(80).collect::<String>()
            ),
        }),
    }
}

fn dead_letter(rule: &EgressRule, r: &Record, refusal: TopicRefusal) -> edge_core::Event {
    let mut d = DeadLetter::new(
        "mqtt_egress",
        format!(
            "MQTT egress cannot publish {} seq {}: {}",
            rule.stream, r.seq, refusal.reason
        ),
    )
    .field("stream", rule.stream.as_str())
    .field("seq", r.seq)
    .field("problem", refusal.problem.label())
    .field("topic_template", rule.topic.as_str());
    if let Some(k) = &r.event.key {
        d = d.field("key", k.as_str());
    }
    d.original(&r.event.payload, DEFAULT_KEEP_BYTES)
        .into_event()
}
