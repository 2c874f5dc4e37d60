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
            println!("{text}");
        } else {
            let text = human();
            if !text.is_empty() {
                println!("{}", text.trim_end());
            }
        }
        Ok(())
    }
}
