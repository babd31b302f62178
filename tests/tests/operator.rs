//! Tier 3: what an operator relies on around the record stream — `--output` with log
//! rotation, a reader that closes the stream, the `stats` counters, the command line, the
//! filters, the image — with the real `fsmon` binary against the real Docker engines, and
//! containerd (ctr) and podman for the filters. Run with `cargo xtask test`.

use std::{
    collections::{BTreeMap, HashSet},
    io::Read as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context as _};
use fsmon_tests::{
    ctr, docker, engines, env, frozen_cgroups, podman, podman_run, random_id, run_detached, run_rm,
    unique, Fsmon,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

fn hosts() -> Vec<String> {
    engines().into_iter().map(|(_, h)| h).collect()
}

/// `fsmon run` against both engines with its own state dir, stdout as given.
fn fsmon_command(state_dir: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(env("FSMON_BIN"));
    cmd.arg("run");
    for h in hosts() {
        cmd.args(["--docker-host", &h]);
    }
    cmd.arg("--state-dir").arg(state_dir).args(args);
    cmd.stdin(Stdio::null());
    cmd
}

/// Sends `sig` to our own child.
fn signal(child: &Child, sig: i32) {
    // SAFETY: kill on the pid of a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, sig) };
}

/// Waits for `child` to exit within `timeout`; kills it (and fails) otherwise.
fn wait_exit(child: &mut Child, timeout: Duration) -> anyhow::Result<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait()? {
            return Ok(st.code().unwrap_or(-1));
        }
        if Instant::now() > deadline {
            signal(child, libc::SIGKILL);
            let _ = child.wait();
            bail!("fsmon did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The records of a JSON Lines file; every line must be whole and valid.
fn read_records(path: &Path) -> anyhow::Result<Vec<Value>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    if !text.is_empty() && !text.ends_with('\n') {
        bail!("{} ends in the middle of a line", path.display());
    }
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l:?}")))
        .collect()
}

/// Polls `path` until a record matches `pred`.
fn wait_in_file(path: &Path, pred: impl Fn(&Value) -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if read_records(path).is_ok_and(|rs| rs.iter().any(&pred)) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("no matching record in {} within {WAIT:?}", path.display())
}

/// `logrotate` moves the file away and sends SIGHUP, three times while a container writes
/// 400 files: every record is in exactly one of the files, each line whole, in order.
#[test]
fn output_file_rotated_on_sighup_loses_no_line() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let state = tempfile::tempdir()?;
    let out = dir.path().join("fsmon.jsonl");
    let mut child = fsmon_command(state.path(), &["--output", out.to_str().unwrap_or("")])
        .args(["--stats-interval", "0"])
        .stdout(Stdio::null())
        .spawn()?;
    wait_in_file(&out, |r| r["kind"] == "ready")?;
    let mode = std::fs::metadata(&out)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "--output is created private");

    let (_, host) = engines().remove(0);
    let name = unique("rotate");
    const FILES: usize = 400;
    let script =
        format!("i=0; while [ $i -lt {FILES} ]; do touch /f$i; i=$((i+1)); usleep 10000; done");
    let runner = {
        let (host, name) = (host.clone(), name.clone());
        std::thread::spawn(move || run_rm(&host, &name, &["sh", "-c", &script]))
    };
    let mut rotated: Vec<PathBuf> = Vec::new();
    for n in 1..=3 {
        std::thread::sleep(Duration::from_millis(1200));
        let to = dir.path().join(format!("fsmon.jsonl.{n}"));
        std::fs::rename(&out, &to)?;
        signal(&child, libc::SIGHUP);
        rotated.push(to);
    }
    runner
        .join()
        .map_err(|_| anyhow::anyhow!("docker thread panicked"))??;
    wait_in_file(&out, |r| {
        r["kind"] == "container_stop" && r["container"]["name"] == name.as_str()
    })?;
    signal(&child, libc::SIGTERM);
    assert_eq!(wait_exit(&mut child, WAIT)?, 0);

    let mut all = Vec::new();
    let mut files_with_creates = 0;
    for p in rotated.iter().chain([&out]) {
        let recs = read_records(p)?;
        if recs.iter().any(|r| r["kind"] == "create") {
            files_with_creates += 1;
        }
        all.extend(recs);
    }
    assert_eq!(
        std::fs::metadata(&out)?.permissions().mode() & 0o777,
        0o600,
        "the reopened file is private too"
    );
    assert_eq!(all.first().map(|r| r["kind"].clone()), Some("ready".into()));
    assert_eq!(
        all.last().map(|r| r["kind"].clone()),
        Some("stats".into()),
        "the exit stats record comes last, in the current file"
    );
    assert!(
        files_with_creates >= 3,
        "the rotations happened while the container wrote ({files_with_creates} files with creates)"
    );
    let id = all
        .iter()
        .find(|r| r["kind"] == "container_start" && r["container"]["name"] == name.as_str())
        .and_then(|r| r["container"]["id"].as_str())
        .context("container_start")?
        .to_owned();
    let mut seen = BTreeMap::new();
    for r in &all {
        if r["kind"] == "create" && r["container"]["id"] == id.as_str() {
            *seen
                .entry(r["path"].as_str().unwrap_or_default().to_owned())
                .or_insert(0) += 1;
        }
    }
    let missing: Vec<usize> = (0..FILES)
        .filter(|i| seen.get(&format!("/f{i}")) != Some(&1))
        .collect();
    assert!(
        missing.is_empty(),
        "files not reported exactly once across rotations: {missing:?}"
    );
    Ok(())
}

