//! Listings: indexing a directory at arm time (or, armed late, reporting what is newer than
//! the start), reporting what a new directory holds, the diff of a listing with the index
//! after lost events, and retrying the watches that the watch limit refused.
//!
//! Kernel features: getdents64(2), statx(2) birth time (4.11), inotify(7).

use std::collections::{HashMap, HashSet};

use crate::event::{FileKind, Source};
use crate::overlay::{self, EntryKind};

use super::appear::FoundBy;
use super::container::Container;
use super::container::EventCtx;
use super::index::{stamp, Entry, Ino};
use super::rules::{self, Since};
use super::shared::{Shared, WdOwner, MASK};
use super::sys::Dirent;
use super::tree::{NodeRef, NodeState};

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

/// Result of retrying the watch of an unwatched directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Rewatch {
    /// Watched now.
    Watched,
    /// Refused again by the watch limit.
    Limit,
    /// Not reachable now (renamed or replaced, its events not handled yet): later.
    Later,
    /// Not to retry: already watched, gone, or refused otherwise.
    Never,
}

impl Container {
    /// Lists every directory waiting for it (new ones found meanwhile are listed too).
    pub fn process_listings(&mut self, shared: &mut Shared) {
        while let Some(n) = self.to_list.pop() {
            let Some(mode) = self.node_mut(n).and_then(|d| d.scan.take()) else {
                continue;
            };
            if !self.ensure_fd(n) {
                // Renamed meanwhile (its event is still ahead): retry after the batch.
                if let Some(d) = self.node_mut(n) {
                    d.scan = Some(mode);
                    self.deferred.push(n);
                }
                continue;
            }
            let rfd = match self.fd_of(n).map(|dir| self.fs.reopen_dir(dir)) {
                Some(Ok(fd)) => fd,
                Some(Err(e)) if crate::limits::is_fd_exhaustion(&e) => {
                    // Listed again at the end of the next call, once descriptors allow.
                    self.fd_exhausted = true;
                    self.fd_limit(shared);
                    if let Some(d) = self.node_mut(n) {
                        d.scan = Some(mode);
                        self.deferred.push(n);
                    }
                    continue;
                }
                _ => continue,
            };
            let mut dirents = std::mem::take(&mut shared.dirents);
            dirents.clear();
            if let Err(e) = self.fs.list_dir(&rfd, &mut shared.dirbuf, &mut dirents) {
                tracing::debug!(container_id = %self.id, error = %e, "listing a directory");
            }
            drop(rfd);
            if mode == ScanMode::Report && !dirents.is_empty() {
                // Entries were made in it before it was watched: its mtime moved without
                // an IN_ATTRIB, so it says nothing about attribute changes.
                self.entries_changed(n);
            }
            if matches!(mode, ScanMode::Diff | ScanMode::Rewatched) {
                self.diff_node(shared, n, &dirents, mode == ScanMode::Diff);
            } else {
                for d in &dirents {
                    self.scan_entry(shared, n, d, mode);
                }
            }
            dirents.clear();
            shared.dirents = dirents;
        }
    }

    pub(super) fn scan_entry(
        &mut self,
        shared: &mut Shared,
        n: NodeRef,
        d: &Dirent,
        mode: ScanMode,
    ) {
        if let Some(e) = self.node(n).and_then(|x| x.entries.get(&d.name)) {
            if e.ino.is(d.ino) {
                // An event got there first.
                return;
            }
        }
        if mode == ScanMode::Index {
            match self.since_ns {
                Some(since) => self.index_entry_since(shared, n, d, since),
                None => self.index_entry(shared, n, d),
            }
            return;
        }
        if let Some(st) = self.stat_child(n, &d.name) {
            let at = EventCtx::listed(n, &d.name, st.is_dir());
            self.appear(shared, &at, Some(st), FoundBy::Listing);
        }
    }

