//! `kiln proxy-serve` (hidden): runs a stage's endpoint proxy in the foreground; `kiln deploy` starts it detached.

use std::path::PathBuf;

use clap::Args;

use kiln::provider::local::proxy;

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
    proxy::serve(args.port, &args.routes, &args.status)
        .map_err(|e| kiln::Error::NotYet { what: format!("the proxy failed: {e}") })
}
