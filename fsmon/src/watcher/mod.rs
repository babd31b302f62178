//! The recursive, race-free watcher of container upperdirs: the only module that touches
//! inotify.
//!
//! Kernel features: inotify(7) (`inotify_init1` 2.6.27, `IN_EXCL_UNLINK` 2.6.36),
//! openat2(2) with `RESOLVE_*` (5.6), overlayfs upper layers (3.18), procfs. Developed and
//! tested on 6.18.
//!
//! One inotify instance serves every container; each watched directory is a node of its
//! container's tree, and `wd → (container, node)` routes events. What the raw events mean
//! to the container is decided by [`crate::overlay`].
//!
//! # Where things are
//! * This file: the [`Watcher`], the read loop, routing by watch descriptor, the fd budget
//!   across containers, exits seen through `cgroup.events`.
//! * `container`: one container's state and the dispatch of each event to a handler.
//! * `tree`: the slab of directory nodes and the generational `NodeRef` into it; attach
//!   (watch first, list after), adopt, reparent, displace, remove a subtree.
//! * `index`: what each directory holds (`Entry`), and the index's view of a name.
//! * `scan`: listings (index at arm time, report a new directory, diff after lost events,
//!   rewatch), with the pure comparison of a listing with the index.
//! * `appear`: an entry appearing (created, moved in, listed), decided by
//!   [`crate::overlay::appear`].
//! * `moves`: rename pairing, overlayfs' exchanges (pure decisions), in-flight directories.
//! * `outbox`: output slots (withdraw, rewrite), directory `attrib`s waiting for the drain.
//! * `lower`: image-layer lookups; `cache`/`fds`: directory fds and their budget.
//! * `fs`: the `Fs` trait, every file-system call of the state machine (`SysFs`: by `sys`).
//! * Tests: `fake` (an in-memory upperdir behind `Fs`) and `races` (the races above as
//!   fixed event sequences on it, no root needed); `trace` records a watcher's inputs and
//!   the file system's answers on real overlay mounts (tier 2, `FSMON_WATCHER_RECORD`) and
//!   `replay` runs them again without root (`fixtures/`: the races above as the kernel
//!   really ordered them, each output checked).
//! * `shared`: what all containers share; `rules`: pure helpers; `sys`: the syscalls that
//!   no crate makes the watcher's way (the inotify instance, watches and event parsing are
//!   the `inotify` crate's).
//!
//! # Guarantees
//! * **Race-free recursion.** A directory that appears (created, moved in, copied up, found
//!   in a listing) is watched first and then listed; what the listing finds is reported as
//!   `create` with `source: scan`. An index of what each directory holds (name → inode)
//!   makes each object reported once even when its event and the listing race.
//! * **Nothing outside the upperdir.** Directories are opened relative to their parent's fd,
//!   one component at a time, with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`,
//!   and the watch is added through `/proc/self/fd/N` of the fd that was opened: a symlink
//!   swapped in between an event and its handling can redirect neither. Symlinks are
//!   reported as entries and never followed. Image layers are opened the same way.
//! * **Renames.** `IN_MOVED_FROM`/`IN_MOVED_TO` pairs (by cookie, else by the inode of a
//!   watched directory) become one `rename` with `old_path`; paths of everything below a
//!   renamed directory follow. An `IN_MOVED_FROM` whose partner has not come when the queue
//!   is empty gets up to 1 ms more (the kernel queues the two halves back to back); then it
//!   is a `delete`. An `IN_MOVED_TO` without partner is an appearance (`create`, copy-up...).
//!   Events from inside a directory between its `IN_MOVED_FROM` and its partner are renamed
//!   with it, or dropped if it left the upperdir (they happened outside the container).
//! * **Late handling.** Events are handled after the fact, so a `stat` may show a later
//!   object than the event's: when a later event of the same read changes the same name, or
//!   the object's type contradicts the event, the entry's kind is inferred from the index and
//!   overlayfs' rules instead ([`crate::overlay::infer_kind`]). A directory moved in over a
//!   whiteout that a listing found is a re-create only if the whiteout leaves in the same
//!   exchange (the next event): the listing may have seen where the events still queued
//!   lead (a copy-up, then the `rm -r` of it). A directory that overlayfs copied up and
//!   whited out before it could be watched (`rm -r` of an image directory) yields a
//!   `delete` for everything the container saw below it, deepest first.
//! * **`modify` coalescing.** One `modify` per file per write burst: the first `IN_MODIFY`
//!   is reported, later ones are not until `IN_CLOSE_WRITE`, a delete or a rename of the
//!   file ends the burst, or until 1 s has passed (a file that is never closed, such as a
//!   log, is reported again about once a second). A `create` may be followed by one `modify`.
//! * **No silent loss.** A queue overflow yields `Overflow { container: None, reason:
//!   "queue" }` and a resync of every container against its index (new → `create`, gone →
//!   `delete`, changed size/mtime → `modify`, changed ctime → `attrib`; all `source: scan`).
//!   A directory that cannot be watched (`ENOSPC`: `fs.inotify.max_user_watches`) is still
//!   listed and indexed, and yields `Overflow { container: Some(id), reason: "watch_limit" }`
//!   (once per container per call). [`Watcher::retry_unwatched`] (and the next resync)
//!   retries its watch; once it is watched, it is rescanned against the index, so what
//!   changed in it while unwatched is reported (`source: scan`, as after an overflow). A
//!   retry refused again is quiet: the first overflow already said so.
//! * **Directory `attrib`.** An `IN_ATTRIB` on a directory is reported only when the
//!   container could see a change ([`crate::overlay::dir_attrib`]): mode or owner at once;
//!   an mtime-only change is placed in the output where its event came and decided when
//!   the queue is drained (a drain that ends with one unexplained waits up to 20 ms for
//!   more events): withdrawn if an entry of that directory was created, removed or renamed
//!   after it (that change moved the mtime before the `stat`), kept otherwise (a `touch`).
//!   So a `touch` of a directory followed, within one drain, by an entry change in it is
//!   not reported (nor is one after entry changes since the directory's last `IN_ATTRIB`:
//!   its baseline mtime is stale then). The baseline is taken after the directory's watch
//!   is added; a directory gone before it could be watched has no `attrib` (its delete is
//!   reported).
//! * **Late arming.** [`Watcher::add_container_since`] reports what a container did before
//!   its watches (created since its start by birth time, changed since by mtime/ctime), as
//!   the listing finds it (`source: scan`).
//!
//! The daemon must call [`Watcher::read_events`] after [`Watcher::add_container`] and after
//! [`Watcher::retry_unwatched`] too: it returns outputs queued by them (a `watch_limit`
//! overflow, what a rescan found) even when the inotify fd is not readable.

