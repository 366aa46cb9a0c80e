//! Receipt templates: one regular expression per kind of printed line, per POS vendor.
//!
//! A template classifies each printed line of a receipt, in this order: `ignore`, `void`, `refund`,
//! `total`, `subtotal`, `tax`, `change`, `tender`, `receipt_no`, `timestamp`, `weight`, `quantity`,
//! `discount`, `item`. The first pattern that matches wins. Patterns use named groups:
//!
//! | pattern | groups |
//! |---|---|
//! | `item` | `desc`, `amount`, optional `flag` (tax flag), optional `code` |
//! | `quantity` | `qty`, optional `unit` (unit price) |
//! | `weight` | `weight`, optional `wunit` (`kg`, `lb`...), optional `unit` (price per weight unit) |
//! | `discount`, `void`, `refund` | optional `desc`, `amount` |
//! | `subtotal`, `tax`, `total`, `change` | `amount` |
//! | `tender` | `type`, `amount` |
//! | `receipt_no` | `no` |
//! | `timestamp` | `ts` (kept as printed) |
//!
//! `{AMT}` inside a pattern is replaced by the amount expression for the template's decimal
//! separator (`1,234.56`, `-1.00`, `1.00-`, `(1.00)`; with `decimal_comma`: `1.234,56`).
//! Item lines are collected until the total line; lines after it are tenders, change and footer.

use edge_core::config::{Problems, join};
use regex::Regex;
use serde::{Deserialize, Serialize};

/// Where a quantity or weight line stands relative to its item line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum LinePosition {
    #[default]
    Before,
    After,
}

/// A template as configured (`[drivers.template]`): a built-in base plus overrides.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TemplateConfig {
    /// Built-in template the patterns below override: `generic` (US/UK style, `1,234.56`) or
    /// `generic_eu` (`1.234,56`, German/French labels).
    pub base: String,
    /// ISO 4217 currency written into transactions.
    pub currency: String,
    pub decimal_comma: Option<bool>,
    pub quantity_position: Option<LinePosition>,
    /// Take the receipt number from the first printed barcode when no line matches `receipt_no`.
    /// Off by default: a barcode is often a loyalty or coupon code that repeats across sales,
    /// and a repeated number makes the log drop the next sale as a reprint.
    pub receipt_no_from_barcode: bool,
    /// Tender types (matched against the `type` group, case-insensitive) that pay in cash.
    pub cash_tenders: Vec<String>,
    pub ignore: Option<Vec<String>>,
    pub item: Option<String>,
    pub quantity: Option<String>,
    pub weight: Option<String>,
    pub discount: Option<String>,
    pub void: Option<String>,
    pub refund: Option<String>,
    pub subtotal: Option<String>,
    pub tax: Option<String>,
    pub total: Option<String>,
    pub tender: Option<String>,
    pub change: Option<String>,
    pub receipt_no: Option<String>,
    pub timestamp: Option<String>,
}

impl Default for TemplateConfig {
    fn default() -> Self {
        TemplateConfig {
            base: "generic".into(),
            currency: "USD".into(),
            decimal_comma: None,
            quantity_position: None,
            receipt_no_from_barcode: false,
            cash_tenders: vec![
                "cash".into(),
                "bar".into(),
                "especes".into(),
                "espèces".into(),
            ],
            ignore: None,
            item: None,
            quantity: None,
            weight: None,
            discount: None,
            void: None,
            refund: None,
            subtotal: None,
            tax: None,
            total: None,
            tender: None,
            change: None,
            receipt_no: None,
            timestamp: None,
        }
    }
}

struct Base {
    decimal_comma: bool,
    quantity_position: LinePosition,
    ignore: &'static [&'static str],
    item: &'static str,
    quantity: &'static str,
    weight: &'static str,
    discount: &'static str,
    void: &'static str,
    refund: &'static str,
    subtotal: &'static str,
    tax: &'static str,
    total: &'static str,
    tender: &'static str,
    change: &'static str,
    receipt_no: &'static str,
    timestamp: &'static str,
}

