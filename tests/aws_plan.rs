//! `--plan` on promote, deploy and rollback against moto: each makes no AWS call at all (moto's recorder counts
//! them from outside kiln), and each lists the calls the real command then makes, in order: every call that
//! changes something in AWS, as moto records it, is in the plan, in the same order.

mod common;
mod moto;

use common::Repo;
use moto::app::{aws_repo, bake, network, run, write_pipeline};
use moto::Moto;

const ACCOUNT: &str = "111122223333";

/// The app pipeline deploying dev behind a target group of `moto::app::network` (one instance, one
/// group kept for rollback); prod also runs in eu-west-1 and is shared with another account.
fn with_target_group(moto: &Moto, repo: &Repo) {
    let net = network(moto, &["dev"]);
    let (subnet, target_group) = (&net.subnets[0], &net.target_groups[0]);
    write_pipeline(
        repo,
        &format!(
            r#"[[stage]]
name = "dev"
capacity = 1
keep-previous = 1
deploy = {{ target-group-arn = "{target_group}", subnets = ["{subnet}"] }}

[[stage]]
name = "prod"
deploy = {{ target-group-arn = "{target_group}", subnets = ["{subnet}"], regions = ["us-east-1", "eu-west-1"], accounts = ["{ACCOUNT}"] }}
"#
        ),
    );
}

/// The `service:Operation` names a plan's calls mention, in order.
fn operations(calls: &serde_json::Value) -> Vec<String> {
    let mut ops = Vec::new();
    for call in calls.as_array().unwrap() {
        for word in call.as_str().unwrap().split(|c: char| !(c.is_ascii_alphanumeric() || c == ':')) {
            let word = word.trim_end_matches(':');
            let Some((service, op)) = word.split_once(':') else { continue };
            let service_like =
                !service.is_empty() && service.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
            if service_like
                && op.starts_with(|c: char| c.is_ascii_uppercase())
                && op.bytes().all(|b| b.is_ascii_alphanumeric())
            {
                ops.push(word.to_string());
            }
        }
    }
    ops
}

/// The calls that change something in AWS.
fn changes(ops: &[String]) -> Vec<String> {
    const VERBS: [&str; 9] = ["Create", "Put", "Attach", "Detach", "Update", "Delete", "Copy", "Modify", "Enable"];
    ops.iter()
        .filter(|op| op.split(':').nth(1).is_some_and(|o| VERBS.iter().any(|v| o.starts_with(v))))
        .cloned()
        .collect()
}

/// Runs `args` (a plan) with the recorder on; asserts that kiln made no AWS call; returns its JSON.
fn plan_without_calls(moto: &Moto, repo: &Repo, args: &[&str]) -> serde_json::Value {
    moto.start_recording();
    let doc = run(moto, repo, args).ok().json();
    let calls = moto.stop_recording();
    assert_eq!(calls, Vec::<String>::new(), "`kiln {}` made AWS calls", args.join(" "));
    doc
}

/// Runs `args` for real with the recorder on; returns the AWS operations it made, in order.
fn recorded(moto: &Moto, repo: &Repo, args: &[&str]) -> Vec<String> {
    moto.start_recording();
    run(moto, repo, args).ok();
    moto.stop_recording()
}

