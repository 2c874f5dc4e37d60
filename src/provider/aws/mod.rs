//! The AWS provider: AMIs baked through EC2 and SSM Run Command, distributed by CopyImage and launch permissions,
//! deployed as Auto Scaling groups behind a target group, and the S3 ledger store. The only module that names `aws_sdk_*` and `aws_config` types. The engine is
//! synchronous: the provider owns a current-thread tokio runtime and blocks on each call at the trait boundary.

pub mod ami;
mod bake;
pub mod base;
mod distribute;
pub mod faults;
mod fleet;
mod gc;
mod plan;
pub mod s3_store;
pub mod sdk;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use aws_config::{Region, SdkConfig};

use crate::config::pipeline::AwsPipeline;
use crate::config::{Instance, Pipeline, Recipe};
use crate::digest::Digest;
use crate::ledger::{Ledger, StoreError};
use crate::provider::{BakeJob, ImageCopy, ImageProvider, ImageRef, ProviderError, Reproduction, RootFs, StageRef};
use s3_store::{S3Settings, S3Store};

/// The local marker that says the probe passed for this bucket, prefix and endpoint.
const PROBED_MARKER: &str = "conditional-writes-checked";

/// The clients of one region, made on first use.
#[derive(Clone)]
struct Clients {
    ec2: aws_sdk_ec2::Client,
    ssm: aws_sdk_ssm::Client,
    s3: aws_sdk_s3::Client,
    autoscaling: aws_sdk_autoscaling::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    cloudwatch: aws_sdk_cloudwatch::Client,
}

pub struct AwsProvider {
    runtime: tokio::runtime::Runtime,
    sdk: SdkConfig,
    /// The pipeline's region: where images are baked and where the artifact bucket is.
    home: String,
    pipeline: String,
    repo_root: PathBuf,
    artifact_bucket: Option<String>,
    builder_subnet: Option<String>,
    clients: Mutex<BTreeMap<String, Clients>>,
}

impl AwsProvider {
    /// Connects with the aws-config default chain and the pipeline's `[aws]` region and profile. Makes no call:
    /// credentials are looked for on the first request.
    pub fn connect(pipeline: &Pipeline, repo_root: &Path) -> Result<AwsProvider, ProviderError> {
        let aws = pipeline.aws.clone().unwrap_or(AwsPipeline {
            region: None,
            artifact_bucket: None,
            profile: None,
            builder_subnet: None,
        });
        let other = |message: String| ProviderError::Other { provider: "aws", message };
        let runtime = sdk::runtime().map_err(|e| other(format!("cannot start the AWS client runtime: {e}")))?;
        let sdk = sdk::load(&runtime, aws.region.as_deref(), aws.profile.as_deref()).map_err(other)?;
        let home = sdk.region().map(|r| r.to_string()).unwrap_or_default();
        Ok(AwsProvider {
            runtime,
            sdk,
            home,
            pipeline: pipeline.name.clone(),
            repo_root: repo_root.to_path_buf(),
            artifact_bucket: aws.artifact_bucket,
            builder_subnet: aws.builder_subnet,
            clients: Mutex::new(BTreeMap::new()),
        })
    }

    fn clients(&self, region: &str) -> Clients {
        let mut clients = self.clients.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        clients
            .entry(region.to_string())
            .or_insert_with(|| {
                let region = Region::new(region.to_string());
                let ec2 = aws_sdk_ec2::config::Builder::from(&self.sdk).region(region.clone()).build();
                let ssm = aws_sdk_ssm::config::Builder::from(&self.sdk).region(region.clone()).build();
                let mut s3 = aws_sdk_s3::config::Builder::from(&self.sdk).region(region.clone());
                if self.sdk.endpoint_url().is_some() {
                    // Local endpoints have no per-bucket hostnames.
                    s3 = s3.force_path_style(true);
                }
                let autoscaling = aws_sdk_autoscaling::config::Builder::from(&self.sdk).region(region.clone()).build();
                let elb =
                    aws_sdk_elasticloadbalancingv2::config::Builder::from(&self.sdk).region(region.clone()).build();
                let cloudwatch = aws_sdk_cloudwatch::config::Builder::from(&self.sdk).region(region).build();
                Clients {
                    ec2: aws_sdk_ec2::Client::from_conf(ec2),
                    ssm: aws_sdk_ssm::Client::from_conf(ssm),
                    s3: aws_sdk_s3::Client::from_conf(s3.build()),
                    autoscaling: aws_sdk_autoscaling::Client::from_conf(autoscaling),
                    elb: aws_sdk_elasticloadbalancingv2::Client::from_conf(elb),
                    cloudwatch: aws_sdk_cloudwatch::Client::from_conf(cloudwatch),
                }
            })
            .clone()
    }

