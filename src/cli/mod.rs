//! The command line: global options, one module per subcommand (`XArgs` + `run`), and the shared context they get.

mod approve;
mod bake;
mod completions;
mod deploy;
mod diff;
mod down;
mod drill;
pub mod exit;
mod gc;
mod images;
mod lineage;
mod log;
mod man;
mod metrics;
mod outdated;
pub mod output;
mod progress;
mod promote;
mod proxy_serve;
mod report;
mod revoke;
mod rollback;
mod run;
mod status;
mod verify;

use std::cell::OnceCell;
use std::path::PathBuf;
use std::time::{Duration, UNIX_EPOCH};

use clap::{Args, Parser, Subcommand};

use kiln::clock::Clock;
use kiln::config::{pipeline, LedgerLocation, Pipeline, Repo};
use kiln::engine::Context;
use kiln::ledger::Ledger;
use kiln::provider::inject::{Faulty, Injector};
use kiln::provider::{Fleet, ImageProvider};
use kiln::Error;

use output::Output;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Bake immutable images, promote them by digest through gated stages, deploy by replacing whole groups",
    after_help = "Exit codes: 0 ok, 1 runtime/provider failure, 2 invalid usage/config/input, 3 gate refused, \
                  4 deployment failed (previous group kept serving), 5 stage busy/write conflict, 6 verification failed"
)]
struct Cli {
    #[command(flatten)]
    global: GlobalArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Pipeline to use (a file in pipelines/); optional when there is only one
    #[arg(long, global = true, env = "KILN_PIPELINE")]
    pub pipeline: Option<String>,
    /// Print one JSON document on stdout (logs stay on stderr)
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (-v, -vv)
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// Only errors on stderr
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Ledger location: a directory or s3://bucket/prefix (default: the pipeline's `ledger`, else .kiln/ledger)
    #[arg(long, global = true, env = "KILN_LEDGER")]
    pub ledger: Option<String>,
    /// Run as if started in DIR
    #[arg(short = 'C', long = "dir", global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,
}

#[derive(Subcommand)]
enum Command {
    /// The main job: bake, then promote and deploy stage by stage until a gate stops it
    Run(run::RunArgs),
    /// Build (or reuse) the image and print its digest
    Bake(bake::BakeArgs),
    /// Run a stage's gates, record the promotion, deploy
    Promote(promote::PromoteArgs),
    /// (Re)deploy what is promoted to a stage; resumes an interrupted deployment
    Deploy(deploy::DeployArgs),
    /// Redeploy an earlier digest
    Rollback(rollback::RollbackArgs),
    /// Record an approval of a digest for a stage
    Approve(approve::ApproveArgs),
    /// Revoke a digest and every image built on it
    Revoke(revoke::RevokeArgs),
    /// Per stage: promoted digest, live group, health, revoked warnings
    Status(status::StatusArgs),
    /// The lineage of a digest or of what a stage runs
    Lineage(lineage::LineageArgs),
    /// Ledger history, newest first
    Log(log::LogArgs),
    /// Check the ledger's hash chain and provider drift
    Verify(verify::VerifyArgs),
    /// Delete what no stage can roll back to
    Gc(gc::GcArgs),
    /// Local provider: stop a stage's instances and its endpoint proxy
    Down(down::DownArgs),
    /// List baked images
    Images(images::ImagesArgs),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell)
    Completions(completions::CompletionsArgs),
    /// Print the manual page (roff), or write one page per subcommand with --out
    Man(man::ManArgs),
    /// The four DORA keys from the ledger: deployment frequency, lead time, change-failure rate, time to restore
    Metrics(metrics::MetricsArgs),
    /// Stage images built on a base that a newer bake of the same base recipe has superseded
    Outdated(outdated::OutdatedArgs),
    /// Run a named fault against a running local stage under load and check that it holds its invariant
    Drill(drill::DrillArgs),
    /// What replacing image B with image A changes: inputs, steps, parent, commits, files
    Diff(diff::DiffArgs),
    /// One self-contained HTML page: stages, timeline, gate verdicts, approvals, lineage, verify, metrics
    Report(report::ReportArgs),
    /// Internal: the stage endpoint proxy that `kiln deploy` starts, detached
    #[command(hide = true)]
    ProxyServe(proxy_serve::ProxyServeArgs),
}

/// What every subcommand gets: options, repository, output mode, clock and actor, with config loaded on demand.
pub struct Ctx {
    pub global: GlobalArgs,
    pub repo: Repo,
    pub out: Output,
    pub clock: Clock,
    pub actor: String,
    pipeline: OnceCell<Pipeline>,
}

