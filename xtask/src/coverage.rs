//! `cargo xtask bench --only coverage` (issue 13, experiment 3; the paper's Fig. 12):
//! subdirectory coverage over time.
//!
//! A seeded random workload makes and deletes directories in a running container's layer
//! at a steady rate (nested under random existing parents; `rmdir` of empty leaves, `rm -r`
//! of subtrees), with fsmon and the baseline (`inotifywait -r` on the upperdir) both
//! running. Every ~100 ms it samples the directories that exist, the ones each monitor
//! knows (reported created and not deleted since), and, at random times, it creates a file
//! in a random existing directory: a directory is *covered* if such a file is reported.
//! At the end every directory still there gets one more file (a sweep of the watches). The
//! detection delay of a directory is mkdir(2) returning → its record read from the
//! monitor's stdout.

use std::{
    collections::{HashMap, HashSet},
    fmt::Write as _,
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use serde_json::Value;

use crate::{
    bench::{inotifywait_on, Live, Monitor},
    engines::V1_HOST,
    report::{num, paper, with_ci, Headline},
    stats::{bootstrap_ci, pct, quantile, Rng, RESAMPLES},
};

/// One coverage run's measurements.
#[derive(Clone, Debug, Default)]
pub struct CoverageResult {
    /// Workload length, s, and the time between two directory operations, ms.
    pub secs: f64,
    pub op_ms: f64,
    /// Directories made, and removed (by `rmdir` or inside an `rm -r`).
    pub created: usize,
    pub removed: usize,
    /// Directories made that each monitor reported created.
    pub fsmon_detected: usize,
    pub base_detected: usize,
    /// mkdir returned → record read, µs, per detected directory.
    pub fsmon_delay_us: Vec<f64>,
    pub base_delay_us: Vec<f64>,
    /// Files made at random times in random existing directories, and how many each
    /// monitor did not report.
    pub probes: usize,
    pub fsmon_probe_missed: usize,
    pub base_probe_missed: usize,
    /// The final sweep: directories existing at the end (one file made in each), and how
    /// many of these files each monitor reported.
    pub sweep: usize,
    pub fsmon_sweep_seen: usize,
    pub base_sweep_seen: usize,
    /// Largest |known − existing| over the samples, per monitor.
    pub fsmon_max_gap: usize,
    pub base_max_gap: usize,
    /// (s since start, existing, known to fsmon, known to the baseline), every ~100 ms.
    pub trace: Vec<(f64, usize, usize, usize)>,
}

/// What a monitor's line says about the workload's tree (paths in the container's terms).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ev {
    DirCreate(String),
    DirDelete(String),
    DirMove(String, String),
    FileCreate(String),
}

/// An fsmon record about container `id` → [`Ev`].
pub fn parse_fsmon(line: &str, id: &str) -> Option<Ev> {
    let v: Value = serde_json::from_str(line).ok()?;
    if v["container"]["id"].as_str() != Some(id) {
        return None;
    }
    let path = v["path"].as_str()?.to_owned();
    let dir = v["is_dir"].as_bool() == Some(true);
    match (v["kind"].as_str()?, dir) {
        ("create", true) => Some(Ev::DirCreate(path)),
        ("create", false) => Some(Ev::FileCreate(path)),
        ("delete", true) => Some(Ev::DirDelete(path)),
        ("rename", true) => Some(Ev::DirMove(v["old_path"].as_str()?.to_owned(), path)),
        _ => None,
    }
}

/// An `inotifywait -r --format '%w%f %e'` line on `upper` → [`Ev`].
pub fn parse_inotifywait(line: &str, upper: &str) -> Option<Ev> {
    let line = line.trim_end_matches('\n');
    let (path, events) = line.rsplit_once(' ')?;
    let path = path.strip_prefix(upper)?;
    let path = if path.is_empty() { "/" } else { path }.to_owned();
    let has = |e: &str| events.split(',').any(|x| x == e);
    match (
        has("ISDIR"),
        has("CREATE"),
        has("DELETE"),
        has("MOVED_TO"),
        has("MOVED_FROM"),
    ) {
        (true, true, ..) | (true, _, _, true, _) => Some(Ev::DirCreate(path)),
        (true, _, true, ..) | (true, .., true) => Some(Ev::DirDelete(path)),
        (false, true, ..) => Some(Ev::FileCreate(path)),
        _ => None,
    }
}

