//! An entry appearing in a directory — created, moved in without a partner, or found by a
//! listing: the index is updated and what the container did is decided by
//! [`overlay::appear`] (create, copy-up, replace, re-create, whiteout).

use crate::event::{FileKind, Source};
use crate::overlay::{self, Appear, EntryKind, Origin, Prior, Via};

use super::container::{Container, EventCtx, LastMovedTo};
use super::index::{Entry, Ino};
use super::scan::ScanMode;
use super::shared::{NextEvent, Shared};
use super::sys::Stat;
use super::tree::Attached;

/// How an appearing entry was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum FoundBy {
    /// Its `IN_CREATE`.
    Create,
    /// An `IN_MOVED_TO` without a partner.
    MovedTo,
    /// A listing (of a new directory, a resync, a late arming).
    Listing,
}

impl FoundBy {
    /// The event, as overlay's rules name it (a listing infers as a create would).
    fn via(self) -> Via {
        match self {
            FoundBy::MovedTo => Via::MovedTo,
            FoundBy::Create | FoundBy::Listing => Via::Create,
        }
    }

    fn origin(self) -> Origin {
        match self {
            FoundBy::Create | FoundBy::MovedTo => Origin::Event,
            FoundBy::Listing => Origin::Scan,
        }
    }

    /// The `source` of what it reports.
    fn source(self) -> Source {
        match self {
            FoundBy::Create | FoundBy::MovedTo => Source::Inotify,
            FoundBy::Listing => Source::Scan,
        }
    }
}

impl Container {
    /// An entry appeared at `at` (created, moved in without a partner, or found by a
    /// listing); `st`: what is there now, when it can be what the event is about.
    pub(super) fn appear(
        &mut self,
        shared: &mut Shared,
        at: &EventCtx<'_>,
        st: Option<Stat>,
        found: FoundBy,
    ) {
        let (n, name, ev_is_dir) = (at.dir, at.name, at.is_dir);
        let (origin, source) = (found.origin(), found.source());
        let moved_to = found == FoundBy::MovedTo;
        let known = self.node(n).and_then(|d| d.entries.get(name)).copied();
        if let Some(replaced) = known.filter(|_| moved_to) {
            // The other half of an exchange (overlayfs swapping a new object in) may follow.
            self.last_to = Some(LastMovedTo {
                dir: n,
                name: name.into(),
                replaced,
            });
        }
        if moved_to && ev_is_dir {
            if let Some(w) = known.filter(|e| !e.kind.is_real()) {
                // A directory renamed in over a whiteout is a re-create only if the whiteout
                // leaves in the same exchange (an `IN_MOVED_FROM` of a non-directory right
                // after). A directory leaving instead is `ovl_clear_empty`'s exchange at a
                // name the index already holds as deleted; and a whiteout that a listing
                // found may be the end of the very steps whose events come now (the copy-up
                // of a directory that `rm -r` then removed, all before the listing):
                // nothing the container did since.
                if !dir_over_whiteout_recreates(shared.next, w.scanned, st.is_some()) {
                    return;
                }
            }
        }
        let mut looked_up = None;
        let kind = match &st {
            Some(st) => self.classify(n, name, st),
            // A non-directory exchanged in for a directory (which leaves the same name right
            // after) is the whiteout of an `rmdir` (`ovl_cleanup_and_whiteout`).
            None if moved_to
                && !ev_is_dir
                && shared.next == (NextEvent::MovedFromSameName { is_dir: true }) =>
            {
                EntryKind::Whiteout
            }
            None => {
                let raw = known.map_or(Prior::Absent, |e| e.prior());
                let lower_visible = if raw == Prior::Absent && moved_to && !ev_is_dir {
                    let l = self.lower_lookup(n, name);
                    looked_up = Some(l);
                    l.is_some()
                } else {
                    false
                };
                overlay::infer_kind(ev_is_dir, found.via(), raw, lower_visible)
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
                    let mut entry = Entry::new(kind, Ino::of(st));
                    entry.scanned = origin == Origin::Scan;
                    self.set_entry(n, name, entry);
                }
            }
            Appear::Delete { is_dir } => {
                if is_dir {
                    let old = known
                        .filter(|e| e.kind.is_dir())
                        .unwrap_or_else(|| Entry::new(EntryKind::Dir, Ino::Unknown));
                    self.report_vanished(shared, n, name, old);
                }
                self.emit(shared, FileKind::Delete, path, is_dir, source);
                self.displace(old_child);
                let mut entry = Entry::new(kind, Ino::of(st));
                entry.scanned = origin == Origin::Scan;
                self.set_entry(n, name, entry);
            }
            Appear::CopyUp => {
                if let Some(d) = self.node_mut(n) {
                    d.overlay_touched = true;
                }
                let mut entry = Entry::from_stat(kind, st);
                if kind.is_dir() {
                    let baseline = lower.map(|l| l.meta());
                    let ino = Ino::of(st);
                    let attached = self.attach(shared, n, name, ScanMode::Report, baseline, ino);
                    if let Attached::New(c) = attached {
                        // A copy-up is never opaque: the image's directories merge here.
                        // Taken from the image, not from the directory's xattrs, in case what
                        // was opened is already the one overlayfs exchanged in to remove it.
                        let merged = self.child_lower(n, name);
                        if let Some(d) = self.node_mut(c) {
                            d.lower = Some(merged);
                        }
                    }
                    entry.child = attached.node();
                } else if origin == Origin::Scan {
                    let change = st
                        .zip(lower)
                        .and_then(|(u, l)| overlay::copy_up_change(&u.meta(), &l.meta()));
                    if let Some(k) = change {
                        self.emit(shared, k, path, false, source);
                        if k == FileKind::Modify {
                            entry.burst_ms = shared.now_ms();
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
                        self.emptied(shared, n, name, old);
                    }
                    self.displace(old_child);
                    entry.emptied = true;
                    let ino = Ino::of(st);
                    entry.child = self
                        .attach(shared, n, name, ScanMode::Report, None, ino)
                        .node();
                } else {
                    self.displace(old_child);
                    self.emit(shared, FileKind::Modify, path, false, source);
                    entry.burst_ms = shared.now_ms();
                }
                self.set_entry(n, name, entry);
            }
            Appear::Recreate { old_is_dir } => {
                self.emit(shared, FileKind::Delete, path, old_is_dir, source);
                self.displace(old_child);
                self.create(shared, at, kind, st, source);
            }
            Appear::Create => self.create(shared, at, kind, st, source),
        }
    }

