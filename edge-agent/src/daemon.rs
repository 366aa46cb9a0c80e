//! `edge-agent run`: open the log, start every component, serve health/status/metrics, and stop
//! gracefully on SIGTERM/SIGINT.
//!
//! Stop sequence (bounded by `agent.shutdown_timeout`): stop intake (sources stop accepting and ack
//! what is committed) -> wait for intake guards -> stop everything else -> close the log (flush,
//! checkpoint, release the lock).

use crate::config::AgentConfig;
pub use crate::state::DaemonState;
use crate::supervise::{Build, RestartPolicy, Supervision, supervise};
use anyhow::Context as _;
use edge_core::component::{ComponentContext, ComponentError, Task};
use edge_core::log::{AppendRequest, Log};
use edge_core::{Event, Shutdown, State, Status};
use edge_sync::log::SqliteLog;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::task::JoinSet;

/// A component as the supervisor runs it: its context, the task built at start-up, and how to
/// build it again after a failure.
struct Component {
    name: String,
    ctx: ComponentContext,
    build: Build,
    first: Task,
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

fn boxed<E: std::error::Error + Send + Sync + 'static>(e: E) -> ComponentError {
    Box::new(e)
}

/// Every configured component, each with one build function that the start-up and the supervisor
/// both call. A component that cannot be built at start-up stops the start (a configuration
/// problem the operator must see).
fn build_components(state: &DaemonState, shutdown: &Shutdown) -> anyhow::Result<Vec<Component>> {
    let cfg = &state.config;
    let mut specs: Vec<(String, String, Build)> = Vec::new();
    if cfg.mqtt.enabled {
        let c = cfg.mqtt.clone();
        specs.push((
            "mqtt".into(),
            "mqtt".into(),
            Box::new(move |ctx| edge_sync::mqtt::build(c.clone(), ctx).map_err(boxed)),
        ));
    }
    if let Some(k) = &cfg.kafka {
        let (c, cursor) = (k.clone(), cfg.log.mirror_cursor.clone());
        specs.push((
            "uplink".into(),
            "kafka".into(),
            Box::new(move |ctx| {
                edge_sync::kafka::Uplink::new(c.clone(), cursor.clone())
                    .build(ctx)
                    .map_err(boxed)
            }),
        ));
        if k.downlink.enabled {
            let c = k.clone();
            specs.push((
                "downlink".into(),
                "kafka".into(),
                Box::new(move |ctx| {
                    edge_sync::kafka::Downlink::new(c.clone())
                        .build(ctx)
                        .map_err(boxed)
                }),
            ));
        }
    }
    for d in &cfg.drivers {
        let d2 = d.clone();
        specs.push((
            d.name().to_string(),
            d.kind().to_string(),
            Box::new(move |ctx| d2.build(ctx).map_err(boxed)),
        ));
    }
    if cfg.offers.enabled {
        let o = cfg.offers.clone();
        specs.push((
            o.name.clone(),
            "offers".into(),
            Box::new(move |ctx| Ok(o.build(ctx))),
        ));
    }
    let mut out = Vec::new();
    for (name, kind, build) in specs {
        let ctx = context(state, shutdown, &name, &kind);
        let first = build(ctx.clone()).map_err(|e| anyhow::anyhow!("cannot start {name}: {e}"))?;
        out.push(Component {
            name,
            ctx,
            build,
            first,
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
        supervision: Supervision::default(),
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
        let name = c.name.clone();
        let sup = state.supervision.clone();
        tasks.spawn(async move {
            let ok = supervise(
                c.name,
                c.ctx,
                c.build,
                c.first,
                RestartPolicy::default(),
                sup,
            )
            .await;
            (name, ok)
        });
    }
    tasks.spawn({
        let t = health_task(state.clone(), shutdown.clone());
        async move { ("health".to_string(), t.await.is_ok()) }
    });

    if let Some(w) = cfg.http.exposure_warning() {
        tracing::warn!(listen = %cfg.http.listen, "{w}");
    }
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
