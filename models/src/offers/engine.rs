//! The offers engine, pure: presence events in, `offers.decision/1` out. No I/O and no clock of
//! its own (time comes with the events), so the live component, `offers replay` and the tests
//! run the same code.
//!
//! For a presence event of a trigger kind (`enter`, `dwell`) in a zone:
//! 1. the shopper's visit (a new one after `visit_gap_s` of silence);
//! 2. the candidates: campaigns that run in the zone now (validity, `active`), not fallbacks;
//! 3. the rules, per candidate, in order: identified shopper (when required), lifetime cap,
//!    per-visit cap, per-window cap, budget lease, a current price when the offer quotes one;
//! 4. the features the scorer asks for, and a score per eligible candidate ([`Scorer`]: the
//!    active model, or the campaigns' priorities);
//! 5. the best eligible candidate, else the zone's fallback (its caps apply, not the budget),
//!    else no offer.
//!
//! Every outcome with at least one candidate is a decision record (except `none` on a dwell
//! update): inputs, features, every candidate's score or refusal, the scorer's name and version,
//! and the outcome.

use super::campaign::{Campaign, parse_price};
use super::ledger::{Ledger, Refusal};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::HashMap;

/// Zone metadata the offers need: the display it has and the POS lane it is, if any.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZoneInfo {
    pub name: String,
    /// E.g. `shelf_screen`, `kiosk`, `pole_display`, `none`.
    #[serde(default)]
    pub display: Option<String>,
    /// The lane whose customer display shows the offer (`offers.decision/1` field `lane`).
    #[serde(default)]
    pub lane: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    /// Presence event kinds that ask for an offer.
    pub triggers: Vec<String>,
    pub visit_gap_s: u64,
    /// Tag prefixes of identified shoppers (the store app's pseudonymous per-install ids).
    pub identified_tags: Vec<String>,
    pub zones: Vec<ZoneInfo>,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            triggers: vec!["enter".into(), "dwell".into()],
            visit_gap_s: 1800,
            identified_tags: Vec::new(),
            zones: Vec::new(),
        }
    }
}

/// The inputs of one decision, named; a model's manifest orders them into its input vector.
pub type Features = serde_json::Map<String, Value>;

/// Scores eligible candidates. `name`/`version` go into every decision.
pub trait Scorer: Send {
    fn name(&self) -> &str;
    fn version(&self) -> u64;
    /// One score per candidate, higher is better; an error falls back to the priorities (and
    /// the decision says so).
    fn score(&mut self, features: &Features, candidates: &[&Campaign]) -> Result<Vec<f64>, String>;
}

/// The campaigns' own priorities: the scorer when no model is active.
#[derive(Debug, Default)]
pub struct PriorityScorer;

impl Scorer for PriorityScorer {
    fn name(&self) -> &str {
        "priority"
    }
    fn version(&self) -> u64 {
        0
    }
    fn score(&mut self, _: &Features, candidates: &[&Campaign]) -> Result<Vec<f64>, String> {
        Ok(candidates.iter().map(|c| c.priority).collect())
    }
}

#[derive(Debug, Default, Clone)]
struct Basket {
    items: u64,
    value_cents: i64,
}

/// What the engine knows, and its counters.
pub struct OffersEngine {
    cfg: EngineConfig,
    zones: HashMap<String, ZoneInfo>,
    campaigns: HashMap<String, Campaign>,
    prices: HashMap<String, i64>,
    baskets: HashMap<String, Basket>,
    queues: HashMap<String, f64>,
    ledger: Ledger,
    scorer: Box<dyn Scorer>,
    pub decisions: u64,
    pub offers: u64,
}

impl std::fmt::Debug for OffersEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OffersEngine")
            .field("campaigns", &self.campaigns.len())
            .field("decisions", &self.decisions)
            .finish()
    }
}

