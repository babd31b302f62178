//! The watcher's one file-descriptor budget: how many directory fds all containers'
//! caches may hold together, sized from `RLIMIT_NOFILE`.
//!
//! Nothing a container needs is held open for its whole life: its upperdir, its
//! directories and its image layers are reopened on demand (safely, see `sys`) and cached
//! while the budget allows. Each container evicts its own least recently used fds when the
//! budget is full before it opens another, and [`crate::watcher::Watcher`] evicts across
//! containers after every call that may have opened some, so the total stays near the
//! budget: above it by at most the chain of directories one operation needs at once.

use std::sync::{
    atomic::{AtomicUsize, Ordering},
    Arc,
};

/// Descriptors kept free for everything but the cache (engine connections, freezes,
/// cgroup files, the output, a burst of directory opens in one operation): at least this
/// many, or a sixteenth of the limit.
const RESERVE_MIN: usize = 48;

/// The smallest cache: a container's operation needs its upperdir and a parent.
const MIN_BUDGET: usize = 8;

/// The shared count of cached fds and its limit.
#[derive(Debug)]
pub struct FdBudget {
    open: AtomicUsize,
    limit: AtomicUsize,
}

/// Shared by the watcher and every container.
pub type SharedBudget = Arc<FdBudget>;

impl FdBudget {
    /// A budget of `limit` cached fds.
    pub fn new(limit: usize) -> SharedBudget {
        Arc::new(FdBudget {
            open: AtomicUsize::new(0),
            limit: AtomicUsize::new(limit.max(MIN_BUDGET)),
        })
    }

    /// The budget for a process whose `RLIMIT_NOFILE` is `fd_limit` and which has
    /// `in_use` descriptors open besides the cache.
    pub fn size_for(fd_limit: usize, in_use: usize) -> usize {
        let reserve = RESERVE_MIN.max(fd_limit / 16);
        fd_limit
            .saturating_sub(in_use)
            .saturating_sub(reserve)
            .max(MIN_BUDGET)
    }

    /// Cached fds now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// The most the caches may hold.
    pub fn limit(&self) -> usize {
        self.limit.load(Ordering::Relaxed)
    }

    /// Changes the limit (the process limit changed, or descriptors ran out below it).
    pub fn set_limit(&self, limit: usize) {
        self.limit.store(limit.max(MIN_BUDGET), Ordering::Relaxed);
    }

    /// Whether the caches hold as many fds as allowed (or more).
    pub fn full(&self) -> bool {
        self.open() >= self.limit()
    }

    /// One fd was cached.
    pub fn opened(&self) {
        self.open.fetch_add(1, Ordering::Relaxed);
    }

    /// `n` cached fds were closed.
    pub fn closed(&self, n: usize) {
        // Never below zero, even if a caller miscounted.
        let _ = self
            .open
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |o| {
                Some(o.saturating_sub(n))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sized_from_the_limit_with_a_reserve() {
        // A systemd service's default soft limit, ~40 fds of eBPF maps, engines, stdio.
        assert_eq!(FdBudget::size_for(1024, 40), 1024 - 40 - 64);
        assert_eq!(FdBudget::size_for(524_288, 40), 524_288 - 40 - 32_768);
        // Absurdly low limits still leave a working cache (operations then fail with
        // EMFILE and are retried: see the daemon's arm_failed path).
        assert_eq!(FdBudget::size_for(64, 40), MIN_BUDGET);
        assert_eq!(FdBudget::size_for(0, 0), MIN_BUDGET);
    }

    #[test]
    fn counts_and_fills() {
        let b = FdBudget::new(10);
        assert!(!b.full());
        for _ in 0..10 {
            b.opened();
        }
        assert!(b.full());
        b.closed(3);
        assert_eq!(b.open(), 7);
        assert!(!b.full());
        b.closed(100);
        assert_eq!(b.open(), 0);
        b.set_limit(1);
        assert_eq!(b.limit(), MIN_BUDGET);
    }
}
