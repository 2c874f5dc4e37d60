//! `kiln report`: what a release manager attaches to a change ticket, gathered from the ledger alone (so it reads
//! the same for every provider) and rendered as one self-contained HTML page: per stage what is live and promoted,
//! the timeline, gate verdicts with their evidence and approvals; the lineage graph; the ledger head and what
//! `verify` found; the delivery metrics of src/engine/metrics.rs.

mod graph;
mod html;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::SystemTime;

use rayon::prelude::*;

use super::metrics::{self, Metrics, Sources, Window};
use crate::config::Pipeline;
use crate::digest::Digest;
use crate::ledger::view::{stage_key, ImageRecord};
use crate::ledger::{Event, EventBody, Ledger, LedgerError, View, CLOCK_SKEW_TOLERANCE};
use crate::Error;

pub use html::render;

/// Rows shown per stage and section; older ones in the range read are counted ("N older not shown"), so the page
/// stays a few hundred kilobytes however long the ledger is.
pub const TIMELINE_ROWS: usize = 50;
pub const VERDICT_ROWS: usize = 20;
pub const APPROVAL_ROWS: usize = 20;

/// How many events are read and decoded at once, in parallel, on the way through the range.
const READ_CHUNK: u64 = 8 * 1024;

/// The deploy step that records a failed verification window; the metrics need it (src/engine/deploy.rs writes it).
const VERIFICATION_FAILED_STEP: &str = "verification-failed";

/// What the report covers and when it was made.
pub struct Options {
    /// The timeline and the metrics start here; none: the whole history. What is live is always as of now.
    pub since: Option<SystemTime>,
    /// As the user gave `--since` ("30d"), for the page.
    pub since_label: Option<String>,
    pub now: SystemTime,
    pub actor: String,
}

/// One part of `verify` as the report tells it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Passed,
    Failed,
    NotRun,
}

#[derive(Debug, Clone)]
pub struct Check {
    pub outcome: Outcome,
    /// One line: what was checked and what came of it.
    pub summary: String,
    /// What failed, one entry per problem.
    pub problems: Vec<String>,
}

/// What `kiln verify` would say: the hash chain, and the provider's drift from the ledger.
#[derive(Debug, Clone)]
pub struct Verification {
    pub chain: Check,
    pub provider: Check,
}

impl Verification {
    pub fn passed(&self) -> bool {
        self.chain.outcome != Outcome::Failed && self.provider.outcome != Outcome::Failed
    }
}

/// The chain part of `verify`, run whole; with the error `kiln verify` would exit with, if it failed.
pub fn check_chain(ledger: &Ledger) -> (Check, Option<Error>) {
    match ledger.verify() {
        Ok(found) => {
            let summary = match found.head {
                Some(_) => format!("{} events, every hash and every link intact", found.events),
                None => "the ledger is empty".into(),
            };
            (Check { outcome: Outcome::Passed, summary, problems: Vec::new() }, None)
        }
        Err(err) => {
            let check = Check {
                outcome: Outcome::Failed,
                summary: "the hash chain is broken".into(),
                problems: vec![err.to_string()],
            };
            (check, Some(err.into()))
        }
    }
}

/// The provider part of `verify`: images still exist and match, live groups run what the ledger says; with the
/// error `kiln verify` would exit with, if it failed.
pub fn check_provider(ctx: &super::Context) -> (Check, Option<Error>) {
    let provider = ctx.images.name();
    match super::drift::check(ctx) {
        Ok(found) if found.drift.is_empty() => {
            let mut summary = format!(
                "{provider} provider: every image matches its digest, every live group runs what the ledger says"
            );
            for stopped in &found.stopped {
                summary.push_str(&format!("; stage {} is stopped (kiln down at seq {})", stopped.stage, stopped.seq));
            }
            (Check { outcome: Outcome::Passed, summary, problems: Vec::new() }, None)
        }
        Ok(found) => {
            let check = Check {
                outcome: Outcome::Failed,
                summary: format!("the {provider} provider has drifted from the ledger"),
                problems: found.drift.iter().map(|d| format!("{}: {}", d.subject, d.problem)).collect(),
            };
            (check, Some(Error::Drift { drift: found.drift }))
        }
        Err(err) => (provider_unchecked(&err), Some(err)),
    }
}

