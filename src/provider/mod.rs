//! Providers: where images are built and where groups of instances run. The engine talks to them only through the
//! traits here, so the local provider and the AWS provider run the same bake, promote and deploy algorithms.

pub mod aws;
pub mod inject;
pub mod local;
#[cfg(test)]
pub mod memory;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::config::{Instance, Pipeline, ProviderKind, Recipe};
use crate::digest::Digest;
use crate::engine::recipe_key::FileInput;

/// A built image: its digest (the identity kiln promotes) and how the provider finds it (a local OCI ref, an AMI).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRef {
    pub digest: Digest,
    pub image_ref: String,
    /// What the provider made of the image per region and account (AWS: one AMI and its snapshots each), all under
    /// the one digest. Empty for a provider with one store (local): then nothing is written, so the encoding of
    /// images recorded before copies existed is unchanged.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<ImageCopy>,
}

impl ImageRef {
    /// An image the provider holds in one place only.
    pub fn new(digest: Digest, image_ref: impl Into<String>) -> ImageRef {
        ImageRef { digest, image_ref: image_ref.into(), copies: Vec::new() }
    }
}

/// One regional (or cross-account) copy of an image: what promotion re-verifies before relying on it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageCopy {
    pub region: String,
    /// The account the copy is shared with or lives in; absent for the baking account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// The provider's id of the copy (an AMI id).
    pub id: String,
    /// The storage the copy is made of (EBS snapshot ids), as recorded when it was made.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<String>,
}

/// One image to build: a recipe on top of its parent's image.
pub struct BakeJob<'a> {
    pub recipe: &'a Recipe,
    pub recipe_key: Digest,
    pub parent: Option<ImageRef>,
    /// Labels recorded in the image config (title, recipe key, parent): covered by the image digest, so only
    /// what the recipe key determines.
    pub labels: BTreeMap<String, String>,
    /// Where the image came from (revision, source): recorded beside the image (local: its descriptor in the OCI
    /// index), never inside it, so the same recipe key gives the same digest at every commit.
    pub annotations: BTreeMap<String, String>,
    /// The input files the recipe key was computed from, by repository-relative path: a `copy` copies exactly
    /// these, so what git does not track never reaches the image.
    pub inputs: &'a BTreeMap<String, FileInput>,
    /// Where a provision step's output goes as it runs (stderr for a person, nowhere with --quiet).
    pub echo_output: bool,
    /// Where the provider reports each provision step as it starts.
    pub progress: &'a dyn crate::progress::Progress,
}

/// The outcome of rebuilding a chain from nothing to check that it reproduces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reproduction {
    Identical,
    Differs { recipe: String, expected: Digest, rebuilt: Digest, first_difference: Option<String> },
}

#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("provision step {step} of recipe `{recipe}` failed: {command}: {reason}{}", tail_suffix(output_tail))]
    Provision { recipe: String, step: usize, command: String, reason: String, output_tail: String },
    #[error("{what}: {path}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("image {image} is not in the {provider} store ({reason})")]
    MissingImage { provider: &'static str, image: String, reason: String },
    #[error("image {image} no longer matches its digest: {reason}")]
    Drift { image: String, reason: String },
    /// The stage's endpoint cannot serve (local: its proxy cannot listen on the stage's port). Found before any
    /// traffic moved: what served the stage before still does.
    #[error("the endpoint of stage {stage} cannot start: {reason}")]
    Endpoint { stage: String, reason: String },
    /// What the configuration or the lock file names does not exist or cannot be used (a base AMI that is gone,
    /// an artifact bucket that is missing): the user's input to fix, not a fault to retry.
    #[error("{provider} provider: {message}")]
    Invalid { provider: &'static str, message: String },
    #[error("{provider} provider: {message}")]
    Other { provider: &'static str, message: String },
    /// Ctrl-C arrived; `aftermath` says what the provider undid (e.g. "terminated the builder i-…").
    #[error("interrupted; {aftermath}")]
    Interrupted { aftermath: String },
}

fn tail_suffix(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!("\n--- last output ---\n{}", tail.trim_end())
    }
}

/// One path of an image's root filesystem, as `kiln diff` compares them: type, permission bits and content.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum RootEntry {
    File {
        #[serde(serialize_with = "octal")]
        mode: u32,
        sha256: Digest,
        size: u64,
    },
    Dir {
        #[serde(serialize_with = "octal")]
        mode: u32,
    },
    Symlink {
        target: String,
    },
    /// A device or fifo: only its kind and mode can be compared.
    Special {
        #[serde(serialize_with = "octal")]
        mode: u32,
    },
}

