//! Tier-1 replays of traces recorded by the tier-2 tests on real overlay mounts (see
//! `trace` for the format, and `FSMON_WATCHER_RECORD` in `tests/tests/watcher_overlay.rs`):
//! [`ReplayFs`] answers every file-system and clock call with the answer recorded for the
//! same call, the raw inotify reads are fed in their order, and each call must return the
//! outputs it returned on the real mount. A call that was never recorded (the state
//! machine took another path) fails the replay, as does any other output.
//!
//! The fixtures (`fixtures/*.trace`) are the races named in the guarantees, as the kernel
//! and overlayfs really ordered them; the `replays!` list below says which race each one
//! holds. To record them again (root): `FSMON_WATCHER_RECORD=DIR cargo test -p fsmon-tests
//! --test watcher_overlay` (also with `FSMON_TEST_FD_BUDGET=8`), then copy the traces
//! wanted (a trace cut after any `end` block still replays). `FSMON_REPLAY_DIR=DIR cargo
//! test -p fsmon traces_in_replay_dir` replays a whole recording.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use super::container::ArmTimes;
use super::fake::raw_event;
use super::fs::{Dir, Fs};
use super::sys::{self, Dirent, Stat};
use super::trace::{answer_key, joined, output_line, Clock};
use super::{ContainerLayer, Watcher};

