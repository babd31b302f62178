//! `cargo xtask bench`: fsmon's performance numbers, measured side by side with the
//! baseline in one run and printed as ratios (never asserted in tests).
//!
//! - start latency: `docker run --rm` wall time without a monitor, with fsmon, and with the
//!   baseline (`inotifywait -r` armed on each container's upperdir at the Docker `start`
//!   event), in interleaved blocks; plus fsmon's `freeze_us` distribution;
//! - first-instruction completeness: the paths of a container's first instructions that
//!   each monitor reports;
//! - detection latency: a 1-byte write in a running container's layer → its record read
//!   from the monitor's stdout (the bench thread polls the pipe without sleeping, so no
//!   wake-up of its own is counted), beside the floor: a bare blocking inotify reader;
//! - throughput: a burst of file creations made while the monitor is stopped → how fast
//!   all of them are reported once it runs again, and whether anything overflowed;
//! - memory: fsmon's RSS idle and per 10k watched directories.

pub(crate) mod overhead;

use std::{
    collections::HashSet,
    io::{BufRead, BufReader},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::{
    ebpf,
    engines::{self, TEST_IMAGE, V1_HOST, V2_HOST},
    report::{
        FirstResult, LiveResult, Meta, Report, ResolveRow, RuntimesResult, StartResult,
        StormResult, Throughput,
    },
};

/// `cargo xtask bench` options.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// `docker run` samples per engine and per mode (off / fsmon / baseline) [default: 40;
    /// --quick: 5].
    #[arg(long)]
    pub runs: Option<usize>,
    /// Write → record latency samples (per monitor) [default: 1000; --quick: 100].
    #[arg(long)]
    pub latency_samples: Option<usize>,
    /// Files in the throughput burst [default: 100000; --quick: 5000].
    #[arg(long)]
    pub burst: Option<usize>,
    /// Containers in the start storm (`--only storm`), spread over both engines [default:
    /// 500; --quick: 12].
    #[arg(long)]
    pub storm: Option<usize>,
    /// Every part, small: a smoke run for CI (a few minutes), not numbers to quote.
    #[arg(long)]
    pub quick: bool,
    /// Where to write the markdown report (plots go to `<stem>-plots/` beside it)
    /// [default: docs/benchmarks.md in the workspace].
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Run only these parts (comma-separated); all of them by default.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub only: Vec<Part>,
    /// Leave the engines this command started running afterwards.
    #[arg(long)]
    pub keep_engines: bool,
}

/// The sizes one run uses, from the options and `--quick`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub runs: usize,
    pub latency_samples: usize,
    pub burst: usize,
    pub storm: usize,
    /// Containers in the first-instruction part.
    pub first_runs: usize,
    /// Watched directories made for the memory row.
    pub dirs: usize,
    /// Seconds the storm's containers idle while fsmon's CPU is measured.
    pub idle_s: u64,
    /// Containers per runtime in the runtimes part.
    pub runtime_runs: usize,
    /// `mkdir -p` + immediate write trials per monitor.
    pub race: usize,
}

impl BenchArgs {
    pub fn sizes(&self) -> Sizes {
        let q = self.quick;
        let pick =
            |v: Option<usize>, full: usize, quick: usize| v.unwrap_or(if q { quick } else { full });
        let runs = pick(self.runs, 40, 5);
        Sizes {
            runs,
            latency_samples: pick(self.latency_samples, 1000, 100),
            burst: pick(self.burst, 100_000, 5000),
            storm: pick(self.storm, 500, 12),
            first_runs: if q { 5 } else { 20 },
            dirs: if q { 1000 } else { 10_000 },
            idle_s: if q { 3 } else { 10 },
            runtime_runs: if self.runs.is_none() && q { 3 } else { runs },
            race: if q { 50 } else { 500 },
        }
    }
}

/// The parts of the bench.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    /// `docker run` start-latency overhead on both engines.
    Start,
    /// First-instruction completeness.
    First,
    /// Detection latency, memory and throughput on a running container.
    Live,
    /// A start storm: hundreds of containers (4 at a time, 100 directories each), fsmon
    /// under `ulimit -n 1024` (soft and hard).
    Storm,
    /// Per runtime (Docker, containerd, podman): upperdir resolution cost by method, and
    /// cgroup mkdir → armed.
    Runtimes,
    /// sysbench workload overhead (CPU, memory, file I/O) with 0…300 watched directories.
    Overhead,
    /// Subdirectory coverage over time under a random mkdir/rmdir workload (experiment 3).
    Coverage,
    /// Fairness: a quiet container's write → record latency beside a noisy one creating
    /// files as fast as it can; sustained records/s and overflows.
    Fairness,
}

/// A container's first instructions, starting with a file made and deleted at once.
const FIRST: &str =
    "touch /gone; rm /gone; touch /f0; mkdir -p /a/b/c; touch /a/b/c/f1; echo x > /a/b/c/f2";
/// The file of [`FIRST`] made and deleted at once.
const GONE: &str = "/gone";
const FIRST_PATHS: [&str; 7] = [
    "/gone",
    "/f0",
    "/a",
    "/a/b",
    "/a/b/c",
    "/a/b/c/f1",
    "/a/b/c/f2",
];

#[derive(PartialEq, Eq)]
enum Ready {
    No,
    Data,
    HungUp,
}

/// A monitor under test. Its stdout is read by the bench thread itself (non-blocking), so
/// a latency sample needs no thread hand-off: in `spin` mode the reader busy-polls the pipe
/// and timestamps a line when the read that brought it returns.
pub(crate) struct Monitor {
    pub(crate) child: Child,
    pub(crate) out: std::process::ChildStdout,
    buf: Vec<u8>,
    /// What one read(2) brings.
    chunk: Box<[u8]>,
    /// Complete lines already read, with the time their bytes arrived.
    lines: std::collections::VecDeque<(Instant, String)>,
}

