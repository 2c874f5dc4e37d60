//! Baking an AMI: resolve the base into kiln.lock, adopt an AMI that already carries the recipe key, else stage the
//! recipe's files in S3 by content hash, launch a locked-down builder (IMDSv2 only, encrypted volumes, no key pair,
//! no inbound rule), provision it through SSM Run Command, create the image, tag it with its digest, and always
//! terminate the builder.

use std::time::{Duration, Instant};

use aws_sdk_ec2::types::{
    BlockDeviceMapping, EbsBlockDevice, HttpTokensState, IamInstanceProfileSpecification, Image,
    InstanceMetadataEndpointState, InstanceMetadataOptionsRequest, InstanceType, ResourceType, TagSpecification,
    VolumeType,
};
use aws_sdk_ssm::types::CommandInvocationStatus;

use super::ami::{self, Manifest, TAG_DIGEST, TAG_PIPELINE, TAG_RECIPE, TAG_RECIPE_KEY, TAG_ROLE};
use super::base::{self, LockedBase};
use super::{sdk, AwsProvider};
use crate::config::{Provision, Recipe};
use crate::digest::Digest;
use crate::provider::{BakeJob, ImageCopy, ImageRef, ProviderError};

const DEFAULT_INSTANCE_TYPE: &str = "t3.small";
const DEFAULT_VOLUME_GIB: i32 = 8;
/// The security group builders run in: no inbound rule at all (SSM needs only outbound), made once per VPC.
pub const BUILDER_SECURITY_GROUP: &str = "kiln-builder";
/// How long a builder may take to register with SSM before kiln gives up on it.
const SSM_REGISTRATION_TIMEOUT: Duration = Duration::from_secs(600);
/// Polls start fast (moto and small images answer at once) and back off to a pace AWS does not throttle.
const FIRST_POLL: Duration = Duration::from_millis(200);
const MAX_POLL: Duration = Duration::from_secs(15);
/// Printed by the builder script before each step, so a failure's output names its step.
const STEP_MARKER: &str = "::kiln-step ";

fn invalid(message: String) -> ProviderError {
    ProviderError::Invalid { provider: "aws", message }
}

fn other(message: String) -> ProviderError {
    ProviderError::Other { provider: "aws", message }
}

/// The recipe's [aws] settings and its resolved base: everything of the AWS build that can change the image, for
/// the recipe key. Reads kiln.lock only; `prepare` has resolved the base before any key is computed.
pub fn build_settings(provider: &AwsProvider, recipe: &Recipe) -> Result<serde_json::Value, ProviderError> {
    let aws = recipe.aws.as_ref();
    let base_ami = if recipe.parent.is_none() {
        let lock = base::load(&provider.repo_root)?;
        let Some(locked) = lock.find(recipe, &provider.home) else {
            return Err(match base::source_of(recipe) {
                None => invalid(format!(
                    "recipe `{}` is the root of its chain and needs a base on AWS: `[aws] base = {{ owner, name }}` \
                     or `base-ami = \"ami-…\"` in {}",
                    recipe.name, recipe.file.relative
                )),
                Some(source) => invalid(format!(
                    "the base of recipe `{}` ({source}) is not resolved in kiln.lock for {} yet; `kiln bake` \
                     resolves it",
                    recipe.name, provider.home
                )),
            });
        };
        Some(locked.ami.clone())
    } else {
        None
    };
    Ok(serde_json::json!({
        "region": provider.home,
        "base-ami": base_ami,
        "instance-type": aws.and_then(|a| a.instance_type.clone()).unwrap_or(DEFAULT_INSTANCE_TYPE.into()),
        "volume-size-gib": aws.and_then(|a| a.volume_size_gib).map_or(DEFAULT_VOLUME_GIB, |v| v as i32),
        "instance-profile": aws.and_then(|a| a.instance_profile.clone()),
        "builder": "ssm-run-command/1",
    }))
}

