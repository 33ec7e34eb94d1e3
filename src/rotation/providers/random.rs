//! `random`: regenerates some fields of a secret (passwords, API keys) and
//! keeps the others. Nothing outside keyward holds the value, so apply, verify
//! and retire have nothing to do.
//!
//! Settings: `fields=password` (comma list of fields to regenerate),
//! `length=32` (8 to 4096 characters), `charset=alnum|ascii|hex|base64`.
//! Characters are drawn from ring's `SystemRandom` by rejection sampling, so
//! each character of the set is equally likely.

use zeroize::Zeroizing;

use ring::rand::{SecureRandom, SystemRandom};

use crate::rotation::provider::{
    BoxFuture, Provider, ProviderError, ProviderSettings, RotationInput,
};
use crate::secrecy::{SecretBytes, SecretData};

/// The shortest and longest values `length` accepts.
pub const MIN_LENGTH: usize = 8;
pub const MAX_LENGTH: usize = 4096;
/// The longest field name `fields` accepts, and how many fields it may name.
pub const MAX_FIELD_NAME_LEN: usize = 128;
pub const MAX_FIELDS: usize = 64;

const KEYS: [&str; 3] = ["fields", "length", "charset"];

/// The characters a generated value is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charset {
    /// `A-Z a-z 0-9` (62): safe in URLs, SQL literals and shells.
    Alnum,
    /// The 94 printable ASCII characters, space excluded.
    Ascii,
    /// `0-9 a-f`.
    Hex,
    /// The standard base64 alphabet `A-Z a-z 0-9 + /` (no padding).
    Base64,
}

const ALNUM: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
const BASE64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
const HEX: &[u8] = b"0123456789abcdef";
const ASCII: &[u8] = b"!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~";

impl Charset {
    /// The name used in settings.
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "alnum" => Some(Self::Alnum),
            "ascii" => Some(Self::Ascii),
            "hex" => Some(Self::Hex),
            "base64" => Some(Self::Base64),
            _ => None,
        }
    }

    pub fn alphabet(self) -> &'static [u8] {
        match self {
            Self::Alnum => ALNUM,
            Self::Ascii => ASCII,
            Self::Hex => HEX,
            Self::Base64 => BASE64,
        }
    }
}

/// `length` characters of `charset` from the system's random generator,
/// each character of the set equally likely.
pub fn random_string(length: usize, charset: Charset) -> Result<SecretBytes, ProviderError> {
    let alphabet = charset.alphabet();
    let size = alphabet.len();
    // Bytes at or above the largest multiple of `size` below 256 are dropped,
    // so `byte % size` is uniform (rejection sampling, no modulo bias).
    let limit = 256 - 256 % size;
    let rng = SystemRandom::new();
    let mut out = Zeroizing::new(Vec::with_capacity(length));
    let mut buf = Zeroizing::new(vec![0u8; length.clamp(16, 1024)]);
    while out.len() < length {
        rng.fill(&mut buf).map_err(|_| {
            ProviderError::Internal("the system random number generator failed".into())
        })?;
        for &byte in buf.iter() {
            if usize::from(byte) < limit {
                out.push(alphabet[usize::from(byte) % size]);
                if out.len() == length {
                    break;
                }
            }
        }
    }
    Ok(SecretBytes::new(std::mem::take(&mut *out)))
}

/// Parsed settings of the `random` provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RandomSettings {
    pub fields: Vec<String>,
    pub length: usize,
    pub charset: Charset,
}

impl RandomSettings {
    pub fn parse(settings: &ProviderSettings) -> Result<Self, ProviderError> {
        settings.only_keys(&KEYS)?;
        let fields = match settings.get("fields") {
            None => vec!["password".to_owned()],
            Some(list) => {
                let mut fields = Vec::new();
                for field in list.split(',').map(str::trim) {
                    let well_formed = !field.is_empty()
                        && field.len() <= MAX_FIELD_NAME_LEN
                        && field
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
                    if !well_formed {
                        return Err(ProviderError::InvalidSettings(format!(
                            "`fields`: a field name is 1 to {MAX_FIELD_NAME_LEN} characters of [A-Za-z0-9_.-]"
                        )));
                    }
                    if fields.iter().any(|f| f == field) {
                        return Err(ProviderError::InvalidSettings(
                            "`fields` names a field twice".into(),
                        ));
                    }
                    fields.push(field.to_owned());
                }
                if fields.len() > MAX_FIELDS {
                    return Err(ProviderError::InvalidSettings(format!(
                        "`fields` names more than {MAX_FIELDS} fields"
                    )));
                }
                fields
            }
        };
        let length = match settings.get("length") {
            None => 32,
            Some(text) => text
                .trim()
                .parse::<usize>()
                .ok()
                .filter(|n| (MIN_LENGTH..=MAX_LENGTH).contains(n))
                .ok_or_else(|| {
                    ProviderError::InvalidSettings(format!(
                        "`length` must be a whole number from {MIN_LENGTH} to {MAX_LENGTH}"
                    ))
                })?,
        };
        let charset = match settings.get("charset") {
            None => Charset::Alnum,
            Some(name) => Charset::parse(name.trim()).ok_or_else(|| {
                ProviderError::InvalidSettings(
                    "`charset` must be one of alnum, ascii, hex, base64".into(),
                )
            })?,
        };
        Ok(Self {
            fields,
            length,
            charset,
        })
    }
}

/// The `random` provider.
#[derive(Debug, Clone, Default)]
pub struct RandomProvider;

impl RandomProvider {
    pub fn new() -> Self {
        Self
    }
}

impl Provider for RandomProvider {
    fn name(&self) -> &str {
        "random"
    }

    fn validate(&self, settings: &ProviderSettings) -> Result<(), ProviderError> {
        RandomSettings::parse(settings).map(|_| ())
    }

    fn admin_secret_key(&self) -> Option<String> {
        None
    }

    /// The current value (if any) with each field of `fields` replaced.
    fn generate<'a>(
        &'a self,
        input: &'a RotationInput<'a>,
    ) -> BoxFuture<'a, Result<SecretData, ProviderError>> {
        Box::pin(async move {
            let settings = RandomSettings::parse(input.settings)?;
            let mut value = input.current.cloned().unwrap_or_default();
            for field in settings.fields {
                value.insert(field, random_string(settings.length, settings.charset)?);
            }
            Ok(value)
        })
    }

    fn apply<'a>(
        &'a self,
        _input: &'a RotationInput<'a>,
        _pending: &'a SecretData,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }

    fn verify<'a>(
        &'a self,
        _input: &'a RotationInput<'a>,
        _pending: &'a SecretData,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }

    fn retire<'a>(
        &'a self,
        _input: &'a RotationInput<'a>,
        _previous: &'a SecretData,
    ) -> BoxFuture<'a, Result<(), ProviderError>> {
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alphabets_have_the_documented_sizes() {
        assert_eq!(ALNUM.len(), 62);
        assert_eq!(ASCII.len(), 94);
        assert!(ASCII.iter().all(|b| (0x21..=0x7e).contains(b)));
        assert_eq!(BASE64.len(), 64);
        assert_eq!(HEX.len(), 16);
    }

    #[test]
    fn strings_have_the_length_and_charset() {
        for charset in [
            Charset::Alnum,
            Charset::Ascii,
            Charset::Hex,
            Charset::Base64,
        ] {
            for length in [8, 33, 4096] {
                let value = random_string(length, charset);
                let value = value.as_ref().map(SecretBytes::expose).unwrap_or_default();
                assert_eq!(value.len(), length);
                assert!(value.iter().all(|b| charset.alphabet().contains(b)));
            }
        }
    }
}
