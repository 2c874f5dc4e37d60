//! Deterministic layer tars: what a directory tree adds, changes or deletes relative to a base tree, written as an
//! uncompressed OCI layer whose bytes depend only on the trees' content.
//!
//! Everything a checkout or a build machine varies is normalised away so the same tree always gives the same
//! diff_id: entries are sorted by path bytes, mtimes are 0 (`SOURCE_DATE_EPOCH` is deliberately not consulted: a
//! constant needs no coordination between machines), owners are 0 with no names, and modes collapse to 0755/0644
//! for files, 0755 for directories and 0777 for symlinks. Headers are GNU, with GNU long-name entries for paths or
//! link targets of 100 bytes or more, and carry no atime, ctime or extended attributes.

use std::collections::BTreeSet;
use std::ffi::OsString;
use std::fs::{self, File, Metadata};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tar::{EntryType, Header};

use crate::digest::{Digest, StreamHasher};

/// A name starting with this deletes its namesake from the layers below.
pub const WHITEOUT_PREFIX: &str = ".wh.";
/// This name hides everything the layers below put in its directory.
pub const OPAQUE_WHITEOUT: &str = ".wh..wh..opq";

/// What [`first_difference`] returns when two layers hold the same entries but differ after the last one.
pub const TRAILER_DIFFERENCE: &str = "(end of archive)";

const BLOCK: usize = 512;
const NAME_FIELD: usize = 100;
const BUFFER: usize = 1 << 20;

/// The identity of a finished layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerStats {
    /// sha256 of the tar bytes. Layers are stored uncompressed, so this is both the blob digest and the diff_id.
    pub digest: Digest,
    /// Bytes in the tar.
    pub size: u64,
    /// Entries in the tar (files, directories, symlinks and whiteouts; GNU long-name records are not counted).
    pub entries: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("cannot read {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write the layer")]
    Write {
        #[source]
        source: io::Error,
    },
    #[error("{path} is not a directory")]
    NotADirectory { path: PathBuf },
    #[error("{path}: names starting with `.wh.` are reserved for OCI whiteouts")]
    ReservedName { path: PathBuf },
    #[error("{path} changed while it was being layered")]
    Changed { path: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LayerError + '_ {
    move |source| LayerError::Io { path: path.to_path_buf(), source }
}

fn write_err(source: io::Error) -> LayerError {
    LayerError::Write { source }
}

/// Writes to `out` an uncompressed tar holding what `root` adds or changes relative to `base` (None = empty base),
/// with OCI whiteouts for what `root` deleted. Hashes while writing (one pass).
pub fn write_diff_layer(base: Option<&Path>, root: &Path, out: impl Write) -> Result<LayerStats, LayerError> {
    write_layer(base, root, out, None)
}

/// `skip` is the (device, inode) of the file being written, should it live inside `root`.
fn write_layer(
    base: Option<&Path>,
    root: &Path,
    out: impl Write,
    skip: Option<(u64, u64)>,
) -> Result<LayerStats, LayerError> {
    for dir in base.into_iter().chain([root]) {
        if !fs::metadata(dir).map_err(io_err(dir))?.is_dir() {
            return Err(LayerError::NotADirectory { path: dir.to_path_buf() });
        }
    }
    let mut differ = Differ { base, root, skip, items: Vec::new() };
    differ.walk(Path::new(""), base.is_some())?;
    let mut items = differ.items;
    // Sorting whole paths (directories with their trailing `/`) keeps every parent before its children, since a
    // path sorts before any longer path it prefixes.
    items.sort_by(|a, b| a.name.cmp(&b.name));

    let mut out =
        BufWriter::with_capacity(BUFFER, HashingWriter { inner: out, hasher: StreamHasher::new(), written: 0 });
    for item in &items {
        write_item(&mut out, item)?;
    }
    out.write_all(&[0u8; 2 * BLOCK]).map_err(write_err)?;
    let tee = out.into_inner().map_err(|e| write_err(e.into_error()))?;
    let HashingWriter { mut inner, hasher, written } = tee;
    inner.flush().map_err(write_err)?;
    Ok(LayerStats { digest: hasher.finish(), size: written, entries: items.len() as u64 })
}

