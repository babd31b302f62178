//! Periodic ticks of the event loop from a `timerfd`, polled like any other fd.
//!
//! tokio's own timers make every `epoll_wait` of the loop carry a timeout, so each wake-up
//! arms and cancels a kernel timer (a VM exit each on a virtual machine): measured on the
//! write → record path, that is part of what fsmon paid over a monitor blocked in `read(2)`.
//! A `timerfd` is armed once, and the loop waits with no timeout while no task sleeps.
//!
//! Kernel feature: timerfd_create(2) (2.6.25, `TFD_NONBLOCK`/`TFD_CLOEXEC` 2.6.27).

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::Duration,
};

use tokio::io::unix::AsyncFd;

/// A periodic timer: [`Ticker::tick`] completes once per period (missed periods are
/// folded into one tick, like `MissedTickBehavior::Skip`).
pub(super) struct Ticker {
    fd: AsyncFd<OwnedFd>,
}

fn timespec(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: libc::time_t::try_from(d.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::from(d.subsec_nanos()),
    }
}

impl Ticker {
    /// Ticks first after `first`, then every `every` (both must be non-zero).
    pub(super) fn new(first: Duration, every: Duration) -> io::Result<Ticker> {
        if first.is_zero() || every.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a ticker's period must not be zero",
            ));
        }
        // SAFETY: timerfd_create has no memory-safety preconditions.
        let raw = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `raw` is a new fd that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let spec = libc::itimerspec {
            it_interval: timespec(every),
            it_value: timespec(first),
        };
        // SAFETY: `spec` is a valid itimerspec; the old value is not asked for.
        if unsafe { libc::timerfd_settime(fd.as_raw_fd(), 0, &spec, std::ptr::null_mut()) } < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the AsyncFd owns `fd` (an OwnedFd, which always returns the same open
        // fd) until it is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(io::Error::from)?;
        Ok(Ticker { fd })
    }

    /// Waits for the next tick. Cancel-safe: a tick not yet read stays for the next call.
    pub(super) async fn tick(&self) -> io::Result<()> {
        loop {
            let mut guard = self.fd.readable().await?;
            let read = guard.try_io(|fd| {
                let mut expirations = [0u8; 8];
                // SAFETY: reads at most 8 bytes into a local buffer of 8 bytes.
                let n = unsafe { libc::read(fd.as_raw_fd(), expirations.as_mut_ptr().cast(), 8) };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(())
                }
            });
            match read {
                Ok(result) => return result,
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn ticks_after_the_first_delay_then_every_period() {
        let t = Ticker::new(Duration::from_millis(20), Duration::from_millis(30)).expect("timerfd");
        let start = std::time::Instant::now();
        t.tick().await.expect("tick");
        let first = start.elapsed();
        assert!(first >= Duration::from_millis(20), "{first:?}");
        t.tick().await.expect("tick");
        let second = start.elapsed();
        assert!(second >= Duration::from_millis(50), "{second:?}");
    }

    #[test]
    fn a_zero_period_is_refused() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .expect("runtime");
        rt.block_on(async {
            assert!(Ticker::new(Duration::ZERO, Duration::from_secs(1)).is_err());
            assert!(Ticker::new(Duration::from_secs(1), Duration::ZERO).is_err());
        });
    }
}
