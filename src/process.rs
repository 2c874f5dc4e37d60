//! Running a child command with a timeout: its own process group, which the command does not outlive (the
//! timeout, an interrupt, or the end of the step kill and wait for all of it), its output streamed line by line,
//! hashed whole and kept as a tail.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::digest::{Digest, StreamHasher};

pub const TAIL_BYTES: usize = 4096;

/// How long a killed group may take to disappear (a process in uninterruptible sleep dies only when it wakes).
const KILL_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct Finished {
    /// The exit code; None when killed by a signal or by the timeout.
    pub code: Option<i32>,
    /// The timeout passed while the command or anything it started still ran, or still held its output open.
    pub timed_out: bool,
    /// kiln was interrupted (SIGINT/SIGTERM, see [`catch_interrupts`]) while the command ran.
    pub interrupted: bool,
    /// sha256 of stdout and stderr as interleaved lines.
    pub output_sha256: Digest,
    /// The last [`TAIL_BYTES`] of output.
    pub tail: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.code == Some(0) && !self.timed_out && !self.interrupted
    }

    /// Why it did not succeed, for messages.
    pub fn failure_reason(&self, timeout: Duration) -> String {
        match (self.interrupted, self.timed_out, self.code) {
            (true, _, _) => "interrupted".into(),
            (false, true, _) => format!("timed out after {}", humantime::format_duration(timeout)),
            (false, false, Some(code)) => format!("exited with code {code}"),
            (false, false, None) => "killed by a signal".into(),
        }
    }
}

static INTERRUPTED: OnceLock<Arc<AtomicBool>> = OnceLock::new();

/// From now on SIGINT and SIGTERM no longer end kiln at once: they set a flag that [`interrupted`] reads, a running
/// command's process group is killed, and the caller unwinds (removing its temporary files) and exits 130. Only
/// commands that check [`interrupted`] between their own steps should call this.
pub fn catch_interrupts() -> std::io::Result<()> {
    let flag = INTERRUPTED.get_or_init(|| Arc::new(AtomicBool::new(false)));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second Ctrl-C while kiln still unwinds ends it at once, as a person pressing it twice expects.
        signal_hook::flag::register_conditional_default(signal, Arc::clone(flag))?;
        signal_hook::flag::register(signal, Arc::clone(flag))?;
    }
    Ok(())
}

/// Whether SIGINT or SIGTERM arrived since [`catch_interrupts`].
pub fn interrupted() -> bool {
    INTERRUPTED.get().is_some_and(|flag| flag.load(Ordering::SeqCst))
}

struct Collected {
    hasher: StreamHasher,
    tail: Vec<u8>,
}

/// Why the wait for the command ended.
enum Ended {
    /// The leader exited and nothing else of its group is left.
    Done,
    TimedOut,
    Interrupted,
}

/// Runs `command` (stdin closed, stdout and stderr captured) in a process group of its own. It is finished when
/// its leader has exited and no process of its group is left; at the timeout (or an interrupt) the whole group is
/// killed, and `run` returns only once the group is gone. `echo` sees each output line as it arrives.
///
/// A process that leaves the group (`setsid`, a daemon) escapes this: only a cgroup could hold it. If such a
/// process keeps the output pipes open, the run stops reading at the timeout and counts as timed out.
pub fn run(command: &mut Command, timeout: Duration, echo: Option<fn(&str)>) -> std::io::Result<Finished> {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let started = Instant::now();
    let deadline = started + timeout;
    let mut child = command.spawn()?;
    let Ok(group) = i32::try_from(child.id()) else {
        kill_and_reap(&mut child);
        return Err(std::io::Error::other("child process id out of range"));
    };
    let collected = Arc::new(Mutex::new(Collected { hasher: StreamHasher::new(), tail: Vec::new() }));
    let streams = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    let (reader_done, readers_done) = mpsc::channel::<()>();
    let mut readers = 0;
    for stream in streams.into_iter().flatten() {
        let collected = Arc::clone(&collected);
        let done = reader_done.clone();
        readers += 1;
        std::thread::spawn(move || {
            for line in BufReader::new(stream).split(b'\n').map_while(Result::ok) {
                if let Some(echo) = echo {
                    echo(&String::from_utf8_lossy(&line));
                }
                let Ok(mut c) = collected.lock() else { return };
                c.hasher.update(&line);
                c.hasher.update(b"\n");
                c.tail.extend_from_slice(&line);
                c.tail.push(b'\n');
                if c.tail.len() > 2 * TAIL_BYTES {
                    let cut = c.tail.len() - TAIL_BYTES;
                    c.tail.drain(..cut);
                }
            }
            let _ = done.send(());
        });
    }
    drop(reader_done);

    // The leader is not reaped until its group is gone: while it is a zombie its pid, which is the group id,
    // cannot be reused, so signalling the group never reaches a stranger.
    let ended = loop {
        if process_state(group) == Some('Z') && group_members(group).is_empty() {
            break Ended::Done;
        }
        if interrupted() {
            break Ended::Interrupted;
        }
        if Instant::now() >= deadline {
            break Ended::TimedOut;
        }
        // Quick steps end promptly; a long one (or background work outliving its leader, which costs a /proc scan
        // per poll) is polled less often.
        std::thread::sleep((started.elapsed() / 20).clamp(Duration::from_millis(5), Duration::from_millis(50)));
    };
    if !matches!(ended, Ended::Done) {
        kill_group(group);
    }
    let status = child.wait()?;
    let mut timed_out = matches!(ended, Ended::TimedOut);
    // The group is gone, so the pipes close unless an escaped process holds them; wait for that no longer than the
    // timeout allows, and hardly at all once the command was stopped.
    let grace = Instant::now() + Duration::from_millis(100);
    let readers_deadline = if matches!(ended, Ended::Done) { deadline.max(grace) } else { grace };
    for _ in 0..readers {
        let left = readers_deadline.saturating_duration_since(Instant::now());
        if readers_done.recv_timeout(left).is_err() {
            timed_out = true;
            break;
        }
    }
    let (output_sha256, tail) = match collected.lock() {
        Ok(mut c) => {
            let hasher = std::mem::take(&mut c.hasher);
            let start = c.tail.len().saturating_sub(TAIL_BYTES);
            (hasher.finish(), String::from_utf8_lossy(&c.tail[start..]).into_owned())
        }
        Err(_) => return Err(std::io::Error::other("an output reader panicked")),
    };
    Ok(Finished {
        code: if matches!(ended, Ended::Done) { status.code() } else { None },
        timed_out,
        interrupted: matches!(ended, Ended::Interrupted),
        output_sha256,
        tail,
        elapsed: started.elapsed(),
    })
}

