//! `kiln status`: per stage, what is promoted and live, and warnings.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct StatusArgs {}

pub fn run(ctx: &Ctx, _args: StatusArgs) -> Result<(), kiln::Error> {
    // Config errors come first, so a broken pipeline is reported as such even before this command lands.
    ctx.check_config()?;
    Err(kiln::Error::NotImplemented { command: "status" })
}
