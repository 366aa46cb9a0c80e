//! Signatures of what HQ sends a store: ed25519 over a canonical byte string (format `edge.sig/1`,
//! documented with a worked example in `docs/KAFKA.md`, "Signed downlink records").
//!
//! Invariants:
//! * **A signature binds its place.** The canonical bytes hold the key id, the signing time, the
//!   optional expiry, the local stream the record is for, the `edge.store` header, the record key
//!   and the payload, each length-prefixed with a presence flag. Moving a signed record onto
//!   another stream, another key or another store, or changing a byte of it, fails verification.
//! * **Keys have ids and rotate.** A [`Verifier`] holds several HQ public keys at once; a record
//!   names its key (`edge.sig.key`). A key past its `not_after` verifies nothing any more, whatever
//!   the record says about when it was signed (a stolen retired key cannot back-date).
//! * **Pure.** No I/O and no clock: the caller passes `now_ms`. The downlink, the signing tool
//!   and the model registry share this module.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use ed25519_dalek::Signer as _;
use std::fmt;
use std::sync::Arc;

/// The signature: standard base64 (with padding) of the 64-byte ed25519 signature.
pub const H_SIG: &str = "edge.sig";
/// Id of the HQ key that made the signature.
pub const H_SIG_KEY: &str = "edge.sig.key";
/// When HQ signed the record (ms since the Unix epoch, decimal).
pub const H_SIG_TS: &str = "edge.sig.ts";
/// Optional: the signature is not valid after this time (ms since the Unix epoch, decimal).
pub const H_SIG_EXPIRES: &str = "edge.sig.expires";
/// The headers that make up a seal.
pub const SEAL_HEADERS: [&str; 4] = [H_SIG, H_SIG_KEY, H_SIG_TS, H_SIG_EXPIRES];

/// First bytes of every canonical string; a new format gets a new tag.
pub const FORMAT_TAG: &[u8] = b"edge.sig/1\n";

/// Longest key id (letters, digits, `.`, `_`, `-`).
pub const MAX_KEY_ID_LEN: usize = 64;

/// The DER prefix of an ed25519 public key in X.509 SubjectPublicKeyInfo form (what
/// `openssl pkey -pubout -outform DER` writes); the 32 key bytes follow.
const SPKI_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];
/// The DER prefix of an ed25519 private key in PKCS#8 v1 form (what `openssl genpkey -algorithm
/// ed25519` writes inside its PEM); the 32 seed bytes follow.
const PKCS8_PREFIX: [u8; 16] = [
    0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20,
];

/// The id of an HQ key, e.g. `hq-2026-11`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(Arc<str>);

impl KeyId {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks a key id: 1 to 64 letters, digits, `.`, `_` or `-`.
pub fn check_key_id(id: &str) -> Result<(), String> {
    if id.is_empty() || id.len() > MAX_KEY_ID_LEN {
        return Err(format!(
            "key id {id:?} must be 1 to {MAX_KEY_ID_LEN} characters"
        ));
    }
    if let Some(c) = id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "key id {id:?} contains {c:?}; use letters, digits, '.', '_' and '-'"
        ));
    }
    Ok(())
}

/// What makes a key unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("{0}")]
    Id(String),
    #[error(
        "is not an ed25519 public key: expected base64 of the 32 key bytes or of its 44-byte DER (SubjectPublicKeyInfo) form ({0})"
    )]
    Public(String),
    #[error(
        "is not an ed25519 private key: expected base64 of the 32-byte seed, or a PKCS#8 PEM \"PRIVATE KEY\" ({0})"
    )]
    Private(String),
}

/// One HQ public key the store trusts.
#[derive(Clone)]
pub struct PublicKey {
    id: KeyId,
    key: ed25519_dalek::VerifyingKey,
    not_after_ms: Option<i64>,
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PublicKey")
            .field("id", &self.id)
            .field("key", &self.to_base64())
            .field("not_after_ms", &self.not_after_ms)
            .finish()
    }
}

