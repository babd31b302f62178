//! podman (rootful): bundles at `<graphroot>/overlay-containers/<id>/userdata`
//! (`/var/lib/containers/storage` by default), `root.path` absolute (the layer's `merged`,
//! named by the layer id, not the container id); name and image from
//! `overlay-containers/containers.json`, which podman writes before it starts the
//! container; the layer store (`overlay/<layer>/diff`, `lower`) as fallback.

use std::{
    io::Read as _,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use super::{existing, Bundle, Identity, OnDisk, Places};
use crate::{
    cgroup::ContainerCgroup,
    id::{ContainerId, RuntimeName},
    runtimes::oci::MAX_NAME_LEN,
    watcher::ContainerLayer,
};

/// A `containers.json` larger than this is not read (about 100k containers).
pub const MAX_CONTAINERS_JSON: u64 = 64 << 20;

/// podman's on-disk layout.
pub struct Podman<'a> {
    /// Where podman keeps its storage.
    pub places: &'a Places,
}

/// One entry of containers/storage's `containers.json`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct StorageContainer {
    /// Container id.
    pub id: String,
    /// Names (podman: the container name first).
    #[serde(default)]
    pub names: Vec<String>,
    /// The container's own layer (its upper layer).
    #[serde(default)]
    pub layer: String,
    /// podman's metadata, itself JSON text (`image-name`, `name`).
    #[serde(default)]
    pub metadata: String,
}

/// The bundle of container `id` under a containers/storage root (podman's graph root,
/// CRI-O's run root): `overlay-containers/<id>/userdata`, if it exists.
pub fn userdata_bundle(root: &Path, id: &ContainerId) -> Vec<PathBuf> {
    existing(
        root.join("overlay-containers")
            .join(id.as_str())
            .join("userdata"),
    )
    .into_iter()
    .collect()
}

/// Finds container `id` in `containers.json` text.
pub fn find_container(json: &[u8], id: &ContainerId) -> Option<StorageContainer> {
    let list: Vec<StorageContainer> = serde_json::from_slice(json).ok()?;
    list.into_iter()
        .find(|c| ContainerId::parse(&c.id).as_ref() == Some(id))
}

fn read_containers_json(storage: &Path, id: &ContainerId) -> Option<StorageContainer> {
    let f = std::fs::File::open(storage.join("overlay-containers/containers.json")).ok()?;
    let mut bytes = Vec::new();
    f.take(MAX_CONTAINERS_JSON + 1)
        .read_to_end(&mut bytes)
        .ok()?;
    if bytes.len() as u64 > MAX_CONTAINERS_JSON {
        tracing::warn!(storage = %storage.display(), "containers.json too large; podman names not read");
        return None;
    }
    find_container(&bytes, id)
}

/// Name and image of a containers/storage container (podman's metadata).
pub fn identity_of(c: &StorageContainer) -> Identity {
    #[derive(Deserialize)]
    struct Meta {
        #[serde(rename = "image-name")]
        image_name: Option<String>,
        name: Option<String>,
    }
    let meta: Option<Meta> = (c.metadata.len() <= 64 << 10)
        .then(|| serde_json::from_str(&c.metadata).ok())
        .flatten();
    let ok = |s: Option<String>| s.filter(|s| !s.is_empty() && s.len() <= MAX_NAME_LEN);
    let (name, image) = meta.map_or((None, None), |m| (m.name, m.image_name));
    Identity {
        name: ok(name).or_else(|| ok(c.names.first().cloned())),
        image: ok(image),
        pod: None,
        sandbox: false,
    }
}

/// The layers of container `id` from containers/storage's own metadata: its layer's
/// `diff` is the upperdir, the layer's `lower` file lists the lower layers as `l/` links.
pub fn storage_layer(storage: &Path, id: &ContainerId) -> Option<ContainerLayer> {
    let c = read_containers_json(storage, id)?;
    let layer = c.layer;
    if layer.is_empty() || layer.contains('/') || layer.starts_with('.') {
        return None;
    }
    let overlay = storage.join("overlay");
    let dir = overlay.join(&layer);
    let upperdir = dir.join("diff");
    if !upperdir.is_dir() {
        return None;
    }
    let lowerdirs = std::fs::read_to_string(dir.join("lower"))
        .map(|s| crate::runtime::parse_lower(&overlay, &s))
        .unwrap_or_default();
    Some(ContainerLayer {
        upperdir,
        lowerdirs,
    })
}

impl OnDisk for Podman<'_> {
    fn name(&self) -> RuntimeName {
        RuntimeName::Podman
    }

    fn bundle_dirs(&self, cg: &ContainerCgroup) -> Vec<PathBuf> {
        userdata_bundle(&self.places.containers_storage, &cg.id)
    }

    fn layer_store(&self, id: &ContainerId) -> Option<ContainerLayer> {
        storage_layer(&self.places.containers_storage, id)
    }

    fn identity(&self, id: &ContainerId, _bundle: Option<&Bundle>) -> Identity {
        read_containers_json(&self.places.containers_storage, id)
            .map(|c| identity_of(&c))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "341aea9f9ceaf4dec9e7b8f5727cc4cd472dbd59f388b1a3311eed1e207fa360";

    fn recorded() -> Vec<u8> {
        std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/podman-containers.json"),
        )
        .expect("fixture")
    }

    #[test]
    fn containers_json_recorded_here() {
        let id = ContainerId::parse(ID).expect("id");
        let c = find_container(&recorded(), &id).expect("entry");
        assert_eq!(
            c.layer,
            "0620fa312aacec9fabc362fef017ae9a15bb09fded9b9f5b85a70046877fb669"
        );
        let ident = identity_of(&c);
        assert_eq!(ident.name.as_deref(), Some("fx-pod1"));
        assert_eq!(ident.image.as_deref(), Some("localhost/fsmon-test:2"));
        let other = ContainerId::parse(&"0".repeat(64)).expect("id");
        assert_eq!(find_container(&recorded(), &other), None);
        assert_eq!(find_container(b"{not json", &id), None);
    }

    #[test]
    fn layer_store_fallback() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let storage = tmp.path();
        let id = ContainerId::parse(ID).expect("id");
        std::fs::create_dir_all(storage.join("overlay-containers")).expect("mkdir");
        std::fs::write(
            storage.join("overlay-containers/containers.json"),
            recorded(),
        )
        .expect("write");
        let layer = storage
            .join("overlay/0620fa312aacec9fabc362fef017ae9a15bb09fded9b9f5b85a70046877fb669");
        std::fs::create_dir_all(layer.join("diff")).expect("mkdir");
        std::fs::create_dir_all(storage.join("overlay/base/diff")).expect("mkdir");
        std::fs::create_dir_all(storage.join("overlay/l")).expect("mkdir");
        std::os::unix::fs::symlink(
            "../base/diff",
            storage.join("overlay/l/NAIBMTIKSWNFRLQRALONOSQMEC"),
        )
        .expect("symlink");
        std::fs::write(layer.join("lower"), "l/NAIBMTIKSWNFRLQRALONOSQMEC").expect("write");
        let got = storage_layer(storage, &id).expect("layer");
        assert_eq!(got.upperdir, layer.join("diff"));
        assert_eq!(got.lowerdirs, vec![storage.join("overlay/base/diff")]);
        // A hostile layer name never leaves the storage directory.
        let json = format!(r#"[{{"id":"{ID}","layer":"../../etc"}}]"#);
        std::fs::write(storage.join("overlay-containers/containers.json"), json).expect("write");
        assert_eq!(storage_layer(storage, &id), None);
    }
}
