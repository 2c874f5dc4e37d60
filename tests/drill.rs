//! `kiln drill`: every kind through the real binary on a running local stage of capacity 2. kill-instance and
//! kill-proxy show the product fix: the stage's supervisor brings the stage back with no `kiln deploy` in between
//! (before it existed, nothing did, and the drill would fail).

mod common;

use common::hello::{dev_stage, events, instance_script};
use common::{bake_greeting, greeting, group_files, pid_alive, promote_only, Down, Repo};

/// A dev stage of capacity 2 running the image greeting "one"; `keys` go into the stage's table.
fn running(keys: &str) -> (Repo, u16, String) {
    let (repo, port) = dev_stage(2, keys, "");
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    (repo, port, one)
}

fn deploys_started(repo: &Repo) -> usize {
    events(repo).iter().filter(|e| e["kind"] == "deploy-started").count()
}

fn read_json(repo: &Repo, rel: &str) -> serde_json::Value {
    serde_json::from_slice(&std::fs::read(repo.file(rel)).unwrap()).unwrap()
}

fn instance_pids(repo: &Repo) -> Vec<u64> {
    let groups = group_files(repo);
    let live = groups.iter().find(|g| g["capacity"].as_u64() > Some(0)).unwrap();
    live["instances"].as_array().unwrap().iter().map(|i| i["pid"].as_u64().unwrap()).collect()
}

/// The drill passed as the brief for its kind says, and left the stage on `digest`, recorded in the ledger.
fn assert_passed(repo: &Repo, doc: &serde_json::Value, kind: &str, digest: &str) {
    assert_eq!(doc["kind"], kind, "{doc}");
    assert_eq!(doc["passed"], true, "{doc}");
    assert_eq!(doc["converged"], true, "{doc}");
    assert!(doc["requests"].as_u64().unwrap() > 10, "a steady load ran: {doc}");
    assert!(doc["failed"].as_u64().unwrap() <= doc["bound"].as_u64().unwrap(), "{doc}");
    assert_eq!(doc["digest"].as_str(), Some(digest), "{doc}");
    assert_eq!(doc["digest_after"].as_str(), Some(digest), "{doc}");
    let last = &events(repo).into_iter().rev().find(|e| e["kind"] == "drill").unwrap();
    assert_eq!(last["seq"], doc["seq"], "{last}");
    assert_eq!(last["passed"], true);
    assert_eq!(last["fault"], kind);
    assert_eq!(last["requests"], doc["requests"]);
    assert_eq!(last["failed"], doc["failed"]);
    repo.run(&["verify"]).ok();
}

#[test]
fn kill_instance_is_healed_by_the_stage_supervisor_without_a_deploy_and_no_request_fails() {
    let (repo, port, one) = running("");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let before = instance_pids(&repo);
    let deploys = deploys_started(&repo);

    let doc = repo.run(&["drill", "--stage", "dev", "--kind", "kill-instance", "--json"]).ok().json();
    assert_passed(&repo, &doc, "kill-instance", &one);
    assert_eq!(doc["bound"], 0);
    assert_eq!(doc["failed"], 0, "{doc}");
    assert_eq!(doc["group_after"], doc["group_before"], "the same group, healed in place: {doc}");
    assert_eq!(deploys_started(&repo), deploys, "no deployment ran: the supervisor restarted the instance");
    let after = instance_pids(&repo);
    assert_eq!(
        after.iter().filter(|p| before.contains(p)).count(),
        1,
        "one instance was replaced: {before:?} {after:?}"
    );
    assert!(after.iter().all(|p| pid_alive(*p)));
    assert_eq!(greeting(port), "one");

    // The drill shows in the log and in the metrics.
    let log = repo.run(&["log", "--stage", "dev", "--limit", "1"]).ok().stdout;
    assert!(log.contains("drill") && log.contains("kill-instance passed"), "{log}");
    let metrics = repo.run(&["metrics", "--json"]).ok().json();
    let dev = &metrics["stages"][0];
    assert_eq!((dev["drills"].as_u64(), dev["drills_passed"].as_u64()), (Some(1), Some(1)), "{metrics}");
    assert_eq!(dev["deployments"], 1, "the drill is no deployment: {metrics}");
}