/// `esc` undone.
fn unesc(token: &str) -> Vec<u8> {
    if token == "~" {
        return Vec::new();
    }
    let b = token.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && b.get(i + 1) == Some(&b'x') {
            let hex = std::str::from_utf8(&b[i + 2..i + 4]).expect("escape");
            out.push(u8::from_str_radix(hex, 16).expect("hex escape"));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn path(token: &str) -> PathBuf {
    use std::os::unix::ffi::OsStringExt;
    PathBuf::from(std::ffi::OsString::from_vec(unesc(token)))
}

fn id(token: &str) -> String {
    String::from_utf8(unesc(token)).expect("container id")
}

fn num<T: std::str::FromStr>(token: Option<&str>) -> T {
    token
        .and_then(|t| t.parse().ok())
        .expect("a number in the trace")
}

/// One input of the state machine.
enum Op {
    Add(String, ContainerLayer, ArmTimes),
    Read(Vec<u8>),
    End(Vec<String>),
    Retry,
    Remove(String),
    SetBudget(usize),
}

struct Trace {
    budget: usize,
    ops: Vec<Op>,
    answers: HashMap<String, VecDeque<String>>,
}

fn parse(text: &str) -> Trace {
    let mut t = Trace {
        budget: 0,
        ops: Vec::new(),
        answers: HashMap::new(),
    };
    let mut lines = text.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some((key, answer)) = line.split_once(" = ") {
            t.answers
                .entry(key.to_owned())
                .or_default()
                .push_back(answer.to_owned());
            continue;
        }
        let mut w = line.split(' ');
        match w.next() {
            Some("budget") => t.budget = num(w.next()),
            Some("setbudget") => t.ops.push(Op::SetBudget(num(w.next()))),
            Some("retry") => t.ops.push(Op::Retry),
            Some("remove") => t.ops.push(Op::Remove(id(w.next().unwrap_or("")))),
            Some("add") => {
                let c = id(w.next().unwrap_or(""));
                let armed_ns = num(w.next());
                let since_ns = w.next().and_then(|s| s.parse().ok());
                let upperdir = path(w.next().unwrap_or(""));
                let lowerdirs = w.map(path).collect();
                let layer = ContainerLayer {
                    upperdir,
                    lowerdirs,
                };
                t.ops
                    .push(Op::Add(c, layer, ArmTimes { armed_ns, since_ns }));
            }
            Some("read") => {
                let n: usize = num(w.next());
                let mut bytes = Vec::new();
                for _ in 0..n {
                    let ev = lines.next().expect("an ev line");
                    let mut f = ev.split(' ').skip(1);
                    let wd = num(f.next());
                    let mask = u32::from_str_radix(f.next().unwrap_or(""), 16).expect("mask");
                    let cookie = num(f.next());
                    let name = unesc(f.next().unwrap_or("~"));
                    bytes.extend(raw_event(wd, mask, cookie, &name));
                }
                t.ops.push(Op::Read(bytes));
            }
            Some("end") => {
                let mut outs = Vec::new();
                while let Some(o) = lines.peek().and_then(|l| l.strip_prefix("out ")) {
                    outs.push(o.to_owned());
                    lines.next();
                }
                t.ops.push(Op::End(outs));
            }
            _ => panic!("unknown trace line: {line}"),
        }
    }
    t
}

#[derive(Default)]
struct Inner {
    answers: HashMap<String, VecDeque<String>>,
    /// The path each handle was opened at, by handle number - 1.
    handles: Vec<Vec<u8>>,
    /// The process-wide number of each replayed read.
    reads: Vec<u32>,
}

/// Answers every call as it was answered when the trace was recorded.
#[derive(Default)]
struct ReplayFs {
    inner: Mutex<Inner>,
}

fn os_err(answer: &str) -> Option<io::Error> {
    let code = answer.strip_prefix("err ")?;
    Some(io::Error::from_raw_os_error(num(Some(code))))
}

impl ReplayFs {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn path_of(inner: &Inner, dir: &Dir) -> Vec<u8> {
        let n = dir.fake_ino().expect("a replayed handle");
        let i = usize::try_from(n).unwrap_or(usize::MAX) - 1;
        inner.handles.get(i).cloned().expect("a known handle")
    }

    /// The recorded answer to `op` on `dir`'s path and `name`.
    fn answer(&self, op: &str, dir: Option<&Dir>, name: &[u8], arg: &str) -> String {
        let mut inner = self.lock();
        let p = dir.map(|d| Self::path_of(&inner, d)).unwrap_or_default();
        let key = answer_key(op, &p, name, arg);
        Self::pop(&mut inner, &key)
    }

    fn pop(inner: &mut Inner, key: &str) -> String {
        inner
            .answers
            .get_mut(key)
            .and_then(VecDeque::pop_front)
            .unwrap_or_else(|| panic!("replay diverged: `{key}` was not recorded (again)"))
    }

    fn open(&self, answer: &str, path: Vec<u8>) -> io::Result<Dir> {
        if let Some(e) = os_err(answer) {
            return Err(e);
        }
        let mut inner = self.lock();
        inner.handles.push(path);
        Ok(Dir::fake(u64::try_from(inner.handles.len()).unwrap_or(0)))
    }

    fn stat(&self, answer: &str) -> io::Result<(Stat, Option<i64>)> {
        if let Some(e) = os_err(answer) {
            return Err(e);
        }
        let mut f = answer.split(' ').skip(1);
        let mut st = Stat {
            dev: num(f.next()),
            ino: num(f.next()),
            mode: num(f.next()),
            nlink: num(f.next()),
            uid: num(f.next()),
            gid: num(f.next()),
            rdev: num(f.next()),
            size: num(f.next()),
            atime_ns: num(f.next()),
            mtime_ns: num(f.next()),
            ctime_ns: num(f.next()),
            read_gen: 0,
        };
        let local: usize = num(f.next());
        st.read_gen = match local {
            0 => 0,
            k => *self
                .lock()
                .reads
                .get(k - 1)
                .expect("a stat after a replayed read"),
        };
        let btime = f.next().and_then(|b| b.parse().ok());
        Ok((st, btime))
    }

    fn xattr<'b>(&self, answer: &str, buf: &'b mut [u8]) -> io::Result<Option<&'b [u8]>> {
        if let Some(e) = os_err(answer) {
            return Err(e);
        }
        let Some(v) = answer.strip_prefix("ok ") else {
            return Ok(None);
        };
        let v = unesc(v);
        let dst = buf
            .get_mut(..v.len())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ERANGE))?;
        dst.copy_from_slice(&v);
        Ok(Some(dst))
    }
}

fn rw(read: bool) -> &'static str {
    if read {
        "r"
    } else {
        "p"
    }
}

impl Clock for ReplayFs {
    fn now_ms(&self, _epoch: Instant) -> u32 {
        num(Some(&Self::pop(&mut self.lock(), "clock")))
    }
}

impl Fs for ReplayFs {
    fn open_host_dir(&self, path: &Path) -> io::Result<Dir> {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_os_str().as_bytes();
        let key = answer_key("host", bytes, b"", "-");
        let answer = Self::pop(&mut self.lock(), &key);
        self.open(&answer, bytes.to_vec())
    }

