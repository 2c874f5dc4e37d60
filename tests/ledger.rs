//! The ledger under concurrent writers, tampering and `kill -9`: nothing lost, nothing duplicated, every edit found.
//!
//! Writers are separate processes: each test that needs them re-runs itself as a child (`common::child_of`) that
//! appends instead of testing.

mod common;

use std::collections::BTreeMap;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use common::{Repo, Run};
use kiln::clock::Clock;
use kiln::digest::Digest;
use kiln::ledger::{Decision, EventBody, Ledger, LedgerError};

fn note_event(note: String) -> EventBody {
    EventBody::Approved {
        pipeline: "p".into(),
        stage: "prod".into(),
        digest: Digest::of(note.as_bytes()),
        note: Some(note),
    }
}

fn append(ledger: &Ledger, note: String) {
    ledger
        .append::<(), LedgerError>("writer", &Clock::system(), |_| {
            Ok(Decision::Append(Box::new(note_event(note.clone())), ()))
        })
        .unwrap();
}

/// The role of a writer process, given by `spawn_writer`.
const WRITER: &str = "ledger-writer";

/// In a writer process, appends `KILN_TEST_COUNT` notes and returns true; in the test run itself, returns false.
fn write_if_writer() -> bool {
    let Some(role) = common::child_role() else { return false };
    assert_eq!(role, WRITER);
    let dir = std::env::var("KILN_TEST_LEDGER").unwrap();
    let writer = std::env::var("KILN_TEST_WRITER").unwrap();
    let count: usize = std::env::var("KILN_TEST_COUNT").unwrap().parse().unwrap();
    let ledger = Ledger::open_dir(Path::new(&dir));
    for i in 0..count {
        append(&ledger, format!("{writer}/{i}"));
    }
    true
}

/// A writer process: the test named `test`, re-run as a child that appends `count` notes as `writer`.
fn spawn_writer(test: &str, dir: &Path, writer: &str, count: usize, fault: Option<&str>) -> Child {
    let mut cmd = common::child_of(test, WRITER);
    cmd.env("KILN_TEST_LEDGER", dir)
        .env("KILN_TEST_WRITER", writer)
        .env("KILN_TEST_COUNT", count.to_string())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    if let Some(fault) = fault {
        cmd.env("KILN_FAULT", fault);
    }
    cmd.spawn().unwrap()
}

fn notes(ledger: &Ledger) -> BTreeMap<String, usize> {
    let view = ledger.view().unwrap();
    let mut seen = BTreeMap::new();
    for seq in 1..=view.seq() {
        if let EventBody::Approved { note: Some(note), .. } = ledger.read(seq).unwrap().unwrap().event.body {
            *seen.entry(note).or_insert(0) += 1;
        }
    }
    seen
}

fn verify(dir: &Path) -> Run {
    let repo = Repo::empty();
    repo.run(&["verify", "--json", "--ledger", dir.to_str().unwrap()])
}

#[test]
fn sixteen_processes_lose_nothing_and_duplicate_nothing() {
    if write_if_writer() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (writers, each) = (16, 25);
    let children: Vec<Child> = (0..writers)
        .map(|w| {
            spawn_writer(
                "sixteen_processes_lose_nothing_and_duplicate_nothing",
                dir.path(),
                &format!("w{w}"),
                each,
                None,
            )
        })
        .collect();
    for mut child in children {
        assert!(child.wait().unwrap().success(), "a writer failed");
    }
    let seen = notes(&Ledger::open_dir(dir.path()));
    assert_eq!(seen.len(), writers * each, "every append is there");
    assert!(seen.values().all(|&n| n == 1), "no append is there twice");
    let report = verify(dir.path()).ok().json();
    assert_eq!(report["events"], (writers * each) as u64);
}

fn ledger_with(events: usize) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open_dir(dir.path());
    for i in 0..events {
        append(&ledger, format!("event {i}"));
    }
    dir
}

fn event_path(dir: &Path, seq: u64) -> std::path::PathBuf {
    dir.join(kiln::ledger::event_key(seq))
}

fn assert_names_seq(dir: &Path, seq: u64, what: &str) {
    let run = verify(dir);
    assert_eq!(run.code, 6, "{what}: verify exited {}\n{}", run.code, run.stderr);
    assert!(
        run.stderr.contains(&format!("damaged at seq {seq}:")),
        "{what}: wanted seq {seq} named in:\n{}",
        run.stderr
    );
}

