//! `upstream` and `soak` judge what was verified in the previous stage (DESIGN.md §4): a digest rolled away from
//! there does not pass upstream, one replaced by an ordinary later deployment does, and soak counts only the most
//! recent continuous period the digest was live there. Time is moved with `KILN_NOW`, never waited for.

mod common;

use common::{bake_greeting, Down, Repo, Run};

/// The example pipeline's clock at `minutes` past a fixed start; every command of a test runs at a later or equal
/// time than the one before, as a real clock would.
fn at(minutes: u64) -> String {
    format!("2026-11-28T{:02}:{:02}:00Z", 12 + minutes / 60, minutes % 60)
}

fn kiln(repo: &Repo, minutes: u64, args: &[&str]) -> Run {
    Run::of(repo.kiln().env("KILN_NOW", at(minutes)).args(args).output().unwrap(), args)
}

/// Promotes `digest` to dev and deploys it there (dev's gate is the example's smoke command).
fn deploy_dev(repo: &Repo, minutes: u64, digest: &str) {
    kiln(repo, minutes, &["promote", "--stage", "dev", "--digest", digest]).ok();
}

/// The example repository with two images that differ by greeting: (repo, first digest, second digest).
fn two_images() -> (Repo, String, String) {
    let (repo, _ports) = Repo::example_on_free_ports();
    let one = bake_greeting(&repo, "one");
    let two = bake_greeting(&repo, "two");
    (repo, one, two)
}

/// The verdict of the gate named `gate` in a promotion's `--json` answer (passed or refused).
fn verdict(run: &Run, gate: &str) -> serde_json::Value {
    let doc = run.json();
    let gates = doc["gates"].as_array().or_else(|| doc["details"]["gates"].as_array()).cloned().unwrap_or_default();
    gates.into_iter().find(|g| g["gate"] == gate).unwrap_or_else(|| panic!("no `{gate}` verdict in {doc}"))
}

fn promote_test(repo: &Repo, minutes: u64, digest: &str) -> Run {
    kiln(repo, minutes, &["promote", "--stage", "test", "--digest", digest, "--no-deploy", "--json"])
}

#[test]
fn a_digest_rolled_away_from_in_dev_does_not_pass_upstream_but_the_one_rolled_back_to_does() {
    let (repo, good, bad) = two_images();
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    deploy_dev(&repo, 0, &good);
    deploy_dev(&repo, 20, &bad);
    kiln(&repo, 40, &["rollback", "--stage", "dev", "--reason", "bad release"]).ok();

    // `bad` was live in dev for 20 minutes, so only upstream can refuse it: dev rolled away from it.
    let refused = promote_test(&repo, 60, &bad).expect(3);
    let upstream = verdict(&refused, "upstream");
    assert_eq!(upstream["passed"], false, "{upstream}");
    assert!(upstream["detail"].as_str().unwrap().starts_with("dev rolled away from it"), "{upstream}");
    assert_eq!(upstream["evidence"]["ended_by"], "rolled-back", "{upstream}");
    assert_eq!(verdict(&refused, "soak 10m")["passed"], true, "soak is not what refused it");
    assert!(refused.stderr.contains("upstream: dev rolled away from it"), "{}", refused.stderr);

    let passed = promote_test(&repo, 60, &good).ok();
    let upstream = verdict(&passed, "upstream");
    assert_eq!(upstream["passed"], true, "{upstream}");
    assert!(upstream["detail"].as_str().unwrap().starts_with("live in dev since seq"), "{upstream}");
    repo.run(&["verify"]).ok();
}

#[test]
fn a_digest_replaced_in_dev_by_an_ordinary_later_deployment_passes_upstream_and_its_ended_period_counts_as_soak() {
    let (repo, _ports) = Repo::example_on_free_ports();
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let eleven = bake_greeting(&repo, "eleven");
    let two = bake_greeting(&repo, "two");
    let three = bake_greeting(&repo, "three");
    // `eleven` is live in dev for 11 minutes, `two` for 2, then `three` replaces it.
    deploy_dev(&repo, 0, &eleven);
    deploy_dev(&repo, 11, &two);
    deploy_dev(&repo, 13, &three);

    let passed = promote_test(&repo, 60, &eleven).ok();
    let upstream = verdict(&passed, "upstream");
    assert_eq!(upstream["passed"], true, "{upstream}");
    assert!(upstream["detail"].as_str().unwrap().contains("until a later promotion replaced it"), "{upstream}");
    assert_eq!(upstream["evidence"]["ended_by"], "replaced", "{upstream}");
    let soak = verdict(&passed, "soak 10m");
    assert_eq!(soak["passed"], true, "{soak}");
    assert_eq!(soak["detail"], "was live in dev for 11m until replaced, needs 10m");

    // Replaced too, so upstream passes; but two minutes live is not a ten-minute soak, however long ago it ended.
    let refused = promote_test(&repo, 60, &two).expect(3);
    assert_eq!(verdict(&refused, "upstream")["passed"], true);
    let soak = verdict(&refused, "soak 10m");
    assert_eq!(soak["passed"], false, "{soak}");
    assert_eq!(soak["detail"], "was live in dev for 2m until replaced, needs 10m");
    assert_eq!(soak["evidence"]["live_for_secs"], 120);
    assert!(
        refused.stderr.contains("soak 10m: was live in dev for 2m until replaced, needs 10m"),
        "{}",
        refused.stderr
    );
}

