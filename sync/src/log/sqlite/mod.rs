//! The SQLite implementation of the local log.
//!
//! Threads:
//! * the **writer** (`writer.rs`) owns the only writing connection and does group commit;
//! * the **housekeeper** runs passive WAL checkpoints (so commits never pay for them) and sends the
//!   periodic maintenance request to the writer;
//! * reads run on pooled read connections inside `spawn_blocking`;
//! * an optional **integrity** thread runs `PRAGMA quick_check` once after start-up.
//!
//! A lock file next to the database (`flock`) keeps a second agent from opening the same log.

pub(crate) mod queries;
mod writer;

use super::{
    AppendRequest, AppendTicket, CursorInfo, DiskUsage, Gap, GapSummary, IntegrityCheck,
    IntegrityState, Log, LogConfig, LogError, MaintenanceReport, OnCorruptOpen, ReadBatch,
    ReadLimits, StreamInfo, StreamPolicy, Synchronous,
};
use async_trait::async_trait;
use nix::fcntl::{Flock, FlockArg};
use queries::storage;
use rusqlite::{Connection, OpenFlags};
use std::collections::HashMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use uuid::Uuid;
use writer::{Writer, WriterMsg};

/// Interval of passive WAL checkpoints.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// Read connections kept open for reuse.
const READ_POOL: usize = 4;

/// State shared by the writer, the readers and the handle.
pub(crate) struct Shared {
    /// stream name -> (stream id, next seq), updated after every commit.
    pub(crate) heads: RwLock<HashMap<String, (i64, u64)>>,
    pub(crate) generation: watch::Sender<u64>,
    pub(crate) full: AtomicBool,
    pub(crate) usage: Mutex<DiskUsage>,
    pub(crate) integrity: Mutex<IntegrityState>,
    pub(crate) config: LogConfig,
}

impl Shared {
    pub(crate) fn policy(&self, stream: &str) -> StreamPolicy {
        self.config.policy(stream)
    }
}

/// The durable local log on SQLite.
pub struct SqliteLog {
    path: PathBuf,
    epoch: Uuid,
    shared: Arc<Shared>,
    tx: mpsc::Sender<WriterMsg>,
    readers: Arc<Mutex<Vec<Connection>>>,
    closed: AtomicBool,
    threads: Mutex<Vec<JoinHandle<()>>>,
    stop_housekeeper: Arc<(Mutex<bool>, std::sync::Condvar)>,
    _lock: Flock<File>,
}

impl std::fmt::Debug for SqliteLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteLog")
            .field("path", &self.path)
            .field("epoch", &self.epoch)
            .finish()
    }
}

fn open_err(path: &Path) -> impl Fn(rusqlite::Error) -> LogError + '_ {
    move |e| LogError::Open {
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Resolves the database path: `file` relative to `data_dir` unless absolute.
pub fn db_path(data_dir: &Path, cfg: &LogConfig) -> PathBuf {
    let f = Path::new(&cfg.file);
    if f.is_absolute() {
        f.to_path_buf()
    } else {
        data_dir.join(f)
    }
}

fn open_writer_connection(path: &Path, cfg: &LogConfig) -> Result<Connection, rusqlite::Error> {
    let mut conn = Connection::open(path)?;
    // The header must be readable before anything else; a damaged file fails here.
    conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))?;
    if queries::schema_version(&conn)? == 0 {
        // Only possible on a new database, and only before WAL mode is switched on: free pages can
        // then be returned to the filesystem (incremental_vacuum) when the free-space floor is hit.
        conn.pragma_update(None, "auto_vacuum", "INCREMENTAL")?;
    }
    let mode = queries::apply_connection_pragmas(
        &conn,
        cfg.synchronous == Synchronous::Full,
        (cfg.cache_size.as_u64() / 1024) as i64,
    )?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "journal_mode WAL was refused (got {mode}); is the data directory on a filesystem without shared memory support?"
        )));
    }
    // Checkpoints run in the housekeeper thread, never inside a commit.
    conn.pragma_update(None, "wal_autocheckpoint", 0)?;
    conn.pragma_update(
        None,
        "journal_size_limit",
        cfg.wal_size_limit.as_u64() as i64,
    )?;
    conn.set_prepared_statement_cache_capacity(64);
    queries::migrate(&mut conn)?;
    let v = queries::schema_version(&conn)?;
    if v > queries::latest_schema_version() {
        return Err(rusqlite::Error::InvalidParameterName(format!(
            "the database has schema version {v}, newer than this agent understands ({}); downgrade is not supported",
            queries::latest_schema_version()
        )));
    }
    Ok(conn)
}

