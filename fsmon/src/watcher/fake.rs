//! An in-memory file system for tier-1 tests of the watcher's state machine: [`FakeFs`]
//! implements [`Fs`] over a tree of inodes that a test builds and changes between the raw
//! inotify events it feeds ([`Watcher::feed`](super::Watcher::feed)), so that a race (what
//! a handler finds on disk is later than its event) is a fixed, deterministic sequence that
//! needs neither root nor overlayfs.

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use super::fs::{Dir, Fs};
use super::sys::{Dirent, Stat};

/// One inode: its attributes, and for a directory its entries.
#[derive(Debug, Default)]
struct Inode {
    stat: Stat,
    /// Birth time (ns since the epoch).
    btime_ns: i64,
    children: BTreeMap<Box<[u8]>, u64>,
}

#[derive(Debug, Default)]
struct Inner {
    inodes: HashMap<u64, Inode>,
    hosts: HashMap<PathBuf, u64>,
    next_ino: u64,
    /// Watches, by inode (one per inode, as inotify gives).
    wds: HashMap<u64, i32>,
    next_wd: i32,
    /// The most watches (`fs.inotify.max_user_watches`), if limited.
    watch_limit: Option<usize>,
    /// The clock of the file system's timestamps (ns since the epoch), moved by every
    /// change; starts an hour before the wall clock, so what a test makes before arming
    /// predates the arming.
    now_ns: i64,
}

/// An in-memory file system (upper directories only: no xattrs, no image layers).
#[derive(Debug, Default)]
pub(super) struct FakeFs {
    inner: Mutex<Inner>,
}

fn err(code: i32) -> io::Error {
    io::Error::from_raw_os_error(code)
}

impl Inner {
    fn tick(&mut self) -> i64 {
        if self.now_ns == 0 {
            self.now_ns = super::epoch_ns(std::time::SystemTime::now()) - 3_600_000_000_000;
        }
        self.now_ns += 1_000;
        self.now_ns
    }

    fn new_inode(&mut self, mode: u32, size: u64) -> u64 {
        self.next_ino += 1;
        let ino = self.next_ino + 100;
        let now = self.tick();
        let stat = Stat {
            dev: 1,
            ino,
            mode,
            nlink: 1,
            size,
            mtime_ns: now,
            ctime_ns: now,
            ..Stat::default()
        };
        self.inodes.insert(
            ino,
            Inode {
                stat,
                btime_ns: now,
                children: BTreeMap::new(),
            },
        );
        ino
    }

    fn inode(&self, ino: u64) -> io::Result<&Inode> {
        self.inodes.get(&ino).ok_or_else(|| err(libc::ENOENT))
    }

    fn child(&self, dir: u64, name: &[u8]) -> io::Result<u64> {
        self.inode(dir)?
            .children
            .get(name)
            .copied()
            .ok_or_else(|| err(libc::ENOENT))
    }

    /// An entry of `dir` was added or removed: its mtime and ctime move.
    fn entries_changed(&mut self, dir: u64) {
        let now = self.tick();
        if let Some(d) = self.inodes.get_mut(&dir) {
            d.stat.mtime_ns = now;
            d.stat.ctime_ns = now;
        }
    }

    fn dir_of(&self, dir: &Dir) -> io::Result<u64> {
        let ino = dir.fake_ino().ok_or_else(|| err(libc::EBADF))?;
        self.inode(ino)?;
        Ok(ino)
    }
}

impl FakeFs {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A host directory (an upperdir) at `host`; returns its inode.
    pub(super) fn host_dir(&self, host: &str) -> u64 {
        let mut fs = self.lock();
        let ino = fs.new_inode(libc::S_IFDIR | 0o755, 4096);
        fs.hosts.insert(PathBuf::from(host), ino);
        ino
    }

    /// Makes the directory `name` in `parent`; returns its inode.
    pub(super) fn mkdir(&self, parent: u64, name: &str) -> u64 {
        let mut fs = self.lock();
        let ino = fs.new_inode(libc::S_IFDIR | 0o755, 4096);
        if let Some(p) = fs.inodes.get_mut(&parent) {
            p.children.insert(name.as_bytes().into(), ino);
        }
        fs.entries_changed(parent);
        ino
    }

    /// Creates the regular file `name` in `parent` with `size` bytes, or writes to it;
    /// returns its inode.
    pub(super) fn write(&self, parent: u64, name: &str, size: u64) -> u64 {
        let mut fs = self.lock();
        if let Ok(ino) = fs.child(parent, name.as_bytes()) {
            let now = fs.tick();
            if let Some(f) = fs.inodes.get_mut(&ino) {
                f.stat.size = size;
                f.stat.mtime_ns = now;
                f.stat.ctime_ns = now;
            }
            return ino;
        }
        let ino = fs.new_inode(libc::S_IFREG | 0o644, size);
        if let Some(p) = fs.inodes.get_mut(&parent) {
            p.children.insert(name.as_bytes().into(), ino);
        }
        fs.entries_changed(parent);
        ino
    }

