//! fsmon's task runner: `cargo xtask <build-ebpf|build|run|test|engines|bench|image>`.
//!
//! Everything a newcomer or CI needs is here, so that one command (`cargo xtask test`)
//! installs what is missing, starts the Docker engines the tests need, builds, and runs
//! every test tier.

mod bench;
mod coverage;
mod ebpf;
mod engines;
mod fairness;
mod image;
mod plots;
mod report;
mod stats;
mod util;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run, test and benchmark fsmon")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Build the eBPF object (installs the eBPF toolchain when none is present).
    BuildEbpf,
    /// Build the eBPF object and target/release/fsmon with it embedded.
    Build,
    /// Build, then run target/release/fsmon with the given arguments (needs root).
    Run {
        /// Arguments for fsmon, after `--`.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Install what is missing, start a cgroup v1 and a cgroup v2 Docker engine, build,
    /// and run every test tier (1: unit; 2: real overlay mounts; 3: real Docker engines).
    Test(engines::TestArgs),
    /// Start the two test engines (if not running) and leave them running.
    Engines,
    /// Measure start-latency overhead, first-instruction completeness, detection latency,
    /// throughput and memory side by side with the baseline (root; starts the engines).
    Bench(bench::BenchArgs),
    /// Build the fsmon container image from local files (deploy/Dockerfile, FROM scratch;
    /// no registry).
    Image(image::ImageArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::BuildEbpf => ebpf::build_ebpf().map(|_| ()),
        Cmd::Build => ebpf::build_all().map(|_| ()),
        Cmd::Run { args } => {
            let bin = ebpf::build_all()?;
            util::require_root("cargo xtask run")?;
            let status = std::process::Command::new(&bin).args(&args).status()?;
            std::process::exit(status.code().unwrap_or(1));
        }
        Cmd::Test(args) => engines::test(&args),
        Cmd::Engines => engines::start_engines().map(|_| ()),
        Cmd::Bench(args) => bench::bench(&args),
        Cmd::Image(args) => image::build(&args.docker_host).map(|_| ()),
    }
}
