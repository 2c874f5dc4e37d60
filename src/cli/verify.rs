//! `kiln verify`: checks the ledger's hash chain end to end (exit 6 naming the first bad seq), then, when a
//! pipeline is configured, provider drift: images that changed or vanished, live groups that do not run what the
//! ledger says, endpoints that are down. Stages stopped with `kiln down` are listed as stopped, not as drift.

use clap::Args;

use kiln::config::ConfigError;
use kiln::engine::drift;
use kiln::Error;

use super::Ctx;

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Check only the ledger's chain, not the provider
    #[arg(long)]
    pub ledger_only: bool,
}

pub fn run(ctx: &Ctx, args: VerifyArgs) -> Result<(), Error> {
    let ledger = ctx.ledger()?;
    let report = ledger.verify()?;
    let location = ledger.location();
    if !report.pinned_clock.is_empty() {
        // A warning, not a failure: tests and demos pin the clock on purpose. But a reader must know which times
        // were chosen rather than read from a clock, wherever the output goes.
        eprintln!(
            "warning: {} event(s) were written with a pinned clock (KILN_NOW), so their times were chosen, not read: seq {}",
            report.pinned_clock.len(),
            seq_ranges(&report.pinned_clock)
        );
    }
    let has_pipeline = match ctx.pipeline() {
        Ok(_) => true,
        Err(Error::Config(ConfigError::NoPipeline { .. })) => false,
        Err(err) => return Err(err),
    };
    let checked_provider = has_pipeline && !args.ledger_only;
    let mut stopped = Vec::new();
    if checked_provider {
        let found = ctx.with_engine(drift::check)?;
        if !found.drift.is_empty() {
            return Err(Error::Drift { drift: found.drift });
        }
        stopped = found.stopped;
    }
    let doc = serde_json::json!({
        "ok": true,
        "ledger": location,
        "events": report.events,
        "head": report.head,
        "pinned_clock": report.pinned_clock,
        "provider_checked": checked_provider,
        "stopped": stopped,
    });
    ctx.out.emit(&doc, || {
        let chain = match report.head {
            Some(head) => format!("ledger {location}: {} events, chain intact, head {head}", report.events),
            None => format!("ledger {location}: empty"),
        };
        if !checked_provider {
            return chain;
        }
        let mut out =
            format!("{chain}\nprovider: every image matches its digest, every live group runs what the ledger says");
        for s in &stopped {
            out.push_str(&format!(
                "\nstage {}: stopped (kiln down at seq {} by {}); `kiln deploy --stage {}` starts it again",
                s.stage, s.seq, s.actor, s.stage
            ));
        }
        out
    })
}

/// `1-3, 7, 9-10`: runs of consecutive seqs, so a ledger written under a pinned clock does not flood the terminal.
fn seq_ranges(seqs: &[u64]) -> String {
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for &seq in seqs {
        match runs.last_mut() {
            Some((_, end)) if *end + 1 == seq => *end = seq,
            _ => runs.push((seq, seq)),
        }
    }
    runs.iter()
        .map(|&(start, end)| if start == end { start.to_string() } else { format!("{start}-{end}") })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    #[test]
    fn seq_ranges_join_runs() {
        assert_eq!(super::seq_ranges(&[1, 2, 3, 7, 9, 10]), "1-3, 7, 9-10");
        assert_eq!(super::seq_ranges(&[4]), "4");
    }
}
