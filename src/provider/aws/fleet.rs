//! Stages on AWS: one Auto Scaling group per deployment behind the stage's ELBv2 target group, a launch template
//! version per group, and the stage pointer in SSM Parameter Store. What exists and what serves is always read
//! from AWS (tags and target group attachments), never from the ledger alone, so a crashed deploy is reconciled.

use std::time::{Duration, Instant};

use aws_sdk_autoscaling::types::{Filter as AsgFilter, LaunchTemplateSpecification, LifecycleState, Tag as AsgTag};
use aws_sdk_ec2::types::{
    LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest, LaunchTemplateHttpTokensState,
    LaunchTemplateInstanceMetadataOptionsRequest, LaunchTemplateTagSpecificationRequest, RequestLaunchTemplateData,
    ResourceType,
};
use aws_sdk_elasticloadbalancingv2::types::TargetHealthStateEnum;
use aws_sdk_ssm::types::{ParameterStringFilter, ParameterTier, ParameterType};

use super::ami::{self, TAG_DIGEST, TAG_PIPELINE};
use super::{sdk, AwsProvider};
use crate::config::StageDeploy;
use crate::digest::Digest;
use crate::provider::{
    Fleet, GroupHealth, GroupInfo, ImageRef, PollCadence, ProviderError, StageRef, StrayInstance, Unhealthy,
};

pub const TAG_STAGE: &str = "kiln:stage";
pub const TAG_GROUP: &str = "kiln:group";
/// Written on a group by `route`: the stage's route generation (1, 2, …). A group is attached to the target group
/// from its launch (so its targets can turn healthy before the cutover), so attachment alone does not say which
/// group the stage was routed to; the highest generation among the attached groups does.
pub const TAG_ROUTED: &str = "kiln:routed";
const DEFAULT_INSTANCE_TYPE: &str = "t3.small";
/// Waited for when the target group does not say its deregistration delay.
const DEFAULT_DRAIN: Duration = Duration::from_secs(300);

fn invalid(message: String) -> ProviderError {
    ProviderError::Invalid { provider: "aws", message }
}

fn other(message: String) -> ProviderError {
    ProviderError::Other { provider: "aws", message }
}

/// `/kiln/<pipeline>/<stage>`: a name Terraform and launch templates read with `resolve:ssm:`.
pub fn pointer_name(stage: StageRef) -> String {
    format!("/kiln/{}/{}", stage.pipeline, stage.stage.name)
}

/// Every region the stage uses: `deploy.regions`, else the pipeline's.
fn regions(provider: &AwsProvider, stage: StageRef) -> Vec<String> {
    let regions = stage.stage.regions();
    if regions.is_empty() {
        vec![provider.home.clone()]
    } else {
        regions.to_vec()
    }
}

/// The region the stage's groups run in: its first region. Other regions get copies and pointers.
fn deploy_region(provider: &AwsProvider, stage: StageRef) -> String {
    regions(provider, stage).remove(0)
}

/// `kiln-<pipeline>-<stage>`: one launch template per stage, a version per deployment.
pub fn template_name(stage: StageRef) -> String {
    format!("kiln-{}-{}", stage.pipeline, stage.stage.name)
}

struct DeployTarget {
    target_group: String,
    subnets: Vec<String>,
    instance_type: String,
    security_groups: Vec<String>,
    instance_profile: Option<String>,
}

fn deploy_target(stage: StageRef) -> Result<DeployTarget, ProviderError> {
    let StageDeploy::Aws { target_group_arn, subnets, instance_type, security_groups, instance_profile, .. } =
        &stage.stage.deploy
    else {
        return Err(invalid(format!("stage {} has no AWS deploy settings", stage.stage.name)));
    };
    let target_group = target_group_arn.clone().ok_or_else(|| {
        invalid(format!(
            "stage {} has no `deploy.target-group-arn`: kiln moves traffic by attaching groups to it",
            stage.stage.name
        ))
    })?;
    Ok(DeployTarget {
        target_group,
        subnets: subnets.clone(),
        instance_type: instance_type.clone().unwrap_or(DEFAULT_INSTANCE_TYPE.into()),
        security_groups: security_groups.clone(),
        instance_profile: instance_profile.clone(),
    })
}