fn open_reader(path: &Path, cfg: &LogConfig) -> Result<Connection, LogError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(storage("opening a read connection"))?;
    queries::apply_connection_pragmas(&conn, cfg.synchronous == Synchronous::Full, 2048)
        .map_err(storage("opening a read connection"))?;
    Ok(conn)
}

impl SqliteLog {
    /// Opens (or creates) the log in `data_dir` and starts its threads. Start-up cost does not
    /// depend on the number of stored records (unless `integrity_check = "blocking"`).
    pub fn open(data_dir: &Path, cfg: LogConfig) -> Result<SqliteLog, LogError> {
        let path = db_path(data_dir, &cfg);
        let dir = path.parent().unwrap_or(data_dir).to_path_buf();
        std::fs::create_dir_all(&dir).map_err(|e| LogError::Open {
            path: dir.display().to_string(),
            reason: format!("cannot create the data directory: {e}"),
        })?;
        let lock_path = path.with_extension("lock");
        let lock_file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| LogError::Open {
                path: lock_path.display().to_string(),
                reason: format!("cannot create the lock file: {e}"),
            })?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock).map_err(|_| {
            LogError::Locked {
                path: path.display().to_string(),
                lock: lock_path.display().to_string(),
            }
        })?;

        let conn = match open_writer_connection(&path, &cfg) {
            Ok(c) => c,
            Err(e)
                if queries::is_corruption(&e)
                    && cfg.on_corrupt_open == OnCorruptOpen::MoveAside =>
            {
                let aside = move_aside(&path)?;
                tracing::error!(
                    path = %path.display(), moved_to = %aside.display(), error = %e,
                    "the local log is damaged beyond use; it was moved aside and a new log with a new epoch was created"
                );
                metrics::counter!("edge_log_corrupt_databases_total").increment(1);
                open_writer_connection(&path, &cfg).map_err(open_err(&path))?
            }
            Err(e) => return Err(open_err(&path)(e)),
        };
        let epoch = queries::read_epoch(&conn)?;

        let (gen_tx, _) = watch::channel(0u64);
        let shared = Arc::new(Shared {
            heads: RwLock::new(HashMap::new()),
            generation: gen_tx,
            full: AtomicBool::new(false),
            usage: Mutex::new(DiskUsage {
                budget_bytes: cfg.disk_budget.as_u64(),
                ..Default::default()
            }),
            integrity: Mutex::new(IntegrityState::NotRun),
            config: cfg.clone(),
        });

        if cfg.integrity_check == IntegrityCheck::Blocking {
            let state = quick_check(&conn);
            *shared.integrity.lock().unwrap_or_else(|e| e.into_inner()) = state;
        }

        let writer = Writer::new(conn, cfg.clone(), dir.clone(), shared.clone())?;
        let (tx, rx) = mpsc::channel(cfg.queue_depth);
        let mut threads = Vec::new();
        threads.push(
            std::thread::Builder::new()
                .name("log-writer".into())
                .spawn(move || writer.run(rx))
                .map_err(|e| LogError::Open {
                    path: path.display().to_string(),
                    reason: format!("cannot start the writer thread: {e}"),
                })?,
        );

        let stop = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        {
            let path = path.clone();
            let cfg = cfg.clone();
            let tx = tx.clone();
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("log-housekeeper".into())
                    .spawn(move || housekeeper(&path, &cfg, tx, &stop))
                    .map_err(|e| LogError::Open {
                        path: "log-housekeeper".into(),
                        reason: e.to_string(),
                    })?,
            );
        }
        if cfg.integrity_check == IntegrityCheck::Background {
            let path = path.clone();
            let shared = shared.clone();
            *shared.integrity.lock().unwrap_or_else(|e| e.into_inner()) = IntegrityState::Running;
            // Detached: it only reads, and a process exit while it runs is harmless.
            let _ = std::thread::Builder::new()
                .name("log-integrity".into())
                .spawn(move || {
                    let state = match Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY) {
                        Ok(c) => quick_check(&c),
                        Err(e) => IntegrityState::Failed {
                            problems: vec![format!("cannot open for the check: {e}")],
                        },
                    };
                    if let IntegrityState::Failed { problems } = &state {
                        tracing::error!(?problems, "the local log failed its integrity check; damaged records will be dead-lettered when read");
                    } else {
                        tracing::info!("the local log passed its integrity check");
                    }
                    *shared.integrity.lock().unwrap_or_else(|e| e.into_inner()) = state;
                });
        }

        tracing::info!(path = %path.display(), %epoch, "local log open");
        Ok(SqliteLog {
            path,
            epoch,
            shared,
            tx,
            readers: Arc::new(Mutex::new(Vec::new())),
            closed: AtomicBool::new(false),
            threads: Mutex::new(threads),
            stop_housekeeper: stop,
            _lock: lock,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a pooled read connection in a blocking task.
    async fn with_reader<T, F>(&self, f: F) -> Result<T, LogError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection, &Shared) -> Result<T, LogError> + Send + 'static,
    {
        if self.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        let pool = self.readers.clone();
        let shared = self.shared.clone();
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || {
            let conn = pool.lock().unwrap_or_else(|e| e.into_inner()).pop();
            let conn = match conn {
                Some(c) => c,
                None => open_reader(&path, &shared.config)?,
            };
            let r = f(&conn, &shared);
            let mut p = pool.lock().unwrap_or_else(|e| e.into_inner());
            if p.len() < READ_POOL {
                p.push(conn);
            }
            r
        })
        .await
        .map_err(|e| LogError::Storage {
            op: "reading",
            reason: format!("read task failed: {e}"),
        })?
    }

    fn stream_id(&self, stream: &str) -> Option<i64> {
        self.shared
            .heads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(stream)
            .map(|h| h.0)
    }
}

