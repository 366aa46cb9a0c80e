//! Properties the fuzz targets of `sync/fuzz/` check on arbitrary input, shared with
//! `sync/tests/fuzz_corpus.rs`, which replays the committed seed corpora on every test run. Each
//! function panics only when a property is violated; the code under test never panics.
//!
//! Both targets exercise pure functions of the MQTT bridge (no broker, no log, no I/O), so the
//! fuzz crate builds edge-sync without its `kafka` feature (no librdkafka).
//!
//! Input formats (line-based, so that seeds are readable and mutations stay meaningful):
//! - [`mqtt_ingress`]: the first line is the topic; the lines up to the first empty line are MQTT 5
//!   user properties `name: value`; the rest is the payload. The rules are [`INGRESS_RULES`].
//! - [`mqtt_topic`]: five lines: an ingress topic pattern, a topic name it may match, an egress
//!   template, then the `{key}` and `{source}` values of one record.

use crate::mqtt::config::IngressRule;
use crate::mqtt::ingress::{CompiledRule, Limits, Rejection, to_event};
use crate::mqtt::topic::{
    EGRESS_PLACEHOLDERS, MAX_MQTT_STRING_BYTES, TopicPattern, check_mqtt_chars,
    egress_template_problems, render_checked,
};
use bytes::Bytes;
use serde_json::Value;
use std::collections::BTreeSet;

/// One fuzzed ingress rule: (topic, stream, require_json, topic_header, key, event id field,
/// event time field).
pub type RuleSpec = (
    &'static str,
    &'static str,
    bool,
    bool,
    Option<&'static str>,
    &'static str,
    &'static str,
);

/// The fuzzed ingress rules. Together they cover a named and an anonymous `+`, `#`, an explicit
/// key, renamed JSON fields and a non-JSON stream.
pub const INGRESS_RULES: &[RuleSpec] = &[
    (
        "store/+/pos/{device}/transactions",
        "pos.transactions",
        true,
        true,
        None,
        "event_id",
        "ts",
    ),
    (
        "scale/{lane}/{device}/weight",
        "scale.weights",
        true,
        false,
        Some("lane"),
        "id",
        "time",
    ),
    (
        "kiosk/{kiosk}/#",
        "kiosk.events",
        true,
        false,
        None,
        "event_id",
        "ts",
    ),
    (
        "raw/{sensor}",
        "raw.bytes",
        false,
        false,
        None,
        "event_id",
        "ts",
    ),
];

/// The fuzzed `mqtt.max_payload` and `mqtt.deadletter_keep`.
pub const MAX_PAYLOAD: usize = 4096;
pub const DEADLETTER_KEEP: usize = 64;
/// The ingest clock.
pub const NOW_MS: i64 = 1_790_000_000_000;

fn rules() -> Vec<CompiledRule> {
    INGRESS_RULES
        .iter()
        .map(|&(topic, stream, json, header, key, id, ts)| {
            CompiledRule::compile(&IngressRule {
                topic: topic.into(),
                stream: stream.into(),
                require_json: json,
                topic_header: header,
                key: key.map(String::from),
                schema: json.then(|| format!("{stream}/1")),
                event_id_field: id.into(),
                event_ts_field: ts.into(),
            })
            .expect("the fuzzed rules are valid")
        })
        .collect()
}

/// One MQTT publish, decoded from a fuzz input.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Publish {
    pub topic: String,
    pub user_properties: Vec<(String, String)>,
    pub payload: Vec<u8>,
}

