//! The materialised view of a ledger, folded from events in order. Two parts, so queries stay fast at millions of
//! events: small, bounded *heads* (stage heads, open deployments, revocations) cached whole, and a per-image
//! *index* (bake records, recipe keys, promotions, approvals) sharded by digest prefix and loaded a shard at a time.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::event::{EventBody, StoredEvent};
use crate::digest::{Digest, DigestError, DigestQuery};

/// Bump when the view's shape or folding rules change, so old caches are rebuilt rather than misread.
pub const VIEW_FORMAT: u32 = 5;
/// Earlier live deployments kept per stage for rollback and soak; older ones stay in the ledger.
const HISTORY_KEEP: usize = 32;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Heads {
    pub format: u32,
    /// The last event folded in (0 for an empty ledger) and its hash.
    pub seq: u64,
    pub hash: Digest,
    /// pipeline → stage → state.
    pub pipelines: BTreeMap<String, BTreeMap<String, StageView>>,
    pub revoked: BTreeMap<Digest, Revocation>,
    /// recipe → its newest image.
    pub newest: BTreeMap<String, Digest>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageView {
    pub promoted: Option<Mark>,
    /// The last deployment that finished healthy.
    pub live: Option<Live>,
    /// Earlier live deployments, oldest first, at most [`HISTORY_KEEP`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Live>,
    pub open: Option<OpenDeploy>,
    /// Deployments started here so far.
    #[serde(default)]
    pub deploys: u64,
    /// The highest group version (`…-vNNN`) ever created here.
    #[serde(default)]
    pub versions: u64,
}

/// Who did something to which digest, when, at which seq.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Mark {
    pub digest: Digest,
    pub seq: u64,
    pub time: String,
    pub actor: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Live {
    pub digest: Digest,
    pub group: String,
    pub deploy_id: String,
    pub seq: u64,
    pub since: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpenDeploy {
    pub deploy_id: String,
    pub digest: Digest,
    pub group: String,
    pub previous_group: Option<String>,
    pub lease_until: String,
    /// `host:pid:start-time` of the kiln process holding the lease.
    pub holder: String,
    pub actor: String,
    pub seq: u64,
    pub rollback: bool,
    /// Steps recorded so far, in order.
    pub steps: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Revocation {
    pub seq: u64,
    /// The digest named in the `revoke` command; itself for a direct revocation.
    pub root: Digest,
    pub reason: String,
}

/// Everything about one image. Every update is idempotent, because an index shard may already hold events that a
/// reader replays on top of an older heads cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    /// The `baked` event.
    pub seq: u64,
    pub recipe: String,
    pub recipe_key: Digest,
    pub parent: Option<Digest>,
    pub image_ref: String,
    pub provider: String,
    pub commit: Option<String>,
    pub dirty: bool,
    pub time: String,
    pub actor: String,
    /// Deleted from the provider by `kiln gc` (and not baked again since).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub children: Vec<Digest>,
    /// Every later event about this image, ascending.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<u64>,
    /// "pipeline/stage" → what happened to this image there.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub stages: BTreeMap<String, ImageStage>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ImageStage {
    /// The first promotion into the stage.
    pub promoted: Option<Mark>,
    /// The first deployment there that finished healthy.
    pub deployed: Option<Mark>,
    /// The most recent continuous period the image was live there: what `upstream` and `soak` judge.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub live: Option<LivePeriod>,
    /// actor → approval (one per actor).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub approvals: BTreeMap<String, Mark>,
}

/// A stretch of time an image was the live one in a stage: from the deployment that made it live to the one that
/// replaced it (none while it is still live).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LivePeriod {
    pub since: Mark,
    pub until: Option<Mark>,
    /// How it ended: replaced by an ordinary deployment of a later promotion, or rolled away from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<PeriodEnd>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum PeriodEnd {
    Replaced,
    RolledBack,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct Shard {
    images: BTreeMap<Digest, ImageRecord>,
    /// recipe key → image digest, for keys whose first byte names this shard: the bake cache.
    keys: BTreeMap<Digest, Digest>,
}

/// The per-image index: shards loaded on first use, changed shards remembered until saved.
#[derive(Debug, Default)]
struct Index {
    dir: Option<PathBuf>,
    shards: BTreeMap<u8, Shard>,
    dirty: BTreeSet<u8>,
    /// Set when rebuilding from seq 1: every shard is in memory, none is read from disk.
    complete: bool,
}

pub struct View {
    pub heads: Heads,
    index: RefCell<Index>,
}

impl Default for Heads {
    fn default() -> Self {
        Heads {
            format: VIEW_FORMAT,
            seq: 0,
            hash: Digest::ZERO,
            pipelines: BTreeMap::new(),
            revoked: BTreeMap::new(),
            newest: BTreeMap::new(),
        }
    }
}

/// The deploy step that records a lease taken over from a crashed or expired holder.
pub const TAKEOVER_STEP: &str = "lease-taken-over";
/// The deploy step a holder records to extend its lease while it waits; not listed among the steps.
pub const RENEWAL_STEP: &str = "lease-renewed";

/// The version of a group named `<pipeline>-<stage>-vNNN`.
pub fn group_version(group: &str) -> Option<u64> {
    group.rsplit_once("-v")?.1.parse().ok()
}

pub fn stage_key(pipeline: &str, stage: &str) -> String {
    format!("{pipeline}/{stage}")
}

fn shard_of(digest: &Digest) -> u8 {
    digest.as_bytes()[0]
}

fn insert_sorted(list: &mut Vec<u64>, seq: u64) {
    if let Err(at) = list.binary_search(&seq) {
        list.insert(at, seq);
    }
}

/// Keeps the earliest mark: replaying an event must not move "first promoted" later.
fn keep_first(slot: &mut Option<Mark>, mark: Mark) {
    if slot.as_ref().is_none_or(|m| mark.seq < m.seq) {
        *slot = Some(mark);
    }
}

impl Index {
    fn shard_path(&self, shard: u8) -> Option<PathBuf> {
        Some(self.dir.as_ref()?.join(format!("{shard:02x}.json")))
    }

    fn load(&mut self, shard: u8) -> &mut Shard {
        if !self.shards.contains_key(&shard) {
            let loaded = if self.complete {
                Shard::default()
            } else {
                self.shard_path(shard)
                    .and_then(|p| std::fs::read(p).ok())
                    .and_then(|bytes| serde_json::from_slice(&bytes).ok())
                    .unwrap_or_default()
            };
            self.shards.insert(shard, loaded);
        }
        self.shards.get_mut(&shard).expect("inserted above")
    }

    fn image_mut(&mut self, digest: &Digest) -> Option<&mut ImageRecord> {
        let shard = shard_of(digest);
        self.dirty.insert(shard);
        self.load(shard).images.get_mut(digest)
    }
}

impl View {
    /// An empty view whose index shards live in `index_dir` (none: in memory only).
    pub fn empty(index_dir: Option<PathBuf>, complete: bool) -> View {
        View::from_heads(Heads::default(), index_dir, complete)
    }

    pub fn from_heads(heads: Heads, index_dir: Option<PathBuf>, complete: bool) -> View {
        View { heads, index: RefCell::new(Index { dir: index_dir, complete, ..Index::default() }) }
    }

    pub fn seq(&self) -> u64 {
        self.heads.seq
    }

    pub fn hash(&self) -> Digest {
        self.heads.hash
    }

    pub fn stage(&self, pipeline: &str, stage: &str) -> Option<&StageView> {
        self.heads.pipelines.get(pipeline)?.get(stage)
    }

    pub fn image(&self, digest: &Digest) -> Option<ImageRecord> {
        self.index.borrow_mut().load(shard_of(digest)).images.get(digest).cloned()
    }

    /// The image already baked from this recipe key: the bake cache.
    pub fn image_for_key(&self, recipe_key: &Digest) -> Option<Digest> {
        self.index.borrow_mut().load(shard_of(recipe_key)).keys.get(recipe_key).copied()
    }

    /// Every image, ordered by the seq it was baked at.
    pub fn images(&self) -> Vec<(Digest, ImageRecord)> {
        let mut index = self.index.borrow_mut();
        let mut all = Vec::new();
        for shard in 0..=255u8 {
            all.extend(index.load(shard).images.iter().map(|(d, r)| (*d, r.clone())));
        }
        all.sort_by_key(|(_, r)| r.seq);
        all
    }

    /// Resolves a full or abbreviated digest among known images. A 12+ hex prefix always names one shard.
    pub fn resolve(&self, query: &DigestQuery) -> Result<Digest, DigestError> {
        let first_byte = u8::from_str_radix(&query.hex_prefix()[..2], 16)
            .map_err(|_| DigestError::Malformed { input: query.input().to_string(), reason: "invalid hex" })?;
        let mut index = self.index.borrow_mut();
        query.resolve(index.load(first_byte).images.keys())
    }

    /// The image's ancestors, nearest first (stops at a parent unknown to this ledger).
    pub fn ancestors(&self, digest: &Digest) -> Vec<Digest> {
        let mut out = Vec::new();
        let mut current = self.image(digest).and_then(|r| r.parent);
        while let Some(parent) = current {
            if out.contains(&parent) {
                break;
            }
            out.push(parent);
            current = self.image(&parent).and_then(|r| r.parent);
        }
        out
    }

    /// Every image whose parent chain includes `root`, breadth first.
    pub fn descendants(&self, root: &Digest) -> Vec<Digest> {
        let mut out: Vec<Digest> = Vec::new();
        let mut queue = vec![*root];
        while let Some(next) = queue.pop() {
            for child in self.image(&next).map(|r| r.children).unwrap_or_default() {
                if child != *root && !out.contains(&child) {
                    out.push(child);
                    queue.push(child);
                }
            }
        }
        out
    }

    /// The revocation that applies to `digest`: its own, or an ancestor's.
    pub fn revocation(&self, digest: &Digest) -> Option<Revocation> {
        if self.heads.revoked.is_empty() {
            return None;
        }
        std::iter::once(*digest).chain(self.ancestors(digest)).find_map(|d| self.heads.revoked.get(&d).cloned())
    }

    /// What happened to an image in a stage.
    pub fn image_stage(&self, pipeline: &str, stage: &str, digest: &Digest) -> ImageStage {
        self.image(digest).and_then(|r| r.stages.get(&stage_key(pipeline, stage)).cloned()).unwrap_or_default()
    }

    /// Approvals of `digest` for a stage, by distinct actor.
    pub fn approvers(&self, pipeline: &str, stage: &str, digest: &Digest) -> BTreeSet<String> {
        self.image_stage(pipeline, stage, digest).approvals.into_keys().collect()
    }

    fn stage_mut(&mut self, pipeline: &str, stage: &str) -> &mut StageView {
        self.heads.pipelines.entry(pipeline.to_string()).or_default().entry(stage.to_string()).or_default()
    }

    /// Applies `change` to an image's record, if the image is known, and notes the event on it.
    fn touch_image(&mut self, digest: &Digest, seq: u64, change: impl FnOnce(&mut ImageRecord)) {
        if let Some(record) = self.index.get_mut().image_mut(digest) {
            insert_sorted(&mut record.events, seq);
            change(record);
        }
    }

    /// Folds one event in. The caller has checked that it follows `self.seq()` and chains to `self.hash()`.
    pub fn apply(&mut self, stored: &StoredEvent) {
        let event = &stored.event;
        let seq = event.seq;
        let mark =
            |digest: &Digest| Mark { digest: *digest, seq, time: event.time.clone(), actor: event.actor.clone() };
        match &event.body {
            EventBody::Baked { recipe, digest, recipe_key, parent, image_ref, provider, commit, dirty, .. } => {
                let index = self.index.get_mut();
                index.dirty.insert(shard_of(digest));
                index.load(shard_of(digest)).images.entry(*digest).or_insert_with(|| ImageRecord {
                    seq,
                    recipe: recipe.clone(),
                    recipe_key: *recipe_key,
                    parent: *parent,
                    image_ref: image_ref.clone(),
                    provider: provider.clone(),
                    commit: commit.clone(),
                    dirty: *dirty,
                    time: event.time.clone(),
                    actor: event.actor.clone(),
                    deleted: false,
                    children: Vec::new(),
                    events: Vec::new(),
                    stages: BTreeMap::new(),
                });
                // Baking an image that gc had deleted brings it back.
                if let Some(record) = index.image_mut(digest) {
                    record.deleted = false;
                }
                index.dirty.insert(shard_of(recipe_key));
                index.load(shard_of(recipe_key)).keys.insert(*recipe_key, *digest);
                if let Some(parent) = parent {
                    if let Some(p) = index.image_mut(parent) {
                        if !p.children.contains(digest) {
                            p.children.push(*digest);
                        }
                    }
                }
                self.heads.newest.insert(recipe.clone(), *digest);
            }
            EventBody::Promoted { pipeline, stage, digest, .. } => {
                self.stage_mut(pipeline, stage).promoted = Some(mark(digest));
                let key = stage_key(pipeline, stage);
                self.touch_image(digest, seq, |r| {
                    keep_first(&mut r.stages.entry(key).or_default().promoted, mark(digest))
                });
            }
            EventBody::Refused { .. } => {}
            EventBody::Collected { digests, .. } => {
                for digest in digests {
                    self.touch_image(digest, seq, |r| r.deleted = true);
                }
            }
            EventBody::Approved { pipeline, stage, digest, .. } => {
                let key = stage_key(pipeline, stage);
                let actor = event.actor.clone();
                self.touch_image(digest, seq, |r| {
                    r.stages.entry(key).or_default().approvals.entry(actor).or_insert_with(|| mark(digest));
                });
            }
            EventBody::Revoked { digest, reason, descendants } => {
                for d in std::iter::once(digest).chain(descendants) {
                    self.heads.revoked.entry(*d).or_insert(Revocation { seq, root: *digest, reason: reason.clone() });
                }
                self.touch_image(digest, seq, |_| {});
            }
            EventBody::DeployStarted {
                pipeline,
                stage,
                deploy_id,
                digest,
                group,
                previous_group,
                lease_until,
                lease_holder,
                rollback,
            } => {
                let view = self.stage_mut(pipeline, stage);
                view.deploys += 1;
                if let Some(version) = group_version(group) {
                    view.versions = view.versions.max(version);
                }
                view.open = Some(OpenDeploy {
                    deploy_id: deploy_id.clone(),
                    digest: *digest,
                    group: group.clone(),
                    previous_group: previous_group.clone(),
                    lease_until: lease_until.clone(),
                    holder: lease_holder.clone(),
                    actor: event.actor.clone(),
                    seq,
                    rollback: rollback.is_some(),
                    steps: Vec::new(),
                });
                self.touch_image(digest, seq, |_| {});
            }
            EventBody::DeployStep { pipeline, stage, deploy_id, step, detail } => {
                if let Some(open) = self.stage_mut(pipeline, stage).open.as_mut().filter(|o| &o.deploy_id == deploy_id)
                {
                    if step != RENEWAL_STEP {
                        open.steps.push(step.clone());
                    }
                    // A renewal extends the lease; a takeover moves it to the process that reconciles the
                    // interrupted deployment.
                    if step == TAKEOVER_STEP || step == RENEWAL_STEP {
                        if let (Some(until), Some(holder)) =
                            (detail["lease_until"].as_str(), detail["lease_holder"].as_str())
                        {
                            open.lease_until = until.to_string();
                            open.holder = holder.to_string();
                        }
                    }
                }
            }
            EventBody::DeployFinished { pipeline, stage, deploy_id, digest, group } => {
                let view = self.stage_mut(pipeline, stage);
                let rollback = view.open.as_ref().is_some_and(|o| &o.deploy_id == deploy_id && o.rollback);
                let replaced = view.live.as_ref().map(|l| l.digest).filter(|d| d != digest);
                let key = stage_key(pipeline, stage);
                if let Some(replaced) = replaced {
                    let ended_by = if rollback { PeriodEnd::RolledBack } else { PeriodEnd::Replaced };
                    self.touch_image(&replaced, seq, |r| {
                        if let Some(period) = r.stages.entry(key.clone()).or_default().live.as_mut() {
                            if period.until.is_none() {
                                period.until = Some(mark(&replaced));
                                period.ended_by = Some(ended_by);
                            }
                        }
                    });
                }
                let view = self.stage_mut(pipeline, stage);
                let continues = view.live.as_ref().is_some_and(|l| l.digest == *digest);
                if let Some(previous) = view.live.take() {
                    view.history.push(previous);
                    if view.history.len() > HISTORY_KEEP {
                        view.history.remove(0);
                    }
                }
                view.live = Some(Live {
                    digest: *digest,
                    group: group.clone(),
                    deploy_id: deploy_id.clone(),
                    seq,
                    since: event.time.clone(),
                });
                if view.open.as_ref().is_some_and(|o| &o.deploy_id == deploy_id) {
                    view.open = None;
                }
                self.touch_image(digest, seq, |r| {
                    let there = r.stages.entry(key).or_default();
                    keep_first(&mut there.deployed, mark(digest));
                    // Redeploying what is already live (a heal, a resumed deployment) does not restart its period.
                    let open_period = there.live.as_ref().is_some_and(|p| p.until.is_none());
                    if !(continues && open_period) {
                        there.live = Some(LivePeriod { since: mark(digest), until: None, ended_by: None });
                    }
                });
            }
            EventBody::DeployFailed { pipeline, stage, deploy_id, digest, .. } => {
                let view = self.stage_mut(pipeline, stage);
                if view.open.as_ref().is_some_and(|o| &o.deploy_id == deploy_id) {
                    view.open = None;
                }
                self.touch_image(digest, seq, |_| {});
            }
        }
        self.heads.seq = seq;
        self.heads.hash = stored.hash;
    }

    /// Writes the changed index shards (before the heads that cover them are saved).
    pub(crate) fn save_index(&self, write: impl Fn(&std::path::Path, &[u8])) {
        let mut index = self.index.borrow_mut();
        let dirty = std::mem::take(&mut index.dirty);
        for shard in dirty {
            if let (Some(path), Some(data)) = (index.shard_path(shard), index.shards.get(&shard)) {
                if let Ok(bytes) = serde_json::to_vec(data) {
                    write(&path, &bytes);
                }
            }
        }
    }
}
