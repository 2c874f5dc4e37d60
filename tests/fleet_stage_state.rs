//! What the fleet really runs, told truthfully: gc judges every pipeline that shares the ledger and the store,
//! verify notices a needed image that is gone and an endpoint that is down, a stage port another process holds
//! fails the deployment at once (exit 4, nothing left open), and `kiln down` is recorded as a stop, not drift.

mod common;

use common::{bake_greeting, dev_only, free_port, group_files, pid_alive, promote_only, Down, Repo};

fn events(repo: &Repo) -> Vec<serde_json::Value> {
    repo.run(&["--pipeline", "hello", "log", "--json", "--limit", "100000"]).ok().json()["events"]
        .as_array()
        .unwrap()
        .clone()
}

/// A second pipeline, `slow`, beside the example's `hello`: same image, same ledger and store, one stage.
fn add_slow_pipeline(repo: &Repo) {
    let port = free_port();
    repo.write(
        "pipelines/slow.toml",
        &format!(
            "image = \"hello\"\nledger = \".kiln/ledger\"\n\n[[stage]]\nname = \"dev\"\ncapacity = 1\nkeep-previous = 1\ndeploy = {{ port = {port} }}\n"
        ),
    );
}

/// `bake_greeting` for a repository with two pipelines: the bake runs as `hello`.
fn bake_as_hello(repo: &Repo, greeting: &str) -> String {
    let text = std::fs::read_to_string(repo.file("images/hello.toml")).unwrap();
    let start = text.find("GREETING = \"").unwrap() + "GREETING = \"".len();
    let end = start + text[start..].find('"').unwrap();
    repo.write("images/hello.toml", &format!("{}{greeting}{}", &text[..start], &text[end..]));
    repo.run(&["--pipeline", "hello", "bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string()
}

fn image_state(repo: &Repo, digest: &str) -> serde_json::Value {
    let images = repo.run(&["--pipeline", "hello", "images", "--json"]).ok().json();
    images["images"].as_array().unwrap().iter().find(|i| i["digest"] == digest).cloned().unwrap()
}

#[test]
fn gc_of_one_pipeline_keeps_another_pipelines_live_and_parked_images() {
    let (repo, _ports) = Repo::example_on_free_ports();
    add_slow_pipeline(&repo);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: Some("slow") };
    let one = bake_as_hello(&repo, "one");
    repo.run(&["--pipeline", "slow", "promote", "--stage", "dev", "--digest", &one]).ok();
    let two = bake_as_hello(&repo, "two");
    repo.run(&["--pipeline", "slow", "promote", "--stage", "dev", "--digest", &two]).ok();
    // slow-dev-v001 (running `one`) is parked for rollback; `three` is the newest bake.
    bake_as_hello(&repo, "three");

    let gc = repo.run(&["--pipeline", "hello", "gc", "--json"]).ok().json();
    let deleted: Vec<&str> = gc["deleted"].as_array().unwrap().iter().map(|d| d["digest"].as_str().unwrap()).collect();
    assert!(!deleted.contains(&one.as_str()), "gc deleted slow's rollback target: {gc}");
    assert!(!deleted.contains(&two.as_str()), "gc deleted what slow runs: {gc}");
    repo.run(&["--pipeline", "slow", "verify"]).ok();
    repo.run(&["--pipeline", "slow", "rollback", "--stage", "dev"]).ok();

    // With slow's file gone, the ledger still says what its stages promoted, ran and kept.
    repo.run(&["--pipeline", "slow", "down", "--stage", "dev"]).ok();
    std::fs::remove_file(repo.file("pipelines/slow.toml")).unwrap();
    repo.run(&["--pipeline", "hello", "gc"]).ok();
    for digest in [&one, &two] {
        assert_eq!(image_state(&repo, digest)["deleted"], false, "gc deleted {digest} of a pipeline without a file");
    }
    repo.run(&["--pipeline", "hello", "verify"]).ok();
}

#[test]
fn gc_refuses_when_another_pipeline_file_does_not_load() {
    let (repo, _ports) = Repo::example_on_free_ports();
    repo.write("pipelines/broken.toml", "image = \"hello\"\nbogus = 1\n");
    bake_as_hello(&repo, "one");
    bake_as_hello(&repo, "two");
    let run = repo.run(&["--pipeline", "hello", "gc"]).expect(2);
    assert!(run.stderr.contains("pipeline `broken` does not load"), "{}", run.stderr);
    assert!(events(&repo).iter().all(|e| e["kind"] != "collected"), "gc recorded a deletion anyway");
}

#[test]
fn verify_reports_an_image_gc_deleted_while_a_stage_still_runs_it() {
    let (repo, _ports) = Repo::example_on_free_ports();
    add_slow_pipeline(&repo);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: Some("slow") };
    let one = bake_as_hello(&repo, "one");
    repo.run(&["--pipeline", "slow", "promote", "--stage", "dev", "--digest", &one]).ok();
    bake_as_hello(&repo, "two");
    repo.run(&["--pipeline", "hello", "verify"]).ok();

    // What an older gc did: record the image as collected and delete it from the store.
    let digest: kiln::digest::Digest = serde_json::from_value(serde_json::json!(one)).unwrap();
    let ledger = kiln::ledger::Ledger::open_dir(&repo.file(".kiln/ledger"));
    ledger
        .append::<(), kiln::ledger::LedgerError>("tester", &kiln::clock::Clock::system(), |_| {
            Ok(kiln::ledger::Decision::Append(
                Box::new(kiln::ledger::EventBody::Collected { pipeline: "hello".into(), digests: vec![digest] }),
                (),
            ))
        })
        .unwrap();
    let image_ref = image_state(&repo, &one)["image_ref"].as_str().unwrap().to_string();
    let store = kiln::provider::local::LocalProvider::new(repo.file(".kiln"));
    kiln::provider::ImageProvider::delete_image(&store, &kiln::provider::ImageRef::new(digest, image_ref)).unwrap();
    kiln::provider::ImageProvider::collect_garbage(&store).unwrap();

    for pipeline in ["hello", "slow"] {
        let run = repo.run(&["--pipeline", pipeline, "verify"]).expect(6);
        assert!(run.stderr.contains(&one), "verify does not name the image: {}", run.stderr);
        assert!(
            run.stderr.contains("gc deleted it, but it is still promoted to slow/dev, live in slow/dev"),
            "{}",
            run.stderr
        );
    }
}

