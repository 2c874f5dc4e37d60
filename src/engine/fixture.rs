//! The repository, ledger and in-memory provider (behind the failure injector) that engine unit tests run in.

use super::Context;
use crate::clock::Clock;
use crate::config::{pipeline, Pipeline, Repo};
use crate::ledger::Ledger;
use crate::progress::Silent;
use crate::provider::inject::{CrashMode, Faulty, Injector};
use crate::provider::memory::MemoryProvider;

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub repo: Repo,
    /// Pipeline `app`, as `files` wrote it.
    pub pipeline: Pipeline,
    pub ledger: Ledger,
    pub memory: MemoryProvider,
    pub injector: Injector,
}

impl Fixture {
    /// A temporary repository holding `files` (repository-relative path, text); it must define pipeline `app`.
    pub fn new(files: &[(&str, &str)]) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        for (rel, text) in files {
            let path = dir.path().join(rel);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let repo = Repo::discover(dir.path()).unwrap();
        let pipeline = pipeline::load(&repo, "app").unwrap();
        let ledger = Ledger::open_dir(&dir.path().join(".kiln/ledger"));
        let injector = Injector::new(CrashMode::Panic);
        Fixture { dir, repo, pipeline, ledger, memory: MemoryProvider::default(), injector }
    }

    /// Runs `f` as kiln process `who` at `clock`, its provider the memory one behind the injector.
    pub fn run_as<T>(&self, who: &str, clock: &Clock, f: impl FnOnce(&Context) -> T) -> T {
        let faulty = Faulty { images: &self.memory, fleet: &self.memory, injector: &self.injector };
        let ctx = Context {
            repo: &self.repo,
            pipeline: &self.pipeline,
            ledger: &self.ledger,
            clock,
            actor: who,
            images: &faulty,
            fleet: &faulty,
            state_dir: self.dir.path().join(".kiln"),
            echo: false,
            lease_holder: format!("test-host:{who}"),
            progress: &Silent,
        };
        f(&ctx)
    }

    /// [`Fixture::run_as`] as actor `t` on the system clock.
    pub fn run<T>(&self, f: impl FnOnce(&Context) -> T) -> T {
        self.run_as("t", &Clock::system(), f)
    }
}
