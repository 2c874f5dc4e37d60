//! `kiln run`: the main job: bake, then promote and deploy stage by stage until a gate stops it.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct RunArgs {
    /// Bake even when the work tree has uncommitted changes (recorded in the ledger)
    #[arg(long)]
    pub allow_dirty: bool,
}

pub fn run(ctx: &Ctx, _args: RunArgs) -> Result<(), kiln::Error> {
    // Config errors come first, so a broken pipeline is reported as such even before this command lands.
    ctx.check_config()?;
    Err(kiln::Error::NotImplemented { command: "run" })
}