    fn ec2(&self, region: &str) -> aws_sdk_ec2::Client {
        self.clients(region).ec2
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// Every AMI of `image` by region: its recorded copies, else the AMI its `image_ref` names.
    fn amis(image: &ImageRef) -> Vec<ImageCopy> {
        if !image.copies.is_empty() {
            return image.copies.clone();
        }
        match ami::parse_image_ref(&image.image_ref) {
            Some((region, id)) => {
                vec![ImageCopy { region: region.into(), account: None, id: id.into(), snapshots: Vec::new() }]
            }
            None => Vec::new(),
        }
    }

    /// The AMI in `region` that the image was baked as or copied to (not an account share).
    fn ami_in(image: &ImageRef, region: &str) -> Option<ImageCopy> {
        Self::amis(image).into_iter().find(|c| c.region == region && c.account.is_none())
    }

    /// Polls until the AMI `id` in `region` is available (CreateImage and CopyImage both end there), backing off
    /// from 200 ms to 15 s: fast for moto and small images, a pace AWS does not throttle for large ones. `pending`
    /// hears the time waited after each poll that found it pending; a failed image or an hour's wait is an error.
    fn wait_image_available(
        &self,
        region: &str,
        id: &str,
        pending: &mut dyn FnMut(std::time::Duration),
    ) -> Result<aws_sdk_ec2::types::Image, ProviderError> {
        use aws_sdk_ec2::types::ImageState;
        const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3600);
        const MAX_POLL: std::time::Duration = std::time::Duration::from_secs(15);
        let started = std::time::Instant::now();
        let mut pause = std::time::Duration::from_millis(200);
        loop {
            if let Some(image) = self.describe_images(region, &[id.to_string()])?.into_iter().next() {
                match image.state() {
                    Some(ImageState::Available) => return Ok(image),
                    Some(state @ (ImageState::Failed | ImageState::Error)) => {
                        let reason = image.state_reason().and_then(|r| r.message()).unwrap_or("");
                        return Err(ProviderError::Other {
                            provider: "aws",
                            message: format!("image {id} in {region} ended {}: {reason}", state.as_str()),
                        });
                    }
                    _ => {}
                }
            }
            if started.elapsed() > TIMEOUT {
                return Err(ProviderError::Other {
                    provider: "aws",
                    message: format!("image {id} in {region} was not available after {TIMEOUT:?}"),
                });
            }
            pending(started.elapsed());
            std::thread::sleep(pause);
            pause = (pause * 2).min(MAX_POLL);
        }
    }

    /// Describes the AMIs `ids` in `region`; an id AWS does not know is absent from the answer, not an error.
    fn describe_images(&self, region: &str, ids: &[String]) -> Result<Vec<aws_sdk_ec2::types::Image>, ProviderError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ec2 = self.ec2(region);
        let answer = self.block_on(ec2.describe_images().set_image_ids(Some(ids.to_vec())).send());
        match answer {
            Ok(out) => Ok(out.images().to_vec()),
            Err(err) if sdk::code_of(&err).is_some_and(|c| c.starts_with("InvalidAMIID")) => {
                // One unknown id fails the whole call: ask one by one so the known ones still answer.
                if ids.len() == 1 {
                    return Ok(Vec::new());
                }
                let mut found = Vec::new();
                for id in ids {
                    found.extend(self.describe_images(region, std::slice::from_ref(id))?);
                }
                Ok(found)
            }
            Err(err) => Err(sdk::error("ec2:DescribeImages", region, &err)),
        }
    }

    fn missing(image: &ImageRef, reason: impl Into<String>) -> ProviderError {
        ProviderError::MissingImage { provider: "aws", image: image.image_ref.clone(), reason: reason.into() }
    }
}

