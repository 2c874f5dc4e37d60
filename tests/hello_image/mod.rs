//! Shared by the fleet and proxy tests: the example hello service compiled once per test binary into a directory
//! laid out like an unpacked image, plus instance helpers that stop what they started even when a test fails.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use kiln::config::recipe::Health;
use kiln::provider::local::fleet::{self, InstanceHandle, InstanceSpec};

pub const HELLO: &str = "/opt/hello/bin/hello";

/// `<root>/opt/hello/bin/hello`, built from `images/files/hello/main.rs` the way the image build does.
pub fn hello_root() -> &'static Path {
    static ROOT: OnceLock<PathBuf> = OnceLock::new();
    ROOT.get_or_init(|| {
        // One root per test binary under cargo's scratch dir, rebuilt on every run so it never goes stale; the
        // binary is renamed into place so instances still running from an earlier run keep their file.
        let root = Path::new(env!("CARGO_TARGET_TMPDIR")).join("hello-root").join(env!("CARGO_CRATE_NAME"));
        let bin = root.join(HELLO.trim_start_matches('/'));
        std::fs::create_dir_all(bin.parent().unwrap()).unwrap();
        let tmp = bin.with_extension(format!("tmp{}", std::process::id()));
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("images/files/hello/main.rs");
        let out = Command::new("rustc")
            .args(["--edition", "2021", "-C", "debuginfo=0", "-o"])
            .arg(&tmp)
            .arg(&src)
            .output()
            .unwrap();
        assert!(out.status.success(), "rustc failed:\n{}", String::from_utf8_lossy(&out.stderr));
        std::fs::rename(&tmp, &bin).unwrap();
        root
    })
}

pub fn healthz() -> Health {
    Health::Http("/healthz".into())
}

/// A spec for `name` running `command` from `root`, with its workdir and log under `dir`.
pub fn spec(dir: &Path, root: &Path, name: &str, command: &[&str]) -> InstanceSpec {
    InstanceSpec {
        name: name.to_string(),
        root: root.to_path_buf(),
        command: command.iter().map(|s| s.to_string()).collect(),
        env: BTreeMap::from([("GREETING".to_string(), "hi".to_string())]),
        port: fleet::free_port().unwrap(),
        workdir: dir.join("work").join(name),
        log_path: dir.join("logs").join(format!("{name}.log")),
    }
}

/// Instances that are stopped when this goes out of scope, so a failing assertion leaves no process behind.
pub struct Group {
    pub handles: Vec<InstanceHandle>,
}

impl Group {
    pub fn start(dir: &Path, prefix: &str, n: usize) -> Group {
        let mut group = Group { handles: Vec::new() };
        for i in 1..=n {
            let spec = spec(dir, hello_root(), &format!("{prefix}-{i}"), &[HELLO]);
            group.handles.push(fleet::start(&spec).unwrap());
        }
        fleet::wait_healthy(&group.handles, &healthz(), Instant::now() + Duration::from_secs(10)).unwrap();
        group
    }

    pub fn ports(&self) -> Vec<u16> {
        self.handles.iter().map(|h| h.port).collect()
    }

    pub fn stop(&mut self) {
        for h in self.handles.drain(..) {
            fleet::stop(&h, Duration::from_secs(2)).unwrap();
        }
    }
}

impl Drop for Group {
    fn drop(&mut self) {
        for h in &self.handles {
            let _ = fleet::stop(h, Duration::from_millis(200));
        }
    }
}

/// A minimal persistent HTTP/1.1 client: one connection, one request at a time, Content-Length bodies only.
pub struct Conn {
    reader: BufReader<TcpStream>,
    writer: TcpStream,
}

impl Conn {
    pub fn open(port: u16) -> std::io::Result<Conn> {
        let stream = TcpStream::connect(("127.0.0.1", port))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        stream.set_write_timeout(Some(Duration::from_secs(5)))?;
        stream.set_nodelay(true)?;
        Ok(Conn { writer: stream.try_clone()?, reader: BufReader::new(stream) })
    }

    /// Sends raw request bytes and reads one response: (status, headers lower-cased, body).
    pub fn send(&mut self, request: &[u8]) -> std::io::Result<(u16, BTreeMap<String, String>, String)> {
        self.writer.write_all(request)?;
        self.read_response()
    }

    pub fn get(&mut self, path: &str) -> std::io::Result<(u16, String)> {
        let (status, _, body) = self.send(format!("GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").as_bytes())?;
        Ok((status, body))
    }

    pub fn read_response(&mut self) -> std::io::Result<(u16, BTreeMap<String, String>, String)> {
        let bad = |what: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, what.to_string());
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "connection closed"));
        }
        let status: u16 = line.split(' ').nth(1).and_then(|s| s.parse().ok()).ok_or_else(|| bad(&line))?;
        let mut headers = BTreeMap::new();
        loop {
            let mut h = String::new();
            self.reader.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            let (k, v) = h.split_once(':').ok_or_else(|| bad(h))?;
            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
        }
        let len: usize = headers
            .get("content-length")
            .ok_or_else(|| bad("no content-length"))?
            .parse()
            .map_err(|_| bad("length"))?;
        let mut body = vec![0; len];
        self.reader.read_exact(&mut body)?;
        Ok((status, headers, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// One `GET` on a fresh connection.
pub fn get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    Conn::open(port)?.get(path)
}
