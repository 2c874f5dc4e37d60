//! Deployment by whole-group replacement (DESIGN.md §5), one algorithm for every provider: take the stage's lease,
//! launch a new group from the digest, wait for it to be healthy, move traffic, drain, verify, retire the old group.
//! Every step is a ledger event. The lease is renewed while kiln waits, and every step that changes the provider
//! first proves this deployment is still the stage's open one (fencing), so a kiln that lost its lease changes
//! nothing more. An interrupted deployment is reconciled (finished or undone) from what the provider really serves
//! before anything else happens to the stage.

use std::cell::Cell;
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use super::gate;
use super::Context;
use crate::clock;
use crate::config::pipeline::VerifyCheck;
use crate::config::Stage;
use crate::digest::Digest;
use crate::error::Refusal;
use crate::fault;
use crate::ledger::event::RollbackRecord;
use crate::ledger::view::{group_version, OpenDeploy, RENEWAL_STEP, TAKEOVER_STEP};
use crate::ledger::{Decision, EventBody, GateVerdict, View};
use crate::provider::{DeploySketch, GroupStart, ImageRef, StageRef, Unhealthy};
use crate::Error;

/// How far back `kiln` looks for the takeover that closed its deployment, to name who took over.
const TAKEOVER_SEARCH: usize = 10_000;

/// What to deploy.
#[derive(Debug, Clone)]
pub enum Want {
    /// What is promoted to the stage.
    Promoted,
    /// An earlier digest (default: the one live before the current one), gates skipped.
    Rollback { to: Option<Digest>, reason: Option<String>, force: bool },
    /// The live digest again, as a new group: the release `kiln drill` deploys so a fault meets a real deployment
    /// without changing what the stage runs.
    Redeploy,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeployOutcome {
    Deployed,
    /// The live digest's own group was brought back to capacity and its endpoint restarted: no new group.
    Healed,
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
    /// The verification window, when the stage has one.
    pub verified_for_ms: Option<u64>,
}

/// This process, as a lease holder: `host:pid:start-time`.
pub fn holder_id() -> String {
    let pid = std::process::id() as i32;
    format!("{}:{pid}:{}", crate::process::host_name(), crate::process::start_time(pid).unwrap_or_default())
}

/// Whether the lease holder is a kiln process on this machine that is gone (so its lease can be taken at once).
/// A holder on another machine is only known dead by its lease running out.
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

/// A deployment's hold on its stage. Every ledger write of the deployment and every provider change goes through
/// it: writes are judged against the head they are appended to (the deployment must still be the stage's open one,
/// held by us), and provider changes are fenced the same way first.
struct Lease<'c> {
    ctx: &'c Context<'c>,
    stage: &'c Stage,
    deploy_id: String,
    /// When the lease runs out, by the context's clock.
    until: Cell<SystemTime>,
    /// When it was last extended, by the monotonic clock (a pinned clock never moves).
    renewed: Cell<Instant>,
}