/// Writes the stage pointer in every region the stage runs in: the AMI id of that region's copy, as DataType
/// `aws:ec2:image`, with the digest in the description.
pub fn publish_pointer(provider: &AwsProvider, stage: StageRef, image: &ImageRef) -> Result<String, ProviderError> {
    let name = pointer_name(stage);
    for region in regions(provider, stage) {
        let copy = AwsProvider::ami_in(image, &region).ok_or_else(|| ProviderError::MissingImage {
            provider: "aws",
            image: image.image_ref.clone(),
            reason: format!("it has no AMI in {region}, where stage {} runs", stage.stage.name),
        })?;
        let ssm = provider.clients(&region).ssm;
        let put = ssm
            .put_parameter()
            .name(&name)
            .value(&copy.id)
            .r#type(ParameterType::String)
            .data_type("aws:ec2:image")
            .tier(ParameterTier::Standard)
            .description(image.digest.to_string())
            .overwrite(true)
            .send();
        provider.block_on(put).map_err(|e| sdk::error("ssm:PutParameter", &region, &e))?;
    }
    Ok(format!("ssm:{name}"))
}

/// The digest the stage pointer names, from its description in the stage's first region.
pub fn pointer(provider: &AwsProvider, stage: StageRef) -> Result<Option<Digest>, ProviderError> {
    let name = pointer_name(stage);
    let region = deploy_region(provider, stage);
    let ssm = provider.clients(&region).ssm;
    let filter = ParameterStringFilter::builder()
        .key("Name")
        .option("Equals")
        .values(&name)
        .build()
        .map_err(|e| other(format!("cannot ask for {name}: {e}")))?;
    let out = provider
        .block_on(ssm.describe_parameters().parameter_filters(filter).send())
        .map_err(|e| sdk::error("ssm:DescribeParameters", &region, &e))?;
    Ok(out.parameters().first().and_then(|p| p.description()).and_then(|d| d.parse().ok()))
}

fn tag_of<'a>(tags: &'a [aws_sdk_autoscaling::types::TagDescription], key: &str) -> Option<&'a str> {
    tags.iter().find(|t| t.key() == Some(key)).and_then(|t| t.value())
}

/// The route generation `route` wrote on the group; `None` for a group traffic was never routed to.
fn routed(group: &aws_sdk_autoscaling::types::AutoScalingGroup) -> Option<u64> {
    tag_of(group.tags(), TAG_ROUTED).and_then(|v| v.parse().ok())
}

