//! Process resource limits: the open-file limit (`RLIMIT_NOFILE`) that bounds how many
//! containers fsmon can monitor at once, and how an exhausted one is recognised.
//!
//! fsmon raises its soft limit to the hard limit at start-up (as Go programs and most
//! daemons do: the soft limit of a systemd service is 1024 by default, the hard one
//! 524288), and sizes the watcher's directory-fd cache from what it got. Running out
//! of descriptors (`EMFILE`, or the host's `ENFILE`) is resource exhaustion: the operation
//! is retried once the limit allows, never taken for "this container is gone".

use std::io;

/// The soft and hard `RLIMIT_NOFILE` of this process.
pub fn fd_limits() -> io::Result<(u64, u64)> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct we pass, which lives for the call.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((lim.rlim_cur, lim.rlim_max))
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit; returns (before, after).
pub fn raise_fd_limit() -> io::Result<(u64, u64)> {
    let (soft, hard) = fd_limits()?;
    if soft >= hard {
        return Ok((soft, soft));
    }
    let lim = libc::rlimit {
        rlim_cur: hard,
        rlim_max: hard,
    };
    // SAFETY: setrlimit reads the struct we pass, which lives for the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok((soft, hard))
}

/// The soft `RLIMIT_NOFILE`, or a conservative 1024 when it cannot be read. An infinite
/// limit is capped (the kernel's `nr_open` bounds it anyway).
pub fn soft_fd_limit() -> usize {
    let soft = fd_limits().map_or(1024, |(s, _)| s);
    usize::try_from(soft.min(1 << 30)).unwrap_or(1 << 30)
}

/// How many file descriptors this process has open now (`/proc/self/fd`, minus the one
/// the listing itself uses); 0 when it cannot be read.
pub fn open_fd_count() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count().saturating_sub(1))
}

/// Whether an error means the process or the host ran out of file descriptors.
pub fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Whether an error (or any error it wraps) is fd exhaustion.
pub fn chain_is_fd_exhaustion(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<io::Error>()
            .is_some_and(is_fd_exhaustion)
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// The advice to print when descriptors ran out.
pub fn fd_advice() -> String {
    let (soft, hard) = fd_limits().unwrap_or((0, 0));
    format!(
        "out of file descriptors (limit {soft}, hard limit {hard}): raise LimitNOFILE= in the \
         systemd unit or `ulimit -n` before starting fsmon (fs.file-max if the host ran out)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_exhaustion_through_wrappers() {
        let emfile = io::Error::from_raw_os_error(libc::EMFILE);
        assert!(is_fd_exhaustion(&emfile));
        assert!(is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_fd_exhaustion(&io::Error::from_raw_os_error(
            libc::ENOENT
        )));
        #[derive(Debug, thiserror::Error)]
        #[error("cannot open")]
        struct Wrap(#[source] io::Error);
        assert!(chain_is_fd_exhaustion(&Wrap(emfile)));
        assert!(!chain_is_fd_exhaustion(&Wrap(
            io::Error::from_raw_os_error(libc::EACCES)
        )));
    }

    #[test]
    fn limits_are_readable_and_counted() {
        let (soft, hard) = fd_limits().expect("getrlimit");
        assert!(soft <= hard);
        assert!(soft_fd_limit() > 0);
        // stdin/stdout/stderr at least.
        assert!(open_fd_count() >= 3);
    }
}
