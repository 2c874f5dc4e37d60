//! `kiln down`: local provider: stop a stage's instances and its endpoint proxy.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct DownArgs {
    /// Stage to stop
    #[arg(long)]
    pub stage: String,
}

pub fn run(ctx: &Ctx, _args: DownArgs) -> Result<(), kiln::Error> {
    // Config errors come first, so a broken pipeline is reported as such even before this command lands.
    ctx.check_config()?;
    Err(kiln::Error::NotImplemented { command: "down" })
}
