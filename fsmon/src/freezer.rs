//! Holding a container while its watch is armed — a frozen cgroup, or a task the exec gate
//! stopped — and never leaving it held.
//!
//! Uses the cgroup v2 freezer (`cgroup.freeze`, kernel >= 5.2) or the v1 freezer
//! (`freezer.state`). Every freeze is recorded in a state directory on tmpfs (`/run/fsmon`)
//! *before* it is written, and the record is removed only after the thaw, so a later fsmon
//! (after `kill -9`, a crash, a power-cut-free restart) thaws whatever this one left.
//! A watchdog thread thaws any freeze still held when its bound passes, whatever the main
//! thread is doing. A cgroup that is already frozen (a user's `docker pause`) is never
//! touched. The same record, watchdog and recovery serve the exec gate's stopped tasks
//! ([`HoldTarget::Stop`], resumed with `pidfd_send_signal(SIGCONT)`, kernel >= 5.3; see
//! `gate`).

use crate::gate::{Resumed, StoppedTask};
use std::{
    collections::BTreeMap,
    io,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, Ordering},
        mpsc, Arc,
    },
    time::{Duration, Instant},
};

/// Which freezer interface a cgroup uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FreezerKind {
    /// cgroup v1: `freezer.state` (`FROZEN` / `THAWED`).
    V1,
    /// cgroup v2: `cgroup.freeze` (`1` / `0`).
    V2,
}

/// A cgroup to freeze.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FreezeTarget {
    /// The cgroup directory.
    pub dir: PathBuf,
    /// Its freezer interface.
    pub kind: FreezerKind,
}

impl FreezeTarget {
    fn control(&self) -> PathBuf {
        match self.kind {
            FreezerKind::V1 => self.dir.join("freezer.state"),
            FreezerKind::V2 => self.dir.join("cgroup.freeze"),
        }
    }

    fn write(&self, frozen: bool) -> io::Result<()> {
        let value: &[u8] = match (self.kind, frozen) {
            (FreezerKind::V1, true) => b"FROZEN",
            (FreezerKind::V1, false) => b"THAWED",
            (FreezerKind::V2, true) => b"1",
            (FreezerKind::V2, false) => b"0",
        };
        std::fs::write(self.control(), value)
    }

    /// Whether something (a user's pause) already froze this cgroup itself.
    pub fn is_frozen(&self) -> io::Result<bool> {
        let s = std::fs::read_to_string(self.control())?;
        Ok(match self.kind {
            FreezerKind::V1 => s.trim() != "THAWED",
            FreezerKind::V2 => s.trim() == "1",
        })
    }
}

/// What fsmon holds while it arms a container.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HoldTarget {
    /// A frozen cgroup.
    Freeze(FreezeTarget),
    /// A task stopped by the exec gate.
    Stop(StoppedTask),
}

/// How a hold ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Released {
    /// The cgroup was thawed.
    Thawed,
    /// The stopped task: resumed, or found running or gone.
    Task(Resumed),
}

impl HoldTarget {
    fn release(&self) -> io::Result<Released> {
        match self {
            HoldTarget::Freeze(t) => t.write(false).map(|()| Released::Thawed),
            HoldTarget::Stop(t) => t.resume().map(Released::Task),
        }
    }

    fn describe(&self) -> String {
        match self {
            HoldTarget::Freeze(t) => t.dir.display().to_string(),
            HoldTarget::Stop(t) => format!("pid {} (cgroup id {})", t.pid, t.cgroup_id),
        }
    }
}