/// The provider part when the provider could not even be asked.
pub fn provider_unchecked(err: &Error) -> Check {
    Check {
        outcome: Outcome::Failed,
        summary: "the provider could not be checked".into(),
        problems: vec![err.to_string()],
    }
}

/// The provider part, not run (`--ledger-only`, or no provider to ask).
pub fn provider_not_checked(why: &str) -> Check {
    Check { outcome: Outcome::NotRun, summary: why.to_string(), problems: Vec::new() }
}

/// Everything the page shows.
pub struct Report {
    pub pipeline: String,
    pub provider: String,
    pub ledger: String,
    pub generated_at: String,
    pub generated_by: String,
    pub since_label: Option<String>,
    /// The range of time the timeline and metrics cover.
    pub window: Window,
    /// The last event, if any: its seq and hash.
    pub head: Option<(u64, Digest)>,
    pub verification: Verification,
    pub stages: Vec<StageReport>,
    /// The lineage of every image live or promoted in a stage, as inline SVG; none when no stage has one.
    pub lineage_svg: Option<String>,
    pub metrics: Metrics,
    /// Events decoded to build the timeline and the metrics.
    pub events_read: u64,
    /// Shown rows whose time was chosen with `KILN_NOW` rather than read from a clock.
    pub pinned_rows: usize,
}

pub struct StageReport {
    pub name: String,
    pub live: Option<LiveFacts>,
    pub promoted: Option<PromotedFacts>,
    pub open: Option<OpenFacts>,
    /// A revoked image live or promoted here.
    pub warnings: Vec<String>,
    /// What a reader should know: the stage held by a rollback, or stopped.
    pub notices: Vec<String>,
    pub timeline: Shown<TimelineRow>,
    pub verdicts: Shown<Verdicts>,
    pub approvals: Shown<ApprovalRow>,
}

/// The newest rows of a section, newest first, and how many older ones the range held.
pub struct Shown<T> {
    pub rows: Vec<T>,
    pub older: u64,
}

#[derive(Debug, Clone)]
pub struct ImageFacts {
    pub recipe: String,
    pub image_ref: String,
    pub commit: Option<String>,
    pub dirty: bool,
    pub baked_at: String,
}

impl ImageFacts {
    fn of(record: &ImageRecord) -> ImageFacts {
        ImageFacts {
            recipe: record.recipe.clone(),
            image_ref: record.image_ref.clone(),
            commit: record.commit.clone(),
            dirty: record.dirty,
            baked_at: record.time.clone(),
        }
    }
}

pub struct LiveFacts {
    pub digest: Digest,
    pub group: String,
    pub deploy_id: String,
    pub since: String,
    pub seq: u64,
    pub rollback: bool,
    pub image: Option<ImageFacts>,
}

pub struct PromotedFacts {
    pub digest: Digest,
    pub seq: u64,
    pub time: String,
    pub actor: String,
    pub image: Option<ImageFacts>,
}

pub struct OpenFacts {
    pub deploy_id: String,
    pub digest: Digest,
    pub group: String,
    pub holder: String,
    pub lease_until: String,
}

/// Who did it, when, at which seq.
#[derive(Debug, Clone)]
pub struct At {
    pub seq: u64,
    pub time: String,
    pub actor: String,
    /// Written under a pinned clock (`KILN_NOW`): the real time it was written.
    pub pinned: Option<String>,
}