fn octal<S: serde::Serializer>(mode: &u32, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&format_args!("{mode:04o}"))
}

/// An image's root filesystem by absolute path (`/etc/motd`), or why the provider cannot list it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootFs {
    Listed(BTreeMap<String, RootEntry>),
    /// Not an error: the rest of a diff stands without it.
    NotAvailable {
        reason: String,
    },
}

/// Builds images and answers for them.
pub trait ImageProvider {
    /// "local" or "aws": recorded in `baked` events and hashed into recipe keys.
    fn name(&self) -> &'static str;
    /// Provider build settings that change the output, hashed into the recipe key. Fallible: finding them may
    /// take API calls (AWS: resolving the base AMI).
    fn build_settings(&self, recipe: &Recipe) -> Result<serde_json::Value, ProviderError>;
    /// Whether the provider still holds the image (a ledger record alone does not make a cache hit). An error means
    /// the provider could not tell (AWS: the call failed), which is not the same as "no".
    fn has_image(&self, image: &ImageRef) -> Result<bool, ProviderError>;
    /// Builds one image. On failure nothing is left behind that looks like an image.
    fn bake(&self, job: &BakeJob) -> Result<ImageRef, ProviderError>;
    /// Rebuilds the chain (root first) from nothing, away from the real store, and compares each image with the
    /// digest expected of it.
    fn check_reproducible(&self, chain: &[(BakeJob, Digest)]) -> Result<Reproduction, ProviderError>;
    /// Re-checks that the stored image still matches its digest (local: re-hash blobs; aws: recorded ids).
    fn verify_image(&self, image: &ImageRef) -> Result<(), ProviderError>;
    /// Deletes the image from the provider (local: its refs and its unpacked root; blobs go with
    /// [`ImageProvider::collect_garbage`]).
    fn delete_image(&self, image: &ImageRef) -> Result<(), ProviderError>;
    /// Frees storage no remaining image uses; returns the bytes freed.
    fn collect_garbage(&self) -> Result<u64, ProviderError>;
    /// The labels recorded in the image.
    fn image_labels(&self, image: &ImageRef) -> Result<BTreeMap<String, String>, ProviderError>;
    /// The instance section the provider itself stored with the image, for images whose `baked` event predates
    /// the `instance` member (the engine reads the ledger first: see `engine::bake::instance_of`). The local
    /// provider has it in a label of the image config; a provider that stores none (AWS tags hold 256 characters)
    /// returns `None`.
    fn instance_of(&self, image: &ImageRef) -> Result<Option<Instance>, ProviderError>;
    /// Makes the image available in `regions` and to `accounts` (AWS: CopyImage and launch permissions) and returns
    /// every copy the image then has, all under its one digest. The local provider has one region and no accounts:
    /// it returns the image's copies as they are.
    fn distribute(
        &self,
        image: &ImageRef,
        regions: &[String],
        accounts: &[String],
    ) -> Result<Vec<ImageCopy>, ProviderError>;
    /// Guards an image that reached the last stage against deletion (AWS: deregistration protection).
    fn protect(&self, image: &ImageRef) -> Result<(), ProviderError>;
    /// Points the stage's pointer at `image`, so tools outside kiln find what the stage should run (AWS: the SSM
    /// parameter `/kiln/<pipeline>/<stage>`; local: the OCI ref `<pipeline>-<stage>` in `.kiln/oci`). Returns the
    /// pointer's name as recorded in the ledger. Idempotent: writing the same image again changes nothing.
    fn publish_pointer(&self, stage: StageRef, image: &ImageRef) -> Result<String, ProviderError>;
    /// The digest the stage's pointer names now, as the provider (not the ledger) says; `None` when it has none.
    fn pointer(&self, stage: StageRef) -> Result<Option<Digest>, ProviderError>;
    /// Settles what a bake of `chain` (root first) depends on outside the repository before any recipe key is
    /// computed (AWS: resolves each root recipe's base AMI into `kiln.lock`, again with `update_base`). With
    /// `plan`, changes nothing and makes no call: returns the calls it would make, in order.
    fn prepare_bake(&self, chain: &[Recipe], update_base: bool, plan: bool) -> Result<Vec<String>, ProviderError>;
    /// The calls a bake of `recipe` would make, in order, without making any: `recorded` is the image the ledger
    /// has for its recipe key (a cache hit when the provider still holds it), `None` when the key is unknown
    /// (an unresolved base) or the ledger has no image for it.
    fn plan_bake(&self, recipe: &Recipe, recorded: Option<&ImageRef>) -> Vec<String>;
    /// What outside kiln's ledger still uses the image (AWS: launch template versions naming one of its AMIs), so
    /// that gc leaves it alone. Empty when nothing does.
    fn image_users(&self, image: &ImageRef) -> Result<Vec<String>, ProviderError>;
    /// The calls a promotion of `image` to the stage would make, in order, without making any: the content
    /// gate's check of the copies the ledger records, the copies and shares the stage still lacks (judged from
    /// `image.copies` alone), the stage pointer's write, and with `protect` (the last stage) the protection.
    fn plan_promote(&self, stage: StageRef, image: &ImageRef, protect: bool) -> Vec<String>;
    /// Every path of the image's root filesystem, its whole layer chain applied (`kiln diff`). A provider that
    /// cannot read what its images hold says so with [`RootFs::NotAvailable`].
    fn root_fs(&self, image: &ImageRef) -> Result<RootFs, ProviderError> {
        let _ = image;
        Ok(RootFs::NotAvailable { reason: format!("not available on the {} provider", self.name()) })
    }
}

