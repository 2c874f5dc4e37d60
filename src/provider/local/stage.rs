//! A local stage at run time: its groups of instance processes, and the detached reverse proxy on the stage's
//! port that follows the group traffic is routed to. State lives in `.kiln/run/<pipeline>/<stage>/`.

use std::collections::BTreeMap;
use std::fs;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::fleet::{self, FleetError, InstanceHandle, InstanceSpec};
use super::proxy::{self, Routes};
use super::LocalProvider;
use crate::config::StageDeploy;
use crate::digest::Digest;
use crate::provider::{
    Fleet, GroupHealth, GroupInfo, ImageProvider, ImageRef, PollCadence, ProviderError, StageRef, Unhealthy,
};

const STOP_GRACE: Duration = Duration::from_secs(5);
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
const LOG_TAIL: usize = 2048;
/// One probe never blocks a health look for longer than this, so a hung instance cannot hide a dead one.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct GroupState {
    name: String,
    digest: Digest,
    image_ref: String,
    capacity: u32,
    instances: Vec<InstanceHandle>,
    /// How its instances start, so the stage's supervisor can restart one that died without the image or the
    /// ledger at hand. Absent in groups launched before supervision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    start: Option<StartRecipe>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StartRecipe {
    root: PathBuf,
    command: Vec<String>,
    env: BTreeMap<String, String>,
}

impl StartRecipe {
    fn spec(&self, stage_dir: &Path, name: &str, port: u16) -> InstanceSpec {
        InstanceSpec {
            name: name.to_string(),
            root: self.root.clone(),
            command: self.command.clone(),
            env: self.env.clone(),
            port,
            workdir: stage_dir.join("instances").join(name),
            log_path: stage_dir.join("logs").join(format!("{name}.log")),
        }
    }
}

/// An exclusive lock on a stage's group files: kiln (launch, park, destroy) and the stage's supervisor (restarting
/// dead instances) each read, change and write a group under it, so neither restarts or records an instance the
/// other just stopped. Released when dropped.
pub(super) struct GroupsLock {
    _file: fs::File,
}

