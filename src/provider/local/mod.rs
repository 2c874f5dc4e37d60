//! The local provider: OCI image layouts in `.kiln/oci/`, instances as detached local processes, and a reverse
//! proxy per stage on a stable loopback port.

pub mod fleet;
pub mod layer;
pub mod oci;
mod plan;
pub mod provision;
pub mod proxy;
mod rootfs;
pub mod stage;
pub mod supervise;

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::config::{Instance, Provision, Recipe};
use crate::digest::Digest;
use crate::provider::{BakeJob, ImageCopy, ImageProvider, ImageRef, ProviderError, Reproduction, RootFs, StageRef};

use oci::{Descriptor, ImageSpec, OciStore};

/// The label that carries an image's `[instance]` section, so a deploy starts instances the way the image was
/// baked to start, whatever the recipe says today.
pub const INSTANCE_LABEL: &str = "dev.kiln.instance";
const LAYER_MEDIA_TYPE: &str = "application/vnd.oci.image.layer.v1.tar";

const WORK_DIR_PREFIX: &str = "bake-";

/// A work directory removed (write-protected parts included) when dropped: on success, on failure and on an
/// interrupt alike.
struct WorkDir(PathBuf);

impl WorkDir {
    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(err) = remove_tree(&self.0) {
            tracing::warn!(%err, "could not remove {}; `kiln gc` will", self.0.display());
        }
    }
}

/// The bytes of the files under `path`, best effort.
fn tree_size(path: &Path) -> u64 {
    let Ok(meta) = fs::symlink_metadata(path) else { return 0 };
    if !meta.is_dir() {
        return meta.len();
    }
    fs::read_dir(path).map(|entries| entries.flatten().map(|e| tree_size(&e.path())).sum()).unwrap_or(0)
}

pub struct LocalProvider {
    state: PathBuf,
    /// Keeps a throwaway state directory alive (for `bake --check`).
    _scratch: Option<tempfile::TempDir>,
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> ProviderError {
    let path = path.to_path_buf();
    move |source| ProviderError::Io { what, path, source }
}

fn oci_error(err: oci::OciError) -> ProviderError {
    ProviderError::Other { provider: "local", message: err.to_string() }
}

impl LocalProvider {
    /// The provider whose state (OCI store, unpacked images, stage runtime) lives in `state_dir` (`.kiln/`).
    pub fn new(state_dir: PathBuf) -> LocalProvider {
        LocalProvider { state: state_dir, _scratch: None }
    }

    fn scratch() -> Result<LocalProvider, ProviderError> {
        let dir = tempfile::Builder::new().prefix("kiln-check-").tempdir().map_err(|source| ProviderError::Io {
            what: "creating a scratch store",
            path: std::env::temp_dir(),
            source,
        })?;
        Ok(LocalProvider { state: dir.path().to_path_buf(), _scratch: Some(dir) })
    }

    pub fn state_dir(&self) -> &Path {
        &self.state
    }

    pub fn store(&self) -> Result<OciStore, ProviderError> {
        OciStore::open(&self.state.join("oci")).map_err(oci_error)
    }

    /// A fresh `.kiln/tmp/bake-<pid>-<start time>-…` directory, removed when dropped. Its name says which kiln
    /// process owns it, so `kiln gc` can remove it once that process is gone without ever racing a running bake.
    fn work_dir(&self) -> Result<WorkDir, ProviderError> {
        let tmp = self.state.join("tmp");
        fs::create_dir_all(&tmp).map_err(io_error("creating the work directory", &tmp))?;
        let pid = std::process::id() as i32;
        let started = crate::process::start_time(pid).unwrap_or(0);
        let dir = tempfile::Builder::new()
            .prefix(&format!("{WORK_DIR_PREFIX}{pid}-{started}-"))
            .tempdir_in(&tmp)
            .map_err(io_error("creating the work directory", &tmp))?;
        Ok(WorkDir(dir.keep()))
    }

