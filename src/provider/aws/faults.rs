//! Fault injection below the AWS SDK (tests only): `KILN_INJECT` entries `aws.<Operation>[#n]=<fault>` make the
//! HTTP client answer as AWS does when it throttles or refuses, rewrite an SSM command's outcome, or stall, so that
//! the SDK's retries and error parsing, and kiln's messages, run for real against moto, which never fails.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use aws_smithy_http_client::tls::{self, rustls_provider::CryptoMode};
use aws_smithy_runtime_api::client::http::{
    http_client_fn, HttpClient, HttpConnector, HttpConnectorFuture, SharedHttpClient, SharedHttpConnector,
};
use aws_smithy_runtime_api::client::orchestrator::{HttpRequest, HttpResponse};
use aws_smithy_runtime_api::client::result::ConnectorError;
use aws_smithy_types::body::SdkBody;
use http_body_util::BodyExt;

use crate::provider::inject::INJECT_VAR;

/// Entries with this prefix are ours; `provider::inject` skips them and we skip the rest.
pub const PREFIX: &str = "aws.";
const MESSAGE: &str = "injected by KILN_INJECT";
/// The SSM statuses a `status:` fault may report (CommandInvocationStatus).
const STATUSES: &[&str] =
    &["Pending", "InProgress", "Delayed", "Success", "Cancelled", "TimedOut", "Failed", "Cancelling"];
/// The EC2 API version in every EC2 query request: EC2 answers errors in its own XML shape, other query services
/// (Auto Scaling, ELBv2, CloudWatch, STS) in the awsQuery one.
const EC2_VERSION: &str = "Version=2016-11-15";

/// What an `aws.` entry does to a matching request (docs/aws.md, "Injecting AWS faults").
#[derive(Debug, Clone, PartialEq)]
enum Fault {
    Throttle,
    Fail(String),
    Status { status: String, stdout: Option<String> },
    Hang(Duration),
}

#[derive(Debug)]
struct Rule {
    operation: String,
    nth: Option<u32>,
    fault: Fault,
}

/// The rules, and how many times each operation was sent through every connector of one client.
#[derive(Debug)]
struct Faults {
    rules: Vec<Rule>,
    counts: Mutex<BTreeMap<String, u32>>,
}

/// The HTTP client kiln's AWS clients use when `KILN_INJECT` holds `aws.` rules; `None` otherwise (production path
/// unchanged). Errors are spec errors, worded for the person who wrote the spec.
pub fn http_client_from_env() -> Result<Option<SharedHttpClient>, String> {
    // Every SDK configuration in the process shares one client, so that `#n` is the n-th call in this kiln.
    static FROM_ENV: OnceLock<Result<Option<SharedHttpClient>, String>> = OnceLock::new();
    FROM_ENV
        .get_or_init(|| match std::env::var(INJECT_VAR) {
            Ok(spec) => http_client(&spec).map_err(|e| format!("{INJECT_VAR}: {e}")),
            Err(_) => Ok(None),
        })
        .clone()
}

/// The SDK's default HTTPS client with `spec`'s `aws.` rules in front of it; `None` when there are none.
pub fn http_client(spec: &str) -> Result<Option<SharedHttpClient>, String> {
    let faults = Faults::parse(spec)?;
    if faults.rules.is_empty() {
        return Ok(None);
    }
    let default =
        aws_smithy_http_client::Builder::new().tls_provider(tls::Provider::Rustls(CryptoMode::AwsLc)).build_https();
    Ok(Some(wrap(default, Arc::new(faults))))
}

fn wrap(inner: SharedHttpClient, faults: Arc<Faults>) -> SharedHttpClient {
    http_client_fn(move |settings, components| {
        SharedHttpConnector::new(FaultyConnector {
            inner: inner.http_connector(settings, components),
            faults: faults.clone(),
        })
    })
}

