//! `kiln diff A B` on the local example: recipe inputs and steps from git, parent and commit range, the root
//! filesystems' files, stages as arguments, and the arguments it refuses.

mod common;
mod moto;

use common::{git, Down, Repo};
use serde_json::{json, Value};

fn bake(repo: &Repo, args: &[&str]) -> Value {
    let mut all = vec!["bake", "--json"];
    all.extend_from_slice(args);
    repo.run(&all).ok().json()
}

fn commit(repo: &Repo, message: &str) -> String {
    git(repo.path(), &["add", "-A"]);
    git(repo.path(), &["commit", "-q", "-m", message]);
    let head = std::process::Command::new("git").args(["rev-parse", "HEAD"]).current_dir(repo.path()).output().unwrap();
    String::from_utf8(head.stdout).unwrap().trim().to_string()
}

fn chmod(repo: &Repo, rel: &str, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(repo.file(rel), std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The (path, change) pairs of a diff section's `files`.
fn changes(section: &Value) -> Vec<(String, String)> {
    section["files"]
        .as_array()
        .unwrap_or_else(|| panic!("no files in {section}"))
        .iter()
        .map(|f| (f["path"].as_str().unwrap().to_string(), f["change"].as_str().unwrap().to_string()))
        .collect()
}

fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
    list.iter().map(|(p, c)| (p.to_string(), c.to_string())).collect()
}

fn entry<'a>(section: &'a Value, path: &str) -> &'a Value {
    section["files"].as_array().unwrap().iter().find(|f| f["path"] == path).unwrap_or_else(|| panic!("{path}"))
}

/// The example in a git work tree, with one more file below hello's `copy` directory so a later commit can remove
/// it.
fn example_in_git() -> Repo {
    let repo = Repo::example();
    repo.write(".gitignore", ".kiln/\n");
    repo.write("images/files/hello/NOTES.txt", "old notes\n");
    git(repo.path(), &["init", "-q", "-b", "main"]);
    repo
}

