//! Exit codes, the one place that maps errors to them, and how errors are printed (cause chain and hint).
//!
//! | code | meaning |
//! |---|---|
//! | 0 | ok |
//! | 1 | runtime or provider failure |
//! | 2 | invalid usage, config or input |
//! | 3 | a gate refused (a promotion, or the deployment of a revoked digest) |
//! | 4 | deployment failed; the previous group kept serving |
//! | 5 | stage busy, or concurrent write conflict after retries |
//! | 6 | verification failed (tampered ledger, drift, a drill whose invariant did not hold) |
//! | 130 | interrupted (SIGINT or SIGTERM), after cleaning up |

use std::error::Error as _;

use kiln::config::ConfigError;
use kiln::ledger::LedgerError;
use kiln::provider::ProviderError;
use kiln::Error;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    Ok = 0,
    Failure = 1,
    Invalid = 2,
    Refused = 3,
    DeployFailed = 4,
    Busy = 5,
    VerifyFailed = 6,
    Interrupted = 130,
}

impl From<Exit> for std::process::ExitCode {
    fn from(exit: Exit) -> Self {
        std::process::ExitCode::from(exit as u8)
    }
}

pub fn classify(err: &Error) -> Exit {
    match err {
        Error::Config(_)
        | Error::Digest(_)
        | Error::Clock(_)
        | Error::Actor(_)
        | Error::Usage { .. }
        | Error::Provider(ProviderError::Invalid { .. }) => Exit::Invalid,
        Error::Ledger(LedgerError::Tampered { .. }) => Exit::VerifyFailed,
        Error::Ledger(LedgerError::Contended { .. }) => Exit::Busy,
        Error::DirtyTree { .. } | Error::Key(kiln::engine::recipe_key::KeyError::Untracked { .. }) => Exit::Invalid,
        Error::Interrupted { .. } => Exit::Interrupted,
        Error::Refused { .. } | Error::RefusedAsShown { .. } => Exit::Refused,
        Error::Busy { .. } | Error::TakenOver { .. } => Exit::Busy,
        Error::DeployFailed { .. } => Exit::DeployFailed,
        Error::NotReproducible { .. }
        | Error::Drift { .. }
        | Error::DrillFailed { .. }
        | Error::Provider(ProviderError::Drift { .. }) => Exit::VerifyFailed,
        Error::Ledger(_)
        | Error::NotYet { .. }
        | Error::Encode { .. }
        | Error::Io { .. }
        | Error::Provider(_)
        | Error::Key(_)
        | Error::Git(_) => Exit::Failure,
    }
}

/// What to do next, when kiln can tell.
fn hint(err: &Error) -> Option<String> {
    match err {
        Error::Config(ConfigError::AmbiguousPipeline { .. }) => {
            Some("pass --pipeline NAME or set KILN_PIPELINE".into())
        }
        Error::Config(ConfigError::NoPipeline { .. }) => {
            Some("run kiln in a repository with pipelines/<name>.toml and images/<name>.toml (or pass -C DIR)".into())
        }
        Error::Ledger(LedgerError::Tampered { .. }) => {
            Some("run `kiln verify` to check the whole chain; restore the ledger from a copy you trust".into())
        }
        Error::Ledger(LedgerError::Contended { .. }) => Some("other writers were busy; retry the command".into()),
        Error::Actor(_) => Some(format!(
            "set KILN_ACTOR to a name of at most {} characters without control characters",
            kiln::actor::MAX_LEN
        )),
        Error::NotYet { .. } => {
            Some("pipelines with provider = \"aws\" come with the AWS provider (the s3:// ledger works already)".into())
        }
        _ => None,
    }
}

/// The error and its causes, outermost first, skipping causes whose text the error already shows.
pub fn chain(err: &Error) -> Vec<String> {
    let mut lines = vec![err.to_string()];
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !lines.iter().any(|l| l.contains(&text)) {
            lines.push(text);
        }
        source = cause.source();
    }
    lines
}

/// Prints what clap rejected: help and version as clap prints them (exit 0), anything else as clap words it on
/// stderr plus, with --json, the same failure document as [`report`] on stdout (exit 2).
pub fn report_usage(err: clap::Error, json: bool) -> Exit {
    if !err.use_stderr() {
        // --help and --version: plain text on stdout, never a JSON document.
        let _ = err.print();
        return Exit::Ok;
    }
    let _ = err.print();
    if json {
        // clap's first paragraph is the error; required arguments are listed on the lines under it.
        let rendered = err.render().to_string();
        let first: Vec<&str> =
            rendered.lines().skip_while(|l| l.trim().is_empty()).take_while(|l| !l.trim().is_empty()).collect();
        let error = first.iter().map(|l| l.trim()).collect::<Vec<_>>().join(" ");
        let error = error.strip_prefix("error: ").unwrap_or(&error).trim();
        let doc = serde_json::json!({
            "ok": false,
            "exit_code": Exit::Invalid as u8,
            "error": if error.is_empty() { "invalid arguments" } else { error },
            "causes": [],
            "hint": "run `kiln --help` or `kiln <command> --help`",
            "details": serde_json::Value::Null,
        });
        super::output::print_stdout(&format!("{doc:#}\n"));
    }
    Exit::Invalid
}

/// Prints the error to stderr (and, with --json, a document to stdout); returns the exit code.
pub fn report(err: &Error, json: bool) -> Exit {
    let exit = classify(err);
    let lines = chain(err);
    eprintln!("error: {}", lines[0]);
    for cause in &lines[1..] {
        eprintln!("  caused by: {cause}");
    }
    let hint = hint(err);
    if let Some(hint) = &hint {
        eprintln!("  hint: {hint}");
    }
    // A plan's document, verdicts included, is already on stdout.
    if json && !matches!(err, Error::RefusedAsShown { .. } | Error::DrillFailed { .. }) {
        let doc = serde_json::json!({
            "ok": false,
            "exit_code": exit as u8,
            "error": lines[0],
            "causes": &lines[1..],
            "hint": hint,
            "details": err.json_details(),
        });
        super::output::print_stdout(&format!("{doc:#}\n"));
    }
    exit
}
