//! The AWS provider. The only module that names `aws_sdk_*` and `aws_config` types; so far it holds the S3 ledger
//! store (AMI bakes and deploys come next).

pub mod faults;
pub mod s3_store;
pub mod sdk;

use std::path::{Path, PathBuf};

use crate::config::pipeline::AwsPipeline;
use crate::digest::Digest;
use crate::ledger::{Ledger, StoreError};
use s3_store::{S3Settings, S3Store};

/// The local marker that says the probe passed for this bucket, prefix and endpoint.
const PROBED_MARKER: &str = "conditional-writes-checked";

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
