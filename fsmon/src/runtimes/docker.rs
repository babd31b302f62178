//! Docker's OCI bundles, for containers whose layer is not in overlay2's `layerdb`: the
//! containerd image store (Docker Engine 29+: rootfs `<docker-root>/rootfs/overlayfs/<id>`,
//! bundle under Docker's containerd, namespace `moby`) and Docker running on a system
//! containerd. Names and images come from the Docker API (`crate::runtime`).

use std::path::PathBuf;

use super::{containerd, OnDisk, Places};
use crate::{cgroup::ContainerCgroup, id::RuntimeName};

/// The containerd namespace Docker puts its containers in.
pub const MOBY_NAMESPACE: &str = "moby";

/// Docker's bundles.
pub struct DockerBundles<'a> {
    /// Where Docker's containerd keeps its state.
    pub places: &'a Places,
}

impl OnDisk for DockerBundles<'_> {
    fn name(&self) -> RuntimeName {
        RuntimeName::Docker
    }

    fn bundle_dirs(&self, cg: &ContainerCgroup) -> Vec<PathBuf> {
        self.places
            .docker_containerd_states
            .iter()
            .chain(&self.places.containerd_states)
            .flat_map(|s| containerd::bundles_in(s, Some(MOBY_NAMESPACE), cg.id.as_str()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::runtimes::oci;

    /// A Docker 29 (containerd image store) bundle, written after moby's
    /// `daemon/containerd` spec: `root.path` is the snapshot mount under the data root.
    #[test]
    fn containerd_store_bundle() {
        let bundle =
            Path::new("/run/docker/containerd/daemon/io.containerd.runtime.v2.task/moby/x");
        let json = br#"{"ociVersion":"1.2.0","root":{"path":"/var/lib/docker/rootfs/overlayfs/9c1f2e3d4c5b6a79887766554433221100ffeeddccbbaa998877665544332211"},
            "mounts":[{"destination":"/proc"},{"destination":"/etc/resolv.conf"},{"destination":"/etc/hostname"},{"destination":"/etc/hosts"}],
            "annotations":{"org.opencontainers.image.stopSignal":"15"}}"#;
        let b = oci::parse_config(bundle, json).expect("config");
        assert_eq!(
            b.rootfs,
            Path::new("/var/lib/docker/rootfs/overlayfs/9c1f2e3d4c5b6a79887766554433221100ffeeddccbbaa998877665544332211")
        );
        assert_eq!(
            oci::identity_from_annotations(&b.annotations),
            oci::Identity::default()
        );
        assert!(oci::SetupPaths::from_destinations(
            b.mount_destinations.iter().map(String::as_str)
        )
        .contains(b"/etc/resolv.conf"));
    }
}