/// Everything the engine needs of one provider: images and the groups that run them.
pub trait Provider: ImageProvider + Fleet {}

impl<T: ImageProvider + Fleet> Provider for T {}

/// The one place that maps a pipeline to its provider: the CLI (and anything else that runs the engine) asks here,
/// so adding a provider changes this function, not its callers. Local state lives in the repository's `.kiln/`.
pub fn for_pipeline(pipeline: &Pipeline, repo: &crate::config::Repo) -> Result<Box<dyn Provider>, crate::Error> {
    match pipeline.provider {
        ProviderKind::Local => Ok(Box::new(local::LocalProvider::new(repo.root().join(".kiln")))),
        ProviderKind::Aws => Ok(Box::new(aws::AwsProvider::connect(pipeline, repo.root())?)),
    }
}

/// The stage a fleet operation is about.
#[derive(Debug, Clone, Copy)]
pub struct StageRef<'a> {
    pub pipeline: &'a str,
    pub stage: &'a crate::config::Stage,
}

/// A group of instances as the provider sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GroupInfo {
    pub name: String,
    pub digest: Digest,
    /// Instances the group should run (0 for a parked group kept for rollback).
    pub capacity: u32,
    /// Instances running now.
    pub running: u32,
}

/// Why a group is not healthy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unhealthy {
    pub reason: String,
    pub log_tail: Option<String>,
}

/// One look at a group's instances. The engine polls it while it waits for a new group and through the
/// verification window, so it renews its lease, draws progress and gives up on its own clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupHealth {
    /// Instances the group should run.
    pub total: u32,
    pub healthy: u32,
    /// Instances that are not healthy (yet), by name.
    pub waiting: Vec<String>,
    /// Set when waiting longer cannot help (an instance died): the engine gives up at once.
    pub failed: Option<Unhealthy>,
}

impl GroupHealth {
    pub fn all_healthy(&self) -> bool {
        self.failed.is_none() && self.total > 0 && self.healthy >= self.total && self.waiting.is_empty()
    }
}

/// How often the engine polls a provider's long operations: from `first`, doubling up to `max`. A provider whose
/// calls cost money or rate limit (AWS) asks for a slower cadence than one that reads local files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PollCadence {
    pub first: std::time::Duration,
    pub max: std::time::Duration,
}

