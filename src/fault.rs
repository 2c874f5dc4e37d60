//! Deterministic crash points for tests: `KILN_FAULT=<point>` kills the process with SIGKILL when it reaches
//! `<point>`, exactly as `kill -9` would, so crash safety is tested at every step rather than by luck.

pub const FAULT_VAR: &str = "KILN_FAULT";

/// Dies here if `KILN_FAULT` names this point. A no-op otherwise.
pub fn point(name: &str) {
    if std::env::var(FAULT_VAR).is_ok_and(|wanted| wanted.split(',').any(|w| w.trim() == name)) {
        tracing::warn!(point = name, "fault injected: killing kiln");
        // SAFETY: raising a signal on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
}
