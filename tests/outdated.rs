//! `kiln outdated` on the local example: a stage image built on a base that was baked again is listed until the
//! stage runs an image built on the new base.

mod common;

use common::{dev_only, Down, Repo};

fn bake(repo: &Repo) -> serde_json::Value {
    repo.run(&["bake", "--json"]).ok().json()
}

#[test]
fn a_stage_on_a_superseded_base_is_outdated_until_the_image_on_the_new_base_reaches_it() {
    let (repo, _port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let first = bake(&repo);
    let old_digest = first["digest"].as_str().unwrap().to_string();
    let old_base = first["parent"].as_str().unwrap().to_string();
    repo.run(&["promote", "--stage", "dev"]).ok();
    assert_eq!(repo.run(&["outdated"]).ok().stdout.trim(), "nothing outdated");
    assert_eq!(repo.run(&["outdated", "--json"]).ok().json(), serde_json::json!({ "outdated": [] }));

    // A file of the base recipe changes: the new bake makes a new base, and hello rebuilt on it; dev still runs
    // the old hello.
    repo.write("images/files/base/etc/motd", "welcome to the patched base\n");
    let second = bake(&repo);
    let new_digest = second["digest"].as_str().unwrap().to_string();
    let new_base = second["parent"].as_str().unwrap().to_string();
    assert_ne!(new_base, old_base);

    let doc = repo.run(&["outdated", "--json"]).ok().json();
    assert_eq!(
        doc,
        serde_json::json!({ "outdated": [{
            "pipeline": "hello",
            "stage": "dev",
            "digest": old_digest,
            "live": true,
            "promoted": true,
            "ancestor_recipe": "base",
            "ancestor_digest": old_base,
            "newer_digest": new_base,
        }]})
    );
    let text = repo.run(&["outdated"]).ok().stdout;
    let short = |d: &str| d["sha256:".len().."sha256:".len() + 12].to_string();
    assert!(text.contains("hello/dev"), "{text}");
    for digest in [&old_digest, &old_base, &new_base] {
        assert!(text.contains(&short(digest)), "{text}");
    }

    repo.run(&["promote", "--stage", "dev", "--digest", &new_digest]).ok();
    assert_eq!(repo.run(&["outdated"]).ok().stdout.trim(), "nothing outdated");
}

#[test]
fn outdated_reads_every_pipeline_of_the_repository() {
    let (repo, _port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: Some("hello") };
    bake(&repo);
    repo.run(&["promote", "--stage", "dev"]).ok();
    // A second pipeline of the same image, on its own ledger, with nothing in it: no `--pipeline` is needed.
    let text = std::fs::read_to_string(repo.file("pipelines/hello.toml")).unwrap();
    repo.write("pipelines/other.toml", &text.replace("ledger = \".kiln/ledger\"", "ledger = \".kiln/other\""));
    repo.write("images/files/base/etc/motd", "patched\n");
    repo.run(&["bake", "--pipeline", "hello"]).ok();
    let doc = repo.run(&["outdated", "--json"]).ok().json();
    let pipelines: Vec<&str> =
        doc["outdated"].as_array().unwrap().iter().map(|o| o["pipeline"].as_str().unwrap()).collect();
    assert_eq!(pipelines, vec!["hello"], "{doc}");
    let only_other = repo.run(&["outdated", "--pipeline", "other", "--json"]).ok().json();
    assert_eq!(only_other, serde_json::json!({ "outdated": [] }));
}
