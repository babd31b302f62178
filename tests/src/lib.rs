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

/// `docker run -d` of the test image, labelled for clean-up; returns the container id.
pub fn run_detached(host: &str, name: &str, cmd: &[&str]) -> Result<String> {
    run_test_image(host, "-d", name, cmd)
}

/// `docker run --rm` of the test image (waits for it to exit).
pub fn run_rm(host: &str, name: &str, cmd: &[&str]) -> Result<String> {
    run_test_image(host, "--rm", name, cmd)
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
        let state_dir = tempfile::tempdir()?;
        let mut cmd = Command::new(env("FSMON_BIN"));
        cmd.arg("run");
        for h in hosts {
            cmd.args(["--docker-host", h]);
        }
        cmd.arg("--state-dir").arg(state_dir.path()).args(args);
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .stdin(Stdio::null());
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
        loop {
            let hits: Vec<Value> = self.records.iter().filter(|r| pred(r)).cloned().collect();
            if hits.len() >= n {
                return Ok(hits);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(v) => self.records.push(v),
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