#[test]
fn two_bakes_differ_by_files_steps_parent_commits_and_root_filesystem() {
    let repo = example_in_git();
    let first_commit = commit(&repo, "first");
    let first = bake(&repo, &[]);

    // hello's inputs: one file changed, one added, one removed; its build step's timeout changes and a step that
    // plants a symlink is added. base's motd only becomes executable: a new base, so a new parent for hello, and
    // a mode-only difference in the root filesystem.
    let main_rs = std::fs::read_to_string(repo.file("images/files/hello/main.rs")).unwrap();
    repo.write("images/files/hello/main.rs", &format!("{main_rs}// reviewed\n"));
    repo.write("images/files/hello/README.txt", "hello's source\n");
    std::fs::remove_file(repo.file("images/files/hello/NOTES.txt")).unwrap();
    chmod(&repo, "images/files/base/etc/motd", 0o755);
    repo.edit(
        "images/hello.toml",
        "timeout = \"5m\"\n",
        "timeout = \"6m\"\n\n[[provision]]\nshell = \"mkdir -p $KILN_ROOT/usr/local/bin && ln -s /opt/hello/bin/hello $KILN_ROOT/usr/local/bin/hello\"\n",
    );
    let second_commit = commit(&repo, "second: review hello");
    let second = bake(&repo, &[]);
    let (a, b) = (second["digest"].as_str().unwrap(), first["digest"].as_str().unwrap());

    let doc = repo.run(&["diff", a, b, "--json"]).ok().json();
    assert_eq!(doc["same"], false);
    assert_eq!((doc["to"]["digest"].as_str(), doc["from"]["digest"].as_str()), (Some(a), Some(b)));

    // Recipe inputs, by repository path, from git at each image's commit.
    assert_eq!(doc["inputs"]["compared"], true, "{doc}");
    assert_eq!(
        changes(&doc["inputs"]),
        pairs(&[
            ("images/files/hello/NOTES.txt", "removed"),
            ("images/files/hello/README.txt", "added"),
            ("images/files/hello/main.rs", "changed"),
        ])
    );
    assert_eq!(
        doc["inputs"]["steps"],
        json!([
            {
                "change": "changed",
                "from_index": 1, "from": "run images/scripts/build-hello.sh (timeout 5m)",
                "to_index": 1, "to": "run images/scripts/build-hello.sh (timeout 6m)",
            },
            {
                "change": "added",
                "from_index": null, "from": null,
                "to_index": 2,
                "to": "shell `mkdir -p $KILN_ROOT/usr/local/bin && ln -s /opt/hello/bin/hello $KILN_ROOT/usr/local/bin/hello` (timeout 10m)",
            },
        ])
    );

    // Parent and base: the rebuilt base is both.
    assert_eq!(doc["parent"]["changed"], true);
    assert_eq!(doc["parent"]["from"], json!({ "digest": first["parent"], "recipe": "base" }));
    assert_eq!(doc["parent"]["to"], json!({ "digest": second["parent"], "recipe": "base" }));
    assert_eq!(doc["base"]["to"]["digest"], second["parent"]);

    // The commit range, as git log first..second.
    assert_eq!(doc["commits"]["from"], first_commit.as_str());
    assert_eq!(doc["commits"]["to"], second_commit.as_str());
    assert_eq!(doc["commits"]["added"], json!([{ "id": second_commit, "summary": "second: review hello" }]));
    assert_eq!(doc["commits"]["dropped_count"], 0);

    // The root filesystems, across base's layer and hello's.
    let root_fs = &doc["root_fs"];
    assert_eq!(root_fs["compared"], true, "{doc}");
    assert_eq!(
        changes(root_fs),
        pairs(&[
            ("/etc/motd", "changed"),
            ("/opt/hello/src/NOTES.txt", "removed"),
            ("/opt/hello/src/README.txt", "added"),
            ("/opt/hello/src/main.rs", "changed"),
            ("/usr", "added"),
            ("/usr/local", "added"),
            ("/usr/local/bin", "added"),
            ("/usr/local/bin/hello", "added"),
        ])
    );
    let motd = entry(root_fs, "/etc/motd");
    assert_eq!((&motd["from"]["mode"], &motd["to"]["mode"]), (&json!("0644"), &json!("0755")));
    assert_eq!(motd["from"]["sha256"], motd["to"]["sha256"], "a mode-only change: same content");
    assert_eq!(
        entry(root_fs, "/usr/local/bin/hello")["to"],
        json!({ "kind": "symlink", "target": "/opt/hello/bin/hello" })
    );

    let text = repo.run(&["diff", a, b]).ok().stdout;
    for line in [
        "replacing B with A:",
        "  - images/files/hello/NOTES.txt",
        "  + images/files/hello/README.txt",
        "  ~ step 2: run images/scripts/build-hello.sh (timeout 5m)\n      → step 2: run images/scripts/build-hello.sh (timeout 6m)",
        &format!("  + {} second: review hello", &second_commit[..12]),
        "  ~ /etc/motd  mode 0644 → 0755",
        "  + /usr/local/bin/hello  symlink → /opt/hello/bin/hello",
        "  - /opt/hello/src/NOTES.txt  file 0644, 10 bytes",
    ] {
        assert!(text.contains(line), "wanted {line:?} in:\n{text}");
    }

    // The other way round, every sign flips: B's files are what A lacks.
    let back = repo.run(&["diff", b, a, "--json"]).ok().json();
    assert_eq!(entry(&back["inputs"], "images/files/hello/NOTES.txt")["change"], "added");
    assert_eq!(entry(&back["root_fs"], "/usr/local/bin/hello")["change"], "removed");
    assert_eq!(back["commits"]["added_count"], 0);
    assert_eq!(back["commits"]["dropped"], json!([{ "id": second_commit, "summary": "second: review hello" }]));

    // A dirty bake: its commit does not hold what was baked, and the diff says so rather than report no change.
    repo.write("images/files/hello/main.rs", &format!("{main_rs}// uncommitted\n"));
    let dirty = bake(&repo, &["--allow-dirty"]);
    let doc = repo.run(&["diff", dirty["digest"].as_str().unwrap(), a, "--json"]).ok().json();
    assert!(doc["inputs"]["notes"].to_string().contains("was baked from a dirty work tree"), "{}", doc["inputs"]);
    assert_eq!(changes(&doc["root_fs"]), pairs(&[("/opt/hello/src/main.rs", "changed")]));
}

