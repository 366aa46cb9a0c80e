//! A FUSE filesystem for power-cut tests: a passthrough over a backing directory that keeps every
//! change not yet fsynced in memory, and on [`PowerCutFs::power_cut`] drops it all and unmounts.
//! `kill -9` alone leaves the page cache intact, so it cannot tell "acked after fsync" from "acked
//! after write"; this can.
//!
//! # The model of a disk
//!
//! The backing directory is the platter: it holds exactly what would be read back after a power
//! cut at this instant, and it changes only when a program asks for durability.
//!
//! * **Durable:** the content and size of a file as of its last `fsync`/`fdatasync` (both are
//!   the same here: the size is data). The namespace (create, rename, unlink, mkdir, rmdir) as of
//!   the last `fsync` of a directory, which commits every namespace change made before it, in
//!   order, like a journaling filesystem's commit. `fsync` of a file does *not* make its name
//!   durable (POSIX; ext4 happens to commit it): a file created and fsynced but whose directory
//!   was never fsynced is gone after the cut, its content freed like an orphan inode.
//! * **Lost at the cut:** every `write` and `ftruncate` after the file's last fsync (reads show
//!   them until then), every uncommitted namespace change, and the kernel's page cache (it dies
//!   with the mount). A real disk may keep any subset of the unsynced writes, torn at sector
//!   boundaries; this model keeps none of them. That is the strictest test of "was it
//!   acknowledged before its fsync", but it does not exercise recovery from a partly persisted
//!   tail (SQLite's WAL frame checksums are what handles that on real hardware).
//! * **Not modelled:** permissions, owners and times (kept in memory, taken from the backing
//!   files at power-on), hard links, symlinks, renaming directories (ENOTSUP), xattrs. File
//!   locks (`fcntl`, `flock`) are the kernel's local locks: this filesystem does not claim the
//!   lock capabilities at FUSE init.
//! * **The backing directory's own durability** on the host is not part of the model: nothing
//!   here fsyncs it (the host does not lose power in the test).
//!
//! # SQLite in WAL mode
//!
//! The database and `-wal` files follow the rules above: with `synchronous=FULL` SQLite fsyncs
//! the WAL at every commit, and the directory after creating the WAL; with `NORMAL` the WAL is
//! fsynced only at checkpoints, so commits since the last checkpoint are lost at a cut (the
//! negative control of `tests/tests/power_cut.rs` depends on this).
//!
//! `-shm` is mapped shared and writable. FUSE supports that for files opened without
//! `direct_io` (as here): the mapping's pages live in the kernel's page cache and are written
//! back as ordinary FUSE writes, which this model buffers like any other. SQLite never fsyncs the
//! `-shm`, so its content is always lost at a cut (the file itself survives once a directory
//! fsync committed its creation). That is correct: the wal-index is rebuilt from the WAL by the
//! first connection after a restart, as after a real power cut (where `-shm` may hold anything).
//!
//! # Use
//!
//! The filesystem runs in the test process on its own thread (fuser's background session); the
//! program under test is a separate process. A power cut is: kill that process and reap it, then
//! [`PowerCutFs::power_cut`]. Reaping first matters: a process killed while the filesystem
//! holds one of its requests is reaped only after the reply, so once it is reaped no fsync of
//! it can still arrive. The cut sets a flag under the model's lock (every later request fails
//! with EIO, so nothing can become durable any more), drops the unsynced state and detaches the
//! mount (`umount2(MNT_DETACH)`), then waits for the session thread to end. Mount again over the
//! same backing directory to power on with what survived.
//!
//! Mounting needs root (or `fusermount3` from the `fuse3` package) and `/dev/fuse`.

mod disk;
#[cfg(test)]
mod disk_tests;
mod extents;
mod fuse;

pub use disk::{CutReport, Stats};

use disk::Disk;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How long the session thread may take to end after the mount is detached.
const SESSION_END: Duration = Duration::from_secs(20);

pub struct PowerCutFs {
    backing: PathBuf,
    mountpoint: PathBuf,
    disk: Arc<Mutex<Disk>>,
    session: Option<fuser::BackgroundSession>,
}

impl std::fmt::Debug for PowerCutFs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerCutFs")
            .field("backing", &self.backing)
            .field("mountpoint", &self.mountpoint)
            .finish()
    }
}

impl PowerCutFs {
    /// Powers on: mounts the filesystem at `mountpoint` over what `backing` holds.
    pub fn mount(backing: &Path, mountpoint: &Path) -> std::io::Result<PowerCutFs> {
        std::fs::create_dir_all(backing)?;
        std::fs::create_dir_all(mountpoint)?;
        let disk = Arc::new(Mutex::new(Disk::power_on(backing)?));
        let fs = fuse::PowerCutFuse { disk: disk.clone() };
        let options = [
            fuser::MountOption::FSName("powercut".into()),
            fuser::MountOption::Subtype("powercut".into()),
            fuser::MountOption::DefaultPermissions,
            fuser::MountOption::RW,
        ];
        let session = fuser::spawn_mount2(fs, mountpoint, &options)?;
        Ok(PowerCutFs {
            backing: backing.to_path_buf(),
            mountpoint: mountpoint.to_path_buf(),
            disk,
            session: Some(session),
        })
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Counters since power-on.
    pub fn stats(&self) -> Stats {
        self.disk.lock().unwrap_or_else(|e| e.into_inner()).stats()
    }

    /// The power cut: drops everything not yet durable and unmounts. Kill (and reap) every
    /// process using the filesystem first. Panics if the mount cannot be taken down.
    pub fn power_cut(mut self) -> CutReport {
        self.cut()
    }

    fn cut(&mut self) -> CutReport {
        let report = self
            .disk
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .power_off();
        if let Some(session) = self.session.take() {
            // Detach first: the session's own unmount is not lazy and fails while anything
            // still has a file open. Then the session thread ends when the kernel drops the
            // connection (ENODEV on /dev/fuse).
            if let Err(e) = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH)
            {
                eprintln!("powercut-fs: detaching {}: {e}", self.mountpoint.display());
            }
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                session.join();
                // The receiver is gone only if it timed out, and then it panics anyway.
                tx.send(()).ok();
            });
            assert!(
                rx.recv_timeout(SESSION_END).is_ok(),
                "the power-cut filesystem at {} was still in use {SESSION_END:?} after it was detached",
                self.mountpoint.display()
            );
        }
        report
    }
}

impl Drop for PowerCutFs {
    fn drop(&mut self) {
        if self.session.is_some() && !std::thread::panicking() {
            self.cut();
        } else if let Some(session) = self.session.take() {
            // Unwinding: cut, detach, and let the session end on its own (never block a panic).
            self.disk
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .power_off();
            let _ = nix::mount::umount2(&self.mountpoint, nix::mount::MntFlags::MNT_DETACH);
            std::mem::forget(session);
        }
    }
}
