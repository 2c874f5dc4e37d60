//! Failure injection around any provider: a wrapper that counts every call and, on a chosen call, fails it, hangs,
//! reports the group unhealthy, or crashes kiln, so failure paths are tested on purpose rather than waited for.
//! Real providers never fail on demand (moto never does); the engine tests wrap an in-memory provider, and the
//! binary wraps its real provider when `KILN_INJECT` is set, e.g. `KILN_INJECT='route#1=fail:reset,health=unhealthy'`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{
    BakeJob, Fleet, GroupHealth, GroupInfo, ImageCopy, ImageProvider, ImageRef, PollCadence, ProviderError,
    Reproduction, StageRef, Unhealthy,
};
use crate::config::{Instance, Recipe};

pub const INJECT_VAR: &str = "KILN_INJECT";

/// What happens on a matching call.
#[derive(Clone)]
pub enum Fault {
    /// The call fails with this message, changing nothing.
    Fail(String),
    /// The call waits this long, then goes through.
    Hang(Duration),
    /// `health` reports the group failed with this reason (other calls go through).
    Unhealthy(String),
    /// kiln dies here, as `kill -9` would: SIGKILL in the binary, a panic carrying [`Crashed`] in tests.
    Crash,
    /// Runs `f`, then the call goes through: a test's hook into the middle of an engine algorithm.
    Hook(Arc<dyn Fn() + Send + Sync>),
}

/// The panic payload of an in-process crash.
#[derive(Debug)]
pub struct Crashed {
    pub call: String,
}

/// A fault on the `nth` call (1-based) of `call`, or on every call of it.
#[derive(Clone)]
pub struct Rule {
    pub call: String,
    pub nth: Option<u32>,
    pub fault: Fault,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CrashMode {
    /// SIGKILL the process (the binary).
    Kill,
    /// Panic with [`Crashed`] (in-process tests, which catch it and go on as the next kiln).
    Panic,
}

/// The rules and the call counts.
pub struct Injector {
    rules: Mutex<Vec<Rule>>,
    counts: Mutex<BTreeMap<String, u32>>,
    crash: CrashMode,
}

impl Injector {
    pub fn new(crash: CrashMode) -> Injector {
        Injector { rules: Mutex::new(Vec::new()), counts: Mutex::new(BTreeMap::new()), crash }
    }

    /// Parses `call[#n]=fault[:argument]`, comma-separated; faults are `fail[:message]`, `hang:<duration>`,
    /// `unhealthy[:reason]` and `crash`. Entries starting with `aws.` are faults below the AWS SDK, parsed by
    /// `provider::aws::faults`.
    pub fn parse(spec: &str, crash: CrashMode) -> Result<Injector, String> {
        let injector = Injector::new(crash);
        let ours = |e: &&str| !e.is_empty() && !e.starts_with(super::aws::faults::PREFIX);
        for entry in spec.split(',').map(str::trim).filter(ours) {
            let (target, fault) =
                entry.split_once('=').ok_or_else(|| format!("`{entry}`: write call[#n]=fault, e.g. route#1=fail"))?;
            let (call, nth) = match target.split_once('#') {
                Some((call, n)) => {
                    let n = n
                        .parse::<u32>()
                        .ok()
                        .filter(|n| *n > 0)
                        .ok_or_else(|| format!("`{entry}`: `#{n}` is not a call number (1 is the first call)"))?;
                    (call, Some(n))
                }
                None => (target, None),
            };
            let (kind, argument) = fault.split_once(':').map_or((fault, None), |(k, a)| (k, Some(a)));
            let fault = match kind {
                "fail" => Fault::Fail(argument.unwrap_or("injected failure").to_string()),
                "unhealthy" => Fault::Unhealthy(argument.unwrap_or("injected: unhealthy").to_string()),
                "crash" => Fault::Crash,
                "hang" => {
                    let text = argument.ok_or_else(|| format!("`{entry}`: hang needs a duration, e.g. hang:2s"))?;
                    Fault::Hang(humantime::parse_duration(text).map_err(|e| format!("`{entry}`: {e}"))?)
                }
                other => return Err(format!("`{entry}`: unknown fault `{other}`; use fail, hang, unhealthy or crash")),
            };
            injector.add(Rule { call: call.trim().to_string(), nth, fault });
        }
        Ok(injector)
    }

