//! Gates: the checks that guard entry to a stage. Ledger gates (upstream, soak, approvals, not-revoked) are pure
//! functions of the view, so a writer can re-judge them against whatever head it appends to; command gates run
//! once per promotion attempt because they do not depend on the ledger.

use std::process::Command;
use std::time::Duration;

use crate::clock::{self, Clock};
use crate::config::pipeline::CommandProgram;
use crate::config::{Gate, Pipeline, Repo, Stage, StageDeploy};
use crate::digest::Digest;
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

/// The digest reached the previous stage: promoted there, and, once it has been deployed there, healthy.
fn upstream(pipeline: &Pipeline, previous: &Stage, digest: &Digest, view: &View) -> GateVerdict {
    let there = view.image_stage(&pipeline.name, &previous.name, digest);
    let gate = "upstream".to_string();
    match (&there.promoted, &there.deployed) {
        (Some(promoted), Some(deployed)) => GateVerdict {
            gate,
            passed: true,
            detail: format!(
                "promoted to {} (seq {}) and deployed healthy there (seq {})",
                previous.name, promoted.seq, deployed.seq
            ),
            evidence: serde_json::json!({ "stage": previous.name, "promoted_seq": promoted.seq, "deployed_seq": deployed.seq }),
        },
        (Some(promoted), None) => GateVerdict {
            gate,
            passed: false,
            detail: format!(
                "promoted to {} (seq {}) but no deployment of it has finished healthy there",
                previous.name, promoted.seq
            ),
            evidence: serde_json::json!({ "stage": previous.name, "promoted_seq": promoted.seq }),
        },
        (None, _) => GateVerdict {
            gate,
            passed: false,
            detail: format!("{} was never promoted to {}", digest.short(), previous.name),
            evidence: serde_json::json!({ "stage": previous.name }),
        },
    }
}

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
    let Some(since) = there.deployed.as_ref() else {
        return GateVerdict {
            gate,
            passed: false,
            detail: format!("not live in {}", previous.name),
            evidence: serde_json::Value::Null,
        };
    };
    let live_for = clock::elapsed_since(clock, &since.time).unwrap_or_default();
    let passed = live_for >= needed;
    let human = |d: Duration| humantime::format_duration(Duration::from_secs(d.as_secs())).to_string();
    GateVerdict {
        gate,
        passed,
        detail: format!("live in {} for {}, needs {}", previous.name, human(live_for), written),
        evidence: serde_json::json!({ "stage": previous.name, "live_since": since.time, "live_for_secs": live_for.as_secs(), "needed_secs": needed.as_secs() }),
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
}

/// Runs every command gate of the stage; each passes when its command exits 0. The evidence is the output's
/// sha256 and tail, never the environment.
pub fn command_verdicts(input: &CommandContext) -> Vec<GateVerdict> {
    let index = input.pipeline.stage_index(&input.stage.name).unwrap_or(0);
    let previous_endpoint = index.checked_sub(1).and_then(|i| endpoint(&input.pipeline.stages[i]));
    input
        .stage
        .gates
        .iter()
        .filter_map(|gate| match gate {
            Gate::Command { argv, program, timeout } => {
                Some(run_command(input, argv, program, *timeout, previous_endpoint.as_deref()))
            }
            _ => None,
        })
        .collect()
}

/// The stage's traffic endpoint, when kiln knows it.
pub fn endpoint(stage: &Stage) -> Option<String> {
    match &stage.deploy {
        StageDeploy::Local { port } => Some(format!("http://127.0.0.1:{port}")),
        StageDeploy::Aws { .. } => None,
    }
}

fn run_command(
    input: &CommandContext,
    argv: &[String],
    program: &CommandProgram,
    timeout: Duration,
    previous: Option<&str>,
) -> GateVerdict {
    let gate = format!("command {}", argv.join(" "));
    let program_path = match program {
        CommandProgram::Script(path) => path.absolute.clone().into_os_string(),
        CommandProgram::OnPath(name) => name.into(),
    };
    let mut command = Command::new(&program_path);
    command
        .args(&argv[1..])
        .current_dir(input.repo.root())
        .env("KILN_PIPELINE", &input.pipeline.name)
        .env("KILN_STAGE", &input.stage.name)
        .env("KILN_DIGEST", input.digest.to_string())
        .env("KILN_IMAGE_REF", input.image_ref);
    if let Some(previous) = previous {
        command.env("KILN_PREVIOUS_ENDPOINT", previous);
    }
    match process::run(&mut command, timeout, None) {
        Err(err) => GateVerdict {
            gate,
            passed: false,
            detail: format!("could not run {}: {err}", argv[0]),
            evidence: serde_json::Value::Null,
        },
        Ok(done) => {
            let detail = if done.success() {
                "exited 0".to_string()
            } else {
                format!("{}: {}", done.failure_reason(timeout), last_line(&done.tail))
            };
            GateVerdict {
                gate,
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
