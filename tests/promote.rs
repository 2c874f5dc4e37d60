//! Promotion through dev → test → prod on the local provider: command, soak and approval gates, the audit views,
//! revocation, and concurrent writers.

mod common;

use std::process::Command;

use common::{http_get, Down, Repo};

const NOW: &str = "2026-11-28T12:00:00Z";
const LATER: &str = "2026-11-28T12:11:00Z";

fn at(repo: &Repo, now: &str, actor: &str, args: &[&str]) -> common::Run {
    let out = repo.kiln().env("KILN_NOW", now).env("KILN_ACTOR", actor).args(args).output().unwrap();
    common::Run::of(out, args)
}

#[test]
fn dev_to_test_to_prod_through_every_kind_of_gate() {
    let (repo, ports) = Repo::example_on_free_ports();
    let _down = Down { repo: &repo, stages: vec!["dev", "test", "prod"], pipeline: None };
    let digest = at(&repo, NOW, "ci", &["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();

    // prod before anything reached test: upstream refuses.
    let refused = at(&repo, NOW, "ci", &["promote", "--stage", "prod", "--json"]).expect(3);
    assert!(refused.stderr.contains("nothing is live in test"), "{}", refused.stderr);

    // dev: the command gate runs scripts/smoke.sh; the promotion deploys.
    let dev = at(&repo, NOW, "ci", &["promote", "--stage", "dev", "--json"]).ok().json();
    assert_eq!(dev["outcome"], "promoted");
    let smoke =
        dev["gates"].as_array().unwrap().iter().find(|g| g["gate"].as_str().unwrap().starts_with("command")).unwrap();
    assert_eq!(smoke["passed"], true);
    assert!(smoke["evidence"]["output_tail"].as_str().unwrap().contains(&format!("smoke-testing {digest} for dev")));
    assert!(smoke["evidence"]["output_sha256"].as_str().unwrap().starts_with("sha256:"));
    assert_eq!(dev["deployment"]["outcome"], "deployed");
    let (code, body) = http_get(ports[0], "/").expect("dev serves");
    assert_eq!((code, body.starts_with("hello from kiln")), (200, true), "{body}");

    let status = at(&repo, NOW, "ci", &["status", "--json"]).ok().json();
    assert_eq!(status["stages"][0]["promoted"]["digest"], digest.as_str());
    assert_eq!(status["stages"][0]["live"]["digest"], digest.as_str());
    assert!(status["stages"][1]["promoted"].is_null());
    let stages_reached = |lineage: &serde_json::Value| -> Vec<String> {
        lineage["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap().to_string()).collect()
    };
    let lineage = at(&repo, NOW, "ci", &["lineage", "dev", "--json"]).ok().json();
    assert_eq!(stages_reached(&lineage), ["dev"]);
    assert_eq!(lineage["stages"][0]["deployments"][0]["result"], "finished");

    // test: soak 10m in dev. At the same instant it is refused; eleven minutes later it passes.
    let soak = at(&repo, NOW, "ci", &["promote", "--stage", "test", "--json"]).expect(3);
    assert!(soak.stderr.contains("soak 10m: live in dev for 0s, needs 10m"), "{}", soak.stderr);
    // --plan writes nothing, whether the promotion would be refused or would pass.
    let ledger = repo.file(".kiln/ledger");
    let before = common::snapshot(&ledger);
    assert!(before.len() > 3, "the ledger holds the bake and dev's events: {:?}", before.keys());
    let plan = at(&repo, NOW, "ci", &["promote", "--stage", "test", "--plan", "--json"]).expect(3);
    assert_eq!(plan.json()["would_pass"], false);
    assert!(common::snapshot(&ledger) == before, "a refused --plan changed the ledger");
    let plan = at(&repo, LATER, "ci", &["promote", "--stage", "test", "--plan", "--json"]).ok();
    assert_eq!(plan.json()["would_pass"], true, "{}", plan.stdout);
    assert!(common::snapshot(&ledger) == before, "a passing --plan changed the ledger");
    assert!(!repo.file(".kiln/run/hello/test").exists(), "a --plan deployed test");
    let test = at(&repo, LATER, "ci", &["promote", "--stage", "test", "--json"]).ok().json();
    assert_eq!(test["outcome"], "promoted");
    assert!(repo.file(".kiln/run/hello/test").exists(), "the stage directory a --plan must not create");
    assert!(test["gates"].as_array().unwrap().iter().any(|g| g["gate"] == "soak 10m" && g["passed"] == true));
    let status = at(&repo, LATER, "ci", &["status", "--json"]).ok().json();
    assert_eq!(status["stages"][1]["live"]["digest"], digest.as_str());
    assert!(status["stages"][2]["promoted"].is_null());
    let lineage = at(&repo, LATER, "ci", &["lineage", &digest, "--json"]).ok().json();
    assert_eq!(stages_reached(&lineage), ["dev", "test"]);

    // prod: one approval needed.
    let waiting = at(&repo, LATER, "ci", &["promote", "--stage", "prod", "--json"]).expect(3);
    assert!(waiting.stderr.contains("approvals 1: 0 of 1"), "{}", waiting.stderr);
    let refusal = waiting.json();
    assert_eq!(refusal["exit_code"], 3);
    assert!(refusal["details"]["gates"]
        .as_array()
        .unwrap()
        .iter()
        .any(|g| g["gate"] == "approvals 1" && g["passed"] == false));
    let status = at(&repo, LATER, "ci", &["status", "--json"]).ok().json();
    assert!(status["stages"][2]["promoted"].is_null(), "a refusal records no promotion");
    at(&repo, LATER, "ana", &["approve", "--stage", "prod", "--digest", &digest[7..19], "--note", "looks good"]).ok();
    let again = at(&repo, LATER, "ana", &["approve", "--stage", "prod", "--digest", &digest, "--json"]).ok().json();
    assert_eq!(again["recorded"], false, "one approval per actor");
    let prod = at(&repo, LATER, "ci", &["promote", "--stage", "prod", "--json"]).ok().json();
    assert_eq!(prod["outcome"], "promoted");
    assert!(http_get(ports[2], "/healthz").is_some_and(|(c, _)| c == 200));

    // The audit views.
    let status = at(&repo, LATER, "ci", &["status", "--json"]).ok().json();
    for (i, stage) in ["dev", "test", "prod"].iter().enumerate() {
        assert_eq!(status["stages"][i]["stage"], *stage);
        assert_eq!(status["stages"][i]["live"]["digest"], digest.as_str());
        assert_eq!(status["stages"][i]["endpoint"], format!("http://127.0.0.1:{}", ports[i]));
        assert_eq!(status["stages"][i]["runtime"]["endpoint_up"], true);
        assert_eq!(status["stages"][i]["runtime"]["running"], status["stages"][i]["runtime"]["capacity"]);
        assert!(status["stages"][i]["warnings"].as_array().unwrap().is_empty(), "{status}");
    }
    assert_eq!(status["stages"][2]["runtime"]["running"], 3, "prod's capacity");
    let lineage = at(&repo, LATER, "ci", &["lineage", "prod", "--format", "json"]).ok().json();
    assert_eq!(lineage["image"]["digest"], digest.as_str());
    assert_eq!(lineage["parents"][0]["recipe"], "base");
    let stages: Vec<&str> =
        lineage["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(stages, ["dev", "test", "prod"]);
    assert_eq!(lineage["stages"][2]["approvals"][0]["actor"], "ana");
    assert_eq!(lineage["stages"][2]["approvals"][0]["note"], "looks good");
    assert_eq!(lineage["stages"][2]["deployments"][0]["result"], "finished");
    assert!(lineage["stages"][1]["promotions"][0]["gates"].as_array().unwrap().iter().any(|g| g["gate"] == "soak 10m"));

    // dot renders with Graphviz.
    let dot = at(&repo, LATER, "ci", &["lineage", "prod", "--format", "dot"]).ok().stdout;
    let rendered = tempfile::NamedTempFile::new().unwrap();
    let mut child = Command::new("dot")
        .args(["-Tsvg", "-o", rendered.path().to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("graphviz is installed by scripts/install-test-deps");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), dot.as_bytes()).unwrap();
    assert!(child.wait().unwrap().success(), "dot rejected:\n{dot}");
    assert!(std::fs::read_to_string(rendered.path()).unwrap().contains("<svg"));
    let mermaid = at(&repo, LATER, "ci", &["lineage", "prod", "--format", "mermaid"]).ok().stdout;
    assert!(mermaid.starts_with("flowchart LR"));

    // `down` stops a stage; status and verify say it is stopped (on purpose, not drift), and deploy brings it back.
    at(&repo, LATER, "ci", &["down", "--stage", "test"]).ok();
    let status = at(&repo, LATER, "ci", &["status", "--json"]).ok().json();
    assert_eq!(status["stages"][1]["runtime"]["endpoint_up"], false);
    assert!(
        status["stages"][1]["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("stopped")),
        "{status}"
    );
    assert!(http_get(ports[1], "/").is_none(), "test's endpoint is closed");
    let stopped = at(&repo, LATER, "ci", &["verify"]).ok();
    assert!(stopped.stdout.contains("stage test: stopped (kiln down at seq"), "{}", stopped.stdout);
    at(&repo, LATER, "ci", &["deploy", "--stage", "test"]).ok();
    assert!(http_get(ports[1], "/healthz").is_some_and(|(c, _)| c == 200));

    // Revoking the base revokes hello too: status flags it, promote and approve refuse it.
    let base = lineage["parents"][0]["digest"].as_str().unwrap().to_string();
    let revoked = at(&repo, LATER, "sec", &["revoke", &base, "--reason", "CVE-2026-0001", "--json"]).ok().json();
    assert_eq!(revoked["descendants"][0], digest.as_str());
    let status = at(&repo, LATER, "ci", &["status", "--json"]).ok().json();
    assert!(status["stages"][2]["warnings"][0].as_str().unwrap().contains("REVOKED: CVE-2026-0001"));
    let refused = at(&repo, LATER, "ci", &["promote", "--stage", "dev", "--digest", &digest]).expect(3);
    assert!(refused.stderr.contains("not-revoked"), "{}", refused.stderr);
    at(&repo, LATER, "bo", &["approve", "--stage", "prod", "--digest", &digest]).expect(2);

    at(&repo, LATER, "ci", &["verify"]).ok();
}

#[test]
fn bad_promotion_input_is_refused_clearly() {
    let (repo, _) = Repo::example_on_free_ports();
    let run = repo.run(&["promote", "--stage", "staging"]).expect(2);
    assert!(
        run.stderr.contains("pipeline `hello` has no stage `staging`; its stages are dev, test, prod"),
        "{}",
        run.stderr
    );
    let run = repo.run(&["promote", "--stage", "dev"]).expect(2);
    assert!(run.stderr.contains("recipe `hello` was never baked; run `kiln bake`"), "{}", run.stderr);
    let run = repo.run(&["promote", "--stage", "dev", "--digest", "abc"]).expect(2);
    assert!(run.stderr.contains("is not a digest"), "{}", run.stderr);
    let run = repo.run(&["approve", "--stage", "dev", "--digest", "0123456789abcdef"]).expect(2);
    assert!(run.stderr.contains("stage dev has no approvals gate"), "{}", run.stderr);
    let run = repo.run(&["approve", "--stage", "prod", "--digest", "0123456789abcdef"]).expect(2);
    assert!(run.stderr.contains("no image matches digest `0123456789abcdef`"), "{}", run.stderr);
}

/// 32 processes at once: approvals by distinct actors and promotions that need five of them. Every approval is
/// recorded exactly once, the chain verifies, and every promotion was judged on approvals already in the chain.
#[test]
fn thirty_two_concurrent_approvers_and_promoters() {
    let repo = common::tiny_repo(common::free_port());
    repo.edit("pipelines/app.toml", "approvals = 1", "approvals = 5");
    let digest = repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    let mut children = Vec::new();
    for i in 0..32 {
        let mut cmd = repo.kiln();
        if i % 4 == 3 {
            cmd.args(["promote", "--stage", "dev", "--no-deploy", "--digest", &digest]);
        } else {
            cmd.env("KILN_ACTOR", format!("approver-{i}")).args(["approve", "--stage", "dev", "--digest", &digest]);
        }
        children
            .push((i, cmd.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap()));
    }
    for (i, child) in children {
        let out = child.wait_with_output().unwrap();
        let code = out.status.code().unwrap();
        if i % 4 == 3 {
            assert!(code == 0 || code == 3, "promoter {i} exited {code}: {}", String::from_utf8_lossy(&out.stderr));
        } else {
            assert_eq!(code, 0, "approver {i}: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
    repo.run(&["verify"]).ok();
    let log = repo.run(&["log", "--json", "--limit", "1000"]).ok().json();
    let mut events: Vec<serde_json::Value> = log["events"].as_array().unwrap().clone();
    events.reverse();
    let mut approvers = std::collections::BTreeSet::new();
    let mut promoted = 0;
    for e in &events {
        match e["kind"].as_str().unwrap() {
            "approved" => {
                assert!(approvers.insert(e["actor"].as_str().unwrap().to_string()), "an approval was recorded twice")
            }
            "promoted" => {
                promoted += 1;
                assert!(
                    approvers.len() >= 5,
                    "promotion at seq {} with only {} approvals before it",
                    e["seq"],
                    approvers.len()
                );
                let evidence = e["gates"].as_array().unwrap().iter().find(|g| g["gate"] == "approvals 5").unwrap();
                for approval in evidence["evidence"]["approvals"].as_array().unwrap() {
                    assert!(approval["seq"].as_u64().unwrap() < e["seq"].as_u64().unwrap());
                }
            }
            _ => {}
        }
    }
    assert_eq!(approvers.len(), 24, "every approver recorded exactly once");
    assert!(promoted <= 1, "promoting the same digest twice records it once");
    // Whatever the interleaving, promoting now succeeds (or was done).
    let last = repo.run(&["promote", "--stage", "dev", "--no-deploy", "--json"]).ok().json();
    assert!(last["outcome"] == "promoted" || last["outcome"] == "already-promoted");
}

#[test]
fn an_approvers_list_is_enforced_and_log_filters_by_stage() {
    let repo = common::tiny_repo(common::free_port());
    repo.edit("pipelines/app.toml", "approvals = 1", "approvals = 1\napprovers = [\"ana\"]");
    let digest = repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    let refused = at(&repo, NOW, "mallory", &["approve", "--stage", "dev", "--digest", &digest]).expect(2);
    assert!(refused.stderr.contains("mallory may not approve for dev (approvers: ana)"), "{}", refused.stderr);
    at(&repo, NOW, "ana", &["approve", "--stage", "dev", "--digest", &digest]).ok();
    at(&repo, NOW, "ci", &["promote", "--stage", "dev", "--no-deploy"]).ok();
    let dev = repo.run(&["log", "--stage", "dev", "--json"]).ok().json();
    let kinds: Vec<&str> = dev["events"].as_array().unwrap().iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["pointer-published", "promoted", "approved"], "newest first, only dev's events");
    let limited = repo.run(&["log", "--limit", "1", "--json"]).ok().json();
    assert_eq!(limited["events"].as_array().unwrap().len(), 1);
}

/// The bytes promoted are the bytes baked: a layer changed on disk fails the content gate and `verify`.
#[test]
fn a_tampered_image_is_refused_and_reported_as_drift() {
    let repo = common::tiny_repo(common::free_port());
    let digest = repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    repo.run(&["approve", "--stage", "dev", "--digest", &digest]).ok();
    let hex = &digest["sha256:".len()..];
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.file(&format!(".kiln/oci/blobs/sha256/{hex}"))).unwrap()).unwrap();
    let layer = manifest["layers"][1]["digest"].as_str().unwrap()["sha256:".len()..].to_string();
    let blob = repo.file(&format!(".kiln/oci/blobs/sha256/{layer}"));
    let mut bytes = std::fs::read(&blob).unwrap();
    bytes[600] ^= 0x20;
    std::fs::write(&blob, bytes).unwrap();

    let refused = repo.run(&["promote", "--stage", "dev", "--no-deploy", "--json"]).expect(3);
    let gates = refused.json()["details"]["gates"].clone();
    let content = gates.as_array().unwrap().iter().find(|g| g["gate"] == "content").unwrap().clone();
    assert_eq!(content["passed"], false, "{gates}");
    assert!(content["detail"].as_str().unwrap().contains("no longer matches its digest"), "{content}");
    let drift = repo.run(&["verify"]).expect(6);
    assert!(drift.stderr.contains(&digest), "verify names the image: {}", drift.stderr);
}
