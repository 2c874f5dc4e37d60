//! The OCI image-layout store in `.kiln/oci/`: content-addressed blobs, deterministic image configs and manifests,
//! the tag index, verification, unpacking and garbage collection. What it writes follows the OCI image-layout
//! spec, so `skopeo`, `umoci` and other OCI tools can read it directly.
//!
//! Besides the spec's `oci-layout`, `index.json` and `blobs/sha256/`, the store keeps `tmp/` (temp files, on the
//! blobs' filesystem so finished ones can be renamed in), `index.lock` (serialises index rewrites) and `gc.lock`
//! (lets writers keep garbage collection away from blobs they have not tagged yet, see [`OciStore::pin_blobs`]).

use std::collections::{BTreeMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::digest::{canonical_json, Digest, StreamHasher};
use crate::provider::local::layer::{self, LayerError, LayerStats, OPAQUE_WHITEOUT, WHITEOUT_PREFIX};

pub const MEDIA_TYPE_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const MEDIA_TYPE_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const MEDIA_TYPE_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
/// Layers are stored uncompressed, so a layer's blob digest is also its diff_id.
pub const MEDIA_TYPE_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
/// The index annotation that names a manifest (`skopeo inspect oci:<dir>:<name>`).
pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";

const LAYOUT_VERSION: &str = "1.0.0";
/// Fixed so that the same spec always gives the same config bytes, hence the same image digest.
const CREATED: &str = "1970-01-01T00:00:00Z";
const BUFFER: usize = 1 << 20;
/// Temp files older than this are leftovers of a crashed writer; younger ones may belong to a running bake.
const STALE_TEMP: Duration = Duration::from_secs(3600);

/// A pointer to a blob, as OCI manifests and indexes spell it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Descriptor {
    #[serde(rename = "mediaType")]
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Descriptor {
    /// The descriptor of an uncompressed layer blob.
    pub fn layer(digest: Digest, size: u64) -> Descriptor {
        Descriptor { media_type: MEDIA_TYPE_LAYER.to_string(), digest, size, annotations: BTreeMap::new() }
    }
}

/// Everything that decides an image's digest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImageSpec {
    pub entrypoint: Vec<String>,
    /// `K=V` entries.
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    /// Bottom first.
    pub layers: Vec<Descriptor>,
    /// One per layer, bottom first: the sha256 of each layer's uncompressed tar.
    pub diff_ids: Vec<Digest>,
}

/// A parsed image manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub config: Descriptor,
    /// Bottom first.
    pub layers: Vec<Descriptor>,
    pub annotations: BTreeMap<String, String>,
}

/// A parsed image config: the parts kiln reads back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub env: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub diff_ids: Vec<Digest>,
    /// OCI names (`amd64`, `arm64`, ...).
    pub architecture: String,
    pub os: String,
}

#[derive(Debug, thiserror::Error)]
pub enum OciError {
    #[error("cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a valid {what}")]
    Json {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the {what}")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} {digest} is damaged: its bytes no longer match its digest")]
    Mismatch { digest: Digest, what: String },
    #[error("{what} {digest} is missing from the image store")]
    Missing { digest: Digest, what: String },
    #[error("{path} is not a usable OCI image layout: {reason}")]
    Layout { path: PathBuf, reason: String },
    #[error("`{name}` is not a valid image reference: {reason}")]
    InvalidRef { name: String, reason: &'static str },
    #[error("invalid image: {reason}")]
    InvalidImage { reason: String },
    #[error("{digest} has media type `{media_type}`, which kiln cannot use here")]
    Unsupported { digest: Digest, media_type: String },
    #[error("layer {layer}: refusing entry `{entry}`: it {reason}")]
    Escape { layer: Digest, entry: String, reason: &'static str },
    #[error("layer {layer}: bad entry `{entry}`: {reason}")]
    BadEntry { layer: Digest, entry: String, reason: String },
    #[error("cannot unpack into {path}: it exists and is not an empty directory")]
    NotEmpty { path: PathBuf },
    #[error(transparent)]
    Layer(#[from] LayerError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> OciError + '_ {
    move |source| OciError::Io { path: path.to_path_buf(), source }
}

/// `(os, architecture)` of this build, in the names OCI configs use (GOOS/GOARCH): x86_64 is `amd64`, aarch64 `arm64`.
pub fn oci_platform() -> (&'static str, &'static str) {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
        "powerpc64" => "ppc64",
        "loongarch64" => "loong64",
        other => other,
    };
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        other => other,
    };
    (os, arch)
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LayoutFile {
    image_layout_version: String,
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct IndexFile {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    /// Kept as raw JSON so fields kiln does not model (platform, urls, ...) survive index rewrites.
    #[serde(default)]
    manifests: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

fn ref_name_of(entry: &serde_json::Value) -> Option<&str> {
    entry.get("annotations")?.get(REF_NAME_ANNOTATION)?.as_str()
}

#[derive(Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ManifestFile {
    schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    media_type: Option<String>,
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    annotations: BTreeMap<String, String>,
}

#[derive(Serialize, Deserialize)]
struct ConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    created: Option<String>,
    architecture: String,
    os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    config: Option<RunConfig>,
    rootfs: RootFs,
}

/// Docker-style capitalised keys, as the OCI config spec keeps them. Null is accepted for each, as other tools
/// write it.
#[derive(Serialize, Deserialize, Default)]
struct RunConfig {
    #[serde(rename = "Entrypoint", default, skip_serializing_if = "Option::is_none")]
    entrypoint: Option<Vec<String>>,
    #[serde(rename = "Env", default, skip_serializing_if = "Option::is_none")]
    env: Option<Vec<String>>,
    #[serde(rename = "Labels", default, skip_serializing_if = "Option::is_none")]
    labels: Option<BTreeMap<String, String>>,
}

#[derive(Serialize, Deserialize)]
struct RootFs {
    #[serde(rename = "type")]
    kind: String,
    diff_ids: Vec<Digest>,
}

/// An advisory `flock`, released when the file closes.
struct FileLock {
    _file: File,
}

impl FileLock {
    fn acquire(path: &Path, exclusive: bool) -> Result<FileLock, OciError> {
        let file = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o644)
            .open(path)
            .map_err(io_err(path))?;
        let op = if exclusive { libc::LOCK_EX } else { libc::LOCK_SH };
        loop {
            // SAFETY: flock only reads the descriptor, which `file` keeps open for the call.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                return Ok(FileLock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(OciError::Io { path: path.to_path_buf(), source: err });
            }
        }
    }
}

/// Held by a writer from its first blob until its image is tagged; [`OciStore::collect_garbage`] waits for every
/// pin to drop, so it never deletes blobs that are written but not yet referenced.
pub struct BlobPin {
    _lock: FileLock,
}

/// The image store: an OCI image layout rooted at `root`.
#[derive(Debug, Clone)]
pub struct OciStore {
    root: PathBuf,
}

