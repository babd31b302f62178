//! Freezing a container's cgroup while its watch is armed, and never leaving it frozen.
//!
//! Uses the cgroup v2 freezer (`cgroup.freeze`, kernel >= 5.2) or the v1 freezer
//! (`freezer.state`). Every freeze is recorded in a state directory on tmpfs (`/run/fsmon`)
//! *before* it is written, and the record is removed only after the thaw, so a later fsmon
//! (after `kill -9`, a crash, a power-cut-free restart) thaws whatever this one left.
//! A watchdog thread thaws any freeze still held when its bound passes, whatever the main
//! thread is doing. A cgroup that is already frozen (a user's `docker pause`) is never
//! touched.

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

/// A freeze that is being held. Thaw it with [`Freezer::thaw`]; dropping it also thaws.
pub struct Frozen {
    target: FreezeTarget,
    record: PathBuf,
    token: u64,
    since: Instant,
    watchdog_fired: Arc<AtomicBool>,
    watchdog: mpsc::Sender<WatchdogCmd>,
    done: bool,
}

impl Frozen {
    fn release(&mut self) -> io::Result<()> {
        if self.done {
            return Ok(());
        }
        self.done = true;
        let _ = self.watchdog.send(WatchdogCmd::Disarm(self.token));
        let r = self.target.write(false);
        if r.is_ok() {
            let _ = std::fs::remove_file(&self.record);
        }
        r
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        if let Err(e) = self.release() {
            tracing::error!(cgroup = %self.target.dir.display(), error = %e, "thaw failed");
        }
    }
}

/// How a held freeze ended.
#[derive(Clone, Copy, Debug)]
pub struct ThawReport {
    /// How long the cgroup was frozen.
    pub held: Duration,
    /// True when the watchdog had to thaw it because the bound passed.
    pub bound_exceeded: bool,
}

enum WatchdogCmd {
    Arm {
        token: u64,
        target: FreezeTarget,
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

    /// Thaws every cgroup an earlier fsmon recorded as frozen by it and did not thaw
    /// (it was killed or crashed). Returns the cgroups thawed.
    pub fn recover(&self) -> Vec<PathBuf> {
        thaw_recorded(&self.state_dir)
    }

    /// Freezes `target` for at most `bound`. Returns `Ok(None)` (and does nothing) when the
    /// cgroup is already frozen by someone else, e.g. a user's `docker pause`.
    pub fn freeze(
        &self,
        target: &FreezeTarget,
        bound: Duration,
    ) -> Result<Option<Frozen>, FreezeError> {
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
        let token = self.next_token.fetch_add(1, Ordering::Relaxed);
        let record = self
            .state_dir
            .join(format!("{}-{token}", std::process::id()));
        std::fs::write(&record, target_to_record(target)).map_err(|source| FreezeError::State {
            path: record.clone(),
            source,
        })?;
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
        let fired = Arc::new(AtomicBool::new(false));
        let _ = self.watchdog.send(WatchdogCmd::Arm {
            token,
            target: target.clone(),
            record: record.clone(),
            deadline: asked + bound,
            fired: fired.clone(),
        });
        Ok(Some(Frozen {
            target: target.clone(),
            record,
            token,
            since,
            watchdog_fired: fired,
            watchdog: self.watchdog.clone(),
            done: false,
        }))
    }

    /// Thaws a held freeze and says how long it was held.
    pub fn thaw(&self, mut frozen: Frozen) -> Result<ThawReport, FreezeError> {
        let held = frozen.since.elapsed();
        let bound_exceeded = frozen.watchdog_fired.load(Ordering::SeqCst);
        frozen.release().map_err(|source| FreezeError::Control {
            path: frozen.target.control(),
            source,
        })?;
        Ok(ThawReport {
            held,
            bound_exceeded,
        })
    }
}

fn target_to_record(t: &FreezeTarget) -> String {
    let v = match t.kind {
        FreezerKind::V1 => "v1",
        FreezerKind::V2 => "v2",
    };
    format!("{v} {}\n", t.dir.display())
}

fn record_to_target(s: &str) -> Option<FreezeTarget> {
    let s = s.trim_end_matches('\n');
    let (v, dir) = s.split_once(' ')?;
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
    Some(FreezeTarget { dir, kind })
}

/// Thaws every cgroup recorded in `state_dir` and removes the records. Used at start-up
/// and by the panic hook.
pub fn thaw_recorded(state_dir: &Path) -> Vec<PathBuf> {
    let mut thawed = Vec::new();
    let Ok(entries) = std::fs::read_dir(state_dir) else {
        return thawed;
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
        match record_to_target(&text) {
            Some(t) if t.dir.is_dir() => match t.write(false) {
                Ok(()) => {
                    thawed.push(t.dir);
                    let _ = std::fs::remove_file(&path);
                }
                Err(err) => {
                    tracing::error!(cgroup = %t.dir.display(), error = %err, "cannot thaw a cgroup a previous fsmon froze")
                }
            },
            // The cgroup is gone (the container ended): nothing to thaw.
            _ => {
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    thawed
}

fn watchdog(rx: mpsc::Receiver<WatchdogCmd>) {
    struct Armed {
        target: FreezeTarget,
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
                        let _ = a.target.write(false);
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
                match a.target.write(false) {
                    Ok(()) => {
                        tracing::warn!(cgroup = %a.target.dir.display(), "freeze bound passed; thawed by the watchdog")
                    }
                    Err(e) => {
                        tracing::error!(cgroup = %a.target.dir.display(), error = %e, "watchdog thaw failed")
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
        let t = FreezeTarget {
            dir: "/sys/fs/cgroup/unified/docker/abc".into(),
            kind: FreezerKind::V2,
        };
        assert_eq!(record_to_target(&target_to_record(&t)), Some(t));
        let t = FreezeTarget {
            dir: "/sys/fs/cgroup/freezer/docker/abc".into(),
            kind: FreezerKind::V1,
        };
        assert_eq!(record_to_target(&target_to_record(&t)), Some(t));
        assert_eq!(record_to_target("v1 /etc/passwd"), None);
        assert_eq!(record_to_target("v1 /sys/fs/cgroup/../../etc"), None);
        assert_eq!(record_to_target("v3 /sys/fs/cgroup/x"), None);
        assert_eq!(record_to_target(""), None);
    }
}
