//! A small real filesystem for disk-full tests: a tmpfs of a fixed size, mounted for the test and
//! unmounted when the guard drops (also when the test fails). tmpfs allocates on write and frees
//! on truncate and unlink, so it shows exactly what the agent gives back.
//!
//! Mounting needs root (or CAP_SYS_ADMIN). Without it the test fails with the reason: a disk-full
//! test that silently skips proves nothing.

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct Tmpfs {
    dir: tempfile::TempDir,
    mounted: bool,
}

impl Tmpfs {
    /// Mounts a tmpfs of `mib` MiB on a new temporary directory.
    pub fn mount(mib: u64) -> Tmpfs {
        let dir = tempfile::tempdir().expect("a temporary mount point");
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={mib}m,mode=0700"),
                "tmpfs",
            ])
            .arg(dir.path())
            .output();
        match out {
            Ok(o) if o.status.success() => Tmpfs { dir, mounted: true },
            Ok(o) => panic!(
                "this test needs a small real filesystem and could not mount a {mib} MiB tmpfs on {} \
                 (mount: {}); run it as root or with CAP_SYS_ADMIN (CI runs as root)",
                dir.path().display(),
                String::from_utf8_lossy(&o.stderr).trim()
            ),
            Err(e) => panic!("this test needs mount(8) to create a small filesystem: {e}"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A directory on the filesystem (created).
    pub fn subdir(&self, name: &str) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::create_dir_all(&p).expect("create a directory on the tmpfs");
        p
    }

    /// Bytes available to unprivileged users, as the agent sees them.
    pub fn free_bytes(&self) -> u64 {
        let st = nix::sys::statvfs::statvfs(self.dir.path()).expect("statvfs of the tmpfs");
        st.blocks_available() as u64 * st.fragment_size() as u64
    }

    /// Writes a file of other data as large as the free space now (or until the filesystem
    /// refuses), as another program filling the disk would. Measures once and does not keep
    /// filling what the agent frees afterwards. Returns the file and the bytes written.
    pub fn fill(&self, name: &str) -> (PathBuf, u64) {
        use std::io::Write;
        let p = self.dir.path().join(name);
        let mut f = std::fs::File::create(&p).expect("create the filler file");
        let chunk = vec![0x5au8; 64 * 1024];
        let mut left = self.free_bytes();
        let mut written = 0;
        while left > 0 {
            let n = (left as usize).min(chunk.len());
            match f.write(&chunk[..n]) {
                Ok(0) | Err(_) => break, // ENOSPC: the filesystem is full
                Ok(n) => {
                    written += n as u64;
                    left -= n as u64;
                }
            }
        }
        let _ = f.sync_all();
        (p, written)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        let ok = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            // A process still holds a file there (an agent that did not stop): detach now, the
            // kernel frees it when the last file closes.
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}
