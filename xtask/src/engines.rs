//! The test bed: Docker engines with cgroup v1 and cgroup v2, a system containerd of its
//! own, podman, test images built from local files, and the test tiers run in order.
//!
//! Engines already answering on their sockets are used as they are and left running;
//! engines this command starts are stopped at the end (unless `--keep-engines`). Leftovers
//! of an earlier run (a stale pid file, a dead engine's socket) are cleaned first.

use std::{
    os::unix::process::CommandExt as _,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    ebpf,
    util::{self, cargo, ok, run},
};

/// Socket of the cgroup v1 engine (the host's default engine).
pub const V1_HOST: &str = "unix:///var/run/docker.sock";
/// Socket of the cgroup v2 engine, started in its own mount namespace.
pub const V2_HOST: &str = "unix:///var/run/docker-v2.sock";
/// The image the tests run: a busybox root file system imported from local files.
/// The tag changes whenever the image's content does, so an old image is never reused.
pub const TEST_IMAGE: &str = "fsmon-test:2";
/// The test containerd's state directory: bundles are under it, and fsmon is told with
/// `--containerd-state`.
pub const CONTAINERD_STATE: &str = "/run/fsmon-containerd";
/// The test containerd's socket. Not the default `/run/containerd/containerd.sock`: a
/// dockerd adopts a containerd that answers there when it starts (ENVIRONMENT.md), so the
/// order in which the engines come up would matter.
pub const CONTAINERD_SOCK: &str = "/run/fsmon-containerd/containerd.sock";
/// The test image as containerd names it (`docker save` of TEST_IMAGE, imported).
pub const CTR_IMAGE: &str = "docker.io/library/fsmon-test:2";
/// The CRI plugin's sandbox ("pause") image, in containerd's `k8s.io` namespace: busybox
/// whose entrypoint sleeps (no registry here to pull `registry.k8s.io/pause` from).
pub const PAUSE_IMAGE: &str = "docker.io/library/fsmon-pause:1";
/// The same image as the Docker engine it is built in names it.
const PAUSE_IMAGE_DOCKER: &str = "fsmon-pause:1";
/// The test image as podman names it (`podman load` of the same archive).
pub const PODMAN_IMAGE: &str = "localhost/fsmon-test:2";
const CONTAINERD_CONFIG: &str = "/var/lib/fsmon-test/containerd.toml";
const CONTAINERD_PIDFILE: &str = "/run/fsmon-containerd.pid";
const PODMAN_DROP_IN: &str = "/etc/containers/containers.conf.d/50-fsmon-test.conf";

/// `cargo xtask test` options.
#[derive(clap::Args, Debug)]
pub struct TestArgs {
    /// Leave the engines this command started running afterwards.
    #[arg(long)]
    pub keep_engines: bool,
    /// Only these tiers (1 unit, 2 overlay, 3 engines: Docker, containerd, podman, 4 the
    /// bench in `--quick` mode); default all.
    #[arg(long, value_delimiter = ',')]
    pub tier: Vec<u8>,
    /// Passed to the tier-3 test binary as a filter (test name substring).
    #[arg(long)]
    pub filter: Option<String>,
    /// Only these tier-3 test binaries (`docker`, `scale`, `runtimes`, `operator`);
    /// repeatable or comma-separated; default all.
    #[arg(long, value_delimiter = ',')]
    pub test: Vec<String>,
}

/// An engine this process started, to stop at the end.
pub struct Started {
    pidfile: &'static str,
    name: &'static str,
}

fn engine_up(host: &str) -> bool {
    ok(Command::new("docker").args(["-H", host, "info"]))
}

fn pid_alive(pidfile: &str) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()?;
    Path::new(&format!("/proc/{pid}")).exists().then_some(pid)
}

fn clean_stale(pidfile: &str, sock: &str) {
    if pid_alive(pidfile).is_none() {
        let _ = std::fs::remove_file(pidfile);
        let _ = std::fs::remove_file(sock);
    }
}

