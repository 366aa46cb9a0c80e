//! The pure half of the downlink: whether a record HQ sent is applied, belongs to another store,
//! or is refused and why. No I/O (the Kafka consumer lives in `edge-sync`), so it is fuzzed
//! (`core/fuzz`, properties in [`crate::fuzzing`]) and unit-tested without a broker.
//!
//! Invariants:
//! * **Only this store's records.** A record is for this store when its `edge.store` header is this
//!   store or `*`; without that header, when its key is empty, `*`, this store id or starts with
//!   `<store>/`. Other stores' records are skipped without a verdict on their signature (they are
//!   signed for their store).
//! * **Commands name their store.** On the commands topic a record must be addressed to this store
//!   explicitly (`edge.store` = this store, or a key of this store); a record for all stores is
//!   refused, so that no single record makes every store re-send its history.
//! * **Signed means verified.** A record with signature headers is verified on every topic; a
//!   topic that requires signatures refuses unsigned records. A refusal carries a short reason
//!   (the metric label) and a sentence; the caller dead-letters the record and moves its offset on.
//! * **Commands parse.** A command record that [`crate::command::parse`] refuses is refused here,
//!   before it reaches the local stream.

use crate::command;
use crate::signing::{KeyId, Seal, SignatureError, SignedFields, SignedMessage, Verifier};
use std::sync::Arc;

/// The header that addresses a record to one store or to all (`*`).
pub const H_STORE: &str = "edge.store";

/// How the downlink treats one HQ topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicPolicy {
    /// The local stream the topic is applied to (what signatures bind).
    pub stream: Arc<str>,
    /// Refuse records without a signature.
    pub require_signature: bool,
    /// The topic carries commands: explicit addressing and a parseable command are required.
    pub commands: bool,
}

/// A record as consumed, borrowed from the consumer.
#[derive(Debug, Clone, Copy)]
pub struct Incoming<'a> {
    pub key: Option<&'a [u8]>,
    pub payload: Option<&'a [u8]>,
    /// Every header in order (a header may have no value).
    pub headers: &'a [(&'a str, Option<&'a [u8]>)],
}

/// Who a record is addressed to, from this store's point of view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Addressing {
    /// This store by name (header or key).
    ThisStore,
    /// Every store (`edge.store: *`, or a key that is absent, empty or `*`).
    AllStores,
    OtherStore,
}

/// Who a record is for (see the module docs).
pub fn addressing(store: &str, key: Option<&[u8]>, header_store: Option<&[u8]>) -> Addressing {
    if let Some(h) = header_store {
        return if h == b"*" {
            Addressing::AllStores
        } else if h == store.as_bytes() {
            Addressing::ThisStore
        } else {
            Addressing::OtherStore
        };
    }
    match key {
        None | Some(b"") | Some(b"*") => Addressing::AllStores,
        Some(k)
            if k == store.as_bytes()
                || (k.len() > store.len()
                    && k.starts_with(store.as_bytes())
                    && k[store.len()] == b'/') =>
        {
            Addressing::ThisStore
        }
        Some(_) => Addressing::OtherStore,
    }
}

/// Whether a record is meant for `store` (this store or all stores).
pub fn for_store(store: &str, key: Option<&[u8]>, header_store: Option<&[u8]>) -> bool {
    addressing(store, key, header_store) != Addressing::OtherStore
}

/// Why a record is not applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(transparent)]
    Signature(#[from] SignatureError),
    #[error("the record carries {0} headers {H_STORE}; a record is addressed once")]
    AmbiguousStore(usize),
    #[error(
        "the command is addressed to every store; a command must name this store ({H_STORE} header or key)"
    )]
    UnaddressedCommand,
    #[error("{0}")]
    MalformedCommand(String),
}

impl Refusal {
    /// A short label for metrics and status (`edge_downlink_refused_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Signature(e) => e.reason(),
            Refusal::AmbiguousStore(_) => "ambiguous_store",
            Refusal::UnaddressedCommand => "unaddressed_command",
            Refusal::MalformedCommand(_) => "malformed_command",
        }
    }
}

/// What to do with one record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Apply it to the topic's stream; `signed_by` names the key that verified it.
    Apply { signed_by: Option<KeyId> },
    /// Another store's record: move the offset on, nothing else.
    OtherStore,
    /// Dead-letter it with this reason and move the offset on.
    Refuse(Refusal),
}

