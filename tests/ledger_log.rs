//! What the record shows: `kiln log` (deploy steps, rollbacks, `--digest`, `--since`), and events written under a
//! pinned clock (`KILN_NOW`) marked as such by `log`, `lineage` and `verify`; `verify` catches time running
//! backwards.

mod common;

use common::{Down, Repo, Run};
use kiln::digest::Digest;
use kiln::ledger::event::{encode, Event, EventBody};
use kiln::ledger::file::FileStore;
use kiln::ledger::{event_key, Created, Store};

fn at(repo: &Repo, now: &str, actor: &str, args: &[&str]) -> Run {
    Run::of(repo.kiln().env("KILN_NOW", now).env("KILN_ACTOR", actor).args(args).output().unwrap(), args)
}

/// The example repository with only a dev stage of one instance, on a free port.
fn dev_only() -> Repo {
    let (repo, _) = Repo::example_on_free_ports();
    let text = std::fs::read_to_string(repo.file("pipelines/hello.toml")).unwrap();
    let dev_end = text.find("\n[[stage]]\nname = \"test\"").unwrap();
    repo.write("pipelines/hello.toml", &text[..dev_end].replace("capacity = 2", "capacity = 1"));
    repo
}

fn bake_greeting(repo: &Repo, greeting: &str) -> String {
    repo.edit("images/hello.toml", "GREETING = \"", &format!("GREETING = \"{greeting} "));
    repo.run(&["bake", "--json"]).ok().json()["digest"].as_str().unwrap().to_string()
}

#[test]
fn log_shows_steps_rollbacks_and_pinned_clocks_and_filters_by_digest() {
    let repo = dev_only();
    let _down = Down { repo: &repo, stages: vec!["dev"], pipeline: None };
    let first = bake_greeting(&repo, "one");
    // Promoted and deployed under a pinned clock, a year in the past.
    at(&repo, "2025-06-01T12:00:00Z", "ci", &["promote", "--stage", "dev", "--digest", &first]).ok();
    let second = bake_greeting(&repo, "two");
    repo.run(&["promote", "--stage", "dev", "--digest", &second]).ok();
    repo.run(&["rollback", "--stage", "dev", "--reason", "bad release"]).ok();

    let text = repo.run(&["log", "--limit", "200"]).ok().stdout;
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines.iter().any(|l| l.contains("deploy-step") && l.contains("step ")), "{text}");
    let started: Vec<&&str> = lines.iter().filter(|l| l.contains("deploy-started")).collect();
    assert_eq!(started.len(), 3, "{text}");
    assert!(started[0].contains("rollback") && !started[1].contains("rollback"), "newest first: {text}");
    assert!(
        lines.iter().filter(|l| l.contains("PINNED CLOCK (KILN_NOW), really written 20")).count() >= 3,
        "the pinned promotion and its deployment are marked: {text}"
    );
    let pinned_json = repo.run(&["log", "--limit", "200", "--json"]).ok().json();
    let pinned: Vec<&serde_json::Value> =
        pinned_json["events"].as_array().unwrap().iter().filter(|e| e["clock"]["pinned"] == true).collect();
    assert!(!pinned.is_empty() && pinned.iter().all(|e| e["time"].as_str().unwrap().starts_with("2025-06-01")));
    assert!(pinned.iter().all(|e| e["clock"]["real_time"].as_str().unwrap() > "2026"), "{pinned:?}");

    // --digest, abbreviated: every event about the second image, and its deployment's steps; nothing else.
    let about =
        repo.run(&["log", "--digest", &second["sha256:".len()..][..12], "--limit", "200", "--json"]).ok().json();
    let events = about["events"].as_array().unwrap();
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    for kind in ["baked", "promoted", "deploy-started", "deploy-step", "deploy-finished"] {
        assert!(kinds.contains(&kind), "{kind} missing from {kinds:?}");
    }
    let deploy_ids: Vec<&str> = events.iter().filter_map(|e| e["deploy_id"].as_str()).collect();
    for event in events {
        // A deployment that replaces it (here the rollback) ends its live period: that is about it too.
        let about_second = event["digest"] == second.as_str()
            || (event["kind"] == "deploy-step" && deploy_ids.contains(&event["deploy_id"].as_str().unwrap()))
            || event["kind"] == "deploy-finished";
        assert!(about_second, "not about {second}: {event}");
    }
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] > w[1]), "newest first: {seqs:?}");
    let unknown = repo.run(&["log", "--digest", "sha256:0123456789ab"]).expect(2);
    assert!(unknown.stderr.contains("0123456789ab"), "{}", unknown.stderr);

    // lineage marks the promotion and deployment made under the pinned clock, and only those.
    let lineage = repo.run(&["lineage", &first, "--json"]).ok().json();
    let dev = &lineage["stages"][0];
    assert_eq!(dev["promotions"][0]["clock"]["pinned"], true, "{dev}");
    assert_eq!(dev["deployments"][0]["started"]["clock"]["pinned"], true, "{dev}");
    let rollback = dev["deployments"].as_array().unwrap().iter().find(|d| d["rollback"] == true).unwrap();
    assert!(rollback["started"].get("clock").is_none(), "{rollback}");
    let lineage_text = repo.run(&["lineage", &first]).ok().stdout;
    assert!(lineage_text.lines().any(|l| l.contains("promoted by ci") && l.contains("PINNED CLOCK")), "{lineage_text}");
    assert!(lineage_text.lines().any(|l| l.contains("rollback") && !l.contains("PINNED")), "{lineage_text}");

    // verify: a warning naming the pinned seqs, on stderr and in JSON, and still exit 0.
    let verified = repo.run(&["verify", "--ledger-only", "--json"]).ok();
    let listed: Vec<u64> =
        verified.json()["pinned_clock"].as_array().unwrap().iter().map(|s| s.as_u64().unwrap()).collect();
    let expected: Vec<u64> = pinned.iter().map(|e| e["seq"].as_u64().unwrap()).rev().collect();
    assert_eq!(listed, expected);
    assert!(verified.stderr.contains("written with a pinned clock (KILN_NOW)"), "{}", verified.stderr);
}

