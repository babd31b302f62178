//! fsmon's eBPF programs: container cgroup lifecycle and the exec gate, nothing else.
//!
//! Two tracepoint programs, on `cgroup/cgroup_mkdir` and `cgroup/cgroup_rmdir` (kernel
//! >= 4.19 for the tracepoints, >= 5.8 for BPF ring buffers), read the record's fields at
//! offsets the daemon took from the tracepoint's `format` file (handed in as the read-only
//! global `FSMON_CONFIG`), filter in the kernel — only the v1 freezer and v2 hierarchies,
//! only paths that carry a 64-hex container id — and only then send a fixed-layout
//! [`CgroupEvent`] through the `EVENTS` ring buffer. Records the ring buffer cannot take
//! are counted in `STATS`, never dropped silently.
//!
//! The exec gate (kernel >= 5.8 for every helper it uses; `bpf_send_signal` from a
//! tracepoint >= 5.3): `cgroup_mkdir` marks a new v2 container cgroup pending in `PENDING`;
//! a program on `sched/sched_process_exec` stops (`bpf_send_signal(SIGSTOP)`, delivered
//! before the new program's first instruction) an exec'ing task whose v2 cgroup, or an
//! ancestor of it, is pending — only when the task is *not* in the host PID namespace, so
//! runtime helpers (runc, runc init, conmon), which exec inside the new cgroup from the
//! host namespace, are never stopped — and tells the daemon through `EVENTS`, which must
//! have room for the record *before* the stop is sent: a stop the daemon cannot hear of is
//! never sent. The daemon deletes the entry once the container is armed.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::bpf_pidns_info,
    helpers::{
        bpf_get_current_ancestor_cgroup_id, bpf_get_current_cgroup_id, bpf_get_current_pid_tgid,
        bpf_get_ns_current_pid_tgid, bpf_ktime_get_boot_ns, bpf_ktime_get_ns,
        bpf_probe_read_kernel_str_bytes, bpf_send_signal,
    },
    macros::{map, tracepoint},
    maps::{HashMap, PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext as _,
};
use aya_log_ebpf::warn;
use fsmon_common::{
    has_container_id, CgroupEvent, GateConfig, GateEvent, PendingCgroup, ProgramConfig,
    CGROUP_PATH_LEN, EVENT_GATE, EVENT_MKDIR, EVENT_RMDIR, FLAG_TRUNCATED, GATE_ANCESTOR_LEVELS,
    PENDING_MAX, SIGSTOP, STAT_FILTERED, STAT_GATED, STAT_GATE_SKIPPED, STAT_RINGBUF_FULL,
    STAT_SENT, STAT_SLOTS,
};

/// Set by the daemon before load (`EbpfLoader::set_global`); all zero means "not set".
#[no_mangle]
static FSMON_CONFIG: ProgramConfig = ProgramConfig {
    layout: fsmon_common::TracepointLayout {
        root_off: 0,
        level_off: 0,
        id_off: 0,
        id_size: 0,
        path_loc_off: 0,
        _pad: 0,
    },
    filter: fsmon_common::FilterConfig {
        freezer_hierarchy: u32::MAX,
        unified_hierarchy: u32::MAX,
    },
};

/// The exec gate's settings, set by the daemon before load; all zero means "gate off".
#[no_mangle]
static FSMON_GATE: GateConfig = GateConfig {
    enabled: 0,
    _pad: 0,
    host_pidns_dev: 0,
    host_pidns_ino: 0,
    window_ns: 0,
};

/// Container cgroups (v2 ids) not armed yet: their tasks are stopped at exec.
#[map]
static PENDING: HashMap<u64, PendingCgroup> = HashMap::with_max_entries(PENDING_MAX, 0);

/// Lifecycle records for the daemon. 256 KiB holds ~870 records: far more cgroups than a
/// host creates in the time the daemon takes to wake up.
#[map]
static EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Per-CPU scratch space: the record is assembled and filtered here, and only a record that
/// passes the filter is copied into the ring buffer.
#[map]
static SCRATCH: PerCpuArray<CgroupEvent> = PerCpuArray::with_max_entries(1, 0);

