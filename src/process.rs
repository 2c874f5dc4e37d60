//! Running a child command with a timeout: its own process group (so the timeout kills grandchildren too), its
//! output streamed line by line, hashed whole and kept as a tail.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::digest::{Digest, StreamHasher};

pub const TAIL_BYTES: usize = 4096;

#[derive(Debug, Clone)]
pub struct Finished {
    /// The exit code; None when killed by a signal or by the timeout.
    pub code: Option<i32>,
    pub timed_out: bool,
    /// sha256 of stdout and stderr as interleaved lines.
    pub output_sha256: Digest,
    /// The last [`TAIL_BYTES`] of output.
    pub tail: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }

    /// Why it did not succeed, for messages.
    pub fn failure_reason(&self, timeout: Duration) -> String {
        match (self.timed_out, self.code) {
            (true, _) => format!("timed out after {}", humantime::format_duration(timeout)),
            (false, Some(code)) => format!("exited with code {code}"),
            (false, None) => "killed by a signal".into(),
        }
    }
}

struct Collected {
    hasher: StreamHasher,
    tail: Vec<u8>,
}

/// Runs `command` (stdin closed, stdout and stderr captured). `echo` sees each output line as it arrives.
pub fn run(command: &mut Command, timeout: Duration, echo: Option<fn(&str)>) -> std::io::Result<Finished> {
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let started = Instant::now();
    let mut child = command.spawn()?;
    let collected = Arc::new(Mutex::new(Collected { hasher: StreamHasher::new(), tail: Vec::new() }));
    let streams = [
        child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
        child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>),
    ];
    let readers: Vec<_> = streams
        .into_iter()
        .flatten()
        .map(|stream| {
            let collected = Arc::clone(&collected);
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
            })
        })
        .collect();
    let (code, timed_out) = loop {
        if let Some(status) = child.try_wait()? {
            break (status.code(), false);
        }
        if started.elapsed() >= timeout {
            // SAFETY: signalling the process group created for this child; no memory is involved.
            unsafe {
                libc::kill(-(child.id() as i32), libc::SIGKILL);
            }
            let _ = child.wait();
            break (None, true);
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    for reader in readers {
        let _ = reader.join();
    }
    let collected = match Arc::try_unwrap(collected) {
        Ok(mutex) => mutex.into_inner().unwrap_or_else(|poisoned| poisoned.into_inner()),
        Err(_) => return Err(std::io::Error::other("output reader still running")),
    };
    let start = collected.tail.len().saturating_sub(TAIL_BYTES);
    Ok(Finished {
        code,
        timed_out,
        output_sha256: collected.hasher.finish(),
        tail: String::from_utf8_lossy(&collected.tail[start..]).into_owned(),
        elapsed: started.elapsed(),
    })
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

    #[test]
    fn the_timeout_kills_grandchildren_too() {
        let started = Instant::now();
        let done =
            run(Command::new("/bin/sh").args(["-c", "sleep 30 & sleep 30"]), Duration::from_millis(200), None).unwrap();
        assert!(done.timed_out);
        assert!(started.elapsed() < Duration::from_secs(5), "waited for the grandchild's output pipe");
    }
}
