//! From printed receipt lines to a `pos.transaction/1`, with the checks a loss-prevention team
//! relies on: lines that do not add up to the subtotal, a subtotal plus tax that is not the total,
//! tenders that do not cover the total are flagged, never silently accepted.

pub mod template;

use crate::escpos::Receipt;
use serde::Serialize;
use template::Kind;
pub use template::{LinePosition, Template, TemplateConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LineKind {
    Item,
    Discount,
    Void,
    Refund,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Line {
    pub line: usize,
    pub kind: LineKind,
    pub description: String,
    pub quantity: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unit_price_minor: Option<i64>,
    pub amount_minor: i64,
    /// Weighed items: weight in thousandths of `weight_unit`; `unit_price_minor` is per unit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_milli: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_unit: Option<String>,
    /// Tax or category flag printed after the amount (e.g. `T`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub flag: Option<String>,
    /// Discount lines: the item line they reduce.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub applies_to: Option<usize>,
    /// `quantity_times_price_is_not_amount` when the printed figures disagree.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<&'static str>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Tender {
    #[serde(rename = "type")]
    pub kind: String,
    pub label: String,
    pub amount_minor: i64,
}

/// What a template read from a receipt.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Parsed {
    pub receipt_no: Option<String>,
    pub printed_at: Option<String>,
    pub lines: Vec<Line>,
    pub subtotal_minor: Option<i64>,
    pub tax_minor: i64,
    pub total_minor: i64,
    pub tenders: Vec<Tender>,
    pub change_minor: i64,
    pub cash_tendered: bool,
    /// Totals that do not add up (see the module doc).
    pub flags: Vec<&'static str>,
    /// Printed lines no pattern matched before the total (they may be items the template misses).
    pub unmatched_lines: usize,
}

impl Parsed {
    pub fn totals_consistent(&self) -> bool {
        self.flags.is_empty()
    }
}

/// Why a receipt did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the receipt has no printed text (only images, codes or commands)")]
    NoText,
    #[error("no line matched the template's total pattern ({lines} lines, template {template})")]
    NoTotal { lines: usize, template: String },
    #[error("line {line} looks like an amount line but {text:?} is not an amount")]
    BadAmount { line: usize, text: String },
}

impl ParseError {
    /// Short reason label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            ParseError::NoText => "no_text",
            ParseError::NoTotal { .. } => "no_total",
            ParseError::BadAmount { .. } => "bad_amount",
        }
    }
}

struct Pending {
    qty: i64,
    unit: Option<i64>,
    weight: Option<(i64, Option<String>)>,
}

