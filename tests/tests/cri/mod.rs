//! A small CRI client: Kubernetes-style pods on containerd's CRI plugin, driven over its
//! gRPC socket the way a kubelet drives them (there is no kubelet or crictl here).
//!
//! Pods are host-network (no CNI here; an empty hostname then means the node's),
//! BestEffort, with the cgroupfs-driver parent `/kubepods/besteffort/pod<uid>`, and carry
//! the label `fsmon-test` so that [`Cri::remove_leftovers`] finds what a killed run left.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use hyper_util::rt::TokioIo;
use k8s_cri::v1::{
    runtime_service_client::RuntimeServiceClient, ContainerConfig, ContainerMetadata,
    ContainerState, ContainerStatusRequest, CreateContainerRequest, ExecSyncRequest, ImageSpec,
    LinuxContainerConfig, LinuxContainerSecurityContext, LinuxPodSandboxConfig,
    LinuxSandboxSecurityContext, ListPodSandboxRequest, NamespaceMode, NamespaceOption,
    PodSandboxConfig, PodSandboxFilter, PodSandboxMetadata, RemoveContainerRequest,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StopContainerRequest,
    StopPodSandboxRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// The label every test pod carries.
pub const LABEL: &str = "fsmon-test";

/// The cgroup parent of a BestEffort pod under the cgroupfs driver, as the kubelet names it.
pub fn cgroup_parent(uid: &str) -> String {
    format!("/kubepods/besteffort/pod{uid}")
}

/// A connection to a CRI runtime service.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

/// A pod sandbox that was run.
pub struct Pod {
    /// The sandbox id (also its pause container's id).
    pub id: String,
    /// Pod name.
    pub name: String,
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod UID.
    pub uid: String,
    config: PodSandboxConfig,
}

/// Namespaces as the kubelet asks for a host-network pod that does not share its PID
/// namespace.
fn namespaces() -> NamespaceOption {
    NamespaceOption {
        network: NamespaceMode::Node as i32,
        pid: NamespaceMode::Container as i32,
        ipc: NamespaceMode::Pod as i32,
        ..Default::default()
    }
}

fn labels() -> HashMap<String, String> {
    HashMap::from([(LABEL.to_owned(), "1".to_owned())])
}

/// A fresh pod UID (UUID-shaped, as the API server makes them).
pub fn random_uid() -> String {
    let h = fsmon_tests::random_id();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

impl Cri {
    /// Connects to the CRI service on unix socket `sock`.
    pub fn connect(sock: &str) -> Result<Cri> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let sock = sock.to_owned();
        let channel = rt
            .block_on(async move {
                // The URI is unused: every connection goes to the socket.
                Endpoint::try_from("http://[::]:50051")?
                    .connect_with_connector(tower::service_fn(move |_: Uri| {
                        let sock = sock.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(sock).await?,
                            ))
                        }
                    }))
                    .await
            })
            .context("connecting to the CRI socket")?;
        Ok(Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
        })
    }

    /// Runs a pod sandbox `namespace/name` with a fresh UID.
    pub fn run_pod(&mut self, namespace: &str, name: &str) -> Result<Pod> {
        let uid = random_uid();
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.to_owned(),
                uid: uid.clone(),
                namespace: namespace.to_owned(),
                attempt: 0,
            }),
            // Host network: the hostname must be empty (the node's is used).
            hostname: String::new(),
            labels: labels(),
            linux: Some(LinuxPodSandboxConfig {
                cgroup_parent: cgroup_parent(&uid),
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: String::new(),
        };
        let id = self
            .rt
            .block_on(self.client.run_pod_sandbox(req))
            .context("RunPodSandbox")?
            .into_inner()
            .pod_sandbox_id;
        Ok(Pod {
            id,
            name: name.to_owned(),
            namespace: namespace.to_owned(),
            uid,
            config,
        })
    }

    /// Creates container `name` of `image` running `command` in `pod`; returns its id.
    pub fn create_container(
        &mut self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String> {
        let config = ContainerConfig {
            metadata: Some(ContainerMetadata {
                name: name.to_owned(),
                attempt: 0,
            }),
            image: Some(ImageSpec {
                image: image.to_owned(),
                ..Default::default()
            }),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            labels: labels(),
            linux: Some(LinuxContainerConfig {
                security_context: Some(LinuxContainerSecurityContext {
                    namespace_options: Some(namespaces()),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.id.clone(),
            config: Some(config),
            sandbox_config: Some(pod.config.clone()),
        };
        Ok(self
            .rt
            .block_on(self.client.create_container(req))
            .context("CreateContainer")?
            .into_inner()
            .container_id)
    }

    /// Starts a created container.
    pub fn start_container(&mut self, id: &str) -> Result<()> {
        let req = StartContainerRequest {
            container_id: id.to_owned(),
        };
        self.rt
            .block_on(self.client.start_container(req))
            .context("StartContainer")?;
        Ok(())
    }

    /// Creates and starts a container; returns its id.
    pub fn run_container(
        &mut self,
        pod: &Pod,
        name: &str,
        image: &str,
        command: &[&str],
    ) -> Result<String> {
        let id = self.create_container(pod, name, image, command)?;
        self.start_container(&id)?;
        Ok(id)
    }

    /// Waits until container `id` has exited; returns its exit code.
    pub fn wait_exited(&mut self, id: &str, timeout: Duration) -> Result<i32> {
        let deadline = Instant::now() + timeout;
        loop {
            let req = ContainerStatusRequest {
                container_id: id.to_owned(),
                verbose: false,
            };
            let status = self
                .rt
                .block_on(self.client.container_status(req))
                .context("ContainerStatus")?
                .into_inner()
                .status
                .context("ContainerStatus without a status")?;
            if status.state == ContainerState::ContainerExited as i32 {
                return Ok(status.exit_code);
            }
            if Instant::now() > deadline {
                bail!("container {id} still not exited after {timeout:?}: {status:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `cmd` in container `id` and waits for it (CRI ExecSync).
    pub fn exec(&mut self, id: &str, cmd: &[&str]) -> Result<()> {
        let req = ExecSyncRequest {
            container_id: id.to_owned(),
            cmd: cmd.iter().map(|s| (*s).to_owned()).collect(),
            timeout: 30,
        };
        let r = self
            .rt
            .block_on(self.client.exec_sync(req))
            .context("ExecSync")?
            .into_inner();
        if r.exit_code != 0 {
            bail!(
                "exec {cmd:?} in {id} exited {}: {}",
                r.exit_code,
                String::from_utf8_lossy(&r.stderr)
            );
        }
        Ok(())
    }

    /// Stops container `id` (SIGTERM, then SIGKILL after `timeout_s` seconds) and removes
    /// it.
    pub fn stop_remove_container(&mut self, id: &str, timeout_s: i64) -> Result<()> {
        let req = StopContainerRequest {
            container_id: id.to_owned(),
            timeout: timeout_s,
        };
        self.rt
            .block_on(self.client.stop_container(req))
            .context("StopContainer")?;
        let req = RemoveContainerRequest {
            container_id: id.to_owned(),
        };
        self.rt
            .block_on(self.client.remove_container(req))
            .context("RemoveContainer")?;
        Ok(())
    }

    /// Stops and removes a pod sandbox (and whatever containers it still has), and removes
    /// the pod's cgroups (the kubelet's job: the runtime leaves the pod cgroup behind).
    pub fn remove_pod(&mut self, id: &str, uid: Option<&str>) -> Result<()> {
        self.rt
            .block_on(self.client.stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }))
            .context("StopPodSandbox")?;
        self.rt
            .block_on(self.client.remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.to_owned(),
            }))
            .context("RemovePodSandbox")?;
        if let Some(uid) = uid {
            remove_pod_cgroups(uid);
        }
        Ok(())
    }

    /// Removes the test pods (label [`LABEL`]) that an earlier, interrupted run left.
    pub fn remove_leftovers(&mut self) -> Result<()> {
        let req = ListPodSandboxRequest {
            filter: Some(PodSandboxFilter {
                label_selector: labels(),
                ..Default::default()
            }),
        };
        let pods = self
            .rt
            .block_on(self.client.list_pod_sandbox(req))
            .context("ListPodSandbox")?
            .into_inner()
            .items;
        for p in pods {
            let uid = p.metadata.as_ref().map(|m| m.uid.clone());
            eprintln!("removing a test pod left by an earlier run: {}", p.id);
            self.remove_pod(&p.id, uid.as_deref())?;
        }
        Ok(())
    }
}

/// Removes pod `uid`'s (empty) cgroup in every hierarchy, and the `kubepods` parents that
/// are left empty. Nothing that has processes can be removed (rmdir fails).
fn remove_pod_cgroups(uid: &str) {
    let Ok(hierarchies) = std::fs::read_dir("/sys/fs/cgroup") else {
        return;
    };
    for h in hierarchies.flatten() {
        let besteffort = h.path().join("kubepods/besteffort");
        let _ = std::fs::remove_dir(besteffort.join(format!("pod{uid}")));
        let _ = std::fs::remove_dir(&besteffort);
        let _ = std::fs::remove_dir(h.path().join("kubepods"));
    }
}

/// Pod cgroups (under any hierarchy's `kubepods`) that are frozen now: v1 `freezer.state`
/// other than THAWED, v2 `cgroup.freeze` other than 0.
pub fn frozen_pod_cgroups() -> Vec<String> {
    let mut frozen = Vec::new();
    let mut stack = vec![
        std::path::PathBuf::from("/sys/fs/cgroup/freezer/kubepods"),
        std::path::PathBuf::from("/sys/fs/cgroup/unified/kubepods"),
    ];
    while let Some(dir) = stack.pop() {
        for (file, thawed) in [("freezer.state", "THAWED"), ("cgroup.freeze", "0")] {
            if let Ok(s) = std::fs::read_to_string(dir.join(file)) {
                if s.trim() != thawed {
                    frozen.push(dir.join(file).display().to_string());
                }
            }
        }
        if let Ok(rd) = std::fs::read_dir(&dir) {
            stack.extend(
                rd.flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
    frozen
}