/// Resolves each root recipe's base into kiln.lock when the lock lacks it, or always with `update_base`. With
/// `plan`, only says which calls that would take.
pub fn prepare(
    provider: &AwsProvider,
    chain: &[Recipe],
    update_base: bool,
    plan: bool,
) -> Result<Vec<String>, ProviderError> {
    let mut lock = base::load(&provider.repo_root)?;
    let region = provider.home.clone();
    let mut calls = Vec::new();
    let mut changed = false;
    for recipe in chain.iter().filter(|r| r.parent.is_none()) {
        let Some(source) = base::source_of(recipe) else { continue };
        if lock.find(recipe, &region).is_some() && !update_base {
            continue;
        }
        let aws = recipe.aws.as_ref().expect("source_of found an [aws] section");
        if plan {
            calls.push(match &aws.base {
                Some(b) => format!(
                    "ec2:DescribeImages Owners=[{}] Filters=[name={}, state=available] in {region}: resolve the base \
                     of `{}` to the newest match, and write kiln.lock",
                    b.owner, b.name, recipe.name
                ),
                None => format!(
                    "ec2:DescribeImages ImageIds=[{source}] in {region}: check the base of `{}` exists, and write \
                     kiln.lock",
                    recipe.name
                ),
            });
            continue;
        }
        let ec2 = provider.ec2(&region);
        let found: Option<Image> = match &aws.base {
            Some(b) => {
                let call = ec2
                    .describe_images()
                    .owners(&b.owner)
                    .filters(ami::filter("name", &b.name))
                    .filters(ami::filter("state", "available"))
                    .send();
                let images = provider
                    .block_on(call)
                    .map_err(|e| sdk::error("ec2:DescribeImages", &region, &e))?
                    .images()
                    .to_vec();
                // ISO 8601 creation dates sort as strings; names break a tie (they usually carry a date too).
                images.into_iter().max_by(|a, b| (a.creation_date(), a.name()).cmp(&(b.creation_date(), b.name())))
            }
            None => provider.describe_images(&region, std::slice::from_ref(&source))?.into_iter().next(),
        };
        let Some(image) = found.filter(ami::is_available) else {
            return Err(invalid(match &aws.base {
                Some(b) => format!(
                    "no available AMI owned by {} matches the name `{}` in {region} (base of recipe `{}`)",
                    b.owner, b.name, recipe.name
                ),
                None => format!(
                    "the base AMI {source} of recipe `{}` does not exist in {region}, or is not available",
                    recipe.name
                ),
            }));
        };
        let id = image.image_id().unwrap_or_default().to_string();
        tracing::info!(recipe = %recipe.name, "base resolved to {id} ({}) in {region}", image.name().unwrap_or(""));
        lock.put(LockedBase {
            recipe: recipe.name.clone(),
            region: region.clone(),
            source,
            ami: id,
            name: image.name().unwrap_or_default().to_string(),
            resolved_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        });
        changed = true;
    }
    if changed {
        base::save(&provider.repo_root, &lock)?;
    }
    Ok(calls)
}

/// The calls a bake of `recipe` makes, in order.
pub fn plan(provider: &AwsProvider, recipe: &Recipe, recorded: Option<&ImageRef>) -> Vec<String> {
    let region = &provider.home;
    if let Some(image) = recorded {
        return vec![format!(
            "ec2:DescribeImages ImageIds=[{}] in {region}: the recorded image still exists (a cache hit launches \
             nothing)",
            image.image_ref
        )];
    }
    let bucket = provider.artifact_bucket.as_deref().unwrap_or("<artifact-bucket>");
    let mut calls = vec![
        format!(
            "ec2:DescribeImages Owners=[self] Filters=[tag:{TAG_RECIPE_KEY}=<key>] in {region}: adopt an AMI kiln \
             already made for this recipe key (then nothing below)"
        ),
        format!("ec2:DescribeImages ImageIds=[<base or parent AMI>] in {region}: the image to start from exists"),
    ];
    if recipe.provision.iter().any(|s| !matches!(s, Provision::Shell { .. })) {
        calls.push(format!(
            "s3:PutObject s3://{bucket}/kiln/inputs/sha256/<hash>.tar If-None-Match: * (stage the recipe's files)"
        ));
    }
    if provider.builder_subnet.is_some() {
        calls.push(format!("ec2:DescribeSubnets in {region}: the builder subnet's VPC"));
    }
    calls.extend([
        format!(
            "ec2:DescribeSecurityGroups group-name={BUILDER_SECURITY_GROUP} (ec2:CreateSecurityGroup once per VPC)"
        ),
        format!(
            "ec2:RunInstances in {region}: the builder, IMDSv2 required, encrypted volumes, no key pair, tagged \
             {TAG_ROLE}=builder"
        ),
        format!("ssm:SendCommand AWS-RunShellScript: {} provision step(s)", recipe.provision.len()),
        "ssm:GetCommandInvocation, polled until the command ends".into(),
        format!("ec2:CreateImage kiln-{}-<key12>, image and snapshots tagged", recipe.name),
        "ec2:DescribeImages, polled until the image is available".into(),
        format!("ec2:CreateTags {TAG_DIGEST}=<digest> on the image and its snapshots"),
        "ec2:TerminateInstances: the builder (also on failure and Ctrl-C)".into(),
    ]);
    calls
}