/// Same as [`write_diff_layer`], written to a temp file inside `dir`; returns the temp file (the caller moves it into
/// the blob store, which is why `dir` should be on the store's filesystem).
pub fn write_diff_layer_file(
    base: Option<&Path>,
    root: &Path,
    dir: &Path,
) -> Result<(tempfile::NamedTempFile, LayerStats), LayerError> {
    let temp = tempfile::Builder::new().prefix(".layer-").suffix(".tar").tempfile_in(dir).map_err(io_err(dir))?;
    let meta = temp.as_file().metadata().map_err(io_err(temp.path()))?;
    let stats = write_layer(base, root, temp.as_file(), Some((meta.dev(), meta.ino())))?;
    Ok((temp, stats))
}

/// The first path whose entry differs between two layer tars (so `kiln bake --check` can name the first differing
/// file), or None if they are byte-identical. Entries compare by path, raw header and content; a path present in
/// only one layer is reported as soon as the walk reaches it.
pub fn first_difference(a: &Path, b: &Path) -> Result<Option<String>, LayerError> {
    let (file_a, file_b) = (File::open(a).map_err(io_err(a))?, File::open(b).map_err(io_err(b))?);
    let same_len = file_a.metadata().map_err(io_err(a))?.len() == file_b.metadata().map_err(io_err(b))?.len();
    if same_len && same_stream(&mut BufReader::new(&file_a), &mut BufReader::new(&file_b)).map_err(io_err(a))? {
        return Ok(None);
    }
    let mut archive_a = tar::Archive::new(BufReader::with_capacity(BUFFER, File::open(a).map_err(io_err(a))?));
    let mut archive_b = tar::Archive::new(BufReader::with_capacity(BUFFER, File::open(b).map_err(io_err(b))?));
    let mut entries_a = archive_a.entries().map_err(io_err(a))?;
    let mut entries_b = archive_b.entries().map_err(io_err(b))?;
    loop {
        let next_a = entries_a.next().transpose().map_err(io_err(a))?;
        let next_b = entries_b.next().transpose().map_err(io_err(b))?;
        let (mut x, mut y) = match (next_a, next_b) {
            (None, None) => return Ok(Some(TRAILER_DIFFERENCE.to_string())),
            (Some(x), None) => return Ok(Some(display_path(&x.path_bytes()))),
            (None, Some(y)) => return Ok(Some(display_path(&y.path_bytes()))),
            (Some(x), Some(y)) => (x, y),
        };
        let (path_x, path_y) = (x.path_bytes().into_owned(), y.path_bytes().into_owned());
        if path_x != path_y {
            return Ok(Some(display_path(path_x.min(path_y).as_slice())));
        }
        let same = x.header().as_bytes() == y.header().as_bytes()
            && x.link_name_bytes() == y.link_name_bytes()
            && same_stream(&mut x, &mut y).map_err(io_err(a))?;
        if !same {
            return Ok(Some(display_path(&path_x)));
        }
    }
}

fn display_path(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Compares two streams to their ends without holding either in memory.
fn same_stream(a: &mut impl Read, b: &mut impl Read) -> io::Result<bool> {
    let mut buf_a = vec![0u8; 64 * 1024];
    let mut buf_b = vec![0u8; 64 * 1024];
    loop {
        let n = read_full(a, &mut buf_a)?;
        let m = read_full(b, &mut buf_b)?;
        if buf_a[..n] != buf_b[..m] {
            return Ok(false);
        }
        if n < buf_a.len() {
            return Ok(true);
        }
    }
}

/// Reads until `buf` is full or the stream ends, so two streams chunked differently by the OS still line up.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// What a path is, after normalisation: only what can change a layer's bytes.
#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File { mode: u32, size: u64 },
    Symlink { target: OsString },
}

