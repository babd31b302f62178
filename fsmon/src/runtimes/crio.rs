//! CRI-O: bundles at `<runroot>/overlay-containers/<id>/userdata` (containers/storage run
//! root, `/run/containers/storage` by default), `root.path` absolute (the layer's
//! `merged`), Kubernetes identity from the bundle's `io.kubernetes.cri-o.*` and
//! `io.kubernetes.pod.*` annotations; the layer store (shared with podman) as fallback.
//! Not available on the project's test machine: covered by fixtures only.

use std::path::PathBuf;

use super::{podman, OnDisk, Places};
use crate::{
    cgroup::ContainerCgroup,
    id::{ContainerId, RuntimeName},
    watcher::ContainerLayer,
};

/// CRI-O's on-disk layout.
pub struct CriO<'a> {
    /// Where CRI-O keeps its state.
    pub places: &'a Places,
}

impl OnDisk for CriO<'_> {
    fn name(&self) -> RuntimeName {
        RuntimeName::CriO
    }

    fn bundle_dirs(&self, cg: &ContainerCgroup) -> Vec<PathBuf> {
        podman::userdata_bundle(&self.places.containers_runroot, &cg.id)
    }

    fn layer_store(&self, id: &ContainerId) -> Option<ContainerLayer> {
        podman::storage_layer(&self.places.containers_storage, id)
    }
}
