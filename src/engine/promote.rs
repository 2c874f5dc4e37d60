//! Promotion: choose the digest, judge every gate of the stage against the ledger head being appended to, and
//! record `promoted` (or `refused`) with every verdict and its evidence. Promotion never rebuilds.

use serde::Serialize;

use super::gate::{self, CommandContext};
use super::Context;
use crate::config::{Gate, Stage};
use crate::digest::{Digest, DigestQuery};
use crate::error::Refusal;
use crate::ledger::view::ImageRecord;
use crate::ledger::{Decision, EventBody, GateVerdict, View};
use crate::provider::{ImageRef, StageRef};
use crate::Error;

#[derive(Debug, Clone)]
pub struct PromoteOptions {
    pub stage: String,
    pub digest: Option<String>,
    /// Judge and report, record nothing.
    pub plan: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Promoted,
    AlreadyPromoted,
    Planned,
}

/// As people read it in logs and messages; the same words as the JSON `outcome`.
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Promoted => "promoted",
            Outcome::AlreadyPromoted => "already promoted",
            Outcome::Planned => "planned",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PromoteReport {
    pub stage: String,
    pub digest: Digest,
    pub image_ref: String,
    pub gates: Vec<GateVerdict>,
    pub outcome: Outcome,
    /// The `promoted` event.
    pub seq: Option<u64>,
    /// With --plan: whether every gate passed.
    pub would_pass: bool,
}

pub fn stage<'a>(ctx: &'a Context, name: &str) -> Result<&'a Stage, Error> {
    ctx.pipeline.stage(name).ok_or_else(|| {
        Error::usage(format!(
            "pipeline `{}` has no stage `{name}`; its stages are {}",
            ctx.pipeline.name,
            ctx.pipeline.stage_names().join(", ")
        ))
    })
}

/// The stage before `stage`, if it is not the first.
pub fn previous_stage<'a>(ctx: &'a Context, stage: &Stage) -> Option<&'a Stage> {
    let index = ctx.pipeline.stage_index(&stage.name)?;
    index.checked_sub(1).map(|i| &ctx.pipeline.stages[i])
}

/// A digest the user typed, resolved among the ledger's images (short prefixes as in git).
pub fn resolve_digest(view: &View, typed: &str) -> Result<Digest, Error> {
    let query = DigestQuery::parse(typed)?;
    Ok(view.resolve(&query)?)
}

/// The ledger's record of `digest`, which must be an image of the pipeline's own recipe: a pipeline promotes (and
/// is approved for) only what its `image = …` bakes, never a parent layer or another pipeline's image.
pub fn own_image(ctx: &Context, view: &View, digest: &Digest) -> Result<ImageRecord, Error> {
    let record = view.image(digest).ok_or_else(|| Error::usage(format!("{digest} is not an image in this ledger")))?;
    if record.recipe != ctx.pipeline.image {
        return Err(Error::usage(format!(
            "{} is an image of recipe `{}`, but pipeline `{}` promotes only images of its `image = \"{}\"`",
            digest.short(),
            record.recipe,
            ctx.pipeline.name,
            ctx.pipeline.image
        )));
    }
    Ok(record)
}

/// The default candidate: what is live in the previous stage (else promoted there); for the first stage, the
/// newest bake of the pipeline's recipe.
pub fn default_digest(ctx: &Context, view: &View, stage: &Stage) -> Result<Digest, Error> {
    let index = ctx.pipeline.stage_index(&stage.name).unwrap_or(0);
    match index.checked_sub(1).map(|i| &ctx.pipeline.stages[i]) {
        None => view.heads.newest.get(&ctx.pipeline.image).copied().ok_or_else(|| {
            Error::usage(format!(
                "nothing to promote to {}: recipe `{}` was never baked; run `kiln bake`",
                stage.name, ctx.pipeline.image
            ))
        }),
        Some(previous) => {
            let there = view.stage(&ctx.pipeline.name, &previous.name);
            there.and_then(|s| s.live.as_ref().map(|l| l.digest).or(s.promoted.as_ref().map(|p| p.digest))).ok_or_else(
                || Error::Refused {
                    action: Refusal::Promotion,
                    stage: stage.name.clone(),
                    digest: None,
                    gates: vec![GateVerdict {
                        gate: "upstream".into(),
                        passed: false,
                        detail: format!(
                            "nothing is live in {} to promote; promote to {} first",
                            previous.name, previous.name
                        ),
                        evidence: serde_json::Value::Null,
                    }],
                },
            )
        }
    }
}

