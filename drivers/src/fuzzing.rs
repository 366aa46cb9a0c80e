//! Properties the fuzz targets (`drivers/fuzz/`) check on arbitrary input, shared with the unit test
//! that replays the committed seed corpus on every CI run. Each function panics only when a
//! property is violated; the parsers themselves never panic.

use crate::escpos::{CodePage, EndReason, Segmenter, SegmenterConfig, Token, Tokenizer};
use crate::receipt::TemplateConfig;
use crate::scale::{Framed, ScaleFramer, ScaleProtocol, parse_sma, parse_toledo};
use crate::scanner::{Frame, Framer, MeasureValue, ScanParser, ScannerConfig, WeighedPrefix};
use crate::serial::SerialConfig;

fn merged(tokens: Vec<Token>) -> Vec<Token> {
    let mut out: Vec<Token> = Vec::new();
    for t in tokens {
        if let (Some(Token::Text(a)), Token::Text(b)) = (out.last_mut(), &t) {
            a.push_str(b);
            continue;
        }
        out.push(t);
    }
    out
}

fn tokens(chunks: &[&[u8]]) -> Vec<Token> {
    let mut t = Tokenizer::new(CodePage::DEFAULT);
    let mut out = Vec::new();
    for c in chunks {
        t.push(c, |tok, _| out.push(tok));
    }
    t.flush(|tok, _| out.push(tok));
    merged(out)
}

/// Tokenizer, segmenter and template parser on arbitrary bytes: the same tokens whatever the
/// split, bounded receipts, no panic.
pub fn escpos(data: &[u8]) {
    let split = data.first().map_or(0, |&b| usize::from(b)) % (data.len() + 1);
    let whole = tokens(&[data]);
    let parts = tokens(&[&data[..split], &data[split..]]);
    assert_eq!(
        whole, parts,
        "tokens depend on how the stream was split at {split}"
    );
    let cfg = SegmenterConfig {
        max_receipt_bytes: 4096,
        raw_keep_bytes: 1024,
        max_lines: 50,
        max_line_chars: 80,
        ..SegmenterConfig::default()
    };
    let mut seg = Segmenter::new(cfg);
    let mut receipts = seg.push(&data[..split]);
    receipts.extend(seg.push(&data[split..]));
    receipts.extend(seg.idle(EndReason::StreamEnd));
    static TEMPLATE: std::sync::OnceLock<Option<crate::receipt::Template>> =
        std::sync::OnceLock::new();
    let template = TEMPLATE.get_or_init(|| TemplateConfig::default().compile().ok());
    for r in &receipts {
        assert!(r.raw.len() <= 1024);
        assert!(r.lines.len() <= 50);
        assert!(r.lines.iter().all(|l| l.chars().count() <= 80));
        if let Some(t) = template {
            let _ = crate::receipt::parse(r, t);
        }
    }
}

/// Scanner framing and parsing on arbitrary bytes: frames stay bounded, no panic.
pub fn scanner(data: &[u8]) {
    let mut framer = Framer::new(b"\r", 64);
    let mut frames = Vec::new();
    framer.push(data, &mut frames);
    frames.extend(framer.take_partial());
    let cfg = ScannerConfig {
        name: "fuzz".into(),
        lane: "1".into(),
        serial: SerialConfig::new("/dev/null"),
        prefix: String::new(),
        suffix: "\r".into(),
        aim_ids: false,
        validate_gtin: true,
        max_frame_bytes: 64,
        frame_timeout_ms: 1000,
        weighed_prefixes: vec![
            WeighedPrefix {
                prefix: "02".into(),
                item_digits: 5,
                price_check_digit: true,
                value: MeasureValue::Price,
            },
            WeighedPrefix {
                prefix: "2".into(),
                item_digits: 6,
                price_check_digit: false,
                value: MeasureValue::WeightG,
            },
        ],
        gs1_without_aim: true,
        deadletter_repeat_interval_ms: 60_000,
    };
    let p = ScanParser::new(&cfg);
    for f in frames {
        match f {
            Frame::Data(d) => {
                assert!(d.len() <= 64 + 1);
                let _ = p.parse(&d);
            }
            Frame::Overflow { kept, .. } => assert!(kept.len() <= 65),
        }
    }
    // The whole input as one frame, too (long GS1 strings, odd AIM ids).
    let _ = p.parse(data);
    let _ = crate::scanner::parse_gs1(data);
}

