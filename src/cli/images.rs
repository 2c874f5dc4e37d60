//! `kiln images`: list baked images, oldest first.

use clap::Args;

use super::Ctx;

#[derive(Args, Debug)]
pub struct ImagesArgs {}

pub fn run(ctx: &Ctx, _args: ImagesArgs) -> Result<(), kiln::Error> {
    let ledger = ctx.ledger()?;
    let view = ledger.view()?;
    let images = view.images();
    let doc: Vec<serde_json::Value> = images
        .iter()
        .map(|(digest, r)| {
            serde_json::json!({
                "digest": digest,
                "recipe": r.recipe,
                "recipe_key": r.recipe_key,
                "image_ref": r.image_ref,
                "provider": r.provider,
                "parent": r.parent,
                "commit": r.commit,
                "dirty": r.dirty,
                "time": r.time,
                "actor": r.actor,
                "revoked": view.revocation(digest).map(|rev| rev.reason),
                "deleted": r.deleted,
            })
        })
        .collect();
    ctx.out.emit(&serde_json::json!({ "images": doc }), || {
        if images.is_empty() {
            return "no images baked yet".into();
        }
        let mut out = format!(
            "{:<12}  {:<12}  {:<12}  {:<10}  {:<24}  {}\n",
            "RECIPE", "DIGEST", "KEY", "COMMIT", "BAKED", "PARENT"
        );
        for (digest, r) in &images {
            let commit = r.commit.as_deref().map(|c| &c[..c.len().min(10)]).unwrap_or("-");
            let dirty = if r.dirty { "+" } else { "" };
            let parent = r.parent.map(|p| p.short()).unwrap_or_else(|| "-".into());
            let revoked = if view.revocation(digest).is_some() { "  REVOKED" } else { "" };
            let revoked = if r.deleted { format!("{revoked}  (deleted by gc)") } else { revoked.to_string() };
            out.push_str(&format!(
                "{:<12}  {:<12}  {:<12}  {:<10}  {:<24}  {parent}{revoked}\n",
                r.recipe,
                digest.short(),
                r.recipe_key.short(),
                format!("{commit}{dirty}"),
                r.time
            ));
        }
        out
    })
}