    /// The injector `KILN_INJECT` asks for, if any.
    pub fn from_env() -> Result<Option<Injector>, String> {
        match std::env::var(INJECT_VAR) {
            Ok(spec) if !spec.trim().is_empty() => {
                Injector::parse(&spec, CrashMode::Kill).map(Some).map_err(|e| format!("{INJECT_VAR}: {e}"))
            }
            _ => Ok(None),
        }
    }

    pub fn add(&self, rule: Rule) {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).push(rule);
    }

    /// Removes every rule (counting goes on).
    pub fn clear(&self) {
        self.rules.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }

    /// How many times `call` was made.
    pub fn count(&self, call: &str) -> u32 {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).get(call).copied().unwrap_or(0)
    }

    /// Every call so far, by name.
    pub fn counts(&self) -> BTreeMap<String, u32> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Counts the call and applies the faults that match it; `Some` asks `health` to report this failure.
    fn before(&self, call: &str) -> Result<Option<Unhealthy>, ProviderError> {
        let n = {
            let mut counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
            let n = counts.entry(call.to_string()).or_insert(0);
            *n += 1;
            *n
        };
        let faults: Vec<Fault> = self
            .rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|r| r.call == call && r.nth.is_none_or(|nth| nth == n))
            .map(|r| r.fault.clone())
            .collect();
        let mut unhealthy = None;
        for fault in faults {
            match fault {
                Fault::Fail(message) => {
                    return Err(ProviderError::Other {
                        provider: "injected",
                        message: format!("{call} (call {n}): {message}"),
                    })
                }
                Fault::Hang(duration) => {
                    let until = Instant::now() + duration;
                    while Instant::now() < until {
                        std::thread::sleep(until.saturating_duration_since(Instant::now()));
                    }
                }
                Fault::Unhealthy(reason) => unhealthy = Some(Unhealthy { reason, log_tail: None }),
                Fault::Hook(hook) => hook(),
                Fault::Crash => match self.crash {
                    CrashMode::Kill => {
                        tracing::warn!(call, "fault injected: killing kiln");
                        // SAFETY: raising a signal on our own pid has no memory-safety preconditions.
                        unsafe {
                            libc::kill(libc::getpid(), libc::SIGKILL);
                        }
                        std::process::abort();
                    }
                    CrashMode::Panic => std::panic::panic_any(Crashed { call: call.to_string() }),
                },
            }
        }
        Ok(unhealthy)
    }
}

/// A provider with an [`Injector`] in front of every call.
pub struct Faulty<'a> {
    pub images: &'a dyn ImageProvider,
    pub fleet: &'a dyn Fleet,
    pub injector: &'a Injector,
}

