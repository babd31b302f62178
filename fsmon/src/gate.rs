//! The exec gate, daemon side: resuming the container tasks the kernel stopped at exec.
//!
//! The eBPF program on `sched/sched_process_exec` stops (`bpf_send_signal(SIGSTOP)`, Linux
//! 5.3 or later; on 6.14+ delivered through irq_work, so it may land just after the program
//! returns) a task of a container whose v2 cgroup is still *pending* in the `PENDING` map,
//! and sends a [`GateRecord`]. This module takes such a task over: it checks that the pid
//! still names the task that exec'd (its start time is not later than the exec), records
//! it on tmpfs through the [`Freezer`]'s crash-safe hold machinery (watchdog at
//! `--gate-timeout`, panic hook, shutdown, restart), and, once the container is armed,
//! ends gating for the cgroup and resumes the task with `pidfd_send_signal(SIGCONT)`
//! (pidfds: kernel >= 5.3) — but only after the stop has really landed (state `T`, or
//! `SIGSTOP` pending), since a `SIGCONT` that overtook the in-flight stop would leave the
//! task stopped for good.
//!
//! A task stopped by a gate whose fsmon was killed before it read the record has no record
//! on tmpfs; [`resume_orphans`] finds such tasks by their fingerprint — stopped on the way
//! out of `execve` with the instruction pointer at the new program's entry point, which a
//! user's `kill -STOP` does not produce — and resumes them.

use std::{
    collections::HashMap,
    io,
    os::{
        fd::{FromRawFd, OwnedFd},
        unix::fs::MetadataExt,
    },
    path::Path,
    time::{Duration, Instant},
};

use crate::{
    ebpf::{monotonic_ns, GateRecord, PendingCgroups},
    freezer::{Freezer, Hold, Released},
};

/// How long a resume waits for an in-flight stop to land before it concludes that the
/// task is not stopped (the irq_work that delivers the stop runs within a tick).
const LANDING: Duration = Duration::from_millis(50);

/// A task the exec gate stopped, identified so that a recycled pid is never signalled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StoppedTask {
    /// Host pid (thread-group id).
    pub pid: u32,
    /// Start time, in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub start_ticks: u64,
    /// The container cgroup (v2 id) it was stopped for.
    pub cgroup_id: u64,
}

/// What a resume found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resumed {
    /// It was stopped; `SIGCONT` sent.
    Continued,
    /// It was not stopped (someone resumed it first, it is traced, or the stop never
    /// landed): nothing sent.
    NotStopped,
    /// The task is gone (exited, or its pid now names another task): nothing sent.
    Gone,
}

impl StoppedTask {
    /// Resumes the task if it is the recorded one and stopped (waiting up to [`LANDING`]
    /// for an in-flight stop to land first).
    pub fn resume(&self) -> io::Result<Resumed> {
        let Some(pidfd) = pidfd_open(self.pid)? else {
            return Ok(Resumed::Gone);
        };
        // The pidfd pins the task that had this pid when it was opened; checking the start
        // time after opening it makes sure it is the recorded task.
        let deadline = Instant::now() + LANDING;
        loop {
            let Some(stat) = read_stat(self.pid) else {
                return Ok(Resumed::Gone);
            };
            if stat.start_ticks != self.start_ticks {
                return Ok(Resumed::Gone);
            }
            if stat.state == b'T' || stop_pending(self.pid) {
                return pidfd_send_sigcont(&pidfd).map(|()| Resumed::Continued);
            }
            if Instant::now() >= deadline {
                return Ok(Resumed::NotStopped);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }
}

/// The fields of `/proc/<pid>/stat` the gate needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProcStat {
    /// Field 3: `R`, `S`, `D`, `T` (stopped), `t` (tracing stop), `Z`, ...
    pub state: u8,
    /// Field 22: start time in clock ticks since boot.
    pub start_ticks: u64,
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may contain spaces and
/// parentheses, so fields are counted from the *last* `)`.
pub fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    // Field 3 is the state; field 22 is 19 fields further.
    let start_ticks = fields.nth(18)?.parse().ok()?;
    Some(ProcStat { state, start_ticks })
}

fn read_stat(pid: u32) -> Option<ProcStat> {
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Whether `/proc/<pid>/status` shows `SIGSTOP` pending (queued for the thread or the
/// process, not yet acted on): the stop has landed even if the task has not stopped yet.
pub fn parse_stop_pending(status: &str) -> bool {
    const SIGSTOP_BIT: u64 = 1 << (fsmon_common::SIGSTOP - 1);
    status.lines().any(|l| {
        let Some(hex) = l
            .strip_prefix("SigPnd:")
            .or_else(|| l.strip_prefix("ShdPnd:"))
        else {
            return false;
        };
        u64::from_str_radix(hex.trim(), 16).is_ok_and(|m| m & SIGSTOP_BIT != 0)
    })
}

fn stop_pending(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status")).is_ok_and(|s| parse_stop_pending(&s))
}

/// `pidfd_open(2)`; `Ok(None)` when there is no such process.
fn pidfd_open(pid: u32) -> io::Result<Option<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ESRCH) => Ok(None),
            _ => Err(e),
        };
    }
    // SAFETY: the kernel just returned this fd to us; nothing else owns it.
    Ok(Some(unsafe { OwnedFd::from_raw_fd(fd as i32) }))
}

