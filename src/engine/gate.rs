//! Gates: the checks that guard entry to a stage. Ledger gates (upstream, soak, approvals, not-revoked) are pure
//! functions of the view, so a writer can re-judge them against whatever head it appends to; command gates run
//! once per promotion attempt because they do not depend on the ledger.

use std::process::Command;
use std::time::Duration;

use crate::clock::{self, Clock};
use crate::config::pipeline::CommandProgram;
use crate::config::{Gate, Pipeline, Repo, Stage};
use crate::digest::Digest;
use crate::ledger::view::PeriodEnd;
use crate::ledger::{GateVerdict, View};
use crate::process;

const EVIDENCE_TAIL: usize = 2048;

/// Judges the ledger gates of `stage` for `digest` against `view`: not-revoked, upstream, soak, approvals.
/// `promoter` is the actor recording the promotion.
pub fn ledger_verdicts(
    pipeline: &Pipeline,
    stage: &Stage,
    digest: &Digest,
    view: &View,
    clock: &Clock,
    promoter: &str,
) -> Vec<GateVerdict> {
    let mut verdicts = vec![not_revoked(digest, view)];
    let index = pipeline.stage_index(&stage.name).unwrap_or(0);
    let previous = index.checked_sub(1).map(|i| &pipeline.stages[i]);
    if let Some(previous) = previous {
        verdicts.push(upstream(pipeline, previous, digest, view));
    }
    for gate in &stage.gates {
        match gate {
            Gate::Soak { duration, written } => {
                verdicts.push(soak(pipeline, previous, digest, view, clock, *duration, written))
            }
            Gate::Approvals { count, approvers, distinct_from_promoter } => {
                let excluded = distinct_from_promoter.then_some(promoter);
                verdicts.push(approvals(pipeline, stage, digest, view, *count, approvers, excluded))
            }
            Gate::Command { .. } => {}
        }
    }
    verdicts
}

fn not_revoked(digest: &Digest, view: &View) -> GateVerdict {
    match view.revocation(digest) {
        None => GateVerdict {
            gate: "not-revoked".into(),
            passed: true,
            detail: "not revoked".into(),
            evidence: serde_json::Value::Null,
        },
        Some(revocation) => {
            let whose = if revocation.root == *digest {
                "it was revoked".to_string()
            } else {
                format!("its ancestor {} was revoked", revocation.root.short())
            };
            GateVerdict {
                gate: "not-revoked".into(),
                passed: false,
                detail: format!("{whose}: {}", revocation.reason),
                evidence: serde_json::json!({ "revoked_seq": revocation.seq, "root": revocation.root }),
            }
        }
    }
}

/// The digest was verified in the previous stage: live there now, or live there until an ordinary deployment of
/// a later promotion replaced it. A digest rolled away from, or one that never finished a healthy deployment (and
/// its verification window) there, does not pass.
fn upstream(pipeline: &Pipeline, previous: &Stage, digest: &Digest, view: &View) -> GateVerdict {
    let there = view.image_stage(&pipeline.name, &previous.name, digest);
    let gate = "upstream".to_string();
    let verdict = |passed: bool, detail: String, evidence: serde_json::Value| GateVerdict {
        gate: gate.clone(),
        passed,
        detail,
        evidence,
    };
    match (&there.promoted, &there.live) {
        (None, _) => verdict(
            false,
            format!("{} was never promoted to {}", digest.short(), previous.name),
            serde_json::json!({ "stage": previous.name }),
        ),
        (Some(promoted), None) => verdict(
            false,
            format!(
                "promoted to {} (seq {}) but no deployment of it has finished healthy there",
                previous.name, promoted.seq
            ),
            serde_json::json!({ "stage": previous.name, "promoted_seq": promoted.seq }),
        ),
        (Some(promoted), Some(period)) => {
            let evidence = serde_json::json!({
                "stage": previous.name,
                "promoted_seq": promoted.seq,
                "live_since_seq": period.since.seq,
                "live_until_seq": period.until.as_ref().map(|m| m.seq),
                "ended_by": period.ended_by,
            });
            match (&period.until, period.ended_by) {
                (None, _) => {
                    verdict(true, format!("live in {} since seq {}", previous.name, period.since.seq), evidence)
                }
                (Some(until), Some(PeriodEnd::RolledBack)) => {
                    verdict(false, format!("{} rolled away from it (seq {})", previous.name, until.seq), evidence)
                }
                (Some(until), _) => verdict(
                    true,
                    format!(
                        "live in {} from seq {} until a later promotion replaced it (seq {})",
                        previous.name, period.since.seq, until.seq
                    ),
                    evidence,
                ),
            }
        }
    }
}

