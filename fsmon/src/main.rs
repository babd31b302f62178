//! The `fsmon` command line: parses arguments, sets up logging to stderr, and runs the
//! daemon until SIGINT/SIGTERM (or until the reader of its output goes away). A bad
//! command line is one `fsmon: error: …` line and exit status 2; a fatal error at run time
//! is one such line and exit status 1.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand};
use fsmon::{
    daemon::{self, Config, OutputTarget},
    runtimes::Places,
};

/// Container-aware, lossless file-system change monitor for Linux container hosts.
///
/// Reports every file each container changes in its own writable layer, from its first
/// instruction to its last, as JSON Lines.
#[derive(Parser, Debug)]
#[command(
    name = "fsmon",
    version,
    about,
    long_about,
    after_help = "Examples:\n  fsmon run                                  # records on stdout, logs on stderr\n  fsmon run --output /var/log/fsmon.jsonl    # appended, mode 0600, reopened on SIGHUP\n  fsmon run | jq -c 'select(.kind == \"create\")'\n\nRecords are documented in docs/events.md; `fsmon run --help` lists every option."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the daemon: JSON Lines records to --output, logs to stderr. Needs root.
    #[command(after_help = RUN_EXAMPLES)]
    Run(RunArgs),
    /// Show where fsmon finds the writable layer of running containers, and how long that
    /// takes: one JSON line per cgroup (as `/proc/<pid>/cgroup` names it, e.g.
    /// `/default/<id>`, `/libpod_parent/libpod-<id>`). Reads the runtimes' files only.
    Resolve(ResolveArgs),
}

#[derive(clap::Args, Debug)]
struct ResolveArgs {
    /// Container cgroups, relative to the cgroup hierarchy's root.
    #[arg(required = true, value_name = "CGROUP")]
    cgroups: Vec<String>,

    /// Resolve each this many times and report the median and minimum cost.
    #[arg(long, value_name = "N", default_value_t = 1)]
    repeat: u32,

    /// Docker data root (overlay2 `layerdb`).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/docker")]
    docker_root: PathBuf,

    #[command(flatten)]
    places: PlacesArgs,
}

/// Where the container runtimes keep their state.
#[derive(clap::Args, Debug)]
struct PlacesArgs {
    /// State directory of a containerd whose containers (ctr, nerdctl, Kubernetes CRI) to
    /// report, as its `--state`/`state =`; repeatable. [default: /run/containerd]
    ///
    /// Example: --containerd-state /run/containerd --containerd-state /run/k3s/containerd
    #[arg(long = "containerd-state", value_name = "DIR")]
    containerd_state: Vec<PathBuf>,

    /// Graph root of containers/storage (podman, and CRI-O's layers).
    ///
    /// Example: --containers-storage /var/lib/containers/storage
    #[arg(
        long,
        value_name = "DIR",
        default_value = "/var/lib/containers/storage"
    )]
    containers_storage: PathBuf,

    /// Run root of containers/storage (CRI-O's bundles).
    ///
    /// Example: --containers-runroot /run/containers/storage
    #[arg(long, value_name = "DIR", default_value = "/run/containers/storage")]
    containers_runroot: PathBuf,
}

const RUN_EXAMPLES: &str = "Examples:
  fsmon run
  fsmon run -H unix:///var/run/docker.sock -H unix:///var/run/docker-v2.sock
  fsmon run --output /var/log/fsmon.jsonl --log-format json --stats-interval 300
  fsmon run | jq -c 'select(.kind == \"delete\") | {id: .container.id, path}'

Records are documented in docs/events.md. SIGINT/SIGTERM: drain and exit 0. SIGHUP: reopen
--output (for logrotate). A reader that closes the stream (`fsmon run | head -3`) ends
fsmon like SIGTERM.";

