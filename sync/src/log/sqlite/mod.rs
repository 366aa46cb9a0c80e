//! The SQLite implementation of the local log.
//!
//! Threads:
//! * the **writer** (`writer.rs`) owns the only writing connection and does group commit;
//! * the **housekeeper** runs passive WAL checkpoints (so commits never pay for them) and sends the
//!   periodic maintenance request to the writer;
//! * reads run on pooled read connections inside `spawn_blocking`;
//! * an optional **integrity** thread runs `PRAGMA quick_check` once after start-up. It holds one
//!   read snapshot for the whole check, and while it does the WAL cannot be reset, so the
//!   housekeeper interrupts it when the WAL grows past `wal_size_limit` (a big log under steady
//!   ingest) and it is tried again an hour later; `close` interrupts it too, so the final
//!   checkpoint can truncate the WAL.
//!
//! A lock file next to the database (`flock`) keeps a second agent from opening the same log.
//!
//! File modes do not depend on the umask: the database and its `-wal`/`-shm` are 0640 (the
//! service's group may read them, nobody else), the lock file 0600. The database is created
//! before SQLite opens it, because SQLite creates a new database 0644 whatever the umask and
//! gives its `-wal` and `-shm` the database's mode.

mod evict;
mod quarantine;
pub(crate) mod queries;
mod retention;
mod space;
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
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
/// Pause before a postponed background integrity check is tried again.
const INTEGRITY_RETRY: Duration = Duration::from_secs(3600);
/// Longest time a WAL restart may keep the writer waiting.
const RESTART_WAIT: Duration = Duration::from_millis(50);
/// Page cache of the integrity check's connection (it reads every page once).
const INTEGRITY_CACHE_KIB: i64 = 2048;

/// State shared by the writer, the readers and the handle.
pub(crate) struct Shared {
    /// stream name -> (stream id, next seq), updated after every commit.
    pub(crate) heads: RwLock<HashMap<String, (i64, u64)>>,
    pub(crate) generation: watch::Sender<u64>,
    pub(crate) full: AtomicBool,
    pub(crate) usage: Mutex<DiskUsage>,
    pub(crate) integrity: Mutex<IntegrityState>,
    /// Interrupts the running background integrity check, if one runs.
    pub(crate) integrity_interrupt: Mutex<Option<rusqlite::InterruptHandle>>,
    /// Size of the WAL's content at the last checkpoint (frames x frame size).
    pub(crate) wal_bytes: AtomicU64,
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

/// Mode of the database and its `-wal` and `-shm` files.
pub const DB_FILE_MODE: u32 = 0o640;
/// Mode of the lock file.
pub const LOCK_FILE_MODE: u32 = 0o600;

/// Creates the database file with [`DB_FILE_MODE`] if it is missing, and sets that mode on the
/// database and its side files that exist (a log created by an older agent, or under another
/// umask).
fn secure_db_files(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(DB_FILE_MODE)
        .open(path)?;
    for p in [
        path.to_path_buf(),
        PathBuf::from(format!("{}-wal", path.display())),
        PathBuf::from(format!("{}-shm", path.display())),
    ] {
        match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(DB_FILE_MODE)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r?,
        }
    }
    Ok(())
}

