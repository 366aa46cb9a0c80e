//! Security against a real broker with SASL_SSL (SCRAM) and SSL with client certificates:
//! mirroring works over SCRAM + TLS and over mTLS; wrong credentials show up as one clear status
//! and a handful of log lines, while records keep buffering in the local log; `edge-agent doctor`
//! tells good credentials from refused ones and a wrong CA.

#![allow(clippy::unwrap_used)] // test code: a failed set-up step should fail the test loudly

use edge_sync::kafka::client::LinkTrouble;
use edge_sync::kafka::{DeliveryMode, SaslMechanism, SecurityConfig, SecurityProtocol, probe};
use edge_tests::kafka::{
    HqConsumer, KafkaBroker, Store, append, check_exactly_once, private_config, wait_until_async,
};
use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

fn broker() -> &'static KafkaBroker {
    static B: OnceLock<KafkaBroker> = OnceLock::new();
    B.get_or_init(KafkaBroker::start_secure)
}

/// Log lines written by the components (captured once per test binary).
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn captured_logs() -> &'static Captured {
    static C: OnceLock<Captured> = OnceLock::new();
    C.get_or_init(|| {
        let c = Captured::default();
        let w = c.clone();
        tracing_subscriber::fmt()
            .with_writer(move || w.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::INFO)
            .init();
        c
    })
}

fn write_secret(dir: &std::path::Path, name: &str, value: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, format!("{value}\n")).unwrap();
    p
}

