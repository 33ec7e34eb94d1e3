//! When rotations run: the [`Schedule`] of a policy (an interval or a cron
//! expression), the jitter that spreads secrets due together, and the
//! [`RetryBackoff`] of failed steps. Intervals are written in the one
//! duration grammar of `crate::duration`. Pure values: time is a parameter.
//!
//! No storage prefix; touches nothing but its inputs.

use std::str::FromStr;
use std::time::Duration;

use chrono::Datelike;
use croner::parser::{CronParser, Seconds};
use croner::Cron;
use ring::rand::{SecureRandom, SystemRandom};

use crate::duration::{self, DurationError};

/// The shortest interval a schedule accepts.
pub const MIN_EVERY: Duration = Duration::from_secs(1);
/// The longest duration accepted anywhere (100 years).
pub const MAX_DURATION: Duration = Duration::from_secs(crate::duration::MAX_SECONDS);
/// Jitter added to a due time is at most this share of the interval ...
pub const JITTER_SHARE: f64 = 0.05;
/// ... and never more than this.
pub const MAX_JITTER: Duration = Duration::from_secs(30);
/// A cron search looks at most this many calendar years ahead (from the year
/// of its start); finding nothing there counts as "no next run". Long enough
/// for any day-of-month/weekday combination (29 February on a Monday recurs
/// within 40 years), short enough that one search stays cheap.
pub const MAX_SEARCH_YEARS: i32 = 50;
/// croner's bit for a plain value in a field (`croner::component::ALL_BIT`,
/// which the crate does not export).
const CRON_VALUE_BIT: u8 = 1;
/// Days in each month, 29 for February (a leap year always comes).
const MONTH_DAYS: [u16; 12] = [31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleError {
    #[error(transparent)]
    Duration(#[from] DurationError),
    #[error("a duration must be at most 100 years")]
    TooLong,
    #[error("the interval must be at least 1s")]
    TooShort,
    #[error("give exactly one of an interval (--every) and a cron expression (--cron)")]
    OneOf,
    #[error("invalid cron expression: {0}")]
    BadCron(String),
    #[error("the cron expression never matches again")]
    NoNextRun,
    #[error(
        "invalid cron expression: {0}: no month it allows has a day of month it allows \
         (such as 30 February or 31 April), so it would never run"
    )]
    ImpossibleDate(String),
}

/// When a policy's rotations are due.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// Every interval, counted from the start of the last run.
    Every(Duration),
    /// At the times a cron expression matches (UTC; five fields, or six
    /// with seconds first).
    Cron { expression: String, cron: Box<Cron> },
}

impl PartialEq for Schedule {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Self::Every(a), Self::Every(b)) => a == b,
            (Self::Cron { expression: a, .. }, Self::Cron { expression: b, .. }) => a == b,
            _ => false,
        }
    }
}

impl Schedule {
    pub fn every(interval: Duration) -> Result<Self, ScheduleError> {
        if interval < MIN_EVERY {
            return Err(ScheduleError::TooShort);
        }
        if interval > MAX_DURATION {
            return Err(ScheduleError::TooLong);
        }
        Ok(Self::Every(interval))
    }

    pub fn cron(expression: &str) -> Result<Self, ScheduleError> {
        let expression = expression.trim();
        let cron = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse(expression)
            .map_err(|e| ScheduleError::BadCron(e.to_string()))?;
        if !day_can_occur(&cron) {
            return Err(ScheduleError::ImpossibleDate(expression.to_owned()));
        }
        Ok(Self::Cron {
            expression: expression.to_owned(),
            cron: Box::new(cron),
        })
    }

    /// From the wire: exactly one of `every_seconds` and `cron`.
    pub fn from_parts(every_seconds: u64, cron: &str) -> Result<Self, ScheduleError> {
        match (every_seconds, cron.trim().is_empty()) {
            (0, false) => Self::cron(cron),
            (s, true) if s > 0 => Self::every(Duration::from_secs(s)),
            _ => Err(ScheduleError::OneOf),
        }
    }

    pub fn every_seconds(&self) -> u64 {
        match self {
            Self::Every(d) => d.as_secs(),
            Self::Cron { .. } => 0,
        }
    }

    pub fn cron_expression(&self) -> &str {
        match self {
            Self::Every(_) => "",
            Self::Cron { expression, .. } => expression,
        }
    }

