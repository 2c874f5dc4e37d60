//! Ancestry outdated: images live or promoted in a stage that are built on a base image that a newer bake of the
//! same base recipe has superseded, as HCP Packer reports. Read from the ledger view alone.

use serde::Serialize;

use crate::digest::Digest;
use crate::ledger::View;

/// One stage image built on a superseded ancestor.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Outdated {
    pub pipeline: String,
    pub stage: String,
    pub digest: Digest,
    /// The stage runs it (its last healthy deployment).
    pub live: bool,
    /// It is the stage's promoted image (what the next deployment brings).
    pub promoted: bool,
    /// The ancestor's recipe, and the ancestor image the stage image was built on.
    pub ancestor_recipe: String,
    pub ancestor_digest: Digest,
    /// The newest bake of `ancestor_recipe`.
    pub newer_digest: Digest,
}

/// The outdated images of `stages` (in that order) of `pipeline`: for each live or promoted image, one entry per
/// ancestor (nearest first) whose recipe has been baked again since, to a different image.
pub fn outdated(view: &View, pipeline: &str, stages: &[String]) -> Vec<Outdated> {
    let mut out = Vec::new();
    for stage in stages {
        let Some(state) = view.stage(pipeline, stage) else { continue };
        let live = state.live.as_ref().map(|l| l.digest);
        let promoted = state.promoted.as_ref().map(|p| p.digest);
        let mut images: Vec<Digest> = live.into_iter().collect();
        images.extend(promoted.filter(|p| Some(*p) != live));
        for digest in images {
            for ancestor in view.ancestors(&digest) {
                let Some(record) = view.image(&ancestor) else { continue };
                let Some(newest) = view.heads.newest.get(&record.recipe) else { continue };
                // Newer: baked after the ancestor. (Re-baking an image gc deleted names the same digest again.)
                let newer = *newest != ancestor && view.image(newest).is_some_and(|n| n.seq > record.seq);
                if newer {
                    out.push(Outdated {
                        pipeline: pipeline.to_string(),
                        stage: stage.clone(),
                        digest,
                        live: live == Some(digest),
                        promoted: promoted == Some(digest),
                        ancestor_recipe: record.recipe.clone(),
                        ancestor_digest: ancestor,
                        newer_digest: *newest,
                    });
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::view::tests::fold;
    use crate::ledger::EventBody;

    fn bake(view: &mut View, recipe: &str, name: &str, parent: Option<Digest>) -> Digest {
        let digest = Digest::of(name.as_bytes());
        fold(
            view,
            EventBody::Baked {
                pipeline: "hello".into(),
                recipe: recipe.into(),
                digest,
                recipe_key: Digest::of(format!("key {name}").as_bytes()),
                parent,
                provider: "local".into(),
                image_ref: name.into(),
                commit: None,
                dirty: false,
                copies: vec![],
                instance: None,
            },
        );
        digest
    }

    fn promote(view: &mut View, stage: &str, digest: Digest) {
        let body = EventBody::Promoted { pipeline: "hello".into(), stage: stage.into(), digest, gates: vec![] };
        fold(view, body);
    }

    fn deploy(view: &mut View, stage: &str, digest: Digest) {
        let id = format!("d{}", view.seq());
        fold(
            view,
            EventBody::DeployFinished {
                pipeline: "hello".into(),
                stage: stage.into(),
                deploy_id: id,
                digest,
                group: format!("hello-{stage}-v001"),
            },
        );
    }

    fn stages() -> Vec<String> {
        vec!["dev".into(), "prod".into()]
    }

    #[test]
    fn a_stage_image_on_a_superseded_base_is_outdated_until_the_stage_moves_on() {
        let mut view = View::empty(None, true);
        let os = bake(&mut view, "os", "os-1", None);
        let base = bake(&mut view, "base", "base-1", Some(os));
        let app = bake(&mut view, "hello", "hello-1", Some(base));
        promote(&mut view, "dev", app);
        deploy(&mut view, "dev", app);
        assert_eq!(outdated(&view, "hello", &stages()), vec![], "nothing newer yet");

        // The base recipe is baked again; the app on it too, but dev still runs (and is promoted to) the old app.
        let base2 = bake(&mut view, "base", "base-2", Some(os));
        let app2 = bake(&mut view, "hello", "hello-2", Some(base2));
        let found = outdated(&view, "hello", &stages());
        assert_eq!(
            found,
            vec![Outdated {
                pipeline: "hello".into(),
                stage: "dev".into(),
                digest: app,
                live: true,
                promoted: true,
                ancestor_recipe: "base".into(),
                ancestor_digest: base,
                newer_digest: base2,
            }],
            "only the superseded ancestor, not the unchanged os, nor hello's own newer bake"
        );

        // Promoted but not deployed yet: the live image is still outdated, the promoted one is not.
        promote(&mut view, "dev", app2);
        let found = outdated(&view, "hello", &stages());
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].digest, found[0].live, found[0].promoted), (app, true, false));

        deploy(&mut view, "dev", app2);
        assert_eq!(outdated(&view, "hello", &stages()), vec![]);
    }

    #[test]
    fn every_superseded_ancestor_is_named() {
        let mut view = View::empty(None, true);
        let os = bake(&mut view, "os", "os-1", None);
        let base = bake(&mut view, "base", "base-1", Some(os));
        let app = bake(&mut view, "hello", "hello-1", Some(base));
        deploy(&mut view, "prod", app);
        let os2 = bake(&mut view, "os", "os-2", None);
        let base2 = bake(&mut view, "base", "base-2", Some(os2));
        let found = outdated(&view, "hello", &stages());
        let named: Vec<(&str, Digest, Digest)> =
            found.iter().map(|o| (o.ancestor_recipe.as_str(), o.ancestor_digest, o.newer_digest)).collect();
        assert_eq!(named, vec![("base", base, base2), ("os", os, os2)], "nearest ancestor first");
        assert!(found.iter().all(|o| o.stage == "prod" && o.live && !o.promoted));
    }
}
