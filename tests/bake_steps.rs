//! Provision steps do not outlive themselves: a timeout or Ctrl-C stops everything a step started, and nothing a
//! bake leaves in `.kiln/tmp` survives it or `kiln gc`.

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::{count_files, tiny_repo, Repo};

/// The processes whose command line holds `marker` (zombies have none, so they do not count).
fn survivors(marker: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .filter(|line| line.windows(marker.len()).any(|w| w == marker.as_bytes()))
        .map(|line| String::from_utf8_lossy(&line).replace('\0', " "))
        .collect()
}

/// A unique marker for this test's step processes.
fn marker(name: &str) -> String {
    format!("kiln-{name}-{}", std::process::id())
}

fn with_step(repo: &Repo, step: &str) {
    repo.edit("images/app.toml", "[instance]", &format!("[[provision]]\n{step}\n\n[instance]"));
}

#[test]
fn a_steps_timeout_bounds_everything_it_started() {
    for (name, background) in [("bg", ""), ("bg-redirected", " >/dev/null 2>&1")] {
        let repo = tiny_repo(common::free_port());
        let marker = marker(name);
        with_step(
            &repo,
            &format!("shell = \"sh -c 'sleep 45; : {marker}'{background} & echo spawned\"\ntimeout = \"1s\""),
        );
        let run = repo.run(&["bake"]).expect(1);
        assert!(run.stderr.contains("provision step 4 of recipe `app` failed"), "{}", run.stderr);
        assert!(run.stderr.contains("timed out after 1s"), "{name}: {}", run.stderr);
        assert_eq!(survivors(&marker), Vec::<String>::new(), "{name}: a process of the step outlived it");
        assert_eq!(count_files(&repo.file(".kiln/tmp")), 0, "{name}: the work directory is gone");
    }
}

#[test]
fn ctrl_c_stops_the_step_removes_the_work_directory_and_exits_130() {
    let repo = tiny_repo(common::free_port());
    let marker = marker("sigint");
    let running = repo.file("step-running");
    with_step(&repo, &format!("shell = \"touch {} && sleep 60 && : {marker}\"", running.display()));
    let mut child = repo.kiln().arg("bake").stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    while !running.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("kiln bake ended before its step ran: {status}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(!survivors(&marker).is_empty(), "the step runs");
    // SAFETY: signals the kiln child this test started and has not reaped.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGINT);
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    let message: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(message.len(), 1, "{stderr}");
    assert!(message[0].contains("interrupted during the bake of recipe `app`"), "{stderr}");
    assert_eq!(survivors(&marker), Vec::<String>::new(), "the step's processes are gone");
    assert_eq!(std::fs::read_dir(repo.file(".kiln/tmp")).unwrap().count(), 0, "no work directory is left");
    let images = repo.run(&["images", "--json"]).ok().json();
    let recipes: Vec<&str> =
        images["images"].as_array().unwrap().iter().map(|i| i["recipe"].as_str().unwrap()).collect();
    assert_eq!(recipes, ["base"], "the interrupted image is not recorded");
}

#[test]
fn gc_removes_work_directories_whose_kiln_is_gone() {
    let repo = tiny_repo(common::free_port());
    repo.run(&["bake"]).ok();
    let tmp = repo.file(".kiln/tmp");
    let me = std::process::id() as i32;
    let my_start = kiln::process::start_time(me).unwrap();
    let stale = [format!("bake-{me}-{}-dead01", my_start + 1), "bake-2147483646-1-dead02".into(), "bake-old03".into()];
    let live = format!("bake-{me}-{my_start}-live01");
    for dir in stale.iter().chain([&live]) {
        repo.write(&format!(".kiln/tmp/{dir}/root/etc/leftover"), "left by a killed bake\n");
    }
    // Left read-only, as an unpacked image is.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(tmp.join(&stale[0]).join("root/etc"), std::fs::Permissions::from_mode(0o555)).unwrap();

    let plan = repo.run(&["gc", "--dry-run"]).ok();
    assert!(tmp.join(&stale[0]).exists(), "a dry run deletes nothing: {}", plan.stdout);
    repo.run(&["gc"]).ok();
    let left: Vec<String> =
        std::fs::read_dir(&tmp).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(left, [live], "only the directory of a running kiln stays");
}

#[test]
fn a_command_gates_timeout_bounds_everything_it_started_too() {
    let repo = tiny_repo(common::free_port());
    let marker = marker("gate");
    repo.write(
        "pipelines/scripts/slow-gate.sh",
        &format!("#!/bin/sh\nsh -c 'sleep 45; : {marker}' &\necho checking\n"),
    );
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(repo.file("pipelines/scripts/slow-gate.sh"), std::fs::Permissions::from_mode(0o755))
        .unwrap();
    repo.edit(
        "pipelines/app.toml",
        "[[stage.gate]]\napprovals = 1\n",
        "[[stage.gate]]\ncommand = [\"scripts/slow-gate.sh\"]\ntimeout = \"1s\"\n",
    );
    let digest = repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    let refused = repo.run(&["promote", "--stage", "dev", "--no-deploy", "--digest", &digest]).expect(3);
    assert!(refused.stderr.contains("timed out after 1s"), "{}", refused.stderr);
    assert_eq!(survivors(&marker), Vec::<String>::new(), "a process the gate started outlived it");
}
