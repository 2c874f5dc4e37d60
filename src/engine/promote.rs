//! Promotion: choose the digest, judge every gate of the stage against the ledger head being appended to, and
//! record `promoted` (or `refused`) with every verdict and its evidence. Promotion never rebuilds.

use serde::Serialize;

use super::gate::{self, CommandContext};
use super::Context;
use crate::config::{Gate, Stage};
use crate::digest::{Digest, DigestQuery};
use crate::error::Refusal;
use crate::ledger::view::ImageRecord;
use crate::ledger::{Decision, EventBody, GateVerdict, View};
use crate::provider::{ImageRef, ProviderError, StageRef};
use crate::Error;

#[derive(Debug, Clone)]
pub struct PromoteOptions {
    pub stage: String,
    pub digest: Option<String>,
    /// Judge and report, record nothing.
    pub plan: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Outcome {
    Promoted,
    AlreadyPromoted,
    Planned,
}

/// As people read it in logs and messages; the same words as the JSON `outcome`.
impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Outcome::Promoted => "promoted",
            Outcome::AlreadyPromoted => "already promoted",
            Outcome::Planned => "planned",
        })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct PromoteReport {
    pub stage: String,
    pub digest: Digest,
    pub image_ref: String,
    pub gates: Vec<GateVerdict>,
    pub outcome: Outcome,
    /// The `promoted` event.
    pub seq: Option<u64>,
    /// With --plan: whether every gate passed.
    pub would_pass: bool,
    /// With --plan: the provider calls the promotion would make, in order (none made); empty otherwise.
    pub calls: Vec<String>,
}

pub fn stage<'a>(ctx: &'a Context, name: &str) -> Result<&'a Stage, Error> {
    ctx.pipeline.stage(name).ok_or_else(|| {
        Error::usage(format!(
            "pipeline `{}` has no stage `{name}`; its stages are {}",
            ctx.pipeline.name,
            ctx.pipeline.stage_names().join(", ")
        ))
    })
}

/// The stage before `stage`, if it is not the first.
pub fn previous_stage<'a>(ctx: &'a Context, stage: &Stage) -> Option<&'a Stage> {
    let index = ctx.pipeline.stage_index(&stage.name)?;
    index.checked_sub(1).map(|i| &ctx.pipeline.stages[i])
}

/// A digest the user typed, resolved among the ledger's images (short prefixes as in git).
pub fn resolve_digest(view: &View, typed: &str) -> Result<Digest, Error> {
    let query = DigestQuery::parse(typed)?;
    Ok(view.resolve(&query)?)
}

/// The ledger's record of `digest`, which must be an image of the pipeline's own recipe: a pipeline promotes (and
/// is approved for) only what its `image = …` bakes, never a parent layer or another pipeline's image.
pub fn own_image(ctx: &Context, view: &View, digest: &Digest) -> Result<ImageRecord, Error> {
    let record = view.image(digest).ok_or_else(|| Error::usage(format!("{digest} is not an image in this ledger")))?;
    if record.recipe != ctx.pipeline.image {
        return Err(Error::usage(format!(
            "{} is an image of recipe `{}`, but pipeline `{}` promotes only images of its `image = \"{}\"`",
            digest.short(),
            record.recipe,
            ctx.pipeline.name,
            ctx.pipeline.image
        )));
    }
    Ok(record)
}

/// The default candidate: what is live in the previous stage (else promoted there); for the first stage, the
/// newest bake of the pipeline's recipe.
pub fn default_digest(ctx: &Context, view: &View, stage: &Stage) -> Result<Digest, Error> {
    let index = ctx.pipeline.stage_index(&stage.name).unwrap_or(0);
    match index.checked_sub(1).map(|i| &ctx.pipeline.stages[i]) {
        None => view.heads.newest.get(&ctx.pipeline.image).copied().ok_or_else(|| {
            Error::usage(format!(
                "nothing to promote to {}: recipe `{}` was never baked; run `kiln bake`",
                stage.name, ctx.pipeline.image
            ))
        }),
        Some(previous) => {
            let there = view.stage(&ctx.pipeline.name, &previous.name);
            there.and_then(|s| s.live.as_ref().map(|l| l.digest).or(s.promoted.as_ref().map(|p| p.digest))).ok_or_else(
                || Error::Refused {
                    action: Refusal::Promotion,
                    stage: stage.name.clone(),
                    digest: None,
                    gates: vec![GateVerdict {
                        gate: "upstream".into(),
                        passed: false,
                        detail: format!(
                            "nothing is live in {} to promote; promote to {} first",
                            previous.name, previous.name
                        ),
                        evidence: serde_json::Value::Null,
                    }],
                },
            )
        }
    }
}

