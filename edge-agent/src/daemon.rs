//! `edge-agent run`: open the log, start every component, serve health/status/metrics, and stop
//! gracefully on SIGTERM/SIGINT.
//!
//! Stop sequence (bounded by `agent.shutdown_timeout`): stop intake (sources stop accepting and ack
//! what is committed) -> wait for intake guards -> stop everything else -> close the log (flush,
//! checkpoint, release the lock).

use crate::config::AgentConfig;
use crate::report;
use anyhow::Context as _;
use edge_core::component::{ComponentContext, Task};
use edge_core::log::{AppendRequest, Log};
use edge_core::{Event, Shutdown, State, Status};
use edge_sync::log::SqliteLog;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// Everything the HTTP endpoint and the health reporter need from the running daemon.
#[derive(Clone)]
pub struct DaemonState {
    pub config: Arc<AgentConfig>,
    pub log: Arc<SqliteLog>,
    pub status: Status,
    pub started: Instant,
    pub ready: Arc<std::sync::atomic::AtomicBool>,
}

impl DaemonState {
    pub async fn report(&self) -> anyhow::Result<report::StatusReport> {
        let log = &self.log;
        let streams = log.streams().await?;
        let cursors = log.cursors().await?;
        let mut oldest = BTreeMap::new();
        for c in &cursors {
            let ts = log.oldest_from(&c.stream, c.next_seq).await?;
            oldest.insert((c.stream.clone(), c.next_seq), ts);
        }
        let gaps = log.gap_summary().await?.iter().map(|g| g.ranges).sum();
        Ok(report::build(report::Inputs {
            store_id: &self.config.agent.store_id,
            path: log.path().display().to_string(),
            epoch: log.epoch().to_string(),
            usage: log.usage().await?,
            integrity: Some(log.integrity()),
            streams,
            cursors,
            oldest,
            gaps,
            components: self.status.snapshot(),
            daemon_running: true,
            uptime_s: Some(self.started.elapsed().as_secs_f64()),
        }))
    }
}

struct Component {
    name: String,
    task: Task,
}

fn context(state: &DaemonState, shutdown: &Shutdown, name: &str, kind: &str) -> ComponentContext {
    ComponentContext {
        store_id: Arc::from(state.config.agent.store_id.as_str()),
        log: state.log.clone(),
        shutdown: shutdown.clone(),
        status: state.status.register(name, kind),
        data_dir: state.config.agent.data_dir.clone(),
    }
}

fn build_components(state: &DaemonState, shutdown: &Shutdown) -> anyhow::Result<Vec<Component>> {
    let cfg = &state.config;
    let mut out = Vec::new();
    if cfg.mqtt.enabled {
        let ctx = context(state, shutdown, "mqtt", "mqtt");
        let task = edge_sync::mqtt::build(cfg.mqtt.clone(), ctx)
            .context("cannot start the MQTT bridge")?;
        out.push(Component {
            name: "mqtt".into(),
            task,
        });
    }
    if let Some(k) = &cfg.kafka {
        let ctx = context(state, shutdown, "uplink", "kafka");
        let task = edge_sync::kafka::Uplink::new(k.clone(), cfg.log.mirror_cursor.clone())
            .build(ctx)
            .context("cannot start the Kafka uplink")?;
        out.push(Component {
            name: "uplink".into(),
            task,
        });
        if k.downlink.enabled {
            let ctx = context(state, shutdown, "downlink", "kafka");
            let task = edge_sync::kafka::Downlink::new(k.clone())
                .build(ctx)
                .context("cannot start the Kafka downlink")?;
            out.push(Component {
                name: "downlink".into(),
                task,
            });
        }
    }
    for d in &cfg.drivers {
        let ctx = context(state, shutdown, d.name(), d.kind());
        let task = d
            .build(ctx)
            .with_context(|| format!("cannot start driver {}", d.name()))?;
        out.push(Component {
            name: d.name().to_string(),
            task,
        });
    }
    Ok(out)
}

/// Writes an `agent.health/1` record every `health_interval` (component states, disk, backlog).
fn health_task(state: DaemonState, shutdown: Shutdown) -> Task {
    Box::pin(async move {
        let every = state.config.agent.health_interval;
        if every.is_zero() {
            return Ok(());
        }
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.intake().cancelled() => return Ok(()),
                _ = tick.tick() => {}
            }
            let Ok(r) = state.report().await else {
                continue;
            };
            let payload = serde_json::json!({
                "schema": "agent.health/1",
                "store": r.store_id,
                "version": r.version,
                "uptime_s": r.uptime_s,
                "log": r.log,
                "components": r.components.iter().map(|(k, v)| (k.clone(), serde_json::json!({"state": v["state"], "detail": v["detail"]}))).collect::<serde_json::Map<_, _>>(),
                "backlog": r.streams.iter().map(|s| (s.name.clone(), serde_json::json!({"next_seq": s.next_seq, "records": s.records}))).collect::<serde_json::Map<_, _>>(),
            });
            let ev = Event::new(
                "agent.health",
                serde_json::to_vec(&payload).unwrap_or_default(),
            )
            .with_schema("agent.health/1")
            .with_source("agent");
            // A full log refuses this like everything else; the next tick tries again.
            let _ = state.log.append(AppendRequest::one(ev)).await;
        }
    })
}

