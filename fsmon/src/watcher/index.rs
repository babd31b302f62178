//! The index: what each directory holds, name → [`Entry`] (kind, inode, size and times,
//! write burst), and the index's view of a name ([`Prior`]) for overlay's decisions.

use std::num::NonZeroU64;

use crate::overlay::{EntryKind, Prior};

use super::container::Container;
use super::rules::Stamp;
use super::sys::Stat;
use super::tree::NodeRef;

/// The inode of an indexed object, when known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Ino {
    /// Not looked at (a change made before the stat could be taken, an object gone).
    Unknown,
    /// Never 0 (so that an `Ino` takes 8 bytes).
    Known(NonZeroU64),
}

impl Ino {
    /// From a stat or a listing (which give 0 for no inode).
    pub(super) fn from_raw(ino: u64) -> Ino {
        NonZeroU64::new(ino).map_or(Ino::Unknown, Ino::Known)
    }

    /// The inode of what a stat found, if anything.
    pub(super) fn of(st: Option<Stat>) -> Ino {
        st.map_or(Ino::Unknown, |s| Ino::from_raw(s.ino))
    }

    /// Whether it is known to be `ino`.
    pub(super) fn is(self, ino: u64) -> bool {
        matches!(self, Ino::Known(known) if known.get() == ino)
    }

    pub(super) fn is_known(self) -> bool {
        self != Ino::Unknown
    }
}

/// What the index knows about one name in a directory.
#[derive(Clone, Copy, Debug)]
pub(super) struct Entry {
    pub(super) kind: EntryKind,
    /// The directory's node, for a watched directory.
    pub(super) child: Option<NodeRef>,
    pub(super) ino: Ino,
    /// `None` when never stat'ed (indexed at arm time from the listing alone).
    pub(super) stamp: Option<Stamp>,
    /// [`Stat::read_gen`] of the stat behind `stamp`.
    pub(super) stamp_gen: u32,
    /// When the current write burst was reported (0: none), see [`super::rules::modify_due`].
    pub(super) burst_ms: u32,
    /// A directory that overlayfs exchanged in for an emptied one (before an `rmdir`, or a
    /// rename over it): it is opaque and empty, so the container sees nothing below it,
    /// even while it is not watched.
    pub(super) emptied: bool,
    /// A whiteout found by a listing rather than through an event: the events still queued
    /// for its directory may predate it (overlayfs' steps that led to it).
    pub(super) scanned: bool,
}

impl Entry {
    pub(super) fn new(kind: EntryKind, ino: Ino) -> Entry {
        Entry {
            kind,
            child: None,
            ino,
            stamp: None,
            stamp_gen: 0,
            burst_ms: 0,
            emptied: false,
            scanned: false,
        }
    }

    pub(super) fn from_stat(kind: EntryKind, st: Option<Stat>) -> Entry {
        let mut e = Entry::new(kind, Ino::of(st));
        if let Some(st) = st.filter(|_| kind == EntryKind::File) {
            e.set_stamp(st);
        }
        e
    }

    pub(super) fn set_stamp(&mut self, st: Stat) {
        self.stamp = Some(stamp(st));
        self.stamp_gen = st.read_gen;
    }

    /// Whether `other` is this very entry (same object, same node).
    pub(super) fn same_object(&self, other: &Entry) -> bool {
        self.kind == other.kind && self.ino == other.ino && self.child == other.child
    }

    pub(super) fn prior(&self) -> Prior {
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

pub(super) fn stamp(st: Stat) -> Stamp {
    Stamp {
        size: st.size,
        mtime_ns: st.mtime_ns,
        ctime_ns: st.ctime_ns,
    }
}

impl Container {
    pub(super) fn set_entry(&mut self, n: NodeRef, name: &[u8], entry: Entry) {
        if let Some(d) = self.node_mut(n) {
            match d.entries.get_mut(name) {
                Some(e) => *e = entry,
                None => {
                    d.entries.insert(name.into(), entry);
                }
            }
        }
    }

    /// The index's view of `name` in `n` compared with the object now there (`ino`:
    /// `None` when it is already gone, which counts as "the known one").
    pub(super) fn prior(
        &self,
        n: NodeRef,
        name: &[u8],
        now: Option<(u64, EntryKind)>,
    ) -> (Prior, Option<NodeRef>) {
        match self.node(n).and_then(|d| d.entries.get(name)) {
            None => (Prior::Absent, None),
            Some(e) if !e.kind.is_real() => (Prior::Whiteout, None),
            Some(e) => {
                let same = match now {
                    None => true,
                    Some((_, kind)) if !e.ino.is_known() => kind == e.kind,
                    Some((ino, kind)) => e.ino.is(ino) && kind == e.kind,
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
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_index_entry_stays_small() {
        // One per object of the layer, not capped: the types in it cost no more than the
        // conventions they replaced (u32 node ids, 0 for an unknown inode).
        assert_eq!(std::mem::size_of::<Ino>(), 8);
        assert_eq!(std::mem::size_of::<Option<NodeRef>>(), 8);
        assert!(
            std::mem::size_of::<Entry>() <= 64,
            "{}",
            std::mem::size_of::<Entry>()
        );
    }

    #[test]
    fn inode_known_or_not() {
        assert_eq!(Ino::from_raw(0), Ino::Unknown);
        assert!(Ino::from_raw(7).is(7));
        assert!(!Ino::from_raw(7).is(8));
        assert!(!Ino::Unknown.is(0));
        assert!(!Ino::Unknown.is_known());
    }
}
