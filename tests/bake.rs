//! Local bake: content-addressed OCI images, the bake cache, parent layering, reproducibility, and what standard
//! OCI tools make of the result.

mod common;

use std::process::Command;

use common::{count_files, git, tiny_repo, Repo};

fn bake(repo: &Repo, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["bake", "--json"];
    all.extend_from_slice(args);
    repo.run(&all).ok().json()
}

fn key(repo: &Repo) -> String {
    bake(repo, &[])["recipe_key"].as_str().unwrap().to_string()
}

#[test]
fn a_bake_records_the_image_and_a_second_bake_builds_nothing() {
    let repo = tiny_repo(common::free_port());
    let first = bake(&repo, &[]);
    assert_eq!(first["cached"], false);
    assert_eq!(first["chain"].as_array().unwrap().len(), 2, "base and app");
    let blobs = count_files(&repo.file(".kiln/oci/blobs"));
    let events = repo.run(&["log", "--json", "--limit", "100"]).ok().json()["events"].as_array().unwrap().len();
    assert_eq!(events, 2, "one baked event per image");

    let second = bake(&repo, &[]);
    assert_eq!(second["cached"], true);
    assert_eq!(second["digest"], first["digest"]);
    assert!(second["chain"].as_array().unwrap().iter().all(|i| i["cached"] == true));
    assert_eq!(count_files(&repo.file(".kiln/oci/blobs")), blobs, "a cache hit writes no blob");
    let after = repo.run(&["log", "--json", "--limit", "100"]).ok().json()["events"].as_array().unwrap().len();
    assert_eq!(after, events, "a cache hit records nothing");

    let images = repo.run(&["images", "--json"]).ok().json();
    let listed: Vec<&str> =
        images["images"].as_array().unwrap().iter().map(|i| i["recipe"].as_str().unwrap()).collect();
    assert_eq!(listed, ["base", "app"]);
    let lineage = repo.run(&["lineage", first["digest"].as_str().unwrap(), "--json"]).ok().json();
    assert_eq!(lineage["image"]["recipe_key"], first["recipe_key"]);
    assert_eq!(lineage["parents"][0]["recipe"], "base");
}

#[test]
fn a_child_reuses_its_parents_layer_blobs() {
    let repo = tiny_repo(common::free_port());
    let out = bake(&repo, &[]);
    let manifest = |digest: &str| -> serde_json::Value {
        let hex = digest.trim_start_matches("sha256:");
        serde_json::from_slice(&std::fs::read(repo.file(&format!(".kiln/oci/blobs/sha256/{hex}"))).unwrap()).unwrap()
    };
    let base = manifest(out["chain"][0]["digest"].as_str().unwrap());
    let app = manifest(out["digest"].as_str().unwrap());
    assert_eq!(base["layers"].as_array().unwrap().len(), 1);
    assert_eq!(app["layers"].as_array().unwrap().len(), 2);
    assert_eq!(app["layers"][0]["digest"], base["layers"][0]["digest"], "the child's first layer is the parent's blob");
}

