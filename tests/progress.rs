//! Progress on long waits as a person and a CI log see it: bars on a terminal, plain lines otherwise, and nothing
//! but the result document on stdout under `--json`.

mod common;

use common::hello::dev_stage;
use common::{bake_greeting, promote_only, Down};

#[test]
fn without_a_terminal_long_waits_are_plain_log_lines_and_json_stdout_stays_one_document() {
    let (repo, _) = dev_stage(2, "", "");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let bake = repo.run(&["bake"]).ok();
    assert!(bake.stderr.contains("kiln: hello: provisioning (0 of 2)"), "{}", bake.stderr);
    assert!(bake.stderr.contains("kiln: hello: provisioning: provisioned after"), "{}", bake.stderr);
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    let deploy = repo.run(&["deploy", "--stage", "dev", "--json"]).ok();
    assert!(deploy.stderr.contains("kiln: hello-dev-v001: instances healthy (0 of 2)"), "{}", deploy.stderr);
    assert!(deploy.stderr.contains("kiln: hello-dev-v001: instances healthy: healthy after"), "{}", deploy.stderr);
    let doc: serde_json::Value = serde_json::from_str(&deploy.stdout).expect("stdout is exactly one JSON document");
    assert_eq!(doc["group"], "hello-dev-v001");
    assert!(!deploy.stdout.contains("kiln:"), "{}", deploy.stdout);
}

#[test]
fn on_a_terminal_long_waits_draw_a_bar() {
    let (repo, _) = dev_stage(2, "", "");
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    // `script` gives kiln a pseudo-terminal for stderr, as a person's shell would.
    let kiln = env!("CARGO_BIN_EXE_kiln");
    let out = std::process::Command::new("script")
        .args(["-qfec", &format!("{kiln} deploy --stage dev"), "/dev/null"])
        .current_dir(repo.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", repo.path())
        .env("KILN_ACTOR", "tester")
        .env("TERM", "xterm")
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(screen.contains("hello-dev-v001: instances healthy"), "{screen}");
    assert!(screen.contains("2/2"), "the bar counts healthy instances: {screen}");
    assert!(!screen.contains("kiln: hello-dev-v001"), "no plain log lines on a terminal: {screen}");
}