/// Files keep only "executable or not": umask and checkout tools disagree on everything else.
fn file_mode(mode: u32) -> u32 {
    if mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// None for sockets, fifos and devices, which a layer cannot usefully carry.
fn node_of(path: &Path, meta: &Metadata) -> Result<Option<Node>, LayerError> {
    let kind = meta.file_type();
    Ok(if kind.is_dir() {
        Some(Node::Dir)
    } else if kind.is_file() {
        Some(Node::File { mode: file_mode(meta.mode()), size: meta.len() })
    } else if kind.is_symlink() {
        Some(Node::Symlink { target: fs::read_link(path).map_err(io_err(path))?.into_os_string() })
    } else {
        None
    })
}

fn sorted_names(dir: &Path) -> Result<BTreeSet<OsString>, LayerError> {
    let mut names = BTreeSet::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        names.insert(entry.map_err(io_err(dir))?.file_name());
    }
    Ok(names)
}

enum ItemKind {
    Dir,
    File { source: PathBuf, mode: u32, size: u64 },
    Symlink { target: OsString },
    Whiteout,
}

struct Item {
    /// The path inside the tar, as bytes: relative, `/`-separated, directories ending in `/`.
    name: Vec<u8>,
    kind: ItemKind,
}

struct Differ<'a> {
    base: Option<&'a Path>,
    root: &'a Path,
    skip: Option<(u64, u64)>,
    items: Vec<Item>,
}

fn tar_name(rel: &Path, dir: bool) -> Vec<u8> {
    let mut name = rel.as_os_str().as_bytes().to_vec();
    if dir {
        name.push(b'/');
    }
    name
}

impl Differ<'_> {
    /// Diffs the directory `rel` (relative to both trees); `in_base` says whether the base has a directory there.
    /// Returns whether anything at or below `rel` was emitted, which is what decides whether `rel` itself is.
    fn walk(&mut self, rel: &Path, in_base: bool) -> Result<bool, LayerError> {
        let root_dir = self.root.join(rel);
        let base_dir = self.base.filter(|_| in_base).map(|base| base.join(rel));
        let mut base_names = match &base_dir {
            Some(dir) => sorted_names(dir)?,
            None => BTreeSet::new(),
        };
        let mut changed = false;
        for name in sorted_names(&root_dir)? {
            let child_rel = rel.join(&name);
            let root_path = root_dir.join(&name);
            if name.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes()) {
                return Err(LayerError::ReservedName { path: root_path });
            }
            let meta = fs::symlink_metadata(&root_path).map_err(io_err(&root_path))?;
            if self.skip == Some((meta.dev(), meta.ino())) {
                continue;
            }
            let Some(node) = node_of(&root_path, &meta)? else {
                tracing::warn!(path = %root_path.display(), "skipping a socket, fifo or device: layers carry only files, directories and symlinks");
                continue;
            };
            let base_path = match &base_dir {
                Some(dir) if base_names.remove(&name) => Some(dir.join(&name)),
                _ => None,
            };
            let base_node = match &base_path {
                Some(path) => node_of(path, &fs::symlink_metadata(path).map_err(io_err(path))?)?,
                None => None,
            };
            match node {
                Node::Dir => {
                    let base_is_dir = base_node == Some(Node::Dir);
                    // Recurse first: whether the directory entry is needed depends on what changed below it.
                    let below = self.walk(&child_rel, base_is_dir)?;
                    if below || !base_is_dir {
                        self.items.push(Item { name: tar_name(&child_rel, true), kind: ItemKind::Dir });
                        changed = true;
                    }
                }
                Node::File { mode, size } => {
                    let same = match (&base_node, &base_path) {
                        (Some(Node::File { mode: m, size: s }), Some(base_path)) if *m == mode && *s == size => {
                            same_file_content(&root_path, base_path)?
                        }
                        _ => false,
                    };
                    if !same {
                        let kind = ItemKind::File { source: root_path, mode, size };
                        self.items.push(Item { name: tar_name(&child_rel, false), kind });
                        changed = true;
                    }
                }
                Node::Symlink { target } => {
                    if !matches!(&base_node, Some(Node::Symlink { target: t }) if *t == target) {
                        self.items.push(Item { name: tar_name(&child_rel, false), kind: ItemKind::Symlink { target } });
                        changed = true;
                    }
                }
            }
        }
        // What is left of the base listing was deleted. A deleted directory gets one whiteout, never one per child.
        if let Some(dir) = &base_dir {
            for name in base_names {
                let path = dir.join(&name);
                // Special files never made it into a layer, so there is nothing to white out.
                if node_of(&path, &fs::symlink_metadata(&path).map_err(io_err(&path))?)?.is_none() {
                    continue;
                }
                let mut whiteout = OsString::from(WHITEOUT_PREFIX);
                whiteout.push(&name);
                self.items.push(Item { name: tar_name(&rel.join(whiteout), false), kind: ItemKind::Whiteout });
                changed = true;
            }
        }
        Ok(changed)
    }
}

