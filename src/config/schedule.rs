//! When a scheduled tag is due: a fixed interval (`30s`, `15m`, down to 1s) or a cron
//! expression of 5 or 6 fields (seconds optional), evaluated in UTC.

use std::time::Duration;

use chrono::{DateTime, Utc};

#[derive(Debug, Clone)]
pub enum Schedule {
    Interval(Duration),
    Cron(Box<croner::Cron>),
}

impl Schedule {
    pub fn parse(s: &str) -> Result<Schedule, String> {
        let s = s.trim();
        if let Ok(d) = humantime::parse_duration(s) {
            if d < Duration::from_secs(1) {
                return Err(format!("\"{s}\" is shorter than the 1s minimum"));
            }
            if d > super::MAX_DURATION {
                return Err(format!("\"{s}\" is longer than the 366 days maximum"));
            }
            return Ok(Schedule::Interval(d));
        }
        let fields = s.split_whitespace().count();
        if (5..=6).contains(&fields) || s.starts_with('@') {
            return s
                .parse::<croner::Cron>()
                .map(|c| Schedule::Cron(Box::new(c)))
                .map_err(|e| format!("\"{s}\" is not a valid cron expression: {e}"));
        }
        Err(format!(
            "\"{s}\" is neither an interval like 30s or 15m nor a cron expression of 5 or 6 fields"
        ))
    }

    /// The next due time strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> DateTime<Utc> {
        match self {
            Schedule::Interval(d) => {
                after + chrono::Duration::from_std(*d).unwrap_or(chrono::Duration::MAX)
            }
            Schedule::Cron(c) => c
                .find_next_occurrence(&after, false)
                .unwrap_or(after + chrono::Duration::days(366)),
        }
    }

    /// The nominal period, used to spread first checks and cap backoff.
    pub fn period(&self, now: DateTime<Utc>) -> Duration {
        match self {
            Schedule::Interval(d) => *d,
            Schedule::Cron(_) => {
                let a = self.next_after(now);
                let b = self.next_after(a);
                (b - a).to_std().unwrap_or(Duration::from_secs(60))
            }
        }
    }
}
