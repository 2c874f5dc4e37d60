//! Fire drills (`kiln drill`): a named fault against a running stage under a small steady load through the stage
//! endpoint, then a judgement of the invariant: the stage kept serving (failed requests within the kind's bound)
//! and came back to capacity on one digest, the ledger's live one. The definitions are in docs/drill.md; killing
//! processes is the provider's (and the binary's) part, behind [`Faults`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use super::deploy::{self, Want};
use super::Context;
use crate::config::Stage;
use crate::digest::Digest;
use crate::ledger::{Decision, EventBody};
use crate::provider::inject::{CrashMode, Fault, Faulty, Injector, Rule};
use crate::provider::StageRef;
use crate::Error;

/// Requests in flight at once: the drill's load is two clients, each sending one request at a time.
pub const CLIENTS: u64 = 2;
/// Pause between one client's requests: together about 100 requests a second, small next to what a stage serves.
const PAUSE: Duration = Duration::from_millis(20);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Steady load before the fault, so a stage that fails without any fault shows up as such.
const WARM_UP: Duration = Duration::from_millis(300);
/// Load kept on the stage after it converged, so a stage that converges and then falls over again shows up too.
const SETTLE: Duration = Duration::from_millis(300);
/// How long a killed kiln's release has to reach the point it is killed at.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(60);
/// The stage is left serving with the deployment killed for this long before the on-call redeploys.
const UNATTENDED: Duration = Duration::from_millis(500);
/// The deploy step after which `kill-kiln` kills the release: the new group exists, traffic has not moved.
const KILL_AFTER_STEP: &str = "group-created";
/// Failed requests kept as examples in the report.
const EXAMPLES: usize = 5;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    KillInstance,
    KillKiln,
    UnhealthyRelease,
    KillProxy,
    FailedVerify,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::KillInstance => "kill-instance",
            Kind::KillKiln => "kill-kiln",
            Kind::UnhealthyRelease => "unhealthy-release",
            Kind::KillProxy => "kill-proxy",
            Kind::FailedVerify => "failed-verify",
        }
    }

    /// The most failed requests the kind allows (docs/drill.md says why).
    pub fn bound(self) -> u64 {
        match self {
            // The requests in flight through the killed proxy worker; the next ones wait in the listen backlog.
            Kind::KillProxy => CLIENTS,
            // The proxy retries an idempotent request that a killed instance dropped on another instance, and the
            // other kinds never take the old group out of the routes before the new one is healthy.
            Kind::KillInstance | Kind::KillKiln | Kind::UnhealthyRelease | Kind::FailedVerify => 0,
        }
    }

    /// Whether the drill deploys a release of its own (and so needs nothing pending for the stage).
    fn deploys(self) -> bool {
        matches!(self, Kind::KillKiln | Kind::UnhealthyRelease | Kind::FailedVerify)
    }
}

/// The provider- and binary-specific ways to cause the faults.
pub trait Faults {
    /// SIGKILLs one instance of `group`; says which.
    fn kill_instance(&self, stage: StageRef, group: &str) -> Result<String, Error>;
    /// SIGKILLs the process that forwards the stage endpoint's requests; says which.
    fn kill_endpoint(&self, stage: StageRef) -> Result<String, Error>;
    /// Starts another kiln process that deploys the drill's release ([`Want::Redeploy`]) to the stage.
    fn start_release(&self, stage: &str) -> Result<std::process::Child, Error>;
}

#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    pub pipeline: String,
    pub stage: String,
    pub kind: Kind,
    pub passed: bool,
    pub requests: u64,
    pub failed: u64,
    pub bound: u64,
    pub converged: bool,
    /// Why the stage did not converge, when it did not.
    pub not_converged: Option<String>,
    /// How long after the fault the stage was back at capacity on its live digest.
    pub converged_after_ms: Option<u64>,
    /// The live digest and group before and after the drill.
    pub digest: Digest,
    pub group_before: String,
    pub digest_after: Option<Digest>,
    pub group_after: Option<String>,
    pub duration_ms: u64,
    /// The deployments the drill ran (its release, the on-call's redeploy).
    pub deploys: Vec<String>,
    /// What the drill did and saw.
    pub steps: Vec<String>,
    /// Some failed requests, as examples.
    pub failures: Vec<String>,
    /// The `drill` event.
    pub seq: u64,
}