impl OciStore {
    /// Opens the layout at `root`, creating it if missing.
    pub fn open(root: &Path) -> Result<OciStore, OciError> {
        let store = OciStore { root: root.to_path_buf() };
        for dir in [store.blob_dir(), store.temp_dir()] {
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        let layout = root.join("oci-layout");
        match fs::read(&layout) {
            Ok(bytes) => {
                let parsed: LayoutFile = serde_json::from_slice(&bytes).map_err(|source| OciError::Json {
                    path: layout.clone(),
                    what: "oci-layout file",
                    source,
                })?;
                // Minor versions of the layout spec stay readable by design.
                if !parsed.image_layout_version.starts_with("1.") {
                    return Err(OciError::Layout {
                        path: root.to_path_buf(),
                        reason: format!("image layout version {} is not 1.x", parsed.image_layout_version),
                    });
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                let bytes = canonical_json(&LayoutFile { image_layout_version: LAYOUT_VERSION.to_string() })
                    .map_err(|source| OciError::Encode { what: "oci-layout file", source })?;
                store.write_atomic(&layout, &bytes)?;
            }
            Err(err) => return Err(OciError::Io { path: layout, source: err }),
        }
        let index = store.index_path();
        if !index.exists() {
            // Under the lock, so two first openers cannot erase a tag made between the check and the write.
            let _lock = store.lock_index()?;
            if !index.exists() {
                store.write_index(&IndexFile {
                    schema_version: 2,
                    media_type: Some(MEDIA_TYPE_INDEX.to_string()),
                    manifests: Vec::new(),
                    annotations: BTreeMap::new(),
                })?;
            }
        }
        Ok(store)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn blob_dir(&self) -> PathBuf {
        self.root.join("blobs").join("sha256")
    }

    fn index_path(&self) -> PathBuf {
        self.root.join("index.json")
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blob_dir().join(digest.hex())
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blob_path(digest).is_file()
    }

    /// `root/tmp`, created on demand: temp files made here can be renamed into `blobs/` atomically.
    pub fn temp_dir(&self) -> PathBuf {
        let dir = self.root.join("tmp");
        // A failure here resurfaces, with its path, when the caller creates a file in the directory.
        let _ = fs::create_dir_all(&dir);
        dir
    }

    fn new_temp(&self) -> Result<tempfile::NamedTempFile, OciError> {
        let dir = self.temp_dir();
        tempfile::Builder::new().prefix(".blob-").tempfile_in(&dir).map_err(io_err(&dir))
    }

    /// Stores `bytes` as a blob and returns its digest. Atomic (temp file + rename); a no-op if already present.
    pub fn put_blob(&self, bytes: &[u8]) -> Result<Digest, OciError> {
        let digest = Digest::of(bytes);
        if !self.has_blob(&digest) {
            let mut temp = self.new_temp()?;
            temp.write_all(bytes).map_err(io_err(temp.path()))?;
            self.commit_blob(temp, &digest)?;
        }
        Ok(digest)
    }

    /// Moves a finished temp file in as the blob `digest`. The digest is trusted (the writer hashed while writing,
    /// and re-reading a large layer would double the cost); [`OciStore::verify_image`] catches a wrong one.
    pub fn put_blob_file(&self, temp: tempfile::NamedTempFile, digest: &Digest) -> Result<(), OciError> {
        if self.has_blob(digest) {
            return Ok(());
        }
        self.commit_blob(temp, digest)
    }

    fn commit_blob(&self, temp: tempfile::NamedTempFile, digest: &Digest) -> Result<(), OciError> {
        let dest = self.blob_path(digest);
        let file = temp.as_file();
        // Temp files are 0600; blobs are shared content other local tools (a runtime, skopeo) may read.
        file.set_permissions(fs::Permissions::from_mode(0o644)).map_err(io_err(temp.path()))?;
        // The data must be on disk before the rename publishes it under its digest.
        file.sync_all().map_err(io_err(temp.path()))?;
        match temp.persist(&dest) {
            Ok(_) => Ok(()),
            Err(err) if err.error.raw_os_error() == Some(libc::EXDEV) => {
                // The temp file lives on another filesystem: copy it next to the blobs, then rename.
                let mut local = self.new_temp()?;
                let mut source = err.file.reopen().map_err(io_err(err.file.path()))?;
                io::copy(&mut source, &mut local).map_err(io_err(local.path()))?;
                self.commit_blob(local, digest)
            }
            Err(err) => Err(OciError::Io { path: dest, source: err.error }),
        }
    }

    /// Writes a diff layer of `root` over `base` straight into the store, returning its descriptor and stats.
    pub fn put_layer(&self, base: Option<&Path>, root: &Path) -> Result<(Descriptor, LayerStats), OciError> {
        let (temp, stats) = layer::write_diff_layer_file(base, root, &self.temp_dir())?;
        self.put_blob_file(temp, &stats.digest)?;
        Ok((Descriptor::layer(stats.digest, stats.size), stats))
    }

    /// Keeps [`OciStore::collect_garbage`] from running while the returned pin lives. Take it before writing an
    /// image's blobs and drop it after tagging the image.
    pub fn pin_blobs(&self) -> Result<BlobPin, OciError> {
        Ok(BlobPin { _lock: FileLock::acquire(&self.root.join("gc.lock"), false)? })
    }

    /// Writes config + manifest blobs for `spec` and returns the manifest digest: the image digest. Deterministic:
    /// the same spec gives the same bytes, hence the same digest, on any machine of the same OS and architecture.
    pub fn write_image(&self, spec: &ImageSpec) -> Result<Digest, OciError> {
        let invalid = |reason: String| OciError::InvalidImage { reason };
        if spec.layers.len() != spec.diff_ids.len() {
            return Err(invalid(format!("{} layers but {} diff_ids", spec.layers.len(), spec.diff_ids.len())));
        }
        if let Some(bad) = spec.env.iter().find(|e| !e.contains('=')) {
            return Err(invalid(format!("environment entry `{bad}` is not of the form KEY=VALUE")));
        }
        let count = spec.layers.len();
        for (i, (layer, diff_id)) in spec.layers.iter().zip(&spec.diff_ids).enumerate() {
            if !self.has_blob(&layer.digest) {
                return Err(OciError::Missing { digest: layer.digest, what: format!("layer {} of {count}", i + 1) });
            }
            if layer.media_type == MEDIA_TYPE_LAYER && layer.digest != *diff_id {
                return Err(invalid(format!(
                    "layer {} of {count} is uncompressed, so its diff_id must be its digest {}, not {diff_id}",
                    i + 1,
                    layer.digest
                )));
            }
        }
        let (os, architecture) = oci_platform();
        let config = ConfigFile {
            created: Some(CREATED.to_string()),
            architecture: architecture.to_string(),
            os: os.to_string(),
            config: Some(RunConfig {
                entrypoint: Some(spec.entrypoint.clone()).filter(|v| !v.is_empty()),
                env: Some(spec.env.clone()).filter(|v| !v.is_empty()),
                labels: Some(spec.labels.clone()).filter(|v| !v.is_empty()),
            }),
            rootfs: RootFs { kind: "layers".to_string(), diff_ids: spec.diff_ids.clone() },
        };
        let config_bytes =
            canonical_json(&config).map_err(|source| OciError::Encode { what: "image config", source })?;
        let config_digest = self.put_blob(&config_bytes)?;
        let manifest = ManifestFile {
            schema_version: 2,
            media_type: Some(MEDIA_TYPE_MANIFEST.to_string()),
            config: Descriptor {
                media_type: MEDIA_TYPE_CONFIG.to_string(),
                digest: config_digest,
                size: config_bytes.len() as u64,
                annotations: BTreeMap::new(),
            },
            layers: spec.layers.clone(),
            annotations: BTreeMap::new(),
        };
        let manifest_bytes =
            canonical_json(&manifest).map_err(|source| OciError::Encode { what: "image manifest", source })?;
        self.put_blob(&manifest_bytes)
    }

    fn lock_index(&self) -> Result<FileLock, OciError> {
        FileLock::acquire(&self.root.join("index.lock"), true)
    }

    fn read_index(&self) -> Result<IndexFile, OciError> {
        let path = self.index_path();
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(OciError::Layout { path: self.root.clone(), reason: "index.json is missing".to_string() })
            }
            Err(err) => return Err(OciError::Io { path, source: err }),
        };
        let index: IndexFile =
            serde_json::from_slice(&bytes).map_err(|source| OciError::Json { path, what: "image index", source })?;
        if index.schema_version != 2 {
            return Err(OciError::Layout {
                path: self.root.clone(),
                reason: format!("index.json has schemaVersion {}, not 2", index.schema_version),
            });
        }
        Ok(index)
    }

    fn write_index(&self, index: &IndexFile) -> Result<(), OciError> {
        let bytes = canonical_json(index).map_err(|source| OciError::Encode { what: "image index", source })?;
        self.write_atomic(&self.index_path(), &bytes)
    }

    /// Readers never see a half-written file: they get the old one or the new one.
    fn write_atomic(&self, dest: &Path, bytes: &[u8]) -> Result<(), OciError> {
        let mut temp = self.new_temp()?;
        temp.write_all(bytes).map_err(io_err(temp.path()))?;
        temp.as_file().set_permissions(fs::Permissions::from_mode(0o644)).map_err(io_err(temp.path()))?;
        temp.as_file().sync_all().map_err(io_err(temp.path()))?;
        temp.persist(dest).map_err(|e| OciError::Io { path: dest.to_path_buf(), source: e.error })?;
        Ok(())
    }

    /// Rewrites index.json under the index lock with `change` applied, then sorts entries by ref name.
    fn update_index(&self, change: impl FnOnce(&mut Vec<serde_json::Value>) -> bool) -> Result<(), OciError> {
        let _lock = self.lock_index()?;
        let mut index = self.read_index()?;
        if !change(&mut index.manifests) {
            return Ok(());
        }
        index.manifests.sort_by(|a, b| ref_name_of(a).unwrap_or("").cmp(ref_name_of(b).unwrap_or("")));
        index.media_type = Some(MEDIA_TYPE_INDEX.to_string());
        self.write_index(&index)
    }

    /// Points `ref_name` (e.g. `hello:3f2a9c1b0e7d`, `hello:latest`) at a manifest in index.json, replacing an
    /// existing entry of that name. The manifest must be in the store.
    pub fn tag(&self, ref_name: &str, manifest: &Digest) -> Result<(), OciError> {
        self.tag_annotated(ref_name, manifest, &BTreeMap::new())
    }

    /// [`OciStore::tag`], with `annotations` on the index entry beside the ref name. They sit outside the
    /// manifest, so they say where an image came from without changing its digest.
    pub fn tag_annotated(
        &self,
        ref_name: &str,
        manifest: &Digest,
        annotations: &BTreeMap<String, String>,
    ) -> Result<(), OciError> {
        validate_ref(ref_name).map_err(|reason| OciError::InvalidRef { name: ref_name.to_string(), reason })?;
        // Parsing proves the blob is present, intact and really a manifest before anything points at it.
        self.manifest(manifest)?;
        let path = self.blob_path(manifest);
        let size = fs::metadata(&path).map_err(io_err(&path))?.len();
        let descriptor = Descriptor {
            media_type: MEDIA_TYPE_MANIFEST.to_string(),
            digest: *manifest,
            size,
            annotations: annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .chain([(REF_NAME_ANNOTATION.to_string(), ref_name.to_string())])
                .collect(),
        };
        let entry =
            serde_json::to_value(&descriptor).map_err(|source| OciError::Encode { what: "descriptor", source })?;
        self.update_index(|manifests| {
            manifests.retain(|m| ref_name_of(m) != Some(ref_name));
            manifests.push(entry);
            true
        })
    }

    /// Removes `ref_name` from index.json; a no-op if it is not there.
    pub fn untag(&self, ref_name: &str) -> Result<(), OciError> {
        self.update_index(|manifests| {
            let before = manifests.len();
            manifests.retain(|m| ref_name_of(m) != Some(ref_name));
            manifests.len() != before
        })
    }

    /// Every named manifest in index.json, sorted by name.
    pub fn refs(&self) -> Result<Vec<(String, Digest)>, OciError> {
        let index = self.read_index()?;
        let mut refs = Vec::new();
        for entry in &index.manifests {
            let Some(name) = ref_name_of(entry) else { continue };
            let descriptor: Descriptor = Descriptor::deserialize(entry).map_err(|source| OciError::Json {
                path: self.index_path(),
                what: "image index",
                source,
            })?;
            refs.push((name.to_string(), descriptor.digest));
        }
        refs.sort();
        Ok(refs)
    }

    /// Reads a small blob whole, checking it against its digest.
    fn read_verified(&self, digest: &Digest, what: &str) -> Result<Vec<u8>, OciError> {
        let path = self.blob_path(digest);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(OciError::Missing { digest: *digest, what: what.to_string() })
            }
            Err(err) => return Err(OciError::Io { path, source: err }),
        };
        if Digest::of(&bytes) != *digest {
            return Err(OciError::Mismatch { digest: *digest, what: what.to_string() });
        }
        Ok(bytes)
    }

    /// The parsed manifest `digest`, checked against its digest.
    pub fn manifest(&self, digest: &Digest) -> Result<Manifest, OciError> {
        let bytes = self.read_verified(digest, "manifest")?;
        let parsed: ManifestFile = serde_json::from_slice(&bytes).map_err(|source| OciError::Json {
            path: self.blob_path(digest),
            what: "image manifest",
            source,
        })?;
        let media_type = parsed.media_type.as_deref().unwrap_or(MEDIA_TYPE_MANIFEST);
        if parsed.schema_version != 2 || media_type != MEDIA_TYPE_MANIFEST {
            return Err(OciError::Unsupported { digest: *digest, media_type: media_type.to_string() });
        }
        Ok(Manifest { config: parsed.config, layers: parsed.layers, annotations: parsed.annotations })
    }

    /// The parsed config of `manifest`, checked against its digest and size.
    pub fn image_config(&self, manifest: &Manifest) -> Result<ImageConfig, OciError> {
        let descriptor = &manifest.config;
        if descriptor.media_type != MEDIA_TYPE_CONFIG {
            return Err(OciError::Unsupported { digest: descriptor.digest, media_type: descriptor.media_type.clone() });
        }
        let bytes = self.read_verified(&descriptor.digest, "config")?;
        if bytes.len() as u64 != descriptor.size {
            return Err(OciError::Mismatch {
                digest: descriptor.digest,
                what: size_what("config", bytes.len(), descriptor),
            });
        }
        let parsed: ConfigFile = serde_json::from_slice(&bytes).map_err(|source| OciError::Json {
            path: self.blob_path(&descriptor.digest),
            what: "image config",
            source,
        })?;
        let run = parsed.config.unwrap_or_default();
        Ok(ImageConfig {
            entrypoint: run.entrypoint.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            labels: run.labels.unwrap_or_default(),
            diff_ids: parsed.rootfs.diff_ids,
            architecture: parsed.architecture,
            os: parsed.os,
        })
    }

    /// Streams a blob through sha256 and checks digest and size against its descriptor.
    fn check_blob(&self, descriptor: &Descriptor, what: &str) -> Result<(), OciError> {
        let path = self.blob_path(&descriptor.digest);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(OciError::Missing { digest: descriptor.digest, what: what.to_string() })
            }
            Err(err) => return Err(OciError::Io { path, source: err }),
        };
        let mut hasher = StreamHasher::new();
        let size = io::copy(&mut BufReader::with_capacity(BUFFER, file), &mut hasher).map_err(io_err(&path))?;
        if hasher.finish() != descriptor.digest {
            return Err(OciError::Mismatch { digest: descriptor.digest, what: what.to_string() });
        }
        if size != descriptor.size {
            return Err(OciError::Mismatch {
                digest: descriptor.digest,
                what: size_what(what, size as usize, descriptor),
            });
        }
        Ok(())
    }

    /// Re-hashes the manifest, its config and every layer blob. The error names the first blob (manifest, config,
    /// then layers bottom first) that is missing ([`OciError::Missing`]) or whose bytes no longer match its digest
    /// ([`OciError::Mismatch`]).
    pub fn verify_image(&self, manifest: &Digest) -> Result<(), OciError> {
        let parsed = self.manifest(manifest)?;
        self.check_blob(&parsed.config, "config")?;
        let count = parsed.layers.len();
        let results: Vec<Result<(), OciError>> = parsed
            .layers
            .par_iter()
            .enumerate()
            .map(|(i, layer)| self.check_blob(layer, &format!("layer {} of {count}", i + 1)))
            .collect();
        results.into_iter().collect::<Result<(), OciError>>()?;
        let config = self.image_config(&parsed)?;
        if config.diff_ids.len() != count {
            return Err(OciError::InvalidImage {
                reason: format!(
                    "manifest {manifest} has {count} layers but its config {} diff_ids",
                    config.diff_ids.len()
                ),
            });
        }
        for (i, (layer, diff_id)) in parsed.layers.iter().zip(&config.diff_ids).enumerate() {
            if layer.media_type == MEDIA_TYPE_LAYER && layer.digest != *diff_id {
                return Err(OciError::InvalidImage {
                    reason: format!("layer {} of {count} is {} but the config says {diff_id}", i + 1, layer.digest),
                });
            }
        }
        Ok(())
    }

    /// Unpacks the image's layers, bottom first, into `dest` (created; must be empty or absent), applying
    /// whiteouts. Refuses entries that would escape `dest` (`..`, absolute paths, paths through symlinks). Restores
    /// modes (permission bits only) and symlinks; ownership is left to the unpacking user. Each layer is checked
    /// against its digest as it is read. On error `dest` is left partly unpacked.
    pub fn unpack(&self, manifest: &Digest, dest: &Path) -> Result<(), OciError> {
        let parsed = self.manifest(manifest)?;
        match fs::metadata(dest) {
            Ok(meta) => {
                let empty = meta.is_dir() && fs::read_dir(dest).map_err(io_err(dest))?.next().is_none();
                if !empty {
                    return Err(OciError::NotEmpty { path: dest.to_path_buf() });
                }
            }
            Err(err) if err.kind() == io::ErrorKind::NotFound => fs::create_dir_all(dest).map_err(io_err(dest))?,
            Err(err) => return Err(OciError::Io { path: dest.to_path_buf(), source: err }),
        }
        let mut unpacker = Unpacker {
            dest,
            known_dirs: HashSet::new(),
            dir_modes: BTreeMap::new(),
            this_layer: HashSet::new(),
            layer: Digest::ZERO,
        };
        let count = parsed.layers.len();
        for (i, descriptor) in parsed.layers.iter().enumerate() {
            if descriptor.media_type != MEDIA_TYPE_LAYER {
                return Err(OciError::Unsupported {
                    digest: descriptor.digest,
                    media_type: descriptor.media_type.clone(),
                });
            }
            let path = self.blob_path(&descriptor.digest);
            let file = match File::open(&path) {
                Ok(file) => file,
                Err(err) if err.kind() == io::ErrorKind::NotFound => {
                    return Err(OciError::Missing {
                        digest: descriptor.digest,
                        what: format!("layer {} of {count}", i + 1),
                    })
                }
                Err(err) => return Err(OciError::Io { path, source: err }),
            };
            let what = format!("layer {} of {count}", i + 1);
            let reader =
                HashingReader { inner: BufReader::with_capacity(BUFFER, file), hasher: StreamHasher::new(), read: 0 };
            let mut reader = match unpacker.apply_layer(descriptor.digest, reader, &path) {
                Ok(reader) => reader,
                // A damaged blob often fails to parse before its hash can be compared; name the damage, not the symptom.
                Err(err) => match self.check_blob(descriptor, &what) {
                    Err(damaged @ (OciError::Mismatch { .. } | OciError::Missing { .. })) => return Err(damaged),
                    _ => return Err(err),
                },
            };
            // Hash whatever the tar reader left unread (end-of-archive padding) so the whole blob is checked.
            io::copy(&mut reader, &mut io::sink()).map_err(io_err(&path))?;
            if reader.hasher.finish() != descriptor.digest {
                return Err(OciError::Mismatch { digest: descriptor.digest, what });
            }
            if reader.read != descriptor.size {
                return Err(OciError::Mismatch {
                    digest: descriptor.digest,
                    what: size_what(&what, reader.read as usize, descriptor),
                });
            }
        }
        unpacker.finish()
    }

    /// Deletes blobs that no manifest in index.json references, directly or through its config and layers, and
    /// temp files a crashed writer left behind; returns the bytes freed. Waits for every [`BlobPin`] to drop first.
    pub fn collect_garbage(&self) -> Result<u64, OciError> {
        let _gc = FileLock::acquire(&self.root.join("gc.lock"), true)?;
        let _index = self.lock_index()?;
        let index = self.read_index()?;
        let mut live = HashSet::new();
        for entry in &index.manifests {
            let descriptor: Descriptor = Descriptor::deserialize(entry).map_err(|source| OciError::Json {
                path: self.index_path(),
                what: "image index",
                source,
            })?;
            live.insert(descriptor.digest);
            if !self.has_blob(&descriptor.digest) {
                continue;
            }
            // An unreadable manifest aborts: deleting without knowing what it references could destroy an image.
            let manifest = self.manifest(&descriptor.digest)?;
            live.insert(manifest.config.digest);
            live.extend(manifest.layers.iter().map(|l| l.digest));
        }
        let mut freed = 0;
        let blob_dir = self.blob_dir();
        for entry in fs::read_dir(&blob_dir).map_err(io_err(&blob_dir))? {
            let entry = entry.map_err(io_err(&blob_dir))?;
            let name = entry.file_name();
            // Only files named like blobs are the store's to delete.
            let Some(digest) = name.to_str().and_then(|n| Digest::parse(n).ok()) else { continue };
            if live.contains(&digest) {
                continue;
            }
            let path = entry.path();
            let size = entry.metadata().map_err(io_err(&path))?.len();
            fs::remove_file(&path).map_err(io_err(&path))?;
            freed += size;
        }
        let temp_dir = self.temp_dir();
        let cutoff = SystemTime::now().checked_sub(STALE_TEMP).unwrap_or(SystemTime::UNIX_EPOCH);
        for entry in fs::read_dir(&temp_dir).map_err(io_err(&temp_dir))? {
            let entry = entry.map_err(io_err(&temp_dir))?;
            let path = entry.path();
            let meta = entry.metadata().map_err(io_err(&path))?;
            if meta.is_file() && meta.modified().map_err(io_err(&path))? < cutoff {
                fs::remove_file(&path).map_err(io_err(&path))?;
                freed += meta.len();
            }
        }
        Ok(freed)
    }
}

