//! Wire types shared by the eBPF programs (`fsmon-ebpf`) and the daemon (`fsmon`).
//!
//! Everything here is `#[repr(C)]`, fixed-width and explicitly padded, so that the kernel
//! side and the user side cannot disagree on the layout; the `const` assertions below fail
//! the build of *both* sides if a field moves. The `user` feature adds `aya::Pod` and
//! `bytemuck` impls for the daemon; the eBPF side builds this crate as plain `no_std`.
#![no_std]

/// Maximum cgroup path length carried in a record (bytes, including the NUL).
///
/// Container cgroup paths are short (`/docker/<64 hex>` is 72 bytes; the longest kubepods
/// systemd paths are ~200); a longer path is truncated and flagged, never overflowed.
pub const CGROUP_PATH_LEN: usize = 256;

/// `CgroupEvent::kind` for a `cgroup_mkdir`.
pub const EVENT_MKDIR: u32 = 1;
/// `CgroupEvent::kind` for a `cgroup_rmdir`.
pub const EVENT_RMDIR: u32 = 2;

/// `GateEvent::kind`: the exec gate stopped a task of a pending container.
pub const EVENT_GATE: u32 = 3;

/// `CgroupEvent::flags` bit: the path did not fit in `path` and was truncated.
pub const FLAG_TRUNCATED: u32 = 1;

/// One cgroup lifecycle record, sent through the `EVENTS` ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct CgroupEvent {
    /// `EVENT_MKDIR` or `EVENT_RMDIR`. First, so a reader can dispatch on it.
    pub kind: u32,
    /// The cgroup hierarchy id (`root` in the tracepoint; 0 is the v2 hierarchy).
    pub hierarchy_id: u32,
    /// The cgroup's kernel id (its kernfs inode number).
    pub cgroup_id: u64,
    /// `bpf_ktime_get_ns()` when the tracepoint fired (CLOCK_MONOTONIC).
    pub ktime_ns: u64,
    /// Depth below the hierarchy root (the root is 0).
    pub level: u32,
    /// `FLAG_*` bits.
    pub flags: u32,
    /// Length of `path` without the NUL.
    pub path_len: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
    /// The cgroup path relative to its hierarchy root, NUL-terminated.
    pub path: [u8; CGROUP_PATH_LEN],
}

const _: () = {
    assert!(core::mem::size_of::<CgroupEvent>() == 40 + CGROUP_PATH_LEN);
    assert!(core::mem::offset_of!(CgroupEvent, kind) == 0);
    assert!(core::mem::offset_of!(CgroupEvent, cgroup_id) == 8);
    assert!(core::mem::offset_of!(CgroupEvent, ktime_ns) == 16);
    assert!(core::mem::offset_of!(CgroupEvent, path_len) == 32);
    assert!(core::mem::offset_of!(CgroupEvent, path) == 40);
};

/// A record of the exec gate (`sched/sched_process_exec`), sent through the same `EVENTS`
/// ring buffer as [`CgroupEvent`]; the daemon dispatches on `kind` (first in both).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GateEvent {
    /// `EVENT_GATE`.
    pub kind: u32,
    /// The process (thread-group) id, in the host's PID namespace.
    pub pid: u32,
    /// Return code of `bpf_send_signal(SIGSTOP)`: 0 when the stop was queued.
    pub signal_ret: i32,
    /// Explicit padding; always zero.
    pub _pad: u32,
    /// The pending cgroup that matched (the task's own v2 cgroup or an ancestor of it).
    pub cgroup_id: u64,
    /// The task's own v2 cgroup (`bpf_get_current_cgroup_id()`).
    pub task_cgroup_id: u64,
    /// `bpf_ktime_get_boot_ns()` at the exec: the task started before this instant, so a
    /// task found under `pid` that started later is another one (the pid was recycled).
    pub boot_ns: u64,
    /// `bpf_ktime_get_ns()` at the exec (CLOCK_MONOTONIC), to time the hold.
    pub ktime_ns: u64,
}

