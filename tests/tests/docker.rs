//! Tier 3: the real `fsmon` binary against real Docker engines (cgroup v1 and cgroup v2),
//! real containers. Run with `cargo xtask test` (it starts the engines and sets the
//! environment); every test covers both engines with one fsmon following both at once.

use std::time::Duration;

use fsmon_tests::{
    assert_bracketed, docker, engines, frozen_cgroups, image, run_detached, run_kept, run_rm,
    unique, Fsmon,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);

fn hosts() -> Vec<String> {
    engines().into_iter().map(|(_, h)| h).collect()
}

fn is(kind: &'static str, id: String) -> impl Fn(&Value) -> bool {
    move |r| r["kind"] == kind && r["container"]["id"] == id.as_str()
}

#[test]
fn run_stop_start_rm_on_both_engines() -> anyhow::Result<()> {
    let mut f = Fsmon::start(&hosts(), &[])?;
    for (label, host) in engines() {
        let name = unique(label);
        let id = run_detached(&host, &name, &["sleep", "1000"])?;
        assert_eq!(id.len(), 64, "{label}: docker run -d prints the id");
        let start = f.wait_for(WAIT, is("container_start", id.clone()))?;
        assert_eq!(start["container"]["name"], name.as_str(), "{label}");
        assert_eq!(start["container"]["image"], image().as_str(), "{label}");
        assert_eq!(start["container"]["runtime"], "docker", "{label}");
        assert!(
            start["upperdir"]
                .as_str()
                .is_some_and(|u| u.ends_with("/diff")),
            "{label}: {start}"
        );
        assert!(
            start["time"]
                .as_str()
                .is_some_and(|t| t.ends_with('Z') && t.len() == 30),
            "{label}: {start}"
        );

        docker(&host, &["stop", "-t", "1", &id])?;
        f.wait_for(WAIT, is("container_stop", id.clone()))?;

        docker(&host, &["start", &id])?;
        let starts = f.wait_n(WAIT, 2, is("container_start", id.clone()))?;
        assert_eq!(
            starts[1]["container"]["name"],
            name.as_str(),
            "{label}: armed again after docker start"
        );

        docker(&host, &["rm", "-f", &id])?;
        f.wait_n(WAIT, 2, is("container_stop", id.clone()))?;
    }
    let (code, _) = f.stop()?;
    assert_eq!(code, 0, "fsmon exits 0 on SIGTERM");
    Ok(())
}

#[test]
fn run_rm_reports_start_and_stop() -> anyhow::Result<()> {
    let mut f = Fsmon::start(&hosts(), &[])?;
    for (label, host) in engines() {
        let name = unique(label);
        run_rm(&host, &name, &["sh", "-c", "true"])?;
        let id = f.wait_start_stop(WAIT, &name)?;
        f.settle(Duration::from_millis(1500));
        let of = f.of(&id);
        assert_bracketed(
            &of,
            &format!("{label}: nothing after the stop (no --rm cleanup): {of:#?}"),
        );
    }
    Ok(())
}

#[test]
fn running_containers_are_armed_before_ready() -> anyhow::Result<()> {
    let mut ids = Vec::new();
    for (label, host) in engines() {
        let name = unique(label);
        ids.push((
            host.clone(),
            run_detached(&host, &name, &["sleep", "1000"])?,
        ));
    }
    let f = Fsmon::start(&hosts(), &[])?;
    let ready_at = f
        .records
        .iter()
        .position(|r| r["kind"] == "ready")
        .unwrap_or(usize::MAX);
    assert_eq!(f.records.iter().filter(|r| r["kind"] == "ready").count(), 1);
    for (host, id) in &ids {
        let at = f
            .records
            .iter()
            .position(|r| r["kind"] == "container_start" && r["container"]["id"] == id.as_str());
        assert!(
            at.is_some_and(|a| a < ready_at),
            "{host}: container_start for a running container before ready: {:#?}",
            f.records
        );
        let start = &f.records[at.unwrap_or(0)];
        assert_eq!(
            start["freeze_us"],
            Value::Null,
            "not frozen: it was already running"
        );
        docker(host, &["rm", "-f", id])?;
    }
    let (code, _) = f.stop()?;
    assert_eq!(code, 0);
    Ok(())
}

#[test]
fn fatal_errors_are_one_clear_line() -> anyhow::Result<()> {
    let bin = fsmon_tests::env("FSMON_BIN");
    // Unusable --output.
    let out = std::process::Command::new(&bin)
        .args(["run", "--output", "/nonexistent-dir/records.jsonl"])
        .output()?;
    assert_ne!(out.status.code(), Some(0));
    let err = String::from_utf8_lossy(&out.stderr);
    let last = err.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("fsmon: error: cannot open --output /nonexistent-dir/records.jsonl"),
        "{err}"
    );
    assert!(out.stdout.is_empty(), "nothing on the record stream");
    // Not root.
    let out = std::process::Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            &bin,
            "run",
        ])
        .output()?;
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("must run as root"), "{err}");
    Ok(())
}

#[test]
fn engine_down_is_not_fatal() -> anyhow::Result<()> {
    // An engine that does not exist: fsmon says so on stderr, keeps running, and still
    // reports the engine that works.
    let mut hosts = hosts();
    hosts.push("unix:///var/run/fsmon-no-such-engine.sock".into());
    let mut f = Fsmon::start(&hosts, &[])?;
    let (label, host) = engines().remove(0);
    let name = unique(label);
    let id = run_detached(&host, &name, &["sleep", "1000"])?;
    f.wait_for(WAIT, is("container_start", id.clone()))?;
    docker(&host, &["rm", "-f", &id])?;
    f.wait_for(WAIT, is("container_stop", id))?;
    let (code, _) = f.stop()?;
    assert_eq!(code, 0);
    Ok(())
}

