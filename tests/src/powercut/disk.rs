//! The disk model behind [`super::PowerCutFs`]: a volatile view (what programs see) over a durable
//! one (the backing directory). Nothing here knows about FUSE; `fuse.rs` only translates.
//!
//! Invariants:
//! * The backing directory changes only inside [`Disk::fsync`] and [`Disk::fsyncdir`], so it
//!   always holds exactly what a disk would keep after a power cut at that moment.
//! * The volatile namespace is the durable one with the journal applied in order: every
//!   journal op's preconditions (the name exists, the parent exists) hold when it is committed,
//!   because they held in the volatile view when it was recorded.
//! * Every inode with durable content holds an open descriptor on it ([`FileState::durable`]), so
//!   a durable rename or unlink never loses track of the data a later fsync must update.

use super::extents::Extents;
use nix::errno::Errno;
use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

/// Name, in the backing directory's root, of the folder holding the content of files that were
/// fsynced before their directory entry was: inodes without a durable name. Hidden from the view
/// and emptied at every power-on (like the orphan list a journaling filesystem replays).
pub const STAGING: &str = ".powercut-staging";

pub const ROOT: u64 = 1;

pub type Errno32 = i32;

fn eio(what: &str, e: std::io::Error) -> Errno32 {
    eprintln!("powercut-fs: {what}: {e}");
    Errno::EIO as i32
}

#[derive(Clone, Copy)]
pub struct Attrs {
    pub perm: u16,
    pub uid: u32,
    pub gid: u32,
    pub atime: SystemTime,
    pub mtime: SystemTime,
    pub ctime: SystemTime,
}

pub struct FileState {
    /// Volatile size.
    pub size: u64,
    pub pending: Extents,
    /// Lowest size the file was truncated to since its last fsync: durable bytes at or past it
    /// read as zeros (they are gone from the volatile view, and come back only as zeros if the
    /// file grows again).
    cut: Option<u64>,
    /// Descriptor on the durable content: the named backing file, or a staging file.
    durable: Option<File>,
    durable_len: u64,
    /// Committed directory entry (parent directory inode, name).
    link: Option<(u64, OsString)>,
    /// The durable content lives in [`STAGING`], not under a name.
    staged: bool,
}

pub struct DirState {
    pub entries: BTreeMap<OsString, u64>,
    pub parent: u64,
    /// Path relative to the backing root once the directory's creation is committed.
    durable_path: Option<PathBuf>,
}

pub enum Kind {
    File(FileState),
    Dir(DirState),
}

pub struct Node {
    pub kind: Kind,
    pub attrs: Attrs,
}

/// A namespace change not yet committed by a directory fsync.
enum MetaOp {
    Create {
        ino: u64,
        parent: u64,
        name: OsString,
    },
    Mkdir {
        ino: u64,
        parent: u64,
        name: OsString,
    },
    Unlink {
        ino: u64,
    },
    Rmdir {
        ino: u64,
    },
    Rename {
        ino: u64,
        to_parent: u64,
        to_name: OsString,
        replaced: Option<u64>,
    },
}

/// Counters of one power-on.
#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub fsyncs: u64,
    pub dir_fsyncs: u64,
    pub bytes_made_durable: u64,
}

/// What a power cut dropped.
#[derive(Debug, Default, Clone)]
pub struct CutReport {
    /// Unsynced bytes (writes not covered by an fsync of their file).
    pub unsynced_bytes: u64,
    /// Files with unsynced writes or truncations.
    pub unsynced_files: usize,
    /// Namespace changes (create, rename, unlink, ...) not committed by a directory fsync.
    pub uncommitted_namespace_ops: usize,
    /// Unsynced bytes per file (path in the volatile view).
    pub unsynced_by_file: BTreeMap<String, u64>,
    /// Counters of the power-on that ended.
    pub stats: Stats,
}

pub struct Disk {
    backing: PathBuf,
    nodes: HashMap<u64, Node>,
    next_ino: u64,
    journal: Vec<MetaOp>,
    powered_off: bool,
    stats: Stats,
}

fn attrs_of(meta: &std::fs::Metadata) -> Attrs {
    Attrs {
        perm: (meta.permissions().mode() & 0o7777) as u16,
        uid: meta.uid(),
        gid: meta.gid(),
        atime: meta.accessed().unwrap_or(SystemTime::UNIX_EPOCH),
        mtime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
        ctime: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
    }
}

