//! The daemon: one event loop over a closed set of inputs (lifecycle record, file-system
//! event, runtime event, periodic check, shutdown). Tests and `main` drive it through
//! [`run`].
//!
//! Arming a new container (the lossless start) happens inline in the loop and never waits
//! on a runtime: freeze the cgroup, resolve the upperdir from disk, arm the recursive
//! watch, thaw, then print `container_start`. What only an engine's API can tell (the
//! layer of a Docker container not found on disk, a name not on disk) is asked by a task
//! whose answer comes back as a loop input; meanwhile the container's records are held, so
//! they always follow its `container_start`.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    os::fd::{AsRawFd, RawFd},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use fsmon_common::{FilterConfig, GateConfig};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::{
    cgroup::{
        find_container_cgroups, parse_container_cgroup, CgroupMounts, ContainerCgroup, Hierarchy,
        RuntimeKind,
    },
    ebpf::{monotonic_ns, CgroupOp, Lifecycle, LifecycleRecord},
    event::{FileKind, WatchOutput},
    filter::{ContainerFilter, Decision, Facts, Meta, RecordFilter},
    freezer::{FreezeTarget, Freezer, FreezerKind},
    gate::Gate,
    id::{ContainerId, RuntimeName},
    output::Output,
    record::{self, ContainerRef},
    runtime::{ContainerMeta, Runtime, RuntimeEvent},
    runtimes::{oci, AnyRuntime, Places, Resolved, SetupPaths},
    stats::{Gauges, Stats},
    watcher::{ArmStats, ContainerLayer, FdBudget, WatchError, Watcher},
};

/// Records are written to the output in chunks of about this size (and at the end of
/// every loop turn, so a record is never held back).
const OUT_CHUNK: usize = 1 << 16;

/// Where records go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OutputTarget {
    /// Standard output.
    Stdout,
    /// A file, appended to (created if missing).
    File(PathBuf),
}

/// The wall-clock time of a CLOCK_MONOTONIC kernel timestamp.
fn wall_clock_of(ktime_ns: u64) -> SystemTime {
    let age = Duration::from_nanos(monotonic_ns().saturating_sub(ktime_ns));
    SystemTime::now()
        .checked_sub(age)
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

/// Everything `run` needs; built from the command line by `main`, or by tests.
#[derive(Clone, Debug)]
pub struct Config {
    /// Docker engine URLs (`unix:///var/run/docker.sock`, ...).
    pub docker_hosts: Vec<String>,
    /// Where records go.
    pub output: OutputTarget,
    /// Freeze new containers while their watch is armed (`--no-freeze` turns it off).
    pub freeze: bool,
    /// Longest a freeze may be held before the watchdog thaws it.
    pub freeze_timeout: Duration,
    /// A lifecycle record older than this is not frozen for (runc may already be reading
    /// the freezer state; see ARCHITECTURE.md): the container is armed and scanned instead.
    pub freeze_max_age: Duration,
    /// Where in-flight freezes are recorded so a later fsmon can undo them.
    pub state_dir: PathBuf,
    /// Where the container runtimes keep their bundles and layers.
    pub places: Places,
    /// How often a `stats` record is printed (zero: only at exit).
    pub stats_interval: Duration,
    /// Which containers are armed (`--filter`, `--exclude`).
    pub containers: ContainerFilter,
    /// Which file records are printed (`--path`, `--exclude-path`, `--kind`).
    pub records: RecordFilter,
    /// Stop a pending container's tasks at exec until it is armed (`--no-gate` turns it off).
    pub gate: bool,
    /// Longest a task is held by the exec gate before the watchdog resumes it.
    pub gate_timeout: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            docker_hosts: vec!["unix:///var/run/docker.sock".into()],
            output: OutputTarget::Stdout,
            freeze: true,
            freeze_timeout: Duration::from_millis(100),
            freeze_max_age: Duration::from_millis(5),
            state_dir: PathBuf::from("/run/fsmon"),
            places: Places::default(),
            stats_interval: Duration::from_secs(60),
            containers: ContainerFilter::default(),
            records: RecordFilter::default(),
            gate: true,
            gate_timeout: Duration::from_secs(2),
        }
    }
}

