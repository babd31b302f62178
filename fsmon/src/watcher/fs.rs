//! The state machine's one boundary with the file system: everything a container's watcher
//! does to its upper and image layers (open beneath, stat, list, read xattrs) and to the
//! watches on them goes through [`Fs`]; [`SysFs`] implements it with `sys` (openat2
//! `RESOLVE_*`, statx, getdents64, `*xattr`) and the `inotify` crate (watches added through
//! `/proc/self/fd/N`).
//! Directories are held as opaque [`Dir`] handles, so that another implementation (an
//! in-memory upperdir) can run the state machine without root.
//!
//! Kernel features: those of `sys` (openat2 5.6, statx 4.11, inotify 2.6.36).

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::{Arc, Mutex};

use inotify::{WatchDescriptor, WatchMask, Watches};

use super::sys::{self, Dirent, Stat};

/// A directory the watcher holds open (for [`SysFs`]: an `O_PATH` or read-only fd).
pub(super) struct Dir(Handle);

enum Handle {
    Fd(OwnedFd),
    /// A directory of the in-memory file system of the tests, by inode.
    #[cfg(test)]
    Fake(u64),
}

impl fmt::Debug for Dir {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Handle::Fd(fd) => f.debug_tuple("Dir").field(fd).finish(),
            #[cfg(test)]
            Handle::Fake(ino) => f.debug_tuple("FakeDir").field(ino).finish(),
        }
    }
}

impl Dir {
    fn from_fd(fd: OwnedFd) -> Dir {
        Dir(Handle::Fd(fd))
    }

    /// The fd of a directory opened by [`SysFs`] (`EBADF` for any other).
    fn fd(&self) -> io::Result<BorrowedFd<'_>> {
        match &self.0 {
            Handle::Fd(fd) => Ok(fd.as_fd()),
            #[cfg(test)]
            Handle::Fake(_) => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
    }

    /// The raw fd of a directory opened by [`SysFs`], to name it in a trace.
    pub(super) fn raw_fd(&self) -> Option<std::os::fd::RawFd> {
        use std::os::fd::AsRawFd;
        self.fd().ok().map(|fd| fd.as_raw_fd())
    }

    /// A directory of the in-memory file system of the tests.
    #[cfg(test)]
    pub(super) fn fake(ino: u64) -> Dir {
        Dir(Handle::Fake(ino))
    }

    /// The inode of a directory of the in-memory file system of the tests.
    #[cfg(test)]
    pub(super) fn fake_ino(&self) -> Option<u64> {
        match self.0 {
            Handle::Fake(ino) => Some(ino),
            Handle::Fd(_) => None,
        }
    }
}

/// Every file-system call of the state machine. Names are single components from the
/// kernel (events, listings); nothing is ever resolved through a symlink or outside the
/// directory handed in (see `sys`).
pub(super) trait Fs: Send + Sync {
    /// Opens a host path the runtime gave (an upperdir, an image layer).
    fn open_host_dir(&self, path: &Path) -> io::Result<Dir>;
    /// Opens the directory `name` in `dir` (`read`: to list it, else `O_PATH`).
    fn open_child_dir(&self, dir: &Dir, name: &[u8], read: bool) -> io::Result<Dir>;
    /// Opens `dir` again, for reading (to list it).
    fn reopen_dir(&self, dir: &Dir) -> io::Result<Dir>;
    /// Opens the relative path `rel` (several components; `b""`: `root` itself) below `root`.
    fn open_dir_beneath(&self, root: &Dir, rel: &[u8], read: bool) -> io::Result<Dir>;
    /// The attributes of `dir` itself.
    fn stat_dir(&self, dir: &Dir) -> io::Result<Stat>;
    /// The attributes of the entry `name` of `dir` (never following a symlink).
    fn stat_at(&self, dir: &Dir, name: &[u8]) -> io::Result<Stat>;
    /// [`Fs::stat_at`] with the birth time, when the file system keeps one.
    fn statx_at(&self, dir: &Dir, name: &[u8]) -> io::Result<(Stat, Option<i64>)>;
    /// The first of the xattrs `names` that `dir` has, read into `buf`.
    fn xattr_of_dir<'b>(
        &self,
        dir: &Dir,
        names: &[&str],
        buf: &'b mut [u8],
    ) -> io::Result<Option<&'b [u8]>>;
    /// The first of the xattrs `names` that the entry `name` of `dir` has.
    fn xattr_at<'b>(
        &self,
        dir: &Dir,
        name: &[u8],
        names: &[&str],
        buf: &'b mut [u8],
    ) -> io::Result<Option<&'b [u8]>>;
    /// The entries of a directory opened for reading, into `out` (`buf`: scratch space).
    fn list_dir(&self, dir: &Dir, buf: &mut Vec<u8>, out: &mut Vec<Dirent>) -> io::Result<()>;
    /// Adds a watch with `mask` on `dir` to the watcher's inotify instance.
    fn add_watch(&self, dir: &Dir, mask: u32) -> io::Result<i32>;
    /// Removes a watch (errors are of no interest: the kernel may have dropped it).
    fn rm_watch(&self, wd: i32);
    /// The kernel dropped the watch `wd` (`IN_IGNORED`): forget what was kept for it.
    fn forget_watch(&self, _wd: i32) {}
}

