//! The stage proxy as a real process in front of real hello instances: a group switch, the old group's stop and an
//! abruptly killed backend must all be invisible to clients on keep-alive connections. The proxy is `kiln
//! proxy-serve`, the process `kiln deploy` starts.

mod hello_image;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hello_image::{get, Conn, Group};
use kiln::provider::local::fleet;
use kiln::provider::local::proxy::{self, Routes};

/// A proxy process, SIGKILLed on drop unless it was terminated.
struct Proxy {
    child: Child,
    port: u16,
    routes: PathBuf,
    status: PathBuf,
    log: PathBuf,
}

impl Proxy {
    fn spawn(dir: &Path) -> Proxy {
        let port = fleet::free_port().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .arg("proxy-serve")
            .arg("--port")
            .arg(port.to_string())
            .arg("--routes")
            .arg(dir.join("routes.json"))
            .arg("--status")
            .arg(dir.join("status.json"))
            .env_clear()
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("proxy.log")).unwrap())
            .spawn()
            .unwrap();
        let proxy = Proxy {
            child,
            port,
            routes: dir.join("routes.json"),
            status: dir.join("status.json"),
            log: dir.join("proxy.log"),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while proxy::read_status(&proxy.status).is_none_or(|s| s.pid != proxy.child.id() as i32) {
            assert!(Instant::now() < deadline, "the proxy never wrote its status");
            std::thread::sleep(Duration::from_millis(5));
        }
        proxy
    }

    /// Writes routes and waits until the proxy applied them; returns the time between the two.
    fn route(&self, generation: u64, backends: &[u16]) -> Duration {
        proxy::write_routes(&self.routes, &Routes { generation, backends: backends.to_vec() }).unwrap();
        proxy::wait_applied(&self.status, generation, Duration::from_secs(5)).unwrap()
    }

    fn terminate(&mut self) -> ExitStatus {
        // SAFETY: plain syscall on our own child, which has not been waited for yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < deadline, "the proxy ignored SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// One request's outcome: when it was sent, and the body of a 200 or what went wrong.
struct Sample {
    sent: Instant,
    outcome: Result<String, String>,
}

/// Clients on persistent connections, each sending `GET /` with a short pause, until `max` requests in all,
/// or `limit` time. Any non-200 or transport error is a failed sample; the client then reconnects.
struct Load {
    total: Arc<AtomicUsize>,
    threads: Vec<std::thread::JoinHandle<Vec<Sample>>>,
}

impl Load {
    fn start(port: u16, clients: usize, max: usize, limit: Duration, pause: Duration) -> Load {
        let total = Arc::new(AtomicUsize::new(0));
        let end = Instant::now() + limit;
        let threads = (0..clients)
            .map(|_| {
                let total = Arc::clone(&total);
                std::thread::spawn(move || {
                    let mut samples = Vec::new();
                    let mut conn = Conn::open(port).ok();
                    while Instant::now() < end && total.load(Ordering::SeqCst) < max {
                        let sent = Instant::now();
                        let outcome = match conn.as_mut().map(|c| c.get("/")) {
                            Some(Ok((200, body))) => Ok(body),
                            Some(Ok((status, body))) => Err(format!("status {status}: {body}")),
                            Some(Err(e)) => Err(format!("transport: {e}")),
                            None => Err("cannot connect".to_string()),
                        };
                        if outcome.is_err() {
                            conn = Conn::open(port).ok();
                        }
                        samples.push(Sample { sent, outcome });
                        total.fetch_add(1, Ordering::SeqCst);
                        std::thread::sleep(pause);
                    }
                    samples
                })
            })
            .collect();
        Load { total, threads }
    }

    fn sent(&self) -> usize {
        self.total.load(Ordering::SeqCst)
    }

    fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.sent() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn finish(self) -> Vec<Sample> {
        self.threads.into_iter().flat_map(|t| t.join().unwrap()).collect()
    }
}

fn failures(samples: &[Sample]) -> Vec<&String> {
    samples.iter().filter_map(|s| s.outcome.as_ref().err()).collect()
}

#[test]
fn switching_groups_under_load_fails_no_request() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = Group::start(dir.path(), "hello-a", 3);
    let b = Group::start(dir.path(), "hello-b", 3);
    let proxy = Proxy::spawn(dir.path());
    proxy.route(1, &a.ports());

    let load = Load::start(proxy.port, 4, 2000, Duration::from_secs(10), Duration::from_millis(1));
    load.wait_for(400);
    let switched_at = load.sent();
    let applied_after = proxy.route(2, &b.ports());
    let applied_at = Instant::now();
    let drain_started = Instant::now();
    proxy::wait_drained(&proxy.status, &a.ports(), Duration::from_secs(5)).unwrap();
    let drained_after = drain_started.elapsed();
    a.stop();
    let stopped_at = Instant::now();
    let sent_at_stop = load.sent();
    let samples = load.finish();

    let failed = failures(&samples);
    let after_switch: Vec<&Sample> = samples.iter().filter(|s| s.sent >= applied_at).collect();
    let after_stop = samples.iter().filter(|s| s.sent >= stopped_at).count();
    println!(
        "switch under load: {} requests sent ({switched_at} before the switch, {} after it, \
         {after_stop} after A stopped), \
         {} failed; write_routes -> applied {applied_after:?}; drained in {drained_after:?}",
        samples.len(),
        after_switch.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{} failed requests, first: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert!(samples.iter().any(|s| s.outcome.as_ref().is_ok_and(|b| b.contains("from hello-a-"))), "A never answered");
    for s in &after_switch {
        let body = s.outcome.as_ref().unwrap();
        assert!(body.starts_with("hi from hello-b-"), "answered by the old group after the switch: {body:?}");
    }
    assert!(sent_at_stop < samples.len() && after_stop > 0, "the load ended before A was stopped");
    for port in b.ports() {
        assert!(after_switch.iter().any(|s| s
            .outcome
            .as_ref()
            .unwrap()
            .ends_with(&format!("-{}\n", port_index(&b, port)))));
    }
    assert!(proxy::read_status(&proxy.status).unwrap().in_flight.keys().all(|p| b.ports().contains(p)));
}

/// The instance number (1-based) of the group member listening on `port`.
fn port_index(group: &Group, port: u16) -> usize {
    group.handles.iter().position(|h| h.port == port).unwrap() + 1
}

#[test]
fn a_backend_killed_abruptly_is_retried_on_another() {
    let dir = tempfile::tempdir().unwrap();
    let group = Group::start(dir.path(), "hello-k", 3);
    let proxy = Proxy::spawn(dir.path());
    proxy.route(1, &group.ports());

    let load = Load::start(proxy.port, 4, 1200, Duration::from_secs(10), Duration::ZERO);
    load.wait_for(200);
    let victim = &group.handles[1];
    // SAFETY: plain syscall; the pid is our live child (checked just before).
    assert!(fleet::is_alive(victim));
    unsafe { libc::kill(victim.pid, libc::SIGKILL) };
    let killed_at = Instant::now();
    let sent_at_kill = load.sent();
    let samples = load.finish();

    let failed = failures(&samples);
    let after_kill: Vec<&Sample> = samples.iter().filter(|s| s.sent >= killed_at).collect();
    println!(
        "killed backend: {} requests sent ({sent_at_kill} before the kill), {} failed",
        samples.len(),
        failed.len()
    );
    assert!(failed.is_empty(), "{} failed requests, first: {:?}", failed.len(), &failed[..failed.len().min(5)]);
    assert!(after_kill.len() > 100, "too few requests after the kill: {}", after_kill.len());
    let log = std::fs::read_to_string(&proxy.log).unwrap();
    assert!(log.contains("proxy: backend"), "no retry was needed, so the test proved nothing:\n{log}");
    for s in after_kill {
        assert!(!s.outcome.as_ref().unwrap().contains(&victim.name), "a dead backend answered");
    }
    // Still in routes, the dead backend keeps costing no client a failure.
    let mut conn = Conn::open(proxy.port).unwrap();
    for _ in 0..30 {
        assert_eq!(conn.get("/").unwrap().0, 200);
    }
}

#[test]
fn empty_routes_answer_503_and_dead_ones_502() {
    let dir = tempfile::tempdir().unwrap();
    let group = Group::start(dir.path(), "hello-e", 1);
    let mut proxy = Proxy::spawn(dir.path());
    let status = proxy::read_status(&proxy.status).unwrap();
    assert_eq!((status.port, status.generation), (proxy.port, 0));
    assert_eq!(get(proxy.port, "/").unwrap().0, 503, "no routes file yet");

    proxy.route(1, &[]);
    let mut conn = Conn::open(proxy.port).unwrap();
    assert_eq!(conn.get("/").unwrap().0, 503);

    let dead = fleet::free_port().unwrap();
    proxy.route(2, &[dead]);
    assert_eq!(conn.get("/").unwrap().0, 502);

    proxy.route(3, &[dead, group.ports()[0]]);
    for _ in 0..10 {
        assert_eq!(conn.get("/").unwrap(), (200, "hi from hello-e-1\n".to_string()));
    }

    let exit = proxy.terminate();
    assert!(exit.success(), "the proxy did not exit cleanly on SIGTERM: {exit:?}");
    assert!(proxy::read_status(&proxy.status).is_none(), "the status file outlived the proxy");
}

#[test]
fn request_bodies_are_forwarded_and_replayed_after_a_refused_connect() {
    let dir = tempfile::tempdir().unwrap();
    let group = Group::start(dir.path(), "hello-p", 1);
    let proxy = Proxy::spawn(dir.path());
    let dead = fleet::free_port().unwrap();
    let mut conn = Conn::open(proxy.port).unwrap();
    // 100 KiB is buffered and replayed; 3 MiB is streamed, so it is only ever sent after a connect succeeded.
    for size in [100 * 1024, 3 * 1024 * 1024] {
        for generation in 1..=2u64 {
            // Both orders, so the dead backend is tried first at least once for each size.
            let backends = if generation == 1 { [dead, group.ports()[0]] } else { [group.ports()[0], dead] };
            proxy.route(size as u64 * 10 + generation, &backends);
            for _ in 0..2 {
                let mut request =
                    format!("POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: {size}\r\n\r\n").into_bytes();
                request.resize(request.len() + size, b'x');
                let (status, _, body) = conn.send(&request).unwrap();
                assert_eq!((status, body.as_str()), (404, "not found\n"), "{size} bytes via {backends:?}");
            }
        }
    }
    assert_eq!(conn.get("/").unwrap(), (200, "hi from hello-p-1\n".to_string()));
}
