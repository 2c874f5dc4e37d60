//! The stage's supervisor (`kiln proxy-serve --supervise`, which `kiln deploy` starts detached): it holds the
//! stage's listening socket, runs the forwarding proxy as a child process and starts another when that one dies,
//! and restarts dead instances of the group the stage routes to. The local analogue of a load balancer that stays
//! up while a node behind it is replaced, and of an Auto Scaling group replacing a failed instance.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::proxy::{self, ProxyError};
use super::stage;

/// How often the supervisor looks at its proxy worker: a dead one is noticed within this.
const TICK: Duration = Duration::from_millis(10);
/// How often it looks at the routed group's instances (each look reads a few small files).
const INSTANCE_LOOK: Duration = Duration::from_millis(200);
/// The descriptor the proxy worker finds the listening socket at.
pub const INHERITED_FD: RawFd = 3;
/// The name the worker's restarts are tracked under, next to instance names.
const WORKER: &str = "proxy worker";

/// Restart pacing per process: one that ran for a while is restarted at once; one that keeps dying soon after it
/// starts waits longer each time, so a crash loop costs little and its log stays readable.
#[derive(Default)]
struct Backoff {
    by_name: BTreeMap<String, Pacing>,
}

#[derive(Default)]
struct Pacing {
    started: Option<Instant>,
    delay: Duration,
    not_before: Option<Instant>,
}

impl Backoff {
    const MIN: Duration = Duration::from_millis(100);
    const MAX: Duration = Duration::from_secs(30);
    /// A process that ran this long before it died is restarted at once.
    const STABLE: Duration = Duration::from_secs(10);

    /// Asked for a process found dead at `now`: whether to restart it now. Counts the restart when it says yes.
    fn allow(&mut self, name: &str, now: Instant) -> bool {
        let pacing = self.by_name.entry(name.to_string()).or_default();
        match pacing.not_before {
            Some(when) if now < when => return false,
            Some(_) => pacing.not_before = None,
            None => {
                let short_lived = pacing.started.is_some_and(|s| now.duration_since(s) < Self::STABLE);
                pacing.delay =
                    if short_lived { (pacing.delay * 2).clamp(Self::MIN, Self::MAX) } else { Duration::ZERO };
                if !pacing.delay.is_zero() {
                    pacing.not_before = Some(now + pacing.delay);
                    return false;
                }
            }
        }
        pacing.started = Some(now);
        true
    }
}

