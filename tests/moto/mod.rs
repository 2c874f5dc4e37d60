//! A moto server (a local AWS endpoint) per test, started from the virtualenv that scripts/install-test-deps makes,
//! and stopped when the test drops it. Also runs boto3 from that virtualenv, to check what kiln made in AWS with
//! calls that share no code with kiln.

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
}

impl Moto {
    /// A fresh moto on a free loopback port, answering and reset.
    pub fn start() -> Moto {
        let moto_server = tool("moto_server");
        let started = Instant::now();
        loop {
            let port = super::common::free_port();
            let child = Command::new(&moto_server)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", moto_server.display()));
            let mut moto = Moto { child, port };
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
            "import boto3, json, sys\n\
             s3 = boto3.client('s3', endpoint_url='{}', region_name='us-east-1', \
             aws_access_key_id='testing', aws_secret_access_key='testing')\n",
            self.endpoint()
        );
        let output =
            Command::new(tool("python")).args(["-c", &format!("{prelude}{script}")]).env_clear().output().unwrap();
        assert!(output.status.success(), "boto3 script failed:\n{script}\n{}", String::from_utf8_lossy(&output.stderr));
        String::from_utf8(output.stdout).unwrap()
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
