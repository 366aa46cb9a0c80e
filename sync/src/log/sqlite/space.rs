//! What the log holds on its filesystem besides its pages: the reserve file and moved-aside
//! damaged databases, and the free space the filesystem reports.
//!
//! The **reserve** is a preallocated file next to the database (`<db>.reserve`). SQLite needs
//! room in the WAL to delete anything, so on a filesystem at 0 bytes free an eviction would
//! fail with "database or disk is full" and nothing could ever be freed. Before an eviction or
//! a reclaim on a short filesystem the writer deletes the reserve, which gives that transaction
//! its room; it is recreated once the filesystem has the reserve plus `min_free_disk` free again.
//!
//! **Moved-aside databases** (`<db>.corrupt-<ms>`, with their `-wal`/`-shm`) are kept for
//! forensics, newest only: older ones are deleted at open. The one kept counts against the disk
//! budget, and eviction deletes it before it evicts any unmirrored record.

use std::path::{Path, PathBuf};

/// Size of the reserve file. It covers one eviction transaction (a few hundred WAL frames) and
/// one step of giving pages back (see `evict.rs`, `reclaim`), with room to spare.
pub(super) const RESERVE_BYTES: u64 = 2 << 20;

/// Free bytes for unprivileged users on the filesystem holding `dir`.
pub(super) fn fs_free(dir: &Path) -> Option<u64> {
    let st = nix::sys::statvfs::statvfs(dir).ok()?;
    Some(st.blocks_available() as u64 * st.fragment_size() as u64)
}

fn file_len(p: &Path) -> u64 {
    std::fs::metadata(p).map_or(0, |m| m.len())
}

/// The preallocated reserve file.
pub(super) struct Reserve {
    path: PathBuf,
    held: u64,
}

impl Reserve {
    /// Takes over an existing reserve file (its size is what it holds).
    pub(super) fn open(db: &Path) -> Reserve {
        let path = db.with_extension("reserve");
        let held = file_len(&path);
        Reserve { path, held }
    }

    pub(super) fn held(&self) -> u64 {
        self.held
    }

    /// Deletes the reserve so that the next transaction has room. Returns the bytes given up.
    pub(super) fn release(&mut self) -> u64 {
        if self.held == 0 {
            return 0;
        }
        match std::fs::remove_file(&self.path) {
            Ok(()) => {
                let n = std::mem::take(&mut self.held);
                metrics::counter!("edge_log_reserve_released_total").increment(1);
                tracing::info!(bytes = n, path = %self.path.display(), "disk reserve released to make room for an eviction");
                n
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.held = 0;
                0
            }
            Err(e) => {
                tracing::warn!(error = %e, path = %self.path.display(), "could not delete the disk reserve");
                0
            }
        }
    }

    /// Recreates the reserve when the filesystem has it plus `floor` free. Blocks are allocated
    /// (posix_fallocate, or written zeros where that is not supported), not a sparse file.
    pub(super) fn restore(&mut self, fs_free: u64, floor: u64) {
        if self.held >= RESERVE_BYTES || fs_free < RESERVE_BYTES.saturating_add(floor) {
            return;
        }
        match allocate(&self.path, RESERVE_BYTES) {
            Ok(()) => {
                self.held = RESERVE_BYTES;
                tracing::debug!(bytes = RESERVE_BYTES, path = %self.path.display(), "disk reserve in place");
            }
            Err(e) => {
                let _ = std::fs::remove_file(&self.path);
                self.held = 0;
                tracing::warn!(error = %e, path = %self.path.display(), "could not create the disk reserve; it is tried again later");
            }
        }
    }
}

fn allocate(path: &Path, len: u64) -> std::io::Result<()> {
    use std::io::Write;
    let f = std::fs::File::create(path)?;
    match nix::fcntl::posix_fallocate(&f, 0, len as _) {
        Ok(()) => {}
        Err(nix::errno::Errno::EOPNOTSUPP | nix::errno::Errno::EINVAL) => {
            let mut f = &f;
            let zeros = vec![0u8; 64 * 1024];
            let mut left = len;
            while left > 0 {
                let n = left.min(zeros.len() as u64) as usize;
                f.write_all(&zeros[..n])?;
                left -= n as u64;
            }
        }
        Err(e) => return Err(e.into()),
    }
    f.sync_all()
}