impl PublicKey {
    /// `public_key`: base64 of the 32 key bytes, or of the DER SubjectPublicKeyInfo (the body of
    /// an openssl `PUBLIC KEY` PEM). `not_after_ms`: the key verifies nothing after this time.
    pub fn from_base64(
        id: &str,
        public_key: &str,
        not_after_ms: Option<i64>,
    ) -> Result<PublicKey, KeyError> {
        check_key_id(id).map_err(KeyError::Id)?;
        let raw = B64
            .decode(public_key.trim())
            .map_err(|e| KeyError::Public(format!("base64: {e}")))?;
        let bytes: [u8; 32] = match raw.len() {
            32 => raw.as_slice().try_into().ok(),
            44 if raw[..12] == SPKI_PREFIX => raw[12..].try_into().ok(),
            n => return Err(KeyError::Public(format!("{n} bytes"))),
        }
        .ok_or_else(|| KeyError::Public("wrong length".into()))?;
        let key = ed25519_dalek::VerifyingKey::from_bytes(&bytes)
            .map_err(|_| KeyError::Public("not a point on the curve".into()))?;
        if key.is_weak() {
            return Err(KeyError::Public("a weak (small-order) key".into()));
        }
        Ok(PublicKey {
            id: KeyId(Arc::from(id)),
            key,
            not_after_ms,
        })
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    /// Base64 of the 32 key bytes (the form `keygen` prints for the config).
    pub fn to_base64(&self) -> String {
        B64.encode(self.key.as_bytes())
    }
}

/// HQ's private key (the signing tool and tests; stores never hold one).
#[derive(Clone)]
pub struct SigningKey {
    id: KeyId,
    key: ed25519_dalek::SigningKey,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// A key from its 32-byte seed (e.g. 32 bytes from the OS random source for a new key).
    pub fn from_seed(id: &str, seed: [u8; 32]) -> Result<SigningKey, KeyError> {
        check_key_id(id).map_err(KeyError::Id)?;
        Ok(SigningKey {
            id: KeyId(Arc::from(id)),
            key: ed25519_dalek::SigningKey::from_bytes(&seed),
        })
    }

    /// Parses a key file: base64 of the 32-byte seed (what `edge-agent keygen` writes), or a
    /// PKCS#8 PEM `PRIVATE KEY` (what `openssl genpkey -algorithm ed25519` writes).
    pub fn from_file_contents(id: &str, text: &str) -> Result<SigningKey, KeyError> {
        let text = text.trim();
        let raw = if let Some(body) = text.strip_prefix("-----BEGIN PRIVATE KEY-----") {
            let body = body
                .split("-----END PRIVATE KEY-----")
                .next()
                .unwrap_or_default();
            let b64: String = body.split_whitespace().collect();
            let der = B64
                .decode(b64)
                .map_err(|e| KeyError::Private(format!("PEM base64: {e}")))?;
            if der.len() != 48 || der[..16] != PKCS8_PREFIX {
                return Err(KeyError::Private(
                    "the PEM holds another kind of key".into(),
                ));
            }
            der[16..].to_vec()
        } else {
            B64.decode(text)
                .map_err(|e| KeyError::Private(format!("base64: {e}")))?
        };
        let seed: [u8; 32] = raw
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Private(format!("{} bytes", raw.len())))?;
        SigningKey::from_seed(id, seed)
    }

    /// The file form of this key: base64 of the seed and a newline.
    pub fn to_file_contents(&self) -> String {
        format!("{}\n", B64.encode(self.key.to_bytes()))
    }

    pub fn id(&self) -> &KeyId {
        &self.id
    }

    pub fn public_key(&self) -> PublicKey {
        PublicKey {
            id: self.id.clone(),
            key: self.key.verifying_key(),
            not_after_ms: None,
        }
    }

    /// Signs `fields` at `signed_at_ms`, valid until `expires_at_ms` if given.
    pub fn sign(
        &self,
        fields: &SignedFields<'_>,
        signed_at_ms: i64,
        expires_at_ms: Option<i64>,
    ) -> Seal {
        let mut seal = Seal {
            key_id: self.id.as_str().to_string(),
            signed_at_ms,
            expires_at_ms,
            signature: [0; 64],
        };
        seal.signature = self.key.sign(&canonical_bytes(fields, &seal)).to_bytes();
        seal
    }
}

/// What a signature covers besides its own seal fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedFields<'a> {
    /// The local stream the record is applied to (`hq.prices`, ...): the same bytes mean something
    /// else in another stream. The stream, not the Kafka topic, so that a topic renamed on the way
    /// (MirrorMaker) keeps its signatures.
    pub stream: &'a str,
    /// The `edge.store` header, which decides which stores apply the record.
    pub store: Option<&'a [u8]>,
    /// The record key (`None`: a null key, not the same as an empty one).
    pub key: Option<&'a [u8]>,
    /// The payload (`None`: a tombstone).
    pub payload: Option<&'a [u8]>,
}

