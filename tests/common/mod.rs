//! Shared harness for integration tests: a temp copy of the example repository and the real `kiln` binary run in
//! it with a clean environment.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Repo {
    pub dir: tempfile::TempDir,
}

pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        let kind = entry.file_type().unwrap();
        if kind.is_dir() {
            copy_dir(&entry.path(), &target);
        } else if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(entry.path()).unwrap(), &target).unwrap();
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// The example pipelines that [`Repo::example`] leaves out: AWS pipelines need an AWS endpoint, and with them
/// `pipelines/` would hold more than one pipeline, so every `kiln` call would need `--pipeline`.
pub const AWS_EXAMPLE_PIPELINES: &[&str] = &["hello-aws.toml"];

impl Repo {
    /// A temp dir holding a copy of this repository's `images/` and `pipelines/`, without the AWS example
    /// pipelines: `pipelines/hello.toml` is the only pipeline, so `kiln` finds it without `--pipeline`.
    pub fn example() -> Repo {
        let repo = Repo::example_with_every_pipeline();
        for name in AWS_EXAMPLE_PIPELINES {
            std::fs::remove_file(repo.file(&format!("pipelines/{name}"))).unwrap();
        }
        repo
    }

    /// A temp dir holding a copy of this repository's `images/` and `pipelines/` as they are.
    pub fn example_with_every_pipeline() -> Repo {
        let dir = tempfile::tempdir().unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR"));
        for sub in ["images", "pipelines"] {
            copy_dir(&src.join(sub), &dir.path().join(sub));
        }
        Repo { dir }
    }

    pub fn empty() -> Repo {
        Repo { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn file(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn write(&self, rel: &str, text: &str) {
        let path = self.file(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, text).unwrap();
    }

    /// Replaces the first `old` in `rel` by `new`; panics if `old` is not there, so a stale row cannot pass.
    pub fn edit(&self, rel: &str, old: &str, new: &str) {
        let path = self.file(rel);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains(old), "{rel} does not contain {old:?}");
        std::fs::write(&path, text.replacen(old, new, 1)).unwrap();
    }

    /// `kiln` with a clean environment, run in this repository.
    pub fn kiln(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.current_dir(self.path())
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .env("HOME", self.path())
            .env("KILN_ACTOR", "tester");
        if let Some(v) = std::env::var_os("RUSTUP_HOME") {
            cmd.env("RUSTUP_HOME", v);
        }
        if let Some(v) = std::env::var_os("CARGO_HOME") {
            cmd.env("CARGO_HOME", v);
        }
        cmd
    }

    pub fn run(&self, args: &[&str]) -> Run {
        Run::of(self.kiln().args(args).output().unwrap(), args)
    }
}

/// A finished `kiln` run, with helpers that print everything on failure.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub args: String,
}

impl Run {
    pub fn of(output: Output, args: &[&str]) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
            args: args.join(" "),
        }
    }

    pub fn expect(self, code: i32) -> Run {
        assert_eq!(
            self.code, code,
            "`kiln {}` exited {} (wanted {code})\n--- stdout\n{}\n--- stderr\n{}",
            self.args, self.code, self.stdout, self.stderr
        );
        self
    }

    pub fn ok(self) -> Run {
        self.expect(0)
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("`kiln {}` printed no JSON ({e}):\n{}\n{}", self.args, self.stdout, self.stderr))
    }
}