fn pidfd_send_sigcont(pidfd: &OwnedFd) -> io::Result<()> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: a valid pidfd we own, a signal number, no siginfo, no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            libc::SIGCONT,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if r < 0 {
        let e = io::Error::last_os_error();
        // The task exited meanwhile: nothing to resume.
        if e.raw_os_error() == Some(libc::ESRCH) {
            return Ok(());
        }
        return Err(e);
    }
    Ok(())
}

/// `st_dev` and `st_ino` of this process's PID namespace: the gate never stops a task in
/// it (fsmon runs in the host's PID namespace, as do runc, conmon and the shims).
pub fn host_pidns() -> io::Result<(u64, u64)> {
    let m = std::fs::metadata("/proc/self/ns/pid")?;
    Ok((m.dev(), m.ino()))
}

fn pidns_of(pid: u32) -> Option<(u64, u64)> {
    let m = std::fs::metadata(format!("/proc/{pid}/ns/pid")).ok()?;
    Some((m.dev(), m.ino()))
}

/// Clock ticks per second (`/proc/<pid>/stat` start times).
fn clock_ticks() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    u64::try_from(t).ok().filter(|t| *t > 0).unwrap_or(100)
}

/// A held task of a pending container.
struct GateHold {
    hold: Hold,
    pid: u32,
}

/// The daemon's side of the gate: the `PENDING` map and the tasks it holds.
pub struct Gate {
    pending: PendingCgroups,
    /// Held tasks by the pending cgroup they were stopped for.
    holds: HashMap<u64, Vec<GateHold>>,
    timeout: Duration,
    window: Duration,
    host_pidns: (u64, u64),
    tick_ns: u64,
}

impl Gate {
    /// `timeout`: the longest a task is held; `window`: how long a cgroup may stay pending
    /// (the kernel ignores older entries; the daemon deletes them).
    pub fn new(
        pending: PendingCgroups,
        timeout: Duration,
        window: Duration,
        host_pidns: (u64, u64),
    ) -> Self {
        Gate {
            pending,
            holds: HashMap::new(),
            timeout,
            window,
            host_pidns,
            tick_ns: 1_000_000_000 / clock_ticks(),
        }
    }

