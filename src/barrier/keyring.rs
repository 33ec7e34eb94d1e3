//! The keyring: term keys, their encryption counters and the derivation root.
//!
//! Stored at `sys/keyring` as an envelope of term 0 (the root key) over this
//! binary record (all integers big-endian):
//!
//! ```text
//! "KWKR" || version (1) = 1 || derivation root (32) || active term (u32) || term count (u32)
//!   || per term, in order 1..=count: term (u32) || reserved encryptions (u64) || key (32)
//! ```
//!
//! Encryptions are counted in memory; the record holds, per term, a
//! *reservation*: a count the term may reach before the record must be
//! written again. A reservation is written before any encryption above the
//! old one is made, in blocks of `RESERVATION_BLOCK`, so a term costs one
//! keyring write per block. On unseal the active term's count is taken to be
//! its whole reservation (the process may have died anywhere inside it): the
//! count can only be overestimated, never under.
//!
//! Binary rather than JSON so that no key ever sits in an intermediate
//! `String` that is not zeroized.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use ring::aead::{LessSafeKey, UnboundKey, AES_256_GCM};
use zeroize::Zeroizing;

use super::{random_key, BarrierError, Key, KEY_LEN};
use crate::storage::StorageError;

/// Encryptions reserved per keyring write.
pub(crate) const RESERVATION_BLOCK: u64 = 65_536;

const MAGIC: &[u8; 4] = b"KWKR";
const VERSION: u8 = 1;
const HEAD_LEN: usize = 4 + 1 + KEY_LEN + 4 + 4;
const TERM_RECORD_LEN: usize = 4 + 8 + KEY_LEN;

/// One term as stored. Holds key material: no `Debug`.
#[derive(Clone)]
pub(crate) struct TermRecord {
    pub term: u32,
    pub reserved: u64,
    pub key: Key,
}

/// The whole keyring as stored. Holds key material: no `Debug`.
///
/// `terms[i]` is term `i + 1`. Vectors of terms are always built with their
/// exact capacity, so growing one never leaves a copy of a key behind in
/// freed memory.
pub(crate) struct KeyringRecord {
    pub derivation_root: Key,
    pub active: u32,
    pub terms: Vec<TermRecord>,
}

fn corrupt(what: &str) -> StorageError {
    StorageError::Corrupt(format!("sys/keyring: {what}"))
}

impl Clone for KeyringRecord {
    fn clone(&self) -> Self {
        let mut terms = Vec::with_capacity(self.terms.len());
        terms.extend(self.terms.iter().cloned());
        Self {
            derivation_root: self.derivation_root.clone(),
            active: self.active,
            terms,
        }
    }
}

impl KeyringRecord {
    /// A fresh keyring: a random derivation root and term 1.
    pub(crate) fn generate(rng: &ring::rand::SystemRandom) -> Result<Self, BarrierError> {
        // `vec!` of one element has capacity 1.
        let terms = vec![TermRecord {
            term: 1,
            reserved: 0,
            key: random_key(rng)?,
        }];
        Ok(Self {
            derivation_root: random_key(rng)?,
            active: 1,
            terms,
        })
    }

    /// This keyring with one more term, made active.
    pub(crate) fn with_new_term(
        &self,
        rng: &ring::rand::SystemRandom,
    ) -> Result<Self, BarrierError> {
        let term = u32::try_from(self.terms.len())
            .ok()
            .and_then(|n| n.checked_add(1))
            .ok_or(BarrierError::Crypto(
                "the keyring has no room for another term",
            ))?;
        let mut terms = Vec::with_capacity(self.terms.len() + 1);
        terms.extend(self.terms.iter().cloned());
        terms.push(TermRecord {
            term,
            reserved: 0,
            key: random_key(rng)?,
        });
        Ok(Self {
            derivation_root: self.derivation_root.clone(),
            active: term,
            terms,
        })
    }

    /// The stored record of `term`, if the keyring has it.
    pub(crate) fn term(&self, term: u32) -> Option<&TermRecord> {
        let index = usize::try_from(term.checked_sub(1)?).ok()?;
        self.terms.get(index)
    }

