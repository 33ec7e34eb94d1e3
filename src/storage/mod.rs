//! Storage: an ordered key/value `Backend` that knows nothing of encryption.
//!
//! Every byte a backend sees is ciphertext made by `barrier`, except the seal
//! configuration needed to unseal. Domain modules never use a backend
//! directly: they go through the barrier, each under its own key prefix.
//!
//! Durability: `put`, `delete`, `batch` and `apply_in_order` return once the
//! change is visible; `flush` blocks until every change made before it began
//! is on disk.
//!
//! Atomicity: `batch` applies all of its operations or none. `apply_in_order`
//! applies them one by one, and a crash keeps a prefix of them: never a later
//! operation without every earlier one. A caller orders its writes so that
//! each prefix is harmless (indexes before the record that makes an entry
//! usable, say). It exists because an atomic batch is expensive in sled 0.34:
//! each one seals and writes the log buffer twice, synchronously, under a
//! lock that stops every other reader and writer.
//! `GroupCommit` wraps a backend for async callers: concurrent callers of
//! `GroupCommit::durable` share one flush.

pub mod cluster;
pub mod coherence;
#[cfg(feature = "etcd")]
mod etcd_backend;
#[cfg(feature = "etcd")]
mod etcd_combine;
#[cfg(feature = "etcd")]
mod etcd_compact;
#[cfg(feature = "etcd")]
mod etcd_leader;
#[cfg(feature = "etcd")]
mod etcd_members;
pub mod etcd_options;
#[cfg(feature = "etcd")]
mod etcd_watch;
pub mod format;
mod group_commit;
pub mod members;
pub mod read_cache;
mod sled_backend;
#[cfg(test)]
pub(crate) mod test_sled;

#[cfg(feature = "etcd")]
pub use etcd_backend::EtcdBackend;
#[cfg(feature = "etcd")]
pub use etcd_backend::RequestDurations as EtcdRequestDurations;
#[cfg(feature = "etcd")]
pub use etcd_combine::WriteHold;
#[cfg(feature = "etcd")]
pub use etcd_leader::EtcdLeadership;
pub use etcd_options::EtcdOptions;

/// Runs `work`, which blocks its thread (a lock, a store's answer), telling
/// the runtime first when called on a multi-thread runtime's worker, so that
/// the worker's other tasks move on to another thread meanwhile
/// (`tokio::task::block_in_place`). On a current-thread runtime, in a
/// `spawn_blocking` body or on a plain thread it just runs it. It panics
/// where `block_in_place` does and this crate never runs: inside a
/// `LocalSet` on a multi-thread runtime, or with a multi-thread runtime's
/// handle entered inside a current-thread runtime's `block_on`.
///
/// Not to be confused with `cluster::blocking`, which carries a leader's
/// fence into a `spawn_blocking` body.
pub fn off_worker<T>(work: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(work)
        }
        _ => work(),
    }
}

/// What a binary built without the `etcd` feature says when asked for etcd.
pub const NO_ETCD: &str =
    "storage.backend = \"etcd\" needs a keyward built with the `etcd` feature \
     (cargo build --release --features etcd; etcd-client's build needs protoc)";
pub use group_commit::GroupCommit;
pub use sled_backend::SledBackend;

/// Errors of a storage backend. Messages name the operation, never a value.
/// `Clone` so that one failed group flush can be reported to every waiter.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("storage i/o failed: {0}")]
    Io(String),
    /// The store cannot answer now (a shared store lost its quorum, or no
    /// member can be reached). The message says whether anything may have
    /// been written; callers are answered "unavailable", not an internal
    /// error.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage is corrupt: {0}")]
    Corrupt(String),
    /// The operation cannot run now (another snapshot is running).
    #[error("storage is busy: {0}")]
    Busy(String),
    #[error(
        "the store has format version {found}, newer than this binary supports (version \
         {supported}): run the release that wrote it, or a later one"
    )]
    NewerFormat { found: u32, supported: u32 },
}

/// What [`Backend::cache_fence_async`] returns.
pub type FenceFuture<'a> = std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send + 'a>>;

/// Where `Backend::export` hands each pair.
pub type ExportSink<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), StorageError> + 'a;

/// Key/value pairs in key order, as scans return them.
pub type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// What [`Backend::batch_if`] checks: keys and the values they must hold
/// (`None`: absent).
pub type Expected = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// One operation of an atomic batch.
#[derive(Clone)]
pub enum BatchOp {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
}

/// The outcome of a compare-and-swap.
#[derive(Debug, PartialEq, Eq)]
pub enum CasOutcome {
    Swapped,
    /// The stored value was not the expected one; it holds `current`.
    Conflict {
        current: Option<Vec<u8>>,
    },
}

