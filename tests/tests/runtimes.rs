//! Tier 3 beyond Docker: the real `fsmon` binary against a system containerd (`ctr`, 64-hex
//! ids, and Kubernetes-style pods through its CRI plugin) and rootful podman, real
//! containers. Run with `cargo xtask test` (it starts the test containerd on its own
//! socket with its CRI plugin and a sandbox image, configures podman, imports the test
//! image into both and sets the environment).

mod cri;

use std::time::Duration;

use fsmon_tests::{assert_bracketed, ctr, env, podman, podman_run, random_id, Fsmon};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(30);

/// What every container does first: the lossless-start paths, and a file made and deleted
/// at once.
const FIRST: &str =
    "touch /f0; mkdir -p /a/b/c; touch /a/b/c/f1; echo x > /a/b/c/f2; touch /gone; rm /gone";
/// What each runtime makes in the layer while setting a container up (not reported).
const PODMAN_SETUP: &[&str] = &[
    "/etc/hosts",
    "/etc/hostname",
    "/run",
    "/run/.containerenv",
    "/proc",
    "/dev",
    "/sys",
];
const CRI_SETUP: &[&str] = &[
    "/proc",
    "/dev",
    "/sys",
    "/run",
    "/etc/hosts",
    "/etc/hostname",
    "/etc/resolv.conf",
    "/dev/shm",
];

const FIRST_PATHS: [&str; 7] = [
    "/f0",
    "/a",
    "/a/b",
    "/a/b/c",
    "/a/b/c/f1",
    "/a/b/c/f2",
    "/gone",
];

fn fsmon() -> anyhow::Result<Fsmon> {
    // One Docker engine too, so that its records keep their place beside the others.
    Fsmon::start(
        &[env("FSMON_DOCKER_V1")],
        &["--containerd-state", &env("FSMON_CONTAINERD_STATE")],
    )
}

fn is(kind: &'static str, id: String) -> impl Fn(&Value) -> bool {
    move |r| r["kind"] == kind && r["container"]["id"] == id.as_str()
}

/// Every first-instruction path created, `/gone` deleted, nothing of the runtime's own
/// setup (`setup`: mount points it made in the layer) reported, start first, stop last.
fn check_first(f: &mut Fsmon, id: &str, what: &str, setup: &[&str]) {
    f.settle(Duration::from_millis(800));
    let recs = f.of(id);
    assert_bracketed(&recs, &format!("{what}: {recs:#?}"));
    for p in FIRST_PATHS {
        assert!(
            recs.iter().any(|r| r["kind"] == "create" && r["path"] == p),
            "{what}: no create of {p}: {recs:#?}"
        );
    }
    assert!(
        recs.iter()
            .any(|r| r["kind"] == "delete" && r["path"] == "/gone"),
        "{what}: no delete of /gone: {recs:#?}"
    );
    for p in setup {
        assert!(
            !recs.iter().any(|r| r["path"] == *p),
            "{what}: the runtime's setup of {p} reported as the container's: {recs:#?}"
        );
    }
}

#[test]
fn ctr_containers_are_reported_from_their_first_instruction() -> anyhow::Result<()> {
    let image = env("FSMON_CTR_IMAGE");
    let mut f = fsmon()?;
    for round in 0..5 {
        let id = random_id();
        ctr(
            "default",
            &[
                "run",
                "--rm",
                "--label",
                "fsmon-test=1",
                &image,
                &id,
                "sh",
                "-c",
                FIRST,
            ],
        )?;
        let start = f.wait_for(WAIT, is("container_start", id.clone()))?;
        f.wait_for(WAIT, is("container_stop", id.clone()))?;
        let c = &start["container"];
        assert_eq!(c["runtime"], "containerd", "{start}");
        assert_eq!(
            c["name"],
            Value::Null,
            "ctr containers have no name: {start}"
        );
        assert!(
            c.get("pod").is_none(),
            "not a Kubernetes container: {start}"
        );
        assert!(
            start["upperdir"]
                .as_str()
                .is_some_and(|u| u.contains("io.containerd.snapshotter.v1.overlayfs/snapshots/")),
            "{start}"
        );
        check_first(
            &mut f,
            &id,
            &format!("ctr round {round}"),
            &["/proc", "/dev", "/sys", "/run"],
        );
    }
    let (code, _) = f.stop()?;
    assert_eq!(code, 0);
    Ok(())
}