const GENERIC: Base = Base {
    decimal_comma: false,
    quantity_position: LinePosition::Before,
    ignore: &[r"^(?i)(?:you saved|savings total|items sold)\b"],
    item: r"^(?P<desc>\S.*?)\s{2,}(?P<amount>{AMT})(?:\s+(?P<flag>[A-Z]{1,2}))?$",
    quantity: r"^\s+(?P<qty>\d{1,4})\s+@\s+(?:(?P<unit>{AMT})|\d+\s+FOR\s+{AMT})$",
    weight: r"^\s+(?P<weight>\d+\.\d{1,3})\s*(?P<wunit>(?i:lb|kg|g|oz))\s+@\s+(?P<unit>{AMT})\s*/\s*(?i:lb|kg|g|oz)$",
    discount: r"^\s+(?P<desc>\S.*?)\s{2,}(?P<amount>{AMT})$",
    void: r"^(?i:void|item void|voided)\s+(?P<desc>.*?)\s{2,}(?P<amount>{AMT})$",
    refund: r"^(?i:refund|return)\s+(?P<desc>.*?)\s{2,}(?P<amount>{AMT})$",
    subtotal: r"^(?i:sub\s?total)\s+(?P<amount>{AMT})$",
    tax: r"^(?i:(?:sales\s+)?tax)\b.*?\s(?P<amount>{AMT})$",
    total: r"^\**\s*(?i:total|balance due|amount due)\s+(?P<amount>{AMT})$",
    tender: r"^(?P<type>(?i:cash|check|visa|mastercard|mc|amex|discover|debit|credit|ebt|gift card))\b.*?\s(?P<amount>{AMT})$",
    change: r"^(?i:change(?:\s+due)?)\s+(?P<amount>{AMT})$",
    receipt_no: r"^(?i:trans|transaction|receipt|rcpt|trx)\s*(?:#|no\.?|number)?:?\s*(?P<no>[A-Za-z0-9-]{1,40})$",
    timestamp: r"^(?P<ts>\d{2}/\d{2}/\d{2,4}\s+\d{1,2}:\d{2}(?::\d{2})?(?:\s*[AP]M)?)$",
};

const GENERIC_EU: Base = Base {
    decimal_comma: true,
    quantity_position: LinePosition::Before,
    ignore: &[r"^(?i)(?:sie sparen|ersparnis|mwst\s+netto)\b"],
    item: r"^(?P<desc>\S.*?)\s{2,}(?P<amount>{AMT})(?:\s+(?P<flag>[A-Z]{1,2}))?$",
    quantity: r"^\s+(?P<qty>\d{1,4})\s*(?:x|X|Stk\s*x)\s+(?P<unit>{AMT})$",
    weight: r"^\s+(?P<weight>\d+,\d{1,3})\s*(?P<wunit>(?i:kg|g))\s*x\s+(?P<unit>{AMT})\s*(?:EUR|€)?\s*/\s*(?i:kg|g)$",
    discount: r"^\s+(?P<desc>\S.*?)\s{2,}(?P<amount>{AMT})$",
    void: r"^(?i:storno)\s+(?P<desc>.*?)\s{2,}(?P<amount>{AMT})$",
    refund: r"^(?i:rückgabe|retoure|erstattung)\s+(?P<desc>.*?)\s{2,}(?P<amount>{AMT})$",
    subtotal: r"^(?i:zwischensumme|sous-total)\s+(?P<amount>{AMT})$",
    tax: r"^(?i:mwst|ust|tva)\b.*?\s(?P<amount>{AMT})$",
    total: r"^\**\s*(?i:summe|gesamt|total|zu zahlen)\s+(?:EUR\s+|€\s*)?(?P<amount>{AMT})$",
    tender: r"^(?P<type>(?i:bar|ec|ec-karte|karte|girocard|visa|mastercard|especes|espèces|cb))\b.*?\s(?P<amount>{AMT})$",
    change: r"^(?i:rückgeld|zurück|rendu)\s+(?P<amount>{AMT})$",
    receipt_no: r"^(?i:bon|beleg|bon-nr\.?|beleg-nr\.?|ticket)\s*(?:#|nr\.?|no\.?)?:?\s*(?P<no>[A-Za-z0-9-]{1,40})$",
    timestamp: r"^(?P<ts>\d{2}\.\d{2}\.\d{2,4}\s+\d{1,2}:\d{2}(?::\d{2})?)$",
};