fn move_aside(path: &Path) -> Result<PathBuf, LogError> {
    let stamp = edge_core::time::now_ms();
    let aside = PathBuf::from(format!("{}.corrupt-{stamp}", path.display()));
    std::fs::rename(path, &aside).map_err(|e| LogError::Open {
        path: path.display().to_string(),
        reason: format!("the database is damaged and could not be moved aside: {e}"),
    })?;
    for ext in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{ext}", path.display()));
        if side.exists() {
            let _ = std::fs::rename(&side, format!("{}{ext}", aside.display()));
        }
    }
    Ok(aside)
}

fn quick_check(conn: &Connection) -> IntegrityState {
    let rows: Result<Vec<String>, _> = conn
        .prepare("PRAGMA quick_check(100)")
        .and_then(|mut s| s.query_map([], |r| r.get(0)).and_then(|it| it.collect()));
    match rows {
        Ok(r) if r.len() == 1 && r[0] == "ok" => IntegrityState::Ok,
        Ok(r) => IntegrityState::Failed { problems: r },
        Err(e) => IntegrityState::Failed {
            problems: vec![e.to_string()],
        },
    }
}

fn housekeeper(
    path: &Path,
    cfg: &LogConfig,
    tx: mpsc::Sender<WriterMsg>,
    stop: &(Mutex<bool>, std::sync::Condvar),
) {
    let conn = match open_reader(path, cfg) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "the log housekeeper could not open the database; the WAL will only be checkpointed at shutdown");
            return;
        }
    };
    let mut since_maintenance = Duration::ZERO;
    loop {
        {
            let guard = stop.0.lock().unwrap_or_else(|e| e.into_inner());
            let (guard, _) = stop
                .1
                .wait_timeout_while(guard, CHECKPOINT_EVERY, |s| !*s)
                .unwrap_or_else(|e| e.into_inner());
            if *guard {
                return;
            }
        }
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(error = %e, "passive checkpoint skipped");
        }
        since_maintenance += CHECKPOINT_EVERY;
        if since_maintenance >= cfg.maintenance_interval {
            since_maintenance = Duration::ZERO;
            // Skip a tick rather than block when the writer's queue is full.
            let _ = tx.try_send(WriterMsg::Maintain(None));
        }
    }
}