#[test]
fn kill_proxy_is_restarted_by_the_stage_supervisor_without_a_deploy() {
    let (repo, port, one) = running("");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let supervisor = read_json(&repo, ".kiln/run/hello/dev/proxy.json")["pid"].as_u64().unwrap();
    let worker = read_json(&repo, ".kiln/run/hello/dev/status.json")["pid"].as_u64().unwrap();
    assert_ne!(supervisor, worker, "the proxy runs as the supervisor's child");
    let deploys = deploys_started(&repo);

    let run = repo.run(&["drill", "--stage", "dev", "--kind", "kill-proxy"]).ok();
    assert!(run.stdout.contains("drill kill-proxy on dev: PASSED"), "{}", run.stdout);
    assert!(run.stdout.contains(&format!("SIGKILLed the proxy worker (pid {worker})")), "{}", run.stdout);
    assert!(!pid_alive(worker), "the worker was killed");
    let now = read_json(&repo, ".kiln/run/hello/dev/status.json")["pid"].as_u64().unwrap();
    assert_ne!(now, worker, "another worker serves");
    assert!(pid_alive(supervisor), "the supervisor itself was not touched");
    assert_eq!(deploys_started(&repo), deploys, "no deployment ran: the supervisor restarted the proxy");
    assert_eq!(greeting(port), "one");
    let last = events(&repo).into_iter().rev().find(|e| e["kind"] == "drill").unwrap();
    assert_eq!((last["passed"].as_bool(), last["bound"].as_u64()), (Some(true), Some(2)), "{last}");
    assert_eq!(last["digest"].as_str(), Some(one.as_str()));
}

#[test]
fn kill_kiln_mid_deploy_keeps_serving_and_the_next_deploy_converges() {
    let (repo, port, one) = running("");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let doc = repo.run(&["drill", "--stage", "dev", "--kind", "kill-kiln", "--json"]).ok().json();
    assert_passed(&repo, &doc, "kill-kiln", &one);
    assert_eq!(doc["failed"], 0, "{doc}");
    let steps = doc["steps"].to_string();
    assert!(steps.contains("SIGKILLed kiln") && steps.contains("group-created"), "{steps}");
    assert!(steps.contains("the on-call's `kiln deploy`"), "{steps}");
    let deploys: Vec<&str> = doc["deploys"].as_array().unwrap().iter().map(|d| d.as_str().unwrap()).collect();
    assert!(!deploys.is_empty(), "{doc}");
    // The killed release was settled by the on-call's deploy; nothing is left open or orphaned.
    let all = events(&repo);
    let release = all.iter().find(|e| e["kind"] == "deploy-started" && e["deploy_id"] == deploys[0]).unwrap();
    assert_eq!(release["digest"].as_str(), Some(one.as_str()), "the release is the live digest again");
    common::assert_converged(&repo, 2, 1);
    assert_eq!(greeting(port), "one");
}

#[test]
fn an_unhealthy_release_fails_and_the_old_group_keeps_serving() {
    let (repo, port, one) = running("");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let doc = repo.run(&["drill", "--stage", "dev", "--kind", "unhealthy-release", "--json"]).ok().json();
    assert_passed(&repo, &doc, "unhealthy-release", &one);
    assert_eq!(doc["failed"], 0, "{doc}");
    assert_eq!(doc["group_after"], "hello-dev-v001", "{doc}");
    let failed = events(&repo).into_iter().rev().find(|e| e["kind"] == "deploy-failed").unwrap();
    assert!(failed["reason"].as_str().unwrap().contains("never became healthy"), "{failed}");
    assert_eq!(failed["group"], "hello-dev-v002");
    assert!(!repo.file(".kiln/run/hello/dev/groups/hello-dev-v002.json").exists(), "the release's group is gone");
    assert_eq!(greeting(port), "one");
}

