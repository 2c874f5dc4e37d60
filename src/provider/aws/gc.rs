//! What `kiln gc` does on AWS: deregister an image's AMIs and delete their snapshots, find launch template versions
//! that still name an image (gc leaves those alone), and terminate builders a killed bake left running.

use std::collections::BTreeSet;
use std::time::{Duration, SystemTime};

use super::ami::{self, TAG_ROLE};
use super::{sdk, AwsProvider};
use crate::provider::{ImageRef, ProviderError};

/// A builder older than this is an orphan: bakes terminate theirs, and none takes this long to provision.
const BUILDER_MAX_AGE: Duration = Duration::from_secs(3600);

/// Deregisters every AMI of the image (each region's copy; account shares go with it) and deletes its snapshots.
/// Anything already gone counts as deleted, so a gc interrupted half-way finishes on the next run.
pub fn delete_image(provider: &AwsProvider, image: &ImageRef) -> Result<(), ProviderError> {
    let amis: Vec<_> = AwsProvider::amis(image).into_iter().filter(|c| c.account.is_none()).collect();
    for copy in amis {
        let region = &copy.region;
        let ec2 = provider.ec2(region);
        let found = provider.describe_images(region, std::slice::from_ref(&copy.id))?.into_iter().next();
        let mut snapshots: BTreeSet<String> = copy.snapshots.iter().cloned().collect();
        if let Some(found) = &found {
            snapshots.extend(
                found
                    .block_device_mappings()
                    .iter()
                    .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_string)),
            );
            tracing::info!("deregistering {}", ami::image_ref(region, &copy.id));
            match provider.block_on(ec2.deregister_image().image_id(&copy.id).send()) {
                Ok(_) => {}
                Err(err) if sdk::code_of(&err).is_some_and(|c| c.starts_with("InvalidAMIID")) => {}
                Err(err) => return Err(sdk::error("ec2:DeregisterImage", region, &err)),
            }
        }
        for snapshot in snapshots {
            match provider.block_on(ec2.delete_snapshot().snapshot_id(&snapshot).send()) {
                Ok(_) => {}
                Err(err) if sdk::code_of(&err) == Some("InvalidSnapshot.NotFound") => {}
                Err(err) => return Err(sdk::error("ec2:DeleteSnapshot", region, &err)),
            }
        }
    }
    Ok(())
}

/// Launch template versions (any template in the account, kiln's or not) whose image is one of the image's AMIs.
pub fn image_users(provider: &AwsProvider, image: &ImageRef) -> Result<Vec<String>, ProviderError> {
    let mut users = Vec::new();
    let amis: Vec<_> = AwsProvider::amis(image).into_iter().filter(|c| c.account.is_none()).collect();
    let regions: BTreeSet<&str> = amis.iter().map(|c| c.region.as_str()).collect();
    for region in regions {
        let ids: BTreeSet<&str> = amis.iter().filter(|c| c.region == region).map(|c| c.id.as_str()).collect();
        let ec2 = provider.ec2(region);
        let mut templates = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let out = provider
                .block_on(ec2.describe_launch_templates().set_next_token(next.take()).send())
                .map_err(|e| sdk::error("ec2:DescribeLaunchTemplates", region, &e))?;
            templates.extend(out.launch_templates().iter().filter_map(|t| t.launch_template_id().map(str::to_string)));
            match out.next_token() {
                Some(token) if !token.is_empty() => next = Some(token.to_string()),
                _ => break,
            }
        }
        for template in templates {
            let mut next: Option<String> = None;
            loop {
                let out = provider
                    .block_on(
                        ec2.describe_launch_template_versions()
                            .launch_template_id(&template)
                            .set_next_token(next.take())
                            .send(),
                    )
                    .map_err(|e| sdk::error("ec2:DescribeLaunchTemplateVersions", region, &e))?;
                for version in out.launch_template_versions() {
                    let image_id = version.launch_template_data().and_then(|d| d.image_id()).unwrap_or_default();
                    if ids.contains(image_id) {
                        users.push(format!(
                            "launch template {} version {} in {region}",
                            version.launch_template_name().unwrap_or(&template),
                            version.version_number().unwrap_or_default()
                        ));
                    }
                }
                match out.next_token() {
                    Some(token) if !token.is_empty() => next = Some(token.to_string()),
                    _ => break,
                }
            }
        }
    }
    Ok(users)
}

/// The builders among `instances` launched more than [`BUILDER_MAX_AGE`] before `now`. One without a launch time,
/// or launched after `now` (clock skew), is left alone: terminating a bake's builder mid-bake is worse than waiting.
fn orphans<'a>(instances: impl Iterator<Item = &'a aws_sdk_ec2::types::Instance>, now: SystemTime) -> Vec<String> {
    instances
        .filter(|i| {
            i.launch_time()
                .and_then(|t| SystemTime::try_from(*t).ok())
                .and_then(|t| now.duration_since(t).ok())
                .is_some_and(|age| age > BUILDER_MAX_AGE)
        })
        .filter_map(|i| i.instance_id().map(str::to_string))
        .collect()
}

/// Terminates builders (instances tagged `kiln:role=builder`) older than an hour in the pipeline's region: what a
/// bake killed with SIGKILL could not clean up. Frees no bytes kiln can count, so it returns 0.
pub fn sweep_builders(provider: &AwsProvider) -> Result<u64, ProviderError> {
    let region = &provider.home;
    let ec2 = provider.ec2(region);
    let out = provider
        .block_on(
            ec2.describe_instances()
                .filters(ami::filter(&format!("tag:{TAG_ROLE}"), "builder"))
                .filters(
                    aws_sdk_ec2::types::Filter::builder()
                        .name("instance-state-name")
                        .values("pending")
                        .values("running")
                        .values("stopping")
                        .values("stopped")
                        .build(),
                )
                .send(),
        )
        .map_err(|e| sdk::error("ec2:DescribeInstances", region, &e))?;
    let old = orphans(out.reservations().iter().flat_map(|r| r.instances()), SystemTime::now());
    if old.is_empty() {
        return Ok(0);
    }
    tracing::info!("terminating {} builder(s) older than an hour: {}", old.len(), old.join(", "));
    provider
        .block_on(ec2.terminate_instances().set_instance_ids(Some(old)).send())
        .map_err(|e| sdk::error("ec2:TerminateInstances", region, &e))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::primitives::DateTime;
    use aws_sdk_ec2::types::Instance;

    fn launched(id: &str, at: Option<SystemTime>) -> Instance {
        Instance::builder().instance_id(id).set_launch_time(at.map(DateTime::from)).build()
    }

    #[test]
    fn only_builders_older_than_an_hour_are_orphans() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let instances = [
            launched("i-old", Some(now - BUILDER_MAX_AGE - Duration::from_secs(1))),
            launched("i-exactly-an-hour", Some(now - BUILDER_MAX_AGE)),
            launched("i-baking", Some(now - Duration::from_secs(600))),
            launched("i-from-the-future", Some(now + Duration::from_secs(600))),
            launched("i-no-launch-time", None),
        ];
        assert_eq!(orphans(instances.iter(), now), ["i-old"]);
    }
}