impl Disk {
    /// Powers on over `backing`: its content is what survived. Staged orphans are freed.
    pub fn power_on(backing: &Path) -> std::io::Result<Disk> {
        let staging = backing.join(STAGING);
        if staging.exists() {
            std::fs::remove_dir_all(&staging)?;
        }
        let mut d = Disk {
            backing: backing.to_path_buf(),
            nodes: HashMap::new(),
            next_ino: ROOT + 1,
            journal: Vec::new(),
            powered_off: false,
            stats: Stats::default(),
        };
        let root_meta = std::fs::metadata(backing)?;
        d.nodes.insert(
            ROOT,
            Node {
                kind: Kind::Dir(DirState {
                    entries: BTreeMap::new(),
                    parent: ROOT,
                    durable_path: Some(PathBuf::new()),
                }),
                attrs: attrs_of(&root_meta),
            },
        );
        d.scan(ROOT, PathBuf::new())?;
        Ok(d)
    }

    fn scan(&mut self, dir: u64, rel: PathBuf) -> std::io::Result<()> {
        for entry in std::fs::read_dir(self.backing.join(&rel))? {
            let entry = entry?;
            let name = entry.file_name();
            if dir == ROOT && name == STAGING {
                continue;
            }
            let meta = entry.metadata()?;
            let ino = self.next_ino;
            self.next_ino += 1;
            let child_rel = rel.join(&name);
            if meta.is_dir() {
                self.nodes.insert(
                    ino,
                    Node {
                        kind: Kind::Dir(DirState {
                            entries: BTreeMap::new(),
                            parent: dir,
                            durable_path: Some(child_rel.clone()),
                        }),
                        attrs: attrs_of(&meta),
                    },
                );
                self.scan(ino, child_rel)?;
            } else if meta.is_file() {
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(entry.path())?;
                self.nodes.insert(
                    ino,
                    Node {
                        kind: Kind::File(FileState {
                            size: meta.len(),
                            pending: Extents::default(),
                            cut: None,
                            durable: Some(f),
                            durable_len: meta.len(),
                            link: Some((dir, name.clone())),
                            staged: false,
                        }),
                        attrs: attrs_of(&meta),
                    },
                );
            } else {
                continue; // symlinks, sockets: not part of the model
            }
            if let Some(Node {
                kind: Kind::Dir(d), ..
            }) = self.nodes.get_mut(&dir)
            {
                d.entries.insert(name, ino);
            }
        }
        Ok(())
    }

    /// The power cut: everything not yet durable is dropped, and every later request fails
    /// with EIO (the kernel may still write back pages while the mount goes away).
    pub fn power_off(&mut self) -> CutReport {
        let mut r = CutReport {
            uncommitted_namespace_ops: self.journal.len(),
            stats: self.stats,
            ..CutReport::default()
        };
        let mut dirs = vec![(ROOT, PathBuf::new())];
        while let Some((dir, rel)) = dirs.pop() {
            let Some(Node {
                kind: Kind::Dir(d), ..
            }) = self.nodes.get(&dir)
            else {
                continue;
            };
            for (name, ino) in &d.entries {
                match self.nodes.get(ino).map(|n| &n.kind) {
                    Some(Kind::Dir(_)) => dirs.push((*ino, rel.join(name))),
                    Some(Kind::File(f)) => {
                        let bytes = f.pending.bytes();
                        r.unsynced_bytes += bytes;
                        if bytes > 0 || f.cut.is_some() || f.size != f.durable_len {
                            r.unsynced_files += 1;
                            r.unsynced_by_file
                                .insert(rel.join(name).display().to_string(), bytes);
                        }
                    }
                    None => {}
                }
            }
        }
        self.powered_off = true;
        self.nodes.clear();
        self.journal.clear();
        r
    }

    fn check_on(&self) -> Result<(), Errno32> {
        if self.powered_off {
            Err(Errno::EIO as i32)
        } else {
            Ok(())
        }
    }

    pub fn node(&self, ino: u64) -> Result<&Node, Errno32> {
        self.check_on()?;
        self.nodes.get(&ino).ok_or(Errno::ENOENT as i32)
    }