pub fn parse(receipt: &Receipt, t: &Template) -> Result<Parsed, ParseError> {
    if receipt.lines.is_empty() {
        return Err(ParseError::NoText);
    }
    let mut p = Parsed {
        receipt_no: None,
        printed_at: None,
        lines: Vec::new(),
        subtotal_minor: None,
        tax_minor: 0,
        total_minor: 0,
        tenders: Vec::new(),
        change_minor: 0,
        cash_tendered: false,
        flags: Vec::new(),
        unmatched_lines: 0,
    };
    let mut total: Option<i64> = None;
    let mut pending: Option<Pending> = None;
    let mut last_item: Option<usize> = None;
    for (idx, text) in receipt.lines.iter().enumerate() {
        let lineno = idx + 1;
        let amount = |caps: &regex::Captures<'_>| -> Result<i64, ParseError> {
            let s = caps.name("amount").map_or("", |m| m.as_str());
            t.amount_minor(s).ok_or_else(|| ParseError::BadAmount {
                line: lineno,
                text: s.to_string(),
            })
        };
        let desc = |caps: &regex::Captures<'_>| {
            caps.name("desc")
                .map_or("", |m| m.as_str())
                .trim()
                .to_string()
        };
        let m = t.classify(text);
        if m.ignored() {
            continue;
        }
        if total.is_none() {
            if let Some(c) = m.is(Kind::Void).then(|| t.void.captures(text)).flatten() {
                let a = -amount(&c)?.abs();
                push_line(&mut p, LineKind::Void, desc(&c), 1, None, a, None);
                continue;
            }
            if let Some(c) = m
                .is(Kind::Refund)
                .then(|| t.refund.captures(text))
                .flatten()
            {
                let a = -amount(&c)?.abs();
                push_line(&mut p, LineKind::Refund, desc(&c), 1, None, a, None);
                continue;
            }
        }
        if let Some(c) = m.is(Kind::Total).then(|| t.total.captures(text)).flatten() {
            if total.is_none() {
                total = Some(amount(&c)?);
            }
            continue;
        }
        if let Some(c) = m
            .is(Kind::Subtotal)
            .then(|| t.subtotal.captures(text))
            .flatten()
        {
            p.subtotal_minor = Some(amount(&c)?);
            continue;
        }
        if let Some(c) = m.is(Kind::Tax).then(|| t.tax.captures(text)).flatten() {
            p.tax_minor += amount(&c)?;
            continue;
        }
        if let Some(c) = m
            .is(Kind::Change)
            .then(|| t.change.captures(text))
            .flatten()
        {
            p.change_minor += amount(&c)?;
            continue;
        }
        if let Some(c) = m
            .is(Kind::Tender)
            .then(|| t.tender.captures(text))
            .flatten()
        {
            let label = c.name("type").map_or("", |m| m.as_str()).to_string();
            let cash = t.is_cash(&label);
            p.cash_tendered |= cash;
            p.tenders.push(Tender {
                kind: if cash { "cash".into() } else { "card".into() },
                label,
                amount_minor: amount(&c)?,
            });
            continue;
        }
        if let Some(c) = m
            .is(Kind::ReceiptNo)
            .then(|| t.receipt_no.captures(text))
            .flatten()
        {
            if p.receipt_no.is_none() {
                p.receipt_no = c.name("no").map(|m| m.as_str().to_string());
            }
            continue;
        }
        if let Some(c) = m
            .is(Kind::Timestamp)
            .then(|| t.timestamp.captures(text))
            .flatten()
        {
            if p.printed_at.is_none() {
                p.printed_at = c.name("ts").map(|m| m.as_str().to_string());
            }
            continue;
        }
        if total.is_some() {
            continue;
        }
        if let Some(c) = m
            .is(Kind::Weight)
            .then(|| t.weight.captures(text))
            .flatten()
        {
            let w = c
                .name("weight")
                .and_then(|m| t.thousandths(m.as_str()))
                .ok_or_else(|| ParseError::BadAmount {
                    line: lineno,
                    text: text.clone(),
                })?;
            let unit = c.name("unit").and_then(|m| t.amount_minor(m.as_str()));
            let wunit = c.name("wunit").map(|m| m.as_str().to_lowercase());
            match (t.quantity_position, last_item) {
                (LinePosition::After, Some(i)) => {
                    let l = &mut p.lines[i];
                    l.weight_milli = Some(w);
                    l.weight_unit = wunit;
                    l.unit_price_minor = unit;
                    check_weight(l);
                }
                _ => {
                    pending = Some(Pending {
                        qty: 1,
                        unit,
                        weight: Some((w, wunit)),
                    })
                }
            }
            continue;
        }
        if let Some(c) = m
            .is(Kind::Quantity)
            .then(|| t.quantity.captures(text))
            .flatten()
        {
            let qty = c
                .name("qty")
                .and_then(|m| m.as_str().parse::<i64>().ok())
                .unwrap_or(1);
            let unit = c.name("unit").and_then(|m| t.amount_minor(m.as_str()));
            match (t.quantity_position, last_item) {
                (LinePosition::After, Some(i)) => {
                    let l = &mut p.lines[i];
                    l.quantity = qty;
                    l.unit_price_minor = unit;
                    check_qty(l);
                }
                _ => {
                    pending = Some(Pending {
                        qty,
                        unit,
                        weight: None,
                    })
                }
            }
            continue;
        }
        if let (Some(c), Some(item)) = (
            m.is(Kind::Discount)
                .then(|| t.discount.captures(text))
                .flatten(),
            last_item,
        ) {
            let a = amount(&c)?;
            let n = push_line(&mut p, LineKind::Discount, desc(&c), 1, None, a, None);
            p.lines[n].applies_to = Some(p.lines[item].line);
            continue;
        }
        if let Some(c) = m.is(Kind::Item).then(|| t.item.captures(text)).flatten() {
            let a = amount(&c)?;
            let flag = c.name("flag").map(|m| m.as_str().to_string());
            let n = match pending.take() {
                Some(pq) => {
                    let n = push_line(&mut p, LineKind::Item, desc(&c), pq.qty, pq.unit, a, flag);
                    let l = &mut p.lines[n];
                    if let Some((w, u)) = pq.weight {
                        l.weight_milli = Some(w);
                        l.weight_unit = u;
                        check_weight(l);
                    } else {
                        check_qty(l);
                    }
                    n
                }
                None => push_line(&mut p, LineKind::Item, desc(&c), 1, Some(a), a, flag),
            };
            last_item = Some(n);
            continue;
        }
        p.unmatched_lines += 1;
    }
    let Some(total) = total else {
        return Err(ParseError::NoTotal {
            lines: receipt.lines.len(),
            template: t.name.clone(),
        });
    };
    p.total_minor = total;
    if p.receipt_no.is_none() && t.receipt_no_from_barcode {
        p.receipt_no = receipt
            .codes
            .iter()
            .find(|c| c.symbology.is_some())
            .map(|c| c.text().to_string())
            .filter(|s| !s.is_empty());
    }
    let lines_sum: i64 = p.lines.iter().map(|l| l.amount_minor).sum();
    let base = match p.subtotal_minor {
        Some(s) => {
            if s != lines_sum {
                p.flags.push("lines_do_not_add_up_to_subtotal");
            }
            s
        }
        None => lines_sum,
    };
    if base + p.tax_minor != total {
        p.flags.push(if p.subtotal_minor.is_some() {
            "subtotal_plus_tax_is_not_total"
        } else {
            "lines_plus_tax_are_not_total"
        });
    }
    if !p.tenders.is_empty() {
        let paid: i64 = p.tenders.iter().map(|t| t.amount_minor).sum();
        if paid - p.change_minor != total {
            p.flags.push("tenders_minus_change_are_not_total");
        }
    }
    if p.lines.iter().any(|l| !l.flags.is_empty()) {
        p.flags.push("line_quantity_times_price_is_not_amount");
    }
    Ok(p)
}

