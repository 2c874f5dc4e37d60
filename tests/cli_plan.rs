//! `--plan` on promote, deploy and rollback with the local provider: each lists the local actions it would take,
//! in order, changes nothing (no group, no proxy, no ledger event), and says what the real command then does.

mod common;

use common::{bake_greeting, dev_only, greeting, group_files, promote_only, Down, Repo};

fn ledger_head(repo: &Repo) -> serde_json::Value {
    repo.run(&["log", "--limit", "1", "--json"]).ok().json()["events"][0]["seq"].clone()
}

fn calls(doc: &serde_json::Value) -> Vec<String> {
    doc["calls"].as_array().unwrap().iter().map(|c| c.as_str().unwrap().to_string()).collect()
}

fn position(calls: &[String], starting: &str) -> usize {
    calls.iter().position(|c| c.starts_with(starting)).unwrap_or_else(|| panic!("no `{starting}…` in {calls:#?}"))
}

#[test]
fn plans_of_promote_deploy_and_rollback_list_local_actions_and_change_nothing() {
    let (repo, port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let one = bake_greeting(&repo, "one");
    let two = bake_greeting(&repo, "two");
    let short = |digest: &str| digest.trim_start_matches("sha256:")[..12].to_string();

    // A promotion plan: the content check and the pointer, then the deployment the promotion would start.
    let head = ledger_head(&repo);
    let plan = repo.run(&["promote", "--stage", "dev", "--digest", &one, "--plan", "--json"]).ok().json();
    assert_eq!(plan["outcome"], "planned");
    assert_eq!(
        calls(&plan),
        [
            format!("local: re-hash the blobs of hello:{} in .kiln/oci (the content gate)", short(&one)),
            format!("local: tag {} as hello-dev in .kiln/oci (the stage pointer)", short(&one)),
        ]
    );
    let content = plan["gates"].as_array().unwrap().iter().find(|g| g["gate"] == "content").unwrap();
    assert!(content["detail"].as_str().unwrap().starts_with("not checked by a plan"), "{content}");
    let deployment = &plan["planned_deployment"];
    assert_eq!(deployment["group"], "hello-dev-v001");
    assert_eq!(deployment["start"], "new");
    assert!(deployment["previous_group"].is_null());
    let steps = calls(deployment);
    assert!(position(&steps, "local: unpack") < position(&steps, "local: health-check hello-dev-v001"));
    assert!(position(&steps, "local: health-check") < position(&steps, "local: start the proxy of dev"));
    assert_eq!(ledger_head(&repo), head, "a plan records nothing");
    assert!(group_files(&repo).is_empty(), "a plan starts no group");
    let no_deploy = repo.run(&["promote", "--stage", "dev", "--digest", &one, "--plan", "--no-deploy", "--json"]).ok();
    assert!(no_deploy.json()["planned_deployment"].is_null());

    repo.run(&["promote", "--stage", "dev", "--digest", &one]).ok();
    assert_eq!(greeting(port), "one");
    promote_only(&repo, &two);

    // A deployment plan: a new group, traffic leaving the live one, which is then parked (keep-previous = 1).
    let head = ledger_head(&repo);
    let plan = repo.run(&["deploy", "--stage", "dev", "--plan", "--json"]).ok().json();
    assert_eq!(plan["digest"], two.as_str());
    assert_eq!(plan["group"], "hello-dev-v002");
    assert_eq!(plan["start"], "new");
    assert_eq!(plan["previous_group"], "hello-dev-v001");
    assert_eq!(plan["rollback"], false);
    let steps = calls(&plan);
    assert!(position(&steps, "local: start the proxy") < position(&steps, "local: wait until hello-dev-v001"));
    assert!(position(&steps, "local: wait until") < position(&steps, "local: stop the instances of hello-dev-v001"));
    assert!(!steps.iter().any(|c| c.contains("delete its files")), "keep-previous = 1 destroys nothing: {steps:#?}");
    assert!(plan["assumed"]
        .as_array()
        .unwrap()
        .iter()
        .any(|a| a == "hello-dev-v001 serves dev (the ledger's live deployment)"));
    assert_eq!(ledger_head(&repo), head, "a plan records nothing");
    assert_eq!(greeting(port), "one", "a plan moves no traffic");
    assert_eq!(group_files(&repo).len(), 1, "a plan starts no group");
    let human = repo.run(&["deploy", "--stage", "dev", "--plan"]).ok();
    assert!(human.stdout.contains("  1. local: read the groups of dev"), "{}", human.stdout);
    assert!(
        human.stdout.ends_with("plan only: no provider call made, nothing changed or recorded\n"),
        "{}",
        human.stdout
    );

    repo.run(&["deploy", "--stage", "dev"]).ok();
    assert_eq!(greeting(port), "two");

    // A rollback plan: the kept group is scaled back up, and the pointer moves first.
    let head = ledger_head(&repo);
    let plan = repo.run(&["rollback", "--stage", "dev", "--plan", "--json"]).ok().json();
    assert_eq!(plan["digest"], one.as_str());
    assert_eq!(plan["group"], "hello-dev-v001");
    assert_eq!(plan["start"], "reenabled");
    assert_eq!(plan["rollback"], true);
    let steps = calls(&plan);
    assert_eq!(steps[1], format!("local: tag {} as hello-dev in .kiln/oci (the stage pointer)", short(&one)));
    assert!(position(&steps, "local: start 1 instance(s) of the kept group hello-dev-v001") > 1);
    assert_eq!(ledger_head(&repo), head, "a plan records nothing");
    assert_eq!(greeting(port), "two", "a plan moves no traffic");

    // The rollback does what its plan said: the kept group serves again.
    let rolled = repo.run(&["rollback", "--stage", "dev", "--json"]).ok().json();
    assert_eq!(rolled["group"], "hello-dev-v001");
    assert_eq!(greeting(port), "one");

    // Held on the rollback, a deploy plan keeps the live group: it is only checked, and nothing else is listed.
    let plan = repo.run(&["deploy", "--stage", "dev", "--plan", "--json"]).ok().json();
    assert_eq!((plan["start"].as_str(), plan["group"].as_str()), (Some("live"), Some("hello-dev-v001")));
    assert_eq!(plan["digest"], one.as_str());
    assert_eq!(calls(&plan).len(), 2, "{plan}");
}

#[test]
fn a_plan_refuses_what_the_command_would_refuse() {
    let (repo, _port) = dev_only(1);
    let one = bake_greeting(&repo, "one");
    // Nothing promoted: the deploy plan fails as the deployment would, and a rollback has nowhere to go.
    let refused = repo.run(&["deploy", "--stage", "dev", "--plan"]).expect(2);
    assert!(refused.stderr.contains("nothing is promoted to dev"), "{}", refused.stderr);
    let refused = repo.run(&["rollback", "--stage", "dev", "--plan"]).expect(2);
    assert!(refused.stderr.contains("dev has no earlier deployment to roll back to"), "{}", refused.stderr);
    // A revoked digest is refused by the gate it would meet (exit 3).
    promote_only(&repo, &one);
    repo.run(&["revoke", &one, "--reason", "bad build"]).ok();
    let refused = repo.run(&["deploy", "--stage", "dev", "--plan"]).expect(3);
    assert!(refused.stderr.contains("it is revoked: bad build"), "{}", refused.stderr);
}
