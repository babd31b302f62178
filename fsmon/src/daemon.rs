//! The daemon: one event loop over a closed set of inputs (lifecycle record, file-system
//! event, runtime event, periodic check, shutdown). Tests and `main` drive it through
//! [`run`].
//!
//! Arming a new container (the lossless start) happens inline in the loop: freeze the
//! cgroup, resolve the upperdir from disk, arm the recursive watch, thaw, then print
//! `container_start`. File events of that container are read only after, so they always
//! follow its `container_start`.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    io::Write,
    os::fd::{AsFd, AsRawFd, RawFd},
    path::PathBuf,
    time::{Duration, SystemTime},
};

use anyhow::Context as _;
use fsmon_common::{FilterConfig, GateConfig};
use tokio::{io::unix::AsyncFd, sync::mpsc};

use crate::{
    cgroup::{parse_container_cgroup, CgroupMounts, Hierarchy},
    ebpf::{monotonic_ns, CgroupOp, Lifecycle, LifecycleRecord},
    event::WatchOutput,
    freezer::{FreezeTarget, Freezer, FreezerKind},
    gate::Gate,
    record::{self, ContainerRef},
    runtime::{Runtime, RuntimeEvent},
    watcher::{FdBudget, Watcher},
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
    /// Armed; `container_start` printed.
    Armed,
    /// No configured engine knows it.
    Foreign,
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
    unified_cgroup: Option<PathBuf>,
    /// Since when its changes are its own (its cgroup's appearance, or fsmon's start).
    since: SystemTime,
    attempts: u32,
}

/// A container being monitored.
struct Monitored {
    cref: ContainerRef,
    /// `cref` as a JSON object, for every file record of the container.
    encoded: String,
}

struct Daemon {
    config: Config,
    mounts: CgroupMounts,
    freezer: Freezer,
    /// The exec gate (None with `--no-gate`).
    gate: Option<Gate>,
    watcher: Watcher,
    runtime: Runtime,
    out: Box<dyn Write + Send>,
    /// Records not yet written to `out` (written when large, and after every loop turn).
    pending_out: Vec<u8>,
    containers: HashMap<String, Monitored>,
    /// Cgroups recognised as containers that no configured engine knows (podman, ...),
    /// so they are looked up once, not at every mkdir.
    foreign: HashSet<String>,
    /// Containers of a cgroup v1 engine whose v1 freezer cgroup appeared, waiting for their
    /// v2 cgroup (value: when the first record fired, CLOCK_MONOTONIC ns).
    pending: HashMap<String, u64>,
    outputs: Vec<WatchOutput>,
    lifecycle_lost: u64,
    /// Containers that could not be armed yet (`arm_failed`), retried on the tick.
    unarmed: HashMap<String, Unarmed>,
    /// The directory fd budget at start-up (the most it grows back to).
    fd_budget_max: usize,
    /// When this fsmon started: what a container that was running before did is reported
    /// by scan from then on if it could not be armed at once.
    started: SystemTime,
}

