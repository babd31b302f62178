//! The bench report: what one `cargo xtask bench` run measured ([`Report`]) → the
//! markdown of `docs/benchmarks.md` ([`render`]). Pure: no I/O, deterministic (the
//! bootstrap's RNG is seeded from [`Report::seed`]).

use std::fmt::Write as _;

use crate::stats::{bootstrap_ci, bootstrap_ci2, median, pct, quantile, Ci, Rng, RESAMPLES};

/// The paper's numbers the report quotes beside ours.
pub mod paper {
    /// Generic (inotify armed at the engine's start event) blind spot, ms.
    pub const BLIND_SPOT_GENERIC_MS: f64 = 5.831;
    /// `docker run` wall time unmonitored → monitored by the paper's system, ms.
    pub const START_OFF_MS: f64 = 715.8;
    pub const START_ON_MS: f64 = 1729.2;
    /// Subdirectory detection delay, average, ms (all detected).
    pub const COVERAGE_DELAY_MS: f64 = 0.4;
}

/// What was run, and where.
#[derive(Clone, Debug, Default)]
pub struct Meta {
    pub command: String,
    pub quick: bool,
    pub date: String,
    pub commit: String,
    pub kernel: String,
    pub cpu: String,
    pub hostname: String,
    pub docker: String,
    pub containerd: String,
    pub podman: String,
    pub inotifywait: String,
    /// Wall time of the whole bench, s.
    pub duration_s: f64,
}

/// `docker run --rm` wall times on one engine, ms.
#[derive(Clone, Debug, Default)]
pub struct StartResult {
    pub label: String,
    pub off: Vec<f64>,
    pub fsmon: Vec<f64>,
    pub base: Vec<f64>,
    /// Failed starts: no monitor, fsmon, baseline.
    pub failed: [usize; 3],
    /// fsmon's `freeze_us` of the frozen starts.
    pub freeze_us: Vec<f64>,
}

/// First-instruction paths reported.
#[derive(Clone, Debug, Default)]
pub struct FirstResult {
    pub script: String,
    pub runs: usize,
    pub paths: usize,
    pub fsmon_seen: usize,
    pub base_seen: usize,
    /// The path made and deleted at once, and in how many containers each monitor
    /// reported its creation.
    pub gone: String,
    pub gone_fsmon: usize,
    pub gone_base: usize,
    /// Containers started while fsmon was stopped (SIGSTOP, resumed 300 ms later), the
    /// first paths fsmon reported of them, and the exec gate's hold of each (`gated_us`).
    pub stalled_runs: usize,
    pub stalled_seen: usize,
    pub gated_us: Vec<f64>,
}

/// A running container: detection latency, memory, throughput, upperdir resolution.
#[derive(Clone, Debug, Default)]
pub struct LiveResult {
    /// Write → record, µs.
    pub fsmon_us: Vec<f64>,
    pub base_us: Vec<f64>,
    pub floor_us: Vec<f64>,
    /// Upperdir resolution per lookup, µs: overlay2 metadata, inspect API.
    pub resolve_disk_us: f64,
    pub resolve_api_us: f64,
    /// fsmon VmRSS, KiB: idle with no container, before and after `dirs` watched dirs.
    pub rss_idle_kib: u64,
    pub rss_before_kib: u64,
    pub rss_after_kib: u64,
    pub dirs: usize,
    pub burst: usize,
    pub fsmon_tp: Throughput,
    pub base_tp: Throughput,
    /// `mkdir -p a/b/c` + an immediate write of `a/b/c/f`: trials, files each monitor
    /// reported.
    pub race: usize,
    pub race_fsmon: usize,
    pub race_base: usize,
}

/// Drain throughput of one monitor.
#[derive(Clone, Copy, Debug, Default)]
pub struct Throughput {
    pub records_per_s: f64,
    pub seen: usize,
    pub overflow: bool,
}

/// The start storm.
#[derive(Clone, Debug, Default)]
pub struct StormResult {
    pub n: usize,
    pub nofile: String,
    pub started_s: f64,
    pub failed: usize,
    pub launched: usize,
    pub armed: usize,
    pub reported: usize,
    /// Cgroup mkdir → armed, µs.
    pub arm_v1_us: Vec<f64>,
    pub arm_v2_us: Vec<f64>,
    pub rss0_kib: u64,
    pub rss1_kib: u64,
    pub fds0: usize,
    pub fds1: usize,
    pub idle_cpu_pct: f64,
    /// (containers started, fsmon RSS KiB) along the storm.
    pub rss_trace: Vec<(usize, u64)>,
}