struct RawFdRef(RawFd);
impl AsRawFd for RawFdRef {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// How an attempt to arm a container ended.
enum ArmOutcome {
    /// Armed; `container_start` printed (or held until its name and image come).
    Armed,
    /// Not found on disk: an engine is asked by a task; armed when the answer comes
    /// (late: what it did meanwhile is reported by scan).
    Asking,
    /// No configured engine knows it.
    Foreign,
    /// The operator's filters exclude it: not armed, no records.
    Excluded,
    /// Its layer went away while arming (the container is gone).
    Gone,
    /// It could not be armed now; retried on the tick.
    Failed {
        /// Why, for the log.
        cause: String,
        /// Descriptors ran out.
        exhausted: bool,
    },
}

/// A container that could not be armed, retried on the tick.
struct Unarmed {
    cgroup: ContainerCgroup,
    unified_cgroup: Option<PathBuf>,
    /// Since when its changes are its own (its cgroup's appearance, or fsmon's start).
    since: SystemTime,
    attempts: u32,
}

/// An answer from a task that asked a runtime: the event loop never waits on one.
enum Answer {
    /// A Docker container not found on disk, by the inspect API.
    Layer {
        id: String,
        result: Result<Option<(usize, ContainerLayer, ContainerMeta)>, String>,
    },
    /// Name and image of an armed container whose records are held until they come.
    Meta { id: String, meta: ContainerMeta },
    /// The containers an engine runs (resync after lifecycle records were lost).
    Running { ids: Vec<String> },
}

/// A Docker container whose layer an engine is being asked for.
struct Asking {
    cgroup: ContainerCgroup,
    unified_cgroup: Option<PathBuf>,
    since: Option<SystemTime>,
}

/// The `container_start` of a container armed while its name and image are asked for.
struct HeldStart {
    at: SystemTime,
    upperdir: PathBuf,
    freeze_us: Option<u64>,
    arm_us: Option<u64>,
    gated_us: Option<u64>,
    /// What the watcher reported meanwhile (when, what), printed after `container_start`.
    outputs: Vec<(SystemTime, WatchOutput)>,
}

/// At most this many outputs are held for a container waiting for its name and image;
/// beyond, `container_start` goes out with what is known.
const HELD_MAX: usize = 1 << 16;

/// The longest a container's records are held for its name and image.
const META_TIMEOUT: Duration = Duration::from_secs(2);

/// A loop turn longer than this is logged (at most once a second).
const SLOW_TURN: Duration = Duration::from_millis(10);

/// A container being monitored.
struct Monitored {
    cref: ContainerRef,
    /// `cref` as a JSON object, for every file record of the container.
    encoded: String,
    /// Paths the runtime creates while it sets the container up: their `create` is not
    /// the container's doing and is not reported (README "Runtime setup").
    setup: SetupPaths,
    /// Set while its name and image are asked for: its records wait here, in order.
    held: Option<HeldStart>,
}

/// Where a container's layers were found, and what came with them.
struct Found {
    layer: ContainerLayer,
    runtime: RuntimeName,
    /// The Docker engine that knows it (index of `--docker-host`), when found through one.
    engine: Option<usize>,
    /// Name and image that came with the answer (inspect API).
    meta: Option<ContainerMeta>,
    /// The bundle lookup, for runtimes resolved on disk.
    resolved: Option<Resolved>,
}

struct Daemon {
    config: Config,
    mounts: CgroupMounts,
    freezer: Freezer,
    /// The exec gate (None with `--no-gate`).
    gate: Option<Gate>,
    watcher: Watcher,
    runtime: Runtime,
    out: Output,
    /// Records not yet written to `out` (written when large, and after every loop turn).
    pending_out: Vec<u8>,
    containers: HashMap<String, Monitored>,
    /// Cgroups recognised as containers that no configured engine knows (podman, ...),
    /// so they are looked up once, not at every mkdir.
    foreign: HashSet<String>,
    /// Containers the filters exclude (until their cgroup goes).
    excluded: HashSet<String>,
    /// Containers of a cgroup v1 engine whose v1 freezer cgroup appeared, waiting for their
    /// v2 cgroup (value: when the first record fired, CLOCK_MONOTONIC ns, the cgroup and
    /// its path).
    pending: HashMap<String, (u64, ContainerCgroup, String)>,
    outputs: Vec<WatchOutput>,
    lifecycle_lost: u64,
    /// Containers that could not be armed yet (`arm_failed`), retried on the tick.
    unarmed: HashMap<String, Unarmed>,
    /// The directory fd budget at start-up (the most it grows back to).
    fd_budget_max: usize,
    /// When this fsmon started: what a container that was running before did is reported
    /// by scan from then on if it could not be armed at once.
    started: SystemTime,
    /// Docker containers whose layer an engine is being asked for.
    asking: HashMap<String, Asking>,
    /// Where the tasks that ask runtimes send their answers.
    answers: mpsc::UnboundedSender<Answer>,
    /// Counters for the `stats` record.
    stats: Stats,
}

/// Runs the daemon until `shutdown` resolves. Returns an error only for fatal problems
/// (eBPF cannot load or attach, output unusable); everything a container or an engine does
/// is handled and logged.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let out = Output::open(&config.output)?;
    let mounts = CgroupMounts::discover()
        .context("cannot read the cgroup mounts from /proc/self/mountinfo")?;
    if mounts.unified.is_none() && mounts.freezer.is_none() {
        anyhow::bail!("no cgroup v2 hierarchy and no cgroup v1 freezer hierarchy is mounted; fsmon needs one of them");
    }
    let freezer = Freezer::new(&config.state_dir).with_context(|| {
        format!(
            "cannot use the state directory {}",
            config.state_dir.display()
        )
    })?;
    for held in freezer.recover() {
        tracing::warn!(?held, "released what an earlier fsmon left held");
    }
    if let Some(unified) = &mounts.unified {
        for pid in crate::gate::resume_orphans(unified) {
            tracing::warn!(
                pid,
                "resumed a task that an earlier fsmon's exec gate left stopped"
            );
        }
    }
    let filter = FilterConfig {
        freezer_hierarchy: mounts.freezer_id.unwrap_or(u32::MAX),
        unified_hierarchy: if mounts.unified.is_some() {
            0
        } else {
            u32::MAX
        },
    };
    let gate_config = gate_config(&config, &mounts)?;
    let mut lifecycle = Lifecycle::load(filter, gate_config)?;
    let gate = lifecycle.take_pending().map(|pending| {
        Gate::new(
            pending,
            config.gate_timeout,
            GATE_WINDOW,
            (gate_config.host_pidns_dev, gate_config.host_pidns_ino),
        )
    });
    let watcher = Watcher::new().context("cannot create the inotify instance")?;
    let (rt_tx, mut rt_rx) = mpsc::unbounded_channel();
    let runtime = Runtime::start(&config.docker_hosts, rt_tx);
    let (answers, mut answers_rx) = mpsc::unbounded_channel();
    let mut d = Daemon {
        config,
        mounts,
        freezer,
        gate,
        watcher,
        runtime,
        out,
        pending_out: Vec::with_capacity(OUT_CHUNK * 2),
        containers: HashMap::new(),
        foreign: HashSet::new(),
        excluded: HashSet::new(),
        pending: HashMap::new(),
        outputs: Vec::new(),
        lifecycle_lost: 0,
        unarmed: HashMap::new(),
        fd_budget_max: 0,
        started: SystemTime::now(),
        asking: HashMap::new(),
        answers,
        stats: Stats::default(),
    };
    d.fd_budget_max = d.watcher.fd_budget().1;
    let (cached, budget) = d.watcher.fd_budget();
    tracing::info!(
        fd_limit = crate::limits::soft_fd_limit(),
        open = crate::limits::open_fd_count(),
        dir_fd_budget = budget,
        cached,
        "file descriptor budget"
    );

    // SAFETY: the fd belongs to `d.watcher`, which outlives `watch_fd`: `watch_fd` is
    // declared after `d`, so it is dropped (deregistered) first.
    let watch_fd = unsafe {
        AsyncFd::register_with_interest(
            RawFdRef(d.watcher.as_raw_fd()),
            tokio::io::Interest::READABLE,
        )
    }
    .context("cannot register the inotify fd")?;

    // Wait (bounded) until every engine said whether it is up, so that the containers
    // already running are armed before `ready`.
    let mut heard = HashSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while heard.len() < d.runtime.len() {
        match tokio::time::timeout_at(deadline, rt_rx.recv()).await {
            Ok(Some(ev)) => {
                let engine = match &ev {
                    RuntimeEvent::Connected { engine, .. }
                    | RuntimeEvent::Disconnected { engine, .. } => *engine,
                };
                d.on_runtime(ev);
                heard.insert(engine);
            }
            _ => break,
        }
    }
    d.resync_docker().await;
    d.resync_on_disk();
    d.emit(&record::ready(SystemTime::now(), &d.config.docker_hosts))?;
    d.flush()?;

