//! `kiln deploy`: (re)deploy what is promoted to a stage, or resume an interrupted deployment.

use clap::Args;

use kiln::engine::deploy::{self, DeployOutcome, DeployPlan, DeployReport, Want};
use kiln::provider::GroupStart;

use super::Ctx;

#[derive(Args, Debug)]
pub struct DeployArgs {
    /// Stage to deploy
    #[arg(long)]
    pub stage: String,
    /// List the provider calls the deployment would make, in order, and make none
    #[arg(long)]
    pub plan: bool,
}

pub fn run(ctx: &Ctx, args: DeployArgs) -> Result<(), kiln::Error> {
    super::catch_interrupts()?;
    if args.plan {
        let plan = ctx.with_engine(|engine| deploy::plan_deploy(engine, &args.stage, &Want::Promoted))?;
        return ctx.out.emit(&plan, || {
            format!("{}plan only: no provider call made, nothing changed or recorded\n", render_plan(&plan))
        });
    }
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

pub fn numbered(calls: &[String]) -> String {
    calls.iter().enumerate().map(|(n, call)| format!("  {}. {call}\n", n + 1)).collect()
}

/// A deployment plan: what it would run, the facts it took from the ledger, and the calls in order.
pub fn render_plan(plan: &DeployPlan) -> String {
    let what = if plan.rollback { "roll back" } else { "deploy" };
    let how = match plan.start {
        GroupStart::New => format!("as the new group {}", plan.group),
        GroupStart::Reenabled => format!("by scaling the kept group {} back up", plan.group),
        GroupStart::Live => format!("which group {} runs already (checked, healed if it lacks instances)", plan.group),
    };
    let mut out =
        format!("the deployment would {what} {} ({}) to {} {how}\n", plan.digest.short(), plan.image_ref, plan.stage);
    if !plan.assumed.is_empty() {
        out.push_str("assumed from the ledger, not asked of the provider:\n");
        out.extend(plan.assumed.iter().map(|a| format!("  - {a}\n")));
    }
    out.push_str("it would call, in order:\n");
    out.push_str(&numbered(&plan.calls));
    out
}
