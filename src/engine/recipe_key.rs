//! The recipe key: a digest over everything that can change a baked image, and the stat cache that makes
//! computing it cheap when nothing changed.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::config::{Provision, Recipe};
use crate::digest::{canonical_json, Digest, StreamHasher};
use crate::git::Tracked;

/// Bump when the key's inputs or encoding change: old keys then miss the cache instead of matching wrongly.
/// 2: the recipe's `[aws]` section left the recipe encoding; the AWS provider hashes it in its build settings.
pub const KEY_FORMAT: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read {path} for the recipe key")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is a {kind}, which a recipe cannot copy")]
    Unsupported { path: PathBuf, kind: &'static str },
    #[error("{path} is not tracked by git, so the commit cannot reproduce an image made from it; `git add` it (and bake with --allow-dirty until it is committed)")]
    Untracked { path: String },
}

/// One input file as it enters the key: content hash and the mode bits that survive into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileInput {
    File { sha256: Digest, executable: bool },
    Dir,
    Symlink { target: String },
}

/// The key and the inputs it was computed from (what `docs/recipe-key.md` lists), kept for explanations.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct KeyInputs<'a> {
    pub kiln_key_format: u32,
    pub recipe_name: &'a str,
    pub recipe: &'a Recipe,
    pub parent_digest: Option<Digest>,
    pub provider: &'a str,
    pub provider_settings: serde_json::Value,
    /// repository-relative path → input, for every file the provision steps reference. Encoded in the key as
    /// the sha256 of one `path \0 kind \0 value \0` record per file (sorted by path): tens of thousands of files
    /// would otherwise make the canonical JSON the slowest part of a cache hit.
    #[serde(serialize_with = "serialize_files")]
    pub files: &'a BTreeMap<String, FileInput>,
}

fn serialize_files<S: serde::Serializer>(files: &&BTreeMap<String, FileInput>, s: S) -> Result<S::Ok, S::Error> {
    let mut hasher = StreamHasher::new();
    for (path, input) in *files {
        hasher.update(path.as_bytes());
        hasher.update(b"\0");
        match input {
            FileInput::File { sha256, executable } => {
                hasher.update(if *executable { b"exec\0" } else { b"file\0" });
                hasher.update(sha256.as_bytes());
            }
            FileInput::Dir => hasher.update(b"dir\0"),
            FileInput::Symlink { target } => {
                hasher.update(b"symlink\0");
                hasher.update(target.as_bytes());
            }
        }
        hasher.update(b"\0");
    }
    s.collect_str(&hasher.finish())
}

impl KeyInputs<'_> {
    pub fn digest(&self) -> Digest {
        let bytes = canonical_json(self).unwrap_or_default();
        Digest::of(&bytes)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct StatEntry {
    size: u64,
    mtime_ns: i64,
    ctime_ns: i64,
    ino: u64,
    dev: u64,
    sha256: Digest,
}

#[derive(Debug, Default)]
struct StatCacheFile {
    /// When the cache was written; entries modified within a second of it are re-hashed, as git does for its
    /// index, because a same-second edit can keep size and mtime.
    written_ns: i64,
    entries: HashMap<String, StatEntry>,
}

const STAT_CACHE_HEADER: &str = "kiln-stat-cache 1";

impl StatCacheFile {
    /// One line per entry, `sha256 size mtime ctime ino dev path`: a cache hit reads it for every input file, and
    /// this parses several times faster than JSON. A line that does not parse is skipped (that file is re-hashed).
    fn parse(text: &str) -> StatCacheFile {
        let mut lines = text.split('\n');
        let Some(written_ns) =
            lines.next().and_then(|h| h.strip_prefix(STAT_CACHE_HEADER)).and_then(|w| w.trim().parse().ok())
        else {
            return StatCacheFile::default();
        };
        let lines: Vec<&str> = lines.collect();
        let entries = lines
            .par_iter()
            .filter_map(|line| {
                let mut fields = line.splitn(7, ' ');
                let sha256 = Digest::parse(fields.next()?).ok()?;
                let entry = StatEntry {
                    size: fields.next()?.parse().ok()?,
                    mtime_ns: fields.next()?.parse().ok()?,
                    ctime_ns: fields.next()?.parse().ok()?,
                    ino: fields.next()?.parse().ok()?,
                    dev: fields.next()?.parse().ok()?,
                    sha256,
                };
                Some((fields.next()?.to_string(), entry))
            })
            .collect();
        StatCacheFile { written_ns, entries }
    }

    fn render(&self) -> String {
        let mut out = format!("{STAT_CACHE_HEADER} {}\n", self.written_ns);
        let mut sorted: Vec<(&String, &StatEntry)> = self.entries.iter().filter(|(p, _)| !p.contains('\n')).collect();
        sorted.sort_unstable_by(|a, b| a.0.cmp(b.0));
        for (path, e) in sorted {
            out.push_str(&format!(
                "{} {} {} {} {} {} {path}\n",
                e.sha256.hex(),
                e.size,
                e.mtime_ns,
                e.ctime_ns,
                e.ino,
                e.dev
            ));
        }
        out
    }
}

/// Hashes files, reusing earlier hashes when (size, mtime, ctime, inode, device) are unchanged.
pub struct FileHasher {
    path: Option<PathBuf>,
    cache: StatCacheFile,
    fresh: HashMap<String, StatEntry>,
    hashed: usize,
}

/// Nanoseconds since the epoch; i64 holds them until 2262 and parses much faster than i128.
fn nanos(secs: i64, nsecs: i64) -> i64 {
    secs.saturating_mul(1_000_000_000).saturating_add(nsecs)
}

fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos() as i64).unwrap_or_default()
}

