//! The S3 ledger store: one object per key under `s3://bucket/prefix`, created with `If-None-Match: *`.
//!
//! S3 has no rename and no lock, but since 2024 it refuses a PUT with `If-None-Match: *` when the key exists (412):
//! that is exactly the store's create-if-absent primitive. The engine is synchronous, so the store owns a
//! current-thread tokio runtime and blocks on each call.

use std::future::Future;

use aws_config::{BehaviorVersion, Region};
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::error::{ProvideErrorMetadata, SdkError};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::Client;

use crate::ledger::{Created, Store, StoreError};

use super::sdk::{causes, retry_config, root_cause, timeout_config, MAX_ATTEMPTS, OPERATION_TIMEOUT};

/// Where the store is and how to reach it; `None` fields fall back to the aws-config default chain.
#[derive(Debug, Clone, Default)]
pub struct S3Settings {
    pub bucket: String,
    pub prefix: String,
    pub region: Option<String>,
    pub profile: Option<String>,
}

pub struct S3Store {
    runtime: tokio::runtime::Runtime,
    client: Client,
    bucket: String,
    /// The key prefix with its trailing `/`, or empty for the bucket's root.
    key_prefix: String,
    /// The endpoint when not AWS's own (`AWS_ENDPOINT_URL`), for messages and the probe marker.
    endpoint: Option<String>,
}

/// What the caller was doing when S3 answered, to name the permission an AccessDenied is missing.
#[derive(Debug, Clone, Copy)]
enum Operation {
    Get,
    Put,
    List,
}

impl Operation {
    fn verb(self) -> &'static str {
        match self {
            Operation::Get => "reading",
            Operation::Put => "writing",
            Operation::List => "listing",
        }
    }
}