impl At {
    fn of(event: &Event) -> At {
        At {
            seq: event.seq,
            time: event.time.clone(),
            actor: event.actor.clone(),
            pinned: event.clock.as_ref().filter(|c| c.pinned).map(|c| c.real_time.clone()),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum What {
    Promoted,
    Refused,
    Deployed,
    RolledBack,
    DeployFailed,
    Revoked,
    Stopped,
    DrillPassed,
    DrillFailed,
}

impl What {
    pub fn label(self) -> &'static str {
        match self {
            What::Promoted => "promoted",
            What::Refused => "promotion refused",
            What::Deployed => "deployed",
            What::RolledBack => "rolled back",
            What::DeployFailed => "deploy failed",
            What::Revoked => "revoked",
            What::Stopped => "stopped",
            What::DrillPassed => "drill passed",
            What::DrillFailed => "drill failed",
        }
    }

    /// The CSS class that colours the row's label.
    pub fn class(self) -> &'static str {
        match self {
            What::Promoted | What::Deployed | What::DrillPassed => "good",
            What::Refused | What::RolledBack | What::Stopped => "warn",
            What::DeployFailed | What::Revoked | What::DrillFailed => "bad",
        }
    }
}

#[derive(Debug, Clone)]
pub struct TimelineRow {
    pub at: At,
    pub what: What,
    pub digest: Option<Digest>,
    pub group: Option<String>,
    pub detail: String,
}

/// The gates of one promotion or refusal.
#[derive(Debug, Clone)]
pub struct Verdicts {
    pub at: At,
    pub digest: Digest,
    pub promoted: bool,
    pub gates: Vec<GateRow>,
}

#[derive(Debug, Clone)]
pub struct GateRow {
    pub gate: String,
    pub passed: bool,
    pub detail: String,
    /// The evidence's members as (name, value); text values as they are, others as compact JSON.
    pub evidence: Vec<(String, String)>,
}

#[derive(Debug, Clone)]
pub struct ApprovalRow {
    pub at: At,
    pub digest: Digest,
    pub note: Option<String>,
}

/// The last `keep` items pushed, and how many were pushed before them.
struct Recent<T> {
    keep: usize,
    rows: VecDeque<T>,
    dropped: u64,
}

impl<T> Recent<T> {
    fn new(keep: usize) -> Recent<T> {
        Recent { keep, rows: VecDeque::new(), dropped: 0 }
    }

    fn push(&mut self, row: T) {
        self.rows.push_back(row);
        if self.rows.len() > self.keep {
            self.rows.pop_front();
            self.dropped += 1;
        }
    }

    fn newest_first(self) -> Shown<T> {
        Shown { rows: self.rows.into_iter().rev().collect(), older: self.dropped }
    }
}

struct StageRows {
    timeline: Recent<TimelineRow>,
    verdicts: Recent<Verdicts>,
    approvals: Recent<ApprovalRow>,
}

/// A deployment between its start and its end: what its end row says.
struct Started {
    rollback: Option<String>,
}

/// Folds events, oldest first, into the per-stage rows and the events the metrics need.
struct Fold<'a> {
    pipeline: &'a str,
    view: &'a View,
    stages: BTreeMap<String, StageRows>,
    started: HashMap<(String, String), Started>,
    /// The events [`metrics::compute`] looks at; the others (most of a ledger: steps, bakes) are not kept.
    for_metrics: Vec<Event>,
    /// When and from which commit each image read was baked, for lead times: asking the view instead would load
    /// every index shard of a long history into memory.
    baked: HashMap<Digest, metrics::Baked>,
}

