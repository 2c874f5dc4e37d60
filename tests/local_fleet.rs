//! The local fleet against real processes: the hello service compiled into an image root, plus small scripts for
//! instances that crash, hang, or ignore SIGTERM.

mod common;
mod hello_image;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hello_image::{get, healthz, hello_root, spec, Conn, Group, HELLO};
use kiln::config::recipe::Health;
use kiln::provider::local::fleet::{self, FleetError, InstanceHandle};

/// The role of the short-lived process that starts an instance and exits.
const STARTER: &str = "fleet-starter";

/// Generous bounds for waits that normally take milliseconds: a loaded CI machine must not fail a test, and a
/// wait that is really broken still fails it.
const PATIENCE: Duration = Duration::from_secs(30);

/// A fresh image root holding one executable script at `bin/<name>`.
fn script_root(dir: &Path, name: &str, body: &str) -> PathBuf {
    let root = dir.join(format!("root-{name}"));
    let path = root.join("bin").join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    root
}

fn wait_for_log(h: &InstanceHandle, needle: &str) {
    let deadline = Instant::now() + PATIENCE;
    while !fleet::log_tail(&h.log_path, 64 * 1024).contains(needle) {
        assert!(Instant::now() < deadline, "{needle:?} never appeared in {}", h.log_path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn three_instances_start_answer_and_stop() {
    let dir = tempfile::tempdir().unwrap();
    let mut group = Group::start(dir.path(), "fleet", 3);
    fleet::wait_healthy(&group.handles, &Health::Tcp, Instant::now() + PATIENCE).unwrap();
    for h in &group.handles {
        assert!(fleet::is_alive(h));
        assert_eq!(get(h.port, "/").unwrap(), (200, format!("hi from {}\n", h.name)));
        assert_eq!(get(h.port, "/healthz").unwrap(), (200, "ok".to_string()));
    }
    let handles = group.handles.clone();
    group.stop();
    for h in &handles {
        assert!(!fleet::is_alive(h), "{} still alive", h.name);
        assert!(get(h.port, "/").is_err(), "{} still answers", h.name);
        fleet::stop(h, Duration::from_secs(1)).unwrap();
    }
}

#[test]
fn instances_get_a_clean_environment_a_session_and_their_workdir() {
    let dir = tempfile::tempdir().unwrap();
    let root = script_root(dir.path(), "envdump", "env | sort; echo cwd=$(pwd); echo dumped; exec sleep 30");
    let spec = spec(dir.path(), &root, "envdump-1", &["/bin/envdump"]);
    let h = fleet::start(&spec).unwrap();
    wait_for_log(&h, "dumped");
    let log = fleet::log_tail(&h.log_path, 64 * 1024);
    let vars: Vec<&str> = log.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
    for expected in ["GREETING", "KILN_INSTANCE", "PATH", "PORT"] {
        assert!(vars.contains(&expected), "{expected} missing from:\n{log}");
    }
    assert!(log.contains(&format!("PORT={}\n", spec.port)) && log.contains("KILN_INSTANCE=envdump-1\n"), "{log}");
    assert!(!vars.iter().any(|v| v.starts_with("CARGO")), "the caller's environment leaked:\n{log}");
    let workdir = spec.workdir.canonicalize().unwrap();
    assert!(log.contains(&format!("cwd={}\n", workdir.display())), "{log}");

    let stat = std::fs::read_to_string(format!("/proc/{}/stat", h.pid)).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    assert_eq!(fields[3], h.pid.to_string(), "the instance leads its own session");
    assert_eq!(std::fs::read_link(format!("/proc/{}/fd/0", h.pid)).unwrap(), Path::new("/dev/null"));
    fleet::stop(&h, Duration::from_secs(2)).unwrap();
    assert!(!fleet::is_alive(&h));
}

#[test]
fn instance_that_exits_at_once_is_reported_died_with_its_log() {
    let dir = tempfile::tempdir().unwrap();
    let root = script_root(dir.path(), "crash", "echo 'boom: no config at /etc/hello.toml' >&2; exit 3");
    std::fs::copy("/bin/false", root.join("bin/false")).unwrap();
    for (name, command, needle) in [("false-1", "/bin/false", "starting false-1"), ("crash-1", "/bin/crash", "boom")] {
        let h = fleet::start(&spec(dir.path(), &root, name, &[command])).unwrap();
        // Died, not Timeout, is what shows the death was noticed before the deadline; the deadline is only a bound.
        match fleet::wait_healthy(std::slice::from_ref(&h), &healthz(), Instant::now() + PATIENCE) {
            Err(FleetError::Died { name: died, log_tail }) => {
                assert_eq!(died, name);
                assert!(log_tail.contains(needle), "log tail of {name}: {log_tail:?}");
            }
            other => panic!("{name}: expected Died, got {other:?}"),
        }
        assert!(!fleet::is_alive(&h));
        fleet::stop(&h, Duration::from_secs(1)).unwrap();
    }
}

#[test]
fn instance_that_never_gets_healthy_times_out_at_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let h = fleet::start(&spec(dir.path(), Path::new("/nonexistent"), "sleeper-1", &["sleep", "30"])).unwrap();
    let started = Instant::now();
    let result = fleet::wait_healthy(std::slice::from_ref(&h), &healthz(), started + Duration::from_secs(1));
    let took = started.elapsed();
    match result {
        Err(FleetError::Timeout { unhealthy, log_tail }) => {
            assert_eq!(unhealthy, ["sleeper-1"]);
            assert!(log_tail.contains("starting sleeper-1"), "{log_tail:?}");
        }
        other => panic!("expected Timeout, got {other:?}"),
    }
    // Never before the deadline; after it only by a poll interval, which a loaded machine may stretch.
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(1) + PATIENCE, "took {took:?}");
    fleet::stop(&h, Duration::from_secs(2)).unwrap();
    assert!(!fleet::is_alive(&h));
}

#[test]
fn bad_commands_fail_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    assert!(matches!(fleet::start(&spec(root, root, "e", &[])), Err(FleetError::EmptyCommand { .. })));
    assert!(matches!(fleet::start(&spec(root, root, "m", &["/bin/missing"])), Err(FleetError::Spawn { .. })));
    assert!(matches!(fleet::start(&spec(root, root, "p", &["no-such-kiln-cmd"])), Err(FleetError::NotOnPath { .. })));
    assert!(matches!(fleet::start(&spec(root, root, "o", &["/../sh"])), Err(FleetError::OutsideRoot { .. })));
}

