//! The provider boundary seen from the binary: the factory picks the provider from the pipeline, and what a deploy
//! needs to know of an image (its `[instance]` section) is recorded in the ledger's `baked` event rather than left
//! to a label the provider must store.

mod common;

use common::tiny_repo;

/// The `baked` events, by recipe.
fn baked_events(repo: &common::Repo) -> std::collections::BTreeMap<String, serde_json::Value> {
    let log = repo.run(&["log", "--json", "--limit", "1000"]).ok().json();
    log["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "baked")
        .map(|e| (e["recipe"].as_str().unwrap().to_string(), e.clone()))
        .collect()
}

#[test]
fn a_baked_event_records_the_instance_section_its_instances_start_with() {
    let repo = tiny_repo(common::free_port());
    // A recipe without [instance] starts its instances the way its nearest ancestor's do.
    repo.write("images/worker.toml", "parent = \"app\"\n\n[[provision]]\nshell = \"mkdir -p $KILN_ROOT/srv\"\n");
    repo.edit("pipelines/app.toml", "image = \"app\"", "image = \"worker\"");
    repo.run(&["bake"]).ok();
    let baked = baked_events(&repo);
    assert!(baked["base"].get("instance").is_none(), "base has nothing to start: {}", baked["base"]);
    let app = &baked["app"]["instance"];
    assert_eq!(app["command"], serde_json::json!(["sleep", "1000"]), "{}", baked["app"]);
    assert_eq!(app["health"], "tcp", "{}", baked["app"]);
    assert_eq!(baked["worker"]["instance"], *app, "inherited from app");
    // The local provider has one store: no per-region copies are recorded.
    assert!(baked.values().all(|e| e.get("copies").is_none()), "{baked:?}");
}

#[test]
fn the_factory_gives_an_aws_pipeline_the_aws_provider_and_leaves_the_local_one_alone() {
    let repo = tiny_repo(common::free_port());
    repo.write(
        "images/base.toml",
        "[[provision]]\ncopy = \"files/base\"\nto = \"/etc/base\"\n[aws]\nbase-ami = \"ami-0123abcd\"\n",
    );
    repo.write(
        "pipelines/cloud.toml",
        "image = \"app\"\nprovider = \"aws\"\n\n[aws]\nregion = \"eu-west-1\"\nartifact-bucket = \"acme-kiln-artifacts\"\n\n[[stage]]\nname = \"dev\"\n\
         deploy = { subnets = [\"subnet-1\"] }\n",
    );
    // The AWS provider, reaching for an endpoint where nothing listens: its error, not the local provider's.
    let closed = format!("http://127.0.0.1:{}", common::free_port());
    let out = repo
        .kiln()
        .args(["--pipeline", "cloud", "bake"])
        .env("AWS_ENDPOINT_URL", &closed)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .output()
        .unwrap();
    let refused = common::Run::of(out, &["--pipeline", "cloud", "bake"]).expect(1);
    assert!(refused.stderr.contains("cannot reach AWS for ec2:DescribeImages in eu-west-1"), "{}", refused.stderr);
    // The local pipeline beside it is unaffected.
    repo.run(&["--pipeline", "app", "bake"]).ok();
}

/// `has_image` and `build_settings` can fail (on AWS they are API calls): a failure stops the command with the
/// provider's error, rather than passing for "not there" and rebuilding or deleting on a guess.
#[test]
fn a_provider_that_cannot_answer_stops_bake_and_gc_with_its_error() {
    let repo = tiny_repo(common::free_port());
    repo.run(&["bake"]).ok();
    // A second bake of app leaves the first one for gc to delete, so gc asks whether the provider holds it.
    repo.edit("images/files/app/config.txt", "mode=fast", "mode=slow");
    repo.run(&["bake"]).ok();
    let events = || repo.run(&["log", "--json", "--limit", "1000"]).ok().json()["events"].as_array().unwrap().len();
    let before = events();
    for (spec, args) in [
        ("build_settings=fail:the base image lookup timed out", &["bake"][..]),
        ("has_image=fail:the image lookup timed out", &["bake"][..]),
        ("has_image=fail:the image lookup timed out", &["gc"][..]),
    ] {
        let output = repo.kiln().env("KILN_INJECT", spec).args(args).output().unwrap();
        let failed = common::Run::of(output, args).expect(1);
        let reason = spec.split_once(":").unwrap().1;
        assert!(failed.stderr.contains(reason), "{spec}: {}", failed.stderr);
        assert_eq!(events(), before, "{spec}: nothing recorded");
    }
}
