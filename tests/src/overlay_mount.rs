//! Tier-2 helpers: real overlayfs mounts in temp dirs (root, no Docker), sysctl guards,
//! and draining a [`Watcher`] until it is quiet.
//!
//! Kernel features: overlayfs (3.18), mount(2), inotify limits in `/proc/sys/fs/inotify`.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fsmon::event::{FileEvent, FileKind, WatchOutput};
use fsmon::watcher::{ContainerLayer, Watcher};

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).expect("path without NUL")
}

/// Panics unless running as root: tier 2 mounts overlays.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "tier-2 tests mount overlayfs: run them as root (cargo xtask test)"
    );
}

/// An overlay mount: `lowers` (top-most first), `upper`, `work`, `merged`, all in one temp
/// dir; unmounted (lazily) and removed on drop.
pub struct OverlayMount {
    /// Image layers, top-most first.
    pub lowers: Vec<PathBuf>,
    /// The writable layer (what the watcher watches).
    pub upper: PathBuf,
    /// The container's view: tests act through it.
    pub merged: PathBuf,
    /// A directory next to the layers, outside the mount and the upper dir.
    pub outside: PathBuf,
    mounted: bool,
    /// Removed (after the unmount) on drop.
    _dir: tempfile::TempDir,
}

impl OverlayMount {
    /// Makes `layers` lower dirs, lets `populate` fill them (index 0 is the top-most),
    /// then mounts.
    pub fn new(layers: usize, populate: impl FnOnce(&[PathBuf])) -> OverlayMount {
        let dir = tempfile::Builder::new()
            .prefix("fsmon-t2-")
            .tempdir()
            .expect("temp dir");
        let root = dir.path().to_path_buf();
        let lowers: Vec<PathBuf> = (0..layers)
            .map(|i| root.join(format!("lower{i}")))
            .collect();
        for l in &lowers {
            std::fs::create_dir(l).expect("lower dir");
        }
        populate(&lowers);
        let (upper, work, merged, outside) = (
            root.join("upper"),
            root.join("work"),
            root.join("merged"),
            root.join("outside"),
        );
        for d in [&upper, &work, &merged, &outside] {
            std::fs::create_dir(d).expect("overlay dir");
        }
        let lowerdir = lowers
            .iter()
            .map(|l| l.display().to_string())
            .collect::<Vec<_>>()
            .join(":");
        let opts = CString::new(format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        ))
        .expect("options");
        let (src, fstype, target) = (c"overlay", c"overlay", cpath(&merged));
        // SAFETY: all pointers are NUL-terminated strings that outlive the call.
        let r = unsafe {
            libc::mount(
                src.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                0,
                opts.as_ptr().cast(),
            )
        };
        assert_eq!(r, 0, "mount overlay: {}", std::io::Error::last_os_error());
        OverlayMount {
            lowers,
            upper,
            merged,
            outside,
            mounted: true,
            _dir: dir,
        }
    }

    /// The layers as the watcher takes them.
    pub fn layer(&self) -> ContainerLayer {
        ContainerLayer {
            upperdir: self.upper.clone(),
            lowerdirs: self.lowers.clone(),
        }
    }

    /// `merged/<rel>`.
    pub fn m(&self, rel: &str) -> PathBuf {
        self.merged.join(rel)
    }
}

impl Drop for OverlayMount {
    fn drop(&mut self) {
        if self.mounted {
            let target = cpath(&self.merged);
            // SAFETY: NUL-terminated path; MNT_DETACH cannot fail on a busy mount.
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
        }
    }
}

/// Creates a whiteout (char device 0/0) at `path`, as an image layer would hold one.
pub fn mknod_whiteout(path: &Path) {
    let p = cpath(path);
    // SAFETY: NUL-terminated path.
    let r = unsafe { libc::mknod(p.as_ptr(), libc::S_IFCHR, 0) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Marks a directory opaque (`trusted.overlay.opaque=y`), as an image layer would.
pub fn set_opaque(path: &Path) {
    let p = cpath(path);
    let (name, value) = (c"trusted.overlay.opaque", b"y");
    // SAFETY: NUL-terminated path and name, `value` valid for its length.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            name.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
}

/// Sets a sysctl under `/proc/sys` and puts the old value back on drop (even on panic).
pub struct SysctlGuard {
    path: PathBuf,
    old: String,
}

impl SysctlGuard {
    /// `name` like `fs/inotify/max_user_watches`.
    pub fn set(name: &str, value: u64) -> SysctlGuard {
        let path = Path::new("/proc/sys").join(name);
        let old = std::fs::read_to_string(&path).expect("read sysctl");
        std::fs::write(&path, value.to_string()).expect("write sysctl");
        SysctlGuard { path, old }
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(&self.path, self.old.trim()) {
            eprintln!("could not restore {}: {e}", self.path.display());
        }
    }
}

/// Number of inotify watches currently held by root's processes (from `/proc/*/fdinfo`):
/// `fs.inotify.max_user_watches` is a per-user limit.
pub fn inotify_watches_in_use() -> u64 {
    use std::os::unix::fs::MetadataExt;
    let mut n = 0;
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return 0;
    };
    for p in procs.flatten() {
        if p.metadata().map_or(true, |m| m.uid() != 0) {
            continue;
        }
        let Ok(fds) = std::fs::read_dir(p.path().join("fdinfo")) else {
            continue;
        };
        for fd in fds.flatten() {
            if let Ok(s) = std::fs::read_to_string(fd.path()) {
                n += s.lines().filter(|l| l.starts_with("inotify wd:")).count() as u64;
            }
        }
    }
    n
}

/// Reads the watcher until nothing has arrived for `quiet` (or `max` passed).
pub fn drain(w: &mut Watcher, quiet: Duration, max: Duration) -> Vec<WatchOutput> {
    let mut out = Vec::new();
    let deadline = Instant::now() + max;
    w.read_events(&mut out).expect("read_events");
    let quiet_ms = i32::try_from(quiet.as_millis()).unwrap_or(i32::MAX);
    while Instant::now() < deadline {
        let mut p = libc::pollfd {
            fd: w.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, quiet_ms) };
        if r <= 0 {
            break;
        }
        w.read_events(&mut out).expect("read_events");
    }
    out
}

/// The file events of `outs` (overflows left out).
pub fn files(outs: &[WatchOutput]) -> Vec<FileEvent> {
    outs.iter()
        .filter_map(|o| match o {
            WatchOutput::File(f) => Some(f.clone()),
            WatchOutput::Overflow { .. } | WatchOutput::Exited { .. } => None,
        })
        .collect()
}

/// One line per event, for assertion messages.
pub fn show(evs: &[FileEvent]) -> String {
    evs.iter()
        .map(|e| {
            let old = e
                .old_path
                .as_ref()
                .map(|o| format!("{} -> ", String::from_utf8_lossy(o)));
            format!(
                "{} {}{}{} [{}] {}",
                e.container,
                e.kind.as_str(),
                if e.is_dir { "(dir) " } else { " " },
                old.unwrap_or_default(),
                String::from_utf8_lossy(&e.path).escape_debug(),
                e.source.as_str()
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// How many events of `kind` at `path`.
pub fn count(evs: &[FileEvent], kind: FileKind, path: &[u8]) -> usize {
    evs.iter()
        .filter(|e| e.kind == kind && e.path == path)
        .count()
}
