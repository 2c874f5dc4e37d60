//! The materialised view of a ledger, folded from events in order. Two parts, so queries stay fast at millions of
//! events: small, bounded *heads* (stage heads, open deployments, revocations) cached whole, and a per-image
//! *index* (bake records, recipe keys, promotions, approvals) sharded by digest prefix and loaded a shard at a time.
//! A shard is trusted only if its bytes hash to what the heads file says it holds; otherwise the whole view is
//! replayed from seq 1, so a query never answers from a missing, stale or damaged shard.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::event::{EventBody, StoredEvent};
use super::LedgerError;
use crate::config::Instance;
use crate::digest::{Digest, DigestError, DigestQuery};
use crate::provider::{ImageCopy, ImageRef};

/// Bump when the view's shape or folding rules change, so old caches are rebuilt rather than misread.
pub const VIEW_FORMAT: u32 = 7;
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
    /// Set by `kiln down`, cleared by the next deployment that finishes: the stage was stopped on purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stopped: Option<Stop>,
    /// The digest the stage's pointer was last published to name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pointer: Option<Mark>,
}

/// Who stopped a stage with `kiln down`, when, at which seq.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stop {
    pub seq: u64,
    pub time: String,
    pub actor: String,
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
    /// Made live by a rollback: the stage stays on it until the next promotion.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback: bool,
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
    /// Where the provider holds the image per region and account: as the `baked` event recorded, and every copy
    /// a later `distributed` event added.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub copies: Vec<ImageCopy>,
    /// The `[instance]` section the `baked` event recorded (none in events written before it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<Instance>,
}

impl ImageRecord {
    /// The image as the provider knows it: how to find it and its recorded copies.
    pub fn image(&self, digest: Digest) -> ImageRef {
        ImageRef { digest, image_ref: self.image_ref.clone(), copies: self.copies.clone() }
    }
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

/// Which shard files a saved view covers: shard (two hex digits) → sha256 of the shard file's bytes, which is also
/// part of the file's name. A shard absent here is empty. Files are never rewritten in place, so a reader holding
/// older heads still finds the shards those heads name while a newer view is being saved.
pub type ShardFiles = BTreeMap<String, Digest>;

/// Replays the ledger from seq 1 up to the given seq into a complete view: the way out of a bad shard.
#[derive(Clone)]
pub struct Rebuild(pub Arc<dyn Fn(u64) -> Result<View, LedgerError> + Send + Sync>);

impl std::fmt::Debug for Rebuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Rebuild")
    }
}

/// The per-image index: shards loaded on first use, changed shards remembered until saved.
#[derive(Debug, Default)]
struct Index {
    dir: Option<PathBuf>,
    shards: BTreeMap<u8, Shard>,
    dirty: BTreeSet<u8>,
    /// Set when rebuilding from seq 1: every shard is in memory, none is read from disk.
    complete: bool,
    /// What each shard file on disk must hash to, per the heads this view was loaded from.
    expected: ShardFiles,
    /// The event being folded in, else the last one folded in: how far a rebuild must replay.
    seq: u64,
    rebuild: Option<Rebuild>,
    /// Why a needed rebuild failed; queries then answer from nothing rather than from a bad shard.
    failure: Option<LedgerError>,
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

pub(crate) fn shard_name(shard: u8) -> String {
    format!("{shard:02x}")
}

fn shard_file(dir: &Path, shard: u8, digest: &Digest) -> PathBuf {
    dir.join(format!("{}-{}.json", shard_name(shard), digest.hex()))
}

impl Index {
    fn load(&mut self, shard: u8) -> &mut Shard {
        if !self.shards.contains_key(&shard) && !self.complete {
            match self.read_shard(shard) {
                Ok(loaded) => {
                    self.shards.insert(shard, loaded);
                }
                Err(why) => self.rebuild(shard, &why),
            }
        }
        self.shards.entry(shard).or_default()
    }

