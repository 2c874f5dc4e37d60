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

impl Repo {
    /// A temp dir holding a copy of this repository's `images/` and `pipelines/`.
    pub fn example() -> Repo {
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
