//! One armed container, reduced to dispatch: its state (the tree of directories, the index,
//! fd cache, pending moves, waiting `attrib`s) and the routing of each raw inotify event on
//! its upperdir to what handles it ([`super::tree`], [`super::scan`], [`super::appear`],
//! [`super::moves`], [`super::outbox`]).
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

use std::collections::VecDeque;

use crate::event::{FileKind, Source};
use crate::overlay::{self, EntryKind, Prior, Via};

use super::appear::FoundBy;
use super::fds::SharedBudget;
use super::fs::{Dir, SharedFs};
use super::index::{Entry, Ino};
use super::moves::Moves;
use super::moves::PendingMove;
use super::outbox::MtimeAttribs;
use super::rules::{self, RawEvent};
use super::scan::ScanMode;
use super::shared::{Shared, WdOwner};
use super::sys::Stat;
use super::tree::{DirNode, NodeRef, NodeState, Nodes};
use super::{ArmStats, ContainerLayer};

/// An unpaired `IN_MOVED_TO` that replaced what the index held at its name.
pub(super) struct LastMovedTo {
    pub(super) dir: NodeRef,
    pub(super) name: Box<[u8]>,
    /// The index entry it replaced.
    pub(super) replaced: Entry,
}

/// One inotify event about an entry of a watched directory (or an entry a listing found),
/// as its handlers need it.
#[derive(Clone, Copy, Debug)]
pub(super) struct EventCtx<'a> {
    /// The directory.
    pub(super) dir: NodeRef,
    /// The entry's name in it.
    pub(super) name: &'a [u8],
    /// About a directory (`IN_ISDIR`; for a listing, what the stat said).
    pub(super) is_dir: bool,
    /// The rename cookie (0 for other events).
    pub(super) cookie: u32,
    /// A later event of the same read creates, removes or renames the same name, so what
    /// is there now is not what this event is about.
    pub(super) stale: bool,
}

