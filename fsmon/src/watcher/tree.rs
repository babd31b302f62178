//! A container's tree of directories: one [`DirNode`] per watched (or, past a limit, merely
//! indexed) upper directory, in a slab of nodes. A directory that appears is attached
//! (opened beneath its parent, watched, then listed), a known one moved elsewhere is
//! adopted or reparented, one replaced in an exchange is displaced, a gone one is removed
//! with everything below it.
//!
//! Kernel features: inotify(7) (2.6.13), openat2(2) `RESOLVE_*` (5.6).

use std::collections::HashMap;
use std::num::NonZeroU32;

use crate::overlay::Meta;

use super::container::Container;
use super::fs::Dir;
use super::index::{Entry, Ino};
use super::lower::LowerDir;
use super::rules::{self};
use super::scan::ScanMode;
use super::shared::{Shared, WdOwner, MASK};
use super::sys::Stat;

/// A reference to a [`DirNode`]: its slot in the container's [`Nodes`] and the generation
/// of that slot when the node was put there (a slot's generation moves on at every reuse).
/// A reference may outlive its node: once the node is removed, and even when its slot holds
/// another node, it resolves to nothing. 8 bytes, and so is an `Option<NodeRef>`: the index
/// holds one per directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct NodeRef {
    slot: u32,
    generation: NonZeroU32,
}

/// One place of the slab.
struct Slot {
    generation: NonZeroU32,
    node: Option<DirNode>,
}

/// The slab of a container's directory nodes.
#[derive(Default)]
pub(super) struct Nodes {
    slots: Vec<Slot>,
    free: Vec<u32>,
}

impl Nodes {
    /// The node `r` refers to, if it is still there.
    pub(super) fn get(&self, r: NodeRef) -> Option<&DirNode> {
        let slot = self.slots.get(usize::try_from(r.slot).ok()?)?;
        slot.node
            .as_ref()
            .filter(|_| slot.generation == r.generation)
    }

    pub(super) fn get_mut(&mut self, r: NodeRef) -> Option<&mut DirNode> {
        let slot = self.slots.get_mut(usize::try_from(r.slot).ok()?)?;
        slot.node
            .as_mut()
            .filter(|_| slot.generation == r.generation)
    }

    /// Stores `node`; `None` only when the slab cannot grow (2^32 nodes).
    fn insert(&mut self, node: DirNode) -> Option<NodeRef> {
        let (slot, generation) = match self.free.pop() {
            Some(i) => {
                let slot = self.slots.get_mut(usize::try_from(i).ok()?)?;
                // Wrapping after 2^32 - 1 reuses of one slot: a reference kept that long
                // is not to be expected.
                let next = slot.generation.get().wrapping_add(1);
                slot.generation = NonZeroU32::new(next).unwrap_or(NonZeroU32::MIN);
                slot.node = Some(node);
                (i, slot.generation)
            }
            None => {
                let i = u32::try_from(self.slots.len()).ok()?;
                self.slots.push(Slot {
                    generation: NonZeroU32::MIN,
                    node: Some(node),
                });
                (i, NonZeroU32::MIN)
            }
        };
        Some(NodeRef { slot, generation })
    }

    /// Removes the node `r` refers to, freeing its slot.
    fn remove(&mut self, r: NodeRef) -> Option<DirNode> {
        self.get(r)?;
        let node = self
            .slots
            .get_mut(usize::try_from(r.slot).ok()?)?
            .node
            .take();
        self.free.push(r.slot);
        node
    }

    /// Every node, in slot order.
    pub(super) fn iter(&self) -> impl Iterator<Item = &DirNode> {
        self.slots.iter().filter_map(|s| s.node.as_ref())
    }

    /// Every node with a reference to it, in slot order.
    pub(super) fn iter_refs(&self) -> impl Iterator<Item = (NodeRef, &DirNode)> {
        (0u32..).zip(&self.slots).filter_map(|(slot, s)| {
            let d = s.node.as_ref()?;
            let generation = s.generation;
            Some((NodeRef { slot, generation }, d))
        })
    }

