//! `kiln lineage`: commit → recipe key → parent chain → stages reached (gates, approvals) → deployments, as text,
//! JSON, Graphviz dot or Mermaid.

use clap::Args;

use kiln::engine::lineage::{self, ImageSummary, Lineage, Step};

use super::Ctx;

#[derive(Args, Debug)]
pub struct LineageArgs {
    /// A digest (or unique prefix) or a stage name
    pub target: String,
    /// Output format
    #[arg(long, value_enum, default_value_t = LineageFormat::Text)]
    pub format: LineageFormat,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineageFormat {
    Text,
    Json,
    Dot,
    Mermaid,
}

pub fn run(ctx: &Ctx, args: LineageArgs) -> Result<(), kiln::Error> {
    let found = ctx.with_engine(|engine| lineage::lineage(engine, &args.target))?;
    if ctx.out.json || args.format == LineageFormat::Json {
        let text = serde_json::to_string_pretty(&found)
            .map_err(|source| kiln::Error::Encode { what: "the lineage", source })?;
        super::output::print_stdout(&format!("{text}\n"));
        return Ok(());
    }
    let rendered = match args.format {
        LineageFormat::Text | LineageFormat::Json => text(&found),
        LineageFormat::Dot => dot(&found),
        LineageFormat::Mermaid => mermaid(&found),
    };
    super::output::print_stdout(&rendered);
    Ok(())
}

fn image_line(i: &ImageSummary) -> String {
    let commit = i.commit.as_deref().unwrap_or("no commit");
    let dirty = if i.dirty { " (dirty tree)" } else { "" };
    format!(
        "{} {}\n    ref {}  recipe key {}\n    baked {} by {} (seq {}) from commit {commit}{dirty}\n",
        i.recipe, i.digest, i.image_ref, i.recipe_key, i.baked_at, i.baked_by, i.baked_seq
    )
}

fn text(l: &Lineage) -> String {
    let mut out = format!("image {}", image_line(&l.image));
    if let Some(reason) = &l.revoked {
        out.push_str(&format!("    REVOKED: {reason}\n"));
    }
    for p in &l.parents {
        out.push_str(&format!("parent {}", image_line(p)));
    }
    for s in &l.stages {
        out.push_str(&format!("stage {}\n", s.stage));
        for a in &s.approvals {
            let note = a.note.as_deref().map(|n| format!(": {n}")).unwrap_or_default();
            out.push_str(&format!(
                "    approved by {} at {} (seq {}){}{note}\n",
                a.at.actor,
                a.at.time,
                a.at.seq,
                pinned(&a.at)
            ));
        }
        for p in &s.promotions {
            out.push_str(&format!(
                "    promoted by {} at {} (seq {}){}\n",
                p.at.actor,
                p.at.time,
                p.at.seq,
                pinned(&p.at)
            ));
            for g in &p.gates {
                out.push_str(&format!("      {} {}: {}\n", if g.passed { "ok  " } else { "FAIL" }, g.gate, g.detail));
            }
        }
        for d in &s.deployments {
            let kind = if d.rollback { "rollback" } else { "deploy" };
            let reason = d.reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default();
            let clock = [Some(&d.started), d.ended.as_ref()].into_iter().flatten().map(pinned).find(|p| !p.is_empty());
            out.push_str(&format!(
                "    {kind} {} into {} {} (seq {}){}{reason}\n",
                d.deploy_id,
                d.group,
                d.result,
                d.started.seq,
                clock.unwrap_or_default()
            ));
        }
    }
    out
}

/// A mark on a step whose time was chosen with `KILN_NOW` rather than read from a clock.
fn pinned(step: &Step) -> String {
    match &step.clock {
        Some(clock) if clock.pinned => format!(" [PINNED CLOCK, really written {}]", clock.real_time),
        _ => String::new(),
    }
}

fn quote(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"")
}

/// The images from the root ancestor down to the image itself.
fn root_first(l: &Lineage) -> Vec<&ImageSummary> {
    l.parents.iter().rev().chain(std::iter::once(&l.image)).collect()
}

fn image_node(image: &ImageSummary) -> String {
    format!("img_{}", image.digest.short())
}

fn stage_node(stage: &str) -> String {
    format!("stage_{}", stage.replace('-', "_"))
}

fn short_commit(image: &ImageSummary) -> &str {
    image.commit.as_deref().map(|c| &c[..c.len().min(12)]).unwrap_or("none")
}

fn dot(l: &Lineage) -> String {
    let mut out = String::from("digraph lineage {\n  rankdir=LR;\n  node [shape=box, fontname=\"monospace\"];\n");
    let mut previous: Option<String> = None;
    for image in root_first(l) {
        let id = image_node(image);
        let commit_id = format!("commit_{}", image.digest.short());
        let commit = short_commit(image);
        out.push_str(&format!("  {commit_id} [label=\"commit {}\", shape=note];\n", quote(commit)));
        out.push_str(&format!(
            "  {id} [label=\"{}\\n{}\\nkey {}\"];\n",
            quote(&image.recipe),
            image.digest.short(),
            image.recipe_key.short()
        ));
        out.push_str(&format!("  {commit_id} -> {id} [label=\"baked\"];\n"));
        if let Some(parent) = previous {
            out.push_str(&format!("  {parent} -> {id} [label=\"parent of\"];\n"));
        }
        previous = Some(id);
    }
    let mut from = image_node(&l.image);
    for s in &l.stages {
        let id = stage_node(&s.stage);
        let approvals = if s.approvals.is_empty() {
            String::new()
        } else {
            format!(
                "\\napproved by {}",
                quote(&s.approvals.iter().map(|a| a.at.actor.as_str()).collect::<Vec<_>>().join(", "))
            )
        };
        let deployed = s.deployments.iter().filter(|d| d.result == "finished").count();
        out.push_str(&format!(
            "  {id} [label=\"{}{approvals}\\n{deployed} deployment(s)\", shape=ellipse];\n",
            quote(&s.stage)
        ));
        out.push_str(&format!("  {from} -> {id} [label=\"promoted\"];\n"));
        from = id;
    }
    out.push_str("}\n");
    out
}

fn mermaid(l: &Lineage) -> String {
    let mut out = String::from("flowchart LR\n");
    let mut previous: Option<String> = None;
    for image in root_first(l) {
        let id = image_node(image);
        let commit = short_commit(image);
        out.push_str(&format!(
            "  commit_{}[\"commit {commit}\"] --> {id}[\"{}<br/>{}\"]\n",
            image.digest.short(),
            image.recipe,
            image.digest.short()
        ));
        if let Some(parent) = previous {
            out.push_str(&format!("  {parent} --> {id}\n"));
        }
        previous = Some(id);
    }
    let mut from = image_node(&l.image);
    for s in &l.stages {
        let id = stage_node(&s.stage);
        out.push_str(&format!("  {from} --> {id}([\"{}\"])\n", s.stage));
        from = id;
    }
    out
}