    tokio::pin!(shutdown);
    // SIGHUP reopens --output (logrotate). Without a handler its default action would end
    // the daemon, so failing to install one is fatal.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot handle SIGHUP")?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let stats_every = d.config.stats_interval;
    let mut stats_tick = tokio::time::interval_at(
        tokio::time::Instant::now() + stats_every,
        stats_every.max(Duration::from_millis(1)),
    );
    let mut batch = Vec::new();
    let mut slow = SlowTurns::default();
    let mut gate_batch = Vec::new();
    let mut gate_skipped = 0;
    loop {
        // Nothing in a turn awaits: what needs a runtime's answer is asked by a task
        // whose answer comes back as an input (`answers_rx`).
        let input = tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = lifecycle.next_batch(&mut batch, &mut gate_batch) => {
                let t = std::time::Instant::now();
                r.context("reading the eBPF ring buffer")?;
                // Gated tasks first: a container armed by this batch's records resumes them.
                d.on_gate_records(&mut gate_batch);
                for rec in std::mem::take(&mut batch) {
                    // Whatever the daemon decided for a v2 cgroup (armed, not a container
                    // it arms, gone), the gate holds nothing of it afterwards; unless an
                    // engine is being asked where its layer is (the answer settles it).
                    let v2_cgroup = (rec.hierarchy_id == 0).then_some(rec.cgroup_id);
                    let deciding = d.on_lifecycle(rec)?;
                    if let (Some(id), false) = (v2_cgroup, deciding) {
                        d.settle_gate_id(id);
                    }
                }
                ("lifecycle", t)
            }
            g = watch_fd.readable() => {
                let t = std::time::Instant::now();
                let mut g = g.context("polling the inotify fd")?;
                d.drain_watcher()?;
                g.clear_ready();
                ("inotify", t)
            }
            Some(a) = answers_rx.recv() => {
                let t = std::time::Instant::now();
                d.on_answer(a)?;
                ("answer", t)
            }
            Some(ev) = rt_rx.recv() => {
                let t = std::time::Instant::now();
                d.on_runtime(ev);
                ("runtime", t)
            }
            _ = stats_tick.tick(), if !stats_every.is_zero() => {
                let t = std::time::Instant::now();
                d.emit_stats(lifecycle.lost(), false)?;
                ("stats", t)
            }
            Some(()) = hangup.recv() => {
                let t = std::time::Instant::now();
                // Everything observed so far goes to the old file, then the new one.
                d.flush()?;
                d.out.reopen();
                ("hangup", t)
            }
            _ = tick.tick() => {
                let t = std::time::Instant::now();
                // A reader that went away ends the daemon like SIGTERM (output.rs).
                if d.out.reader_gone() {
                    break;
                }
                let lost = lifecycle.lost();
                if lost > d.lifecycle_lost {
                    tracing::error!(lost = lost - d.lifecycle_lost, "eBPF ring buffer was full: lifecycle records lost; resyncing with the engines");
                    d.lifecycle_lost = lost;
                    d.emit(&record::overflow(SystemTime::now(), None, "lifecycle"))?;
                    d.ask_running();
                    d.resync_on_disk();
                }
                d.regrow_fds();
                d.arm_stale_pending();
                d.retry_unarmed();
                if let Some(g) = d.gate.as_mut() {
                    g.expire(&d.freezer);
                    let skipped = lifecycle.gate_skipped();
                    if skipped > gate_skipped {
                        tracing::warn!(execs = skipped - gate_skipped, "exec gate let execs of pending containers through (ring buffer full or stop refused); those containers rely on the late-arm scan");
                        gate_skipped = skipped;
                    }
                }
                // Directories left unwatched at the watch limit get their watch when the
                // limit allows; what changed meanwhile is reported by scan.
                d.watcher.retry_unwatched();
                d.drain_watcher()?;
                ("tick", t)
            }
        };
        d.flush()?;
        slow.note(input.0, input.1.elapsed());
        if d.out.is_closed() {
            break;
        }
    }
    // Drain what the kernel has already queued, so nothing observed is lost at exit.
    d.drain_watcher()?;
    d.emit_stats(lifecycle.lost(), true)?;
    d.flush()?;
    if let Some(g) = d.gate.as_mut() {
        g.release_all(&d.freezer);
    }
    tracing::info!("shutting down");
    Ok(())
}

/// How long a new container cgroup may gate execs (the kernel ignores older entries).
const GATE_WINDOW: Duration = Duration::from_secs(10);

/// The exec gate's kernel settings: off unless asked for and the v2 hierarchy is mounted.
fn gate_config(config: &Config, mounts: &CgroupMounts) -> anyhow::Result<GateConfig> {
    if !config.gate || mounts.unified.is_none() {
        return Ok(GateConfig::default());
    }
    let (dev, ino) = crate::gate::host_pidns()
        .context("cannot stat /proc/self/ns/pid (the exec gate needs the host PID namespace)")?;
    Ok(GateConfig {
        enabled: 1,
        _pad: 0,
        host_pidns_dev: dev,
        host_pidns_ino: ino,
        window_ns: u64::try_from(GATE_WINDOW.as_nanos()).unwrap_or(u64::MAX),
    })
}

impl Daemon {
    fn on_gate_records(&mut self, records: &mut Vec<crate::ebpf::GateRecord>) {
        let Some(gate) = self.gate.as_mut() else {
            records.clear();
            return;
        };
        for rec in records.drain(..) {
            tracing::debug!(
                pid = rec.pid,
                cgroup_id = rec.cgroup_id,
                task_cgroup_id = rec.task_cgroup_id,
                signal_ret = rec.signal_ret,
                age_us = monotonic_ns().saturating_sub(rec.ktime_ns) / 1000,
                "gate record"
            );
            gate.on_record(&self.freezer, &rec);
        }
    }

    /// Ends the exec gate for a container's v2 cgroup and resumes what it held; how long
    /// the first exec was held (µs), if it held one.
    fn settle_gate(&mut self, unified_cgroup: Option<&std::path::Path>) -> Option<u64> {
        let (gate, dir) = (self.gate.as_mut()?, unified_cgroup?);
        gate.settle_dir(&self.freezer, dir)
    }

    fn settle_gate_id(&mut self, cgroup_id: u64) {
        if let Some(gate) = self.gate.as_mut() {
            gate.settle(&self.freezer, cgroup_id);
        }
    }

    fn emit(&mut self, line: &str) -> anyhow::Result<()> {
        self.stats.daemon_record(line);
        self.pending_out.extend_from_slice(line.as_bytes());
        self.write_if_large()
    }

    /// Prints a `stats` record (`last`: the one at exit).
    fn emit_stats(&mut self, lifecycle_lost: u64, last: bool) -> anyhow::Result<()> {
        let gauges = Gauges {
            containers_monitored: self.containers.len(),
            containers_unarmed: self.unarmed.len(),
            watches: self.watcher.watch_count(),
            lifecycle_lost,
            uptime_s: self.started.elapsed().unwrap_or_default().as_secs_f64(),
            last,
        };
        let line = self.stats.record(SystemTime::now(), &gauges);
        self.emit(&line)
    }

    fn write_if_large(&mut self) -> anyhow::Result<()> {
        if self.pending_out.len() >= OUT_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if !self.pending_out.is_empty() {
            self.out.write_all(&self.pending_out)?;
            self.pending_out.clear();
        }
        Ok(())
    }

    fn on_runtime(&mut self, ev: RuntimeEvent) {
        match ev {
            RuntimeEvent::Connected { engine, url } => {
                tracing::info!(engine, %url, "connected to the container engine")
            }
            RuntimeEvent::Disconnected { engine, url, error } => {
                tracing::warn!(engine, %url, %error, "container engine unreachable; reconnecting")
            }
        }
    }

    /// Reads and prints every pending file event.
    fn drain_watcher(&mut self) -> anyhow::Result<()> {
        let mut outputs = std::mem::take(&mut self.outputs);
        if let Err(e) = self.watcher.read_events(&mut outputs) {
            tracing::error!(error = %e, "reading inotify events");
        }
        let now = SystemTime::now();
        let enc = record::FileEncoder::new(now);
        let mut result = Ok(());
        for o in outputs.drain(..) {
            result = self.output(now, &enc, o);
            if result.is_err() {
                break;
            }
        }
        outputs.clear();
        self.outputs = outputs;
        result
    }

