//! A real Apache Kafka broker for tests (single-node KRaft, started by `scripts/kafka.sh` with the
//! machine's Java 17 on free loopback ports, killed on drop), an independent `read_committed`
//! consumer, `kcat`, and a harness that runs the uplink/downlink as tasks against a real
//! `SqliteLog`.
//!
//! Missing Java, kcat or the broker jars is a test failure with the command that fixes it, never a
//! skip (`scripts/install-deps.sh`, `scripts/kafka.sh fetch`).

use edge_core::Event;
use edge_core::component::{ComponentContext, ComponentError};
use edge_core::log::{AppendRequest, Log};
use edge_core::{Shutdown, Status};
use edge_sync::kafka::{DeliveryMode, Downlink, KafkaConfig, Uplink};
use edge_sync::log::{LogConfig, SqliteLog};
use rdkafka::ClientConfig;
use rdkafka::Message;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Headers;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Path of `scripts/kafka.sh` in this checkout.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("scripts")
        .join("kafka.sh")
}

fn require(program: &str, how: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok,
        "{program} is required by the Kafka tests: {how} (this is a failure, not a skip{})",
        if std::env::var_os("CI").is_some() {
            ", CI is set"
        } else {
            ""
        }
    );
}

/// A broker process started from a directory; the directory keeps its config, data and ports
/// across stop/start.
pub struct KafkaBroker {
    dir: tempfile::TempDir,
    secure: bool,
    env: HashMap<String, String>,
    pid: Option<i32>,
}

impl KafkaBroker {
    /// Starts a plaintext broker on free ports.
    pub fn start() -> KafkaBroker {
        Self::start_with(false)
    }

    /// Starts a broker that also listens with SASL_SSL (SCRAM-SHA-256/512, PLAIN) and with SSL
    /// requiring client certificates. Certificates are generated with openssl.
    pub fn start_secure() -> KafkaBroker {
        Self::start_with(true)
    }

    fn start_with(secure: bool) -> KafkaBroker {
        require("java", "install Java 17 (scripts/install-deps.sh)");
        require("kcat", "install kcat (scripts/install-deps.sh)");
        // Ports are picked free and then bound by the JVM a moment later; another process can take
        // one in between. A first start that lost that race is retried with new ports.
        for attempt in 1..=3 {
            let dir = tempfile::Builder::new()
                .prefix("edge-kafka-")
                .tempdir()
                .expect("temp dir for the broker");
            let mut b = KafkaBroker {
                dir,
                secure,
                env: HashMap::new(),
                pid: None,
            };
            match b.try_launch() {
                Ok(()) => return b,
                Err(e) if attempt < 3 && e.contains("Address already in use") => {
                    eprintln!(
                        "kafka harness: a port was taken during start-up; retrying with new ports"
                    );
                }
                Err(e) => panic!("{e}"),
            }
        }
        unreachable!("the loop returns or panics")
    }

    fn launch(&mut self) {
        if let Err(e) = self.try_launch() {
            panic!("{e}");
        }
    }

    fn try_launch(&mut self) -> Result<(), String> {
        let mut cmd = Command::new("bash");
        cmd.arg(script())
            .arg("start")
            .arg(self.dir.path())
            .arg("--owner-pid")
            .arg(std::process::id().to_string());
        if self.secure {
            cmd.arg("--secure");
        }
        let out = cmd.output().expect("run scripts/kafka.sh");
        if !out.status.success() {
            let server_log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            return Err(format!(
                "scripts/kafka.sh start failed:\n{}\n{}\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                server_log
                    .lines()
                    .rev()
                    .take(20)
                    .collect::<Vec<_>>()
                    .join("\n")
            ));
        }
        self.env = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.pid = self.env.get("PID").and_then(|p| p.parse().ok());
        Ok(())
    }

    /// `host:port` of the plaintext listener.
    pub fn bootstrap(&self) -> String {
        self.var("BOOTSTRAP").to_string()
    }

