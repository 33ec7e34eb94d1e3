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
//! *reservation*: how far the term's count has been handed out. A node takes
//! a *range* of the count, `reserved..reserved + block` (capped at the
//! term's limit), by writing the record with the higher reservation before
//! it makes any encryption in that range; on a shared store (etcd) that
//! write is a compare-and-swap, so two nodes never hold overlapping ranges
//! and the stored reservation bounds the encryptions of the whole cluster.
//! A term costs one keyring write per block (`RESERVATION_BLOCK` by
//! default). On unseal a node holds no range: its count starts at the
//! stored reservation (the process may have died anywhere inside its last
//! range), so the count can only be overestimated, never under.
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

    /// Takes the next range of `term`'s count: `(start, end)` with
    /// `end = min(start + block, limit)`, where `start` is the stored
    /// reservation, and raises the reservation to `end`. `None` when the
    /// term is used up (its reservation reached `limit`).
    pub(crate) fn take_range(
        &mut self,
        term: u32,
        block: u64,
        limit: u64,
    ) -> Result<Option<(u64, u64)>, BarrierError> {
        let index = term
            .checked_sub(1)
            .and_then(|i| usize::try_from(i).ok())
            .filter(|&i| i < self.terms.len())
            .ok_or(BarrierError::Crypto(
                "reserving encryptions for an unknown term",
            ))?;
        let record = &mut self.terms[index];
        let start = record.reserved;
        if start >= limit {
            return Ok(None);
        }
        let end = start.saturating_add(block.max(1)).min(limit);
        record.reserved = end;
        Ok(Some((start, end)))
    }

    /// Whether `newer` keeps every term of this record unchanged (same key,
    /// reservation never lower) and the same derivation root: what another
    /// node may write. Anything else (a term removed or replaced, a
    /// reservation rolled back) is refused by the caller.
    pub(crate) fn is_extended_by(&self, newer: &KeyringRecord) -> bool {
        if newer.terms.len() < self.terms.len() {
            return false;
        }
        let same = |a: &[u8], b: &[u8]| {
            a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
        };
        let root_same = same(&self.derivation_root[..], &newer.derivation_root[..]);
        let terms_same = self.terms.iter().zip(&newer.terms).all(|(old, new)| {
            old.term == new.term && new.reserved >= old.reserved && same(&old.key[..], &new.key[..])
        });
        root_same && terms_same && newer.active >= self.active
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

/// The active term and this node's range of its count.
pub(crate) struct ActiveTerm {
    pub term: u32,
    /// This node may make encryptions number `start + 1 ..= end` of the
    /// term: a range taken in the stored keyring (see `take_range`).
    pub start: u64,
    pub end: u64,
    /// Encryptions taken from the range (or begun); past `end - start` the
    /// caller takes the next range instead.
    pub taken: AtomicU64,
}

impl ActiveTerm {
    fn empty_at(term: u32, at: u64) -> Self {
        Self {
            term,
            start: at,
            end: at,
            taken: AtomicU64::new(0),
        }
    }

    /// Where this node's count of the term stands (start of the range plus
    /// what it used of it).
    pub fn position(&self) -> u64 {
        let used = self
            .taken
            .load(std::sync::atomic::Ordering::Relaxed)
            .min(self.end - self.start);
        self.start + used
    }
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
    /// Prepares every term of `record`. The node holds no range yet: its
    /// count of the active term starts at the stored reservation.
    pub(crate) fn new(
        unsealed: Arc<Unsealed>,
        record: &KeyringRecord,
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
            active: ActiveTerm::empty_at(record.active, reserved),
        })
    }

    /// The snapshot after `record`, which extends this snapshot's keyring
    /// (see `KeyringRecord::is_extended_by`): only the new terms' keys are
    /// prepared. The node holds no range of the active term.
    pub(crate) fn extended(&self, record: &KeyringRecord) -> Result<Self, BarrierError> {
        let mut keys = Vec::with_capacity(record.terms.len());
        keys.extend(self.keys.iter().cloned());
        for term in record.terms.iter().skip(self.keys.len()) {
            keys.push(Arc::new(aead_key(&term.key)?));
        }
        let reserved = record.term(record.active).map_or(0, |t| t.reserved);
        Ok(Self {
            unsealed: Arc::clone(&self.unsealed),
            keys,
            active: ActiveTerm::empty_at(record.active, reserved),
        })
    }

    /// The same keys with the range `start..end` of the active term.
    pub(crate) fn with_range(&self, start: u64, end: u64) -> Self {
        Self {
            unsealed: Arc::clone(&self.unsealed),
            keys: self.keys.clone(),
            active: ActiveTerm {
                term: self.active.term,
                start,
                end,
                taken: AtomicU64::new(0),
            },
        }
    }

    /// How many terms are prepared.
    pub(crate) fn terms(&self) -> usize {
        self.keys.len()
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
        record.take_range(1, RESERVATION_BLOCK, u64::MAX).unwrap();
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
    fn ranges_follow_each_other_up_to_the_limit() {
        let rng = SystemRandom::new();
        let mut record = KeyringRecord::generate(&rng).unwrap();
        assert_eq!(record.take_range(1, 4, 10).unwrap(), Some((0, 4)));
        assert_eq!(record.take_range(1, 4, 10).unwrap(), Some((4, 8)));
        assert_eq!(record.take_range(1, 4, 10).unwrap(), Some((8, 10)));
        assert_eq!(record.take_range(1, 4, 10).unwrap(), None);
        assert_eq!(record.terms[0].reserved, 10);
        assert!(record.take_range(2, 4, 10).is_err());
    }

    #[test]
    fn only_an_extension_is_accepted() {
        let rng = SystemRandom::new();
        let mut old = KeyringRecord::generate(&rng).unwrap();
        old.take_range(1, 8, 100).unwrap();
        let mut newer = old.with_new_term(&rng).unwrap();
        newer.take_range(1, 8, 100).unwrap();
        assert!(old.is_extended_by(&newer));
        assert!(old.is_extended_by(&old.clone()));
        assert!(!newer.is_extended_by(&old), "a term removed");
        let mut rolled_back = old.clone();
        rolled_back.terms[0].reserved = 0;
        assert!(!old.is_extended_by(&rolled_back), "a reservation lowered");
        let mut replaced = newer.clone();
        replaced.terms[0].key = random_key(&rng).unwrap();
        assert!(!old.is_extended_by(&replaced), "a term key replaced");
        let mut other_root = newer.clone();
        other_root.derivation_root = random_key(&rng).unwrap();
        assert!(!old.is_extended_by(&other_root), "another derivation root");
    }
}