fn same_file_content(a: &Path, b: &Path) -> Result<bool, LayerError> {
    let mut file_a = BufReader::new(File::open(a).map_err(io_err(a))?);
    let mut file_b = BufReader::new(File::open(b).map_err(io_err(b))?);
    same_stream(&mut file_a, &mut file_b).map_err(io_err(a))
}

fn write_item(out: &mut impl Write, item: &Item) -> Result<(), LayerError> {
    match &item.kind {
        ItemKind::Dir => write_header(out, &item.name, EntryType::Directory, 0o755, 0, b"").map_err(write_err),
        ItemKind::Whiteout => write_header(out, &item.name, EntryType::Regular, 0o644, 0, b"").map_err(write_err),
        ItemKind::Symlink { target } => {
            write_header(out, &item.name, EntryType::Symlink, 0o777, 0, target.as_bytes()).map_err(write_err)
        }
        ItemKind::File { source, mode, size } => {
            // O_NOFOLLOW: the walk saw a regular file here; if it became a symlink since, fail rather than follow.
            let file = fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW)
                .open(source)
                .map_err(io_err(source))?;
            let now = file.metadata().map_err(io_err(source))?;
            if !now.is_file() || now.len() != *size {
                return Err(LayerError::Changed { path: source.clone() });
            }
            write_header(out, &item.name, EntryType::Regular, *mode, *size, b"").map_err(write_err)?;
            let mut reader = Blame::new((&file).take(*size));
            let copied = io::copy(&mut reader, out).map_err(|err| {
                if reader.failed {
                    LayerError::Io { path: source.clone(), source: err }
                } else {
                    LayerError::Write { source: err }
                }
            })?;
            if copied != *size {
                return Err(LayerError::Changed { path: source.clone() });
            }
            pad(out, *size).map_err(write_err)
        }
    }
}

fn pad(out: &mut impl Write, size: u64) -> io::Result<()> {
    let rem = (size % BLOCK as u64) as usize;
    if rem != 0 {
        out.write_all(&[0u8; BLOCK][..BLOCK - rem])?;
    }
    Ok(())
}

/// Writes one entry's header, preceded by GNU long-name records when the path or link target does not fit.
/// Headers are built by hand because the `tar` crate's path setters normalise paths (dropping a directory's trailing
/// `/`, rewriting symlink targets), and targets must be stored verbatim.
fn write_header(
    out: &mut impl Write,
    name: &[u8],
    kind: EntryType,
    mode: u32,
    size: u64,
    link: &[u8],
) -> io::Result<()> {
    if name.len() >= NAME_FIELD {
        write_long_name(out, EntryType::GNULongName, name)?;
    }
    if link.len() >= NAME_FIELD {
        write_long_name(out, EntryType::GNULongLink, link)?;
    }
    let mut header = base_header(kind, mode, size);
    let old = header.as_old_mut();
    let n = name.len().min(NAME_FIELD);
    old.name[..n].copy_from_slice(&name[..n]);
    let n = link.len().min(NAME_FIELD);
    old.linkname[..n].copy_from_slice(&link[..n]);
    header.set_cksum();
    out.write_all(header.as_bytes())
}