/// `fsmon run | head -3`: when `head` has its lines and exits, fsmon ends on its own with
/// status 0 while containers keep starting, and leaves nothing frozen: every container
/// started meanwhile runs to completion.
#[test]
fn a_reader_that_closes_the_stream_ends_fsmon_cleanly() -> anyhow::Result<()> {
    let state = tempfile::tempdir()?;
    let mut fsmon = fsmon_command(state.path(), &["--stats-interval", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let pipe = fsmon.stdout.take().context("fsmon stdout")?;
    let head = Command::new("head")
        .arg("-3")
        .stdin(Stdio::from(pipe))
        .stdout(Stdio::piped())
        .spawn()?;
    let mut stderr = fsmon.stderr.take().context("fsmon stderr")?;
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });

    // Containers start on both engines, before, while and after head goes away.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let starters: Vec<_> = engines()
        .into_iter()
        .map(|(label, host)| {
            let stop = stop.clone();
            std::thread::spawn(move || -> anyhow::Result<usize> {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    run_rm(
                        &host,
                        &unique(label),
                        &["sh", "-c", "touch /x; echo y > /y"],
                    )?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();

    let head_out = head.wait_with_output()?;
    let lines: Vec<Value> = String::from_utf8(head_out.stdout)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["kind"], "ready");
    let took = Instant::now();
    let code = wait_exit(&mut fsmon, Duration::from_secs(10))?;
    let exit_after = took.elapsed();
    // A few more containers after fsmon is gone: nothing of its doing is left behind.
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut started = 0;
    for s in starters {
        started += s
            .join()
            .map_err(|_| anyhow::anyhow!("docker thread panicked"))?
            .context("a container failed to start or run while fsmon's reader went away")?;
    }
    let log = log.join().unwrap_or_default();
    assert_eq!(code, 0, "fsmon's exit status; its log:\n{log}");
    assert!(
        log.contains("the reader of the record stream went away"),
        "{log}"
    );
    assert!(!log.contains("ERROR"), "{log}");
    assert!(exit_after < Duration::from_secs(3), "{exit_after:?}");
    assert!(started >= 2, "containers ran meanwhile ({started})");
    assert!(frozen_cgroups().is_empty(), "{:?}", frozen_cgroups());
    let left: Vec<_> = std::fs::read_dir(state.path())?.flatten().collect();
    assert!(
        left.is_empty(),
        "freeze records left in the state dir: {left:?}"
    );
    eprintln!("fsmon exited {exit_after:?} after head; {started} containers ran meanwhile");
    Ok(())
}

/// The `stats` record at exit counts exactly what the stream carried: records by kind,
/// overflows by reason, freezes and arm latencies; interval records come in between.
#[test]
fn stats_counters_equal_what_the_stream_carried() -> anyhow::Result<()> {
    let mut f = Fsmon::start(&hosts(), &["--stats-interval", "1"])?;
    let mut ids = HashSet::new();
    for (label, host) in engines() {
        for _ in 0..3 {
            let name = unique(label);
            run_rm(
                &host,
                &name,
                &[
                    "sh",
                    "-c",
                    "touch /a /b; echo x > /a; rm /b; mkdir -p /d/e; mv /a /c; chmod 600 /c",
                ],
            )?;
            ids.insert(f.wait_start_stop(WAIT, &name)?);
        }
    }
    f.wait_for(WAIT, |r| r["kind"] == "stats" && r["final"] == false)?;
    let (code, records) = f.stop()?;
    assert_eq!(code, 0);
    let last = records.last().context("records")?;
    assert_eq!(last["kind"], "stats");
    assert_eq!(last["final"], true);
    let before = &records[..records.len() - 1];

    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut by_reason: BTreeMap<String, u64> = BTreeMap::new();
    for r in before {
        *by_kind
            .entry(r["kind"].as_str().unwrap_or("?").into())
            .or_default() += 1;
        if r["kind"] == "overflow" {
            *by_reason
                .entry(r["reason"].as_str().unwrap_or("?").into())
                .or_default() += 1;
        }
    }
    let counted = last["records"].as_object().context("records object")?;
    for (kind, n) in counted {
        assert_eq!(
            by_kind.get(kind).copied().unwrap_or(0),
            n.as_u64().unwrap_or(u64::MAX),
            "records of kind {kind}"
        );
    }
    for kind in by_kind.keys() {
        assert!(counted.contains_key(kind), "kind {kind} is not counted");
    }
    for (reason, n) in last["overflows"].as_object().context("overflows")? {
        assert_eq!(
            by_reason.get(reason).copied().unwrap_or(0),
            n.as_u64().unwrap_or(u64::MAX),
            "overflows {reason}"
        );
    }
    // What the test itself produced: 6 containers, each 4 creates, 1 delete, 1 rename (in
    // one directory: a move into a directory not watched yet is a delete and a create).
    let ours = |kind: &str| {
        before
            .iter()
            .filter(|r| {
                r["kind"] == kind
                    && r["container"]["id"]
                        .as_str()
                        .is_some_and(|id| ids.contains(id))
            })
            .count()
    };
    assert_eq!(ours("container_start"), 6);
    assert_eq!(ours("container_stop"), 6);
    assert_eq!(ours("rename"), 6);
    assert_eq!(ours("delete"), 6);
    assert_eq!(ours("create"), 6 * 4, "/a /b /d /d/e");
    let starts: Vec<&Value> = before
        .iter()
        .filter(|r| r["kind"] == "container_start")
        .collect();
    let stops = by_kind.get("container_stop").copied().unwrap_or(0);
    assert_eq!(
        last["containers"]["monitored"].as_u64(),
        Some(starts.len() as u64 - stops)
    );
    // Durations: as many as the records carried, percentiles within a bucket (12.5 %).
    for (field, hist) in [("freeze_us", "freezes"), ("arm_us", "arms")] {
        let mut v: Vec<u64> = starts.iter().filter_map(|r| r[field].as_u64()).collect();
        v.sort_unstable();
        assert_eq!(last[hist]["count"].as_u64(), Some(v.len() as u64), "{hist}");
        if let Some(&max) = v.last() {
            assert_eq!(last[hist]["max_us"].as_u64(), Some(max), "{hist}");
            let exact = v[v.len().div_ceil(2) - 1];
            let p50 = last[hist]["p50_us"].as_u64().context("p50")?;
            assert!(
                p50 >= exact && p50 as f64 <= exact as f64 * 1.125 + 1.0,
                "{hist} p50 {p50}, exact {exact}"
            );
        }
    }
    assert!(
        last["freezes"]["count"].as_u64() >= Some(3),
        "the cgroup v1 engine's containers are frozen"
    );
    // Interval records: cumulative, so never decreasing.
    let interval: Vec<&Value> = before.iter().filter(|r| r["kind"] == "stats").collect();
    assert!(!interval.is_empty());
    let starts_in = |r: &Value| r["records"]["container_start"].as_u64().unwrap_or(0);
    assert!(interval
        .windows(2)
        .all(|w| starts_in(w[0]) <= starts_in(w[1])));
    assert!(interval.iter().all(|r| r["final"] == false));
    Ok(())
}

/// Command-line mistakes are one line on stderr and exit status 2, before anything runs;
/// `--version` and every option's help work.
#[test]
fn bad_flags_are_one_line_and_exit_2() -> anyhow::Result<()> {
    let bin = env("FSMON_BIN");
    for args in [
        &["run", "--no-such-flag"][..],
        &["run", "--nice", "99"],
        &["run", "--stats-interval", "soon"],
        &["run", "--log-format", "xml"],
        &["run", "--log-level", "a[b"],
        &["run", "--output"],
        &["frobnicate"],
    ] {
        let out = Command::new(&bin).args(args).output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("fsmon: error: "), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    let out = Command::new(&bin).arg("--version").output()?;
    assert_eq!(out.status.code(), Some(0));
    assert!(String::from_utf8(out.stdout)?.starts_with("fsmon 0."));
    let out = Command::new(&bin).args(["run", "--help"]).output()?;
    assert_eq!(out.status.code(), Some(0));
    let help = String::from_utf8(out.stdout)?;
    // Every option (but --help) is explained with an example.
    let options: Vec<&str> = help
        .lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with('-'))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("--")))
        .filter(|w| *w != "--help")
        .collect();
    assert!(options.len() >= 9, "{options:?}");
    for o in &options {
        let example = format!("Example: {o}");
        assert!(
            help.lines()
                .map(str::trim)
                .any(|l| l == example || l.starts_with(&format!("{example} "))),
            "no example for {o}:\n{help}"
        );
    }
    Ok(())
}

/// The shape of a record: every key path (`container.id`, `records.create`), without the
/// keys that only some containers have (`container.pod`, for Kubernetes).
fn shape(v: &Value) -> Vec<String> {
    fn walk(v: &Value, prefix: &str, out: &mut Vec<String>) {
        if let Value::Object(m) = v {
            for (k, child) in m {
                let path = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                if path.ends_with("container.pod") || path == "pod" {
                    continue;
                }
                walk(child, &path, out);
                out.push(path);
            }
        }
    }
    let mut out = Vec::new();
    walk(v, "", &mut out);
    out.sort();
    out
}

/// The non-empty lines of the fenced code blocks of language `lang` in a Markdown file.
fn fenced(path: &Path, lang: &str) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    let (mut out, mut inside) = (Vec::new(), false);
    for line in text.lines().map(str::trim) {
        if line.starts_with("```") {
            inside = line == format!("```{lang}");
        } else if inside && !line.is_empty() {
            out.push(line.to_owned());
        }
    }
    Ok(out)
}