fn size_what(what: &str, actual: usize, descriptor: &Descriptor) -> String {
    format!("{what} ({actual} bytes, its descriptor says {})", descriptor.size)
}

/// Checks the OCI `org.opencontainers.image.ref.name` grammar: `/`-separated components of letters and digits
/// joined by single separators `-._:@+` or `--`.
fn validate_ref(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("it is empty");
    }
    for component in name.split('/') {
        let bytes = component.as_bytes();
        let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
            return Err("it has an empty `/`-separated part");
        };
        if !first.is_ascii_alphanumeric() || !last.is_ascii_alphanumeric() {
            return Err("each `/`-separated part must start and end with a letter or digit");
        }
        let mut i = 0;
        while i < bytes.len() {
            if bytes[i].is_ascii_alphanumeric() {
                i += 1;
                continue;
            }
            let start = i;
            while i < bytes.len() && !bytes[i].is_ascii_alphanumeric() {
                i += 1;
            }
            let separator = &bytes[start..i];
            let single = separator.len() == 1 && b"-._:@+".contains(&separator[0]);
            if !single && separator != b"--" {
                return Err("letters and digits may be joined only by one of - . _ : @ + or by --");
            }
        }
    }
    Ok(())
}

/// Counts and hashes what the tar reader pulls from a layer blob.
struct HashingReader<R> {
    inner: R,
    hasher: StreamHasher,
    read: u64,
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.read += n as u64;
        Ok(n)
    }
}

