//! The overlay mount under a container's rootfs: which mount it is, and its `upperdir=` and
//! lower dirs.
//!
//! Lookup: `statx(STATX_MNT_ID_UNIQUE)` (Linux 6.8) names the mount at the rootfs path, and
//! `statmount(STATMOUNT_FS_TYPE | STATMOUNT_MNT_OPTS)` (Linux 6.8; mount options 6.11)
//! returns its options without reading a file (~70 µs here). Where either is missing, the
//! mount's line in `/proc/self/mountinfo` (found by the old mount id, `STATX_MNT_ID`, Linux
//! 5.8) gives the same options (~150 µs with few mounts, more on a busy host).
//!
//! The option parser is pure and treats its input as hostile: both syntaxes
//! (`lowerdir=a:b:c` from mount(2), repeated `lowerdir+=` from the new mount API), the
//! kernel's octal escapes (`\040`), overlay's `\:` escape, a size cap, and relative paths
//! are refused rather than resolved against fsmon's own working directory.

use std::{
    ffi::{CString, OsStr},
    os::unix::ffi::{OsStrExt, OsStringExt},
    path::{Path, PathBuf},
};

use crate::watcher::ContainerLayer;

/// Options longer than this are refused (500 layers of 200-byte paths fit in 100 KiB).
pub const MAX_OPTIONS_LEN: usize = 1 << 20;
/// overlayfs stacks at most 500 lower layers.
pub const MAX_LOWER_LAYERS: usize = 500;

/// Why a mount could not give a container's layers.
#[derive(Debug, thiserror::Error)]
pub enum MountError {
    /// Nothing is mounted at the rootfs path (not yet, or not any more).
    #[error("nothing is mounted at {path}")]
    NotMounted {
        /// The rootfs path.
        path: PathBuf,
    },
    /// Something other than overlayfs is mounted there.
    #[error("{path} is a {fstype} mount, not overlay")]
    NotOverlay {
        /// The rootfs path.
        path: PathBuf,
        /// Its file system type.
        fstype: String,
    },
    /// The overlay options could not be used.
    #[error("overlay mount at {path}: {reason}")]
    BadOptions {
        /// The rootfs path.
        path: PathBuf,
        /// What was wrong.
        reason: OptionsError,
    },
    /// The mount is not in this mount namespace's mountinfo (made in another namespace).
    #[error("mount {mnt_id} of {path} is not in /proc/self/mountinfo")]
    NotInMountinfo {
        /// The rootfs path.
        path: PathBuf,
        /// Its (old) mount id.
        mnt_id: u64,
    },
    /// A system call failed.
    #[error("{call} on {path}")]
    Io {
        /// Which call.
        call: &'static str,
        /// The path it was about.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// What is wrong with a set of overlay options.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum OptionsError {
    /// Longer than [`MAX_OPTIONS_LEN`].
    #[error("options longer than {MAX_OPTIONS_LEN} bytes")]
    TooLong,
    /// No `upperdir=` (a read-only overlay: nothing to watch).
    #[error("no upperdir= option")]
    NoUpperdir,
    /// A directory that is not an absolute path.
    #[error("{key}= is not an absolute path")]
    Relative {
        /// The option it came from.
        key: &'static str,
    },
    /// More lower layers than overlayfs allows.
    #[error("more than {MAX_LOWER_LAYERS} lower layers")]
    TooManyLayers,
}

/// How the options were found (for logs and the bench).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// `statx` + `statmount`.
    Statmount,
    /// `statx` + `/proc/self/mountinfo`.
    Mountinfo,
}

impl Method {
    /// Short name for logs and the bench.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Statmount => "statmount",
            Method::Mountinfo => "mountinfo",
        }
    }
}

/// Decodes the kernel's `\ooo` escapes (mountinfo and statmount escape space, tab,
/// newline, backslash, and in options also `,` and `=`). Bytes, not text: paths need not
/// be UTF-8.
pub fn unescape_octal(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        let octal = s
            .get(i + 1..i + 4)
            .filter(|d| s[i] == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)));
        match octal.map(|d| {
            u32::from(d[0] - b'0') * 64 + u32::from(d[1] - b'0') * 8 + u32::from(d[2] - b'0')
        }) {
            Some(v) if v <= 0xff => {
                out.push(v as u8);
                i += 4;
            }
            _ => {
                out.push(s[i]);
                i += 1;
            }
        }
    }
    out
}

fn absolute(bytes: Vec<u8>, key: &'static str) -> Result<PathBuf, OptionsError> {
    if bytes.first() != Some(&b'/') || bytes.contains(&0) {
        return Err(OptionsError::Relative { key });
    }
    Ok(PathBuf::from(std::ffi::OsString::from_vec(bytes)))
}

