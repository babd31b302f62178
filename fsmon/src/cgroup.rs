//! Container cgroups: recognising them by path (pure) and finding the cgroup hierarchies
//! on this host (reads `/proc/self/mountinfo` and `/proc/cgroups`).
//!
//! Works with cgroup v1, v2 and hybrid hosts (cgroup v2 needs kernel >= 4.5, its freezer
//! >= 5.2). Nothing here assumes a mount point: hierarchies are found in mountinfo.

use std::path::{Path, PathBuf};

use std::os::unix::ffi::OsStringExt as _;

use crate::{
    id::{ContainerId, RuntimeName},
    runtimes::mount::unescape_octal,
};

/// Which runtime's naming scheme a container cgroup follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeKind {
    /// Docker with the cgroupfs driver: `/docker/<id>`.
    DockerCgroupfs,
    /// Docker with the systemd driver: `.../docker-<id>.scope`.
    DockerSystemd,
    /// containerd's own containers (ctr, nerdctl): `/<namespace>/<id>` (cgroupfs) or
    /// `.../nerdctl-<id>.scope` (systemd).
    Containerd,
    /// Kubernetes through containerd's CRI plugin: `.../cri-containerd-<id>.scope`
    /// (systemd) or `/kubepods[/<qos>]/pod<uid>/<id>` (cgroupfs).
    Cri,
    /// podman: `.../libpod-<id>.scope` (systemd) or `/libpod_parent/libpod-<id>`
    /// (cgroupfs). Its `libpod-conmon-<id>` siblings are not containers.
    Podman,
    /// CRI-O: `.../crio-<id>.scope` (systemd) or `.../crio-<id>` (cgroupfs). Its
    /// `crio-conmon-<id>` siblings are not containers.
    CriO,
}

impl RuntimeKind {
    /// The runtime that makes cgroups of this shape.
    pub fn runtime(self) -> RuntimeName {
        match self {
            RuntimeKind::DockerCgroupfs | RuntimeKind::DockerSystemd => RuntimeName::Docker,
            RuntimeKind::Containerd | RuntimeKind::Cri => RuntimeName::Containerd,
            RuntimeKind::Podman => RuntimeName::Podman,
            RuntimeKind::CriO => RuntimeName::CriO,
        }
    }
}

/// A container cgroup recognised from its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerCgroup {
    /// The container's id.
    pub id: ContainerId,
    /// The naming scheme it matched.
    pub runtime: RuntimeKind,
    /// The containerd namespace, when the cgroup name says it (`/<namespace>/<id>`; CRI
    /// always uses `k8s.io`).
    pub namespace: Option<String>,
}

/// The namespace containerd's CRI plugin puts Kubernetes containers in.
pub const CRI_NAMESPACE: &str = "k8s.io";

/// A containerd namespace name as containerd validates it: alphanumeric labels joined by
/// single `.`, `_` or `-`, at most 76 characters. Never `.`/`..`, never a `/`.
pub fn is_containerd_namespace(s: &str) -> bool {
    let b = s.as_bytes();
    let sep = |c: u8| matches!(c, b'.' | b'_' | b'-');
    !b.is_empty()
        && b.len() <= 76
        && b.iter().all(|&c| c.is_ascii_alphanumeric() || sep(c))
        && !sep(b[0])
        && !sep(b[b.len() - 1])
        && !b.windows(2).any(|w| sep(w[0]) && sep(w[1]))
}