/// A small repository whose recipes build in milliseconds: `base` (a copied directory) and `app` (on top of base:
/// a copied file, a script, a shell step). Pipeline `app` has one stage, `dev`, on `port`.
pub fn tiny_repo(port: u16) -> Repo {
    let repo = Repo::empty();
    repo.write("images/base.toml", "[[provision]]\ncopy = \"files/base\"\nto = \"/etc/base\"\n");
    repo.write("images/files/base/os-release", "NAME=tiny\n");
    repo.write("images/files/base/motd", "welcome\n");
    repo.write(
        "images/app.toml",
        r#"parent = "base"
description = "tiny app"

[[provision]]
copy = "files/app/config.txt"
to = "/opt/app/config.txt"

[[provision]]
run = "scripts/setup.sh"

[[provision]]
shell = "mkdir -p $KILN_ROOT/var/lib/app && echo ready > $KILN_ROOT/var/lib/app/state"

[instance]
command = ["sleep", "1000"]
health = { tcp = true }
ready-timeout = "5s"
"#,
    );
    repo.write("images/files/app/config.txt", "mode=fast\n");
    repo.write("images/scripts/setup.sh", "#!/bin/sh\nset -e\necho setting up in $KILN_ROOT\nmkdir -p $KILN_ROOT/opt/app/bin\necho '#!/bin/sh' > $KILN_ROOT/opt/app/bin/app\nchmod 755 $KILN_ROOT/opt/app/bin/app\n");
    repo.write(
        "pipelines/app.toml",
        &format!("image = \"app\"\n\n[[stage]]\nname = \"dev\"\ndeploy = {{ port = {port} }}\n[[stage.gate]]\napprovals = 1\n"),
    );
    repo
}

/// Runs git in `dir` with a fixed identity and dates, so commits are reproducible.
pub fn git(dir: &Path, args: &[&str]) {
    let status = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.com")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.com")
        .env("GIT_AUTHOR_DATE", "2026-01-01T00:00:00Z")
        .env("GIT_COMMITTER_DATE", "2026-01-01T00:00:00Z")
        .output()
        .unwrap();
    assert!(status.status.success(), "git {args:?}: {}", String::from_utf8_lossy(&status.stderr));
}

/// Files under `dir`, recursively (0 when it does not exist).
pub fn count_files(dir: &Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries.flatten().map(|e| if e.file_type().unwrap().is_dir() { count_files(&e.path()) } else { 1 }).sum()
}

/// A loopback port nothing listens on right now.
///
/// Stage ports are taken below the kernel's ephemeral range (32768 and up), where the instances kiln starts get
/// theirs, so a port chosen here is not handed to an instance of a test running alongside before kiln binds it.
/// Each test process walks its own stretch of the range, so parallel test binaries rarely meet either.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let start = (std::process::id() * 97) % SPAN;
    for _ in 0..SPAN {
        let port = (FIRST + (start + NEXT.fetch_add(1, Ordering::Relaxed)) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between {FIRST} and {}", FIRST + SPAN)
}

impl Repo {
    /// The example repository with its stage ports moved to free ones, so tests can run side by side.
    pub fn example_on_free_ports() -> (Repo, Vec<u16>) {
        let repo = Repo::example();
        let mut ports = Vec::new();
        for fixed in ["18081", "18082", "18083"] {
            let port = free_port();
            repo.edit("pipelines/hello.toml", &format!("port = {fixed}"), &format!("port = {port}"));
            ports.push(port);
        }
        (repo, ports)
    }
}

/// Stops the named stages' processes when dropped, so a failing test leaves nothing running.
pub struct Down<'a> {
    pub repo: &'a Repo,
    pub stages: Vec<&'static str>,
    pub pipeline: Option<&'static str>,
}

impl Drop for Down<'_> {
    fn drop(&mut self) {
        for stage in &self.stages {
            let mut cmd = self.repo.kiln();
            cmd.args(["down", "--stage", stage]);
            if let Some(p) = self.pipeline {
                cmd.args(["--pipeline", p]);
            }
            let _ = cmd.output();
        }
    }
}

/// One HTTP/1.1 GET on loopback: (status, body), or None when the request failed at the transport level.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(std::time::Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let status = response.split(' ').nth(1)?.parse().ok()?;
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Some((status, body))
}
pub mod hello;

/// Names the test that re-ran this test binary as a child process, and that process's role; see [`child_of`].
pub const CHILD_VAR: &str = "KILN_TEST_CHILD";

/// This test binary, set to re-run just `test` in a child process that plays `role` instead of testing. The child
/// is the same test, so no helper shows up as a test of its own that passes by doing nothing.
pub fn child_of(test: &str, role: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--exact", test, "--test-threads=1", "--quiet"]).env(CHILD_VAR, format!("{}:{role}", std::process::id()));
    cmd
}