/// The signature headers of a record, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seal {
    pub key_id: String,
    pub signed_at_ms: i64,
    pub expires_at_ms: Option<i64>,
    pub signature: [u8; 64],
}

impl Seal {
    /// Reads the seal from a record's headers. `Ok(None)`: no signature header at all. A header
    /// given twice, a missing companion header or an unreadable value is an error: a record whose
    /// signature cannot be read is never treated as unsigned.
    pub fn from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a str, Option<&'a [u8]>)>,
    ) -> Result<Option<Seal>, SignatureError> {
        let mut found: [Option<Option<&[u8]>>; 4] = [None; 4];
        for (k, v) in headers {
            if let Some(i) = SEAL_HEADERS.iter().position(|h| *h == k) {
                if found[i].is_some() {
                    return Err(SignatureError::Malformed(format!(
                        "header {k} is given twice"
                    )));
                }
                found[i] = Some(v);
            }
        }
        if found.iter().all(Option::is_none) {
            return Ok(None);
        }
        let text = |i: usize| -> Result<Option<&str>, SignatureError> {
            match found[i] {
                None => Ok(None),
                Some(None) => Err(SignatureError::Malformed(format!(
                    "header {} has no value",
                    SEAL_HEADERS[i]
                ))),
                Some(Some(v)) => std::str::from_utf8(v).map(Some).map_err(|_| {
                    SignatureError::Malformed(format!("header {} is not UTF-8", SEAL_HEADERS[i]))
                }),
            }
        };
        let required = |i: usize| -> Result<&str, SignatureError> {
            text(i)?.ok_or_else(|| {
                SignatureError::Malformed(format!("header {} is missing", SEAL_HEADERS[i]))
            })
        };
        let sig = required(0)?;
        let key_id = required(1)?;
        let ts = required(2)?;
        let expires = text(3)?;
        let raw = B64
            .decode(sig)
            .map_err(|e| SignatureError::Malformed(format!("{H_SIG} is not base64: {e}")))?;
        let signature: [u8; 64] = raw.as_slice().try_into().map_err(|_| {
            SignatureError::Malformed(format!("{H_SIG} holds {} bytes, not 64", raw.len()))
        })?;
        check_key_id(key_id).map_err(SignatureError::Malformed)?;
        Ok(Some(Seal {
            key_id: key_id.to_string(),
            signed_at_ms: parse_ms(H_SIG_TS, ts)?,
            expires_at_ms: expires.map(|e| parse_ms(H_SIG_EXPIRES, e)).transpose()?,
            signature,
        }))
    }

    /// The headers to send with the record, in [`SEAL_HEADERS`] order.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        let mut h = vec![
            (H_SIG, B64.encode(self.signature)),
            (H_SIG_KEY, self.key_id.clone()),
            (H_SIG_TS, self.signed_at_ms.to_string()),
        ];
        if let Some(e) = self.expires_at_ms {
            h.push((H_SIG_EXPIRES, e.to_string()));
        }
        h
    }
}

/// A time header: plain decimal digits, no sign, no leading zero, at most 2^63-1.
fn parse_ms(header: &str, v: &str) -> Result<i64, SignatureError> {
    let canonical =
        !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) && (v == "0" || !v.starts_with('0'));
    match v.parse::<i64>() {
        Ok(n) if canonical => Ok(n),
        _ => Err(SignatureError::Malformed(format!(
            "header {header} is {v:?}, not milliseconds since the Unix epoch in decimal"
        ))),
    }
}

/// A record and its seal.
#[derive(Debug, Clone, Copy)]
pub struct SignedMessage<'a> {
    pub fields: SignedFields<'a>,
    pub seal: &'a Seal,
}

/// Why a record's signature is not accepted. [`SignatureError::reason`] is the metric label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the record is not signed (no {H_SIG} header) and this topic requires a signature")]
    Unsigned,
    #[error("the signature headers cannot be read: {0}")]
    Malformed(String),
    #[error("the record is signed with key {0:?}, which is not among the configured HQ keys")]
    UnknownKey(String),
    #[error("the record is signed with key {key_id:?}, which is retired since {not_after_ms} ms")]
    KeyRetired { key_id: String, not_after_ms: i64 },
    #[error("the signature expired at {expires_at_ms} ms (now {now_ms} ms)")]
    Expired { expires_at_ms: i64, now_ms: i64 },
    #[error(
        "the signature by key {0:?} does not match the record (forged, altered, or moved to another stream, store or key)"
    )]
    BadSignature(String),
}