/// Recognises a container's own cgroup from its path relative to the hierarchy root.
///
/// Only the container's cgroup itself matches, not its children (a container that makes
/// sub-cgroups with nested runtimes must not look like new containers) and not its parents.
/// Anything unknown is `None`: never an error.
pub fn parse_container_cgroup(path: &str) -> Option<ContainerCgroup> {
    let path = path.trim_end_matches('/');
    let comps: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
    let last = *comps.last()?;
    let parent = comps.len().checked_sub(2).map_or("", |i| comps[i]);
    let found = |id: ContainerId, runtime: RuntimeKind, namespace: Option<&str>| {
        Some(ContainerCgroup {
            id,
            runtime,
            namespace: namespace.map(str::to_owned),
        })
    };
    let scoped = |prefix: &str| {
        ContainerId::parse_canonical(last.strip_prefix(prefix)?.strip_suffix(".scope")?)
    };
    if let Some(id) = scoped("docker-") {
        return found(id, RuntimeKind::DockerSystemd, None);
    }
    if let Some(id) = scoped("cri-containerd-") {
        return found(id, RuntimeKind::Cri, Some(CRI_NAMESPACE));
    }
    if let Some(id) = scoped("nerdctl-") {
        return found(id, RuntimeKind::Containerd, None);
    }
    // `libpod-conmon-<id>.scope` / `crio-conmon-<id>.scope` never match: `conmon-<id>` is
    // not an id.
    if let Some(id) = scoped("libpod-") {
        return found(id, RuntimeKind::Podman, None);
    }
    if let Some(id) = scoped("crio-") {
        return found(id, RuntimeKind::CriO, None);
    }
    if let Some(id) = last.strip_prefix("libpod-") {
        if parent == "libpod_parent" {
            return found(ContainerId::parse_canonical(id)?, RuntimeKind::Podman, None);
        }
    }
    // CRI-O with the cgroupfs driver: `/kubepods/<qos>/pod<uid>/crio-<id>`.
    if let Some(id) = last.strip_prefix("crio-") {
        if parent.starts_with("pod") && comps.iter().any(|c| c.starts_with("kubepods")) {
            return found(ContainerId::parse_canonical(id)?, RuntimeKind::CriO, None);
        }
    }
    let id = ContainerId::parse_canonical(last)?;
    if parent == "docker" {
        return found(id, RuntimeKind::DockerCgroupfs, None);
    }
    // kubepods (cgroupfs driver): /kubepods[/<qos>]/pod<uid>/<id>
    if parent.starts_with("pod") && comps.iter().any(|c| c.starts_with("kubepods")) {
        return found(id, RuntimeKind::Cri, Some(CRI_NAMESPACE));
    }
    // containerd's own (ctr, nerdctl with cgroupfs): /<namespace>/<id>, right below the
    // root. Whether such a container exists is decided by its bundle, not by the name.
    if comps.len() == 2 && is_containerd_namespace(parent) && !parent.starts_with("kubepods") {
        return found(id, RuntimeKind::Containerd, Some(parent));
    }
    None
}

/// The container cgroups that have processes, below a hierarchy mounted at `root`: (path
/// relative to the root, the cgroup). Containers' own sub-cgroups are not descended into,
/// and the walk stops at `max_depth` levels (kubepods containers sit 4 deep). For the
/// containers already running when fsmon starts, whatever runtime made them.
pub fn find_container_cgroups(root: &Path, max_depth: usize) -> Vec<(String, ContainerCgroup)> {
    let mut found = Vec::new();
    let mut stack = vec![(String::new(), 0usize)];
    while let Some((rel, depth)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(join_rel(root, &rel)) else {
            continue;
        };
        for e in entries.flatten() {
            if !e.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let child = format!("{rel}/{name}");
            if let Some(cg) = parse_container_cgroup(&child) {
                let populated = std::fs::read_to_string(e.path().join("cgroup.procs"))
                    .is_ok_and(|p| !p.trim().is_empty());
                if populated {
                    found.push((child, cg));
                }
            } else if depth + 1 < max_depth {
                stack.push((child, depth + 1));
            }
        }
    }
    found
}

/// Which hierarchy a cgroup lives in, as far as fsmon cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hierarchy {
    /// The cgroup v1 freezer hierarchy.
    Freezer,
    /// The cgroup v2 (unified) hierarchy.
    Unified,
}

/// Where this host's hierarchies are mounted, and their kernel ids.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CgroupMounts {
    /// Mount point of the v1 freezer hierarchy, if any.
    pub freezer: Option<PathBuf>,
    /// Kernel hierarchy id of the freezer hierarchy (from `/proc/cgroups`).
    pub freezer_id: Option<u32>,
    /// Mount point of the v2 hierarchy, if any (its hierarchy id is always 0).
    pub unified: Option<PathBuf>,
}

impl CgroupMounts {
    /// Reads the host's cgroup mounts.
    pub fn discover() -> std::io::Result<Self> {
        let mountinfo = std::fs::read_to_string("/proc/self/mountinfo")?;
        let cgroups = std::fs::read_to_string("/proc/cgroups").unwrap_or_default();
        Ok(Self::parse(&mountinfo, &cgroups))
    }

