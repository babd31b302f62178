//! The eBPF boundary: the only module that touches aya.
//!
//! Loads the embedded lifecycle programs, attaches them to the `cgroup/cgroup_mkdir` and
//! `cgroup/cgroup_rmdir` tracepoints (kernel >= 4.19; BPF ring buffer >= 5.8), and reads
//! their records asynchronously from the `EVENTS` ring buffer. The tracepoint's field
//! offsets are read from its tracefs `format` file and handed to the program as a global,
//! because the record layout differs between kernels. With the exec gate on, it also
//! attaches `sched/sched_process_exec`, decodes the gate's records from the same ring
//! buffer, and hands the daemon the `PENDING` map ([`PendingCgroups`]).

use aya::{
    maps::{HashMap as BpfHashMap, MapData, PerCpuArray, RingBuf},
    programs::TracePoint,
    Ebpf, EbpfLoader,
};
use fsmon_common::{
    CgroupEvent, FilterConfig, GateConfig, GateEvent, PendingCgroup, ProgramConfig,
    TracepointLayout, EVENT_GATE, EVENT_MKDIR, EVENT_RMDIR, STAT_GATE_SKIPPED, STAT_RINGBUF_FULL,
};
use tokio::io::unix::AsyncFd;

/// The eBPF object, embedded at build time by `cargo xtask build`.
#[cfg(fsmon_ebpf_embedded)]
static OBJECT: Option<&[u8]> = Some(aya::include_bytes_aligned!(env!("FSMON_EBPF_OBJECT")));
#[cfg(not(fsmon_ebpf_embedded))]
static OBJECT: Option<&[u8]> = None;

/// Where tracefs may be mounted.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// Errors of loading and attaching; all are fatal for the daemon.
#[derive(Debug, thiserror::Error)]
pub enum EbpfError {
    /// Built without `cargo xtask build`.
    #[error(
        "this fsmon binary was built without its eBPF object; build it with `cargo xtask build`"
    )]
    NotEmbedded,
    /// No BTF: the kernel is too old or built without CONFIG_DEBUG_INFO_BTF.
    #[error("kernel BTF not found at /sys/kernel/btf/vmlinux: fsmon needs Linux >= 5.8 built with CONFIG_DEBUG_INFO_BTF=y")]
    NoBtf,
    /// tracefs missing.
    #[error("tracefs not found (looked in /sys/kernel/tracing and /sys/kernel/debug/tracing); mount it: mount -t tracefs tracefs /sys/kernel/tracing")]
    NoTracefs,
    /// The format file is not what we understand.
    #[error("cannot read the layout of tracepoint cgroup/{tracepoint} from {path}: {reason}")]
    Format {
        tracepoint: &'static str,
        path: String,
        reason: String,
    },
    /// aya failed.
    #[error("eBPF {what} failed: {source}")]
    Aya {
        what: String,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

fn aya_err<E: std::error::Error + Send + Sync + 'static>(
    what: impl Into<String>,
) -> impl FnOnce(E) -> EbpfError {
    let what = what.into();
    move |e| EbpfError::Aya {
        what,
        source: Box::new(e),
    }
}

/// Kind of a lifecycle record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupOp {
    /// A cgroup was created.
    Mkdir,
    /// A cgroup was removed.
    Rmdir,
}

/// One lifecycle record, decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LifecycleRecord {
    /// mkdir or rmdir.
    pub op: CgroupOp,
    /// Kernel hierarchy id (0 = v2).
    pub hierarchy_id: u32,
    /// Kernel cgroup id.
    pub cgroup_id: u64,
    /// Depth below the root.
    pub level: u32,
    /// Path relative to the hierarchy root (lossy UTF-8; container cgroup names are ASCII).
    pub path: String,
    /// CLOCK_MONOTONIC nanoseconds when the tracepoint fired.
    pub ktime_ns: u64,
}

impl LifecycleRecord {
    fn decode(ev: &CgroupEvent) -> Self {
        let len = (ev.path_len as usize).min(ev.path.len());
        LifecycleRecord {
            op: if ev.kind == EVENT_MKDIR {
                CgroupOp::Mkdir
            } else {
                CgroupOp::Rmdir
            },
            hierarchy_id: ev.hierarchy_id,
            cgroup_id: ev.cgroup_id,
            level: ev.level,
            path: String::from_utf8_lossy(&ev.path[..len]).into_owned(),
            ktime_ns: ev.ktime_ns,
        }
    }
}