impl SignatureError {
    /// A short label for metrics and status (`edge_downlink_refused_total{reason}`).
    pub fn reason(&self) -> &'static str {
        match self {
            SignatureError::Unsigned => "unsigned",
            SignatureError::Malformed(_) => "malformed_signature",
            SignatureError::UnknownKey(_) => "unknown_key",
            SignatureError::KeyRetired { .. } => "key_retired",
            SignatureError::Expired { .. } => "expired",
            SignatureError::BadSignature(_) => "bad_signature",
        }
    }
}

/// Verifies seals against the configured HQ keys.
#[derive(Debug, Clone, Default)]
pub struct Verifier {
    keys: Vec<PublicKey>,
}

impl Verifier {
    /// Several keys may be valid at once (rotation: HQ signs with the new key while records signed
    /// with the old one are still in the topics). Ids are unique (the config check refuses
    /// duplicates); of a duplicate id the first key counts.
    pub fn new(keys: Vec<PublicKey>) -> Verifier {
        Verifier { keys }
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn keys(&self) -> &[PublicKey] {
        &self.keys
    }

    /// Checks `msg` at `now_ms`; returns the id of the key that signed it.
    pub fn verify(&self, msg: &SignedMessage<'_>, now_ms: i64) -> Result<KeyId, SignatureError> {
        let seal = msg.seal;
        let key = self
            .keys
            .iter()
            .find(|k| k.id.as_str() == seal.key_id)
            .ok_or_else(|| SignatureError::UnknownKey(seal.key_id.clone()))?;
        if let Some(not_after_ms) = key.not_after_ms
            && now_ms > not_after_ms
        {
            return Err(SignatureError::KeyRetired {
                key_id: seal.key_id.clone(),
                not_after_ms,
            });
        }
        let sig = ed25519_dalek::Signature::from_bytes(&seal.signature);
        key.key
            .verify_strict(&canonical_bytes(&msg.fields, seal), &sig)
            .map_err(|_| SignatureError::BadSignature(seal.key_id.clone()))?;
        // Checked after the signature so that an altered expiry reads as a forgery.
        if let Some(expires_at_ms) = seal.expires_at_ms
            && now_ms > expires_at_ms
        {
            return Err(SignatureError::Expired {
                expires_at_ms,
                now_ms,
            });
        }
        Ok(key.id.clone())
    }
}

fn push_field(out: &mut Vec<u8>, v: Option<&[u8]>) {
    match v {
        None => out.push(0),
        Some(v) => {
            out.push(1);
            // Kafka bounds records far below 4 GiB; a longer value saturates and cannot collide
            // with a shorter one because its bytes follow in full.
            out.extend_from_slice(&u32::try_from(v.len()).unwrap_or(u32::MAX).to_be_bytes());
            out.extend_from_slice(v);
        }
    }
}

/// The bytes an ed25519 signature covers:
///
/// ```text
/// "edge.sig/1\n"
/// field(key id) field(signed at, decimal) field(expires at, decimal | absent)
/// field(stream) field(edge.store header | absent) field(key | absent) field(payload | absent)
/// field(absent)  = 0x00
/// field(present) = 0x01, length as u32 big-endian, the bytes
/// ```
pub fn canonical_bytes(fields: &SignedFields<'_>, seal: &Seal) -> Vec<u8> {
    let mut out = Vec::with_capacity(
        FORMAT_TAG.len() + 64 + fields.stream.len() + fields.payload.map_or(0, <[u8]>::len),
    );
    out.extend_from_slice(FORMAT_TAG);
    push_field(&mut out, Some(seal.key_id.as_bytes()));
    push_field(&mut out, Some(seal.signed_at_ms.to_string().as_bytes()));
    push_field(
        &mut out,
        seal.expires_at_ms
            .map(|e| e.to_string())
            .as_deref()
            .map(str::as_bytes),
    );
    push_field(&mut out, Some(fields.stream.as_bytes()));
    push_field(&mut out, fields.store);
    push_field(&mut out, fields.key);
    push_field(&mut out, fields.payload);
    out
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// RFC 8032, section 7.1, TEST 1.
    const RFC_SEED: &str = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
    const RFC_PUBLIC: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    fn hq(id: &str, seed_byte: u8) -> SigningKey {
        SigningKey::from_seed(id, [seed_byte; 32]).unwrap()
    }

    const PRICE: &[u8] = br#"{"schema":"price/1","sku":"4006381333931","price_cents":199}"#;

    fn price() -> SignedFields<'static> {
        SignedFields {
            stream: "hq.prices",
            store: None,
            key: Some(b"store-0001"),
            payload: Some(PRICE),
        }
    }