    fn open_child_dir(&self, dir: &Dir, name: &[u8], read: bool) -> io::Result<Dir> {
        let answer = self.answer("child", Some(dir), name, rw(read));
        let p = joined(Self::path_of(&self.lock(), dir), name);
        self.open(&answer, p)
    }

    fn reopen_dir(&self, dir: &Dir) -> io::Result<Dir> {
        let answer = self.answer("reopen", Some(dir), b"", "-");
        let p = Self::path_of(&self.lock(), dir);
        self.open(&answer, p)
    }

    fn open_dir_beneath(&self, root: &Dir, rel: &[u8], read: bool) -> io::Result<Dir> {
        let answer = self.answer("beneath", Some(root), rel, rw(read));
        let p = joined(Self::path_of(&self.lock(), root), rel);
        self.open(&answer, p)
    }

    fn stat_dir(&self, dir: &Dir) -> io::Result<Stat> {
        self.stat(&self.answer("statdir", Some(dir), b"", "-"))
            .map(|s| s.0)
    }

    fn stat_at(&self, dir: &Dir, name: &[u8]) -> io::Result<Stat> {
        self.stat(&self.answer("stat", Some(dir), name, "-"))
            .map(|s| s.0)
    }

    fn statx_at(&self, dir: &Dir, name: &[u8]) -> io::Result<(Stat, Option<i64>)> {
        self.stat(&self.answer("statx", Some(dir), name, "-"))
    }

    fn xattr_of_dir<'b>(
        &self,
        dir: &Dir,
        names: &[&str],
        buf: &'b mut [u8],
    ) -> io::Result<Option<&'b [u8]>> {
        let answer = self.answer("xattrdir", Some(dir), b"", &names.join(","));
        self.xattr(&answer, buf)
    }

    fn xattr_at<'b>(
        &self,
        dir: &Dir,
        name: &[u8],
        names: &[&str],
        buf: &'b mut [u8],
    ) -> io::Result<Option<&'b [u8]>> {
        let answer = self.answer("xattr", Some(dir), name, &names.join(","));
        self.xattr(&answer, buf)
    }

    fn list_dir(&self, dir: &Dir, _buf: &mut Vec<u8>, out: &mut Vec<Dirent>) -> io::Result<()> {
        let answer = self.answer("list", Some(dir), b"", "-");
        if let Some(e) = os_err(&answer) {
            return Err(e);
        }
        for d in answer.split(' ').skip(1) {
            let mut f = d.splitn(3, ',');
            out.push(Dirent {
                ino: num(f.next()),
                dtype: num(f.next()),
                name: unesc(f.next().unwrap_or("~")).into(),
            });
        }
        Ok(())
    }

    fn add_watch(&self, dir: &Dir, mask: u32) -> io::Result<i32> {
        let answer = self.answer("watch", Some(dir), b"", &format!("{mask:x}"));
        match os_err(&answer) {
            Some(e) => Err(e),
            None => Ok(num(answer.strip_prefix("ok "))),
        }
    }

    fn rm_watch(&self, _wd: i32) {}
}

/// Replays `text` (a trace); panics at the first call whose outputs differ from the
/// recorded ones, or at the first call that was not recorded.
pub(super) fn replay(name: &str, text: &str) {
    let trace = parse(text);
    let fs = Arc::new(ReplayFs::default());
    fs.lock().answers = trace.answers;
    let mut w = Watcher::with_fs(fs.clone(), trace.budget).expect("inotify instance");
    w.shared.clock = Some(fs.clone());
    let mut out = Vec::new();
    let mut ends = 0;
    for op in trace.ops {
        match op {
            Op::Add(id, layer, times) => {
                // An arming the recording saw refused is refused the same way here.
                let _ = w.arm_at(&id, layer, times);
            }
            Op::Read(bytes) => {
                let gen = sys::next_read();
                fs.lock().reads.push(gen);
                let evs: Vec<_> = super::rules::parse_events(&bytes).collect();
                w.handle_read(&evs, gen);
            }
            Op::End(want) => {
                ends += 1;
                out.clear();
                w.end_call(&mut out);
                let got: Vec<String> = out.iter().map(output_line).collect();
                assert_eq!(got, want, "{name}: call {ends} returned other outputs");
            }
            Op::Retry => w.retry_unwatched(),
            Op::Remove(id) => w.remove_container(&id),
            Op::SetBudget(n) => w.set_fd_budget(n),
        }
    }
}