impl<'c> Lease<'c> {
    fn held(ctx: &'c Context<'c>, stage: &'c Stage, open: &OpenDeploy) -> Lease<'c> {
        let until = clock::parse(&open.lease_until).unwrap_or_else(|| ctx.clock.now());
        Lease {
            ctx,
            stage,
            deploy_id: open.deploy_id.clone(),
            until: Cell::new(until),
            renewed: Cell::new(Instant::now()),
        }
    }

    fn is_ours(&self, view: &View) -> bool {
        view.stage(&self.ctx.pipeline.name, &self.stage.name)
            .and_then(|s| s.open.as_ref())
            .is_some_and(|o| o.deploy_id == self.deploy_id && o.holder == self.ctx.lease_holder)
    }

    /// Who took the deployment over: the `lease-taken-over` step that named it, else whoever holds the stage now.
    fn taken_over(&self, view: &View) -> Error {
        let ledger = self.ctx.ledger;
        let found = ledger
            .newest_first(view.seq(), TAKEOVER_SEARCH, |e| {
                matches!(&e.event.body, EventBody::DeployStep { deploy_id, step, .. }
                    if *deploy_id == self.deploy_id && step == TAKEOVER_STEP)
            })
            .ok()
            .and_then(|found| found.into_iter().next());
        let by = match found {
            Some(event) => {
                let holder = match &event.event.body {
                    EventBody::DeployStep { detail, .. } => detail["lease_holder"].as_str().unwrap_or("?").to_string(),
                    _ => "?".into(),
                };
                format!("{} ({holder}) at seq {}", event.event.actor, event.event.seq)
            }
            None => match view.stage(&self.ctx.pipeline.name, &self.stage.name).and_then(|s| s.open.as_ref()) {
                Some(open) => format!("{} ({}), deployment {}", open.actor, open.holder, open.deploy_id),
                None => "another kiln".into(),
            },
        };
        Error::TakenOver { stage: self.stage.name.clone(), deploy_id: self.deploy_id.clone(), by }
    }

    /// Appends `body` only if this deployment is still the stage's open one and ours; otherwise `TakenOver`.
    fn append(&self, body: EventBody) -> Result<(), Error> {
        let ctx = self.ctx;
        ctx.ledger.append::<(), Error>(ctx.actor, ctx.clock, |view| {
            if !self.is_ours(view) {
                return Err(self.taken_over(view));
            }
            Ok(Decision::Append(Box::new(body.clone()), ()))
        })?;
        Ok(())
    }

    fn renewal_due(&self) -> bool {
        let lease = self.stage.lease;
        let left = self.until.get().duration_since(self.ctx.clock.now()).unwrap_or_default();
        left < lease * 2 / 3 || self.renewed.get().elapsed() >= lease / 3
    }

    fn renew(&self) -> Result<(), Error> {
        let until = self.ctx.clock.now() + self.stage.lease;
        self.append(EventBody::DeployStep {
            pipeline: self.ctx.pipeline.name.clone(),
            stage: self.stage.name.clone(),
            deploy_id: self.deploy_id.clone(),
            step: RENEWAL_STEP.into(),
            detail: serde_json::json!({ "lease_until": clock::format(until), "lease_holder": self.ctx.lease_holder }),
        })?;
        self.until.set(until);
        self.renewed.set(Instant::now());
        tracing::debug!(stage = %self.stage.name, "renewed the lease until {}", clock::format(until));
        Ok(())
    }

    /// Stops the deployment where it stands once SIGINT or SIGTERM arrived (when the CLI catches them): it stays
    /// open, exactly as a crash would leave it, for the next kiln to finish or undo.
    fn check_interrupt(&self) -> Result<(), Error> {
        if crate::process::interrupted() {
            return Err(Error::Interrupted {
                during: format!("deployment {} to {}", self.deploy_id, self.stage.name),
                aftermath: format!(
                    "it is left open, and the next `kiln deploy --stage {}` finishes or undoes it",
                    self.stage.name
                ),
            });
        }
        Ok(())
    }

    /// Called while waiting: extends the lease when a third of it has gone. Stops the wait if it was taken over.
    fn keep_alive(&self) -> Result<(), Error> {
        self.check_interrupt()?;
        if self.renewal_due() {
            self.renew()?;
        }
        Ok(())
    }

    /// Called before every provider change: proves the deployment is still ours, renewing the lease when it runs
    /// low so that nobody can take it over while the change is under way.
    fn fence(&self) -> Result<(), Error> {
        self.check_interrupt()?;
        if self.renewal_due() {
            return self.renew();
        }
        let view = self.ctx.ledger.view()?;
        if self.is_ours(&view) {
            Ok(())
        } else {
            Err(self.taken_over(&view))
        }
    }

    /// Records a step of the deployment; `KILN_FAULT=deploy:after-<step>` dies right after it.
    fn step(&self, name: &str, detail: serde_json::Value) -> Result<(), Error> {
        self.append(EventBody::DeployStep {
            pipeline: self.ctx.pipeline.name.clone(),
            stage: self.stage.name.clone(),
            deploy_id: self.deploy_id.clone(),
            step: name.to_string(),
            detail,
        })?;
        fault::point(&format!("deploy:after-{name}"));
        Ok(())
    }

    fn finish(&self, open: &OpenDeploy) -> Result<(), Error> {
        self.append(EventBody::DeployFinished {
            pipeline: self.ctx.pipeline.name.clone(),
            stage: self.stage.name.clone(),
            deploy_id: open.deploy_id.clone(),
            digest: open.digest,
            group: open.group.clone(),
        })
    }

    fn fail(&self, open: &OpenDeploy, reason: &str, log_tail: Option<String>) -> Result<(), Error> {
        self.append(EventBody::DeployFailed {
            pipeline: self.ctx.pipeline.name.clone(),
            stage: self.stage.name.clone(),
            deploy_id: open.deploy_id.clone(),
            digest: open.digest,
            group: open.group.clone(),
            reason: reason.to_string(),
            log_tail,
        })
    }
}

/// Removes a group this deployment made, or parks again a kept group it re-enabled.
fn remove_new_group(lease: &Lease, target: StageRef, group: &str, reused: bool) -> Result<(), Error> {
    lease.fence()?;
    if reused {
        lease.ctx.fleet.park(target, group)?;
    } else {
        lease.ctx.fleet.destroy(target, group)?;
    }
    Ok(())
}

/// Parks the previous group and destroys parked groups beyond `keep-previous`, keeping the most recently live
/// ones (after a rollback, that is not the highest version). The serving group is never touched.
fn retire(lease: &Lease, serving: &str, previous: Option<&str>) -> Result<serde_json::Value, Error> {
    let ctx = lease.ctx;
    let stage = lease.stage;
    let fleet = ctx.fleet;
    let target = stage_ref(ctx, stage);
    let mut parked = Vec::new();
    if let Some(previous) = previous.filter(|p| *p != serving) {
        if fleet.groups(target)?.iter().any(|g| g.name == previous && g.capacity > 0) {
            lease.fence()?;
            fleet.park(target, previous)?;
            parked.push(previous.to_string());
        }
    }
    let view = ctx.ledger.view()?;
    let keep = kept_groups(&view, ctx, stage, serving, previous);
    let mut destroyed = Vec::new();
    for group in fleet.groups(target)? {
        if group.name != serving && !keep.contains(&group.name) {
            lease.fence()?;
            fleet.destroy(target, &group.name)?;
            destroyed.push(group.name);
        }
    }
    Ok(serde_json::json!({ "parked": parked, "destroyed": destroyed }))
}

/// The groups besides `serving` that the stage keeps for a fast rollback: the most recently live ones, at most
/// `keep-previous` (after a rollback, that is not the highest version).
fn kept_groups(view: &View, ctx: &Context, stage: &Stage, serving: &str, previous: Option<&str>) -> Vec<String> {
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
    recent.truncate(stage.keep_previous as usize);
    recent
}

/// Moves traffic back to the previous group after the new one failed verification (or a crash interrupted its
/// window), then removes the new group. Returns what the stage serves now.
fn restore_previous(lease: &Lease, open: &OpenDeploy, reused: bool, failed_at: Instant) -> Result<String, Error> {
    let ctx = lease.ctx;
    let target = stage_ref(ctx, lease.stage);
    let aftermath = match open.previous_group.as_deref().filter(|p| *p != open.group) {
        Some(previous) => {
            lease.fence()?;
            let started = Instant::now();
            ctx.fleet.route(target, previous)?;
            let restore_ms = started.elapsed().as_millis() as u64;
            let after_failure_ms = failed_at.elapsed().as_millis() as u64;
            lease.step(
                "traffic-restored",
                serde_json::json!({ "group": previous, "route_ms": restore_ms, "after_failure_ms": after_failure_ms }),
            )?;
            format!("traffic moved back to group {previous}")
        }
        None => "no group served the stage before this deployment, so none serves it now".to_string(),
    };
    remove_new_group(lease, target, &open.group, reused)?;
    Ok(aftermath)
}

/// A deployment that brings the live group itself back (no new group, no traffic move, no window).
fn is_heal(open: &OpenDeploy) -> bool {
    open.previous_group.as_deref() == Some(open.group.as_str())
}

/// Whether the interrupted deployment's window had begun but not ended: traffic moved, nothing verified yet.
fn window_unfinished(open: &OpenDeploy, stage: &Stage) -> bool {
    stage.verify_for.is_some()
        && !is_heal(open)
        && open.steps.iter().any(|s| s == "traffic-switched")
        && !open.steps.iter().any(|s| s == "verified")
}

/// Finishes or undoes an interrupted deployment, going by which group the provider really serves. `reused` says
/// the deployment re-enabled a kept group, which an undo parks again rather than destroys.
fn reconcile(lease: &Lease, open: &OpenDeploy, reused: bool) -> Result<String, Error> {
    let ctx = lease.ctx;
    let stage = lease.stage;
    let target = stage_ref(ctx, stage);
    let serving = ctx.fleet.serving(target)?;
    if serving.as_deref() == Some(open.group.as_str()) {
        // A window that never completed proves nothing: the release goes back rather than through unverified.
        if window_unfinished(open, stage) {
            let aftermath = restore_previous(lease, open, reused, Instant::now())?;
            let reason = "interrupted during its verification window";
            lease.fail(open, reason, None)?;
            return Ok(format!("undid interrupted deployment {} ({reason}; {aftermath})", open.deploy_id));
        }
        let retired = retire(lease, &open.group, open.previous_group.as_deref())?;
        lease.step("retired", retired)?;
        lease.finish(open)?;
        return Ok(format!("finished interrupted deployment {} (traffic had moved to {})", open.deploy_id, open.group));
    }
    // An interrupted heal leaves the live group as it is: it is what the stage has. Anything else is removed.
    if !is_heal(open) {
        remove_new_group(lease, target, &open.group, reused)?;
    }
    let last = open.steps.iter().rev().find(|s| s.as_str() != TAKEOVER_STEP).map(String::as_str).unwrap_or("start");
    let reason = if is_heal(open) {
        format!("heal of {} interrupted after {last}; the group was left as it was", open.group)
    } else {
        format!("interrupted after {last}; traffic had not moved, so {} was removed", open.group)
    };
    lease.fail(open, &reason, None)?;
    let aftermath = match serving {
        Some(group) => format!("group {group} kept serving"),
        None => "no group served the stage".to_string(),
    };
    Ok(format!("undid interrupted deployment {} ({aftermath})", open.deploy_id))
}

/// If the stage has an open deployment whose holder is gone or whose lease expired, takes the lease over and
/// reconciles it. A live lease held by someone else is `Busy` (exit 5).
fn settle_open(ctx: &Context, stage: &Stage) -> Result<Option<String>, Error> {
    let me = ctx.lease_holder.clone();
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
        let mut open = open;
        open.holder = me.clone();
        open.lease_until = lease_until.clone();
        Ok(Decision::Append(Box::new(body), Some((open, reused))))
    })?;
    match taken {
        None => Ok(None),
        Some((open, reused)) => {
            tracing::warn!(stage = %stage.name, deploy = %open.deploy_id, "reconciling an interrupted deployment");
            let lease = Lease::held(ctx, stage, &open);
            Ok(Some(reconcile(&lease, &open, reused)?))
        }
    }
}

