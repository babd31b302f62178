//! Renames: `IN_MOVED_FROM` halves waiting for their partner (by cookie, else by the inode
//! of a watched directory), overlayfs' exchanges, and the outputs of a directory in flight
//! (renamed with it, or dropped if it left the upperdir).
//!
//! Kernel feature: inotify(7) rename cookies (2.6.13).

use crate::event::{FileKind, Source};
use crate::overlay::{self, EntryKind, Prior, Via};

use super::appear::FoundBy;
use super::container::Container;
use super::container::EventCtx;
use super::index::{Entry, Ino};
use super::scan::ScanMode;
use super::shared::Shared;
use super::sys::Stat;
use super::tree::{NodeRef, NodeState};

/// A `IN_MOVED_FROM` half waiting for its partner.
#[derive(Debug)]
pub(super) struct PendingMove {
    /// What left the index (`None`: nothing known left, e.g. the second half of an
    /// exchange whose first half already replaced the entry).
    pub(super) entry: Option<Entry>,
    /// The directory node in flight with it (`entry.child` when that was in the tree).
    pub(super) moving: Option<NodeRef>,
    pub(super) old_path: Vec<u8>,
    /// The tentative `delete` already placed in the output, turned into the `rename`
    /// when the partner comes.
    pub(super) slot: Option<usize>,
    /// Outputs about the moved directory's subtree since it left: renamed with it when the
    /// partner comes, dropped if it never does (they happened outside the container).
    pub(super) captured: Vec<usize>,
    /// Deletes of what was below a directory taken for emptied by overlayfs (the leaving
    /// half of its exchange): dropped if a partner comes after all (it was a rename).
    pub(super) vanished: std::ops::Range<usize>,
}

impl PendingMove {
    /// A half that has placed nothing in the output (yet).
    pub(super) fn new(
        entry: Option<Entry>,
        moving: Option<NodeRef>,
        old_path: Vec<u8>,
    ) -> PendingMove {
        PendingMove {
            entry,
            moving,
            old_path,
            slot: None,
            captured: Vec::new(),
            vanished: 0..0,
        }
    }
}

impl Container {
    /// The in-flight directory that node `n` is in (or is), if any.
    pub(super) fn inflight_ancestor(&self, mut n: NodeRef) -> Option<NodeRef> {
        if !self
            .moves
            .iter()
            .any(|half| half.entry.is_some_and(|e| e.child.is_some()))
        {
            return None;
        }
        for _ in 0..=self.nodes.capacity() {
            let d = self.node(n)?;
            match (d.state, d.parent) {
                (NodeState::InFlight, _) => return Some(n),
                (NodeState::Attached, Some(parent)) => n = parent,
                _ => return None,
            }
        }
        None
    }

