//! The report as one HTML page: templates/report.html, rendered by askama, which escapes everything it
//! interpolates (actors, notes, reasons and gate output are user input). The only markup not written by the
//! template is the lineage SVG, drawn by layout-rs, which escapes its labels itself.

use std::time::Duration;

use askama::Template;

use super::{At, Check, Outcome, Report, Shown};
use crate::digest::Digest;
use crate::engine::metrics::Summary;

#[derive(Template)]
#[template(path = "report.html")]
struct Page<'a> {
    pipeline: &'a str,
    provider: &'a str,
    ledger: &'a str,
    generated_at: String,
    generated_by: &'a str,
    window: String,
    head: Option<(u64, String)>,
    chain: CheckView,
    provider_check: CheckView,
    verified: bool,
    overview: Vec<OverviewRow>,
    lineage_svg: Option<&'a str>,
    metrics: Vec<MetricRow>,
    failures: Vec<String>,
    lead_time: Vec<(String, String)>,
    lead_deployments: usize,
    prod_stage: &'a str,
    stages: Vec<StageView>,
    pinned_rows: usize,
    events_read: u64,
    rows_kept: (usize, usize, usize),
}

struct CheckView {
    class: &'static str,
    label: &'static str,
    summary: String,
    problems: Vec<String>,
}

impl CheckView {
    fn of(check: &Check) -> CheckView {
        let (class, label) = match check.outcome {
            Outcome::Passed => ("good", "passed"),
            Outcome::Failed => ("bad", "FAILED"),
            Outcome::NotRun => ("muted", "not run"),
        };
        CheckView { class, label, summary: check.summary.clone(), problems: check.problems.clone() }
    }
}

struct OverviewRow {
    stage: String,
    live: Option<DigestView>,
    group: String,
    since: String,
    promoted: Option<DigestView>,
    warnings: Vec<String>,
    notices: Vec<String>,
}

/// A digest shown short, with the full one a hover (and a print) away.
struct DigestView {
    short: String,
    full: String,
}

impl DigestView {
    fn of(digest: &Digest) -> DigestView {
        DigestView { short: digest.short(), full: digest.to_string() }
    }
}

struct MetricRow {
    stage: String,
    deployments: usize,
    per_day: String,
    change_failure_rate: String,
    time_to_restore: String,
    unrestored: usize,
    drills: String,
}

struct StageView {
    name: String,
    facts: Vec<(String, String)>,
    /// Facts that are digests, shown whole.
    digests: Vec<(String, String)>,
    warnings: Vec<String>,
    notices: Vec<String>,
    timeline: Vec<TimelineView>,
    timeline_older: u64,
    verdicts: Vec<VerdictView>,
    verdicts_older: u64,
    approvals: Vec<ApprovalView>,
    approvals_older: u64,
}

struct TimelineView {
    seq: u64,
    time: String,
    label: &'static str,
    class: &'static str,
    digest: Option<DigestView>,
    group: String,
    actor: String,
    detail: String,
}

struct VerdictView {
    seq: u64,
    time: String,
    actor: String,
    digest: DigestView,
    promoted: bool,
    gates: Vec<GateView>,
}

struct GateView {
    gate: String,
    passed: bool,
    detail: String,
    /// Short evidence, shown on one line.
    facts: Vec<(String, String)>,
    /// Long or multi-line evidence (command output), shown as preformatted blocks.
    blocks: Vec<(String, String)>,
}

/// Evidence values longer than this, or of more than one line, get a block of their own.
const INLINE_EVIDENCE: usize = 80;

impl GateView {
    fn of(gate: &super::GateRow) -> GateView {
        let (blocks, facts) = gate
            .evidence
            .iter()
            .cloned()
            .partition(|(_, value)| value.contains('\n') || value.chars().count() > INLINE_EVIDENCE);
        GateView { gate: gate.gate.clone(), passed: gate.passed, detail: gate.detail.clone(), facts, blocks }
    }
}

