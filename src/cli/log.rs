//! `kiln log`: ledger history, newest first, filtered by stage, image and age.

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Args;
use serde::Serialize;

use kiln::digest::Digest;
use kiln::engine::promote::resolve_digest;
use kiln::ledger::{Event, EventBody, Ledger, StoredEvent, View, CLOCK_SKEW_TOLERANCE};

use super::Ctx;

#[derive(Args, Debug)]
pub struct LogArgs {
    /// Only events about this stage
    #[arg(long)]
    pub stage: Option<String>,
    /// Only events about this image (a full digest or a prefix of 12+ hex digits): its bake, promotions,
    /// refusals, approvals, deployments and their steps, revocations and collection
    #[arg(long)]
    pub digest: Option<String>,
    /// Only events from this long ago until now, such as 2h or 30d
    #[arg(long, value_parser = parse_age)]
    pub since: Option<Duration>,
    /// At most this many events
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
}

fn parse_age(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration such as 2h or 30d: {e}"))
}

#[derive(Serialize)]
struct LogEntry<'a> {
    #[serde(flatten)]
    event: &'a Event,
    hash: String,
}

pub fn run(ctx: &Ctx, args: LogArgs) -> Result<(), kiln::Error> {
    let ledger = ctx.ledger()?;
    let view = ledger.view()?;
    let stage = args.stage.as_deref();
    let about = match &args.digest {
        Some(typed) => {
            let digest = resolve_digest(&view, typed)?;
            Some(seqs_about(&ledger, &view, &digest)?)
        }
        None => None,
    };
    // A pinned clock (`KILN_NOW`) moves "now" too, so `--since` means the same under test as in real use.
    let cutoff = match args.since {
        Some(age) => {
            let now = ctx.clock.now();
            Some(now.checked_sub(age).ok_or_else(|| {
                kiln::Error::usage(format!("--since {} reaches back before 1970", humantime::format_duration(age)))
            })?)
        }
        None => None,
    };
    let keep = |e: &StoredEvent| {
        stage.is_none_or(|s| e.event.body.stage() == Some(s))
            && cutoff.is_none_or(|cutoff| kiln::clock::parse(&e.event.time).is_some_and(|t| t >= cutoff))
    };
    let mut events = Vec::new();
    match &about {
        // The image's own events are few and known from the index: read just those.
        Some(seqs) => {
            for seq in seqs.iter().rev() {
                if events.len() >= args.limit {
                    break;
                }
                if let Some(stored) = ledger.read(*seq)? {
                    if keep(&stored) {
                        events.push(stored);
                    }
                }
            }
        }
        None => {
            let mut seq = view.seq();
            while seq > 0 && events.len() < args.limit {
                let Some(stored) = ledger.read(seq)? else { break };
                if keep(&stored) {
                    events.push(stored);
                } else if cutoff.is_some_and(|cutoff| long_before(&stored.event, cutoff)) {
                    break;
                }
                seq -= 1;
            }
        }
    }
    let doc: Vec<LogEntry> = events.iter().map(|e| LogEntry { event: &e.event, hash: e.hash.to_string() }).collect();
    ctx.out.emit(&serde_json::json!({ "events": doc }), || render(&events))
}

/// Whether every event before this one is older than `cutoff` too. Real clocks only run backwards by clock skew
/// between machines (which `verify` bounds), so an event older than that beyond the cutoff ends the search; a
/// pinned clock's time says nothing about the events before it.
fn long_before(event: &Event, cutoff: std::time::SystemTime) -> bool {
    event.clock.is_none() && kiln::clock::parse(&event.time).is_some_and(|t| t + CLOCK_SKEW_TOLERANCE < cutoff)
}

/// Every seq about `digest`: its bake and the events the index notes on it, its ancestors' revocation, and the
/// steps of its deployments (which name the deployment, not the image).
fn seqs_about(ledger: &Ledger, view: &View, digest: &Digest) -> Result<BTreeSet<u64>, kiln::Error> {
    let Some(record) = view.image(digest) else { return Ok(BTreeSet::new()) };
    let mut seqs: BTreeSet<u64> = record.events.iter().copied().collect();
    seqs.insert(record.seq);
    if let Some(revocation) = view.revocation(digest) {
        seqs.insert(revocation.seq);
    }
    for &started in &record.events {
        let Some(stored) = ledger.read(started)? else { continue };
        let EventBody::DeployStarted { deploy_id, .. } = &stored.event.body else { continue };
        let mut seq = started + 1;
        while seq <= view.seq() {
            let Some(next) = ledger.read(seq)? else { break };
            match &next.event.body {
                EventBody::DeployStep { deploy_id: id, .. } if id == deploy_id => {
                    seqs.insert(seq);
                }
                EventBody::DeployFinished { deploy_id: id, .. } | EventBody::DeployFailed { deploy_id: id, .. }
                    if id == deploy_id =>
                {
                    break
                }
                _ => {}
            }
            seq += 1;
        }
    }
    if let Some(err) = view.take_failure() {
        return Err(err.into());
    }
    Ok(seqs)
}

/// What the columns do not show: the step a deployment reached, that it is a rollback, and a pinned clock.
fn detail(e: &Event) -> String {
    let mut parts = Vec::new();
    match &e.body {
        EventBody::DeployStep { step, .. } => parts.push(format!("step {step}")),
        EventBody::DeployStarted { group, rollback, .. } => {
            parts.push(format!("group {group}"));
            if let Some(rollback) = rollback {
                parts.push(if rollback.forced { "rollback (forced)".into() } else { "rollback".to_string() });
            }
        }
        EventBody::DeployFailed { reason, .. } => {
            parts.push(format!("reason: {}", reason.lines().next().unwrap_or_default()))
        }
        EventBody::PointerPublished { pointer, .. } => parts.push(format!("pointer {pointer}")),
        EventBody::Drill { fault, passed, requests, failed, bound, converged, .. } => parts.push(format!(
            "{fault} {}: {failed} of {requests} requests failed (bound {bound}), {}",
            if *passed { "passed" } else { "FAILED" },
            if *converged { "converged" } else { "did not converge" }
        )),
        EventBody::Distributed { copies, .. } => {
            let mut places: Vec<String> = copies
                .iter()
                .map(|c| match &c.account {
                    Some(account) => format!("{} {} (account {account})", c.region, c.id),
                    None => format!("{} {}", c.region, c.id),
                })
                .collect();
            places.dedup();
            parts.push(format!("copies: {}", places.join(", ")));
        }
        _ => {}
    }
    if let Some(clock) = e.clock.as_ref().filter(|c| c.pinned) {
        parts.push(format!("PINNED CLOCK (KILN_NOW), really written {}", clock.real_time));
    }
    parts.join("; ")
}

fn render(events: &[StoredEvent]) -> String {
    if events.is_empty() {
        return "no events".into();
    }
    let mut out = String::new();
    for stored in events {
        let e = &stored.event;
        let stage = e.body.stage().unwrap_or("-");
        let digest = e.body.digest().map(|d| d.short()).unwrap_or_else(|| "-".into());
        let line = format!(
            "{:>6}  {}  {:<16} {:<17} {:<8} {:<12}  {}",
            e.seq,
            e.time,
            e.actor,
            e.body.kind(),
            stage,
            digest,
            detail(e)
        );
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}
