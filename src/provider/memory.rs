//! An in-memory provider for engine tests: images and groups of instances are entries in a map, every group is
//! healthy as soon as it runs, and traffic goes where `route` last sent it. Wrapped in [`super::inject::Faulty`],
//! it fails, hangs, reports unhealthy or crashes on any chosen call.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::{
    BakeJob, Fleet, GroupHealth, GroupInfo, ImageCopy, ImageProvider, ImageRef, PollCadence, ProviderError,
    Reproduction, StageRef,
};
use crate::config::{Health, Instance, Recipe};
use crate::digest::Digest;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryGroup {
    pub digest: Digest,
    pub capacity: u32,
    pub running: u32,
}

#[derive(Debug, Default)]
struct State {
    images: BTreeMap<Digest, Option<Instance>>,
    /// "pipeline/stage" → group → group.
    groups: BTreeMap<String, BTreeMap<String, MemoryGroup>>,
    serving: BTreeMap<String, String>,
    /// Every route, in order: (stage, group).
    routes: Vec<(String, String)>,
    /// "pipeline/stage" → the digest its pointer names.
    pointers: BTreeMap<String, Digest>,
    protected: std::collections::BTreeSet<Digest>,
    /// The copies `distribute` made, per image: what `verify_image` checks an image's copies against.
    copies: BTreeMap<Digest, Vec<ImageCopy>>,
    /// What outside kiln uses an image, as `image_users` reports it.
    users: BTreeMap<Digest, Vec<String>>,
    /// "pipeline/stage/group" → instances relaunched behind kiln's back, with what each runs.
    strays: BTreeMap<String, Vec<(String, Digest)>>,
}

#[derive(Default)]
pub struct MemoryProvider {
    state: Mutex<State>,
}

fn key(stage: StageRef) -> String {
    format!("{}/{}", stage.pipeline, stage.stage.name)
}

pub fn test_instance() -> Instance {
    Instance { command: vec!["/bin/app".into()], env: BTreeMap::new(), health: Health::Tcp, ready_timeout_secs: 5 }
}

impl MemoryProvider {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers an image that starts instances.
    pub fn add_image(&self, digest: Digest) {
        self.state().images.insert(digest, Some(test_instance()));
    }

    pub fn groups_of(&self, stage: StageRef) -> BTreeMap<String, MemoryGroup> {
        self.state().groups.get(&key(stage)).cloned().unwrap_or_default()
    }

    pub fn serving_of(&self, stage: StageRef) -> Option<String> {
        self.state().serving.get(&key(stage)).cloned()
    }

    /// The digest the stage's pointer names.
    pub fn pointer_of(&self, stage: StageRef) -> Option<Digest> {
        self.state().pointers.get(&key(stage)).copied()
    }

    pub fn routes(&self) -> Vec<(String, String)> {
        self.state().routes.clone()
    }

    /// Deletes the image's copies in `region` behind kiln's back, as someone deregistering an AMI by hand would.
    pub fn delete_copy(&self, digest: Digest, region: &str) {
        if let Some(copies) = self.state().copies.get_mut(&digest) {
            copies.retain(|c| c.region != region);
        }
    }

    /// Declares that something outside kiln's ledger uses the image (as a launch template version would on AWS).
    pub fn add_user(&self, digest: Digest, user: &str) {
        self.state().users.entry(digest).or_default().push(user.to_string());
    }

    /// Stops one instance of the group, as a crash of that instance would.
    /// Replaces one of the group's instances with one that runs `digest`, as someone relaunching it by hand would:
    /// the group's own record is unchanged.
    pub fn relaunch_instance(&self, stage: StageRef, group: &str, instance: &str, digest: Digest) {
        self.state().strays.entry(format!("{}/{group}", key(stage))).or_default().push((instance.into(), digest));
    }

    pub fn kill_instance(&self, stage: StageRef, group: &str) {
        if let Some(g) = self.state().groups.get_mut(&key(stage)).and_then(|gs| gs.get_mut(group)) {
            g.running = g.running.saturating_sub(1);
        }
    }
}

fn missing(group: &str) -> ProviderError {
    ProviderError::Other { provider: "memory", message: format!("group {group} does not exist") }
}