    /// The next due time strictly after `after_ms`, before jitter. A cron
    /// search is bounded: it looks [`MAX_SEARCH_YEARS`] ahead at most, and
    /// finding nothing there is [`ScheduleError::NoNextRun`].
    pub fn next_after(&self, after_ms: u64) -> Result<u64, ScheduleError> {
        match self {
            Self::Every(d) => Ok(after_ms.saturating_add(d.as_millis() as u64)),
            Self::Cron { cron, .. } => {
                let start = chrono::DateTime::from_timestamp_millis(after_ms as i64)
                    .ok_or(ScheduleError::NoNextRun)?;
                let bounded = bounded_years(cron, start.year());
                let next = bounded
                    .find_next_occurrence(&start, false)
                    .map_err(|_| ScheduleError::NoNextRun)?;
                Ok(next.timestamp_millis().max(0) as u64)
            }
        }
    }

    /// The typical gap between runs, for jitter and overdue tolerance.
    pub fn period_ms(&self, now_ms: u64) -> u64 {
        match self {
            Self::Every(d) => d.as_millis() as u64,
            Self::Cron { .. } => {
                let a = self.next_after(now_ms).unwrap_or(now_ms);
                let b = self.next_after(a).unwrap_or(a);
                b.saturating_sub(a).max(1000)
            }
        }
    }

    /// The most jitter added to a due time: 5 % of the period, at most 30 s.
    pub fn max_jitter_ms(&self, now_ms: u64) -> u64 {
        let share = (self.period_ms(now_ms) as f64 * JITTER_SHARE) as u64;
        share.min(MAX_JITTER.as_millis() as u64)
    }

    /// The next due time after `after_ms`, with jitter, so that many secrets
    /// on one schedule do not reach their targets at the same moment.
    pub fn next_due(&self, after_ms: u64) -> Result<u64, ScheduleError> {
        let base = self.next_after(after_ms)?;
        Ok(base + random_below(self.max_jitter_ms(after_ms) + 1))
    }
}

impl FromStr for Schedule {
    type Err = ScheduleError;

    /// `every 15m` or `cron 0 3 * * *`, as `rotation get` shows them.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("every ") {
            Self::every(duration::parse(rest)?)
        } else if let Some(rest) = s.strip_prefix("cron ") {
            Self::cron(rest)
        } else {
            Err(ScheduleError::OneOf)
        }
    }
}

/// Whether some calendar day can satisfy the day-of-month and month fields
/// of `cron` (structurally: for each allowed month, is one of the allowed
/// days of month within its length, 29 for February). Sound for croner's
/// rules: a restricted day of week matches on its own (OR, the default)
/// unless `+`/`dom_and_dow` asks for both (AND); so only a `*` day of week
/// or AND mode makes the day of month decide. `L`/`W` days are not judged
/// here (the bounded search covers them).
fn day_can_occur(cron: &Cron) -> bool {
    let pattern = &cron.pattern;
    let dom_decides = pattern.is_dow_wildcard() || pattern.matches_dom_and_dow();
    if !dom_decides || pattern.days.has_modifiers() {
        return true;
    }
    let days = pattern.days.values();
    pattern.months.values().iter().any(|&month| {
        let length = MONTH_DAYS
            .get(usize::from(month).wrapping_sub(1))
            .copied()
            .unwrap_or(31);
        days.iter().any(|&day| (1..=length).contains(&day))
    })
}

/// `cron` with its years limited to `from_year ..= from_year +
/// MAX_SEARCH_YEARS`, so a search runs through the calendar of those years
/// only and steps over the later ones a year at a time.
fn bounded_years(cron: &Cron, from_year: i32) -> Cron {
    let mut bounded = cron.clone();
    let years = &mut bounded.pattern.years;
    let last = from_year.saturating_add(MAX_SEARCH_YEARS);
    for year in years.min..=years.max {
        let inside = (from_year..=last).contains(&i32::from(year));
        if !inside && years.unset_bit(year, CRON_VALUE_BIT).is_err() {
            break;
        }
    }
    bounded
}

/// A uniform random number in `0..bound` (0 if `bound` is 0). Not secret:
/// jitter only; falls back to 0 if the system generator fails.
pub fn random_below(bound: u64) -> u64 {
    if bound <= 1 {
        return 0;
    }
    let mut bytes = [0u8; 8];
    if SystemRandom::new().fill(&mut bytes).is_err() {
        return 0;
    }
    u64::from_le_bytes(bytes) % bound
}

/// Errors of [`RetryBackoff::try_new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackoffError {
    #[error("the first delay must be more than zero and at most the largest")]
    BadDelays,
    #[error("a rotation needs at least one attempt, and at most 20")]
    BadAttempts,
    #[error("jitter is a share from 0 to 1")]
    BadJitter,
}

/// Exponential back-off with jitter between the attempts of a rotation:
/// attempt `n` (from 1) is followed by a wait of `initial * 2^(n-1)`, capped
/// at `max`, of which a random share up to `jitter` is taken off ("equal
/// jitter" when `jitter` is 0.5), so retries of many secrets spread out.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBackoff {
    initial: Duration,
    max: Duration,
    attempts: u32,
    jitter: f64,
}