impl S3Store {
    /// Connects with credentials from the default chain (environment, profiles, SSO, IMDS); `AWS_ENDPOINT_URL`
    /// points it elsewhere, with path-style addressing since local endpoints have no per-bucket hostnames.
    pub fn connect(settings: &S3Settings) -> Result<S3Store, StoreError> {
        let location = location_of(&settings.bucket, &settings.prefix);
        let backend = |message: String| StoreError::Backend { location: location.clone(), message };
        let runtime =
            super::sdk::runtime().map_err(|e| backend(format!("cannot start the AWS client runtime: {e}")))?;
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .retry_config(retry_config())
            .timeout_config(timeout_config())
            // The newer default checksums (aws-chunked bodies with trailers) are not understood by every
            // S3-compatible store; events are tiny and signed, so checksums add nothing kiln needs.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if let Some(region) = &settings.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(profile) = &settings.profile {
            loader = loader.profile_name(profile);
        }
        if let Some(client) = super::faults::http_client_from_env().map_err(backend)? {
            loader = loader.http_client(client);
        }
        let sdk = runtime.block_on(loader.load());
        if sdk.region().is_none() {
            return Err(backend(
                "no AWS region: set `[aws] region` in the pipeline, or AWS_REGION in the environment".into(),
            ));
        }
        let endpoint = sdk.endpoint_url().map(str::to_string);
        let mut config = aws_sdk_s3::config::Builder::from(&sdk);
        if endpoint.is_some() {
            config = config.force_path_style(true);
        }
        let client = Client::from_conf(config.build());
        Ok(S3Store::with_client(runtime, client, &settings.bucket, &settings.prefix, endpoint))
    }

    fn with_client(
        runtime: tokio::runtime::Runtime,
        client: Client,
        bucket: &str,
        prefix: &str,
        endpoint: Option<String>,
    ) -> S3Store {
        let prefix = prefix.trim_matches('/');
        let key_prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        S3Store { runtime, client, bucket: bucket.to_string(), key_prefix, endpoint }
    }

    /// The endpoint in use, for messages: a custom one, or AWS's own.
    pub fn endpoint(&self) -> String {
        match &self.endpoint {
            Some(url) => format!("the S3 endpoint {url}"),
            None => "AWS S3".into(),
        }
    }

    fn object_key(&self, key: &str) -> String {
        format!("{}{key}", self.key_prefix)
    }

    fn block_on<F: Future>(&self, future: F) -> F::Output {
        self.runtime.block_on(future)
    }

    /// A failed call as a `StoreError` that names the bucket and prefix and, where S3 says why, what to do.
    fn error<E>(&self, operation: Operation, key: &str, err: &SdkError<E, HttpResponse>) -> StoreError
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let message = match err {
            SdkError::ServiceError(service) => {
                let code = service.err().code().unwrap_or("");
                self.service_message(operation, key, code, err)
            }
            SdkError::DispatchFailure(failure) if failure.is_io() || failure.is_timeout() => {
                format!("cannot reach {} ({} {key}): {}", self.endpoint(), operation.verb(), root_cause(err))
            }
            SdkError::TimeoutError(_) => format!(
                "{} did not answer in time ({} {key}, {} attempts within {OPERATION_TIMEOUT:?})",
                self.endpoint(),
                operation.verb(),
                MAX_ATTEMPTS
            ),
            _ => {
                let detail = causes(err);
                if detail.contains("credentials") {
                    format!(
                        "no usable AWS credentials {} {key} (kiln looks in the environment, the shared config and \
                         credentials files, SSO and instance metadata): {detail}",
                        operation.verb()
                    )
                } else {
                    format!("{} {key} failed: {detail}", operation.verb())
                }
            }
        };
        StoreError::Backend { location: self.location(), message }
    }

    fn service_message<E>(&self, operation: Operation, key: &str, code: &str, err: &SdkError<E, HttpResponse>) -> String
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let bucket = &self.bucket;
        match code {
            "NoSuchBucket" => {
                format!("bucket `{bucket}` does not exist (NoSuchBucket); create it or fix the ledger URL")
            }
            "AccessDenied" | "AllAccessDisabled" => {
                let objects = format!("arn:aws:s3:::{bucket}/{}*", self.key_prefix);
                let needed = match operation {
                    Operation::Put => format!("s3:PutObject on {objects}"),
                    // S3 answers 403, not 404, for a missing key to a caller that may not list the bucket.
                    Operation::Get => {
                        format!("s3:GetObject on {objects}, and s3:ListBucket on arn:aws:s3:::{bucket}")
                    }
                    Operation::List => format!("s3:ListBucket on arn:aws:s3:::{bucket}"),
                };
                format!("access denied {} {key} in bucket `{bucket}`: kiln needs {needed}", operation.verb())
            }
            "InvalidAccessKeyId" | "SignatureDoesNotMatch" | "ExpiredToken" | "InvalidToken" => {
                format!("S3 rejected the AWS credentials ({code}) {} {key} in bucket `{bucket}`", operation.verb())
            }
            _ => format!("{} {key} in bucket `{bucket}` failed: {}", operation.verb(), causes(err)),
        }
    }

    /// A create-if-absent PUT of `key`, and the probe's raw tool.
    fn put_if_absent(&self, key: &str, bytes: &[u8]) -> Result<Created, StoreError> {
        let request = self
            .client
            .put_object()
            .bucket(&self.bucket)
            .key(self.object_key(key))
            .if_none_match("*")
            .content_type("application/json")
            .body(ByteStream::from(bytes.to_vec()))
            .send();
        match self.block_on(request) {
            Ok(_) => Ok(Created::Yes),
            Err(err) => match status_of(&err) {
                // 412: the key exists. 409 ConditionalRequestConflict: another conditional write to the key is in
                // flight; either way someone else is writing it, and the ledger reads back to see who won.
                Some(412) | Some(409) => Ok(Created::AlreadyExists),
                // Anything else may have come after the object landed (a lost response, a timeout): an error,
                // so that the ledger reads the key back rather than guessing.
                _ => Err(self.error(Operation::Put, key, &err)),
            },
        }
    }
}

fn status_of<E>(err: &SdkError<E, HttpResponse>) -> Option<u16> {
    err.raw_response().map(|response| response.status().as_u16())
}

pub fn location_of(bucket: &str, prefix: &str) -> String {
    format!("s3://{bucket}/{}", prefix.trim_matches('/'))
}

