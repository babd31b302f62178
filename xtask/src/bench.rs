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
};

/// `cargo xtask bench` options.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// `docker run` samples per engine and per mode (off / fsmon / baseline).
    #[arg(long, default_value_t = 40)]
    pub runs: usize,
    /// Write → record latency samples (per monitor).
    #[arg(long, default_value_t = 1000)]
    pub latency_samples: usize,
    /// Files in the throughput burst.
    #[arg(long, default_value_t = 100_000)]
    pub burst: usize,
    /// Containers in the start storm (`--only storm`), spread over both engines.
    #[arg(long, default_value_t = 500)]
    pub storm: usize,
    /// Run only these parts (comma-separated); all of them by default.
    #[arg(long, value_delimiter = ',', value_enum)]
    pub only: Vec<Part>,
    /// Leave the engines this command started running afterwards.
    #[arg(long)]
    pub keep_engines: bool,
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
}

const FIRST: &str = "touch /f0; mkdir -p /a/b/c; touch /a/b/c/f1; echo x > /a/b/c/f2";
const FIRST_PATHS: [&str; 6] = ["/f0", "/a", "/a/b", "/a/b/c", "/a/b/c/f1", "/a/b/c/f2"];

#[derive(PartialEq, Eq)]
enum Ready {
    No,
    Data,
    HungUp,
}

/// A monitor under test. Its stdout is read by the bench thread itself (non-blocking), so
/// a latency sample needs no thread hand-off: in `spin` mode the reader busy-polls the pipe
/// and timestamps a line when the read that brought it returns.
struct Monitor {
    child: Child,
    out: std::process::ChildStdout,
    buf: Vec<u8>,
    /// What one read(2) brings.
    chunk: Box<[u8]>,
    /// Complete lines already read, with the time their bytes arrived.
    lines: std::collections::VecDeque<(Instant, String)>,
}