impl Default for RetryBackoff {
    /// 3 attempts, waits of about 1 s and 2 s, half of each random.
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
            attempts: 3,
            jitter: 0.5,
        }
    }
}

impl RetryBackoff {
    pub fn try_new(
        initial: Duration,
        max: Duration,
        attempts: u32,
        jitter: f64,
    ) -> Result<Self, BackoffError> {
        if initial.is_zero() || initial > max {
            return Err(BackoffError::BadDelays);
        }
        if attempts == 0 || attempts > 20 {
            return Err(BackoffError::BadAttempts);
        }
        if !(0.0..=1.0).contains(&jitter) {
            return Err(BackoffError::BadJitter);
        }
        Ok(Self {
            initial,
            max,
            attempts,
            jitter,
        })
    }

    /// How many times a rotation is tried before it is rolled back.
    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    /// The longest wait after attempt `attempt` (from 1), before jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let factor = 1u32
            .checked_shl(attempt.saturating_sub(1))
            .unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }

    /// The wait after attempt `attempt`, with `random` in `0.0..1.0`
    /// choosing how much jitter is taken off.
    pub fn delay_with(&self, attempt: u32, random: f64) -> Duration {
        let ceiling = self.ceiling(attempt);
        ceiling.mul_f64(1.0 - self.jitter * random.clamp(0.0, 1.0))
    }

    /// The wait after attempt `attempt`, with fresh randomness.
    pub fn delay(&self, attempt: u32) -> Duration {
        let random = random_below(1_000_000) as f64 / 1_000_000.0;
        self.delay_with(attempt, random)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn intervals_take_the_one_duration_grammar() {
        for (text, secs) in [
            ("every 90s", 90),
            ("every 1h30m", 5400),
            ("every 30d", 2_592_000),
        ] {
            let every = text.parse::<Schedule>().map(|s| s.every_seconds());
            assert_eq!(every, Ok(secs), "{text}");
        }
        assert!(matches!(
            "every 1x".parse::<Schedule>(),
            Err(ScheduleError::Duration(_))
        ));
        assert_eq!("every 0s".parse::<Schedule>(), Err(ScheduleError::TooShort));
    }

    #[test]
    fn schedules_parse_and_refuse() {
        assert!(Schedule::every(Duration::from_secs(1)).is_ok());
        assert_eq!(
            Schedule::every(Duration::from_millis(500)),
            Err(ScheduleError::TooShort)
        );
        assert_eq!(Schedule::from_parts(0, ""), Err(ScheduleError::OneOf));
        assert_eq!(
            Schedule::from_parts(5, "* * * * *"),
            Err(ScheduleError::OneOf)
        );
        assert!(matches!(
            Schedule::cron("61 * * * *"),
            Err(ScheduleError::BadCron(_))
        ));
        let every: Schedule = "every 15m".parse().unwrap_or(Schedule::Every(MIN_EVERY));
        assert_eq!(every.every_seconds(), 900);
    }

    #[test]
    fn next_times() {
        let every = Schedule::every(Duration::from_secs(2));
        assert_eq!(every.and_then(|s| s.next_after(1_000)), Ok(3_000));
        // 2026-01-01T00:00:00Z, then every day at 03:00.
        let midnight = 1_767_225_600_000;
        let cron = Schedule::cron("0 3 * * *");
        assert_eq!(
            cron.and_then(|s| s.next_after(midnight)),
            Ok(midnight + 3 * 3_600_000)
        );
        let seconds = Schedule::cron("*/10 * * * * *");
        assert_eq!(
            seconds.and_then(|s| s.next_after(midnight)),
            Ok(midnight + 10_000)
        );
    }

    /// Milliseconds of a UTC calendar time, for the tests.
    fn at(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> u64 {
        use chrono::TimeZone;
        chrono::Utc
            .with_ymd_and_hms(y, mo, d, h, mi, 0)
            .single()
            .map_or(0, |t| t.timestamp_millis() as u64)
    }

    #[test]
    fn impossible_dates_are_refused_at_parse() {
        for expr in [
            "0 0 30 2 *",
            "5 0 31 4 *",
            "0 0 30,31 2 *",
            "0 0 31 4,6,9,11 *",
        ] {
            let err = Schedule::cron(expr);
            assert_eq!(
                err,
                Err(ScheduleError::ImpossibleDate(expr.to_owned())),
                "{expr}"
            );
            let text = err.err().map(|e| e.to_string()).unwrap_or_default();
            assert!(
                text.contains(expr) && text.contains("30 February"),
                "{text}"
            );
        }
        // AND mode (`+`): the day of month must match too.
        assert!(matches!(
            Schedule::cron("0 0 30 2 +1"),
            Err(ScheduleError::ImpossibleDate(_))
        ));
        // OR mode (default): Mondays in February match on their own.
        let jan = at(2026, 1, 1, 0, 0);
        let or = Schedule::cron("0 0 30 2 1").and_then(|s| s.next_after(jan));
        assert_eq!(or, Ok(at(2026, 2, 2, 0, 0)));
    }

    #[test]
    fn possible_dates_are_accepted_and_run() {
        let jan = at(2026, 1, 1, 0, 0);
        for (expr, after, next) in [
            ("0 0 29 2 *", jan, at(2028, 2, 29, 0, 0)),
            // 2100 is no leap year: eight years to the next 29 February.
            ("0 0 29 2 *", at(2096, 3, 1, 0, 0), at(2104, 2, 29, 0, 0)),
            ("0 3 * * *", jan, at(2026, 1, 1, 3, 0)),
            ("*/5 * * * *", jan + 1, at(2026, 1, 1, 0, 5)),
            ("0 0 31 * *", jan, at(2026, 1, 31, 0, 0)),
            ("0 0 31 * *", at(2026, 4, 1, 0, 0), at(2026, 5, 31, 0, 0)),
            ("0 0 L 2 *", jan, at(2026, 2, 28, 0, 0)),
        ] {
            let got = Schedule::cron(expr).and_then(|s| s.next_after(after));
            assert_eq!(got, Ok(next), "{expr} after {after}");
        }
    }

    #[test]
    fn the_search_is_bounded() {
        // Parsed without the schedule's check, as an old stored policy might.
        let raw = CronParser::builder()
            .seconds(Seconds::Optional)
            .build()
            .parse("0 0 30 2 *");
        assert!(raw.is_ok());
        let Ok(raw) = raw else { return };
        let never = Schedule::Cron {
            expression: "0 0 30 2 *".to_owned(),
            cron: Box::new(raw),
        };
        let jan = at(2026, 1, 1, 0, 0);
        assert_eq!(never.next_after(jan), Err(ScheduleError::NoNextRun));
        assert_eq!(never.next_due(jan), Err(ScheduleError::NoNextRun));
        // The bound keeps every year up to MAX_SEARCH_YEARS ahead.
        let far = Schedule::cron("0 0 1 1 *").and_then(|s| s.next_after(at(2026, 1, 1, 0, 1)));
        assert_eq!(far, Ok(at(2027, 1, 1, 0, 0)));
        let yearly = CronParser::builder().build().parse("0 0 1 1 *");
        assert!(yearly.is_ok());
        let Ok(yearly) = yearly else { return };
        let years = bounded_years(&yearly, 2026).pattern.years.values();
        assert_eq!((years.first(), years.last()), (Some(&2026), Some(&2076)));
    }

    #[test]
    fn jitter_stays_within_its_bound() {
        let s = Schedule::Every(Duration::from_secs(100));
        assert_eq!(s.max_jitter_ms(0), 5_000);
        for _ in 0..100 {
            let due = s.next_due(0).unwrap_or(0);
            assert!((100_000..=105_000).contains(&due), "{due}");
        }
        let long = Schedule::Every(Duration::from_secs(86_400));
        assert_eq!(long.max_jitter_ms(0), 30_000);
    }

    #[test]
    fn backoff_grows_caps_and_jitters() {
        let b = RetryBackoff::try_new(Duration::from_millis(100), Duration::from_secs(1), 5, 0.5);
        let b = b.unwrap_or_default();
        assert_eq!(b.ceiling(1), Duration::from_millis(100));
        assert_eq!(b.ceiling(2), Duration::from_millis(200));
        assert_eq!(b.ceiling(4), Duration::from_millis(800));
        assert_eq!(b.ceiling(5), Duration::from_secs(1));
        assert_eq!(b.ceiling(40), Duration::from_secs(1));
        assert_eq!(b.delay_with(2, 0.0), Duration::from_millis(200));
        assert_eq!(b.delay_with(2, 1.0), Duration::from_millis(100));
        for _ in 0..100 {
            let d = b.delay(3);
            assert!(d >= Duration::from_millis(200) && d <= Duration::from_millis(400));
        }
        assert!(RetryBackoff::try_new(Duration::ZERO, Duration::from_secs(1), 3, 0.5).is_err());
        assert!(
            RetryBackoff::try_new(Duration::from_secs(2), Duration::from_secs(1), 3, 0.5).is_err()
        );
        assert!(
            RetryBackoff::try_new(Duration::from_secs(1), Duration::from_secs(1), 0, 0.5).is_err()
        );
        assert!(
            RetryBackoff::try_new(Duration::from_secs(1), Duration::from_secs(1), 3, 1.5).is_err()
        );
    }
}
