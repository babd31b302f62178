//! The `fsmon` command line: parses arguments, sets up logging to stderr, and runs the
//! daemon until SIGINT/SIGTERM. Fatal errors end with one clear line on stderr and a
//! non-zero exit status.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use fsmon::daemon::{self, Config, OutputTarget};

/// Container-aware, lossless file-system change monitor for Linux container hosts.
///
/// Reports every file each container changes in its own writable layer, from its first
/// instruction to its last, as JSON Lines.
#[derive(Parser, Debug)]
#[command(name = "fsmon", version, about, long_about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: JSON Lines records to --output, logs to stderr. Needs root.
    Run(RunArgs),
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Docker engine to follow; repeat for several engines on one host.
    /// [default: $DOCKER_HOST, else unix:///var/run/docker.sock]
    #[arg(long = "docker-host", short = 'H', value_name = "URL")]
    docker_host: Vec<String>,

    /// Where records go: a file path (appended to) or - for stdout.
    #[arg(long, short = 'o', value_name = "PATH|-", default_value = "-")]
    output: String,

    /// Do not freeze starting containers while their watch is armed (arm and scan only;
    /// the first milliseconds of a container may then be reported by scan or missed).
    #[arg(long)]
    no_freeze: bool,

    /// Longest time a starting container may stay frozen, in milliseconds; past it the
    /// container is thawed and arming finishes without the freeze.
    #[arg(long, value_name = "MS", default_value_t = 100)]
    freeze_timeout: u64,

    /// Do not stop a starting container's tasks at exec while its watch is armed (the exec
    /// gate); a starved fsmon then relies on the late-arm scan, which cannot see a file
    /// made and deleted before the watch.
    #[arg(long)]
    no_gate: bool,

    /// Longest time the exec gate holds a starting container's task, in milliseconds; past
    /// it the task is resumed and arming finishes without the gate.
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    gate_timeout: u64,

    /// Directory (on tmpfs) where in-flight freezes and gated tasks are recorded, so that a
    /// restarted fsmon thaws and resumes what a killed one left held.
    #[arg(long, value_name = "DIR", default_value = "/run/fsmon")]
    state_dir: PathBuf,

    /// Scheduling niceness of the daemon (-20..19). fsmon reacts to a container's cgroup
    /// appearing while runc sets the container up; a busy host must not make it late.
    #[arg(long, value_name = "N", default_value_t = -10, allow_hyphen_values = true)]
    nice: i32,

    /// Log filter for stderr (error, warn, info, debug, trace, or a tracing filter).
    #[arg(long, value_name = "FILTER", env = "FSMON_LOG", default_value = "info")]
    log_level: String,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run(args),
    }
}

fn run(args: RunArgs) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_new(&args.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    use std::io::IsTerminal as _;
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_env_filter(filter)
        .with_target(false)
        .init();

    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("fsmon: error: must run as root (it loads eBPF programs, freezes cgroups and watches container layers)");
        return ExitCode::from(1);
    }
    // Before any thread starts, so every thread inherits it (niceness is per thread).
    // SAFETY: setpriority has no memory-safety preconditions.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, args.nice.clamp(-20, 19)) } != 0 {
        tracing::warn!(nice = args.nice, error = %std::io::Error::last_os_error(), "cannot set the daemon's niceness");
    }
    // The soft limit a service gets (1024 under systemd) would cap how many containers
    // the watcher can cache directories for; the hard limit is ours to take.
    match fsmon::limits::raise_fd_limit() {
        Ok((before, after)) if before != after => {
            tracing::info!(
                before,
                after,
                "raised the open-file limit to the hard limit"
            );
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "cannot raise the open-file limit"),
    }
    let docker_hosts = if !args.docker_host.is_empty() {
        args.docker_host
    } else {
        vec![std::env::var("DOCKER_HOST")
            .ok()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "unix:///var/run/docker.sock".into())]
    };
    let config = Config {
        docker_hosts,
        output: if args.output == "-" {
            OutputTarget::Stdout
        } else {
            OutputTarget::File(args.output.into())
        },
        freeze: !args.no_freeze,
        freeze_timeout: Duration::from_millis(args.freeze_timeout.max(1)),
        state_dir: args.state_dir.clone(),
        gate: !args.no_gate,
        gate_timeout: Duration::from_millis(args.gate_timeout.max(1)),
        ..Config::default()
    };

    // A panic must never leave a container frozen or stopped: release everything recorded.
    let state_dir = args.state_dir;
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        fsmon::freezer::release_recorded(&state_dir);
        default_hook(info);
    }));

    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("fsmon: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match rt.block_on(daemon::run(config, shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fsmon: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the default action (exit) still applies.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {},
        _ = int.recv() => {},
    }
}