fn refused_revoked(stage: &Stage, want: &Want, digest: Digest, reason: String) -> Error {
    Error::Refused {
        action: match want {
            Want::Promoted | Want::Redeploy => Refusal::Deployment,
            Want::Rollback { .. } => Refusal::Rollback,
        },
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

/// What a deployment will run.
struct Choice {
    digest: Digest,
    rollback: Option<RollbackRecord>,
    /// The stage is held on what a rollback made live (newer than its promotion): deploy keeps and heals that
    /// rather than undoing the rollback, until the next promotion.
    held: bool,
}

/// The digest to deploy, and the rollback record when rolling back. Judged against the head the deployment is
/// appended to, so a promotion or revocation recorded meanwhile is never missed.
fn choose(ctx: &Context, view: &View, stage: &Stage, want: &Want) -> Result<Choice, Error> {
    let there = view.stage(&ctx.pipeline.name, &stage.name);
    match want {
        Want::Promoted => {
            let promoted = there.and_then(|s| s.promoted.as_ref()).ok_or_else(|| {
                Error::usage(format!(
                    "nothing is promoted to {}; run `kiln promote --stage {}` first",
                    stage.name, stage.name
                ))
            })?;
            if let Some(live) = there.and_then(|s| s.held_by_rollback()) {
                // Its revocation, if any, was overridden by the forced rollback that made it live; `plan` only
                // lets a held revoked digest be healed in place, never started anew.
                return Ok(Choice { digest: live.digest, rollback: None, held: true });
            }
            let digest = promoted.digest;
            if let Some(revocation) = view.revocation(&digest) {
                return Err(refused_revoked(stage, want, digest, revocation.reason));
            }
            Ok(Choice { digest, rollback: None, held: false })
        }
        Want::Redeploy => {
            let live = there
                .and_then(|s| s.live.as_ref())
                .ok_or_else(|| Error::usage(format!("nothing is live in {}; deploy it first", stage.name)))?;
            if let Some(revocation) = view.revocation(&live.digest) {
                return Err(refused_revoked(stage, want, live.digest, revocation.reason));
            }
            Ok(Choice { digest: live.digest, rollback: None, held: false })
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
                    return Err(refused_revoked(stage, want, digest, revocation.reason));
                }
            }
            let rollback = Some(RollbackRecord { reason: reason.clone(), forced: *force });
            Ok(Choice { digest, rollback, held: false })
        }
    }
}