    /// Prints one output of the watcher (observed at `now`, encoded by `enc`), or holds
    /// it behind its container's `container_start` while that waits for a name.
    fn output(
        &mut self,
        now: SystemTime,
        enc: &record::FileEncoder,
        o: WatchOutput,
    ) -> anyhow::Result<()> {
        let container = match &o {
            WatchOutput::File(ev) => Some(&ev.container),
            WatchOutput::Exited { container } => Some(container),
            WatchOutput::Overflow { container, .. } => container.as_ref(),
        };
        if let Some(id) = container {
            if let Some(held) = self
                .containers
                .get_mut(id.as_str())
                .and_then(|c| c.held.as_mut())
            {
                let id = id.as_str().to_owned();
                held.outputs.push((now, o));
                if held.outputs.len() >= HELD_MAX {
                    tracing::warn!(container_id = %id, "too many records held for the container's name; printing them without");
                    self.release(&id, None)?;
                }
                return Ok(());
            }
        }
        match o {
            WatchOutput::File(ev) => {
                let Some(c) = self.containers.get(ev.container.as_str()) else {
                    return Ok(());
                };
                if ev.kind == FileKind::Create && c.setup.contains(&ev.path) {
                    return Ok(());
                }
                if !self
                    .config
                    .records
                    .keeps(ev.kind.as_str(), &ev.path, ev.old_path.as_deref())
                {
                    return Ok(());
                }
                enc.encode(&mut self.pending_out, &c.encoded, &ev);
                self.stats.file_record(ev.kind);
                self.write_if_large()?;
            }
            WatchOutput::Exited { container } => {
                if self.containers.contains_key(container.as_str()) {
                    tracing::debug!(container_id = %container, "exited (cgroup.events populated 0)");
                    self.stop(container.as_str())?;
                }
            }
            WatchOutput::Overflow { container, reason } => {
                let c = container
                    .as_ref()
                    .and_then(|id| self.containers.get(id.as_str()))
                    .map(|c| c.cref.clone());
                if container.is_some() && c.is_none() {
                    return Ok(());
                }
                tracing::warn!(container_id = ?container, reason, "events lost; rescanning");
                let line = record::overflow(now, c.as_ref(), reason);
                self.emit(&line)?;
            }
        }
        Ok(())
    }

    /// Prints the held `container_start` of container `id` (with `meta` when it came),
    /// then what it did meanwhile, in order.
    fn release(&mut self, id: &str, meta: Option<ContainerMeta>) -> anyhow::Result<()> {
        let Some(c) = self.containers.get_mut(id) else {
            return Ok(());
        };
        let Some(held) = c.held.take() else {
            return Ok(());
        };
        let meta = meta.unwrap_or_else(|| self.runtime.cached_meta(id));
        c.cref.name = c.cref.name.take().or(meta.name);
        c.cref.image = c.cref.image.take().or(meta.image);
        c.encoded = c.cref.encoded();
        if self.config.containers.decide(&facts_of(&c.cref)) == Decision::Skip {
            // Excluded once its name and image came: nothing of it is printed.
            tracing::debug!(container_id = %id, "excluded by the filters; watch removed");
            self.watcher.remove_container(id);
            self.containers.remove(id);
            self.excluded.insert(id.to_owned());
            return Ok(());
        }
        let line = record::container_start(
            held.at,
            &c.cref,
            &held.upperdir,
            held.freeze_us,
            held.arm_us,
            held.gated_us,
        );
        self.emit(&line)?;
        let mut enc: Option<(SystemTime, record::FileEncoder)> = None;
        for (t, o) in held.outputs {
            if enc.as_ref().is_none_or(|(et, _)| *et != t) {
                enc = Some((t, record::FileEncoder::new(t)));
            }
            if let Some((_, e)) = &enc {
                self.output(t, e, o)?;
            }
        }
        Ok(())
    }

    /// An answer from a task that asked a runtime.
    fn on_answer(&mut self, a: Answer) -> anyhow::Result<()> {
        match a {
            Answer::Meta { id, meta } => self.release(&id, Some(meta)),
            Answer::Layer { id, result } => {
                // Gone meanwhile (its cgroup was removed): nothing to arm.
                let Some(ask) = self.asking.remove(&id) else {
                    return Ok(());
                };
                let outcome = match result {
                    Ok(Some((engine, layer, meta))) => {
                        let found = Found {
                            layer,
                            runtime: RuntimeName::Docker,
                            engine: Some(engine),
                            meta: Some(meta),
                            resolved: None,
                        };
                        let r = self.add_to_watcher(&ask.cgroup.id, &found, ask.since);
                        if let (Ok(_), Some(dir)) = (&r, ask.unified_cgroup.as_deref()) {
                            self.watch_exit(&id, dir);
                        }
                        self.finish_arm(
                            &ask.cgroup,
                            found,
                            r,
                            None,
                            ask.unified_cgroup.as_deref(),
                            ask.since,
                        )?
                    }
                    Ok(None) => ArmOutcome::Foreign,
                    Err(cause) => ArmOutcome::Failed {
                        cause,
                        exhausted: false,
                    },
                };
                if !matches!(outcome, ArmOutcome::Armed) {
                    self.settle_gate(ask.unified_cgroup.as_deref());
                }
                self.settle(&ask.cgroup, ask.unified_cgroup, ask.since, outcome)
            }
            Answer::Running { ids } => {
                for id in ids {
                    self.arm_running_docker(&id);
                }
                Ok(())
            }
        }
    }

