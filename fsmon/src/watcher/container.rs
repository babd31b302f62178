//! One container's share of the watcher: its watched directories (a tree of [`DirNode`]s,
//! one per inotify watch), the index of what each holds, and the translation of raw
//! inotify events on its upperdir into [`FileEvent`]s.
//!
//! Kernel features: inotify(7) (2.6.13), openat2(2) `RESOLVE_*` (5.6), overlayfs (3.18).
//!
//! Invariants:
//! * Every directory is opened relative to its parent's fd, one component at a time, with
//!   `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV`, and watched through the fd
//!   it was opened as. Nothing outside the upperdir is ever opened, listed or watched
//!   because of a name the container chose.
//! * A new directory is watched first and listed after, so nothing made in it is missed;
//!   the index (name → inode) makes the listing and the events that race with it report
//!   each object once.
//! * Whiteouts are indexed (they decide what a later event means) but never reported as
//!   files and never descended into.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::Instant;

use crate::event::{FileEvent, FileKind, Source, WatchOutput};
use crate::overlay::{self, Appear, DirAttrib, EntryKind, Meta, Opaque, Origin, Prior, Via};

use super::fds::SharedBudget;
use super::rules::{self, Moves, MtimeAttribs, RawEvent, Since, Stamp};
use super::sys::{self, Dirent, Stat};
use super::{ArmStats, ContainerLayer};

/// Index of a [`DirNode`] in its container's node table.
pub(super) type NodeId = u32;
/// "No node" (a directory that could not be opened, a non-directory).
pub(super) const NO_NODE: NodeId = u32::MAX;

/// Change events only. Never `IN_ACCESS`/`IN_OPEN`/`IN_CLOSE_NOWRITE` (every read would
/// cost an event: −31% read throughput measured). `IN_DELETE_SELF`/`IN_MOVE_SELF` are
/// left out too: the parent's `IN_DELETE`/`IN_MOVED_*` and the final `IN_IGNORED` say the
/// same, and every one of them would take a queue slot. `IN_ONLYDIR`: the watch is refused
/// if the fd somehow is not a directory. `IN_EXCL_UNLINK`: no events from files already
/// unlinked (still open). No `IN_DONT_FOLLOW`: watches are added through the
/// `/proc/self/fd/N` magic link, which must be followed (see [`sys::add_watch`]).
pub(super) const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_ATTRIB
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ONLYDIR
    | libc::IN_EXCL_UNLINK;

/// Who a watch descriptor belongs to.
#[derive(Clone, Copy, Debug)]
pub(super) struct WdOwner {
    pub container: usize,
    pub node: NodeId,
    pub serial: u64,
}

/// What all containers share: the inotify fd, the wd map, the outputs being built.
pub(super) struct Shared {
    pub inotify: OwnedFd,
    pub wds: HashMap<i32, WdOwner>,
    /// Outputs in order; `None` is a slot that a later event cancelled.
    pub out: Vec<Option<WatchOutput>>,
    epoch: Instant,
    serial: u64,
    dirbuf: Vec<u8>,
    dirents: Vec<Dirent>,
    /// The number of the read whose events are being handled ([`sys::next_read`]).
    pub read_gen: u32,
    /// The event right after the one being handled, when the same read brought it:
    /// `Some(Some(is_dir))` for an `IN_MOVED_FROM` of the same name in the same directory
    /// (the other half of an exchange), `Some(None)` for anything else; `None` when unknown
    /// (the last event of the read, or not handling a read).
    pub next_from: Option<Option<bool>>,
}

impl Shared {
    pub fn new(inotify: OwnedFd) -> Shared {
        Shared {
            inotify,
            wds: HashMap::new(),
            out: Vec::new(),
            epoch: Instant::now(),
            serial: 0,
            dirbuf: Vec::new(),
            dirents: Vec::new(),
            read_gen: 0,
            next_from: None,
        }
    }

    fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    /// Milliseconds since the watcher started, wrapping, never 0 (0 means "no burst").
    fn now_ms(&self) -> u32 {
        let ms = self.epoch.elapsed().as_millis() & u128::from(u32::MAX);
        u32::try_from(ms).unwrap_or(1).max(1)
    }
}

/// How a directory's listing is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum ScanMode {
    /// At arm time: what is there predates monitoring; index it, report nothing (armed
    /// late, with a start instant: report what is newer, see `index_entry_since`).
    Index,
    /// A directory that just appeared: everything in it is new (`source: scan`).
    Report,
    /// Resync after lost events: report the differences with the index (and those of
    /// every directory below).
    Diff,
    /// A directory that was indexed without a watch and just got one: report the
    /// differences with the index in it (the directories below have their own watch, or
    /// their own retry).
    Rewatched,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum NodeState {
    /// In the tree at `parent`/`name`.
    Attached,
    /// Its `IN_MOVED_FROM` came; waiting for the `IN_MOVED_TO`.
    InFlight,
    /// Replaced at its name by another object through an exchange; dropped at the end of
    /// the batch unless it turns up again (events on it are ignored meanwhile).
    Displaced,
}

/// What the index knows about one name in a directory.
#[derive(Clone, Copy, Debug)]
struct Entry {
    kind: EntryKind,
    /// The directory's node, for a watched directory.
    child: NodeId,
    /// 0 when unknown.
    ino: u64,
    /// `None` when never stat'ed (indexed at arm time from the listing alone).
    stamp: Option<Stamp>,
    /// [`Stat::read_gen`] of the stat behind `stamp`.
    stamp_gen: u32,
    /// When the current write burst was reported (0: none), see [`rules::modify_due`].
    burst_ms: u32,
    /// A directory that overlayfs exchanged in for an emptied one (before an `rmdir`, or a
    /// rename over it): it is opaque and empty, so the container sees nothing below it,
    /// even while it is not watched.
    emptied: bool,
    /// A whiteout found by a listing rather than through an event: the events still queued
    /// for its directory may predate it (overlayfs' steps that led to it).
    scanned: bool,
}

impl Entry {
    fn new(kind: EntryKind, ino: u64) -> Entry {
        Entry {
            kind,
            child: NO_NODE,
            ino,
            stamp: None,
            stamp_gen: 0,
            burst_ms: 0,
            emptied: false,
            scanned: false,
        }
    }

    fn from_stat(kind: EntryKind, st: Option<Stat>) -> Entry {
        let mut e = Entry::new(kind, st.map_or(0, |s| s.ino));
        if let Some(st) = st.filter(|_| kind == EntryKind::File) {
            e.set_stamp(st);
        }
        e
    }

    fn set_stamp(&mut self, st: Stat) {
        self.stamp = Some(stamp(st));
        self.stamp_gen = st.read_gen;
    }

    /// Whether `other` is this very entry (same object, same node).
    fn same_object(&self, other: &Entry) -> bool {
        self.kind == other.kind && self.ino == other.ino && self.child == other.child
    }

    fn prior(&self) -> Prior {
        if self.kind.is_real() {
            Prior::Real {
                is_dir: self.kind.is_dir(),
                same: false,
            }
        } else {
            Prior::Whiteout
        }
    }
}

fn stamp(st: Stat) -> Stamp {
    Stamp {
        size: st.size,
        mtime_ns: st.mtime_ns,
        ctime_ns: st.ctime_ns,
    }
}

/// An image layer directory merged into an upper directory.
#[derive(Clone, Copy, Debug)]
struct LowerDir {
    /// Index into `Container::lowers` (top-most first).
    layer: usize,
    /// Marked `opaque=x`: zero-size files with `overlay.whiteout` are whiteouts.
    xwhiteouts: bool,
}

/// A watched (or, past the watch limit, merely indexed) upper directory.
struct DirNode {
    serial: u64,
    wd: Option<i32>,
    parent: NodeId,
    name: Box<[u8]>,
    /// Container path, `b""` for the root.
    path: Vec<u8>,
    ino: u64,
    state: NodeState,
    entries: HashMap<Box<[u8]>, Entry>,
    /// Image layer directories merged here, computed on first need (`None`: not yet).
    lower: Option<Vec<LowerDir>>,
    /// The upper directory itself is marked `opaque=x`.
    upper_xwhiteouts: bool,
    /// Attributes the container last saw, for `IN_ATTRIB` filtering.
    baseline: Meta,
    /// Overlayfs copied something up into this directory since the last `IN_ATTRIB`.
    overlay_touched: bool,
    /// Entries were added or removed since `baseline` was taken.
    mtime_stale: bool,
    /// `O_PATH` fd, cached (see `Container::ensure_fd`).
    fd: Option<OwnedFd>,
    fd_used: bool,
    /// A listing still to do.
    scan: Option<ScanMode>,
}

/// A `IN_MOVED_FROM` half waiting for its partner.
#[derive(Debug)]
struct PendingMove {
    /// What left the index (`None`: nothing known left, e.g. the second half of an
    /// exchange whose first half already replaced the entry).
    entry: Option<Entry>,
    /// Serial of `entry.child`, to tell a reused node slot.
    child_serial: u64,
    old_path: Vec<u8>,
    /// The tentative `delete` already placed in the output, turned into the `rename`
    /// when the partner comes.
    slot: Option<usize>,
    /// Outputs about the moved directory's subtree since it left: renamed with it when the
    /// partner comes, dropped if it never does (they happened outside the container).
    captured: Vec<usize>,
    /// Deletes of what was below a directory taken for emptied by overlayfs (the leaving
    /// half of its exchange): dropped if a partner comes after all (it was a rename).
    vanished: std::ops::Range<usize>,
}

impl PendingMove {
    /// A half that has placed nothing in the output (yet).
    fn new(entry: Option<Entry>, child_serial: u64, old_path: Vec<u8>) -> PendingMove {
        PendingMove {
            entry,
            child_serial,
            old_path,
            slot: None,
            captured: Vec::new(),
            vanished: 0..0,
        }
    }
}

/// Result of watching a directory that appeared.
enum Attached {
    /// A new node (listing queued).
    New(NodeId),
    /// The directory was already watched: a known node moved here. `old_path` is where
    /// the container last saw it, unless that rename was already reported.
    Adopted {
        node: NodeId,
        old_path: Option<Vec<u8>>,
    },
    /// Could not be opened (gone, or no longer a directory): its events will tell.
    Failed,
}

impl Attached {
    fn node(&self) -> NodeId {
        match self {
            Attached::New(n) | Attached::Adopted { node: n, .. } => *n,
            Attached::Failed => NO_NODE,
        }
    }
}

/// Result of retrying the watch of an unwatched directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Rewatch {
    /// Watched now.
    Watched,
    /// Refused again by the watch limit.
    Limit,
    /// Not reachable now (renamed or replaced, its events not handled yet): later.
    Later,
    /// Not to retry: already watched, gone, or refused otherwise.
    Never,
}

