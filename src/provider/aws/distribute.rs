//! Getting an image to where a stage needs it, under its one digest: CopyImage to other regions (tags copied
//! explicitly, since CopyImage drops them), launch permissions for other accounts (never `all`), and re-checking
//! every copy before promotion relies on it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};

use aws_sdk_ec2::types::{ImageAttributeName, LaunchPermission, LaunchPermissionModifications};

use super::ami::{self, TAG_DIGEST};
use super::{sdk, AwsProvider};
use crate::provider::{ImageCopy, ImageRef, ProviderError};

/// `protect` says once per process that the endpoint cannot protect images, then stops asking.
static PROTECTION_UNAVAILABLE: AtomicBool = AtomicBool::new(false);

fn other(message: String) -> ProviderError {
    ProviderError::Other { provider: "aws", message }
}

pub fn distribute(
    provider: &AwsProvider,
    image: &ImageRef,
    regions: &[String],
    accounts: &[String],
) -> Result<Vec<ImageCopy>, ProviderError> {
    let mut copies = AwsProvider::amis(image);
    let home = AwsProvider::ami_in(image, &provider.home).ok_or_else(|| {
        other(format!("{} has no AMI in {}, the region it was baked in", image.digest.short(), provider.home))
    })?;
    let regions: Vec<String> = if regions.is_empty() { vec![provider.home.clone()] } else { regions.to_vec() };
    for region in &regions {
        if copies.iter().any(|c| &c.region == region && c.account.is_none()) {
            continue;
        }
        let copy = copy_to(provider, image, &home, region)?;
        copies.push(copy);
    }
    for account in accounts {
        if account == "all" {
            // The config refuses it too; this is the last line.
            return Err(ProviderError::Invalid {
                provider: "aws",
                message: "kiln never makes an image public: list account ids, not `all`".into(),
            });
        }
        for region in &regions {
            if copies.iter().any(|c| &c.region == region && c.account.as_deref() == Some(account)) {
                continue;
            }
            let ami = copies
                .iter()
                .find(|c| &c.region == region && c.account.is_none())
                .cloned()
                .ok_or_else(|| other(format!("no AMI of {} in {region} to share", image.digest.short())))?;
            share(provider, &ami, account)?;
            copies.push(ImageCopy { account: Some(account.clone()), ..ami });
        }
    }
    copies.sort();
    copies.dedup();
    Ok(copies)
}

/// CopyImage of the home AMI into `region`, or the copy an earlier, interrupted promotion made (found by its digest
/// tag, or by the client token that makes CopyImage itself idempotent); waited for, then tagged like the original.
fn copy_to(
    provider: &AwsProvider,
    image: &ImageRef,
    home: &ImageCopy,
    region: &str,
) -> Result<ImageCopy, ProviderError> {
    let ec2 = provider.ec2(region);
    let existing = provider
        .block_on(
            ec2.describe_images()
                .owners("self")
                .filters(ami::filter(&format!("tag:{TAG_DIGEST}"), image.digest.to_string()))
                .send(),
        )
        .map_err(|e| sdk::error("ec2:DescribeImages", region, &e))?;
    if let Some(found) = existing.images().iter().find(|i| ami::is_available(i)) {
        let id = found.image_id().unwrap_or_default().to_string();
        return Ok(ImageCopy { region: region.into(), account: None, snapshots: snapshots_of(found), id });
    }
    let source =
        provider.describe_images(&home.region, std::slice::from_ref(&home.id))?.into_iter().next().ok_or_else(
            || {
                other(format!(
                    "{} no longer exists, so it cannot be copied to {region}",
                    ami::image_ref(&home.region, &home.id)
                ))
            },
        )?;
    let name = source.name().unwrap_or("kiln-image").to_string();
    tracing::info!("copying {} to {region}", ami::image_ref(&home.region, &home.id));
    let token = format!("kiln-{}-{region}", &image.digest.hex()[..32]);
    let out = provider
        .block_on(
            ec2.copy_image()
                .source_image_id(&home.id)
                .source_region(&home.region)
                .name(&name)
                .description(source.description().unwrap_or("kiln image"))
                .client_token(token)
                .send(),
        )
        .map_err(|e| sdk::error("ec2:CopyImage", region, &e))?;
    let id = out.image_id().map(str::to_string).ok_or_else(|| other("CopyImage returned no image id".into()))?;
    let copied = provider.wait_image_available(region, &id, &mut |_| {})?;
    let snapshots = snapshots_of(&copied);
    let mut resources = vec![id.clone()];
    resources.extend(snapshots.iter().cloned());
    let tags: Vec<_> = ami::tags_of(&source)
        .into_iter()
        .filter(|(k, _)| k.starts_with("kiln:") || k == "Name")
        .map(|(k, v)| ami::tag(&k, v))
        .collect();
    provider
        .block_on(ec2.create_tags().set_resources(Some(resources)).set_tags(Some(tags)).send())
        .map_err(|e| sdk::error("ec2:CreateTags", region, &e))?;
    Ok(ImageCopy { region: region.into(), account: None, id, snapshots })
}

fn snapshots_of(image: &aws_sdk_ec2::types::Image) -> Vec<String> {
    let mut snapshots: Vec<String> = image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_string))
        .collect();
    snapshots.sort();
    snapshots
}

