//! The file store: one file per key, created with write-to-temp + `link(2)`, which fails if the key exists.

use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use super::store::{Created, Store, StoreError};

const TEMP_DIR: &str = "tmp";

pub struct FileStore {
    root: PathBuf,
}

static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl FileStore {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        FileStore { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn io(&self, operation: &'static str, key: &str, source: std::io::Error) -> StoreError {
        StoreError::Io { operation, key: key.to_string(), location: self.location(), source }
    }

    fn temp_path(&self) -> PathBuf {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.root.join(TEMP_DIR).join(format!("{}-{nanos}-{n}.tmp", std::process::id()))
    }
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

impl Store for FileStore {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let read = || -> std::io::Result<Vec<u8>> {
            let file = File::open(self.root.join(key))?;
            // Events are a few hundred bytes. `fs::read` would first ask the kernel for the size, one more
            // syscall per event, which `verify` pays a million times; reading through `Take` skips that.
            let mut bytes = Vec::with_capacity(1024);
            file.take(u64::MAX).read_to_end(&mut bytes)?;
            Ok(bytes)
        };
        match read() {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.io("reading", key, e)),
        }
    }

    fn create(&self, key: &str, bytes: &[u8]) -> Result<Created, StoreError> {
        let target = self.root.join(key);
        let parent = target.parent().unwrap_or(&self.root).to_path_buf();
        fs::create_dir_all(&parent).map_err(|e| self.io("creating directory for", key, e))?;
        fs::create_dir_all(self.root.join(TEMP_DIR)).map_err(|e| self.io("creating temp directory for", key, e))?;
        // The value is complete and durable before it gets its name, so a crash leaves either nothing or all of it.
        let temp = self.temp_path();
        let written = (|| {
            let mut file = File::options().write(true).create_new(true).open(&temp)?;
            file.write_all(bytes)?;
            file.sync_all()
        })();
        if let Err(e) = written {
            let _ = fs::remove_file(&temp);
            return Err(self.io("writing", key, e));
        }
        let linked = fs::hard_link(&temp, &target);
        let _ = fs::remove_file(&temp);
        match linked {
            Ok(()) => {
                sync_dir(&parent).map_err(|e| self.io("syncing directory of", key, e))?;
                Ok(Created::Yes)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(Created::AlreadyExists),
            Err(e) => Err(self.io("linking", key, e)),
        }
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let (dir, name_prefix) = match prefix.rsplit_once('/') {
            Some((dir, rest)) => (self.root.join(dir), rest),
            None => (self.root.clone(), prefix),
        };
        let dir_key = prefix.rsplit_once('/').map(|(d, _)| format!("{d}/")).unwrap_or_default();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io("listing", prefix, e)),
        };
        let mut keys = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| self.io("listing", prefix, e))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(name_prefix) {
                keys.push(format!("{dir_key}{name}"));
            }
        }
        Ok(keys)
    }

    fn location(&self) -> String {
        self.root.display().to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::new(dir.path());
        assert_eq!(store.create("events/1.json", b"first").unwrap(), Created::Yes);
        assert_eq!(store.create("events/1.json", b"second").unwrap(), Created::AlreadyExists);
        assert_eq!(store.get("events/1.json").unwrap().unwrap(), b"first");
        assert_eq!(store.get("events/2.json").unwrap(), None);
        assert_eq!(store.list("events/").unwrap(), vec!["events/1.json".to_string()]);
        assert_eq!(fs::read_dir(dir.path().join(TEMP_DIR)).unwrap().count(), 0, "temp files are cleaned up");
    }
}
