//! Garbage collection: delete the images no stage can roll back to, keeping everything a stage runs, ran recently
//! or could return to, everything that ever reached a pipeline's last stage (prod), the newest bake of each recipe,
//! and the ancestors of all of those. Every pipeline that shares the ledger or the image store is judged, not only
//! the one gc runs for: one pipeline's gc must never delete another's rollback target. What is deleted is recorded
//! first, so the ledger never points at an image it does not know is gone. The provider then frees what no image
//! uses, leftovers of killed bakes included.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::Context;
use crate::config::{pipeline, LedgerLocation, Pipeline, PIPELINES_DIR};
use crate::digest::Digest;
use crate::ledger::view::stage_key;
use crate::ledger::{Decision, EventBody, Ledger, View};
use crate::provider::{ImageRef, StageRef};
use crate::Error;

#[derive(Debug, Clone, Serialize)]
pub struct GcReport {
    pub deleted: Vec<ImageRef>,
    pub kept: usize,
    /// Images gc would have deleted but kept because something outside the ledger still uses them.
    pub in_use: Vec<InUse>,
    pub bytes_freed: u64,
    pub dry_run: bool,
    pub seq: Option<u64>,
}

/// An image no stage needs that something outside kiln's ledger still uses (AWS: a launch template version).
#[derive(Debug, Clone, Serialize)]
pub struct InUse {
    pub digest: Digest,
    /// What uses it, as the provider names it.
    pub users: Vec<String>,
}

/// The pipelines whose images may be in this context's ledger or image store: every pipeline file in `pipelines/`
/// (the context's own one as loaded), and whether each keeps its record in the context's ledger.
pub struct Sharing {
    /// Pipelines with a file, the context's own first.
    pub pipelines: Vec<Pipeline>,
    /// Pipeline files that do not load, with why: gc cannot judge what they need.
    pub unreadable: Vec<(String, String)>,
    /// Other ledger directories local pipelines record into: their images are in the same store.
    pub other_ledgers: Vec<PathBuf>,
}

