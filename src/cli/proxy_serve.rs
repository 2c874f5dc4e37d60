//! `kiln proxy-serve` (hidden): runs a stage's endpoint proxy in the foreground; `kiln deploy` starts it detached.

use std::path::PathBuf;

use clap::Args;

use kiln::provider::local::proxy;
use kiln::provider::ProviderError;

use super::Ctx;

#[derive(Args, Debug)]
pub struct ProxyServeArgs {
    #[arg(long)]
    pub port: u16,
    #[arg(long)]
    pub routes: PathBuf,
    #[arg(long)]
    pub status: PathBuf,
}

pub fn run(_ctx: &Ctx, args: ProxyServeArgs) -> Result<(), kiln::Error> {
    // A proxy that cannot run is a provider failure (exit 1), worded as what went wrong; `kiln deploy` reads it
    // from the proxy's log.
    proxy::serve(args.port, &args.routes, &args.status).map_err(|e| {
        kiln::Error::Provider(ProviderError::Other { provider: "local", message: format!("the stage proxy: {e}") })
    })
}
