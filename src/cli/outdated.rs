//! `kiln outdated`: images live or promoted in any stage of any pipeline here that are built on a base image a
//! newer bake of the same base recipe has superseded.

use clap::Args;

use kiln::config::{pipeline, LedgerLocation, Pipeline, PIPELINES_DIR};
use kiln::engine::outdated::{outdated, Outdated};
use kiln::ledger::Ledger;

use super::Ctx;

#[derive(Args, Debug)]
pub struct OutdatedArgs {}

pub fn run(ctx: &Ctx, _args: OutdatedArgs) -> Result<(), kiln::Error> {
    let mut found = Vec::new();
    for name in pipeline_names(ctx)? {
        let pipeline = pipeline::load(&ctx.repo, &name)?;
        let view = ledger_of(ctx, &pipeline)?.view()?;
        let stages: Vec<String> = pipeline.stages.iter().map(|s| s.name.clone()).collect();
        found.extend(outdated(&view, &pipeline.name, &stages));
        if let Some(err) = view.take_failure() {
            return Err(err.into());
        }
    }
    ctx.out.emit(&serde_json::json!({ "outdated": found }), || render(&found))
}

/// `--pipeline`'s, else every pipeline in pipelines/, by name.
fn pipeline_names(ctx: &Ctx) -> Result<Vec<String>, kiln::Error> {
    if let Some(name) = &ctx.global.pipeline {
        return Ok(vec![name.clone()]);
    }
    let dir = ctx.repo.root().join(PIPELINES_DIR);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(kiln::Error::Io { path: dir, source: err }),
    };
    let mut names = Vec::new();
    for entry in entries {
        let path = entry.map_err(kiln::Error::io(&dir))?.path();
        if path.extension().is_some_and(|e| e == "toml") {
            if let Some(stem) = path.file_stem().and_then(|s| s.to_str()) {
                names.push(stem.to_string());
            }
        }
    }
    names.sort();
    Ok(names)
}

/// The pipeline's ledger: `--ledger`/`KILN_LEDGER` when given (for every pipeline), else its own.
fn ledger_of(ctx: &Ctx, pipeline: &Pipeline) -> Result<Ledger, kiln::Error> {
    let location = match &ctx.global.ledger {
        Some(url) => LedgerLocation::parse(&ctx.repo, url).map_err(|m| kiln::Error::usage(format!("--ledger: {m}")))?,
        None => pipeline.ledger.clone(),
    };
    match location {
        LedgerLocation::Dir(dir) => Ok(Ledger::open_dir(&dir)),
        LedgerLocation::S3 { bucket, prefix } => {
            let ledger = kiln::provider::aws::open_ledger(&bucket, &prefix, pipeline.aws.as_ref(), &ctx.state_dir())
                .map_err(kiln::ledger::LedgerError::from)?;
            Ok(ledger)
        }
    }
}

fn render(found: &[Outdated]) -> String {
    if found.is_empty() {
        return "nothing outdated".into();
    }
    let mut out = format!(
        "{:<20}  {:<12}  {:<16}  {:<12}  {:<12}  {}\n",
        "STAGE", "DIGEST", "AS", "BASE RECIPE", "BUILT ON", "NEWER"
    );
    for o in found {
        let role = match (o.live, o.promoted) {
            (true, true) => "live, promoted",
            (true, false) => "live",
            _ => "promoted",
        };
        out.push_str(&format!(
            "{:<20}  {:<12}  {:<16}  {:<12}  {:<12}  {}\n",
            format!("{}/{}", o.pipeline, o.stage),
            o.digest.short(),
            role,
            o.ancestor_recipe,
            o.ancestor_digest.short(),
            o.newer_digest.short()
        ));
    }
    out
}
