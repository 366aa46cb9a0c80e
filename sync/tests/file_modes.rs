//! The local log's files get their modes whatever the process umask: database, `-wal` and
//! `-shm` 0640, lock 0600. Its own test binary, because the umask is per process and the test
//! sets it to 0 (the most permissive an operator's shell or a unit file can leave).
#![allow(clippy::unwrap_used)]

use edge_core::Event;
use edge_core::log::{AppendRequest, Log};
use edge_sync::log::sqlite::{DB_FILE_MODE, LOCK_FILE_MODE};
use edge_sync::log::{LogConfig, SqliteLog};
use nix::sys::stat::{Mode, umask};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o777
}

#[tokio::test]
async fn log_files_are_private_under_a_umask_of_zero() {
    assert_eq!((DB_FILE_MODE, LOCK_FILE_MODE), (0o640, 0o600));
    umask(Mode::empty());
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = LogConfig::default();
    let db = edge_sync::log::sqlite::db_path(&data, &cfg);
    let side = |ext: &str| std::path::PathBuf::from(format!("{}{ext}", db.display()));

    let log = SqliteLog::open(&data, cfg.clone()).unwrap();
    log.append(AppendRequest::one(Event::new(
        "pos.transactions",
        &b"{}"[..],
    )))
    .await
    .unwrap();
    // A file created under this umask without an explicit mode is world-writable: the check
    // below can fail.
    std::fs::write(dir.path().join("probe"), b"").unwrap();
    assert_eq!(mode(&dir.path().join("probe")), 0o666);
    assert_eq!(mode(&db), 0o640, "database");
    assert_eq!(mode(&side("-wal")), 0o640, "WAL");
    assert_eq!(mode(&side("-shm")), 0o640, "shared memory index");
    assert_eq!(mode(&db.with_extension("lock")), 0o600, "lock file");
    log.close().await.unwrap();
    drop(log);

    // Files left with other modes (an older agent, a restore with `cp`) are tightened at open.
    for p in [db.clone(), db.with_extension("lock")] {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let log = SqliteLog::open(&data, cfg).unwrap();
    assert_eq!(mode(&db), 0o640);
    assert_eq!(mode(&db.with_extension("lock")), 0o600);
    log.close().await.unwrap();
}
