//! Overlay translation: what a raw change seen in an overlayfs *upper* directory means to
//! the container that made it. Pure code, no IO: the watcher gathers the facts (what the new
//! entry is, what its index held at that name, whether an image layer has the path) and asks
//! here what to report.
//!
//! Kernel feature: overlayfs (Linux 3.18; whiteouts as char device 0/0 and the
//! `trusted.overlay.opaque` xattr since then, `RENAME_WHITEOUT` since 3.18, `user.overlay.*`
//! with `userxattr` since 5.11, xattr whiteouts in directories marked `opaque=x` since 6.7).
//! The event sequences below were observed from inotify on the upperdir with kernel 6.18.
//!
//! # How overlayfs changes the upper directory
//!
//! | container does | upper directory sees |
//! |---|---|
//! | create a new file / dir | `IN_CREATE name` |
//! | write, chmod, touch an image file | copy-up: `IN_CREATE name` (an `O_TMPFILE` already holding the content, linked in), then the change itself (`IN_MODIFY`, `IN_ATTRIB`) |
//! | anything below an image directory | copy-up of the directory: `IN_MOVED_TO dir` (made in the workdir, renamed in, no `IN_MOVED_FROM`) |
//! | delete an image file / dir | a whiteout (char device 0/0) renamed in from the workdir: `IN_MOVED_TO name`, over the copied-up entry if any |
//! | delete a copied-up dir that holds whiteouts | the dir is first exchanged with an empty opaque one (`IN_MOVED_TO dir`, `IN_MOVED_FROM dir`), then replaced by a whiteout |
//! | re-create a deleted path | a new entry renamed over the whiteout (`IN_MOVED_TO name`; a dir is exchanged, so an `IN_MOVED_FROM name` follows) |
//! | rename an entry that has an image copy | `IN_MOVED_FROM old`, `IN_MOVED_TO new`, and a whiteout appears at `old` *without any event* (`RENAME_WHITEOUT`) |
//!
//! # Decisions
//!
//! * **Whiteouts** are never files: a whiteout appearing where the container saw something
//!   is a `delete` of that path (with `is_dir` of what was there); a whiteout moving or
//!   vanishing is overlay bookkeeping and reports nothing. Whiteouts are never descended into.
//! * **Copy-up** (a real entry appears where the container already saw the image's copy) is
//!   not a `create`. The change that caused it follows as its own event (`modify`, `attrib`).
//!   When the copy-up is only found by a scan (its events happened before the directory was
//!   watched), the upper copy is compared with the image's: data changed → `modify`, only
//!   mode/owner changed → `attrib`, nothing visible changed → nothing ([`copy_up_change`]).
//! * **Re-create after delete** (a real entry replaces a whiteout) is a `create`.
//! * **Opaque directories.** A directory that replaces a whiteout is made opaque by overlayfs
//!   and is reported as a `create` of the directory only. The image's old content below it is
//!   *not* reported again as deleted: overlayfs only creates such a directory after the old one
//!   was removed, and `rmdir` requires the container's view of it to be empty, so each of those
//!   entries already produced its own `delete` when the container removed it. (A brand-new
//!   directory in an image directory is also made opaque; it hides nothing.)
//! * **Replacing a real entry** by a moved-in one with no matching `IN_MOVED_FROM` is overlay
//!   bookkeeping when it comes from an event (the empty-opaque-dir exchange above: nothing to
//!   report for the directory itself, `modify` for a file), and a `delete` + `create` when a
//!   rescan finds a different object at a known name.
//! * **Each delete once.** The container's view below a directory that overlayfs exchanged
//!   for an empty opaque one is empty from then on: whatever it still showed there (entries
//!   deleted too fast for their own events, in a directory not yet watched) is reported
//!   deleted at that point, and nothing below it at the whiteout that follows. The old
//!   directory goes to overlayfs' workdir, where its whiteouts are removed: that is not the
//!   container's doing, and what is known deleted (a whiteout in the index) is never
//!   reported again until something re-creates it.
//! * **Hard links** are `create`s of the new name (the source is copied up first, silently).
//!
//! # Image layers: looked up lazily, not indexed
//!
//! Whether an image layer has a path is looked up when it matters, with `fstatat` in the
//! lower layers (opened with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`), following overlayfs'
//! own rules: layers are searched top-most first; a whiteout or a non-directory stops the
//! search; an opaque directory ends the merge below it. Which layers merge into a watched
//! directory is computed once per directory and cached in the watcher's node for it.
//! An index of every image path built at arm time was rejected: arming runs while the
//! container is frozen, and images hold 10^4–10^5 paths that the container mostly never
//! touches. Lookups are needed only when an entry appears in a directory that the image
//! has too (new entries in the container's own directories cost nothing), and since the
//! layers are read-only their answers never go stale.

