//! Shared helpers for the privileged integration tests: start the real `fsmon` binary,
//! read its JSON Lines, drive real Docker engines.
//!
//! Tier 3 (`tests/docker.rs`) needs the environment `cargo xtask test` sets up:
//! `FSMON_BIN`, `FSMON_DOCKER_V1`, `FSMON_DOCKER_V2`, `FSMON_TEST_IMAGE`.

pub mod overlay_mount;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// Reads a required environment variable, with a hint to use the xtask.
pub fn env(name: &str) -> String {
    std::env::var(name)
        .unwrap_or_else(|_| panic!("{name} is not set: run these tests with `cargo xtask test`"))
}

/// The two engines under test: (label, DOCKER_HOST URL).
pub fn engines() -> Vec<(&'static str, String)> {
    vec![
        ("cgroup-v1", env("FSMON_DOCKER_V1")),
        ("cgroup-v2", env("FSMON_DOCKER_V2")),
    ]
}

/// The test image.
pub fn image() -> String {
    env("FSMON_TEST_IMAGE")
}

/// Runs `docker -H host args...`; returns trimmed stdout, or an error with stderr.
pub fn docker(host: &str, args: &[&str]) -> Result<String> {
    let out = Command::new("docker")
        .arg("-H")
        .arg(host)
        .args(args)
        .output()
        .context("running docker")?;
    if !out.status.success() {
        bail!(
            "docker {args:?} on {host} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A container name no other test run uses: `fsmon-<prefix>-<pid>-<nanoseconds>`.
pub fn unique(prefix: &str) -> String {
    format!(
        "fsmon-{prefix}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0)
    )
}

/// `docker run -d` of the test image, labelled for clean-up; returns the container id.
pub fn run_detached(host: &str, name: &str, cmd: &[&str]) -> Result<String> {
    run_test_image(host, "-d", name, cmd)
}

/// `docker run --rm` of the test image (waits for it to exit).
pub fn run_rm(host: &str, name: &str, cmd: &[&str]) -> Result<String> {
    run_test_image(host, "--rm", name, cmd)
}

/// `docker run` of the test image (waits for it to exit; the container is kept).
pub fn run_kept(host: &str, name: &str, cmd: &[&str]) -> Result<String> {
    run_test_image(host, "--pull=never", name, cmd)
}

fn run_test_image(host: &str, mode: &str, name: &str, cmd: &[&str]) -> Result<String> {
    let image = image();
    let mut args = vec![
        "run",
        mode,
        "--network",
        "none",
        "--label",
        "fsmon-test",
        "--name",
        name,
        &image,
    ];
    args.extend_from_slice(cmd);
    docker(host, &args)
}

/// A running `fsmon run`, with its records collected by a reader thread.
pub struct Fsmon {
    child: Child,
    rx: mpsc::Receiver<Value>,
    /// Every record received so far, in order.
    pub records: Vec<Value>,
    /// The state directory it uses (a temp dir per instance).
    pub state_dir: tempfile::TempDir,
}

impl Fsmon {
    /// Starts fsmon against `hosts` with extra `args`, and waits for `ready`.
    pub fn start(hosts: &[String], args: &[&str]) -> Result<Fsmon> {
        Self::start_with_nofile(hosts, args, None)
    }

    /// Like [`Fsmon::start`], with `RLIMIT_NOFILE` (soft and hard) set to `nofile` for the
    /// fsmon process, as `ulimit -n` or systemd's `LimitNOFILE=` would.
    pub fn start_with_nofile(
        hosts: &[String],
        args: &[&str],
        nofile: Option<u64>,
    ) -> Result<Fsmon> {
        Self::launch(hosts, args, tempfile::tempdir()?, nofile)
    }

    /// [`Fsmon::start`] with a given state directory (e.g. one a killed fsmon left).
    pub fn start_in(
        hosts: &[String],
        args: &[&str],
        state_dir: tempfile::TempDir,
    ) -> Result<Fsmon> {
        Self::launch(hosts, args, state_dir, None)
    }

    fn launch(
        hosts: &[String],
        args: &[&str],
        state_dir: tempfile::TempDir,
        nofile: Option<u64>,
    ) -> Result<Fsmon> {
        let mut cmd = Command::new(env("FSMON_BIN"));
        cmd.arg("run");
        for h in hosts {
            cmd.args(["--docker-host", h]);
        }
        cmd.arg("--state-dir").arg(state_dir.path()).args(args);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null());
        if let Some(n) = nofile {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: setrlimit is async-signal-safe; the closure touches nothing else.
            unsafe {
                cmd.pre_exec(move || {
                    set_nofile(0, n, n)?;
                    Ok(())
                });
            }
        }
        Self::from_command(cmd, state_dir)
    }

    /// Starts `cmd`, whose stdout carries fsmon's records (fsmon itself, or `docker logs
    /// -f` of an fsmon container), and waits for `ready`.
    pub fn from_command(mut cmd: Command, state_dir: tempfile::TempDir) -> Result<Fsmon> {
        cmd.stdout(Stdio::piped());
        let mut child = cmd.spawn().context("starting fsmon")?;
        let stdout = child.stdout.take().context("fsmon stdout")?;
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let v: Value = serde_json::from_str(&line).unwrap_or_else(|e| {
                    panic!("fsmon printed a line that is not JSON ({e}): {line:?}")
                });
                if tx.send(v).is_err() {
                    break;
                }
            }
        });
        let mut f = Fsmon {
            child,
            rx,
            records: Vec::new(),
            state_dir,
        };
        f.wait_for(Duration::from_secs(60), |r| r["kind"] == "ready")
            .context("fsmon never printed ready")?;
        Ok(f)
    }

    /// Collects records until one matches `pred` (returned) or `timeout` passes.
    pub fn wait_for(&mut self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        if let Some(v) = self.records.iter().find(|r| pred(r)) {
            return Ok(v.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    let hit = pred(&v);
                    self.records.push(v.clone());
                    if hit {
                        return Ok(v);
                    }
                }
                Err(_) => bail!(
                    "no matching record within {timeout:?}; got {} records: {:#?}",
                    self.records.len(),
                    tail(&self.records)
                ),
            }
        }
    }

    /// Waits for the `container_start` of the container named `name`, then for its
    /// `container_stop`; returns its id.
    pub fn wait_start_stop(&mut self, timeout: Duration, name: &str) -> Result<String> {
        let start = self.wait_for(timeout, |r| {
            r["kind"] == "container_start" && r["container"]["name"] == name
        })?;
        let id = start["container"]["id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        self.wait_for(timeout, |r| {
            r["kind"] == "container_stop" && r["container"]["id"] == id.as_str()
        })?;
        Ok(id)
    }

    /// Collects records until at least `n` match `pred`; returns the matches.
    pub fn wait_n(
        &mut self,
        timeout: Duration,
        n: usize,
        pred: impl Fn(&Value) -> bool,
    ) -> Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        // Each record is tested once (a scan of every record per arrival would be
        // quadratic: tens of thousands of records in the scale tests).
        let mut hits: Vec<Value> = self.records.iter().filter(|r| pred(r)).cloned().collect();
        loop {
            if hits.len() >= n {
                return Ok(hits);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => {
                    if pred(&v) {
                        hits.push(v.clone());
                    }
                    self.records.push(v);
                }
                Err(_) => bail!(
                    "only {} of {n} matching records within {timeout:?}; last records: {:#?}",
                    hits.len(),
                    tail(&self.records)
                ),
            }
        }
    }

    /// Collects whatever arrives within `quiet` of the last record.
    pub fn settle(&mut self, quiet: Duration) {
        while let Ok(v) = self.rx.recv_timeout(quiet) {
            self.records.push(v);
        }
    }

    /// Records about container `id`, in order.
    pub fn of(&self, id: &str) -> Vec<&Value> {
        self.records
            .iter()
            .filter(|r| r["container"]["id"] == id)
            .collect()
    }

    /// Sends SIGTERM and waits; returns the exit code. Drains the remaining records.
    pub fn stop(mut self) -> Result<(i32, Vec<Value>)> {
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let status = self.child.wait()?;
        while let Ok(v) = self.rx.recv_timeout(Duration::from_millis(500)) {
            self.records.push(v);
        }
        let records = std::mem::take(&mut self.records);
        Ok((status.code().unwrap_or(-1), records))
    }

    /// Kills fsmon with SIGKILL (nothing of its own clean-up runs) and hands back its
    /// state directory, for a restart with [`Fsmon::start_in`].
    pub fn kill_9(mut self) -> Result<tempfile::TempDir> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(std::mem::replace(&mut self.state_dir, tempfile::tempdir()?))
    }

    /// The child's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Fsmon {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let _ = self.child.wait();
        }
    }
}

