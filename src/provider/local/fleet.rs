//! Instances as detached local processes: starting them from an unpacked image root, telling whether one still
//! runs, stopping it, and probing its health.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::config::recipe::Health;

/// How much of an instance's log goes into an error.
pub const LOG_TAIL_BYTES: usize = 4096;

const POLL_FIRST: Duration = Duration::from_millis(20);
const POLL_MAX: Duration = Duration::from_millis(250);
/// A single probe never blocks `wait_healthy` for longer than this, so a hung instance cannot hide a dead one.
const PROBE_MAX: Duration = Duration::from_secs(1);
/// A SIGKILLed process is gone within milliseconds unless it is stuck in the kernel; past this `stop` reports it.
const KILL_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("instance {name}: the command is empty")]
    EmptyCommand { name: String },
    #[error("instance {name}: `{program}` leaves the image root")]
    OutsideRoot { name: String, program: String },
    #[error(
        "instance {name}: `{program}` is not on the host's PATH (local instances are host processes: a bare name is \
         looked up on the host's PATH, a path names a file inside the image){}",
        in_image.as_deref().map(|p| format!("; the image has `{p}`: use that path")).unwrap_or_default()
    )]
    NotOnPath { name: String, program: String, in_image: Option<String> },
    #[error("instance {name}: cannot create {}: {source}", path.display())]
    Prepare { name: String, path: PathBuf, source: io::Error },
    #[error("instance {name}: cannot start {}: {source}", program.display())]
    Spawn { name: String, program: PathBuf, source: io::Error },
    #[error("instance {name}: started as pid {pid}, but /proc/{pid}/stat is unreadable")]
    ProcStat { name: String, pid: i32 },
    #[error("instance {name} (pid {pid}): cannot send signal {signal}: {source}")]
    Signal { name: String, pid: i32, signal: i32, source: io::Error },
    #[error("instance {name} (pid {pid}) still runs {waited:?} after SIGKILL")]
    StillRunning { name: String, pid: i32, waited: Duration },
    #[error("instance {name} died before it became healthy; its log ends with:\n{log_tail}")]
    Died { name: String, log_tail: String },
    #[error("not healthy before the deadline: {}; the log of {} ends with:\n{log_tail}",
        unhealthy.join(", "), unhealthy.first().map_or("?", String::as_str))]
    Timeout { unhealthy: Vec<String>, log_tail: String },
    #[error("cannot find a free loopback port: {source}")]
    FreePort { source: io::Error },
}

/// What to run for one instance.
#[derive(Debug, Clone)]
pub struct InstanceSpec {
    pub name: String,
    /// Unpacked image root, read-only.
    pub root: PathBuf,
    /// `command[0]` is a path inside the image, or a bare name looked up on the host's PATH: a local instance is a
    /// host process (no chroot), so that is where a bare name is found when it runs.
    pub command: Vec<String>,
    /// Added to a clean environment that keeps only PATH and HOME; PORT and KILN_INSTANCE are set on top.
    pub env: BTreeMap<String, String>,
    pub port: u16,
    /// Created if missing; the process's working directory.
    pub workdir: PathBuf,
    /// stdout and stderr are appended here.
    pub log_path: PathBuf,
}

/// A started instance. `start_time` tells this process apart from a later one that got the same pid.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct InstanceHandle {
    pub name: String,
    pub pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: clock ticks after boot.
    pub start_time: u64,
    pub port: u16,
    pub log_path: PathBuf,
}