use crate::event::FileKind;

/// Overlay xattr names, privileged mounts first (Docker) then `userxattr` mounts (rootless).
pub const OPAQUE_XATTRS: [&str; 2] = ["trusted.overlay.opaque", "user.overlay.opaque"];
/// Xattr that marks a zero-size regular file as a whiteout (only in `opaque=x` directories).
pub const WHITEOUT_XATTRS: [&str; 2] = ["trusted.overlay.whiteout", "user.overlay.whiteout"];

/// What an entry of an overlay layer is, in overlayfs' terms.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EntryKind {
    /// A whiteout: hides the lower entry of the same name; invisible itself.
    Whiteout,
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link (never followed).
    Symlink,
    /// A fifo, socket or device node that is not a whiteout.
    Special,
}

impl EntryKind {
    /// Whether the container sees a directory.
    pub fn is_dir(self) -> bool {
        self == EntryKind::Dir
    }

    /// Whether the container sees anything at all.
    pub fn is_real(self) -> bool {
        self != EntryKind::Whiteout
    }
}

/// The `overlay.opaque` xattr of a directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Opaque {
    /// Not opaque: lower directories of the same path merge into it.
    No,
    /// `y`: lower directories of the same path are hidden.
    Yes,
    /// `x`: not opaque, but zero-size files with `overlay.whiteout` in it are whiteouts.
    XWhiteouts,
}

/// Parses an `overlay.opaque` value (`None`: no such xattr).
pub fn parse_opaque(value: Option<&[u8]>) -> Opaque {
    match value {
        Some(b"y") => Opaque::Yes,
        Some(b"x") => Opaque::XWhiteouts,
        _ => Opaque::No,
    }
}

/// Whether an entry needs its `overlay.whiteout` xattr read to be classified: only zero-size
/// regular files, and only where xattr whiteouts may exist.
pub fn needs_whiteout_xattr(mode: u32, size: u64, xattr_whiteouts_possible: bool) -> bool {
    xattr_whiteouts_possible && mode & libc::S_IFMT == libc::S_IFREG && size == 0
}

/// Classifies an entry from its `st_mode`, `st_rdev` and (when [`needs_whiteout_xattr`]
/// said so) whether it carries an `overlay.whiteout` xattr.
pub fn classify(mode: u32, rdev: u64, has_whiteout_xattr: bool) -> EntryKind {
    match mode & libc::S_IFMT {
        libc::S_IFDIR => EntryKind::Dir,
        libc::S_IFLNK => EntryKind::Symlink,
        libc::S_IFCHR if rdev == 0 => EntryKind::Whiteout,
        libc::S_IFREG if has_whiteout_xattr => EntryKind::Whiteout,
        libc::S_IFREG => EntryKind::File,
        _ => EntryKind::Special,
    }
}

/// What the watcher's index held at a name just before a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Prior {
    /// Nothing in the upper directory at that name.
    Absent,
    /// A whiteout: the container saw nothing there.
    Whiteout,
    /// A real entry.
    Real {
        /// Whether it was a directory.
        is_dir: bool,
        /// Whether it is the very object now at that name (same inode and kind): the change
        /// was already accounted for (e.g. by a scan racing with the event).
        same: bool,
    },
}

/// How the watcher learned that an entry appeared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// `IN_CREATE`, or `IN_MOVED_TO` without a matching `IN_MOVED_FROM`.
    Event,
    /// A directory listing (new directory's content, resync after overflow).
    Scan,
}

