//! The offers engine (`[offers]` in the agent config): from a shopper in the aisle to an offer on
//! the kiosk, offline. [`engine`] decides (pure), [`ledger`] holds caps and budget spend,
//! [`campaign`] reads HQ's campaigns and prices; this module runs it as a component:
//!
//! * At start it rebuilds its state from the log: every `hq.campaigns` and `hq.prices` record
//!   still stored (compacted streams: the current set), and its own `offers.decisions` (the
//!   caps and the spend of each budget lease).
//! * It reads `presence.events` from a durable cursor and commits each batch's decisions in the
//!   same transaction as the cursor move: a crash neither loses nor repeats a decision, and
//!   never spends a lease twice.
//! * It follows `hq.campaigns`, `hq.prices`, `pos.scans`, `pos.transactions` and `queue.length`
//!   as they grow (the basket of a lane and the queue lengths are in memory: after a restart
//!   they start empty).
//!
//! Decisions reach kiosks and signage through an `[[mqtt.egress]]` rule on `offers.decisions`,
//! the lane's pole display through the `customer_display` driver, and HQ through the uplink
//! (exactly once: that is how HQ learns each lease's spend).

pub mod campaign;
pub mod engine;
pub mod ledger;

use edge_core::component::{ComponentContext, ComponentError, Task};
use edge_core::config::{Problems, join};
use edge_core::cursor::{CursorReader, Start};
use edge_core::log::ReadLimits;
use edge_core::{Event, State};
use engine::{EngineConfig, OffersEngine};
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `[offers]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OffersConfig {
    pub enabled: bool,
    pub name: String,
    /// The presence events that ask for offers.
    pub input: String,
    pub output: String,
    pub campaigns_stream: String,
    pub prices_stream: String,
    /// Presence event kinds that ask for an offer.
    pub triggers: Vec<String>,
    /// A visit ends after this long without a presence event of the tag, seconds.
    pub visit_gap_s: u64,
    /// Tag prefixes of identified shoppers (the store app's pseudonymous per-install ids).
    pub identified_tags: Vec<String>,
    /// Zone metadata: `{ name, display, lane }`.
    pub zones: Vec<engine::ZoneInfo>,
    /// The store's own campaigns (same schema as `hq.campaign/1`); an HQ record of the same id
    /// with a higher version replaces one.
    pub campaigns: Vec<campaign::Campaign>,
    /// The store's own prices, cents by SKU, under HQ's `hq.prices`.
    pub prices: std::collections::BTreeMap<String, i64>,
}

impl Default for OffersConfig {
    fn default() -> Self {
        OffersConfig {
            enabled: false,
            name: "offers".into(),
            input: "presence.events".into(),
            output: "offers.decisions".into(),
            campaigns_stream: "hq.campaigns".into(),
            prices_stream: "hq.prices".into(),
            triggers: EngineConfig::default().triggers,
            visit_gap_s: EngineConfig::default().visit_gap_s,
            identified_tags: Vec::new(),
            zones: Vec::new(),
            campaigns: Vec::new(),
            prices: Default::default(),
        }
    }
}

impl OffersConfig {
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            triggers: self.triggers.clone(),
            visit_gap_s: self.visit_gap_s,
            identified_tags: self.identified_tags.clone(),
            zones: self.zones.clone(),
        }
    }

    pub fn validate(&self, path: &str, problems: &mut Problems) {
        for (field, s) in [
            ("input", &self.input),
            ("output", &self.output),
            ("campaigns_stream", &self.campaigns_stream),
            ("prices_stream", &self.prices_stream),
        ] {
            if let Err(e) = edge_core::config::check_stream_name(s) {
                problems.push(join(path, field), e);
            }
        }
        if self.input == self.output {
            problems.push(join(path, "output"), "must differ from input");
        }
        for (i, t) in self.triggers.iter().enumerate() {
            if !matches!(t.as_str(), "enter" | "dwell" | "exit") {
                problems.push(
                    join(path, &format!("triggers[{i}]")),
                    "must be enter, dwell or exit",
                );
            }
        }
        for (i, c) in self.campaigns.iter().enumerate() {
            let text = serde_json::to_vec(c).unwrap_or_default();
            if let Err(e) = campaign::Campaign::parse(&text) {
                problems.push(join(path, &format!("campaigns[{i}]")), e);
            }
        }
        for (sku, cents) in &self.prices {
            if *cents < 0 {
                problems.push(join(path, &format!("prices.{sku}")), "must be >= 0 cents");
            }
        }
        if self.visit_gap_s == 0 {
            problems.push(join(path, "visit_gap_s"), "must be at least 1");
        }
        let mut seen = std::collections::HashSet::new();
        for (i, z) in self.zones.iter().enumerate() {
            if z.name.is_empty() || !seen.insert(z.name.as_str()) {
                problems.push(
                    join(path, &format!("zones[{i}].name")),
                    "must be non-empty and unique",
                );
            }
        }
    }

    pub fn build(&self, ctx: ComponentContext) -> Task {
        let cfg = self.clone();
        Box::pin(async move { run(cfg, ctx).await })
    }
}

const LIMITS: ReadLimits = ReadLimits {
    max_records: 2_000,
    max_bytes: 4 << 20,
};

/// A reader that is never committed: state rebuilt from the stream's start at every start.
async fn follower(
    ctx: &ComponentContext,
    cfg: &OffersConfig,
    stream: &str,
    start: Start,
) -> Result<CursorReader, ComponentError> {
    let r = CursorReader::open(
        ctx.log.clone(),
        format!("offers.{}.state.{stream}", cfg.name),
        stream,
        start,
    )
    .await
    .map_err(|e| ComponentError::from(format!("opening {stream}: {e}")))?;
    Ok(r.with_limits(LIMITS))
}

fn err(what: &str) -> impl Fn(edge_core::log::LogError) -> ComponentError + '_ {
    move |e| ComponentError::from(format!("{what}: {e}"))
}

/// Everything `r` holds now, applied record by record; `r` then stands at the head.
async fn catch_up(
    r: &mut CursorReader,
    mut apply: impl FnMut(&edge_core::Record),
) -> Result<u64, ComponentError> {
    let mut n = 0;
    while let Some(b) = r.try_batch().await.map_err(err("reading state"))? {
        for rec in &b.records {
            apply(rec);
            n += 1;
        }
        r.advance(b.next_seq);
    }
    Ok(n)
}

async fn run(cfg: OffersConfig, ctx: ComponentContext) -> Result<(), ComponentError> {
    let cancel = ctx.shutdown.intake().clone();
    let mut engine = OffersEngine::new(cfg.engine());
    let mut bad = 0u64;
    for (sku, cents) in &cfg.prices {
        let _ = engine.apply_price(
            &serde_json::to_vec(&serde_json::json!({"sku": sku, "price_cents": cents}))
                .unwrap_or_default(),
        );
    }
    for c in &cfg.campaigns {
        let _ = engine.apply_campaign(&serde_json::to_vec(c).unwrap_or_default());
    }
    // Prices before campaigns (a campaign quotes a price), then the ledger.
    let mut prices = follower(&ctx, &cfg, &cfg.prices_stream, Start::Earliest).await?;
    catch_up(&mut prices, |r| {
        if engine.apply_price(&r.event.payload).is_err() {
            bad += 1;
        }
    })
    .await?;
    let mut campaigns = follower(&ctx, &cfg, &cfg.campaigns_stream, Start::Earliest).await?;
    catch_up(&mut campaigns, |r| {
        if engine.apply_campaign(&r.event.payload).is_err() {
            bad += 1;
        }
    })
    .await?;
    let mut own = follower(&ctx, &cfg, &cfg.output, Start::Earliest).await?;
    let replayed = catch_up(&mut own, |r| engine.replay_decision(&r.event.payload)).await?;
    let mut scans = follower(&ctx, &cfg, "pos.scans", Start::Latest).await?;
    let mut txs = follower(&ctx, &cfg, "pos.transactions", Start::Latest).await?;
    let mut queues = follower(&ctx, &cfg, "queue.length", Start::Latest).await?;
    let mut presence = CursorReader::open(
        ctx.log.clone(),
        format!("offers.{}", cfg.name),
        cfg.input.clone(),
        Start::Latest,
    )
    .await
    .map_err(err("opening the presence cursor"))?
    .with_limits(LIMITS);
    presence
        .remember_start()
        .await
        .map_err(err("remembering the presence cursor"))?;
    ctx.status.set(
        State::Up,
        format!(
            "{} campaigns; caps and spend rebuilt from {replayed} decisions; offers from {} to {}",
            engine.campaigns(),
            cfg.input,
            cfg.output
        ),
    );
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            b = presence.next_batch(&cancel) => {
                let Some(b) = b.map_err(err("reading presence events"))? else { break };
                // State first: a campaign or price stored before the event counts for it.
                catch_up(&mut prices, |r| { let _ = engine.apply_price(&r.event.payload); }).await?;
                catch_up(&mut campaigns, |r| { let _ = engine.apply_campaign(&r.event.payload); }).await?;
                catch_up(&mut scans, |r| engine.apply_scan(&r.event.payload)).await?;
                catch_up(&mut txs, |r| engine.apply_transaction(&r.event.payload)).await?;
                catch_up(&mut queues, |r| engine.apply_queue(&r.event.payload)).await?;
                let mut out = Vec::new();
                for r in &b.records {
                    let Ok(v) = serde_json::from_slice::<serde_json::Value>(&r.event.payload) else {
                        bad += 1;
                        continue;
                    };
                    if let Some(mut d) = engine.decide(&v) {
                        d["store"] = serde_json::json!(&*ctx.store_id);
                        let id = d["decision_id"].as_str().unwrap_or_default().to_string();
                        let ts = d["ts"].as_i64().unwrap_or(r.event.event_ts_ms);
                        let key = d["tag"].as_str().unwrap_or_default().to_string();
                        out.push(
                            Event::new(cfg.output.as_str(), serde_json::to_vec(&d).unwrap_or_default())
                                .with_event_ts(ts)
                                .with_key(key)
                                .with_event_id(id)
                                .with_source(cfg.name.clone())
                                .with_schema("offers.decision/1"),
                        );
                    }
                }
                let n = out.len() as u64;
                presence
                    .commit_with(b.next_seq, out)
                    .await
                    .map_err(err("committing offer decisions"))?;
                metrics::counter!("edge_offers_decisions_total").increment(n);
            }
            _ = tick.tick() => {
                ctx.status.field("campaigns", engine.campaigns() as u64);
                ctx.status.field("decisions_total", engine.decisions);
                ctx.status.field("offers_total", engine.offers);
                ctx.status.field("shoppers", engine.shoppers() as u64);
                ctx.status.field("bad_records_total", bad);
                metrics::gauge!("edge_offers_shoppers").set(engine.shoppers() as f64);
            }
        }
    }
    ctx.status.set(State::Stopped, "stopped");
    Ok(())
}