#[test]
fn verify_reports_a_killed_stage_proxy_as_drift() {
    let (repo, port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    repo.run(&["verify"]).ok();

    let proxy: serde_json::Value =
        serde_json::from_slice(&std::fs::read(repo.file(".kiln/run/hello/dev/proxy.json")).unwrap()).unwrap();
    let pid = proxy["pid"].as_u64().unwrap();
    common::hello::signal(pid as u32, "KILL");
    while pid_alive(pid) {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let run = repo.run(&["verify"]).expect(6);
    let expected = format!(
        "stage dev: its endpoint http://127.0.0.1:{port} is down while group hello-dev-v001 runs (`kiln deploy --stage dev` restarts it)"
    );
    assert!(run.stderr.contains(&expected), "wanted {expected:?} in:\n{}", run.stderr);
}

#[test]
fn a_stage_port_held_by_another_process_fails_the_deployment_at_once() {
    let (repo, port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    let holder = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();

    let run = repo.run(&["deploy", "--stage", "dev", "--json"]).expect(4);
    let expected = format!("cannot listen on 127.0.0.1:{port}: another process already listens on port {port}");
    assert!(run.stderr.contains(&expected), "wanted {expected:?} in:\n{}", run.stderr);
    assert!(!run.stderr.contains("not implemented") && !run.stderr.contains("AWS"), "{}", run.stderr);
    assert_eq!(run.json()["exit_code"], 4);
    let status = repo.run(&["status", "--json"]).ok().json();
    assert!(status["stages"][0]["deploying"].is_null(), "the deployment stayed open: {status}");
    assert!(status["stages"][0]["live"].is_null(), "{status}");
    let last = &events(&repo)[0];
    assert_eq!(last["kind"], "deploy-failed", "{last}");
    assert!(last["reason"].as_str().unwrap().contains(&format!("port {port}")), "{last}");
    assert!(group_files(&repo).is_empty(), "the new group was left behind: {:?}", group_files(&repo));

    drop(holder);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    repo.run(&["verify"]).ok();
}

#[test]
fn proxy_serve_on_a_held_port_names_the_port_not_a_missing_feature() {
    let repo = Repo::empty();
    let port = free_port();
    let _holder = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
    let routes = repo.file("routes.json");
    let status = repo.file("status.json");
    let port_arg = port.to_string();
    let args = ["proxy-serve", "--port", &port_arg, "--routes", routes.to_str().unwrap(), "--status"];
    let mut all = args.to_vec();
    all.push(status.to_str().unwrap());
    let run = repo.run(&all).expect(1);
    assert!(run.stderr.contains(&format!("another process already listens on port {port}")), "{}", run.stderr);
    assert!(!run.stderr.contains("not implemented") && !run.stderr.contains("AWS"), "{}", run.stderr);
}

#[test]
fn down_is_recorded_as_a_stop_that_verify_and_status_report_and_deploy_clears() {
    let (repo, _port) = dev_only(1);
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    // Nothing runs yet: nothing to stop, nothing recorded.
    let before = events(&repo).len();
    let idle = repo.run(&["down", "--stage", "dev"]).ok();
    assert!(idle.stdout.contains("nothing runs in stage dev; nothing to stop"), "{}", idle.stdout);
    assert_eq!(events(&repo).len(), before, "`down` of an idle stage recorded an event");

    let one = bake_greeting(&repo, "one");
    promote_only(&repo, &one);
    repo.run(&["deploy", "--stage", "dev"]).ok();
    let down = repo.run(&["down", "--stage", "dev", "--json"]).ok().json();
    assert_eq!(down["stopped"], true, "{down}");
    let seq = down["seq"].as_u64().unwrap();
    let last = &events(&repo)[0];
    assert_eq!(
        (last["kind"].as_str(), last["seq"].as_u64(), last["stage"].as_str()),
        (Some("stopped"), Some(seq), Some("dev"))
    );

    let verify = repo.run(&["verify"]).ok();
    let said = format!("stage dev: stopped (kiln down at seq {seq} by tester)");
    assert!(verify.stdout.contains(&said), "wanted {said:?} in:\n{}", verify.stdout);
    assert_eq!(repo.run(&["verify", "--json"]).ok().json()["stopped"][0]["seq"], seq);
    let status = repo.run(&["status", "--json"]).ok().json();
    assert_eq!(status["stages"][0]["stopped"]["seq"], seq, "{status}");
    let warnings = status["stages"][0]["warnings"].to_string();
    assert!(warnings.contains(&format!("stopped (kiln down at seq {seq}")), "{status}");
    assert!(repo.run(&["status"]).ok().stdout.contains(&format!("stopped   kiln down at seq {seq}")));

    // A second `down` finds nothing running and records nothing.
    let count = events(&repo).len();
    let again = repo.run(&["down", "--stage", "dev", "--json"]).ok().json();
    assert_eq!((again["stopped"].as_bool(), again["seq"].is_null()), (Some(false), true), "{again}");
    assert_eq!(events(&repo).len(), count);

    // deploy starts it again; the stop is over.
    repo.run(&["deploy", "--stage", "dev"]).ok();
    let verify = repo.run(&["verify", "--json"]).ok().json();
    assert_eq!(verify["stopped"], serde_json::json!([]), "{verify}");
    let status = repo.run(&["status", "--json"]).ok().json();
    assert!(status["stages"][0]["stopped"].is_null(), "{status}");
}