fn write_long_name(out: &mut impl Write, kind: EntryType, value: &[u8]) -> io::Result<()> {
    let size = value.len() as u64 + 1;
    let mut header = base_header(kind, 0o644, size);
    let label = b"././@LongLink";
    header.as_old_mut().name[..label.len()].copy_from_slice(label);
    header.set_cksum();
    out.write_all(header.as_bytes())?;
    out.write_all(value)?;
    out.write_all(&[0])?;
    pad(out, size)
}

fn base_header(kind: EntryType, mode: u32, size: u64) -> Header {
    let mut header = Header::new_gnu();
    header.set_entry_type(kind);
    header.set_mode(mode);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_size(size);
    header
}

/// Remembers whether a copy failed reading, so its error can name the right side (a missing file is not a full
/// disk).
pub(crate) struct Blame<R> {
    inner: R,
    pub(crate) failed: bool,
}

impl<R> Blame<R> {
    pub(crate) fn new(inner: R) -> Self {
        Blame { inner, failed: false }
    }
}

impl<R: Read> Read for Blame<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let result = self.inner.read(buf);
        if let Err(err) = &result {
            self.failed |= err.kind() != io::ErrorKind::Interrupted;
        }
        result
    }
}

/// Passes writes through while hashing and counting exactly the bytes the inner writer accepted.
struct HashingWriter<W> {
    inner: W,
    hasher: StreamHasher,
    written: u64,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a test file with its parent directories and a mode; for tests here and in the OCI store.
#[cfg(test)]
pub(crate) fn write_test_file(root: &Path, rel: &str, content: &[u8], mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, content).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Lists a layer's entries as `(path, type, mode, link target)`; for tests here and in the OCI store.
#[cfg(test)]
pub(crate) fn list_entries(tar_bytes: &[u8]) -> Vec<(String, EntryType, u32, Option<String>)> {
    let mut archive = tar::Archive::new(tar_bytes);
    archive
        .entries()
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let link = e.link_name_bytes().map(|l| display_path(&l));
            (display_path(&e.path_bytes()), e.header().entry_type(), e.header().mode().unwrap(), link)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::write_test_file as write;
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};
    use std::time::{Duration, SystemTime};

    fn layer(base: Option<&Path>, root: &Path) -> (Vec<u8>, LayerStats) {
        let mut bytes = Vec::new();
        let stats = write_diff_layer(base, root, &mut bytes).unwrap();
        (bytes, stats)
    }

    fn names(bytes: &[u8]) -> Vec<String> {
        list_entries(bytes).into_iter().map(|e| e.0).collect()
    }

    fn set_mtime(path: &Path, secs: u64) {
        let file = File::open(path).unwrap();
        file.set_modified(SystemTime::UNIX_EPOCH + Duration::from_secs(secs)).unwrap();
    }

