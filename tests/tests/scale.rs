//! Tier 3, scale: hundreds of containers under the descriptor limit a service really gets,
//! and containers that cannot be armed for lack of descriptors. Run with `cargo xtask
//! test` (it starts the engines and sets the environment).

use std::{
    collections::{HashMap, HashSet},
    sync::{
        atomic::{AtomicBool, AtomicUsize, Ordering},
        Arc,
    },
    time::Duration,
};

use fsmon_tests::{docker, engines, fd_count, frozen_cgroups, image, nofile_of, set_nofile, Fsmon};
use serde_json::Value;

/// What every container does first: files, a deep directory, and 100 directories.
const FIRST: &str = "touch /f0; mkdir -p /a/b/c; touch /a/b/c/f1; echo x > /a/b/c/f2; \
    i=0; while [ $i -lt 100 ]; do mkdir /dir$i; i=$((i+1)); done; touch /dir99/last; \
    exec sleep 3600";

fn first_paths() -> Vec<String> {
    let mut v: Vec<String> = ["/f0", "/a", "/a/b", "/a/b/c", "/a/b/c/f1", "/a/b/c/f2"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    v.extend((0..100).map(|i| format!("/dir{i}")));
    v.push("/dir99/last".into());
    v
}

fn hosts() -> Vec<String> {
    engines().into_iter().map(|(_, h)| h).collect()
}

fn scale_count() -> usize {
    std::env::var("FSMON_SCALE_CONTAINERS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300)
}

/// `docker run -d` of FIRST, `parallel` at a time, spread over both engines; returns
/// (host, id) of each.
fn start_many(tag: &str, n: usize, parallel: usize) -> anyhow::Result<Vec<(String, String)>> {
    let hosts = hosts();
    let image = image();
    let mut out = Vec::new();
    let mut i = 0;
    while i < n {
        let handles: Vec<_> = (i..(i + parallel).min(n))
            .map(|k| {
                let host = hosts[k % hosts.len()].clone();
                let name = format!("fsmon-{tag}-{}-{k}", std::process::id());
                let image = image.clone();
                std::thread::spawn(move || {
                    let id = docker(
                        &host,
                        &[
                            "run",
                            "-d",
                            "--network",
                            "none",
                            "--label",
                            "fsmon-test",
                            "--name",
                            &name,
                            &image,
                            "sh",
                            "-c",
                            FIRST,
                        ],
                    )?;
                    anyhow::Ok((host, id))
                })
            })
            .collect();
        for h in handles {
            out.push(
                h.join()
                    .map_err(|_| anyhow::anyhow!("docker thread panicked"))??,
            );
        }
        i += parallel;
    }
    Ok(out)
}

/// Removes the containers, a batch per engine.
fn remove_all(containers: &[(String, String)]) {
    let mut by_host: HashMap<&str, Vec<&str>> = HashMap::new();
    for (h, id) in containers {
        by_host.entry(h).or_default().push(id);
    }
    for (h, ids) in by_host {
        for chunk in ids.chunks(50) {
            let mut args = vec!["rm", "-f"];
            args.extend_from_slice(chunk);
            if let Err(e) = docker(h, &args) {
                eprintln!("clean-up: {e}");
            }
        }
    }
}

/// Removes the containers even when the test fails half-way.
struct Cleanup(Vec<(String, String)>);
impl Drop for Cleanup {
    fn drop(&mut self) {
        remove_all(&self.0);
    }
}

/// Samples a process's open fd count until dropped; keeps the maximum.
struct FdSampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}
impl FdSampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicUsize::new(0));
        let (s, m) = (stop.clone(), max.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                m.fetch_max(fd_count(pid), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        FdSampler {
            stop,
            max,
            thread: Some(thread),
        }
    }
    fn max(&self) -> usize {
        self.max.load(Ordering::Relaxed)
    }
}
impl Drop for FdSampler {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn created_paths<'a>(f: &'a Fsmon, id: &str) -> HashMap<&'a str, &'a str> {
    f.records
        .iter()
        .filter(|r| r["container"]["id"] == id && r["kind"] == "create")
        .filter_map(|r| Some((r["path"].as_str()?, r["source"].as_str()?)))
        .collect()
}

fn overflows_of<'a>(f: &'a Fsmon, reason: &str) -> Vec<&'a Value> {
    f.records
        .iter()
        .filter(|r| r["kind"] == "overflow" && r["reason"] == reason)
        .collect()
}

/// Stops fsmon: a clean exit, nothing left frozen.
fn stop_clean(f: Fsmon) -> anyhow::Result<()> {
    let (code, _) = f.stop()?;
    assert_eq!(code, 0);
    assert!(
        frozen_cgroups().is_empty(),
        "left frozen: {:?}",
        frozen_cgroups()
    );
    Ok(())
}

