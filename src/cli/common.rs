//! What every command module shares: the client options and connection made
//! from the global flags, and the conversions of wire values for printing
//! (timestamps, field values, "never"). Commands import these from here, never
//! from each other.

use std::io::Read;

use anyhow::{Context, Result};
use base64::Engine;
use serde_json::Value;

use super::output::Format;
use super::{Global, UsageError};
use keyward::client::{Client, ClientOptions};
use keyward::secrecy::{SecretBytes, SecretData};

/// The client options the global flags (and their `KEYWARD_*` variables) give.
pub(super) fn options(g: &Global) -> ClientOptions {
    ClientOptions {
        addr: g.addr.clone(),
        token: g.token.clone(),
        ca_cert: g.ca_cert.clone(),
        client_cert: g.client_cert.clone(),
        client_key: g.client_key.clone(),
        connect_timeout: None,
    }
}

pub(super) async fn connect(g: &Global) -> Result<Client> {
    Ok(Client::connect(options(g)).await?)
}

/// A timestamp as RFC 3339 text in UTC with milliseconds; `null` when absent
/// (or beyond what a calendar date can say).
pub(super) fn rfc3339(ts: &Option<prost_types::Timestamp>) -> Value {
    match ts {
        Some(t) => chrono::DateTime::from_timestamp(t.seconds, t.nanos.max(0) as u32)
            .map(|d| Value::String(d.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)))
            .unwrap_or(Value::Null),
        None => Value::Null,
    }
}

/// A token's expiry: absent is "never", which JSON says with `null` and a
/// table in words.
pub(super) fn expiry(format: Format, ts: &Option<prost_types::Timestamp>) -> Value {
    match (rfc3339(ts), format) {
        (Value::Null, Format::Table) => Value::String("never".into()),
        (v, _) => v,
    }
}

/// Seconds since the epoch (as the governance report gives them) as RFC 3339.
pub(super) fn rfc3339_unix(seconds: u64) -> Value {
    rfc3339(&Some(prost_types::Timestamp {
        seconds: i64::try_from(seconds).unwrap_or(i64::MAX),
        nanos: 0,
    }))
}

/// A count of seconds where the server says "never" with `u64::MAX` (a root
/// token's life). JSON gets `null`, because JSON readers that hold numbers as
/// doubles lose integers past 2^53; a table says `never`.
pub(super) fn seconds_or_never(format: Format, seconds: u64) -> Value {
    match (seconds, format) {
        (u64::MAX, Format::Json) => Value::Null,
        (u64::MAX, Format::Table) => Value::String("never".into()),
        (s, _) => Value::from(s),
    }
}

/// Text as JSON, `null` when empty (the wire's "not set").
pub(super) fn text_or_null(text: &str) -> Value {
    if text.is_empty() {
        Value::Null
    } else {
        Value::String(text.to_owned())
    }
}

/// A field value for printing: text as is, other bytes as `base64:...`.
pub(super) fn printable(v: &SecretBytes) -> Value {
    match v.expose_str() {
        Some(s) => Value::String(s.to_owned()),
        None => Value::String(format!(
            "base64:{}",
            base64::engine::general_purpose::STANDARD.encode(v.expose())
        )),
    }
}

/// Parses FIELD=VALUE, FIELD=@file and FIELD=- (stdin, once).
pub(super) fn parse_fields(args: &[String]) -> Result<SecretData> {
    let mut data = SecretData::new();
    let mut stdin_used = false;
    for (i, arg) in args.iter().enumerate() {
        // Never echo the argument: it may be a value typed without its name.
        let Some((name, value)) = arg.split_once('=') else {
            return Err(UsageError(format!("field argument {} is not FIELD=VALUE", i + 1)).into());
        };
        let bytes = if value == "-" {
            if stdin_used {
                return Err(UsageError("only one field can read stdin".into()).into());
            }
            stdin_used = true;
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("reading stdin")?;
            buf
        } else if let Some(file) = value.strip_prefix('@') {
            std::fs::read(file).with_context(|| format!("reading {file} for field {name}"))?
        } else {
            value.as_bytes().to_vec()
        };
        if data
            .insert(name.to_owned(), SecretBytes::new(bytes))
            .is_some()
        {
            return Err(UsageError(format!("field {name} is given twice")).into());
        }
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_is_null_in_json_and_never_in_a_table() {
        assert_eq!(seconds_or_never(Format::Json, u64::MAX), Value::Null);
        assert_eq!(seconds_or_never(Format::Table, u64::MAX), "never");
        assert_eq!(seconds_or_never(Format::Json, 86_400), 86_400);
        assert_eq!(seconds_or_never(Format::Table, 0), 0);
    }

    #[test]
    fn timestamps_past_the_calendar_are_null() {
        assert_eq!(rfc3339_unix(u64::MAX), Value::Null);
        assert_eq!(rfc3339_unix(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(&None), Value::Null);
        assert_eq!(expiry(Format::Json, &None), Value::Null);
        assert_eq!(expiry(Format::Table, &None), "never");
    }
}
