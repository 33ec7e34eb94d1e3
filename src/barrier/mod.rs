//! Barrier: the seal, the keyring and the AEAD envelope around every stored value.
//!
//! Storage prefix: owns `sys/seal` (the only plaintext record: vault id, share
//! count, threshold) and `sys/keyring` (encrypted under the root key). Every
//! other key is written by a domain module through this type, which encrypts
//! the value with AES-256-GCM under the active keyring term and the storage key
//! as associated data: `term (4 bytes BE) || nonce (12) || ciphertext+tag`.
//! It knows nothing of secrets, tokens or policies. Domain keys starting with
//! `sys/seal` or `sys/keyring` are refused (`ReservedKey`) and never listed.
//!
//! # Parts
//!
//! - `shamir` — seal parameters, the split of the root key and the text
//!   form of a share;
//! - `keyring` — the keyring record, its terms and encryption counters;
//! - `envelope` — the AEAD envelope.
//!
//! # Seal
//!
//! `init` makes a random 256-bit root key, a random vault id (8 bytes) and a
//! keyring (a random derivation root and term 1, a random 256-bit key); it
//! writes `sys/seal` (JSON: `version`, `vault_id` in hex, `shares`,
//! `threshold`) and `sys/keyring` (the envelope of term 0, the root key, with
//! `sys/keyring` as associated data) in one batch, flushes, and returns the
//! shares. The root key is stored nowhere. The keyring's GCM tag is the
//! verifier: shares that rebuild a wrong key fail to open it (`WrongShares`,
//! progress back to 0).
//!
//! # Share text format
//!
//! `kwu1_` followed by base64url without padding (RFC 4648 §5) of 46 bytes:
//!
//! ```text
//! vault id (8) || threshold (1) || share number (1, 1..=255) || share (32) || CRC-32 (4, BE)
//! ```
//!
//! 67 ASCII characters in all, safe in shells, URLs and file names. The
//! CRC-32 (IEEE) covers the 42 bytes before it, so a mistyped share is
//! `MalformedShare` (every single-character typo is caught), a share of
//! another vault is `ShareOfAnotherVault`, and a share number already given
//! since the last reset is `DuplicateShare` and is not counted. The prefix
//! lets secret scanners recognise a leaked share. Shares given so far are
//! held in zeroized buffers; they are wiped at the threshold, on
//! `reset_unseal`, and on `seal`.
//!
//! # Keyring terms
//!
//! `rotate_key` adds a term and makes it active; older terms still decrypt.
//! Encryptions are counted per term; at `BarrierOptions::max_encryptions_per_term`
//! a new term is made automatically. Each node encrypts only inside a range
//! of the term's count that it took in the keyring record (see `keyring`);
//! on a shared store (etcd) ranges are taken by compare-and-swap, so the
//! limit holds for the whole cluster, and a restart starts after every
//! range handed out.
//!
//! On a shared store another node may add a term. This node loads it (after
//! checking that the stored keyring only extends the one it holds) at its
//! next encryption after the store's watch delivered the keyring write (the
//! barrier tracks `sys/keyring` in `storage::coherence`), when its own
//! keyring write meets the change, and before it reads a value sealed under
//! a term it does not know.
//!
//! # Concurrency
//!
//! The seal state sits under one `RwLock`. The hot path (`get`) takes the read
//! lock just long enough to clone an `Arc` of the prepared keys, then reads
//! the backend and decrypts without any lock. An encryption takes its number
//! from the active range with one atomic add. Writes of `sys/keyring` (a new
//! term, a new range, once per 65,536 encryptions), reloads and unseal are
//! serialized by a second mutex, always taken before the state lock.
//!
//! # Known limits
//!
//! ring's AES key schedules and HKDF state, and vsss-rs' polynomials, are not
//! zeroized on drop; every buffer of ours holding a key, a share or a
//! plaintext is.

mod envelope;
mod keyring;
pub mod restore;
mod shamir;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use zeroize::Zeroizing;

use crate::storage::{Backend, BatchOp, GroupCommit, StorageError};
use keyring::{KeySet, KeyringRecord, Unsealed};
#[doc(hidden)]
pub use shamir::share_text_round_trip;
use shamir::{SealConfig, ShareBytes};

/// Plaintext read back through the barrier; zeroized on drop.
pub type Plaintext = Zeroizing<Vec<u8>>;

