//! HQ's side of signed downlink records (`edge-agent keygen`, `edge-agent sign`): file handling and
//! output around `edge_core::signing`, which holds the format. Stores never need a private key;
//! this runs where HQ publishes (see docs/KAFKA.md, "Signed downlink records").

use anyhow::{Context, bail};
use edge_core::signing::{H_SIG_EXPIRES, SignedFields, SigningKey};
use std::io::{Read, Write};
use std::path::Path;
use std::time::Duration;

/// Creates a new key (32 bytes from the OS random source) in `key_file`, readable by its owner
/// only; refuses to overwrite a file. Returns the `[[kafka.downlink.keys]]` entry for the stores.
pub fn keygen(key_id: &str, key_file: &Path) -> anyhow::Result<String> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| anyhow::anyhow!("no OS randomness: {e}"))?;
    let key = SigningKey::from_seed(key_id, seed).map_err(|e| anyhow::anyhow!("--key-id: {e}"))?;
    let mut f = open_private(key_file)
        .with_context(|| format!("cannot create the key file {}", key_file.display()))?;
    f.write_all(key.to_file_contents().as_bytes())
        .and_then(|()| f.sync_all())
        .with_context(|| format!("cannot write the key file {}", key_file.display()))?;
    Ok(store_config(&key))
}

#[cfg(unix)]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

#[cfg(not(unix))]
fn open_private(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
}

/// The config entry that makes stores trust `key`.
pub fn store_config(key: &SigningKey) -> String {
    format!(
        "# HQ signing key {id}: add to every store's config (several keys may be listed while they rotate)\n\
         [[kafka.downlink.keys]]\n\
         id = \"{id}\"\n\
         public_key = \"{public}\"\n\
         # not_after = \"2027-12-31T00:00:00Z\"   # optional: the key verifies nothing after this\n",
        id = key.id(),
        public = key.public_key().to_base64()
    )
}

/// Reads a key file written by `keygen` or by `openssl genpkey -algorithm ed25519`.
pub fn load_key(key_id: &str, key_file: &Path) -> anyhow::Result<SigningKey> {
    let text = std::fs::read_to_string(key_file)
        .with_context(|| format!("cannot read the key file {}", key_file.display()))?;
    SigningKey::from_file_contents(key_id, &text)
        .map_err(|e| anyhow::anyhow!("the key file {} {e}", key_file.display()))
}

/// What to sign.
#[derive(Debug, Clone)]
pub struct Request<'a> {
    /// The local stream the record is for (`hq.prices`, `hq.commands`, ...).
    pub stream: &'a str,
    /// The record key (`None`: a null key).
    pub key: Option<&'a str>,
    /// The `edge.store` header, if the record carries one (it is signed and must be sent as is).
    pub store: Option<&'a str>,
    /// The payload (`None`: a tombstone).
    pub payload: Option<&'a [u8]>,
    pub expires_in: Option<Duration>,
}

/// The headers HQ sends with the record: `edge.store` (when given) and the signature headers.
pub fn sign(
    key: &SigningKey,
    req: &Request<'_>,
    now_ms: i64,
) -> anyhow::Result<Vec<(&'static str, String)>> {
    if let Err(e) = edge_core::config::check_stream_name(req.stream) {
        bail!("--stream: {e}");
    }
    let expires = match req.expires_in {
        None => None,
        Some(d) => Some(
            i64::try_from(d.as_millis())
                .ok()
                .and_then(|d| now_ms.checked_add(d))
                .ok_or_else(|| anyhow::anyhow!("--expires-in is too long for {H_SIG_EXPIRES}"))?,
        ),
    };
    let fields = SignedFields {
        stream: req.stream,
        store: req.store.map(str::as_bytes),
        key: req.key.map(str::as_bytes),
        payload: req.payload,
    };
    let mut headers = Vec::new();
    if let Some(s) = req.store {
        headers.push((edge_core::downlink::H_STORE, s.to_string()));
    }
    headers.extend(key.sign(&fields, now_ms, expires).headers());
    Ok(headers)
}