#[test]
fn podman_containers_are_reported_from_their_first_instruction() -> anyhow::Result<()> {
    let image = env("FSMON_PODMAN_IMAGE");
    let mut f = fsmon()?;
    for round in 0..5 {
        let name = format!("fsmon-podman-{}-{round}", std::process::id());
        podman_run("--rm", &name, &["sh", "-c", FIRST])?;
        let id = f.wait_start_stop(WAIT, &name)?;
        let start = f.wait_for(WAIT, is("container_start", id.clone()))?;
        let c = &start["container"];
        assert_eq!(c["runtime"], "podman", "{start}");
        assert_eq!(c["image"], image.as_str(), "{start}");
        assert!(c.get("pod").is_none(), "{start}");
        check_first(&mut f, &id, &format!("podman round {round}"), PODMAN_SETUP);
    }
    let (code, _) = f.stop()?;
    assert_eq!(code, 0);
    Ok(())
}

#[test]
fn running_ctr_and_podman_containers_are_armed_before_ready() -> anyhow::Result<()> {
    let ctr_id = random_id();
    ctr(
        "default",
        &[
            "run",
            "-d",
            "--label",
            "fsmon-test=1",
            &env("FSMON_CTR_IMAGE"),
            &ctr_id,
            "sleep",
            "1000",
        ],
    )?;
    let name = format!("fsmon-podman-running-{}", std::process::id());
    let podman_id = podman_run("-d", &name, &["sleep", "1000"])?;
    let result = (|| -> anyhow::Result<()> {
        let mut f = fsmon()?;
        let ready_at = f
            .records
            .iter()
            .position(|r| r["kind"] == "ready")
            .unwrap_or(usize::MAX);
        for (id, runtime) in [(&ctr_id, "containerd"), (&podman_id, "podman")] {
            let at = f.records.iter().position(|r| {
                r["kind"] == "container_start" && r["container"]["id"] == id.as_str()
            });
            assert!(
                at.is_some_and(|a| a < ready_at),
                "{runtime}: container_start before ready: {:#?}",
                f.records
            );
            let start = &f.records[at.unwrap_or(0)];
            assert_eq!(start["container"]["runtime"], runtime, "{start}");
            assert_eq!(
                start["freeze_us"],
                Value::Null,
                "already running: not frozen"
            );
        }
        let podman_start = f.wait_for(WAIT, is("container_start", podman_id.clone()))?;
        assert_eq!(podman_start["container"]["name"], name.as_str());
        // Monitoring is live: a change now is reported, and the end ends it.
        podman(&["exec", &name, "touch", "/late"])?;
        f.wait_for(WAIT, |r| {
            r["kind"] == "create"
                && r["path"] == "/late"
                && r["container"]["id"] == podman_id.as_str()
        })?;
        ctr("default", &["tasks", "kill", "-s", "SIGKILL", &ctr_id])?;
        podman(&["rm", "-f", "-t", "0", &name])?;
        f.wait_for(WAIT, is("container_stop", ctr_id.clone()))?;
        f.wait_for(WAIT, is("container_stop", podman_id.clone()))?;
        let (code, _) = f.stop()?;
        assert_eq!(code, 0);
        Ok(())
    })();
    let _ = ctr("default", &["tasks", "kill", "-s", "SIGKILL", &ctr_id]);
    std::thread::sleep(Duration::from_millis(300));
    let _ = ctr("default", &["tasks", "delete", "-f", &ctr_id]);
    let _ = ctr("default", &["containers", "delete", &ctr_id]);
    let _ = podman(&["rm", "-f", "-t", "0", &name]);
    result
}

/// A CRI client on the test containerd, with the test pods of an earlier (killed) run
/// removed.
fn cri_client() -> anyhow::Result<cri::Cri> {
    let mut c = cri::Cri::connect(&env("FSMON_CONTAINERD_SOCK"))?;
    c.remove_leftovers()?;
    Ok(c)
}

/// The Kubernetes namespace of the test pods.
const POD_NAMESPACE: &str = "fsmon-test";

/// A CRI container's `container_start`: runtime, name, image and pod as the CRI plugin's
/// annotations say.
fn check_cri_start(start: &Value, name: &str, pod: &cri::Pod) {
    let c = &start["container"];
    assert_eq!(c["runtime"], "containerd", "{start}");
    assert_eq!(c["name"], name, "{start}");
    assert_eq!(c["image"], env("FSMON_CTR_IMAGE").as_str(), "{start}");
    assert_eq!(c["pod"]["name"], pod.name.as_str(), "{start}");
    assert_eq!(c["pod"]["namespace"], pod.namespace.as_str(), "{start}");
    assert_eq!(c["pod"]["uid"], pod.uid.as_str(), "{start}");
    assert!(
        start["upperdir"]
            .as_str()
            .is_some_and(|u| u.contains("io.containerd.snapshotter.v1.overlayfs/snapshots/")),
        "{start}"
    );
}

/// The pod's sandbox (pause) container is never monitored: no record names it.
fn assert_sandbox_ignored(f: &Fsmon, pod: &cri::Pod) {
    let recs = f.of(&pod.id);
    assert!(
        recs.is_empty(),
        "pod {}: its sandbox container was reported: {recs:#?}",
        pod.name
    );
}

