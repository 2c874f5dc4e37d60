//! Strict loading of recipes (`images/*.toml`) and pipelines (`pipelines/*.toml`): every error names the file,
//! line, column and field.

pub mod pipeline;
pub mod recipe;

use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub use pipeline::{Gate, LedgerLocation, Pipeline, ProviderKind, Stage, StageDeploy};
pub use recipe::{Health, Instance, Provision, Recipe};

pub const IMAGES_DIR: &str = "images";
pub const PIPELINES_DIR: &str = "pipelines";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{file}:{line}:{column}: {field}: {message}")]
    Invalid { file: PathBuf, line: usize, column: usize, field: String, message: String },
    #[error("cannot read {file}")]
    Read {
        file: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("no {kind} named `{name}` ({file} does not exist){}", available_suffix(available))]
    NotFound { kind: &'static str, name: String, file: PathBuf, available: Vec<String> },
    #[error("`{}` is not a valid {kind} name: {problem}", name.escape_debug())]
    BadName { kind: &'static str, name: String, problem: String },
    #[error("{dir}/ holds {} pipelines ({}): choose one with --pipeline", available.len(), available.join(", "))]
    AmbiguousPipeline { dir: PathBuf, available: Vec<String> },
    #[error("no pipeline found: {dir}/ holds no *.toml file")]
    NoPipeline { dir: PathBuf },
}

fn available_suffix(available: &[String]) -> String {
    if available.is_empty() {
        String::new()
    } else {
        format!("; available: {}", available.join(", "))
    }
}

/// The repository kiln works in: every configured path must stay inside it.
#[derive(Debug, Clone)]
pub struct Repo {
    root: PathBuf,
}

impl Repo {
    /// The nearest ancestor of `start` that holds `pipelines/` or `images/`; `start` itself when none does.
    pub fn discover(start: &Path) -> std::io::Result<Repo> {
        let start = start.canonicalize()?;
        let root = start
            .ancestors()
            .find(|dir| dir.join(PIPELINES_DIR).is_dir() || dir.join(IMAGES_DIR).is_dir())
            .unwrap_or(&start)
            .to_path_buf();
        Ok(Repo { root })
    }

    pub fn at(root: &Path) -> std::io::Result<Repo> {
        Ok(Repo { root: root.canonicalize()? })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// `path` as shown to a user: relative to the repository when inside it.
    pub fn display(&self, path: &Path) -> PathBuf {
        path.strip_prefix(&self.root).map(Path::to_path_buf).unwrap_or_else(|_| path.to_path_buf())
    }

    /// Resolves `rel`, written in `base_file`, to a path that exists and stays inside the repository, also after
    /// following symlinks.
    pub fn resolve(&self, base_file: &Path, rel: &str) -> Result<RepoPath, String> {
        if rel.is_empty() {
            return Err("the path is empty".into());
        }
        let written = Path::new(rel);
        if written.is_absolute() {
            return Err(format!("`{rel}` is absolute; paths are relative to the file that names them"));
        }
        let base_dir = base_file.parent().unwrap_or(&self.root);
        let mut lexical = base_dir.to_path_buf();
        for component in written.components() {
            match component {
                Component::Normal(part) => lexical.push(part),
                Component::CurDir => {}
                Component::ParentDir => {
                    lexical.pop();
                }
                Component::RootDir | Component::Prefix(_) => {
                    return Err(format!("`{rel}` is absolute; paths are relative to the file that names them"))
                }
            }
        }
        if !lexical.starts_with(&self.root) {
            return Err(format!("`{rel}` escapes the repository through `..`"));
        }
        let real = match lexical.canonicalize() {
            Ok(real) => real,
            Err(_) if lexical.symlink_metadata().is_ok() => {
                return Err(format!("`{rel}` is a symlink whose target does not exist"))
            }
            Err(_) => return Err(format!("`{rel}` does not exist (looked for {})", self.display(&lexical).display())),
        };
        if !real.starts_with(&self.root) {
            return Err(format!("`{rel}` escapes the repository through a symlink (to {})", real.display()));
        }
        let relative = real
            .strip_prefix(&self.root)
            .map_err(|_| format!("`{rel}` escapes the repository"))?
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join("/");
        Ok(RepoPath { relative, absolute: real })
    }
}

/// A path checked to exist inside the repository; serialises as its repository-relative form so that recipe keys
/// do not depend on where the repository is checked out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct RepoPath {
    pub relative: String,
    #[serde(skip)]
    pub absolute: PathBuf,
}

/// One configuration file's text, kept to turn byte offsets into line and column.
pub(crate) struct Source {
    pub display: PathBuf,
    pub absolute: PathBuf,
    pub text: String,
}

impl Source {
    pub fn read(repo: &Repo, absolute: &Path) -> Result<Source, ConfigError> {
        let text = std::fs::read_to_string(absolute)
            .map_err(|source| ConfigError::Read { file: repo.display(absolute), source })?;
        Ok(Source { display: repo.display(absolute), absolute: absolute.to_path_buf(), text })
    }

    pub fn line_col(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let before = &self.text[..offset];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        (line, before[line_start..].chars().count() + 1)
    }

    pub fn error(&self, span: Range<usize>, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
        let (line, column) = self.line_col(span.start);
        ConfigError::Invalid { file: self.display.clone(), line, column, field: field.into(), message: message.into() }
    }

    /// Strict TOML: unknown keys and wrong types are errors naming the field path.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, ConfigError> {
        let deserializer = toml::Deserializer::new(&self.text);
        serde_path_to_error::deserialize(deserializer).map_err(|err| {
            // `toml::Spanned` shows up in the path as a private field name; users never wrote it.
            let path = err.path().to_string().replace(".$__serde_spanned_private_value", "");
            let inner = err.into_inner();
            let span = inner.span().unwrap_or(0..0);
            let message = inner.message().trim().to_string();
            let field = if path == "." { "(top level)".to_string() } else { path };
            self.error(span, field, message)
        })
    }
}