/// One armed container.
pub(super) struct Container {
    pub key: usize,
    pub id: String,
    /// The upperdir and image layers as the runtime named them (host paths): reopened on
    /// demand, never held for the container's life.
    layer: ContainerLayer,
    /// Image layer fds, cached while the fd budget allows (`None`: closed).
    lowers: Vec<Option<OwnedFd>>,
    /// The fd budget shared by every container (see `fds`).
    budget: SharedBudget,
    nodes: Vec<Option<DirNode>>,
    free: Vec<NodeId>,
    root: NodeId,
    ring: VecDeque<(NodeId, u64)>,
    open_fds: usize,
    displaced: Vec<(NodeId, u64)>,
    to_list: Vec<NodeId>,
    deferred: Vec<(NodeId, u64)>,
    moves: Moves<PendingMove>,
    /// Directory `attrib`s waiting for the end of the drain (mtime changes only).
    mtime_attribs: MtimeAttribs,
    /// Directories indexed without a watch because of the watch limit (node, serial), for
    /// [`Self::retry_unwatched`].
    unwatched: Vec<(NodeId, u64)>,
    /// The last event was an unpaired `IN_MOVED_TO` at (node, name), which replaced this
    /// index entry: an `IN_MOVED_FROM` of the same name right after is the other half of an
    /// exchange.
    last_to: Option<(NodeId, Box<[u8]>, Option<Entry>)>,
    /// Wall-clock ns when monitoring began (minus a margin for coarse fs timestamps).
    armed_ns: i64,
    /// Wall-clock ns when the container started (minus the same margin), when it was armed
    /// late: what the arm-time listing finds made or changed since then is reported.
    since_ns: Option<i64>,
    limit_reported: bool,
    /// An open failed with EMFILE/ENFILE since [`Self::take_fd_exhaustion`].
    fd_exhausted: bool,
    /// An `fd_limit` overflow was reported in this call.
    fd_limit_reported: bool,
    pub stats: ArmStats,
}

impl Drop for Container {
    fn drop(&mut self) {
        let lowers = self.lowers.iter().flatten().count();
        self.budget.closed(self.open_fds + lowers);
    }
}

impl Container {
    /// A container whose layer's image directories are open already (`lowers`, in
    /// `layer.lowerdirs` order, each counted in `budget`).
    pub fn new(
        key: usize,
        id: &str,
        layer: ContainerLayer,
        lowers: Vec<OwnedFd>,
        budget: SharedBudget,
        armed_ns: i64,
        since_ns: Option<i64>,
    ) -> Container {
        Container {
            key,
            id: id.to_owned(),
            layer,
            lowers: lowers.into_iter().map(Some).collect(),
            budget,
            nodes: Vec::new(),
            free: Vec::new(),
            root: NO_NODE,
            ring: VecDeque::new(),
            open_fds: 0,
            displaced: Vec::new(),
            to_list: Vec::new(),
            deferred: Vec::new(),
            moves: Moves::default(),
            mtime_attribs: MtimeAttribs::default(),
            unwatched: Vec::new(),
            last_to: None,
            armed_ns,
            since_ns,
            limit_reported: false,
            fd_exhausted: false,
            fd_limit_reported: false,
            stats: ArmStats::default(),
        }
    }

    /// Watches the upperdir root (already done by the caller: `wd`) and indexes everything
    /// below it, watching each directory before listing it. With `since_ns`, what was made
    /// or changed since is reported instead ([`Self::index_entry_since`]).
    pub fn arm(&mut self, sh: &mut Shared, wd: i32, root: &Stat, root_fd: OwnedFd) {
        let serial = sh.next_serial();
        let mut node = DirNode::new(serial, Some(wd), NO_NODE, Box::default(), Vec::new(), root);
        node.fd = Some(root_fd);
        node.fd_used = true;
        let Some(id) = self.alloc(node, Some(ScanMode::Index)) else {
            return;
        };
        self.root = id;
        sh.wds.insert(
            wd,
            WdOwner {
                container: self.key,
                node: id,
                serial,
            },
        );
        self.stats.dirs += 1;
        self.process_listings(sh);
        if self.since_ns.is_some() {
            self.recount();
        }
    }

    /// Recomputes `stats` from the index (entries reported at arm time are in it too).
    fn recount(&mut self) {
        let mut stats = ArmStats::default();
        for d in self.nodes.iter().flatten() {
            stats.dirs += 1;
            if d.wd.is_none() {
                stats.unwatched_dirs += 1;
            }
            for e in d.entries.values() {
                match e.kind {
                    EntryKind::Dir => {}
                    EntryKind::Whiteout => stats.whiteouts += 1,
                    _ => stats.files += 1,
                }
            }
        }
        self.stats = stats;
    }

