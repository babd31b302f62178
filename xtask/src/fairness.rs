//! `cargo xtask bench --only fairness` (issue 13): one noisy container creating files as
//! fast as it can beside a quiet one writing a file every 20 ms.
//!
//! Measured for fsmon (one process watching both containers) and for the baseline (one
//! `inotifywait -r` per container upperdir, as the generic algorithm arms them), each
//! alone: the quiet container's write → record latency without noise (the reference) and
//! with it, the overflows each monitor reported, and the sustained rate: how fast the noisy
//! container made its files and how fast the monitor reported them, and whether all were.

use std::{
    fmt::Write as _,
    io::Write as _,
    os::fd::AsRawFd,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::Result;

use crate::{
    bench::{inotifywait_on, Live, Monitor},
    engines::V1_HOST,
    report::{num, with_ci, Headline},
    stats::{bootstrap_ci, bootstrap_ci2, pct, quantile, Rng, RESAMPLES},
};

/// The quiet container's period.
const PERIOD: Duration = Duration::from_millis(20);

/// One monitor's run.
#[derive(Clone, Debug, Default)]
pub struct FairRun {
    /// Quiet write → record, µs: without noise, and while the noisy container ran (until
    /// the monitor had reported its files, or stopped reporting them).
    pub ref_us: Vec<f64>,
    pub noise_us: Vec<f64>,
    /// Quiet writes never reported (reference phase, noise phase).
    pub ref_lost: usize,
    pub noise_lost: usize,
    /// Overflow records (fsmon `"kind":"overflow"`, inotifywait `Q_OVERFLOW`).
    pub ref_overflows: usize,
    pub noise_overflows: usize,
    /// The noisy container's files made, and in how long, s.
    pub made: usize,
    pub make_s: f64,
    /// Distinct noisy files the monitor reported created, and noise start → the last of
    /// these records read, s.
    pub seen: usize,
    pub seen_s: f64,
}

impl FairRun {
    pub fn make_rate(&self) -> f64 {
        self.made as f64 / self.make_s.max(1e-9)
    }

    pub fn seen_rate(&self) -> f64 {
        self.seen as f64 / self.seen_s.max(1e-9)
    }
}

/// The fairness part's measurements.
#[derive(Clone, Debug, Default)]
pub struct FairnessResult {
    /// Files the noisy container makes.
    pub files: usize,
    /// `fs.inotify.max_queued_events` during the runs.
    pub queue_limit: usize,
    pub fsmon: FairRun,
    pub base: FairRun,
}

/// The index `i` in a line naming `<marker><i>` (`/quiet/q12`), if any.
pub fn index_after(line: &str, marker: &str) -> Option<usize> {
    let rest = &line[line.find(marker)? + marker.len()..];
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Whether `line` is an overflow notice of fsmon or of inotifywait.
pub fn is_overflow(line: &str) -> bool {
    line.contains("\"kind\":\"overflow\"") || line.contains("Q_OVERFLOW")
}

/// Whether `line` is a file creation record (fsmon JSON or an inotifywait line).
pub fn is_create(line: &str) -> bool {
    line.contains("\"kind\":\"create\"") || line.trim_end().ends_with(" CREATE")
}

/// What the reader tallies from the monitors' lines.
struct Tally {
    /// Per quiet file: when it was written (set by the writer) and when its record came.
    wrote: Vec<Option<Instant>>,
    got: Vec<Option<Instant>>,
    noisy: Vec<bool>,
    seen: usize,
    last_noisy: Option<Instant>,
    overflows: usize,
}

impl Tally {
    fn line(&mut self, t: Instant, l: &str) {
        if is_overflow(l) {
            self.overflows += 1;
        } else if let Some(i) = index_after(l, "/quiet/q") {
            if let Some(g) = self.got.get_mut(i).filter(|g| g.is_none()) {
                *g = Some(t);
            }
        } else if is_create(l) {
            if let Some(i) = index_after(l, "/noise/f") {
                if let Some(s) = self.noisy.get_mut(i).filter(|s| !**s) {
                    *s = true;
                    self.seen += 1;
                    self.last_noisy = Some(t);
                }
            }
        }
    }

    /// (latencies µs, writes never reported) of the quiet files `range`.
    fn latencies(&self, range: std::ops::Range<usize>) -> (Vec<f64>, usize) {
        let (mut v, mut lost) = (Vec::new(), 0);
        for i in range {
            match (self.wrote[i], self.got[i]) {
                (Some(w), Some(g)) => v.push(g.saturating_duration_since(w).as_secs_f64() * 1e6),
                (Some(_), None) => lost += 1,
                _ => {}
            }
        }
        (v, lost)
    }
}

fn pump(ms: &mut [Monitor], tally: &mut Tally) {
    for m in ms.iter_mut() {
        m.read_lines(|t, l| tally.line(t, std::str::from_utf8(l).unwrap_or_default()));
    }
}

fn wait_any(ms: &[Monitor], until: Instant) {
    let left = until.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return;
    }
    let mut fds: Vec<libc::pollfd> = ms
        .iter()
        .map(|m| libc::pollfd {
            fd: m.out.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    // SAFETY: a valid array of pollfds.
    unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            left.as_millis().max(1) as i32,
        )
    };
}

/// One monitor's run on fresh containers: `reference` quiet samples alone, then the noise
/// of `files` files with quiet samples until the monitor has caught up (or `cap`).
fn run_one(
    bin: &Path,
    fsmon: bool,
    files: usize,
    reference: usize,
    cap: Duration,
) -> Result<FairRun> {
    let noisy = Live::start()?;
    let quiet = Live::start()?;
    let qdir = quiet.merged.join("quiet");
    let ndir = noisy.merged.join("noise");
    std::fs::create_dir(&ndir)?;
    std::fs::create_dir(&qdir)?;
    let nq = reference + (cap.as_millis() / PERIOD.as_millis()) as usize + 10;
    for i in 0..nq {
        std::fs::File::create(qdir.join(format!("q{i}")))?;
    }
    let mut ms = if fsmon {
        // Armed on both running containers before `ready`.
        vec![Monitor::fsmon(bin, &[V1_HOST])?]
    } else {
        vec![inotifywait_on(&noisy.upper)?, inotifywait_on(&quiet.upper)?]
    };
    for m in ms.iter_mut() {
        m.drain(Duration::from_millis(200));
    }
    let mut tally = Tally {
        wrote: vec![None; nq],
        got: vec![None; nq],
        noisy: vec![false; files],
        seen: 0,
        last_noisy: None,
        overflows: 0,
    };
    let mut next_q = 0;
    let mut write_quiet = |tally: &mut Tally| -> Result<()> {
        if next_q >= nq {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(qdir.join(format!("q{next_q}")))?;
        let t = Instant::now();
        f.write_all(b"x")?;
        tally.wrote[next_q] = Some(t);
        next_q += 1;
        Ok(())
    };
    // The reference: the quiet container alone.
    let mut tick = Instant::now();
    for _ in 0..reference {
        write_quiet(&mut tally)?;
        tick += PERIOD;
        while Instant::now() < tick {
            pump(&mut ms, &mut tally);
            wait_any(&ms, tick);
        }
    }
    let settle = Instant::now() + Duration::from_millis(500);
    while Instant::now() < settle {
        pump(&mut ms, &mut tally);
        wait_any(&ms, settle);
    }
    let ref_overflows = tally.overflows;
    let ref_end = reference.min(nq);
    // The noise: a thread making `files` files in the noisy container's layer.
    let t0 = Instant::now();
    let maker = std::thread::spawn(move || -> std::io::Result<(usize, Duration)> {
        for i in 0..files {
            std::fs::File::create(ndir.join(format!("f{i}")))?;
        }
        Ok((files, t0.elapsed()))
    });
    let mut tick = Instant::now();
    let deadline = t0 + cap;
    loop {
        write_quiet(&mut tally)?;
        tick += PERIOD;
        while Instant::now() < tick {
            pump(&mut ms, &mut tally);
            wait_any(&ms, tick);
        }
        let now = Instant::now();
        let caught_up = tally.seen >= files
            || tally
                .last_noisy
                .is_some_and(|l| now.duration_since(l) > Duration::from_secs(3));
        if (maker.is_finished() && caught_up) || now >= deadline {
            break;
        }
    }
    let noise_end = next_q;
    // Late records of the quiet writes.
    let settle = Instant::now() + Duration::from_secs(3);
    while Instant::now() < settle && tally.got[..noise_end].iter().any(Option::is_none) {
        pump(&mut ms, &mut tally);
        wait_any(&ms, settle.min(Instant::now() + Duration::from_millis(100)));
    }
    let (made, make) = maker
        .join()
        .map_err(|_| anyhow::anyhow!("the noisy thread panicked"))??;
    for m in ms {
        m.stop();
    }
    let (ref_us, ref_lost) = tally.latencies(0..ref_end);
    let (noise_us, noise_lost) = tally.latencies(ref_end..noise_end);
    Ok(FairRun {
        ref_us,
        noise_us,
        ref_lost,
        noise_lost,
        ref_overflows,
        noise_overflows: tally.overflows - ref_overflows,
        made,
        make_s: make.as_secs_f64(),
        seen: tally.seen,
        seen_s: tally
            .last_noisy
            .map_or(0.0, |l| l.saturating_duration_since(t0).as_secs_f64()),
    })
}

/// The fairness part: fsmon, then the baseline, each on its own pair of containers.
pub fn fairness(bin: &Path, quick: bool) -> Result<FairnessResult> {
    let files = if quick { 20_000 } else { 400_000 };
    let reference = if quick { 100 } else { 500 };
    let cap = Duration::from_secs(if quick { 30 } else { 200 });
    let queue_limit = std::fs::read_to_string("/proc/sys/fs/inotify/max_queued_events")?
        .trim()
        .parse()
        .unwrap_or(0);
    let fsmon = run_one(bin, true, files, reference, cap)?;
    let base = run_one(bin, false, files, reference, cap)?;
    Ok(FairnessResult {
        files,
        queue_limit,
        fsmon,
        base,
    })
}

/// The report section; pushes its summary rows onto `heads`.
pub fn section(f: &FairnessResult, rng: &mut Rng, heads: &mut Vec<Headline>) -> String {
    let mut o = format!(
        "\n## Fairness: a quiet container beside a noisy one (issue 13)\n\n\
         A noisy container makes {} empty files as fast as the bench can (from the host, in \
         its layer, one thread); a quiet one gets a 1-byte write every {} ms. Each monitor \
         runs alone on its own pair of fresh containers: fsmon (one process, both \
         containers) and the baseline (one `inotifywait -r` per upperdir). The reference is \
         the quiet container alone (the noisy one idle); the noise phase lasts until the \
         monitor has reported the noisy files (or stopped reporting them for 3 s). \
         `fs.inotify.max_queued_events` was {} (the system's value, not raised: every \
         instance, fsmon's one and each inotifywait's, has a queue of that many events).\n\n\
         | monitor | phase | samples | quiet write → record median µs [95 % CI] | p99 [95 % CI] | max | quiet writes not reported | overflows |\n\
         |---|---|---|---|---|---|---|---|\n",
        f.files,
        PERIOD.as_millis(),
        f.queue_limit
    );
    let p50 = |v: &mut [f64]| pct(v, 0.5);
    let p99 = |v: &mut [f64]| pct(v, 0.99);
    for (name, r) in [("fsmon", &f.fsmon), ("inotifywait -r ×2", &f.base)] {
        for (phase, v, lost, ov) in [
            ("no noise", &r.ref_us, r.ref_lost, r.ref_overflows),
            ("noise", &r.noise_us, r.noise_lost, r.noise_overflows),
        ] {
            let _ = writeln!(
                o,
                "| {name} | {phase} | {} | {} | {} | {} | {lost} | {ov} |",
                v.len(),
                with_ci(
                    quantile(v, 0.5),
                    bootstrap_ci(v, p50, RESAMPLES, 0.95, rng),
                    0
                ),
                with_ci(
                    quantile(v, 0.99),
                    bootstrap_ci(v, p99, RESAMPLES, 0.95, rng),
                    0
                ),
                num(quantile(v, 1.0), 0),
            );
        }
    }
    o += "\nSustained rate: the noisy container's creations, and the distinct noisy files the \
          monitor reported created (from the noise's start to the last such record read). \
          The producer shares the cores with the monitor and the bench's reader, so its rate \
          is what it reached beside that monitor; a monitor that reported every file without \
          an overflow sustained at least that rate (a lower bound of its lossless rate).\n\n\
          | monitor | files made | made/s | files reported | reported/s | all reported, no overflow |\n\
          |---|---|---|---|---|---|\n";
    for (name, r) in [("fsmon", &f.fsmon), ("inotifywait -r ×2", &f.base)] {
        let _ = writeln!(
            o,
            "| {name} | {} | {:.0} | {} | {:.0} | {} |",
            r.made,
            r.make_rate(),
            r.seen,
            r.seen_rate(),
            if r.seen == r.made && r.noise_overflows == 0 {
                "yes"
            } else {
                "**no**"
            }
        );
    }
    let (a, b) = (&f.fsmon.noise_us, &f.base.noise_us);
    let pmax = |v: &mut [f64]| pct(v, 1.0);
    type Row<'a> = (&'a str, &'a [f64], &'a [f64], f64, fn(&mut [f64]) -> f64);
    let rows: [Row<'_>; 4] = [
        (
            "fairness: quiet write → record, no noise, median µs",
            &f.fsmon.ref_us,
            &f.base.ref_us,
            0.5,
            p50,
        ),
        (
            "fairness: quiet write → record under noise, median µs",
            a,
            b,
            0.5,
            p50,
        ),
        (
            "fairness: quiet write → record under noise, p99 µs",
            a,
            b,
            0.99,
            p99,
        ),
        (
            "fairness: quiet write → record under noise, max µs",
            a,
            b,
            1.0,
            pmax,
        ),
    ];
    for (row, a, b, q, st) in rows {
        let r = quantile(a, q) / quantile(b, q);
        heads.push(Headline {
            row: row.into(),
            fsmon: num(quantile(a, q), 0),
            base: num(quantile(b, q), 0),
            ratio: r,
            ratio_ci: bootstrap_ci2(a, b, |x, y| st(x) / st(y), RESAMPLES, 0.95, rng),
            paper: "—".into(),
            ahead: r <= 1.0,
        });
    }
    let (fr, br) = (f.fsmon.seen_rate(), f.base.seen_rate());
    heads.push(Headline {
        row: "fairness: noisy files reported/s (bounded by the producer, which host noise moves)"
            .into(),
        fsmon: format!("{fr:.0} ({} of {})", f.fsmon.seen, f.fsmon.made),
        base: format!("{br:.0} ({} of {})", f.base.seen, f.base.made),
        ratio: fr / br,
        ratio_ci: None,
        paper: "—".into(),
        ahead: fr >= br && f.fsmon.seen >= f.base.seen,
    });
    let (fo, bo) = (
        f.fsmon.noise_overflows + f.fsmon.noise_lost,
        f.base.noise_overflows + f.base.noise_lost,
    );
    heads.push(Headline {
        row: "fairness: overflows + quiet writes not reported".into(),
        fsmon: fo.to_string(),
        base: bo.to_string(),
        ratio: fo as f64 / bo as f64,
        ratio_ci: None,
        paper: "—".into(),
        ahead: fo <= bo,
    });
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indices_and_kinds_from_lines() {
        let j = r#"{"kind":"create","container":{"id":"x"},"path":"/noise/f1234","is_dir":false}"#;
        assert_eq!(index_after(j, "/noise/f"), Some(1234));
        assert!(is_create(j) && !is_overflow(j));
        let w = "/var/lib/docker/overlay2/a/diff/quiet/q7 MODIFY\n";
        assert_eq!(index_after(w, "/quiet/q"), Some(7));
        assert!(!is_create(w));
        assert!(is_create("/u/noise/f3 CREATE\n"));
        assert!(!is_create("/u/noise/f3 CLOSE_WRITE,CLOSE\n"));
        assert_eq!(index_after("/u/noise/f CREATE", "/noise/f"), None);
        assert!(is_overflow(r#"{"kind":"overflow","reason":"queue"}"#));
        assert!(is_overflow(" Q_OVERFLOW\n"));
    }

    #[test]
    fn section_renders() {
        let run = |base: f64| FairRun {
            ref_us: vec![base; 10],
            noise_us: vec![base * 2.0; 10],
            made: 100,
            make_s: 1.0,
            seen: 100,
            seen_s: 2.0,
            ..FairRun::default()
        };
        let f = FairnessResult {
            files: 100,
            queue_limit: 16384,
            fsmon: run(100.0),
            base: run(200.0),
        };
        let mut heads = Vec::new();
        let md = section(&f, &mut Rng::new(1), &mut heads);
        assert!(
            md.contains("| fsmon | noise | 10 | 200 [200, 200] |"),
            "{md}"
        );
        assert!(
            md.contains("| fsmon | 100 | 100 | 100 | 50 | yes |"),
            "{md}"
        );
        assert!(md.contains("was 16384"), "{md}");
        assert_eq!(heads.len(), 6);
        let md = section(
            &FairnessResult::default(),
            &mut Rng::new(1),
            &mut Vec::new(),
        );
        assert!(!md.contains("NaN"), "{md}");
    }

    #[test]
    fn tally_counts_distinct_files_and_first_records() {
        let t0 = Instant::now();
        let mut t = Tally {
            wrote: vec![Some(t0), Some(t0), None],
            got: vec![None; 3],
            noisy: vec![false; 4],
            seen: 0,
            last_noisy: None,
            overflows: 0,
        };
        let later = t0 + Duration::from_micros(300);
        t.line(later, "/u/quiet/q0 MODIFY");
        t.line(
            later + Duration::from_millis(1),
            "/u/quiet/q0 CLOSE_WRITE,CLOSE",
        );
        t.line(later, "/u/noise/f1 CREATE");
        t.line(later, "/u/noise/f1 CREATE");
        t.line(later, "/u/noise/f9 CREATE"); // beyond the files made: ignored
        t.line(later, " Q_OVERFLOW");
        assert_eq!((t.seen, t.overflows), (1, 1));
        let (v, lost) = t.latencies(0..3);
        assert_eq!(lost, 1);
        assert_eq!(v.len(), 1);
        assert!((v[0] - 300.0).abs() < 1.0, "{v:?}");
    }
}
