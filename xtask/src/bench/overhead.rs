//! `cargo xtask bench --only overhead`: workload overhead (experiment 4 of issue 13, the
//! paper's Figs. 13–15). `sysbench` runs inside a container on the cgroup v1 engine whose
//! writable layer holds 0, 100, 200, 300 directories, unmonitored, under fsmon (armed at
//! the container's start) and under the baseline (`inotifywait -r` on its upperdir); the
//! score of each workload (CPU, memory read and write, file sequential write and read in
//! the container's layer) is compared with the unmonitored one.
//!
//! One container per (repetition, mode): the modes take turns in a rotating order per
//! repetition, so a slow or busy moment of the host hits them alike. In each container the
//! directories are added in steps (0 → 100 → 200 → 300), each step watched by the monitor
//! before the workloads run. This file holds the part's run, its result, its report section
//! and its plot, so that the shared files only carry hooks.

use std::{
    fmt::Write as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{anyhow, bail, Context, Result};
use plotters::prelude::*;

use super::{inotifywait_cmd, Monitor};
use crate::{
    engines::{TEST_IMAGE, V1_HOST},
    stats::{bootstrap_ci2, median, pct, Ci, Rng, RESAMPLES},
};

/// The image with sysbench (and the test image's busybox), built locally.
pub const SYSBENCH_IMAGE: &str = "fsmon-sysbench:1";

/// The paper's overheads (Figs. 13–15), %.
pub mod paper {
    pub const CPU: &str = "< 0.55 %";
    pub const MEMORY: &str = "~0.002 %";
    pub const DISK: &str = "~0.3 %";
}

/// A sysbench workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    Cpu,
    MemRead,
    MemWrite,
    SeqWrite,
    SeqRead,
}

impl Workload {
    pub const ALL: [Workload; 5] = [
        Workload::Cpu,
        Workload::MemRead,
        Workload::MemWrite,
        Workload::SeqWrite,
        Workload::SeqRead,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Workload::Cpu => "cpu",
            Workload::MemRead => "memory read",
            Workload::MemWrite => "memory write",
            Workload::SeqWrite => "fileio seq. write",
            Workload::SeqRead => "fileio seq. read",
        }
    }

    pub fn unit(self) -> &'static str {
        match self {
            Workload::Cpu => "events/s",
            _ => "MiB/s",
        }
    }

    pub fn paper(self) -> &'static str {
        match self {
            Workload::Cpu => paper::CPU,
            Workload::MemRead | Workload::MemWrite => paper::MEMORY,
            Workload::SeqWrite | Workload::SeqRead => paper::DISK,
        }
    }

    /// sysbench's arguments (before `run`), `time_s` seconds.
    fn args(self, time_s: u64) -> Vec<String> {
        let mut a: Vec<String> = match self {
            Workload::Cpu => vec!["cpu".into()],
            Workload::MemRead => vec!["memory".into(), "--memory-oper=read".into()],
            Workload::MemWrite => vec!["memory".into(), "--memory-oper=write".into()],
            Workload::SeqWrite | Workload::SeqRead => {
                let mut v = vec!["fileio".into()];
                v.extend(FILEIO.iter().map(|s| (*s).to_owned()));
                v.push(if self == Workload::SeqWrite {
                    "--file-test-mode=seqwr".into()
                } else {
                    "--file-test-mode=seqrd".into()
                });
                v
            }
        };
        a.push(format!("--time={time_s}"));
        a
    }

    /// The score in sysbench's output: events/s for cpu, MiB/s for the others.
    pub fn parse(self, out: &str) -> Option<f64> {
        let after = |key: &str| -> Option<f64> {
            out.lines()
                .find_map(|l| l.trim_start().strip_prefix(key))
                .and_then(|r| r.trim().parse::<f64>().ok())
        };
        match self {
            Workload::Cpu => after("events per second:"),
            // "7211.93 MiB transferred (7205.44 MiB/sec)"
            Workload::MemRead | Workload::MemWrite => out
                .lines()
                .find(|l| l.contains("MiB transferred ("))
                .and_then(|l| l.split_once('(')?.1.split_whitespace().next())
                .and_then(|v| v.parse().ok()),
            Workload::SeqWrite => after("written, MiB/s:"),
            Workload::SeqRead => after("read, MiB/s:"),
        }
    }
}

