//! Tier-1 tests of the races named in the watcher's guarantees, on the in-memory file
//! system ([`FakeFs`]): each test changes the file system the way the race leaves it and
//! feeds the raw events the kernel queued, in the order it queued them, so what took loops
//! of root tests on real overlay mounts to hit is one fixed sequence here.

use std::path::PathBuf;
use std::sync::Arc;

use crate::event::{Source, WatchOutput};

use super::fake::{event, FakeFs};
use super::{ContainerLayer, Watcher};

const UPPER: &str = "/fake/upper";

/// A watcher with one container armed on an in-memory upperdir that `populate` filled
/// (given the upperdir's inode); returns the file system, the watcher and the upperdir.
fn armed(populate: impl FnOnce(&FakeFs, u64)) -> (Arc<FakeFs>, Watcher, u64) {
    let fs = Arc::new(FakeFs::default());
    let root = fs.host_dir(UPPER);
    populate(&fs, root);
    let mut w = Watcher::with_fs(fs.clone(), 64).expect("inotify instance");
    w.add_container("c", layer()).expect("armed");
    fs.catch_up_with_wall_clock();
    let mut out = Vec::new();
    w.feed(&[], &mut out);
    assert!(out.is_empty(), "arming reports nothing: {out:?}");
    (fs, w, root)
}

fn layer() -> ContainerLayer {
    ContainerLayer {
        upperdir: PathBuf::from(UPPER),
        lowerdirs: Vec::new(),
    }
}

/// Feeds `events` as one read and returns the records, as `kind path [dir] [scan]`.
fn feed(w: &mut Watcher, events: &[Vec<u8>]) -> Vec<String> {
    let mut out = Vec::new();
    w.feed(&events.concat(), &mut out);
    shown(&out)
}

/// Records as `kind path [from old] [dir] [scan]`, `overflow reason`.
fn shown(out: &[WatchOutput]) -> Vec<String> {
    out.iter()
        .filter_map(|o| match o {
            WatchOutput::File(f) => {
                let mut s = format!("{:?} {}", f.kind, String::from_utf8_lossy(&f.path));
                if let Some(old) = &f.old_path {
                    s = format!("{s} from {}", String::from_utf8_lossy(old));
                }
                if f.is_dir {
                    s.push_str(" dir");
                }
                if f.source == Source::Scan {
                    s.push_str(" scan");
                }
                Some(s.to_lowercase())
            }
            WatchOutput::Overflow { reason, .. } => Some(format!("overflow {reason}")),
            _ => None,
        })
        .collect()
}

const DIR: u32 = libc::IN_ISDIR;

#[test]
fn new_dir_is_watched_then_listed_and_each_entry_reported_once() {
    let (fs, mut w, root) = armed(|_, _| {});
    // mkdir -p d, and a file written in it before the watcher handled the mkdir: the
    // listing finds it. Its own IN_CREATE (the watch came first) races the listing.
    let d = fs.mkdir(root, "d");
    fs.write(d, "f", 1);
    let d_wd = fs.next_wd();
    let got = feed(&mut w, &[event(1, libc::IN_CREATE | DIR, 0, "d")]);
    assert_eq!(got, ["create /d dir", "create /d/f scan"]);
    assert_eq!(fs.wd(d), d_wd);
    let got = feed(
        &mut w,
        &[
            event(d_wd, libc::IN_CREATE, 0, "f"),
            event(d_wd, libc::IN_CLOSE_WRITE, 0, "f"),
        ],
    );
    assert!(got.is_empty(), "reported twice: {got:?}");
}

/// A container with `/src/f`, which `mkdir /dst; mv /src/f /dst/f` moved since; returns
/// the file system, the watcher, the wd of `/src` and the inode of `/dst`.
fn src_f_moved_to_new_dst() -> (Arc<FakeFs>, Watcher, i32, u64) {
    let mut src = 0;
    let (fs, w, root) = armed(|fs, root| {
        src = fs.mkdir(root, "src");
        fs.write(src, "f", 1);
    });
    let src_wd = fs.wd(src);
    let dst = fs.mkdir(root, "dst");
    fs.rename(src, "f", dst, "f");
    (fs, w, src_wd, dst)
}

#[test]
fn file_moved_into_a_new_dir_before_its_watch_is_one_create_and_one_delete() {
    // mkdir dst; mv src/f dst/f — before dst is watched: no IN_MOVED_TO comes.
    let (_fs, mut w, src_wd, _dst) = src_f_moved_to_new_dst();
    let got = feed(
        &mut w,
        &[
            event(1, libc::IN_CREATE | DIR, 0, "dst"),
            event(src_wd, libc::IN_MOVED_FROM, 7, "f"),
        ],
    );
    assert_eq!(
        got,
        ["create /dst dir", "create /dst/f scan", "delete /src/f"]
    );
}