    /// A new entry of `kind` at `at` (a directory is attached, or adopted when it is a known
    /// one that moved here).
    pub(super) fn create(
        &mut self,
        shared: &mut Shared,
        at: &EventCtx<'_>,
        kind: EntryKind,
        st: Option<Stat>,
        source: Source,
    ) {
        let (n, name) = (at.dir, at.name);
        let path = self.child_path(n, name);
        let mut entry = Entry::from_stat(kind, st);
        if kind.is_dir() {
            let attached = self.attach(shared, n, name, ScanMode::Report, None, Ino::of(st));
            entry.child = attached.node();
            match attached {
                Attached::Adopted {
                    old_path: Some(old),
                    ..
                } => {
                    let ev = self.file_event(FileKind::Rename, path, Some(old), true, source);
                    shared.out.push(Some(ev));
                }
                Attached::Adopted { old_path: None, .. } => {}
                Attached::New(_) | Attached::Failed => {
                    self.emit(shared, FileKind::Create, path, true, source);
                }
            }
        } else {
            self.emit(shared, FileKind::Create, path, false, source);
        }
        self.set_entry(n, name, entry);
    }
}

/// Whether a directory renamed in (an unpaired `IN_MOVED_TO`) over a whiteout is a
/// re-create. Only if the whiteout leaves in the same exchange (`next`: an `IN_MOVED_FROM`
/// of a non-directory of the same name right after). A directory leaving instead is
/// `ovl_clear_empty`'s exchange at a name the index already holds as deleted. And a
/// whiteout that a listing found (`whiteout_listed`) may be the end of the very steps whose
/// events come now (the copy-up of a directory that `rm -r` then removed, all before the
/// listing): nothing the container did since, unless the next event is not known and the
/// directory is there to be seen (`dir_seen`).
pub(super) fn dir_over_whiteout_recreates(
    next: NextEvent,
    whiteout_listed: bool,
    dir_seen: bool,
) -> bool {
    match next {
        NextEvent::MovedFromSameName { is_dir } => !is_dir,
        NextEvent::Other => !whiteout_listed,
        NextEvent::Unknown => !whiteout_listed || dir_seen,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_over_whiteout_is_a_recreate_only_when_the_whiteout_leaves() {
        let file_leaves = NextEvent::MovedFromSameName { is_dir: false };
        let dir_leaves = NextEvent::MovedFromSameName { is_dir: true };
        for listed in [false, true] {
            for seen in [false, true] {
                // `mkdir` over a whiteout: the whiteout leaves in the same exchange.
                assert!(dir_over_whiteout_recreates(file_leaves, listed, seen));
                // `ovl_clear_empty`: a directory leaves; nothing the container did.
                assert!(!dir_over_whiteout_recreates(dir_leaves, listed, seen));
            }
        }
        // A whiteout the index got from an event: a directory moved over it is new.
        assert!(dir_over_whiteout_recreates(NextEvent::Other, false, false));
        assert!(dir_over_whiteout_recreates(
            NextEvent::Unknown,
            false,
            false
        ));
        // A whiteout a listing found: the events may be the steps that led to it
        // (copy-up, then `rm -r`), unless nothing follows and the directory is there.
        assert!(!dir_over_whiteout_recreates(NextEvent::Other, true, true));
        assert!(!dir_over_whiteout_recreates(
            NextEvent::Unknown,
            true,
            false
        ));
        assert!(dir_over_whiteout_recreates(NextEvent::Unknown, true, true));
    }

    #[test]
    fn found_by_names_the_event_origin_and_source() {
        assert_eq!(FoundBy::Create.via(), Via::Create);
        assert_eq!(FoundBy::MovedTo.via(), Via::MovedTo);
        assert_eq!(FoundBy::Listing.via(), Via::Create);
        assert_eq!(FoundBy::Listing.origin(), Origin::Scan);
        assert_eq!(FoundBy::MovedTo.origin(), Origin::Event);
        assert_eq!(FoundBy::Create.source(), Source::Inotify);
        assert_eq!(FoundBy::Listing.source(), Source::Scan);
    }
}