const AMT_POINT: &str = r"(?:-\s?)?\(?(?:\d{1,3}(?:,\d{3})+|\d+)\.\d{2}\)?-?";
const AMT_COMMA: &str = r"(?:-\s?)?\(?(?:\d{1,3}(?:\.\d{3})+|\d+),\d{2}\)?-?";

/// A compiled template.
#[derive(Debug, Clone)]
pub struct Template {
    pub name: String,
    pub currency: String,
    pub decimal_comma: bool,
    pub quantity_position: LinePosition,
    pub receipt_no_from_barcode: bool,
    cash_tenders: Vec<String>,
    pub(crate) ignore: Vec<Regex>,
    pub(crate) item: Regex,
    pub(crate) quantity: Regex,
    pub(crate) weight: Regex,
    pub(crate) discount: Regex,
    pub(crate) void: Regex,
    pub(crate) refund: Regex,
    pub(crate) subtotal: Regex,
    pub(crate) tax: Regex,
    pub(crate) total: Regex,
    pub(crate) tender: Regex,
    pub(crate) change: Regex,
    pub(crate) receipt_no: Regex,
    pub(crate) timestamp: Regex,
    /// All patterns above in one set (ignore patterns first, then [`Kind`] order): one pass over a
    /// line finds every pattern that matches, and only the winner runs its captures.
    pub(crate) set: regex::RegexSet,
}

/// Index of each line kind in [`Template::set`], after the `ignore` patterns.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Kind {
    Void,
    Refund,
    Total,
    Subtotal,
    Tax,
    Change,
    Tender,
    ReceiptNo,
    Timestamp,
    Weight,
    Quantity,
    Discount,
    Item,
}

/// Which patterns matched one line.
#[derive(Debug)]
pub(crate) struct LineMatch {
    set: regex::SetMatches,
    ignore_count: usize,
}

impl LineMatch {
    pub(crate) fn ignored(&self) -> bool {
        self.set.iter().any(|i| i < self.ignore_count)
    }
    pub(crate) fn is(&self, k: Kind) -> bool {
        self.set.matched(self.ignore_count + k as usize)
    }
}

