//! `--json` promises one document on stdout, also when clap rejects the arguments; `--help` and `--version` stay
//! plain text with exit 0, and hidden subcommands are never offered to users.

mod common;

use common::Repo;

/// (arguments, expected fragment of the document's `error`)
const REJECTED: &[(&[&str], &str)] = &[
    (&["--json", "promote"], "the following required arguments were not provided: --stage <STAGE>"),
    (&["promote", "--json"], "the following required arguments were not provided: --stage <STAGE>"),
    (&["--json", "bogus"], "unrecognized subcommand 'bogus'"),
    (&["--json", "log", "--limit", "abc"], "invalid value 'abc' for '--limit <LIMIT>'"),
    (&["--json"], "requires a subcommand"),
    (&["--json", "lineage", "dev", "--format", "png"], "invalid value 'png' for '--format <FORMAT>'"),
    (&["--json", "bake", "--no-such-flag"], "unexpected argument '--no-such-flag'"),
    (&["--json", "approve", "--stage", "prod"], "--digest <DIGEST>"),
];

#[test]
fn arguments_clap_rejects_still_give_a_json_document() {
    let repo = Repo::example();
    for (args, fragment) in REJECTED {
        let run = repo.run(args).expect(2);
        let doc = run.json();
        assert_eq!(doc["ok"], false, "{args:?}: {doc}");
        assert_eq!(doc["exit_code"], 2, "{args:?}: {doc}");
        let error = doc["error"].as_str().unwrap_or_default();
        assert!(error.contains(fragment), "{args:?}: wanted {fragment:?} in the error {error:?}");
        assert!(doc["causes"].is_array() && doc.get("hint").is_some() && doc.get("details").is_some(), "{doc}");
        assert!(run.stderr.contains("error:"), "{args:?}: clap's message stays on stderr:\n{}", run.stderr);
    }
}

#[test]
fn without_json_a_rejected_command_prints_nothing_on_stdout() {
    let repo = Repo::example();
    let run = repo.run(&["promote"]).expect(2);
    assert_eq!(run.stdout, "");
    assert!(run.stderr.contains("--stage <STAGE>"), "{}", run.stderr);
    // `--json` after `--` is an operand, not the option.
    let run = repo.run(&["lineage", "--", "--json"]).expect(2);
    assert!(serde_json::from_str::<serde_json::Value>(&run.stdout).is_err(), "{}", run.stdout);
}

#[test]
fn help_and_version_stay_plain_with_exit_0() {
    let repo = Repo::example();
    for args in
        [&["--json", "--help"][..], &["--help", "--json"], &["--json", "promote", "--help"], &["--json", "--version"]]
    {
        let run = repo.run(args).ok();
        assert!(serde_json::from_str::<serde_json::Value>(&run.stdout).is_err(), "{args:?}: {}", run.stdout);
        assert!(run.stdout.contains("kiln") || run.stdout.contains("Usage"), "{args:?}: {}", run.stdout);
    }
}

#[test]
fn hidden_subcommands_are_not_offered() {
    let repo = Repo::example();
    for args in [&[][..], &["--json"], &["proxy"], &["proxy-serv"], &["help"], &["--help"]] {
        let run = repo.run(args);
        assert!(
            !run.stdout.contains("proxy-serve") && !run.stderr.contains("proxy-serve"),
            "`kiln {}` offers the hidden proxy-serve:\n{}\n{}",
            args.join(" "),
            run.stdout,
            run.stderr
        );
    }
}

/// `kiln status --json | head -1`: the reader leaves before kiln has written everything. That is no failure of
/// kiln's (it panicked with "failed printing to stdout" once), so it exits 0 and says nothing.
#[test]
fn a_reader_that_goes_away_early_is_not_an_error() {
    let repo = Repo::example();
    let cases: [&[&str]; 3] = [
        &["--pipeline", "hello", "status", "--json"],
        &["--pipeline", "hello", "log"],
        &["--pipeline", "nope", "status", "--json"],
    ];
    for args in cases {
        let mut child = repo
            .kiln()
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        let expected = if args.contains(&"nope") { 2 } else { 0 };
        assert_eq!(out.status.code(), Some(expected), "{args:?}: {stderr}");
    }
}