    /// A value from the broker's `broker.env` (SASL_SSL_BOOTSTRAP, CA_PEM, ...).
    pub fn var(&self, key: &str) -> &str {
        self.env
            .get(key)
            .map(String::as_str)
            .unwrap_or_else(|| panic!("broker.env has no {key}"))
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the broker: SIGTERM (controlled shutdown) or, with `kill`, SIGKILL.
    pub fn stop(&mut self, kill: bool) {
        let mut cmd = Command::new("bash");
        cmd.arg(script()).arg("stop").arg(self.dir.path());
        if kill {
            cmd.arg("--kill");
        }
        let out = cmd.output().expect("run scripts/kafka.sh stop");
        assert!(out.status.success(), "scripts/kafka.sh stop failed");
        self.pid = None;
    }

    /// Starts the stopped broker again on the same ports with the same data; returns when it
    /// answers.
    pub fn restart(&mut self) {
        self.launch();
    }

    /// Client properties for the plaintext listener.
    pub fn client_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", self.bootstrap());
        c
    }

    /// An uplink/downlink config for this broker (plaintext), fast-reacting for tests.
    pub fn kafka_config(&self) -> KafkaConfig {
        KafkaConfig {
            brokers: vec![self.bootstrap()],
            topic_partitions: 1,
            heartbeat_interval_ms: 2000,
            ..KafkaConfig::default()
        }
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// One broker shared by the tests of a test binary that do not stop it (they use random topic and
/// store names). Killed by the script's watchdog when the test process exits.
pub fn shared_broker() -> &'static KafkaBroker {
    static B: OnceLock<KafkaBroker> = OnceLock::new();
    B.get_or_init(KafkaBroker::start)
}

/// A random name part for topics, stores and streams.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{:08x}", fastrand::u32(..))
}

