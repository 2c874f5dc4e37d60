//! The real binary's main job and global options: `kiln run` end to end, `bake --no-cache`, `-C DIR`,
//! `KILN_PIPELINE` and `--quiet`.

mod common;

use common::{http_get, tiny_repo, Down, Repo};

/// The rows of the summary table (after its `STAGE` header, up to the blank line) whose first column is `first`.
fn rows<'a>(text: &'a str, first: &str) -> Vec<&'a str> {
    text.lines()
        .skip_while(|l| !l.starts_with("STAGE"))
        .skip(1)
        .take_while(|l| !l.is_empty())
        .filter(|l| l.split_whitespace().next() == Some(first))
        .collect()
}

#[test]
fn run_bakes_promotes_and_deploys_dev_then_stops_at_the_soak_of_test() {
    let (repo, ports) = Repo::example_on_free_ports();
    let _down = Down { repo: &repo, stages: vec!["dev", "test", "prod"], pipeline: None };

    let run = repo.run(&["run", "--json"]).ok().json();
    let digest = run["digest"].as_str().unwrap().to_string();
    assert_eq!(run["cached"], false, "the first run bakes: {run}");
    assert_eq!(run["stopped_at"]["stage"], "test", "{run}");
    let gates = run["stopped_at"]["gates"].as_array().unwrap();
    let soak = gates.iter().find(|g| g["gate"] == "soak 10m").unwrap_or_else(|| panic!("no soak verdict: {run}"));
    assert_eq!(soak["passed"], false);
    assert!(gates.iter().all(|g| g["passed"] == true || g["gate"] == "soak 10m"), "only the soak stops it: {run}");
    let stages = run["stages"].as_array().unwrap();
    let named: Vec<&str> = stages.iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(named, ["dev", "test", "prod"]);
    assert_eq!(stages[0]["live"]["digest"], digest.as_str(), "dev runs the baked image: {run}");
    assert!(stages[1]["live"].is_null() && stages[2]["live"].is_null(), "test and prod were not deployed: {run}");

    let (code, body) = http_get(ports[0], "/").expect("dev serves");
    assert_eq!((code, body.starts_with("hello from kiln")), (200, true), "{body}");
    assert!(http_get(ports[1], "/").is_none(), "test has no endpoint");

    // The ledger agrees: two images baked, dev promoted and deployed, only the refusal recorded for test.
    let log = repo.run(&["log", "--json", "--limit", "100"]).ok().json();
    let events = log["events"].as_array().unwrap();
    let count = |kind: &str| events.iter().filter(|e| e["kind"] == kind).count();
    assert_eq!((count("baked"), count("promoted"), count("deploy-finished")), (2, 1, 1), "{log}");
    assert_eq!(count("refused"), 1, "{log}");
    let off_dev = |e: &&serde_json::Value| !e["stage"].is_null() && e["stage"] != "dev";
    assert!(events.iter().filter(off_dev).all(|e| e["kind"] == "refused" && e["stage"] == "test"), "{log}");

    // Run again: the image is reused, dev is already up to date, and the summary says where it stopped and why.
    let again = repo.run(&["run"]).ok();
    assert!(again.stdout.starts_with(&format!("cached {digest}")), "{}", again.stdout);
    let dev = rows(&again.stdout, "dev");
    assert!(dev.len() == 1 && dev[0].ends_with("up to date"), "{}", again.stdout);
    assert!(dev[0].contains(&format!("http://127.0.0.1:{}", ports[0])), "{}", again.stdout);
    let test = rows(&again.stdout, "test");
    assert!(test.len() == 1 && test[0].ends_with("stopped by a gate"), "{}", again.stdout);
    assert!(again.stdout.contains("test is waiting on:"), "{}", again.stdout);
    assert!(again.stdout.contains("soak 10m"), "{}", again.stdout);
    let log = repo.run(&["log", "--json", "--limit", "100"]).ok().json();
    let new = &log["events"].as_array().unwrap()[..log["events"].as_array().unwrap().len() - events.len()];
    let kinds: Vec<&str> = new.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    assert!(kinds.is_empty(), "a run with nothing to do, waiting on the same gate, records nothing: {log}");
}

/// A `tiny_repo` whose provisioning appends a line per run to `$HOME/provision-runs` (HOME is the repository).
fn counting_repo() -> Repo {
    let repo = tiny_repo(common::free_port());
    for recipe in ["base", "app"] {
        let path = format!("images/{recipe}.toml");
        let text = std::fs::read_to_string(repo.file(&path)).unwrap();
        let step = format!("[[provision]]\nshell = \"echo {recipe} >> $HOME/provision-runs\"\n\n");
        // Steps go before `[instance]`, which must come after them in the TOML.
        let text = match text.find("[instance]") {
            Some(at) => format!("{}{step}{}", &text[..at], &text[at..]),
            None => format!("{text}\n{step}"),
        };
        repo.write(&path, &text);
    }
    repo
}

fn provision_runs(repo: &Repo) -> Vec<String> {
    std::fs::read_to_string(repo.file("provision-runs")).unwrap_or_default().lines().map(str::to_string).collect()
}