/// Splits a legacy `lowerdir=` value on `:`, honouring overlay's `\:` (and `\\`) escape.
fn split_lowerdir(v: &[u8]) -> Vec<Vec<u8>> {
    let mut parts = vec![Vec::new()];
    let mut it = v.iter().copied();
    while let Some(c) = it.next() {
        match c {
            b'\\' => match it.next() {
                Some(n) => parts.last_mut().map_or((), |p| p.push(n)),
                None => parts.last_mut().map_or((), |p| p.push(c)),
            },
            b':' => parts.push(Vec::new()),
            _ => parts.last_mut().map_or((), |p| p.push(c)),
        }
    }
    parts
}

/// Parses overlay mount options (mountinfo's super options, or statmount's `mnt_opts`)
/// into the container's layers: `upperdir`, and the lower dirs top-most first.
///
/// `lowerdir=a:b:c` and `lowerdir+=a,lowerdir+=b` are both understood; empty
/// components (the `::` before data-only layers) and `datadir+=` layers are skipped, as
/// they are not visible in the container's file tree.
pub fn parse_overlay_options(opts: &[u8]) -> Result<ContainerLayer, OptionsError> {
    if opts.len() > MAX_OPTIONS_LEN {
        return Err(OptionsError::TooLong);
    }
    let mut upperdir = None;
    let mut lowerdirs = Vec::new();
    // `,` and `=` inside values are octal-escaped by the kernel, so splitting the raw text
    // is exact.
    for opt in opts.split(|&c| c == b',') {
        let (key, value) = match opt.iter().position(|&c| c == b'=') {
            Some(i) => (&opt[..i], &opt[i + 1..]),
            None => continue,
        };
        match key {
            b"upperdir" => upperdir = Some(absolute(unescape_octal(value), "upperdir")?),
            b"lowerdir" => {
                for part in split_lowerdir(&unescape_octal(value)) {
                    // `a::b`: the layers after `::` are data-only (not in the tree).
                    if part.is_empty() {
                        break;
                    }
                    lowerdirs.push(absolute(part, "lowerdir")?);
                }
            }
            b"lowerdir+" => lowerdirs.push(absolute(unescape_octal(value), "lowerdir+")?),
            _ => {}
        }
        if lowerdirs.len() > MAX_LOWER_LAYERS {
            return Err(OptionsError::TooManyLayers);
        }
    }
    Ok(ContainerLayer {
        upperdir: upperdir.ok_or(OptionsError::NoUpperdir)?,
        lowerdirs,
    })
}

/// One line of `/proc/<pid>/mountinfo`, the fields fsmon needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountinfoLine<'a> {
    /// The (old, reusable) mount id: the first field.
    pub mnt_id: u64,
    /// Where it is mounted (escapes decoded).
    pub mountpoint: PathBuf,
    /// File system type.
    pub fstype: &'a str,
    /// Super block options, still escaped (see [`parse_overlay_options`]).
    pub super_opts: &'a [u8],
}

/// Parses one mountinfo line:
/// `id parent maj:min root mountpoint opts [optional...] - fstype source superopts`.
pub fn parse_mountinfo_line(line: &str) -> Option<MountinfoLine<'_>> {
    let (left, right) = line.split_once(" - ")?;
    let mut left = left.split(' ');
    let mnt_id = left.next()?.parse().ok()?;
    let mountpoint = left.nth(3)?;
    let mut right = right.splitn(3, ' ');
    let fstype = right.next()?;
    let _source = right.next()?;
    let super_opts = right.next()?.trim_end_matches('\n').as_bytes();
    Some(MountinfoLine {
        mnt_id,
        mountpoint: PathBuf::from(OsStr::from_bytes(&unescape_octal(mountpoint.as_bytes()))),
        fstype,
        super_opts,
    })
}

const STATX_MNT_ID: u32 = 0x1000;
const STATX_MNT_ID_UNIQUE: u32 = 0x4000;
const STATX_ATTR_MOUNT_ROOT: u64 = 0x2000;
const STATMOUNT_FS_TYPE: u64 = 0x20;
const STATMOUNT_MNT_OPTS: u64 = 0x80;
#[cfg(target_arch = "x86_64")]
const SYS_STATMOUNT: libc::c_long = 457;
#[cfg(target_arch = "aarch64")]
const SYS_STATMOUNT: libc::c_long = 457;
/// `struct statmount`: fixed part; the strings follow at this offset.
const STATMOUNT_STR_OFFSET: usize = 512;