fn text(v: &Value, k: &str) -> Option<String> {
    match v.get(k)? {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// `1234` cents as `12.34`.
pub fn money(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, (cents % 100).abs())
}

impl OffersEngine {
    pub fn new(cfg: EngineConfig) -> OffersEngine {
        OffersEngine {
            zones: cfg
                .zones
                .iter()
                .map(|z| (z.name.clone(), z.clone()))
                .collect(),
            cfg,
            campaigns: HashMap::new(),
            prices: HashMap::new(),
            baskets: HashMap::new(),
            queues: HashMap::new(),
            ledger: Ledger::default(),
            scorer: Box::new(PriorityScorer),
            decisions: 0,
            offers: 0,
        }
    }

    pub fn set_scorer(&mut self, s: Box<dyn Scorer>) {
        self.scorer = s;
    }

    pub fn campaigns(&self) -> usize {
        self.campaigns.len()
    }

    pub fn shoppers(&self) -> usize {
        self.ledger.shoppers()
    }

    pub fn spent(&self, campaign: &str, lease: &str) -> i64 {
        self.ledger.spent(campaign, lease)
    }

    /// An `hq.campaigns` record; an older version than the one held is ignored.
    pub fn apply_campaign(&mut self, payload: &[u8]) -> Result<(), String> {
        let c = Campaign::parse(payload)?;
        match self.campaigns.get(&c.id) {
            Some(old) if old.version > c.version => Ok(()),
            _ => {
                self.campaigns.insert(c.id.clone(), c);
                Ok(())
            }
        }
    }

    /// An `hq.prices` record.
    pub fn apply_price(&mut self, payload: &[u8]) -> Result<(), String> {
        let (sku, cents) = parse_price(payload)?;
        self.prices.insert(sku, cents);
        Ok(())
    }

    /// A `pos.scans` record: one more item in the lane's basket.
    pub fn apply_scan(&mut self, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        let Some(lane) = text(&v, "lane") else { return };
        let b = self.baskets.entry(lane).or_default();
        b.items += 1;
        let sku = text(&v, "gtin").or_else(|| text(&v, "code"));
        if let Some(p) = sku.and_then(|s| self.prices.get(&s)) {
            b.value_cents += p;
        }
    }

    /// A `pos.transactions` record: the lane's basket is closed.
    pub fn apply_transaction(&mut self, payload: &[u8]) {
        if let Ok(v) = serde_json::from_slice::<Value>(payload)
            && let Some(lane) = text(&v, "lane")
        {
            self.baskets.remove(&lane);
        }
    }

    /// A `queue.length` record: `{zone, length}`.
    pub fn apply_queue(&mut self, payload: &[u8]) {
        if let Ok(v) = serde_json::from_slice::<Value>(payload)
            && let (Some(z), Some(n)) = (text(&v, "zone"), v.get("length").and_then(Value::as_f64))
        {
            self.queues.insert(z, n);
        }
    }

    /// One of the engine's own earlier decisions (the ledger is rebuilt from them at start).
    pub fn replay_decision(&mut self, payload: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(payload) else {
            return;
        };
        if !matches!(v["outcome"].as_str(), Some("offer" | "fallback")) {
            return;
        }
        let (Some(tag), Some(c)) = (v["tag"].as_str(), v["campaign"].as_str()) else {
            return;
        };
        let spend = match (v["lease_id"].as_str(), v["cost_minor"].as_i64()) {
            (Some(l), Some(cost)) => Some((l, cost)),
            _ => None,
        };
        self.ledger.record(
            tag,
            c,
            v["visit"].as_u64().unwrap_or(0),
            v["ts"].as_i64().unwrap_or(0),
            spend,
            v["cap_window_ms"].as_i64(),
        );
    }

    fn identified(&self, tag: &str) -> bool {
        self.cfg
            .identified_tags
            .iter()
            .any(|p| tag.starts_with(p.as_str()))
    }

    fn features(&self, zone: &str, tag: &str, e: &Value, ts_ms: i64) -> Features {
        let info = self.zones.get(zone);
        let lane = info.and_then(|z| z.lane.clone());
        let basket = lane
            .as_ref()
            .and_then(|l| self.baskets.get(l))
            .cloned()
            .unwrap_or_default();
        let secs = ts_ms.div_euclid(1000);
        let day = secs.div_euclid(86_400);
        let mut f = Features::new();
        f.insert("zone".into(), json!(zone));
        f.insert(
            "display".into(),
            json!(
                info.and_then(|z| z.display.clone())
                    .unwrap_or_else(|| "none".into())
            ),
        );
        f.insert(
            "dwell_s".into(),
            json!(e["dwell_ms"].as_i64().unwrap_or(0) as f64 / 1000.0),
        );
        f.insert("hour".into(), json!(secs.rem_euclid(86_400) / 3600));
        // 1970-01-01 was a Thursday; 0 = Monday.
        f.insert("weekday".into(), json!((day + 3).rem_euclid(7)));
        f.insert("basket_items".into(), json!(basket.items));
        f.insert("basket_value_cents".into(), json!(basket.value_cents));
        f.insert(
            "queue_length".into(),
            json!(self.queues.get(zone).copied().unwrap_or(0.0)),
        );
        f.insert("identified".into(), json!(self.identified(tag)));
        f
    }

    /// The decision a presence event causes, if any (`offers.decision/1` payload without the
    /// store, which the component adds).
    pub fn decide(&mut self, e: &Value) -> Option<Value> {
        let kind = e["kind"].as_str()?;
        if !self.cfg.triggers.iter().any(|t| t == kind) {
            return None;
        }
        let zone = e["zone"].as_str()?.to_string();
        let tag = e["tag"].as_str()?.to_string();
        let ts = e["ts"].as_i64()?;
        let visit = self
            .ledger
            .visit(&tag, ts, self.cfg.visit_gap_s as i64 * 1000);
        let mut running: Vec<&Campaign> = self
            .campaigns
            .values()
            .filter(|c| c.runs_at(&zone, ts))
            .collect();
        if running.is_empty() {
            return None;
        }
        running.sort_by(|a, b| a.id.cmp(&b.id));
        let identified = self.identified(&tag);
        let features = self.features(&zone, &tag, e, ts);
        let mut outcomes: Vec<(&Campaign, Result<(), Refusal>)> = Vec::new();
        for c in &running {
            let mut r = if c.require_identified && !identified {
                Err(Refusal::NotIdentified)
            } else {
                self.ledger.check(c, &tag, visit, ts)
            };
            if r.is_ok()
                && c.offer
                    .sku
                    .as_ref()
                    .is_some_and(|s| !self.prices.contains_key(s))
            {
                r = Err(Refusal::NoPrice);
            }
            outcomes.push((c, r));
        }
        let eligible: Vec<&Campaign> = outcomes
            .iter()
            .filter(|(c, r)| r.is_ok() && !c.fallback)
            .map(|(c, _)| *c)
            .collect();
        let (scores, scorer_error) = if eligible.is_empty() {
            (Vec::new(), None)
        } else {
            match self.scorer.score(&features, &eligible) {
                Ok(s) if s.len() == eligible.len() && s.iter().all(|x| x.is_finite()) => (s, None),
                Ok(_) => (
                    eligible.iter().map(|c| c.priority).collect(),
                    Some(
                        "the scorer returned a wrong number of scores or a non-finite one"
                            .to_string(),
                    ),
                ),
                Err(err) => (eligible.iter().map(|c| c.priority).collect(), Some(err)),
            }
        };
        let best = eligible
            .iter()
            .zip(&scores)
            .max_by(|a, b| {
                a.1.total_cmp(b.1)
                    .then_with(|| a.0.priority.total_cmp(&b.0.priority))
            })
            .map(|(c, _)| (*c).clone());
        let fallback = || {
            outcomes
                .iter()
                .filter(|(c, r)| c.fallback && r.is_ok())
                .max_by(|a, b| a.0.priority.total_cmp(&b.0.priority))
                .map(|(c, _)| (*c).clone())
        };
        let (outcome, chosen) = match best {
            Some(c) => ("offer", Some(c)),
            None => match fallback() {
                Some(c) => ("fallback", Some(c)),
                None => ("none", None),
            },
        };
        // Nothing to show on a dwell update (every candidate capped, say) is not worth a record;
        // on an enter it is: a shopper arrived where campaigns run and saw nothing.
        if chosen.is_none() && kind != "enter" {
            return None;
        }
        let candidates: Vec<Value> = outcomes
            .iter()
            .map(|(c, r)| {
                let score = eligible
                    .iter()
                    .position(|e| e.id == c.id)
                    .and_then(|i| scores.get(i).copied());
                json!({
                    "campaign": c.id, "version": c.version, "fallback": c.fallback,
                    "outcome": r.err().map_or("eligible", |x| x.label()), "score": score,
                })
            })
            .collect();
        let info = self.zones.get(&zone);
        let mut d = json!({
            "schema": "offers.decision/1",
            "decision_id": format!("od:{tag}:{ts}:{kind}"),
            "tag": tag, "zone": zone, "visit": visit, "identified": identified,
            "trigger": {"kind": kind, "ts": ts, "confidence": e.get("confidence")},
            "ts": ts, "outcome": outcome, "features": features, "candidates": candidates,
            "scorer": {"name": self.scorer.name(), "version": self.scorer.version()},
        });
        if let Some(err) = scorer_error {
            d["scorer"]["error"] = json!(err);
        }
        if let Some(lane) = info.and_then(|z| z.lane.clone()) {
            d["lane"] = json!(lane);
        }
        self.decisions += 1;
        if let Some(c) = chosen {
            let price = c
                .offer
                .sku
                .as_ref()
                .and_then(|s| self.prices.get(s))
                .copied();
            let price_text = price.map(money);
            let lines: Vec<String> = c
                .offer
                .display_lines
                .iter()
                .map(|l| l.replace("{price}", price_text.as_deref().unwrap_or("")))
                .collect();
            d["campaign"] = json!(c.id);
            d["campaign_version"] = json!(c.version);
            d["headline"] = json!(
                c.offer
                    .headline
                    .replace("{price}", price_text.as_deref().unwrap_or(""))
            );
            d["display_lines"] = json!(lines);
            if let (Some(sku), Some(p)) = (&c.offer.sku, price) {
                d["sku"] = json!(sku);
                d["price_cents"] = json!(p);
                d["price_text"] = json!(money(p));
            }
            let window_ms = c.caps.per_window.as_ref().map(|w| w.window_s as i64 * 1000);
            if let Some(w) = window_ms {
                d["cap_window_ms"] = json!(w);
            }
            // A fallback does not spend a budget.
            let spend = c.budget.as_ref().filter(|_| outcome == "offer");
            if let Some(b) = spend {
                d["lease_id"] = json!(b.lease_id);
                d["cost_minor"] = json!(b.cost_minor);
                d["spent_minor"] = json!(self.ledger.spent(&c.id, &b.lease_id) + b.cost_minor);
                d["lease_minor"] = json!(b.amount_minor);
            }
            self.ledger.record(
                &tag,
                &c.id,
                visit,
                ts,
                spend.map(|b| (b.lease_id.as_str(), b.cost_minor)),
                window_ms,
            );
            self.offers += 1;
        }
        Some(d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> OffersEngine {
        let mut e = OffersEngine::new(EngineConfig {
            identified_tags: vec!["app:".into()],
            zones: vec![ZoneInfo {
                name: "aisle-3".into(),
                display: Some("shelf_screen".into()),
                lane: Some("3".into()),
            }],
            ..Default::default()
        });
        e.apply_price(br#"{"schema":"price/1","sku":"cola","price_cents":300}"#)
            .unwrap();
        e.apply_campaign(br#"{"id":"cola","version":1,"zones":["aisle-3"],"priority":5,
            "offer":{"headline":"COLA 2 FOR {price}","display_lines":["COLA 2 FOR {price}","TODAY"],"sku":"cola"},
            "caps":{"per_visit":1,"lifetime":2},"budget":{"lease_id":"L1","amount_minor":150,"cost_minor":50}}"#).unwrap();
        e.apply_campaign(
            br#"{"id":"app-only","version":1,"priority":9,"require_identified":true,
            "offer":{"headline":"MEMBERS: 10% OFF"}}"#,
        )
        .unwrap();
        e.apply_campaign(
            br#"{"id":"welcome","version":1,"fallback":true,"offer":{"headline":"WELCOME"},
            "caps":{"per_visit":1}}"#,
        )
        .unwrap();
        e
    }

    fn enter(tag: &str, ts: i64) -> Value {
        json!({"kind": "enter", "tag": tag, "zone": "aisle-3", "ts": ts, "confidence": 0.9})
    }

    #[test]
    fn the_best_eligible_offer_wins_and_every_candidate_is_logged() {
        let mut e = engine();
        let d = e.decide(&enter("app:42", 1_000)).unwrap();
        assert_eq!(d["outcome"], "offer");
        assert_eq!(
            d["campaign"], "app-only",
            "the identified shopper gets the priority-9 offer"
        );
        let d = e.decide(&enter("trolley-7", 2_000)).unwrap();
        assert_eq!(d["campaign"], "cola");
        assert_eq!(d["display_lines"], json!(["COLA 2 FOR 3.00", "TODAY"]));
        assert_eq!(
            (d["lane"].as_str(), d["price_cents"].as_i64()),
            (Some("3"), Some(300))
        );
        assert_eq!(d["spent_minor"], 50);
        let c: Vec<(&str, &str)> = d["candidates"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["campaign"].as_str().unwrap(),
                    c["outcome"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            c,
            [
                ("app-only", "not_identified"),
                ("cola", "eligible"),
                ("welcome", "eligible")
            ]
        );
        assert_eq!(d["features"]["display"], "shelf_screen");
        assert_eq!(d["scorer"]["name"], "priority");
    }

    #[test]
    fn caps_then_the_budget_hold_and_the_fallback_takes_over() {
        let mut e = engine();
        // Visit 1: cola, then (per-visit cap) the fallback, then nothing (its cap too).
        assert_eq!(e.decide(&enter("t1", 0)).unwrap()["campaign"], "cola");
        let d = e.decide(&enter("t1", 60_000)).unwrap();
        assert_eq!(
            (d["outcome"].as_str(), d["campaign"].as_str()),
            (Some("fallback"), Some("welcome"))
        );
        assert!(d.get("cost_minor").is_none(), "a fallback spends nothing");
        assert_eq!(e.decide(&enter("t1", 120_000)).unwrap()["outcome"], "none");
        // Visit 2 (after the 30 min gap): cola again; visit 3: the lifetime cap of 2.
        let gap = 1_800_000;
        assert_eq!(
            e.decide(&enter("t1", 120_000 + gap)).unwrap()["campaign"],
            "cola"
        );
        let d = e.decide(&enter("t1", 120_000 + 2 * gap)).unwrap();
        assert_eq!(d["outcome"], "fallback");
        assert!(d["candidates"].to_string().contains("cap_lifetime"), "{d}");
        // The lease of 150 pays for 3 offers of 50: t2 gets the third, t3 none.
        assert_eq!(e.decide(&enter("t2", 0)).unwrap()["campaign"], "cola");
        assert_eq!(e.spent("cola", "L1"), 150);
        let d = e.decide(&enter("t3", 0)).unwrap();
        assert_eq!(d["outcome"], "fallback");
        assert!(d["candidates"].to_string().contains("\"budget\""), "{d}");
    }

    #[test]
    fn a_restart_rebuilds_caps_and_spend_from_the_decisions() {
        let mut e = engine();
        let mut log = Vec::new();
        for (tag, ts) in [("t1", 0), ("t2", 10), ("t1", 20)] {
            log.push(e.decide(&enter(tag, ts)).unwrap());
        }
        let mut again = engine();
        for d in &log {
            again.replay_decision(serde_json::to_vec(d).unwrap().as_slice());
        }
        assert_eq!(again.spent("cola", "L1"), 100);
        // t1 had cola and the fallback in this visit: nothing more now.
        assert_eq!(again.decide(&enter("t1", 30)).unwrap()["outcome"], "none");
        assert_eq!(again.decide(&enter("t4", 30)).unwrap()["campaign"], "cola");
        assert_eq!(
            again.decide(&enter("t5", 30)).unwrap()["outcome"],
            "fallback",
            "lease spent"
        );
    }

    #[test]
    fn bad_records_and_older_versions_are_refused_or_ignored() {
        let mut e = engine();
        assert!(e.apply_campaign(b"{").is_err());
        assert!(
            e.apply_campaign(br#"{"id":"","version":1,"offer":{"headline":"x"}}"#)
                .is_err()
        );
        assert!(e.apply_price(br#"{"sku":"x","price_cents":-1}"#).is_err());
        e.apply_campaign(br#"{"id":"cola","version":0,"active":false,"offer":{"headline":"old"}}"#)
            .unwrap();
        assert_eq!(
            e.decide(&enter("t1", 0)).unwrap()["campaign"],
            "cola",
            "version 0 < 1 is ignored"
        );
        e.apply_campaign(br#"{"id":"cola","version":2,"active":false,"offer":{"headline":"off"}}"#)
            .unwrap();
        assert_eq!(e.decide(&enter("t9", 0)).unwrap()["outcome"], "fallback");
        assert!(
            e.decide(&json!({"kind":"exit","tag":"t1","zone":"aisle-3","ts":1}))
                .is_none()
        );
    }
}