impl Fold<'_> {
    fn row(&mut self, stage: &str, at: &At, what: What, digest: Option<Digest>, group: Option<String>, detail: String) {
        if let Some(rows) = self.stages.get_mut(stage) {
            rows.timeline.push(TimelineRow { at: at.clone(), what, digest, group, detail });
        }
    }

    /// `shown`: the event is in the window (else it only sets the scene for the metrics and the deployments).
    fn apply(&mut self, event: Event, shown: bool) {
        let at = At::of(&event);
        let ours = |p: &str| p == self.pipeline;
        match &event.body {
            EventBody::Baked { digest, commit, .. } => {
                if let Some(time) = crate::clock::parse(&event.time) {
                    self.baked.insert(*digest, metrics::Baked { time, commit: commit.clone() });
                }
            }
            EventBody::Promoted { pipeline, stage, digest, gates }
            | EventBody::Refused { pipeline, stage, digest, gates }
                if ours(pipeline) && shown =>
            {
                let promoted = matches!(event.body, EventBody::Promoted { .. });
                let failed: Vec<&str> = gates.iter().filter(|g| !g.passed).map(|g| g.gate.as_str()).collect();
                let (what, detail) = if promoted {
                    (What::Promoted, format!("{} gate(s) passed", gates.len()))
                } else {
                    (What::Refused, format!("refused by {}", failed.join(", ")))
                };
                self.row(stage, &at, what, Some(*digest), None, detail);
                let gates = gates.iter().map(gate_row).collect();
                if let Some(rows) = self.stages.get_mut(stage.as_str()) {
                    rows.verdicts.push(Verdicts { at, digest: *digest, promoted, gates });
                }
            }
            EventBody::Approved { pipeline, stage, digest, note } if ours(pipeline) && shown => {
                if let Some(rows) = self.stages.get_mut(stage.as_str()) {
                    rows.approvals.push(ApprovalRow { at, digest: *digest, note: note.clone() });
                }
            }
            EventBody::DeployStarted { pipeline, stage, deploy_id, rollback, .. } if ours(pipeline) => {
                let reason = rollback.as_ref().map(|r| {
                    let forced = if r.forced { " (forced past a revocation)" } else { "" };
                    format!("{}{forced}", r.reason.as_deref().unwrap_or("no reason given"))
                });
                self.started.insert((stage.clone(), deploy_id.clone()), Started { rollback: reason });
            }
            EventBody::DeployFinished { pipeline, stage, deploy_id, digest, group } if ours(pipeline) => {
                let started = self.started.remove(&(stage.clone(), deploy_id.clone()));
                if shown {
                    let (what, detail) = match started.and_then(|s| s.rollback) {
                        Some(reason) => (What::RolledBack, reason),
                        None => (What::Deployed, format!("deployment {deploy_id}")),
                    };
                    self.row(stage, &at, what, Some(*digest), Some(group.clone()), detail);
                }
            }
            EventBody::DeployFailed { pipeline, stage, deploy_id, digest, group, reason, .. } if ours(pipeline) => {
                let started = self.started.remove(&(stage.clone(), deploy_id.clone()));
                if shown {
                    let kind = if started.is_some_and(|s| s.rollback.is_some()) { "rollback" } else { "deployment" };
                    let detail = format!("{kind} {deploy_id}: {reason}");
                    self.row(stage, &at, What::DeployFailed, Some(*digest), Some(group.clone()), detail);
                }
            }
            EventBody::Stopped { pipeline, stage } if ours(pipeline) && shown => {
                self.row(stage, &at, What::Stopped, None, None, "kiln down".into());
            }
            EventBody::Drill { pipeline, stage, fault, passed, requests, failed, bound, converged, digest, .. }
                if ours(pipeline) && shown =>
            {
                let what = if *passed { What::DrillPassed } else { What::DrillFailed };
                let converged = if *converged { "converged" } else { "did not converge" };
                let detail = format!("{fault}: {failed} of {requests} requests failed (bound {bound}), {converged}");
                self.row(stage, &at, what, *digest, None, detail);
            }
            EventBody::Revoked { digest, reason, descendants } if shown => {
                for stage in self.stages_reached(std::iter::once(digest).chain(descendants)) {
                    let detail = match descendants.len() {
                        0 => reason.clone(),
                        n => format!("{reason} (and {n} image(s) built on it)"),
                    };
                    self.row(&stage, &at, What::Revoked, Some(*digest), None, detail);
                }
            }
            _ => {}
        }
        if needed_by_metrics(&event.body, self.pipeline) {
            self.for_metrics.push(lean(event));
        }
    }

    /// The stages of this pipeline any of `digests` was promoted to or deployed in.
    fn stages_reached<'d>(&self, digests: impl Iterator<Item = &'d Digest>) -> BTreeSet<String> {
        let mut reached = BTreeSet::new();
        for digest in digests {
            let Some(record) = self.view.image(digest) else { continue };
            for stage in self.stages.keys() {
                if record.stages.contains_key(&stage_key(self.pipeline, stage)) {
                    reached.insert(stage.clone());
                }
            }
        }
        reached
    }
}

