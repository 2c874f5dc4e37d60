//! A moto server (a local AWS endpoint) per test, started from the virtualenv that scripts/install-test-deps makes,
//! and stopped when the test drops it. Also runs boto3 from that virtualenv, to check what kiln made in AWS with
//! calls that share no code with kiln.
#![allow(dead_code)] // each test binary uses part of the harness

pub mod app;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Keep in step with scripts/install-test-deps.
pub const MOTO_VERSION: &str = "5.2.5";

/// How long moto may take to answer its first request; it is ready in well under a second on an idle machine, but
/// the test binaries start many at once on two cores.
const READY_WITHIN: Duration = Duration::from_secs(60);

pub fn venv() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/moto-venv")
}

/// The virtualenv's `bin/<tool>`; fails the test, never skips it, when the virtualenv is missing.
fn tool(name: &str) -> PathBuf {
    let stamp = venv().join(format!(".kiln-moto-{MOTO_VERSION}"));
    assert!(
        stamp.exists(),
        "moto {MOTO_VERSION} is not installed in {}: run scripts/install-test-deps (scripts/test does)",
        venv().display()
    );
    venv().join("bin").join(name)
}

pub struct Moto {
    child: Child,
    pub port: u16,
    /// Holds moto's request recording: one file per server, as tests run in parallel.
    _scratch: tempfile::TempDir,
}