/// Polls `cond` until it returns `Some` or `timeout` passes (then panics naming `what`).
pub fn wait_until<T>(what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Async variant of [`wait_until`].
pub async fn wait_until_async<T, F, Fut>(what: &str, timeout: Duration, mut cond: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond().await {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A message as an HQ consumer sees it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub payload: Vec<u8>,
    pub timestamp: Option<i64>,
    pub headers: BTreeMap<String, String>,
    /// When this consumer received it.
    pub arrived: Instant,
}

impl Seen {
    pub fn header(&self, k: &str) -> &str {
        self.headers.get(k).map(String::as_str).unwrap_or("")
    }

    /// `(store, stream, epoch, seq)`.
    pub fn identity(&self) -> (String, String, String, u64) {
        (
            self.header("edge.store").to_string(),
            self.header("edge.stream").to_string(),
            self.header("edge.epoch").to_string(),
            self.header("edge.seq").parse().unwrap_or(0),
        )
    }
}

/// An independent HQ consumer (`read_committed` by default) that accumulates everything on some
/// topics. Call [`HqConsumer::poll_for`] repeatedly.
pub struct HqConsumer {
    consumer: BaseConsumer,
    pub seen: Vec<Seen>,
}

impl HqConsumer {
    pub fn new(bootstrap: &str, topics: &[&str], read_committed: bool) -> HqConsumer {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique("hq-check"))
            .set(
                "isolation.level",
                if read_committed {
                    "read_committed"
                } else {
                    "read_uncommitted"
                },
            )
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("topic.metadata.refresh.interval.ms", "500")
            // Latency measurements should not include the broker holding an idle fetch.
            .set("fetch.wait.max.ms", "20")
            .create()
            .expect("create HQ consumer");
        let mut tpl = TopicPartitionList::new();
        for t in topics {
            // Topics may not exist yet: assign partition 0 (tests create 1-partition topics) and
            // let the consumer wait for it.
            tpl.add_partition_offset(t, 0, Offset::Beginning)
                .expect("assign");
        }
        consumer.assign(&tpl).expect("assign");
        HqConsumer {
            consumer,
            seen: Vec::new(),
        }
    }

    /// Polls for up to `d`, appending what arrives.
    pub fn poll_for(&mut self, d: Duration) {
        let deadline = Instant::now() + d;
        while Instant::now() < deadline {
            if let Some(Ok(m)) = self.consumer.poll(Duration::from_millis(100)) {
                {
                    let headers = m
                        .headers()
                        .map(|h| {
                            h.iter()
                                .map(|x| {
                                    (
                                        x.key.to_string(),
                                        String::from_utf8_lossy(x.value.unwrap_or_default())
                                            .into_owned(),
                                    )
                                })
                                .collect()
                        })
                        .unwrap_or_default();
                    self.seen.push(Seen {
                        topic: m.topic().to_string(),
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(|k| String::from_utf8_lossy(k).into_owned()),
                        payload: m.payload().unwrap_or_default().to_vec(),
                        timestamp: m.timestamp().to_millis(),
                        headers,
                        arrived: Instant::now(),
                    });
                }
            }
        }
    }

    /// Polls until `n` messages were seen on `topic`; fails the test after `timeout`, naming
    /// what arrived and the partition's log start offset (a broker that deleted records by
    /// retention shows there).
    pub fn wait_for_count(&mut self, topic: &str, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let c = self.count(topic);
            if c >= n {
                return c;
            }
            if Instant::now() >= deadline {
                let first = self
                    .on(topic)
                    .first()
                    .map(|s| format!("seq {} at offset {}", s.header("edge.seq"), s.offset));
                let marks = self
                    .consumer
                    .fetch_watermarks(topic, 0, Duration::from_secs(5))
                    .map(|(lo, hi)| format!("log start offset {lo}, high watermark {hi}"))
                    .unwrap_or_else(|e| format!("watermarks unknown: {e}"));
                panic!(
                    "only {c} of {n} records on {topic} after {timeout:?}; first seen: {}; {marks}",
                    first.as_deref().unwrap_or("none")
                );
            }
            self.poll_for(Duration::from_millis(200));
        }
    }

    pub fn count(&self, topic: &str) -> usize {
        self.seen.iter().filter(|s| s.topic == topic).count()
    }

    pub fn on(&self, topic: &str) -> Vec<&Seen> {
        self.seen.iter().filter(|s| s.topic == topic).collect()
    }
}

/// Checks that the data records of `stream` at HQ are exactly seq `1..=n` of one epoch, once each,
/// in order. Returns a description of the first violation.
pub fn check_exactly_once(seen: &[&Seen], store: &str, stream: &str, n: u64) -> Result<(), String> {
    check_exactly_once_except(seen, store, stream, n, &[])
}

/// Like [`check_exactly_once`], for a stream whose records `missing` must not be at HQ (they
/// were refused and reported as gaps).
pub fn check_exactly_once_except(
    seen: &[&Seen],
    store: &str,
    stream: &str,
    n: u64,
    missing: &[u64],
) -> Result<(), String> {
    let mine: Vec<&&Seen> = seen
        .iter()
        .filter(|s| s.header("edge.store") == store && s.header("edge.stream") == stream)
        .collect();
    let mut expect = 1u64;
    let mut epoch = None;
    let mut count = 0u64;
    for s in &mine {
        while missing.contains(&expect) {
            expect += 1;
        }
        let (_, _, e, seq) = s.identity();
        if *epoch.get_or_insert(e.clone()) != e {
            return Err(format!("{stream}: epoch changed at seq {seq}"));
        }
        if seq != expect {
            return Err(format!(
                "{stream}: expected seq {expect} next, got {seq} (duplicate or gap or reorder)"
            ));
        }
        expect += 1;
        count += 1;
    }
    let want = n - missing.iter().filter(|m| (1..=n).contains(*m)).count() as u64;
    if count != want {
        return Err(format!("{stream}: {count} records at HQ, expected {want}"));
    }
    Ok(())
}