/// One exec-gate record, decoded: the kernel stopped (or tried to stop) process `pid`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateRecord {
    /// Host pid of the process.
    pub pid: u32,
    /// Return code of `bpf_send_signal(SIGSTOP)`; 0 when the stop was queued.
    pub signal_ret: i32,
    /// The pending cgroup that matched.
    pub cgroup_id: u64,
    /// The task's own v2 cgroup.
    pub task_cgroup_id: u64,
    /// CLOCK_BOOTTIME nanoseconds at the exec (the task started before it).
    pub boot_ns: u64,
    /// CLOCK_MONOTONIC nanoseconds at the exec.
    pub ktime_ns: u64,
}

impl GateRecord {
    fn decode(ev: &GateEvent) -> Self {
        GateRecord {
            pid: ev.pid,
            signal_ret: ev.signal_ret,
            cgroup_id: ev.cgroup_id,
            task_cgroup_id: ev.task_cgroup_id,
            boot_ns: ev.boot_ns,
            ktime_ns: ev.ktime_ns,
        }
    }
}

/// The gate's `PENDING` map: container cgroups (v2 ids) whose tasks are stopped at exec
/// until the daemon deletes their entry.
pub struct PendingCgroups(BpfHashMap<MapData, u64, PendingCgroup>);

impl PendingCgroups {
    /// Ends gating for `cgroup_id`; true when it was pending.
    pub fn remove(&mut self, cgroup_id: u64) -> bool {
        self.0.remove(&cgroup_id).is_ok()
    }

    /// Whether `cgroup_id` is still pending.
    pub fn contains(&self, cgroup_id: u64) -> bool {
        self.0.get(&cgroup_id, 0).is_ok()
    }

    /// Entries marked more than `max_age_ns` ago (CLOCK_MONOTONIC `now_ns`).
    pub fn older_than(&self, now_ns: u64, max_age_ns: u64) -> Vec<u64> {
        self.0
            .iter()
            .flatten()
            .filter(|(_, p)| now_ns.saturating_sub(p.mkdir_ktime_ns) > max_age_ns)
            .map(|(id, _)| id)
            .collect()
    }
}

/// Parses a tracepoint `format` file into the offsets the program needs.
pub fn parse_format(text: &str) -> Result<TracepointLayout, String> {
    let mut layout = TracepointLayout::default();
    let (mut root, mut level, mut id, mut path) = (false, false, false, false);
    for line in text.lines() {
        let line = line.trim();
        let Some(rest) = line.strip_prefix("field:") else {
            continue;
        };
        let mut decl = "";
        let mut offset = None;
        let mut size = None;
        for part in rest.split(';') {
            let part = part.trim();
            if let Some(v) = part.strip_prefix("offset:") {
                offset = v.parse::<u32>().ok();
            } else if let Some(v) = part.strip_prefix("size:") {
                size = v.parse::<u32>().ok();
            } else if decl.is_empty() {
                decl = part;
            }
        }
        let (Some(offset), Some(size)) = (offset, size) else {
            continue;
        };
        let name = decl.rsplit(' ').next().unwrap_or("");
        match name {
            "root" if size == 4 => (layout.root_off, root) = (offset, true),
            "level" if size == 4 => (layout.level_off, level) = (offset, true),
            "id" if size == 4 || size == 8 => {
                (layout.id_off, layout.id_size, id) = (offset, size, true)
            }
            "path" if decl.starts_with("__data_loc") && size == 4 => {
                (layout.path_loc_off, path) = (offset, true)
            }
            _ => {}
        }
    }
    if !(root && level && id && path) {
        return Err("expected fields root, level, id and __data_loc path".into());
    }
    if layout.path_loc_off == 0 {
        return Err("path at offset 0".into());
    }
    Ok(layout)
}

fn read_layout(tracefs: &str, tracepoint: &'static str) -> Result<TracepointLayout, EbpfError> {
    let path = format!("{tracefs}/events/cgroup/{tracepoint}/format");
    let text = std::fs::read_to_string(&path).map_err(|e| EbpfError::Format {
        tracepoint,
        path: path.clone(),
        reason: e.to_string(),
    })?;
    parse_format(&text).map_err(|reason| EbpfError::Format {
        tracepoint,
        path,
        reason,
    })
}

