//! `kiln gc`: delete the images no stage can roll back to (never one that reached the last stage).

use clap::Args;

use kiln::engine::gc::{self, GcReport};

use super::Ctx;

#[derive(Args, Debug)]
pub struct GcArgs {
    /// List what would be deleted, and what is kept because something outside the ledger uses it; delete nothing
    #[arg(long)]
    pub dry_run: bool,
}

pub fn run(ctx: &Ctx, args: GcArgs) -> Result<(), kiln::Error> {
    let report = ctx.with_engine(|engine| gc::collect(engine, args.dry_run))?;
    ctx.out.emit(&report, || render(&report))
}

fn render(report: &GcReport) -> String {
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln::digest::Digest;
    use kiln::engine::gc::InUse;
    use kiln::provider::ImageRef;

    #[test]
    fn a_dry_run_lists_what_it_would_delete_and_what_it_keeps_in_use() {
        let [gone, used] = [&b"gone"[..], b"used"].map(Digest::of);
        let report = GcReport {
            deleted: vec![ImageRef::new(gone, "app:gone")],
            kept: 3,
            in_use: vec![InUse { digest: used, users: vec!["lt-0abc version 3".into(), "lt-0def version 1".into()] }],
            bytes_freed: 0,
            dry_run: true,
            seq: None,
        };
        assert_eq!(
            render(&report),
            format!(
                "would delete 1 image(s), kept 3\n  {} app:gone\nkept {}: used by lt-0abc version 3, lt-0def version 1",
                gone.short(),
                used.short()
            )
        );
    }
}