/// One `fsmon resolve` cost row.
#[derive(Clone, Debug, Default)]
pub struct ResolveRow {
    pub runtime: String,
    pub how: String,
    pub method: String,
    pub median_us: f64,
    pub min_us: f64,
}

/// Per runtime: resolution cost and cgroup mkdir → armed.
#[derive(Clone, Debug, Default)]
pub struct RuntimesResult {
    pub runs: usize,
    pub resolve: Vec<ResolveRow>,
    /// (runtime, `arm_us` of the containers armed).
    pub arm_us: Vec<(String, Vec<f64>)>,
}

/// Everything one run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub meta: Meta,
    pub seed: u64,
    pub start: Vec<StartResult>,
    pub first: Option<FirstResult>,
    pub live: Option<LiveResult>,
    pub storm: Option<StormResult>,
    pub runtimes: Option<RuntimesResult>,
    pub overhead: Option<crate::bench::overhead::OverheadResult>,
    pub coverage: Option<crate::coverage::CoverageResult>,
    pub fairness: Option<crate::fairness::FairnessResult>,
    /// (part, error) of the parts that failed.
    pub errors: Vec<(String, String)>,
    /// (title, path relative to the report) of the plots made.
    pub plots: Vec<(String, String)>,
}

fn p50(v: &mut [f64]) -> f64 {
    pct(v, 0.5)
}

fn p99(v: &mut [f64]) -> f64 {
    pct(v, 0.99)
}

/// A value with its interval: `12.3 [11.0, 14.1]`.
pub(crate) fn with_ci(v: f64, ci: Option<Ci>, prec: usize) -> String {
    match ci {
        Some(c) if v.is_finite() => format!("{v:.prec$} [{:.prec$}, {:.prec$}]", c.lo, c.hi),
        _ => num(v, prec),
    }
}

pub(crate) fn num(v: f64, prec: usize) -> String {
    if v.is_finite() {
        format!("{v:.prec$}")
    } else {
        "—".into()
    }
}

/// One row of the summary: what we measured against the baseline, and whether fsmon is
/// ahead (lower is better unless `higher_better`).
pub(crate) struct Headline {
    pub(crate) row: String,
    pub(crate) fsmon: String,
    pub(crate) base: String,
    pub(crate) ratio: f64,
    /// The ratio's bootstrap interval, where it has one.
    pub(crate) ratio_ci: Option<Ci>,
    pub(crate) paper: String,
    pub(crate) ahead: bool,
}

impl Headline {
    /// "yes", or "**no**" (with "within noise" when the ratio's interval spans 1).
    fn verdict(&self) -> &'static str {
        match (self.ahead, self.ratio_ci) {
            (true, _) => "yes",
            (false, Some(c)) if c.lo <= 1.0 && 1.0 <= c.hi => "**no** (within noise)",
            (false, _) => "**no**",
        }
    }
}

/// The report's markdown.
pub fn render(r: &Report) -> String {
    let mut rng = Rng::new(r.seed);
    let mut heads = Vec::new();
    let mut body = String::new();
    for s in &r.start {
        body += &start_section(s, &mut rng, &mut heads);
    }
    if let Some(f) = &r.first {
        body += &first_section(f, &mut heads);
    }
    if let Some(l) = &r.live {
        body += &live_section(l, &mut rng, &mut heads);
    }
    if let Some(s) = &r.storm {
        body += &storm_section(s);
    }
    if let Some(rt) = &r.runtimes {
        body += &runtimes_section(rt);
    }
    if let Some(ov) = &r.overhead {
        body += &crate::bench::overhead::section(ov, r.seed);
    }
    if let Some(c) = &r.coverage {
        body += &crate::coverage::section(c, &mut rng, &mut heads);
    }
    if let Some(f) = &r.fairness {
        body += &crate::fairness::section(f, &mut rng, &mut heads);
    }
    let mut o = String::new();
    o += &header(&r.meta, r.seed);
    o += &summary(&heads);
    o += &body;
    o += &missing_section();
    if !r.plots.is_empty() {
        o += "\n## Plots\n\n";
        for (title, path) in &r.plots {
            let _ = writeln!(o, "![{title}]({path})\n");
        }
    }
    if !r.errors.is_empty() {
        o += "\n## Parts that failed in this run\n\n";
        for (part, e) in &r.errors {
            let _ = writeln!(o, "- **{part}**: {}", e.replace('\n', " "));
        }
    }
    o
}