fn wait_up(host: &str, log: &str) -> Result<()> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(90) {
        if engine_up(host) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let tail = std::fs::read_to_string(log).unwrap_or_default();
    let tail: Vec<&str> = tail.lines().rev().take(20).collect();
    bail!(
        "docker engine at {host} did not come up in 90 s; last lines of {log}:\n{}",
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    )
}

/// `setsid …` for a daemon that outlives this command. It inherits no descriptor but its
/// stdio: a lock held by whoever ran `cargo xtask` (e.g. `flock`) would otherwise live on
/// in the engines and be held until they stop.
fn daemon_command() -> Command {
    let mut c = Command::new("setsid");
    // SAFETY: between fork and exec only an async-signal-safe system call is made.
    unsafe {
        c.pre_exec(|| {
            // close_range(3, ~0, CLOSE_RANGE_CLOEXEC): every inherited fd closes at exec.
            libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 4u32);
            Ok(())
        });
    }
    c
}

fn start_v1() -> Result<Option<Started>> {
    if engine_up(V1_HOST) {
        eprintln!("xtask: cgroup v1 engine already running at {V1_HOST}");
        return Ok(None);
    }
    clean_stale("/var/run/docker.pid", "/var/run/docker.sock");
    let log = "/var/log/fsmon-dockerd-v1.log";
    eprintln!("xtask: starting the cgroup v1 engine (log: {log})");
    let logf = std::fs::File::create(log)?;
    daemon_command()
        .args([
            "dockerd",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--pidfile",
            "/var/run/docker.pid",
            "-H",
            V1_HOST,
        ])
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .spawn()
        .context("cannot start dockerd")?;
    wait_up(V1_HOST, log)?;
    Ok(Some(Started {
        pidfile: "/var/run/docker.pid",
        name: "cgroup v1 engine",
    }))
}

fn start_v2() -> Result<Option<Started>> {
    if engine_up(V2_HOST) {
        eprintln!("xtask: cgroup v2 engine already running at {V2_HOST}");
        return Ok(None);
    }
    clean_stale("/var/run/docker-v2.pid", "/var/run/docker-v2.sock");
    let log = "/var/log/fsmon-dockerd-v2.log";
    eprintln!("xtask: starting the cgroup v2 engine in its own mount namespace (log: {log})");
    let logf = std::fs::File::create(log)?;
    // A private mount namespace where /sys/fs/cgroup is the v2 hierarchy alone, so this
    // dockerd (and its runc) see a pure cgroup v2 host (ENVIRONMENT.md).
    let script = "mount --make-rprivate / && \
        { umount -l /sys/fs/cgroup/unified 2>/dev/null || true; } && \
        mount -t tmpfs tmpfs /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup && \
        exec dockerd --iptables=false --ip6tables=false --bridge=none --data-root /var/lib/docker-v2 \
          --exec-root /var/run/docker-v2 -H unix:///var/run/docker-v2.sock --pidfile /var/run/docker-v2.pid";
    daemon_command()
        .args(["unshare", "-m", "sh", "-c", script])
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .spawn()
        .context("cannot start the cgroup v2 dockerd")?;
    wait_up(V2_HOST, log)?;
    Ok(Some(Started {
        pidfile: "/var/run/docker-v2.pid",
        name: "cgroup v2 engine",
    }))
}