pub fn promote(ctx: &Context, options: &PromoteOptions) -> Result<PromoteReport, Error> {
    let stage = stage(ctx, &options.stage)?;
    let view = ctx.ledger.view()?;
    let digest = match &options.digest {
        Some(typed) => resolve_digest(&view, typed)?,
        None => default_digest(ctx, &view, stage)?,
    };
    let record = own_image(ctx, &view, &digest)?;
    // Copying an image to a stage's regions and sharing it with its accounts is a change outside kiln (another
    // account can launch it from then on), so it waits until the gates the ledger answers have passed. They are
    // judged again at the append: an approval that lands meanwhile finds the copies missing and the content gate
    // failing, never a promotion without its copies.
    let ledger_refuses =
        gate::ledger_verdicts(ctx.pipeline, stage, &digest, &view, ctx.clock, ctx.actor).iter().any(|g| !g.passed);
    drop(view);
    // Gates that do not depend on the ledger are judged once, outside the append loop.
    let (image, content) = if options.plan {
        let image = record.image(digest);
        let content = planned_content_verdict(stage, &image);
        (image, content)
    } else if ledger_refuses {
        let image = record.image(digest);
        let content = held_back_content_verdict(ctx, stage, &image);
        (image, content)
    } else {
        match distribute(ctx, stage, &record, digest) {
            Ok(image) => {
                let content = content_verdict(ctx, stage, &image);
                (image, content)
            }
            // The stage cannot rely on copies that could not be made (the image gone from its home region, a
            // region that refuses the copy): that is the content gate's verdict, recorded like any other. What the
            // configuration names wrongly stays a usage error.
            Err(Error::Provider(err)) if !matches!(err, ProviderError::Invalid { .. }) => {
                let detail = format!("{} could not be distributed to stage {}: {err}", digest.short(), stage.name);
                let content =
                    GateVerdict { gate: "content".into(), passed: false, detail, evidence: serde_json::Value::Null };
                (record.image(digest), content)
            }
            Err(err) => return Err(err),
        }
    };
    let commands = gate::command_verdicts(&CommandContext {
        repo: ctx.repo,
        pipeline: ctx.pipeline,
        stage,
        digest,
        image_ref: &image.image_ref,
        // Asked of the provider (AWS: load balancer reads) only for a gate that is told it: a plan of a stage
        // without command gates makes no provider call at all.
        previous_endpoint: previous_stage(ctx, stage)
            .filter(|_| stage.gates.iter().any(|g| matches!(g, Gate::Command { .. })))
            .and_then(|p| ctx.fleet.endpoint(StageRef { pipeline: &ctx.pipeline.name, stage: p })),
    });
    let last_stage = ctx.pipeline.stages.last().is_some_and(|last| last.name == stage.name);
    let calls = if options.plan {
        ctx.images.plan_promote(StageRef { pipeline: &ctx.pipeline.name, stage }, &image, last_stage)
    } else {
        Vec::new()
    };

    let (report, stored) = ctx.ledger.append::<PromoteReport, Error>(ctx.actor, ctx.clock, |view| {
        let gates = ordered_verdicts(
            stage,
            gate::ledger_verdicts(ctx.pipeline, stage, &digest, view, ctx.clock, ctx.actor),
            &commands,
            &content,
        );
        let passed = gates.iter().all(|g| g.passed);
        let report = |outcome| PromoteReport {
            stage: stage.name.clone(),
            digest,
            image_ref: image.image_ref.clone(),
            gates: gates.clone(),
            outcome,
            seq: None,
            would_pass: passed,
            calls: calls.clone(),
        };
        if options.plan {
            return Ok(Decision::Skip(report(Outcome::Planned)));
        }
        if !passed {
            let body = EventBody::Refused {
                pipeline: ctx.pipeline.name.clone(),
                stage: stage.name.clone(),
                digest,
                gates: gates.clone(),
            };
            return Ok(Decision::Append(Box::new(body), report(Outcome::Planned)));
        }
        // After a rollback the stage runs what it rolled back to: promoting the digest it rolled away from again
        // is news, and releases the hold.
        let current = view.stage(&ctx.pipeline.name, &stage.name).and_then(|s| s.target());
        if current == Some(digest) {
            return Ok(Decision::Skip(report(Outcome::AlreadyPromoted)));
        }
        let body = EventBody::Promoted {
            pipeline: ctx.pipeline.name.clone(),
            stage: stage.name.clone(),
            digest,
            gates: gates.clone(),
        };
        Ok(Decision::Append(Box::new(body), report(Outcome::Promoted)))
    })?;
    if !options.plan && !report.would_pass {
        return Err(Error::Refused {
            action: Refusal::Promotion,
            stage: stage.name.clone(),
            digest: Some(digest),
            gates: report.gates,
        });
    }
    let seq = stored.filter(|_| report.outcome == Outcome::Promoted).map(|s| s.event.seq);
    if !options.plan {
        // Also when already promoted: a pointer that a failed publish left behind is written on the next try.
        publish_pointer(ctx, stage, &image).map_err(|err| {
            Error::Provider(crate::provider::ProviderError::Other {
                provider: ctx.images.name(),
                message: format!(
                    "{} is promoted to {}, but its stage pointer was not published ({err}); run `kiln promote \
                     --stage {} --digest {}` again to publish it",
                    digest.short(),
                    stage.name,
                    stage.name,
                    digest.short()
                ),
            })
        })?;
        if last_stage {
            ctx.images.protect(&image).map_err(|err| {
                Error::Provider(crate::provider::ProviderError::Other {
                    provider: ctx.images.name(),
                    message: format!(
                        "{} is promoted to {}, but the provider could not protect it from deletion ({err}); run \
                         `kiln promote --stage {} --digest {}` again to protect it",
                        digest.short(),
                        stage.name,
                        stage.name,
                        digest.short()
                    ),
                })
            })?;
        }
    }
    Ok(PromoteReport { seq, ..report })
}

