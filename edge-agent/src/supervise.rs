//! Supervision: a component that fails is built again and restarted with backoff, up to a
//! crash-loop limit; then it is given up and the agent reports itself unhealthy, so systemd (the
//! watchdog) restarts the whole process.
//!
//! Policy (docs/ARCHITECTURE.md, "Supervision"):
//! * a component's task that returns `Err` or panics while the agent is not stopping is a
//!   failure: its status says why and when it restarts; it is built again from its config with
//!   the same context (same status entry, same log) after a jittered backoff (1 s doubling to
//!   60 s; reset once it ran for [`RestartPolicy::healthy_after`]);
//! * more than [`RestartPolicy::max_failures`] failures within [`RestartPolicy::window`] is a crash
//!   loop: the component is given up (state `down`, detail "gave up ..."), `/healthz` and `/readyz`
//!   answer 503 and the systemd watchdog stops, so the service manager restarts the agent;
//! * a task that returns `Ok` stopped on purpose (shutdown, or a component disabled by its
//!   config) and is not restarted.

use edge_core::State;
use edge_core::backoff::Backoff;
use edge_core::component::{ComponentContext, ComponentError, Task};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Builds a component's task from its config; called again for every restart.
pub type Build = Box<dyn Fn(ComponentContext) -> Result<Task, ComponentError> + Send + Sync>;

/// When to restart and when to give up.
#[derive(Debug, Clone, Copy)]
pub struct RestartPolicy {
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// Failures tolerated within `window`; one more gives the component up.
    pub max_failures: usize,
    pub window: Duration,
    /// A run this long resets the backoff.
    pub healthy_after: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        RestartPolicy {
            backoff_min: Duration::from_secs(1),
            backoff_max: Duration::from_secs(60),
            max_failures: 5,
            window: Duration::from_secs(600),
            healthy_after: Duration::from_secs(60),
        }
    }
}

/// The supervisor's view of one component (in `status` as `supervision`).
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Supervised {
    pub restarts: u64,
    pub gave_up: bool,
    pub last_error: Option<String>,
}

/// Every supervised component's state, shared with the health endpoints and the watchdog.
#[derive(Debug, Clone, Default)]
pub struct Supervision(Arc<RwLock<BTreeMap<String, Supervised>>>);

