//! FUSE requests -> [`Disk`] calls. No policy here: what is durable is decided in `disk.rs`.

use super::disk::{Disk, Kind, Node};
use fuser::{
    FileAttr, FileType, Filesystem, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow,
};
use nix::errno::Errno;
use std::ffi::OsStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

/// Attribute and entry cache time. Only this kernel changes the filesystem, and the cache dies
/// with the mount at a power cut, so the kernel's caches never disagree with the disk model.
const TTL: Duration = Duration::from_secs(1);

/// RENAME_NOREPLACE and RENAME_EXCHANGE from <linux/fs.h>.
const RENAME_NOREPLACE: u32 = 1;
const RENAME_EXCHANGE: u32 = 2;

pub struct PowerCutFuse {
    pub disk: Arc<Mutex<Disk>>,
}

impl PowerCutFuse {
    fn disk(&self) -> MutexGuard<'_, Disk> {
        self.disk.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn attr(ino: u64, n: &Node) -> FileAttr {
    let (kind, size, nlink) = match &n.kind {
        Kind::File(f) => (FileType::RegularFile, f.size, 1),
        Kind::Dir(d) => (FileType::Directory, 4096, 2 + d.entries.len() as u32),
    };
    FileAttr {
        ino,
        size,
        blocks: size.div_ceil(512),
        atime: n.attrs.atime,
        mtime: n.attrs.mtime,
        ctime: n.attrs.ctime,
        crtime: n.attrs.ctime,
        kind,
        perm: n.attrs.perm,
        nlink,
        uid: n.attrs.uid,
        gid: n.attrs.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

fn time(t: TimeOrNow) -> SystemTime {
    match t {
        TimeOrNow::SpecificTime(t) => t,
        TimeOrNow::Now => SystemTime::now(),
    }
}

impl Filesystem for PowerCutFuse {
    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        let d = self.disk();
        match d.lookup(parent, name).and_then(|i| Ok((i, d.node(i)?))) {
            Ok((ino, n)) => reply.entry(&TTL, &attr(ino, n), 0),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match self.disk().node(ino) {
            Ok(n) => reply.attr(&TTL, &attr(ino, n)),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        let mut d = self.disk();
        let r = (|| {
            if let Some(size) = size {
                d.truncate(ino, size)?;
            }
            d.set_attrs(ino, |a| {
                if let Some(m) = mode {
                    a.perm = (m & 0o7777) as u16;
                }
                if let Some(u) = uid {
                    a.uid = u;
                }
                if let Some(g) = gid {
                    a.gid = g;
                }
                if let Some(t) = atime {
                    a.atime = time(t);
                }
                if let Some(t) = mtime {
                    a.mtime = time(t);
                }
                a.ctime = SystemTime::now();
            })?;
            d.node(ino).map(|n| attr(ino, n))
        })();
        match r {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn mkdir(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        let mut d = self.disk();
        let perm = (mode & !umask & 0o7777) as u16;
        match d
            .mkdir(parent, name, perm, req.uid(), req.gid())
            .and_then(|i| Ok((i, d.node(i)?)))
        {
            Ok((ino, n)) => reply.entry(&TTL, &attr(ino, n), 0),
            Err(e) => reply.error(e),
        }
    }

    fn unlink(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        match self.disk().unlink(parent, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rmdir(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEmpty) {
        match self.disk().rmdir(parent, name) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &mut self,
        _req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        newparent: u64,
        newname: &OsStr,
        flags: u32,
        reply: ReplyEmpty,
    ) {
        if flags & RENAME_EXCHANGE != 0 {
            reply.error(Errno::EINVAL as i32);
            return;
        }
        let noreplace = flags & RENAME_NOREPLACE != 0;
        match self
            .disk()
            .rename(parent, name, newparent, newname, noreplace)
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        match self.disk().node(ino) {
            Ok(Node {
                kind: Kind::File(_),
                ..
            }) => reply.opened(0, 0),
            Ok(_) => reply.error(Errno::EISDIR as i32),
            Err(e) => reply.error(e),
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        match self.disk().read(ino, offset.max(0) as u64, size) {
            Ok(b) => reply.data(&b),
            Err(e) => reply.error(e),
        }
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        match self.disk().write(ino, offset.max(0) as u64, data) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => reply.error(e),
        }
    }

    /// close(2) is not a sync.
    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lo: u64, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _ds: bool, reply: ReplyEmpty) {
        match self.disk().fsync(ino) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        let children = match self.disk().children(ino) {
            Ok(c) => c,
            Err(e) => {
                reply.error(e);
                return;
            }
        };
        for (i, (child, is_dir, name)) in children.into_iter().enumerate().skip(offset as usize) {
            let kind = if is_dir {
                FileType::Directory
            } else {
                FileType::RegularFile
            };
            if reply.add(child, (i + 1) as i64, kind, &name) {
                break;
            }
        }
        reply.ok();
    }

    fn fsyncdir(&mut self, _req: &Request<'_>, ino: u64, _fh: u64, _ds: bool, reply: ReplyEmpty) {
        match self.disk().fsyncdir(ino) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&mut self, _req: &Request<'_>, _ino: u64, reply: ReplyStatfs) {
        let backing = self.disk().backing().to_path_buf();
        match nix::sys::statvfs::statvfs(&backing) {
            Ok(s) => reply.statfs(
                s.blocks(),
                s.blocks_free(),
                s.blocks_available(),
                s.files(),
                s.files_free(),
                s.block_size() as u32,
                s.name_max() as u32,
                s.fragment_size() as u32,
            ),
            Err(e) => reply.error(e as i32),
        }
    }

    fn create(
        &mut self,
        req: &Request<'_>,
        parent: u64,
        name: &OsStr,
        mode: u32,
        umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let mut d = self.disk();
        let perm = (mode & !umask & 0o7777) as u16;
        match d
            .create(parent, name, perm, req.uid(), req.gid())
            .and_then(|i| Ok((i, d.node(i)?)))
        {
            Ok((ino, n)) => reply.created(&TTL, &attr(ino, n), 0, 0, 0),
            Err(e) => reply.error(e),
        }
    }
}
