//! `kiln report` of the real binary: where the page goes, what `--since` changes, how verification failures and
//! bad arguments end. tests/report_browser.rs opens the page in a real browser.

mod common;

use common::{Down, Repo};

const BAKED: &str = "2026-03-01T10:00:00Z";
const LATER: &str = "2026-03-01T12:00:00Z";

fn at(repo: &Repo, now: &str, args: &[&str]) -> common::Run {
    common::Run::of(repo.kiln().args(args).env("KILN_NOW", now).output().unwrap(), args)
}

/// A dev stage of one instance, behind an approval.
fn approval_stage() -> Repo {
    common::hello::dev_stage(1, "", "[[stage.gate]]\napprovals = 1\n").0
}

/// Runs one image in `repo`'s dev stage, approved with a note that is markup.
fn deploy(repo: &Repo) -> String {
    let digest = at(repo, BAKED, &["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    at(repo, BAKED, &["approve", "--stage", "dev", "--digest", &digest, "--note", "<script>alert(1)</script>"]).ok();
    at(repo, BAKED, &["promote", "--stage", "dev"]).ok();
    digest
}

#[test]
fn the_page_goes_to_a_file_or_stdout_and_since_narrows_the_timeline_only() {
    let repo = approval_stage();
    // Before the deployment, so that a failing one leaves no stage running either.
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let digest = deploy(&repo);

    // By default: .kiln/reports/<pipeline>.html, and a line saying where it went. Not the work tree, where the
    // page would make the next bake refuse it as an uncommitted change (it used to be ./kiln-report.html).
    let run = at(&repo, LATER, &["report"]).ok();
    let written = repo.file(".kiln/reports/hello.html");
    assert!(run.stdout.starts_with(&format!("report written to {}", written.display())), "{}", run.stdout);
    assert!(run.stdout.contains("verify passed"), "{}", run.stdout);
    let page = std::fs::read_to_string(&written).unwrap();
    assert!(page.starts_with("<!DOCTYPE html>"), "{page}");
    for expected in [
        digest.as_str(),
        "hello-dev-v001",
        "<svg class=\"lineage\"",
        "Delivery metrics",
        "Verification passed",
        "local provider: every image matches its digest",
        "&#60;script&#62;alert(1)&#60;/script&#62;",
        "promoted",
        "deployed",
    ] {
        assert!(page.contains(expected), "{expected} is not in the page");
    }
    assert!(!page.contains("<script"), "the approval note reached the page as markup");
    // The default page leaves the work tree clean, so the next bake is not refused as dirty.
    at(&repo, LATER, &["bake"]).ok();

    // `--out -`: the page alone on stdout.
    let to_stdout = at(&repo, LATER, &["report", "--out", "-", "--since", "30m"]).ok();
    assert!(to_stdout.stdout.starts_with("<!DOCTYPE html>"), "{}", to_stdout.stdout);
    assert!(to_stdout.stdout.trim_end().ends_with("</html>"));
    // Two hours after the deployment, the last 30 minutes hold no event, but dev still runs the image.
    assert!(to_stdout.stdout.contains("the last 30m"), "{}", to_stdout.stdout);
    assert!(to_stdout.stdout.contains("Nothing happened here in the window."));
    assert!(to_stdout.stdout.contains(&digest), "what is live is shown whatever the window");
    assert!(!to_stdout.stdout.contains("<span class=\"badge good\">deployed</span>"));

    // --ledger-only leaves the provider out, and says so.
    let out = repo.file("ledger-only.html");
    at(&repo, LATER, &["report", "--ledger-only", "--out", out.to_str().unwrap()]).ok();
    assert!(std::fs::read_to_string(&out).unwrap().contains("not run: --ledger-only"));

    // Drift: the images vanish from the local store. The page is still written, says so, and kiln exits 6 as
    // `kiln verify` does.
    std::fs::remove_dir_all(repo.file(".kiln/oci")).unwrap();
    let drifted = at(&repo, LATER, &["report"]).expect(6);
    assert!(drifted.stdout.contains("verify FAILED"), "{}", drifted.stdout);
    assert!(drifted.stderr.contains("the provider has drifted from the ledger"), "{}", drifted.stderr);
    let page = std::fs::read_to_string(&written).unwrap();
    assert!(page.contains("Verification FAILED"), "{page}");
    assert!(page.contains("the local provider has drifted from the ledger"), "{page}");
}

#[test]
fn bad_arguments_and_unwritable_files_are_refused_with_their_exit_codes() {
    let repo = Repo::example();
    let dir = repo.file("a-directory");
    std::fs::create_dir_all(&dir).unwrap();
    let dir = dir.to_str().unwrap().to_string();
    let cases: &[(&[&str], i32, &str)] = &[
        (&["report", "--since", "soon"], 2, "`soon` is not a duration such as 7d or 30d"),
        (&["report", "--since", "100000years"], 2, "--since 100000years reaches back before 1970"),
        (&["report", "--json"], 2, "kiln report writes an HTML page, not JSON"),
        (&["report", "--out", "/nonexistent/dir/report.html"], 1, "cannot access /nonexistent/dir/report.html"),
        (&["report", "--out", &dir], 1, "is a directory; --out names a file"),
    ];
    for (args, code, message) in cases {
        let run = repo.run(args).expect(*code);
        assert!(run.stderr.contains(message), "{args:?}: {}", run.stderr);
    }
    assert!(!repo.file(".kiln/reports/hello.html").exists(), "a refused report wrote a page");
    let left: Vec<_> = std::fs::read_dir(repo.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(!left.iter().any(|n| n.to_string_lossy().starts_with(".kiln-report")), "a staging file was left: {left:?}");
}
