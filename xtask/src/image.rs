//! `cargo xtask image`: the fsmon container image, built here from local files. The build
//! context (`target/image`) holds a root file system with `target/release/fsmon` and the
//! shared libraries it links (found with `ldd`, copied from this host), and
//! `deploy/Dockerfile` builds `FROM scratch` on it: no registry is involved.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context as _, Result};

use crate::{ebpf, util};

/// The image's name, tagged with the crate version.
pub fn tag() -> String {
    format!("fsmon:{}", env!("CARGO_PKG_VERSION"))
}

/// `cargo xtask image` options.
#[derive(clap::Args, Debug)]
pub struct ImageArgs {
    /// The engine to build the image in.
    #[arg(long, default_value = "unix:///var/run/docker.sock")]
    pub docker_host: String,
}

/// The shared objects `bin` loads, as `ldd` resolves them here (absolute paths).
fn linked_libraries(bin: &Path) -> Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(bin)
        .output()
        .context("running ldd")?;
    if !out.status.success() {
        bail!("ldd {} failed", bin.display());
    }
    let mut libs = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        // `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x…)` or `/lib64/ld-linux… (0x…)`.
        let path = match line.split_once("=>") {
            Some((_, right)) => right.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            libs.push(PathBuf::from(p));
        }
    }
    Ok(libs)
}

/// Copies `src` to the same absolute path under `root`, following symlinks.
fn copy_into(root: &Path, src: &Path) -> Result<()> {
    let dst = root.join(src.strip_prefix("/").unwrap_or(src));
    if let Some(dir) = dst.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::copy(src, &dst)
        .with_context(|| format!("copying {} into the image", src.display()))?;
    Ok(())
}

/// Builds `target/release/fsmon`, prepares the context and builds the image in `host`;
/// returns the image tag.
pub fn build(host: &str) -> Result<String> {
    let bin = ebpf::build_all()?;
    let context = util::root().join("target/image");
    let _ = std::fs::remove_dir_all(&context);
    let rootfs = context.join("rootfs");
    for d in ["usr/bin", "tmp", "run", "etc"] {
        std::fs::create_dir_all(rootfs.join(d))?;
    }
    // The default engine socket path is /var/run/docker.sock, as on the host.
    std::fs::create_dir_all(rootfs.join("var"))?;
    std::os::unix::fs::symlink("../run", rootfs.join("var/run"))?;
    std::fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/:/usr/bin/fsmon\n",
    )?;
    // Without the debug information the release profile keeps for backtraces (50 MB).
    let strip = util::which("strip").map(|strip| {
        Command::new(strip)
            .args(["--strip-debug", "-o"])
            .arg(rootfs.join("usr/bin/fsmon"))
            .arg(&bin)
            .status()
    });
    if !matches!(strip, Some(Ok(st)) if st.success()) {
        std::fs::copy(&bin, rootfs.join("usr/bin/fsmon")).context("copying fsmon")?;
    }
    for lib in linked_libraries(&bin)? {
        copy_into(&rootfs, &lib)?;
    }
    let tag = tag();
    util::run(
        Command::new("docker")
            .args(["-H", host, "build", "-q", "-t", &tag, "-f"])
            .arg(util::root().join("deploy/Dockerfile"))
            .arg(&context),
    )
    .with_context(|| format!("docker build of {tag} in {host}"))?;
    eprintln!("xtask: built image {tag} in {host}");
    Ok(tag)
}
