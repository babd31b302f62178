//! PNG plots of a bench [`Report`] (with `plotters`, pure Rust; text in a system TTF font):
//! start-latency and write → record latency distributions (ECDFs), and fsmon's RSS along
//! the start storm.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;

use crate::{
    report::{Report, StormResult},
    stats::quantile,
};

/// The empirical CDF of `v`: (value, fraction of samples ≤ value), sorted; non-finite
/// values dropped.
pub fn ecdf(v: &[f64]) -> Vec<(f64, f64)> {
    let mut s: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    s.sort_by(f64::total_cmp);
    let n = s.len() as f64;
    s.iter()
        .enumerate()
        .map(|(i, &x)| (x, (i + 1) as f64 / n))
        .collect()
}

/// The x range of an ECDF plot of `series`: from the smallest sample to 1.2 × the largest
/// p99 (the tails beyond it would squash the rest), never empty.
pub fn ecdf_range(series: &[&[f64]]) -> Option<(f64, f64)> {
    let lo = series
        .iter()
        .flat_map(|s| s.iter().copied())
        .filter(|x| x.is_finite())
        .min_by(f64::total_cmp)?;
    let hi = series
        .iter()
        .filter(|s| !s.is_empty())
        .map(|s| quantile(s, 0.99))
        .fold(f64::MIN, f64::max)
        * 1.2;
    let hi = if hi > lo { hi } else { lo + 1.0 };
    Some((lo.min(hi) * 0.95, hi))
}

const FONT_PATHS: [&str; 5] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu-sans-fonts/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
];

/// Registers a system TTF font as plotters' "sans-serif" (once).
fn font() -> Result<()> {
    static DONE: OnceLock<Result<(), String>> = OnceLock::new();
    DONE.get_or_init(|| {
        let bytes = FONT_PATHS
            .iter()
            .find_map(|p| std::fs::read(p).ok())
            .ok_or_else(|| format!("no TTF font found (tried {})", FONT_PATHS.join(", ")))?;
        let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
        plotters::style::register_font("sans-serif", FontStyle::Normal, bytes)
            .map_err(|_| "invalid font".to_owned())
    })
    .clone()
    .map_err(|e| anyhow!(e))
}

pub(crate) const COLORS: [RGBColor; 3] = [
    RGBColor(90, 90, 90),
    RGBColor(31, 119, 180),
    RGBColor(214, 39, 40),
];

/// An ECDF plot of `series` (name, samples) to `path`.
fn ecdf_png(path: &Path, title: &str, xlabel: &str, series: &[(&str, &[f64])]) -> Result<()> {
    let samples: Vec<&[f64]> = series.iter().map(|(_, s)| *s).collect();
    let Some((x0, x1)) = ecdf_range(&samples) else {
        bail!("no samples for {title}");
    };
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x0..x1, 0f64..1.02f64)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc(xlabel)
        .y_desc("fraction of samples ≤ x")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    for (k, (name, s)) in series.iter().enumerate() {
        let color = COLORS[k % COLORS.len()];
        // A step line, cut at the right edge.
        let mut pts = Vec::new();
        let mut prev = 0.0;
        for (x, y) in ecdf(s) {
            if x > x1 {
                break;
            }
            pts.push((x, prev));
            pts.push((x, y));
            prev = y;
        }
        pts.push((x1, prev));
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))
            .map_err(|e| anyhow!("{e}"))?
            .label(format!("{name} (n = {})", s.len()))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .label_font(("sans-serif", 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::LowerRight)
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// fsmon's RSS against the number of containers started, along the storm.
fn storm_png(path: &Path, s: &StormResult) -> Result<()> {
    let pts: Vec<(f64, f64)> = s
        .rss_trace
        .iter()
        .map(|&(n, kib)| (n as f64, kib as f64 / 1024.0))
        .collect();
    let xmax = pts.iter().map(|p| p.0).fold(1.0, f64::max);
    let ymax = pts.iter().map(|p| p.1).fold(1.0, f64::max) * 1.15;
    let root = BitMapBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("{e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            format!(
                "fsmon RSS during a start storm of {} containers",
                s.launched
            ),
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0f64..xmax, 0f64..ymax)
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .configure_mesh()
        .x_desc("containers started")
        .y_desc("fsmon VmRSS (MiB)")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(LineSeries::new(pts.clone(), COLORS[1].stroke_width(2)))
        .map_err(|e| anyhow!("{e}"))?;
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 3, COLORS[1].filled())))
        .map_err(|e| anyhow!("{e}"))?;
    root.present().map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

fn slug(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect()
}

/// Draws one plot to the path given.
type Draw<'a> = Box<dyn Fn(&Path) -> Result<()> + 'a>;

