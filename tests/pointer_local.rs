//! Stage pointers on the local provider: the OCI ref `<pipeline>-<stage>` in `.kiln/oci` names the digest the stage
//! should run, it moves on every promotion (deployed or not) and as a rollback starts, every write is in the
//! ledger, and standard tools (skopeo) read it.

mod common;

use std::process::Command;

use common::{bake_greeting, dev_only, promote_only, Down, Repo};

/// The manifest digest skopeo reads through the stage pointer `hello-<stage>`.
fn skopeo_digest(repo: &Repo, stage: &str) -> String {
    let reference = format!("oci:{}:hello-{stage}", repo.file(".kiln/oci").display());
    let output = match Command::new("skopeo").args(["inspect", &reference]).output() {
        Ok(output) => output,
        Err(err) => panic!("cannot run `skopeo` ({err}); run `scripts/install-test-deps` to install it"),
    };
    assert!(output.status.success(), "skopeo inspect {reference}: {}", String::from_utf8_lossy(&output.stderr));
    let inspected: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    inspected["Digest"].as_str().unwrap().to_string()
}

/// The `pointer-published` events, oldest first, as (digest, pointer).
fn pointer_events(repo: &Repo) -> Vec<(String, String)> {
    let log = repo.run(&["log", "--json", "--limit", "1000"]).ok().json();
    let mut out: Vec<(String, String)> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "pointer-published")
        .map(|e| {
            assert_eq!(e["pipeline"], "hello", "{e}");
            assert_eq!(e["stage"], "dev", "{e}");
            (e["digest"].as_str().unwrap().to_string(), e["pointer"].as_str().unwrap().to_string())
        })
        .collect();
    out.reverse();
    out
}

