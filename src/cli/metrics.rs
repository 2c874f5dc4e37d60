//! `kiln metrics`: the four DORA keys of the pipeline over a window, from the ledger (definitions: docs/metrics.md).

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use clap::Args;

use kiln::digest::Digest;
use kiln::engine::metrics::{self, Baked, Metrics, Sources, StageMetrics, Summary, Window};
use kiln::ledger::{Event, EventBody, Ledger, CLOCK_SKEW_TOLERANCE};

use super::Ctx;

#[derive(Args, Debug)]
pub struct MetricsArgs {
    /// The window: from this long ago until now, such as 7d or 90d
    #[arg(long, default_value = "30d", value_parser = parse_age)]
    pub since: Duration,
    /// Only this stage (lead time is always to the pipeline's last stage)
    #[arg(long)]
    pub stage: Option<String>,
}

fn parse_age(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration such as 7d or 30d: {e}"))
}

pub fn run(ctx: &Ctx, args: MetricsArgs) -> Result<(), kiln::Error> {
    let pipeline = ctx.pipeline()?;
    let stages: Vec<String> = pipeline.stages.iter().map(|s| s.name.clone()).collect();
    if let Some(stage) = &args.stage {
        if !stages.contains(stage) {
            return Err(kiln::Error::usage(format!(
                "--stage {stage}: pipeline {} has no such stage (its stages: {})",
                pipeline.name,
                stages.join(", ")
            )));
        }
    }
    // A pinned clock (`KILN_NOW`) moves "now" too, as for `kiln log --since`.
    let to = ctx.clock.now();
    // SystemTime reaches before 1970, but an RFC 3339 time (the document's `from`) cannot.
    let from = to.checked_sub(args.since).filter(|from| *from >= SystemTime::UNIX_EPOCH).ok_or_else(|| {
        kiln::Error::usage(format!("--since {} reaches back before 1970", humantime::format_duration(args.since)))
    })?;
    let ledger = ctx.ledger()?;
    let view = ledger.view()?;
    let events = events_for(&ledger, view.seq(), from, &pipeline.name, &stages)?;
    let baked = |digest: &Digest| {
        let record = view.image(digest)?;
        Some(Baked { time: kiln::clock::parse(&record.time)?, commit: record.commit })
    };
    let git = git2::Repository::discover(ctx.repo.root()).ok();
    let commit_time = |commit: &str| {
        let found = git.as_ref()?.find_commit(git2::Oid::from_str(commit).ok()?).ok()?;
        let secs = u64::try_from(found.committer().when().seconds()).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    };
    let sources = Sources { baked: &baked, commit_time: &commit_time };
    let mut metrics = metrics::compute(&pipeline.name, &stages, &events, Window { from, to }, &sources);
    if let Some(err) = view.take_failure() {
        return Err(err.into());
    }
    if let Some(stage) = &args.stage {
        metrics.stages.retain(|s| &s.stage == stage);
    }
    let since = humantime::format_duration(args.since).to_string();
    let doc = serde_json::json!({
        "pipeline": pipeline.name,
        "since": since,
        "from": kiln::clock::format(from),
        "to": kiln::clock::format(to),
        "prod_stage": metrics.prod_stage,
        "stages": metrics.stages,
        "lead_time": metrics.lead_time,
    });
    ctx.out.emit(&doc, || render(&pipeline.name, &since, &metrics))
}

/// The events the metrics need, ascending: every event of the window, and before it, for each stage, its deploy
/// events back to the last one that finished (what was live when the window opened, so redeploying it in the
/// window is not counted as a new deployment). The rest of the ledger is not read.
fn events_for(
    ledger: &Ledger,
    head: u64,
    from: SystemTime,
    pipeline: &str,
    stages: &[String],
) -> Result<Vec<Event>, kiln::Error> {
    let mut out = Vec::new();
    let mut settled: BTreeSet<&str> = BTreeSet::new();
    let mut before_window = false;
    let mut seq = head;
    while seq > 0 && settled.len() < stages.len() {
        let Some(stored) = ledger.read(seq)? else { break };
        seq -= 1;
        let event = stored.event;
        // As `kiln log --since`: real clocks only run backwards by the skew `verify` bounds; a pinned clock's
        // time says nothing about the events before it.
        before_window = before_window
            || (event.clock.is_none()
                && kiln::clock::parse(&event.time).is_some_and(|t| t + CLOCK_SKEW_TOLERANCE < from));
        if !before_window {
            out.push(event);
            continue;
        }
        let stage = match &event.body {
            // Steps too: a verification window that failed just after the window opened began before it.
            EventBody::DeployStarted { pipeline: p, stage, .. }
            | EventBody::DeployStep { pipeline: p, stage, .. }
            | EventBody::DeployFinished { pipeline: p, stage, .. }
                if p == pipeline =>
            {
                stage.as_str()
            }
            _ => continue,
        };
        if let Some(name) = stages.iter().find(|s| *s == stage) {
            if settled.contains(name.as_str()) {
                continue;
            }
            if matches!(event.body, EventBody::DeployFinished { .. }) {
                settled.insert(name.as_str());
            }
            out.push(event);
        }
    }
    out.reverse();
    Ok(out)
}

fn none_or<T>(value: Option<T>, show: impl FnOnce(T) -> String) -> String {
    value.map(show).unwrap_or_else(|| "none".into())
}

fn summary(value: Option<Summary>) -> String {
    none_or(value, |s| {
        format!(
            "median {}, p90 {} (of {})",
            humantime::format_duration(Duration::from_secs(s.median_secs)),
            humantime::format_duration(Duration::from_secs(s.p90_secs)),
            s.count
        )
    })
}

fn render_stage(s: &StageMetrics) -> String {
    let mut out = format!("{}:\n", s.stage);
    out.push_str(&format!(
        "  deployment frequency  {} ({} deployments)\n",
        none_or(s.per_day, |d| format!("{d:.2}/day")),
        s.deployments
    ));
    out.push_str(&format!(
        "  change-failure rate   {}\n",
        none_or(s.change_failure_rate, |r| format!("{:.0}% ({} of {})", r * 100.0, s.failed, s.deployments))
    ));
    let unrestored = if s.unrestored > 0 { format!("; {} not restored yet", s.unrestored) } else { String::new() };
    out.push_str(&format!("  time to restore       {}{unrestored}\n", summary(s.time_to_restore)));
    out.push_str(&format!("  drills                {} run, {} passed\n", s.drills, s.drills_passed));
    for f in &s.failures {
        let cause = serde_json::to_value(f.cause).ok().and_then(|v| v.as_str().map(str::to_string));
        out.push_str(&format!(
            "    failed: {} ({}) {} at seq {}\n",
            f.digest.short(),
            f.deploy_id,
            cause.unwrap_or_default(),
            f.seq
        ));
    }
    out
}

fn render(pipeline: &str, since: &str, metrics: &Metrics) -> String {
    let mut out = format!("pipeline {pipeline}, the last {since}\n");
    for stage in &metrics.stages {
        out.push_str(&render_stage(stage));
    }
    let lead = &metrics.lead_time;
    out.push_str(&format!("lead time to {} ({} deployments):\n", metrics.prod_stage, lead.deployments));
    out.push_str(&format!("  bake → {}    {}\n", metrics.prod_stage, summary(lead.bake_to_prod)));
    out.push_str(&format!("  commit → {}  {}\n", metrics.prod_stage, summary(lead.commit_to_prod)));
    out
}