/// What every container of the lossless-start tests does first.
const FIRST: &str = "touch /f0; mkdir -p /a/b/c; touch /a/b/c/f1; echo x > /a/b/c/f2";
const FIRST_PATHS: [&str; 6] = ["/f0", "/a", "/a/b", "/a/b/c", "/a/b/c/f1", "/a/b/c/f2"];

fn stress_runs() -> usize {
    std::env::var("FSMON_STRESS_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200)
}

/// Runs `n` `docker run --rm` of FIRST on `host`, `parallel` at a time; returns the names.
fn run_many(host: &str, label: &str, n: usize, parallel: usize) -> anyhow::Result<Vec<String>> {
    run_many_with(host, label, n, parallel, run_rm)
}

/// [`run_many`] with another way to run the container (e.g. [`run_kept`]).
fn run_many_with(
    host: &str,
    label: &str,
    n: usize,
    parallel: usize,
    runner: fn(&str, &str, &[&str]) -> anyhow::Result<String>,
) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    let mut i = 0;
    while i < n {
        let batch: Vec<String> = (i..(i + parallel).min(n))
            .map(|k| format!("{}-{k}", unique(label)))
            .collect();
        let handles: Vec<_> = batch
            .iter()
            .map(|name| {
                let (host, name) = (host.to_owned(), name.clone());
                std::thread::spawn(move || runner(&host, &name, &["sh", "-c", FIRST]))
            })
            .collect();
        for (h, name) in handles.into_iter().zip(&batch) {
            let r = h
                .join()
                .map_err(|_| anyhow::anyhow!("docker thread panicked"))?;
            r.map_err(|e| {
                anyhow::anyhow!("{label}: docker run {name} failed with fsmon running: {e}")
            })?;
        }
        names.extend(batch);
        i += parallel;
    }
    Ok(names)
}

/// Every container reported every first-instruction path, and nothing after its stop.
fn check_lossless(f: &mut Fsmon, label: &str, names: &[String]) -> anyhow::Result<()> {
    f.wait_n(Duration::from_secs(60), names.len(), |r| {
        r["kind"] == "container_stop"
            && r["container"]["name"]
                .as_str()
                .is_some_and(|n| names.iter().any(|m| m == n))
    })?;
    f.settle(Duration::from_secs(2));
    let mut missing = Vec::new();
    for name in names {
        let recs: Vec<&Value> = f
            .records
            .iter()
            .filter(|r| r["container"]["name"] == name.as_str())
            .collect();
        assert_bracketed(
            &recs,
            &format!("{label} {name}: nothing after the stop: {recs:#?}"),
        );
        assert!(
            recs.iter().all(|r| r["kind"] != "delete"),
            "{label} {name}: a delete (from --rm cleanup?): {recs:#?}"
        );
        for p in FIRST_PATHS {
            if !recs.iter().any(|r| r["kind"] == "create" && r["path"] == p) {
                missing.push(format!("{name}:{p}"));
            }
        }
    }
    let first_missing: Vec<&Value> = missing
        .first()
        .and_then(|m| m.split(':').next())
        .map(|name| {
            f.records
                .iter()
                .filter(|r| r["container"]["name"] == name)
                .collect()
        })
        .unwrap_or_default();
    // What the first one's layer holds now (kept containers): tells a lost event from a
    // container that never ran its command.
    let layer: Option<String> = first_missing
        .iter()
        .find_map(|r| r["upperdir"].as_str())
        .and_then(|u| {
            std::process::Command::new("find")
                .arg(u)
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        });
    assert!(
        missing.is_empty(),
        "{label}: {} of {} first-instruction paths missing: {missing:?}; records of the first: {first_missing:#?}; its layer now: {layer:?}",
        missing.len(),
        names.len() * FIRST_PATHS.len()
    );
    Ok(())
}

/// The non-null `field` (`freeze_us`, `gated_us`) of the `container_start`s of `names`.
fn start_durations(f: &Fsmon, names: &[String], field: &str) -> Vec<u64> {
    f.records
        .iter()
        .filter(|r| {
            r["kind"] == "container_start"
                && r["container"]["name"]
                    .as_str()
                    .is_some_and(|n| names.iter().any(|m| m == n))
        })
        .filter_map(|r| r[field].as_u64())
        .collect()
}

#[test]
fn lossless_start_sequential() -> anyhow::Result<()> {
    let mut f = Fsmon::start(&hosts(), &[])?;
    for (label, host) in engines() {
        let names = run_many(&host, label, stress_runs(), 1)?;
        check_lossless(&mut f, label, &names)?;
        let freezes = start_durations(&f, &names, "freeze_us");
        eprintln!(
            "{label}: {} containers, {} frozen, freeze_us max {:?}",
            names.len(),
            freezes.len(),
            freezes.iter().max()
        );
    }
    Ok(())
}

