//! `kiln log`: ledger history, newest first.

use clap::Args;
use serde::Serialize;

use kiln::ledger::{Event, StoredEvent};

use super::Ctx;

#[derive(Args, Debug)]
pub struct LogArgs {
    /// Only events about this stage
    #[arg(long)]
    pub stage: Option<String>,
    /// At most this many events
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
}

#[derive(Serialize)]
struct LogEntry<'a> {
    #[serde(flatten)]
    event: &'a Event,
    hash: String,
}

pub fn run(ctx: &Ctx, args: LogArgs) -> Result<(), kiln::Error> {
    let ledger = ctx.ledger()?;
    let view = ledger.view()?;
    let stage = args.stage.as_deref();
    let events = ledger.newest_first(view.seq(), args.limit, |e| stage.is_none() || e.event.body.stage() == stage)?;
    let doc: Vec<LogEntry> = events.iter().map(|e| LogEntry { event: &e.event, hash: e.hash.to_string() }).collect();
    ctx.out.emit(&serde_json::json!({ "events": doc }), || render(&events))
}

fn render(events: &[StoredEvent]) -> String {
    if events.is_empty() {
        return "no events".into();
    }
    let mut out = String::new();
    for stored in events {
        let e = &stored.event;
        let stage = e.body.stage().unwrap_or("-");
        let digest = e.body.digest().map(|d| d.short()).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:>6}  {}  {:<16} {:<15} {:<8} {}\n",
            e.seq,
            e.time,
            e.actor,
            e.body.kind(),
            stage,
            digest
        ));
    }
    out
}
