//! Pure helpers of the watcher: container path joining, `modify` coalescing and the rescan
//! comparison, and (tests only) the raw inotify record layout. No IO; unit-tested. (Rename pairing by cookie is
//! in `moves`, directory `attrib`s waiting for the drain in `outbox`.)
//!
//! Kernel feature: the inotify(7) event record layout (`struct inotify_event`, 2.6.13).

use std::collections::HashMap;

use crate::event::FileKind;

/// Size of the fixed part of `struct inotify_event` (wd, mask, cookie, len).
#[cfg(test)]
pub(crate) const EVENT_HEADER: usize = 16;

/// One inotify record, borrowed from the read buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RawEvent<'a> {
    pub wd: i32,
    pub mask: u32,
    pub cookie: u32,
    /// The entry name without its NUL padding; empty for events about the watched
    /// directory itself.
    pub name: &'a [u8],
}

/// Iterates the records of one `read(2)` of an inotify fd. A truncated trailing record
/// (which the kernel never produces) ends the iteration. Tests only (they feed raw
/// records): the watcher's reads are parsed by the `inotify` crate.
#[cfg(test)]
pub(crate) fn parse_events(buf: &[u8]) -> impl Iterator<Item = RawEvent<'_>> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        let header = buf.get(off..off.checked_add(EVENT_HEADER)?)?;
        let word = |i: usize| {
            let mut b = [0u8; 4];
            b.copy_from_slice(&header[i..i + 4]);
            b
        };
        let wd = i32::from_ne_bytes(word(0));
        let mask = u32::from_ne_bytes(word(4));
        let cookie = u32::from_ne_bytes(word(8));
        let len = usize::try_from(u32::from_ne_bytes(word(12))).ok()?;
        let start = off + EVENT_HEADER;
        let raw = buf.get(start..start.checked_add(len)?)?;
        off = start + len;
        let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        Some(RawEvent {
            wd,
            mask,
            cookie,
            name,
        })
    })
}

/// Events that change what a name refers to.
const NAME_CHANGES: u32 =
    libc::IN_CREATE | libc::IN_DELETE | libc::IN_MOVED_FROM | libc::IN_MOVED_TO;

/// For each (wd, name), the index of the last event in `evs` that creates, removes or
/// renames it. An event with a later one for its name is handled knowing that a `stat` now
/// would describe a later object, not its own.
pub(crate) fn last_name_changes<'a>(evs: &[RawEvent<'a>]) -> HashMap<(i32, &'a [u8]), usize> {
    let mut last = HashMap::new();
    for (i, ev) in evs.iter().enumerate() {
        if ev.mask & NAME_CHANGES != 0 && !ev.name.is_empty() {
            last.insert((ev.wd, ev.name), i);
        }
    }
    last
}

/// The container path of `name` inside the directory at container path `dir` (`b""` is the
/// root): `b"/a" + b"b"` → `b"/a/b"`.
pub(crate) fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(dir.len() + 1 + name.len());
    p.extend_from_slice(dir);
    p.push(b'/');
    p.extend_from_slice(name);
    p
}

/// The container path of a directory whose stored path is `dir` (`b""` → `b"/"`).
pub(crate) fn dir_path(dir: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        b"/".to_vec()
    } else {
        dir.to_vec()
    }
}

/// How long a write burst may last before another `modify` is reported for a file that is
/// still open for writing (a log that is never closed still shows up about once a second).
pub(crate) const BURST_MS: u32 = 1000;

/// `modify` coalescing: given when the file's current write burst was last reported
/// (`0`: no burst; set back to 0 by `IN_CLOSE_WRITE`, delete and rename) and the current
/// time in ms (never 0), whether this `IN_MODIFY` starts a new burst to report.
pub(crate) fn modify_due(burst_ms: u32, now_ms: u32) -> bool {
    burst_ms == 0 || now_ms.wrapping_sub(burst_ms) >= BURST_MS
}

/// Size and times of a file, as last seen by the watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Stamp {
    pub size: u64,
    pub mtime_ns: i64,
    pub ctime_ns: i64,
}