struct Statx {
    mnt_id: u64,
    unique: bool,
}

fn statx_mount(path: &CString, shown: &Path, mask: u32) -> Result<Statx, MountError> {
    // SAFETY: an all-zero statx is a valid value of this plain C struct.
    let mut st: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `path` is NUL-terminated and `st` is a valid, writable statx buffer.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            path.as_ptr(),
            libc::AT_NO_AUTOMOUNT | libc::AT_SYMLINK_NOFOLLOW,
            mask,
            &mut st,
        )
    };
    if r != 0 {
        return Err(MountError::Io {
            call: "statx",
            path: shown.to_owned(),
            source: std::io::Error::last_os_error(),
        });
    }
    if st.stx_attributes_mask & STATX_ATTR_MOUNT_ROOT != 0
        && st.stx_attributes & STATX_ATTR_MOUNT_ROOT == 0
    {
        return Err(MountError::NotMounted {
            path: shown.to_owned(),
        });
    }
    Ok(Statx {
        mnt_id: st.stx_mnt_id,
        unique: st.stx_mask & STATX_MNT_ID_UNIQUE != 0,
    })
}

/// `statmount` of a unique mount id: (fs type, options). `None` when this kernel has no
/// statmount or no `mnt_opts` in it (the caller falls back to mountinfo).
fn statmount_opts(mnt_id: u64) -> Option<(String, Vec<u8>)> {
    // struct mnt_id_req (MNT_ID_REQ_SIZE_VER0): size, spare, mnt_id, param.
    #[repr(C)]
    struct MntIdReq {
        size: u32,
        spare: u32,
        mnt_id: u64,
        param: u64,
    }
    let req = MntIdReq {
        size: std::mem::size_of::<MntIdReq>() as u32,
        spare: 0,
        mnt_id,
        param: STATMOUNT_FS_TYPE | STATMOUNT_MNT_OPTS,
    };
    let mut buf = vec![0u64; 2048]; // 16 KiB, 8-byte aligned
    loop {
        let len = buf.len() * 8;
        // SAFETY: `req` is a valid mnt_id_req of the size it declares; `buf` is writable
        // for `len` bytes and 8-byte aligned as struct statmount requires.
        let r = unsafe {
            libc::syscall(
                SYS_STATMOUNT,
                &req as *const MntIdReq,
                buf.as_mut_ptr(),
                len,
                0u32,
            )
        };
        if r == 0 {
            break;
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EOVERFLOW) && len < MAX_OPTIONS_LEN * 2 {
            buf.resize(buf.len() * 4, 0);
            continue;
        }
        return None;
    }
    // SAFETY: `buf` holds `buf.len() * 8` initialised bytes; viewing u64s as bytes is sound.
    let bytes: &[u8] =
        unsafe { std::slice::from_raw_parts(buf.as_ptr().cast::<u8>(), buf.len() * 8) };
    let u32_at = |o: usize| {
        bytes
            .get(o..o + 4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_ne_bytes)
    };
    let u64_at = |o: usize| {
        bytes
            .get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_ne_bytes)
    };
    let size = u32_at(0)? as usize;
    let mask = u64_at(8)?;
    if mask & (STATMOUNT_FS_TYPE | STATMOUNT_MNT_OPTS) != (STATMOUNT_FS_TYPE | STATMOUNT_MNT_OPTS) {
        return None;
    }
    let strings = bytes.get(STATMOUNT_STR_OFFSET..size.min(bytes.len()))?;
    let string = |off: usize| -> Option<&[u8]> {
        let s = strings.get(off..)?;
        Some(&s[..s.iter().position(|&c| c == 0)?])
    };
    let fstype = String::from_utf8_lossy(string(u32_at(36)? as usize)?).into_owned();
    let opts = string(u32_at(4)? as usize)?.to_vec();
    Some((fstype, opts))
}

/// Finds the overlay mounted at `rootfs` and returns its layers.
pub fn overlay_at(rootfs: &Path) -> Result<(ContainerLayer, Method), MountError> {
    let c = CString::new(rootfs.as_os_str().as_bytes()).map_err(|_| MountError::NotMounted {
        path: rootfs.to_owned(),
    })?;
    let st = statx_mount(&c, rootfs, STATX_MNT_ID_UNIQUE)?;
    if st.unique {
        if let Some((fstype, opts)) = statmount_opts(st.mnt_id) {
            return check(rootfs, &fstype, &opts).map(|l| (l, Method::Statmount));
        }
    }
    let st = if st.unique {
        statx_mount(&c, rootfs, STATX_MNT_ID)?
    } else {
        st
    };
    from_mountinfo(rootfs, st.mnt_id).map(|l| (l, Method::Mountinfo))
}