/// Scale framing and both protocol parsers on arbitrary bytes: frames and the raw bytes kept for
/// dead letters stay bounded; a Toledo status frame `STX ? b CR` is one frame whatever `b` is
/// (STX, CR, high bits), even after garbage.
pub fn scale(data: &[u8]) {
    for proto in [ScaleProtocol::Toledo, ScaleProtocol::Sma] {
        let mut f = ScaleFramer::new(proto);
        let mut frames = Vec::new();
        f.push(data, &mut frames);
        for fr in frames {
            match fr {
                Framed::Frame(body) => {
                    assert!(body.len() <= crate::scale::MAX_SCALE_FRAME);
                    let _ = parse_toledo(&body, "lb", 2);
                    let _ = parse_sma(&body);
                }
                Framed::Broken { raw, .. } => {
                    assert!(raw.len() <= crate::scale::MAX_SCALE_FRAME + 2);
                }
            }
        }
        if proto == ScaleProtocol::Toledo {
            let status = data.first().copied().unwrap_or(0x02);
            let mut frames = Vec::new();
            // Two CRs end whatever frame the data left open (a pending status byte takes one).
            f.push(&[b'\r', b'\r', 0x02, b'?', status, b'\r'], &mut frames);
            assert_eq!(
                frames.last(),
                Some(&Framed::Frame(vec![b'?', status])),
                "status byte {status:#04x} after {data:?}"
            );
            let r = parse_toledo(&[b'?', status], "lb", 2);
            assert!(r.is_ok_and(|r| r.weight_milli.is_none()));
        }
    }
    let _ = parse_toledo(data, "kg", 3);
    let _ = parse_sma(data);
}

/// AD structures and beacon frames on arbitrary advertising data: structures re-encode to the
/// bytes they came from, and every decoded beacon encodes to an advertisement that decodes to the
/// same beacon.
#[cfg(feature = "ble")]
pub fn ble_advertising(data: &[u8]) {
    use crate::ble::ad::{Advertisement, push_structure, structures};
    let mut it = structures(data);
    let mut again = Vec::with_capacity(data.len());
    let mut failed = false;
    for s in it.by_ref() {
        match s {
            Ok(s) => {
                assert_eq!(s.offset, again.len(), "structures are contiguous");
                push_structure(&mut again, s.ad_type, s.data).expect("a parsed structure fits");
            }
            Err(_) => failed = true,
        }
    }
    assert_eq!(&data[..again.len()], &again[..], "structures re-encode");
    if !failed {
        // Whatever follows the last structure is the early-termination padding.
        assert!(again.len() == data.len() || data[again.len()] == 0);
        assert_eq!(it.consumed(), data.len());
    }
    // The beacons driver's ingest step: identification never panics, and with nothing on the
    // allow-list nothing is kept.
    let heard = crate::ble::source::Heard::Advertisement(data.to_vec());
    let all = crate::ble::source::AllowList {
        all: true,
        ..Default::default()
    };
    let kept = crate::ble::source::identify(&heard, &all.compile());
    let none = crate::ble::source::AllowList::default().compile();
    assert!(
        crate::ble::source::identify(&heard, &none).is_err(),
        "an empty allow-list keeps nothing"
    );
    let Ok(ad) = Advertisement::parse(data) else {
        assert!(
            kept.is_err(),
            "an advertisement that does not parse identifies nothing"
        );
        return;
    };
    let _ = (ad.flags(), ad.local_name(), ad.tx_power());
    for b in ad.beacons().flatten() {
        let encoded = b
            .to_advertising_data()
            .unwrap_or_else(|e| panic!("{b:?} does not re-encode: {e}"));
        assert!(encoded.len() <= 31, "{b:?} encodes to {encoded:02x?}");
        let back = Advertisement::parse(&encoded).expect("an encoded beacon parses");
        let beacons: Vec<_> = back.beacons().collect();
        assert_eq!(beacons, vec![Ok(b)], "beacon round trip");
    }
}

