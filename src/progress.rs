//! Progress on long waits (bake steps, instances becoming healthy, drain, the verification window). The engine and
//! the providers print nothing: they report here, and the CLI draws bars on a terminal or writes plain log lines in
//! CI.

/// Receives progress of one long wait at a time.
pub trait Progress {
    /// A wait begins: `what` says what kiln waits for; `total` is the count it waits to reach, when there is one.
    fn begin(&self, what: &str, total: Option<u64>);
    /// How far it got (`done` of the total), with a short status.
    fn update(&self, done: u64, status: &str);
    /// The wait ended; `outcome` says how.
    fn end(&self, outcome: &str);
}

/// Reports nothing (library callers, tests, `--quiet`).
pub struct Silent;

impl Progress for Silent {
    fn begin(&self, _what: &str, _total: Option<u64>) {}
    fn update(&self, _done: u64, _status: &str) {}
    fn end(&self, _outcome: &str) {}
}
