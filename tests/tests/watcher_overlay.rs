//! Tier 2: the watcher against real overlayfs mounts in temp dirs (root, no Docker).
//!
//! Each test mounts its own overlay, arms a `Watcher` on the upperdir, acts through the
//! merged dir as a container would, drains the watcher until it is quiet, and checks what a
//! user would check in fsmon's output. Run with
//! `cargo test -p fsmon-tests --test watcher_overlay` as root.
//!
//! Tests that change inotify sysctls take the `LIMITS` lock for writing (every other test
//! takes it for reading), so a lowered limit never leaks into another test; the sysctl is
//! restored by a guard even when the test fails.

use std::collections::{HashMap, HashSet};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::Duration;

use fsmon::event::{FileEvent, FileKind, Source, WatchOutput};
use fsmon::watcher::Watcher;
use fsmon_tests::overlay_mount::*;

static LIMITS: RwLock<()> = RwLock::new(());

fn shared() -> RwLockReadGuard<'static, ()> {
    require_root();
    LIMITS.read().unwrap_or_else(|e| e.into_inner())
}

fn exclusive() -> RwLockWriteGuard<'static, ()> {
    require_root();
    LIMITS.write().unwrap_or_else(|e| e.into_inner())
}

const QUIET: Duration = Duration::from_millis(300);
const MAX: Duration = Duration::from_secs(300);

/// Lower layer used by most tests: an image with /etc, /topf, /d/e/g, /d/h.
fn image(lowers: &[std::path::PathBuf]) {
    let l = &lowers[0];
    std::fs::create_dir_all(l.join("etc/sub")).expect("mkdir");
    std::fs::write(l.join("etc/passwd"), "root:x:0:0\n").expect("write");
    std::fs::write(l.join("etc/sub/f"), "x\n").expect("write");
    std::fs::write(l.join("topf"), "top\n").expect("write");
    std::fs::write(l.join("topf2"), "top2\n").expect("write");
    std::fs::create_dir_all(l.join("d/e")).expect("mkdir");
    std::fs::write(l.join("d/e/g"), "g\n").expect("write");
    std::fs::write(l.join("d/h"), "h\n").expect("write");
}

/// A watcher; with `FSMON_TEST_FD_BUDGET=N` its directory-fd cache holds at most N fds
/// (N = 8, the least, makes every operation reopen what it needs: `cargo xtask test`
/// runs this tier that way too).
///
/// With `FSMON_WATCHER_RECORD=DIR`, each watcher records its inputs and outputs to
/// `DIR/<test>.<n>.trace`, for the tier-1 replays of `fsmon/src/watcher/replay.rs`.
fn new_watcher() -> Watcher {
    let budget = std::env::var("FSMON_TEST_FD_BUDGET")
        .ok()
        .map(|n| n.parse().expect("FSMON_TEST_FD_BUDGET: a number"));
    if let Ok(dir) = std::env::var("FSMON_WATCHER_RECORD") {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let test = std::thread::current()
            .name()
            .unwrap_or("test")
            .replace("::", "-");
        let path = Path::new(&dir).join(format!("{test}.{n}.trace"));
        return Watcher::recording(budget, &path).expect("inotify");
    }
    match budget {
        Some(n) => Watcher::with_fd_budget(n),
        None => Watcher::new(),
    }
    .expect("inotify")
}

fn armed(id: &str, m: &OverlayMount) -> Watcher {
    let mut w = new_watcher();
    w.add_container(id, m.layer()).expect("arm");
    w
}

fn events(w: &mut Watcher) -> Vec<FileEvent> {
    files(&drain(w, QUIET, MAX))
}

fn b(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

fn touch(p: &Path) {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).expect("path");
    // SAFETY: NUL-terminated path; a null `times` means "now".
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), std::ptr::null(), 0) };
    assert_eq!(r, 0, "utimensat {}", p.display());
}

/// Every create must be reported exactly once.
/// `want` records of `kind` at `path`; on failure the message lists every event.
#[track_caller]
fn assert_count(evs: &[FileEvent], kind: FileKind, path: &[u8], want: usize) {
    assert_eq!(count(evs, kind, path), want, "{}", show(evs));
}

fn assert_no_duplicate_creates(evs: &[FileEvent]) {
    let mut seen: HashMap<&[u8], usize> = HashMap::new();
    for e in evs.iter().filter(|e| e.kind == FileKind::Create) {
        *seen.entry(&e.path).or_default() += 1;
    }
    let dups: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(dups.is_empty(), "duplicate creates: {dups:?}");
}

#[test]
fn arming_indexes_existing_content_without_reporting_it() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    // What a stopped container left behind: created files, a copied-up file, a deletion.
    std::fs::create_dir_all(m.m("old/dir")).expect("mkdir");
    std::fs::write(m.m("old/dir/f"), "1").expect("write");
    std::fs::write(m.m("etc/passwd"), "changed").expect("write");
    std::fs::remove_file(m.m("topf")).expect("rm");
    let mut w = new_watcher();
    let stats = w.add_container("c", m.layer()).expect("arm");
    assert_eq!(stats.dirs, 4, "/, /old, /old/dir, /etc: {stats:?}");
    assert_eq!(stats.files, 2, "{stats:?}");
    assert_eq!(stats.whiteouts, 1, "{stats:?}");
    assert_eq!(w.container_watch_count("c"), 4);
    assert_eq!(w.watch_count(), 4);
    let evs = events(&mut w);
    assert!(
        evs.is_empty(),
        "content predating arm must not be reported:\n{}",
        show(&evs)
    );

    std::fs::write(m.m("old/dir/g"), "2").expect("write");
    std::fs::write(m.m("topf"), "back").expect("write");
    let evs = events(&mut w);
    assert_count(&evs, FileKind::Create, b"/old/dir/g", 1);
    assert_eq!(
        count(&evs, FileKind::Create, b"/topf"),
        1,
        "re-create after delete:\n{}",
        show(&evs)
    );
    assert!(
        evs.iter()
            .all(|e| e.container == "c" && e.source == Source::Inotify),
        "{}",
        show(&evs)
    );
}

#[test]
fn deep_mkdir_p_with_immediate_writes_loses_nothing() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    for round in 0..3 {
        let mut rel = format!("deep{round}");
        let mut dirs = Vec::new();
        for level in 0..50 {
            rel.push_str(&format!("/l{level}"));
            dirs.push(rel.clone());
        }
        std::fs::create_dir_all(m.m(&rel)).expect("mkdir -p");
        for d in &dirs {
            std::fs::write(m.m(d).join("f"), "x").expect("write");
        }
        let evs = events(&mut w);
        assert_no_duplicate_creates(&evs);
        let mut want = vec![format!("/deep{round}")];
        for d in &dirs {
            want.push(format!("/{d}"));
            want.push(format!("/{d}/f"));
        }
        for p in &want {
            assert_eq!(
                count(&evs, FileKind::Create, p.as_bytes()),
                1,
                "{p} not reported once:\n{}",
                show(&evs)
            );
        }
        let creates = evs.iter().filter(|e| e.kind == FileKind::Create).count();
        assert_eq!(creates, want.len(), "{}", show(&evs));
        assert!(
            evs.iter()
                .all(|e| matches!(e.kind, FileKind::Create | FileKind::Modify)),
            "{}",
            show(&evs)
        );
        assert!(
            evs.iter()
                .filter(|e| e.kind == FileKind::Create)
                .all(|e| e.is_dir != e.path.ends_with(b"/f")),
            "{}",
            show(&evs)
        );
    }
    assert_eq!(w.container_watch_count("c"), 1 + 3 * 51);
}