/// Reads a topic with kcat (`read_committed`, from the beginning, exit at the end) and returns one
/// JSON object per message (`kcat -J`).
pub fn kcat_read(bootstrap: &str, topic: &str, extra: &[&str]) -> Vec<serde_json::Value> {
    let out = Command::new("kcat")
        .args([
            "-C",
            "-b",
            bootstrap,
            "-t",
            topic,
            "-o",
            "beginning",
            "-e",
            "-J",
            "-q",
        ])
        .args(["-X", "isolation.level=read_committed"])
        .args(extra)
        .output()
        .expect("run kcat");
    assert!(
        out.status.success(),
        "kcat failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A plain producer for HQ-side topics (downlink tests).
pub fn hq_producer(bootstrap: &str) -> ThreadedProducer<DefaultProducerContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("linger.ms", "1")
        .create()
        .expect("HQ producer")
}

/// Sends one record from HQ and waits for its delivery.
pub fn hq_send(
    p: &ThreadedProducer<DefaultProducerContext>,
    topic: &str,
    key: Option<&str>,
    payload: &str,
    headers: &[(&str, &str)],
) {
    let mut h = rdkafka::message::OwnedHeaders::new();
    for (k, v) in headers {
        h = h.insert(rdkafka::message::Header {
            key: k,
            value: Some(*v),
        });
    }
    let mut r = BaseRecord::to(topic).payload(payload).headers(h);
    if let Some(k) = key {
        r = r.key(k);
    }
    p.send(r).map_err(|(e, _)| e).expect("send");
    p.flush(Duration::from_secs(30)).expect("flush");
}

/// Creates a topic with kcat-independent admin calls (1 partition) and waits until it exists.
pub async fn create_topic(bootstrap: &str, topic: &str) {
    create_topic_with(bootstrap, topic, &[]).await
}

/// Like [`create_topic`], with topic configs (e.g. `max.message.bytes`).
pub async fn create_topic_with(bootstrap: &str, topic: &str, configs: &[(&str, &str)]) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin");
    let r = admin
        .create_topics(
            &[configs.iter().fold(
                NewTopic::new(topic, 1, TopicReplication::Fixed(1)),
                |t, (k, v)| t.set(k, v),
            )],
            &AdminOptions::new(),
        )
        .await
        .expect("create topic");
    for x in r {
        if let Err((t, e)) = x {
            assert_eq!(
                e,
                rdkafka::error::RDKafkaErrorCode::TopicAlreadyExists,
                "creating {t}"
            );
        }
    }
}

/// A local log with components running against it in this process (the uplink and downlink as
/// the daemon runs them, minus the process).
pub struct Store {
    pub id: String,
    pub dir: tempfile::TempDir,
    pub log: Arc<SqliteLog>,
    pub status: Status,
    shutdown: Shutdown,
    tasks: Vec<(String, tokio::task::JoinHandle<Result<(), ComponentError>>)>,
}

/// Log settings for tests: no free-disk floor, no background integrity check.
pub fn test_log_config() -> LogConfig {
    LogConfig {
        min_free_disk: edge_core::config::ByteSize::b(0),
        integrity_check: edge_sync::log::IntegrityCheck::Off,
        ..LogConfig::default()
    }
}

impl Store {
    /// Opens a new log for a store with a random id. Set `EDGE_TEST_LOG=debug` (a tracing filter)
    /// to see the components' logs on stderr.
    pub fn open() -> Store {
        Self::open_with(test_log_config())
    }

