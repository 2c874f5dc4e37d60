//! A pipeline promotes and approves only images of its own recipe (`image = …`): a parent layer or another
//! pipeline's image is refused with exit 2, naming the pipeline's `image`, and nothing is recorded.

mod common;

use common::{free_port, tiny_repo, Repo};

/// The tiny repository plus a second pipeline, `other`, baking its own recipe into the same ledger. Returns the
/// digests of app's image, its base layer, and other's image.
fn two_pipelines() -> (Repo, String, String, String) {
    let repo = tiny_repo(free_port());
    repo.write("images/other.toml", "[[provision]]\ncopy = \"files/other.txt\"\nto = \"/other.txt\"\n");
    repo.write("images/files/other.txt", "other\n");
    repo.write(
        "pipelines/other.toml",
        &format!("image = \"other\"\n\n[[stage]]\nname = \"dev\"\ndeploy = {{ port = {} }}\n", free_port()),
    );
    let app = repo.run(&["--pipeline", "app", "bake", "--json"]).ok().json();
    let base = app["chain"].as_array().unwrap().iter().find(|i| i["recipe"] == "base").unwrap()["digest"].clone();
    let other = repo.run(&["--pipeline", "other", "bake", "--json"]).ok().json()["digest"].clone();
    let digest = |v: &serde_json::Value| v.as_str().unwrap().to_string();
    (repo, digest(&app["digest"]), digest(&base), digest(&other))
}

fn events(repo: &Repo) -> usize {
    repo.run(&["--pipeline", "app", "log", "--json", "--limit", "1000"]).ok().json()["events"].as_array().unwrap().len()
}

#[test]
fn a_base_or_foreign_image_is_refused_by_promote_and_approve() {
    let (repo, _app, base, other) = two_pipelines();
    let before = events(&repo);
    for (what, digest, recipe) in [("base layer", &base, "base"), ("other pipeline's image", &other, "other")] {
        let short = &digest["sha256:".len().."sha256:".len() + 12];
        let wanted = format!(
            "{short} is an image of recipe `{recipe}`, but pipeline `app` promotes only images of its `image = \"app\"`"
        );
        for args in [
            vec!["--pipeline", "app", "approve", "--stage", "dev", "--digest", digest.as_str()],
            vec!["--pipeline", "app", "promote", "--stage", "dev", "--digest", digest.as_str(), "--no-deploy"],
            vec!["--pipeline", "app", "promote", "--stage", "dev", "--digest", digest.as_str(), "--plan"],
        ] {
            let run = repo.run(&args).expect(2);
            assert!(run.stderr.contains(&wanted), "{what}: `kiln {}`:\n{}", args.join(" "), run.stderr);
        }
    }
    assert_eq!(events(&repo), before, "a refused image recorded nothing");
}

#[test]
fn the_pipelines_own_image_is_still_approved_and_promoted() {
    let (repo, app, _base, _other) = two_pipelines();
    repo.run(&["--pipeline", "app", "approve", "--stage", "dev", "--digest", &app]).ok();
    let promoted =
        repo.run(&["--pipeline", "app", "promote", "--stage", "dev", "--digest", &app, "--no-deploy", "--json"]).ok();
    assert_eq!(promoted.json()["outcome"], "promoted");
}
