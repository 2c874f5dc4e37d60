//! Approvals and revocations: the human decisions recorded in the ledger.

use serde::Serialize;

use super::promote::{own_image, resolve_digest, stage};
use super::Context;
use crate::config::Gate;
use crate::digest::Digest;
use crate::ledger::{Decision, EventBody};
use crate::Error;

#[derive(Debug, Clone, Serialize)]
pub struct ApprovalReport {
    pub stage: String,
    pub digest: Digest,
    pub actor: String,
    /// False when this actor had already approved this digest for this stage (nothing recorded).
    pub recorded: bool,
    pub seq: Option<u64>,
}

/// Records one approval per actor, digest and stage; enforces the stage's approvers list.
pub fn approve(
    ctx: &Context,
    stage_name: &str,
    typed_digest: &str,
    note: Option<String>,
) -> Result<ApprovalReport, Error> {
    let stage = stage(ctx, stage_name)?;
    let allowed: Vec<&String> = stage
        .gates
        .iter()
        .filter_map(|g| match g {
            Gate::Approvals { approvers, .. } => Some(approvers.iter()),
            _ => None,
        })
        .flatten()
        .collect();
    let has_approval_gate = stage.gates.iter().any(|g| matches!(g, Gate::Approvals { .. }));
    if !has_approval_gate {
        return Err(Error::usage(format!(
            "stage {} has no approvals gate; nothing needs an approval there",
            stage.name
        )));
    }
    if !allowed.is_empty() && !allowed.iter().any(|a| a.as_str() == ctx.actor) {
        let names: Vec<&str> = allowed.iter().map(|a| a.as_str()).collect();
        return Err(Error::usage(format!(
            "{} may not approve for {} (approvers: {})",
            ctx.actor,
            stage.name,
            names.join(", ")
        )));
    }
    let view = ctx.ledger.view()?;
    let digest = resolve_digest(&view, typed_digest)?;
    own_image(ctx, &view, &digest)?;
    drop(view);
    let (recorded, stored) = ctx.ledger.append::<bool, Error>(ctx.actor, ctx.clock, |view| {
        if let Some(revocation) = view.revocation(&digest) {
            return Err(Error::usage(format!(
                "{} is revoked ({}); it cannot be approved",
                digest.short(),
                revocation.reason
            )));
        }
        if view.approvers(&ctx.pipeline.name, &stage.name, &digest).contains(ctx.actor) {
            return Ok(Decision::Skip(false));
        }
        let body = EventBody::Approved {
            pipeline: ctx.pipeline.name.clone(),
            stage: stage.name.clone(),
            digest,
            note: note.clone(),
        };
        Ok(Decision::Append(Box::new(body), true))
    })?;
    Ok(ApprovalReport {
        stage: stage.name.clone(),
        digest,
        actor: ctx.actor.to_string(),
        recorded,
        seq: stored.map(|s| s.event.seq),
    })
}

#[derive(Debug, Clone, Serialize)]
pub struct RevocationReport {
    pub digest: Digest,
    pub descendants: Vec<Digest>,
    pub recorded: bool,
    pub seq: Option<u64>,
}

/// Revokes a digest and every image built on it. Revoking an already revoked digest records nothing.
pub fn revoke(ctx: &Context, typed_digest: &str, reason: &str) -> Result<RevocationReport, Error> {
    if reason.trim().is_empty() {
        return Err(Error::usage("--reason must say why the image is revoked"));
    }
    let digest = resolve_digest(&ctx.ledger.view()?, typed_digest)?;
    let (report, stored) = ctx.ledger.append::<RevocationReport, Error>(ctx.actor, ctx.clock, |view| {
        let descendants = view.descendants(&digest);
        let report = |recorded| RevocationReport { digest, descendants: descendants.clone(), recorded, seq: None };
        if view.heads.revoked.get(&digest).is_some_and(|r| r.root == digest) {
            return Ok(Decision::Skip(report(false)));
        }
        let body = EventBody::Revoked { digest, reason: reason.to_string(), descendants: descendants.clone() };
        Ok(Decision::Append(Box::new(body), report(true)))
    })?;
    Ok(RevocationReport { seq: stored.map(|s| s.event.seq), ..report })
}