#[test]
fn promotion_publishes_the_pointer_also_without_deploying_and_rollback_moves_it() {
    let (repo, port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let one = bake_greeting(&repo, "one");
    repo.run(&["promote", "--stage", "dev", "--digest", &one]).ok();
    assert_eq!(skopeo_digest(&repo, "dev"), one);
    assert_eq!(common::greeting(port), "one");
    assert_eq!(pointer_events(&repo), [(one.clone(), "hello-dev".to_string())]);
    let log = repo.run(&["log", "--limit", "100"]).ok();
    assert!(
        log.stdout.lines().any(|l| l.contains("pointer-published") && l.ends_with("pointer hello-dev")),
        "{}",
        log.stdout
    );

    // --no-deploy: the stage's digest changed, so its pointer follows, while the old image keeps serving.
    let two = bake_greeting(&repo, "two");
    promote_only(&repo, &two);
    assert_eq!(skopeo_digest(&repo, "dev"), two);
    assert_eq!(common::greeting(port), "one");
    repo.run(&["deploy", "--stage", "dev"]).ok();
    assert_eq!(common::greeting(port), "two");
    assert_eq!(pointer_events(&repo).len(), 2, "deploying what the pointer names writes it no more");

    // A rollback moves what the stage should run back to `one`: the pointer moves as it starts.
    repo.run(&["rollback", "--stage", "dev", "--reason", "pointer test"]).ok();
    assert_eq!(common::greeting(port), "one");
    assert_eq!(skopeo_digest(&repo, "dev"), one);
    let events = pointer_events(&repo);
    let digests: Vec<&str> = events.iter().map(|(d, _)| d.as_str()).collect();
    assert_eq!(digests, [one.as_str(), two.as_str(), one.as_str()]);

    // gc leaves every image a pointer names readable; the kiln-made refs stay beside it.
    let three = bake_greeting(&repo, "three");
    promote_only(&repo, &three);
    repo.run(&["gc"]).ok();
    assert_eq!(skopeo_digest(&repo, "dev"), three);
    repo.run(&["verify"]).ok();
}

#[test]
fn promoting_again_what_the_pointer_names_writes_nothing() {
    let (repo, _port) = dev_only(1);
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    // Any write of the pointer would fail: promoting the same digest again must not make one.
    let again = repo
        .kiln()
        .env("KILN_INJECT", "publish_pointer=fail:the pointer store is down")
        .args(["promote", "--stage", "dev", "--digest", &one, "--no-deploy", "--json"])
        .output()
        .unwrap();
    let again = common::Run::of(again, &["promote"]).ok().json();
    assert_eq!(again["outcome"], "already-promoted");
    assert_eq!(pointer_events(&repo).len(), 1);
}

#[test]
fn a_pointer_that_could_not_be_written_is_written_by_the_next_promote() {
    let (repo, _port) = dev_only(1);
    let one = bake_greeting(&repo, "one");
    let failed = repo
        .kiln()
        .env("KILN_INJECT", "publish_pointer=fail:the pointer store is down")
        .args(["promote", "--stage", "dev", "--digest", &one, "--no-deploy"])
        .output()
        .unwrap();
    let failed = common::Run::of(failed, &["promote"]).expect(1);
    assert!(failed.stderr.contains("is promoted to dev, but its stage pointer was not published"), "{}", failed.stderr);
    assert!(failed.stderr.contains("the pointer store is down"), "{}", failed.stderr);
    assert!(failed.stderr.contains("again to publish it"), "{}", failed.stderr);
    assert!(pointer_events(&repo).is_empty(), "nothing published, nothing recorded");
    let status = repo.run(&["status", "--json"]).ok().json();
    assert_eq!(status["stages"][0]["promoted"]["digest"], one.as_str(), "the promotion itself is recorded: {status}");

    let again = repo.run(&["promote", "--stage", "dev", "--digest", &one, "--no-deploy", "--json"]).ok().json();
    assert_eq!(again["outcome"], "already-promoted");
    assert_eq!(skopeo_digest(&repo, "dev"), one);
    assert_eq!(pointer_events(&repo), [(one, "hello-dev".to_string())]);
}

/// Promoting to the last stage asks the provider to protect the image; earlier stages do not.
#[test]
fn promoting_to_the_last_stage_protects_the_image() {
    let (repo, _ports) = Repo::example_on_free_ports();
    let one = bake_greeting(&repo, "one");
    let with_protect_failing = |args: &[&str]| {
        let output = repo.kiln().env("KILN_INJECT", "protect=fail:protection is unavailable").args(args).output();
        common::Run::of(output.unwrap(), args)
    };
    // dev is not the last stage: no protect call, so the injected failure never fires.
    with_protect_failing(&["promote", "--stage", "dev", "--digest", &one, "--no-deploy"]).ok();

    let (repo, _port) = dev_only(1);
    let one = bake_greeting(&repo, "one");
    let args = ["promote", "--stage", "dev", "--digest", &one, "--no-deploy"];
    let output = repo.kiln().env("KILN_INJECT", "protect=fail:protection is unavailable").args(args).output();
    let failed = common::Run::of(output.unwrap(), &args).expect(1);
    assert!(failed.stderr.contains("could not protect it from deletion"), "{}", failed.stderr);
    assert!(failed.stderr.contains("protection is unavailable"), "{}", failed.stderr);
    assert_eq!(skopeo_digest(&repo, "dev"), one, "the promotion and its pointer are recorded");
    repo.run(&args).ok();
}

/// A pointer lost behind kiln's back (its ref removed from index.json) is drift, and promoting the digest again
/// writes it back.
#[test]
fn a_lost_pointer_is_drift_and_promoting_again_writes_it_back() {
    let (repo, _port) = dev_only(1);
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    let index_path = repo.file(".kiln/oci/index.json");
    let mut index: serde_json::Value = serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    let manifests = index["manifests"].as_array_mut().unwrap();
    let before = manifests.len();
    manifests.retain(|m| m["annotations"]["org.opencontainers.image.ref.name"] != "hello-dev");
    assert_eq!(manifests.len(), before - 1, "the pointer was in the index");
    std::fs::write(&index_path, serde_json::to_vec(&index).unwrap()).unwrap();

    let drift = repo.run(&["verify"]).expect(6);
    let text = format!("{}{}", drift.stdout, drift.stderr);
    assert!(text.contains("stage dev"), "{text}");
    assert!(text.contains("its stage pointer is missing, but the ledger recorded"), "{text}");
    assert!(text.contains(&format!("kiln promote --stage dev --digest {}", &one[7..19])), "{text}");

    let again = repo.run(&["promote", "--stage", "dev", "--digest", &one, "--no-deploy", "--json"]).ok().json();
    assert_eq!(again["outcome"], "already-promoted");
    assert_eq!(skopeo_digest(&repo, "dev"), one);
    assert_eq!(pointer_events(&repo).len(), 2, "the second write is recorded too");
    repo.run(&["verify"]).ok();
}

/// Restoring service comes first: a pointer that cannot be written as a rollback starts does not stop it.
#[test]
fn a_rollback_goes_on_when_its_pointer_cannot_be_written() {
    let (repo, port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let one = bake_greeting(&repo, "one");
    repo.run(&["promote", "--stage", "dev", "--digest", &one]).ok();
    let two = bake_greeting(&repo, "two");
    repo.run(&["promote", "--stage", "dev", "--digest", &two]).ok();
    let args = ["rollback", "--stage", "dev", "--reason", "pointer store down"];
    let output = repo.kiln().env("KILN_INJECT", "publish_pointer=fail:the pointer store is down").args(args).output();
    let rolled = common::Run::of(output.unwrap(), &args).ok();
    assert!(rolled.stderr.contains("the stage pointer still names what the stage ran before"), "{}", rolled.stderr);
    assert!(rolled.stderr.contains("the pointer store is down"), "{}", rolled.stderr);
    assert_eq!(common::greeting(port), "one");
    assert_eq!(skopeo_digest(&repo, "dev"), two, "not written, so not recorded either");
    assert_eq!(pointer_events(&repo).len(), 2);
}

#[test]
fn a_rollback_that_fails_puts_the_pointer_back_on_what_the_stage_runs() {
    let (repo, port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let one = bake_greeting(&repo, "one");
    let two = bake_greeting(&repo, "two");
    promote_only(&repo, &one);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    promote_only(&repo, &two);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    // The kept group of `one` never gets healthy again: the rollback fails and `two` keeps serving.
    let failed = repo
        .kiln()
        .env("KILN_INJECT", "health=unhealthy:injected")
        .args(["rollback", "--stage", "dev", "--reason", "test"])
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(4), "{}", String::from_utf8_lossy(&failed.stderr));
    assert_eq!(common::greeting(port), "two");
    assert_eq!(skopeo_digest(&repo, "dev"), two, "the pointer names what the stage runs, not the failed rollback");
    let digests: Vec<String> = pointer_events(&repo).into_iter().map(|(d, _)| d).collect();
    assert_eq!(digests, [one.clone(), two.clone(), one, two]);
    repo.run(&["verify"]).ok();
}
