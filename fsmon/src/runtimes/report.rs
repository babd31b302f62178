//! `fsmon resolve`: where a container's layer is found and what that costs, per runtime
//! and per method (statmount, mountinfo, the runtime's layer store). For operators ("what
//! does fsmon see for this container?") and for `cargo xtask bench`. Uses the same code as
//! the daemon's arming path (statx/statmount: Linux 6.8+; mountinfo otherwise).

use std::{
    path::Path,
    time::{Duration, Instant},
};

use serde_json::{json, Value};

use super::{mount, oci, AnyRuntime, Places};
use crate::{cgroup::parse_container_cgroup, id::RuntimeName};

/// Median and minimum of `repeat` runs of `f`, in µs; `None` if it failed.
fn timed<T>(repeat: u32, mut f: impl FnMut() -> Option<T>) -> Option<(f64, f64)> {
    let mut samples: Vec<Duration> = Vec::with_capacity(repeat as usize);
    for _ in 0..repeat {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed());
    }
    samples.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    Some((us(samples[samples.len() / 2]), us(samples[0])))
}

/// One JSON object describing how container cgroup `cgroup` resolves: its runtime, the
/// method the daemon uses, the upperdir, and the cost of each method that applies.
pub fn resolve_line(cgroup: &str, places: &Places, docker_root: &Path, repeat: u32) -> Value {
    let Some(cg) = parse_container_cgroup(cgroup) else {
        return json!({ "cgroup": cgroup, "error": "not a container cgroup fsmon knows" });
    };
    let rt = AnyRuntime::for_kind(places, cg.runtime);
    let mut costs = serde_json::Map::new();
    let mut out =
        json!({ "cgroup": cgroup, "id": cg.id.as_str(), "runtime": cg.runtime.runtime().as_str() });
    if cg.runtime.runtime() == RuntimeName::Docker {
        if let Some(layer) = crate::runtime::overlay2_layer(docker_root, cg.id.as_str())
            .ok()
            .flatten()
        {
            out["how"] = json!("overlay2-layerdb");
            out["upperdir"] = json!(layer.upperdir.to_string_lossy());
            if let Some((med, min)) = timed(repeat, || {
                crate::runtime::overlay2_layer(docker_root, cg.id.as_str())
                    .ok()
                    .flatten()
            }) {
                costs.insert(
                    "overlay2-layerdb".into(),
                    json!({ "median_us": med, "min_us": min }),
                );
            }
        }
    }
    match rt.resolve(&cg) {
        Ok(r) => {
            if out.get("how").is_none() {
                out["how"] = json!(r.how.as_str());
                out["upperdir"] = json!(r.layer.upperdir.to_string_lossy());
            }
            out["lowerdirs"] = json!(r.layer.lowerdirs.len());
            if let Some(b) = &r.bundle {
                let rootfs = b.rootfs.clone();
                let dir = rt.bundle_dirs(&cg).into_iter().next();
                if let Some((med, min)) = timed(repeat, || oci::read_bundle(dir.as_deref()?).ok()) {
                    costs.insert(
                        "bundle-config.json".into(),
                        json!({ "median_us": med, "min_us": min }),
                    );
                }
                if let Some((med, min)) = timed(repeat, || mount::overlay_at(&rootfs).ok()) {
                    let method = mount::overlay_at(&rootfs)
                        .map(|(_, m)| m.as_str())
                        .unwrap_or("?");
                    costs.insert(method.into(), json!({ "median_us": med, "min_us": min }));
                }
                if let Some((med, min)) =
                    timed(repeat, || mount::overlay_via_mountinfo(&rootfs).ok())
                {
                    costs.insert(
                        "mountinfo".into(),
                        json!({ "median_us": med, "min_us": min }),
                    );
                }
            }
            if let Some((med, min)) = timed(repeat, || rt.resolve(&cg).ok()) {
                costs.insert("total".into(), json!({ "median_us": med, "min_us": min }));
            }
        }
        Err(e) if out.get("how").is_none() => {
            out["error"] = json!(e.to_string());
        }
        Err(_) => {}
    }
    out["cost"] = Value::Object(costs);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_and_missing_containers_say_why() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let places = Places {
            containerd_states: vec![tmp.path().to_owned()],
            docker_containerd_states: vec![tmp.path().to_owned()],
            containers_storage: tmp.path().to_owned(),
            containers_runroot: tmp.path().to_owned(),
        };
        let v = resolve_line("/system.slice/cron.service", &places, tmp.path(), 1);
        assert_eq!(v["error"], "not a container cgroup fsmon knows");
        let id = "ab".repeat(32);
        let v = resolve_line(
            &format!("/libpod_parent/libpod-{id}"),
            &places,
            tmp.path(),
            3,
        );
        assert_eq!(v["runtime"], "podman");
        assert_eq!(v["id"], id.as_str());
        assert_eq!(v["error"], "no podman bundle for this container");
        let v = resolve_line(&format!("/docker/{id}"), &places, tmp.path(), 3);
        assert_eq!(v["runtime"], "docker");
        assert_eq!(v["error"], "no docker bundle for this container");
    }
}