impl DrillReport {
    /// What the drill changed on the stage, if anything.
    pub fn changed(&self) -> Option<String> {
        match (&self.digest_after, &self.group_after) {
            (Some(d), Some(g)) if *d == self.digest && *g == self.group_before => None,
            (Some(d), Some(g)) if *d == self.digest => {
                Some(format!("the live group is now {g} (was {}), same digest", self.group_before))
            }
            (Some(d), Some(g)) => Some(format!("the stage now runs {} in group {g}", d.short())),
            _ => Some("nothing is live in the stage any more".to_string()),
        }
    }
}

/// The stage at capacity on one digest, the ledger's live one.
#[derive(Debug, Clone)]
struct Converged {
    digest: Digest,
    group: String,
}

/// Whether the stage is at capacity on one digest: every instance of the live group alive and healthy, the
/// endpoint up, routed to that group and answering, the group on the ledger's live digest, no other group
/// running, no deployment open. `Ok(Err(why))` when not.
fn converged(ctx: &Context, stage: &Stage) -> Result<Result<Converged, String>, Error> {
    let target = StageRef { pipeline: &ctx.pipeline.name, stage };
    let view = ctx.ledger.view()?;
    let there = view.stage(&ctx.pipeline.name, &stage.name);
    let Some(live) = there.and_then(|s| s.live.clone()) else { return Ok(Err("nothing is live".into())) };
    if let Some(open) = there.and_then(|s| s.open.as_ref()) {
        return Ok(Err(format!("deployment {} is still open", open.deploy_id)));
    }
    let groups = ctx.fleet.groups(target)?;
    let Some(group) = groups.iter().find(|g| g.name == live.group) else {
        return Ok(Err(format!("live group {} does not exist", live.group)));
    };
    if group.digest != live.digest {
        return Ok(Err(format!("group {} runs {}, the ledger says {}", group.name, group.digest.short(), live.digest)));
    }
    if group.capacity < stage.capacity || group.running < group.capacity {
        return Ok(Err(format!("group {} runs {} of {} instances", group.name, group.running, stage.capacity)));
    }
    if let Some(other) = groups.iter().find(|g| g.name != live.group && g.running > 0) {
        return Ok(Err(format!("group {} runs too ({} instances)", other.name, other.running)));
    }
    if !ctx.fleet.endpoint_up(target) {
        return Ok(Err("the endpoint is down".into()));
    }
    let serving = ctx.fleet.serving(target)?;
    if serving.as_deref() != Some(live.group.as_str()) {
        return Ok(Err(format!("the endpoint routes to {}", serving.as_deref().unwrap_or("no group"))));
    }
    let health = ctx.fleet.health(target, &live.group)?;
    if !health.all_healthy() {
        return Ok(Err(format!("{} of {} instances healthy", health.healthy, health.total)));
    }
    // The endpoint's process may be up while what forwards its requests is not (a proxy worker being restarted).
    if let Some((addr, host)) = ctx.fleet.endpoint(target).as_deref().and_then(endpoint_addr) {
        if let Err(why) = get(addr, &host) {
            return Ok(Err(format!("the endpoint does not answer: {why}")));
        }
    }
    Ok(Ok(Converged { digest: live.digest, group: live.group }))
}