impl<'a> EventCtx<'a> {
    /// An entry a listing found in `dir`.
    pub(super) fn listed(dir: NodeRef, name: &'a [u8], is_dir: bool) -> EventCtx<'a> {
        EventCtx {
            dir,
            name,
            is_dir,
            cookie: 0,
            stale: false,
        }
    }
}

/// When monitoring of a container began, in wall-clock ns since the epoch, each minus a
/// margin for coarse file-system timestamps.
#[derive(Clone, Copy, Debug)]
pub(super) struct ArmTimes {
    /// Now, when it is armed.
    pub(super) armed_ns: i64,
    /// When the container started, for one armed late (see `add_container_since`).
    pub(super) since_ns: Option<i64>,
}

/// One armed container.
pub(super) struct Container {
    pub(super) key: usize,
    pub(super) id: String,
    /// The upperdir and image layers as the runtime named them (host paths): reopened on
    /// demand, never held for the container's life.
    pub(super) layer: ContainerLayer,
    /// Image layer fds, cached while the fd budget allows (`None`: closed).
    pub(super) lowers: Vec<Option<Dir>>,
    /// The file system (the layers and their watches), shared by every container.
    pub(super) fs: SharedFs,
    /// The fd budget shared by every container (see `fds`).
    pub(super) budget: SharedBudget,
    /// The directories: watched ones, and those indexed without a watch.
    pub(super) nodes: Nodes,
    /// The upperdir's node (`None` before arming, or once its watch is gone).
    pub(super) root: Option<NodeRef>,
    /// Nodes holding a cached fd, in the order considered for eviction (second chance).
    pub(super) ring: VecDeque<NodeRef>,
    /// Directory fds cached (image layers not counted).
    pub(super) open_fds: usize,
    /// Nodes an exchange replaced at their name, removed at the end of the batch unless
    /// they turn up elsewhere.
    pub(super) displaced: Vec<NodeRef>,
    /// Nodes whose listing is due.
    pub(super) to_list: Vec<NodeRef>,
    /// Nodes whose listing had to wait (renamed meanwhile, or no descriptor left): listed
    /// at the end of the call.
    pub(super) deferred: Vec<NodeRef>,
    pub(super) moves: Moves<PendingMove>,
    /// Directory `attrib`s waiting for the end of the drain (mtime changes only).
    pub(super) mtime_attribs: MtimeAttribs,
    /// Directories indexed without a watch because of the watch limit, for
    /// [`Self::retry_unwatched`].
    pub(super) unwatched: Vec<NodeRef>,
    /// The last event was an unpaired `IN_MOVED_TO` that replaced an index entry: an
    /// `IN_MOVED_FROM` of the same name right after is the other half of an exchange.
    pub(super) last_to: Option<LastMovedTo>,
    /// Wall-clock ns when monitoring began (minus a margin for coarse fs timestamps).
    pub(super) armed_ns: i64,
    /// Wall-clock ns when the container started (minus the same margin), when it was armed
    /// late: what the arm-time listing finds made or changed since then is reported.
    pub(super) since_ns: Option<i64>,
    pub(super) limit_reported: bool,
    /// An open failed with EMFILE/ENFILE since [`Self::take_fd_exhaustion`].
    pub(super) fd_exhausted: bool,
    /// An `fd_limit` overflow was reported in this call.
    pub(super) fd_limit_reported: bool,
    pub(super) stats: ArmStats,
}

impl Drop for Container {
    fn drop(&mut self) {
        let lowers = self.lowers.iter().flatten().count();
        self.budget.closed(self.open_fds + lowers);
    }
}

impl Container {
    /// A container whose layer's image directories are open already (`lowers`, in
    /// `layer.lowerdirs` order, each counted in `budget`), on the file system `fs`.
    pub fn new(
        key: usize,
        id: &str,
        layer: ContainerLayer,
        lowers: Vec<Dir>,
        fs: SharedFs,
        budget: SharedBudget,
        times: ArmTimes,
    ) -> Container {
        let ArmTimes { armed_ns, since_ns } = times;
        Container {
            key,
            id: id.to_owned(),
            layer,
            lowers: lowers.into_iter().map(Some).collect(),
            fs,
            budget,
            nodes: Nodes::default(),
            root: None,
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
    pub fn arm(&mut self, shared: &mut Shared, wd: i32, root: &Stat, root_fd: Dir) {
        let serial = shared.next_serial();
        let mut node = DirNode::new(serial, Some(wd), None, Box::default(), Vec::new(), root);
        node.fd = Some(root_fd);
        node.fd_used = true;
        let Some(id) = self.alloc(node, Some(ScanMode::Index)) else {
            return;
        };
        self.root = Some(id);
        shared.wds.insert(
            wd,
            WdOwner {
                container: self.key,
                node: id,
            },
        );
        self.stats.dirs += 1;
        self.process_listings(shared);
        if self.since_ns.is_some() {
            self.recount();
        }
    }

    /// Recomputes `stats` from the index (entries reported at arm time are in it too).
    pub(super) fn recount(&mut self) {
        let mut stats = ArmStats::default();
        for d in self.nodes.iter() {
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
    pub fn wds(&self) -> impl Iterator<Item = (i32, NodeRef)> + '_ {
        self.nodes
            .iter_refs()
            .filter_map(|(r, n)| n.wd.map(|wd| (wd, r)))
    }

    pub fn watch_count(&self) -> usize {
        self.nodes.iter().filter(|n| n.wd.is_some()).count()
    }

    /// How long, at most, to wait for a later event something waits for: a directory
    /// `attrib` for the entry change that would explain its mtime, an unpaired
    /// `IN_MOVED_FROM` of a known entry for its partner; `None` when nothing waits.
    pub fn waiting(&self) -> Option<u64> {
        if self.mtime_attribs.unexplained() {
            Some(super::MTIME_EXPLAIN_WAIT_MS)
        } else if self.moves.iter().any(|m| m.slot.is_some()) {
            Some(super::MOVE_PARTNER_WAIT_MS)
        } else {
            None
        }
    }

    /// The kernel dropped watch `wd` (its directory is gone, or we removed it).
    pub fn on_ignored(&mut self, shared: &mut Shared, wd: i32, owner: WdOwner) {
        shared.wds.remove(&wd);
        let Some(d) = self.node_mut(owner.node) else {
            return;
        };
        d.wd = None;
        if Some(owner.node) != self.root {
            self.remove_subtree(shared, owner.node);
        }
    }

    /// One inotify event on one of this container's watches.
    ///
    /// `stale`: a later event of the same batch creates, removes or renames the same name,
    /// so what is there now is not what this event is about.
    pub(super) fn on_event(
        &mut self,
        shared: &mut Shared,
        owner: WdOwner,
        ev: &RawEvent<'_>,
        stale: bool,
    ) {
        let n = owner.node;
        let last_to = self.last_to.take();
        match self.node(n) {
            Some(d) if d.state != NodeState::Displaced => {}
            _ => return,
        }
        let ctx = EventCtx {
            dir: n,
            name: ev.name,
            is_dir: ev.mask & libc::IN_ISDIR != 0,
            cookie: ev.cookie,
            stale,
        };
        let name = ev.name;
        if name.is_empty() {
            if ev.mask & libc::IN_ATTRIB != 0 {
                self.dir_attrib(shared, n);
            }
            return;
        }
        if ev.mask & libc::IN_CREATE != 0 {
            let st = self.event_stat(&ctx, Via::Create);
            self.appear(shared, &ctx, st, FoundBy::Create);
        } else if ev.mask & libc::IN_MOVED_FROM != 0 {
            let exchanged = last_to
                .filter(|t| t.dir == n && *t.name == *name)
                .map(|t| t.replaced);
            self.on_moved_from(shared, &ctx, exchanged);
        } else if ev.mask & libc::IN_MOVED_TO != 0 {
            self.on_moved_to(shared, &ctx);
        } else if ev.mask & libc::IN_DELETE != 0 {
            self.on_delete(shared, n, name, ctx.is_dir);
        } else if ev.mask & libc::IN_MODIFY != 0 {
            self.on_modify(shared, n, name);
        } else if ev.mask & libc::IN_CLOSE_WRITE != 0 {
            self.on_close_write(n, name, shared.read_gen);
        } else if ev.mask & libc::IN_ATTRIB != 0 {
            self.on_attrib(shared, &ctx);
        }
    }

    /// The stat of the object an event is about, or `None` when what is there now cannot be
    /// it: gone, `stale`, a directory where the event said otherwise (or the reverse), or a
    /// whiteout where something was created (overlayfs only renames whiteouts in).
    pub(super) fn event_stat(&mut self, ev: &EventCtx<'_>, via: Via) -> Option<Stat> {
        if ev.stale {
            return None;
        }
        let st = self.stat_child(ev.dir, ev.name)?;
        let whiteout = st.mode & libc::S_IFMT == libc::S_IFCHR && st.rdev == 0;
        (st.is_dir() == ev.is_dir && !(via == Via::Create && whiteout)).then_some(st)
    }

    /// Handles one event and the listings it caused. Outputs about a directory that is in
    /// flight (moved away, partner not seen yet) are set aside with its pending move.
    pub fn handle(&mut self, shared: &mut Shared, owner: WdOwner, ev: &RawEvent<'_>, stale: bool) {
        let start = shared.out.len();
        let inflight = self.inflight_ancestor(owner.node);
        self.on_event(shared, owner, ev, stale);
        self.process_listings(shared);
        if let Some(m) = inflight {
            let half = self.moves.iter_mut().find(|half| half.moving == Some(m));
            if let Some(half) = half {
                half.captured.extend(start..shared.out.len());
            }
        }
    }

    pub(super) fn on_delete(&mut self, shared: &mut Shared, n: NodeRef, name: &[u8], is_dir: bool) {
        self.entries_changed(n);
        let entry = self.node_mut(n).and_then(|d| d.entries.remove(name));
        let prior = entry.map_or(Prior::Absent, |e| e.prior());
        if let Some(is_dir) = overlay::disappear(prior, is_dir) {
            let path = self.child_path(n, name);
            self.emit(shared, FileKind::Delete, path, is_dir, Source::Inotify);
        }
        if let Some(c) = entry.and_then(|e| e.child) {
            if self
                .node(c)
                .is_some_and(|cd| cd.parent == Some(n) && cd.state == NodeState::Attached)
            {
                self.remove_subtree(shared, c);
            }
        }
    }

    pub(super) fn on_modify(&mut self, shared: &mut Shared, n: NodeRef, name: &[u8]) {
        let now = shared.now_ms();
        let Some(d) = self.node_mut(n) else { return };
        if !d.entries.contains_key(name) {
            d.entries
                .insert(name.into(), Entry::new(EntryKind::File, Ino::Unknown));
        }
        let Some(e) = d.entries.get_mut(name) else {
            return;
        };
        if !e.kind.is_real() || e.kind.is_dir() || !rules::modify_due(e.burst_ms, now) {
            return;
        }
        e.burst_ms = now;
        let path = rules::join(&d.path, name);
        self.emit(shared, FileKind::Modify, path, false, Source::Inotify);
    }

    /// `read_gen`: the number of the read that brought the event.
    pub(super) fn on_close_write(&mut self, n: NodeRef, name: &[u8], read_gen: u32) {
        let Some(e) = self.node_mut(n).and_then(|d| d.entries.get_mut(name)) else {
            return;
        };
        e.burst_ms = 0;
        // The stamp is refreshed so that a resync after an overflow does not report this
        // write again; a stat taken after this event was read (the file's `create` in the
        // same read, typically) is already fresh enough.
        if e.stamp.is_some()
            && e.ino.is_known()
            && e.stamp_gen.wrapping_sub(read_gen) < u32::MAX / 2
        {
            return;
        }
        let st = self.stat_child(n, name);
        if let Some(e) = self.node_mut(n).and_then(|d| d.entries.get_mut(name)) {
            if let Some(s) = st.filter(|s| e.ino.is(s.ino) || !e.ino.is_known()) {
                e.ino = Ino::from_raw(s.ino);
                e.set_stamp(s);
            }
        }
    }

    pub(super) fn on_attrib(&mut self, shared: &mut Shared, ev: &EventCtx<'_>) {
        let (n, name, is_dir, stale) = (ev.dir, ev.name, ev.is_dir, ev.stale);
        let known = self.node(n).and_then(|d| d.entries.get(name)).copied();
        match known {
            Some(e) if !e.kind.is_real() => {}
            Some(e) if e.kind.is_dir() && self.valid_child(n, name, e.child) => {
                if let Some(child) = e.child {
                    self.dir_attrib(shared, child);
                }
            }
            // An unwatched directory about to be replaced (overlayfs copied it up, and is
            // already removing it): its attributes are overlay bookkeeping.
            Some(e) if e.kind.is_dir() && stale => {}
            // A directory without a watched node (it vanished or was replaced before its
            // watch, or was never indexed: made and removed around its parent's listing)
            // that is gone by now: its removal is what the container did, as for a watched
            // one ([`overlay::dir_attrib`]); overlayfs sets xattrs on such directories.
            _ if is_dir
                && !self.stat_child(n, name).is_some_and(|s| {
                    s.is_dir() && known.is_none_or(|e| !e.ino.is_known() || e.ino.is(s.ino))
                }) => {}
            _ => {
                let path = self.child_path(n, name);
                self.emit(shared, FileKind::Attrib, path, is_dir, Source::Inotify);
                if !is_dir {
                    let st = self.stat_child(n, name);
                    if let Some(e) = self.node_mut(n).and_then(|d| d.entries.get_mut(name)) {
                        if let Some(s) = st.filter(|s| e.ino.is(s.ino)) {
                            e.set_stamp(s);
                        }
                    }
                }
            }
        }
    }

    /// Settles what waited for later events: unpaired `IN_MOVED_FROM` halves are deletes
    /// (their tentative `delete` stays in the output), displaced directories are gone,
    /// directory `attrib`s that a later entry change explains are withdrawn.
    pub fn settle(&mut self, shared: &mut Shared) {
        Self::withdraw(shared, self.mtime_attribs.settle());
        let pending: Vec<PendingMove> = self.moves.drain().collect();
        for half in pending {
            Self::withdraw(shared, half.captured.iter().copied());
            if let Some(child) = half.moving {
                self.remove_subtree(shared, child);
            }
        }
        for m in std::mem::take(&mut self.displaced) {
            if self
                .node(m)
                .is_some_and(|d| d.state == NodeState::Displaced)
            {
                self.remove_subtree(shared, m);
            }
        }
    }

    /// Whether [`Self::finish`] has anything to do: the end of every call visits every
    /// container, so it must cost next to nothing for the many that had no event.
    pub fn unfinished(&self) -> bool {
        !self.moves.is_empty()
            || !self.mtime_attribs.is_empty()
            || !self.displaced.is_empty()
            || !self.deferred.is_empty()
            || !self.to_list.is_empty()
            || self.limit_reported
            || self.fd_limit_reported
    }

    /// End of a `read_events` call: settle, and list directories whose listing had to wait.
    pub fn finish(&mut self, shared: &mut Shared) {
        self.settle(shared);
        for m in std::mem::take(&mut self.deferred) {
            if self.node(m).is_some() {
                self.to_list.push(m);
            }
        }
        self.process_listings(shared);
        self.limit_reported = false;
        self.fd_limit_reported = false;
    }

    /// After a queue overflow: compare everything with the index.
    pub fn rescan(&mut self, shared: &mut Shared) {
        if let Some(root) = self.root {
            if let Some(d) = self.node_mut(root) {
                d.scan = Some(ScanMode::Diff);
                self.to_list.push(root);
            }
        }
        self.process_listings(shared);
    }
}