impl ImageProvider for Faulty<'_> {
    fn name(&self) -> &'static str {
        self.images.name()
    }
    fn build_settings(&self, recipe: &Recipe) -> Result<serde_json::Value, ProviderError> {
        self.injector.before("build_settings")?;
        self.images.build_settings(recipe)
    }
    fn has_image(&self, image: &ImageRef) -> Result<bool, ProviderError> {
        self.injector.before("has_image")?;
        self.images.has_image(image)
    }
    fn bake(&self, job: &BakeJob) -> Result<ImageRef, ProviderError> {
        self.injector.before("bake")?;
        self.images.bake(job)
    }
    fn check_reproducible(&self, chain: &[(BakeJob, crate::digest::Digest)]) -> Result<Reproduction, ProviderError> {
        self.injector.before("check_reproducible")?;
        self.images.check_reproducible(chain)
    }
    fn verify_image(&self, image: &ImageRef) -> Result<(), ProviderError> {
        self.injector.before("verify_image")?;
        self.images.verify_image(image)
    }
    fn delete_image(&self, image: &ImageRef) -> Result<(), ProviderError> {
        self.injector.before("delete_image")?;
        self.images.delete_image(image)
    }
    fn collect_garbage(&self) -> Result<u64, ProviderError> {
        self.injector.before("collect_garbage")?;
        self.images.collect_garbage()
    }
    fn image_labels(&self, image: &ImageRef) -> Result<BTreeMap<String, String>, ProviderError> {
        self.injector.before("image_labels")?;
        self.images.image_labels(image)
    }
    fn instance_of(&self, image: &ImageRef) -> Result<Option<Instance>, ProviderError> {
        self.injector.before("instance_of")?;
        self.images.instance_of(image)
    }
    fn distribute(
        &self,
        image: &ImageRef,
        regions: &[String],
        accounts: &[String],
    ) -> Result<Vec<ImageCopy>, ProviderError> {
        self.injector.before("distribute")?;
        self.images.distribute(image, regions, accounts)
    }
    fn protect(&self, image: &ImageRef) -> Result<(), ProviderError> {
        self.injector.before("protect")?;
        self.images.protect(image)
    }
    fn publish_pointer(&self, stage: StageRef, image: &ImageRef) -> Result<String, ProviderError> {
        self.injector.before("publish_pointer")?;
        self.images.publish_pointer(stage, image)
    }
    fn pointer(&self, stage: StageRef) -> Result<Option<crate::digest::Digest>, ProviderError> {
        self.injector.before("pointer")?;
        self.images.pointer(stage)
    }
    fn prepare_bake(&self, chain: &[Recipe], update_base: bool, plan: bool) -> Result<Vec<String>, ProviderError> {
        self.injector.before("prepare_bake")?;
        self.images.prepare_bake(chain, update_base, plan)
    }
    fn plan_bake(&self, recipe: &Recipe, recorded: Option<&ImageRef>) -> Vec<String> {
        self.images.plan_bake(recipe, recorded)
    }
    fn image_users(&self, image: &ImageRef) -> Result<Vec<String>, ProviderError> {
        self.injector.before("image_users")?;
        self.images.image_users(image)
    }
    // A plan makes no call, so there is nothing to inject a fault into: passed through without counting.
    fn plan_promote(&self, stage: StageRef, image: &ImageRef, protect: bool) -> Vec<String> {
        self.images.plan_promote(stage, image, protect)
    }
    fn root_fs(&self, image: &ImageRef) -> Result<super::RootFs, ProviderError> {
        self.injector.before("root_fs")?;
        self.images.root_fs(image)
    }
}