#[test]
fn log_since_keeps_only_recent_events() {
    let repo = common::tiny_repo(common::free_port());
    let digest = at(&repo, "2026-01-01T00:00:00Z", "ci", &["bake", "--json"]).ok().json()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    at(&repo, "2026-01-10T00:00:00Z", "ana", &["approve", "--stage", "dev", "--digest", &digest]).ok();
    at(&repo, "2026-01-20T12:00:00Z", "bo", &["approve", "--stage", "dev", "--digest", &digest]).ok();
    let since = |age: &str| -> Vec<String> {
        let run = at(&repo, "2026-01-21T00:00:00Z", "ci", &["log", "--since", age, "--json"]).ok().json();
        run["events"].as_array().unwrap().iter().map(|e| e["actor"].as_str().unwrap().to_string()).collect()
    };
    assert_eq!(since("1d"), ["bo"]);
    assert_eq!(since("12days"), ["bo", "ana"]);
    assert_eq!(since("30d"), ["bo", "ana", "ci", "ci"], "the bake of app and of its base");
    assert!(since("1h").is_empty());
    let both = at(&repo, "2026-01-21T00:00:00Z", "ci", &["log", "--since", "30d", "--digest", &digest, "--json"]);
    assert_eq!(both.ok().json()["events"].as_array().unwrap().len(), 3, "the bake and two approvals");
    let bad = repo.run(&["log", "--since", "soon"]).expect(2);
    assert!(bad.stderr.contains("`soon` is not a duration such as 2h or 30d"), "{}", bad.stderr);
}

/// Event times, each `(time, real time if the clock was pinned)`.
type Times<'a> = &'a [(&'a str, Option<&'a str>)];

/// A ledger of approvals written at these times, each `(time, real time if the clock was pinned)`, made with the
/// library as a writer on another machine (or an older kiln) would have.
fn write_ledger(repo: &Repo, times: Times) {
    let store = FileStore::new(repo.file(".kiln/ledger"));
    let mut prev = Digest::ZERO;
    for (i, (time, real_time)) in times.iter().enumerate() {
        let event = Event {
            seq: i as u64 + 1,
            prev,
            time: time.to_string(),
            actor: "t".into(),
            clock: real_time.map(|r| kiln::clock::ClockRecord { pinned: true, real_time: r.into() }),
            body: EventBody::Approved {
                pipeline: "app".into(),
                stage: "dev".into(),
                digest: Digest::of(&[i as u8]),
                note: None,
            },
        };
        let (bytes, hash) = encode(&event).unwrap();
        assert_eq!(store.create(&event_key(event.seq), &bytes).unwrap(), Created::Yes);
        prev = hash;
    }
}

#[test]
fn verify_fails_when_time_runs_backwards_beyond_clock_skew() {
    let cases: [(Times, i32, &str); 4] = [
        (&[("2026-11-28T12:00:00Z", None), ("2026-11-28T12:03:00Z", None), ("2026-11-28T12:00:30Z", None)], 0, ""),
        // Written with KILN_NOW by a kiln that did not record the real time: backdated a day.
        (
            &[("2026-11-28T12:00:00Z", None), ("2026-11-27T12:00:00Z", None), ("2026-11-28T12:05:00Z", None)],
            6,
            "damaged at seq 2: time runs backwards: it was written at 2026-11-27T12:00:00.000Z, 1day before seq 1",
        ),
        // Pinned to the past, but really written in order: a warning, not a failure.
        (&[("2026-11-28T12:00:00Z", None), ("2020-01-01T00:00:00Z", Some("2026-11-28T12:01:00Z"))], 0, "seq 2"),
        // Pinned, and the recorded real time itself runs backwards.
        (
            &[("2026-11-28T12:00:00Z", None), ("2026-11-28T13:00:00Z", Some("2026-11-28T11:00:00Z"))],
            6,
            "damaged at seq 2: time runs backwards",
        ),
    ];
    for (times, code, message) in cases {
        let repo = common::tiny_repo(common::free_port());
        write_ledger(&repo, times);
        let run = repo.run(&["verify", "--ledger-only"]).expect(code);
        assert!(run.stderr.contains(message), "{times:?}: {}", run.stderr);
    }
}