    /// Makes an overlayfs whiteout `name` in `parent` (a 0/0 character device, as overlayfs
    /// leaves for a deleted image entry), replacing what is there; returns its inode.
    pub(super) fn whiteout(&self, parent: u64, name: &str) -> u64 {
        let mut fs = self.lock();
        let ino = fs.new_inode(libc::S_IFCHR, 0);
        if let Some(p) = fs.inodes.get_mut(&parent) {
            p.children.insert(name.as_bytes().into(), ino);
        }
        fs.entries_changed(parent);
        ino
    }

    /// Changes the mode of `ino` (its ctime moves, as for `chmod`).
    pub(super) fn chmod(&self, ino: u64, perm: u32) {
        let mut fs = self.lock();
        let now = fs.tick();
        if let Some(i) = fs.inodes.get_mut(&ino) {
            i.stat.mode = (i.stat.mode & libc::S_IFMT) | perm;
            i.stat.ctime_ns = now;
        }
    }

    /// Sets the mtime of `ino` to now (`touch`).
    pub(super) fn touch(&self, ino: u64) {
        let mut fs = self.lock();
        let now = fs.tick();
        if let Some(i) = fs.inodes.get_mut(&ino) {
            i.stat.mtime_ns = now;
            i.stat.ctime_ns = now;
        }
    }

    /// Moves the entry `from` of `from_dir` to `to` in `to_dir` (replacing what is there).
    pub(super) fn rename(&self, from_dir: u64, from: &str, to_dir: u64, to: &str) {
        let mut fs = self.lock();
        let Some(ino) = fs
            .inodes
            .get_mut(&from_dir)
            .and_then(|d| d.children.remove(from.as_bytes()))
        else {
            return;
        };
        if let Some(d) = fs.inodes.get_mut(&to_dir) {
            d.children.insert(to.as_bytes().into(), ino);
        }
        fs.entries_changed(from_dir);
        fs.entries_changed(to_dir);
    }

    /// Removes the entry `name` of `dir` (and, for a directory, everything below it).
    pub(super) fn remove(&self, dir: u64, name: &str) {
        let mut fs = self.lock();
        let Some(ino) = fs
            .inodes
            .get_mut(&dir)
            .and_then(|d| d.children.remove(name.as_bytes()))
        else {
            return;
        };
        let mut stack = vec![ino];
        while let Some(i) = stack.pop() {
            if let Some(gone) = fs.inodes.remove(&i) {
                stack.extend(gone.children.values());
            }
            fs.wds.remove(&i);
        }
        fs.entries_changed(dir);
    }

    /// Moves the clock `ms` milliseconds on.
    pub(super) fn advance_ms(&self, ms: i64) {
        let mut fs = self.lock();
        fs.tick();
        fs.now_ns += ms * 1_000_000;
    }

    /// Moves the clock to the wall clock: what changes from now on is newer than an arming
    /// that just happened.
    pub(super) fn catch_up_with_wall_clock(&self) {
        let mut fs = self.lock();
        fs.now_ns = fs
            .now_ns
            .max(super::epoch_ns(std::time::SystemTime::now()) + 1_000_000);
    }

    /// The instant of the clock now.
    pub(super) fn now(&self) -> std::time::SystemTime {
        let mut fs = self.lock();
        let ns = fs.tick();
        std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns.unsigned_abs())
    }

    /// Refuses new watches beyond `max` (`ENOSPC`), or lifts the limit.
    pub(super) fn set_watch_limit(&self, max: Option<usize>) {
        self.lock().watch_limit = max;
    }

    /// The watch descriptor the watcher got for the directory `ino`.
    pub(super) fn wd(&self, ino: u64) -> i32 {
        *self.lock().wds.get(&ino).expect("the directory is watched")
    }

    /// The watch descriptor the next new watch will get.
    pub(super) fn next_wd(&self) -> i32 {
        self.lock().next_wd + 1
    }
}

impl Fs for FakeFs {
    fn open_host_dir(&self, path: &Path) -> io::Result<Dir> {
        let fs = self.lock();
        let ino = *fs.hosts.get(path).ok_or_else(|| err(libc::ENOENT))?;
        fs.inode(ino)?;
        Ok(Dir::fake(ino))
    }

