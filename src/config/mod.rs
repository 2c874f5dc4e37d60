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

/// The shapes of AWS names and ids, checked at load so that a typo is a config error with its line, not an API
/// error after a builder was launched. Each returns the message for the field, or `Ok`.
pub(crate) mod aws_shape {
    /// `us-east-1`, `eu-central-2`, `us-gov-west-1`, `us-isob-east-1`: a lowercase prefix, words, a number.
    pub fn region(text: &str) -> Result<(), String> {
        let parts: Vec<&str> = text.split('-').collect();
        let lower_word = |p: &&str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase());
        let (Some(number), Some(prefix)) = (parts.last(), parts.first()) else {
            return Err(not_a_region(text));
        };
        if parts.len() >= 3
            && (2..=4).contains(&prefix.len())
            && parts[..parts.len() - 1].iter().all(lower_word)
            && (1..=2).contains(&number.len())
            && number.bytes().all(|b| b.is_ascii_digit())
        {
            return Ok(());
        }
        // `us-east-1a` is the most likely slip: an availability zone copied from the console.
        let zone_of = text.trim_end_matches(|c: char| c.is_ascii_lowercase());
        if zone_of != text && zone_of.ends_with(|c: char| c.is_ascii_digit()) && region(zone_of).is_ok() {
            return Err(format!("`{text}` is an availability zone; the region is `{zone_of}`"));
        }
        Err(not_a_region(text))
    }

    fn not_a_region(text: &str) -> String {
        format!("`{}` is not an AWS region; write one like \"us-east-1\" or \"eu-central-2\"", text.escape_debug())
    }

    /// Words that would share an image with everyone; launch permissions never get them.
    const PUBLIC: &[&str] = &["all", "public", "everyone", "*"];

    /// A 12-digit account id; anything that means "everyone" is refused on its own terms.
    pub fn account(text: &str) -> Result<(), String> {
        if PUBLIC.contains(&text.trim().to_ascii_lowercase().as_str()) {
            return Err("kiln never makes an image public: list account ids".into());
        }
        if text.len() == 12 && text.bytes().all(|b| b.is_ascii_digit()) {
            return Ok(());
        }
        Err(format!("`{}` is not an AWS account id (12 digits)", text.escape_debug()))
    }

    /// The owner of a base AMI filter: an account id or one of the aliases EC2 accepts.
    pub fn image_owner(text: &str) -> Result<(), String> {
        if matches!(text, "amazon" | "self" | "aws-marketplace") || account(text).is_ok() {
            return Ok(());
        }
        Err(format!(
            "`{}` is not an image owner: write a 12-digit account id, \"amazon\", \"self\" or \"aws-marketplace\"",
            text.escape_debug()
        ))
    }

    /// `<prefix>-` and 8 or 17 lowercase hex digits: the two lengths EC2 has handed out.
    pub fn resource_id(text: &str, prefix: &str, what: &str) -> Result<(), String> {
        let ok = text.strip_prefix(prefix).and_then(|rest| rest.strip_prefix('-')).is_some_and(|hex| {
            matches!(hex.len(), 8 | 17) && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if ok {
            Ok(())
        } else {
            Err(format!("`{}` is not {what} ({prefix}- and 8 or 17 hex digits)", text.escape_debug()))
        }
    }

    /// `family.size` in lowercase, as EC2 names them: `t3.small`, `m7i-flex.large`, `m7i.metal-24xl`.
    pub fn instance_type(text: &str) -> Result<(), String> {
        let part =
            |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        let ok = text.split_once('.').is_some_and(|(family, size)| {
            part(family) && part(size) && family.starts_with(|c: char| c.is_ascii_lowercase())
        });
        if ok {
            Ok(())
        } else if text != text.to_ascii_lowercase() && instance_type(&text.to_ascii_lowercase()).is_ok() {
            Err(format!("`{}` must be lowercase: \"{}\"", text.escape_debug(), text.to_ascii_lowercase()))
        } else {
            Err(format!("`{}` is not an instance type; write family.size, like \"t3.small\"", text.escape_debug()))
        }
    }

    /// An S3 bucket name: 3 to 63 lowercase letters, digits, dots and hyphens, starting and ending with a letter or
    /// digit.
    pub fn bucket(text: &str) -> Result<(), String> {
        if let Some(rest) = text.strip_prefix("s3://") {
            return Err(format!("write the bucket name alone, without s3:// (\"{}\")", rest.trim_end_matches('/')));
        }
        let allowed = text.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
        let ends = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        if (3..=63).contains(&text.len()) && allowed && ends(text.bytes().next()) && ends(text.bytes().last()) {
            return Ok(());
        }
        Err(format!(
            "`{}` is not a bucket name: 3 to 63 lowercase letters, digits, `.` and `-`, starting and ending with a \
             letter or digit",
            text.escape_debug()
        ))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn regions() {
            for good in
                ["us-east-1", "eu-central-2", "us-gov-west-1", "ap-southeast-3", "us-isob-east-1", "eusc-de-east-1"]
            {
                assert_eq!(region(good), Ok(()), "{good}");
            }
            for bad in
                ["us-east", "US-EAST-1", "useast1", "us-east-1-", "", "eu_west_1", "us-east-100", "europe-west-1"]
            {
                assert!(region(bad).unwrap_err().contains("is not an AWS region"), "{bad}");
            }
            assert_eq!(
                region("us-east-1a").unwrap_err(),
                "`us-east-1a` is an availability zone; the region is `us-east-1`"
            );
        }

        #[test]
        fn accounts_and_owners() {
            assert_eq!(account("111122223333"), Ok(()));
            for public in ["all", "ALL", "public", "*", " all "] {
                assert_eq!(account(public).unwrap_err(), "kiln never makes an image public: list account ids");
            }
            for bad in ["11112222333", "1111-2222-3333", "11112222333a", ""] {
                assert!(account(bad).unwrap_err().contains("is not an AWS account id"), "{bad}");
            }
            for good in ["amazon", "self", "aws-marketplace", "136693071363"] {
                assert_eq!(image_owner(good), Ok(()), "{good}");
            }
            for bad in ["Amazon", "all", "debian", ""] {
                assert!(image_owner(bad).unwrap_err().contains("is not an image owner"), "{bad}");
            }
        }

        #[test]
        fn resource_ids() {
            assert_eq!(resource_id("ami-0123abcd", "ami", "an AMI id"), Ok(()));
            assert_eq!(resource_id("ami-0123456789abcdef0", "ami", "an AMI id"), Ok(()));
            for bad in
                ["ami-0123abc", "ami-0123ABCD", "ami-0123abcg", "img-0123abcd", "ami0123abcd", "ami-0123456789abcdef"]
            {
                assert!(resource_id(bad, "ami", "an AMI id").is_err(), "{bad}");
            }
            assert_eq!(
                resource_id("subnet-1", "subnet", "a subnet id").unwrap_err(),
                "`subnet-1` is not a subnet id (subnet- and 8 or 17 hex digits)"
            );
        }

        #[test]
        fn instance_types() {
            for good in ["t3.small", "m7i-flex.large", "m7i.metal-24xl", "u-6tb1.metal", "c6gn.16xlarge"] {
                assert_eq!(instance_type(good), Ok(()), "{good}");
            }
            assert_eq!(instance_type("T3.Small").unwrap_err(), "`T3.Small` must be lowercase: \"t3.small\"");
            for bad in ["t3", "t3.", ".small", "3t.small", "t3 small", "t3.small.x", ""] {
                assert!(instance_type(bad).unwrap_err().contains("is not an instance type"), "{bad}");
            }
        }

        #[test]
        fn buckets() {
            for good in ["acme-kiln-artifacts", "abc", "a.b-c", &"a".repeat(63)] {
                assert_eq!(bucket(good), Ok(()), "{good}");
            }
            for bad in ["ab", "Acme", "acme_kiln", "-acme", "acme.", &"a".repeat(64)] {
                assert!(bucket(bad).unwrap_err().contains("is not a bucket name"), "{bad}");
            }
            assert!(bucket("s3://acme/").unwrap_err().contains("without s3:// (\"acme\")"));
        }
    }
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

    /// The repository's own recipes and pipelines load under the same strict rules as a user's, the AWS example
    /// included, though no test runs it against AWS.
    #[test]
    fn every_example_in_the_repository_loads() {
        let repo = Repo::at(Path::new(env!("CARGO_MANIFEST_DIR"))).unwrap();
        let recipes = toml_stems(&repo.root().join(IMAGES_DIR));
        assert!(recipes.len() >= 2, "{recipes:?}");
        for name in &recipes {
            recipe::load_chain(&repo, name).unwrap_or_else(|err| panic!("images/{name}.toml: {err}"));
        }
        let pipelines = toml_stems(&repo.root().join(PIPELINES_DIR));
        assert_eq!(pipelines, ["hello", "hello-aws"]);
        for name in &pipelines {
            pipeline::load(&repo, name).unwrap_or_else(|err| panic!("pipelines/{name}.toml: {err}"));
        }

        let base = recipe::load(&repo, "base").unwrap().aws.expect("base.toml has [aws]");
        assert_eq!(base.base.map(|b| b.owner).as_deref(), Some("amazon"));
        let hello = recipe::load(&repo, "hello").unwrap().aws.expect("hello.toml has [aws]");
        assert_eq!(hello.instance_profile.as_deref(), Some("kiln-builder"));
        let aws = pipeline::load(&repo, "hello-aws").unwrap();
        assert_eq!((aws.provider, aws.image.as_str()), (ProviderKind::Aws, "hello"));
        assert_eq!(aws.ledger, LedgerLocation::S3 { bucket: "acme-kiln-ledger".into(), prefix: "hello".into() });
        let settings = aws.aws.as_ref().expect("[aws]");
        assert_eq!(settings.region.as_deref(), Some("us-east-1"));
        assert_eq!(settings.artifact_bucket.as_deref(), Some("acme-kiln-artifacts"));
        assert_eq!(aws.stage_names(), ["dev", "test", "prod"]);
        let prod = aws.stage("prod").unwrap();
        assert_eq!(prod.regions(), ["us-east-1", "eu-west-1"]);
        assert_eq!(prod.accounts(), ["111122223333"]);
        assert_eq!(pipeline::load(&repo, "hello").unwrap().provider, ProviderKind::Local);
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