/// Splits a tar path into a relative path, refusing what would leave the destination. None for the root itself.
fn safe_relative(raw: &[u8]) -> Result<Option<PathBuf>, &'static str> {
    if raw.starts_with(b"/") {
        return Err("is an absolute path");
    }
    let mut rel = PathBuf::new();
    for component in raw.split(|b| *b == b'/') {
        match component {
            b"" | b"." => {}
            b".." => return Err("climbs out with `..`"),
            name => rel.push(OsStr::from_bytes(name)),
        }
    }
    Ok(Some(rel).filter(|r| !r.as_os_str().is_empty()))
}

/// Deletes whatever is at `path` without following a symlink there.
fn remove_any(path: &Path) -> Result<(), OciError> {
    let result = match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(err) => Err(err),
    };
    match result {
        Err(err) if err.kind() != io::ErrorKind::NotFound => {
            Err(OciError::Io { path: path.to_path_buf(), source: err })
        }
        _ => Ok(()),
    }
}

/// Applies layers to a directory. Paths are checked component by component with `lstat`, so no entry is ever
/// written through a symlink an earlier entry planted.
struct Unpacker<'a> {
    dest: &'a Path,
    /// Relative directories already seen to be real directories; forgotten whenever anything is removed, since a
    /// removal is the only way one of them can stop being a directory.
    known_dirs: HashSet<PathBuf>,
    /// Directory modes, applied last so a read-only directory does not block its own children.
    dir_modes: BTreeMap<PathBuf, u32>,
    /// What the current layer created: whiteouts only hide what lower layers put there.
    this_layer: HashSet<PathBuf>,
    layer: Digest,
}