impl Monitor {
    pub(crate) fn spawn(mut cmd: Command) -> Result<Monitor> {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::null())
            .stdin(Stdio::null());
        let mut child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let out = child.stdout.take().context("stdout")?;
        let fd = out.as_raw_fd();
        // SAFETY: fcntl on a pipe fd we own.
        unsafe {
            let fl = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK);
            // A big pipe, so the monitor never waits for the bench between samples.
            libc::fcntl(fd, libc::F_SETPIPE_SZ, 1 << 20);
        }
        Ok(Monitor {
            child,
            out,
            buf: Vec::with_capacity(1 << 20),
            chunk: vec![0; 1 << 16].into_boxed_slice(),
            lines: Default::default(),
        })
    }

    pub(crate) fn fsmon(bin: &Path, hosts: &[&str]) -> Result<Monitor> {
        let mut c = Command::new(bin);
        c.arg("run").arg("--state-dir").arg("/run/fsmon-bench");
        for h in hosts {
            c.args(["--docker-host", h]);
        }
        let mut m = Monitor::spawn(c)?;
        m.wait(Duration::from_secs(30), |l| {
            l.contains("\"kind\":\"ready\"")
        })?;
        Ok(m)
    }

    /// Reads what the pipe holds now into `lines`; false at EOF or when nothing was there.
    fn fill(&mut self) -> bool {
        let mut lines = std::mem::take(&mut self.lines);
        let got = self.read_lines(|t, l| {
            lines.push_back((t, String::from_utf8_lossy(l).into_owned()));
        });
        self.lines = lines;
        got
    }

    /// Reads what the pipe holds now and hands each complete line (newline included) to
    /// `f` with the time its bytes arrived, without copying it; false when nothing was
    /// there.
    pub(crate) fn read_lines(&mut self, mut f: impl FnMut(Instant, &[u8])) -> bool {
        use std::io::Read;
        let mut got = false;
        loop {
            let n = self.out.read(&mut self.chunk[..]).unwrap_or_default();
            if n == 0 {
                break;
            }
            self.buf.extend_from_slice(&self.chunk[..n]);
            got = true;
            let t = Instant::now();
            let mut from = 0;
            while let Some(i) = self.buf[from..].iter().position(|&b| b == b'\n') {
                f(t, &self.buf[from..from + i + 1]);
                from += i + 1;
            }
            self.buf.drain(..from);
        }
        got
    }

    /// Hands every line to `f` until `f` says it has seen enough (true), or nothing came for
    /// `quiet`.
    fn scan(&mut self, quiet: Duration, mut f: impl FnMut(Instant, &str) -> bool) {
        while let Some((t, l)) = self.lines.pop_front() {
            if f(t, &l) {
                return;
            }
        }
        let mut done = false;
        let mut last = Instant::now();
        while !done {
            let got = self.read_lines(|t, l| {
                if !done {
                    done = f(t, std::str::from_utf8(l).unwrap_or_default());
                }
            });
            if got {
                last = Instant::now();
            } else if last.elapsed() >= quiet
                || self.poll(Duration::from_millis(10)) == Ready::HungUp
            {
                return;
            }
        }
    }

    fn poll(&self, d: Duration) -> Ready {
        let mut pfd = libc::pollfd {
            fd: self.out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, d.as_millis().max(1) as i32) };
        if r <= 0 {
            Ready::No
        } else if pfd.revents & libc::POLLIN != 0 {
            Ready::Data
        } else {
            Ready::HungUp
        }
    }

    /// The next line, waiting until `deadline`: busy-polling the pipe when `spin`, else
    /// sleeping in poll(2).
    fn next_line(&mut self, deadline: Instant, spin: bool) -> Option<(Instant, String)> {
        loop {
            if let Some(l) = self.lines.pop_front() {
                return Some(l);
            }
            if self.fill() {
                continue;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            if spin {
                // Yield rather than hog the core: a monitor woken onto this core runs at
                // once instead of waiting for this thread's time slice to end.
                // SAFETY: no arguments, no memory.
                unsafe { libc::sched_yield() };
                continue;
            }
            let wait = deadline.duration_since(now).min(Duration::from_millis(100));
            if self.poll(wait) == Ready::HungUp {
                return None;
            }
        }
    }

    pub(crate) fn wait(
        &mut self,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Instant> {
        self.wait_spin(timeout, false, pred)
    }

    fn wait_spin(
        &mut self,
        timeout: Duration,
        spin: bool,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.next_line(deadline, spin) {
                Some((t, l)) if pred(&l) => return Ok(t),
                Some(_) => {}
                None => bail!("timed out waiting for the monitor"),
            }
        }
    }

    pub(crate) fn drain(&mut self, quiet: Duration) -> Vec<String> {
        let mut v = Vec::new();
        while let Some((_, l)) = self.next_line(Instant::now() + quiet, false) {
            v.push(l);
        }
        v
    }

    fn rss_kib(&self) -> u64 {
        rss_kib(self.child.id())
    }

    /// Stops the monitor (SIGSTOP) until [`Monitor::resume`].
    fn pause(&self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGSTOP) };
    }

    fn resume(&self) {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGCONT) };
    }

    pub(crate) fn stop(mut self) {
        // SAFETY: SIGTERM to our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The baseline: `inotifywait -r` on each container's upperdir, armed when the Docker
/// `start` event arrives (the "generic" algorithm of the research this project builds on).
struct Baseline {
    events: Child,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    out_rx: mpsc::Receiver<(Instant, String)>,
    /// The per-container inotifywait processes, ended by `stop`.
    watchers: std::sync::Arc<std::sync::Mutex<Vec<u32>>>,
}

impl Baseline {
    fn start(host: &str) -> Result<Baseline> {
        let mut events = Command::new("docker")
            .args([
                "-H",
                host,
                "events",
                "--filter",
                "type=container",
                "--filter",
                "event=start",
                "--format",
                "{{.ID}}",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let out = events.stdout.take().context("stdout")?;
        let (tx, rx) = mpsc::channel();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let host = host.to_owned();
        let stop2 = stop.clone();
        let watchers = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let watchers2 = watchers.clone();
        std::thread::spawn(move || {
            for id in BufReader::new(out).lines().map_while(Result::ok) {
                if stop2.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let Ok(o) = Command::new("docker")
                    .args([
                        "-H",
                        &host,
                        "inspect",
                        "-f",
                        "{{.GraphDriver.Data.UpperDir}}",
                        &id,
                    ])
                    .output()
                else {
                    continue;
                };
                let upper = String::from_utf8_lossy(&o.stdout).trim().to_owned();
                let Ok(mut w) = inotifywait_cmd(Path::new(&upper))
                    .stdout(Stdio::piped())
                    .stderr(Stdio::null())
                    .spawn()
                else {
                    continue;
                };
                if let Ok(mut v) = watchers2.lock() {
                    v.push(w.id());
                }
                let Some(wout) = w.stdout.take() else {
                    continue;
                };
                let tx = tx.clone();
                std::thread::spawn(move || {
                    for l in BufReader::new(wout).lines().map_while(Result::ok) {
                        let l = l.strip_prefix(&upper).unwrap_or(&l).to_owned();
                        if tx.send((Instant::now(), l)).is_err() {
                            break;
                        }
                    }
                    let _ = w.kill();
                    let _ = w.wait();
                });
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        Ok(Baseline {
            events,
            stop,
            out_rx: rx,
            watchers,
        })
    }

    fn stop(mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let _ = self.events.kill();
        let _ = self.events.wait();
        // inotifywait -m outlives the directory it watched: end each one.
        if let Ok(pids) = self.watchers.lock() {
            for &pid in pids.iter() {
                // SAFETY: SIGTERM to a child this bench started (its reader thread reaps it).
                unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            }
        }
    }
}

fn docker_run(host: &str, script: &str) -> Result<Duration> {
    let t = Instant::now();
    let st = Command::new("docker")
        .args([
            "-H",
            host,
            "run",
            "--rm",
            "--network",
            "none",
            "--label",
            "fsmon-test",
            TEST_IMAGE,
            "sh",
            "-c",
            script,
        ])
        .stdout(Stdio::null())
        .output()?;
    if !st.status.success() {
        bail!(
            "docker run failed on {host}: {}",
            String::from_utf8_lossy(&st.stderr).trim()
        );
    }
    Ok(t.elapsed())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `cargo xtask bench`.
pub fn bench(args: &BenchArgs) -> Result<()> {
    let out = match &args.report {
        Some(p) => p.clone(),
        None => crate::util::root().join("docs/benchmarks.md"),
    };
    let bin = ebpf::build_all()?;
    let started = engines::start_engines()?;
    let t0 = Instant::now();
    // While the engines run (their versions), at the start (the date).
    let meta = meta(args);
    let mut rep = run_all(&bin, args);
    if !args.keep_engines {
        started.iter().for_each(engines::stop);
    }
    rep.meta = meta;
    rep.meta.duration_s = t0.elapsed().as_secs_f64();
    rep.plots = crate::plots::write(&rep, &out);
    let md = crate::report::render(&rep);
    println!("{md}");
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, &md).with_context(|| format!("writing {}", out.display()))?;
    eprintln!("bench: report written to {}", out.display());
    if !rep.errors.is_empty() {
        bail!(
            "{} part(s) of the bench failed: {}",
            rep.errors.len(),
            rep.errors
                .iter()
                .map(|(p, _)| p.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    Ok(())
}

/// Runs the parts asked for; a part that fails is recorded in the report and the others
/// still run.
fn run_all(bin: &Path, args: &BenchArgs) -> Report {
    let z = args.sizes();
    eprintln!("bench: {z:?}");
    let mut rep = Report {
        seed: 0x5eed_f5a0,
        ..Report::default()
    };
    let want = |p: Part| args.only.is_empty() || args.only.contains(&p);
    let mut errors = Vec::new();
    let mut step = |part: &str, f: &mut dyn FnMut() -> Result<()>| {
        eprintln!("bench: {part}…");
        let t = Instant::now();
        if let Err(e) = f() {
            eprintln!("bench: {part} failed: {e:#}");
            errors.push((part.to_owned(), format!("{e:#}")));
        }
        eprintln!("bench: {part} took {:.0} s", t.elapsed().as_secs_f64());
    };
    if want(Part::Start) {
        for (label, host) in [("cgroup v1", V1_HOST), ("cgroup v2", V2_HOST)] {
            step(&format!("start latency, {label}"), &mut || {
                rep.start.push(start_latency(bin, label, host, z.runs)?);
                Ok(())
            });
        }
    }
    if want(Part::First) {
        step("first instructions", &mut || {
            rep.first = Some(first_instructions(bin, V1_HOST, z.first_runs)?);
            Ok(())
        });
    }
    if want(Part::Live) {
        step("live container", &mut || {
            rep.live = Some(live_container(bin, &z)?);
            Ok(())
        });
    }
    if want(Part::Storm) {
        step("storm", &mut || {
            rep.storm = Some(storm(bin, z.storm, z.idle_s)?);
            Ok(())
        });
    }
    if want(Part::Runtimes) {
        step("runtimes", &mut || {
            rep.runtimes = Some(runtimes(bin, z.runtime_runs)?);
            Ok(())
        });
    }
    if want(Part::Overhead) {
        step("overhead", &mut || {
            rep.overhead = Some(overhead::run(bin, &overhead::Cfg::new(args.quick))?);
            Ok(())
        });
    }
    if want(Part::Coverage) {
        step("coverage", &mut || {
            rep.coverage = Some(crate::coverage::coverage(bin, args.quick, rep.seed)?);
            Ok(())
        });
    }
    if want(Part::Fairness) {
        step("fairness", &mut || {
            rep.fairness = Some(crate::fairness::fairness(bin, args.quick)?);
            Ok(())
        });
    }
    rep.errors = errors;
    rep
}

/// What was run, and where: the command line, date, commit, kernel, CPU and engine versions.
fn meta(args: &BenchArgs) -> Meta {
    let cmd = |c: &str, a: &[&str]| -> String {
        Command::new(c)
            .args(a)
            .stderr(Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim()
                    .to_owned()
            })
            .unwrap_or_default()
    };
    let root = crate::util::root();
    let root = root.to_string_lossy();
    let mut commit = cmd("git", &["-C", &root, "rev-parse", "--short=12", "HEAD"]);
    if !cmd(
        "git",
        &["-C", &root, "status", "--porcelain", "--untracked-files=no"],
    )
    .is_empty()
    {
        commit += " (with uncommitted changes)";
    }
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split_once(':'))
        .map(|(_, m)| m.trim().to_owned())
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let docker = [V1_HOST, V2_HOST]
        .iter()
        .map(|h| {
            format!(
                "{} ({h})",
                cmd(
                    "docker",
                    &["-H", h, "version", "--format", "{{.Server.Version}}"]
                )
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let argv: Vec<String> = std::env::args().skip(1).collect();
    Meta {
        command: format!("cargo xtask {}", argv.join(" ")),
        quick: args.quick,
        date: cmd("date", &["-u", "+%Y-%m-%d %H:%M:%S"]),
        commit,
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_owned(),
        cpu: format!("{model} × {cores}"),
        hostname: hostname(),
        docker,
        containerd: cmd("containerd", &["--version"]),
        podman: cmd("podman", &["--version"]),
        inotifywait: cmd(
            "dpkg-query",
            &["-W", "-f", "inotify-tools ${Version}", "inotify-tools"],
        ),
        duration_s: 0.0,
    }
}

/// What each storm container does: files, a deep directory, 100 directories, then idles.
const STORM: &str = "touch /f0; mkdir -p /a/b/c; touch /a/b/c/f1; \
    i=0; while [ $i -lt 100 ]; do mkdir /dir$i; i=$((i+1)); done; touch /dir99/last; \
    exec sleep 100000";

/// CPU time (user + system) of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    // Fields after the command name (which may hold spaces): utime is the 12th, stime the 13th.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    get(11) + get(12)
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// The start storm: `n` containers, 4 at a time, over both engines, with fsmon running
/// under `RLIMIT_NOFILE` 1024:1024. Reports the time
/// from cgroup mkdir to armed (`arm_us`), fsmon's RSS and fds per container, and its idle
/// CPU with all of them running.
fn storm(bin: &Path, n: usize, idle_s: u64) -> Result<StormResult> {
    let mut c = Command::new(bin);
    c.arg("run").arg("--state-dir").arg("/run/fsmon-bench");
    for h in [V1_HOST, V2_HOST] {
        c.args(["--docker-host", h]);
    }
    // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
    unsafe {
        use std::os::unix::process::CommandExt as _;
        c.pre_exec(|| {
            // Harsher than systemd's default (1024:524288, which fsmon raises to 524288):
            // 1024 soft and hard, so every container must fit in 1024 descriptors.
            let lim = libc::rlimit {
                rlim_cur: 1024,
                rlim_max: 1024,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut m = Monitor::spawn(c)?;
    m.wait(Duration::from_secs(30), |l| {
        l.contains("\"kind\":\"ready\"")
    })?;
    let pid = m.child.id();
    let (rss0, fds0) = (rss_kib(pid), fd_count(pid));
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    let nofile = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .map(|l| {
            l.split_whitespace()
                .skip(3)
                .take(2)
                .collect::<Vec<_>>()
                .join(":")
        })
        .unwrap_or_default();
    let hosts = [V1_HOST, V2_HOST];
    let tag = format!("fsmon-storm-{}", std::process::id());
    let t0 = Instant::now();
    let mut ids: Vec<(&str, String)> = Vec::new();
    let mut failed = 0;
    let mut i = 0;
    let mut rss_trace = vec![(0, rss0)];
    while i < n {
        let batch: Vec<_> = (i..(i + 4).min(n))
            .map(|k| {
                let host = hosts[k % 2];
                let name = format!("{tag}-{k}");
                let h = std::thread::spawn(move || {
                    Command::new("docker")
                        .args([
                            "-H",
                            host,
                            "run",
                            "-d",
                            "--network",
                            "none",
                            "--label",
                            "fsmon-test",
                            "--name",
                            &name,
                            TEST_IMAGE,
                            "sh",
                            "-c",
                            STORM,
                        ])
                        .output()
                });
                (host, h)
            })
            .collect();
        for (host, h) in batch {
            match h
                .join()
                .map_err(|_| anyhow::anyhow!("docker thread panicked"))?
            {
                Ok(o) if o.status.success() => {
                    ids.push((host, String::from_utf8_lossy(&o.stdout).trim().to_owned()))
                }
                Ok(o) => {
                    failed += 1;
                    eprintln!(
                        "storm: docker run failed: {}",
                        String::from_utf8_lossy(&o.stderr).trim()
                    );
                }
                Err(e) => {
                    failed += 1;
                    eprintln!("storm: docker run failed: {e}");
                }
            }
        }
        // Keep the pipe drained while the storm goes on.
        m.fill();
        i += 4;
        rss_trace.push((ids.len(), rss_kib(pid)));
    }
    let started_in = t0.elapsed();
    // Every container armed and its last first-instruction path reported.
    let want: HashSet<&str> = ids.iter().map(|(_, id)| id.as_str()).collect();
    let host_of: std::collections::HashMap<&str, &str> =
        ids.iter().map(|(h, id)| (id.as_str(), *h)).collect();
    let mut arm_us = Vec::new();
    let mut arm_us_v1 = Vec::new();
    let mut arm_us_v2 = Vec::new();
    let mut last_seen = HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while (arm_us.len() < want.len() || last_seen.len() < want.len()) && Instant::now() < deadline {
        let Some((_, l)) = m.next_line(Instant::now() + Duration::from_secs(1), false) else {
            continue;
        };
        let Ok(v) = serde_json::from_str::<Value>(&l) else {
            continue;
        };
        let Some(id) = v["container"]["id"].as_str().filter(|id| want.contains(id)) else {
            continue;
        };
        match v["kind"].as_str() {
            Some("container_start") => {
                let us = v["arm_us"].as_f64().unwrap_or(f64::NAN);
                arm_us.push(us);
                if host_of.get(id) == Some(&V1_HOST) {
                    arm_us_v1.push(us);
                } else {
                    arm_us_v2.push(us);
                }
            }
            Some("create") if v["path"] == "/dir99/last" => {
                last_seen.insert(id.to_owned());
            }
            Some("overflow") => eprintln!("storm: {l}"),
            _ => {}
        }
    }
    // Idle: every container sleeping; fsmon's CPU over `idle_s`.
    let (rss1, fds1) = (rss_kib(pid), fd_count(pid));
    // The last point: every container armed.
    match rss_trace.last_mut() {
        Some(last) if last.0 == ids.len() => last.1 = rss1,
        _ => rss_trace.push((ids.len(), rss1)),
    }
    let cpu0 = cpu_ticks(pid);
    let idle_from = Instant::now();
    std::thread::sleep(Duration::from_secs(idle_s));
    m.fill();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let idle_cpu = (cpu_ticks(pid) - cpu0) as f64 / hz / idle_from.elapsed().as_secs_f64();
    // On the cgroup v1 engine the clock starts at the container's first (freezer) cgroup
    // and arming happens at its v2 cgroup, which runc makes last: runc's own time between
    // the two is in those numbers.
    let res = StormResult {
        n,
        nofile,
        started_s: started_in.as_secs_f64(),
        failed,
        launched: ids.len(),
        armed: arm_us.len(),
        reported: last_seen.len(),
        arm_v1_us: arm_us_v1,
        arm_v2_us: arm_us_v2,
        rss0_kib: rss0,
        rss1_kib: rss1,
        fds0,
        fds1,
        idle_cpu_pct: idle_cpu * 100.0,
        rss_trace,
    };
    // Clean-up, a batch per engine.
    for host in hosts {
        let mine: Vec<&str> = ids
            .iter()
            .filter(|(h, _)| *h == host)
            .map(|(_, id)| id.as_str())
            .collect();
        for chunk in mine.chunks(50) {
            let _ = Command::new("docker")
                .args(["-H", host, "rm", "-f"])
                .args(chunk)
                .output();
            m.fill();
        }
    }
    m.stop();
    Ok(res)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// One timed `docker run`; a failed start is counted (and said), not fatal to the bench.
fn sample(host: &str, into: &mut Vec<f64>, failed: &mut usize, mode: &str) {
    match docker_run(host, "true") {
        Ok(d) => into.push(ms(d)),
        Err(e) => {
            *failed += 1;
            eprintln!("bench: {mode}: {e:#}");
        }
    }
}

fn start_latency(bin: &Path, label: &str, host: &str, runs: usize) -> Result<StartResult> {
    let block = runs.clamp(1, 5);
    let (mut off, mut on, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let mut failed = [0usize; 3];
    let mut freeze = Vec::new();
    for _ in 0..3 {
        docker_run(host, "true")?; // warm the engine's caches
    }
    for _ in 0..runs.div_ceil(block) {
        for _ in 0..block {
            sample(host, &mut off, &mut failed[0], "no monitor");
        }
        let mut m = Monitor::fsmon(bin, &[host])?;
        for _ in 0..block {
            sample(host, &mut on, &mut failed[1], "fsmon");
        }
        for l in m.drain(Duration::from_millis(200)) {
            if let Ok(v) = serde_json::from_str::<Value>(&l) {
                if v["kind"] == "container_start" {
                    if let Some(us) = v["freeze_us"].as_f64() {
                        freeze.push(us);
                    }
                }
            }
        }
        m.stop();
        let b = Baseline::start(host)?;
        for _ in 0..block {
            sample(host, &mut base, &mut failed[2], "baseline");
        }
        b.stop();
    }
    Ok(StartResult {
        label: label.to_owned(),
        off,
        fsmon: on,
        base,
        failed,
        freeze_us: freeze,
    })
}

fn first_instructions(bin: &Path, host: &str, runs: usize) -> Result<FirstResult> {
    let mut m = Monitor::fsmon(bin, &[host])?;
    for _ in 0..runs {
        docker_run(host, FIRST)?;
    }
    let lines = m.drain(Duration::from_secs(2));
    // The same with fsmon stopped as each container starts: the exec gate holds its first
    // exec until fsmon, resumed, has armed it.
    let stalled_runs = runs.clamp(2, 10);
    for _ in 0..stalled_runs {
        m.pause();
        let h = host.to_owned();
        let run = std::thread::spawn(move || docker_run(&h, FIRST));
        std::thread::sleep(Duration::from_millis(300));
        m.resume();
        run.join()
            .map_err(|_| anyhow::anyhow!("docker run thread panicked"))??;
    }
    let stalled_lines = m.drain(Duration::from_secs(2));
    m.stop();
    let paths_seen = |lines: &[String]| {
        let (mut seen, mut gone, mut gated) = (0, 0, Vec::new());
        let mut cur: HashSet<String> = HashSet::new();
        for l in lines {
            let Ok(v) = serde_json::from_str::<Value>(l) else {
                continue;
            };
            match v["kind"].as_str() {
                Some("container_start") => {
                    cur.clear();
                    if let Some(us) = v["gated_us"].as_f64() {
                        gated.push(us);
                    }
                }
                Some("create") => {
                    if let Some(p) = v["path"].as_str() {
                        cur.insert(p.to_owned());
                    }
                }
                Some("container_stop") => {
                    seen += FIRST_PATHS.iter().filter(|p| cur.contains(**p)).count();
                    gone += usize::from(cur.contains(GONE));
                }
                _ => {}
            }
        }
        (seen, gone, gated)
    };
    let (stalled_seen, _, gated_us) = paths_seen(&stalled_lines);
    let (seen, gone_fsmon, _) = paths_seen(&lines);
    let b = Baseline::start(host)?;
    for _ in 0..runs {
        docker_run(host, FIRST)?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let mut bl = Vec::new();
    while let Ok((_, l)) = b.out_rx.try_recv() {
        bl.push(l);
    }
    b.stop();
    let creates: Vec<&String> = bl.iter().filter(|l| l.contains("CREATE")).collect();
    let base_seen = creates
        .iter()
        .filter(|l| FIRST_PATHS.iter().any(|p| l.starts_with(&format!("{p} "))))
        .count();
    let gone_base = creates
        .iter()
        .filter(|l| l.starts_with(&format!("{GONE} ")))
        .count();
    Ok(FirstResult {
        script: FIRST.to_owned(),
        runs,
        paths: FIRST_PATHS.len(),
        fsmon_seen: seen,
        base_seen,
        gone: GONE.to_owned(),
        gone_fsmon,
        gone_base,
        stalled_runs,
        stalled_seen,
        gated_us,
    })
}

/// A long-running container on the cgroup v1 engine, whose merged view the host can write.
pub(crate) struct Live {
    pub(crate) id: String,
    pub(crate) merged: PathBuf,
    pub(crate) upper: PathBuf,
}

impl Live {
    pub(crate) fn start() -> Result<Live> {
        let out = Command::new("docker")
            .args([
                "-H",
                V1_HOST,
                "run",
                "-d",
                "--network",
                "none",
                "--label",
                "fsmon-test",
                TEST_IMAGE,
                "sleep",
                "100000",
            ])
            .output()?;
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if id.len() != 64 {
            bail!(
                "docker run -d failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let get = |f: &str| -> Result<PathBuf> {
            let o = Command::new("docker")
                .args(["-H", V1_HOST, "inspect", "-f", f, &id])
                .output()?;
            Ok(PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
        };
        let merged = get("{{.GraphDriver.Data.MergedDir}}")?;
        let upper = get("{{.GraphDriver.Data.UpperDir}}")?;
        Ok(Live { id, merged, upper })
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["-H", V1_HOST, "rm", "-f", &self.id])
            .stdout(Stdio::null())
            .status();
    }
}

/// The baseline's command: `inotifywait -r` on `dir` with the change events only (the same
/// event set fsmon watches), one line per event.
fn inotifywait_cmd(dir: &Path) -> Command {
    let mut c = Command::new("inotifywait");
    c.args([
        "-r",
        "-m",
        "-q",
        "-e",
        "create,modify,attrib,delete,move,close_write",
        "--format",
        "%w%f %e",
    ])
    .arg(dir);
    c
}

pub(crate) fn inotifywait_on(upper: &Path) -> Result<Monitor> {
    let m = Monitor::spawn(inotifywait_cmd(upper))?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(m)
}

/// Files in a running container's layer, one per latency sample (a file's first write of
/// a burst is the one a monitor reports).
struct LatencyFiles {
    tag: &'static str,
    files: Vec<std::fs::File>,
    next: usize,
    /// Write → record, µs.
    samples: Vec<f64>,
}

impl LatencyFiles {
    fn new(live: &Live, tag: &'static str, n: usize) -> Result<LatencyFiles> {
        let dir = live.merged.join(format!("lat-{tag}"));
        std::fs::create_dir_all(&dir)?;
        let files = (0..n)
            .map(|i| std::fs::File::create(dir.join(format!("f{i}"))))
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(LatencyFiles {
            tag,
            files,
            next: 0,
            samples: Vec::with_capacity(n),
        })
    }

    /// Up to `n` samples against `m`: a 1-byte write(2) (cheap, unlike overlayfs' create
    /// path) → its record read from the monitor's stdout by this thread, busy-polling the
    /// pipe; each waited for before the next.
    fn run(&mut self, m: &mut Monitor, fsmon: bool, n: usize) -> Result<()> {
        use std::io::Write;
        let tag = self.tag;
        for _ in 0..n {
            let i = self.next;
            let Some(f) = self.files.get_mut(i) else {
                return Ok(());
            };
            self.next += 1;
            let needle = if fsmon {
                format!("\"path\":\"/lat-{tag}/f{i}\"")
            } else {
                format!("/lat-{tag}/f{i} MODIFY")
            };
            let t0 = Instant::now();
            f.write_all(b"x")?;
            let t1 = m.wait_spin(Duration::from_secs(5), true, |l| {
                l.contains(&needle) && (!fsmon || l.contains("\"kind\":\"modify\""))
            })?;
            self.samples
                .push(t1.saturating_duration_since(t0).as_secs_f64() * 1e6);
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

/// The floor under any monitor that sleeps until the kernel wakes it: the same samples as
/// [`LatencyFiles::run`], seen by a thread of this bench blocked in read(2) on its own
/// inotify watch of the upper directory, which passes each event on through a pipe
/// (nothing else).
struct Floor {
    files: LatencyFiles,
    ifd: i32,
    rd: i32,
    wr: i32,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Floor {
    fn new(live: &Live, n: usize) -> Result<Floor> {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let files = LatencyFiles::new(live, "floor", n)?;
        let upper = CString::new(live.upper.join("lat-floor").as_os_str().as_bytes())?;
        let mut p = [0i32; 2];
        // SAFETY: plain syscalls on fds this function owns; `p` has room for two fds.
        let (ifd, rd, wr) = unsafe {
            let ifd = libc::inotify_init1(libc::IN_CLOEXEC);
            if ifd < 0 || libc::inotify_add_watch(ifd, upper.as_ptr(), libc::IN_MODIFY) < 0 {
                bail!("inotify: {}", std::io::Error::last_os_error());
            }
            if libc::pipe2(p.as_mut_ptr(), libc::O_CLOEXEC) < 0 {
                bail!("pipe2: {}", std::io::Error::last_os_error());
            }
            libc::fcntl(p[0], libc::F_SETFL, libc::O_NONBLOCK);
            (ifd, p[0], p[1])
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: reads into a local buffer, writes one byte from it.
                unsafe {
                    if libc::read(ifd, buf.as_mut_ptr().cast(), buf.len()) <= 0 {
                        break;
                    }
                    libc::write(wr, buf.as_ptr().cast(), 1);
                }
            }
        });
        Ok(Floor {
            files,
            ifd,
            rd,
            wr,
            stop,
            reader: Some(reader),
        })
    }

    fn run(&mut self, n: usize) -> Result<()> {
        use std::io::Write;
        let mut b = [0u8; 64];
        for _ in 0..n {
            let Some(f) = self.files.files.get_mut(self.files.next) else {
                return Ok(());
            };
            self.files.next += 1;
            let t0 = Instant::now();
            f.write_all(b"x")?;
            // SAFETY: non-blocking read into a local buffer.
            while unsafe { libc::read(self.rd, b.as_mut_ptr().cast(), b.len()) } <= 0 {
                if t0.elapsed() > Duration::from_secs(5) {
                    bail!("the floor reader saw no event");
                }
                // SAFETY: no arguments, no memory.
                unsafe { libc::sched_yield() };
            }
            self.files.samples.push(t0.elapsed().as_secs_f64() * 1e6);
            std::thread::sleep(Duration::from_millis(2));
        }
        Ok(())
    }
}

impl Drop for Floor {
    fn drop(&mut self) {
        use std::io::Write;
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // One more event wakes the reader, which then sees `stop`.
        if let Some(f) = self.files.files.first_mut() {
            let _ = f.write_all(b"x");
        }
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
        // SAFETY: closing the fds made in `new`, after the thread using two of them ended.
        unsafe {
            libc::close(self.ifd);
            libc::close(self.rd);
            libc::close(self.wr);
        }
    }
}

/// Drain throughput: the monitor is stopped (SIGSTOP) while `n` files are created, then
/// continued; the rate is how fast it reports all of them from then on, so the producer's
/// speed does not bound it. Each file is
/// two kernel events (IN_CREATE, IN_CLOSE_WRITE).
fn throughput(
    m: &mut Monitor,
    live: &Live,
    tag: &str,
    n: usize,
    fsmon: bool,
) -> Result<Throughput> {
    let dir = live.merged.join(format!("burst-{tag}"));
    std::fs::create_dir_all(&dir)?;
    std::thread::sleep(Duration::from_millis(300));
    m.drain(Duration::from_millis(100));
    m.pause();
    for i in 0..n {
        std::fs::File::create(dir.join(format!("f{i}")))?;
    }
    let t0 = Instant::now();
    m.resume();
    let needle = format!("/burst-{tag}/f");
    let (mut seen, mut last, mut overflow) = (0usize, t0, false);
    m.scan(Duration::from_secs(3), |t, l| {
        let create = if fsmon {
            l.contains("\"kind\":\"create\"")
        } else {
            l.ends_with(" CREATE\n")
        };
        if l.contains("\"kind\":\"overflow\"") || l.contains("Q_OVERFLOW") {
            overflow = true;
        } else if create && l.contains(&needle) {
            seen += 1;
            last = t;
        }
        seen >= n
    });
    let secs = last.saturating_duration_since(t0).as_secs_f64().max(1e-9);
    Ok(Throughput {
        records_per_s: seen as f64 / secs,
        seen,
        overflow,
    })
}

fn live_container(bin: &Path, z: &Sizes) -> Result<LiveResult> {
    // Room in the kernel queue for the whole burst (both monitors' instances are made
    // after this; the old value is put back at the end).
    let _queue = Sysctl::set("fs/inotify/max_queued_events", (z.burst * 4).max(16384))?;
    // fsmon first, so it arms the container at its start.
    let mut m = Monitor::fsmon(bin, &[V1_HOST])?;
    let idle_rss = m.rss_kib();
    let live = Live::start()?;
    m.wait(Duration::from_secs(10), |l| {
        l.contains("container_start") && l.contains(&live.id)
    })?;
    let (resolve_disk_us, resolve_api_us) = resolve_cost(&live)?;
    let mut b = inotifywait_on(&live.upper)?;
    // Each monitor is measured alone: the other one (which watches the same tree) is
    // stopped meanwhile, so that the two do not compete for the cores. The three take
    // turns in blocks, so that a noisy moment of the host hits them alike.
    let n = z.latency_samples;
    let mut fsmon_files = LatencyFiles::new(&live, "fsmon", n)?;
    let mut base_files = LatencyFiles::new(&live, "base", n)?;
    let mut floor = Floor::new(&live, n)?;
    std::thread::sleep(Duration::from_millis(500));
    const TURN: usize = 25;
    for _ in 0..n.div_ceil(TURN) {
        m.drain(Duration::from_millis(20));
        b.pause();
        fsmon_files.run(&mut m, true, TURN)?;
        b.resume();
        b.drain(Duration::from_millis(20));
        m.pause();
        base_files.run(&mut b, false, TURN)?;
        b.pause();
        floor.run(TURN)?;
        b.resume();
        m.resume();
    }
    let fsmon_us = std::mem::take(&mut fsmon_files.samples);
    let base_us = std::mem::take(&mut base_files.samples);
    let floor_us = std::mem::take(&mut floor.files.samples);
    drop(floor);
    b.drain(Duration::from_millis(300));
    m.drain(Duration::from_millis(300));

    // `mkdir -p` + an immediate write in the new deepest directory, each monitor alone.
    b.pause();
    let race_fsmon = mkdir_race(&mut m, &live, "fsmon", z.race, true)?;
    b.resume();
    b.drain(Duration::from_millis(500));
    m.pause();
    let race_base = mkdir_race(&mut b, &live, "base", z.race, false)?;
    m.resume();
    m.drain(Duration::from_millis(500));

    // Memory: `z.dirs` directories in the layer, each watched.
    let before = m.rss_kib();
    let dirs = live.merged.join("tenk");
    std::fs::create_dir_all(&dirs)?;
    for i in 0..z.dirs {
        std::fs::create_dir(dirs.join(format!("d{i}")))?;
    }
    let last = format!("\"path\":\"/tenk/d{}\"", z.dirs.saturating_sub(1));
    let _ = m.wait(Duration::from_secs(30), |l| l.contains(&last));
    m.drain(Duration::from_millis(500));
    let after = m.rss_kib();
    // Each burst is counted by its own monitor while the other one is stopped; the other
    // one catches up afterwards (the queue limit above leaves room for it).
    b.pause();
    let fsmon_tp = throughput(&mut m, &live, "fsmon", z.burst, true)?;
    b.resume();
    b.drain(Duration::from_millis(1000));
    m.pause();
    let base_tp = throughput(&mut b, &live, "base", z.burst, false)?;
    m.resume();
    m.drain(Duration::from_millis(1000));
    b.stop();
    m.stop();
    Ok(LiveResult {
        fsmon_us,
        base_us,
        floor_us,
        resolve_disk_us,
        resolve_api_us,
        rss_idle_kib: idle_rss,
        rss_before_kib: before,
        rss_after_kib: after,
        dirs: z.dirs,
        burst: z.burst,
        fsmon_tp,
        base_tp,
        race: z.race,
        race_fsmon,
        race_base,
    })
}

/// `n` times: `mkdir -p race-TAG/i/a/b/c` and at once a file `f` in `c`, in a running
/// container's layer; how many of the `n` files `m` reports (the baseline must watch each new
/// directory before its entries appear, and loses the race).
fn mkdir_race(m: &mut Monitor, live: &Live, tag: &str, n: usize, fsmon: bool) -> Result<usize> {
    m.drain(Duration::from_millis(50));
    for i in 0..n {
        let d = live.merged.join(format!("race-{tag}/{i}/a/b/c"));
        std::fs::create_dir_all(&d)?;
        std::fs::write(d.join("f"), b"x")?;
    }
    let prefix = format!("/race-{tag}/");
    let mut seen = HashSet::new();
    m.scan(Duration::from_secs(2), |_, l| {
        let create = if fsmon {
            l.contains("\"kind\":\"create\"") && l.contains("/a/b/c/f\"")
        } else {
            l.contains("/a/b/c/f CREATE")
        };
        if create {
            if let Some(i) = l
                .split_once(&prefix)
                .and_then(|(_, rest)| rest.split('/').next())
                .and_then(|i| i.parse::<usize>().ok())
            {
                seen.insert(i);
            }
        }
        seen.len() >= n
    });
    Ok(seen.len())
}

/// Upperdir resolution: overlay2's on-disk metadata (what fsmon reads while a container is
/// frozen) against the engine's inspect API (the fallback), per lookup.
fn resolve_cost(live: &Live) -> Result<(f64, f64)> {
    use std::io::{Read, Write};
    let root = PathBuf::from("/var/lib/docker");
    let n = 2000;
    let t = Instant::now();
    for _ in 0..n {
        let mount = std::fs::read_to_string(
            root.join("image/overlay2/layerdb/mounts")
                .join(&live.id)
                .join("mount-id"),
        )?;
        let layer = root.join("overlay2").join(mount.trim());
        let lower = std::fs::read_to_string(layer.join("lower"))?;
        for short in lower.trim().split(':') {
            std::fs::read_link(root.join("overlay2").join(short))?;
        }
        if !layer.join("diff").is_dir() {
            bail!("no diff dir");
        }
    }
    let disk_us = t.elapsed().as_secs_f64() * 1e6 / n as f64;
    let m = 200;
    let t = Instant::now();
    for _ in 0..m {
        let mut s = std::os::unix::net::UnixStream::connect("/var/run/docker.sock")?;
        write!(
            s,
            "GET /containers/{}/json HTTP/1.0\r\nHost: docker\r\n\r\n",
            live.id
        )?;
        let mut body = Vec::new();
        s.read_to_end(&mut body)?;
        if !body.windows(8).any(|w| w == b"UpperDir") {
            bail!("inspect answer without UpperDir");
        }
    }
    let api_us = t.elapsed().as_secs_f64() * 1e6 / m as f64;
    Ok((disk_us, api_us))
}

/// Sets a sysctl and restores it on drop.
struct Sysctl {
    path: PathBuf,
    old: String,
}

impl Sysctl {
    fn set(name: &str, value: usize) -> Result<Sysctl> {
        let path = Path::new("/proc/sys").join(name);
        let old = std::fs::read_to_string(&path)?;
        std::fs::write(&path, value.to_string())?;
        Ok(Sysctl { path, old })
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(&self.path, self.old.trim());
    }
}

/// Per runtime: what resolving a container's upperdir costs, by method (`fsmon resolve`,
/// the daemon's own code), and the time from a container's cgroup appearing to its watch
/// being armed (`arm_us` of `container_start`) for containers started while fsmon runs.
fn runtimes(bin: &Path, runs: usize) -> Result<RuntimesResult> {
    use engines::{CONTAINERD_SOCK, CONTAINERD_STATE, CTR_IMAGE, PODMAN_IMAGE};
    let ctr = |args: &[&str]| {
        Command::new("ctr")
            .args(["-a", CONTAINERD_SOCK, "-n", "default"])
            .args(args)
            .output()
    };
    let podman_run = |mode: &str, name: &str, cmd: &[&str]| {
        Command::new("podman")
            .args([
                "run",
                mode,
                "--name",
                name,
                "--label",
                "fsmon-test",
                "--network",
                "none",
            ])
            .args([
                "--ulimit",
                "nofile=1024:1024",
                "--ulimit",
                "nproc=1024:1024",
                PODMAN_IMAGE,
            ])
            .args(cmd)
            .output()
    };
    let tag = std::process::id();
    // One running container per runtime, for the resolution cost.
    let docker_id = docker_test_run(&["sleep", "1000"])?;
    let ctr_id = hex_id(tag, 0);
    ctr(&[
        "run",
        "-d",
        "--label",
        "fsmon-test=1",
        CTR_IMAGE,
        &ctr_id,
        "sleep",
        "1000",
    ])?;
    let podman_name = format!("fsmon-bench-{tag}");
    let podman_id =
        String::from_utf8_lossy(&podman_run("-d", &podman_name, &["sleep", "1000"])?.stdout)
            .trim()
            .to_owned();
    let out = Command::new(bin)
        .args([
            "resolve",
            "--repeat",
            "1000",
            "--containerd-state",
            CONTAINERD_STATE,
        ])
        .arg(format!("/docker/{docker_id}"))
        .arg(format!("/default/{ctr_id}"))
        .arg(format!("/libpod_parent/libpod-{podman_id}"))
        .output()?;
    let mut resolve = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line)?;
        if let Some(e) = v.get("error") {
            bail!("fsmon resolve {}: {e}", v["cgroup"]);
        }
        for (method, c) in v["cost"].as_object().into_iter().flatten() {
            resolve.push(ResolveRow {
                runtime: v["runtime"].as_str().unwrap_or("?").to_owned(),
                how: v["how"].as_str().unwrap_or("?").to_owned(),
                method: method.clone(),
                median_us: c["median_us"].as_f64().unwrap_or(f64::NAN),
                min_us: c["min_us"].as_f64().unwrap_or(f64::NAN),
            });
        }
    }
    let _ = docker_out(V1_HOST, &["rm", "-f", &docker_id]);
    let _ = ctr(&["tasks", "kill", "-s", "SIGKILL", &ctr_id]);
    let _ = Command::new("podman")
        .args(["rm", "-f", "-t", "0", &podman_name])
        .output();
    std::thread::sleep(Duration::from_millis(500));
    let _ = ctr(&["tasks", "delete", "-f", &ctr_id]);
    let _ = ctr(&["containers", "delete", &ctr_id]);

    // Cgroup mkdir → armed, per runtime, `runs` containers each, started one at a time.
    let mut c = Command::new(bin);
    c.args([
        "run",
        "--state-dir",
        "/run/fsmon-bench",
        "--docker-host",
        V1_HOST,
    ])
    .args(["--containerd-state", CONTAINERD_STATE]);
    let mut m = Monitor::spawn(c)?;
    m.wait(Duration::from_secs(30), |l| {
        l.contains("\"kind\":\"ready\"")
    })?;
    let mut ids: Vec<(&str, String)> = Vec::new();
    for i in 0..runs {
        let id = docker_test_run(&["true"])?;
        ids.push(("docker", id));
        let id = hex_id(tag, i + 1);
        ctr(&["run", "--rm", CTR_IMAGE, &id, "true"])?;
        ids.push(("containerd", id));
        let name = format!("fsmon-bench-{tag}-{i}");
        let out = podman_run("-d", &name, &["true"])?;
        ids.push((
            "podman",
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        ));
    }
    let mut arm: std::collections::HashMap<String, u64> = std::collections::HashMap::new();
    m.scan(Duration::from_secs(2), |_, l| {
        if let Ok(v) = serde_json::from_str::<Value>(l) {
            if v["kind"] == "container_start" {
                if let (Some(id), Some(us)) = (v["container"]["id"].as_str(), v["arm_us"].as_u64())
                {
                    arm.insert(id.to_owned(), us);
                }
            }
        }
        false
    });
    m.stop();
    let arm_us = ["docker", "containerd", "podman"]
        .into_iter()
        .map(|runtime| {
            let v: Vec<f64> = ids
                .iter()
                .filter(|(r, _)| *r == runtime)
                .filter_map(|(_, id)| arm.get(id).map(|&us| us as f64))
                .collect();
            (runtime.to_owned(), v)
        })
        .collect();
    for (runtime, id) in &ids {
        match *runtime {
            "docker" => drop(docker_out(V1_HOST, &["rm", "-f", id])),
            "podman" => drop(
                Command::new("podman")
                    .args(["rm", "-f", "-t", "0", id])
                    .output(),
            ),
            _ => {}
        }
    }
    Ok(RuntimesResult {
        runs,
        resolve,
        arm_us,
    })
}

/// A 64-hex container id for ctr, unique to this bench run.
fn hex_id(tag: u32, i: usize) -> String {
    format!(
        "{:016x}{:048x}",
        0xfee1_0000_0000_0000u64 | u64::from(tag),
        i
    )
}

/// `docker run -d` of the test image on the cgroup v1 engine; its id.
fn docker_test_run(cmd: &[&str]) -> Result<String> {
    let mut args = vec![
        "run",
        "-d",
        "--network",
        "none",
        "--label",
        "fsmon-test",
        TEST_IMAGE,
    ];
    args.extend_from_slice(cmd);
    docker_out(V1_HOST, &args)
}

/// `docker -H host args…`; trimmed stdout.
fn docker_out(host: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .args(["-H", host])
        .args(args)
        .output()?;
    if !out.status.success() {
        bail!(
            "docker {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    #[derive(clap::Parser)]
    struct W {
        #[command(flatten)]
        a: BenchArgs,
    }

    fn args(v: &[&str]) -> BenchArgs {
        W::parse_from(std::iter::once("bench").chain(v.iter().copied())).a
    }

    #[test]
    fn full_sizes_by_default() {
        let z = args(&[]).sizes();
        assert_eq!(
            (z.runs, z.latency_samples, z.burst, z.storm),
            (40, 1000, 100_000, 500)
        );
        assert_eq!(
            (z.first_runs, z.dirs, z.idle_s, z.runtime_runs),
            (20, 10_000, 10, 40)
        );
    }

    #[test]
    fn quick_is_small_and_options_still_win() {
        let a = args(&["--quick", "--report", "/tmp/q.md"]);
        assert_eq!(a.report.as_deref(), Some(Path::new("/tmp/q.md")));
        let z = a.sizes();
        assert_eq!(
            (z.runs, z.latency_samples, z.burst, z.storm),
            (5, 100, 5000, 12)
        );
        assert_eq!(
            (z.first_runs, z.dirs, z.idle_s, z.runtime_runs),
            (5, 1000, 3, 3)
        );
        let z = args(&["--quick", "--runs", "8"]).sizes();
        assert_eq!((z.runs, z.runtime_runs), (8, 8));
    }
}