/// The role [`child_of`] gave this process, or None in an ordinary test run.
pub fn child_role() -> Option<String> {
    let value = std::env::var(CHILD_VAR).ok()?;
    let (parent, role) = value.split_once(':').unwrap_or(("", &value));
    // Inherited from anywhere but the test that spawned us, the variable would turn that test into a silent pass.
    assert_eq!(
        parent.parse::<u32>().ok(),
        Some(std::os::unix::process::parent_id()),
        "{CHILD_VAR}={value} was not set by this process's parent; unset it"
    );
    Some(role.to_string())
}

/// Every file under `dir` with its bytes, keyed by path relative to `dir`: compare two to prove nothing was written.
pub fn snapshot(dir: &Path) -> std::collections::BTreeMap<PathBuf, Vec<u8>> {
    fn walk(root: &Path, dir: &Path, out: &mut std::collections::BTreeMap<PathBuf, Vec<u8>>) {
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            let path = entry.path();
            if entry.file_type().unwrap().is_dir() {
                walk(root, &path, out);
            } else {
                out.insert(path.strip_prefix(root).unwrap().to_path_buf(), std::fs::read(&path).unwrap());
            }
        }
    }
    let mut out = std::collections::BTreeMap::new();
    walk(dir, dir, &mut out);
    out
}

/// The example repository with only a dev stage (capacity `capacity`) on a free port.
pub fn dev_only(capacity: u32) -> (Repo, u16) {
    hello::dev_stage(capacity, "", "")
}

/// Bakes the hello image with this greeting; returns its digest.
pub fn bake_greeting(repo: &Repo, greeting: &str) -> String {
    let text = std::fs::read_to_string(repo.file("images/hello.toml")).unwrap();
    let start = text.find("GREETING = \"").unwrap() + "GREETING = \"".len();
    let end = start + text[start..].find('"').unwrap();
    repo.write("images/hello.toml", &format!("{}{greeting}{}", &text[..start], &text[end..]));
    repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string()
}

/// The greeting the stage endpoint on `port` answers with; panics when it does not answer 200.
pub fn greeting(port: u16) -> String {
    match http_get(port, "/") {
        Some((200, body)) => body.split(" from ").next().unwrap_or("").to_string(),
        other => panic!("the endpoint on {port} answered {other:?}"),
    }
}

pub fn promote_only(repo: &Repo, digest: &str) {
    repo.run(&["promote", "--stage", "dev", "--digest", digest, "--no-deploy"]).ok();
}

/// The local provider's group files of hello's dev stage, by name.
pub fn group_files(repo: &Repo) -> Vec<serde_json::Value> {
    let dir = repo.file(".kiln/run/hello/dev/groups");
    let mut out: Vec<serde_json::Value> = std::fs::read_dir(dir)
        .map(|d| d.flatten().map(|e| serde_json::from_slice(&std::fs::read(e.path()).unwrap()).unwrap()).collect())
        .unwrap_or_default();
    out.sort_by_key(|g| g["name"].as_str().unwrap().to_string());
    out
}

pub fn pid_alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// No orphans: one group runs (the live one, at capacity), at most `keep` more exist and run nothing, and no
/// deployment is left open.
pub fn assert_converged(repo: &Repo, capacity: usize, keep: usize) {
    let status = repo.run(&["status", "--json"]).ok().json();
    assert!(status["stages"][0]["deploying"].is_null(), "a deployment is still open: {status}");
    let live_group = status["stages"][0]["live"]["group"].as_str().unwrap().to_string();
    let groups = group_files(repo);
    assert!(groups.len() <= 1 + keep, "orphaned groups: {groups:?}");
    for g in &groups {
        let alive = g["instances"].as_array().unwrap().iter().filter(|i| pid_alive(i["pid"].as_u64().unwrap())).count();
        if g["name"] == live_group.as_str() {
            assert_eq!(alive, capacity, "the live group runs at capacity");
        } else {
            assert_eq!(alive, 0, "retired group {} still runs processes", g["name"]);
        }
    }
    repo.run(&["verify"]).ok();
}