#[test]
fn a_release_failing_its_verification_window_goes_back_with_no_failed_request() {
    let (repo, port, one) = running("verify-for = \"1s\"");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let doc = repo.run(&["drill", "--stage", "dev", "--kind", "failed-verify", "--json"]).ok().json();
    assert_passed(&repo, &doc, "failed-verify", &one);
    assert_eq!(doc["failed"], 0, "{doc}");
    let all = events(&repo);
    assert!(all.iter().any(|e| e["step"] == "verification-failed"), "the window failed");
    let restored = all.iter().rev().find(|e| e["step"] == "traffic-restored").unwrap();
    assert_eq!(restored["detail"]["group"], "hello-dev-v001");
    assert_eq!(greeting(port), "one");
}

#[test]
fn a_stage_that_does_not_come_back_fails_the_drill_with_exit_6_and_records_it() {
    let (repo, port) = dev_stage(2, "", "");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    // Instances that start once: any restart exits at once, so the supervisor cannot bring capacity back.
    instance_script(&repo, "once", "if [ -e started ]; then exit 1; fi\ntouch started\nexec \"$HELLO\"");
    let digest = bake_greeting(&repo, "once");
    promote_only(&repo, &digest);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    let run = repo.run(&["drill", "--stage", "dev", "--kind", "kill-instance", "--converge-timeout", "2s", "--json"]);
    let run = run.expect(6);
    let doc = run.json();
    assert_eq!((doc["passed"].as_bool(), doc["converged"].as_bool()), (Some(false), Some(false)), "{doc}");
    assert!(doc["not_converged"].as_str().unwrap().contains("of 2 instances"), "{doc}");
    assert!(run.stderr.contains("drill kill-instance on dev failed: the stage did not converge"), "{}", run.stderr);
    let last = events(&repo).into_iter().rev().find(|e| e["kind"] == "drill").unwrap();
    assert_eq!(last["passed"], false, "{last}");
    let metrics = repo.run(&["metrics", "--json"]).ok().json();
    let dev = &metrics["stages"][0];
    assert_eq!((dev["drills"].as_u64(), dev["drills_passed"].as_u64()), (Some(1), Some(0)), "{metrics}");
    assert!(common::http_get(port, "/").is_some(), "the other instance still serves");
}

#[test]
fn drills_that_cannot_say_anything_are_refused_with_the_reason() {
    let (repo, _port) = dev_stage(1, "", "");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let aws = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines/hello-aws.toml");
    std::fs::copy(aws, repo.file("pipelines/hello-aws.toml")).unwrap();
    let run = repo.run(&["--pipeline", "hello-aws", "drill", "--stage", "prod", "--kind", "kill-instance"]).expect(2);
    assert!(run.stderr.contains("kiln drill runs against local stages only"), "{}", run.stderr);
    std::fs::remove_file(repo.file("pipelines/hello-aws.toml")).unwrap();
    let cases: [(&[&str], &str); 2] = [
        (&["drill", "--stage", "dev", "--kind", "kill-proxy"], "nothing is live in dev"),
        (&["drill", "--stage", "nope", "--kind", "kill-proxy"], "has no stage `nope`"),
    ];
    for (args, expected) in cases {
        let run = repo.run(args).expect(2);
        assert!(run.stderr.contains(expected), "{args:?}: wanted {expected:?} in:\n{}", run.stderr);
    }
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    let cases: [(&str, &str); 2] = [
        ("kill-instance", "kill-instance needs a stage of capacity 2 or more: dev has capacity 1"),
        ("failed-verify", "stage dev has no verification window (`verify-for`)"),
    ];
    for (kind, expected) in cases {
        let run = repo.run(&["drill", "--stage", "dev", "--kind", kind]).expect(2);
        assert!(run.stderr.contains(expected), "{kind}: wanted {expected:?} in:\n{}", run.stderr);
    }
    let two = bake_greeting(&repo, "two");
    promote_only(&repo, &two);
    let run = repo.run(&["drill", "--stage", "dev", "--kind", "unhealthy-release"]).expect(2);
    assert!(run.stderr.contains("dev has a promotion that is not deployed yet"), "{}", run.stderr);
    assert!(events(&repo).iter().all(|e| e["kind"] != "drill"), "a refused drill records nothing");
}
