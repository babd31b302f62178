//! What every container of the watcher shares: the inotify fd and its mask, the map of
//! watch descriptors to their directories, the output being built, and the context of the
//! read whose events are being handled.
//!
//! Kernel feature: inotify(7) (2.6.13; `IN_EXCL_UNLINK` 2.6.36).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use crate::event::WatchOutput;

use super::sys::Dirent;
use super::trace::{real_now_ms, Clock};
use super::tree::NodeRef;

/// Change events only. Never `IN_ACCESS`/`IN_OPEN`/`IN_CLOSE_NOWRITE` (every read would
/// cost an event: −31% read throughput measured). `IN_DELETE_SELF`/`IN_MOVE_SELF` are
/// left out too: the parent's `IN_DELETE`/`IN_MOVED_*` and the final `IN_IGNORED` say the
/// same, and every one of them would take a queue slot. `IN_ONLYDIR`: the watch is refused
/// if the fd somehow is not a directory. `IN_EXCL_UNLINK`: no events from files already
/// unlinked (still open). No `IN_DONT_FOLLOW`: watches are added through the
/// `/proc/self/fd/N` magic link, which must be followed (see `SysFs::add_watch`).
pub(super) const MASK: u32 = libc::IN_CREATE
    | libc::IN_MODIFY
    | libc::IN_CLOSE_WRITE
    | libc::IN_ATTRIB
    | libc::IN_DELETE
    | libc::IN_MOVED_FROM
    | libc::IN_MOVED_TO
    | libc::IN_ONLYDIR
    | libc::IN_EXCL_UNLINK;

/// Who a watch descriptor belongs to.
#[derive(Clone, Copy, Debug)]
pub(super) struct WdOwner {
    pub(super) container: usize,
    pub(super) node: NodeRef,
}

/// What all containers share: the inotify fd, the wd map, the outputs being built.
pub(super) struct Shared {
    pub(super) inotify: inotify::Inotify,
    pub(super) wds: HashMap<i32, WdOwner>,
    /// Outputs in order; `None` is a slot that a later event cancelled.
    pub(super) out: Vec<Option<WatchOutput>>,
    pub(super) epoch: Instant,
    /// The clock of `modify` bursts when it is not the real one (recording, replaying).
    pub(super) clock: Option<Arc<dyn Clock>>,
    pub(super) serial: u64,
    pub(super) dirbuf: Vec<u8>,
    pub(super) dirents: Vec<Dirent>,
    /// The number of the read whose events are being handled ([`super::sys::next_read`]).
    pub(super) read_gen: u32,
    /// The event right after the one being handled.
    pub(super) next: NextEvent,
}

/// The event right after the one being handled, as far as the same read tells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum NextEvent {
    /// Not known: the event being handled is the last of its read, or no read is handled.
    Unknown,
    /// An `IN_MOVED_FROM` of the same name in the same directory: the other half of an
    /// exchange. `is_dir`: of a directory.
    MovedFromSameName { is_dir: bool },
    /// Any other event.
    Other,
}

impl Shared {
    pub fn new(inotify: inotify::Inotify) -> Shared {
        Shared {
            inotify,
            wds: HashMap::new(),
            out: Vec::new(),
            epoch: Instant::now(),
            clock: None,
            serial: 0,
            dirbuf: Vec::new(),
            dirents: Vec::new(),
            read_gen: 0,
            next: NextEvent::Unknown,
        }
    }

    pub(super) fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    /// Milliseconds since the watcher started, wrapping, never 0 (0 means "no burst").
    pub(super) fn now_ms(&self) -> u32 {
        match &self.clock {
            None => real_now_ms(self.epoch),
            Some(clock) => clock.now_ms(self.epoch),
        }
    }
}