    fn open_child_dir(&self, dir: &Dir, name: &[u8], _read: bool) -> io::Result<Dir> {
        let fs = self.lock();
        let ino = fs.child(fs.dir_of(dir)?, name)?;
        if fs.inode(ino)?.stat.mode & libc::S_IFMT != libc::S_IFDIR {
            return Err(err(libc::ENOTDIR));
        }
        Ok(Dir::fake(ino))
    }

    fn reopen_dir(&self, dir: &Dir) -> io::Result<Dir> {
        let fs = self.lock();
        Ok(Dir::fake(fs.dir_of(dir)?))
    }

    fn open_dir_beneath(&self, root: &Dir, rel: &[u8], _read: bool) -> io::Result<Dir> {
        let fs = self.lock();
        let mut ino = fs.dir_of(root)?;
        for name in rel.split(|&b| b == b'/').filter(|c| !c.is_empty()) {
            ino = fs.child(ino, name)?;
        }
        Ok(Dir::fake(ino))
    }

    fn stat_dir(&self, dir: &Dir) -> io::Result<Stat> {
        let fs = self.lock();
        Ok(fs.inode(fs.dir_of(dir)?)?.stat)
    }

    fn stat_at(&self, dir: &Dir, name: &[u8]) -> io::Result<Stat> {
        let fs = self.lock();
        Ok(fs.inode(fs.child(fs.dir_of(dir)?, name)?)?.stat)
    }

    fn statx_at(&self, dir: &Dir, name: &[u8]) -> io::Result<(Stat, Option<i64>)> {
        let fs = self.lock();
        let inode = fs.inode(fs.child(fs.dir_of(dir)?, name)?)?;
        Ok((inode.stat, Some(inode.btime_ns)))
    }

    fn xattr_of_dir<'b>(
        &self,
        dir: &Dir,
        _names: &[&str],
        _buf: &'b mut [u8],
    ) -> io::Result<Option<&'b [u8]>> {
        self.stat_dir(dir).map(|_| None)
    }

    fn xattr_at<'b>(
        &self,
        dir: &Dir,
        name: &[u8],
        _names: &[&str],
        _buf: &'b mut [u8],
    ) -> io::Result<Option<&'b [u8]>> {
        self.stat_at(dir, name).map(|_| None)
    }

    fn list_dir(&self, dir: &Dir, _buf: &mut Vec<u8>, out: &mut Vec<Dirent>) -> io::Result<()> {
        let fs = self.lock();
        for (name, &ino) in &fs.inode(fs.dir_of(dir)?)?.children {
            let dtype = match fs.inode(ino)?.stat.mode & libc::S_IFMT {
                libc::S_IFDIR => libc::DT_DIR,
                libc::S_IFREG => libc::DT_REG,
                libc::S_IFCHR => libc::DT_CHR,
                _ => libc::DT_UNKNOWN,
            };
            out.push(Dirent {
                ino,
                dtype,
                name: name.clone(),
            });
        }
        Ok(())
    }

    fn add_watch(&self, dir: &Dir, _mask: u32) -> io::Result<i32> {
        let mut fs = self.lock();
        let ino = fs.dir_of(dir)?;
        if let Some(&wd) = fs.wds.get(&ino) {
            return Ok(wd);
        }
        if fs.watch_limit.is_some_and(|max| fs.wds.len() >= max) {
            return Err(err(libc::ENOSPC));
        }
        fs.next_wd += 1;
        let wd = fs.next_wd;
        fs.wds.insert(ino, wd);
        Ok(wd)
    }

    fn rm_watch(&self, wd: i32) {
        self.lock().wds.retain(|_, w| *w != wd);
    }
}

/// One raw inotify record, as read(2) returns it (the name NUL-padded to 16 bytes).
pub(super) fn event(wd: i32, mask: u32, cookie: u32, name: &str) -> Vec<u8> {
    raw_event(wd, mask, cookie, name.as_bytes())
}

/// [`event`] with any bytes as the name.
pub(super) fn raw_event(wd: i32, mask: u32, cookie: u32, name: &[u8]) -> Vec<u8> {
    let padded = if name.is_empty() {
        0
    } else {
        (name.len() + 1).next_multiple_of(16)
    };
    let len = u32::try_from(padded).unwrap_or(u32::MAX);
    let mut v = Vec::with_capacity(16 + padded);
    v.extend_from_slice(&wd.to_ne_bytes());
    v.extend_from_slice(&mask.to_ne_bytes());
    v.extend_from_slice(&cookie.to_ne_bytes());
    v.extend_from_slice(&len.to_ne_bytes());
    v.extend_from_slice(name);
    v.resize(16 + padded, 0);
    v
}