#[test]
fn every_kind_of_input_change_gives_a_new_key_and_reformatting_does_not() {
    let repo = tiny_repo(common::free_port());
    let original = key(&repo);
    let mut seen = vec![original.clone()];
    let mut changed = |what: &str, edit: &dyn Fn(&Repo)| {
        edit(&repo);
        let k = key(&repo);
        assert!(!seen.contains(&k), "{what} did not change the key");
        seen.push(k);
    };
    changed("a byte of a copied file", &|r| r.write("images/files/app/config.txt", "mode=fasT\n"));
    changed("a byte of a script", &|r| r.edit("images/scripts/setup.sh", "setting up", "Setting up"));
    changed("a provision step", &|r| r.edit("images/app.toml", "echo ready", "echo ready!"));
    changed("the instance section", &|r| r.edit("images/app.toml", "ready-timeout = \"5s\"", "ready-timeout = \"6s\""));
    changed("the parent's image digest", &|r| r.write("images/files/base/motd", "welcome!\n"));
    changed("a file's executable bit", &|r| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(r.file("images/files/app/config.txt"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
    });

    let before = key(&repo);
    let text = std::fs::read_to_string(repo.file("images/app.toml")).unwrap();
    let reformatted = format!(
        "# a comment\n\n{}",
        text.replace("description = \"tiny app\"\n", "")
            .replace("parent = \"base\"", "description   =   \"tiny app\"   # moved\nparent = 'base'")
    );
    repo.write("images/app.toml", &reformatted);
    assert_eq!(key(&repo), before, "whitespace, comments, key order and quoting are not part of the key");
    repo.edit("images/app.toml", "description   =   \"tiny app\"", "description = \"renamed app\"");
    assert_eq!(key(&repo), before, "the description is not part of the key");
}

#[test]
fn two_clones_of_one_commit_bake_the_same_digest() {
    let origin = tiny_repo(common::free_port());
    git(origin.path(), &["init", "-q", "-b", "main"]);
    git(origin.path(), &["add", "."]);
    git(origin.path(), &["commit", "-q", "-m", "tiny"]);
    let mut digests = Vec::new();
    for _ in 0..2 {
        let clone = Repo::empty();
        let target = clone.file("repo");
        git(clone.path(), &["clone", "-q", origin.path().to_str().unwrap(), target.to_str().unwrap()]);
        let out = clone.kiln().current_dir(&target).args(["bake", "--json"]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(doc["dirty"], false);
        assert!(doc["commit"].as_str().is_some_and(|c| c.len() == 40));
        digests.push(doc["digest"].clone());
    }
    assert_eq!(digests[0], digests[1]);
}

#[test]
fn a_dirty_tree_bakes_only_when_allowed_and_says_so() {
    let repo = tiny_repo(common::free_port());
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "."]);
    git(repo.path(), &["commit", "-q", "-m", "tiny"]);
    repo.write("images/files/app/config.txt", "mode=edited\n");
    let refused = repo.run(&["bake"]).expect(2);
    assert!(refused.stderr.contains("uncommitted changes (images/files/app/config.txt)"), "{}", refused.stderr);
    assert!(refused.stderr.contains("--allow-dirty"));
    let out = bake(&repo, &["--allow-dirty"]);
    assert_eq!(out["dirty"], true);
    let log = repo.run(&["log", "--json"]).ok().json();
    assert_eq!(log["events"][0]["dirty"], true);
}

#[test]
fn a_failed_step_names_itself_records_nothing_and_leaves_no_image() {
    let repo = tiny_repo(common::free_port());
    repo.edit("images/app.toml", "echo ready >", "echo about to fail; exit 7; echo >");
    let run = repo.run(&["bake"]).expect(1);
    assert!(run.stderr.contains("provision step 3 of recipe `app` failed"), "{}", run.stderr);
    assert!(run.stderr.contains("exited with code 7"), "{}", run.stderr);
    assert!(run.stderr.contains("about to fail"), "the output tail is shown: {}", run.stderr);
    let images = repo.run(&["images", "--json"]).ok().json();
    let recipes: Vec<&str> =
        images["images"].as_array().unwrap().iter().map(|i| i["recipe"].as_str().unwrap()).collect();
    assert_eq!(recipes, ["base"], "only the parent, which succeeded, is recorded");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.file(".kiln/oci/index.json")).unwrap()).unwrap();
    let refs: Vec<&str> = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["annotations"]["org.opencontainers.image.ref.name"].as_str())
        .collect();
    assert!(refs.iter().all(|r| r.starts_with("base:")), "no app image in the store: {refs:?}");
    assert_eq!(count_files(&repo.file(".kiln/tmp")), 0, "the work directory is gone");
}

#[test]
fn check_passes_for_a_reproducible_recipe_and_names_the_file_that_is_not() {
    let repo = tiny_repo(common::free_port());
    let out = bake(&repo, &["--check"]);
    assert_eq!(out["reproducible"], true);

    repo.edit("images/app.toml", "echo ready >", "date +%s%N > $KILN_ROOT/var/lib/app/stamp && echo ready >");
    bake(&repo, &[]);
    let run = repo.run(&["bake", "--check"]).expect(6);
    assert!(run.stderr.contains("recipe `app` does not reproduce"), "{}", run.stderr);
    assert!(run.stderr.contains("var/lib/app/stamp"), "names the differing file: {}", run.stderr);
}

