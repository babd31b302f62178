//! OCI runtime bundles: a container's `config.json` as every runc-based runtime writes it
//! (containerd, Docker's containerd, podman, CRI-O), and what fsmon takes from it:
//! the rootfs path (`root.path`, relative to the bundle or absolute), the mount
//! destinations (the stubs the runtime creates in the layer for them are its doing, not
//! the container's), and the annotations that name Kubernetes containers and pods.
//!
//! Pure parsing over bytes read with a size cap; no kernel feature involved. Everything in
//! a bundle is treated as hostile: sizes are capped, paths with `..` are refused, and
//! strings that go into records are length-capped.

use std::{
    collections::{BTreeMap, HashSet},
    io::Read as _,
    path::{Component, Path, PathBuf},
};

use serde::Deserialize;

/// A `config.json` larger than this is refused (real ones are a few KiB).
pub const MAX_CONFIG_LEN: u64 = 4 << 20;
/// Names, images and pod fields longer than this are dropped (reported as null).
pub const MAX_NAME_LEN: usize = 1024;

/// Why a bundle could not be used.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// No `config.json` (no such container in this runtime, or already gone).
    #[error("cannot read {path}")]
    Read {
        /// The `config.json` path.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Larger than [`MAX_CONFIG_LEN`].
    #[error("{path} is larger than {MAX_CONFIG_LEN} bytes")]
    TooLarge {
        /// The `config.json` path.
        path: PathBuf,
    },
    /// Not a JSON OCI config.
    #[error("{path} is not an OCI config")]
    Json {
        /// The `config.json` path.
        path: PathBuf,
        /// The parse error.
        #[source]
        source: serde_json::Error,
    },
    /// `root.path` missing, or not a path fsmon can trust.
    #[error("{path}: unusable root.path {root:?}")]
    Root {
        /// The `config.json` path.
        path: PathBuf,
        /// The value found.
        root: Option<String>,
    },
}

#[derive(Deserialize)]
struct RawConfig {
    root: Option<RawRoot>,
    #[serde(default)]
    mounts: Vec<RawMount>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct RawRoot {
    path: Option<String>,
}

#[derive(Deserialize)]
struct RawMount {
    destination: Option<String>,
}

/// What fsmon uses of a bundle's `config.json`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Bundle {
    /// The container's rootfs (its overlay mount point), absolute.
    pub rootfs: PathBuf,
    /// The mount destinations inside the container, normalised (`/proc`, `/etc/hosts`).
    pub mount_destinations: Vec<String>,
    /// The OCI annotations.
    pub annotations: BTreeMap<String, String>,
}

/// Reads `<bundle>/config.json`.
pub fn read_bundle(bundle: &Path) -> Result<Bundle, BundleError> {
    let path = bundle.join("config.json");
    let file = std::fs::File::open(&path).map_err(|source| BundleError::Read {
        path: path.clone(),
        source,
    })?;
    let mut bytes = Vec::new();
    file.take(MAX_CONFIG_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|source| BundleError::Read {
            path: path.clone(),
            source,
        })?;
    if bytes.len() as u64 > MAX_CONFIG_LEN {
        return Err(BundleError::TooLarge { path });
    }
    parse_config(bundle, &bytes)
}

/// Parses a bundle's `config.json` text (pure part of [`read_bundle`]).
pub fn parse_config(bundle: &Path, json: &[u8]) -> Result<Bundle, BundleError> {
    let path = bundle.join("config.json");
    let raw: RawConfig = serde_json::from_slice(json).map_err(|source| BundleError::Json {
        path: path.clone(),
        source,
    })?;
    let root = raw.root.and_then(|r| r.path);
    let rootfs = root
        .as_deref()
        .and_then(|r| rootfs_path(bundle, r))
        .ok_or_else(|| BundleError::Root {
            path: path.clone(),
            root: root.clone(),
        })?;
    Ok(Bundle {
        rootfs,
        mount_destinations: raw
            .mounts
            .into_iter()
            .filter_map(|m| normalise_container_path(&m.destination?))
            .collect(),
        annotations: raw.annotations,
    })
}

/// `root.path`: relative to the bundle (containerd: `rootfs`) or absolute (podman,
/// CRI-O). `..` anywhere, and NUL, are refused: the path must not walk out of where the
/// runtime said.
fn rootfs_path(bundle: &Path, root: &str) -> Option<PathBuf> {
    if root.is_empty() || root.contains('\0') {
        return None;
    }
    let p = Path::new(root);
    if p.components().any(|c| c == Component::ParentDir) {
        return None;
    }
    let full = if p.is_absolute() {
        p.to_path_buf()
    } else {
        bundle.join(p)
    };
    full.is_absolute().then_some(full)
}