/// Runs the daemon until `shutdown` resolves. Returns an error only for fatal problems
/// (eBPF cannot load or attach, output unusable); everything a container or an engine does
/// is handled and logged.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
    let out: Box<dyn Write + Send> = match &config.output {
        // Our own handle on fd 1, written in whole batches (std's `Stdout` would add a
        // lock and a line buffer to every write).
        OutputTarget::Stdout => Box::new(std::fs::File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .context("cannot use stdout")?,
        )),
        OutputTarget::File(p) => Box::new(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("cannot open --output {}", p.display()))?,
        ),
    };
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
        pending: HashMap::new(),
        outputs: Vec::new(),
        lifecycle_lost: 0,
        unarmed: HashMap::new(),
        fd_budget_max: 0,
        started: SystemTime::now(),
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
    d.resync().await;
    d.emit(&record::ready(SystemTime::now(), &d.config.docker_hosts))?;
    d.flush()?;

    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut batch = Vec::new();
    let mut gate_batch = Vec::new();
    let mut gate_skipped = 0;
    loop {
        tokio::select! {
            biased;
            () = &mut shutdown => break,
            r = lifecycle.next_batch(&mut batch, &mut gate_batch) => {
                r.context("reading the eBPF ring buffer")?;
                // Gated tasks first: a container armed by this batch's records resumes them.
                d.on_gate_records(&mut gate_batch);
                for rec in std::mem::take(&mut batch) {
                    // Whatever the daemon decided for a v2 cgroup (armed, not a container
                    // it arms, gone), the gate holds nothing of it afterwards.
                    let v2_cgroup = (rec.hierarchy_id == 0).then_some(rec.cgroup_id);
                    d.on_lifecycle(rec).await?;
                    if let Some(id) = v2_cgroup {
                        d.settle_gate_id(id);
                    }
                }
            }
            g = watch_fd.readable() => {
                let mut g = g.context("polling the inotify fd")?;
                d.drain_watcher()?;
                g.clear_ready();
            }
            Some(ev) = rt_rx.recv() => d.on_runtime(ev),
            _ = tick.tick() => {
                let lost = lifecycle.lost();
                if lost > d.lifecycle_lost {
                    tracing::error!(lost = lost - d.lifecycle_lost, "eBPF ring buffer was full: lifecycle records lost; resyncing with the engines");
                    d.lifecycle_lost = lost;
                    d.emit(&record::overflow(SystemTime::now(), None, "lifecycle"))?;
                    d.resync().await;
                }
                d.regrow_fds();
                d.arm_stale_pending().await;
                d.retry_unarmed().await;
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
            }
        }
        d.flush()?;
    }
    // Drain what the kernel has already queued, so nothing observed is lost at exit.
    d.drain_watcher()?;
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
        self.pending_out.extend_from_slice(line.as_bytes());
        self.write_if_large()
    }

    fn write_if_large(&mut self) -> anyhow::Result<()> {
        if self.pending_out.len() >= OUT_CHUNK {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> anyhow::Result<()> {
        if !self.pending_out.is_empty() {
            self.out
                .write_all(&self.pending_out)
                .context("writing to --output")?;
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
        for o in outputs.drain(..) {
            match o {
                WatchOutput::File(ev) => {
                    let Some(c) = self.containers.get(&ev.container) else {
                        continue;
                    };
                    enc.encode(&mut self.pending_out, &c.encoded, &ev);
                    self.write_if_large()?;
                }
                WatchOutput::Exited { container } => {
                    if self.containers.contains_key(&container) {
                        tracing::debug!(container_id = %container, "exited (cgroup.events populated 0)");
                        self.stop(&container)?;
                    }
                }
                WatchOutput::Overflow { container, reason } => {
                    let c = container
                        .as_ref()
                        .and_then(|id| self.containers.get(id))
                        .map(|c| c.cref.clone());
                    if container.is_some() && c.is_none() {
                        continue;
                    }
                    tracing::warn!(container_id = ?container, reason, "events lost; rescanning");
                    let line = record::overflow(now, c.as_ref(), reason);
                    self.emit(&line)?;
                }
            }
        }
        self.outputs = outputs;
        Ok(())
    }

    async fn on_lifecycle(&mut self, rec: LifecycleRecord) -> anyhow::Result<()> {
        tracing::debug!(
            op = ?rec.op,
            hierarchy_id = rec.hierarchy_id,
            cgroup_id = rec.cgroup_id,
            path = %rec.path,
            age_us = monotonic_ns().saturating_sub(rec.ktime_ns) / 1000,
            "lifecycle record"
        );
        let Some(cg) = parse_container_cgroup(&rec.path) else {
            return Ok(());
        };
        let Some(hierarchy) = self.mounts.hierarchy_of(rec.hierarchy_id) else {
            return Ok(());
        };
        match rec.op {
            CgroupOp::Mkdir => {
                if self.containers.contains_key(&cg.id)
                    || self.foreign.contains(&cg.id)
                    || self.unarmed.contains_key(&cg.id)
                {
                    return Ok(());
                }
                // A cgroup v1 engine on a hybrid host: runc makes the container's v2 cgroup
                // last, right before init joins it. Wait for that one and freeze there:
                // runc of a v1 engine never reads the v2 freeze state, so that freeze can
                // never fail a start, however late it lands (ARCHITECTURE.md).
                if hierarchy == Hierarchy::Freezer && self.unified_parent_exists(&rec.path) {
                    self.pending.entry(cg.id).or_insert(rec.ktime_ns);
                    return Ok(());
                }
                let first_ns = self.pending.remove(&cg.id);
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
                    &cg.id,
                    freeze,
                    self.mounts
                        .dir(Hierarchy::Unified, &rec.path)
                        .filter(|_| hierarchy == Hierarchy::Unified),
                    Some(since),
                )
                .await?;
            }
            CgroupOp::Rmdir => {
                if self.containers.contains_key(&cg.id) {
                    // Events queued before the container's cgroup went away are its own:
                    // print them before its watches are dropped.
                    self.drain_watcher()?;
                    tracing::debug!(container_id = %cg.id, hierarchy_id = rec.hierarchy_id, "stopped by rmdir");
                    self.stop(&cg.id)?;
                }
                self.foreign.remove(&cg.id);
                self.pending.remove(&cg.id);
                self.unarmed.remove(&cg.id);
            }
        }
        Ok(())
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
    async fn arm_stale_pending(&mut self) {
        let now = monotonic_ns();
        let stale: Vec<(String, u64)> = self
            .pending
            .iter()
            .filter(|(_, &t)| now.saturating_sub(t) > 500_000_000)
            .map(|(id, &t)| (id.clone(), t))
            .collect();
        for (id, first_ns) in stale {
            self.pending.remove(&id);
            tracing::warn!(container_id = %id, "no cgroup v2 directory came for this container; armed without freezing");
            let cgroup = self.unified_cgroup_of(&id);
            let since = Some(wall_clock_of(first_ns));
            if let Err(e) = self.arm(&id, None, cgroup, since).await {
                tracing::error!(container_id = %id, error = %e, "cannot arm");
            }
        }
    }

    /// Freeze (optionally) → resolve upperdir → arm → thaw → `container_start`. A
    /// container that cannot be armed for lack of resources (descriptors, an engine that
    /// cannot answer) is never dropped silently: see [`Self::arm_failed`].
    async fn arm(
        &mut self,
        id: &str,
        freeze: Option<FreezeTarget>,
        unified_cgroup: Option<PathBuf>,
        since: Option<SystemTime>,
    ) -> anyhow::Result<()> {
        let mut outcome = self
            .try_arm(id, freeze.as_ref(), unified_cgroup.as_deref(), since)
            .await?;
        if let ArmOutcome::Failed {
            exhausted: true, ..
        } = outcome
        {
            // The cache of directory fds gives way, and the container gets a second try.
            self.relieve_fds();
            outcome = self
                .try_arm(id, freeze.as_ref(), unified_cgroup.as_deref(), since)
                .await?;
        }
        match outcome {
            ArmOutcome::Armed => {
                self.unarmed.remove(id);
            }
            ArmOutcome::Foreign => {
                tracing::debug!(container_id = %id, "no configured engine knows this container; ignored");
                self.unarmed.remove(id);
                self.foreign.insert(id.to_owned());
            }
            ArmOutcome::Gone => {
                self.unarmed.remove(id);
            }
            ArmOutcome::Failed { cause, exhausted } => {
                self.arm_failed(id, unified_cgroup, since, &cause, exhausted)?;
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
        id: &str,
        unified_cgroup: Option<PathBuf>,
        since: Option<SystemTime>,
        cause: &str,
        exhausted: bool,
    ) -> anyhow::Result<()> {
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
        };
        let line = record::overflow(SystemTime::now(), Some(&cref), "arm_failed");
        self.emit(&line)?;
        self.unarmed.insert(
            id.to_owned(),
            Unarmed {
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
    async fn retry_unarmed(&mut self) {
        let ids: Vec<String> = self.unarmed.keys().cloned().collect();
        for id in ids {
            let Some(u) = self.unarmed.get(&id) else {
                continue;
            };
            let (cgroup, since, attempts) = (u.unified_cgroup.clone(), u.since, u.attempts);
            if let Err(e) = self.arm(&id, None, cgroup, Some(since)).await {
                tracing::error!(container_id = %id, error = %e, "cannot arm");
            }
            if !self.unarmed.contains_key(&id) {
                tracing::info!(container_id = %id, attempts, "armed a container that could not be armed before");
            }
        }
    }

    async fn try_arm(
        &mut self,
        id: &str,
        freeze: Option<&FreezeTarget>,
        unified_cgroup: Option<&std::path::Path>,
        since: Option<SystemTime>,
    ) -> anyhow::Result<ArmOutcome> {
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
        let mut meta = None;
        let found = match self.runtime.layer_on_disk(id) {
            Ok(Some(x)) => Ok(Some(x)),
            Ok(None) => match self.runtime.layer_by_inspect(id).await {
                Ok(x) => Ok(x.map(|(e, l, m)| {
                    meta = Some(m);
                    (e, l)
                })),
                Err(cause) => Err((cause, false)),
            },
            Err(e) => Err((format!("reading the engine's layer metadata: {e}"), true)),
        };
        let armed = match found {
            Ok(Some((engine, layer))) => {
                let upperdir = layer.upperdir.clone();
                // A container armed after it started running (fsmon was late) has its
                // changes since its cgroup appeared reported by scan, not silently indexed.
                let r = match since {
                    Some(t) => self.watcher.add_container_since(id, layer, t),
                    None => self.watcher.add_container(id, layer),
                };
                Ok(Some((engine, upperdir, r)))
            }
            Ok(None) => Ok(None),
            Err(e) => Err(e),
        };
        // The container's exit, in order with its file events, so that nothing the engine
        // does afterwards (removing a --rm container's layer) is reported as its doing.
        // Watched before the container is thawed or resumed: one that ran and exited before
        // its watch existed would only be seen by the rmdir record, after the clean-up.
        // Without a v2 cgroup, the cgroup's rmdir record ends monitoring instead.
        if let (Ok(Some((_, _, Ok(_)))), Some(dir)) = (&armed, &unified_cgroup) {
            if let Err(e) = self.watcher.watch_exit(id, dir) {
                tracing::debug!(container_id = %id, cgroup = %dir.display(), error = %e, "cannot watch the container's cgroup.events");
            }
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
        let (engine, upperdir, result) = match armed {
            Ok(Some(x)) => x,
            Ok(None) => return Ok(ArmOutcome::Foreign),
            Err((cause, exhausted)) => return Ok(ArmOutcome::Failed { cause, exhausted }),
        };
        if let Err(e) = result {
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
        let meta = match meta {
            Some(m) => m,
            None => {
                self.runtime
                    .metadata(engine, id, Duration::from_secs(2))
                    .await
            }
        };
        let cref = ContainerRef {
            id: id.to_owned(),
            name: meta.name,
            image: meta.image,
        };
        // How long after its cgroup appeared the container was armed (null for one that
        // was running before fsmon started).
        let now = SystemTime::now();
        let arm_us = since
            .and_then(|t| now.duration_since(t).ok())
            .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        let line = record::container_start(now, &cref, &upperdir, freeze_us, arm_us, gated_us);
        self.emit(&line)?;
        let encoded = cref.encoded();
        self.containers
            .insert(id.to_owned(), Monitored { cref, encoded });
        // Arming can itself produce output (a watch-limit overflow) that no fd readiness
        // will announce: print it now.
        self.drain_watcher()?;
        Ok(ArmOutcome::Armed)
    }

    fn stop(&mut self, id: &str) -> anyhow::Result<()> {
        self.watcher.remove_container(id);
        if let Some(c) = self.containers.remove(id) {
            let line = record::container_stop(SystemTime::now(), &c.cref);
            self.emit(&line)?;
        }
        Ok(())
    }

    /// Arms every running container not yet armed (at start-up, and after lifecycle
    /// records were lost).
    async fn resync(&mut self) {
        for engine in 0..self.runtime.len() {
            for id in self.runtime.running(engine).await {
                if !self.containers.contains_key(&id) {
                    // Already running: what is in its layer predates fsmon (since: None).
                    let cgroup = self.unified_cgroup_of(&id);
                    if let Err(e) = self.arm(&id, None, cgroup, None).await {
                        tracing::error!(container_id = %id, error = %e, "cannot arm a running container");
                    }
                }
            }
        }
    }
}