impl Ctx {
    fn new(global: GlobalArgs) -> Result<Ctx, Error> {
        let start = match &global.dir {
            Some(dir) => dir.clone(),
            None => std::env::current_dir().map_err(Error::io("the current directory"))?,
        };
        let repo = Repo::discover(&start).map_err(Error::io(start))?;
        let clock = pinned_clock()?;
        // AWS faults in KILN_INJECT (tests) are parsed when the first AWS client is made; a bad one is a usage
        // error however deep that happens, so it is checked here, first.
        kiln::provider::aws::faults::http_client_from_env().map_err(Error::usage)?;
        Ok(Ctx {
            out: Output { json: global.json },
            global,
            repo,
            clock,
            actor: kiln::actor::current()?,
            pipeline: OnceCell::new(),
        })
    }

    /// The pipeline: `--pipeline`, or the only one in pipelines/.
    pub fn pipeline(&self) -> Result<&Pipeline, Error> {
        if let Some(p) = self.pipeline.get() {
            return Ok(p);
        }
        let name = pipeline::choose(&self.repo, self.global.pipeline.as_deref())?;
        let loaded = pipeline::load(&self.repo, &name)?;
        Ok(self.pipeline.get_or_init(|| loaded))
    }

    /// Where the ledger is: `--ledger`/`KILN_LEDGER`, else the pipeline's, else the default directory.
    pub fn ledger_location(&self) -> Result<LedgerLocation, Error> {
        if let Some(url) = &self.global.ledger {
            return LedgerLocation::parse(&self.repo, url).map_err(|m| Error::usage(format!("--ledger: {m}")));
        }
        match self.pipeline() {
            Ok(p) => Ok(p.ledger.clone()),
            Err(Error::Config(kiln::config::ConfigError::NoPipeline { .. })) => {
                Ok(LedgerLocation::default_for(&self.repo))
            }
            Err(err) => Err(err),
        }
    }

    /// kiln's local state directory, `.kiln/` at the repository root.
    pub fn state_dir(&self) -> PathBuf {
        self.repo.root().join(".kiln")
    }

    /// Runs `f` with the engine context for the pipeline: its ledger and its provider.
    pub fn with_engine<T>(&self, f: impl FnOnce(&Context) -> Result<T, Error>) -> Result<T, Error> {
        let pipeline = self.pipeline()?;
        let ledger = self.ledger()?;
        let provider = kiln::provider::for_pipeline(pipeline, &self.repo)?;
        let progress = progress::for_run(self.global.quiet);
        // Tests of the binary inject provider failures on purpose (KILN_INJECT); nobody else sets it.
        let injector = Injector::from_env().map_err(Error::usage)?;
        let faulty =
            injector.as_ref().map(|injector| Faulty { images: provider.as_ref(), fleet: provider.as_ref(), injector });
        let (images, fleet): (&dyn ImageProvider, &dyn Fleet) = match &faulty {
            Some(faulty) => (faulty, faulty),
            None => (provider.as_ref(), provider.as_ref()),
        };
        let context = Context {
            repo: &self.repo,
            pipeline,
            ledger: &ledger,
            clock: &self.clock,
            actor: &self.actor,
            images,
            fleet,
            state_dir: self.state_dir(),
            echo: !self.global.quiet && !self.global.json,
            lease_holder: kiln::engine::deploy::holder_id(),
            progress: progress.as_ref(),
        };
        f(&context)
    }

    pub fn ledger(&self) -> Result<Ledger, Error> {
        match self.ledger_location()? {
            LedgerLocation::Dir(dir) => Ok(Ledger::open_dir(&dir)),
            LedgerLocation::S3 { bucket, prefix } => {
                // `--ledger s3://…` needs no pipeline; when there is one, its `[aws]` region and profile apply.
                let aws = match self.pipeline() {
                    Ok(pipeline) => pipeline.aws.as_ref(),
                    Err(Error::Config(kiln::config::ConfigError::NoPipeline { .. })) => None,
                    Err(err) => return Err(err),
                };
                let ledger = kiln::provider::aws::open_ledger(&bucket, &prefix, aws, &self.state_dir())
                    .map_err(kiln::ledger::LedgerError::from)?;
                Ok(ledger)
            }
        }
    }
}

/// `KILN_NOW` must lie in the years 2000 to 2999: kiln adds leases and soaks (up to a year) to it and writes the
/// result as an RFC 3339 time, which cannot go past the year 9999.
const PINNED_CLOCK_RANGE: std::ops::Range<Duration> =
    Duration::from_secs(946_684_800)..Duration::from_secs(32_503_680_000);

