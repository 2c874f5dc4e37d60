//! `kiln metrics` on a real ledger: deployments, a rollback, and the `--json` document docs/json.md describes.

mod common;

use common::{dev_only, git, Down, Repo};

/// Runs kiln with its clock pinned `hours` after a fixed start, so the durations below are exact.
fn at(repo: &Repo, hours: u64, args: &[&str]) -> common::Run {
    on_day(repo, "2026-03-01", hours, args)
}

fn on_day(repo: &Repo, day: &str, hours: u64, args: &[&str]) -> common::Run {
    let now = format!("{day}T{hours:02}:00:00Z");
    common::Run::of(repo.kiln().args(args).env("KILN_NOW", now).output().unwrap(), args)
}

fn bake(repo: &Repo, hours: u64, greeting: &str) -> String {
    let text = std::fs::read_to_string(repo.file("images/hello.toml")).unwrap();
    let start = text.find("GREETING = \"").unwrap() + "GREETING = \"".len();
    let end = start + text[start..].find('"').unwrap();
    repo.write("images/hello.toml", &format!("{}{greeting}{}", &text[..start], &text[end..]));
    at(repo, hours, &["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string()
}

#[test]
fn metrics_count_deployments_a_rollback_and_lead_time_on_the_last_stage() {
    let (repo, _port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };

    // Before any deployment every metric is "none".
    let empty = at(&repo, 1, &["metrics", "--json"]).ok().json();
    assert_eq!(empty["stages"][0]["deployments"], 0, "{empty}");
    assert!(empty["stages"][0]["per_day"].is_null(), "{empty}");
    assert!(empty["stages"][0]["change_failure_rate"].is_null(), "{empty}");
    assert!(empty["lead_time"]["bake_to_prod"].is_null(), "{empty}");
    let text = at(&repo, 1, &["metrics"]).ok().stdout;
    assert!(text.contains("change-failure rate   none"), "{text}");
    assert!(!text.contains("NaN"), "{text}");

    let first = bake(&repo, 1, "one");
    at(&repo, 2, &["promote", "--stage", "dev", "--digest", &first]).ok();
    let second = bake(&repo, 3, "two");
    at(&repo, 3, &["promote", "--stage", "dev", "--digest", &second]).ok();
    at(&repo, 4, &["rollback", "--stage", "dev", "--reason", "bad greeting"]).ok();

    let doc = at(&repo, 5, &["metrics", "--since", "7d", "--json"]).ok().json();
    assert_eq!(doc["pipeline"], "hello");
    assert_eq!(doc["since"], "7days");
    assert_eq!(doc["to"], "2026-03-01T05:00:00.000Z");
    assert_eq!(doc["prod_stage"], "dev", "a pipeline of one stage: dev is its last");
    let dev = &doc["stages"][0];
    assert_eq!(dev["stage"], "dev");
    assert_eq!(dev["deployments"], 2, "the rollback is not a deployment: {doc}");
    assert_eq!(dev["per_day"], 2.0 / 7.0);
    assert_eq!(dev["failed"], 1);
    assert_eq!(dev["change_failure_rate"], 0.5);
    assert_eq!(dev["failures"][0]["digest"], second.as_str());
    assert_eq!(dev["failures"][0]["cause"], "rolled-back");
    // The rollback started and finished at the same pinned time.
    assert_eq!(dev["time_to_restore"], serde_json::json!({"count": 1, "median_secs": 0, "p90_secs": 0}));
    assert_eq!(dev["unrestored"], 0);
    // Bake → deployed: 1 h for the first image, 0 h for the second. No git repository: no commit time.
    assert_eq!(doc["lead_time"]["deployments"], 2);
    assert_eq!(doc["lead_time"]["bake_to_prod"], serde_json::json!({"count": 2, "median_secs": 0, "p90_secs": 3600}));
    assert!(doc["lead_time"]["commit_to_prod"].is_null(), "{doc}");

    // A window that opens after both deployments counts neither.
    let later = at(&repo, 5, &["metrics", "--since", "30m", "--json"]).ok().json();
    assert_eq!(later["stages"][0]["deployments"], 0, "{later}");
}

#[test]
fn lead_time_from_the_commit_asks_git_when_the_commit_was_made() {
    let (repo, _port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    repo.write(".gitignore", ".kiln/\n");
    // common::git commits at 2026-01-01T00:00:00Z.
    git(repo.path(), &["init", "-q", "-b", "main"]);
    git(repo.path(), &["add", "."]);
    git(repo.path(), &["commit", "-q", "-m", "hello"]);
    let baked = on_day(&repo, "2026-01-01", 2, &["bake", "--json"]).ok().json();
    assert!(baked["commit"].is_string(), "{baked}");
    on_day(&repo, "2026-01-01", 3, &["promote", "--stage", "dev"]).ok();
    let doc = on_day(&repo, "2026-01-01", 4, &["metrics", "--json"]).ok().json();
    let lead = &doc["lead_time"];
    assert_eq!(lead["bake_to_prod"], serde_json::json!({"count": 1, "median_secs": 3600, "p90_secs": 3600}));
    assert_eq!(lead["commit_to_prod"], serde_json::json!({"count": 1, "median_secs": 10800, "p90_secs": 10800}));
    let text = on_day(&repo, "2026-01-01", 4, &["metrics"]).ok().stdout;
    assert!(text.contains("commit → dev  median 3h, p90 3h (of 1)"), "{text}");
}

#[test]
fn bad_arguments_are_usage_errors() {
    let (repo, _port) = dev_only(1);
    for (args, message) in [
        (&["metrics", "--stage", "prod"][..], "--stage prod: pipeline hello has no such stage (its stages: dev)"),
        (&["metrics", "--since", "soon"][..], "`soon` is not a duration such as 7d or 30d"),
        (&["metrics", "--since", "100000years"][..], "reaches back before 1970"),
    ] {
        let run = repo.run(args).expect(2);
        assert!(run.stderr.contains(message), "{args:?}: {}", run.stderr);
    }
}