/// Stops an engine this process started.
pub fn stop(s: &Started) {
    if let Some(pid) = pid_alive(s.pidfile) {
        eprintln!("xtask: stopping the {} (pid {pid})", s.name);
        let _ = Command::new("kill").arg(pid.to_string()).status();
        let start = Instant::now();
        while Path::new(&format!("/proc/{pid}")).exists()
            && start.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

fn ensure_image(host: &str) -> Result<()> {
    if ok(Command::new("docker").args(["-H", host, "image", "inspect", TEST_IMAGE])) {
        return Ok(());
    }
    let dir = tempdir()?;
    for d in ["bin", "tmp", "etc", "var", "root", "data/sub"] {
        std::fs::create_dir_all(dir.join(d))?;
    }
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("copy /bin/busybox (package busybox-static)")?;
    // Every applet as its own command (sh, sleep, touch, mkdir, ...).
    let list = Command::new("/bin/busybox")
        .arg("--list")
        .output()
        .context("busybox --list")?;
    for applet in String::from_utf8_lossy(&list.stdout).split_whitespace() {
        if applet != "busybox" && !applet.contains('/') {
            std::os::unix::fs::symlink("busybox", dir.join("bin").join(applet))?;
        }
    }
    // Image content the tests modify, delete and copy up.
    std::fs::write(dir.join("etc/passwd"), "root:x:0:0:root:/root:/bin/sh\n")?;
    std::fs::write(dir.join("etc/image-file"), "from the image\n")?;
    std::fs::write(dir.join("data/sub/lower.txt"), "lower\n")?;
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let status = Command::new("docker")
        .args(["-H", host, "import", "-", TEST_IMAGE])
        .stdin(tar.stdout.context("tar stdout")?)
        .stdout(Stdio::null())
        .status()?;
    let _ = std::fs::remove_dir_all(&dir);
    if !status.success() {
        bail!("docker import of {TEST_IMAGE} into {host} failed");
    }
    Ok(())
}

/// The sandbox image: a busybox that sleeps until the CRI plugin kills it (StopPodSandbox
/// sends SIGKILL). Built in the cgroup v1 engine, exported from there to containerd.
fn ensure_pause_image(host: &str) -> Result<()> {
    if ok(Command::new("docker").args(["-H", host, "image", "inspect", PAUSE_IMAGE_DOCKER])) {
        return Ok(());
    }
    let dir = tempdir()?;
    std::fs::create_dir_all(dir.join("bin"))?;
    std::fs::copy("/bin/busybox", dir.join("bin/busybox"))
        .context("copy /bin/busybox (package busybox-static)")?;
    std::os::unix::fs::symlink("busybox", dir.join("bin/sleep"))?;
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&dir)
        .args(["-c", "."])
        .stdout(Stdio::piped())
        .spawn()?;
    let status = Command::new("docker")
        .args(["-H", host, "import", "--change"])
        .arg(r#"ENTRYPOINT ["/bin/sleep", "2147483647"]"#)
        .args(["-", PAUSE_IMAGE_DOCKER])
        .stdin(tar.stdout.context("tar stdout")?)
        .stdout(Stdio::null())
        .status()?;
    let _ = std::fs::remove_dir_all(&dir);
    if !status.success() {
        bail!("docker import of {PAUSE_IMAGE_DOCKER} into {host} failed");
    }
    Ok(())
}

fn tempdir() -> Result<std::path::PathBuf> {
    let d = std::env::temp_dir().join(format!("fsmon-xtask-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d)?;
    Ok(d)
}

/// Removes test containers an earlier (interrupted) run left behind.
fn remove_leftover_containers(host: &str) {
    let out = Command::new("docker")
        .args(["-H", host, "ps", "-aq", "--filter", "label=fsmon-test"])
        .output();
    if let Ok(o) = out {
        let ids: Vec<String> = String::from_utf8_lossy(&o.stdout)
            .split_whitespace()
            .map(str::to_owned)
            .collect();
        if !ids.is_empty() {
            let _ = Command::new("docker")
                .args(["-H", host, "rm", "-f"])
                .args(&ids)
                .stdout(Stdio::null())
                .status();
        }
    }
}

fn containerd_up() -> bool {
    ok(Command::new("ctr").args(["-a", CONTAINERD_SOCK, "version"]))
}

/// A system containerd with its own config file, socket, root and state (a user's
/// `/etc/containerd/config.toml` is left alone), and its CRI plugin configured as this
/// host needs (`restrict_oom_score_adj`: no raising of OOM scores in this VM).
fn start_containerd() -> Result<Option<Started>> {
    if containerd_up() {
        eprintln!("xtask: test containerd already running at {CONTAINERD_SOCK}");
        return Ok(None);
    }
    clean_stale(CONTAINERD_PIDFILE, CONTAINERD_SOCK);
    std::fs::create_dir_all("/var/lib/fsmon-test")?;
    std::fs::write(
        CONTAINERD_CONFIG,
        format!(
            r#"# Written by `cargo xtask test`: the test bed's own containerd.
version = 2
root = "/var/lib/fsmon-containerd"
state = "{CONTAINERD_STATE}"
[grpc]
  address = "{CONTAINERD_SOCK}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{PAUSE_IMAGE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
"#
        ),
    )?;
    let log = "/var/log/fsmon-containerd.log";
    eprintln!("xtask: starting the test containerd (config: {CONTAINERD_CONFIG}, log: {log})");
    let logf = std::fs::File::create(log)?;
    let child = daemon_command()
        .args(["containerd", "--config", CONTAINERD_CONFIG])
        .stdin(Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .spawn()
        .context("cannot start containerd (package containerd)")?;
    std::fs::write(CONTAINERD_PIDFILE, child.id().to_string())?;
    let start = Instant::now();
    while !containerd_up() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("the test containerd did not answer at {CONTAINERD_SOCK} in 30 s; see {log}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(Some(Started {
        pidfile: CONTAINERD_PIDFILE,
        name: "test containerd",
    }))
}

/// podman with runc: crun refuses this hybrid host ("cgroups in hybrid mode not
/// supported"). A drop-in of its own, so a user's containers.conf stays as it is.
fn configure_podman() -> Result<()> {
    let want = "# Written by `cargo xtask test`: crun refuses hybrid cgroup hosts.\n[engine]\nruntime = \"runc\"\n";
    if std::fs::read_to_string(PODMAN_DROP_IN).ok().as_deref() != Some(want) {
        std::fs::create_dir_all("/etc/containers/containers.conf.d")?;
        std::fs::write(PODMAN_DROP_IN, want)?;
    }
    Ok(())
}

/// The test image in containerd (`default` for ctr, `k8s.io` for CRI) and in podman, from
/// the same archive as Docker's; the sandbox image in `k8s.io`.
fn ensure_other_images() -> Result<()> {
    let in_ns = |ns: &str, image: &str| {
        Command::new("ctr")
            .args(["-a", CONTAINERD_SOCK, "-n", ns, "images", "ls", "-q"])
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .any(|l| l == image)
            })
            .unwrap_or(false)
    };
    let missing_ns: Vec<&str> = ["default", "k8s.io"]
        .into_iter()
        .filter(|ns| !in_ns(ns, CTR_IMAGE))
        .collect();
    let podman_has = ok(Command::new("podman").args(["image", "exists", PODMAN_IMAGE]));
    let pause_has = in_ns("k8s.io", PAUSE_IMAGE);
    if missing_ns.is_empty() && podman_has && pause_has {
        return Ok(());
    }
    let dir = tempdir()?;
    if !pause_has {
        let archive = dir.join("pause.tar");
        run(Command::new("docker")
            .args(["-H", V1_HOST, "save", "-o"])
            .arg(&archive)
            .arg(PAUSE_IMAGE_DOCKER))?;
        run(Command::new("ctr")
            .args(["-a", CONTAINERD_SOCK, "-n", "k8s.io", "images", "import"])
            .arg(&archive)
            .stdout(Stdio::null()))?;
    }
    let archive = dir.join("image.tar");
    run(Command::new("docker")
        .args(["-H", V1_HOST, "save", "-o"])
        .arg(&archive)
        .arg(TEST_IMAGE))?;
    for ns in missing_ns {
        run(Command::new("ctr")
            .args(["-a", CONTAINERD_SOCK, "-n", ns, "images", "import"])
            .arg(&archive)
            .stdout(Stdio::null()))?;
    }
    if !podman_has {
        run(Command::new("podman")
            .args(["load", "-q", "-i"])
            .arg(&archive)
            .stdout(Stdio::null()))?;
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// Removes test containers of containerd and podman that an earlier run left behind.
fn remove_other_leftovers() {
    let out = Command::new("ctr")
        .args([
            "-a",
            CONTAINERD_SOCK,
            "-n",
            "default",
            "containers",
            "ls",
            "-q",
            r#"labels."fsmon-test""#,
        ])
        .output();
    for id in out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
        .split_whitespace()
    {
        let ctr = |args: &[&str]| {
            ok(Command::new("ctr")
                .args(["-a", CONTAINERD_SOCK, "-n", "default"])
                .args(args))
        };
        ctr(&["tasks", "kill", "-s", "SIGKILL", id]);
        std::thread::sleep(Duration::from_millis(200));
        ctr(&["tasks", "delete", "-f", id]);
        ctr(&["containers", "delete", id]);
    }
    let _ = Command::new("podman")
        .args(["rm", "-f", "-t", "0", "--filter", "label=fsmon-test"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// Installs what the test bed needs and starts both engines; returns what it started.
pub fn start_engines() -> Result<Vec<Started>> {
    util::require_root("the test bed")?;
    util::apt_install(&[
        "docker.io",
        "busybox-static",
        "inotify-tools",
        "jq",
        "containerd",
        "runc",
        "podman",
        "conmon",
        "catatonit",
    ])?;
    if !Path::new("/sys/kernel/tracing/events").is_dir()
        && !Path::new("/sys/kernel/debug/tracing/events").is_dir()
    {
        let _ =
            run(Command::new("mount").args(["-t", "tracefs", "tracefs", "/sys/kernel/tracing"]));
    }
    let mut started = Vec::new();
    let v1 = start_v1();
    if let Ok(Some(s)) = &v1 {
        started.push(Started {
            pidfile: s.pidfile,
            name: s.name,
        });
    }
    v1?;
    match start_v2() {
        Ok(Some(s)) => started.push(s),
        Ok(None) => {}
        Err(e) => {
            started.iter().for_each(stop);
            return Err(e);
        }
    }
    for host in [V1_HOST, V2_HOST] {
        remove_leftover_containers(host);
        ensure_image(host)?;
    }
    ensure_pause_image(V1_HOST)?;
    // After the Docker engines, and on a socket of its own: no dockerd adopts it.
    match start_containerd() {
        Ok(Some(s)) => started.push(s),
        Ok(None) => {}
        Err(e) => {
            started.iter().for_each(stop);
            return Err(e);
        }
    }
    configure_podman()?;
    remove_other_leftovers();
    ensure_other_images()?;
    Ok(started)
}

/// The command that runs tier-3 test binaries, with the whole test bed described in its
/// environment.
fn tier3(tests: &[&str], bin: &Path, image: &str, filter: Option<&str>) -> Command {
    let mut c = cargo();
    c.current_dir(util::root())
        .args(["test", "-p", "fsmon-tests"]);
    for t in tests {
        c.args(["--test", t]);
    }
    c.args(["--", "--test-threads=1"])
        .env("FSMON_BIN", bin)
        .env("FSMON_DOCKER_V1", V1_HOST)
        .env("FSMON_DOCKER_V2", V2_HOST)
        .env("FSMON_TEST_IMAGE", TEST_IMAGE)
        .env("FSMON_CONTAINERD_SOCK", CONTAINERD_SOCK)
        .env("FSMON_CONTAINERD_STATE", CONTAINERD_STATE)
        .env("FSMON_CTR_IMAGE", CTR_IMAGE)
        .env("FSMON_PODMAN_IMAGE", PODMAN_IMAGE)
        .env("FSMON_PAUSE_IMAGE", PAUSE_IMAGE)
        .env("FSMON_IMAGE", image);
    c.args(filter);
    c
}

/// `cargo xtask test`.
pub fn test(args: &TestArgs) -> Result<()> {
    let want = |t: u8| args.tier.is_empty() || args.tier.contains(&t);
    let started_at = Instant::now();
    let mut ran = Vec::new();
    if want(1) {
        eprintln!("xtask: tier 1 — unit tests (pure logic)");
        run(cargo().current_dir(util::root()).args([
            "test",
            "--workspace",
            "--exclude",
            "fsmon-tests",
            "--all-features",
        ]))?;
        ran.push("tier 1 (unit)".to_owned());
    }
    if !want(2) && !want(3) && !want(4) {
        return Ok(());
    }
    util::require_root("tiers 2 and 3")?;
    // The tests crate's CRI client (k8s-cri) generates its gRPC bindings with protoc.
    if std::env::var_os("PROTOC").is_none() && util::which("protoc").is_none() {
        util::apt_install(&["protobuf-compiler"])?;
    }
    let bin = ebpf::build_all()?;
    let mut tier3_engines = Vec::new();
    if want(2) {
        eprintln!("xtask: tier 2 — the watcher on real overlay mounts");
        run(cargo().current_dir(util::root()).args([
            "test",
            "-p",
            "fsmon-tests",
            "--test",
            "watcher_overlay",
        ]))?;
        // Again with the smallest directory-fd cache: every operation then reopens the
        // directories and image layers it needs, as on a host at its descriptor budget.
        eprintln!("xtask: tier 2 again with an 8-fd directory cache");
        run(cargo()
            .current_dir(util::root())
            .args(["test", "-p", "fsmon-tests", "--test", "watcher_overlay"])
            .env("FSMON_TEST_FD_BUDGET", "8"))?;
        ran.push("tier 2 (overlay, default and 8-fd cache)".to_owned());
    }
    if want(3) {
        let started = start_engines()?;
        // The deployment test runs the fsmon image under the cgroup v1 engine.
        let image = crate::image::build(V1_HOST)?;
        // Each group is one cargo invocation; later groups run only if the earlier passed.
        let groups: [(&str, &[&str]); 3] = [
            (
                "the fsmon binary against the cgroup v1 and v2 Docker engines",
                &["docker", "scale"],
            ),
            (
                "the fsmon binary against containerd (ctr, CRI pods) and podman",
                &["runtimes"],
            ),
            (
                "operator experience: filters, output, stats, docs, the fsmon image",
                &["operator"],
            ),
        ];
        if let Some(t) = args
            .test
            .iter()
            .find(|t| !groups.iter().any(|(_, g)| g.contains(&t.as_str())))
        {
            bail!("--test {t}: no such tier-3 test (docker, scale, runtimes, operator)");
        }
        let mut r = Ok(());
        let mut binaries = Vec::new();
        for (what, tests) in groups {
            let tests: Vec<&str> = tests
                .iter()
                .copied()
                .filter(|t| args.test.is_empty() || args.test.iter().any(|a| a == t))
                .collect();
            if tests.is_empty() || r.is_err() {
                continue;
            }
            eprintln!("xtask: tier 3 — {what} ({})", tests.join(", "));
            r = run(&mut tier3(&tests, &bin, &image, args.filter.as_deref()));
            binaries.extend(tests);
        }
        // Tier 4 uses the same engines: they stay up for it.
        let bench_next = want(4) && r.is_ok();
        if !args.keep_engines && !bench_next {
            started.iter().for_each(stop);
        }
        r?;
        ran.push(format!("tier 3 ({})", binaries.join(", ")));
        if bench_next {
            tier3_engines = started;
        }
    }
    if want(4) {
        eprintln!("xtask: tier 4 — `cargo xtask bench --quick`: every experiment, small (its code cannot rot; numbers not to quote)");
        let report = util::root().join("target/bench-quick/benchmarks.md");
        let r = crate::bench::bench(&crate::bench::BenchArgs {
            runs: None,
            latency_samples: None,
            burst: None,
            storm: None,
            quick: true,
            report: Some(report.clone()),
            only: Vec::new(),
            keep_engines: args.keep_engines,
        });
        if !args.keep_engines {
            tier3_engines.iter().for_each(stop);
        }
        r?;
        ran.push(format!("tier 4 (bench --quick: {})", report.display()));
    }
    eprintln!(
        "xtask: ran {} in {:.0} s",
        ran.join(", "),
        started_at.elapsed().as_secs_f64()
    );
    Ok(())
}