    /// Removes the work directories in `.kiln/tmp/` whose owning kiln process is gone (killed, or from an older
    /// kiln that did not name its owner); returns the bytes freed.
    fn sweep_work_dirs(&self) -> Result<u64, ProviderError> {
        let tmp = self.state.join("tmp");
        let entries = match fs::read_dir(&tmp) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => return Err(ProviderError::Io { what: "listing temporary directories", path: tmp, source }),
        };
        let mut freed = 0;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(owner) = name.strip_prefix(WORK_DIR_PREFIX) else { continue };
            let mut fields = owner.split('-');
            let pid = fields.next().and_then(|f| f.parse::<i32>().ok());
            let started = fields.next().and_then(|f| f.parse::<u64>().ok());
            if let (Some(pid), Some(started)) = (pid, started) {
                if crate::process::alive(pid, started) {
                    continue;
                }
            }
            let path = entry.path();
            freed += tree_size(&path);
            remove_tree(&path).map_err(io_error("removing a stale temporary directory", &path))?;
        }
        Ok(freed)
    }

    /// The image unpacked, read-only, in `.kiln/unpacked/<hex>/`: instances start from it and children build on it.
    pub fn unpacked(&self, image: &ImageRef) -> Result<PathBuf, ProviderError> {
        let dir = self.state.join("unpacked").join(image.digest.hex());
        if dir.is_dir() {
            return Ok(dir);
        }
        let work = self.work_dir()?;
        let staging = work.path().join("root");
        self.store()?.unpack(&image.digest, &staging).map_err(oci_error)?;
        make_read_only(&staging).map_err(io_error("making the unpacked image read-only", &staging))?;
        let parent = dir.parent().unwrap_or(&self.state);
        fs::create_dir_all(parent).map_err(io_error("creating", parent))?;
        match fs::rename(&staging, &dir) {
            Ok(()) => Ok(dir),
            // Another kiln unpacked the same image first: theirs is identical.
            Err(_) if dir.is_dir() => {
                let _ = remove_tree(&staging);
                Ok(dir)
            }
            Err(source) => Err(ProviderError::Io { what: "moving the unpacked image into place", path: dir, source }),
        }
    }

    fn apply_step(&self, job: &BakeJob, index: usize, step: &Provision, root: &Path) -> Result<(), ProviderError> {
        let failed = |command: String, reason: String, output_tail: String| ProviderError::Provision {
            recipe: job.recipe.name.clone(),
            step: index + 1,
            command,
            reason,
            output_tail,
        };
        if crate::process::interrupted() {
            return Err(failed(describe(step), "interrupted".into(), String::new()));
        }
        match step {
            Provision::Copy { source, to } => {
                let dest = root.join(to.trim_start_matches('/'));
                copy_inputs(&source.relative, &source.absolute, &dest, job.inputs)
                    .map_err(|e| failed(format!("copy {} to {to}", source.relative), e.to_string(), String::new()))
            }
            Provision::Run { script, timeout_secs } => {
                let executable =
                    fs::metadata(&script.absolute).map(|m| m.permissions().mode() & 0o111 != 0).unwrap_or(false);
                let script_path = script.absolute.to_string_lossy().into_owned();
                let (program, args): (&Path, Vec<&str>) = if executable {
                    (&script.absolute, vec![])
                } else {
                    (Path::new("/bin/sh"), vec![script_path.as_str()])
                };
                let timeout = std::time::Duration::from_secs(*timeout_secs);
                let outcome = provision::run_step(program, &args, root, timeout, job.echo_output)
                    .map_err(|e| failed(format!("run {}", script.relative), e.to_string(), String::new()))?;
                if outcome.success() {
                    Ok(())
                } else {
                    Err(failed(format!("run {}", script.relative), outcome.failure_reason(timeout), outcome.tail))
                }
            }
            Provision::Shell { command, timeout_secs } => {
                let timeout = std::time::Duration::from_secs(*timeout_secs);
                let outcome =
                    provision::run_step(Path::new("/bin/sh"), &["-c", command], root, timeout, job.echo_output)
                        .map_err(|e| failed(format!("shell {command}"), e.to_string(), String::new()))?;
                if outcome.success() {
                    Ok(())
                } else {
                    Err(failed(format!("shell {command}"), outcome.failure_reason(timeout), outcome.tail))
                }
            }
        }
    }

    /// The layers, diff ids and config of a stored image.
    fn image_parts(
        &self,
        store: &OciStore,
        digest: &Digest,
    ) -> Result<(Vec<Descriptor>, oci::ImageConfig), ProviderError> {
        let manifest = store.manifest(digest).map_err(oci_error)?;
        let config = store.image_config(&manifest).map_err(oci_error)?;
        Ok((manifest.layers, config))
    }

    /// Why two images with different digests differ: the first file in the first differing layer.
    fn difference(&self, expected: &Digest, other: &LocalProvider, rebuilt: &Digest) -> Option<String> {
        let ours = self.store().ok()?;
        let theirs = other.store().ok()?;
        let (a_layers, _) = self.image_parts(&ours, expected).ok()?;
        let (b_layers, _) = other.image_parts(&theirs, rebuilt).ok()?;
        for (a, b) in a_layers.iter().zip(&b_layers) {
            if a.digest != b.digest {
                let first =
                    layer::first_difference(&ours.blob_path(&a.digest), &theirs.blob_path(&b.digest)).ok()??;
                return Some(first);
            }
        }
        if a_layers.len() != b_layers.len() {
            return Some(format!("the images have {} and {} layers", a_layers.len(), b_layers.len()));
        }
        Some("the image config (entrypoint, environment or labels); every layer is identical".into())
    }
}