    /// The same logical tree, built in a different order with different permission noise and mtimes.
    fn build_tree(root: &Path, variant: bool) {
        let files: [(&str, &[u8], u32, u32); 5] = [
            ("etc/app.conf", b"port = 8080\n", 0o600, 0o644),
            ("bin/app", b"#!/bin/sh\necho hi\n", 0o700, 0o4755),
            ("README", b"hello\n", 0o644, 0o664),
            ("a-b/c", b"", 0o640, 0o644),
            ("a/b/c/d.txt", b"deep", 0o444, 0o666),
        ];
        let ordered: Vec<_> = if variant { files.iter().rev().collect() } else { files.iter().collect() };
        for (rel, content, mode_a, mode_b) in ordered {
            write(root, rel, content, if variant { *mode_b } else { *mode_a });
        }
        symlink("../etc/app.conf", root.join("bin/conf")).unwrap();
        fs::create_dir_all(root.join("empty")).unwrap();
        let dir_mode = if variant { 0o700 } else { 0o2775 };
        fs::set_permissions(root.join("etc"), fs::Permissions::from_mode(dir_mode)).unwrap();
        for (i, rel) in ["etc/app.conf", "bin/app", "README", "a/b/c/d.txt"].iter().enumerate() {
            set_mtime(&root.join(rel), if variant { 1_000_000 + i as u64 } else { 42 });
        }
    }

    #[test]
    fn same_tree_gives_identical_bytes_whatever_the_noise() {
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        build_tree(one.path(), false);
        build_tree(two.path(), true);
        let (bytes_one, stats_one) = layer(None, one.path());
        let (bytes_two, stats_two) = layer(None, two.path());
        assert_eq!(stats_one, stats_two);
        assert_eq!(bytes_one, bytes_two);
        assert_eq!(stats_one.digest, Digest::of(&bytes_one));
        assert_eq!(stats_one.size, bytes_one.len() as u64);
        assert_eq!(
            names(&bytes_one),
            [
                "README",
                "a-b/",
                "a-b/c",
                "a/",
                "a/b/",
                "a/b/c/",
                "a/b/c/d.txt",
                "bin/",
                "bin/app",
                "bin/conf",
                "empty/",
                "etc/",
                "etc/app.conf"
            ]
        );
        assert_eq!(stats_one.entries, 13);
    }

    #[test]
    fn headers_are_normalised() {
        let dir = tempfile::tempdir().unwrap();
        build_tree(dir.path(), true);
        let (bytes, _) = layer(None, dir.path());
        let mut archive = tar::Archive::new(bytes.as_slice());
        for entry in archive.entries().unwrap() {
            let entry = entry.unwrap();
            let h = entry.header();
            let path = display_path(&entry.path_bytes());
            assert_eq!(h.mtime().unwrap(), 0, "{path}");
            assert_eq!((h.uid().unwrap(), h.gid().unwrap()), (0, 0), "{path}");
            assert_eq!(h.username_bytes(), Some(&b""[..]), "{path}");
            assert_eq!(h.groupname_bytes(), Some(&b""[..]), "{path}");
            assert!(h.as_gnu().is_some(), "{path} has a GNU header");
            assert_eq!(h.as_gnu().unwrap().atime, [0; 12], "{path}");
            let want = match path.as_str() {
                "bin/app" => 0o755,
                "bin/conf" => 0o777,
                p if p.ends_with('/') => 0o755,
                _ => 0o644,
            };
            assert_eq!(h.mode().unwrap(), want, "{path}");
        }
    }

