//! The seal parameters, the Shamir split of the root key and the text form
//! of an unseal share.
//!
//! The split is vsss-rs' `Gf256` (constant-time GF(2^8) arithmetic), one
//! polynomial per key byte, share numbers 1..=N. A share is 33 bytes: its
//! number, then one evaluation per key byte. With one share and threshold 1
//! the polynomial is the constant secret, so the share is `1 || root key`
//! (vsss-rs refuses k = 1; the arithmetic is the same).
//!
//! Known limit: vsss-rs does not zeroize its polynomial coefficients or the
//! intermediate vector it builds while combining; everything this module
//! holds is in `Zeroizing`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use vsss_rs::Gf256;
use zeroize::Zeroizing;

use super::{BarrierError, KEY_LEN};
use crate::storage::StorageError;

/// Share number (1 byte) then one byte per root key byte.
pub(crate) const SHARE_LEN: usize = 1 + KEY_LEN;
/// Bytes that identify a vault in its seal record and its shares.
pub(crate) const VAULT_ID_LEN: usize = 8;
/// The text form starts with this; `u` for unseal, `1` for the layout version.
pub(crate) const SHARE_PREFIX: &str = "kwu1_";

const PAYLOAD_LEN: usize = VAULT_ID_LEN + 1 + SHARE_LEN;
const RAW_LEN: usize = PAYLOAD_LEN + 4;
/// base64url without padding of `RAW_LEN` (46) bytes.
const ENCODED_LEN: usize = (RAW_LEN * 4).div_ceil(3);
/// Room for decoding `ENCODED_LEN` characters (base64's estimate rounds up).
const DECODE_BUF_LEN: usize = ENCODED_LEN.div_ceil(4) * 3;

/// One share's bytes, zeroized on drop.
pub(crate) type ShareBytes = Zeroizing<[u8; SHARE_LEN]>;

/// The plaintext seal configuration (`sys/seal`), validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SealConfig {
    pub vault_id: [u8; VAULT_ID_LEN],
    pub shares: u8,
    pub threshold: u8,
}

/// The stored form of `SealConfig`, as JSON.
#[derive(Serialize, Deserialize)]
struct SealRecord {
    version: u32,
    vault_id: String,
    shares: u8,
    threshold: u8,
}

const SEAL_RECORD_VERSION: u32 = 1;

/// Refuses split parameters that cannot work or that defeat the split.
pub(crate) fn check_parameters(shares: u8, threshold: u8) -> Result<(), BarrierError> {
    if shares == 0 {
        return Err(BarrierError::InvalidSealParameters(
            "shares must be at least 1",
        ));
    }
    if threshold == 0 {
        return Err(BarrierError::InvalidSealParameters(
            "threshold must be at least 1",
        ));
    }
    if threshold > shares {
        return Err(BarrierError::InvalidSealParameters(
            "threshold must not exceed the number of shares",
        ));
    }
    if threshold == 1 && shares > 1 {
        return Err(BarrierError::InvalidSealParameters(
            "threshold must be at least 2 unless there is exactly 1 share \
             (with threshold 1 every share would be a full copy of the root key)",
        ));
    }
    Ok(())
}

impl SealConfig {
    pub(crate) fn new(
        vault_id: [u8; VAULT_ID_LEN],
        shares: u8,
        threshold: u8,
    ) -> Result<Self, BarrierError> {
        check_parameters(shares, threshold)?;
        Ok(Self {
            vault_id,
            shares,
            threshold,
        })
    }

    pub(crate) fn to_record(self) -> Result<Vec<u8>, StorageError> {
        serde_json::to_vec(&SealRecord {
            version: SEAL_RECORD_VERSION,
            vault_id: hex::encode(self.vault_id),
            shares: self.shares,
            threshold: self.threshold,
        })
        .map_err(|_| StorageError::Corrupt("sys/seal: cannot encode the seal record".into()))
    }

    pub(crate) fn from_record(bytes: &[u8]) -> Result<Self, StorageError> {
        let corrupt = |what: &str| StorageError::Corrupt(format!("sys/seal: {what}"));
        let record: SealRecord =
            serde_json::from_slice(bytes).map_err(|_| corrupt("not a seal record"))?;
        if record.version != SEAL_RECORD_VERSION {
            return Err(corrupt("unknown seal record version"));
        }
        let mut vault_id = [0u8; VAULT_ID_LEN];
        hex::decode_to_slice(&record.vault_id, &mut vault_id)
            .map_err(|_| corrupt("malformed vault id"))?;
        Self::new(vault_id, record.shares, record.threshold)
            .map_err(|_| corrupt("invalid share count or threshold"))
    }
}