impl ImageProvider for MemoryProvider {
    fn name(&self) -> &'static str {
        "memory"
    }
    fn build_settings(&self, _recipe: &Recipe) -> Result<serde_json::Value, ProviderError> {
        Ok(serde_json::Value::Null)
    }
    fn has_image(&self, image: &ImageRef) -> Result<bool, ProviderError> {
        Ok(self.state().images.contains_key(&image.digest))
    }
    fn bake(&self, job: &BakeJob) -> Result<ImageRef, ProviderError> {
        let digest = Digest::of(format!("memory image of {}", job.recipe_key).as_bytes());
        self.state().images.insert(digest, job.recipe.instance.clone());
        Ok(ImageRef::new(digest, format!("memory:{}", digest.short())))
    }
    fn check_reproducible(&self, _chain: &[(BakeJob, Digest)]) -> Result<Reproduction, ProviderError> {
        Ok(Reproduction::Identical)
    }
    fn verify_image(&self, image: &ImageRef) -> Result<(), ProviderError> {
        if !self.has_image(image)? {
            return Err(ProviderError::MissingImage {
                provider: "memory",
                image: image.image_ref.clone(),
                reason: "not in memory".into(),
            });
        }
        let held = self.state().copies.get(&image.digest).cloned().unwrap_or_default();
        match image.copies.iter().find(|copy| !held.contains(copy)) {
            None => Ok(()),
            Some(gone) => Err(ProviderError::MissingImage {
                provider: "memory",
                image: format!("{} (copy in {})", gone.id, gone.region),
                reason: "not in memory".into(),
            }),
        }
    }
    fn delete_image(&self, image: &ImageRef) -> Result<(), ProviderError> {
        self.state().images.remove(&image.digest);
        Ok(())
    }
    fn collect_garbage(&self) -> Result<u64, ProviderError> {
        Ok(0)
    }
    fn image_labels(&self, _image: &ImageRef) -> Result<BTreeMap<String, String>, ProviderError> {
        Ok(BTreeMap::new())
    }
    fn instance_of(&self, image: &ImageRef) -> Result<Option<Instance>, ProviderError> {
        Ok(self.state().images.get(&image.digest).cloned().flatten())
    }
    fn distribute(
        &self,
        image: &ImageRef,
        regions: &[String],
        accounts: &[String],
    ) -> Result<Vec<ImageCopy>, ProviderError> {
        // One copy per region, shared with every account, as a multi-region provider would record them. A copy
        // the image already records is trusted, not made again: deleting it behind kiln's back is for the content
        // gate to find.
        let mut state = self.state();
        let held = state.copies.entry(image.digest).or_default();
        let mut copies = image.copies.clone();
        for region in regions {
            for account in std::iter::once(None).chain(accounts.iter().map(Some)) {
                let copy = ImageCopy {
                    region: region.clone(),
                    account: account.cloned(),
                    id: format!("memory-{region}-{}", image.digest.short()),
                    snapshots: Vec::new(),
                };
                if !copies.contains(&copy) {
                    held.push(copy.clone());
                    copies.push(copy);
                }
            }
        }
        Ok(copies)
    }
    fn protect(&self, image: &ImageRef) -> Result<(), ProviderError> {
        self.state().protected.insert(image.digest);
        Ok(())
    }
    fn publish_pointer(&self, stage: StageRef, image: &ImageRef) -> Result<String, ProviderError> {
        self.state().pointers.insert(key(stage), image.digest);
        Ok(format!("memory://pointer/{}", key(stage)))
    }
    fn pointer(&self, stage: StageRef) -> Result<Option<Digest>, ProviderError> {
        Ok(self.pointer_of(stage))
    }
    fn prepare_bake(&self, _chain: &[Recipe], _update_base: bool, _plan: bool) -> Result<Vec<String>, ProviderError> {
        Ok(Vec::new())
    }
    fn plan_bake(&self, recipe: &Recipe, recorded: Option<&ImageRef>) -> Vec<String> {
        match recorded {
            Some(image) => vec![format!("memory: check that {} is still held", image.image_ref)],
            None => vec![format!("memory: build recipe `{}`", recipe.name)],
        }
    }
    fn image_users(&self, image: &ImageRef) -> Result<Vec<String>, ProviderError> {
        Ok(self.state().users.get(&image.digest).cloned().unwrap_or_default())
    }
    fn plan_promote(&self, stage: StageRef, image: &ImageRef, protect: bool) -> Vec<String> {
        let mut calls = vec![format!("memory: check that {} is still held", image.image_ref)];
        calls.push(format!("memory: point {} at {}", key(stage), image.digest.short()));
        if protect {
            calls.push(format!("memory: protect {}", image.digest.short()));
        }
        calls
    }
}