fn header(m: &Meta, seed: u64) -> String {
    let mut o = String::from("# fsmon benchmarks\n\n");
    o += "Generated by `cargo xtask bench` from one run's own measurements (regenerate it \
          on your host with the command below; do not edit by hand). The baseline is what a \
          user would otherwise pick: `inotifywait -r` armed on each container's upperdir at \
          the engine's `start` event (the paper's \"generic\" algorithm), measured in the \
          same run, interleaved with fsmon. Ratios are fsmon / baseline (below 1: fsmon is \
          ahead on a time; above 1 on a rate or a count). Intervals are bootstrap 95 % \
          percentile intervals (for a difference or a ratio, each side resampled on its \
          own).\n\n";
    if m.quick {
        o += "**Quick mode**: few samples, a smoke run that keeps the bench code working; \
              its numbers are not for quoting.\n\n";
    }
    o += "## What was run\n\n| | |\n|---|---|\n";
    let rows = [
        ("command", format!("`{}`", m.command)),
        ("date (UTC)", m.date.clone()),
        ("git commit", format!("`{}`", m.commit)),
        ("host", m.hostname.clone()),
        ("kernel", m.kernel.clone()),
        ("CPU", m.cpu.clone()),
        ("Docker", m.docker.clone()),
        ("containerd", m.containerd.clone()),
        ("podman", m.podman.clone()),
        ("inotifywait", m.inotifywait.clone()),
        ("bench wall time", format!("{:.0} s", m.duration_s)),
        (
            "bootstrap",
            format!("{RESAMPLES} resamples, seed {seed:#x}, 95 % percentile intervals"),
        ),
    ];
    for (k, v) in rows {
        let v = if v.trim().is_empty() { "?".into() } else { v };
        let _ = writeln!(o, "| {k} | {v} |");
    }
    o
}

fn summary(heads: &[Headline]) -> String {
    if heads.is_empty() {
        return String::new();
    }
    let mut o = String::from(
        "\n## Summary\n\n| row | fsmon | baseline | fsmon / baseline | paper | fsmon ahead |\n\
         |---|---|---|---|---|---|\n",
    );
    for h in heads {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {} | {} | {} |",
            h.row,
            h.fsmon,
            h.base,
            with_ci(h.ratio, h.ratio_ci, 2),
            h.paper,
            h.verdict()
        );
    }
    let behind: Vec<&str> = heads
        .iter()
        .filter(|h| !h.ahead)
        .map(|h| h.row.as_str())
        .collect();
    if behind.is_empty() {
        o += "\nfsmon is ahead of the baseline on every row measured.\n";
    } else {
        let _ = writeln!(o, "\nRows where fsmon is not ahead: {}.", behind.join("; "));
    }
    o
}

