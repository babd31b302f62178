//! On-disk knowledge of every container runtime fsmon supports: where each keeps a
//! container's OCI bundle, how its rootfs mount gives the container's upperdir, and who the
//! container is (name, image, Kubernetes pod) — without asking the runtime over the
//! network, so it is safe while a container is frozen or held at its first exec.
//!
//! One module per runtime behind the [`OnDisk`] trait and the [`AnyRuntime`] enum (the
//! shape of youki's `CgroupManager` / `AnyCgroupManager`): `containerd` (ctr, nerdctl,
//! Kubernetes CRI), `docker` (Docker's bundles under its containerd, for the containerd
//! image store), `podman`, `crio`. Resolution is the same for all: bundle `config.json`
//! → `root.path` → the overlay mounted there ([`mount`]: `statx` + `statmount` on Linux
//! 6.8+, mountinfo otherwise) → `upperdir=` and lower dirs, with each runtime's own layer
//! store as the fallback. Docker's overlay2 `layerdb` lookup stays in `crate::runtime`.

pub mod containerd;
pub mod crio;
pub mod docker;
pub mod mount;
pub mod oci;
pub mod podman;
pub mod report;

use std::path::{Path, PathBuf};

use crate::{
    cgroup::{ContainerCgroup, RuntimeKind},
    id::{ContainerId, RuntimeName},
    watcher::ContainerLayer,
};
pub use oci::{Bundle, Identity, Pod, SetupPaths};

/// Where the runtimes keep their state on this host (defaults: each runtime's own).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Places {
    /// containerd state directories (`--state`): bundles are
    /// `<state>/io.containerd.runtime.v2.task/<namespace>/<id>`.
    pub containerd_states: Vec<PathBuf>,
    /// The state directories of Docker's own (managed) containerd: bundles are
    /// `<state>/io.containerd.runtime.v2.task/moby/<id>`.
    pub docker_containerd_states: Vec<PathBuf>,
    /// containers/storage graph root of podman and CRI-O (`overlay-containers/<id>/userdata`
    /// holds podman's bundle, `overlay-containers/containers.json` the container list).
    pub containers_storage: PathBuf,
    /// containers/storage run root (CRI-O keeps its bundles under
    /// `overlay-containers/<id>/userdata` there).
    pub containers_runroot: PathBuf,
}

impl Default for Places {
    fn default() -> Self {
        Places {
            containerd_states: vec![PathBuf::from("/run/containerd")],
            docker_containerd_states: vec![PathBuf::from("/run/docker/containerd/daemon")],
            containers_storage: PathBuf::from("/var/lib/containers/storage"),
            containers_runroot: PathBuf::from("/run/containers/storage"),
        }
    }
}

/// How a container's layers were found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// Its bundle's rootfs mount (statmount or mountinfo).
    Mount(mount::Method),
    /// The runtime's own layer store (no mount needed).
    LayerStore,
}

impl How {
    /// Short name for logs and the bench.
    pub fn as_str(self) -> &'static str {
        match self {
            How::Mount(m) => m.as_str(),
            How::LayerStore => "layer-store",
        }
    }
}

/// A container found on disk.
#[derive(Clone, Debug)]
pub struct Resolved {
    /// The runtime that made it.
    pub runtime: RuntimeName,
    /// Its layers.
    pub layer: ContainerLayer,
    /// How they were found.
    pub how: How,
    /// Its bundle, when one was read.
    pub bundle: Option<Bundle>,
}

impl Resolved {
    /// Paths the runtime creates in the layer while setting the container up (see
    /// [`SetupPaths`]).
    pub fn setup_paths(&self) -> SetupPaths {
        self.bundle
            .as_ref()
            .map(|b| SetupPaths::from_destinations(b.mount_destinations.iter().map(String::as_str)))
            .unwrap_or_default()
    }
}

