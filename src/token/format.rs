//! The token text format: `kwt_` + 43 base62 characters of randomness + 6
//! base62 characters of the CRC32 of those 43, left-padded with `0`.
//!
//! The prefix and checksum let secret scanners recognise a leaked token offline
//! and let clients reject a mistyped one before a round trip. 43 base62
//! characters carry 256 bits of entropy (43 x log2(62) = 256.03). The CRC is
//! for recognition, not integrity: the server recognises a token only by the
//! hash of the whole text.
//!
//! Accessors (`kwa_` + 24 base62) name a token in lookups, audit records and
//! revocation without being able to use it; they are not secret.
//!
//! Pure: no storage, no clock; randomness comes from ring's `SystemRandom`.

use ring::error::Unspecified;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

pub const TOKEN_PREFIX: &str = "kwt_";
pub const ACCESSOR_PREFIX: &str = "kwa_";
/// Length of a token in bytes (all ASCII).
pub const TOKEN_LEN: usize = TOKEN_PREFIX.len() + BODY_LEN + CHECKSUM_LEN;
/// Length of an accessor in bytes (all ASCII).
pub const ACCESSOR_LEN: usize = ACCESSOR_PREFIX.len() + ACCESSOR_BODY_LEN;

const BODY_LEN: usize = 43;
const CHECKSUM_LEN: usize = 6;
const ACCESSOR_BODY_LEN: usize = 24;

/// Digits in value order, so a left-padding `0` is a zero digit.
const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// Random bytes at or above this are rejected: 248 = 4 x 62, so every
/// accepted byte maps to each character with probability exactly 4/248.
const REJECT_FROM: u8 = 248;
/// Fills of the random pool before giving up on a generator that returns
/// (almost) only rejected bytes; a working one needs one fill.
const MAX_FILLS: usize = 8;

/// Why a text is not a keyward token. Messages never contain the text.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenFormatError {
    #[error("not a keyward token: it does not start with kwt_")]
    WrongPrefix,
    #[error("not a keyward token: it is {len} bytes long, a token is {TOKEN_LEN}")]
    WrongLength { len: usize },
    #[error("not a keyward token: a character after kwt_ is outside [0-9A-Za-z]")]
    BadCharacter,
    #[error("token checksum does not match: the token was mistyped, truncated or altered")]
    BadChecksum,
    #[error("the system random number generator failed")]
    Random,
}

/// A token's text. Zeroized on drop; `Debug` prints `[redacted]`; no
/// `Display`, no `Serialize`, no `Clone`: call [`TokenSecret::expose`] where
/// the text must go (a response to its owner, a hash).
pub struct TokenSecret {
    text: Zeroizing<String>,
}

impl TokenSecret {
    /// A fresh token from the system's secure random generator.
    pub fn generate() -> Result<TokenSecret, TokenFormatError> {
        let rng = SystemRandom::new();
        let mut body = Zeroizing::new([0u8; BODY_LEN]);
        fill_base62(&mut body[..], |buf| rng.fill(buf))?;
        // Exactly TOKEN_LEN pushes into TOKEN_LEN capacity: the buffer never
        // moves, so no unzeroized copy is left behind.
        let mut text = Zeroizing::new(String::with_capacity(TOKEN_LEN));
        text.push_str(TOKEN_PREFIX);
        text.extend(body.iter().map(|b| char::from(*b)));
        text.extend(checksum(&body[..]).iter().map(|b| char::from(*b)));
        Ok(TokenSecret { text })
    }

    /// Checks, in order, the prefix, the length, the alphabet and the checksum.
    pub fn parse(text: &str) -> Result<TokenSecret, TokenFormatError> {
        validate(text)?;
        Ok(TokenSecret {
            text: Zeroizing::new(text.to_owned()),
        })
    }

    /// The token text; the caller must not log it.
    pub fn expose(&self) -> &str {
        &self.text
    }
}

impl std::fmt::Debug for TokenSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("TokenSecret([redacted])")
    }
}

/// Whether `text` is a well-formed keyward token with a valid checksum; for
/// secret scanners and log filters. Does not allocate.
pub fn looks_like_token(text: &str) -> bool {
    validate(text).is_ok()
}

/// A random accessor, `kwa_` + 24 base62 characters (143 bits), as tokens
/// stored before derived accessors have (tests build such stores).
#[cfg(test)]
pub fn new_accessor() -> Result<String, TokenFormatError> {
    let rng = SystemRandom::new();
    accessor_from(|buf| rng.fill(buf))
}

/// An accessor whose characters are drawn from the bytes `fill` gives, by
/// the same unbiased rejection as a random one: the token store derives a
/// token's accessor from a keyed hash of its text this way.
pub fn accessor_from(
    fill: impl FnMut(&mut [u8]) -> Result<(), Unspecified>,
) -> Result<String, TokenFormatError> {
    let mut body = [0u8; ACCESSOR_BODY_LEN];
    fill_base62(&mut body, fill)?;
    let mut accessor = String::with_capacity(ACCESSOR_LEN);
    accessor.push_str(ACCESSOR_PREFIX);
    accessor.extend(body.iter().map(|b| char::from(*b)));
    Ok(accessor)
}

