//! fsmon: a container-aware, lossless file-system change monitor.
//!
//! The binary (`main.rs`) is a thin CLI over [`daemon::run`]; everything is a library so
//! that the privileged integration tests in `tests/` can drive the same code.
//! See `ARCHITECTURE.md` at the repository root for the map and the invariants.

pub mod cgroup;
pub mod daemon;
pub mod ebpf;
pub mod event;
pub mod filter;
pub mod freezer;
pub mod gate;
pub mod id;
pub mod limits;
pub mod output;
pub mod overlay;
pub mod record;
pub mod runtime;
pub mod runtimes;
pub mod stats;
pub mod watcher;