/// Starts the instance in a new session with stdin on /dev/null and output in its log, so it neither shares the
/// caller's terminal nor dies with it. The caller never waits for it.
pub fn start(spec: &InstanceSpec) -> Result<InstanceHandle, FleetError> {
    let name = &spec.name;
    let (first, args) = spec.command.split_first().ok_or_else(|| FleetError::EmptyCommand { name: name.clone() })?;

    let mut env: BTreeMap<String, OsString> = BTreeMap::new();
    for key in ["PATH", "HOME"] {
        if let Some(value) = std::env::var_os(key) {
            env.insert(key.to_string(), value);
        }
    }
    env.extend(spec.env.iter().map(|(k, v)| (k.clone(), OsString::from(v))));
    env.insert("PORT".to_string(), spec.port.to_string().into());
    env.insert("KILN_INSTANCE".to_string(), name.into());

    let program =
        resolve_program(&spec.root, first, env.get("PATH").map(OsString::as_os_str)).map_err(|e| match e {
            Resolve::OutsideRoot => FleetError::OutsideRoot { name: name.clone(), program: first.clone() },
            Resolve::NotOnPath => FleetError::NotOnPath {
                name: name.clone(),
                program: first.clone(),
                in_image: found_in_image(&spec.root, first),
            },
        })?;

    let prepare = |path: &Path, source| FleetError::Prepare { name: name.clone(), path: path.to_path_buf(), source };
    std::fs::create_dir_all(&spec.workdir).map_err(|e| prepare(&spec.workdir, e))?;
    if let Some(dir) = spec.log_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| prepare(dir, e))?;
    }
    let mut log =
        OpenOptions::new().create(true).append(true).open(&spec.log_path).map_err(|e| prepare(&spec.log_path, e))?;
    // A banner per start, because the log is appended across restarts and a tail must show where this run begins.
    let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let banner = format!("--- kiln: starting {name} on port {} at unix time {now}: {:?}\n", spec.port, spec.command);
    log.write_all(banner.as_bytes()).map_err(|e| prepare(&spec.log_path, e))?;
    let log_err = log.try_clone().map_err(|e| prepare(&spec.log_path, e))?;

    let mut cmd = Command::new(&program);
    cmd.args(args).env_clear().envs(&env).current_dir(&spec.workdir).stdin(Stdio::null()).stdout(log).stderr(log_err);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| if libc::setsid() < 0 { Err(io::Error::last_os_error()) } else { Ok(()) });
    }
    let child =
        cmd.spawn().map_err(|source| FleetError::Spawn { name: name.clone(), program: program.clone(), source })?;
    let Ok(pid) = i32::try_from(child.id()) else {
        return Err(FleetError::ProcStat { name: name.clone(), pid: -1 });
    };
    // Detached on purpose: the instance must outlive this process. If it exits while we live it stays a zombie
    // until `is_alive` or `stop` reaps it; the /proc entry of that zombie keeps its start time readable here.
    drop(child);
    let stat = read_stat(pid).ok_or_else(|| FleetError::ProcStat { name: name.clone(), pid })?;
    Ok(InstanceHandle {
        name: name.clone(),
        pid,
        start_time: stat.start_time,
        port: spec.port,
        log_path: spec.log_path.clone(),
    })
}

#[derive(Debug, PartialEq)]
enum Resolve {
    OutsideRoot,
    NotOnPath,
}

