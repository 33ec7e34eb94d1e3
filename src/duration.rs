//! The one duration grammar (INTERFACE.md): a whole number and a unit,
//! `90s`, `15m`, `1h`, `30d`, or several in decreasing order without spaces
//! (`1h30m`, `1d2h3m4s`); a bare number is seconds (`90`). Surrounding
//! whitespace is ignored. Every flag that takes a duration (`--ttl`,
//! `--every`, `--grace`, `--dormant`, ...) reads it with [`parse`], so they
//! all accept the same forms; [`format`] writes the form [`parse`] reads.
//!
//! [`TtlText`] is the same grammar for the flags that refuse zero.
//! Pure: no storage, no clock.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The longest duration accepted: 100 years.
pub const MAX_SECONDS: u64 = 100 * 365 * 86_400;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration: write e.g. 90s, 15m, 1h or 30d")]
    Empty,
    #[error("'{0}' is not a duration: write a whole number and a unit s, m, h or d, e.g. 90s, 15m, 1h, 30d, 1h30m")]
    Syntax(String),
    #[error("'{0}' has a unit out of order or twice: write e.g. 1d12h")]
    Order(String),
    #[error("'{0}' is longer than 100 years")]
    TooLong(String),
    #[error("'{0}' is zero: a duration must be at least 1s")]
    Zero(String),
}

/// The units, largest first: the letter, its seconds.
const UNITS: [(char, u64); 4] = [('d', 86_400), ('h', 3600), ('m', 60), ('s', 1)];

/// Reads a duration in the grammar of the module doc. Zero is accepted
/// (`0s`, `0`): a grace period may be zero; callers that need more say so.
pub fn parse(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(DurationError::Empty);
    }
    let too_long = || DurationError::TooLong(trimmed.to_owned());
    let seconds = if trimmed.bytes().all(|b| b.is_ascii_digit()) {
        // A bare number: seconds.
        trimmed.parse::<u64>().map_err(|_| too_long())?
    } else {
        parse_units(trimmed)?
    };
    if seconds > MAX_SECONDS {
        return Err(too_long());
    }
    Ok(Duration::from_secs(seconds))
}

/// `N unit` groups, units strictly decreasing; the total in seconds.
fn parse_units(text: &str) -> Result<u64, DurationError> {
    let syntax = || DurationError::Syntax(text.to_owned());
    let too_long = || DurationError::TooLong(text.to_owned());
    let mut total: u64 = 0;
    let mut number: Option<u64> = None;
    // The index in UNITS of the last unit read: the next must be smaller.
    let mut last: Option<usize> = None;
    for c in text.chars() {
        if let Some(digit) = c.to_digit(10) {
            let n = number.unwrap_or(0);
            number = Some(
                n.checked_mul(10)
                    .and_then(|n| n.checked_add(u64::from(digit)))
                    .ok_or_else(too_long)?,
            );
            continue;
        }
        let rank = UNITS.iter().position(|(u, _)| *u == c).ok_or_else(syntax)?;
        let n = number.take().ok_or_else(syntax)?;
        if last.is_some_and(|last| rank <= last) {
            return Err(DurationError::Order(text.to_owned()));
        }
        last = Some(rank);
        total = n
            .checked_mul(UNITS[rank].1)
            .and_then(|s| total.checked_add(s))
            .ok_or_else(too_long)?;
    }
    if number.is_some() {
        // Digits with no unit after them, after a unit (`1h30`).
        return Err(syntax());
    }
    Ok(total)
}

/// Writes `d` (whole seconds) in the largest units, e.g. `1d2h`, `1m30s`,
/// `0s`; [`parse`] reads it back to the same value.
pub fn format(d: Duration) -> String {
    let mut rest = d.as_secs();
    if rest == 0 {
        return "0s".to_owned();
    }
    let mut out = String::new();
    for (unit, seconds) in UNITS {
        if rest >= seconds {
            out.push_str(&(rest / seconds).to_string());
            out.push(unit);
            rest %= seconds;
        }
    }
    out
}

/// A parsed, non-zero duration of whole seconds (`--ttl`, `--max-ttl`, ...).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TtlText(Duration);

impl TtlText {
    pub fn as_duration(self) -> Duration {
        self.0
    }

    pub fn as_secs(self) -> u64 {
        self.0.as_secs()
    }

    /// From whole seconds; `None` for 0 or more than 100 years.
    pub fn from_secs(secs: u64) -> Option<TtlText> {
        (secs != 0 && secs <= MAX_SECONDS).then(|| TtlText(Duration::from_secs(secs)))
    }
}

impl FromStr for TtlText {
    type Err = DurationError;

