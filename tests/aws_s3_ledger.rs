//! The ledger in S3 (moto): the real binary records, lists and verifies events there, 32 writers at once lose and
//! duplicate nothing, and a store that ignores conditional writes, a missing bucket and an unreachable endpoint are
//! refused with clear errors. What is in S3 is checked with boto3, never through kiln's own code.

mod common;
mod moto;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Child;

use common::{Repo, Run};
use moto::Moto;

const BUCKET: &str = "kiln-ledger";
const PREFIX: &str = "team/app";

fn ledger_url() -> String {
    format!("s3://{BUCKET}/{PREFIX}")
}

/// The tiny repository with its pipeline's ledger in S3, and the bucket made with versioning on, so that any
/// overwrite of an event would show as a second version.
fn s3_repo(moto: &Moto) -> Repo {
    let repo = common::tiny_repo(common::free_port());
    let pipeline = std::fs::read_to_string(repo.file("pipelines/app.toml")).unwrap();
    repo.write("pipelines/app.toml", &format!("ledger = \"{}\"\n{pipeline}", ledger_url()));
    moto.boto3(&format!(
        "s3.create_bucket(Bucket='{BUCKET}')\n\
         s3.put_bucket_versioning(Bucket='{BUCKET}', VersioningConfiguration={{'Status': 'Enabled'}})"
    ));
    repo
}

fn run(moto: &Moto, repo: &Repo, args: &[&str]) -> Run {
    Run::of(moto.kiln(repo).args(args).output().unwrap(), args)
}

/// Every version of every object under `prefix`, as (key, version count).
fn versions(moto: &Moto, prefix: &str) -> Vec<(String, usize)> {
    let out = moto.boto3(&format!(
        "counts = {{}}\n\
         for page in s3.get_paginator('list_object_versions').paginate(Bucket='{BUCKET}', Prefix='{prefix}'):\n\
         \x20   for v in page.get('Versions', []):\n\
         \x20       counts[v['Key']] = counts.get(v['Key'], 0) + 1\n\
         print(json.dumps(sorted(counts.items())))"
    ));
    serde_json::from_str(&out).unwrap()
}

fn event_keys(moto: &Moto) -> Vec<(String, usize)> {
    versions(moto, &format!("{PREFIX}/events/"))
}

/// Asserts events 1..=n are there, one object each, each written once.
fn assert_events_written_once(moto: &Moto, n: usize) {
    let keys = event_keys(moto);
    let expected: Vec<(String, usize)> = (1..=n).map(|seq| (format!("{PREFIX}/events/{seq:012}.json"), 1)).collect();
    assert_eq!(keys, expected, "one object per event, each written once");
}

fn bake(moto: &Moto, repo: &Repo) -> String {
    run(moto, repo, &["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string()
}

#[test]
fn approve_promote_log_and_verify_on_an_s3_ledger() {
    let moto = Moto::start();
    let repo = s3_repo(&moto);
    let digest = bake(&moto, &repo);
    run(&moto, &repo, &["approve", "--stage", "dev", "--digest", &digest]).ok();
    run(&moto, &repo, &["promote", "--stage", "dev", "--digest", &digest, "--no-deploy"]).ok();
    run(&moto, &repo, &["revoke", &digest, "--reason", "CVE-2026-0001"]).ok();

    let log = run(&moto, &repo, &["log", "--json"]).ok().json();
    let events = log["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds[..4], ["revoked", "pointer-published", "promoted", "approved"], "newest first");
    assert_events_written_once(&moto, events.len());
    let body = moto.boto3(&format!(
        "print(s3.get_object(Bucket='{BUCKET}', Key='{PREFIX}/events/{:012}.json')['Body'].read().decode())",
        events.len()
    ));
    assert!(body.contains("CVE-2026-0001"), "the newest object is the revocation: {body}");

    let report = run(&moto, &repo, &["verify", "--ledger-only", "--json"]).ok().json();
    assert_eq!(report["events"], events.len() as u64);
    assert_eq!(report["ledger"], ledger_url());

    // The view cache is local, keyed by bucket and prefix; a deleted one is rebuilt from S3 with nothing lost.
    let cache = repo.file(&format!(".kiln/cache/s3/{BUCKET}"));
    assert!(cache.is_dir(), "the view cache lives under .kiln/cache/s3/<bucket>/");
    std::fs::remove_dir_all(&cache).unwrap();
    let again = run(&moto, &repo, &["--ledger", &ledger_url(), "log", "--json"]).ok().json();
    assert_eq!(again["events"], log["events"]);
    assert_events_written_once(&moto, events.len());
}

#[test]
fn thirty_two_concurrent_writers_lose_nothing_and_duplicate_nothing() {
    let moto = Moto::start();
    let repo = s3_repo(&moto);
    let digest = bake(&moto, &repo);
    let before = event_keys(&moto).len();
    let writers = 32;
    let children: Vec<(String, Child)> = (0..writers)
        .map(|w| {
            let actor = format!("approver-{w:02}");
            let child = moto
                .kiln(&repo)
                .env("KILN_ACTOR", &actor)
                .args(["approve", "--stage", "dev", "--digest", &digest])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            (actor, child)
        })
        .collect();
    for (actor, child) in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{actor} failed: {}", String::from_utf8_lossy(&output.stderr));
    }

    assert_events_written_once(&moto, before + writers);
    let log = run(&moto, &repo, &["log", "--json", "--limit", "100"]).ok().json();
    let approvers: Vec<&str> = log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "approved")
        .map(|e| e["actor"].as_str().unwrap())
        .collect();
    let distinct: BTreeSet<&str> = approvers.iter().copied().collect();
    assert_eq!(approvers.len(), writers, "no approval lost or recorded twice: {approvers:?}");
    assert_eq!(distinct.len(), writers);
    let report = run(&moto, &repo, &["verify", "--ledger-only", "--json"]).ok().json();
    assert_eq!(report["events"], (before + writers) as u64);
}

/// A store that accepts `If-None-Match` and ignores it: a proxy in front of moto that drops the header.
struct IgnoringProxy {
    port: u16,
}

impl IgnoringProxy {
    fn start(upstream: u16) -> IgnoringProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                std::thread::spawn(move || relay_one(client, upstream));
            }
        });
        IgnoringProxy { port }
    }
}