/// Splits off the next line (without its `\n`); `None` at the end of the input.
fn next_line<'a>(rest: &mut &'a [u8]) -> Option<&'a [u8]> {
    if rest.is_empty() {
        return None;
    }
    let (line, tail) = match rest.iter().position(|&b| b == b'\n') {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (*rest, &[][..]),
    };
    *rest = tail;
    Some(line)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Publish {
    pub fn decode(data: &[u8]) -> Publish {
        let mut rest = data;
        let mut p = Publish {
            topic: next_line(&mut rest).map(lossy).unwrap_or_default(),
            ..Publish::default()
        };
        while let Some(line) = next_line(&mut rest) {
            if line.is_empty() {
                break;
            }
            let (k, v) = match line.windows(2).position(|w| w == b": ") {
                Some(i) => (&line[..i], &line[i + 2..]),
                None => (line, &[][..]),
            };
            p.user_properties.push((lossy(k), lossy(v)));
        }
        p.payload = rest.to_vec();
        p
    }

    /// The input bytes of this publish (for writing seeds).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("{}\n", self.topic).into_bytes();
        for (k, v) in &self.user_properties {
            out.extend_from_slice(format!("{k}: {v}\n").as_bytes());
        }
        out.push(b'\n');
        out.extend_from_slice(&self.payload);
        out
    }

    /// The ingress verdict: the event, or the rejection with its dead letter.
    pub(crate) fn ingest(&self) -> Result<edge_core::Event, (Rejection, Box<edge_core::Event>)> {
        let limits = Limits {
            max_payload: MAX_PAYLOAD,
            deadletter_keep: DEADLETTER_KEEP,
        };
        let payload = Bytes::from(self.payload.clone());
        to_event(
            &rules(),
            &limits,
            &self.topic,
            &payload,
            &self.user_properties,
            NOW_MS,
        )
    }
}

/// The rejection label of an input's verdict (`ok` when accepted), for seed names.
pub fn verdict_label(data: &[u8]) -> &'static str {
    match Publish::decode(data).ingest() {
        Ok(_) => "ok",
        Err((r, _)) => r.label(),
    }
}