/// What to do about an entry that appeared in an upper directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Appear {
    /// Report `create`.
    Create,
    /// An image entry was copied up: not a `create`. For a scan, see [`copy_up_change`].
    CopyUp,
    /// A whiteout hid what the container saw: report `delete` (with this `is_dir`).
    Delete {
        /// Whether the deleted object was a directory.
        is_dir: bool,
    },
    /// A real entry replaced another real entry of the same kind through overlay
    /// bookkeeping: nothing for a directory (but what the container still saw below the
    /// old one is gone), `modify` for anything else.
    Replace,
    /// A different object replaced a known one: report `delete` of the old one, then
    /// `create` of the new one.
    Recreate {
        /// Whether the old object was a directory.
        old_is_dir: bool,
    },
    /// Already accounted for (same object), or invisible (a whiteout over nothing):
    /// report nothing.
    Nothing,
}

/// Whether [`appear`] needs to know about the image layers for these facts (a lookup costs
/// syscalls, so the watcher asks only when it matters).
pub fn appear_needs_lower(prior: Prior) -> bool {
    prior == Prior::Absent
}

/// Decides what an appearing upper entry means. `lower` is `Some(is_dir)` when an image
/// layer has a visible entry at this path (only consulted when [`appear_needs_lower`]).
pub fn appear(now: EntryKind, prior: Prior, lower: Option<bool>, origin: Origin) -> Appear {
    match (now.is_real(), prior) {
        (false, Prior::Whiteout) => Appear::Nothing,
        (false, Prior::Real { is_dir, .. }) => Appear::Delete { is_dir },
        (false, Prior::Absent) => match lower {
            Some(is_dir) => Appear::Delete { is_dir },
            None => Appear::Nothing,
        },
        (true, Prior::Real { same: true, .. }) => Appear::Nothing,
        (true, Prior::Whiteout) => Appear::Create,
        (
            true,
            Prior::Real {
                is_dir,
                same: false,
            },
        ) => {
            if is_dir == now.is_dir() && origin == Origin::Event {
                Appear::Replace
            } else {
                Appear::Recreate { old_is_dir: is_dir }
            }
        }
        (true, Prior::Absent) => match lower {
            Some(_) => Appear::CopyUp,
            None => Appear::Create,
        },
    }
}

/// How an appearing entry was announced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Via {
    /// `IN_CREATE`: overlayfs never creates whiteouts this way (they are renamed in).
    Create,
    /// `IN_MOVED_TO` without partner.
    MovedTo,
}

/// What an appeared entry was when it can no longer be looked at (already replaced by the
/// time the event is handled): a directory if the event said so; otherwise what overlayfs
/// can have put there given what was there before. A real entry over a whiteout is a
/// re-create; over a real entry, or over an image entry nobody touched, only a whiteout is
/// renamed in (a copy-up of an image file arrives as `IN_CREATE`); elsewhere it is new.
pub fn infer_kind(is_dir: bool, via: Via, prior: Prior, lower_visible: bool) -> EntryKind {
    if is_dir {
        return EntryKind::Dir;
    }
    match (via, prior) {
        (Via::Create, _) | (Via::MovedTo, Prior::Whiteout) => EntryKind::File,
        (Via::MovedTo, Prior::Real { .. }) => EntryKind::Whiteout,
        (Via::MovedTo, Prior::Absent) if lower_visible => EntryKind::Whiteout,
        (Via::MovedTo, Prior::Absent) => EntryKind::File,
    }
}

/// What to do about an entry that left an upper directory (`IN_DELETE`, an `IN_MOVED_FROM`
/// whose partner never came, or a name a rescan no longer finds): `Some(is_dir)` → report
/// `delete`. `event_is_dir` is the event's `IN_ISDIR`, used when the index did not know the
/// entry. A whiteout going away reports nothing.
pub fn disappear(prior: Prior, event_is_dir: bool) -> Option<bool> {
    match prior {
        Prior::Whiteout => None,
        Prior::Real { is_dir, .. } => Some(is_dir),
        Prior::Absent => Some(event_is_dir),
    }
}

/// Whether a rename pair (`IN_MOVED_FROM` + `IN_MOVED_TO` with one cookie) is the
/// container's `rename`, or overlayfs moving a whiteout around (when a path is re-created by
/// a rename, overlayfs exchanges the whiteout out of the way and then removes it).
pub fn rename_is_visible(moving: Prior, now_at_destination: Option<EntryKind>) -> bool {
    moving != Prior::Whiteout && now_at_destination.is_none_or(EntryKind::is_real)
}

