//! `kiln promote`: run a stage's gates, record the promotion, deploy.

use clap::Args;

use kiln::engine::deploy::{self, Want};
use kiln::engine::promote::{self, Outcome, PromoteOptions, PromoteReport};
use kiln::ledger::GateVerdict;

use super::Ctx;

#[derive(Args, Debug)]
pub struct PromoteArgs {
    /// Stage to promote into
    #[arg(long)]
    pub stage: String,
    /// Digest to promote (default: what is live in the previous stage; the newest bake for the first stage)
    #[arg(long)]
    pub digest: Option<String>,
    /// Print the gate verdicts and the provider calls the promotion (and its deployment) would make, in order,
    /// and make none (exit 3 if the promotion would be refused)
    #[arg(long)]
    pub plan: bool,
    /// Record the promotion without deploying
    #[arg(long)]
    pub no_deploy: bool,
}

pub fn run(ctx: &Ctx, args: PromoteArgs) -> Result<(), kiln::Error> {
    super::catch_interrupts()?;
    let options = PromoteOptions { stage: args.stage.clone(), digest: args.digest, plan: args.plan };
    let deploy = !args.no_deploy && !args.plan;
    let (report, deployed, planned) = ctx.with_engine(|engine| {
        let report = promote::promote(engine, &options)?;
        let deployed = if deploy { Some(deploy::deploy(engine, &args.stage, Want::Promoted)?) } else { None };
        // The deployment the promotion would start, as if it were recorded; a refused promotion starts none.
        let planned = if args.plan && !args.no_deploy && report.would_pass {
            let stage = promote::stage(engine, &args.stage)?;
            Some(deploy::plan_after_promotion(engine, stage, report.digest)?)
        } else {
            None
        };
        Ok((report, deployed, planned))
    })?;
    let doc = serde_json::json!({
        "stage": report.stage,
        "digest": report.digest,
        "image_ref": report.image_ref,
        "outcome": report.outcome,
        "seq": report.seq,
        "would_pass": report.would_pass,
        "gates": kiln::error::gates_json(&report.gates),
        "deployment": deployed,
        "calls": report.calls,
        "planned_deployment": planned,
    });
    ctx.out.emit(&doc, || {
        let mut out = render(&report);
        if let Some(deployed) = &deployed {
            out.push_str(&super::deploy::render(deployed));
        }
        if report.outcome == Outcome::Planned {
            out.push_str(&format!("the promotion would call, in order:\n{}", super::deploy::numbered(&report.calls)));
            match &planned {
                Some(planned) => out.push_str(&super::deploy::render_plan(planned)),
                None if args.no_deploy => out.push_str("no deployment (--no-deploy)\n"),
                None => {}
            }
            out.push_str("plan only: no provider call made, nothing changed or recorded\n");
        }
        out
    })?;
    if report.outcome == Outcome::Planned && !report.would_pass {
        let message =
            format!("promotion of {} to {} would be refused (verdicts above)", report.digest.short(), report.stage);
        return Err(kiln::Error::RefusedAsShown { message });
    }
    Ok(())
}

pub fn render_gates(gates: &[GateVerdict]) -> String {
    gates.iter().map(|g| format!("  {} {}: {}\n", if g.passed { "ok  " } else { "FAIL" }, g.gate, g.detail)).collect()
}

fn render(report: &PromoteReport) -> String {
    let head = match report.outcome {
        Outcome::Promoted => format!(
            "promoted {} ({}) to {} (seq {})",
            report.digest,
            report.image_ref,
            report.stage,
            report.seq.unwrap_or_default()
        ),
        Outcome::AlreadyPromoted => {
            format!("{} is already promoted to {}; nothing recorded", report.digest.short(), report.stage)
        }
        Outcome::Planned if report.would_pass => {
            format!("plan: {} would be promoted to {}", report.digest.short(), report.stage)
        }
        Outcome::Planned => format!("plan: promoting {} to {} would be refused", report.digest.short(), report.stage),
    };
    format!("{head}\n{}", render_gates(&report.gates))
}