fn wait_converged(ctx: &Context, stage: &Stage, timeout: Duration) -> Result<Result<Converged, String>, Error> {
    let deadline = Instant::now() + timeout;
    loop {
        let now = converged(ctx, stage)?;
        if now.is_ok() || Instant::now() >= deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The steady load: [`CLIENTS`] threads, each sending `GET /` and pausing, until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    examples: Arc<Mutex<Vec<String>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, host: String) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let examples = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..CLIENTS)
            .map(|_| {
                let (stop, sent, failed, examples) = (stop.clone(), sent.clone(), failed.clone(), examples.clone());
                let host = host.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        sent.fetch_add(1, Ordering::SeqCst);
                        if let Err(why) = get(addr, &host) {
                            failed.fetch_add(1, Ordering::SeqCst);
                            let mut kept = examples.lock().unwrap_or_else(|p| p.into_inner());
                            if kept.len() < EXAMPLES {
                                kept.push(why);
                            }
                        }
                        std::thread::sleep(PAUSE);
                    }
                })
            })
            .collect();
        Load { stop, sent, failed, examples, threads }
    }

    fn finish(self) -> (u64, u64, Vec<String>) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            let _ = thread.join();
        }
        let examples = self.examples.lock().unwrap_or_else(|p| p.into_inner()).clone();
        (self.sent.load(Ordering::SeqCst), self.failed.load(Ordering::SeqCst), examples)
    }
}

/// One `GET /` on its own connection. Served means any answer below 500: the application's own answer, whatever it
/// is; a 5xx (the proxy's 502 and 503 among them), a refused or reset connection or a timeout is a failure.
fn get(addr: SocketAddr, host: &str) -> Result<(), String> {
    let mut stream = TcpStream::connect_timeout(&addr, REQUEST_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    stream.set_read_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(REQUEST_TIMEOUT)).map_err(|e| e.to_string())?;
    let request = format!("GET / HTTP/1.1\r\nHost: {host}\r\nUser-Agent: kiln-drill\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).map_err(|e| format!("send: {e}"))?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(|e| format!("read: {e}"))?;
    let text = String::from_utf8_lossy(&answer);
    let status_line = text.lines().next().unwrap_or_default();
    let code: u16 = status_line
        .split_ascii_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| format!("no HTTP answer ({} bytes)", answer.len()))?;
    if code >= 500 {
        return Err(format!("HTTP {code}"));
    }
    Ok(())
}

/// `http://host:port[/…]` as an address to connect to and the Host header to send.
fn endpoint_addr(endpoint: &str) -> Option<(SocketAddr, String)> {
    let rest = endpoint.strip_prefix("http://")?;
    let host = rest.split('/').next()?.to_string();
    let addr = host.to_socket_addrs().ok()?.next()?;
    Some((addr, host))
}

/// What must hold before a drill starts, or it says nothing about the stage.
fn check_preconditions(ctx: &Context, stage: &Stage, kind: Kind) -> Result<(), Error> {
    let view = ctx.ledger.view()?;
    let there = view.stage(&ctx.pipeline.name, &stage.name).cloned().unwrap_or_default();
    let Some(live) = there.live.as_ref() else {
        return Err(Error::usage(format!(
            "nothing is live in {stage}; a drill needs a running stage (`kiln deploy --stage {stage}`)",
            stage = stage.name
        )));
    };
    if kind == Kind::KillInstance && stage.capacity < 2 {
        return Err(Error::usage(format!(
            "kill-instance needs a stage of capacity 2 or more: {} has capacity {}, so killing its one instance \
             fails requests until it is replaced, and there is no bound to hold it to",
            stage.name, stage.capacity
        )));
    }
    if kind == Kind::FailedVerify && stage.verify_for.is_none() {
        return Err(Error::usage(format!(
            "stage {} has no verification window (`verify-for`), so a release that fails verification would stay \
             live; add `verify-for` (and `[[stage.verify]]` checks) to the stage before drilling failed-verify",
            stage.name
        )));
    }
    if kind.deploys() {
        if there.held_by_rollback().is_some() {
            return Err(Error::usage(format!(
                "{} is held on {} by a rollback; a drill's release would end the hold, so drill {} after the next \
                 promotion",
                stage.name,
                live.digest.short(),
                kind.name()
            )));
        }
        if there.promoted.as_ref().map(|p| p.digest) != Some(live.digest) {
            return Err(Error::usage(format!(
                "{stage} has a promotion that is not deployed yet; the on-call's `kiln deploy` in a drill would \
                 roll it out, so deploy it first (`kiln deploy --stage {stage}`)",
                stage = stage.name
            )));
        }
    }
    match converged(ctx, stage)? {
        Ok(_) => Ok(()),
        Err(why) => Err(Error::usage(format!(
            "stage {stage} is not at capacity on its live digest before the drill ({why}); `kiln deploy --stage \
             {stage}` first",
            stage = stage.name
        ))),
    }
}

