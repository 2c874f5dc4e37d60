//! `kiln status`: per stage, what is promoted and live, and warnings.

use clap::Args;

use kiln::engine::lineage;

use super::Ctx;

#[derive(Args, Debug)]
pub struct StatusArgs {}

pub fn run(ctx: &Ctx, _args: StatusArgs) -> Result<(), kiln::Error> {
    let stages = ctx.with_engine(lineage::status)?;
    let pipeline = ctx.pipeline()?.name.clone();
    let doc = serde_json::json!({ "pipeline": pipeline, "stages": stages });
    ctx.out.emit(&doc, || {
        let mut out = format!("pipeline {pipeline}\n");
        for s in &stages {
            out.push_str(&format!("{}\n", s.stage));
            match &s.promoted {
                Some(p) => out.push_str(&format!(
                    "  promoted  {} {} by {} at {} (seq {})\n",
                    p.digest.short(),
                    p.image_ref.as_deref().unwrap_or("-"),
                    p.actor,
                    p.time,
                    p.seq
                )),
                None => out.push_str("  promoted  -\n"),
            }
            match &s.live {
                Some(l) => {
                    out.push_str(&format!("  live      {} group {} since {}\n", l.digest.short(), l.group, l.since))
                }
                None => out.push_str("  live      -\n"),
            }
            if let Some(d) = &s.deploying {
                out.push_str(&format!(
                    "  deploying {} into {} (lease held by {} until {})\n",
                    d.digest.short(),
                    d.group,
                    d.holder,
                    d.lease_until
                ));
            }
            if let Some(stop) = &s.stopped {
                out.push_str(&format!(
                    "  stopped   kiln down at seq {} by {} at {}\n",
                    stop.seq, stop.actor, stop.time
                ));
            }
            if let Some(e) = &s.endpoint {
                let up = match &s.runtime {
                    Some(r) if r.endpoint_up => " (up)",
                    Some(_) => " (down)",
                    None => "",
                };
                out.push_str(&format!("  endpoint  {e}{up}\n"));
            }
            for w in &s.warnings {
                out.push_str(&format!("  WARNING   {w}\n"));
            }
        }
        out
    })
}