/// Writes the plots of `rep` beside the report at `report` (in `<stem>-plots/`); returns
/// (title, path relative to the report) of each plot made. A plot that cannot be made is
/// said on stderr and left out.
pub fn write(rep: &Report, report: &Path) -> Vec<(String, String)> {
    let stem = report
        .file_stem()
        .map_or("benchmarks".into(), |s| s.to_string_lossy().into_owned());
    let rel_dir = format!("{stem}-plots");
    let dir: PathBuf = report
        .parent()
        .unwrap_or_else(|| Path::new("."))
        .join(&rel_dir);
    let mut jobs: Vec<(String, String, Draw<'_>)> = Vec::new();
    for s in &rep.start {
        let title = format!("docker run wall time, {} (ECDF)", s.label);
        jobs.push((
            title.clone(),
            format!("start-latency-{}.png", slug(&s.label)),
            Box::new(move |p| {
                ecdf_png(
                    p,
                    &title,
                    "docker run --rm wall time (ms)",
                    &[
                        ("no monitor", &s.off),
                        ("fsmon", &s.fsmon),
                        ("inotifywait -r at start event", &s.base),
                    ],
                )
            }),
        ));
    }
    if let Some(l) = &rep.live {
        let title = "write → record latency (ECDF)".to_owned();
        jobs.push((
            title.clone(),
            "latency.png".into(),
            Box::new(move |p| {
                ecdf_png(
                    p,
                    &title,
                    "1-byte write → record read (µs)",
                    &[
                        ("floor: bare inotify read", &l.floor_us),
                        ("fsmon", &l.fsmon_us),
                        ("inotifywait -r", &l.base_us),
                    ],
                )
            }),
        ));
    }
    if let Some(s) = rep.storm.as_ref().filter(|s| s.rss_trace.len() > 1) {
        jobs.push((
            "fsmon RSS vs containers (start storm)".into(),
            "storm-rss.png".into(),
            Box::new(move |p| storm_png(p, s)),
        ));
    }
    if let Some(o) = &rep.overhead {
        jobs.push(crate::bench::overhead::plot_job(o, rep.seed));
    }
    if let Some(c) = rep.coverage.as_ref().filter(|c| c.trace.len() > 1) {
        jobs.push((
            "directories over time: existing vs known (coverage)".into(),
            "coverage.png".into(),
            Box::new(move |p| crate::coverage::trace_png(p, c)),
        ));
    }
    if jobs.is_empty() {
        return Vec::new();
    }
    if let Err(e) = font().and_then(|()| Ok(std::fs::create_dir_all(&dir)?)) {
        eprintln!("bench: no plots: {e:#}");
        return Vec::new();
    }
    let mut made = Vec::new();
    for (title, file, f) in jobs {
        match f(&dir.join(&file)) {
            Ok(()) => made.push((title, format!("{rel_dir}/{file}"))),
            Err(e) => eprintln!("bench: plot {file}: {e:#}"),
        }
    }
    made
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{LiveResult, StartResult};

    #[test]
    fn ecdf_steps() {
        assert_eq!(
            ecdf(&[3.0, 1.0, f64::NAN, 2.0, 2.0]),
            vec![(1.0, 0.25), (2.0, 0.5), (2.0, 0.75), (3.0, 1.0)]
        );
        assert!(ecdf(&[]).is_empty());
    }

    #[test]
    fn ecdf_range_cuts_the_tail() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        v.push(10_000.0);
        let (lo, hi) = ecdf_range(&[&v]).expect("samples");
        assert!(lo <= 1.0 && hi < 200.0, "{lo} {hi}");
        assert_eq!(ecdf_range(&[&[]]), None);
        let (lo, hi) = ecdf_range(&[&[5.0, 5.0]]).expect("samples");
        assert!(lo < hi);
    }

    #[test]
    fn writes_pngs_beside_the_report() {
        if font().is_err() {
            return; // no system font on this host: plots are skipped, as in the bench
        }
        let dir = std::env::temp_dir().join(format!("fsmon-plots-{}", std::process::id()));
        let ramp = |b: f64| (0..50).map(|i| b + f64::from(i)).collect::<Vec<_>>();
        let rep = Report {
            start: vec![StartResult {
                label: "cgroup v1".into(),
                off: ramp(500.0),
                fsmon: ramp(520.0),
                base: ramp(540.0),
                ..StartResult::default()
            }],
            live: Some(LiveResult {
                fsmon_us: ramp(40.0),
                base_us: ramp(50.0),
                floor_us: ramp(20.0),
                ..LiveResult::default()
            }),
            storm: Some(StormResult {
                launched: 8,
                rss_trace: vec![(0, 5000), (4, 6000), (8, 7000)],
                ..StormResult::default()
            }),
            ..Report::default()
        };
        let made = write(&rep, &dir.join("bench.md"));
        let files: Vec<&str> = made.iter().map(|(_, f)| f.as_str()).collect();
        assert_eq!(
            files,
            [
                "bench-plots/start-latency-cgroup-v1.png",
                "bench-plots/latency.png",
                "bench-plots/storm-rss.png"
            ]
        );
        for f in files {
            let png = std::fs::read(dir.join(f)).expect("png written");
            assert!(png.starts_with(b"\x89PNG"), "{f}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
