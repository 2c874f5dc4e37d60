//! `kiln rollback`: redeploy an earlier digest, skipping gates.

use clap::Args;

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

pub fn run(ctx: &Ctx, _args: RollbackArgs) -> Result<(), kiln::Error> {
    // Config errors come first, so a broken pipeline is reported as such even before this command lands.
    ctx.check_config()?;
    Err(kiln::Error::NotImplemented { command: "rollback" })
}
