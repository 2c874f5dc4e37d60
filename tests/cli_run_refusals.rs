//! `kiln run` while a gate is waiting (approvals, soak) records the refusal once per digest and stage: running
//! again with the same gates still waiting prints the same summary and records nothing.

mod common;

use common::{free_port, tiny_repo, Repo};

fn refusals(repo: &Repo) -> usize {
    let log = repo.run(&["log", "--json", "--limit", "1000"]).ok().json();
    log["events"].as_array().unwrap().iter().filter(|e| e["kind"] == "refused").count()
}

#[test]
fn a_waiting_gate_is_recorded_once_per_digest_and_stage() {
    let repo = tiny_repo(free_port());
    for _ in 0..3 {
        let run = repo.run(&["run"]).ok();
        assert!(run.stdout.contains("dev is waiting on:\n  FAIL approvals 1: 0 of 1"), "{}", run.stdout);
        assert!(run.stdout.contains("approve with: kiln approve --stage dev --digest"), "{}", run.stdout);
    }
    assert_eq!(refusals(&repo), 1, "three runs waiting on the same approval record one refusal");

    let doc = repo.run(&["run", "--json"]).ok().json();
    assert_eq!(doc["stopped_at"]["stage"], "dev", "{doc}");
    let gates = doc["stopped_at"]["gates"].as_array().unwrap();
    assert!(gates.iter().any(|g| g["gate"] == "approvals 1" && g["passed"] == false), "{doc}");
    assert!(gates.iter().all(|g| g.get("evidence").is_some()), "evidence is always present: {doc}");
    assert_eq!(refusals(&repo), 1);

    // A different set of waiting gates is news: recorded once more, then not again.
    repo.edit("pipelines/app.toml", "approvals = 1", "approvals = 1\n[[stage.gate]]\nsoak = \"1m\"");
    repo.run(&["run"]).ok();
    repo.run(&["run"]).ok();
    assert_eq!(refusals(&repo), 2);
}

#[test]
fn kiln_promote_still_records_every_refusal() {
    let repo = tiny_repo(free_port());
    repo.run(&["bake"]).ok();
    repo.run(&["promote", "--stage", "dev"]).expect(3);
    repo.run(&["promote", "--stage", "dev"]).expect(3);
    assert_eq!(refusals(&repo), 2, "an explicit promote is an attempt, and each attempt is recorded");
}