#[async_trait]
impl Log for SqliteLog {
    fn epoch(&self) -> Uuid {
        self.epoch
    }

    async fn submit(&self, req: AppendRequest) -> Result<AppendTicket, LogError> {
        if self.closed.load(Ordering::Acquire) {
            return Err(LogError::Closed);
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(WriterMsg::Append(req, reply))
            .await
            .map_err(|_| LogError::Closed)?;
        Ok(AppendTicket::new(rx))
    }

    async fn read(
        &self,
        stream: &str,
        from_seq: u64,
        limits: ReadLimits,
    ) -> Result<ReadBatch, LogError> {
        let Some(sid) = self.stream_id(stream) else {
            return Ok(ReadBatch {
                next_seq: from_seq,
                ..Default::default()
            });
        };
        let name: Arc<str> = Arc::from(stream);
        let batch = self
            .with_reader(move |c, _| {
                queries::read_rows(
                    c,
                    &name,
                    sid,
                    from_seq,
                    limits.max_records,
                    limits.max_bytes,
                )
            })
            .await?;
        for (seq, reason) in &batch.quarantined {
            // Quarantine is idempotent; if the queue is closed the row stays for the next start.
            let _ = self
                .tx
                .send(WriterMsg::Quarantine {
                    stream: stream.to_string(),
                    seq: *seq,
                    reason: reason.clone(),
                })
                .await;
        }
        Ok(batch)
    }

    async fn cursor(&self, cursor: &str, stream: &str) -> Result<Option<u64>, LogError> {
        let (c, s) = (cursor.to_string(), stream.to_string());
        self.with_reader(move |conn, _| queries::cursor(conn, &c, &s))
            .await
    }

    async fn cursors(&self) -> Result<Vec<CursorInfo>, LogError> {
        self.with_reader(|conn, _| queries::cursors(conn)).await
    }

    async fn streams(&self) -> Result<Vec<StreamInfo>, LogError> {
        self.with_reader(|conn, shared| {
            queries::load_stream_infos(conn, &|name| shared.policy(name))
        })
        .await
    }

    async fn oldest_from(&self, stream: &str, from_seq: u64) -> Result<Option<i64>, LogError> {
        let Some(sid) = self.stream_id(stream) else {
            return Ok(None);
        };
        self.with_reader(move |conn, _| queries::oldest_from(conn, sid, from_seq))
            .await
    }

    async fn gaps(&self, after_id: u64, limit: usize) -> Result<Vec<Gap>, LogError> {
        self.with_reader(move |conn, _| queries::gaps(conn, after_id, limit))
            .await
    }

    async fn gap_summary(&self) -> Result<Vec<GapSummary>, LogError> {
        self.with_reader(|conn, _| queries::gap_summary(conn)).await
    }

    async fn kv_get(&self, key: &str) -> Result<Option<Vec<u8>>, LogError> {
        let k = key.to_string();
        self.with_reader(move |conn, _| queries::kv_get(conn, &k))
            .await
    }

    async fn usage(&self) -> Result<DiskUsage, LogError> {
        let mut u = *self.shared.usage.lock().unwrap_or_else(|e| e.into_inner());
        let wal = PathBuf::from(format!("{}-wal", self.path.display()));
        u.wal_bytes = std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0);
        u.full = self.shared.full.load(Ordering::Relaxed);
        Ok(u)
    }

    async fn maintain(&self) -> Result<MaintenanceReport, LogError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(WriterMsg::Maintain(Some(reply)))
            .await
            .map_err(|_| LogError::Closed)?;
        rx.await.unwrap_or(Err(LogError::Closed))
    }

    fn integrity(&self) -> IntegrityState {
        self.shared
            .integrity
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn subscribe(&self) -> watch::Receiver<u64> {
        self.shared.generation.subscribe()
    }

    fn next_seq(&self, stream: &str) -> Option<u64> {
        self.shared
            .heads
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(stream)
            .map(|h| h.1)
    }

    async fn close(&self) -> Result<(), LogError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Err(LogError::Closed);
        }
        {
            let (lock, cv) = &*self.stop_housekeeper;
            *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
            cv.notify_all();
        }
        let (reply, rx) = oneshot::channel();
        let r = if self.tx.send(WriterMsg::Close(reply)).await.is_ok() {
            rx.await.unwrap_or(Ok(()))
        } else {
            Ok(())
        };
        self.readers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await
        .map_err(|e| LogError::Storage {
            op: "closing",
            reason: e.to_string(),
        })?;
        tracing::info!(path = %self.path.display(), "local log closed");
        r
    }
}