/// One test per fixture: `name: "file", "the race or guarantee it holds"`.
macro_rules! replays {
    ($($test:ident: $file:literal, $what:literal;)*) => {$(
        #[doc = $what]
        #[test]
        fn $test() {
            replay($file, include_str!(concat!("fixtures/", $file)));
        }
    )*};
}

// Recorded by `tests/tests/watcher_overlay.rs` (the test of the same name unless said),
// some cut after the call that holds the race. See the module doc.
replays! {
    rm_r_racing_unread_copy_ups_read_between: "delete_after_copy_up_read_between.trace",
        "`rm -r` of a tree whose copy-up (touch) was read first: each delete once.";
    rm_r_racing_unread_copy_ups_in_one_go: "delete_after_copy_up_in_one_go.trace",
        "`rm -r` racing the unread copy-up of its directories (copied up and whited out \
         before they could be watched): a delete for everything below, deepest first, once.";
    rm_r_after_chmod_or_append: "delete_after_chmod_or_append_is_reported_once.trace",
        "Deletes after a copy-up by chmod or append: once each.";
    exchange_that_empties_a_dir: "copied_up_file_then_its_emptied_dir_are_deleted_once_each.trace",
        "overlayfs' exchange of an empty opaque directory (`ovl_clear_empty`) before an \
         rmdir, and whiteout exchanges: one delete each, re-creates after them.";
    image_deletes_and_recreates: "deletes_of_image_entries_and_recreates.trace",
        "Deletes of image entries (whiteouts), `rm -r` of an image tree, re-creates.";
    move_into_a_new_dir_before_its_watch: "move_into_new_dir_before_its_watch.trace",
        "A file moved into a directory made right before (its listing races the move): \
         one rename, or one create and one delete. First 120 calls of the test.";
    stray_dir_attribs: "stray_dir_attribs_concurrent_mkdir_rm_r.trace",
        "Concurrent mkdir, moves of image files into new directories and `rm -r`: no \
         directory attrib (mtime-only ones withdrawn at the drain), a listed file that \
         then arrives by rename only its old path's delete. First 230 calls of \
         `concurrent_mkdir_and_rm_r_report_no_dir_attrib`.";
    dir_attrib_explained_by_later_entry_changes: "dir_attrib_explained_by_later_entry_changes_is_not_reported.trace",
        "`impure` xattr attribs before a rename: withdrawn; touch and chmod reported.";
    attrib_of_dir_gone_before_its_watch: "attrib_of_dir_gone_before_its_watch.trace",
        "overlayfs' `impure` attrib on a new directory that `rm -r` removed before it could \
         be opened and watched (seen from its parent): no attrib. Reduced from a recording \
         of `concurrent_mkdir_and_rm_r_report_no_dir_attrib` under CPU load (CI failed on it).";
    attrib_of_unindexed_dir_gone: "attrib_of_unindexed_dir_gone.trace",
        "The same `attrib`, of a directory made and removed around its parent's listing \
         (never indexed): no attrib, its delete. Reduced from the same test's failure in a \
         full `cargo xtask test`.";
    dir_xattr_after_entry_changes: "dir_xattr_after_entry_changes_is_not_an_attrib.trace",
        "An xattr set on a directory after entry changes: no attrib.";
    hard_links: "hard_links_are_creates.trace",
        "Hard links are creates (and the directory's mtime attrib is withdrawn).";
    renames_pair_and_paths_follow: "renames_pair_and_paths_follow.trace",
        "Renames pair by cookie, paths below a renamed directory follow.";
    copy_up_is_not_a_create: "copy_up_of_image_files_is_not_a_create.trace",
        "Copy-ups of image files and directories are attribs/modifies, not creates.";
    image_layers_whiteouts_and_opaque_dirs: "image_layers_whiteouts_and_opaque_dirs_are_honoured.trace",
        "Whiteouts and opaque directories of the image layers.";
    hostile_names: "hostile_names_are_reported_byte_exact.trace",
        "Names with newlines, invalid UTF-8 and the like, byte-exact.";
    modify_coalesced: "modify_is_coalesced_per_write_burst.trace",
        "One modify per write burst.";
    armed_late: "armed_late_reports_what_the_container_did_since_it_started.trace",
        "Late arming reports what the container did since it started.";
    armed_late_after_a_restart: "armed_late_after_a_restart_reports_only_what_changed_since.trace",
        "Late arming after a restart reports only what changed since.";
    arming_indexes_existing_content: "arming_indexes_existing_content_without_reporting_it.trace",
        "Arming indexes what is there without reporting it.";
    removed_container: "removed_container_reports_nothing_more.trace",
        "A removed container reports nothing more.";
    watch_limit_retry: "watch_limit_retry_watches_and_rescans_what_was_unwatched.trace",
        "Watch limit: indexed without a watch, retried, rescanned.";
}