/// Soak: the digest's most recent continuous period live in the previous stage lasted, or lasts, long enough.
fn soak(
    pipeline: &Pipeline,
    previous: Option<&Stage>,
    digest: &Digest,
    view: &View,
    clock: &Clock,
    needed: Duration,
    written: &str,
) -> GateVerdict {
    let gate = format!("soak {written}");
    let Some(previous) = previous else {
        return GateVerdict {
            gate,
            passed: false,
            detail: "the first stage has no previous stage to soak in".into(),
            evidence: serde_json::Value::Null,
        };
    };
    let there = view.image_stage(&pipeline.name, &previous.name, digest);
    let Some(period) = there.live.as_ref() else {
        return GateVerdict {
            gate,
            passed: false,
            detail: format!("never live in {}", previous.name),
            evidence: serde_json::Value::Null,
        };
    };
    let live_for = match &period.until {
        None => clock::elapsed_since(clock, &period.since.time).unwrap_or_default(),
        Some(until) => match (clock::parse(&period.since.time), clock::parse(&until.time)) {
            (Some(since), Some(until)) => until.duration_since(since).unwrap_or_default(),
            _ => Duration::ZERO,
        },
    };
    let passed = live_for >= needed;
    let human = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
    let detail = match &period.until {
        None => format!("live in {} for {}, needs {}", previous.name, human(live_for), written),
        Some(_) => format!("was live in {} for {} until replaced, needs {}", previous.name, human(live_for), written),
    };
    GateVerdict {
        gate,
        passed,
        detail,
        evidence: serde_json::json!({
            "stage": previous.name,
            "live_since": period.since.time,
            "live_until": period.until.as_ref().map(|m| &m.time),
            "live_for_secs": live_for.as_secs(),
            "needed_secs": needed.as_secs(),
        }),
    }
}

/// `excluded` is the promoter when the gate has `distinct-from-promoter`: their own approval does not count.
fn approvals(
    pipeline: &Pipeline,
    stage: &Stage,
    digest: &Digest,
    view: &View,
    count: u32,
    approvers: &[String],
    excluded: Option<&str>,
) -> GateVerdict {
    let given = view.image_stage(&pipeline.name, &stage.name, digest).approvals;
    let counted: Vec<(&String, u64)> = given
        .iter()
        .filter(|(actor, _)| approvers.is_empty() || approvers.contains(actor))
        .filter(|(actor, _)| excluded != Some(actor.as_str()))
        .map(|(a, m)| (a, m.seq))
        .collect();
    let passed = counted.len() as u32 >= count;
    let names: Vec<&str> = counted.iter().map(|(a, _)| a.as_str()).collect();
    let by = if names.is_empty() { String::new() } else { format!(" ({})", names.join(", ")) };
    let not_counted = match excluded {
        Some(promoter) if given.contains_key(promoter) => {
            format!("; {promoter} approved but is promoting, and approvers must differ from the promoter")
        }
        _ => String::new(),
    };
    let mut evidence = serde_json::json!({
        "approvals": counted.iter().map(|(a, seq)| serde_json::json!({"actor": a, "seq": seq})).collect::<Vec<_>>(),
    });
    if let Some(promoter) = excluded {
        evidence["promoter"] = serde_json::json!(promoter);
    }
    GateVerdict {
        gate: format!("approvals {count}"),
        passed,
        detail: format!("{} of {count}{by}{not_counted}", counted.len()),
        evidence,
    }
}

