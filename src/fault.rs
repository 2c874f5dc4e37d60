//! Deterministic crash and pause points for tests: `KILN_FAULT=<point>` kills the process with SIGKILL when it
//! reaches `<point>`, exactly as `kill -9` would, and `KILN_FAULT=stop:<point>` stops it there with SIGSTOP (as a
//! stalled machine or a debugger would) until a test sends SIGCONT. Crash safety and races are tested at every step
//! rather than by luck.

pub const FAULT_VAR: &str = "KILN_FAULT";

fn wanted(entry: &str) -> bool {
    std::env::var(FAULT_VAR).is_ok_and(|wanted| wanted.split(',').any(|w| w.trim() == entry))
}

/// Dies here if `KILN_FAULT` names this point, or pauses here if it names `stop:<point>`. A no-op otherwise.
pub fn point(name: &str) {
    if wanted(name) {
        tracing::warn!(point = name, "fault injected: killing kiln");
        // SAFETY: raising a signal on our own pid has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
        std::process::abort();
    }
    if wanted(&format!("stop:{name}")) {
        tracing::warn!(point = name, "fault injected: stopping kiln until SIGCONT");
        // SAFETY: as above; the process resumes here when it is continued.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGSTOP);
        }
    }
}