    /// Arm time: records what exists (from the listing alone where the type says enough).
    pub(super) fn index_entry(&mut self, shared: &mut Shared, n: NodeRef, d: &Dirent) {
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
        let mut entry = Entry::new(kind, Ino::from_raw(d.ino));
        match kind {
            EntryKind::Dir => {
                entry.child = self
                    .attach(shared, n, &d.name, ScanMode::Index, None, Ino::Unknown)
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
    pub(super) fn index_entry_since(
        &mut self,
        shared: &mut Shared,
        n: NodeRef,
        d: &Dirent,
        since: i64,
    ) {
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
                let at = EventCtx::listed(n, &d.name, st.is_dir());
                self.appear(shared, &at, Some(st), FoundBy::Listing);
                return;
            }
            Since::Old(change) => change,
        };
        let mut entry = Entry::new(kind, Ino::from_raw(st.ino));
        match kind {
            EntryKind::Dir => {
                entry.child = self
                    .attach(
                        shared,
                        n,
                        &d.name,
                        ScanMode::Index,
                        None,
                        Ino::from_raw(st.ino),
                    )
                    .node();
            }
            EntryKind::File => {
                entry.set_stamp(st);
                if let Some(k) = change {
                    let path = self.child_path(n, &d.name);
                    self.emit(shared, k, path, false, Source::Scan);
                    if k == FileKind::Modify {
                        entry.burst_ms = shared.now_ms();
                    }
                }
            }
            _ => {}
        }
        self.set_entry(n, &d.name, entry);
    }

    /// Resync: compares the listing of node `n` with its index, reporting differences;
    /// `deep`: and every known directory below it too (re-watched if it has no watch).
    pub(super) fn diff_node(
        &mut self,
        shared: &mut Shared,
        n: NodeRef,
        dirents: &[Dirent],
        deep: bool,
    ) {
        let mut entries_changed = false;
        for d in dirents {
            let known = self.node(n).and_then(|x| x.entries.get(&d.name)).copied();
            match (compare_listed(known.as_ref(), d), known) {
                (Listed::SameDir, Some(e)) => {
                    if let Some(child) = e.child.filter(|_| self.valid_child(n, &d.name, e.child)) {
                        if !deep {
                            continue;
                        }
                        self.rewatch(shared, child);
                        if let Some(c) = self.node_mut(child) {
                            c.scan = Some(ScanMode::Diff);
                        }
                        self.to_list.push(child);
                    } else {
                        let child = self
                            .attach(shared, n, &d.name, ScanMode::Report, None, Ino::Unknown)
                            .node();
                        self.set_entry(n, &d.name, Entry { child, ..e });
                    }
                }
                (Listed::SameFile, Some(e)) => {
                    let Some(st) = self.stat_child(n, &d.name) else {
                        continue;
                    };
                    if let Some(kind) = rules::rescan_change(e.stamp, stamp(st), self.armed_ns) {
                        let path = self.child_path(n, &d.name);
                        self.emit(shared, kind, path, false, Source::Scan);
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
                (Listed::SameDir | Listed::SameFile | Listed::SameOther, _) => {}
                (Listed::Other, _) => {
                    if let Some(st) = self.stat_child(n, &d.name) {
                        entries_changed = true;
                        let at = EventCtx::listed(n, &d.name, st.is_dir());
                        self.appear(shared, &at, Some(st), FoundBy::Listing);
                    }
                }
            }
        }
        let gone = match self.node(n) {
            Some(x) => gone_names(&x.entries, dirents),
            None => return,
        };
        if entries_changed {
            // Its mtime moved without events: it says nothing about attributes until the
            // next IN_ATTRIB.
            self.entries_changed(n);
        }
        for name in gone {
            let Some(e) = self.node_mut(n).and_then(|x| x.entries.remove(&name)) else {
                continue;
            };
            self.entries_changed(n);
            if let Some(is_dir) = overlay::disappear(e.prior(), e.kind.is_dir()) {
                let path = self.child_path(n, &name);
                self.emit(shared, FileKind::Delete, path, is_dir, Source::Scan);
            }
            if let Some(child) = e.child {
                self.remove_subtree(shared, child);
            }
        }
    }

    /// Retries the watch of an indexed but unwatched directory (after the watch limit),
    /// reporting the limit if it is still reached.
    pub(super) fn rewatch(&mut self, shared: &mut Shared, m: NodeRef) {
        if self.try_watch(shared, m) == Rewatch::Limit {
            self.watch_limit(shared);
        }
    }

    /// Adds the missing watch of node `m` through the fd it is reopened as (checked to be
    /// the same directory, see [`Self::ensure_fd`]). Quiet: the caller reports the limit.
    pub(super) fn try_watch(&mut self, shared: &mut Shared, m: NodeRef) -> Rewatch {
        if self
            .node(m)
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
        match self.fs.add_watch(fd, MASK) {
            Ok(wd) if !shared.wds.contains_key(&wd) => {
                let Some(d) = self.node_mut(m) else {
                    return Rewatch::Never;
                };
                d.wd = Some(wd);
                // Entry changes while it was unwatched raised no event: its baseline mtime
                // means nothing to the next `IN_ATTRIB`.
                d.mtime_stale = true;
                shared.wds.insert(
                    wd,
                    WdOwner {
                        container: self.key,
                        node: m,
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
    pub fn retry_unwatched(&mut self, shared: &mut Shared) {
        let mut todo = std::mem::take(&mut self.unwatched);
        todo.retain(|&m| self.node(m).is_some_and(|d| d.wd.is_none()));
        todo.sort_by_key(|&m| self.node(m).map_or(0, |d| d.path.len()));
        let mut limit = false;
        for m in todo {
            // A rescan before this one may have removed it, or a rename moved it.
            if self.node(m).is_none_or(|d| d.wd.is_some()) {
                continue;
            }
            let outcome = if limit {
                Rewatch::Limit
            } else {
                self.try_watch(shared, m)
            };
            match outcome {
                Rewatch::Watched => {
                    if let Some(d) = self.node_mut(m) {
                        d.scan = Some(ScanMode::Rewatched);
                        self.to_list.push(m);
                    }
                    self.process_listings(shared);
                }
                Rewatch::Limit => {
                    limit = true;
                    self.unwatched.push(m);
                }
                Rewatch::Later => self.unwatched.push(m),
                Rewatch::Never => {}
            }
        }
    }
}

/// What a listing shows at a name, compared with the index.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Listed {
    /// The indexed directory (same inode, still a directory).
    SameDir,
    /// The indexed regular file: its size and times say whether it changed.
    SameFile,
    /// The indexed object of another kind (symlink, device, whiteout): nothing to compare.
    SameOther,
    /// Not what the index holds (another inode, another type, an inode never known) or
    /// nothing indexed: an appearance.
    Other,
}

/// Compares the listed entry `d` with what the index holds at its name (`known`).
pub(super) fn compare_listed(known: Option<&Entry>, d: &Dirent) -> Listed {
    match known {
        Some(e) if e.ino.is(d.ino) && e.kind.is_dir() == (d.dtype == libc::DT_DIR) => {
            if e.kind.is_dir() {
                Listed::SameDir
            } else if e.kind == EntryKind::File {
                Listed::SameFile
            } else {
                Listed::SameOther
            }
        }
        _ => Listed::Other,
    }
}

/// The names the index holds that a listing no longer shows: gone while unwatched, or
/// while events were lost.
pub(super) fn gone_names(
    entries: &HashMap<Box<[u8]>, Entry>,
    listing: &[Dirent],
) -> Vec<Box<[u8]>> {
    let present: HashSet<&[u8]> = listing.iter().map(|d| &d.name[..]).collect();
    entries
        .keys()
        .filter(|k| !present.contains(&k[..]))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirent(name: &str, ino: u64, dtype: u8) -> Dirent {
        Dirent {
            ino,
            dtype,
            name: name.as_bytes().into(),
        }
    }

    #[test]
    fn listing_compared_with_the_index() {
        let dir = Entry::new(EntryKind::Dir, Ino::from_raw(7));
        let file = Entry::new(EntryKind::File, Ino::from_raw(8));
        let link = Entry::new(EntryKind::Symlink, Ino::from_raw(9));
        let unknown = Entry::new(EntryKind::File, Ino::Unknown);
        let cases = [
            (Some(&dir), dirent("d", 7, libc::DT_DIR), Listed::SameDir),
            (Some(&file), dirent("f", 8, libc::DT_REG), Listed::SameFile),
            (Some(&link), dirent("l", 9, libc::DT_LNK), Listed::SameOther),
            // Nothing indexed, another inode, a directory replaced by a file of the same
            // inode number (recycled), an inode never known: appearances.
            (None, dirent("n", 5, libc::DT_REG), Listed::Other),
            (Some(&file), dirent("f", 80, libc::DT_REG), Listed::Other),
            (Some(&dir), dirent("d", 7, libc::DT_REG), Listed::Other),
            (Some(&file), dirent("f", 8, libc::DT_DIR), Listed::Other),
            (Some(&unknown), dirent("f", 0, libc::DT_REG), Listed::Other),
        ];
        for (known, d, want) in cases {
            assert_eq!(compare_listed(known, &d), want, "{known:?} vs {d:?}");
        }
    }

    #[test]
    fn names_gone_from_a_listing() {
        let mut entries: HashMap<Box<[u8]>, Entry> = HashMap::new();
        for (name, ino) in [("a", 1), ("b", 2), ("c\n", 3)] {
            entries.insert(
                name.as_bytes().into(),
                Entry::new(EntryKind::File, Ino::from_raw(ino)),
            );
        }
        let listing = [dirent("b", 2, libc::DT_REG), dirent("new", 4, libc::DT_REG)];
        let mut gone = gone_names(&entries, &listing);
        gone.sort();
        assert_eq!(
            gone,
            vec![Box::from(&b"a"[..]), Box::from("c\n".as_bytes())]
        );
        assert!(gone_names(&HashMap::new(), &listing).is_empty());
        assert_eq!(gone_names(&entries, &[]).len(), 3);
    }
}
