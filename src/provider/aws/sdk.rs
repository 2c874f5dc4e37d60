//! How kiln talks to AWS: one shared SDK configuration (credentials chain, region, profile, endpoint, retries with
//! backoff and jitter under a bounded total time), and AWS errors turned into messages that say what to do.

use std::time::Duration;

use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_config::{BehaviorVersion, Region, SdkConfig};
use aws_sdk_ec2::config::http::HttpResponse;
use aws_sdk_ec2::error::{ProvideErrorMetadata, SdkError};

use crate::provider::ProviderError;

/// Attempts per call and the backoff between them: throttling and 5xx are retried with jittered exponential
/// backoff (the SDK's standard mode); the whole call, retries included, is bounded by `OPERATION_TIMEOUT`.
pub const MAX_ATTEMPTS: u32 = 5;
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);
pub const OPERATION_TIMEOUT: Duration = Duration::from_secs(60);

pub fn retry_config() -> RetryConfig {
    RetryConfig::standard()
        .with_max_attempts(MAX_ATTEMPTS)
        .with_initial_backoff(INITIAL_BACKOFF)
        .with_max_backoff(MAX_BACKOFF)
}

pub fn timeout_config() -> TimeoutConfig {
    TimeoutConfig::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .operation_attempt_timeout(ATTEMPT_TIMEOUT)
        .operation_timeout(OPERATION_TIMEOUT)
        .build()
}

/// A current-thread runtime: the engine is synchronous, and each provider blocks on its calls at the trait boundary.
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// The shared configuration: the aws-config default chain (environment, profiles, SSO, IMDS) for credentials,
/// `region` and `profile` from the pipeline when set, `AWS_ENDPOINT_URL` honoured. With `KILN_INJECT` naming AWS
/// faults, calls go through the fault-injecting HTTP client (tests only).
pub fn load(
    runtime: &tokio::runtime::Runtime,
    region: Option<&str>,
    profile: Option<&str>,
) -> Result<SdkConfig, String> {
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).retry_config(retry_config()).timeout_config(timeout_config());
    if let Some(region) = region {
        loader = loader.region(Region::new(region.to_string()));
    }
    if let Some(profile) = profile {
        loader = loader.profile_name(profile);
    }
    if let Some(client) = super::faults::http_client_from_env()? {
        loader = loader.http_client(client);
    }
    let sdk = runtime.block_on(loader.load());
    if sdk.region().is_none() {
        return Err("no AWS region: set `[aws] region` in the pipeline, or AWS_REGION in the environment".into());
    }
    Ok(sdk)
}

/// What a failed call means, for a person: the operation and region, AWS's code and message, and the permission
/// or setting to fix where the code says which.
pub fn error<E>(operation: &str, region: &str, err: &SdkError<E, HttpResponse>) -> ProviderError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
{
    let message = match err {
        SdkError::ServiceError(service) => {
            let code = service.err().code().unwrap_or("unknown");
            let text = service.err().message().unwrap_or("");
            match code {
                "UnauthorizedOperation" | "AccessDenied" | "AccessDeniedException" => format!(
                    "{operation} in {region} was denied ({code}): kiln needs the permission {} (docs/aws.md lists \
                     the policy): {text}",
                    permission_of(operation)
                ),
                "AuthFailure"
                | "InvalidClientTokenId"
                | "UnrecognizedClientException"
                | "ExpiredToken"
                | "InvalidAccessKeyId"
                | "SignatureDoesNotMatch" => {
                    format!("AWS rejected the credentials for {operation} in {region} ({code}): {text}")
                }
                _ => format!("{operation} in {region} failed ({code}): {text}"),
            }
        }
        SdkError::DispatchFailure(failure) if failure.is_io() || failure.is_timeout() => {
            format!("cannot reach AWS for {operation} in {region}{}: {}", endpoint_note(), root_cause(err))
        }
        SdkError::TimeoutError(_) => format!(
            "{operation} in {region} got no answer in time ({MAX_ATTEMPTS} attempts within {OPERATION_TIMEOUT:?}){}",
            endpoint_note()
        ),
        _ => {
            let detail = causes(err);
            if detail.contains("credentials") {
                format!(
                    "no usable AWS credentials for {operation} in {region} (kiln looks in the environment, the shared \
                     config and credentials files, SSO and instance metadata): {detail}"
                )
            } else {
                format!("{operation} in {region} failed: {detail}")
            }
        }
    };
    ProviderError::Other { provider: "aws", message }
}

/// AWS's error code of a failed call, when AWS answered.
pub fn code_of<E: ProvideErrorMetadata>(err: &SdkError<E, HttpResponse>) -> Option<&str> {
    match err {
        SdkError::ServiceError(service) => service.err().code(),
        _ => None,
    }
}

/// `ec2:RunInstances` for `RunInstances`: the IAM action of an operation, by the service prefix kiln uses.
fn permission_of(operation: &str) -> String {
    match operation.split_once(':') {
        Some(_) => operation.to_string(),
        None => format!("ec2:{operation}"),
    }
}

fn endpoint_note() -> String {
    match std::env::var("AWS_ENDPOINT_URL") {
        Ok(url) if !url.is_empty() => format!(" (AWS_ENDPOINT_URL={url})"),
        _ => String::new(),
    }
}

/// An error and its sources as one line, each message once (the SDK's wrappers often repeat their source's).
pub fn causes(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(err) = next {
        let text = err.to_string();
        if !parts.iter().any(|part| part.contains(&text)) {
            parts.push(text);
        }
        next = err.source();
    }
    parts.join(": ")
}

/// The innermost error: for a failed connection, the operating system's reason.
pub fn root_cause(err: &(dyn std::error::Error + 'static)) -> String {
    let mut err = err;
    while let Some(source) = err.source() {
        err = source;
    }
    err.to_string()
}