/// Runs the daemon until a stop signal. Returns the process exit code.
pub fn run(cfg: AgentConfig) -> anyhow::Result<()> {
    crate::logging::init(&cfg);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("edge-agent")
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(run_async(cfg))
}

async fn run_async(cfg: AgentConfig) -> anyhow::Result<()> {
    let started = Instant::now();
    // Handlers first: a SIGTERM right after READY=1 (or during start-up) must stop the agent
    // gracefully, not kill it with the default action.
    let stop_requested = wait_for_signal();
    let metrics = crate::http::install_metrics()?;
    let cfg = Arc::new(cfg);
    let log = tokio::task::spawn_blocking({
        let dir = cfg.agent.data_dir.clone();
        let lc = cfg.log.clone();
        move || SqliteLog::open(&dir, lc)
    })
    .await
    .context("log open task failed")?
    .with_context(|| {
        format!(
            "cannot open the local log in {}",
            cfg.agent.data_dir.display()
        )
    })?;
    let state = DaemonState {
        config: cfg.clone(),
        log: Arc::new(log),
        status: Status::new(),
        started,
        ready: Arc::new(std::sync::atomic::AtomicBool::new(false)),
    };
    let shutdown = Shutdown::new();

    let components = match build_components(&state, &shutdown) {
        Ok(c) => c,
        Err(e) => {
            let _ = state.log.close().await;
            return Err(e);
        }
    };
    let mut tasks = JoinSet::new();
    for c in components {
        let name = c.name;
        let task = c.task;
        tasks.spawn(async move {
            let r = task.await;
            if let Err(e) = &r {
                tracing::error!(component = %name, error = %e, "component stopped with an error; the rest of the agent keeps running");
            }
            (name, r.is_ok())
        });
    }
    tasks.spawn({
        let t = health_task(state.clone(), shutdown.clone());
        async move { ("health".to_string(), t.await.is_ok()) }
    });

    let http = if cfg.http.enabled {
        Some(
            crate::http::serve(state.clone(), metrics, shutdown.clone())
                .await
                .with_context(|| format!("cannot listen on http.listen {}", cfg.http.listen))?,
        )
    } else {
        None
    };

    state
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    let systemd = crate::systemd::Notifier::from_env();
    let systemd_tasks =
        crate::systemd::spawn(state.clone(), systemd.clone(), shutdown.all().clone());
    systemd.ready(&match state.report().await {
        Ok(r) => crate::systemd::summary(&r),
        Err(_) => "ready".into(),
    });
    tracing::info!(
        store = %cfg.agent.store_id,
        epoch = %state.log.epoch(),
        startup_ms = started.elapsed().as_millis() as u64,
        "edge-agent ready"
    );

    stop_requested.await;
    systemd.stopping("stopping: intake closed, flushing the local log");
    let deadline = Instant::now() + cfg.agent.shutdown_timeout;
    tracing::info!("stop requested: stopping intake");
    shutdown.stop_intake();
    let drain_budget = cfg.agent.shutdown_timeout.mul_f64(0.5);
    if !shutdown.wait_intake_drained(drain_budget).await {
        tracing::warn!(
            "intake did not drain in {drain_budget:?}; unacknowledged messages will be redelivered by their sources"
        );
    }
    shutdown.stop_all();
    let join_budget = deadline
        .saturating_duration_since(Instant::now())
        .saturating_sub(Duration::from_millis(500));
    let joined = tokio::time::timeout(join_budget, async {
        while let Some(r) = tasks.join_next().await {
            if let Ok((name, ok)) = r {
                tracing::debug!(component = %name, ok, "component stopped");
            }
        }
    })
    .await;
    if joined.is_err() {
        tracing::warn!("some components did not stop in time; aborting them");
        tasks.abort_all();
    }
    if let Some(h) = http {
        h.abort();
    }
    for t in systemd_tasks {
        t.abort();
    }
    state.log.close().await.context("closing the local log")?;
    for (name, s) in state.status.snapshot() {
        if s.state != State::Stopped {
            tracing::debug!(component = %name, state = s.state.as_str(), "component state at exit");
        }
    }
    tracing::info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "edge-agent stopped"
    );
    Ok(())
}

/// Registers the SIGTERM/SIGINT handlers now and returns the future that resolves on either.
fn wait_for_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    async move {
        match (term, int) {
            (Ok(mut t), Ok(mut i)) => {
                tokio::select! {
                    _ = t.recv() => {}
                    _ = i.recv() => {}
                }
            }
            _ => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
