//! `kiln verify`: checks the ledger's hash chain end to end; exits 6 naming the first bad seq.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct VerifyArgs {}

pub fn run(ctx: &Ctx, _args: VerifyArgs) -> Result<(), kiln::Error> {
    let ledger = ctx.ledger()?;
    let report = ledger.verify()?;
    let location = ledger.location();
    let doc = serde_json::json!({ "ok": true, "ledger": location, "events": report.events, "head": report.head });
    ctx.out.emit(&doc, || match report.head {
        Some(head) => format!("ledger {location}: {} events, chain intact, head {head}", report.events),
        None => format!("ledger {location}: empty"),
    })
}