/// Everything decided about a deployment before its lease is taken, from the provider's side.
struct Plan {
    digest: Digest,
    image: ImageRef,
    kept: Option<String>,
    serving: Option<String>,
}

/// What the deployment will do, read from the ledger and the provider. `Ok(Err(report))`: nothing to do.
fn plan(
    ctx: &Context,
    stage: &Stage,
    want: &Want,
    reconciled: &Option<String>,
) -> Result<Result<Plan, DeployReport>, Error> {
    let target = stage_ref(ctx, stage);
    let fleet = ctx.fleet;
    let view = ctx.ledger.view()?;
    let choice = choose(ctx, &view, stage, want)?;
    let digest = choice.digest;
    let record = view.image(&digest).ok_or_else(|| Error::usage(format!("{digest} is not an image in this ledger")))?;
    let image = record.image(digest);
    let live = view.stage(&ctx.pipeline.name, &stage.name).and_then(|s| s.live.clone());
    let revoked = view.revocation(&digest);
    // Every alarm the window will watch must exist (and the provider must have alarms) before the stage is touched.
    for check in &stage.verify {
        if let VerifyCheck::Alarm { name } = check {
            ctx.fleet.alarm(stage_ref(ctx, stage), name)?;
        }
    }
    // An image that says nothing about how to start is a recipe problem, refused before the stage is touched.
    if super::bake::instance_of(ctx, &image)?.is_none() {
        return Err(Error::usage(format!(
            "{} (recipe `{}`) has no [instance] section, so there is nothing to start; add one to images/{}.toml \
             (command and health) and bake again",
            image.image_ref, record.recipe, record.recipe
        )));
    }
    let groups = fleet.groups(target)?;
    let serving = fleet.serving(target)?;
    // The live digest's group still exists: healthy, there is nothing to do; otherwise it is healed in place (its
    // missing instances started again, its endpoint restarted), with no new group.
    let live_group = live
        .as_ref()
        .filter(|l| l.digest == digest && !matches!(want, Want::Redeploy))
        .and_then(|l| groups.iter().find(|g| g.name == l.group));
    if let Some(group) = live_group {
        let healthy = serving.as_deref() == Some(group.name.as_str())
            && group.capacity > 0
            && group.running >= group.capacity
            && fleet.endpoint_up(target);
        // A group the stage neither serves nor keeps (left by a kiln whose call was under way when it was taken
        // over) is an orphan: a heal retires it too.
        let keep = kept_groups(&view, ctx, stage, &group.name, Some(&group.name));
        let orphans = groups.iter().any(|g| g.name != group.name && !keep.contains(&g.name));
        if healthy && !orphans {
            return Ok(Err(DeployReport {
                stage: stage.name.clone(),
                digest,
                image_ref: image.image_ref,
                group: group.name.clone(),
                previous_group: None,
                outcome: DeployOutcome::AlreadyLive,
                deploy_id: None,
                cutover_ms: None,
                endpoint: fleet.endpoint(target),
                reconciled: reconciled.clone(),
                rollback: choice.rollback.is_some(),
                verified_for_ms: None,
            }));
        }
        return Ok(Ok(Plan { digest, image, kept: Some(group.name.clone()), serving }));
    }
    if let (true, Some(revocation)) = (choice.held, revoked) {
        return Err(Error::usage(format!(
            "{stage} is held on {} by a rollback, but that image is revoked ({}) and its group is gone, so there \
             is nothing to heal; promote a new image, or `kiln rollback --stage {stage} --to <digest>`",
            digest.short(),
            revocation.reason,
            stage = stage.name
        )));
    }
    // A rollback re-enables a kept group of the digest instead of building a new one.
    let kept = choice
        .rollback
        .as_ref()
        .and_then(|_| {
            groups
                .iter()
                .filter(|g| g.digest == digest && Some(&g.name) != serving.as_ref())
                .max_by_key(|g| g.name.clone())
        })
        .map(|g| g.name.clone());
    Ok(Ok(Plan { digest, image, kept, serving }))
}

