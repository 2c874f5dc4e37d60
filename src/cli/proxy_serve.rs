//! `kiln proxy-serve` (hidden): runs a stage's endpoint proxy in the foreground; `kiln deploy` starts it detached
//! with `--supervise`, as the stage's supervisor that runs the proxy as its child.

use std::path::PathBuf;

use clap::Args;

use kiln::provider::local::{proxy, supervise};
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
    /// Run as the stage's supervisor: hold the port, run the proxy as a child and restart it when it dies, and
    /// restart dead instances of the routed group
    #[arg(long, conflicts_with = "listen_fd")]
    pub supervise: bool,
    /// Serve on this inherited listening socket (the supervisor's) instead of binding the port
    #[arg(long)]
    pub listen_fd: Option<i32>,
}

pub fn run(_ctx: &Ctx, args: ProxyServeArgs) -> Result<(), kiln::Error> {
    // A proxy that cannot run is a provider failure (exit 1), worded as what went wrong; `kiln deploy` reads it
    // from the proxy's log.
    let served = if args.supervise {
        supervise::supervise(args.port, &args.routes, &args.status)
    } else {
        let listen = match args.listen_fd {
            Some(fd) => proxy::Listen::Inherited { fd, port: args.port },
            None => proxy::Listen::Port(args.port),
        };
        proxy::serve(listen, &args.routes, &args.status)
    };
    served.map_err(|e| {
        kiln::Error::Provider(ProviderError::Other { provider: "local", message: format!("the stage proxy: {e}") })
    })
}