/// The clock, with `KILN_NOW` range-checked when it pins one.
fn pinned_clock() -> Result<Clock, Error> {
    let clock = Clock::from_env()?;
    let Some(value) = std::env::var(kiln::clock::NOW_VAR).ok().filter(|v| !v.is_empty()) else {
        return Ok(clock);
    };
    let since_epoch = clock.now().duration_since(UNIX_EPOCH).unwrap_or_default();
    if !PINNED_CLOCK_RANGE.contains(&since_epoch) {
        return Err(Error::usage(format!(
            "{}=`{value}` is outside the years 2000 to 2999 that kiln accepts for a pinned clock",
            kiln::clock::NOW_VAR
        )));
    }
    Ok(clock)
}

/// From here on Ctrl-C (or SIGTERM) lets the command stop cleanly at its next step instead of dying mid-way: a bake
/// kills its step and removes its work directory, a deployment stops where it stands and is left for the next
/// `kiln deploy`. A second Ctrl-C ends kiln at once.
pub fn catch_interrupts() -> Result<(), Error> {
    kiln::process::catch_interrupts().map_err(|source| Error::Io { path: "signal handlers".into(), source })
}

fn init_logging(global: &GlobalArgs) {
    let default = match (global.quiet, global.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        (false, _) => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("KILN_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("kiln={default}")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

pub fn main() -> std::process::ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(err) => return exit::report_usage(without_hidden_subcommands(err), json_requested()).into(),
    };
    init_logging(&cli.global);
    let json = cli.global.json;
    let result = Ctx::new(cli.global).and_then(|ctx| match cli.command {
        Command::Run(args) => run::run(&ctx, args),
        Command::Bake(args) => bake::run(&ctx, args),
        Command::Promote(args) => promote::run(&ctx, args),
        Command::Deploy(args) => deploy::run(&ctx, args),
        Command::Rollback(args) => rollback::run(&ctx, args),
        Command::Approve(args) => approve::run(&ctx, args),
        Command::Revoke(args) => revoke::run(&ctx, args),
        Command::Status(args) => status::run(&ctx, args),
        Command::Lineage(args) => lineage::run(&ctx, args),
        Command::Log(args) => log::run(&ctx, args),
        Command::Verify(args) => verify::run(&ctx, args),
        Command::Gc(args) => gc::run(&ctx, args),
        Command::Down(args) => down::run(&ctx, args),
        Command::Images(args) => images::run(&ctx, args),
        Command::Completions(args) => completions::run(&ctx, args),
        Command::Man(args) => man::run(&ctx, args),
        Command::Metrics(args) => metrics::run(&ctx, args),
        Command::Outdated(args) => outdated::run(&ctx, args),
        Command::Drill(args) => drill::run(&ctx, args),
        Command::Diff(args) => diff::run(&ctx, args),
        Command::Report(args) => report::run(&ctx, args),
        Command::ProxyServe(args) => proxy_serve::run(&ctx, args),
    });
    match result {
        Ok(()) => exit::Exit::Ok.into(),
        Err(err) => exit::report(&err, json).into(),
    }
}

/// Whether `--json` was given, read from the raw arguments: when clap rejects them there is no parsed `Cli`, and a
/// CI job reading stdout still needs its document. Arguments after `--` are operands, not options.
fn json_requested() -> bool {
    std::env::args_os().skip(1).take_while(|a| a != "--").any(|a| a == "--json")
}

/// clap lists and suggests hidden subcommands in its errors ("[subcommands: …, proxy-serve]", "tip: a similar
/// subcommand exists: 'proxy-serve'"); users must not be pointed at internal ones.
fn without_hidden_subcommands(mut err: clap::Error) -> clap::Error {
    use clap::error::{ContextKind, ContextValue};
    use clap::CommandFactory;
    let hidden: Vec<String> =
        Cli::command().get_subcommands().filter(|c| c.is_hide_set()).map(|c| c.get_name().to_string()).collect();
    for kind in [ContextKind::ValidSubcommand, ContextKind::SuggestedSubcommand] {
        let kept = match err.get(kind) {
            Some(ContextValue::Strings(names)) => names.iter().filter(|n| !hidden.contains(n)).cloned().collect(),
            Some(ContextValue::String(name)) if hidden.contains(name) => Vec::new(),
            _ => continue,
        };
        err.insert(kind, ContextValue::Strings(kept));
    }
    err
}
