//! Ctrl-C during a deployment: kiln stops at its next step, says what it left, exits 130, and the next
//! `kiln deploy` finishes or undoes what was left, as after a crash.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::hello::{dev_stage, first_live_second_promoted, instance_script, signal};
use common::{greeting, Down, Run};

#[test]
fn ctrl_c_during_a_deployment_stops_it_where_it_stands_and_the_next_deploy_settles_it() {
    let (repo, port) = dev_stage(1, "", "");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    // The release's instances take a while to answer, so the deployment is still waiting when Ctrl-C comes.
    instance_script(&repo, "slow", "sleep 8\nexec \"$HELLO\"");
    first_live_second_promoted(&repo, "one", "two");

    let deploy =
        repo.kiln().args(["deploy", "--stage", "dev"]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let started = Instant::now();
    while repo.run(&["status", "--json"]).ok().json()["stages"][0]["deploying"].is_null() {
        assert!(started.elapsed() < Duration::from_secs(60), "the deployment never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    signal(deploy.id(), "INT");
    let stopped = Run::of(deploy.wait_with_output().unwrap(), &["deploy"]).expect(130);
    assert!(
        stopped.stderr.contains("interrupted during deployment hello-dev-2 to dev; it is left open, and the next `kiln deploy --stage dev` finishes or undoes it"),
        "{}",
        stopped.stderr
    );
    assert_eq!(greeting(port), "one", "the old group kept serving");

    let next = repo.run(&["deploy", "--stage", "dev", "--json"]).ok().json();
    assert!(next["reconciled"].as_str().unwrap().contains("undid interrupted deployment hello-dev-2"), "{next}");
    assert_eq!(greeting(port), "two");
    repo.run(&["verify"]).ok();
}