struct ApprovalView {
    seq: u64,
    time: String,
    actor: String,
    digest: DigestView,
    note: String,
}

/// `2026-11-28T12:00:00.000Z` as `2026-11-28 12:00:00Z`; a time chosen with `KILN_NOW` gets a `*`.
fn time(text: &str, pinned: bool) -> String {
    let mut shown = text.replacen('T', " ", 1);
    if let Some(dot) = shown.find('.') {
        if shown.ends_with('Z') {
            shown.replace_range(dot..shown.len() - 1, "");
        }
    }
    if pinned {
        shown.push('*');
    }
    shown
}

fn at_time(at: &At) -> String {
    time(&at.time, at.pinned.is_some())
}

fn secs(value: u64) -> String {
    humantime::format_duration(Duration::from_secs(value)).to_string()
}

fn summary(value: Option<Summary>) -> String {
    match value {
        Some(s) => format!("median {}, p90 {} (of {})", secs(s.median_secs), secs(s.p90_secs), s.count),
        None => "none".into(),
    }
}

fn older<T>(shown: &Shown<T>) -> u64 {
    shown.older
}

fn stage_view(stage: &super::StageReport) -> StageView {
    let mut facts = Vec::new();
    let mut digests = Vec::new();
    match &stage.live {
        Some(live) => {
            digests.push(("live".to_string(), live.digest.to_string()));
            facts.push(("live group".into(), live.group.clone()));
            let how = if live.rollback { " (made live by a rollback)" } else { "" };
            facts.push(("live since".into(), format!("{} (seq {}){how}", time(&live.since, false), live.seq)));
            if let Some(image) = &live.image {
                facts.push(("live image".into(), format!("{} {}", image.recipe, image.image_ref)));
                let dirty = if image.dirty { " (dirty tree)" } else { "" };
                let commit = match &image.commit {
                    Some(commit) => format!("from commit {commit}{dirty}"),
                    None => "no commit recorded".into(),
                };
                facts.push(("baked".into(), format!("{}, {commit}", time(&image.baked_at, false))));
            }
        }
        None => facts.push(("live".into(), "nothing".into())),
    }
    match &stage.promoted {
        Some(p) => {
            digests.push(("promoted".to_string(), p.digest.to_string()));
            facts.push(("promoted".into(), format!("by {} at {} (seq {})", p.actor, time(&p.time, false), p.seq)));
            if let (Some(image), false) = (&p.image, stage.live.as_ref().is_some_and(|l| l.digest == p.digest)) {
                facts.push(("promoted image".into(), format!("{} {}", image.recipe, image.image_ref)));
            }
        }
        None => facts.push(("promoted".into(), "nothing".into())),
    }
    if let Some(open) = &stage.open {
        facts.push((
            "deploying".into(),
            format!(
                "{} into {} ({}; lease held by {} until {})",
                open.digest.short(),
                open.group,
                open.deploy_id,
                open.holder,
                time(&open.lease_until, false)
            ),
        ));
    }
    StageView {
        name: stage.name.clone(),
        facts,
        digests,
        warnings: stage.warnings.clone(),
        notices: stage.notices.clone(),
        timeline: stage
            .timeline
            .rows
            .iter()
            .map(|r| TimelineView {
                seq: r.at.seq,
                time: at_time(&r.at),
                label: r.what.label(),
                class: r.what.class(),
                digest: r.digest.as_ref().map(DigestView::of),
                group: r.group.clone().unwrap_or_default(),
                actor: r.at.actor.clone(),
                detail: r.detail.clone(),
            })
            .collect(),
        timeline_older: older(&stage.timeline),
        verdicts: stage
            .verdicts
            .rows
            .iter()
            .map(|v| VerdictView {
                seq: v.at.seq,
                time: at_time(&v.at),
                actor: v.at.actor.clone(),
                digest: DigestView::of(&v.digest),
                promoted: v.promoted,
                gates: v.gates.iter().map(GateView::of).collect(),
            })
            .collect(),
        verdicts_older: older(&stage.verdicts),
        approvals: stage
            .approvals
            .rows
            .iter()
            .map(|a| ApprovalView {
                seq: a.at.seq,
                time: at_time(&a.at),
                actor: a.at.actor.clone(),
                digest: DigestView::of(&a.digest),
                note: a.note.clone().unwrap_or_default(),
            })
            .collect(),
        approvals_older: older(&stage.approvals),
    }
}

