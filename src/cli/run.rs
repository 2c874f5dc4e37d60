//! `kiln run`: the main job. Bake, then promote and deploy stage by stage until a gate stops it, then print a
//! summary of every stage.

use clap::Args;

use kiln::config::Stage;
use kiln::engine::bake::{self, BakeOptions};
use kiln::engine::deploy::{self, Want};
use kiln::engine::gate;
use kiln::engine::lineage;
use kiln::engine::promote::{self, PromoteOptions};
use kiln::engine::Context;
use kiln::ledger::{EventBody, GateVerdict};
use kiln::Error;

use super::Ctx;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Bake even when the work tree has uncommitted changes (recorded in the ledger)
    #[arg(long)]
    pub allow_dirty: bool,
}

struct Stopped {
    stage: String,
    gates: Vec<GateVerdict>,
}

pub fn run(ctx: &Ctx, args: RunArgs) -> Result<(), Error> {
    super::catch_interrupts()?;
    let (baked, stopped, stages) = ctx.with_engine(|engine| {
        let baked = bake::bake(engine, &BakeOptions { allow_dirty: args.allow_dirty, ..BakeOptions::default() })?;
        let mut stopped = None;
        for stage in &engine.pipeline.stages {
            if let Some(waiting) = still_waiting(engine, stage)? {
                stopped = Some(waiting);
                break;
            }
            let options = PromoteOptions { stage: stage.name.clone(), digest: None, plan: false };
            match promote::promote(engine, &options) {
                Ok(report) => {
                    tracing::info!(stage = %stage.name, "{} {}", report.outcome, report.digest.short())
                }
                Err(Error::Refused { stage, gates, .. }) => {
                    stopped = Some(Stopped { stage, gates });
                    break;
                }
                Err(other) => return Err(other),
            }
            deploy::deploy(engine, &stage.name, Want::Promoted)?;
        }
        Ok((baked, stopped, lineage::status(engine)?))
    })?;
    let doc = serde_json::json!({
        "digest": baked.image().digest,
        "image_ref": baked.image().image_ref,
        "recipe_key": baked.image().recipe_key,
        "cached": baked.image().cached,
        "stopped_at": stopped.as_ref().map(|s| serde_json::json!({ "stage": s.stage, "gates": kiln::error::gates_json(&s.gates) })),
        "stages": stages,
    });
    ctx.out.emit(&doc, || {
        let image = baked.image();
        // The same word as `kiln bake` and the `cached` field.
        let how = if image.cached { "cached" } else { "baked" };
        let mut out = format!("{how} {} ({})\n\n", image.digest, image.image_ref);
        out.push_str(&format!("{:<8} {:<14} {:<24} {}\n", "STAGE", "LIVE", "ENDPOINT", "STATE"));
        for s in &stages {
            let live = s.live.as_ref().map(|l| l.digest.short()).unwrap_or_else(|| "-".into());
            let state = match (&stopped, &s.live) {
                (Some(stop), _) if stop.stage == s.stage => "stopped by a gate".to_string(),
                (_, Some(l)) if l.digest == image.digest => "up to date".to_string(),
                (_, Some(_)) => "older image".to_string(),
                (_, None) => "-".to_string(),
            };
            out.push_str(&format!(
                "{:<8} {:<14} {:<24} {state}\n",
                s.stage,
                live,
                s.endpoint.as_deref().unwrap_or("-")
            ));
        }
        if let Some(stop) = &stopped {
            out.push_str(&format!(
                "\n{} is waiting on:\n{}",
                stop.stage,
                super::promote::render_gates(&stop.gates.iter().filter(|g| !g.passed).cloned().collect::<Vec<_>>())
            ));
            if stop.gates.iter().any(|g| !g.passed && g.gate.starts_with("approvals")) {
                out.push_str(&format!(
                    "approve with: kiln approve --stage {} --digest {}\n",
                    stop.stage,
                    image.digest.short()
                ));
            }
        }
        out
    })?;
    // Waiting on people or time (approvals, soak) is the normal end of a run; a gate that failed is not.
    match stopped {
        Some(stop) if stop.gates.iter().any(|g| !g.passed && !is_waiting(g)) => {
            Err(Error::RefusedAsShown { message: format!("a gate of {} failed (verdicts above)", stop.stage) })
        }
        _ => Ok(()),
    }
}

/// A waiting gate is not news. When the stage's next digest fails only gates that wait (approvals, soak), and the
/// latest `refused` event for that digest and stage failed exactly those gates, the run stops there without
/// judging again or recording another refusal. Anything else (a first refusal, a different set of failing gates,
/// a failing command) goes through `promote`, which records it.
fn still_waiting(engine: &Context, stage: &Stage) -> Result<Option<Stopped>, Error> {
    let view = engine.ledger.view()?;
    let Ok(digest) = promote::default_digest(engine, &view, stage) else {
        return Ok(None);
    };
    let Some(baked_seq) = view.image(&digest).map(|r| r.seq) else {
        return Ok(None);
    };
    let verdicts = gate::ledger_verdicts(engine.pipeline, stage, &digest, &view, engine.clock, engine.actor);
    let failing: Vec<&str> = verdicts.iter().filter(|g| !g.passed).map(|g| g.gate.as_str()).collect();
    if failing.is_empty() || verdicts.iter().any(|g| !g.passed && !is_waiting(g)) {
        return Ok(None);
    }
    // Nothing about a digest precedes its bake, so the search stops there.
    let mut seq = view.seq();
    while seq > baked_seq {
        let Some(stored) = engine.ledger.read(seq)? else { break };
        if let EventBody::Refused { pipeline, stage: refused_stage, digest: refused, gates } = &stored.event.body {
            if *pipeline == engine.pipeline.name && *refused_stage == stage.name && *refused == digest {
                let recorded: Vec<&str> = gates.iter().filter(|g| !g.passed).map(|g| g.gate.as_str()).collect();
                return Ok((recorded == failing).then(|| Stopped { stage: stage.name.clone(), gates: verdicts }));
            }
        }
        seq -= 1;
    }
    Ok(None)
}

/// Gates that pass by themselves once time passes or someone approves.
fn is_waiting(gate: &GateVerdict) -> bool {
    gate.gate.starts_with("approvals") || gate.gate.starts_with("soak")
}

#[cfg(test)]
mod tests {
    use kiln::engine::promote::Outcome;

    #[test]
    fn outcomes_are_logged_as_the_words_of_the_json_outcome() {
        for outcome in [Outcome::Promoted, Outcome::AlreadyPromoted, Outcome::Planned] {
            let json = serde_json::to_value(outcome).unwrap();
            assert_eq!(outcome.to_string(), json.as_str().unwrap().replace('-', " "), "{outcome:?}");
        }
    }
}