/// Builds one AMI, or adopts the one kiln already made for this recipe key.
pub fn bake(provider: &AwsProvider, job: &BakeJob) -> Result<ImageRef, ProviderError> {
    let region = provider.home.clone();
    if let Some(adopted) = adopt(provider, job)? {
        return Ok(adopted);
    }
    let start = start_image(provider, job)?;
    let device = start.root_device_name().unwrap_or("/dev/xvda").to_string();
    let inputs = stage_inputs(provider, job)?;
    let security_group = builder_security_group(provider)?;
    let builder = launch_builder(provider, job, &start, &device, &security_group)?;
    // From here the builder exists: whatever happens, it is terminated before bake returns.
    let outcome = provision_and_capture(provider, job, &builder, inputs.as_ref());
    let terminated = terminate(provider, &builder);
    let image = match (outcome, terminated) {
        (Ok(image), Ok(())) => image,
        (Ok(_), Err(err)) => return Err(err),
        // An interruption that could not terminate the builder must not claim it did.
        (Err(ProviderError::Interrupted { .. }), Err(err)) => {
            return Err(ProviderError::Interrupted {
                aftermath: format!(
                    "could not terminate the builder {builder} ({err}); `kiln gc` terminates it after an hour"
                ),
            })
        }
        (Err(err), _) => return Err(err),
    };
    tracing::info!(recipe = %job.recipe.name, "baked {} in {region}", image.image_ref);
    Ok(image)
}

fn key12(key: &Digest) -> String {
    key.hex()[..12].to_string()
}

fn common_tags(provider: &AwsProvider, job: &BakeJob) -> Vec<aws_sdk_ec2::types::Tag> {
    vec![
        ami::tag(TAG_PIPELINE, &provider.pipeline),
        ami::tag(TAG_RECIPE, &job.recipe.name),
        ami::tag(TAG_RECIPE_KEY, job.recipe_key.to_string()),
    ]
}

/// An AMI this account made for the recipe key already (a bake recorded in another ledger, or one that crashed
/// after CreateImage): finished and tagged, it is the image; still pending, it is waited for and tagged.
fn adopt(provider: &AwsProvider, job: &BakeJob) -> Result<Option<ImageRef>, ProviderError> {
    let region = &provider.home;
    let call = provider
        .ec2(region)
        .describe_images()
        .owners("self")
        .filters(ami::filter(&format!("tag:{TAG_RECIPE_KEY}"), job.recipe_key.to_string()))
        .send();
    let images = provider.block_on(call).map_err(|e| sdk::error("ec2:DescribeImages", region, &e))?.images().to_vec();
    let Some(found) = images.into_iter().find(|i| {
        matches!(i.state(), Some(aws_sdk_ec2::types::ImageState::Available | aws_sdk_ec2::types::ImageState::Pending))
    }) else {
        return Ok(None);
    };
    let id = found.image_id().unwrap_or_default().to_string();
    tracing::info!(recipe = %job.recipe.name, "adopting {id}: it already carries recipe key {}", job.recipe_key.short());
    let image = if ami::is_available(&found) { found } else { wait_available(provider, job, &id)? };
    finish_image(provider, job, &image).map(Some)
}

/// The AMI the builder starts from: the parent's image, or the locked base. Checked to exist first, since RunInstances
/// is not a good place to learn that a base was deregistered.
fn start_image(provider: &AwsProvider, job: &BakeJob) -> Result<Image, ProviderError> {
    let region = &provider.home;
    let (id, what) = match &job.parent {
        Some(parent) => {
            let copy = AwsProvider::ami_in(parent, region)
                .ok_or_else(|| invalid(format!("the parent image {} has no AMI in {region}", parent.image_ref)))?;
            (copy.id, format!("the parent image {}", parent.digest.short()))
        }
        None => {
            let lock = base::load(&provider.repo_root)?;
            let locked = lock.find(job.recipe, region).ok_or_else(|| {
                invalid(format!("the base of recipe `{}` is not resolved in kiln.lock", job.recipe.name))
            })?;
            (locked.ami.clone(), format!("the base AMI of recipe `{}` (kiln.lock)", job.recipe.name))
        }
    };
    let found = provider.describe_images(region, std::slice::from_ref(&id))?.into_iter().next();
    match found {
        Some(image) if ami::is_available(&image) => Ok(image),
        Some(image) => Err(invalid(format!(
            "{what}, {id}, is {} in {region}, not available",
            image.state().map_or("in an unknown state", |s| s.as_str())
        ))),
        None => Err(invalid(format!(
            "{what}, {id}, no longer exists in {region}; run `kiln bake --update-base` to resolve the base again"
        ))),
    }
}