    /// Handles a cgroup record; true while an engine is being asked about its container.
    fn on_lifecycle(&mut self, rec: LifecycleRecord) -> anyhow::Result<bool> {
        tracing::debug!(
            op = ?rec.op,
            hierarchy_id = rec.hierarchy_id,
            cgroup_id = rec.cgroup_id,
            path = %rec.path,
            age_us = monotonic_ns().saturating_sub(rec.ktime_ns) / 1000,
            "lifecycle record"
        );
        let rec_path = rec.path.clone();
        let Some(cg) = parse_container_cgroup(&rec.path) else {
            return Ok(false);
        };
        let Some(hierarchy) = self.mounts.hierarchy_of(rec.hierarchy_id) else {
            return Ok(false);
        };
        match rec.op {
            CgroupOp::Mkdir => {
                let id = cg.id.as_str();
                if self.containers.contains_key(id)
                    || self.foreign.contains(id)
                    || self.excluded.contains(id)
                    || self.unarmed.contains_key(id)
                {
                    return Ok(false);
                }
                // A cgroup v1 engine on a hybrid host: runc makes the container's v2 cgroup
                // last, right before init joins it. Wait for that one and freeze there:
                // runc of a v1 engine never reads the v2 freeze state, so that freeze can
                // never fail a start, however late it lands (ARCHITECTURE.md).
                if hierarchy == Hierarchy::Freezer && self.unified_parent_exists(&rec.path) {
                    self.pending
                        .entry(id.to_owned())
                        .or_insert_with(|| (rec.ktime_ns, cg.clone(), rec.path.clone()));
                    return Ok(false);
                }
                let first_ns = self.pending.remove(id).map(|(t, _, _)| t);
                let v1_engine = first_ns.is_some();
                let since = wall_clock_of(first_ns.unwrap_or(rec.ktime_ns));
                let age = Duration::from_nanos(monotonic_ns().saturating_sub(rec.ktime_ns));
                let target = self
                    .mounts
                    .dir(hierarchy, &rec.path)
                    .map(|dir| FreezeTarget {
                        dir,
                        kind: match hierarchy {
                            Hierarchy::Freezer => FreezerKind::V1,
                            Hierarchy::Unified => FreezerKind::V2,
                        },
                    });
                // Otherwise runc reads this very freezer right after it attaches the
                // container's init, and a freeze held across that read fails the start
                // ("timeout of 10s reached waiting for the cgroup to freeze"). On cgroup v2
                // our write queues behind that attach on the cgroup lock and lands in exactly
                // that window (seen: 2 failed starts in ~300), so a v2-only container is
                // armed without freezing: arming takes ~0.3 ms, its first instruction comes
                // tens of ms later. A v1 freezer (pure v1 host) is frozen only while the
                // record is fresh, before runc gets there.
                let safe = v1_engine
                    || (hierarchy == Hierarchy::Freezer && age <= self.config.freeze_max_age);
                let freeze = if self.config.freeze && safe {
                    target
                } else {
                    None
                };
                if self.config.freeze && freeze.is_none() && hierarchy == Hierarchy::Freezer {
                    tracing::info!(container_id = %cg.id, age_us = age.as_micros() as u64, "lifecycle record too old to freeze safely; arming without freezing");
                }
                self.arm(
                    &cg,
                    freeze,
                    self.mounts
                        .dir(Hierarchy::Unified, &rec.path)
                        .filter(|_| hierarchy == Hierarchy::Unified),
                    Some(since),
                )?;
            }
            CgroupOp::Rmdir => {
                let id = cg.id.as_str();
                self.asking.remove(id);
                if self.containers.contains_key(id) {
                    // Events queued before the container's cgroup went away are its own:
                    // print them before its watches are dropped.
                    self.drain_watcher()?;
                    tracing::debug!(container_id = %cg.id, hierarchy_id = rec.hierarchy_id, "stopped by rmdir");
                    self.stop(id)?;
                }
                self.foreign.remove(id);
                self.excluded.remove(id);
                self.pending.remove(id);
                self.unarmed.remove(id);
            }
        }
        Ok(parse_container_cgroup(&rec_path)
            .is_some_and(|cg| self.asking.contains_key(cg.id.as_str())))
    }

    /// The v2 cgroup of a container found by listing (not by its mkdir): Docker's cgroupfs
    /// and systemd driver names.
    fn unified_cgroup_of(&self, id: &str) -> Option<PathBuf> {
        [
            format!("/docker/{id}"),
            format!("/system.slice/docker-{id}.scope"),
        ]
        .iter()
        .filter_map(|rel| self.mounts.dir(Hierarchy::Unified, rel))
        .find(|d| d.is_dir())
    }

    /// Whether the v2 hierarchy has the parent of cgroup `rel` (the engine puts its
    /// containers' v2 cgroups there too, so one is coming).
    fn unified_parent_exists(&self, rel: &str) -> bool {
        let parent = rel
            .trim_end_matches('/')
            .rsplit_once('/')
            .map_or("", |(p, _)| p);
        !parent.is_empty()
            && self
                .mounts
                .dir(Hierarchy::Unified, parent)
                .is_some_and(|d| d.is_dir())
    }

    /// Arms, without freezing, containers whose v2 cgroup never came (a runtime that does
    /// not use the v2 hierarchy after all).
    fn arm_stale_pending(&mut self) {
        let now = monotonic_ns();
        let stale: Vec<(String, u64, ContainerCgroup, String)> = self
            .pending
            .iter()
            .filter(|(_, (t, _, _))| now.saturating_sub(*t) > 500_000_000)
            .map(|(id, (t, cg, rel))| (id.clone(), *t, cg.clone(), rel.clone()))
            .collect();
        for (id, first_ns, cg, rel) in stale {
            self.pending.remove(&id);
            tracing::warn!(container_id = %id, "no cgroup v2 directory came for this container; armed without freezing");
            let cgroup = self
                .mounts
                .dir(Hierarchy::Unified, &rel)
                .filter(|d| d.is_dir())
                .or_else(|| self.unified_cgroup_of(&id));
            let since = Some(wall_clock_of(first_ns));
            if let Err(e) = self.arm(&cg, None, cgroup, since) {
                tracing::error!(container_id = %id, error = %e, "cannot arm");
            }
            if self.containers.contains_key(&id) {
                self.stats.late_arm();
            }
        }
    }

    /// Freeze (optionally) → resolve upperdir → arm → thaw → `container_start`. A
    /// container that cannot be armed for lack of resources (descriptors, an engine that
    /// cannot answer) is never dropped silently: see [`Self::arm_failed`].
    fn arm(
        &mut self,
        cg: &ContainerCgroup,
        freeze: Option<FreezeTarget>,
        unified_cgroup: Option<PathBuf>,
        since: Option<SystemTime>,
    ) -> anyhow::Result<()> {
        let mut outcome = self.try_arm(cg, freeze.as_ref(), unified_cgroup.as_deref(), since)?;
        if let ArmOutcome::Failed {
            exhausted: true, ..
        } = outcome
        {
            // The cache of directory fds gives way, and the container gets a second try.
            self.relieve_fds();
            outcome = self.try_arm(cg, freeze.as_ref(), unified_cgroup.as_deref(), since)?;
        }
        self.settle(cg, unified_cgroup, since, outcome)
    }

    /// Books how an attempt to arm ended.
    fn settle(
        &mut self,
        cg: &ContainerCgroup,
        unified_cgroup: Option<PathBuf>,
        since: Option<SystemTime>,
        outcome: ArmOutcome,
    ) -> anyhow::Result<()> {
        let id = cg.id.as_str();
        match outcome {
            ArmOutcome::Armed | ArmOutcome::Gone => {
                self.unarmed.remove(id);
            }
            // Stays in `unarmed` if it was there: the answer settles it.
            ArmOutcome::Asking => {}
            ArmOutcome::Foreign => {
                tracing::debug!(container_id = %id, "no runtime knows this container; ignored");
                self.unarmed.remove(id);
                self.foreign.insert(id.to_owned());
            }
            ArmOutcome::Excluded => {
                tracing::debug!(container_id = %id, "excluded by the filters; not armed");
                self.unarmed.remove(id);
                self.excluded.insert(id.to_owned());
            }
            ArmOutcome::Failed { cause, exhausted } => {
                self.arm_failed(cg, unified_cgroup, since, &cause, exhausted)?;
            }
        }
        Ok(())
    }