/// A path inside the container, normalised to `/a/b` (no `.`, no doubled `/`); `None`
/// for relative paths, `..`, NUL and the root itself.
pub fn normalise_container_path(p: &str) -> Option<String> {
    if !p.starts_with('/') || p.contains('\0') {
        return None;
    }
    let mut out = String::new();
    for c in p.split('/').filter(|c| !c.is_empty() && *c != ".") {
        if c == ".." {
            return None;
        }
        out.push('/');
        out.push_str(c);
    }
    (!out.is_empty()).then_some(out)
}

/// Paths the runtime itself creates in the container's layer while it sets the container
/// up: every mount destination (runc makes a stub file or directory to mount on) and the
/// directories above it. None of them can be the container's own doing: a mount point
/// exists for the container's whole life and cannot be removed from inside (`EBUSY`), so
/// the container can never create one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetupPaths(HashSet<Vec<u8>>);

impl SetupPaths {
    /// The setup paths of a bundle's mount destinations.
    pub fn from_destinations<'a>(destinations: impl IntoIterator<Item = &'a str>) -> Self {
        let mut set = HashSet::new();
        for d in destinations {
            let Some(d) = normalise_container_path(d) else {
                continue;
            };
            let mut end = d.len();
            loop {
                set.insert(d.as_bytes()[..end].to_vec());
                match d[..end].rfind('/') {
                    Some(0) | None => break,
                    Some(i) => end = i,
                }
            }
        }
        SetupPaths(set)
    }

    /// Whether a created path (a container path, as records print it) is a setup path.
    pub fn contains(&self, path: &[u8]) -> bool {
        self.0.contains(path)
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// A Kubernetes pod (`container.pod` in records).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Pod {
    /// Pod name.
    pub name: Option<String>,
    /// Kubernetes namespace.
    pub namespace: Option<String>,
    /// Pod UID.
    pub uid: Option<String>,
}

/// Who a container is, as far as its bundle says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Identity {
    /// Container name.
    pub name: Option<String>,
    /// Image as the user named it.
    pub image: Option<String>,
    /// The pod, for a Kubernetes container.
    pub pod: Option<Pod>,
    /// A Kubernetes sandbox ("pause") container: it only holds the pod's namespaces and is
    /// not monitored.
    pub sandbox: bool,
}

fn capped(s: Option<&String>) -> Option<String> {
    s.filter(|s| !s.is_empty() && s.len() <= MAX_NAME_LEN)
        .cloned()
}

/// containerd's CRI plugin (`io.kubernetes.cri.*`).
mod cri {
    pub const TYPE: &str = "io.kubernetes.cri.container-type";
    pub const NAME: &str = "io.kubernetes.cri.container-name";
    pub const IMAGE: &str = "io.kubernetes.cri.image-name";
    pub const POD_NAME: &str = "io.kubernetes.cri.sandbox-name";
    pub const POD_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
    pub const POD_UID: &str = "io.kubernetes.cri.sandbox-uid";
}

/// CRI-O (`io.kubernetes.cri-o.*`, and the kubelet's `io.kubernetes.pod.*` that CRI-O
/// copies into the annotations).
mod crio {
    pub const TYPE: &str = "io.kubernetes.cri-o.ContainerType";
    pub const METADATA: &str = "io.kubernetes.cri-o.Metadata";
    pub const IMAGE: &str = "io.kubernetes.cri-o.ImageName";
    pub const LABELS: &str = "io.kubernetes.cri-o.Labels";
    pub const KUBE_NAME: &str = "io.kubernetes.container.name";
    pub const POD_NAME: &str = "io.kubernetes.pod.name";
    pub const POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
    pub const POD_UID: &str = "io.kubernetes.pod.uid";
}

/// nerdctl (`nerdctl/*`).
mod nerdctl {
    pub const NAME: &str = "nerdctl/name";
    pub const IMAGE: &str = "nerdctl/image";
}

