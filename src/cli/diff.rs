//! `kiln diff A B`: what replacing image B with image A changes (`kiln diff test prod`: what promoting test's image
//! to prod would change), as sections with +/-/~ markers, or `--json`.

use clap::Args;

use kiln::engine::diff::{self, Change, Diff, InputFile, Side};
use kiln::provider::RootEntry;

use super::Ctx;

#[derive(Args, Debug)]
pub struct DiffArgs {
    /// The image that would replace B: a digest (or unique prefix) or a stage (what is live there, else promoted)
    pub a: String,
    /// The image A would replace: a digest (or unique prefix) or a stage
    pub b: String,
}

pub fn run(ctx: &Ctx, args: DiffArgs) -> Result<(), kiln::Error> {
    let found = ctx.with_engine(|engine| diff::diff(engine, &args.a, &args.b))?;
    ctx.out.emit(&found, || render(&found))
}

fn marker(change: Change) -> char {
    match change {
        Change::Added => '+',
        Change::Removed => '-',
        Change::Changed => '~',
    }
}

fn side_line(letter: char, side: &Side) -> String {
    let stage = side.stage.as_deref().map(|s| format!(" (stage {s})")).unwrap_or_default();
    let commit = match &side.commit {
        Some(c) => format!("commit {}{}", &c[..c.len().min(12)], if side.dirty { ", dirty tree" } else { "" }),
        None => "no commit".into(),
    };
    let gone = if side.collected { ", collected by gc" } else { "" };
    format!("{letter} {}{stage}: recipe {}, {commit}{gone}\n", side.digest, side.recipe)
}

fn render(d: &Diff) -> String {
    let mut out = String::from("replacing B with A:\n");
    out.push_str(&side_line('A', &d.to));
    out.push_str(&side_line('B', &d.from));
    if d.same {
        out.push_str("\nno difference: A and B are the same image\n");
        return out;
    }
    let notes = |out: &mut String, notes: &[String]| {
        for note in notes {
            out.push_str(&format!("  ! {note}\n"));
        }
    };

    out.push_str("\nparent\n");
    let image = |i: &Option<diff::ImageAt>| {
        i.as_ref().map(|i| format!("{} ({})", i.digest.short(), i.recipe)).unwrap_or_else(|| "none".into())
    };
    if d.parent.changed {
        out.push_str(&format!("  ~ {} → {}\n", image(&d.parent.from), image(&d.parent.to)));
    } else {
        out.push_str(&format!("  unchanged: {}\n", image(&d.parent.to)));
    }
    out.push_str("base\n");
    if d.base.changed {
        out.push_str(&format!("  ~ {} → {}\n", image(&d.base.from), image(&d.base.to)));
    } else {
        out.push_str(&format!("  unchanged: {}\n", image(&d.base.to)));
    }

    out.push_str("\ncommits\n");
    let short = |c: &Option<String>| c.as_deref().map(|c| c[..c.len().min(12)].to_string()).unwrap_or("none".into());
    match (&d.commits.from, &d.commits.to) {
        (Some(from), Some(to)) if from == to => out.push_str(&format!("  same commit {}\n", short(&d.commits.to))),
        (Some(_), Some(_)) => out.push_str(&format!(
            "  {}..{}: {} added, {} dropped\n",
            short(&d.commits.from),
            short(&d.commits.to),
            d.commits.added_count,
            d.commits.dropped_count
        )),
        // The notes say which commit is missing and why.
        _ => {}
    }
    for (sign, lines, count) in
        [('+', &d.commits.added, d.commits.added_count), ('-', &d.commits.dropped, d.commits.dropped_count)]
    {
        for line in lines {
            out.push_str(&format!("  {sign} {} {}\n", &line.id[..line.id.len().min(12)], line.summary));
        }
        if count > lines.len() {
            out.push_str(&format!("  {sign} … and {} more\n", count - lines.len()));
        }
    }
    notes(&mut out, &d.commits.notes);

    out.push_str("\nrecipe inputs\n");
    if d.inputs.compared && d.inputs.files.is_empty() && d.inputs.steps.is_empty() {
        out.push_str("  unchanged\n");
    }
    let file = |f: &Option<InputFile>| f.as_ref().map(|f| format!("{} {}", f.kind, &f.blob[..f.blob.len().min(12)]));
    for f in &d.inputs.files {
        let detail = match f.change {
            Change::Changed => {
                format!("  ({} → {})", file(&f.from).unwrap_or_default(), file(&f.to).unwrap_or_default())
            }
            _ => String::new(),
        };
        out.push_str(&format!("  {} {}{detail}\n", marker(f.change), f.path));
    }
    for s in &d.inputs.steps {
        let step = |index: Option<usize>, text: &Option<String>| {
            format!("step {}: {}", index.map_or(0, |i| i + 1), text.as_deref().unwrap_or_default())
        };
        let line = match s.change {
            Change::Added => step(s.to_index, &s.to),
            Change::Removed => step(s.from_index, &s.from),
            Change::Changed => format!("{}\n      → {}", step(s.from_index, &s.from), step(s.to_index, &s.to)),
        };
        out.push_str(&format!("  {} {line}\n", marker(s.change)));
    }
    notes(&mut out, &d.inputs.notes);

    if !d.instance.is_empty() {
        out.push_str("\ninstance\n");
        for line in &d.instance {
            out.push_str(&format!("  ~ {line}\n"));
        }
    }

    out.push_str("\nroot filesystem\n");
    if d.root_fs.compared && d.root_fs.files.is_empty() {
        out.push_str("  no file differs\n");
    }
    for f in &d.root_fs.files {
        let detail = match (f.change, &f.from, &f.to) {
            (Change::Added, _, Some(new)) => entry(new),
            (Change::Removed, Some(old), _) => entry(old),
            (_, Some(old), Some(new)) => entry_change(old, new),
            _ => String::new(),
        };
        out.push_str(&format!("  {} {}  {detail}\n", marker(f.change), f.path));
    }
    notes(&mut out, &d.root_fs.notes);
    out
}

fn entry(e: &RootEntry) -> String {
    match e {
        RootEntry::File { mode, size, .. } => format!("file {mode:04o}, {size} bytes"),
        RootEntry::Dir { mode } => format!("dir {mode:04o}"),
        RootEntry::Symlink { target } => format!("symlink → {target}"),
        RootEntry::Special { mode } => format!("device or fifo {mode:04o}"),
    }
}

/// What differs between two entries at one path: type, mode, content or target.
fn entry_change(old: &RootEntry, new: &RootEntry) -> String {
    match (old, new) {
        (RootEntry::File { mode: m1, sha256: h1, size: s1 }, RootEntry::File { mode: m2, sha256: h2, size: s2 }) => {
            let mut parts = Vec::new();
            if h1 != h2 {
                parts.push(format!("content ({s1} → {s2} bytes)"));
            }
            if m1 != m2 {
                parts.push(format!("mode {m1:04o} → {m2:04o}"));
            }
            parts.join(", ")
        }
        (RootEntry::Dir { mode: m1 }, RootEntry::Dir { mode: m2 })
        | (RootEntry::Special { mode: m1 }, RootEntry::Special { mode: m2 }) => format!("mode {m1:04o} → {m2:04o}"),
        (RootEntry::Symlink { target: t1 }, RootEntry::Symlink { target: t2 }) => format!("target {t1} → {t2}"),
        _ => format!("{} → {}", entry(old), entry(new)),
    }
}