    /// Every watch descriptor of this container.
    pub fn wds(&self) -> impl Iterator<Item = (i32, u64)> + '_ {
        self.nodes
            .iter()
            .flatten()
            .filter_map(|n| n.wd.map(|wd| (wd, n.serial)))
    }

    pub fn watch_count(&self) -> usize {
        self.nodes
            .iter()
            .flatten()
            .filter(|n| n.wd.is_some())
            .count()
    }

    /// Whether something waits for a later event: an unpaired `IN_MOVED_FROM` of a known
    /// entry for its partner, a directory `attrib` for the entry change that would explain
    /// its mtime.
    pub fn waiting(&self) -> bool {
        self.moves.iter().any(|m| m.slot.is_some()) || self.mtime_attribs.unexplained()
    }

    // ----- node table -------------------------------------------------------------------

    fn nd(&self, n: NodeId) -> Option<&DirNode> {
        self.nodes.get(usize::try_from(n).ok()?)?.as_ref()
    }

    fn nd_mut(&mut self, n: NodeId) -> Option<&mut DirNode> {
        self.nodes.get_mut(usize::try_from(n).ok()?)?.as_mut()
    }

    fn serial_of(&self, n: NodeId) -> Option<u64> {
        self.nd(n).map(|d| d.serial)
    }

    fn alloc(&mut self, mut node: DirNode, scan: Option<ScanMode>) -> Option<NodeId> {
        node.scan = scan;
        let has_fd = node.fd.is_some();
        let serial = node.serial;
        let id = match self.free.pop() {
            Some(id) => {
                let slot = self.nodes.get_mut(usize::try_from(id).ok()?)?;
                *slot = Some(node);
                id
            }
            None => {
                let id = NodeId::try_from(self.nodes.len())
                    .ok()
                    .filter(|&i| i != NO_NODE)?;
                self.nodes.push(Some(node));
                id
            }
        };
        if has_fd {
            self.open_fds += 1;
            self.budget.opened();
            self.ring.push_back((id, serial));
        }
        if scan.is_some() {
            self.to_list.push(id);
        }
        Some(id)
    }

    /// The node `child` as the directory `name` of `parent`, if it is that.
    fn valid_child(&self, parent: NodeId, name: &[u8], child: NodeId) -> bool {
        child != NO_NODE
            && self.nd(child).is_some_and(|c| {
                c.parent == parent && *c.name == *name && c.state == NodeState::Attached
            })
    }

    fn child_path(&self, n: NodeId, name: &[u8]) -> Vec<u8> {
        rules::join(self.nd(n).map_or(&[][..], |d| &d.path), name)
    }

    /// The fd of node `n`, valid until the next `ensure_fd` (call that first).
    fn fd_of(&self, n: NodeId) -> Option<BorrowedFd<'_>> {
        self.nd(n)?.fd.as_ref().map(AsFd::as_fd)
    }

    /// Makes sure node `n` has an open fd: reopens it (and ancestors as needed) from the
    /// nearest ancestor with one, a component at a time, checking that each is still the
    /// directory it was (same inode); the upperdir itself is reopened from its host path
    /// (the runtime's, not the container's). False when that no longer holds: the node's
    /// name is stale (a rename not processed yet) or the directory is gone, or descriptors
    /// ran out (then `fd_exhausted` is set: see [`Self::take_fd_exhaustion`]).
    fn ensure_fd(&mut self, n: NodeId) -> bool {
        match self.nd_mut(n) {
            None => return false,
            Some(d) if d.fd.is_some() => {
                d.fd_used = true;
                return true;
            }
            Some(_) => {}
        }
        self.evict();
        let mut chain = vec![n];
        let mut cur = n;
        while cur != self.root {
            let Some(d) = self.nd(cur) else { return false };
            if d.state != NodeState::Attached || d.parent == NO_NODE {
                return false;
            }
            cur = d.parent;
            if self.nd(cur).is_some_and(|p| p.fd.is_some()) {
                break;
            }
            chain.push(cur);
            if chain.len() > self.nodes.len() {
                return false;
            }
        }
        for &m in chain.iter().rev() {
            let Some(d) = self.nd(m) else { return false };
            let opened = if m == self.root {
                sys::open_host_dir(&self.layer.upperdir)
            } else {
                let Some(pfd) = self.fd_of(d.parent) else {
                    return false;
                };
                sys::open_child_dir(pfd, &d.name, false)
            };
            let fd = match opened {
                Ok(fd) => fd,
                Err(e) => {
                    if crate::limits::is_fd_exhaustion(&e) {
                        self.fd_exhausted = true;
                    }
                    return false;
                }
            };
            match sys::stat_fd(fd.as_fd()) {
                Ok(st) if st.ino == d.ino => {}
                _ => return false,
            }
            let serial = d.serial;
            if let Some(d) = self.nd_mut(m) {
                d.fd = Some(fd);
                d.fd_used = true;
            }
            self.open_fds += 1;
            self.budget.opened();
            self.ring.push_back((m, serial));
        }
        true
    }

    /// Before opening another fd: while the budget shared by all containers is full,
    /// closes this container's cached fds that were not used since they were last
    /// considered (second chance).
    fn evict(&mut self) {
        let mut rounds = self.ring.len() * 2;
        while self.budget.full() && rounds > 0 {
            rounds -= 1;
            if !self.evict_one() {
                break;
            }
        }
    }

    /// Closes one cached node fd, giving recently used ones a second chance; false when
    /// none is cached.
    fn evict_one(&mut self) -> bool {
        let Some((m, serial)) = self.ring.pop_front() else {
            return false;
        };
        let Some(d) = self
            .nd_mut(m)
            .filter(|d| d.serial == serial && d.fd.is_some())
        else {
            return true;
        };
        if d.fd_used {
            d.fd_used = false;
            self.ring.push_back((m, serial));
        } else {
            d.fd = None;
            self.open_fds -= 1;
            self.budget.closed(1);
        }
        true
    }

    /// Closes cached fds (image layers first, then directories, least recently used
    /// first) until the budget holds at most `target` or this container holds none.
    /// Called between operations, when the budget is over: nothing borrowed is closed.
    pub fn shed(&mut self, target: usize) {
        for l in &mut self.lowers {
            if self.budget.open() <= target {
                return;
            }
            if l.take().is_some() {
                self.budget.closed(1);
            }
        }
        let mut rounds = self.ring.len() * 2 + 1;
        while self.budget.open() > target && rounds > 0 {
            rounds -= 1;
            if !self.evict_one() {
                return;
            }
        }
    }

    /// Whether an open failed for lack of descriptors since the last call (and clears it).
    pub fn take_fd_exhaustion(&mut self) -> bool {
        std::mem::take(&mut self.fd_exhausted)
    }

    /// Reopens the image layers that were closed (on demand: they are host paths the
    /// runtime chose). A layer that cannot be opened is skipped by the lookups.
    fn open_lowers(&mut self) {
        for (i, slot) in self.lowers.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let Some(path) = self.layer.lowerdirs.get(i) else {
                continue;
            };
            match sys::open_host_dir(path) {
                Ok(fd) => {
                    *slot = Some(fd);
                    self.budget.opened();
                }
                Err(e) => {
                    if crate::limits::is_fd_exhaustion(&e) {
                        self.fd_exhausted = true;
                    }
                    tracing::debug!(container_id = %self.id, layer = %path.display(), error = %e, "cannot reopen an image layer");
                }
            }
        }
    }

    /// The fd of image layer `layer`, if open ([`Self::open_lowers`] first).
    fn lower_fd(&self, layer: usize) -> Option<BorrowedFd<'_>> {
        self.lowers.get(layer)?.as_ref().map(AsFd::as_fd)
    }

    fn stat_child(&mut self, n: NodeId, name: &[u8]) -> Option<Stat> {
        if !self.ensure_fd(n) {
            return None;
        }
        sys::stat_at(self.fd_of(n)?, name).ok()
    }

    /// [`Self::stat_child`] with the birth time, when known ([`sys::statx_at`]).
    fn statx_child(&mut self, n: NodeId, name: &[u8]) -> Option<(Stat, Option<i64>)> {
        if !self.ensure_fd(n) {
            return None;
        }
        sys::statx_at(self.fd_of(n)?, name).ok()
    }

    // ----- output -----------------------------------------------------------------------

    fn file_event(
        &self,
        kind: FileKind,
        path: Vec<u8>,
        old_path: Option<Vec<u8>>,
        is_dir: bool,
        source: Source,
    ) -> WatchOutput {
        WatchOutput::File(FileEvent {
            container: self.id.clone(),
            kind,
            path,
            old_path,
            is_dir,
            source,
        })
    }

    fn emit(
        &self,
        sh: &mut Shared,
        kind: FileKind,
        path: Vec<u8>,
        is_dir: bool,
        source: Source,
    ) -> usize {
        sh.out
            .push(Some(self.file_event(kind, path, None, is_dir, source)));
        sh.out.len() - 1
    }

    fn watch_limit(&mut self, sh: &mut Shared) {
        if !self.limit_reported {
            self.limit_reported = true;
            tracing::warn!(container_id = %self.id, "inotify watch limit reached; raise fs.inotify.max_user_watches");
            sh.out.push(Some(WatchOutput::Overflow {
                container: Some(self.id.clone()),
                reason: "watch_limit",
            }));
        }
    }

    /// Descriptors ran out while handling this container: reported once per call (the
    /// work that needed them is retried, and what it finds reported by scan).
    fn fd_limit(&mut self, sh: &mut Shared) {
        if !self.fd_limit_reported {
            self.fd_limit_reported = true;
            tracing::error!(container_id = %self.id, advice = %crate::limits::fd_advice(), "out of file descriptors while watching a container; retrying");
            sh.out.push(Some(WatchOutput::Overflow {
                container: Some(self.id.clone()),
                reason: "fd_limit",
            }));
        }
    }

    // ----- image layers -----------------------------------------------------------------

    /// The image layer directories merged into node `n` (computed once per node, top-down
    /// from the nearest ancestor that knows).
    fn lower_dirs(&mut self, n: NodeId) -> Vec<LowerDir> {
        let mut chain = Vec::new();
        let mut cur = n;
        loop {
            let Some(d) = self.nd(cur) else {
                return Vec::new();
            };
            if d.lower.is_some() {
                break;
            }
            chain.push(cur);
            if cur == self.root {
                break;
            }
            if d.state != NodeState::Attached
                || d.parent == NO_NODE
                || chain.len() > self.nodes.len()
            {
                return Vec::new();
            }
            cur = d.parent;
        }
        for &m in chain.iter().rev() {
            let (lower, x) = self.compute_lower(m);
            if let Some(d) = self.nd_mut(m) {
                d.lower = Some(lower);
                d.upper_xwhiteouts = x;
            }
        }
        self.nd(n).and_then(|d| d.lower.clone()).unwrap_or_default()
    }

    fn compute_lower(&mut self, m: NodeId) -> (Vec<LowerDir>, bool) {
        let mut buf = [0u8; 16];
        let opaque = if self.ensure_fd(m) {
            let v = self.fd_of(m).and_then(|fd| {
                sys::xattr_of_fd(fd, &overlay::OPAQUE_XATTRS, &mut buf)
                    .ok()
                    .flatten()
            });
            overlay::parse_opaque(v)
        } else {
            Opaque::No
        };
        let x = opaque == Opaque::XWhiteouts;
        if opaque == Opaque::Yes {
            return (Vec::new(), x);
        }
        let mut out = Vec::new();
        self.open_lowers();
        if m == self.root {
            for layer in 0..self.lowers.len() {
                let Some(fd) = self.lower_fd(layer) else {
                    // Could not be reopened: taken as merged here, without marks.
                    out.push(LowerDir {
                        layer,
                        xwhiteouts: false,
                    });
                    continue;
                };
                let v = sys::xattr_of_fd(fd, &overlay::OPAQUE_XATTRS, &mut buf)
                    .ok()
                    .flatten();
                let o = overlay::parse_opaque(v);
                out.push(LowerDir {
                    layer,
                    xwhiteouts: o == Opaque::XWhiteouts,
                });
                if o == Opaque::Yes {
                    break;
                }
            }
            return (out, x);
        }
        let Some(d) = self.nd(m) else { return (out, x) };
        let Some(p) = self.nd(d.parent) else {
            return (out, x);
        };
        let parent_lower = p.lower.clone().unwrap_or_default();
        let prel = p.path.get(1..).unwrap_or_default().to_vec();
        let name = d.name.clone();
        out = self.merge_lower_child(&parent_lower, &prel, &name);
        (out, x)
    }

    /// The image layer directories that merge at `name` of node `n` (what the container
    /// sees there when the upper directory has no opaque one).
    fn child_lower(&mut self, n: NodeId, name: &[u8]) -> Vec<LowerDir> {
        let parent_lower = self.lower_dirs(n);
        self.open_lowers();
        let prel = self
            .nd(n)
            .map(|d| d.path.get(1..).unwrap_or_default().to_vec())
            .unwrap_or_default();
        self.merge_lower_child(&parent_lower, &prel, name)
    }

    /// The image layer directories that merge at `name` below a directory whose own are
    /// `parent_lower` at relative path `prel`: top-most first, stopping at a whiteout, a
    /// non-directory or an opaque directory.
    fn merge_lower_child(
        &self,
        parent_lower: &[LowerDir],
        prel: &[u8],
        name: &[u8],
    ) -> Vec<LowerDir> {
        let mut out = Vec::new();
        let mut buf = [0u8; 16];
        for ld in parent_lower {
            let Some(root) = self.lower_fd(ld.layer) else {
                continue;
            };
            let Ok(pfd) = sys::open_dir_beneath(root, prel, false) else {
                continue;
            };
            let Ok(st) = sys::stat_at(pfd.as_fd(), name) else {
                continue;
            };
            match lower_kind(pfd.as_fd(), name, &st, ld.xwhiteouts) {
                EntryKind::Dir => {
                    let v = sys::xattr_at(pfd.as_fd(), name, &overlay::OPAQUE_XATTRS, &mut buf)
                        .ok()
                        .flatten();
                    let o = overlay::parse_opaque(v);
                    out.push(LowerDir {
                        layer: ld.layer,
                        xwhiteouts: o == Opaque::XWhiteouts,
                    });
                    if o == Opaque::Yes {
                        break;
                    }
                }
                // A whiteout or a non-directory hides everything below it.
                _ => break,
            }
        }
        out
    }

    /// Deletes for everything the container still saw below the directory `old` at `name`
    /// of `n`, which overlayfs just emptied (exchanged for an empty opaque directory) or hid
    /// with a whiteout: what the index holds there and what the image layers show (the same
    /// merge overlayfs does). `rmdir` needed that view empty, so each of those was deleted,
    /// only too fast for its own event to be seen (overlayfs copies an image directory up
    /// and whiteouts it before a watch can be added). What the index knows as deleted
    /// (whiteouts, names gone) is not reported again, and nothing is below an emptied
    /// directory. Deepest first, like `rm -r`; `source: scan` since they are inferred.
    /// Returns the output slots used.
    fn report_vanished(
        &mut self,
        sh: &mut Shared,
        n: NodeId,
        name: &[u8],
        old: Entry,
    ) -> std::ops::Range<usize> {
        let first = sh.out.len();
        if old.emptied || !old.kind.is_dir() {
            return first..first;
        }
        let old_child = old.child;
        /// One name of the merged view being walked.
        struct View {
            kind: EntryKind,
            node: NodeId,
            lower: Vec<LowerDir>,
            closed: bool,
        }
        let node = if self.valid_child(n, name, old_child) {
            old_child
        } else {
            NO_NODE
        };
        let start = if node != NO_NODE {
            self.lower_dirs(node)
        } else {
            self.child_lower(n, name)
        };
        let mut found: Vec<(Vec<u8>, bool)> = Vec::new();
        let mut stack = vec![(self.child_path(n, name), node, start)];
        let mut budget: usize = 1 << 20;
        let (mut dirbuf, mut dirents) = (Vec::new(), Vec::new());
        while let Some((path, node, lowers)) = stack.pop() {
            let mut view: std::collections::BTreeMap<Box<[u8]>, View> =
                std::collections::BTreeMap::new();
            let rel = path.get(1..).unwrap_or_default();
            self.open_lowers();
            for ld in &lowers {
                let Some(root) = self.lower_fd(ld.layer) else {
                    continue;
                };
                let Ok(dfd) = sys::open_dir_beneath(root, rel, true) else {
                    continue;
                };
                dirents.clear();
                if sys::list_dir(dfd.as_fd(), &mut dirbuf, &mut dirents).is_err() {
                    continue;
                }
                for d in &dirents {
                    let merge = match view.get(&d.name) {
                        None => false,
                        Some(v) if v.kind == EntryKind::Dir && !v.closed => true,
                        Some(_) => continue,
                    };
                    let Ok(st) = sys::stat_at(dfd.as_fd(), &d.name) else {
                        continue;
                    };
                    let kind = lower_kind(dfd.as_fd(), &d.name, &st, ld.xwhiteouts);
                    let mut buf = [0u8; 16];
                    let mark = if kind == EntryKind::Dir {
                        overlay::parse_opaque(
                            sys::xattr_at(dfd.as_fd(), &d.name, &overlay::OPAQUE_XATTRS, &mut buf)
                                .ok()
                                .flatten(),
                        )
                    } else {
                        Opaque::No
                    };
                    let opaque = mark == Opaque::Yes;
                    let here = LowerDir {
                        layer: ld.layer,
                        xwhiteouts: mark == Opaque::XWhiteouts,
                    };
                    match (merge, kind) {
                        (true, EntryKind::Dir) => {
                            if let Some(v) = view.get_mut(&d.name) {
                                v.lower.push(here);
                                v.closed = opaque;
                            }
                        }
                        (true, _) => {
                            if let Some(v) = view.get_mut(&d.name) {
                                v.closed = true;
                            }
                        }
                        (false, k) => {
                            let lower = if k == EntryKind::Dir {
                                vec![here]
                            } else {
                                Vec::new()
                            };
                            let closed = k != EntryKind::Dir || opaque;
                            view.insert(
                                d.name.clone(),
                                View {
                                    kind: k,
                                    node: NO_NODE,
                                    lower,
                                    closed,
                                },
                            );
                        }
                    }
                }
            }
            let upper: Vec<(Box<[u8]>, Entry)> = match self.nd(node) {
                Some(x) => x.entries.iter().map(|(k, e)| (k.clone(), *e)).collect(),
                None => Vec::new(),
            };
            for (k, e) in upper {
                let child = if e.kind.is_dir() && self.valid_child(node, &k, e.child) {
                    e.child
                } else {
                    NO_NODE
                };
                let lower = match (e.kind.is_dir(), child) {
                    (false, _) => Vec::new(),
                    (true, NO_NODE) => view.get(&k).map(|v| v.lower.clone()).unwrap_or_default(),
                    (true, c) => self.lower_dirs(c),
                };
                view.insert(
                    k,
                    View {
                        kind: e.kind,
                        node: child,
                        lower,
                        closed: true,
                    },
                );
            }
            for (k, v) in view {
                if !v.kind.is_real() {
                    continue;
                }
                budget = budget.saturating_sub(1);
                if budget == 0 {
                    tracing::warn!(container_id = %self.id, "deleted directory too large to report entry by entry");
                    stack.clear();
                    break;
                }
                let p = rules::join(&path, &k);
                found.push((p.clone(), v.kind.is_dir()));
                if v.kind.is_dir() {
                    stack.push((p, v.node, v.lower));
                }
            }
        }
        for (p, is_dir) in found.into_iter().rev() {
            self.emit(sh, FileKind::Delete, p, is_dir, Source::Scan);
        }
        first..sh.out.len()
    }

    /// Overlayfs exchanged an empty opaque directory in for the directory `old` at `name`
    /// of `n` (`ovl_clear_empty`, before an `rmdir` or a rename over it, when the upper
    /// directory holds whiteouts): the container's view below `name` is empty now, so what
    /// it still saw there was deleted ([`Self::report_vanished`]), and the old directory
    /// went to overlayfs' workdir: its node is displaced, so that overlayfs' cleanup of it
    /// there (its whiteouts removed, then itself) is not taken for the container's doing.
    /// Returns the output slots of the deletes.
    fn emptied(
        &mut self,
        sh: &mut Shared,
        n: NodeId,
        name: &[u8],
        old: Entry,
    ) -> std::ops::Range<usize> {
        let slots = self.report_vanished(sh, n, name, old);
        if self.valid_child(n, name, old.child) {
            self.displace(old.child);
        }
        slots
    }

    /// The entry an image layer shows at `name` in node `n`, if any is visible.
    fn lower_lookup(&mut self, n: NodeId, name: &[u8]) -> Option<Stat> {
        let dirs = self.lower_dirs(n);
        if dirs.is_empty() {
            return None;
        }
        let rel = self.nd(n)?.path.get(1..).unwrap_or_default().to_vec();
        self.open_lowers();
        for ld in dirs {
            let Some(root) = self.lower_fd(ld.layer) else {
                continue;
            };
            let Ok(dfd) = sys::open_dir_beneath(root, &rel, false) else {
                continue;
            };
            let Ok(st) = sys::stat_at(dfd.as_fd(), name) else {
                continue;
            };
            return match lower_kind(dfd.as_fd(), name, &st, ld.xwhiteouts) {
                EntryKind::Whiteout => None,
                _ => Some(st),
            };
        }
        None
    }

    /// What an upper entry is. Zero-size files are checked for the whiteout xattr only
    /// in directories marked `opaque=x` (overlayfs itself makes char-device whiteouts).
    fn classify(&mut self, n: NodeId, name: &[u8], st: &Stat) -> EntryKind {
        let mut x = false;
        if overlay::needs_whiteout_xattr(st.mode, st.size, true) {
            let _ = self.lower_dirs(n);
            if self.nd(n).is_some_and(|d| d.upper_xwhiteouts) && self.ensure_fd(n) {
                let mut buf = [0u8; 16];
                x = self.fd_of(n).is_some_and(|fd| {
                    sys::xattr_at(fd, name, &overlay::WHITEOUT_XATTRS, &mut buf)
                        .ok()
                        .flatten()
                        .is_some()
                });
            }
        }
        overlay::classify(st.mode, st.rdev, x)
    }

    // ----- listings ---------------------------------------------------------------------

    /// Lists every directory waiting for it (new ones found meanwhile are listed too).
    pub fn process_listings(&mut self, sh: &mut Shared) {
        while let Some(n) = self.to_list.pop() {
            let Some(mode) = self.nd_mut(n).and_then(|d| d.scan.take()) else {
                continue;
            };
            if !self.ensure_fd(n) {
                // Renamed meanwhile (its event is still ahead): retry after the batch.
                if let Some(d) = self.nd_mut(n) {
                    d.scan = Some(mode);
                    let s = d.serial;
                    self.deferred.push((n, s));
                }
                continue;
            }
            let rfd = match self.fd_of(n).map(sys::reopen_dir) {
                Some(Ok(fd)) => fd,
                Some(Err(e)) if crate::limits::is_fd_exhaustion(&e) => {
                    // Listed again at the end of the next call, once descriptors allow.
                    self.fd_exhausted = true;
                    self.fd_limit(sh);
                    if let Some(d) = self.nd_mut(n) {
                        d.scan = Some(mode);
                        let s = d.serial;
                        self.deferred.push((n, s));
                    }
                    continue;
                }
                _ => continue,
            };
            let mut dirents = std::mem::take(&mut sh.dirents);
            dirents.clear();
            if let Err(e) = sys::list_dir(rfd.as_fd(), &mut sh.dirbuf, &mut dirents) {
                tracing::debug!(container_id = %self.id, error = %e, "listing a directory");
            }
            drop(rfd);
            if mode == ScanMode::Report && !dirents.is_empty() {
                // Entries were made in it before it was watched: its mtime moved without
                // an IN_ATTRIB, so it says nothing about attribute changes.
                self.entries_changed(n);
            }
            if matches!(mode, ScanMode::Diff | ScanMode::Rewatched) {
                self.diff_node(sh, n, &dirents, mode == ScanMode::Diff);
            } else {
                for d in &dirents {
                    self.scan_entry(sh, n, d, mode);
                }
            }
            dirents.clear();
            sh.dirents = dirents;
        }
    }

    fn scan_entry(&mut self, sh: &mut Shared, n: NodeId, d: &Dirent, mode: ScanMode) {
        if let Some(e) = self.nd(n).and_then(|x| x.entries.get(&d.name)) {
            if e.ino == d.ino && e.ino != 0 {
                // An event got there first.
                return;
            }
        }
        if mode == ScanMode::Index {
            match self.since_ns {
                Some(since) => self.index_entry_since(sh, n, d, since),
                None => self.index_entry(sh, n, d),
            }
            return;
        }
        if let Some(st) = self.stat_child(n, &d.name) {
            self.appear(sh, n, &d.name, Some(st), st.is_dir(), None, Source::Scan);
        }
    }

    /// Arm time: records what exists (from the listing alone where the type says enough).
    fn index_entry(&mut self, sh: &mut Shared, n: NodeId, d: &Dirent) {
        let kind = match d.dtype {
            libc::DT_DIR => EntryKind::Dir,
            libc::DT_REG => EntryKind::File,
            libc::DT_LNK => EntryKind::Symlink,
            libc::DT_FIFO | libc::DT_SOCK | libc::DT_BLK => EntryKind::Special,
            _ => match self.stat_child(n, &d.name) {
                Some(st) => self.classify(n, &d.name, &st),
                None => return,
            },
        };
        let mut entry = Entry::new(kind, d.ino);
        match kind {
            EntryKind::Dir => {
                entry.child = self
                    .attach(sh, n, &d.name, ScanMode::Index, None, None)
                    .node();
                self.stats.dirs += 1;
            }
            EntryKind::Whiteout => self.stats.whiteouts += 1,
            _ => self.stats.files += 1,
        }
        self.set_entry(n, &d.name, entry);
    }

    /// Arm time of a container armed late: an entry born at or after `since` (its birth
    /// time; without one, its ctime, directories excepted) is the container's doing and is
    /// handled as an appearance found by a scan (`create`; a copy-up as `modify`/`attrib`;
    /// a whiteout as the `delete` of what it hides; a new directory watched and everything
    /// in it reported). Anything older is indexed as by [`Self::index_entry`], a regular
    /// file changed since is reported as a rescan would ([`rules::rescan_change`]), and an
    /// old directory is descended into with the same rule.
    fn index_entry_since(&mut self, sh: &mut Shared, n: NodeId, d: &Dirent, since: i64) {
        let Some((st, btime)) = self.statx_child(n, &d.name) else {
            return;
        };
        let kind = self.classify(n, &d.name, &st);
        let verdict = rules::since_verdict(
            kind == EntryKind::Dir,
            kind == EntryKind::File,
            btime,
            stamp(st),
            since,
        );
        let change = match verdict {
            Since::New => {
                self.appear(sh, n, &d.name, Some(st), st.is_dir(), None, Source::Scan);
                return;
            }
            Since::Old(change) => change,
        };
        let mut entry = Entry::new(kind, st.ino);
        match kind {
            EntryKind::Dir => {
                entry.child = self
                    .attach(sh, n, &d.name, ScanMode::Index, None, Some(st.ino))
                    .node();
            }
            EntryKind::File => {
                entry.set_stamp(st);
                if let Some(k) = change {
                    let path = self.child_path(n, &d.name);
                    self.emit(sh, k, path, false, Source::Scan);
                    if k == FileKind::Modify {
                        entry.burst_ms = sh.now_ms();
                    }
                }
            }
            _ => {}
        }
        self.set_entry(n, &d.name, entry);
    }

    fn set_entry(&mut self, n: NodeId, name: &[u8], entry: Entry) {
        if let Some(d) = self.nd_mut(n) {
            match d.entries.get_mut(name) {
                Some(e) => *e = entry,
                None => {
                    d.entries.insert(name.into(), entry);
                }
            }
        }
    }

    /// Resync: compares the listing of node `n` with its index, reporting differences;
    /// `deep`: and every known directory below it too (re-watched if it has no watch).
    fn diff_node(&mut self, sh: &mut Shared, n: NodeId, dirents: &[Dirent], deep: bool) {
        let mut present: HashSet<&[u8]> = HashSet::with_capacity(dirents.len());
        let mut entries_changed = false;
        for d in dirents {
            present.insert(&d.name);
            let known = self.nd(n).and_then(|x| x.entries.get(&d.name)).copied();
            let same = known.filter(|e| {
                e.ino == d.ino && e.ino != 0 && e.kind.is_dir() == (d.dtype == libc::DT_DIR)
            });
            match same {
                Some(e) if e.kind.is_dir() => {
                    if self.valid_child(n, &d.name, e.child) {
                        if !deep {
                            continue;
                        }
                        self.rewatch(sh, e.child);
                        if let Some(c) = self.nd_mut(e.child) {
                            c.scan = Some(ScanMode::Diff);
                        }
                        self.to_list.push(e.child);
                    } else {
                        let child = self
                            .attach(sh, n, &d.name, ScanMode::Report, None, None)
                            .node();
                        self.set_entry(n, &d.name, Entry { child, ..e });
                    }
                }
                Some(e) if e.kind == EntryKind::File => {
                    let Some(st) = self.stat_child(n, &d.name) else {
                        continue;
                    };
                    if let Some(kind) = rules::rescan_change(e.stamp, stamp(st), self.armed_ns) {
                        let path = self.child_path(n, &d.name);
                        self.emit(sh, kind, path, false, Source::Scan);
                    }
                    self.set_entry(
                        n,
                        &d.name,
                        Entry {
                            stamp: Some(stamp(st)),
                            stamp_gen: st.read_gen,
                            ..e
                        },
                    );
                }
                Some(_) => {}
                None => {
                    if let Some(st) = self.stat_child(n, &d.name) {
                        entries_changed = true;
                        self.appear(sh, n, &d.name, Some(st), st.is_dir(), None, Source::Scan);
                    }
                }
            }
        }
        let gone: Vec<Box<[u8]>> = match self.nd(n) {
            Some(x) => x
                .entries
                .keys()
                .filter(|k| !present.contains(&k[..]))
                .cloned()
                .collect(),
            None => return,
        };
        if entries_changed {
            // Its mtime moved without events: it says nothing about attributes until the
            // next IN_ATTRIB.
            self.entries_changed(n);
        }
        for name in gone {
            let Some(e) = self.nd_mut(n).and_then(|x| x.entries.remove(&name)) else {
                continue;
            };
            self.entries_changed(n);
            if let Some(is_dir) = overlay::disappear(e.prior(), e.kind.is_dir()) {
                let path = self.child_path(n, &name);
                self.emit(sh, FileKind::Delete, path, is_dir, Source::Scan);
            }
            if e.child != NO_NODE {
                self.remove_subtree(sh, e.child);
            }
        }
    }

    /// Retries the watch of an indexed but unwatched directory (after the watch limit),
    /// reporting the limit if it is still reached.
    fn rewatch(&mut self, sh: &mut Shared, m: NodeId) {
        if self.try_watch(sh, m) == Rewatch::Limit {
            self.watch_limit(sh);
        }
    }

    /// Adds the missing watch of node `m` through the fd it is reopened as (checked to be
    /// the same directory, see [`Self::ensure_fd`]). Quiet: the caller reports the limit.
    fn try_watch(&mut self, sh: &mut Shared, m: NodeId) -> Rewatch {
        if self
            .nd(m)
            .is_none_or(|d| d.wd.is_some() || d.state != NodeState::Attached)
        {
            return Rewatch::Never;
        }
        if !self.ensure_fd(m) {
            return Rewatch::Later;
        }
        let Some(fd) = self.fd_of(m) else {
            return Rewatch::Later;
        };
        match sys::add_watch(sh.inotify.as_fd(), fd, MASK) {
            Ok(wd) if !sh.wds.contains_key(&wd) => {
                let Some(d) = self.nd_mut(m) else {
                    return Rewatch::Never;
                };
                d.wd = Some(wd);
                let serial = d.serial;
                sh.wds.insert(
                    wd,
                    WdOwner {
                        container: self.key,
                        node: m,
                        serial,
                    },
                );
                Rewatch::Watched
            }
            // Already watched (for another container): only indexed here.
            Ok(_) => Rewatch::Never,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => Rewatch::Limit,
            Err(e) => {
                tracing::debug!(container_id = %self.id, error = %e, "cannot watch a directory");
                Rewatch::Never
            }
        }
    }

    /// Whether directories wait for a watch that the watch limit refused.
    pub fn has_unwatched(&self) -> bool {
        !self.unwatched.is_empty()
    }

    /// Retries the watches that the watch limit refused, top-most directories first, and
    /// rescans each directory that gets its watch against the index ([`ScanMode::Rewatched`]:
    /// what changed in it meanwhile is reported with `source: scan`). Still refused: quiet
    /// (the `watch_limit` overflow was reported when it was first refused), retried at the
    /// next call. New directories the rescan finds are watched as usual (and a refusal of
    /// those is reported).
    pub fn retry_unwatched(&mut self, sh: &mut Shared) {
        let mut todo = std::mem::take(&mut self.unwatched);
        todo.retain(|&(m, serial)| {
            self.nd(m)
                .is_some_and(|d| d.serial == serial && d.wd.is_none())
        });
        todo.sort_by_key(|&(m, _)| self.nd(m).map_or(0, |d| d.path.len()));
        let mut limit = false;
        for (m, serial) in todo {
            // A rescan before this one may have removed it, or a rename moved it.
            if self
                .nd(m)
                .is_none_or(|d| d.serial != serial || d.wd.is_some())
            {
                continue;
            }
            let outcome = if limit {
                Rewatch::Limit
            } else {
                self.try_watch(sh, m)
            };
            match outcome {
                Rewatch::Watched => {
                    if let Some(d) = self.nd_mut(m) {
                        d.scan = Some(ScanMode::Rewatched);
                        self.to_list.push(m);
                    }
                    self.process_listings(sh);
                }
                Rewatch::Limit => {
                    limit = true;
                    self.unwatched.push((m, serial));
                }
                Rewatch::Later => self.unwatched.push((m, serial)),
                Rewatch::Never => {}
            }
        }
    }

    // ----- directories appearing and going ----------------------------------------------

    /// Watches the directory `name` of `parent` (watch first; the listing is queued).
    /// `expect`: the inode the caller saw there; another directory found instead is not
    /// attached (it came later, and its own events will tell; attaching it to this entry
    /// would describe the wrong object).
    fn attach(
        &mut self,
        sh: &mut Shared,
        parent: NodeId,
        name: &[u8],
        mode: ScanMode,
        baseline: Option<Meta>,
        expect: Option<u64>,
    ) -> Attached {
        if !self.ensure_fd(parent) {
            return Attached::Failed;
        }
        let Some(pfd) = self.fd_of(parent) else {
            return Attached::Failed;
        };
        let cfd = match sys::open_child_dir(pfd, name, false) {
            Ok(fd) => fd,
            Err(e) if crate::limits::is_fd_exhaustion(&e) => {
                return self.attach_without_fd(sh, parent, name, baseline, expect);
            }
            Err(e) => {
                // ENOENT: gone again; ENOTDIR/ELOOP: replaced by a file or a symlink. Either
                // way its own events follow, and nothing is followed.
                tracing::trace!(container_id = %self.id, error = %e, "directory vanished before its watch");
                return Attached::Failed;
            }
        };
        let Ok(cst) = sys::stat_fd(cfd.as_fd()) else {
            return Attached::Failed;
        };
        if expect.is_some_and(|ino| ino != 0 && ino != cst.ino) {
            tracing::trace!(container_id = %self.id, "directory replaced before its watch");
            return Attached::Failed;
        }
        let mut limited = false;
        let mut wd = match sys::add_watch(sh.inotify.as_fd(), cfd.as_fd(), MASK) {
            Ok(wd) => Some(wd),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                self.watch_limit(sh);
                limited = true;
                None
            }
            Err(e) => {
                tracing::warn!(container_id = %self.id, error = %e, "cannot watch a directory");
                None
            }
        };
        if let Some(w) = wd {
            if let Some(owner) = sh.wds.get(&w).copied() {
                if owner.container == self.key && self.serial_of(owner.node) == Some(owner.serial) {
                    return self.adopt(sh, owner.node, parent, name, cfd);
                }
                // Watched for another container (a host moved a directory from one upperdir
                // to another): leave that watch alone and only index it here.
                wd = None;
            }
        }
        let serial = sh.next_serial();
        let path = self.child_path(parent, name);
        let mut node = DirNode::new(serial, wd, parent, name.into(), path, &cst);
        if let Some(b) = baseline {
            node.baseline = b;
        }
        node.fd = Some(cfd);
        node.fd_used = true;
        let Some(id) = self.alloc(node, Some(mode)) else {
            if let Some(w) = wd {
                sys::rm_watch(sh.inotify.as_fd(), w);
            }
            return Attached::Failed;
        };
        match wd {
            Some(w) => {
                sh.wds.insert(
                    w,
                    WdOwner {
                        container: self.key,
                        node: id,
                        serial,
                    },
                );
            }
            None => {
                self.stats.unwatched_dirs += 1;
                if limited {
                    self.unwatched.push((id, serial));
                }
            }
        }
        Attached::New(id)
    }

    /// Descriptors ran out before the directory `name` of `parent` could be opened: it is
    /// indexed without a watch and retried like a watch the limit refused
    /// ([`Self::retry_unwatched`]): once it is watched, its listing is compared with the
    /// (empty) index, so everything made in it meanwhile is reported (`source: scan`).
    /// Reported as an `fd_limit` overflow.
    fn attach_without_fd(
        &mut self,
        sh: &mut Shared,
        parent: NodeId,
        name: &[u8],
        baseline: Option<Meta>,
        expect: Option<u64>,
    ) -> Attached {
        self.fd_exhausted = true;
        self.fd_limit(sh);
        let Some(cst) = self.fd_of(parent).and_then(|p| sys::stat_at(p, name).ok()) else {
            return Attached::Failed;
        };
        if !cst.is_dir() || expect.is_some_and(|ino| ino != 0 && ino != cst.ino) {
            return Attached::Failed;
        }
        let serial = sh.next_serial();
        let path = self.child_path(parent, name);
        let mut node = DirNode::new(serial, None, parent, name.into(), path, &cst);
        if let Some(b) = baseline {
            node.baseline = b;
        }
        let Some(id) = self.alloc(node, None) else {
            return Attached::Failed;
        };
        self.stats.unwatched_dirs += 1;
        self.unwatched.push((id, serial));
        Attached::New(id)
    }

    /// A directory that appeared at `parent`/`name` is already watched as node `m`: move
    /// the node there.
    fn adopt(
        &mut self,
        sh: &mut Shared,
        m: NodeId,
        parent: NodeId,
        name: &[u8],
        fd: OwnedFd,
    ) -> Attached {
        let Some(d) = self.nd(m) else {
            return Attached::Failed;
        };
        let (state, old_parent, old_name, old_path, serial) = (
            d.state,
            d.parent,
            d.name.clone(),
            rules::dir_path(&d.path),
            d.serial,
        );
        if state == NodeState::Attached && old_parent == parent && old_name[..] == *name {
            return Attached::Adopted {
                node: m,
                old_path: None,
            };
        }
        let old_path = match state {
            NodeState::InFlight => {
                // Its IN_MOVED_FROM waits under a cookie that this event did not carry: pair
                // them by inode.
                let pm = self.moves.take_where(|pm| {
                    pm.child_serial == serial && pm.entry.is_some_and(|e| e.child == m)
                });
                match pm {
                    Some(pm) => {
                        let new_path = self.child_path(parent, name);
                        self.complete_move(sh, pm, new_path, true);
                        None
                    }
                    None => Some(old_path),
                }
            }
            NodeState::Displaced => {
                self.displaced.retain(|&(x, _)| x != m);
                // An exchange's leaving half may still hold it: it is not leaving after all.
                let pm = self.moves.take_where(|pm| {
                    pm.child_serial == serial && pm.entry.is_some_and(|e| e.child == m)
                });
                if let Some(pm) = pm {
                    Self::withdraw(sh, pm.vanished);
                }
                Some(old_path)
            }
            NodeState::Attached => {
                if let Some(op) = self.nd_mut(old_parent) {
                    if op.entries.get(&old_name).is_some_and(|e| e.child == m) {
                        op.entries.remove(&old_name);
                    }
                }
                Some(old_path)
            }
        };
        self.reparent(m, parent, name);
        if let Some(d) = self.nd_mut(m) {
            if d.fd.is_none() {
                d.fd = Some(fd);
                d.fd_used = true;
                self.open_fds += 1;
                self.budget.opened();
                self.ring.push_back((m, serial));
            }
        }
        Attached::Adopted { node: m, old_path }
    }

    /// Moves node `m` (and the paths of everything below it) to `parent`/`name`.
    fn reparent(&mut self, m: NodeId, parent: NodeId, name: &[u8]) {
        let path = self.child_path(parent, name);
        if let Some(d) = self.nd_mut(m) {
            d.parent = parent;
            d.name = name.into();
            d.state = NodeState::Attached;
        }
        let mut stack = vec![(m, path)];
        while let Some((x, p)) = stack.pop() {
            let Some(d) = self.nd_mut(x) else { continue };
            let kids: Vec<(NodeId, Vec<u8>)> = d
                .entries
                .iter()
                .filter(|(_, e)| e.child != NO_NODE)
                .map(|(k, e)| (e.child, rules::join(&p, k)))
                .collect();
            d.path = p;
            // Which image layers merge here depends on the path.
            d.lower = None;
            for (c, cp) in kids {
                if self
                    .nd(c)
                    .is_some_and(|cd| cd.parent == x && cd.state == NodeState::Attached)
                {
                    stack.push((c, cp));
                }
            }
        }
    }

    /// An exchange put another object at this node's name: keep the node until the end of
    /// the batch in case it shows up elsewhere, ignoring its events meanwhile.
    fn displace(&mut self, child: NodeId) {
        if let Some(d) = self.nd_mut(child) {
            if d.state == NodeState::Attached {
                d.state = NodeState::Displaced;
                let s = d.serial;
                self.displaced.push((child, s));
            }
        }
    }

    /// Forgets node `m` and everything below it, removing their watches.
    fn remove_subtree(&mut self, sh: &mut Shared, m: NodeId) {
        if let Some(d) = self.nd(m) {
            if d.state == NodeState::Attached {
                let (p, name) = (d.parent, d.name.clone());
                if let Some(pd) = self.nd_mut(p) {
                    if let Some(e) = pd.entries.get_mut(&name) {
                        if e.child == m {
                            e.child = NO_NODE;
                        }
                    }
                }
            }
        }
        let mut stack = vec![m];
        while let Some(x) = stack.pop() {
            let Some(d) = usize::try_from(x)
                .ok()
                .and_then(|i| self.nodes.get_mut(i))
                .and_then(Option::take)
            else {
                continue;
            };
            if let Some(wd) = d.wd {
                if sh
                    .wds
                    .get(&wd)
                    .is_some_and(|o| o.container == self.key && o.serial == d.serial)
                {
                    sh.wds.remove(&wd);
                    sys::rm_watch(sh.inotify.as_fd(), wd);
                }
            }
            if d.fd.is_some() {
                self.open_fds = self.open_fds.saturating_sub(1);
                self.budget.closed(1);
            }
            for (k, e) in &d.entries {
                if e.child != NO_NODE
                    && self
                        .nd(e.child)
                        .is_some_and(|c| c.parent == x && c.name == *k)
                {
                    stack.push(e.child);
                }
            }
            if x == self.root {
                self.root = NO_NODE;
            }
            self.free.push(x);
        }
    }

    // ----- events -----------------------------------------------------------------------

    /// The kernel dropped watch `wd` (its directory is gone, or we removed it).
    pub fn on_ignored(&mut self, sh: &mut Shared, wd: i32, owner: WdOwner) {
        sh.wds.remove(&wd);
        let Some(d) = self.nd_mut(owner.node).filter(|d| d.serial == owner.serial) else {
            return;
        };
        d.wd = None;
        if owner.node != self.root {
            self.remove_subtree(sh, owner.node);
        }
    }

    /// One inotify event on one of this container's watches.
    ///
    /// `stale`: a later event of the same batch creates, removes or renames the same name,
    /// so what is there now is not what this event is about.
    fn on_event(&mut self, sh: &mut Shared, owner: WdOwner, ev: &RawEvent<'_>, stale: bool) {
        let n = owner.node;
        let last_to = self.last_to.take();
        match self.nd(n) {
            Some(d) if d.serial == owner.serial && d.state != NodeState::Displaced => {}
            _ => return,
        }
        let is_dir = ev.mask & libc::IN_ISDIR != 0;
        let name = ev.name;
        if name.is_empty() {
            if ev.mask & libc::IN_ATTRIB != 0 {
                self.dir_attrib(sh, n);
            }
            return;
        }
        if ev.mask & libc::IN_CREATE != 0 {
            let st = self.event_stat(n, name, is_dir, Via::Create, stale);
            self.appear(sh, n, name, st, is_dir, Some(Via::Create), Source::Inotify);
        } else if ev.mask & libc::IN_MOVED_FROM != 0 {
            let exchanged = last_to.and_then(|(m, nm, e)| (m == n && *nm == *name).then_some(e));
            self.on_moved_from(sh, n, name, ev.cookie, is_dir, stale, exchanged);
        } else if ev.mask & libc::IN_MOVED_TO != 0 {
            self.on_moved_to(sh, n, name, ev.cookie, is_dir, stale);
        } else if ev.mask & libc::IN_DELETE != 0 {
            self.on_delete(sh, n, name, is_dir);
        } else if ev.mask & libc::IN_MODIFY != 0 {
            self.on_modify(sh, n, name);
        } else if ev.mask & libc::IN_CLOSE_WRITE != 0 {
            self.on_close_write(n, name, sh.read_gen);
        } else if ev.mask & libc::IN_ATTRIB != 0 {
            self.on_attrib(sh, n, name, is_dir, stale);
        }
    }

    /// The stat of the object an event is about, or `None` when what is there now cannot be
    /// it: gone, `stale`, a directory where the event said otherwise (or the reverse), or a
    /// whiteout where something was created (overlayfs only renames whiteouts in).
    fn event_stat(
        &mut self,
        n: NodeId,
        name: &[u8],
        is_dir: bool,
        via: Via,
        stale: bool,
    ) -> Option<Stat> {
        if stale {
            return None;
        }
        let st = self.stat_child(n, name)?;
        let whiteout = st.mode & libc::S_IFMT == libc::S_IFCHR && st.rdev == 0;
        (st.is_dir() == is_dir && !(via == Via::Create && whiteout)).then_some(st)
    }

    /// Handles one event and the listings it caused. Outputs about a directory that is in
    /// flight (moved away, partner not seen yet) are set aside with its pending move.
    pub fn handle(&mut self, sh: &mut Shared, owner: WdOwner, ev: &RawEvent<'_>, stale: bool) {
        let start = sh.out.len();
        let inflight = self.inflight_ancestor(owner.node);
        self.on_event(sh, owner, ev, stale);
        self.process_listings(sh);
        if let Some(m) = inflight {
            let serial = self.serial_of(m);
            let pm = self.moves.iter_mut().find(|pm| {
                pm.entry.is_some_and(|e| e.child == m) && Some(pm.child_serial) == serial
            });
            if let Some(pm) = pm {
                pm.captured.extend(start..sh.out.len());
            }
        }
    }

    /// The in-flight directory that node `n` is in (or is), if any.
    fn inflight_ancestor(&self, mut n: NodeId) -> Option<NodeId> {
        if !self
            .moves
            .iter()
            .any(|pm| pm.entry.is_some_and(|e| e.child != NO_NODE))
        {
            return None;
        }
        for _ in 0..=self.nodes.len() {
            let d = self.nd(n)?;
            match d.state {
                NodeState::InFlight => return Some(n),
                NodeState::Attached if d.parent != NO_NODE => n = d.parent,
                _ => return None,
            }
        }
        None
    }

    /// The index's view of `name` in `n` compared with the object now there (`ino`:
    /// `None` when it is already gone, which counts as "the known one").
    fn prior(&self, n: NodeId, name: &[u8], now: Option<(u64, EntryKind)>) -> (Prior, NodeId) {
        match self.nd(n).and_then(|d| d.entries.get(name)) {
            None => (Prior::Absent, NO_NODE),
            Some(e) if !e.kind.is_real() => (Prior::Whiteout, NO_NODE),
            Some(e) => {
                let same = match now {
                    None => true,
                    Some((_, kind)) if e.ino == 0 => kind == e.kind,
                    Some((ino, kind)) => ino == e.ino && kind == e.kind,
                };
                (
                    Prior::Real {
                        is_dir: e.kind.is_dir(),
                        same,
                    },
                    e.child,
                )
            }
        }
    }

    /// An entry appeared in `n` (created, moved in without a partner, or found by a scan).
    #[allow(clippy::too_many_arguments)]
    fn appear(
        &mut self,
        sh: &mut Shared,
        n: NodeId,
        name: &[u8],
        st: Option<Stat>,
        ev_is_dir: bool,
        via: Option<Via>,
        source: Source,
    ) {
        let origin = if via.is_some() {
            Origin::Event
        } else {
            Origin::Scan
        };
        let known = self.nd(n).and_then(|d| d.entries.get(name)).copied();
        if via == Some(Via::MovedTo) && known.is_some() {
            // The other half of an exchange (overlayfs swapping a new object in) may follow.
            self.last_to = Some((n, name.into(), known));
        }
        if via == Some(Via::MovedTo) && ev_is_dir {
            if let Some(w) = known.filter(|e| !e.kind.is_real()) {
                // A directory renamed in over a whiteout is a re-create only if the whiteout
                // leaves in the same exchange (an `IN_MOVED_FROM` of a non-directory right
                // after). A directory leaving instead is `ovl_clear_empty`'s exchange at a
                // name the index already holds as deleted; and a whiteout that a listing
                // found may be the end of the very steps whose events come now (the copy-up
                // of a directory that `rm -r` then removed, all before the listing):
                // nothing the container did since.
                let recreate = match sh.next_from {
                    Some(Some(is_dir)) => !is_dir,
                    Some(None) => !w.scanned,
                    None => !w.scanned || st.is_some(),
                };
                if !recreate {
                    return;
                }
            }
        }
        let mut looked_up = None;
        let kind = match &st {
            Some(st) => self.classify(n, name, st),
            // A non-directory exchanged in for a directory (which leaves the same name right
            // after) is the whiteout of an `rmdir` (`ovl_cleanup_and_whiteout`).
            None if via == Some(Via::MovedTo) && !ev_is_dir && sh.next_from == Some(Some(true)) => {
                EntryKind::Whiteout
            }
            None => {
                let raw = known.map_or(Prior::Absent, |e| e.prior());
                let lower_visible =
                    if raw == Prior::Absent && via == Some(Via::MovedTo) && !ev_is_dir {
                        let l = self.lower_lookup(n, name);
                        looked_up = Some(l);
                        l.is_some()
                    } else {
                        false
                    };
                overlay::infer_kind(ev_is_dir, via.unwrap_or(Via::Create), raw, lower_visible)
            }
        };
        let (prior, old_child) = self.prior(n, name, st.map(|s| (s.ino, kind)));
        let lower = match looked_up {
            Some(l) => l,
            None if overlay::appear_needs_lower(prior) => self.lower_lookup(n, name),
            None => None,
        };
        let verdict = overlay::appear(kind, prior, lower.as_ref().map(Stat::is_dir), origin);
        if origin == Origin::Event {
            self.entries_changed(n);
        }
        let path = self.child_path(n, name);
        match verdict {
            Appear::Nothing => {
                if !kind.is_real() {
                    let mut entry = Entry::new(kind, st.map_or(0, |s| s.ino));
                    entry.scanned = origin == Origin::Scan;
                    self.set_entry(n, name, entry);
                }
            }
            Appear::Delete { is_dir } => {
                if is_dir {
                    let old = known
                        .filter(|e| e.kind.is_dir())
                        .unwrap_or_else(|| Entry::new(EntryKind::Dir, 0));
                    self.report_vanished(sh, n, name, old);
                }
                self.emit(sh, FileKind::Delete, path, is_dir, source);
                self.displace(old_child);
                let mut entry = Entry::new(kind, st.map_or(0, |s| s.ino));
                entry.scanned = origin == Origin::Scan;
                self.set_entry(n, name, entry);
            }
            Appear::CopyUp => {
                if let Some(d) = self.nd_mut(n) {
                    d.overlay_touched = true;
                }
                let mut entry = Entry::from_stat(kind, st);
                if kind.is_dir() {
                    let baseline = lower.map(|l| l.meta());
                    let ino = st.map(|s| s.ino);
                    let attached = self.attach(sh, n, name, ScanMode::Report, baseline, ino);
                    if let Attached::New(c) = attached {
                        // A copy-up is never opaque: the image's directories merge here.
                        // Taken from the image, not from the directory's xattrs, in case what
                        // was opened is already the one overlayfs exchanged in to remove it.
                        let merged = self.child_lower(n, name);
                        if let Some(d) = self.nd_mut(c) {
                            d.lower = Some(merged);
                        }
                    }
                    entry.child = attached.node();
                } else if origin == Origin::Scan {
                    let change = st
                        .zip(lower)
                        .and_then(|(u, l)| overlay::copy_up_change(&u.meta(), &l.meta()));
                    if let Some(k) = change {
                        self.emit(sh, k, path, false, source);
                        if k == FileKind::Modify {
                            entry.burst_ms = sh.now_ms();
                        }
                    }
                }
                self.set_entry(n, name, entry);
            }
            Appear::Replace => {
                let mut entry = Entry::from_stat(kind, st);
                if kind.is_dir() {
                    // The empty opaque directory of `ovl_clear_empty`.
                    if let Some(old) = known {
                        self.emptied(sh, n, name, old);
                    }
                    self.displace(old_child);
                    entry.emptied = true;
                    let ino = st.map(|s| s.ino);
                    entry.child = self.attach(sh, n, name, ScanMode::Report, None, ino).node();
                } else {
                    self.displace(old_child);
                    self.emit(sh, FileKind::Modify, path, false, source);
                    entry.burst_ms = sh.now_ms();
                }
                self.set_entry(n, name, entry);
            }
            Appear::Recreate { old_is_dir } => {
                self.emit(sh, FileKind::Delete, path.clone(), old_is_dir, source);
                self.displace(old_child);
                self.create(sh, n, name, kind, st, path, source);
            }
            Appear::Create => self.create(sh, n, name, kind, st, path, source),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn create(
        &mut self,
        sh: &mut Shared,
        n: NodeId,
        name: &[u8],
        kind: EntryKind,
        st: Option<Stat>,
        path: Vec<u8>,
        source: Source,
    ) {
        let mut entry = Entry::from_stat(kind, st);
        if kind.is_dir() {
            let attached = self.attach(sh, n, name, ScanMode::Report, None, st.map(|s| s.ino));
            entry.child = attached.node();
            match attached {
                Attached::Adopted {
                    old_path: Some(old),
                    ..
                } => {
                    let ev = self.file_event(FileKind::Rename, path, Some(old), true, source);
                    sh.out.push(Some(ev));
                }
                Attached::Adopted { old_path: None, .. } => {}
                Attached::New(_) | Attached::Failed => {
                    self.emit(sh, FileKind::Create, path, true, source);
                }
            }
        } else {
            self.emit(sh, FileKind::Create, path, false, source);
        }
        self.set_entry(n, name, entry);
    }

    #[allow(clippy::too_many_arguments)]
    fn on_moved_from(
        &mut self,
        sh: &mut Shared,
        n: NodeId,
        name: &[u8],
        cookie: u32,
        is_dir: bool,
        stale: bool,
        exchanged: Option<Option<Entry>>,
    ) {
        let st = if stale {
            None
        } else {
            self.stat_child(n, name)
        };
        let known = self.nd(n).and_then(|d| d.entries.get(name)).copied();
        if let (Some(Some(old)), Some(now)) = (exchanged, known) {
            let back = st.is_some_and(|s| old.ino != 0 && s.ino == old.ino);
            if is_dir && old.kind.is_dir() && now.kind.is_dir() && old.same_object(&now) && !back {
                // A directory left right after an unpaired IN_MOVED_TO of a directory at its
                // name that the index took for the known one (it could not be looked at:
                // stale, or already replaced): that was overlayfs exchanging an empty opaque
                // directory in, and this is the known one leaving for the workdir.
                self.exchanged_out(sh, n, name, cookie, old, st.filter(Stat::is_dir));
                return;
            }
        }
        if let Some(displaced) = exchanged {
            // Right after an unpaired IN_MOVED_TO of the same name that replaced something:
            // if what it put there is still there, overlayfs exchanged a new object in (a
            // re-created directory, an empty opaque one, a whiteout) and this is the old
            // one leaving, already accounted for by that IN_MOVED_TO. Overlayfs exchanges
            // only when a directory is involved, and the container cannot rename a whiteout:
            // when the event's kind is that of the replaced entry and not that of the new
            // one, or the new one is a whiteout, it is surely the replaced one leaving,
            // whatever is there now (it may be gone already: `rm -r` runs ahead).
            let leaving_is_old = match (displaced, known) {
                (_, Some(e)) if !e.kind.is_real() => true,
                (Some(d), Some(e)) => d.kind.is_dir() == is_dir && e.kind.is_dir() != is_dir,
                _ => false,
            };
            let still_there = match (st, known) {
                (Some(s), Some(e)) => e.ino == 0 || s.ino == e.ino,
                (None, _) => stale,
                (Some(_), None) => false,
            };
            if leaving_is_old || still_there {
                let old_path = self.child_path(n, name);
                let child_serial = displaced.and_then(|e| self.serial_of(e.child)).unwrap_or(0);
                let pm = PendingMove::new(displaced, child_serial, old_path);
                self.moves.push(cookie, pm);
                return;
            }
        }
        let entry = match known {
            // The indexed object is still there: what left is the object it replaced in an
            // exchange (its IN_MOVED_TO came first), already accounted for.
            Some(e) if st.is_some_and(|s| e.ino != 0 && s.ino == e.ino) => None,
            Some(_) => self.nd_mut(n).and_then(|d| d.entries.remove(name)),
            None => None,
        };
        self.entries_changed(n);
        let real = entry.filter(|e| e.kind.is_real());
        if real.is_some() {
            // Renaming an entry the image also has leaves a whiteout behind, without an
            // event (RENAME_WHITEOUT).
            let left = match st {
                Some(s) if self.classify(n, name, &s) == EntryKind::Whiteout => Some(s.ino),
                None if self.lower_lookup(n, name).is_some() => Some(0),
                _ => None,
            };
            if let Some(ino) = left {
                self.set_entry(n, name, Entry::new(EntryKind::Whiteout, ino));
            }
        }
        let old_path = self.child_path(n, name);
        let slot = real.map(|e| {
            self.emit(
                sh,
                FileKind::Delete,
                old_path.clone(),
                e.kind.is_dir(),
                Source::Inotify,
            )
        });
        let mut child_serial = 0;
        if let Some(c) = entry.map(|e| e.child).filter(|&c| c != NO_NODE) {
            if let Some(cd) = self.nd_mut(c).filter(|cd| cd.state == NodeState::Attached) {
                cd.state = NodeState::InFlight;
                child_serial = cd.serial;
            }
        }
        let pm = PendingMove::new(entry, child_serial, old_path);
        self.moves.push(cookie, PendingMove { slot, ..pm });
    }

    /// The second half of `ovl_clear_empty`'s exchange, recognised only now (see
    /// [`Self::on_moved_from`]): the directory `old` left `name` of `n`, an empty opaque
    /// one is there instead. Waits as a pending move in case a partner comes after all (a
    /// rename of `old`: its deletes are then withdrawn).
    fn exchanged_out(
        &mut self,
        sh: &mut Shared,
        n: NodeId,
        name: &[u8],
        cookie: u32,
        old: Entry,
        now: Option<Stat>,
    ) {
        let child_serial = self
            .serial_of(old.child)
            .filter(|_| self.valid_child(n, name, old.child))
            .unwrap_or(0);
        let vanished = self.emptied(sh, n, name, old);
        let mut entry = Entry::new(EntryKind::Dir, now.map_or(0, |s| s.ino));
        entry.emptied = true;
        if let Some(s) = now {
            entry.child = self
                .attach(sh, n, name, ScanMode::Report, None, Some(s.ino))
                .node();
        }
        self.set_entry(n, name, entry);
        self.entries_changed(n);
        let old_path = self.child_path(n, name);
        let pm = PendingMove::new(Some(old), child_serial, old_path);
        self.moves.push(cookie, PendingMove { vanished, ..pm });
    }

    fn on_moved_to(
        &mut self,
        sh: &mut Shared,
        n: NodeId,
        name: &[u8],
        cookie: u32,
        is_dir: bool,
        stale: bool,
    ) {
        let st = self.event_stat(n, name, is_dir, Via::MovedTo, stale);
        let Some(pm) = self.moves.take(cookie) else {
            self.appear(sh, n, name, st, is_dir, Some(Via::MovedTo), Source::Inotify);
            return;
        };
        Self::withdraw(sh, pm.vanished.clone());
        let now_kind = st.map(|s| self.classify(n, name, &s));
        let moving = pm.entry.map_or(Prior::Absent, |e| e.prior());
        self.entries_changed(n);
        let moving_child = pm
            .entry
            .map(|e| e.child)
            .filter(|&c| c != NO_NODE && self.serial_of(c) == Some(pm.child_serial));
        let (_, old_child) = self.prior(n, name, None);
        if old_child != NO_NODE && Some(old_child) != moving_child {
            // Renamed over an existing directory (or exchanged with it).
            self.displace(old_child);
        }
        if !overlay::rename_is_visible(moving, now_kind) {
            // Overlayfs moving a whiteout out of the way: bookkeeping only.
            if let Some(c) = moving_child {
                self.remove_subtree(sh, c);
            }
            Self::withdraw(sh, pm.captured);
            self.set_entry(
                n,
                name,
                Entry::new(EntryKind::Whiteout, st.map_or(0, |s| s.ino)),
            );
            return;
        }
        // A listing of this (new) directory already found and reported the very object that
        // moved in (its watch came before the rename, its listing after): its arrival is
        // told; only its departure is left, the tentative `delete` of the old path.
        let listed = self.nd(n).and_then(|d| d.entries.get(name)).copied();
        if !is_dir
            && listed.is_some_and(|e| {
                e.kind.is_real()
                    && !e.kind.is_dir()
                    && e.ino != 0
                    && st.is_some_and(|s| s.ino == e.ino)
            })
        {
            Self::withdraw(sh, pm.captured);
            if pm.slot.is_none() {
                if let Some(e) = pm.entry.filter(|e| e.kind.is_real()) {
                    self.emit(
                        sh,
                        FileKind::Delete,
                        pm.old_path,
                        e.kind.is_dir(),
                        Source::Inotify,
                    );
                }
            }
            return;
        }
        let path = self.child_path(n, name);
        let fallback = if is_dir {
            EntryKind::Dir
        } else {
            EntryKind::File
        };
        let mut entry = pm
            .entry
            .unwrap_or_else(|| Entry::new(now_kind.unwrap_or(fallback), 0));
        if let (Some(s), Some(k)) = (st, now_kind) {
            entry.ino = s.ino;
            entry.kind = k;
        }
        entry.burst_ms = 0;
        entry.child = NO_NODE;
        if entry.kind.is_dir() {
            entry.child = match moving_child {
                Some(c) => {
                    self.reparent(c, n, name);
                    c
                }
                None => {
                    let ino = st.map(|s| s.ino);
                    self.attach(sh, n, name, ScanMode::Report, None, ino).node()
                }
            };
        } else if let Some(c) = moving_child {
            self.remove_subtree(sh, c);
        }
        let is_dir = entry.kind.is_dir();
        self.set_entry(n, name, entry);
        self.complete_move(sh, pm, path, is_dir);
    }

    /// A pending move met its partner at `new_path`: what was captured while it was in
    /// flight follows it, and its tentative `delete` (if it placed one) becomes the `rename`
    /// (else the `rename` is appended).
    fn complete_move(&self, sh: &mut Shared, pm: PendingMove, new_path: Vec<u8>, is_dir: bool) {
        Self::rewrite_captured(sh, &pm.captured, &pm.old_path, &new_path);
        let ev = self.file_event(
            FileKind::Rename,
            new_path,
            Some(pm.old_path),
            is_dir,
            Source::Inotify,
        );
        match pm.slot.and_then(|i| sh.out.get_mut(i)) {
            Some(slot) => *slot = Some(ev),
            None => sh.out.push(Some(ev)),
        }
    }

    fn on_delete(&mut self, sh: &mut Shared, n: NodeId, name: &[u8], is_dir: bool) {
        self.entries_changed(n);
        let entry = self.nd_mut(n).and_then(|d| d.entries.remove(name));
        let prior = entry.map_or(Prior::Absent, |e| e.prior());
        if let Some(is_dir) = overlay::disappear(prior, is_dir) {
            let path = self.child_path(n, name);
            self.emit(sh, FileKind::Delete, path, is_dir, Source::Inotify);
        }
        if let Some(c) = entry.map(|e| e.child).filter(|&c| c != NO_NODE) {
            if self
                .nd(c)
                .is_some_and(|cd| cd.parent == n && cd.state == NodeState::Attached)
            {
                self.remove_subtree(sh, c);
            }
        }
    }

    fn on_modify(&mut self, sh: &mut Shared, n: NodeId, name: &[u8]) {
        let now = sh.now_ms();
        let Some(d) = self.nd_mut(n) else { return };
        if !d.entries.contains_key(name) {
            d.entries
                .insert(name.into(), Entry::new(EntryKind::File, 0));
        }
        let Some(e) = d.entries.get_mut(name) else {
            return;
        };
        if !e.kind.is_real() || e.kind.is_dir() || !rules::modify_due(e.burst_ms, now) {
            return;
        }
        e.burst_ms = now;
        let path = rules::join(&d.path, name);
        self.emit(sh, FileKind::Modify, path, false, Source::Inotify);
    }

    /// `read_gen`: the number of the read that brought the event.
    fn on_close_write(&mut self, n: NodeId, name: &[u8], read_gen: u32) {
        let Some(e) = self.nd_mut(n).and_then(|d| d.entries.get_mut(name)) else {
            return;
        };
        e.burst_ms = 0;
        // The stamp is refreshed so that a resync after an overflow does not report this
        // write again; a stat taken after this event was read (the file's `create` in the
        // same read, typically) is already fresh enough.
        if e.stamp.is_some() && e.ino != 0 && e.stamp_gen.wrapping_sub(read_gen) < u32::MAX / 2 {
            return;
        }
        let st = self.stat_child(n, name);
        if let Some(e) = self.nd_mut(n).and_then(|d| d.entries.get_mut(name)) {
            if let Some(s) = st.filter(|s| s.ino == e.ino || e.ino == 0) {
                e.ino = s.ino;
                e.set_stamp(s);
            }
        }
    }

    fn on_attrib(&mut self, sh: &mut Shared, n: NodeId, name: &[u8], is_dir: bool, stale: bool) {
        let known = self.nd(n).and_then(|d| d.entries.get(name)).copied();
        match known {
            Some(e) if !e.kind.is_real() => {}
            Some(e) if e.kind.is_dir() && self.valid_child(n, name, e.child) => {
                self.dir_attrib(sh, e.child);
            }
            // An unwatched directory about to be replaced (overlayfs copied it up, and is
            // already removing it): its attributes are overlay bookkeeping.
            Some(e) if e.kind.is_dir() && stale => {}
            _ => {
                let path = self.child_path(n, name);
                self.emit(sh, FileKind::Attrib, path, is_dir, Source::Inotify);
                if !is_dir {
                    let st = self.stat_child(n, name);
                    if let Some(e) = self.nd_mut(n).and_then(|d| d.entries.get_mut(name)) {
                        if let Some(s) = st.filter(|s| s.ino == e.ino) {
                            e.set_stamp(s);
                        }
                    }
                }
            }
        }
    }

    /// `IN_ATTRIB` on a watched directory (seen both from its parent and from itself):
    /// reported only when the container could see a change ([`overlay::dir_attrib`]). An
    /// mtime-only change is placed in the output now and decided when the queue is drained
    /// ([`Self::settle`]): withdrawn if an entry change of the directory came after it.
    fn dir_attrib(&mut self, sh: &mut Shared, m: NodeId) {
        if !self.ensure_fd(m) {
            return;
        }
        let Some(st) = self.fd_of(m).and_then(|fd| sys::stat_fd(fd).ok()) else {
            return;
        };
        let Some(d) = self.nd_mut(m) else { return };
        let verdict =
            overlay::dir_attrib(&d.baseline, &st.meta(), d.overlay_touched, d.mtime_stale);
        d.baseline = st.meta();
        d.overlay_touched = false;
        d.mtime_stale = false;
        if verdict == DirAttrib::Hidden {
            return;
        }
        let (path, serial) = (rules::dir_path(&d.path), d.serial);
        let slot = self.emit(sh, FileKind::Attrib, path, true, Source::Inotify);
        if verdict == DirAttrib::MtimeOnly {
            self.mtime_attribs.push(serial, slot);
        }
    }

    /// Entries of node `n` were created, removed or renamed: its mtime moved without an
    /// `IN_ATTRIB`, which explains the mtime of a directory `attrib` still waiting.
    fn entries_changed(&mut self, n: NodeId) {
        if let Some(d) = self.nd_mut(n) {
            d.mtime_stale = true;
            let serial = d.serial;
            self.mtime_attribs.entries_changed(serial);
        }
    }

    // ----- batch boundaries -------------------------------------------------------------

    /// Cancels outputs already placed.
    fn withdraw(sh: &mut Shared, slots: impl IntoIterator<Item = usize>) {
        for i in slots {
            if let Some(slot) = sh.out.get_mut(i) {
                *slot = None;
            }
        }
    }

    /// Outputs set aside while a directory was in flight now carry its new path.
    fn rewrite_captured(sh: &mut Shared, captured: &[usize], old: &[u8], new: &[u8]) {
        let move_path = |p: &mut Vec<u8>| {
            if p.starts_with(old) && p.get(old.len()) == Some(&b'/') {
                let mut q = new.to_vec();
                q.extend_from_slice(&p[old.len()..]);
                *p = q;
            }
        };
        for &i in captured {
            if let Some(Some(WatchOutput::File(f))) = sh.out.get_mut(i) {
                move_path(&mut f.path);
                if let Some(o) = f.old_path.as_mut() {
                    move_path(o);
                }
            }
        }
    }

    /// Settles what waited for later events: unpaired `IN_MOVED_FROM` halves are deletes
    /// (their tentative `delete` stays in the output), displaced directories are gone,
    /// directory `attrib`s that a later entry change explains are withdrawn.
    pub fn settle(&mut self, sh: &mut Shared) {
        Self::withdraw(sh, self.mtime_attribs.settle());
        let pending: Vec<PendingMove> = self.moves.drain().collect();
        for pm in pending {
            Self::withdraw(sh, pm.captured.iter().copied());
            let child = pm.entry.map_or(NO_NODE, |e| e.child);
            if child != NO_NODE && self.serial_of(child) == Some(pm.child_serial) {
                self.remove_subtree(sh, child);
            }
        }
        for (m, serial) in std::mem::take(&mut self.displaced) {
            if self
                .nd(m)
                .is_some_and(|d| d.serial == serial && d.state == NodeState::Displaced)
            {
                self.remove_subtree(sh, m);
            }
        }
    }

    /// End of a `read_events` call: settle, and list directories whose listing had to wait.
    pub fn finish(&mut self, sh: &mut Shared) {
        self.settle(sh);
        for (m, serial) in std::mem::take(&mut self.deferred) {
            if self.serial_of(m) == Some(serial) {
                self.to_list.push(m);
            }
        }
        self.process_listings(sh);
        self.limit_reported = false;
        self.fd_limit_reported = false;
    }

    /// After a queue overflow: compare everything with the index.
    pub fn rescan(&mut self, sh: &mut Shared) {
        let root = self.root;
        if let Some(d) = self.nd_mut(root) {
            d.scan = Some(ScanMode::Diff);
            self.to_list.push(root);
        }
        self.process_listings(sh);
    }
}

impl DirNode {
    fn new(
        serial: u64,
        wd: Option<i32>,
        parent: NodeId,
        name: Box<[u8]>,
        path: Vec<u8>,
        st: &Stat,
    ) -> DirNode {
        DirNode {
            serial,
            wd,
            parent,
            name,
            path,
            ino: st.ino,
            state: NodeState::Attached,
            entries: HashMap::new(),
            lower: None,
            upper_xwhiteouts: false,
            baseline: st.meta(),
            overlay_touched: false,
            mtime_stale: false,
            fd: None,
            fd_used: false,
            scan: None,
        }
    }
}

/// What an image layer entry is (xattr whiteouts only in directories marked `opaque=x`).
fn lower_kind(dir: BorrowedFd<'_>, name: &[u8], st: &Stat, xwhiteouts: bool) -> EntryKind {
    let mut buf = [0u8; 16];
    let x = overlay::needs_whiteout_xattr(st.mode, st.size, xwhiteouts)
        && sys::xattr_at(dir, name, &overlay::WHITEOUT_XATTRS, &mut buf)
            .ok()
            .flatten()
            .is_some();
    overlay::classify(st.mode, st.rdev, x)
}
