//! Running one provision step on the local machine: a script or shell command with the image root as `$KILN_ROOT`,
//! its working directory, a clean environment, and a timeout.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::process::{self, Finished};

/// Environment variables passed through from kiln's own environment. Everything else is dropped so a bake does not
/// depend on who ran it; the toolchain locations stay so scripts can find compilers.
const PASSED_THROUGH: &[&str] = &["PATH", "HOME", "USER", "RUSTUP_HOME", "CARGO_HOME", "RUSTUP_TOOLCHAIN", "TMPDIR"];

fn echo_line(line: &str) {
    eprintln!("    | {line}");
}

/// Runs `program args…` in `root` with `KILN_ROOT=root`.
pub fn run_step(
    program: &Path,
    args: &[&str],
    root: &Path,
    timeout: Duration,
    echo: bool,
) -> std::io::Result<Finished> {
    let mut command = Command::new(program);
    command.args(args).current_dir(root).env_clear();
    for name in PASSED_THROUGH {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.env("KILN_ROOT", root).env("LANG", "C.UTF-8").env("TZ", "UTC").env("SOURCE_DATE_EPOCH", "0");
    process::run(&mut command, timeout, echo.then_some(echo_line as fn(&str)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_with_kiln_root_and_a_clean_environment() {
        let root = tempfile::tempdir().unwrap();
        std::env::set_var("KILN_TEST_SECRET", "leak");
        let script = "echo root=$KILN_ROOT; echo secret=${KILN_TEST_SECRET:-none}; touch $KILN_ROOT/made";
        let out = run_step(Path::new("/bin/sh"), &["-c", script], root.path(), Duration::from_secs(10), false).unwrap();
        assert!(out.success(), "{}", out.tail);
        assert!(out.tail.contains(&format!("root={}", root.path().display())));
        assert!(out.tail.contains("secret=none"));
        assert!(root.path().join("made").exists());
    }
}