/// The one-line JSON examples of a Markdown file.
fn json_examples(path: &Path) -> anyhow::Result<Vec<Value>> {
    fenced(path, "json")?
        .iter()
        .map(|l| {
            serde_json::from_str(l).with_context(|| format!("{}: not JSON: {l}", path.display()))
        })
        .collect()
}

/// The shell commands of a Markdown file that use `jq`.
fn jq_recipes(path: &Path) -> anyhow::Result<Vec<String>> {
    Ok(fenced(path, "sh")?
        .into_iter()
        .filter(|l| l.contains("jq "))
        .collect())
}

/// `docs/events.md` and the README agree with the binary: every example line has exactly
/// the fields fsmon prints for its kind, every shape fsmon printed is documented, and the
/// documented `jq` recipes work on real output.
#[test]
fn documented_records_and_jq_recipes_match_the_binary() -> anyhow::Result<()> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut f = Fsmon::start(&hosts(), &["--stats-interval", "1"])?;
    let (_, host) = engines().remove(0);
    let name = unique("docs");
    run_rm(
        &host,
        &name,
        &[
            "sh",
            "-c",
            "touch /f; sleep 0.1; echo x >> /f; chmod 600 /f; mv /f /g; rm /g; \
             mkdir -p /d/e; touch /d/e/h; touch \"$(printf '/bad\\377\\376')\"",
        ],
    )?;
    let id = f.wait_start_stop(WAIT, &name)?;
    f.wait_for(WAIT, |r| r["kind"] == "stats")?;
    let (code, records) = f.stop()?;
    assert_eq!(code, 0);
    assert_eq!(records.first().map(|r| r["schema"].clone()), Some(1.into()));

    // Every shape the binary printed, by kind (and the container object's shape).
    let mut printed: BTreeMap<String, HashSet<Vec<String>>> = BTreeMap::new();
    for r in &records {
        let kind = r["kind"].as_str().unwrap_or("?").to_owned();
        printed.entry(kind).or_default().insert(shape(r));
        if r["container"].is_object() {
            printed
                .entry("container object".into())
                .or_default()
                .insert(shape(&r["container"]));
        }
    }
    // Every kind but `overflow`, which this run has no reason to print.
    for kind in fsmon::stats::RECORD_KINDS
        .iter()
        .filter(|k| **k != "overflow")
    {
        assert!(printed.contains_key(*kind), "the run printed no {kind}");
    }
    assert!(
        records.iter().any(|r| r["path_b64"].is_string()),
        "the run printed a non-UTF-8 name"
    );

    for doc in ["docs/events.md", "README.md"] {
        let examples = json_examples(&root.join(doc))?;
        assert!(examples.len() >= 4, "{doc}: examples");
        let mut documented: BTreeMap<String, HashSet<Vec<String>>> = BTreeMap::new();
        for ex in &examples {
            let kind = ex["kind"].as_str().unwrap_or("container object").to_owned();
            let Some(shapes) = printed.get(&kind) else {
                // A kind this run cannot produce (overflow): its reason must be one fsmon has.
                assert_eq!(kind, "overflow", "{doc}: unknown kind in {ex}");
                let reason = ex["reason"].as_str().unwrap_or_default();
                assert!(
                    fsmon::stats::OVERFLOW_REASONS.contains(&reason),
                    "{doc}: {ex}"
                );
                continue;
            };
            assert!(
                shapes.contains(&shape(ex)),
                "{doc}: example {ex}\nhas fields {:?}\nfsmon prints {:?}",
                shape(ex),
                shapes
            );
            documented.entry(kind).or_default().insert(shape(ex));
        }
        if doc == "docs/events.md" {
            for (kind, shapes) in &printed {
                for s in shapes {
                    assert!(
                        documented.get(kind).is_some_and(|d| d.contains(s)),
                        "{doc} has no example of a {kind} with fields {s:?}"
                    );
                }
            }
        }
    }

    // The jq recipes, on the records of this run.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("fsmon.jsonl");
    let mut text = String::new();
    for r in &records {
        text.push_str(&serde_json::to_string(r)?);
        text.push('\n');
    }
    std::fs::write(&file, text)?;
    let recipes = jq_recipes(&root.join("docs/events.md"))?;
    assert!(recipes.len() >= 4, "{recipes:?}");
    let mut outputs = Vec::new();
    for recipe in &recipes {
        let cmd = recipe
            .replace("fsmon run | ", &format!("cat {} | ", file.display()))
            .replace(" fsmon.jsonl", &format!(" {}", file.display()))
            .replace("\"web\"", &format!("\"{name}\""));
        let out = Command::new("sh").args(["-c", &cmd]).output()?;
        assert!(
            out.status.success(),
            "{cmd}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        outputs.push(String::from_utf8(out.stdout)?);
    }
    let deletes: Vec<&str> = outputs[0].lines().collect();
    assert_eq!(deletes, ["\"/g\""], "{}", recipes[0]);
    let per_container: Vec<Value> = serde_json::from_str(outputs[1].trim())?;
    let ours = per_container
        .iter()
        .find(|c| c["id"] == id.as_str())
        .context("our container in the per-container summary")?;
    assert_eq!(ours["kinds"]["rename"], 1, "{ours}");
    assert_eq!(outputs[2], "", "no overflow in this run");
    assert_eq!(
        outputs[3].lines().count(),
        records.len(),
        "schema check passes"
    );
    Ok(())
}

