//! fsmon's eBPF programs: container cgroup lifecycle, nothing else.
//!
//! Two tracepoint programs, on `cgroup/cgroup_mkdir` and `cgroup/cgroup_rmdir` (kernel
//! >= 4.19 for the tracepoints, >= 5.8 for BPF ring buffers), read the record's fields at
//! offsets the daemon took from the tracepoint's `format` file (handed in as the read-only
//! global `FSMON_CONFIG`), filter in the kernel — only the v1 freezer and v2 hierarchies,
//! only paths that carry a 64-hex container id — and only then send a fixed-layout
//! [`CgroupEvent`] through the `EVENTS` ring buffer. Records the ring buffer cannot take
//! are counted in `STATS`, never dropped silently.
#![no_std]
#![no_main]

use aya_ebpf::{
    helpers::{bpf_ktime_get_ns, bpf_probe_read_kernel_str_bytes},
    macros::{map, tracepoint},
    maps::{PerCpuArray, RingBuf},
    programs::TracePointContext,
    EbpfContext as _,
};
use aya_log_ebpf::warn;
use fsmon_common::{
    has_container_id, CgroupEvent, ProgramConfig, CGROUP_PATH_LEN, EVENT_MKDIR, EVENT_RMDIR,
    FLAG_TRUNCATED, STAT_FILTERED, STAT_RINGBUF_FULL, STAT_SENT, STAT_SLOTS,
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