/// Who a container is, from its bundle's annotations: CRI (containerd), CRI-O and
/// nerdctl annotations are understood; anything else gives an empty identity.
pub fn identity_from_annotations(a: &BTreeMap<String, String>) -> Identity {
    if let Some(kind) = a.get(cri::TYPE) {
        return Identity {
            name: capped(a.get(cri::NAME)),
            image: capped(a.get(cri::IMAGE)),
            pod: Some(Pod {
                name: capped(a.get(cri::POD_NAME)),
                namespace: capped(a.get(cri::POD_NAMESPACE)),
                uid: capped(a.get(cri::POD_UID)),
            }),
            sandbox: kind == "sandbox",
        };
    }
    if let Some(kind) = a.get(crio::TYPE) {
        #[derive(Deserialize)]
        struct Metadata {
            name: Option<String>,
        }
        let from_metadata = a
            .get(crio::METADATA)
            .filter(|m| m.len() <= 64 << 10)
            .and_then(|m| serde_json::from_str::<Metadata>(m).ok())
            .and_then(|m| m.name);
        let labels: BTreeMap<String, String> = a
            .get(crio::LABELS)
            .filter(|m| m.len() <= 64 << 10)
            .and_then(|l| serde_json::from_str(l).ok())
            .unwrap_or_default();
        let either = |k: &str| capped(a.get(k)).or_else(|| capped(labels.get(k)));
        return Identity {
            name: capped(from_metadata.as_ref()).or_else(|| either(crio::KUBE_NAME)),
            image: capped(a.get(crio::IMAGE)),
            pod: Some(Pod {
                name: either(crio::POD_NAME),
                namespace: either(crio::POD_NAMESPACE),
                uid: either(crio::POD_UID),
            }),
            sandbox: kind == "sandbox",
        };
    }
    Identity {
        name: capped(a.get(nerdctl::NAME)),
        image: capped(a.get(nerdctl::IMAGE)),
        pod: None,
        sandbox: false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    #[test]
    fn ctr_bundle_recorded_here() {
        let bundle = Path::new("/run/containerd/io.containerd.runtime.v2.task/default/x");
        let b = parse_config(bundle, &fixture("ctr-config.json")).expect("config");
        assert_eq!(b.rootfs, bundle.join("rootfs"));
        assert_eq!(
            b.mount_destinations,
            [
                "/proc",
                "/dev",
                "/dev/pts",
                "/dev/shm",
                "/dev/mqueue",
                "/sys",
                "/run"
            ]
        );
        assert_eq!(
            identity_from_annotations(&b.annotations),
            Identity::default()
        );
        let setup = SetupPaths::from_destinations(b.mount_destinations.iter().map(String::as_str));
        for p in ["/proc", "/dev", "/dev/pts", "/sys", "/run"] {
            assert!(setup.contains(p.as_bytes()), "{p}");
        }
        for p in ["/", "", "/etc", "/tmp/f0", "/run/x", "/proc/x"] {
            assert!(!setup.contains(p.as_bytes()), "{p}");
        }
    }

    #[test]
    fn podman_bundle_recorded_here() {
        let bundle = Path::new("/var/lib/containers/storage/overlay-containers/x/userdata");
        let b = parse_config(bundle, &fixture("podman-config.json")).expect("config");
        assert_eq!(
            b.rootfs,
            Path::new("/var/lib/containers/storage/overlay/0620fa312aacec9fabc362fef017ae9a15bb09fded9b9f5b85a70046877fb669/merged")
        );
        // podman sets a few `io.kubernetes.cri-o.*` annotations too (`Created`, `TTY`),
        // but not the container type: it is not mistaken for CRI-O.
        let id = identity_from_annotations(&b.annotations);
        assert_eq!(id.pod, None);
        assert!(!id.sandbox);
        let setup = SetupPaths::from_destinations(b.mount_destinations.iter().map(String::as_str));
        for p in [
            "/etc/hosts",
            "/etc/hostname",
            "/run/.containerenv",
            "/etc",
            "/run",
            "/sys/fs/cgroup",
        ] {
            assert!(setup.contains(p.as_bytes()), "{p}");
        }
        assert!(!setup.contains(b"/etc/passwd"));
    }

    #[test]
    fn cri_annotations() {
        // Recorded: a pod container and its sandbox, run through containerd 1.6's CRI plugin.
        let b =
            parse_config(Path::new("/b"), &fixture("cri-containerd-config.json")).expect("config");
        let id = identity_from_annotations(&b.annotations);
        assert_eq!(id.name.as_deref(), Some("sleeper"));
        assert_eq!(id.image.as_deref(), Some("docker.io/library/fsmon-test:2"));
        assert_eq!(
            id.pod,
            Some(Pod {
                name: Some("fsmon-pod-running-29730".into()),
                namespace: Some("fsmon-test".into()),
                uid: Some("d8985224-1df5-087f-e3a3-cd619a7427dc".into()),
            })
        );
        assert!(!id.sandbox);
        // The CRI plugin's own mounts are the runtime's setup, not the container's doing.
        let setup = SetupPaths::from_destinations(b.mount_destinations.iter().map(String::as_str));
        for p in [
            "/etc/hosts",
            "/etc/hostname",
            "/etc/resolv.conf",
            "/dev/shm",
            "/proc",
        ] {
            assert!(setup.contains(p.as_bytes()), "{p}");
        }
        assert!(!setup.contains(b"/etc/passwd"));
        let sandbox = parse_config(
            Path::new("/b"),
            &fixture("cri-containerd-sandbox-config.json"),
        )
        .expect("config");
        let sid = identity_from_annotations(&sandbox.annotations);
        assert!(sid.sandbox, "{sid:?}");
        assert_eq!(sid.pod, id.pod);
    }

    #[test]
    fn crio_annotations() {
        let b = parse_config(Path::new("/b"), &fixture("crio-config.json")).expect("config");
        assert_eq!(
            b.rootfs,
            Path::new("/var/lib/containers/storage/overlay/5d2c1c0e8f1a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c/merged")
        );
        let id = identity_from_annotations(&b.annotations);
        assert_eq!(id.name.as_deref(), Some("app"));
        assert_eq!(id.image.as_deref(), Some("registry.example/shop/app:1.4"));
        assert_eq!(
            id.pod,
            Some(Pod {
                name: Some("web-0".into()),
                namespace: Some("shop".into()),
                uid: Some("7f0e2a6c-1d2b-4c3d-8e9f-0a1b2c3d4e5f".into()),
            })
        );
        assert!(!id.sandbox);
        // Without the kubelet's copies, the labels JSON still names the pod.
        let mut a = b.annotations.clone();
        a.remove(crio::POD_NAME);
        a.remove(crio::METADATA);
        let id = identity_from_annotations(&a);
        assert_eq!(id.pod.and_then(|p| p.name).as_deref(), Some("web-0"));
        assert_eq!(id.name.as_deref(), Some("app"));
        a.insert(crio::TYPE.into(), "sandbox".into());
        assert!(identity_from_annotations(&a).sandbox);
    }

    #[test]
    fn nerdctl_annotations() {
        let mut a = BTreeMap::new();
        a.insert("nerdctl/name".to_owned(), "web".to_owned());
        let id = identity_from_annotations(&a);
        assert_eq!(id.name.as_deref(), Some("web"));
        assert_eq!(id.pod, None);
    }

    #[test]
    fn hostile_configs() {
        let bundle = Path::new("/run/b");
        let ok = |j: &str| parse_config(bundle, j.as_bytes()).map(|b| b.rootfs);
        assert_eq!(
            ok(r#"{"root":{"path":"rootfs"}}"#).ok(),
            Some(bundle.join("rootfs"))
        );
        assert_eq!(
            ok(r#"{"root":{"path":"/abs/merged"}}"#).ok(),
            Some(PathBuf::from("/abs/merged"))
        );
        for bad in [
            r#"{"root":{"path":"../../etc"}}"#,
            r#"{"root":{"path":"/a/../../etc"}}"#,
            r#"{"root":{"path":""}}"#,
            r#"{"root":{"path":"a\u0000b"}}"#,
            r#"{"root":{}}"#,
            r#"{}"#,
            r#"[]"#,
            r#"{"root":{"path":"rootfs"},"mounts":"no"}"#,
            "not json",
        ] {
            assert!(ok(bad).is_err(), "{bad}");
        }
        // Hostile destinations are dropped, the rest kept.
        let b = parse_config(
            bundle,
            br#"{"root":{"path":"rootfs"},"mounts":[{"destination":"/a/../../etc"},{"destination":"rel"},{"destination":"//x/./y/"},{"destination":"/"},{}]}"#,
        )
        .expect("config");
        assert_eq!(b.mount_destinations, ["/x/y"]);
        // Overlong names are not reported.
        let mut a = BTreeMap::new();
        a.insert(cri::TYPE.to_owned(), "container".to_owned());
        a.insert(cri::NAME.to_owned(), "n".repeat(MAX_NAME_LEN + 1));
        a.insert(cri::IMAGE.to_owned(), "i\n\"x".to_owned());
        let id = identity_from_annotations(&a);
        assert_eq!(id.name, None);
        assert_eq!(
            id.image.as_deref(),
            Some("i\n\"x"),
            "JSON encoding escapes it"
        );
    }

    #[test]
    fn oversized_config_is_refused() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let f = std::fs::File::create(tmp.path().join("config.json")).expect("create");
        f.set_len(MAX_CONFIG_LEN + 1).expect("set_len");
        assert!(matches!(
            read_bundle(tmp.path()),
            Err(BundleError::TooLarge { .. })
        ));
        assert!(matches!(
            read_bundle(&tmp.path().join("none")),
            Err(BundleError::Read { .. })
        ));
    }
}
