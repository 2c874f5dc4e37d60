//! Interoperability: images the local provider writes must be readable by standard OCI tools (`skopeo`, `umoci`),
//! not just by kiln itself.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::{Command, Output};

use kiln::provider::local::layer;
use kiln::provider::local::oci::{Descriptor, ImageSpec, OciStore};

fn write(root: &Path, rel: &str, content: &str, mode: u32) {
    let path = root.join(rel);
    fs::create_dir_all(path.parent().unwrap()).unwrap();
    fs::write(&path, content).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
}

/// Runs an external tool, failing loudly (never skipping) when it is not installed.
fn run(tool: &str, args: &[&str]) -> Output {
    match Command::new(tool).args(args).output() {
        Ok(output) => output,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{tool}` is not installed; run `scripts/install-test-deps` to install it")
        }
        Err(err) => panic!("cannot run `{tool}`: {err}"),
    }
}

fn check(tool: &str, args: &[&str]) -> Output {
    let output = run(tool, args);
    assert!(
        output.status.success(),
        "`{tool} {}` exited {}\n--- stdout\n{}\n--- stderr\n{}",
        args.join(" "),
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

struct Demo {
    _dir: tempfile::TempDir,
    store: OciStore,
    manifest: kiln::digest::Digest,
    work: std::path::PathBuf,
}

/// A two-layer image: a parent tree, and a child that changes, adds and deletes files. Tagged `demo:1`.
fn demo_image() -> Demo {
    let dir = tempfile::tempdir().unwrap();
    let (parent, child) = (dir.path().join("parent"), dir.path().join("child"));
    write(&parent, "bin/app", "#!/bin/sh\necho v1\n", 0o755);
    write(&parent, "etc/app.conf", "port = 8080\n", 0o644);
    write(&parent, "etc/obsolete.conf", "remove me\n", 0o644);
    write(&parent, "var/cache/blob", "cached\n", 0o644);
    symlink("app.conf", parent.join("etc/current.conf")).unwrap();

    write(&child, "bin/app", "#!/bin/sh\necho v2\n", 0o755);
    write(&child, "etc/app.conf", "port = 9090\n", 0o644);
    write(&child, "srv/index.html", "<h1>hello</h1>\n", 0o644);
    fs::create_dir_all(child.join("var")).unwrap();
    symlink("app.conf", child.join("etc/current.conf")).unwrap();

    let store = OciStore::open(&dir.path().join("oci")).unwrap();
    let mut spec = ImageSpec {
        entrypoint: vec!["/bin/app".into()],
        env: vec!["PORT=9090".into()],
        labels: [("org.example.app".to_string(), "demo".to_string())].into(),
        ..ImageSpec::default()
    };
    for (base, root) in [(None, &parent), (Some(parent.as_path()), &child)] {
        let (temp, stats) = layer::write_diff_layer_file(base, root, &store.temp_dir()).unwrap();
        store.put_blob_file(temp, &stats.digest).unwrap();
        spec.layers.push(Descriptor::layer(stats.digest, stats.size));
        spec.diff_ids.push(stats.digest);
    }
    let manifest = store.write_image(&spec).unwrap();
    store.tag("demo:1", &manifest).unwrap();
    store.verify_image(&manifest).unwrap();
    Demo { work: dir.path().to_path_buf(), _dir: dir, store, manifest }
}

#[test]
fn skopeo_inspects_a_kiln_image() {
    let demo = demo_image();
    let reference = format!("oci:{}:demo:1", demo.store.root().display());
    let output = check("skopeo", &["inspect", &reference]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("skopeo printed no JSON ({e}):\n{}", String::from_utf8_lossy(&output.stdout)));
    assert_eq!(json["Digest"], demo.manifest.to_string(), "{json:#}");
    assert_eq!(json["Layers"].as_array().map(Vec::len), Some(2), "{json:#}");
    assert_eq!(json["Labels"]["org.example.app"], "demo", "{json:#}");
    assert_eq!(json["Os"], kiln::provider::local::oci::oci_platform().0, "{json:#}");
}

#[test]
fn umoci_unpacks_a_kiln_image() {
    let demo = demo_image();
    let bundle = demo.work.join("bundle");
    let image = format!("{}:demo:1", demo.store.root().display());
    check("umoci", &["unpack", "--rootless", "--image", &image, bundle.to_str().unwrap()]);
    let rootfs = bundle.join("rootfs");
    let read = |rel: &str| fs::read_to_string(rootfs.join(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    assert_eq!(read("bin/app"), "#!/bin/sh\necho v2\n");
    assert_eq!(read("etc/app.conf"), "port = 9090\n");
    assert_eq!(read("srv/index.html"), "<h1>hello</h1>\n");
    assert_eq!(fs::read_link(rootfs.join("etc/current.conf")).unwrap(), Path::new("app.conf"));
    assert_eq!(fs::metadata(rootfs.join("bin/app")).unwrap().permissions().mode() & 0o777, 0o755);
    assert!(!rootfs.join("etc/obsolete.conf").exists(), "the child's whiteout applies");
    assert!(!rootfs.join("var/cache").exists(), "a deleted directory goes as a whole");
    assert!(rootfs.join("var").is_dir());

    // kiln's own unpacker agrees with umoci's, file for file.
    let ours = demo.work.join("ours");
    demo.store.unpack(&demo.manifest, &ours).unwrap();
    assert_eq!(listing(&ours), listing(&rootfs));
}

fn listing(root: &Path) -> Vec<(String, u32, Option<Vec<u8>>)> {
    fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, u32, Option<Vec<u8>>)>) {
        let mut entries: Vec<_> = fs::read_dir(dir).unwrap().map(|e| e.unwrap().path()).collect();
        entries.sort();
        for path in entries {
            let meta = fs::symlink_metadata(&path).unwrap();
            let rel = path.strip_prefix(root).unwrap().display().to_string();
            let content = if meta.file_type().is_symlink() {
                Some(fs::read_link(&path).unwrap().into_os_string().into_encoded_bytes())
            } else if meta.is_file() {
                Some(fs::read(&path).unwrap())
            } else {
                None
            };
            out.push((rel, meta.permissions().mode() & 0o7777, content));
            if meta.is_dir() {
                walk(root, &path, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(root, root, &mut out);
    out
}

#[test]
fn index_annotations_leave_the_digest_alone_and_tools_still_read_the_image() {
    let demo = demo_image();
    let annotations = [
        ("org.opencontainers.image.revision".to_string(), "0123456789abcdef0123456789abcdef01234567".to_string()),
        ("org.opencontainers.image.source".to_string(), "https://example.com/org/repo.git".to_string()),
    ]
    .into();
    demo.store.tag_annotated("demo:annotated", &demo.manifest, &annotations).unwrap();
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(demo.store.root().join("index.json")).unwrap()).unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "demo:annotated")
        .unwrap();
    assert_eq!(entry["digest"], demo.manifest.to_string(), "the same manifest, so the same digest");
    assert_eq!(entry["annotations"]["org.opencontainers.image.source"], "https://example.com/org/repo.git");

    let reference = format!("oci:{}:demo:annotated", demo.store.root().display());
    let output = check("skopeo", &["inspect", &reference]);
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(json["Digest"], demo.manifest.to_string(), "{json:#}");
    let bundle = demo.work.join("annotated-bundle");
    let image = format!("{}:demo:annotated", demo.store.root().display());
    check("umoci", &["unpack", "--rootless", "--image", &image, bundle.to_str().unwrap()]);
    assert_eq!(fs::read_to_string(bundle.join("rootfs/etc/app.conf")).unwrap(), "port = 9090\n");
    // Retagging plainly drops the annotations with the old entry: a name points at one entry.
    demo.store.tag("demo:annotated", &demo.manifest).unwrap();
    let index = fs::read_to_string(demo.store.root().join("index.json")).unwrap();
    assert!(!index.contains("image.revision"), "{index}");
}