    fn node_mut(&mut self, ino: u64) -> Result<&mut Node, Errno32> {
        self.check_on()?;
        self.nodes.get_mut(&ino).ok_or(Errno::ENOENT as i32)
    }

    fn file_mut(&mut self, ino: u64) -> Result<&mut FileState, Errno32> {
        match &mut self.node_mut(ino)?.kind {
            Kind::File(f) => Ok(f),
            Kind::Dir(_) => Err(Errno::EISDIR as i32),
        }
    }

    fn dir(&self, ino: u64) -> Result<&DirState, Errno32> {
        match &self.node(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(Errno::ENOTDIR as i32),
        }
    }

    fn dir_mut(&mut self, ino: u64) -> Result<&mut DirState, Errno32> {
        match &mut self.node_mut(ino)?.kind {
            Kind::Dir(d) => Ok(d),
            Kind::File(_) => Err(Errno::ENOTDIR as i32),
        }
    }

    pub fn lookup(&self, parent: u64, name: &OsStr) -> Result<u64, Errno32> {
        self.dir(parent)?
            .entries
            .get(name)
            .copied()
            .ok_or(Errno::ENOENT as i32)
    }

    pub fn children(&self, dir: u64) -> Result<Vec<(u64, bool, OsString)>, Errno32> {
        let d = self.dir(dir)?;
        let mut out = vec![(dir, true, ".".into()), (d.parent, true, "..".into())];
        for (name, ino) in &d.entries {
            let is_dir = matches!(self.nodes.get(ino).map(|n| &n.kind), Some(Kind::Dir(_)));
            out.push((*ino, is_dir, name.clone()));
        }
        Ok(out)
    }

    fn new_node(&mut self, kind: Kind, perm: u16, uid: u32, gid: u32) -> u64 {
        let now = SystemTime::now();
        let ino = self.next_ino;
        self.next_ino += 1;
        self.nodes.insert(
            ino,
            Node {
                kind,
                attrs: Attrs {
                    perm,
                    uid,
                    gid,
                    atime: now,
                    mtime: now,
                    ctime: now,
                },
            },
        );
        ino
    }

    fn check_free(&self, parent: u64, name: &OsStr) -> Result<(), Errno32> {
        if self.dir(parent)?.entries.contains_key(name) {
            return Err(Errno::EEXIST as i32);
        }
        if parent == ROOT && name == STAGING {
            return Err(Errno::EPERM as i32);
        }
        Ok(())
    }

