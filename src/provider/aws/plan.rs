//! What `--plan` says a promotion or a deployment would call on AWS, in order, without calling anything: every
//! fact comes from the configuration and the ledger's record of the image (its AMIs per region and account).
//! Reads are named too, so the list is the whole conversation; polls are named once, as polls.

use super::ami::TAG_PIPELINE;
use super::fleet::{pointer_name, template_name, TAG_STAGE};
use super::AwsProvider;
use crate::config::StageDeploy;
use crate::provider::{DeploySketch, GroupStart, ImageRef, StageRef};

/// The stage's regions, the first one being where its groups run: `deploy.regions`, else the pipeline's.
fn regions(provider: &AwsProvider, stage: StageRef) -> Vec<String> {
    match stage.stage.regions() {
        [] => vec![provider.home.clone()],
        regions => regions.to_vec(),
    }
}

fn ami(image: &ImageRef, region: &str) -> String {
    AwsProvider::ami_in(image, region).map_or_else(|| format!("<its copy in {region}>"), |c| c.id)
}

fn pointer_writes(provider: &AwsProvider, stage: StageRef, image: &ImageRef) -> Vec<String> {
    regions(provider, stage)
        .iter()
        .map(|region| {
            format!(
                "ssm:PutParameter {} = {} in {region} (DataType aws:ec2:image, description {})",
                pointer_name(stage),
                ami(image, region),
                image.digest
            )
        })
        .collect()
}

pub fn promote(provider: &AwsProvider, stage: StageRef, image: &ImageRef, protect: bool) -> Vec<String> {
    let regions = regions(provider, stage);
    let recorded = AwsProvider::amis(image);
    let mut calls = Vec::new();
    let mut by_region: Vec<&str> = recorded.iter().map(|c| c.region.as_str()).collect();
    by_region.dedup();
    for region in by_region {
        calls.push(format!("ec2:DescribeImages in {region}: the recorded AMIs still exist and carry the digest"));
    }
    let home = ami(image, &provider.home);
    let has = |region: &str, account: Option<&str>| {
        recorded.iter().any(|c| c.region == region && c.account.as_deref() == account)
    };
    for region in regions.iter().filter(|r| !has(r, None)) {
        calls.push(format!(
            "ec2:CopyImage {home} from {} to {region}, then ec2:DescribeImages polled until it is available, and \
             ec2:CreateTags (the digest and kiln:* tags)",
            provider.home
        ));
    }
    for account in stage.stage.accounts() {
        for region in regions.iter().filter(|r| !has(r, Some(account))) {
            calls.push(format!(
                "ec2:ModifyImageAttribute {} in {region}: launch permission for account {account} (and \
                 ec2:ModifySnapshotAttribute on its snapshots)",
                ami(image, region)
            ));
        }
    }
    calls.extend(pointer_writes(provider, stage, image));
    if protect {
        calls.push("ec2:EnableImageDeregistrationProtection on each of its AMIs (the last stage)".into());
    }
    calls
}