/// Splits the root key into `shares` shares of which `threshold` rebuild it.
/// Parameters must have passed `check_parameters`.
pub(crate) fn split(
    root_key: &[u8; KEY_LEN],
    shares: u8,
    threshold: u8,
) -> Result<Vec<ShareBytes>, BarrierError> {
    let split_failed = BarrierError::Crypto("splitting the root key failed");
    if shares == 1 {
        let mut share: ShareBytes = Zeroizing::new([0u8; SHARE_LEN]);
        share[0] = 1;
        share[1..].copy_from_slice(root_key);
        return Ok(vec![share]);
    }
    let rng = getrandom::rand_core::UnwrapErr(getrandom::SysRng);
    let raw = Zeroizing::new(
        Gf256::split_array(
            usize::from(threshold),
            usize::from(shares),
            &root_key[..],
            rng,
        )
        .map_err(|_| split_failed)?,
    );
    let mut out = Vec::with_capacity(raw.len());
    for bytes in raw.iter() {
        let mut share: ShareBytes = Zeroizing::new([0u8; SHARE_LEN]);
        if bytes.len() != SHARE_LEN {
            return Err(BarrierError::Crypto(
                "splitting the root key gave a share of the wrong size",
            ));
        }
        share.copy_from_slice(bytes);
        out.push(share);
    }
    Ok(out)
}

/// Rebuilds the root key from shares with distinct numbers. With fewer than
/// the threshold, or a wrong share, the result is some other key: only the
/// keyring's authentication tag tells.
pub(crate) fn combine(shares: &[ShareBytes]) -> Result<Zeroizing<[u8; KEY_LEN]>, BarrierError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    match shares {
        [] => return Err(BarrierError::Crypto("no share to combine")),
        [only] => key.copy_from_slice(&only[1..]),
        many => {
            // Exact capacities: nothing is reallocated, so nothing is left behind.
            let mut owned: Zeroizing<Vec<Vec<u8>>> = Zeroizing::new(Vec::with_capacity(many.len()));
            for share in many {
                owned.push(share.to_vec());
            }
            let combined = Zeroizing::new(
                Gf256::combine_array(&owned[..])
                    .map_err(|_| BarrierError::Crypto("combining the shares failed"))?,
            );
            if combined.len() != KEY_LEN {
                return Err(BarrierError::Crypto(
                    "combining the shares gave a key of the wrong size",
                ));
            }
            key.copy_from_slice(&combined);
        }
    }
    Ok(key)
}

/// A share read from its text form. Holds key material: no `Debug`.
pub(crate) struct ParsedShare {
    pub vault_id: [u8; VAULT_ID_LEN],
    pub threshold: u8,
    pub share: ShareBytes,
}

impl ParsedShare {
    /// The share number, 1..=255.
    pub(crate) fn number(&self) -> u8 {
        self.share[0]
    }
}

/// The text form: `kwu1_` then base64url (no padding) of
/// `vault id (8) || threshold (1) || share number (1) || share (32) || CRC-32 (4, BE)`,
/// the CRC-32 (IEEE) taken over the 42 bytes before it. 67 characters in all.
pub(crate) fn encode(
    vault_id: &[u8; VAULT_ID_LEN],
    threshold: u8,
    share: &[u8; SHARE_LEN],
) -> Result<Zeroizing<String>, BarrierError> {
    let mut raw = Zeroizing::new([0u8; RAW_LEN]);
    raw[..VAULT_ID_LEN].copy_from_slice(vault_id);
    raw[VAULT_ID_LEN] = threshold;
    raw[VAULT_ID_LEN + 1..PAYLOAD_LEN].copy_from_slice(share);
    let crc = crc32fast::hash(&raw[..PAYLOAD_LEN]);
    raw[PAYLOAD_LEN..].copy_from_slice(&crc.to_be_bytes());

    let mut encoded = Zeroizing::new([0u8; ENCODED_LEN]);
    let written = URL_SAFE_NO_PAD
        .encode_slice(&raw[..], &mut encoded[..])
        .map_err(|_| BarrierError::Crypto("encoding a share failed"))?;
    let mut text = Zeroizing::new(String::with_capacity(SHARE_PREFIX.len() + ENCODED_LEN));
    text.push_str(SHARE_PREFIX);
    for &byte in &encoded[..written] {
        text.push(char::from(byte));
    }
    Ok(text)
}