/// Points the stage's pointer at `image` and records the write in a `pointer-published` event. When the stage's
/// digest changed (the ledger's last pointer names another), that is one provider call, the write. When the
/// ledger says the pointer already names `image` (promoting again what a stage has), the provider is asked what
/// its pointer names, and it is written again only if that was lost or changed behind kiln's back. Returns the
/// event's seq when one was written.
pub fn publish_pointer(ctx: &Context, stage: &Stage, image: &ImageRef) -> Result<Option<u64>, Error> {
    let target = StageRef { pipeline: &ctx.pipeline.name, stage };
    let recorded = ctx.ledger.view()?.stage(&ctx.pipeline.name, &stage.name).and_then(|s| s.pointer.clone());
    if recorded.is_some_and(|m| m.digest == image.digest) && ctx.images.pointer(target)? == Some(image.digest) {
        return Ok(None);
    }
    let pointer = ctx.images.publish_pointer(target, image)?;
    let body = EventBody::PointerPublished {
        pipeline: ctx.pipeline.name.clone(),
        stage: stage.name.clone(),
        digest: image.digest,
        pointer,
    };
    // Every write is recorded, a repeated one too: the ledger says when the pointer last changed and who changed it.
    let (_, stored) =
        ctx.ledger.append::<(), Error>(ctx.actor, ctx.clock, |_| Ok(Decision::Append(Box::new(body.clone()), ())))?;
    Ok(stored.map(|s| s.event.seq))
}

/// Points the stage's pointer at `image` where a failure must not stop what is under way: a rollback starting
/// (restoring service comes first), or a deployment that has ended. A pointer that cannot be written is said, and
/// the next promotion, rollback or deployment writes it.
pub fn publish_pointer_best_effort(ctx: &Context, stage: &Stage, image: &ImageRef) {
    if let Err(err) = publish_pointer(ctx, stage, image) {
        tracing::warn!(stage = %stage.name, "the stage pointer still names what the stage ran before: {err}");
    }
}

