//! `kiln man`: the manual page in roff, generated from the same definitions that parse the command line.

use std::path::PathBuf;

use clap::Args;

use super::completions::user_facing_command;
use super::output::print_stdout;
use super::Ctx;

#[derive(Args, Debug)]
pub struct ManArgs {
    /// Write kiln.1 and one page per subcommand (kiln-promote.1, …) into DIR instead of printing kiln.1
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub fn run(_ctx: &Ctx, args: ManArgs) -> Result<(), kiln::Error> {
    let command = user_facing_command();
    match args.out {
        Some(dir) => {
            std::fs::create_dir_all(&dir).map_err(kiln::Error::io(&dir))?;
            clap_mangen::generate_to(command, &dir).map_err(kiln::Error::io(&dir))
        }
        None => {
            let mut page = Vec::new();
            clap_mangen::Man::new(command).render(&mut page).map_err(kiln::Error::io("the man page"))?;
            print_stdout(&title_first(&String::from_utf8_lossy(&page)));
            Ok(())
        }
    }
}

/// The page with its `.TH` line first. roff opens with string definitions (the `Aq` apostrophe) before the title,
/// and tools that recognise a man page by its first request (`file`, some `whatis` indexers) look for `.TH`; the
/// definitions only need to come before their first use, which is after the title.
fn title_first(page: &str) -> String {
    let lines: Vec<&str> = page.lines().collect();
    let Some(title) = lines.iter().position(|l| l.starts_with(".TH ")) else { return page.to_string() };
    let mut out: Vec<&str> = Vec::with_capacity(lines.len());
    out.push(lines[title]);
    out.extend(&lines[..title]);
    out.extend(&lines[title + 1..]);
    out.join("\n") + "\n"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_title_moves_ahead_of_the_string_definitions() {
        let page = ".ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n.TH kiln 1\n.SH NAME\n";
        assert_eq!(title_first(page), ".TH kiln 1\n.ie \\n(.g .ds Aq \\(aq\n.el .ds Aq '\n.SH NAME\n");
        assert_eq!(title_first(".SH NAME\n"), ".SH NAME\n", "a page without a title is left alone");
    }
}