#[cfg(test)]
mod tests {
    use std::os::fd::AsFd;
    use std::time::Duration;

    use super::*;

    /// Reads until the watcher has been quiet for 50 ms.
    fn drain(w: &mut Watcher, out: &mut Vec<crate::event::WatchOutput>) {
        loop {
            w.read_events(out).expect("read");
            if !sys::poll_readable(w.shared.inotify.as_fd(), 50) {
                w.read_events(out).expect("read");
                return;
            }
        }
    }

    /// Replays every `*.trace` in `$FSMON_REPLAY_DIR` (a recording of tier 2, see the module
    /// doc), each on its own; does nothing without it. Lists every trace that fails.
    #[test]
    fn traces_in_replay_dir() {
        let Ok(dir) = std::env::var("FSMON_REPLAY_DIR") else {
            return;
        };
        let mut failed = Vec::new();
        let mut n = 0;
        let mut paths: Vec<_> = std::fs::read_dir(&dir)
            .expect("FSMON_REPLAY_DIR")
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.extension().is_some_and(|e| e == "trace"))
            .collect();
        paths.sort();
        for p in paths {
            let text = std::fs::read_to_string(&p).expect("trace");
            let name = p.display().to_string();
            n += 1;
            if let Err(e) = std::panic::catch_unwind(|| replay(&name, &text)) {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| (*s).to_owned()))
                    .unwrap_or_default();
                let first = msg.lines().next().unwrap_or_default().to_owned();
                failed.push(format!("{name}: {first}"));
            }
        }
        assert!(
            failed.is_empty(),
            "{} of {n} traces failed:\n{}",
            failed.len(),
            failed.join("\n")
        );
    }

    #[test]
    fn a_recording_on_a_plain_directory_replays_to_the_same_outputs() {
        let t = tempfile::tempdir().expect("temp dir");
        let upper = t.path().join("upper");
        std::fs::create_dir_all(upper.join("old")).expect("mkdir");
        let trace = t.path().join("t.trace");
        let mut w = Watcher::recording(Some(16), &trace).expect("recording");
        let layer = ContainerLayer {
            upperdir: upper.clone(),
            lowerdirs: Vec::new(),
        };
        w.add_container("c", layer).expect("armed");
        let mut out = Vec::new();
        drain(&mut w, &mut out);
        std::fs::create_dir_all(upper.join("a/b")).expect("mkdir");
        std::fs::write(upper.join("a/b/f"), "x").expect("write");
        std::fs::rename(upper.join("old"), upper.join("a/new")).expect("mv");
        std::fs::write(upper.join("a/new/g"), "x").expect("write");
        std::thread::sleep(Duration::from_millis(5));
        drain(&mut w, &mut out);
        std::fs::remove_dir_all(upper.join("a")).expect("rm -r");
        drain(&mut w, &mut out);
        drop(w);
        let text = std::fs::read_to_string(&trace).expect("trace");
        assert!(text.contains("out c create /a dir"), "{text}");
        replay("plain", &text);
        // A changed answer is a divergence.
        let tampered = text.replacen("out c create /a dir", "out c create /b dir", 1);
        let r = std::panic::catch_unwind(|| replay("tampered", &tampered));
        assert!(r.is_err(), "a changed output must fail the replay");
    }
}