impl AwsProvider {
    /// The stage's groups as AWS has them, found by their `kiln:pipeline` and `kiln:stage` tags.
    fn stage_groups(
        &self,
        stage: StageRef,
    ) -> Result<Vec<aws_sdk_autoscaling::types::AutoScalingGroup>, ProviderError> {
        let region = deploy_region(self, stage);
        let autoscaling = self.clients(&region).autoscaling;
        let mut groups = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let call = autoscaling
                .describe_auto_scaling_groups()
                .filters(AsgFilter::builder().name(format!("tag:{TAG_PIPELINE}")).values(stage.pipeline).build())
                .filters(AsgFilter::builder().name(format!("tag:{TAG_STAGE}")).values(&stage.stage.name).build())
                .set_next_token(next.take())
                .send();
            let out =
                self.block_on(call).map_err(|e| sdk::error("autoscaling:DescribeAutoScalingGroups", &region, &e))?;
            groups.extend(out.auto_scaling_groups().iter().cloned());
            match out.next_token() {
                Some(token) if !token.is_empty() => next = Some(token.to_string()),
                _ => break,
            }
        }
        groups.sort_by(|a, b| a.auto_scaling_group_name().cmp(&b.auto_scaling_group_name()));
        Ok(groups)
    }

    fn stage_group(
        &self,
        stage: StageRef,
        group: &str,
    ) -> Result<Option<aws_sdk_autoscaling::types::AutoScalingGroup>, ProviderError> {
        let region = deploy_region(self, stage);
        let autoscaling = self.clients(&region).autoscaling;
        let out = self
            .block_on(autoscaling.describe_auto_scaling_groups().auto_scaling_group_names(group).send())
            .map_err(|e| sdk::error("autoscaling:DescribeAutoScalingGroups", &region, &e))?;
        Ok(out.auto_scaling_groups().first().cloned())
    }

    /// A new launch template version (the template made on first use) with complete data: a version inherits
    /// nothing, so what it says is all an instance gets.
    fn template_version(
        &self,
        stage: StageRef,
        group: &str,
        image: &ImageRef,
        ami: &str,
    ) -> Result<(String, i64), ProviderError> {
        let region = deploy_region(self, stage);
        let target = deploy_target(stage)?;
        let ec2 = self.ec2(&region);
        let found = self.describe_images(&region, &[ami.to_string()])?;
        let found = found.first().ok_or_else(|| ProviderError::MissingImage {
            provider: "aws",
            image: ami::image_ref(&region, ami),
            reason: "the AMI no longer exists".into(),
        })?;
        let root_device = found.root_device_name().unwrap_or("/dev/xvda").to_string();
        // The root volume as the AMI has it (snapshot, size), encrypted: spelled out, since a version inherits nothing.
        let root_ebs = found
            .block_device_mappings()
            .iter()
            .find(|m| m.device_name() == Some(root_device.as_str()))
            .and_then(|m| m.ebs());
        let tags = vec![
            ami::tag(TAG_PIPELINE, stage.pipeline),
            ami::tag(TAG_STAGE, &stage.stage.name),
            ami::tag(TAG_DIGEST, image.digest.to_string()),
            ami::tag(TAG_GROUP, group),
            ami::tag("Name", group),
        ];
        let spec = |kind: ResourceType| {
            LaunchTemplateTagSpecificationRequest::builder().resource_type(kind).set_tags(Some(tags.clone())).build()
        };
        let data = RequestLaunchTemplateData::builder()
            .image_id(ami)
            .instance_type(aws_sdk_ec2::types::InstanceType::from(target.instance_type.as_str()))
            .metadata_options(
                LaunchTemplateInstanceMetadataOptionsRequest::builder()
                    .http_tokens(LaunchTemplateHttpTokensState::Required)
                    .build(),
            )
            .block_device_mappings(
                LaunchTemplateBlockDeviceMappingRequest::builder()
                    .device_name(root_device)
                    .ebs(
                        LaunchTemplateEbsBlockDeviceRequest::builder()
                            .encrypted(true)
                            .delete_on_termination(true)
                            .set_snapshot_id(root_ebs.and_then(|e| e.snapshot_id()).map(str::to_string))
                            .set_volume_size(root_ebs.and_then(|e| e.volume_size()))
                            .build(),
                    )
                    .build(),
            )
            .set_security_group_ids((!target.security_groups.is_empty()).then(|| target.security_groups.clone()))
            .set_iam_instance_profile(target.instance_profile.as_ref().map(|name| {
                aws_sdk_ec2::types::LaunchTemplateIamInstanceProfileSpecificationRequest::builder().name(name).build()
            }))
            .tag_specifications(spec(ResourceType::Instance))
            .tag_specifications(spec(ResourceType::Volume))
            .build();
        let name = template_name(stage);
        let existing = self.block_on(ec2.describe_launch_templates().launch_template_names(&name).send());
        let template_id = match existing {
            Ok(out) => out.launch_templates().first().and_then(|t| t.launch_template_id()).map(str::to_string),
            Err(err) if sdk::code_of(&err).is_some_and(|c| c.contains("NotFound")) => None,
            Err(err) => return Err(sdk::error("ec2:DescribeLaunchTemplates", &region, &err)),
        };
        match template_id {
            None => {
                let out = self
                    .block_on(
                        ec2.create_launch_template()
                            .launch_template_name(&name)
                            .launch_template_data(data)
                            .tag_specifications(
                                aws_sdk_ec2::types::TagSpecification::builder()
                                    .resource_type(ResourceType::LaunchTemplate)
                                    .tags(ami::tag(TAG_PIPELINE, stage.pipeline))
                                    .tags(ami::tag(TAG_STAGE, &stage.stage.name))
                                    .build(),
                            )
                            .send(),
                    )
                    .map_err(|e| sdk::error("ec2:CreateLaunchTemplate", &region, &e))?;
                let template =
                    out.launch_template().ok_or_else(|| other("CreateLaunchTemplate returned nothing".into()))?;
                Ok((
                    template.launch_template_id().unwrap_or_default().to_string(),
                    template.latest_version_number().unwrap_or(1),
                ))
            }
            Some(id) => {
                let out = self
                    .block_on(
                        ec2.create_launch_template_version()
                            .launch_template_id(&id)
                            .version_description(group)
                            .launch_template_data(data)
                            .send(),
                    )
                    .map_err(|e| sdk::error("ec2:CreateLaunchTemplateVersion", &region, &e))?;
                let version = out.launch_template_version().and_then(|v| v.version_number()).unwrap_or_default();
                Ok((id, version))
            }
        }
    }

    fn info(group: &aws_sdk_autoscaling::types::AutoScalingGroup) -> Option<GroupInfo> {
        let digest = tag_of(group.tags(), TAG_DIGEST).and_then(|v| v.parse().ok())?;
        let running = group
            .instances()
            .iter()
            .filter(|i| {
                matches!(
                    i.lifecycle_state(),
                    Some(
                        LifecycleState::InService
                            | LifecycleState::Pending
                            | LifecycleState::PendingWait
                            | LifecycleState::PendingProceed
                    )
                )
            })
            .count();
        Some(GroupInfo {
            name: group.auto_scaling_group_name().unwrap_or_default().to_string(),
            digest,
            capacity: group.desired_capacity().unwrap_or_default().max(0) as u32,
            running: running as u32,
        })
    }

    fn target_health(
        &self,
        region: &str,
        target_group: &str,
    ) -> Result<Vec<aws_sdk_elasticloadbalancingv2::types::TargetHealthDescription>, ProviderError> {
        let elb = self.clients(region).elb;
        let out = self
            .block_on(elb.describe_target_health().target_group_arn(target_group).send())
            .map_err(|e| sdk::error("elasticloadbalancing:DescribeTargetHealth", region, &e))?;
        Ok(out.target_health_descriptions().to_vec())
    }
}

