//! Stages on AWS: the stage pointer in SSM Parameter Store and the Auto Scaling groups kiln made, read from AWS's
//! tags. Deploying (launch, route, drain, park, destroy) comes with the second part of the AWS provider.

use aws_sdk_ssm::types::{ParameterStringFilter, ParameterTier, ParameterType};

use super::ami::{TAG_DIGEST, TAG_PIPELINE};
use super::{sdk, AwsProvider};
use crate::digest::Digest;
use crate::provider::{Fleet, GroupHealth, GroupInfo, ImageRef, PollCadence, ProviderError, StageRef};

pub const TAG_STAGE: &str = "kiln:stage";

/// `/kiln/<pipeline>/<stage>`: a name Terraform and launch templates read with `resolve:ssm:`.
pub fn pointer_name(stage: StageRef) -> String {
    format!("/kiln/{}/{}", stage.pipeline, stage.stage.name)
}

fn regions(provider: &AwsProvider, stage: StageRef) -> Vec<String> {
    let regions = stage.stage.regions();
    if regions.is_empty() {
        vec![provider.home.clone()]
    } else {
        regions.to_vec()
    }
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
    let region = regions(provider, stage).remove(0);
    let ssm = provider.clients(&region).ssm;
    let filter = ParameterStringFilter::builder()
        .key("Name")
        .option("Equals")
        .values(&name)
        .build()
        .map_err(|e| ProviderError::Other { provider: "aws", message: format!("cannot ask for {name}: {e}") })?;
    let out = provider
        .block_on(ssm.describe_parameters().parameter_filters(filter).send())
        .map_err(|e| sdk::error("ssm:DescribeParameters", &region, &e))?;
    Ok(out.parameters().first().and_then(|p| p.description()).and_then(|d| d.parse().ok()))
}

fn not_yet(what: &str) -> ProviderError {
    ProviderError::Other {
        provider: "aws",
        message: format!(
            "{what} on AWS needs Auto Scaling deployments, which are not built yet (issue 11); promote with \
             --no-deploy meanwhile"
        ),
    }
}

impl Fleet for AwsProvider {
    fn groups(&self, stage: StageRef) -> Result<Vec<GroupInfo>, ProviderError> {
        let mut groups = Vec::new();
        for region in regions(self, stage) {
            let autoscaling = self.clients(&region).autoscaling;
            let mut next: Option<String> = None;
            loop {
                let call = autoscaling
                    .describe_auto_scaling_groups()
                    .filters(
                        aws_sdk_autoscaling::types::Filter::builder()
                            .name(format!("tag:{TAG_PIPELINE}"))
                            .values(stage.pipeline)
                            .build(),
                    )
                    .filters(
                        aws_sdk_autoscaling::types::Filter::builder()
                            .name(format!("tag:{TAG_STAGE}"))
                            .values(&stage.stage.name)
                            .build(),
                    )
                    .set_next_token(next.take())
                    .send();
                let out = self
                    .block_on(call)
                    .map_err(|e| sdk::error("autoscaling:DescribeAutoScalingGroups", &region, &e))?;
                for group in out.auto_scaling_groups() {
                    let digest = group
                        .tags()
                        .iter()
                        .find(|t| t.key() == Some(TAG_DIGEST))
                        .and_then(|t| t.value())
                        .and_then(|v| v.parse().ok());
                    let Some(digest) = digest else { continue };
                    groups.push(GroupInfo {
                        name: group.auto_scaling_group_name().unwrap_or_default().to_string(),
                        digest,
                        capacity: group.desired_capacity().unwrap_or_default().max(0) as u32,
                        running: group.instances().len() as u32,
                    });
                }
                match out.next_token() {
                    Some(token) if !token.is_empty() => next = Some(token.to_string()),
                    _ => break,
                }
            }
        }
        groups.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(groups)
    }

    fn serving(&self, _stage: StageRef) -> Result<Option<String>, ProviderError> {
        Err(not_yet("finding the serving group"))
    }

    fn launch(
        &self,
        _stage: StageRef,
        _group: &str,
        _image: &ImageRef,
        _capacity: u32,
    ) -> Result<GroupInfo, ProviderError> {
        Err(not_yet("deploying"))
    }

    fn health(&self, _stage: StageRef, _group: &str) -> Result<GroupHealth, ProviderError> {
        Err(not_yet("checking health"))
    }

    fn log_tail(&self, _stage: StageRef, _group: &str, _instance: &str) -> Option<String> {
        None
    }

    fn poll_cadence(&self) -> PollCadence {
        PollCadence { first: std::time::Duration::from_secs(2), max: std::time::Duration::from_secs(15) }
    }

    fn route(&self, _stage: StageRef, _group: &str) -> Result<std::time::Duration, ProviderError> {
        Err(not_yet("moving traffic"))
    }

    fn drain_pending(&self, _stage: StageRef, _group: &str) -> Result<u64, ProviderError> {
        Err(not_yet("draining"))
    }

    fn drain_timeout(&self, _stage: StageRef) -> std::time::Duration {
        std::time::Duration::from_secs(300)
    }

    fn park(&self, _stage: StageRef, _group: &str) -> Result<(), ProviderError> {
        Err(not_yet("parking a group"))
    }

    fn destroy(&self, _stage: StageRef, _group: &str) -> Result<(), ProviderError> {
        Err(not_yet("retiring a group"))
    }

    fn endpoint(&self, _stage: StageRef) -> Option<String> {
        None
    }

    fn endpoint_up(&self, _stage: StageRef) -> bool {
        false
    }

    fn stop_stage(&self, stage: StageRef) -> Result<(), ProviderError> {
        Err(ProviderError::Invalid {
            provider: "aws",
            message: format!(
                "`kiln down` stops local stages only; on AWS, retiring stage {} is `kiln gc`'s job, so that no \
                 command takes a stage down by accident",
                stage.stage.name
            ),
        })
    }
}