/// MQTT ingress on arbitrary publishes: no panic, deterministic; a publish becomes the first
/// matching rule's event with the payload unchanged, or a dead letter whose reason is justified
/// (no rule matches, the payload is over the limit, it is not one JSON object where one is
/// required). The streaming JSON probe agrees with a full `serde_json` parse on validity and on
/// the event id, time and schema it extracts.
pub fn mqtt_ingress(data: &[u8]) {
    let p = Publish::decode(data);
    let verdict = p.ingest();
    let matching = INGRESS_RULES.iter().find_map(|r| {
        TopicPattern::parse(r.0)
            .ok()
            .and_then(|t| t.matches(&p.topic))
            .map(|vars| (r, vars))
    });
    let parsed = || reference_json(&p.payload);
    match verdict {
        Ok(e) => {
            assert_eq!(Ok(&e), p.ingest().as_ref().map_err(|_| ()), "deterministic");
            let (&(_, stream, json, header, key, id_field, ts_field), vars) =
                matching.expect("an accepted publish matches a rule");
            assert_eq!(&*e.stream, stream, "the first matching rule's stream");
            assert_eq!(&e.payload[..], &p.payload[..], "the payload is unchanged");
            assert!(p.payload.len() <= MAX_PAYLOAD);
            let key_var = key.map(String::from).or_else(|| {
                let t =
                    TopicPattern::parse(INGRESS_RULES.iter().find(|r| r.1 == stream)?.0).ok()?;
                let ph = t.placeholders();
                ph.iter()
                    .find(|&&n| n == "device")
                    .or(ph.first())
                    .map(|s| s.to_string())
            });
            let expect_key = key_var.and_then(|k| vars.get(&k).cloned());
            assert_eq!(e.key, expect_key, "the key is the placeholder's value");
            assert_eq!(e.source, e.key);
            if let Some(k) = &e.key {
                assert!(!k.contains('/'), "a key is one topic level");
            }
            let topic_headers: Vec<_> =
                e.headers.iter().filter(|h| h.key == "mqtt.topic").collect();
            if header {
                assert_eq!(topic_headers.len(), 1);
                assert_eq!(topic_headers[0].value, p.topic);
            } else {
                assert!(topic_headers.is_empty());
            }
            let prop_id = p
                .user_properties
                .iter()
                .find(|(k, _)| k == "event_id")
                .map(|(_, v)| v.clone());
            if !json {
                assert_eq!(e.event_id, prop_id);
                assert_eq!(e.event_ts_ms, NOW_MS);
                return;
            }
            let doc = match parsed() {
                Ok(Some(Value::Object(m))) => m,
                // Valid, but serde_json cannot hold a number of it: the fields are not compared.
                Ok(None) => return,
                other => panic!("accepted as a JSON object, but serde_json says {other:?}"),
            };
            match (&prop_id, doc.get(id_field)) {
                (Some(id), _) => assert_eq!(e.event_id.as_ref(), Some(id), "the property wins"),
                (None, Some(Value::String(s))) if !s.is_empty() => {
                    assert_eq!(e.event_id.as_ref(), Some(s))
                }
                (None, Some(Value::Number(n))) if n.is_i64() || n.is_u64() => {
                    assert_eq!(e.event_id, Some(n.to_string()))
                }
                // A float's text: whatever the probe made of it.
                (None, Some(Value::Number(_))) => assert!(e.event_id.is_some()),
                (None, _) => assert_eq!(e.event_id, None),
            }
            let ts = doc.get(ts_field).and_then(Value::as_i64);
            assert_eq!(e.event_ts_ms, ts.unwrap_or(NOW_MS), "event time");
            match doc.get("schema") {
                Some(Value::String(s)) => assert_eq!(e.schema.as_ref(), Some(s)),
                _ => assert_eq!(
                    e.schema,
                    Some(format!("{stream}/1")),
                    "only a string is a schema"
                ),
            }
        }
        Err((rejection, dead)) => {
            let again = p
                .ingest()
                .err()
                .map(|(r, d)| (r, d.event_id.clone(), d.payload.clone()));
            assert_eq!(
                again,
                Some((rejection, dead.event_id.clone(), dead.payload.clone())),
                "deterministic"
            );
            assert_eq!(&*dead.stream, edge_core::log::DEADLETTER_STREAM);
            assert!(
                dead.event_id.is_some(),
                "a redelivered dead letter is stored once"
            );
            let letter: Value = serde_json::from_slice(&dead.payload).expect("a JSON dead letter");
            assert!(letter["reason"].as_str().is_some_and(|r| !r.is_empty()));
            assert_eq!(letter["topic"].as_str(), Some(p.topic.as_str()));
            assert_eq!(
                letter["original_bytes"].as_u64(),
                Some(p.payload.len() as u64)
            );
            match rejection {
                Rejection::NoRule => assert!(matching.is_none(), "dead-lettered as no_rule"),
                Rejection::Oversized => {
                    assert!(matching.is_some() && p.payload.len() > MAX_PAYLOAD)
                }
                Rejection::NotJson | Rejection::NotObject => {
                    let (r, _) = matching.expect("a rule matched");
                    assert!(r.2, "JSON checked on a rule that does not require it");
                    assert!(p.payload.len() <= MAX_PAYLOAD);
                    match (rejection, parsed()) {
                        (Rejection::NotJson, Err(_)) => {}
                        (Rejection::NotObject, Ok(Some(v))) => assert!(!v.is_object()),
                        (r, v) => panic!("{r:?}, but serde_json says {v:?}"),
                    }
                }
                Rejection::LogRefused => panic!("ingress does not know the log's verdict"),
            }
        }
    }
}

/// The reference JSON verdict: `serde_json`'s full parse, except that a number beyond the range
/// of an `f64` is valid JSON (RFC 8259 section 6 leaves the range to implementations; ingest
/// passes the payload on untouched and never reads such a number). `Ok(None)`: one valid JSON
/// object that `serde_json::Value` cannot hold.
pub fn reference_json(payload: &[u8]) -> Result<Option<Value>, serde_json::Error> {
    match serde_json::from_slice::<Value>(payload) {
        Ok(v) => Ok(Some(v)),
        Err(e)
            if e.to_string().starts_with("number out of range")
                && std::str::from_utf8(payload).is_ok() =>
        {
            serde_json::from_slice::<serde::de::IgnoredAny>(payload)?;
            let first = payload.iter().find(|b| !b.is_ascii_whitespace());
            if first == Some(&b'{') {
                Ok(None)
            } else {
                Err(e)
            }
        }
        Err(e) => Err(e),
    }
}