/// Relays one request with `If-None-Match` removed, and its response with `Connection: close`, so the client
/// opens a new connection for its next request and the relay never has to find where a response ends.
fn relay_one(client: TcpStream, upstream: u16) {
    let mut reader = BufReader::new(client.try_clone().unwrap());
    let mut head = Vec::new();
    let mut length = 0;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            return;
        }
        let lower = line.to_ascii_lowercase();
        if let Some(value) = lower.strip_prefix("content-length:") {
            length = value.trim().parse().unwrap();
        }
        if lower.starts_with("if-none-match:") || lower.starts_with("connection:") {
            continue;
        }
        if line == "\r\n" {
            head.extend_from_slice(b"connection: close\r\n\r\n");
            break;
        }
        head.extend_from_slice(line.as_bytes());
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).unwrap();
    let mut server = TcpStream::connect(("127.0.0.1", upstream)).unwrap();
    server.write_all(&head).unwrap();
    server.write_all(&body).unwrap();
    let mut response = Vec::new();
    server.read_to_end(&mut response).unwrap();
    let split = response.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let response_head = String::from_utf8_lossy(&response[..split]).into_owned();
    let mut client = client;
    for line in response_head.split("\r\n").filter(|l| !l.to_ascii_lowercase().starts_with("connection:")) {
        client.write_all(format!("{line}\r\n").as_bytes()).unwrap();
    }
    client.write_all(b"connection: close\r\n\r\n").unwrap();
    client.write_all(&response[split + 4..]).unwrap();
}

#[test]
fn a_store_that_ignores_conditional_writes_is_refused_before_anything_is_written() {
    let moto = Moto::start();
    let repo = s3_repo(&moto);
    let proxy = IgnoringProxy::start(moto.port);
    let args = ["bake"];
    let output = moto
        .kiln(&repo)
        .env("AWS_ENDPOINT_URL", format!("http://127.0.0.1:{}", proxy.port))
        .args(args)
        .output()
        .unwrap();
    let refused = Run::of(output, &args).expect(1);
    assert!(refused.stderr.contains("ignores conditional writes"), "{}", refused.stderr);
    assert!(refused.stderr.contains(&ledger_url()), "the error names the ledger: {}", refused.stderr);
    assert_eq!(event_keys(&moto), [], "no event was written");
    let probes = versions(&moto, &format!("{PREFIX}/probe/"));
    assert_eq!(probes.len(), 1, "the probe wrote one key: {probes:?}");
    assert_eq!(probes[0].1, 2, "and the store let the second write overwrite it");
    assert!(no_marker(&repo), "nothing marks the store as checked");

    // The same bucket straight through moto, which honours If-None-Match, passes the probe and records.
    bake(&moto, &repo);
    assert!(!event_keys(&moto).is_empty());
}

fn no_marker(repo: &Repo) -> bool {
    walk(&repo.file(".kiln/cache/s3")).iter().all(|p| !p.ends_with("conditional-writes-checked"))
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    entries.flatten().flat_map(|e| if e.path().is_dir() { walk(&e.path()) } else { vec![e.path()] }).collect()
}

#[test]
fn a_missing_bucket_is_named() {
    let moto = Moto::start();
    let repo = Repo::empty();
    let args = ["log", "--ledger", "s3://no-such-bucket/kiln"];
    let failed = Run::of(moto.kiln(&repo).args(args).output().unwrap(), &args).expect(1);
    assert!(failed.stderr.contains("bucket `no-such-bucket` does not exist (NoSuchBucket)"), "{}", failed.stderr);
}

#[test]
fn an_unreachable_endpoint_or_no_credentials_is_a_clear_error_with_exit_1() {
    let repo = Repo::empty();
    let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let args = ["log", "--ledger", "s3://kiln-ledger/kiln"];
    let unreachable = Run::of(
        repo.kiln().envs(moto::aws_env(&format!("http://127.0.0.1:{closed}"))).args(args).output().unwrap(),
        &args,
    )
    .expect(1);
    assert!(
        unreachable.stderr.contains("s3://kiln-ledger/kiln: cannot reach the S3 endpoint"),
        "{}",
        unreachable.stderr
    );

    let moto = Moto::start();
    let no_keys: Vec<_> = moto
        .env()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("AWS_ACCESS_KEY") && !name.starts_with("AWS_SECRET"))
        .collect();
    let anonymous = Run::of(repo.kiln().envs(no_keys).args(args).output().unwrap(), &args).expect(1);
    assert!(anonymous.stderr.contains("no usable AWS credentials"), "{}", anonymous.stderr);
    for run in [&unreachable, &anonymous] {
        assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    }
}