#[test]
fn editing_any_byte_of_any_event_is_named() {
    let dir = ledger_with(4);
    verify(dir.path()).ok();
    for seq in 1..=4 {
        let path = event_path(dir.path(), seq);
        let original = std::fs::read(&path).unwrap();
        for i in 0..original.len() {
            let mut edited = original.clone();
            // Keep the byte printable where possible, as a hand edit would.
            edited[i] = if edited[i] == b'0' {
                b'1'
            } else if edited[i].is_ascii_alphanumeric() {
                b'0'
            } else {
                b'x'
            };
            std::fs::write(&path, &edited).unwrap();
            let what = format!("byte {i} of seq {seq}");
            // Every byte through the library; a sample through the binary, which adds exit code and message.
            match Ledger::open_dir(dir.path()).verify() {
                Err(LedgerError::Tampered { seq: named, .. }) => assert_eq!(named, seq, "{what}"),
                other => panic!("{what}: verify returned {other:?}"),
            }
            if i % 23 == 0 {
                assert_names_seq(dir.path(), seq, &what);
            }
        }
        std::fs::write(&path, &original).unwrap();
    }
    verify(dir.path()).ok();
}

#[test]
fn deleting_reordering_and_inserting_are_named() {
    let dir = ledger_with(5);
    let p = |seq| event_path(dir.path(), seq);

    let third = std::fs::read(p(3)).unwrap();
    std::fs::remove_file(p(3)).unwrap();
    assert_names_seq(dir.path(), 3, "deleted");
    std::fs::write(p(3), &third).unwrap();

    let second = std::fs::read(p(2)).unwrap();
    std::fs::write(p(2), &third).unwrap();
    std::fs::write(p(3), &second).unwrap();
    assert_names_seq(dir.path(), 2, "swapped");
    std::fs::write(p(2), &second).unwrap();
    std::fs::write(p(3), &third).unwrap();
    verify(dir.path()).ok();

    // Insert a well-formed event after seq 2 by shifting the rest up: the chain breaks where the old seq 3 now sits.
    let fresh = ledger_with(3);
    let forged = std::fs::read(event_path(fresh.path(), 3)).unwrap();
    for seq in (3..=5).rev() {
        std::fs::rename(p(seq), p(seq + 1)).unwrap();
    }
    std::fs::write(p(3), forged).unwrap();
    let run = verify(dir.path());
    assert_eq!(run.code, 6, "{}", run.stderr);
    assert!(run.stderr.contains("damaged at seq 3:") || run.stderr.contains("damaged at seq 4:"), "{}", run.stderr);
}

#[test]
fn removing_events_from_the_end_is_noticed() {
    let dir = ledger_with(5);
    Ledger::open_dir(dir.path()).view().unwrap();
    std::fs::remove_file(event_path(dir.path(), 5)).unwrap();
    assert_names_seq(dir.path(), 5, "truncated");
}

/// Each fault point kills the writer inside its one append: before the event file is created, or after it is
/// created and before the writer learns so.
#[test]
fn a_kill_at_each_append_step_leaves_a_sound_ledger() {
    if write_if_writer() {
        return;
    }
    for (fault, victim_recorded) in [("ledger:before-create", false), ("ledger:after-create", true)] {
        let dir = ledger_with(2);
        let status =
            spawn_writer("a_kill_at_each_append_step_leaves_a_sound_ledger", dir.path(), "victim", 1, Some(fault))
                .wait()
                .unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{fault}: the writer should have died by SIGKILL: {status:?}");
        verify(dir.path()).ok();
        let ledger = Ledger::open_dir(dir.path());
        assert_eq!(notes(&ledger).contains_key("victim/0"), victim_recorded, "{fault}");
        append(&ledger, "after the crash".into());
        verify(dir.path()).ok();
        assert_eq!(ledger.view().unwrap().seq(), if victim_recorded { 4 } else { 3 }, "{fault}");
    }
}

/// Each round's writer is killed once it has appended some events and before it appended them all, so the kill
/// lands while it is appending, not before it opened the ledger or after it finished.
#[test]
fn kill_9_while_appending_never_blocks_the_next_append() {
    if write_if_writer() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let each = 1000;
    for round in 0..12u64 {
        let head = Ledger::open_dir(dir.path()).view().unwrap().seq();
        let mut child = spawn_writer(
            "kill_9_while_appending_never_blocks_the_next_append",
            dir.path(),
            &format!("r{round}"),
            each,
            None,
        );
        // Vary how far into its run the writer gets, so the kill meets it at different points of an append.
        let wait_for = event_path(dir.path(), head + 1 + round % 5);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !wait_for.exists() {
            assert!(child.try_wait().unwrap().is_none(), "round {round}: the writer exited before it was killed");
            assert!(Instant::now() < deadline, "round {round}: the writer never appended");
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap();
        let status = child.wait().unwrap();
        assert_eq!(status.signal(), Some(libc::SIGKILL), "round {round}: the writer finished first: {status:?}");
        verify(dir.path()).ok();
        let ledger = Ledger::open_dir(dir.path());
        let written = notes(&ledger).keys().filter(|n| n.starts_with(&format!("r{round}/"))).count();
        assert!(written > 0 && written < each, "round {round}: {written} of {each} appended when killed");
        append(&ledger, format!("survivor {round}"));
    }
    let seen = notes(&Ledger::open_dir(dir.path()));
    assert!((0..12).all(|r| seen.get(&format!("survivor {r}")) == Some(&1)));
    verify(dir.path()).ok();
}
