//! `kiln bake`: build the pipeline's image, or reuse the one whose recipe key matches.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct BakeArgs {
    /// Rebuild from scratch into a temporary store and fail if the digest differs
    #[arg(long)]
    pub check: bool,
    /// Build even if an image with this recipe key exists
    #[arg(long)]
    pub no_cache: bool,
    /// Bake even when the work tree has uncommitted changes (recorded in the ledger)
    #[arg(long)]
    pub allow_dirty: bool,
}

pub fn run(ctx: &Ctx, _args: BakeArgs) -> Result<(), kiln::Error> {
    // Config errors come first, so a broken pipeline is reported as such even before this command lands.
    ctx.check_config()?;
    Err(kiln::Error::NotImplemented { command: "bake" })
}