impl Fleet for AwsProvider {
    fn groups(&self, stage: StageRef) -> Result<Vec<GroupInfo>, ProviderError> {
        Ok(self.stage_groups(stage)?.iter().filter_map(AwsProvider::info).collect())
    }

    fn serving(&self, stage: StageRef) -> Result<Option<String>, ProviderError> {
        let Ok(target) = deploy_target(stage) else { return Ok(None) };
        // A new group is attached from its launch, so a deploy that crashed before its cutover leaves two attached
        // groups, and a cutover that crashed before detaching the old one does too: the one routed to last is what
        // the stage serves. An attached group never routed to serves nothing yet.
        Ok(self
            .stage_groups(stage)?
            .iter()
            .filter(|g| g.target_group_arns().iter().any(|arn| arn == &target.target_group))
            .filter_map(|g| Some((routed(g)?, g.auto_scaling_group_name()?.to_string())))
            .max()
            .map(|(_, name)| name))
    }

    fn launch(
        &self,
        stage: StageRef,
        group: &str,
        image: &ImageRef,
        capacity: u32,
    ) -> Result<GroupInfo, ProviderError> {
        let region = deploy_region(self, stage);
        let target = deploy_target(stage)?;
        let autoscaling = self.clients(&region).autoscaling;
        if let Some(existing) = self.stage_group(stage, group)? {
            let info =
                AwsProvider::info(&existing).ok_or_else(|| other(format!("group {group} has no {TAG_DIGEST} tag")))?;
            if info.digest != image.digest {
                return Err(other(format!("group {group} already exists and runs {}", info.digest.short())));
            }
            if info.capacity != capacity {
                // A parked group kept for rollback is scaled back up, launch template version unchanged.
                let size = capacity as i32;
                self.block_on(
                    autoscaling
                        .update_auto_scaling_group()
                        .auto_scaling_group_name(group)
                        .min_size(size)
                        .max_size(size)
                        .desired_capacity(size)
                        .send(),
                )
                .map_err(|e| sdk::error("autoscaling:UpdateAutoScalingGroup", &region, &e))?;
            }
            if !existing.target_group_arns().iter().any(|arn| arn == &target.target_group) {
                self.attach(&region, group, &target.target_group)?;
            }
            return Ok(GroupInfo { capacity, ..info });
        }
        let ami = AwsProvider::ami_in(image, &region).ok_or_else(|| ProviderError::MissingImage {
            provider: "aws",
            image: image.image_ref.clone(),
            reason: format!("it has no AMI in {region}, where stage {} runs", stage.stage.name),
        })?;
        let (template_id, version) = self.template_version(stage, group, image, &ami.id)?;
        let grace = stage.stage.ready_timeout.map_or(300, |t| t.as_secs().max(30)) as i32;
        let size = capacity as i32;
        let tag = |key: &str, value: &str| {
            AsgTag::builder()
                .key(key)
                .value(value)
                .propagate_at_launch(true)
                .resource_id(group)
                .resource_type("auto-scaling-group")
                .build()
        };
        tracing::info!(stage = %stage.stage.name, "creating Auto Scaling group {group} ({} x {})", capacity, ami.id);
        self.block_on(
            autoscaling
                .create_auto_scaling_group()
                .auto_scaling_group_name(group)
                .launch_template(
                    LaunchTemplateSpecification::builder()
                        .launch_template_id(&template_id)
                        .version(version.to_string())
                        .build(),
                )
                .min_size(size)
                .max_size(size)
                .desired_capacity(size)
                .vpc_zone_identifier(target.subnets.join(","))
                .health_check_type("ELB")
                .health_check_grace_period(grace)
                .tags(tag(TAG_PIPELINE, stage.pipeline))
                .tags(tag(TAG_STAGE, &stage.stage.name))
                .tags(tag(TAG_DIGEST, &image.digest.to_string()))
                .tags(tag(TAG_GROUP, group))
                .send(),
        )
        .map_err(|e| sdk::error("autoscaling:CreateAutoScalingGroup", &region, &e))?;
        // Registered in the target group at once: the load balancer sends a target nothing until its health
        // checks pass, so "healthy in the target group" is what `health` waits for, and no request reaches an
        // instance that is not healthy.
        self.attach(&region, group, &target.target_group)?;
        Ok(GroupInfo { name: group.to_string(), digest: image.digest, capacity, running: 0 })
    }

