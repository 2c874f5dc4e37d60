//! The view cache never answers wrong: with its index shards deleted, truncated or corrupted, every command answers
//! as it does with no cache at all.

mod common;

use std::path::Path;

use common::{copy_dir, Repo};

const CACHE: &str = ".kiln/ledger/cache";
const INDEX: &str = ".kiln/ledger/cache/index";

fn shard_files(repo: &Repo) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(repo.file(INDEX))
        .map(|entries| {
            entries.flatten().map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "json")).collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// The repro from the issue: with the files under `cache/index/` deleted, `revoke <base>` answered "no image
/// matches digest", and the child built on that base then promoted.
#[test]
fn revoking_a_base_works_with_the_index_deleted_and_its_child_is_refused() {
    let repo = common::tiny_repo(common::free_port());
    let app = repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    let base = repo.run(&["lineage", &app, "--json"]).ok().json()["parents"][0]["digest"].as_str().unwrap().to_string();
    repo.run(&["approve", "--stage", "dev", "--digest", &app]).ok();
    let shards = shard_files(&repo);
    assert!(!shards.is_empty(), "the view cache saved no index shards");
    for shard in shards {
        std::fs::remove_file(shard).unwrap();
    }

    let revoked = repo.run(&["revoke", &base, "--reason", "CVE-2026-0002", "--json"]).ok().json();
    assert_eq!(revoked["descendants"][0], app.as_str(), "{revoked}");
    let refused = repo.run(&["promote", "--stage", "dev", "--digest", &app, "--no-deploy"]).expect(3);
    assert!(refused.stderr.contains("not-revoked"), "{}", refused.stderr);
}

type Damage = fn(&Path);

fn damages() -> Vec<(&'static str, Damage)> {
    vec![
        ("index deleted", |index| std::fs::remove_dir_all(index).unwrap()),
        ("every shard truncated", |index| {
            for shard in std::fs::read_dir(index).unwrap().flatten() {
                let bytes = std::fs::read(shard.path()).unwrap();
                std::fs::write(shard.path(), &bytes[..bytes.len() / 2]).unwrap();
            }
        }),
        ("every shard an empty but valid shard", |index| {
            for shard in std::fs::read_dir(index).unwrap().flatten() {
                std::fs::write(shard.path(), br#"{"images":{},"keys":{}}"#).unwrap();
            }
        }),
        ("one shard deleted", |index| {
            let first = std::fs::read_dir(index).unwrap().flatten().next().unwrap();
            std::fs::remove_file(first.path()).unwrap();
        }),
    ]
}

/// What the commands that only read answer (exit code and stdout): the record as `status`, `lineage`, `images` and
/// `log` show it, and the gates' verdicts as `promote --plan` judges them.
/// With `no_cache`, each command runs with the view cache deleted first.
fn answers(repo: &Repo, app: &str, base: &str, no_cache: bool) -> Vec<(String, i32, String)> {
    let queries: [&[&str]; 9] = [
        &["status", "--json"],
        &["lineage", app, "--json"],
        &["lineage", base, "--json"],
        &["lineage", "dev", "--json"],
        &["images", "--json"],
        &["log", "--json", "--limit", "100"],
        &["log", "--json", "--digest", app],
        &["promote", "--stage", "dev", "--digest", app, "--plan", "--json"],
        &["promote", "--stage", "dev", "--digest", base, "--plan", "--json"],
    ];
    queries
        .iter()
        .map(|q| {
            if no_cache {
                let _ = std::fs::remove_dir_all(repo.file(CACHE));
            }
            let run = repo.run(q);
            (q.join(" "), run.code, run.stdout)
        })
        .collect()
}

#[test]
fn every_command_answers_as_with_no_cache_whatever_happened_to_the_shards() {
    let repo = common::tiny_repo(common::free_port());
    let app = repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    let base = repo.run(&["lineage", &app, "--json"]).ok().json()["parents"][0]["digest"].as_str().unwrap().to_string();
    repo.run(&["approve", "--stage", "dev", "--digest", &app]).ok();
    repo.run(&["promote", "--stage", "dev", "--no-deploy"]).ok();
    let pristine = tempfile::tempdir().unwrap();
    copy_dir(&repo.file(CACHE), pristine.path());
    assert!(!shard_files(&repo).is_empty(), "the view cache saved no index shards");

    let truth = answers(&repo, &app, &base, true);
    let codes: Vec<i32> = truth.iter().map(|(_, code, _)| *code).collect();
    assert_eq!(codes, [0, 0, 0, 0, 0, 0, 0, 0, 2], "{truth:#?}");

    for (damage, apply) in damages() {
        std::fs::remove_dir_all(repo.file(CACHE)).unwrap();
        copy_dir(pristine.path(), &repo.file(CACHE));
        apply(&repo.file(INDEX));
        for ((query, code, expected), (_, got_code, got)) in truth.iter().zip(answers(&repo, &app, &base, false)) {
            assert_eq!(
                (got_code, &got),
                (*code, expected),
                "{damage}: `kiln {query}` answered differently from no cache"
            );
        }
        // The gates judge from the same view: the approval counts, and a revoked base refuses its child.
        std::fs::remove_dir_all(repo.file(CACHE)).unwrap();
        copy_dir(pristine.path(), &repo.file(CACHE));
        apply(&repo.file(INDEX));
        let second = repo.run(&["promote", "--stage", "dev", "--digest", &app, "--no-deploy", "--json"]).ok().json();
        assert_eq!(second["outcome"], "already-promoted", "{damage}: {second}");
    }
}