impl Faults {
    fn parse(spec: &str) -> Result<Faults, String> {
        let mut rules = Vec::new();
        for entry in spec.split(',').map(str::trim).filter(|e| e.starts_with(PREFIX)) {
            let (target, fault) = entry.split_once('=').ok_or_else(|| {
                format!("`{entry}`: write aws.<Operation>[#n]=fault, e.g. aws.DescribeImages#1=throttle")
            })?;
            let target = target[PREFIX.len()..].trim();
            let (operation, nth) = match target.split_once('#') {
                Some((operation, n)) => match n.parse::<u32>() {
                    Ok(n) if n > 0 => (operation, Some(n)),
                    _ => return Err(format!("`{entry}`: `#{n}` is not a call number (1 is the first call)")),
                },
                None => (target, None),
            };
            if !operation.starts_with(|c: char| c.is_ascii_uppercase())
                || !operation.chars().all(|c| c.is_ascii_alphanumeric())
            {
                return Err(format!(
                    "`{entry}`: `{operation}` is not an AWS operation; name it as the API reference does, \
                     e.g. aws.CreateImage"
                ));
            }
            let fault = fault.trim();
            let (kind, argument) = fault.split_once(':').map_or((fault, None), |(k, a)| (k, Some(a)));
            let fault = parse_fault(operation, kind, argument).map_err(|e| format!("`{entry}`: {e}"))?;
            rules.push(Rule { operation: operation.to_string(), nth, fault });
        }
        Ok(Faults { rules, counts: Mutex::default() })
    }

    /// Counts a call of `operation`; the fault of the first rule that matches it, if any.
    fn next(&self, operation: &str) -> Option<Fault> {
        let n = {
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            let n = counts.entry(operation.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        let rule = self.rules.iter().find(|r| r.operation == operation && r.nth.is_none_or(|nth| nth == n))?;
        tracing::debug!(operation, call = n, fault = ?rule.fault, "AWS fault injected");
        Some(rule.fault.clone())
    }
}

fn parse_fault(operation: &str, kind: &str, argument: Option<&str>) -> Result<Fault, String> {
    match (kind, argument) {
        ("throttle", None) => Ok(Fault::Throttle),
        ("throttle", Some(_)) => Err("throttle takes no argument".into()),
        ("fail", code) => {
            let code = code.unwrap_or("InjectedFailure");
            // The code goes verbatim into an XML or JSON error body.
            if code.is_empty() || !code.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c)) {
                return Err(format!("`{code}` is not an error code, e.g. fail:InvalidAMIID.NotFound"));
            }
            Ok(Fault::Fail(code.to_string()))
        }
        ("hang", Some(text)) => humantime::parse_duration(text).map(Fault::Hang).map_err(|e| e.to_string()),
        ("hang", None) => Err("hang needs a duration, e.g. hang:2s".into()),
        ("status", _) if operation != "GetCommandInvocation" => {
            Err("status applies to aws.GetCommandInvocation only".into())
        }
        ("status", argument) => {
            let argument = argument.unwrap_or("");
            let (status, stdout) = argument.split_once(':').map_or((argument, None), |(s, o)| (s, Some(o)));
            if !STATUSES.contains(&status) {
                return Err(format!("status needs one of {}, e.g. status:Failed:boom", STATUSES.join(", ")));
            }
            Ok(Fault::Status { status: status.to_string(), stdout: stdout.map(str::to_string) })
        }
        (other, _) => Err(format!(
            "unknown fault `{other}`; use throttle, fail[:Code], status:<Status>[:stdout] or hang:<duration>"
        )),
    }
}

/// How the service answers errors, which decides the shape of an injected one.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Protocol {
    Ec2Query,
    AwsQuery,
    AwsJson,
    RestXml,
}

/// The operation a request performs and its service's protocol; `None` for requests that are not AWS API calls
/// (instance metadata, SSO), which are never counted or faulted.
fn classify(request: &HttpRequest) -> Option<(String, Protocol)> {
    if let Some(target) = request.headers().get("x-amz-target") {
        let operation = target.rsplit_once('.').map_or(target, |(_, op)| op);
        return Some((operation.to_string(), Protocol::AwsJson));
    }
    let form = request.body().bytes().and_then(|b| std::str::from_utf8(b).ok()).unwrap_or("");
    if let Some(action) = form.split('&').find_map(|field| field.strip_prefix("Action=")) {
        let protocol = if form.split('&').any(|f| f == EC2_VERSION) { Protocol::Ec2Query } else { Protocol::AwsQuery };
        return Some((action.to_string(), protocol));
    }
    // Only S3 requests carry the payload hash header (S3's SigV4 variant).
    if !request.headers().contains_key("x-amz-content-sha256") {
        return None;
    }
    s3_operation(request.method(), request.uri()).map(|op| (op.to_string(), Protocol::RestXml))
}

