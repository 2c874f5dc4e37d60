//! `kiln gc`: delete the images no stage can roll back to (never one that reached the last stage).

use clap::Args;

use kiln::engine::gc;

use super::Ctx;

#[derive(Args, Debug)]
pub struct GcArgs {
    /// List what would be deleted, delete nothing
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(ctx: &Ctx, args: GcArgs) -> Result<(), kiln::Error> {
    let report = ctx.with_engine(|engine| gc::collect(engine, args.dry_run))?;
    ctx.out.emit(&report, || {
        let verb = if report.dry_run { "would delete" } else { "deleted" };
        let mut out = format!("{verb} {} image(s), kept {}", report.deleted.len(), report.kept);
        if !report.dry_run && report.bytes_freed > 0 {
            out.push_str(&format!(", freed {:.1} MB", report.bytes_freed as f64 / 1e6));
        }
        for image in &report.deleted {
            out.push_str(&format!("\n  {} {}", image.digest.short(), image.image_ref));
        }
        for image in &report.in_use {
            out.push_str(&format!("\nkept {}: used by {}", image.digest.short(), image.users.join(", ")));
        }
        out
    })
}