/// The recipe's `copy` and `run` files as one deterministic tar, staged under its content hash. A PUT with
/// If-None-Match: * writes it only when absent, in one call, and names a missing bucket before anything is launched.
fn stage_inputs(provider: &AwsProvider, job: &BakeJob) -> Result<Option<StagedInputs>, ProviderError> {
    let wanted: Vec<&str> = job
        .recipe
        .provision
        .iter()
        .filter_map(|step| match step {
            Provision::Copy { source, .. } => Some(source.relative.as_str()),
            Provision::Run { script, .. } => Some(script.relative.as_str()),
            Provision::Shell { .. } => None,
        })
        .collect();
    if wanted.is_empty() {
        return Ok(None);
    }
    let Some(bucket) = provider.artifact_bucket.clone() else {
        return Err(invalid(format!(
            "recipe `{}` copies files to the builder, which needs `[aws] artifact-bucket` in the pipeline",
            job.recipe.name
        )));
    };
    let bytes = inputs_tar(&provider.repo_root, job, &wanted)
        .map_err(|e| other(format!("cannot pack the files of recipe `{}`: {e}", job.recipe.name)))?;
    let hash = Digest::of(&bytes);
    let key = format!("kiln/inputs/sha256/{}.tar", hash.hex());
    let s3 = provider.clients(&provider.home).s3;
    let put = s3
        .put_object()
        .bucket(&bucket)
        .key(&key)
        .if_none_match("*")
        .body(aws_sdk_s3::primitives::ByteStream::from(bytes))
        .send();
    match provider.block_on(put) {
        Ok(_) => {}
        // Already there: content-addressed, so it is the same bytes.
        Err(err) if err.raw_response().is_some_and(|r| matches!(r.status().as_u16(), 412 | 409)) => {}
        Err(err) => {
            let code = err.as_service_error().and_then(aws_sdk_s3::error::ProvideErrorMetadata::code);
            return Err(match code {
                Some("NoSuchBucket") => invalid(format!(
                    "the artifact bucket `{bucket}` does not exist in {} (`[aws] artifact-bucket`); create it, or \
                     name another",
                    provider.home
                )),
                Some("AccessDenied") => invalid(format!(
                    "access denied writing s3://{bucket}/{key}: kiln needs s3:PutObject on arn:aws:s3:::{bucket}/kiln/*"
                )),
                _ => sdk::error("s3:PutObject", &provider.home, &err),
            });
        }
    }
    // The builder fetches the files with a presigned URL, so its instance profile needs no S3 permission.
    let presign = aws_sdk_s3::presigning::PresigningConfig::expires_in(Duration::from_secs(3600))
        .map_err(|e| other(format!("cannot presign the staged files: {e}")))?;
    let request = provider
        .block_on(s3.get_object().bucket(&bucket).key(&key).presigned(presign))
        .map_err(|e| sdk::error("s3:GetObject (presign)", &provider.home, &e))?;
    Ok(Some(StagedInputs { url: request.uri().to_string(), sha256: hash.hex() }))
}

struct StagedInputs {
    url: String,
    sha256: String,
}

