//! The report gathered from hand-written ledgers: what it shows, what it leaves out, and that nothing from the
//! ledger reaches the page unescaped.

use std::time::{Duration, SystemTime};

use super::*;
use crate::clock::Clock;
use crate::engine::fixture::Fixture;
use crate::ledger::event::RollbackRecord;
use crate::ledger::{Decision, GateVerdict};

const DAY: u64 = 86_400;
/// 2026-01-01T00:00:00Z: events are written at offsets from it.
const EPOCH: u64 = 1_767_225_600;

fn at(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(EPOCH + secs)
}

fn fixture() -> Fixture {
    Fixture::new(&[
        ("images/app.toml", "description = \"app\"\n"),
        (
            "pipelines/app.toml",
            "image = \"app\"\n[[stage]]\nname = \"dev\"\ncapacity = 1\ndeploy = { port = 30998 }\n\
             [[stage]]\nname = \"prod\"\ncapacity = 1\ndeploy = { port = 30997 }\n",
        ),
    ])
}

fn write(fixture: &Fixture, secs: u64, actor: &str, body: EventBody) {
    let clock = Clock::fixed(at(secs));
    fixture
        .ledger
        .append::<(), LedgerError>(actor, &clock, |_| Ok(Decision::Append(Box::new(body.clone()), ())))
        .unwrap();
}

fn image(n: u8) -> Digest {
    Digest::of(&[n])
}

fn bake(fixture: &Fixture, secs: u64, digest: Digest, parent: Option<Digest>) {
    let body = EventBody::Baked {
        pipeline: "app".into(),
        recipe: "app".into(),
        digest,
        recipe_key: Digest::of(digest.hex().as_bytes()),
        parent,
        provider: "memory".into(),
        image_ref: format!("app:{}", digest.short()),
        commit: Some("0123456789abcdef0123456789abcdef01234567".into()),
        dirty: false,
        copies: Vec::new(),
        instance: None,
    };
    write(fixture, secs, "ci", body);
}

fn promote(fixture: &Fixture, secs: u64, stage: &str, digest: Digest, gates: Vec<GateVerdict>) {
    write(fixture, secs, "ci", EventBody::Promoted { pipeline: "app".into(), stage: stage.into(), digest, gates });
}

fn deploy(fixture: &Fixture, secs: u64, stage: &str, digest: Digest, id: &str, rollback: Option<&str>) {
    let group = format!("app-{stage}-{id}");
    write(
        fixture,
        secs,
        "ci",
        EventBody::DeployStarted {
            pipeline: "app".into(),
            stage: stage.into(),
            deploy_id: id.into(),
            digest,
            group: group.clone(),
            previous_group: None,
            lease_until: crate::clock::format(at(secs + 600)),
            lease_holder: "host:1:1".into(),
            rollback: rollback.map(|reason| RollbackRecord { reason: Some(reason.into()), forced: false }),
        },
    );
    let body =
        EventBody::DeployFinished { pipeline: "app".into(), stage: stage.into(), deploy_id: id.into(), digest, group };
    write(fixture, secs + 60, "ci", body);
}

fn gather_at(fixture: &Fixture, now: u64, since: Option<u64>) -> Report {
    let options = Options {
        since: since.map(|s| at(now) - Duration::from_secs(s)),
        since_label: since.map(|s| humantime::format_duration(Duration::from_secs(s)).to_string()),
        now: at(now),
        actor: "auditor".into(),
    };
    let verification =
        Verification { chain: check_chain(&fixture.ledger).0, provider: provider_not_checked("not run: a unit test") };
    gather(&fixture.ledger, &fixture.pipeline, &options, verification, &|_| None).unwrap()
}

fn html(report: &Report) -> String {
    let mut out = Vec::new();
    render(report, &mut out).unwrap();
    String::from_utf8(out).unwrap()
}

fn stage<'a>(report: &'a Report, name: &str) -> &'a StageReport {
    report.stages.iter().find(|s| s.name == name).unwrap()
}