/// The deployments started on the stage after `seq`, by id.
fn deploys_since(ctx: &Context, stage: &Stage, seq: u64) -> Result<Vec<String>, Error> {
    let head = ctx.ledger.view()?.seq();
    let mut ids = Vec::new();
    for n in seq + 1..=head {
        if let Some(stored) = ctx.ledger.read(n)? {
            if let EventBody::DeployStarted { pipeline, stage: s, deploy_id, .. } = stored.event.body {
                if pipeline == ctx.pipeline.name && s == stage.name {
                    ids.push(deploy_id);
                }
            }
        }
    }
    Ok(ids)
}

/// Runs a deployment of the drill's release through `injector`, which makes its health fail; the deployment must
/// fail. Returns what happened, and whether it did fail as it must.
fn failing_release(ctx: &Context, stage: &Stage, injector: &Injector) -> Result<(String, bool), Error> {
    let faulty = Faulty { images: ctx.images, fleet: ctx.fleet, injector };
    let with_fault = Context {
        repo: ctx.repo,
        pipeline: ctx.pipeline,
        ledger: ctx.ledger,
        clock: ctx.clock,
        actor: ctx.actor,
        images: ctx.images,
        fleet: &faulty,
        state_dir: ctx.state_dir.clone(),
        echo: ctx.echo,
        lease_holder: ctx.lease_holder.clone(),
        progress: ctx.progress,
    };
    match deploy::deploy(&with_fault, &stage.name, Want::Redeploy) {
        Err(failed @ Error::DeployFailed { .. }) => Ok((format!("the release failed as it must: {failed}"), true)),
        Ok(report) => {
            Ok((format!("the release was deployed as group {} although it was unhealthy", report.group), false))
        }
        Err(other) => Err(other),
    }
}