#[test]
fn tree_moved_in_is_watched_then_scanned() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);

    // Moved into the upperdir from outside the watched tree (what overlay does for a
    // copied-up directory): an IN_MOVED_TO without IN_MOVED_FROM.
    let t = m.outside.join("tree");
    let mut want = vec![b("/tree")];
    for i in 0..20 {
        let d = t.join(format!("d{i}/sub"));
        std::fs::create_dir_all(&d).expect("mkdir");
        want.push(b(&format!("/tree/d{i}")));
        want.push(b(&format!("/tree/d{i}/sub")));
        for j in 0..25 {
            std::fs::write(d.join(format!("f{j}")), "x").expect("write");
            want.push(b(&format!("/tree/d{i}/sub/f{j}")));
        }
    }
    std::fs::rename(&t, m.upper.join("tree")).expect("move in");
    let evs = events(&mut w);
    assert_no_duplicate_creates(&evs);
    for p in &want {
        assert_eq!(
            count(&evs, FileKind::Create, p),
            1,
            "{}",
            String::from_utf8_lossy(p)
        );
    }
    assert_eq!(evs.len(), want.len(), "{}", show(&evs));
    assert!(
        evs.iter().skip(1).all(|e| e.source == Source::Scan),
        "content comes from the scan"
    );
    // The moved-in tree is watched.
    std::fs::write(m.m("tree/d3/sub/new"), "y").expect("write");
    let evs = events(&mut w);
    assert_count(&evs, FileKind::Create, b"/tree/d3/sub/new", 1);

    // Moved out of the upperdir (no IN_MOVED_TO ever comes): a delete, and its watches go.
    let watches = w.container_watch_count("c");
    std::fs::rename(m.upper.join("tree"), m.outside.join("gone")).expect("move out");
    std::fs::write(m.outside.join("gone/d3/sub/after"), "z").expect("write");
    let evs = events(&mut w);
    assert_eq!(evs.len(), 1, "{}", show(&evs));
    assert_eq!(
        (evs[0].kind, &evs[0].path[..], evs[0].is_dir),
        (FileKind::Delete, &b"/tree"[..], true)
    );
    assert_eq!(w.container_watch_count("c"), watches - 41);

    // A populated tree moved through the merged view: one rename, later paths follow.
    std::fs::create_dir_all(m.m("stage/x/y")).expect("mkdir");
    std::fs::write(m.m("stage/x/y/f"), "1").expect("write");
    let _ = events(&mut w);
    std::fs::rename(m.m("stage"), m.m("moved")).expect("mv");
    std::fs::write(m.m("moved/x/y/f2"), "2").expect("write");
    let evs = events(&mut w);
    let r: Vec<_> = evs.iter().filter(|e| e.kind == FileKind::Rename).collect();
    assert_eq!(r.len(), 1, "{}", show(&evs));
    assert_eq!(
        (r[0].old_path.as_deref(), &r[0].path[..], r[0].is_dir),
        (Some(&b"/stage"[..]), &b"/moved"[..], true)
    );
    assert_count(&evs, FileKind::Create, b"/moved/x/y/f2", 1);
}

#[test]
fn moved_in_dir_of_100k_files_is_reported_once_each() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    let big = m.outside.join("big");
    std::fs::create_dir(&big).expect("mkdir");
    const N: usize = 100_000;
    for i in 0..N {
        std::fs::File::create(big.join(format!("file-{i:06}"))).expect("create");
    }
    std::fs::rename(&big, m.upper.join("big")).expect("move in");
    let evs = events(&mut w);
    assert_no_duplicate_creates(&evs);
    assert_eq!(evs.len(), N + 1, "the dir and every file, once");
    let paths: HashSet<&[u8]> = evs.iter().map(|e| &e.path[..]).collect();
    for i in (0..N).step_by(997) {
        assert!(paths.contains(format!("/big/file-{i:06}").as_bytes()));
    }
}

#[test]
fn copy_up_of_image_files_is_not_a_create() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    std::fs::set_permissions(m.m("etc/passwd"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    let evs = events(&mut w);
    assert_eq!(
        count(&evs, FileKind::Attrib, b"/etc/passwd"),
        1,
        "chmod:\n{}",
        show(&evs)
    );
    assert_eq!(
        evs.len(),
        1,
        "only the attrib (no create, no /etc):\n{}",
        show(&evs)
    );

    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.m("etc/sub/f"))
        .expect("open");
    std::io::Write::write_all(&mut f, b"more\n").expect("write");
    drop(f);
    let evs = events(&mut w);
    assert_eq!(
        count(&evs, FileKind::Modify, b"/etc/sub/f"),
        1,
        "append:\n{}",
        show(&evs)
    );
    assert_eq!(evs.len(), 1, "only the modify:\n{}", show(&evs));

    touch(&m.m("topf"));
    let evs = events(&mut w);
    assert_eq!(
        count(&evs, FileKind::Attrib, b"/topf"),
        1,
        "touch:\n{}",
        show(&evs)
    );
    assert_eq!(evs.len(), 1, "only the attrib:\n{}", show(&evs));

    // chmod of an image directory: copy-up of the dir, reported as its attrib.
    std::fs::set_permissions(m.m("d"), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    let evs = events(&mut w);
    assert_eq!(
        count(&evs, FileKind::Attrib, b"/d"),
        1,
        "chmod dir:\n{}",
        show(&evs)
    );
    assert_eq!(evs.len(), 1, "{}", show(&evs));
    assert!(evs[0].is_dir);

    // Writing an image file in a never-touched image dir (dir and file copied up at once).
    std::fs::write(m.m("d/e/g"), "new content").expect("write");
    let evs = events(&mut w);
    assert_count(&evs, FileKind::Modify, b"/d/e/g", 1);
    assert!(
        evs.iter().all(|e| e.kind != FileKind::Create),
        "{}",
        show(&evs)
    );
}

/// The directory `attrib`s among `evs`.
fn dir_attribs(evs: &[FileEvent]) -> Vec<FileEvent> {
    evs.iter()
        .filter(|e| e.kind == FileKind::Attrib && e.is_dir)
        .cloned()
        .collect()
}

#[test]
fn dir_attrib_explained_by_later_entry_changes_is_not_reported() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    // /etc copied up and watched, /n and /t made by the container.
    touch(&m.m("etc/sub/f"));
    std::fs::create_dir(m.m("n")).expect("mkdir");
    std::fs::create_dir(m.m("t")).expect("mkdir");
    let _ = events(&mut w);

    // Renaming a copied-up file into another directory: overlayfs first marks that
    // directory `impure` (an xattr: IN_ATTRIB on /n), then renames (IN_MOVED_TO in /n).
    // Both are done before the watcher reads, so when it handles the IN_ATTRIB, /n's
    // mtime was already moved by the rename whose event is still ahead in the queue.
    std::fs::rename(m.m("etc/passwd"), m.m("n/pw")).expect("mv image file");
    expect_events(
        &mut w,
        &[("rename", "/n/pw", false)],
        "mv /etc/passwd /n/pw",
    );

    // A genuine touch of a directory, with no entry change in it, is still reported.
    touch(&m.m("t"));
    expect_events(&mut w, &[("attrib", "/t", true)], "touch /t");
    // So is one of an image directory (copied up by the touch itself).
    touch(&m.m("d"));
    expect_events(&mut w, &[("attrib", "/d", true)], "touch /d");
    // And a chmod, even with entry changes right after it.
    std::fs::set_permissions(m.m("t"), std::fs::Permissions::from_mode(0o700)).expect("chmod");
    std::fs::File::create(m.m("t/f")).expect("create");
    expect_events(
        &mut w,
        &[("attrib", "/t", true), ("create", "/t/f", false)],
        "",
    );
}