fn open_writer_connection(path: &Path, cfg: &LogConfig) -> Result<Connection, rusqlite::Error> {
    secure_db_files(path).map_err(|e| {
        rusqlite::Error::InvalidParameterName(format!(
            "cannot create the database file or set its mode to {DB_FILE_MODE:o}: {e}"
        ))
    })?;
    let mut conn = Connection::open(path)?;
    // The header must be readable before anything else; a damaged file fails here.
    conn.query_row("PRAGMA schema_version", [], |r| r.get::<_, i64>(0))?;
    if queries::schema_version(&conn)? == 0 {
        // Only possible on a new database, and only before WAL mode is switched on: free pages can
        // then be returned to the filesystem (incremental_vacuum) when the free-space floor is hit.
        // The page size first: once auto_vacuum or WAL mode is set it is fixed.
        conn.pragma_update(None, "page_size", i64::from(cfg.page_size))?;
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
        let lock_file = {
            use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
            File::options()
                .create(true)
                .truncate(false)
                .write(true)
                .mode(LOCK_FILE_MODE)
                .open(&lock_path)
                .and_then(|f| {
                    f.set_permissions(std::fs::Permissions::from_mode(LOCK_FILE_MODE))?;
                    Ok(f)
                })
                .map_err(|e| LogError::Open {
                    path: lock_path.display().to_string(),
                    reason: format!("cannot create the lock file: {e}"),
                })?
        };
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
                min_free_bytes: cfg.min_free_disk.as_u64(),
                ..Default::default()
            }),
            integrity: Mutex::new(IntegrityState::NotRun),
            integrity_interrupt: Mutex::new(None),
            wal_bytes: AtomicU64::new(0),
            config: cfg.clone(),
        });

        if cfg.integrity_check == IntegrityCheck::Blocking {
            let state = quick_check(&conn);
            *shared.integrity.lock().unwrap_or_else(|e| e.into_inner()) = state;
        }

        let writer = Writer::new(conn, cfg.clone(), &path, shared.clone())?;
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
            let shared = shared.clone();
            let tx = tx.clone();
            let stop = stop.clone();
            threads.push(
                std::thread::Builder::new()
                    .name("log-housekeeper".into())
                    .spawn(move || housekeeper(&path, &cfg, &shared, tx, &stop))
                    .map_err(|e| LogError::Open {
                        path: "log-housekeeper".into(),
                        reason: e.to_string(),
                    })?,
            );
        }
        if cfg.integrity_check == IntegrityCheck::Background {
            let path = path.clone();
            let shared = shared.clone();
            let stop = stop.clone();
            *shared.integrity.lock().unwrap_or_else(|e| e.into_inner()) = IntegrityState::Running;
            threads.push(
                std::thread::Builder::new()
                    .name("log-integrity".into())
                    .spawn(move || background_integrity(&path, &shared, &stop))
                    .map_err(|e| LogError::Open {
                        path: "log-integrity".into(),
                        reason: e.to_string(),
                    })?,
            );
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
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::OperationInterrupted =>
        {
            IntegrityState::Postponed {
                reason: "interrupted".into(),
            }
        }
        Err(e) => IntegrityState::Failed {
            problems: vec![e.to_string()],
        },
    }
}

/// Waits up to `d` for the stop flag; returns whether it is set.
fn wait_stop(stop: &(Mutex<bool>, std::sync::Condvar), d: Duration) -> bool {
    let guard = stop.0.lock().unwrap_or_else(|e| e.into_inner());
    let (guard, _) = stop
        .1
        .wait_timeout_while(guard, d, |s| !*s)
        .unwrap_or_else(|e| e.into_inner());
    *guard
}

/// The background integrity check: runs once, or again [`INTEGRITY_RETRY`] later each time the
/// housekeeper had to interrupt it because the WAL outgrew `wal_size_limit` meanwhile.
fn background_integrity(path: &Path, shared: &Shared, stop: &(Mutex<bool>, std::sync::Condvar)) {
    let set = |st: IntegrityState| {
        *shared.integrity.lock().unwrap_or_else(|e| e.into_inner()) = st;
    };
    loop {
        if wait_stop(stop, Duration::ZERO) {
            return;
        }
        set(IntegrityState::Running);
        let state = match Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY) {
            Ok(c) => {
                let _ = c.pragma_update(None, "cache_size", -INTEGRITY_CACHE_KIB);
                *shared
                    .integrity_interrupt
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = Some(c.get_interrupt_handle());
                let st = if wait_stop(stop, Duration::ZERO) {
                    return;
                } else {
                    quick_check(&c)
                };
                *shared
                    .integrity_interrupt
                    .lock()
                    .unwrap_or_else(|e| e.into_inner()) = None;
                st
            }
            Err(e) => IntegrityState::Failed {
                problems: vec![format!("cannot open for the check: {e}")],
            },
        };
        match state {
            IntegrityState::Postponed { .. } => {
                if wait_stop(stop, Duration::ZERO) {
                    return;
                }
                let reason = format!(
                    "the WAL grew past wal_size_limit ({}) while the check held its read snapshot (a large log under steady ingest); tried again in {} min; records are CRC-checked on every read meanwhile",
                    shared.config.wal_size_limit,
                    INTEGRITY_RETRY.as_secs() / 60
                );
                tracing::info!(%reason, "the local log's integrity check was postponed");
                metrics::counter!("edge_log_integrity_postponed_total").increment(1);
                set(IntegrityState::Postponed { reason });
                if wait_stop(stop, INTEGRITY_RETRY) {
                    return;
                }
            }
            IntegrityState::Failed { ref problems } => {
                tracing::error!(
                    ?problems,
                    "the local log failed its integrity check; damaged records will be dead-lettered when read"
                );
                set(state);
                return;
            }
            other => {
                tracing::info!("the local log passed its integrity check");
                set(other);
                return;
            }
        }
    }
}