    /// Pure part of [`CgroupMounts::discover`].
    pub fn parse(mountinfo: &str, proc_cgroups: &str) -> Self {
        let mut m = CgroupMounts::default();
        for line in mountinfo.lines() {
            // id parent maj:min root mountpoint opts [optional...] - fstype source superopts
            let Some((left, right)) = line.split_once(" - ") else {
                continue;
            };
            let left: Vec<&str> = left.split(' ').collect();
            let right: Vec<&str> = right.split(' ').collect();
            if left.len() < 5 || right.len() < 3 || left[3] != "/" {
                continue;
            }
            let mountpoint = PathBuf::from(std::ffi::OsString::from_vec(unescape_octal(
                left[4].as_bytes(),
            )));
            match right[0] {
                "cgroup2" if m.unified.is_none() => m.unified = Some(mountpoint),
                "cgroup" if m.freezer.is_none() && right[2].split(',').any(|o| o == "freezer") => {
                    m.freezer = Some(mountpoint)
                }
                _ => {}
            }
        }
        if m.freezer.is_some() {
            m.freezer_id = proc_cgroups.lines().find_map(|l| {
                let mut f = l.split_whitespace();
                (f.next() == Some("freezer"))
                    .then(|| f.next()?.parse().ok())
                    .flatten()
            });
        }
        m
    }

    /// The directory of cgroup `rel` (relative to the hierarchy root) in `h`.
    pub fn dir(&self, h: Hierarchy, rel: &str) -> Option<PathBuf> {
        let root = match h {
            Hierarchy::Freezer => self.freezer.as_deref()?,
            Hierarchy::Unified => self.unified.as_deref()?,
        };
        Some(join_rel(root, rel))
    }

    /// Which hierarchy a kernel hierarchy id is, among the ones fsmon uses.
    pub fn hierarchy_of(&self, hierarchy_id: u32) -> Option<Hierarchy> {
        if self.unified.is_some() && hierarchy_id == 0 {
            Some(Hierarchy::Unified)
        } else if self.freezer_id == Some(hierarchy_id) {
            Some(Hierarchy::Freezer)
        } else {
            None
        }
    }
}