#[test]
fn dir_xattr_after_entry_changes_is_not_an_attrib() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    std::fs::create_dir(m.m("t")).expect("mkdir");
    let _ = events(&mut w);
    // Entries made in /t (read and reported), then an xattr set on /t: an IN_ATTRIB whose
    // stat shows an mtime moved (by the create): nothing the container sees as an
    // attribute change of /t.
    std::fs::File::create(m.m("t/b")).expect("create");
    expect_events(&mut w, &[("create", "/t/b", false)], "create /t/b");
    std::thread::sleep(Duration::from_millis(20));
    let p = std::ffi::CString::new(m.m("t").as_os_str().as_encoded_bytes()).expect("path");
    // SAFETY: NUL-terminated path and name, a 1-byte value.
    let r = unsafe {
        libc::setxattr(
            p.as_ptr(),
            c"user.fsmon".as_ptr(),
            b"1".as_ptr().cast(),
            1,
            0,
        )
    };
    assert_eq!(r, 0, "setxattr: {}", std::io::Error::last_os_error());
    expect_events(&mut w, &[], "setxattr on /t after a create");
    // A chmod then is still reported.
    std::fs::set_permissions(m.m("t"), std::fs::Permissions::from_mode(0o711)).expect("chmod");
    expect_events(&mut w, &[("attrib", "/t", true)], "chmod /t");
}

/// An image with 200 files in /img, and /d/e.
fn many_files_image(lowers: &[std::path::PathBuf]) {
    let l = &lowers[0];
    std::fs::create_dir_all(l.join("img")).expect("mkdir");
    std::fs::create_dir_all(l.join("d/e")).expect("mkdir");
    for i in 0..200 {
        std::fs::write(l.join(format!("img/f{i}")), "image\n").expect("write");
    }
}

#[test]
fn concurrent_mkdir_and_rm_r_report_no_dir_attrib() {
    let _l = shared();
    let m = OverlayMount::new(1, many_files_image);
    let mut w = armed("c", &m);
    const ROUNDS: usize = 200;
    let merged = m.merged.clone();
    // The container makes and removes trees, moves image files into new directories
    // (overlayfs marks those `impure`: an IN_ATTRIB right before the entry change), while
    // the watcher reads as the daemon does. It never touches nor chmods a directory.
    let t = std::thread::spawn(move || {
        for i in 0..ROUNDS {
            let r = merged.join(format!("r{i}"));
            std::fs::create_dir_all(r.join("x")).expect("mkdir -p");
            // Varied pacing, so that the watcher takes /r<i>/x's baseline before the move
            // in some rounds and handles the move's IN_ATTRIB at every point of it.
            match i % 4 {
                1 => std::thread::yield_now(),
                2 => std::thread::sleep(Duration::from_micros(50)),
                3 => std::thread::sleep(Duration::from_millis(1)),
                _ => {}
            }
            std::fs::rename(merged.join(format!("img/f{i}")), r.join("x/f")).expect("mv");
            std::fs::create_dir(r.join("x/y")).expect("mkdir");
            std::fs::write(r.join("x/y/z"), "z").expect("write");
            rm_r(&r.join("x"));
            let dx = merged.join(format!("d/e/x{i}"));
            std::fs::create_dir_all(dx.join("y")).expect("mkdir -p");
            std::fs::write(dx.join("y/f"), "f").expect("write");
            rm_r(&dx);
        }
    });
    // Reads a little behind, as a busy daemon does: often after the whole move.
    let outs = read_while(&mut w, t, Duration::from_micros(100), Vec::new(), QUIET);
    let evs = files(&outs);
    let attribs = dir_attribs(&evs);
    let around: Vec<FileEvent> = evs
        .iter()
        .filter(|e| attribs.iter().any(|a| e.path.starts_with(&a.path)))
        .cloned()
        .collect();
    assert!(attribs.is_empty(), "{}", show(&around));
    for i in 0..ROUNDS {
        assert_count(&evs, FileKind::Create, format!("/r{i}").as_bytes(), 1);
    }
}

#[test]
fn deletes_of_image_entries_and_recreates() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    std::fs::remove_file(m.m("topf")).expect("rm");
    let evs = events(&mut w);
    assert_eq!(evs.len(), 1, "{}", show(&evs));
    assert_eq!(
        (evs[0].kind, &evs[0].path[..], evs[0].is_dir),
        (FileKind::Delete, &b"/topf"[..], false)
    );

    std::fs::remove_dir_all(m.m("d")).expect("rm -r");
    let evs = events(&mut w);
    for (p, is_dir) in [
        ("/d/e/g", false),
        ("/d/e", true),
        ("/d/h", false),
        ("/d", true),
    ] {
        let hits: Vec<_> = evs.iter().filter(|e| e.path == p.as_bytes()).collect();
        assert_eq!(hits.len(), 1, "{p}:\n{}", show(&evs));
        assert_eq!(
            (hits[0].kind, hits[0].is_dir),
            (FileKind::Delete, is_dir),
            "{p}:\n{}",
            show(&evs)
        );
    }
    assert_eq!(
        evs.len(),
        4,
        "nothing but the four deletes:\n{}",
        show(&evs)
    );

    // A copied-up file deleted: one delete.
    std::fs::write(m.m("etc/passwd"), "x").expect("write");
    let _ = events(&mut w);
    std::fs::remove_file(m.m("etc/passwd")).expect("rm");
    let evs = events(&mut w);
    assert_eq!(evs.len(), 1, "{}", show(&evs));
    assert_eq!(evs[0].kind, FileKind::Delete);

    // Re-create after delete.
    std::fs::write(m.m("topf"), "again").expect("write");
    std::fs::create_dir(m.m("d")).expect("mkdir");
    std::fs::write(m.m("etc/passwd"), "again").expect("write");
    let evs = events(&mut w);
    assert_count(&evs, FileKind::Create, b"/topf", 1);
    assert_count(&evs, FileKind::Create, b"/d", 1);
    assert_count(&evs, FileKind::Create, b"/etc/passwd", 1);
    assert!(evs.iter().any(|e| e.path == b"/d" && e.is_dir));
    assert!(
        evs.iter().all(|e| e.kind != FileKind::Delete),
        "{}",
        show(&evs)
    );
    assert_eq!(
        std::fs::read_dir(m.m("d")).expect("ls").count(),
        0,
        "opaque: old content hidden"
    );
    // The re-created (opaque) directory is watched.
    std::fs::write(m.m("d/h"), "new h").expect("write");
    let evs = events(&mut w);
    assert_count(&evs, FileKind::Create, b"/d/h", 1);
}

#[test]
fn renames_pair_and_paths_follow() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    std::fs::create_dir_all(m.m("ra/q/r")).expect("mkdir");
    std::fs::write(m.m("ra/f"), "1").expect("write");
    std::fs::write(m.m("x1"), "1").expect("write");
    std::fs::write(m.m("x2"), "2").expect("write");
    let _ = events(&mut w);

    let rename = |evs: &[FileEvent], old: &str, new: &str, is_dir: bool| {
        let hits: Vec<_> = evs
            .iter()
            .filter(|e| e.kind == FileKind::Rename && e.old_path.as_deref() == Some(old.as_bytes()))
            .collect();
        assert_eq!(hits.len(), 1, "rename {old}:\n{}", show(evs));
        assert_eq!(
            (&hits[0].path[..], hits[0].is_dir),
            (new.as_bytes(), is_dir),
            "{}",
            show(evs)
        );
    };

    std::fs::rename(m.m("ra"), m.m("rb")).expect("mv dir");
    std::fs::write(m.m("rb/f"), "2").expect("write");
    std::fs::write(m.m("rb/q/r/deep"), "3").expect("write");
    let evs = events(&mut w);
    rename(&evs, "/ra", "/rb", true);
    assert_count(&evs, FileKind::Modify, b"/rb/f", 1);
    assert_eq!(
        count(&evs, FileKind::Create, b"/rb/q/r/deep"),
        1,
        "descendant paths follow:\n{}",
        show(&evs)
    );
    assert!(
        evs.iter().all(|e| !e.path.starts_with(b"/ra/")),
        "{}",
        show(&evs)
    );

    std::fs::rename(m.m("rb/f"), m.m("rb/g")).expect("mv file");
    std::fs::rename(m.m("x1"), m.m("x2")).expect("mv over existing");
    std::fs::create_dir_all(m.m("n1/n2")).expect("mkdir");
    std::fs::rename(m.m("rb"), m.m("n1/n2/rc")).expect("mv into subdir");
    std::fs::write(m.m("n1/n2/rc/q/r/deeper"), "4").expect("write");
    let evs = events(&mut w);
    rename(&evs, "/rb/f", "/rb/g", false);
    rename(&evs, "/x1", "/x2", false);
    rename(&evs, "/rb", "/n1/n2/rc", true);
    assert_count(&evs, FileKind::Create, b"/n1/n2/rc/q/r/deeper", 1);
    assert!(
        evs.iter().all(|e| e.kind != FileKind::Delete),
        "{}",
        show(&evs)
    );

    // An image file renamed: overlay leaves a whiteout behind without telling; a new file
    // at the old name is then a create. (/etc is copied up and watched first: when the
    // rename itself copies the directory up, it is over before the directory can be
    // watched and the scan can only tell a create and a delete, see below.)
    touch(&m.m("etc/sub/f"));
    let _ = events(&mut w);
    std::fs::rename(m.m("etc/passwd"), m.m("etc/pw2")).expect("mv image file");
    let evs = events(&mut w);
    rename(&evs, "/etc/passwd", "/etc/pw2", false);
    assert_eq!(evs.len(), 1, "{}", show(&evs));
    std::fs::write(m.m("etc/passwd"), "new").expect("write");
    let evs = events(&mut w);
    assert_count(&evs, FileKind::Create, b"/etc/passwd", 1);

    // Renamed in a directory copied up by that very rename: a delete and a create.
    std::fs::rename(m.m("d/h"), m.m("d/h2")).expect("mv image file");
    let evs = events(&mut w);
    assert_count(&evs, FileKind::Delete, b"/d/h", 1);
    assert_count(&evs, FileKind::Create, b"/d/h2", 1);
    assert_eq!(evs.len(), 2, "{}", show(&evs));
}