/// Sets `RLIMIT_NOFILE` of process `pid` (0: this one) to `soft` and `hard` (raising a
/// hard limit needs `CAP_SYS_RESOURCE`; raising the soft one up to the hard one does not).
pub fn set_nofile(pid: u32, soft: u64, hard: u64) -> std::io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: prlimit reads the struct we pass, which lives for the call; no old value.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            &lim,
            std::ptr::null_mut(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The soft and hard `RLIMIT_NOFILE` of process `pid`.
pub fn nofile_of(pid: u32) -> std::io::Result<(u64, u64)> {
    let mut old = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: prlimit writes into `old`, which lives for the call; nothing is set.
    let r = unsafe {
        libc::prlimit(
            pid as libc::pid_t,
            libc::RLIMIT_NOFILE,
            std::ptr::null(),
            &mut old,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((old.rlim_cur, old.rlim_max))
}

/// How many file descriptors process `pid` has open (`/proc/<pid>/fd`).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

/// Cgroups of the test engines' containers that are frozen now (v1 freezer and v2).
pub fn frozen_cgroups() -> Vec<String> {
    let mut frozen = Vec::new();
    for (glob_dir, file, thawed) in [
        ("/sys/fs/cgroup/freezer/docker", "freezer.state", "THAWED"),
        ("/sys/fs/cgroup/unified/docker", "cgroup.freeze", "0"),
    ] {
        let Ok(rd) = std::fs::read_dir(glob_dir) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path().join(file);
            if let Ok(s) = std::fs::read_to_string(&p) {
                if s.trim() != thawed {
                    frozen.push(p.display().to_string());
                }
            }
        }
    }
    frozen
}

fn tail(v: &[Value]) -> &[Value] {
    &v[v.len().saturating_sub(15)..]
}

/// A container id's records of kind `kind`.
pub fn kinds<'a>(recs: &[&'a Value], kind: &str) -> Vec<&'a Value> {
    recs.iter().copied().filter(|r| r["kind"] == kind).collect()
}

