//! `kiln completions SHELL`: a completion script for the shell, generated from the same definitions that parse.

use clap::{Args, Command, CommandFactory};
use clap_complete::Shell;

use super::output::print_stdout;
use super::{Cli, Ctx};

#[derive(Args, Debug)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: Shell,
}

pub fn run(_ctx: &Ctx, args: CompletionsArgs) -> Result<(), kiln::Error> {
    let mut command = user_facing_command();
    let mut script = Vec::new();
    clap_complete::generate(args.shell, &mut command, "kiln", &mut script);
    print_stdout(&String::from_utf8_lossy(&script));
    Ok(())
}

/// kiln's command line without its hidden subcommands. clap_complete offers hidden subcommands as completions,
/// and users must not be pointed at internal ones (`proxy-serve`); clap has no way to remove a subcommand, so the
/// root is rebuilt from the visible parts.
pub(super) fn user_facing_command() -> Command {
    let full = Cli::command();
    let visible: Vec<Command> = full.get_subcommands().filter(|c| !c.is_hide_set()).cloned().collect();
    let mut root = Command::new("kiln")
        .version(env!("CARGO_PKG_VERSION"))
        .subcommand_required(true)
        .args(full.get_arguments().cloned())
        .subcommands(visible);
    if let Some(about) = full.get_about() {
        root = root.about(about.clone());
    }
    if let Some(after_help) = full.get_after_help() {
        root = root.after_help(after_help.clone());
    }
    root
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_user_facing_command_keeps_every_visible_subcommand_and_global_option() {
        let full = Cli::command();
        let names = |c: &Command| c.get_subcommands().map(|s| s.get_name().to_string()).collect::<Vec<_>>();
        let expected: Vec<String> =
            full.get_subcommands().filter(|c| !c.is_hide_set()).map(|s| s.get_name().to_string()).collect();
        let user_facing = user_facing_command();
        assert_eq!(names(&user_facing), expected);
        assert!(!names(&user_facing).contains(&"proxy-serve".to_string()));
        let options = |c: &Command| c.get_arguments().map(|a| a.get_id().to_string()).collect::<Vec<_>>();
        assert_eq!(options(&user_facing), options(&full));
    }
}