fn start_section(s: &StartResult, rng: &mut Rng, heads: &mut Vec<Headline>) -> String {
    let mut o = format!(
        "\n## Start latency: `docker run --rm` wall time, {} (experiment 2)\n\n\
         Unmonitored, fsmon and the baseline take turns in blocks of 5 runs. ms; \
         `added` is the mode's median minus the unmonitored median.\n\n\
         | mode | runs | median [95 % CI] | p99 | added median [95 % CI] | median / unmonitored [95 % CI] | failed starts |\n\
         |---|---|---|---|---|---|---|\n",
        s.label
    );
    let o50 = median(&s.off);
    let added = |v: &[f64], rng: &mut Rng| -> (f64, Option<Ci>, f64, Option<Ci>) {
        let m = median(v);
        (
            m - o50,
            bootstrap_ci2(v, &s.off, |a, b| p50(a) - p50(b), RESAMPLES, 0.95, rng),
            m / o50,
            bootstrap_ci2(v, &s.off, |a, b| p50(a) / p50(b), RESAMPLES, 0.95, rng),
        )
    };
    let ci = |v: &[f64], rng: &mut Rng| bootstrap_ci(v, p50, RESAMPLES, 0.95, rng);
    let _ = writeln!(
        o,
        "| no monitor | {} | {} | {} | — | — | {} |",
        s.off.len(),
        with_ci(o50, ci(&s.off, rng), 1),
        num(quantile(&s.off, 0.99), 1),
        s.failed[0]
    );
    let mut add = [(0.0, None, 0.0, None); 2];
    for (k, (name, v, failed)) in [
        ("fsmon", &s.fsmon, s.failed[1]),
        ("inotifywait -r at start event", &s.base, s.failed[2]),
    ]
    .into_iter()
    .enumerate()
    {
        let (a, aci, q, qci) = added(v, rng);
        add[k] = (a, aci, q, qci);
        let _ = writeln!(
            o,
            "| {name} | {} | {} | {} | {} | {} | {failed} |",
            v.len(),
            with_ci(median(v), ci(v, rng), 1),
            num(quantile(v, 0.99), 1),
            with_ci(a, aci, 1),
            with_ci(q, qci, 3),
        );
    }
    let _ = writeln!(
        o,
        "| paper (its system) | | {:.1} (unmonitored) → {:.1} | | {:+.1} | {:.3} | |",
        paper::START_OFF_MS,
        paper::START_ON_MS,
        paper::START_ON_MS - paper::START_OFF_MS,
        paper::START_ON_MS / paper::START_OFF_MS
    );
    let fsmon_vs_base = bootstrap_ci2(
        &s.fsmon,
        &s.base,
        |a, b| p50(a) / p50(b),
        RESAMPLES,
        0.95,
        rng,
    );
    let ratio = median(&s.fsmon) / median(&s.base);
    let _ = writeln!(
        o,
        "\nfsmon / baseline median wall time: {}.",
        with_ci(ratio, fsmon_vs_base, 3)
    );
    if s.freeze_us.is_empty() {
        o += "fsmon froze none of these starts (armed without freezing: `freeze_us` null).\n";
    } else {
        let _ = writeln!(
            o,
            "fsmon `freeze_us` over {} frozen starts: median {:.0}, p99 {:.0}, max {:.0} µs.",
            s.freeze_us.len(),
            median(&s.freeze_us),
            quantile(&s.freeze_us, 0.99),
            quantile(&s.freeze_us, 1.0)
        );
    }
    heads.push(Headline {
        row: format!(
            "start latency added, median ms ({}; ratio: of the wall times)",
            s.label
        ),
        fsmon: with_ci(add[0].0, add[0].1, 1),
        base: with_ci(add[1].0, add[1].1, 1),
        ratio,
        ratio_ci: fsmon_vs_base,
        paper: format!("{:+.1}", paper::START_ON_MS - paper::START_OFF_MS),
        ahead: ratio <= 1.0,
    });
    o
}

fn first_section(f: &FirstResult, heads: &mut Vec<Headline>) -> String {
    let total = f.runs * f.paths;
    let frac = |n: usize| n as f64 / total.max(1) as f64;
    let mut o = format!(
        "\n## Blind spot: first-instruction paths reported (experiment 1)\n\n\
         {} containers run `{}`; each monitor's reported creations of its {} paths.\n\n\
         | monitor | seen | of | fraction |\n|---|---|---|---|\n",
        f.runs, f.script, f.paths
    );
    let _ = writeln!(
        o,
        "| fsmon | {} | {total} | {:.2} |",
        f.fsmon_seen,
        frac(f.fsmon_seen)
    );
    let _ = writeln!(
        o,
        "| inotifywait -r at start event | {} | {total} | {:.2} |",
        f.base_seen,
        frac(f.base_seen)
    );
    let _ = writeln!(
        o,
        "\nOf these, `{}` (made and deleted at once, the first instruction): fsmon reported \
         it in {} of {} containers, the baseline in {} of {}.",
        f.gone, f.gone_fsmon, f.runs, f.gone_base, f.runs
    );
    if f.stalled_runs > 0 {
        let mut g = f.gated_us.clone();
        let _ = writeln!(
            o,
            "\nWith fsmon stopped (SIGSTOP) while each of {} more containers started, resumed \
             300 ms later: fsmon reported {} of {} first paths; the exec gate held {} of the \
             starts, `gated_us` median {} µs, max {} µs.",
            f.stalled_runs,
            f.stalled_seen,
            f.stalled_runs * f.paths,
            g.len(),
            num(p50(&mut g), 0),
            num(g.iter().copied().fold(f64::NAN, f64::max), 0)
        );
    }
    let _ = writeln!(
        o,
        "\nPaper: the generic algorithm has a {:.3} ms blind spot; theirs none.",
        paper::BLIND_SPOT_GENERIC_MS
    );
    heads.push(Headline {
        row: "first-instruction paths seen (fraction)".into(),
        fsmon: format!("{:.2}", frac(f.fsmon_seen)),
        base: format!("{:.2}", frac(f.base_seen)),
        ratio: frac(f.fsmon_seen) / frac(f.base_seen),
        ratio_ci: None,
        paper: format!(
            "theirs all; generic {} ms blind",
            paper::BLIND_SPOT_GENERIC_MS
        ),
        ahead: f.fsmon_seen >= f.base_seen && f.fsmon_seen == total,
    });
    o
}