impl Fleet for MemoryProvider {
    fn groups(&self, stage: StageRef) -> Result<Vec<GroupInfo>, ProviderError> {
        Ok(self
            .groups_of(stage)
            .into_iter()
            .map(|(name, g)| GroupInfo { name, digest: g.digest, capacity: g.capacity, running: g.running })
            .collect())
    }
    fn serving(&self, stage: StageRef) -> Result<Option<String>, ProviderError> {
        Ok(self.serving_of(stage))
    }
    fn launch(
        &self,
        stage: StageRef,
        group: &str,
        image: &ImageRef,
        capacity: u32,
    ) -> Result<GroupInfo, ProviderError> {
        let mut state = self.state();
        let groups = state.groups.entry(key(stage)).or_default();
        let entry =
            groups.entry(group.to_string()).or_insert(MemoryGroup { digest: image.digest, capacity, running: 0 });
        if entry.digest != image.digest {
            return Err(ProviderError::Other {
                provider: "memory",
                message: format!("group {group} already exists and runs {}", entry.digest.short()),
            });
        }
        entry.capacity = capacity;
        entry.running = capacity;
        Ok(GroupInfo { name: group.to_string(), digest: image.digest, capacity, running: capacity })
    }
    fn health(&self, stage: StageRef, group: &str) -> Result<GroupHealth, ProviderError> {
        let g = self.groups_of(stage).get(group).cloned().ok_or_else(|| missing(group))?;
        let waiting = (g.running..g.capacity).map(|n| format!("{group}-{}", n + 1)).collect();
        Ok(GroupHealth { total: g.capacity, healthy: g.running.min(g.capacity), waiting, failed: None })
    }
    fn log_tail(&self, _stage: StageRef, _group: &str, _instance: &str) -> Option<String> {
        None
    }
    fn poll_cadence(&self) -> PollCadence {
        PollCadence { first: Duration::from_millis(1), max: Duration::from_millis(5) }
    }
    fn route(&self, stage: StageRef, group: &str) -> Result<Duration, ProviderError> {
        let mut state = self.state();
        if !state.groups.get(&key(stage)).is_some_and(|gs| gs.contains_key(group)) {
            return Err(missing(group));
        }
        state.serving.insert(key(stage), group.to_string());
        state.routes.push((key(stage), group.to_string()));
        Ok(Duration::ZERO)
    }
    fn drain_pending(&self, _stage: StageRef, _group: &str) -> Result<u64, ProviderError> {
        Ok(0)
    }
    fn drain_timeout(&self, _stage: StageRef) -> Duration {
        Duration::from_secs(1)
    }
    fn park(&self, stage: StageRef, group: &str) -> Result<(), ProviderError> {
        if let Some(g) = self.state().groups.get_mut(&key(stage)).and_then(|gs| gs.get_mut(group)) {
            g.capacity = 0;
            g.running = 0;
        }
        Ok(())
    }
    fn destroy(&self, stage: StageRef, group: &str) -> Result<(), ProviderError> {
        let mut state = self.state();
        if let Some(groups) = state.groups.get_mut(&key(stage)) {
            groups.remove(group);
        }
        if state.serving.get(&key(stage)).is_some_and(|g| g == group) {
            state.serving.remove(&key(stage));
        }
        Ok(())
    }
    fn endpoint(&self, stage: StageRef) -> Option<String> {
        Some(format!("memory://{}", key(stage)))
    }
    fn endpoint_up(&self, _stage: StageRef) -> bool {
        true
    }
    fn stop_stage(&self, stage: StageRef) -> Result<(), ProviderError> {
        let mut state = self.state();
        for g in state.groups.entry(key(stage)).or_default().values_mut() {
            g.capacity = 0;
            g.running = 0;
        }
        Ok(())
    }
    fn alarm(&self, _stage: StageRef, name: &str) -> Result<super::AlarmState, ProviderError> {
        Err(ProviderError::Other { provider: "memory", message: format!("no alarm `{name}` in memory") })
    }
    fn stray_instances(
        &self,
        stage: StageRef,
        group: &str,
        image: &ImageRef,
    ) -> Result<Vec<super::StrayInstance>, ProviderError> {
        let state = self.state();
        let strays = state.strays.get(&format!("{}/{group}", key(stage))).cloned().unwrap_or_default();
        Ok(strays
            .into_iter()
            .filter(|(_, runs)| *runs != image.digest)
            .map(|(instance, runs)| super::StrayInstance {
                instance,
                runs: runs.to_string(),
                expected: image.digest.to_string(),
            })
            .collect())
    }

    fn plan_deploy(&self, _stage: StageRef, sketch: &super::DeploySketch) -> Vec<String> {
        let mut calls = vec![format!("memory: launch {}", sketch.group)];
        calls.extend(sketch.previous.iter().map(|p| format!("memory: route from {p} to {}", sketch.group)));
        calls.extend(sketch.park.iter().map(|g| format!("memory: park {g}")));
        calls.extend(sketch.destroy.iter().map(|g| format!("memory: destroy {g}")));
        calls
    }
}
