//! Drift: where the provider no longer matches the ledger — an image that is gone or whose content changed, a live
//! group that is missing, short of instances, or running another digest.

use serde::Serialize;

use super::Context;
use crate::provider::{ImageRef, StageRef};
use crate::Error;

#[derive(Debug, Clone, Serialize)]
pub struct Drift {
    /// An image digest or `stage <name>`.
    pub subject: String,
    pub problem: String,
}

/// Checks every image this pipeline's provider baked, and every stage's live group.
pub fn check(ctx: &Context) -> Result<Vec<Drift>, Error> {
    let view = ctx.ledger.view()?;
    let mut found = Vec::new();
    for (digest, record) in view.images() {
        if record.provider != ctx.images.name() || record.deleted {
            continue;
        }
        let image = ImageRef { digest, image_ref: record.image_ref.clone() };
        if let Err(err) = ctx.images.verify_image(&image) {
            found.push(Drift { subject: digest.to_string(), problem: err.to_string() });
        }
    }
    for stage in &ctx.pipeline.stages {
        let Some(live) = view.stage(&ctx.pipeline.name, &stage.name).and_then(|s| s.live.clone()) else { continue };
        let target = StageRef { pipeline: &ctx.pipeline.name, stage };
        let groups = ctx.fleet.groups(target)?;
        let subject = format!("stage {}", stage.name);
        match groups.iter().find(|g| g.name == live.group) {
            None => found.push(Drift { subject, problem: format!("live group {} does not exist", live.group) }),
            Some(g) if g.digest != live.digest => found.push(Drift {
                subject,
                problem: format!("group {} runs {}, the ledger says {}", g.name, g.digest.short(), live.digest.short()),
            }),
            Some(g) if g.running < g.capacity || g.capacity == 0 => found.push(Drift {
                subject,
                problem: format!(
                    "group {} runs {} of {} instances (`kiln deploy` restarts it)",
                    g.name,
                    g.running,
                    g.capacity.max(stage.capacity)
                ),
            }),
            Some(_) => {}
        }
    }
    Ok(found)
}