/// The few attributes the watcher compares.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// `st_mode` (type and permission bits).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Size in bytes (ignored for directories).
    pub size: u64,
    /// Access time, ns since the epoch.
    pub atime_ns: i64,
    /// Modification time, ns since the epoch.
    pub mtime_ns: i64,
    /// Change time, ns since the epoch.
    pub ctime_ns: i64,
    /// No link left (a directory removed meanwhile, seen through an fd).
    pub removed: bool,
}

/// For a copied-up entry found by a scan (its events came before the directory was
/// watched): what changed compared with the image's copy. Data (size, mtime) → `modify`;
/// only mode/owner, or the times set together (`touch`, `utimes`) → `attrib`; nothing
/// visible → `None` (e.g. opened for writing, not written yet: a later `IN_MODIFY` will
/// tell). For a directory only mode and owner count: its size and mtime move whenever
/// entries are made in it.
///
/// `touch` is told from a write by the access time: the copy-up keeps the image's atime
/// and mtime, `touch` sets both to one same new value, a write moves the mtime alone.
/// (A write of the same size followed by a read within one timestamp tick looks like a
/// `touch`: reported as `attrib`.)
pub fn copy_up_change(upper: &Meta, lower: &Meta) -> Option<FileKind> {
    let is_dir = upper.mode & libc::S_IFMT == libc::S_IFDIR;
    let times_set = upper.size == lower.size
        && upper.atime_ns == upper.mtime_ns
        && upper.atime_ns != lower.atime_ns;
    if !is_dir && times_set {
        Some(FileKind::Attrib)
    } else if !is_dir && (upper.size != lower.size || upper.mtime_ns != lower.mtime_ns) {
        Some(FileKind::Modify)
    } else if upper.mode != lower.mode || upper.uid != lower.uid || upper.gid != lower.gid {
        Some(FileKind::Attrib)
    } else {
        None
    }
}

/// What an `IN_ATTRIB` on a directory shows the container ([`dir_attrib`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DirAttrib {
    /// Nothing it can see: overlay bookkeeping (an xattr, times put back), or an mtime
    /// that entry changes or a copy-up already explain.
    Hidden,
    /// Its mode or owner changed: the container's doing, reported.
    Visible,
    /// Only its mtime changed, and nothing seen so far explains it: the container's (a
    /// `touch`) unless an entry change of this directory comes after this `IN_ATTRIB` in the
    /// same drain of the queue. Events are handled after the fact, so the `stat` may already
    /// show the mtime of an entry change whose event is still ahead (overlayfs marks a
    /// directory `impure` right before renaming a copied-up entry into it): see
    /// [`mtime_attrib_stands`].
    MtimeOnly,
}

/// Whether an `IN_ATTRIB` on a directory is the container's doing.
///
/// Overlayfs itself raises `IN_ATTRIB` on upper directories: it sets `overlay.impure` /
/// `overlay.opaque` xattrs, and after every copy-up into a directory it restores that
/// directory's timestamps. Those change neither mode nor owner, and leave the mtime as it
/// was before the copy-up. So: mode or owner changed → [`DirAttrib::Visible`]; the mtime
/// changed → [`DirAttrib::MtimeOnly`], unless overlayfs just copied something up into this
/// directory (`overlay_touched`) or entries were added or removed since the baseline was
/// taken (`mtime_stale`: the directory's own mtime moved without an `IN_ATTRIB`, so the
/// comparison means nothing: a `touch` of a directory after entry changes in it is not
/// reported). A directory removed meanwhile (seen through its fd) is
/// [`DirAttrib::Hidden`]: its removal is what the container did. Otherwise
/// [`DirAttrib::Hidden`] (an xattr change on a directory is therefore not reported).
pub fn dir_attrib(
    baseline: &Meta,
    now: &Meta,
    overlay_touched: bool,
    mtime_stale: bool,
) -> DirAttrib {
    if now.removed {
        // Gone by now (its removal is reported as a `delete`); the stat shows the times
        // the removal set.
        DirAttrib::Hidden
    } else if baseline.mode != now.mode || baseline.uid != now.uid || baseline.gid != now.gid {
        DirAttrib::Visible
    } else if baseline.mtime_ns != now.mtime_ns && !overlay_touched && !mtime_stale {
        DirAttrib::MtimeOnly
    } else {
        DirAttrib::Hidden
    }
}

