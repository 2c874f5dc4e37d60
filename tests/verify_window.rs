//! The verification window after cutover: checks run against the stage endpoint while the previous group keeps
//! running; a failed check moves traffic back, destroys the new group and exits 4, with no request failing.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use common::greeting;
use common::hello::{dev_stage, events, first_live_second_promoted};
use common::{http_get, Down, Repo};

/// A dev stage with a `secs`-second window whose check fails once the endpoint greets with "bad".
fn windowed(secs: u32, capacity: u32) -> (Repo, u16) {
    let (repo, port) = dev_stage(
        capacity,
        &format!("verify-for = \"{secs}s\""),
        "[[stage.verify]]\ncommand = [\"scripts/check.sh\"]\ninterval = \"1s\"\n",
    );
    repo.write(
        "pipelines/scripts/check.sh",
        "#!/bin/sh\n# Fails when the stage answers with a bad greeting; counts its runs.\necho run >> \"$KILN_GROUP.runs\"\nbody=$(curl -sf \"$KILN_ENDPOINT/\") || exit 1\ncase \"$body\" in bad*) echo \"bad answer: $body\"; exit 1;; esac\n",
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(repo.file("pipelines/scripts/check.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    (repo, port)
}

/// Requests through the endpoint on two threads until stopped: (sent, failed).
fn load(port: u16, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<(u64, u64)> {
    std::thread::spawn(move || {
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let (stop, sent, failed) = (stop.clone(), sent.clone(), failed.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        sent.fetch_add(1, Ordering::Relaxed);
                        if !matches!(http_get(port, "/"), Some((200, _))) {
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed))
    })
}

#[test]
fn a_release_that_fails_verification_goes_back_to_the_previous_group_without_a_failed_request() {
    let (repo, port) = windowed(5, 2);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    first_live_second_promoted(&repo, "good", "bad");

    let stop = Arc::new(AtomicBool::new(false));
    let client = load(port, stop.clone());
    let failed = repo.run(&["deploy", "--stage", "dev", "--json"]).expect(4);
    stop.store(true, Ordering::Relaxed);
    let (sent, failed_requests) = client.join().unwrap();

    let doc = failed.json();
    assert_eq!(doc["exit_code"], 4);
    assert!(failed.stderr.contains("verification failed"), "{}", failed.stderr);
    assert!(failed.stderr.contains("command scripts/check.sh"), "{}", failed.stderr);
    assert!(failed.stderr.contains("traffic moved back to group hello-dev-v001"), "{}", failed.stderr);
    assert_eq!(greeting(port), "good");
    assert!(sent > 0);
    assert_eq!(failed_requests, 0, "{failed_requests} of {sent} requests failed");

    let all = events(&repo);
    let verification = all.iter().find(|e| e["step"] == "verification-failed").expect("the failure is recorded");
    assert!(verification["detail"]["evidence"]["output_tail"].as_str().unwrap().contains("bad answer"));
    let restored = all.iter().find(|e| e["step"] == "traffic-restored").unwrap();
    assert_eq!(restored["detail"]["group"], "hello-dev-v001");
    eprintln!(
        "B5 failed window: {sent} requests, {failed_requests} failed, traffic back {} ms after the failed check",
        restored["detail"]["after_failure_ms"]
    );
    assert_eq!(all.last().unwrap()["kind"], "deploy-failed");
    let status = repo.run(&["status", "--json"]).ok().json();
    assert_eq!(status["stages"][0]["live"]["group"], "hello-dev-v001");
    assert!(!repo.file(".kiln/run/hello/dev/groups/hello-dev-v002.json").exists(), "the failed group is destroyed");
    repo.run(&["verify"]).ok();
}

#[test]
fn a_release_that_passes_runs_its_checks_through_the_whole_window_before_retiring_the_old_group() {
    let (repo, port) = windowed(2, 1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    first_live_second_promoted(&repo, "one", "two");
    let done = repo.run(&["deploy", "--stage", "dev", "--json"]).ok().json();
    assert!(done["verified_for_ms"].as_u64().unwrap() >= 2000, "{done}");
    assert_eq!(greeting(port), "two");
    let runs = std::fs::read_to_string(repo.file("hello-dev-v002.runs")).unwrap().lines().count();
    assert!(runs >= 2, "the check ran {runs} times in a 2s window with a 1s interval");
    let steps: Vec<String> =
        events(&repo).iter().filter_map(|e| e["step"].as_str().map(str::to_string)).collect::<Vec<_>>();
    let at = |name: &str| steps.iter().rposition(|s| s == name).unwrap();
    assert!(at("verifying") < at("verified") && at("verified") < at("retired"), "{steps:?}");
}

#[test]
fn a_crash_inside_the_window_is_undone_and_the_release_verified_again() {
    let (repo, port) = windowed(1, 1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    first_live_second_promoted(&repo, "one", "two");
    let killed =
        repo.kiln().env("KILN_FAULT", "deploy:after-verifying").args(["deploy", "--stage", "dev"]).output().unwrap();
    assert_eq!(killed.status.code(), None, "kiln died by SIGKILL inside the window");
    assert_eq!(greeting(port), "two", "traffic had moved when kiln died");

    let resumed = repo.run(&["deploy", "--stage", "dev", "--json"]).ok().json();
    let reconciled = resumed["reconciled"].as_str().unwrap();
    assert!(reconciled.contains("interrupted during its verification window"), "{reconciled}");
    assert!(reconciled.contains("traffic moved back to group hello-dev-v001"), "{reconciled}");
    assert_eq!(resumed["group"], "hello-dev-v003", "the release is deployed and verified again");
    assert!(resumed["verified_for_ms"].as_u64().is_some());
    assert_eq!(greeting(port), "two");
    repo.run(&["verify"]).ok();
}