    const T0: i64 = 1_790_000_000_000;

    #[test]
    fn the_rfc_8032_vector_gives_the_rfc_public_key() {
        let seed: [u8; 32] = hex(RFC_SEED).try_into().unwrap();
        let k = SigningKey::from_seed("rfc", seed).unwrap();
        assert_eq!(k.public_key().key.as_bytes().to_vec(), hex(RFC_PUBLIC));
        // The same key in openssl's forms.
        let spki = [SPKI_PREFIX.to_vec(), hex(RFC_PUBLIC)].concat();
        let p = PublicKey::from_base64("rfc", &B64.encode(spki), None).unwrap();
        assert_eq!(p.to_base64(), k.public_key().to_base64());
        let pkcs8 = [PKCS8_PREFIX.to_vec(), seed.to_vec()].concat();
        let pem = format!(
            "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
            B64.encode(pkcs8)
        );
        let k2 = SigningKey::from_file_contents("rfc", &pem).unwrap();
        assert_eq!(k2.public_key().to_base64(), p.to_base64());
        let k3 = SigningKey::from_file_contents("rfc", &k.to_file_contents()).unwrap();
        assert_eq!(k3.public_key().to_base64(), p.to_base64());
    }

    /// A fixed vector: the canonical bytes and the signature of `price()` under the RFC key. HQ
    /// implementations can test against it (docs/KAFKA.md shows the same example).
    #[test]
    fn fixed_test_vector() {
        let seed: [u8; 32] = hex(RFC_SEED).try_into().unwrap();
        let k = SigningKey::from_seed("hq-2026-11", seed).unwrap();
        let seal = k.sign(&price(), T0, Some(T0 + 86_400_000));
        let c = canonical_bytes(&price(), &seal);
        let mut want = b"edge.sig/1\n".to_vec();
        for f in [
            Some(&b"hq-2026-11"[..]),
            Some(b"1790000000000"),
            Some(b"1790086400000"),
            Some(b"hq.prices"),
            None,
            Some(b"store-0001"),
            Some(PRICE),
        ] {
            match f {
                None => want.push(0),
                Some(v) => {
                    want.push(1);
                    want.extend_from_slice(&(v.len() as u32).to_be_bytes());
                    want.extend_from_slice(v);
                }
            }
        }
        assert_eq!(c, want);
        let headers = seal.headers();
        assert_eq!(
            headers,
            vec![
                (H_SIG, FIXED_SIG.to_string()),
                (H_SIG_KEY, "hq-2026-11".to_string()),
                (H_SIG_TS, "1790000000000".to_string()),
                (H_SIG_EXPIRES, "1790086400000".to_string()),
            ]
        );
        let v = Verifier::new(vec![
            PublicKey::from_base64("hq-2026-11", &B64.encode(hex(RFC_PUBLIC)), None).unwrap(),
        ]);
        let parsed = Seal::from_headers(headers.iter().map(|(k, v)| (*k, Some(v.as_bytes()))))
            .unwrap()
            .unwrap();
        assert_eq!(parsed, seal);
        let msg = SignedMessage {
            fields: price(),
            seal: &parsed,
        };
        assert_eq!(v.verify(&msg, T0 + 1).unwrap().as_str(), "hq-2026-11");
    }

    /// Cross-checked with OpenSSL: `openssl pkeyutl -sign -rawin` over the same canonical bytes.
    const FIXED_SIG: &str =
        "nST4urJJx0F84J9wTG0EJSZOpi5gXzoILIfJl/OoAPYq8oTBMibb4/yzWRYL1YUmLqalydhxQQg+7u8TJ7XtBg==";

    fn verifier(keys: &[&SigningKey]) -> Verifier {
        Verifier::new(keys.iter().map(|k| k.public_key()).collect())
    }

    fn check(
        v: &Verifier,
        fields: SignedFields<'_>,
        seal: &Seal,
        now: i64,
    ) -> Result<KeyId, SignatureError> {
        v.verify(&SignedMessage { fields, seal }, now)
    }