/// Keeps both cores busy until dropped.
///
/// The loops run in a session of their own, as a host's workloads run in cgroups of their
/// own: with the kernel's autogroups (on here, as on hosts without systemd), a process
/// started in fsmon's session shares fsmon's scheduling group, and two loops there kept
/// fsmon off the CPU for up to 90 ms at a time despite its niceness (`perf sched`), a
/// stall no deployment has (fsmon's own cgroup, its CPU weight).
struct CpuHog(Vec<std::process::Child>);
impl CpuHog {
    fn start() -> anyhow::Result<Self> {
        use std::os::unix::process::CommandExt as _;
        let mut v = Vec::new();
        for _ in 0..2 {
            let mut cmd = std::process::Command::new("sh");
            cmd.args(["-c", "while :; do :; done"]);
            // SAFETY: setsid is async-signal-safe; the closure touches nothing else.
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            v.push(cmd.spawn()?);
        }
        Ok(CpuHog(v))
    }
}
impl Drop for CpuHog {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[test]
fn lossless_start_concurrent_under_cpu_load() -> anyhow::Result<()> {
    let mut f = Fsmon::start(&hosts(), &[])?;
    for (label, host) in engines() {
        let names = run_many(&host, label, stress_runs() / 2, 4)?;
        check_lossless(&mut f, &format!("{label} 4 at a time"), &names)?;
        let hog = CpuHog::start()?;
        let names = run_many(&host, label, stress_runs() / 2, 4)?;
        drop(hog);
        check_lossless(&mut f, &format!("{label} 4 at a time, CPU hog"), &names)?;
    }
    Ok(())
}

#[test]
fn pause_is_respected_and_stop_start_restart_rearm() -> anyhow::Result<()> {
    let mut f = Fsmon::start(&hosts(), &[])?;
    for (label, host) in engines() {
        let name = unique(label);
        let id = run_detached(&host, &name, &["sh", "-c", "while :; do sleep 0.2; done"])?;
        f.wait_for(WAIT, is("container_start", id.clone()))?;
        docker(&host, &["pause", &id])?;
        std::thread::sleep(Duration::from_secs(2));
        let status = docker(&host, &["inspect", "-f", "{{.State.Status}}", &id])?;
        assert_eq!(
            status, "paused",
            "{label}: fsmon must not thaw a paused container"
        );
        docker(&host, &["unpause", &id])?;
        docker(&host, &["exec", &id, "touch", "/after-unpause"])?;
        f.wait_for(WAIT, |r| {
            r["kind"] == "create"
                && r["container"]["id"] == id.as_str()
                && r["path"] == "/after-unpause"
        })?;

        docker(&host, &["restart", "-t", "1", &id])?;
        f.wait_n(WAIT, 2, is("container_start", id.clone()))?;
        docker(&host, &["exec", &id, "mkdir", "-p", "/after-restart/x"])?;
        f.wait_for(WAIT, |r| {
            r["kind"] == "create"
                && r["container"]["id"] == id.as_str()
                && r["path"] == "/after-restart/x"
        })?;
        docker(&host, &["rm", "-f", &id])?;
        f.wait_n(WAIT, 2, is("container_stop", id.clone()))?;
    }
    assert!(
        frozen_cgroups().is_empty(),
        "left frozen: {:?}",
        frozen_cgroups()
    );
    Ok(())
}

#[test]
fn kill_9_during_load_leaves_nothing_frozen_after_restart() -> anyhow::Result<()> {
    let f = Fsmon::start(&hosts(), &[])?;
    let state_dir = f.state_dir.path().to_owned();
    let load: Vec<_> = engines()
        .into_iter()
        .map(|(label, host)| std::thread::spawn(move || run_many(&host, label, 16, 2)))
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: SIGKILL to our own child.
    unsafe { libc::kill(f.pid() as i32, libc::SIGKILL) };
    // A new fsmon with the same state directory thaws whatever the killed one left.
    let mut cmd = std::process::Command::new(fsmon_tests::env("FSMON_BIN"));
    cmd.arg("run")
        .arg("--state-dir")
        .arg(&state_dir)
        .arg("--output")
        .arg("/dev/null");
    for h in hosts() {
        cmd.args(["--docker-host", &h]);
    }
    let mut second = cmd.spawn()?;
    for h in load {
        h.join()
            .map_err(|_| anyhow::anyhow!("load thread panicked"))??;
    }
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(second.id() as i32, libc::SIGTERM) };
    assert_eq!(second.wait()?.code(), Some(0));
    assert!(
        frozen_cgroups().is_empty(),
        "left frozen: {:?}",
        frozen_cgroups()
    );
    assert!(
        stopped_container_tasks().is_empty(),
        "left stopped: {:?}",
        stopped_container_tasks()
    );
    assert_eq!(
        std::fs::read_dir(&state_dir)?.count(),
        0,
        "freeze records left behind"
    );
    drop(f);
    Ok(())
}

#[test]
fn restart_thaws_what_a_killed_fsmon_left_frozen() -> anyhow::Result<()> {
    // Simulates an fsmon killed while holding a freeze: the record it wrote before freezing
    // and the frozen cgroup. The next fsmon must thaw it before it is ready.
    let state = tempfile::tempdir()?;
    let mut ids = Vec::new();
    for (label, host) in engines() {
        let name = unique(label);
        let id = run_detached(&host, &name, &["sleep", "1000"])?;
        let (kind, control, value) = if label == "cgroup-v1" {
            (
                "v1",
                format!("/sys/fs/cgroup/freezer/docker/{id}"),
                "FROZEN",
            )
        } else {
            ("v2", format!("/sys/fs/cgroup/unified/docker/{id}"), "1")
        };
        std::fs::write(
            state.path().join(format!("999999-{}", ids.len() + 1)),
            format!("{kind} {control}\n"),
        )?;
        let file = if kind == "v1" {
            "freezer.state"
        } else {
            "cgroup.freeze"
        };
        std::fs::write(format!("{control}/{file}"), value)?;
        ids.push((host, id));
    }
    assert_eq!(frozen_cgroups().len(), 2);
    let mut cmd = std::process::Command::new(fsmon_tests::env("FSMON_BIN"));
    cmd.arg("run")
        .arg("--state-dir")
        .arg(state.path())
        .arg("--output")
        .arg("/dev/null");
    let mut child = cmd.spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !frozen_cgroups().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: SIGTERM to our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    child.wait()?;
    assert!(
        frozen_cgroups().is_empty(),
        "still frozen: {:?}",
        frozen_cgroups()
    );
    assert_eq!(
        std::fs::read_dir(state.path())?.count(),
        0,
        "records removed after the thaw"
    );
    for (host, id) in ids {
        docker(&host, &["rm", "-f", &id])?;
    }
    Ok(())
}