/// A tar of exactly the input files the recipe key covers at or below each wanted path (sorted, mtime 0, root
/// owned), so the same inputs always stage as the same object.
fn inputs_tar(root: &std::path::Path, job: &BakeJob, wanted: &[&str]) -> std::io::Result<Vec<u8>> {
    use crate::engine::recipe_key::FileInput;
    let mut builder = tar::Builder::new(Vec::new());
    builder.mode(tar::HeaderMode::Deterministic);
    for (path, input) in job.inputs {
        let included = wanted.iter().any(|w| path == w || path.starts_with(&format!("{w}/")));
        if !included {
            continue;
        }
        let mut header = tar::Header::new_gnu();
        header.set_mtime(0);
        header.set_uid(0);
        header.set_gid(0);
        match input {
            FileInput::File { executable, .. } => {
                let bytes = std::fs::read(root.join(path))?;
                header.set_entry_type(tar::EntryType::Regular);
                header.set_mode(if *executable { 0o755 } else { 0o644 });
                header.set_size(bytes.len() as u64);
                builder.append_data(&mut header, path, bytes.as_slice())?;
            }
            FileInput::Dir => {
                header.set_entry_type(tar::EntryType::Directory);
                header.set_mode(0o755);
                header.set_size(0);
                builder.append_data(&mut header, format!("{path}/"), std::io::empty())?;
            }
            FileInput::Symlink { target } => {
                header.set_entry_type(tar::EntryType::Symlink);
                header.set_mode(0o777);
                header.set_size(0);
                builder.append_link(&mut header, path, target)?;
            }
        }
    }
    builder.into_inner()
}

/// The security group builders run in: `kiln-builder`, with no inbound rule, in the builder subnet's VPC (or the
/// default VPC). Made once and reused, so a bake adds one lookup and leaves nothing to delete.
fn builder_security_group(provider: &AwsProvider) -> Result<String, ProviderError> {
    let region = &provider.home;
    let ec2 = provider.ec2(region);
    let vpc = match &provider.builder_subnet {
        Some(subnet) => {
            let out = provider
                .block_on(ec2.describe_subnets().subnet_ids(subnet).send())
                .map_err(|e| sdk::error("ec2:DescribeSubnets", region, &e))?;
            let vpc = out.subnets().first().and_then(|s| s.vpc_id()).map(str::to_string);
            Some(vpc.ok_or_else(|| invalid(format!("the builder subnet {subnet} does not exist in {region}")))?)
        }
        None => None,
    };
    let mut find = ec2.describe_security_groups().filters(ami::filter("group-name", BUILDER_SECURITY_GROUP));
    if let Some(vpc) = &vpc {
        find = find.filters(ami::filter("vpc-id", vpc));
    }
    let out = provider.block_on(find.send()).map_err(|e| sdk::error("ec2:DescribeSecurityGroups", region, &e))?;
    if let Some(id) = out.security_groups().first().and_then(|g| g.group_id()) {
        return Ok(id.to_string());
    }
    let mut create = ec2
        .create_security_group()
        .group_name(BUILDER_SECURITY_GROUP)
        .description("kiln bake builders: no inbound rules; SSM needs only outbound HTTPS")
        .tag_specifications(
            TagSpecification::builder()
                .resource_type(ResourceType::SecurityGroup)
                .tags(ami::tag(TAG_ROLE, "builder"))
                .build(),
        );
    if let Some(vpc) = &vpc {
        create = create.vpc_id(vpc);
    }
    let made = provider.block_on(create.send()).map_err(|e| sdk::error("ec2:CreateSecurityGroup", region, &e))?;
    made.group_id().map(str::to_string).ok_or_else(|| other("CreateSecurityGroup returned no group id".into()))
}

