//! `hq.campaign/1`: what HQ runs in the stores (stream `hq.campaigns`, signed, keyed by campaign
//! id; docs/schemas/hq.campaign.md), and `price/1` (stream `hq.prices`).

use serde::{Deserialize, Serialize};

/// Frequency caps per shopper (a tag: a trolley, a staff badge, the store app's pseudonymous id).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Caps {
    /// Offers of this campaign a shopper gets in all (as long as the decisions are kept).
    #[serde(default)]
    pub lifetime: Option<u32>,
    /// Per visit (a visit ends after `visit_gap_s` without a presence event of the tag).
    #[serde(default)]
    pub per_visit: Option<u32>,
    /// At most `count` within any `window_s` seconds.
    #[serde(default)]
    pub per_window: Option<WindowCap>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WindowCap {
    pub count: u32,
    pub window_s: u64,
}

/// The slice of a campaign's budget HQ leased to this store: spent only within it, offline too.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Budget {
    /// A new lease (new id) replaces the old one; spend is counted per lease.
    pub lease_id: String,
    pub amount_minor: i64,
    /// What one offer costs the budget (e.g. the discount it grants).
    pub cost_minor: i64,
}

/// What the shopper sees.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Offer {
    pub headline: String,
    /// Lines for a two-line pole display; `{price}` is replaced by the current price.
    #[serde(default)]
    pub display_lines: Vec<String>,
    /// The product whose current price (`hq.prices`) the offer quotes.
    #[serde(default)]
    pub sku: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Campaign {
    #[serde(default)]
    pub schema: Option<String>,
    pub id: String,
    /// Monotonic; an older version than the one held is ignored.
    pub version: u64,
    /// Zones it runs in; empty = every zone.
    #[serde(default)]
    pub zones: Vec<String>,
    /// Validity, ms since the Unix epoch.
    #[serde(default)]
    pub valid_from: Option<i64>,
    #[serde(default)]
    pub valid_until: Option<i64>,
    #[serde(default = "yes")]
    pub active: bool,
    pub offer: Offer,
    /// The rule score when no model scores offers; also the tie-breaker.
    #[serde(default)]
    pub priority: f64,
    /// The offer shown when no other is eligible (a zone should have one).
    #[serde(default)]
    pub fallback: bool,
    #[serde(default)]
    pub caps: Caps,
    /// Offer only to identified shoppers (the store app's pseudonymous token): caps cannot hold
    /// for an anonymous tag, so the campaign fails closed.
    #[serde(default)]
    pub require_identified: bool,
    #[serde(default)]
    pub budget: Option<Budget>,
}

fn yes() -> bool {
    true
}

impl Campaign {
    /// A campaign record's payload; the reason when it is not one.
    pub fn parse(payload: &[u8]) -> Result<Campaign, String> {
        let c: Campaign = serde_json::from_slice(payload)
            .map_err(|e| format!("not an hq.campaign/1 record: {e}"))?;
        if let Some(s) = &c.schema
            && s != "hq.campaign/1"
        {
            return Err(format!("schema {s:?} is not hq.campaign/1"));
        }
        if c.id.is_empty() {
            return Err("the campaign has no id".into());
        }
        if let Some(b) = &c.budget
            && (b.amount_minor < 0 || b.cost_minor <= 0)
        {
            return Err("budget: amount_minor must be >= 0 and cost_minor > 0".into());
        }
        if c.caps.per_window.as_ref().is_some_and(|w| w.window_s == 0) {
            return Err("caps.per_window.window_s must be > 0".into());
        }
        Ok(c)
    }

    pub fn runs_at(&self, zone: &str, ts_ms: i64) -> bool {
        self.active
            && self.valid_from.is_none_or(|f| ts_ms >= f)
            && self.valid_until.is_none_or(|u| ts_ms < u)
            && (self.zones.is_empty() || self.zones.iter().any(|z| z == zone))
    }
}

/// `price/1`: `{"schema":"price/1","sku":"...","price_cents":199}`.
pub fn parse_price(payload: &[u8]) -> Result<(String, i64), String> {
    let v: serde_json::Value =
        serde_json::from_slice(payload).map_err(|e| format!("not a price/1 record: {e}"))?;
    let sku = v
        .get("sku")
        .and_then(|s| s.as_str())
        .filter(|s| !s.is_empty())
        .ok_or("the price has no sku")?;
    let cents = v
        .get("price_cents")
        .and_then(|p| p.as_i64())
        .filter(|p| *p >= 0)
        .ok_or("the price has no price_cents >= 0")?;
    Ok((sku.to_string(), cents))
}