/// The file system shared by the watcher and every container.
pub(super) type SharedFs = Arc<dyn Fs>;

/// The real file system, through `sys`, and the watches of the watcher's inotify instance
/// (the `inotify` crate's).
pub(super) struct SysFs {
    watches: Mutex<SysWatches>,
}

struct SysWatches {
    watches: Watches,
    /// The crate's handle of each watch, by number: the state machine keeps numbers (an
    /// in-memory file system can make those), the crate removes a watch by its handle.
    handles: HashMap<i32, WatchDescriptor>,
}

impl SysFs {
    /// The file system, adding watches to the instance of `watches`.
    pub(super) fn new(watches: Watches) -> SysFs {
        SysFs {
            watches: Mutex::new(SysWatches {
                watches,
                handles: HashMap::new(),
            }),
        }
    }

    fn watches(&self) -> std::sync::MutexGuard<'_, SysWatches> {
        self.watches
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Fs for SysFs {
    fn open_host_dir(&self, path: &Path) -> io::Result<Dir> {
        sys::open_host_dir(path).map(Dir::from_fd)
    }

    fn open_child_dir(&self, dir: &Dir, name: &[u8], read: bool) -> io::Result<Dir> {
        sys::open_child_dir(dir.fd()?, name, read).map(Dir::from_fd)
    }

    fn reopen_dir(&self, dir: &Dir) -> io::Result<Dir> {
        sys::reopen_dir(dir.fd()?).map(Dir::from_fd)
    }

    fn open_dir_beneath(&self, root: &Dir, rel: &[u8], read: bool) -> io::Result<Dir> {
        sys::open_dir_beneath(root.fd()?, rel, read).map(Dir::from_fd)
    }

    fn stat_dir(&self, dir: &Dir) -> io::Result<Stat> {
        sys::stat_fd(dir.fd()?)
    }

    fn stat_at(&self, dir: &Dir, name: &[u8]) -> io::Result<Stat> {
        sys::stat_at(dir.fd()?, name)
    }

    fn statx_at(&self, dir: &Dir, name: &[u8]) -> io::Result<(Stat, Option<i64>)> {
        sys::statx_at(dir.fd()?, name)
    }

    fn xattr_of_dir<'b>(
        &self,
        dir: &Dir,
        names: &[&str],
        buf: &'b mut [u8],
    ) -> io::Result<Option<&'b [u8]>> {
        sys::xattr_of_fd(dir.fd()?, names, buf)
    }

    fn xattr_at<'b>(
        &self,
        dir: &Dir,
        name: &[u8],
        names: &[&str],
        buf: &'b mut [u8],
    ) -> io::Result<Option<&'b [u8]>> {
        sys::xattr_at(dir.fd()?, name, names, buf)
    }

    fn list_dir(&self, dir: &Dir, buf: &mut Vec<u8>, out: &mut Vec<Dirent>) -> io::Result<()> {
        sys::list_dir(dir.fd()?, buf, out)
    }

    fn add_watch(&self, dir: &Dir, mask: u32) -> io::Result<i32> {
        // Through the `/proc/self/fd/N` magic link of the fd that was opened and checked:
        // the kernel resolves it to the fd's own inode, so the watch lands on that
        // directory even if its name has since been replaced by a symlink.
        // (`IN_DONT_FOLLOW` must not be used: it would watch the magic link itself.)
        let link = sys::proc_fd_link(dir.fd()?);
        let mut w = self.watches();
        let handle = w.watches.add(&link, WatchMask::from_bits_retain(mask))?;
        let wd = handle.get_watch_descriptor_id();
        w.handles.insert(wd, handle);
        Ok(wd)
    }

    fn rm_watch(&self, wd: i32) {
        let mut w = self.watches();
        if let Some(handle) = w.handles.remove(&wd) {
            // An error (the kernel already dropped it) is of no interest.
            let _ = w.watches.remove(handle);
        }
    }

    fn forget_watch(&self, wd: i32) {
        self.watches().handles.remove(&wd);
    }
}