/// The deferred half of [`DirAttrib::MtimeOnly`], decided once the queue is drained: the
/// `attrib` stands unless an entry of the directory was created, removed or renamed after
/// it (`entries_changed_after`: that change moved the mtime). A `touch` of a directory
/// followed in the same drain by an entry change in it is therefore not reported: the two
/// cannot be told apart from a `stat` taken after both.
pub fn mtime_attrib_stands(entries_changed_after: bool) -> bool {
    !entries_changed_after
}

#[cfg(test)]
mod tests {
    use super::*;

    const REG: u32 = libc::S_IFREG | 0o644;
    const DIR: u32 = libc::S_IFDIR | 0o755;

    #[test]
    fn classify_table() {
        let cases = [
            (libc::S_IFCHR, 0, false, EntryKind::Whiteout),
            (libc::S_IFCHR, 0x0501, false, EntryKind::Special),
            (libc::S_IFBLK, 0, false, EntryKind::Special),
            (REG, 0, false, EntryKind::File),
            (REG, 0, true, EntryKind::Whiteout),
            (DIR, 0, false, EntryKind::Dir),
            (libc::S_IFLNK | 0o777, 0, false, EntryKind::Symlink),
            (libc::S_IFIFO, 0, false, EntryKind::Special),
            (libc::S_IFSOCK, 0, false, EntryKind::Special),
        ];
        for (mode, rdev, xattr, want) in cases {
            assert_eq!(
                classify(mode, rdev, xattr),
                want,
                "mode {mode:o} rdev {rdev}"
            );
        }
    }

    #[test]
    fn whiteout_xattr_is_read_only_when_it_can_matter() {
        assert!(needs_whiteout_xattr(REG, 0, true));
        assert!(!needs_whiteout_xattr(REG, 0, false));
        assert!(!needs_whiteout_xattr(REG, 1, true));
        assert!(!needs_whiteout_xattr(DIR, 0, true));
        assert!(!needs_whiteout_xattr(libc::S_IFCHR, 0, true));
    }

    #[test]
    fn opaque_values() {
        assert_eq!(parse_opaque(None), Opaque::No);
        assert_eq!(parse_opaque(Some(b"y")), Opaque::Yes);
        assert_eq!(parse_opaque(Some(b"x")), Opaque::XWhiteouts);
        assert_eq!(parse_opaque(Some(b"n")), Opaque::No);
        assert_eq!(parse_opaque(Some(b"")), Opaque::No);
    }

    #[test]
    fn appear_table() {
        use EntryKind::{Dir, File, Symlink, Whiteout};
        use Origin::{Event, Scan};
        let real = |is_dir, same| Prior::Real { is_dir, same };
        #[rustfmt::skip]
        let cases = [
            // A brand-new file, dir, symlink (not in any image layer).
            (File, Prior::Absent, None, Event, Appear::Create),
            (Dir, Prior::Absent, None, Event, Appear::Create),
            (Symlink, Prior::Absent, None, Scan, Appear::Create),
            // Copy-up of an image file / dir: not a create.
            (File, Prior::Absent, Some(false), Event, Appear::CopyUp),
            (Dir, Prior::Absent, Some(true), Event, Appear::CopyUp),
            (File, Prior::Absent, Some(false), Scan, Appear::CopyUp),
            // Delete of an image file (never copied up) / dir.
            (Whiteout, Prior::Absent, Some(false), Event, Appear::Delete { is_dir: false }),
            (Whiteout, Prior::Absent, Some(true), Scan, Appear::Delete { is_dir: true }),
            // Delete of a copied-up file / dir: the whiteout lands on the upper copy.
            (Whiteout, real(false, false), Some(false), Event, Appear::Delete { is_dir: false }),
            (Whiteout, real(true, false), None, Event, Appear::Delete { is_dir: true }),
            // A whiteout where nothing was visible, or seen twice: nothing.
            (Whiteout, Prior::Absent, None, Event, Appear::Nothing),
            (Whiteout, Prior::Whiteout, Some(false), Scan, Appear::Nothing),
            // Re-create after delete (the new dir is opaque): create.
            (File, Prior::Whiteout, Some(false), Event, Appear::Create),
            (Dir, Prior::Whiteout, Some(true), Event, Appear::Create),
            (Dir, Prior::Whiteout, Some(false), Event, Appear::Create),
            // The event for something a scan already reported.
            (File, real(false, true), None, Event, Appear::Nothing),
            (Dir, real(true, true), Some(true), Event, Appear::Nothing),
            // Overlay exchanges a dir holding whiteouts for an empty opaque one.
            (Dir, real(true, false), Some(true), Event, Appear::Replace),
            (File, real(false, false), None, Event, Appear::Replace),
            // A rescan finds another object at a known name.
            (Dir, real(true, false), None, Scan, Appear::Recreate { old_is_dir: true }),
            (File, real(true, false), None, Event, Appear::Recreate { old_is_dir: true }),
            (Dir, real(false, false), None, Scan, Appear::Recreate { old_is_dir: false }),
        ];
        for (now, prior, lower, origin, want) in cases {
            assert_eq!(
                appear(now, prior, lower, origin),
                want,
                "{now:?} over {prior:?}, lower {lower:?}, {origin:?}"
            );
            if prior != Prior::Absent {
                // The verdict never depends on the image when the index knew the name.
                assert_eq!(appear(now, prior, None, origin), want);
                assert!(!appear_needs_lower(prior));
            }
        }
        assert!(appear_needs_lower(Prior::Absent));
    }