/// A file moved from `old` to `new` is reported as one `rename`, or as a `create` and a
/// `delete`, and nothing else.
fn assert_moved_once(evs: &[FileEvent], old: &str, new: &str, what: &str) {
    let (old, new) = (old.as_bytes(), new.as_bytes());
    let about = evs
        .iter()
        .filter(|e| e.path == new || e.path == old || e.old_path.as_deref() == Some(old))
        .count();
    let renames = count(evs, FileKind::Rename, new);
    let pair = count(evs, FileKind::Create, new) + count(evs, FileKind::Delete, old);
    assert!(
        (renames == 1 && about == 1) || (renames == 0 && pair == 2 && about == 2),
        "{what}: one rename, or a create and a delete:\n{}",
        show(evs)
    );
}

#[test]
fn file_moved_into_a_new_dir_before_its_watch_is_reported_once() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    std::fs::create_dir(m.m("src")).expect("mkdir");
    std::fs::write(m.m("src/f"), "1").expect("write");
    let _ = events(&mut w);
    // The new directory is not watched yet when the file lands in it: its listing finds
    // the file, and the IN_MOVED_FROM in /src has no IN_MOVED_TO partner.
    std::fs::create_dir(m.m("dst")).expect("mkdir");
    std::fs::rename(m.m("src/f"), m.m("dst/f")).expect("mv");
    assert_moved_once(&events(&mut w), "/src/f", "/dst/f", "mkdir + mv");

    // The same while the watcher reads as the daemon does (the listing of the new
    // directory races the move at every point).
    const ROUNDS: usize = 200;
    for i in 0..ROUNDS {
        std::fs::write(m.m(&format!("src/g{i}")), "1").expect("write");
    }
    let _ = events(&mut w);
    let merged = m.merged.clone();
    let t = std::thread::spawn(move || {
        for i in 0..ROUNDS {
            std::fs::create_dir(merged.join(format!("d{i}"))).expect("mkdir");
            if i % 2 == 1 {
                std::thread::sleep(Duration::from_micros(30 * (i % 7) as u64));
            }
            std::fs::rename(
                merged.join(format!("src/g{i}")),
                merged.join(format!("d{i}/g")),
            )
            .expect("mv");
        }
    });
    let outs = read_while(&mut w, t, Duration::from_micros(20), Vec::new(), QUIET);
    let evs = files(&outs);
    for i in 0..ROUNDS {
        let (old, new) = (format!("/src/g{i}"), format!("/d{i}/g"));
        assert_moved_once(&evs, &old, &new, &format!("round {i}"));
    }
}

#[test]
fn hard_links_are_creates() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    std::fs::hard_link(m.m("topf"), m.m("hl")).expect("ln image file");
    std::fs::write(m.m("newf"), "n").expect("write");
    std::fs::hard_link(m.m("newf"), m.m("hl2")).expect("ln new file");
    let evs = events(&mut w);
    assert_count(&evs, FileKind::Create, b"/hl", 1);
    assert_count(&evs, FileKind::Create, b"/hl2", 1);
    assert_eq!(
        count(&evs, FileKind::Create, b"/topf"),
        0,
        "copy-up of the source:\n{}",
        show(&evs)
    );
}

#[test]
fn modify_is_coalesced_per_write_burst() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    for burst in 1..=2 {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(m.m("log"))
            .expect("open");
        for i in 0..1000 {
            std::io::Write::write_all(&mut f, format!("line {i}\n").as_bytes()).expect("write");
        }
        drop(f);
        let evs = events(&mut w);
        assert_eq!(
            count(&evs, FileKind::Modify, b"/log"),
            1,
            "burst {burst}:\n{}",
            show(&evs)
        );
        assert_eq!(
            count(&evs, FileKind::Create, b"/log"),
            usize::from(burst == 1),
            "{}",
            show(&evs)
        );
    }
}

#[test]
fn symlinks_are_never_followed_nor_swapped_into_a_watch() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    std::fs::write(m.outside.join("canary"), "host secret").expect("write");
    let mut w = armed("c", &m);

    // A symlink to / is an entry, never a directory to descend into.
    std::os::unix::fs::symlink("/", m.m("rootlink")).expect("symlink");
    std::os::unix::fs::symlink(&m.outside, m.m("hostlink")).expect("symlink");
    let evs = events(&mut w);
    assert_count(&evs, FileKind::Create, b"/rootlink", 1);
    assert_count(&evs, FileKind::Create, b"/hostlink", 1);
    assert!(evs.iter().all(|e| !e.is_dir), "{}", show(&evs));
    assert_eq!(evs.len(), 2, "{}", show(&evs));

    // Directories replaced by symlinks to a host dir before their event is handled, through
    // the merged view and directly in the upperdir; and a directory renamed away and
    // replaced by such a symlink.
    for i in 0..100 {
        let d = m.m(&format!("sw{i}"));
        std::fs::create_dir(&d).expect("mkdir");
        std::fs::write(d.join("inner"), "x").expect("write");
        std::fs::remove_dir_all(&d).expect("rm");
        std::os::unix::fs::symlink(&m.outside, &d).expect("symlink");

        let u = m.upper.join(format!("hw{i}"));
        std::fs::create_dir(&u).expect("mkdir");
        std::fs::remove_dir(&u).expect("rmdir");
        std::os::unix::fs::symlink(&m.outside, &u).expect("symlink");

        let r = m.m(&format!("rn{i}"));
        std::fs::create_dir_all(r.join("y")).expect("mkdir");
        std::fs::rename(&r, m.m(&format!("rn{i}.real"))).expect("mv");
        std::os::unix::fs::symlink(&m.outside, &r).expect("symlink");
    }
    let evs = events(&mut w);
    std::fs::write(m.outside.join("canary2"), "more").expect("write");
    std::fs::create_dir(m.outside.join("newdir")).expect("mkdir");
    let later = events(&mut w);
    let all: Vec<_> = evs.iter().chain(&later).collect();
    for e in &all {
        let hay = [&e.path[..], e.old_path.as_deref().unwrap_or_default()];
        for p in hay {
            assert!(
                !p.windows(6).any(|x| x == b"canary") && !p.ends_with(b"newdir"),
                "host content leaked: {}",
                String::from_utf8_lossy(p)
            );
            let first = p.split(|&c| c == b'/').nth(1).unwrap_or_default();
            let is_link = first.starts_with(b"sw")
                || first.starts_with(b"hw")
                || (first.starts_with(b"rn") && !first.ends_with(b".real"));
            assert!(
                !(is_link && p.iter().filter(|&&c| c == b'/').count() > 1),
                "descended into a symlink: {}",
                String::from_utf8_lossy(p)
            );
        }
    }
    assert!(later.is_empty(), "{}", show(&later));
    for i in 0..100 {
        assert!(count(&evs, FileKind::Create, format!("/rn{i}.real/y").as_bytes()) <= 1);
    }
    // Watches: the root, and each rn*.real with its y; nothing else.
    assert_eq!(w.container_watch_count("c"), 1 + 2 * 100);
}