/// Rescan after a lost event: what to report for a file that is still the same inode.
/// `old` is the stamp the index holds (`None`: indexed at arm time without a stat), `armed_ns`
/// when monitoring of the container began (anything whose ctime is older predates it).
pub(crate) fn rescan_change(old: Option<Stamp>, now: Stamp, armed_ns: i64) -> Option<FileKind> {
    match old {
        Some(old) if old.size != now.size || old.mtime_ns != now.mtime_ns => Some(FileKind::Modify),
        Some(old) if old.ctime_ns != now.ctime_ns => Some(FileKind::Attrib),
        Some(_) => None,
        None if now.ctime_ns < armed_ns => None,
        None if now.mtime_ns >= armed_ns => Some(FileKind::Modify),
        None => Some(FileKind::Attrib),
    }
}

/// What arming with a start instant ([`super::Watcher::add_container_since`]) makes of an
/// entry found in the upper layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Since {
    /// Made at or after the start: the container's doing, handled as an appearance.
    New,
    /// Predates the start: indexed (a directory is still descended into). `Some(kind)`:
    /// a regular file changed since (what [`rescan_change`] says of it).
    Old(Option<FileKind>),
}

/// Decides [`Since`] for an upper entry. A directory's mtime and ctime move whenever entries
/// are made in it, so only its birth time (`btime_ns`) tells a new one from an old one
/// that got a new entry. Without a birth time: a non-directory changed since `since_ns` is
/// taken for new (an old upper file modified since is then reported as created), a
/// directory is never (its new entries are reported, not itself).
pub(crate) fn since_verdict(
    is_dir: bool,
    is_file: bool,
    btime_ns: Option<i64>,
    now: Stamp,
    since_ns: i64,
) -> Since {
    match btime_ns {
        Some(b) if b >= since_ns => Since::New,
        Some(_) if is_file => Since::Old(rescan_change(None, now, since_ns)),
        Some(_) => Since::Old(None),
        None if is_dir => Since::Old(None),
        None if now.ctime_ns >= since_ns => Since::New,
        None => Since::Old(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(wd: i32, mask: u32, cookie: u32, name: &[u8], pad: usize) -> Vec<u8> {
        let len = u32::try_from(name.len() + pad).expect("small");
        let mut v = Vec::new();
        v.extend_from_slice(&wd.to_ne_bytes());
        v.extend_from_slice(&mask.to_ne_bytes());
        v.extend_from_slice(&cookie.to_ne_bytes());
        v.extend_from_slice(&len.to_ne_bytes());
        v.extend_from_slice(name);
        v.resize(v.len() + pad, 0);
        v
    }

    #[test]
    fn parses_records_with_padding_and_hostile_names() {
        let mut buf = record(1, libc::IN_CREATE, 0, b"a", 15);
        buf.extend(record(2, libc::IN_ATTRIB | libc::IN_ISDIR, 0, b"", 0));
        buf.extend(record(3, libc::IN_MOVED_FROM, 77, b"new\nline\xff", 6));
        buf.extend(record(-1, libc::IN_Q_OVERFLOW, 0, b"", 0));
        let evs: Vec<_> = parse_events(&buf).collect();
        assert_eq!(evs.len(), 4);
        assert_eq!(
            evs[0],
            RawEvent {
                wd: 1,
                mask: libc::IN_CREATE,
                cookie: 0,
                name: b"a"
            }
        );
        assert_eq!(evs[1].name, b"");
        assert_eq!(evs[2].name, b"new\nline\xff");
        assert_eq!(evs[2].cookie, 77);
        assert_eq!(evs[3].wd, -1);
    }

    #[test]
    fn truncated_record_ends_parsing() {
        let mut buf = record(1, libc::IN_CREATE, 0, b"abc", 1);
        let mut second = record(2, libc::IN_CREATE, 0, b"defgh", 3);
        second.truncate(EVENT_HEADER + 2);
        buf.extend(second);
        assert_eq!(parse_events(&buf).count(), 1);
        assert_eq!(parse_events(&buf[..7]).count(), 0);
    }

    #[test]
    fn finds_the_last_change_of_each_name() {
        let ev = |wd, mask, name: &'static [u8]| RawEvent {
            wd,
            mask,
            cookie: 0,
            name,
        };
        let evs = [
            ev(1, libc::IN_CREATE, b"a"),
            ev(1, libc::IN_MODIFY, b"a"),
            ev(2, libc::IN_CREATE, b"a"),
            ev(1, libc::IN_MOVED_FROM, b"a"),
            ev(1, libc::IN_ATTRIB, b""),
            ev(1, libc::IN_CLOSE_WRITE, b"a"),
        ];
        let last = last_name_changes(&evs);
        assert_eq!(last.get(&(1, &b"a"[..])), Some(&3));
        assert_eq!(last.get(&(2, &b"a"[..])), Some(&2));
        assert_eq!(last.len(), 2);
    }

    #[test]
    fn joins_container_paths() {
        assert_eq!(join(b"", b"etc"), b"/etc");
        assert_eq!(join(b"/etc", b"passwd"), b"/etc/passwd");
        assert_eq!(join(b"/a\xff", b"b\nc"), b"/a\xff/b\nc");
        assert_eq!(dir_path(b""), b"/");
        assert_eq!(dir_path(b"/x"), b"/x");
    }

    #[test]
    fn coalesces_modify_per_burst() {
        // First write of a burst is reported, the following ones are not.
        assert!(modify_due(0, 10));
        assert!(!modify_due(10, 10));
        assert!(!modify_due(10, 10 + BURST_MS - 1));
        // A burst that goes on (never closed) is reported again after BURST_MS.
        assert!(modify_due(10, 10 + BURST_MS));
        // The millisecond clock wraps.
        assert!(!modify_due(u32::MAX - 5, 3));
        assert!(modify_due(u32::MAX - 5, BURST_MS));
    }

    #[test]
    fn rescan_comparison() {
        let s = Stamp {
            size: 3,
            mtime_ns: 100,
            ctime_ns: 100,
        };
        assert_eq!(rescan_change(Some(s), s, 50), None);
        assert_eq!(
            rescan_change(Some(s), Stamp { size: 4, ..s }, 50),
            Some(FileKind::Modify)
        );
        assert_eq!(
            rescan_change(
                Some(s),
                Stamp {
                    mtime_ns: 101,
                    ctime_ns: 101,
                    ..s
                },
                50
            ),
            Some(FileKind::Modify)
        );
        assert_eq!(
            rescan_change(Some(s), Stamp { ctime_ns: 101, ..s }, 50),
            Some(FileKind::Attrib)
        );
        // Indexed at arm time without a stat: only changes after arming count.
        assert_eq!(rescan_change(None, s, 200), None);
        assert_eq!(rescan_change(None, s, 100), Some(FileKind::Modify));
        assert_eq!(
            rescan_change(None, Stamp { mtime_ns: 10, ..s }, 100),
            Some(FileKind::Attrib)
        );
    }
    #[test]
    fn since_verdicts() {
        let old = Stamp {
            size: 3,
            mtime_ns: 100,
            ctime_ns: 100,
        };
        let (dir, file, link) = ((true, false), (false, true), (false, false));
        let v = |(d, f): (bool, bool), b, s, since| since_verdict(d, f, b, s, since);
        // Born at or after the start: new, whatever the type.
        assert_eq!(v(dir, Some(200), old, 200), Since::New);
        assert_eq!(v(file, Some(300), old, 200), Since::New);
        assert_eq!(v(link, Some(300), old, 200), Since::New);
        // Born before: an old directory that got entries since is still old.
        let changed = Stamp {
            mtime_ns: 250,
            ctime_ns: 250,
            ..old
        };
        assert_eq!(v(dir, Some(100), changed, 200), Since::Old(None));
        assert_eq!(v(link, Some(100), changed, 200), Since::Old(None));
        assert_eq!(
            v(file, Some(100), changed, 200),
            Since::Old(Some(FileKind::Modify))
        );
        assert_eq!(
            v(
                file,
                Some(100),
                Stamp {
                    ctime_ns: 250,
                    ..old
                },
                200
            ),
            Since::Old(Some(FileKind::Attrib))
        );
        assert_eq!(v(file, Some(100), old, 200), Since::Old(None));
        // No birth time: directories are never new, other entries by ctime.
        assert_eq!(v(dir, None, changed, 200), Since::Old(None));
        assert_eq!(v(file, None, changed, 200), Since::New);
        assert_eq!(v(link, None, changed, 200), Since::New);
        assert_eq!(v(file, None, old, 200), Since::Old(None));
    }
}
