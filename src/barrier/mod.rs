//! Barrier: the seal, the keyring and the AEAD envelope around every stored value.
//!
//! Storage prefix: owns `sys/seal` (the only plaintext record: vault id, share
//! count, threshold) and `sys/keyring` (encrypted under the root key). Every
//! other key is written by a domain module through this type, which encrypts
//! the value with AES-256-GCM under the active keyring term and the storage key
//! as associated data: `term (4 bytes BE) || nonce (12) || ciphertext+tag`.
//! It knows nothing of secrets, tokens or policies.
//!
//! STUB: the API below is the contract; the implementation is being written.

use std::sync::Arc;

use zeroize::Zeroizing;

use crate::storage::{Backend, StorageError};

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
}

impl Default for BarrierOptions {
    fn default() -> Self {
        Self {
            max_encryptions_per_term: 1 << 30,
        }
    }
}

/// A plaintext operation of an atomic batch.
pub enum PlainOp<'a> {
    Put(&'a str, &'a [u8]),
    Delete(&'a str),
}

pub struct Barrier {
    _backend: Arc<dyn Backend>,
}

#[allow(unused_variables, clippy::todo)]
impl Barrier {
    /// Opens the barrier over a backend; it starts sealed (or uninitialized).
    pub fn new(backend: Arc<dyn Backend>, options: BarrierOptions) -> Result<Self, BarrierError> {
        todo!()
    }
    pub fn status(&self) -> SealStatus {
        todo!()
    }
    /// Makes a random 256-bit root key and keyring, splits the root key into
    /// `shares` shares of which `threshold` unseal, and leaves the barrier
    /// UNSEALED so the caller can write its first records; the caller seals.
    pub fn init(&self, shares: u8, threshold: u8) -> Result<Vec<UnsealShare>, BarrierError> {
        todo!()
    }
    /// Adds one share; at the threshold, rebuilds the root key and opens the keyring.
    pub fn unseal(&self, share: &str) -> Result<SealStatus, BarrierError> {
        todo!()
    }
    /// Forgets the shares given so far.
    pub fn reset_unseal(&self) {
        todo!()
    }
    /// Drops all key material from memory.
    pub fn seal(&self) {
        todo!()
    }
    /// Adds a keyring term and makes it active; returns the new term.
    pub fn rotate_key(&self) -> Result<u32, BarrierError> {
        todo!()
    }
    /// A 32-byte key derived from the keyring for `purpose` (HKDF-SHA256),
    /// stable across restarts and key rotations (audit HMAC, token hashing).
    pub fn derive_key(&self, purpose: &str) -> Result<Zeroizing<[u8; 32]>, BarrierError> {
        todo!()
    }
    pub fn get(&self, key: &str) -> Result<Option<Plaintext>, BarrierError> {
        todo!()
    }
    pub fn put(&self, key: &str, value: &[u8]) -> Result<(), BarrierError> {
        todo!()
    }
    pub fn delete(&self, key: &str) -> Result<(), BarrierError> {
        todo!()
    }
    /// Keys and decrypted values under `prefix`, in key order.
    pub fn scan_prefix(&self, prefix: &str) -> Result<Vec<(String, Plaintext)>, BarrierError> {
        todo!()
    }
    /// Keys only under `prefix`, in key order, without decrypting.
    pub fn scan_keys(&self, prefix: &str) -> Result<Vec<String>, BarrierError> {
        todo!()
    }
    /// Keys and decrypted values with `start <= key < end`, at most `limit`.
    pub fn scan_range(
        &self,
        start: &str,
        end: &str,
        limit: usize,
    ) -> Result<Vec<(String, Plaintext)>, BarrierError> {
        todo!()
    }
    /// Applies every operation or none.
    pub fn batch(&self, ops: &[PlainOp<'_>]) -> Result<(), BarrierError> {
        todo!()
    }
    /// Returns once every write made before the call is on disk; concurrent
    /// callers share one flush.
    pub async fn durable(&self) -> Result<(), BarrierError> {
        todo!()
    }
}