    /// Like [`Store::open`] with a log config of the test's own.
    pub fn open_with(cfg: LogConfig) -> Store {
        if let Ok(filter) = std::env::var("EDGE_TEST_LOG") {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
                .with_writer(std::io::stderr)
                .try_init();
        }
        let dir = tempfile::tempdir().expect("temp dir");
        let log = Arc::new(SqliteLog::open(dir.path(), cfg).expect("open log"));
        Store {
            id: unique("store"),
            dir,
            log,
            status: Status::new(),
            shutdown: Shutdown::new(),
            tasks: Vec::new(),
        }
    }

    /// Re-opens the same log directory (after [`Store::close`]).
    pub fn reopen(id: String, dir: tempfile::TempDir) -> Store {
        let log = Arc::new(SqliteLog::open(dir.path(), test_log_config()).expect("reopen log"));
        Store {
            id,
            dir,
            log,
            status: Status::new(),
            shutdown: Shutdown::new(),
            tasks: Vec::new(),
        }
    }

    fn ctx(&self, name: &str) -> ComponentContext {
        ComponentContext::for_test(self.log.clone(), name)
            .with_store(&self.id)
            .with_shutdown(&self.shutdown)
            .with_status(&self.status, name)
            .with_data_dir(self.dir.path())
    }

    pub fn start_uplink(&mut self, cfg: KafkaConfig) {
        self.start_uplink_named("uplink", cfg);
    }

    pub fn start_uplink_named(&mut self, name: &str, cfg: KafkaConfig) {
        let task = Uplink::new(cfg, "uplink")
            .build(self.ctx(name))
            .expect("build uplink");
        self.tasks.push((name.to_string(), tokio::spawn(task)));
    }

    pub fn start_downlink(&mut self, cfg: KafkaConfig) {
        let task = Downlink::new(cfg)
            .build(self.ctx("downlink"))
            .expect("build downlink");
        self.tasks.push(("downlink".into(), tokio::spawn(task)));
    }

    /// A component's status field.
    /// Waits until the uplink cursor of `stream` is at least `at_least`.
    pub async fn wait_cursor(&self, stream: &str, at_least: u64, timeout: Duration) {
        let log = self.log.clone();
        let stream = stream.to_string();
        wait_until_async(
            &format!("the uplink cursor of {stream} to reach {at_least}"),
            timeout,
            || {
                let log = log.clone();
                let stream = stream.clone();
                async move {
                    let c = log.cursor("uplink", &stream).await.ok()??;
                    (c >= at_least).then_some(())
                }
            },
        )
        .await;
    }

    pub fn field(&self, component: &str, key: &str) -> serde_json::Value {
        self.status
            .get(component)
            .and_then(|s| s.fields.get(key).cloned())
            .unwrap_or(serde_json::Value::Null)
    }

    pub fn detail(&self, component: &str) -> String {
        self.status
            .get(component)
            .map(|s| format!("{}: {}", s.state.as_str(), s.detail))
            .unwrap_or_default()
    }

    /// The uplink cursor of a stream.
    pub async fn cursor(&self, stream: &str) -> u64 {
        self.log
            .cursor("uplink", stream)
            .await
            .expect("cursor")
            .unwrap_or(1)
    }

    /// Stops every component (clean shutdown) and waits for them.
    pub async fn stop_components(&mut self) {
        self.shutdown.stop_intake();
        self.shutdown.stop_all();
        for (name, t) in self.tasks.drain(..) {
            let r = tokio::time::timeout(Duration::from_secs(30), t)
                .await
                .unwrap_or_else(|_| panic!("{name} did not stop within 30s"));
            r.expect("join")
                .unwrap_or_else(|e| panic!("{name} failed: {e}"));
        }
        self.shutdown = Shutdown::new();
    }

    /// Aborts every component without a clean stop (like a crash of the tasks; the log stays
    /// open). Then waits until every request the aborted tasks had submitted is durable or failed,
    /// as after a process crash, where the next start sees the log only after the old writer
    /// is gone.
    pub async fn abort_components(&mut self) {
        for (_, t) in self.tasks.drain(..) {
            t.abort();
            // abort() takes effect at the task's next await; wait until it really stopped, so it
            // cannot submit anything after the barrier below.
            let _ = t.await;
        }
        // Requests apply in submission order: once this one is durable, so is everything before.
        self.log
            .append(AppendRequest::default())
            .await
            .expect("log barrier");
        self.shutdown = Shutdown::new();
        self.status = Status::new();
    }