/// S3 names the operation in the query (`x-id=GetObject`) for most calls; the rest follow from the method and
/// whether the path names an object: `/bucket/key` path-style (custom endpoints, moto), `/key` on a
/// `bucket.s3.<region>.amazonaws.com` host.
fn s3_operation<'a>(method: &str, uri: &'a str) -> Option<&'a str> {
    let rest = uri.split_once("://").map_or(uri, |(_, rest)| rest);
    let (authority, path_and_query) = rest.find('/').map_or((rest, "/"), |i| rest.split_at(i));
    let (path, query) = path_and_query.split_once('?').unwrap_or((path_and_query, ""));
    if let Some(id) = query.split('&').find_map(|p| p.strip_prefix("x-id=")) {
        return Some(id);
    }
    let virtual_hosted = authority.contains(".s3.") || authority.contains(".s3-");
    let segments = path.split('/').filter(|s| !s.is_empty()).count();
    let names_object = segments > usize::from(!virtual_hosted);
    match (method, names_object) {
        ("GET", _) if query.split('&').any(|p| p == "list-type=2") => Some("ListObjectsV2"),
        ("GET", true) => Some("GetObject"),
        ("PUT", true) => Some("PutObject"),
        ("HEAD", true) => Some("HeadObject"),
        ("DELETE", true) => Some("DeleteObject"),
        ("HEAD", false) => Some("HeadBucket"),
        _ => None,
    }
}

