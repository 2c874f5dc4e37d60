//! An image's root filesystem read straight from its layer blobs, bottom first with whiteouts applied, as a map of
//! path → type, mode and content hash: what `kiln diff` compares, without unpacking anything to disk.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{self, BufReader, Read};

use super::layer::{OPAQUE_WHITEOUT, WHITEOUT_PREFIX};
use super::oci::{OciError, OciStore, MEDIA_TYPE_LAYER};
use crate::digest::{Digest, StreamHasher};
use crate::provider::RootEntry;

/// Every path of the image `manifest` (absolute: `/etc/motd`), the root itself left out. Each layer blob is hashed
/// as it is read and must match its digest, so a damaged store cannot pass for a difference.
pub fn list(store: &OciStore, manifest: &Digest) -> Result<BTreeMap<String, RootEntry>, OciError> {
    let parsed = store.manifest(manifest)?;
    let count = parsed.layers.len();
    let mut tree = Tree::default();
    for (i, descriptor) in parsed.layers.iter().enumerate() {
        let what = format!("layer {} of {count}", i + 1);
        if descriptor.media_type != MEDIA_TYPE_LAYER {
            return Err(OciError::Unsupported { digest: descriptor.digest, media_type: descriptor.media_type.clone() });
        }
        let path = store.blob_path(&descriptor.digest);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => {
                return Err(OciError::Missing { digest: descriptor.digest, what })
            }
            Err(source) => return Err(OciError::Io { path, source }),
        };
        let mut reader = Hashing { inner: BufReader::with_capacity(1 << 20, file), hasher: StreamHasher::new() };
        let applied = tree.apply_layer(descriptor.digest, &mut reader);
        // The tar reader stops at the end-of-archive marker; the padding after it is part of the blob too. A damaged
        // blob often fails to parse before its end: name the damage, not the symptom.
        let drained = io::copy(&mut reader, &mut io::sink());
        if drained.is_ok() && reader.hasher.finish() != descriptor.digest {
            return Err(OciError::Mismatch { digest: descriptor.digest, what });
        }
        applied.map_err(|err| match err {
            LayerRead::Io(source) => OciError::Io { path: path.clone(), source },
            LayerRead::Bad(err) => err,
        })?;
        drained.map_err(|source| OciError::Io { path: path.clone(), source })?;
    }
    Ok(tree.entries)
}

struct Hashing<R> {
    inner: R,
    hasher: StreamHasher,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

enum LayerRead {
    Io(io::Error),
    Bad(OciError),
}

impl From<io::Error> for LayerRead {
    fn from(err: io::Error) -> Self {
        LayerRead::Io(err)
    }
}

#[derive(Default)]
struct Tree {
    entries: BTreeMap<String, RootEntry>,
    /// What the current layer wrote: a whiteout hides only what lower layers put there.
    this_layer: HashSet<String>,
}

/// `a/./b/` → `/a/b`; None for the root itself. `..` has no place in a layer kiln can unpack.
fn absolute(raw: &[u8]) -> Result<Option<String>, &'static str> {
    let text = std::str::from_utf8(raw).map_err(|_| "is not UTF-8")?;
    let mut out = String::new();
    for component in text.split('/') {
        match component {
            "" | "." => {}
            ".." => return Err("climbs out with `..`"),
            name => {
                out.push('/');
                out.push_str(name);
            }
        }
    }
    Ok(Some(out).filter(|p| !p.is_empty()))
}

impl Tree {
    fn apply_layer(&mut self, layer: Digest, reader: &mut impl Read) -> Result<(), LayerRead> {
        self.this_layer.clear();
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries()? {
            let mut entry = entry?;
            let raw = entry.path_bytes().into_owned();
            let bad = |reason: String| {
                LayerRead::Bad(OciError::BadEntry { layer, entry: String::from_utf8_lossy(&raw).into_owned(), reason })
            };
            let path = match absolute(&raw) {
                Ok(Some(path)) => path,
                Ok(None) => continue,
                Err(reason) => return Err(bad(reason.to_string())),
            };
            let (parent, name) = path.rsplit_once('/').unwrap_or(("", path.as_str()));
            if name == OPAQUE_WHITEOUT {
                self.remove_lower(parent, false);
                continue;
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                self.remove_lower(&format!("{parent}/{hidden}"), true);
                continue;
            }
            let header = entry.header();
            let mode = header.mode().map_err(|e| bad(format!("unreadable mode: {e}")))? & 0o7777;
            let mut kind = header.entry_type();
            // Pre-POSIX archives mark directories only with a trailing slash.
            if kind == tar::EntryType::Regular && raw.ends_with(b"/") {
                kind = tar::EntryType::Directory;
            }
            let found = match kind {
                tar::EntryType::Directory => RootEntry::Dir { mode },
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut hasher = StreamHasher::new();
                    let size = io::copy(&mut entry, &mut hasher)?;
                    RootEntry::File { mode, sha256: hasher.finish(), size }
                }
                tar::EntryType::Symlink => {
                    let target = entry.link_name_bytes().ok_or_else(|| bad("symlink without a target".into()))?;
                    RootEntry::Symlink { target: String::from_utf8_lossy(&target).into_owned() }
                }
                // A hard link holds its target's content: compare it as that file.
                tar::EntryType::Link => {
                    let target = entry.link_name_bytes().ok_or_else(|| bad("hard link without a target".into()))?;
                    let target = match absolute(&target) {
                        Ok(Some(target)) => target,
                        Ok(None) => return Err(bad("hard link to the root".into())),
                        Err(reason) => return Err(bad(reason.to_string())),
                    };
                    self.entries.get(&target).cloned().ok_or_else(|| bad("hard link to a missing file".into()))?
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => RootEntry::Special { mode },
                tar::EntryType::XGlobalHeader => continue,
                other => return Err(bad(format!("unsupported entry type {other:?}"))),
            };
            // Anything but a directory replaces a lower directory with everything below it.
            if !matches!(found, RootEntry::Dir { .. }) {
                self.remove_lower(&path, false);
            }
            self.entries.insert(path.clone(), found);
            self.this_layer.insert(path);
        }
        Ok(())
    }