    pub fn create(
        &mut self,
        parent: u64,
        name: &OsStr,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64, Errno32> {
        self.check_free(parent, name)?;
        let ino = self.new_node(
            Kind::File(FileState {
                size: 0,
                pending: Extents::default(),
                cut: None,
                durable: None,
                durable_len: 0,
                link: None,
                staged: false,
            }),
            perm,
            uid,
            gid,
        );
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        self.journal.push(MetaOp::Create {
            ino,
            parent,
            name: name.to_owned(),
        });
        Ok(ino)
    }

    pub fn mkdir(
        &mut self,
        parent: u64,
        name: &OsStr,
        perm: u16,
        uid: u32,
        gid: u32,
    ) -> Result<u64, Errno32> {
        self.check_free(parent, name)?;
        let ino = self.new_node(
            Kind::Dir(DirState {
                entries: BTreeMap::new(),
                parent,
                durable_path: None,
            }),
            perm,
            uid,
            gid,
        );
        self.dir_mut(parent)?.entries.insert(name.to_owned(), ino);
        self.journal.push(MetaOp::Mkdir {
            ino,
            parent,
            name: name.to_owned(),
        });
        Ok(ino)
    }

    pub fn unlink(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno32> {
        let ino = self.lookup(parent, name)?;
        if matches!(self.node(ino)?.kind, Kind::Dir(_)) {
            return Err(Errno::EISDIR as i32);
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.journal.push(MetaOp::Unlink { ino });
        Ok(())
    }

    pub fn rmdir(&mut self, parent: u64, name: &OsStr) -> Result<(), Errno32> {
        let ino = self.lookup(parent, name)?;
        if !self.dir(ino)?.entries.is_empty() {
            return Err(Errno::ENOTEMPTY as i32);
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.journal.push(MetaOp::Rmdir { ino });
        Ok(())
    }

    /// Renames a file (directories cannot be renamed in this model: ENOTSUP). `noreplace` is
    /// RENAME_NOREPLACE; RENAME_EXCHANGE is refused by the caller.
    pub fn rename(
        &mut self,
        parent: u64,
        name: &OsStr,
        to_parent: u64,
        to_name: &OsStr,
        noreplace: bool,
    ) -> Result<(), Errno32> {
        let ino = self.lookup(parent, name)?;
        if matches!(self.node(ino)?.kind, Kind::Dir(_)) {
            return Err(Errno::ENOTSUP as i32);
        }
        let replaced = self.dir(to_parent)?.entries.get(to_name).copied();
        if let Some(r) = replaced {
            if r == ino {
                return Ok(());
            }
            if noreplace {
                return Err(Errno::EEXIST as i32);
            }
            if matches!(self.node(r)?.kind, Kind::Dir(_)) {
                return Err(Errno::EISDIR as i32);
            }
        }
        if to_parent == ROOT && to_name == STAGING {
            return Err(Errno::EPERM as i32);
        }
        self.dir_mut(parent)?.entries.remove(name);
        self.dir_mut(to_parent)?
            .entries
            .insert(to_name.to_owned(), ino);
        self.journal.push(MetaOp::Rename {
            ino,
            to_parent,
            to_name: to_name.to_owned(),
            replaced,
        });
        Ok(())
    }

    pub fn set_attrs(&mut self, ino: u64, f: impl FnOnce(&mut Attrs)) -> Result<(), Errno32> {
        let n = self.node_mut(ino)?;
        f(&mut n.attrs);
        Ok(())
    }

    pub fn truncate(&mut self, ino: u64, size: u64) -> Result<(), Errno32> {
        let f = self.file_mut(ino)?;
        if size < f.size {
            f.pending.truncate(size);
            f.cut = Some(f.cut.map_or(size, |c| c.min(size)));
        }
        f.size = size;
        let now = SystemTime::now();
        self.set_attrs(ino, |a| {
            a.mtime = now;
            a.ctime = now;
        })
    }

    pub fn write(&mut self, ino: u64, off: u64, data: &[u8]) -> Result<(), Errno32> {
        let f = self.file_mut(ino)?;
        f.pending.write(off, data);
        f.size = f.size.max(off + data.len() as u64);
        let now = SystemTime::now();
        self.set_attrs(ino, |a| {
            a.mtime = now;
            a.ctime = now;
        })
    }

    pub fn read(&self, ino: u64, off: u64, size: u32) -> Result<Vec<u8>, Errno32> {
        let f = match &self.node(ino)?.kind {
            Kind::File(f) => f,
            Kind::Dir(_) => return Err(Errno::EISDIR as i32),
        };
        let end = (off + u64::from(size)).min(f.size);
        if off >= end {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; (end - off) as usize];
        let visible = f.cut.map_or(f.durable_len, |c| c.min(f.durable_len));
        if let Some(d) = &f.durable
            && off < visible
        {
            let n = (visible.min(end) - off) as usize;
            d.read_exact_at(&mut buf[..n], off)
                .map_err(|e| eio("reading the backing file", e))?;
        }
        f.pending.overlay(off, &mut buf);
        Ok(buf)
    }

    fn rel_dir(&self, ino: u64) -> Result<PathBuf, Errno32> {
        match &self.nodes.get(&ino).map(|n| &n.kind) {
            Some(Kind::Dir(d)) => d.durable_path.clone().ok_or(Errno::EIO as i32),
            _ => Err(Errno::EIO as i32),
        }
    }

    fn file_state(&mut self, ino: u64) -> Result<&mut FileState, Errno32> {
        match self.nodes.get_mut(&ino).map(|n| &mut n.kind) {
            Some(Kind::File(f)) => Ok(f),
            _ => Err(Errno::EIO as i32),
        }
    }

    /// fsync / fdatasync of a file: its data and size become durable. Its directory entry does
    /// not (that takes an fsync of the directory); until then the content is staged.
    pub fn fsync(&mut self, ino: u64) -> Result<(), Errno32> {
        self.check_on()?;
        let staging = self.backing.join(STAGING);
        let f = self.file_mut(ino)?;
        if f.durable.is_none() {
            std::fs::create_dir_all(&staging).map_err(|e| eio("creating the staging dir", e))?;
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(staging.join(ino.to_string()))
                .map_err(|e| eio("creating a staging file", e))?;
            f.durable = Some(file);
            f.durable_len = 0;
            f.staged = true;
        }
        let Some(d) = &f.durable else {
            return Err(Errno::EIO as i32);
        };
        if let Some(c) = f.cut
            && c < f.durable_len
        {
            d.set_len(c)
                .map_err(|e| eio("truncating the backing file", e))?;
        }
        let mut bytes = 0;
        for (off, data) in f.pending.iter() {
            d.write_all_at(data, *off)
                .map_err(|e| eio("writing the backing file", e))?;
            bytes += data.len() as u64;
        }
        d.set_len(f.size)
            .map_err(|e| eio("sizing the backing file", e))?;
        f.durable_len = f.size;
        f.pending = Extents::default();
        f.cut = None;
        self.stats.fsyncs += 1;
        self.stats.bytes_made_durable += bytes;
        Ok(())
    }

    /// fsync of a directory commits the namespace journal: every create, rename, unlink, mkdir
    /// and rmdir so far, in order (as a journaling filesystem's commit does; POSIX promises only
    /// that directory's own entries, and the agent's data directory is flat).
    pub fn fsyncdir(&mut self, ino: u64) -> Result<(), Errno32> {
        self.dir(ino)?;
        let ops = std::mem::take(&mut self.journal);
        for op in ops {
            self.commit(op)?;
        }
        self.stats.dir_fsyncs += 1;
        Ok(())
    }

    fn commit(&mut self, op: MetaOp) -> Result<(), Errno32> {
        let root = self.backing.clone();
        match op {
            MetaOp::Create { ino, parent, name } => {
                let path = root.join(self.rel_dir(parent)?).join(&name);
                let staged = root.join(STAGING).join(ino.to_string());
                let f = self.file_state(ino)?;
                if f.staged {
                    std::fs::rename(&staged, &path).map_err(|e| eio("committing a create", e))?;
                    f.staged = false;
                } else {
                    let file = OpenOptions::new()
                        .read(true)
                        .write(true)
                        .create_new(true)
                        .open(&path)
                        .map_err(|e| eio("committing a create", e))?;
                    f.durable = Some(file);
                    f.durable_len = 0;
                }
                f.link = Some((parent, name));
            }
            MetaOp::Mkdir { ino, parent, name } => {
                let rel = self.rel_dir(parent)?.join(&name);
                std::fs::create_dir(root.join(&rel)).map_err(|e| eio("committing a mkdir", e))?;
                if let Some(Node {
                    kind: Kind::Dir(d), ..
                }) = self.nodes.get_mut(&ino)
                {
                    d.durable_path = Some(rel);
                }
            }
            MetaOp::Unlink { ino } => {
                let path = self.durable_file_path(ino)?;
                std::fs::remove_file(&path).map_err(|e| eio("committing an unlink", e))?;
                self.file_state(ino)?.link = None;
            }
            MetaOp::Rmdir { ino } => {
                let rel = self.rel_dir(ino)?;
                std::fs::remove_dir(root.join(rel)).map_err(|e| eio("committing an rmdir", e))?;
                if let Some(Node {
                    kind: Kind::Dir(d), ..
                }) = self.nodes.get_mut(&ino)
                {
                    d.durable_path = None;
                }
            }
            MetaOp::Rename {
                ino,
                to_parent,
                to_name,
                replaced,
            } => {
                let from = self.durable_file_path(ino)?;
                let to = root.join(self.rel_dir(to_parent)?).join(&to_name);
                std::fs::rename(&from, &to).map_err(|e| eio("committing a rename", e))?;
                if let Some(r) = replaced {
                    self.file_state(r)?.link = None;
                }
                self.file_state(ino)?.link = Some((to_parent, to_name));
            }
        }
        Ok(())
    }

    fn durable_file_path(&mut self, ino: u64) -> Result<PathBuf, Errno32> {
        let (parent, name) = self
            .file_state(ino)?
            .link
            .clone()
            .ok_or(Errno::EIO as i32)?;
        Ok(self.backing.join(self.rel_dir(parent)?).join(name))
    }

    pub fn backing(&self) -> &Path {
        &self.backing
    }

    pub fn stats(&self) -> Stats {
        self.stats
    }
}