/// Whether [`metrics::compute`] reads the event. A whole-history report holds these in memory at once, so what it
/// never reads is left out: every kind of event that is not about deployments, the steps other than a failed
/// verification window, other pipelines' deployments, and the start of a deployment that is not a rollback (a
/// deployment whose start it has not seen is an ordinary one to it). Kinds not named here are kept.
fn needed_by_metrics(body: &EventBody, pipeline: &str) -> bool {
    match body {
        EventBody::Baked { .. }
        | EventBody::Promoted { .. }
        | EventBody::Refused { .. }
        | EventBody::Approved { .. }
        | EventBody::Collected { .. }
        | EventBody::PointerPublished { .. }
        | EventBody::Distributed { .. }
        | EventBody::Stopped { .. } => false,
        EventBody::DeployStarted { pipeline: p, rollback, .. } => p == pipeline && rollback.is_some(),
        EventBody::DeployStep { pipeline: p, step, .. } => p == pipeline && step == VERIFICATION_FAILED_STEP,
        EventBody::DeployFinished { pipeline: p, .. } | EventBody::DeployFailed { pipeline: p, .. } => p == pipeline,
        _ => true,
    }
}

/// The event without what the metrics do not read: a whole-history report of a million events keeps a quarter of a
/// million deploy events for them.
fn lean(mut event: Event) -> Event {
    std::mem::take(&mut event.actor);
    event.clock = None;
    match &mut event.body {
        EventBody::DeployStarted { group, previous_group, lease_until, lease_holder, .. } => {
            std::mem::take(group);
            std::mem::take(lease_until);
            std::mem::take(lease_holder);
            *previous_group = None;
        }
        EventBody::DeployFinished { group, .. } => {
            std::mem::take(group);
        }
        EventBody::DeployFailed { group, reason, log_tail, .. } => {
            std::mem::take(group);
            std::mem::take(reason);
            *log_tail = None;
        }
        EventBody::DeployStep { detail, .. } => *detail = serde_json::Value::Null,
        _ => {}
    }
    event
}