async fn mirrors_over(security: SecurityConfig, bootstrap: String) {
    let b = broker();
    let mut cfg = private_config(b, DeliveryMode::ExactlyOnce);
    cfg.brokers = vec![bootstrap];
    cfg.security = security;
    let mut store = Store::open();
    let s = "pos.transactions";
    append(&*store.log, s, 0..1000).await;
    store.start_uplink(cfg.clone());
    let topic = cfg.topic(&store.id, s);
    // HQ reads over the plaintext listener: an independent path.
    let mut hq = HqConsumer::new(&b.bootstrap(), &[&topic], true);
    assert_eq!(
        hq.wait_for_count(&topic, 1000, Duration::from_secs(60)),
        1000,
        "uplink status: {}",
        store.detail("uplink")
    );
    hq.poll_for(Duration::from_secs(1));
    check_exactly_once(&hq.on(&topic), &store.id, s, 1000).unwrap();
    store.stop_components().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scram_and_plain_over_tls_mirror() {
    captured_logs();
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    let pw = write_secret(dir.path(), "pw", b.var("SASL_PASSWORD"));
    for mech in [
        SaslMechanism::ScramSha512,
        SaslMechanism::ScramSha256,
        SaslMechanism::Plain,
    ] {
        mirrors_over(
            SecurityConfig {
                protocol: SecurityProtocol::SaslSsl,
                ca_file: Some(b.var("CA_PEM").into()),
                sasl_mechanism: Some(mech),
                username: Some(b.var("SASL_USER").into()),
                password_file: Some(pw.clone()),
                ..Default::default()
            },
            b.var("SASL_SSL_BOOTSTRAP").to_string(),
        )
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_mirrors() {
    captured_logs();
    let b = broker();
    mirrors_over(
        SecurityConfig {
            protocol: SecurityProtocol::Ssl,
            ca_file: Some(b.var("CA_PEM").into()),
            cert_file: Some(b.var("CLIENT_CERT_PEM").into()),
            key_file: Some(b.var("CLIENT_KEY_PEM").into()),
            ..Default::default()
        },
        b.var("SSL_BOOTSTRAP").to_string(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_credentials_are_one_clear_status_while_records_keep_buffering() {
    let logs = captured_logs();
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    let secret = "definitely-not-the-password";
    let pw = write_secret(dir.path(), "pw", secret);
    let mut cfg = private_config(b, DeliveryMode::ExactlyOnce);
    cfg.brokers = vec![b.var("SASL_SSL_BOOTSTRAP").to_string()];
    cfg.security = SecurityConfig {
        protocol: SecurityProtocol::SaslSsl,
        ca_file: Some(b.var("CA_PEM").into()),
        sasl_mechanism: Some(SaslMechanism::ScramSha512),
        username: Some(b.var("SASL_USER").into()),
        password_file: Some(pw),
        ..Default::default()
    };
    let mut store = Store::open();
    let s = "pos.transactions";
    append(&*store.log, s, 0..100).await;
    store.start_uplink(cfg.clone());
    let st = &store;
    wait_until_async(
        "status to report refused credentials",
        Duration::from_secs(30),
        || async move { (st.field("uplink", "link") == "auth_failed").then_some(()) },
    )
    .await;
    let detail = store.detail("uplink");
    assert!(detail.starts_with("down:"), "{detail}");
    assert!(
        detail.contains("refused this store's credentials"),
        "{detail}"
    );
    assert!(
        detail.contains("password_file"),
        "says what to check: {detail}"
    );
    assert!(
        detail.contains("buffering"),
        "says what happens meanwhile: {detail}"
    );

    let before = logs.0.lock().unwrap().len();
    // Records keep buffering meanwhile; nothing is marked mirrored.
    append(&*store.log, s, 100..600).await;
    tokio::time::sleep(Duration::from_secs(15)).await;
    let st = &store;
    wait_until_async(
        "the backlog in status",
        Duration::from_secs(10),
        || async move { (st.field("uplink", "backlog_records") == 600).then_some(()) },
    )
    .await;
    assert_eq!(store.cursor(s).await, 1);
    assert_eq!(store.field("uplink", "link"), "auth_failed");

    let text = String::from_utf8_lossy(&logs.0.lock().unwrap()[before..]).into_owned();
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("uplink")).collect();
    assert!(
        lines.len() <= 4,
        "15 s of refused credentials should log a few lines, not a loop:\n{}",
        lines.join("\n")
    );
    let all = String::from_utf8_lossy(&logs.0.lock().unwrap()).into_owned();
    assert!(!all.contains(secret), "the password never reaches the log");
    assert!(!all.contains("panicked"), "no stack traces");
    store.stop_components().await;
}

/// `edge-agent doctor --json` on a config whose `[kafka]` section uses SCRAM over TLS with the
/// password in `pw`; returns the exit status success and the kafka findings.
fn doctor_kafka(
    dir: &std::path::Path,
    pw: &std::path::Path,
    ca: &str,
) -> (bool, Vec<serde_json::Value>) {
    let b = broker();
    let cfg = dir.join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"[agent]
store_id = "doctor-store"
data_dir = "{data}"
[mqtt]
enabled = false
[http]
enabled = false
[kafka]
brokers = ["{bootstrap}"]
[kafka.security]
protocol = "sasl_ssl"
ca_file = "{ca}"
sasl_mechanism = "SCRAM-SHA-512"
username = "{user}"
password_file = "{pw}"
"#,
            data = dir.join("data").display(),
            bootstrap = b.var("SASL_SSL_BOOTSTRAP"),
            user = b.var("SASL_USER"),
            pw = pw.display(),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(edge_tests::agent_bin!())
        .args(["doctor", "--json", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let findings: Vec<serde_json::Value> =
        serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("doctor --json: {e}: {stdout}"));
    let kafka = findings
        .into_iter()
        .filter(|f| f["check"] == "kafka")
        .collect();
    (out.status.success(), kafka)
}

#[test]
fn doctor_tells_good_credentials_from_refused_ones_and_a_wrong_ca() {
    let b = broker();
    let dir = tempfile::tempdir().unwrap();
    let good = write_secret(dir.path(), "good", b.var("SASL_PASSWORD"));
    let secret = "definitely-not-the-password";
    let bad = write_secret(dir.path(), "bad", secret);

    let (_, ok) = doctor_kafka(dir.path(), &good, b.var("CA_PEM"));
    let handshake = ok
        .iter()
        .find(|f| f["summary"].as_str().unwrap().starts_with("HQ Kafka"))
        .unwrap_or_else(|| panic!("no handshake finding: {ok:?}"));
    assert_eq!(handshake["level"], "ok", "{handshake}");
    assert!(
        handshake["summary"]
            .as_str()
            .unwrap()
            .contains("sasl_ssl as"),
        "{handshake}"
    );

    let (success, refused) = doctor_kafka(dir.path(), &bad, b.var("CA_PEM"));
    assert!(!success, "doctor exits non-zero when HQ refuses the store");
    let f = refused
        .iter()
        .find(|f| f["level"] == "fail")
        .unwrap_or_else(|| panic!("no failing kafka finding: {refused:?}"));
    let summary = f["summary"].as_str().unwrap();
    eprintln!("doctor on refused credentials: {summary}");
    assert!(summary.contains("auth_failed"), "{f}");
    assert!(
        f["advice"].as_str().unwrap().contains("password_file"),
        "says what to check: {f}"
    );
    assert!(
        !serde_json::to_string(&refused).unwrap().contains(secret),
        "the password never reaches the output"
    );

    // A CA that did not sign the broker's certificate: a TLS failure, not "unreachable".
    let other_ca = dir.path().join("other-ca.pem");
    let st = std::process::Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=not-hq",
        ])
        .arg("-keyout")
        .arg(dir.path().join("other-ca.key"))
        .arg("-out")
        .arg(&other_ca)
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let cfg = edge_sync::kafka::KafkaConfig {
        brokers: vec![b.var("SASL_SSL_BOOTSTRAP").to_string()],
        security: SecurityConfig {
            protocol: SecurityProtocol::SaslSsl,
            ca_file: Some(other_ca),
            sasl_mechanism: Some(SaslMechanism::ScramSha512),
            username: Some(b.var("SASL_USER").into()),
            password_file: Some(good),
            ..Default::default()
        },
        ..Default::default()
    };
    match probe(&cfg, Duration::from_secs(5)) {
        Err(edge_sync::kafka::ProbeError::Link { trouble, message }) => {
            assert_eq!(trouble, LinkTrouble::Tls, "{message}")
        }
        other => panic!("expected a TLS failure, got {other:?}"),
    }
}
