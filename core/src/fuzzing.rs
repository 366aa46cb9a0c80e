//! Properties the fuzz target `downlink_record` (`core/fuzz/`) checks on arbitrary input, shared
//! with `core/tests/fuzz_corpus.rs`, which replays the committed seed corpus on every test run.
//! Each function panics only when a property is violated; the code under test never panics.
//!
//! Input format (so that seeds are readable and mutations stay meaningful): header lines
//! `name: value` up to the first empty line, then the payload. Three pseudo-headers: `topic:`
//! picks the policy (`commands`, `prices` with signatures required, anything else: optional),
//! `key:` is the record key (no line: a null key), `tombstone:` makes the payload null. A line
//! without `: ` is a header without a value. The store is `store-0001`; the clock is [`NOW_MS`].

use crate::downlink::{Addressing, Admission, Incoming, TopicPolicy, addressing, admit};
use crate::signing::{
    PublicKey, SEAL_HEADERS, Seal, SignedFields, SignedMessage, SigningKey, Verifier,
};
use std::sync::{Arc, OnceLock};

/// The store the fuzzed downlink runs in.
pub const STORE: &str = "store-0001";
/// The fuzzed downlink's clock.
pub const NOW_MS: i64 = 1_790_000_000_000;
/// The seed of the fuzz key `hq-fuzz` (RFC 8032 TEST 1); `hq-old` (seed 2s) retired at
/// `NOW_MS - 1`.
pub const FUZZ_SEED: [u8; 32] = [
    0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c, 0xc4,
    0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae, 0x7f, 0x60,
];

/// The key the seeds are signed with.
pub fn fuzz_key() -> &'static SigningKey {
    static K: OnceLock<SigningKey> = OnceLock::new();
    K.get_or_init(|| SigningKey::from_seed("hq-fuzz", FUZZ_SEED).expect("a valid fixed key id"))
}

fn verifier() -> &'static Verifier {
    static V: OnceLock<Verifier> = OnceLock::new();
    V.get_or_init(|| {
        let old = SigningKey::from_seed("hq-old", [2; 32]).expect("a valid fixed key id");
        let old = PublicKey::from_base64("hq-old", &old.public_key().to_base64(), Some(NOW_MS - 1))
            .expect("a valid fixed key");
        Verifier::new(vec![fuzz_key().public_key(), old])
    })
}

/// A decoded fuzz input.
#[derive(Debug, Clone, Default)]
pub struct FuzzRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Option<Vec<u8>>)>,
    pub payload: Option<Vec<u8>>,
}

impl FuzzRecord {
    pub fn decode(data: &[u8]) -> FuzzRecord {
        let mut r = FuzzRecord::default();
        let mut rest = data;
        let mut tombstone = false;
        loop {
            let (line, tail, more) = match rest.iter().position(|&b| b == b'\n') {
                Some(i) => (&rest[..i], &rest[i + 1..], true),
                None => (rest, &[][..], false),
            };
            rest = tail;
            if line.is_empty() {
                break;
            }
            let (name, value) = match line.windows(2).position(|w| w == b": ") {
                Some(i) => (&line[..i], Some(line[i + 2..].to_vec())),
                None => (line, None),
            };
            let name = String::from_utf8_lossy(name).into_owned();
            match (name.as_str(), value) {
                ("topic", v) => r.topic = String::from_utf8_lossy(&v.unwrap_or_default()).into(),
                ("key", v) => r.key = Some(v.unwrap_or_default()),
                ("tombstone", _) => tombstone = true,
                (_, v) => r.headers.push((name, v)),
            }
            if !more {
                break;
            }
        }
        if !tombstone {
            r.payload = Some(rest.to_vec());
        }
        r
    }