mod appear;
mod cache;
mod container;
#[cfg(test)]
mod fake;
mod fds;
mod fs;
mod index;
mod lower;
mod moves;
mod outbox;
#[cfg(test)]
mod races;
#[cfg(test)]
mod replay;
mod rules;
mod scan;
mod shared;
mod sys;
mod trace;
mod tree;

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::event::WatchOutput;

use container::{ArmTimes, Container};
pub use fds::FdBudget;
use fds::SharedBudget;
use fs::{SharedFs, SysFs};
use shared::{NextEvent, Shared, MASK};

/// Size of the buffer inotify events are read into.
const READ_BUF: usize = 64 * 1024;

/// How long to wait for the second half of a rename when the queue ran dry between them.
const MOVE_PARTNER_WAIT_MS: u64 = 1;

/// How long to wait, at most, for the entry event that would explain a directory's
/// mtime-only `attrib` ([`crate::overlay::DirAttrib::MtimeOnly`]). The `stat` taken at the
/// `IN_ATTRIB` can already show the mtime of a rename whose events the kernel queues only
/// at the end of the syscall; a writer preempted there on a busy host leaves them out of
/// the queue for a scheduler slice or more (1 ms leaked overlayfs' own `attrib`s in CI).
/// Only a drain that ends with such an `attrib` unexplained waits.
const MTIME_EXPLAIN_WAIT_MS: u64 = 20;

/// How long to wait, at most, for the modify of a container's `cgroup.events` that an
/// exit read at an earlier modify implies, when outputs came after that earlier modify.
/// The kernel rate-limits those notifications (one per 10 ms per file, the rest deferred
/// to a timer), so the exit's own modify can trail the file's content by more than 10 ms
/// on a loaded host: a 10 ms wait lost a container's paths under CPU load (tier-3 stall
/// test). Other events arriving meanwhile do not end the wait; only the exit's modify
/// (which moves the exit after them) or the deadline does.
const EXIT_MODIFY_WAIT_MS: u64 = 100;