/// The starter is this test re-run as a child that starts the instance, writes its handle and exits at once.
#[test]
fn instance_outlives_the_process_that_started_it() {
    if let Some(role) = common::child_role() {
        assert_eq!(role, STARTER);
        let dir = PathBuf::from(std::env::var_os("KILN_TEST_DIR").unwrap());
        let root = PathBuf::from(std::env::var_os("KILN_TEST_HELLO_ROOT").unwrap());
        let h = fleet::start(&spec(&dir, &root, "orphan-1", &[HELLO])).unwrap();
        std::fs::write(dir.join("handle.json"), serde_json::to_vec(&h).unwrap()).unwrap();
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = common::child_of("instance_outlives_the_process_that_started_it", STARTER)
        .env("KILN_TEST_DIR", dir.path())
        .env("KILN_TEST_HELLO_ROOT", hello_root())
        .output()
        .unwrap();
    assert!(out.status.success(), "starter failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let h: InstanceHandle = serde_json::from_slice(&std::fs::read(dir.path().join("handle.json")).unwrap()).unwrap();
    let group = Group { handles: vec![h.clone()] };
    fleet::wait_healthy(&group.handles, &healthz(), Instant::now() + PATIENCE).unwrap();
    assert!(fleet::is_alive(&h));
    assert_eq!(get(h.port, "/").unwrap(), (200, "hi from orphan-1\n".to_string()));
    fleet::stop(&h, Duration::from_secs(2)).unwrap();
    assert!(!fleet::is_alive(&h));
}

#[test]
fn a_handle_with_another_start_time_is_never_signalled() {
    let dir = tempfile::tempdir().unwrap();
    let group = Group::start(dir.path(), "reuse", 1);
    let real = group.handles[0].clone();
    let stale = InstanceHandle { start_time: real.start_time + 1, ..real.clone() };
    assert!(!fleet::is_alive(&stale));
    fleet::stop(&stale, Duration::from_millis(100)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(fleet::is_alive(&real), "stop on a stale handle signalled the process that now has its pid");
    assert_eq!(get(real.port, "/healthz").unwrap().0, 200);
}

#[test]
fn stop_escalates_to_sigkill_after_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let root = script_root(dir.path(), "stubborn", "trap '' TERM; echo ready; while :; do sleep 0.05; done");
    let h = fleet::start(&spec(dir.path(), &root, "stubborn-1", &["/bin/stubborn"])).unwrap();
    wait_for_log(&h, "ready");
    let started = Instant::now();
    fleet::stop(&h, Duration::from_millis(300)).unwrap();
    let took = started.elapsed();
    assert!(!fleet::is_alive(&h));
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(300) + PATIENCE, "took {took:?}");
}

#[test]
fn hello_keeps_connections_alive_and_skips_request_bodies() {
    let dir = tempfile::tempdir().unwrap();
    let group = Group::start(dir.path(), "keepalive", 1);
    let port = group.handles[0].port;
    let mut conn = Conn::open(port).unwrap();
    assert_eq!(conn.get("/").unwrap(), (200, "hi from keepalive-1\n".to_string()));
    let post = b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 11\r\n\r\nhello=world";
    assert_eq!(conn.send(post).unwrap().0, 404);
    let chunked = b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n\
                    5\r\nhello\r\n3;x=y\r\nabc\r\n0\r\nT: 1\r\n\r\n";
    assert_eq!(conn.send(chunked).unwrap().0, 404);
    assert_eq!(conn.get("/healthz?probe=1").unwrap(), (200, "ok".to_string()));
    assert_eq!(conn.get("/nope").unwrap().0, 404);
    let (status, headers, body) = conn.send(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
    assert_eq!((status, body.as_str()), (200, "hi from keepalive-1\n"));
    assert_eq!(headers.get("connection").map(String::as_str), Some("close"));
    assert!(conn.get("/").is_err(), "the connection must be closed after `Connection: close`");

    let mut conn = Conn::open(port).unwrap();
    assert_eq!(conn.send(b"GARBAGE\r\n\r\n").unwrap().0, 400);
}