/// The directories a monitor knows: reported created (or moved in) and not deleted since.
/// A deleted directory takes what was below it along.
#[derive(Clone, Debug, Default)]
pub struct Known(HashSet<String>);

impl Known {
    pub fn apply(&mut self, ev: &Ev) {
        match ev {
            Ev::DirCreate(p) => {
                self.0.insert(p.clone());
            }
            Ev::DirDelete(p) => self.remove_tree(p),
            Ev::DirMove(from, to) => {
                let below = format!("{from}/");
                let moved: Vec<String> = self
                    .0
                    .iter()
                    .filter(|k| *k == from || k.starts_with(&below))
                    .cloned()
                    .collect();
                for k in moved {
                    self.0.remove(&k);
                    self.0.insert(format!("{to}{}", &k[from.len()..]));
                }
            }
            Ev::FileCreate(_) => {}
        }
    }

    fn remove_tree(&mut self, p: &str) {
        let below = format!("{p}/");
        self.0.retain(|k| k != p && !k.starts_with(&below));
    }

    /// Known directories under `root` (`root` itself excluded).
    pub fn count_under(&self, root: &str) -> usize {
        let below = format!("{root}/");
        self.0.iter().filter(|k| k.starts_with(&below)).count()
    }
}

/// Per created path, the delay (µs) from its creation to its first sighting; paths never
/// seen are left out.
pub fn delays_us(created: &HashMap<String, Instant>, seen: &HashMap<String, Instant>) -> Vec<f64> {
    let mut v: Vec<f64> = created
        .iter()
        .filter_map(|(p, t0)| {
            seen.get(p)
                .map(|t| t.saturating_duration_since(*t0).as_secs_f64() * 1e6)
        })
        .collect();
    v.sort_by(f64::total_cmp);
    v
}

/// The workload's own tree: each directory with its subdirectory and file counts.
#[derive(Default)]
struct Tree {
    /// path → (subdirectories, files).
    dirs: HashMap<String, (usize, usize)>,
    /// The same paths, in a stable order for seeded picks.
    order: Vec<String>,
}

impl Tree {
    fn add(&mut self, p: String) {
        if let Some((parent, _)) = p.rsplit_once('/') {
            if let Some(e) = self.dirs.get_mut(parent) {
                e.0 += 1;
            }
        }
        self.dirs.insert(p.clone(), (0, 0));
        self.order.push(p);
    }

    /// Removes `p` and what is below it; how many directories went.
    fn remove_tree(&mut self, p: &str) -> usize {
        let below = format!("{p}/");
        let before = self.order.len();
        self.order.retain(|k| k != p && !k.starts_with(&below));
        self.dirs.retain(|k, _| k != p && !k.starts_with(&below));
        if let Some((parent, _)) = p.rsplit_once('/') {
            if let Some(e) = self.dirs.get_mut(parent) {
                e.0 = e.0.saturating_sub(1);
            }
        }
        before - self.order.len()
    }

    /// Per directory, how many directories its subtree holds (itself included).
    fn subtree_sizes(&self) -> HashMap<&str, usize> {
        let mut n: HashMap<&str, usize> = HashMap::new();
        for p in &self.order {
            let mut q = p.as_str();
            loop {
                *n.entry(q).or_default() += 1;
                match q.rsplit_once('/') {
                    Some((parent, _)) if !parent.is_empty() => q = parent,
                    _ => break,
                }
            }
        }
        n
    }

    fn pick(&self, rng: &mut Rng, f: impl Fn(&str, (usize, usize)) -> bool) -> Option<String> {
        let c: Vec<&String> = self.order.iter().filter(|p| f(p, self.dirs[*p])).collect();
        (!c.is_empty()).then(|| c[rng.below(c.len())].clone())
    }
}

/// The workload's root inside the container.
const ROOT: &str = "/cov";

/// Per monitor: what it knows, and when it first reported each path.
#[derive(Default)]
struct Seen {
    known: Known,
    first: HashMap<String, Instant>,
}

