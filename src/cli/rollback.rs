//! `kiln rollback`: redeploy an earlier digest, skipping gates; a kept group is re-enabled rather than rebuilt.

use clap::Args;

use kiln::engine::deploy::{self, Want};
use kiln::engine::promote::resolve_digest;

use super::Ctx;

#[derive(Args, Debug)]
pub struct RollbackArgs {
    /// Stage to roll back
    #[arg(long)]
    pub stage: String,
    /// Digest to roll back to (default: the one deployed before the current one)
    #[arg(long)]
    pub to: Option<String>,
    /// Why, recorded in the ledger
    #[arg(long)]
    pub reason: Option<String>,
    /// Allow a revoked digest (needs --reason)
    #[arg(long)]
    pub force: bool,
    /// List the provider calls the rollback would make, in order, and make none
    #[arg(long)]
    pub plan: bool,
}

pub fn run(ctx: &Ctx, args: RollbackArgs) -> Result<(), kiln::Error> {
    super::catch_interrupts()?;
    if args.plan {
        let plan = ctx.with_engine(|engine| {
            let to = args.to.as_deref().map(|typed| resolve_digest(&engine.ledger.view()?, typed)).transpose()?;
            let want = Want::Rollback { to, reason: args.reason.clone(), force: args.force };
            deploy::plan_deploy(engine, &args.stage, &want)
        })?;
        return ctx.out.emit(&plan, || {
            format!(
                "{}plan only: no provider call made, nothing changed or recorded\n",
                super::deploy::render_plan(&plan)
            )
        });
    }
    let report = ctx.with_engine(|engine| {
        let to = args.to.as_deref().map(|typed| resolve_digest(&engine.ledger.view()?, typed)).transpose()?;
        deploy::deploy(engine, &args.stage, Want::Rollback { to, reason: args.reason.clone(), force: args.force })
    })?;
    ctx.out.emit(&report, || super::deploy::render(&report))
}
