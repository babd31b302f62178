//! Recording the watcher's inputs for replays: [`Recorder`] writes one text line per input
//! of the state machine (calls of the API, raw inotify reads, the end of each call with the
//! outputs it returned) and [`RecordingFs`] one line per answer of the file system and of
//! the clock, so that `replay` (tests) can run the same state machine on the same inputs
//! without root, overlayfs or timing. Used only by the tier-2 harness's recording mode
//! (`FSMON_WATCHER_RECORD`); the daemon never records.
//!
//! The format, one line each (names and paths escaped by [`esc`], no spaces in a token):
//! * `budget N` — the fd budget; `add ID ARMED_NS SINCE_NS|- UPPER LOWER...`, `retry`,
//!   `remove ID`, `setbudget N` — calls of the API;
//! * `read N` then `ev WD MASK COOKIE NAME` N times — one read of the inotify fd;
//! * `end` then `out ...` lines — the end of a call and the outputs it returned;
//! * `fs OP PATH NAME ARG = ANSWER`, `clock = MS` — answers, replayed by key (everything
//!   before ` = `) in the order they were given. A directory handle is named by the path it
//!   was opened at (host path, then `/`-joined names); a stat's read number is the number of
//!   this watcher's reads that came before it (0: none), not the process-wide one.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write as _};
use std::os::fd::RawFd;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use crate::event::{Source, WatchOutput};

use super::fs::{Dir, Fs, SysFs};
use super::rules::RawEvent;
use super::sys::{Dirent, Stat};
use super::{init_inotify, FdBudget, WatchError};

/// Milliseconds since `epoch`, wrapping, never 0 (the clock of `modify` bursts).
pub(super) trait Clock: Send + Sync {
    /// The clock now.
    fn now_ms(&self, epoch: Instant) -> u32;
}

/// The real clock.
pub(super) fn real_now_ms(epoch: Instant) -> u32 {
    let ms = epoch.elapsed().as_millis() & u128::from(u32::MAX);
    u32::try_from(ms).unwrap_or(1).max(1)
}

/// `bytes` as one token: printable ASCII but `\`, `~` and `=` as is, the rest `\xHH`;
/// empty as `~`.
pub(super) fn esc(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "~".into();
    }
    let mut s = String::with_capacity(bytes.len());
    for &b in bytes {
        if b.is_ascii_graphic() && !matches!(b, b'\\' | b'~' | b'=') {
            s.push(char::from(b));
        } else {
            let _ = write!(s, "\\x{b:02x}");
        }
    }
    s
}

/// The `add` line of a container armed at `times`.
pub(super) fn add_line(
    id: &str,
    layer: &super::ContainerLayer,
    times: super::container::ArmTimes,
) -> String {
    let mut s = format!(
        "add {} {} {} {}",
        esc(id.as_bytes()),
        times.armed_ns,
        times.since_ns.map_or_else(|| "-".into(), |n| n.to_string()),
        esc(layer.upperdir.as_os_str().as_bytes())
    );
    for l in &layer.lowerdirs {
        s.push(' ');
        s.push_str(&esc(l.as_os_str().as_bytes()));
    }
    s
}

/// One output as an `out` line's text.
pub(super) fn output_line(o: &WatchOutput) -> String {
    match o {
        WatchOutput::File(f) => {
            let mut s = format!(
                "{} {} {}",
                esc(f.container.as_bytes()),
                f.kind.as_str(),
                esc(&f.path)
            );
            if let Some(old) = &f.old_path {
                let _ = write!(s, " from {}", esc(old));
            }
            if f.is_dir {
                s.push_str(" dir");
            }
            if f.source == Source::Scan {
                s.push_str(" scan");
            }
            s
        }
        WatchOutput::Overflow { container, reason } => format!(
            "overflow {} {reason}",
            container
                .as_deref()
                .map_or_else(|| "-".into(), |c| esc(c.as_bytes()))
        ),
        WatchOutput::Exited { container } => format!("exited {}", esc(container.as_bytes())),
    }
}

/// A stat as an answer: `ok DEV INO MODE NLINK UID GID RDEV SIZE ATIME MTIME CTIME READ`
/// (`read`: the local read number, see the module doc).
pub(super) fn stat_answer(st: &Stat, read: usize) -> String {
    format!(
        "ok {} {} {} {} {} {} {} {} {} {} {} {read}",
        st.dev,
        st.ino,
        st.mode,
        st.nlink,
        st.uid,
        st.gid,
        st.rdev,
        st.size,
        st.atime_ns,
        st.mtime_ns,
        st.ctime_ns
    )
}

fn err_answer(e: &io::Error) -> String {
    format!("err {}", e.raw_os_error().unwrap_or(libc::EIO))
}

struct Inner {
    out: BufWriter<File>,
    /// The path each open directory fd was opened at.
    paths: HashMap<RawFd, Vec<u8>>,
    /// The process-wide number of each of this watcher's reads, in order.
    reads: Vec<u32>,
}

