//! Local streams -> MQTT, at least once, from durable cursors.
//!
//! One task serves every egress rule in turn: read a batch from the rule's cursor, publish it at
//! QoS 1, wait until the broker acknowledged every message of the batch, then move the cursor in the
//! log. A crash or a lost session republishes at most the unacknowledged batch; kiosks that need the
//! latest value after a restart subscribe to retained topics.

use super::Link;
use super::config::{EgressRule, StartAt};
use super::topic::render;
use edge_core::State;
use edge_core::backoff::{Backoff, Jitter, sleep_unless_cancelled};
use edge_core::component::{ComponentContext, ComponentError};
use edge_core::cursor::{CursorReader, Start};
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
        states.push(RuleState { rule, reader });
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
                let topic = render(
                    &st.rule.topic,
                    &[
                        ("store", &ctx.store_id),
                        ("stream", &st.rule.stream),
                        ("key", key),
                        ("source", source),
                    ],
                );
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
            st.reader.commit(batch.next_seq).await?;
            metrics::counter!("edge_mqtt_egress_published_total", "stream" => st.rule.stream.clone())
                .increment(sent);
            published_any = true;
        }
        if !published_any {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                r = commits.changed() => if r.is_err() { return Ok(()) },
                _ = connected.changed() => {}
            }
        }
    }
}