pub fn deploy(provider: &AwsProvider, stage: StageRef, sketch: &DeploySketch) -> Vec<String> {
    let region = regions(provider, stage).remove(0);
    let (target_group, subnets, instance_type) = match &stage.stage.deploy {
        StageDeploy::Aws { target_group_arn, subnets, instance_type, .. } => (
            target_group_arn.clone().unwrap_or_else(|| "<no deploy.target-group-arn>".into()),
            subnets.join(","),
            instance_type.clone().unwrap_or_else(|| "t3.small".into()),
        ),
        StageDeploy::Local { .. } => Default::default(),
    };
    let group = &sketch.group;
    let capacity = stage.stage.capacity;
    let template = template_name(stage);
    let mut calls = Vec::new();
    for alarm in &sketch.alarms {
        calls.push(format!("cloudwatch:DescribeAlarms {alarm} in {region}: the alarm the window watches exists"));
    }
    calls.push(format!(
        "autoscaling:DescribeAutoScalingGroups tag:{TAG_PIPELINE}={} tag:{TAG_STAGE}={} in {region}: the stage's \
         groups, and which one is attached to {target_group}",
        stage.pipeline, stage.stage.name
    ));
    // A rollback moves the pointer as it starts, before any group changes.
    if sketch.pointer_first {
        calls.extend(pointer_writes(provider, stage, &sketch.image));
    }
    match sketch.start {
        GroupStart::Live => {
            calls.push(format!(
                "elasticloadbalancing:DescribeTargetGroups, elasticloadbalancing:DescribeLoadBalancers: the \
                 endpoint is up; when {group} serves at capacity nothing else is called (otherwise \
                 autoscaling:UpdateAutoScalingGroup {group} back to {capacity})"
            ));
            return calls;
        }
        GroupStart::New => {
            let ami = ami(&sketch.image, &region);
            calls.push(format!("autoscaling:DescribeAutoScalingGroups {group}: not made yet (a re-run finds it)"));
            calls.push(format!("ec2:DescribeImages {ami} in {region}: its root volume"));
            calls.push(format!("ec2:DescribeLaunchTemplates {template}"));
            let write = if sketch.first { "ec2:CreateLaunchTemplate" } else { "ec2:CreateLaunchTemplateVersion" };
            calls.push(format!(
                "{write} {template}: {ami}, {instance_type}, IMDSv2 required, encrypted volumes, kiln:* tags"
            ));
            calls.push(format!(
                "autoscaling:CreateAutoScalingGroup {group}: that version, subnets {subnets}, min = max = desired \
                 = {capacity}, ELB health checks, kiln:* tags propagated"
            ));
        }
        GroupStart::Reenabled => {
            calls.push(format!("autoscaling:DescribeAutoScalingGroups {group}: the kept group"));
            calls.push(format!(
                "autoscaling:UpdateAutoScalingGroup {group}: min = max = desired = {capacity} (its launch template \
                 version unchanged)"
            ));
        }
    }
    calls.push(format!("autoscaling:AttachLoadBalancerTargetGroups {group} to {target_group}"));
    calls.push(format!(
        "autoscaling:DescribeAutoScalingGroups {group} and elasticloadbalancing:DescribeTargetHealth, polled until \
         every instance is InService and healthy"
    ));
    calls.push("autoscaling:DescribeAutoScalingGroups: the stage's groups, before traffic moves".into());
    calls.push(format!("autoscaling:CreateOrUpdateTags {group}: kiln:routed, the cutover"));
    if let Some(previous) = &sketch.previous {
        calls.push(format!("autoscaling:DetachLoadBalancerTargetGroups {previous} from {target_group}"));
        calls.push(format!(
            "elasticloadbalancing:DescribeTargetGroupAttributes (the deregistration delay), then \
             autoscaling:DescribeAutoScalingGroups {previous} and elasticloadbalancing:DescribeTargetHealth, polled \
             until its targets have drained"
        ));
    }
    if sketch.verify {
        let alarms = if sketch.alarms.is_empty() {
            String::new()
        } else {
            format!(" and cloudwatch:DescribeAlarms {}", sketch.alarms.join(", "))
        };
        calls.push(format!("the verification window: {group}'s health{alarms}, polled until the window ends"));
    }
    calls.push("autoscaling:DescribeAutoScalingGroups: the stage's groups, to retire the old ones".into());
    for parked in &sketch.park {
        calls.push(format!(
            "autoscaling:DescribeAutoScalingGroups {parked}, then autoscaling:UpdateAutoScalingGroup {parked}: min = \
             max = desired = 0 (parked; detached first if a crash left it attached)"
        ));
    }
    for gone in &sketch.destroy {
        calls.push(format!("autoscaling:DeleteAutoScalingGroup {gone} (force)"));
        calls.push(format!("ec2:DeleteLaunchTemplateVersions {template}: the version {gone} ran"));
    }
    calls.push(
        "elasticloadbalancing:DescribeTargetGroups, elasticloadbalancing:DescribeLoadBalancers: the endpoint".into(),
    );
    calls.push(format!(
        "ssm:DescribeParameters {}: the pointer names {} (written again only where it does not)",
        pointer_name(stage),
        sketch.image.digest.short()
    ));
    calls
}
