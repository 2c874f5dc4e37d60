//! `kiln drill --stage S --kind K`: runs a named fault against a running local stage under a small steady load and
//! judges whether the stage held its invariant (docs/drill.md); exits 6 when it did not.

use std::process::{Command, Stdio};

use clap::{Args, ValueEnum};

use kiln::config::pipeline::ProviderKind;
use kiln::engine::deploy::{self, Want};
use kiln::engine::drill::{self, DrillReport, Faults, Kind};
use kiln::provider::local::LocalProvider;
use kiln::provider::StageRef;

use super::Ctx;

#[derive(Args, Debug)]
pub struct DrillArgs {
    /// Stage to drill (a running stage of a local pipeline)
    #[arg(long)]
    pub stage: String,
    /// The fault to run
    #[arg(long, value_enum)]
    pub kind: KindArg,
    /// How long the stage has after the fault to come back to capacity on its live digest
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub converge_timeout: std::time::Duration,
    /// Internal: deploy the drill's release (the live digest as a new group) and nothing else; the kill-kiln drill
    /// runs this as the kiln process it kills
    #[arg(long, hide = true)]
    pub release: bool,
}

fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration such as 30s or 2m: {e}"))
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum KindArg {
    /// SIGKILL one instance of the live group
    KillInstance,
    /// SIGKILL a kiln process mid-deploy, then run `kiln deploy` as the on-call would
    KillKiln,
    /// Deploy a release whose health never comes up
    UnhealthyRelease,
    /// SIGKILL the stage proxy's worker, the process that forwards requests
    KillProxy,
    /// Deploy a release that fails the stage's verification window
    FailedVerify,
}

impl From<KindArg> for Kind {
    fn from(kind: KindArg) -> Kind {
        match kind {
            KindArg::KillInstance => Kind::KillInstance,
            KindArg::KillKiln => Kind::KillKiln,
            KindArg::UnhealthyRelease => Kind::UnhealthyRelease,
            KindArg::KillProxy => Kind::KillProxy,
            KindArg::FailedVerify => Kind::FailedVerify,
        }
    }
}

/// The local provider's faults, and a kiln child process for the release kill-kiln kills.
struct LocalFaults<'a> {
    provider: LocalProvider,
    ctx: &'a Ctx,
    pipeline: String,
}

impl Faults for LocalFaults<'_> {
    fn kill_instance(&self, stage: StageRef, group: &str) -> Result<String, kiln::Error> {
        Ok(self.provider.kill_instance(stage, group)?)
    }

    fn kill_endpoint(&self, stage: StageRef) -> Result<String, kiln::Error> {
        Ok(self.provider.kill_proxy_worker(stage)?)
    }

    fn start_release(&self, stage: &str) -> Result<std::process::Child, kiln::Error> {
        let exe = std::env::current_exe().map_err(kiln::Error::io("the kiln executable"))?;
        let mut command = Command::new(exe);
        command.arg("--dir").arg(self.ctx.repo.root()).arg("--pipeline").arg(&self.pipeline).arg("--quiet");
        if let Some(ledger) = &self.ctx.global.ledger {
            command.arg("--ledger").arg(ledger);
        }
        command
            .args(["drill", "--stage", stage, "--kind", "kill-kiln", "--release"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        command.spawn().map_err(kiln::Error::io("the drill's kiln process"))
    }
}

pub fn run(ctx: &Ctx, args: DrillArgs) -> Result<(), kiln::Error> {
    let pipeline = ctx.pipeline()?;
    if pipeline.provider != ProviderKind::Local {
        return Err(kiln::Error::usage(format!(
            "kiln drill runs against local stages only: pipeline {} deploys to AWS, where killing instances, the \
             load balancer or kiln itself is the job of AWS Fault Injection Service experiments, not of kiln",
            pipeline.name
        )));
    }
    if args.release {
        let report = ctx.with_engine(|engine| deploy::deploy(engine, &args.stage, Want::Redeploy))?;
        return ctx.out.emit(&report, || super::deploy::render(&report));
    }
    let faults = LocalFaults { provider: LocalProvider::new(ctx.state_dir()), ctx, pipeline: pipeline.name.clone() };
    let report =
        ctx.with_engine(|engine| drill::drill(engine, &faults, &args.stage, args.kind.into(), args.converge_timeout))?;
    ctx.out.emit(&report, || render(&report))?;
    if report.passed {
        return Ok(());
    }
    Err(kiln::Error::DrillFailed {
        stage: report.stage.clone(),
        kind: report.kind.name().to_string(),
        reason: why_failed(&report),
    })
}

fn why_failed(report: &DrillReport) -> String {
    let mut why = Vec::new();
    if report.failed > report.bound {
        why.push(format!("{} requests failed, more than the bound of {}", report.failed, report.bound));
    }
    if report.requests == 0 {
        why.push("no request was sent".to_string());
    }
    if let Some(not) = &report.not_converged {
        why.push(format!("the stage did not converge: {not}"));
    } else if report.digest_after != Some(report.digest) {
        why.push(report.changed().unwrap_or_default());
    }
    if why.is_empty() {
        why.push(report.steps.last().cloned().unwrap_or_else(|| "the fault did not go as it must".into()));
    }
    why.join("; ")
}

pub fn render(report: &DrillReport) -> String {
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let mut out = format!(
        "drill {} on {}: {}\n",
        report.kind.name(),
        report.stage,
        if report.passed { "PASSED" } else { "FAILED" }
    );
    for step in &report.steps {
        out.push_str(&format!("  - {step}\n"));
    }
    out.push_str(&format!(
        "  requests:  {} sent, {} failed (bound {})\n",
        report.requests, report.failed, report.bound
    ));
    for failure in &report.failures {
        out.push_str(&format!("             e.g. {failure}\n"));
    }
    let after = report.converged_after_ms.map(|ms| format!(", {ms} ms after the fault")).unwrap_or_default();
    out.push_str(&format!("  converged: {}{after}\n", yes_no(report.converged)));
    if let Some(why) = &report.not_converged {
        out.push_str(&format!("             {why}\n"));
    }
    out.push_str(&format!("  digest:    {} (group {})\n", report.digest.short(), report.group_before));
    if let Some(changed) = report.changed() {
        out.push_str(&format!("  changed:   {changed}\n"));
    }
    out.push_str(&format!("  duration:  {} ms\n", report.duration_ms));
    out.push_str(&format!("  recorded:  seq {}\n", report.seq));
    out
}
