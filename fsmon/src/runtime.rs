//! The container-runtime boundary: the only module that talks to Docker (via bollard).
//!
//! Each engine (`--docker-host`, repeatable) gets a background task that connects, reads
//! the engine's data root, streams its container events (names and images, so that a
//! `container_start` rarely has to ask), and reconnects with backoff when the engine is
//! down or restarts — never fatal. Upperdirs are resolved from the engine's on-disk layer
//! metadata (microseconds, usable while a container is frozen), with the inspect API as
//! the fallback.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::Duration,
};

use bollard::{
    container::{InspectContainerOptions, ListContainersOptions},
    system::EventsOptions,
    Docker, API_DEFAULT_VERSION,
};
use futures_util::StreamExt;
use tokio::sync::mpsc;

use crate::watcher::ContainerLayer;

/// Name and image of a container, when the engine told us.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerMeta {
    /// Container name without the leading `/`.
    pub name: Option<String>,
    /// Image as the user named it.
    pub image: Option<String>,
}

/// What an engine task reports to the daemon's event loop.
#[derive(Debug)]
pub enum RuntimeEvent {
    /// Connected (first time or again).
    Connected {
        /// Engine index (order of `--docker-host`).
        engine: usize,
        /// The engine's URL.
        url: String,
    },
    /// Lost the engine; reconnecting.
    Disconnected {
        /// Engine index.
        engine: usize,
        /// The engine's URL.
        url: String,
        /// Why.
        error: String,
    },
}

#[derive(Default)]
struct EngineState {
    docker: Option<Docker>,
    root: Option<PathBuf>,
    meta: HashMap<String, ContainerMeta>,
}

/// All configured engines.
#[derive(Clone)]
pub struct Runtime {
    engines: Arc<Vec<(String, Mutex<EngineState>)>>,
}

fn connect(url: &str) -> Result<Docker, bollard::errors::Error> {
    if url.starts_with("unix://") || url.starts_with('/') {
        Docker::connect_with_unix(url, 30, API_DEFAULT_VERSION)
    } else {
        Docker::connect_with_http(url, 30, API_DEFAULT_VERSION)
    }
}

impl Runtime {
    /// Starts one connection task per URL; they report through `events`.
    pub fn start(urls: &[String], events: mpsc::UnboundedSender<RuntimeEvent>) -> Self {
        let rt = Runtime {
            engines: Arc::new(
                urls.iter()
                    .map(|u| (u.clone(), Mutex::new(EngineState::default())))
                    .collect(),
            ),
        };
        for i in 0..urls.len() {
            let rt2 = rt.clone();
            let tx = events.clone();
            tokio::spawn(async move { rt2.engine_task(i, tx).await });
        }
        rt
    }

    fn state(&self, engine: usize) -> std::sync::MutexGuard<'_, EngineState> {
        // A poisoned lock only means another task panicked mid-update of a cache: the
        // data is still usable.
        self.engines[engine]
            .1
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Number of engines.
    pub fn len(&self) -> usize {
        self.engines.len()
    }

    /// Whether no engine is configured.
    pub fn is_empty(&self) -> bool {
        self.engines.is_empty()
    }