/// Brings an overgrown WAL back to its start. The WAL restarts only from a fully checkpointed log
/// that no reader still reads: the integrity check holds one snapshot for as long as it reads the
/// whole database (so it is interrupted), and under steady writes a passive checkpoint never
/// catches up with the writer (so a RESTART checkpoint makes the writer wait for at most
/// [`RESTART_WAIT`] while it copies what the passive one left).
/// Returns whether the WAL was restarted.
fn restart_wal(conn: &Connection, shared: &Shared, wal_bytes: u64) -> bool {
    if interrupt_integrity(shared) {
        tracing::debug!(wal_bytes, "interrupting the integrity check");
    }
    let _ = conn.busy_timeout(RESTART_WAIT);
    let done = match conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |r| r.get::<_, i64>(0)) {
        Ok(0) => {
            metrics::counter!("edge_log_wal_restarts_total").increment(1);
            true
        }
        Ok(_) => {
            tracing::debug!(
                wal_bytes,
                "WAL restart deferred: a reader or the writer was busy"
            );
            false
        }
        Err(e) => {
            tracing::debug!(error = %e, "WAL restart checkpoint failed");
            false
        }
    };
    let _ = conn.busy_timeout(Duration::from_secs(5));
    done
}

/// Interrupts the background integrity check if it runs.
fn interrupt_integrity(shared: &Shared) -> bool {
    match shared
        .integrity_interrupt
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .as_ref()
    {
        Some(h) => {
            h.interrupt();
            true
        }
        None => false,
    }
}