/// The example pipeline with every stage on a free port, capacity 1, and no gates but the implicit ones.
fn three_stages() -> (Repo, Vec<u16>) {
    let (repo, ports) = Repo::example_on_free_ports();
    let mut text = String::from("image = \"hello\"\nprovider = \"local\"\nledger = \".kiln/ledger\"\n");
    for (stage, port) in ["dev", "test", "prod"].iter().zip(&ports) {
        text.push_str(&format!("\n[[stage]]\nname = \"{stage}\"\ncapacity = 1\ndeploy = {{ port = {port} }}\n"));
    }
    repo.write("pipelines/hello.toml", &text);
    (repo, ports)
}

#[test]
fn diff_test_prod_is_what_promoting_test_to_prod_would_change() {
    let (repo, _ports) = three_stages();
    let _down = Down { repo: &repo, stages: vec!["dev", "test", "prod"], pipeline: None };
    let old = common::bake_greeting(&repo, "hello");
    for stage in ["dev", "test", "prod"] {
        repo.run(&["promote", "--stage", stage]).ok();
    }
    let same = repo.run(&["diff", "test", "prod"]).ok().stdout;
    assert!(same.contains("no difference: A and B are the same image"), "{same}");
    assert_eq!(repo.run(&["diff", "test", "prod", "--json"]).ok().json()["same"], true);

    let new = common::bake_greeting(&repo, "bonjour");
    for stage in ["dev", "test"] {
        repo.run(&["promote", "--stage", stage]).ok();
    }
    let doc = repo.run(&["diff", "test", "prod", "--json"]).ok().json();
    assert_eq!(doc["to"]["stage"], "test");
    assert_eq!(doc["to"]["digest"], new.as_str());
    assert_eq!(doc["from"]["stage"], "prod");
    assert_eq!(doc["from"]["digest"], old.as_str());
    assert_eq!(doc["instance"], json!(["env GREETING: \"hello\" → \"bonjour\""]));
    // Only the [instance] section changed: the same files, and the same parent.
    assert_eq!(doc["root_fs"], json!({ "compared": true, "files": [], "notes": [] }));
    assert_eq!(doc["parent"]["changed"], false);
    // No git work tree here: the inputs cannot be read at any commit, and the diff says so instead of failing.
    assert_eq!(doc["inputs"]["compared"], false);
    assert!(doc["inputs"]["notes"].to_string().contains("inputs not recorded"), "{}", doc["inputs"]);
    assert!(doc["commits"]["notes"].to_string().contains("no commit is recorded"), "{}", doc["commits"]);

    let text = repo.run(&["diff", "test", "prod"]).ok().stdout;
    assert!(text.contains(&format!("A {new} (stage test)")), "{text}");
    assert!(text.contains(&format!("B {old} (stage prod)")), "{text}");
    assert!(text.contains("  ~ env GREETING: \"hello\" → \"bonjour\""), "{text}");
    assert!(text.contains("root filesystem\n  no file differs"), "{text}");
    // A stage and a digest mix.
    let mixed = repo.run(&["diff", &new[7..19], "prod", "--json"]).ok().json();
    assert_eq!(mixed["instance"], doc["instance"]);
}

/// Two `baked` events whose digests share their first 12 hex characters, written straight into the ledger.
fn ambiguous_images(repo: &Repo) {
    use kiln::ledger::{Decision, EventBody, Ledger, LedgerError};
    let ledger = Ledger::open_dir(&repo.file(".kiln/ledger"));
    for last in ['1', '2'] {
        let digest = kiln::digest::Digest::parse(&format!("sha256:abcdef012345{}{last}", "0".repeat(51))).unwrap();
        let body = EventBody::Baked {
            pipeline: "hello".into(),
            recipe: "hello".into(),
            digest,
            recipe_key: digest,
            parent: None,
            provider: "local".into(),
            image_ref: format!("hello:{last}"),
            commit: None,
            dirty: false,
            copies: Vec::new(),
            instance: None,
        };
        ledger
            .append::<(), LedgerError>("tester", &kiln::clock::Clock::system(), |_| {
                Ok(Decision::Append(Box::new(body.clone()), ()))
            })
            .unwrap();
    }
}