#[test]
fn cri_pod_containers_are_reported_from_their_first_instruction() -> anyhow::Result<()> {
    let image = env("FSMON_CTR_IMAGE");
    let mut cri = cri_client()?;
    let mut f = fsmon()?;
    for round in 0..5 {
        let pod = cri.run_pod(
            POD_NAMESPACE,
            &format!("fsmon-pod-{}-{round}", std::process::id()),
        )?;
        let name = format!("first-{round}");
        let result = (|| -> anyhow::Result<()> {
            let id = cri.run_container(&pod, &name, &image, &["sh", "-c", FIRST])?;
            assert_eq!(cri.wait_exited(&id, WAIT)?, 0, "{name}: exit code");
            let start = f.wait_for(WAIT, is("container_start", id.clone()))?;
            f.wait_for(WAIT, is("container_stop", id.clone()))?;
            check_cri_start(&start, &name, &pod);
            check_first(&mut f, &id, &format!("CRI round {round}"), CRI_SETUP);
            cri.stop_remove_container(&id, 0)?;
            Ok(())
        })();
        let removed = cri.remove_pod(&pod.id, Some(&pod.uid));
        result?;
        removed?;
        f.settle(Duration::from_millis(300));
        assert_sandbox_ignored(&f, &pod);
    }
    // A pod container that keeps running: armed, then running on, not frozen.
    let pod = cri.run_pod(
        POD_NAMESPACE,
        &format!("fsmon-pod-{}-long", std::process::id()),
    )?;
    let result = (|| -> anyhow::Result<()> {
        let id = cri.run_container(&pod, "long", &image, &["sleep", "1000"])?;
        let start = f.wait_for(WAIT, is("container_start", id.clone()))?;
        check_cri_start(&start, "long", &pod);
        std::thread::sleep(Duration::from_millis(200));
        let frozen = cri::frozen_pod_cgroups();
        assert!(frozen.is_empty(), "left frozen: {frozen:?}");
        cri.exec(&id, &["touch", "/alive"])?;
        f.wait_for(WAIT, |r| {
            r["kind"] == "create" && r["path"] == "/alive" && r["container"]["id"] == id.as_str()
        })?;
        cri.stop_remove_container(&id, 0)?;
        f.wait_for(WAIT, is("container_stop", id.clone()))?;
        Ok(())
    })();
    let removed = cri.remove_pod(&pod.id, Some(&pod.uid));
    result?;
    removed?;
    f.settle(Duration::from_millis(300));
    assert_sandbox_ignored(&f, &pod);
    let frozen = cri::frozen_pod_cgroups();
    assert!(frozen.is_empty(), "left frozen: {frozen:?}");
    let (code, _) = f.stop()?;
    assert_eq!(code, 0);
    Ok(())
}

#[test]
fn running_cri_pod_containers_are_armed_before_ready() -> anyhow::Result<()> {
    let mut cri = cri_client()?;
    let pod = cri.run_pod(
        POD_NAMESPACE,
        &format!("fsmon-pod-running-{}", std::process::id()),
    )?;
    let result = (|| -> anyhow::Result<()> {
        let id = cri.run_container(&pod, "sleeper", &env("FSMON_CTR_IMAGE"), &["sleep", "1000"])?;
        let mut f = fsmon()?;
        let ready_at = f
            .records
            .iter()
            .position(|r| r["kind"] == "ready")
            .unwrap_or(usize::MAX);
        let at = f
            .records
            .iter()
            .position(|r| r["kind"] == "container_start" && r["container"]["id"] == id.as_str());
        assert!(
            at.is_some_and(|a| a < ready_at),
            "CRI: container_start before ready: {:#?}",
            f.records
        );
        let start = f.records[at.unwrap_or(0)].clone();
        check_cri_start(&start, "sleeper", &pod);
        assert_eq!(
            start["freeze_us"],
            Value::Null,
            "already running: not frozen"
        );
        assert_sandbox_ignored(&f, &pod);
        let frozen = cri::frozen_pod_cgroups();
        assert!(frozen.is_empty(), "frozen: {frozen:?}");
        // Monitoring is live: a change now is reported, and the end ends it.
        cri.exec(&id, &["touch", "/late"])?;
        f.wait_for(WAIT, |r| {
            r["kind"] == "create" && r["path"] == "/late" && r["container"]["id"] == id.as_str()
        })?;
        cri.stop_remove_container(&id, 0)?;
        f.wait_for(WAIT, is("container_stop", id.clone()))?;
        let (code, records) = f.stop()?;
        assert_eq!(code, 0);
        assert!(
            !records
                .iter()
                .any(|r| r["container"]["id"] == pod.id.as_str()),
            "the sandbox container was reported: {records:#?}"
        );
        Ok(())
    })();
    let removed = cri.remove_pod(&pod.id, Some(&pod.uid));
    result?;
    removed
}