/// Reads the text form. Leading and trailing whitespace is ignored (shares
/// are pasted). Errors say which rule failed, never what the text held.
pub(crate) fn parse(text: &str) -> Result<ParsedShare, BarrierError> {
    let text = text.trim();
    let body = text
        .strip_prefix(SHARE_PREFIX)
        .ok_or(BarrierError::MalformedShare("it does not start with kwu1_"))?;
    if body.len() != ENCODED_LEN {
        return Err(BarrierError::MalformedShare("it has the wrong length"));
    }
    let mut raw = Zeroizing::new([0u8; DECODE_BUF_LEN]);
    let len = URL_SAFE_NO_PAD
        .decode_slice(body.as_bytes(), &mut raw[..])
        .map_err(|_| BarrierError::MalformedShare("it is not base64url text"))?;
    if len != RAW_LEN {
        return Err(BarrierError::MalformedShare("it has the wrong length"));
    }
    let mut crc = [0u8; 4];
    crc.copy_from_slice(&raw[PAYLOAD_LEN..RAW_LEN]);
    if crc32fast::hash(&raw[..PAYLOAD_LEN]) != u32::from_be_bytes(crc) {
        return Err(BarrierError::MalformedShare(
            "its checksum does not match: it was probably mistyped",
        ));
    }
    let mut vault_id = [0u8; VAULT_ID_LEN];
    vault_id.copy_from_slice(&raw[..VAULT_ID_LEN]);
    let threshold = raw[VAULT_ID_LEN];
    let mut share: ShareBytes = Zeroizing::new([0u8; SHARE_LEN]);
    share.copy_from_slice(&raw[VAULT_ID_LEN + 1..PAYLOAD_LEN]);
    if share[0] == 0 {
        return Err(BarrierError::MalformedShare("its share number is 0"));
    }
    if threshold == 0 {
        return Err(BarrierError::MalformedShare("its threshold is 0"));
    }
    Ok(ParsedShare {
        vault_id,
        threshold,
        share,
    })
}

