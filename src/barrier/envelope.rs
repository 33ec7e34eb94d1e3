//! The envelope around every stored value:
//!
//! ```text
//! term (u32, big-endian) || nonce (12 random bytes) || AES-256-GCM ciphertext || tag (16)
//! ```
//!
//! The associated data is the storage key, so an envelope copied under
//! another key fails to open. Term 0 is the root key (only `sys/keyring`);
//! terms 1.. are keyring terms.

use ring::aead::{Aad, LessSafeKey, Nonce, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::{Zeroize, Zeroizing};

use super::{BarrierError, Plaintext};

const TERM_LEN: usize = 4;
const HEADER_LEN: usize = TERM_LEN + NONCE_LEN;
/// AES-256-GCM tag length.
const TAG_LEN: usize = 16;
/// The smallest envelope: an empty value.
pub(crate) const MIN_LEN: usize = HEADER_LEN + TAG_LEN;

/// Encrypts `plaintext` under `key` with a fresh random nonce.
pub(crate) fn seal(
    key: &LessSafeKey,
    term: u32,
    aad: &[u8],
    plaintext: &[u8],
    rng: &SystemRandom,
) -> Result<Vec<u8>, BarrierError> {
    let mut nonce = [0u8; NONCE_LEN];
    rng.fill(&mut nonce)
        .map_err(|_| BarrierError::Crypto("the system random generator failed"))?;
    let mut out = Vec::with_capacity(MIN_LEN + plaintext.len());
    out.extend_from_slice(&term.to_be_bytes());
    out.extend_from_slice(&nonce);
    out.extend_from_slice(plaintext);
    let sealed = key.seal_in_place_separate_tag(
        Nonce::assume_unique_for_key(nonce),
        Aad::from(aad),
        &mut out[HEADER_LEN..],
    );
    match sealed {
        Ok(tag) => {
            out.extend_from_slice(tag.as_ref());
            Ok(out)
        }
        Err(_) => {
            // The buffer may still hold the plaintext.
            out.zeroize();
            Err(BarrierError::Crypto("encryption failed"))
        }
    }
}

/// The term an envelope was sealed under.
pub(crate) fn term(envelope: &[u8]) -> Result<u32, BarrierError> {
    if envelope.len() < MIN_LEN {
        return Err(BarrierError::Decrypt);
    }
    let mut term = [0u8; TERM_LEN];
    term.copy_from_slice(&envelope[..TERM_LEN]);
    Ok(u32::from_be_bytes(term))
}

/// Decrypts and authenticates an envelope; any failure is `Decrypt`.
pub(crate) fn open(
    key: &LessSafeKey,
    aad: &[u8],
    envelope: &[u8],
) -> Result<Plaintext, BarrierError> {
    if envelope.len() < MIN_LEN {
        return Err(BarrierError::Decrypt);
    }
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&envelope[TERM_LEN..HEADER_LEN]);
    let mut buffer = Zeroizing::new(envelope[HEADER_LEN..].to_vec());
    let len = key
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(aad),
            &mut buffer[..],
        )
        .map_err(|_| BarrierError::Decrypt)?
        .len();
    buffer.truncate(len);
    Ok(buffer)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use ring::aead::{UnboundKey, AES_256_GCM};

    use super::*;

    fn key(byte: u8) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &[byte; 32]).unwrap())
    }

    #[test]
    fn round_trip_and_layout() {
        let rng = SystemRandom::new();
        let envelope = seal(&key(1), 7, b"a/b", b"hello", &rng).unwrap();
        assert_eq!(envelope.len(), MIN_LEN + 5);
        assert_eq!(term(&envelope).unwrap(), 7);
        assert_eq!(&envelope[..4], &[0, 0, 0, 7]);
        assert_eq!(
            open(&key(1), b"a/b", &envelope).unwrap().as_slice(),
            b"hello"
        );
        // Nonces are fresh: the same value seals differently.
        assert_ne!(seal(&key(1), 7, b"a/b", b"hello", &rng).unwrap(), envelope);
        // The empty value is a value.
        let empty = seal(&key(1), 1, b"k", b"", &rng).unwrap();
        assert!(open(&key(1), b"k", &empty).unwrap().is_empty());
    }

    #[test]
    fn wrong_key_aad_or_any_flipped_bit_fails() {
        let rng = SystemRandom::new();
        let envelope = seal(&key(1), 1, b"a", b"value", &rng).unwrap();
        assert!(matches!(
            open(&key(2), b"a", &envelope),
            Err(BarrierError::Decrypt)
        ));
        assert!(matches!(
            open(&key(1), b"b", &envelope),
            Err(BarrierError::Decrypt)
        ));
        // Flipping a term bit is caught by the caller's term lookup; every
        // other bit is authenticated.
        for i in TERM_LEN..envelope.len() {
            let mut bad = envelope.clone();
            bad[i] ^= 0x01;
            assert!(
                matches!(open(&key(1), b"a", &bad), Err(BarrierError::Decrypt)),
                "{i}"
            );
        }
        assert!(matches!(
            open(&key(1), b"a", &envelope[..MIN_LEN - 1]),
            Err(BarrierError::Decrypt)
        ));
        assert!(matches!(term(&envelope[..3]), Err(BarrierError::Decrypt)));
    }
}
