//! `kiln approve`: record one approval of a digest for a stage.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct ApproveArgs {
    /// Stage to approve for
    #[arg(long)]
    pub stage: String,
    /// Digest approved (full, or a unique prefix of 12+ hex characters)
    #[arg(long)]
    pub digest: String,
    /// A note kept with the approval
    #[arg(long)]
    pub note: Option<String>,
}

pub fn run(ctx: &Ctx, _args: ApproveArgs) -> Result<(), kiln::Error> {
    // Config errors come first, so a broken pipeline is reported as such even before this command lands.
    ctx.check_config()?;
    Err(kiln::Error::NotImplemented { command: "approve" })
}
