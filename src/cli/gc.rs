//! `kiln gc`: delete images and groups no stage can roll back to.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct GcArgs {
    /// List what would be deleted, delete nothing
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(ctx: &Ctx, _args: GcArgs) -> Result<(), kiln::Error> {
    // Config errors come first, so a broken pipeline is reported as such even before this command lands.
    ctx.check_config()?;
    Err(kiln::Error::NotImplemented { command: "gc" })
}