fn hash_file(path: &Path) -> Result<Digest, std::io::Error> {
    thread_local! {
        // One buffer per thread: zeroing a fresh 256 KiB buffer for each of 10,000 small files costs more than
        // hashing them.
        static BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0u8; 256 * 1024]);
    }
    let mut file = fs::File::open(path)?;
    BUFFER.with(|buffer| {
        let mut buf = buffer.borrow_mut();
        let mut hasher = StreamHasher::new();
        loop {
            let n = file.read(&mut buf)?;
            if n == 0 {
                break;
            }
            hasher.update(&buf[..n]);
        }
        Ok(hasher.finish())
    })
}

impl FileHasher {
    /// A hasher whose stat cache lives at `path` (None: no cache).
    pub fn open(path: Option<PathBuf>) -> FileHasher {
        let cache = path
            .as_ref()
            .and_then(|p| fs::read_to_string(p).ok())
            .map(|t| StatCacheFile::parse(&t))
            .unwrap_or_default();
        FileHasher { path, cache, fresh: HashMap::new(), hashed: 0 }
    }

    /// How many files had to be read (the rest came from the stat cache).
    pub fn files_hashed(&self) -> usize {
        self.hashed
    }

    /// Every file under the provision steps' sources, keyed by repository-relative path. With `tracked` (the
    /// repository is a git work tree), only what git tracks: a source git does not track is an error, and below a
    /// copied directory untracked and ignored files are left out.
    pub fn recipe_files(
        &mut self,
        recipe: &Recipe,
        tracked: Option<&Tracked>,
    ) -> Result<BTreeMap<String, FileInput>, KeyError> {
        let mut found: Vec<Found> = Vec::new();
        for step in &recipe.provision {
            let source = match step {
                Provision::Copy { source, .. } => source,
                Provision::Run { script, .. } => script,
                Provision::Shell { .. } => continue,
            };
            let walked = walk_tree(&source.relative, &source.absolute, None, tracked)?;
            if let (Some(tracked), Some((rel, _, meta))) = (tracked, walked.first()) {
                let held = if meta.is_dir() { tracked.holds_dir(rel) } else { tracked.holds_file(rel) };
                if !held {
                    return Err(KeyError::Untracked { path: rel.clone() });
                }
            }
            found.extend(walked);
        }
        self.hash_paths(found)
    }

