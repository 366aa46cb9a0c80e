//! Frequency caps and budget spend. Both are derived from the engine's own decisions: a decision
//! is committed in the same transaction as the presence cursor's move, and the ledger is rebuilt
//! from `offers.decisions` at every start, so a cap or a lease holds across restarts and kill -9
//! (never a spend that is not in a committed decision, never a decision whose spend is lost).

use super::campaign::Campaign;
use std::collections::{HashMap, VecDeque};

#[derive(Debug, Default)]
struct CapState {
    lifetime: u32,
    visit: (u64, u32),
    window: VecDeque<i64>,
}

/// Why a campaign cannot be offered to a shopper now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    NotIdentified,
    Lifetime,
    PerVisit,
    PerWindow,
    Budget,
    NoPrice,
}

impl Refusal {
    pub fn label(self) -> &'static str {
        match self {
            Refusal::NotIdentified => "not_identified",
            Refusal::Lifetime => "cap_lifetime",
            Refusal::PerVisit => "cap_visit",
            Refusal::PerWindow => "cap_window",
            Refusal::Budget => "budget",
            Refusal::NoPrice => "no_price",
        }
    }
}

/// Caps per (shopper, campaign), spend per (campaign, lease), visits per shopper.
#[derive(Debug, Default)]
pub struct Ledger {
    caps: HashMap<(String, String), CapState>,
    spend: HashMap<(String, String), i64>,
    /// Per tag: (visit number, last presence event time).
    visits: HashMap<String, (u64, i64)>,
    max_window_ms: i64,
}

impl Ledger {
    /// The visit a presence event at `ts_ms` belongs to: a new one after `gap_ms` of silence.
    pub fn visit(&mut self, tag: &str, ts_ms: i64, gap_ms: i64) -> u64 {
        let v = self.visits.entry(tag.to_string()).or_insert((0, ts_ms));
        if ts_ms - v.1 >= gap_ms {
            v.0 += 1;
        }
        v.1 = v.1.max(ts_ms);
        v.0
    }

    pub fn spent(&self, campaign: &str, lease: &str) -> i64 {
        self.spend
            .get(&(campaign.to_string(), lease.to_string()))
            .copied()
            .unwrap_or(0)
    }

    /// Whether `c` may be offered to `tag` in visit `visit` at `ts_ms`.
    pub fn check(&self, c: &Campaign, tag: &str, visit: u64, ts_ms: i64) -> Result<(), Refusal> {
        if let Some(s) = self.caps.get(&(tag.to_string(), c.id.clone())) {
            if c.caps.lifetime.is_some_and(|n| s.lifetime >= n) {
                return Err(Refusal::Lifetime);
            }
            if c.caps
                .per_visit
                .is_some_and(|n| s.visit.0 == visit && s.visit.1 >= n)
            {
                return Err(Refusal::PerVisit);
            }
            if let Some(w) = &c.caps.per_window {
                let since = ts_ms - (w.window_s as i64) * 1000;
                if s.window.iter().filter(|t| **t > since).count() as u32 >= w.count {
                    return Err(Refusal::PerWindow);
                }
            }
        }
        if let Some(b) = &c.budget
            && self.spent(&c.id, &b.lease_id) + b.cost_minor > b.amount_minor
        {
            return Err(Refusal::Budget);
        }
        Ok(())
    }

    /// Counts an offer of `campaign` (with its lease and cost, if any) to `tag`.
    pub fn record(
        &mut self,
        tag: &str,
        campaign: &str,
        visit: u64,
        ts_ms: i64,
        spend: Option<(&str, i64)>,
        window_ms: Option<i64>,
    ) {
        let s = self
            .caps
            .entry((tag.to_string(), campaign.to_string()))
            .or_default();
        s.lifetime += 1;
        s.visit = if s.visit.0 == visit {
            (visit, s.visit.1 + 1)
        } else {
            (visit, 1)
        };
        if let Some(w) = window_ms {
            self.max_window_ms = self.max_window_ms.max(w);
            s.window.push_back(ts_ms);
            let keep = ts_ms - self.max_window_ms;
            while s.window.front().is_some_and(|t| *t <= keep) {
                s.window.pop_front();
            }
        }
        if let Some((lease, cost)) = spend {
            *self
                .spend
                .entry((campaign.to_string(), lease.to_string()))
                .or_default() += cost;
        }
        let v = self.visits.entry(tag.to_string()).or_insert((visit, ts_ms));
        v.0 = v.0.max(visit);
        v.1 = v.1.max(ts_ms);
    }

    /// Shoppers with cap state.
    pub fn shoppers(&self) -> usize {
        self.visits.len()
    }
}
