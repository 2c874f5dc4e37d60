//! What can go wrong around a deployment, through the real binary: a second kiln while one holds the lease, a
//! digest revoked after its promotion, a group that runs another digest, and `kill -9` while the new group starts
//! or while the old one is retired.
//!
//! Each test makes its moment certain rather than likely: instances that wait for a file before they start
//! serving, or that log the SIGTERM of their retirement and ignore it.

mod common;

use std::os::unix::process::ExitStatusExt;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::hello::instance_script;
use common::{
    assert_converged, bake_greeting, dev_only, greeting, group_files, http_get, pid_alive, promote_only, Down, Repo,
};

/// Long enough for anything that normally takes milliseconds on a loaded machine; only a hang reaches it.
const PATIENCE: Duration = Duration::from_secs(60);

/// Instances that start serving only once `release` exists: a deployment of them waits, holding its lease, until
/// the test says so.
fn held_until(repo: &Repo, release: &std::path::Path) {
    instance_script(
        repo,
        "start",
        &format!("while [ ! -e '{}' ]; do sleep 0.05; done\nexec \"$HELLO\"", release.display()),
    );
}

/// `one` deployed to dev, then `two` promoted there, its instances held until the returned `release` file exists.
fn one_live_then_two_held(repo: &Repo) -> (String, String, std::path::PathBuf) {
    let one = bake_greeting(repo, "one");
    promote_only(repo, &one);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    let release = repo.file("release");
    held_until(repo, &release);
    let two = bake_greeting(repo, "two");
    promote_only(repo, &two);
    (one, two, release)
}

/// Instances that note their SIGTERM in their log and stay up, so a retirement of them lasts the stop grace.
fn stubborn(repo: &Repo) {
    instance_script(
        repo,
        "start",
        "trap '' TERM\n\"$HELLO\" &\ntrap 'echo \"retiring: got SIGTERM, staying up\"' TERM\nwhile :; do wait; done",
    );
}

/// `kiln deploy --stage dev`, running in the background.
fn spawn_deploy(repo: &Repo) -> Child {
    repo.kiln().args(["deploy", "--stage", "dev"]).stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap()
}