/// Reads a share's text form and writes it back: the entry point of the
/// share fuzz target and its corpus replay (a share that parses must come
/// back as the same text, whitespace trimmed). Not an API: hidden from docs.
#[doc(hidden)]
pub fn share_text_round_trip(text: &str) -> Result<Zeroizing<String>, BarrierError> {
    let parsed = parse(text)?;
    encode(&parsed.vault_id, parsed.threshold, &parsed.share)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key() -> Zeroizing<[u8; KEY_LEN]> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::try_from(i).unwrap().wrapping_mul(37).wrapping_add(11);
        }
        key
    }

    #[test]
    fn parameters_are_checked() {
        for (shares, threshold) in [(1, 1), (2, 2), (5, 3), (255, 255), (255, 2)] {
            check_parameters(shares, threshold).unwrap();
        }
        for (shares, threshold) in [(0, 0), (1, 0), (3, 4), (3, 1), (255, 1)] {
            assert!(matches!(
                check_parameters(shares, threshold),
                Err(BarrierError::InvalidSealParameters(_))
            ));
        }
        let error = check_parameters(5, 1).unwrap_err().to_string();
        assert!(
            error.contains("at least 2 unless there is exactly 1 share"),
            "{error}"
        );
    }

    #[test]
    fn split_and_combine_every_threshold_subset() {
        let key = key();
        let shares = split(&key, 5, 3).unwrap();
        assert_eq!(shares.len(), 5);
        let numbers: Vec<u8> = shares.iter().map(|s| s[0]).collect();
        assert_eq!(numbers, [1, 2, 3, 4, 5]);
        for a in 0..5 {
            for b in a + 1..5 {
                for c in b + 1..5 {
                    let subset = [shares[a].clone(), shares[b].clone(), shares[c].clone()];
                    assert_eq!(*combine(&subset).unwrap(), *key);
                }
                // Two shares of a 3-of-5 give some other key.
                let pair = [shares[a].clone(), shares[b].clone()];
                assert_ne!(*combine(&pair).unwrap(), *key);
            }
        }
    }

    #[test]
    fn one_share_is_the_key_itself() {
        let key = key();
        let shares = split(&key, 1, 1).unwrap();
        assert_eq!(shares.len(), 1);
        assert_eq!(shares[0][0], 1);
        assert_eq!(*combine(&shares).unwrap(), *key);
    }

    #[test]
    fn text_form_round_trips() {
        let shares = split(&key(), 3, 2).unwrap();
        let vault_id = [9u8; VAULT_ID_LEN];
        let text = encode(&vault_id, 2, &shares[1]).unwrap();
        assert!(text.starts_with(SHARE_PREFIX));
        assert_eq!(text.len(), 67);
        assert!(text[SHARE_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'));
        let parsed = parse(&format!("  {}\n", text.as_str())).unwrap();
        assert_eq!(parsed.vault_id, vault_id);
        assert_eq!(parsed.threshold, 2);
        assert_eq!(parsed.number(), 2);
        assert_eq!(*parsed.share, *shares[1]);
    }

    #[test]
    fn every_single_character_typo_is_caught() {
        let shares = split(&key(), 3, 2).unwrap();
        let text = encode(&[1u8; VAULT_ID_LEN], 2, &shares[0]).unwrap();
        let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
        for position in SHARE_PREFIX.len()..text.len() {
            for &replacement in alphabet {
                let mut typo = text.as_bytes().to_vec();
                if typo[position] == replacement {
                    continue;
                }
                typo[position] = replacement;
                let typo = String::from_utf8(typo).unwrap();
                assert!(
                    matches!(parse(&typo), Err(BarrierError::MalformedShare(_))),
                    "a typo at {position} was accepted"
                );
            }
        }
    }

    #[test]
    fn malformed_texts_are_refused_with_a_reason() {
        let shares = split(&key(), 3, 2).unwrap();
        let text = encode(&[1u8; VAULT_ID_LEN], 2, &shares[0]).unwrap();
        let cases = [
            String::new(),
            "kwu2_".to_string() + &text[5..],
            text[..text.len() - 1].to_string(),
            format!("{}A", text.as_str()),
            format!("{}!{}", &text[..10], &text[11..]),
            "kwt_abc".to_string(),
        ];
        for case in cases {
            let error = match parse(&case) {
                Err(BarrierError::MalformedShare(reason)) => reason,
                Err(other) => unreachable!("unexpected error {other}"),
                Ok(_) => unreachable!("accepted a malformed share"),
            };
            assert!(!error.contains(&text[5..15]), "{error}");
        }
    }

    #[test]
    fn seal_record_round_trips_and_is_checked() {
        let config = SealConfig::new([7u8; VAULT_ID_LEN], 5, 3).unwrap();
        let record = config.to_record().unwrap();
        assert_eq!(SealConfig::from_record(&record).unwrap(), config);
        let bad = br#"{"version":1,"vault_id":"0707070707070707","shares":3,"threshold":1}"#;
        assert!(matches!(
            SealConfig::from_record(bad),
            Err(StorageError::Corrupt(_))
        ));
        assert!(matches!(
            SealConfig::from_record(b"nope"),
            Err(StorageError::Corrupt(_))
        ));
    }
}

/// Split and combine against the definition of a threshold scheme, over
/// random keys and every (shares, threshold) up to 5.
#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Every (shares, threshold) that `check_parameters` accepts, N <= 5.
    fn parameters() -> impl Strategy<Value = (u8, u8)> {
        (1u8..=5)
            .prop_flat_map(|n| (Just(n), if n == 1 { 1u8..=1 } else { 2u8..=n }))
            .prop_filter("accepted parameters", |(n, k)| {
                check_parameters(*n, *k).is_ok()
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig {
            failure_persistence: None,
            ..ProptestConfig::with_cases(64)
        })]

        /// Every subset of at least `threshold` shares rebuilds the key;
        /// every non-empty smaller subset gives some other key.
        #[test]
        fn every_threshold_subset_and_no_smaller_one_rebuilds_the_key(
            key in prop::array::uniform32(any::<u8>()),
            (shares, threshold) in parameters(),
        ) {
            let split = split(&key, shares, threshold).unwrap();
            prop_assert_eq!(split.len(), usize::from(shares));
            for subset in 1u32..(1 << shares) {
                let chosen: Vec<ShareBytes> = split
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| subset & (1 << i) != 0)
                    .map(|(_, share)| share.clone())
                    .collect();
                let combined = combine(&chosen).unwrap();
                if chosen.len() >= usize::from(threshold) {
                    prop_assert_eq!(*combined, key, "subset {:b}", subset);
                } else {
                    prop_assert_ne!(*combined, key, "subset {:b}", subset);
                }
            }
        }

        /// The text form reads back to the same vault, threshold and share.
        #[test]
        fn the_text_form_round_trips(
            vault_id in prop::array::uniform8(any::<u8>()),
            threshold in 1u8..,
            number in 1u8..,
            body in prop::array::uniform32(any::<u8>()),
        ) {
            let mut share = [0u8; SHARE_LEN];
            share[0] = number;
            share[1..].copy_from_slice(&body);
            let text = encode(&vault_id, threshold, &share).unwrap();
            let parsed = parse(&format!(" {}\n", text.as_str())).unwrap();
            prop_assert_eq!(parsed.vault_id, vault_id);
            prop_assert_eq!(parsed.threshold, threshold);
            prop_assert_eq!(*parsed.share, share);
            let printed = share_text_round_trip(&text).unwrap();
            prop_assert_eq!(printed.as_str(), text.as_str());
        }
    }
}