impl Seen {
    fn on(&mut self, t: Instant, ev: Option<Ev>) {
        let Some(ev) = ev else { return };
        if let Ev::DirCreate(p) | Ev::FileCreate(p) = &ev {
            self.first.entry(p.clone()).or_insert(t);
        }
        self.known.apply(&ev);
    }
}

fn pump(m: &mut Monitor, b: &mut Monitor, fs: &mut Seen, bs: &mut Seen, id: &str, upper: &str) {
    m.read_lines(|t, l| {
        fs.on(
            t,
            parse_fsmon(std::str::from_utf8(l).unwrap_or_default(), id),
        )
    });
    b.read_lines(|t, l| {
        bs.on(
            t,
            parse_inotifywait(std::str::from_utf8(l).unwrap_or_default(), upper),
        )
    });
}

/// Sleeps in poll(2) on both monitors' pipes until one has data or `until`.
fn wait_any(m: &Monitor, b: &Monitor, until: Instant) {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return;
    }
    let mut fds = [m.out.as_raw_fd(), b.out.as_raw_fd()].map(|fd| libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    });
    // SAFETY: two valid pollfds.
    unsafe { libc::poll(fds.as_mut_ptr(), 2, left.as_millis().max(1) as i32) };
}

/// Runs the workload for `secs` seconds (a directory operation every `op_ms`).
pub fn coverage(bin: &Path, quick: bool, seed: u64) -> Result<CoverageResult> {
    let secs = if quick { 8.0 } else { 120.0 };
    let op = Duration::from_millis(10);
    let target = if quick { 150 } else { 400 };
    let mut m = Monitor::fsmon(bin, &[V1_HOST])?;
    let live = Live::start()?;
    m.wait(Duration::from_secs(10), |l| {
        l.contains("container_start") && l.contains(&live.id)
    })?;
    let mut b = inotifywait_on(&live.upper)?;
    let upper = live.upper.to_string_lossy().into_owned();
    let id = live.id.clone();
    let host = |p: &str| live.merged.join(p.trim_start_matches('/'));
    let (mut fs, mut bs) = (Seen::default(), Seen::default());
    std::fs::create_dir(host(ROOT))?;
    let mut tree = Tree::default();
    tree.dirs.insert(ROOT.into(), (0, 0));
    tree.order.push(ROOT.into());
    std::thread::sleep(Duration::from_millis(300));
    pump(&mut m, &mut b, &mut fs, &mut bs, &id, &upper);

    let mut rng = Rng::new(seed);
    let mut created: HashMap<String, Instant> = HashMap::new();
    // (file, its directory).
    let mut probes: Vec<(String, String)> = Vec::new();
    let (mut removed, mut n) = (0usize, 0usize);
    let mut trace = Vec::new();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    let (mut next_op, mut next_sample) = (t0, t0);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        if now >= next_op {
            // A steady rate: operations missed while this thread was not running are
            // skipped, not made in a burst.
            next_op = (next_op + op).max(now);
            let count = tree.order.len() - 1;
            let r = rng.below(1000);
            // Grow to `target`, then churn around it.
            let grow = if count < target { 700 } else { 480 };
            if r < grow || count < 5 {
                // mkdir under a random existing directory.
                let parent = tree
                    .pick(&mut rng, |_, _| true)
                    .unwrap_or_else(|| ROOT.into());
                n += 1;
                let p = format!("{parent}/d{n}");
                std::fs::create_dir(host(&p))?;
                created.insert(p.clone(), Instant::now());
                tree.add(p);
            } else if r < 970 {
                // rmdir of a random empty leaf.
                if let Some(p) = tree.pick(&mut rng, |p, (d, f)| p != ROOT && d == 0 && f == 0) {
                    std::fs::remove_dir(host(&p))?;
                    removed += tree.remove_tree(&p);
                }
            } else if let Some(p) = {
                // rm -r of a random subtree of at most a tenth of the tree.
                let sizes = tree.subtree_sizes();
                let most = (count / 10).max(3);
                tree.pick(&mut rng, |p, _| {
                    p != ROOT && sizes.get(p).is_some_and(|&n| n <= most)
                })
            } {
                std::fs::remove_dir_all(host(&p))?;
                removed += tree.remove_tree(&p);
            }
            // A coverage probe, every 5 operations on average.
            if rng.below(5) == 0 {
                if let Some(d) = tree.pick(&mut rng, |_, _| true) {
                    n += 1;
                    let p = format!("{d}/f{n}");
                    std::fs::write(host(&p), b"x")?;
                    if let Some(e) = tree.dirs.get_mut(&d) {
                        e.1 += 1;
                    }
                    probes.push((p, d));
                }
            }
        }
        pump(&mut m, &mut b, &mut fs, &mut bs, &id, &upper);
        let now = Instant::now();
        if now >= next_sample {
            next_sample = (next_sample + Duration::from_millis(100)).max(now);
            trace.push((
                now.duration_since(t0).as_secs_f64(),
                tree.order.len() - 1,
                fs.known.count_under(ROOT),
                bs.known.count_under(ROOT),
            ));
        }
        wait_any(&m, &b, next_op.min(next_sample));
    }
    // What is still in flight.
    let settle = |m: &mut Monitor, b: &mut Monitor, fs: &mut Seen, bs: &mut Seen| {
        let quiet_until = Instant::now() + Duration::from_secs(2);
        while Instant::now() < quiet_until {
            pump(m, b, fs, bs, &id, &upper);
            wait_any(m, b, quiet_until);
        }
    };
    settle(&mut m, &mut b, &mut fs, &mut bs);
    // The sweep: one file in every directory still there.
    let sweep: Vec<String> = tree.order.iter().map(|d| format!("{d}/sweep")).collect();
    for p in &sweep {
        std::fs::write(host(p), b"x")?;
        pump(&mut m, &mut b, &mut fs, &mut bs, &id, &upper);
    }
    settle(&mut m, &mut b, &mut fs, &mut bs);
    m.stop();
    b.stop();
    let exist = tree.order.len() - 1;
    let gap = |k: fn(&(f64, usize, usize, usize)) -> usize| {
        trace.iter().map(|s| k(s).abs_diff(s.1)).max().unwrap_or(0)
    };
    for (p, d) in &probes {
        for (name, s) in [("fsmon", &fs), ("inotifywait -r", &bs)] {
            if !s.first.contains_key(p) {
                let age = created
                    .get(d)
                    .map_or("?".into(), |t| format!("{:?}", t.elapsed()));
                eprintln!("coverage: {name} missed probe {p} (its directory made {age} ago)");
            }
        }
    }
    let res = CoverageResult {
        secs,
        op_ms: op.as_secs_f64() * 1e3,
        created: created.len(),
        removed,
        fsmon_detected: created.keys().filter(|p| fs.first.contains_key(*p)).count(),
        base_detected: created.keys().filter(|p| bs.first.contains_key(*p)).count(),
        fsmon_delay_us: delays_us(&created, &fs.first),
        base_delay_us: delays_us(&created, &bs.first),
        probes: probes.len(),
        fsmon_probe_missed: probes
            .iter()
            .filter(|p| !fs.first.contains_key(&p.0))
            .count(),
        base_probe_missed: probes
            .iter()
            .filter(|p| !bs.first.contains_key(&p.0))
            .count(),
        sweep: sweep.len(),
        fsmon_sweep_seen: sweep.iter().filter(|p| fs.first.contains_key(*p)).count(),
        base_sweep_seen: sweep.iter().filter(|p| bs.first.contains_key(*p)).count(),
        fsmon_max_gap: gap(|s| s.2),
        base_max_gap: gap(|s| s.3),
        trace,
    };
    eprintln!(
        "coverage: at the end {exist} directories, fsmon knows {}, the baseline {}",
        fs.known.count_under(ROOT),
        bs.known.count_under(ROOT)
    );
    drop(live);
    Ok(res)
}