#[test]
fn bake_no_cache_rebuilds_every_image_to_the_same_digest() {
    let repo = counting_repo();
    let first = repo.run(&["bake", "--json"]).ok().json();
    assert_eq!(provision_runs(&repo), ["base", "app"]);
    let cached = repo.run(&["bake", "--json"]).ok().json();
    assert_eq!(cached["cached"], true);
    assert_eq!(provision_runs(&repo), ["base", "app"], "a cache hit provisions nothing");

    let rebuilt = repo.run(&["bake", "--no-cache", "--json"]).ok().json();
    assert_eq!(provision_runs(&repo), ["base", "app", "base", "app"], "--no-cache ran every step again");
    assert_eq!(rebuilt["cached"], false, "{rebuilt}");
    let chain = rebuilt["chain"].as_array().unwrap();
    assert_eq!(chain.len(), 2);
    for (now, before) in chain.iter().zip(first["chain"].as_array().unwrap()) {
        assert_eq!(now["cached"], false, "{rebuilt}");
        assert_eq!(now["digest"], before["digest"], "a rebuild of the same recipe gives the same digest");
        assert_eq!(now["recipe_key"], before["recipe_key"]);
    }

    let text = repo.run(&["bake", "--no-cache"]).ok().stdout;
    assert_eq!(provision_runs(&repo).len(), 6);
    let how: Vec<&str> = text.lines().map(|l| l.split_whitespace().next().unwrap_or("")).collect();
    assert_eq!(how, ["baked", "baked"], "{text}");
    assert!(text.contains(first["digest"].as_str().unwrap()), "{text}");
}

#[test]
fn dash_c_runs_as_if_started_in_the_directory() {
    let outer = tempfile::tempdir().unwrap();
    let repo = tiny_repo(common::free_port());
    let name = repo.path().file_name().unwrap().to_str().unwrap().to_string();
    let from = |cwd: &std::path::Path, args: &[&str]| {
        common::Run::of(repo.kiln().current_dir(cwd).args(args).output().unwrap(), args)
    };

    // Elsewhere, without -C, there is no pipeline to work on.
    let lost = from(outer.path(), &["bake", "--json"]).expect(2);
    assert!(lost.stderr.contains("no pipeline found"), "{}", lost.stderr);

    let parent = repo.path().parent().unwrap();
    let baked = from(outer.path(), &["-C", repo.path().to_str().unwrap(), "bake", "--json"]).ok().json();
    let relative = from(parent, &["-C", &name, "bake", "--json"]).ok().json();
    assert_eq!(relative["digest"], baked["digest"]);
    assert_eq!(relative["cached"], true, "both found the same repository and ledger");
    let long = from(outer.path(), &["--dir", repo.path().to_str().unwrap(), "images", "--json"]).ok().json();
    assert_eq!(long["images"].as_array().unwrap().len(), 2);
    assert!(repo.file(".kiln/ledger").is_dir(), "the state lives in the repository");
    assert!(!outer.path().join(".kiln").exists(), "nothing was written where kiln was started");
}

#[test]
fn kiln_pipeline_chooses_the_pipeline_and_pipeline_overrides_it() {
    let repo = tiny_repo(common::free_port());
    let other = std::fs::read_to_string(repo.file("pipelines/app.toml")).unwrap().replace("\"dev\"", "\"qa\"");
    repo.write("pipelines/other.toml", &other);
    let stage_names = |status: &serde_json::Value| -> Vec<String> {
        status["stages"].as_array().unwrap().iter().map(|s| s["stage"].as_str().unwrap().to_string()).collect()
    };

    let ambiguous = repo.run(&["status", "--json"]).expect(2);
    assert!(ambiguous.stderr.contains("app") && ambiguous.stderr.contains("other"), "{}", ambiguous.stderr);

    let run = |env: Option<&str>, args: &[&str]| {
        let mut cmd = repo.kiln();
        if let Some(pipeline) = env {
            cmd.env("KILN_PIPELINE", pipeline);
        }
        common::Run::of(cmd.args(args).output().unwrap(), args)
    };
    let chosen = run(Some("other"), &["status", "--json"]).ok().json();
    assert_eq!(chosen["pipeline"], "other", "{chosen}");
    assert_eq!(stage_names(&chosen), ["qa"]);
    let overridden = run(Some("other"), &["status", "--pipeline", "app", "--json"]).ok().json();
    assert_eq!(overridden["pipeline"], "app", "{overridden}");
    assert_eq!(stage_names(&overridden), ["dev"]);
    let missing = run(Some("nope"), &["status"]).expect(2);
    assert!(missing.stderr.contains("nope"), "{}", missing.stderr);
}

#[test]
fn quiet_prints_nothing_on_stderr_when_all_goes_well() {
    // Without --quiet a bake logs its steps and echoes its provisioning output, so the check below can fail.
    let loud = tiny_repo(common::free_port());
    let run = loud.run(&["bake"]).ok();
    assert!(run.stderr.contains("setting up in"), "{}", run.stderr);

    let repo = tiny_repo(common::free_port());
    let baked = repo.run(&["--quiet", "bake"]).ok();
    assert_eq!(baked.stderr, "", "--quiet bake wrote to stderr");
    let digest = baked.stdout.lines().last().unwrap().split_whitespace().nth(2).unwrap().to_string();
    assert!(digest.starts_with("sha256:"), "the result still goes to stdout: {}", baked.stdout);
    for args in [
        vec!["-q", "approve", "--stage", "dev", "--digest", &digest],
        vec!["-q", "promote", "--stage", "dev", "--no-deploy"],
        vec!["-q", "status"],
        vec!["-q", "verify"],
        vec!["-q", "bake", "--no-cache"],
    ] {
        let run = repo.run(&args).ok();
        assert_eq!(run.stderr, "", "`kiln {}` wrote to stderr", args.join(" "));
    }
    // Errors still reach stderr.
    let refused = repo.run(&["-q", "promote", "--stage", "nope"]).expect(2);
    assert!(refused.stderr.contains("no stage `nope`"), "{}", refused.stderr);
}
