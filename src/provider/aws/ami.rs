//! AMIs as kiln sees them: the canonical manifest whose digest names an image, the `kiln:*` tags, and the checks
//! that a recorded copy is still what was recorded.

use std::collections::BTreeMap;

use aws_sdk_ec2::types::{Filter, Image, ImageState, Tag};
use serde::Serialize;

use crate::digest::Digest;
use crate::provider::ImageCopy;

pub const TAG_PIPELINE: &str = "kiln:pipeline";
pub const TAG_RECIPE: &str = "kiln:recipe";
pub const TAG_RECIPE_KEY: &str = "kiln:recipe-key";
pub const TAG_DIGEST: &str = "kiln:digest";
pub const TAG_ROLE: &str = "kiln:role";
/// The manifest format: part of every digest, so a change of what the manifest holds changes every digest.
const MANIFEST_FORMAT: &str = "kiln-ami-manifest/1";

/// What names an AMI image: everything about the copy kiln baked that an instance can observe, plus the recipe key.
/// AWS does not expose the bytes of a snapshot (the EBS direct APIs would, and moto lacks them), so the snapshot ids
/// stand for them: a snapshot is immutable, and a new one gets a new id.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub struct Manifest {
    pub format: &'static str,
    pub recipe_key: Digest,
    pub region: String,
    pub image_id: String,
    pub architecture: Option<String>,
    pub virtualization_type: Option<String>,
    pub root_device_name: Option<String>,
    pub ena_support: Option<bool>,
    pub boot_mode: Option<String>,
    pub block_devices: Vec<BlockDevice>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDevice {
    pub device_name: String,
    pub snapshot_id: Option<String>,
    pub volume_size_gib: Option<i32>,
    pub volume_type: Option<String>,
    pub encrypted: Option<bool>,
}

impl Manifest {
    pub fn of(image: &Image, region: &str, recipe_key: Digest) -> Manifest {
        let mut block_devices: Vec<BlockDevice> = image
            .block_device_mappings()
            .iter()
            .map(|mapping| {
                let ebs = mapping.ebs();
                BlockDevice {
                    device_name: mapping.device_name().unwrap_or_default().to_string(),
                    snapshot_id: ebs.and_then(|e| e.snapshot_id()).map(str::to_string),
                    volume_size_gib: ebs.and_then(|e| e.volume_size()),
                    volume_type: ebs.and_then(|e| e.volume_type()).map(|t| t.as_str().to_string()),
                    encrypted: ebs.and_then(|e| e.encrypted()),
                }
            })
            .collect();
        block_devices.sort();
        Manifest {
            format: MANIFEST_FORMAT,
            recipe_key,
            region: region.to_string(),
            image_id: image.image_id().unwrap_or_default().to_string(),
            architecture: image.architecture().map(|a| a.as_str().to_string()),
            virtualization_type: image.virtualization_type().map(|v| v.as_str().to_string()),
            root_device_name: image.root_device_name().map(str::to_string),
            ena_support: image.ena_support(),
            boot_mode: image.boot_mode().map(|b| b.as_str().to_string()),
            block_devices,
        }
    }

    pub fn digest(&self) -> Digest {
        // serde_json writes struct fields in declaration order and vectors are sorted: one encoding per manifest.
        let bytes = serde_json::to_vec(self).unwrap_or_default();
        Digest::of(&bytes)
    }

    pub fn snapshots(&self) -> Vec<String> {
        self.block_devices.iter().filter_map(|d| d.snapshot_id.clone()).collect()
    }
}

/// `region/ami-…`: how kiln names an AMI in messages and in `image_ref`.
pub fn image_ref(region: &str, image_id: &str) -> String {
    format!("{region}/{image_id}")
}

/// The region and AMI id of an `image_ref`.
pub fn parse_image_ref(image_ref: &str) -> Option<(&str, &str)> {
    image_ref.split_once('/').filter(|(region, id)| !region.is_empty() && id.starts_with("ami-"))
}

pub fn tags_of(image: &Image) -> BTreeMap<String, String> {
    image
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or_default().to_string())))
        .collect()
}

pub fn tag(key: &str, value: impl Into<String>) -> Tag {
    Tag::builder().key(key).value(value).build()
}