/// An ordered key/value store.
pub trait Backend: Send + Sync + 'static {
    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError>;
    fn put(&self, key: &[u8], value: &[u8]) -> Result<(), StorageError>;
    fn delete(&self, key: &[u8]) -> Result<(), StorageError>;
    /// All pairs whose key starts with `prefix`, in key order.
    fn scan_prefix(&self, prefix: &[u8]) -> Result<KeyValues, StorageError>;
    /// Pairs with `start <= key < end`, in key order, at most `limit`.
    fn scan_range(&self, start: &[u8], end: &[u8], limit: usize)
        -> Result<KeyValues, StorageError>;
    /// Sets `key` to `new` (or removes it for `None`) only if it holds `expected`.
    fn compare_and_swap(
        &self,
        key: &[u8],
        expected: Option<&[u8]>,
        new: Option<&[u8]>,
    ) -> Result<CasOutcome, StorageError>;
    /// Applies every operation or none.
    fn batch(&self, ops: Vec<BatchOp>) -> Result<(), StorageError>;
    /// Applies the operations one at a time, in order. Not atomic: after a
    /// crash any prefix of them may be there, never a later one without the
    /// earlier ones (in sled, for values that fit its log: see
    /// `sled_backend` for larger ones after a power loss). An error stops at
    /// the failed operation.
    fn apply_in_order(&self, ops: Vec<BatchOp>) -> Result<(), StorageError> {
        for op in ops {
            match op {
                BatchOp::Put(key, value) => self.put(&key, &value)?,
                BatchOp::Delete(key) => self.delete(&key)?,
            }
        }
        Ok(())
    }
    /// Blocks until every write made before the call is on disk.
    fn flush(&self) -> Result<(), StorageError>;
    /// Hands every pair, as it was at one instant, to `sink` while writes
    /// go on (for snapshots; see `SledBackend::export`); returns the count.
    fn export(&self, _sink: &mut ExportSink<'_>) -> Result<u64, StorageError> {
        Err(StorageError::Io(
            "export: this backend cannot take snapshots".into(),
        ))
    }
    /// Whether other keyward processes may write this store at the same
    /// time (etcd): in-memory caches of stored records must then not be
    /// trusted across requests (see `etcd_backend`).
    fn is_shared(&self) -> bool {
        false
    }
    /// On a shared store, what keeps caches of stored records right (see
    /// `coherence`): caches register there. `None` on a store one process owns.
    fn coherence(&self) -> Option<&coherence::Coherence> {
        None
    }
    /// Whether caches registered with [`Backend::coherence`] may serve a
    /// request that starts now. Always on a store one process owns (its own
    /// writes empty its caches); on a shared one, see `coherence`.
    fn cache_fence(&self) -> bool {
        !self.is_shared()
    }
    /// [`Backend::cache_fence`] for async callers, waiting without holding
    /// a thread. Only called on a shared store (a store one process owns
    /// needs no wait: see [`Backend::cache_fence`]).
    fn cache_fence_async(&self) -> FenceFuture<'_> {
        Box::pin(std::future::ready(self.cache_fence()))
    }
    /// Reads `key` for a request whose [`Backend::cache_fence`] said
    /// `fresh`: on a shared store with a read cache over the key's prefix
    /// (see [`Backend::cache_reads`]) a fresh request may be answered from
    /// it; otherwise the same as [`Backend::get`].
    fn get_fenced(&self, key: &[u8], _fresh: bool) -> Result<Option<Vec<u8>>, StorageError> {
        self.get(key)
    }
    /// Applies every operation of `ops` (atomically, as [`Backend::batch`])
    /// only if each key of `expect` still holds its value (`None`: absent);
    /// otherwise writes nothing and returns false. On a shared store the
    /// check and the write are one transaction. This default checks, then
    /// writes: it is atomic only for callers that serialise every writer
    /// of the checked keys themselves (one process, under its own lock).
    fn batch_if(&self, expect: Expected, ops: Vec<BatchOp>) -> Result<bool, StorageError> {
        for (key, value) in &expect {
            if self.get(key)?.as_ref() != value.as_ref() {
                return Ok(false);
            }
        }
        self.batch(ops)?;
        Ok(true)
    }
    /// Asks for reads of keys under `prefix` to be cached (values as
    /// stored: ciphertext), kept right by the store's change feed
    /// (`read_cache`). Nothing to do on a store one process owns.
    fn cache_reads(&self, _prefix: &str) {}
    /// What the read cache holds and did (`None` without one).
    fn read_cache_figures(&self) -> Option<read_cache::ReadCacheFigures> {
        None
    }
    /// The most operations one atomic [`Backend::batch`] may hold (etcd:
    /// one transaction); callers that can split their work into several
    /// batches stay under it.
    fn max_batch_ops(&self) -> usize {
        usize::MAX
    }
    /// The most bytes (keys and stored values) one atomic batch may hold.
    fn max_batch_bytes(&self) -> usize {
        usize::MAX
    }
    /// Requests sent to the store so far (a debug count of round trips;
    /// `None` where it is not counted).
    fn requests_sent(&self) -> Option<u64> {
        None
    }
}