fn launch_builder(
    provider: &AwsProvider,
    job: &BakeJob,
    start: &Image,
    device: &str,
    security_group: &str,
) -> Result<String, ProviderError> {
    let region = &provider.home;
    let settings = build_settings(provider, job.recipe)?;
    let instance_type = settings["instance-type"].as_str().unwrap_or(DEFAULT_INSTANCE_TYPE).to_string();
    let volume = settings["volume-size-gib"].as_i64().unwrap_or(DEFAULT_VOLUME_GIB as i64) as i32;
    let mut tags = common_tags(provider, job);
    tags.push(ami::tag(TAG_ROLE, "builder"));
    tags.push(ami::tag("Name", format!("kiln-builder-{}-{}", job.recipe.name, key12(&job.recipe_key))));
    let spec =
        |kind: ResourceType| TagSpecification::builder().resource_type(kind).set_tags(Some(tags.clone())).build();
    let mut run = provider
        .ec2(region)
        .run_instances()
        .image_id(start.image_id().unwrap_or_default())
        .instance_type(InstanceType::from(instance_type.as_str()))
        .min_count(1)
        .max_count(1)
        .metadata_options(
            InstanceMetadataOptionsRequest::builder()
                .http_tokens(HttpTokensState::Required)
                .http_endpoint(InstanceMetadataEndpointState::Enabled)
                .build(),
        )
        .block_device_mappings(
            BlockDeviceMapping::builder()
                .device_name(device)
                .ebs(
                    EbsBlockDevice::builder()
                        .encrypted(true)
                        .volume_size(volume)
                        .volume_type(VolumeType::Gp3)
                        .delete_on_termination(true)
                        .build(),
                )
                .build(),
        )
        .security_group_ids(security_group)
        .tag_specifications(spec(ResourceType::Instance))
        .tag_specifications(spec(ResourceType::Volume));
    if let Some(profile) = settings["instance-profile"].as_str() {
        run = run.iam_instance_profile(IamInstanceProfileSpecification::builder().name(profile).build());
    }
    if let Some(subnet) = &provider.builder_subnet {
        run = run.subnet_id(subnet);
    }
    let out = provider.block_on(run.send()).map_err(|e| sdk::error("ec2:RunInstances", region, &e))?;
    let id = out.instances().first().and_then(|i| i.instance_id()).map(str::to_string);
    let id = id.ok_or_else(|| other("RunInstances returned no instance".into()))?;
    tracing::info!(recipe = %job.recipe.name, "builder {id} launched from {}", start.image_id().unwrap_or(""));
    Ok(id)
}

/// Runs the provision steps on the builder, then makes the image of it.
fn provision_and_capture(
    provider: &AwsProvider,
    job: &BakeJob,
    builder: &str,
    inputs: Option<&StagedInputs>,
) -> Result<ImageRef, ProviderError> {
    if !job.recipe.provision.is_empty() {
        provision(provider, job, builder, inputs)?;
    }
    interrupted(builder)?;
    let region = &provider.home;
    let mut tags = common_tags(provider, job);
    tags.push(ami::tag(TAG_ROLE, "image"));
    let spec =
        |kind: ResourceType| TagSpecification::builder().resource_type(kind).set_tags(Some(tags.clone())).build();
    let name = format!("kiln-{}-{}", job.recipe.name, key12(&job.recipe_key));
    let create = provider
        .ec2(region)
        .create_image()
        .instance_id(builder)
        .name(&name)
        .description(format!("kiln recipe {} ({})", job.recipe.name, job.recipe_key))
        // Snapshots are tagged with the digest once the image is available (`finish_image`): their ids are
        // known only then, and not every endpoint takes snapshot tags in CreateImage.
        .tag_specifications(spec(ResourceType::Image))
        .send();
    let out = provider.block_on(create).map_err(|e| sdk::error("ec2:CreateImage", region, &e))?;
    let id = out.image_id().map(str::to_string).ok_or_else(|| other("CreateImage returned no image id".into()))?;
    let image = wait_available(provider, job, &id)?;
    finish_image(provider, job, &image)
}

/// Computes the digest of an available AMI and tags the AMI and its snapshots with it (and the snapshots with
/// everything else the image carries).
fn finish_image(provider: &AwsProvider, job: &BakeJob, image: &Image) -> Result<ImageRef, ProviderError> {
    let region = &provider.home;
    let manifest = Manifest::of(image, region, job.recipe_key);
    let digest = manifest.digest();
    let tagged = ami::tags_of(image).get(TAG_DIGEST).cloned();
    if tagged.as_deref() != Some(digest.to_string().as_str()) {
        let mut resources = vec![manifest.image_id.clone()];
        resources.extend(manifest.snapshots());
        let mut tags = common_tags(provider, job);
        tags.push(ami::tag(TAG_ROLE, "image"));
        tags.push(ami::tag(TAG_DIGEST, digest.to_string()));
        let call = provider.ec2(region).create_tags().set_resources(Some(resources)).set_tags(Some(tags)).send();
        provider.block_on(call).map_err(|e| sdk::error("ec2:CreateTags", region, &e))?;
    }
    let copy = ImageCopy {
        region: region.clone(),
        account: None,
        id: manifest.image_id.clone(),
        snapshots: manifest.snapshots(),
    };
    Ok(ImageRef { digest, image_ref: ami::image_ref(region, &manifest.image_id), copies: vec![copy] })
}

fn wait_available(provider: &AwsProvider, job: &BakeJob, id: &str) -> Result<Image, ProviderError> {
    job.progress.begin(&format!("waiting for {id} to become available"), None);
    let result = provider
        .wait_image_available(&provider.home, id, &mut |waited| job.progress.update(waited.as_secs(), "pending"));
    job.progress.end(if result.is_ok() { "available" } else { "failed" });
    result
}