    #[test]
    fn long_paths_and_link_targets_survive() {
        let dir = tempfile::tempdir().unwrap();
        let long_dir = "d".repeat(60);
        let long_file = format!("{long_dir}/{}", "f".repeat(120));
        write(dir.path(), &long_file, b"long", 0o644);
        let hundred = format!("{}/{}", "e".repeat(49), "g".repeat(50));
        assert_eq!(hundred.len(), 100);
        write(dir.path(), &hundred, b"exactly a hundred", 0o644);
        let target = format!("../{}", "t/".repeat(70));
        symlink(&target, dir.path().join("link")).unwrap();
        let (bytes, stats) = layer(None, dir.path());
        let entries = list_entries(&bytes);
        assert!(entries.iter().any(|e| e.0 == long_file), "{entries:?}");
        assert!(entries.iter().any(|e| e.0 == hundred), "{entries:?}");
        let link = entries.iter().find(|e| e.0 == "link").unwrap();
        assert_eq!(link.3.as_deref(), Some(target.as_str()), "symlink target is stored verbatim, trailing / and all");
        assert_eq!(stats.entries, 5);
        let mut archive = tar::Archive::new(bytes.as_slice());
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            if entry.path_bytes().as_ref() == long_file.as_bytes() {
                let mut content = String::new();
                entry.read_to_string(&mut content).unwrap();
                assert_eq!(content, "long");
            }
        }
    }

    #[test]
    fn symlinks_are_stored_not_followed_and_specials_skipped() {
        let outside = tempfile::tempdir().unwrap();
        write(outside.path(), "secret/key", b"do not pack", 0o600);
        let dir = tempfile::tempdir().unwrap();
        symlink(outside.path().join("secret"), dir.path().join("to-dir")).unwrap();
        symlink("missing/./target/", dir.path().join("dangling")).unwrap();
        let fifo = dir.path().join("pipe");
        let c_path = std::ffi::CString::new(fifo.as_os_str().as_bytes()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        write(dir.path(), "a", b"same inode", 0o644);
        fs::hard_link(dir.path().join("a"), dir.path().join("b")).unwrap();
        let (bytes, _) = layer(None, dir.path());
        let entries = list_entries(&bytes);
        let summary: Vec<_> = entries.iter().map(|e| (e.0.as_str(), e.1, e.3.as_deref())).collect();
        let secret = outside.path().join("secret");
        assert_eq!(
            summary,
            [
                ("a", EntryType::Regular, None),
                ("b", EntryType::Regular, None),
                ("dangling", EntryType::Symlink, Some("missing/./target/")),
                ("to-dir", EntryType::Symlink, Some(secret.to_str().unwrap())),
            ]
        );
    }

    #[test]
    fn unchanged_tree_gives_an_empty_layer() {
        let dir = tempfile::tempdir().unwrap();
        build_tree(dir.path(), false);
        let (bytes, stats) = layer(Some(dir.path()), dir.path());
        assert_eq!(stats.entries, 0);
        assert_eq!(bytes, vec![0u8; 1024]);
    }

    #[test]
    fn child_layer_holds_only_changes_and_whiteouts() {
        let base = tempfile::tempdir().unwrap();
        build_tree(base.path(), false);
        write(base.path(), "gone/deep/x", b"x", 0o644);
        write(base.path(), "gone/y", b"y", 0o644);
        write(base.path(), "keep/old", b"old", 0o644);
        write(base.path(), "keep/same", b"same", 0o644);
        write(base.path(), "swap", b"file becomes dir", 0o644);
        fs::create_dir_all(base.path().join("swap2/inner")).unwrap();
        let root = tempfile::tempdir().unwrap();
        // Permission noise alone must not count as a change.
        build_tree(root.path(), true);
        write(root.path(), "keep/same", b"same", 0o600);
        write(root.path(), "README", b"HELLO\n", 0o644); // same size, other bytes
        write(root.path(), "etc/app.conf", b"port = 8080\n", 0o755); // now executable
        write(root.path(), "keep/new", b"new", 0o644);
        write(root.path(), "swap/now-a-dir", b"", 0o644);
        write(root.path(), "swap2", b"dir becomes file", 0o644);
        fs::remove_file(root.path().join("bin/conf")).unwrap();
        symlink("../etc/other.conf", root.path().join("bin/conf")).unwrap();
        let (bytes, _) = layer(Some(base.path()), root.path());
        assert_eq!(
            names(&bytes),
            [
                ".wh.gone",
                "README",
                "bin/",
                "bin/conf",
                "etc/",
                "etc/app.conf",
                "keep/",
                "keep/.wh.old",
                "keep/new",
                "swap/",
                "swap/now-a-dir",
                "swap2"
            ]
        );
        let whiteout = list_entries(&bytes).into_iter().find(|e| e.0 == "keep/.wh.old").unwrap();
        assert_eq!((whiteout.1, whiteout.2), (EntryType::Regular, 0o644));
    }

    #[test]
    fn whiteout_names_in_a_tree_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "x/.wh.y", b"", 0o644);
        let err = write_diff_layer(None, dir.path(), io::sink()).unwrap_err();
        assert!(matches!(err, LayerError::ReservedName { .. }), "{err}");
    }

    #[test]
    fn layer_file_lands_in_the_given_dir() {
        let (dir, tmp) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        build_tree(dir.path(), false);
        let (file, stats) = write_diff_layer_file(None, dir.path(), tmp.path()).unwrap();
        assert_eq!(file.path().parent().unwrap(), tmp.path());
        let bytes = fs::read(file.path()).unwrap();
        assert_eq!(Digest::of(&bytes), stats.digest);
    }

    #[test]
    fn a_layer_file_written_inside_the_tree_leaves_itself_out() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a", b"a", 0o644);
        let (file, stats) = write_diff_layer_file(None, dir.path(), dir.path()).unwrap();
        assert_eq!(names(&fs::read(file.path()).unwrap()), ["a"]);
        assert_eq!(stats.entries, 1);
    }

    #[test]
    fn first_difference_names_the_first_differing_entry() {
        let dir = tempfile::tempdir().unwrap();
        let tars = tempfile::tempdir().unwrap();
        let save = |name: &str| {
            let path = tars.path().join(name);
            write_diff_layer(None, dir.path(), File::create(&path).unwrap()).unwrap();
            path
        };
        build_tree(dir.path(), false);
        let a = save("a.tar");
        assert_eq!(first_difference(&a, &a).unwrap(), None);
        write(dir.path(), "bin/app", b"#!/bin/sh\necho HI\n", 0o755);
        write(dir.path(), "etc/app.conf", b"port = 9090\n", 0o644);
        let b = save("b.tar");
        assert_eq!(first_difference(&a, &b).unwrap().as_deref(), Some("bin/app"));
        fs::set_permissions(dir.path().join("README"), fs::Permissions::from_mode(0o755)).unwrap();
        let c = save("c.tar");
        assert_eq!(first_difference(&b, &c).unwrap().as_deref(), Some("README"), "a mode change is a difference");
        write(dir.path(), "0-first", b"", 0o644);
        let d = save("d.tar");
        assert_eq!(first_difference(&c, &d).unwrap().as_deref(), Some("0-first"), "an added path is named");
        assert_eq!(first_difference(&d, &c).unwrap().as_deref(), Some("0-first"), "whichever side has it");
        fs::remove_file(dir.path().join("etc/app.conf")).unwrap();
        let e = save("e.tar");
        assert_eq!(first_difference(&d, &e).unwrap().as_deref(), Some("etc/app.conf"), "a trailing removal is named");
    }

    /// 10,000 files / 200 MB. Ignored by default (it writes 200 MB); run with `cargo test -- --ignored` to check
    /// that layering stays close to disk speed.
    #[test]
    #[ignore]
    fn layers_ten_thousand_files_in_one_pass() {
        let dir = tempfile::tempdir().unwrap();
        let chunk: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        for i in 0..10_000u32 {
            let path = dir.path().join(format!("d{:02}/f{i:05}", i % 100));
            if i < 100 {
                fs::create_dir_all(path.parent().unwrap()).unwrap();
            }
            let mut content = chunk.clone();
            content[..4].copy_from_slice(&i.to_le_bytes());
            fs::write(path, content).unwrap();
        }
        let out = tempfile::tempdir().unwrap();
        let started = std::time::Instant::now();
        let (_file, stats) = write_diff_layer_file(None, dir.path(), out.path()).unwrap();
        let elapsed = started.elapsed();
        eprintln!("{} entries, {} bytes in {elapsed:?}", stats.entries, stats.size);
        assert_eq!(stats.entries, 10_100);
    }
}