/// The loaded, attached lifecycle programs and their ring buffer.
pub struct Lifecycle {
    ring: AsyncFd<RingBuf<MapData>>,
    logger: Option<AsyncFd<aya_log::EbpfLogger<&'static dyn log::Log>>>,
    stats: PerCpuArray<MapData, u64>,
    pending: Option<PendingCgroups>,
    // Keeps the programs (and their links) alive.
    _ebpf: Ebpf,
}

impl Lifecycle {
    /// Loads and attaches the programs. `filter` says which hierarchies to report; the exec
    /// gate is attached when `gate.enabled` is 1.
    pub fn load(filter: FilterConfig, gate: GateConfig) -> Result<Self, EbpfError> {
        let object = OBJECT.ok_or(EbpfError::NotEmbedded)?;
        if !std::path::Path::new("/sys/kernel/btf/vmlinux").exists() {
            return Err(EbpfError::NoBtf);
        }
        let tracefs = TRACEFS
            .iter()
            .copied()
            .find(|t| std::path::Path::new(&format!("{t}/events/cgroup")).is_dir())
            .ok_or(EbpfError::NoTracefs)?;
        let mkdir_layout = read_layout(tracefs, "cgroup_mkdir")?;
        let rmdir_layout = read_layout(tracefs, "cgroup_rmdir")?;
        if mkdir_layout.path_loc_off != rmdir_layout.path_loc_off
            || mkdir_layout.id_off != rmdir_layout.id_off
        {
            return Err(EbpfError::Format {
                tracepoint: "cgroup_rmdir",
                path: tracefs.into(),
                reason: "cgroup_mkdir and cgroup_rmdir differ in layout".into(),
            });
        }
        let config = ProgramConfig {
            layout: mkdir_layout,
            filter,
        };
        let mut ebpf = EbpfLoader::new()
            .override_global("FSMON_CONFIG", &config, true)
            .override_global("FSMON_GATE", &gate, true)
            .load(object)
            .map_err(aya_err("load"))?;
        let logger = match aya_log::EbpfLogger::init(&mut ebpf) {
            // SAFETY: the logger owns its fd and keeps it open for as long as the AsyncFd
            // that owns the logger exists.
            Ok(l) => unsafe { AsyncFd::register(l) }.ok(),
            Err(e) => {
                tracing::debug!(error = %e, "eBPF logger not started");
                None
            }
        };
        let mut programs = vec![("cgroup", "cgroup_mkdir"), ("cgroup", "cgroup_rmdir")];
        if gate.enabled != 0 {
            programs.push(("sched", "sched_process_exec"));
        }
        for (category, name) in programs {
            let prog: &mut TracePoint = ebpf
                .program_mut(name)
                .ok_or_else(|| EbpfError::Aya {
                    what: format!("find program {name}"),
                    source: "missing".into(),
                })?
                .try_into()
                .map_err(aya_err(format!("program {name}")))?;
            prog.load().map_err(aya_err(format!("load {name}")))?;
            prog.attach(category, name)
                .map_err(aya_err(format!("attach {category}/{name}")))?;
        }
        let ring = RingBuf::try_from(ebpf.take_map("EVENTS").ok_or_else(|| EbpfError::Aya {
            what: "find map EVENTS".into(),
            source: "missing".into(),
        })?)
        .map_err(aya_err("open ring buffer"))?;
        let stats =
            PerCpuArray::try_from(ebpf.take_map("STATS").ok_or_else(|| EbpfError::Aya {
                what: "find map STATS".into(),
                source: "missing".into(),
            })?)
            .map_err(aya_err("open STATS"))?;
        let pending = match ebpf.take_map("PENDING") {
            Some(m) if gate.enabled != 0 => Some(PendingCgroups(
                BpfHashMap::try_from(m).map_err(aya_err("open PENDING"))?,
            )),
            _ => None,
        };
        // SAFETY: the ring buffer owns its map fd, which stays open while the AsyncFd owns it.
        let ring = unsafe { AsyncFd::register(ring) }.map_err(aya_err("register ring buffer"))?;
        Ok(Lifecycle {
            ring,
            logger,
            stats,
            pending,
            _ebpf: ebpf,
        })
    }