pub fn filter(name: &str, value: impl Into<String>) -> Filter {
    Filter::builder().name(name).values(value).build()
}

pub fn is_available(image: &Image) -> bool {
    image.state() == Some(&ImageState::Available)
}

/// Why a recorded copy is no longer what the ledger says, or `None` when it is: the AMI exists and is available,
/// its snapshots are the recorded ones, and its `kiln:digest` tag names `digest`.
pub fn copy_problem(copy: &ImageCopy, found: Option<&Image>, digest: &Digest) -> Option<String> {
    let at = image_ref(&copy.region, &copy.id);
    let Some(image) = found else {
        return Some(format!("{at} no longer exists (deregistered, or never copied there)"));
    };
    if !is_available(image) {
        let state = image.state().map_or("unknown", |s| s.as_str());
        return Some(format!("{at} is {state}, not available"));
    }
    let mut snapshots: Vec<String> = image
        .block_device_mappings()
        .iter()
        .filter_map(|m| m.ebs().and_then(|e| e.snapshot_id()).map(str::to_string))
        .collect();
    snapshots.sort();
    let mut recorded = copy.snapshots.clone();
    recorded.sort();
    if !recorded.is_empty() && snapshots != recorded {
        return Some(format!(
            "{at} is backed by snapshots {} but the ledger recorded {}",
            snapshots.join(", "),
            recorded.join(", ")
        ));
    }
    match tags_of(image).get(TAG_DIGEST) {
        Some(tagged) if tagged == &digest.to_string() => None,
        Some(tagged) => Some(format!("{at} is tagged {TAG_DIGEST}={tagged}, not {digest}")),
        None => Some(format!("{at} has no {TAG_DIGEST} tag; kiln did not make it, or it was retagged")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{BlockDeviceMapping, EbsBlockDevice};

    fn image(snapshot: &str, digest_tag: Option<&str>) -> Image {
        let mut builder = Image::builder()
            .image_id("ami-0123456789abcdef0")
            .state(ImageState::Available)
            .root_device_name("/dev/xvda")
            .block_device_mappings(
                BlockDeviceMapping::builder()
                    .device_name("/dev/xvda")
                    .ebs(EbsBlockDevice::builder().snapshot_id(snapshot).volume_size(8).encrypted(true).build())
                    .build(),
            );
        if let Some(d) = digest_tag {
            builder = builder.tags(tag(TAG_DIGEST, d));
        }
        builder.build()
    }

    #[test]
    fn the_digest_follows_the_snapshots_and_the_recipe_key_and_nothing_else() {
        let key = Digest::of(b"key");
        let a = Manifest::of(&image("snap-1", None), "us-east-1", key);
        assert_eq!(
            a.digest(),
            Manifest::of(&image("snap-1", Some("x")), "us-east-1", key).digest(),
            "tags are not content"
        );
        assert_ne!(a.digest(), Manifest::of(&image("snap-2", None), "us-east-1", key).digest());
        assert_ne!(a.digest(), Manifest::of(&image("snap-1", None), "us-east-1", Digest::of(b"other")).digest());
    }

    #[test]
    fn a_copy_is_judged_by_existence_state_snapshots_and_digest_tag() {
        let digest = Digest::of(b"d");
        let copy = ImageCopy {
            region: "eu-west-1".into(),
            account: None,
            id: "ami-0123456789abcdef0".into(),
            snapshots: vec!["snap-1".into()],
        };
        assert_eq!(copy_problem(&copy, Some(&image("snap-1", Some(&digest.to_string()))), &digest), None);
        let cases = [
            (None, "no longer exists"),
            (Some(image("snap-2", Some(&digest.to_string()))), "backed by snapshots snap-2"),
            (Some(image("snap-1", Some("sha256:00"))), "is tagged kiln:digest=sha256:00"),
            (Some(image("snap-1", None)), "has no kiln:digest tag"),
        ];
        for (found, expected) in cases {
            let problem = copy_problem(&copy, found.as_ref(), &digest).unwrap_or_default();
            assert!(problem.contains(expected), "{problem} should say {expected}");
            assert!(problem.contains("eu-west-1/ami-0123456789abcdef0"), "{problem}");
        }
    }
}
