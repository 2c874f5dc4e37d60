//! `kiln down`: local provider: stop a stage's instances and its endpoint proxy, and record that the stage was
//! stopped on purpose (a `stopped` event), so `verify` and `status` say "stopped" rather than "drift". The next
//! `kiln deploy` starts the stage again. A stage with nothing running is left alone and nothing is recorded.

use clap::Args;

use kiln::ledger::{Decision, EventBody};
use kiln::provider::StageRef;

use super::Ctx;

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Stage to stop
    #[arg(long)]
    pub stage: String,
}

pub fn run(ctx: &Ctx, args: DownArgs) -> Result<(), kiln::Error> {
    let seq = ctx.with_engine(|engine| {
        let stage = kiln::engine::promote::stage(engine, &args.stage)?;
        if engine.pipeline.provider != kiln::config::ProviderKind::Local {
            return Err(kiln::Error::usage(format!(
                "`kiln down` stops local stages only; on AWS, retiring stage {} is `kiln gc`'s job, so that no \
                 command takes a stage down by accident",
                stage.name
            )));
        }
        let target = StageRef { pipeline: &engine.pipeline.name, stage };
        let running = engine.fleet.groups(target)?.iter().any(|g| g.running > 0) || engine.fleet.endpoint_up(target);
        if !running {
            return Ok(None);
        }
        // Recorded first: a `down` that fails halfway still reads as a stop, not as drift.
        let (_, stored) = engine.ledger.append::<(), kiln::Error>(engine.actor, engine.clock, |_| {
            Ok(Decision::Append(
                Box::new(EventBody::Stopped { pipeline: engine.pipeline.name.clone(), stage: stage.name.clone() }),
                (),
            ))
        })?;
        engine.fleet.stop_stage(target)?;
        Ok(stored.map(|s| s.event.seq))
    })?;
    let doc = serde_json::json!({ "stage": args.stage, "stopped": seq.is_some(), "seq": seq });
    ctx.out.emit(&doc, || match seq {
        Some(seq) => format!(
            "stopped {} (recorded at seq {seq}); `kiln deploy --stage {}` starts it again",
            args.stage, args.stage
        ),
        None => format!("nothing runs in stage {}; nothing to stop", args.stage),
    })
}