/// Makes the image available where the stage needs it and records the copies the ledger did not have yet in one
/// `distributed` event. Returns the image with every copy it has now. The local provider has no regions: it
/// returns the copies as they are, and nothing is recorded.
fn distribute(ctx: &Context, stage: &Stage, record: &ImageRecord, digest: Digest) -> Result<ImageRef, Error> {
    let recorded = record.image(digest);
    let copies = ctx.images.distribute(&recorded, stage.regions(), stage.accounts())?;
    if copies.iter().all(|copy| recorded.copies.contains(copy)) {
        return Ok(recorded);
    }
    let body = EventBody::Distributed {
        pipeline: ctx.pipeline.name.clone(),
        stage: stage.name.clone(),
        digest,
        copies: copies.clone(),
    };
    ctx.ledger.append::<(), Error>(ctx.actor, ctx.clock, |view| {
        // Another kiln may have recorded the same copies meanwhile: one event is enough.
        let known = view.image(&digest).map(|r| r.copies).unwrap_or_default();
        if copies.iter().all(|copy| known.contains(copy)) {
            return Ok(Decision::Skip(()));
        }
        Ok(Decision::Append(Box::new(body.clone()), ()))
    })?;
    let mut all = recorded.copies;
    for copy in copies {
        if !all.contains(&copy) {
            all.push(copy);
        }
    }
    Ok(ImageRef { copies: all, ..recorded })
}

/// The copies of `image` the stage relies on, and where it has none: one per region the stage runs in (the
/// region of the first recorded copy when it names none), and those shared with each of its accounts there.
/// For an image without copies in a stage without regions or accounts (the local provider) nothing is missing.
fn relied_on(stage: &Stage, image: &ImageRef) -> (Vec<crate::provider::ImageCopy>, Vec<Missing>) {
    let regions: Vec<String> = if stage.regions().is_empty() {
        image.copies.first().map(|c| c.region.clone()).into_iter().collect()
    } else {
        stage.regions().to_vec()
    };
    let mut relied = Vec::new();
    let mut missing = Vec::new();
    for region in &regions {
        let here: Vec<_> = image.copies.iter().filter(|c| &c.region == region && c.account.is_none()).collect();
        if here.is_empty() {
            missing.push(Missing::Region(region.clone()));
        }
        relied.extend(here.into_iter().cloned());
    }
    for account in stage.accounts() {
        let shared: Vec<_> = image
            .copies
            .iter()
            .filter(|c| c.account.as_deref() == Some(account.as_str()))
            .filter(|c| regions.is_empty() || regions.contains(&c.region))
            .collect();
        if shared.is_empty() {
            missing.push(Missing::Account(account.clone()));
        }
        relied.extend(shared.into_iter().cloned());
    }
    (relied, missing)
}

/// Somewhere the stage needs a copy of the image and the ledger records none.
enum Missing {
    Region(String),
    Account(String),
}

impl Missing {
    fn describe(&self, digest: &Digest, plan: bool) -> String {
        match (self, plan) {
            (Missing::Region(region), false) => format!("no copy of {} in region {region}", digest.short()),
            (Missing::Account(account), false) => {
                format!("no copy of {} shared with account {account}", digest.short())
            }
            (Missing::Region(region), true) => format!("would be copied to region {region}"),
            (Missing::Account(account), true) => format!("would be shared with account {account}"),
        }
    }
}

/// The content gate: every copy the stage relies on still matches the digest (the provider names a copy that does
/// not), and none is missing.
fn content_verdict(ctx: &Context, stage: &Stage, image: &ImageRef) -> GateVerdict {
    let (copies, missing) = relied_on(stage, image);
    let checked = ImageRef { copies, ..image.clone() };
    let verdict = |passed: bool, detail: String| GateVerdict {
        gate: "content".into(),
        passed,
        detail,
        evidence: serde_json::Value::Null,
    };
    if !missing.is_empty() {
        let reasons: Vec<String> = missing.iter().map(|m| m.describe(&image.digest, false)).collect();
        return verdict(false, reasons.join("; "));
    }
    if let Err(err) = ctx.images.verify_image(&checked) {
        return verdict(false, err.to_string());
    }
    let detail = match checked.copies.len() {
        0 => format!("{} still matches {}", image.image_ref, image.digest.short()),
        n => format!("{} and its {n} cop{} still match {}", image.image_ref, plural_y(n), image.digest.short()),
    };
    verdict(true, detail)
}

