//! What a bake takes from the git work tree: only tracked files, the commit outside the image digest, and no
//! credential from the remote URL.

mod common;

use std::path::Path;
use std::process::Command;

use common::{git, tiny_repo, Repo};

fn bake_in(repo: &Repo, dir: &Path, args: &[&str]) -> serde_json::Value {
    let out = repo.kiln().current_dir(dir).arg("bake").arg("--json").args(args).output().unwrap();
    assert!(out.status.success(), "kiln bake {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn committed_tiny_repo() -> Repo {
    let repo = tiny_repo(common::free_port());
    repo.write(".gitignore", "/.kiln\n*.swp\n");
    repo.write("README.md", "tiny\n");
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "."]);
    git(repo.path(), &["commit", "-q", "-m", "tiny"]);
    repo
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &str) -> Vec<String> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return found };
    for entry in entries.flatten() {
        let path = entry.path();
        if entry.file_type().unwrap().is_dir() {
            found.extend(files_containing(&path, needle));
        } else if std::fs::read(&path).unwrap().windows(needle.len()).any(|w| w == needle.as_bytes()) {
            found.push(path.display().to_string());
        }
    }
    found
}

fn index_entry(layout: &Path, image_ref: &str) -> serde_json::Value {
    let index: serde_json::Value = serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == image_ref)
        .unwrap_or_else(|| panic!("{image_ref} is not in {index:#}"))
        .clone()
}