/// Failures to freeze or thaw. Freeze failures are not fatal: fsmon arms without it.
#[derive(Debug, thiserror::Error)]
pub enum FreezeError {
    /// Writing the control file failed.
    #[error("cannot write {path}: {source}")]
    Control {
        /// The control file.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The state directory is unusable.
    #[error("cannot record the freeze in {path}: {source}")]
    State {
        /// The record path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// A freeze or a stopped task being held. End it with [`Freezer::thaw`]; dropping it also
/// ends it.
pub struct Hold {
    target: HoldTarget,
    record: PathBuf,
    token: u64,
    since: Instant,
    watchdog_fired: Arc<AtomicBool>,
    watchdog: mpsc::Sender<WatchdogCmd>,
    done: bool,
}

impl Hold {
    /// `None` when it was already released.
    fn release(&mut self) -> io::Result<Option<Released>> {
        if self.done {
            return Ok(None);
        }
        self.done = true;
        let _ = self.watchdog.send(WatchdogCmd::Disarm(self.token));
        let r = self.target.release();
        if r.is_ok() {
            let _ = std::fs::remove_file(&self.record);
        }
        r.map(Some)
    }

    /// What is held.
    pub fn target(&self) -> &HoldTarget {
        &self.target
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::error!(held = %self.target.describe(), error = %e, "release failed");
        }
    }
}

/// How a held freeze ended.
#[derive(Clone, Copy, Debug)]
pub struct ThawReport {
    /// How long the cgroup was frozen (the task stopped).
    pub held: Duration,
    /// True when the watchdog had to end it because the bound passed.
    pub bound_exceeded: bool,
    /// How it ended (`None`: the watchdog had already ended it).
    pub released: Option<Released>,
}

enum WatchdogCmd {
    Arm {
        token: u64,
        target: HoldTarget,
        record: PathBuf,
        deadline: Instant,
        fired: Arc<AtomicBool>,
    },
    Disarm(u64),
}

/// Freezes and thaws cgroups, with a crash-safe record and a watchdog.
pub struct Freezer {
    state_dir: PathBuf,
    watchdog: mpsc::Sender<WatchdogCmd>,
    next_token: AtomicU64,
}

impl Freezer {
    /// Creates the state directory and starts the watchdog thread.
    pub fn new(state_dir: &Path) -> Result<Self, FreezeError> {
        std::fs::create_dir_all(state_dir).map_err(|source| FreezeError::State {
            path: state_dir.to_owned(),
            source,
        })?;
        let (tx, rx) = mpsc::channel();
        std::thread::Builder::new()
            .name("fsmon-thaw-watchdog".into())
            .spawn(move || watchdog(rx))
            .map_err(|source| FreezeError::State {
                path: state_dir.to_owned(),
                source,
            })?;
        Ok(Freezer {
            state_dir: state_dir.to_owned(),
            watchdog: tx,
            next_token: AtomicU64::new(1),
        })
    }

    /// Thaws every cgroup and resumes every task an earlier fsmon recorded as held by it
    /// and did not release (it was killed or crashed). Returns what was released.
    pub fn recover(&self) -> Vec<HoldTarget> {
        release_recorded(&self.state_dir)
    }

    /// Freezes `target` for at most `bound`. Returns `Ok(None)` (and does nothing) when the
    /// cgroup is already frozen by someone else, e.g. a user's `docker pause`.
    pub fn freeze(
        &self,
        target: &FreezeTarget,
        bound: Duration,
    ) -> Result<Option<Hold>, FreezeError> {
        match target.is_frozen() {
            Ok(true) => return Ok(None),
            Ok(false) => {}
            Err(source) => {
                return Err(FreezeError::Control {
                    path: target.control(),
                    source,
                })
            }
        }
        let held = HoldTarget::Freeze(target.clone());
        let (token, record) = self.record(&held)?;
        let asked = Instant::now();
        if let Err(source) = target.write(true) {
            let _ = std::fs::remove_file(&record);
            return Err(FreezeError::Control {
                path: target.control(),
                source,
            });
        }
        // The write can wait on the cgroup lock while runc attaches the container's init
        // (milliseconds on cgroup v2); the container is frozen from when it returns.
        let since = Instant::now();
        let waited = since - asked;
        if waited > Duration::from_millis(2) {
            tracing::debug!(cgroup = %target.dir.display(), waited_us = waited.as_micros() as u64, "freeze write waited for the cgroup lock");
        }
        Ok(Some(self.arm(held, token, record, asked + bound, since)))
    }

    /// Takes over a task the exec gate stopped: records it (so that it is resumed by the
    /// watchdog at `bound`, by a panic, at shutdown, or by a restarted fsmon), and returns
    /// the hold; [`Freezer::thaw`] resumes it. `since` is when the kernel stopped it.
    pub fn hold_stopped(
        &self,
        task: StoppedTask,
        since: Instant,
        bound: Duration,
    ) -> Result<Hold, FreezeError> {
        let held = HoldTarget::Stop(task);
        let (token, record) = self.record(&held)?;
        Ok(self.arm(held, token, record, since + bound, since))
    }

    /// Writes the crash-safe record of `held`, before fsmon acts on it.
    fn record(&self, held: &HoldTarget) -> Result<(u64, PathBuf), FreezeError> {
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let record = self
            .state_dir
            .join(format!("{}-{token}", std::process::id()));
        std::fs::write(&record, target_to_record(held)).map_err(|source| FreezeError::State {
            path: record.clone(),
            source,
        })?;
        Ok((token, record))
    }

    /// Hands `held` to the watchdog, which releases it at `deadline`.
    fn arm(
        &self,
        held: HoldTarget,
        token: u64,
        record: PathBuf,
        deadline: Instant,
        since: Instant,
    ) -> Hold {
        let fired = Arc::new(AtomicBool::new(false));
        let _ = self.watchdog.send(WatchdogCmd::Arm {
            token,
            target: held.clone(),
            record: record.clone(),
            deadline,
            fired: fired.clone(),
        });
        Hold {
            target: held,
            record,
            token,
            since,
            watchdog_fired: fired,
            watchdog: self.watchdog.clone(),
            done: false,
        }
    }

    /// Ends a hold (thaw, or resume) and says how long it was held.
    pub fn thaw(&self, mut hold: Hold) -> Result<ThawReport, FreezeError> {
        let held = hold.since.elapsed();
        let bound_exceeded = hold.watchdog_fired.load(Ordering::SeqCst);
        let released = hold.release().map_err(|source| FreezeError::Control {
            path: match &hold.target {
                HoldTarget::Freeze(t) => t.control(),
                HoldTarget::Stop(t) => PathBuf::from(format!("/proc/{}", t.pid)),
            },
            source,
        })?;
        Ok(ThawReport {
            held,
            bound_exceeded,
            released,
        })
    }
}

fn target_to_record(t: &HoldTarget) -> String {
    match t {
        HoldTarget::Freeze(t) => {
            let v = match t.kind {
                FreezerKind::V1 => "v1",
                FreezerKind::V2 => "v2",
            };
            format!("{v} {}\n", t.dir.display())
        }
        HoldTarget::Stop(t) => format!("stop {} {} {}\n", t.pid, t.start_ticks, t.cgroup_id),
    }
}

fn record_to_target(s: &str) -> Option<HoldTarget> {
    let s = s.trim_end_matches('\n');
    let (v, rest) = s.split_once(' ')?;
    if v == "stop" {
        let mut f = rest.split(' ').map(str::parse::<u64>);
        let (Some(Ok(pid)), Some(Ok(start_ticks)), Some(Ok(cgroup_id)), None) =
            (f.next(), f.next(), f.next(), f.next())
        else {
            return None;
        };
        // pid 0 or 1 (or another init-ish number) is never a container task fsmon stopped.
        let pid = u32::try_from(pid).ok().filter(|p| *p > 1)?;
        return Some(HoldTarget::Stop(StoppedTask {
            pid,
            start_ticks,
            cgroup_id,
        }));
    }
    let dir = rest;
    let kind = match v {
        "v1" => FreezerKind::V1,
        "v2" => FreezerKind::V2,
        _ => return None,
    };
    // Only cgroup directories are ever thawed from a record: a corrupt record cannot make
    // fsmon write anywhere else.
    let dir = PathBuf::from(dir);
    if !dir.starts_with("/sys/fs/cgroup")
        || dir
            .components()
            .any(|c| c == std::path::Component::ParentDir)
    {
        return None;
    }
    Some(HoldTarget::Freeze(FreezeTarget { dir, kind }))
}

/// Thaws every cgroup and resumes every task recorded in `state_dir` (a stopped task only
/// if it is the very task recorded: same pid *and* start time), and removes the records.
/// Used at start-up and by the panic hook.
pub fn release_recorded(state_dir: &Path) -> Vec<HoldTarget> {
    let mut released = Vec::new();
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return released;
    };
    for e in entries.flatten() {
        let path = e.path();
        // Records are named `<pid>-<n>`; another live fsmon's in-flight freeze is its own.
        let owner: Option<u32> = e
            .file_name()
            .to_str()
            .and_then(|n| n.split('-').next()?.parse().ok());
        if let Some(pid) = owner {
            if pid != std::process::id() && Path::new(&format!("/proc/{pid}")).exists() {
                continue;
            }
        }
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let target = record_to_target(&text);
        let gone = matches!(&target, Some(HoldTarget::Freeze(t)) if !t.dir.is_dir());
        match target {
            Some(t) if !gone => match t.release() {
                Ok(r) => {
                    if r != Released::Task(Resumed::Gone) {
                        released.push(t);
                    }
                    let _ = std::fs::remove_file(&path);
                }
                Err(err) => {
                    tracing::error!(held = %t.describe(), error = %err, "cannot release what a previous fsmon held")
                }
            },
            // The cgroup is gone (the container ended), or the record is corrupt.
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    released
}

fn watchdog(rx: mpsc::Receiver<WatchdogCmd>) {
    struct Armed {
        target: HoldTarget,
        record: PathBuf,
        deadline: Instant,
        fired: Arc<AtomicBool>,
    }
    let mut armed: BTreeMap<u64, Armed> = BTreeMap::new();
    loop {
        let next = armed.values().map(|a| a.deadline).min();
        let cmd = match next {
            None => match rx.recv() {
                Ok(c) => Some(c),
                Err(_) => return,
            },
            Some(d) => match rx.recv_timeout(d.saturating_duration_since(Instant::now())) {
                Ok(c) => Some(c),
                Err(mpsc::RecvTimeoutError::Timeout) => None,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // The daemon is going away: thaw whatever is still held.
                    for a in armed.values() {
                        let _ = a.target.release();
                        let _ = std::fs::remove_file(&a.record);
                    }
                    return;
                }
            },
        };
        match cmd {
            Some(WatchdogCmd::Arm {
                token,
                target,
                record,
                deadline,
                fired,
            }) => {
                armed.insert(
                    token,
                    Armed {
                        target,
                        record,
                        deadline,
                        fired,
                    },
                );
            }
            Some(WatchdogCmd::Disarm(token)) => {
                armed.remove(&token);
            }
            None => {}
        }
        let now = Instant::now();
        let due: Vec<u64> = armed
            .iter()
            .filter(|(_, a)| a.deadline <= now)
            .map(|(t, _)| *t)
            .collect();
        for t in due {
            if let Some(a) = armed.remove(&t) {
                a.fired.store(true, Ordering::SeqCst);
                match a.target.release() {
                    Ok(r) => {
                        tracing::warn!(held = %a.target.describe(), released = ?r, "hold bound passed; released by the watchdog")
                    }
                    Err(e) => {
                        tracing::error!(held = %a.target.describe(), error = %e, "watchdog release failed")
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_are_confined() {
        let t = HoldTarget::Freeze(FreezeTarget {
            dir: "/sys/fs/cgroup/unified/docker/abc".into(),
            kind: FreezerKind::V2,
        });
        assert_eq!(record_to_target(&target_to_record(&t)), Some(t));
        let t = HoldTarget::Freeze(FreezeTarget {
            dir: "/sys/fs/cgroup/freezer/docker/abc".into(),
            kind: FreezerKind::V1,
        });
        assert_eq!(record_to_target(&target_to_record(&t)), Some(t));
        let t = HoldTarget::Stop(StoppedTask {
            pid: 4242,
            start_ticks: 987_654,
            cgroup_id: 12_345,
        });
        assert_eq!(target_to_record(&t), "stop 4242 987654 12345\n");
        assert_eq!(record_to_target(&target_to_record(&t)), Some(t));
        for bad in [
            "stop 1 5 6",
            "stop 0 5 6",
            "stop 42 5",
            "stop 42 5 6 7",
            "stop -42 5 6",
            "stop 42 x 6",
            "stop 99999999999 5 6",
        ] {
            assert_eq!(record_to_target(bad), None, "{bad}");
        }
        assert_eq!(record_to_target("v1 /etc/passwd"), None);
        assert_eq!(record_to_target("v1 /sys/fs/cgroup/../../etc"), None);
        assert_eq!(record_to_target("v3 /sys/fs/cgroup/x"), None);
        assert_eq!(record_to_target(""), None);
    }
}