/// The content gate when other gates refuse: the copies that exist are checked, and a missing one fails the gate
/// saying why it was not made (a promotion refused anyway copies and shares nothing).
fn held_back_content_verdict(ctx: &Context, stage: &Stage, image: &ImageRef) -> GateVerdict {
    let (_, missing) = relied_on(stage, image);
    let mut verdict = content_verdict(ctx, stage, image);
    if !missing.is_empty() {
        verdict.detail = format!(
            "{}: not copied or shared, because other gates refuse this promotion (kiln distributes an image only \
             once they pass)",
            verdict.detail
        );
    }
    verdict
}

/// The content gate as a plan judges it: from the ledger's record alone, since checking the copies is a provider
/// call (AWS: DescribeImages), which a plan lists rather than makes. It passes unless the promotion itself finds
/// otherwise, and says so.
fn planned_content_verdict(stage: &Stage, image: &ImageRef) -> GateVerdict {
    let (copies, missing) = relied_on(stage, image);
    let mut detail = match copies.len() {
        0 => format!(
            "not checked by a plan: promotion re-checks that {} still matches {}",
            image.image_ref,
            image.digest.short()
        ),
        n => format!(
            "not checked by a plan: promotion re-checks that {} and its {n} recorded cop{} still match {}",
            image.image_ref,
            plural_y(n),
            image.digest.short()
        ),
    };
    for gap in &missing {
        detail.push_str(&format!("; {}", gap.describe(&image.digest, true)));
    }
    GateVerdict { gate: "content".into(), passed: true, detail, evidence: serde_json::Value::Null }
}

fn plural_y(n: usize) -> &'static str {
    if n == 1 {
        "y"
    } else {
        "ies"
    }
}