impl Moto {
    /// A fresh moto on a free loopback port, answering and reset.
    pub fn start() -> Moto {
        let moto_server = tool("moto_server");
        let started = Instant::now();
        loop {
            let port = super::common::free_port();
            let scratch = tempfile::tempdir().unwrap();
            let child = Command::new(&moto_server)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .env("MOTO_RECORDER_FILEPATH", scratch.path().join("recording"))
                .current_dir(scratch.path())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", moto_server.display()));
            let mut moto = Moto { child, port, _scratch: scratch };
            // Another process may take the port between the check and moto binding it: moto then exits, and
            // another port is tried.
            while started.elapsed() < READY_WITHIN {
                if moto.request("GET", "/moto-api/", "").is_some_and(|(status, _)| status == 200) {
                    moto.reset();
                    return moto;
                }
                if moto.child.try_wait().unwrap().is_some() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            assert!(started.elapsed() < READY_WITHIN, "moto_server did not answer within {READY_WITHIN:?}");
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Clears every service's state.
    pub fn reset(&self) {
        let answer = self.request("POST", "/moto-api/reset", "");
        assert_eq!(answer.map(|(status, _)| status), Some(200), "POST /moto-api/reset failed");
    }

    /// What a process needs to talk to this moto: the variables a CI runner would have, pointed here.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        aws_env(&self.endpoint())
    }

    /// A `kiln` command in `repo` with this moto's environment.
    pub fn kiln(&self, repo: &super::common::Repo) -> Command {
        let mut cmd = repo.kiln();
        cmd.envs(self.env());
        cmd
    }

    /// Runs `script` with boto3 from the virtualenv, with `s3` a client of this moto; returns its stdout.
    pub fn boto3(&self, script: &str) -> String {
        let prelude = format!(
            "import boto3, json, sys, datetime\n\
             def client(service, region='us-east-1'):\n\
             \x20   return boto3.client(service, endpoint_url='{}', region_name=region, \
             aws_access_key_id='testing', aws_secret_access_key='testing')\n\
             s3 = client('s3')\nec2 = client('ec2')\nssm = client('ssm')\niam = client('iam')\n",
            self.endpoint()
        );
        let output =
            Command::new(tool("python")).args(["-c", &format!("{prelude}{script}")]).env_clear().output().unwrap();
        assert!(output.status.success(), "boto3 script failed:\n{script}\n{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
    }

    /// Starts moto's request recorder afresh: what kiln calls from now on is counted from outside kiln.
    pub fn start_recording(&self) {
        for path in ["/moto-api/recorder/reset-recording", "/moto-api/recorder/start-recording"] {
            assert_eq!(self.request("POST", path, "").map(|(s, _)| s), Some(200), "POST {path} failed");
        }
    }

    /// Stops the recorder and returns the AWS operations called since [`Moto::start_recording`], in order, as
    /// `service:Operation` (from the form's `Action=`, the `X-Amz-Target` header, or an S3 method and path).
    pub fn stop_recording(&self) -> Vec<String> {
        self.stop_recording_with_bodies().into_iter().map(|(op, _)| op).collect()
    }

    /// [`Moto::stop_recording`] with each request's body, to check what went over the wire.
    pub fn stop_recording_with_bodies(&self) -> Vec<(String, String)> {
        assert_eq!(self.request("POST", "/moto-api/recorder/stop-recording", "").map(|(s, _)| s), Some(200));
        let (status, body) = self.request("GET", "/moto-api/recorder/download-recording", "").unwrap();
        assert_eq!(status, 200, "download-recording failed: {body}");
        body.lines().filter(|l| !l.trim().is_empty()).filter_map(operation_of).collect()
    }

    /// A one-shot HTTP/1.0 request to moto's own API; `None` when nothing answers.
    fn request(&self, method: &str, path: &str, body: &str) -> Option<(u16, String)> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        stream.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
        let request =
            format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}", body.len());
        stream.write_all(request.as_bytes()).ok()?;
        let mut response = String::new();
        stream.read_to_string(&mut response).ok()?;
        let status = response.split_whitespace().nth(1)?.parse().ok()?;
        let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
        Some((status, body))
    }
}

/// The environment a CI runner would give kiln, pointed at `endpoint`. Instance metadata is switched off so that
/// a lookup never waits on a link-local address that is not there.
pub fn aws_env(endpoint: &str) -> Vec<(&'static str, String)> {
    vec![
        ("AWS_ENDPOINT_URL", endpoint.to_string()),
        ("AWS_ACCESS_KEY_ID", "testing".into()),
        ("AWS_SECRET_ACCESS_KEY", "testing".into()),
        ("AWS_REGION", "us-east-1".into()),
        ("AWS_EC2_METADATA_DISABLED", "true".into()),
    ]
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The `service:Operation` and body of one line of moto's recording; `None` for moto's own API.
fn operation_of(line: &str) -> Option<(String, String)> {
    let entry: serde_json::Value = serde_json::from_str(line).ok()?;
    let headers = &entry["headers"];
    let header = |name: &str| {
        headers
            .as_object()
            .and_then(|h| h.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)))
            .and_then(|(_, v)| v.as_str())
    };
    let url = entry["url"].as_str().unwrap_or_default();
    if url.contains("/moto-api/") {
        return None;
    }
    let service = header("authorization")
        .and_then(|auth| auth.split("Credential=").nth(1))
        .and_then(|cred| cred.split('/').nth(3))
        .unwrap_or("unknown")
        .to_string();
    if let Some(target) = header("x-amz-target") {
        let body = entry["body"].as_str().unwrap_or_default().to_string();
        return Some((format!("{service}:{}", target.rsplit('.').next().unwrap_or(target)), body));
    }
    let body = match entry["body_encoded"].as_bool() {
        Some(true) => {
            let text = entry["body"].as_str().unwrap_or_default();
            use base64::Engine;
            let bytes = base64::engine::general_purpose::STANDARD.decode(text).unwrap_or_default();
            String::from_utf8(bytes).unwrap_or_default()
        }
        _ => entry["body"].as_str().unwrap_or_default().to_string(),
    };
    let action = body.split('&').chain(url.split(['?', '&'])).find_map(|kv| kv.strip_prefix("Action="));
    if let Some(action) = action {
        return Some((format!("{service}:{action}"), body));
    }
    let method = entry["method"].as_str().unwrap_or_default();
    let path = url.split("://").nth(1).and_then(|rest| rest.split_once('/')).map_or("", |(_, p)| p);
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let has_key = path.trim_end_matches('/').contains('/');
    let op = match (method, has_key) {
        ("PUT", true) => "PutObject",
        ("GET", true) => "GetObject",
        ("HEAD", true) => "HeadObject",
        ("DELETE", true) => "DeleteObject",
        ("GET", false) if query.contains("list-type=2") => "ListObjectsV2",
        ("PUT", false) => "CreateBucket",
        ("HEAD", false) => "HeadBucket",
        _ => method,
    };
    Some((format!("{service}:{op}"), body))
}