const _: () = {
    assert!(core::mem::size_of::<GateEvent>() == 48);
    assert!(core::mem::offset_of!(GateEvent, kind) == 0);
    assert!(core::mem::offset_of!(GateEvent, cgroup_id) == 16);
    assert!(core::mem::offset_of!(GateEvent, boot_ns) == 32);
};

/// Value of the `PENDING` map (key: v2 cgroup id): a container cgroup that the daemon has
/// not armed yet. Inserted by the `cgroup_mkdir` program, deleted by the daemon once it
/// armed the container (or decided not to) and by the `cgroup_rmdir` program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct PendingCgroup {
    /// `bpf_ktime_get_ns()` at the mkdir. The gate ignores entries older than
    /// `GateConfig::window_ns`, so an entry the daemon failed to delete gates nothing.
    pub mkdir_ktime_ns: u64,
}

/// The exec gate's settings: the second read-only global (`FSMON_GATE`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct GateConfig {
    /// 1 when the gate is on. 0 (the default) gates nothing and marks nothing pending.
    pub enabled: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
    /// `st_dev` of the host PID namespace (`/proc/self/ns/pid` of the daemon): tasks in it
    /// (runc, conmon, runtime helpers) are never stopped.
    pub host_pidns_dev: u64,
    /// `st_ino` of the host PID namespace.
    pub host_pidns_ino: u64,
    /// How long after its mkdir a pending cgroup can gate (nanoseconds).
    pub window_ns: u64,
}

/// Largest number of pending container cgroups the gate tracks at once.
pub const PENDING_MAX: u32 = 4096;
/// How many ancestor levels of a task's v2 cgroup the gate checks (crun puts a container's
/// process in a `container` sub-cgroup; kubepods paths are four levels deep).
pub const GATE_ANCESTOR_LEVELS: i32 = 8;
/// `SIGSTOP` (the same number on every Linux architecture fsmon runs on).
pub const SIGSTOP: u32 = 19;

/// Where the tracepoint's fields are, read by the daemon from the tracepoint's `format`
/// file and handed to the program as a read-only global before it is loaded.
///
/// The record layout of `cgroup_mkdir` changed across kernels (`int root; int id; int level`
/// became `int root; int level; u64 id`), so nothing is hard-coded.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct TracepointLayout {
    /// Offset of `int root` (the hierarchy id).
    pub root_off: u32,
    /// Offset of `int level`.
    pub level_off: u32,
    /// Offset of the cgroup id.
    pub id_off: u32,
    /// Size of the cgroup id field: 4 (older kernels) or 8.
    pub id_size: u32,
    /// Offset of the `__data_loc char[] path` descriptor.
    pub path_loc_off: u32,
    /// Explicit padding; always zero.
    pub _pad: u32,
}

/// What the program lets through, set by the daemon before loading.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct FilterConfig {
    /// Hierarchy id of the v1 freezer hierarchy, or `u32::MAX` when there is none.
    pub freezer_hierarchy: u32,
    /// Hierarchy id of the v2 hierarchy (0 when mounted), or `u32::MAX` when unmounted.
    pub unified_hierarchy: u32,
}

/// Layout + filter: the one read-only global the program reads (`FSMON_CONFIG`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
#[cfg_attr(feature = "user", derive(bytemuck::Pod, bytemuck::Zeroable))]
pub struct ProgramConfig {
    /// Field offsets of the tracepoint record.
    pub layout: TracepointLayout,
    /// Which hierarchies to report.
    pub filter: FilterConfig,
}

/// Index in the `STATS` array: ring-buffer reserve/output failures (records lost).
pub const STAT_RINGBUF_FULL: u32 = 0;
/// Index in the `STATS` array: records sent.
pub const STAT_SENT: u32 = 1;
/// Index in the `STATS` array: cgroups seen but filtered out in the kernel.
pub const STAT_FILTERED: u32 = 2;
/// Index in the `STATS` array: tasks stopped by the exec gate.
pub const STAT_GATED: u32 = 3;
/// Index in the `STATS` array: execs the gate let through because the ring buffer was full
/// (the daemon could not have resumed them) or the stop could not be queued.
pub const STAT_GATE_SKIPPED: u32 = 4;
/// Number of `STATS` slots.
pub const STAT_SLOTS: u32 = 5;