pub fn promote(ctx: &Context, options: &PromoteOptions) -> Result<PromoteReport, Error> {
    let stage = stage(ctx, &options.stage)?;
    let view = ctx.ledger.view()?;
    let digest = match &options.digest {
        Some(typed) => resolve_digest(&view, typed)?,
        None => default_digest(ctx, &view, stage)?,
    };
    let record = own_image(ctx, &view, &digest)?;
    let image = record.image(digest);
    drop(view);

    // Gates that do not depend on the ledger are judged once, outside the append loop.
    let content = match ctx.images.verify_image(&image) {
        Ok(()) => GateVerdict {
            gate: "content".into(),
            passed: true,
            detail: format!("{} still matches {}", image.image_ref, digest.short()),
            evidence: serde_json::Value::Null,
        },
        Err(err) => GateVerdict {
            gate: "content".into(),
            passed: false,
            detail: err.to_string(),
            evidence: serde_json::Value::Null,
        },
    };
    let commands = gate::command_verdicts(&CommandContext {
        repo: ctx.repo,
        pipeline: ctx.pipeline,
        stage,
        digest,
        image_ref: &image.image_ref,
        previous_endpoint: previous_stage(ctx, stage)
            .and_then(|p| ctx.fleet.endpoint(StageRef { pipeline: &ctx.pipeline.name, stage: p })),
    });

    let (report, stored) = ctx.ledger.append::<PromoteReport, Error>(ctx.actor, ctx.clock, |view| {
        let gates = ordered_verdicts(
            stage,
            gate::ledger_verdicts(ctx.pipeline, stage, &digest, view, ctx.clock, ctx.actor),
            &commands,
            &content,
        );
        let passed = gates.iter().all(|g| g.passed);
        let report = |outcome| PromoteReport {
            stage: stage.name.clone(),
            digest,
            image_ref: image.image_ref.clone(),
            gates: gates.clone(),
            outcome,
            seq: None,
            would_pass: passed,
        };
        if options.plan {
            return Ok(Decision::Skip(report(Outcome::Planned)));
        }
        if !passed {
            let body = EventBody::Refused {
                pipeline: ctx.pipeline.name.clone(),
                stage: stage.name.clone(),
                digest,
                gates: gates.clone(),
            };
            return Ok(Decision::Append(Box::new(body), report(Outcome::Planned)));
        }
        // After a rollback the stage runs what it rolled back to: promoting the digest it rolled away from again
        // is news, and releases the hold.
        let current = view.stage(&ctx.pipeline.name, &stage.name).and_then(|s| s.target());
        if current == Some(digest) {
            return Ok(Decision::Skip(report(Outcome::AlreadyPromoted)));
        }
        let body = EventBody::Promoted {
            pipeline: ctx.pipeline.name.clone(),
            stage: stage.name.clone(),
            digest,
            gates: gates.clone(),
        };
        Ok(Decision::Append(Box::new(body), report(Outcome::Promoted)))
    })?;
    if !options.plan && !report.would_pass {
        return Err(Error::Refused {
            action: Refusal::Promotion,
            stage: stage.name.clone(),
            digest: Some(digest),
            gates: report.gates,
        });
    }
    let seq = stored.filter(|_| report.outcome == Outcome::Promoted).map(|s| s.event.seq);
    if !options.plan {
        // Also when already promoted: a pointer that a failed publish left behind is written on the next try.
        publish_pointer(ctx, stage, &image).map_err(|err| {
            Error::Provider(crate::provider::ProviderError::Other {
                provider: ctx.images.name(),
                message: format!(
                    "{} is promoted to {}, but its stage pointer was not published ({err}); run `kiln promote \
                     --stage {} --digest {}` again to publish it",
                    digest.short(),
                    stage.name,
                    stage.name,
                    digest.short()
                ),
            })
        })?;
        if ctx.pipeline.stages.last().is_some_and(|last| last.name == stage.name) {
            ctx.images.protect(&image).map_err(|err| {
                Error::Provider(crate::provider::ProviderError::Other {
                    provider: ctx.images.name(),
                    message: format!(
                        "{} is promoted to {}, but the provider could not protect it from deletion ({err}); run \
                         `kiln promote --stage {} --digest {}` again to protect it",
                        digest.short(),
                        stage.name,
                        stage.name,
                        digest.short()
                    ),
                })
            })?;
        }
    }
    Ok(PromoteReport { seq, ..report })
}

