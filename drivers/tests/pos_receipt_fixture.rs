//! The Complete Journey fixture parsed in memory: every basket must come back exactly.
#![allow(clippy::unwrap_used)] // test helpers outside #[test] fns
mod common;

use edge_drivers::escpos::{EndReason, Segmenter, SegmenterConfig};
use edge_drivers::receipt::{TemplateConfig, TxContext, parse, transaction_payload};

#[test]
fn complete_journey_baskets_parse_exactly_in_memory() {
    let (bytes, baskets) = common::cj_fixture();
    let t = TemplateConfig::default()
        .compile()
        .expect("generic template");
    // Feed in odd-sized chunks, as a serial line delivers them.
    let mut seg = Segmenter::new(SegmenterConfig::default());
    let mut receipts = Vec::new();
    for chunk in bytes.chunks(61) {
        receipts.extend(seg.push(chunk));
    }
    receipts.extend(seg.idle(EndReason::StreamEnd));
    assert_eq!(receipts.len(), baskets.len());
    for (r, b) in receipts.iter().zip(&baskets) {
        assert_eq!(r.end, EndReason::Cut);
        assert_eq!(r.raw_len, b["bytes"].as_u64().unwrap(), "receipt bytes");
        let p = parse(r, &t).unwrap_or_else(|e| panic!("{}: {e}\n{:#?}", b["receipt_no"], r.lines));
        let tx = transaction_payload(
            &p,
            &TxContext {
                store: "s",
                lane: "l",
                ts_ms: 0,
                event_id: "e",
                receipt_event_id: "r",
                template: "generic",
                currency: "USD",
                drawer_kicks: r.drawer_kicks,
            },
        );
        common::assert_transaction_matches(&tx, b);
        assert_eq!(r.drawer_kicks > 0, b["drawer_kick"].as_bool().unwrap());
        assert!(
            r.lines.iter().any(|l| l.contains("DANKE SCHÖN  €")),
            "cp858 text decoded"
        );
        assert_eq!(r.codes.len(), 2, "receipt barcode and QR");
        assert_eq!(r.codes[0].text(), b["receipt_no"].as_str().unwrap());
    }
}
