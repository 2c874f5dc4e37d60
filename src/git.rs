//! What the work tree's git repository says about the source being baked: commit, dirtiness, origin, and which
//! files are tracked (only those are a recipe's inputs).

use std::path::Path;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SourceState {
    /// HEAD's commit id; None outside a git repository or before the first commit.
    pub commit: Option<String>,
    /// Tracked files changed or untracked files present (ignored files do not count).
    pub dirty_paths: Vec<String>,
    /// The `origin` remote's URL with any credentials removed ([`redact_url`]).
    pub origin: Option<String>,
}

impl SourceState {
    pub fn dirty(&self) -> bool {
        !self.dirty_paths.is_empty()
    }
}

/// kiln's lock file at the repository root (see `provider::aws::base`).
const LOCK_FILE: &str = "kiln.lock";

/// Inspects the repository containing `dir`. Not being in a git repository is not an error: there is simply no
/// commit to record.
pub fn inspect(dir: &Path) -> Result<SourceState, git2::Error> {
    let Some(repo) = discover(dir)? else { return Ok(SourceState::default()) };
    let commit = repo.head().ok().and_then(|h| h.peel_to_commit().ok()).map(|c| c.id().to_string());
    let mut options = git2::StatusOptions::new();
    options.include_untracked(true).recurse_untracked_dirs(false).include_ignored(false);
    let dirty_paths = repo
        .statuses(Some(&mut options))?
        .iter()
        .filter(|entry| entry.status() != git2::Status::CURRENT)
        .filter_map(|entry| entry.path().map(str::to_string))
        // The lock file holds what the bake itself resolved (base AMI ids), and the recipe key covers every value
        // in it: a first bake that writes it must not refuse itself as dirty.
        .filter(|path| path != LOCK_FILE)
        .collect();
    let origin = repo.find_remote("origin").ok().and_then(|r| r.url().map(redact_url));
    Ok(SourceState { commit, dirty_paths, origin })
}

fn discover(dir: &Path) -> Result<Option<git2::Repository>, git2::Error> {
    match git2::Repository::discover(dir) {
        Ok(repo) => Ok(Some(repo)),
        Err(e) if e.code() == git2::ErrorCode::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// The paths git tracks (its index) below a kiln repository root, relative to that root. A recipe reads only
/// these, so a file git ignores or was never told about can neither ship in an image nor change its key.
#[derive(Debug, Clone, Default)]
pub struct Tracked {
    /// Sorted bytewise, as git's index already is: lookups are binary searches.
    paths: Vec<String>,
}

impl Tracked {
    /// The tracked files below `root`; None when `root` is not in a git work tree (then every file is an input).
    pub fn load(root: &Path) -> Result<Option<Tracked>, git2::Error> {
        let Some(repo) = discover(root)? else { return Ok(None) };
        let Some(workdir) = repo.workdir() else { return Ok(None) };
        let (Ok(workdir), Ok(root)) = (workdir.canonicalize(), root.canonicalize()) else { return Ok(None) };
        let Ok(prefix) = root.strip_prefix(&workdir) else { return Ok(None) };
        let prefix = match prefix.to_str() {
            Some("") => String::new(),
            Some(p) => format!("{p}/"),
            None => return Ok(None),
        };
        let index = repo.index()?;
        let mut paths: Vec<String> = index
            .iter()
            .filter_map(|entry| String::from_utf8(entry.path).ok())
            .filter_map(|mut path| {
                path.starts_with(&prefix).then(|| {
                    path.drain(..prefix.len());
                    path
                })
            })
            .collect();
        // Already sorted unless the index holds conflict stages; sorting sorted input is one pass.
        paths.sort_unstable();
        paths.dedup();
        Ok(Some(Tracked { paths }))
    }

    /// Builds the set from repository-relative paths (for tests).
    pub fn of<I: IntoIterator<Item = S>, S: Into<String>>(paths: I) -> Tracked {
        let mut paths: Vec<String> = paths.into_iter().map(Into::into).collect();
        paths.sort_unstable();
        Tracked { paths }
    }

    /// Whether git tracks the file or symlink `rel`.
    pub fn holds_file(&self, rel: &str) -> bool {
        self.paths.binary_search_by(|p| p.as_str().cmp(rel)).is_ok()
    }

    /// Whether git tracks anything below the directory `rel` (git tracks no directories of their own).
    pub fn holds_dir(&self, rel: &str) -> bool {
        let below = format!("{rel}/");
        let first = self.paths.partition_point(|p| p.as_str() < below.as_str());
        self.paths.get(first).is_some_and(|p| p.starts_with(&below))
    }
}

/// A URL as kiln records it (image annotations, ledger): without credentials. `scheme://user:secret@host/…` loses
/// its whole userinfo (CI checkouts put tokens in the user name too, as `x-access-token:…@` or `<token>@`), and
/// every URL loses its query and fragment, where tokens also travel (`?private_token=…`). An scp-style
/// `user@host:path` keeps its user: that syntax cannot carry a password, and the login name says how to fetch.
pub fn redact_url(url: &str) -> String {
    let without_query = |text: &str| text.split(['?', '#']).next().unwrap_or_default().to_string();
    if let Some((scheme, rest)) = url.split_once("://") {
        let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
        let (authority, path) = rest.split_at(authority_end);
        let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
        return format!("{scheme}://{host}{}", without_query(path));
    }
    match url.split_once('@') {
        // `user:secret@host:path` is not git's scp syntax, but a credential must not survive a typo either.
        Some((user, rest)) if user.contains(':') || user.contains('/') => without_query(rest),
        _ => without_query(url),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_url_strips_every_credential() {
        let table = [
            ("https://user:token@github.com/org/repo.git", "https://github.com/org/repo.git"),
            ("https://x-access-token:ghs_abc@github.com/org/repo", "https://github.com/org/repo"),
            ("https://ghp_token@github.com/org/repo.git", "https://github.com/org/repo.git"),
            ("https://user:p%40ss@host:8443/repo", "https://host:8443/repo"),
            ("https://user:p@ss@host/repo", "https://host/repo"),
            ("https://gitlab.com/org/repo.git?private_token=secret", "https://gitlab.com/org/repo.git"),
            ("https://host/repo#access_token=secret", "https://host/repo"),
            ("https://user:tok@host?token=x", "https://host"),
            ("ssh://git:secret@host:22/org/repo.git", "ssh://host:22/org/repo.git"),
            ("ssh://git@host/org/repo.git", "ssh://host/org/repo.git"),
            ("git@github.com:org/repo.git", "git@github.com:org/repo.git"),
            ("user:secret@host:org/repo.git", "host:org/repo.git"),
            ("https://github.com/org/repo.git", "https://github.com/org/repo.git"),
            ("/srv/git/repo.git", "/srv/git/repo.git"),
            ("file:///srv/git/repo.git", "file:///srv/git/repo.git"),
            ("", ""),
        ];
        for (url, expected) in table {
            assert_eq!(redact_url(url), expected, "{url}");
        }
    }

    #[test]
    fn tracked_answers_for_files_and_directories() {
        let tracked = Tracked::of(["images/files/a/x", "images/files/ab", "images/run.sh"]);
        assert!(tracked.holds_file("images/files/a/x"));
        assert!(!tracked.holds_file("images/files/a/notes.swp"));
        assert!(tracked.holds_dir("images/files/a"));
        assert!(tracked.holds_dir("images"));
        assert!(!tracked.holds_dir("images/files/a/x"));
        assert!(!tracked.holds_dir("images/file"), "a prefix of a name is not a directory");
        assert!(!tracked.holds_dir("images/files/b"));
    }
}