fn live_section(l: &LiveResult, rng: &mut Rng, heads: &mut Vec<Headline>) -> String {
    let mut o = String::from(
        "\n## Detection latency: write → record (experiment 6)\n\n\
         A 1-byte `write(2)` in a running container's layer → its record read from the \
         monitor's stdout by a reader polling the pipe without sleeping; fsmon, the baseline \
         and the floor (a bare blocking inotify `read(2)` in a thread of the bench, passing \
         each event through a pipe) take turns of 25 samples, the other monitor stopped \
         meanwhile. µs.\n\n\
         | monitor | samples | median [95 % CI] | p99 [95 % CI] |\n|---|---|---|---|\n",
    );
    let mut row = |name: &str, v: &[f64], rng: &mut Rng| {
        let _ = writeln!(
            o,
            "| {name} | {} | {} | {} |",
            v.len(),
            with_ci(median(v), bootstrap_ci(v, p50, RESAMPLES, 0.95, rng), 0),
            with_ci(
                quantile(v, 0.99),
                bootstrap_ci(v, p99, RESAMPLES, 0.95, rng),
                0
            ),
        );
    };
    row("fsmon", &l.fsmon_us, rng);
    row("inotifywait -r", &l.base_us, rng);
    row(
        "floor: bare blocking inotify read(2) → pipe",
        &l.floor_us,
        rng,
    );
    let r50 = median(&l.fsmon_us) / median(&l.base_us);
    let r99 = quantile(&l.fsmon_us, 0.99) / quantile(&l.base_us, 0.99);
    let c50 = bootstrap_ci2(
        &l.fsmon_us,
        &l.base_us,
        |a, b| p50(a) / p50(b),
        RESAMPLES,
        0.95,
        rng,
    );
    let c99 = bootstrap_ci2(
        &l.fsmon_us,
        &l.base_us,
        |a, b| p99(a) / p99(b),
        RESAMPLES,
        0.95,
        rng,
    );
    let _ = writeln!(
        o,
        "\nfsmon / baseline: median {}, p99 {}.",
        with_ci(r50, c50, 2),
        with_ci(r99, c99, 2)
    );
    heads.push(Headline {
        row: "write → record latency, median µs".into(),
        fsmon: num(median(&l.fsmon_us), 0),
        base: num(median(&l.base_us), 0),
        ratio: r50,
        ratio_ci: c50,
        paper: "—".into(),
        ahead: r50 <= 1.0,
    });
    heads.push(Headline {
        row: "write → record latency, p99 µs".into(),
        fsmon: num(quantile(&l.fsmon_us, 0.99), 0),
        base: num(quantile(&l.base_us, 0.99), 0),
        ratio: r99,
        ratio_ci: c99,
        paper: "—".into(),
        ahead: r99 <= 1.0,
    });

    let _ = write!(
        o,
        "\n## Throughput (experiment 5)\n\n\
         {} empty files made while the monitor is stopped (SIGSTOP), then drained; each file \
         is 2 kernel events (IN_CREATE, IN_CLOSE_WRITE); the other monitor is stopped \
         meanwhile.\n\n\
         | monitor | creates reported | records/s | kernel events/s | overflow |\n\
         |---|---|---|---|---|\n",
        l.burst
    );
    for (name, t) in [("fsmon", l.fsmon_tp), ("inotifywait -r", l.base_tp)] {
        let _ = writeln!(
            o,
            "| {name} | {} | {:.0} | {:.0} | {} |",
            t.seen,
            t.records_per_s,
            t.records_per_s * 2.0,
            if t.overflow { "**yes**" } else { "no" }
        );
    }
    let tr = l.fsmon_tp.records_per_s / l.base_tp.records_per_s;
    let _ = writeln!(o, "\nfsmon / baseline: {}.", num(tr, 2));
    heads.push(Headline {
        row: "drain throughput, records/s".into(),
        fsmon: num(l.fsmon_tp.records_per_s, 0),
        base: num(l.base_tp.records_per_s, 0),
        ratio: tr,
        ratio_ci: None,
        paper: "—".into(),
        ahead: tr >= 1.0 && l.fsmon_tp.seen >= l.base_tp.seen && !l.fsmon_tp.overflow,
    });

    let _ = write!(
        o,
        "\n## Subdirectory coverage: `mkdir -p` + immediate write (experiment 3, in part)\n\n\
         {} times, in a running container's layer: `mkdir -p race/i/a/b/c` and at once a \
         file `race/i/a/b/c/f`; the files each monitor reported (the other one stopped \
         meanwhile).\n\n\
         | monitor | files reported | of |\n|---|---|---|\n\
         | fsmon | {} | {} |\n\
         | inotifywait -r | {} | {} |\n",
        l.race, l.race_fsmon, l.race, l.race_base, l.race
    );
    if l.race > 0 {
        heads.push(Headline {
            row: "`mkdir -p` + immediate write: files reported (fraction)".into(),
            fsmon: format!("{:.2}", l.race_fsmon as f64 / l.race as f64),
            base: format!("{:.2}", l.race_base as f64 / l.race as f64),
            ratio: l.race_fsmon as f64 / l.race_base as f64,
            ratio_ci: None,
            paper: "theirs all".into(),
            ahead: l.race_fsmon >= l.race_base && l.race_fsmon == l.race,
        });
    }

    let per = l.rss_after_kib.saturating_sub(l.rss_before_kib);
    let _ = write!(
        o,
        "\n## Memory (experiment 5)\n\n\
         | fsmon VmRSS | KiB |\n|---|---|\n\
         | idle, no container | {} |\n\
         | one container, before {} directories | {} |\n\
         | after {} watched directories | {} |\n\
         | per watched directory | {:.2} |\n",
        l.rss_idle_kib,
        l.dirs,
        l.rss_before_kib,
        l.dirs,
        l.rss_after_kib,
        per as f64 / l.dirs.max(1) as f64
    );
    let _ = write!(
        o,
        "\n## Upperdir resolution, Docker (per lookup)\n\n\
         | method | µs |\n|---|---|\n\
         | overlay2 on-disk metadata (fsmon's choice) | {:.1} |\n\
         | inspect API over the socket (fallback) | {:.0} |\n",
        l.resolve_disk_us, l.resolve_api_us
    );
    o
}