/// 300 containers (4 at a time, 100 directories each) under `ulimit -n 1024`, the soft
/// limit of a systemd service: every one is armed, every first-instruction path reported,
/// and fsmon never holds more descriptors than its limit allows.
#[test]
fn hundreds_of_containers_under_a_service_fd_limit() -> anyhow::Result<()> {
    const LIMIT: u64 = 1024;
    let mut f = Fsmon::start_with_nofile(&hosts(), &[], Some(LIMIT))?;
    let pid = f.pid();
    assert_eq!(nofile_of(pid)?, (LIMIT, LIMIT));
    let sampler = FdSampler::start(pid);
    let n = scale_count();
    let t0 = std::time::Instant::now();
    let containers = Cleanup(start_many("scale", n, 4)?);
    eprintln!(
        "started {n} containers in {:.1} s",
        t0.elapsed().as_secs_f64()
    );
    let ids: HashSet<&str> = containers.0.iter().map(|(_, id)| id.as_str()).collect();
    f.wait_n(Duration::from_secs(120), n, |r| {
        r["kind"] == "container_start"
            && r["container"]["id"]
                .as_str()
                .is_some_and(|id| ids.contains(id))
    })?;
    // Every container's last first-instruction path.
    f.wait_n(Duration::from_secs(120), n, |r| {
        r["kind"] == "create"
            && r["path"] == "/dir99/last"
            && r["container"]["id"]
                .as_str()
                .is_some_and(|id| ids.contains(id))
    })?;
    f.settle(Duration::from_secs(2));
    let mut missing = Vec::new();
    for id in &ids {
        let seen = created_paths(&f, id);
        for p in first_paths() {
            if !seen.contains_key(p.as_str()) {
                missing.push(format!("{}:{p}", &id[..12]));
            }
        }
    }
    assert!(
        missing.is_empty(),
        "{} of {} first-instruction paths missing: {:?}",
        missing.len(),
        n * first_paths().len(),
        &missing[..missing.len().min(20)]
    );
    let max_fds = sampler.max();
    let now_fds = fd_count(pid);
    eprintln!("{n} containers armed; fsmon fds: max {max_fds}, now {now_fds} (limit {LIMIT})");
    assert!(
        max_fds < LIMIT as usize,
        "fsmon held {max_fds} fds, at or over its limit {LIMIT}"
    );
    for reason in ["arm_failed", "fd_limit"] {
        let o = overflows_of(&f, reason);
        assert!(o.is_empty(), "descriptors ran out: {o:#?}");
    }
    drop(sampler);
    remove_all(&containers.0);
    f.wait_n(Duration::from_secs(120), n, |r| {
        r["kind"] == "container_stop"
            && r["container"]["id"]
                .as_str()
                .is_some_and(|id| ids.contains(id))
    })?;
    stop_clean(f)
}

/// No descriptor left at all: containers that start then cannot be armed get an
/// `overflow` (`arm_failed`) naming them, are not left frozen, run on; once the limit
/// allows, they are armed and what they did meanwhile is reported by scan.
#[test]
fn containers_that_cannot_be_armed_are_reported_and_armed_later() -> anyhow::Result<()> {
    let mut f = Fsmon::start(&hosts(), &[])?;
    let pid = f.pid();
    let (soft, hard) = nofile_of(pid)?;
    // Not one more descriptor for fsmon from now on (an absurdly low limit).
    let open = fd_count(pid) as u64;
    set_nofile(pid, open, hard)?;
    let containers = Cleanup(start_many("nofd", 2, 2)?);
    let result = (|| {
        for (host, id) in &containers.0 {
            let o = f.wait_for(Duration::from_secs(20), |r| {
                r["kind"] == "overflow"
                    && r["reason"] == "arm_failed"
                    && r["container"]["id"] == id.as_str()
            })?;
            eprintln!("{host}: {o}");
            assert!(
                !f.records
                    .iter()
                    .any(|r| r["kind"] == "container_start" && r["container"]["id"] == id.as_str()),
                "armed although no descriptor was left"
            );
        }
        // They run on, not frozen, while fsmon cannot arm them.
        std::thread::sleep(Duration::from_secs(1));
        for (host, id) in &containers.0 {
            let running = docker(host, &["inspect", "-f", "{{.State.Running}}", id])?;
            assert_eq!(running, "true", "{id} is not running");
        }
        assert!(
            frozen_cgroups().is_empty(),
            "left frozen: {:?}",
            frozen_cgroups()
        );
        anyhow::Ok(())
    })();
    // Whatever happened, give fsmon its descriptors back.
    set_nofile(pid, soft, hard)?;
    result?;
    for (_, id) in &containers.0 {
        f.wait_for(Duration::from_secs(20), |r| {
            r["kind"] == "container_start" && r["container"]["id"] == id.as_str()
        })?;
        f.wait_for(Duration::from_secs(20), |r| {
            r["kind"] == "create"
                && r["path"] == "/dir99/last"
                && r["container"]["id"] == id.as_str()
        })?;
    }
    f.settle(Duration::from_secs(1));
    for (_, id) in &containers.0 {
        let recs: Vec<&Value> = f.of(id);
        assert_eq!(
            recs.first().map(|r| r["kind"].clone()),
            Some("overflow".into())
        );
        let seen = created_paths(&f, id);
        for p in first_paths() {
            assert_eq!(
                seen.get(p.as_str()).copied(),
                Some("scan"),
                "{id}: {p} must be reported by scan once armed: {recs:#?}"
            );
        }
    }
    remove_all(&containers.0);
    stop_clean(f)
}