/// Writes a watcher's trace (see the module doc).
pub(super) struct Recorder {
    inner: Mutex<Inner>,
}

impl Recorder {
    /// A trace written to `path` (created or truncated).
    pub(super) fn create(path: &Path) -> io::Result<Recorder> {
        let out = BufWriter::new(File::create(path)?);
        Ok(Recorder {
            inner: Mutex::new(Inner {
                out,
                paths: HashMap::new(),
                reads: Vec::new(),
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Writes one line (a failed write only loses the trace, never an event).
    pub(super) fn line(&self, line: &str) {
        let _ = writeln!(self.lock().out, "{line}");
    }

    /// One read of the inotify fd, numbered `gen` process-wide.
    pub(super) fn read(&self, gen: u32, evs: &[RawEvent<'_>]) {
        let mut inner = self.lock();
        inner.reads.push(gen);
        let _ = writeln!(inner.out, "read {}", evs.len());
        for ev in evs {
            let _ = writeln!(
                inner.out,
                "ev {} {:x} {} {}",
                ev.wd,
                ev.mask,
                ev.cookie,
                esc(ev.name)
            );
        }
    }

    /// The end of a call that returned `outs`.
    pub(super) fn end(&self, outs: &[WatchOutput]) {
        let mut inner = self.lock();
        let _ = writeln!(inner.out, "end");
        for o in outs {
            let _ = writeln!(inner.out, "out {}", output_line(o));
        }
        let _ = inner.out.flush();
    }
}

/// [`SysFs`], with every answer written to a [`Recorder`].
pub(super) struct RecordingFs {
    pub(super) rec: Arc<Recorder>,
    pub(super) sys: SysFs,
}

impl RecordingFs {
    fn path_of(&self, dir: &Dir) -> Vec<u8> {
        let fd = dir.raw_fd().unwrap_or(-1);
        self.rec.lock().paths.get(&fd).cloned().unwrap_or_default()
    }

    fn key(&self, op: &str, dir: Option<&Dir>, name: &[u8], arg: &str) -> String {
        let path = dir.map(|d| self.path_of(d)).unwrap_or_default();
        answer_key(op, &path, name, arg)
    }

    fn answer(&self, key: &str, answer: &str) {
        self.rec.line(&format!("{key} = {answer}"));
    }

    /// Records an open at `path` and its answer.
    fn opened(&self, key: &str, path: Vec<u8>, r: io::Result<Dir>) -> io::Result<Dir> {
        match &r {
            Ok(d) => {
                if let Some(fd) = d.raw_fd() {
                    self.rec.lock().paths.insert(fd, path);
                }
                self.answer(key, "ok");
            }
            Err(e) => self.answer(key, &err_answer(e)),
        }
        r
    }

    fn local_read(&self, st: &Stat) -> usize {
        let inner = self.rec.lock();
        inner
            .reads
            .partition_point(|&g| st.read_gen.wrapping_sub(g) < u32::MAX / 2)
    }

    fn stat_result(&self, key: &str, r: io::Result<Stat>) -> io::Result<Stat> {
        match &r {
            Ok(st) => self.answer(key, &stat_answer(st, self.local_read(st))),
            Err(e) => self.answer(key, &err_answer(e)),
        }
        r
    }

    fn xattr_result<'b>(
        &self,
        key: &str,
        r: io::Result<Option<&'b [u8]>>,
    ) -> io::Result<Option<&'b [u8]>> {
        match &r {
            Ok(Some(v)) => self.answer(key, &format!("ok {}", esc(v))),
            Ok(None) => self.answer(key, "none"),
            Err(e) => self.answer(key, &err_answer(e)),
        }
        r
    }
}

/// The key of an answer: the call `op` on the directory opened at `path`, about `name`.
pub(super) fn answer_key(op: &str, path: &[u8], name: &[u8], arg: &str) -> String {
    format!("fs {op} {} {} {arg}", esc(path), esc(name))
}

/// `base` and `rel` joined by `/` (`base` alone when `rel` is empty).
pub(super) fn joined(mut base: Vec<u8>, rel: &[u8]) -> Vec<u8> {
    if !rel.is_empty() {
        base.push(b'/');
        base.extend_from_slice(rel);
    }
    base
}

impl Clock for RecordingFs {
    fn now_ms(&self, epoch: Instant) -> u32 {
        let ms = real_now_ms(epoch);
        self.rec.line(&format!("clock = {ms}"));
        ms
    }
}

impl Fs for RecordingFs {
    fn open_host_dir(&self, path: &Path) -> io::Result<Dir> {
        let key = answer_key("host", path.as_os_str().as_bytes(), b"", "-");
        let r = self.sys.open_host_dir(path);
        self.opened(&key, path.as_os_str().as_bytes().to_vec(), r)
    }

    fn open_child_dir(&self, dir: &Dir, name: &[u8], read: bool) -> io::Result<Dir> {
        let key = self.key("child", Some(dir), name, if read { "r" } else { "p" });
        let r = self.sys.open_child_dir(dir, name, read);
        self.opened(&key, joined(self.path_of(dir), name), r)
    }

    fn reopen_dir(&self, dir: &Dir) -> io::Result<Dir> {
        let key = self.key("reopen", Some(dir), b"", "-");
        let r = self.sys.reopen_dir(dir);
        self.opened(&key, self.path_of(dir), r)
    }

    fn open_dir_beneath(&self, root: &Dir, rel: &[u8], read: bool) -> io::Result<Dir> {
        let key = self.key("beneath", Some(root), rel, if read { "r" } else { "p" });
        let r = self.sys.open_dir_beneath(root, rel, read);
        self.opened(&key, joined(self.path_of(root), rel), r)
    }

    fn stat_dir(&self, dir: &Dir) -> io::Result<Stat> {
        let key = self.key("statdir", Some(dir), b"", "-");
        self.stat_result(&key, self.sys.stat_dir(dir))
    }

    fn stat_at(&self, dir: &Dir, name: &[u8]) -> io::Result<Stat> {
        let key = self.key("stat", Some(dir), name, "-");
        self.stat_result(&key, self.sys.stat_at(dir, name))
    }

    fn statx_at(&self, dir: &Dir, name: &[u8]) -> io::Result<(Stat, Option<i64>)> {
        let key = self.key("statx", Some(dir), name, "-");
        let r = self.sys.statx_at(dir, name);
        match &r {
            Ok((st, btime)) => {
                let b = btime.map_or_else(|| "-".into(), |b| b.to_string());
                self.answer(
                    &key,
                    &format!("{} {b}", stat_answer(st, self.local_read(st))),
                );
            }
            Err(e) => self.answer(&key, &err_answer(e)),
        }
        r
    }

    fn xattr_of_dir<'b>(
        &self,
        dir: &Dir,
        names: &[&str],
        buf: &'b mut [u8],
    ) -> io::Result<Option<&'b [u8]>> {
        let key = self.key("xattrdir", Some(dir), b"", &names.join(","));
        self.xattr_result(&key, self.sys.xattr_of_dir(dir, names, buf))
    }

    fn xattr_at<'b>(
        &self,
        dir: &Dir,
        name: &[u8],
        names: &[&str],
        buf: &'b mut [u8],
    ) -> io::Result<Option<&'b [u8]>> {
        let key = self.key("xattr", Some(dir), name, &names.join(","));
        self.xattr_result(&key, self.sys.xattr_at(dir, name, names, buf))
    }

