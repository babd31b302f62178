//! Embeds the eBPF object built by `cargo xtask build-ebpf` when it exists.
//!
//! Without it (a plain `cargo build`/`cargo test`/`cargo clippy`), fsmon still builds, and
//! `fsmon run` fails with a clear message telling the user to build through the xtask.

use std::path::PathBuf;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(fsmon_ebpf_embedded)");
    println!("cargo:rerun-if-env-changed=FSMON_EBPF_OBJECT");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let obj = std::env::var_os("FSMON_EBPF_OBJECT")
        .map(PathBuf::from)
        .unwrap_or_else(|| manifest.join("../fsmon-ebpf/target/bpfel-unknown-none/release/fsmon"));
    println!("cargo:rerun-if-changed={}", obj.display());
    if obj.is_file() {
        println!("cargo:rustc-cfg=fsmon_ebpf_embedded");
        println!("cargo:rustc-env=FSMON_EBPF_OBJECT={}", obj.display());
    } else {
        println!(
            "cargo:warning=eBPF object not found at {}; build with `cargo xtask build`",
            obj.display()
        );
    }
}