/// Kills and reaps a child that cannot be handled as a group (its id did not fit a pid).
fn kill_and_reap(child: &mut std::process::Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// SIGKILLs every process of `group` until none is left (bounded by [`KILL_GRACE`]); the caller has not reaped
/// the group's leader yet.
fn kill_group(group: i32) {
    let started = Instant::now();
    loop {
        // SAFETY: kill has no memory effects; a negative pid names the process group this module created.
        unsafe {
            libc::kill(-group, libc::SIGKILL);
        }
        if group_members(group).is_empty() || started.elapsed() > KILL_GRACE {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The state letter of `/proc/<pid>/stat` (R, S, D, Z, ...).
fn process_state(pid: i32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// The processes of `group` that still run (zombies are over, whoever reaps them).
fn group_members(group: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str().and_then(|name| name.parse::<i32>().ok()))
        .filter(|pid| {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
            let Some(close) = stat.rfind(')') else { return false };
            let mut fields = stat[close + 2..].split(' ');
            let state = fields.next();
            let process_group = fields.nth(1).and_then(|f| f.parse::<i32>().ok());
            state != Some("Z") && process_group == Some(group)
        })
        .collect()
}

/// A process's start time in clock ticks since boot (field 22 of `/proc/<pid>/stat`): with the pid, it names a
/// process unambiguously, because pids are reused and start times are not.
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses; the fields after its closing ')' do not.
    let after = &stat[stat.rfind(')')? + 2..];
    after.split(' ').nth(19)?.parse().ok()
}

/// Whether the process `pid` that started at `started` still runs (a zombie does not count).
pub fn alive(pid: i32, started: u64) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    let Some(close) = stat.rfind(')') else { return false };
    let mut fields = stat[close + 2..].split(' ');
    let state = fields.next();
    state != Some("Z") && start_time(pid) == Some(started)
}

/// This machine's host name.
pub fn host_name() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length, and gethostname NUL-terminates within it on success.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    if ok && end > 0 {
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "localhost".into()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn this_process_is_alive_and_a_wrong_start_time_is_not() {
        let pid = std::process::id() as i32;
        let started = super::start_time(pid).unwrap();
        assert!(super::alive(pid, started));
        assert!(!super::alive(pid, started + 1));
    }

    use super::*;

    #[test]
    fn captures_output_and_exit_code() {
        let done =
            run(Command::new("/bin/sh").args(["-c", "echo out; echo err >&2; exit 3"]), Duration::from_secs(10), None)
                .unwrap();
        assert_eq!(done.code, Some(3));
        assert!(done.tail.contains("out") && done.tail.contains("err"));
        assert!(!done.success());
    }

    /// Whether any process's command line holds `marker` (zombies have none).
    fn survivor(marker: &str) -> bool {
        std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
            std::fs::read(entry.path().join("cmdline"))
                .is_ok_and(|line| line.windows(marker.len()).any(|w| w == marker.as_bytes()))
        })
    }

    #[test]
    fn a_step_is_not_over_while_anything_it_started_runs() {
        let marker = format!("kiln-test-bg-{}", std::process::id());
        // The leader exits at once; its background child would run for 30 s.
        let script = format!("sh -c 'sleep 30; : {marker}' & echo spawned");
        let done = run(Command::new("/bin/sh").args(["-c", &script]), Duration::from_millis(300), None).unwrap();
        assert!(done.timed_out, "{done:?}");
        assert!(!done.success());
        assert!(done.tail.contains("spawned"));
        assert!(!survivor(&marker), "the background child outlived its step");
    }

    #[test]
    fn redirected_output_does_not_let_a_child_escape() {
        let marker = format!("kiln-test-redirected-{}", std::process::id());
        let script = format!("sh -c 'sleep 30; : {marker}' >/dev/null 2>&1 & echo spawned");
        let done = run(Command::new("/bin/sh").args(["-c", &script]), Duration::from_millis(300), None).unwrap();
        assert!(done.timed_out, "{done:?}");
        assert!(!survivor(&marker), "the background child outlived its step");
    }

    #[test]
    fn background_work_that_finishes_in_time_is_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("late");
        let script = format!("(sleep 0.2; echo late > {}) & echo spawned", file.display());
        let done = run(Command::new("/bin/sh").args(["-c", &script]), Duration::from_secs(30), None).unwrap();
        assert!(done.success(), "{done:?}");
        assert!(file.exists(), "run returned before the background job finished");
    }

    #[test]
    fn the_timeout_kills_grandchildren_too() {
        let started = Instant::now();
        let done =
            run(Command::new("/bin/sh").args(["-c", "sleep 30 & sleep 30"]), Duration::from_millis(200), None).unwrap();
        assert!(done.timed_out);
        assert!(started.elapsed() < Duration::from_secs(5), "waited for the grandchild's output pipe");
    }
}