/// How log lines on stderr look.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum LogFormat {
    /// One human-readable line per event.
    Text,
    /// One JSON object per line (for journald/Fluent Bit/Vector).
    Json,
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// Docker engine to follow; repeat for several engines on one host.
    /// [default: $DOCKER_HOST, else unix:///var/run/docker.sock]
    ///
    /// Example: --docker-host unix:///var/run/docker.sock --docker-host unix:///var/run/docker-v2.sock
    #[arg(long = "docker-host", short = 'H', value_name = "URL")]
    docker_host: Vec<String>,

    /// Where records go: a file path or - for stdout. A file is appended to, created with
    /// mode 0600, and reopened on SIGHUP (logrotate: move it away, then SIGHUP).
    ///
    /// Example: --output /var/log/fsmon.jsonl
    #[arg(long, short = 'o', value_name = "PATH|-", default_value = "-")]
    output: String,

    /// Do not freeze starting containers while their watch is armed (arm and scan only;
    /// the first milliseconds of a container may then be reported by scan or missed).
    ///
    /// Example: --no-freeze
    #[arg(long)]
    no_freeze: bool,

    /// Longest time a starting container may stay frozen, in milliseconds; past it the
    /// container is thawed and arming finishes without the freeze.
    ///
    /// Example: --freeze-timeout 50
    #[arg(long, value_name = "MS", default_value_t = 100)]
    freeze_timeout: u64,

    /// Do not stop a starting container's tasks at exec while its watch is armed (the exec
    /// gate); a starved fsmon then relies on the late-arm scan, which cannot see a file
    /// made and deleted before the watch.
    ///
    /// Example: --no-gate
    #[arg(long)]
    no_gate: bool,

    /// Longest time the exec gate holds a starting container's task, in milliseconds; past
    /// it the task is resumed and arming finishes without the gate.
    ///
    /// Example: --gate-timeout 2000
    #[arg(long, value_name = "MS", default_value_t = 2000)]
    gate_timeout: u64,

    /// Directory (on tmpfs) where in-flight freezes and gated tasks are recorded, so that a
    /// restarted fsmon thaws and resumes what a killed one left held.
    ///
    /// Example: --state-dir /run/fsmon
    #[arg(long, value_name = "DIR", default_value = "/run/fsmon")]
    state_dir: PathBuf,

    /// Scheduling niceness of the daemon (-20..19). fsmon reacts to a container's cgroup
    /// appearing while runc sets the container up; a busy host must not make it late.
    ///
    /// Example: --nice -5
    #[arg(long, value_name = "N", default_value_t = -10, allow_hyphen_values = true,
          value_parser = clap::value_parser!(i32).range(-20..=19))]
    nice: i32,

    #[command(flatten)]
    places: PlacesArgs,

    /// Seconds between two `stats` records (counters since start); 0 prints one only at
    /// exit.
    ///
    /// Example: --stats-interval 300
    #[arg(long, value_name = "SECONDS", default_value_t = 60)]
    stats_interval: u64,

    /// Log filter for stderr (error, warn, info, debug, trace, or a tracing filter such as
    /// `fsmon=debug`).
    ///
    /// Example: --log-level warn
    #[arg(long, value_name = "FILTER", env = "FSMON_LOG", default_value = "info")]
    log_level: String,

    /// Monitor only the containers that match (docker-CLI style): `id=` (prefix), `name=`,
    /// `image=` (`nginx` matches any tag), `runtime=`, `namespace=`, `pod=`. Repeat: the
    /// same key ORs, different keys AND. A container that does not match is not armed at
    /// all (no freeze, no watch). `id` is decided before anything else; `name`/`image`
    /// from the engine's cached metadata, else once it is known (then the container was
    /// briefly armed, but nothing of it is printed).
    ///
    /// Example: --filter name=web --filter name=api --filter image=nginx
    #[arg(long, value_name = "KEY=VALUE")]
    filter: Vec<String>,

    /// Do not monitor the containers that match (same keys and rules as --filter).
    ///
    /// Example: --exclude name=fsmon --exclude id=3f2a
    #[arg(long, value_name = "KEY=VALUE")]
    exclude: Vec<String>,

    /// Print only file records whose container path matches a glob (`*` within a
    /// component, `**` any depth, `?` one character); repeatable. A rename matches by
    /// either path.
    ///
    /// Example: --path '/etc/**' --path '/usr/bin/*'
    #[arg(long, value_name = "GLOB")]
    path: Vec<String>,

    /// Do not print file records whose container path matches a glob; repeatable.
    ///
    /// Example: --exclude-path '/tmp/**'
    #[arg(long, value_name = "GLOB")]
    exclude_path: Vec<String>,

    /// Print only these file record kinds (create, modify, attrib, delete, rename); comma
    /// separated or repeated. Container and daemon records are always printed.
    ///
    /// Example: --kind create,delete
    #[arg(long, value_name = "KINDS")]
    kind: Vec<String>,

    /// Format of the log lines on stderr.
    ///
    /// Example: --log-format json
    #[arg(long, value_name = "FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    match cli.command {
        Command::Run(args) => run(args),
        Command::Resolve(args) => resolve(&args),
    }
}