/// Polls until `ready` holds, failing if `child` exits first.
fn wait_until(what: &str, child: &mut Child, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + PATIENCE;
    while !ready() {
        if let Some(status) = child.try_wait().unwrap() {
            let mut stderr = String::new();
            std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
            panic!("kiln exited ({status}) before {what}:\n{stderr}");
        }
        assert!(Instant::now() < deadline, "never: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The steps recorded so far by dev's open deployment, or None when none is open.
fn open_steps(repo: &Repo) -> Option<Vec<String>> {
    let status = repo.run(&["status", "--json"]).ok().json();
    let open = &status["stages"][0]["deploying"];
    (!open.is_null()).then(|| open["steps"].as_array().unwrap().iter().map(|s| s.as_str().unwrap().into()).collect())
}

/// SIGKILLs `child` and checks that it was still running to receive it.
fn kill_9(mut child: Child) {
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "kiln had already exited: {status:?}");
}

/// (pid, port) of every instance of `group`.
fn instances(repo: &Repo, group: &str) -> Vec<(u64, u16)> {
    let groups = group_files(repo);
    let g = groups.iter().find(|g| g["name"] == group).unwrap_or_else(|| panic!("no group {group}: {groups:?}"));
    g["instances"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["pid"].as_u64().unwrap(), i["port"].as_u64().unwrap() as u16))
        .collect()
}

#[test]
fn a_second_deploy_while_one_holds_the_lease_exits_5_naming_the_holder() {
    let (repo, port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let (one, _, release) = one_live_then_two_held(&repo);

    let mut holder = spawn_deploy(&repo);
    wait_until("the first deploy took the lease", &mut holder, || open_steps(&repo).is_some());
    let holder_id = format!("tester ({}:{}:", kiln::process::host_name(), holder.id());
    for args in [&["deploy", "--stage", "dev"][..], &["rollback", "--stage", "dev", "--to", &one]] {
        let busy = repo.run(args).expect(5);
        assert!(busy.stderr.contains("stage dev is busy"), "{}", busy.stderr);
        assert!(busy.stderr.contains("hello-dev-2"), "the holding deployment is named: {}", busy.stderr);
        assert!(busy.stderr.contains(&holder_id), "the holder {holder_id}…) is named: {}", busy.stderr);
    }
    let busy = repo.run(&["deploy", "--stage", "dev", "--json"]).expect(5).json();
    assert_eq!(busy["exit_code"], 5, "{busy}");
    assert_eq!(greeting(port), "one", "the refused deploys changed nothing");

    std::fs::write(&release, "").unwrap();
    let first = holder.wait_with_output().unwrap();
    assert!(first.status.success(), "the holder: {}", String::from_utf8_lossy(&first.stderr));
    assert_eq!(greeting(port), "two");
    let after = repo.run(&["deploy", "--stage", "dev", "--json"]).ok().json();
    assert_eq!(after["outcome"], "already-live", "{after}");
    assert_converged(&repo, 1, 1);
}

#[test]
fn a_digest_revoked_after_its_promotion_is_not_deployed() {
    let (repo, port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    let two = bake_greeting(&repo, "two");
    promote_only(&repo, &two);
    repo.run(&["revoke", &two, "--reason", "CVE-2026-0002"]).ok();
    let groups_before = group_files(&repo);
    let events_before = repo.run(&["log", "--json", "--limit", "1000"]).ok().json()["events"].clone();

    let refused = repo.run(&["deploy", "--stage", "dev"]).expect(3);
    assert!(refused.stderr.contains("CVE-2026-0002"), "the revocation is named: {}", refused.stderr);
    assert_eq!(greeting(port), "one", "the old group keeps serving");
    assert_eq!(group_files(&repo), groups_before, "no group was launched, parked or destroyed");
    let events = repo.run(&["log", "--json", "--limit", "1000"]).ok().json()["events"].clone();
    let new = &events.as_array().unwrap()[..events.as_array().unwrap().len() - events_before.as_array().unwrap().len()];
    assert!(new.iter().all(|e| !e["kind"].as_str().unwrap().starts_with("deploy")), "a deployment was opened: {new:?}");
    let status = repo.run(&["status", "--json"]).ok().json();
    assert_eq!(status["stages"][0]["live"]["digest"], one.as_str());
    assert!(status["stages"][0]["deploying"].is_null(), "{status}");
}

#[test]
fn verify_names_a_group_that_runs_another_digest() {
    let (repo, _port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    let two = bake_greeting(&repo, "two");
    repo.run(&["verify"]).ok();

    // The provider now says the live group runs `two`, while the ledger says it runs `one`.
    let file = ".kiln/run/hello/dev/groups/hello-dev-v001.json";
    let original = std::fs::read_to_string(repo.file(file)).unwrap();
    repo.edit(file, &one, &two);
    let drift = repo.run(&["verify"]).expect(6);
    let expected = format!("stage dev: group hello-dev-v001 runs {}, the ledger says {}", &two[7..19], &one[7..19]);
    assert!(drift.stderr.contains(&expected), "wanted {expected:?} in:\n{}", drift.stderr);
    assert!(repo.run(&["verify", "--json"]).expect(6).stdout.contains("hello-dev-v001"));

    repo.write(file, &original);
    repo.run(&["verify"]).ok();
}

#[test]
fn a_kill_while_the_new_group_starts_leaves_no_orphan_and_the_next_deploy_converges() {
    let (repo, port) = dev_only(2);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let (_, two, release) = one_live_then_two_held(&repo);

    // Killed with the new group launched and waiting to get healthy: its processes run, traffic has not moved.
    let mut deploy = spawn_deploy(&repo);
    wait_until("the new group was launched", &mut deploy, || {
        open_steps(&repo).is_some_and(|steps| steps.iter().any(|s| s == "group-created"))
    });
    let launched = instances(&repo, "hello-dev-v002");
    assert_eq!(launched.len(), 2);
    assert!(launched.iter().all(|(pid, _)| pid_alive(*pid)), "the new instances run");
    kill_9(deploy);
    assert_eq!(open_steps(&repo).unwrap(), ["group-created"], "killed before it was healthy");
    assert_eq!(greeting(port), "one");

    std::fs::write(&release, "").unwrap();
    let resumed = repo.run(&["deploy", "--stage", "dev", "--json"]).ok().json();
    assert!(resumed["reconciled"].as_str().unwrap().contains("undid interrupted deployment"), "{resumed}");
    assert_eq!(resumed["digest"], two.as_str());
    assert_eq!(greeting(port), "two");
    for (pid, port) in launched {
        assert!(!pid_alive(pid), "instance {pid} of the interrupted group was orphaned");
        assert!(http_get(port, "/healthz").is_none(), "port {port} of the interrupted group still answers");
    }
    assert!(group_files(&repo).iter().all(|g| g["name"] != "hello-dev-v002"), "the interrupted group is gone");
    let log = repo.run(&["log", "--json", "--limit", "1000"]).ok().json();
    let undone = log["events"].as_array().unwrap().iter().find(|e| e["kind"] == "deploy-failed");
    let reason = undone.and_then(|e| e["reason"].as_str()).unwrap_or_else(|| panic!("no deploy-failed: {log}"));
    assert!(reason.contains("interrupted after group-created"), "{reason}");
    assert_converged(&repo, 2, 1);
}

#[test]
fn a_kill_while_the_old_group_is_retired_leaves_no_orphan_and_the_next_deploy_converges() {
    let (repo, port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let original = std::fs::read_to_string(repo.file("images/hello.toml")).unwrap();
    stubborn(&repo);
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    let old = instances(&repo, "hello-dev-v001");
    repo.write("images/hello.toml", &original);
    let two = bake_greeting(&repo, "two");
    promote_only(&repo, &two);

    // The old instance logs the SIGTERM that only retirement sends; kiln then waits out the stop grace.
    let mut deploy = spawn_deploy(&repo);
    let log = repo.file(".kiln/run/hello/dev/logs/hello-dev-v001-1.log");
    wait_until("the old group was being retired", &mut deploy, || {
        std::fs::read_to_string(&log).unwrap_or_default().contains("retiring: got SIGTERM")
    });
    kill_9(deploy);
    let steps = open_steps(&repo).expect("the deployment is still open");
    assert_eq!(steps.last().map(String::as_str), Some("drained"), "killed after draining, before retired: {steps:?}");
    assert!(old.iter().all(|(pid, _)| pid_alive(*pid)), "the old instance outlived the kill");
    assert_eq!(greeting(port), "two", "traffic had moved");

    let resumed = repo.run(&["deploy", "--stage", "dev", "--json"]).ok().json();
    assert!(resumed["reconciled"].as_str().unwrap().contains("finished interrupted deployment"), "{resumed}");
    assert_eq!(greeting(port), "two");
    for (pid, port) in old {
        assert!(!pid_alive(pid), "instance {pid} of the retired group was orphaned");
        assert!(http_get(port, "/healthz").is_none(), "port {port} of the retired group still answers");
    }
    assert_converged(&repo, 1, 1);
}