impl TemplateConfig {
    fn base(&self) -> Option<&'static Base> {
        match self.base.as_str() {
            "generic" => Some(&GENERIC),
            "generic_eu" => Some(&GENERIC_EU),
            _ => None,
        }
    }

    pub fn validate(&self, path: &str, problems: &mut Problems) {
        if let Err(errs) = self.compile() {
            for (field, msg) in errs {
                problems.push(join(path, field), msg);
            }
        }
        if self.currency.len() != 3 || !self.currency.chars().all(|c| c.is_ascii_uppercase()) {
            problems.push(
                join(path, "currency"),
                format!(
                    "{:?} is not an ISO 4217 code such as \"USD\" or \"EUR\"",
                    self.currency
                ),
            );
        }
    }

    /// Compiles the template; every bad pattern is reported as `(field, message)`.
    pub fn compile(&self) -> Result<Template, Vec<(&'static str, String)>> {
        let Some(base) = self.base() else {
            return Err(vec![(
                "base",
                format!(
                    "unknown template {:?}; built-in templates are \"generic\" and \"generic_eu\"",
                    self.base
                ),
            )]);
        };
        let decimal_comma = self.decimal_comma.unwrap_or(base.decimal_comma);
        let amt = if decimal_comma { AMT_COMMA } else { AMT_POINT };
        let mut errs = Vec::new();
        let mut one = |field: &'static str, own: &Option<String>, dflt: &str, groups: &[&str]| {
            let src = own.as_deref().unwrap_or(dflt).replace("{AMT}", amt);
            match Regex::new(&src) {
                Ok(re) => {
                    for g in groups {
                        if !re.capture_names().any(|n| n == Some(g)) {
                            errs.push((
                                field,
                                format!("pattern has no named group (?P<{g}>...); it is needed to read this line"),
                            ));
                        }
                    }
                    Some(re)
                }
                Err(e) => {
                    errs.push((field, format!("is not a valid regular expression: {e}")));
                    None
                }
            }
        };
        let item = one("item", &self.item, base.item, &["desc", "amount"]);
        let quantity = one("quantity", &self.quantity, base.quantity, &["qty"]);
        let weight = one("weight", &self.weight, base.weight, &["weight"]);
        let discount = one("discount", &self.discount, base.discount, &["amount"]);
        let void = one("void", &self.void, base.void, &["amount"]);
        let refund = one("refund", &self.refund, base.refund, &["amount"]);
        let subtotal = one("subtotal", &self.subtotal, base.subtotal, &["amount"]);
        let tax = one("tax", &self.tax, base.tax, &["amount"]);
        let total = one("total", &self.total, base.total, &["amount"]);
        let tender = one("tender", &self.tender, base.tender, &["type", "amount"]);
        let change = one("change", &self.change, base.change, &["amount"]);
        let receipt_no = one("receipt_no", &self.receipt_no, base.receipt_no, &["no"]);
        let timestamp = one("timestamp", &self.timestamp, base.timestamp, &["ts"]);
        let mut ignore = Vec::new();
        let ignore_src: Vec<String> = match &self.ignore {
            Some(v) => v.clone(),
            None => base.ignore.iter().map(|s| s.to_string()).collect(),
        };
        for src in ignore_src {
            if let Some(re) = one("ignore", &Some(src), "", &[]) {
                ignore.push(re);
            }
        }
        match (
            item, quantity, weight, discount, void, refund, subtotal, tax, total, tender, change,
            receipt_no, timestamp,
        ) {
            (
                Some(item),
                Some(quantity),
                Some(weight),
                Some(discount),
                Some(void),
                Some(refund),
                Some(subtotal),
                Some(tax),
                Some(total),
                Some(tender),
                Some(change),
                Some(receipt_no),
                Some(timestamp),
            ) if errs.is_empty() => {
                let mut sources: Vec<String> =
                    ignore.iter().map(|r| r.as_str().to_string()).collect();
                for r in [
                    &void,
                    &refund,
                    &total,
                    &subtotal,
                    &tax,
                    &change,
                    &tender,
                    &receipt_no,
                    &timestamp,
                    &weight,
                    &quantity,
                    &discount,
                    &item,
                ] {
                    sources.push(r.as_str().to_string());
                }
                let set = regex::RegexSet::new(&sources).map_err(|e| {
                    vec![(
                        "base",
                        format!("the patterns do not combine into one set: {e}"),
                    )]
                })?;
                Ok(Template {
                    name: self.base.clone(),
                    currency: self.currency.clone(),
                    decimal_comma,
                    quantity_position: self.quantity_position.unwrap_or(base.quantity_position),
                    receipt_no_from_barcode: self.receipt_no_from_barcode,
                    cash_tenders: self.cash_tenders.iter().map(|s| s.to_lowercase()).collect(),
                    ignore,
                    item,
                    quantity,
                    weight,
                    discount,
                    void,
                    refund,
                    subtotal,
                    tax,
                    total,
                    tender,
                    change,
                    receipt_no,
                    timestamp,
                    set,
                })
            }
            _ => Err(errs),
        }
    }
}