#[test]
fn soak_restarts_when_a_digest_is_rolled_back_to_but_not_when_the_same_digest_is_redeployed() {
    let (repo, first, second) = two_images();
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    deploy_dev(&repo, 0, &first);
    // Heal: the stage goes down and the same digest is deployed again; its period goes on.
    kiln(&repo, 5, &["down", "--stage", "dev"]).ok();
    let healed = kiln(&repo, 6, &["deploy", "--stage", "dev", "--json"]).ok().json();
    assert_eq!(healed["outcome"], "healed", "{healed}");
    let finished = common::hello::events(&repo).iter().filter(|e| e["kind"] == "deploy-finished").count();
    assert_eq!(finished, 2, "the heal is a deployment of its own, finished in the ledger: {healed}");
    let plan = kiln(&repo, 11, &["promote", "--stage", "test", "--digest", &first, "--plan", "--json"]).ok();
    assert_eq!(verdict(&plan, "soak 10m")["detail"], "live in dev for 11m, needs 10m", "counted from the first deploy");

    deploy_dev(&repo, 20, &second);
    kiln(&repo, 25, &["rollback", "--stage", "dev", "--reason", "second misbehaves"]).ok();

    // Live for 20 minutes before, and 30 minutes since its first deployment, but only 5 since the rollback.
    let refused = promote_test(&repo, 30, &first).expect(3);
    assert_eq!(verdict(&refused, "upstream")["passed"], true);
    let soak = verdict(&refused, "soak 10m");
    assert_eq!(soak["passed"], false, "{soak}");
    assert_eq!(soak["detail"], "live in dev for 5m, needs 10m");
    assert_eq!(soak["evidence"]["live_since"], "2026-11-28T12:25:00.000Z");
    assert!(refused.stderr.contains("soak 10m: live in dev for 5m, needs 10m"), "{}", refused.stderr);

    let passed = promote_test(&repo, 36, &first).ok();
    assert_eq!(verdict(&passed, "soak 10m")["detail"], "live in dev for 11m, needs 10m");
    repo.run(&["verify"]).ok();
}

#[test]
fn a_digest_that_failed_its_verification_window_in_dev_does_not_pass_upstream() {
    let (repo, _ports) = Repo::example_on_free_ports();
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    repo.edit("pipelines/hello.toml", "keep-previous = 1", "keep-previous = 1\nverify-for = \"1s\"");
    repo.edit(
        "pipelines/hello.toml",
        "\n[[stage]]\nname = \"test\"",
        "[[stage.verify]]\ncommand = [\"scripts/check.sh\"]\ninterval = \"1s\"\n\n[[stage]]\nname = \"test\"",
    );
    repo.write(
        "pipelines/scripts/check.sh",
        "#!/bin/sh\nbody=$(curl -sf \"$KILN_ENDPOINT/\") || exit 1\ncase \"$body\" in bad*) echo \"bad answer\"; exit 1;; esac\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(repo.file("pipelines/scripts/check.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let good = bake_greeting(&repo, "good");
    let bad = bake_greeting(&repo, "bad");
    deploy_dev(&repo, 0, &good);
    let failed = kiln(&repo, 20, &["promote", "--stage", "dev", "--digest", &bad]).expect(4);
    assert!(failed.stderr.contains("verification failed"), "{}", failed.stderr);

    // Promoted to dev, and traffic reached it there, but it never finished a verified deployment.
    let refused = promote_test(&repo, 40, &bad).expect(3);
    let upstream = verdict(&refused, "upstream");
    assert_eq!(upstream["passed"], false, "{upstream}");
    let detail = upstream["detail"].as_str().unwrap();
    assert!(detail.contains("but no deployment of it has finished healthy there"), "{upstream}");
    assert_eq!(verdict(&refused, "soak 10m")["detail"], "never live in dev");

    let passed = promote_test(&repo, 40, &good).ok();
    assert_eq!(verdict(&passed, "upstream")["passed"], true, "the release that stayed live goes on");
}
