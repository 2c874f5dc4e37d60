//! What moto cannot do, injected below the SDK (`KILN_INJECT=aws.<Operation>=<fault>`): a failed provisioning
//! step, a failed CreateImage, throttling that the SDK's retries ride out, and Ctrl-C while the builder works. Each
//! time the builder is terminated and nothing is recorded, checked with boto3.

mod common;
mod moto;

use std::time::{Duration, Instant};

use common::{Repo, Run};
use moto::app::aws_repo;
use moto::Moto;

fn bake_with(moto: &Moto, repo: &Repo, inject: &str) -> Run {
    Run::of(moto.kiln(repo).env("KILN_INJECT", inject).args(["bake"]).output().unwrap(), &["bake", inject])
}

/// (instance id, state) of every builder.
fn builders(moto: &Moto) -> Vec<(String, String)> {
    moto::app::builders(moto).into_iter().map(|(id, state, _, _)| (id, state)).collect()
}

fn kiln_images(moto: &Moto) -> usize {
    let out = moto.boto3(
        "print(len(ec2.describe_images(Owners=['self'], Filters=[{'Name': 'tag-key', 'Values': ['kiln:recipe-key']}])['Images']))",
    );
    out.trim().parse().unwrap()
}

fn assert_nothing_recorded(moto: &Moto, repo: &Repo) {
    let log = Run::of(moto.kiln(repo).args(["log", "--json"]).output().unwrap(), &["log"]);
    assert!(!log.stdout.contains("\"baked\""), "nothing recorded:\n{}", log.stdout);
}

#[test]
fn a_failed_provisioning_step_names_its_step_and_output_and_terminates_the_builder() {
    let moto = Moto::start();
    let repo = aws_repo(&moto);
    let out = bake_with(
        &moto,
        &repo,
        "aws.GetCommandInvocation=status:Failed:::kiln-step 1::\n::kiln-step 2::\nsetup: disk full",
    )
    .expect(1);
    assert!(out.stderr.contains("provision step 2 of recipe `app` failed"), "{}", out.stderr);
    assert!(out.stderr.contains("run images/scripts/setup.sh"), "{}", out.stderr);
    assert!(out.stderr.contains("ended Failed") && out.stderr.contains("setup: disk full"), "{}", out.stderr);
    let builders = builders(&moto);
    assert_eq!(builders.len(), 1);
    assert_eq!(builders[0].1, "terminated");
    assert_eq!(kiln_images(&moto), 0, "no image");
    assert_nothing_recorded(&moto, &repo);
}

#[test]
fn a_failed_create_image_terminates_the_builder_and_records_nothing() {
    let moto = Moto::start();
    let repo = aws_repo(&moto);
    let out = bake_with(&moto, &repo, "aws.CreateImage=fail:InvalidParameterValue").expect(1);
    assert!(out.stderr.contains("ec2:CreateImage in us-east-1 failed (InvalidParameterValue)"), "{}", out.stderr);
    assert_eq!(builders(&moto).iter().map(|b| b.1.as_str()).collect::<Vec<_>>(), ["terminated"]);
    assert_eq!(kiln_images(&moto), 0);
    assert_nothing_recorded(&moto, &repo);
}

#[test]
fn throttling_is_retried_with_backoff_and_the_bake_succeeds_once() {
    let moto = Moto::start();
    let repo = aws_repo(&moto);
    moto.start_recording();
    bake_with(&moto, &repo, "aws.RunInstances#1=throttle,aws.SendCommand#1=throttle,aws.CreateImage#1=throttle").ok();
    let ops = moto.stop_recording();
    // The throttled attempts never reached moto: each call arrived once, so nothing was made twice.
    for op in ["ec2:RunInstances", "ssm:SendCommand", "ec2:CreateImage"] {
        assert_eq!(ops.iter().filter(|o| *o == op).count(), 1, "{op} in {ops:?}");
    }
    assert_eq!(builders(&moto).len(), 1);
    assert_eq!(kiln_images(&moto), 1);
}

#[test]
fn ctrl_c_while_the_builder_provisions_terminates_it_and_exits_130() {
    let moto = Moto::start();
    let repo = aws_repo(&moto);
    let child = moto
        .kiln(&repo)
        .env("KILN_INJECT", "aws.GetCommandInvocation=status:InProgress")
        .args(["bake"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait (on moto, not on a clock) until the builder runs, then interrupt.
    let started = Instant::now();
    while !builders(&moto).iter().any(|(_, state)| state == "running") {
        assert!(started.elapsed() < Duration::from_secs(60), "no builder started");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));
    common::hello::signal(child.id(), "INT");
    let output = child.wait_with_output().unwrap();
    let out = Run::of(output, &["bake"]).expect(130);
    assert!(out.stderr.contains("terminated the builder i-"), "{}", out.stderr);
    assert_eq!(builders(&moto).iter().map(|b| b.1.as_str()).collect::<Vec<_>>(), ["terminated"]);
    assert_eq!(kiln_images(&moto), 0);
    assert_nothing_recorded(&moto, &repo);
}

#[test]
fn a_malformed_aws_fault_is_a_usage_error_before_anything_runs() {
    let repo = Repo::empty();
    let out =
        Run::of(repo.kiln().env("KILN_INJECT", "aws.RunInstances=explode").args(["log"]).output().unwrap(), &["log"]);
    let out = out.expect(2);
    assert!(out.stderr.contains("`aws.RunInstances=explode`: unknown fault `explode`"), "{}", out.stderr);
}