    /// Removes what lower layers put below `path` (and `path` itself with `itself`).
    fn remove_lower(&mut self, path: &str, itself: bool) {
        let below = format!("{path}/");
        let mut doomed: Vec<String> = self
            .entries
            .range(below.clone()..)
            .map(|(p, _)| p)
            .take_while(|p| p.starts_with(&below))
            .cloned()
            .collect();
        if itself {
            doomed.push(path.to_string());
        }
        doomed.retain(|p| !self.this_layer.contains(p));
        for p in doomed {
            self.entries.remove(&p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tar of (path, type, mode, content or link target), in order.
    fn layer(entries: &[(&str, tar::EntryType, u32, &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        for (path, kind, mode, data) in entries {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(*kind);
            header.set_mode(*mode);
            let is_link = matches!(kind, tar::EntryType::Symlink | tar::EntryType::Link);
            if is_link {
                header.set_link_name(data).unwrap();
            }
            let body: &[u8] = if *kind == tar::EntryType::Regular { data.as_bytes() } else { b"" };
            header.set_size(body.len() as u64);
            // Raw name bytes: the builder's own setter refuses the `..` a hostile layer may hold.
            header.as_old_mut().name[..path.len()].copy_from_slice(path.as_bytes());
            header.set_cksum();
            builder.append(&header, body).unwrap();
        }
        builder.into_inner().unwrap()
    }

    fn apply(layers: &[Vec<u8>]) -> BTreeMap<String, RootEntry> {
        let mut tree = Tree::default();
        for bytes in layers {
            if tree.apply_layer(Digest::of(bytes), &mut bytes.as_slice()).is_err() {
                panic!("layer did not apply");
            }
        }
        tree.entries
    }

    use tar::EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};

    #[test]
    fn whiteouts_hide_lower_layers_only_and_hard_links_read_as_their_target() {
        let lower = layer(&[
            ("etc/", D, 0o755, ""),
            ("etc/motd", F, 0o644, "hi"),
            ("etc/gone", F, 0o644, "x"),
            ("opt/", D, 0o755, ""),
            ("opt/old/", D, 0o755, ""),
            ("opt/old/a", F, 0o644, "a"),
            ("var/", D, 0o755, ""),
            ("var/file-then-dir", F, 0o644, "f"),
        ]);
        let upper = layer(&[
            ("etc/.wh.gone", F, 0o644, ""),
            ("etc/motd", F, 0o755, "hi"),
            ("etc/hard", L, 0o644, "etc/motd"),
            ("opt/.wh..wh..opq", F, 0o644, ""),
            ("opt/new", S, 0o777, "/etc/motd"),
            ("var/file-then-dir/", D, 0o700, ""),
        ]);
        let tree = apply(&[lower, upper]);
        let paths: Vec<&str> = tree.keys().map(String::as_str).collect();
        assert_eq!(
            paths,
            ["/etc", "/etc/hard", "/etc/motd", "/opt", "/opt/new", "/var", "/var/file-then-dir"],
            "whiteouts removed /etc/gone and all of /opt's lower content"
        );
        let motd = RootEntry::File { mode: 0o755, sha256: Digest::of(b"hi"), size: 2 };
        assert_eq!(tree["/etc/motd"], motd, "the upper layer's mode wins");
        assert_eq!(tree["/etc/hard"], motd);
        assert_eq!(tree["/opt/new"], RootEntry::Symlink { target: "/etc/motd".into() });
        assert_eq!(tree["/var/file-then-dir"], RootEntry::Dir { mode: 0o700 });
    }

    #[test]
    fn a_whiteout_does_not_hide_what_its_own_layer_wrote_and_dotdot_is_refused() {
        let only = layer(&[("a", F, 0o644, "1"), (".wh.a", F, 0o644, "")]);
        assert!(apply(&[only]).contains_key("/a"));
        let mut tree = Tree::default();
        let bad = layer(&[("a/../../b", F, 0o644, "1")]);
        assert!(matches!(
            tree.apply_layer(Digest::ZERO, &mut bad.as_slice()),
            Err(LayerRead::Bad(OciError::BadEntry { .. }))
        ));
    }
}