    /// A container could not be armed: an `overflow` record names it (`arm_failed`,
    /// once), the log says why and what to raise, and the tick retries it; once armed,
    /// what its layer got meanwhile is reported by scan (it is armed with the instant its
    /// cgroup appeared, or fsmon's start for one that was already running).
    fn arm_failed(
        &mut self,
        cg: &ContainerCgroup,
        unified_cgroup: Option<PathBuf>,
        since: Option<SystemTime>,
        cause: &str,
        exhausted: bool,
    ) -> anyhow::Result<()> {
        let id = cg.id.as_str();
        let since = since.unwrap_or(self.started);
        if let Some(u) = self.unarmed.get_mut(id) {
            u.attempts += 1;
            return Ok(());
        }
        if exhausted {
            tracing::error!(container_id = %id, cause, advice = %crate::limits::fd_advice(), "cannot arm the container; retrying every second");
        } else {
            tracing::error!(container_id = %id, cause, "cannot arm the container; retrying every second");
        }
        let meta = self.runtime.cached_meta(id);
        let cref = ContainerRef {
            id: id.to_owned(),
            name: meta.name,
            image: meta.image,
            runtime: cg.runtime.runtime(),
            pod: None,
        };
        let line = record::overflow(SystemTime::now(), Some(&cref), "arm_failed");
        self.emit(&line)?;
        self.unarmed.insert(
            id.to_owned(),
            Unarmed {
                cgroup: cg.clone(),
                unified_cgroup,
                since,
                attempts: 1,
            },
        );
        Ok(())
    }

    /// Descriptors ran out: the watcher's cache is resized to what the limit leaves now
    /// (it may have been lowered, or other parts of the daemon hold more), shedding fds.
    fn relieve_fds(&mut self) {
        let (cached, _) = self.watcher.fd_budget();
        let others = crate::limits::open_fd_count().saturating_sub(cached);
        let budget = FdBudget::size_for(crate::limits::soft_fd_limit(), others);
        let (_, was) = self.watcher.fd_budget();
        if budget < was {
            tracing::warn!(
                cached,
                others,
                budget,
                was,
                "out of file descriptors; shrinking the directory fd cache"
            );
        }
        self.watcher.set_fd_budget(budget.min(was));
    }

    /// After [`Self::relieve_fds`]: grows the cache back (up to its start-up size) when the
    /// limit allows again.
    fn regrow_fds(&mut self) {
        let (cached, now) = self.watcher.fd_budget();
        if now >= self.fd_budget_max {
            return;
        }
        let others = crate::limits::open_fd_count().saturating_sub(cached);
        let budget =
            FdBudget::size_for(crate::limits::soft_fd_limit(), others).min(self.fd_budget_max);
        if budget > now {
            tracing::info!(
                budget,
                was = now,
                "descriptors available again; growing the directory fd cache"
            );
            self.watcher.set_fd_budget(budget);
        }
    }

    /// Retries the containers that could not be armed (on the tick). Not frozen: they
    /// run already; what they did meanwhile is reported by scan.
    fn retry_unarmed(&mut self) {
        let ids: Vec<String> = self
            .unarmed
            .keys()
            .filter(|id| !self.asking.contains_key(*id))
            .cloned()
            .collect();
        for id in ids {
            let Some(u) = self.unarmed.get(&id) else {
                continue;
            };
            let (cg, cgroup, since, attempts) = (
                u.cgroup.clone(),
                u.unified_cgroup.clone(),
                u.since,
                u.attempts,
            );
            if let Err(e) = self.arm(&cg, None, cgroup, Some(since)) {
                tracing::error!(container_id = %id, error = %e, "cannot arm");
            }
            if self.containers.contains_key(&id) {
                self.stats.late_arm();
            }
            if !self.unarmed.contains_key(&id) {
                tracing::info!(container_id = %id, attempts, "armed a container that could not be armed before");
            }
        }
    }

    /// The filters' decision before anything is frozen or watched, from what is known at
    /// the cgroup's appearance: the id and the runtime (from the cgroup's name), a Docker
    /// container's name and image when its engine already told them (its `create` event),
    /// and another runtime's identity (name, image, Kubernetes pod) from its bundle's
    /// annotations and its own small metadata files. Those files are read here only when a
    /// filter needs them, so that an excluded container is never frozen. `NotYet`: decided
    /// again once its identity is known (`finish_arm`, `release`).
    fn decide_early(&self, cg: &ContainerCgroup) -> Decision {
        let filter = &self.config.containers;
        if filter.is_empty() {
            return Decision::Monitor;
        }
        let id = cg.id.as_str();
        let runtime = cg.runtime.runtime();
        let mut facts = Facts {
            id,
            runtime: Some(runtime.as_str()),
            meta: None,
        };
        let decision = filter.decide(&facts);
        if decision != Decision::NotYet {
            return decision;
        }
        if runtime == RuntimeName::Docker {
            let cached = self.runtime.cached_meta(id);
            if cached.name.is_none() && cached.image.is_none() {
                return Decision::NotYet;
            }
            facts.meta = Some(Meta {
                name: cached.name.as_deref(),
                image: cached.image.as_deref(),
                ..Meta::default()
            });
            return filter.decide(&facts);
        }
        let rt = AnyRuntime::for_kind(&self.config.places, cg.runtime);
        let bundle = rt
            .bundle_dirs(cg)
            .iter()
            .find_map(|d| oci::read_bundle(d).ok());
        let ident = rt.identity(&cg.id, bundle.as_ref());
        if bundle.is_none() && ident.name.is_none() && ident.image.is_none() {
            return Decision::NotYet;
        }
        let pod = ident.pod.as_ref();
        facts.meta = Some(Meta {
            name: ident.name.as_deref(),
            image: ident.image.as_deref(),
            labels: None,
            namespace: pod.and_then(|p| p.namespace.as_deref()),
            pod: pod.and_then(|p| p.name.as_deref()),
        });
        filter.decide(&facts)
    }

    fn try_arm(
        &mut self,
        cg: &ContainerCgroup,
        freeze: Option<&FreezeTarget>,
        unified_cgroup: Option<&std::path::Path>,
        since: Option<SystemTime>,
    ) -> anyhow::Result<ArmOutcome> {
        let id = cg.id.as_str();
        if self.decide_early(cg) == Decision::Skip {
            return Ok(ArmOutcome::Excluded);
        }
        let frozen = match freeze {
            Some(t) => match self.freezer.freeze(t, self.config.freeze_timeout) {
                Ok(f) => f,
                Err(e) => {
                    if crate::limits::chain_is_fd_exhaustion(&e) {
                        return Ok(ArmOutcome::Failed {
                            cause: format!("{e:#}"),
                            exhausted: true,
                        });
                    }
                    tracing::warn!(container_id = %id, error = %e, "cannot freeze; arming without it");
                    None
                }
            },
            None => None,
        };
        let located = self.locate(cg);
        let added = match &located {
            Ok(Located::Found(found)) => Some(self.add_to_watcher(&cg.id, found, since)),
            _ => None,
        };
        // The container's exit, in order with its file events, so that nothing the engine
        // does afterwards (removing a --rm container's layer) is reported as its doing.
        // Watched before the container is thawed or resumed: one that ran and exited before
        // its watch existed would only be seen by the rmdir record, after the clean-up.
        // Without a v2 cgroup, the cgroup's rmdir record ends monitoring instead.
        if let (Some(Ok(_)), Some(dir)) = (&added, unified_cgroup) {
            self.watch_exit(id, dir);
        }
        let freeze_us = match frozen.map(|f| self.freezer.thaw(f)) {
            Some(Ok(rep)) => {
                if rep.bound_exceeded {
                    tracing::warn!(container_id = %id, held_us = rep.held.as_micros() as u64, "arming took longer than --freeze-timeout; the watchdog thawed the container");
                }
                Some(rep.held.as_micros() as u64)
            }
            Some(Err(e)) => {
                tracing::error!(container_id = %id, error = %e, "thaw failed");
                None
            }
            None => None,
        };
        match (located, added) {
            (Ok(Located::Found(found)), Some(r)) => {
                self.finish_arm(cg, *found, r, freeze_us, unified_cgroup, since)
            }
            (Ok(Located::Ask), _) => {
                self.ask_layer(cg, unified_cgroup, since);
                Ok(ArmOutcome::Asking)
            }
            (Ok(_), _) => Ok(ArmOutcome::Foreign),
            (Err((cause, exhausted)), _) => Ok(ArmOutcome::Failed { cause, exhausted }),
        }
    }

