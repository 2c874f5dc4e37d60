//! `kiln deploy` heals what keeps a stage from serving its live digest (a killed proxy, dead instances) in the live
//! group itself, and after a rollback keeps the stage on what it rolled back to until the next promotion.

mod common;

use common::hello::{dev_stage, events, first_live_second_promoted};
use common::{bake_greeting, greeting, group_files, pid_alive, promote_only, Down};

fn kill(pid: u64) {
    std::process::Command::new("kill").args(["-9", &pid.to_string()]).status().unwrap();
    let started = std::time::Instant::now();
    while pid_alive(pid) {
        assert!(started.elapsed() < std::time::Duration::from_secs(30), "pid {pid} survived SIGKILL");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

fn live_instance_pids(repo: &common::Repo, group: &str) -> Vec<u64> {
    let group = group_files(repo).into_iter().find(|g| g["name"] == group).unwrap();
    group["instances"].as_array().unwrap().iter().map(|i| i["pid"].as_u64().unwrap()).collect()
}

#[test]
fn deploy_restarts_a_killed_proxy_and_dead_instances_in_the_live_group() {
    let (repo, port) = dev_stage(2, "", "");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    repo.run(&["deploy", "--stage", "dev"]).ok();

    let proxy: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.file(".kiln/run/hello/dev/proxy.json")).unwrap()).unwrap();
    kill(proxy["pid"].as_u64().unwrap());
    kill(live_instance_pids(&repo, "hello-dev-v001")[0]);
    assert!(common::http_get(port, "/").is_none(), "the endpoint is down");

    let healed = repo.run(&["deploy", "--stage", "dev", "--json"]).ok().json();
    assert_eq!(healed["outcome"], "healed", "{healed}");
    assert_eq!(healed["group"], "hello-dev-v001", "no new group: {healed}");
    assert_eq!(greeting(port), "one");
    let running = live_instance_pids(&repo, "hello-dev-v001").into_iter().filter(|p| pid_alive(*p)).count();
    assert_eq!(running, 2);
    let started: Vec<_> = events(&repo).into_iter().filter(|e| e["kind"] == "deploy-started").collect();
    assert_eq!(started.last().unwrap()["group"], started.last().unwrap()["previous_group"]);
    let text = repo.run(&["deploy", "--stage", "dev"]).ok();
    assert!(text.stdout.contains("dev already runs"), "{}", text.stdout);
    repo.run(&["verify"]).ok();
}

#[test]
fn after_a_rollback_deploy_heals_what_it_rolled_back_to_even_once_revoked_until_the_next_promotion() {
    let (repo, port) = dev_stage(2, "", "");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let (one, two) = first_live_second_promoted(&repo, "one", "two");
    repo.run(&["deploy", "--stage", "dev"]).ok();
    let back = repo.run(&["rollback", "--stage", "dev", "--reason", "two is bad", "--json"]).ok().json();
    assert_eq!(back["digest"].as_str(), Some(one.as_str()));

    // A plain deploy does not undo the rollback.
    let again = repo.run(&["deploy", "--stage", "dev", "--json"]).ok().json();
    assert_eq!(again["outcome"], "already-live", "{again}");
    assert_eq!(greeting(port), "one");

    // What the stage rolled back to is revoked later; an instance dies with the stage's supervisor (which would
    // otherwise restart it itself); deploy heals it in place.
    repo.run(&["revoke", &one, "--reason", "base CVE"]).ok();
    let proxy: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.file(".kiln/run/hello/dev/proxy.json")).unwrap()).unwrap();
    kill(proxy["pid"].as_u64().unwrap());
    kill(live_instance_pids(&repo, "hello-dev-v001")[1]);
    let healed = repo.run(&["deploy", "--stage", "dev", "--json"]).ok().json();
    assert_eq!(healed["outcome"], "healed", "{healed}");
    assert_eq!(healed["digest"].as_str(), Some(one.as_str()));
    assert_eq!(greeting(port), "one");

    // Promoting `two` again releases the hold, and deploy moves the stage on.
    promote_only(&repo, &two);
    let moved = repo.run(&["deploy", "--stage", "dev", "--json"]).ok().json();
    assert_eq!(moved["outcome"], "deployed", "{moved}");
    assert_eq!(greeting(port), "two");
}