impl ImageProvider for LocalProvider {
    fn name(&self) -> &'static str {
        "local"
    }

    fn build_settings(&self, _recipe: &Recipe) -> Result<serde_json::Value, ProviderError> {
        let (os, architecture) = oci::oci_platform();
        Ok(serde_json::json!({
            "layer": "tar, uncompressed, sorted, mtime 0, uid/gid 0, modes 0644/0755",
            "os": os,
            "architecture": architecture,
        }))
    }

    fn has_image(&self, image: &ImageRef) -> Result<bool, ProviderError> {
        // A store that does not exist yet holds no image; one that cannot be read is an error, not a cache miss.
        if !self.state.join("oci").exists() {
            return Ok(false);
        }
        Ok(self.store()?.has_blob(&image.digest))
    }

    fn bake(&self, job: &BakeJob) -> Result<ImageRef, ProviderError> {
        let store = self.store()?;
        let work = self.work_dir()?;
        let root = work.path().join("root");
        let (base, mut layers, mut diff_ids, parent_config) = match &job.parent {
            Some(parent) => {
                let base = self.unpacked(parent)?;
                copy_into(&base, &root).map_err(io_error("copying the parent image", &root))?;
                let (layers, config) = self.image_parts(&store, &parent.digest)?;
                (Some(base), layers, config.diff_ids.clone(), Some(config))
            }
            None => {
                fs::create_dir_all(&root).map_err(io_error("creating the image root", &root))?;
                (None, Vec::new(), Vec::new(), None)
            }
        };
        let steps = job.recipe.provision.len();
        job.progress.begin(&format!("{}: provisioning", job.recipe.name), Some(steps as u64));
        for (index, step) in job.recipe.provision.iter().enumerate() {
            tracing::info!(recipe = %job.recipe.name, "step {}/{steps}: {}", index + 1, describe(step));
            job.progress.update(index as u64, &format!("step {}: {}", index + 1, describe(step)));
            if let Err(err) = self.apply_step(job, index, step, &root) {
                job.progress.end("failed");
                return Err(err);
            }
        }
        job.progress.end("provisioned");
        // Blobs written before the image is tagged must survive a concurrent `kiln gc`.
        let _pin = store.pin_blobs().map_err(oci_error)?;
        let (temp, stats) = layer::write_diff_layer_file(base.as_deref(), &root, &store.temp_dir())
            .map_err(|e| ProviderError::Other { provider: "local", message: format!("writing the layer: {e}") })?;
        store.put_blob_file(temp, &stats.digest).map_err(oci_error)?;
        layers.push(Descriptor {
            media_type: LAYER_MEDIA_TYPE.into(),
            digest: stats.digest,
            size: stats.size,
            annotations: BTreeMap::new(),
        });
        diff_ids.push(stats.digest);

        let mut labels = job.labels.clone();
        let (entrypoint, env) = match &job.recipe.instance {
            Some(instance) => {
                let encoded = serde_json::to_string(instance)
                    .map_err(|e| ProviderError::Other { provider: "local", message: e.to_string() })?;
                labels.insert(INSTANCE_LABEL.into(), encoded);
                (instance.command.clone(), instance.env.iter().map(|(k, v)| format!("{k}={v}")).collect())
            }
            None => match &parent_config {
                Some(config) => {
                    if let Some(inherited) = config.labels.get(INSTANCE_LABEL) {
                        labels.insert(INSTANCE_LABEL.into(), inherited.clone());
                    }
                    (config.entrypoint.clone(), config.env.clone())
                }
                None => (Vec::new(), Vec::new()),
            },
        };
        let digest = store.write_image(&ImageSpec { entrypoint, env, labels, layers, diff_ids }).map_err(oci_error)?;
        let image_ref = format!("{}:{}", job.recipe.name, digest.short());
        store.tag_annotated(&image_ref, &digest, &job.annotations).map_err(oci_error)?;
        Ok(ImageRef::new(digest, image_ref))
    }

    fn check_reproducible(&self, chain: &[(BakeJob, Digest)]) -> Result<Reproduction, ProviderError> {
        let scratch = LocalProvider::scratch()?;
        let mut parent: Option<ImageRef> = None;
        for (job, expected) in chain {
            let rebuild = BakeJob {
                recipe: job.recipe,
                recipe_key: job.recipe_key,
                parent: parent.clone(),
                labels: job.labels.clone(),
                annotations: job.annotations.clone(),
                inputs: job.inputs,
                echo_output: job.echo_output,
                progress: job.progress,
            };
            let rebuilt = scratch.bake(&rebuild)?;
            if rebuilt.digest != *expected {
                return Ok(Reproduction::Differs {
                    recipe: job.recipe.name.clone(),
                    expected: *expected,
                    rebuilt: rebuilt.digest,
                    first_difference: self.difference(expected, &scratch, &rebuilt.digest),
                });
            }
            parent = Some(rebuilt);
        }
        Ok(Reproduction::Identical)
    }

    fn root_fs(&self, image: &ImageRef) -> Result<RootFs, ProviderError> {
        if !self.has_image(image)? {
            return Err(ProviderError::MissingImage {
                provider: "local",
                image: image.image_ref.clone(),
                reason: format!("no manifest blob {}", image.digest),
            });
        }
        Ok(RootFs::Listed(rootfs::list(&self.store()?, &image.digest).map_err(oci_error)?))
    }

    fn verify_image(&self, image: &ImageRef) -> Result<(), ProviderError> {
        let store = self.store()?;
        if !store.has_blob(&image.digest) {
            return Err(ProviderError::MissingImage {
                provider: "local",
                image: image.image_ref.clone(),
                reason: format!("no manifest blob {}", image.digest),
            });
        }
        store
            .verify_image(&image.digest)
            .map_err(|e| ProviderError::Drift { image: image.image_ref.clone(), reason: e.to_string() })
    }

    fn delete_image(&self, image: &ImageRef) -> Result<(), ProviderError> {
        let store = self.store()?;
        for (name, digest) in store.refs().map_err(oci_error)? {
            if digest == image.digest {
                store.untag(&name).map_err(oci_error)?;
            }
        }
        let unpacked = self.state.join("unpacked").join(image.digest.hex());
        remove_tree(&unpacked).map_err(io_error("removing the unpacked image", &unpacked))
    }

    fn collect_garbage(&self) -> Result<u64, ProviderError> {
        let blobs = self.store()?.collect_garbage().map_err(oci_error)?;
        Ok(blobs + self.sweep_work_dirs()?)
    }

    fn image_labels(&self, image: &ImageRef) -> Result<BTreeMap<String, String>, ProviderError> {
        let store = self.store()?;
        let (_, config) = self.image_parts(&store, &image.digest)?;
        let mut labels = config.labels;
        // The provider sets this one itself from the recipe's [instance].
        labels.remove(INSTANCE_LABEL);
        Ok(labels)
    }

    fn instance_of(&self, image: &ImageRef) -> Result<Option<Instance>, ProviderError> {
        let store = self.store()?;
        let (_, config) = self.image_parts(&store, &image.digest)?;
        match config.labels.get(INSTANCE_LABEL) {
            None => Ok(None),
            Some(text) => serde_json::from_str(text).map(Some).map_err(|e| ProviderError::Other {
                provider: "local",
                message: format!("image {} has a bad {INSTANCE_LABEL} label: {e}", image.image_ref),
            }),
        }
    }

    fn distribute(
        &self,
        image: &ImageRef,
        _regions: &[String],
        _accounts: &[String],
    ) -> Result<Vec<ImageCopy>, ProviderError> {
        // One machine, one store: there is nowhere else to copy to.
        Ok(image.copies.clone())
    }

    /// A no-op: the local store deletes an image only when `kiln gc` does, and gc keeps every image that reached
    /// a pipeline's last stage, so there is nothing more to guard.
    fn protect(&self, _image: &ImageRef) -> Result<(), ProviderError> {
        Ok(())
    }

    fn publish_pointer(&self, stage: StageRef, image: &ImageRef) -> Result<String, ProviderError> {
        let pointer = pointer_name(stage);
        // Tagging replaces the ref in one rewrite of index.json: a reader sees the old image or the new one.
        self.store()?.tag(&pointer, &image.digest).map_err(oci_error)?;
        Ok(pointer)
    }

    fn pointer(&self, stage: StageRef) -> Result<Option<Digest>, ProviderError> {
        if !self.state.join("oci").exists() {
            return Ok(None);
        }
        let pointer = pointer_name(stage);
        let refs = self.store()?.refs().map_err(oci_error)?;
        Ok(refs.into_iter().find(|(name, _)| *name == pointer).map(|(_, digest)| digest))
    }

    fn prepare_bake(&self, _chain: &[Recipe], _update_base: bool, _plan: bool) -> Result<Vec<String>, ProviderError> {
        // A local root recipe starts from an empty root: there is no base to resolve.
        Ok(Vec::new())
    }

    fn plan_bake(&self, recipe: &Recipe, recorded: Option<&ImageRef>) -> Vec<String> {
        if let Some(image) = recorded {
            return vec![format!("local: find {} in .kiln/oci (a cache hit builds nothing)", image.image_ref)];
        }
        let mut plan = vec![format!("local: unpack the parent's layers into a temporary root for `{}`", recipe.name)];
        plan.extend(
            recipe.provision.iter().enumerate().map(|(n, step)| format!("local: step {}: {}", n + 1, describe(step))),
        );
        plan.push("local: write the layer, config and manifest to .kiln/oci and tag them".into());
        plan
    }

    fn image_users(&self, _image: &ImageRef) -> Result<Vec<String>, ProviderError> {
        // Local instances run from images kiln's own groups name, which gc already keeps (Fleet::groups).
        Ok(Vec::new())
    }

    fn plan_promote(&self, stage: StageRef, image: &ImageRef, protect: bool) -> Vec<String> {
        plan::promote(stage, image, protect)
    }
}