#[test]
fn bad_arguments_are_refused_a_collected_image_still_diffs_and_a_damaged_layer_fails() {
    let repo = example_in_git();
    commit(&repo, "first");
    let first = bake(&repo, &[]);
    let old = first["digest"].as_str().unwrap().to_string();
    repo.write("images/files/hello/README.txt", "hello's source\n");
    commit(&repo, "second");
    let new = bake(&repo, &[])["digest"].as_str().unwrap().to_string();

    let table: [(&[&str], &str, i32); 5] = [
        (
            &["diff", "staging", &new],
            "`staging` is neither a stage of pipeline hello (its stages: dev, test, prod) nor a digest",
            2,
        ),
        (&["diff", &new, "prod"], "nothing has been promoted to prod yet", 2),
        (&["diff", &new, "000000000000"], "no image matches digest `000000000000`", 2),
        (&["diff", "abc123", &new], "`abc123` is not a digest: too short", 2),
        (&["diff", &new], "the following required arguments were not provided", 2),
    ];
    for (args, message, code) in table {
        let run = repo.run(args).expect(code);
        assert!(run.stderr.contains(message), "kiln {args:?}: wanted {message:?} in:\n{}", run.stderr);
        assert!(run.stdout.is_empty(), "kiln {args:?} printed {}", run.stdout);
    }

    // The same image twice is no error: nothing differs.
    let same = repo.run(&["diff", &new, &new[7..19]]).ok();
    assert!(same.stdout.contains("no difference"), "{}", same.stdout);

    // gc deletes the first bake (no stage holds it): its files are gone, its record and recipe are not.
    repo.run(&["gc"]).ok();
    let doc = repo.run(&["diff", &new, &old, "--json"]).ok().json();
    assert_eq!(doc["from"]["collected"], true);
    assert_eq!(doc["root_fs"]["compared"], false);
    assert!(doc["root_fs"]["notes"].to_string().contains("was collected by `kiln gc`: its files are gone"), "{doc}");
    assert_eq!(changes(&doc["inputs"]), pairs(&[("images/files/hello/README.txt", "added")]));
    assert_eq!(doc["commits"]["added_count"], 1);

    ambiguous_images(&repo);
    let run = repo.run(&["diff", "abcdef012345", &new]).expect(2);
    assert!(run.stderr.contains("digest prefix `abcdef012345` is ambiguous"), "{}", run.stderr);

    // A damaged layer is an error naming it, never a difference.
    repo.write("images/files/hello/README.txt", "hello's source, again\n");
    commit(&repo, "third");
    let third = bake(&repo, &[])["digest"].as_str().unwrap().to_string();
    let blob = |digest: &str| repo.file(&format!(".kiln/oci/blobs/sha256/{}", &digest["sha256:".len()..]));
    let manifest: Value = serde_json::from_slice(&std::fs::read(blob(&third)).unwrap()).unwrap();
    let layer = manifest["layers"][1]["digest"].as_str().unwrap().to_string();
    chmod(&repo, &format!(".kiln/oci/blobs/sha256/{}", &layer["sha256:".len()..]), 0o644);
    let mut bytes = std::fs::read(blob(&layer)).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(blob(&layer), bytes).unwrap();
    let run = repo.run(&["diff", &third, &new]).expect(1);
    assert!(
        run.stderr.contains(&format!("layer 2 of 2 {layer} is damaged: its bytes no longer match its digest")),
        "{}",
        run.stderr
    );
}

/// On AWS the recipe, parent and commit sections diff as anywhere, and the root filesystems are a note, not an
/// error: an AMI's snapshots cannot be read as files.
#[test]
fn on_aws_the_root_filesystem_is_a_note_not_an_error() {
    use moto::app::{aws_repo, bake, run};
    let moto = moto::Moto::start();
    let repo = aws_repo(&moto);
    let first = bake(&moto, &repo, &[])["digest"].as_str().unwrap().to_string();
    repo.write("images/files/app/config.txt", "mode=careful\n");
    let second = bake(&moto, &repo, &[])["digest"].as_str().unwrap().to_string();
    let doc = run(&moto, &repo, &["diff", &second, &first, "--json"]).ok().json();
    assert_eq!(doc["from"]["provider"], "aws");
    assert_eq!(
        doc["root_fs"],
        json!({
            "compared": false,
            "files": [],
            "notes": ["not available on AWS: snapshots are not readable (docs/aws.md, \"The image digest\")"],
        })
    );
    assert_eq!(doc["parent"]["changed"], false);
    let text = run(&moto, &repo, &["diff", &second, &first]).ok().stdout;
    assert!(text.contains("root filesystem\n  ! not available on AWS: snapshots are not readable"), "{text}");
}