#[test]
fn everything_from_the_ledger_reaches_the_page_escaped() {
    let f = fixture();
    bake(&f, 0, image(1), None);
    let hostile = "<script>alert('owned')</script>";
    let gate = GateVerdict {
        gate: "command <img src=x onerror=alert(1)>".into(),
        passed: true,
        detail: "exited 0 & <b>bold</b>".into(),
        evidence: serde_json::json!({ "output_tail": format!("line one\n</pre>{hostile}"), "exit_code": 0 }),
    };
    promote(&f, 10, "dev", image(1), vec![gate]);
    deploy(&f, 20, "dev", image(1), "d1", None);
    let approval = EventBody::Approved {
        pipeline: "app".into(),
        stage: "prod".into(),
        digest: image(1),
        note: Some(hostile.into()),
    };
    write(&f, 30, "<i>mallory</i>", approval);
    deploy(&f, 40, "dev", image(1), "d2", Some(hostile));
    write(&f, 50, "ci", EventBody::Revoked { digest: image(1), reason: hostile.into(), descendants: vec![] });

    let page = html(&gather_at(&f, DAY, None));
    for raw in ["<script", "<img", "<b>bold", "<i>mallory", "</pre><script"] {
        assert!(!page.contains(raw), "{raw} reached the page unescaped");
    }
    for escaped in [
        "&#60;script&#62;alert(&#39;owned&#39;)&#60;/script&#62;",
        "&#60;img src=x onerror=alert(1)&#62;",
        "exited 0 &#38; &#60;b&#62;bold&#60;/b&#62;",
        "&#60;i&#62;mallory&#60;/i&#62;",
    ] {
        assert!(page.contains(escaped), "{escaped} is not on the page");
    }
    // The note, the rollback's reason, the revocation's, the gate's output: each is there, escaped.
    assert!(page.matches("&#60;script&#62;alert(&#39;owned&#39;)&#60;/script&#62;").count() >= 4, "{page}");
}

#[test]
fn each_section_keeps_its_newest_rows_and_counts_the_older_ones() {
    let f = fixture();
    bake(&f, 0, image(1), None);
    let approvals = APPROVAL_ROWS as u64 + 3;
    for n in 0..approvals {
        let body = EventBody::Approved { pipeline: "app".into(), stage: "prod".into(), digest: image(1), note: None };
        write(&f, 10 + n, &format!("approver{n}"), body);
    }
    let report = gather_at(&f, DAY, None);
    let shown = &stage(&report, "prod").approvals;
    assert_eq!((shown.rows.len(), shown.older), (APPROVAL_ROWS, 3));
    assert_eq!(shown.rows[0].at.actor, format!("approver{}", approvals - 1), "newest first");
    assert_eq!(report.events_read, approvals + 1);
    let page = html(&report);
    assert!(page.contains("3 older approval(s) in the window not shown"), "{page}");
}

#[test]
fn since_limits_the_timeline_and_metrics_but_not_what_is_live() {
    let f = fixture();
    bake(&f, 0, image(1), None);
    promote(&f, 10, "dev", image(1), vec![]);
    deploy(&f, 20, "dev", image(1), "d1", None);
    bake(&f, 9 * DAY, image(2), Some(image(1)));
    promote(&f, 9 * DAY + 10, "dev", image(2), vec![]);

    let whole = gather_at(&f, 10 * DAY, None);
    let dev = stage(&whole, "dev");
    let kinds: Vec<What> = dev.timeline.rows.iter().map(|r| r.what).collect();
    assert_eq!(kinds, [What::Promoted, What::Deployed, What::Promoted], "newest first");
    assert_eq!(whole.metrics.stages[0].deployments, 1);

    let recent = gather_at(&f, 10 * DAY, Some(2 * DAY));
    let dev = stage(&recent, "dev");
    let kinds: Vec<What> = dev.timeline.rows.iter().map(|r| r.what).collect();
    assert_eq!(kinds, [What::Promoted], "only the promotion of image 2 is in the last two days");
    assert_eq!(dev.live.as_ref().map(|l| l.digest), Some(image(1)), "what is live does not depend on --since");
    assert_eq!(dev.promoted.as_ref().map(|p| p.digest), Some(image(2)));
    assert_eq!(recent.metrics.stages[0].deployments, 0, "the deployment was before the window");
    assert_eq!(recent.window.from, at(8 * DAY));
}

