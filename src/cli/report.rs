//! `kiln report`: one self-contained HTML page for release managers and change tickets (docs/report.md): per
//! stage what is live and promoted, the timeline, gate verdicts and approvals; the lineage graph, the ledger head,
//! what `verify` found, and the delivery metrics. Exits as `kiln verify` would, after writing the page.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::Args;

use kiln::engine::report::{self, Options};
use kiln::Error;

use super::Ctx;

#[derive(Args, Debug)]
pub struct ReportArgs {
    /// Where to write the page; `-` writes it to stdout [default: .kiln/reports/<pipeline>.html under the
    /// repository root, which kiln's state directory keeps out of the work tree a bake checks]
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Only this long ago until now in the timeline and the metrics, such as 7d or 30d (default: the whole
    /// history); what is live and promoted is always shown as it is now
    #[arg(long, value_parser = parse_age)]
    pub since: Option<Duration>,
    /// Check only the ledger's chain, not the provider (as `kiln verify --ledger-only`)
    #[arg(long)]
    pub ledger_only: bool,
}

fn parse_age(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("`{text}` is not a duration such as 7d or 30d: {e}"))
}

pub fn run(ctx: &Ctx, args: ReportArgs) -> Result<(), Error> {
    if ctx.out.json {
        return Err(Error::usage(
            "kiln report writes an HTML page, not JSON; `kiln status --json`, `kiln lineage --json` and `kiln metrics \
             --json` give the same facts as documents",
        ));
    }
    let pipeline = ctx.pipeline()?;
    // Not the current directory: a page left in the work tree would make the next bake refuse it as dirty.
    let page = match args.out {
        Some(out) => out,
        None => {
            let dir = ctx.state_dir().join("reports");
            std::fs::create_dir_all(&dir).map_err(Error::io(&dir))?;
            dir.join(format!("{}.html", pipeline.name))
        }
    };
    let to_stdout = page.as_os_str() == "-";
    // A pinned clock (`KILN_NOW`) moves "now" too, as for `kiln log --since` and `kiln metrics --since`.
    let now = ctx.clock.now();
    let since = match args.since {
        // SystemTime reaches before 1970, but an RFC 3339 time cannot.
        Some(age) => Some(now.checked_sub(age).filter(|from| *from >= SystemTime::UNIX_EPOCH).ok_or_else(|| {
            Error::usage(format!("--since {} reaches back before 1970", humantime::format_duration(age)))
        })?),
        None => None,
    };
    // Made before the ledger is read, so an unwritable --out fails at once rather than after a long read; the page
    // replaces FILE only once it is whole.
    let mut file = if to_stdout { None } else { Some(staging_file(&page)?) };

    let ledger = ctx.ledger()?;
    let (chain, chain_failure) = report::check_chain(&ledger);
    let (provider, provider_failure) = if args.ledger_only {
        (report::provider_not_checked("not run: --ledger-only"), None)
    } else {
        match ctx.with_engine(|engine| Ok(report::check_provider(engine))) {
            Ok(checked) => checked,
            Err(err) => (report::provider_unchecked(&err), Some(err)),
        }
    };
    let verification = report::Verification { chain, provider };
    let git = git2::Repository::discover(ctx.repo.root()).ok();
    let commit_time = |commit: &str| {
        let found = git.as_ref()?.find_commit(git2::Oid::from_str(commit).ok()?).ok()?;
        let secs = u64::try_from(found.committer().when().seconds()).ok()?;
        Some(SystemTime::UNIX_EPOCH + Duration::from_secs(secs))
    };
    let options = Options {
        since,
        since_label: args.since.map(|age| humantime::format_duration(age).to_string()),
        now,
        actor: ctx.actor.clone(),
    };
    let gathered = report::gather(&ledger, pipeline, &options, verification, &commit_time)?;

    match file.take() {
        None => {
            let mut out = std::io::BufWriter::new(std::io::stdout().lock());
            report::render(&gathered, &mut out).and_then(|()| out.flush()).map_err(Error::io("stdout"))?;
        }
        Some(staged) => {
            let mut out = std::io::BufWriter::new(staged);
            report::render(&gathered, &mut out).and_then(|()| out.flush()).map_err(Error::io(&page))?;
            let staged = out.into_inner().map_err(|e| Error::Io { path: page.clone(), source: e.into_error() })?;
            let bytes = staged.as_file().metadata().map(|m| m.len()).unwrap_or_default();
            staged.persist(&page).map_err(|e| Error::Io { path: page.clone(), source: e.error })?;
            let verified = if gathered.verification.passed() { "verify passed" } else { "verify FAILED" };
            super::output::print_stdout(&format!(
                "report written to {} ({} KB, {verified})\n",
                shown_path(&page).display(),
                bytes.div_ceil(1024)
            ));
        }
    }
    match chain_failure.or(provider_failure) {
        Some(failure) => Err(failure),
        None => Ok(()),
    }
}

/// A temporary file beside `out`, readable as an ordinary file once persisted (tempfile makes it 0600).
fn staging_file(out: &Path) -> Result<tempfile::NamedTempFile, Error> {
    let dir = match out.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if out.is_dir() {
        return Err(Error::Io {
            path: out.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::IsADirectory, "is a directory; --out names a file"),
        });
    }
    let staged = tempfile::Builder::new()
        .prefix(".kiln-report")
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|source| Error::Io { path: out.to_path_buf(), source })?;
    use std::os::unix::fs::PermissionsExt;
    staged
        .as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))
        .map_err(|source| Error::Io { path: out.to_path_buf(), source })?;
    Ok(staged)
}

/// `out` as the user can find it: absolute when it was relative.
fn shown_path(out: &Path) -> PathBuf {
    std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf())
}