fn path_of(r: &Value) -> Vec<u8> {
    use base64::Engine as _;
    match r["path_b64"].as_str() {
        Some(b) => base64::engine::general_purpose::STANDARD
            .decode(b)
            .unwrap_or_default(),
        None => r["path"].as_str().unwrap_or_default().as_bytes().to_vec(),
    }
}

fn count(recs: &[&Value], kind: &str, path: &[u8]) -> usize {
    recs.iter()
        .filter(|r| r["kind"] == kind && path_of(r) == path)
        .count()
}

/// What a container does to its own layer, reported in its own terms.
const SCRIPT: &str = r#"
set -e
mkdir -p /deep/1/2/3/4/5/6/7/8/9/10/11/12/13/14/15/16/17/18/19/20 && echo x > /deep/1/2/3/4/5/6/7/8/9/10/11/12/13/14/15/16/17/18/19/20/f
mkdir -p /dev/shm/t/u && echo y > /dev/shm/t/u/v && mv /dev/shm/t /moved
echo more >> /etc/image-file
chmod 600 /etc/passwd
touch /data/sub/lower.txt
rm /bin/yes
rm -r /data
echo again > /bin/yes
echo f1 > /f1 && ln /f1 /f1-link
mv /f1 /f1-renamed
mv /deep/1 /deep/one
echo later > /deep/one/2/after-rename
ln -s / /rootlink
touch "$(printf '/bad\377name')" "$(printf '/new\nline')"
sleep 1
"#;

#[test]
fn container_changes_are_reported_in_its_own_terms() -> anyhow::Result<()> {
    let mut f = Fsmon::start(&hosts(), &[])?;
    for (label, host) in engines() {
        let name = unique(label);
        run_rm(&host, &name, &["sh", "-c", SCRIPT])?;
        let id = f.wait_start_stop(WAIT, &name)?;
        let recs = f.of(&id);
        let show = || {
            recs.iter()
                .map(|r| format!("{} {} {}", r["kind"], r["path"], r["source"]))
                .collect::<Vec<_>>()
                .join("\n")
        };
        let deep = "/deep/1/2/3/4/5/6/7/8/9/10/11/12/13/14/15/16/17/18/19/20/f";
        for (kind, path, n) in [
            ("create", deep.as_bytes(), 1),
            ("create", b"/moved".as_slice(), 1),
            ("create", b"/moved/u/v".as_slice(), 1),
            // Copy-ups are the change that caused them, never a create.
            ("modify", b"/etc/image-file".as_slice(), 1),
            ("create", b"/etc/image-file".as_slice(), 0),
            ("attrib", b"/etc/passwd".as_slice(), 1),
            ("create", b"/etc/passwd".as_slice(), 0),
            ("create", b"/data/sub/lower.txt".as_slice(), 0),
            // Deletes of image files and directories.
            ("delete", b"/data".as_slice(), 1),
            ("delete", b"/data/sub".as_slice(), 1),
            // A re-created image file is a create after its delete.
            ("delete", b"/bin/yes".as_slice(), 1),
            ("create", b"/bin/yes".as_slice(), 1),
            ("create", b"/f1-link".as_slice(), 1),
            ("rename", b"/f1-renamed".as_slice(), 1),
            ("rename", b"/deep/one".as_slice(), 1),
            ("create", b"/deep/one/2/after-rename".as_slice(), 1),
            ("create", b"/rootlink".as_slice(), 1),
            ("create", b"/bad\xffname".as_slice(), 1),
            ("create", b"/new\nline".as_slice(), 1),
        ] {
            assert_eq!(
                count(&recs, kind, path),
                n,
                "{label}: {kind} {:?}\n{}",
                String::from_utf8_lossy(path),
                show()
            );
        }
        assert!(
            recs.iter().all(|r| !path_of(r).starts_with(b"/rootlink/")),
            "{label}: never through a symlink\n{}",
            show()
        );
        let renamed = recs
            .iter()
            .find(|r| r["kind"] == "rename" && r["path"] == "/deep/one")
            .copied();
        assert_eq!(
            renamed.map(|r| r["old_path"].clone()),
            Some("/deep/1".into()),
            "{label}"
        );
        let bad = recs.iter().find(|r| path_of(r) == b"/bad\xffname").copied();
        assert_eq!(
            bad.map(|r| r["path"].clone()),
            Some("/bad\u{fffd}name".into()),
            "{label}: lossy path for humans"
        );
    }
    Ok(())
}