#[test]
fn the_lineage_graph_draws_each_stage_image_with_its_parents() {
    let f = fixture();
    let empty = gather_at(&f, DAY, None);
    assert!(empty.lineage_svg.is_none(), "nothing live or promoted: no graph");
    assert!(html(&empty).contains("No stage has an image live or promoted yet."));

    bake(&f, 0, image(1), None);
    bake(&f, 1, image(2), Some(image(1)));
    promote(&f, 10, "dev", image(2), vec![]);
    deploy(&f, 20, "dev", image(2), "d1", None);
    let report = gather_at(&f, DAY, None);
    let svg = report.lineage_svg.as_deref().unwrap();
    assert!(svg.starts_with("<svg class=\"lineage\""), "{svg}");
    for label in
        [image(1).short(), image(2).short(), "stage".into(), "dev".into(), "parent of".into(), "0123456789ab".into()]
    {
        assert!(svg.contains(&label), "{label} is not in the graph:\n{svg}");
    }
    assert!(!svg.contains("<?xml"), "an XML declaration does not belong inside HTML");
}

#[test]
fn a_broken_chain_is_reported_as_failed_with_the_error_verify_exits_with() {
    let f = fixture();
    bake(&f, 0, image(1), None);
    bake(&f, 1, image(2), None);
    let first = f.dir.path().join(".kiln/ledger").join(crate::ledger::event_key(1));
    let text = std::fs::read_to_string(&first).unwrap().replace("\"ci\"", "\"eve\"");
    std::fs::write(&first, text).unwrap();
    let (check, failure) = check_chain(&f.ledger);
    assert_eq!(check.outcome, Outcome::Failed);
    assert!(check.problems[0].contains("seq 1"), "{:?}", check.problems);
    assert!(matches!(failure, Some(Error::Ledger(LedgerError::Tampered { seq: 1, .. }))), "{failure:?}");
}

/// Writes `bodies` as events 1.. straight into the store, dated by a real clock (not pinned) at the given offsets:
/// the only way to date events in the past without `KILN_NOW`, whose times never end a backwards scan.
fn write_dated(fixture: &Fixture, bodies: Vec<(u64, EventBody)>) {
    let dir = fixture.dir.path().join(".kiln/ledger");
    std::fs::create_dir_all(dir.join("events")).unwrap();
    let mut prev = Digest::ZERO;
    for (n, (secs, body)) in bodies.into_iter().enumerate() {
        let seq = n as u64 + 1;
        let event = Event { seq, prev, time: crate::clock::format(at(secs)), actor: "ci".into(), clock: None, body };
        let (bytes, hash) = crate::ledger::event::encode(&event).unwrap();
        std::fs::write(dir.join(crate::ledger::event_key(seq)), bytes).unwrap();
        prev = hash;
    }
}

#[test]
fn with_since_only_the_window_and_the_deployment_before_it_are_read() {
    let f = fixture();
    let hour = 3600;
    let mut bodies = Vec::new();
    // A deployment to dev every hour for ten days, each of image n % 2 (so each one changes what is live).
    for n in 0..240u64 {
        let digest = image((n % 2) as u8 + 1);
        let id = format!("d{n}");
        let started = EventBody::DeployStarted {
            pipeline: "app".into(),
            stage: "dev".into(),
            deploy_id: id.clone(),
            digest,
            group: format!("app-dev-v{n:03}"),
            previous_group: None,
            lease_until: crate::clock::format(at(n * hour + 600)),
            lease_holder: "host:1:1".into(),
            rollback: None,
        };
        bodies.push((n * hour, started));
        let group = format!("app-dev-v{n:03}");
        bodies.push((
            n * hour + 60,
            EventBody::DeployFinished { pipeline: "app".into(), stage: "dev".into(), deploy_id: id, digest, group },
        ));
    }
    write_dated(&f, bodies);

    let now = 240 * hour;
    let report = gather_at(&f, now, Some(DAY));
    let dev = stage(&report, "dev");
    // The last day holds 24 deployments (48 events); the backwards scan reads past it by the clock-skew margin.
    assert_eq!(report.metrics.stages[0].deployments, 24);
    assert_eq!(dev.timeline.rows.len() as u64 + dev.timeline.older, 24);
    assert!(report.events_read < 60, "read {} of 480 events", report.events_read);
    assert!(dev.timeline.rows.iter().all(|r| crate::clock::parse(&r.at.time).unwrap() >= at(now - DAY)));

    let whole = gather_at(&f, now, None);
    assert_eq!(whole.events_read, 480);
    assert_eq!(whole.metrics.stages[0].deployments, 240);
    assert_eq!((stage(&whole, "dev").timeline.rows.len(), stage(&whole, "dev").timeline.older), (TIMELINE_ROWS, 190));
}