    fn list_dir(&self, dir: &Dir, buf: &mut Vec<u8>, out: &mut Vec<Dirent>) -> io::Result<()> {
        let key = self.key("list", Some(dir), b"", "-");
        let from = out.len();
        let r = self.sys.list_dir(dir, buf, out);
        match &r {
            Ok(()) => {
                let mut a = String::from("ok");
                for d in out.get(from..).unwrap_or_default() {
                    let _ = write!(a, " {},{},{}", d.ino, d.dtype, esc(&d.name));
                }
                self.answer(&key, &a);
            }
            Err(e) => self.answer(&key, &err_answer(e)),
        }
        r
    }

    fn add_watch(&self, dir: &Dir, mask: u32) -> io::Result<i32> {
        let key = self.key("watch", Some(dir), b"", &format!("{mask:x}"));
        let r = self.sys.add_watch(dir, mask);
        match &r {
            Ok(wd) => self.answer(&key, &format!("ok {wd}")),
            Err(e) => self.answer(&key, &err_answer(e)),
        }
        r
    }

    fn rm_watch(&self, wd: i32) {
        self.sys.rm_watch(wd);
    }

    fn forget_watch(&self, wd: i32) {
        self.sys.forget_watch(wd);
    }
}

impl super::Watcher {
    /// Tests (tier 2): [`Watcher::with_fd_budget`] (`None`: the budget of [`Watcher::new`]),
    /// with every input of the state machine and every answer of the file system recorded
    /// to `path` for tier-1 replays (see `trace`).
    #[doc(hidden)]
    pub fn recording(budget: Option<usize>, path: &Path) -> Result<Self, WatchError> {
        let budget = budget.unwrap_or_else(|| {
            FdBudget::size_for(
                crate::limits::soft_fd_limit(),
                crate::limits::open_fd_count(),
            )
        });
        let rec = Arc::new(Recorder::create(path).map_err(|source| WatchError::Open {
            path: path.to_owned(),
            source,
        })?);
        let inotify = init_inotify()?;
        let sys = SysFs::new(inotify.watches());
        let fs = Arc::new(RecordingFs {
            rec: rec.clone(),
            sys,
        });
        let mut w = Self::with_instance(inotify, fs.clone(), budget);
        w.shared.clock = Some(fs);
        rec.line(&format!("budget {budget}"));
        w.trace = Some(rec);
        Ok(w)
    }
}