    fn health(&self, stage: StageRef, group: &str) -> Result<GroupHealth, ProviderError> {
        let region = deploy_region(self, stage);
        let target = deploy_target(stage)?;
        let Some(found) = self.stage_group(stage, group)? else {
            return Ok(GroupHealth {
                total: stage.stage.capacity,
                healthy: 0,
                waiting: Vec::new(),
                failed: Some(Unhealthy { reason: format!("group {group} no longer exists"), log_tail: None }),
            });
        };
        let total = found.desired_capacity().unwrap_or_default().max(0) as u32;
        let targets = self.target_health(&region, &target.target_group)?;
        let mut healthy = 0;
        let mut waiting = Vec::new();
        let mut failed = None;
        for instance in found.instances() {
            let id = instance.instance_id().unwrap_or_default();
            let in_service = instance.lifecycle_state() == Some(&LifecycleState::InService);
            let target_state =
                targets.iter().find(|t| t.target().and_then(|t| t.id()) == Some(id)).and_then(|t| t.target_health());
            let state = target_state.and_then(|h| h.state());
            if in_service && state == Some(&TargetHealthStateEnum::Healthy) {
                healthy += 1;
                continue;
            }
            let reason = match target_state {
                Some(h) => format!(
                    "{id}: {} in the target group ({}{})",
                    h.state().map_or("unknown", |s| s.as_str()),
                    h.reason().map_or("", |r| r.as_str()),
                    h.description().map(|d| format!(": {d}")).unwrap_or_default()
                ),
                None => format!(
                    "{id}: {} (not registered in the target group yet)",
                    instance.lifecycle_state().map_or("unknown", |s| s.as_str())
                ),
            };
            let gone = matches!(
                instance.lifecycle_state(),
                Some(
                    LifecycleState::Terminating
                        | LifecycleState::Terminated
                        | LifecycleState::TerminatingWait
                        | LifecycleState::TerminatingProceed
                )
            ) || instance.health_status() == Some("Unhealthy");
            if gone && failed.is_none() {
                failed = Some(Unhealthy { reason: reason.clone(), log_tail: self.log_tail(stage, group, id) });
            }
            waiting.push(reason);
        }
        Ok(GroupHealth { total, healthy, waiting, failed })
    }