/// Joins a cgroup-relative path under a root without ever leaving it (`..` is dropped).
pub fn join_rel(root: &Path, rel: &str) -> PathBuf {
    let mut p = root.to_path_buf();
    for c in rel
        .split('/')
        .filter(|c| !c.is_empty() && *c != "." && *c != "..")
    {
        p.push(c);
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c7a0d2b3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f90";

    #[test]
    fn recognises_runtimes() {
        use RuntimeKind::*;
        type Want = Option<(RuntimeKind, Option<&'static str>)>;
        let cases: Vec<(String, Want)> = vec![
            (format!("/docker/{ID}"), Some((DockerCgroupfs, None))),
            (format!("/docker/{ID}/"), Some((DockerCgroupfs, None))),
            (format!("/system.slice/docker-{ID}.scope"), Some((DockerSystemd, None))),
            // ctr (recorded here: `ctr -n default run ...`), nerdctl.
            (format!("/default/{ID}"), Some((Containerd, Some("default")))),
            (format!("/my-ns.v2/{ID}"), Some((Containerd, Some("my-ns.v2")))),
            (format!("/system.slice/nerdctl-{ID}.scope"), Some((Containerd, None))),
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/cri-containerd-{ID}.scope"),
                Some((Cri, Some("k8s.io"))),
            ),
            (format!("/kubepods/besteffort/pod0a1b2c3d-1111-2222-3333-444455556666/{ID}"), Some((Cri, Some("k8s.io")))),
            (format!("/kubepods/pod0a1b2c3d-1111-2222-3333-444455556666/{ID}"), Some((Cri, Some("k8s.io")))),
            (format!("/machine.slice/libpod-{ID}.scope"), Some((Podman, None))),
            // Recorded here: rootful podman with the cgroupfs manager.
            (format!("/libpod_parent/libpod-{ID}"), Some((Podman, None))),
            (
                format!("/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice/crio-{ID}.scope"),
                Some((CriO, None)),
            ),
            (format!("/kubepods/besteffort/pod0a1b2c3d/crio-{ID}"), Some((CriO, None))),
            // Runtime helpers beside the container: not containers.
            (format!("/machine.slice/libpod-conmon-{ID}.scope"), None),
            (format!("/libpod_parent/libpod-conmon-{ID}"), None),
            ("/libpod_parent/conmon".into(), None),
            (format!("/kubepods.slice/kubepods-pod12.slice/crio-conmon-{ID}.scope"), None),
            (format!("/kubepods/besteffort/pod0a1b2c3d/crio-conmon-{ID}"), None),
            // Not containers, or not the container's own cgroup.
            ("/docker".into(), None),
            ("/".into(), None),
            ("".into(), None),
            ("/system.slice/docker.service".into(), None),
            (format!("/docker/{ID}/init.scope"), None),
            (format!("/default/{ID}/sub"), None),
            (format!("/a/b/{ID}"), None),
            (format!("/{ID}"), None),
            (format!("/../{ID}"), None),
            (format!("/-ns/{ID}"), None),
            (format!("/n..s/{ID}"), None),
            (format!("/kubepods/{ID}"), None),
            (format!("/libpod-{ID}"), None),
            (format!("/crio-{ID}"), None),
            (format!("/docker/{}", &ID[..63]), None),
            (format!("/docker/{}0", ID), None),
            (format!("/docker/{}", ID.to_uppercase()), None),
            (format!("/system.slice/docker-{ID}.scope.extra"), None),
            (format!("/system.slice/docker-{ID}"), None),
            ("/docker/\u{e9}\n../../etc".into(), None),
        ];
        for (path, want) in cases {
            let got = parse_container_cgroup(&path);
            assert_eq!(
                got.as_ref().map(|c| (c.runtime, c.namespace.as_deref())),
                want,
                "{path:?}"
            );
            if let Some(c) = got {
                assert_eq!(c.id.as_str(), ID);
            }
        }
    }

    #[test]
    fn walks_to_running_containers() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        let dirs = [
            (format!("default/{ID}"), true),
            (format!("libpod_parent/libpod-{ID}"), false),
            (format!("kubepods/besteffort/pod1/{ID}"), true),
            (
                format!("kubepods/besteffort/pod1/{ID}/nested/docker/{ID}"),
                true,
            ),
            (format!("a/b/c/d/e/f/g/h/i/docker/{ID}"), true),
        ];
        for (d, populated) in &dirs {
            std::fs::create_dir_all(root.join(d)).expect("mkdir");
            let procs = if *populated { "42\n" } else { "" };
            std::fs::write(root.join(d).join("cgroup.procs"), procs).expect("write");
        }
        let mut got: Vec<String> = find_container_cgroups(root, 8)
            .into_iter()
            .map(|(rel, _)| rel)
            .collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                format!("/default/{ID}"),
                format!("/kubepods/besteffort/pod1/{ID}")
            ],
            "populated containers only; not inside a container; not deeper than asked"
        );
    }

    #[test]
    fn containerd_namespaces() {
        for ok in ["default", "k8s.io", "moby", "a", "a-b_c.d", &"x".repeat(76)] {
            assert!(is_containerd_namespace(ok), "{ok:?}");
        }
        for bad in [
            "",
            ".",
            "..",
            "-a",
            "a-",
            "a..b",
            "a/b",
            "a b",
            "\u{e9}",
            &"x".repeat(77),
        ] {
            assert!(!is_containerd_namespace(bad), "{bad:?}");
        }
    }

    #[test]
    fn finds_hybrid_mounts() {
        let mi = "\
30 24 0:26 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755
31 30 0:27 / /sys/fs/cgroup/unified rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
35 30 0:31 / /sys/fs/cgroup/freezer rw,nosuid - cgroup cgroup rw,freezer
36 30 0:32 / /sys/fs/cgroup/cpu rw,nosuid - cgroup cgroup rw,cpu
37 30 0:33 /docker /mnt/bind rw - cgroup cgroup rw,freezer
";
        let pc = "#subsys_name\thierarchy\tnum_cgroups\tenabled\ncpu\t1\t1\t1\nfreezer\t6\t1\t1\n";
        let m = CgroupMounts::parse(mi, pc);
        assert_eq!(
            m.unified.as_deref(),
            Some(Path::new("/sys/fs/cgroup/unified"))
        );
        assert_eq!(
            m.freezer.as_deref(),
            Some(Path::new("/sys/fs/cgroup/freezer"))
        );
        assert_eq!(m.freezer_id, Some(6));
        assert_eq!(m.hierarchy_of(0), Some(Hierarchy::Unified));
        assert_eq!(m.hierarchy_of(6), Some(Hierarchy::Freezer));
        assert_eq!(m.hierarchy_of(1), None);
        assert_eq!(
            m.dir(Hierarchy::Freezer, "/docker/../../x").as_deref(),
            Some(Path::new("/sys/fs/cgroup/freezer/docker/x"))
        );
    }

    #[test]
    fn pure_v2_and_escapes() {
        let mi = "25 1 0:22 / /sys/fs/cgroup\\040x rw - cgroup2 cgroup2 rw\n";
        let m = CgroupMounts::parse(mi, "");
        assert_eq!(m.unified.as_deref(), Some(Path::new("/sys/fs/cgroup x")));
        assert_eq!(m.freezer, None);
        assert_eq!(m.hierarchy_of(0), Some(Hierarchy::Unified));
    }
}