/// Runs the stage's supervisor until SIGTERM or SIGINT, then stops its proxy worker (which finishes the requests
/// in progress) and returns.
pub fn supervise(port: u16, routes_file: &Path, status_file: &Path) -> Result<(), ProxyError> {
    proxy::install_signal_handlers()?;
    let listener = proxy::bind_std(port)?;
    let stage_dir = routes_file.parent().unwrap_or(Path::new("."));
    let exe = std::env::current_exe().map_err(|source| ProxyError::Runtime { source })?;
    let start = || start_worker(&exe, &listener, port, routes_file, status_file);
    let mut backoff = Backoff::default();
    backoff.allow(WORKER, Instant::now());
    let mut worker = Some(start().map_err(|source| ProxyError::Runtime { source })?);
    let mut last_look: Option<Instant> = None;
    while !proxy::SHUTDOWN.load(Ordering::SeqCst) {
        let now = Instant::now();
        if let Some(child) = worker.as_mut() {
            if let Ok(Some(status)) = child.try_wait() {
                tracing::warn!(pid = child.id(), %status, "supervisor: the proxy worker died; starting another");
                worker = None;
            }
        }
        if worker.is_none() && backoff.allow(WORKER, now) {
            match start() {
                Ok(child) => {
                    tracing::info!(pid = child.id(), "supervisor: proxy worker started");
                    worker = Some(child);
                }
                Err(e) => tracing::warn!(error = %e, "supervisor: cannot start a proxy worker"),
            }
        }
        if last_look.is_none_or(|at| now.duration_since(at) >= INSTANCE_LOOK) {
            last_look = Some(now);
            match stage::restart_dead_routed(stage_dir, &mut |name| backoff.allow(name, now)) {
                Ok(restarts) => {
                    for restart in restarts {
                        match restart.outcome {
                            Ok(pid) => {
                                tracing::warn!(instance = restart.instance, pid, "supervisor: instance died; restarted")
                            }
                            Err(error) => {
                                tracing::warn!(instance = restart.instance, error, "supervisor: cannot restart")
                            }
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "supervisor: cannot look at the stage's instances"),
            }
        }
        std::thread::sleep(TICK);
    }
    if let Some(child) = worker.as_mut() {
        stop_worker(child);
    }
    // A status left behind would claim a proxy that no longer runs.
    let _ = std::fs::remove_file(status_file);
    Ok(())
}

/// `kiln proxy-serve` for a stage's port, routes file and status file, with no stdin: the supervisor and the
/// worker it runs are both this command, with their own flags added.
pub(crate) fn proxy_serve(exe: &Path, port: u16, routes_file: &Path, status_file: &Path) -> Command {
    let mut command = Command::new(exe);
    command
        .arg("proxy-serve")
        .arg("--port")
        .arg(port.to_string())
        .arg("--routes")
        .arg(routes_file)
        .arg("--status")
        .arg(status_file)
        .stdin(Stdio::null());
    command
}

/// Starts `kiln proxy-serve` on the inherited socket. It dies with the supervisor (PR_SET_PDEATHSIG), so a killed
/// supervisor never leaves a proxy that holds the stage's port with nobody to restart or stop it.
fn start_worker(
    exe: &Path,
    listener: &std::net::TcpListener,
    port: u16,
    routes_file: &Path,
    status_file: &Path,
) -> io::Result<Child> {
    let fd = listener.as_raw_fd();
    let supervisor = std::process::id() as i32;
    let mut command = proxy_serve(exe, port, routes_file, status_file);
    command.arg("--listen-fd").arg(INHERITED_FD.to_string());
    // SAFETY: only async-signal-safe calls (fcntl, dup2, prctl, getppid) between fork and exec.
    unsafe {
        command.pre_exec(move || {
            let placed =
                if fd == INHERITED_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, INHERITED_FD) };
            if placed < 0 || libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != supervisor {
                return Err(io::Error::other("the supervisor exited while starting its proxy worker"));
            }
            Ok(())
        });
    }
    command.spawn()
}

/// SIGTERM, then up to the proxy's own shutdown grace (and a little) for it to finish requests, then SIGKILL.
fn stop_worker(child: &mut Child) {
    // SAFETY: plain syscall on our own child, not yet reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + proxy::SHUTDOWN_GRACE + Duration::from_secs(1);
    while Instant::now() < deadline {
        if !matches!(child.try_wait(), Ok(None)) {
            return;
        }
        std::thread::sleep(TICK);
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_that_keeps_dying_soon_after_starting_waits_longer_each_time() {
        let mut backoff = Backoff::default();
        let t0 = Instant::now();
        assert!(backoff.allow("a", t0), "the first death is restarted at once");
        let t1 = t0 + Duration::from_secs(1);
        assert!(!backoff.allow("a", t1), "dead again after 1 s: waits");
        assert!(!backoff.allow("a", t1 + Duration::from_millis(50)));
        let t2 = t1 + Backoff::MIN;
        assert!(backoff.allow("a", t2), "restarted once its delay passed");
        assert!(!backoff.allow("a", t2 + Duration::from_millis(10)));
        assert!(!backoff.allow("a", t2 + Duration::from_millis(10) + Backoff::MIN), "the delay doubled");
        assert!(backoff.allow("a", t2 + Duration::from_millis(10) + Backoff::MIN * 2));
        assert!(backoff.allow("b", t2), "each process has its own pacing");
    }

    #[test]
    fn a_process_that_ran_a_while_is_restarted_at_once() {
        let mut backoff = Backoff::default();
        let t0 = Instant::now();
        assert!(backoff.allow("a", t0));
        assert!(backoff.allow("a", t0 + Backoff::STABLE));
        assert!(backoff.allow("a", t0 + Backoff::STABLE * 2));
    }
}