    fn log_tail(&self, stage: StageRef, _group: &str, instance: &str) -> Option<String> {
        // `waiting` entries start with the instance id.
        let id = instance.split(':').next().unwrap_or(instance);
        let region = deploy_region(self, stage);
        let out = self.block_on(self.ec2(&region).get_console_output().instance_id(id).latest(true).send()).ok()?;
        let text = out.output()?;
        use base64::Engine;
        let bytes = base64::engine::general_purpose::STANDARD.decode(text).ok()?;
        let text = String::from_utf8_lossy(&bytes);
        let lines: Vec<&str> = text.lines().collect();
        Some(lines[lines.len().saturating_sub(20)..].join("\n"))
    }

    fn poll_cadence(&self) -> PollCadence {
        // Health checks take seconds on AWS; polling faster buys nothing and costs throttling. moto answers at
        // once, so the first poll usually settles it.
        PollCadence { first: Duration::from_secs(2), max: Duration::from_secs(15) }
    }

    fn route(&self, stage: StageRef, group: &str) -> Result<Duration, ProviderError> {
        let started = Instant::now();
        let region = deploy_region(self, stage);
        let target = deploy_target(stage)?;
        let groups = self.stage_groups(stage)?;
        let Some(new) = groups.iter().find(|g| g.auto_scaling_group_name() == Some(group)) else {
            return Err(other(format!("group {group} does not exist, so no traffic can move to it")));
        };
        if !new.target_group_arns().iter().any(|arn| arn == &target.target_group) {
            self.attach(&region, group, &target.target_group)?;
        }
        // The cutover is this tag: from here on `serving` names the new group, whatever a crash leaves attached.
        let generation = groups.iter().filter_map(routed).max().unwrap_or(0) + 1;
        self.block_on(
            self.clients(&region)
                .autoscaling
                .create_or_update_tags()
                .tags(
                    AsgTag::builder()
                        .key(TAG_ROUTED)
                        .value(generation.to_string())
                        .propagate_at_launch(false)
                        .resource_id(group)
                        .resource_type("auto-scaling-group")
                        .build(),
                )
                .send(),
        )
        .map_err(|e| sdk::error("autoscaling:CreateOrUpdateTags", &region, &e))?;
        // Then the others leave: their targets drain for the target group's deregistration delay.
        for old in groups.iter().filter(|g| g.auto_scaling_group_name() != Some(group)) {
            if old.target_group_arns().iter().any(|arn| arn == &target.target_group) {
                let name = old.auto_scaling_group_name().unwrap_or_default();
                self.block_on(
                    self.clients(&region)
                        .autoscaling
                        .detach_load_balancer_target_groups()
                        .auto_scaling_group_name(name)
                        .target_group_arns(&target.target_group)
                        .send(),
                )
                .map_err(|e| sdk::error("autoscaling:DetachLoadBalancerTargetGroups", &region, &e))?;
            }
        }
        Ok(started.elapsed())
    }

    fn drain_pending(&self, stage: StageRef, group: &str) -> Result<u64, ProviderError> {
        let region = deploy_region(self, stage);
        let target = deploy_target(stage)?;
        let Some(found) = self.stage_group(stage, group)? else { return Ok(0) };
        let ids: Vec<&str> = found.instances().iter().filter_map(|i| i.instance_id()).collect();
        let targets = self.target_health(&region, &target.target_group)?;
        Ok(targets
            .iter()
            .filter(|t| t.target().and_then(|t| t.id()).is_some_and(|id| ids.contains(&id)))
            .filter(|t| t.target_health().and_then(|h| h.state()) == Some(&TargetHealthStateEnum::Draining))
            .count() as u64)
    }

    fn drain_timeout(&self, stage: StageRef) -> Duration {
        let region = deploy_region(self, stage);
        let Ok(target) = deploy_target(stage) else { return DEFAULT_DRAIN };
        let elb = self.clients(&region).elb;
        let delay = self
            .block_on(elb.describe_target_group_attributes().target_group_arn(&target.target_group).send())
            .ok()
            .and_then(|out| {
                out.attributes()
                    .iter()
                    .find(|a| a.key() == Some("deregistration_delay.timeout_seconds"))
                    .and_then(|a| a.value())
                    .and_then(|v| v.parse::<u64>().ok())
            });
        delay.map_or(DEFAULT_DRAIN, |s| Duration::from_secs(s + 30))
    }

