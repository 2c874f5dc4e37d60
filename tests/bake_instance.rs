//! Where a local instance's program is found: a path inside the image root, a bare name on the host's PATH
//! (docs/config.md, `instance.command`).

mod common;

use common::{tiny_repo, Down};

#[test]
fn a_bare_program_name_is_looked_up_on_the_hosts_path_not_in_the_image() {
    let repo = tiny_repo(common::free_port());
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let program = format!("kiln-only-in-image-{}", std::process::id());
    let ran = repo.file("program-ran");
    repo.edit(
        "images/app.toml",
        "[instance]\ncommand = [\"sleep\", \"1000\"]",
        &format!(
            "[[provision]]\nshell = \"mkdir -p $KILN_ROOT/usr/bin && printf '#!/bin/sh\\\\ntouch {ran}\\\\nexec sleep 1000\\\\n' > $KILN_ROOT/usr/bin/{program} && chmod 755 $KILN_ROOT/usr/bin/{program}\"\n\n[instance]\ncommand = [\"{program}\"]",
            ran = ran.display()
        ),
    );
    let digest = repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    repo.run(&["approve", "--stage", "dev", "--digest", &digest]).ok();
    let deploy = repo.run(&["promote", "--stage", "dev", "--digest", &digest]);
    assert_ne!(deploy.code, 0, "{}", deploy.stderr);
    assert!(deploy.stderr.contains(&format!("`{program}` is not on the host's PATH")), "{}", deploy.stderr);
    assert!(deploy.stderr.contains(&format!("the image has `/usr/bin/{program}`: use that path")), "{}", deploy.stderr);
    assert!(!ran.exists(), "the image's program did not run");

    // Named by its path, the same program is found inside the image root.
    repo.edit("images/app.toml", &format!("command = [\"{program}\"]"), &format!("command = [\"/usr/bin/{program}\"]"));
    let digest = repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    repo.run(&["approve", "--stage", "dev", "--digest", &digest]).ok();
    let deploy = repo.run(&["promote", "--stage", "dev", "--digest", &digest]);
    assert!(!deploy.stderr.contains("not on the host's PATH"), "{}", deploy.stderr);
    assert!(ran.exists(), "the program inside the image ran: {}", deploy.stderr);
}