/// Like [`overlay_at`], but always through `/proc/self/mountinfo` (the fallback; for the
/// bench and `fsmon resolve`).
pub fn overlay_via_mountinfo(rootfs: &Path) -> Result<ContainerLayer, MountError> {
    let c = CString::new(rootfs.as_os_str().as_bytes()).map_err(|_| MountError::NotMounted {
        path: rootfs.to_owned(),
    })?;
    let st = statx_mount(&c, rootfs, STATX_MNT_ID)?;
    from_mountinfo(rootfs, st.mnt_id)
}

/// The overlay layers of the mount with (old) id `mnt_id`, from this namespace's mountinfo.
fn from_mountinfo(rootfs: &Path, mnt_id: u64) -> Result<ContainerLayer, MountError> {
    let text =
        std::fs::read_to_string("/proc/self/mountinfo").map_err(|source| MountError::Io {
            call: "read /proc/self/mountinfo",
            path: rootfs.to_owned(),
            source,
        })?;
    let line = text
        .lines()
        .filter_map(parse_mountinfo_line)
        .find(|l| l.mnt_id == mnt_id)
        .ok_or(MountError::NotInMountinfo {
            path: rootfs.to_owned(),
            mnt_id,
        })?;
    check(rootfs, line.fstype, line.super_opts)
}