impl Fleet for Faulty<'_> {
    fn groups(&self, stage: StageRef) -> Result<Vec<GroupInfo>, ProviderError> {
        self.injector.before("groups")?;
        self.fleet.groups(stage)
    }
    fn serving(&self, stage: StageRef) -> Result<Option<String>, ProviderError> {
        self.injector.before("serving")?;
        self.fleet.serving(stage)
    }
    fn launch(
        &self,
        stage: StageRef,
        group: &str,
        image: &ImageRef,
        capacity: u32,
    ) -> Result<GroupInfo, ProviderError> {
        self.injector.before("launch")?;
        self.fleet.launch(stage, group, image, capacity)
    }
    fn health(&self, stage: StageRef, group: &str) -> Result<GroupHealth, ProviderError> {
        let injected = self.injector.before("health")?;
        let mut health = self.fleet.health(stage, group)?;
        if let Some(unhealthy) = injected {
            health.failed = Some(unhealthy);
        }
        Ok(health)
    }
    fn log_tail(&self, stage: StageRef, group: &str, instance: &str) -> Option<String> {
        self.fleet.log_tail(stage, group, instance)
    }
    fn poll_cadence(&self) -> PollCadence {
        self.fleet.poll_cadence()
    }
    fn route(&self, stage: StageRef, group: &str) -> Result<Duration, ProviderError> {
        self.injector.before("route")?;
        self.fleet.route(stage, group)
    }
    fn drain_pending(&self, stage: StageRef, group: &str) -> Result<u64, ProviderError> {
        self.injector.before("drain_pending")?;
        self.fleet.drain_pending(stage, group)
    }
    fn drain_timeout(&self, stage: StageRef) -> Duration {
        self.fleet.drain_timeout(stage)
    }
    fn park(&self, stage: StageRef, group: &str) -> Result<(), ProviderError> {
        self.injector.before("park")?;
        self.fleet.park(stage, group)
    }
    fn destroy(&self, stage: StageRef, group: &str) -> Result<(), ProviderError> {
        self.injector.before("destroy")?;
        self.fleet.destroy(stage, group)
    }
    fn endpoint(&self, stage: StageRef) -> Option<String> {
        self.fleet.endpoint(stage)
    }
    fn endpoint_up(&self, stage: StageRef) -> bool {
        self.fleet.endpoint_up(stage)
    }
    fn stop_stage(&self, stage: StageRef) -> Result<(), ProviderError> {
        self.injector.before("stop_stage")?;
        self.fleet.stop_stage(stage)
    }
    fn alarm(&self, stage: StageRef, name: &str) -> Result<super::AlarmState, ProviderError> {
        self.injector.before("alarm")?;
        self.fleet.alarm(stage, name)
    }
    fn stray_instances(
        &self,
        stage: StageRef,
        group: &str,
        image: &super::ImageRef,
    ) -> Result<Vec<super::StrayInstance>, ProviderError> {
        self.injector.before("stray_instances")?;
        self.fleet.stray_instances(stage, group, image)
    }

    fn plan_deploy(&self, stage: StageRef, sketch: &super::DeploySketch) -> Vec<String> {
        self.fleet.plan_deploy(stage, sketch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_say_why() {
        let injector = Injector::parse(
            "route#1=fail:reset, health=unhealthy, launch#2=crash, drain_pending=hang:5ms",
            CrashMode::Panic,
        )
        .unwrap();
        assert_eq!(injector.rules.lock().unwrap().len(), 4);
        for (spec, expected) in [
            ("route", "write call[#n]=fault"),
            ("route#0=fail", "is not a call number"),
            ("route#x=fail", "is not a call number"),
            ("route=explode", "unknown fault `explode`"),
            ("route=hang", "hang needs a duration"),
            ("route=hang:soon", "soon"),
        ] {
            let err = Injector::parse(spec, CrashMode::Panic).err().unwrap_or_default();
            assert!(err.contains(expected), "{spec}: {err}");
        }
    }

    #[test]
    fn aws_entries_are_left_to_the_http_layer() {
        let injector =
            Injector::parse("aws.DescribeImages#1=throttle, route=fail, aws.CreateImage=status:x", CrashMode::Panic)
                .unwrap();
        let rules = injector.rules.lock().unwrap();
        assert_eq!(rules.iter().map(|r| r.call.as_str()).collect::<Vec<_>>(), ["route"]);
    }

    #[test]
    fn the_nth_call_fails_and_the_others_are_counted() {
        let injector = Injector::parse("route#2=fail:reset", CrashMode::Panic).unwrap();
        assert!(injector.before("route").is_ok());
        let err = injector.before("route").unwrap_err().to_string();
        assert!(err.contains("route (call 2): reset"), "{err}");
        assert!(injector.before("route").is_ok());
        assert_eq!(injector.count("route"), 3);
        assert_eq!(injector.count("launch"), 0);
    }

    #[test]
    fn a_crash_panics_with_its_call_in_process() {
        let injector = Injector::parse("park=crash", CrashMode::Panic).unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| injector.before("park"))).unwrap_err();
        assert_eq!(caught.downcast_ref::<Crashed>().map(|c| c.call.as_str()), Some("park"));
    }
}
