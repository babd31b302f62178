//! Image-layer lookups: which lower directories merge into an upper one (overlayfs' merge,
//! opaque marks included), what the image shows at a name, what an upper entry is
//! (whiteouts), and the deletes owed for a merged directory that vanished before its watch.
//!
//! Kernel features: overlayfs xattrs `trusted.overlay.{opaque,whiteout}` (3.18; `opaque=x`
//! and xattr whiteouts 6.7), openat2(2) `RESOLVE_*` (5.6).

use crate::event::{FileKind, Source};
use crate::overlay::{self, EntryKind, Opaque};

use super::container::Container;
use super::fs::{Dir, Fs};
use super::index::Entry;
use super::rules::{self};
use super::shared::Shared;
use super::sys::Stat;
use super::tree::{NodeRef, NodeState};

/// An image layer directory merged into an upper directory.
#[derive(Clone, Copy, Debug)]
pub(super) struct LowerDir {
    /// Index into `Container::lowers` (top-most first).
    pub(super) layer: usize,
    /// Marked `opaque=x`: zero-size files with `overlay.whiteout` are whiteouts.
    pub(super) xwhiteouts: bool,
}

impl Container {
    /// The image layer directories merged into node `n` (computed once per node, top-down
    /// from the nearest ancestor that knows).
    pub(super) fn lower_dirs(&mut self, n: NodeRef) -> Vec<LowerDir> {
        let mut chain = Vec::new();
        let mut cur = n;
        loop {
            let Some(d) = self.node(cur) else {
                return Vec::new();
            };
            if d.lower.is_some() {
                break;
            }
            chain.push(cur);
            if Some(cur) == self.root {
                break;
            }
            let (NodeState::Attached, Some(parent)) = (d.state, d.parent) else {
                return Vec::new();
            };
            if chain.len() > self.nodes.capacity() {
                return Vec::new();
            }
            cur = parent;
        }
        for &m in chain.iter().rev() {
            let (lower, x) = self.compute_lower(m);
            if let Some(d) = self.node_mut(m) {
                d.lower = Some(lower);
                d.upper_xwhiteouts = x;
            }
        }
        self.node(n)
            .and_then(|d| d.lower.clone())
            .unwrap_or_default()
    }