/// The report section; pushes its summary rows onto `heads`.
pub fn section(c: &CoverageResult, rng: &mut Rng, heads: &mut Vec<Headline>) -> String {
    let mut o = format!(
        "\n## Subdirectory coverage over time (experiment 3, paper Fig. 12)\n\n\
         A seeded random workload in a running container's layer for {:.0} s, one directory \
         operation every {:.0} ms (`mkdir` under a random existing directory, `rmdir` of an \
         empty leaf, now and then `rm -r` of a random subtree), fsmon and the baseline \
         (`inotifywait -r` on the upperdir) running side by side. Coverage probes: a file \
         made in a random existing directory every ~{:.0} ms; at the end, one file in every \
         directory still there (the sweep). Detection delay: `mkdir(2)` returns → the \
         directory's record read from the monitor's stdout (µs).\n\n\
         {} directories made, {} removed, {} left at the end.\n\n\
         | monitor | dirs detected | of | probe files missed | of | sweep files reported | of | max gap known vs existing | delay median [95 % CI] | p99 [95 % CI] | max | mean |\n\
         |---|---|---|---|---|---|---|---|---|---|---|---|\n",
        c.secs,
        c.op_ms,
        c.op_ms * 5.0,
        c.created,
        c.removed,
        c.sweep.saturating_sub(1),
    );
    let p99 = |v: &mut [f64]| pct(v, 0.99);
    let p50 = |v: &mut [f64]| pct(v, 0.5);
    for (name, det, d, miss, sw, gap) in [
        (
            "fsmon",
            c.fsmon_detected,
            &c.fsmon_delay_us,
            c.fsmon_probe_missed,
            c.fsmon_sweep_seen,
            c.fsmon_max_gap,
        ),
        (
            "inotifywait -r",
            c.base_detected,
            &c.base_delay_us,
            c.base_probe_missed,
            c.base_sweep_seen,
            c.base_max_gap,
        ),
    ] {
        let _ = writeln!(
            o,
            "| {name} | {det} | {} | {miss} | {} | {sw} | {} | {gap} | {} | {} | {} | {} |",
            c.created,
            c.probes,
            c.sweep,
            with_ci(
                quantile(d, 0.5),
                bootstrap_ci(d, p50, RESAMPLES, 0.95, rng),
                0
            ),
            with_ci(
                quantile(d, 0.99),
                bootstrap_ci(d, p99, RESAMPLES, 0.95, rng),
                0
            ),
            num(quantile(d, 1.0), 0),
            num(mean(d), 0),
        );
    }
    let _ = writeln!(
        o,
        "\nThe gap column is sampled every ~100 ms while the workload runs, so it includes \
         records in flight. A delay of a few µs means the record was already in the pipe \
         when `mkdir(2)` returned (overlayfs makes the directory in the upper layer, which \
         fires the watch, before it returns to the caller); the bench reads both pipes \
         between operations (poll(2)), so that is the resolution. Paper: every directory \
         detected, {} ms average delay.",
        paper::COVERAGE_DELAY_MS
    );
    let frac = |a: usize, b: usize| a as f64 / b.max(1) as f64;
    let fd = frac(c.fsmon_detected, c.created);
    let bd = frac(c.base_detected, c.created);
    heads.push(Headline {
        row: "directories detected, random workload (fraction)".into(),
        fsmon: format!("{fd:.3}"),
        base: format!("{bd:.3}"),
        ratio: fd / bd,
        ratio_ci: None,
        paper: "all".into(),
        ahead: c.fsmon_detected >= c.base_detected && c.fsmon_detected == c.created,
    });
    let fm = c.fsmon_probe_missed + (c.sweep - c.fsmon_sweep_seen);
    let bm = c.base_probe_missed + (c.sweep - c.base_sweep_seen);
    heads.push(Headline {
        row: "coverage: probe + sweep files missed".into(),
        fsmon: fm.to_string(),
        base: bm.to_string(),
        ratio: fm as f64 / bm as f64,
        ratio_ci: None,
        paper: "0".into(),
        ahead: fm <= bm && fm == 0,
    });
    let r = quantile(&c.fsmon_delay_us, 0.5) / quantile(&c.base_delay_us, 0.5);
    heads.push(Headline {
        row: "directory detection delay, median µs".into(),
        fsmon: num(quantile(&c.fsmon_delay_us, 0.5), 0),
        base: num(quantile(&c.base_delay_us, 0.5), 0),
        ratio: r,
        ratio_ci: crate::stats::bootstrap_ci2(
            &c.fsmon_delay_us,
            &c.base_delay_us,
            |a, b| pct(a, 0.5) / pct(b, 0.5),
            RESAMPLES,
            0.95,
            rng,
        ),
        paper: format!("{:.0} (mean)", paper::COVERAGE_DELAY_MS * 1e3),
        ahead: r <= 1.0,
    });
    o
}

