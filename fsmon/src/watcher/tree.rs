//! A container's tree of directories: one [`DirNode`] per watched (or, past a limit, merely
//! indexed) upper directory, in a slab of nodes. A directory that appears is attached
//! (opened beneath its parent, watched, then listed), a known one moved elsewhere is
//! adopted or reparented, one replaced in an exchange is displaced, a gone one is removed
//! with everything below it.
//!
//! Kernel features: inotify(7) (2.6.13), openat2(2) `RESOLVE_*` (5.6).

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};

use crate::overlay::Meta;

use super::container::Container;
use super::index::Entry;
use super::lower::LowerDir;
use super::rules::{self};
use super::scan::ScanMode;
use super::shared::{Shared, WdOwner, MASK};
use super::sys::{self, Stat};

/// Index of a [`DirNode`] in its container's node table.
pub(super) type NodeId = u32;
/// "No node" (a directory that could not be opened, a non-directory).
pub(super) const NO_NODE: NodeId = u32::MAX;

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
    pub(super) parent: NodeId,
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
    pub(super) fd: Option<OwnedFd>,
    pub(super) fd_used: bool,
    /// A listing still to do.
    pub(super) scan: Option<ScanMode>,
}

/// Result of watching a directory that appeared.
pub(super) enum Attached {
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
    pub(super) fn node(&self) -> NodeId {
        match self {
            Attached::New(n) | Attached::Adopted { node: n, .. } => *n,
            Attached::Failed => NO_NODE,
        }
    }
}

impl Container {
    pub(super) fn nd(&self, n: NodeId) -> Option<&DirNode> {
        self.nodes.get(usize::try_from(n).ok()?)?.as_ref()
    }

    pub(super) fn nd_mut(&mut self, n: NodeId) -> Option<&mut DirNode> {
        self.nodes.get_mut(usize::try_from(n).ok()?)?.as_mut()
    }

    pub(super) fn serial_of(&self, n: NodeId) -> Option<u64> {
        self.nd(n).map(|d| d.serial)
    }

    pub(super) fn alloc(&mut self, mut node: DirNode, scan: Option<ScanMode>) -> Option<NodeId> {
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
    pub(super) fn valid_child(&self, parent: NodeId, name: &[u8], child: NodeId) -> bool {
        child != NO_NODE
            && self.nd(child).is_some_and(|c| {
                c.parent == parent && *c.name == *name && c.state == NodeState::Attached
            })
    }

    pub(super) fn child_path(&self, n: NodeId, name: &[u8]) -> Vec<u8> {
        rules::join(self.nd(n).map_or(&[][..], |d| &d.path), name)
    }

    /// Watches the directory `name` of `parent` (watch first; the listing is queued).
    /// `expect`: the inode the caller saw there; another directory found instead is not
    /// attached (it came later, and its own events will tell; attaching it to this entry
    /// would describe the wrong object).
    pub(super) fn attach(
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
    pub(super) fn attach_without_fd(
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
    pub(super) fn adopt(
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
    pub(super) fn reparent(&mut self, m: NodeId, parent: NodeId, name: &[u8]) {
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
    pub(super) fn displace(&mut self, child: NodeId) {
        if let Some(d) = self.nd_mut(child) {
            if d.state == NodeState::Attached {
                d.state = NodeState::Displaced;
                let s = d.serial;
                self.displaced.push((child, s));
            }
        }
    }

    /// Forgets node `m` and everything below it, removing their watches.
    pub(super) fn remove_subtree(&mut self, sh: &mut Shared, m: NodeId) {
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
}

impl DirNode {
    pub(super) fn new(
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