/// What a command gate is told about the promotion.
pub struct CommandContext<'a> {
    pub repo: &'a Repo,
    pub pipeline: &'a Pipeline,
    pub stage: &'a Stage,
    pub digest: Digest,
    pub image_ref: &'a str,
    /// Where clients reach the previous stage, as its provider says (`KILN_PREVIOUS_ENDPOINT`).
    pub previous_endpoint: Option<String>,
}

/// Runs every command gate of the stage; each passes when its command exits 0. The evidence is the output's
/// sha256 and tail, never the environment.
pub fn command_verdicts(input: &CommandContext) -> Vec<GateVerdict> {
    let mut env = check_env(input.pipeline, input.stage, input.digest, input.image_ref);
    if let Some(previous) = &input.previous_endpoint {
        env.push(("KILN_PREVIOUS_ENDPOINT", previous.clone()));
    }
    input
        .stage
        .gates
        .iter()
        .filter_map(|gate| match gate {
            Gate::Command { argv, program, timeout } => Some(
                run_check(input.repo, argv, program, *timeout, &env)
                    .into_verdict(format!("command {}", argv.join(" "))),
            ),
            _ => None,
        })
        .collect()
}

/// What every check command (gate or verification window) is told: the pipeline, stage, digest and image ref.
pub fn check_env(pipeline: &Pipeline, stage: &Stage, digest: Digest, image_ref: &str) -> Vec<(&'static str, String)> {
    vec![
        ("KILN_PIPELINE", pipeline.name.clone()),
        ("KILN_STAGE", stage.name.clone()),
        ("KILN_DIGEST", digest.to_string()),
        ("KILN_IMAGE_REF", image_ref.to_string()),
    ]
}

/// The outcome of one check command (a command gate, or a verification-window check), with its evidence: exit
/// code, the output's sha256 and tail, how long it ran.
#[derive(Debug, Clone)]
pub struct CheckOutcome {
    pub passed: bool,
    pub detail: String,
    pub evidence: serde_json::Value,
}

impl CheckOutcome {
    pub fn into_verdict(self, gate: String) -> GateVerdict {
        GateVerdict { gate, passed: self.passed, detail: self.detail, evidence: self.evidence }
    }
}

/// Runs `argv` from the repository root with `env` added, bounded by `timeout`.
pub fn run_check(
    repo: &Repo,
    argv: &[String],
    program: &CommandProgram,
    timeout: Duration,
    env: &[(&str, String)],
) -> CheckOutcome {
    let program_path = match program {
        CommandProgram::Script(path) => path.absolute.clone().into_os_string(),
        CommandProgram::OnPath(name) => name.into(),
    };
    let mut command = Command::new(&program_path);
    command.args(&argv[1..]).current_dir(repo.root());
    for (name, value) in env {
        command.env(name, value);
    }
    match process::run(&mut command, timeout, None) {
        Err(err) => CheckOutcome {
            passed: false,
            detail: format!("could not run {}: {err}", argv[0]),
            evidence: serde_json::Value::Null,
        },
        Ok(done) => {
            let detail = if done.success() {
                "exited 0".to_string()
            } else {
                match last_line(&done.tail) {
                    line if line.is_empty() => format!("{} (no output)", done.failure_reason(timeout)),
                    line => format!("{}: {line}", done.failure_reason(timeout)),
                }
            };
            CheckOutcome {
                passed: done.success(),
                detail,
                evidence: serde_json::json!({
                    "exit_code": done.code,
                    "output_sha256": done.output_sha256,
                    "output_tail": tail_of(&done.tail, EVIDENCE_TAIL),
                    "elapsed_ms": done.elapsed.as_millis() as u64,
                }),
            }
        }
    }
}

fn tail_of(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn last_line(text: &str) -> String {
    text.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or("").chars().take(200).collect()
}
