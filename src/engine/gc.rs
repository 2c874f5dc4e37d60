//! Garbage collection: delete the images no stage can roll back to, keeping everything a stage runs, ran recently
//! or could return to, everything that ever reached the last stage (prod), the newest bake of each recipe, and the
//! ancestors of all of those. What is deleted is recorded first, so the ledger never points at an image it does
//! not know is gone. The provider then frees what no image uses, leftovers of killed bakes included.

use std::collections::BTreeSet;

use serde::Serialize;

use super::Context;
use crate::digest::Digest;
use crate::ledger::view::stage_key;
use crate::ledger::{Decision, EventBody};
use crate::provider::{ImageRef, StageRef};
use crate::Error;

#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    pub deleted: Vec<ImageRef>,
    pub kept: usize,
    pub bytes_freed: u64,
    pub dry_run: bool,
    pub seq: Option<u64>,
}

pub fn collect(ctx: &Context, dry_run: bool) -> Result<GcReport, Error> {
    let view = ctx.ledger.view()?;
    let mut keep: BTreeSet<Digest> = view.heads.newest.values().copied().collect();
    let last_stage = ctx.pipeline.stages.last().map(|s| stage_key(&ctx.pipeline.name, &s.name));
    for stage in &ctx.pipeline.stages {
        if let Some(there) = view.stage(&ctx.pipeline.name, &stage.name) {
            keep.extend(there.promoted.iter().map(|m| m.digest));
            keep.extend(there.live.iter().map(|l| l.digest));
            keep.extend(there.open.iter().map(|o| o.digest));
            keep.extend(there.history.iter().map(|l| l.digest));
        }
        let target = StageRef { pipeline: &ctx.pipeline.name, stage };
        keep.extend(ctx.fleet.groups(target)?.iter().map(|g| g.digest));
    }
    let images = view.images();
    // Anything that ever reached prod stays: it is what an incident review or a rollback will ask for.
    keep.extend(
        images
            .iter()
            .filter(|(_, r)| last_stage.as_ref().is_some_and(|k| r.stages.get(k).is_some_and(|s| s.promoted.is_some())))
            .map(|(d, _)| *d),
    );
    let roots: Vec<Digest> = keep.iter().copied().collect();
    for digest in roots {
        keep.extend(view.ancestors(&digest));
    }
    let doomed: Vec<ImageRef> = images
        .iter()
        .filter(|(d, r)| !keep.contains(d) && !r.deleted && r.provider == ctx.images.name())
        .map(|(d, r)| ImageRef { digest: *d, image_ref: r.image_ref.clone() })
        .filter(|image| ctx.images.has_image(image))
        .collect();
    let kept = images.len() - doomed.len();
    if dry_run {
        return Ok(GcReport { deleted: doomed, kept, bytes_freed: 0, dry_run, seq: None });
    }
    if doomed.is_empty() {
        // Nothing to record, but the provider may still hold leftovers of killed bakes.
        let bytes_freed = ctx.images.collect_garbage()?;
        return Ok(GcReport { deleted: doomed, kept, bytes_freed, dry_run, seq: None });
    }
    let digests: Vec<Digest> = doomed.iter().map(|i| i.digest).collect();
    let (_, stored) = ctx.ledger.append::<(), Error>(ctx.actor, ctx.clock, |view| {
        // A stage may have moved to one of these since the plan was made: then gc does nothing this time.
        for stage in &ctx.pipeline.stages {
            if let Some(there) = view.stage(&ctx.pipeline.name, &stage.name) {
                let busy = [
                    there.promoted.as_ref().map(|m| m.digest),
                    there.live.as_ref().map(|l| l.digest),
                    there.open.as_ref().map(|o| o.digest),
                ];
                if busy.iter().flatten().any(|d| digests.contains(d)) {
                    return Err(Error::usage("a stage moved to an image gc meant to delete; run `kiln gc` again"));
                }
            }
        }
        Ok(Decision::Append(
            Box::new(EventBody::Collected { pipeline: ctx.pipeline.name.clone(), digests: digests.clone() }),
            (),
        ))
    })?;
    for image in &doomed {
        ctx.images.delete_image(image)?;
    }
    let bytes_freed = ctx.images.collect_garbage()?;
    Ok(GcReport { deleted: doomed, kept, bytes_freed, dry_run, seq: stored.map(|s| s.event.seq) })
}
