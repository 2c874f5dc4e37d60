//! Messages say what happened in words: refusals name what was refused (promotion, deployment), the same thing is
//! called the same in every command, uppercase digests are understood, and names say why they are invalid.

mod common;

use common::{free_port, tiny_repo, Repo};

fn baked() -> (Repo, String) {
    let repo = tiny_repo(free_port());
    let digest = repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    (repo, digest)
}

fn short(digest: &str) -> &str {
    &digest["sha256:".len().."sha256:".len() + 12]
}

#[test]
fn a_refused_promotion_is_worded_as_a_promotion() {
    let (repo, digest) = baked();
    let run = repo.run(&["promote", "--stage", "dev", "--json"]).expect(3);
    let wanted = format!("error: promotion of {} to dev refused:\n  - approvals 1: 0 of 1", short(&digest));
    assert!(run.stderr.contains(&wanted), "{}", run.stderr);
    let doc = run.json();
    assert_eq!(doc["details"]["refused"], "promotion");
    assert!(doc["details"]["gates"].as_array().unwrap().iter().all(|g| g.get("evidence").is_some()), "{doc}");
}

#[test]
fn a_promotion_with_nothing_upstream_does_not_call_nothing_an_image() {
    let repo = Repo::example();
    let run = repo.run(&["promote", "--stage", "test"]).expect(3);
    assert!(
        run.stderr.contains(
            "error: promotion to test refused, there is no image to take there:\n  - upstream: nothing is live in dev"
        ),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("of nothing"), "{}", run.stderr);
}

#[test]
fn a_refused_deployment_is_worded_as_a_deployment() {
    let (repo, digest) = baked();
    repo.run(&["approve", "--stage", "dev", "--digest", &digest]).ok();
    repo.run(&["promote", "--stage", "dev", "--no-deploy"]).ok();
    repo.run(&["revoke", &digest, "--reason", "leaks memory"]).ok();
    let run = repo.run(&["deploy", "--stage", "dev", "--json"]).expect(3);
    let wanted = format!(
        "error: deployment of {} to dev refused:\n  - not-revoked: it is revoked: leaks memory",
        short(&digest)
    );
    assert!(run.stderr.contains(&wanted), "{}", run.stderr);
    assert!(!run.stderr.contains("promotion"), "{}", run.stderr);
    assert_eq!(run.json()["details"]["refused"], "deployment");
}

#[test]
fn uppercase_digests_are_understood_and_recorded_lowercase() {
    let (repo, digest) = baked();
    let upper_short = short(&digest).to_uppercase();
    let approved = repo.run(&["approve", "--stage", "dev", "--digest", &upper_short, "--json"]).ok().json();
    assert_eq!(approved["digest"], digest.as_str());
    let upper_full = format!("sha256:{}", digest["sha256:".len()..].to_uppercase());
    let promoted = repo.run(&["promote", "--stage", "dev", "--digest", &upper_full, "--plan", "--json"]).ok().json();
    assert_eq!(promoted["digest"], digest.as_str());
    let lineage = repo.run(&["lineage", &upper_short, "--json"]).ok().json();
    assert_eq!(lineage["image"]["digest"], digest.as_str());
}

#[test]
fn bake_and_run_call_a_reused_image_cached() {
    let (repo, digest) = baked();
    let bake = repo.run(&["bake"]).ok();
    assert!(bake.stdout.contains(&format!("cached app          {digest}")), "{}", bake.stdout);
    let run = repo.run(&["run"]).ok();
    assert!(run.stdout.starts_with(&format!("cached {digest}")), "{}", run.stdout);
    assert!(!run.stdout.contains("reused"), "{}", run.stdout);
}

#[test]
fn an_invalid_name_says_what_makes_it_invalid() {
    let repo = Repo::example();
    repo.edit("pipelines/hello.toml", "image = \"hello\"", "image = \"a b\"");
    let run = repo.run(&["bake"]).expect(2);
    assert!(run.stderr.contains("image: `a b` is not a valid recipe name: it contains a space"), "{}", run.stderr);
    assert!(!run.stderr.contains("does not exist"), "{}", run.stderr);
    let run = repo.run(&["--pipeline", "my pipeline", "bake"]).expect(2);
    assert!(run.stderr.contains("`my pipeline` is not a valid pipeline name: it contains a space"), "{}", run.stderr);
}
