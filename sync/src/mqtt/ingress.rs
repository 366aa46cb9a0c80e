//! Turning an MQTT publish into a log request: the matching rule's stream, key, event id, event time
//! and schema; or a dead letter with the reason when the payload is unacceptable. Pure functions,
//! so every rule is unit-tested without a broker.

use super::config::IngressRule;
use super::topic::TopicPattern;
use crate::deadletter::DeadLetter;
use edge_core::Event;
use std::sync::Arc;

pub(crate) struct CompiledRule {
    pattern: TopicPattern,
    stream: Arc<str>,
    require_json: bool,
    key: Option<String>,
    schema: Option<String>,
    event_id_field: String,
    event_ts_field: String,
}

impl CompiledRule {
    pub(crate) fn compile(rule: &IngressRule) -> Result<CompiledRule, String> {
        let pattern = TopicPattern::parse(&rule.topic)?;
        let key = rule.key.clone().or_else(|| {
            let ph = pattern.placeholders();
            if ph.contains(&"device") {
                Some("device".into())
            } else {
                ph.first().map(|s| s.to_string())
            }
        });
        Ok(CompiledRule {
            stream: Arc::from(rule.stream.as_str()),
            require_json: rule.require_json,
            key,
            schema: rule.schema.clone(),
            event_id_field: rule.event_id_field.clone(),
            event_ts_field: rule.event_ts_field.clone(),
            pattern,
        })
    }

    pub(crate) fn filter(&self) -> String {
        self.pattern.filter()
    }
}

pub(crate) struct Limits {
    pub max_payload: usize,
    pub deadletter_keep: usize,
}

/// Why a message was dead-lettered (also the metric label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Rejection {
    Oversized,
    NotJson,
    NotObject,
    NoRule,
}

impl Rejection {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Rejection::Oversized => "oversized",
            Rejection::NotJson => "not_json",
            Rejection::NotObject => "not_object",
            Rejection::NoRule => "no_rule",
        }
    }
}

