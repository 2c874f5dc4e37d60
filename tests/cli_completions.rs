//! `kiln completions` and `kiln man`: generated from the command-line definitions, they name every user-facing
//! subcommand and never an internal one, and work outside any kiln repository.

mod common;

use common::Repo;

const SHELLS: &[&str] = &["bash", "zsh", "fish", "elvish", "powershell"];

#[test]
fn every_shell_gets_a_script_naming_the_subcommands_but_not_internal_ones() {
    let repo = Repo::empty();
    for shell in SHELLS {
        let script = repo.run(&["completions", shell]).ok().stdout;
        for subcommand in ["promote", "rollback", "completions", "man"] {
            assert!(script.contains(subcommand), "{shell}: no `{subcommand}` in\n{script}");
        }
        assert!(!script.contains("proxy-serve"), "{shell} completes the internal proxy-serve:\n{script}");
    }
}

#[test]
fn the_bash_script_is_valid_bash() {
    let script = Repo::empty().run(&["completions", "bash"]).ok().stdout;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("kiln.bash");
    std::fs::write(&path, &script).unwrap();
    let checked = std::process::Command::new("bash").arg("-n").arg(&path).output().unwrap();
    assert!(checked.status.success(), "bash -n: {}", String::from_utf8_lossy(&checked.stderr));
}

#[test]
fn an_unknown_shell_is_a_usage_error_naming_the_shells() {
    let run = Repo::empty().run(&["completions", "tcsh"]).expect(2);
    assert!(run.stderr.contains("invalid value 'tcsh'"), "{}", run.stderr);
    assert!(run.stderr.contains("bash, elvish, fish, powershell, zsh"), "{}", run.stderr);
}

#[test]
fn the_man_page_opens_with_its_title_and_lists_the_subcommands() {
    let page = Repo::empty().run(&["man"]).ok().stdout;
    assert!(page.starts_with(".TH kiln 1"), "{}", &page[..page.len().min(200)]);
    for subcommand in ["kiln\\-promote(1)", "kiln\\-rollback(1)", "kiln\\-completions(1)"] {
        assert!(page.contains(subcommand), "no {subcommand} in\n{page}");
    }
    assert!(!page.contains("proxy\\-serve"), "the man page names the internal proxy-serve:\n{page}");
    assert!(page.contains("Exit codes"), "the exit codes are part of the page:\n{page}");
}

#[test]
fn man_out_writes_one_page_per_subcommand() {
    let repo = Repo::empty();
    repo.run(&["man", "--out", "man/man1"]).ok();
    let mut pages: Vec<String> = std::fs::read_dir(repo.file("man/man1"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    pages.sort();
    for page in ["kiln.1", "kiln-promote.1", "kiln-rollback.1", "kiln-man.1"] {
        assert!(pages.contains(&page.to_string()), "no {page} in {pages:?}");
    }
    assert!(!pages.iter().any(|p| p.contains("proxy")), "{pages:?}");
    let promote = std::fs::read_to_string(repo.file("man/man1/kiln-promote.1")).unwrap();
    assert!(promote.contains("\\-\\-stage"), "{promote}");
}