/// `--help` and `--version` as clap prints them; any other command-line error as one
/// line (scripts and systemd's journal show one line well), exit status 2.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return if e.kind() == ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand {
            ExitCode::from(2)
        } else {
            ExitCode::SUCCESS
        };
    }
    eprintln!("fsmon: error: {} (see fsmon run --help)", one_line(e));
    ExitCode::from(2)
}

/// clap's message without its `error: ` prefix, usage block and tips, on one line.
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let mut parts = Vec::new();
    for l in text.lines() {
        let l = l.trim();
        if l.starts_with("Usage:") || l.starts_with("For more information") {
            break;
        }
        if !l.is_empty() {
            parts.push(l.strip_prefix("error: ").unwrap_or(l).to_owned());
        }
    }
    parts.join(" ")
}

fn run(args: RunArgs) -> ExitCode {
    let filters = fsmon::filter::ContainerFilter::parse(&args.filter, &args.exclude)
        .map_err(|e| e.to_string())
        .and_then(|f| {
            if args.filter.iter().chain(&args.exclude).any(|a| a.starts_with("label=")) {
                Err("label filters are not supported yet: fsmon does not collect the engines' labels".into())
            } else {
                Ok(f)
            }
        });
    let records = fsmon::filter::RecordFilter::parse(&args.path, &args.exclude_path, &args.kind);
    let (containers, records) = match (filters, records) {
        (Ok(c), Ok(r)) => (c, r),
        (Err(e), _) => {
            eprintln!("fsmon: error: --filter/--exclude: {e} (see fsmon run --help)");
            return ExitCode::from(2);
        }
        (_, Err(e)) => {
            eprintln!("fsmon: error: {e} (see fsmon run --help)");
            return ExitCode::from(2);
        }
    };
    let filter = match tracing_subscriber::EnvFilter::try_new(&args.log_level) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "fsmon: error: invalid --log-level {:?}: {e} (see fsmon run --help)",
                args.log_level
            );
            return ExitCode::from(2);
        }
    };
    use std::io::IsTerminal as _;
    let logs = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter)
        .with_target(false);
    match args.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().with_ansi(false).init(),
    }

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
    let places = places(&args.places);
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
        places,
        stats_interval: Duration::from_secs(args.stats_interval),
        containers,
        records,
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

fn places(args: &PlacesArgs) -> Places {
    let default = Places::default();
    Places {
        containerd_states: if args.containerd_state.is_empty() {
            default.containerd_states
        } else {
            args.containerd_state.clone()
        },
        containers_storage: args.containers_storage.clone(),
        containers_runroot: args.containers_runroot.clone(),
        ..default
    }
}

fn resolve(args: &ResolveArgs) -> ExitCode {
    let places = places(&args.places);
    let mut failed = false;
    for cgroup in &args.cgroups {
        let line = fsmon::runtimes::report::resolve_line(
            cgroup,
            &places,
            &args.docker_root,
            args.repeat.max(1),
        );
        failed |= line.get("error").is_some();
        println!("{line}");
    }
    if failed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
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
