//! Filesystem helpers shared by the caches and the local provider's state files.

use std::io::Write;
use std::path::Path;

/// Replaces `path` with `bytes` atomically: readers see the old content or the new, never a torn write. Not
/// fsync'd: callers use it for state that can be rebuilt (caches, provider bookkeeping re-read on start).
pub fn replace_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut temp = tempfile::NamedTempFile::new_in(dir)?;
    temp.write_all(bytes)?;
    temp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