impl GroupsLock {
    pub(super) fn take(stage_dir: &Path) -> Result<GroupsLock, ProviderError> {
        let path = stage_dir.join("groups.lock");
        let io = |source| ProviderError::Io { what: "locking", path: path.clone(), source };
        fs::create_dir_all(stage_dir).map_err(io)?;
        let file = fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(io)?;
        // SAFETY: flock on a descriptor we own; it blocks until the lock is ours.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(io(std::io::Error::last_os_error()));
        }
        Ok(GroupsLock { _file: file })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct ProxyProcess {
    pid: i32,
    start_time: u64,
    port: u16,
}

fn other(message: impl Into<String>) -> ProviderError {
    ProviderError::Other { provider: "local", message: message.into() }
}

/// The last `max` bytes of `text`, cut at a character boundary.
fn tail(text: &str, max: usize) -> &str {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

fn fleet_error(err: FleetError) -> ProviderError {
    other(err.to_string())
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), ProviderError> {
    let bytes = serde_json::to_vec_pretty(value).map_err(|e| other(e.to_string()))?;
    crate::fsutil::replace_file(path, &bytes).map_err(|source| ProviderError::Io {
        what: "writing",
        path: path.to_path_buf(),
        source,
    })
}

pub(super) fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    serde_json::from_slice(&fs::read(path).ok()?).ok()
}

/// One instance the supervisor restarted, or failed to.
#[derive(Debug)]
pub(super) struct Restart {
    pub instance: String,
    pub outcome: Result<i32, String>,
}

/// Restarts, on their own ports, the dead instances of the group the stage routes to (the group whose instance
/// ports are exactly the routes' backends), as far as `may_restart` allows each. Groups not routed to are left
/// alone: a new group that dies while it starts must fail its deployment, and an old one is being retired.
pub(super) fn restart_dead_routed(
    stage_dir: &Path,
    may_restart: &mut dyn FnMut(&str) -> bool,
) -> Result<Vec<Restart>, ProviderError> {
    let Some(routes) = read_json::<Routes>(&stage_dir.join("routes.json")) else { return Ok(Vec::new()) };
    let mut routed: Vec<u16> = routes.backends;
    routed.sort_unstable();
    if routed.is_empty() {
        return Ok(Vec::new());
    }
    let _lock = GroupsLock::take(stage_dir)?;
    let mut restarts = Vec::new();
    for entry in fs::read_dir(stage_dir.join("groups")).into_iter().flatten().flatten() {
        let path = entry.path();
        let Some(mut state) = read_json::<GroupState>(&path) else { continue };
        let mut ports: Vec<u16> = state.instances.iter().map(|i| i.port).collect();
        ports.sort_unstable();
        if state.capacity == 0 || ports != routed {
            continue;
        }
        let Some(recipe) = state.start.clone() else { continue };
        let mut changed = false;
        for handle in state.instances.iter_mut() {
            if fleet::is_alive(handle) || !may_restart(&handle.name) {
                continue;
            }
            let outcome = match fleet::start(&recipe.spec(stage_dir, &handle.name, handle.port)) {
                Ok(new) => {
                    *handle = new;
                    changed = true;
                    Ok(handle.pid)
                }
                Err(e) => Err(e.to_string()),
            };
            restarts.push(Restart { instance: handle.name.clone(), outcome });
        }
        if changed {
            write_json(&path, &state)?;
        }
    }
    Ok(restarts)
}

/// Field 4 of `/proc/<pid>/stat`: the parent's pid.
fn parent_pid(pid: i32) -> Option<i32> {
    let text = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    text[text.rfind(')')? + 1..].split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Sends SIGKILL to `pid` and waits until it is gone (a zombie counts as gone), up to 5 s.
fn kill_and_wait(pid: i32) -> Result<(), ProviderError> {
    let started = crate::process::start_time(pid).ok_or_else(|| other(format!("pid {pid} does not run")))?;
    // SAFETY: plain syscall with integer arguments.
    if unsafe { libc::kill(pid, libc::SIGKILL) } != 0 {
        return Err(other(format!("cannot kill pid {pid}: {}", std::io::Error::last_os_error())));
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while crate::process::alive(pid, started) {
        if Instant::now() > deadline {
            return Err(other(format!("pid {pid} still runs 5 s after SIGKILL")));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(())
}

impl LocalProvider {
    /// A drill's fault: SIGKILLs one running instance of `group`, and says which.
    pub fn kill_instance(&self, stage: StageRef, group: &str) -> Result<String, ProviderError> {
        let state = self.load_group(stage, group).ok_or_else(|| other(format!("group {group} does not exist")))?;
        let victim = state
            .instances
            .iter()
            .find(|i| fleet::is_alive(i))
            .ok_or_else(|| other(format!("group {group} has no running instance to kill")))?;
        kill_and_wait(victim.pid)?;
        Ok(format!("SIGKILLed instance {} (pid {}) of group {group}", victim.name, victim.pid))
    }

    /// A drill's fault: SIGKILLs the process that forwards the stage's requests (the proxy worker, the child of
    /// the stage's supervisor), and says which.
    pub fn kill_proxy_worker(&self, stage: StageRef) -> Result<String, ProviderError> {
        let supervisor = self
            .proxy_alive(stage)
            .ok_or_else(|| other(format!("the endpoint of {} is down; nothing to kill", stage.stage.name)))?;
        let status = proxy::read_status(&self.stage_dir(stage).join("status.json"))
            .ok_or_else(|| other(format!("the proxy of {} reports no status", stage.stage.name)))?;
        if status.pid == supervisor.pid || parent_pid(status.pid) != Some(supervisor.pid) {
            return Err(other(format!(
                "the proxy of {} (pid {}) runs without a supervisor (an earlier kiln started it); `kiln down --stage \
                 {stage}` and `kiln deploy --stage {stage}` start it supervised",
                stage.stage.name,
                supervisor.pid,
                stage = stage.stage.name
            )));
        }
        kill_and_wait(status.pid)?;
        Ok(format!("SIGKILLed the proxy worker (pid {}) under supervisor pid {}", status.pid, supervisor.pid))
    }

    fn stage_dir(&self, stage: StageRef) -> PathBuf {
        self.state.join("run").join(stage.pipeline).join(&stage.stage.name)
    }

    fn group_file(&self, stage: StageRef, group: &str) -> PathBuf {
        self.stage_dir(stage).join("groups").join(format!("{group}.json"))
    }

    fn load_group(&self, stage: StageRef, group: &str) -> Option<GroupState> {
        read_json(&self.group_file(stage, group))
    }

    fn port(stage: StageRef) -> Result<u16, ProviderError> {
        match stage.stage.deploy {
            StageDeploy::Local { port } => Ok(port),
            StageDeploy::Aws { .. } => Err(other(format!("stage {} has AWS deploy settings", stage.stage.name))),
        }
    }

    fn proxy_alive(&self, stage: StageRef) -> Option<ProxyProcess> {
        let proxy: ProxyProcess = read_json(&self.stage_dir(stage).join("proxy.json"))?;
        crate::process::alive(proxy.pid, proxy.start_time).then_some(proxy)
    }

    /// Whether the stage's proxy could listen on the stage's port now. Asked before any instance starts, so a port
    /// that another process holds fails the deployment at once, with nothing to clean up, rather than after the
    /// new group is up.
    fn check_endpoint_port(&self, stage: StageRef) -> Result<(), ProviderError> {
        if self.proxy_alive(stage).is_some() {
            return Ok(());
        }
        let port = Self::port(stage)?;
        // std sets SO_REUSEADDR, as the proxy does: connections of an earlier proxy in TIME_WAIT do not count.
        match std::net::TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, port)) {
            Ok(_probe) => Ok(()),
            Err(source) => Err(ProviderError::Endpoint {
                stage: stage.stage.name.clone(),
                reason: format!("cannot listen on 127.0.0.1:{port}: {}", proxy::bind_problem(port, &source)),
            }),
        }
    }

    /// Starts the stage's proxy, detached, unless it already runs.
    fn ensure_proxy(&self, stage: StageRef) -> Result<(), ProviderError> {
        if self.proxy_alive(stage).is_some() {
            return Ok(());
        }
        self.check_endpoint_port(stage)?;
        let dir = self.stage_dir(stage);
        let port = Self::port(stage)?;
        let io = |what, path: &Path| {
            let path = path.to_path_buf();
            move |source| ProviderError::Io { what, path, source }
        };
        fs::create_dir_all(&dir).map_err(io("creating", &dir))?;
        let log_path = dir.join("proxy.log");
        let log = fs::OpenOptions::new().create(true).append(true).open(&log_path).map_err(io("opening", &log_path))?;
        // The log outlives proxies; only what this one writes explains why it stopped.
        let log_start = log.metadata().map(|m| m.len()).unwrap_or(0);
        let err_log = log.try_clone().map_err(io("opening", &log_path))?;
        let exe = std::env::current_exe().map_err(io("finding the kiln executable", Path::new("kiln")))?;
        let status_file = dir.join("status.json");
        let _ = fs::remove_file(&status_file);
        let mut command = super::supervise::proxy_serve(&exe, port, &dir.join("routes.json"), &status_file);
        command.arg("--supervise").stdout(log).stderr(err_log);
        // SAFETY: setsid is async-signal-safe; it detaches the proxy from kiln's session so it outlives kiln.
        unsafe {
            command.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
        let child = command.spawn().map_err(io("starting the stage proxy", &dir))?;
        let pid = child.id() as i32;
        let start_time = crate::process::start_time(pid).ok_or_else(|| other("the stage proxy exited at once"))?;
        write_json(&dir.join("proxy.json"), &ProxyProcess { pid, start_time, port })?;
        // The proxy writes its status once it listens.
        let deadline = Instant::now() + Duration::from_secs(5);
        while proxy::read_status(&status_file).is_none() {
            let exited = !crate::process::alive(pid, start_time);
            if exited || Instant::now() > deadline {
                // Another process may have taken the port since it was checked: say so plainly.
                self.check_endpoint_port(stage)?;
                let written = fs::read(&log_path).unwrap_or_default();
                let said = String::from_utf8_lossy(written.get(log_start as usize..).unwrap_or_default());
                let said = said.trim();
                let how = if exited { "exited at once" } else { "did not start listening in 5 s" };
                return Err(ProviderError::Endpoint {
                    stage: stage.stage.name.clone(),
                    reason: format!(
                        "its proxy on 127.0.0.1:{port} {how}{}",
                        if said.is_empty() { String::new() } else { format!(": {}", tail(said, LOG_TAIL)) }
                    ),
                });
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }

    fn stop_instances(&self, group: &GroupState) -> Result<(), ProviderError> {
        for instance in &group.instances {
            fleet::stop(instance, STOP_GRACE).map_err(fleet_error)?;
        }
        Ok(())
    }
}

impl Fleet for LocalProvider {
    fn groups(&self, stage: StageRef) -> Result<Vec<GroupInfo>, ProviderError> {
        let dir = self.stage_dir(stage).join("groups");
        let mut out = Vec::new();
        for entry in fs::read_dir(&dir).into_iter().flatten().flatten() {
            if let Some(group) = read_json::<GroupState>(&entry.path()) {
                let running = group.instances.iter().filter(|i| fleet::is_alive(i)).count() as u32;
                out.push(GroupInfo { name: group.name, digest: group.digest, capacity: group.capacity, running });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn serving(&self, stage: StageRef) -> Result<Option<String>, ProviderError> {
        let Some(routes) = read_json::<Routes>(&self.stage_dir(stage).join("routes.json")) else { return Ok(None) };
        let mut ports = routes.backends.clone();
        ports.sort_unstable();
        if ports.is_empty() {
            return Ok(None);
        }
        for info in self.groups(stage)? {
            if let Some(group) = self.load_group(stage, &info.name) {
                let mut theirs: Vec<u16> = group.instances.iter().map(|i| i.port).collect();
                theirs.sort_unstable();
                if theirs == ports {
                    return Ok(Some(group.name));
                }
            }
        }
        Ok(None)
    }

    fn launch(
        &self,
        stage: StageRef,
        group: &str,
        image: &ImageRef,
        capacity: u32,
    ) -> Result<GroupInfo, ProviderError> {
        let instance = self
            .instance_of(image)?
            .ok_or_else(|| other(format!("image {} has no [instance] section: nothing to start", image.image_ref)))?;
        let root = self.unpacked(image)?;
        // No instance is worth starting for an endpoint that cannot come up.
        self.check_endpoint_port(stage)?;
        let dir = self.stage_dir(stage);
        let _lock = GroupsLock::take(&dir)?;
        let file = self.group_file(stage, group);
        let mut state = self.load_group(stage, group).unwrap_or(GroupState {
            name: group.to_string(),
            digest: image.digest,
            image_ref: image.image_ref.clone(),
            capacity,
            instances: Vec::new(),
            start: None,
        });
        if state.digest != image.digest {
            return Err(other(format!("group {group} already exists and runs {}", state.digest.short())));
        }
        state.capacity = capacity;
        state.start =
            Some(StartRecipe { root: root.clone(), command: instance.command.clone(), env: instance.env.clone() });
        state.instances.retain(fleet::is_alive);
        write_json(&file, &state)?;
        let mut index = 1;
        while (state.instances.len() as u32) < capacity {
            let name = format!("{group}-{index}");
            index += 1;
            if state.instances.iter().any(|i| i.name == name) {
                continue;
            }
            let port = fleet::free_port().map_err(fleet_error)?;
            let Some(recipe) = &state.start else { return Err(other("the group has no start recipe")) };
            let spec = recipe.spec(&dir, &name, port);
            let handle = fleet::start(&spec).map_err(fleet_error)?;
            state.instances.push(handle);
            // Recorded after each start, so a crash leaves no process that kiln does not know about.
            write_json(&file, &state)?;
        }
        let running = state.instances.iter().filter(|i| fleet::is_alive(i)).count() as u32;
        Ok(GroupInfo { name: group.to_string(), digest: image.digest, capacity, running })
    }

    fn health(&self, stage: StageRef, group: &str) -> Result<GroupHealth, ProviderError> {
        let state = self.load_group(stage, group).ok_or_else(|| other(format!("group {group} does not exist")))?;
        let image = ImageRef::new(state.digest, state.image_ref.clone());
        let health = self.instance_of(&image)?.map(|i| i.health).unwrap_or(crate::config::Health::Tcp);
        let mut report = GroupHealth { total: state.capacity, healthy: 0, waiting: Vec::new(), failed: None };
        for instance in &state.instances {
            // Checked on every look, also for instances that answered before: one that crashes right after its
            // first good answer must not pass.
            if !fleet::is_alive(instance) {
                report.failed = Some(Unhealthy {
                    reason: format!("instance {} died", instance.name),
                    log_tail: Some(fleet::log_tail(&instance.log_path, fleet::LOG_TAIL_BYTES)),
                });
                report.waiting.push(instance.name.clone());
            } else if fleet::check_health(instance.port, &health, PROBE_TIMEOUT) {
                report.healthy += 1;
            } else {
                report.waiting.push(instance.name.clone());
            }
        }
        let missing = state.capacity.saturating_sub(state.instances.len() as u32);
        report.waiting.extend((0..missing).map(|n| format!("{group} (instance {} not started)", n + 1)));
        Ok(report)
    }

    fn log_tail(&self, stage: StageRef, group: &str, instance: &str) -> Option<String> {
        let state = self.load_group(stage, group)?;
        let found = state.instances.iter().find(|i| i.name == instance)?;
        Some(fleet::log_tail(&found.log_path, fleet::LOG_TAIL_BYTES))
    }

    fn poll_cadence(&self) -> PollCadence {
        PollCadence { first: Duration::from_millis(20), max: Duration::from_millis(250) }
    }

    fn route(&self, stage: StageRef, group: &str) -> Result<Duration, ProviderError> {
        let state = self.load_group(stage, group).ok_or_else(|| other(format!("group {group} does not exist")))?;
        self.ensure_proxy(stage)?;
        let dir = self.stage_dir(stage);
        let routes_file = dir.join("routes.json");
        let generation = read_json::<Routes>(&routes_file).map(|r| r.generation).unwrap_or(0) + 1;
        let routes = Routes { generation, backends: state.instances.iter().map(|i| i.port).collect() };
        let started = Instant::now();
        proxy::write_routes(&routes_file, &routes).map_err(|e| other(e.to_string()))?;
        proxy::wait_applied(&dir.join("status.json"), generation, APPLY_TIMEOUT).map_err(|e| other(e.to_string()))?;
        Ok(started.elapsed())
    }

    fn drain_pending(&self, stage: StageRef, group: &str) -> Result<u64, ProviderError> {
        let Some(state) = self.load_group(stage, group) else { return Ok(0) };
        if self.proxy_alive(stage).is_none() {
            return Ok(0);
        }
        let Some(status) = proxy::read_status(&self.stage_dir(stage).join("status.json")) else {
            return Err(other(format!("the proxy of {} reports no status", stage.stage.name)));
        };
        Ok(state.instances.iter().filter_map(|i| status.in_flight.get(&i.port)).sum())
    }

    fn drain_timeout(&self, _stage: StageRef) -> Duration {
        DRAIN_TIMEOUT
    }

    fn park(&self, stage: StageRef, group: &str) -> Result<(), ProviderError> {
        let _lock = GroupsLock::take(&self.stage_dir(stage))?;
        let Some(mut state) = self.load_group(stage, group) else { return Ok(()) };
        self.stop_instances(&state)?;
        state.capacity = 0;
        state.instances.clear();
        write_json(&self.group_file(stage, group), &state)
    }

    fn destroy(&self, stage: StageRef, group: &str) -> Result<(), ProviderError> {
        let _lock = GroupsLock::take(&self.stage_dir(stage))?;
        let Some(state) = self.load_group(stage, group) else { return Ok(()) };
        self.stop_instances(&state)?;
        let dir = self.stage_dir(stage);
        for instance in &state.instances {
            let _ = fs::remove_dir_all(dir.join("instances").join(&instance.name));
        }
        let file = self.group_file(stage, group);
        fs::remove_file(&file)
            .or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) })
            .map_err(|source| ProviderError::Io { what: "removing", path: file, source })
    }

    fn endpoint(&self, stage: StageRef) -> Option<String> {
        Self::port(stage).ok().map(|port| format!("http://127.0.0.1:{port}"))
    }

    fn endpoint_up(&self, stage: StageRef) -> bool {
        self.proxy_alive(stage).is_some()
    }

    fn alarm(&self, stage: StageRef, name: &str) -> Result<crate::provider::AlarmState, ProviderError> {
        Err(ProviderError::Invalid {
            provider: "local",
            message: format!(
                "stage {}: alarm `{name}`: the local provider has no CloudWatch alarms; use a `command` check",
                stage.stage.name
            ),
        })
    }

    fn stray_instances(
        &self,
        _stage: StageRef,
        _group: &str,
        _image: &crate::provider::ImageRef,
    ) -> Result<Vec<crate::provider::StrayInstance>, ProviderError> {
        // Every instance is started from the group's own unpacked image, which `verify_image` re-hashes: there is
        // no second place an instance could take another image from.
        Ok(Vec::new())
    }

    fn plan_deploy(&self, stage: StageRef, sketch: &crate::provider::DeploySketch) -> Vec<String> {
        super::plan::deploy(stage, sketch)
    }

    fn stop_stage(&self, stage: StageRef) -> Result<(), ProviderError> {
        for info in self.groups(stage)? {
            self.park(stage, &info.name)?;
        }
        if let Some(proxy) = self.proxy_alive(stage) {
            let handle = InstanceHandle {
                name: format!("proxy for {}", stage.stage.name),
                pid: proxy.pid,
                start_time: proxy.start_time,
                port: proxy.port,
                log_path: self.stage_dir(stage).join("proxy.log"),
            };
            // The proxy finishes requests in flight for up to 10 s before it exits.
            fleet::stop(&handle, Duration::from_secs(12)).map_err(fleet_error)?;
        }
        let dir = self.stage_dir(stage);
        for file in ["routes.json", "status.json", "proxy.json"] {
            let _ = fs::remove_file(dir.join(file));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A group of `sleep` instances in `stage_dir`, the first one dead; returns its file.
    fn group_with_a_dead_instance(stage_dir: &Path, name: &str, capacity: u32) -> PathBuf {
        let recipe = StartRecipe {
            root: stage_dir.to_path_buf(),
            command: vec!["sleep".into(), "30".into()],
            env: BTreeMap::new(),
        };
        let mut instances = Vec::new();
        for n in 1..=2 {
            let spec = recipe.spec(stage_dir, &format!("{name}-{n}"), fleet::free_port().unwrap());
            instances.push(fleet::start(&spec).unwrap());
        }
        fleet::stop(&instances[0], Duration::from_secs(1)).unwrap();
        let state = GroupState {
            name: name.into(),
            digest: Digest::of(name.as_bytes()),
            image_ref: name.into(),
            capacity,
            instances,
            start: Some(recipe),
        };
        let file = stage_dir.join("groups").join(format!("{name}.json"));
        fs::create_dir_all(file.parent().unwrap()).unwrap();
        write_json(&file, &state).unwrap();
        file
    }

    fn stop_all(file: &Path) {
        let state: GroupState = read_json(file).unwrap();
        for instance in &state.instances {
            let _ = fleet::stop(instance, Duration::from_secs(1));
        }
    }

    #[test]
    fn only_dead_instances_of_the_routed_group_are_restarted_on_their_ports() {
        let dir = tempfile::tempdir().unwrap();
        let routed = group_with_a_dead_instance(dir.path(), "live", 2);
        let other = group_with_a_dead_instance(dir.path(), "old", 2);
        let live: GroupState = read_json(&routed).unwrap();
        let ports: Vec<u16> = live.instances.iter().map(|i| i.port).collect();
        write_json(&dir.path().join("routes.json"), &Routes { generation: 1, backends: ports.clone() }).unwrap();

        let mut asked = Vec::new();
        let restarts = restart_dead_routed(dir.path(), &mut |name| {
            asked.push(name.to_string());
            true
        })
        .unwrap();
        assert_eq!(asked, ["live-1"], "only the routed group's dead instance");
        assert_eq!(restarts.len(), 1);
        let now: GroupState = read_json(&routed).unwrap();
        assert!(now.instances.iter().all(fleet::is_alive), "{now:?}");
        assert_eq!(now.instances.iter().map(|i| i.port).collect::<Vec<_>>(), ports, "on the same ports");
        assert_ne!(now.instances[0].pid, live.instances[0].pid);
        let old: GroupState = read_json(&other).unwrap();
        assert!(!fleet::is_alive(&old.instances[0]), "a group not routed to is left alone");

        // Held back by the back-off, it is left dead; a parked group (capacity 0) is never restarted.
        fleet::stop(&now.instances[1], Duration::from_secs(1)).unwrap();
        assert!(restart_dead_routed(dir.path(), &mut |_| false).unwrap().is_empty());
        assert!(!fleet::is_alive(&read_json::<GroupState>(&routed).unwrap().instances[1]));
        let mut parked: GroupState = read_json(&routed).unwrap();
        parked.capacity = 0;
        write_json(&routed, &parked).unwrap();
        assert!(restart_dead_routed(dir.path(), &mut |_| true).unwrap().is_empty());
        stop_all(&routed);
        stop_all(&other);
    }
}