/// sysbench fileio's files: in the container's layer (`/sb`), prepared in the container.
/// No fsync during the run: the write path (where inotify hooks in) is measured, not the
/// disk's flush time.
const FILEIO: [&str; 4] = [
    "--file-num=4",
    "--file-total-size=128M",
    "--file-fsync-freq=0",
    "--file-fsync-end=off",
];

/// How the container is watched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Off,
    Fsmon,
    Base,
}

impl Mode {
    pub const ALL: [Mode; 3] = [Mode::Off, Mode::Fsmon, Mode::Base];

    pub fn label(self) -> &'static str {
        match self {
            Mode::Off => "unmonitored",
            Mode::Fsmon => "fsmon",
            Mode::Base => "inotifywait -r",
        }
    }
}

/// One sysbench score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sample {
    pub workload: Workload,
    pub mode: Mode,
    pub dirs: usize,
    pub rep: usize,
    pub score: f64,
    /// The run's wall time (`docker exec` included), s, and the monitor's CPU time
    /// (user + system) meanwhile, s (0 unmonitored).
    pub wall_s: f64,
    pub monitor_cpu_s: f64,
}

/// What the overhead part measured.
#[derive(Clone, Debug, Default)]
pub struct OverheadResult {
    /// Seconds per sysbench run.
    pub time_s: u64,
    pub reps: usize,
    pub dirs: Vec<usize>,
    pub samples: Vec<Sample>,
    /// Containers run under fsmon, and how many of them fsmon armed (`container_start`).
    pub fsmon_containers: usize,
    pub fsmon_armed: usize,
    /// Directory steps whose last directory the monitor reported before the workloads
    /// ran, of the steps with directories (fsmon, baseline).
    pub dirs_seen: [usize; 2],
    pub dir_steps: [usize; 2],
    /// Records (lines) read from each monitor during the workloads (fsmon, baseline).
    pub records: [usize; 2],
    /// Whether the baseline reported a queue overflow.
    pub base_overflow: bool,
    /// Wall time of the part, s.
    pub duration_s: f64,
}

/// The sizes of one run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cfg {
    pub time_s: u64,
    pub reps: usize,
    pub dirs: Vec<usize>,
}

impl Cfg {
    pub fn new(quick: bool) -> Cfg {
        if quick {
            Cfg {
                time_s: 1,
                reps: 2,
                dirs: vec![0, 100],
            }
        } else {
            Cfg {
                time_s: 1,
                reps: 5,
                dirs: vec![0, 100, 200, 300],
            }
        }
    }
}

/// The modes' order in repetition `rep`: rotated by one each repetition.
pub fn order(rep: usize) -> [Mode; 3] {
    let mut m = Mode::ALL;
    m.rotate_left(rep % 3);
    m
}

/// Overhead of `on` against `off` (scores, higher is better), %: `1 − median(on) /
/// median(off)`, with its bootstrap 95 % interval (each side resampled on its own).
pub fn overhead(off: &[f64], on: &[f64], rng: &mut Rng) -> (f64, Option<Ci>) {
    let stat = |a: &mut [f64], b: &mut [f64]| (1.0 - pct(b, 0.5) / pct(a, 0.5)) * 100.0;
    let point = if off.is_empty() || on.is_empty() {
        f64::NAN
    } else {
        (1.0 - median(on) / median(off)) * 100.0
    };
    (point, bootstrap_ci2(off, on, stat, RESAMPLES, 0.95, rng))
}

impl OverheadResult {
    /// The scores of `w` in mode `m`, at `dirs` directories (all counts when `None`).
    /// The monitor's CPU time over the runs' wall time in mode `m` for `w`, % of one core.
    pub fn monitor_cpu_pct(&self, w: Workload, m: Mode) -> f64 {
        let (cpu, wall) = self
            .samples
            .iter()
            .filter(|s| s.workload == w && s.mode == m)
            .fold((0.0, 0.0), |(c, t), s| (c + s.monitor_cpu_s, t + s.wall_s));
        if wall > 0.0 {
            cpu / wall * 100.0
        } else {
            f64::NAN
        }
    }

    pub fn scores(&self, w: Workload, m: Mode, dirs: Option<usize>) -> Vec<f64> {
        self.samples
            .iter()
            .filter(|s| s.workload == w && s.mode == m && dirs.is_none_or(|d| s.dirs == d))
            .map(|s| s.score)
            .collect()
    }
}