/// A container's records start with `container_start` and end with `container_stop`:
/// nothing is reported before it is armed or after it is gone (e.g. `--rm` cleanup).
pub fn assert_bracketed(recs: &[&Value], what: &str) {
    assert_eq!(
        recs.first().map(|r| r["kind"].clone()),
        Some("container_start".into()),
        "{what}"
    );
    assert_eq!(
        recs.last().map(|r| r["kind"].clone()),
        Some("container_stop".into()),
        "{what}"
    );
}

/// Runs `ctr` against the test containerd (`FSMON_CONTAINERD_SOCK`) in namespace `ns`;
/// returns trimmed stdout, or an error with stderr.
pub fn ctr(ns: &str, args: &[&str]) -> Result<String> {
    tool(
        Command::new("ctr")
            .args(["-a", &env("FSMON_CONTAINERD_SOCK"), "-n", ns])
            .args(args),
        "ctr",
        args,
    )
}

/// Runs `podman`; returns trimmed stdout, or an error with stderr.
pub fn podman(args: &[&str]) -> Result<String> {
    tool(Command::new("podman").args(args), "podman", args)
}

/// `podman run` of the test image (`mode`: `--rm` or `-d`) with what this host needs.
pub fn podman_run(mode: &str, name: &str, cmd: &[&str]) -> Result<String> {
    let image = env("FSMON_PODMAN_IMAGE");
    let mut args = vec![
        "run",
        mode,
        "--name",
        name,
        "--label",
        "fsmon-test",
        "--network",
        "none",
        // This host's limits are lower than podman's defaults.
        "--ulimit",
        "nofile=1024:1024",
        "--ulimit",
        "nproc=1024:1024",
        &image,
    ];
    args.extend_from_slice(cmd);
    podman(&args)
}

fn tool(cmd: &mut Command, name: &str, args: &[&str]) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {name}"))?;
    if !out.status.success() {
        bail!(
            "{name} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// A fresh random 64-hex id (ctr takes the id from its user; fsmon's cgroup filter wants
/// 64 hex digits).
pub fn random_id() -> String {
    let mut b = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        use std::io::Read as _;
        let _ = f.read_exact(&mut b);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}
