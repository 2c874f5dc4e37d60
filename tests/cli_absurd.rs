//! No input makes kiln panic: every command is run with absurd durations, times, numbers and digests, and each
//! must end with an exit code of its own (never Rust's 101) and no "panicked" on stderr.

mod common;

use common::{free_port, tiny_repo, Down, Repo};

/// Every subcommand, with the arguments it needs to get past clap in the tiny repository.
fn every_command(digest: &str) -> Vec<Vec<String>> {
    let commands: &[&[&str]] = &[
        &["run"],
        &["bake"],
        &["promote", "--stage", "dev"],
        &["promote", "--stage", "dev", "--plan"],
        &["deploy", "--stage", "dev"],
        &["rollback", "--stage", "dev"],
        &["approve", "--stage", "dev", "--digest", digest],
        &["status"],
        &["lineage", "dev"],
        &["lineage", digest],
        &["log"],
        &["verify"],
        &["images"],
        &["gc", "--dry-run"],
        &["revoke", digest, "--reason", "absurd"],
        &["down", "--stage", "dev"],
        &["metrics"],
        &["outdated"],
        &["report", "--out", "-"],
        &["diff", digest, "dev"],
        &["drill", "--stage", "dev", "--kind", "kill-instance"],
    ];
    commands.iter().map(|c| c.iter().map(|a| a.to_string()).collect()).collect()
}

fn assert_no_panic(repo: &Repo, args: &[String], env: &[(&str, &str)], what: &str) -> i32 {
    let output = repo.kiln().args(args).envs(env.iter().copied()).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    let code = output.status.code().unwrap_or(-1);
    assert!(
        code != 101 && !stderr.contains("panicked"),
        "{what}: `kiln {}` panicked (exit {code}):\n{stderr}",
        args.join(" ")
    );
    code
}

/// A tiny repository with an image baked, approved and promoted to dev (not deployed): the state in which a huge
/// lease or a far-future clock used to crash `kiln deploy`.
fn promoted_repo() -> (Repo, String) {
    let repo = tiny_repo(free_port());
    let digest = repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    repo.run(&["approve", "--stage", "dev", "--digest", &digest]).ok();
    repo.run(&["promote", "--stage", "dev", "--no-deploy"]).ok();
    (repo, digest)
}

#[test]
fn absurd_durations_in_the_config_are_refused_by_every_command() {
    let cases: &[(&str, &str, &str)] = &[
        ("pipelines/app.toml", "name = \"dev\"", "name = \"dev\"\nlease = \"10000y\""),
        ("pipelines/app.toml", "name = \"dev\"", "name = \"dev\"\nready-timeout = \"99999999999d\""),
        (
            "pipelines/app.toml",
            "approvals = 1",
            "approvals = 1\n[[stage.gate]]\ncommand = [\"true\"]\ntimeout = \"5000y\"",
        ),
        ("images/app.toml", "ready-timeout = \"5s\"", "ready-timeout = \"10000y\""),
        ("images/app.toml", "run = \"scripts/setup.sh\"", "run = \"scripts/setup.sh\"\ntimeout = \"10000y\""),
    ];
    for (file, old, new) in cases {
        let (repo, digest) = promoted_repo();
        let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
        repo.edit(file, old, new);
        // Every command loads the pipeline; recipes are loaded by the commands that bake.
        let loads_it = |command: &str| file.starts_with("pipelines/") || command == "bake" || command == "run";
        for args in every_command(&digest).into_iter().filter(|args| loads_it(&args[0])) {
            let code = assert_no_panic(&repo, &args, &[], new);
            assert_eq!(code, 2, "{file}: {new:?}: `kiln {}` exited {code}, wanted 2", args.join(" "));
        }
    }
}

#[test]
fn an_absurd_pinned_clock_is_refused_by_every_command() {
    let (repo, digest) = promoted_repo();
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    for pinned in ["9999-12-31T23:59:59Z", "1970-01-01T00:00:00Z", "0000-01-01T00:00:00Z", "99999-01-01T00:00:00Z"] {
        for args in every_command(&digest) {
            let code = assert_no_panic(&repo, &args, &[("KILN_NOW", pinned)], pinned);
            assert_eq!(code, 2, "KILN_NOW={pinned}: `kiln {}` exited {code}, wanted 2", args.join(" "));
        }
    }
}

#[test]
fn absurd_arguments_do_not_panic() {
    let (repo, _digest) = promoted_repo();
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let long = "f".repeat(100_000);
    let upper_z = format!("sha256:{}", "Z".repeat(64));
    let cases: Vec<Vec<&str>> = vec![
        vec!["log", "--limit", "18446744073709551615"],
        vec!["log", "--limit", "99999999999999999999999"],
        vec!["log", "--limit", "0"],
        vec!["log", "--stage", &long],
        vec!["lineage", &long],
        vec!["lineage", "sha256:"],
        vec!["approve", "--stage", "dev", "--digest", &upper_z],
        vec!["approve", "--stage", &long, "--digest", &long],
        vec!["promote", "--stage", "dev", "--digest", &long, "--no-deploy"],
        vec!["promote", "--stage", "dev", "--digest", "ffffffffffff", "--plan"],
        vec!["rollback", "--stage", "dev", "--to", &upper_z],
        vec!["revoke", &long, "--reason", &long],
        vec!["revoke", "ffffffffffff", "--reason", "   "],
        vec!["--pipeline", &long, "status"],
        vec!["--ledger", "s3://", "log"],
        vec!["-C", "/nonexistent/dir", "log"],
        vec!["metrics", "--since", "99999999999999d"],
        vec!["metrics", "--since", "0s"],
        vec!["report", "--out", "-", "--since", "99999999999999d"],
        vec!["report", "--out", &long],
        vec!["diff", &long, &upper_z],
        vec!["diff", "sha256:", "dev"],
        vec!["drill", "--stage", &long, "--kind", "kill-proxy"],
        vec!["drill", "--stage", "dev", "--kind", "failed-verify", "--converge-timeout", "99999999999999d"],
    ];
    for args in cases {
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        assert_no_panic(&repo, &args, &[], "absurd argument");
    }
}
