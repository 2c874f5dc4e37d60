//! Drift: where the provider no longer matches the ledger — an image that is gone or whose content changed (a
//! deleted one too, while a stage of any pipeline still promotes, runs or keeps it), a stage pointer that no longer
//! names what the ledger last published, a live group that is missing, short of instances or running another
//! digest, an instance of a live group that runs another image than its group (as the instance says), an endpoint
//! that is down. A stage stopped on purpose with `kiln down` is reported as stopped, not as drift.

use std::collections::BTreeMap;

use serde::Serialize;

use super::Context;
use crate::digest::Digest;
use crate::provider::StageRef;
use crate::Error;

#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    /// An image digest or `stage <name>`.
    pub subject: String,
    pub problem: String,
}

/// A stage of this pipeline that `kiln down` stopped and that nothing has started again.
#[derive(Debug, Clone, Serialize)]
pub struct Stopped {
    pub stage: String,
    /// The `stopped` event.
    pub seq: u64,
    pub time: String,
    pub actor: String,
}

#[derive(Debug, Clone, Default)]
pub struct Report {
    pub drift: Vec<Drift>,
    pub stopped: Vec<Stopped>,
}

/// What still needs each image, across every pipeline that shares the ledger or the store: "promoted to
/// hello/dev", "kept by group slow-dev-v001 of slow/dev", …
fn needed_images(ctx: &Context, view: &crate::ledger::View) -> Result<BTreeMap<Digest, Vec<String>>, Error> {
    let mut needed: BTreeMap<Digest, Vec<String>> = BTreeMap::new();
    let mut note = |digest: Digest, why: String| {
        let uses = needed.entry(digest).or_default();
        if !uses.contains(&why) {
            uses.push(why);
        }
    };
    for (pipeline, stages) in &view.heads.pipelines {
        for (stage, there) in stages {
            if let Some(m) = &there.promoted {
                note(m.digest, format!("promoted to {pipeline}/{stage}"));
            }
            if let Some(l) = &there.live {
                note(l.digest, format!("live in {pipeline}/{stage}"));
            }
            if let Some(o) = &there.open {
                note(o.digest, format!("being deployed to {pipeline}/{stage}"));
            }
        }
    }
    let shared = super::gc::sharing(ctx);
    for (name, why) in &shared.unreadable {
        tracing::warn!(pipeline = %name, %why, "cannot load the pipeline; its groups are not checked");
    }
    for pipeline in &shared.pipelines {
        for stage in &pipeline.stages {
            let target = StageRef { pipeline: &pipeline.name, stage };
            for group in ctx.fleet.groups(target)? {
                note(group.digest, format!("kept by group {} of {}/{}", group.name, pipeline.name, stage.name));
            }
        }
    }
    Ok(needed)
}

/// Checks every image this pipeline's provider baked, and every stage's live group and endpoint.
pub fn check(ctx: &Context) -> Result<Report, Error> {
    let view = ctx.ledger.view()?;
    let needed = needed_images(ctx, &view)?;
    let mut report = Report::default();
    for (digest, record) in view.images() {
        if record.provider != ctx.images.name() {
            continue;
        }
        let uses = needed.get(&digest);
        // gc recorded it as deleted: that is drift only while something still needs it.
        if record.deleted && uses.is_none() {
            continue;
        }
        let image = record.image(digest);
        if let Err(err) = ctx.images.verify_image(&image) {
            let mut problem = err.to_string();
            if let Some(uses) = uses {
                let deleted = if record.deleted { "gc deleted it, but " } else { "" };
                problem.push_str(&format!("; {deleted}it is still {}", uses.join(", ")));
            }
            report.drift.push(Drift { subject: digest.to_string(), problem });
        }
    }
    for stage in &ctx.pipeline.stages {
        let Some(recorded) = view.stage(&ctx.pipeline.name, &stage.name).and_then(|s| s.pointer.clone()) else {
            continue;
        };
        let named = ctx.images.pointer(StageRef { pipeline: &ctx.pipeline.name, stage })?;
        if named != Some(recorded.digest) {
            let now = named.map_or("is missing".to_string(), |d| format!("names {}", d.short()));
            report.drift.push(Drift {
                subject: format!("stage {}", stage.name),
                problem: format!(
                    "its stage pointer {now}, but the ledger recorded {} (seq {}); `kiln promote --stage {} --digest {}` \
                     writes it again",
                    recorded.digest.short(),
                    recorded.seq,
                    stage.name,
                    recorded.digest.short()
                ),
            });
        }
    }
    for stage in &ctx.pipeline.stages {
        let Some(there) = view.stage(&ctx.pipeline.name, &stage.name) else { continue };
        let Some(live) = there.live.clone() else { continue };
        let target = StageRef { pipeline: &ctx.pipeline.name, stage };
        let groups = ctx.fleet.groups(target)?;
        let subject = format!("stage {}", stage.name);
        let restart = format!("`kiln deploy --stage {}` restarts it", stage.name);
        let group = groups.iter().find(|g| g.name == live.group);
        let serving = group.is_some_and(|g| g.digest == live.digest && g.capacity > 0 && g.running >= g.capacity)
            && ctx.fleet.endpoint_up(target);
        if let (Some(stop), false) = (&there.stopped, serving) {
            report.stopped.push(Stopped {
                stage: stage.name.clone(),
                seq: stop.seq,
                time: stop.time.clone(),
                actor: stop.actor.clone(),
            });
            continue;
        }
        // The group's tags say what kiln launched; each instance says what it runs, which is what serves.
        if let (Some(g), Some(record)) = (group.filter(|g| g.digest == live.digest), view.image(&live.digest)) {
            for stray in ctx.fleet.stray_instances(target, &g.name, &record.image(live.digest))? {
                report.drift.push(Drift {
                    subject: subject.clone(),
                    problem: format!(
                        "instance {} of group {} runs {}, not {} (the recorded image of {}): it was changed \
                         outside kiln",
                        stray.instance,
                        g.name,
                        stray.runs,
                        stray.expected,
                        live.digest.short()
                    ),
                });
            }
        }
        let problem = match group {
            None => format!("live group {} does not exist", live.group),
            Some(g) if g.digest != live.digest => {
                format!("group {} runs {}, the ledger says {}", g.name, g.digest.short(), live.digest.short())
            }
            Some(g) if g.running < g.capacity || g.capacity == 0 => format!(
                "group {} runs {} of {} instances ({restart})",
                g.name,
                g.running,
                g.capacity.max(stage.capacity)
            ),
            Some(g) if !ctx.fleet.endpoint_up(target) => format!(
                "its endpoint {} is down while group {} runs ({restart})",
                ctx.fleet.endpoint(target).unwrap_or_else(|| "(none)".into()),
                g.name
            ),
            Some(_) => continue,
        };
        report.drift.push(Drift { subject, problem });
    }
    Ok(report)
}
