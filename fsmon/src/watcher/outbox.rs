//! The output of a call as slots: records are placed in event order, and a later event may
//! withdraw one (a directory `attrib` explained by an entry change, a tentative `delete`)
//! or rewrite it (paths below a directory that was renamed while in flight).

use crate::event::{FileEvent, FileKind, Source, WatchOutput};
use crate::overlay::{self, DirAttrib};

use super::container::Container;
use super::rules::{self};
use super::shared::Shared;
use super::tree::NodeRef;

impl Container {
    pub(super) fn file_event(
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

    pub(super) fn emit(
        &self,
        shared: &mut Shared,
        kind: FileKind,
        path: Vec<u8>,
        is_dir: bool,
        source: Source,
    ) -> usize {
        shared
            .out
            .push(Some(self.file_event(kind, path, None, is_dir, source)));
        shared.out.len() - 1
    }

    pub(super) fn watch_limit(&mut self, shared: &mut Shared) {
        if !self.limit_reported {
            self.limit_reported = true;
            tracing::warn!(container_id = %self.id, "inotify watch limit reached; raise fs.inotify.max_user_watches");
            shared.out.push(Some(WatchOutput::Overflow {
                container: Some(self.id.clone()),
                reason: "watch_limit",
            }));
        }
    }

    /// Descriptors ran out while handling this container: reported once per call (the
    /// work that needed them is retried, and what it finds reported by scan).
    pub(super) fn fd_limit(&mut self, shared: &mut Shared) {
        if !self.fd_limit_reported {
            self.fd_limit_reported = true;
            tracing::error!(container_id = %self.id, advice = %crate::limits::fd_advice(), "out of file descriptors while watching a container; retrying");
            shared.out.push(Some(WatchOutput::Overflow {
                container: Some(self.id.clone()),
                reason: "fd_limit",
            }));
        }
    }

    /// `IN_ATTRIB` on a watched directory (seen both from its parent and from itself):
    /// reported only when the container could see a change ([`overlay::dir_attrib`]). An
    /// mtime-only change is placed in the output now and decided when the queue is drained
    /// ([`Self::settle`]): withdrawn if an entry change of the directory came after it.
    pub(super) fn dir_attrib(&mut self, shared: &mut Shared, m: NodeRef) {
        if !self.ensure_fd(m) {
            return;
        }
        let Some(st) = self.fd_of(m).and_then(|fd| self.fs.stat_dir(fd).ok()) else {
            return;
        };
        let Some(d) = self.node_mut(m) else { return };
        let verdict =
            overlay::dir_attrib(&d.baseline, &st.meta(), d.overlay_touched, d.mtime_stale);
        d.baseline = st.meta();
        d.overlay_touched = false;
        d.mtime_stale = false;
        if verdict == DirAttrib::Hidden {
            return;
        }
        let (path, serial) = (rules::dir_path(&d.path), d.serial);
        let slot = self.emit(shared, FileKind::Attrib, path, true, Source::Inotify);
        if verdict == DirAttrib::MtimeOnly {
            self.mtime_attribs.push(serial, slot);
        }
    }

    /// Entries of node `n` were created, removed or renamed: its mtime moved without an
    /// `IN_ATTRIB`, which explains the mtime of a directory `attrib` still waiting.
    pub(super) fn entries_changed(&mut self, n: NodeRef) {
        if let Some(d) = self.node_mut(n) {
            d.mtime_stale = true;
            let serial = d.serial;
            self.mtime_attribs.entries_changed(serial);
        }
    }

    /// Cancels outputs already placed.
    pub(super) fn withdraw(shared: &mut Shared, slots: impl IntoIterator<Item = usize>) {
        for i in slots {
            if let Some(slot) = shared.out.get_mut(i) {
                *slot = None;
            }
        }
    }

    /// Outputs set aside while a directory was in flight now carry its new path.
    pub(super) fn rewrite_captured(
        shared: &mut Shared,
        captured: &[usize],
        old: &[u8],
        new: &[u8],
    ) {
        for &i in captured {
            if let Some(Some(WatchOutput::File(f))) = shared.out.get_mut(i) {
                rebase(&mut f.path, old, new);
                if let Some(o) = f.old_path.as_mut() {
                    rebase(o, old, new);
                }
            }
        }
    }
}

/// A path below the directory `old` (not `old` itself) moved below `new`; other paths are
/// left alone.
pub(super) fn rebase(path: &mut Vec<u8>, old: &[u8], new: &[u8]) {
    if let Some(rest) = path.strip_prefix(old).filter(|r| r.first() == Some(&b'/')) {
        let mut moved = Vec::with_capacity(new.len() + rest.len());
        moved.extend_from_slice(new);
        moved.extend_from_slice(rest);
        *path = moved;
    }
}

/// Directory `attrib`s that only an mtime change supports
/// ([`crate::overlay::DirAttrib::MtimeOnly`]): already placed in the output (at the
/// position of their `IN_ATTRIB`) and decided when the queue is drained
/// ([`crate::overlay::mtime_attrib_stands`]): withdrawn if an entry change of the same
/// directory came after them. Directories are named by their node's serial (never reused).
#[derive(Debug, Default)]
pub(super) struct MtimeAttribs {
    pending: Vec<MtimeAttrib>,
}

#[derive(Debug)]
struct MtimeAttrib {
    dir: u64,
    slot: usize,
    explained: bool,
}

impl MtimeAttribs {
    /// An `attrib` of directory `dir` placed at output slot `slot`.
    pub fn push(&mut self, dir: u64, slot: usize) {
        self.pending.push(MtimeAttrib {
            dir,
            slot,
            explained: false,
        });
    }

