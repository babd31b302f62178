//! The raw syscalls of the watcher, each wrapped once with its `// SAFETY:` argument.
//!
//! The inotify instance, its watches and the parsing of its events are the `inotify`
//! crate's (see `fs` and the read loop). What is left here is what no crate does the way
//! the watcher needs it: `openat2` with `RESOLVE_*` (std and the crates open by path,
//! following symlinks; `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS` is what keeps every open
//! inside the upperdir), `statx` for the birth time relative to an fd without following
//! (std's `Metadata::created` needs a path or an open file), `getdents64` on the fd that
//! was opened and checked (std's `read_dir` opens the path again), the `*xattr` calls on
//! `/proc/self/fd` paths (std has none), and a one-fd `poll` for the 1 ms rename-partner
//! wait.
//!
//! Kernel features: openat2(2) with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS |
//! RESOLVE_NO_XDEV` (5.6; before that, or where seccomp hides it, every path is opened one
//! component at a time with `openat(O_NOFOLLOW | O_DIRECTORY)`, which is as strict for
//! names without `/`), getdents64(2), statx(2) with `STATX_BTIME` (4.11; without it, fstatat
//! and no birth time), the `*xattr(2)` family, procfs magic links
//! (`/proc/self/fd/N`).
//!
//! Names handed to these functions come from the kernel (inotify events, directory
//! listings): single components without `/` or NUL. They are still checked, and anything
//! else is refused with `EINVAL` rather than resolved.

use std::ffi::CStr;
use std::io;
use std::mem::MaybeUninit;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

/// Longest file name Linux allows (`NAME_MAX`).
const NAME_MAX: usize = 255;

/// The `struct open_how` of openat2(2) (libc's copy is `#[non_exhaustive]`).
#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