/// Counters, indexed by `STAT_*`; the daemon sums them across CPUs.
#[map]
static STATS: PerCpuArray<u64> = PerCpuArray::with_max_entries(STAT_SLOTS, 0);

#[tracepoint(category = "cgroup", name = "cgroup_mkdir")]
pub fn cgroup_mkdir(ctx: TracePointContext) -> u32 {
    handle(&ctx, EVENT_MKDIR)
}

#[tracepoint(category = "cgroup", name = "cgroup_rmdir")]
pub fn cgroup_rmdir(ctx: TracePointContext) -> u32 {
    handle(&ctx, EVENT_RMDIR)
}

#[tracepoint(category = "sched", name = "sched_process_exec")]
pub fn sched_process_exec(_ctx: TracePointContext) -> u32 {
    // SAFETY: a read-only global, read as FSMON_CONFIG is.
    let gate: GateConfig = unsafe { core::ptr::read_volatile(&FSMON_GATE) };
    if gate.enabled == 0 {
        return 0;
    }
    // SAFETY: plain helper calls without pointer arguments.
    let (task_cgroup, now) = unsafe { (bpf_get_current_cgroup_id(), bpf_ktime_get_ns()) };
    let Some(cgroup_id) = pending_cgroup(task_cgroup, now, gate.window_ns) else {
        return 0;
    };
    // The helper succeeds only when the task's PID namespace is the given one: a task of the
    // host namespace (runc, conmon) is never stopped; stopping one deadlocks the start.
    let mut ns = bpf_pidns_info { pid: 0, tgid: 0 };
    // SAFETY: `ns` is a local of the size passed.
    let in_host = unsafe {
        bpf_get_ns_current_pid_tgid(
            gate.host_pidns_dev,
            gate.host_pidns_ino,
            &mut ns,
            core::mem::size_of::<bpf_pidns_info>() as u32,
        )
    } == 0;
    if in_host {
        return 0;
    }
    // Room for the record first: a task the daemon cannot hear of must not be stopped.
    let Some(mut entry) = EVENTS.reserve::<GateEvent>(0) else {
        bump(STAT_GATE_SKIPPED);
        return 0;
    };
    // SAFETY: a plain helper call; SIGSTOP goes to the current task's process.
    let signal_ret = unsafe { bpf_send_signal(SIGSTOP) } as i32;
    // SAFETY: plain helper calls without arguments.
    let (pid_tgid, boot_ns) = unsafe { (bpf_get_current_pid_tgid(), bpf_ktime_get_boot_ns()) };
    entry.write(GateEvent {
        kind: EVENT_GATE,
        pid: (pid_tgid >> 32) as u32,
        signal_ret,
        _pad: 0,
        cgroup_id,
        task_cgroup_id: task_cgroup,
        boot_ns,
        ktime_ns: now,
    });
    entry.submit(0);
    bump(if signal_ret == 0 {
        STAT_GATED
    } else {
        STAT_GATE_SKIPPED
    });
    0
}

/// The pending cgroup (still inside its window) that `task_cgroup` is or lies below.
#[inline(always)]
fn pending_cgroup(task_cgroup: u64, now: u64, window_ns: u64) -> Option<u64> {
    let fresh = |id: u64| -> bool {
        // SAFETY: the value is copied out at once; the daemon only deletes entries.
        match unsafe { PENDING.get(&id) } {
            Some(p) => now.wrapping_sub(p.mkdir_ktime_ns) <= window_ns,
            None => false,
        }
    };
    if fresh(task_cgroup) {
        return Some(task_cgroup);
    }
    let mut level = 1;
    while level <= GATE_ANCESTOR_LEVELS {
        // SAFETY: a plain helper call; it returns 0 above the task's own depth.
        let id = unsafe { bpf_get_current_ancestor_cgroup_id(level) };
        if id == 0 || id == task_cgroup {
            return None;
        }
        if fresh(id) {
            return Some(id);
        }
        level += 1;
    }
    None
}

