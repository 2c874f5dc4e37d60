//! `kiln verify`: checks the ledger's hash chain end to end (exit 6 naming the first bad seq), then, when a
//! pipeline is configured, provider drift: images that changed or vanished, live groups that do not run what the
//! ledger says.

use clap::Args;

use kiln::config::ConfigError;
use kiln::engine::drift;
use kiln::Error;

use super::Ctx;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Check only the ledger's chain, not the provider
    #[arg(long)]
    pub ledger_only: bool,
}

pub fn run(ctx: &Ctx, args: VerifyArgs) -> Result<(), Error> {
    let ledger = ctx.ledger()?;
    let report = ledger.verify()?;
    let location = ledger.location();
    let has_pipeline = match ctx.pipeline() {
        Ok(_) => true,
        Err(Error::Config(ConfigError::NoPipeline { .. })) => false,
        Err(err) => return Err(err),
    };
    let checked_provider = has_pipeline && !args.ledger_only;
    if checked_provider {
        let found = ctx.with_engine(drift::check)?;
        if !found.is_empty() {
            return Err(Error::Drift { drift: found });
        }
    }
    let doc = serde_json::json!({
        "ok": true,
        "ledger": location,
        "events": report.events,
        "head": report.head,
        "provider_checked": checked_provider,
    });
    ctx.out.emit(&doc, || {
        let chain = match report.head {
            Some(head) => format!("ledger {location}: {} events, chain intact, head {head}", report.events),
            None => format!("ledger {location}: empty"),
        };
        if checked_provider {
            format!("{chain}\nprovider: every image matches its digest, every live group runs what the ledger says")
        } else {
            chain
        }
    })
}
