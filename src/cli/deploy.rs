//! `kiln deploy`: (re)deploy what is promoted to a stage, or resume an interrupted deployment.

use clap::Args;

use kiln::engine::deploy::{self, DeployOutcome, DeployReport, Want};

use super::Ctx;

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// Stage to deploy
    #[arg(long)]
    pub stage: String,
}

pub fn run(ctx: &Ctx, args: DeployArgs) -> Result<(), kiln::Error> {
    super::catch_interrupts()?;
    let report = ctx.with_engine(|engine| deploy::deploy(engine, &args.stage, Want::Promoted))?;
    ctx.out.emit(&report, || render(&report))
}

pub fn render(report: &DeployReport) -> String {
    let mut out = String::new();
    if let Some(reconciled) = &report.reconciled {
        out.push_str(&format!("{reconciled}\n"));
    }
    let endpoint = report.endpoint.as_deref().map(|e| format!(" at {e}")).unwrap_or_default();
    match report.outcome {
        DeployOutcome::AlreadyLive => out.push_str(&format!(
            "{} already runs {} in group {}{endpoint}\n",
            report.stage,
            report.digest.short(),
            report.group
        )),
        DeployOutcome::Healed => out.push_str(&format!(
            "healed {}: group {} runs {} at full capacity{endpoint}\n",
            report.stage,
            report.group,
            report.digest.short()
        )),
        DeployOutcome::Deployed => {
            let what = if report.rollback { "rolled back" } else { "deployed" };
            out.push_str(&format!(
                "{what} {} ({}) to {} as group {}{endpoint}; cutover {} ms after healthy\n",
                report.digest.short(),
                report.image_ref,
                report.stage,
                report.group,
                report.cutover_ms.unwrap_or_default()
            ));
        }
    }
    out
}