impl ImageProvider for AwsProvider {
    fn name(&self) -> &'static str {
        "aws"
    }

    fn build_settings(&self, recipe: &Recipe) -> Result<serde_json::Value, ProviderError> {
        bake::build_settings(self, recipe)
    }

    fn has_image(&self, image: &ImageRef) -> Result<bool, ProviderError> {
        let Some(copy) = Self::amis(image).into_iter().next() else {
            return Ok(false);
        };
        let found = self.describe_images(&copy.region, std::slice::from_ref(&copy.id))?;
        Ok(found.first().is_some_and(|found| ami::copy_problem(&copy, Some(found), &image.digest).is_none()))
    }

    fn bake(&self, job: &BakeJob) -> Result<ImageRef, ProviderError> {
        bake::bake(self, job)
    }

    fn check_reproducible(&self, _chain: &[(BakeJob, Digest)]) -> Result<Reproduction, ProviderError> {
        Err(ProviderError::Invalid {
            provider: "aws",
            message: "`kiln bake --check` rebuilds images away from the store, which the local provider can do; an \
                      AMI's digest names its snapshots, and a rebuild makes new ones, so it can never match"
                .into(),
        })
    }

    fn verify_image(&self, image: &ImageRef) -> Result<(), ProviderError> {
        distribute::verify(self, image)
    }

    fn delete_image(&self, image: &ImageRef) -> Result<(), ProviderError> {
        gc::delete_image(self, image)
    }

    fn collect_garbage(&self) -> Result<u64, ProviderError> {
        gc::sweep_builders(self)
    }

    fn image_labels(&self, image: &ImageRef) -> Result<BTreeMap<String, String>, ProviderError> {
        let copy = Self::amis(image).into_iter().next().ok_or_else(|| Self::missing(image, "no AMI recorded"))?;
        let found = self.describe_images(&copy.region, std::slice::from_ref(&copy.id))?;
        let found = found.first().ok_or_else(|| Self::missing(image, "the AMI no longer exists"))?;
        Ok(ami::tags_of(found))
    }

    fn instance_of(&self, _image: &ImageRef) -> Result<Option<Instance>, ProviderError> {
        // AMI tags hold 256 characters: the `baked` event is where the instance section lives.
        Ok(None)
    }

    fn distribute(
        &self,
        image: &ImageRef,
        regions: &[String],
        accounts: &[String],
    ) -> Result<Vec<ImageCopy>, ProviderError> {
        distribute::distribute(self, image, regions, accounts)
    }

    fn protect(&self, image: &ImageRef) -> Result<(), ProviderError> {
        distribute::protect(self, image)
    }

    fn publish_pointer(&self, stage: StageRef, image: &ImageRef) -> Result<String, ProviderError> {
        fleet::publish_pointer(self, stage, image)
    }

    fn pointer(&self, stage: StageRef) -> Result<Option<Digest>, ProviderError> {
        fleet::pointer(self, stage)
    }

    fn prepare_bake(&self, chain: &[Recipe], update_base: bool, plan: bool) -> Result<Vec<String>, ProviderError> {
        bake::prepare(self, chain, update_base, plan)
    }

    fn plan_bake(&self, recipe: &Recipe, recorded: Option<&ImageRef>) -> Vec<String> {
        bake::plan(self, recipe, recorded)
    }

    fn image_users(&self, image: &ImageRef) -> Result<Vec<String>, ProviderError> {
        gc::image_users(self, image)
    }

    fn plan_promote(&self, stage: StageRef, image: &ImageRef, protect: bool) -> Vec<String> {
        plan::promote(self, stage, image, protect)
    }

    fn root_fs(&self, _image: &ImageRef) -> Result<RootFs, ProviderError> {
        Ok(RootFs::NotAvailable {
            reason: "not available on AWS: snapshots are not readable (docs/aws.md, \"The image digest\")".into(),
        })
    }
}

