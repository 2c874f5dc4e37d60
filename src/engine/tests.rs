//! Engine tests against the in-memory provider behind the failure injector: the deploy state machine with a crash,
//! a takeover and a failure at every provider call, the verification window, rollback selection and drift.

use std::collections::BTreeMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, SystemTime};

use super::deploy::{self, DeployOutcome, DeployReport, Want};
use super::fixture::Fixture;
use super::Context;
use crate::clock::{self, Clock};
use crate::digest::Digest;
use crate::ledger::{Decision, EventBody, LedgerError};
use crate::provider::inject::{Crashed, Fault, Rule};
use crate::provider::StageRef;
use crate::Error;

const T0: &str = "2026-11-28T12:00:00Z";
/// Provider calls that change something; after a takeover, the first holder makes none of them.
const MUTATING: [&str; 4] = ["launch", "route", "park", "destroy"];

/// The engine fixture with one stage `dev` (see [`World::new`]).
struct World(Fixture);

impl std::ops::Deref for World {
    type Target = Fixture;
    fn deref(&self) -> &Fixture {
        &self.0
    }
}

fn at(secs: u64) -> Clock {
    Clock::fixed(clock::parse(T0).unwrap_or(SystemTime::UNIX_EPOCH) + Duration::from_secs(secs))
}

/// Crashes are expected here: they would otherwise print a panic message per case.
fn quiet_crashes() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if info.payload().downcast_ref::<Crashed>().is_none() {
                default(info);
            }
        }));
    });
}

impl World {
    /// One stage `dev` (capacity 2, one kept group), with `extra` stage keys and tables after its deploy line.
    fn new(extra: &str) -> World {
        quiet_crashes();
        let pipeline = format!(
            "image = \"app\"\n[[stage]]\nname = \"dev\"\ncapacity = 2\nkeep-previous = 1\ndeploy = {{ port = 30999 }}\n{extra}"
        );
        let fixture = Fixture::new(&[
            ("images/app.toml", "description = \"app\"\n"),
            ("pipelines/app.toml", &pipeline),
            ("pipelines/scripts/check.sh", "#!/bin/sh\ntest ! -e \"$(dirname \"$0\")/fail\"\n"),
        ]);
        use std::os::unix::fs::PermissionsExt;
        let check = fixture.dir.path().join("pipelines/scripts/check.sh");
        std::fs::set_permissions(check, std::fs::Permissions::from_mode(0o755)).unwrap();
        World(fixture)
    }

    fn stage(&self) -> StageRef<'_> {
        StageRef { pipeline: &self.pipeline.name, stage: &self.pipeline.stages[0] }
    }

    /// Runs `f` as the kiln process `who`, `secs` after T0.
    fn as_kiln<T>(&self, who: &str, secs: u64, f: impl FnOnce(&Context) -> T) -> T {
        self.run_as(who, &at(secs), f)
    }

    fn deploy(&self, who: &str, secs: u64) -> Result<DeployReport, Error> {
        self.as_kiln(who, secs, |ctx| deploy::deploy(ctx, "dev", Want::Promoted))
    }

    fn append(&self, body: EventBody) {
        self.ledger
            .append::<(), LedgerError>("setup", &at(0), |_| Ok(Decision::Append(Box::new(body.clone()), ())))
            .unwrap();
    }

    /// Bakes image `n` (recorded in the ledger, held by the provider).
    fn image(&self, n: u8) -> Digest {
        let digest = Digest::of(&[n]);
        self.memory.add_image(digest);
        self.append(EventBody::Baked {
            pipeline: "app".into(),
            recipe: "app".into(),
            digest,
            recipe_key: Digest::of(&[n, n]),
            parent: None,
            provider: "memory".into(),
            image_ref: format!("memory:{n}"),
            commit: None,
            dirty: false,
            copies: Vec::new(),
            instance: None,
        });
        digest
    }

    fn promote(&self, digest: Digest) {
        self.append(EventBody::Promoted { pipeline: "app".into(), stage: "dev".into(), digest, gates: vec![] });
    }

    /// Image 1 live in dev, image 2 promoted: the starting point of every deploy case.
    fn one_live_two_promoted() -> (World, Digest, Digest) {
        Self::one_live_two_promoted_with("")
    }

    fn one_live_two_promoted_with(extra: &str) -> (World, Digest, Digest) {
        let world = World::new(extra);
        let (one, two) = (world.image(1), world.image(2));
        world.promote(one);
        world.deploy("setup", 0).unwrap();
        world.promote(two);
        (world, one, two)
    }

    /// The stage runs `digest` in exactly one group at capacity, which traffic goes to; at most `keep-previous`
    /// other groups exist, all parked; nothing is open; the chain verifies.
    fn assert_converged(&self, digest: Digest, case: &str) {
        let view = self.ledger.view().unwrap();
        let there = view.stage("app", "dev").unwrap();
        assert!(there.open.is_none(), "{case}: a deployment is still open: {:?}", there.open);
        let live = there.live.clone().unwrap();
        assert_eq!(live.digest, digest, "{case}: the live digest");
        let groups = self.memory.groups_of(self.stage());
        assert_eq!(self.memory.serving_of(self.stage()).as_deref(), Some(live.group.as_str()), "{case}: {groups:?}");
        let serving = &groups[&live.group];
        assert_eq!((serving.digest, serving.capacity, serving.running), (digest, 2, 2), "{case}");
        let others: Vec<_> = groups.iter().filter(|(name, _)| **name != live.group).collect();
        assert!(others.len() <= 1, "{case}: orphaned groups {others:?}");
        assert!(others.iter().all(|(_, g)| g.running == 0), "{case}: a retired group still runs: {others:?}");
        self.ledger.verify().unwrap();
    }
}

