//! `kiln images`: list baked images.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct ImagesArgs {}

pub fn run(ctx: &Ctx, _args: ImagesArgs) -> Result<(), kiln::Error> {
    // Config errors come first, so a broken pipeline is reported as such even before this command lands.
    ctx.check_config()?;
    Err(kiln::Error::NotImplemented { command: "images" })
}
