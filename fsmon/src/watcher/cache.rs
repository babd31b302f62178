//! Each container's cache of directory and image-layer fds, within the budget that all
//! containers share ([`super::fds`]): a node's fd reopened on demand beneath the nearest
//! cached ancestor (checked to be the same inode), second-chance eviction, shedding.
//!
//! Kernel features: openat2(2) `RESOLVE_*` (5.6), `O_PATH` (2.6.39).

use super::container::Container;
use super::fs::Dir;
use super::sys::Stat;
use super::tree::{NodeRef, NodeState};

impl Container {
    /// The fd of node `n`, valid until the next `ensure_fd` (call that first).
    pub(super) fn fd_of(&self, n: NodeRef) -> Option<&Dir> {
        self.node(n)?.fd.as_ref()
    }

    /// Makes sure node `n` has an open fd: reopens it (and ancestors as needed) from the
    /// nearest ancestor with one, a component at a time, checking that each is still the
    /// directory it was (same inode); the upperdir itself is reopened from its host path
    /// (the runtime's, not the container's). False when that no longer holds: the node's
    /// name is stale (a rename not processed yet) or the directory is gone, or descriptors
    /// ran out (then `fd_exhausted` is set: see [`Self::take_fd_exhaustion`]).
    pub(super) fn ensure_fd(&mut self, n: NodeRef) -> bool {
        match self.node_mut(n) {
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
        while Some(cur) != self.root {
            let Some(d) = self.node(cur) else {
                return false;
            };
            let (NodeState::Attached, Some(parent)) = (d.state, d.parent) else {
                return false;
            };
            cur = parent;
            if self.node(cur).is_some_and(|p| p.fd.is_some()) {
                break;
            }
            chain.push(cur);
            if chain.len() > self.nodes.capacity() {
                return false;
            }
        }
        for &m in chain.iter().rev() {
            let Some(d) = self.node(m) else { return false };
            let opened = if Some(m) == self.root {
                self.fs.open_host_dir(&self.layer.upperdir)
            } else {
                let Some(pfd) = d.parent.and_then(|p| self.fd_of(p)) else {
                    return false;
                };
                self.fs.open_child_dir(pfd, &d.name, false)
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
            match self.fs.stat_dir(&fd) {
                Ok(st) if st.ino == d.ino => {}
                _ => return false,
            }
            if let Some(d) = self.node_mut(m) {
                d.fd = Some(fd);
                d.fd_used = true;
            }
            self.open_fds += 1;
            self.budget.opened();
            self.ring.push_back(m);
        }
        true
    }

    /// Before opening another fd: while the budget shared by all containers is full,
    /// closes this container's cached fds that were not used since they were last
    /// considered (second chance).
    pub(super) fn evict(&mut self) {
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
    pub(super) fn evict_one(&mut self) -> bool {
        let Some(m) = self.ring.pop_front() else {
            return false;
        };
        let Some(d) = self.node_mut(m).filter(|d| d.fd.is_some()) else {
            return true;
        };
        if d.fd_used {
            d.fd_used = false;
            self.ring.push_back(m);
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
    pub(super) fn open_lowers(&mut self) {
        for (i, slot) in self.lowers.iter_mut().enumerate() {
            if slot.is_some() {
                continue;
            }
            let Some(path) = self.layer.lowerdirs.get(i) else {
                continue;
            };
            match self.fs.open_host_dir(path) {
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
    pub(super) fn lower_fd(&self, layer: usize) -> Option<&Dir> {
        self.lowers.get(layer)?.as_ref()
    }

    pub(super) fn stat_child(&mut self, n: NodeRef, name: &[u8]) -> Option<Stat> {
        if !self.ensure_fd(n) {
            return None;
        }
        self.fs.stat_at(self.fd_of(n)?, name).ok()
    }

    /// [`Self::stat_child`] with the birth time, when known ([`super::sys::statx_at`]).
    pub(super) fn statx_child(&mut self, n: NodeRef, name: &[u8]) -> Option<(Stat, Option<i64>)> {
        if !self.ensure_fd(n) {
            return None;
        }
        self.fs.statx_at(self.fd_of(n)?, name).ok()
    }
}