/// How many times a clean deploy of image 2 over image 1 makes each provider call.
fn calls_of_a_clean_deploy(extra: &str) -> BTreeMap<String, u32> {
    let (world, _, _) = World::one_live_two_promoted_with(extra);
    let before = world.injector.counts();
    world.deploy("a", 0).unwrap();
    let mut calls = world.injector.counts();
    for (call, n) in &mut calls {
        *n -= before.get(call).copied().unwrap_or(0);
    }
    calls.retain(|_, n| *n > 0);
    calls
}

/// Every (call, k): the k-th time a deploy makes that call.
fn every_call(extra: &str) -> Vec<(String, u32)> {
    let calls = calls_of_a_clean_deploy(extra);
    assert!(calls.contains_key("launch") && calls.contains_key("route") && calls.contains_key("health"), "{calls:?}");
    calls.into_iter().flat_map(|(call, n)| (1..=n).map(move |k| (call.clone(), k))).collect()
}

fn rule_at(world: &World, call: &str, k: u32, fault: Fault) {
    let nth = world.injector.count(call) + k;
    world.injector.add(Rule { call: call.to_string(), nth: Some(nth), fault });
}

#[test]
fn a_crash_at_every_provider_call_converges_on_the_next_deploy() {
    for (call, k) in every_call("") {
        let case = format!("crash at {call} #{k}");
        let (world, _, two) = World::one_live_two_promoted();
        rule_at(&world, &call, k, Fault::Crash);
        let crashed = std::panic::catch_unwind(AssertUnwindSafe(|| world.deploy("a", 10)));
        let payload = crashed.expect_err(&case);
        assert_eq!(payload.downcast_ref::<Crashed>().map(|c| c.call.as_str()), Some(call.as_str()), "{case}");
        world.injector.clear();
        // The next kiln runs once the crashed one's lease has run out.
        let report = world.deploy("b", 3600).unwrap_or_else(|e| panic!("{case}: {e}"));
        assert_ne!(report.outcome, DeployOutcome::Healed, "{case}");
        world.assert_converged(two, &case);
    }
}

/// The call counts right after the takeover, and whether the first holder held the lease then.
type AfterTakeover = (BTreeMap<String, u32>, bool);

