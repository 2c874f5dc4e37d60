//! `kiln down`: local provider: stop a stage's instances and its endpoint proxy. The ledger is unchanged; the next
//! `kiln deploy` starts the stage again.

use clap::Args;

use kiln::provider::StageRef;

use super::Ctx;

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Stage to stop
    #[arg(long)]
    pub stage: String,
}

pub fn run(ctx: &Ctx, args: DownArgs) -> Result<(), kiln::Error> {
    ctx.with_engine(|engine| {
        let stage = kiln::engine::promote::stage(engine, &args.stage)?;
        engine.fleet.stop_stage(StageRef { pipeline: &engine.pipeline.name, stage })?;
        Ok(())
    })?;
    ctx.out.emit(&serde_json::json!({ "stage": args.stage, "stopped": true }), || format!("stopped {}", args.stage))
}