/// Why a container was not found on disk.
#[derive(Debug, thiserror::Error)]
pub enum ResolveError {
    /// No bundle directory of this runtime has the container.
    #[error("no {runtime} bundle for this container")]
    NoBundle {
        /// The runtime looked in.
        runtime: &'static str,
    },
    /// The bundle is unusable.
    #[error(transparent)]
    Bundle(#[from] oci::BundleError),
    /// The rootfs mount is unusable.
    #[error(transparent)]
    Mount(#[from] mount::MountError),
}

/// What each runtime module provides.
pub trait OnDisk {
    /// The runtime's name in records.
    fn name(&self) -> RuntimeName;
    /// Directories that may hold the container's bundle, most likely first (existing ones
    /// only).
    fn bundle_dirs(&self, cg: &ContainerCgroup) -> Vec<PathBuf>;
    /// The container's layers from the runtime's own layer store, when no bundle or mount
    /// gave them.
    fn layer_store(&self, _id: &ContainerId) -> Option<ContainerLayer> {
        None
    }
    /// Who the container is (name, image, pod). Reads small local files only.
    fn identity(&self, id: &ContainerId, bundle: Option<&Bundle>) -> Identity {
        let _ = id;
        bundle
            .map(|b| oci::identity_from_annotations(&b.annotations))
            .unwrap_or_default()
    }
}

/// One of the runtimes, chosen by a container's cgroup name.
pub enum AnyRuntime<'a> {
    /// containerd (ctr, nerdctl, CRI).
    Containerd(containerd::Containerd<'a>),
    /// Docker's bundles (containerd image store, or Docker on a system containerd).
    Docker(docker::DockerBundles<'a>),
    /// podman.
    Podman(podman::Podman<'a>),
    /// CRI-O.
    CriO(crio::CriO<'a>),
}

impl<'a> AnyRuntime<'a> {
    /// The runtime whose cgroups look like `kind`.
    pub fn for_kind(places: &'a Places, kind: RuntimeKind) -> AnyRuntime<'a> {
        match kind {
            RuntimeKind::DockerCgroupfs | RuntimeKind::DockerSystemd => {
                AnyRuntime::Docker(docker::DockerBundles { places })
            }
            RuntimeKind::Containerd | RuntimeKind::Cri => {
                AnyRuntime::Containerd(containerd::Containerd { places })
            }
            RuntimeKind::Podman => AnyRuntime::Podman(podman::Podman { places }),
            RuntimeKind::CriO => AnyRuntime::CriO(crio::CriO { places }),
        }
    }

    fn inner(&self) -> &dyn OnDisk {
        match self {
            AnyRuntime::Containerd(r) => r,
            AnyRuntime::Docker(r) => r,
            AnyRuntime::Podman(r) => r,
            AnyRuntime::CriO(r) => r,
        }
    }

    /// Finds the container's layers: bundle → rootfs mount → upperdir, else the layer store.
    pub fn resolve(&self, cg: &ContainerCgroup) -> Result<Resolved, ResolveError> {
        let rt = self.inner();
        let mut last = None;
        for dir in rt.bundle_dirs(cg) {
            match resolve_bundle(&dir) {
                Ok((bundle, layer, method)) => {
                    return Ok(Resolved {
                        runtime: rt.name(),
                        layer,
                        how: How::Mount(method),
                        bundle: Some(bundle),
                    })
                }
                Err(e) => last = Some(e),
            }
        }
        if let Some(layer) = rt.layer_store(&cg.id) {
            // The bundle (for setup paths and annotations) is still worth having.
            let bundle = rt
                .bundle_dirs(cg)
                .iter()
                .find_map(|d| oci::read_bundle(d).ok());
            return Ok(Resolved {
                runtime: rt.name(),
                layer,
                how: How::LayerStore,
                bundle,
            });
        }
        Err(last.unwrap_or(ResolveError::NoBundle {
            runtime: rt.name().as_str(),
        }))
    }

    /// The directories that may hold the container's bundle.
    pub fn bundle_dirs(&self, cg: &ContainerCgroup) -> Vec<PathBuf> {
        self.inner().bundle_dirs(cg)
    }

    /// Who the container is.
    pub fn identity(&self, id: &ContainerId, bundle: Option<&Bundle>) -> Identity {
        self.inner().identity(id, bundle)
    }
}

/// A bundle's layers: `config.json` → `root.path` → its overlay mount.
pub fn resolve_bundle(dir: &Path) -> Result<(Bundle, ContainerLayer, mount::Method), ResolveError> {
    let bundle = oci::read_bundle(dir)?;
    let (mut layer, method) = mount::overlay_at(&bundle.rootfs)?;
    resolve_layer_links(&mut layer.lowerdirs);
    Ok((bundle, layer, method))
}

/// containers/storage mounts its lower layers through short symlinks (`overlay/l/<id>`)
/// to keep the options short; the watcher opens layers without following symlinks, so
/// these runtime-made links are resolved here (they are the runtime's, never a
/// container's). A link that cannot be resolved is left as it is.
fn resolve_layer_links(lowerdirs: &mut [PathBuf]) {
    for dir in lowerdirs {
        if dir
            .symlink_metadata()
            .is_ok_and(|m| m.file_type().is_symlink())
        {
            if let Ok(real) = std::fs::canonicalize(&*dir) {
                *dir = real;
            }
        }
    }
}

/// `dir` if it is a directory.
fn existing(dir: PathBuf) -> Option<PathBuf> {
    dir.is_dir().then_some(dir)
}