fn gate_row(gate: &crate::ledger::GateVerdict) -> GateRow {
    let show = |value: &serde_json::Value| match value {
        serde_json::Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    let evidence = match &gate.evidence {
        serde_json::Value::Null => Vec::new(),
        serde_json::Value::Object(members) => {
            members.iter().filter(|(_, v)| !v.is_null()).map(|(k, v)| (k.clone(), show(v))).collect()
        }
        other => vec![("evidence".into(), show(other))],
    };
    GateRow { gate: gate.gate.clone(), passed: gate.passed, detail: gate.detail.clone(), evidence }
}

/// Event `seq`, which must be there: the chain runs without gaps up to the head.
fn read_event(ledger: &Ledger, seq: u64) -> Result<Event, LedgerError> {
    match ledger.read(seq)? {
        Some(stored) => Ok(stored.event),
        None => Err(LedgerError::Tampered { location: ledger.location(), seq, reason: "the event is missing".into() }),
    }
}

/// Whether `event` lies before the window, as `kiln log --since` and `kiln metrics` judge it: real clocks only run
/// backwards by the skew `verify` bounds; a pinned clock's time says nothing about the events before it.
fn before(event: &Event, from: SystemTime) -> bool {
    event.clock.is_none() && crate::clock::parse(&event.time).is_some_and(|t| t + CLOCK_SKEW_TOLERANCE < from)
}

/// Where the window starts (the first seq to show), and before it, newest first, the deploy events that set the
/// scene for the metrics: per stage, back to the last deployment that finished before the window.
fn window_start(
    ledger: &Ledger,
    head: u64,
    from: SystemTime,
    pipeline: &str,
    stages: &[String],
) -> Result<(u64, Vec<Event>), Error> {
    // Back from the head in chunks read in parallel: small first, as a window is usually a sliver of the ledger,
    // doubling up to READ_CHUNK for one that is not.
    let mut seq = 0;
    let mut high = head;
    let mut size = 64;
    while high > 0 {
        let low = high.saturating_sub(size - 1).max(1);
        let chunk: Vec<Event> =
            (low..=high).into_par_iter().map(|seq| read_event(ledger, seq)).collect::<Result<_, _>>()?;
        if let Some(at) = chunk.iter().rposition(|event| before(event, from)) {
            seq = low + at as u64;
            break;
        }
        high = low - 1;
        size = (size * 2).min(READ_CHUNK);
    }
    let first = seq + 1;
    let mut scene = Vec::new();
    let mut settled: BTreeSet<&str> = BTreeSet::new();
    while seq > 0 && settled.len() < stages.len() {
        let event = read_event(ledger, seq)?;
        seq -= 1;
        let stage = match &event.body {
            EventBody::DeployStarted { pipeline: p, stage, .. }
            | EventBody::DeployStep { pipeline: p, stage, .. }
            | EventBody::DeployFinished { pipeline: p, stage, .. }
            | EventBody::DeployFailed { pipeline: p, stage, .. }
                if p == pipeline =>
            {
                stage.as_str()
            }
            _ => continue,
        };
        let Some(name) = stages.iter().find(|s| *s == stage) else { continue };
        if settled.contains(name.as_str()) {
            continue;
        }
        if matches!(event.body, EventBody::DeployFinished { .. }) {
            settled.insert(name.as_str());
        }
        scene.push(event);
    }
    scene.reverse();
    Ok((first, scene))
}

/// Gathers the report of `pipeline` from `ledger`: stage facts from the view, the timeline and metrics from the
/// events of the window (all of them when there is no `since`, read in parallel chunks and not kept).
pub fn gather(
    ledger: &Ledger,
    pipeline: &Pipeline,
    options: &Options,
    verification: Verification,
    commit_time: &dyn Fn(&str) -> Option<SystemTime>,
) -> Result<Report, Error> {
    let view = ledger.view()?;
    let names: Vec<String> = pipeline.stages.iter().map(|s| s.name.clone()).collect();
    let head = view.seq();

    let (first, scene, from) = match options.since {
        Some(from) => {
            let (first, scene) = window_start(ledger, head, from, &pipeline.name, &names)?;
            (first, scene, from)
        }
        None => {
            // The whole history: the metrics' window opens with the first event.
            let from = match head {
                0 => options.now,
                _ => crate::clock::parse(&read_event(ledger, 1)?.time).unwrap_or(options.now).min(options.now),
            };
            (1, Vec::new(), from)
        }
    };

    let mut fold = Fold {
        pipeline: &pipeline.name,
        view: &view,
        stages: names
            .iter()
            .map(|n| {
                let rows = StageRows {
                    timeline: Recent::new(TIMELINE_ROWS),
                    verdicts: Recent::new(VERDICT_ROWS),
                    approvals: Recent::new(APPROVAL_ROWS),
                };
                (n.clone(), rows)
            })
            .collect(),
        started: HashMap::new(),
        for_metrics: Vec::new(),
        baked: HashMap::new(),
    };
    for event in scene {
        fold.apply(event, false);
    }
    let mut events_read = 0;
    let mut start = first;
    while start <= head {
        let end = (start + READ_CHUNK).min(head + 1);
        let chunk: Vec<Event> =
            (start..end).into_par_iter().map(|seq| read_event(ledger, seq)).collect::<Result<_, _>>()?;
        events_read += chunk.len() as u64;
        for event in chunk {
            // The scan stops only at real-clock events well before the window; what it let through is shown only
            // from the window's start on, as `kiln log --since` does. The metrics judge each event's time alike.
            let shown = options.since.is_none_or(|from| crate::clock::parse(&event.time).is_some_and(|t| t >= from));
            fold.apply(event, shown);
        }
        start = end;
    }

    let baked = |digest: &Digest| {
        if let Some(baked) = fold.baked.get(digest) {
            return Some(baked.clone());
        }
        // Baked before the window: the view knows.
        let record = view.image(digest)?;
        Some(metrics::Baked { time: crate::clock::parse(&record.time)?, commit: record.commit })
    };
    let sources = Sources { baked: &baked, commit_time };
    let window = Window { from, to: options.now };
    let metrics = metrics::compute(&pipeline.name, &names, &fold.for_metrics, window, &sources);

    let Fold { stages: mut rows, .. } = fold;
    let mut stages = Vec::new();
    for name in &names {
        let there = view.stage(&pipeline.name, name);
        let image = |digest: &Digest| view.image(digest).map(|r| ImageFacts::of(&r));
        let live = there.and_then(|s| s.live.as_ref()).map(|l| LiveFacts {
            digest: l.digest,
            group: l.group.clone(),
            deploy_id: l.deploy_id.clone(),
            since: l.since.clone(),
            seq: l.seq,
            rollback: l.rollback,
            image: image(&l.digest),
        });
        let promoted = there.and_then(|s| s.promoted.as_ref()).map(|p| PromotedFacts {
            digest: p.digest,
            seq: p.seq,
            time: p.time.clone(),
            actor: p.actor.clone(),
            image: image(&p.digest),
        });
        let open = there.and_then(|s| s.open.as_ref()).map(|o| OpenFacts {
            deploy_id: o.deploy_id.clone(),
            digest: o.digest,
            group: o.group.clone(),
            holder: o.holder.clone(),
            lease_until: o.lease_until.clone(),
        });
        let warnings = super::lineage::revocation_warnings(
            &view,
            live.as_ref().map(|l| l.digest),
            promoted.as_ref().map(|p| p.digest),
        );
        let mut notices = Vec::new();
        if let Some(held) = there.and_then(|s| s.held_by_rollback()) {
            notices.push(format!("held on {} by a rollback until the next promotion", held.digest.short()));
        }
        if let Some(stop) = there.and_then(|s| s.stopped.as_ref()) {
            notices.push(format!("stopped with kiln down at seq {} by {}", stop.seq, stop.actor));
        }
        let Some(stage_rows) = rows.remove(name) else { continue };
        stages.push(StageReport {
            name: name.clone(),
            live,
            promoted,
            open,
            warnings,
            notices,
            timeline: stage_rows.timeline.newest_first(),
            verdicts: stage_rows.verdicts.newest_first(),
            approvals: stage_rows.approvals.newest_first(),
        });
    }

    let lineage_svg = graph::lineage_svg(&view, &stages);
    // A damaged cache shard that could not be rebuilt leaves answers incomplete: fail rather than show them.
    if let Some(err) = view.take_failure() {
        return Err(err.into());
    }
    let pinned_rows = stages
        .iter()
        .map(|s| {
            s.timeline.rows.iter().filter(|r| r.at.pinned.is_some()).count()
                + s.verdicts.rows.iter().filter(|r| r.at.pinned.is_some()).count()
                + s.approvals.rows.iter().filter(|r| r.at.pinned.is_some()).count()
        })
        .sum();
    Ok(Report {
        pipeline: pipeline.name.clone(),
        provider: match pipeline.provider {
            crate::config::pipeline::ProviderKind::Local => "local",
            crate::config::pipeline::ProviderKind::Aws => "aws",
        }
        .to_string(),
        ledger: ledger.location(),
        generated_at: crate::clock::format(options.now),
        generated_by: options.actor.clone(),
        since_label: options.since_label.clone(),
        window,
        head: (head > 0).then(|| (head, view.hash())),
        verification,
        stages,
        lineage_svg,
        metrics,
        events_read,
        pinned_rows,
    })
}