#[test]
fn a_takeover_at_every_provider_call_leaves_the_first_holder_changing_nothing_more() {
    for (call, k) in every_call("") {
        let case = format!("takeover at {call} #{k}");
        let (world, _, two) = World::one_live_two_promoted();
        let world = Arc::new(world);
        let after_takeover: Arc<Mutex<Option<AfterTakeover>>> = Arc::default();
        let hook = {
            let (world, after) = (Arc::clone(&world), Arc::clone(&after_takeover));
            move || {
                let held = world.ledger.view().unwrap().stage("app", "dev").and_then(|s| s.open.clone());
                let a_held_the_lease = held.is_some_and(|o| o.holder == "test-host:a");
                world.deploy("b", 3600).unwrap();
                *after.lock().unwrap() = Some((world.injector.counts(), a_held_the_lease));
            }
        };
        rule_at(&world, &call, k, Fault::Hook(Arc::new(hook)));
        let first = world.deploy("a", 10);
        let (counts, a_held_the_lease) = after_takeover.lock().unwrap().clone().expect(&case);
        if a_held_the_lease {
            match &first {
                Err(Error::TakenOver { by, .. }) => assert!(by.contains("b"), "{case}: {by}"),
                other => panic!("{case}: the first holder went on: {other:?}"),
            }
            for mutating in MUTATING {
                let later = world.injector.count(mutating) - counts.get(mutating).copied().unwrap_or(0);
                assert_eq!(later, 0, "{case}: the first holder called {mutating} after it was taken over");
            }
        } else {
            // Taken over before it held the lease: it is simply a later deployment, judged on the new head.
            assert!(first.is_ok(), "{case}: {first:?}");
        }
        // The call already under way when the takeover landed completes (no fence can recall a request in
        // flight); whatever it made was never live, and the next deploy retires it.
        world.deploy("c", 7200).unwrap();
        world.assert_converged(two, &case);
        world.injector.clear();
    }
}

#[test]
fn a_failure_of_every_provider_call_leaves_a_stage_the_next_deploy_converges() {
    for (call, k) in every_call("") {
        let case = format!("failure of {call} #{k}");
        let (world, _, two) = World::one_live_two_promoted();
        let old_group = world.memory.serving_of(world.stage()).unwrap();
        rule_at(&world, &call, k, Fault::Fail("boom".into()));
        let first = world.deploy("a", 10);
        if let Err(Error::DeployFailed { aftermath, .. }) = &first {
            assert_eq!(world.memory.serving_of(world.stage()), Some(old_group.clone()), "{case}: {aftermath}");
            assert!(aftermath.contains(&old_group), "{case}: {aftermath}");
            let running: Vec<_> = world
                .memory
                .groups_of(world.stage())
                .into_iter()
                .filter(|(name, g)| *name != old_group && g.running > 0)
                .collect();
            assert!(running.is_empty(), "{case}: the failed group still runs: {running:?}");
        }
        world.injector.clear();
        world.deploy("b", 3600).unwrap_or_else(|e| panic!("{case}: {e}"));
        world.assert_converged(two, &case);
    }
}