/// The OCI ref of a stage pointer: `<pipeline>-<stage>`, so `skopeo inspect oci:.kiln/oci:hello-prod` shows what
/// prod should run. Image refs are `<recipe>:<short digest>`, so the two never collide.
pub fn pointer_name(stage: StageRef) -> String {
    format!("{}-{}", stage.pipeline, stage.stage.name)
}

fn describe(step: &Provision) -> String {
    match step {
        Provision::Copy { source, to } => format!("copy {} to {to}", source.relative),
        Provision::Run { script, .. } => format!("run {}", script.relative),
        Provision::Shell { command, .. } => format!("shell {command}"),
    }
}

/// Copies the recipe source `rel` (at `abs`) to `dest`: exactly the entries of `inputs` at or below `rel`, the
/// files its recipe key was computed from, so nothing git does not track reaches the image.
fn copy_inputs(
    rel: &str,
    abs: &Path,
    dest: &Path,
    inputs: &BTreeMap<String, crate::engine::recipe_key::FileInput>,
) -> std::io::Result<()> {
    let below = format!("{rel}/");
    let itself = inputs.get_key_value(rel).map(|(path, _)| path);
    let descendants = inputs.range(below.clone()..).map(|(path, _)| path).take_while(|path| path.starts_with(&below));
    // Sorted paths put a directory before everything in it.
    for path in itself.into_iter().chain(descendants) {
        let inner = path[rel.len()..].trim_start_matches('/');
        let (from, to) = if inner.is_empty() {
            (abs.to_path_buf(), dest.to_path_buf())
        } else {
            (abs.join(inner), dest.join(inner))
        };
        copy_entry(&from, &to)?;
    }
    Ok(())
}

