//! The thread that reads and prints file events.
//!
//! It sleeps in `poll(2)` on the inotify fd alone and, when events come, takes the
//! daemon's lock, drains the watcher and writes the records: the write → record path of a
//! file event goes through no async runtime (no reactor turn, no wakers, no `select!` over
//! the loop's other inputs), which is what a monitor blocked in `read(2)` pays. The event
//! loop keeps every other input, under the same lock; whichever reads the inotify queue
//! reads it under the lock, so events are handled in the kernel's order whoever reads
//! them.
//!
//! The thread ends when asked ([`Reader::stop`]), when the output's reader went away, on
//! an output error, or on a panic; the event loop hears of each through a channel.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd},
    sync::{Arc, Mutex, MutexGuard},
    thread::JoinHandle,
};

use anyhow::Context as _;
use tokio::sync::mpsc::UnboundedSender;

use super::Daemon;

/// Why the reader thread ended (other than [`Reader::stop`]).
pub(super) enum End {
    /// The output's reader went away: the daemon shuts down as on SIGTERM.
    Closed,
    /// Writing the records failed, or the thread panicked.
    Failed(anyhow::Error),
}

/// The daemon's lock. A thread that panicked while holding it left the daemon as it was
/// at that point, which the other thread may still shut down cleanly: not a reason to
/// panic too.
pub(super) fn lock(d: &Mutex<Daemon>) -> MutexGuard<'_, Daemon> {
    d.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub(super) struct Reader {
    /// An eventfd: written to end the thread.
    stop: OwnedFd,
    thread: Option<JoinHandle<()>>,
}

impl Reader {
    /// Starts the thread on `watch_fd` (the watcher's inotify fd, which outlives it: the
    /// daemon owning it is shared with the thread).
    pub(super) fn spawn(
        daemon: Arc<Mutex<Daemon>>,
        watch_fd: RawFd,
        ended: UnboundedSender<End>,
    ) -> anyhow::Result<Reader> {
        // SAFETY: eventfd has no memory-safety preconditions.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if raw < 0 {
            return Err(std::io::Error::last_os_error()).context("eventfd");
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let stop = unsafe { OwnedFd::from_raw_fd(raw) };
        let stop_fd = stop.as_raw_fd();
        let thread = std::thread::Builder::new()
            .name("fsmon-inotify".into())
            .spawn(move || {
                let run = std::panic::AssertUnwindSafe(|| run(&daemon, watch_fd, stop_fd));
                let end = match std::panic::catch_unwind(run) {
                    Ok(Ok(None)) => return,
                    Ok(Ok(Some(end))) => end,
                    Ok(Err(e)) => End::Failed(e),
                    Err(_) => End::Failed(anyhow::anyhow!("the inotify reader thread panicked")),
                };
                let _ = ended.send(end);
            })
            .context("spawning the thread")?;
        Ok(Reader {
            stop,
            thread: Some(thread),
        })
    }

    /// Ends the thread and waits for it (a turn it is in finishes first).
    pub(super) fn stop(self) {
        drop(self);
    }

    fn end(&mut self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local u64 to our eventfd.
        unsafe {
            libc::write(
                self.stop.as_raw_fd(),
                std::ptr::from_ref(&one).cast(),
                std::mem::size_of::<u64>(),
            );
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Reader {
    fn drop(&mut self) {
        // On every way out of the event loop (an error included) the thread ends before
        // the daemon's last drain.
        self.end();
    }
}

/// The thread's loop: `None` when asked to stop.
fn run(daemon: &Mutex<Daemon>, watch_fd: RawFd, stop_fd: RawFd) -> anyhow::Result<Option<End>> {
    loop {
        let mut fds = [
            libc::pollfd {
                fd: watch_fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop_fd,
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("polling the inotify fd");
        }
        if fds[1].revents != 0 {
            return Ok(None);
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLNVAL | libc::POLLHUP) != 0 {
            anyhow::bail!("the inotify fd failed (poll revents {:#x})", fds[0].revents);
        }
        if fds[0].revents == 0 {
            continue;
        }
        let mut d = lock(daemon);
        d.drain_watcher()?;
        d.flush()?;
        if d.out.is_closed() {
            return Ok(Some(End::Closed));
        }
    }
}