    #[test]
    fn infer_kind_table() {
        use EntryKind::{Dir, File, Whiteout};
        let real = Prior::Real {
            is_dir: false,
            same: false,
        };
        #[rustfmt::skip]
        let cases = [
            (true, Via::MovedTo, real, true, Dir),
            (true, Via::Create, Prior::Absent, false, Dir),
            // IN_CREATE: a new file, a copy-up, a hard link; never a whiteout.
            (false, Via::Create, Prior::Absent, true, File),
            (false, Via::Create, real, false, File),
            // Renamed in over a whiteout: a re-create.
            (false, Via::MovedTo, Prior::Whiteout, true, File),
            // Renamed in over a copied-up file or an untouched image file: a whiteout.
            (false, Via::MovedTo, real, false, Whiteout),
            (false, Via::MovedTo, Prior::Absent, true, Whiteout),
            // Renamed in where nothing was: something new.
            (false, Via::MovedTo, Prior::Absent, false, File),
        ];
        for (is_dir, via, prior, lower, want) in cases {
            assert_eq!(
                infer_kind(is_dir, via, prior, lower),
                want,
                "{is_dir} {via:?} {prior:?} {lower}"
            );
        }
    }

    #[test]
    fn disappear_table() {
        assert_eq!(disappear(Prior::Whiteout, false), None);
        assert_eq!(
            disappear(
                Prior::Real {
                    is_dir: true,
                    same: false
                },
                false
            ),
            Some(true)
        );
        assert_eq!(
            disappear(
                Prior::Real {
                    is_dir: false,
                    same: true
                },
                true
            ),
            Some(false)
        );
        assert_eq!(disappear(Prior::Absent, true), Some(true));
    }

    #[test]
    fn rename_visibility() {
        let real = Prior::Real {
            is_dir: false,
            same: false,
        };
        assert!(rename_is_visible(real, Some(EntryKind::File)));
        assert!(rename_is_visible(Prior::Absent, Some(EntryKind::Dir)));
        assert!(rename_is_visible(real, None));
        // Overlay moving a whiteout out of the way of a rename onto a deleted path.
        assert!(!rename_is_visible(Prior::Whiteout, Some(EntryKind::File)));
        assert!(!rename_is_visible(Prior::Absent, Some(EntryKind::Whiteout)));
    }