impl Store for S3Store {
    fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let request = self.client.get_object().bucket(&self.bucket).key(self.object_key(key)).send();
        self.block_on(async {
            let output = match request.await {
                Ok(output) => output,
                Err(SdkError::ServiceError(service)) if service.err().is_no_such_key() => return Ok(None),
                Err(err) => return Err(self.error(Operation::Get, key, &err)),
            };
            let body = output.body.collect().await.map_err(|e| StoreError::Backend {
                location: self.location(),
                message: format!("reading {key}: the response body broke off: {}", causes(&e)),
            })?;
            Ok(Some(body.into_bytes().to_vec()))
        })
    }

    fn create(&self, key: &str, bytes: &[u8]) -> Result<Created, StoreError> {
        self.put_if_absent(key, bytes)
    }

    fn list(&self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let full_prefix = self.object_key(prefix);
        let mut pages = self.client.list_objects_v2().bucket(&self.bucket).prefix(&full_prefix).into_paginator().send();
        self.block_on(async {
            let mut keys = Vec::new();
            while let Some(page) = pages.next().await {
                let page = page.map_err(|err| self.error(Operation::List, prefix, &err))?;
                for object in page.contents() {
                    if let Some(key) = object.key().and_then(|k| k.strip_prefix(&self.key_prefix)) {
                        keys.push(key.to_string());
                    }
                }
            }
            Ok(keys)
        })
    }

    fn location(&self) -> String {
        location_of(&self.bucket, &self.key_prefix)
    }
}

/// The probe's keys live beside the ledger's events, never among them.
const PROBE_PREFIX: &str = "probe/";

/// Whether the store refuses a second create of the same key. Some S3-compatible stores accept `If-None-Match`
/// and ignore it; on such a store two writers would both "win" the same seq and the chain would fork, so kiln
/// finds out before writing any event. Costs two PUTs of a fresh key under `probe/`.
pub fn ignores_conditional_writes(store: &S3Store) -> Result<bool, StoreError> {
    let key = format!("{PROBE_PREFIX}{}", probe_name());
    // The first answer does not matter: a 412 there is our own write met by the SDK's retry after a lost response.
    store.put_if_absent(&key, b"first")?;
    Ok(store.put_if_absent(&key, b"second")? == Created::Yes)
}

fn probe_name() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default();
    let seed = format!("{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
    crate::digest::Digest::of(seed.as_bytes()).hex()[..24].to_string()
}

#[cfg(test)]
mod tests {
    //! A fake S3 endpoint on loopback that can drop a response after doing the work: the one failure a real
    //! endpoint cannot be made to produce on demand, and the one the ledger's read-back exists for.

    use super::*;
    use crate::clock::Clock;
    use crate::digest::Digest;
    use crate::ledger::{Decision, EventBody, Ledger, LedgerError};
    use crate::provider::aws::sdk::runtime;
    use aws_config::retry::RetryConfig;
    use std::collections::BTreeMap;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    #[derive(Default)]
    struct FakeS3 {
        objects: BTreeMap<String, Vec<u8>>,
        /// PUTs whose response is dropped after the object is stored (the connection closes instead).
        lose_put_responses: usize,
        puts: usize,
        /// Error answers (status line, S3 error code) given, in order, to the next requests instead of serving them.
        failures: std::collections::VecDeque<(&'static str, &'static str)>,
        requests: usize,
        /// Behave like the stores the probe exists for: accept `If-None-Match` and overwrite anyway.
        ignores_if_none_match: bool,
    }

    struct Request {
        method: String,
        path: String,
        headers: Vec<(String, String)>,
        body: Vec<u8>,
    }