impl Template {
    pub(crate) fn classify(&self, line: &str) -> LineMatch {
        LineMatch {
            set: self.set.matches(line),
            ignore_count: self.ignore.len(),
        }
    }

    /// Whether a tender type (as printed) pays in cash.
    pub fn is_cash(&self, tender_type: &str) -> bool {
        let t = tender_type.trim().to_lowercase();
        self.cash_tenders.contains(&t)
    }

    /// Parses a printed amount into minor units: `1,234.56`, `-1.00`, `1.00-` and `(1.00)`.
    pub fn amount_minor(&self, s: &str) -> Option<i64> {
        let s = s.trim();
        let mut neg = false;
        let mut body = s;
        if let Some(b) = body.strip_prefix('-') {
            neg = true;
            body = b.trim_start();
        }
        if let Some(b) = body.strip_suffix('-') {
            neg = !neg;
            body = b;
        }
        if let Some(b) = body.strip_prefix('(').and_then(|b| b.strip_suffix(')')) {
            neg = !neg;
            body = b;
        }
        let (group, dec) = if self.decimal_comma {
            ('.', ',')
        } else {
            (',', '.')
        };
        let (int, frac) = body.split_once(dec)?;
        if frac.len() != 2 || !frac.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let int: String = int.chars().filter(|&c| c != group).collect();
        if int.is_empty() || !int.bytes().all(|b| b.is_ascii_digit()) || int.len() > 15 {
            return None;
        }
        let v = int.parse::<i64>().ok()? * 100 + frac.parse::<i64>().ok()?;
        Some(if neg { -v } else { v })
    }

    /// Parses a printed decimal (weights) into thousandths.
    pub fn thousandths(&self, s: &str) -> Option<i64> {
        let dec = if self.decimal_comma { ',' } else { '.' };
        let (int, frac) = s.trim().split_once(dec).unwrap_or((s.trim(), ""));
        if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) || int.len() > 9 {
            return None;
        }
        let mut f = frac.to_string();
        while f.len() < 3 {
            f.push('0');
        }
        Some(int.parse::<i64>().ok()? * 1000 + f.parse::<i64>().ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn amounts_parse_in_every_printed_form() {
        let t = TemplateConfig::default().compile().unwrap();
        assert_eq!(t.amount_minor("1,234.56"), Some(123_456));
        assert_eq!(t.amount_minor("0.80-"), Some(-80));
        assert_eq!(t.amount_minor("-0.80"), Some(-80));
        assert_eq!(t.amount_minor("(2.00)"), Some(-200));
        assert_eq!(t.amount_minor("2.0"), None);
        assert_eq!(t.amount_minor("abc"), None);
        let eu = TemplateConfig {
            base: "generic_eu".into(),
            currency: "EUR".into(),
            ..Default::default()
        }
        .compile()
        .unwrap();
        assert_eq!(eu.amount_minor("1.234,56"), Some(123_456));
        assert_eq!(eu.thousandths("0,455"), Some(455));
    }

    #[test]
    fn bad_patterns_are_reported_per_field() {
        let cfg = TemplateConfig {
            total: Some("TOTAL (".into()),
            item: Some(r"^(?P<desc>.*)$".into()),
            base: "generic".into(),
            ..Default::default()
        };
        let errs = cfg.compile().unwrap_err();
        let fields: Vec<_> = errs.iter().map(|e| e.0).collect();
        assert!(fields.contains(&"total"), "{errs:?}");
        assert!(fields.contains(&"item"), "missing amount group: {errs:?}");
        let mut p = Problems::new();
        TemplateConfig {
            base: "acme".into(),
            ..Default::default()
        }
        .validate("drivers[0].template", &mut p);
        assert!(
            p.to_string()
                .contains("drivers[0].template.base: unknown template")
        );
    }
}
