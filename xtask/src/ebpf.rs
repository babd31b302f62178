//! Building the eBPF object and the daemon with it embedded.
//!
//! Two toolchain routes are known to work (see `../shared/ENVIRONMENT.md`):
//! 1. rustup nightly with the `rust-src` component (the usual aya route);
//! 2. Debian's `rustc-web` + `rust-web-src` (a rustc whose sysroot carries the core
//!    sources) driven by the rustup cargo with `RUSTC_BOOTSTRAP=1`.
//!
//! Both need `bpf-linker`. When neither route is present, route 2 is installed (it needs
//! only Debian's and crates.io's registries).

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{bail, Context, Result};

use crate::util::{self, cargo, run, which};

const DEBIAN_RUSTC: &str = "/usr/bin/rustc";
const DEBIAN_RUST_SRC: &str = "/usr/lib/rustlib/src/rust/library";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

enum Route {
    Nightly,
    Debian,
}

fn nightly_has_rust_src() -> bool {
    let out = Command::new("rustc")
        .args(["+nightly", "--print", "sysroot"])
        .env_remove("RUSTUP_TOOLCHAIN")
        .output();
    match out {
        Ok(o) if o.status.success() => {
            let sysroot = String::from_utf8_lossy(&o.stdout).trim().to_string();
            Path::new(&sysroot)
                .join("lib/rustlib/src/rust/library/core")
                .is_dir()
        }
        _ => false,
    }
}

fn debian_route_present() -> bool {
    Path::new(DEBIAN_RUSTC).is_file() && Path::new(DEBIAN_RUST_SRC).join("core").is_dir()
}

fn pick_route() -> Result<Route> {
    if debian_route_present() {
        return Ok(Route::Debian);
    }
    if nightly_has_rust_src() {
        return Ok(Route::Nightly);
    }
    eprintln!("xtask: no eBPF toolchain found (nightly + rust-src, or Debian rustc-web + rust-web-src); installing the Debian one");
    util::apt_install(&["rustc-web", "rust-web-src", "llvm-22-dev"]).context(
        "cannot install the eBPF toolchain; run: apt-get update && apt-get install -y rustc-web rust-web-src llvm-22-dev",
    )?;
    if debian_route_present() {
        Ok(Route::Debian)
    } else {
        bail!("installed rustc-web/rust-web-src but {DEBIAN_RUST_SRC} is missing")
    }
}

fn ensure_bpf_linker(route: &Route) -> Result<()> {
    if which("bpf-linker").is_some() || home_cargo_bin("bpf-linker").is_file() {
        return Ok(());
    }
    eprintln!("xtask: installing bpf-linker (about a minute)");
    let mut c = cargo();
    c.args(["install", "bpf-linker", "--version", "0.13.0", "--locked"]);
    if matches!(route, Route::Debian) || Path::new(LLVM_PREFIX).is_dir() {
        util::apt_install(&["llvm-22-dev"])?;
        c.env("LLVM_PREFIX", LLVM_PREFIX);
    }
    run(&mut c).context(
        "cannot install bpf-linker; run: LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker",
    )
}

fn home_cargo_bin(name: &str) -> PathBuf {
    let home = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo")
        });
    home.join("bin").join(name)
}

/// Builds the eBPF object; returns its path.
pub fn build_ebpf() -> Result<PathBuf> {
    let route = pick_route()?;
    ensure_bpf_linker(&route)?;
    let dir = util::root().join("fsmon-ebpf");
    let mut c = cargo();
    match route {
        Route::Nightly => {
            c.arg("+nightly");
        }
        Route::Debian => {
            c.env("RUSTC", DEBIAN_RUSTC).env("RUSTC_BOOTSTRAP", "1");
        }
    }
    // bpf-linker may live in ~/.cargo/bin without it being on PATH.
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths: Vec<PathBuf> = std::env::split_paths(&path).collect();
    if let Some(bin) = home_cargo_bin("bpf-linker").parent() {
        paths.push(bin.to_path_buf());
    }
    c.env("PATH", std::env::join_paths(paths)?);
    c.current_dir(&dir).args(["build", "--release", "--locked"]);
    run(&mut c).context("building the eBPF programs")?;
    let obj = dir.join("target/bpfel-unknown-none/release/fsmon");
    if !obj.is_file() {
        bail!("the eBPF build finished but {} is missing", obj.display());
    }
    Ok(obj)
}

/// Builds the eBPF object and `target/release/fsmon` with it embedded; returns the binary.
pub fn build_all() -> Result<PathBuf> {
    let obj = build_ebpf()?;
    run(cargo()
        .current_dir(util::root())
        .args(["build", "--release", "-p", "fsmon"])
        .env("FSMON_EBPF_OBJECT", &obj))
    .context("building fsmon")?;
    Ok(util::root().join("target/release/fsmon"))
}