/// Margin for coarse file-system timestamps when deciding whether a file changed after
/// monitoring began (see [`rules::rescan_change`]), or after a late-armed container
/// started (see [`Watcher::add_container_since`]).
const ARM_CLOCK_MARGIN_NS: i64 = 10_000_000;

/// Cached directory fds made free, when the budget is full, before an event is handled
/// (it may reopen a chain of directories, and image layers).
const EVENT_FD_ROOM: usize = 16;

/// A container's overlay layers, as the engine gives them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerLayer {
    /// The writable layer: the only directory watched.
    pub upperdir: PathBuf,
    /// The image layers, top-most first (overlay's `lowerdir=` order, Docker's
    /// `GraphDriver.Data.LowerDir`). Read only to tell copy-ups and whiteouts apart.
    pub lowerdirs: Vec<PathBuf>,
}

/// What [`Watcher::add_container`] found and armed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ArmStats {
    /// Directories indexed (the upperdir included).
    pub dirs: usize,
    /// Non-directories indexed (files, symlinks, devices), whiteouts excluded.
    pub files: usize,
    /// Whiteouts indexed (image entries the container deleted before this start).
    pub whiteouts: usize,
    /// Directories indexed without a watch (watch limit reached).
    pub unwatched_dirs: usize,
}

/// Errors of the watcher. Messages say what to do about them.
#[derive(thiserror::Error, Debug)]
pub enum WatchError {
    /// `inotify_init1` failed with `EMFILE`.
    #[error("cannot create an inotify instance: too many instances; raise fs.inotify.max_user_instances")]
    TooManyInstances {
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `inotify_init1` failed otherwise.
    #[error("cannot create an inotify instance")]
    Init {
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// An upperdir or image layer cannot be opened.
    #[error("cannot open {}", path.display())]
    Open {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// `ENOSPC` from `inotify_add_watch` on the upperdir itself.
    #[error("cannot watch {}: inotify watch limit reached; raise fs.inotify.max_user_watches", path.display())]
    WatchLimit {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Another failure of `inotify_add_watch` on the upperdir (`EEXIST`: it is already
    /// watched, under another container id).
    #[error("cannot watch {}", path.display())]
    Watch {
        /// The directory.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// The watcher: one inotify instance for the whole daemon.
pub struct Watcher {
    shared: Shared,
    /// The layers' file system (see `fs`).
    fs: SharedFs,
    /// Directory fds all containers may cache together (see `fds`).
    budget: SharedBudget,
    /// Where the next budget enforcement starts, so no container is always shed first.
    shed_cursor: usize,
    containers: Vec<Option<Container>>,
    free_keys: Vec<usize>,
    by_id: HashMap<String, usize>,
    buf: Vec<u8>,
    /// Watches on containers' `cgroup.events` files, by wd. In the same inotify instance as
    /// the layers' watches, so a container's exit is ordered with its file events.
    exits: HashMap<i32, ExitWatch>,
    /// Where the inputs and outputs are recorded, in the tier-2 harness's recording mode.
    trace: Option<Arc<trace::Recorder>>,
}

/// A watch on one container's cgroup v2 `cgroup.events`. The file is opened for each read
/// (rarely: its populated state or freeze changed), not held.
struct ExitWatch {
    id: String,
    /// The watch, as the `inotify` crate removes it.
    handle: inotify::WatchDescriptor,
    path: PathBuf,
    /// Whether a process was ever seen in the cgroup. The cgroup can be empty at arm time
    /// (init not joined yet) and its freeze/thaw also modify `cgroup.events`, so only a
    /// change from populated to empty is an exit.
    seen_populated: bool,
    /// Where in `Shared::out` this drain put the container's exit. A modify only says that
    /// the file changed, and its content is read when fsmon gets to the modify: a stalled
    /// fsmon reads `populated 0` already at an earlier modify (its own thaw, init joining),
    /// which precedes the container's file events in the queue. The exit is the last
    /// modify, so each later modify moves the exit there.
    out_at: Option<usize>,
}

impl ExitWatch {
    /// Reads `cgroup.events`; returns true when this read shows the exit.
    fn exited_now(&mut self) -> bool {
        let text = match std::fs::read_to_string(&self.path) {
            Ok(t) => t,
            // The cgroup is gone, and a cgroup is removed only once no process is left in
            // it: this read (late, at a modify the exit or an earlier change queued) shows
            // the exit.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return true,
            // Any other failed read (no descriptor left) says nothing: the cgroup's rmdir
            // record ends monitoring then.
            Err(_) => String::new(),
        };
        if text.lines().any(|l| l.trim() == "populated 1") {
            self.seen_populated = true;
            false
        } else {
            self.seen_populated && unpopulated(&text)
        }
    }
}

/// A new inotify instance (non-blocking, close-on-exec).
fn init_inotify() -> Result<inotify::Inotify, WatchError> {
    inotify::Inotify::init().map_err(|source| match source.raw_os_error() {
        Some(libc::EMFILE) => WatchError::TooManyInstances { source },
        _ => WatchError::Init { source },
    })
}

/// Nanoseconds since the epoch (0 before it, or past what an i64 holds).
fn epoch_ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .ok()
        .and_then(|d| i64::try_from(d.as_nanos()).ok())
        .unwrap_or(0)
}

/// Whether a `cgroup.events` text says the cgroup has no process left.
fn unpopulated(events: &str) -> bool {
    events.lines().any(|l| l.trim() == "populated 0")
}

impl Watcher {
    /// Creates the inotify instance (non-blocking, close-on-exec), with a directory-fd
    /// budget of everything `RLIMIT_NOFILE` leaves beyond what is open now and a reserve
    /// ([`Watcher::fd_budget`]).
    pub fn new() -> Result<Self, WatchError> {
        let budget = FdBudget::size_for(
            crate::limits::soft_fd_limit(),
            crate::limits::open_fd_count(),
        );
        Self::with_fd_budget(budget)
    }

    /// Like [`Watcher::new`], with a budget of `budget` cached directory fds.
    pub fn with_fd_budget(budget: usize) -> Result<Self, WatchError> {
        let inotify = init_inotify()?;
        let fs = Arc::new(SysFs::new(inotify.watches()));
        Ok(Self::with_instance(inotify, fs, budget))
    }

    /// Tests: a watcher whose containers' layers are on `fs` (an in-memory one, a replay).
    #[cfg(test)]
    fn with_fs(fs: SharedFs, budget: usize) -> Result<Self, WatchError> {
        Ok(Self::with_instance(init_inotify()?, fs, budget))
    }

    /// A watcher reading `inotify`, whose containers' layers are on `fs`.
    fn with_instance(inotify: inotify::Inotify, fs: SharedFs, budget: usize) -> Self {
        Watcher {
            shared: Shared::new(inotify),
            fs,
            budget: FdBudget::new(budget),
            shed_cursor: 0,
            containers: Vec::new(),
            free_keys: Vec::new(),
            by_id: HashMap::new(),
            buf: vec![0; READ_BUF],
            exits: HashMap::new(),
            trace: None,
        }
    }

    /// The inotify fd, to poll for readability (it stays owned by the watcher).
    pub fn as_raw_fd(&self) -> RawFd {
        self.shared.inotify.as_raw_fd()
    }

    /// Arms a container: watches its upperdir recursively (each directory watched first,
    /// then listed). What is already there predates monitoring: it is indexed, not
    /// reported. On watch-limit exhaustion below the upperdir, it arms what it can and
    /// queues an `Overflow { reason: "watch_limit" }` for this container (returned by the
    /// next [`Watcher::read_events`]). Arming an id that is already armed re-arms it.
    pub fn add_container(
        &mut self,
        id: &str,
        layer: ContainerLayer,
    ) -> Result<ArmStats, WatchError> {
        self.arm_container(id, layer, None)
    }

    /// Like [`Watcher::add_container`], but whatever in the layer was created or changed at
    /// or after `since` (the instant the container's cgroup appeared) is reported with
    /// [`Source::Scan`](crate::event::Source::Scan), as the change the container made: for a
    /// container armed late, whose first changes came before its watches.
    ///
    /// * An entry born at or after `since` (statx(2) birth time) is reported as an inotify
    ///   event for it would be: `create` for a new entry, `modify`/`attrib` for a copy-up
    ///   (compared with the image's copy), `delete` for a whiteout of an image entry. A new
    ///   directory is watched and everything in it reported likewise.
    /// * An older entry is indexed as by `add_container`; a regular file whose mtime or
    ///   ctime is at or after `since` is reported as `modify` (data) or `attrib`; an older
    ///   directory is descended into, its entries decided the same way (a directory that
    ///   only got new entries is not reported itself).
    /// * Where the file system keeps no birth time (or statx(2) is missing, before 4.11), a
    ///   non-directory whose ctime is at or after `since` counts as born since, and a
    ///   directory never does (its new entries are still reported).
    ///
    /// `since` is taken 10 ms earlier for coarse file-system timestamps. What the container
    /// removed of its own earlier files before the watches leaves no trace and is not
    /// reported; an image file deleted in an earlier run and re-created before the watches
    /// looks like a copy-up (`modify`), not a `create`. Costs one statx(2) per entry more
    /// than `add_container`. The returned [`ArmStats`] count everything indexed, reported
    /// entries included.
    pub fn add_container_since(
        &mut self,
        id: &str,
        layer: ContainerLayer,
        since: SystemTime,
    ) -> Result<ArmStats, WatchError> {
        self.arm_container(id, layer, Some(since))
    }

    fn arm_container(
        &mut self,
        id: &str,
        layer: ContainerLayer,
        since: Option<SystemTime>,
    ) -> Result<ArmStats, WatchError> {
        if self.by_id.contains_key(id) {
            self.remove_container(id);
        }
        let armed_ns = epoch_ns(SystemTime::now()) - ARM_CLOCK_MARGIN_NS;
        let since_ns = since.map(|t| epoch_ns(t).saturating_sub(ARM_CLOCK_MARGIN_NS));
        self.arm_at(id, layer, ArmTimes { armed_ns, since_ns })
    }

    /// [`Watcher::arm_container`] at the instants `times`.
    fn arm_at(
        &mut self,
        id: &str,
        layer: ContainerLayer,
        times: ArmTimes,
    ) -> Result<ArmStats, WatchError> {
        if let Some(t) = &self.trace {
            t.line(&trace::add_line(id, &layer, times));
        }
        let upper = &layer.upperdir;
        let open_err = |path: &PathBuf| {
            let path = path.clone();
            move |source| WatchError::Open { path, source }
        };
        // Room for the upperdir and the image layers, taken from other containers' caches.
        self.enforce_budget(layer.lowerdirs.len() + 1);
        let root_fd = self.fs.open_host_dir(upper).map_err(open_err(upper))?;
        let root_st = self.fs.stat_dir(&root_fd).map_err(open_err(upper))?;
        let lowers = layer
            .lowerdirs
            .iter()
            .map(|p| self.fs.open_host_dir(p).map_err(open_err(p)))
            .collect::<Result<Vec<_>, _>>()?;
        for _ in 0..=lowers.len() {
            self.budget.opened();
        }
        // IN_MASK_CREATE (4.18): fail rather than share a watch with another container id.
        let wd = (self.fs)
            .add_watch(&root_fd, MASK | libc::IN_MASK_CREATE)
            .or_else(|e| match e.raw_os_error() {
                Some(libc::EINVAL) => self.fs.add_watch(&root_fd, MASK),
                _ => Err(e),
            })
            .map_err(|source| match source.raw_os_error() {
                Some(libc::ENOSPC) => WatchError::WatchLimit {
                    path: upper.clone(),
                    source,
                },
                _ => WatchError::Watch {
                    path: upper.clone(),
                    source,
                },
            });
        let wd = match wd {
            Ok(wd) => wd,
            Err(e) => {
                self.budget.closed(lowers.len() + 1);
                return Err(e);
            }
        };
        let key = self.free_keys.pop().unwrap_or(self.containers.len());
        let mut c = Container::new(
            key,
            id,
            layer.clone(),
            lowers,
            self.fs.clone(),
            self.budget.clone(),
            times,
        );
        c.arm(&mut self.shared, wd, &root_st, root_fd);
        let stats = c.stats;
        tracing::debug!(container_id = %id, upperdir = %upper.display(), ?stats, "armed");
        if key == self.containers.len() {
            self.containers.push(Some(c));
        } else if let Some(slot) = self.containers.get_mut(key) {
            *slot = Some(c);
        }
        self.by_id.insert(id.to_owned(), key);
        if let Some(c) = self.containers.get_mut(key).and_then(Option::as_mut) {
            c.finish(&mut self.shared);
        }
        self.enforce_budget(0);
        Ok(stats)
    }

    /// The fd budget: (cached directory fds now, the most allowed).
    pub fn fd_budget(&self) -> (usize, usize) {
        (self.budget.open(), self.budget.limit())
    }

    /// Sets the most directory fds all containers may cache together (the process limit
    /// changed, or descriptors ran out below the budget), shedding at once what is over.
    pub fn set_fd_budget(&mut self, limit: usize) {
        if let Some(t) = &self.trace {
            t.line(&format!("setbudget {limit}"));
        }
        self.budget.set_limit(limit);
        self.enforce_budget(0);
    }

    /// Closes cached fds across containers, from a rotating start, until the caches hold
    /// at most the budget minus `room` (and a sixteenth, so that this is not needed at
    /// every call). Cheap when under.
    fn enforce_budget(&mut self, room: usize) {
        let limit = self.budget.limit();
        if self.budget.open() + room <= limit {
            return;
        }
        let target = limit.saturating_sub(room).saturating_sub(limit / 16);
        let n = self.containers.len();
        for i in 0..n {
            if self.budget.open() <= target {
                break;
            }
            let key = (self.shed_cursor + i) % n;
            if let Some(c) = self.containers.get_mut(key).and_then(Option::as_mut) {
                c.shed(target);
            }
        }
        self.shed_cursor = self.shed_cursor.wrapping_add(1);
    }

    /// Whether an open failed for lack of descriptors since the last call (and clears it).
    pub fn take_fd_exhaustion(&mut self) -> bool {
        let mut any = false;
        for c in self.containers.iter_mut().flatten() {
            any |= c.take_fd_exhaustion();
        }
        any
    }

    /// Reports the container's exit in order with its file events: watches `cgroup.events`
    /// in `cgroup_dir` (a cgroup v2 directory: a host path fsmon chose, not container
    /// content) and emits [`WatchOutput::Exited`] when it says `populated 0`.
    pub fn watch_exit(&mut self, id: &str, cgroup_dir: &Path) -> io::Result<()> {
        let path = cgroup_dir.join("cgroup.events");
        let file = std::fs::File::open(&path)?;
        let handle = (self.shared.inotify.watches())
            .add(sys::proc_fd_link(file.as_fd()), inotify::WatchMask::MODIFY)?;
        drop(file);
        let wd = handle.get_watch_descriptor_id();
        let mut exit = ExitWatch {
            id: id.to_owned(),
            handle,
            path,
            seen_populated: false,
            out_at: None,
        };
        // Watch first, then read: a change after this read is an event.
        let _ = exit.exited_now();
        self.exits.insert(wd, exit);
        Ok(())
    }

    /// Stops watching a container: removes its watches and forgets it. Nothing more is
    /// reported for it, including outputs not yet returned by `read_events`; its late
    /// events and `IN_IGNORED`s are dropped.
    pub fn remove_container(&mut self, id: &str) {
        if let Some(t) = &self.trace {
            t.line(&format!("remove {}", trace::esc(id.as_bytes())));
        }
        let exit_wds: Vec<i32> = self
            .exits
            .iter()
            .filter(|(_, e)| e.id == id)
            .map(|(wd, _)| *wd)
            .collect();
        for wd in exit_wds {
            if let Some(exit) = self.exits.remove(&wd) {
                // An error (the kernel already dropped it) is of no interest.
                let _ = self.shared.inotify.watches().remove(exit.handle);
            }
        }
        let Some(key) = self.by_id.remove(id) else {
            return;
        };
        let Some(c) = self.containers.get_mut(key).and_then(Option::take) else {
            return;
        };
        for (wd, node) in c.wds() {
            if self
                .shared
                .wds
                .get(&wd)
                .is_some_and(|o| o.container == key && o.node == node)
            {
                self.shared.wds.remove(&wd);
                self.fs.rm_watch(wd);
            }
        }
        self.shared.out.retain(|o| match o {
            Some(WatchOutput::File(f)) => f.container != id,
            Some(WatchOutput::Overflow {
                container: Some(c), ..
            }) => c != id,
            _ => true,
        });
        self.free_keys.push(key);
    }

    /// Drains every pending inotify event without blocking and appends the translated
    /// outputs, in order, to `out` (after whatever `add_container` queued).
    pub fn read_events(&mut self, out: &mut Vec<WatchOutput>) -> io::Result<()> {
        let mut buf = std::mem::take(&mut self.buf);
        let result = self.read_loop(&mut buf);
        self.buf = buf;
        self.end_call(out);
        result
    }

    /// The end of a call that handled events: what waited for later events is settled,
    /// deferred listings done, the budget enforced, the outputs handed over.
    fn end_call(&mut self, out: &mut Vec<WatchOutput>) {
        for c in self.containers.iter_mut().flatten() {
            if c.unfinished() {
                c.finish(&mut self.shared);
            }
        }
        self.enforce_budget(0);
        let from = out.len();
        out.extend(self.shared.out.drain(..).flatten());
        for e in self.exits.values_mut() {
            e.out_at = None;
        }
        if let Some(t) = &self.trace {
            t.end(out.get(from..).unwrap_or_default());
        }
    }

    /// Retries the watches that the watch limit refused (call it periodically: it costs
    /// nothing when every directory is watched). Each directory that gets its watch is
    /// listed and compared with the index: what changed in it while it was unwatched is
    /// queued as `create`/`delete`/`modify`/`attrib` with `source: scan`, returned by the next
    /// [`Watcher::read_events`] (call it right after; those outputs come before the events
    /// still in the queue). Directories are reopened the same safe way as always
    /// (`RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`, watched through `/proc/self/fd`), checked to
    /// be the directory indexed. A watch still refused is retried at the next call, without
    /// a new `watch_limit` overflow.
    pub fn retry_unwatched(&mut self) {
        if let Some(t) = &self.trace {
            t.line("retry");
        }
        for c in self.containers.iter_mut().flatten() {
            if c.has_unwatched() {
                c.retry_unwatched(&mut self.shared);
                c.finish(&mut self.shared);
            }
        }
        self.enforce_budget(0);
    }

    /// Number of watches held, all containers together.
    pub fn watch_count(&self) -> usize {
        self.shared.wds.len()
    }

    /// Number of watches held for one container (0 if unknown).
    pub fn container_watch_count(&self, id: &str) -> usize {
        self.by_id
            .get(id)
            .and_then(|&k| self.containers.get(k))
            .and_then(Option::as_ref)
            .map_or(0, Container::watch_count)
    }

    fn read_loop(&mut self, buf: &mut [u8]) -> io::Result<()> {
        let mut started = None;
        loop {
            match self.shared.inotify.read_events(buf) {
                Ok(events) => {
                    let evs: Vec<_> = events
                        .map(|e| rules::RawEvent {
                            wd: e.wd.get_watch_descriptor_id(),
                            mask: e.mask.bits(),
                            cookie: e.cookie,
                            name: e.name.map_or(&[][..], OsStrExt::as_bytes),
                        })
                        .collect();
                    // Read again until EAGAIN, even after a short read: what came while
                    // this read was handled belongs to the same drain (an exit read early
                    // at a modify moves to the container's last events only within one
                    // drain; ending it at a short read lost a container's last paths).
                    self.handle_read(&evs, sys::next_read());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if !self.wait_for_more(&mut started) {
                        return Ok(());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// The queue is empty: whether to read again, after waiting a few ms for an event
    /// that is on its way — a move's partner, the entry change that explains a
    /// directory's mtime, or the modify that an exit read early belongs after. `started`:
    /// set at the first wait of the call, so the waits of one call add up to the longest
    /// bound of the reasons still waiting.
    fn wait_for_more(&mut self, started: &mut Option<std::time::Instant>) -> bool {
        let waiting = self
            .containers
            .iter()
            .flatten()
            .filter_map(Container::waiting)
            .max();
        // An exit read at a modify that outputs of its container followed: its own modify
        // may still be on its way; wait for it, so that the exit moves there.
        let out = &self.shared.out;
        let exit_early = self.exits.values().any(|e| {
            e.out_at.is_some_and(|i| {
                out.iter()
                    .skip(i + 1)
                    .flatten()
                    .any(|o| o.container().is_some_and(|c| c.as_str() == e.id))
            })
        });
        let Some(bound_ms) = waiting.max(exit_early.then_some(EXIT_MODIFY_WAIT_MS)) else {
            return false;
        };
        let now = std::time::Instant::now();
        let until = *started.get_or_insert(now) + std::time::Duration::from_millis(bound_ms);
        let left = until.saturating_duration_since(now);
        if left.is_zero() {
            return false;
        }
        let ms = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
        sys::poll_readable(self.shared.inotify.as_fd(), ms)
    }

    /// Handles the events `evs` of one read of the inotify fd, in order; `read_gen` is the
    /// read's number ([`sys::next_read`]).
    fn handle_read(&mut self, evs: &[rules::RawEvent<'_>], read_gen: u32) {
        self.shared.read_gen = read_gen;
        if let Some(t) = &self.trace {
            t.read(read_gen, evs);
        }
        let last = rules::last_name_changes(evs);
        for (i, ev) in evs.iter().enumerate() {
            let stale = last.get(&(ev.wd, ev.name)).is_some_and(|&j| j > i);
            self.shared.next = match evs.get(i + 1) {
                None => NextEvent::Unknown,
                Some(next)
                    if next.wd == ev.wd
                        && next.name == ev.name
                        && next.mask & libc::IN_MOVED_FROM != 0 =>
                {
                    NextEvent::MovedFromSameName {
                        is_dir: next.mask & libc::IN_ISDIR != 0,
                    }
                }
                Some(_) => NextEvent::Other,
            };
            self.dispatch(ev, stale);
        }
        self.shared.next = NextEvent::Unknown;
    }

    /// Tests: handles `bytes` as one read of the inotify fd and ends the call as
    /// [`Watcher::read_events`] does (what the real inotify fd holds is not read).
    #[cfg(test)]
    fn feed(&mut self, bytes: &[u8], out: &mut Vec<WatchOutput>) {
        let evs: Vec<_> = rules::parse_events(bytes).collect();
        self.handle_read(&evs, sys::next_read());
        self.end_call(out);
    }

    fn dispatch(&mut self, ev: &rules::RawEvent<'_>, stale: bool) {
        if ev.mask & libc::IN_Q_OVERFLOW != 0 {
            self.queue_overflow();
            return;
        }
        if let Some(exit) = self.exits.get_mut(&ev.wd) {
            if ev.mask & libc::IN_IGNORED != 0 {
                self.exits.remove(&ev.wd);
            } else if ev.mask & libc::IN_MODIFY != 0 && exit.exited_now() {
                let container = exit.id.clone();
                // Read at an earlier modify of this drain: the exit is this later one.
                if let Some(slot) = exit.out_at.take().and_then(|i| self.shared.out.get_mut(i)) {
                    *slot = None;
                }
                // Pending rename halves of this container are its own: settle them
                // before the exit, so they are not lost with the container.
                if let Some(c) = self
                    .by_id
                    .get(&container)
                    .and_then(|&k| self.containers.get_mut(k))
                    .and_then(Option::as_mut)
                {
                    c.finish(&mut self.shared);
                }
                self.shared
                    .out
                    .push(Some(WatchOutput::Exited { container }));
                let at = self.shared.out.len() - 1;
                if let Some(exit) = self.exits.get_mut(&ev.wd) {
                    exit.out_at = Some(at);
                }
            }
            return;
        }
        if ev.mask & libc::IN_IGNORED != 0 {
            // The kernel dropped the watch (its directory is gone, or it was removed).
            self.fs.forget_watch(ev.wd);
        }
        let Some(owner) = self.shared.wds.get(&ev.wd).copied() else {
            return;
        };
        if self.budget.full() {
            // Room for this event's opens, taken from every container's cache.
            self.enforce_budget(EVENT_FD_ROOM);
        }
        let Some(c) = self
            .containers
            .get_mut(owner.container)
            .and_then(Option::as_mut)
        else {
            return;
        };
        if ev.mask & libc::IN_IGNORED != 0 {
            c.on_ignored(&mut self.shared, ev.wd, owner);
            return;
        }
        c.handle(&mut self.shared, owner, ev, stale);
    }

    /// The kernel queue overflowed: anything may have been lost, for any container.
    fn queue_overflow(&mut self) {
        tracing::warn!("inotify queue overflow; rescanning every container (raise fs.inotify.max_queued_events)");
        for c in self.containers.iter_mut().flatten() {
            c.settle(&mut self.shared);
        }
        self.shared.out.push(Some(WatchOutput::Overflow {
            container: None,
            reason: "queue",
        }));
        for c in self.containers.iter_mut().flatten() {
            c.rescan(&mut self.shared);
        }
    }
}
