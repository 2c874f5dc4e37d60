//! `kiln report` opened in a real headless browser (Debian's `chromium`, which scripts/install-test-deps installs):
//! the page loads with networking unavailable, its DOM holds every stage, the live digests, the lineage SVG and the
//! metrics, and its screenshot is not blank. The screenshot is kept for a person to look at:
//! target/test-artifacts/report.png.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Down, Repo};

const NOW: &str = "2026-11-28T12:00:00Z";
/// Past the test stage's 10-minute soak in dev.
const LATER: &str = "2026-11-28T12:11:00Z";
const NOTE: &str = "<script>document.title='owned'</script>ship it";

fn at(repo: &Repo, now: &str, actor: &str, args: &[&str]) -> common::Run {
    let out = repo.kiln().env("KILN_NOW", now).env("KILN_ACTOR", actor).args(args).output().unwrap();
    common::Run::of(out, args)
}

fn chromium() -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|path| std::env::split_paths(&path).map(|dir| dir.join("chromium")).find(|p| p.is_file()));
    match found.flatten() {
        Some(path) => path,
        None => panic!("chromium is not installed: run scripts/install-test-deps (it installs Debian's chromium)"),
    }
}

/// Whether this machine lets an unprivileged-looking process make its own user and network namespace: then the
/// browser runs with no network interface at all (`unshare -rn`), which proves the page needs no network.
fn can_unshare_network() -> bool {
    Command::new("unshare").args(["-rn", "true"]).status().is_ok_and(|s| s.success())
}

/// Runs chromium headless on `page` with `args`, networking cut off; its stdout.
fn browse(page: &Path, profile: &Path, args: &[&str]) -> String {
    let isolated = can_unshare_network();
    let mut cmd = if isolated {
        let mut cmd = Command::new("unshare");
        cmd.arg("-rn").arg(chromium());
        cmd
    } else {
        Command::new(chromium())
    };
    cmd.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ])
    .arg(format!("--user-data-dir={}", profile.display()));
    if !isolated {
        // No namespace to cut the network: every connection goes to a closed port, every name fails to resolve.
        cmd.args(["--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND"]);
    }
    let out = cmd.args(args).arg(format!("file://{}", page.display())).output().unwrap();
    assert!(
        out.status.success(),
        "chromium {args:?} failed ({}):\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Every `src=`/`href=` value in the page that reaches outside it.
fn external_references(html: &str) -> Vec<String> {
    let mut found = Vec::new();
    for attribute in ["src=\"", "href=\"", "src='", "href='"] {
        for (at, _) in html.match_indices(attribute) {
            let value = &html[at + attribute.len()..];
            let value = &value[..value.find(['"', '\'']).unwrap_or(value.len())];
            if value.starts_with("http:") || value.starts_with("https:") || value.starts_with("//") {
                found.push(value.to_string());
            }
        }
    }
    if html.contains("@import") || html.contains("url(http") || html.contains("url(//") {
        found.push("a stylesheet import or url()".into());
    }
    found
}

#[test]
fn the_report_opens_offline_in_a_real_browser_and_shows_stages_digests_lineage_and_metrics() {
    // First, so that a machine without the browser fails at once, saying what to run.
    chromium();
    let (repo, _ports) = Repo::example_on_free_ports();
    let _down = Down { repo: &repo, stages: vec!["dev", "test", "prod"], pipeline: None };
    let digest = at(&repo, NOW, "ci", &["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string();
    at(&repo, NOW, "ci", &["promote", "--stage", "dev"]).ok();
    at(&repo, LATER, "ci", &["promote", "--stage", "test"]).ok();
    at(&repo, LATER, "ana", &["approve", "--stage", "prod", "--digest", &digest, "--note", NOTE]).ok();
    at(&repo, LATER, "ci", &["promote", "--stage", "prod"]).ok();

    let page = repo.file("report.html");
    at(&repo, LATER, "auditor", &["report", "--out", page.to_str().unwrap()]).ok();
    let html = std::fs::read_to_string(&page).unwrap();
    assert_eq!(external_references(&html), Vec::<String>::new(), "the page must not reach outside itself");
    assert!(!html.contains("<script"), "the page needs no script, and the approval note must not become one");

    let profile = tempfile::tempdir().unwrap();
    let dom = browse(&page, profile.path(), &["--dump-dom"]);
    for stage in ["dev", "test", "prod"] {
        assert!(dom.contains(&format!("<h2>Stage {stage}</h2>")), "no section for stage {stage} in the DOM");
    }
    assert!(dom.contains(&digest), "the live digest is not in the DOM");
    assert!(dom.contains("<svg class=\"lineage\""), "no lineage SVG in the DOM");
    assert!(dom.contains("Delivery metrics") && dom.contains("Change-failure rate"), "no metrics in the DOM");
    assert!(dom.contains("Verification passed"), "verify did not pass");
    assert!(dom.contains("<title>kiln report: hello</title>"), "the note's script ran or the title is wrong");
    assert!(
        dom.contains("&lt;script&gt;document.title='owned'&lt;/script&gt;ship it"),
        "the note is not shown as text"
    );

    // Kept for a person to look at, wherever the test ran.
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let screenshot = artifacts.join("report.png");
    let _ = std::fs::remove_file(&screenshot);
    let profile = tempfile::tempdir().unwrap();
    browse(&page, profile.path(), &[&format!("--screenshot={}", screenshot.display()), "--window-size=1280,2000"]);

    let decoder = png::Decoder::new(std::fs::File::open(&screenshot).unwrap());
    let (info, mut reader) = decoder.read_info().unwrap();
    assert_eq!((info.width, info.height), (1280, 2000));
    let mut pixels = vec![0; info.buffer_size()];
    reader.next_frame(&mut pixels).unwrap();
    let channels = info.color_type.samples();
    let mut colours = std::collections::BTreeSet::new();
    let mut inked = 0usize;
    for pixel in pixels.chunks(channels) {
        colours.insert(pixel[..3.min(channels)].to_vec());
        if pixel.iter().take(3).any(|c| *c < 200) {
            inked += 1;
        }
    }
    let total = (info.width * info.height) as usize;
    // A page of text, tables and a coloured graph: many shades (anti-aliasing), and a fair share of dark pixels.
    assert!(colours.len() > 50, "{} distinct colours: the screenshot looks blank", colours.len());
    assert!(inked * 100 > total, "{inked} of {total} pixels are dark: the screenshot looks blank");
}
