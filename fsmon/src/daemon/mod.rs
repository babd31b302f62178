//! The daemon: one event loop over a closed set of inputs (lifecycle record, file-system
//! event, runtime event, periodic check, shutdown). Tests and `main` drive it through
//! [`run`].
//!
//! Arming a new container (the lossless start) never waits on a runtime: freeze the cgroup
//! (the write, which can wait behind runc on the cgroup lock, by a blocking task whose
//! answer is a loop input), resolve the upperdir from disk, arm the recursive watch, thaw,
//! then print `container_start`. What only an engine's API can tell (the
//! layer of a Docker container not found on disk, a name not on disk) is asked by a task
//! whose answer comes back as a loop input; meanwhile the container's records are held, so
//! they always follow its `container_start`.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use fsmon_common::{FilterConfig, GateConfig};
use tokio::sync::mpsc;

use crate::{
    cgroup::{
        find_container_cgroups, parse_container_cgroup, CgroupMounts, ContainerCgroup, Hierarchy,
        RuntimeKind,
    },
    ebpf::{monotonic_ns, CgroupOp, Lifecycle, LifecycleRecord},
    event::{FileKind, WatchOutput},
    filter::{ContainerFilter, Decision, Facts, Meta, RecordFilter},
    freezer::{FreezeError, FreezeTarget, Freezer, FreezerKind, Hold},
    gate::Gate,
    id::{ContainerId, RuntimeName},
    output::Output,
    record::{self, ContainerRef},
    runtime::{ContainerMeta, Runtime, RuntimeEvent},
    runtimes::{oci, AnyRuntime, Places, Resolved, SetupPaths},
    stats::{Gauges, Stats},
    watcher::{ArmStats, ContainerLayer, FdBudget, WatchError, Watcher},
};

mod arm;
mod lifecycle;
mod reader;
mod stream;
mod ticker;

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
    /// A freeze written by a blocking task (it may wait behind runc on the cgroup lock).
    Frozen {
        id: String,
        result: Result<Option<Hold>, FreezeError>,
    },
}

/// A container whose layer an engine is being asked for, or whose freeze is being
/// written: what arming it needs when the answer comes.
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
    /// Shared with the tasks that write freezes off the loop.
    freezer: std::sync::Arc<Freezer>,
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
    /// Containers whose freeze a blocking task is writing.
    freezing: HashMap<String, Asking>,
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
        freezer: std::sync::Arc::new(freezer),
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
        freezing: HashMap::new(),
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
    let tick = ticker::Ticker::new(Duration::from_secs(1), Duration::from_secs(1))
        .context("cannot create the event loop's timer")?;
    let stats_every = d.config.stats_interval;
    let stats_tick = if stats_every.is_zero() {
        None
    } else {
        Some(
            ticker::Ticker::new(stats_every, stats_every)
                .context("cannot create the stats timer")?,
        )
    };
    let mut batch = Vec::new();
    let mut slow = SlowTurns::default();
    let mut gate_batch = Vec::new();
    let mut gate_skipped = 0;
    // File events are read and printed by their own thread (`reader`), the rest by this
    // loop; both take the daemon's lock for a turn, so a turn of either sees the watcher
    // and the containers as the other left them, and the kernel queue is read in order.
    let watch_fd = d.watcher.as_raw_fd();
    let daemon = std::sync::Arc::new(std::sync::Mutex::new(d));
    let (reader_tx, mut reader_rx) = mpsc::unbounded_channel();
    let reader = reader::Reader::spawn(daemon.clone(), watch_fd, reader_tx)
        .context("cannot start the inotify reader thread")?;
    let result: anyhow::Result<()> = async {
        loop {
            // Nothing in a turn awaits: what needs a runtime's answer is asked by a task
            // whose answer comes back as an input (`answers_rx`).
            let input = tokio::select! {
                biased;
                () = &mut shutdown => break,
                r = lifecycle.next_batch(&mut batch, &mut gate_batch) => Input::Lifecycle(r),
                Some(a) = answers_rx.recv() => Input::Answer(a),
                Some(ev) = rt_rx.recv() => Input::Runtime(ev),
                r = async { stats_tick.as_ref()?.tick().await.ok() }, if stats_tick.is_some() => {
                    Input::Stats(r)
                }
                Some(()) = hangup.recv() => Input::Hangup,
                r = tick.tick() => Input::Tick(r),
                end = reader_rx.recv() => Input::ReaderEnded(end),
            };
            let t = std::time::Instant::now();
            let mut d = reader::lock(&daemon);
            let name = match input {
                Input::Lifecycle(r) => {
                    r.context("reading the eBPF ring buffer")?;
                    // Gated tasks first: a container armed by this batch's records resumes
                    // them.
                    d.on_gate_records(&mut gate_batch);
                    for rec in std::mem::take(&mut batch) {
                        // Whatever the daemon decided for a v2 cgroup (armed, not a
                        // container it arms, gone), the gate holds nothing of it afterwards;
                        // unless an engine is being asked where its layer is (the answer
                        // settles it).
                        let v2_cgroup = (rec.hierarchy_id == 0).then_some(rec.cgroup_id);
                        let deciding = d.on_lifecycle(rec)?;
                        if let (Some(id), false) = (v2_cgroup, deciding) {
                            d.settle_gate_id(id);
                        }
                    }
                    "lifecycle"
                }
                Input::Answer(a) => {
                    d.on_answer(a)?;
                    "answer"
                }
                Input::Runtime(ev) => {
                    d.on_runtime(ev);
                    "runtime"
                }
                Input::Stats(r) => {
                    r.context("reading the stats timer")?;
                    d.emit_stats(lifecycle.lost(), false)?;
                    "stats"
                }
                Input::Hangup => {
                    // Everything observed so far goes to the old file, then the new one.
                    d.flush()?;
                    d.out.reopen();
                    "hangup"
                }
                Input::ReaderEnded(end) => match end {
                    // The output's reader went away: the shutdown path.
                    Some(reader::End::Closed) => break,
                    Some(reader::End::Failed(e)) => return Err(e),
                    None => anyhow::bail!("the inotify reader thread ended"),
                },
                Input::Tick(r) => {
                    r.context("reading the event loop's timer")?;
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
                    let d = &mut *d;
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
                    "tick"
                }
            };
            d.flush()?;
            slow.note(name, t.elapsed());
            if d.out.is_closed() {
                break;
            }
        }
        Ok(())
    }
    .await;
    // The reader thread ends first: then nothing else reads the queue.
    reader.stop();
    result?;
    let mut d = reader::lock(&daemon);
    // Drain what the kernel has already queued, so nothing observed is lost at exit.
    d.drain_watcher()?;
    d.emit_stats(lifecycle.lost(), true)?;
    d.flush()?;
    let d = &mut *d;
    if let Some(g) = d.gate.as_mut() {
        g.release_all(&d.freezer);
    }
    tracing::info!("shutting down");
    Ok(())
}

/// What woke the event loop (file events wake the reader thread instead).
enum Input {
    Lifecycle(std::io::Result<()>),
    Answer(Answer),
    Runtime(RuntimeEvent),
    Stats(Option<()>),
    Hangup,
    Tick(std::io::Result<()>),
    ReaderEnded(Option<reader::End>),
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
