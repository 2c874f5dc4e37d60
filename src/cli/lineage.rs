//! `kiln lineage`: commit, recipe key, parent chain, stages reached and deployments of an image.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct LineageArgs {
    /// A digest or a stage name
    pub target: String,
    /// Output format
    #[arg(long, value_enum, default_value_t = LineageFormat::Text)]
    pub format: LineageFormat,
}

pub fn run(ctx: &Ctx, _args: LineageArgs) -> Result<(), kiln::Error> {
    // Config errors come first, so a broken pipeline is reported as such even before this command lands.
    ctx.check_config()?;
    Err(kiln::Error::NotImplemented { command: "lineage" })
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineageFormat {
    Text,
    Json,
    Dot,
    Mermaid,
}