fn resolve_program(root: &Path, program: &str, path_var: Option<&std::ffi::OsStr>) -> Result<PathBuf, Resolve> {
    if program.contains('/') {
        let inside = Path::new(program.trim_start_matches('/'));
        // The image root is the instance's whole world; `..` would run a host binary the image does not carry.
        if inside.components().any(|c| !matches!(c, Component::Normal(_) | Component::CurDir)) {
            return Err(Resolve::OutsideRoot);
        }
        return Ok(root.join(inside));
    }
    let path_var = path_var.ok_or(Resolve::NotOnPath)?;
    std::env::split_paths(path_var)
        .filter(|dir| dir.is_absolute())
        .map(|dir| dir.join(program))
        .find(|candidate| {
            std::fs::metadata(candidate).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
        .ok_or(Resolve::NotOnPath)
}

/// Where the image itself carries a bare-named program, for the hint of a failed lookup.
fn found_in_image(root: &Path, program: &str) -> Option<String> {
    ["/usr/local/bin", "/usr/bin", "/bin", "/usr/local/sbin", "/usr/sbin", "/sbin", "/opt/bin"]
        .iter()
        .map(|dir| format!("{dir}/{program}"))
        .find(|inside| root.join(inside.trim_start_matches('/')).is_file())
}

#[derive(Debug, PartialEq)]
struct ProcStat {
    state: char,
    start_time: u64,
}

fn read_stat(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    parse_stat(&std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// The command name in field 2 may hold spaces and parentheses, so fields are counted from its last `)`.
fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    let state = fields.next()?.chars().next()?;
    // `fields` now starts at field 4.
    let start_time = fields.nth(22 - 4)?.parse().ok()?;
    Some(ProcStat { state, start_time })
}

/// Reaps `pid` if it is our own exited child, so a long-lived caller does not collect zombies. Only called once
/// the zombie is known to be this instance, whose pid cannot be reused before it is reaped.
fn reap_if_child(pid: i32) {
    // SAFETY: a null status pointer is allowed; WNOHANG makes this return at once.
    unsafe {
        libc::waitpid(pid, std::ptr::null_mut(), libc::WNOHANG);
    }
}

/// True while the process with this pid is the one that was started (same start time) and has not exited.
pub fn is_alive(h: &InstanceHandle) -> bool {
    match read_stat(h.pid) {
        Some(stat) if stat.start_time == h.start_time => {
            if matches!(stat.state, 'Z' | 'X') {
                reap_if_child(h.pid);
                false
            } else {
                true
            }
        }
        _ => false,
    }
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: plain syscall with integer arguments.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just handed us this descriptor and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_signal(fd: &OwnedFd, signal: i32) -> io::Result<()> {
    // SAFETY: a null siginfo is allowed and means "as kill(2) would send it".
    let r = unsafe {
        libc::syscall(libc::SYS_pidfd_send_signal, fd.as_raw_fd(), signal, std::ptr::null::<libc::siginfo_t>(), 0)
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Waits until the process behind `fd` has exited (a pidfd turns readable then), up to `timeout`.
fn pidfd_wait(fd: &OwnedFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ms = i32::try_from(left.as_millis()).unwrap_or(i32::MAX);
        let mut pfd = libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r > 0 {
            return true;
        }
        if r < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
            continue;
        }
        if r < 0 || left.is_zero() {
            return false;
        }
    }
}

/// Sends `signal` to the instance's whole process group, so helpers it forked go with it. The pidfd was verified
/// to be this instance and is polled first: while the session leader has not exited, its pid is still its group's
/// id and cannot belong to anybody else.
fn signal_group(h: &InstanceHandle, fd: &OwnedFd, signal: i32) -> Result<(), FleetError> {
    if pidfd_wait(fd, Duration::ZERO) {
        return Ok(());
    }
    // SAFETY: plain syscall; h.pid > 1 is checked by the caller, so this never means "every process".
    if unsafe { libc::kill(-h.pid, signal) } == 0 {
        return Ok(());
    }
    // The group may be gone or out of reach while the leader still is not; the pidfd reaches exactly the leader.
    pidfd_signal(fd, signal)
        .or_else(|e| if e.raw_os_error() == Some(libc::ESRCH) { Ok(()) } else { Err(e) })
        .map_err(|source| FleetError::Signal { name: h.name.clone(), pid: h.pid, signal, source })
}

/// SIGTERM, then SIGKILL after `grace`. A pid that now belongs to another process is never signalled: the pidfd
/// is opened first and only trusted once the start time behind it matches.
pub fn stop(h: &InstanceHandle, grace: Duration) -> Result<(), FleetError> {
    if h.pid <= 1 {
        return Ok(());
    }
    let fd = match pidfd_open(h.pid) {
        Ok(fd) => fd,
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => return Ok(()),
        Err(source) => return Err(FleetError::Signal { name: h.name.clone(), pid: h.pid, signal: 0, source }),
    };
    if !is_alive(h) {
        return Ok(());
    }
    signal_group(h, &fd, libc::SIGTERM)?;
    if !pidfd_wait(&fd, grace) {
        signal_group(h, &fd, libc::SIGKILL)?;
        if !pidfd_wait(&fd, KILL_WAIT) {
            return Err(FleetError::StillRunning { name: h.name.clone(), pid: h.pid, waited: KILL_WAIT });
        }
    }
    reap_if_child(h.pid);
    Ok(())
}

/// One probe. HTTP: `GET path` answered with a 2xx status; TCP: a connection is accepted.
pub fn check_health(port: u16, health: &Health, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let Ok(stream) = TcpStream::connect_timeout(&addr, timeout.max(Duration::from_millis(1))) else {
        return false;
    };
    match health {
        Health::Tcp => true,
        Health::Http(path) => http_status(stream, port, path, deadline).is_some_and(|s| (200..300).contains(&s)),
    }
}

fn http_status(mut stream: TcpStream, port: u16, path: &str, deadline: Instant) -> Option<u16> {
    // A path that would break the request line cannot name a healthy endpoint.
    if !path.starts_with('/') || path.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) {
        return None;
    }
    let left = |d: Instant| Some(d.saturating_duration_since(Instant::now())).filter(|t| !t.is_zero());
    stream.set_write_timeout(Some(left(deadline)?)).ok()?;
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: kiln-health\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(request.as_bytes()).ok()?;
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        stream.set_read_timeout(Some(left(deadline)?)).ok()?;
        let n = stream.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = std::str::from_utf8(&head[..head.iter().position(|&b| b == b'\n')?]).ok()?;
    let mut parts = line.split_ascii_whitespace();
    if !parts.next()?.starts_with("HTTP/1.") {
        return None;
    }
    parts.next()?.parse().ok()
}

/// Polls every instance until all are healthy, one has died, or `deadline` passes.
pub fn wait_healthy(hs: &[InstanceHandle], health: &Health, deadline: Instant) -> Result<(), FleetError> {
    let mut healthy = vec![false; hs.len()];
    let mut interval = POLL_FIRST;
    loop {
        for (h, ok) in hs.iter().zip(healthy.iter_mut()) {
            // Checked every round, also for healthy ones: an instance that crashes right after its first good
            // answer must not pass.
            if !is_alive(h) {
                return Err(FleetError::Died { name: h.name.clone(), log_tail: log_tail(&h.log_path, LOG_TAIL_BYTES) });
            }
            if !*ok {
                let left = deadline.saturating_duration_since(Instant::now());
                *ok = check_health(h.port, health, left.clamp(Duration::from_millis(10), PROBE_MAX));
            }
        }
        if healthy.iter().all(|&ok| ok) {
            return Ok(());
        }
        let now = Instant::now();
        if now >= deadline {
            let unhealthy: Vec<&InstanceHandle> =
                hs.iter().zip(&healthy).filter(|(_, &ok)| !ok).map(|(h, _)| h).collect();
            let log_tail = unhealthy.first().map(|h| log_tail(&h.log_path, LOG_TAIL_BYTES)).unwrap_or_default();
            return Err(FleetError::Timeout {
                unhealthy: unhealthy.iter().map(|h| h.name.clone()).collect(),
                log_tail,
            });
        }
        std::thread::sleep(interval.min(deadline - now));
        interval = (interval * 2).min(POLL_MAX);
    }
}

/// The last `max_bytes` of a log, starting at a line boundary when one is near; empty when there is no log.
pub fn log_tail(path: &Path, max_bytes: usize) -> String {
    let Ok(mut file) = File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(max_bytes as u64);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::with_capacity(max_bytes.min(1 << 20));
    if file.take(max_bytes as u64).read_to_end(&mut buf).is_err() {
        return String::new();
    }
    if start > 0 {
        if let Some(i) = buf.iter().position(|&b| b == b'\n').filter(|&i| i + 1 < buf.len()) {
            buf.drain(..=i);
        }
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// A loopback port nobody listens on right now. Another process may take it before it is used; callers that
/// start an instance on it learn that from the health check.
pub fn free_port() -> Result<u16, FleetError> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).map_err(|source| FleetError::FreePort { source })?;
    let port = listener.local_addr().map_err(|source| FleetError::FreePort { source })?.port();
    Ok(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_are_counted_after_the_last_paren() {
        let line = "4242 (we ird) (name)) S 1 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 12345 67 \
                    18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        assert_eq!(parse_stat(line), Some(ProcStat { state: 'S', start_time: 987654 }));
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) Z 1"), None);
    }

    #[test]
    fn own_process_reads_as_alive_and_a_wrong_start_time_does_not() {
        let pid = std::process::id() as i32;
        let stat = read_stat(pid).unwrap();
        let h = InstanceHandle { name: "me".into(), pid, start_time: stat.start_time, port: 1, log_path: "x".into() };
        assert!(is_alive(&h));
        assert!(!is_alive(&InstanceHandle { start_time: stat.start_time + 1, ..h.clone() }));
        assert!(!is_alive(&InstanceHandle { pid: 0, ..h.clone() }));
        assert!(!is_alive(&InstanceHandle { pid: -1, ..h }));
    }

    #[test]
    fn stop_ignores_pids_that_could_mean_a_group_or_everyone() {
        for pid in [-1, 0, 1] {
            let h = InstanceHandle { name: "x".into(), pid, start_time: 0, port: 1, log_path: "x".into() };
            stop(&h, Duration::ZERO).unwrap();
        }
    }

    #[test]
    fn programs_resolve_inside_the_root_or_on_path() {
        let root = Path::new("/img");
        assert_eq!(resolve_program(root, "/opt/a/bin/a", None), Ok(PathBuf::from("/img/opt/a/bin/a")));
        assert_eq!(resolve_program(root, "opt/a", None), Ok(PathBuf::from("/img/opt/a")));
        assert_eq!(resolve_program(root, "/opt/../../etc/x", None), Err(Resolve::OutsideRoot));
        let path = std::env::join_paths(["relative", "/nonexistent-kiln", "/bin", "/usr/bin"]).unwrap();
        let sh = resolve_program(root, "sh", Some(&path)).unwrap();
        assert!(sh.is_absolute() && sh.ends_with("sh"), "{sh:?}");
        assert_eq!(resolve_program(root, "no-such-kiln-program", Some(&path)), Err(Resolve::NotOnPath));
        assert_eq!(resolve_program(root, "sh", None), Err(Resolve::NotOnPath));
    }

    #[test]
    fn log_tail_cuts_at_a_line_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        assert_eq!(log_tail(&path, 100), "");
        std::fs::write(&path, "first line\nsecond line\nthird\n").unwrap();
        assert_eq!(log_tail(&path, 1000), "first line\nsecond line\nthird\n");
        assert_eq!(log_tail(&path, 15), "third\n");
        std::fs::write(&path, "one very long line without breaks").unwrap();
        assert_eq!(log_tail(&path, 6), "breaks");
    }

    #[test]
    fn free_port_is_bindable() {
        let port = free_port().unwrap();
        assert_ne!(port, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
    }

    #[test]
    fn health_probes_fail_fast_on_a_closed_port() {
        let port = free_port().unwrap();
        assert!(!check_health(port, &Health::Tcp, Duration::from_millis(200)));
        assert!(!check_health(port, &Health::Http("/healthz".into()), Duration::from_millis(200)));
    }

    #[test]
    fn http_probe_needs_a_2xx_status() {
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            for status in ["200 OK", "204 No Content", "503 Service Unavailable", "301 Moved"] {
                let (mut s, _) = listener.accept().unwrap();
                let mut buf = [0u8; 512];
                let _ = s.read(&mut buf).unwrap();
                write!(s, "HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").unwrap();
            }
        });
        let http = Health::Http("/healthz".into());
        let got: Vec<bool> = (0..4).map(|_| check_health(port, &http, Duration::from_secs(2))).collect();
        assert_eq!(got, [true, true, false, false]);
        server.join().unwrap();
        assert!(!check_health(port, &Health::Http("/bad path".into()), Duration::from_millis(100)));
    }
}
