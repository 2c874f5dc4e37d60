//! How long waits look to a person: a bar drawn with indicatif when stderr is a terminal, plain log lines when it
//! is not (CI), nothing with `--quiet`. Under `--json` stdout still holds only the result document.

use std::cell::RefCell;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use kiln::progress::{Progress, Silent};

/// The reporter for this run, chosen from the output mode and whether stderr is a terminal.
pub fn for_run(quiet: bool) -> Box<dyn Progress> {
    if quiet {
        Box::new(Silent)
    } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        Box::new(Bars { bar: RefCell::new(None) })
    } else {
        Box::new(Lines { current: RefCell::new(None) })
    }
}

/// A bar (or spinner, without a total) on stderr.
struct Bars {
    bar: RefCell<Option<ProgressBar>>,
}

impl Progress for Bars {
    fn begin(&self, what: &str, total: Option<u64>) {
        let bar = match total {
            Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template("{spinner} {prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            ),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
                ProgressStyle::with_template("{spinner} {prefix} {msg} ({elapsed})")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            ),
        };
        bar.set_prefix(what.to_string());
        // No steady tick: a bar redraws on each update, so provisioning output echoed between updates does not
        // tear it.
        if let Some(old) = self.bar.replace(Some(bar)) {
            old.finish_and_clear();
        }
    }

    fn update(&self, done: u64, status: &str) {
        if let Some(bar) = self.bar.borrow().as_ref() {
            bar.set_position(done);
            bar.set_message(status.to_string());
        }
    }

    fn end(&self, outcome: &str) {
        if let Some(bar) = self.bar.take() {
            bar.finish_with_message(outcome.to_string());
        }
    }
}

/// One line when a wait begins and ends, and one when its status changes, at most every few seconds: readable in a
/// CI log without flooding it.
struct Lines {
    current: RefCell<Option<Wait>>,
}

struct Wait {
    what: String,
    started: Instant,
    last_line: Instant,
    last_status: String,
}

const LINE_EVERY: Duration = Duration::from_secs(5);

impl Progress for Lines {
    fn begin(&self, what: &str, total: Option<u64>) {
        let of = total.map(|t| format!(" (0 of {t})")).unwrap_or_default();
        eprintln!("kiln: {what}{of}");
        let now = Instant::now();
        self.current.replace(Some(Wait {
            what: what.into(),
            started: now,
            last_line: now,
            last_status: String::new(),
        }));
    }

    fn update(&self, _done: u64, status: &str) {
        let mut current = self.current.borrow_mut();
        let Some(wait) = current.as_mut() else { return };
        if status != wait.last_status && wait.last_line.elapsed() >= LINE_EVERY {
            eprintln!("kiln: {}: {status} ({}s)", wait.what, wait.started.elapsed().as_secs());
            wait.last_line = Instant::now();
            wait.last_status = status.to_string();
        }
    }

    fn end(&self, outcome: &str) {
        if let Some(wait) = self.current.take() {
            eprintln!("kiln: {}: {outcome} after {} ms", wait.what, wait.started.elapsed().as_millis());
        }
    }
}
