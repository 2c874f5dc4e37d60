//! Bake: build the pipeline's recipe chain root first, reusing every image whose recipe key the ledger already
//! has (the bake cache), and record each new image in a `baked` event.

use std::collections::BTreeMap;

use serde::Serialize;

use super::recipe_key::{FileHasher, KeyInputs, KEY_FORMAT};
use super::Context;
use crate::config::{recipe, Instance};
use crate::digest::Digest;
use crate::ledger::{Decision, EventBody};
use crate::provider::{BakeJob, ImageRef, Reproduction};
use crate::Error;

pub const LABEL_REVISION: &str = "org.opencontainers.image.revision";
pub const LABEL_SOURCE: &str = "org.opencontainers.image.source";
pub const LABEL_TITLE: &str = "org.opencontainers.image.title";
pub const LABEL_RECIPE_KEY: &str = "dev.kiln.recipe-key";
pub const LABEL_PARENT: &str = "dev.kiln.parent";

#[derive(Debug, Clone, Default)]
pub struct BakeOptions {
    pub no_cache: bool,
    pub allow_dirty: bool,
    pub check: bool,
    /// Resolve what the chain depends on outside the repository again (AWS: the base AMI into `kiln.lock`).
    pub update_base: bool,
}

/// One image of the chain, as this bake found or made it.
#[derive(Debug, Clone, Serialize)]
pub struct BakedImage {
    pub recipe: String,
    pub digest: Digest,
    pub recipe_key: Digest,
    pub image_ref: String,
    pub parent: Option<Digest>,
    /// True when the image came from the bake cache and nothing was built.
    pub cached: bool,
    /// The `baked` event, when this bake recorded one.
    pub seq: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BakeReport {
    /// Root first; the last is the pipeline's image.
    pub chain: Vec<BakedImage>,
    pub commit: Option<String>,
    pub dirty: bool,
    /// Files whose content had to be read to compute keys (the rest came from the stat cache).
    pub files_hashed: usize,
    /// With --check: the chain was rebuilt from nothing and matched.
    pub reproducible: Option<bool>,
}

impl BakeReport {
    pub fn image(&self) -> &BakedImage {
        self.chain.last().expect("a recipe chain has at least one recipe")
    }
}

/// What `kiln bake --plan` shows: the calls a bake would make, in order, and none made.
#[derive(Debug, Clone, Serialize)]
pub struct BakePlan {
    /// The calls that settle what the chain depends on outside the repository (AWS: resolving base AMIs), before
    /// any recipe key.
    pub prepare: Vec<String>,
    /// Root first.
    pub plan: Vec<PlannedRecipe>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedRecipe {
    pub recipe: String,
    /// Null when it cannot be known before baking: see `unknown_because`.
    pub recipe_key: Option<Digest>,
    /// Why the recipe key is unknown (a base not resolved yet, a parent not baked yet); null when it is known.
    pub unknown_because: Option<String>,
    /// The ledger has an image for the key: the bake would reuse it if the provider still holds it.
    pub cached: bool,
    /// That image, when cached.
    pub digest: Option<Digest>,
    pub calls: Vec<String>,
}

/// The calls a bake of the pipeline's chain would make, without making any: keys are computed from local state
/// only (the files, the ledger, the lock file), and a recipe whose key depends on something not settled yet (a
/// base AMI to resolve, a parent to build) is planned as a build with its key unknown.
pub fn plan(ctx: &Context, options: &BakeOptions) -> Result<BakePlan, Error> {
    let chain = recipe::load_chain(ctx.repo, &ctx.pipeline.image)?;
    let prepare = ctx.images.prepare_bake(&chain, options.update_base, true)?;
    let tracked = crate::git::Tracked::load(ctx.repo.root())?;
    // Not saved: a plan leaves kiln's state as it found it.
    let mut hasher = FileHasher::open(Some(ctx.state_dir.join("cache").join("stat.json")));
    let view = ctx.ledger.view()?;
    // The parent's digest, once known: it is part of the child's key. With --update-base, a root's key names the
    // base as it will be resolved, which only the calls listed in `prepare` can tell.
    let mut parent: Result<Option<Digest>, String> = if options.update_base && !prepare.is_empty() {
        Err("--update-base resolves the base again before the key is computed".into())
    } else {
        Ok(None)
    };
    let mut planned = Vec::with_capacity(chain.len());
    for recipe in &chain {
        let key = match (&parent, ctx.images.build_settings(recipe)) {
            (Err(why), _) => Err(why.clone()),
            (Ok(_), Err(err)) => Err(format!("the provider's build settings are not settled yet ({err})")),
            (Ok(parent_digest), Ok(settings)) => {
                let files = hasher.recipe_files(recipe, tracked.as_ref())?;
                Ok(KeyInputs {
                    kiln_key_format: KEY_FORMAT,
                    recipe_name: &recipe.name,
                    recipe,
                    parent_digest: *parent_digest,
                    provider: ctx.images.name(),
                    provider_settings: settings,
                    files: &files,
                }
                .digest())
            }
        };
        let recorded = key
            .as_ref()
            .ok()
            .filter(|_| !options.no_cache)
            .and_then(|key| view.image_for_key(key))
            .and_then(|digest| view.image(&digest).map(|r| (digest, r)))
            .filter(|(_, record)| !record.deleted)
            .map(|(digest, record)| record.image(digest));
        let calls = ctx.images.plan_bake(recipe, recorded.as_ref());
        parent = match (&key, &recorded) {
            (Err(_), _) => Err(format!("its parent `{}` has no recipe key yet", recipe.name)),
            (Ok(_), None) => Err(format!("its parent `{}` is not baked yet", recipe.name)),
            (Ok(_), Some(image)) => Ok(Some(image.digest)),
        };
        planned.push(PlannedRecipe {
            recipe: recipe.name.clone(),
            recipe_key: key.as_ref().ok().copied(),
            unknown_because: key.err(),
            cached: recorded.is_some(),
            digest: recorded.map(|image| image.digest),
            calls,
        });
    }
    if let Some(err) = view.take_failure() {
        return Err(err.into());
    }
    Ok(BakePlan { prepare, plan: planned })
}

pub fn bake(ctx: &Context, options: &BakeOptions) -> Result<BakeReport, Error> {
    let chain = recipe::load_chain(ctx.repo, &ctx.pipeline.image)?;
    // What the keys depend on outside the repository is settled first (AWS: the base AMI in kiln.lock).
    ctx.images.prepare_bake(&chain, options.update_base, false)?;
    // Asking git costs a walk of the work tree, and only a bake that records something needs the answer; a
    // cache hit records nothing, so it does not ask.
    let mut source_state: Option<crate::git::SourceState> = None;
    let mut source = |options: &BakeOptions| -> Result<crate::git::SourceState, Error> {
        if let Some(known) = &source_state {
            return Ok(known.clone());
        }
        let found = crate::git::inspect(ctx.repo.root())?;
        if found.dirty() && !options.allow_dirty {
            return Err(Error::DirtyTree { paths: found.dirty_paths.clone() });
        }
        source_state = Some(found.clone());
        Ok(found)
    };
    let started = std::time::Instant::now();
    let tracked = crate::git::Tracked::load(ctx.repo.root())?;
    tracing::debug!(ms = started.elapsed().as_secs_f64() * 1000.0, "git index read");
    let mut hasher = FileHasher::open(Some(ctx.state_dir.join("cache").join("stat.json")));
    tracing::debug!(ms = started.elapsed().as_secs_f64() * 1000.0, "stat cache loaded");
    let mut parent: Option<ImageRef> = None;
    // A recipe without [instance] starts its instances the way its nearest ancestor's do.
    let mut inherited_instance: Option<Instance> = None;
    let mut baked = Vec::with_capacity(chain.len());
    let mut jobs = Vec::with_capacity(chain.len());
    for recipe in &chain {
        let files = hasher.recipe_files(recipe, tracked.as_ref())?;
        // Hashing a large tree takes a while; a Ctrl-C during it must not end in a cache hit and exit 0.
        interruption(&recipe.name)?;
        tracing::debug!(ms = started.elapsed().as_secs_f64() * 1000.0, files = files.len(), recipe = %recipe.name, "inputs hashed");
        let key = KeyInputs {
            kiln_key_format: KEY_FORMAT,
            recipe_name: &recipe.name,
            recipe,
            parent_digest: parent.as_ref().map(|p| p.digest),
            provider: ctx.images.name(),
            provider_settings: ctx.images.build_settings(recipe)?,
            files: &files,
        }
        .digest();
        tracing::debug!(ms = started.elapsed().as_secs_f64() * 1000.0, "recipe key computed");
        let view = ctx.ledger.view()?;
        let recorded = view
            .image_for_key(&key)
            .and_then(|digest| view.image(&digest).map(|r| (digest, r)))
            .filter(|(_, record)| !record.deleted);
        drop(view);
        let cached = match recorded {
            // Asking the provider may cost a call (AWS); --no-cache will not use the answer.
            Some((digest, record)) if !options.no_cache => {
                ctx.images.has_image(&record.image(digest))?.then_some((digest, record))
            }
            _ => None,
        };
        let instance = recipe.instance.clone().or(inherited_instance.take());
        inherited_instance = instance.clone();
        let this = match cached {
            Some((digest, record)) => {
                tracing::info!(recipe = %recipe.name, "cache hit: {} ({})", digest.short(), record.image_ref);
                let this = BakedImage {
                    recipe: recipe.name.clone(),
                    digest,
                    recipe_key: key,
                    image_ref: record.image_ref.clone(),
                    parent: parent.as_ref().map(|p| p.digest),
                    cached: true,
                    seq: None,
                };
                (this, record.image(digest))
            }
            _ => {
                let source = source(options)?;
                let mut labels = BTreeMap::from([
                    (LABEL_TITLE.to_string(), recipe.name.clone()),
                    (LABEL_RECIPE_KEY.to_string(), key.to_string()),
                ]);
                // The commit and origin stay out of the image: inside it they would give every commit its own
                // digest for the same recipe key, and every child a new key.
                let mut annotations = BTreeMap::new();
                if let Some(commit) = &source.commit {
                    annotations.insert(LABEL_REVISION.to_string(), commit.clone());
                }
                if let Some(origin) = &source.origin {
                    annotations.insert(LABEL_SOURCE.to_string(), origin.clone());
                }
                if let Some(p) = &parent {
                    labels.insert(LABEL_PARENT.into(), p.digest.to_string());
                }
                tracing::info!(recipe = %recipe.name, "baking (recipe key {})", key.short());
                let job = BakeJob {
                    recipe,
                    recipe_key: key,
                    parent: parent.clone(),
                    labels: labels.clone(),
                    annotations,
                    inputs: &files,
                    echo_output: ctx.echo,
                    progress: ctx.progress,
                };
                let image = ctx.images.bake(&job).map_err(|err| interrupted_bake(&recipe.name, err))?;
                interruption(&recipe.name)?;
                let seq = record(
                    ctx,
                    Recorded { recipe: recipe.name.clone(), key, parent: parent.as_ref().map(|p| p.digest), instance },
                    &image,
                    &source,
                )?;
                tracing::info!(recipe = %recipe.name, "baked {} ({})", image.digest, image.image_ref);
                let this = BakedImage {
                    recipe: recipe.name.clone(),
                    digest: image.digest,
                    recipe_key: key,
                    image_ref: image.image_ref.clone(),
                    parent: parent.as_ref().map(|p| p.digest),
                    cached: false,
                    seq,
                };
                (this, image)
            }
        };
        let (this, image) = this;
        parent = Some(image);
        jobs.push((recipe, key, files));
        baked.push(this);
    }
    hasher.save();
    tracing::debug!(ms = started.elapsed().as_secs_f64() * 1000.0, "stat cache saved");

    let mut reproducible = None;
    if options.check {
        // Rebuild with the labels each image was recorded with, so only the build itself can differ.
        let mut check_jobs = Vec::with_capacity(jobs.len());
        for ((recipe, key, files), image) in jobs.iter().zip(&baked) {
            let image_ref = ImageRef::new(image.digest, image.image_ref.clone());
            let labels = ctx.images.image_labels(&image_ref)?;
            let job = BakeJob {
                recipe,
                recipe_key: *key,
                parent: None,
                labels,
                annotations: BTreeMap::new(),
                inputs: files,
                echo_output: ctx.echo,
                progress: ctx.progress,
            };
            check_jobs.push((job, image.digest));
        }
        let rebuilt = ctx.images.check_reproducible(&check_jobs).map_err(|err| {
            let last = chain.last().map_or("", |r| r.name.as_str());
            interruption(last).err().unwrap_or(Error::from(err))
        })?;
        match rebuilt {
            Reproduction::Identical => reproducible = Some(true),
            Reproduction::Differs { recipe, expected, rebuilt, first_difference } => {
                return Err(Error::NotReproducible { recipe, expected, rebuilt, first_difference })
            }
        }
    }
    // What the report says of the source: this work tree when something was baked, else the recorded image's.
    let (commit, dirty) = match &source_state {
        Some(state) => (state.commit.clone(), state.dirty()),
        None => {
            let view = ctx.ledger.view()?;
            let record = baked.last().and_then(|image| view.image(&image.digest));
            (record.as_ref().and_then(|r| r.commit.clone()), record.is_some_and(|r| r.dirty))
        }
    };
    Ok(BakeReport { chain: baked, commit, dirty, files_hashed: hasher.files_hashed(), reproducible })
}

/// The `[instance]` section an image's instances start with: as its `baked` event recorded it, else (an image
/// baked before events recorded it) as the provider stored it with the image. The ledger comes first because a
/// provider may have no room for it (AMI tags hold 256 characters).
pub fn instance_of(ctx: &Context, image: &ImageRef) -> Result<Option<Instance>, Error> {
    if let Some(recorded) = ctx.ledger.view()?.image(&image.digest).and_then(|r| r.instance) {
        return Ok(Some(recorded));
    }
    Ok(ctx.images.instance_of(image)?)
}

/// A failed provider bake, as the interruption it was when Ctrl-C caused it: with the provider's own account of
/// what it undid when it gives one (AWS: the builder it terminated), else the local provider's.
fn interrupted_bake(recipe: &str, err: crate::provider::ProviderError) -> Error {
    match err {
        crate::provider::ProviderError::Interrupted { aftermath } => {
            Error::Interrupted { during: format!("the bake of recipe `{recipe}`"), aftermath }
        }
        err => interruption(recipe).err().unwrap_or(Error::from(err)),
    }
}

/// Fails once SIGINT or SIGTERM has arrived (when the CLI catches them), so the bake unwinds and cleans up.
fn interruption(recipe: &str) -> Result<(), Error> {
    if crate::process::interrupted() {
        return Err(Error::Interrupted {
            during: format!("the bake of recipe `{recipe}`"),
            aftermath: "stopped it and removed its temporary files".into(),
        });
    }
    Ok(())
}

/// What the engine knows of a new image beyond what the provider returned.
struct Recorded {
    recipe: String,
    key: Digest,
    parent: Option<Digest>,
    instance: Option<Instance>,
}

/// Records a `baked` event unless another writer recorded this image for this key meanwhile.
fn record(
    ctx: &Context,
    recorded: Recorded,
    image: &ImageRef,
    source: &crate::git::SourceState,
) -> Result<Option<u64>, Error> {
    let Recorded { recipe, key, parent, instance } = recorded;
    let body = EventBody::Baked {
        pipeline: ctx.pipeline.name.clone(),
        recipe,
        digest: image.digest,
        recipe_key: key,
        parent,
        provider: ctx.images.name().to_string(),
        image_ref: image.image_ref.clone(),
        commit: source.commit.clone(),
        dirty: source.dirty(),
        copies: image.copies.clone(),
        instance,
    };
    let (_, stored) = ctx.ledger.append::<(), Error>(ctx.actor, ctx.clock, |view| {
        let recorded = view.image(&image.digest).is_some_and(|r| !r.deleted);
        if recorded && view.image_for_key(&key) == Some(image.digest) {
            return Ok(Decision::Skip(()));
        }
        Ok(Decision::Append(Box::new(body.clone()), ()))
    })?;
    Ok(stored.map(|s| s.event.seq))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::Clock;
    use crate::engine::fixture::Fixture;
    use crate::provider::memory::test_instance;

    fn baked(digest: Digest, instance: Option<Instance>) -> EventBody {
        EventBody::Baked {
            pipeline: "app".into(),
            recipe: "app".into(),
            digest,
            recipe_key: digest,
            parent: None,
            provider: "memory".into(),
            image_ref: format!("memory:{}", digest.short()),
            commit: None,
            dirty: false,
            copies: Vec::new(),
            instance,
        }
    }

    #[test]
    fn the_instance_section_comes_from_the_ledger_and_from_the_provider_only_for_older_images() {
        let world = Fixture::new(&[
            ("images/app.toml", "description = \"app\"\n"),
            ("pipelines/app.toml", "image = \"app\"\n[[stage]]\nname = \"dev\"\ndeploy = { port = 30998 }\n"),
        ]);
        let (ledger, memory) = (&world.ledger, &world.memory);
        let clock = Clock::system();
        let append = |body: EventBody| {
            ledger.append::<(), Error>("t", &clock, |_| Ok(Decision::Append(Box::new(body.clone()), ()))).unwrap();
        };
        // Baked before events recorded the section: the provider's own record of it (the local label) answers.
        let older = Digest::of(b"older");
        memory.add_image(older);
        append(baked(older, None));
        assert_eq!(world.run(|ctx| instance_of(ctx, &ImageRef::new(older, "o"))).unwrap(), Some(test_instance()));
        // Recorded in the ledger: the provider, which here stores nothing (like AMI tags), is not needed.
        let recorded = Digest::of(b"recorded");
        let mut instance = test_instance();
        instance.command = vec!["/bin/recorded".into()];
        append(baked(recorded, Some(instance.clone())));
        assert_eq!(world.run(|ctx| instance_of(ctx, &ImageRef::new(recorded, "r"))).unwrap(), Some(instance));
    }

    #[test]
    fn a_plan_without_a_settled_base_says_so_and_leaves_every_later_key_unknown() {
        use crate::provider::inject::{Fault, Rule};
        let world = Fixture::new(&[
            ("images/base.toml", "description = \"base\"\n"),
            ("images/app.toml", "parent = \"base\"\ndescription = \"app\"\n"),
            ("pipelines/app.toml", "image = \"app\"\n[[stage]]\nname = \"dev\"\ndeploy = { port = 30996 }\n"),
        ]);
        let (ledger, injector) = (&world.ledger, &world.injector);
        // The root's build settings name a base that is not resolved yet (AWS: no kiln.lock entry).
        injector.add(Rule { call: "build_settings".into(), nth: Some(1), fault: Fault::Fail("no base yet".into()) });
        let plan = world.run(|ctx| plan(ctx, &BakeOptions::default())).unwrap();
        let [base, app] = &plan.plan[..] else { panic!("{plan:?}") };
        assert_eq!(base.recipe_key, None);
        let why = base.unknown_because.clone().unwrap_or_default();
        assert!(why.starts_with("the provider's build settings are not settled yet") && why.contains("no base yet"));
        assert_eq!(app.recipe_key, None);
        assert_eq!(app.unknown_because.as_deref(), Some("its parent `base` has no recipe key yet"));
        assert_eq!(base.calls, ["memory: build recipe `base`"]);
        assert!(!base.cached && !app.cached);
        // Nothing but the offline answers was asked: no cache probe, no bake.
        let asked: Vec<String> = injector.counts().into_keys().collect();
        assert_eq!(asked, ["build_settings", "prepare_bake"]);
        assert_eq!(ledger.view().unwrap().seq(), 0, "a plan records nothing");
    }
}