    /// Raises `term`'s reservation so that encryption number `count` is
    /// covered: to the next block boundary, capped at `limit` (the term is
    /// retired there anyway). Returns the new reservation.
    pub(crate) fn reserve(
        &mut self,
        term: u32,
        count: u64,
        limit: u64,
    ) -> Result<u64, BarrierError> {
        let index = term
            .checked_sub(1)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < self.terms.len())
            .ok_or(BarrierError::Crypto(
                "reserving encryptions for an unknown term",
            ))?;
        let record = &mut self.terms[index];
        let block_end = count
            .div_ceil(RESERVATION_BLOCK)
            .saturating_mul(RESERVATION_BLOCK);
        record.reserved = record.reserved.max(block_end.min(limit)).max(count);
        Ok(record.reserved)
    }

    pub(crate) fn encode(&self) -> Zeroizing<Vec<u8>> {
        let mut out = Zeroizing::new(Vec::with_capacity(
            HEAD_LEN + self.terms.len() * TERM_RECORD_LEN,
        ));
        out.extend_from_slice(MAGIC);
        out.push(VERSION);
        out.extend_from_slice(&self.derivation_root[..]);
        out.extend_from_slice(&self.active.to_be_bytes());
        // At most u32::MAX terms: `with_new_term` refuses more.
        let count = u32::try_from(self.terms.len()).unwrap_or(u32::MAX);
        out.extend_from_slice(&count.to_be_bytes());
        for term in &self.terms {
            out.extend_from_slice(&term.term.to_be_bytes());
            out.extend_from_slice(&term.reserved.to_be_bytes());
            out.extend_from_slice(&term.key[..]);
        }
        out
    }

    pub(crate) fn decode(bytes: &[u8]) -> Result<Self, StorageError> {
        let mut reader = Reader(bytes);
        if reader.take(4)? != MAGIC {
            return Err(corrupt("not a keyring record"));
        }
        if reader.take(1)? != [VERSION] {
            return Err(corrupt("unknown keyring record version"));
        }
        let derivation_root = reader.key()?;
        let active = reader.u32()?;
        let count = usize::try_from(reader.u32()?).map_err(|_| corrupt("too many terms"))?;
        if count == 0 {
            return Err(corrupt("no term"));
        }
        if reader.0.len() != count.saturating_mul(TERM_RECORD_LEN) {
            return Err(corrupt("wrong length"));
        }
        let mut terms = Vec::with_capacity(count);
        for index in 0..count {
            let term = reader.u32()?;
            if usize::try_from(term).ok() != Some(index + 1) {
                return Err(corrupt("terms out of order"));
            }
            let reserved = reader.u64()?;
            terms.push(TermRecord {
                term,
                reserved,
                key: reader.key()?,
            });
        }
        if active == 0 || usize::try_from(active).map_or(true, |a| a > count) {
            return Err(corrupt("the active term is missing"));
        }
        Ok(Self {
            derivation_root,
            active,
            terms,
        })
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], StorageError> {
        if self.0.len() < n {
            return Err(corrupt("truncated"));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }

    fn u32(&mut self) -> Result<u32, StorageError> {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(self.take(4)?);
        Ok(u32::from_be_bytes(bytes))
    }

    fn u64(&mut self) -> Result<u64, StorageError> {
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(self.take(8)?);
        Ok(u64::from_be_bytes(bytes))
    }

    fn key(&mut self) -> Result<Key, StorageError> {
        let mut key = Zeroizing::new([0u8; KEY_LEN]);
        key.copy_from_slice(self.take(KEY_LEN)?);
        Ok(key)
    }
}

/// An AES-256-GCM key prepared for use.
///
/// Known limit: ring does not zeroize a key schedule on drop; the raw key
/// bytes we hold are zeroized.
pub(crate) fn aead_key(key: &[u8; KEY_LEN]) -> Result<LessSafeKey, BarrierError> {
    UnboundKey::new(&AES_256_GCM, key)
        .map(LessSafeKey::new)
        .map_err(|_| BarrierError::Crypto("preparing a key failed"))
}

/// What stays in memory while unsealed and changes only at unseal.
pub(crate) struct Unsealed {
    /// Kept to re-encrypt the keyring when a term is added or a reservation
    /// raised.
    pub root_key: Key,
    /// HKDF input of `Barrier::derive_key`; independent of the terms.
    pub derivation_root: Key,
}

/// The active term and its counters.
pub(crate) struct ActiveTerm {
    pub term: u32,
    /// Encryptions made (or begun) under this term.
    pub count: AtomicU64,
    /// Encryptions the stored keyring allows before it must be written again.
    pub reserved: AtomicU64,
}

/// An immutable snapshot of the prepared keys, swapped whole when a term is
/// added. The hot path clones the `Arc` and drops the lock before any I/O.
pub(crate) struct KeySet {
    pub unsealed: Arc<Unsealed>,
    /// `keys[i]` is term `i + 1`, prepared once per unseal and shared (not
    /// copied) by the snapshots that follow a new term.
    keys: Vec<Arc<LessSafeKey>>,
    pub active: ActiveTerm,
}