/// Copies a file, symlink or directory tree to `dest`, merging into existing directories. Copies are writable by
/// their owner even when the source is read-only, so provision steps can change them.
pub fn copy_into(source: &Path, dest: &Path) -> std::io::Result<()> {
    if copy_entry(source, dest)? {
        for entry in fs::read_dir(source)? {
            let entry = entry?;
            copy_into(&entry.path(), &dest.join(entry.file_name()))?;
        }
    }
    Ok(())
}

/// Copies one file or symlink, or creates one directory (without its contents); true for a directory.
fn copy_entry(source: &Path, dest: &Path) -> std::io::Result<bool> {
    let meta = fs::symlink_metadata(source)?;
    let kind = meta.file_type();
    if kind.is_symlink() {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        if fs::symlink_metadata(dest).is_ok() {
            fs::remove_file(dest)?;
        }
        std::os::unix::fs::symlink(fs::read_link(source)?, dest)?;
        Ok(false)
    } else if kind.is_dir() {
        fs::create_dir_all(dest)?;
        fs::set_permissions(dest, fs::Permissions::from_mode((meta.permissions().mode() & 0o7777) | 0o700))?;
        Ok(true)
    } else {
        if let Some(parent) = dest.parent() {
            fs::create_dir_all(parent)?;
        }
        if fs::symlink_metadata(dest).is_ok_and(|m| !m.is_dir()) {
            fs::remove_file(dest)?;
        }
        fs::copy(source, dest)?;
        fs::set_permissions(dest, fs::Permissions::from_mode((meta.permissions().mode() & 0o7777) | 0o600))?;
        Ok(false)
    }
}

