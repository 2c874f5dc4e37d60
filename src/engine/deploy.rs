//! Deployment by whole-group replacement (DESIGN.md §5), one algorithm for every provider: take the stage's lease,
//! launch a new group from the digest, wait for it to be healthy, move traffic, drain and retire the old group.
//! Every step is a ledger event, and an interrupted deployment is reconciled (finished or undone) from what the
//! provider really serves before anything else happens to the stage.

use std::time::{Duration, Instant};

use serde::Serialize;

use super::Context;
use crate::clock;
use crate::config::Stage;
use crate::digest::Digest;
use crate::fault;
use crate::ledger::event::RollbackRecord;
use crate::ledger::view::{group_version, OpenDeploy, TAKEOVER_STEP};
use crate::ledger::{Decision, EventBody, GateVerdict, View};
use crate::provider::{ImageRef, StageRef};
use crate::Error;

/// What to deploy.
#[derive(Debug, Clone)]
pub enum Want {
    /// What is promoted to the stage.
    Promoted,
    /// An earlier digest (default: the one live before the current one), gates skipped.
    Rollback { to: Option<Digest>, reason: Option<String>, force: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeployOutcome {
    Deployed,
    AlreadyLive,
}

#[derive(Debug, Clone, Serialize)]
pub struct DeployReport {
    pub stage: String,
    pub digest: Digest,
    pub image_ref: String,
    pub group: String,
    pub previous_group: Option<String>,
    pub outcome: DeployOutcome,
    pub deploy_id: Option<String>,
    /// From the last instance healthy to traffic on the new group.
    pub cutover_ms: Option<u64>,
    pub endpoint: Option<String>,
    /// What happened to an interrupted deployment found on the way in.
    pub reconciled: Option<String>,
    pub rollback: bool,
}

/// This process, as a lease holder: `host:pid:start-time`.
fn holder_id() -> String {
    let pid = std::process::id() as i32;
    format!("{}:{pid}:{}", crate::process::host_name(), crate::process::start_time(pid).unwrap_or_default())
}

/// Whether the lease holder is a kiln process on this machine that is gone (so its lease can be taken at once).
fn holder_is_dead(holder: &str) -> bool {
    let mut parts = holder.rsplitn(3, ':');
    let (Some(started), Some(pid), Some(host)) = (parts.next(), parts.next(), parts.next()) else { return false };
    let (Ok(started), Ok(pid)) = (started.parse::<u64>(), pid.parse::<i32>()) else { return false };
    host == crate::process::host_name() && !crate::process::alive(pid, started)
}

fn busy(stage: &Stage, open: &OpenDeploy) -> Error {
    Error::Busy {
        stage: stage.name.clone(),
        holder: format!("{} ({})", open.actor, open.holder),
        until: open.lease_until.clone(),
        deploy_id: open.deploy_id.clone(),
    }
}

fn lease_expired(ctx: &Context, open: &OpenDeploy) -> bool {
    clock::parse(&open.lease_until).is_some_and(|until| ctx.clock.now() >= until)
}

fn stage_ref<'a>(ctx: &'a Context, stage: &'a Stage) -> StageRef<'a> {
    StageRef { pipeline: &ctx.pipeline.name, stage }
}

fn group_name(ctx: &Context, stage: &Stage, version: u64) -> String {
    format!("{}-{}-v{version:03}", ctx.pipeline.name, stage.name)
}

/// Appends `body` for the deployment `deploy_id` if it is still the stage's open one. A deployment that was taken
/// over and reconciled by another kiln is no longer ours to record.
fn append_if_open(ctx: &Context, stage: &Stage, deploy_id: &str, body: EventBody) -> Result<(), Error> {
    ctx.ledger.append::<(), Error>(ctx.actor, ctx.clock, |view| {
        let open = view.stage(&ctx.pipeline.name, &stage.name).and_then(|s| s.open.as_ref());
        if open.is_none_or(|o| o.deploy_id != deploy_id) {
            return Ok(Decision::Skip(()));
        }
        Ok(Decision::Append(Box::new(body.clone()), ()))
    })?;
    Ok(())
}

/// Records a step of the open deployment; `KILN_FAULT=deploy:after-<step>` dies right after it.
fn step(ctx: &Context, stage: &Stage, deploy_id: &str, name: &str, detail: serde_json::Value) -> Result<(), Error> {
    let body = EventBody::DeployStep {
        pipeline: ctx.pipeline.name.clone(),
        stage: stage.name.clone(),
        deploy_id: deploy_id.to_string(),
        step: name.to_string(),
        detail,
    };
    append_if_open(ctx, stage, deploy_id, body)?;
    fault::point(&format!("deploy:after-{name}"));
    Ok(())
}

fn finish(ctx: &Context, stage: &Stage, open: &OpenDeploy) -> Result<(), Error> {
    let body = EventBody::DeployFinished {
        pipeline: ctx.pipeline.name.clone(),
        stage: stage.name.clone(),
        deploy_id: open.deploy_id.clone(),
        digest: open.digest,
        group: open.group.clone(),
    };
    append_if_open(ctx, stage, &open.deploy_id, body)
}

fn fail(ctx: &Context, stage: &Stage, open: &OpenDeploy, reason: &str, log_tail: Option<String>) -> Result<(), Error> {
    let body = EventBody::DeployFailed {
        pipeline: ctx.pipeline.name.clone(),
        stage: stage.name.clone(),
        deploy_id: open.deploy_id.clone(),
        digest: open.digest,
        group: open.group.clone(),
        reason: reason.to_string(),
        log_tail,
    };
    append_if_open(ctx, stage, &open.deploy_id, body)
}

/// Parks the previous group and destroys parked groups beyond `keep-previous`, keeping the most recently live
/// ones (after a rollback, that is not the highest version). The serving group is never touched.
fn retire(ctx: &Context, stage: &Stage, serving: &str, previous: Option<&str>) -> Result<serde_json::Value, Error> {
    let fleet = ctx.fleet;
    let target = stage_ref(ctx, stage);
    let mut parked = Vec::new();
    if let Some(previous) = previous.filter(|p| *p != serving) {
        if fleet.groups(target)?.iter().any(|g| g.name == previous && g.capacity > 0) {
            fleet.park(target, previous)?;
            parked.push(previous.to_string());
        }
    }
    let view = ctx.ledger.view()?;
    let there = view.stage(&ctx.pipeline.name, &stage.name).cloned().unwrap_or_default();
    let mut recent: Vec<String> = Vec::new();
    let candidates = previous
        .map(str::to_string)
        .into_iter()
        .chain(there.live.iter().map(|l| l.group.clone()))
        .chain(there.history.iter().rev().map(|l| l.group.clone()));
    for group in candidates {
        if group != serving && !recent.contains(&group) {
            recent.push(group);
        }
    }
    let keep: Vec<&String> = recent.iter().take(stage.keep_previous as usize).collect();
    let mut destroyed = Vec::new();
    for group in fleet.groups(target)? {
        if group.name != serving && !keep.contains(&&group.name) {
            fleet.destroy(target, &group.name)?;
            destroyed.push(group.name);
        }
    }
    Ok(serde_json::json!({ "parked": parked, "destroyed": destroyed }))
}

/// Finishes or undoes an interrupted deployment, going by which group the provider really serves. `reused` says
/// the deployment re-enabled a kept group, which an undo parks again rather than destroys.
fn reconcile(ctx: &Context, stage: &Stage, open: &OpenDeploy, reused: bool) -> Result<String, Error> {
    let fleet = ctx.fleet;
    let target = stage_ref(ctx, stage);
    if fleet.serving(target)?.as_deref() == Some(open.group.as_str()) {
        let retired = retire(ctx, stage, &open.group, open.previous_group.as_deref())?;
        step(ctx, stage, &open.deploy_id, "retired", retired)?;
        finish(ctx, stage, open)?;
        return Ok(format!("finished interrupted deployment {} (traffic had moved to {})", open.deploy_id, open.group));
    }
    if reused {
        fleet.park(target, &open.group)?;
    } else {
        fleet.destroy(target, &open.group)?;
    }
    let last = open.steps.iter().rev().find(|s| s.as_str() != TAKEOVER_STEP).map(String::as_str).unwrap_or("start");
    let reason = format!("interrupted after {last}; traffic had not moved, so {} was removed", open.group);
    fail(ctx, stage, open, &reason, None)?;
    Ok(format!("undid interrupted deployment {} (the previous group kept serving)", open.deploy_id))
}

/// If the stage has an open deployment whose holder is gone or whose lease expired, takes the lease over and
/// reconciles it. A live lease held by someone else is `Busy` (exit 5).
fn settle_open(ctx: &Context, stage: &Stage) -> Result<Option<String>, Error> {
    let me = holder_id();
    let lease_until = ctx.clock.stamp_after(stage.lease);
    let (taken, _) = ctx.ledger.append::<Option<(OpenDeploy, bool)>, Error>(ctx.actor, ctx.clock, |view| {
        let Some(there) = view.stage(&ctx.pipeline.name, &stage.name) else { return Ok(Decision::Skip(None)) };
        let Some(open) = there.open.clone() else { return Ok(Decision::Skip(None)) };
        // New groups get the stage's next version when the deployment starts; an older version was reused.
        let reused = group_version(&open.group).is_some_and(|v| v < there.versions);
        if open.holder != me && !lease_expired(ctx, &open) && !holder_is_dead(&open.holder) {
            return Err(busy(stage, &open));
        }
        let body = EventBody::DeployStep {
            pipeline: ctx.pipeline.name.clone(),
            stage: stage.name.clone(),
            deploy_id: open.deploy_id.clone(),
            step: TAKEOVER_STEP.into(),
            detail: serde_json::json!({ "lease_until": lease_until, "lease_holder": me, "previous_holder": open.holder }),
        };
        Ok(Decision::Append(Box::new(body), Some((open, reused))))
    })?;
    match taken {
        None => Ok(None),
        Some((open, reused)) => {
            tracing::warn!(stage = %stage.name, deploy = %open.deploy_id, "reconciling an interrupted deployment");
            Ok(Some(reconcile(ctx, stage, &open, reused)?))
        }
    }
}

fn refused_revoked(stage: &Stage, digest: Digest, reason: String) -> Error {
    Error::Refused {
        action: crate::error::Refusal::Deployment,
        stage: stage.name.clone(),
        digest: Some(digest),
        gates: vec![GateVerdict {
            gate: "not-revoked".into(),
            passed: false,
            detail: format!("it is revoked: {reason} (a rollback may force it with --force --reason)"),
            evidence: serde_json::Value::Null,
        }],
    }
}

/// The digest to deploy, and the rollback record when rolling back.
fn choose(ctx: &Context, view: &View, stage: &Stage, want: &Want) -> Result<(Digest, Option<RollbackRecord>), Error> {
    let there = view.stage(&ctx.pipeline.name, &stage.name);
    match want {
        Want::Promoted => {
            let digest = there.and_then(|s| s.promoted.as_ref()).map(|p| p.digest).ok_or_else(|| {
                Error::usage(format!(
                    "nothing is promoted to {}; run `kiln promote --stage {}` first",
                    stage.name, stage.name
                ))
            })?;
            if let Some(revocation) = view.revocation(&digest) {
                return Err(refused_revoked(stage, digest, revocation.reason));
            }
            Ok((digest, None))
        }
        Want::Rollback { to, reason, force } => {
            let live = there.and_then(|s| s.live.as_ref()).map(|l| l.digest);
            let digest = match to {
                Some(digest) => *digest,
                None => there
                    .and_then(|s| s.history.iter().rev().find(|h| Some(h.digest) != live).map(|h| h.digest))
                    .ok_or_else(|| {
                    Error::usage(format!("{} has no earlier deployment to roll back to", stage.name))
                })?,
            };
            if *force && reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
                return Err(Error::usage("--force needs --reason: a forced rollback must say why"));
            }
            if let Some(revocation) = view.revocation(&digest) {
                if !force {
                    return Err(refused_revoked(stage, digest, revocation.reason));
                }
            }
            Ok((digest, Some(RollbackRecord { reason: reason.clone(), forced: *force })))
        }
    }
}

pub fn deploy(ctx: &Context, stage_name: &str, want: Want) -> Result<DeployReport, Error> {
    let stage = super::promote::stage(ctx, stage_name)?;
    let target = stage_ref(ctx, stage);
    let fleet = ctx.fleet;
    let reconciled = settle_open(ctx, stage)?;

    let view = ctx.ledger.view()?;
    let (digest, rollback) = choose(ctx, &view, stage, &want)?;
    let record = view.image(&digest).ok_or_else(|| Error::usage(format!("{digest} is not an image in this ledger")))?;
    let image = ImageRef { digest, image_ref: record.image_ref.clone() };
    let live = view.stage(&ctx.pipeline.name, &stage.name).and_then(|s| s.live.clone());
    drop(view);
    // An image that says nothing about how to start is a recipe problem, refused before the stage is touched.
    if ctx.images.instance_of(&image)?.is_none() {
        return Err(Error::usage(format!(
            "{} (recipe `{}`) has no [instance] section, so there is nothing to start; add one to images/{}.toml \
             (command and health) and bake again",
            image.image_ref, record.recipe, record.recipe
        )));
    }

    let groups = fleet.groups(target)?;
    let serving = fleet.serving(target)?;
    if let Some(live) = &live {
        let healthy_live = live.digest == digest
            && serving.as_deref() == Some(live.group.as_str())
            && groups.iter().any(|g| g.name == live.group && g.running >= g.capacity && g.capacity > 0);
        if healthy_live {
            return Ok(DeployReport {
                stage: stage.name.clone(),
                digest,
                image_ref: image.image_ref,
                group: live.group.clone(),
                previous_group: None,
                outcome: DeployOutcome::AlreadyLive,
                deploy_id: None,
                cutover_ms: None,
                endpoint: fleet.endpoint(target),
                reconciled,
                rollback: rollback.is_some(),
            });
        }
    }
    // A rollback re-enables a kept group of the digest instead of building a new one.
    let kept = rollback
        .as_ref()
        .and_then(|_| {
            groups
                .iter()
                .filter(|g| g.digest == digest && Some(&g.name) != serving.as_ref())
                .max_by_key(|g| g.name.clone())
        })
        .map(|g| g.name.clone());

    // 1. Take the lease.
    let me = holder_id();
    let lease_until = ctx.clock.stamp_after(stage.lease);
    let (open, _) = ctx.ledger.append::<OpenDeploy, Error>(ctx.actor, ctx.clock, |view| {
        let there = view.stage(&ctx.pipeline.name, &stage.name).cloned().unwrap_or_default();
        if let Some(open) = &there.open {
            return Err(busy(stage, open));
        }
        let group = kept.clone().unwrap_or_else(|| group_name(ctx, stage, there.versions + 1));
        let deploy_id = format!("{}-{}-{}", ctx.pipeline.name, stage.name, there.deploys + 1);
        let previous_group = serving.clone().or(there.live.as_ref().map(|l| l.group.clone()));
        let open = OpenDeploy {
            deploy_id: deploy_id.clone(),
            digest,
            group: group.clone(),
            previous_group: previous_group.clone(),
            lease_until: lease_until.clone(),
            holder: me.clone(),
            actor: ctx.actor.to_string(),
            seq: view.seq() + 1,
            rollback: rollback.is_some(),
            steps: vec![],
        };
        let body = EventBody::DeployStarted {
            pipeline: ctx.pipeline.name.clone(),
            stage: stage.name.clone(),
            deploy_id,
            digest,
            group,
            previous_group,
            lease_until: lease_until.clone(),
            lease_holder: me.clone(),
            rollback: rollback.clone(),
        };
        Ok(Decision::Append(Box::new(body), open))
    })?;
    fault::point("deploy:after-started");
    tracing::info!(stage = %stage.name, group = %open.group, "deploying {} ({})", digest.short(), image.image_ref);

    // 2. Launch the new group (or scale a kept one back up).
    let capacity = stage.capacity;
    let launched = match fleet.launch(target, &open.group, &image, capacity) {
        Ok(info) => info,
        Err(err) => {
            let _ = fleet.destroy(target, &open.group);
            fail(ctx, stage, &open, &format!("launching {} failed: {err}", open.group), None)?;
            return Err(Error::DeployFailed {
                stage: stage.name.clone(),
                group: open.group.clone(),
                reason: err.to_string(),
                log_tail: None,
            });
        }
    };
    step(
        ctx,
        stage,
        &open.deploy_id,
        "group-created",
        serde_json::json!({ "capacity": launched.capacity, "reused": kept.is_some() }),
    )?;

    // 3. Wait until every instance is healthy.
    let deadline = Instant::now() + ready_timeout(ctx, stage, &image)?;
    if let Err(unhealthy) = fleet.wait_healthy(target, &open.group, deadline)? {
        if kept.is_some() {
            fleet.park(target, &open.group)?;
        } else {
            fleet.destroy(target, &open.group)?;
        }
        fail(ctx, stage, &open, &unhealthy.reason, unhealthy.log_tail.clone())?;
        return Err(Error::DeployFailed {
            stage: stage.name.clone(),
            group: open.group.clone(),
            reason: unhealthy.reason,
            log_tail: unhealthy.log_tail,
        });
    }
    let healthy_at = Instant::now();
    step(ctx, stage, &open.deploy_id, "healthy", serde_json::Value::Null)?;

    // 4. Move traffic, then drain the old group.
    fleet.route(target, &open.group)?;
    let cutover = healthy_at.elapsed();
    step(
        ctx,
        stage,
        &open.deploy_id,
        "traffic-switched",
        serde_json::json!({ "cutover_ms": cutover.as_millis() as u64 }),
    )?;
    if let Some(previous) = open.previous_group.as_deref().filter(|p| *p != open.group) {
        fleet.drain(target, previous)?;
        step(ctx, stage, &open.deploy_id, "drained", serde_json::json!({ "group": previous }))?;
    }

    // 5. Retire the old group, keeping `keep-previous` parked for rollback.
    let retired = retire(ctx, stage, &open.group, open.previous_group.as_deref())?;
    step(ctx, stage, &open.deploy_id, "retired", retired)?;

    // 6. Done; the lease goes with the open deployment.
    finish(ctx, stage, &open)?;
    Ok(DeployReport {
        stage: stage.name.clone(),
        digest,
        image_ref: image.image_ref,
        group: open.group.clone(),
        previous_group: open.previous_group.clone(),
        outcome: DeployOutcome::Deployed,
        deploy_id: Some(open.deploy_id.clone()),
        cutover_ms: Some(cutover.as_millis() as u64),
        endpoint: fleet.endpoint(target),
        reconciled,
        rollback: rollback.is_some(),
    })
}

/// The stage's ready timeout, else the image's instance `ready-timeout`.
fn ready_timeout(ctx: &Context, stage: &Stage, image: &ImageRef) -> Result<Duration, Error> {
    if let Some(timeout) = stage.ready_timeout {
        return Ok(timeout);
    }
    let instance = ctx.images.instance_of(image)?;
    Ok(instance.map(|i| i.ready_timeout()).unwrap_or(Duration::from_secs(60)))
}