    /// Arms the recursive watch on a found layer (reporting by scan what it got since
    /// `since`: a container armed after it started running has those changes reported,
    /// not silently indexed).
    fn add_to_watcher(
        &mut self,
        id: &ContainerId,
        found: &Found,
        since: Option<SystemTime>,
    ) -> Result<ArmStats, WatchError> {
        let layer = found.layer.clone();
        match since {
            Some(t) => self.watcher.add_container_since(id.as_str(), layer, t),
            None => self.watcher.add_container(id.as_str(), layer),
        }
    }

    /// After the watch is armed (and the cgroup thawed): `container_start`, or its hold
    /// while the container's name and image are asked for, and the exit watch.
    fn finish_arm(
        &mut self,
        cg: &ContainerCgroup,
        found: Found,
        added: Result<ArmStats, WatchError>,
        freeze_us: Option<u64>,
        unified_cgroup: Option<&std::path::Path>,
        since: Option<SystemTime>,
    ) -> anyhow::Result<ArmOutcome> {
        let id = cg.id.as_str();
        let upperdir = found.layer.upperdir.clone();
        if let Err(e) = added {
            self.watcher.remove_container(id);
            if crate::limits::chain_is_fd_exhaustion(&e) {
                return Ok(ArmOutcome::Failed {
                    cause: format!("{e:#}"),
                    exhausted: true,
                });
            }
            tracing::error!(container_id = %id, upperdir = %upperdir.display(), error = %e, "cannot watch the container's upperdir");
            return Ok(ArmOutcome::Gone);
        }
        // Armed: the gate ends here, not after the engine has answered for the name and
        // image (that may take a while on a busy engine, and an armed container's exec is
        // never to be held).
        let gated_us = self.settle_gate(unified_cgroup);
        let (cref, setup, ask) = self.identify(&cg.id, cg.runtime, found);
        // Its name and image are known unless an engine is being asked for them (then
        // `release` decides, before its `container_start`).
        if ask.is_none() && self.config.containers.decide(&facts_of(&cref)) == Decision::Skip {
            self.watcher.remove_container(id);
            return Ok(ArmOutcome::Excluded);
        }
        // How long after its cgroup appeared the container was armed (null for one that
        // was running before fsmon started).
        let now = SystemTime::now();
        let arm_us = since
            .and_then(|t| now.duration_since(t).ok())
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let held = match ask {
            Some(engine) => {
                self.ask_meta(engine, id);
                Some(HeldStart {
                    at: now,
                    upperdir,
                    freeze_us,
                    arm_us,
                    gated_us,
                    outputs: Vec::new(),
                })
            }
            None => {
                let line =
                    record::container_start(now, &cref, &upperdir, freeze_us, arm_us, gated_us);
                self.emit(&line)?;
                None
            }
        };
        let encoded = cref.encoded();
        self.containers.insert(
            id.to_owned(),
            Monitored {
                cref,
                encoded,
                setup,
                held,
            },
        );
        // Arming can itself produce output (a watch-limit overflow) that no fd readiness
        // will announce: print it now.
        self.drain_watcher()?;
        Ok(ArmOutcome::Armed)
    }

    /// Watches the container's exit (its v2 `cgroup.events`), in order with its file
    /// events, so that nothing the engine does afterwards (removing a --rm container's
    /// layer) is reported as its doing. Done before the container is thawed or resumed:
    /// one that ran and exited before its watch existed would only be seen by the rmdir
    /// record, after the clean-up. Without a v2 cgroup, the rmdir record ends monitoring.
    fn watch_exit(&mut self, id: &str, dir: &std::path::Path) {
        if let Err(e) = self.watcher.watch_exit(id, dir) {
            tracing::debug!(container_id = %id, cgroup = %dir.display(), error = %e, "cannot watch the container's cgroup.events");
        }
    }

    /// Asks the Docker engines for the layer of a container not found on disk, by a task.
    fn ask_layer(
        &mut self,
        cg: &ContainerCgroup,
        unified_cgroup: Option<&std::path::Path>,
        since: Option<SystemTime>,
    ) {
        let id = cg.id.as_str().to_owned();
        if self.asking.contains_key(&id) {
            return;
        }
        tracing::debug!(container_id = %id, "not found on disk; asking the engines");
        self.asking.insert(
            id.clone(),
            Asking {
                cgroup: cg.clone(),
                unified_cgroup: unified_cgroup.map(PathBuf::from),
                since,
            },
        );
        let (runtime, answers) = (self.runtime.clone(), self.answers.clone());
        tokio::spawn(async move {
            let result = runtime.layer_by_inspect(&id).await;
            let _ = answers.send(Answer::Layer { id, result });
        });
    }

    /// Asks an engine for the name and image of an armed container, by a task (bounded
    /// by [`META_TIMEOUT`]); its records are held until the answer.
    fn ask_meta(&self, engine: Option<usize>, id: &str) {
        let (runtime, answers, id) = (self.runtime.clone(), self.answers.clone(), id.to_owned());
        tokio::spawn(async move {
            let meta = runtime.meta_by_inspect(engine, &id, META_TIMEOUT).await;
            let _ = answers.send(Answer::Meta { id, meta });
        });
    }