/// Takes the lease with a `deploy-started` event, re-judging the choice of digest (promotion, revocation,
/// rollback target) against the head it is appended to. `None`: the choice changed meanwhile; plan again.
fn start(ctx: &Context, stage: &Stage, want: &Want, plan: &Plan) -> Result<Option<OpenDeploy>, Error> {
    let me = ctx.lease_holder.clone();
    let lease_until = ctx.clock.stamp_after(stage.lease);
    let (open, _) = ctx.ledger.append::<Option<OpenDeploy>, Error>(ctx.actor, ctx.clock, |view| {
        let there = view.stage(&ctx.pipeline.name, &stage.name).cloned().unwrap_or_default();
        if let Some(open) = &there.open {
            return Err(busy(stage, open));
        }
        let Choice { digest, rollback, .. } = choose(ctx, view, stage, want)?;
        if digest != plan.digest {
            return Ok(Decision::Skip(None));
        }
        let group = plan.kept.clone().unwrap_or_else(|| group_name(ctx, stage, there.versions + 1));
        let deploy_id = format!("{}-{}-{}", ctx.pipeline.name, stage.name, there.deploys + 1);
        let previous_group = plan.serving.clone().or(there.live.as_ref().map(|l| l.group.clone()));
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
            rollback,
        };
        Ok(Decision::Append(Box::new(body), Some(open)))
    })?;
    if open.as_ref().is_some_and(|o| o.rollback) {
        super::promote::publish_pointer_best_effort(ctx, stage, &plan.image);
    }
    Ok(open)
}

/// How many times a deployment re-plans because the digest to deploy changed between planning and the append.
const REPLANS: usize = 5;

/// Puts the stage pointer back on what the stage should run once a deployment has ended: a rollback moves it as
/// it starts, so a rollback that failed or was undone must move it back. Best effort, like the move itself.
fn pointer_follows_target(ctx: &Context, stage: &Stage) {
    let image = ctx.ledger.view().ok().and_then(|view| {
        let digest = view.stage(&ctx.pipeline.name, &stage.name)?.target()?;
        Some(view.image(&digest)?.image(digest))
    });
    if let Some(image) = image {
        super::promote::publish_pointer_best_effort(ctx, stage, &image);
    }
}

pub fn deploy(ctx: &Context, stage_name: &str, want: Want) -> Result<DeployReport, Error> {
    let stage = super::promote::stage(ctx, stage_name)?;
    let reconciled = settle_open(ctx, stage)?;
    if reconciled.is_some() {
        pointer_follows_target(ctx, stage);
    }
    for _ in 0..REPLANS {
        let plan = match plan(ctx, stage, &want, &reconciled)? {
            Ok(plan) => plan,
            Err(already_live) => return Ok(already_live),
        };
        fault::point("deploy:before-start");
        // 1. Take the lease.
        if let Some(open) = start(ctx, stage, &want, &plan)? {
            fault::point("deploy:after-started");
            let outcome = run(ctx, stage, open, plan, reconciled);
            if !matches!(outcome, Err(Error::TakenOver { .. })) {
                pointer_follows_target(ctx, stage);
            }
            return outcome;
        }
        tracing::info!(stage = %stage.name, "what to deploy changed while planning; planning again");
    }
    Err(Error::Ledger(crate::ledger::LedgerError::Contended {
        location: ctx.ledger.location(),
        attempts: REPLANS as u32,
    }))
}

/// Steps 2–7 of a deployment whose lease is held. An error met after another kiln took the deployment over (its
/// group destroyed under our feet, say) is reported as the takeover it really is.
fn run(
    ctx: &Context,
    stage: &Stage,
    open: OpenDeploy,
    plan: Plan,
    reconciled: Option<String>,
) -> Result<DeployReport, Error> {
    let lease = Lease::held(ctx, stage, &open);
    run_steps(&lease, open, plan, reconciled).map_err(|err| match err {
        Error::Provider(_) => match ctx.ledger.view() {
            Ok(view) if !lease.is_ours(&view) => lease.taken_over(&view),
            _ => err,
        },
        other => other,
    })
}

