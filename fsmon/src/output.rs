//! The record stream: stdout, or a file opened for appending (mode 0600: records name
//! every file each container touches) and reopened on SIGHUP so that `logrotate` can move
//! it away without losing a line.
//!
//! A reader that goes away (`fsmon run | head -3`: the pipe's read end is closed) is not
//! an error: the stream is marked closed, later writes are discarded, and the daemon
//! shuts down the way it does on SIGTERM (pending events drained, nothing left frozen).
//! A closed pipe is noticed by the first write that fails with `EPIPE` (Rust ignores
//! `SIGPIPE`), or earlier by [`Output::reader_gone`], which polls the descriptor for
//! `POLLERR`/`POLLHUP` (Linux reports `POLLERR` on a pipe whose reader closed it).

use std::{
    fs::File,
    io::{self, Write},
    os::fd::{AsFd, AsRawFd},
    os::unix::fs::OpenOptionsExt as _,
    path::{Path, PathBuf},
};

use crate::daemon::OutputTarget;

/// Why the output could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    /// `--output` could not be opened (or reopened after SIGHUP).
    #[error("cannot open --output {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// Duplicating stdout failed.
    #[error("cannot use stdout")]
    Stdout(#[source] io::Error),
    /// A write failed for a reason other than the reader going away.
    #[error("writing to --output")]
    Write(#[source] io::Error),
}

/// Where records are written.
pub struct Output {
    file: File,
    /// The path to reopen on SIGHUP; `None` for stdout.
    path: Option<PathBuf>,
    /// The reader went away: writes are discarded from now on.
    closed: bool,
}

/// Opens `path` for appending, creating it with mode 0600 (an existing file keeps its
/// mode: an operator who chose another one meant it).
fn open_append(path: &Path) -> Result<File, OutputError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
        .map_err(|source| OutputError::Open {
            path: path.to_owned(),
            source,
        })
}

impl Output {
    /// Opens the target.
    pub fn open(target: &OutputTarget) -> Result<Output, OutputError> {
        let (file, path) = match target {
            // Our own handle on fd 1, written in whole batches (std's `Stdout` would add a
            // lock and a line buffer to every write).
            OutputTarget::Stdout => (
                File::from(
                    io::stdout()
                        .as_fd()
                        .try_clone_to_owned()
                        .map_err(OutputError::Stdout)?,
                ),
                None,
            ),
            OutputTarget::File(p) => (open_append(p)?, Some(p.clone())),
        };
        Ok(Output {
            file,
            path,
            closed: false,
        })
    }

    /// Writes `buf` whole. A reader that went away closes the stream (see the module doc)
    /// and is not an error.
    pub fn write_all(&mut self, buf: &[u8]) -> Result<(), OutputError> {
        if self.closed {
            return Ok(());
        }
        match self.file.write_all(buf) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::BrokenPipe => {
                self.close_for_gone_reader();
                Ok(())
            }
            Err(e) => Err(OutputError::Write(e)),
        }
    }

    /// Whether the reader of the stream went away (the daemon then shuts down).
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    /// Checks, without writing, whether the reader went away; a quiet daemon would
    /// otherwise only find out at its next record.
    pub fn reader_gone(&mut self) -> bool {
        if self.closed {
            return true;
        }
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: 0,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd that lives for the call; timeout 0 never blocks.
        let n = unsafe { libc::poll(&mut pfd, 1, 0) };
        if n == 1 && pfd.revents & (libc::POLLERR | libc::POLLHUP) != 0 {
            self.close_for_gone_reader();
        }
        self.closed
    }

    fn close_for_gone_reader(&mut self) {
        if !self.closed {
            tracing::info!("the reader of the record stream went away; shutting down");
            self.closed = true;
        }
    }

    /// Reopens the file (SIGHUP, after `logrotate` moved it away). Everything written
    /// before went to the old file; a failure keeps the old file and is logged.
    pub fn reopen(&mut self) {
        let Some(path) = &self.path else {
            return;
        };
        match open_append(path) {
            Ok(f) => {
                self.file = f;
                tracing::info!(path = %path.display(), "reopened --output");
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %format!("{:#}", anyhow::Error::from(e)), "cannot reopen --output; still writing to the old file");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn file_is_created_0600_appended_and_reopened() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("records.jsonl");
        std::fs::write(dir.path().join("unrelated"), b"").expect("write");
        let mut out = Output::open(&OutputTarget::File(path.clone())).expect("open");
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        out.write_all(b"one\n").expect("write");
        // logrotate: move away, then SIGHUP.
        let rotated = dir.path().join("records.jsonl.1");
        std::fs::rename(&path, &rotated).expect("rename");
        out.write_all(b"two\n").expect("write");
        out.reopen();
        out.write_all(b"three\n").expect("write");
        assert_eq!(std::fs::read(&rotated).expect("read"), b"one\ntwo\n");
        assert_eq!(std::fs::read(&path).expect("read"), b"three\n");
        // Reopening appends to what is there.
        drop(out);
        let mut out = Output::open(&OutputTarget::File(path.clone())).expect("open");
        out.write_all(b"four\n").expect("write");
        assert_eq!(std::fs::read(&path).expect("read"), b"three\nfour\n");
        assert!(!out.reader_gone(), "a regular file has no reader to lose");
    }

    /// A pipe: (read end, write end).
    fn pipe() -> (File, File) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors pipe(2) writes.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: both descriptors were just created by pipe(2) and are owned here only.
        unsafe {
            use std::os::fd::FromRawFd as _;
            (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1]))
        }
    }

    #[test]
    fn a_closed_pipe_closes_the_stream_without_error() {
        let (reader, writer) = pipe();
        let mut out = Output {
            file: writer,
            path: None,
            closed: false,
        };
        out.write_all(b"x\n").expect("write");
        assert!(!out.reader_gone());
        drop(reader);
        assert!(out.reader_gone(), "POLLERR on a pipe without reader");
        out.write_all(b"y\n").expect("discarded, not an error");
        assert!(out.is_closed());
    }

    #[test]
    fn a_write_into_a_closed_pipe_closes_the_stream() {
        let (reader, writer) = pipe();
        drop(reader);
        let mut out = Output {
            file: writer,
            path: None,
            closed: false,
        };
        // The test harness, like fsmon, runs with SIGPIPE ignored: EPIPE comes back.
        out.write_all(b"x\n").expect("EPIPE is not an error");
        assert!(out.is_closed());
    }
}
