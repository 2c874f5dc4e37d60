//! `kiln diff A B`: what replacing image B with image A changes — recipe inputs and provision steps (read from git
//! at the commits the images were baked from), parent and base images, the commit range, the `[instance]` section,
//! and the files of the root filesystems where the provider can read them.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use serde::Serialize;

use super::lineage::target_digest;
use super::Context;
use crate::config::Instance;
use crate::digest::Digest;
use crate::ledger::view::ImageRecord;
use crate::ledger::View;
use crate::provider::{ProviderError, RootEntry, RootFs};
use crate::Error;

/// A `run` or `shell` step's timeout when its recipe sets none (as `config::recipe` defaults it).
const DEFAULT_STEP_TIMEOUT_SECS: u64 = 600;
/// Commits listed per direction; the count says how many more there are.
const LOG_LIMIT: usize = 100;

/// One side of a diff: the image an argument named.
#[derive(Debug, Clone, Serialize)]
pub struct Side {
    /// The argument as typed.
    pub arg: String,
    /// The stage the argument named, if it named one.
    pub stage: Option<String>,
    pub digest: Digest,
    pub recipe: String,
    pub recipe_key: Digest,
    pub parent: Option<Digest>,
    pub provider: String,
    pub commit: Option<String>,
    pub dirty: bool,
    /// `kiln gc` deleted the image from the provider; the ledger keeps its record.
    pub collected: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Change {
    Added,
    Removed,
    Changed,
}

/// An image, named by digest and recipe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ImageAt {
    pub digest: Digest,
    pub recipe: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Lineage {
    pub changed: bool,
    pub from: Option<ImageAt>,
    pub to: Option<ImageAt>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CommitLine {
    pub id: String,
    pub summary: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Commits {
    pub from: Option<String>,
    pub to: Option<String>,
    /// Commits `to` has and `from` lacks, newest first (at most 100; `added_count` counts them all).
    pub added: Vec<CommitLine>,
    pub added_count: usize,
    /// Commits `from` has and `to` lacks: `to` is older, or on another branch.
    pub dropped: Vec<CommitLine>,
    pub dropped_count: usize,
    /// Why the range is missing or not to be trusted (no commit recorded, commit not here, dirty tree).
    pub notes: Vec<String>,
}

/// One recipe input file as git holds it at a commit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InputFile {
    /// `file`, `executable` or `symlink`.
    pub kind: &'static str,
    /// The git blob id of its content (a symlink's: its target).
    pub blob: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct InputChange {
    /// Repository-relative, as the recipe key names it.
    pub path: String,
    pub change: Change,
    pub from: Option<InputFile>,
    pub to: Option<InputFile>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StepChange {
    pub change: Change,
    /// 0-based position in B's recipe, and the step there.
    pub from_index: Option<usize>,
    pub from: Option<String>,
    pub to_index: Option<usize>,
    pub to: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Inputs {
    /// False when git could not answer for both images; `notes` says why ("inputs not recorded").
    pub compared: bool,
    pub files: Vec<InputChange>,
    pub steps: Vec<StepChange>,
    pub notes: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RootChange {
    /// Absolute, in the image.
    pub path: String,
    pub change: Change,
    pub from: Option<RootEntry>,
    pub to: Option<RootEntry>,
}

#[derive(Debug, Clone, Serialize)]
pub struct RootFsDiff {
    /// False when the provider cannot list one of the images; `notes` says why.
    pub compared: bool,
    pub files: Vec<RootChange>,
    pub notes: Vec<String>,
}

/// What replacing `from` (the second argument, B) with `to` (the first, A) changes.
#[derive(Debug, Clone, Serialize)]
pub struct Diff {
    pub from: Side,
    pub to: Side,
    /// Both arguments name the same image: nothing differs.
    pub same: bool,
    pub parent: Lineage,
    /// The root image of each side's parent chain (the image itself when it has no parent).
    pub base: Lineage,
    pub commits: Commits,
    pub inputs: Inputs,
    /// How the `[instance]` section differs, one line per field.
    pub instance: Vec<String>,
    pub root_fs: RootFsDiff,
}

/// The diff of the images `a` and `b` name (a digest, a unique prefix, or a stage: what is live there, else what
/// is promoted), read as "what replacing B with A changes".
pub fn diff(ctx: &Context, a: &str, b: &str) -> Result<Diff, Error> {
    let view = ctx.ledger.view()?;
    let (to, to_record) = side(ctx, &view, a)?;
    let (from, from_record) = side(ctx, &view, b)?;
    let same = from.digest == to.digest;
    let parent = Lineage {
        changed: from.parent != to.parent,
        from: from.parent.map(|d| image_at(&view, d)),
        to: to.parent.map(|d| image_at(&view, d)),
    };
    let base_of = |side: &Side| image_at(&view, view.ancestors(&side.digest).last().copied().unwrap_or(side.digest));
    let (from_base, to_base) = (base_of(&from), base_of(&to));
    let base = Lineage { changed: from_base != to_base, from: Some(from_base), to: Some(to_base) };
    let git = GitRepo::open(ctx.repo.root());
    let commits = commits(git.as_ref(), &from, &to);
    let inputs = inputs(git.as_ref(), &from, &to);
    let instance = instance_changes(from_record.instance.as_ref(), to_record.instance.as_ref());
    let root_fs = if same {
        RootFsDiff { compared: true, files: Vec::new(), notes: Vec::new() }
    } else {
        root_fs(ctx, (&from, &from_record), (&to, &to_record))?
    };
    if let Some(err) = view.take_failure() {
        return Err(err.into());
    }
    Ok(Diff { from, to, same, parent, base, commits, inputs, instance, root_fs })
}

fn side(ctx: &Context, view: &View, arg: &str) -> Result<(Side, ImageRecord), Error> {
    let stage = ctx.pipeline.stage(arg).map(|s| s.name.clone());
    let digest = match target_digest(ctx, view, arg) {
        Ok(digest) => digest,
        // A word that is no stage and cannot be a digest was most likely meant as a stage.
        Err(Error::Digest(crate::digest::DigestError::Malformed { .. }))
            if stage.is_none() && !arg.trim_start_matches("sha256:").bytes().all(|b| b.is_ascii_hexdigit()) =>
        {
            return Err(Error::usage(format!(
                "`{arg}` is neither a stage of pipeline {} (its stages: {}) nor a digest",
                ctx.pipeline.name,
                ctx.pipeline.stage_names().join(", ")
            )));
        }
        Err(err) => return Err(err),
    };
    let record = view.image(&digest).ok_or_else(|| Error::usage(format!("{digest} is not an image in this ledger")))?;
    let side = Side {
        arg: arg.to_string(),
        stage,
        digest,
        recipe: record.recipe.clone(),
        recipe_key: record.recipe_key,
        parent: record.parent,
        provider: record.provider.clone(),
        commit: record.commit.clone(),
        dirty: record.dirty,
        collected: record.deleted,
    };
    Ok((side, record))
}

fn image_at(view: &View, digest: Digest) -> ImageAt {
    let recipe = view.image(&digest).map(|r| r.recipe).unwrap_or_else(|| "(not in this ledger)".into());
    ImageAt { digest, recipe }
}

/// `A` for the first argument, `B` for the second, with its digest: how notes name a side.
fn name(side: &Side, letter: char) -> String {
    format!("{letter} ({})", side.digest.short())
}

/// The git repository holding the kiln repository, and where the kiln repository sits inside its work tree.
struct GitRepo {
    repo: git2::Repository,
    /// `""`, or `sub/dir/` when the kiln repository is a subdirectory of the git work tree.
    prefix: String,
}

impl GitRepo {
    fn open(root: &Path) -> Option<GitRepo> {
        let repo = git2::Repository::discover(root).ok()?;
        let workdir = repo.workdir()?.canonicalize().ok()?;
        let root = root.canonicalize().ok()?;
        let prefix = match root.strip_prefix(&workdir).ok()?.to_str()? {
            "" => String::new(),
            p => format!("{p}/"),
        };
        Some(GitRepo { repo, prefix })
    }

    /// The commit `id`, or a note saying why it cannot be read.
    fn commit(&self, id: &str, who: &str) -> Result<git2::Commit<'_>, String> {
        git2::Oid::from_str(id)
            .and_then(|oid| self.repo.find_commit(oid))
            .map_err(|_| format!("{who} was baked from commit {}, which is not in this repository", short_commit(id)))
    }

    /// Up to [`LOG_LIMIT`] commits reachable from `tip` and not from `hidden`, newest first, and how many in all.
    fn log(&self, tip: git2::Oid, hidden: git2::Oid) -> Result<(Vec<CommitLine>, usize), git2::Error> {
        let mut walk = self.repo.revwalk()?;
        walk.set_sorting(git2::Sort::TOPOLOGICAL | git2::Sort::TIME)?;
        walk.push(tip)?;
        walk.hide(hidden)?;
        let mut lines = Vec::new();
        let mut count = 0;
        for oid in walk {
            let oid = oid?;
            count += 1;
            if lines.len() < LOG_LIMIT {
                let commit = self.repo.find_commit(oid)?;
                lines.push(CommitLine {
                    id: oid.to_string(),
                    summary: commit.summary().unwrap_or_default().to_string(),
                });
            }
        }
        Ok((lines, count))
    }
}

fn short_commit(id: &str) -> &str {
    &id[..id.len().min(12)]
}

fn commits(git: Option<&GitRepo>, from: &Side, to: &Side) -> Commits {
    let mut out = Commits {
        from: from.commit.clone(),
        to: to.commit.clone(),
        added: Vec::new(),
        added_count: 0,
        dropped: Vec::new(),
        dropped_count: 0,
        notes: Vec::new(),
    };
    for (side, letter) in [(to, 'A'), (from, 'B')] {
        if side.commit.is_none() {
            out.notes.push(format!("{} was baked outside a git repository: no commit is recorded", name(side, letter)));
        }
        if side.dirty {
            out.notes.push(format!(
                "{} was baked from a dirty work tree: its commit does not hold everything it was baked from",
                name(side, letter)
            ));
        }
    }
    let (Some(from_id), Some(to_id)) = (&from.commit, &to.commit) else { return out };
    if from_id == to_id {
        return out;
    }
    let Some(git) = git else {
        out.notes.push("not in a git repository: the commits between them cannot be listed".into());
        return out;
    };
    let (from_commit, to_commit) = (git.commit(from_id, &name(from, 'B')), git.commit(to_id, &name(to, 'A')));
    let (from_commit, to_commit) = match (from_commit, to_commit) {
        (Ok(f), Ok(t)) => (f, t),
        (f, t) => {
            out.notes.extend([f.err(), t.err()].into_iter().flatten());
            return out;
        }
    };
    match (git.log(to_commit.id(), from_commit.id()), git.log(from_commit.id(), to_commit.id())) {
        (Ok((added, added_count)), Ok((dropped, dropped_count))) => {
            (out.added, out.added_count, out.dropped, out.dropped_count) = (added, added_count, dropped, dropped_count);
        }
        (Err(err), _) | (_, Err(err)) => out.notes.push(format!("git could not list the commits: {}", err.message())),
    }
    out
}

/// A recipe as its commit holds it: steps described, and its input files by repository-relative path.
struct RecipeAt {
    steps: Vec<String>,
    files: BTreeMap<String, InputFile>,
}

fn inputs(git: Option<&GitRepo>, from: &Side, to: &Side) -> Inputs {
    let mut out = Inputs { compared: false, files: Vec::new(), steps: Vec::new(), notes: Vec::new() };
    if from.recipe_key == to.recipe_key {
        // The key covers every input file and every step: equal keys need no git to be equal inputs.
        out.compared = true;
        return out;
    }
    let Some(git) = git else {
        out.notes.push("inputs not recorded: this repository is not a git work tree, so the recipes at the images' commits cannot be read".into());
        return out;
    };
    let read = |side: &Side, letter: char| -> Result<RecipeAt, String> {
        let Some(commit) = &side.commit else {
            return Err(format!(
                "inputs not recorded for {}: it was baked outside a git repository",
                name(side, letter)
            ));
        };
        recipe_at(git, &git.commit(commit, &name(side, letter))?, &side.recipe)
    };
    let (before, after) = match (read(from, 'B'), read(to, 'A')) {
        (Ok(before), Ok(after)) => (before, after),
        (before, after) => {
            out.notes.extend([after.err(), before.err()].into_iter().flatten());
            return out;
        }
    };
    out.compared = true;
    for (side, letter) in [(to, 'A'), (from, 'B')] {
        if side.dirty {
            out.notes.push(format!(
                "{} was baked from a dirty work tree: its inputs are shown as committed, which may not be what was baked",
                name(side, letter)
            ));
        }
    }
    let paths: BTreeSet<&String> = before.files.keys().chain(after.files.keys()).collect();
    for path in paths {
        let (old, new) = (before.files.get(path), after.files.get(path));
        let change = match (old, new) {
            (None, Some(_)) => Change::Added,
            (Some(_), None) => Change::Removed,
            (Some(o), Some(n)) if o != n => Change::Changed,
            _ => continue,
        };
        out.files.push(InputChange { path: path.clone(), change, from: old.cloned(), to: new.cloned() });
    }
    out.steps = step_changes(&before.steps, &after.steps);
    out
}

/// Reads `images/<recipe>.toml` and the files its `copy` and `run` steps name, as `commit` holds them. Read leniently
/// (as TOML, not through today's validation): an old recipe may use what kiln no longer accepts.
fn recipe_at(git: &GitRepo, commit: &git2::Commit, recipe: &str) -> Result<RecipeAt, String> {
    let at = short_commit(&commit.id().to_string()).to_string();
    let tree = commit.tree().map_err(|e| format!("cannot read commit {at}: {}", e.message()))?;
    let file = format!("{}{}/{recipe}.toml", git.prefix, crate::config::IMAGES_DIR);
    let blob = tree
        .get_path(Path::new(&file))
        .and_then(|entry| entry.to_object(&git.repo))
        .ok()
        .and_then(|object| object.into_blob().ok())
        .ok_or_else(|| format!("inputs not recorded: {file} is not in commit {at}"))?;
    let text = std::str::from_utf8(blob.content()).map_err(|_| format!("{file} at commit {at} is not UTF-8"))?;
    let parsed: toml::Value =
        toml::from_str(text).map_err(|e| format!("{file} at commit {at} is not valid TOML: {e}"))?;
    let mut out = RecipeAt { steps: Vec::new(), files: BTreeMap::new() };
    let steps = parsed.get("provision").and_then(toml::Value::as_array).cloned().unwrap_or_default();
    for step in &steps {
        let field = |key: &str| step.get(key).and_then(toml::Value::as_str);
        let timeout = field("timeout")
            .and_then(|t| crate::config::parse_duration(t).ok())
            .map_or(DEFAULT_STEP_TIMEOUT_SECS, |d| d.as_secs().max(1));
        let timeout = humantime::format_duration(std::time::Duration::from_secs(timeout));
        let source = field("copy").or(field("run"));
        let described = match (field("copy"), field("run"), field("shell")) {
            (Some(_), _, _) => {
                format!("copy {} to {}", in_repo(source.unwrap_or_default()), field("to").unwrap_or("?"))
            }
            (_, Some(_), _) => format!("run {} (timeout {timeout})", in_repo(source.unwrap_or_default())),
            (_, _, Some(command)) => format!("shell `{command}` (timeout {timeout})"),
            _ => format!("unreadable step {step}"),
        };
        out.steps.push(described);
        if let Some(source) = source {
            let rel = in_repo(source);
            let found = list_inputs(git, &tree, &rel).map_err(|e| format!("cannot read {rel} at commit {at}: {e}"))?;
            out.files.extend(found);
        }
    }
    Ok(out)
}

/// A recipe's source path (relative to `images/`) as a repository-relative path, `..` resolved lexically.
fn in_repo(source: &str) -> String {
    let mut parts: Vec<&str> = vec![crate::config::IMAGES_DIR];
    for component in source.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            name => parts.push(name),
        }
    }
    parts.join("/")
}

/// The tracked files at or below `rel` in `tree`, keyed by repository-relative path (empty when `rel` is absent).
fn list_inputs(git: &GitRepo, tree: &git2::Tree, rel: &str) -> Result<BTreeMap<String, InputFile>, String> {
    let mut out = BTreeMap::new();
    let Ok(entry) = tree.get_path(Path::new(&format!("{}{rel}", git.prefix))) else { return Ok(out) };
    let file = |mode: i32, id: git2::Oid| {
        let kind = match mode {
            0o120000 => "symlink",
            0o100755 => "executable",
            _ => "file",
        };
        InputFile { kind, blob: id.to_string() }
    };
    match entry.kind() {
        Some(git2::ObjectType::Blob) => {
            out.insert(rel.to_string(), file(entry.filemode(), entry.id()));
        }
        Some(git2::ObjectType::Tree) => {
            let subtree = git.repo.find_tree(entry.id()).map_err(|e| e.message().to_string())?;
            subtree
                .walk(git2::TreeWalkMode::PreOrder, |dir, item| {
                    if item.kind() == Some(git2::ObjectType::Blob) {
                        if let Some(name) = item.name() {
                            out.insert(format!("{rel}/{dir}{name}"), file(item.filemode(), item.id()));
                        }
                    }
                    git2::TreeWalkResult::Ok
                })
                .map_err(|e| e.message().to_string())?;
        }
        _ => {}
    }
    Ok(out)
}

/// The steps that differ, in order: the longest common subsequence stays, a removal followed by an addition at the
/// same place is one changed step.
fn step_changes(before: &[String], after: &[String]) -> Vec<StepChange> {
    let (n, m) = (before.len(), after.len());
    let mut common = vec![vec![0usize; m + 1]; n + 1];
    for i in (0..n).rev() {
        for j in (0..m).rev() {
            common[i][j] =
                if before[i] == after[j] { common[i + 1][j + 1] + 1 } else { common[i + 1][j].max(common[i][j + 1]) };
        }
    }
    let mut edits: Vec<StepChange> = Vec::new();
    let (mut i, mut j) = (0, 0);
    let removed = |i: usize| StepChange {
        change: Change::Removed,
        from_index: Some(i),
        from: Some(before[i].clone()),
        to_index: None,
        to: None,
    };
    let added = |j: usize| StepChange {
        change: Change::Added,
        from_index: None,
        from: None,
        to_index: Some(j),
        to: Some(after[j].clone()),
    };
    while i < n || j < m {
        if i < n && j < m && before[i] == after[j] {
            i += 1;
            j += 1;
        } else if j < m && (i == n || common[i][j + 1] > common[i + 1][j]) {
            match edits.last_mut() {
                Some(last) if last.change == Change::Removed && last.from_index == i.checked_sub(1) => {
                    last.change = Change::Changed;
                    last.to_index = Some(j);
                    last.to = Some(after[j].clone());
                }
                _ => edits.push(added(j)),
            }
            j += 1;
        } else {
            edits.push(removed(i));
            i += 1;
        }
    }
    edits
}

fn instance_changes(from: Option<&Instance>, to: Option<&Instance>) -> Vec<String> {
    let (from, to) = match (from, to) {
        (Some(from), Some(to)) => (from, to),
        (None, None) => return Vec::new(),
        (None, Some(_)) => return vec!["B has no [instance] section recorded; A has one".into()],
        (Some(_), None) => return vec!["A has no [instance] section recorded; B has one".into()],
    };
    let mut out = Vec::new();
    if from.command != to.command {
        out.push(format!("command: {:?} → {:?}", from.command, to.command));
    }
    let keys: BTreeSet<&String> = from.env.keys().chain(to.env.keys()).collect();
    for key in keys {
        match (from.env.get(key), to.env.get(key)) {
            (Some(old), Some(new)) if old != new => out.push(format!("env {key}: {old:?} → {new:?}")),
            (Some(old), None) => out.push(format!("env {key}: {old:?} → (unset)")),
            (None, Some(new)) => out.push(format!("env {key}: (unset) → {new:?}")),
            _ => {}
        }
    }
    if from.health != to.health {
        out.push(format!("health: {:?} → {:?}", from.health, to.health));
    }
    if from.ready_timeout_secs != to.ready_timeout_secs {
        out.push(format!("ready-timeout: {}s → {}s", from.ready_timeout_secs, to.ready_timeout_secs));
    }
    out
}

fn root_fs(ctx: &Context, from: (&Side, &ImageRecord), to: (&Side, &ImageRecord)) -> Result<RootFsDiff, Error> {
    let mut out = RootFsDiff { compared: false, files: Vec::new(), notes: Vec::new() };
    let mut listed = Vec::new();
    for ((side, record), letter) in [(to, 'A'), (from, 'B')] {
        if side.collected {
            out.notes.push(format!(
                "{} was collected by `kiln gc`: its files are gone (the recipe, parent and commit diff still stand)",
                name(side, letter)
            ));
            continue;
        }
        match ctx.images.root_fs(&record.image(side.digest)) {
            Ok(RootFs::Listed(files)) => listed.push(files),
            Ok(RootFs::NotAvailable { reason }) => {
                if !out.notes.contains(&reason) {
                    out.notes.push(reason);
                }
            }
            Err(ProviderError::MissingImage { reason, .. }) => {
                out.notes.push(format!("{} is not in the provider's store ({reason})", name(side, letter)))
            }
            Err(err) => return Err(err.into()),
        }
    }
    // Listed in the order A, B: both or nothing to compare.
    let (Some(before), Some(after), None) = (listed.pop(), listed.pop(), listed.pop()) else { return Ok(out) };
    out.compared = true;
    let paths: BTreeSet<&String> = before.keys().chain(after.keys()).collect();
    for path in paths {
        let (old, new) = (before.get(path), after.get(path));
        let change = match (old, new) {
            (None, Some(_)) => Change::Added,
            (Some(_), None) => Change::Removed,
            (Some(o), Some(n)) if o != n => Change::Changed,
            _ => continue,
        };
        out.files.push(RootChange { path: path.clone(), change, from: old.cloned(), to: new.cloned() });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn steps(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn summary(changes: &[StepChange]) -> Vec<String> {
        changes
            .iter()
            .map(|c| format!("{:?} {}→{}", c.change, c.from.as_deref().unwrap_or("-"), c.to.as_deref().unwrap_or("-")))
            .collect()
    }

    #[test]
    fn steps_are_matched_by_their_longest_common_run() {
        let table: [(&[&str], &[&str], &[&str]); 5] = [
            (&["a", "b", "c"], &["a", "b", "c"], &[]),
            (&["a", "b", "c"], &["x", "a", "b", "c"], &["Added -→x"]),
            (&["a", "b", "c"], &["a", "c"], &["Removed b→-"]),
            (&["a", "b", "c"], &["a", "B", "c"], &["Changed b→B"]),
            (&["a", "b"], &["a", "B", "d"], &["Changed b→B", "Added -→d"]),
        ];
        for (before, after, expected) in table {
            assert_eq!(
                summary(&step_changes(&steps(before), &steps(after))),
                steps(expected),
                "{before:?} → {after:?}"
            );
        }
    }

    #[test]
    fn recipe_sources_resolve_from_the_images_directory() {
        assert_eq!(in_repo("files/hello"), "images/files/hello");
        assert_eq!(in_repo("./scripts//build.sh"), "images/scripts/build.sh");
        assert_eq!(in_repo("../shared/x"), "shared/x");
    }
}