fn run_steps(lease: &Lease, open: OpenDeploy, plan: Plan, reconciled: Option<String>) -> Result<DeployReport, Error> {
    let ctx = lease.ctx;
    let stage = lease.stage;
    let target = stage_ref(ctx, stage);
    let fleet = ctx.fleet;
    let reused = plan.kept.is_some();
    let image = plan.image;
    // Healing: the deployment brings the live group itself back (missing instances, a dead endpoint). A failure
    // then leaves that group alone: it is all the stage has.
    let healing = is_heal(&open);
    let what = if healing { "healing" } else { "deploying" };
    tracing::info!(stage = %stage.name, group = %open.group, "{what} {} ({})", open.digest.short(), image.image_ref);
    let before = match open.previous_group.as_deref() {
        Some(previous) if healing => format!("group {previous} is still the stage's group"),
        Some(previous) => format!("group {previous} kept serving"),
        None => "nothing served the stage before, and nothing serves it now".to_string(),
    };
    let failed = |reason: String, aftermath: String, log_tail: Option<String>| Error::DeployFailed {
        stage: stage.name.clone(),
        group: open.group.clone(),
        reason,
        aftermath,
        log_tail,
    };
    let give_up = |reason: String, log_tail: Option<String>| -> Result<DeployReport, Error> {
        if !healing {
            remove_new_group(lease, target, &open.group, reused)?;
        }
        lease.fail(&open, &reason, log_tail.clone())?;
        Err(failed(reason, before.clone(), log_tail))
    };

    // 2. Launch the new group (or scale a kept one back up).
    lease.fence()?;
    let launched = match fleet.launch(target, &open.group, &image, stage.capacity) {
        Ok(info) => info,
        Err(err) => return give_up(format!("launching {} failed: {err}", open.group), None),
    };
    lease.step("group-created", serde_json::json!({ "capacity": launched.capacity, "reused": reused }))?;

    // 3. Wait until every instance is healthy.
    let deadline = Instant::now() + ready_timeout(ctx, stage, &image)?;
    if let Err(unhealthy) = wait_healthy(lease, &open.group, deadline)? {
        return give_up(unhealthy.reason, unhealthy.log_tail);
    }
    let healthy_at = Instant::now();
    lease.step("healthy", serde_json::Value::Null)?;

    // 4. Move traffic, then drain the old group.
    lease.fence()?;
    if let Err(err) = fleet.route(target, &open.group) {
        // Traffic may have half moved: send it back before the new group goes.
        if let Some(previous) = open.previous_group.as_deref().filter(|p| !healing && *p != open.group) {
            lease.fence()?;
            if let Err(back) = fleet.route(target, previous) {
                tracing::warn!(%back, "could not send traffic back to {previous}");
            }
        }
        return give_up(format!("switching traffic to {} failed: {err}", open.group), None);
    }
    let cutover = healthy_at.elapsed();
    lease.step("traffic-switched", serde_json::json!({ "cutover_ms": cutover.as_millis() as u64 }))?;
    if let Some(previous) = open.previous_group.as_deref().filter(|p| *p != open.group) {
        let drained = drain(lease, previous)?;
        lease.step("drained", serde_json::json!({ "group": previous, "in_flight_left": drained }))?;
    }

    // 5. Verify through the window, the previous group still running. A heal brings back what was verified
    // already, and has no other group to return to: it has no window.
    let mut verified_for_ms = None;
    if let Some(window) = stage.verify_for.filter(|_| !healing) {
        lease.step("verifying", serde_json::json!({ "for_secs": window.as_secs(), "checks": stage.verify.len() }))?;
        let started = Instant::now();
        match verify_window(lease, &open, &image, window)? {
            Ok(()) => {
                verified_for_ms = Some(started.elapsed().as_millis() as u64);
                lease.step("verified", serde_json::json!({ "for_ms": verified_for_ms }))?;
            }
            Err(failure) => {
                let failed_at = Instant::now();
                lease.step("verification-failed", failure.to_json())?;
                let aftermath = restore_previous(lease, &open, reused, failed_at)?;
                let reason = format!(
                    "verification failed after {} ms in the window: {}: {}",
                    started.elapsed().as_millis(),
                    failure.check,
                    failure.detail
                );
                lease.fail(&open, &reason, failure.log_tail.clone())?;
                return Err(failed(reason, aftermath, failure.log_tail));
            }
        }
    }

    // 6. Retire the old group, keeping `keep-previous` parked for rollback.
    let retired = retire(lease, &open.group, open.previous_group.as_deref())?;
    lease.step("retired", retired)?;

    // 7. Done; the lease goes with the open deployment.
    lease.finish(&open)?;
    Ok(DeployReport {
        stage: stage.name.clone(),
        digest: open.digest,
        image_ref: image.image_ref,
        group: open.group.clone(),
        previous_group: open.previous_group.clone(),
        outcome: if healing { DeployOutcome::Healed } else { DeployOutcome::Deployed },
        deploy_id: Some(open.deploy_id.clone()),
        cutover_ms: Some(cutover.as_millis() as u64),
        endpoint: fleet.endpoint(target),
        reconciled,
        rollback: open.rollback,
        verified_for_ms,
    })
}

/// Polls the group's health until every instance is healthy, one dies, or the deadline passes; renews the lease
/// and reports progress between polls, at the provider's cadence.
fn wait_healthy(lease: &Lease, group: &str, deadline: Instant) -> Result<Result<(), Unhealthy>, Error> {
    let ctx = lease.ctx;
    let target = stage_ref(ctx, lease.stage);
    let cadence = ctx.fleet.poll_cadence();
    let mut interval = cadence.first;
    ctx.progress.begin(&format!("{group}: instances healthy"), Some(u64::from(lease.stage.capacity)));
    let outcome = loop {
        lease.keep_alive()?;
        let health = ctx.fleet.health(target, group)?;
        ctx.progress.update(u64::from(health.healthy), &format!("{} of {} healthy", health.healthy, health.total));
        if let Some(failed) = health.failed {
            break Err(failed);
        }
        if health.all_healthy() {
            break Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            let first = health.waiting.first().cloned().unwrap_or_default();
            break Err(Unhealthy {
                reason: format!("not healthy before the deadline: {}", health.waiting.join(", ")),
                log_tail: ctx.fleet.log_tail(target, group, &first),
            });
        }
        std::thread::sleep(interval.min(deadline - now));
        interval = (interval * 2).min(cadence.max);
    };
    ctx.progress.end(if outcome.is_ok() { "healthy" } else { "not healthy" });
    Ok(outcome)
}

