//! The stage lease between real kiln processes: a holder stopped past its lease is taken over and changes nothing
//! more; a holder renews its lease while it waits; the digest is judged against the head the deployment starts at.

mod common;

use std::process::{Child, Stdio};

use common::hello::{dev_stage, events, first_live_second_promoted, instance_script, signal, wait_stopped};
use common::{bake_greeting, greeting, promote_only};
use common::{Down, Repo, Run};

fn spawn(repo: &Repo, actor: &str, fault: &str, args: &[&str]) -> Child {
    repo.kiln()
        .env("KILN_ACTOR", actor)
        .env("KILN_FAULT", fault)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child, args: &[&str]) -> Run {
    Run::of(child.wait_with_output().unwrap(), args)
}

#[test]
fn a_kiln_stopped_past_its_lease_is_taken_over_and_changes_nothing_more() {
    let (repo, port) = dev_stage(1, "lease = \"2s\"", "");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    first_live_second_promoted(&repo, "one", "two");

    // The first kiln launches its group, then stalls (as a paused VM or a SIGSTOP would) past its lease.
    let first = spawn(&repo, "first", "stop:deploy:after-group-created", &["deploy", "--stage", "dev"]);
    wait_stopped(first.id());
    std::thread::sleep(std::time::Duration::from_millis(2500));

    let second = repo.kiln().env("KILN_ACTOR", "second").args(["deploy", "--stage", "dev", "--json"]).output().unwrap();
    let second = Run::of(second, &["deploy"]).ok().json();
    assert!(second["reconciled"].as_str().unwrap().contains("undid interrupted deployment hello-dev-2"), "{second}");
    assert_eq!(second["group"], "hello-dev-v003");
    assert_eq!(greeting(port), "two");
    let head_before = events(&repo).len();

    signal(first.id(), "CONT");
    let first = finish(first, &["deploy (first)"]).expect(5);
    assert!(first.stderr.contains("deployment hello-dev-2 to dev was taken over by second"), "{}", first.stderr);

    // The stage keeps serving the second's group and the ledger holds nothing of the first after the takeover.
    assert_eq!(greeting(port), "two");
    let all = events(&repo);
    assert_eq!(all.len(), head_before, "the first kiln wrote after it was taken over: {:#?}", &all[head_before..]);
    let takeover = all.iter().position(|e| e["step"] == "lease-taken-over").unwrap();
    assert!(all[takeover..].iter().all(|e| e["actor"] != "first"), "{all:#?}");
    let status = repo.run(&["status", "--json"]).ok().json();
    assert_eq!(status["stages"][0]["live"]["group"], "hello-dev-v003");
    assert!(!repo.file(".kiln/run/hello/dev/groups/hello-dev-v002.json").exists(), "the first's group is gone");
    repo.run(&["verify"]).ok();
}

#[test]
fn a_holder_renews_its_lease_while_it_waits() {
    let (repo, port) = dev_stage(1, "lease = \"3s\"", "");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    // Instances of this release take over two lease lengths to become healthy.
    instance_script(&repo, "slow", "sleep 7\nexec \"$HELLO\"");
    let slow = bake_greeting(&repo, "slow");
    promote_only(&repo, &slow);

    let holder = spawn(&repo, "holder", "", &["deploy", "--stage", "dev"]);
    while repo.run(&["status", "--json"]).ok().json()["stages"][0]["deploying"].is_null() {
        assert!(common::hello::process_state(holder.id()).is_some(), "the holder exited before it took the lease");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut refused = 0;
    while common::hello::process_state(holder.id()).is_some_and(|s| s != 'Z') {
        let other = repo.kiln().env("KILN_ACTOR", "other").args(["deploy", "--stage", "dev"]).output().unwrap();
        let other = Run::of(other, &["deploy (other)"]);
        match other.code {
            5 => refused += 1,
            0 => break,
            code => panic!("the other deploy exited {code}: {}", other.stderr),
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    finish(holder, &["deploy (holder)"]).ok();
    assert!(refused >= 5, "the other deploy was refused only {refused} times while the holder waited");
    assert_eq!(greeting(port), "slow");
    let renewals = events(&repo).iter().filter(|e| e["step"] == "lease-renewed").count();
    assert!(renewals >= 2, "the holder renewed its 3s lease only {renewals} times over a 7s wait");
    assert!(events(&repo).iter().all(|e| e["step"] != "lease-taken-over"));
}

#[test]
fn a_revocation_recorded_while_a_deploy_plans_is_judged_at_the_append() {
    let (repo, port) = dev_stage(1, "", "");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let (_, two) = first_live_second_promoted(&repo, "one", "two");

    // The deploy has chosen `two` and checked it, but has not taken the lease yet when `two` is revoked.
    let deploy = spawn(&repo, "deployer", "stop:deploy:before-start", &["deploy", "--stage", "dev"]);
    wait_stopped(deploy.id());
    repo.run(&["revoke", &two, "--reason", "CVE found"]).ok();
    signal(deploy.id(), "CONT");
    let refused = finish(deploy, &["deploy"]).expect(3);
    assert!(refused.stderr.contains("revoked: CVE found"), "{}", refused.stderr);
    assert_eq!(greeting(port), "one");
    assert_eq!(events(&repo).iter().filter(|e| e["kind"] == "deploy-started").count(), 1, "no second deployment");
}

#[test]
fn a_rollback_target_revoked_meanwhile_is_refused() {
    let (repo, port) = dev_stage(1, "", "");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let (one, _) = first_live_second_promoted(&repo, "one", "two");
    repo.run(&["deploy", "--stage", "dev"]).ok();

    let rollback = spawn(&repo, "oncall", "stop:deploy:before-start", &["rollback", "--stage", "dev"]);
    wait_stopped(rollback.id());
    repo.run(&["revoke", &one, "--reason", "bad base"]).ok();
    signal(rollback.id(), "CONT");
    let refused = finish(rollback, &["rollback"]).expect(3);
    assert!(refused.stderr.contains("revoked: bad base"), "{}", refused.stderr);
    assert_eq!(greeting(port), "two");
}