/// Opens the ledger at `s3://bucket/prefix`, with `[aws]` settings from the pipeline when there is one, and its
/// view cache under `state_dir/cache/s3/`. The first open on this machine probes whether the store honours
/// conditional writes, and refuses one that does not before any event is written.
pub fn open_ledger(
    bucket: &str,
    prefix: &str,
    aws: Option<&AwsPipeline>,
    state_dir: &Path,
) -> Result<Ledger, StoreError> {
    let settings = S3Settings {
        bucket: bucket.to_string(),
        prefix: prefix.to_string(),
        region: aws.and_then(|a| a.region.clone()),
        profile: aws.and_then(|a| a.profile.clone()),
    };
    let cache_dir = cache_dir(state_dir, bucket, prefix)?;
    let store = S3Store::connect(&settings)?;
    ensure_conditional_writes(&store, &cache_dir)?;
    Ok(Ledger::new(Box::new(store), Some(cache_dir)))
}

/// `.kiln/cache/s3/<bucket>/<prefix-hash>/`: the prefix is hashed because it may hold `/` and anything else a
/// key may; the bucket is checked to be a bucket name so that it cannot climb out of the cache directory.
pub fn cache_dir(state_dir: &Path, bucket: &str, prefix: &str) -> Result<PathBuf, StoreError> {
    let valid = (3..=63).contains(&bucket.len())
        && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
        && bucket.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric());
    if !valid {
        return Err(StoreError::Backend {
            location: s3_store::location_of(bucket, prefix),
            message: format!(
                "`{bucket}` is not an S3 bucket name (3 to 63 lowercase letters, digits, dots and hyphens, starting \
                 with a letter or digit)"
            ),
        });
    }
    let prefix_hash = Digest::of(prefix.trim_matches('/').as_bytes()).hex();
    Ok(state_dir.join("cache").join("s3").join(bucket).join(&prefix_hash[..16]))
}

fn ensure_conditional_writes(store: &S3Store, cache_dir: &Path) -> Result<(), StoreError> {
    let marker = cache_dir.join(PROBED_MARKER);
    // Keyed by endpoint too: the same bucket name on another endpoint (a local test store, a proxy) is another
    // store, and may behave differently.
    let checked_for = format!("{}\n", store.endpoint());
    if std::fs::read_to_string(&marker).is_ok_and(|text| text == checked_for) {
        return Ok(());
    }
    if s3_store::ignores_conditional_writes(store)? {
        return Err(StoreError::Backend {
            location: crate::ledger::Store::location(store),
            message: format!(
                "{} ignores conditional writes: a second PUT of the same key with If-None-Match: * \
                 succeeded instead of failing with 412. Two writers could both record the same seq and fork the \
                 ledger, so kiln refuses this store and wrote no event. Use AWS S3, or a store that supports \
                 conditional writes",
                store.endpoint()
            ),
        });
    }
    // Best effort: without the marker the next command probes again, which costs two small PUTs.
    if let Err(err) = crate::fsutil::replace_file(&marker, checked_for.as_bytes()) {
        tracing::debug!(%err, path = %marker.display(), "could not save the conditional-write probe marker");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_view_cache_is_keyed_by_bucket_and_prefix() {
        let state = Path::new("/repo/.kiln");
        let a = cache_dir(state, "team-bucket", "kiln/prod").unwrap();
        assert!(a.starts_with("/repo/.kiln/cache/s3/team-bucket/"), "{}", a.display());
        assert_ne!(a, cache_dir(state, "team-bucket", "kiln/dev").unwrap());
        assert_ne!(a, cache_dir(state, "other-bucket", "kiln/prod").unwrap());
        assert_eq!(
            a,
            cache_dir(state, "team-bucket", "/kiln/prod/").unwrap(),
            "slashes around the prefix do not count"
        );
    }

    #[test]
    fn a_bucket_that_is_no_bucket_name_cannot_leave_the_cache() {
        for bad in ["..", "a", "Upper", "-leading", "a_b"] {
            let err = cache_dir(Path::new("/repo/.kiln"), bad, "p").unwrap_err().to_string();
            assert!(err.contains("is not an S3 bucket name"), "{bad}: {err}");
        }
    }
}