/// Lets `account` launch the AMI: a launch permission for that account id only, and the volume permission its
/// snapshots need.
fn share(provider: &AwsProvider, copy: &ImageCopy, account: &str) -> Result<(), ProviderError> {
    let region = &copy.region;
    let ec2 = provider.ec2(region);
    tracing::info!("sharing {} with account {account}", ami::image_ref(region, &copy.id));
    let permission =
        LaunchPermissionModifications::builder().add(LaunchPermission::builder().user_id(account).build()).build();
    provider
        .block_on(ec2.modify_image_attribute().image_id(&copy.id).launch_permission(permission).send())
        .map_err(|e| sdk::error("ec2:ModifyImageAttribute", region, &e))?;
    for snapshot in &copy.snapshots {
        // `OperationType=add` with `UserId.N` rather than `CreateVolumePermission.Add`: EC2 takes both, and moto
        // ignores the latter, so only this form lets the tests see the share.
        provider
            .block_on(
                ec2.modify_snapshot_attribute()
                    .snapshot_id(snapshot)
                    .attribute(aws_sdk_ec2::types::SnapshotAttributeName::CreateVolumePermission)
                    .operation_type(aws_sdk_ec2::types::OperationType::Add)
                    .user_ids(account)
                    .send(),
            )
            .map_err(|e| sdk::error("ec2:ModifySnapshotAttribute", region, &e))?;
    }
    Ok(())
}

/// Checks every copy the image carries: one DescribeImages per region, and the launch permissions of shared ones.
pub fn verify(provider: &AwsProvider, image: &ImageRef) -> Result<(), ProviderError> {
    let copies = AwsProvider::amis(image);
    if copies.is_empty() {
        return Err(AwsProvider::missing(image, "no AMI is recorded for it"));
    }
    let mut by_region: BTreeMap<&str, Vec<&ImageCopy>> = BTreeMap::new();
    for copy in &copies {
        by_region.entry(copy.region.as_str()).or_default().push(copy);
    }
    let mut problems = Vec::new();
    for (region, copies) in by_region {
        let mut ids: Vec<String> = copies.iter().map(|c| c.id.clone()).collect();
        ids.sort();
        ids.dedup();
        let found = provider.describe_images(region, &ids)?;
        let mut checked_shares: BTreeMap<String, Vec<String>> = BTreeMap::new();
        // A region's AMI and its shares with accounts are one AMI: what is wrong with it is said once.
        let mut broken: BTreeSet<String> = BTreeSet::new();
        for copy in copies {
            if broken.contains(&copy.id) {
                continue;
            }
            let image_found = found.iter().find(|i| i.image_id() == Some(copy.id.as_str()));
            if let Some(problem) = ami::copy_problem(copy, image_found, &image.digest) {
                broken.insert(copy.id.clone());
                problems.push(problem);
                continue;
            }
            let Some(account) = &copy.account else { continue };
            if !checked_shares.contains_key(&copy.id) {
                let out = provider
                    .block_on(
                        provider
                            .ec2(region)
                            .describe_image_attribute()
                            .image_id(&copy.id)
                            .attribute(ImageAttributeName::LaunchPermission)
                            .send(),
                    )
                    .map_err(|e| sdk::error("ec2:DescribeImageAttribute", region, &e))?;
                let accounts =
                    out.launch_permissions().iter().filter_map(|p| p.user_id().map(str::to_string)).collect();
                checked_shares.insert(copy.id.clone(), accounts);
            }
            if !checked_shares[&copy.id].contains(account) {
                problems
                    .push(format!("{} is no longer shared with account {account}", ami::image_ref(region, &copy.id)));
            }
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    Err(ProviderError::Drift { image: image.image_ref.clone(), reason: problems.join("; ") })
}

/// Deregistration protection for every AMI of an image that reached the last stage. An endpoint without the API
/// (moto) is said once, and the promotion goes on: protection guards against accidents, it is not the record.
pub fn protect(provider: &AwsProvider, image: &ImageRef) -> Result<(), ProviderError> {
    if PROTECTION_UNAVAILABLE.load(Ordering::Relaxed) {
        return Ok(());
    }
    for copy in AwsProvider::amis(image).into_iter().filter(|c| c.account.is_none()) {
        let call = provider
            .ec2(&copy.region)
            .enable_image_deregistration_protection()
            .image_id(&copy.id)
            .with_cooldown(false)
            .customize()
            // One try: an endpoint that lacks the API answers 500 every time.
            .config_override(
                aws_sdk_ec2::config::Builder::default().retry_config(aws_config::retry::RetryConfig::disabled()),
            )
            .send();
        match provider.block_on(call) {
            Ok(_) => {}
            Err(err)
                if err.raw_response().is_some_and(|r| r.status().is_server_error() || r.status().as_u16() == 501) =>
            {
                PROTECTION_UNAVAILABLE.store(true, Ordering::Relaxed);
                tracing::warn!(
                    "this endpoint cannot protect images from deregistration (EnableImageDeregistrationProtection: {}); \
                     going on without it",
                    err.raw_response().map(|r| r.status().as_u16()).unwrap_or_default()
                );
                return Ok(());
            }
            Err(err) => return Err(sdk::error("ec2:EnableImageDeregistrationProtection", &copy.region, &err)),
        }
    }
    Ok(())
}