/// Implicit gates first, then the configured gates in the order written, then the content check.
fn ordered_verdicts(
    stage: &Stage,
    ledger: Vec<GateVerdict>,
    commands: &[GateVerdict],
    content: &GateVerdict,
) -> Vec<GateVerdict> {
    // ledger_verdicts yields the implicit gates (not-revoked, upstream) first, then the configured ledger gates.
    let configured = stage.gates.iter().filter(|g| !matches!(g, Gate::Command { .. })).count();
    let implicit = ledger.len().saturating_sub(configured);
    let mut ledger = ledger.into_iter();
    let mut commands = commands.iter().cloned();
    let mut out: Vec<GateVerdict> = ledger.by_ref().take(implicit).collect();
    for gate in &stage.gates {
        match gate {
            Gate::Command { .. } => out.extend(commands.next()),
            _ => out.extend(ledger.next()),
        }
    }
    out.push(content.clone());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::config::pipeline;
    use crate::engine::fixture::Fixture;
    use crate::provider::inject::{Fault, Rule};
    use crate::provider::{ImageCopy, ImageProvider};

    const ACCOUNT: &str = "111122223333";

    /// An AWS-shaped pipeline: `dev` runs in two regions and shares with one account; `prod` names no region.
    struct World(Fixture);

    impl std::ops::Deref for World {
        type Target = Fixture;
        fn deref(&self) -> &Fixture {
            &self.0
        }
    }

    impl std::ops::DerefMut for World {
        fn deref_mut(&mut self) -> &mut Fixture {
            &mut self.0
        }
    }

    impl World {
        fn new() -> World {
            let deploy_dev = format!(
                "deploy = {{ subnets = [\"subnet-1\"], regions = [\"us-east-1\", \"eu-west-1\"], accounts = [\"{ACCOUNT}\"] }}"
            );
            let pipeline = format!(
                "image = \"app\"\nprovider = \"aws\"\n[aws]\nregion = \"us-east-1\"\nartifact-bucket = \"kiln-artifacts\"\n[[stage]]\nname = \"dev\"\n\
                 {deploy_dev}\n[[stage]]\nname = \"prod\"\ndeploy = {{ subnets = [\"subnet-1\"] }}\n"
            );
            World(Fixture::new(&[
                ("images/app.toml", "description = \"app\"\n[aws]\nbase-ami = \"ami-0123456789abcdef0\"\n"),
                ("pipelines/app.toml", &pipeline),
            ]))
        }

        fn with<T>(&self, f: impl FnOnce(&Context) -> T) -> T {
            self.run(f)
        }

        /// An image baked in us-east-1: the memory provider holds it and its one copy there.
        fn bake(&self) -> Digest {
            let digest = Digest::of(b"app");
            self.memory.add_image(digest);
            let home = self.memory.distribute(&ImageRef::new(digest, "memory:app"), &["us-east-1".into()], &[]);
            let body = EventBody::Baked {
                pipeline: "app".into(),
                recipe: "app".into(),
                digest,
                recipe_key: digest,
                parent: None,
                provider: "memory".into(),
                image_ref: "memory:app".into(),
                commit: None,
                dirty: false,
                copies: home.unwrap(),
                instance: None,
            };
            self.ledger
                .append::<(), Error>("t", &Clock::system(), |_| Ok(Decision::Append(Box::new(body.clone()), ())))
                .unwrap();
            digest
        }

        fn promote(&self, stage: &str, plan: bool) -> Result<PromoteReport, Error> {
            let options = PromoteOptions { stage: stage.into(), digest: None, plan };
            self.with(|ctx| promote(ctx, &options))
        }

        fn kinds(&self) -> Vec<String> {
            let view = self.ledger.view().unwrap();
            let record = view.image(&Digest::of(b"app")).unwrap();
            record
                .events
                .iter()
                .map(|seq| self.ledger.read(*seq).unwrap().unwrap().event.body.kind().to_string())
                .collect()
        }

        fn content(report: &PromoteReport) -> GateVerdict {
            report.gates.iter().find(|g| g.gate == "content").cloned().unwrap()
        }
    }

    fn copy(region: &str, account: Option<&str>) -> ImageCopy {
        ImageCopy {
            region: region.into(),
            account: account.map(str::to_string),
            id: format!("memory-{region}-{}", Digest::of(b"app").short()),
            snapshots: vec![],
        }
    }

    #[test]
    fn promotion_distributes_to_the_stages_regions_and_accounts_and_records_it_once() {
        let world = World::new();
        let digest = world.bake();
        let report = world.promote("dev", false).unwrap();
        assert_eq!(report.outcome, Outcome::Promoted);
        let content = World::content(&report);
        assert!(content.passed && content.detail.contains("its 4 copies still match"), "{content:?}");
        let record = world.ledger.view().unwrap().image(&digest).unwrap();
        assert_eq!(
            record.copies,
            vec![
                copy("us-east-1", None),
                copy("us-east-1", Some(ACCOUNT)),
                copy("eu-west-1", None),
                copy("eu-west-1", Some(ACCOUNT))
            ]
        );
        assert_eq!(world.kinds(), ["distributed", "promoted", "pointer-published"]);
        // Promoting again finds every copy recorded: nothing new is distributed or recorded.
        let again = world.promote("dev", false).unwrap();
        assert_eq!(again.outcome, Outcome::AlreadyPromoted);
        assert_eq!(world.kinds(), ["distributed", "promoted", "pointer-published"]);
    }

    #[test]
    fn a_promotion_other_gates_refuse_copies_and_shares_nothing() {
        let mut world = World::new();
        // prod needs copies in eu-west-1 and a share with the account; its upstream gate refuses (dev never ran).
        let file = world.dir.path().join("pipelines/app.toml");
        let text = std::fs::read_to_string(&file).unwrap().replace(
            "name = \"prod\"\ndeploy = { subnets = [\"subnet-1\"] }",
            &format!(
                "name = \"prod\"\ndeploy = {{ subnets = [\"subnet-1\"], regions = [\"us-east-1\", \"eu-west-1\"], accounts = [\"{ACCOUNT}\"] }}"
            ),
        );
        std::fs::write(&file, text).unwrap();
        world.pipeline = pipeline::load(&world.repo, "app").unwrap();
        let digest = world.bake();
        let options = PromoteOptions { stage: "prod".into(), digest: Some(digest.to_string()), plan: false };
        let err = world.with(|ctx| promote(ctx, &options)).unwrap_err();
        let Error::Refused { gates, .. } = err else { panic!("refused, not {err:?}") };
        assert!(gates.iter().any(|g| g.gate == "upstream" && !g.passed), "{gates:?}");
        let content = gates.iter().find(|g| g.gate == "content").unwrap();
        assert!(!content.passed, "the copies do not exist, so the gate cannot pass: {content:?}");
        assert!(
            content.detail.contains("no copy of") && content.detail.contains("not copied or shared"),
            "{content:?}"
        );
        assert_eq!(world.injector.count("distribute"), 0, "nothing was copied or shared");
        assert!(!world.kinds().contains(&"distributed".to_string()));
    }

    #[test]
    fn a_copy_deleted_behind_kilns_back_fails_the_content_gate() {
        let world = World::new();
        let digest = world.bake();
        world.promote("dev", false).unwrap();
        world.memory.delete_copy(digest, "eu-west-1");
        let Err(Error::Refused { gates, .. }) = world.promote("dev", false) else { panic!("not refused") };
        let content = gates.iter().find(|g| g.gate == "content").unwrap();
        assert!(!content.passed, "{content:?}");
        assert!(content.detail.contains(&format!("memory-eu-west-1-{}", digest.short())), "{content:?}");
        assert_eq!(world.kinds().last().map(String::as_str), Some("refused"));
    }

    #[test]
    fn a_distribution_that_fails_fails_the_content_gate_and_records_no_copy() {
        let world = World::new();
        let digest = world.bake();
        let fault = Fault::Fail("CopyImage: the source AMI is gone".into());
        world.injector.add(Rule { call: "distribute".into(), nth: None, fault });
        let Err(Error::Refused { gates, .. }) = world.promote("dev", false) else { panic!("not refused") };
        let content = gates.iter().find(|g| g.gate == "content").unwrap();
        assert!(!content.passed, "{content:?}");
        assert!(content.detail.starts_with(&format!("{} could not be distributed to stage dev: ", digest.short())));
        assert!(content.detail.contains("the source AMI is gone"), "{content:?}");
        assert_eq!(world.kinds(), ["refused"]);
        assert_eq!(world.ledger.view().unwrap().image(&digest).unwrap().copies, vec![copy("us-east-1", None)]);
    }

    #[test]
    fn a_plan_distributes_nothing_and_says_where_the_image_would_be_copied() {
        let world = World::new();
        let digest = world.bake();
        let report = world.promote("dev", true).unwrap();
        assert_eq!(report.outcome, Outcome::Planned);
        assert!(report.would_pass, "{:?}", report.gates);
        let content = World::content(&report);
        assert!(content.detail.contains("would be copied to region eu-west-1"), "{content:?}");
        assert!(content.detail.contains(&format!("would be shared with account {ACCOUNT}")), "{content:?}");
        assert_eq!(world.ledger.view().unwrap().image(&digest).unwrap().copies, vec![copy("us-east-1", None)]);
        assert!(world.kinds().is_empty(), "a plan records nothing: {:?}", world.kinds());
        assert_eq!(world.injector.count("distribute"), 0, "a plan copies nothing");
    }

    #[test]
    fn the_copies_a_stage_relies_on_and_the_ones_it_misses() {
        let world = World::new();
        let digest = Digest::of(b"app");
        let (dev, prod) = (&world.pipeline.stages[0], &world.pipeline.stages[1]);
        let image = |copies| ImageRef { digest, image_ref: "memory:app".into(), copies };
        // A stage that names no region relies on the region of the first recorded copy.
        let (relied, missing) = relied_on(prod, &image(vec![copy("ap-south-1", None), copy("us-east-1", None)]));
        assert_eq!(relied, vec![copy("ap-south-1", None)]);
        assert!(missing.is_empty());
        // Without copies and without regions (the local provider) it relies on none and misses none.
        let (relied, missing) = relied_on(prod, &image(vec![]));
        assert!(relied.is_empty() && missing.is_empty());
        // Copies in other regions or for other accounts do not count.
        let (relied, missing) =
            relied_on(dev, &image(vec![copy("us-east-1", None), copy("ap-south-1", Some(ACCOUNT))]));
        assert_eq!(relied, vec![copy("us-east-1", None)]);
        let said: Vec<String> = missing.iter().map(|m| m.describe(&digest, false)).collect();
        assert_eq!(
            said,
            [
                format!("no copy of {} in region eu-west-1", digest.short()),
                format!("no copy of {} shared with account {ACCOUNT}", digest.short()),
            ]
        );
        // The gate fails on a missing copy, naming it, when promotion should have made it.
        world.memory.add_image(digest);
        let verdict = world.with(|ctx| content_verdict(ctx, dev, &image(vec![])));
        assert!(!verdict.passed);
        assert_eq!(
            verdict.detail,
            format!(
                "no copy of {0} in region us-east-1; no copy of {0} in region eu-west-1; no copy of {0} shared with \
                 account {ACCOUNT}",
                digest.short()
            )
        );
    }
}