fn same_dir(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// Every pipeline that shares the context's image store, loaded from `pipelines/`.
pub fn sharing(ctx: &Context) -> Sharing {
    let mut out = Sharing { pipelines: vec![ctx.pipeline.clone()], unreadable: Vec::new(), other_ledgers: Vec::new() };
    let own_ledger = PathBuf::from(ctx.ledger.location());
    for name in crate::config::toml_stems(&ctx.repo.root().join(PIPELINES_DIR)) {
        if name == ctx.pipeline.name {
            continue;
        }
        match pipeline::load(ctx.repo, &name) {
            Ok(loaded) => out.pipelines.push(loaded),
            Err(err) => out.unreadable.push((name, err.to_string())),
        }
    }
    for other in &out.pipelines {
        if let LedgerLocation::Dir(dir) = &other.ledger {
            let shares_store = other.provider == ctx.pipeline.provider;
            if shares_store && !same_dir(dir, &own_ledger) && !out.other_ledgers.iter().any(|d| same_dir(d, dir)) {
                out.other_ledgers.push(dir.clone());
            }
        }
    }
    out
}

/// What one ledger says must stay: for every pipeline it records (a pipeline whose file is gone included), what
/// each stage has promoted, runs, is deploying or ran before; everything that reached a pipeline's last stage (for
/// a pipeline without a file, which stage is last is unknown, so everything it ever promoted); the newest bake of
/// each recipe.
fn ledger_keeps(view: &View, last_stages: &BTreeMap<String, String>) -> BTreeSet<Digest> {
    let mut keep: BTreeSet<Digest> = view.heads.newest.values().copied().collect();
    for stages in view.heads.pipelines.values() {
        for there in stages.values() {
            keep.extend(there.promoted.iter().map(|m| m.digest));
            keep.extend(there.live.iter().map(|l| l.digest));
            keep.extend(there.open.iter().map(|o| o.digest));
            keep.extend(there.history.iter().map(|l| l.digest));
            // What tools outside kiln read as the stage's image must stay readable.
            keep.extend(there.pointer.iter().map(|m| m.digest));
        }
    }
    for (digest, record) in view.images() {
        // Anything that ever reached prod stays: it is what an incident review or a rollback will ask for.
        let reached_the_end = record.stages.iter().any(|(key, there)| {
            let pipeline = key.split_once('/').map_or(key.as_str(), |(p, _)| p);
            there.promoted.is_some() && last_stages.get(pipeline).is_none_or(|last| last == key)
        });
        if reached_the_end {
            keep.insert(digest);
        }
    }
    keep
}

/// pipeline → its last stage's key (`pipeline/stage`), for the pipelines that have a file.
fn last_stages(pipelines: &[Pipeline]) -> BTreeMap<String, String> {
    pipelines.iter().filter_map(|p| p.stages.last().map(|s| (p.name.clone(), stage_key(&p.name, &s.name)))).collect()
}

/// Everything no pipeline sharing the ledger or the store may lose, ancestors included.
fn keep_set(ctx: &Context, view: &View, shared: &Sharing) -> Result<BTreeSet<Digest>, Error> {
    let last_stages = last_stages(&shared.pipelines);
    let mut keep = ledger_keeps(view, &last_stages);
    for dir in &shared.other_ledgers {
        let other = Ledger::open_dir(dir);
        let other_view = other.view()?;
        for digest in ledger_keeps(&other_view, &last_stages) {
            keep.insert(digest);
            keep.extend(other_view.ancestors(&digest));
        }
    }
    // Groups the provider still holds (parked for rollback, or running) keep their images, whatever the ledger says.
    for pipeline in &shared.pipelines {
        for stage in &pipeline.stages {
            let target = StageRef { pipeline: &pipeline.name, stage };
            keep.extend(ctx.fleet.groups(target)?.iter().map(|g| g.digest));
        }
    }
    let roots: Vec<Digest> = keep.iter().copied().collect();
    for digest in roots {
        keep.extend(view.ancestors(&digest));
    }
    Ok(keep)
}

pub fn collect(ctx: &Context, dry_run: bool) -> Result<GcReport, Error> {
    let shared = sharing(ctx);
    if let Some((name, why)) = shared.unreadable.first() {
        // Deleting on partial knowledge is how another pipeline loses its rollback target.
        return Err(Error::usage(format!(
            "gc judges every pipeline that shares the image store, and pipeline `{name}` does not load ({why}); \
             fix or remove pipelines/{name}.toml, then run `kiln gc` again"
        )));
    }
    let view = ctx.ledger.view()?;
    let keep = keep_set(ctx, &view, &shared)?;
    let images = view.images();
    let mut doomed: Vec<ImageRef> = Vec::new();
    let mut in_use: Vec<InUse> = Vec::new();
    for (digest, record) in &images {
        if keep.contains(digest) || record.deleted || record.provider != ctx.images.name() {
            continue;
        }
        let image = record.image(*digest);
        // A provider that cannot say whether it holds the image stops gc: guessing either way deletes blindly or
        // records a deletion that did not happen.
        if !ctx.images.has_image(&image)? {
            continue;
        }
        // The ledger does not know everything that runs an image: deleting one a launch template still names
        // breaks the next scale-out of a group kiln never made.
        let users = ctx.images.image_users(&image)?;
        if users.is_empty() {
            doomed.push(image);
        } else {
            in_use.push(InUse { digest: *digest, users });
        }
    }
    let kept = images.len() - doomed.len();
    if dry_run {
        return Ok(GcReport { deleted: doomed, kept, in_use, bytes_freed: 0, dry_run, seq: None });
    }
    if doomed.is_empty() {
        // Nothing to record, but the provider may still hold leftovers of killed bakes.
        let bytes_freed = ctx.images.collect_garbage()?;
        return Ok(GcReport { deleted: doomed, kept, in_use, bytes_freed, dry_run, seq: None });
    }
    let digests: Vec<Digest> = doomed.iter().map(|i| i.digest).collect();
    let (_, stored) = ctx.ledger.append::<(), Error>(ctx.actor, ctx.clock, |view| {
        // A stage of any pipeline may have moved to one of these since the plan was made: then gc does nothing.
        for stages in view.heads.pipelines.values() {
            for there in stages.values() {
                let busy = [
                    there.promoted.as_ref().map(|m| m.digest),
                    there.live.as_ref().map(|l| l.digest),
                    there.open.as_ref().map(|o| o.digest),
                ];
                if busy.iter().flatten().any(|d| digests.contains(d)) {
                    return Err(Error::usage("a stage moved to an image gc meant to delete; run `kiln gc` again"));
                }
            }
        }
        Ok(Decision::Append(
            Box::new(EventBody::Collected { pipeline: ctx.pipeline.name.clone(), digests: digests.clone() }),
            (),
        ))
    })?;
    for image in &doomed {
        ctx.images.delete_image(image)?;
    }
    let bytes_freed = ctx.images.collect_garbage()?;
    Ok(GcReport { deleted: doomed, kept, in_use, bytes_freed, dry_run, seq: stored.map(|s| s.event.seq) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{Event, StoredEvent};

    fn folded(bodies: Vec<EventBody>) -> View {
        let mut view = View::empty(None, true);
        for (n, body) in bodies.into_iter().enumerate() {
            let event = Event {
                seq: n as u64 + 1,
                prev: Digest::ZERO,
                time: "2026-01-01T00:00:00.000Z".into(),
                actor: "t".into(),
                clock: None,
                body,
            };
            view.apply(&StoredEvent { event, hash: Digest::ZERO });
        }
        view
    }

    fn baked(digest: Digest) -> EventBody {
        EventBody::Baked {
            pipeline: "p".into(),
            recipe: "app".into(),
            digest,
            recipe_key: digest,
            parent: None,
            provider: "local".into(),
            image_ref: "app:x".into(),
            commit: None,
            dirty: false,
            copies: Vec::new(),
            instance: None,
        }
    }

    fn promoted(pipeline: &str, stage: &str, digest: Digest) -> EventBody {
        EventBody::Promoted { pipeline: pipeline.into(), stage: stage.into(), digest, gates: vec![] }
    }

    #[test]
    fn an_image_something_outside_the_ledger_uses_is_kept_and_reported() {
        use crate::clock::Clock;
        let world = crate::engine::fixture::Fixture::new(&[
            ("images/app.toml", "description = \"app\"\n"),
            ("pipelines/app.toml", "image = \"app\"\n[[stage]]\nname = \"dev\"\ndeploy = { port = 30997 }\n"),
        ]);
        let (ledger, memory) = (&world.ledger, &world.memory);
        let clock = Clock::system();
        // Three bakes of one recipe: the newest stays; of the two older ones, a launch template uses `used`.
        let [unused, used, newest] = [&b"unused"[..], b"used", b"newest"].map(Digest::of);
        for digest in [unused, used, newest] {
            memory.add_image(digest);
            let mut body = baked(digest);
            if let EventBody::Baked { provider, .. } = &mut body {
                *provider = "memory".into();
            }
            ledger.append::<(), Error>("t", &clock, |_| Ok(Decision::Append(Box::new(body.clone()), ()))).unwrap();
        }
        memory.add_user(used, "launch template lt-0abc version 3");
        let planned = world.run(|ctx| collect(ctx, true)).unwrap();
        let digests = |images: &[ImageRef]| images.iter().map(|i| i.digest).collect::<Vec<_>>();
        assert_eq!(digests(&planned.deleted), [unused]);
        assert_eq!(planned.in_use.len(), 1);
        assert_eq!(planned.in_use[0].digest, used);
        assert_eq!(planned.in_use[0].users, ["launch template lt-0abc version 3"]);
        assert_eq!(planned.kept, 2);
        let done = world.run(|ctx| collect(ctx, false)).unwrap();
        assert_eq!(digests(&done.deleted), [unused]);
        assert_eq!(done.in_use.len(), 1);
        let view = ledger.view().unwrap();
        assert!(view.image(&unused).unwrap().deleted);
        assert!(!view.image(&used).unwrap().deleted, "the image in use is not recorded as collected");
        use crate::provider::ImageProvider;
        assert!(memory.has_image(&ImageRef::new(used, "memory:used")).unwrap());
        assert!(!memory.has_image(&ImageRef::new(unused, "memory:unused")).unwrap());
    }

    #[test]
    fn what_a_stage_pointer_names_is_kept() {
        let [named, other] = [b"named", b"other"].map(|b| Digest::of(b));
        let pointed = EventBody::PointerPublished {
            pipeline: "p".into(),
            stage: "prod".into(),
            digest: named,
            pointer: "p-prod".into(),
        };
        // `other` is the newest bake; only the pointer names `named`.
        let view = folded(vec![baked(named), baked(other), pointed]);
        let files = BTreeMap::from([("p".to_string(), stage_key("p", "prod"))]);
        let keep = ledger_keeps(&view, &files);
        assert!(keep.contains(&named), "{keep:?}");
    }

    #[test]
    fn a_pipeline_without_a_file_keeps_everything_it_ever_promoted() {
        let [old, mid, new] = [b"old", b"mid", b"new"].map(|b| Digest::of(b));
        let view = folded(vec![
            baked(old),
            baked(mid),
            baked(new),
            promoted("gone", "dev", old),
            promoted("gone", "dev", mid),
        ]);
        // `gone` has no file: which of its stages was last is unknown, so `old` (promoted to its dev once) stays.
        let keep = ledger_keeps(&view, &BTreeMap::new());
        assert!(keep.contains(&old) && keep.contains(&mid) && keep.contains(&new), "{keep:?}");
        // With files whose last stage is `prod`, an image only ever promoted to dev and since replaced may go.
        let files = BTreeMap::from([("gone".to_string(), stage_key("gone", "prod"))]);
        let keep = ledger_keeps(&view, &files);
        assert!(!keep.contains(&old), "{keep:?}");
        assert!(keep.contains(&mid) && keep.contains(&new), "{keep:?}");
    }
}