/// HCI event packets: an event that parses as advertising reports re-encodes to the same bytes,
/// and each report's data goes through [`ble_advertising`].
#[cfg(feature = "ble")]
pub fn hci_event(data: &[u8]) {
    use crate::ble::hci::{
        MAX_LEGACY_DATA, ReportKind, encode_le_advertising_report, parse_advertising_reports,
    };
    let Ok(Some(reports)) = parse_advertising_reports(data) else {
        return;
    };
    let extended = data[2] == crate::ble::hci::SUBEVENT_EXTENDED_ADVERTISING_REPORT;
    for r in &reports {
        assert_eq!(matches!(r.kind, ReportKind::Extended(_)), extended);
        assert!(extended || r.data.len() <= MAX_LEGACY_DATA);
        ble_advertising(&r.data);
    }
    let again = encode_le_advertising_report(&reports, extended).expect("parsed reports fit");
    assert_eq!(again, data, "reports re-encode byte for byte");
}

/// btsnoop captures: the records read re-encode to the bytes they came from, and the
/// advertising reports of any capture can be iterated without a panic.
#[cfg(feature = "ble")]
pub fn btsnoop_capture(data: &[u8]) {
    use crate::ble::btsnoop::{MAX_RECORD_BYTES, Reader, Writer};
    let Ok(reader) = Reader::new(data) else {
        return;
    };
    let datalink = reader.datalink();
    let mut w = Writer::new(Vec::new(), datalink).expect("a Vec takes the header");
    for rec in reader.flatten() {
        assert!(rec.data.len() <= MAX_RECORD_BYTES as usize);
        if let Some(ev) = rec.hci_event(datalink) {
            hci_event(ev);
        }
        w.write_record(&rec).expect("a read record can be written");
    }
    let again = w.into_inner();
    assert_eq!(&data[..again.len()], &again[..], "records re-encode");
    let n = Reader::new(data)
        .map(|r| r.advertising_reports().count())
        .unwrap_or(0);
    assert!(n <= data.len(), "at most one report per byte");
}

/// The printer status reader on arbitrary input: `data[0] % 8` requests `DLE EOT n` with `n` from
/// the next bytes, the rest is what the printer sent. The same replies whatever the split; every
/// reply has its identifying bits (a `DLE EOT` reply `0xx1 xx10`, an ASB message `0xx1 xx00` then
/// three `0xx0 xxxx`); no more `DLE EOT` replies than requests; applying an observation twice is
/// applying it once.
pub fn printer_status(data: &[u8]) {
    use crate::escpos::{Faults, StatusReader, StatusReply};
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let k = usize::from(k % 8).min(rest.len());
    let (requests, bytes) = rest.split_at(k);
    let read = |split: usize| {
        let mut r = StatusReader::new();
        for &n in requests {
            r.requested(n);
        }
        let mut out = Vec::new();
        r.push(&bytes[..split], &mut out);
        r.push(&bytes[split..], &mut out);
        out
    };
    let whole = read(bytes.len());
    let split = bytes.first().map_or(0, |&b| usize::from(b)) % (bytes.len() + 1);
    assert_eq!(whole, read(split), "replies depend on the split at {split}");
    let mut realtime = 0;
    let mut faults = Faults::NONE;
    for reply in &whole {
        match *reply {
            StatusReply::RealTime { byte, .. } => {
                realtime += 1;
                assert_eq!(byte & 0x93, 0x12, "{byte:#04x} is no DLE EOT reply");
            }
            StatusReply::Asb(m) => {
                assert_eq!(m[0] & 0x93, 0x10, "{m:02x?}");
                assert!(m[1..].iter().all(|b| b & 0x90 == 0), "{m:02x?}");
            }
        }
        if let Some(obs) = reply.observation() {
            faults = faults.apply(obs);
            assert_eq!(faults, faults.apply(obs));
        }
    }
    assert!(realtime <= requests.len());
}