/// Writes the page to `out`.
pub fn render(report: &Report, out: &mut dyn std::io::Write) -> std::io::Result<()> {
    let window = match &report.since_label {
        Some(since) => format!(
            "the last {since}: {} to {}",
            time(&crate::clock::format(report.window.from), false),
            time(&crate::clock::format(report.window.to), false)
        ),
        None => format!(
            "the whole history: {} to {}",
            time(&crate::clock::format(report.window.from), false),
            time(&crate::clock::format(report.window.to), false)
        ),
    };
    let overview = report
        .stages
        .iter()
        .map(|s| OverviewRow {
            stage: s.name.clone(),
            live: s.live.as_ref().map(|l| DigestView::of(&l.digest)),
            group: s.live.as_ref().map(|l| l.group.clone()).unwrap_or_default(),
            since: s.live.as_ref().map(|l| time(&l.since, false)).unwrap_or_default(),
            promoted: s.promoted.as_ref().map(|p| DigestView::of(&p.digest)),
            warnings: s.warnings.clone(),
            notices: s.notices.clone(),
        })
        .collect();
    let metrics = report
        .metrics
        .stages
        .iter()
        .map(|m| MetricRow {
            stage: m.stage.clone(),
            deployments: m.deployments,
            per_day: m.per_day.map(|d| format!("{d:.2}/day")).unwrap_or_else(|| "none".into()),
            change_failure_rate: m
                .change_failure_rate
                .map(|r| format!("{:.0}% ({} of {})", r * 100.0, m.failed, m.deployments))
                .unwrap_or_else(|| "none".into()),
            time_to_restore: summary(m.time_to_restore),
            unrestored: m.unrestored,
            drills: match m.drills {
                0 => "none".into(),
                run => format!("{} of {run} passed", m.drills_passed),
            },
        })
        .collect();
    let failures = report
        .metrics
        .stages
        .iter()
        .flat_map(|m| {
            m.failures.iter().map(move |f| {
                let cause = serde_json::to_value(f.cause).ok().and_then(|v| v.as_str().map(str::to_string));
                format!(
                    "{}: {} ({}) {} at seq {}",
                    m.stage,
                    f.digest.short(),
                    f.deploy_id,
                    cause.unwrap_or_default(),
                    f.seq
                )
            })
        })
        .collect();
    let lead = &report.metrics.lead_time;
    let prod = &report.metrics.prod_stage;
    let lead_time = vec![
        (format!("bake → {prod}"), summary(lead.bake_to_prod)),
        (format!("commit → {prod}"), summary(lead.commit_to_prod)),
    ];
    let page = Page {
        pipeline: &report.pipeline,
        provider: &report.provider,
        ledger: &report.ledger,
        generated_at: time(&report.generated_at, false),
        generated_by: &report.generated_by,
        window,
        head: report.head.map(|(seq, hash)| (seq, hash.to_string())),
        chain: CheckView::of(&report.verification.chain),
        provider_check: CheckView::of(&report.verification.provider),
        verified: report.verification.passed(),
        overview,
        lineage_svg: report.lineage_svg.as_deref(),
        metrics,
        failures,
        lead_time,
        lead_deployments: lead.deployments,
        prod_stage: prod,
        stages: report.stages.iter().map(stage_view).collect(),
        pinned_rows: report.pinned_rows,
        events_read: report.events_read,
        rows_kept: (super::TIMELINE_ROWS, super::VERDICT_ROWS, super::APPROVAL_ROWS),
    };
    page.write_into(out)
}
