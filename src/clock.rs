//! Wall-clock time for events and soak gates; `KILN_NOW` pins it so tests control time instead of sleeping. A
//! pinned clock never passes for a real one: events written under it also record the real time (see
//! [`Clock::record`]), and `verify`, `log` and `lineage` show them.

use std::time::{Duration, SystemTime};

pub const NOW_VAR: &str = "KILN_NOW";

#[derive(Debug, Clone, Default)]
pub struct Clock {
    fixed: Option<SystemTime>,
}

#[derive(Debug, thiserror::Error)]
#[error("{NOW_VAR}=`{value}` is not an RFC 3339 time such as 2026-11-28T12:00:00Z")]
pub struct BadTime {
    pub value: String,
}

impl Clock {
    pub fn system() -> Clock {
        Clock { fixed: None }
    }

    pub fn fixed(at: SystemTime) -> Clock {
        Clock { fixed: Some(at) }
    }

    pub fn from_env() -> Result<Clock, BadTime> {
        match std::env::var(NOW_VAR) {
            Ok(value) if !value.is_empty() => {
                let at = parse(&value).ok_or(BadTime { value })?;
                Ok(Clock::fixed(at))
            }
            _ => Ok(Clock::system()),
        }
    }

    /// Whether `KILN_NOW` (or a test) pinned this clock.
    pub fn is_pinned(&self) -> bool {
        self.fixed.is_some()
    }

    /// What an event written now records about the clock: nothing for the real clock; for a pinned one, that it
    /// was pinned and what the real time was, so a backdated or postdated event cannot pass unnoticed.
    pub fn record(&self) -> Option<ClockRecord> {
        self.is_pinned().then(|| ClockRecord { pinned: true, real_time: format(SystemTime::now()) })
    }

    pub fn now(&self) -> SystemTime {
        self.fixed.unwrap_or_else(SystemTime::now)
    }

    /// The current time as written in events: RFC 3339, UTC, milliseconds.
    pub fn stamp(&self) -> String {
        format(self.now())
    }

    pub fn stamp_after(&self, after: Duration) -> String {
        format(self.now() + after)
    }
}

/// The `clock` member of an event written under a pinned clock.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClockRecord {
    pub pinned: bool,
    /// The machine's real time when the event was written, RFC 3339 like `time`.
    pub real_time: String,
}

pub fn format(at: SystemTime) -> String {
    humantime::format_rfc3339_millis(at).to_string()
}

pub fn parse(text: &str) -> Option<SystemTime> {
    humantime::parse_rfc3339(text).ok().or_else(|| humantime::parse_rfc3339_weak(text).ok())
}

/// How long ago `then` was, by this clock; zero if it is in the future.
pub fn elapsed_since(clock: &Clock, then: &str) -> Option<Duration> {
    let then = parse(then)?;
    Some(clock.now().duration_since(then).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_round_trip() {
        let clock = Clock::fixed(parse("2026-11-28T12:00:00Z").unwrap());
        assert_eq!(clock.stamp(), "2026-11-28T12:00:00.000Z");
        assert_eq!(parse(&clock.stamp()), Some(clock.now()));
        assert_eq!(elapsed_since(&clock, "2026-11-28T11:50:00.000Z"), Some(Duration::from_secs(600)));
        assert!(parse("yesterday").is_none());
    }

    #[test]
    fn only_a_pinned_clock_leaves_a_record() {
        assert_eq!(Clock::system().record(), None);
        let pinned = Clock::fixed(parse("2020-01-01T00:00:00Z").unwrap()).record().unwrap();
        assert!(pinned.pinned);
        let real = parse(&pinned.real_time).unwrap();
        assert!(real > parse("2026-01-01T00:00:00Z").unwrap(), "the record holds the real time, not the pinned one");
    }
}
