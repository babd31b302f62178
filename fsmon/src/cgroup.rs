//! Container cgroups: recognising them by path (pure) and finding the cgroup hierarchies
//! on this host (reads `/proc/self/mountinfo` and `/proc/cgroups`).
//!
//! Works with cgroup v1, v2 and hybrid hosts (cgroup v2 needs kernel >= 4.5, its freezer
//! >= 5.2). Nothing here assumes a mount point: hierarchies are found in mountinfo.

use std::path::{Path, PathBuf};

use fsmon_common::CONTAINER_ID_HEX;

/// Which runtime's naming scheme a container cgroup follows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuntimeKind {
    /// Docker with the cgroupfs driver: `/docker/<id>`.
    DockerCgroupfs,
    /// Docker with the systemd driver: `.../docker-<id>.scope`.
    DockerSystemd,
    /// containerd / CRI: `.../cri-containerd-<id>.scope` or kubepods `.../pod<uid>/<id>`.
    Containerd,
    /// podman: `.../libpod-<id>.scope` (and `/libpod_parent/libpod-<id>`).
    Podman,
}

/// A container cgroup recognised from its path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerCgroup {
    /// The 64-hex container id.
    pub id: String,
    /// The naming scheme it matched.
    pub runtime: RuntimeKind,
}

fn is_container_id(s: &str) -> bool {
    s.len() == CONTAINER_ID_HEX
        && s.bytes()
            .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

/// Recognises a container's own cgroup from its path relative to the hierarchy root.
///
/// Only the container's cgroup itself matches, not its children (a container that makes
/// sub-cgroups with nested runtimes must not look like new containers) and not its parents.
/// Anything unknown is `None`: never an error.
pub fn parse_container_cgroup(path: &str) -> Option<ContainerCgroup> {
    let path = path.trim_end_matches('/');
    let mut parts = path.rsplit('/');
    let last = parts.next()?;
    let parent = parts.next().unwrap_or("");
    let scoped = |prefix: &str| -> Option<String> {
        let id = last.strip_prefix(prefix)?.strip_suffix(".scope")?;
        is_container_id(id).then(|| id.to_owned())
    };
    if let Some(id) = scoped("docker-") {
        return Some(ContainerCgroup {
            id,
            runtime: RuntimeKind::DockerSystemd,
        });
    }
    if let Some(id) = scoped("cri-containerd-") {
        return Some(ContainerCgroup {
            id,
            runtime: RuntimeKind::Containerd,
        });
    }
    if let Some(id) = scoped("libpod-") {
        return Some(ContainerCgroup {
            id,
            runtime: RuntimeKind::Podman,
        });
    }
    if let Some(id) = last.strip_prefix("libpod-") {
        if parent == "libpod_parent" && is_container_id(id) {
            return Some(ContainerCgroup {
                id: id.to_owned(),
                runtime: RuntimeKind::Podman,
            });
        }
    }
    if is_container_id(last) {
        if parent == "docker" {
            return Some(ContainerCgroup {
                id: last.to_owned(),
                runtime: RuntimeKind::DockerCgroupfs,
            });
        }
        // kubepods (cgroupfs driver): /kubepods[/<qos>]/pod<uid>/<id>
        if parent.starts_with("pod") && path.contains("kubepods") {
            return Some(ContainerCgroup {
                id: last.to_owned(),
                runtime: RuntimeKind::Containerd,
            });
        }
    }
    None
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
            let mountpoint = PathBuf::from(unescape_mountinfo(left[4]));
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

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = u32::from(b[i + 1] - b'0') * 64
                + u32::from(b[i + 2] - b'0') * 8
                + u32::from(b[i + 3] - b'0');
            out.push(u8::try_from(v).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "4f1c7a0d2b3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e2f3a4b5c6d7e8f90";

    #[test]
    fn recognises_runtimes() {
        let cases: Vec<(String, Option<RuntimeKind>)> = vec![
            (format!("/docker/{ID}"), Some(RuntimeKind::DockerCgroupfs)),
            (format!("/docker/{ID}/"), Some(RuntimeKind::DockerCgroupfs)),
            (format!("/system.slice/docker-{ID}.scope"), Some(RuntimeKind::DockerSystemd)),
            (
                format!("/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1234.slice/cri-containerd-{ID}.scope"),
                Some(RuntimeKind::Containerd),
            ),
            (format!("/kubepods/besteffort/pod0a1b2c3d-1111-2222-3333-444455556666/{ID}"), Some(RuntimeKind::Containerd)),
            (format!("/machine.slice/libpod-{ID}.scope"), Some(RuntimeKind::Podman)),
            (format!("/libpod_parent/libpod-{ID}"), Some(RuntimeKind::Podman)),
            // Not containers, or not the container's own cgroup.
            ("/docker".into(), None),
            ("/".into(), None),
            ("".into(), None),
            ("/system.slice/docker.service".into(), None),
            (format!("/docker/{ID}/init.scope"), None),
            (format!("/docker/{}", &ID[..63]), None),
            (format!("/docker/{}0", ID), None),
            (format!("/docker/{}", ID.to_uppercase()), None),
            (format!("/other/{ID}"), None),
            (format!("/system.slice/docker-{ID}.scope.extra"), None),
            (format!("/system.slice/docker-{ID}"), None),
            ("/docker/\u{e9}\n../../etc".into(), None),
        ];
        for (path, want) in cases {
            let got = parse_container_cgroup(&path);
            assert_eq!(got.as_ref().map(|c| c.runtime), want, "{path:?}");
            if let Some(c) = got {
                assert_eq!(c.id, ID);
            }
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