impl KeySet {
    /// Prepares every term of `record`; the active term starts at `count`.
    pub(crate) fn new(
        unsealed: Arc<Unsealed>,
        record: &KeyringRecord,
        count: u64,
    ) -> Result<Self, BarrierError> {
        let keys = record
            .terms
            .iter()
            .map(|term| aead_key(&term.key).map(Arc::new))
            .collect::<Result<Vec<_>, _>>()?;
        let reserved = record.term(record.active).map_or(0, |t| t.reserved);
        Ok(Self {
            unsealed,
            keys,
            active: ActiveTerm {
                term: record.active,
                count: AtomicU64::new(count),
                reserved: AtomicU64::new(reserved),
            },
        })
    }

    /// The snapshot after `record`, which is this snapshot's keyring plus
    /// one new active term: only the new term's key is prepared.
    pub(crate) fn with_new_term(&self, record: &KeyringRecord) -> Result<Self, BarrierError> {
        let new = record
            .term(record.active)
            .filter(|term| usize::try_from(term.term).ok() == Some(self.keys.len() + 1))
            .ok_or(BarrierError::Crypto(
                "the new term does not follow the current ones",
            ))?;
        let mut keys = Vec::with_capacity(self.keys.len() + 1);
        keys.extend(self.keys.iter().cloned());
        keys.push(Arc::new(aead_key(&new.key)?));
        Ok(Self {
            unsealed: Arc::clone(&self.unsealed),
            keys,
            active: ActiveTerm {
                term: new.term,
                count: AtomicU64::new(0),
                reserved: AtomicU64::new(new.reserved),
            },
        })
    }

    /// The prepared key of `term`, if the keyring has it.
    pub(crate) fn key(&self, term: u32) -> Option<&LessSafeKey> {
        let index = usize::try_from(term.checked_sub(1)?).ok()?;
        self.keys.get(index).map(|key| &**key)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use ring::rand::SystemRandom;

    use super::*;

    #[test]
    fn record_round_trips() {
        let rng = SystemRandom::new();
        let mut record = KeyringRecord::generate(&rng)
            .unwrap()
            .with_new_term(&rng)
            .unwrap();
        record.reserve(1, 5, u64::MAX).unwrap();
        let decoded = KeyringRecord::decode(&record.encode()).unwrap();
        assert_eq!(decoded.active, 2);
        assert_eq!(*decoded.derivation_root, *record.derivation_root);
        assert_eq!(decoded.terms.len(), 2);
        for (a, b) in decoded.terms.iter().zip(&record.terms) {
            assert_eq!((a.term, a.reserved, *a.key), (b.term, b.reserved, *b.key));
        }
        assert_eq!(decoded.terms[0].reserved, RESERVATION_BLOCK);
        assert_ne!(*decoded.terms[0].key, *decoded.terms[1].key);
    }

    #[test]
    fn damaged_records_are_refused() {
        let rng = SystemRandom::new();
        let good = KeyringRecord::generate(&rng).unwrap().encode();
        let mut cases: Vec<Vec<u8>> = vec![Vec::new(), good[..good.len() - 1].to_vec()];
        let mut longer = good.to_vec();
        longer.push(0);
        cases.push(longer);
        let mut magic = good.to_vec();
        magic[0] = b'X';
        cases.push(magic);
        let mut version = good.to_vec();
        version[4] = 2;
        cases.push(version);
        let mut active = good.to_vec();
        active[HEAD_LEN - 5] = 9; // active term 9 of 1
        cases.push(active);
        let mut order = good.to_vec();
        order[HEAD_LEN + 3] = 2; // the first term says it is term 2
        cases.push(order);
        for case in cases {
            assert!(matches!(
                KeyringRecord::decode(&case),
                Err(StorageError::Corrupt(_))
            ));
        }
    }

    #[test]
    fn reservations_grow_by_blocks_up_to_the_limit() {
        let rng = SystemRandom::new();
        let mut record = KeyringRecord::generate(&rng).unwrap();
        assert_eq!(record.reserve(1, 1, u64::MAX).unwrap(), RESERVATION_BLOCK);
        assert_eq!(
            record.reserve(1, RESERVATION_BLOCK, u64::MAX).unwrap(),
            RESERVATION_BLOCK
        );
        assert_eq!(
            record.reserve(1, RESERVATION_BLOCK + 1, u64::MAX).unwrap(),
            2 * RESERVATION_BLOCK
        );
        assert_eq!(
            record.reserve(1, 3, 10).unwrap(),
            2 * RESERVATION_BLOCK,
            "never lowered"
        );
        let mut small = KeyringRecord::generate(&rng).unwrap();
        assert_eq!(small.reserve(1, 3, 10).unwrap(), 10);
        assert!(small.reserve(2, 1, 10).is_err());
    }
}
