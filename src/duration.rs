//! `TtlText`: a duration as users write it (INTERFACE.md): a whole number and
//! a unit, `90s`, `15m`, `1h`, `30d`, or several in decreasing order without
//! spaces (`1h30m`). Pure: no storage, no clock.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// The longest duration accepted: 100 years.
pub const MAX_SECONDS: u64 = 100 * 365 * 86_400;

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration: write e.g. 90s, 15m, 1h or 30d")]
    Empty,
    #[error("'{0}' is not a duration: write a whole number and a unit s, m, h or d, e.g. 90s, 15m, 1h, 30d")]
    Syntax(String),
    #[error("'{0}' has a unit out of order or twice: write e.g. 1d12h")]
    Order(String),
    #[error("'{0}' is longer than 100 years")]
    TooLong(String),
    #[error("'{0}' is zero: a duration must be at least 1s")]
    Zero(String),
}

/// A parsed, non-zero duration of whole seconds.
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

fn unit_seconds(unit: char) -> Option<(u64, u8)> {
    match unit {
        's' => Some((1, 0)),
        'm' => Some((60, 1)),
        'h' => Some((3600, 2)),
        'd' => Some((86_400, 3)),
        _ => None,
    }
}

impl FromStr for TtlText {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<TtlText, DurationError> {
        if text.is_empty() {
            return Err(DurationError::Empty);
        }
        let syntax = || DurationError::Syntax(text.to_owned());
        let too_long = || DurationError::TooLong(text.to_owned());
        let mut total: u64 = 0;
        let mut number: Option<u64> = None;
        let mut last_rank: Option<u8> = None;
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
            let (seconds, rank) = unit_seconds(c).ok_or_else(syntax)?;
            let n = number.take().ok_or_else(syntax)?;
            if last_rank.is_some_and(|last| rank >= last) {
                return Err(DurationError::Order(text.to_owned()));
            }
            last_rank = Some(rank);
            total = n
                .checked_mul(seconds)
                .and_then(|s| total.checked_add(s))
                .ok_or_else(too_long)?;
        }
        if number.is_some() {
            // Digits with no unit after them.
            return Err(syntax());
        }
        if total > MAX_SECONDS {
            return Err(too_long());
        }
        if total == 0 {
            return Err(DurationError::Zero(text.to_owned()));
        }
        Ok(TtlText(Duration::from_secs(total)))
    }
}

impl fmt::Display for TtlText {
    /// The shortest form in the largest units, e.g. `1d2h`, `90s` -> `1m30s`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0.as_secs();
        for (unit, seconds) in [('d', 86_400), ('h', 3600), ('m', 60), ('s', 1)] {
            if rest >= seconds {
                write!(f, "{}{unit}", rest / seconds)?;
                rest %= seconds;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn secs(text: &str) -> u64 {
        text.parse::<TtlText>().unwrap().as_secs()
    }

    #[test]
    fn interface_examples() {
        assert_eq!(secs("90s"), 90);
        assert_eq!(secs("15m"), 900);
        assert_eq!(secs("1h"), 3600);
        assert_eq!(secs("30d"), 30 * 86_400);
        assert_eq!(secs("1h30m"), 5400);
        assert_eq!(secs("1d2h3m4s"), 93_784);
    }

    #[test]
    fn refusals_name_the_problem() {
        let err = |t: &str| t.parse::<TtlText>().unwrap_err();
        assert_eq!(err(""), DurationError::Empty);
        for bad in ["10", "h", "1x", "1.5h", "-1s", " 1s", "1s ", "1 s", "1H"] {
            assert!(matches!(err(bad), DurationError::Syntax(_)), "{bad}");
        }
        assert!(matches!(err("1m1h"), DurationError::Order(_)));
        assert!(matches!(err("1h1h"), DurationError::Order(_)));
        assert!(matches!(err("0s"), DurationError::Zero(_)));
        assert!(matches!(err("36501d"), DurationError::TooLong(_)));
        assert!(matches!(
            err("99999999999999999999999s"),
            DurationError::TooLong(_)
        ));
        assert!(err("1x").to_string().contains("90s, 15m, 1h, 30d"));
    }

    #[test]
    fn display_round_trips() {
        for t in ["90s", "15m", "1h", "30d", "1d2h3m4s"] {
            let d: TtlText = t.parse().unwrap();
            assert_eq!(d.to_string().parse::<TtlText>().unwrap(), d);
        }
        assert_eq!(TtlText::from_secs(90).unwrap().to_string(), "1m30s");
    }
}