    /// Takes over the task of a gate record: records it and holds it until its cgroup is
    /// settled (or the bound passes). A cgroup that is already settled is resumed at once.
    pub fn on_record(&mut self, freezer: &Freezer, rec: &GateRecord) {
        if rec.signal_ret != 0 {
            tracing::warn!(pid = rec.pid, cgroup_id = rec.cgroup_id, ret = rec.signal_ret, "exec gate could not stop a task of a pending container; relying on the late-arm scan");
            return;
        }
        let Some(stat) = read_stat(rec.pid) else {
            tracing::debug!(pid = rec.pid, "gated task already gone");
            return;
        };
        // The task that exec'd started before the exec; a later start means the pid was
        // recycled (the stopped task was killed) and must not be touched.
        if stat.start_ticks.saturating_mul(self.tick_ns) > rec.boot_ns {
            tracing::debug!(pid = rec.pid, "gated task gone, its pid reused");
            return;
        }
        let task = StoppedTask {
            pid: rec.pid,
            start_ticks: stat.start_ticks,
            cgroup_id: rec.cgroup_id,
        };
        let since = Instant::now()
            .checked_sub(Duration::from_nanos(
                monotonic_ns().saturating_sub(rec.ktime_ns),
            ))
            .unwrap_or_else(Instant::now);
        let hold = match freezer.hold_stopped(task, since, self.timeout) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(pid = rec.pid, error = %e, "cannot record a gated task; resuming it now");
                resume_logged(&task);
                return;
            }
        };
        let host = pidns_of(rec.pid) == Some(self.host_pidns);
        if host || !self.pending.contains(rec.cgroup_id) {
            if host {
                tracing::error!(
                    pid = rec.pid,
                    cgroup_id = rec.cgroup_id,
                    "exec gate stopped a task of the host PID namespace; resuming it"
                );
            } else {
                tracing::debug!(
                    pid = rec.pid,
                    cgroup_id = rec.cgroup_id,
                    "gated after its container was settled; resuming"
                );
            }
            end(freezer, hold);
            return;
        }
        tracing::debug!(
            pid = rec.pid,
            cgroup_id = rec.cgroup_id,
            "holding a task of a container not armed yet"
        );
        self.holds
            .entry(rec.cgroup_id)
            .or_default()
            .push(GateHold { hold, pid: rec.pid });
    }

    /// Ends gating for `cgroup_id` (armed, or not to be armed) and resumes the tasks held
    /// for it. Returns how long the first-stopped of them was held (µs), if any.
    pub fn settle(&mut self, freezer: &Freezer, cgroup_id: u64) -> Option<u64> {
        let was_pending = self.pending.contains(cgroup_id);
        self.pending.remove(cgroup_id);
        tracing::debug!(
            cgroup_id,
            was_pending,
            held = self.holds.get(&cgroup_id).map_or(0, Vec::len),
            "gate settled"
        );
        let held = self.holds.remove(&cgroup_id)?;
        let mut longest = None;
        for h in held {
            let pid = h.pid;
            if let Some(us) = end(freezer, h.hold) {
                longest = Some(longest.map_or(us, |l: u64| l.max(us)));
            } else {
                tracing::debug!(pid, cgroup_id, "gated task was not held to the end");
            }
        }
        longest
    }

    /// [`Gate::settle`] for the cgroup directory `dir` (its inode number is its id).
    pub fn settle_dir(&mut self, freezer: &Freezer, dir: &Path) -> Option<u64> {
        let id = std::fs::metadata(dir).ok()?.ino();
        self.settle(freezer, id)
    }

    /// Periodic clean-up: pending entries past the window (a cgroup whose mkdir the daemon
    /// never handled) are dropped, with any task held for them.
    pub fn expire(&mut self, freezer: &Freezer) {
        let window = u64::try_from(self.window.as_nanos()).unwrap_or(u64::MAX);
        for id in self.pending.older_than(monotonic_ns(), window) {
            tracing::debug!(cgroup_id = id, "pending cgroup never settled; gate ended");
            self.settle(freezer, id);
        }
        let orphaned: Vec<u64> = self
            .holds
            .keys()
            .copied()
            .filter(|id| !self.pending.contains(*id))
            .collect();
        for id in orphaned {
            self.settle(freezer, id);
        }
    }

    /// Resumes every held task (shutdown).
    pub fn release_all(&mut self, freezer: &Freezer) {
        let ids: Vec<u64> = self.holds.keys().copied().collect();
        for id in ids {
            self.settle(freezer, id);
        }
    }
}

/// Ends a hold; the time held (µs) when the task was really resumed by it.
fn end(freezer: &Freezer, hold: Hold) -> Option<u64> {
    match freezer.thaw(hold) {
        Ok(rep) => {
            if rep.bound_exceeded {
                tracing::warn!(
                    held_us = rep.held.as_micros() as u64,
                    "arming took longer than --gate-timeout; the watchdog resumed the task"
                );
            }
            match rep.released {
                Some(Released::Task(Resumed::Continued)) => Some(rep.held.as_micros() as u64),
                Some(Released::Task(Resumed::NotStopped)) => {
                    tracing::info!("a gated task was resumed by someone else before fsmon armed its container: late arm, relying on the scan");
                    None
                }
                _ => None,
            }
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot resume a gated task");
            None
        }
    }
}

