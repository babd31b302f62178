//! containerd (ctr, nerdctl, and Kubernetes through its CRI plugin): bundles at
//! `<state>/io.containerd.runtime.v2.task/<namespace>/<id>` (shim v2, containerd 1.2+),
//! rootfs `rootfs` inside the bundle, names from the bundle's CRI or nerdctl annotations.
//! ctr containers have no name; their image is known only to containerd's metadata
//! database, which fsmon does not open (it is locked by containerd), so it is null.

use std::path::{Path, PathBuf};

use super::{existing, OnDisk, Places};
use crate::{
    cgroup::{is_containerd_namespace, ContainerCgroup},
    id::RuntimeName,
};

/// The shim v2 task directory below a containerd state directory.
pub const TASK_DIR: &str = "io.containerd.runtime.v2.task";

/// containerd's on-disk layout.
pub struct Containerd<'a> {
    /// Where containerd keeps its state.
    pub places: &'a Places,
}

/// The bundle directories of container `id` under `state`: in `namespace` when the cgroup
/// name says it, else in every namespace that has one.
pub fn bundles_in(state: &Path, namespace: Option<&str>, id: &str) -> Vec<PathBuf> {
    let tasks = state.join(TASK_DIR);
    match namespace {
        Some(ns) if is_containerd_namespace(ns) => {
            existing(tasks.join(ns).join(id)).into_iter().collect()
        }
        Some(_) => Vec::new(),
        None => std::fs::read_dir(&tasks)
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter(|e| e.file_name().to_str().is_some_and(is_containerd_namespace))
            .filter_map(|e| existing(e.path().join(id)))
            .collect(),
    }
}

impl OnDisk for Containerd<'_> {
    fn name(&self) -> RuntimeName {
        RuntimeName::Containerd
    }

    fn bundle_dirs(&self, cg: &ContainerCgroup) -> Vec<PathBuf> {
        self.places
            .containerd_states
            .iter()
            .flat_map(|s| bundles_in(s, cg.namespace.as_deref(), cg.id.as_str()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{cgroup::parse_container_cgroup, runtimes::AnyRuntime};

    const ID: &str = "1a626b1970e1229505034b871f49ff8aae231c0f03c096814e2a1e0a5ff212a2";

    #[test]
    fn finds_bundles_by_namespace() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let state = tmp.path();
        for ns in ["default", "k8s.io"] {
            std::fs::create_dir_all(state.join(TASK_DIR).join(ns).join(ID)).expect("mkdir");
        }
        let places = Places {
            containerd_states: vec![state.to_owned()],
            ..Places::default()
        };
        let rt = Containerd { places: &places };
        let cg = parse_container_cgroup(&format!("/default/{ID}")).expect("cgroup");
        assert_eq!(
            rt.bundle_dirs(&cg),
            vec![state.join(TASK_DIR).join("default").join(ID)]
        );
        let cg =
            parse_container_cgroup(&format!("/kubepods/besteffort/pod1/{ID}")).expect("cgroup");
        assert_eq!(
            rt.bundle_dirs(&cg),
            vec![state.join(TASK_DIR).join("k8s.io").join(ID)]
        );
        // nerdctl's systemd scope does not say the namespace: every one is looked in.
        let cg =
            parse_container_cgroup(&format!("/system.slice/nerdctl-{ID}.scope")).expect("cgroup");
        assert_eq!(rt.bundle_dirs(&cg).len(), 2);
        let cg = parse_container_cgroup(&format!("/other/{ID}")).expect("cgroup");
        assert!(rt.bundle_dirs(&cg).is_empty());
        // A bundle whose rootfs is not mounted is an error, not a guess.
        std::fs::write(
            state
                .join(TASK_DIR)
                .join("default")
                .join(ID)
                .join("config.json"),
            br#"{"root":{"path":"rootfs"}}"#,
        )
        .expect("write");
        std::fs::create_dir_all(state.join(TASK_DIR).join("default").join(ID).join("rootfs"))
            .expect("mkdir");
        let cg = parse_container_cgroup(&format!("/default/{ID}")).expect("cgroup");
        let err = AnyRuntime::for_kind(&places, cg.runtime)
            .resolve(&cg)
            .expect_err("not mounted");
        assert!(err.to_string().contains("nothing is mounted"), "{err}");
    }
}
