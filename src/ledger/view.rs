//! The materialised view of a ledger: images, stage heads, approvals, revocations and open deployments, folded
//! from events in order. Every query reads this rather than scanning events.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::event::{EventBody, StoredEvent};
use crate::digest::Digest;

/// Bump when the view's shape or folding rules change, so old caches are rebuilt rather than misread.
pub const VIEW_FORMAT: u32 = 1;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct View {
    pub format: u32,
    /// The last event folded in (0 for an empty ledger) and its hash.
    pub seq: u64,
    pub hash: Digest,
    pub images: BTreeMap<Digest, ImageRecord>,
    /// recipe key → image digest: the bake cache.
    pub recipe_keys: BTreeMap<Digest, Digest>,
    /// pipeline → stage → state.
    pub pipelines: BTreeMap<String, BTreeMap<String, StageView>>,
    pub revoked: BTreeMap<Digest, Revocation>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageRecord {
    /// The `baked` event.
    pub seq: u64,
    pub recipe: String,
    pub parent: Option<Digest>,
    pub time: String,
    /// Every later event about this image (promotions, approvals, deployments), for lineage.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub events: Vec<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Revocation {
    pub seq: u64,
    /// The digest named in the `revoke` command; itself for a direct revocation.
    pub root: Digest,
    pub reason: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct StageView {
    pub promoted: Option<Mark>,
    /// Every promotion into this stage, oldest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub promotions: Vec<Mark>,
    /// The last deployment that finished healthy.
    pub live: Option<Live>,
    /// Earlier live deployments, oldest first: the default rollback targets.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<Live>,
    pub open: Option<OpenDeploy>,
    /// digest → actor → approval.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub approvals: BTreeMap<Digest, BTreeMap<String, Mark>>,
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
    pub holder: String,
    pub seq: u64,
    pub rollback: bool,
    /// Steps recorded so far, in order.
    pub steps: Vec<String>,
}

impl Default for View {
    fn default() -> Self {
        View {
            format: VIEW_FORMAT,
            seq: 0,
            hash: Digest::ZERO,
            images: BTreeMap::new(),
            recipe_keys: BTreeMap::new(),
            pipelines: BTreeMap::new(),
            revoked: BTreeMap::new(),
        }
    }
}

impl View {
    pub fn stage(&self, pipeline: &str, stage: &str) -> Option<&StageView> {
        self.pipelines.get(pipeline)?.get(stage)
    }

    pub fn image(&self, digest: &Digest) -> Option<&ImageRecord> {
        self.images.get(digest)
    }

    /// The image's ancestors, nearest first (stops at a parent unknown to this ledger).
    pub fn ancestors(&self, digest: &Digest) -> Vec<Digest> {
        let mut out = Vec::new();
        let mut current = self.images.get(digest).and_then(|r| r.parent);
        while let Some(parent) = current {
            if out.contains(&parent) {
                break;
            }
            out.push(parent);
            current = self.images.get(&parent).and_then(|r| r.parent);
        }
        out
    }

    /// Every known image whose parent chain includes `root`.
    pub fn descendants(&self, root: &Digest) -> Vec<Digest> {
        self.images.keys().filter(|d| self.ancestors(d).contains(root)).copied().collect()
    }

    /// Whether `digest` or any ancestor is revoked, with the revocation that applies.
    pub fn revocation(&self, digest: &Digest) -> Option<&Revocation> {
        std::iter::once(*digest).chain(self.ancestors(digest)).find_map(|d| self.revoked.get(&d))
    }

    /// Approvals of `digest` for a stage, by distinct actor.
    pub fn approvers(&self, pipeline: &str, stage: &str, digest: &Digest) -> BTreeSet<String> {
        self.stage(pipeline, stage)
            .and_then(|s| s.approvals.get(digest))
            .map(|by| by.keys().cloned().collect())
            .unwrap_or_default()
    }

    fn stage_mut(&mut self, pipeline: &str, stage: &str) -> &mut StageView {
        self.pipelines.entry(pipeline.to_string()).or_default().entry(stage.to_string()).or_default()
    }

    fn note_image_event(&mut self, digest: &Digest, seq: u64) {
        if let Some(record) = self.images.get_mut(digest) {
            record.events.push(seq);
        }
    }

    /// Folds one event in. The caller has checked that it follows `self.seq` and chains to `self.hash`.
    pub fn apply(&mut self, stored: &StoredEvent) {
        let event = &stored.event;
        let seq = event.seq;
        let mark =
            |digest: &Digest| Mark { digest: *digest, seq, time: event.time.clone(), actor: event.actor.clone() };
        match &event.body {
            EventBody::Baked { recipe, digest, recipe_key, parent, .. } => {
                self.images.entry(*digest).or_insert_with(|| ImageRecord {
                    seq,
                    recipe: recipe.clone(),
                    parent: *parent,
                    time: event.time.clone(),
                    events: Vec::new(),
                });
                self.recipe_keys.insert(*recipe_key, *digest);
            }
            EventBody::Promoted { pipeline, stage, digest, .. } => {
                let m = mark(digest);
                let view = self.stage_mut(pipeline, stage);
                view.promoted = Some(m.clone());
                view.promotions.push(m);
                self.note_image_event(digest, seq);
            }
            EventBody::Refused { .. } => {}
            EventBody::Approved { pipeline, stage, digest, .. } => {
                let m = mark(digest);
                let actor = event.actor.clone();
                self.stage_mut(pipeline, stage).approvals.entry(*digest).or_default().entry(actor).or_insert(m);
                self.note_image_event(digest, seq);
            }
            EventBody::Revoked { digest, reason, descendants } => {
                for d in std::iter::once(digest).chain(descendants) {
                    self.revoked.entry(*d).or_insert(Revocation { seq, root: *digest, reason: reason.clone() });
                }
                self.note_image_event(digest, seq);
            }
            EventBody::DeployStarted {
                pipeline,
                stage,
                deploy_id,
                digest,
                group,
                previous_group,
                lease_until,
                rollback,
            } => {
                let holder = event.actor.clone();
                self.stage_mut(pipeline, stage).open = Some(OpenDeploy {
                    deploy_id: deploy_id.clone(),
                    digest: *digest,
                    group: group.clone(),
                    previous_group: previous_group.clone(),
                    lease_until: lease_until.clone(),
                    holder,
                    seq,
                    rollback: rollback.is_some(),
                    steps: Vec::new(),
                });
                self.note_image_event(digest, seq);
            }
            EventBody::DeployStep { pipeline, stage, deploy_id, step, .. } => {
                if let Some(open) = self.stage_mut(pipeline, stage).open.as_mut().filter(|o| &o.deploy_id == deploy_id)
                {
                    open.steps.push(step.clone());
                }
            }
            EventBody::DeployFinished { pipeline, stage, deploy_id, digest, group } => {
                let view = self.stage_mut(pipeline, stage);
                if let Some(previous) = view.live.take() {
                    view.history.push(previous);
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
                self.note_image_event(digest, seq);
            }
            EventBody::DeployFailed { pipeline, stage, deploy_id, digest, .. } => {
                let view = self.stage_mut(pipeline, stage);
                if view.open.as_ref().is_some_and(|o| &o.deploy_id == deploy_id) {
                    view.open = None;
                }
                self.note_image_event(digest, seq);
            }
        }
        self.seq = seq;
        self.hash = stored.hash;
    }
}
