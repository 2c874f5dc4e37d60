//! `kiln approve`: record one approval of a digest for a stage.

use clap::Args;

use kiln::engine::approval;

use super::Ctx;

#[derive(Args, Debug)]
pub struct ApproveArgs {
    /// Stage the approval is for
    #[arg(long)]
    pub stage: String,
    /// Digest approved (full, or a unique prefix of 12+ hex characters)
    #[arg(long)]
    pub digest: String,
    /// A note kept with the approval
    #[arg(long)]
    pub note: Option<String>,
}

pub fn run(ctx: &Ctx, args: ApproveArgs) -> Result<(), kiln::Error> {
    let report = ctx.with_engine(|engine| approval::approve(engine, &args.stage, &args.digest, args.note.clone()))?;
    ctx.out.emit(&report, || {
        if report.recorded {
            format!(
                "{} approved {} for {} (seq {})",
                report.actor,
                report.digest,
                report.stage,
                report.seq.unwrap_or_default()
            )
        } else {
            format!(
                "{} had already approved {} for {}; nothing recorded",
                report.actor,
                report.digest.short(),
                report.stage
            )
        }
    })
}