fn storm_section(s: &StormResult) -> String {
    let mut o = format!(
        "\n## Scale: start storm (experiment 5)\n\n\
         {} containers, 4 at a time, 100 directories each, over both engines; fsmon under \
         `RLIMIT_NOFILE` {} (soft:hard). Started in {:.0} s; {} `docker run`s failed.\n\n\
         | | value |\n|---|---|\n",
        s.n, s.nofile, s.started_s, s.failed
    );
    let _ = writeln!(
        o,
        "| containers armed (`container_start`) | {} of {} |",
        s.armed, s.launched
    );
    let _ = writeln!(
        o,
        "| containers whose last first-instruction path was reported | {} of {} |",
        s.reported, s.launched
    );
    let mut all: Vec<f64> = s.arm_v1_us.iter().chain(&s.arm_v2_us).copied().collect();
    for (label, v) in [
        ("cgroup v1 engine (from its first cgroup)", &s.arm_v1_us),
        ("cgroup v2 engine", &s.arm_v2_us),
    ] {
        let _ = writeln!(
            o,
            "| cgroup mkdir → armed, {label}: median / p99 µs | {} / {} |",
            num(median(v), 0),
            num(quantile(v, 0.99), 0)
        );
    }
    let _ = writeln!(
        o,
        "| cgroup mkdir → armed, all: median / p99 / max µs | {} / {} / {} |",
        num(pct(&mut all, 0.5), 0),
        num(pct(&mut all, 0.99), 0),
        num(pct(&mut all, 1.0), 0)
    );
    let per = |a: u64, b: u64| b.saturating_sub(a) as f64 / s.launched.max(1) as f64;
    let _ = writeln!(
        o,
        "| fsmon RSS idle → all armed (MiB) | {:.1} → {:.1} |",
        s.rss0_kib as f64 / 1024.0,
        s.rss1_kib as f64 / 1024.0
    );
    let _ = writeln!(
        o,
        "| fsmon RSS per container (KiB) | {:.1} |",
        per(s.rss0_kib, s.rss1_kib)
    );
    let _ = writeln!(
        o,
        "| fsmon fds before → all armed | {} → {} |",
        s.fds0, s.fds1
    );
    let _ = writeln!(
        o,
        "| fsmon fds per container | {:.2} |",
        per(s.fds0 as u64, s.fds1 as u64)
    );
    let _ = writeln!(
        o,
        "| fsmon CPU with all running, idle (% of one core) | {:.2} |",
        s.idle_cpu_pct
    );
    if s.rss_trace.len() > 1 {
        // At most ~10 points of the trace, the last one always.
        let step = s.rss_trace.len().div_ceil(10);
        let mut pts: Vec<_> = s.rss_trace.iter().step_by(step).collect();
        if let Some(last) = s.rss_trace.last().filter(|l| pts.last() != Some(l)) {
            pts.push(last);
        }
        let pts: Vec<String> = pts
            .iter()
            .map(|(n, kib)| format!("{n}: {:.1}", *kib as f64 / 1024.0))
            .collect();
        let _ = writeln!(
            o,
            "| fsmon RSS along the storm (containers: MiB) | {} |",
            pts.join(", ")
        );
    }
    o
}

