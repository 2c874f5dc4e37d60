//! `kiln deploy`: (re)deploy what is promoted to a stage, or resume an interrupted deployment.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// Stage to deploy
    #[arg(long)]
    pub stage: String,
}

pub fn run(ctx: &Ctx, _args: DeployArgs) -> Result<(), kiln::Error> {
    // Config errors come first, so a broken pipeline is reported as such even before this command lands.
    ctx.check_config()?;
    Err(kiln::Error::NotImplemented { command: "deploy" })
}