impl Monitor {
    fn spawn(mut cmd: Command) -> Result<Monitor> {
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

    fn fsmon(bin: &Path, hosts: &[&str]) -> Result<Monitor> {
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
    fn read_lines(&mut self, mut f: impl FnMut(Instant, &[u8])) -> bool {
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

    fn wait(&mut self, timeout: Duration, pred: impl Fn(&str) -> bool) -> Result<Instant> {
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

    fn drain(&mut self, quiet: Duration) -> Vec<String> {
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

    fn stop(mut self) {
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

fn pct(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `cargo xtask bench`.
pub fn bench(args: &BenchArgs) -> Result<()> {
    let bin = ebpf::build_all()?;
    let started = engines::start_engines()?;
    let r = run_all(&bin, args);
    if !args.keep_engines {
        started.iter().for_each(engines::stop);
    }
    r
}

fn run_all(bin: &Path, args: &BenchArgs) -> Result<()> {
    println!(
        "# fsmon bench — {} (2 cores; one run, modes interleaved)",
        hostname()
    );
    let want = |p: Part| args.only.is_empty() || args.only.contains(&p);
    if want(Part::Start) {
        for (label, host) in [("cgroup v1", V1_HOST), ("cgroup v2", V2_HOST)] {
            start_latency(bin, label, host, args.runs)?;
        }
    }
    if want(Part::First) {
        first_instructions(bin, V1_HOST, 20)?;
    }
    if want(Part::Live) {
        live_container(bin, args)?;
    }
    if want(Part::Storm) {
        storm(bin, args.storm)?;
    }
    if want(Part::Runtimes) {
        runtimes(bin, args.runs)?;
    }
    Ok(())
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
fn storm(bin: &Path, n: usize) -> Result<()> {
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
    // Idle: every container sleeping; fsmon's CPU over 10 s.
    let (rss1, fds1) = (rss_kib(pid), fd_count(pid));
    let cpu0 = cpu_ticks(pid);
    let idle_from = Instant::now();
    std::thread::sleep(Duration::from_secs(10));
    m.fill();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let idle_cpu = (cpu_ticks(pid) - cpu0) as f64 / hz / idle_from.elapsed().as_secs_f64();
    let armed = arm_us.len();
    let reported = last_seen.len();
    println!("\n## start storm: {n} containers (4 at a time, 100 directories each, both engines), fsmon under RLIMIT_NOFILE {nofile} (soft:hard)");
    println!(
        "started in {:.0} s, {failed} docker runs failed",
        started_in.as_secs_f64()
    );
    println!("| | value |");
    println!("|---|---|");
    println!(
        "| containers armed (`container_start`) | {armed} of {} |",
        ids.len()
    );
    println!(
        "| containers whose last first-instruction path was reported | {reported} of {} |",
        ids.len()
    );
    // On the cgroup v1 engine the clock starts at the container's first (freezer) cgroup
    // and arming happens at its v2 cgroup, which runc makes last: runc's own time between
    // the two is in these numbers.
    for (label, v) in [
        ("cgroup v1 engine (from its first cgroup)", &mut arm_us_v1),
        ("cgroup v2 engine", &mut arm_us_v2),
    ] {
        println!(
            "| cgroup mkdir → armed, {label}: median / p99 (µs) | {:.0} / {:.0} |",
            pct(v, 0.5),
            pct(v, 0.99)
        );
    }
    println!(
        "| cgroup mkdir → armed, median (µs) | {:.0} |",
        pct(&mut arm_us, 0.5)
    );
    println!(
        "| cgroup mkdir → armed, p99 (µs) | {:.0} |",
        pct(&mut arm_us, 0.99)
    );
    println!(
        "| cgroup mkdir → armed, max (µs) | {:.0} |",
        pct(&mut arm_us, 1.0)
    );
    let per = |a: u64, b: u64| (b.saturating_sub(a)) as f64 / ids.len().max(1) as f64;
    println!(
        "| fsmon RSS idle → all armed (MiB) | {:.1} → {:.1} |",
        rss0 as f64 / 1024.0,
        rss1 as f64 / 1024.0
    );
    println!("| fsmon RSS per container (KiB) | {:.1} |", per(rss0, rss1));
    println!("| fsmon fds before → all armed | {fds0} → {fds1} |");
    println!(
        "| fsmon fds per container | {:.2} |",
        per(fds0 as u64, fds1 as u64)
    );
    println!(
        "| fsmon CPU with all running, idle (% of one core) | {:.2} |",
        idle_cpu * 100.0
    );
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
    Ok(())
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

fn start_latency(bin: &Path, label: &str, host: &str, runs: usize) -> Result<()> {
    const BLOCK: usize = 5;
    let (mut off, mut on, mut base) = (Vec::new(), Vec::new(), Vec::new());
    let mut failed = [0usize; 3];
    let mut freeze = Vec::new();
    for _ in 0..3 {
        docker_run(host, "true")?; // warm the engine's caches
    }
    for _ in 0..runs.div_ceil(BLOCK) {
        for _ in 0..BLOCK {
            sample(host, &mut off, &mut failed[0], "no monitor");
        }
        let mut m = Monitor::fsmon(bin, &[host])?;
        for _ in 0..BLOCK {
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
        for _ in 0..BLOCK {
            sample(host, &mut base, &mut failed[2], "baseline");
        }
        b.stop();
    }
    let (o50, o99) = (pct(&mut off, 0.5), pct(&mut off, 0.99));
    let (f50, f99) = (pct(&mut on, 0.5), pct(&mut on, 0.99));
    let (b50, b99) = (pct(&mut base, 0.5), pct(&mut base, 0.99));
    println!(
        "\n## docker run --rm wall time, {label} ({} runs per mode)",
        off.len()
    );
    println!("| mode | median ms | p99 ms | added median ms | added p99 ms | failed starts |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| no monitor | {o50:.1} | {o99:.1} | — | — | {} |",
        failed[0]
    );
    println!(
        "| fsmon | {f50:.1} | {f99:.1} | {:+.1} | {:+.1} | {} |",
        f50 - o50,
        f99 - o99,
        failed[1]
    );
    println!(
        "| inotifywait -r at start event | {b50:.1} | {b99:.1} | {:+.1} | {:+.1} | {} |",
        b50 - o50,
        b99 - o99,
        failed[2]
    );
    if freeze.is_empty() {
        println!("fsmon froze none of these starts (armed without freezing: freeze_us null)");
    } else {
        println!(
            "fsmon freeze_us over {} frozen starts: median {:.0}, p99 {:.0}, max {:.0}",
            freeze.len(),
            pct(&mut freeze, 0.5),
            pct(&mut freeze, 0.99),
            freeze.iter().copied().fold(0.0, f64::max)
        );
    }
    Ok(())
}

fn first_instructions(bin: &Path, host: &str, runs: usize) -> Result<()> {
    let mut m = Monitor::fsmon(bin, &[host])?;
    for _ in 0..runs {
        docker_run(host, FIRST)?;
    }
    let lines = m.drain(Duration::from_secs(2));
    m.stop();
    let mut seen = 0;
    let mut cur: HashSet<String> = HashSet::new();
    for l in &lines {
        let Ok(v) = serde_json::from_str::<Value>(l) else {
            continue;
        };
        match v["kind"].as_str() {
            Some("container_start") => cur.clear(),
            Some("create") => {
                if let Some(p) = v["path"].as_str() {
                    cur.insert(p.to_owned());
                }
            }
            Some("container_stop") => {
                seen += FIRST_PATHS.iter().filter(|p| cur.contains(**p)).count()
            }
            _ => {}
        }
    }
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
    let base_seen = bl
        .iter()
        .filter(|l| l.contains("CREATE"))
        .filter(|l| FIRST_PATHS.iter().any(|p| l.starts_with(&format!("{p} "))))
        .count();
    let total = runs * FIRST_PATHS.len();
    println!("\n## first-instruction paths reported (`{FIRST}`), {runs} containers");
    println!("| monitor | seen | of | ratio |");
    println!("|---|---|---|---|");
    println!(
        "| fsmon | {seen} | {total} | {:.2} |",
        seen as f64 / total as f64
    );
    println!(
        "| inotifywait -r at start event | {base_seen} | {total} | {:.2} |",
        base_seen as f64 / total as f64
    );
    Ok(())
}

/// A long-running container on the cgroup v1 engine, whose merged view the host can write.
struct Live {
    id: String,
    merged: PathBuf,
    upper: PathBuf,
}

impl Live {
    fn start() -> Result<Live> {
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

fn inotifywait_on(upper: &Path) -> Result<Monitor> {
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
/// speed does not bound it. Returns (records/s, creates reported, overflowed); each file is
/// two kernel events (IN_CREATE, IN_CLOSE_WRITE).
fn throughput(
    m: &mut Monitor,
    live: &Live,
    tag: &str,
    n: usize,
    fsmon: bool,
) -> Result<(f64, usize, bool)> {
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
    Ok((seen as f64 / secs, seen, overflow))
}

fn live_container(bin: &Path, args: &BenchArgs) -> Result<()> {
    // Room in the kernel queue for the whole burst (both monitors' instances are made
    // after this; the old value is put back at the end).
    let _queue = Sysctl::set("fs/inotify/max_queued_events", (args.burst * 4).max(16384))?;
    // fsmon first, so it arms the container at its start.
    let mut m = Monitor::fsmon(bin, &[V1_HOST])?;
    let idle_rss = m.rss_kib();
    let live = Live::start()?;
    m.wait(Duration::from_secs(10), |l| {
        l.contains("container_start") && l.contains(&live.id)
    })?;
    resolve_cost(&live)?;
    let mut b = inotifywait_on(&live.upper)?;
    // Each monitor is measured alone: the other one (which watches the same tree) is
    // stopped meanwhile, so that the two do not compete for the cores. The three take
    // turns in blocks, so that a noisy moment of the host hits them alike.
    let n = args.latency_samples;
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
    let mut fl = std::mem::take(&mut fsmon_files.samples);
    let mut bl = std::mem::take(&mut base_files.samples);
    let mut kl = std::mem::take(&mut floor.files.samples);
    drop(floor);
    b.drain(Duration::from_millis(300));
    m.drain(Duration::from_millis(300));
    println!("\n## detection latency: 1-byte write(2) in a running container's layer → its record read from the monitor's stdout (µs, {} samples each, in turns of 25; the reader polls the pipe without sleeping (sched_yield between reads); the other monitor is stopped meanwhile)", args.latency_samples);
    println!("| monitor | median | p99 |");
    println!("|---|---|---|");
    let (f50, f99) = (pct(&mut fl, 0.5), pct(&mut fl, 0.99));
    let (b50, b99) = (pct(&mut bl, 0.5), pct(&mut bl, 0.99));
    println!("| fsmon | {f50:.0} | {f99:.0} |");
    println!("| inotifywait -r | {b50:.0} | {b99:.0} |");
    let (k50, k99) = (pct(&mut kl, 0.5), pct(&mut kl, 0.99));
    println!("| floor: a bare blocking inotify read(2) → pipe (a thread of this bench) | {k50:.0} | {k99:.0} |");
    println!(
        "ratio fsmon/baseline: median {:.2}, p99 {:.2}",
        f50 / b50,
        f99 / b99
    );

    // Memory: 10k directories in the layer, each watched.
    let before = m.rss_kib();
    let dirs = live.merged.join("tenk");
    std::fs::create_dir_all(&dirs)?;
    for i in 0..10_000 {
        std::fs::create_dir(dirs.join(format!("d{i}")))?;
    }
    let _ = m.wait(Duration::from_secs(30), |l| {
        l.contains("\"path\":\"/tenk/d9999\"")
    });
    m.drain(Duration::from_millis(500));
    let after = m.rss_kib();
    println!("\n## memory (VmRSS of the fsmon process)");
    println!("idle, no container: {idle_rss} KiB; before 10k dirs: {before} KiB; after 10k watched dirs: {after} KiB; per 10k watches: {} KiB", after.saturating_sub(before));
    // Each burst is counted by its own monitor while the other one is stopped; the other
    // one catches up afterwards (the queue limit above leaves room for it).
    b.pause();
    let (f_rate, f_seen, f_over) = throughput(&mut m, &live, "fsmon", args.burst, true)?;
    b.resume();
    b.drain(Duration::from_millis(1000));
    m.pause();
    let (b_rate, b_seen, b_over) = throughput(&mut b, &live, "base", args.burst, false)?;
    m.resume();
    m.drain(Duration::from_millis(1000));
    println!(
        "\n## throughput: {} empty files made while the monitor was stopped, then drained (each file is 2 kernel events: IN_CREATE, IN_CLOSE_WRITE; the other monitor is stopped meanwhile)",
        args.burst
    );
    println!("| monitor | creates reported | records/s | kernel events/s | overflow |");
    println!("|---|---|---|---|---|");
    println!(
        "| fsmon | {f_seen} | {f_rate:.0} | {:.0} | {f_over} |",
        f_rate * 2.0
    );
    println!(
        "| inotifywait -r | {b_seen} | {b_rate:.0} | {:.0} | {b_over} |",
        b_rate * 2.0
    );
    println!("ratio fsmon/baseline: {:.2}", f_rate / b_rate);
    b.stop();

    m.stop();
    Ok(())
}

/// Upperdir resolution: overlay2's on-disk metadata (what fsmon reads while a container is
/// frozen) against the engine's inspect API (the fallback), per lookup.
fn resolve_cost(live: &Live) -> Result<()> {
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
    println!("\n## upperdir resolution (per lookup)");
    println!("| method | µs |");
    println!("|---|---|");
    println!("| overlay2 on-disk metadata (fsmon's choice) | {disk_us:.1} |");
    println!("| inspect API over the socket (fallback) | {api_us:.0} |");
    Ok(())
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
fn runtimes(bin: &Path, runs: usize) -> Result<()> {
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
    println!("\n## upperdir resolution per runtime (`fsmon resolve --repeat 1000`, µs per lookup)");
    println!("| runtime | fsmon arms with | step / method | median µs | min µs |");
    println!("|---|---|---|---|---|");
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let v: Value = serde_json::from_str(line)?;
        if let Some(e) = v.get("error") {
            bail!("fsmon resolve {}: {e}", v["cgroup"]);
        }
        for (method, c) in v["cost"].as_object().into_iter().flatten() {
            println!(
                "| {} | {} | {method} | {:.1} | {:.1} |",
                v["runtime"].as_str().unwrap_or("?"),
                v["how"].as_str().unwrap_or("?"),
                c["median_us"].as_f64().unwrap_or(f64::NAN),
                c["min_us"].as_f64().unwrap_or(f64::NAN)
            );
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
    println!("\n## cgroup mkdir → armed per runtime (`arm_us`, {runs} containers each, µs)");
    println!("| runtime | armed | median | p90 | max |");
    println!("|---|---|---|---|---|");
    for runtime in ["docker", "containerd", "podman"] {
        let mut v: Vec<u64> = ids
            .iter()
            .filter(|(r, _)| *r == runtime)
            .filter_map(|(_, id)| arm.get(id).copied())
            .collect();
        v.sort_unstable();
        let at = |q: f64| {
            v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                .copied()
                .unwrap_or(0)
        };
        println!(
            "| {runtime} | {}/{runs} | {} | {} | {} |",
            v.len(),
            at(0.5),
            at(0.9),
            at(1.0)
        );
    }
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
    Ok(())
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