    #[test]
    fn a_good_signature_verifies_and_names_its_key() {
        let k = hq("hq-a", 1);
        let seal = k.sign(&price(), T0, None);
        assert_eq!(
            check(&verifier(&[&k]), price(), &seal, T0)
                .unwrap()
                .as_str(),
            "hq-a"
        );
    }

    #[test]
    fn a_forged_payload_is_refused() {
        let k = hq("hq-a", 1);
        let seal = k.sign(&price(), T0, None);
        let forged = SignedFields {
            payload: Some(br#"{"schema":"price/1","sku":"4006381333931","price_cents":1}"#),
            ..price()
        };
        let e = check(&verifier(&[&k]), forged, &seal, T0).unwrap_err();
        assert_eq!(e.reason(), "bad_signature", "{e}");
        // A tombstone instead of the payload, and a flipped signature bit.
        let tomb = SignedFields {
            payload: None,
            ..price()
        };
        assert_eq!(
            check(&verifier(&[&k]), tomb, &seal, T0)
                .unwrap_err()
                .reason(),
            "bad_signature"
        );
        let mut bent = seal.clone();
        bent.signature[10] ^= 1;
        assert_eq!(
            check(&verifier(&[&k]), price(), &bent, T0)
                .unwrap_err()
                .reason(),
            "bad_signature"
        );
    }

    #[test]
    fn a_signature_by_an_unknown_or_another_key_is_refused() {
        let hq_key = hq("hq-a", 1);
        let attacker = hq("hq-a", 2); // claims HQ's key id
        let other = hq("hq-x", 3);
        let v = verifier(&[&hq_key]);
        let e = check(&v, price(), &attacker.sign(&price(), T0, None), T0).unwrap_err();
        assert_eq!(e.reason(), "bad_signature", "{e}");
        let e = check(&v, price(), &other.sign(&price(), T0, None), T0).unwrap_err();
        assert_eq!(e, SignatureError::UnknownKey("hq-x".into()));
        // Relabelling a good signature with another configured key id fails too.
        let second = hq("hq-b", 4);
        let v2 = verifier(&[&hq_key, &second]);
        let mut relabelled = hq_key.sign(&price(), T0, None);
        relabelled.key_id = "hq-b".into();
        assert_eq!(
            check(&v2, price(), &relabelled, T0).unwrap_err().reason(),
            "bad_signature"
        );
        assert!(
            check(
                &Verifier::default(),
                price(),
                &hq_key.sign(&price(), T0, None),
                T0
            )
            .is_err()
        );
    }

    #[test]
    fn during_a_rotation_both_keys_verify_and_a_retired_key_stops() {
        let old = hq("hq-2026-05", 1);
        let new = hq("hq-2026-11", 2);
        let mut old_pub = old.public_key();
        old_pub.not_after_ms = Some(T0 + 1000);
        let v = Verifier::new(vec![old_pub, new.public_key()]);
        let by_old = old.sign(&price(), T0, None);
        let by_new = new.sign(&price(), T0, None);
        assert_eq!(
            check(&v, price(), &by_old, T0).unwrap().as_str(),
            "hq-2026-05"
        );
        assert_eq!(
            check(&v, price(), &by_new, T0).unwrap().as_str(),
            "hq-2026-11"
        );
        // After not_after the old key verifies nothing, even a record that claims an early time.
        let backdated = old.sign(&price(), T0 - 1_000_000, None);
        let e = check(&v, price(), &backdated, T0 + 1001).unwrap_err();
        assert_eq!(e.reason(), "key_retired", "{e}");
        assert!(check(&v, price(), &by_new, T0 + 1001).is_ok());
    }

    #[test]
    fn a_signature_replayed_onto_another_stream_store_or_key_is_refused() {
        let k = hq("hq-a", 1);
        let v = verifier(&[&k]);
        let seal = k.sign(&price(), T0, None);
        let moved = [
            SignedFields {
                stream: "hq.campaigns",
                ..price()
            },
            SignedFields {
                key: Some(b"store-0002"),
                ..price()
            },
            SignedFields {
                key: None,
                ..price()
            },
            SignedFields {
                key: Some(b""),
                ..price()
            },
            SignedFields {
                store: Some(b"*"),
                ..price()
            },
        ];
        for m in moved {
            let e = check(&v, m, &seal, T0).unwrap_err();
            assert_eq!(e.reason(), "bad_signature", "{m:?}: {e}");
        }
        // Field boundaries are part of the bytes: moving a byte from the key into the stream
        // changes the signed string.
        let a = SignedFields {
            stream: "hq.prices",
            key: Some(b"xy"),
            ..price()
        };
        let b = SignedFields {
            stream: "hq.pricesx",
            key: Some(b"y"),
            ..price()
        };
        let sa = k.sign(&a, T0, None);
        assert!(check(&v, b, &sa, T0).is_err());
    }

    #[test]
    fn an_expired_signature_is_refused_and_its_expiry_cannot_be_extended() {
        let k = hq("hq-a", 1);
        let v = verifier(&[&k]);
        let seal = k.sign(&price(), T0, Some(T0 + 60_000));
        assert!(check(&v, price(), &seal, T0 + 60_000).is_ok());
        let e = check(&v, price(), &seal, T0 + 60_001).unwrap_err();
        assert_eq!(e.reason(), "expired", "{e}");
        let mut extended = seal.clone();
        extended.expires_at_ms = Some(i64::MAX);
        assert_eq!(
            check(&v, price(), &extended, T0 + 60_001)
                .unwrap_err()
                .reason(),
            "bad_signature"
        );
        let mut dropped = seal;
        dropped.expires_at_ms = None;
        assert_eq!(
            check(&v, price(), &dropped, T0 + 60_001)
                .unwrap_err()
                .reason(),
            "bad_signature"
        );
    }

    type OwnedHeaders = Vec<(&'static str, Option<Vec<u8>>)>;

    #[test]
    fn seal_headers_parse_strictly() {
        let k = hq("hq-a", 1);
        let seal = k.sign(&price(), T0, Some(T0 + 5));
        let good = seal.headers();
        let as_refs = |h: &[(&'static str, String)]| -> Vec<(&'static str, Option<Vec<u8>>)> {
            h.iter()
                .map(|(k, v)| (*k, Some(v.as_bytes().to_vec())))
                .collect()
        };
        let parse = |h: &[(&'static str, Option<Vec<u8>>)]| {
            Seal::from_headers(h.iter().map(|(k, v)| (*k, v.as_deref())))
        };
        assert_eq!(parse(&as_refs(&good)).unwrap(), Some(seal.clone()));
        assert_eq!(parse(&[("edge.store", Some(b"x".to_vec()))]).unwrap(), None);
        let mut cases: Vec<OwnedHeaders> = Vec::new();
        let mut twice = as_refs(&good);
        twice.push((H_SIG_KEY, Some(b"hq-b".to_vec())));
        cases.push(twice);
        cases.push(as_refs(&good[1..])); // no edge.sig
        cases.push(as_refs(&[good[0].clone(), good[2].clone()])); // no key id
        cases.push(as_refs(&good[..2])); // no timestamp
        for (i, bad) in [
            (0, "not base64!"),
            (0, "AAAA"),
            (1, "hq a"),
            (1, ""),
            (2, "+1790000000000"),
            (2, "01790000000000"),
            (2, "-1"),
            (2, "99999999999999999999"),
            (3, "soon"),
        ] {
            let mut h = as_refs(&good);
            h[i].1 = Some(bad.as_bytes().to_vec());
            cases.push(h);
        }
        let mut none = as_refs(&good);
        none[0].1 = None;
        cases.push(none);
        let mut latin1 = as_refs(&good);
        latin1[1].1 = Some(vec![0xe9]);
        cases.push(latin1);
        for c in cases {
            let e = parse(&c).unwrap_err();
            assert_eq!(e.reason(), "malformed_signature", "{c:?}: {e}");
        }
    }

    #[test]
    fn public_keys_are_checked() {
        let k = hq("hq-a", 1).public_key();
        assert!(PublicKey::from_base64("hq-a", &k.to_base64(), None).is_ok());
        assert!(PublicKey::from_base64("hq a", &k.to_base64(), None).is_err());
        assert!(PublicKey::from_base64("hq-a", "bm90IGEga2V5", None).is_err());
        assert!(PublicKey::from_base64("hq-a", "%%%", None).is_err());
        // The identity point is a weak key: every signature would be easy to forge.
        let mut identity = [0u8; 32];
        identity[0] = 1;
        assert!(PublicKey::from_base64("hq-a", &B64.encode(identity), None).is_err());
        assert!(SigningKey::from_file_contents("hq-a", "c2hvcnQ=").is_err());
    }
}