// ---------------------------------------------------------------------------------------
// The run.

/// `docker` on the cgroup v1 engine; trimmed stdout.
fn docker(args: &[&str]) -> Result<String> {
    super::docker_out(V1_HOST, args)
}

/// Builds [`SYSBENCH_IMAGE`] in the cgroup v1 engine when it is missing: the test image
/// plus the host's sysbench binary, every shared library `ldd` lists and the loader.
pub fn ensure_image() -> Result<()> {
    if crate::util::ok(Command::new("docker").args([
        "-H",
        V1_HOST,
        "image",
        "inspect",
        SYSBENCH_IMAGE,
    ])) {
        return Ok(());
    }
    crate::util::apt_install(&["sysbench"])?;
    let bin = crate::util::which("sysbench").context("sysbench not on PATH")?;
    let ldd = Command::new("ldd").arg(&bin).output().context("ldd")?;
    let dir = std::env::temp_dir().join(format!("fsmon-sysbench-{}", std::process::id()));
    let rootfs = dir.join("rootfs");
    let copy = |from: &Path| -> Result<()> {
        let to = rootfs.join(from.strip_prefix("/").unwrap_or(from));
        if let Some(p) = to.parent() {
            std::fs::create_dir_all(p)?;
        }
        // Follows symlinks: the file lands under the name the loader looks for.
        std::fs::copy(from, &to).with_context(|| format!("copy {}", from.display()))?;
        Ok(())
    };
    copy(Path::new("/usr/bin/sysbench"))?;
    for lib in ldd_paths(&String::from_utf8_lossy(&ldd.stdout)) {
        copy(Path::new(&lib))?;
    }
    std::fs::write(
        dir.join("Dockerfile"),
        format!("FROM {TEST_IMAGE}\nCOPY rootfs/ /\n"),
    )?;
    let out = Command::new("docker")
        .args(["-H", V1_HOST, "build", "-q", "-t", SYSBENCH_IMAGE])
        .arg(&dir)
        .env("DOCKER_BUILDKIT", "0")
        .output()?;
    let _ = std::fs::remove_dir_all(&dir);
    if !out.status.success() {
        bail!(
            "docker build of {SYSBENCH_IMAGE}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The files `ldd` lists: each `=> /path` and each loader line starting with `/`.
pub fn ldd_paths(out: &str) -> Vec<String> {
    out.lines()
        .filter_map(|l| {
            let l = l.trim();
            let p = match l.split_once("=>") {
                Some((_, r)) => r.split_whitespace().next()?,
                None => l.split_whitespace().next()?,
            };
            p.starts_with('/').then(|| p.to_owned())
        })
        .collect()
}

/// A running sysbench container.
struct Container {
    id: String,
    upper: String,
}

impl Container {
    fn start() -> Result<Container> {
        let id = docker(&[
            "run",
            "-d",
            "--network",
            "none",
            "--label",
            "fsmon-test",
            SYSBENCH_IMAGE,
            "sleep",
            "100000",
        ])?;
        let upper = docker(&["inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", &id])?;
        Ok(Container { id, upper })
    }

    /// `docker exec` of `sh -c script` in `/`, its stdout.
    fn sh(&self, script: &str) -> Result<std::process::Child> {
        Ok(Command::new("docker")
            .args(["-H", V1_HOST, "exec", &self.id, "sh", "-c", script])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?)
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = Command::new("docker")
            .args(["-H", V1_HOST, "rm", "-f", &self.id])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Counts what a monitor reports while a command runs.
#[derive(Default)]
struct Tally {
    records: usize,
    overflow: bool,
}

/// Waits for `child`, reading `m`'s pipe every 20 ms meanwhile (also when there is no
/// monitor, so every mode pays the same); its stdout.
fn wait_draining(
    mut child: std::process::Child,
    m: &mut Option<Monitor>,
    t: &mut Tally,
) -> Result<String> {
    use std::io::Read;
    let mut out = child.stdout.take().context("stdout")?;
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait()? {
            break st;
        }
        drain(m, t);
        std::thread::sleep(Duration::from_millis(20));
    };
    drain(m, t);
    let stdout = reader
        .join()
        .map_err(|_| anyhow!("reader thread panicked"))?;
    if !status.success() {
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        bail!(
            "docker exec failed ({status}): {} {}",
            err.trim(),
            stdout.trim()
        );
    }
    Ok(stdout)
}

fn drain(m: &mut Option<Monitor>, t: &mut Tally) {
    if let Some(m) = m {
        let _ = m.read_lines(|_, l| {
            t.records += 1;
            if l.windows(8).any(|w| w == b"overflow" || w == b"OVERFLOW") {
                t.overflow = true;
            }
        });
    }
}

/// The part: `cfg.reps` repetitions of the three modes, each in its own container.
pub fn run(bin: &Path, cfg: &Cfg) -> Result<OverheadResult> {
    let t0 = Instant::now();
    ensure_image()?;
    // Room for the baseline's events (the old value is put back at the end).
    let _queue = super::Sysctl::set("fs/inotify/max_queued_events", 1 << 20)?;
    let mut r = OverheadResult {
        time_s: cfg.time_s,
        reps: cfg.reps,
        dirs: cfg.dirs.clone(),
        ..Default::default()
    };
    for rep in 0..cfg.reps {
        for mode in order(rep) {
            eprintln!("bench: overhead: repetition {}, {}", rep + 1, mode.label());
            one_container(bin, cfg, rep, mode, &mut r)
                .with_context(|| format!("repetition {}, {}", rep + 1, mode.label()))?;
        }
    }
    r.duration_s = t0.elapsed().as_secs_f64();
    Ok(r)
}

fn one_container(
    bin: &Path,
    cfg: &Cfg,
    rep: usize,
    mode: Mode,
    r: &mut OverheadResult,
) -> Result<()> {
    // fsmon first, so that it arms the container at its start (and stopped last, also
    // when a step fails: the container, made after it, is removed before it).
    let mut m = Watched(if mode == Mode::Fsmon {
        Some(Monitor::fsmon(bin, &[V1_HOST])?)
    } else {
        None
    });
    let c = Container::start()?;
    if let Some(m) = m.as_mut() {
        r.fsmon_containers += 1;
        let id = c.id.clone();
        if m.wait(Duration::from_secs(10), |l| {
            l.contains("\"kind\":\"container_start\"") && l.contains(&id)
        })
        .is_ok()
        {
            r.fsmon_armed += 1;
        }
    }
    let mut t = Tally::default();
    let prep = format!(
        "mkdir -p /sb /w && cd /sb && sysbench fileio {} prepare",
        FILEIO.join(" ")
    );
    wait_draining(c.sh(&prep)?, &mut m, &mut t)?;
    if mode == Mode::Base {
        let mut b = Monitor::spawn(inotifywait_cmd(Path::new(&c.upper)))?;
        // inotifywait says when its watches are set up (on stderr, which Monitor drops):
        // give it the time `inotifywait_on` gives.
        std::thread::sleep(Duration::from_millis(500));
        b.drain(Duration::from_millis(50));
        *m = Some(b);
    }
    let mut made = 0;
    for &dirs in &cfg.dirs {
        if dirs > made {
            let script =
                format!("i={made}; while [ $i -lt {dirs} ]; do mkdir /w/d$i; i=$((i+1)); done");
            wait_draining(c.sh(&script)?, &mut None, &mut Tally::default())?;
            let k = usize::from(mode == Mode::Base);
            if let Some(m) = m.as_mut() {
                r.dir_steps[k] += 1;
                let last = format!("/w/d{}", dirs - 1);
                let seen = m.wait(Duration::from_secs(10), |l| {
                    if mode == Mode::Fsmon {
                        l.contains(&format!("\"path\":\"{last}\""))
                    } else {
                        l.contains(&format!("{last} CREATE"))
                    }
                });
                if seen.is_ok() {
                    r.dirs_seen[k] += 1;
                }
                m.drain(Duration::from_millis(100));
            }
            made = dirs;
        }
        t.records = 0;
        // SAFETY: sysconf has no preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        for w in Workload::ALL {
            let script = format!("cd /sb && sysbench {} run", w.args(cfg.time_s).join(" "));
            let ticks =
                |m: &Option<Monitor>| m.as_ref().map_or(0, |m| super::cpu_ticks(m.child.id()));
            let (c0, t0) = (ticks(&m), Instant::now());
            let out = wait_draining(c.sh(&script)?, &mut m, &mut t)?;
            let wall_s = t0.elapsed().as_secs_f64();
            let monitor_cpu_s = ticks(&m).saturating_sub(c0) as f64 / hz;
            let score = w
                .parse(&out)
                .filter(|s| *s > 0.0)
                .with_context(|| format!("no {} score in sysbench's output: {out}", w.label()))?;
            r.samples.push(Sample {
                workload: w,
                mode,
                dirs,
                rep,
                score,
                wall_s,
                monitor_cpu_s,
            });
        }
        match mode {
            Mode::Fsmon => r.records[0] += t.records,
            Mode::Base => r.records[1] += t.records,
            Mode::Off => {}
        }
    }
    r.base_overflow |= t.overflow && mode == Mode::Base;
    Ok(())
}

/// The monitor of one container, stopped when dropped.
struct Watched(Option<Monitor>);

impl std::ops::Deref for Watched {
    type Target = Option<Monitor>;
    fn deref(&self) -> &Option<Monitor> {
        &self.0
    }
}

impl std::ops::DerefMut for Watched {
    fn deref_mut(&mut self) -> &mut Option<Monitor> {
        &mut self.0
    }
}

impl Drop for Watched {
    fn drop(&mut self) {
        if let Some(m) = self.0.take() {
            m.stop();
        }
    }
}

// ---------------------------------------------------------------------------------------
// The report section.

/// The markdown section of the part.
pub fn section(o: &OverheadResult, seed: u64) -> String {
    let mut rng = Rng::new(seed ^ 0x0e4e_ad00);
    let mut s = format!(
        "\n## Workload overhead: sysbench in a monitored container (experiment 4)\n\n\
         sysbench 1.0 in a container on the cgroup v1 engine whose writable layer holds \
         {dirs} directories (made before each measurement, watched by the monitor), \
         unmonitored, under fsmon (armed at the container's start) and under the baseline \
         (`inotifywait -r` on its upperdir). {reps} repetitions; in each, one container per \
         mode, the modes in a rotating order; {t} s per sysbench run (1 thread); fileio: 4 \
         files, 128 MiB in the container's layer, no fsync. Overhead = 1 − median(mode) / \
         median(unmonitored), % (positive: slower), [bootstrap 95 % CI]. Part wall time \
         {dur:.0} s.\n\n\
         fsmon armed {armed} of {n} containers; the last directory of a step was reported \
         before the workloads ran in {fs} of {fn_} steps (fsmon) and {bs} of {bn} \
         (baseline); records read during the workloads: fsmon {rf}, baseline {rb}{ovf}.\n\n",
        dirs = o
            .dirs
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        reps = o.reps,
        t = o.time_s,
        dur = o.duration_s,
        armed = o.fsmon_armed,
        n = o.fsmon_containers,
        fs = o.dirs_seen[0],
        fn_ = o.dir_steps[0],
        bs = o.dirs_seen[1],
        bn = o.dir_steps[1],
        rf = o.records[0],
        rb = o.records[1],
        ovf = if o.base_overflow {
            " (the baseline's queue overflowed)"
        } else {
            ""
        },
    );
    s += "All directory counts pooled:\n\n\
          | workload | unit | unmonitored median | fsmon overhead % [95 % CI] | \
          baseline overhead % [95 % CI] | paper (fsmon's design) | monitor CPU, % of a \
          core: fsmon / baseline |\n\
          |---|---|---|---|---|---|---|\n";
    for w in Workload::ALL {
        let off = o.scores(w, Mode::Off, None);
        let (f, fci) = overhead(&off, &o.scores(w, Mode::Fsmon, None), &mut rng);
        let (b, bci) = overhead(&off, &o.scores(w, Mode::Base, None), &mut rng);
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} / {} |",
            w.label(),
            w.unit(),
            crate::report::num(median(&off), 1),
            with_ci(f, fci),
            with_ci(b, bci),
            w.paper(),
            crate::report::num(o.monitor_cpu_pct(w, Mode::Fsmon), 1),
            crate::report::num(o.monitor_cpu_pct(w, Mode::Base), 1),
        );
    }
    s += "\nPer directory count (medians of the scores; overhead % [95 % CI]):\n\n\
          | workload | dirs | unmonitored | fsmon | fsmon overhead % | baseline | \
          baseline overhead % |\n|---|---|---|---|---|---|---|\n";
    for w in Workload::ALL {
        for &d in &o.dirs {
            let off = o.scores(w, Mode::Off, Some(d));
            let on = o.scores(w, Mode::Fsmon, Some(d));
            let base = o.scores(w, Mode::Base, Some(d));
            let (f, fci) = overhead(&off, &on, &mut rng);
            let (b, bci) = overhead(&off, &base, &mut rng);
            let _ = writeln!(
                s,
                "| {} | {d} | {} | {} | {} | {} | {} |",
                w.label(),
                crate::report::num(median(&off), 1),
                crate::report::num(median(&on), 1),
                with_ci(f, fci),
                crate::report::num(median(&base), 1),
                with_ci(b, bci),
            );
        }
    }
    s += "\nOn a shared host, an interval that spans 0 means no overhead could be told \
          apart from the noise at this sample size. The file rates are page-cache rates \
          (16 KiB `write(2)`s, hundreds of thousands a second, each one an `IN_MODIFY` for \
          a monitor's watch): the worst case for any inotify-based monitor, not a \
          disk-bound run like the paper's. The monitor's CPU time is what it takes from \
          the host's other cores meanwhile (its share of the run's wall time, `docker \
          exec` included).\n";
    s
}

fn with_ci(v: f64, ci: Option<Ci>) -> String {
    crate::report::with_ci(v, ci, 2)
}

// ---------------------------------------------------------------------------------------
// The plot.

/// (workload, (fsmon overhead, CI), (baseline overhead, CI)), all directory counts pooled.
type Bars = Vec<(Workload, (f64, Option<Ci>), (f64, Option<Ci>))>;

fn bars(o: &OverheadResult, seed: u64) -> Bars {
    let mut rng = Rng::new(seed ^ 0x0e4e_ad00);
    Workload::ALL
        .iter()
        .map(|&w| {
            let off = o.scores(w, Mode::Off, None);
            let f = overhead(&off, &o.scores(w, Mode::Fsmon, None), &mut rng);
            let b = overhead(&off, &o.scores(w, Mode::Base, None), &mut rng);
            (w, f, b)
        })
        .collect()
}

/// The plot job for `plots::write`: (title, file name, draw). The font is registered by
/// `plots::write` before any job runs.
#[allow(clippy::type_complexity)]
pub fn plot_job(
    o: &OverheadResult,
    seed: u64,
) -> (String, String, Box<dyn Fn(&Path) -> Result<()> + '_>) {
    (
        "sysbench overhead vs unmonitored, % (95 % CI)".into(),
        "overhead.png".into(),
        Box::new(move |p| plot(p, o, seed)),
    )
}

/// Overhead bars (fsmon, baseline) per workload with their CI as error bars.
pub fn plot(path: &Path, o: &OverheadResult, seed: u64) -> Result<()> {
    let bars = bars(o, seed);
    let vals = bars.iter().flat_map(|(_, f, b)| {
        [f, b].into_iter().flat_map(|(v, ci)| {
            let mut x = vec![*v];
            if let Some(c) = ci {
                x.extend([c.lo, c.hi]);
            }
            x
        })
    });
    let (mut lo, mut hi) = (0f64, 0f64);
    for v in vals.filter(|v| v.is_finite()) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    let pad = ((hi - lo) * 0.1).max(0.5);
    // Room above the bars for the legend.
    let (lo, hi) = (lo - pad, hi + 2.5 * pad);
    let n = bars.len();
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "sysbench overhead vs unmonitored, {} to {} dirs pooled",
                o.dirs.first().copied().unwrap_or(0),
                o.dirs.last().copied().unwrap_or(0)
            ),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), lo..hi)
        .map_err(|e| anyhow!("{e}"))?;
    let labels: Vec<&str> = bars.iter().map(|(w, _, _)| w.label()).collect();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(n)
        .x_label_formatter(&|x| {
            let i = x.round();
            if (x - i).abs() < 0.01 && i >= 0.0 {
                labels.get(i as usize).copied().unwrap_or("").to_owned()
            } else {
                String::new()
            }
        })
        .y_desc("overhead vs unmonitored (%)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(std::iter::once(PathElement::new(
            vec![(-0.5, 0.0), (n as f64 - 0.5, 0.0)],
            BLACK.stroke_width(1),
        )))
        .map_err(|e| anyhow!("{e}"))?;
    let colors = [RGBColor(31, 119, 180), RGBColor(214, 39, 40)];
    for (k, name) in ["fsmon", "inotifywait -r"].into_iter().enumerate() {
        let color = colors[k];
        let off = if k == 0 { -0.2 } else { 0.2 };
        let pts: Vec<(f64, f64, Option<Ci>)> = bars
            .iter()
            .enumerate()
            .map(|(i, (_, f, b))| {
                let (v, ci) = if k == 0 { *f } else { *b };
                (i as f64 + off, v, ci)
            })
            .filter(|p| p.1.is_finite())
            .collect();
        chart
            .draw_series(pts.iter().map(|&(x, v, _)| {
                Rectangle::new([(x - 0.17, 0.0), (x + 0.17, v)], color.mix(0.8).filled())
            }))
            .map_err(|e| anyhow!("{e}"))?
            .label(name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
        chart
            .draw_series(pts.iter().filter_map(|&(x, _, ci)| {
                ci.map(|c| {
                    // A vertical line from lo to hi, with caps.
                    PathElement::new(
                        vec![
                            (x - 0.06, c.lo),
                            (x + 0.06, c.lo),
                            (x, c.lo),
                            (x, c.hi),
                            (x - 0.06, c.hi),
                            (x + 0.06, c.hi),
                        ],
                        BLACK.stroke_width(1),
                    )
                })
            }))
            .map_err(|e| anyhow!("{e}"))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CPU_OUT: &str = "CPU speed:\n    events per second:  4041.46\n\nGeneral statistics:\n";
    const MEM_OUT: &str = "Total operations: 7385018 (7378369.40 per second)\n\n\
                           7211.93 MiB transferred (7205.44 MiB/sec)\n";
    const FILEIO_OUT: &str = "File operations:\n    reads/s:                      0.00\n    \
                              writes/s:                     67336.12\n\nThroughput:\n    \
                              read, MiB/s:                  0.00\n    \
                              written, MiB/s:               1052.13\n";

    #[test]
    fn parses_sysbench_scores() {
        assert_eq!(Workload::Cpu.parse(CPU_OUT), Some(4041.46));
        assert_eq!(Workload::MemRead.parse(MEM_OUT), Some(7205.44));
        assert_eq!(Workload::MemWrite.parse(MEM_OUT), Some(7205.44));
        assert_eq!(Workload::SeqWrite.parse(FILEIO_OUT), Some(1052.13));
        assert_eq!(Workload::SeqRead.parse(FILEIO_OUT), Some(0.0));
        assert_eq!(Workload::Cpu.parse("garbage"), None);
        assert_eq!(Workload::MemRead.parse(CPU_OUT), None);
    }

    #[test]
    fn sysbench_arguments() {
        assert_eq!(Workload::Cpu.args(2), ["cpu", "--time=2"]);
        let a = Workload::SeqRead.args(1);
        assert_eq!(a[0], "fileio");
        assert!(a.contains(&"--file-test-mode=seqrd".to_owned()));
        assert!(a.contains(&"--file-total-size=128M".to_owned()));
    }

    #[test]
    fn ldd_lines() {
        let out = "\tlinux-vdso.so.1 (0x00007f6423978000)\n\
                   \tlibm.so.6 => /lib/x86_64-linux-gnu/libm.so.6 (0x00007f6423491000)\n\
                   \t/lib64/ld-linux-x86-64.so.2 (0x00007f642397a000)\n\
                   \tlibgone.so => not found\n";
        assert_eq!(
            ldd_paths(out),
            [
                "/lib/x86_64-linux-gnu/libm.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
        );
    }

    #[test]
    fn modes_rotate() {
        assert_eq!(order(0), [Mode::Off, Mode::Fsmon, Mode::Base]);
        assert_eq!(order(1), [Mode::Fsmon, Mode::Base, Mode::Off]);
        assert_eq!(order(2), [Mode::Base, Mode::Off, Mode::Fsmon]);
        assert_eq!(order(3), order(0));
        // Each mode first once in three repetitions.
        let firsts: Vec<Mode> = (0..3).map(|r| order(r)[0]).collect();
        assert!(Mode::ALL.iter().all(|m| firsts.contains(m)));
    }

    #[test]
    fn quick_is_small() {
        let q = Cfg::new(true);
        assert_eq!((q.time_s, q.reps, q.dirs.as_slice()), (1, 2, &[0, 100][..]));
        assert_eq!(Cfg::new(false).dirs, [0, 100, 200, 300]);
    }

    #[test]
    fn overhead_and_its_interval() {
        let mut rng = Rng::new(1);
        let off: Vec<f64> = (0..40).map(|i| 1000.0 + f64::from(i % 5)).collect();
        // 10 % slower.
        let on: Vec<f64> = off.iter().map(|v| v * 0.9).collect();
        let (p, ci) = overhead(&off, &on, &mut rng);
        assert!((p - 10.0).abs() < 1e-9, "{p}");
        let ci = ci.expect("samples");
        assert!(ci.lo <= p && p <= ci.hi && ci.hi - ci.lo < 1.0, "{ci:?}");
        // The same scores: 0 %, an interval around 0.
        let (z, ci) = overhead(&off, &off, &mut rng);
        assert_eq!(z, 0.0);
        let ci = ci.expect("samples");
        assert!(ci.lo <= 0.0 && 0.0 <= ci.hi);
        // No samples: no number.
        let (n, ci) = overhead(&[], &on, &mut rng);
        assert!(n.is_nan() && ci.is_none());
    }

    fn sample_result() -> OverheadResult {
        let mut samples = Vec::new();
        for rep in 0..3 {
            for &dirs in &[0, 100] {
                for w in Workload::ALL {
                    for (mode, f) in [(Mode::Off, 1.0), (Mode::Fsmon, 0.99), (Mode::Base, 0.9)] {
                        samples.push(Sample {
                            workload: w,
                            mode,
                            dirs,
                            rep,
                            score: (1000.0 + rep as f64) * f,
                            wall_s: 1.0,
                            monitor_cpu_s: if mode == Mode::Off { 0.0 } else { 0.1 },
                        });
                    }
                }
            }
        }
        OverheadResult {
            time_s: 1,
            reps: 3,
            dirs: vec![0, 100],
            samples,
            fsmon_containers: 3,
            fsmon_armed: 3,
            dirs_seen: [3, 3],
            dir_steps: [3, 3],
            records: [10, 20],
            base_overflow: false,
            duration_s: 12.0,
        }
    }

    #[test]
    fn section_renders_every_workload_and_dir_count() {
        let r = sample_result();
        assert_eq!(r.scores(Workload::Cpu, Mode::Off, None).len(), 6);
        assert_eq!(r.scores(Workload::Cpu, Mode::Off, Some(100)).len(), 3);
        let s = section(&r, 7);
        assert_eq!(s, section(&r, 7), "deterministic for a seed");
        for w in Workload::ALL {
            assert!(
                s.contains(&format!("| {} | {} |", w.label(), w.unit())),
                "{s}"
            );
            assert!(s.contains(&format!("| {} | 100 |", w.label())), "{s}");
        }
        assert!(s.contains("fsmon armed 3 of 3 containers"));
        assert!(s.contains(paper::CPU) && s.contains(paper::DISK));
        // fsmon 1 %, baseline 10 %.
        assert!(s.contains("| 1.00 ["), "{s}");
        assert!(s.contains("| 10.00 ["), "{s}");
        // 0.1 s of monitor CPU per 1 s run.
        assert!(s.contains("| 10.0 / 10.0 |"), "{s}");
        assert!(r.monitor_cpu_pct(Workload::Cpu, Mode::Off) == 0.0);
    }

    #[test]
    fn plots_a_png_through_the_plots_hook() {
        let dir = std::env::temp_dir().join(format!("fsmon-ovh-plot-{}", std::process::id()));
        let rep = crate::report::Report {
            overhead: Some(sample_result()),
            ..Default::default()
        };
        let made = crate::plots::write(&rep, &dir.join("bench.md"));
        // Without a system font no plot is made (and that is said on stderr).
        if let Some((_, rel)) = made.first() {
            assert_eq!(rel, "bench-plots/overhead.png");
            assert!(std::fs::metadata(dir.join(rel)).expect("png").len() > 1000);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