    pub(super) fn compute_lower(&mut self, m: NodeRef) -> (Vec<LowerDir>, bool) {
        let mut buf = [0u8; 16];
        let opaque = if self.ensure_fd(m) {
            let v = self.fd_of(m).and_then(|fd| {
                self.fs
                    .xattr_of_dir(fd, &overlay::OPAQUE_XATTRS, &mut buf)
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
        if Some(m) == self.root {
            for layer in 0..self.lowers.len() {
                let Some(fd) = self.lower_fd(layer) else {
                    // Could not be reopened: taken as merged here, without marks.
                    out.push(LowerDir {
                        layer,
                        xwhiteouts: false,
                    });
                    continue;
                };
                let v = self
                    .fs
                    .xattr_of_dir(fd, &overlay::OPAQUE_XATTRS, &mut buf)
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
        let Some(d) = self.node(m) else {
            return (out, x);
        };
        let Some(p) = d.parent.and_then(|p| self.node(p)) else {
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
    pub(super) fn child_lower(&mut self, n: NodeRef, name: &[u8]) -> Vec<LowerDir> {
        let parent_lower = self.lower_dirs(n);
        self.open_lowers();
        let prel = self
            .node(n)
            .map(|d| d.path.get(1..).unwrap_or_default().to_vec())
            .unwrap_or_default();
        self.merge_lower_child(&parent_lower, &prel, name)
    }

    /// The image layer directories that merge at `name` below a directory whose own are
    /// `parent_lower` at relative path `prel`: top-most first, stopping at a whiteout, a
    /// non-directory or an opaque directory.
    pub(super) fn merge_lower_child(
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
            let Ok(pfd) = self.fs.open_dir_beneath(root, prel, false) else {
                continue;
            };
            let Ok(st) = self.fs.stat_at(&pfd, name) else {
                continue;
            };
            match lower_kind(&*self.fs, &pfd, name, &st, ld.xwhiteouts) {
                EntryKind::Dir => {
                    let v = self
                        .fs
                        .xattr_at(&pfd, name, &overlay::OPAQUE_XATTRS, &mut buf)
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
    pub(super) fn report_vanished(
        &mut self,
        shared: &mut Shared,
        n: NodeRef,
        name: &[u8],
        old: Entry,
    ) -> std::ops::Range<usize> {
        let first = shared.out.len();
        if old.emptied || !old.kind.is_dir() {
            return first..first;
        }
        let old_child = old.child;
        /// One name of the merged view being walked.
        struct View {
            kind: EntryKind,
            node: Option<NodeRef>,
            lower: Vec<LowerDir>,
            closed: bool,
        }
        let node = old_child.filter(|_| self.valid_child(n, name, old_child));
        let start = match node {
            Some(node) => self.lower_dirs(node),
            None => self.child_lower(n, name),
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
                let Ok(dfd) = self.fs.open_dir_beneath(root, rel, true) else {
                    continue;
                };
                dirents.clear();
                if self.fs.list_dir(&dfd, &mut dirbuf, &mut dirents).is_err() {
                    continue;
                }
                for d in &dirents {
                    let merge = match view.get(&d.name) {
                        None => false,
                        Some(v) if v.kind == EntryKind::Dir && !v.closed => true,
                        Some(_) => continue,
                    };
                    let Ok(st) = self.fs.stat_at(&dfd, &d.name) else {
                        continue;
                    };
                    let kind = lower_kind(&*self.fs, &dfd, &d.name, &st, ld.xwhiteouts);
                    let mut buf = [0u8; 16];
                    let mark = if kind == EntryKind::Dir {
                        overlay::parse_opaque(
                            self.fs
                                .xattr_at(&dfd, &d.name, &overlay::OPAQUE_XATTRS, &mut buf)
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
                                    node: None,
                                    lower,
                                    closed,
                                },
                            );
                        }
                    }
                }
            }
            let upper: Vec<(Box<[u8]>, Entry)> = match node.and_then(|x| self.node(x)) {
                Some(x) => x.entries.iter().map(|(k, e)| (k.clone(), *e)).collect(),
                None => Vec::new(),
            };
            for (k, e) in upper {
                let child = e.child.filter(|_| {
                    e.kind.is_dir() && node.is_some_and(|p| self.valid_child(p, &k, e.child))
                });
                let lower = match (e.kind.is_dir(), child) {
                    (false, _) => Vec::new(),
                    (true, None) => view.get(&k).map(|v| v.lower.clone()).unwrap_or_default(),
                    (true, Some(c)) => self.lower_dirs(c),
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
            self.emit(shared, FileKind::Delete, p, is_dir, Source::Scan);
        }
        first..shared.out.len()
    }

    /// Overlayfs exchanged an empty opaque directory in for the directory `old` at `name`
    /// of `n` (`ovl_clear_empty`, before an `rmdir` or a rename over it, when the upper
    /// directory holds whiteouts): the container's view below `name` is empty now, so what
    /// it still saw there was deleted ([`Self::report_vanished`]), and the old directory
    /// went to overlayfs' workdir: its node is displaced, so that overlayfs' cleanup of it
    /// there (its whiteouts removed, then itself) is not taken for the container's doing.
    /// Returns the output slots of the deletes.
    pub(super) fn emptied(
        &mut self,
        shared: &mut Shared,
        n: NodeRef,
        name: &[u8],
        old: Entry,
    ) -> std::ops::Range<usize> {
        let slots = self.report_vanished(shared, n, name, old);
        if self.valid_child(n, name, old.child) {
            self.displace(old.child);
        }
        slots
    }

    /// The entry an image layer shows at `name` in node `n`, if any is visible.
    pub(super) fn lower_lookup(&mut self, n: NodeRef, name: &[u8]) -> Option<Stat> {
        let dirs = self.lower_dirs(n);
        if dirs.is_empty() {
            return None;
        }
        let rel = self.node(n)?.path.get(1..).unwrap_or_default().to_vec();
        self.open_lowers();
        for ld in dirs {
            let Some(root) = self.lower_fd(ld.layer) else {
                continue;
            };
            let Ok(dfd) = self.fs.open_dir_beneath(root, &rel, false) else {
                continue;
            };
            let Ok(st) = self.fs.stat_at(&dfd, name) else {
                continue;
            };
            return match lower_kind(&*self.fs, &dfd, name, &st, ld.xwhiteouts) {
                EntryKind::Whiteout => None,
                _ => Some(st),
            };
        }
        None
    }

    /// What an upper entry is. Zero-size files are checked for the whiteout xattr only
    /// in directories marked `opaque=x` (overlayfs itself makes char-device whiteouts).
    pub(super) fn classify(&mut self, n: NodeRef, name: &[u8], st: &Stat) -> EntryKind {
        let mut x = false;
        if overlay::needs_whiteout_xattr(st.mode, st.size, true) {
            let _ = self.lower_dirs(n);
            if self.node(n).is_some_and(|d| d.upper_xwhiteouts) && self.ensure_fd(n) {
                let mut buf = [0u8; 16];
                x = self.fd_of(n).is_some_and(|fd| {
                    self.fs
                        .xattr_at(fd, name, &overlay::WHITEOUT_XATTRS, &mut buf)
                        .ok()
                        .flatten()
                        .is_some()
                });
            }
        }
        overlay::classify(st.mode, st.rdev, x)
    }
}

/// What an image layer entry is (xattr whiteouts only in directories marked `opaque=x`).
pub(super) fn lower_kind(
    fs: &dyn Fs,
    dir: &Dir,
    name: &[u8],
    st: &Stat,
    xwhiteouts: bool,
) -> EntryKind {
    let mut buf = [0u8; 16];
    let x = overlay::needs_whiteout_xattr(st.mode, st.size, xwhiteouts)
        && fs
            .xattr_at(dir, name, &overlay::WHITEOUT_XATTRS, &mut buf)
            .ok()
            .flatten()
            .is_some();
    overlay::classify(st.mode, st.rdev, x)
}