/// Whether `text` has the shape of an accessor (accessors carry no checksum).
pub fn looks_like_accessor(text: &str) -> bool {
    text.len() == ACCESSOR_LEN
        && text
            .strip_prefix(ACCESSOR_PREFIX)
            .is_some_and(|body| body.bytes().all(is_base62))
}

fn validate(text: &str) -> Result<(), TokenFormatError> {
    let rest = text
        .strip_prefix(TOKEN_PREFIX)
        .ok_or(TokenFormatError::WrongPrefix)?;
    if text.len() != TOKEN_LEN {
        return Err(TokenFormatError::WrongLength { len: text.len() });
    }
    if !rest.bytes().all(is_base62) {
        return Err(TokenFormatError::BadCharacter);
    }
    let (body, sum) = rest.as_bytes().split_at(BODY_LEN);
    if checksum(body) != sum {
        return Err(TokenFormatError::BadChecksum);
    }
    Ok(())
}

fn is_base62(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// The CRC32 of `body` in 6 base62 digits, most significant first
/// (62^6 > 2^32, so every CRC fits).
fn checksum(body: &[u8]) -> [u8; CHECKSUM_LEN] {
    base62_digits(crc32fast::hash(body))
}

fn base62_digits(mut value: u32) -> [u8; CHECKSUM_LEN] {
    let mut out = [BASE62[0]; CHECKSUM_LEN];
    for slot in out.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    out
}

/// Fills `out` with uniformly random base62 characters, drawing bytes from
/// `fill` and rejecting those that would bias the result.
fn fill_base62(
    out: &mut [u8],
    mut fill: impl FnMut(&mut [u8]) -> Result<(), Unspecified>,
) -> Result<(), TokenFormatError> {
    let mut pool = Zeroizing::new([0u8; 64]);
    let mut slots = out.iter_mut().peekable();
    for _ in 0..MAX_FILLS {
        if slots.peek().is_none() {
            return Ok(());
        }
        fill(&mut pool[..]).map_err(|Unspecified| TokenFormatError::Random)?;
        for byte in pool.iter().filter(|b| **b < REJECT_FROM) {
            match slots.next() {
                Some(slot) => *slot = BASE62[usize::from(byte % 62)],
                None => break,
            }
        }
    }
    match slots.peek() {
        None => Ok(()),
        Some(_) => Err(TokenFormatError::Random),
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::panic,
    reason = "a test fails by panicking"
)]
mod tests {
    use super::*;

    fn tokens(n: usize) -> Vec<TokenSecret> {
        (0..n).map(|_| TokenSecret::generate().unwrap()).collect()
    }

    #[test]
    fn generated_tokens_have_the_format_and_round_trip() {
        for token in tokens(50) {
            let text = token.expose();
            assert_eq!(text.len(), TOKEN_LEN);
            assert_eq!(TOKEN_LEN, 53);
            assert!(text.starts_with("kwt_"));
            assert!(text[4..].bytes().all(|b| BASE62.contains(&b)));
            assert!(looks_like_token(text));
            assert_eq!(TokenSecret::parse(text).unwrap().expose(), text);
        }
        let a = TokenSecret::generate().unwrap();
        let b = TokenSecret::generate().unwrap();
        assert_ne!(a.expose(), b.expose());
    }

    #[test]
    fn every_single_character_change_is_caught() {
        let replacements: Vec<u8> = (0x20..0x7f).collect();
        for token in tokens(10) {
            let original = token.expose().as_bytes().to_vec();
            for position in 0..TOKEN_LEN {
                for &replacement in &replacements {
                    if original[position] == replacement {
                        continue;
                    }
                    let mut changed = original.clone();
                    changed[position] = replacement;
                    let changed = String::from_utf8(changed).unwrap();
                    let err = TokenSecret::parse(&changed).unwrap_err();
                    let expected = if position < TOKEN_PREFIX.len() {
                        err == TokenFormatError::WrongPrefix
                    } else if is_base62(replacement) {
                        err == TokenFormatError::BadChecksum
                    } else {
                        err == TokenFormatError::BadCharacter
                    };
                    assert!(expected, "position {position}: {err:?}");
                    assert!(!looks_like_token(&changed));
                }
            }
        }
    }

    #[test]
    fn prefix_and_length_are_checked_first() {
        let token = TokenSecret::generate().unwrap();
        let text = token.expose();
        for bad in [
            "",
            "kwt",
            "KWT_",
            &format!("kwa_{}", &text[4..]),
            &format!(" {text}"),
            &text.replace("kwt_", "kwt-"),
        ] {
            assert_eq!(
                TokenSecret::parse(bad).unwrap_err(),
                TokenFormatError::WrongPrefix,
                "{bad}"
            );
        }
        assert_eq!(
            TokenSecret::parse(&text[..52]).unwrap_err(),
            TokenFormatError::WrongLength { len: 52 }
        );
        assert_eq!(
            TokenSecret::parse(&format!("{text}0")).unwrap_err(),
            TokenFormatError::WrongLength { len: 54 }
        );
        assert_eq!(
            TokenSecret::parse(&format!("{text}\n")).unwrap_err(),
            TokenFormatError::WrongLength { len: 54 }
        );
        assert_eq!(
            TokenSecret::parse("kwt_").unwrap_err(),
            TokenFormatError::WrongLength { len: 4 }
        );
        // Same byte length, but a two-byte character: refused by the alphabet.
        let accented = format!("{}é", &text[..51]);
        assert_eq!(accented.len(), TOKEN_LEN);
        assert_eq!(
            TokenSecret::parse(&accented).unwrap_err(),
            TokenFormatError::BadCharacter
        );
    }

    #[test]
    fn errors_and_debug_never_show_the_text() {
        let token = TokenSecret::generate().unwrap();
        let body = &token.expose()[4..];
        let shown = format!("{token:?}");
        assert_eq!(shown, "TokenSecret([redacted])");
        assert!(!shown.contains(&body[..8]));
        let mut altered = token.expose().to_owned();
        altered.replace_range(10..11, if &altered[10..11] == "A" { "B" } else { "A" });
        for bad in [
            altered.clone(),
            altered[..40].to_owned(),
            format!("x{}", &altered[1..]),
            format!("{}!", &altered[..52]),
        ] {
            let message = TokenSecret::parse(&bad).unwrap_err().to_string();
            for window in bad.as_bytes()[4..].windows(5) {
                let window = std::str::from_utf8(window).unwrap();
                assert!(!message.contains(window), "{message}");
            }
        }
    }

    #[test]
    fn all_characters_appear_without_visible_bias() {
        let mut counts = [0usize; 256];
        for token in tokens(1000) {
            for b in token.expose()[4..4 + BODY_LEN].bytes() {
                counts[usize::from(b)] += 1;
            }
        }
        // 43 000 draws, 693.5 expected per character, standard deviation ~26.
        for &c in BASE62 {
            let n = counts[usize::from(c)];
            assert!(
                (450..950).contains(&n),
                "{} appeared {n} times",
                char::from(c)
            );
        }
        let total: usize = BASE62.iter().map(|c| counts[usize::from(*c)]).sum();
        assert_eq!(total, 43_000);
    }

    #[test]
    fn rejection_sampling_skips_biased_bytes() {
        let mut out = [0u8; 6];
        let mut calls = 0;
        fill_base62(&mut out, |buf| {
            calls += 1;
            buf.fill(255);
            let script = [0, 248, 61, 255, 62, 250, 247, 123, 186];
            buf[..script.len()].copy_from_slice(&script);
            Ok(())
        })
        .unwrap();
        // 0 -> '0', 61 -> 'z', 62 -> '0', 247 -> 247 % 62 = 61 -> 'z',
        // 123 -> 61 -> 'z', 186 -> 0 -> '0'; 248, 250 and 255 are skipped.
        assert_eq!(&out, b"0z0zz0");
        assert_eq!(calls, 1);

        // Only rejected bytes: give up rather than loop or bias.
        let mut out = [0u8; 6];
        let err = fill_base62(&mut out, |buf| {
            buf.fill(252);
            Ok(())
        })
        .unwrap_err();
        assert_eq!(err, TokenFormatError::Random);
        // A failing generator is reported.
        let err = fill_base62(&mut out, |_| Err(Unspecified)).unwrap_err();
        assert_eq!(err, TokenFormatError::Random);
    }

    #[test]
    fn checksum_digits_are_left_padded() {
        assert_eq!(&base62_digits(0), b"000000");
        assert_eq!(&base62_digits(61), b"00000z");
        assert_eq!(&base62_digits(62), b"000010");
        let max = base62_digits(u32::MAX);
        let decoded = max.iter().fold(0u64, |acc, d| {
            acc * 62 + BASE62.iter().position(|c| c == d).unwrap() as u64
        });
        assert_eq!(decoded, u64::from(u32::MAX));
        let body = [b'a'; BODY_LEN];
        assert_eq!(checksum(&body), base62_digits(crc32fast::hash(&body)));
        let text = format!(
            "kwt_{}{}",
            std::str::from_utf8(&body).unwrap(),
            std::str::from_utf8(&checksum(&body)).unwrap()
        );
        assert!(looks_like_token(&text));
    }

    #[test]
    fn accessors() {
        let a = new_accessor().unwrap();
        let b = new_accessor().unwrap();
        assert_ne!(a, b);
        assert_eq!(a.len(), 28);
        assert!(a.starts_with("kwa_"));
        assert!(looks_like_accessor(&a));
        assert!(!looks_like_token(&a));
        let token = TokenSecret::generate().unwrap();
        assert!(!looks_like_accessor(token.expose()));
        assert!(!looks_like_accessor(&a[..27]));
        assert!(!looks_like_accessor(&a.replace("kwa_", "kwt_")));
        assert!(!looks_like_accessor(&format!("{}-", &a[..27])));
    }
}