    async fn engine_task(self, engine: usize, tx: mpsc::UnboundedSender<RuntimeEvent>) {
        let url = self.engines[engine].0.clone();
        let mut backoff = Duration::from_millis(200);
        let mut said_down = false;
        loop {
            match self.connect_once(engine, &url).await {
                Ok(docker) => {
                    backoff = Duration::from_millis(200);
                    said_down = false;
                    let _ = tx.send(RuntimeEvent::Connected {
                        engine,
                        url: url.clone(),
                    });
                    let err = self.follow_events(engine, &docker).await;
                    self.state(engine).docker = None;
                    let _ = tx.send(RuntimeEvent::Disconnected {
                        engine,
                        url: url.clone(),
                        error: err,
                    });
                }
                Err(e) => {
                    if !said_down {
                        said_down = true;
                        let _ = tx.send(RuntimeEvent::Disconnected {
                            engine,
                            url: url.clone(),
                            error: e,
                        });
                    }
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    async fn connect_once(&self, engine: usize, url: &str) -> Result<Docker, String> {
        let docker = connect(url).map_err(|e| e.to_string())?;
        let info = docker.info().await.map_err(|e| e.to_string())?;
        let mut st = self.state(engine);
        st.root = info.docker_root_dir.map(PathBuf::from);
        st.docker = Some(docker.clone());
        Ok(docker)
    }

    async fn follow_events(&self, engine: usize, docker: &Docker) -> String {
        let mut filters = HashMap::new();
        filters.insert("type".to_string(), vec!["container".to_string()]);
        let mut stream = docker.events(Some(EventsOptions::<String> {
            filters,
            ..Default::default()
        }));
        while let Some(ev) = stream.next().await {
            let ev = match ev {
                Ok(ev) => ev,
                Err(e) => return e.to_string(),
            };
            let (Some(action), Some(actor)) = (ev.action, ev.actor) else {
                continue;
            };
            let (Some(id), Some(attrs)) = (actor.id, actor.attributes) else {
                continue;
            };
            let mut st = self.state(engine);
            match action.as_str() {
                "destroy" => {
                    st.meta.remove(&id);
                }
                "create" | "start" | "rename" | "restart" => {
                    let meta = ContainerMeta {
                        name: attrs.get("name").cloned(),
                        image: attrs.get("image").cloned(),
                    };
                    st.meta.insert(id, meta);
                }
                _ => {}
            }
        }
        "event stream ended".into()
    }

    /// Finds a container's layer from the engines' on-disk metadata (no API call).
    /// `Err` only when descriptors ran out (the container may well be there).
    pub fn layer_on_disk(&self, id: &str) -> std::io::Result<Option<(usize, ContainerLayer)>> {
        for engine in 0..self.engines.len() {
            let root = self.state(engine).root.clone();
            let Some(root) = root else { continue };
            if let Some(layer) = overlay2_layer(&root, id)? {
                return Ok(Some((engine, layer)));
            }
        }
        Ok(None)
    }

    /// Name and image from the engines' caches, without asking (for records about a
    /// container that could not be armed).
    pub fn cached_meta(&self, id: &str) -> ContainerMeta {
        (0..self.engines.len())
            .find_map(|e| self.state(e).meta.get(id).cloned())
            .unwrap_or_default()
    }

    /// Finds a container's layer through the inspect API (fallback; milliseconds; run as
    /// a task, never on the event loop). `Ok(None)`: every engine answered and none knows
    /// it; `Err`: an engine could not answer (not connected yet, down, or no descriptor
    /// left for the request), so it may be one of its containers.
    pub async fn layer_by_inspect(
        &self,
        id: &str,
    ) -> Result<Option<(usize, ContainerLayer, ContainerMeta)>, String> {
        let mut failed = None;
        for engine in 0..self.engines.len() {
            let Some(docker) = self.state(engine).docker.clone() else {
                failed = Some(format!("{}: not connected", self.engines[engine].0));
                continue;
            };
            let info = match docker
                .inspect_container(id, None::<InspectContainerOptions>)
                .await
            {
                Ok(info) => info,
                Err(bollard::errors::Error::DockerResponseServerError {
                    status_code: 404, ..
                }) => continue,
                Err(e) => {
                    failed = Some(format!("{}: {e}", self.engines[engine].0));
                    continue;
                }
            };
            let meta = ContainerMeta {
                name: info.name.map(|n| n.trim_start_matches('/').to_owned()),
                image: info.config.and_then(|c| c.image),
            };
            let data = info.graph_driver.map(|g| g.data).unwrap_or_default();
            let Some(upper) = data.get("UpperDir") else {
                return Ok(None);
            };
            let lowerdirs = data
                .get("LowerDir")
                .map(|l| {
                    l.split(':')
                        .filter(|s| !s.is_empty())
                        .map(PathBuf::from)
                        .collect()
                })
                .unwrap_or_default();
            let layer = ContainerLayer {
                upperdir: PathBuf::from(upper),
                lowerdirs,
            };
            self.state(engine).meta.insert(id.to_owned(), meta.clone());
            return Ok(Some((engine, layer, meta)));
        }
        failed.map_or(Ok(None), Err)
    }

    /// Name and image without asking an engine: from the event cache when complete,
    /// else from the engine's own record of the container (`config.v2.json`, known also
    /// while the engine is down or restarting). `engine: None`: any engine that knows it.
    pub fn meta_on_disk(&self, engine: Option<usize>, id: &str) -> Option<ContainerMeta> {
        let engines = match engine {
            Some(e) => e..e + 1,
            None => 0..self.engines.len(),
        };
        for engine in engines {
            if let Some(m) = self.state(engine).meta.get(id) {
                if m.name.is_some() && m.image.is_some() {
                    return Some(m.clone());
                }
            }
            let root = self.state(engine).root.clone();
            if let Some(meta) = root.as_deref().and_then(|r| config_v2_meta(r, id)) {
                self.state(engine).meta.insert(id.to_owned(), meta.clone());
                return Some(meta);
            }
        }
        None
    }

    /// Name and image, asked for (bounded by `timeout`): from `engine` or the first
    /// engine that knows the container, by the inspect API, or from disk once an engine
    /// that was not connected yet tells where its files are. Runs as a task, never on the
    /// event loop; default (nulls) at the bound.
    pub async fn meta_by_inspect(
        &self,
        engine: Option<usize>,
        id: &str,
        timeout: Duration,
    ) -> ContainerMeta {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some(meta) = self.meta_on_disk(engine, id) {
                return meta;
            }
            let engines = match engine {
                Some(e) => e..e + 1,
                None => 0..self.engines.len(),
            };
            for engine in engines {
                let Some(docker) = self.state(engine).docker.clone() else {
                    continue;
                };
                let fut = docker.inspect_container(id, None::<InspectContainerOptions>);
                if let Ok(Ok(info)) = tokio::time::timeout_at(deadline, fut).await {
                    let meta = ContainerMeta {
                        name: info.name.map(|n| n.trim_start_matches('/').to_owned()),
                        image: info.config.and_then(|c| c.image),
                    };
                    self.state(engine).meta.insert(id.to_owned(), meta.clone());
                    return meta;
                }
            }
            if tokio::time::Instant::now() + Duration::from_millis(100) >= deadline {
                return ContainerMeta::default();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Ids of the containers running now on engine `engine` (empty when it is down).
    pub async fn running(&self, engine: usize) -> Vec<String> {
        let Some(docker) = self.state(engine).docker.clone() else {
            return Vec::new();
        };
        let opts = ListContainersOptions::<String> {
            all: false,
            ..Default::default()
        };
        match docker.list_containers(Some(opts)).await {
            Ok(list) => {
                let mut st = self.state(engine);
                list.into_iter()
                    .filter_map(|c| {
                        let id = c.id?;
                        let name = c
                            .names
                            .and_then(|n| n.first().map(|n| n.trim_start_matches('/').to_owned()));
                        st.meta.insert(
                            id.clone(),
                            ContainerMeta {
                                name,
                                image: c.image,
                            },
                        );
                        Some(id)
                    })
                    .collect()
            }
            Err(e) => {
                tracing::warn!(engine, error = %e, "cannot list running containers");
                Vec::new()
            }
        }
    }
}

/// Reads Docker's overlay2 metadata: `image/overlay2/layerdb/mounts/<id>/mount-id` names
/// the layer directory, whose `diff` is the upperdir and whose `lower` file lists the
/// lower layers as `l/<short>` links. These files are the engine's own, not container
/// content. `Ok(None)`: not a container of this engine; `Err`: descriptors ran out.
pub fn overlay2_layer(root: &Path, id: &str) -> std::io::Result<Option<ContainerLayer>> {
    let Some(id) = crate::id::ContainerId::parse_canonical(id) else {
        return Ok(None);
    };
    let id = id.as_str();
    let Some(mount_id) = read_engine_file(
        &root
            .join("image/overlay2/layerdb/mounts")
            .join(id)
            .join("mount-id"),
    )?
    else {
        return Ok(None);
    };
    let mount_id = mount_id.trim();
    if mount_id.is_empty() || mount_id.contains('/') || mount_id.starts_with('.') {
        return Ok(None);
    }
    let layer_dir = root.join("overlay2").join(mount_id);
    let upperdir = layer_dir.join("diff");
    if !upperdir.is_dir() {
        return Ok(None);
    }
    let lowerdirs = read_engine_file(&layer_dir.join("lower"))?
        .map(|s| parse_lower(&root.join("overlay2"), &s))
        .unwrap_or_default();
    Ok(Some(ContainerLayer {
        upperdir,
        lowerdirs,
    }))
}

/// Reads one of the engine's small metadata files: `None` when it cannot be read, an
/// error only when descriptors ran out.
fn read_engine_file(path: &Path) -> std::io::Result<Option<String>> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if crate::limits::is_fd_exhaustion(&e) => Err(e),
        Err(_) => Ok(None),
    }
}

/// Name and image from Docker's on-disk container config,
/// `<root>/containers/<id>/config.v2.json` (`Name`, `Config.Image`), written when the
/// container is created. `None` when absent, oversized, or without both.
pub fn config_v2_meta(root: &Path, id: &str) -> Option<ContainerMeta> {
    use std::io::Read as _;
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(rename = "Image")]
        image: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct V2 {
        #[serde(rename = "Name")]
        name: Option<String>,
        #[serde(rename = "Config")]
        config: Option<Config>,
    }
    const MAX: u64 = 4 << 20;
    let id = crate::id::ContainerId::parse_canonical(id)?;
    let f = std::fs::File::open(
        root.join("containers")
            .join(id.as_str())
            .join("config.v2.json"),
    )
    .ok()?;
    let mut bytes = Vec::new();
    f.take(MAX + 1).read_to_end(&mut bytes).ok()?;
    if bytes.len() as u64 > MAX {
        return None;
    }
    let v: V2 = serde_json::from_slice(&bytes).ok()?;
    let ok = |s: Option<String>| s.filter(|s| !s.is_empty() && s.len() <= 1024);
    let meta = ContainerMeta {
        name: ok(v.name.map(|n| n.trim_start_matches('/').to_owned())),
        image: ok(v.config.and_then(|c| c.image)),
    };
    (meta.name.is_some() && meta.image.is_some()).then_some(meta)
}

/// Resolves overlay2's `lower` file (`l/ABC:l/DEF`, top-most first) to layer `diff` dirs.
pub(crate) fn parse_lower(overlay2: &Path, text: &str) -> Vec<PathBuf> {
    text.trim()
        .split(':')
        .filter(|s| !s.is_empty())
        .filter_map(|short| {
            let link = overlay2.join(short.trim_start_matches('/'));
            let target = std::fs::read_link(&link).ok()?;
            let resolved = link.parent()?.join(target);
            // `l/ABC -> ../<layer>/diff`; normalise without touching the file system.
            let mut out = PathBuf::new();
            for c in resolved.components() {
                match c {
                    std::path::Component::ParentDir => {
                        out.pop();
                    }
                    c => out.push(c),
                }
            }
            out.starts_with(overlay2).then_some(out)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_config_v2() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let id = "c".repeat(64);
        let dir = tmp.path().join("containers").join(&id);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(
            dir.join("config.v2.json"),
            br#"{"ID":"cc","Name":"/web","Config":{"Image":"nginx:1.27","Cmd":["x"]},"State":{}}"#,
        )
        .expect("write");
        assert_eq!(
            config_v2_meta(tmp.path(), &id),
            Some(ContainerMeta {
                name: Some("web".into()),
                image: Some("nginx:1.27".into())
            })
        );
        std::fs::write(dir.join("config.v2.json"), br#"{"Name":"/web"}"#).expect("write");
        assert_eq!(config_v2_meta(tmp.path(), &id), None, "both or neither");
        assert_eq!(config_v2_meta(tmp.path(), "../../etc"), None);
        assert_eq!(config_v2_meta(tmp.path(), &"d".repeat(64)), None);
    }

    #[test]
    fn reads_overlay2_metadata() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let root = tmp.path();
        let id = "a".repeat(64);
        let mounts = root.join("image/overlay2/layerdb/mounts").join(&id);
        std::fs::create_dir_all(&mounts).expect("mkdir");
        std::fs::write(mounts.join("mount-id"), "m1").expect("write");
        let o2 = root.join("overlay2");
        for d in ["m1/diff", "m1-init/diff", "base/diff", "l"] {
            std::fs::create_dir_all(o2.join(d)).expect("mkdir");
        }
        std::os::unix::fs::symlink("../m1-init/diff", o2.join("l/AAA")).expect("symlink");
        std::os::unix::fs::symlink("../base/diff", o2.join("l/BBB")).expect("symlink");
        std::fs::write(o2.join("m1/lower"), "l/AAA:l/BBB").expect("write");
        let layer = overlay2_layer(root, &id).expect("read").expect("layer");
        assert_eq!(layer.upperdir, o2.join("m1/diff"));
        assert_eq!(
            layer.lowerdirs,
            vec![o2.join("m1-init/diff"), o2.join("base/diff")]
        );
        assert!(overlay2_layer(root, &"b".repeat(64))
            .expect("read")
            .is_none());
        assert!(overlay2_layer(root, "../../etc").expect("read").is_none());
    }
}