/// Runs groups of instances and moves a stage's traffic between them. Every operation is idempotent: re-running
/// it after a crash finds what the previous attempt made. Nothing here blocks for long: the engine owns every
/// wait, so it can renew its lease and notice that it lost it.
pub trait Fleet {
    /// Every group of the stage that exists, parked or running.
    fn groups(&self, stage: StageRef) -> Result<Vec<GroupInfo>, ProviderError>;
    /// The group the stage's traffic goes to now, as the provider (not the ledger) says.
    fn serving(&self, stage: StageRef) -> Result<Option<String>, ProviderError>;
    /// Creates the group (or finds it) running `image` with `capacity` instances; a parked group is scaled back up.
    fn launch(&self, stage: StageRef, group: &str, image: &ImageRef, capacity: u32)
        -> Result<GroupInfo, ProviderError>;
    /// One health check of every instance of the group.
    fn health(&self, stage: StageRef, group: &str) -> Result<GroupHealth, ProviderError>;
    /// The end of an instance's log (local: its output; AWS: its console output), for an error message.
    fn log_tail(&self, stage: StageRef, group: &str, instance: &str) -> Option<String>;
    /// How often to poll `health` and `drain_pending`.
    fn poll_cadence(&self) -> PollCadence;
    /// Sends all of the stage's traffic to `group`, atomically from a client's point of view.
    fn route(&self, stage: StageRef, group: &str) -> Result<std::time::Duration, ProviderError>;
    /// Requests `group` still serves (0 once drained, or when nothing routes through the stage's endpoint).
    fn drain_pending(&self, stage: StageRef, group: &str) -> Result<u64, ProviderError>;
    /// How long draining may take before the engine goes on regardless.
    fn drain_timeout(&self, stage: StageRef) -> std::time::Duration;
    /// Scales the group to zero but keeps it, for a fast rollback.
    fn park(&self, stage: StageRef, group: &str) -> Result<(), ProviderError>;
    /// Deletes the group and everything it runs.
    fn destroy(&self, stage: StageRef, group: &str) -> Result<(), ProviderError>;
    /// Where clients reach the stage.
    fn endpoint(&self, stage: StageRef) -> Option<String>;
    /// Whether the stage's endpoint is up (local: its proxy process runs).
    fn endpoint_up(&self, stage: StageRef) -> bool;
    /// Stops everything the stage runs, endpoint included (local `kiln down`).
    fn stop_stage(&self, stage: StageRef) -> Result<(), ProviderError>;
    /// The instances of `group` that run something other than `image`, as each instance itself says (AWS: EC2's
    /// ImageId of the instance, not the group's tags or launch template, which an instance relaunched by hand need
    /// not follow). Empty when every instance runs it, or when the provider has no instance apart from its group's
    /// record (local: instances are started from the group's own image).
    fn stray_instances(
        &self,
        stage: StageRef,
        group: &str,
        image: &ImageRef,
    ) -> Result<Vec<StrayInstance>, ProviderError>;
    /// The state of a monitoring alarm a verification window watches (AWS: a CloudWatch alarm in the stage's
    /// region). An error when the provider has no alarms, or the alarm does not exist.
    fn alarm(&self, stage: StageRef, name: &str) -> Result<AlarmState, ProviderError>;
    /// The calls the deployment `sketch` describes would make, in order, without making any (polls named once,
    /// as polls).
    fn plan_deploy(&self, stage: StageRef, sketch: &DeploySketch) -> Vec<String>;
}

/// How a planned deployment gets its group, as the engine decided it from the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupStart {
    /// A new group, from a new launch (AWS: a new launch template version).
    New,
    /// A kept group of the digest, scaled back up (a rollback).
    Reenabled,
    /// The group that runs the digest already: only checked, and healed in place if it lacks instances.
    Live,
}

/// What a deployment would do, decided from the ledger alone, for [`Fleet::plan_deploy`] to describe as calls.
#[derive(Debug, Clone)]
pub struct DeploySketch {
    pub image: ImageRef,
    pub group: String,
    pub start: GroupStart,
    /// The group serving now, which traffic leaves (and the window would return to).
    pub previous: Option<String>,
    /// Groups retired after the cutover: parked (scaled to zero, kept for rollback) and destroyed.
    pub park: Vec<String>,
    pub destroy: Vec<String>,
    /// A rollback writes the stage pointer as it starts.
    pub pointer_first: bool,
    /// No group of the stage was ever made (AWS: its launch template does not exist yet).
    pub first: bool,
    /// Alarms the verification window watches (each checked to exist before anything changes).
    pub alarms: Vec<String>,
    /// The stage has a verification window.
    pub verify: bool,
}

/// An instance of a group that does not run the group's image: what `kiln verify` reports as drift.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StrayInstance {
    pub instance: String,
    /// What it runs instead (an AMI id).
    pub runs: String,
    /// What it should run (an AMI id).
    pub expected: String,
}

/// An alarm as its monitoring service reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AlarmState {
    /// `OK`, `ALARM` or `INSUFFICIENT_DATA`.
    pub state: String,
    /// Why it is in that state, as the service says.
    pub reason: String,
}

impl AlarmState {
    /// Only ALARM fails a window: an alarm with too little data (no traffic yet) has seen nothing wrong.
    pub fn firing(&self) -> bool {
        self.state == "ALARM"
    }
}
