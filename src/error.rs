//! The library's error type: one variant per kind of failure, each carrying what a user needs to act on it. The
//! CLI maps these to exit codes in one place (`cli/exit.rs`).

use std::path::PathBuf;

use crate::actor::BadActor;
use crate::clock::BadTime;
use crate::config::ConfigError;
use crate::digest::Digest;
use crate::digest::DigestError;
use crate::engine::recipe_key::KeyError;
use crate::ledger::{GateVerdict, LedgerError};
use crate::provider::ProviderError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error(transparent)]
    Clock(#[from] BadTime),
    #[error(transparent)]
    Actor(#[from] BadActor),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot inspect the git repository")]
    Git(#[from] git2::Error),
    #[error(
        "the work tree has uncommitted changes ({}); commit them, or pass --allow-dirty (recorded in the ledger)",
        summarize(paths)
    )]
    DirtyTree { paths: Vec<String> },
    #[error("recipe `{recipe}` does not reproduce: recorded {expected}, rebuilt {rebuilt}; first difference: {}", first_difference.as_deref().unwrap_or("unknown"))]
    NotReproducible { recipe: String, expected: Digest, rebuilt: Digest, first_difference: Option<String> },
    #[error("{}", refused(*action, stage, digest.as_ref(), gates))]
    Refused { action: Refusal, stage: String, digest: Option<Digest>, gates: Vec<GateVerdict> },
    #[error("stage {stage} is busy: deployment {deploy_id} by {holder} holds its lease until {until}")]
    Busy { stage: String, holder: String, until: String, deploy_id: String },
    #[error(
        "deployment {deploy_id} to {stage} was taken over by {by} after this kiln's lease ran out; it stopped \
         without changing anything more"
    )]
    TakenOver { stage: String, deploy_id: String, by: String },
    #[error("deployment to {stage} failed: {reason}; {aftermath}{}", log_tail.as_deref().map(|t| format!("\n--- instance log ---\n{}", t.trim_end())).unwrap_or_default())]
    DeployFailed {
        stage: String,
        group: String,
        reason: String,
        /// What the stage serves now, as it really is ("group … kept serving", "traffic moved back to …").
        aftermath: String,
        log_tail: Option<String>,
    },
    #[error("the provider has drifted from the ledger:{}", drift.iter().map(|d| format!("\n  - {}: {}", d.subject, d.problem)).collect::<String>())]
    Drift { drift: Vec<crate::engine::drift::Drift> },
    /// A drill ran and the stage did not hold its invariant; `kiln drill` printed the drill's report already.
    #[error("drill {kind} on {stage} failed: {reason}")]
    DrillFailed { stage: String, kind: String, reason: String },
    /// A gate refused and the command already printed its verdicts (`promote --plan`, `run`).
    #[error("{message}")]
    RefusedAsShown { message: String },
    #[error("cannot encode {what} as JSON")]
    Encode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("{what} is not implemented yet")]
    NotYet { what: String },
    #[error("{message}")]
    Usage { message: String },
    /// SIGINT or SIGTERM arrived; `aftermath` says what was stopped, cleaned up or left for the next kiln.
    #[error("interrupted during {during}; {aftermath}")]
    Interrupted { during: String, aftermath: String },
    #[error("cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// What a gate refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Refusal {
    Promotion,
    Deployment,
    Rollback,
}

impl Refusal {
    pub fn noun(self) -> &'static str {
        match self {
            Refusal::Promotion => "promotion",
            Refusal::Deployment => "deployment",
            Refusal::Rollback => "rollback",
        }
    }
}

fn refused(action: Refusal, stage: &str, digest: Option<&Digest>, gates: &[GateVerdict]) -> String {
    let noun = action.noun();
    match digest {
        Some(digest) => format!("{noun} of {} to {stage} refused:{}", digest.short(), failing(gates)),
        // No candidate digest (nothing upstream): say so instead of naming "nothing" as if it were an image.
        None => format!("{noun} to {stage} refused, there is no image to take there:{}", failing(gates)),
    }
}

fn failing(gates: &[GateVerdict]) -> String {
    gates.iter().filter(|g| !g.passed).map(|g| format!("\n  - {}: {}", g.gate, g.detail)).collect()
}

fn summarize(paths: &[String]) -> String {
    let shown: Vec<&str> = paths.iter().take(5).map(String::as_str).collect();
    let more = paths.len().saturating_sub(shown.len());
    if more > 0 {
        format!("{} and {more} more", shown.join(", "))
    } else {
        shown.join(", ")
    }
}

impl Error {
    /// Structured details for `--json` error documents.
    pub fn json_details(&self) -> Option<serde_json::Value> {
        match self {
            Error::Refused { action, stage, digest, gates } => Some(serde_json::json!({
                "refused": action, "stage": stage, "digest": digest, "gates": gates_json(gates),
            })),
            Error::NotReproducible { recipe, expected, rebuilt, first_difference } => Some(serde_json::json!({
                "recipe": recipe, "expected": expected, "rebuilt": rebuilt, "first_difference": first_difference,
            })),
            Error::Drift { drift } => Some(serde_json::json!({ "drift": drift })),
            _ => None,
        }
    }

    pub fn usage(message: impl Into<String>) -> Error {
        Error::Usage { message: message.into() }
    }

    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}

/// Gate verdicts as `--json` output shows them: `evidence` is always present, `null` when there is none. (The
/// ledger's encoding omits a null evidence, and changing it would change the hashes of recorded events.)
pub fn gates_json(gates: &[GateVerdict]) -> serde_json::Value {
    gates
        .iter()
        .map(|g| serde_json::json!({ "gate": g.gate, "passed": g.passed, "detail": g.detail, "evidence": g.evidence }))
        .collect()
}