fn housekeeper(
    path: &Path,
    cfg: &LogConfig,
    shared: &Shared,
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
    let frame_bytes = conn
        .query_row("PRAGMA page_size", [], |r| r.get::<_, i64>(0))
        .map_or(4096 + 24, |p| p.max(512) as u64 + 24);
    let mut since_maintenance = Duration::ZERO;
    // A reader with a long snapshot (e.g. `edge-agent log export` in another process) makes every
    // RESTART wait in vain while the writer waits too: back off, 0.25 s doubling to 30 s.
    let (mut restart_failures, mut next_restart) = (0u32, std::time::Instant::now());
    loop {
        if wait_stop(stop, CHECKPOINT_EVERY) {
            return;
        }
        // (busy, frames in the WAL, frames checkpointed)
        match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1)) {
            Ok(frames) => {
                let bytes = frames.max(0) as u64 * frame_bytes;
                shared.wal_bytes.store(bytes, Ordering::Relaxed);
                if bytes > cfg.wal_size_limit.as_u64() && std::time::Instant::now() >= next_restart
                {
                    if restart_wal(&conn, shared, bytes) {
                        restart_failures = 0;
                    } else {
                        restart_failures = (restart_failures + 1).min(8);
                        next_restart = std::time::Instant::now()
                            + (CHECKPOINT_EVERY * (1 << (restart_failures - 1)))
                                .min(Duration::from_secs(30));
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "passive checkpoint skipped"),
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

    fn writer_alive(&self) -> bool {
        // The writer thread owns the receiver: it is dropped when the thread ends, panic or not.
        !self.tx.is_closed()
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
        // The integrity check's snapshot would keep the final checkpoint from truncating the WAL.
        let integrity = {
            let mut threads = self.threads.lock().unwrap_or_else(|e| e.into_inner());
            threads
                .iter()
                .position(|t| t.thread().name() == Some("log-integrity"))
                .map(|i| threads.remove(i))
        };
        if let Some(t) = integrity {
            let shared = self.shared.clone();
            let _ = tokio::task::spawn_blocking(move || {
                while !t.is_finished() {
                    interrupt_integrity(&shared);
                    std::thread::sleep(Duration::from_millis(5));
                }
                let _ = t.join();
            })
            .await;
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

    /// Disk use as the files show it. The per-class figures and the full state are the running
    /// writer's (the daemon's `/status`); here they are empty and `full` is false.
    pub fn usage(&self) -> Result<DiskUsage, LogError> {
        let (used, file) =
            queries::page_usage(&self.conn).map_err(storage("measuring disk use"))?;
        let wal = PathBuf::from(format!("{}-wal", self.path.display()));
        let fs_free = self.path.parent().and_then(space::fs_free).unwrap_or(0);
        Ok(DiskUsage {
            used_bytes: used,
            file_bytes: file,
            reclaimable_bytes: file.saturating_sub(used),
            wal_bytes: std::fs::metadata(wal).map(|m| m.len()).unwrap_or(0),
            reserve_bytes: space::reserve_bytes(&self.path),
            moved_aside_bytes: space::moved_aside_bytes(&self.path),
            budget_bytes: self.config.disk_budget.as_u64(),
            fs_free_bytes: fs_free,
            min_free_bytes: self.config.min_free_disk.as_u64(),
            ..Default::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log::Appended;
    use edge_core::Event;
    use edge_core::config::ByteSize;

    fn wal_len(dir: &Path) -> u64 {
        std::fs::metadata(dir.join("log.db-wal")).map_or(0, |m| m.len())
    }

    /// A background integrity check holds one read snapshot for as long as it reads the whole
    /// database, and the WAL cannot restart while it does: under steady ingest into a large log
    /// the WAL grew by gigabytes during the check (its shared-memory index with it, resident),
    /// and a check still running at shutdown kept the final checkpoint from truncating the WAL
    /// (the stop waited 5 s for it, and the next start replayed the whole WAL). The housekeeper
    /// interrupts the check once the WAL passes `wal_size_limit`; `close` interrupts it too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_background_integrity_check_never_holds_the_wal_back() {
        let dir = tempfile::tempdir().unwrap();
        let quiet = LogConfig {
            integrity_check: IntegrityCheck::Off,
            synchronous: Synchronous::Normal,
            ..LogConfig::default()
        };
        // A large database (a table of small rows written in C by SQLite itself; the log ignores
        // tables it does not know), out of the page cache, so that quick_check reads from disk
        // for a few seconds as it would on a store's SD card.
        let log = SqliteLog::open(dir.path(), quiet.clone()).unwrap();
        log.close().await.unwrap();
        drop(log);
        let c = Connection::open(dir.path().join("log.db")).unwrap();
        c.execute_batch(
            "CREATE TABLE filler(x BLOB);
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 3000000)
             INSERT INTO filler SELECT randomblob(48) FROM n;
             CREATE INDEX filler_x ON filler(x);
             PRAGMA wal_checkpoint(TRUNCATE);",
        )
        .unwrap();
        drop(c);
        let db = File::open(dir.path().join("log.db")).unwrap();
        db.sync_all().unwrap();
        nix::fcntl::posix_fadvise(
            &db,
            0,
            0,
            nix::fcntl::PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        )
        .unwrap();

        let cfg = LogConfig {
            integrity_check: IntegrityCheck::Background,
            wal_size_limit: ByteSize::mib(1),
            ..quiet
        };
        let log = Arc::new(SqliteLog::open(dir.path(), cfg).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (log, stop) = (log.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = 0u64;
                // ~5000 records/s, the product's ingest target.
                let mut tick = tokio::time::interval(Duration::from_millis(10));
                while !stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let evs = (0..50)
                        .map(|_| {
                            i += 1;
                            Event::new("pos.transactions", vec![b'y'; 300]).with_event_ts(i as i64)
                        })
                        .collect();
                    log.append(AppendRequest::events(evs)).await.unwrap();
                }
            })
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let mut max_wal = 0;
        while matches!(
            log.integrity(),
            IntegrityState::Running | IntegrityState::NotRun
        ) {
            max_wal = max_wal.max(wal_len(dir.path()));
            assert!(
                std::time::Instant::now() < deadline,
                "the check neither ended nor was postponed"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let state = log.integrity();
        assert!(
            matches!(state, IntegrityState::Postponed { ref reason } if reason.contains("wal_size_limit")),
            "the check was postponed for the WAL, got {state:?}"
        );
        // With the check out of the way the WAL keeps restarting under steady ingest: it stays
        // near its limit instead of growing with every commit.
        let mut after = 0;
        for _ in 0..150 {
            tokio::time::sleep(Duration::from_millis(20)).await;
            after = after.max(log.shared.wal_bytes.load(Ordering::Relaxed));
        }
        eprintln!("largest WAL content in the 3 s after the check: {after} bytes");
        assert!(
            after < 4 << 20,
            "WAL content after the check: {after} bytes"
        );
        stop.store(true, Ordering::Relaxed);
        writer.await.unwrap();
        eprintln!("largest WAL file while the check ran: {max_wal} bytes");

        // A check running at shutdown does not keep the WAL: close interrupts it and truncates.
        let log = Arc::into_inner(log).unwrap();
        log.close().await.unwrap();
        drop(log);
        let log = SqliteLog::open(
            dir.path(),
            LogConfig {
                integrity_check: IntegrityCheck::Background,
                ..LogConfig::default()
            },
        )
        .unwrap();
        log.append(AppendRequest::events(vec![Event::new(
            "pos.transactions",
            b"{}".to_vec(),
        )]))
        .await
        .unwrap();
        assert_eq!(log.integrity(), IntegrityState::Running);
        let t = std::time::Instant::now();
        log.close().await.unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "close took {:?}",
            t.elapsed()
        );
        assert_eq!(wal_len(dir.path()), 0, "the WAL was truncated at close");
    }

    /// Issue 12, "pruning keeps up with intake": the housekeeper's maintenance request is
    /// skipped while the writer's queue is full, and under a sustained flood it always is. The
    /// dedup index then grew with the flood (observed without the fix: 60,129 entries after
    /// 80,770 records, against a window of 1,000). Overdue maintenance now runs between batches, so the index stays near its window.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_dedup_window_holds_under_a_flood_that_keeps_the_queue_full() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = LogConfig {
            integrity_check: IntegrityCheck::Off,
            synchronous: Synchronous::Normal,
            queue_depth: 2,
            max_batch_records: 16,
            dedup_window: 1_000,
            maintenance_interval: Duration::from_millis(100),
            ..LogConfig::default()
        };
        let log = Arc::new(SqliteLog::open(dir.path(), cfg).unwrap());
        let until = std::time::Instant::now() + Duration::from_secs(3);
        let mut tasks = Vec::new();
        for t in 0..16 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while std::time::Instant::now() < until {
                    i += 1;
                    let ev = Event::new("pos.scans", b"{}".to_vec())
                        .with_event_id(format!("t{t}-{i}"))
                        .with_event_ts(1);
                    log.append(AppendRequest::one(ev)).await.unwrap();
                }
                i
            }));
        }
        let mut total = 0;
        for t in tasks {
            total += t.await.unwrap();
        }
        let conn = Connection::open(dir.path().join("log.db")).unwrap();
        let entries: i64 = conn
            .query_row("SELECT count(*) FROM dedup", [], |r| r.get(0))
            .unwrap();
        drop(conn);
        assert!(total > 5_000, "the flood appended {total} records");
        // The window, plus at most what arrives within twice the maintenance interval.
        assert!(
            (entries as u64) < 1_000 + total / 5,
            "{entries} dedup entries after {total} records, window 1000"
        );
        log.close().await.unwrap();
    }

    /// A writer thread that ends on a panic leaves a log that cannot commit: health probes see
    /// it at once (`writer_alive`, which `/healthz`, `/readyz` and the watchdog consult) and
    /// every append fails instead of hanging, so nothing is acknowledged.
    #[tokio::test]
    async fn a_dead_writer_is_visible_and_appends_fail() {
        let dir = tempfile::tempdir().unwrap();
        let log = SqliteLog::open(dir.path(), LogConfig::default()).unwrap();
        assert!(log.writer_alive());
        log.append(AppendRequest::one(Event::new("s", b"1".to_vec())))
            .await
            .unwrap();
        log.tx.send(WriterMsg::Panic).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while log.writer_alive() {
            assert!(
                std::time::Instant::now() < deadline,
                "the writer is still reported alive"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let r = tokio::time::timeout(
            Duration::from_secs(5),
            log.append(AppendRequest::one(Event::new("s", b"2".to_vec()))),
        )
        .await
        .expect("an append to a dead writer returns");
        assert!(matches!(r, Err(LogError::Closed)), "{r:?}");
    }

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

    /// `page_size` chooses the page size of a new database; an existing one keeps its own, and
    /// records written with either size read back the same.
    #[tokio::test]
    async fn page_size_applies_to_new_databases_only() {
        let dir = tempfile::tempdir().unwrap();
        let small = LogConfig {
            page_size: 1024,
            ..LogConfig::default()
        };
        let big = "x".repeat(3000); // longer than a 1 KiB page: an overflow chain
        let log = SqliteLog::open(dir.path(), small).unwrap();
        log.append(AppendRequest::events(vec![
            Event::new("s", b"small".to_vec()),
            Event::new("s", big.clone().into_bytes()),
        ]))
        .await
        .unwrap();
        log.close().await.unwrap();
        drop(log);
        let page = |dir: &Path| -> i64 {
            Connection::open(dir.join("log.db"))
                .unwrap()
                .query_row("PRAGMA page_size", [], |r| r.get(0))
                .unwrap()
        };
        assert_eq!(page(dir.path()), 1024);
        // Reopened with the default: still 1 KiB pages, and both records intact.
        let log = SqliteLog::open(dir.path(), LogConfig::default()).unwrap();
        log.append(AppendRequest::one(Event::new("s", b"third".to_vec())))
            .await
            .unwrap();
        let got = log.read("s", 1, ReadLimits::default()).await.unwrap();
        let payloads: Vec<&[u8]> = got
            .records
            .iter()
            .map(|r| r.event.payload.as_ref())
            .collect();
        assert_eq!(
            payloads,
            [b"small".as_ref(), big.as_bytes(), b"third".as_ref()]
        );
        log.close().await.unwrap();
        drop(log);
        assert_eq!(page(dir.path()), 1024);
        let mut problems = edge_core::config::Problems::default();
        LogConfig {
            page_size: 3000,
            ..LogConfig::default()
        }
        .validate("log", &mut problems);
        assert!(
            format!("{problems:?}").contains("log.page_size"),
            "{problems:?}"
        );
    }

    /// `commit_interval_ms` gathers a steady trickle into few commits: a record every 10 ms
    /// for 0.6 s is acknowledged in at most one burst per 100 ms interval (about 6), where
    /// without it each record is its own commit. Every record is still acknowledged, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn commit_interval_gathers_a_trickle_into_few_commits() {
        async fn ack_bursts(interval_ms: u64) -> (usize, Vec<u64>, u128) {
            let dir = tempfile::tempdir().unwrap();
            let cfg = LogConfig {
                commit_interval_ms: interval_ms,
                ..LogConfig::default()
            };
            let log = Arc::new(SqliteLog::open(dir.path(), cfg).unwrap());
            let t0 = std::time::Instant::now();
            let mut acks = Vec::new();
            for i in 0..60 {
                let ticket = log
                    .submit(AppendRequest::one(Event::new(
                        "s",
                        format!("{i}").into_bytes(),
                    )))
                    .await
                    .unwrap();
                acks.push(tokio::spawn(async move {
                    let o = ticket.await.unwrap();
                    (std::time::Instant::now(), o.appended[0].seq())
                }));
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut done = Vec::new();
            for a in acks {
                done.push(a.await.unwrap());
            }
            log.close().await.unwrap();
            let seqs = done.iter().map(|d| d.1).collect();
            let mut times: Vec<u128> = done.iter().map(|d| (d.0 - t0).as_micros()).collect();
            times.sort_unstable();
            // Acks of one commit are sent together; 3 ms apart is another commit.
            let bursts = 1 + times.windows(2).filter(|w| w[1] - w[0] > 5_000).count();
            let elapsed_ms = times.last().copied().unwrap_or(0) / 1000;
            (bursts, seqs, elapsed_ms)
        }
        let (bursts, seqs, elapsed_ms) = ack_bursts(100).await;
        assert_eq!(seqs, (1..=60).collect::<Vec<u64>>());
        // About one commit per 100 ms of the run (plus slack for slow wake-ups), however slowly the
        // machine ran the trickle (under qemu it takes longer than 0.6 s).
        let bound = elapsed_ms as usize / 100 + 6;
        assert!(
            bursts <= bound,
            "{bursts} commits in {elapsed_ms} ms at a 100 ms interval (at most {bound})"
        );
        // The control: without the interval the trickle is not gathered like that.
        let (bursts0, _, _) = ack_bursts(0).await;
        assert!(
            bursts0 > bursts,
            "{bursts0} commits without the interval, {bursts} with"
        );
    }

    /// A moved-aside damaged database counts against the budget: only the newest is kept (older
    /// ones are deleted at open), and when the budget needs the room it goes before any
    /// unmirrored record, with no gap (it is not a record of this log).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn moved_aside_databases_are_rotated_and_count_against_the_budget() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("log.db.corrupt-100"), vec![0u8; 4096]).unwrap();
        std::fs::write(dir.path().join("log.db.corrupt-200"), vec![0u8; 300 << 10]).unwrap();
        std::fs::write(dir.path().join("log.db.corrupt-200-wal"), vec![0u8; 4096]).unwrap();
        let cfg = LogConfig {
            integrity_check: IntegrityCheck::Off,
            disk_budget: ByteSize::mib(1),
            min_free_disk: ByteSize::b(0),
            ..LogConfig::default()
        };
        let log = SqliteLog::open(dir.path(), cfg).unwrap();
        assert!(
            !dir.path().join("log.db.corrupt-100").exists(),
            "the older copy was rotated out"
        );
        let u = log.usage().await.unwrap();
        assert_eq!(u.moved_aside_bytes, (300 << 10) + 4096, "{u:?}");
        // 0.6 MB of low records: with the copy the budget is exceeded, without it not.
        for chunk in 0..6 {
            log.append(AppendRequest::events(
                (0..100)
                    .map(|i| {
                        Event::new("beacon.sightings", vec![b'x'; 1000])
                            .with_event_ts(chunk * 100 + i)
                    })
                    .collect(),
            ))
            .await
            .unwrap();
        }
        log.maintain().await.unwrap();
        let u = log.usage().await.unwrap();
        assert_eq!(u.moved_aside_bytes, 0, "the copy made room: {u:?}");
        assert!(!dir.path().join("log.db.corrupt-200").exists());
        assert!(
            log.gaps(0, 10).await.unwrap().is_empty(),
            "no unmirrored record was evicted while the copy could go"
        );
        assert_eq!(log.next_seq("beacon.sightings"), Some(601));
        log.close().await.unwrap();
    }

    /// A log written by schema version 1 (dedup keyed by stream and event id) keeps recognising
    /// its remembered ids after the upgrade, now per source: an entry takes its record's source,
    /// and an over-long id takes the digest form the writer looks up.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn migration_2_scopes_remembered_ids_by_their_records_source() {
        let dir = tempfile::tempdir().unwrap();
        let long_id = "r".repeat(500);
        {
            let c = Connection::open(dir.path().join("log.db")).unwrap();
            c.execute_batch(include_str!("migrations/0001_init.sql"))
                .unwrap();
            c.execute_batch(
                "INSERT INTO meta (key, value) VALUES ('epoch', '6f1c2a52-8f7e-4a43-9a43-2f1e1f1b2c3d');
                 INSERT INTO streams (id, name, next_seq, record_count, payload_bytes, created_ts)
                   VALUES (1, 'pos.receipts', 3, 2, 4, 0);
                 PRAGMA user_version = 1;",
            )
            .unwrap();
            for (seq, id) in [(1u64, "r-1"), (2, long_id.as_str())] {
                let crc = queries::record_crc(
                    "pos.receipts",
                    seq,
                    0,
                    0,
                    None,
                    Some("printer-1"),
                    Some(id),
                    None,
                    None,
                    b"{}",
                );
                c.execute(
                    "INSERT INTO records (id, event_ts, ingest_ts, key, source, event_id, schema, headers, payload, crc)
                     VALUES (?1, 0, 0, NULL, 'printer-1', ?2, NULL, NULL, CAST('{}' AS BLOB), ?3)",
                    rusqlite::params![queries::row_id(1, seq), id, i64::from(crc)],
                )
                .unwrap();
                c.execute(
                    "INSERT INTO dedup (stream_id, event_id, seq) VALUES (1, ?1, ?2)",
                    rusqlite::params![id, seq as i64],
                )
                .unwrap();
            }
        }
        let cfg = LogConfig {
            integrity_check: IntegrityCheck::Off,
            ..LogConfig::default()
        };
        let log = SqliteLog::open(dir.path(), cfg).unwrap();
        let sale = |src: &str, id: &str| {
            Event::new("pos.receipts", &b"{}"[..])
                .with_source(src)
                .with_event_id(id)
        };
        let out = log
            .append(AppendRequest::events(vec![
                sale("printer-1", "r-1"),
                sale("printer-1", &long_id),
                sale("printer-2", "r-1"),
            ]))
            .await
            .unwrap();
        assert_eq!(
            out.appended,
            vec![
                Appended::Duplicate { seq: 1 },
                Appended::Duplicate { seq: 2 },
                Appended::New { seq: 3 },
            ]
        );
        log.close().await.unwrap();
    }
}
