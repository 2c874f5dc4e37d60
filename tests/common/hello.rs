//! The example `hello` pipeline cut down to what deploy tests need: one stage on a free port, images that differ
//! by greeting, and ways to make an instance slow or broken.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use super::Repo;

/// The example repository with only a dev stage (capacity `capacity`) on a free port; `keys` are added to the
/// dev stage's own table (e.g. `lease = "2s"`), `tables` after it (e.g. `[[stage.verify]]` checks).
pub fn dev_stage(capacity: u32, keys: &str, tables: &str) -> (Repo, u16) {
    let (repo, ports) = Repo::example_on_free_ports();
    let text = std::fs::read_to_string(repo.file("pipelines/hello.toml")).unwrap();
    let dev_end = text.find("\n[[stage]]\nname = \"test\"").unwrap();
    let dev = text[..dev_end].replace("capacity = 2", &format!("capacity = {capacity}\n{keys}"));
    repo.write("pipelines/hello.toml", &format!("{dev}\n{tables}"));
    (repo, ports[0])
}

/// Makes instances of images baked from now on run `script` (a shell script body; `$HELLO` is the hello binary)
/// instead of the hello binary itself.
pub fn instance_script(repo: &Repo, name: &str, body: &str) {
    let script = format!("#!/bin/sh\nHELLO=\"$(dirname \"$0\")/hello\"\n{body}\n");
    repo.write(&format!("images/files/{name}.sh"), &script);
    let text = std::fs::read_to_string(repo.file("images/hello.toml")).unwrap();
    let instance = text.find("[instance]").unwrap();
    let end = instance + text[instance..].find('\n').unwrap();
    let command_line = text[end + 1..].lines().next().unwrap().to_string();
    assert!(command_line.starts_with("command = "), "{command_line}");
    let new = format!(
        "{}[[provision]]\ncopy = \"files/{name}.sh\"\nto = \"/opt/hello/bin/{name}\"\n[[provision]]\nshell = \"chmod 755 $KILN_ROOT/opt/hello/bin/{name}\"\n\n[instance]\ncommand = [\"/opt/hello/bin/{name}\"]{}",
        &text[..instance],
        &text[end + 1 + command_line.len()..]
    );
    repo.write("images/hello.toml", &new);
    let path = repo.file(&format!("images/files/{name}.sh"));
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// The process state letter from /proc (R, S, T for stopped, Z, …).
pub fn process_state(pid: u32) -> Option<char> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    stat[stat.rfind(')')? + 2..].chars().next()
}

/// Waits until the process has stopped itself (a `stop:` fault point), for at most a minute.
pub fn wait_stopped(pid: u32) {
    let started = Instant::now();
    while process_state(pid) != Some('T') {
        assert!(started.elapsed() < Duration::from_secs(60), "kiln (pid {pid}) never reached its stop point");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill").args([&format!("-{signal}"), &pid.to_string()]).status().unwrap();
    assert!(status.success());
}

/// The ledger's events, oldest first, as JSON.
pub fn events(repo: &Repo) -> Vec<serde_json::Value> {
    let mut all = repo.run(&["log", "--json", "--limit", "100000"]).ok().json()["events"].as_array().unwrap().clone();
    all.reverse();
    all
}

/// Bakes two images greeting `first` and `second`, deploys the first to dev and promotes the second there without
/// deploying it: where most deploy tests start. Returns both digests.
pub fn first_live_second_promoted(repo: &Repo, first: &str, second: &str) -> (String, String) {
    let one = super::bake_greeting(repo, first);
    let two = super::bake_greeting(repo, second);
    super::promote_only(repo, &one);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    super::promote_only(repo, &two);
    (one, two)
}
