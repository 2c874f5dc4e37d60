//! The library's error type: one variant per kind of failure, each carrying what a user needs to act on it. The
//! CLI maps these to exit codes in one place (`cli/exit.rs`).

use std::path::PathBuf;

use crate::clock::BadTime;
use crate::config::ConfigError;
use crate::digest::DigestError;
use crate::ledger::LedgerError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error(transparent)]
    Clock(#[from] BadTime),
    #[error("`kiln {command}` is not implemented yet")]
    NotImplemented { command: &'static str },
    #[error("{message}")]
    Usage { message: String },
    #[error("cannot access {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn usage(message: impl Into<String>) -> Error {
        Error::Usage { message: message.into() }
    }

    pub fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
        let path = path.into();
        move |source| Error::Io { path, source }
    }
}