    /// [`parse`], then zero is refused.
    fn from_str(text: &str) -> Result<TtlText, DurationError> {
        let d = parse(text)?;
        if d.is_zero() {
            return Err(DurationError::Zero(text.trim().to_owned()));
        }
        Ok(TtlText(d))
    }
}

impl fmt::Display for TtlText {
    /// As [`format`]: the largest units, e.g. `1d2h`, `90s` -> `1m30s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format(self.0))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn secs(text: &str) -> u64 {
        parse(text).unwrap().as_secs()
    }

    #[test]
    fn every_form_either_parser_took_is_read() {
        // INTERFACE.md's examples and the compound forms (`--ttl` took them).
        assert_eq!(secs("90s"), 90);
        assert_eq!(secs("15m"), 900);
        assert_eq!(secs("1h"), 3600);
        assert_eq!(secs("30d"), 30 * 86_400);
        assert_eq!(secs("1h30m"), 5400);
        assert_eq!(secs("1d2h3m4s"), 93_784);
        assert_eq!(secs("1d4s"), 86_404);
        // What the rotation flags took: a bare number of seconds, zero,
        // surrounding whitespace.
        assert_eq!(secs("90"), 90);
        assert_eq!(secs("0"), 0);
        assert_eq!(secs("0s"), 0);
        assert_eq!(secs(" 15m "), 900);
        assert_eq!(secs("36500d"), MAX_SECONDS);
        // `--every 1h30m`, refused before, is a duration like any other.
        assert_eq!(secs("1h30m"), secs("90m"));
    }

    #[test]
    fn refusals_name_the_problem() {
        let err = |t: &str| parse(t).unwrap_err();
        assert_eq!(err(""), DurationError::Empty);
        assert_eq!(err("   "), DurationError::Empty);
        for bad in [
            "h", "1x", "1.5h", "-1s", "1 s", "1H", "1h30", "s1", "1h 30m",
        ] {
            assert!(matches!(err(bad), DurationError::Syntax(_)), "{bad}");
        }
        assert!(matches!(err("1m1h"), DurationError::Order(_)));
        assert!(matches!(err("1h1h"), DurationError::Order(_)));
        assert!(matches!(err("36501d"), DurationError::TooLong(_)));
        assert!(matches!(err("3153600001"), DurationError::TooLong(_)));
        for long in [
            "99999999999999999999999s",
            "99999999999999999d",
            "99999999999999999999",
        ] {
            assert!(matches!(err(long), DurationError::TooLong(_)), "{long}");
        }
        assert!(err("1x").to_string().contains("90s, 15m, 1h, 30d"));
    }

    #[test]
    fn ttl_text_is_the_same_grammar_without_zero() {
        let ttl = |t: &str| t.parse::<TtlText>();
        assert_eq!(ttl("1h30m").unwrap().as_secs(), 5400);
        assert_eq!(ttl("90").unwrap().as_secs(), 90);
        assert!(matches!(ttl("0s"), Err(DurationError::Zero(_))));
        assert!(matches!(ttl("0"), Err(DurationError::Zero(_))));
        assert!(matches!(ttl("1x"), Err(DurationError::Syntax(_))));
        assert_eq!(TtlText::from_secs(90).unwrap().to_string(), "1m30s");
        assert_eq!(TtlText::from_secs(0), None);
    }

    #[test]
    fn format_prints_the_largest_units() {
        assert_eq!(format(Duration::ZERO), "0s");
        assert_eq!(format(Duration::from_secs(90)), "1m30s");
        assert_eq!(format(Duration::from_secs(3600)), "1h");
        assert_eq!(format(Duration::from_secs(5400)), "1h30m");
        assert_eq!(format(Duration::from_secs(86_401)), "1d1s");
    }

    /// Print then parse gives the value back, over edges and a spread of
    /// pseudo-random values (a fixed sequence: the test is repeatable).
    #[test]
    fn print_then_parse_round_trips() {
        let mut values = vec![0, 1, 59, 60, 61, 3599, 3600, 86_399, 86_400, MAX_SECONDS];
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for _ in 0..10_000 {
            // xorshift64
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            // Small values as often as large ones.
            let bound = [100, 10_000, 1_000_000, MAX_SECONDS + 1][(x % 4) as usize];
            values.push((x >> 2) % bound);
        }
        for s in values {
            let d = Duration::from_secs(s);
            assert_eq!(parse(&format(d)), Ok(d), "{s}");
            if let Some(t) = TtlText::from_secs(s) {
                assert_eq!(t.to_string().parse::<TtlText>(), Ok(t), "{s}");
            }
        }
    }
}