#[test]
fn queue_overflow_in_a_container_is_reported_and_rescanned() -> anyhow::Result<()> {
    // A small kernel queue (it applies to inotify instances created after the change, so
    // fsmon is started under it), fsmon stopped (SIGSTOP) while a container makes 200k
    // files: the queue must overflow, and fsmon must say so and find every file.
    let guard = fsmon_tests::overlay_mount::SysctlGuard::set("fs/inotify/max_queued_events", 4096);
    let f = Fsmon::start(&hosts(), &[]);
    drop(guard);
    let mut f = f?;
    let (label, host) = engines().remove(0);
    let name = unique(label);
    let n = 200_000;
    let script = format!("mkdir /burst && sleep 2 && cd /burst && seq 1 {n} | xargs touch && touch /done && sleep 1000");
    let id = run_detached(&host, &name, &["sh", "-c", &script])?;
    let start = f.wait_for(WAIT, is("container_start", id.clone()))?;
    let upper = std::path::PathBuf::from(start["upperdir"].as_str().unwrap_or_default());
    // The burst goes into a directory fsmon already watches.
    f.wait_for(WAIT, |r| {
        r["container"]["id"] == id.as_str() && r["path"] == "/burst"
    })?;
    // SAFETY: SIGSTOP to our own child.
    unsafe { libc::kill(f.pid() as i32, libc::SIGSTOP) };
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while !upper.join("done").exists() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    // SAFETY: SIGCONT to our own child.
    unsafe { libc::kill(f.pid() as i32, libc::SIGCONT) };
    assert!(
        upper.join("done").exists(),
        "{label}: the burst did not finish"
    );
    f.wait_for(Duration::from_secs(120), |r| {
        r["container"]["id"] == id.as_str() && r["path"] == "/done"
    })?;
    f.settle(Duration::from_secs(1));
    docker(&host, &["rm", "-f", &id])?;
    let recs = f.of(&id);
    assert!(
        f.records.iter().any(|r| r["kind"] == "overflow"),
        "{label}: a 200k burst into a stopped reader's 4096-event queue overflows, and fsmon says so"
    );
    let mut seen = std::collections::HashSet::new();
    for r in &recs {
        if r["kind"] == "create" {
            if let Some(p) = r["path"].as_str().and_then(|p| p.strip_prefix("/burst/")) {
                seen.insert(p.to_owned());
            }
        }
    }
    assert_eq!(
        seen.len(),
        n,
        "{label}: every file of the burst reported (inotify or rescan)"
    );
    assert!(
        recs.iter().any(|r| r["source"] == "scan"),
        "{label}: the rescan reported what the queue lost"
    );
    Ok(())
}

#[test]
fn symlink_swaps_never_lead_outside_the_layer() -> anyhow::Result<()> {
    let canary_dir = tempfile::tempdir()?;
    let mut f = Fsmon::start(&hosts(), &[])?;
    for (label, host) in engines() {
        let name = unique(label);
        // Directories swapped for symlinks to host-looking paths, as fast as the shell can.
        let script =
            "for i in $(seq 300); do mkdir -p /s/d; touch /s/d/x; rm -rf /s; ln -s / /s; rm /s; \
                      mkdir /t; mv /t /t2; ln -s /etc /t; rm -rf /t /t2; done; sleep 1";
        let id = run_detached(&host, &name, &["sh", "-c", script])?;
        f.wait_for(WAIT, is("container_start", id.clone()))?;
        docker(&host, &["wait", &id])?;
        // Host writes in the places the symlinks pointed at are never the container's.
        std::fs::write(canary_dir.path().join("canary"), "host")?;
        std::fs::write("/etc/fsmon-test-canary", "host")?;
        let _ = std::fs::remove_file("/etc/fsmon-test-canary");
        docker(&host, &["rm", "-f", &id])?;
        f.wait_for(WAIT, is("container_stop", id.clone()))?;
        let recs = f.of(&id);
        for r in &recs {
            let p = path_of(r);
            let allowed = [b"/s".as_slice(), b"/t", b"/t2"];
            assert!(
                r["path"].is_null()
                    || allowed.iter().any(|a| p == *a
                        || (p.starts_with(a)
                            && p.get(a.len()) == Some(&b'/')
                            && !p.starts_with(b"/s/etc")
                            && !p.starts_with(b"/t/"))),
                "{label}: a record outside what the container made, or through a symlink: {r}"
            );
        }
        assert!(
            recs.iter()
                .any(|r| r["kind"] == "create" && r["path"] == "/s/d/x"),
            "{label}: the real files are still reported"
        );
    }
    f.settle(Duration::from_millis(500));
    assert!(
        f.records
            .iter()
            .all(|r| !r["path"].as_str().is_some_and(|p| p.contains("canary"))),
        "host writes were reported"
    );
    Ok(())
}

#[test]
fn watch_limit_hits_one_container_and_not_the_others() -> anyhow::Result<()> {
    use fsmon_tests::overlay_mount::{inotify_watches_in_use, SysctlGuard};
    let mut f = Fsmon::start(&hosts(), &[])?;
    let engines = engines();
    let (big_label, big_host) = &engines[0];
    let (small_label, small_host) = &engines[1];
    let small_name = unique(small_label);
    let small = run_detached(small_host, &small_name, &["sleep", "1000"])?;
    f.wait_for(WAIT, is("container_start", small.clone()))?;
    let big_name = unique(big_label);
    let big = {
        // Room for ~30 more watches for every root process together, then a container that
        // makes 200 directories.
        let _limit = SysctlGuard::set("fs/inotify/max_user_watches", inotify_watches_in_use() + 30);
        let big = run_detached(big_host, &big_name, &["sh", "-c", "mkdir -p /many && cd /many && for i in $(seq 200); do mkdir d$i; echo x > d$i/f; done; touch /many-done; sleep 1000"])?;
        f.wait_for(WAIT, |r| {
            r["kind"] == "overflow"
                && r["reason"] == "watch_limit"
                && r["container"]["id"] == big.as_str()
        })?;
        f.wait_for(Duration::from_secs(60), |r| {
            r["container"]["id"] == big.as_str() && r["path"] == "/many-done"
        })?;
        // The other container is still reported while the limit holds.
        docker(small_host, &["exec", &small, "touch", "/still-watched"])?;
        f.wait_for(WAIT, |r| {
            r["container"]["id"] == small.as_str() && r["path"] == "/still-watched"
        })?;
        big
    };
    let recs = f.of(&big);
    let dirs = recs
        .iter()
        .filter(|r| {
            r["kind"] == "create"
                && r["is_dir"] == true
                && r["path"].as_str().is_some_and(|p| p.starts_with("/many/d"))
        })
        .count();
    assert_eq!(
        dirs, 200,
        "{big_label}: every directory is still reported (indexed when it cannot be watched)"
    );
    // The limit is back: the refused watches are retried (every second), so a directory
    // that had none reports again.
    docker(
        big_host,
        &["exec", &big, "sh", "-c", "echo y > /many/d200/late"],
    )?;
    f.wait_for(WAIT, |r| {
        r["container"]["id"] == big.as_str()
            && r["kind"] == "create"
            && r["path"] == "/many/d200/late"
    })?;
    for id in [&big, &small] {
        let host = if id == &big { big_host } else { small_host };
        docker(host, &["rm", "-f", id])?;
    }
    Ok(())
}