    fn read_request(reader: &mut BufReader<TcpStream>) -> Option<Request> {
        let mut line = String::new();
        if reader.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let mut parts = line.split_whitespace();
        let method = parts.next()?.to_string();
        let path = parts.next()?.to_string();
        let mut headers = Vec::new();
        loop {
            let mut header = String::new();
            reader.read_line(&mut header).ok()?;
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            let (name, value) = header.split_once(':')?;
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
        let length: usize =
            headers.iter().find(|(n, _)| n == "content-length").and_then(|(_, v)| v.parse().ok()).unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        Some(Request { method, path, headers, body })
    }

    fn respond(stream: &mut TcpStream, status: &str, body: &[u8]) {
        let head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\n\r\n", body.len());
        let _ = stream.write_all(head.as_bytes());
        let _ = stream.write_all(body);
    }

    fn error_body(code: &str) -> Vec<u8> {
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>{code}</Message></Error>")
            .into_bytes()
    }

    fn serve(stream: TcpStream, state: Arc<Mutex<FakeS3>>) {
        let mut writer = stream.try_clone().unwrap();
        let mut reader = BufReader::new(stream);
        while let Some(request) = read_request(&mut reader) {
            let key = request.path.split('?').next().unwrap_or("").to_string();
            let mut state = state.lock().unwrap();
            state.requests += 1;
            if let Some((status, code)) = state.failures.pop_front() {
                respond(&mut writer, status, &error_body(code));
                continue;
            }
            match request.method.as_str() {
                "PUT" => {
                    state.puts += 1;
                    let conditional = request.headers.iter().any(|(n, v)| n == "if-none-match" && v == "*");
                    if conditional && !state.ignores_if_none_match && state.objects.contains_key(&key) {
                        respond(&mut writer, "412 Precondition Failed", &error_body("PreconditionFailed"));
                        continue;
                    }
                    state.objects.insert(key, request.body);
                    if state.lose_put_responses > 0 {
                        state.lose_put_responses -= 1;
                        let _ = writer.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                    respond(&mut writer, "200 OK", b"");
                }
                "GET" if request.path.contains("list-type=2") => {
                    let listing = list_page(&state, &request.path);
                    respond(&mut writer, "200 OK", listing.as_bytes());
                }
                "GET" => match state.objects.get(&key) {
                    Some(bytes) => respond(&mut writer, "200 OK", &bytes.clone()),
                    None => respond(&mut writer, "404 Not Found", &error_body("NoSuchKey")),
                },
                _ => respond(&mut writer, "501 Not Implemented", b""),
            }
        }
    }

    /// Pages of two keys, so that every listing of more than two is paginated.
    const FAKE_PAGE: usize = 2;

    fn query_param(path: &str, name: &str) -> Option<String> {
        let query = path.split_once('?')?.1;
        let value = query.split('&').find_map(|pair| pair.strip_prefix(&format!("{name}=")))?;
        Some(value.replace("%2F", "/"))
    }

    fn list_page(state: &FakeS3, path: &str) -> String {
        let bucket = path.split('?').next().unwrap_or("").trim_end_matches('/');
        let prefix = format!("{bucket}/{}", query_param(path, "prefix").unwrap_or_default());
        let start: usize = query_param(path, "continuation-token").and_then(|t| t.parse().ok()).unwrap_or(0);
        let matching: Vec<&String> = state.objects.keys().filter(|k| k.starts_with(&prefix)).collect();
        let page = matching.iter().skip(start).take(FAKE_PAGE);
        let contents: String =
            page.map(|k| format!("<Contents><Key>{}</Key><Size>1</Size></Contents>", &k[bucket.len() + 1..])).collect();
        let next = start + FAKE_PAGE;
        let more = if next < matching.len() {
            format!("<IsTruncated>true</IsTruncated><NextContinuationToken>{next}</NextContinuationToken>")
        } else {
            "<IsTruncated>false</IsTruncated>".to_string()
        };
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?><ListBucketResult><Name>bucket</Name>{contents}{more}</ListBucketResult>"
        )
    }

    fn fake_s3(lose_put_responses: usize) -> (String, Arc<Mutex<FakeS3>>) {
        fake_s3_with(FakeS3 { lose_put_responses, ..FakeS3::default() })
    }

    fn fake_s3_with(fake: FakeS3) -> (String, Arc<Mutex<FakeS3>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(fake));
        let shared = state.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let state = shared.clone();
                std::thread::spawn(move || serve(stream, state));
            }
        });
        (endpoint, state)
    }

    fn store_at(endpoint: &str, retry: RetryConfig) -> S3Store {
        let config = aws_sdk_s3::Config::builder()
            .behavior_version(BehaviorVersion::latest())
            .region(Region::new("us-east-1"))
            .credentials_provider(aws_sdk_s3::config::Credentials::new("testing", "testing", None, None, "test"))
            .endpoint_url(endpoint)
            .force_path_style(true)
            .retry_config(retry.with_initial_backoff(Duration::from_millis(1)))
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .build();
        S3Store::with_client(
            runtime().unwrap(),
            Client::from_conf(config),
            "bucket",
            "team/ledger",
            Some(endpoint.into()),
        )
    }

    fn append_note(ledger: &Ledger, note: &str) -> u64 {
        let body = EventBody::Approved {
            pipeline: "p".into(),
            stage: "prod".into(),
            digest: Digest::of(note.as_bytes()),
            note: Some(note.into()),
        };
        let (_, stored) = ledger
            .append::<(), LedgerError>("writer", &Clock::system(), |_| Ok(Decision::Append(Box::new(body.clone()), ())))
            .unwrap();
        stored.unwrap().event.seq
    }

    fn event_objects(state: &Mutex<FakeS3>) -> Vec<String> {
        state.lock().unwrap().objects.keys().filter(|k| k.contains("/events/")).cloned().collect()
    }

    #[test]
    fn a_put_whose_response_is_lost_and_retried_is_ours_not_a_lost_race() {
        // The SDK retries the PUT; the retry meets our own object and gets 412, which alone would read as
        // "another writer won". The ledger reads the key back, finds our bytes, and counts the append once.
        let (endpoint, state) = fake_s3(1);
        let ledger = Ledger::new(Box::new(store_at(&endpoint, RetryConfig::standard().with_max_attempts(3))), None);
        assert_eq!(append_note(&ledger, "first"), 1);
        assert_eq!(state.lock().unwrap().puts, 2, "the lost response was retried");
        assert_eq!(append_note(&ledger, "second"), 2);
        assert_eq!(
            event_objects(&state),
            ["/bucket/team/ledger/events/000000000001.json", "/bucket/team/ledger/events/000000000002.json"]
        );
        assert_eq!(ledger.verify().unwrap().events, 2);
    }

    #[test]
    fn a_listing_follows_every_page() {
        let (endpoint, _state) = fake_s3(0);
        let store = store_at(&endpoint, RetryConfig::disabled());
        for seq in 1..=5 {
            store.create(&format!("events/{seq}.json"), b"{}").unwrap();
        }
        store.create("probe/x", b"first").unwrap();
        let mut keys = store.list("events/").unwrap();
        keys.sort();
        assert_eq!(keys, ["events/1.json", "events/2.json", "events/3.json", "events/4.json", "events/5.json"]);
    }

    #[test]
    fn a_put_whose_response_is_lost_without_retry_is_settled_by_reading_back() {
        let (endpoint, state) = fake_s3(1);
        let ledger = Ledger::new(Box::new(store_at(&endpoint, RetryConfig::disabled())), None);
        assert_eq!(append_note(&ledger, "first"), 1);
        assert_eq!(state.lock().unwrap().puts, 1);
        assert_eq!(append_note(&ledger, "second"), 2);
        assert_eq!(event_objects(&state).len(), 2, "nothing lost, nothing written twice");
    }

    #[test]
    fn a_second_create_of_a_key_is_already_exists_and_keeps_the_first() {
        let (endpoint, state) = fake_s3(0);
        let store = store_at(&endpoint, RetryConfig::disabled());
        assert_eq!(store.create("events/1.json", b"first").unwrap(), Created::Yes);
        assert_eq!(store.create("events/1.json", b"second").unwrap(), Created::AlreadyExists);
        assert_eq!(store.get("events/1.json").unwrap().unwrap(), b"first");
        assert_eq!(store.get("events/2.json").unwrap(), None);
        assert!(state.lock().unwrap().objects.contains_key("/bucket/team/ledger/events/1.json"));
        assert!(!ignores_conditional_writes(&store).unwrap());
    }

    #[test]
    fn an_unreachable_endpoint_is_an_error_naming_the_bucket() {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let store = store_at(&format!("http://127.0.0.1:{port}"), RetryConfig::disabled());
        let err = store.get("events/1.json").unwrap_err().to_string();
        assert!(err.starts_with("s3://bucket/team/ledger: "), "{err}");
        assert!(err.contains("cannot reach the S3 endpoint"), "{err}");
    }

    #[test]
    fn throttling_and_5xx_are_retried_with_kiln_s_retry_settings() {
        let failures = [("503 Slow Down", "SlowDown"), ("500 Internal Server Error", "InternalError")];
        let (endpoint, state) = fake_s3_with(FakeS3 { failures: failures.into(), ..FakeS3::default() });
        // kiln's own settings, with the backoff shortened: the number of attempts is what is under test.
        let store = store_at(&endpoint, retry_config());
        assert_eq!(store.create("events/1.json", b"first").unwrap(), Created::Yes);
        assert_eq!(state.lock().unwrap().requests, 3);

        let always = vec![("503 Slow Down", "SlowDown"); 10];
        let (endpoint, state) = fake_s3_with(FakeS3 { failures: always.into(), ..FakeS3::default() });
        let err = store_at(&endpoint, retry_config()).create("events/1.json", b"first").unwrap_err().to_string();
        assert_eq!(state.lock().unwrap().requests, MAX_ATTEMPTS as usize, "bounded: {err}");
        assert!(err.starts_with("s3://bucket/team/ledger: writing events/1.json in bucket `bucket` failed"), "{err}");
    }

    #[test]
    fn s3_errors_name_the_bucket_and_what_to_do() {
        let table: [(&str, &str, Operation, &str); 6] = [
            ("404 Not Found", "NoSuchBucket", Operation::Put, "bucket `bucket` does not exist (NoSuchBucket)"),
            (
                "403 Forbidden",
                "AccessDenied",
                Operation::Put,
                "access denied writing events/1.json in bucket `bucket`: kiln needs s3:PutObject on \
                 arn:aws:s3:::bucket/team/ledger/*",
            ),
            (
                "403 Forbidden",
                "AccessDenied",
                Operation::Get,
                "kiln needs s3:GetObject on arn:aws:s3:::bucket/team/ledger/*, and s3:ListBucket on \
                 arn:aws:s3:::bucket",
            ),
            ("403 Forbidden", "AccessDenied", Operation::List, "kiln needs s3:ListBucket on arn:aws:s3:::bucket"),
            (
                "403 Forbidden",
                "InvalidAccessKeyId",
                Operation::Put,
                "S3 rejected the AWS credentials (InvalidAccessKeyId) writing events/1.json in bucket `bucket`",
            ),
            ("404 Not Found", "NoSuchBucket", Operation::List, "bucket `bucket` does not exist (NoSuchBucket)"),
        ];
        for (status, code, operation, expected) in table {
            let (endpoint, _state) = fake_s3_with(FakeS3 { failures: [(status, code)].into(), ..FakeS3::default() });
            let store = store_at(&endpoint, RetryConfig::disabled());
            let err = match operation {
                Operation::Put => store.create("events/1.json", b"first").map(|_| ()),
                Operation::Get => store.get("events/1.json").map(|_| ()),
                Operation::List => store.list("events/").map(|_| ()),
            }
            .unwrap_err()
            .to_string();
            assert!(err.starts_with("s3://bucket/team/ledger: "), "{code} {operation:?}: {err}");
            assert!(err.contains(expected), "{code} {operation:?}:\n  got {err}\n  want {expected}");
        }
    }

    #[test]
    fn the_probe_finds_a_store_that_ignores_if_none_match() {
        let (endpoint, state) = fake_s3_with(FakeS3 { ignores_if_none_match: true, ..FakeS3::default() });
        assert!(ignores_conditional_writes(&store_at(&endpoint, RetryConfig::disabled())).unwrap());
        let keys: Vec<String> = state.lock().unwrap().objects.keys().cloned().collect();
        assert_eq!(keys.len(), 1, "{keys:?}");
        assert!(keys[0].starts_with("/bucket/team/ledger/probe/"), "{keys:?}");
    }
}