/// Converts one publish. `Err` holds the dead letter to store instead (and ack).
pub(crate) fn to_event(
    rules: &[CompiledRule],
    limits: &Limits,
    topic: &str,
    payload: &[u8],
    user_properties: &[(String, String)],
    now_ms: i64,
) -> Result<Event, (Rejection, Box<Event>)> {
    let dead = |rej: Rejection, reason: String, stream: Option<&str>| {
        let mut d = DeadLetter::new("mqtt", reason)
            .field("topic", topic)
            .original(payload, limits.deadletter_keep);
        if let Some(s) = stream {
            d = d.field("stream", s);
        }
        (rej, Box::new(d.into_event().with_event_ts(now_ms)))
    };
    let Some((rule, vars)) = rules
        .iter()
        .find_map(|r| r.pattern.matches(topic).map(|v| (r, v)))
    else {
        return Err(dead(
            Rejection::NoRule,
            format!("no ingress rule matches topic {topic:?}"),
            None,
        ));
    };
    if payload.len() > limits.max_payload {
        return Err(dead(
            Rejection::Oversized,
            format!(
                "payload of {} bytes exceeds mqtt.max_payload ({} bytes)",
                payload.len(),
                limits.max_payload
            ),
            Some(&rule.stream),
        ));
    }
    let mut event = Event::new(rule.stream.clone(), payload.to_vec()).with_event_ts(now_ms);
    let key = rule.key.as_ref().and_then(|k| vars.get(k)).cloned();
    event.source = key.clone();
    event.key = key;
    event.schema = rule.schema.clone();
    if let Some((_, id)) = user_properties.iter().find(|(k, _)| k == "event_id") {
        event.event_id = Some(id.clone());
    }
    if rule.require_json {
        let value: serde_json::Value = match serde_json::from_slice(payload) {
            Ok(v) => v,
            Err(e) => {
                return Err(dead(
                    Rejection::NotJson,
                    format!("payload is not valid JSON: {e}"),
                    Some(&rule.stream),
                ));
            }
        };
        let Some(obj) = value.as_object() else {
            return Err(dead(
                Rejection::NotObject,
                "payload is JSON but not an object".into(),
                Some(&rule.stream),
            ));
        };
        if event.event_id.is_none() {
            event.event_id = match obj.get(&rule.event_id_field) {
                Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s.clone()),
                Some(serde_json::Value::Number(n)) => Some(n.to_string()),
                _ => None,
            };
        }
        if let Some(ts) = obj.get(&rule.event_ts_field).and_then(|v| v.as_i64()) {
            event.event_ts_ms = ts;
        }
        if let Some(s) = obj.get("schema").and_then(|v| v.as_str()) {
            event.schema = Some(s.to_string());
        }
    }
    event.headers.push(edge_core::Header {
        key: "mqtt.topic".into(),
        value: topic.to_string(),
    });
    Ok(event)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Vec<CompiledRule> {
        vec![
            CompiledRule::compile(&IngressRule {
                topic: "store/+/pos/{device}/transactions".into(),
                stream: "pos.transactions".into(),
                require_json: true,
                key: None,
                schema: Some("pos.transaction/1".into()),
                event_id_field: "event_id".into(),
                event_ts_field: "ts".into(),
            })
            .unwrap(),
            CompiledRule::compile(&IngressRule {
                topic: "raw/{sensor}".into(),
                stream: "raw.bytes".into(),
                require_json: false,
                key: None,
                schema: None,
                event_id_field: "event_id".into(),
                event_ts_field: "ts".into(),
            })
            .unwrap(),
        ]
    }

    const LIMITS: Limits = Limits {
        max_payload: 1000,
        deadletter_keep: 16,
    };

    #[test]
    fn json_message_becomes_event_with_identity() {
        let p = br#"{"event_id":"tx-9","ts":1700000000123,"total_minor":500}"#;
        let e = to_event(
            &rules(),
            &LIMITS,
            "store/1/pos/lane-4/transactions",
            p,
            &[],
            5,
        )
        .unwrap();
        assert_eq!(&*e.stream, "pos.transactions");
        assert_eq!(e.key.as_deref(), Some("lane-4"));
        assert_eq!(e.source.as_deref(), Some("lane-4"));
        assert_eq!(e.event_id.as_deref(), Some("tx-9"));
        assert_eq!(e.event_ts_ms, 1_700_000_000_123);
        assert_eq!(e.schema.as_deref(), Some("pos.transaction/1"));
        assert_eq!(&e.payload[..], &p[..]);
    }

    #[test]
    fn user_property_event_id_wins_and_payload_schema_overrides() {
        let p = br#"{"event_id":"inner","schema":"pos.transaction/2"}"#;
        let props = vec![("event_id".to_string(), "outer".to_string())];
        let e = to_event(
            &rules(),
            &LIMITS,
            "store/1/pos/a/transactions",
            p,
            &props,
            5,
        )
        .unwrap();
        assert_eq!(e.event_id.as_deref(), Some("outer"));
        assert_eq!(e.schema.as_deref(), Some("pos.transaction/2"));
        assert_eq!(e.event_ts_ms, 5, "no ts field: ingest time");
    }

    #[test]
    fn bad_payloads_become_dead_letters_with_reasons() {
        let topic = "store/1/pos/a/transactions";
        let (r, dl) = to_event(&rules(), &LIMITS, topic, b"not json at all", &[], 5).unwrap_err();
        assert_eq!(r, Rejection::NotJson);
        let v: serde_json::Value = serde_json::from_slice(&dl.payload).unwrap();
        assert!(v["reason"].as_str().unwrap().contains("not valid JSON"));
        assert_eq!(v["topic"], topic);
        assert_eq!(v["stream"], "pos.transactions");
        assert_eq!(&*dl.stream, "deadletter");

        let (r, _) = to_event(&rules(), &LIMITS, topic, b"[1,2]", &[], 5).unwrap_err();
        assert_eq!(r, Rejection::NotObject);

        let big = vec![b' '; 2000];
        let (r, dl) = to_event(&rules(), &LIMITS, topic, &big, &[], 5).unwrap_err();
        assert_eq!(r, Rejection::Oversized);
        let v: serde_json::Value = serde_json::from_slice(&dl.payload).unwrap();
        assert_eq!(v["original_bytes"], 2000);
        assert_eq!(v["truncated"], true);

        let (r, _) = to_event(&rules(), &LIMITS, "elsewhere/x", b"{}", &[], 5).unwrap_err();
        assert_eq!(r, Rejection::NoRule);
    }

    #[test]
    fn non_json_streams_accept_bytes() {
        let e = to_event(&rules(), &LIMITS, "raw/s1", b"\x00\x01binary", &[], 5).unwrap();
        assert_eq!(&*e.stream, "raw.bytes");
        assert_eq!(e.key.as_deref(), Some("s1"));
        assert!(e.event_id.is_none());
    }
}