#[derive(Debug, thiserror::Error)]
pub enum BarrierError {
    #[error("the vault is sealed")]
    Sealed,
    #[error("the vault is not initialized")]
    NotInitialized,
    #[error("the vault is already initialized")]
    AlreadyInitialized,
    #[error("invalid seal parameters: {0}")]
    InvalidSealParameters(&'static str),
    #[error("malformed unseal share: {0}")]
    MalformedShare(&'static str),
    #[error("the unseal share belongs to another vault")]
    ShareOfAnotherVault,
    #[error("this unseal share was already given")]
    DuplicateShare,
    #[error("the unseal shares do not open this vault; progress was reset")]
    WrongShares,
    #[error("stored value under a barrier key failed to decrypt")]
    Decrypt,
    /// The key starts with `sys/seal` or `sys/keyring`, which the barrier owns.
    #[error("the key is reserved for the barrier's own records")]
    ReservedKey,
    #[error("invalid barrier options: {0}")]
    InvalidOptions(&'static str),
    /// The random generator or a primitive failed; names the step only.
    #[error("cryptographic failure: {0}")]
    Crypto(&'static str),
    /// A restored store whose snapshot does not carry this vault's HMAC
    /// (see `restore`); the vault stays sealed.
    #[error("{0}")]
    SnapshotRejected(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

/// What the seal looks like now. Never holds key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealStatus {
    pub initialized: bool,
    pub sealed: bool,
    pub shares: u32,
    pub threshold: u32,
    /// Distinct shares given since the last unseal or reset.
    pub progress: u32,
    /// Active keyring term; 0 while sealed.
    pub key_term: u32,
    /// Encryptions made under the active term; 0 while sealed.
    pub term_encryptions: u64,
}

/// An unseal share as text; zeroized on drop, `Debug` hides it.
pub struct UnsealShare(pub Zeroizing<String>);

impl std::fmt::Debug for UnsealShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("UnsealShare([redacted])")
    }
}

/// Tunables; `Default` is what production uses.
#[derive(Debug, Clone)]
pub struct BarrierOptions {
    /// A new keyring term is made automatically after this many encryptions
    /// under one term (random 96-bit nonces stay safe far beyond it).
    pub max_encryptions_per_term: u64,
    /// Encryptions per range a node takes in the keyring record (one
    /// keyring write each). Smaller ranges waste less of a term when a node
    /// stops, and cost more writes.
    pub reservation_block: u64,
}

impl Default for BarrierOptions {
    fn default() -> Self {
        Self {
            max_encryptions_per_term: 1 << 30,
            reservation_block: keyring::RESERVATION_BLOCK,
        }
    }
}

/// Ranges of encryption counts a barrier remembers having taken (for
/// `Barrier::taken_ranges`); older ones are forgotten.
const RANGES_KEPT: usize = 4096;

/// A plaintext operation of an atomic batch.
pub enum PlainOp<'a> {
    Put(&'a str, &'a [u8]),
    Delete(&'a str),
}

/// One record of [`Barrier::scan_prefix_each`]: its key, and its value or
/// why it did not decrypt.
pub type EachRecord = (String, Result<Plaintext, BarrierError>);

pub(crate) const KEY_LEN: usize = 32;
/// A 256-bit key, zeroized on drop.
pub(crate) type Key = Zeroizing<[u8; KEY_LEN]>;

const SEAL_KEY: &str = "sys/seal";
// `restore::MARKER_KEY` (`sys/seal-restore`) falls under the `sys/seal` prefix.
const KEYRING_KEY: &str = "sys/keyring";
const RESERVED_PREFIXES: [&str; 2] = [SEAL_KEY, KEYRING_KEY];
/// The envelope term of a record under the root key.
const ROOT_TERM: u32 = 0;
/// HKDF salt of `derive_key`; changing it changes every derived key.
const DERIVE_SALT: &[u8] = b"keyward/barrier/derive_key/v1";

pub(crate) fn random_key(rng: &SystemRandom) -> Result<Key, BarrierError> {
    let mut key = Zeroizing::new([0u8; KEY_LEN]);
    rng.fill(&mut key[..])
        .map_err(|_| BarrierError::Crypto("the system random generator failed"))?;
    Ok(key)
}

fn is_reserved(key: &str) -> bool {
    RESERVED_PREFIXES
        .iter()
        .any(|prefix| key.starts_with(prefix))
}

fn check_key(key: &str) -> Result<(), BarrierError> {
    if is_reserved(key) {
        return Err(BarrierError::ReservedKey);
    }
    Ok(())
}

fn key_text(key: Vec<u8>) -> Result<String, BarrierError> {
    String::from_utf8(key)
        .map_err(|_| StorageError::Corrupt("a stored key is not UTF-8".into()).into())
}

enum SealState {
    /// No `sys/seal` in storage.
    Uninitialized,
    /// `given` holds the distinct shares given so far; its capacity is the
    /// threshold, so it never reallocates (and leaves no copy behind).
    Sealed {
        config: SealConfig,
        given: Vec<ShareBytes>,
    },
    /// `record` is the keyring as last written; `keys` its prepared form.
    Unsealed {
        config: SealConfig,
        record: KeyringRecord,
        keys: Arc<KeySet>,
    },
}

impl SealState {
    fn sealed(config: SealConfig) -> Self {
        Self::Sealed {
            config,
            given: Vec::with_capacity(usize::from(config.threshold)),
        }
    }

    fn status(&self, limit: u64) -> SealStatus {
        match self {
            Self::Uninitialized => SealStatus {
                initialized: false,
                sealed: true,
                shares: 0,
                threshold: 0,
                progress: 0,
                key_term: 0,
                term_encryptions: 0,
            },
            Self::Sealed { config, given } => SealStatus {
                initialized: true,
                sealed: true,
                shares: config.shares.into(),
                threshold: config.threshold.into(),
                progress: u32::try_from(given.len()).unwrap_or(u32::MAX),
                key_term: 0,
                term_encryptions: 0,
            },
            Self::Unsealed { config, keys, .. } => SealStatus {
                initialized: true,
                sealed: false,
                shares: config.shares.into(),
                threshold: config.threshold.into(),
                progress: 0,
                key_term: keys.active.term,
                // Attempts past the range wait for the next one; they are
                // not encryptions.
                term_encryptions: keys.active.position().min(limit),
            },
        }
    }
}

pub struct Barrier {
    backend: Arc<dyn Backend>,
    commit: GroupCommit,
    options: BarrierOptions,
    rng: SystemRandom,
    state: RwLock<SealState>,
    /// Serializes init, unseal and every write of `sys/keyring`, so that a
    /// keyring write never races another one or a reload. Taken before `state`.
    keyring_writes: Mutex<()>,
    /// The `sys/keyring` envelope this node last read or wrote; on a shared
    /// store a keyring write is a compare-and-swap against it, so a node
    /// never overwrites a term or reservation another node wrote.
    keyring_seen: Mutex<Option<Vec<u8>>>,
    /// `(term, start, end)` of the last ranges this barrier took.
    ranges: Mutex<std::collections::VecDeque<(u32, u64, u64)>>,
    /// Set by the store's watch (shared store only) when `sys/keyring`
    /// changed or the watch restarted; the next encryption reads the
    /// keyring first, so a term another node added is used at once.
    keyring_changed: Arc<AtomicBool>,
}

impl std::fmt::Debug for Barrier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Barrier")
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Barrier {
    /// Opens the barrier over a backend; it starts sealed (or uninitialized).
    pub fn new(backend: Arc<dyn Backend>, options: BarrierOptions) -> Result<Self, BarrierError> {
        if options.max_encryptions_per_term == 0 {
            return Err(BarrierError::InvalidOptions(
                "max_encryptions_per_term must be at least 1",
            ));
        }
        if options.reservation_block == 0 {
            return Err(BarrierError::InvalidOptions(
                "reservation_block must be at least 1",
            ));
        }
        let state = match backend.get(SEAL_KEY.as_bytes())? {
            Some(record) => SealState::sealed(SealConfig::from_record(&record)?),
            None => SealState::Uninitialized,
        };
        let keyring_changed = Arc::new(AtomicBool::new(false));
        if let Some(coherence) = backend.coherence() {
            // Every write of `sys/keyring` (by any node) reaches this node's
            // watch; so does a restart of the watch, after which a change
            // may have been missed.
            let changed = Arc::clone(&keyring_changed);
            let reset = Arc::clone(&keyring_changed);
            coherence.track(
                KEYRING_KEY,
                Arc::new(move |_: &str| changed.store(true, Ordering::Release)),
                Arc::new(move || reset.store(true, Ordering::Release)),
            );
        }
        Ok(Self {
            commit: GroupCommit::new(Arc::clone(&backend)),
            backend,
            options,
            rng: SystemRandom::new(),
            state: RwLock::new(state),
            keyring_writes: Mutex::new(()),
            keyring_seen: Mutex::new(None),
            ranges: Mutex::new(std::collections::VecDeque::new()),
            keyring_changed,
        })
    }

    pub fn status(&self) -> SealStatus {
        self.refresh_if_initialized_elsewhere();
        self.read().status(self.options.max_encryptions_per_term)
    }

    /// On a shared store, a barrier that opened before another node ran
    /// `init` reads the seal configuration again (it would stay
    /// "uninitialized" otherwise). A read error leaves the state as it is.
    fn refresh_if_initialized_elsewhere(&self) {
        if !self.backend.is_shared() || !matches!(*self.read(), SealState::Uninitialized) {
            return;
        }
        let Ok(Some(record)) = self.backend.get(SEAL_KEY.as_bytes()) else {
            return;
        };
        let Ok(config) = SealConfig::from_record(&record) else {
            return;
        };
        let mut state = self.write();
        if matches!(*state, SealState::Uninitialized) {
            *state = SealState::sealed(config);
        }
    }

    /// Makes a random 256-bit root key and keyring, splits the root key into
    /// `shares` shares of which `threshold` unseal, and leaves the barrier
    /// UNSEALED so the caller can write its first records; the caller seals.
    pub fn init(&self, shares: u8, threshold: u8) -> Result<Vec<UnsealShare>, BarrierError> {
        shamir::check_parameters(shares, threshold)?;
        let _writes = self.lock_keyring_writes();
        let mut state = self.write();
        if !matches!(*state, SealState::Uninitialized)
            || self.backend.get(SEAL_KEY.as_bytes())?.is_some()
        {
            return Err(BarrierError::AlreadyInitialized);
        }

        let mut vault_id = [0u8; shamir::VAULT_ID_LEN];
        self.rng
            .fill(&mut vault_id)
            .map_err(|_| BarrierError::Crypto("the system random generator failed"))?;
        let config = SealConfig::new(vault_id, shares, threshold)?;
        let root_key = random_key(&self.rng)?;
        let record = KeyringRecord::generate(&self.rng)?;

        let split = shamir::split(&root_key, shares, threshold)?;
        // Never hand out shares that do not give the key back.
        let check = shamir::combine(split.get(..usize::from(threshold)).unwrap_or(&[]))?;
        // Compared without an early exit, as any comparison of keys is.
        let difference = check
            .iter()
            .zip(root_key.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if difference != 0 {
            return Err(BarrierError::Crypto(
                "the split of the root key does not combine",
            ));
        }
        let texts = split
            .iter()
            .map(|share| shamir::encode(&vault_id, threshold, share).map(UnsealShare))
            .collect::<Result<Vec<_>, _>>()?;

        let keyring = self.seal_keyring(&root_key, &record)?;
        self.backend.batch(vec![
            BatchOp::Put(SEAL_KEY.into(), config.to_record()?),
            BatchOp::Put(KEYRING_KEY.into(), keyring.clone()),
        ])?;
        self.backend.flush()?;
        *self.keyring_seen() = Some(keyring);

        let unsealed = Arc::new(Unsealed {
            root_key,
            derivation_root: record.derivation_root.clone(),
        });
        let keys = Arc::new(KeySet::new(unsealed, &record)?);
        *state = SealState::Unsealed {
            config,
            record,
            keys,
        };
        tracing::info!(shares, threshold, "vault initialized");
        Ok(texts)
    }

    /// Adds one share; at the threshold, rebuilds the root key and opens the keyring.
    ///
    /// Any failure at the threshold (`WrongShares`, a storage error) resets
    /// the progress: the shares given are wiped. On an unsealed vault this
    /// returns the status and ignores the share.
    pub fn unseal(&self, share: &str) -> Result<SealStatus, BarrierError> {
        self.refresh_if_initialized_elsewhere();
        let _writes = self.lock_keyring_writes();
        let mut state = self.write();
        let limit = self.options.max_encryptions_per_term;
        let (config, given) = match &mut *state {
            SealState::Uninitialized => return Err(BarrierError::NotInitialized),
            SealState::Unsealed { .. } => return Ok(state.status(limit)),
            SealState::Sealed { config, given } => (*config, given),
        };

        let parsed = shamir::parse(share)?;
        if parsed.vault_id != config.vault_id {
            return Err(BarrierError::ShareOfAnotherVault);
        }
        if parsed.threshold != config.threshold {
            return Err(BarrierError::MalformedShare(
                "its threshold does not match this vault's seal",
            ));
        }
        if given.iter().any(|known| known[0] == parsed.number()) {
            return Err(BarrierError::DuplicateShare);
        }
        given.push(parsed.share);
        if given.len() < usize::from(config.threshold) {
            tracing::info!(
                progress = given.len(),
                threshold = config.threshold,
                "unseal share accepted"
            );
            return Ok(state.status(limit));
        }

        // At the threshold: whatever happens next, the shares are used up.
        let shares = std::mem::replace(given, Vec::with_capacity(usize::from(config.threshold)));
        let root_key = shamir::combine(&shares);
        drop(shares);
        let root_key = root_key?;
        let envelope = self
            .backend
            .get(KEYRING_KEY.as_bytes())?
            .ok_or_else(|| StorageError::Corrupt("sys/keyring is missing".into()))?;
        let record = match self.open_keyring(&root_key, &envelope) {
            Ok(record) => {
                *self.keyring_seen() = Some(envelope.clone());
                record
            }
            Err(error) => {
                if matches!(error, BarrierError::WrongShares) {
                    tracing::warn!("unseal failed: the shares do not open the keyring");
                }
                return Err(error);
            }
        };
        // A restored store opens only if its snapshot carries this vault's HMAC.
        restore::check_at_unseal(self.backend.as_ref(), &record.derivation_root)?;
        // The process may have died anywhere inside its last range: the
        // count starts after every range handed out (`KeySet::new`).
        let unsealed = Arc::new(Unsealed {
            root_key,
            derivation_root: record.derivation_root.clone(),
        });
        let keys = Arc::new(KeySet::new(unsealed, &record)?);
        tracing::info!(term = record.active, "vault unsealed");
        *state = SealState::Unsealed {
            config,
            record,
            keys,
        };
        Ok(state.status(limit))
    }

    /// Forgets the shares given so far.
    pub fn reset_unseal(&self) {
        if let SealState::Sealed { given, .. } = &mut *self.write() {
            given.clear();
        }
    }

    /// Drops all key material from memory.
    pub fn seal(&self) {
        let mut state = self.write();
        let config = match &*state {
            SealState::Uninitialized => return,
            SealState::Sealed { config, .. } | SealState::Unsealed { config, .. } => *config,
        };
        // Dropping the old state wipes the keyring record and the given
        // shares; the prepared keys go with the last in-flight snapshot.
        *state = SealState::sealed(config);
        tracing::info!("vault sealed");
    }

    /// Adds a keyring term and makes it active; returns the new term.
    pub fn rotate_key(&self) -> Result<u32, BarrierError> {
        self.add_term(None)
    }

    /// A 32-byte key derived from the keyring for `purpose` (HKDF-SHA256),
    /// stable across restarts and key rotations (audit HMAC, token hashing).
    ///
    /// The input is the keyring's derivation root, a random 256-bit value of
    /// its own, never a term key.
    pub fn derive_key(&self, purpose: &str) -> Result<Zeroizing<[u8; 32]>, BarrierError> {
        let keys = self.keys()?;
        derive_from_root(&keys.unsealed.derivation_root, purpose)
    }

    /// What a snapshot header names: the vault id (hex) and the active
    /// keyring term. Needs an unsealed vault.
    pub fn snapshot_identity(&self) -> Result<(String, u32), BarrierError> {
        match &*self.read() {
            SealState::Unsealed { config, keys, .. } => {
                Ok((hex::encode(config.vault_id), keys.active.term))
            }
            _ => Err(BarrierError::Sealed),
        }
    }

    /// Hands every stored pair as it was at one instant, ciphertext and the
    /// seal configuration as stored, to `sink` (see `storage`); returns the
    /// count. Needs an unsealed vault.
    pub fn export(&self, sink: &mut crate::storage::ExportSink<'_>) -> Result<u64, BarrierError> {
        self.keys()?;
        Ok(self.backend.export(sink)?)
    }

    /// Whether other nodes write the same store (see `Backend::is_shared`):
    /// callers must not cache stored records across requests then.
    pub fn is_shared_store(&self) -> bool {
        self.backend.is_shared()
    }

    /// On a shared store, where caches of stored records register the
    /// prefixes they are fed from (`storage::coherence`); `None` otherwise.
    pub fn coherence(&self) -> Option<&crate::storage::coherence::Coherence> {
        self.backend.coherence()
    }

    /// Whether those caches may serve a request that starts now: always on
    /// a store this process owns; on a shared store once the store's watch
    /// has delivered every change acknowledged before this call
    /// (`storage::coherence`). Call it once per request, at its start.
    pub fn cache_fence(&self) -> bool {
        self.backend.cache_fence()
    }

    /// [`Barrier::cache_fence`] for async callers: on a shared store it
    /// waits without holding the thread; on a store this process owns it
    /// is `true` at once.
    pub async fn cache_fence_async(&self) -> bool {
        if !self.backend.is_shared() {
            return self.backend.cache_fence();
        }
        self.backend.cache_fence_async().await
    }

    pub fn get(&self, key: &str) -> Result<Option<Plaintext>, BarrierError> {
        self.get_fenced(key, false)
    }

    /// [`Barrier::get`] for a request whose [`Barrier::cache_fence`] said
    /// `fresh`: on a shared store the stored value (ciphertext) may come
    /// from the backend's read cache (`storage::read_cache`); it is
    /// decrypted here each time, so no plaintext is cached.
    pub fn get_fenced(&self, key: &str, fresh: bool) -> Result<Option<Plaintext>, BarrierError> {
        check_key(key)?;
        let mut keys = self.keys()?;
        match self.backend.get_fenced(key.as_bytes(), fresh)? {
            Some(envelope) => self.decrypt(&mut keys, key, &envelope).map(Some),
            None => Ok(None),
        }
    }

    /// Asks the store to cache reads of values under `prefix` (see
    /// `Backend::cache_reads`); call it before the first read.
    pub fn cache_reads(&self, prefix: &str) {
        self.backend.cache_reads(prefix);
    }

    /// What the store's read cache holds and did (`None` without one).
    pub fn read_cache_figures(&self) -> Option<crate::storage::read_cache::ReadCacheFigures> {
        self.backend.read_cache_figures()
    }

    /// The most operations one [`Barrier::batch`] may hold on this store.
    pub fn max_batch_ops(&self) -> usize {
        self.backend.max_batch_ops()
    }

    /// Requests sent to the store so far, where counted (etcd).
    pub fn store_requests_sent(&self) -> Option<u64> {
        self.backend.requests_sent()
    }

    /// The value of `key` with a stamp of the stored record, for
    /// `compare_and_swap`.
    pub fn get_stamped(&self, key: &str) -> Result<Option<(Plaintext, Stamp)>, BarrierError> {
        self.get_stamped_fenced(key, false)
    }

    /// [`Barrier::get_stamped`] for a request whose cache fence said `fresh`
    /// (see [`Barrier::get_fenced`]): a stamp from the cache is checked by
    /// the write that uses it ([`Barrier::batch_if`]).
    pub fn get_stamped_fenced(
        &self,
        key: &str,
        fresh: bool,
    ) -> Result<Option<(Plaintext, Stamp)>, BarrierError> {
        check_key(key)?;
        let mut keys = self.keys()?;
        match self.backend.get_fenced(key.as_bytes(), fresh)? {
            Some(envelope) => {
                let value = self.decrypt(&mut keys, key, &envelope)?;
                Ok(Some((value, Stamp(envelope))))
            }
            None => Ok(None),
        }
    }

    /// Stores `new` under `key` (removes it for `None`) only if the stored
    /// record is still the one `expected` stamped (`None`: absent). Returns
    /// whether it did; on `false` nothing was written and the caller reads
    /// again. Every envelope has a fresh random nonce, so a stamp names one
    /// write: a value written again, even the same plaintext, does not match.
    pub fn compare_and_swap(
        &self,
        key: &str,
        expected: Option<&Stamp>,
        new: Option<&[u8]>,
    ) -> Result<bool, BarrierError> {
        check_key(key)?;
        self.keys()?;
        let envelope = match new {
            Some(value) => Some(self.encrypt(key, value)?),
            None => None,
        };
        let outcome = self.backend.compare_and_swap(
            key.as_bytes(),
            expected.map(|stamp| stamp.0.as_slice()),
            envelope.as_deref(),
        )?;
        Ok(outcome == crate::storage::CasOutcome::Swapped)
    }

    /// The ranges of encryption counts this barrier took, `(term, start,
    /// end)`, oldest first (the last few thousand): encryptions `start + 1
    /// ..= end` of the term were this node's alone. For tests and
    /// diagnostics; holds no key material.
    #[doc(hidden)]
    pub fn taken_ranges(&self) -> Vec<(u32, u64, u64)> {
        self.ranges
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .copied()
            .collect()
    }

    /// Encrypts `value` under the active term and stores it under `key`.
    ///
    /// Visible at once, durable after `durable()`. Once per 65,536
    /// encryptions of a term (and when the term limit is reached) the call
    /// also writes and flushes `sys/keyring` synchronously.
    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), BarrierError> {
        check_key(key)?;
        let envelope = self.encrypt(key, value)?;
        self.backend.put(key.as_bytes(), &envelope)?;
        Ok(())
    }

    pub fn delete(&self, key: &str) -> Result<(), BarrierError> {
        check_key(key)?;
        self.keys()?;
        self.backend.delete(key.as_bytes())?;
        Ok(())
    }

    /// Keys and decrypted values under `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Plaintext)>, BarrierError> {
        self.scan_prefix_each(prefix)?
            .into_iter()
            .map(|(key, value)| Ok((key, value?)))
            .collect()
    }

    /// [`Barrier::scan_prefix`], with each record's decryption its own
    /// result: a record that fails to decrypt (damaged, or written under
    /// another vault's keys) fails only its own entry.
    pub fn scan_prefix_each(&self, prefix: &str) -> Result<Vec<EachRecord>, BarrierError> {
        check_key(prefix)?;
        let mut keys = self.keys()?;
        let mut out = Vec::new();
        for (key, envelope) in self.backend.scan_prefix(prefix.as_bytes())? {
            let key = key_text(key)?;
            if is_reserved(&key) {
                continue;
            }
            let value = self.decrypt(&mut keys, &key, &envelope);
            out.push((key, value));
        }
        Ok(out)
    }

    /// Keys only under `prefix`, in key order, without decrypting.
    pub fn scan_keys(&self, prefix: &str) -> Result<Vec<String>, BarrierError> {
        check_key(prefix)?;
        self.keys()?;
        let mut out = Vec::new();
        for (key, _) in self.backend.scan_prefix(prefix.as_bytes())? {
            let key = key_text(key)?;
            if !is_reserved(&key) {
                out.push(key);
            }
        }
        Ok(out)
    }

    /// Keys and decrypted values with `start <= key < end`, at most `limit`.
    pub fn scan_range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<(String, Plaintext)>, BarrierError> {
        let mut keys = self.keys()?;
        // The barrier's own records may fall in the range: ask for room to skip them.
        let pairs = self.backend.scan_range(
            start.as_bytes(),
            end.as_bytes(),
            limit.saturating_add(RESERVED_PREFIXES.len()),
        )?;
        let mut out = Vec::with_capacity(pairs.len().min(limit));
        for (key, envelope) in pairs {
            if out.len() == limit {
                break;
            }
            let key = key_text(key)?;
            if is_reserved(&key) {
                continue;
            }
            let value = self.decrypt(&mut keys, &key, &envelope)?;
            out.push((key, value));
        }
        Ok(out)
    }

    /// Applies every operation or none. Keys are checked before anything is
    /// encrypted; each put counts as one encryption.
    pub fn batch(&self, ops: &[PlainOp<'_>]) -> Result<(), BarrierError> {
        let sealed = self.seal_ops(ops)?;
        self.backend.batch(sealed)?;
        Ok(())
    }

    /// Applies every operation or none, and only if each key of `expect`
    /// still holds the record its stamp names (`None`: absent); returns
    /// whether it did (on `false` nothing was written: read again). On a
    /// shared store the check is in the same transaction as the write.
    pub fn batch_if(
        &self,
        expect: &[(&str, Option<&Stamp>)],
        ops: &[PlainOp<'_>],
    ) -> Result<bool, BarrierError> {
        for (key, _) in expect {
            check_key(key)?;
        }
        let sealed = self.seal_ops(ops)?;
        let expect = expect
            .iter()
            .map(|(key, stamp)| (key.as_bytes().to_vec(), stamp.map(|s| s.0.clone())))
            .collect();
        Ok(self.backend.batch_if(expect, sealed)?)
    }

    /// Applies `ops` in order as consecutive atomic batches that each fit
    /// the store (on etcd one transaction: 127 operations, 1.5 MiB; on sled
    /// one batch): a failure or a crash part-way keeps the batches before
    /// it, never part of one. For writes that need their order kept but not
    /// the whole set atomic: what must come last (a record that says the
    /// work is done) goes last.
    pub fn batch_in_chunks(&self, ops: &[PlainOp<'_>]) -> Result<(), BarrierError> {
        for chunk in self.chunks(ops, 0) {
            self.batch(chunk)?;
        }
        Ok(())
    }

    /// [`Barrier::batch_in_chunks`] whose last batch is written only if each
    /// key of `expect` still holds the record its stamp names (`None`:
    /// absent), as [`Barrier::batch_if`]; returns whether it was. On `false`
    /// the batches before the last were applied and the last was not: what
    /// goes before the conditional write (the last operation) must be
    /// harmless without it.
    pub fn batch_in_chunks_if(
        &self,
        expect: &[(&str, Option<&Stamp>)],
        ops: &[PlainOp<'_>],
    ) -> Result<bool, BarrierError> {
        // Every batch is kept small enough to carry the comparisons too.
        let compared = expect
            .iter()
            .map(|(key, stamp)| key.len() + stamp.map_or(0, |s| s.0.len()))
            .sum();
        let chunks = self.chunks(ops, compared);
        let Some((last, before)) = chunks.split_last() else {
            return self.batch_if(expect, ops);
        };
        for chunk in before {
            self.batch(chunk)?;
        }
        self.batch_if(expect, last)
    }

    /// `ops` cut into consecutive runs that each fit one batch of the store
    /// with `reserved` bytes to spare.
    fn chunks<'o, 'a>(&self, ops: &'o [PlainOp<'a>], reserved: usize) -> Vec<&'o [PlainOp<'a>]> {
        // What a stored value adds to its plaintext (nonce, tag, header),
        // and the store's own key prefix, with room to spare.
        const OVERHEAD: usize = 512;
        let max_ops = self.backend.max_batch_ops().max(1);
        let max_bytes = self.backend.max_batch_bytes().saturating_sub(reserved);
        let mut out = Vec::new();
        let mut start = 0;
        let mut bytes = 0usize;
        for (i, op) in ops.iter().enumerate() {
            let size = match op {
                PlainOp::Put(key, value) => key.len() + value.len(),
                PlainOp::Delete(key) => key.len(),
            }
            .saturating_add(OVERHEAD);
            if i > start && (i - start >= max_ops || bytes.saturating_add(size) > max_bytes) {
                out.push(&ops[start..i]);
                start = i;
                bytes = 0;
            }
            bytes = bytes.saturating_add(size);
        }
        if start < ops.len() {
            out.push(&ops[start..]);
        }
        out
    }

    /// Applies the operations one at a time, in order: a crash keeps a prefix
    /// of them (see `storage`). Keys are checked and every value encrypted
    /// before the first write, so a refused key or a sealed barrier writes
    /// nothing.
    pub fn write_in_order(&self, ops: &[PlainOp<'_>]) -> Result<(), BarrierError> {
        let sealed = self.seal_ops(ops)?;
        self.backend.apply_in_order(sealed)?;
        Ok(())
    }

    fn seal_ops(&self, ops: &[PlainOp<'_>]) -> Result<Vec<BatchOp>, BarrierError> {
        for op in ops {
            match op {
                PlainOp::Put(key, _) | PlainOp::Delete(key) => check_key(key)?,
            }
        }
        self.keys()?;
        let mut sealed = Vec::with_capacity(ops.len());
        for op in ops {
            sealed.push(match op {
                PlainOp::Put(key, value) => {
                    BatchOp::Put(key.as_bytes().to_vec(), self.encrypt(key, value)?)
                }
                PlainOp::Delete(key) => BatchOp::Delete(key.as_bytes().to_vec()),
            });
        }
        Ok(sealed)
    }

    /// Returns once every write made before the call is on disk; concurrent
    /// callers share one flush.
    ///
    /// On a shared store (etcd) an answered write is already committed on a
    /// quorum, and its flush does nothing: no round is run for it.
    pub async fn durable(&self) -> Result<(), BarrierError> {
        if self.backend.is_shared() {
            return Ok(());
        }
        Ok(self.commit.durable().await?)
    }

    /// How many flushes `durable` has run; for metrics and tests.
    pub fn flush_count(&self) -> u64 {
        self.commit.flush_count()
    }
}

/// Internals.
impl Barrier {
    fn read(&self) -> RwLockReadGuard<'_, SealState> {
        // Nothing panics while holding the lock; a poisoned lock still holds
        // a consistent state (every change is one assignment).
        self.state.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> RwLockWriteGuard<'_, SealState> {
        self.state.write().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_keyring_writes(&self) -> MutexGuard<'_, ()> {
        self.keyring_writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// A snapshot of the prepared keys: the read lock is held only to clone
    /// an `Arc`.
    fn keys(&self) -> Result<Arc<KeySet>, BarrierError> {
        match &*self.read() {
            SealState::Unsealed { keys, .. } => Ok(Arc::clone(keys)),
            _ => Err(BarrierError::Sealed),
        }
    }

    /// Seals `value` for `key` under the active term. The encryption takes
    /// the next number of this node's range; past the range's end the node
    /// takes the next range (or, the term used up, makes or loads the next
    /// term) and tries again. The encryption numbered at the limit makes the
    /// next term.
    fn encrypt(&self, key: &str, value: &[u8]) -> Result<Vec<u8>, BarrierError> {
        let limit = self.options.max_encryptions_per_term;
        loop {
            let mut keys = self.keys()?;
            if self.keyring_changed.swap(false, Ordering::AcqRel) {
                // Another node may have added a term: read the keyring (one
                // store read) and adopt it before sealing anything more. If
                // that read fails, the term held now is still valid and its
                // range still reserved: seal under it and read again next time.
                // A keyring that does not extend this node's (a rollback) is
                // refused here as at a range write.
                match self.reload(&keys) {
                    Ok(reloaded) => keys = reloaded,
                    Err(BarrierError::Storage(
                        error @ (StorageError::Io(_) | StorageError::Unavailable(_)),
                    )) => {
                        self.keyring_changed.store(true, Ordering::Release);
                        tracing::warn!(%error, "could not read the keyring another node changed");
                    }
                    Err(error) => return Err(error),
                }
            }
            let active = &keys.active;
            let taken = active
                .taken
                .fetch_add(1, Ordering::AcqRel)
                .saturating_add(1);
            if taken > active.end - active.start {
                self.next_range(&keys)?;
                continue;
            }
            let number = active.start + taken;
            let aead = keys
                .key(active.term)
                .ok_or(BarrierError::Crypto("the active term has no key"))?;
            let envelope = envelope::seal(aead, active.term, key.as_bytes(), value, &self.rng)?;
            if number == limit {
                if let Err(error) = self.add_term(Some(&keys)) {
                    // The value is sealed under a valid term; the next
                    // encryption retries the rotation and reports its error.
                    tracing::warn!(%error, term = active.term, "automatic key rotation failed");
                }
            }
            return Ok(envelope);
        }
    }

    /// Gives this node a new range of the active term's count, in place of
    /// `spent` (a no-op if `spent` is no longer current: another caller did
    /// it). The range is written into `sys/keyring` before any encryption in
    /// it; on a shared store by compare-and-swap, merging what other nodes
    /// wrote and trying again. A used-up term makes (or loads) the next one.
    fn next_range(&self, spent: &Arc<KeySet>) -> Result<(), BarrierError> {
        let _writes = self.lock_keyring_writes();
        let limit = self.options.max_encryptions_per_term;
        let block = self.options.reservation_block;
        for _ in 0..KEYRING_ATTEMPTS {
            let (mut record, current) = self.current(spent)?;
            if !Arc::ptr_eq(&current, spent) {
                return Ok(());
            }
            let term = current.active.term;
            let Some((start, end)) = record.take_range(term, block, limit)? else {
                // Used up: the next term (another node may make it first).
                let new = record.with_new_term(&self.rng)?;
                match self.swap_keyring(&current.unsealed.root_key, &new)? {
                    None => {
                        let keys = Arc::new(current.extended(&new)?);
                        tracing::info!(term = new.active, "keyring term added");
                        return self.install(&current, new, Some(keys));
                    }
                    Some((stored, envelope)) => {
                        self.adopt(&current, stored, envelope)?;
                        continue;
                    }
                }
            };
            match self.swap_keyring(&current.unsealed.root_key, &record)? {
                None => {
                    self.note_range(term, start, end);
                    let keys = Arc::new(current.with_range(start, end));
                    return self.install(&current, record, Some(keys));
                }
                Some((stored, envelope)) => {
                    // Another node wrote first: take its record as ours
                    // (a new term included) and take a range above it.
                    self.adopt(&current, stored, envelope)?;
                }
            }
        }
        Err(keyring_contended())
    }

    /// Adds a term. With `exhausted`, only if those keys are still the
    /// current ones and no other node added one since (the term may already
    /// have been replaced); returns the active term either way.
    fn add_term(&self, exhausted: Option<&Arc<KeySet>>) -> Result<u32, BarrierError> {
        let _writes = self.lock_keyring_writes();
        for _ in 0..KEYRING_ATTEMPTS {
            let (record, current) = match &*self.read() {
                SealState::Unsealed { record, keys, .. } => (record.clone(), Arc::clone(keys)),
                _ => return Err(BarrierError::Sealed),
            };
            if let Some(old) = exhausted {
                if !Arc::ptr_eq(&old.unsealed, &current.unsealed) {
                    return Err(BarrierError::Sealed);
                }
                if old.active.term != current.active.term {
                    return Ok(current.active.term);
                }
            }
            let new = record.with_new_term(&self.rng)?;
            match self.swap_keyring(&current.unsealed.root_key, &new)? {
                None => {
                    let keys = Arc::new(current.extended(&new)?);
                    let term = new.active;
                    self.install(&current, new, Some(keys))?;
                    tracing::info!(term, "keyring term added");
                    return Ok(term);
                }
                // Another node wrote the keyring: load what it wrote and,
                // unless that already retired the exhausted term, add a
                // term on top of it.
                Some((stored, envelope)) => self.adopt(&current, stored, envelope)?,
            }
        }
        Err(keyring_contended())
    }

    /// The current record and keys, if the vault is still unsealed with the
    /// root key of `seen`.
    fn current(&self, seen: &KeySet) -> Result<(KeyringRecord, Arc<KeySet>), BarrierError> {
        match &*self.read() {
            SealState::Unsealed { record, keys, .. }
                if Arc::ptr_eq(&keys.unsealed, &seen.unsealed) =>
            {
                Ok((record.clone(), Arc::clone(keys)))
            }
            _ => Err(BarrierError::Sealed),
        }
    }

    /// Makes `stored`, a keyring another node wrote, this node's, if it
    /// only extends the one this node holds (same terms and keys, no
    /// reservation lowered). Same terms: the record is replaced and the
    /// node keeps its range (the stored reservation is above it, since the
    /// range was written by compare-and-swap). New terms: their keys are
    /// prepared and the node holds no range of the new active term.
    /// `envelope` is the stored form, against which the next keyring write
    /// compares; a record that is not an extension is refused and not
    /// remembered, so this node never writes over it either. Caller holds
    /// `keyring_writes`.
    fn adopt(
        &self,
        current: &Arc<KeySet>,
        stored: KeyringRecord,
        envelope: Vec<u8>,
    ) -> Result<(), BarrierError> {
        let (record, keys) = self.current(current)?;
        if !record.is_extended_by(&stored) {
            tracing::error!("sys/keyring in storage does not extend this node's keyring");
            return Err(keyring_not_extended());
        }
        let same_terms = stored.terms.len() == keys.terms() && stored.active == keys.active.term;
        if same_terms {
            self.install(&keys, stored, None)?;
        } else {
            let new_keys = Arc::new(keys.extended(&stored)?);
            let term = stored.active;
            self.install(&keys, stored, Some(new_keys))?;
            tracing::info!(term, "keyring term written by another node loaded");
        }
        *self.keyring_seen() = Some(envelope);
        Ok(())
    }

    /// Reads `sys/keyring` and adopts it if another node changed it (shared
    /// store only): before reading a value sealed under a term this node
    /// does not know. Returns the keys to use.
    fn reload(&self, seen: &Arc<KeySet>) -> Result<Arc<KeySet>, BarrierError> {
        let _writes = self.lock_keyring_writes();
        let (_, current) = self.current(seen)?;
        let stored = self
            .backend
            .get(KEYRING_KEY.as_bytes())?
            .ok_or_else(|| StorageError::Corrupt("sys/keyring is missing".into()))?;
        if self.keyring_seen().as_deref() == Some(stored.as_slice()) {
            return Ok(current);
        }
        let record = self.open_keyring(&current.unsealed.root_key, &stored)?;
        self.adopt(&current, record, stored)?;
        Ok(self.current(seen)?.1)
    }

    fn note_range(&self, term: u32, start: u64, end: u64) {
        let mut ranges = self.ranges.lock().unwrap_or_else(PoisonError::into_inner);
        if ranges.len() == RANGES_KEPT {
            ranges.pop_front();
        }
        ranges.push_back((term, start, end));
    }

    /// Opens the envelope stored under `key`. On a shared store, a term this
    /// node does not know may be one another node just added: the keyring
    /// is read again (once) before giving up.
    /// `keys` is replaced by the reloaded ones, so that a scan reloads once.
    fn decrypt(
        &self,
        keys: &mut Arc<KeySet>,
        key: &str,
        envelope: &[u8],
    ) -> Result<Plaintext, BarrierError> {
        let term = envelope::term(envelope)?;
        if keys.key(term).is_none() && term != ROOT_TERM && self.backend.is_shared() {
            *keys = self.reload(keys)?;
        }
        decrypt(keys, key, envelope)
    }

    /// Makes `record` (and `keys`, if given) current, unless the vault was
    /// sealed (or sealed and unsealed again) since `seen` was current.
    fn install(
        &self,
        seen: &KeySet,
        new_record: KeyringRecord,
        new_keys: Option<Arc<KeySet>>,
    ) -> Result<(), BarrierError> {
        match &mut *self.write() {
            SealState::Unsealed { record, keys, .. }
                if Arc::ptr_eq(&keys.unsealed, &seen.unsealed) =>
            {
                *record = new_record;
                if let Some(new_keys) = new_keys {
                    *keys = new_keys;
                }
                Ok(())
            }
            _ => Err(BarrierError::Sealed),
        }
    }

    /// Encrypts the keyring record under the root key.
    fn seal_keyring(
        &self,
        root_key: &Key,
        record: &KeyringRecord,
    ) -> Result<Vec<u8>, BarrierError> {
        let aead = keyring::aead_key(root_key)?;
        envelope::seal(
            &aead,
            ROOT_TERM,
            KEYRING_KEY.as_bytes(),
            &record.encode(),
            &self.rng,
        )
    }

    /// Writes the keyring record and waits until it is on disk (encryptions
    /// it reserves may follow at once); on a shared store only if the stored
    /// one is still the one this node last saw. Returns the stored record
    /// that another node wrote instead (nothing was written then), opened
    /// with `root_key`, and its envelope. Caller holds `keyring_writes`.
    fn swap_keyring(
        &self,
        root_key: &Key,
        record: &KeyringRecord,
    ) -> Result<Option<(KeyringRecord, Vec<u8>)>, BarrierError> {
        let envelope = self.seal_keyring(root_key, record)?;
        if self.backend.is_shared() {
            let seen = self.keyring_seen().clone();
            let outcome = self.backend.compare_and_swap(
                KEYRING_KEY.as_bytes(),
                seen.as_deref(),
                Some(&envelope),
            )?;
            if let crate::storage::CasOutcome::Conflict { current } = outcome {
                let current = current
                    .ok_or_else(|| StorageError::Corrupt("sys/keyring is missing".into()))?;
                let stored = self.open_keyring(root_key, &current)?;
                return Ok(Some((stored, current)));
            }
        } else {
            self.backend.put(KEYRING_KEY.as_bytes(), &envelope)?;
        }
        self.backend.flush()?;
        *self.keyring_seen() = Some(envelope);
        Ok(None)
    }

    fn keyring_seen(&self) -> MutexGuard<'_, Option<Vec<u8>>> {
        self.keyring_seen
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Opens `sys/keyring` with a candidate root key; a key that does not
    /// open it means the shares were wrong.
    fn open_keyring(&self, root_key: &Key, envelope: &[u8]) -> Result<KeyringRecord, BarrierError> {
        if envelope::term(envelope).ok() != Some(ROOT_TERM) {
            return Err(
                StorageError::Corrupt("sys/keyring is not a root key envelope".into()).into(),
            );
        }
        let aead = keyring::aead_key(root_key)?;
        let plain = envelope::open(&aead, KEYRING_KEY.as_bytes(), envelope)
            .map_err(|_| BarrierError::WrongShares)?;
        Ok(KeyringRecord::decode(&plain)?)
    }
}

/// Keyring writes tried before giving up when other nodes keep winning.
const KEYRING_ATTEMPTS: usize = 64;

/// Other nodes won every compare-and-swap of the keyring.
fn keyring_contended() -> BarrierError {
    StorageError::Busy("sys/keyring: other nodes changed it at every attempt; try again".into())
        .into()
}

/// The stored keyring does not extend this node's: fail closed.
fn keyring_not_extended() -> BarrierError {
    StorageError::Corrupt(
        "sys/keyring in storage removes or replaces a key term this node holds, or lowers a \
         reservation; refusing it"
            .into(),
    )
    .into()
}

/// A stamp of one stored record, from `Barrier::get_stamped`: the envelope
/// as stored (ciphertext only). `Debug` shows its length.
#[derive(Clone, PartialEq, Eq)]
pub struct Stamp(Vec<u8>);

impl std::fmt::Debug for Stamp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Stamp({} bytes)", self.0.len())
    }
}

/// HKDF-SHA256 of the keyring's derivation root for `purpose`.
fn derive_from_root(root: &Key, purpose: &str) -> Result<Zeroizing<[u8; 32]>, BarrierError> {
    let failed = |_| BarrierError::Crypto("key derivation failed");
    let prk = hkdf::Salt::new(hkdf::HKDF_SHA256, DERIVE_SALT).extract(&root[..]);
    let info = [purpose.as_bytes()];
    let okm = prk.expand(&info, hkdf::HKDF_SHA256).map_err(failed)?;
    let mut out = Zeroizing::new([0u8; 32]);
    okm.fill(&mut out[..]).map_err(failed)?;
    Ok(out)
}

/// Opens the envelope stored under `key` with the term it names.
fn decrypt(keys: &KeySet, key: &str, envelope: &[u8]) -> Result<Plaintext, BarrierError> {
    let term = envelope::term(envelope)?;
    let aead = keys.key(term).ok_or(BarrierError::Decrypt)?;
    envelope::open(aead, key.as_bytes(), envelope)
}
