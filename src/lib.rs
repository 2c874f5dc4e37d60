//! kiln: bake immutable images, name them by content, promote the exact same image through gated stages, and
//! deploy by replacing whole groups of instances, with every step in a tamper-evident ledger.

pub mod actor;
pub mod clock;
pub mod config;
pub mod digest;
pub mod engine;
pub mod error;
pub mod fault;
pub mod fsutil;
pub mod git;
pub mod ledger;
pub mod process;
pub mod progress;
pub mod provider;

pub use error::Error;