    /// An entry of directory `dir` was created, removed or renamed (its event was handled
    /// now, after those of the `attrib`s waiting).
    pub fn entries_changed(&mut self, dir: u64) {
        for p in self.pending.iter_mut().filter(|p| p.dir == dir) {
            p.explained = true;
        }
    }

    /// Whether an `attrib` still waits without an explanation (worth waiting a little
    /// for the entry event that may explain it).
    pub fn unexplained(&self) -> bool {
        self.pending.iter().any(|p| !p.explained)
    }

    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// End of the drain: the output slots to withdraw; nothing waits any more.
    pub fn settle(&mut self) -> Vec<usize> {
        self.pending
            .drain(..)
            .filter(|p| !crate::overlay::mtime_attrib_stands(p.explained))
            .map(|p| p.slot)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rebases_paths_below_a_renamed_directory_only() {
        let cases: [(&[u8], &[u8]); 5] = [
            (b"/a/x", b"/b/c/x"),
            (b"/a/x/y", b"/b/c/x/y"),
            // The directory itself (its own rename says where it went), a sibling that
            // shares the prefix, and elsewhere: unchanged.
            (b"/a", b"/a"),
            (b"/ab/x", b"/ab/x"),
            (b"/z/a/x", b"/z/a/x"),
        ];
        for (path, want) in cases {
            let mut p = path.to_vec();
            rebase(&mut p, b"/a", b"/b/c");
            assert_eq!(p, want, "{}", String::from_utf8_lossy(path));
        }
    }

    #[test]
    fn mtime_attribs_wait_for_entry_changes_after_them() {
        let mut a = MtimeAttribs::default();
        assert!(a.settle().is_empty());
        assert!(!a.unexplained());
        // Directory 7: an attrib, then an entry change (the race): withdrawn. Directory 8:
        // a touch with nothing after it: kept. Directory 9: its entry change came first.
        a.entries_changed(9);
        a.push(7, 3);
        a.push(8, 4);
        a.push(9, 5);
        assert!(a.unexplained());
        a.entries_changed(7);
        assert!(a.unexplained());
        assert_eq!(a.settle(), vec![3]);
        assert!(!a.unexplained());
        a.push(8, 6);
        assert!(a.unexplained());
        a.entries_changed(8);
        assert!(!a.unexplained());
        assert_eq!(a.settle(), vec![6]);
        a.push(8, 6);
        a.push(9, 7);
        a.entries_changed(9);
        assert_eq!(a.settle(), vec![7]);
        // Two attribs of one directory, each decided by what follows it.
        a.push(7, 1);
        a.entries_changed(7);
        a.push(7, 2);
        assert_eq!(a.settle(), vec![1]);
        assert!(a.settle().is_empty());
    }
}
