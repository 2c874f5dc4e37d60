//! The provider-agnostic algorithms: bake, gates, promote, deploy, rollback, lineage. They read and append the
//! ledger and reach images and instances only through the provider traits.

pub mod approval;
pub mod bake;
pub mod deploy;
pub mod diff;
pub mod drift;
pub mod drill;
#[cfg(test)]
pub(crate) mod fixture;
pub mod gate;
pub mod gc;
pub mod lineage;
pub mod metrics;
pub mod outdated;
pub mod promote;
pub mod recipe_key;
pub mod report;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

use crate::clock::Clock;
use crate::config::{Pipeline, Repo};
use crate::ledger::Ledger;
use crate::provider::{Fleet, ImageProvider};

/// Everything an engine operation works with.
pub struct Context<'a> {
    pub repo: &'a Repo,
    pub pipeline: &'a Pipeline,
    pub ledger: &'a Ledger,
    pub clock: &'a Clock,
    pub actor: &'a str,
    pub images: &'a dyn ImageProvider,
    pub fleet: &'a dyn Fleet,
    /// kiln's local state (`.kiln/`): caches, local provider stores.
    pub state_dir: PathBuf,
    /// Echo provisioning output to stderr as it runs.
    pub echo: bool,
    /// Who holds a stage lease this context takes: `host:pid:start-time` for a kiln process.
    pub lease_holder: String,
    /// Where long waits report how far they got.
    pub progress: &'a dyn crate::progress::Progress,
}