/// Reads a payload file (`-`: standard input).
pub fn read_payload(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut buf = Vec::new();
    if path == Path::new("-") {
        std::io::stdin()
            .read_to_end(&mut buf)
            .context("cannot read the payload from standard input")?;
    } else {
        buf = std::fs::read(path)
            .with_context(|| format!("cannot read the payload file {}", path.display()))?;
    }
    Ok(buf)
}

/// `name=value` lines (kcat's `-H` syntax).
pub fn render_lines(headers: &[(&'static str, String)]) -> String {
    headers.iter().map(|(k, v)| format!("{k}={v}\n")).collect()
}

/// One JSON object.
pub fn render_json(headers: &[(&'static str, String)]) -> String {
    let m: serde_json::Map<String, serde_json::Value> = headers
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str())))
        .collect();
    format!("{}\n", serde_json::Value::Object(m))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use edge_core::downlink::{Admission, Incoming, TopicPolicy, admit};
    use edge_core::signing::{PublicKey, Verifier};

    /// What the tool prints is what a store accepts: keygen's config entry verifies sign's
    /// headers, and a changed payload does not.
    #[test]
    fn keygen_then_sign_verifies_at_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("hq.key");
        let entry = keygen("hq-2026-11", &file).unwrap();
        assert!(
            keygen("hq-2026-11", &file).is_err(),
            "an existing key file is kept"
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&file).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let cfg: toml::Value = toml::from_str(&entry).unwrap();
        let k = &cfg["kafka"]["downlink"]["keys"][0];
        assert_eq!(k["id"].as_str(), Some("hq-2026-11"));
        let public =
            PublicKey::from_base64("hq-2026-11", k["public_key"].as_str().unwrap(), None).unwrap();
        let key = load_key("hq-2026-11", &file).unwrap();
        let payload = br#"{"schema":"edge.command/1","command":"remirror","stream":"pos.scans","from_seq":9}"#;
        let now = 1_790_000_000_000;
        let headers = sign(
            &key,
            &Request {
                stream: "hq.commands",
                key: Some("store-7"),
                store: Some("store-7"),
                payload: Some(payload),
                expires_in: Some(Duration::from_secs(3600)),
            },
            now,
        )
        .unwrap();
        let lines = render_lines(&headers);
        assert!(
            lines.starts_with("edge.store=store-7\nedge.sig="),
            "{lines}"
        );
        assert!(
            lines.contains("edge.sig.expires=1790003600000\n"),
            "{lines}"
        );
        let json: serde_json::Value = serde_json::from_str(&render_json(&headers)).unwrap();
        assert_eq!(json["edge.sig.key"], "hq-2026-11");
        let raw: Vec<(&str, Option<&[u8]>)> = headers
            .iter()
            .map(|(k, v)| (*k, Some(v.as_bytes())))
            .collect();
        let policy = TopicPolicy {
            stream: "hq.commands".into(),
            require_signature: true,
            commands: true,
        };
        let v = Verifier::new(vec![public]);
        let rec = |p: &'static [u8]| Incoming {
            key: Some(b"store-7"),
            payload: Some(p),
            headers: &raw,
        };
        assert!(matches!(
            admit("store-7", &policy, &v, &rec(payload), now + 1),
            Admission::Apply { signed_by: Some(_) }
        ));
        let other: &'static [u8] = br#"{"schema":"edge.command/1","command":"remirror","stream":"pos.scans","from_seq":1}"#;
        assert!(matches!(
            admit("store-7", &policy, &v, &rec(other), now + 1),
            Admission::Refuse(_)
        ));
        assert!(matches!(
            admit("store-7", &policy, &v, &rec(payload), now + 3_600_001),
            Admission::Refuse(_)
        ));
    }

    #[test]
    fn bad_inputs_are_refused_with_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        assert!(keygen("hq key", &dir.path().join("a")).is_err());
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "not a key").unwrap();
        let e = load_key("hq-1", &junk).unwrap_err().to_string();
        assert!(e.contains("is not an ed25519 private key"), "{e}");
        let key = SigningKey::from_seed("hq-1", [1; 32]).unwrap();
        let req = Request {
            stream: "HQ/prices",
            key: None,
            store: None,
            payload: None,
            expires_in: None,
        };
        assert!(sign(&key, &req, 0).is_err());
    }
}