/// Where a transaction came from, for its payload.
#[derive(Debug, Clone)]
pub struct TxContext<'a> {
    pub store: &'a str,
    pub lane: &'a str,
    pub ts_ms: i64,
    pub event_id: &'a str,
    pub receipt_event_id: &'a str,
    pub template: &'a str,
    pub currency: &'a str,
    pub drawer_kicks: u32,
}

/// The `pos.transaction/1` payload (documented in `docs/schemas/pos.transaction.md`).
pub fn transaction_payload(p: &Parsed, c: &TxContext<'_>) -> serde_json::Value {
    let mut v = serde_json::to_value(p).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        m.remove("cash_tendered");
        for (k, val) in [
            ("schema", serde_json::json!("pos.transaction/1")),
            ("event_id", c.event_id.into()),
            ("store", c.store.into()),
            ("lane", c.lane.into()),
            ("ts", c.ts_ms.into()),
            ("currency", c.currency.into()),
            ("source", "printer_tap".into()),
            ("template", c.template.into()),
            ("receipt_event_id", c.receipt_event_id.into()),
            ("drawer_kicks", c.drawer_kicks.into()),
            ("totals_consistent", p.totals_consistent().into()),
        ] {
            m.insert(k.to_string(), val);
        }
        if p.subtotal_minor.is_none() {
            let sum: i64 = p.lines.iter().map(|l| l.amount_minor).sum();
            m.insert("subtotal_minor".into(), sum.into());
            m.insert("subtotal_printed".into(), false.into());
        }
    }
    v
}

fn push_line(
    p: &mut Parsed,
    kind: LineKind,
    description: String,
    quantity: i64,
    unit: Option<i64>,
    amount: i64,
    flag: Option<String>,
) -> usize {
    let n = p.lines.len();
    p.lines.push(Line {
        line: n + 1,
        kind,
        description,
        quantity,
        unit_price_minor: unit,
        amount_minor: amount,
        weight_milli: None,
        weight_unit: None,
        flag,
        applies_to: None,
        flags: Vec::new(),
    });
    n
}

fn check_qty(l: &mut Line) {
    if let Some(u) = l.unit_price_minor
        && u.checked_mul(l.quantity) != Some(l.amount_minor)
    {
        l.flags.push("quantity_times_price_is_not_amount");
    }
}