fn resume_logged(task: &StoppedTask) {
    if let Err(e) = task.resume() {
        tracing::error!(pid = task.pid, error = %e, "cannot resume a gated task");
    }
}

/// `execve` and `execveat` syscall numbers (the gate stops a task on its way out of one).
#[cfg(target_arch = "x86_64")]
const EXEC_SYSCALLS: [i64; 2] = [59, 322];
#[cfg(target_arch = "aarch64")]
const EXEC_SYSCALLS: [i64; 2] = [221, 281];
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const EXEC_SYSCALLS: [i64; 2] = [-2, -2];

/// Parses `/proc/<pid>/syscall`: the syscall number and the instruction pointer (last
/// field). `running` (or anything else) is `None`.
pub fn parse_syscall(text: &str) -> Option<(i64, u64)> {
    let mut f = text.split_ascii_whitespace();
    let nr = f.next()?.parse().ok()?;
    let pc = f.next_back()?.strip_prefix("0x")?;
    Some((nr, u64::from_str_radix(pc, 16).ok()?))
}

/// `AT_ENTRY` and `AT_BASE` from a 64-bit `/proc/<pid>/auxv`.
pub fn parse_auxv(bytes: &[u8]) -> (Option<u64>, Option<u64>) {
    const AT_BASE: u64 = 7;
    const AT_ENTRY: u64 = 9;
    let (mut entry, mut base) = (None, None);
    for pair in bytes.chunks_exact(16) {
        let word = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&pair[i..i + 8]);
            u64::from_ne_bytes(b)
        };
        match word(0) {
            0 => break,
            AT_ENTRY => entry = Some(word(8)),
            AT_BASE => base = Some(word(8)).filter(|b| *b != 0),
            _ => {}
        }
    }
    (entry, base)
}

/// `e_entry` of a 64-bit little-endian ELF header.
pub fn elf_entry(header: &[u8]) -> Option<u64> {
    if header.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(header.get(24..32)?);
    Some(u64::from_le_bytes(b))
}

/// The entry point of the program interpreter (`ld.so`) mapped at `base` in `pid`, read
/// from the mapped file itself (`map_files`, never a path inside the container).
fn interpreter_entry(pid: u32, base: u64) -> Option<u64> {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).ok()?;
    let prefix = format!("{base:x}-");
    let range = maps
        .lines()
        .find(|l| l.starts_with(&prefix))?
        .split_ascii_whitespace()
        .next()?
        .to_owned();
    let mut header = [0u8; 64];
    let f = std::fs::File::open(format!("/proc/{pid}/map_files/{range}")).ok()?;
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut header, 0).ok()?;
    Some(base.wrapping_add(elf_entry(&header)?))
}

/// Whether `pid` looks stopped by an exec gate: outside `host_pidns`, in state `T`, on its
/// way out of `execve` with its instruction pointer at the new program's first instruction.
fn stopped_at_exec(pid: u32, host_pidns: (u64, u64)) -> Option<ProcStat> {
    let stat = read_stat(pid)?;
    if stat.state != b'T' || pidns_of(pid)? == host_pidns {
        return None;
    }
    let (nr, pc) = parse_syscall(&std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()?)?;
    if !EXEC_SYSCALLS.contains(&nr) {
        return None;
    }
    let (entry, base) = parse_auxv(&std::fs::read(format!("/proc/{pid}/auxv")).ok()?);
    let at_entry = entry == Some(pc) || base.and_then(|b| interpreter_entry(pid, b)) == Some(pc);
    at_entry.then_some(stat)
}