    /// The gate's `PENDING` map (once; `None` when the gate is off).
    pub fn take_pending(&mut self) -> Option<PendingCgroups> {
        self.pending.take()
    }

    /// Waits until records are available, then drains all of them: cgroup records into
    /// `out`, exec-gate records into `gates`.
    pub async fn next_batch(
        &mut self,
        out: &mut Vec<LifecycleRecord>,
        gates: &mut Vec<GateRecord>,
    ) -> std::io::Result<()> {
        loop {
            // Forward eBPF-side log lines (cold paths only) without blocking.
            if let Some(logger) = self.logger.as_mut() {
                if let Some(Ok(mut g)) =
                    futures_util::FutureExt::now_or_never(logger.readable_mut())
                {
                    g.get_inner_mut().flush();
                    g.clear_ready();
                }
            }
            let mut guard = self.ring.readable_mut().await?;
            let ring = guard.get_inner_mut();
            while let Some(item) = ring.next() {
                let kind = item
                    .get(..4)
                    .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                match kind {
                    Some(EVENT_MKDIR | EVENT_RMDIR)
                        if item.len() >= std::mem::size_of::<CgroupEvent>() =>
                    {
                        let ev: CgroupEvent = bytemuck::pod_read_unaligned(
                            &item[..std::mem::size_of::<CgroupEvent>()],
                        );
                        out.push(LifecycleRecord::decode(&ev));
                    }
                    Some(EVENT_GATE) if item.len() >= std::mem::size_of::<GateEvent>() => {
                        let ev: GateEvent =
                            bytemuck::pod_read_unaligned(&item[..std::mem::size_of::<GateEvent>()]);
                        gates.push(GateRecord::decode(&ev));
                    }
                    _ => {}
                }
            }
            guard.clear_ready();
            if !out.is_empty() || !gates.is_empty() {
                return Ok(());
            }
        }
    }

    /// Records the kernel could not put in the ring buffer (it was full), summed over CPUs.
    pub fn lost(&self) -> u64 {
        self.stat(STAT_RINGBUF_FULL)
    }

    /// Execs of pending containers the gate let through (ring buffer full, or the stop
    /// could not be queued): those containers rely on the late-arm scan.
    pub fn gate_skipped(&self) -> u64 {
        self.stat(STAT_GATE_SKIPPED)
    }

    fn stat(&self, slot: u32) -> u64 {
        self.stats
            .get(&slot, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }
}

/// CLOCK_MONOTONIC now, in nanoseconds, comparable with [`LifecycleRecord::ktime_ns`].
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_new_layout() {
        let f = "name: cgroup_mkdir\nID: 544\nformat:\n\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n\
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n\n\tfield:int root;\toffset:8;\tsize:4;\tsigned:1;\n\
\tfield:int level;\toffset:12;\tsize:4;\tsigned:1;\n\tfield:u64 id;\toffset:16;\tsize:8;\tsigned:0;\n\
\tfield:__data_loc char[] path;\toffset:24;\tsize:4;\tsigned:0;\n";
        let l = parse_format(f).expect("parses");
        assert_eq!(
            (l.root_off, l.level_off, l.id_off, l.id_size, l.path_loc_off),
            (8, 12, 16, 8, 24)
        );
    }

    #[test]
    fn parses_old_layout() {
        let f = "\tfield:int root;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:int id;\toffset:12;\tsize:4;\tsigned:1;\n\
\tfield:int level;\toffset:16;\tsize:4;\tsigned:1;\n\tfield:__data_loc char[] path;\toffset:20;\tsize:4;\tsigned:1;\n";
        let l = parse_format(f).expect("parses");
        assert_eq!(
            (l.root_off, l.id_off, l.id_size, l.level_off, l.path_loc_off),
            (8, 12, 4, 16, 20)
        );
    }

    #[test]
    fn rejects_unknown_layout() {
        assert!(parse_format("").is_err());
        assert!(parse_format(
            "\tfield:int root;\toffset:8;\tsize:4;\n\tfield:char path[16];\toffset:12;\tsize:16;\n"
        )
        .is_err());
    }
}