fn runtimes_section(r: &RuntimesResult) -> String {
    let mut o = String::from(
        "\n## Runtimes: upperdir resolution (`fsmon resolve --repeat 1000`, µs per lookup)\n\n\
         | runtime | fsmon arms with | step / method | median µs | min µs |\n\
         |---|---|---|---|---|\n",
    );
    for row in &r.resolve {
        let _ = writeln!(
            o,
            "| {} | {} | {} | {:.1} | {:.1} |",
            row.runtime, row.how, row.method, row.median_us, row.min_us
        );
    }
    let _ = write!(
        o,
        "\n## Runtimes: cgroup mkdir → armed (`arm_us`, {} containers each, µs)\n\n\
         | runtime | armed | median | p90 | max |\n|---|---|---|---|---|\n",
        r.runs
    );
    for (rt, v) in &r.arm_us {
        let _ = writeln!(
            o,
            "| {rt} | {}/{} | {} | {} | {} |",
            v.len(),
            r.runs,
            num(median(v), 0),
            num(quantile(v, 0.9), 0),
            num(quantile(v, 1.0), 0)
        );
    }
    o
}

/// What issue 13 asks for that this bench does not measure yet, with the paper's numbers.
fn missing_section() -> String {
    String::from(
        "\n## Not measured yet\n\n\
         - The blind spot in milliseconds (the paper's metric; we count missed paths).\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_report() -> Report {
        let ramp = |base: f64, n: usize| (0..n).map(|i| base + i as f64).collect::<Vec<_>>();
        Report {
            meta: Meta {
                command: "cargo xtask bench --quick".into(),
                quick: true,
                date: "2026-12-03T14:00:00Z".into(),
                commit: "40cfce1".into(),
                kernel: "6.18.0".into(),
                cpu: "Test CPU × 2".into(),
                docker: "27.0".into(),
                duration_s: 180.0,
                ..Meta::default()
            },
            seed: 1,
            start: vec![StartResult {
                label: "cgroup v1".into(),
                off: ramp(500.0, 20),
                fsmon: ramp(510.0, 20),
                base: ramp(530.0, 20),
                failed: [0, 0, 1],
                freeze_us: vec![100.0, 200.0],
            }],
            first: Some(FirstResult {
                script: "touch /f0".into(),
                runs: 5,
                paths: 6,
                fsmon_seen: 30,
                base_seen: 3,
                gone: "/gone".into(),
                gone_fsmon: 5,
                gone_base: 0,
                stalled_runs: 2,
                stalled_seen: 12,
                gated_us: vec![300_000.0, 310_000.0],
            }),
            live: Some(LiveResult {
                fsmon_us: ramp(50.0, 100),
                base_us: ramp(40.0, 100),
                floor_us: ramp(20.0, 100),
                burst: 1000,
                dirs: 1000,
                rss_before_kib: 10_000,
                rss_after_kib: 11_000,
                fsmon_tp: Throughput {
                    records_per_s: 2e5,
                    seen: 1000,
                    overflow: false,
                },
                base_tp: Throughput {
                    records_per_s: 1e5,
                    seen: 1000,
                    overflow: false,
                },
                race: 50,
                race_fsmon: 50,
                race_base: 31,
                ..LiveResult::default()
            }),
            storm: Some(StormResult {
                n: 20,
                launched: 20,
                armed: 20,
                reported: 20,
                arm_v1_us: vec![1000.0, 2000.0],
                arm_v2_us: vec![500.0],
                rss_trace: vec![(0, 1000), (20, 2000)],
                ..StormResult::default()
            }),
            runtimes: Some(RuntimesResult {
                runs: 3,
                resolve: vec![ResolveRow {
                    runtime: "docker".into(),
                    how: "layerdb".into(),
                    method: "layerdb".into(),
                    median_us: 12.0,
                    min_us: 10.0,
                }],
                arm_us: vec![("docker".into(), vec![1.0, 2.0, 3.0])],
            }),
            coverage: None,
            fairness: None,
            errors: vec![("fairness".into(), "boom".into())],
            plots: vec![("start".into(), "benchmarks-plots/start.png".into())],
            overhead: None,
        }
    }

    #[test]
    fn renders_every_section() {
        let md = render(&sample_report());
        for needle in [
            "# fsmon benchmarks",
            "`cargo xtask bench --quick`",
            "**Quick mode**",
            "| git commit | `40cfce1` |",
            "| kernel | 6.18.0 |",
            "| containerd | ? |",
            "## Summary",
            "## Start latency: `docker run --rm` wall time, cgroup v1",
            "715.8 (unmonitored) → 1729.2",
            "## Blind spot",
            "5.831 ms",
            "`/gone` (made and deleted at once, the first instruction): fsmon reported it in 5 of 5 containers, the baseline in 0 of 5.",
            "## Detection latency",
            "## Throughput",
            "## Memory",
            "| inotifywait -r | 31 | 50 |",
            "| `mkdir -p` + immediate write: files reported (fraction) | 1.00 | 0.62 | 1.61 | theirs all | yes |",
            "| per watched directory | 1.00 |",
            "## Scale: start storm",
            "## Runtimes: cgroup mkdir → armed",
            "| fsmon RSS along the storm (containers: MiB) | 0: 1.0, 20: 2.0 |",
            "| docker | 3/3 | 2 | 3 | 3 |",
            "## Not measured yet",
            "![start](benchmarks-plots/start.png)",
            "- **fairness**: boom",
        ] {
            assert!(md.contains(needle), "missing {needle:?} in\n{md}");
        }
    }

    #[test]
    fn headline_ratios_and_rows_behind() {
        let md = render(&sample_report());
        // fsmon latency median 99.5 → 100 (ramp 50..150, nearest rank) vs 90: behind.
        let row = md
            .lines()
            .find(|l| l.starts_with("| write → record latency, median µs | 100 | 90 | 1.11 ["))
            .unwrap_or_else(|| panic!("{md}"));
        assert!(row.contains("| — | **no**"), "{row}");
        // Added start latency: fsmon +10, baseline +30 → ahead, ratio 0.33.
        assert!(
            md.contains(
                "| start latency added, median ms (cgroup v1; ratio: of the wall times) | 10.0 ["
            ),
            "{md}"
        );
        assert!(md.contains("| 0.96 ["), "{md}");
        assert!(md.contains("] | +1013.4 | yes |"), "{md}");
        assert!(md.contains("| drain throughput, records/s | 200000 | 100000 | 2.00 | — | yes |"));
        assert!(md.contains("Rows where fsmon is not ahead: write → record latency, median µs; write → record latency, p99 µs."));
    }

    #[test]
    fn verdicts() {
        let h = |ahead, ci: Option<(f64, f64)>| Headline {
            row: String::new(),
            fsmon: String::new(),
            base: String::new(),
            ratio: 1.1,
            ratio_ci: ci.map(|(lo, hi)| Ci { lo, hi }),
            paper: String::new(),
            ahead,
        };
        assert_eq!(h(true, None).verdict(), "yes");
        assert_eq!(h(false, None).verdict(), "**no**");
        assert_eq!(h(false, Some((1.05, 1.2))).verdict(), "**no**");
        assert_eq!(
            h(false, Some((0.9, 1.2))).verdict(),
            "**no** (within noise)"
        );
    }

    #[test]
    fn deterministic_for_a_seed() {
        let r = sample_report();
        assert_eq!(render(&r), render(&r));
    }

    #[test]
    fn confidence_intervals_bracket_the_median() {
        let md = render(&sample_report());
        // The unmonitored median 510 (ramp 500..520) with its interval.
        let row = md
            .lines()
            .find(|l| l.starts_with("| no monitor | 20 | 510.0 ["))
            .unwrap_or_else(|| panic!("{md}"));
        let ci: Vec<f64> = row
            .split(['[', ']'])
            .nth(1)
            .unwrap_or_default()
            .split(", ")
            .map(|x| x.parse().unwrap_or(f64::NAN))
            .collect();
        assert!(ci[0] <= 510.0 && 510.0 <= ci[1], "{row}");
    }

    #[test]
    fn empty_samples_render_as_dashes() {
        let r = Report {
            start: vec![StartResult {
                label: "v2".into(),
                ..StartResult::default()
            }],
            live: Some(LiveResult::default()),
            ..Report::default()
        };
        let md = render(&r);
        assert!(!md.contains("NaN"), "{md}");
        assert!(md.contains("| fsmon | 0 | — | — |"), "{md}");
    }

    #[test]
    fn empty_report_still_renders() {
        let md = render(&Report::default());
        assert!(md.contains("## What was run"));
        assert!(!md.contains("## Summary"));
        assert!(md.contains("## Not measured yet"));
    }
}