    fn park(&self, stage: StageRef, group: &str) -> Result<(), ProviderError> {
        let region = deploy_region(self, stage);
        let autoscaling = self.clients(&region).autoscaling;
        // A parked group leaves the target group too: a deploy finished after a crash mid-cutover parks the old
        // group while it is still attached, and `launch` attaches a kept group again when it comes back.
        if let (Ok(target), Some(found)) = (deploy_target(stage), self.stage_group(stage, group)?) {
            if found.target_group_arns().iter().any(|arn| arn == &target.target_group) {
                self.block_on(
                    autoscaling
                        .detach_load_balancer_target_groups()
                        .auto_scaling_group_name(group)
                        .target_group_arns(&target.target_group)
                        .send(),
                )
                .map_err(|e| sdk::error("autoscaling:DetachLoadBalancerTargetGroups", &region, &e))?;
            }
        }
        self.block_on(
            autoscaling
                .update_auto_scaling_group()
                .auto_scaling_group_name(group)
                .min_size(0)
                .max_size(0)
                .desired_capacity(0)
                .send(),
        )
        .map_err(|e| sdk::error("autoscaling:UpdateAutoScalingGroup", &region, &e))?;
        Ok(())
    }

    fn destroy(&self, stage: StageRef, group: &str) -> Result<(), ProviderError> {
        let region = deploy_region(self, stage);
        let Some(found) = self.stage_group(stage, group)? else { return Ok(()) };
        let autoscaling = self.clients(&region).autoscaling;
        match self
            .block_on(autoscaling.delete_auto_scaling_group().auto_scaling_group_name(group).force_delete(true).send())
        {
            Ok(_) => {}
            Err(err) if sdk::code_of(&err) == Some("ValidationError") => {}
            Err(err) => return Err(sdk::error("autoscaling:DeleteAutoScalingGroup", &region, &err)),
        }
        // Its launch template version goes with it; the template's default version cannot be deleted, and stays.
        if let Some(spec) = found.launch_template() {
            if let (Some(id), Some(version)) = (spec.launch_template_id(), spec.version()) {
                let ec2 = self.ec2(&region);
                let out = self.block_on(ec2.describe_launch_templates().launch_template_ids(id).send()).ok();
                let default = out
                    .as_ref()
                    .and_then(|o| o.launch_templates().first())
                    .and_then(|t| t.default_version_number())
                    .map(|v| v.to_string());
                if default.as_deref() != Some(version) {
                    let call = ec2
                        .delete_launch_template_versions()
                        .launch_template_id(id)
                        .versions(version)
                        .customize()
                        // One try: an endpoint that lacks the API answers 500 every time.
                        .config_override(
                            aws_sdk_ec2::config::Builder::default()
                                .retry_config(aws_config::retry::RetryConfig::disabled()),
                        )
                        .send();
                    match self.block_on(call) {
                        Ok(_) => {}
                        // moto has no DeleteLaunchTemplateVersions. The group is already gone, so failing here
                        // would leave the deployment half retired for a version that runs nothing: kiln says which
                        // version stays and goes on.
                        Err(err) if err.raw_response().is_some_and(|r| r.status().is_server_error()) => {
                            tracing::warn!(
                                "this endpoint cannot delete launch template versions (DeleteLaunchTemplateVersions: \
                                 {}); version {version} of {} stays",
                                err.raw_response().map(|r| r.status().as_u16()).unwrap_or_default(),
                                template_name(stage)
                            );
                        }
                        Err(err) => return Err(sdk::error("ec2:DeleteLaunchTemplateVersions", &region, &err)),
                    }
                }
            }
        }
        Ok(())
    }

    fn endpoint(&self, stage: StageRef) -> Option<String> {
        let region = deploy_region(self, stage);
        let target = deploy_target(stage).ok()?;
        let elb = self.clients(&region).elb;
        let groups = self.block_on(elb.describe_target_groups().target_group_arns(&target.target_group).send()).ok()?;
        let balancer = groups.target_groups().first()?.load_balancer_arns().first()?.clone();
        let balancers = self.block_on(elb.describe_load_balancers().load_balancer_arns(balancer).send()).ok()?;
        balancers.load_balancers().first()?.dns_name().map(|dns| format!("http://{dns}"))
    }