fn check(rootfs: &Path, fstype: &str, opts: &[u8]) -> Result<ContainerLayer, MountError> {
    if fstype != "overlay" {
        return Err(MountError::NotOverlay {
            path: rootfs.to_owned(),
            fstype: fstype.to_owned(),
        });
    }
    parse_overlay_options(opts).map_err(|reason| MountError::BadOptions {
        path: rootfs.to_owned(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded on this project's machine: `ctr -n default run` on a system containerd
    /// (mount(2), one lower layer).
    const CTR_LINE: &str = "74 27 0:41 / /run/fsmon-containerd/io.containerd.runtime.v2.task/default/1a626b1970e1229505034b871f49ff8aae231c0f03c096814e2a1e0a5ff212a2/rootfs rw,relatime - overlay overlay rw,lowerdir=/var/lib/fsmon-containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/1/fs,upperdir=/var/lib/fsmon-containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/2/fs,workdir=/var/lib/fsmon-containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/2/work";
    /// Recorded here: rootful podman 4.3 (lower layers through `l/` links, `uuid=on`).
    const PODMAN_LINE: &str = "76 72 0:42 / /var/lib/containers/storage/overlay/0620fa312aacec9fabc362fef017ae9a15bb09fded9b9f5b85a70046877fb669/merged rw,relatime - overlay overlay rw,lowerdir=/var/lib/containers/storage/overlay/l/NAIBMTIKSWNFRLQRALONOSQMEC,upperdir=/var/lib/containers/storage/overlay/0620fa312aacec9fabc362fef017ae9a15bb09fded9b9f5b85a70046877fb669/diff,workdir=/var/lib/containers/storage/overlay/0620fa312aacec9fabc362fef017ae9a15bb09fded9b9f5b85a70046877fb669/work,uuid=on";
    /// The new mount API (fsconfig per layer), as Linux 6.18 shows it, with escapes.
    const NEW_API_LINE: &str = "91 27 0:55 / /run/x/rootfs\\040dir rw,relatime - overlay overlay rw,lowerdir+=/l/one,lowerdir+=/l/t\\054wo\\072x,datadir+=/data/d,upperdir=/u/p\\134q,workdir=/u/work,redirect_dir=nofollow";

    #[test]
    fn parses_recorded_mountinfo_lines() {
        let l = parse_mountinfo_line(CTR_LINE).expect("line");
        assert_eq!(l.mnt_id, 74);
        assert_eq!(l.fstype, "overlay");
        assert!(l.mountpoint.ends_with("rootfs"));
        let layer = parse_overlay_options(l.super_opts).expect("options");
        assert_eq!(
            layer.upperdir,
            Path::new(
                "/var/lib/fsmon-containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/2/fs"
            )
        );
        assert_eq!(
            layer.lowerdirs,
            vec![PathBuf::from(
                "/var/lib/fsmon-containerd/io.containerd.snapshotter.v1.overlayfs/snapshots/1/fs"
            )]
        );

        let l = parse_mountinfo_line(PODMAN_LINE).expect("line");
        let layer = parse_overlay_options(l.super_opts).expect("options");
        assert!(layer.upperdir.ends_with("diff"));
        assert_eq!(layer.lowerdirs.len(), 1);

        let l = parse_mountinfo_line(NEW_API_LINE).expect("line");
        assert_eq!(l.mountpoint, Path::new("/run/x/rootfs dir"));
        let layer = parse_overlay_options(l.super_opts).expect("options");
        assert_eq!(layer.upperdir, Path::new("/u/p\\q"));
        assert_eq!(
            layer.lowerdirs,
            vec![PathBuf::from("/l/one"), PathBuf::from("/l/t,wo:x")],
            "lowerdir+= takes colons literally; data-only layers are not lower dirs"
        );
    }

    #[test]
    fn option_syntaxes_and_hostile_input() {
        type Want = Result<(&'static str, Vec<&'static str>), OptionsError>;
        let cases: Vec<(&[u8], Want)> = vec![
            (
                b"rw,lowerdir=/a:/b:/c,upperdir=/u,workdir=/w",
                Ok(("/u", vec!["/a", "/b", "/c"])),
            ),
            (
                b"lowerdir+=/a,lowerdir+=/b,upperdir=/u",
                Ok(("/u", vec!["/a", "/b"])),
            ),
            // Data-only layers after `::` are not in the tree.
            (
                b"lowerdir=/a:/b::/d1:/d2,upperdir=/u",
                Ok(("/u", vec!["/a", "/b"])),
            ),
            // overlay's own escape of a colon in a layer path.
            (
                b"lowerdir=/a\\:b:/c,upperdir=/u",
                Ok(("/u", vec!["/a:b", "/c"])),
            ),
            // The kernel's octal escapes: space, tab, newline, backslash, comma.
            (
                b"lowerdir=/s\\040p:/t\\011:/n\\012,upperdir=/c\\054d",
                Ok(("/c,d", vec!["/s p", "/t\t", "/n\n"])),
            ),
            // An incomplete or out-of-range escape is taken literally.
            (b"upperdir=/x\\04", Ok(("/x\\04", vec![]))),
            (b"upperdir=/x\\777", Ok(("/x\\777", vec![]))),
            (b"rw,lowerdir=/a", Err(OptionsError::NoUpperdir)),
            (b"", Err(OptionsError::NoUpperdir)),
            (
                b"upperdir=rel/u",
                Err(OptionsError::Relative { key: "upperdir" }),
            ),
            (
                b"upperdir=",
                Err(OptionsError::Relative { key: "upperdir" }),
            ),
            (
                b"upperdir=/u,lowerdir=/a:../../etc",
                Err(OptionsError::Relative { key: "lowerdir" }),
            ),
            (
                b"upperdir=/u,lowerdir+=x",
                Err(OptionsError::Relative { key: "lowerdir+" }),
            ),
            (
                b"upperdir=/u\\000x",
                Err(OptionsError::Relative { key: "upperdir" }),
            ),
        ];
        for (opts, want) in cases {
            let got = parse_overlay_options(opts).map(|l| (l.upperdir, l.lowerdirs));
            let want = want.map(|(u, ls)| {
                (
                    PathBuf::from(u),
                    ls.into_iter().map(PathBuf::from).collect::<Vec<_>>(),
                )
            });
            assert_eq!(got, want, "{}", String::from_utf8_lossy(opts));
        }
        let many = format!(
            "upperdir=/u,lowerdir={}",
            vec!["/l"; MAX_LOWER_LAYERS + 1].join(":")
        );
        assert_eq!(
            parse_overlay_options(many.as_bytes()).map(|_| ()),
            Err(OptionsError::TooManyLayers)
        );
        let huge = vec![b'a'; MAX_OPTIONS_LEN + 1];
        assert_eq!(
            parse_overlay_options(&huge).map(|_| ()),
            Err(OptionsError::TooLong)
        );
        // Not UTF-8: bytes survive.
        let layer = parse_overlay_options(b"upperdir=/u\\377v").expect("options");
        assert_eq!(layer.upperdir.as_os_str().as_bytes(), b"/u\xffv");
    }

    #[test]
    fn malformed_mountinfo_lines() {
        for bad in [
            "",
            "garbage",
            "x 27 0:41 / /m rw - overlay overlay rw",
            "74 27 0:41 / /m rw",
        ] {
            assert_eq!(parse_mountinfo_line(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn nothing_mounted_is_an_error() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let err = overlay_at(tmp.path()).expect_err("a plain directory is not a mount");
        assert!(
            matches!(
                err,
                MountError::NotMounted { .. } | MountError::NotOverlay { .. }
            ),
            "{err}"
        );
        let err = overlay_at(&tmp.path().join("missing")).expect_err("missing");
        assert!(matches!(err, MountError::Io { call: "statx", .. }), "{err}");
    }
}
