//! MQTT egress (retained, from durable cursors, across restarts) and the broker connection's
//! security (TLS with a private CA, username/password from a file, wrong credentials).

#![allow(clippy::unwrap_used)] // test code: a failed set-up step should fail the test loudly

use edge_tests::agent::{Agent, base_config, wait_records};
use edge_tests::mosquitto::{Listener, Mosquitto};
use edge_tests::{agent_bin, require_program, wait_for};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn mosquitto_pub(port: u16, topic: &str, payload: &str, extra: &[&str]) {
    let st = Command::new("mosquitto_pub")
        .args([
            "-p",
            &port.to_string(),
            "-q",
            "1",
            "-t",
            topic,
            "-m",
            payload,
        ])
        .args(extra)
        .status()
        .expect("mosquitto_pub");
    assert!(st.success());
}

/// Retained messages a fresh subscriber gets at once (topic -> payload).
fn retained(port: u16, filter: &str, expect: usize) -> Vec<(String, String)> {
    let out = Command::new("mosquitto_sub")
        .args([
            "-p",
            &port.to_string(),
            "-t",
            filter,
            "-v",
            "-C",
            &expect.to_string(),
            "-W",
            "10",
        ])
        .output()
        .expect("mosquitto_sub");
    let mut v: Vec<(String, String)> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            l.split_once(' ')
                .map(|(a, b)| (a.to_string(), b.to_string()))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn prices_are_republished_retained_once_from_a_durable_cursor() {
    let mut broker = Mosquitto::start();
    let extra = r#"
[[mqtt.ingress]]
topic = "hq/prices/{sku}"
stream = "hq.prices"

[[mqtt.egress]]
stream = "hq.prices"
topic = "store/{store}/prices/{key}"
retain = true
"#;
    let mut agent = Agent::start_with(agent_bin!(), broker.port, extra);
    // A live subscriber counts every egress publish across agent and broker restarts.
    let live = Command::new("mosquitto_sub")
        .args([
            "-p",
            &broker.port.to_string(),
            "-q",
            "1",
            "-i",
            "kiosk-1",
            "-c",
            "-t",
            "store/+/prices/#",
            "-v",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for("kiosk subscribed", Duration::from_secs(10), || {
        broker.log().contains("as kiosk-1")
    });
    mosquitto_pub(
        broker.port,
        "hq/prices/4011",
        r#"{"event_id":"p1","sku":"4011","price_minor":59}"#,
        &[],
    );
    mosquitto_pub(
        broker.port,
        "hq/prices/4011",
        r#"{"event_id":"p2","sku":"4011","price_minor":55}"#,
        &[],
    );
    mosquitto_pub(
        broker.port,
        "hq/prices/3000",
        r#"{"event_id":"p3","sku":"3000","price_minor":199}"#,
        &[],
    );
    wait_records(&agent, "hq.prices", 3, Duration::from_secs(20));
    wait_for("egress cursor at the head", Duration::from_secs(20), || {
        agent.status()["streams"][0]["cursors"]["mqtt.egress.hq.prices"]["backlog"] == 0
    });
    // A kiosk that connects later gets the latest price per SKU at once (retained).
    let r = retained(broker.port, "store/test-store/prices/#", 2);
    assert_eq!(
        r,
        vec![
            (
                "store/test-store/prices/3000".to_string(),
                r#"{"event_id":"p3","sku":"3000","price_minor":199}"#.to_string()
            ),
            (
                "store/test-store/prices/4011".to_string(),
                r#"{"event_id":"p2","sku":"4011","price_minor":55}"#.to_string()
            ),
        ]
    );
    // Restarting the agent and the broker neither loses the retained prices nor republishes.
    let (st, _) = agent.sigterm();
    assert!(st.success());
    broker.restart();
    agent.spawn();
    mosquitto_pub(
        broker.port,
        "hq/prices/3000",
        r#"{"event_id":"p4","sku":"3000","price_minor":189}"#,
        &[],
    );
    wait_records(&agent, "hq.prices", 4, Duration::from_secs(20));
    wait_for("egress cursor at the head", Duration::from_secs(20), || {
        agent.status()["streams"][0]["cursors"]["mqtt.egress.hq.prices"]["backlog"] == 0
    });
    let r = retained(broker.port, "store/test-store/prices/#", 2);
    assert_eq!(
        r[0].1,
        r#"{"event_id":"p4","sku":"3000","price_minor":189}"#
    );
    assert_eq!(r[1].1, r#"{"event_id":"p2","sku":"4011","price_minor":55}"#);
    // The kiosk's persistent session was cut by the broker restart; count what it saw live
    // before that: each of p1..p3 exactly once.
    let mut live = live;
    let _ = live.kill();
    let out = live.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&out.stdout).to_string();
    for id in ["p1", "p2", "p3"] {
        assert_eq!(
            seen.matches(&format!("\"event_id\":\"{id}\"")).count(),
            1,
            "{id} once in:\n{seen}"
        );
    }
}

fn openssl(args: &[&str], dir: &Path) {
    let out = Command::new(require_program("openssl", "openssl"))
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A private CA and a server certificate for `localhost`.
fn make_certs(dir: &Path) {
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=edge-test-ca",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        dir,
    );
    openssl(
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
        dir,
    );
    std::fs::write(
        dir.join("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
    )
    .unwrap();
    openssl(
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            "ext.cnf",
            "-out",
            "server.pem",
        ],
        dir,
    );
}

#[test]
fn tls_and_password_authentication_work_and_wrong_credentials_are_reported() {
    let pki = tempfile::tempdir().unwrap();
    make_certs(pki.path());
    let passwd = pki.path().join("passwd");
    let st = Command::new(require_program("mosquitto_passwd", "mosquitto"))
        .args(["-b", "-c"])
        .arg(&passwd)
        .args(["edge-agent", "s3cret-pass"])
        .status()
        .unwrap();
    assert!(st.success());
    let p = |f: &str| pki.path().join(f).display().to_string();
    let broker = Mosquitto::start_with(Listener {
        lines: vec![
            format!("cafile {}", p("ca.pem")),
            format!("certfile {}", p("server.pem")),
            format!("keyfile {}", p("server.key")),
            "allow_anonymous false".into(),
            format!("password_file {}", passwd.display()),
        ],
    });
    std::fs::write(pki.path().join("good"), "s3cret-pass\n").unwrap();
    std::fs::write(pki.path().join("bad"), "wrong\n").unwrap();
    let cfg = |secret: &str| {
        base_config(Path::new("{data_dir}"), broker.port, 0)
            .replace("listen = \"127.0.0.1:0\"", "listen = \"127.0.0.1:{http_port}\"")
            .replace("host = \"127.0.0.1\"", "host = \"localhost\"")
            .replace(
                "[http]",
                &format!(
                    "username = \"edge-agent\"\npassword_file = \"{}\"\n\n[mqtt.tls]\nca_file = \"{}\"\n\n[[mqtt.ingress]]\ntopic = \"secure/{{device}}\"\nstream = \"pos.transactions\"\n\n[http]",
                    pki.path().join(secret).display(),
                    p("ca.pem")
                ),
            )
    };
    let agent = Agent::start(agent_bin!(), &cfg("good"));
    wait_for("mqtt up over TLS", Duration::from_secs(20), || {
        agent.status()["components"]["mqtt"]["state"] == "up"
    });
    mosquitto_pub(
        broker.port,
        "secure/lane-1",
        r#"{"event_id":"tls-1"}"#,
        &[
            "--cafile",
            &p("ca.pem"),
            "-h",
            "localhost",
            "-u",
            "edge-agent",
            "-P",
            "s3cret-pass",
        ],
    );
    wait_records(&agent, "pos.transactions", 1, Duration::from_secs(20));

    let mut wrong = Agent::start(agent_bin!(), &cfg("bad"));
    wait_for("mqtt down with a reason", Duration::from_secs(20), || {
        wrong.status()["components"]["mqtt"]["state"] == "down"
    });
    let detail = wrong.status()["components"]["mqtt"]["detail"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(detail.contains("localhost"), "names the broker: {detail}");
    assert!(
        detail.contains("refused the connection (NotAuthorized)")
            && detail.contains("mqtt.password_file"),
        "says the broker refused us and what to check: {detail}"
    );
    assert!(
        !wrong.log().contains("wrong"),
        "the password never appears in the log"
    );
    assert!(
        !agent.log().contains("s3cret-pass"),
        "the password never appears in the log"
    );
    assert!(
        wrong.is_running(),
        "wrong credentials do not crash the agent"
    );
    // The agent keeps working locally (its own streams) while the broker refuses it.
    assert_eq!(wrong.status()["daemon_running"], true);
}