    /// Number of slots: no chain of parents is longer (a guard against cycles).
    pub(super) fn capacity(&self) -> usize {
        self.slots.len()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NodeState {
    /// In the tree at `parent`/`name`.
    Attached,
    /// Its `IN_MOVED_FROM` came; waiting for the `IN_MOVED_TO`.
    InFlight,
    /// Replaced at its name by another object through an exchange; dropped at the end of
    /// the batch unless it turns up again (events on it are ignored meanwhile).
    Displaced,
}

/// A watched (or, past the watch limit, merely indexed) upper directory.
pub(super) struct DirNode {
    pub(super) serial: u64,
    pub(super) wd: Option<i32>,
    /// `None` for the upperdir itself.
    pub(super) parent: Option<NodeRef>,
    pub(super) name: Box<[u8]>,
    /// Container path, `b""` for the root.
    pub(super) path: Vec<u8>,
    pub(super) ino: u64,
    pub(super) state: NodeState,
    pub(super) entries: HashMap<Box<[u8]>, Entry>,
    /// Image layer directories merged here, computed on first need (`None`: not yet).
    pub(super) lower: Option<Vec<LowerDir>>,
    /// The upper directory itself is marked `opaque=x`.
    pub(super) upper_xwhiteouts: bool,
    /// Attributes the container last saw, for `IN_ATTRIB` filtering.
    pub(super) baseline: Meta,
    /// Overlayfs copied something up into this directory since the last `IN_ATTRIB`.
    pub(super) overlay_touched: bool,
    /// Entries were added or removed since `baseline` was taken.
    pub(super) mtime_stale: bool,
    /// `O_PATH` fd, cached (see `Container::ensure_fd`).
    pub(super) fd: Option<Dir>,
    pub(super) fd_used: bool,
    /// A listing still to do.
    pub(super) scan: Option<ScanMode>,
}

/// Result of watching a directory that appeared.
pub(super) enum Attached {
    /// A new node (listing queued).
    New(NodeRef),
    /// The directory was already watched: a known node moved here. `old_path` is where
    /// the container last saw it, unless that rename was already reported.
    Adopted {
        node: NodeRef,
        old_path: Option<Vec<u8>>,
    },
    /// Could not be opened (gone, or no longer a directory): its events will tell.
    Failed,
}

impl Attached {
    pub(super) fn node(&self) -> Option<NodeRef> {
        match self {
            Attached::New(n) | Attached::Adopted { node: n, .. } => Some(*n),
            Attached::Failed => None,
        }
    }
}

impl Container {
    /// The node `n` refers to, if it is still there.
    pub(super) fn node(&self, n: NodeRef) -> Option<&DirNode> {
        self.nodes.get(n)
    }

    pub(super) fn node_mut(&mut self, n: NodeRef) -> Option<&mut DirNode> {
        self.nodes.get_mut(n)
    }

    /// Adds a node (its listing queued when `scan` says so).
    pub(super) fn alloc(&mut self, mut node: DirNode, scan: Option<ScanMode>) -> Option<NodeRef> {
        node.scan = scan;
        let has_fd = node.fd.is_some();
        let id = self.nodes.insert(node)?;
        if has_fd {
            self.open_fds += 1;
            self.budget.opened();
            self.ring.push_back(id);
        }
        if scan.is_some() {
            self.to_list.push(id);
        }
        Some(id)
    }

    /// The node `child` as the directory `name` of `parent`, if it is that.
    pub(super) fn valid_child(&self, parent: NodeRef, name: &[u8], child: Option<NodeRef>) -> bool {
        child.and_then(|c| self.node(c)).is_some_and(|c| {
            c.parent == Some(parent) && *c.name == *name && c.state == NodeState::Attached
        })
    }

    pub(super) fn child_path(&self, n: NodeRef, name: &[u8]) -> Vec<u8> {
        rules::join(self.node(n).map_or(&[][..], |d| &d.path), name)
    }

    /// Watches the directory `name` of `parent` (watch first; the listing is queued).
    /// `expect`: the inode the caller saw there; another directory found instead is not
    /// attached (it came later, and its own events will tell; attaching it to this entry
    /// would describe the wrong object).
    pub(super) fn attach(
        &mut self,
        shared: &mut Shared,
        parent: NodeRef,
        name: &[u8],
        mode: ScanMode,
        baseline: Option<Meta>,
        expect: Ino,
    ) -> Attached {
        if !self.ensure_fd(parent) {
            return Attached::Failed;
        }
        let Some(pfd) = self.fd_of(parent) else {
            return Attached::Failed;
        };
        let cfd = match self.fs.open_child_dir(pfd, name, false) {
            Ok(fd) => fd,
            Err(e) if crate::limits::is_fd_exhaustion(&e) => {
                return self.attach_without_fd(shared, parent, name, baseline, expect);
            }
            Err(e) => {
                // ENOENT: gone again; ENOTDIR/ELOOP: replaced by a file or a symlink. Either
                // way its own events follow, and nothing is followed.
                tracing::trace!(container_id = %self.id, error = %e, "directory vanished before its watch");
                return Attached::Failed;
            }
        };
        // Watch first, then the `stat` that later `IN_ATTRIB`s are compared with: an entry
        // change between the two then raises an event that explains the mtime moving (a
        // baseline taken before the watch made overlayfs' xattr `attrib` look like a touch).
        let mut limited = false;
        let mut wd = match self.fs.add_watch(&cfd, MASK) {
            Ok(wd) => Some(wd),
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                limited = true;
                None
            }
            Err(e) => {
                tracing::warn!(container_id = %self.id, error = %e, "cannot watch a directory");
                None
            }
        };
        let owner = wd.and_then(|w| shared.wds.get(&w).copied());
        let cst = match self.fs.stat_dir(&cfd) {
            Ok(st) if !expect.is_known() || expect.is(st.ino) => st,
            found => {
                if found.is_ok() {
                    tracing::trace!(container_id = %self.id, "directory replaced before its watch");
                }
                if let (Some(w), None) = (wd, owner) {
                    self.fs.rm_watch(w);
                }
                return Attached::Failed;
            }
        };
        if limited {
            self.watch_limit(shared);
        }
        if let Some(owner) = owner {
            if owner.container == self.key && self.node(owner.node).is_some() {
                return self.adopt(shared, owner.node, parent, name, cfd);
            }
            // Watched for another container (a host moved a directory from one upperdir
            // to another): leave that watch alone and only index it here.
            wd = None;
        }
        let serial = shared.next_serial();
        let path = self.child_path(parent, name);
        let mut node = DirNode::new(serial, wd, Some(parent), name.into(), path, &cst);
        if let Some(b) = baseline {
            node.baseline = b;
        }
        node.fd = Some(cfd);
        node.fd_used = true;
        let Some(id) = self.alloc(node, Some(mode)) else {
            if let Some(w) = wd {
                self.fs.rm_watch(w);
            }
            return Attached::Failed;
        };
        match wd {
            Some(w) => {
                shared.wds.insert(
                    w,
                    WdOwner {
                        container: self.key,
                        node: id,
                    },
                );
            }
            None => {
                self.stats.unwatched_dirs += 1;
                if limited {
                    self.unwatched.push(id);
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
    pub(super) fn attach_without_fd(
        &mut self,
        shared: &mut Shared,
        parent: NodeRef,
        name: &[u8],
        baseline: Option<Meta>,
        expect: Ino,
    ) -> Attached {
        self.fd_exhausted = true;
        self.fd_limit(shared);
        let Some(cst) = self
            .fd_of(parent)
            .and_then(|p| self.fs.stat_at(p, name).ok())
        else {
            return Attached::Failed;
        };
        if !cst.is_dir() || expect.is_known() && !expect.is(cst.ino) {
            return Attached::Failed;
        }
        let serial = shared.next_serial();
        let path = self.child_path(parent, name);
        let mut node = DirNode::new(serial, None, Some(parent), name.into(), path, &cst);
        if let Some(b) = baseline {
            node.baseline = b;
        }
        let Some(id) = self.alloc(node, None) else {
            return Attached::Failed;
        };
        self.stats.unwatched_dirs += 1;
        self.unwatched.push(id);
        Attached::New(id)
    }

    /// A directory that appeared at `parent`/`name` is already watched as node `m`: move
    /// the node there.
    pub(super) fn adopt(
        &mut self,
        shared: &mut Shared,
        m: NodeRef,
        parent: NodeRef,
        name: &[u8],
        fd: Dir,
    ) -> Attached {
        let Some(d) = self.node(m) else {
            return Attached::Failed;
        };
        let (state, old_parent, old_name, old_path) =
            (d.state, d.parent, d.name.clone(), rules::dir_path(&d.path));
        if state == NodeState::Attached && old_parent == Some(parent) && old_name[..] == *name {
            return Attached::Adopted {
                node: m,
                old_path: None,
            };
        }
        let old_path = match state {
            NodeState::InFlight => {
                // Its IN_MOVED_FROM waits under a cookie that this event did not carry: pair
                // them by inode.
                let half = self.moves.take_where(|half| half.moving == Some(m));
                match half {
                    Some(half) => {
                        let new_path = self.child_path(parent, name);
                        self.complete_move(shared, half, new_path, true);
                        None
                    }
                    None => Some(old_path),
                }
            }
            NodeState::Displaced => {
                self.displaced.retain(|&x| x != m);
                // An exchange's leaving half may still hold it: it is not leaving after all.
                let half = self.moves.take_where(|half| half.moving == Some(m));
                if let Some(half) = half {
                    Self::withdraw(shared, half.vanished);
                }
                Some(old_path)
            }
            NodeState::Attached => {
                if let Some(op) = old_parent.and_then(|p| self.nodes.get_mut(p)) {
                    if op
                        .entries
                        .get(&old_name)
                        .is_some_and(|e| e.child == Some(m))
                    {
                        op.entries.remove(&old_name);
                    }
                }
                Some(old_path)
            }
        };
        self.reparent(m, parent, name);
        if let Some(d) = self.node_mut(m) {
            if d.fd.is_none() {
                d.fd = Some(fd);
                d.fd_used = true;
                self.open_fds += 1;
                self.budget.opened();
                self.ring.push_back(m);
            }
        }
        Attached::Adopted { node: m, old_path }
    }

    /// Moves node `m` (and the paths of everything below it) to `parent`/`name`.
    pub(super) fn reparent(&mut self, m: NodeRef, parent: NodeRef, name: &[u8]) {
        let path = self.child_path(parent, name);
        if let Some(d) = self.node_mut(m) {
            d.parent = Some(parent);
            d.name = name.into();
            d.state = NodeState::Attached;
        }
        let mut stack = vec![(m, path)];
        while let Some((x, p)) = stack.pop() {
            let Some(d) = self.node_mut(x) else { continue };
            let kids: Vec<(NodeRef, Vec<u8>)> = d
                .entries
                .iter()
                .filter_map(|(k, e)| Some((e.child?, rules::join(&p, k))))
                .collect();
            d.path = p;
            // Which image layers merge here depends on the path.
            d.lower = None;
            for (c, cp) in kids {
                if self
                    .node(c)
                    .is_some_and(|cd| cd.parent == Some(x) && cd.state == NodeState::Attached)
                {
                    stack.push((c, cp));
                }
            }
        }
    }

    /// An exchange put another object at this node's name: keep the node until the end of
    /// the batch in case it shows up elsewhere, ignoring its events meanwhile.
    pub(super) fn displace(&mut self, child: Option<NodeRef>) {
        let Some(child) = child else { return };
        if let Some(d) = self.node_mut(child) {
            if d.state == NodeState::Attached {
                d.state = NodeState::Displaced;
                self.displaced.push(child);
            }
        }
    }

    /// Forgets node `m` and everything below it, removing their watches.
    pub(super) fn remove_subtree(&mut self, shared: &mut Shared, m: NodeRef) {
        if let Some(d) = self.node(m) {
            if d.state == NodeState::Attached {
                let (p, name) = (d.parent, d.name.clone());
                if let Some(pd) = p.and_then(|p| self.nodes.get_mut(p)) {
                    if let Some(e) = pd.entries.get_mut(&name) {
                        if e.child == Some(m) {
                            e.child = None;
                        }
                    }
                }
            }
        }
        let mut stack = vec![m];
        while let Some(x) = stack.pop() {
            let Some(d) = self.nodes.remove(x) else {
                continue;
            };
            if let Some(wd) = d.wd {
                if shared
                    .wds
                    .get(&wd)
                    .is_some_and(|o| o.container == self.key && o.node == x)
                {
                    shared.wds.remove(&wd);
                    self.fs.rm_watch(wd);
                }
            }
            if d.fd.is_some() {
                self.open_fds = self.open_fds.saturating_sub(1);
                self.budget.closed(1);
            }
            for (k, e) in &d.entries {
                if let Some(c) = e.child {
                    if self
                        .node(c)
                        .is_some_and(|c| c.parent == Some(x) && c.name == *k)
                    {
                        stack.push(c);
                    }
                }
            }
            if Some(x) == self.root {
                self.root = None;
            }
        }
    }
}

impl DirNode {
    pub(super) fn new(
        serial: u64,
        wd: Option<i32>,
        parent: Option<NodeRef>,
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
