//! Command output: human text, or one JSON document on stdout with `--json`. Logs never go to stdout.

use serde::Serialize;

#[derive(Debug, Clone, Copy)]
pub struct Output {
    pub json: bool,
}

impl Output {
    /// Prints `doc` as JSON with `--json`, else the human text `human` renders.
    pub fn emit<T: Serialize>(&self, doc: &T, human: impl FnOnce() -> String) -> Result<(), kiln::Error> {
        if self.json {
            let text = serde_json::to_string_pretty(doc)
                .map_err(|source| kiln::Error::Encode { what: "the output", source })?;
            print_stdout(&format!("{text}\n"));
        } else {
            let text = human();
            if !text.is_empty() {
                print_stdout(&format!("{}\n", text.trim_end()));
            }
        }
        Ok(())
    }
}

/// Writes `text` to stdout. A reader that went away (`kiln log | head`) is not an error: what kiln did is done, and
/// its exit code must say so, so the rest of the text is dropped quietly instead of panicking as `println!` would.
pub fn print_stdout(text: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let written = out.write_all(text.as_bytes()).and_then(|()| out.flush());
    if let Err(err) = written {
        if err.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("kiln: cannot write to stdout: {err}");
        }
    }
}
