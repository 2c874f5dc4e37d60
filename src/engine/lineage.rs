//! Lineage and status: the answers to "what is in prod, where did it come from, who let it through, what ran
//! before it". Both read only the view and the few events the image's record points at.

use serde::Serialize;

use super::promote::resolve_digest;
use super::Context;
use crate::clock::ClockRecord;
use crate::digest::Digest;
use crate::ledger::view::{ImageRecord, Live, OpenDeploy, Stop};
use crate::ledger::{EventBody, GateVerdict, Ledger, View};
use crate::Error;

#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    pub digest: Digest,
    pub recipe: String,
    pub recipe_key: Digest,
    pub image_ref: String,
    pub provider: String,
    pub commit: Option<String>,
    pub dirty: bool,
    pub baked_at: String,
    pub baked_by: String,
    pub baked_seq: u64,
}

impl ImageSummary {
    fn of(digest: Digest, r: &ImageRecord) -> ImageSummary {
        ImageSummary {
            digest,
            recipe: r.recipe.clone(),
            recipe_key: r.recipe_key,
            image_ref: r.image_ref.clone(),
            provider: r.provider.clone(),
            commit: r.commit.clone(),
            dirty: r.dirty,
            baked_at: r.time.clone(),
            baked_by: r.actor.clone(),
            baked_seq: r.seq,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub seq: u64,
    pub time: String,
    pub actor: String,
    /// Set when the event was written under a pinned clock (`KILN_NOW`): `time` was chosen, not read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock: Option<ClockRecord>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Promotion {
    #[serde(flatten)]
    pub at: Step,
    pub gates: Vec<GateVerdict>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Approval {
    #[serde(flatten)]
    pub at: Step,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Deployment {
    pub deploy_id: String,
    pub group: String,
    pub started: Step,
    pub rollback: bool,
    /// "finished", "failed" or "open".
    pub result: String,
    pub ended: Option<Step>,
    pub reason: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageLineage {
    pub stage: String,
    pub promotions: Vec<Promotion>,
    pub approvals: Vec<Approval>,
    pub deployments: Vec<Deployment>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Lineage {
    pub image: ImageSummary,
    /// Nearest first.
    pub parents: Vec<ImageSummary>,
    pub revoked: Option<String>,
    /// In pipeline order; stages the image never reached are left out.
    pub stages: Vec<StageLineage>,
}

/// The digest a lineage query names: a stage (what is live there, else what is promoted) or a digest.
pub fn target_digest(ctx: &Context, view: &View, target: &str) -> Result<Digest, Error> {
    if let Some(stage) = ctx.pipeline.stage(target) {
        let there = view.stage(&ctx.pipeline.name, &stage.name);
        return there
            .and_then(|s| s.live.as_ref().map(|l| l.digest).or(s.promoted.as_ref().map(|p| p.digest)))
            .ok_or_else(|| Error::usage(format!("nothing has been promoted to {} yet", stage.name)));
    }
    resolve_digest(view, target)
}

pub fn lineage(ctx: &Context, target: &str) -> Result<Lineage, Error> {
    let view = ctx.ledger.view()?;
    let digest = target_digest(ctx, &view, target)?;
    let record = view.image(&digest).ok_or_else(|| Error::usage(format!("{digest} is not an image in this ledger")))?;
    let parents =
        view.ancestors(&digest).into_iter().filter_map(|d| view.image(&d).map(|r| ImageSummary::of(d, &r))).collect();
    let revoked = view.revocation(&digest).map(|r| {
        if r.root == digest {
            r.reason
        } else {
            format!("{} (via ancestor {})", r.reason, r.root.short())
        }
    });
    let stages = stage_history(ctx.ledger, &ctx.pipeline.stage_names(), &ctx.pipeline.name, &record)?;
    // A damaged cache shard that could not be rebuilt leaves answers incomplete: fail rather than show them.
    if let Some(err) = view.take_failure() {
        return Err(err.into());
    }
    Ok(Lineage { image: ImageSummary::of(digest, &record), parents, revoked, stages })
}

fn stage_history(
    ledger: &Ledger,
    order: &[&str],
    pipeline: &str,
    record: &ImageRecord,
) -> Result<Vec<StageLineage>, Error> {
    let mut stages: Vec<StageLineage> = order
        .iter()
        .map(|s| StageLineage { stage: s.to_string(), promotions: vec![], approvals: vec![], deployments: vec![] })
        .collect();
    for seq in &record.events {
        let Some(stored) = ledger.read(*seq)? else { continue };
        let event = stored.event;
        let at =
            Step { seq: event.seq, time: event.time.clone(), actor: event.actor.clone(), clock: event.clock.clone() };
        let Some(stage) = event.body.stage().and_then(|s| stages.iter_mut().find(|x| x.stage == s)) else { continue };
        match event.body {
            EventBody::Promoted { pipeline: p, gates, .. } if p == pipeline => {
                stage.promotions.push(Promotion { at, gates })
            }
            EventBody::Approved { pipeline: p, note, .. } if p == pipeline => {
                stage.approvals.push(Approval { at, note })
            }
            EventBody::DeployStarted { pipeline: p, deploy_id, group, rollback, .. } if p == pipeline => {
                stage.deployments.push(Deployment {
                    deploy_id,
                    group,
                    started: at,
                    rollback: rollback.is_some(),
                    result: "open".into(),
                    ended: None,
                    reason: None,
                })
            }
            EventBody::DeployFinished { pipeline: p, deploy_id, .. } if p == pipeline => {
                if let Some(d) = stage.deployments.iter_mut().find(|d| d.deploy_id == deploy_id) {
                    d.result = "finished".into();
                    d.ended = Some(at);
                }
            }
            EventBody::DeployFailed { pipeline: p, deploy_id, reason, .. } if p == pipeline => {
                if let Some(d) = stage.deployments.iter_mut().find(|d| d.deploy_id == deploy_id) {
                    d.result = "failed".into();
                    d.ended = Some(at);
                    d.reason = Some(reason);
                }
            }
            _ => {}
        }
    }
    stages.retain(|s| !(s.promotions.is_empty() && s.approvals.is_empty() && s.deployments.is_empty()));
    Ok(stages)
}

#[derive(Debug, Clone, Serialize)]
pub struct PromotedInfo {
    pub digest: Digest,
    pub image_ref: Option<String>,
    pub seq: u64,
    pub time: String,
    pub actor: String,
}

/// What the provider says of a stage right now.
#[derive(Debug, Clone, Serialize)]
pub struct Runtime {
    /// Instances of the live group running now, and how many it should run.
    pub running: u32,
    pub capacity: u32,
    /// The group the stage's traffic goes to, per the provider.
    pub serving: Option<String>,
    pub endpoint_up: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct StageStatus {
    pub stage: String,
    pub endpoint: Option<String>,
    pub runtime: Option<Runtime>,
    pub promoted: Option<PromotedInfo>,
    pub live: Option<Live>,
    pub deploying: Option<OpenDeploy>,
    /// Set while the stage is stopped on purpose (`kiln down`) and nothing has started it again.
    pub stopped: Option<Stop>,
    pub warnings: Vec<String>,
}

/// A stage's warnings about revoked images: the live one, and the promoted one when it is another image.
pub(crate) fn revocation_warnings(view: &View, live: Option<Digest>, promoted: Option<Digest>) -> Vec<String> {
    let promoted = promoted.filter(|d| Some(*d) != live);
    [("live", live), ("promoted", promoted)]
        .into_iter()
        .filter_map(|(what, digest)| {
            let revocation = view.revocation(&digest?)?;
            Some(format!("the {what} image is REVOKED: {}", revocation.reason))
        })
        .collect()
}

/// Per stage: what is promoted, what is live, what is being deployed, and what is wrong.
pub fn status(ctx: &Context) -> Result<Vec<StageStatus>, Error> {
    let view = ctx.ledger.view()?;
    let mut out = Vec::new();
    for stage in &ctx.pipeline.stages {
        let there = view.stage(&ctx.pipeline.name, &stage.name);
        let promoted = there.and_then(|s| s.promoted.clone()).map(|m| PromotedInfo {
            image_ref: view.image(&m.digest).map(|r| r.image_ref),
            digest: m.digest,
            seq: m.seq,
            time: m.time,
            actor: m.actor,
        });
        let live = there.and_then(|s| s.live.clone());
        let deploying = there.and_then(|s| s.open.clone());
        let mut warnings =
            revocation_warnings(&view, live.as_ref().map(|l| l.digest), promoted.as_ref().map(|p| p.digest));
        let target = crate::provider::StageRef { pipeline: &ctx.pipeline.name, stage };
        let mut stopped = None;
        let runtime = match &live {
            None => None,
            Some(live) => {
                let group = ctx.fleet.groups(target)?.into_iter().find(|g| g.name == live.group);
                let runtime = Runtime {
                    running: group.as_ref().map_or(0, |g| g.running),
                    capacity: group.as_ref().map_or(0, |g| g.capacity),
                    serving: ctx.fleet.serving(target)?,
                    endpoint_up: ctx.fleet.endpoint_up(target),
                };
                let down = runtime.running == 0 || !runtime.endpoint_up;
                // A deployment that healed the stage without finishing a new one leaves the mark; what runs wins.
                stopped = there.and_then(|s| s.stopped.clone()).filter(|_| down || runtime.running < runtime.capacity);
                if let Some(stop) = &stopped {
                    warnings.push(format!(
                        "stopped (kiln down at seq {} by {}); `kiln deploy --stage {}` starts it again",
                        stop.seq, stop.actor, stage.name
                    ));
                } else if down {
                    warnings.push("not running; `kiln deploy` starts it again".into());
                } else if runtime.running < runtime.capacity {
                    warnings.push(format!("only {} of {} instances are running", runtime.running, runtime.capacity));
                }
                Some(runtime)
            }
        };
        warnings.dedup();
        out.push(StageStatus {
            stage: stage.name.clone(),
            endpoint: ctx.fleet.endpoint(target),
            runtime,
            promoted,
            live,
            deploying,
            stopped,
            warnings,
        });
    }
    if let Some(err) = view.take_failure() {
        return Err(err.into());
    }
    Ok(out)
}
