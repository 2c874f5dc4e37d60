//! What the work tree's git repository says about the source being baked: commit, dirtiness, origin.

use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceState {
    /// HEAD's commit id; None outside a git repository or before the first commit.
    pub commit: Option<String>,
    /// Tracked files changed or untracked files present (ignored files do not count).
    pub dirty_paths: Vec<String>,
    /// The `origin` remote's URL, for the `org.opencontainers.image.source` label.
    pub origin: Option<String>,
}

impl SourceState {
    pub fn dirty(&self) -> bool {
        !self.dirty_paths.is_empty()
    }
}

/// Inspects the repository containing `dir`. Not being in a git repository is not an error: there is simply no
/// commit to record.
pub fn inspect(dir: &Path) -> Result<SourceState, git2::Error> {
    let repo = match git2::Repository::discover(dir) {
        Ok(repo) => repo,
        Err(e) if e.code() == git2::ErrorCode::NotFound => return Ok(SourceState::default()),
        Err(e) => return Err(e),
    };
    let commit = repo.head().ok().and_then(|h| h.peel_to_commit().ok()).map(|c| c.id().to_string());
    let mut options = git2::StatusOptions::new();
    options.include_untracked(true).recurse_untracked_dirs(false).include_ignored(false);
    let dirty_paths = repo
        .statuses(Some(&mut options))?
        .iter()
        .filter(|entry| entry.status() != git2::Status::CURRENT)
        .filter_map(|entry| entry.path().map(str::to_string))
        .collect();
    let origin = repo.find_remote("origin").ok().and_then(|r| r.url().map(str::to_string));
    Ok(SourceState { commit, dirty_paths, origin })
}