#[test]
fn hostile_names_are_reported_byte_exact() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    let long = "L".repeat(255);
    let names: Vec<&[u8]> = vec![
        b"bad\xff\xfename",
        b"new\nline",
        b" lead space",
        b"back\\slash\"q",
        long.as_bytes(),
    ];
    let dir = std::ffi::OsStr::from_bytes(b"dir\xc3\x28\n");
    std::fs::create_dir(m.merged.join(dir)).expect("mkdir");
    for n in &names {
        let n = std::ffi::OsStr::from_bytes(n);
        std::fs::write(m.merged.join(n), "x").expect("write");
        std::fs::write(m.merged.join(dir).join(n), "y").expect("write");
    }
    let evs = events(&mut w);
    assert_no_duplicate_creates(&evs);
    assert_count(&evs, FileKind::Create, b"/dir\xc3\x28\n", 1);
    for n in &names {
        let mut top = b"/".to_vec();
        top.extend_from_slice(n);
        let mut inner = b"/dir\xc3\x28\n/".to_vec();
        inner.extend_from_slice(n);
        assert_count(&evs, FileKind::Create, &top, 1);
        assert_count(&evs, FileKind::Create, &inner, 1);
    }
}

#[test]
fn image_layers_whiteouts_and_opaque_dirs_are_honoured() {
    let _l = shared();
    // lower0 (top): deletes /x/gone, replaces /o by an opaque dir holding /o/a.
    // lower1 (bottom): /x/gone, /x/kept, /o/a, /o/b.
    let m = OverlayMount::new(2, |l| {
        std::fs::create_dir_all(l[1].join("x")).expect("mkdir");
        std::fs::create_dir_all(l[1].join("o")).expect("mkdir");
        for f in ["x/gone", "x/kept", "o/a", "o/b"] {
            std::fs::write(l[1].join(f), "bottom").expect("write");
        }
        std::fs::create_dir_all(l[0].join("x")).expect("mkdir");
        mknod_whiteout(&l[0].join("x/gone"));
        std::fs::create_dir_all(l[0].join("o")).expect("mkdir");
        set_opaque(&l[0].join("o"));
        std::fs::write(l[0].join("o/a"), "top").expect("write");
    });
    assert!(!m.m("x/gone").exists() && !m.m("o/b").exists() && m.m("x/kept").exists());
    let mut w = armed("c", &m);
    std::fs::write(m.m("x/gone"), "new").expect("write");
    std::fs::write(m.m("o/b"), "new").expect("write");
    std::fs::set_permissions(m.m("o/a"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    std::fs::set_permissions(m.m("x/kept"), std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let evs = events(&mut w);
    assert_eq!(
        count(&evs, FileKind::Create, b"/x/gone"),
        1,
        "hidden by a whiteout in a higher layer:\n{}",
        show(&evs)
    );
    assert_eq!(
        count(&evs, FileKind::Create, b"/o/b"),
        1,
        "hidden by an opaque dir:\n{}",
        show(&evs)
    );
    assert_count(&evs, FileKind::Attrib, b"/o/a", 1);
    assert_count(&evs, FileKind::Attrib, b"/x/kept", 1);
    let creates: Vec<_> = evs.iter().filter(|e| e.kind == FileKind::Create).collect();
    assert_eq!(creates.len(), 2, "{}", show(&evs));
    std::fs::remove_file(m.m("x/kept")).expect("rm");
    let evs = events(&mut w);
    assert_eq!(evs.len(), 1, "{}", show(&evs));
    assert_eq!(
        (evs[0].kind, &evs[0].path[..]),
        (FileKind::Delete, &b"/x/kept"[..])
    );
}

#[test]
fn removed_container_reports_nothing_more() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    std::fs::write(m.m("a"), "1").expect("write");
    w.remove_container("c");
    std::fs::write(m.m("b"), "2").expect("write");
    std::fs::create_dir(m.m("dd")).expect("mkdir");
    let outs = drain(&mut w, QUIET, MAX);
    assert!(outs.is_empty(), "{outs:?}");
    assert_eq!(w.watch_count(), 0);
    assert_eq!(w.container_watch_count("c"), 0);
}

#[test]
fn queue_overflow_is_reported_and_the_rescan_finds_everything() {
    let _l = exclusive();
    let m = OverlayMount::new(1, image);
    // A small queue so that the overflow certainly happens (the value is read when the
    // inotify instance is created), restored right after.
    let mut w = {
        let _q = SysctlGuard::set("fs/inotify/max_queued_events", 4096);
        armed("c", &m)
    };
    const DIRS: usize = 50;
    const PER_DIR: usize = 4000;
    let mut want: Vec<Vec<u8>> = Vec::new();
    for d in 0..DIRS {
        std::fs::create_dir(m.m(&format!("burst{d}"))).expect("mkdir");
        want.push(b(&format!("/burst{d}")));
    }
    // Watched directories first, so that the burst lands in the queue.
    let first = events(&mut w);
    assert_eq!(first.len(), DIRS, "{}", show(&first));
    for d in 0..DIRS {
        for f in 0..PER_DIR {
            let rel = format!("burst{d}/f{f}");
            std::fs::File::create(m.m(&rel)).expect("create");
            want.push(b(&format!("/{rel}")));
        }
    }
    let outs = drain(&mut w, QUIET, MAX);
    let overflows: Vec<_> = outs
        .iter()
        .filter(|o| {
            matches!(
                o,
                WatchOutput::Overflow {
                    container: None,
                    reason: "queue"
                }
            )
        })
        .collect();
    assert!(!overflows.is_empty(), "no overflow record");
    let evs: Vec<FileEvent> = first.into_iter().chain(files(&outs)).collect();
    assert_no_duplicate_creates(&evs);
    let created: HashSet<&[u8]> = evs
        .iter()
        .filter(|e| e.kind == FileKind::Create)
        .map(|e| &e.path[..])
        .collect();
    let missing: Vec<_> = want
        .iter()
        .filter(|p| !created.contains(&p[..]))
        .take(10)
        .collect();
    assert!(
        missing.is_empty(),
        "{} paths never reported, e.g. {missing:?}",
        want.len() - created.len()
    );
    assert!(
        evs.iter().any(|e| e.source == Source::Scan),
        "the rescan reported something"
    );
    assert!(
        evs.iter().all(|e| e.kind == FileKind::Create),
        "nothing but creates"
    );
    // Still watching after the rescan.
    std::fs::write(m.m("burst7/after"), "x").expect("write");
    let evs = events(&mut w);
    assert_count(&evs, FileKind::Create, b"/burst7/after", 1);
}

#[test]
fn watch_limit_overflows_one_container_and_not_the_other() {
    let _l = exclusive();
    let ma = OverlayMount::new(1, image);
    let mb = OverlayMount::new(1, image);
    let mc = OverlayMount::new(1, image);
    for i in 0..20 {
        std::fs::create_dir_all(mc.upper.join(format!("pre/p{i}"))).expect("mkdir");
    }
    let mut w = new_watcher();
    w.add_container("a", ma.layer()).expect("arm a");
    w.add_container("b", mb.layer()).expect("arm b");
    // Deep and wide, so that the limit is hit even if other processes free a few watches.
    let mut dirs = vec!["l0".to_owned(), "l0/l1".to_owned(), "l0/l1/l2".to_owned()];
    dirs.extend((0..100).map(|i| format!("l0/l1/l2/w{i}")));
    let (c_stats, outs) = {
        // Room for 2 more watches (a per-user limit, so machine-wide for root), for as
        // short a time as possible.
        let _g = SysctlGuard::set("fs/inotify/max_user_watches", inotify_watches_in_use() + 2);
        // Arming under the limit: what can be armed is, the rest is indexed and reported.
        let c_stats = w.add_container("c", mc.layer()).expect("arm c");
        for d in &dirs {
            std::fs::create_dir_all(ma.m(d)).expect("mkdir -p");
            std::fs::write(ma.m(d).join("f"), "x").expect("write");
        }
        std::fs::write(mb.m("bfile"), "y").expect("write");
        (c_stats, drain(&mut w, QUIET, MAX))
    };
    assert_eq!(c_stats.dirs, 22, "{c_stats:?}");
    assert!(c_stats.unwatched_dirs > 0, "{c_stats:?}");
    assert!(
        outs.iter().any(|o| matches!(o, WatchOutput::Overflow { container: Some(c), reason: "watch_limit" } if c == "c")),
        "{outs:?}"
    );
    let limit: Vec<_> = outs
        .iter()
        .filter(|o| matches!(o, WatchOutput::Overflow { container: Some(c), reason: "watch_limit" } if c == "a"))
        .collect();
    assert_eq!(limit.len(), 1, "{outs:?}");
    assert!(
        !outs
            .iter()
            .any(|o| matches!(o, WatchOutput::Overflow { container: Some(c), .. } if c == "b")),
        "{outs:?}"
    );
    let evs = files(&outs);
    let (a, bb): (Vec<_>, Vec<_>) = evs.into_iter().partition(|e| e.container == "a");
    assert_count(&bb, FileKind::Create, b"/bfile", 1);
    // What the unwatched directories held when listed is still reported.
    assert_no_duplicate_creates(&a);
    for d in &dirs {
        assert_count(&a, FileKind::Create, format!("/{d}").as_bytes(), 1);
        assert_count(&a, FileKind::Create, format!("/{d}/f").as_bytes(), 1);
    }
    assert!(w.container_watch_count("a") < 1 + dirs.len());
    // Limit restored: b keeps working.
    std::fs::write(mb.m("bfile2"), "z").expect("write");
    let evs = events(&mut w);
    assert_count(&evs, FileKind::Create, b"/bfile2", 1);
}

#[test]
fn watch_limit_retry_watches_and_rescans_what_was_unwatched() {
    let _l = exclusive();
    let m = OverlayMount::new(1, image);
    const DIRS: usize = 20;
    for i in 0..DIRS {
        std::fs::create_dir_all(m.upper.join(format!("pre/p{i}/q"))).expect("mkdir");
        std::fs::write(m.upper.join(format!("pre/p{i}/old")), "1").expect("write");
        std::fs::write(m.upper.join(format!("pre/p{i}/gone")), "1").expect("write");
    }
    let is_limit = |o: &WatchOutput| matches!(o, WatchOutput::Overflow { container: Some(c), reason: "watch_limit" } if c == "c");
    let mut w = new_watcher();
    let stats = {
        // Room for 2 more watches (/ and /pre), for as short a time as possible.
        let _g = SysctlGuard::set("fs/inotify/max_user_watches", inotify_watches_in_use() + 2);
        let stats = w.add_container("c", m.layer()).expect("arm");
        let outs = drain(&mut w, QUIET, MAX);
        assert_eq!(outs.iter().filter(|o| is_limit(o)).count(), 1, "{outs:?}");
        // Still at the limit: retried, quietly.
        for _ in 0..3 {
            w.retry_unwatched();
            let outs = drain(&mut w, QUIET, MAX);
            assert!(outs.is_empty(), "{outs:?}");
        }
        stats
    };
    // /, /pre, /pre/p<i>, /pre/p<i>/q.
    assert_eq!(stats.dirs, 2 + 2 * DIRS, "{stats:?}");
    assert!(stats.unwatched_dirs > 0, "{stats:?}");
    let watched_before = w.container_watch_count("c");
    assert!(watched_before < stats.dirs, "{watched_before} {stats:?}");

    // Limit restored. What the container does meanwhile in every directory: only the
    // watched ones tell.
    for i in 0..DIRS {
        let p = |f: &str| m.m(&format!("pre/p{i}/{f}"));
        std::fs::File::create(p("new")).expect("create");
        append(&p("old"), b"2");
        std::fs::remove_file(p("gone")).expect("rm");
        std::fs::File::create(p("q/qnew")).expect("create");
        std::fs::create_dir(p("sub")).expect("mkdir");
        std::fs::File::create(p("sub/f")).expect("create");
    }
    // What a new directory holds is found by its listing, even when watched.
    let in_sub = |e: &FileEvent| e.path.windows(5).any(|w| w == b"/sub/");
    let before = events(&mut w);
    assert!(
        before
            .iter()
            .all(|e| e.source == Source::Inotify || in_sub(e)),
        "{}",
        show(&before)
    );
    w.retry_unwatched();
    let after = events(&mut w);
    assert!(
        after.iter().all(|e| e.source == Source::Scan),
        "{}",
        show(&after)
    );
    assert!(!after.is_empty(), "the rescan found nothing");
    assert_eq!(w.container_watch_count("c"), stats.dirs + DIRS);
    let all: Vec<FileEvent> = before.iter().chain(&after).cloned().collect();
    assert_no_duplicate_creates(&all);
    for i in 0..DIRS {
        let p = |f: &str| format!("/pre/p{i}/{f}");
        for (kind, f) in [
            (FileKind::Create, "new"),
            (FileKind::Modify, "old"),
            (FileKind::Delete, "gone"),
            (FileKind::Create, "q/qnew"),
            (FileKind::Create, "sub"),
            (FileKind::Create, "sub/f"),
        ] {
            assert_eq!(
                count(&all, kind, p(f).as_bytes()),
                1,
                "{kind:?} {f}:\n{}",
                show(&all)
            );
        }
    }
    assert_eq!(all.len(), 6 * DIRS, "{}", show(&all));
    // Each directory told either by inotify (watched) or by the rescan (unwatched).
    let dirs_of = |evs: &[FileEvent]| -> HashSet<Vec<u8>> {
        evs.iter()
            .filter(|e| !in_sub(e))
            .map(|e| {
                let cut = e.path.iter().rposition(|&c| c == b'/').unwrap_or(0);
                e.path[..cut].to_vec()
            })
            .collect()
    };
    let (told, rescanned) = (dirs_of(&before), dirs_of(&after));
    assert!(told.is_disjoint(&rescanned), "{told:?} {rescanned:?}");
    assert_eq!(
        told.len() + rescanned.len(),
        2 * DIRS,
        "{told:?} {rescanned:?}"
    );

    // From now on, inotify tells, in the retried directories and in those found new.
    for i in 0..DIRS {
        for f in ["later", "q/later", "sub/later"] {
            std::fs::File::create(m.m(&format!("pre/p{i}/{f}"))).expect("create");
        }
    }
    let evs = events(&mut w);
    for i in 0..DIRS {
        for f in ["later", "q/later", "sub/later"] {
            let p = format!("/pre/p{i}/{f}");
            assert_count(&evs, FileKind::Create, p.as_bytes(), 1);
        }
    }
    assert_eq!(evs.len(), 3 * DIRS, "{}", show(&evs));
    assert!(
        evs.iter().all(|e| e.source == Source::Inotify),
        "{}",
        show(&evs)
    );
    // Nothing left to retry: a no-op.
    w.retry_unwatched();
    let outs = drain(&mut w, QUIET, MAX);
    assert!(outs.is_empty(), "{outs:?}");
}

/// Removes a tree the way `rm -r` does: depth first, each file unlinked, each directory
/// removed once empty.
/// Reads as the daemon does (every `pause`) while the activity thread `t` runs, then
/// drains what is left (quiet for `quiet`); outputs are appended to `outs`.
fn read_while(
    w: &mut Watcher,
    t: std::thread::JoinHandle<()>,
    pause: Duration,
    mut outs: Vec<WatchOutput>,
    quiet: Duration,
) -> Vec<WatchOutput> {
    while !t.is_finished() {
        w.read_events(&mut outs).expect("read_events");
        if !pause.is_zero() {
            std::thread::sleep(pause);
        }
    }
    t.join().expect("activity thread");
    outs.extend(drain(w, quiet, MAX));
    outs
}

fn rm_r(p: &Path) {
    for e in std::fs::read_dir(p).expect("ls") {
        let e = e.expect("dirent");
        if e.file_type().expect("type").is_dir() {
            rm_r(&e.path());
        } else {
            std::fs::remove_file(e.path()).expect("unlink");
        }
    }
    std::fs::remove_dir(p).expect("rmdir");
}

/// The events, as (kind, path, is_dir), sorted: sources left out.
fn summary(evs: &[FileEvent]) -> Vec<(&'static str, String, bool)> {
    let mut v: Vec<_> = evs
        .iter()
        .map(|e| {
            (
                e.kind.as_str(),
                String::from_utf8_lossy(&e.path).into_owned(),
                e.is_dir,
            )
        })
        .collect();
    v.sort();
    v
}

fn want(list: &[(&'static str, &str, bool)]) -> Vec<(&'static str, String, bool)> {
    let mut v: Vec<_> = list.iter().map(|&(k, p, d)| (k, p.to_owned(), d)).collect();
    v.sort();
    v
}

/// Drains the watcher and asserts that it reported exactly `list` (kind, path, is_dir, in
/// any order; sources left out). `what` names the step in the failure message.
#[track_caller]
fn expect_events(w: &mut Watcher, list: &[(&'static str, &str, bool)], what: &str) {
    let evs = events(w);
    assert_eq!(summary(&evs), want(list), "{what}\n{}", show(&evs));
}

/// An image with /data/sub/lower.txt, /data/sub/other.txt, /data/sub/deep/x and /data/top.
fn data_image(lowers: &[std::path::PathBuf]) {
    let l = &lowers[0];
    std::fs::create_dir_all(l.join("data/sub/deep")).expect("mkdir");
    for f in [
        "data/sub/lower.txt",
        "data/sub/other.txt",
        "data/sub/deep/x",
        "data/top",
    ] {
        std::fs::write(l.join(f), "image\n").expect("write");
    }
}

const DATA_DELETES: [(&str, &str, bool); 7] = [
    ("delete", "/data/sub/lower.txt", false),
    ("delete", "/data/sub/other.txt", false),
    ("delete", "/data/sub/deep/x", false),
    ("delete", "/data/sub/deep", true),
    ("delete", "/data/sub", true),
    ("delete", "/data/top", false),
    ("delete", "/data", true),
];

#[test]
fn delete_after_copy_up_is_reported_once() {
    let _l = shared();
    // The reported case: touch of an image file (copy-up of /data, /data/sub and the file),
    // then `rm -r` of the tree; read between the two, and both in one go.
    for drain_between in [true, false] {
        let m = OverlayMount::new(1, data_image);
        let mut w = armed("c", &m);
        touch(&m.m("data/sub/lower.txt"));
        let mut evs = Vec::new();
        if drain_between {
            evs = events(&mut w);
            assert_eq!(
                summary(&evs),
                want(&[("attrib", "/data/sub/lower.txt", false)]),
                "touch:\n{}",
                show(&evs)
            );
            evs.clear();
        }
        rm_r(&m.m("data"));
        evs.extend(events(&mut w));
        // Both at once: the copy-up and the attrib happened in directories deleted before
        // they could be watched, so the attrib may not be seen at all.
        let attribs = count(&evs, FileKind::Attrib, b"/data/sub/lower.txt");
        assert!(attribs <= usize::from(!drain_between), "{}", show(&evs));
        evs.retain(|e| e.kind != FileKind::Attrib);
        assert_eq!(
            summary(&evs),
            want(&DATA_DELETES),
            "drain between: {drain_between}:\n{}",
            show(&evs)
        );
        // Nothing is left to report.
        let evs = events(&mut w);
        assert!(evs.is_empty(), "{}", show(&evs));
    }
}

#[test]
fn delete_after_chmod_or_append_is_reported_once() {
    let _l = shared();
    let m = OverlayMount::new(1, data_image);
    let mut w = armed("c", &m);
    std::fs::set_permissions(
        m.m("data/sub/lower.txt"),
        std::fs::Permissions::from_mode(0o600),
    )
    .expect("chmod");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(m.m("data/sub/deep/x"))
        .expect("open");
    std::io::Write::write_all(&mut f, b"more\n").expect("write");
    drop(f);
    expect_events(
        &mut w,
        &[
            ("attrib", "/data/sub/lower.txt", false),
            ("modify", "/data/sub/deep/x", false),
        ],
        "",
    );
    rm_r(&m.m("data/sub"));
    expect_events(&mut w, &DATA_DELETES[..5], "rm -r /data/sub");
    rm_r(&m.m("data"));
    expect_events(&mut w, &DATA_DELETES[5..], "rm -r /data");
}

#[test]
fn copied_up_file_then_its_emptied_dir_are_deleted_once_each() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let mut w = armed("c", &m);
    // /d/e holds only g: copy it up, delete it, then the now-empty /d/e.
    touch(&m.m("d/e/g"));
    expect_events(&mut w, &[("attrib", "/d/e/g", false)], "");
    std::fs::remove_file(m.m("d/e/g")).expect("rm");
    expect_events(&mut w, &[("delete", "/d/e/g", false)], "");
    std::fs::remove_dir(m.m("d/e")).expect("rmdir");
    expect_events(&mut w, &[("delete", "/d/e", true)], "");
    // An image file never touched before: one delete, at the root and in image
    // directories never touched (copied up silently on the way).
    std::fs::remove_file(m.m("topf2")).expect("rm");
    std::fs::remove_file(m.m("etc/sub/f")).expect("rm");
    expect_events(
        &mut w,
        &[("delete", "/topf2", false), ("delete", "/etc/sub/f", false)],
        "",
    );
    // And a path deleted twice over (re-created, then removed again): one delete each time.
    std::fs::write(m.m("topf2"), "again").expect("write");
    std::fs::remove_file(m.m("topf2")).expect("rm");
    std::fs::create_dir(m.m("d/e")).expect("mkdir");
    std::fs::remove_dir(m.m("d/e")).expect("rmdir");
    let evs = events(&mut w);
    assert_count(&evs, FileKind::Delete, b"/topf2", 1);
    assert_count(&evs, FileKind::Delete, b"/d/e", 1);
}

#[test]
fn rm_r_read_while_it_runs_reports_each_delete_once() {
    let _l = shared();
    // The same `rm -r` of a copied-up tree, read while it runs (as the daemon does), with
    // varied pacing: events are handled in every order relative to overlayfs' own steps
    // (copy-up, exchange with an empty opaque dir, whiteout, cleanup in the workdir).
    fn rm_paced(p: &Path, pace: usize) {
        let pause = || match pace {
            1 => std::thread::yield_now(),
            2 => std::thread::sleep(Duration::from_micros(50)),
            3 => std::thread::sleep(Duration::from_millis(1)),
            _ => {}
        };
        for e in std::fs::read_dir(p).expect("ls") {
            let e = e.expect("dirent");
            if e.file_type().expect("type").is_dir() {
                rm_paced(&e.path(), pace);
            } else {
                std::fs::remove_file(e.path()).expect("unlink");
            }
            pause();
        }
        std::fs::remove_dir(p).expect("rmdir");
        pause();
    }
    const QUICK: Duration = Duration::from_millis(50);
    for round in 0..48 {
        let m = OverlayMount::new(1, data_image);
        let mut w = armed("c", &m);
        match round % 3 {
            0 => touch(&m.m("data/sub/lower.txt")),
            1 => std::fs::set_permissions(
                m.m("data/sub/deep/x"),
                std::fs::Permissions::from_mode(0o600),
            )
            .expect("chmod"),
            _ => std::fs::write(m.m("data/sub/other.txt"), "new").expect("write"),
        }
        let mut outs = Vec::new();
        if round % 2 == 0 {
            outs = drain(&mut w, QUICK, MAX);
        }
        let target = m.m("data");
        let pace = (round / 6) % 4;
        let t = std::thread::spawn(move || rm_paced(&target, pace));
        let outs = read_while(&mut w, t, Duration::ZERO, outs, QUICK);
        let mut evs = files(&outs);
        evs.retain(|e| e.kind == FileKind::Delete);
        assert_eq!(
            summary(&evs),
            want(&DATA_DELETES),
            "round {round}:\n{}",
            show(&files(&outs))
        );
    }
}

fn append(p: &Path, data: &[u8]) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(p)
        .expect("open for append");
    std::io::Write::write_all(&mut f, data).expect("append");
}

#[test]
fn armed_late_reports_what_the_container_did_since_it_started() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let since = std::time::SystemTime::now();
    // The container's first instructions, before fsmon could arm it.
    std::fs::File::create(m.m("f0")).expect("touch");
    std::fs::create_dir_all(m.m("a/b/c")).expect("mkdir -p");
    std::fs::write(m.m("a/b/c/f1"), "x\n").expect("write");
    std::fs::set_permissions(m.m("etc/passwd"), std::fs::Permissions::from_mode(0o600))
        .expect("chmod");
    append(&m.m("d/h"), b"y\n");
    std::fs::remove_file(m.m("topf")).expect("rm");

    let mut w = new_watcher();
    let stats = w.add_container_since("c", m.layer(), since).expect("arm");
    let evs = events(&mut w);
    assert_eq!(
        summary(&evs),
        want(&[
            ("create", "/f0", false),
            ("create", "/a", true),
            ("create", "/a/b", true),
            ("create", "/a/b/c", true),
            ("create", "/a/b/c/f1", false),
            ("attrib", "/etc/passwd", false),
            ("modify", "/d/h", false),
            ("delete", "/topf", false),
        ]),
        "{}",
        show(&evs)
    );
    assert!(
        evs.iter()
            .all(|e| e.source == Source::Scan && e.container == "c"),
        "{}",
        show(&evs)
    );
    let pos = |p: &[u8]| evs.iter().position(|e| e.path == p).expect("reported");
    assert!(pos(b"/a") < pos(b"/a/b") && pos(b"/a/b") < pos(b"/a/b/c/f1"));
    // /, /a, /a/b, /a/b/c, /etc, /d; f0, f1, passwd, h; the whiteout of /topf.
    assert_eq!(
        (stats.dirs, stats.files, stats.whiteouts),
        (6, 4, 1),
        "{stats:?}"
    );
    assert_eq!(w.container_watch_count("c"), 6);

    // What was found new is watched and indexed like the rest.
    std::fs::File::create(m.m("a/b/c/f2")).expect("touch");
    std::fs::write(m.m("f0"), "more").expect("write");
    expect_events(
        &mut w,
        &[("create", "/a/b/c/f2", false), ("modify", "/f0", false)],
        "",
    );
}

/// A restarted container's upper layer: content from its earlier run (an upper-only tree,
/// a copied-up image file, a deleted image file), then the instant it started again.
fn earlier_run(m: &OverlayMount) -> std::time::SystemTime {
    std::fs::create_dir_all(m.m("old/dir")).expect("mkdir");
    std::fs::write(m.m("old/dir/f"), "1").expect("write");
    std::fs::write(m.m("old/g"), "1").expect("write");
    std::fs::write(m.m("etc/passwd"), "changed").expect("write");
    std::fs::remove_file(m.m("topf")).expect("rm");
    // Past the timestamp granularity (and the watcher's 10 ms margin).
    std::thread::sleep(Duration::from_millis(20));
    let since = std::time::SystemTime::now();
    // This run, before the watches: a new file in an old directory, an old file modified.
    std::fs::write(m.m("old/dir/new"), "2").expect("write");
    append(&m.m("old/g"), b"2");
    since
}

#[test]
fn armed_late_after_a_restart_reports_only_what_changed_since() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let since = earlier_run(&m);
    let mut w = new_watcher();
    let stats = w.add_container_since("c", m.layer(), since).expect("arm");
    let evs = events(&mut w);
    assert_eq!(
        summary(&evs),
        want(&[
            ("create", "/old/dir/new", false),
            ("modify", "/old/g", false)
        ]),
        "old directories and files are not reported:\n{}",
        show(&evs)
    );
    assert!(
        evs.iter().all(|e| e.source == Source::Scan),
        "{}",
        show(&evs)
    );
    assert_eq!(
        (stats.dirs, stats.files, stats.whiteouts),
        (4, 4, 1),
        "{stats:?}"
    );

    std::fs::write(m.m("old/dir/new"), "3").expect("write");
    expect_events(&mut w, &[("modify", "/old/dir/new", false)], "");
}

#[test]
fn armed_without_a_start_instant_reports_nothing_of_the_same_layer() {
    let _l = shared();
    let m = OverlayMount::new(1, image);
    let _since = earlier_run(&m);
    let mut w = new_watcher();
    let stats = w.add_container("c", m.layer()).expect("arm");
    let evs = events(&mut w);
    assert!(evs.is_empty(), "{}", show(&evs));
    assert_eq!(
        (stats.dirs, stats.files, stats.whiteouts),
        (4, 4, 1),
        "{stats:?}"
    );
}

/// A container's exit is read from `cgroup.events` when fsmon gets to a modify of it, which
/// may be long after that modify (a stalled fsmon): the file then already says `populated
/// 0` at an *earlier* modify (a thaw, init joining), before the container's file events, or
/// is gone with its cgroup. The exit must still come after those events, where its own
/// modify is, or they are lost with it.
#[test]
fn exit_read_late_comes_after_the_file_events_before_it() {
    let _l = shared();
    for cgroup_removed in [false, true] {
        let m = OverlayMount::new(1, image);
        let cg = tempfile::tempdir().expect("temp dir");
        let events_file = cg.path().join("cgroup.events");
        std::fs::write(&events_file, "populated 1\nfrozen 1\n").expect("write");
        let mut w = armed("c", &m);
        w.watch_exit("c", cg.path()).expect("watch_exit");
        // fsmon thaws it (a modify), then the container runs and exits (and its cgroup
        // goes), all before fsmon reads.
        std::fs::write(&events_file, "populated 1\nfrozen 0\n").expect("write");
        std::fs::write(m.m("f0"), "x").expect("write");
        std::fs::create_dir_all(m.m("a/b")).expect("mkdir");
        std::fs::write(m.m("a/b/f1"), "x").expect("write");
        std::fs::write(&events_file, "populated 0\nfrozen 0\n").expect("write");
        if cgroup_removed {
            std::fs::remove_file(&events_file).expect("rm");
        }
        let outs = drain(&mut w, QUIET, MAX);
        let exits: Vec<usize> = outs
            .iter()
            .enumerate()
            .filter(|(_, o)| matches!(o, WatchOutput::Exited { .. }))
            .map(|(i, _)| i)
            .collect();
        let evs = files(&outs);
        assert_eq!(
            exits,
            vec![outs.len() - 1],
            "cgroup removed: {cgroup_removed}; one exit, last: {outs:?}"
        );
        for p in ["/f0", "/a", "/a/b", "/a/b/f1"] {
            assert_count(&evs, FileKind::Create, p.as_bytes(), 1);
        }
    }
}