#[test]
fn the_metrics_match_those_computed_from_every_event() {
    let f = fixture();
    bake(&f, 0, image(1), None);
    bake(&f, 1, image(2), None);
    bake(&f, 2, image(3), None);
    deploy(&f, 10, "dev", image(1), "d1", None);
    deploy(&f, DAY, "dev", image(2), "d2", None);
    deploy(&f, DAY + 3600, "dev", image(1), "d3", Some("bad image 2"));
    deploy(&f, 2 * DAY, "prod", image(1), "p1", None);
    // A deployment to prod that fails its verification window.
    let start = EventBody::DeployStarted {
        pipeline: "app".into(),
        stage: "prod".into(),
        deploy_id: "p2".into(),
        digest: image(3),
        group: "app-prod-p2".into(),
        previous_group: None,
        lease_until: crate::clock::format(at(3 * DAY + 600)),
        lease_holder: "host:1:1".into(),
        rollback: None,
    };
    write(&f, 3 * DAY, "ci", start);
    for step in ["group-created", "healthy", "traffic-switched", VERIFICATION_FAILED_STEP] {
        let body = EventBody::DeployStep {
            pipeline: "app".into(),
            stage: "prod".into(),
            deploy_id: "p2".into(),
            step: step.into(),
            detail: serde_json::Value::Null,
        };
        write(&f, 3 * DAY + 60, "ci", body);
    }
    let failed = EventBody::DeployFailed {
        pipeline: "app".into(),
        stage: "prod".into(),
        deploy_id: "p2".into(),
        digest: image(3),
        group: "app-prod-p2".into(),
        reason: "verification failed".into(),
        log_tail: None,
    };
    write(&f, 3 * DAY + 120, "ci", failed);
    write(&f, 4 * DAY, "ci", EventBody::Revoked { digest: image(1), reason: "cve".into(), descendants: vec![] });

    let report = gather_at(&f, 5 * DAY, None);
    let all: Vec<Event> = (1..=f.ledger.view().unwrap().seq()).map(|seq| read_event(&f.ledger, seq).unwrap()).collect();
    let view = f.ledger.view().unwrap();
    let baked = |digest: &Digest| {
        let record = view.image(digest)?;
        Some(metrics::Baked { time: crate::clock::parse(&record.time)?, commit: record.commit })
    };
    let sources = Sources { baked: &baked, commit_time: &|_| None };
    let names = ["dev".to_string(), "prod".to_string()];
    let expected = metrics::compute("app", &names, &all, report.window, &sources);
    assert_eq!(report.metrics, expected);
    // And it is not a vacuous comparison: a rollback, a failed verification and a revocation were all counted.
    let causes: Vec<_> = report.metrics.stages.iter().flat_map(|s| s.failures.iter().map(|f| f.cause)).collect();
    assert_eq!(causes.len(), 4, "{causes:?}");
}

#[test]
fn drills_are_timeline_rows_and_counted_in_the_metrics_table() {
    let f = fixture();
    bake(&f, 0, image(1), None);
    promote(&f, 10, "dev", image(1), vec![]);
    deploy(&f, 20, "dev", image(1), "d1", None);
    let drill = |passed: bool, fault: &str| EventBody::Drill {
        pipeline: "app".into(),
        stage: "dev".into(),
        fault: fault.into(),
        passed,
        requests: 80,
        failed: if passed { 0 } else { 7 },
        bound: 0,
        converged: passed,
        digest: Some(image(1)),
        duration_ms: 900,
        deploys: Vec::new(),
        detail: String::new(),
    };
    write(&f, 200, "oncall", drill(true, "kill-instance"));
    write(&f, 300, "oncall", drill(false, "kill-kiln"));

    let report = gather_at(&f, DAY, None);
    let dev = stage(&report, "dev");
    let kinds: Vec<What> = dev.timeline.rows.iter().map(|r| r.what).collect();
    assert_eq!(kinds, [What::DrillFailed, What::DrillPassed, What::Deployed, What::Promoted], "newest first");
    assert_eq!(dev.timeline.rows[0].detail, "kill-kiln: 7 of 80 requests failed (bound 0), did not converge");
    let page = html(&report);
    assert!(page.contains("1 of 2 passed"), "the metrics table counts the drills: {page}");
    assert!(page.contains("drill failed"), "{page}");
}