    /// Hashes the given files (repository-relative path, absolute path, lstat), through the stat cache.
    fn hash_paths(&mut self, stats: Vec<Found>) -> Result<BTreeMap<String, FileInput>, KeyError> {
        let written = self.cache.written_ns;
        let results: Vec<(String, FileInput, Option<StatEntry>, bool)> = stats
            .par_iter()
            .map(|(rel, abs, meta)| {
                let kind = meta.file_type();
                if kind.is_symlink() {
                    let target = fs::read_link(abs).map_err(|source| KeyError::Read { path: abs.clone(), source })?;
                    return Ok((
                        rel.clone(),
                        FileInput::Symlink { target: target.to_string_lossy().into_owned() },
                        None,
                        false,
                    ));
                }
                if kind.is_dir() {
                    return Ok((rel.clone(), FileInput::Dir, None, false));
                }
                let executable = meta.permissions().mode() & 0o111 != 0;
                let mtime_ns = nanos(meta.mtime(), meta.mtime_nsec());
                let probe = StatEntry {
                    size: meta.size(),
                    mtime_ns,
                    ctime_ns: nanos(meta.ctime(), meta.ctime_nsec()),
                    ino: meta.ino(),
                    dev: meta.dev(),
                    sha256: Digest::ZERO,
                };
                let cached = self.cache.entries.get(rel).filter(|e| {
                    let same = StatEntry { sha256: Digest::ZERO, ..(*e).clone() } == probe;
                    same && mtime_ns.max(probe.ctime_ns) + 1_000_000_000 < written
                });
                let (sha256, hashed) = match cached {
                    Some(entry) => (entry.sha256, false),
                    None => (hash_file(abs).map_err(|source| KeyError::Read { path: abs.clone(), source })?, true),
                };
                Ok((rel.clone(), FileInput::File { sha256, executable }, Some(StatEntry { sha256, ..probe }), hashed))
            })
            .collect::<Result<_, KeyError>>()?;
        let mut files = Vec::with_capacity(results.len());
        for (rel, input, entry, hashed) in results {
            if hashed {
                self.hashed += 1;
            }
            // Only what changed goes into the next cache write; an unchanged cache is not rewritten.
            if let Some(entry) = entry.filter(|e| self.cache.entries.get(&rel) != Some(e)) {
                self.fresh.insert(rel.clone(), entry);
            }
            files.push((rel, input));
        }
        // The walk yields paths in order, and building a BTreeMap from sorted pairs is a bulk load.
        Ok(files.into_iter().collect())
    }

    /// Saves the stat cache when anything had to be hashed; best effort.
    pub fn save(&mut self) {
        let Some(path) = &self.path else { return };
        if self.fresh.is_empty() && self.hashed == 0 {
            return;
        }
        let mut entries = std::mem::take(&mut self.cache.entries);
        entries.extend(std::mem::take(&mut self.fresh));
        let file = StatCacheFile { written_ns: now_ns(), entries };
        let result = crate::fsutil::replace_file(path, file.render().as_bytes());
        if let Err(err) = result {
            tracing::debug!(%err, "could not save the stat cache");
        }
        self.cache = file;
    }
}

/// One input path: repository-relative, absolute, and its lstat.
type Found = (String, PathBuf, fs::Metadata);

/// Collects `abs` and, for a directory, everything below it that `tracked` holds (everything without it), sorted;
/// symlinks are not followed. Each path is stat'ed once (a directory entry's metadata comes from its parent's
/// listing), subdirectories in parallel; an untracked directory is not entered at all.
fn walk_tree(
    rel: &str,
    abs: &Path,
    meta: Option<fs::Metadata>,
    tracked: Option<&Tracked>,
) -> Result<Vec<Found>, KeyError> {
    let read_error = |source| KeyError::Read { path: abs.to_path_buf(), source };
    let meta = match meta {
        Some(meta) => meta,
        None => fs::symlink_metadata(abs).map_err(read_error)?,
    };
    check_kind(abs, &meta)?;
    let is_dir = meta.is_dir();
    let mut found = vec![(rel.to_string(), abs.to_path_buf(), meta)];
    if !is_dir {
        return Ok(found);
    }
    let mut entries: Vec<fs::DirEntry> =
        fs::read_dir(abs).map_err(read_error)?.collect::<Result<_, _>>().map_err(read_error)?;
    entries.sort_by_key(|e| e.file_name());
    // Files are stat'ed in this directory's task; only subdirectories fan out, so a task is never one file.
    let mut items: Vec<Result<Vec<Found>, KeyError>> = Vec::new();
    let mut subdirs = Vec::new();
    for (index, entry) in entries.iter().enumerate() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let child = format!("{rel}/{name}");
        // git's index answers from memory, so the untracked are skipped before they cost a stat.
        let is_dir_hint = entry.file_type().is_ok_and(|t| t.is_dir());
        if let Some(tracked) = tracked {
            let held = if is_dir_hint { tracked.holds_dir(&child) } else { tracked.holds_file(&child) };
            if !held {
                items.push(Ok(Vec::new()));
                continue;
            }
        }
        let path = entry.path();
        let meta = entry.metadata().map_err(|source| KeyError::Read { path: path.clone(), source })?;
        if meta.is_dir() {
            subdirs.push((index, child, path, meta));
            items.push(Ok(Vec::new()));
        } else {
            check_kind(&path, &meta)?;
            items.push(Ok(vec![(child, path, meta)]));
        }
    }
    let walked: Vec<(usize, Result<Vec<Found>, KeyError>)> = subdirs
        .into_par_iter()
        .map(|(index, rel, path, meta)| (index, walk_tree(&rel, &path, Some(meta), tracked)))
        .collect();
    for (index, result) in walked {
        items[index] = result;
    }
    for item in items {
        found.extend(item?);
    }
    Ok(found)
}

