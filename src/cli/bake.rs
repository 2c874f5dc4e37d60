//! `kiln bake`: build the pipeline's image, or reuse the one whose recipe key matches.

use clap::Args;

use kiln::engine::bake::{self, BakeOptions, BakePlan, BakeReport};

use super::Ctx;

#[derive(Args, Debug)]
pub struct BakeArgs {
    /// Rebuild from scratch into a temporary store and fail (exit 6) if the digest differs
    #[arg(long)]
    pub check: bool,
    /// Build even if an image with this recipe key exists
    #[arg(long)]
    pub no_cache: bool,
    /// Bake even when the work tree has uncommitted changes (recorded in the ledger)
    #[arg(long)]
    pub allow_dirty: bool,
    /// List the provider calls the bake would make, in order, and make none
    #[arg(long, conflicts_with = "check")]
    pub plan: bool,
    /// Resolve the base image again (AWS: the newest AMI matching `base`, written to kiln.lock); the local
    /// provider has no base to resolve
    #[arg(long)]
    pub update_base: bool,
}

pub fn run(ctx: &Ctx, args: BakeArgs) -> Result<(), kiln::Error> {
    // Ctrl-C must stop the running step's whole process group and remove the work directory, which an immediate
    // exit would leave behind.
    super::catch_interrupts()?;
    let options = BakeOptions {
        no_cache: args.no_cache,
        allow_dirty: args.allow_dirty,
        check: args.check,
        update_base: args.update_base,
    };
    if args.plan {
        let plan = ctx.with_engine(|engine| bake::plan(engine, &options))?;
        return ctx.out.emit(&plan, || render_plan(&plan));
    }
    let report = ctx.with_engine(|engine| bake::bake(engine, &options))?;
    let image = report.image();
    let doc = serde_json::json!({
        "digest": image.digest,
        "recipe_key": image.recipe_key,
        "image_ref": image.image_ref,
        "recipe": image.recipe,
        "cached": image.cached,
        "parent": image.parent,
        "commit": report.commit,
        "dirty": report.dirty,
        "reproducible": report.reproducible,
        "files_hashed": report.files_hashed,
        "chain": report.chain,
    });
    ctx.out.emit(&doc, || render(&report))
}

fn render_plan(plan: &BakePlan) -> String {
    let mut out = String::new();
    let numbered = |out: &mut String, calls: &[String]| {
        for (n, call) in calls.iter().enumerate() {
            out.push_str(&format!("  {}. {call}\n", n + 1));
        }
    };
    if !plan.prepare.is_empty() {
        out.push_str("before any recipe key:\n");
        numbered(&mut out, &plan.prepare);
    }
    for recipe in &plan.plan {
        let key = match (&recipe.recipe_key, &recipe.unknown_because) {
            (Some(key), _) => format!("recipe key {}", key.short()),
            (None, Some(why)) => format!("recipe key unknown: {why}"),
            (None, None) => "recipe key unknown".to_string(),
        };
        let cached = match &recipe.digest {
            Some(digest) => format!(", cached as {}", digest.short()),
            None => String::new(),
        };
        out.push_str(&format!("{} ({key}{cached}):\n", recipe.recipe));
        numbered(&mut out, &recipe.calls);
    }
    out.push_str("plan only: nothing was built, called or recorded\n");
    out
}

pub fn render(report: &BakeReport) -> String {
    let mut out = String::new();
    for image in &report.chain {
        let how = if image.cached { "cached" } else { "baked " };
        out.push_str(&format!("{how} {:<12} {} ({})\n", image.recipe, image.digest, image.image_ref));
    }
    if report.reproducible == Some(true) {
        out.push_str("reproducible: a rebuild from scratch gave the same digests\n");
    }
    out
}