/// Length of a container id in hex characters.
pub const CONTAINER_ID_HEX: usize = 64;

/// True when the last path component ends in a 64-hex container id, optionally followed by
/// `.scope` — the shape every container runtime fsmon knows gives a container's own cgroup
/// (`/docker/<id>`, `docker-<id>.scope`, `cri-containerd-<id>.scope`, `libpod-<id>.scope`,
/// kubepods `.../<id>`). The kernel filters with it (a fixed 64-step loop, cheap for the
/// verifier); the daemon's parser is stricter.
#[inline(always)]
pub fn has_container_id(path: &[u8; CGROUP_PATH_LEN], len: usize) -> bool {
    const SCOPE: &[u8; 6] = b".scope";
    if !(CONTAINER_ID_HEX..=CGROUP_PATH_LEN).contains(&len) {
        return false;
    }
    let mut end = len;
    if len >= CONTAINER_ID_HEX + SCOPE.len() {
        let mut scoped = true;
        let mut k = 0;
        while k < SCOPE.len() {
            if path[(len - SCOPE.len() + k) & (CGROUP_PATH_LEN - 1)] != SCOPE[k] {
                scoped = false;
            }
            k += 1;
        }
        if scoped {
            end = len - SCOPE.len();
        }
    }
    let start = end - CONTAINER_ID_HEX;
    let mut k = 0;
    while k < CONTAINER_ID_HEX {
        let c = path[(start + k) & (CGROUP_PATH_LEN - 1)];
        if !(c.is_ascii_digit() || (b'a'..=b'f').contains(&c)) {
            return false;
        }
        k += 1;
    }
    true
}

const _: () = assert!(CGROUP_PATH_LEN.is_power_of_two());

#[cfg(feature = "user")]
// SAFETY: CgroupEvent is repr(C), Copy, every bit pattern is valid and it has no padding
// bytes that are not named fields (asserted above).
unsafe impl aya::Pod for CgroupEvent {}
#[cfg(feature = "user")]
// SAFETY: as for CgroupEvent: repr(C), plain integers, explicit padding.
unsafe impl aya::Pod for ProgramConfig {}

#[cfg(feature = "user")]
// SAFETY: repr(C), plain integers, explicit padding (asserted above).
unsafe impl aya::Pod for GateEvent {}
#[cfg(feature = "user")]
// SAFETY: a single u64.
unsafe impl aya::Pod for PendingCgroup {}
#[cfg(feature = "user")]
// SAFETY: repr(C), plain integers, explicit padding.
unsafe impl aya::Pod for GateConfig {}

#[cfg(all(test, feature = "user"))]
mod tests {
    extern crate std;
    use super::*;

    fn buf(s: &str) -> ([u8; CGROUP_PATH_LEN], usize) {
        let mut b = [0u8; CGROUP_PATH_LEN];
        b[..s.len()].copy_from_slice(s.as_bytes());
        (b, s.len())
    }

    #[test]
    fn container_id_filter() {
        let id = "a".repeat(63) + "1";
        for (path, want) in [
            (std::format!("/docker/{id}"), true),
            (std::format!("/system.slice/docker-{id}.scope"), true),
            ("/docker".into(), false),
            (std::format!("/docker/{}", &id[..63]), false),
            (std::format!("/x/{}", id.to_uppercase()), false),
            (std::format!("/kubepods/pod1/{id}"), true),
            (std::format!("/libpod_parent/libpod-{id}"), true),
            (std::format!("/docker/{id}/init.scope"), false),
            (std::format!("/docker/{id}.scopx"), false),
            (id.clone(), true),
        ] {
            let (b, n) = buf(&path);
            assert_eq!(has_container_id(&b, n), want, "{path}");
        }
    }
}
