//! What `--plan` says the local provider would do for a promotion or a deployment: files under `.kiln/` and
//! processes on this machine, described without touching either.

use crate::provider::{DeploySketch, GroupStart, ImageRef, StageRef};

pub fn promote(stage: StageRef, image: &ImageRef, _protect: bool) -> Vec<String> {
    // The local store has one region and nothing to protect: a promotion checks the image and moves the pointer.
    vec![
        format!("local: re-hash the blobs of {} in .kiln/oci (the content gate)", image.image_ref),
        format!(
            "local: tag {} as {} in .kiln/oci (the stage pointer)",
            image.digest.short(),
            super::pointer_name(stage)
        ),
    ]
}

pub fn deploy(stage: StageRef, sketch: &DeploySketch) -> Vec<String> {
    let name = &stage.stage.name;
    let group = &sketch.group;
    let mut calls = vec![format!("local: read the groups of {name} and the routes of its proxy")];
    if sketch.pointer_first {
        calls.push(format!(
            "local: tag {} as {} in .kiln/oci (the stage pointer)",
            sketch.image.digest.short(),
            super::pointer_name(stage)
        ));
    }
    match sketch.start {
        GroupStart::Live => {
            calls.push(format!(
                "local: check {group} runs {} instance(s) and the proxy is up; start what is missing (nothing else)",
                stage.stage.capacity
            ));
            return calls;
        }
        GroupStart::New => calls.push(format!(
            "local: unpack {} and start {} instance(s) of {group}, each on its own port",
            sketch.image.image_ref, stage.stage.capacity
        )),
        GroupStart::Reenabled => {
            calls.push(format!("local: start {} instance(s) of the kept group {group}", stage.stage.capacity))
        }
    }
    calls.push(format!("local: health-check {group}'s instances, polled until all are healthy"));
    calls.push(format!("local: start the proxy of {name} if it is down, and route it to {group}"));
    if let Some(previous) = &sketch.previous {
        calls.push(format!("local: wait until {previous} serves no request in flight"));
    }
    if sketch.verify {
        calls.push(format!("local: run the verification checks through the window, polling {group}'s health"));
    }
    calls.extend(sketch.park.iter().map(|g| format!("local: stop the instances of {g} (kept for rollback)")));
    calls.extend(sketch.destroy.iter().map(|g| format!("local: stop {g} and delete its files")));
    calls
}