#[test]
fn plans_make_no_aws_call_and_list_the_changes_the_real_commands_then_make_in_order() {
    let moto = Moto::start();
    let repo = aws_repo(&moto);
    with_target_group(&moto, &repo);
    let one = bake(&moto, &repo, &[])["digest"].as_str().unwrap().to_string();

    // Promote dev: the pointer write, then a first deployment (the launch template made, a new group attached).
    let plan = plan_without_calls(&moto, &repo, &["promote", "--stage", "dev", "--plan", "--json"]);
    assert_eq!(plan["outcome"], "planned");
    let deployment = &plan["planned_deployment"];
    assert_eq!(deployment["group"], "app-dev-v001");
    let mut planned = operations(&plan["calls"]);
    planned.extend(operations(&deployment["calls"]));
    assert_eq!(
        changes(&planned),
        [
            "ssm:PutParameter",
            "ec2:CreateLaunchTemplate",
            "autoscaling:CreateAutoScalingGroup",
            "autoscaling:AttachLoadBalancerTargetGroups",
            "autoscaling:CreateOrUpdateTags"
        ]
    );
    let real = recorded(&moto, &repo, &["promote", "--stage", "dev", "--json"]);
    assert_eq!(changes(&real), changes(&planned), "the promotion made what its plan listed: {real:#?}");
    assert!(
        real.iter().all(|op| planned.contains(op)),
        "every operation the promotion made is named in its plan: {real:#?}\nplanned: {planned:#?}"
    );

    // Deploy a second image: a new version and group, the old one detached and parked.
    repo.write("images/files/app/config.txt", "mode=faster\n");
    let two = bake(&moto, &repo, &[])["digest"].as_str().unwrap().to_string();
    run(&moto, &repo, &["promote", "--stage", "dev", "--digest", &two, "--no-deploy"]).ok();
    let plan = plan_without_calls(&moto, &repo, &["deploy", "--stage", "dev", "--plan", "--json"]);
    assert_eq!((plan["group"].as_str(), plan["previous_group"].as_str()), (Some("app-dev-v002"), Some("app-dev-v001")));
    let planned = operations(&plan["calls"]);
    assert_eq!(
        changes(&planned),
        [
            "ec2:CreateLaunchTemplateVersion",
            "autoscaling:CreateAutoScalingGroup",
            "autoscaling:AttachLoadBalancerTargetGroups",
            "autoscaling:CreateOrUpdateTags",
            "autoscaling:DetachLoadBalancerTargetGroups",
            "autoscaling:UpdateAutoScalingGroup"
        ]
    );
    let real = recorded(&moto, &repo, &["deploy", "--stage", "dev", "--json"]);
    assert_eq!(changes(&real), changes(&planned), "the deployment made what its plan listed: {real:#?}");
    assert!(real.iter().all(|op| planned.contains(op)), "{real:#?}\nplanned: {planned:#?}");

    // Roll back: the pointer first, then the kept group scaled back up and attached, the other parked.
    let plan = plan_without_calls(&moto, &repo, &["rollback", "--stage", "dev", "--plan", "--json"]);
    assert_eq!((plan["digest"].as_str(), plan["group"].as_str()), (Some(one.as_str()), Some("app-dev-v001")));
    assert_eq!(plan["start"], "reenabled");
    let planned = operations(&plan["calls"]);
    assert_eq!(
        changes(&planned),
        [
            "ssm:PutParameter",
            "autoscaling:UpdateAutoScalingGroup",
            "autoscaling:AttachLoadBalancerTargetGroups",
            "autoscaling:CreateOrUpdateTags",
            "autoscaling:DetachLoadBalancerTargetGroups",
            "autoscaling:UpdateAutoScalingGroup"
        ]
    );
    let real = recorded(&moto, &repo, &["rollback", "--stage", "dev", "--json"]);
    assert_eq!(changes(&real), changes(&planned), "the rollback made what its plan listed: {real:#?}");
    assert!(real.iter().all(|op| planned.contains(op)), "{real:#?}\nplanned: {planned:#?}");

    // Promote to prod, planned only: a copy to its second region, shares with its account in both, the pointer in
    // both regions, and the protection of an image that reached the last stage; still no call.
    let plan = plan_without_calls(&moto, &repo, &["promote", "--stage", "prod", "--no-deploy", "--plan", "--json"]);
    assert_eq!(plan["digest"], one.as_str(), "prod gets what is live in dev");
    assert_eq!(
        changes(&operations(&plan["calls"])),
        [
            "ec2:CopyImage",
            "ec2:CreateTags",
            "ec2:ModifyImageAttribute",
            "ec2:ModifySnapshotAttribute",
            "ec2:ModifyImageAttribute",
            "ec2:ModifySnapshotAttribute",
            "ssm:PutParameter",
            "ssm:PutParameter",
            "ec2:EnableImageDeregistrationProtection"
        ]
    );
    let text = plan["calls"].to_string();
    assert!(text.contains("to eu-west-1") && text.contains(&format!("account {ACCOUNT}")), "{text}");
}