    /// The shard as the heads say it was saved, or why it cannot be trusted.
    fn read_shard(&self, shard: u8) -> Result<Shard, String> {
        let Some(expected) = self.expected.get(&shard_name(shard)) else { return Ok(Shard::default()) };
        let Some(dir) = &self.dir else { return Err("the view has no cache directory".into()) };
        let path = shard_file(dir, shard, expected);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        if Digest::of(&bytes) != *expected {
            return Err(format!("{}: its content is not what the heads say it holds", path.display()));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Replaces every shard by a replay of the ledger up to the current seq. Shards already in memory may hold
    /// events folded in since loading, but the replay covers those too.
    fn rebuild(&mut self, shard: u8, why: &str) {
        tracing::warn!(shard = %shard_name(shard), %why, "view cache shard is unusable; rebuilding the view");
        self.complete = true;
        self.shards.clear();
        let Some(Rebuild(replay)) = self.rebuild.clone() else {
            self.failure = Some(LedgerError::CacheUnusable { reason: why.to_string() });
            return;
        };
        match replay(self.seq) {
            Ok(rebuilt) => {
                let rebuilt = rebuilt.index.into_inner();
                self.shards = rebuilt.shards;
                // Saved again whole, so heads written from this view name only files that hold these shards.
                self.dirty = self.shards.keys().copied().collect();
            }
            Err(err) => self.failure = Some(err),
        }
    }

    fn image_mut(&mut self, digest: &Digest) -> Option<&mut ImageRecord> {
        let shard = shard_of(digest);
        self.dirty.insert(shard);
        self.load(shard).images.get_mut(digest)
    }
}

impl StageView {
    /// What a rollback made live after the last promotion: the stage stays held on it until the next promotion.
    pub fn held_by_rollback(&self) -> Option<&Live> {
        let live = self.live.as_ref().filter(|l| l.rollback)?;
        self.promoted.as_ref().is_none_or(|p| live.seq > p.seq).then_some(live)
    }

    /// The digest the stage should run: the promoted one, unless a later rollback holds it on another.
    pub fn target(&self) -> Option<Digest> {
        self.held_by_rollback().map(|l| l.digest).or(self.promoted.as_ref().map(|p| p.digest))
    }
}

impl View {
    /// An empty view whose index shards live in `index_dir` (none: in memory only).
    pub fn empty(index_dir: Option<PathBuf>, complete: bool) -> View {
        View::from_heads(Heads::default(), index_dir, complete)
    }

    pub fn from_heads(heads: Heads, index_dir: Option<PathBuf>, complete: bool) -> View {
        let seq = heads.seq;
        View { heads, index: RefCell::new(Index { dir: index_dir, complete, seq, ..Index::default() }) }
    }

    /// A view loaded from the cache: its shards are read from `index_dir` as needed, each checked against
    /// `shards`, and `rebuild` replaces them all when one fails that check.
    pub fn cached(heads: Heads, shards: ShardFiles, index_dir: PathBuf, rebuild: Rebuild) -> View {
        let view = View::from_heads(heads, Some(index_dir), false);
        {
            let mut index = view.index.borrow_mut();
            index.expected = shards;
            index.rebuild = Some(rebuild);
        }
        view
    }

    /// Why a shard rebuild this view needed failed, if one did. Until then, every answer is suspect.
    pub fn take_failure(&self) -> Option<LedgerError> {
        self.index.borrow_mut().failure.take()
    }

    /// Whether the index was rebuilt (or started) from seq 1 rather than read from the cache.
    pub fn is_complete(&self) -> bool {
        self.index.borrow().complete
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

    /// Folds one event in. The caller has checked that it follows `self.seq()` and chains to `self.hash()`, and
    /// the event is in the store (a rebuild may replay it).
    pub fn apply(&mut self, stored: &StoredEvent) {
        let event = &stored.event;
        let seq = event.seq;
        // A bad shard found while folding this event in rebuilds the index up to and including it (it is in the
        // store already), so the changes it made before are not lost; the ones after are idempotent.
        self.index.get_mut().seq = seq;
        let mark =
            |digest: &Digest| Mark { digest: *digest, seq, time: event.time.clone(), actor: event.actor.clone() };
        match &event.body {
            EventBody::Baked {
                recipe,
                digest,
                recipe_key,
                parent,
                image_ref,
                provider,
                commit,
                dirty,
                copies,
                instance,
                ..
            } => {
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
                    copies: copies.clone(),
                    instance: instance.clone(),
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
            // Noted on the image so `kiln log --digest` finds refusals without scanning the ledger.
            EventBody::Refused { digest, .. } => self.touch_image(digest, seq, |_| {}),
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
                // Healing what a rollback made live keeps the stage held there.
                let rollback = rollback || (continues && view.live.as_ref().is_some_and(|l| l.rollback));
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
                    rollback,
                });
                if view.open.as_ref().is_some_and(|o| &o.deploy_id == deploy_id) {
                    view.open = None;
                }
                view.stopped = None;
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
            EventBody::PointerPublished { pipeline, stage, digest, .. } => {
                self.stage_mut(pipeline, stage).pointer = Some(mark(digest));
                self.touch_image(digest, seq, |_| {});
            }
            EventBody::Distributed { digest, copies, .. } => self.touch_image(digest, seq, |r| {
                // Merged, not replaced: an event that lists fewer copies (a provider that forgot one) must not
                // make the ledger forget where the image was copied.
                for copy in copies {
                    if !r.copies.contains(copy) {
                        r.copies.push(copy.clone());
                    }
                }
            }),
            EventBody::Stopped { pipeline, stage } => {
                self.stage_mut(pipeline, stage).stopped =
                    Some(Stop { seq, time: event.time.clone(), actor: event.actor.clone() });
            }
            EventBody::Drill { .. } => {}
        }
        self.heads.seq = seq;
        self.heads.hash = stored.hash;
    }

    /// Writes the changed index shards, each to a new file named by its content, and returns what heads saved
    /// with this view must say. Any failed write fails the whole save: heads must never name a shard file that
    /// does not hold what they say.
    pub(crate) fn save_index(
        &self,
        dir: &Path,
        write: impl Fn(&Path, &[u8]) -> std::io::Result<()>,
    ) -> std::io::Result<ShardFiles> {
        let mut index = self.index.borrow_mut();
        let mut files = if index.complete { ShardFiles::new() } else { index.expected.clone() };
        let mut changed = index.dirty.clone();
        if index.complete {
            changed.extend(index.shards.keys().copied());
        }
        for shard in changed {
            let Some(data) = index.shards.get(&shard) else { continue };
            if data.images.is_empty() && data.keys.is_empty() {
                files.remove(&shard_name(shard));
                continue;
            }
            let bytes = serde_json::to_vec(data).map_err(std::io::Error::other)?;
            let digest = Digest::of(&bytes);
            write(&shard_file(dir, shard, &digest), &bytes)?;
            files.insert(shard_name(shard), digest);
        }
        // Shards this view never changed are named as the heads it was loaded from named them. Those files may
        // have been removed by saves made since; heads must not name a file that is gone.
        for (name, digest) in &files {
            let Some(shard) = u8::from_str_radix(name, 16).ok() else { continue };
            let path = shard_file(dir, shard, digest);
            if !path.exists() {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} was removed by a newer save", path.display()),
                ));
            }
        }
        index.dirty.clear();
        index.expected = files.clone();
        Ok(files)
    }
}