    fn endpoint_up(&self, stage: StageRef) -> bool {
        // The load balancer is the stage's own infrastructure (Terraform's, not kiln's): up when it exists.
        self.endpoint(stage).is_some()
    }

    fn alarm(&self, stage: StageRef, name: &str) -> Result<crate::provider::AlarmState, ProviderError> {
        let region = deploy_region(self, stage);
        let cloudwatch = self.clients(&region).cloudwatch;
        let out = self
            .block_on(cloudwatch.describe_alarms().alarm_names(name).send())
            .map_err(|e| sdk::error("cloudwatch:DescribeAlarms", &region, &e))?;
        let (state, reason) = if let Some(alarm) = out.metric_alarms().first() {
            (alarm.state_value().map(|s| s.as_str().to_string()), alarm.state_reason())
        } else if let Some(alarm) = out.composite_alarms().first() {
            (alarm.state_value().map(|s| s.as_str().to_string()), alarm.state_reason())
        } else {
            return Err(invalid(format!(
                "stage {}: there is no CloudWatch alarm `{name}` in {region}",
                stage.stage.name
            )));
        };
        Ok(crate::provider::AlarmState {
            state: state.unwrap_or_else(|| "INSUFFICIENT_DATA".into()),
            reason: reason.unwrap_or_default().to_string(),
        })
    }

    fn stray_instances(
        &self,
        stage: StageRef,
        group: &str,
        image: &ImageRef,
    ) -> Result<Vec<StrayInstance>, ProviderError> {
        let region = deploy_region(self, stage);
        let expected = AwsProvider::ami_in(image, &region).map_or_else(|| "(none)".to_string(), |c| c.id);
        let Some(found) = self.stage_group(stage, group)? else { return Ok(Vec::new()) };
        // Instances on their way out are the group's past, not what it runs.
        let ids: Vec<String> = found
            .instances()
            .iter()
            .filter(|i| {
                !matches!(
                    i.lifecycle_state(),
                    Some(
                        LifecycleState::Terminating
                            | LifecycleState::Terminated
                            | LifecycleState::TerminatingWait
                            | LifecycleState::TerminatingProceed
                    )
                )
            })
            .filter_map(|i| i.instance_id().map(str::to_string))
            .collect();
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ec2 = self.ec2(&region);
        let mut strays = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let call = ec2.describe_instances().set_instance_ids(Some(ids.clone())).set_next_token(next.take()).send();
            let out = self.block_on(call).map_err(|e| sdk::error("ec2:DescribeInstances", &region, &e))?;
            for instance in out.reservations().iter().flat_map(|r| r.instances()) {
                let runs = instance.image_id().unwrap_or_default();
                if runs != expected {
                    strays.push(StrayInstance {
                        instance: instance.instance_id().unwrap_or_default().to_string(),
                        runs: runs.to_string(),
                        expected: expected.clone(),
                    });
                }
            }
            match out.next_token() {
                Some(token) if !token.is_empty() => next = Some(token.to_string()),
                _ => break,
            }
        }
        Ok(strays)
    }

    fn plan_deploy(&self, stage: StageRef, sketch: &crate::provider::DeploySketch) -> Vec<String> {
        super::plan::deploy(self, stage, sketch)
    }

    fn stop_stage(&self, stage: StageRef) -> Result<(), ProviderError> {
        Err(invalid(format!(
            "`kiln down` stops local stages only; on AWS, retiring stage {} is `kiln gc`'s job, so that no command \
             takes a stage down by accident",
            stage.stage.name
        )))
    }
}

impl AwsProvider {
    fn attach(&self, region: &str, group: &str, target_group: &str) -> Result<(), ProviderError> {
        self.block_on(
            self.clients(region)
                .autoscaling
                .attach_load_balancer_target_groups()
                .auto_scaling_group_name(group)
                .target_group_arns(target_group)
                .send(),
        )
        .map_err(|e| sdk::error("autoscaling:AttachLoadBalancerTargetGroups", region, &e))?;
        Ok(())
    }
}
