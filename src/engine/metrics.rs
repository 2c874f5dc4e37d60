//! The four DORA keys (deployment frequency, lead time, change-failure rate, time to restore) computed from ledger
//! events alone, for both providers alike. The definitions are in docs/metrics.md; this module is their code.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::digest::Digest;
use crate::ledger::{Event, EventBody};

/// The deploy step that records a failed verification window (src/engine/deploy.rs writes it).
const VERIFICATION_FAILED_STEP: &str = "verification-failed";

/// What the computation reads besides the events: how to learn when an image was baked and when its commit was
/// made. Both may not know (an image baked before this ledger, a commit git no longer has).
pub struct Sources<'a> {
    /// The `baked` event's time and commit of an image.
    pub baked: &'a dyn Fn(&Digest) -> Option<Baked>,
    /// When a commit was made (git's committer time).
    pub commit_time: &'a dyn Fn(&str) -> Option<SystemTime>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Baked {
    pub time: SystemTime,
    pub commit: Option<String>,
}

/// The window the metrics cover: `[from, to]`.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    pub from: SystemTime,
    pub to: SystemTime,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Metrics {
    /// The stages reported, in pipeline order.
    pub stages: Vec<StageMetrics>,
    /// The pipeline's last stage, whose deployments lead time is measured to.
    pub prod_stage: String,
    pub lead_time: LeadTime,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StageMetrics {
    pub stage: String,
    /// Deployments in the window (see [`compute`] for what counts).
    pub deployments: usize,
    /// Deployments per day over the window; none when there was no deployment.
    pub per_day: Option<f64>,
    /// Deployments later rolled away from, failed in their verification window, or revoked.
    pub failed: usize,
    /// `failed / deployments`; none when there was no deployment.
    pub change_failure_rate: Option<f64>,
    /// Each failure and what became of it, oldest first.
    pub failures: Vec<Failure>,
    /// From each failure that began in the window to the stage's next healthy deployment.
    pub time_to_restore: Option<Summary>,
    /// Failures in the window the stage has not recovered from yet.
    pub unrestored: usize,
    /// `kiln drill` runs in the window, and how many of them held the stage's invariant.
    pub drills: usize,
    pub drills_passed: usize,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Failure {
    pub deploy_id: String,
    pub digest: Digest,
    pub cause: FailureCause,
    /// The event that showed the failure: the rollback's start, the failed deployment, the revocation.
    pub seq: u64,
}

#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum FailureCause {
    RolledBack,
    FailedVerification,
    Revoked,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LeadTime {
    /// Deployments to the prod stage in the window that lead time is measured over.
    pub deployments: usize,
    /// From the image's `baked` event to the end of its prod deployment.
    pub bake_to_prod: Option<Summary>,
    /// From the commit the image was baked from (git's committer time) to the end of its prod deployment: only
    /// deployments whose image records a commit git still knows.
    pub commit_to_prod: Option<Summary>,
}

/// Durations in whole seconds, nearest-rank percentiles.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Summary {
    pub count: usize,
    pub median_secs: u64,
    pub p90_secs: u64,
}

impl Summary {
    /// None for no samples: "none" is the honest answer, not 0.
    pub fn of(mut samples: Vec<Duration>) -> Option<Summary> {
        if samples.is_empty() {
            return None;
        }
        samples.sort();
        let rank = |p: f64| {
            let nearest = (p * samples.len() as f64).ceil() as usize;
            samples[nearest.clamp(1, samples.len()) - 1].as_secs()
        };
        Some(Summary { count: samples.len(), median_secs: rank(0.5), p90_secs: rank(0.9) })
    }
}

/// One counted deployment while it is followed.
struct Deployment {
    deploy_id: String,
    digest: Digest,
    finished: SystemTime,
    in_window: bool,
    /// Reached traffic and finished healthy; false for one that failed its verification window.
    finished_healthy: bool,
    failure: Option<(FailureCause, u64)>,
}

#[derive(Default)]
struct StageState {
    /// deploy id → whether it is a rollback.
    rollbacks: BTreeMap<String, bool>,
    verification_failed: BTreeSet<String>,
    deployments: Vec<Deployment>,
    /// The counted deployment whose digest is live now.
    live: Option<usize>,
    live_digest: Option<Digest>,
    /// When the stage's current failure began, if it has not been restored yet (and whether in the window).
    down_since: Option<(SystemTime, bool)>,
    restores: Vec<Duration>,
    drills: usize,
    drills_passed: usize,
}

impl StageState {
    fn fail_down(&mut self, at: SystemTime, window: &Window) {
        if self.down_since.is_none() {
            self.down_since = Some((at, at >= window.from));
        }
    }

    fn restored(&mut self, at: SystemTime) {
        if let Some((since, in_window)) = self.down_since.take() {
            if in_window {
                self.restores.push(at.duration_since(since).unwrap_or_default());
            }
        }
    }
}

/// The metrics of `stages` (pipeline order; the last is prod) of `pipeline`, over `events` in ascending seq order.
/// `events` must hold every event from the window's start on; earlier ones only set the scene (what was live).
///
/// A *deployment* is a non-rollback deployment of a stage that either finished healthy with a digest other than
/// the one live before (a heal or a resumed deployment of the live digest is not a new deployment) or failed its
/// verification window (it reached traffic). A rollback is not a deployment: it is a failure of the deployment it
/// rolls away from, and the end of an outage. A deployment a `kiln drill` ran (its `drill` event names it) is an
/// exercise, not a change: it counts for nothing but the drill.
pub fn compute(pipeline: &str, stages: &[String], events: &[Event], window: Window, sources: &Sources) -> Metrics {
    let mut state: BTreeMap<&str, StageState> = stages.iter().map(|s| (s.as_str(), StageState::default())).collect();
    // The drill event comes after the deployments it ran, so they are known before the fold meets them.
    let drilled: BTreeSet<&str> = events
        .iter()
        .filter_map(|e| match &e.body {
            EventBody::Drill { pipeline: p, deploys, .. } if p == pipeline => Some(deploys),
            _ => None,
        })
        .flatten()
        .map(String::as_str)
        .collect();
    for event in events {
        let Some(at) = crate::clock::parse(&event.time) else { continue };
        let seq = event.seq;
        match &event.body {
            EventBody::Drill { pipeline: p, stage, passed, .. } if p == pipeline && at >= window.from => {
                if let Some(s) = state.get_mut(stage.as_str()) {
                    s.drills += 1;
                    s.drills_passed += usize::from(*passed);
                }
            }
            EventBody::DeployStep { deploy_id, .. }
            | EventBody::DeployFailed { deploy_id, .. }
            | EventBody::DeployFinished { deploy_id, .. }
                if drilled.contains(deploy_id.as_str()) => {}
            EventBody::DeployStarted { pipeline: p, stage, deploy_id, rollback, .. } if p == pipeline => {
                let Some(s) = state.get_mut(stage.as_str()) else { continue };
                s.rollbacks.insert(deploy_id.clone(), rollback.is_some());
                if rollback.is_some() {
                    if let Some(live) = s.live.and_then(|i| s.deployments.get_mut(i)) {
                        live.failure.get_or_insert((FailureCause::RolledBack, seq));
                    }
                    s.fail_down(at, &window);
                }
            }
            EventBody::DeployStep { pipeline: p, stage, deploy_id, step, .. }
                if p == pipeline && step == VERIFICATION_FAILED_STEP =>
            {
                if let Some(s) = state.get_mut(stage.as_str()) {
                    s.verification_failed.insert(deploy_id.clone());
                }
            }
            EventBody::DeployFailed { pipeline: p, stage, deploy_id, digest, .. } if p == pipeline => {
                let Some(s) = state.get_mut(stage.as_str()) else { continue };
                let rollback = s.rollbacks.get(deploy_id).copied().unwrap_or(false);
                // A deployment that failed before traffic moved never served: the previous group did throughout.
                if rollback || !s.verification_failed.contains(deploy_id) {
                    continue;
                }
                s.deployments.push(Deployment {
                    deploy_id: deploy_id.clone(),
                    digest: *digest,
                    finished: at,
                    in_window: at >= window.from,
                    finished_healthy: false,
                    failure: Some((FailureCause::FailedVerification, seq)),
                });
                s.fail_down(at, &window);
            }
            EventBody::DeployFinished { pipeline: p, stage, deploy_id, digest, .. } if p == pipeline => {
                let Some(s) = state.get_mut(stage.as_str()) else { continue };
                s.restored(at);
                let rollback = s.rollbacks.get(deploy_id).copied().unwrap_or(false);
                let changed = s.live_digest != Some(*digest);
                s.live_digest = Some(*digest);
                if rollback {
                    s.live = None;
                } else if changed {
                    s.deployments.push(Deployment {
                        deploy_id: deploy_id.clone(),
                        digest: *digest,
                        finished: at,
                        in_window: at >= window.from,
                        finished_healthy: true,
                        failure: None,
                    });
                    s.live = Some(s.deployments.len() - 1);
                }
            }
            EventBody::Revoked { digest, descendants, .. } => {
                let revoked: BTreeSet<&Digest> = std::iter::once(digest).chain(descendants).collect();
                for s in state.values_mut() {
                    for deployment in s.deployments.iter_mut().filter(|d| revoked.contains(&d.digest)) {
                        deployment.failure.get_or_insert((FailureCause::Revoked, seq));
                    }
                }
            }
            _ => {}
        }
    }

    let days = window.to.duration_since(window.from).unwrap_or_default().as_secs_f64() / 86_400.0;
    let prod_stage = stages.last().cloned().unwrap_or_default();
    let mut lead_bake = Vec::new();
    let mut lead_commit = Vec::new();
    let mut prod_deployments = 0;
    let mut out = Vec::new();
    for name in stages {
        let Some(s) = state.remove(name.as_str()) else { continue };
        let counted: Vec<&Deployment> = s.deployments.iter().filter(|d| d.in_window).collect();
        let failures: Vec<Failure> = counted
            .iter()
            .filter_map(|d| {
                let (cause, seq) = d.failure?;
                Some(Failure { deploy_id: d.deploy_id.clone(), digest: d.digest, cause, seq })
            })
            .collect();
        let ratio = |n: usize| (!counted.is_empty()).then(|| n as f64 / counted.len() as f64);
        if *name == prod_stage {
            for d in counted.iter().filter(|d| d.finished_healthy) {
                prod_deployments += 1;
                let Some(baked) = (sources.baked)(&d.digest) else { continue };
                lead_bake.push(d.finished.duration_since(baked.time).unwrap_or_default());
                if let Some(made) = baked.commit.as_deref().and_then(sources.commit_time) {
                    lead_commit.push(d.finished.duration_since(made).unwrap_or_default());
                }
            }
        }
        let unrestored = usize::from(s.down_since.is_some_and(|(_, in_window)| in_window));
        out.push(StageMetrics {
            stage: name.clone(),
            deployments: counted.len(),
            per_day: (!counted.is_empty() && days > 0.0).then(|| counted.len() as f64 / days),
            failed: failures.len(),
            change_failure_rate: ratio(failures.len()),
            failures,
            time_to_restore: Summary::of(s.restores),
            unrestored,
            drills: s.drills,
            drills_passed: s.drills_passed,
        });
    }
    Metrics {
        stages: out,
        prod_stage,
        lead_time: LeadTime {
            deployments: prod_deployments,
            bake_to_prod: Summary::of(lead_bake),
            commit_to_prod: Summary::of(lead_commit),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::event::RollbackRecord;

    const HOUR: u64 = 3600;
    const DAY: u64 = 24 * HOUR;
    /// 2026-01-01T00:00:00Z: every generated event is an offset from it.
    const EPOCH: u64 = 1_767_225_600;

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH + secs)
    }

    fn image(n: u8) -> Digest {
        Digest::of(&[n])
    }

    /// A ledger written by hand, one event per call, each at an offset (seconds) from [`EPOCH`].
    #[derive(Default)]
    struct Ledger {
        events: Vec<Event>,
        deploys: u32,
    }

    impl Ledger {
        fn push(&mut self, secs: u64, body: EventBody) {
            let seq = self.events.len() as u64 + 1;
            self.events.push(Event {
                seq,
                prev: Digest::ZERO,
                time: crate::clock::format(at(secs)),
                actor: "ci".into(),
                clock: None,
                body,
            });
        }

        fn start(&mut self, secs: u64, stage: &str, digest: Digest, rollback: bool) -> String {
            self.deploys += 1;
            let deploy_id = format!("d{}", self.deploys);
            self.push(
                secs,
                EventBody::DeployStarted {
                    pipeline: "hello".into(),
                    stage: stage.into(),
                    deploy_id: deploy_id.clone(),
                    digest,
                    group: format!("hello-{stage}-v{:03}", self.deploys),
                    previous_group: None,
                    lease_until: String::new(),
                    lease_holder: String::new(),
                    rollback: rollback.then_some(RollbackRecord { reason: None, forced: false }),
                },
            );
            deploy_id
        }

        fn finish(&mut self, secs: u64, stage: &str, deploy_id: &str, digest: Digest) {
            self.push(
                secs,
                EventBody::DeployFinished {
                    pipeline: "hello".into(),
                    stage: stage.into(),
                    deploy_id: deploy_id.into(),
                    digest,
                    group: String::new(),
                },
            );
        }

        /// A deployment that starts at `secs` and finishes healthy ten minutes later.
        fn deploy(&mut self, secs: u64, stage: &str, digest: Digest) {
            let id = self.start(secs, stage, digest, false);
            self.finish(secs + 600, stage, &id, digest);
        }

        fn rollback(&mut self, secs: u64, stage: &str, digest: Digest) {
            let id = self.start(secs, stage, digest, true);
            self.finish(secs + 300, stage, &id, digest);
        }

        fn fail_verification(&mut self, secs: u64, stage: &str, digest: Digest) {
            let id = self.start(secs, stage, digest, false);
            let step = |step: &str| EventBody::DeployStep {
                pipeline: "hello".into(),
                stage: stage.into(),
                deploy_id: id.clone(),
                step: step.into(),
                detail: serde_json::Value::Null,
            };
            self.push(secs + 60, step("traffic-switched"));
            self.push(secs + 120, step(VERIFICATION_FAILED_STEP));
            self.push(
                secs + 180,
                EventBody::DeployFailed {
                    pipeline: "hello".into(),
                    stage: stage.into(),
                    deploy_id: id.clone(),
                    digest,
                    group: String::new(),
                    reason: "verification failed".into(),
                    log_tail: None,
                },
            );
        }

        fn fail_health(&mut self, secs: u64, stage: &str, digest: Digest) {
            let id = self.start(secs, stage, digest, false);
            self.push(
                secs + 60,
                EventBody::DeployFailed {
                    pipeline: "hello".into(),
                    stage: stage.into(),
                    deploy_id: id,
                    digest,
                    group: String::new(),
                    reason: "not healthy in time".into(),
                    log_tail: None,
                },
            );
        }

        fn drill(&mut self, secs: u64, stage: &str, passed: bool, deploys: Vec<String>) {
            self.push(
                secs,
                EventBody::Drill {
                    pipeline: "hello".into(),
                    stage: stage.into(),
                    fault: "failed-verify".into(),
                    passed,
                    requests: 100,
                    failed: 0,
                    bound: 0,
                    converged: passed,
                    digest: None,
                    duration_ms: 5000,
                    deploys,
                    detail: String::new(),
                },
            );
        }

        fn revoke(&mut self, secs: u64, digest: Digest, descendants: Vec<Digest>) {
            self.push(secs, EventBody::Revoked { digest, reason: "cve".into(), descendants });
        }

        fn metrics(&self, from: u64, to: u64) -> Metrics {
            // Image n was baked at n hours, from commit "cN" made one hour before; c3 is unknown to git.
            let baked = |d: &Digest| {
                (1..=9u8)
                    .find(|n| image(*n) == *d)
                    .map(|n| Baked { time: at(u64::from(n) * HOUR), commit: Some(format!("c{n}")) })
            };
            let commit_time = |c: &str| {
                let n: u64 = c.trim_start_matches('c').parse().ok()?;
                (n != 3).then(|| at(n * HOUR - HOUR))
            };
            let stages = ["dev".to_string(), "prod".to_string()];
            let sources = Sources { baked: &baked, commit_time: &commit_time };
            compute("hello", &stages, &self.events, Window { from: at(from), to: at(to) }, &sources)
        }
    }

    fn stage<'a>(metrics: &'a Metrics, name: &str) -> &'a StageMetrics {
        metrics.stages.iter().find(|s| s.stage == name).unwrap()
    }

    #[test]
    fn with_no_prod_deployment_the_prod_metrics_are_none_not_zero() {
        let mut ledger = Ledger::default();
        ledger.deploy(DAY, "dev", image(1));
        let metrics = ledger.metrics(0, 10 * DAY);
        let prod = stage(&metrics, "prod");
        assert_eq!((prod.deployments, prod.failed, prod.unrestored), (0, 0, 0));
        assert_eq!(prod.per_day, None);
        assert_eq!(prod.change_failure_rate, None);
        assert_eq!(prod.time_to_restore, None);
        assert_eq!(metrics.lead_time, LeadTime { deployments: 0, bake_to_prod: None, commit_to_prod: None });
        let dev = stage(&metrics, "dev");
        assert_eq!(dev.deployments, 1);
        assert_eq!(dev.per_day, Some(0.1), "one deployment in ten days");
        assert_eq!(dev.change_failure_rate, Some(0.0), "deployments without failures are a rate of 0");
        let json = serde_json::to_value(&metrics).unwrap();
        assert!(json["lead_time"]["bake_to_prod"].is_null(), "{json}");
        assert!(json["stages"][1]["change_failure_rate"].is_null(), "{json}");
    }

    #[test]
    fn a_rollback_fails_the_deployment_it_rolls_away_from_and_restores_the_stage() {
        let mut ledger = Ledger::default();
        ledger.deploy(DAY, "prod", image(1)); // finishes at DAY + 600
        ledger.deploy(2 * DAY, "prod", image(2)); // finishes at 2 DAY + 600
        ledger.rollback(2 * DAY + HOUR, "prod", image(1)); // restores after 300 s
        ledger.deploy(3 * DAY, "prod", image(4));
        let metrics = ledger.metrics(0, 4 * DAY);
        let prod = stage(&metrics, "prod");
        assert_eq!(prod.deployments, 3, "the rollback is not a deployment");
        assert_eq!(prod.per_day, Some(0.75));
        assert_eq!(prod.failed, 1);
        assert_eq!(prod.failures[0].digest, image(2));
        assert_eq!(prod.failures[0].cause, FailureCause::RolledBack);
        assert_eq!(prod.change_failure_rate, Some(1.0 / 3.0));
        assert_eq!(prod.time_to_restore, Some(Summary { count: 1, median_secs: 300, p90_secs: 300 }));
        assert_eq!(prod.unrestored, 0);
        // Lead times, bake → prod: image 1 baked at 1 h, live at DAY + 600; image 2 at 2 h, 2 DAY + 600; image 4
        // at 4 h, 3 DAY + 600. Commit → prod is one hour more each.
        let bake = [DAY + 600 - HOUR, 2 * DAY + 600 - 2 * HOUR, 3 * DAY + 600 - 4 * HOUR];
        assert_eq!(metrics.lead_time.deployments, 3);
        assert_eq!(metrics.lead_time.bake_to_prod, Some(Summary { count: 3, median_secs: bake[1], p90_secs: bake[2] }));
        assert_eq!(
            metrics.lead_time.commit_to_prod,
            Some(Summary { count: 3, median_secs: bake[1] + HOUR, p90_secs: bake[2] + HOUR })
        );
    }

    #[test]
    fn a_revoked_image_fails_every_deployment_of_it_and_of_its_descendants() {
        let mut ledger = Ledger::default();
        ledger.deploy(DAY, "dev", image(1));
        ledger.deploy(DAY, "prod", image(1));
        ledger.deploy(2 * DAY, "dev", image(2)); // built on image 1
        ledger.deploy(3 * DAY, "dev", image(5)); // unrelated
        ledger.revoke(4 * DAY, image(1), vec![image(2)]);
        let metrics = ledger.metrics(0, 5 * DAY);
        let dev = stage(&metrics, "dev");
        assert_eq!((dev.deployments, dev.failed), (3, 2));
        assert!(dev.failures.iter().all(|f| f.cause == FailureCause::Revoked && f.seq == 9), "{:?}", dev.failures);
        assert_eq!(dev.change_failure_rate, Some(2.0 / 3.0));
        assert_eq!(dev.time_to_restore, None, "a revocation is not an outage of the stage");
        let prod = stage(&metrics, "prod");
        assert_eq!((prod.deployments, prod.failed, prod.change_failure_rate), (1, 1, Some(1.0)));
    }

    #[test]
    fn a_failed_verification_window_is_a_failed_deployment_and_a_failed_health_check_is_not_one() {
        let mut ledger = Ledger::default();
        ledger.deploy(DAY, "prod", image(1));
        ledger.fail_health(2 * DAY, "prod", image(2));
        ledger.fail_verification(3 * DAY, "prod", image(3)); // fails at 3 DAY + 180
        ledger.deploy(4 * DAY, "prod", image(4)); // healthy at 4 DAY + 600
        let metrics = ledger.metrics(0, 5 * DAY);
        let prod = stage(&metrics, "prod");
        assert_eq!(prod.deployments, 3, "image 2 never served");
        assert_eq!(prod.failed, 1);
        assert_eq!(prod.failures[0].cause, FailureCause::FailedVerification);
        let restore = DAY + 600 - 180;
        assert_eq!(prod.time_to_restore, Some(Summary { count: 1, median_secs: restore, p90_secs: restore }));
        // Lead time counts deployments that finished healthy (image 3 never did); c3 is unknown to git anyway.
        assert_eq!(metrics.lead_time.deployments, 2);
    }

    #[test]
    fn drills_are_counted_per_stage_and_the_deployments_they_ran_count_for_nothing_else() {
        let mut ledger = Ledger::default();
        ledger.deploy(DAY, "prod", image(1));
        // A failed-verify drill's release: a failed window, named by the drill event that follows it.
        ledger.fail_verification(2 * DAY, "prod", image(1));
        ledger.drill(2 * DAY + 200, "prod", true, vec!["d2".into()]);
        ledger.drill(3 * DAY, "prod", false, vec![]);
        ledger.drill(3 * DAY, "dev", true, vec![]);
        ledger.drill(HOUR, "prod", true, vec![]); // before the window
        let metrics = ledger.metrics(HOUR + 1, 5 * DAY);
        let prod = stage(&metrics, "prod");
        assert_eq!((prod.drills, prod.drills_passed), (2, 1));
        assert_eq!((prod.deployments, prod.failed, prod.unrestored), (1, 0, 0), "the drill's release is no change");
        assert_eq!(prod.time_to_restore, None);
        let dev = stage(&metrics, "dev");
        assert_eq!((dev.drills, dev.drills_passed), (1, 1));
    }

    #[test]
    fn a_failure_not_yet_restored_is_counted_as_unrestored() {
        let mut ledger = Ledger::default();
        ledger.deploy(DAY, "prod", image(1));
        ledger.fail_verification(2 * DAY, "prod", image(2));
        let prod = stage(&ledger.metrics(0, 3 * DAY), "prod").clone();
        assert_eq!((prod.unrestored, prod.time_to_restore), (1, None));
    }

    #[test]
    fn only_deployments_in_the_window_count_and_a_heal_is_not_a_deployment() {
        let mut ledger = Ledger::default();
        ledger.deploy(DAY, "prod", image(1));
        ledger.deploy(3 * DAY, "prod", image(2));
        ledger.deploy(4 * DAY, "prod", image(2)); // a heal of what is live
        ledger.rollback(5 * DAY, "prod", image(1));
        let metrics = ledger.metrics(2 * DAY, 6 * DAY);
        let prod = stage(&metrics, "prod");
        assert_eq!(prod.deployments, 1, "image 1's deployment is before the window; the heal is none");
        assert_eq!(prod.per_day, Some(0.25));
        assert_eq!((prod.failed, prod.failures[0].digest), (1, image(2)));
        assert_eq!(metrics.lead_time.bake_to_prod.map(|s| s.count), Some(1));
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        let secs = |list: &[u64]| list.iter().map(|s| Duration::from_secs(*s)).collect::<Vec<_>>();
        assert_eq!(Summary::of(vec![]), None);
        assert_eq!(Summary::of(secs(&[7])), Some(Summary { count: 1, median_secs: 7, p90_secs: 7 }));
        assert_eq!(Summary::of(secs(&[4, 1, 3, 2])), Some(Summary { count: 4, median_secs: 2, p90_secs: 4 }));
        let ten: Vec<u64> = (1..=10).rev().collect();
        assert_eq!(Summary::of(secs(&ten)), Some(Summary { count: 10, median_secs: 5, p90_secs: 9 }));
    }
}
