//! A real Mosquitto broker per test, configured with the tuning file the package ships
//! (`packaging/mosquitto/edge-agent-tuning.conf`) plus a loopback listener on a free port.

use crate::{free_port, require_program, wait_for};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct Mosquitto {
    pub port: u16,
    dir: tempfile::TempDir,
    conf: PathBuf,
    child: Option<Child>,
}

/// Extra listener settings (TLS, authentication) appended to the test config.
#[derive(Default, Clone)]
pub struct Listener {
    pub lines: Vec<String>,
}

pub fn tuning_conf() -> String {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../packaging/mosquitto/edge-agent-tuning.conf");
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("cannot read {}: {e}", p.display()))
}

impl Mosquitto {
    pub fn start() -> Mosquitto {
        Self::start_with(Listener {
            lines: vec!["allow_anonymous true".into()],
        })
    }

    pub fn start_with(listener: Listener) -> Mosquitto {
        require_program("mosquitto", "mosquitto");
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        let mut text = tuning_conf();
        text.push_str(&format!(
            "\n# test harness\nuser root\npersistence_location {}/\nlog_dest file {}/mosquitto.log\nlog_type error\nlog_type warning\nlog_type notice\nlistener {port} 127.0.0.1\n",
            dir.path().display(),
            dir.path().display()
        ));
        for l in &listener.lines {
            text.push_str(l);
            text.push('\n');
        }
        std::fs::write(&conf, text).expect("write mosquitto.conf");
        let mut m = Mosquitto {
            port,
            dir,
            conf,
            child: None,
        };
        m.spawn();
        m
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn spawn(&mut self) {
        let child = Command::new(require_program("mosquitto", "mosquitto"))
            .arg("-c")
            .arg(&self.conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start mosquitto");
        self.child = Some(child);
        let port = self.port;
        let log = self.dir.path().join("mosquitto.log");
        wait_for(
            "mosquitto to accept connections",
            Duration::from_secs(10),
            || std::net::TcpStream::connect(("127.0.0.1", port)).is_ok(),
        );
        let _ = log;
    }

    /// Clean stop (SIGTERM): Mosquitto saves sessions and queued messages.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
            let _ = c.wait();
        }
    }

    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("mosquitto.log")).unwrap_or_default()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Publishes each of `lines` as one message to `topic` with `mosquitto_pub -l` (an independent
/// client) at QoS `qos`, and waits for it to finish.
pub fn publish_lines<L: std::fmt::Display>(port: u16, qos: u8, topic: &str, lines: &[L]) {
    use std::io::Write;
    let mut child = Command::new(require_program("mosquitto_pub", "mosquitto-clients"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(["-q", &qos.to_string(), "-t", topic, "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("start mosquitto_pub");
    let mut stdin = child.stdin.take().expect("mosquitto_pub stdin");
    for l in lines {
        writeln!(stdin, "{l}").expect("write to mosquitto_pub");
    }
    drop(stdin);
    assert!(
        child.wait().expect("mosquitto_pub").success(),
        "mosquitto_pub {topic}"
    );
}
