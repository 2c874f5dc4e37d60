//! `kiln revoke`: revoke a digest and every image built on it.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// Digest to revoke
    pub digest: String,
    /// Why, recorded in the ledger
    #[arg(long)]
    pub reason: String,
}

pub fn run(ctx: &Ctx, _args: RevokeArgs) -> Result<(), kiln::Error> {
    // Config errors come first, so a broken pipeline is reported as such even before this command lands.
    ctx.check_config()?;
    Err(kiln::Error::NotImplemented { command: "revoke" })
}