/// Drops every write bit under `dir`: instances must not change their image.
pub fn make_read_only(dir: &Path) -> std::io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    if meta.is_dir() {
        for entry in fs::read_dir(dir)? {
            make_read_only(&entry?.path())?;
        }
    }
    fs::set_permissions(dir, fs::Permissions::from_mode(meta.permissions().mode() & !0o222))
}

/// Removes a tree that [`make_read_only`] protected.
pub fn remove_tree(dir: &Path) -> std::io::Result<()> {
    fn writable(dir: &Path) -> std::io::Result<()> {
        let meta = fs::symlink_metadata(dir)?;
        if meta.is_dir() {
            fs::set_permissions(dir, fs::Permissions::from_mode(meta.permissions().mode() | 0o700))?;
            for entry in fs::read_dir(dir)? {
                writable(&entry?.path())?;
            }
        }
        Ok(())
    }
    if fs::symlink_metadata(dir).is_err() {
        return Ok(());
    }
    writable(dir)?;
    fs::remove_dir_all(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::recipe_key::FileInput;

    #[test]
    fn a_copy_takes_exactly_the_inputs_below_its_source() {
        let repo = tempfile::tempdir().unwrap();
        let source = repo.path().join("files/a");
        fs::create_dir_all(source.join("sub")).unwrap();
        for (name, text) in [("kept", "1"), ("sub/kept", "2"), ("notes.swp", "secret"), ("sub/untracked", "3")] {
            fs::write(source.join(name), text).unwrap();
        }
        fs::write(repo.path().join("files/a-sibling"), "not below files/a").unwrap();
        let file = FileInput::File { sha256: Digest::ZERO, executable: false };
        let inputs: BTreeMap<String, FileInput> = [
            ("files/a", FileInput::Dir),
            ("files/a-sibling", file.clone()),
            ("files/a/kept", file.clone()),
            ("files/a/sub", FileInput::Dir),
            ("files/a/sub/kept", file),
        ]
        .into_iter()
        .map(|(path, input)| (path.to_string(), input))
        .collect();
        let dest = repo.path().join("image/etc/a");
        copy_inputs("files/a", &source, &dest, &inputs).unwrap();
        let mut copied: Vec<String> = Vec::new();
        for entry in fs::read_dir(&dest).unwrap().chain(fs::read_dir(dest.join("sub")).unwrap()) {
            let path = entry.unwrap().path();
            copied.push(path.strip_prefix(&dest).unwrap().display().to_string());
        }
        copied.sort();
        assert_eq!(copied, ["kept", "sub", "sub/kept"]);
        assert!(!repo.path().join("image/etc/a-sibling").exists());
    }
}