/// The mean of `v`; NaN when empty.
fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The trace: directories existing, known to fsmon and to the baseline, over time.
pub fn trace_png(path: &Path, c: &CoverageResult) -> Result<()> {
    let e = |e: &dyn std::fmt::Display| anyhow!("{e}");
    let xmax = c.trace.last().map_or(1.0, |s| s.0).max(1.0);
    let ymax = c
        .trace
        .iter()
        .map(|s| s.1.max(s.2).max(s.3))
        .max()
        .unwrap_or(1)
        .max(1) as f64
        * 1.15;
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|x| e(&x))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Directories over time: existing vs known to each monitor",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|x| e(&x))?;
    chart
        .configure_mesh()
        .x_desc("time (s)")
        .y_desc("directories")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|x| e(&x))?;
    type Pick = fn(&(f64, usize, usize, usize)) -> usize;
    let series: [(&str, Pick, u32); 3] = [
        ("existing (workload)", |s| s.1, 5),
        ("known to fsmon", |s| s.2, 3),
        ("known to inotifywait -r", |s| s.3, 1),
    ];
    for (k, (name, f, w)) in series.into_iter().enumerate() {
        let color = crate::plots::COLORS[k % crate::plots::COLORS.len()];
        let pts: Vec<(f64, f64)> = c.trace.iter().map(|s| (s.0, f(s) as f64)).collect();
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(w)))
            .map_err(|x| e(&x))?
            .label(name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(w))
            });
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|x| e(&x))?;
    root.present().map_err(|x| e(&x))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "c0ffee";

    fn rec(kind: &str, path: &str, dir: bool) -> String {
        format!(
            r#"{{"time":"t","kind":"{kind}","container":{{"id":"{ID}"}},"path":"{path}","is_dir":{dir},"source":"inotify"}}"#
        )
    }

    #[test]
    fn fsmon_records_to_events() {
        assert_eq!(
            parse_fsmon(&rec("create", "/cov/d1", true), ID),
            Some(Ev::DirCreate("/cov/d1".into()))
        );
        assert_eq!(
            parse_fsmon(&rec("create", "/cov/f2", false), ID),
            Some(Ev::FileCreate("/cov/f2".into()))
        );
        assert_eq!(
            parse_fsmon(&rec("delete", "/cov/d1", true), ID),
            Some(Ev::DirDelete("/cov/d1".into()))
        );
        // A file's delete, another container, other kinds: nothing.
        assert_eq!(parse_fsmon(&rec("delete", "/cov/f2", false), ID), None);
        assert_eq!(parse_fsmon(&rec("create", "/cov/d1", true), "other"), None);
        assert_eq!(parse_fsmon(&rec("modify", "/cov/f2", false), ID), None);
        assert_eq!(parse_fsmon(r#"{"kind":"ready"}"#, ID), None);
        let mv = r#"{"kind":"rename","container":{"id":"c0ffee"},"path":"/b","old_path":"/a","is_dir":true}"#;
        assert_eq!(
            parse_fsmon(mv, ID),
            Some(Ev::DirMove("/a".into(), "/b".into()))
        );
    }

    #[test]
    fn inotifywait_lines_to_events() {
        let u = "/var/lib/docker/overlay2/x/diff";
        let p = |l: &str| parse_inotifywait(l, u);
        assert_eq!(
            p(&format!("{u}/cov/d1 CREATE,ISDIR\n")),
            Some(Ev::DirCreate("/cov/d1".into()))
        );
        assert_eq!(
            p(&format!("{u}/cov/d1 DELETE,ISDIR")),
            Some(Ev::DirDelete("/cov/d1".into()))
        );
        assert_eq!(
            p(&format!("{u}/cov/d2 MOVED_TO,ISDIR")),
            Some(Ev::DirCreate("/cov/d2".into()))
        );
        assert_eq!(
            p(&format!("{u}/cov/d1 MOVED_FROM,ISDIR")),
            Some(Ev::DirDelete("/cov/d1".into()))
        );
        assert_eq!(
            p(&format!("{u}/cov/f3 CREATE")),
            Some(Ev::FileCreate("/cov/f3".into()))
        );
        assert_eq!(p(&format!("{u}/cov/f3 CLOSE_WRITE,CLOSE")), None);
        assert_eq!(p("/elsewhere/d CREATE,ISDIR"), None);
    }

    #[test]
    fn known_dirs_follow_creates_deletes_and_moves() {
        let mut k = Known::default();
        for p in [
            "/cov",
            "/cov/a",
            "/cov/a/b",
            "/cov/a/b/c",
            "/cov/ab",
            "/cov/x",
        ] {
            k.apply(&Ev::DirCreate(p.into()));
        }
        k.apply(&Ev::FileCreate("/cov/a/f".into()));
        assert_eq!(k.count_under("/cov"), 5);
        // Deleting /cov/a takes its subtree, not its sibling /cov/ab.
        k.apply(&Ev::DirDelete("/cov/a".into()));
        assert_eq!(k.count_under("/cov"), 2);
        k.apply(&Ev::DirCreate("/cov/x/y".into()));
        k.apply(&Ev::DirMove("/cov/x".into(), "/cov/z".into()));
        assert!(k.0.contains("/cov/z/y") && !k.0.contains("/cov/x"));
        assert_eq!(k.count_under("/cov"), 3);
        // A delete of something unknown is harmless.
        k.apply(&Ev::DirDelete("/cov/nope".into()));
        assert_eq!(k.count_under("/cov"), 3);
    }

    #[test]
    fn delays_of_the_seen_paths_only() {
        let t0 = Instant::now();
        let created: HashMap<String, Instant> =
            [("/a".to_owned(), t0), ("/b".to_owned(), t0)].into();
        let seen: HashMap<String, Instant> = [
            ("/a".to_owned(), t0 + Duration::from_micros(400)),
            ("/other".to_owned(), t0),
        ]
        .into();
        let d = delays_us(&created, &seen);
        assert_eq!(d.len(), 1);
        assert!((d[0] - 400.0).abs() < 1.0, "{d:?}");
    }

    #[test]
    fn section_renders_rows_and_headlines() {
        let c = CoverageResult {
            secs: 8.0,
            op_ms: 10.0,
            created: 10,
            fsmon_detected: 10,
            base_detected: 9,
            fsmon_delay_us: vec![10.0, 20.0, 30.0],
            base_delay_us: vec![100.0, 200.0],
            probes: 5,
            base_probe_missed: 1,
            sweep: 3,
            fsmon_sweep_seen: 3,
            base_sweep_seen: 3,
            ..CoverageResult::default()
        };
        let mut heads = Vec::new();
        let md = section(&c, &mut Rng::new(1), &mut heads);
        assert!(
            md.contains("| fsmon | 10 | 10 | 0 | 5 | 3 | 3 | 0 | 20 ["),
            "{md}"
        );
        assert!(md.contains("| inotifywait -r | 9 | 10 | 1 | 5 |"), "{md}");
        assert_eq!(heads.len(), 3);
        assert!(heads.iter().all(|h| h.ahead));
        let mut heads = Vec::new();
        let md = section(&CoverageResult::default(), &mut Rng::new(1), &mut heads);
        assert!(!md.contains("NaN"), "{md}");
    }

    #[test]
    fn tree_picks_and_removes() {
        let mut t = Tree::default();
        t.dirs.insert(ROOT.into(), (0, 0));
        t.order.push(ROOT.into());
        t.add("/cov/d1".into());
        t.add("/cov/d1/d2".into());
        t.add("/cov/d3".into());
        assert_eq!(t.dirs["/cov"].0, 2);
        let mut rng = Rng::new(1);
        for _ in 0..20 {
            let leaf = t
                .pick(&mut rng, |p, (d, f)| p != ROOT && d == 0 && f == 0)
                .expect("leaves");
            assert!(leaf == "/cov/d1/d2" || leaf == "/cov/d3", "{leaf}");
        }
        let n = t.subtree_sizes();
        assert_eq!((n["/cov"], n["/cov/d1"], n["/cov/d1/d2"]), (4, 2, 1));
        assert_eq!(t.remove_tree("/cov/d1"), 2);
        assert_eq!(t.dirs["/cov"].0, 1);
        assert_eq!(t.order, ["/cov", "/cov/d3"]);
    }
}