    /// Stops the components and closes the log; returns what [`Store::reopen`] needs.
    pub async fn close(mut self) -> (String, tempfile::TempDir) {
        self.stop_components().await;
        self.log.close().await.expect("close log");
        let Store { id, dir, .. } = self;
        (id, dir)
    }
}

/// A config whose topics are private to one test (random prefix).
pub fn private_config(b: &KafkaBroker, mode: DeliveryMode) -> KafkaConfig {
    let prefix = unique("t");
    KafkaConfig {
        mode,
        topic_template: format!("{prefix}.{{stream}}"),
        checkpoint_topic: format!("{prefix}.__checkpoints"),
        heartbeat_topic: format!("{prefix}.heartbeats"),
        gap_topic: format!("{prefix}.gaps"),
        ..b.kafka_config()
    }
}

/// The event time of the `i`-th test event: an hour before this test process started, plus `i`
/// ms. Plausible for the uplink (so it is the Kafka timestamp) and inside any broker retention: a
/// fixed date years back would be deleted by the broker's 7-day retention as soon as a segment
/// rolls, which is what made HQ's view of a long drain start at seq 1001 in an earlier CI run.
pub fn event_time(i: u64) -> i64 {
    static T0: OnceLock<i64> = OnceLock::new();
    *T0.get_or_init(|| edge_core::time::now_ms() - 3_600_000) + i as i64
}

/// The `i`-th test event of a stream (event time [`event_time`], three devices).
pub fn event(stream: &str, i: u64) -> Event {
    Event::new(
        stream,
        format!("{{\"schema\":\"pos.transaction/1\",\"i\":{i}}}"),
    )
    .with_event_ts(event_time(i))
    .with_key(format!("lane-{}", i % 3))
    .with_source(format!("pos-{}", i % 3))
    .with_event_id(format!("tx-{i}"))
    .with_schema("pos.transaction/1")
}

/// Appends events `range` of `stream` in requests of 500.
pub async fn append(log: &dyn Log, stream: &str, range: std::ops::Range<u64>) {
    let events: Vec<Event> = range.map(|i| event(stream, i)).collect();
    for chunk in events.chunks(500) {
        log.append(AppendRequest::events(chunk.to_vec()))
            .await
            .expect("append");
    }
}

/// HQ's signing key in tests (a fixed seed, so failures are reproducible).
pub fn hq_signing_key() -> edge_core::signing::SigningKey {
    edge_core::signing::SigningKey::from_seed("hq-test-1", [0x42; 32]).expect("valid key id")
}

/// Makes `cfg`'s downlink trust `key` (`[[kafka.downlink.keys]]`).
pub fn trust_hq_key(cfg: &mut KafkaConfig, key: &edge_core::signing::SigningKey) {
    cfg.downlink.keys.push(edge_sync::kafka::HqKey {
        id: key.id().to_string(),
        public_key: key.public_key().to_base64(),
        not_after: None,
    });
}

/// The signature headers HQ sends with a record for local `stream` (see docs/KAFKA.md).
pub fn hq_signature(
    key: &edge_core::signing::SigningKey,
    stream: &str,
    record_key: Option<&str>,
    store_header: Option<&str>,
    payload: &str,
) -> Vec<(&'static str, String)> {
    let fields = edge_core::signing::SignedFields {
        stream,
        store: store_header.map(str::as_bytes),
        key: record_key.map(str::as_bytes),
        payload: Some(payload.as_bytes()),
    };
    key.sign(&fields, edge_core::time::now_ms(), None).headers()
}