/// Fails once Ctrl-C arrived; `bake` terminates the builder on the way out, whatever the error.
fn interrupted(builder: &str) -> Result<(), ProviderError> {
    if crate::process::interrupted() {
        return Err(ProviderError::Interrupted { aftermath: format!("terminated the builder {builder}") });
    }
    Ok(())
}

fn terminate(provider: &AwsProvider, builder: &str) -> Result<(), ProviderError> {
    let region = &provider.home;
    let call = provider.ec2(region).terminate_instances().instance_ids(builder).send();
    match provider.block_on(call) {
        Ok(_) => {
            tracing::info!("builder {builder} terminated");
            Ok(())
        }
        Err(err) => {
            let err = sdk::error("ec2:TerminateInstances", region, &err);
            tracing::error!(
                "the builder {builder} was not terminated ({err}); `kiln gc` terminates builders older than an hour"
            );
            Err(err)
        }
    }
}

/// The script SSM runs on the builder: fetch and check the staged files, then each step in order, each announced
/// by a marker so a failure's output names its step, each under its own timeout.
pub fn builder_script(recipe: &Recipe, inputs: Option<(&str, &str)>) -> String {
    let mut script = String::from("set -eu\nexport KILN_ROOT=/\nkiln_work=$(mktemp -d /var/tmp/kiln.XXXXXX)\n");
    if let Some((url, sha256)) = inputs {
        // The hash is hex and the work directory a mktemp path: neither needs quoting beyond the double quotes.
        script.push_str(&format!(
            "if command -v curl >/dev/null 2>&1; then curl -fsSL -o \"$kiln_work/inputs.tar\" {url}; \
             else wget -q -O \"$kiln_work/inputs.tar\" {url}; fi\n\
             echo \"{sha256}  $kiln_work/inputs.tar\" | sha256sum -c - >/dev/null\n\
             mkdir \"$kiln_work/in\" && tar -xf \"$kiln_work/inputs.tar\" -C \"$kiln_work/in\"\n",
            url = quote(url),
        ));
    }
    for (n, step) in recipe.provision.iter().enumerate() {
        script.push_str(&format!("echo '{STEP_MARKER}{}::'\ncd /\n", n + 1));
        match step {
            Provision::Copy { source, to } => {
                let from = format!("\"$kiln_work/in/\"{}", quote(&source.relative));
                script.push_str(&format!(
                    "if [ -d {from} ]; then mkdir -p {to} && cp -a {from}/. {to}/; \
                     else mkdir -p \"$(dirname {to})\" && cp -a {from} {to}; fi\n",
                    to = quote(to)
                ));
            }
            Provision::Run { script: file, timeout_secs } => {
                script.push_str(&format!("timeout {timeout_secs} sh \"$kiln_work/in/\"{}\n", quote(&file.relative)));
            }
            Provision::Shell { command, timeout_secs } => {
                script.push_str(&format!("timeout {timeout_secs} sh -c {}\n", quote(command)));
            }
        }
    }
    script.push_str("echo '::kiln-done::'\nrm -rf \"$kiln_work\"\n");
    script
}

/// `text` as one single-quoted shell word.
fn quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', "'\\''"))
}

/// The step a failed command's output stopped in: the last marker printed (1-based), else 0 (fetching the files).
pub fn failed_step(output: &str) -> usize {
    output.lines().rev().find_map(|line| line.strip_prefix(STEP_MARKER)?.strip_suffix("::")?.parse().ok()).unwrap_or(0)
}

