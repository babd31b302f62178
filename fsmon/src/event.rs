//! The daemon's internal vocabulary for file-system changes, shared by the watcher (which
//! produces them) and the record encoder (which prints them). Pure data, no IO.

/// A 64-hex container id, as the container runtime names it.
pub type ContainerId = String;

/// What happened to a file, in the container's terms (SPEC "File records").
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FileKind {
    /// A new file or directory appeared in the container's view.
    Create,
    /// A file's content changed (coalesced: at most one per file per write burst).
    Modify,
    /// Metadata (mode, owner, times, xattrs, link count) changed.
    Attrib,
    /// A file or directory disappeared from the container's view.
    Delete,
    /// Moved within the container; `old_path` says from where.
    Rename,
}

impl FileKind {
    /// The record's `kind` string.
    pub fn as_str(self) -> &'static str {
        match self {
            FileKind::Create => "create",
            FileKind::Modify => "modify",
            FileKind::Attrib => "attrib",
            FileKind::Delete => "delete",
            FileKind::Rename => "rename",
        }
    }
}

/// How fsmon learned of a change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// A kernel inotify event.
    Inotify,
    /// Found by scanning (a new directory's contents, a resync after overflow).
    Scan,
}

impl Source {
    /// The record's `source` string.
    pub fn as_str(self) -> &'static str {
        match self {
            Source::Inotify => "inotify",
            Source::Scan => "scan",
        }
    }
}

/// One file-system change of one container, with paths inside the container.
///
/// Paths are raw bytes (Linux names need not be UTF-8); the encoder decides how to print
/// them. They are absolute container paths (`/etc/passwd`), never host paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileEvent {
    /// The container the change happened in.
    pub container: ContainerId,
    /// What happened.
    pub kind: FileKind,
    /// Absolute path inside the container.
    pub path: Vec<u8>,
    /// For `Rename`: where it was before.
    pub old_path: Option<Vec<u8>>,
    /// Whether the object is a directory.
    pub is_dir: bool,
    /// How fsmon learned of it.
    pub source: Source,
}

/// Everything the watcher can tell the daemon.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum WatchOutput {
    /// A file change to report.
    File(FileEvent),
    /// Events were (or may have been) lost; `container` is `None` when the whole inotify
    /// queue overflowed. A rescan follows and its findings come as `Source::Scan` files.
    Overflow {
        /// The container affected, when known.
        container: Option<ContainerId>,
        /// Why: `"queue"` (kernel queue overflow), `"watch_limit"` (ENOSPC adding a
        /// watch), ... Printed as the record's `reason`.
        reason: &'static str,
    },
    /// The container's last process exited (its cgroup v2 `cgroup.events` says
    /// `populated 0`). Everything before this in the stream is the container's own doing;
    /// nothing after it is (e.g. the engine removing a `--rm` container's layer).
    Exited {
        /// The container.
        container: ContainerId,
    },
}

impl WatchOutput {
    /// The container the output is about (`None`: the whole queue overflowed).
    pub fn container(&self) -> Option<&ContainerId> {
        match self {
            WatchOutput::File(ev) => Some(&ev.container),
            WatchOutput::Exited { container } => Some(container),
            WatchOutput::Overflow { container, .. } => container.as_ref(),
        }
    }
}