/// The fsmon image (`cargo xtask image`) run under the cgroup v1 engine as the README
/// documents it (capabilities instead of --privileged, host PID and cgroup namespaces, the host paths it needs)
/// reports the host's containers on both engines, and stops cleanly with `docker stop`.
#[test]
fn image_runs_under_docker_with_the_documented_mounts() -> anyhow::Result<()> {
    let image = env("FSMON_IMAGE");
    let (_, host) = engines().remove(0);
    let name = unique("image");
    let state = format!("/run/{name}");
    let mut args: Vec<String> = [
        "run",
        "-d",
        "--name",
        &name,
        "--label",
        "fsmon-test",
        "--cap-add=SYS_ADMIN",
        "--cap-add=SYS_NICE",
        "--cap-add=SYS_PTRACE",
        "--cap-add=DAC_READ_SEARCH",
        "--cap-add=DAC_OVERRIDE",
        "--cap-add=FOWNER",
        "--cap-add=KILL",
        "--security-opt=seccomp=unconfined",
        "--security-opt=apparmor=unconfined",
        "--pid",
        "host",
        "--cgroupns",
        "host",
        "-v",
        "/sys/fs/cgroup:/sys/fs/cgroup",
        "-v",
        "/sys/kernel/btf:/sys/kernel/btf:ro",
        "-v",
        "/sys/kernel/tracing:/sys/kernel/tracing",
        "-v",
        "/run:/run",
        "-v",
        "/var/lib/docker:/var/lib/docker:ro",
        "-v",
        "/var/lib/docker-v2:/var/lib/docker-v2:ro",
        &image,
        "run",
        "--state-dir",
        &state,
        "--stats-interval",
        "0",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    for (_, h) in engines() {
        args.push("--docker-host".into());
        args.push(h.replace("/var/run/", "/run/"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let id = docker(&host, &args)?;
    let mut logs = Command::new("docker");
    logs.args(["-H", &host, "logs", "-f", &id]);
    let started = Fsmon::from_command(logs, tempfile::tempdir()?);
    let result = (|| -> anyhow::Result<()> {
        let mut f = started?;
        for (label, h) in engines() {
            let n = unique(label);
            run_rm(&h, &n, &["sh", "-c", "touch /from-the-image-test"])?;
            let cid = f.wait_start_stop(WAIT, &n)?;
            assert!(
                f.of(&cid)
                    .iter()
                    .any(|r| r["kind"] == "create" && r["path"] == "/from-the-image-test"),
                "{label}: the file a container made is reported"
            );
        }
        docker(&host, &["stop", "-t", "20", &id])?;
        let code = docker(&host, &["inspect", "-f", "{{.State.ExitCode}}", &id])?;
        assert_eq!(code, "0", "fsmon's exit status under docker stop");
        let (_, records) = f.stop()?;
        assert_eq!(
            records.last().map(|r| r["final"].clone()),
            Some(true.into()),
            "the final stats record was printed"
        );
        Ok(())
    })();
    let _ = docker(&host, &["rm", "-f", &id]);
    let _ = std::fs::remove_dir(&state);
    assert!(frozen_cgroups().is_empty(), "{:?}", frozen_cgroups());
    result
}

/// The inode numbers (hex, as fdinfo prints them) that process `pid` has inotify watches on.
fn watched_inodes(pid: u32) -> HashSet<String> {
    let mut inodes = HashSet::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/fdinfo")) else {
        return inodes;
    };
    for e in dir.flatten() {
        let text = std::fs::read_to_string(e.path()).unwrap_or_default();
        for line in text.lines().filter(|l| l.starts_with("inotify wd:")) {
            if let Some(ino) = line.split_whitespace().find_map(|w| w.strip_prefix("ino:")) {
                inodes.insert(ino.to_owned());
            }
        }
    }
    inodes
}

/// `--filter`/`--exclude` decide which containers are armed at all (an excluded one has no
/// watch and no record), `--path`/`--kind` which file records are printed.
#[test]
fn filters_arm_only_the_chosen_containers() -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let (label, host) = engines().remove(0);
    let script = "mkdir /keep; touch /keep/a /other; echo x > /keep/a; sleep 4; rm /keep/a";
    let image = fsmon_tests::image();
    let names: Vec<String> = ["a", "b", "c"]
        .iter()
        .map(|n| format!("{}-{n}", unique(label)))
        .collect();
    // fsmon runs before the containers are created, as on a live host: the engine's
    // `create` events give it their names before their cgroups appear, so the name
    // filters are decided before anything is frozen or watched.
    let filter_a = format!("name={}", names[0]);
    let filter_b = format!("name={}", names[1]);
    // B is excluded by an id prefix: it has to exist to have an id, so it alone is
    // created before fsmon starts (an id is decided from the cgroup alone anyway).
    let create = |n: &str| {
        docker(
            &host,
            &[
                "create",
                "--network",
                "none",
                "--label",
                "fsmon-test",
                "--name",
                n,
                &image,
                "sh",
                "-c",
                script,
            ],
        )
    };
    let id_b = create(&names[1])?;
    let exclude_b = format!("id={}", &id_b[..12]);
    let mut f = Fsmon::start(
        &hosts(),
        &[
            "--filter",
            &filter_a,
            "--filter",
            &filter_b,
            "--exclude",
            &exclude_b,
            "--kind",
            "create,delete",
            "--path",
            "/keep/**",
        ],
    )?;
    let ids = vec![create(&names[0])?, id_b, create(&names[2])?];
    let runs: Vec<_> = ids
        .iter()
        .map(|id| {
            let (host, id) = (host.clone(), id.clone());
            std::thread::spawn(move || docker(&host, &["start", "-a", &id]))
        })
        .collect();
    f.wait_for(WAIT, |r| {
        r["kind"] == "container_start" && r["container"]["id"] == ids[0].as_str()
    })?;
    std::thread::sleep(Duration::from_secs(1));
    // While all three run: only the chosen one's layer is watched.
    let watched = watched_inodes(f.pid());
    let upper_inode = |id: &str| -> anyhow::Result<String> {
        let dir = docker(
            &host,
            &["inspect", "-f", "{{.GraphDriver.Data.UpperDir}}", id],
        )?;
        Ok(format!("{:x}", std::fs::metadata(dir)?.ino()))
    };
    assert!(
        watched.contains(&upper_inode(&ids[0])?),
        "the chosen container is watched"
    );
    for id in &ids[1..] {
        assert!(!watched.contains(&upper_inode(id)?), "{id} is not watched");
    }
    for r in runs {
        r.join()
            .map_err(|_| anyhow::anyhow!("docker thread panicked"))??;
    }
    f.wait_for(WAIT, |r| {
        r["kind"] == "container_stop" && r["container"]["id"] == ids[0].as_str()
    })?;
    let (code, records) = f.stop()?;
    assert_eq!(code, 0);
    for id in &ids[1..] {
        assert!(
            !records.iter().any(|r| r["container"]["id"] == id.as_str()),
            "nothing about {id}"
        );
    }
    let files: Vec<(String, String)> = records
        .iter()
        .filter(|r| r["container"]["id"] == ids[0].as_str() && r["path"].is_string())
        .map(|r| {
            (
                r["kind"].as_str().unwrap_or_default().to_owned(),
                r["path"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        files,
        [
            ("create".to_owned(), "/keep".to_owned()),
            ("create".to_owned(), "/keep/a".to_owned()),
            ("delete".to_owned(), "/keep/a".to_owned())
        ],
        "only creates and deletes under /keep"
    );
    for id in &ids {
        let _ = docker(&host, &["rm", "-f", id]);
    }
    Ok(())
}

/// The writable layer of a running ctr container, from its rootfs mount's `upperdir=`.
fn ctr_upperdir(id: &str) -> anyhow::Result<PathBuf> {
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
    let suffix = format!("/{id}/rootfs");
    mountinfo
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(4)
                .is_some_and(|m| m.ends_with(&suffix))
        })
        .find_map(|l| {
            let opts = l.rsplit(' ').next()?;
            opts.split(',')
                .find_map(|o| o.strip_prefix("upperdir="))
                .map(PathBuf::from)
        })
        .with_context(|| format!("no overlay rootfs mount for ctr container {id}"))
}

/// `runtime=`, `namespace=` and `pod=` against real containers of every runtime: ctr
/// containers carrying the CRI plugin's annotations (what the kubelet's containers carry;
/// no kubelet here), a podman and a Docker container. Only the chosen Kubernetes container
/// is watched and reported; the others (decided from the cgroup's runtime, or from the
/// bundle's annotations before anything is frozen) get no watch and no record.
#[test]
fn runtime_namespace_and_pod_filters_on_every_runtime() -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let image = env("FSMON_CTR_IMAGE");
    let script = "mkdir /keep; touch /keep/a; sleep 8; rm /keep/a";
    let mut f = Fsmon::start(
        &hosts(),
        &[
            "--containerd-state",
            &env("FSMON_CONTAINERD_STATE"),
            "--filter",
            "runtime=containerd",
            "--filter",
            "namespace=shop",
            "--exclude",
            "pod=db-0",
        ],
    )?;
    // (id, pod namespace, pod name): only the first is chosen.
    let pods: Vec<(String, &str, &str)> = vec![
        (random_id(), "shop", "web-0"),
        (random_id(), "shop", "db-0"),
        (random_id(), "other", "web-0"),
    ];
    let runs: Vec<_> = pods
        .iter()
        .map(|(id, ns, pod)| {
            let (id, image) = (id.clone(), image.clone());
            let annotations = [
                "io.kubernetes.cri.container-type=container".to_owned(),
                "io.kubernetes.cri.container-name=web".to_owned(),
                format!("io.kubernetes.cri.sandbox-namespace={ns}"),
                format!("io.kubernetes.cri.sandbox-name={pod}"),
                format!("io.kubernetes.cri.sandbox-uid=uid-{pod}-{ns}"),
            ];
            std::thread::spawn(move || {
                let mut args = vec!["run", "--rm", "--label", "fsmon-test=1"];
                for a in &annotations {
                    args.extend(["--annotation", a.as_str()]);
                }
                args.extend([image.as_str(), id.as_str(), "sh", "-c", script]);
                ctr("default", &args)
            })
        })
        .collect();
    let podman_name = unique("filter-podman");
    let docker_name = unique("filter-docker");
    let (_, host) = engines().remove(0);
    let result = (|| -> anyhow::Result<()> {
        let podman_id = podman_run("-d", &podman_name, &["sleep", "8"])?;
        let docker_id = run_detached(&host, &docker_name, &["sleep", "8"])?;
        let chosen = &pods[0].0;
        let start = f.wait_for(WAIT, |r| {
            r["kind"] == "container_start" && r["container"]["id"] == chosen.as_str()
        })?;
        assert_eq!(start["container"]["runtime"], "containerd", "{start}");
        assert_eq!(start["container"]["name"], "web", "{start}");
        assert_eq!(
            start["container"]["pod"],
            serde_json::json!({"name": "web-0", "namespace": "shop", "uid": "uid-web-0-shop"}),
            "{start}"
        );
        std::thread::sleep(Duration::from_secs(1));
        // While all five run: only the chosen one's layer is watched.
        let watched = watched_inodes(f.pid());
        let inode = |dir: PathBuf| -> anyhow::Result<String> {
            Ok(format!("{:x}", std::fs::metadata(&dir)?.ino()))
        };
        let upper = PathBuf::from(start["upperdir"].as_str().context("upperdir")?);
        assert_eq!(upper, ctr_upperdir(chosen)?);
        assert!(
            watched.contains(&inode(upper)?),
            "the chosen container is watched"
        );
        for (id, ns, pod) in &pods[1..] {
            assert!(
                !watched.contains(&inode(ctr_upperdir(id)?)?),
                "ctr container of pod {ns}/{pod} is not watched"
            );
        }
        let podman_upper = podman(&[
            "inspect",
            "-f",
            "{{.GraphDriver.Data.UpperDir}}",
            &podman_id,
        ])?;
        assert!(
            !watched.contains(&inode(podman_upper.into())?),
            "the podman container is not watched"
        );
        let docker_upper = docker(
            &host,
            &[
                "inspect",
                "-f",
                "{{.GraphDriver.Data.UpperDir}}",
                &docker_id,
            ],
        )?;
        assert!(
            !watched.contains(&inode(docker_upper.into())?),
            "the Docker container is not watched"
        );
        f.wait_for(WAIT, |r| {
            r["kind"] == "create"
                && r["container"]["id"] == chosen.as_str()
                && r["path"] == "/keep/a"
        })?;
        f.wait_for(WAIT, |r| {
            r["kind"] == "container_stop" && r["container"]["id"] == chosen.as_str()
        })?;
        Ok(())
    })();
    for r in runs {
        r.join()
            .map_err(|_| anyhow::anyhow!("ctr thread panicked"))??;
    }
    let _ = podman(&["rm", "-f", "-t", "0", &podman_name]);
    let _ = docker(&host, &["rm", "-f", &docker_name]);
    result?;
    let (code, records) = f.stop()?;
    assert_eq!(code, 0);
    let others: Vec<&Value> = records
        .iter()
        .filter(|r| r["container"].is_object() && r["container"]["id"] != pods[0].0.as_str())
        .collect();
    assert!(
        others.is_empty(),
        "only the chosen container is reported: {others:#?}"
    );
    Ok(())
}