/// Resumes tasks of containers (under the v2 hierarchy at `unified`) that a killed fsmon's
/// gate stopped before it could record them. Returns their pids.
pub fn resume_orphans(unified: &Path) -> Vec<u32> {
    let Ok(host) = host_pidns() else {
        return Vec::new();
    };
    let mut resumed = Vec::new();
    let mut dirs = vec![(unified.to_path_buf(), 0)];
    while let Some((dir, depth)) = dirs.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            if depth < 8 && e.file_type().is_ok_and(|t| t.is_dir()) {
                dirs.push((e.path(), depth + 1));
            }
        }
        if depth == 0 {
            continue;
        }
        let Ok(procs) = std::fs::read_to_string(dir.join("cgroup.procs")) else {
            continue;
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            let Some(stat) = stopped_at_exec(pid, host) else {
                continue;
            };
            let task = StoppedTask {
                pid,
                start_ticks: stat.start_ticks,
                cgroup_id: 0,
            };
            if task.resume().is_ok_and(|r| r == Resumed::Continued) {
                resumed.push(pid);
            }
        }
    }
    resumed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_from_the_last_paren() {
        let line = "4242 (sh) T 4241 4242 4242 0 -1 4194560 120 0 0 0 0 0 0 0 20 0 1 0 987654 4452352 190 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: b'T',
                start_ticks: 987_654
            })
        );
        let odd = "77 (a) b) (c ) S 1 77 77 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 555 0 0";
        assert_eq!(
            parse_stat(odd),
            Some(ProcStat {
                state: b'S',
                start_ticks: 555
            })
        );
        assert_eq!(parse_stat("12 (x) R 1 2"), None);
        assert_eq!(parse_stat(""), None);
    }

    #[test]
    fn a_pending_sigstop_is_seen_in_either_mask() {
        let status = |sig: &str, shd: &str| {
            format!("Name:\tsh\nState:\tR (running)\nSigPnd:\t{sig}\nShdPnd:\t{shd}\nSigBlk:\t0000000000040000\n")
        };
        assert!(parse_stop_pending(&status(
            "0000000000000000",
            "0000000000040000"
        )));
        assert!(parse_stop_pending(&status(
            "0000000000040000",
            "0000000000000000"
        )));
        // SIGCONT (bit 17) and SIGTSTP (bit 19) are not SIGSTOP; SigBlk never counts.
        assert!(!parse_stop_pending(&status(
            "0000000000020000",
            "0000000000080000"
        )));
        assert!(!parse_stop_pending("State:\tT (stopped)\n"));
    }

    #[test]
    fn syscall_line_gives_number_and_pc() {
        assert_eq!(
            parse_syscall("59 0x0 0x0 0x0 0x0 0x0 0x0 0x7ffd1c2b3e40 0x401000\n"),
            Some((59, 0x401000))
        );
        assert_eq!(
            parse_syscall("-1 0x7ffd1c2b3e40 0x7f12aabbcc10\n"),
            Some((-1, 0x7f12_aabb_cc10))
        );
        assert_eq!(parse_syscall("running\n"), None);
        assert_eq!(parse_syscall(""), None);
    }

    #[test]
    fn auxv_entry_and_base() {
        let mut v = Vec::new();
        for (k, val) in [
            (6u64, 4096u64),
            (7, 0x7f00_0000_0000),
            (9, 0x40_1000),
            (0, 0),
        ] {
            v.extend_from_slice(&k.to_ne_bytes());
            v.extend_from_slice(&val.to_ne_bytes());
        }
        assert_eq!(parse_auxv(&v), (Some(0x40_1000), Some(0x7f00_0000_0000)));
        // A static program: AT_BASE is 0, i.e. no interpreter.
        let mut s = Vec::new();
        for (k, val) in [(9u64, 0x40_1000u64), (7, 0), (0, 0)] {
            s.extend_from_slice(&k.to_ne_bytes());
            s.extend_from_slice(&val.to_ne_bytes());
        }
        assert_eq!(parse_auxv(&s), (Some(0x40_1000), None));
        assert_eq!(parse_auxv(&[]), (None, None));
    }

    #[test]
    fn elf_entry_of_a_64_bit_header() {
        let mut h = [0u8; 64];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        h[24..32].copy_from_slice(&0x1d10u64.to_le_bytes());
        assert_eq!(elf_entry(&h), Some(0x1d10));
        h[4] = 1; // 32-bit
        assert_eq!(elf_entry(&h), None);
        assert_eq!(elf_entry(b"#!/bin/sh"), None);
    }

    #[test]
    fn own_process_is_running_with_a_readable_start_time() {
        let me = std::process::id();
        let stat = read_stat(me).expect("own /proc stat");
        assert_ne!(stat.state, b'T');
        assert!(stat.start_ticks > 0);
        assert!(!stop_pending(me));
        assert_eq!(pidns_of(me), host_pidns().ok());
    }
}