/// `kill-kiln`: a kiln process deploys the release and is SIGKILLed once its new group exists, before traffic
/// moves; the stage is left like that for a moment, then the on-call runs `kiln deploy`.
fn kill_kiln(ctx: &Context, faults: &dyn Faults, stage: &Stage, steps: &mut Vec<String>) -> Result<bool, Error> {
    let before = ctx.ledger.view()?.seq();
    let mut child = faults.start_release(&stage.name)?;
    let pid = child.id();
    let deadline = Instant::now() + RELEASE_TIMEOUT;
    let reached = loop {
        let view = ctx.ledger.view()?;
        let open = view.stage(&ctx.pipeline.name, &stage.name).and_then(|s| s.open.clone());
        if let Some(open) = open.filter(|o| o.seq > before && o.steps.iter().any(|s| s == KILL_AFTER_STEP)) {
            break open;
        }
        let exited = child.try_wait().map_err(Error::io("the drill's kiln process"))?;
        if exited.is_some() || Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            let how = exited.map_or("did not reach it in time".to_string(), |s| format!("exited first ({s})"));
            return Err(Error::Provider(crate::provider::ProviderError::Other {
                provider: "drill",
                message: format!(
                    "the release's kiln (pid {pid}) was to be killed after step {KILL_AFTER_STEP} but {how}"
                ),
            }));
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let _ = child.kill();
    let _ = child.wait();
    let at = ctx.ledger.view()?;
    let steps_then = at
        .stage(&ctx.pipeline.name, &stage.name)
        .and_then(|s| s.open.as_ref())
        .map(|o| o.steps.join(", "))
        .unwrap_or_default();
    steps.push(format!(
        "SIGKILLed kiln (pid {pid}) deploying {} as group {}, after steps [{steps_then}]",
        reached.deploy_id, reached.group
    ));
    std::thread::sleep(UNATTENDED);
    let report = deploy::deploy(ctx, &stage.name, Want::Promoted)?;
    let outcome = serde_json::to_value(report.outcome).ok().and_then(|v| v.as_str().map(str::to_string));
    steps.push(format!(
        "the on-call's `kiln deploy`: {}{}",
        outcome.unwrap_or_default(),
        report.reconciled.map(|r| format!(" ({})", r.trim_end())).unwrap_or_default()
    ));
    Ok(true)
}

/// Runs the drill, records it as a `drill` event and reports it. An error means the drill could not be run (or
/// could not be judged); a drill whose invariant did not hold is a report with `passed: false`.
pub fn drill(
    ctx: &Context,
    faults: &dyn Faults,
    stage_name: &str,
    kind: Kind,
    converge_timeout: Duration,
) -> Result<DrillReport, Error> {
    let stage = super::promote::stage(ctx, stage_name)?;
    let target = StageRef { pipeline: &ctx.pipeline.name, stage };
    check_preconditions(ctx, stage, kind)?;
    let before = match converged(ctx, stage)? {
        Ok(c) => c,
        Err(why) => return Err(Error::usage(format!("stage {} changed before the drill began: {why}", stage.name))),
    };
    let endpoint = ctx.fleet.endpoint(target).ok_or_else(|| Error::usage(format!("{} has no endpoint", stage.name)))?;
    let (addr, host) = endpoint_addr(&endpoint)
        .ok_or_else(|| Error::usage(format!("the endpoint {endpoint} of {} is not an http:// address", stage.name)))?;
    let seq_before = ctx.ledger.view()?.seq();
    let started = Instant::now();
    let load = Load::start(addr, host);
    std::thread::sleep(WARM_UP);

    let mut steps = Vec::new();
    let faulted = (|| -> Result<bool, Error> {
        match kind {
            Kind::KillInstance => {
                steps.push(faults.kill_instance(target, &before.group)?);
                Ok(true)
            }
            Kind::KillProxy => {
                steps.push(faults.kill_endpoint(target)?);
                Ok(true)
            }
            Kind::KillKiln => kill_kiln(ctx, faults, stage, &mut steps),
            Kind::UnhealthyRelease => {
                let injector = Injector::new(CrashMode::Kill);
                injector.add(Rule {
                    call: "health".into(),
                    nth: None,
                    fault: Fault::Unhealthy("the drill's release never became healthy (injected by kiln drill)".into()),
                });
                let (what, failed) = failing_release(ctx, stage, &injector)?;
                steps.push(what);
                Ok(failed)
            }
            Kind::FailedVerify => {
                // Healthy until traffic is on the release; from then on its health fails, inside the window.
                let injector = Arc::new(Injector::new(CrashMode::Kill));
                let later = Arc::downgrade(&injector);
                injector.add(Rule {
                    call: "route".into(),
                    nth: Some(1),
                    fault: Fault::Hook(Arc::new(move || {
                        if let Some(injector) = later.upgrade() {
                            injector.add(Rule {
                                call: "health".into(),
                                nth: None,
                                fault: Fault::Unhealthy(
                                    "the drill's release turned unhealthy after cutover (injected by kiln drill)"
                                        .into(),
                                ),
                            });
                        }
                    })),
                });
                let (what, failed) = failing_release(ctx, stage, &injector)?;
                steps.push(what);
                Ok(failed)
            }
        }
    })();
    let faulted = match faulted {
        Ok(as_expected) => as_expected,
        Err(err) => {
            // The load threads end before the error goes up; the stage is left as the fault left it.
            let _ = load.finish();
            return Err(err);
        }
    };
    let fault_done = Instant::now();
    let after = wait_converged(ctx, stage, converge_timeout)?;
    let converged_after_ms = after.as_ref().ok().map(|_| fault_done.elapsed().as_millis() as u64);
    if after.is_ok() {
        std::thread::sleep(SETTLE);
    }
    let (requests, failed, failures) = load.finish();
    // Judged again after the settling load: a stage that converged and fell over again has not converged.
    let after = match after {
        Ok(_) => converged(ctx, stage)?,
        not => not,
    };
    let duration_ms = started.elapsed().as_millis() as u64;
    let deploys = deploys_since(ctx, stage, seq_before)?;
    let bound = kind.bound();
    let (digest_after, group_after) = match &after {
        Ok(c) => (Some(c.digest), Some(c.group.clone())),
        Err(_) => {
            let view = ctx.ledger.view()?;
            let live = view.stage(&ctx.pipeline.name, &stage.name).and_then(|s| s.live.clone());
            (live.as_ref().map(|l| l.digest), live.map(|l| l.group))
        }
    };
    let converged = after.is_ok();
    let same_digest = digest_after == Some(before.digest);
    let passed = faulted && converged && same_digest && requests > 0 && failed <= bound;
    let mut report = DrillReport {
        pipeline: ctx.pipeline.name.clone(),
        stage: stage.name.clone(),
        kind,
        passed,
        requests,
        failed,
        bound,
        converged,
        not_converged: after.err(),
        converged_after_ms,
        digest: before.digest,
        group_before: before.group,
        digest_after,
        group_after,
        duration_ms,
        deploys,
        steps,
        failures,
        seq: 0,
    };
    let mut detail = report.steps.join("; ");
    if let Some(why) = &report.not_converged {
        detail.push_str(&format!("; not converged: {why}"));
    }
    if let Some(changed) = report.changed() {
        detail.push_str(&format!("; changed: {changed}"));
    }
    let body = EventBody::Drill {
        pipeline: report.pipeline.clone(),
        stage: report.stage.clone(),
        fault: kind.name().to_string(),
        passed,
        requests,
        failed,
        bound,
        converged,
        digest: Some(report.digest),
        duration_ms,
        deploys: report.deploys.clone(),
        detail,
    };
    let (_, stored) =
        ctx.ledger.append::<(), Error>(ctx.actor, ctx.clock, |_| Ok(Decision::Append(Box::new(body.clone()), ())))?;
    report.seq = stored.map_or(0, |s| s.event.seq);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kill_proxy_allows_failed_requests_and_only_as_many_as_are_in_flight() {
        let all = [Kind::KillInstance, Kind::KillKiln, Kind::UnhealthyRelease, Kind::KillProxy, Kind::FailedVerify];
        let bounds: Vec<(&str, u64)> = all.iter().map(|k| (k.name(), k.bound())).collect();
        assert_eq!(
            bounds,
            [
                ("kill-instance", 0),
                ("kill-kiln", 0),
                ("unhealthy-release", 0),
                ("kill-proxy", CLIENTS),
                ("failed-verify", 0)
            ]
        );
    }

    #[test]
    fn endpoints_are_read_as_address_and_host() {
        let (addr, host) = endpoint_addr("http://127.0.0.1:18080").unwrap();
        assert_eq!((addr.port(), host.as_str()), (18080, "127.0.0.1:18080"));
        assert_eq!(endpoint_addr("http://127.0.0.1:18080/health").unwrap().1, "127.0.0.1:18080");
        assert!(endpoint_addr("https://example.com").is_none());
    }

    #[test]
    fn a_5xx_a_refusal_and_a_non_http_answer_fail_and_any_lower_status_is_served() {
        use std::net::TcpListener;
        let answer = |reply: &'static str| {
            let listener = TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = listener.local_addr().unwrap();
            std::thread::spawn(move || {
                let (mut stream, _) = listener.accept().unwrap();
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf);
                let _ = stream.write_all(reply.as_bytes());
            });
            get(addr, "x")
        };
        assert!(answer("HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n").is_ok());
        assert!(answer("HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n").is_ok());
        assert_eq!(answer("HTTP/1.1 502 Bad Gateway\r\ncontent-length: 0\r\n\r\n"), Err("HTTP 502".into()));
        assert!(answer("").unwrap_err().starts_with("no HTTP answer"));
        let closed = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        assert!(get(closed, "x").unwrap_err().starts_with("connect"));
    }
}
