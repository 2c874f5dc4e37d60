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
}

pub fn run(ctx: &Ctx, args: RollbackArgs) -> Result<(), kiln::Error> {
    super::catch_interrupts()?;
    let report = ctx.with_engine(|engine| {
        let to = args.to.as_deref().map(|typed| resolve_digest(&engine.ledger.view()?, typed)).transpose()?;
        deploy::deploy(engine, &args.stage, Want::Rollback { to, reason: args.reason.clone(), force: args.force })
    })?;
    ctx.out.emit(&report, || super::deploy::render(&report))
}