    /// An `IN_MOVED_FROM`. `exchanged`: the index entry that an unpaired `IN_MOVED_TO` of
    /// the same name, the event right before, replaced.
    pub(super) fn on_moved_from(
        &mut self,
        shared: &mut Shared,
        ev: &EventCtx<'_>,
        exchanged: Option<Entry>,
    ) {
        let (n, name, cookie, is_dir, stale) = (ev.dir, ev.name, ev.cookie, ev.is_dir, ev.stale);
        let st = if stale {
            None
        } else {
            self.stat_child(n, name)
        };
        let known = self.node(n).and_then(|d| d.entries.get(name)).copied();
        if let (Some(old), Some(now)) = (exchanged, known) {
            if clear_empty_exchange(is_dir, &old, &now, st.map(|s| s.ino)) {
                // A directory left right after an unpaired IN_MOVED_TO of a directory at its
                // name that the index took for the known one (it could not be looked at:
                // stale, or already replaced): that was overlayfs exchanging an empty opaque
                // directory in, and this is the known one leaving for the workdir.
                self.exchanged_out(shared, ev, old, st.filter(Stat::is_dir));
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
            let ino_now = st.map(|s| s.ino);
            if replaced_one_leaving(&displaced, known.as_ref(), is_dir, ino_now, stale) {
                let old_path = self.child_path(n, name);
                let moving = displaced.child.filter(|&c| self.node(c).is_some());
                let half = PendingMove::new(Some(displaced), moving, old_path);
                self.moves.push(cookie, half);
                return;
            }
        }
        let entry = match known {
            // The indexed object is still there: what left is the object it replaced in an
            // exchange (its IN_MOVED_TO came first), already accounted for.
            Some(e) if st.is_some_and(|s| e.ino.is(s.ino)) => None,
            Some(_) => self.node_mut(n).and_then(|d| d.entries.remove(name)),
            None => None,
        };
        self.entries_changed(n);
        let real = entry.filter(|e| e.kind.is_real());
        if real.is_some() {
            // Renaming an entry the image also has leaves a whiteout behind, without an
            // event (RENAME_WHITEOUT).
            let left = match st {
                Some(s) if self.classify(n, name, &s) == EntryKind::Whiteout => {
                    Some(Ino::from_raw(s.ino))
                }
                None if self.lower_lookup(n, name).is_some() => Some(Ino::Unknown),
                _ => None,
            };
            if let Some(ino) = left {
                self.set_entry(n, name, Entry::new(EntryKind::Whiteout, ino));
            }
        }
        let old_path = self.child_path(n, name);
        let slot = real.map(|e| {
            self.emit(
                shared,
                FileKind::Delete,
                old_path.clone(),
                e.kind.is_dir(),
                Source::Inotify,
            )
        });
        let mut moving = None;
        if let Some(c) = entry.and_then(|e| e.child) {
            if let Some(cd) = self
                .node_mut(c)
                .filter(|cd| cd.state == NodeState::Attached)
            {
                cd.state = NodeState::InFlight;
                moving = Some(c);
            }
        }
        let half = PendingMove::new(entry, moving, old_path);
        self.moves.push(cookie, PendingMove { slot, ..half });
    }

    /// The second half of `ovl_clear_empty`'s exchange, recognised only now (see
    /// [`Self::on_moved_from`]): the directory `old` left `name` of `n`, an empty opaque
    /// one is there instead. Waits as a pending move in case a partner comes after all (a
    /// rename of `old`: its deletes are then withdrawn).
    pub(super) fn exchanged_out(
        &mut self,
        shared: &mut Shared,
        ev: &EventCtx<'_>,
        old: Entry,
        now: Option<Stat>,
    ) {
        let (n, name) = (ev.dir, ev.name);
        let moving = old.child.filter(|_| self.valid_child(n, name, old.child));
        let vanished = self.emptied(shared, n, name, old);
        let mut entry = Entry::new(EntryKind::Dir, Ino::of(now));
        entry.emptied = true;
        if let Some(s) = now {
            entry.child = self
                .attach(
                    shared,
                    n,
                    name,
                    ScanMode::Report,
                    None,
                    Ino::from_raw(s.ino),
                )
                .node();
        }
        self.set_entry(n, name, entry);
        self.entries_changed(n);
        let old_path = self.child_path(n, name);
        let half = PendingMove::new(Some(old), moving, old_path);
        self.moves.push(ev.cookie, PendingMove { vanished, ..half });
    }

    /// An `IN_MOVED_TO`: the partner of a pending `IN_MOVED_FROM` (a rename), or an
    /// appearance.
    pub(super) fn on_moved_to(&mut self, shared: &mut Shared, ev: &EventCtx<'_>) {
        let (n, name, is_dir) = (ev.dir, ev.name, ev.is_dir);
        let st = self.event_stat(ev, Via::MovedTo);
        let Some(half) = self.moves.take(ev.cookie) else {
            self.appear(shared, ev, st, FoundBy::MovedTo);
            return;
        };
        Self::withdraw(shared, half.vanished.clone());
        let now_kind = st.map(|s| self.classify(n, name, &s));
        let moving = half.entry.map_or(Prior::Absent, |e| e.prior());
        self.entries_changed(n);
        let moving_child = half.moving.filter(|&c| self.node(c).is_some());
        let (_, old_child) = self.prior(n, name, None);
        if old_child.is_some() && old_child != moving_child {
            // Renamed over an existing directory (or exchanged with it).
            self.displace(old_child);
        }
        if !overlay::rename_is_visible(moving, now_kind) {
            // Overlayfs moving a whiteout out of the way: bookkeeping only.
            if let Some(c) = moving_child {
                self.remove_subtree(shared, c);
            }
            Self::withdraw(shared, half.captured);
            self.set_entry(n, name, Entry::new(EntryKind::Whiteout, Ino::of(st)));
            return;
        }
        // A listing of this (new) directory already found and reported the very object that
        // moved in (its watch came before the rename, its listing after): its arrival is
        // told; only its departure is left, the tentative `delete` of the old path.
        let listed = self.node(n).and_then(|d| d.entries.get(name)).copied();
        if !is_dir
            && listed.is_some_and(|e| {
                e.kind.is_real() && !e.kind.is_dir() && st.is_some_and(|s| e.ino.is(s.ino))
            })
        {
            Self::withdraw(shared, half.captured);
            if half.slot.is_none() {
                if let Some(e) = half.entry.filter(|e| e.kind.is_real()) {
                    self.emit(
                        shared,
                        FileKind::Delete,
                        half.old_path,
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
        let mut entry = half
            .entry
            .unwrap_or_else(|| Entry::new(now_kind.unwrap_or(fallback), Ino::Unknown));
        if let (Some(s), Some(k)) = (st, now_kind) {
            entry.ino = Ino::from_raw(s.ino);
            entry.kind = k;
        }
        entry.burst_ms = 0;
        entry.child = None;
        if entry.kind.is_dir() {
            entry.child = match moving_child {
                Some(c) => {
                    self.reparent(c, n, name);
                    Some(c)
                }
                None => {
                    let ino = Ino::of(st);
                    self.attach(shared, n, name, ScanMode::Report, None, ino)
                        .node()
                }
            };
        } else if let Some(c) = moving_child {
            self.remove_subtree(shared, c);
        }
        let is_dir = entry.kind.is_dir();
        self.set_entry(n, name, entry);
        self.complete_move(shared, half, path, is_dir);
    }

    /// A pending move met its partner at `new_path`: what was captured while it was in
    /// flight follows it, and its tentative `delete` (if it placed one) becomes the `rename`
    /// (else the `rename` is appended).
    pub(super) fn complete_move(
        &self,
        shared: &mut Shared,
        half: PendingMove,
        new_path: Vec<u8>,
        is_dir: bool,
    ) {
        Self::rewrite_captured(shared, &half.captured, &half.old_path, &new_path);
        let ev = self.file_event(
            FileKind::Rename,
            new_path,
            Some(half.old_path),
            is_dir,
            Source::Inotify,
        );
        match half.slot.and_then(|i| shared.out.get_mut(i)) {
            Some(slot) => *slot = Some(ev),
            None => shared.out.push(Some(ev)),
        }
    }
}

/// Whether an `IN_MOVED_FROM` of a directory, right after an unpaired `IN_MOVED_TO` at its
/// name that replaced the index entry `old` by `now`, is `ovl_clear_empty`'s exchange: the
/// index took the directory moved in (an empty opaque one) for the known one (`now` is
/// `old`: it could not be looked at, stale or already replaced), and this is the known one
/// leaving for the workdir, unless what is there now (`ino_now`) is the known one after all.
pub(super) fn clear_empty_exchange(
    is_dir: bool,
    old: &Entry,
    now: &Entry,
    ino_now: Option<u64>,
) -> bool {
    let back = ino_now.is_some_and(|ino| old.ino.is(ino));
    is_dir && old.kind.is_dir() && now.kind.is_dir() && old.same_object(now) && !back
}

/// Whether an `IN_MOVED_FROM`, right after an unpaired `IN_MOVED_TO` of the same name that
/// replaced the index entry `replaced` (the index now holds `known`), is that replaced object
/// leaving: overlayfs exchanged a new object in (a re-created directory, an empty opaque one,
/// a whiteout), already accounted for by the `IN_MOVED_TO`. So when what it put there is
/// still there (`ino_now`; not looked at when `stale`), or surely: overlayfs exchanges only
/// when a directory is involved, and the container cannot rename a whiteout, so when the
/// event's kind is that of the replaced entry and not that of the new one, or the new one is
/// a whiteout, it is the replaced one leaving whatever is there now (`rm -r` runs ahead).
pub(super) fn replaced_one_leaving(
    replaced: &Entry,
    known: Option<&Entry>,
    is_dir: bool,
    ino_now: Option<u64>,
    stale: bool,
) -> bool {
    let leaving_is_old = match known {
        Some(e) if !e.kind.is_real() => true,
        Some(e) => replaced.kind.is_dir() == is_dir && e.kind.is_dir() != is_dir,
        None => false,
    };
    let still_there = match (ino_now, known) {
        (Some(ino), Some(e)) => !e.ino.is_known() || e.ino.is(ino),
        (None, _) => stale,
        (Some(_), None) => false,
    };
    leaving_is_old || still_there
}

/// `IN_MOVED_FROM` halves waiting for their `IN_MOVED_TO`, matched by cookie.
///
/// The kernel queues the two halves of one rename back to back (`fsnotify_move`), but other
/// events may slip in between and a `read(2)` may end between them. So a half waits here
/// until its partner arrives or the batch ends; what is left then left the watched tree.
#[derive(Debug)]
pub(super) struct Moves<T> {
    pending: Vec<(u32, T)>,
}

impl<T> Default for Moves<T> {
    fn default() -> Self {
        Moves {
            pending: Vec::new(),
        }
    }
}

impl<T> Moves<T> {
    /// Records a `IN_MOVED_FROM` half.
    pub fn push(&mut self, cookie: u32, half: T) {
        self.pending.push((cookie, half));
    }

    /// The waiting half with this cookie, if any.
    pub fn take(&mut self, cookie: u32) -> Option<T> {
        let i = self.pending.iter().position(|(c, _)| *c == cookie)?;
        Some(self.pending.remove(i).1)
    }

    /// The first waiting half that matches `f`, if any (pairing by inode when the cookie
    /// half was missed).
    pub fn take_where(&mut self, f: impl Fn(&T) -> bool) -> Option<T> {
        let i = self.pending.iter().position(|(_, t)| f(t))?;
        Some(self.pending.remove(i).1)
    }

    /// Every unpaired half, in arrival order.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        self.pending.drain(..).map(|(_, t)| t)
    }

    pub fn iter(&self) -> impl Iterator<Item = &T> {
        self.pending.iter().map(|(_, t)| t)
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    pub fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.pending.iter_mut().map(|(_, t)| t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(ino: u64) -> Entry {
        Entry::new(EntryKind::Dir, Ino::from_raw(ino))
    }

    #[test]
    fn clear_empty_exchange_is_the_known_dir_leaving() {
        let known = dir(10);
        // The index still holds the known directory (the opaque one could not be looked
        // at): the directory leaving now is the known one, unless it is still there.
        assert!(clear_empty_exchange(true, &known, &known, None));
        assert!(clear_empty_exchange(true, &known, &known, Some(11)));
        assert!(!clear_empty_exchange(true, &known, &known, Some(10)));
        // A file leaving, or an index entry that changed meanwhile: no.
        assert!(!clear_empty_exchange(false, &known, &known, None));
        assert!(!clear_empty_exchange(true, &known, &dir(11), None));
        let file = Entry::new(EntryKind::File, Ino::from_raw(10));
        assert!(!clear_empty_exchange(true, &file, &file, None));
        // An inode never known cannot be recognised as back.
        assert!(clear_empty_exchange(true, &dir(0), &dir(0), Some(0)));
    }

    #[test]
    fn replaced_one_leaving_after_an_exchange() {
        let old_dir = dir(10);
        let new_dir = dir(20);
        let whiteout = Entry::new(EntryKind::Whiteout, Ino::from_raw(30));
        let file = Entry::new(EntryKind::File, Ino::from_raw(40));
        // `rmdir` of a directory: its whiteout is exchanged in, the directory leaves,
        // whatever is there by now (`rm -r` of the parent may have run ahead).
        assert!(replaced_one_leaving(
            &old_dir,
            Some(&whiteout),
            true,
            None,
            false
        ));
        assert!(replaced_one_leaving(
            &old_dir,
            Some(&whiteout),
            true,
            Some(99),
            false
        ));
        // A directory replaced by a file: a directory leaving is the old one.
        assert!(replaced_one_leaving(
            &old_dir,
            Some(&file),
            true,
            Some(99),
            false
        ));
        // Same kinds on both sides: the old one leaves only if the new one is still there.
        assert!(replaced_one_leaving(
            &old_dir,
            Some(&new_dir),
            true,
            Some(20),
            false
        ));
        assert!(!replaced_one_leaving(
            &old_dir,
            Some(&new_dir),
            true,
            Some(21),
            false
        ));
        assert!(replaced_one_leaving(
            &old_dir,
            Some(&dir(0)),
            true,
            Some(21),
            false
        ));
        // Not looked at: only a stale name (a later event changes it) counts as there.
        assert!(replaced_one_leaving(
            &old_dir,
            Some(&new_dir),
            true,
            None,
            true
        ));
        assert!(!replaced_one_leaving(
            &old_dir,
            Some(&new_dir),
            true,
            None,
            false
        ));
        // Nothing indexed any more: it is not the replaced one leaving.
        assert!(!replaced_one_leaving(&old_dir, None, true, Some(20), false));
        assert!(replaced_one_leaving(&old_dir, None, true, None, true));
    }

    #[test]
    fn pairs_moves_by_cookie() {
        let mut m = Moves::default();
        m.push(5, "a");
        m.push(6, "b");
        m.push(7, "c");
        assert_eq!(m.take(6), Some("b"));
        assert_eq!(m.take(6), None);
        assert_eq!(m.take(9), None);
        assert_eq!(m.take_where(|t| *t == "c"), Some("c"));
        assert_eq!(m.iter().count(), 1);
        assert_eq!(m.drain().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(m.iter().count(), 0);
    }
}