/// The error a service sends, in its protocol's shape; the throttling codes are ones the SDK's standard retry
/// classifier retries (aws-runtime's `THROTTLING_ERRORS`).
fn error_response(protocol: Protocol, fault: &Fault) -> HttpResponse {
    let (code, status) = match (fault, protocol) {
        (Fault::Fail(code), _) => (code.as_str(), hyper::StatusCode::BAD_REQUEST),
        (_, Protocol::Ec2Query) => ("RequestLimitExceeded", hyper::StatusCode::BAD_REQUEST),
        (_, Protocol::AwsQuery) => ("Throttling", hyper::StatusCode::BAD_REQUEST),
        (_, Protocol::AwsJson) => ("ThrottlingException", hyper::StatusCode::BAD_REQUEST),
        (_, Protocol::RestXml) => ("SlowDown", hyper::StatusCode::SERVICE_UNAVAILABLE),
    };
    let request_id = "kiln-injected";
    let (content_type, body) = match protocol {
        Protocol::Ec2Query => (
            "text/xml",
            format!(
                "<Response><Errors><Error><Code>{code}</Code><Message>{MESSAGE}</Message></Error></Errors>\
                 <RequestID>{request_id}</RequestID></Response>"
            ),
        ),
        Protocol::AwsQuery => (
            "text/xml",
            format!(
                "<ErrorResponse><Error><Type>Sender</Type><Code>{code}</Code><Message>{MESSAGE}</Message></Error>\
                 <RequestId>{request_id}</RequestId></ErrorResponse>"
            ),
        ),
        Protocol::AwsJson => ("application/x-amz-json-1.1", format!(r#"{{"__type":"{code}","message":"{MESSAGE}"}}"#)),
        Protocol::RestXml => (
            "application/xml",
            format!(
                "<Error><Code>{code}</Code><Message>{MESSAGE}</Message><RequestId>{request_id}</RequestId></Error>"
            ),
        ),
    };
    let mut response = HttpResponse::new(status.into(), SdkBody::from(body));
    response.headers_mut().insert("content-type", content_type);
    response
}

/// A successful GetCommandInvocation answer with the outcome of the step replaced, as SSM reports a step that
/// failed, timed out or is still running.
async fn rewrite_status(
    mut response: HttpResponse,
    status: &str,
    stdout: Option<&str>,
) -> Result<HttpResponse, ConnectorError> {
    if !response.status().is_success() {
        return Ok(response);
    }
    let bytes = response.take_body().collect().await.map_err(ConnectorError::io)?.to_bytes();
    let mut json: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| ConnectorError::other(e.into(), None))?;
    let Some(fields) = json.as_object_mut() else {
        return Err(ConnectorError::other("GetCommandInvocation answered with no JSON object".into(), None));
    };
    let details = if status == "TimedOut" { "ExecutionTimedOut" } else { status };
    let code = match status {
        "Success" => 0,
        "Failed" | "TimedOut" => 1,
        _ => -1,
    };
    fields.insert("Status".into(), status.into());
    fields.insert("StatusDetails".into(), details.into());
    fields.insert("ResponseCode".into(), code.into());
    if let Some(stdout) = stdout {
        fields.insert("StandardOutputContent".into(), stdout.into());
    }
    let body = json.to_string();
    response.headers_mut().insert("content-length", body.len().to_string());
    *response.body_mut() = SdkBody::from(body);
    Ok(response)
}

#[derive(Debug)]
struct FaultyConnector {
    inner: SharedHttpConnector,
    faults: Arc<Faults>,
}

impl HttpConnector for FaultyConnector {
    fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
        let Some((operation, protocol)) = classify(&request) else { return self.inner.call(request) };
        let inner = self.inner.clone();
        match self.faults.next(&operation) {
            None => inner.call(request),
            // Answered here: the request never reaches the network, as when AWS refuses it at the front door.
            Some(fault @ (Fault::Throttle | Fault::Fail(_))) => {
                HttpConnectorFuture::ready(Ok(error_response(protocol, &fault)))
            }
            Some(Fault::Hang(duration)) => HttpConnectorFuture::new(async move {
                tokio::time::sleep(duration).await;
                inner.call(request).await
            }),
            Some(Fault::Status { status, stdout }) => HttpConnectorFuture::new(async move {
                let response = inner.call(request).await?;
                rewrite_status(response, &status, stdout.as_deref()).await
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    use aws_config::retry::RetryConfig;
    use aws_config::{BehaviorVersion, Region};
    use aws_sdk_ec2::config::{Credentials, SharedCredentialsProvider};
    use aws_sdk_ec2::error::ProvideErrorMetadata;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let faults = Faults::parse(
            "route#1=fail, aws.DescribeImages#2=throttle, aws.CreateImage=fail:InvalidAMIID.NotFound, \
             aws.RunInstances=fail, aws.GetCommandInvocation=status:Failed:boom: it broke, \
             aws.GetCommandInvocation#3=status:InProgress, aws.PutObject=hang:5ms",
        )
        .unwrap();
        let parsed: Vec<(&str, Option<u32>, Fault)> =
            faults.rules.iter().map(|r| (r.operation.as_str(), r.nth, r.fault.clone())).collect();
        let status = |s: &str, out: Option<&str>| Fault::Status { status: s.into(), stdout: out.map(Into::into) };
        assert_eq!(
            parsed,
            [
                ("DescribeImages", Some(2), Fault::Throttle),
                ("CreateImage", None, Fault::Fail("InvalidAMIID.NotFound".into())),
                ("RunInstances", None, Fault::Fail("InjectedFailure".into())),
                ("GetCommandInvocation", None, status("Failed", Some("boom: it broke"))),
                ("GetCommandInvocation", Some(3), status("InProgress", None)),
                ("PutObject", None, Fault::Hang(Duration::from_millis(5))),
            ]
        );
        assert!(http_client("route#1=fail, health=unhealthy").unwrap().is_none());
        for (spec, expected) in [
            ("aws.DescribeImages", "write aws.<Operation>[#n]=fault"),
            ("aws.DescribeImages#0=throttle", "`#0` is not a call number"),
            ("aws.DescribeImages#x=throttle", "`#x` is not a call number"),
            ("aws.=throttle", "`` is not an AWS operation"),
            ("aws.describeImages=throttle", "`describeImages` is not an AWS operation"),
            ("aws.DescribeImages=explode", "unknown fault `explode`; use throttle, fail[:Code]"),
            ("aws.DescribeImages=throttle:3", "throttle takes no argument"),
            ("aws.DescribeImages=fail:", "`` is not an error code"),
            ("aws.DescribeImages=fail:<Bad>", "`<Bad>` is not an error code"),
            ("aws.CreateImage=hang", "hang needs a duration, e.g. hang:2s"),
            ("aws.CreateImage=hang:soon", "`aws.CreateImage=hang:soon`: "),
            ("aws.SendCommand=status:Failed", "status applies to aws.GetCommandInvocation only"),
            ("aws.GetCommandInvocation=status", "status needs one of Pending, InProgress"),
            ("aws.GetCommandInvocation=status:Broken:x", "status needs one of"),
        ] {
            let err = http_client(spec).err().unwrap_or_default();
            assert!(err.contains(expected), "{spec}: {err}");
        }
    }

    fn request(
        method: &str,
        uri: &str,
        header: Option<(&'static str, &'static str)>,
        body: &'static str,
    ) -> HttpRequest {
        let mut request = HttpRequest::new(SdkBody::from(body));
        request.set_method(method).unwrap();
        request.set_uri(uri).unwrap();
        if let Some((name, value)) = header {
            request.headers_mut().insert(name, value);
        }
        request
    }

    #[test]
    fn operations_are_read_from_the_request() {
        let operation = |request: HttpRequest| classify(&request).map(|(op, protocol)| format!("{op} {protocol:?}"));
        for (body, expected) in [
            ("Action=DescribeImages&Version=2016-11-15&Owner.1=self", "DescribeImages Ec2Query"),
            ("Action=CreateAutoScalingGroup&Version=2011-01-01", "CreateAutoScalingGroup AwsQuery"),
            ("Version=2015-12-01&Action=DescribeTargetHealth", "DescribeTargetHealth AwsQuery"),
        ] {
            assert_eq!(operation(request("POST", "http://moto/", None, body)).as_deref(), Some(expected));
        }
        let target = Some(("x-amz-target", "AmazonSSM.GetCommandInvocation"));
        let ssm = operation(request("POST", "http://moto/", target, "{}"));
        assert_eq!(ssm.as_deref(), Some("GetCommandInvocation AwsJson"));
        // Path-style (custom endpoints, moto) and virtual-hosted S3 addressing.
        for (method, uri, expected) in [
            ("PUT", "http://moto/bucket/p/events/1.json?x-id=PutObject", "PutObject"),
            ("GET", "http://moto/bucket/p/events/1.json?x-id=GetObject", "GetObject"),
            ("DELETE", "http://moto/bucket/key?x-id=DeleteObject", "DeleteObject"),
            ("GET", "http://moto/bucket?list-type=2&prefix=p%2F", "ListObjectsV2"),
            ("GET", "https://bucket.s3.eu-west-1.amazonaws.com/?list-type=2", "ListObjectsV2"),
            ("HEAD", "http://moto/bucket/key", "HeadObject"),
            ("HEAD", "https://bucket.s3.eu-west-1.amazonaws.com/key", "HeadObject"),
            ("HEAD", "http://moto/bucket", "HeadBucket"),
            ("HEAD", "https://bucket.s3.eu-west-1.amazonaws.com/", "HeadBucket"),
        ] {
            let signed = Some(("x-amz-content-sha256", "UNSIGNED-PAYLOAD"));
            let got = operation(request(method, uri, signed, ""));
            assert_eq!(got, Some(format!("{expected} RestXml")), "{method} {uri}");
        }
        // Instance metadata, fetched by the credentials chain, is not an AWS API call.
        assert_eq!(operation(request("PUT", "http://169.254.169.254/latest/api/token", None, "")), None);
    }

    /// moto in a box: canned successful answers, counting what reaches it.
    #[derive(Debug, Clone, Default)]
    struct Canned {
        seen: Arc<AtomicU32>,
    }

    impl HttpConnector for Canned {
        fn call(&self, request: HttpRequest) -> HttpConnectorFuture {
            self.seen.fetch_add(1, Ordering::SeqCst);
            let body = match classify(&request).map(|(op, _)| op).as_deref() {
                Some("DescribeImages") => {
                    "<DescribeImagesResponse xmlns=\"http://ec2.amazonaws.com/doc/2016-11-15/\">\
                    <requestId>r</requestId><imagesSet><item><imageId>ami-12345678</imageId></item></imagesSet>\
                    </DescribeImagesResponse>"
                }
                Some("GetCommandInvocation") => {
                    r#"{"CommandId":"c","InstanceId":"i-1","Status":"Success",
                    "StatusDetails":"Success","ResponseCode":0,"StandardOutputContent":"ok"}"#
                }
                Some("ListObjectsV2") => {
                    "<ListBucketResult><Name>bucket</Name><KeyCount>0</KeyCount></ListBucketResult>"
                }
                _ => "",
            };
            HttpConnectorFuture::ready(Ok(HttpResponse::new(hyper::StatusCode::OK.into(), SdkBody::from(body))))
        }
    }

    /// A client of the faulty layer over `Canned`, and what each saw.
    fn faulty(spec: &str) -> (SharedHttpClient, Arc<Faults>, Arc<AtomicU32>) {
        let canned = Canned::default();
        let seen = canned.seen.clone();
        let faults = Arc::new(Faults::parse(spec).unwrap());
        let inner = http_client_fn(move |_, _| SharedHttpConnector::new(canned.clone()));
        (wrap(inner, faults.clone()), faults, seen)
    }

    fn sdk_config(http: SharedHttpClient) -> aws_config::SdkConfig {
        let credentials = Credentials::new("AKID", "secret", None, None, "test");
        aws_config::SdkConfig::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(SharedCredentialsProvider::new(credentials))
            .endpoint_url("http://moto.invalid")
            .retry_config(RetryConfig::standard().with_max_attempts(3).with_initial_backoff(Duration::from_millis(1)))
            .http_client(http)
            .build()
    }

    fn ec2(http: SharedHttpClient) -> aws_sdk_ec2::Client {
        aws_sdk_ec2::Client::new(&sdk_config(http))
    }

    fn block_on<F: std::future::Future>(future: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(future)
    }

    #[test]
    fn a_throttled_call_is_retried_by_the_sdk_and_succeeds() {
        let (http, faults, seen) = faulty("aws.DescribeImages#1=throttle");
        let images = block_on(ec2(http).describe_images().send()).unwrap();
        assert_eq!(images.images()[0].image_id(), Some("ami-12345678"));
        assert_eq!(faults.counts.lock().unwrap().get("DescribeImages"), Some(&2));
        assert_eq!(seen.load(Ordering::SeqCst), 1, "the throttled attempt never reaches the service");
    }

    #[test]
    fn throttling_on_every_attempt_gives_up_with_the_throttling_code() {
        let (http, faults, seen) = faulty("aws.DescribeImages=throttle");
        let err = block_on(ec2(http).describe_images().send()).unwrap_err();
        assert_eq!(err.code(), Some("RequestLimitExceeded"));
        assert_eq!(faults.counts.lock().unwrap().get("DescribeImages"), Some(&3));
        assert_eq!(seen.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_failure_carries_its_code_into_the_sdk_and_kilns_message() {
        let (http, faults, seen) = faulty("aws.DescribeImages=fail:InvalidAMIID.NotFound");
        let err = block_on(ec2(http).describe_images().send()).unwrap_err();
        assert_eq!(err.code(), Some("InvalidAMIID.NotFound"));
        let message = super::super::sdk::error("DescribeImages", "us-east-1", &err).to_string();
        assert!(
            message.contains("DescribeImages in us-east-1 failed (InvalidAMIID.NotFound): injected by KILN_INJECT"),
            "{message}"
        );
        assert_eq!(faults.counts.lock().unwrap().get("DescribeImages"), Some(&1), "not retried");
        assert_eq!(seen.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_hang_forwards_the_call() {
        let (http, _, seen) = faulty("aws.DescribeImages=hang:1ms");
        assert!(block_on(ec2(http).describe_images().send()).is_ok());
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn an_ssm_step_is_rewritten_after_a_throttled_poll() {
        let (http, faults, seen) =
            faulty("aws.GetCommandInvocation#1=throttle, aws.GetCommandInvocation=status:Failed:boom");
        let ssm = aws_sdk_ssm::Client::new(&sdk_config(http));
        let call = ssm.get_command_invocation().command_id("c").instance_id("i-1");
        let output = block_on(call.send()).unwrap();
        assert_eq!(output.status(), Some(&aws_sdk_ssm::types::CommandInvocationStatus::Failed));
        assert_eq!(output.standard_output_content(), Some("boom"));
        assert_eq!(output.response_code(), 1);
        assert_eq!(faults.counts.lock().unwrap().get("GetCommandInvocation"), Some(&2));
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn s3_slow_down_is_retried() {
        let (http, faults, seen) = faulty("aws.ListObjectsV2#1=throttle");
        let config = aws_sdk_s3::config::Builder::from(&sdk_config(http)).force_path_style(true).build();
        let listing = aws_sdk_s3::Client::from_conf(config).list_objects_v2().bucket("bucket").prefix("p/").send();
        assert_eq!(block_on(listing).unwrap().key_count(), Some(0));
        assert_eq!(faults.counts.lock().unwrap().get("ListObjectsV2"), Some(&2));
        assert_eq!(seen.load(Ordering::SeqCst), 1);
    }
}