#[test]
fn the_same_recipe_key_gives_the_same_digest_at_every_commit() {
    let origin = committed_tiny_repo();
    let mut bakes = Vec::new();
    for round in 0..2 {
        if round == 1 {
            // A commit that changes nothing any recipe reads.
            origin.write("README.md", "tiny, now documented\n");
            git(origin.path(), &["commit", "-q", "-am", "docs"]);
        }
        // A fresh clone is a fresh ledger and store.
        let clone = Repo::empty();
        let target = clone.file("repo");
        git(clone.path(), &["clone", "-q", origin.path().to_str().unwrap(), target.to_str().unwrap()]);
        let out = bake_in(&clone, &target, &[]);
        assert_eq!(out["dirty"], false);
        assert_eq!(out["cached"], false, "a fresh ledger bakes");
        bakes.push((clone, target, out));
    }
    let (first, second) = (&bakes[0].2, &bakes[1].2);
    assert_ne!(first["commit"], second["commit"]);
    for (a, b) in first["chain"].as_array().unwrap().iter().zip(second["chain"].as_array().unwrap()) {
        assert_eq!(a["recipe_key"], b["recipe_key"], "{}", a["recipe"]);
        assert_eq!(a["digest"], b["digest"], "{}: the commit is not inside the image", a["recipe"]);
    }

    // Each store still says which commit its image came from, beside the image in index.json.
    for (_, target, out) in &bakes {
        let layout = target.join(".kiln/oci");
        let entry = index_entry(&layout, out["image_ref"].as_str().unwrap());
        assert_eq!(entry["digest"], out["digest"]);
        assert_eq!(entry["annotations"]["org.opencontainers.image.revision"], out["commit"]);
        let log = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .current_dir(target)
            .args(["log", "--json"])
            .env("KILN_ACTOR", "tester")
            .output()
            .unwrap();
        let log: serde_json::Value = serde_json::from_slice(&log.stdout).unwrap();
        assert_eq!(log["events"][0]["commit"], out["commit"], "the baked event keeps the commit");

        let inspect = Command::new("skopeo")
            .args(["inspect", &format!("oci:{}:{}", layout.display(), out["image_ref"].as_str().unwrap())])
            .output()
            .expect("skopeo is installed by scripts/install-test-deps");
        assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
        assert_eq!(doc["Digest"], out["digest"]);
        assert!(doc["Labels"].get("org.opencontainers.image.revision").is_none(), "{doc:#}");
        let bundle = tempfile::tempdir().unwrap();
        let unpack = Command::new("umoci")
            .args([
                "unpack",
                "--rootless",
                "--image",
                &format!("{}:{}", layout.display(), out["image_ref"].as_str().unwrap()),
                bundle.path().join("b").to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(unpack.status.success(), "{}", String::from_utf8_lossy(&unpack.stderr));
    }
}

#[test]
fn files_git_does_not_track_are_never_baked() {
    let repo = committed_tiny_repo();
    let clean = bake_in(&repo, repo.path(), &[]);

    // Ignored: left out, and the bake stays clean and keeps its key.
    repo.write("images/files/base/notes.swp", "password=hunter2-ignored\n");
    let ignored = bake_in(&repo, repo.path(), &["--no-cache"]);
    assert_eq!(ignored["dirty"], false);
    assert_eq!(ignored["recipe_key"], clean["recipe_key"]);
    assert_eq!(ignored["digest"], clean["digest"]);
    assert_eq!(files_containing(&repo.file(".kiln/oci"), "hunter2-ignored"), Vec::<String>::new());

    // Untracked, not ignored: the tree is dirty, so refused; allowed, it is recorded dirty and still left out.
    repo.write("images/files/base/extra.conf", "password=hunter2-untracked\n");
    let refused = repo.run(&["bake", "--no-cache"]).expect(2);
    assert!(refused.stderr.contains("images/files/base/extra.conf"), "{}", refused.stderr);
    let allowed = bake_in(&repo, repo.path(), &["--no-cache", "--allow-dirty"]);
    assert_eq!(allowed["dirty"], true);
    assert_eq!(allowed["digest"], clean["digest"]);
    assert_eq!(files_containing(&repo.file(".kiln/oci"), "hunter2-untracked"), Vec::<String>::new());
    assert_eq!(files_containing(&repo.file(".kiln/unpacked"), "hunter2"), Vec::<String>::new());

    // A source the recipe names itself must be tracked: the commit could not rebuild the image without it.
    repo.write("images/files/new.txt", "new\n");
    repo.edit(
        "images/base.toml",
        "to = \"/etc/base\"\n",
        "to = \"/etc/base\"\n\n[[provision]]\ncopy = \"files/new.txt\"\nto = \"/etc/new.txt\"\n",
    );
    let untracked = repo.run(&["bake", "--allow-dirty"]).expect(2);
    assert!(untracked.stderr.contains("images/files/new.txt is not tracked by git"), "{}", untracked.stderr);
    assert!(untracked.stderr.contains("git add"), "{}", untracked.stderr);
    git(repo.path(), &["add", "images/files/new.txt"]);
    let added = bake_in(&repo, repo.path(), &["--allow-dirty"]);
    assert_eq!(added["dirty"], true, "staged but not committed");
}

#[test]
fn credentials_in_the_remote_url_reach_no_record() {
    let repo = committed_tiny_repo();
    git(
        repo.path(),
        &["remote", "add", "origin", "https://ci-user:s3cr3t-token@git.example.com/org/repo.git?private_token=q5ecret"],
    );
    let out = bake_in(&repo, repo.path(), &[]);
    let layout = repo.file(".kiln/oci");
    let entry = index_entry(&layout, out["image_ref"].as_str().unwrap());
    assert_eq!(entry["annotations"]["org.opencontainers.image.source"], "https://git.example.com/org/repo.git");
    let reference = format!("oci:{}:{}", layout.display(), out["image_ref"].as_str().unwrap());
    for args in [vec!["inspect"], vec!["inspect", "--raw"], vec!["inspect", "--config"]] {
        let inspect = Command::new("skopeo").args(&args).arg(&reference).output().unwrap();
        assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
        let shown = String::from_utf8_lossy(&inspect.stdout);
        assert!(!shown.contains("s3cr3t") && !shown.contains("q5ecret") && !shown.contains("ci-user"), "{shown}");
    }
    for secret in ["s3cr3t", "q5ecret"] {
        assert_eq!(files_containing(&repo.file(".kiln"), secret), Vec::<String>::new(), "{secret}");
    }
    let log = repo.run(&["log", "--json"]).ok();
    assert!(!log.stdout.contains("s3cr3t"));
}