fn check_weight(l: &mut Line) {
    // Scales price to the nearest minor unit; allow half a unit either way.
    if let (Some(u), Some(w)) = (l.unit_price_minor, l.weight_milli) {
        let expect = (i128::from(u) * i128::from(w) + 500) / 1000;
        if (expect - i128::from(l.amount_minor)).abs() > 1 {
            l.flags.push("weight_times_price_is_not_amount");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::escpos::{EndReason, Segmenter, SegmenterConfig};

    fn receipt(text: &str) -> Receipt {
        let mut s = Segmenter::new(SegmenterConfig {
            code_page: crate::escpos::CodePage::from_name("utf-8").unwrap(),
            ..Default::default()
        });
        let mut r = s.push(text.as_bytes());
        r.extend(s.idle(EndReason::IdleGap));
        r.remove(0)
    }

    fn generic() -> Template {
        TemplateConfig::default().compile().unwrap()
    }

    #[test]
    fn a_us_receipt_with_weighed_items_discounts_and_voids() {
        let r = receipt(
            "GROCERY CO\n03/14/2024 10:02:11\n\
             MILK 1GAL                   3.89\n\
             \x20 2 @ 1.25\n\
             YOGURT                      2.50 T\n\
             \x20 COUPON                   0.50-\n\
             \x20 1.250 lb @ 0.59/lb\n\
             BANANAS                     0.74\n\
             VOID CANDY BAR              1.29-\n\
             CANDY BAR                   1.29\n\
             SUBTOTAL                    7.92\n\
             TAX                         0.15\n\
             TOTAL                       8.07\n\
             CASH                       10.00\n\
             CHANGE                      1.93\n\
             TRANS# 000123\n",
        );
        let p = parse(&r, &generic()).unwrap();
        assert_eq!(p.receipt_no.as_deref(), Some("000123"));
        assert_eq!(p.printed_at.as_deref(), Some("03/14/2024 10:02:11"));
        let kinds: Vec<_> = p.lines.iter().map(|l| (l.kind, l.amount_minor)).collect();
        assert_eq!(
            kinds,
            vec![
                (LineKind::Item, 389),
                (LineKind::Item, 250),
                (LineKind::Discount, -50),
                (LineKind::Item, 74),
                (LineKind::Void, -129),
                (LineKind::Item, 129)
            ]
        );
        assert_eq!(p.lines[1].quantity, 2);
        assert_eq!(p.lines[1].unit_price_minor, Some(125));
        assert_eq!(p.lines[1].flag.as_deref(), Some("T"));
        assert_eq!(p.lines[2].applies_to, Some(2));
        assert_eq!(p.lines[3].weight_milli, Some(1250));
        assert_eq!(p.lines[3].weight_unit.as_deref(), Some("lb"));
        assert_eq!(p.lines[3].unit_price_minor, Some(59));
        assert_eq!(p.subtotal_minor, Some(792));
        assert!(p.cash_tendered);
        // 389+250-50+74-129+129 = 663, not the printed 7.92: flagged, not accepted.
        assert_eq!(p.flags, vec!["lines_do_not_add_up_to_subtotal"]);
    }

    #[test]
    fn consistent_totals_are_not_flagged_and_missing_total_is_an_error() {
        let r = receipt(
            "A                  1.00\nB                  2.00\nTOTAL              3.00\nVISA 1234          3.00\n",
        );
        let p = parse(&r, &generic()).unwrap();
        assert!(p.totals_consistent(), "{:?}", p.flags);
        assert_eq!(p.tenders[0].kind, "card");
        let r = receipt("HELLO\nWORLD 1.00\n");
        let e = parse(&r, &generic()).unwrap_err();
        assert_eq!(e.label(), "no_total");
        assert!(e.to_string().contains("total pattern"));
    }

    #[test]
    fn a_german_receipt_through_the_eu_template() {
        let t = TemplateConfig {
            base: "generic_eu".into(),
            currency: "EUR".into(),
            ..Default::default()
        }
        .compile()
        .unwrap();
        let r = receipt(
            "Bon-Nr. 4711\n\
             VOLLMILCH 3,5%             1,19 A\n\
             \x20 0,455 kg x 2,99 EUR/kg\n\
             ÄPFEL BRAEBURN             1,36 A\n\
             STORNO PFAND               0,25-\n\
             SUMME EUR                  2,30\n\
             BAR                        5,00\n\
             RÜCKGELD                   2,70\n",
        );
        let p = parse(&r, &t).unwrap();
        assert_eq!(p.receipt_no.as_deref(), Some("4711"));
        assert_eq!(p.lines[1].description, "ÄPFEL BRAEBURN");
        assert_eq!(p.lines[1].weight_milli, Some(455));
        assert_eq!(p.lines[2].kind, LineKind::Void);
        assert_eq!(p.total_minor, 230);
        assert!(p.cash_tendered);
        assert!(p.totals_consistent(), "{:?}", p.flags);
    }
}