/// Decides about one record of a topic with `policy`, at `now_ms`.
pub fn admit(
    store: &str,
    policy: &TopicPolicy,
    verifier: &Verifier,
    rec: &Incoming<'_>,
    now_ms: i64,
) -> Admission {
    match check(store, policy, verifier, rec, now_ms) {
        Ok(Some(signed_by)) => Admission::Apply { signed_by },
        Ok(None) => Admission::OtherStore,
        Err(r) => Admission::Refuse(r),
    }
}

fn check(
    store: &str,
    policy: &TopicPolicy,
    verifier: &Verifier,
    rec: &Incoming<'_>,
    now_ms: i64,
) -> Result<Option<Option<KeyId>>, Refusal> {
    let mut stores = rec.headers.iter().filter(|(k, _)| *k == H_STORE);
    let header_store = stores.next().map(|(_, v)| v.unwrap_or_default());
    let more = stores.count();
    if more > 0 {
        return Err(Refusal::AmbiguousStore(more + 1));
    }
    let to = addressing(store, rec.key, header_store);
    if to == Addressing::OtherStore {
        return Ok(None);
    }
    let seal = Seal::from_headers(rec.headers.iter().copied())?;
    let signed_by = match &seal {
        Some(seal) => {
            let fields = SignedFields {
                stream: &policy.stream,
                store: header_store,
                key: rec.key,
                payload: rec.payload,
            };
            Some(verifier.verify(&SignedMessage { fields, seal }, now_ms)?)
        }
        None if policy.require_signature => return Err(SignatureError::Unsigned.into()),
        None => None,
    };
    if policy.commands {
        if to != Addressing::ThisStore {
            return Err(Refusal::UnaddressedCommand);
        }
        command::parse(rec.payload.unwrap_or_default()).map_err(Refusal::MalformedCommand)?;
    }
    Ok(Some(signed_by))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::signing::SigningKey;

    #[test]
    fn records_for_this_store_or_all_stores() {
        assert!(for_store("s1", None, None));
        assert!(for_store("s1", Some(b"*"), None));
        assert!(for_store("s1", Some(b""), None));
        assert!(for_store("s1", Some(b"s1"), None));
        assert!(for_store("s1", Some(b"s1/lane-2"), None));
        assert!(!for_store("s1", Some(b"s10"), None));
        assert!(!for_store("s1", Some(b"s2"), None));
        assert!(!for_store("s1", Some(b"s1x/a"), None));
        // The header decides when present.
        assert!(for_store("s1", Some(b"sku-9"), Some(b"*")));
        assert!(for_store("s1", Some(b"sku-9"), Some(b"s1")));
        assert!(!for_store("s1", None, Some(b"s2")));
        assert_eq!(addressing("s1", Some(b"*"), None), Addressing::AllStores);
        assert_eq!(
            addressing("s1", Some(b"s1"), Some(b"*")),
            Addressing::AllStores
        );
        assert_eq!(addressing("s1", Some(b"s1/x"), None), Addressing::ThisStore);
    }

    const NOW: i64 = 1_790_000_000_000;
    const REMIRROR: &[u8] = br#"{"command":"remirror","stream":"pos.transactions","from_seq":1}"#;

    fn hq() -> SigningKey {
        SigningKey::from_seed("hq-1", [9; 32]).unwrap()
    }

    fn policy(stream: &str, require: bool, commands: bool) -> TopicPolicy {
        TopicPolicy {
            stream: Arc::from(stream),
            require_signature: require,
            commands,
        }
    }

    fn signed_headers(
        k: &SigningKey,
        stream: &str,
        store: Option<&[u8]>,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
    ) -> Vec<(&'static str, String)> {
        let fields = SignedFields {
            stream,
            store,
            key,
            payload,
        };
        k.sign(&fields, NOW - 1000, None).headers()
    }

    fn run(
        p: &TopicPolicy,
        key: Option<&[u8]>,
        payload: Option<&[u8]>,
        headers: &[(&'static str, String)],
    ) -> Admission {
        let h: Vec<(&str, Option<&[u8]>)> = headers
            .iter()
            .map(|(k, v)| (*k, Some(v.as_bytes())))
            .collect();
        let v = Verifier::new(vec![hq().public_key()]);
        admit(
            "s1",
            p,
            &v,
            &Incoming {
                key,
                payload,
                headers: &h,
            },
            NOW,
        )
    }

    fn refused(a: Admission) -> &'static str {
        match a {
            Admission::Refuse(r) => r.reason(),
            other => panic!("not refused: {other:?}"),
        }
    }

    #[test]
    fn a_signed_command_for_this_store_is_applied() {
        let p = policy("hq.commands", true, true);
        let h = signed_headers(&hq(), "hq.commands", None, Some(b"s1"), Some(REMIRROR));
        assert_eq!(
            run(&p, Some(b"s1"), Some(REMIRROR), &h),
            Admission::Apply {
                signed_by: Some(hq().id().clone())
            }
        );
    }

    #[test]
    fn an_unsigned_command_is_refused_and_an_unsigned_price_applies_where_allowed() {
        let p = policy("hq.commands", true, true);
        assert_eq!(
            refused(run(&p, Some(b"s1"), Some(REMIRROR), &[])),
            "unsigned"
        );
        let prices = policy("hq.prices", false, false);
        assert_eq!(
            run(&prices, Some(b"s1"), Some(b"{}"), &[]),
            Admission::Apply { signed_by: None }
        );
    }

    #[test]
    fn a_bad_signature_is_refused_even_where_signatures_are_optional() {
        let prices = policy("hq.prices", false, false);
        let h = signed_headers(&hq(), "hq.prices", None, Some(b"s1"), Some(b"{\"p\":1}"));
        assert_eq!(
            refused(run(&prices, Some(b"s1"), Some(b"{\"p\":0}"), &h)),
            "bad_signature"
        );
        // A signature made for the price stream does not verify on the commands stream.
        let cmd = policy("hq.commands", true, true);
        let h = signed_headers(&hq(), "hq.prices", None, Some(b"s1"), Some(REMIRROR));
        assert_eq!(
            refused(run(&cmd, Some(b"s1"), Some(REMIRROR), &h)),
            "bad_signature"
        );
    }

    #[test]
    fn a_wildcard_command_is_refused_even_when_signed() {
        let p = policy("hq.commands", true, true);
        for key in [Some(&b"*"[..]), Some(b""), None] {
            let h = signed_headers(&hq(), "hq.commands", None, key, Some(REMIRROR));
            assert_eq!(
                refused(run(&p, key, Some(REMIRROR), &h)),
                "unaddressed_command",
                "{key:?}"
            );
        }
        let mut h = signed_headers(
            &hq(),
            "hq.commands",
            Some(b"*"),
            Some(b"s1"),
            Some(REMIRROR),
        );
        h.push((H_STORE, "*".into()));
        assert_eq!(
            refused(run(&p, Some(b"s1"), Some(REMIRROR), &h)),
            "unaddressed_command"
        );
        // Named by the header, the command applies.
        let mut h = signed_headers(
            &hq(),
            "hq.commands",
            Some(b"s1"),
            Some(b"x"),
            Some(REMIRROR),
        );
        h.push((H_STORE, "s1".into()));
        assert!(matches!(
            run(&p, Some(b"x"), Some(REMIRROR), &h),
            Admission::Apply { .. }
        ));
    }

    #[test]
    fn a_signature_for_another_store_does_not_verify_here() {
        let p = policy("hq.commands", true, true);
        // Signed for s2, re-addressed to s1 by the key.
        let h = signed_headers(&hq(), "hq.commands", None, Some(b"s2"), Some(REMIRROR));
        assert_eq!(
            refused(run(&p, Some(b"s1"), Some(REMIRROR), &h)),
            "bad_signature"
        );
        // Another store's record is skipped, not judged.
        assert_eq!(
            run(&p, Some(b"s2"), Some(REMIRROR), &h),
            Admission::OtherStore
        );
        let mut two = h.clone();
        two.push((H_STORE, "s1".into()));
        two.push((H_STORE, "s2".into()));
        assert_eq!(
            refused(run(&p, Some(b"s1"), Some(REMIRROR), &two)),
            "ambiguous_store"
        );
    }

    #[test]
    fn a_malformed_command_is_refused() {
        let p = policy("hq.commands", false, true);
        for bad in [
            &br#"{"command":"remirror","stream":"pos.transactions","from_seq":0}"#[..],
            br#"{"command":"remirror","stream":"*","from_seq":1}"#,
            b"not json",
        ] {
            assert_eq!(
                refused(run(&p, Some(b"s1"), Some(bad), &[])),
                "malformed_command"
            );
        }
        assert_eq!(
            refused(run(&p, Some(b"s1"), None, &[])),
            "malformed_command"
        );
        // A command for another component passes (its component checks it).
        assert!(matches!(
            run(&p, Some(b"s1"), Some(br#"{"command":"reload_model"}"#), &[]),
            Admission::Apply { .. }
        ));
    }
}
