//! B3: a ledger of 1,000,000 events. Measures append latency, `kiln log --limit 20`, `status`, `lineage prod`,
//! `kiln report` (its time and page size, with and without `--since 30d`) and `kiln verify` throughput against
//! `sha256sum` over the same bytes.
//!
//! Run: `cargo bench --bench ledger` (KILN_BENCH_EVENTS=N for another size). The ledger is generated once into
//! target/kiln-bench/ and reused.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rayon::prelude::*;

use kiln::clock::Clock;
use kiln::digest::Digest;
use kiln::ledger::event::{encode, Event, EventBody, GateVerdict};
use kiln::ledger::{event_key, Decision, Ledger, LedgerError};

const STAGES: [&str; 3] = ["dev", "test", "prod"];

/// One release as a real pipeline records it: bake, then per stage promote and a deployment of several steps,
/// with two approvals before prod. 24 events.
fn release(n: u64, parent: Option<Digest>) -> (Digest, Vec<EventBody>) {
    let digest = Digest::of(format!("image {n}").as_bytes());
    let p = || "hello".to_string();
    let mut out = vec![EventBody::Baked {
        pipeline: p(),
        recipe: "hello".into(),
        digest,
        recipe_key: Digest::of(format!("key {n}").as_bytes()),
        parent,
        provider: "local".into(),
        image_ref: format!("hello:{}", &digest.hex()[..12]),
        commit: Some(format!("{:040x}", n)),
        dirty: false,
        copies: Vec::new(),
        instance: None,
    }];
    for stage in STAGES {
        if stage == "prod" {
            for note in ["ana", "bo"] {
                out.push(EventBody::Approved { pipeline: p(), stage: stage.into(), digest, note: Some(note.into()) });
            }
        }
        let gate = GateVerdict {
            gate: "upstream".into(),
            passed: true,
            detail: "ok".into(),
            evidence: serde_json::Value::Null,
        };
        out.push(EventBody::Promoted { pipeline: p(), stage: stage.into(), digest, gates: vec![gate] });
        let deploy_id = format!("{stage}-{n}");
        let group = format!("hello-{stage}-v{n:03}");
        out.push(EventBody::DeployStarted {
            pipeline: p(),
            stage: stage.into(),
            deploy_id: deploy_id.clone(),
            digest,
            group: group.clone(),
            previous_group: n.checked_sub(1).map(|m| format!("hello-{stage}-v{m:03}")),
            lease_until: "2026-11-28T12:15:00.000Z".into(),
            lease_holder: "ci-runner:4242:1000".into(),
            rollback: None,
        });
        for step in ["group-created", "healthy", "traffic-switched", "old-retired"] {
            out.push(EventBody::DeployStep {
                pipeline: p(),
                stage: stage.into(),
                deploy_id: deploy_id.clone(),
                step: step.into(),
                detail: serde_json::Value::Null,
            });
        }
        out.push(EventBody::DeployFinished { pipeline: p(), stage: stage.into(), deploy_id, digest, group });
    }
    (digest, out)
}

fn generate(dir: &Path, events: u64) {
    let done = dir.join("generated");
    let marker = format!("generator 2, {events} events");
    if std::fs::read_to_string(&done).ok().as_deref() == Some(marker.as_str()) {
        return;
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir.join("events")).unwrap();
    let started = Instant::now();
    let mut prev = Digest::ZERO;
    let mut seq = 0u64;
    // Service images build on a base image, re-baked every 500 releases (as a weekly base refresh would).
    let mut base = None;
    let mut n = 0;
    let mut batch: Vec<(u64, Vec<u8>)> = Vec::with_capacity(100_000);
    let flush = |batch: &mut Vec<(u64, Vec<u8>)>| {
        batch.par_iter().for_each(|(seq, bytes)| std::fs::write(dir.join(event_key(*seq)), bytes).unwrap());
        batch.clear();
    };
    while seq < events {
        let mut bodies = Vec::new();
        if n % 500 == 0 {
            let base_digest = Digest::of(format!("base {n}").as_bytes());
            bodies.push(EventBody::Baked {
                pipeline: "hello".into(),
                recipe: "base".into(),
                digest: base_digest,
                recipe_key: Digest::of(format!("base key {n}").as_bytes()),
                parent: None,
                provider: "local".into(),
                image_ref: format!("base:{}", &base_digest.hex()[..12]),
                commit: Some(format!("{:040x}", n)),
                dirty: false,
                copies: Vec::new(),
                instance: None,
            });
            base = Some(base_digest);
        }
        let (_, release_events) = release(n, base);
        bodies.extend(release_events);
        n += 1;
        for body in bodies {
            if seq == events {
                break;
            }
            seq += 1;
            let minute = seq / 60;
            let time = format!(
                "2026-{:02}-{:02}T{:02}:{:02}:{:02}.000Z",
                1 + (minute / 43200) % 12,
                1 + (minute / 1440) % 28,
                (minute / 60) % 24,
                minute % 60,
                seq % 60
            );
            let event = Event { seq, prev, time, actor: "ci".into(), clock: None, body };
            let (bytes, hash) = encode(&event).unwrap();
            prev = hash;
            batch.push((seq, bytes));
        }
        if batch.len() >= 100_000 {
            flush(&mut batch);
        }
    }
    flush(&mut batch);
    std::fs::write(&done, marker).unwrap();
    eprintln!("generated {events} events in {:.1?}", started.elapsed());
}

fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Runs `kiln` `runs` times against the bench ledger; the median wall time.
fn time_kiln(repo: &Path, ledger: &Path, args: &[&str], runs: usize) -> Duration {
    let mut samples = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .arg("--ledger")
            .arg(ledger)
            .current_dir(repo)
            .env("KILN_LOG", "error")
            // The example repository holds the AWS pipeline too: pipeline-aware commands must be told which.
            .env("KILN_PIPELINE", "hello")
            .output()
            .unwrap();
        let took = started.elapsed();
        assert!(out.status.success(), "kiln {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        samples.push(took);
    }
    median(samples)
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

fn shell_seconds(script: &str, cwd: &Path) -> f64 {
    let started = Instant::now();
    let status = Command::new("bash").args(["-c", script]).current_dir(cwd).status().unwrap();
    assert!(status.success(), "{script} failed");
    started.elapsed().as_secs_f64()
}

fn main() {
    // `cargo test --all-targets` also runs benches, without `--bench`: generating a million events is not a test.
    if !std::env::args().any(|a| a == "--bench") {
        println!("ledger bench: run it with `cargo bench --bench ledger`");
        return;
    }
    let events: u64 = std::env::var("KILN_BENCH_EVENTS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/kiln-bench");
    let ledger_dir = root.join(format!("ledger-{events}"));
    generate(&ledger_dir, events);

    // The example repository, so that pipeline-aware commands find their stages.
    let repo = root.join("repo");
    let _ = std::fs::remove_dir_all(&repo);
    std::fs::create_dir_all(&repo).unwrap();
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let status =
        Command::new("cp").arg("-r").arg(manifest.join("images")).arg(manifest.join("pipelines")).arg(&repo).status();
    assert!(matches!(status, Ok(s) if s.success()), "copying the example repository failed");

    println!("B3 ledger benchmark: {events} events in {}", ledger_dir.display());
    let _ = std::fs::remove_dir_all(ledger_dir.join("cache"));
    let started = Instant::now();
    time_kiln(&repo, &ledger_dir, &["log", "--limit", "1"], 1);
    println!("  cold view rebuild (no cache, replays every event): {:.2?}", started.elapsed());

    for (name, args) in [
        ("log --limit 20", vec!["log", "--limit", "20"]),
        ("status", vec!["status"]),
        ("lineage prod", vec!["lineage", "prod"]),
    ] {
        let t = time_kiln(&repo, &ledger_dir, &args, 15);
        println!("  kiln {name:<16} median {:>7.1} ms   (target ≤ 50 ms)", t.as_secs_f64() * 1000.0);
    }

    let ledger = Ledger::open_dir(&ledger_dir);
    let clock = Clock::system();
    let mut samples = Vec::new();
    for i in 0..50 {
        let started = Instant::now();
        ledger
            .append::<(), LedgerError>("bench", &clock, |view| {
                let digest = view.heads.newest.get("hello").copied().unwrap_or(Digest::ZERO);
                let body = EventBody::Approved {
                    pipeline: "hello".into(),
                    stage: "prod".into(),
                    digest,
                    note: Some(format!("bench {i}")),
                };
                Ok(Decision::Append(Box::new(body), ()))
            })
            .unwrap();
        samples.push(started.elapsed());
    }
    samples.sort();
    println!(
        "  append (in-process, fsync'd)     median {:.2} ms, p95 {:.2} ms",
        samples[samples.len() / 2].as_secs_f64() * 1000.0,
        samples[samples.len() * 95 / 100].as_secs_f64() * 1000.0
    );

    // After the appends, so that `--since 30d` holds their 50 events written by the real clock; the generated ones
    // are older. The generated images exist only in the ledger: the provider part of verify is left out.
    let page = root.join("report.html");
    for (name, since, runs) in [("report", None, 3), ("report --since 30d", Some("30d"), 5)] {
        let mut args = vec!["report", "--ledger-only", "--out", page.to_str().unwrap()];
        args.extend(since.map(|s| ["--since", s]).into_iter().flatten());
        let t = time_kiln(&repo, &ledger_dir, &args, runs);
        let size = std::fs::metadata(&page).unwrap().len();
        println!("  kiln {name:<18} median {:>7.2} s, page {:.0} KB", t.as_secs_f64(), size as f64 / 1024.0);
    }

    let events_dir = ledger_dir.join("events");
    let bytes = dir_bytes(&events_dir) as f64;
    let mb = bytes / 1e6;
    // The generated images exist only in the ledger, so the provider drift check is left out.
    let verify = time_kiln(&repo, &ledger_dir, &["verify", "--ledger-only"], 3).as_secs_f64();
    // Baselines over the same bytes: sha256sum reading the same files, and sha256sum of one concatenated stream.
    let files = shell_seconds("find . -name '*.json' -print0 | xargs -0 cat | sha256sum > /dev/null", &events_dir);
    let concat = root.join("events.concat");
    shell_seconds(
        &format!("find . -name '*.json' -print0 | sort -z | xargs -0 cat > {}", concat.display()),
        &events_dir,
    );
    let single = shell_seconds(&format!("sha256sum {} > /dev/null", concat.display()), &events_dir);
    let _ = std::fs::remove_file(&concat);
    println!("  kiln verify                      {verify:.2} s = {:.0} MB/s over {mb:.0} MB", mb / verify);
    println!(
        "  sha256sum, same files (cat|sha)  {files:.2} s = {:.0} MB/s  -> verify at {:.0}% (target ≥ 50%)",
        mb / files,
        100.0 * files / verify
    );
    println!(
        "  sha256sum, one stream            {single:.2} s = {:.0} MB/s  -> verify at {:.0}%",
        mb / single,
        100.0 * single / verify
    );
}