/// A reference MQTT topic-filter match (MQTT 5 section 4.7), level by level.
pub fn mqtt_filter_matches(filter: &str, topic: &str) -> bool {
    let f: Vec<&str> = filter.split('/').collect();
    let t: Vec<&str> = topic.split('/').collect();
    for (i, level) in f.iter().enumerate() {
        match *level {
            // `#` also matches the parent level: `a/#` matches `a`.
            "#" => return true,
            "+" if i < t.len() => {}
            l if i < t.len() && t[i] == l => {}
            _ => return false,
        }
    }
    f.len() == t.len()
}

/// Whether `topic` may be published: a valid MQTT topic name that is not a broker topic.
pub fn is_publishable(topic: &str) -> bool {
    !topic.is_empty()
        && topic.len() <= MAX_MQTT_STRING_BYTES
        && !topic.contains(['+', '#'])
        && !topic.starts_with('$')
        && check_mqtt_chars(topic).is_ok()
}

/// A reference rendering: the template is split at each placeholder and the values are put in
/// between, so no value is ever scanned for placeholders.
pub fn render_reference(template: &str, vars: &[(&str, &str)]) -> String {
    let Some(((name, value), rest)) = vars.split_first() else {
        return template.to_string();
    };
    template
        .split(&format!("{{{name}}}"))
        .map(|piece| render_reference(piece, rest))
        .collect::<Vec<_>>()
        .join(value)
}

/// The store id the fuzzed egress renders for.
pub const STORE: &str = "store-0001";
/// The stream the fuzzed egress renders for.
pub const STREAM: &str = "offers.decisions";

/// The lines of a [`mqtt_topic`] input: pattern, topic, template, key, source.
pub fn topic_lines(data: &[u8]) -> [String; 5] {
    let mut rest = data;
    std::array::from_fn(|_| next_line(&mut rest).map(lossy).unwrap_or_default())
}

/// Topic patterns and egress templates on arbitrary text. A parsed pattern's filter is a valid
/// MQTT filter with the pattern's wildcards, it matches exactly the topics the broker delivers
/// for that filter, and it extracts one level per placeholder. An egress template that passes
/// config validation renders each value literally (a value is never read as a placeholder), and
/// `render_checked` accepts exactly the topics that can be published.
pub fn mqtt_topic(data: &[u8]) {
    let [pattern, topic, template, key, source] = topic_lines(data);
    if let Ok(p) = TopicPattern::parse(&pattern) {
        let filter = p.filter();
        let levels: Vec<&str> = filter.split('/').collect();
        for (i, l) in levels.iter().enumerate() {
            assert!(
                !l.contains(['+', '#']) || *l == "+" || (*l == "#" && i + 1 == levels.len()),
                "filter {filter:?} of {pattern:?} is not a valid MQTT filter"
            );
        }
        let names: BTreeSet<&str> = p.placeholders().into_iter().collect();
        assert_eq!(
            names.len(),
            p.placeholders().len(),
            "placeholders are unique"
        );
        let m = p.matches(&topic);
        assert_eq!(
            m.is_some(),
            mqtt_filter_matches(&filter, &topic),
            "{pattern:?} and its filter {filter:?} disagree on {topic:?}"
        );
        if let Some(vars) = m {
            let got: BTreeSet<&str> = vars.keys().map(String::as_str).collect();
            assert_eq!(got, names, "one value per placeholder");
            for v in vars.values() {
                assert!(!v.contains('/'), "a placeholder matches one level");
            }
        }
    }
    if egress_template_problems(&template).is_empty() {
        let vars = [
            ("store", STORE),
            ("stream", STREAM),
            ("key", key.as_str()),
            ("source", source.as_str()),
        ];
        assert!(
            EGRESS_PLACEHOLDERS
                .iter()
                .all(|p| vars.iter().any(|v| v.0 == *p))
        );
        let expected = render_reference(&template, &vars);
        match render_checked(&template, &vars) {
            Ok(t) => {
                assert_eq!(t, expected, "values are substituted literally");
                assert!(
                    is_publishable(&t),
                    "{t:?} was accepted but cannot be published"
                );
            }
            Err(refusal) => {
                assert!(!refusal.reason.is_empty());
                assert!(
                    !is_publishable(&expected),
                    "{expected:?} was refused ({}) but can be published",
                    refusal.reason
                );
            }
        }
    }
}