    /// The input bytes of this record (for writing seeds).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("topic: {}\n", self.topic).into_bytes();
        if let Some(k) = &self.key {
            out.extend_from_slice(b"key: ");
            out.extend_from_slice(k);
            out.push(b'\n');
        }
        if self.payload.is_none() {
            out.extend_from_slice(b"tombstone: 1\n");
        }
        for (k, v) in &self.headers {
            out.extend_from_slice(k.as_bytes());
            if let Some(v) = v {
                out.extend_from_slice(b": ");
                out.extend_from_slice(v);
            }
            out.push(b'\n');
        }
        out.push(b'\n');
        out.extend_from_slice(self.payload.as_deref().unwrap_or_default());
        out
    }

    pub fn policy(&self) -> TopicPolicy {
        let (stream, require_signature, commands) = match self.topic.as_str() {
            "commands" => ("hq.commands", true, true),
            "prices" => ("hq.prices", true, false),
            _ => ("hq.campaigns", false, false),
        };
        TopicPolicy {
            stream: Arc::from(stream),
            require_signature,
            commands,
        }
    }

    fn header_store(&self) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == crate::downlink::H_STORE)
            .map(|(_, v)| v.as_deref().unwrap_or_default())
    }

    /// Signs this record with the fuzz key (replacing any signature headers).
    pub fn sign(&mut self, expires_at_ms: Option<i64>) {
        self.headers
            .retain(|(k, _)| !SEAL_HEADERS.contains(&k.as_str()));
        let policy = self.policy();
        let fields = SignedFields {
            stream: &policy.stream,
            store: self.header_store(),
            key: self.key.as_deref(),
            payload: self.payload.as_deref(),
        };
        let seal = fuzz_key().sign(&fields, NOW_MS - 60_000, expires_at_ms);
        for (k, v) in seal.headers() {
            self.headers.push((k.to_string(), Some(v.into_bytes())));
        }
    }

    /// The downlink's verdict on this record.
    pub fn admit(&self) -> Admission {
        let headers: Vec<(&str, Option<&[u8]>)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_deref()))
            .collect();
        let rec = Incoming {
            key: self.key.as_deref(),
            payload: self.payload.as_deref(),
            headers: &headers,
        };
        admit(STORE, &self.policy(), verifier(), &rec, NOW_MS)
    }
}

/// Downlink admission on arbitrary records: no panic, deterministic, nothing applied that a
/// policy refuses, a verified signature binds its stream and key, and signing then admitting
/// round-trips.
pub fn downlink_record(data: &[u8]) {
    let rec = FuzzRecord::decode(data);
    let policy = rec.policy();
    let verdict = rec.admit();
    assert_eq!(verdict, rec.admit(), "admission is deterministic");
    let stores = rec
        .headers
        .iter()
        .filter(|(k, _)| k == crate::downlink::H_STORE)
        .count();
    let to = addressing(STORE, rec.key.as_deref(), rec.header_store());
    match &verdict {
        Admission::OtherStore => assert_eq!(to, Addressing::OtherStore),
        Admission::Refuse(r) => {
            assert!(!r.reason().is_empty());
            assert!(!r.to_string().is_empty());
        }
        Admission::Apply { signed_by } => {
            assert_ne!(to, Addressing::OtherStore);
            assert!(stores <= 1, "an ambiguous address was applied");
            if policy.require_signature {
                assert!(
                    signed_by.is_some(),
                    "unsigned record applied where required"
                );
            }
            if policy.commands {
                assert_eq!(to, Addressing::ThisStore, "a wildcard command was applied");
                let parsed = crate::command::parse(rec.payload.as_deref().unwrap_or_default());
                assert!(parsed.is_ok(), "a malformed command was applied");
            }
            if let Some(by) = signed_by {
                let headers = rec.headers.iter().map(|(k, v)| (k.as_str(), v.as_deref()));
                let seal = Seal::from_headers(headers)
                    .expect("applied, so its seal parses")
                    .expect("applied as signed, so it has a seal");
                assert_eq!(seal.key_id, by.as_str());
                let fields = SignedFields {
                    stream: &policy.stream,
                    store: rec.header_store(),
                    key: rec.key.as_deref(),
                    payload: rec.payload.as_deref(),
                };
                let v = verifier();
                let ok = |f: SignedFields<'_>| {
                    v.verify(
                        &SignedMessage {
                            fields: f,
                            seal: &seal,
                        },
                        NOW_MS,
                    )
                };
                assert!(ok(fields).is_ok());
                assert!(
                    ok(SignedFields {
                        stream: "hq.elsewhere",
                        ..fields
                    })
                    .is_err()
                );
                let mut other_key = rec.key.clone().unwrap_or_default();
                other_key.push(b'x');
                assert!(
                    ok(SignedFields {
                        key: Some(&other_key),
                        ..fields
                    })
                    .is_err()
                );
            }
        }
    }
    // Signed by HQ, the same record is applied unless it is not for this store or its address is
    // ambiguous, or it is a command that fails its own checks.
    let mut signed = rec;
    signed.sign(None);
    let again = signed.admit();
    match (to, stores) {
        (Addressing::OtherStore, 0 | 1) => assert_eq!(again, Admission::OtherStore),
        (_, 0 | 1) if !policy.commands => {
            assert!(
                matches!(again, Admission::Apply { signed_by: Some(_) }),
                "a freshly signed record was not applied: {again:?}"
            );
        }
        _ => assert!(!matches!(again, Admission::Apply { signed_by: None })),
    }
}