/// Waits until the old group serves no request in flight, up to the provider's drain timeout; returns the
/// requests still in flight when it stopped waiting (0 when drained).
fn drain(lease: &Lease, group: &str) -> Result<u64, Error> {
    let ctx = lease.ctx;
    let target = stage_ref(ctx, lease.stage);
    let cadence = ctx.fleet.poll_cadence();
    let give_up = Instant::now() + ctx.fleet.drain_timeout(target);
    let mut interval = cadence.first;
    let mut began = false;
    loop {
        lease.keep_alive()?;
        let pending = ctx.fleet.drain_pending(target, group)?;
        if pending == 0 {
            if began {
                ctx.progress.end("drained");
            }
            return Ok(0);
        }
        if !began {
            ctx.progress.begin(&format!("{group}: draining"), None);
            began = true;
        }
        ctx.progress.update(0, &format!("{pending} requests in flight"));
        if Instant::now() >= give_up {
            ctx.progress.end("drain timed out");
            tracing::warn!(group, pending, "requests still in flight after the drain timeout; going on");
            return Ok(pending);
        }
        std::thread::sleep(interval);
        interval = (interval * 2).min(cadence.max);
    }
}

/// A check that failed inside the verification window, with its evidence.
#[derive(Debug, Clone)]
struct WindowFailure {
    check: String,
    detail: String,
    evidence: serde_json::Value,
    log_tail: Option<String>,
}

impl WindowFailure {
    fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "check": self.check, "detail": self.detail, "evidence": self.evidence })
    }
}

/// Runs the stage's verification checks through the window: each command check at once and then every
/// `interval`, and the new group's health on every poll. The first failure ends the window.
fn verify_window(
    lease: &Lease,
    open: &OpenDeploy,
    image: &ImageRef,
    window: Duration,
) -> Result<Result<(), WindowFailure>, Error> {
    let ctx = lease.ctx;
    let stage = lease.stage;
    let target = stage_ref(ctx, stage);
    let started = Instant::now();
    let end = started + window;
    let cadence = ctx.fleet.poll_cadence();
    let mut env = gate::check_env(ctx.pipeline, stage, open.digest, &image.image_ref);
    env.push(("KILN_GROUP", open.group.clone()));
    if let Some(endpoint) = ctx.fleet.endpoint(target) {
        env.push(("KILN_ENDPOINT", endpoint));
    }
    let mut due: Vec<Instant> = vec![started; stage.verify.len()];
    ctx.progress.begin(
        &format!("{}: verifying for {}", stage.name, humantime::format_duration(window)),
        Some(window.as_secs()),
    );
    let outcome = loop {
        lease.keep_alive()?;
        let health = ctx.fleet.health(target, &open.group)?;
        if !health.all_healthy() {
            let reason = match &health.failed {
                Some(failed) => failed.reason.clone(),
                None => format!("not healthy: {}", health.waiting.join(", ")),
            };
            let log_tail =
                health.failed.as_ref().and_then(|f| f.log_tail.clone()).or_else(|| {
                    health.waiting.first().and_then(|first| ctx.fleet.log_tail(target, &open.group, first))
                });
            break Err(WindowFailure {
                check: "health".into(),
                detail: reason,
                evidence: serde_json::json!({ "healthy": health.healthy, "total": health.total, "waiting": health.waiting }),
                log_tail,
            });
        }
        let mut failure = None;
        for (check, next) in stage.verify.iter().zip(due.iter_mut()) {
            if Instant::now() < *next {
                continue;
            }
            match check {
                VerifyCheck::Command { argv, program, interval, timeout } => {
                    let outcome = gate::run_check(ctx.repo, argv, program, *timeout, &env);
                    *next += *interval;
                    if !outcome.passed {
                        failure = Some(WindowFailure {
                            check: format!("command {}", argv.join(" ")),
                            detail: outcome.detail,
                            evidence: outcome.evidence,
                            log_tail: None,
                        });
                        break;
                    }
                }
                // Alarms are cheap to read and say what the fleet sees: looked at on every poll.
                VerifyCheck::Alarm { name } => {
                    let alarm = ctx.fleet.alarm(target, name)?;
                    if alarm.firing() {
                        failure = Some(WindowFailure {
                            check: format!("alarm {name}"),
                            detail: format!("alarm {name} is {}: {}", alarm.state, alarm.reason),
                            evidence: serde_json::json!({ "alarm": name, "state": alarm.state, "reason": alarm.reason }),
                            log_tail: None,
                        });
                        break;
                    }
                }
            }
        }
        if let Some(failure) = failure {
            break Err(failure);
        }
        let now = Instant::now();
        ctx.progress.update(now.duration_since(started).as_secs(), "checks passing");
        if now >= end {
            break Ok(());
        }
        let next_check = due.iter().copied().min().unwrap_or(end);
        let wake = next_check.min(end).min(now + cadence.max);
        std::thread::sleep(wake.saturating_duration_since(now));
    };
    ctx.progress.end(if outcome.is_ok() { "verified" } else { "verification failed" });
    Ok(outcome)
}

/// The stage's ready timeout, else the image's instance `ready-timeout`.
fn ready_timeout(ctx: &Context, stage: &Stage, image: &ImageRef) -> Result<Duration, Error> {
    if let Some(timeout) = stage.ready_timeout {
        return Ok(timeout);
    }
    let instance = super::bake::instance_of(ctx, image)?;
    Ok(instance.map(|i| i.ready_timeout()).unwrap_or(Duration::from_secs(60)))
}

