//! What every long-running component (driver, MQTT bridge, uplink, engine) receives from the daemon,
//! and the shape of the task it returns.
//!
//! A component is configured by a closed serde enum in its crate; `build(ctx)` validates what it can
//! without I/O and returns a [`Task`]. The task owns its reconnect loop, selects on
//! `ctx.shutdown`, writes through `ctx.log`, and reports its state on `ctx.status`.

use crate::log::Log;
use crate::shutdown::Shutdown;
use crate::status::StatusHandle;
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