/// Points the stage's pointer at `image` and records the write in a `pointer-published` event. When the stage's
/// digest changed (the ledger's last pointer names another), that is one provider call, the write. When the
/// ledger says the pointer already names `image` (promoting again what a stage has), the provider is asked what
/// its pointer names, and it is written again only if that was lost or changed behind kiln's back. Returns the
/// event's seq when one was written.
pub fn publish_pointer(ctx: &Context, stage: &Stage, image: &ImageRef) -> Result<Option<u64>, Error> {
    let target = StageRef { pipeline: &ctx.pipeline.name, stage };
    let recorded = ctx.ledger.view()?.stage(&ctx.pipeline.name, &stage.name).and_then(|s| s.pointer.clone());
    if recorded.is_some_and(|m| m.digest == image.digest) && ctx.images.pointer(target)? == Some(image.digest) {
        return Ok(None);
    }
    let pointer = ctx.images.publish_pointer(target, image)?;
    let body = EventBody::PointerPublished {
        pipeline: ctx.pipeline.name.clone(),
        stage: stage.name.clone(),
        digest: image.digest,
        pointer,
    };
    // Every write is recorded, a repeated one too: the ledger says when the pointer last changed and who changed it.
    let (_, stored) =
        ctx.ledger.append::<(), Error>(ctx.actor, ctx.clock, |_| Ok(Decision::Append(Box::new(body.clone()), ())))?;
    Ok(stored.map(|s| s.event.seq))
}

/// Points the stage's pointer at `image` where a failure must not stop what is under way: a rollback starting
/// (restoring service comes first), or a deployment that has ended. A pointer that cannot be written is said, and
/// the next promotion, rollback or deployment writes it.
pub fn publish_pointer_best_effort(ctx: &Context, stage: &Stage, image: &ImageRef) {
    if let Err(err) = publish_pointer(ctx, stage, image) {
        tracing::warn!(stage = %stage.name, "the stage pointer still names what the stage ran before: {err}");
    }
}

/// Implicit gates first, then the configured gates in the order written, then the content check.
fn ordered_verdicts(
    stage: &Stage,
    ledger: Vec<GateVerdict>,
    commands: &[GateVerdict],
    content: &GateVerdict,
) -> Vec<GateVerdict> {
    // ledger_verdicts yields the implicit gates (not-revoked, upstream) first, then the configured ledger gates.
    let configured = stage.gates.iter().filter(|g| !matches!(g, Gate::Command { .. })).count();
    let implicit = ledger.len().saturating_sub(configured);
    let mut ledger = ledger.into_iter();
    let mut commands = commands.iter().cloned();
    let mut out: Vec<GateVerdict> = ledger.by_ref().take(implicit).collect();
    for gate in &stage.gates {
        match gate {
            Gate::Command { .. } => out.extend(commands.next()),
            _ => out.extend(ledger.next()),
        }
    }
    out.push(content.clone());
    out
}