impl Unpacker<'_> {
    fn apply_layer<R: Read>(&mut self, layer: Digest, reader: R, path: &Path) -> Result<R, OciError> {
        self.layer = layer;
        self.this_layer.clear();
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().map_err(io_err(path))? {
            let mut entry = entry.map_err(io_err(path))?;
            self.apply_entry(&mut entry, path)?;
        }
        Ok(archive.into_inner())
    }

    fn escape(&self, entry: &[u8], reason: &'static str) -> OciError {
        OciError::Escape { layer: self.layer, entry: String::from_utf8_lossy(entry).into_owned(), reason }
    }

    fn bad(&self, entry: &[u8], reason: impl Into<String>) -> OciError {
        OciError::BadEntry {
            layer: self.layer,
            entry: String::from_utf8_lossy(entry).into_owned(),
            reason: reason.into(),
        }
    }

    fn forget_dirs(&mut self) {
        self.known_dirs.clear();
    }

    fn clear(&mut self, path: &Path) -> Result<(), OciError> {
        if let Ok(meta) = fs::symlink_metadata(path) {
            remove_any(path)?;
            // Only removing a directory can invalidate what is known about directories.
            if meta.is_dir() {
                self.forget_dirs();
            }
        }
        Ok(())
    }

    /// Makes sure every parent of `rel` is a real directory inside `dest`, creating missing ones when `create`.
    /// Returns false when a parent is missing and `create` is off.
    fn check_parents(&mut self, raw: &[u8], rel: &Path, create: bool) -> Result<bool, OciError> {
        let mut prefix = PathBuf::new();
        let parents: Vec<_> = rel.parent().map(|p| p.components().collect()).unwrap_or_default();
        for component in parents {
            prefix.push(component);
            if self.known_dirs.contains(&prefix) {
                continue;
            }
            let path = self.dest.join(&prefix);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.file_type().is_symlink() => return Err(self.escape(raw, "passes through a symlink")),
                Ok(meta) if meta.is_dir() => {}
                Ok(_) => return Err(self.bad(raw, format!("{} is not a directory", prefix.display()))),
                Err(err) if err.kind() == io::ErrorKind::NotFound && create => {
                    fs::DirBuilder::new().mode(0o700).create(&path).map_err(io_err(&path))?;
                    self.dir_modes.entry(prefix.clone()).or_insert(0o755);
                }
                Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(false),
                Err(err) => return Err(OciError::Io { path, source: err }),
            }
            self.known_dirs.insert(prefix.clone());
        }
        Ok(true)
    }

    fn apply_entry<R: Read>(&mut self, entry: &mut tar::Entry<'_, R>, layer_path: &Path) -> Result<(), OciError> {
        let raw = entry.path_bytes().into_owned();
        let rel = match safe_relative(&raw) {
            Ok(Some(rel)) => rel,
            Ok(None) => return Ok(()),
            Err(reason) => return Err(self.escape(&raw, reason)),
        };
        let name = rel.file_name().map(|n| n.as_bytes().to_vec()).unwrap_or_default();
        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            return self.apply_whiteout(&raw, &rel, &name, hidden);
        }
        let mut kind = entry.header().entry_type();
        // Pre-POSIX archives mark directories only with a trailing slash.
        if kind == tar::EntryType::Regular && raw.ends_with(b"/") {
            kind = tar::EntryType::Directory;
        }
        let mode = entry.header().mode().map_err(|e| self.bad(&raw, format!("unreadable mode: {e}")))? & 0o777;
        self.check_parents(&raw, &rel, true)?;
        let path = self.dest.join(&rel);
        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {}
                    _ => {
                        self.clear(&path)?;
                        fs::DirBuilder::new().mode(0o700).create(&path).map_err(io_err(&path))?;
                    }
                }
                self.known_dirs.insert(rel.clone());
                self.dir_modes.insert(rel.clone(), mode);
            }
            tar::EntryType::Regular | tar::EntryType::Continuous => {
                self.clear(&path)?;
                let mut file = fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(io_err(&path))?;
                let mut reader = layer::Blame::new(entry);
                io::copy(&mut reader, &mut file).map_err(|err| {
                    if reader.failed {
                        OciError::Io { path: layer_path.to_path_buf(), source: err }
                    } else {
                        OciError::Io { path: path.clone(), source: err }
                    }
                })?;
                file.set_permissions(fs::Permissions::from_mode(mode)).map_err(io_err(&path))?;
            }
            tar::EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| self.bad(&raw, "symlink without a target"))?;
                self.clear(&path)?;
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path).map_err(io_err(&path))?;
            }
            tar::EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| self.bad(&raw, "hard link without a target"))?;
                let target_rel = match safe_relative(&target) {
                    Ok(Some(t)) => t,
                    Ok(None) => return Err(self.bad(&raw, "hard link to the root")),
                    Err(reason) => return Err(self.escape(&raw, reason)),
                };
                if !self.check_parents(&raw, &target_rel, false)? {
                    return Err(self.bad(&raw, "hard link to a missing file"));
                }
                let target_path = self.dest.join(&target_rel);
                self.clear(&path)?;
                fs::hard_link(&target_path, &path).map_err(io_err(&target_path))?;
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                tracing::warn!(entry = %String::from_utf8_lossy(&raw), kind = ?kind, "skipping a device or fifo: unpacking creates only files, directories and links");
                return Ok(());
            }
            tar::EntryType::XGlobalHeader => return Ok(()),
            other => return Err(self.bad(&raw, format!("unsupported entry type {other:?}"))),
        }
        self.this_layer.insert(rel);
        Ok(())
    }

    fn apply_whiteout(&mut self, raw: &[u8], rel: &Path, name: &[u8], hidden: &[u8]) -> Result<(), OciError> {
        // Nothing below a missing directory can need deleting.
        if !self.check_parents(raw, rel, false)? {
            return Ok(());
        }
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if name == OPAQUE_WHITEOUT.as_bytes() {
            let dir = self.dest.join(&parent);
            if fs::symlink_metadata(&dir).map(|m| m.is_dir()).unwrap_or(false) {
                self.clear_lower(&parent)?;
            }
            return Ok(());
        }
        if hidden.is_empty() || hidden == b"." || hidden == b".." {
            return Err(self.escape(raw, "whites out `.`, `..` or nothing"));
        }
        let target = parent.join(OsStr::from_bytes(hidden));
        if !self.this_layer.contains(&target) {
            self.clear(&self.dest.join(&target))?;
        }
        Ok(())
    }

    /// Empties a directory of everything lower layers put there, keeping what the current layer created.
    fn clear_lower(&mut self, rel_dir: &Path) -> Result<(), OciError> {
        let dir = self.dest.join(rel_dir);
        for child in fs::read_dir(&dir).map_err(io_err(&dir))? {
            let child = child.map_err(io_err(&dir))?;
            let child_rel = rel_dir.join(child.file_name());
            if !self.this_layer.contains(&child_rel) {
                self.clear(&child.path())?;
            } else if child.file_type().map_err(io_err(&child.path()))?.is_dir() {
                self.clear_lower(&child_rel)?;
            }
        }
        Ok(())
    }

    /// Applies directory modes, deepest first. Each path is re-checked, since a later layer may have replaced a
    /// directory (or one of its parents) with a symlink that chmod would follow.
    fn finish(self) -> Result<(), OciError> {
        'dirs: for (rel, mode) in self.dir_modes.iter().rev() {
            let mut path = self.dest.to_path_buf();
            for component in rel.components() {
                path.push(component);
                match fs::symlink_metadata(&path) {
                    Ok(meta) if meta.is_dir() => {}
                    _ => continue 'dirs,
                }
            }
            fs::set_permissions(&path, fs::Permissions::from_mode(*mode)).map_err(io_err(&path))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::local::layer::{list_entries, write_test_file as write};
    use std::os::unix::fs::{symlink, MetadataExt};
    use tar::{EntryType, Header};

    fn store() -> (tempfile::TempDir, OciStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = OciStore::open(&dir.path().join("oci")).unwrap();
        (dir, store)
    }

    /// Builds an image from trees, each layered over the one before.
    fn image(store: &OciStore, trees: &[&Path]) -> Digest {
        let mut spec = ImageSpec { entrypoint: vec!["/bin/app".into()], ..ImageSpec::default() };
        let mut base = None;
        for tree in trees {
            let (descriptor, stats) = store.put_layer(base, tree).unwrap();
            spec.layers.push(descriptor);
            spec.diff_ids.push(stats.digest);
            base = Some(*tree);
        }
        store.write_image(&spec).unwrap()
    }

    fn image_of_tars(store: &OciStore, tars: &[Vec<u8>]) -> Digest {
        let mut spec = ImageSpec::default();
        for tar in tars {
            let digest = store.put_blob(tar).unwrap();
            spec.layers.push(Descriptor::layer(digest, tar.len() as u64));
            spec.diff_ids.push(digest);
        }
        store.write_image(&spec).unwrap()
    }

    /// A tar written header by header, so paths can be anything (the `tar` crate refuses `..` and absolute ones).
    fn crafted(entries: &[(&str, EntryType, &[u8], &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, kind, data, link) in entries {
            let mut header = Header::new_gnu();
            header.set_entry_type(*kind);
            header.set_mode(if *kind == EntryType::Directory { 0o755 } else { 0o644 });
            header.set_size(data.len() as u64);
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_cksum();
            out.extend_from_slice(header.as_bytes());
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.extend_from_slice(&[0; 1024]);
        out
    }

    #[derive(Debug, PartialEq, Eq)]
    enum Snap {
        Dir(u32),
        File(u32, Vec<u8>),
        Link(PathBuf),
    }

    /// Everything unpacking must reproduce: paths, types, permission bits, contents and symlink targets.
    fn snapshot(root: &Path) -> BTreeMap<PathBuf, Snap> {
        fn walk(root: &Path, rel: &Path, out: &mut BTreeMap<PathBuf, Snap>) {
            for entry in fs::read_dir(root.join(rel)).unwrap() {
                let entry = entry.unwrap();
                let child = rel.join(entry.file_name());
                let meta = fs::symlink_metadata(entry.path()).unwrap();
                let mode = meta.mode() & 0o7777;
                if meta.file_type().is_symlink() {
                    out.insert(child, Snap::Link(fs::read_link(entry.path()).unwrap()));
                } else if meta.is_dir() {
                    out.insert(child.clone(), Snap::Dir(mode));
                    walk(root, &child, out);
                } else {
                    out.insert(child, Snap::File(mode, fs::read(entry.path()).unwrap()));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, Path::new(""), &mut out);
        out
    }

    fn set_dir_modes(root: &Path) {
        for (rel, snap) in snapshot(root) {
            if let Snap::Dir(_) = snap {
                fs::set_permissions(root.join(rel), fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
    }

    fn parent_and_child() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let (parent, child) = (dir.path().join("parent"), dir.path().join("child"));
        write(&parent, "bin/app", b"#!/bin/sh\necho v1\n", 0o755);
        write(&parent, "etc/app.conf", b"port = 1\n", 0o644);
        write(&parent, "etc/old.conf", b"old\n", 0o644);
        write(&parent, "var/cache/a/b", b"cached\n", 0o644);
        write(&parent, "swap", b"file, later a dir\n", 0o644);
        write(&parent, "share/doc/README", b"docs\n", 0o644);
        symlink("app.conf", parent.join("etc/current")).unwrap();
        set_dir_modes(&parent);
        // The child is a copy of the parent, then changed the way a bake step would change it.
        copy_tree(&parent, &child);
        write(&child, "bin/app", b"#!/bin/sh\necho v2\n", 0o755);
        write(&child, "etc/app.conf", b"port = 1\n", 0o755);
        fs::remove_file(child.join("etc/old.conf")).unwrap();
        fs::remove_dir_all(child.join("var/cache")).unwrap();
        fs::remove_file(child.join("swap")).unwrap();
        write(&child, "swap/inside", b"now a dir\n", 0o644);
        fs::remove_dir_all(child.join("share")).unwrap();
        write(&child, "share", b"now a file\n", 0o644);
        fs::remove_file(child.join("etc/current")).unwrap();
        symlink("/elsewhere/app.conf", child.join("etc/current")).unwrap();
        write(&child, &format!("{}/long", "x".repeat(150)), b"long path\n", 0o644);
        set_dir_modes(&child);
        (dir, parent, child)
    }

    fn copy_tree(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            let kind = entry.file_type().unwrap();
            if kind.is_dir() {
                copy_tree(&entry.path(), &target);
            } else if kind.is_symlink() {
                symlink(fs::read_link(entry.path()).unwrap(), &target).unwrap();
            } else {
                fs::copy(entry.path(), &target).unwrap();
            }
        }
    }

    #[test]
    fn open_creates_a_spec_layout_and_reopens_it() {
        let (_dir, store) = store();
        let root = store.root();
        assert_eq!(fs::read_to_string(root.join("oci-layout")).unwrap(), r#"{"imageLayoutVersion":"1.0.0"}"#);
        let index: serde_json::Value = serde_json::from_slice(&fs::read(root.join("index.json")).unwrap()).unwrap();
        assert_eq!(index, serde_json::json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_INDEX, "manifests": []}));
        assert!(root.join("blobs/sha256").is_dir());
        let config = store.put_blob(b"{}").unwrap();
        let manifest = store
            .put_blob(
                &canonical_json(&serde_json::json!({"schemaVersion": 2, "mediaType": MEDIA_TYPE_MANIFEST,
                "config": {"mediaType": MEDIA_TYPE_CONFIG, "digest": config, "size": 2}, "layers": []}))
                .unwrap(),
            )
            .unwrap();
        store.tag("x:1", &manifest).unwrap();
        let again = OciStore::open(root).unwrap();
        assert_eq!(again.refs().unwrap(), [("x:1".to_string(), manifest)]);
        fs::write(root.join("oci-layout"), r#"{"imageLayoutVersion":"2.0.0"}"#).unwrap();
        assert!(matches!(OciStore::open(root), Err(OciError::Layout { .. })));
    }

    #[test]
    fn blobs_are_content_addressed_and_written_once() {
        let (_dir, store) = store();
        let digest = store.put_blob(b"hello").unwrap();
        assert_eq!(digest, Digest::of(b"hello"));
        assert_eq!(store.blob_path(&digest), store.root().join("blobs/sha256").join(digest.hex()));
        assert!(store.has_blob(&digest));
        assert_eq!(store.put_blob(b"hello").unwrap(), digest);
        assert_eq!(fs::read(store.blob_path(&digest)).unwrap(), b"hello");
        assert_eq!(fs::metadata(store.blob_path(&digest)).unwrap().mode() & 0o777, 0o644);
        let mut temp = tempfile::NamedTempFile::new_in(store.temp_dir()).unwrap();
        temp.write_all(b"from a file").unwrap();
        let file_digest = Digest::of(b"from a file");
        store.put_blob_file(temp, &file_digest).unwrap();
        assert_eq!(fs::read(store.blob_path(&file_digest)).unwrap(), b"from a file");
        assert_eq!(fs::read_dir(store.temp_dir()).unwrap().count(), 0, "no temp file is left behind");
    }

    #[test]
    fn blob_files_from_another_filesystem_are_copied_in() {
        let (_dir, store) = store();
        // /dev/shm is a tmpfs on Linux, so a rename from it into the store crosses filesystems.
        let mut temp = tempfile::NamedTempFile::new_in("/dev/shm").unwrap();
        temp.write_all(b"elsewhere").unwrap();
        let digest = Digest::of(b"elsewhere");
        store.put_blob_file(temp, &digest).unwrap();
        assert_eq!(fs::read(store.blob_path(&digest)).unwrap(), b"elsewhere");
    }

    #[test]
    fn write_image_is_deterministic_and_spec_shaped() {
        let (_a, tree, _) = parent_and_child();
        let spec_for = |store: &OciStore| {
            let (layer, stats) = store.put_layer(None, &tree).unwrap();
            ImageSpec {
                entrypoint: vec!["/bin/app".into(), "--serve".into()],
                env: vec!["PORT=8080".into(), "MODE=prod".into()],
                labels: BTreeMap::from([("org.example.b".into(), "2".into()), ("org.example.a".into(), "1".into())]),
                layers: vec![layer],
                diff_ids: vec![stats.digest],
            }
        };
        let ((_d1, one), (_d2, two)) = (store(), store());
        let (spec_one, spec_two) = (spec_for(&one), spec_for(&two));
        let digest = one.write_image(&spec_one).unwrap();
        assert_eq!(two.write_image(&spec_two).unwrap(), digest);
        assert_eq!(one.write_image(&spec_one).unwrap(), digest);

        let manifest_bytes = fs::read(one.blob_path(&digest)).unwrap();
        let manifest = one.manifest(&digest).unwrap();
        let config_bytes = fs::read(one.blob_path(&manifest.config.digest)).unwrap();
        for bytes in [&manifest_bytes, &config_bytes] {
            let value: serde_json::Value = serde_json::from_slice(bytes).unwrap();
            assert_eq!(&canonical_json(&value).unwrap(), bytes, "sorted keys, no whitespace");
        }
        let config: serde_json::Value = serde_json::from_slice(&config_bytes).unwrap();
        let (os, arch) = oci_platform();
        assert_eq!(config["created"], "1970-01-01T00:00:00Z");
        assert_eq!((config["os"].as_str().unwrap(), config["architecture"].as_str().unwrap()), (os, arch));
        if cfg!(target_arch = "x86_64") {
            assert_eq!(arch, "amd64");
        }
        assert_eq!(config["rootfs"], serde_json::json!({"type": "layers", "diff_ids": [spec_one.diff_ids[0]]}));
        assert_eq!(config["config"]["Entrypoint"], serde_json::json!(["/bin/app", "--serve"]));
        let manifest_json: serde_json::Value = serde_json::from_slice(&manifest_bytes).unwrap();
        assert_eq!(manifest_json["mediaType"], MEDIA_TYPE_MANIFEST);
        assert_eq!(manifest_json["config"]["mediaType"], MEDIA_TYPE_CONFIG);
        assert_eq!(manifest_json["layers"][0]["mediaType"], MEDIA_TYPE_LAYER);

        let parsed = one.image_config(&manifest).unwrap();
        assert_eq!(parsed.entrypoint, spec_one.entrypoint);
        assert_eq!(parsed.env, spec_one.env);
        assert_eq!(parsed.labels, spec_one.labels);
        assert_eq!(parsed.diff_ids, spec_one.diff_ids);
        assert_eq!(manifest.layers, spec_one.layers);

        let mut other = spec_one.clone();
        other.env.push("EXTRA=1".into());
        assert_ne!(one.write_image(&other).unwrap(), digest, "any change to the spec changes the digest");
    }

    #[test]
    fn write_image_refuses_inconsistent_specs() {
        let (_dir, store) = store();
        let blob = store.put_blob(b"not really a tar").unwrap();
        let mut spec = ImageSpec { layers: vec![Descriptor::layer(blob, 16)], ..ImageSpec::default() };
        assert!(matches!(store.write_image(&spec), Err(OciError::InvalidImage { .. })));
        spec.diff_ids = vec![Digest::of(b"other")];
        assert!(matches!(store.write_image(&spec), Err(OciError::InvalidImage { .. })));
        let missing = Digest::of(b"absent");
        spec.layers = vec![Descriptor::layer(missing, 6)];
        spec.diff_ids = vec![missing];
        assert!(matches!(store.write_image(&spec), Err(OciError::Missing { digest, .. }) if digest == missing));
    }

    #[test]
    fn tag_replaces_a_ref_and_keeps_the_index_sorted() {
        let (_dir, store) = store();
        let (_trees, parent, child) = parent_and_child();
        let first = image(&store, &[&parent]);
        let second = image(&store, &[&parent, &child]);
        store.tag("hello:latest", &first).unwrap();
        store.tag("hello:3f2a9c1b0e7d", &first).unwrap();
        store.tag("hello:latest", &second).unwrap();
        assert_eq!(
            store.refs().unwrap(),
            [("hello:3f2a9c1b0e7d".to_string(), first), ("hello:latest".to_string(), second)]
        );
        let index: serde_json::Value =
            serde_json::from_slice(&fs::read(store.root().join("index.json")).unwrap()).unwrap();
        let manifests = index["manifests"].as_array().unwrap();
        assert_eq!(manifests.len(), 2, "the replaced entry is gone");
        assert_eq!(manifests[1]["annotations"][REF_NAME_ANNOTATION], "hello:latest");
        assert_eq!(manifests[1]["digest"], second.to_string());
        assert_eq!(manifests[1]["mediaType"], MEDIA_TYPE_MANIFEST);
        assert_eq!(manifests[1]["size"], fs::metadata(store.blob_path(&second)).unwrap().len());

        store.untag("hello:3f2a9c1b0e7d").unwrap();
        store.untag("never-tagged").unwrap();
        assert_eq!(store.refs().unwrap(), [("hello:latest".to_string(), second)]);
        assert_eq!(fs::read_dir(store.temp_dir()).unwrap().count(), 0);
    }

    #[test]
    fn tag_refuses_bad_names_and_non_manifests() {
        let (_dir, store) = store();
        let (_trees, parent, _) = parent_and_child();
        let digest = image(&store, &[&parent]);
        for bad in ["", "a b", ":x", "x:", "a//b", "a..b", "über"] {
            assert!(matches!(store.tag(bad, &digest), Err(OciError::InvalidRef { .. })), "{bad:?}");
        }
        for good in ["a", "hello:latest", "registry.example/team/app:v1.2-rc_1", "a--b", "x@sha256:ab"] {
            store.tag(good, &digest).unwrap();
        }
        let config = store.manifest(&digest).unwrap().config.digest;
        assert!(store.tag("config", &config).is_err(), "a config blob is not a manifest");
        let absent = Digest::of(b"absent");
        assert!(matches!(store.tag("absent", &absent), Err(OciError::Missing { .. })));
    }

    #[test]
    fn verify_image_names_the_damaged_blob() {
        let (_dir, store) = store();
        let (_trees, parent, child) = parent_and_child();
        let digest = image(&store, &[&parent, &child]);
        store.verify_image(&digest).unwrap();
        let manifest = store.manifest(&digest).unwrap();
        let layer = manifest.layers[1].digest;
        let path = store.blob_path(&layer);
        let mut bytes = fs::read(&path).unwrap();
        bytes[1030] ^= 0x01; // inside bin/app's content, so the tar still parses
        fs::write(&path, &bytes).unwrap();
        match store.verify_image(&digest) {
            Err(OciError::Mismatch { digest: bad, what }) => {
                assert_eq!(bad, layer);
                assert_eq!(what, "layer 2 of 2");
            }
            other => panic!("wanted a mismatch, got {other:?}"),
        }
        let err = store.unpack(&digest, &store.root().join("../unpacked")).unwrap_err();
        assert!(matches!(err, OciError::Mismatch { digest: bad, .. } if bad == layer), "unpack checks too: {err}");
        fs::remove_file(store.blob_path(&manifest.config.digest)).unwrap();
        assert!(matches!(store.verify_image(&digest), Err(OciError::Missing { what, .. }) if what == "config"));
        fs::write(store.blob_path(&digest), b"{}").unwrap();
        assert!(matches!(store.verify_image(&digest), Err(OciError::Mismatch { what, .. }) if what == "manifest"));
    }

    #[test]
    fn child_layer_holds_only_the_changes() {
        let (_dir, store) = store();
        let (_trees, parent, child) = parent_and_child();
        let (descriptor, _) = store.put_layer(Some(&parent), &child).unwrap();
        let names: Vec<String> =
            list_entries(&fs::read(store.blob_path(&descriptor.digest)).unwrap()).into_iter().map(|e| e.0).collect();
        let long = format!("{}/", "x".repeat(150));
        assert_eq!(
            names,
            [
                "bin/",
                "bin/app",
                "etc/",
                "etc/.wh.old.conf",
                "etc/app.conf",
                "etc/current",
                "share",
                "swap/",
                "swap/inside",
                "var/",
                "var/.wh.cache",
                &long,
                &format!("{long}long"),
            ]
        );
    }

    #[test]
    fn unpacking_parent_and_child_reproduces_the_child_tree() {
        let (_dir, store) = store();
        let (trees, parent, child) = parent_and_child();
        let digest = image(&store, &[&parent, &child]);
        let dest = trees.path().join("unpacked");
        store.unpack(&digest, &dest).unwrap();
        let (want, got) = (snapshot(&child), snapshot(&dest));
        assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>());
        assert_eq!(want, got);

        let only_parent = image(&store, &[&parent]);
        let dest = trees.path().join("parent-only");
        store.unpack(&only_parent, &dest).unwrap();
        assert_eq!(snapshot(&parent), snapshot(&dest));

        write(&dest, "stray", b"", 0o644);
        assert!(matches!(store.unpack(&digest, &dest), Err(OciError::NotEmpty { .. })));
    }

    #[test]
    fn opaque_whiteouts_hide_only_lower_layers() {
        let (dir, store) = store();
        let lower = crafted(&[
            ("d/", EntryType::Directory, b"", ""),
            ("d/old", EntryType::Regular, b"old", ""),
            ("d/sub/", EntryType::Directory, b"", ""),
            ("d/sub/x", EntryType::Regular, b"x", ""),
            ("keep", EntryType::Regular, b"keep", ""),
        ]);
        let upper = crafted(&[
            ("d/", EntryType::Directory, b"", ""),
            ("d/new", EntryType::Regular, b"new", ""),
            ("d/.wh..wh..opq", EntryType::Regular, b"", ""),
            ("hard", EntryType::Link, b"", "keep"),
        ]);
        let digest = image_of_tars(&store, &[lower, upper]);
        let dest = dir.path().join("out");
        store.unpack(&digest, &dest).unwrap();
        let got: Vec<_> = snapshot(&dest).into_keys().collect();
        assert_eq!(got, [Path::new("d"), Path::new("d/new"), Path::new("hard"), Path::new("keep")]);
        assert_eq!(fs::metadata(dest.join("hard")).unwrap().ino(), fs::metadata(dest.join("keep")).unwrap().ino());
    }

    #[test]
    fn unpack_refuses_entries_that_escape() {
        let (dir, store) = store();
        let outside = dir.path().join("outside");
        fs::create_dir_all(&outside).unwrap();
        let link_target = outside.to_str().unwrap().to_string();
        let cases: Vec<(&str, Vec<Vec<u8>>)> = vec![
            ("../x", vec![crafted(&[("../x", EntryType::Regular, b"evil", "")])]),
            ("a/../../x", vec![crafted(&[("a/../../x", EntryType::Regular, b"evil", "")])]),
            ("/abs", vec![crafted(&[("/abs", EntryType::Regular, b"evil", "")])]),
            (
                "through a symlink",
                vec![
                    crafted(&[("l", EntryType::Symlink, b"", &link_target)]),
                    crafted(&[("l/x", EntryType::Regular, b"evil", "")]),
                ],
            ),
            (
                "whiteout of ..",
                vec![crafted(&[("a/", EntryType::Directory, b"", ""), ("a/.wh...", EntryType::Regular, b"", "")])],
            ),
            ("hard link out", vec![crafted(&[("h", EntryType::Link, b"", "../outside/victim")])]),
        ];
        for (i, (case, layers)) in cases.into_iter().enumerate() {
            let digest = image_of_tars(&store, &layers);
            let err = store.unpack(&digest, &dir.path().join(format!("dest{i}"))).unwrap_err();
            assert!(matches!(err, OciError::Escape { .. }), "{case}: {err}");
        }
        assert_eq!(fs::read_dir(&outside).unwrap().count(), 0, "nothing was written outside");
        assert!(!dir.path().join("x").exists() && !Path::new("/abs").exists());
    }

    #[test]
    fn garbage_collection_keeps_what_tags_reach() {
        let (_dir, store) = store();
        let (_trees, parent, child) = parent_and_child();
        let kept = image(&store, &[&parent]);
        let dropped = image(&store, &[&parent, &child]);
        let stray = store.put_blob(b"unreferenced").unwrap();
        store.tag("app:kept", &kept).unwrap();
        store.tag("app:dropped", &dropped).unwrap();
        assert_eq!(store.collect_garbage().unwrap(), 12, "only the stray blob goes while both are tagged");
        assert!(!store.has_blob(&stray));

        store.untag("app:dropped").unwrap();
        let manifest = store.manifest(&dropped).unwrap();
        let gone = [dropped, manifest.config.digest, manifest.layers[1].digest];
        let expected: u64 = gone.iter().map(|d| fs::metadata(store.blob_path(d)).unwrap().len()).sum();
        assert_eq!(store.collect_garbage().unwrap(), expected);
        for digest in gone {
            assert!(!store.has_blob(&digest), "{digest} should be collected");
        }
        assert!(store.has_blob(&manifest.layers[0].digest), "the shared parent layer stays");
        store.verify_image(&kept).unwrap();
        assert_eq!(store.collect_garbage().unwrap(), 0);
    }

    #[test]
    fn pinned_blobs_hold_off_garbage_collection() {
        let (_dir, store) = store();
        let pin = store.pin_blobs().unwrap();
        let blob = store.put_blob(b"not tagged yet").unwrap();
        let gc_store = store.clone();
        let gc = std::thread::spawn(move || gc_store.collect_garbage().unwrap());
        std::thread::sleep(Duration::from_millis(200));
        assert!(!gc.is_finished(), "collection waits for the pin");
        assert!(store.has_blob(&blob));
        drop(pin);
        assert_eq!(gc.join().unwrap(), 14);
    }
}