fn provision(
    provider: &AwsProvider,
    job: &BakeJob,
    builder: &str,
    inputs: Option<&StagedInputs>,
) -> Result<(), ProviderError> {
    let region = &provider.home;
    let ssm = provider.clients(region).ssm;
    let script = builder_script(job.recipe, inputs.map(|i| (i.url.as_str(), i.sha256.as_str())));
    let budget: u64 = job
        .recipe
        .provision
        .iter()
        .map(|s| match s {
            Provision::Run { timeout_secs, .. } | Provision::Shell { timeout_secs, .. } => *timeout_secs,
            Provision::Copy { .. } => 60,
        })
        .sum::<u64>()
        + 300;
    // A new instance takes a minute or two to register with SSM; until then SendCommand answers
    // InvalidInstanceId, which is a wait, not a failure.
    let started = Instant::now();
    let mut pause = FIRST_POLL;
    job.progress.begin(&format!("waiting for builder {builder} to reach SSM"), None);
    let command_id = loop {
        interrupted(builder)?;
        let send = ssm
            .send_command()
            .instance_ids(builder)
            .document_name("AWS-RunShellScript")
            .comment(format!("kiln bake {}", job.recipe.name))
            .parameters("commands", vec![script.clone()])
            .parameters("executionTimeout", vec![budget.to_string()])
            .send();
        match provider.block_on(send) {
            Ok(out) => {
                break out
                    .command()
                    .and_then(|c| c.command_id())
                    .map(str::to_string)
                    .ok_or_else(|| other("SendCommand returned no command id".into()))?
            }
            Err(err)
                if sdk::code_of(&err) == Some("InvalidInstanceId") && started.elapsed() < SSM_REGISTRATION_TIMEOUT =>
            {
                job.progress.update(started.elapsed().as_secs(), "not registered yet");
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_POLL);
            }
            Err(err) => {
                job.progress.end("failed");
                return Err(sdk::error("ssm:SendCommand", region, &err));
            }
        }
    };
    job.progress.end("registered");
    let steps = job.recipe.provision.len() as u64;
    job.progress.begin(&format!("provisioning `{}` on {builder}", job.recipe.name), Some(steps));
    let started = Instant::now();
    let mut pause = FIRST_POLL;
    let result = loop {
        if let Err(err) = interrupted(builder) {
            break Err(err);
        }
        let get = ssm.get_command_invocation().command_id(&command_id).instance_id(builder).send();
        let out = match provider.block_on(get) {
            Ok(out) => out,
            // Right after SendCommand the invocation may not exist yet.
            Err(err) if sdk::code_of(&err) == Some("InvocationDoesNotExist") => {
                std::thread::sleep(pause);
                pause = (pause * 2).min(MAX_POLL);
                continue;
            }
            Err(err) => break Err(sdk::error("ssm:GetCommandInvocation", region, &err)),
        };
        let stdout = out.standard_output_content().unwrap_or_default();
        let status = out.status().cloned();
        match status {
            Some(CommandInvocationStatus::Success) => break Ok(()),
            Some(
                status @ (CommandInvocationStatus::Failed
                | CommandInvocationStatus::TimedOut
                | CommandInvocationStatus::Cancelled
                | CommandInvocationStatus::Cancelling),
            ) => {
                let step = failed_step(stdout);
                let command = match step.checked_sub(1).and_then(|i| job.recipe.provision.get(i)) {
                    Some(step) => describe(step),
                    None => "fetch the staged files".into(),
                };
                let stderr = out.standard_error_content().unwrap_or_default();
                let tail: String = format!("{stdout}{stderr}");
                let tail =
                    tail.lines().rev().take(20).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n");
                break Err(ProviderError::Provision {
                    recipe: job.recipe.name.clone(),
                    step,
                    command,
                    reason: format!(
                        "SSM Run Command on {builder} ended {} (exit code {})",
                        status.as_str(),
                        out.response_code()
                    ),
                    output_tail: tail,
                });
            }
            _ => {}
        }
        if started.elapsed() > Duration::from_secs(budget) {
            break Err(other(format!("provisioning on {builder} did not finish within {budget} s")));
        }
        job.progress.update(failed_step(stdout) as u64, "running");
        std::thread::sleep(pause);
        pause = (pause * 2).min(MAX_POLL);
    };
    job.progress.end(if result.is_ok() { "provisioned" } else { "failed" });
    result
}

fn describe(step: &Provision) -> String {
    match step {
        Provision::Copy { source, to } => format!("copy {} to {to}", source.relative),
        Provision::Run { script, .. } => format!("run {}", script.relative),
        Provision::Shell { command, .. } => format!("shell {command}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failed_step_is_the_last_marker_printed() {
        assert_eq!(failed_step("fetching\n"), 0);
        assert_eq!(failed_step("::kiln-step 1::\nok\n::kiln-step 2::\nboom\n"), 2);
        assert_eq!(failed_step("::kiln-step 1::\n::kiln-step x::\n"), 1);
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(quote("it's"), "'it'\\''s'");
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!("printf %s {}", quote("a 'b' $c")))
            .output()
            .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "a 'b' $c");
    }
}