#[inline(always)]
fn bump(slot: u32) {
    if let Some(p) = STATS.get_ptr_mut(slot) {
        // SAFETY: the pointer comes from a per-CPU array slot of this CPU; programs on one
        // CPU do not preempt each other, so the increment is not racy.
        unsafe { *p += 1 };
    }
}

#[inline(always)]
fn handle(ctx: &TracePointContext, kind: u32) -> u32 {
    // SAFETY: a read-only global; read_volatile keeps the compiler from folding the
    // default value that the loader replaces.
    let cfg: ProgramConfig = unsafe { core::ptr::read_volatile(&FSMON_CONFIG) };
    let layout = cfg.layout;
    if layout.path_loc_off == 0 {
        return 0;
    }
    // SAFETY: offsets come from the tracepoint's own format file; read_at uses
    // bpf_probe_read, which fails cleanly rather than faulting.
    let root: i32 = match unsafe { ctx.read_at::<i32>(layout.root_off as usize) } {
        Ok(v) => v,
        Err(_) => return 0,
    };
    let root = root as u32;
    if root != cfg.filter.freezer_hierarchy && root != cfg.filter.unified_hierarchy {
        bump(STAT_FILTERED);
        return 0;
    }
    let Some(ev) = SCRATCH.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: per-CPU scratch slot of this CPU, valid for the whole program run.
    let ev = unsafe { &mut *ev };
    // SAFETY: as above, offsets from the format file, reads through bpf_probe_read.
    let level = unsafe { ctx.read_at::<i32>(layout.level_off as usize) }.unwrap_or(0);
    let id = if layout.id_size == 8 {
        // SAFETY: as above.
        unsafe { ctx.read_at::<u64>(layout.id_off as usize) }.unwrap_or(0)
    } else {
        // SAFETY: as above.
        unsafe { ctx.read_at::<u32>(layout.id_off as usize) }.unwrap_or(0) as u64
    };
    // SAFETY: as above; `__data_loc` is a u32: offset in the low half, length in the high.
    let loc = match unsafe { ctx.read_at::<u32>(layout.path_loc_off as usize) } {
        Ok(v) => v,
        Err(_) => return 0,
    };
    let path_off = (loc & 0xffff) as usize;
    let path_len = (loc >> 16) as usize; // includes the NUL
                                         // SAFETY: the string lives inside the tracepoint record at `path_off`; the helper
                                         // copies at most the buffer's size and always NUL-terminates.
    let copied = match unsafe {
        bpf_probe_read_kernel_str_bytes(ctx.as_ptr().add(path_off) as *const u8, &mut ev.path)
    } {
        Ok(s) => s.len(),
        Err(_) => return 0,
    };
    if !has_container_id(&ev.path, copied) {
        bump(STAT_FILTERED);
        return 0;
    }
    // SAFETY: a read-only global, read as FSMON_CONFIG is.
    let gate: GateConfig = unsafe { core::ptr::read_volatile(&FSMON_GATE) };
    if gate.enabled != 0 && root == 0 && root == cfg.filter.unified_hierarchy {
        if kind == EVENT_MKDIR {
            let pending = PendingCgroup {
                // SAFETY: a plain helper call.
                mkdir_ktime_ns: unsafe { bpf_ktime_get_ns() },
            };
            // A full map only means this container is not gated (it is still armed).
            let _ = PENDING.insert(&id, &pending, 0);
        } else {
            let _ = PENDING.remove(&id);
        }
    }
    ev.kind = kind;
    ev.hierarchy_id = root;
    ev.cgroup_id = id;
    // SAFETY: a plain helper call with no arguments.
    ev.ktime_ns = unsafe { bpf_ktime_get_ns() };
    ev.level = level as u32;
    ev.path_len = copied as u32;
    ev.flags = if path_len > CGROUP_PATH_LEN {
        FLAG_TRUNCATED
    } else {
        0
    };
    ev._pad = 0;
    if EVENTS.output::<CgroupEvent>(&*ev, 0).is_err() {
        bump(STAT_RINGBUF_FULL);
        warn!(ctx, "fsmon: ring buffer full, cgroup record lost");
        return 0;
    }
    bump(STAT_SENT);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 4] = *b"GPL\0";