/// A Unix socket proxy in front of a Docker engine that delays every chunk the engine
/// sends back by `delay` (requests pass at once; answers keep their order).
struct SlowProxy {
    path: std::path::PathBuf,
}

impl SlowProxy {
    fn start(upstream: &str, delay: Duration) -> anyhow::Result<SlowProxy> {
        use std::os::unix::net::{UnixListener, UnixStream};
        let upstream = std::path::PathBuf::from(upstream.trim_start_matches("unix://"));
        let path = std::env::temp_dir().join(format!("{}.sock", unique("slow-engine")));
        let listener = UnixListener::bind(&path)?;
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let Ok(engine) = UnixStream::connect(&upstream) else {
                    continue;
                };
                let (Ok(mut c_in), Ok(mut e_out)) = (client.try_clone(), engine.try_clone()) else {
                    continue;
                };
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut c_in, &mut e_out);
                    let _ = e_out.shutdown(std::net::Shutdown::Write);
                });
                let (tx, rx) = std::sync::mpsc::channel::<(std::time::Instant, Vec<u8>)>();
                let mut e_in = engine;
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    loop {
                        match std::io::Read::read(&mut e_in, &mut buf) {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                if tx
                                    .send((std::time::Instant::now(), buf[..n].to_vec()))
                                    .is_err()
                                {
                                    return;
                                }
                            }
                        }
                    }
                });
                let mut c_out = client;
                std::thread::spawn(move || {
                    for (at, chunk) in rx {
                        std::thread::sleep(
                            (at + delay).saturating_duration_since(std::time::Instant::now()),
                        );
                        if std::io::Write::write_all(&mut c_out, &chunk).is_err() {
                            return;
                        }
                    }
                    let _ = c_out.shutdown(std::net::Shutdown::Write);
                });
            }
        });
        Ok(SlowProxy { path })
    }

    fn url(&self) -> String {
        format!("unix://{}", self.path.display())
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The `arm_us` of the named containers' `container_start` records.
fn arm_us_of(f: &Fsmon, names: &[String]) -> Vec<u64> {
    f.records
        .iter()
        .filter(|r| {
            r["kind"] == "container_start"
                && r["container"]["name"]
                    .as_str()
                    .is_some_and(|n| names.iter().any(|m| m == n))
        })
        .filter_map(|r| r["arm_us"].as_u64())
        .collect()
}

#[test]
fn a_slow_engine_delays_no_other_container() -> anyhow::Result<()> {
    let engines = engines();
    let [(fast_label, fast), (slow_label, slow)] = [engines[0].clone(), engines[1].clone()];
    // Every answer of the slow engine comes 2 s late (its event stream too).
    let proxy = SlowProxy::start(&slow, Duration::from_secs(2))?;
    let mut f = Fsmon::start(&[fast.clone(), proxy.url()], &[])?;
    let slow_names = {
        let slow = slow.clone();
        std::thread::spawn(move || run_many(&slow, slow_label, 12, 4))
    };
    let fast_names = run_many(&fast, fast_label, 24, 4)?;
    let slow_names = slow_names
        .join()
        .map_err(|_| anyhow::anyhow!("docker thread panicked"))??;
    // Every first-instruction path of both engines' containers, each bracketed by its
    // own container_start/stop with its name: records in order, none lost.
    check_lossless(
        &mut f,
        &format!("{fast_label} beside a slow engine"),
        &fast_names,
    )?;
    check_lossless(
        &mut f,
        &format!("{slow_label} behind a 2 s proxy"),
        &slow_names,
    )?;
    let fast_arm = arm_us_of(&f, &fast_names);
    let slow_arm = arm_us_of(&f, &slow_names);
    eprintln!(
        "arm_us: {fast_label} max {:?} (n {}), {slow_label} behind the proxy max {:?} (n {})",
        fast_arm.iter().max(),
        fast_arm.len(),
        slow_arm.iter().max(),
        slow_arm.len()
    );
    // Not a timing target: a container whose arming waited for the slow engine would
    // take at least its 2 s delay.
    assert!(
        fast_arm.iter().all(|us| *us < 1_500_000),
        "{fast_label}: armed behind the slow engine: {fast_arm:?}"
    );
    for name in &slow_names {
        let start = f
            .records
            .iter()
            .find(|r| r["kind"] == "container_start" && r["container"]["name"] == name.as_str())
            .ok_or_else(|| anyhow::anyhow!("{name}: no container_start"))?;
        assert_eq!(start["container"]["image"], image().as_str(), "{start}");
    }
    let (code, _) = f.stop()?;
    assert_eq!(code, 0);
    Ok(())
}

// ---- The exec gate -------------------------------------------------------------------

/// State and start time of host pid `pid` (None when it is gone).
fn proc_stat(pid: u32) -> Option<fsmon::gate::ProcStat> {
    fsmon::gate::parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// Every task of every Docker container (both engines: all are in the v2 hierarchy) that is
/// stopped (state `T`), as `cgroup:pid`.
fn stopped_container_tasks() -> Vec<String> {
    let mut stopped = Vec::new();
    let Ok(rd) = std::fs::read_dir("/sys/fs/cgroup/unified/docker") else {
        return stopped;
    };
    for e in rd.flatten() {
        let Ok(procs) = std::fs::read_to_string(e.path().join("cgroup.procs")) else {
            continue;
        };
        for pid in procs.lines().filter_map(|l| l.trim().parse::<u32>().ok()) {
            if proc_stat(pid).is_some_and(|s| s.state == b'T') {
                stopped.push(format!("{}:{pid}", e.file_name().to_string_lossy()));
            }
        }
    }
    stopped
}

/// Waits until `pred` holds for host pid `pid`'s state, or `timeout` passes.
fn wait_state(pid: u32, timeout: Duration, pred: impl Fn(u8) -> bool) -> Option<u8> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let state = proc_stat(pid).map(|s| s.state);
        if state.is_some_and(&pred) || std::time::Instant::now() >= deadline {
            return state;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on a pid this test started (fsmon) or owns (a sleep it spawned).
    unsafe { libc::kill(pid as i32, sig) };
}

fn init_pid(host: &str, id: &str) -> anyhow::Result<u32> {
    Ok(docker(host, &["inspect", "-f", "{{.State.Pid}}", id])?.parse()?)
}

/// A file the container makes and deletes at once: only a watch armed before the
/// container's first instruction sees it.
const FLASH: &str = "touch /f0; mkdir -p /a/b/c; touch /a/b/c/f1; echo x > /a/b/c/f2; \
                     echo y > /flash; rm /flash";

#[test]
fn gate_holds_a_start_while_fsmon_is_stopped() -> anyhow::Result<()> {
    let mut f = Fsmon::start(&hosts(), &[])?;
    for (label, host) in engines() {
        let name = unique(label);
        signal(f.pid(), libc::SIGSTOP);
        // `docker run -d` returns once the container started: runc treats a stopped PID 1 as
        // running, so a gated start does not fail or hang.
        let started = run_detached(&host, &name, &["sh", "-c", FLASH]);
        let held = started
            .as_ref()
            .ok()
            .and_then(|id| init_pid(&host, id).ok())
            .map(|pid| (pid, wait_state(pid, Duration::from_secs(5), |s| s == b'T')));
        std::thread::sleep(Duration::from_secs(1));
        signal(f.pid(), libc::SIGCONT);
        let id = started?;
        let (pid, state) = held.ok_or_else(|| anyhow::anyhow!("{label}: no init pid"))?;
        assert_eq!(
            state,
            Some(b'T'),
            "{label}: the container's first exec is held while fsmon is stopped (pid {pid})"
        );
        let start = f.wait_for(WAIT, is("container_start", id.clone()))?;
        let gated = start["gated_us"].as_u64();
        assert!(
            gated.is_some_and(|us| us >= 900_000),
            "{label}: gated_us covers the second fsmon was stopped: {start}"
        );
        f.wait_for(WAIT, is("container_stop", id.clone()))?;
        let recs = f.of(&id);
        assert_bracketed(&recs, &format!("{label}: {recs:#?}"));
        // Live: from the watch, not from a late arm's scan (the contents of a directory made
        // before its own watch are found by its scan, as always).
        for p in ["/f0", "/a", "/flash"] {
            assert!(
                recs.iter()
                    .any(|r| r["kind"] == "create" && r["path"] == p && r["source"] == "inotify"),
                "{label}: {p} reported live: {recs:#?}"
            );
        }
        for p in FIRST_PATHS {
            assert!(
                recs.iter().any(|r| r["kind"] == "create" && r["path"] == p),
                "{label}: {p} reported: {recs:#?}"
            );
        }
        assert!(
            recs.iter().any(|r| r["kind"] == "delete"
                && r["path"] == "/flash"
                && r["source"] == "inotify"),
            "{label}: the file made and deleted at once is deleted live: {recs:#?}"
        );
        docker(&host, &["rm", "-f", &id])?;
    }
    assert!(
        std::fs::read_dir(f.state_dir.path())?.next().is_none(),
        "hold records removed after the resume"
    );
    let (code, _) = f.stop()?;
    assert_eq!(code, 0);
    Ok(())
}

#[test]
fn gate_costs_nothing_when_fsmon_is_on_time_and_never_stops_exec_or_unarmed() -> anyhow::Result<()>
{
    // fsmon follows the v1 engine only: the v2 engine's containers are not armed.
    let (v1_label, v1) = engines().remove(0);
    let (_, v2) = engines().remove(1);
    let mut f = Fsmon::start(std::slice::from_ref(&v1), &[])?;
    let name = unique(v1_label);
    let id = run_detached(&v1, &name, &["sh", "-c", "touch /f0; sleep 1000"])?;
    let start = f.wait_for(WAIT, is("container_start", id.clone()))?;
    assert_eq!(start["gated_us"], Value::Null, "nothing held: {start}");
    // docker exec in an armed container runs (exec'd tasks of armed containers pass).
    docker(&v1, &["exec", &id, "sh", "-c", "touch /by-exec"])?;
    f.wait_for(WAIT, |r| {
        r["kind"] == "create" && r["container"]["id"] == id.as_str() && r["path"] == "/by-exec"
    })?;
    // A container fsmon does not arm starts and runs to its end.
    let other = unique("unarmed");
    run_rm(&v2, &other, &["sh", "-c", "touch /x; sleep 0.2; touch /y"])?;
    assert!(
        f.records
            .iter()
            .all(|r| r["container"]["name"] != other.as_str()),
        "an unarmed container is not reported"
    );
    assert!(
        stopped_container_tasks().is_empty(),
        "stopped: {:?}",
        stopped_container_tasks()
    );
    docker(&v1, &["rm", "-f", &id])?;
    let (code, _) = f.stop()?;
    assert_eq!(code, 0);
    Ok(())
}

#[test]
fn gate_kill_9_while_a_start_is_held_then_restart_resumes_it() -> anyhow::Result<()> {
    let mut held = Vec::new();
    let f = Fsmon::start(&hosts(), &[])?;
    let state_dir = f.state_dir.path().to_owned();
    // SIGKILL can end a stopped process: no SIGCONT needed first.
    signal(f.pid(), libc::SIGSTOP);
    for (label, host) in engines() {
        let name = unique(label);
        let id = run_detached(&host, &name, &["sh", "-c", "touch /f0; sleep 1000"])?;
        let pid = init_pid(&host, &id)?;
        assert_eq!(
            wait_state(pid, Duration::from_secs(5), |s| s == b'T'),
            Some(b'T'),
            "{label}: held while fsmon is stopped"
        );
        held.push((label, host, id, pid));
    }
    // Killed while holding: it never even read the gate's records.
    let state = f.kill_9()?;
    // A task its user stopped on purpose (same state T), and a record of a task whose pid
    // now names another process (start time differs): neither may be resumed.
    let mut user_stopped = std::process::Command::new("sleep").arg("1000").spawn()?;
    signal(user_stopped.id(), libc::SIGSTOP);
    let mut recycled = std::process::Command::new("sleep").arg("1000").spawn()?;
    signal(recycled.id(), libc::SIGSTOP);
    let start = proc_stat(recycled.id()).map_or(0, |s| s.start_ticks);
    std::fs::write(
        state_dir.join("999999-1"),
        format!("stop {} {} 1\n", recycled.id(), start + 1),
    )?;
    let mut second = Fsmon::start_in(&hosts(), &[], state)?;
    for (label, host, id, pid) in &held {
        assert_ne!(
            wait_state(*pid, Duration::from_secs(5), |s| s != b'T'),
            Some(b'T'),
            "{label}: resumed by the restarted fsmon"
        );
        docker(host, &["exec", id, "touch", "/after-restart"])?;
        second.wait_for(WAIT, |r| {
            r["kind"] == "create"
                && r["container"]["id"] == id.as_str()
                && r["path"] == "/after-restart"
        })?;
        docker(host, &["rm", "-f", id])?;
    }
    assert_eq!(proc_stat(user_stopped.id()).map(|s| s.state), Some(b'T'));
    assert_eq!(proc_stat(recycled.id()).map(|s| s.state), Some(b'T'));
    assert!(
        std::fs::read_dir(&state_dir)?.next().is_none(),
        "records consumed"
    );
    for c in [&mut user_stopped, &mut recycled] {
        c.kill()?;
        c.wait()?;
    }
    assert!(
        stopped_container_tasks().is_empty(),
        "stopped: {:?}",
        stopped_container_tasks()
    );
    let (code, _) = second.stop()?;
    assert_eq!(code, 0);
    Ok(())
}

fn gate_runs() -> usize {
    std::env::var("FSMON_GATE_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100)
}

#[test]
fn gate_under_stalls_many_starts_4_at_a_time_cpu_hog() -> anyhow::Result<()> {
    let mut f = Fsmon::start(&hosts(), &[])?;
    for (label, host) in engines() {
        // fsmon is stopped for 300, 700 or 1500 ms, then runs for 100 ms. Under the CPU hog
        // the engine may take several hundred ms from a container's cgroup to its first
        // exec (`runc create` → `runc start`): the long stops make sure many of those
        // execs still find fsmon stopped, the short ones vary where in a start it resumes.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let staller = {
            let (stop, pid) = (stop.clone(), f.pid());
            std::thread::spawn(move || {
                for stalled_ms in [300, 700, 1500].into_iter().cycle() {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    signal(pid, libc::SIGSTOP);
                    std::thread::sleep(Duration::from_millis(stalled_ms));
                    signal(pid, libc::SIGCONT);
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        let hog = CpuHog::start()?;
        // Kept, not --rm: a container that runs and exits while fsmon is stopped is
        // reported when fsmon resumes, by scanning what it left; a --rm layer would be gone.
        let names = run_many_with(&host, label, gate_runs(), 4, run_kept);
        drop(hog);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        staller
            .join()
            .map_err(|_| anyhow::anyhow!("staller panicked"))?;
        signal(f.pid(), libc::SIGCONT);
        let names = names?;
        check_lossless(&mut f, &format!("{label} stalled fsmon, CPU hog"), &names)?;
        for name in &names {
            docker(&host, &["rm", "-f", name])?;
        }
        let gated = start_durations(&f, &names, "gated_us");
        eprintln!(
            "{label}: {} starts, {} gated, gated_us max {:?}",
            names.len(),
            gated.len(),
            gated.iter().max()
        );
        assert!(!gated.is_empty(), "{label}: the gate engaged at least once");
        assert!(
            stopped_container_tasks().is_empty() && frozen_cgroups().is_empty(),
            "{label}: left stopped {:?} / frozen {:?}",
            stopped_container_tasks(),
            frozen_cgroups()
        );
    }
    let (code, _) = f.stop()?;
    assert_eq!(code, 0);
    Ok(())
}