/// Moved-aside damaged databases next to `db`, newest first (by the time in their name).
fn moved_aside(db: &Path) -> Vec<(i64, Vec<PathBuf>)> {
    let (Some(dir), Some(name)) = (db.parent(), db.file_name()) else {
        return Vec::new();
    };
    let prefix = format!("{}.corrupt-", name.to_string_lossy());
    let mut by_stamp: std::collections::BTreeMap<i64, Vec<PathBuf>> = Default::default();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    for e in entries.flatten() {
        let n = e.file_name().to_string_lossy().to_string();
        let Some(rest) = n.strip_prefix(&prefix) else {
            continue;
        };
        let stamp = rest.trim_end_matches("-wal").trim_end_matches("-shm");
        if let Ok(t) = stamp.parse::<i64>() {
            by_stamp.entry(t).or_default().push(e.path());
        }
    }
    by_stamp.into_iter().rev().collect()
}

/// Bytes of every moved-aside database next to `db` (read-only; for the inspector).
pub(super) fn moved_aside_bytes(db: &Path) -> u64 {
    moved_aside(db)
        .iter()
        .flat_map(|(_, f)| f.iter())
        .map(|f| file_len(f))
        .sum()
}

/// Bytes of the reserve file next to `db` (read-only; for the inspector).
pub(super) fn reserve_bytes(db: &Path) -> u64 {
    file_len(&db.with_extension("reserve"))
}

/// The newest moved-aside database, kept for forensics until the space is needed.
pub(super) struct MovedAside {
    files: Vec<PathBuf>,
}

impl MovedAside {
    /// Keeps the newest moved-aside database and deletes the older ones (rotation).
    pub(super) fn rotate(db: &Path) -> MovedAside {
        let mut all = moved_aside(db).into_iter();
        let files = all.next().map(|(_, f)| f).unwrap_or_default();
        for (stamp, old) in all {
            for f in old {
                match std::fs::remove_file(&f) {
                    Ok(()) => {
                        tracing::warn!(path = %f.display(), stamp, "an older moved-aside damaged database was deleted (only the newest is kept)")
                    }
                    Err(e) => {
                        tracing::warn!(path = %f.display(), error = %e, "could not delete an older moved-aside database")
                    }
                }
            }
        }
        MovedAside { files }
    }

    pub(super) fn bytes(&self) -> u64 {
        self.files.iter().map(|f| file_len(f)).sum()
    }

    /// Deletes the kept copy to make room. Returns the bytes freed.
    pub(super) fn delete(&mut self, why: &str) -> u64 {
        let mut freed = 0;
        for f in std::mem::take(&mut self.files) {
            let n = file_len(&f);
            match std::fs::remove_file(&f) {
                Ok(()) => {
                    freed += n;
                    tracing::warn!(path = %f.display(), bytes = n, "the moved-aside damaged database was deleted: {why}");
                }
                Err(e) => {
                    tracing::warn!(path = %f.display(), error = %e, "could not delete the moved-aside database")
                }
            }
        }
        freed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_newest_moved_aside_database_is_kept() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("log.db");
        for (stamp, len) in [(100, 10usize), (300, 30), (200, 20)] {
            std::fs::write(
                dir.path().join(format!("log.db.corrupt-{stamp}")),
                vec![1; len],
            )
            .unwrap();
            std::fs::write(
                dir.path().join(format!("log.db.corrupt-{stamp}-wal")),
                vec![1; len],
            )
            .unwrap();
        }
        std::fs::write(dir.path().join("other.db.corrupt-1"), b"x").unwrap();
        let aside = MovedAside::rotate(&db);
        assert_eq!(aside.bytes(), 60, "the newest copy and its WAL count");
        let mut left: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
            .collect();
        left.sort();
        assert_eq!(
            left,
            [
                "log.db.corrupt-300",
                "log.db.corrupt-300-wal",
                "other.db.corrupt-1"
            ]
        );
        let mut aside = aside;
        assert_eq!(aside.delete("test"), 60);
        assert_eq!(aside.bytes(), 0);
    }
}