fn check_kind(path: &Path, meta: &fs::Metadata) -> Result<(), KeyError> {
    let kind = meta.file_type();
    if kind.is_dir() || kind.is_file() || kind.is_symlink() {
        Ok(())
    } else {
        Err(KeyError::Unsupported { path: path.to_path_buf(), kind: "special file (socket, fifo or device)" })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::recipe::{AwsBase, AwsRecipe};
    use crate::config::RepoPath;

    fn local_key(recipe: &Recipe) -> Digest {
        let files = BTreeMap::from([(
            "images/files/a".to_string(),
            FileInput::File { sha256: Digest::of(b"a"), executable: false },
        )]);
        KeyInputs {
            kiln_key_format: KEY_FORMAT,
            recipe_name: &recipe.name,
            recipe,
            parent_digest: None,
            provider: "local",
            provider_settings: serde_json::json!({ "os": "linux" }),
            files: &files,
        }
        .digest()
    }

    #[test]
    fn an_aws_section_leaves_the_local_key_alone() {
        let plain = Recipe {
            name: "base".into(),
            file: RepoPath { relative: "images/base.toml".into(), absolute: "/repo/images/base.toml".into() },
            description: None,
            parent: None,
            provision: vec![Provision::Shell { command: "true".into(), timeout_secs: 600 }],
            instance: None,
            aws: None,
        };
        let with_aws = Recipe {
            aws: Some(AwsRecipe {
                base: Some(AwsBase { owner: "136693071363".into(), name: "debian-12-amd64-*".into() }),
                base_ami: None,
                instance_type: Some("t3.small".into()),
                volume_size_gib: Some(8),
                instance_profile: Some("kiln-builder".into()),
            }),
            ..plain.clone()
        };
        assert_eq!(local_key(&plain), local_key(&with_aws));
        // The comparison can fail: a change the key does cover moves it.
        let other_step = Recipe {
            provision: vec![Provision::Shell { command: "false".into(), timeout_secs: 600 }],
            ..plain.clone()
        };
        assert_ne!(local_key(&plain), local_key(&other_step));
    }

    #[test]
    fn the_stat_cache_skips_unchanged_files_and_notices_changes() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a");
        fs::write(&file, "one").unwrap();
        let old = SystemTime::now() - std::time::Duration::from_secs(10);
        fs::File::options().write(true).open(&file).unwrap().set_modified(old).unwrap();
        let cache = dir.path().join("stat.json");
        let recipe_file =
            |hasher: &mut FileHasher| hasher.hash_paths(walk_tree("a", &file, None, None).unwrap()).unwrap();
        let mut first = FileHasher::open(Some(cache.clone()));
        let a = recipe_file(&mut first);
        assert_eq!(first.files_hashed(), 1);
        // Entries changed within a second of the cache write are not trusted (racy mtime); let that second pass.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        first.save();
        let mut second = FileHasher::open(Some(cache.clone()));
        assert_eq!(recipe_file(&mut second), a);
        assert_eq!(second.files_hashed(), 0, "unchanged file came from the cache");
        fs::write(&file, "two").unwrap();
        fs::File::options().write(true).open(&file).unwrap().set_modified(old).unwrap();
        let mut third = FileHasher::open(Some(cache));
        assert_ne!(recipe_file(&mut third), a, "same size and mtime, but ctime moved: re-hashed");
    }
}
