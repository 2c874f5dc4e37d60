//! `kiln promote`: run a stage's gates, record the promotion, deploy.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// Stage to promote into
    #[arg(long)]
    pub stage: String,
    /// Digest to promote (default: what is live in the previous stage; the newest bake for the first stage)
    #[arg(long)]
    pub digest: Option<String>,
    /// Print the gate verdicts and change nothing
    #[arg(long)]
    pub plan: bool,
    /// Record the promotion without deploying
    #[arg(long)]
    pub no_deploy: bool,
}

pub fn run(ctx: &Ctx, _args: PromoteArgs) -> Result<(), kiln::Error> {
    // Config errors come first, so a broken pipeline is reported as such even before this command lands.
    ctx.check_config()?;
    Err(kiln::Error::NotImplemented { command: "promote" })
}