/// Whether `name` is a shard file of this format that `files` names.
pub(crate) fn is_named_shard(name: &str, files: &ShardFiles) -> bool {
    name.strip_suffix(".json")
        .and_then(|stem| stem.split_once('-'))
        .is_some_and(|(shard, hex)| files.get(shard).is_some_and(|d| d.hex() == hex))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::ledger::Event;

    /// Applies `body` as the next event, written by `ana`: for tests of what the view makes of events.
    pub(crate) fn fold(view: &mut View, body: EventBody) {
        let seq = view.seq() + 1;
        let event = Event { seq, prev: view.hash(), time: format!("t{seq}"), actor: "ana".into(), clock: None, body };
        view.apply(&StoredEvent { event, hash: Digest::of(&seq.to_be_bytes()) });
    }

    #[test]
    fn a_stop_lasts_until_the_stage_next_finishes_a_deployment() {
        let mut view = View::empty(None, true);
        let digest = Digest::of(b"app");
        fold(&mut view, EventBody::Stopped { pipeline: "p".into(), stage: "dev".into() });
        let stop = view.stage("p", "dev").and_then(|s| s.stopped.clone());
        assert_eq!(stop, Some(Stop { seq: 1, time: "t1".into(), actor: "ana".into() }));
        assert!(view.stage("p", "prod").is_none(), "a stop is per stage");
        let finished = |id: &str| EventBody::DeployFinished {
            pipeline: "p".into(),
            stage: "dev".into(),
            deploy_id: id.into(),
            digest,
            group: "p-dev-v001".into(),
        };
        fold(&mut view, finished("d1"));
        assert_eq!(view.stage("p", "dev").and_then(|s| s.stopped.clone()), None);
    }

    #[test]
    fn distributed_copies_are_merged_into_the_image_record() {
        let mut view = View::empty(None, true);
        let digest = Digest::of(b"app");
        let copy = |region: &str, account: Option<&str>| ImageCopy {
            region: region.into(),
            account: account.map(str::to_string),
            id: format!("ami-{region}"),
            snapshots: vec![],
        };
        fold(
            &mut view,
            EventBody::Baked {
                pipeline: "p".into(),
                recipe: "app".into(),
                digest,
                recipe_key: digest,
                parent: None,
                provider: "aws".into(),
                image_ref: "ami-home".into(),
                commit: None,
                dirty: false,
                copies: vec![copy("us-east-1", None)],
                instance: None,
            },
        );
        let distributed =
            |copies| EventBody::Distributed { pipeline: "p".into(), stage: "prod".into(), digest, copies };
        fold(&mut view, distributed(vec![copy("us-east-1", None), copy("eu-west-1", Some("111122223333"))]));
        // A later event that lists fewer copies does not make the view forget one.
        fold(&mut view, distributed(vec![copy("ap-south-1", None)]));
        let record = view.image(&digest).unwrap();
        assert_eq!(
            record.copies,
            vec![copy("us-east-1", None), copy("eu-west-1", Some("111122223333")), copy("ap-south-1", None)]
        );
        assert_eq!(record.events, vec![2, 3], "the image's history lists its distributions");
        assert_eq!(record.image(digest).copies, record.copies);
    }
}