    /// Finds a container's layers on disk, without the network: Docker's overlay2
    /// metadata, then any runtime's bundle and rootfs mount. `Located::Ask`: a Docker
    /// container that only an engine's inspect API can place. `Err`: (cause, whether
    /// descriptors ran out).
    fn locate(&self, cg: &ContainerCgroup) -> Result<Located, (String, bool)> {
        let id = cg.id.as_str();
        let docker = cg.runtime.runtime() == RuntimeName::Docker;
        if docker {
            match self.runtime.layer_on_disk(id) {
                Ok(Some((engine, layer))) => {
                    return Ok(Located::Found(Box::new(Found {
                        layer,
                        runtime: RuntimeName::Docker,
                        engine: Some(engine),
                        meta: None,
                        resolved: None,
                    })))
                }
                Ok(None) => {}
                Err(e) => return Err((format!("reading the engine's layer metadata: {e}"), true)),
            }
        }
        match AnyRuntime::for_kind(&self.config.places, cg.runtime).resolve(cg) {
            Ok(r) => {
                let ident = r
                    .bundle
                    .as_ref()
                    .map(|b| oci::identity_from_annotations(&b.annotations));
                if ident.is_some_and(|i| i.sandbox) {
                    tracing::debug!(container_id = %id, "Kubernetes sandbox (pause) container; not monitored");
                    return Ok(Located::NotMonitored);
                }
                tracing::debug!(container_id = %id, runtime = r.runtime.as_str(), how = r.how.as_str(), upperdir = %r.layer.upperdir.display(), "resolved on disk");
                Ok(Located::Found(Box::new(Found {
                    layer: r.layer.clone(),
                    runtime: r.runtime,
                    engine: None,
                    meta: None,
                    resolved: Some(r),
                })))
            }
            Err(_) if docker => Ok(Located::Ask),
            Err(e) => {
                tracing::debug!(container_id = %id, runtime = cg.runtime.runtime().as_str(), error = %e, "not found on disk; ignored");
                Ok(Located::NotMonitored)
            }
        }
    }

    /// Who an armed container is, without asking an engine, and the paths its runtime
    /// creates while setting it up. The third value is `Some(engine)` when the Docker
    /// engines are to be asked for the name and image (not on disk: not yet connected to
    /// the engine, or its files are elsewhere).
    fn identify(
        &self,
        id: &ContainerId,
        kind: RuntimeKind,
        found: Found,
    ) -> (ContainerRef, SetupPaths, Option<Option<usize>>) {
        let setup = found
            .resolved
            .as_ref()
            .map(Resolved::setup_paths)
            .unwrap_or_default();
        let mut ask = None;
        let (name, image, pod) = if found.runtime == RuntimeName::Docker {
            let meta = match found.meta {
                Some(m) => m,
                None => match self.runtime.meta_on_disk(found.engine, id.as_str()) {
                    Some(m) => m,
                    None => {
                        ask = Some(found.engine);
                        self.runtime.cached_meta(id.as_str())
                    }
                },
            };
            (meta.name, meta.image, None)
        } else {
            let ident = AnyRuntime::for_kind(&self.config.places, kind)
                .identity(id, found.resolved.as_ref().and_then(|r| r.bundle.as_ref()));
            (ident.name, ident.image, ident.pod)
        };
        let cref = ContainerRef {
            id: id.as_str().to_owned(),
            name,
            image,
            runtime: found.runtime,
            pod,
        };
        (cref, setup, ask)
    }

    fn stop(&mut self, id: &str) -> anyhow::Result<()> {
        // Its held records go out first, behind its `container_start`.
        self.release(id, None)?;
        self.watcher.remove_container(id);
        if let Some(c) = self.containers.remove(id) {
            let line = record::container_stop(SystemTime::now(), &c.cref);
            self.emit(&line)?;
        }
        Ok(())
    }

    /// Arms the running containers of every runtime but Docker (whose engines list theirs
    /// with names): found by walking the cgroup hierarchy, resolved from disk.
    fn resync_on_disk(&mut self) {
        let (hierarchy, root) = match (&self.mounts.unified, &self.mounts.freezer) {
            (Some(u), _) => (Hierarchy::Unified, u.clone()),
            (None, Some(f)) => (Hierarchy::Freezer, f.clone()),
            (None, None) => return,
        };
        for (rel, cg) in find_container_cgroups(&root, 8) {
            let id = cg.id.as_str();
            if cg.runtime.runtime() == RuntimeName::Docker
                || self.containers.contains_key(id)
                || self.foreign.contains(id)
                || self.excluded.contains(id)
                || self.unarmed.contains_key(id)
                || self.asking.contains_key(id)
            {
                continue;
            }
            let cgroup = self
                .mounts
                .dir(Hierarchy::Unified, &rel)
                .filter(|d| hierarchy == Hierarchy::Unified || d.is_dir());
            if let Err(e) = self.arm(&cg, None, cgroup, None) {
                tracing::error!(container_id = %id, error = %e, "cannot arm a running container");
            }
        }
    }

    /// Arms the running containers the Docker engines list (at start-up, before `ready`).
    async fn resync_docker(&mut self) {
        for engine in 0..self.runtime.len() {
            for id in self.runtime.running(engine).await {
                self.arm_running_docker(&id);
            }
        }
    }

    /// Asks every Docker engine for its running containers, by tasks (after lifecycle
    /// records were lost); they are armed when the answers come.
    fn ask_running(&self) {
        for engine in 0..self.runtime.len() {
            let (runtime, answers) = (self.runtime.clone(), self.answers.clone());
            tokio::spawn(async move {
                let ids = runtime.running(engine).await;
                let _ = answers.send(Answer::Running { ids });
            });
        }
    }

    /// Arms a container a Docker engine says is running, unless it already is.
    fn arm_running_docker(&mut self, id: &str) {
        if self.containers.contains_key(id)
            || self.asking.contains_key(id)
            || self.excluded.contains(id)
        {
            return;
        }
        let Some(cid) = ContainerId::parse(id) else {
            return;
        };
        // Already running: what is in its layer predates fsmon (since: None).
        let cgroup = self.unified_cgroup_of(id);
        let cg = ContainerCgroup {
            id: cid,
            runtime: RuntimeKind::DockerCgroupfs,
            namespace: None,
        };
        if let Err(e) = self.arm(&cg, None, cgroup, None) {
            tracing::error!(container_id = %id, error = %e, "cannot arm a running container");
        }
    }
}

/// What the filters know of a container once its identity is known.
fn facts_of(c: &ContainerRef) -> Facts<'_> {
    let pod = c.pod.as_ref();
    Facts {
        id: &c.id,
        runtime: Some(c.runtime.as_str()),
        meta: Some(Meta {
            name: c.name.as_deref(),
            image: c.image.as_deref(),
            labels: None,
            namespace: pod.and_then(|p| p.namespace.as_deref()),
            pod: pod.and_then(|p| p.name.as_deref()),
        }),
    }
}

/// Where [`Daemon::locate`] found a container.
enum Located {
    /// On disk.
    Found(Box<Found>),
    /// A Docker container only an engine can place.
    Ask,
    /// Not a container fsmon monitors (logged).
    NotMonitored,
}

/// Counts loop turns longer than [`SLOW_TURN`] and logs them, at most once a second.
#[derive(Default)]
struct SlowTurns {
    count: u64,
    worst: Duration,
    worst_input: &'static str,
    logged: Option<std::time::Instant>,
}

impl SlowTurns {
    fn note(&mut self, input: &'static str, took: Duration) {
        if took < SLOW_TURN {
            return;
        }
        self.count += 1;
        if took > self.worst {
            self.worst = took;
            self.worst_input = input;
        }
        if self
            .logged
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(1))
        {
            tracing::info!(
                turns = self.count,
                worst_us = u64::try_from(self.worst.as_micros()).unwrap_or(u64::MAX),
                input = self.worst_input,
                "slow event-loop turns (nothing else is read meanwhile)"
            );
            self.logged = Some(std::time::Instant::now());
            self.count = 0;
            self.worst = Duration::ZERO;
        }
    }
}