/// Sends `sig` to fsmon (a process this test started).
fn signal(pid: u32, sig: i32) {
    // SAFETY: kill(2) on the fsmon this test started.
    unsafe { libc::kill(pid as i32, sig) };
}

/// The container's first paths (and the delete of `/gone`) came live, and its start was
/// held by the exec gate (`gated_us`).
fn check_gated(f: &mut Fsmon, id: &str, what: &str, setup: &[&str]) {
    check_first(f, id, what, setup);
    let recs = f.of(id);
    // Live: from the watch, not from a late arm's scan (the contents of a directory made
    // before its own watch are found by its scan, as always).
    for (kind, p) in [
        ("create", "/f0"),
        ("create", "/a"),
        ("create", "/gone"),
        ("delete", "/gone"),
    ] {
        assert!(
            recs.iter()
                .any(|r| r["kind"] == kind && r["path"] == p && r["source"] == "inotify"),
            "{what}: {kind} {p} not seen live: {recs:#?}"
        );
    }
    let start = recs.first().copied().cloned().unwrap_or_default();
    assert!(
        start["gated_us"].as_u64().is_some(),
        "{what}: the gate held nothing: {start}"
    );
}

#[test]
fn exec_gate_holds_ctr_and_podman_starts_while_fsmon_is_stopped() -> anyhow::Result<()> {
    let mut f = fsmon()?;
    let pid = f.pid();
    // ctr: fsmon stopped while the container starts, resumed a second later.
    let id = random_id();
    signal(pid, libc::SIGSTOP);
    let ctr_run = {
        let (image, id) = (env("FSMON_CTR_IMAGE"), id.clone());
        std::thread::spawn(move || {
            ctr(
                "default",
                &[
                    "run",
                    "--rm",
                    "--label",
                    "fsmon-test=1",
                    &image,
                    &id,
                    "sh",
                    "-c",
                    FIRST,
                ],
            )
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    signal(pid, libc::SIGCONT);
    ctr_run
        .join()
        .map_err(|_| anyhow::anyhow!("ctr thread panicked"))??;
    f.wait_for(WAIT, is("container_stop", id.clone()))?;
    check_gated(
        &mut f,
        &id,
        "ctr, fsmon stopped",
        &["/proc", "/dev", "/sys", "/run"],
    );
    // podman, the same way.
    let name = format!("fsmon-podman-gate-{}", std::process::id());
    signal(pid, libc::SIGSTOP);
    let podman = {
        let name = name.clone();
        std::thread::spawn(move || podman_run("--rm", &name, &["sh", "-c", FIRST]))
    };
    std::thread::sleep(Duration::from_secs(1));
    signal(pid, libc::SIGCONT);
    podman
        .join()
        .map_err(|_| anyhow::anyhow!("podman thread panicked"))??;
    let id = f.wait_start_stop(WAIT, &name)?;
    check_gated(&mut f, &id, "podman, fsmon stopped", &PODMAN_SETUP[..5]);
    let (code, _) = f.stop()?;
    assert_eq!(code, 0);
    Ok(())
}

#[test]
fn exec_gate_holds_a_cri_pod_container_while_fsmon_is_stopped() -> anyhow::Result<()> {
    let image = env("FSMON_CTR_IMAGE");
    let mut cri = cri_client()?;
    let mut f = fsmon()?;
    let pid = f.pid();
    let pod = cri.run_pod(
        POD_NAMESPACE,
        &format!("fsmon-pod-{}-gate", std::process::id()),
    )?;
    let result = (|| -> anyhow::Result<()> {
        signal(pid, libc::SIGSTOP);
        // The runtime reports the start once runc started it: a gated PID 1 counts as running.
        let started = cri.run_container(&pod, "gated", &image, &["sh", "-c", FIRST]);
        std::thread::sleep(Duration::from_secs(1));
        signal(pid, libc::SIGCONT);
        let id = started?;
        assert_eq!(cri.wait_exited(&id, WAIT)?, 0, "exit code");
        f.wait_for(WAIT, is("container_stop", id.clone()))?;
        check_gated(&mut f, &id, "CRI pod container, fsmon stopped", CRI_SETUP);
        cri.stop_remove_container(&id, 0)?;
        Ok(())
    })();
    // Whatever happened, fsmon runs again.
    signal(pid, libc::SIGCONT);
    let removed = cri.remove_pod(&pod.id, Some(&pod.uid));
    result?;
    removed?;
    let (code, _) = f.stop()?;
    assert_eq!(code, 0);
    Ok(())
}
