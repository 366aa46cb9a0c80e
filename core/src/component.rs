//! What every long-running component (driver, MQTT bridge, uplink, engine) receives from the daemon,
//! and the shape of the task it returns.
//!
//! A component is configured by a closed serde enum in its crate; `build(ctx)` validates what it can
//! without I/O and returns a [`Task`]. The task owns its reconnect loop, selects on
//! `ctx.shutdown`, writes through `ctx.log`, and reports its state on `ctx.status`.

use crate::log::Log;
use crate::shutdown::Shutdown;
use crate::status::{Status, StatusHandle};
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

pub type ComponentError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A running component. It returns `Ok(())` after a clean shutdown; an `Err` means it gave up
/// (the daemon logs it and keeps the other components running).
pub type Task = Pin<Box<dyn Future<Output = Result<(), ComponentError>> + Send + 'static>>;

#[derive(Clone)]
pub struct ComponentContext {
    /// The store this agent runs in (`edge.store`).
    pub store_id: Arc<str>,
    pub log: Arc<dyn Log>,
    pub shutdown: Shutdown,
    pub status: StatusHandle,
    /// The agent's state directory (components keep small files here if they must).
    pub data_dir: PathBuf,
}

impl std::fmt::Debug for ComponentContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ComponentContext")
            .field("store_id", &self.store_id)
            .field("component", &self.status.name())
            .finish()
    }
}

impl ComponentContext {
    /// A context for tests and benchmarks: store `test-store`, a new [`Shutdown`], the component
    /// registered as `name` (kind `name`) in a new [`Status`] registry (reach it with
    /// `ctx.status.registry()`), and the system temp directory as `data_dir`. The `with_*` methods
    /// change one part, e.g. to share one shutdown or one registry between components.
    pub fn for_test(log: Arc<dyn Log>, name: &str) -> ComponentContext {
        ComponentContext {
            store_id: Arc::from("test-store"),
            log,
            shutdown: Shutdown::new(),
            status: Status::new().register(name, name),
            data_dir: std::env::temp_dir(),
        }
    }

    pub fn with_store(mut self, store_id: &str) -> ComponentContext {
        self.store_id = Arc::from(store_id);
        self
    }

    pub fn with_shutdown(mut self, shutdown: &Shutdown) -> ComponentContext {
        self.shutdown = shutdown.clone();
        self
    }

    /// Registers the component (same name) in `registry` with `kind`, instead of its own registry.
    pub fn with_status(mut self, registry: &Status, kind: &str) -> ComponentContext {
        self.status = registry.register(self.status.name(), kind);
        self
    }

    pub fn with_data_dir(mut self, dir: impl Into<PathBuf>) -> ComponentContext {
        self.data_dir = dir.into();
        self
    }
}
