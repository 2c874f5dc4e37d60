//! `kiln revoke`: revoke a digest and every image built on it.

use clap::Args;

use kiln::engine::approval;

use super::Ctx;

#[derive(Args, Debug)]
pub struct RevokeArgs {
    /// Digest to revoke (full, or a unique prefix of 12+ hex characters)
    pub digest: String,
    /// Why, recorded in the ledger
    #[arg(long)]
    pub reason: String,
}

pub fn run(ctx: &Ctx, args: RevokeArgs) -> Result<(), kiln::Error> {
    let report = ctx.with_engine(|engine| approval::revoke(engine, &args.digest, &args.reason))?;
    ctx.out.emit(&report, || {
        let mut out = if report.recorded {
            format!("revoked {} (seq {})", report.digest, report.seq.unwrap_or_default())
        } else {
            format!("{} was already revoked; nothing recorded", report.digest.short())
        };
        for d in &report.descendants {
            out.push_str(&format!("\n  and its descendant {d}"));
        }
        out
    })
}