#[test]
fn symlinks_inside_a_copied_directory_are_copied_as_links_not_followed() {
    let repo = tiny_repo(common::free_port());
    std::os::unix::fs::symlink("/etc/hostname", repo.file("images/files/base/host")).unwrap();
    let out = bake(&repo, &[]);
    let base = out["chain"][0]["image_ref"].as_str().unwrap();
    let bundle = tempfile::tempdir().unwrap();
    let dest = bundle.path().join("b");
    let status = Command::new("umoci")
        .args([
            "unpack",
            "--rootless",
            "--image",
            &format!("{}:{base}", repo.file(".kiln/oci").display()),
            dest.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    let link = dest.join("rootfs/etc/base/host");
    assert_eq!(std::fs::read_link(&link).unwrap().to_str().unwrap(), "/etc/hostname");
}

#[test]
fn skopeo_and_umoci_read_the_baked_image() {
    let repo = tiny_repo(common::free_port());
    let out = bake(&repo, &[]);
    let image_ref = out["image_ref"].as_str().unwrap();
    let layout = repo.file(".kiln/oci");
    let inspect = Command::new("skopeo")
        .args(["inspect", &format!("oci:{}:{image_ref}", layout.display())])
        .output()
        .expect("skopeo is installed by scripts/install-test-deps");
    assert!(inspect.status.success(), "{}", String::from_utf8_lossy(&inspect.stderr));
    let doc: serde_json::Value = serde_json::from_slice(&inspect.stdout).unwrap();
    assert_eq!(doc["Digest"], out["digest"]);
    assert_eq!(doc["Layers"].as_array().unwrap().len(), 2);
    assert_eq!(doc["Labels"]["dev.kiln.recipe-key"], out["recipe_key"]);

    let bundle = tempfile::tempdir().unwrap();
    let dest = bundle.path().join("bundle");
    let unpack = Command::new("umoci")
        .args(["unpack", "--rootless", "--image", &format!("{}:{image_ref}", layout.display()), dest.to_str().unwrap()])
        .output()
        .expect("umoci is installed by scripts/install-test-deps");
    assert!(unpack.status.success(), "{}", String::from_utf8_lossy(&unpack.stderr));
    assert_eq!(std::fs::read_to_string(dest.join("rootfs/opt/app/config.txt")).unwrap(), "mode=fast\n");
    assert_eq!(std::fs::read_to_string(dest.join("rootfs/etc/base/motd")).unwrap(), "welcome\n");
    assert_eq!(std::fs::read_to_string(dest.join("rootfs/var/lib/app/state")).unwrap(), "ready\n");
}

#[test]
fn the_example_hello_image_bakes() {
    let repo = Repo::example();
    let out = bake(&repo, &[]);
    let root = repo.file(".kiln/check-root");
    let status = Command::new("umoci")
        .args([
            "unpack",
            "--rootless",
            "--image",
            &format!("{}:{}", repo.file(".kiln/oci").display(), out["image_ref"].as_str().unwrap()),
            root.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", String::from_utf8_lossy(&status.stderr));
    assert!(root.join("rootfs/opt/hello/bin/hello").is_file(), "the service was compiled into the image");
    assert!(root.join("rootfs/etc/motd").is_file(), "the base layer is there");
}

#[test]
fn gc_deletes_only_what_no_stage_can_return_to_and_a_rebake_brings_it_back() {
    let repo = tiny_repo(common::free_port());
    let bake_config = |text: &str| {
        repo.write("images/files/app/config.txt", text);
        bake(&repo, &[])["digest"].as_str().unwrap().to_string()
    };
    let promoted = bake_config("v1\n");
    repo.run(&["approve", "--stage", "dev", "--digest", &promoted]).ok();
    repo.run(&["promote", "--stage", "dev", "--no-deploy", "--digest", &promoted]).ok();
    let unused = bake_config("v2\n");
    let newest = bake_config("v3\n");

    let plan = repo.run(&["gc", "--dry-run", "--json"]).ok().json();
    let planned: Vec<&str> =
        plan["deleted"].as_array().unwrap().iter().map(|i| i["digest"].as_str().unwrap()).collect();
    assert_eq!(planned, [unused.as_str()], "only the image nothing points at");
    assert_eq!(repo.run(&["images", "--json"]).ok().json()["images"].as_array().unwrap().len(), 4);

    let done = repo.run(&["gc", "--json"]).ok().json();
    assert_eq!(done["deleted"][0]["digest"], unused.as_str());
    let hex = &unused["sha256:".len()..];
    assert!(!repo.file(&format!(".kiln/oci/blobs/sha256/{hex}")).exists(), "its manifest blob is gone");
    for kept in [&promoted, &newest] {
        assert!(repo.file(&format!(".kiln/oci/blobs/sha256/{}", &kept["sha256:".len()..])).exists());
    }
    let images = repo.run(&["images", "--json"]).ok().json();
    let deleted: Vec<&str> = images["images"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["deleted"] == true)
        .map(|i| i["digest"].as_str().unwrap())
        .collect();
    assert_eq!(deleted, [unused.as_str()]);
    repo.run(&["verify"]).ok();

    // Baking the same inputs again rebuilds the identical image and records it as present again.
    let again = bake_config("v2\n");
    assert_eq!(again, unused);
    let images = repo.run(&["images", "--json"]).ok().json();
    assert!(images["images"].as_array().unwrap().iter().all(|i| i["deleted"] == false));
    repo.run(&["verify"]).ok();
    let next = repo.run(&["gc", "--dry-run", "--json"]).ok().json();
    assert_eq!(next["deleted"][0]["digest"], newest.as_str(), "the re-baked image is now the newest; v3 is not");

    // dev is this pipeline's last stage, its prod: an image that reached it is never collected, even once replaced.
    repo.run(&["approve", "--stage", "dev", "--digest", &again]).ok();
    repo.run(&["promote", "--stage", "dev", "--no-deploy", "--digest", &again]).ok();
    let after = repo.run(&["gc", "--dry-run", "--json"]).ok().json();
    let planned: Vec<&str> =
        after["deleted"].as_array().unwrap().iter().map(|i| i["digest"].as_str().unwrap()).collect();
    assert_eq!(planned, [newest.as_str()], "{promoted} reached prod and stays");
}

#[test]
fn a_bake_plan_lists_the_steps_and_makes_nothing() {
    let repo = Repo::example();
    let events = |repo: &Repo| repo.run(&["log", "--json", "--limit", "100"]).ok().json()["events"].clone();
    // Before any bake: the root's key is known, the child's is not (its parent has no digest yet).
    let plan = repo.run(&["bake", "--plan", "--json"]).ok().json();
    assert_eq!(plan["prepare"], serde_json::json!([]), "the local provider has no base to resolve");
    let recipes = plan["plan"].as_array().unwrap();
    assert_eq!(recipes.iter().map(|r| r["recipe"].as_str().unwrap()).collect::<Vec<_>>(), ["base", "hello"]);
    assert!(recipes[0]["recipe_key"].as_str().unwrap().starts_with("sha256:"), "{plan}");
    assert_eq!(recipes[0]["unknown_because"], serde_json::Value::Null);
    assert_eq!(recipes[0]["cached"], false);
    assert_eq!(recipes[1]["recipe_key"], serde_json::Value::Null);
    assert_eq!(recipes[1]["unknown_because"], "its parent `base` is not baked yet");
    let calls: Vec<&str> = recipes[1]["calls"].as_array().unwrap().iter().map(|c| c.as_str().unwrap()).collect();
    assert!(calls.iter().any(|c| c.starts_with("local: step 2: run ")), "{calls:?}");
    assert!(!repo.file(".kiln/oci").exists(), "a plan creates no image store");
    assert_eq!(events(&repo), serde_json::json!([]), "a plan records nothing");

    // After a bake: every key is known and matches the bake's, every recipe is a cache hit, and nothing changes.
    let baked = repo.run(&["bake", "--json"]).ok().json();
    let store = common::snapshot(&repo.file(".kiln/oci"));
    let recorded = events(&repo);
    let plan = repo.run(&["bake", "--plan", "--json"]).ok().json();
    for (planned, image) in plan["plan"].as_array().unwrap().iter().zip(baked["chain"].as_array().unwrap()) {
        assert_eq!(planned["recipe_key"], image["recipe_key"], "{plan}");
        assert_eq!(planned["digest"], image["digest"], "{plan}");
        assert_eq!(planned["cached"], true, "{plan}");
    }
    let human = repo.run(&["bake", "--plan"]).ok();
    let lines: Vec<&str> = human.stdout.lines().collect();
    let short = |d: &serde_json::Value| d.as_str().unwrap()["sha256:".len().."sha256:".len() + 12].to_string();
    assert!(lines[0].starts_with("base (recipe key ") && lines[0].contains(&short(&baked["chain"][0]["digest"])));
    assert!(lines[1].starts_with("  1. local: find base:"), "{lines:?}");
    assert_eq!(lines.last(), Some(&"plan only: nothing was built, called or recorded"));
    assert_eq!(common::snapshot(&repo.file(".kiln/oci")), store, "a plan changes nothing in the image store");
    assert_eq!(events(&repo), recorded, "a plan records nothing");
}

#[test]
fn update_base_changes_nothing_for_the_local_provider_and_plan_excludes_check() {
    let repo = Repo::example();
    let first = repo.run(&["bake", "--json"]).ok().json();
    let again = repo.run(&["bake", "--update-base", "--json"]).ok().json();
    assert_eq!(again["digest"], first["digest"]);
    assert_eq!(again["cached"], true, "a local root has no base to resolve again");
    let refused = repo.run(&["bake", "--plan", "--check"]).expect(2);
    assert!(refused.stderr.contains("--check"), "{}", refused.stderr);
}
