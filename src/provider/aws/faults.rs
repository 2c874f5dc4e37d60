//! Fault injection for AWS calls below the SDK (tests only): `KILN_INJECT` entries starting with `aws.`.

use aws_smithy_runtime_api::client::http::SharedHttpClient;

/// The HTTP client kiln's AWS clients use when `KILN_INJECT` holds `aws.` rules; `None` otherwise.
pub fn http_client_from_env() -> Result<Option<SharedHttpClient>, String> {
    Ok(None)
}