#[test]
fn file_moved_into_a_new_dir_after_its_watch_before_its_listing_is_reported_once() {
    // The watch of dst came before the rename, its listing after: the IN_MOVED_TO comes,
    // and the listing already found (and reported) the file.
    let (fs, mut w, src_wd, dst) = src_f_moved_to_new_dst();
    let dst_wd = fs.next_wd();
    let got = feed(
        &mut w,
        &[
            event(1, libc::IN_CREATE | DIR, 0, "dst"),
            event(src_wd, libc::IN_MOVED_FROM, 7, "f"),
            event(dst_wd, libc::IN_MOVED_TO, 7, "f"),
        ],
    );
    assert_eq!(fs.wd(dst), dst_wd);
    assert_eq!(
        got,
        ["create /dst dir", "create /dst/f scan", "delete /src/f"]
    );
}

#[test]
fn dir_mtime_attrib_explained_by_a_later_entry_change_is_withdrawn() {
    let mut d = 0;
    let (fs, mut w, _root) = armed(|fs, root| d = fs.mkdir(root, "d"));
    let d_wd = fs.wd(d);
    // A file created in d: d's mtime moved, and an IN_ATTRIB of d queued before the
    // IN_CREATE (the stat after both sees only the mtime change).
    fs.write(d, "x", 0);
    let got = feed(
        &mut w,
        &[
            event(1, libc::IN_ATTRIB | DIR, 0, "d"),
            event(d_wd, libc::IN_ATTRIB | DIR, 0, ""),
            event(d_wd, libc::IN_CREATE, 0, "x"),
        ],
    );
    assert_eq!(got, ["create /d/x"]);
    // A touch of d right after entry changes since its last IN_ATTRIB: its baseline mtime
    // is stale, so nothing is reported. The next touch, nothing after it: reported.
    fs.touch(d);
    let got = feed(&mut w, &[event(d_wd, libc::IN_ATTRIB | DIR, 0, "")]);
    assert!(got.is_empty(), "{got:?}");
    fs.touch(d);
    let got = feed(&mut w, &[event(d_wd, libc::IN_ATTRIB | DIR, 0, "")]);
    assert_eq!(got, ["attrib /d dir"]);
    // A chmod: reported at once, whatever follows.
    fs.chmod(d, 0o700);
    fs.write(d, "y", 0);
    let got = feed(
        &mut w,
        &[
            event(d_wd, libc::IN_ATTRIB | DIR, 0, ""),
            event(d_wd, libc::IN_CREATE, 0, "y"),
        ],
    );
    assert_eq!(got, ["attrib /d dir", "create /d/y"]);
}

#[test]
fn rename_pairs_and_paths_below_a_dir_in_flight_follow_it() {
    let mut a = 0;
    let (fs, mut w, root) = armed(|fs, root| {
        a = fs.mkdir(root, "a");
    });
    let a_wd = fs.wd(a);
    // mv a b, with a file written in the directory between the two halves.
    fs.rename(root, "a", root, "b");
    fs.write(a, "x", 1);
    let got = feed(
        &mut w,
        &[
            event(1, libc::IN_MOVED_FROM | DIR, 9, "a"),
            event(a_wd, libc::IN_CREATE, 0, "x"),
            event(1, libc::IN_MOVED_TO | DIR, 9, "b"),
        ],
    );
    assert_eq!(got, ["rename /b from /a dir", "create /b/x"]);
    // A rename whose partner never comes (moved out of the upperdir): a delete, and what
    // happened in it after it left is not reported (it happened outside the container).
    let b = a;
    fs.write(b, "y", 1);
    fs.remove(root, "b");
    let got = feed(
        &mut w,
        &[
            event(a_wd, libc::IN_CREATE, 0, "y"),
            event(1, libc::IN_MOVED_FROM | DIR, 10, "b"),
            event(a_wd, libc::IN_CREATE, 0, "z"),
        ],
    );
    assert_eq!(got, ["create /b/y", "delete /b dir"]);
}

#[test]
fn modify_is_coalesced_per_write_burst() {
    let (fs, mut w, root) = armed(|_, _| {});
    fs.write(root, "log", 1);
    let got = feed(
        &mut w,
        &[
            event(1, libc::IN_CREATE, 0, "log"),
            event(1, libc::IN_MODIFY, 0, "log"),
            event(1, libc::IN_MODIFY, 0, "log"),
        ],
    );
    assert_eq!(got, ["create /log", "modify /log"]);
    let got = feed(
        &mut w,
        &[
            event(1, libc::IN_MODIFY, 0, "log"),
            event(1, libc::IN_CLOSE_WRITE, 0, "log"),
            event(1, libc::IN_MODIFY, 0, "log"),
        ],
    );
    assert_eq!(got, ["modify /log"]);
}

#[test]
fn queue_overflow_rescans_against_the_index() {
    let mut d = 0;
    let (fs, mut w, root) = armed(|fs, root| {
        fs.write(root, "a", 1);
        d = fs.mkdir(root, "d");
        fs.write(d, "x", 1);
        fs.write(root, "same", 1);
    });
    // Events lost: /a grew, /new appeared, /d/x went.
    fs.write(root, "a", 5);
    fs.write(root, "new", 1);
    fs.remove(d, "x");
    let got = feed(&mut w, &[event(-1, libc::IN_Q_OVERFLOW, 0, "")]);
    assert_eq!(
        got,
        [
            "overflow queue",
            "modify /a scan",
            "create /new scan",
            "delete /d/x scan"
        ]
    );
}