impl Drop for SqliteLog {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop_housekeeper;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
}

/// Read-only access to a log another process may be writing (the CLI's `status` and `log`
/// commands). Takes no lock and never writes.
pub struct LogInspector {
    conn: Connection,
    config: LogConfig,
    path: PathBuf,
}

impl LogInspector {
    pub fn open(data_dir: &Path, config: LogConfig) -> Result<LogInspector, LogError> {
        let path = db_path(data_dir, &config);
        if !path.exists() {
            return Err(LogError::Open {
                path: path.display().to_string(),
                reason: "no local log exists there yet (has the agent run with this config?)"
                    .into(),
            });
        }
        let conn = Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(open_err(&path))?;
        conn.busy_timeout(Duration::from_secs(5))
            .map_err(open_err(&path))?;
        Ok(LogInspector { conn, config, path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn epoch(&self) -> Result<Uuid, LogError> {
        queries::read_epoch(&self.conn)
    }

    pub fn streams(&self) -> Result<Vec<StreamInfo>, LogError> {
        queries::load_stream_infos(&self.conn, &|n| self.config.policy(n))
    }

    pub fn cursors(&self) -> Result<Vec<CursorInfo>, LogError> {
        queries::cursors(&self.conn)
    }

    pub fn gaps(&self, after_id: u64, limit: usize) -> Result<Vec<Gap>, LogError> {
        queries::gaps(&self.conn, after_id, limit)
    }

    pub fn gap_summary(&self) -> Result<Vec<GapSummary>, LogError> {
        queries::gap_summary(&self.conn)
    }

    pub fn oldest_from(&self, stream: &str, from_seq: u64) -> Result<Option<i64>, LogError> {
        match queries::stream_id(&self.conn, stream)? {
            Some(id) => queries::oldest_from(&self.conn, id, from_seq),
            None => Ok(None),
        }
    }

    /// Reads records; damaged rows are reported in `quarantined` but left in place (the agent
    /// quarantines them when it reads them).
    pub fn read(
        &self,
        stream: &str,
        from_seq: u64,
        limits: ReadLimits,
    ) -> Result<ReadBatch, LogError> {
        let Some(id) = queries::stream_id(&self.conn, stream)? else {
            return Err(LogError::Invalid(format!(
                "the log has no stream named {stream:?}"
            )));
        };
        let name: Arc<str> = Arc::from(stream);
        queries::read_rows(
            &self.conn,
            &name,
            id,
            from_seq,
            limits.max_records,
            limits.max_bytes,
        )
    }

    pub fn usage(&self) -> Result<DiskUsage, LogError> {
        let (used, file) =
            queries::page_usage(&self.conn).map_err(storage("measuring disk use"))?;
        let wal = PathBuf::from(format!("{}-wal", self.path.display()));
        let fs_free = self
            .path
            .parent()
            .and_then(|d| nix::sys::statvfs::statvfs(d).ok())
            .map(|s| s.blocks_available() * s.fragment_size())
            .unwrap_or(0);
        Ok(DiskUsage {
            used_bytes: used,
            file_bytes: file,
            wal_bytes: std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0),
            budget_bytes: self.config.disk_budget.as_u64(),
            fs_free_bytes: fs_free,
            full: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn new_databases_can_return_free_pages_to_the_filesystem() {
        let dir = tempfile::tempdir().unwrap();
        let log = SqliteLog::open(dir.path(), LogConfig::default()).unwrap();
        log.close().await.unwrap();
        drop(log);
        let conn = Connection::open(dir.path().join("log.db")).unwrap();
        let mode: i64 = conn
            .query_row("PRAGMA auto_vacuum", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, 2, "auto_vacuum = INCREMENTAL (set before WAL mode)");
        let journal: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
    }
}