/// The shortest duration any key accepts: kiln counts soak, leases and timeouts in whole seconds.
pub const MIN_DURATION: Duration = Duration::from_secs(1);
/// The longest duration any key accepts. Leases and soaks are added to the clock and written as RFC 3339 times, so
/// an unbounded one ("10000y") would overflow the year 9999 and crash a later command instead of failing here.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// Durations as people write them: "30s", "10m", "1h", "1h 30m"; between [`MIN_DURATION`] and [`MAX_DURATION`].
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let duration = humantime::parse_duration(text.trim())
        .map_err(|e| format!("`{text}` is not a duration ({e}); write e.g. \"30s\", \"10m\" or \"1h\""))?;
    if duration < MIN_DURATION {
        return Err(format!("`{text}` is shorter than 1s, the shortest duration kiln accepts"));
    }
    if duration > MAX_DURATION {
        return Err(format!("`{text}` is longer than 365 days, the longest duration kiln accepts"));
    }
    Ok(duration)
}

/// Names of recipes and pipelines become file names, group names and parameter paths.
pub(crate) fn check_name(kind: &'static str, name: &str) -> Result<(), ConfigError> {
    match name_problem(name) {
        None => Ok(()),
        Some(problem) => Err(ConfigError::BadName { kind, name: name.to_string(), problem }),
    }
}

/// What makes `name` unusable as a recipe or pipeline name, said so a user can fix it.
pub(crate) fn name_problem(name: &str) -> Option<String> {
    const ALLOWED: &str = "use letters, digits, `-`, `_` and `.`";
    if name.is_empty() {
        return Some(format!("it is empty; {ALLOWED}"));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))) {
        let shown = match bad {
            ' ' => "a space".to_string(),
            c if c.is_control() || c.is_whitespace() => format!("the character {}", c.escape_unicode()),
            c => format!("`{c}`"),
        };
        return Some(format!("it contains {shown}; {ALLOWED}"));
    }
    // A leading dot would make the file hidden (`.x.toml`) and `..` a parent directory.
    name.starts_with('.').then(|| "it starts with `.`; a name may contain `.` but not start with it".to_string())
}

/// The `*.toml` stems in `dir`, sorted.
pub(crate) fn toml_stems(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let path = entry.path();
            if path.extension()? != "toml" {
                return None;
            }
            Some(path.file_stem()?.to_string_lossy().into_owned())
        })
        .collect();
    names.sort();
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_col_counts_from_one() {
        let source = Source { display: "x.toml".into(), absolute: "/x.toml".into(), text: "a = 1\nbb = 2\n".into() };
        assert_eq!(source.line_col(0), (1, 1));
        assert_eq!(source.line_col(6), (2, 1));
        assert_eq!(source.line_col(11), (2, 6));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10m").unwrap(), Duration::from_secs(600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert!(parse_duration("ten minutes").is_err());
        assert!(parse_duration("").is_err());
        assert_eq!(parse_duration("365d").unwrap(), MAX_DURATION);
        assert!(parse_duration("366d").unwrap_err().contains("longer than 365 days"));
        assert!(parse_duration("10000y").unwrap_err().contains("longer than 365 days"));
        assert!(parse_duration("0s").unwrap_err().contains("shorter than 1s"));
        assert!(parse_duration("500ms").unwrap_err().contains("shorter than 1s"));
        assert!(parse_duration("99999999999999999999999y").is_err(), "overflow is an error, not a panic");
    }

    #[test]
    fn name_problems_say_what_is_wrong() {
        assert_eq!(name_problem("hello-2.x_y"), None);
        for (bad, problem) in [
            ("a b", "it contains a space"),
            ("a/b", "it contains `/`"),
            ("", "it is empty"),
            (".hidden", "it starts with `.`"),
            ("tab\there", "it contains the character \\u{9}"),
            ("über", "it contains `ü`"),
        ] {
            let found = name_problem(bad).unwrap_or_default();
            assert!(found.starts_with(problem), "{bad:?}: {found}");
        }
    }

    #[test]
    fn resolve_keeps_paths_inside_the_repository() {
        let dir = tempfile::tempdir().unwrap();
        let repo = Repo::at(dir.path()).unwrap();
        let root = repo.root().to_path_buf();
        std::fs::create_dir_all(root.join("images/files")).unwrap();
        std::fs::write(root.join("images/files/a"), "a").unwrap();
        std::fs::write(root.join("top"), "t").unwrap();
        let base = root.join("images/r.toml");
        assert_eq!(repo.resolve(&base, "files/a").unwrap().relative, "images/files/a");
        assert_eq!(repo.resolve(&base, "../top").unwrap().relative, "top");
        assert!(repo.resolve(&base, "../../etc/passwd").unwrap_err().contains("escapes"));
        assert!(repo.resolve(&base, "/etc/passwd").unwrap_err().contains("absolute"));
        assert!(repo.resolve(&base, "files/missing").unwrap_err().contains("does not exist"));
        std::os::unix::fs::symlink("/etc", root.join("images/out")).unwrap();
        assert!(repo.resolve(&base, "out/passwd").unwrap_err().contains("symlink"));
    }
}