impl Supervision {
    pub fn snapshot(&self) -> BTreeMap<String, Supervised> {
        self.0.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Components given up after a crash loop (the agent is unhealthy while any is).
    pub fn given_up(&self) -> Vec<String> {
        self.snapshot()
            .into_iter()
            .filter(|(_, s)| s.gave_up)
            .map(|(n, _)| n)
            .collect()
    }

    fn update(&self, name: &str, f: impl FnOnce(&mut Supervised)) {
        let mut m = self.0.write().unwrap_or_else(|e| e.into_inner());
        f(m.entry(name.to_string()).or_default());
    }
}

/// Runs `first` (the task built at start-up) and restarts the component through `build` when it
/// fails, until the agent stops or the component is given up. Returns whether it ended cleanly.
pub async fn supervise(
    name: String,
    ctx: ComponentContext,
    build: Build,
    first: Task,
    policy: RestartPolicy,
    supervision: Supervision,
) -> bool {
    supervision.update(&name, |_| {});
    let stopping = ctx.shutdown.all().clone();
    let mut backoff = Backoff::new(policy.backoff_min, policy.backoff_max);
    let mut failures: VecDeque<Instant> = VecDeque::new();
    let mut task = Some(first);
    loop {
        let started = Instant::now();
        let outcome = match task.take() {
            // Its own tokio task, so that a panic is a failure of this component only.
            Some(t) => match tokio::spawn(t).await {
                Ok(Ok(())) => return true,
                Ok(Err(e)) => e.to_string(),
                Err(j) if j.is_panic() => format!("panicked: {}", panic_text(j)),
                Err(j) => j.to_string(),
            },
            None => unreachable!("a task is built before every run"),
        };
        if stopping.is_cancelled() {
            tracing::warn!(component = %name, error = %outcome, "component failed while the agent was stopping");
            return false;
        }
        metrics::counter!("edge_component_failures_total", "component" => name.clone())
            .increment(1);
        if started.elapsed() >= policy.healthy_after {
            backoff.reset();
        }
        let now = Instant::now();
        failures.push_back(now);
        while failures
            .front()
            .is_some_and(|t| now.duration_since(*t) > policy.window)
        {
            failures.pop_front();
        }
        if failures.len() > policy.max_failures {
            let detail = format!(
                "gave up after {} failures within {:?}: {outcome}; the agent reports itself unhealthy (/healthz, watchdog) so that systemd restarts it",
                failures.len(),
                policy.window
            );
            tracing::error!(component = %name, error = %outcome, "component crash-looped; giving up");
            supervision.update(&name, |s| {
                s.gave_up = true;
                s.last_error = Some(outcome.clone());
            });
            ctx.status.field("supervision", "gave_up");
            ctx.status.set(State::Down, detail);
            return false;
        }
        // Build the next incarnation, then wait; a build that fails counts as a failure too.
        loop {
            let delay = backoff.next_delay();
            tracing::error!(component = %name, error = %outcome, restart_in_ms = delay.as_millis() as u64,
                "component failed; restarting it");
            supervision.update(&name, |s| {
                s.restarts += 1;
                s.last_error = Some(outcome.clone());
            });
            let restarts = supervision.snapshot().get(&name).map_or(0, |s| s.restarts);
            ctx.status.field("restarts", restarts);
            ctx.status.field("supervision", "restarting");
            ctx.status.set(
                State::Down,
                format!("failed: {outcome}; restarting in {delay:.1?} (restart {restarts})"),
            );
            tokio::select! {
                _ = stopping.cancelled() => return false,
                _ = tokio::time::sleep(delay) => {}
            }
            match build(ctx.clone()) {
                Ok(t) => {
                    ctx.status.field("supervision", "running");
                    task = Some(t);
                    break;
                }
                Err(e) => {
                    let now = Instant::now();
                    failures.push_back(now);
                    if failures.len() > policy.max_failures {
                        let detail = format!("gave up: it cannot be built again: {e}");
                        supervision.update(&name, |s| {
                            s.gave_up = true;
                            s.last_error = Some(e.to_string());
                        });
                        ctx.status.field("supervision", "gave_up");
                        ctx.status.set(State::Down, detail);
                        return false;
                    }
                }
            }
        }
    }
}

fn panic_text(j: tokio::task::JoinError) -> String {
    let p = j.into_panic();
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use edge_core::component::ComponentContext;
    use edge_core::{Shutdown, Status};
    use std::sync::atomic::{AtomicU32, Ordering};

    fn context(name: &str) -> (ComponentContext, Status, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let log = edge_sync::log::SqliteLog::open(dir.path(), Default::default()).unwrap();
        let status = Status::new();
        let ctx = ComponentContext {
            store_id: Arc::from("s"),
            log: Arc::new(log),
            shutdown: Shutdown::new(),
            status: status.register(name, "test"),
            data_dir: dir.path().to_path_buf(),
        };
        (ctx, status, dir)
    }

    fn fast() -> RestartPolicy {
        RestartPolicy {
            backoff_min: Duration::from_millis(5),
            backoff_max: Duration::from_millis(20),
            max_failures: 3,
            window: Duration::from_secs(60),
            healthy_after: Duration::from_secs(60),
        }
    }

    fn failing(runs: Arc<AtomicU32>, fail_first: u32) -> Build {
        Box::new(move |_ctx| {
            let runs = runs.clone();
            Ok(Box::pin(async move {
                let n = runs.fetch_add(1, Ordering::SeqCst) + 1;
                if n <= fail_first {
                    Err::<(), ComponentError>(format!("run {n} failed").into())
                } else if n == fail_first + 1 {
                    Ok(())
                } else {
                    unreachable!()
                }
            }) as Task)
        })
    }

    #[tokio::test]
    async fn a_failed_component_is_restarted_until_it_succeeds() {
        let (ctx, status, _dir) = context("c");
        let runs = Arc::new(AtomicU32::new(0));
        let build = failing(runs.clone(), 2);
        let first = build(ctx.clone()).unwrap();
        let sup = Supervision::default();
        let clean = supervise("c".into(), ctx, build, first, fast(), sup.clone()).await;
        assert!(clean, "it ended cleanly on its third run");
        assert_eq!(runs.load(Ordering::SeqCst), 3);
        let s = sup.snapshot()["c"].clone();
        assert_eq!(s.restarts, 2);
        assert!(!s.gave_up);
        assert_eq!(s.last_error.as_deref(), Some("run 2 failed"));
        assert_eq!(status.get("c").unwrap().fields["restarts"], 2);
    }

    #[tokio::test]
    async fn a_crash_loop_is_given_up_and_reported() {
        let (ctx, status, _dir) = context("c");
        let runs = Arc::new(AtomicU32::new(0));
        let build = failing(runs.clone(), 100);
        let first = build(ctx.clone()).unwrap();
        let sup = Supervision::default();
        let clean = supervise("c".into(), ctx, build, first, fast(), sup.clone()).await;
        assert!(!clean);
        assert_eq!(
            runs.load(Ordering::SeqCst),
            4,
            "max_failures 3, then given up"
        );
        assert_eq!(sup.given_up(), vec!["c".to_string()]);
        let st = status.get("c").unwrap();
        assert_eq!(st.state, State::Down);
        assert!(
            st.detail.starts_with("gave up after 4 failures"),
            "{}",
            st.detail
        );
    }

    #[tokio::test]
    async fn a_panic_is_a_failure_of_that_component_only() {
        let (ctx, _status, _dir) = context("c");
        let runs = Arc::new(AtomicU32::new(0));
        let r = runs.clone();
        let build: Build = Box::new(move |_ctx| {
            let r = r.clone();
            Ok(Box::pin(async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    panic!("boom");
                }
                Ok(())
            }) as Task)
        });
        let first = build(ctx.clone()).unwrap();
        let sup = Supervision::default();
        assert!(supervise("c".into(), ctx, build, first, fast(), sup.clone()).await);
        assert_eq!(
            sup.snapshot()["c"].last_error.as_deref(),
            Some("panicked: boom")
        );
    }

    #[tokio::test]
    async fn a_stop_during_the_backoff_ends_supervision() {
        let (ctx, _status, _dir) = context("c");
        let runs = Arc::new(AtomicU32::new(0));
        let build = failing(runs.clone(), 100);
        let first = build(ctx.clone()).unwrap();
        let policy = RestartPolicy {
            backoff_min: Duration::from_secs(30),
            backoff_max: Duration::from_secs(30),
            ..fast()
        };
        let stop = ctx.shutdown.clone();
        let h = tokio::spawn(supervise(
            "c".into(),
            ctx,
            build,
            first,
            policy,
            Supervision::default(),
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        stop.stop_all();
        let clean = tokio::time::timeout(Duration::from_secs(5), h)
            .await
            .expect("supervision ends at once")
            .unwrap();
        assert!(!clean);
        assert_eq!(runs.load(Ordering::SeqCst), 1);
    }
}