#[test]
fn an_unhealthy_group_is_removed_and_the_old_one_keeps_serving() {
    let (world, one, _) = World::one_live_two_promoted();
    let old_group = world.memory.serving_of(world.stage()).unwrap();
    world.injector.add(Rule { call: "health".into(), nth: None, fault: Fault::Unhealthy("port closed".into()) });
    match world.deploy("a", 10) {
        Err(Error::DeployFailed { reason, aftermath, .. }) => {
            assert_eq!(reason, "port closed");
            assert_eq!(aftermath, format!("group {old_group} kept serving"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(world.memory.groups_of(world.stage()).len(), 1, "the new group is destroyed");
    world.injector.clear();
    assert_eq!(world.ledger.view().unwrap().stage("app", "dev").unwrap().live.as_ref().unwrap().digest, one);
}

const WINDOW: &str = "verify-for = \"1s\"\n[[stage.verify]]\ncommand = [\"scripts/check.sh\"]\ninterval = \"1s\"\n";

#[test]
fn a_failed_check_in_the_window_moves_traffic_back_and_removes_the_new_group() {
    let (world, one, _) = World::one_live_two_promoted_with(WINDOW);
    let old_group = world.memory.serving_of(world.stage()).unwrap();
    std::fs::write(world.dir.path().join("pipelines/scripts/fail"), "").unwrap();
    match world.deploy("a", 10) {
        Err(Error::DeployFailed { reason, aftermath, .. }) => {
            assert!(reason.contains("verification failed") && reason.contains("command scripts/check.sh"), "{reason}");
            assert!(reason.ends_with("exited with code 1 (no output)"), "a silent check says so: {reason}");
            assert_eq!(aftermath, format!("traffic moved back to group {old_group}"));
        }
        other => panic!("{other:?}"),
    }
    let routes: Vec<String> = world.memory.routes().into_iter().map(|(_, g)| g).collect();
    assert_eq!(routes[routes.len() - 2..], ["app-dev-v002".to_string(), old_group.clone()]);
    assert_eq!(world.memory.groups_of(world.stage()).keys().collect::<Vec<_>>(), [&old_group]);
    let view = world.ledger.view().unwrap();
    assert_eq!(view.stage("app", "dev").unwrap().live.as_ref().unwrap().digest, one);
}

#[test]
fn an_instance_lost_inside_the_window_fails_it() {
    let (world, _, _) = World::one_live_two_promoted_with(WINDOW);
    let world = Arc::new(world);
    let old_group = world.memory.serving_of(world.stage()).unwrap();
    // Right as traffic moves, one instance of the new group dies.
    let hook = {
        let world = Arc::clone(&world);
        move || world.memory.kill_instance(world.stage(), "app-dev-v002")
    };
    rule_at(&world, "route", 1, Fault::Hook(Arc::new(hook)));
    let outcome = world.deploy("a", 10);
    world.injector.clear();
    match outcome {
        Err(Error::DeployFailed { reason, aftermath, .. }) => {
            assert!(reason.contains("health"), "{reason}");
            assert_eq!(aftermath, format!("traffic moved back to group {old_group}"));
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(world.memory.serving_of(world.stage()), Some(old_group));
}

#[test]
fn a_passing_window_retires_the_old_group_only_after_it() {
    let (world, _, two) = World::one_live_two_promoted_with(WINDOW);
    let report = world.deploy("a", 10).unwrap();
    assert!(report.verified_for_ms.unwrap() >= 1000);
    world.assert_converged(two, "passing window");
}

#[test]
fn rollback_goes_to_the_digest_before_the_current_one_and_reuses_its_kept_group() {
    let (world, one, two) = World::one_live_two_promoted();
    world.deploy("a", 10).unwrap();
    let launches = world.injector.count("launch");
    let report = world
        .as_kiln("oncall", 20, |ctx| {
            deploy::deploy(ctx, "dev", Want::Rollback { to: None, reason: None, force: false })
        })
        .unwrap();
    assert_eq!((report.digest, report.group.as_str(), report.rollback), (one, "app-dev-v001", true));
    assert_eq!(world.injector.count("launch"), launches + 1, "the kept group is scaled up, once");
    world.assert_converged(one, "rollback");
    // The stage stays on the rollback until the next promotion.
    assert_eq!(world.deploy("a", 30).unwrap().outcome, DeployOutcome::AlreadyLive);
    world.promote(two);
    assert_eq!(world.deploy("a", 40).unwrap().digest, two, "a new promotion releases the hold");
}

#[test]
fn drift_names_a_group_that_runs_another_digest() {
    let (world, _, two) = World::one_live_two_promoted();
    world.deploy("a", 10).unwrap();
    let live = world.ledger.view().unwrap().stage("app", "dev").unwrap().live.clone().unwrap();
    world.memory.destroy(world.stage(), &live.group).unwrap();
    let stranger = Digest::of(b"stranger");
    world.memory.add_image(stranger);
    let image = crate::provider::ImageRef::new(stranger, "memory:stranger");
    use crate::provider::Fleet;
    world.memory.launch(world.stage(), &live.group, &image, 2).unwrap();
    let drift = world.as_kiln("auditor", 20, super::drift::check).unwrap();
    assert!(
        drift.drift.iter().any(|d| d.problem.contains(&stranger.short()) && d.problem.contains(&two.short())),
        "{drift:?}"
    );
}

#[test]
fn drift_names_an_instance_that_runs_another_image_than_its_group() {
    let (world, _, two) = World::one_live_two_promoted();
    world.deploy("a", 10).unwrap();
    let live = world.memory.serving_of(world.stage()).unwrap();
    let clean = world.as_kiln("auditor", 20, super::drift::check).unwrap();
    assert!(clean.drift.is_empty(), "{:?}", clean.drift);

    // The group's record still says `two`; one of its instances was relaunched from another image.
    let stranger = Digest::of(b"stranger");
    world.memory.relaunch_instance(world.stage(), &live, "i-0stray", stranger);
    let drift = world.as_kiln("auditor", 30, super::drift::check).unwrap();
    assert_eq!(drift.drift.len(), 1, "{:?}", drift.drift);
    let problem = &drift.drift[0].problem;
    assert!(problem.contains(&format!("instance i-0stray of group {live} runs {stranger}")), "{problem}");
    assert!(problem.contains(&two.short()), "{problem}");
}

#[test]
fn a_heal_restarts_lost_instances_in_the_live_group_without_a_window_or_a_new_group() {
    let (world, _, two) = World::one_live_two_promoted_with(WINDOW);
    world.deploy("a", 10).unwrap();
    let live = world.memory.serving_of(world.stage()).unwrap();
    world.memory.kill_instance(world.stage(), &live);
    // A failing check would fail a window: a heal has none, and nothing to return to.
    std::fs::write(world.dir.path().join("pipelines/scripts/fail"), "").unwrap();
    let report = world.deploy("a", 20).unwrap();
    assert_eq!((report.outcome, report.group.as_str()), (DeployOutcome::Healed, live.as_str()));
    assert!(report.verified_for_ms.is_none());
    world.assert_converged(two, "heal");
}

#[test]
fn a_crash_at_every_call_of_a_heal_never_takes_the_live_group_down() {
    let calls = {
        let (world, _, _) = World::one_live_two_promoted();
        world.deploy("a", 10).unwrap();
        world.memory.kill_instance(world.stage(), &world.memory.serving_of(world.stage()).unwrap());
        let before = world.injector.counts();
        assert_eq!(world.deploy("a", 20).unwrap().outcome, DeployOutcome::Healed);
        let after = world.injector.counts();
        after.into_iter().map(|(c, n)| (c.clone(), n - before.get(&c).copied().unwrap_or(0))).collect::<Vec<_>>()
    };
    for (call, n) in calls {
        for k in 1..=n {
            let case = format!("crash at {call} #{k} of a heal");
            let (world, _, two) = World::one_live_two_promoted();
            world.deploy("a", 10).unwrap();
            let live = world.memory.serving_of(world.stage()).unwrap();
            world.memory.kill_instance(world.stage(), &live);
            rule_at(&world, &call, k, Fault::Crash);
            let crashed = std::panic::catch_unwind(AssertUnwindSafe(|| world.deploy("a", 20)));
            assert!(crashed.is_err(), "{case}");
            world.injector.clear();
            let live_group = &world.memory.groups_of(world.stage())[&live];
            assert!(live_group.capacity > 0, "{case}: the live group was parked");
            world.deploy("b", 3600).unwrap_or_else(|e| panic!("{case}: {e}"));
            world.assert_converged(two, &case);
            assert_eq!(world.memory.serving_of(world.stage()), Some(live.clone()), "{case}");
        }
    }
}

#[test]
fn a_first_deployment_interrupted_inside_its_window_is_undone_not_counted_as_verified() {
    let world = World::new(WINDOW);
    let one = world.image(1);
    world.promote(one);
    // The in-memory group is healthy at the first poll of the wait; the second poll is the window's first look.
    rule_at(&world, "health", 2, Fault::Crash);
    assert!(std::panic::catch_unwind(AssertUnwindSafe(|| world.deploy("a", 10))).is_err());
    world.injector.clear();
    let view = world.ledger.view().unwrap();
    assert!(view.stage("app", "dev").unwrap().open.as_ref().unwrap().steps.contains(&"verifying".to_string()));
    drop(view);
    let report = world.deploy("b", 3600).unwrap();
    let reconciled = report.reconciled.unwrap();
    assert!(reconciled.contains("interrupted during its verification window"), "{reconciled}");
    assert!(report.verified_for_ms.is_some(), "deployed again, through a whole window");
    world.assert_converged(one, "first deployment");
}

#[test]
fn a_provider_call_that_hangs_delays_the_deploy_but_breaks_nothing() {
    let (world, _, two) = World::one_live_two_promoted();
    for call in ["launch", "health", "route", "park"] {
        rule_at(&world, call, 1, Fault::Hang(Duration::from_millis(50)));
    }
    let report = world.deploy("a", 10).unwrap();
    assert_eq!(report.outcome, DeployOutcome::Deployed);
    world.assert_converged(two, "hangs");
}
