//! `kiln.lock`: the base AMI each root recipe resolved to, per region. A base given by owner and name pattern
//! resolves to the newest match once; the lock is committed, so every bake (and every recipe key) uses the same base
//! until `kiln bake --update-base` resolves it again, as Cargo.lock does for dependencies.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::recipe::AwsBase;
use crate::config::Recipe;
use crate::provider::ProviderError;

pub const LOCK_FILE: &str = "kiln.lock";

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Lock {
    #[serde(default, rename = "base")]
    pub bases: Vec<LockedBase>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LockedBase {
    pub recipe: String,
    pub region: String,
    /// What the recipe asked for (`owner=… name=…`, or the pinned AMI id): a recipe that asks for something else
    /// no longer matches its entry, which is then resolved again.
    pub source: String,
    pub ami: String,
    /// The AMI's name, for people reading the lock.
    #[serde(default)]
    pub name: String,
    pub resolved_at: String,
}

/// What a root recipe asks for as its base, in the form the lock records; `None` when it asks for nothing.
pub fn source_of(recipe: &Recipe) -> Option<String> {
    let aws = recipe.aws.as_ref()?;
    if let Some(ami) = &aws.base_ami {
        return Some(ami.clone());
    }
    aws.base.as_ref().map(|AwsBase { owner, name }| format!("owner={owner} name={name}"))
}

pub fn path(repo_root: &Path) -> PathBuf {
    repo_root.join(LOCK_FILE)
}

pub fn load(repo_root: &Path) -> Result<Lock, ProviderError> {
    let path = path(repo_root);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(Lock::default()),
        Err(source) => return Err(ProviderError::Io { what: "cannot read the lock file", path, source }),
    };
    toml::from_str(&text).map_err(|err| {
        let at = err
            .span()
            .map(|span| {
                let before = &text[..span.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
                format!(":{line}:{column}")
            })
            .unwrap_or_default();
        ProviderError::Invalid {
            provider: "aws",
            message: format!(
                "{}{at}: {}; fix it, or delete it and run `kiln bake --update-base`",
                path.display(),
                err.message()
            ),
        }
    })
}

pub fn save(repo_root: &Path, lock: &Lock) -> Result<(), ProviderError> {
    let path = path(repo_root);
    let mut text = String::from(
        "# kiln.lock: the base AMI each root recipe resolved to, per region. Commit this file; resolve again with\n\
         # `kiln bake --update-base`.\n\n",
    );
    let body = toml::to_string(lock).map_err(|err| ProviderError::Other {
        provider: "aws",
        message: format!("cannot write {}: {err}", path.display()),
    })?;
    text.push_str(&body);
    crate::fsutil::replace_file(&path, text.as_bytes()).map_err(|source| ProviderError::Io {
        what: "cannot write the lock file",
        path,
        source,
    })
}

impl Lock {
    /// The locked base of `recipe` in `region`, when it still matches what the recipe asks for.
    pub fn find(&self, recipe: &Recipe, region: &str) -> Option<&LockedBase> {
        let source = source_of(recipe)?;
        self.bases.iter().find(|b| b.recipe == recipe.name && b.region == region && b.source == source)
    }

    /// Records `entry`, replacing whatever the recipe had in that region.
    pub fn put(&mut self, entry: LockedBase) {
        self.bases.retain(|b| !(b.recipe == entry.recipe && b.region == entry.region));
        self.bases.push(entry);
        self.bases.sort_by(|a, b| (&a.recipe, &a.region).cmp(&(&b.recipe, &b.region)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lock_round_trips_and_a_broken_one_names_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut lock = Lock::default();
        lock.put(LockedBase {
            recipe: "base".into(),
            region: "us-east-1".into(),
            source: "owner=136693071363 name=debian-12-*".into(),
            ami: "ami-0123456789abcdef0".into(),
            name: "debian-12-amd64-20261101".into(),
            resolved_at: "2026-11-29T00:00:00Z".into(),
        });
        save(dir.path(), &lock).unwrap();
        assert_eq!(load(dir.path()).unwrap(), lock);
        std::fs::write(path(dir.path()), "[[base]]\nrecipe = \"base\"\nregoin = \"x\"\n").unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("kiln.lock:3:1") && err.contains("regoin"), "{err}");
    }
}