/// Resolution rules for everything opened below an upperdir or an image layer: stay below
/// the starting directory, follow no symlink (not even `/proc` magic links), cross no
/// mount point.
const RESOLVE_STRICT: u64 = libc::RESOLVE_BENEATH
    | libc::RESOLVE_NO_SYMLINKS
    | libc::RESOLVE_NO_MAGICLINKS
    | libc::RESOLVE_NO_XDEV;

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// Runs `f` with `name` as a NUL-terminated single path component, without allocating.
fn with_name<R>(name: &[u8], f: impl FnOnce(&CStr) -> io::Result<R>) -> io::Result<R> {
    if name.is_empty()
        || name.len() > NAME_MAX
        || name == b"."
        || name == b".."
        || name.contains(&b'/')
        || name.contains(&0)
    {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut buf = [0u8; NAME_MAX + 1];
    buf[..name.len()].copy_from_slice(name);
    let c = CStr::from_bytes_with_nul(&buf[..=name.len()])
        .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    f(c)
}

/// `/proc/self/fd/<fd>[/<name>]` as a C string: the way to name exactly the inode an fd
/// holds, whatever happened to its path since it was opened.
fn proc_fd_path(fd: RawFd, name: Option<&[u8]>) -> io::Result<Vec<u8>> {
    let mut p = format!("/proc/self/fd/{fd}").into_bytes();
    if let Some(name) = name {
        with_name(name, |_| Ok(()))?;
        p.push(b'/');
        p.extend_from_slice(name);
    }
    p.push(0);
    Ok(p)
}

fn cstr(bytes: &[u8]) -> io::Result<&CStr> {
    CStr::from_bytes_with_nul(bytes).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

/// `/proc/self/fd/<fd>`: the magic link through which a watch is added on exactly the
/// inode the fd holds (see `SysFs::add_watch`).
pub(crate) fn proc_fd_link(fd: BorrowedFd<'_>) -> std::path::PathBuf {
    std::path::PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

/// Waits up to `timeout_ms` for `fd` to become readable.
pub(crate) fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> bool {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let r = unsafe { libc::poll(&mut p, 1, timeout_ms) };
    r > 0 && p.revents & libc::POLLIN != 0
}

/// openat2(2) turned out not to exist here (`ENOSYS`).
static NO_OPENAT2: AtomicBool = AtomicBool::new(false);

/// Opens `path` below `dirfd` refusing symlinks, `..` and mount crossings: openat2 with
/// `resolve`, or, without openat2, one component at a time.
fn openat2(dirfd: RawFd, path: &CStr, flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
    if !NO_OPENAT2.load(Ordering::Relaxed) {
        match openat2_raw(dirfd, path, flags, resolve) {
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
                NO_OPENAT2.store(true, Ordering::Relaxed);
            }
            r => return r,
        }
    }
    open_by_components(dirfd, path.to_bytes(), flags)
}

fn openat_raw(dirfd: RawFd, name: &CStr, flags: libc::c_int) -> io::Result<OwnedFd> {
    loop {
        // SAFETY: `name` is NUL-terminated; the call only creates a descriptor.
        let fd = unsafe { libc::openat(dirfd, name.as_ptr(), flags | libc::O_CLOEXEC) };
        if fd >= 0 {
            // SAFETY: a fresh descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// The openat2 fallback: every component is a plain name (no `..`, no `/`), opened with
/// `O_NOFOLLOW | O_DIRECTORY` relative to the previous one (mount crossings are not
/// detected here).
fn open_by_components(dirfd: RawFd, path: &[u8], flags: libc::c_int) -> io::Result<OwnedFd> {
    let parts: Vec<&[u8]> = path
        .split(|&c| c == b'/')
        .filter(|p| !p.is_empty() && *p != b".")
        .collect();
    let last_flags = flags | libc::O_NOFOLLOW;
    if parts.is_empty() {
        return openat_raw(dirfd, c".", flags);
    }
    let mut cur: Option<OwnedFd> = None;
    for (i, part) in parts.iter().enumerate() {
        let at = cur.as_ref().map_or(dirfd, AsRawFd::as_raw_fd);
        let f = if i + 1 == parts.len() {
            last_flags
        } else {
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW
        };
        cur = Some(with_name(part, |c| openat_raw(at, c, f))?);
    }
    cur.ok_or_else(|| io::Error::from_raw_os_error(libc::ENOENT))
}

fn openat2_raw(dirfd: RawFd, path: &CStr, flags: libc::c_int, resolve: u64) -> io::Result<OwnedFd> {
    let how = OpenHow {
        flags: u64::from((flags | libc::O_CLOEXEC).unsigned_abs()),
        mode: 0,
        resolve,
    };
    loop {
        // SAFETY: `path` is NUL-terminated, `how` is a valid open_how of the size passed.
        let r = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dirfd,
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        if r >= 0 {
            let fd = RawFd::try_from(r).map_err(|_| io::Error::from_raw_os_error(libc::EBADF))?;
            // SAFETY: a fresh descriptor that nothing else owns.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Opens the directory `name` inside `dir` (one component; never a symlink, never across
/// a mount). `read`: `O_RDONLY` (to list it, to read its xattrs) instead of `O_PATH`.
pub(crate) fn open_child_dir(dir: BorrowedFd<'_>, name: &[u8], read: bool) -> io::Result<OwnedFd> {
    let mode = if read { libc::O_RDONLY } else { libc::O_PATH };
    with_name(name, |c| {
        openat2(
            dir.as_raw_fd(),
            c,
            mode | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            RESOLVE_STRICT,
        )
    })
}

/// Re-opens the directory `dir` refers to, for reading (to list it).
pub(crate) fn reopen_dir(dir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    openat2(
        dir.as_raw_fd(),
        c".",
        libc::O_RDONLY | libc::O_DIRECTORY,
        RESOLVE_STRICT,
    )
}

/// Opens `rel` (a relative path of several components, `b""` for `root` itself) below
/// `root` as a directory, refusing symlinks anywhere on the way.
pub(crate) fn open_dir_beneath(
    root: BorrowedFd<'_>,
    rel: &[u8],
    read: bool,
) -> io::Result<OwnedFd> {
    let mode = if read { libc::O_RDONLY } else { libc::O_PATH };
    let mut p = Vec::with_capacity(rel.len() + 2);
    if rel.is_empty() {
        p.push(b'.');
    } else {
        p.extend_from_slice(rel);
    }
    p.push(0);
    openat2(
        root.as_raw_fd(),
        cstr(&p)?,
        mode | libc::O_DIRECTORY,
        RESOLVE_STRICT,
    )
}

/// Opens a trusted host path given by the container engine (an upperdir, an image layer):
/// its last component must be a directory and not a symlink.
pub(crate) fn open_host_dir(path: &Path) -> io::Result<OwnedFd> {
    let mut p = path.as_os_str().as_bytes().to_vec();
    p.push(0);
    let c = cstr(&p)?;
    // SAFETY: `c` is NUL-terminated; the flags ask for a new descriptor only.
    let fd = cvt(unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// What the watcher keeps of a `struct stat`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Stat {
    pub dev: u64,
    pub ino: u64,
    pub mode: u32,
    pub nlink: u64,
    pub uid: u32,
    pub gid: u32,
    pub rdev: u64,
    pub size: u64,
    pub atime_ns: i64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
    /// [`reads`] when the stat was asked for: the stat is newer than every event of the
    /// read numbered this or lower.
    pub read_gen: u32,
}

/// Reads of the inotify fd so far (see [`next_read`]).
static READS: AtomicU32 = AtomicU32::new(1);

/// Numbers a read of the inotify fd; call it after read(2) returned. Every event of that
/// read was queued before any stat whose [`Stat::read_gen`] is at least the number.
pub(crate) fn next_read() -> u32 {
    READS.fetch_add(1, Ordering::AcqRel).wrapping_add(1)
}

/// The number of the latest read (taken before each stat syscall).
fn reads() -> u32 {
    READS.load(Ordering::Acquire)
}

impl Stat {
    fn from_raw(st: &libc::stat, read_gen: u32) -> Stat {
        Stat {
            read_gen,
            dev: st.st_dev,
            ino: st.st_ino,
            mode: st.st_mode,
            nlink: st.st_nlink,
            uid: st.st_uid,
            gid: st.st_gid,
            rdev: st.st_rdev,
            size: u64::try_from(st.st_size).unwrap_or(0),
            atime_ns: st
                .st_atime
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_atime_nsec),
            mtime_ns: st
                .st_mtime
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_mtime_nsec),
            ctime_ns: st
                .st_ctime
                .saturating_mul(1_000_000_000)
                .saturating_add(st.st_ctime_nsec),
        }
    }

    pub fn is_dir(&self) -> bool {
        self.mode & libc::S_IFMT == libc::S_IFDIR
    }

    pub fn meta(&self) -> crate::overlay::Meta {
        crate::overlay::Meta {
            mode: self.mode,
            uid: self.uid,
            gid: self.gid,
            size: self.size,
            atime_ns: self.atime_ns,
            mtime_ns: self.mtime_ns,
            ctime_ns: self.ctime_ns,
            removed: self.nlink == 0,
        }
    }
}

fn fstatat_raw(dirfd: RawFd, path: &CStr, flags: libc::c_int) -> io::Result<Stat> {
    let read_gen = reads();
    let mut st = MaybeUninit::<libc::stat>::uninit();
    // SAFETY: `path` is NUL-terminated and `st` is valid for writes of a `struct stat`.
    cvt(unsafe { libc::fstatat(dirfd, path.as_ptr(), st.as_mut_ptr(), flags) })?;
    // SAFETY: fstatat succeeded, so it filled `st`.
    Ok(Stat::from_raw(unsafe { st.assume_init_ref() }, read_gen))
}

/// `lstat` of the entry `name` in `dir` (never follows a symlink).
pub(crate) fn stat_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<Stat> {
    with_name(name, |c| {
        fstatat_raw(dir.as_raw_fd(), c, libc::AT_SYMLINK_NOFOLLOW)
    })
}

/// `fstat` of an fd (also works on `O_PATH` fds).
pub(crate) fn stat_fd(fd: BorrowedFd<'_>) -> io::Result<Stat> {
    fstatat_raw(
        fd.as_raw_fd(),
        c"",
        libc::AT_EMPTY_PATH | libc::AT_SYMLINK_NOFOLLOW,
    )
}

/// statx(2) turned out not to exist here (`ENOSYS`: before 4.11; `ENOSYS`/`EPERM`: hidden
/// by seccomp).
static NO_STATX: AtomicBool = AtomicBool::new(false);

fn ts_ns(t: &libc::statx_timestamp) -> i64 {
    t.tv_sec
        .saturating_mul(1_000_000_000)
        .saturating_add(i64::from(t.tv_nsec))
}

fn statx_raw(dirfd: RawFd, path: &CStr) -> io::Result<(Stat, Option<i64>)> {
    let read_gen = reads();
    let mut sx = MaybeUninit::<libc::statx>::zeroed();
    // SAFETY: `path` is NUL-terminated and `sx` is valid for writes of a `struct statx`;
    // the kernel writes no more than that (the mask asks for nothing beyond it).
    let r = unsafe {
        libc::syscall(
            libc::SYS_statx,
            dirfd,
            path.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_BASIC_STATS | libc::STATX_BTIME,
            sx.as_mut_ptr(),
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: all-zero bytes are a valid `struct statx` (integers only), and statx
    // succeeded, so the kernel filled it.
    let sx = unsafe { sx.assume_init() };
    let st = Stat {
        dev: libc::makedev(sx.stx_dev_major, sx.stx_dev_minor),
        ino: sx.stx_ino,
        mode: u32::from(sx.stx_mode),
        nlink: u64::from(sx.stx_nlink),
        uid: sx.stx_uid,
        gid: sx.stx_gid,
        rdev: libc::makedev(sx.stx_rdev_major, sx.stx_rdev_minor),
        size: sx.stx_size,
        atime_ns: ts_ns(&sx.stx_atime),
        mtime_ns: ts_ns(&sx.stx_mtime),
        ctime_ns: ts_ns(&sx.stx_ctime),
        read_gen,
    };
    let btime = (sx.stx_mask & libc::STATX_BTIME != 0).then(|| ts_ns(&sx.stx_btime));
    Ok((st, btime))
}

/// `lstat` of the entry `name` in `dir` (never follows a symlink), with its birth time in
/// ns since the epoch when the file system records it (statx(2) `STATX_BTIME`, 4.11;
/// `None` without statx, or on file systems that keep no birth time).
pub(crate) fn statx_at(dir: BorrowedFd<'_>, name: &[u8]) -> io::Result<(Stat, Option<i64>)> {
    with_name(name, |c| {
        if !NO_STATX.load(Ordering::Relaxed) {
            match statx_raw(dir.as_raw_fd(), c) {
                // EPERM: what older seccomp profiles answer for a syscall they do not know.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENOSYS | libc::EPERM)) => {
                    NO_STATX.store(true, Ordering::Relaxed);
                }
                r => return r,
            }
        }
        fstatat_raw(dir.as_raw_fd(), c, libc::AT_SYMLINK_NOFOLLOW).map(|st| (st, None))
    })
}

fn xattr_result(r: isize) -> io::Result<Option<usize>> {
    if r >= 0 {
        return Ok(Some(r.unsigned_abs()));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENODATA | libc::ENOTSUP | libc::ERANGE) => Ok(None),
        _ => Err(e),
    }
}

/// Reads the first of `names` that is set on the inode `dir` refers to (an `O_PATH` fd is
/// fine: the read goes through its magic link). Values longer than `buf` count as unset.
pub(crate) fn xattr_of_fd<'b>(
    dir: BorrowedFd<'_>,
    names: &[&str],
    buf: &'b mut [u8],
) -> io::Result<Option<&'b [u8]>> {
    let path = proc_fd_path(dir.as_raw_fd(), None)?;
    xattr_path(&path, true, names, buf)
}

/// Reads the first of `names` that is set on the entry `name` of `dir`, without following
/// it if it is a symlink.
pub(crate) fn xattr_at<'b>(
    dir: BorrowedFd<'_>,
    name: &[u8],
    names: &[&str],
    buf: &'b mut [u8],
) -> io::Result<Option<&'b [u8]>> {
    let path = proc_fd_path(dir.as_raw_fd(), Some(name))?;
    xattr_path(&path, false, names, buf)
}

fn xattr_path<'b>(
    path: &[u8],
    follow_last: bool,
    names: &[&str],
    buf: &'b mut [u8],
) -> io::Result<Option<&'b [u8]>> {
    let path = cstr(path)?;
    for attr in names {
        let mut a = attr.as_bytes().to_vec();
        a.push(0);
        let a = cstr(&a)?;
        // SAFETY: `path` and `a` are NUL-terminated, `buf` is valid for `buf.len()` bytes.
        let r = unsafe {
            if follow_last {
                libc::getxattr(
                    path.as_ptr(),
                    a.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            } else {
                libc::lgetxattr(
                    path.as_ptr(),
                    a.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                )
            }
        };
        if let Some(n) = xattr_result(r)? {
            return Ok(Some(&buf[..n]));
        }
    }
    Ok(None)
}

/// One directory entry from getdents64(2).
#[derive(Clone, Debug)]
pub(crate) struct Dirent {
    pub ino: u64,
    pub dtype: u8,
    pub name: Box<[u8]>,
}

/// Lists a directory opened for reading (`.` and `..` left out).
pub(crate) fn list_dir(
    dir: BorrowedFd<'_>,
    buf: &mut Vec<u8>,
    out: &mut Vec<Dirent>,
) -> io::Result<()> {
    const HEADER: usize = 19; // d_ino (8) + d_off (8) + d_reclen (2) + d_type (1)
    if buf.len() < 32 * 1024 {
        buf.resize(32 * 1024, 0);
    }
    loop {
        // SAFETY: `buf` is valid for writes of `buf.len()` bytes; the kernel writes whole
        // `linux_dirent64` records into it.
        let n = unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                dir.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        let n = usize::try_from(n).unwrap_or(0).min(buf.len());
        if n == 0 {
            return Ok(());
        }
        let mut off = 0;
        while off + HEADER <= n {
            let rec = &buf[off..n];
            let ino = u64::from_ne_bytes(rec[0..8].try_into().unwrap_or([0; 8]));
            let reclen = usize::from(u16::from_ne_bytes([rec[16], rec[17]]));
            let dtype = rec[18];
            if reclen < HEADER || reclen > rec.len() {
                return Err(io::Error::from_raw_os_error(libc::EIO));
            }
            let raw = &rec[HEADER..reclen];
            let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
            if name != b"." && name != b".." && !name.is_empty() {
                out.push(Dirent {
                    ino,
                    dtype,
                    name: name.into(),
                });
            }
            off += reclen;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::os::unix::ffi::OsStrExt;

    use super::*;

    fn fixture() -> (tempfile::TempDir, OwnedFd) {
        let t = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(t.path().join("a/b")).expect("mkdir");
        std::os::unix::fs::symlink("a", t.path().join("link")).expect("symlink");
        std::os::unix::fs::symlink("/", t.path().join("a/root")).expect("symlink");
        let fd = open_host_dir(t.path()).expect("open");
        (t, fd)
    }

    #[test]
    fn opens_only_real_directories_below() {
        let (_t, root) = fixture();
        for via_openat2 in [true, false] {
            let open = |rel: &[u8]| {
                if via_openat2 {
                    open_dir_beneath(root.as_fd(), rel, false)
                } else {
                    let mut p = rel.to_vec();
                    p.push(0);
                    let c = CStr::from_bytes_with_nul(&p).expect("cstr");
                    open_by_components(
                        root.as_raw_fd(),
                        c.to_bytes(),
                        libc::O_PATH | libc::O_DIRECTORY,
                    )
                }
            };
            assert!(open(b"a/b").is_ok());
            assert!(open(b"").is_ok());
            for bad in [
                &b"link"[..],
                b"link/b",
                b"a/root",
                b"a/root/etc",
                b"../a",
                b"a/../..",
            ] {
                assert!(
                    open(bad).is_err(),
                    "{} opened (openat2: {via_openat2})",
                    String::from_utf8_lossy(bad)
                );
            }
        }
        let a = open_child_dir(root.as_fd(), b"a", false).expect("a");
        assert!(open_child_dir(a.as_fd(), b"b", true).is_ok());
        for bad in [&b"root"[..], b"..", b".", b"b/..", b"", b"x\0y"] {
            assert!(open_child_dir(a.as_fd(), bad, false).is_err());
        }
    }

    #[test]
    fn stats_and_lists_hostile_names() {
        let t = tempfile::tempdir().expect("temp dir");
        let names: [&[u8]; 3] = [b"new\nline", b"bad\xff", b"plain"];
        for n in names {
            std::fs::write(t.path().join(std::ffi::OsStr::from_bytes(n)), "x").expect("write");
        }
        std::os::unix::fs::symlink("/", t.path().join("sym")).expect("symlink");
        let root = open_host_dir(t.path()).expect("open");
        let st = stat_at(root.as_fd(), b"sym").expect("lstat");
        assert_eq!(st.mode & libc::S_IFMT, libc::S_IFLNK, "never followed");
        assert_eq!(stat_at(root.as_fd(), b"new\nline").expect("stat").size, 1);
        assert!(stat_fd(root.as_fd()).expect("fstat").is_dir());
        let (sx, btime) = statx_at(root.as_fd(), b"sym").expect("statx");
        assert_eq!(sx, st, "statx agrees with lstat, never follows");
        let (sx, btime2) = statx_at(root.as_fd(), b"new\nline").expect("statx");
        assert_eq!(sx, stat_at(root.as_fd(), b"new\nline").expect("stat"));
        if let (Some(b), Some(b2)) = (btime, btime2) {
            assert!(b > 0 && b <= st.ctime_ns && b2 <= sx.ctime_ns);
        }
        assert!(statx_at(root.as_fd(), b"a/b").is_err());
        assert!(statx_at(root.as_fd(), b"missing").is_err());
        let rd = reopen_dir(root.as_fd()).expect("reopen");
        let (mut buf, mut out) = (Vec::new(), Vec::new());
        list_dir(rd.as_fd(), &mut buf, &mut out).expect("list");
        let mut got: Vec<&[u8]> = out.iter().map(|d| &d.name[..]).collect();
        got.sort();
        let mut want = vec![&b"bad\xff"[..], b"new\nline", b"plain", b"sym"];
        want.sort();
        assert_eq!(got, want);
        assert!(out.iter().all(|d| d.ino != 0));
    }
}
