//! Actor names are checked before anything is recorded (trimmed, no control characters, at most 64 characters),
//! and an approvals gate with `distinct-from-promoter = true` does not count the promoter's own approval.

mod common;

use common::{free_port, tiny_repo, Repo};

fn baked() -> (Repo, String) {
    let repo = tiny_repo(free_port());
    let digest = repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    (repo, digest)
}

fn as_actor(repo: &Repo, actor: &str, args: &[&str]) -> common::Run {
    common::Run::of(repo.kiln().env("KILN_ACTOR", actor).args(args).output().unwrap(), args)
}

fn log_lines(repo: &Repo) -> Vec<String> {
    repo.run(&["log", "--limit", "1000"]).ok().stdout.lines().map(str::to_string).collect()
}

/// (KILN_ACTOR, expected fragment of the error)
const BAD_ACTORS: &[(&str, &str)] = &[
    ("eve\nmallory", "KILN_ACTOR=`eve\\nmallory` is not a valid actor name: it contains the control character \\u{a}"),
    ("eve\rmallory", "it contains the control character \\u{d}"),
    ("ana\u{1b}[2J", "it contains the control character \\u{1b}"),
    ("ana\tbob", "it contains the control character \\u{9}"),
    (
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
        "it is 104 characters long; at most 64 are allowed",
    ),
];

#[test]
fn bad_actor_names_are_refused_before_anything_is_recorded() {
    let (repo, digest) = baked();
    let before = log_lines(&repo);
    for (actor, fragment) in BAD_ACTORS {
        for args in
            [&["approve", "--stage", "dev", "--digest", &digest][..], &["bake"], &["revoke", &digest, "--reason", "x"]]
        {
            let run = as_actor(&repo, actor, args).expect(2);
            assert!(run.stderr.contains(fragment), "{actor:?} `kiln {}`:\n{}", args.join(" "), run.stderr);
            assert!(run.stderr.contains("hint: set KILN_ACTOR"), "{}", run.stderr);
        }
    }
    assert_eq!(log_lines(&repo), before, "a refused actor recorded nothing");
}

#[test]
fn actor_names_from_ci_and_os_variables_are_checked_too() {
    let (repo, digest) = baked();
    for var in ["GITHUB_ACTOR", "USER"] {
        let run = repo
            .kiln()
            .env_remove("KILN_ACTOR")
            .env(var, "ci\nbot")
            .args(["approve", "--stage", "dev", "--digest", &digest])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert_eq!(run.status.code(), Some(2), "{var}: {stderr}");
        assert!(stderr.contains(&format!("{var}=`ci\\nbot` is not a valid actor name")), "{var}: {stderr}");
    }
}

#[test]
fn actor_names_are_recorded_trimmed() {
    let (repo, digest) = baked();
    let approved = as_actor(&repo, "  ana  ", &["approve", "--stage", "dev", "--digest", &digest, "--json"]).ok();
    assert_eq!(approved.json()["actor"], "ana");
    let log = repo.run(&["log", "--json"]).ok().json();
    assert_eq!(log["events"][0]["actor"], "ana");
}

#[test]
fn distinct_from_promoter_does_not_count_the_promoters_own_approval() {
    let (repo, digest) = baked();
    repo.edit("pipelines/app.toml", "approvals = 1", "approvals = 1\ndistinct-from-promoter = true");
    as_actor(&repo, "ana", &["approve", "--stage", "dev", "--digest", &digest]).ok();

    let refused = as_actor(&repo, "ana", &["promote", "--stage", "dev", "--no-deploy", "--json"]).expect(3);
    let doc = refused.json();
    let gate = doc["details"]["gates"].as_array().unwrap().iter().find(|g| g["gate"] == "approvals 1").unwrap().clone();
    assert_eq!(gate["passed"], false, "{gate}");
    assert_eq!(
        gate["detail"], "0 of 1; ana approved but is promoting, and approvers must differ from the promoter",
        "{gate}"
    );
    assert_eq!(gate["evidence"]["promoter"], "ana", "{gate}");

    let promoted = as_actor(&repo, "bob", &["promote", "--stage", "dev", "--no-deploy", "--json"]).ok();
    let doc = promoted.json();
    assert_eq!(doc["outcome"], "promoted");
    let gate = doc["gates"].as_array().unwrap().iter().find(|g| g["gate"] == "approvals 1").unwrap().clone();
    assert_eq!(gate["detail"], "1 of 1 (ana)", "{gate}");
}

#[test]
fn without_the_key_the_promoter_may_approve() {
    let (repo, digest) = baked();
    as_actor(&repo, "ana", &["approve", "--stage", "dev", "--digest", &digest]).ok();
    let promoted = as_actor(&repo, "ana", &["promote", "--stage", "dev", "--no-deploy", "--json"]).ok();
    assert_eq!(promoted.json()["outcome"], "promoted");
}