#[test]
fn watch_limit_indexes_without_a_watch_and_the_retry_rescans() {
    let (fs, mut w, root) = armed(|_, _| {});
    fs.set_watch_limit(Some(1));
    let e = fs.mkdir(root, "e");
    fs.write(e, "f", 1);
    let got = feed(&mut w, &[event(1, libc::IN_CREATE | DIR, 0, "e")]);
    assert_eq!(
        got,
        ["overflow watch_limit", "create /e dir", "create /e/f scan"]
    );
    // Refused again: quiet. Then the limit is raised: the retry watches /e and reports
    // what changed in it while it was unwatched.
    fs.write(e, "g", 1);
    w.retry_unwatched();
    assert!(feed(&mut w, &[]).is_empty());
    fs.set_watch_limit(None);
    fs.remove(e, "f");
    w.retry_unwatched();
    let got = feed(&mut w, &[]);
    assert_eq!(got, ["create /e/g scan", "delete /e/f scan"]);
    let e_wd = fs.wd(e);
    fs.write(e, "h", 1);
    let got = feed(&mut w, &[event(e_wd, libc::IN_CREATE, 0, "h")]);
    assert_eq!(got, ["create /e/h"]);
}

#[test]
fn armed_late_reports_what_the_container_did_since_it_started() {
    let fs = Arc::new(FakeFs::default());
    let root = fs.host_dir(UPPER);
    let old = fs.write(root, "old", 1);
    let dir = fs.mkdir(root, "dir");
    fs.write(root, "untouched", 1);
    fs.advance_ms(100);
    let started = fs.now();
    fs.advance_ms(100);
    // The container's first changes, before its watches.
    fs.write(root, "new", 1);
    fs.write(dir, "n", 1);
    fs.write(root, "old", 2);
    let _ = old;
    let mut w = Watcher::with_fs(fs.clone(), 64).expect("inotify instance");
    w.add_container_since("c", layer(), started).expect("armed");
    let mut out = Vec::new();
    w.feed(&[], &mut out);
    let mut got = shown(&out);
    got.sort();
    assert_eq!(
        got,
        ["create /dir/n scan", "create /new scan", "modify /old scan"]
    );
}

#[test]
fn dir_moved_in_over_a_listed_whiteout_is_not_a_recreate_unless_the_whiteout_leaves() {
    // `rm -r` racing an unread copy-up: /a arrives (copied up), and by the time its listing
    // runs, the container removed /a/data: the listing finds data's whiteout. The events
    // queued since /a's watch then tell overlayfs' own steps (a directory exchanged in at
    // `data`): nothing the container did after the listing.
    let (fs, mut w, root) = armed(|_, _| {});
    let a = fs.mkdir(root, "a");
    fs.whiteout(a, "data");
    let a_wd = fs.next_wd();
    let got = feed(&mut w, &[event(1, libc::IN_MOVED_TO | DIR, 3, "a")]);
    assert_eq!(got, ["create /a dir"]);
    fs.write(a, "x", 1);
    let got = feed(
        &mut w,
        &[
            event(a_wd, libc::IN_MOVED_TO | DIR, 4, "data"),
            event(a_wd, libc::IN_CREATE, 0, "x"),
        ],
    );
    assert_eq!(got, ["create /a/x"]);
}

#[test]
fn file_exchanged_in_for_a_dir_that_leaves_is_the_whiteout_of_an_rmdir() {
    // rmdir of a directory that needs a whiteout: overlayfs exchanges a whiteout in for it
    // (an IN_MOVED_TO of a non-directory, then the directory's IN_MOVED_FROM at the same
    // name): one delete of the directory, no file appearing.
    let mut d = 0;
    let (fs, mut w, root) = armed(|fs, root| d = fs.mkdir(root, "d"));
    fs.remove(root, "d");
    fs.whiteout(root, "d");
    let _ = d;
    let got = feed(
        &mut w,
        &[
            event(1, libc::IN_MOVED_TO, 5, "d"),
            event(1, libc::IN_MOVED_FROM | DIR, 5, "d"),
        ],
    );
    assert_eq!(got, ["delete /d dir"]);
}

#[test]
fn whiteout_exchanged_in_for_an_unseen_dir_is_not_a_file() {
    // The same exchange at a name the index does not hold (the directory came and went
    // unseen): the non-directory moved in is that whiteout, not a file appearing.
    let (fs, mut w, root) = armed(|_, _| {});
    fs.whiteout(root, "d");
    let got = feed(
        &mut w,
        &[
            event(1, libc::IN_MOVED_TO, 5, "d"),
            event(1, libc::IN_MOVED_FROM | DIR, 5, "d"),
        ],
    );
    assert!(got.iter().all(|g| !g.starts_with("create")), "{got:?}");
}