    #[test]
    fn copy_up_change_table() {
        let lower = Meta {
            mode: REG,
            uid: 0,
            gid: 0,
            size: 3,
            atime_ns: 90,
            mtime_ns: 100,
            ctime_ns: 100,
            removed: false,
        };
        let with = |f: fn(&mut Meta)| {
            let mut m = lower;
            f(&mut m);
            m
        };
        assert_eq!(copy_up_change(&lower, &lower), None);
        assert_eq!(
            copy_up_change(&with(|m| m.size = 4), &lower),
            Some(FileKind::Modify)
        );
        assert_eq!(
            copy_up_change(&with(|m| m.mtime_ns = 5), &lower),
            Some(FileKind::Modify)
        );
        // touch: atime and mtime set together, size kept.
        let touched = |m: &mut Meta| {
            m.atime_ns = 500;
            m.mtime_ns = 500;
        };
        assert_eq!(
            copy_up_change(&with(touched), &lower),
            Some(FileKind::Attrib)
        );
        // A write after which atime happens to equal mtime, but the size changed.
        let grown = |m: &mut Meta| {
            m.atime_ns = 500;
            m.mtime_ns = 500;
            m.size = 9;
        };
        assert_eq!(copy_up_change(&with(grown), &lower), Some(FileKind::Modify));
        // An image file whose atime equals its mtime, written (atime kept).
        let same = Meta {
            atime_ns: 100,
            ..lower
        };
        assert_eq!(
            copy_up_change(
                &Meta {
                    mtime_ns: 500,
                    ..same
                },
                &same
            ),
            Some(FileKind::Modify)
        );
        assert_eq!(
            copy_up_change(&with(|m| m.mode = REG & !0o044), &lower),
            Some(FileKind::Attrib)
        );
        assert_eq!(
            copy_up_change(&with(|m| m.uid = 1000), &lower),
            Some(FileKind::Attrib)
        );
        let dir = Meta {
            mode: DIR,
            uid: 0,
            gid: 0,
            size: 4096,
            atime_ns: 100,
            mtime_ns: 100,
            ctime_ns: 100,
            removed: false,
        };
        assert_eq!(copy_up_change(&Meta { size: 8192, ..dir }, &dir), None);
        // A directory's mtime moves whenever entries are made in it: not an attrib.
        assert_eq!(copy_up_change(&Meta { mtime_ns: 7, ..dir }, &dir), None);
        assert_eq!(
            copy_up_change(
                &Meta {
                    mode: DIR & !0o055,
                    ..dir
                },
                &dir
            ),
            Some(FileKind::Attrib)
        );
    }

    #[test]
    fn dir_attrib_table() {
        let base = Meta {
            mode: DIR,
            uid: 0,
            gid: 0,
            size: 4096,
            atime_ns: 100,
            mtime_ns: 100,
            ctime_ns: 100,
            removed: false,
        };
        let chmod = Meta {
            mode: libc::S_IFDIR | 0o700,
            ..base
        };
        let touched = Meta {
            mtime_ns: 200,
            ctime_ns: 200,
            ..base
        };
        // Entries changed (mtime = ctime = 200), then an xattr was set (ctime 300).
        let entries_then_xattr = Meta {
            mtime_ns: 200,
            ctime_ns: 300,
            ..base
        };
        let chown = Meta { uid: 1, ..base };
        #[rustfmt::skip]
        let cases = [
            // overlay setting an xattr, or restoring the times it had: nothing visible
            (base, false, false, DirAttrib::Hidden),
            (base, true, false, DirAttrib::Hidden),
            (base, false, true, DirAttrib::Hidden),
            // chmod / chown: always the container's
            (chmod, false, false, DirAttrib::Visible),
            (chmod, true, true, DirAttrib::Visible),
            (chown, true, false, DirAttrib::Visible),
            // touch: yours unless overlay just copied something up here, or entries moved;
            // and only once the drain shows no entry change after it
            (touched, false, false, DirAttrib::MtimeOnly),
            (touched, true, false, DirAttrib::Hidden),
            // after entry changes the mtime says nothing (a touch then is not reported)
            (touched, false, true, DirAttrib::Hidden),
            (entries_then_xattr, false, true, DirAttrib::Hidden),
            (entries_then_xattr, false, false, DirAttrib::MtimeOnly),
            // removed meanwhile: its removal is what the container did
            (Meta { removed: true, ..touched }, false, true, DirAttrib::Hidden),
            (Meta { removed: true, ..chmod }, false, false, DirAttrib::Hidden),
            // mode and mtime together (`mkdir -m` over an image dir, chmod + entry change):
            // the mode decides, whatever follows
            (Meta { mtime_ns: 200, ..chmod }, false, true, DirAttrib::Visible),
        ];
        for (now, overlay_touched, stale, want) in cases {
            assert_eq!(
                dir_attrib(&base, &now, overlay_touched, stale),
                want,
                "{now:?} {overlay_touched} {stale}"
            );
        }
    }

    #[test]
    fn mtime_only_attrib_waits_for_the_drain() {
        // An entry change after the IN_ATTRIB explains the mtime (the race of a stat taken
        // after an entry change whose event was still queued); none: a genuine touch.
        assert!(!mtime_attrib_stands(true));
        assert!(mtime_attrib_stands(false));
    }
}