/// What `--plan` shows of a deployment: what it would run, how it would get its group, and the provider calls it
/// would make, in order. Decided from the ledger alone: the provider is asked nothing, so `assumed` says which
/// facts came from the ledger that a real deployment reads from the provider first.
#[derive(Debug, Clone, Serialize)]
pub struct DeployPlan {
    pub stage: String,
    pub digest: Digest,
    pub image_ref: String,
    pub group: String,
    pub start: GroupStart,
    pub previous_group: Option<String>,
    pub rollback: bool,
    pub assumed: Vec<String>,
    pub calls: Vec<String>,
}

/// The plan of `kiln deploy` or `kiln rollback`: the same choice of digest (and the same refusals) as the real
/// thing, judged against the ledger, and no provider call.
pub fn plan_deploy(ctx: &Context, stage_name: &str, want: &Want) -> Result<DeployPlan, Error> {
    let stage = super::promote::stage(ctx, stage_name)?;
    let view = ctx.ledger.view()?;
    let choice = choose(ctx, &view, stage, want)?;
    sketch_deploy(ctx, &view, stage, choice)
}

/// The plan of the deployment a promotion of `digest` would start, as if the promotion were recorded.
pub fn plan_after_promotion(ctx: &Context, stage: &Stage, digest: Digest) -> Result<DeployPlan, Error> {
    let view = ctx.ledger.view()?;
    if let Some(revocation) = view.revocation(&digest) {
        return Err(refused_revoked(stage, &Want::Promoted, digest, revocation.reason));
    }
    sketch_deploy(ctx, &view, stage, Choice { digest, rollback: None, held: false })
}

fn sketch_deploy(ctx: &Context, view: &View, stage: &Stage, choice: Choice) -> Result<DeployPlan, Error> {
    let digest = choice.digest;
    let record = view.image(&digest).ok_or_else(|| Error::usage(format!("{digest} is not an image in this ledger")))?;
    let image = record.image(digest);
    let there = view.stage(&ctx.pipeline.name, &stage.name).cloned().unwrap_or_default();
    let live = there.live.clone();
    let mut assumed = Vec::new();
    if let Some(open) = &there.open {
        assumed.push(format!(
            "deployment {} ({} by {}) is open: kiln would first finish or undo it, going by what the provider \
             serves (or exit 5 while {} holds its lease), and these calls come after",
            open.deploy_id, open.group, open.actor, open.holder
        ));
    }
    // The groups the ledger says exist: the live one and those the last retirement kept.
    let existing: Vec<String> = live
        .iter()
        .map(|l| l.group.clone())
        .chain(live.as_ref().map_or_else(Vec::new, |l| kept_groups(view, ctx, stage, &l.group, None)))
        .collect();
    let digest_of = |group: &str| live.iter().chain(there.history.iter()).find(|l| l.group == group).map(|l| l.digest);
    let serving = live.as_ref().map(|l| l.group.clone());
    match &serving {
        Some(group) => assumed.push(format!("{group} serves {} (the ledger's live deployment)", stage.name)),
        None => assumed.push(format!("nothing serves {} (the ledger records no live deployment)", stage.name)),
    }
    let (group, start) = if live.as_ref().is_some_and(|l| l.digest == digest) {
        let group = serving.clone().unwrap_or_default();
        assumed.push(format!("{group} still exists and runs {}", digest.short()));
        (group, GroupStart::Live)
    } else {
        let kept = choice.rollback.as_ref().and_then(|_| {
            existing.iter().filter(|g| Some(*g) != serving.as_ref() && digest_of(g) == Some(digest)).max().cloned()
        });
        match kept {
            Some(group) => {
                assumed.push(format!("{group} is kept, parked, for a rollback to {}", digest.short()));
                (group, GroupStart::Reenabled)
            }
            None => (group_name(ctx, stage, there.versions + 1), GroupStart::New),
        }
    };
    let (park, destroy) = if start == GroupStart::Live {
        (Vec::new(), Vec::new())
    } else {
        let previous = serving.as_deref().filter(|p| *p != group);
        let keep = kept_groups(view, ctx, stage, &group, previous);
        let destroy = existing.iter().filter(|g| **g != group && !keep.contains(g)).cloned().collect();
        (previous.map(str::to_string).into_iter().collect(), destroy)
    };
    if !destroy.is_empty() {
        assumed.push(format!(
            "no group of {} exists beyond those the ledger keeps (a real deployment retires whatever else it finds)",
            stage.name
        ));
    }
    let sketch = DeploySketch {
        image: image.clone(),
        group: group.clone(),
        start,
        previous: serving.clone().filter(|p| *p != group),
        park,
        destroy,
        pointer_first: choice.rollback.is_some(),
        first: there.versions == 0,
        alarms: stage
            .verify
            .iter()
            .filter_map(|c| match c {
                VerifyCheck::Alarm { name } => Some(name.clone()),
                VerifyCheck::Command { .. } => None,
            })
            .collect(),
        verify: stage.verify_for.is_some(),
    };
    let calls = ctx.fleet.plan_deploy(stage_ref(ctx, stage), &sketch);
    Ok(DeployPlan {
        stage: stage.name.clone(),
        digest,
        image_ref: image.image_ref,
        group,
        start,
        previous_group: sketch.previous,
        rollback: choice.rollback.is_some(),
        assumed,
        calls,
    })
}
