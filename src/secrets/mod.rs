//! Secrets: versioned key/value secrets in the manner of Vault's KV v2, with
//! the rotation stages `current`, `previous` and `pending`.
//!
//! Storage prefix `secrets/` (through the barrier only):
//! - `secrets/meta/<path>`: the secret's metadata (`MetaRecord`);
//! - `secrets/data/<path>#<version, 20 digits>`: one version's fields
//!   (`#` cannot occur in a path, so one secret's versions never share a
//!   prefix with another secret's).
//!
//! Writes to one path are serialised by a striped lock held only across the
//! read-modify-write (no await under it); the metadata and data of a write go
//! in one atomic batch, and the caller waits for `Barrier::durable` before it
//! answers. This module knows nothing of tokens, policies or gRPC.
//!
//! A write (put, delete, undelete, destroy) takes the [`Authorized`] proof
//! of the policy check for its capability on the path's resource
//! (`secret/<path>`), and refuses one made for anything else.
//!
//! Every new `current` version (a write, or a rotation's promotion) is
//! announced on a broadcast channel ([`SecretStore::subscribe`]) with its
//! path and number, never its value. A [`Watch`] ([`SecretStore::watch`]) is
//! one watcher's view of it: the paths its [`WatchFilter`] names, until the
//! server's shutdown; `Secrets.Watch` checks each against the caller's
//! policies and sends it.

mod fingerprint;
mod path;
mod print_index;
#[cfg(test)]
mod proof_tests;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use prost::Message;
use zeroize::{Zeroize, Zeroizing};

pub use fingerprint::ValueMatch;
pub use path::{DataLimits, InputError, ListPrefix, SecretPath, Stage};

use crate::barrier::{Barrier, BarrierError, PlainOp};
use crate::clock::Shutdown;
use crate::policy::{Authorized, Capability};
use crate::secrecy::{SecretBytes, SecretData};

const META: &str = "secrets/meta/";
const DATA: &str = "secrets/data/";
const LOCK_STRIPES: usize = 64;
/// Tries of a write on a shared store whose records other nodes change
/// meanwhile (each failed try follows another node's successful write).
const PUT_ATTEMPTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error(transparent)]
    Input(#[from] InputError),
    #[error("no secret at this path")]
    NotFound,
    #[error("version {0} does not exist")]
    NoSuchVersion(u64),
    #[error("no version holds stage {0}")]
    NoSuchStage(&'static str),
    #[error("version {0} is deleted")]
    Deleted(u64),
    #[error("version {0} is destroyed")]
    Destroyed(u64),
    #[error("check-and-set failed: expected version {expected}, newest is {actual}")]
    CasMismatch { expected: u64, actual: u64 },
    #[error("stored secret record is corrupt")]
    Corrupt,
    /// A write on the blocking pool ended without an answer (it panicked):
    /// whether it was applied is not known.
    #[error("the write stopped without an answer; whether it was applied is not known")]
    WriteStopped,
    /// Other nodes wrote the secret at every try (a shared store).
    #[error("the secret was changed by other writers at every try; try again")]
    Contended,
    /// The proof handed to a write is for another path or capability (a bug
    /// in the caller: it checked one thing and wrote another).
    #[error("the write's authorization is for another path or capability")]
    WrongProof,
    #[error(transparent)]
    Barrier(#[from] BarrierError),
}

impl SecretsError {
    /// A stored record that does not decode or decrypt: one secret's
    /// damage, which a whole-store read (the scan index) passes over.
    fn is_damaged_record(&self) -> bool {
        matches!(self, Self::Corrupt | Self::Barrier(BarrierError::Decrypt))
    }
}

/// Refuses a write whose proof is not `capability` on `secret/<path>`.
fn require(
    proof: &Authorized,
    capability: Capability,
    path: &SecretPath,
) -> Result<(), SecretsError> {
    if proof.grants_under(capability, "secret", path.as_str()) {
        Ok(())
    } else {
        Err(SecretsError::WrongProof)
    }
}

/// One version's metadata.
#[derive(Clone, PartialEq, Message)]
pub struct VersionRecord {
    #[prost(uint64, tag = "1")]
    pub version: u64,
    #[prost(uint64, tag = "2")]
    pub created_at_ms: u64,
    /// 0 when not deleted.
    #[prost(uint64, tag = "3")]
    pub deleted_at_ms: u64,
    #[prost(bool, tag = "4")]
    pub destroyed: bool,
    /// This record lists the version's fingerprints (`prints`; empty once
    /// it holds no stage). A version written on a shared store is listed
    /// here, in the transaction that writes it, so dropping its
    /// fingerprints reads nothing and writes no list record. A version
    /// written on sled, or before 0.6.6, has the record
    /// `scan/ver/<path>#<version>` instead (`fingerprint`'s module doc
    /// names the cases).
    #[prost(bool, tag = "5")]
    pub prints_listed: bool,
    /// The fingerprints (HMAC tags, 32 bytes each) of the version's
    /// values, when `prints_listed`.
    #[prost(bytes = "vec", repeated, tag = "6")]
    pub prints: Vec<Vec<u8>>,
    /// The version's fingerprints are in `prints` only: no `scan/fp/`
    /// record was written for them (a version written on a shared store
    /// since 0.6.10; a Match finds it through each node's index,
    /// `print_index`). A version listed without it (0.6.6 to 0.6.9) also
    /// has records, which go with its stage.
    #[prost(bool, tag = "7")]
    pub prints_unrecorded: bool,
}

/// A secret's metadata; versions in ascending order.
#[derive(Clone, PartialEq, Message)]
pub struct MetaRecord {
    #[prost(message, repeated, tag = "1")]
    pub versions: Vec<VersionRecord>,
    #[prost(uint64, tag = "2")]
    pub newest: u64,
    #[prost(uint64, tag = "3")]
    pub current: u64,
    #[prost(uint64, tag = "4")]
    pub previous: u64,
    #[prost(uint64, tag = "5")]
    pub pending: u64,
    #[prost(uint32, tag = "6")]
    pub max_versions: u32,
    #[prost(string, tag = "7")]
    pub owner: String,
    #[prost(uint64, tag = "8")]
    pub created_at_ms: u64,
    #[prost(uint64, tag = "9")]
    pub updated_at_ms: u64,
}

impl MetaRecord {
    fn version(&self, version: u64) -> Option<&VersionRecord> {
        self.versions
            .binary_search_by_key(&version, |v| v.version)
            .ok()
            .map(|i| &self.versions[i])
    }

    fn version_mut(&mut self, version: u64) -> Option<&mut VersionRecord> {
        match self.versions.binary_search_by_key(&version, |v| v.version) {
            Ok(i) => Some(&mut self.versions[i]),
            Err(_) => None,
        }
    }

    /// Whether `version` holds a stage and is not destroyed: the versions
    /// whose fingerprints a Match reports.
    pub fn is_staged_and_kept(&self, version: u64) -> bool {
        version != 0
            && [self.current, self.previous, self.pending].contains(&version)
            && self
                .versions
                .iter()
                .any(|v| v.version == version && !v.destroyed)
    }

    /// The stage a version holds, if any.
    pub fn stage_of(&self, version: u64) -> Option<Stage> {
        if version == 0 {
            None
        } else if version == self.current {
            Some(Stage::Current)
        } else if version == self.pending {
            Some(Stage::Pending)
        } else if version == self.previous {
            Some(Stage::Previous)
        } else {
            None
        }
    }

    fn staged(&self, stage: Stage) -> u64 {
        match stage {
            Stage::Current => self.current,
            Stage::Previous => self.previous,
            Stage::Pending => self.pending,
        }
    }
}

/// The stored fields of one version. Encoded into a zeroized buffer.
#[derive(Clone, PartialEq, Message)]
struct FieldsRecord {
    #[prost(btree_map = "string, bytes", tag = "1")]
    fields: BTreeMap<String, Vec<u8>>,
}

/// A version read back.
#[derive(Debug)]
pub struct SecretVersion {
    pub version: u64,
    pub stage: Option<Stage>,
    pub created_at_ms: u64,
    pub data: SecretData,
}

/// Which version a read asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selector {
    Version(u64),
    Stage(Stage),
}

/// A write of a new version.
#[derive(Debug)]
pub struct PutRequest {
    pub path: SecretPath,
    pub data: SecretData,
    /// Write only if the newest version is this one (0: only if none exists).
    pub cas: Option<u64>,
    pub max_versions: Option<u32>,
    pub owner: Option<String>,
    /// Where the new version goes: `Current` for a normal write (the old
    /// current becomes previous), `Pending` for a rotation's new value.
    pub stage: Stage,
}

pub struct SecretStore {
    barrier: Arc<Barrier>,
    limits: DataLimits,
    stripes: Vec<Mutex<()>>,
    /// Picks a path's stripe (and turn) under keys drawn at random for this
    /// process: a caller who may write many paths cannot choose ones that
    /// share a victim path's stripe to make its writes wait.
    stripe_keys: std::collections::hash_map::RandomState,
    changes: tokio::sync::broadcast::Sender<CurrentChanged>,
    /// One turn per lock stripe for a write on the blocking pool (a shared
    /// store; `put_async`), taken on the runtime before the write is sent
    /// there.
    turns: Vec<Arc<tokio::sync::Semaphore>>,
    /// Tests: a write made one record at a time stops after this many
    /// records, as a crash would stop it (`write_in_order`).
    #[cfg(test)]
    crash_after: std::sync::atomic::AtomicUsize,
    /// Tests: list a new version's fingerprints in its metadata on sled
    /// too, as on a shared store.
    #[cfg(test)]
    prints_in_meta: std::sync::atomic::AtomicBool,
    /// The discovery scan's fingerprints on a shared store (`print_index`).
    index: Arc<print_index::PrintIndex>,
    /// On sled: the staged versions whose fingerprints only their metadata
    /// lists (brought by an etcd snapshot), read once, at the first Match.
    unrecorded: print_index::PrintIndex,
    /// Tests: write a new version's fingerprints as on a shared store (in
    /// the metadata only), which an etcd snapshot restored onto sled holds.
    #[cfg(test)]
    prints_unrecorded: std::sync::atomic::AtomicBool,
    /// Tests: run once inside `list`, before it reads the prefix.
    #[cfg(test)]
    pub(crate) during_list: crate::test_hook::Hook,
}

/// A new `current` version: what watchers are told (no value).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrentChanged {
    pub path: SecretPath,
    pub version: u64,
    pub at_ms: u64,
}

/// How many announcements a slow watcher may fall behind before it is cut off.
pub const WATCH_BACKLOG: usize = 4096;

/// The paths one watcher names: exact paths, and prefixes (a path under a
/// prefix, or the prefix itself; the root prefix names every path).
#[derive(Debug, Clone, Default)]
pub struct WatchFilter {
    paths: Vec<String>,
    /// `None`: the root prefix.
    prefixes: Vec<Option<String>>,
}

impl WatchFilter {
    pub fn add_path(&mut self, path: &SecretPath) {
        self.paths.push(path.to_string());
    }

    pub fn add_prefix(&mut self, prefix: &ListPrefix) {
        self.prefixes.push(prefix.path().map(|p| p.to_string()));
    }

    /// How many paths and prefixes it names.
    pub fn len(&self) -> usize {
        self.paths.len() + self.prefixes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether `path` is named, exactly or under a prefix (`a/b` is under
    /// `a`, `a-b` is not).
    pub fn matches(&self, path: &str) -> bool {
        self.paths.iter().any(|p| p == path)
            || self.prefixes.iter().any(|prefix| match prefix {
                None => true,
                Some(prefix) => {
                    path == prefix
                        || (path.starts_with(prefix.as_str())
                            && path.as_bytes().get(prefix.len()) == Some(&b'/'))
                }
            })
    }
}

/// What a [`Watch`] yields next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watched {
    /// A new `current` version of a path the filter names.
    Changed(CurrentChanged),
    /// The watcher fell more than [`WATCH_BACKLOG`] announcements behind:
    /// it must read again and watch again.
    FellBehind,
    /// The server is stopping (or the store is gone).
    Ended,
}

/// One watcher's view of new `current` versions: those its filter names,
/// until shutdown. Made by [`SecretStore::watch`].
pub struct Watch {
    changes: tokio::sync::broadcast::Receiver<CurrentChanged>,
    filter: WatchFilter,
    shutdown: Shutdown,
}

impl Watch {
    /// The next change the filter names. Cancel-safe: use it in `select!`.
    pub async fn next(&mut self) -> Watched {
        use tokio::sync::broadcast::error::RecvError;
        loop {
            let change = tokio::select! {
                change = self.changes.recv() => change,
                _ = self.shutdown.wait() => return Watched::Ended,
            };
            match change {
                Ok(change) if self.filter.matches(change.path.as_str()) => {
                    return Watched::Changed(change)
                }
                Ok(_) => continue,
                Err(RecvError::Lagged(_)) => return Watched::FellBehind,
                Err(RecvError::Closed) => return Watched::Ended,
            }
        }
    }
}

/// Built by hand, not with `format!`: these are made on every read, and
/// the formatting machinery costs more than the copy (see the README's
/// profile of a Get).
fn meta_key(path: &SecretPath) -> String {
    let mut key = String::with_capacity(META.len() + path.as_str().len());
    key.push_str(META);
    key.push_str(path.as_str());
    key
}

fn data_key(path: &SecretPath, version: u64) -> String {
    let mut key = String::with_capacity(DATA.len() + path.as_str().len() + 21);
    key.push_str(DATA);
    key.push_str(path.as_str());
    key.push('#');
    push_padded(&mut key, version);
    key
}

/// `n` in decimal with leading zeros to 20 digits (`{n:020}`): every u64
/// fits, so versions sort as text in number order.
fn push_padded(out: &mut String, mut n: u64) {
    let mut digits = [b'0'; 20];
    for d in digits.iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend(digits.iter().map(|&d| char::from(d)));
}

fn data_prefix(path: &SecretPath) -> String {
    format!("{DATA}{path}#")
}

impl SecretStore {
    pub fn new(barrier: Arc<Barrier>, limits: DataLimits) -> Self {
        // On etcd, reads of fresh requests come from a cache of the stored
        // ciphertext, kept right by the store's watch (`storage::read_cache`).
        barrier.cache_reads(META);
        barrier.cache_reads(DATA);
        barrier.cache_reads(fingerprint::VER);
        let index = Arc::new(print_index::PrintIndex::default());
        if let Some(coherence) = barrier.coherence() {
            // Every metadata change any node makes marks its path for the
            // index; a new watch session marks it all. Weak: the store
            // (through the barrier) holds these callbacks.
            let changed = Arc::downgrade(&index);
            let reset = Arc::downgrade(&index);
            coherence.track(
                META,
                Arc::new(move |key: &str| {
                    if let Some(index) = changed.upgrade() {
                        index.changed(META, key);
                    }
                }),
                Arc::new(move || {
                    if let Some(index) = reset.upgrade() {
                        index.reset();
                    }
                }),
            );
        }
        Self {
            barrier,
            limits,
            stripes: (0..LOCK_STRIPES).map(|_| Mutex::new(())).collect(),
            stripe_keys: std::collections::hash_map::RandomState::new(),
            changes: tokio::sync::broadcast::channel(WATCH_BACKLOG).0,
            turns: (0..LOCK_STRIPES)
                .map(|_| Arc::new(tokio::sync::Semaphore::new(1)))
                .collect(),
            #[cfg(test)]
            crash_after: std::sync::atomic::AtomicUsize::new(usize::MAX),
            #[cfg(test)]
            prints_in_meta: std::sync::atomic::AtomicBool::new(false),
            index,
            unrecorded: print_index::PrintIndex::default(),
            #[cfg(test)]
            prints_unrecorded: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            during_list: crate::test_hook::Hook::default(),
        }
    }

    /// The vault was sealed: the discovery scan's fingerprint indexes drop
    /// what they hold (tags and paths), so a sealed node keeps none of it.
    pub fn on_seal(&self) {
        self.index.forget();
        self.unrecorded.forget();
    }

    /// Announcements of new `current` versions, from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<CurrentChanged> {
        self.changes.subscribe()
    }

    /// The new `current` versions of the paths `filter` names, from now on
    /// (subscribe before answering the watcher, so nothing after the answer
    /// is missed), until `shutdown`.
    pub fn watch(&self, filter: WatchFilter, shutdown: Shutdown) -> Watch {
        Watch {
            changes: self.changes.subscribe(),
            filter,
            shutdown,
        }
    }

    fn announce(&self, path: &SecretPath, version: u64, at_ms: u64) {
        // No receiver is not an error: nobody is watching.
        let _ = self.changes.send(CurrentChanged {
            path: path.clone(),
            version,
            at_ms,
        });
    }

    pub fn limits(&self) -> &DataLimits {
        &self.limits
    }

    /// The lock stripe of `path`.
    fn stripe_of(&self, path: &SecretPath) -> usize {
        use std::hash::BuildHasher;
        (self.stripe_keys.hash_one(path) as usize) % LOCK_STRIPES
    }

    fn stripe(&self, path: &SecretPath) -> std::sync::MutexGuard<'_, ()> {
        // A poisoned stripe only means another writer panicked; the data is in storage.
        self.stripes[self.stripe_of(path)]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Waits, up to `within`, until no write runs on the blocking pool
    /// (`put_async`); false if one still ran then. For shutdown: the
    /// listeners and the changes whose clients left have stopped, so no
    /// new write starts.
    pub async fn writes_settled(&self, within: std::time::Duration) -> bool {
        let all = async {
            for turn in &self.turns {
                drop(turn.acquire().await);
            }
        };
        tokio::time::timeout(within, all).await.is_ok()
    }

    pub fn metadata(&self, path: &SecretPath) -> Result<MetaRecord, SecretsError> {
        self.metadata_fenced(path, false)
    }

    /// [`SecretStore::metadata`] for a request whose cache fence said
    /// `fresh` (`Barrier::cache_fence`, taken once at the request's start).
    pub fn metadata_fenced(
        &self,
        path: &SecretPath,
        fresh: bool,
    ) -> Result<MetaRecord, SecretsError> {
        let raw = self
            .barrier
            .get_fenced(&meta_key(path), fresh)?
            .ok_or(SecretsError::NotFound)?;
        MetaRecord::decode(raw.as_slice()).map_err(|_| SecretsError::Corrupt)
    }

    /// Writes a new version. Not durable until the caller awaits `durable`.
    /// `proof` is `write` on the path.
    pub fn put(
        &self,
        proof: &Authorized,
        req: PutRequest,
        now_ms: u64,
    ) -> Result<u64, SecretsError> {
        self.put_fenced(proof, req, now_ms, false)
    }

    /// [`SecretStore::put`] for a request whose cache fence said `fresh`
    /// (`Barrier::cache_fence`, taken once at its start).
    ///
    /// On a shared store (etcd) other nodes write too, and this node's
    /// stripe lock does not stop them: the write is one transaction that
    /// applies only if the metadata (and every fingerprint record it relied
    /// on) is still the record it read. So the records may come from the
    /// read cache (`fresh`), which saves the reads; if another node wrote
    /// in between, nothing is written and the write is made again from
    /// records read from the store.
    pub fn put_fenced(
        &self,
        proof: &Authorized,
        req: PutRequest,
        now_ms: u64,
        fresh: bool,
    ) -> Result<u64, SecretsError> {
        require(proof, Capability::Write, &req.path)?;
        self.limits.check(&req.data)?;
        let max_versions = req
            .max_versions
            .map(|n| self.limits.check_max_versions(n))
            .transpose()?;
        let shared = self.barrier.is_shared_store();
        let write = || {
            let _guard = self.stripe(&req.path);
            let mut fresh = fresh && shared;
            for _ in 0..PUT_ATTEMPTS {
                if let Some(version) = self.put_once(&req, max_versions, now_ms, fresh, shared)? {
                    if req.stage == Stage::Current {
                        self.announce(&req.path, version, now_ms);
                    }
                    return Ok(version);
                }
                fresh = false;
            }
            Err(SecretsError::Contended)
        };
        if shared {
            // The write waits on etcd while it holds its path's lock, and
            // other writes of the path wait for that lock: the runtime is
            // told first, so a worker's other requests move on meanwhile.
            // On sled the write is short, and handing the worker over would
            // cost more than it saves.
            crate::storage::off_worker(write)
        } else {
            write()
        }
    }

    /// [`SecretStore::put_fenced`] for an async caller (the API's Put).
    ///
    /// On a shared store (etcd) the write waits for its gathered
    /// transaction, about 10 ms under load, while it holds its path's lock:
    /// it runs on the blocking pool, so no runtime worker is handed over
    /// (`storage::off_worker` hands one over, and its thread switches were
    /// a fifth of a node's CPU in a Put phase). A write first takes its
    /// path's turn, one per lock stripe, on the runtime: writes of one
    /// stripe wait there for each other, holding no thread and having
    /// written nothing, so at most 64 writes are on the pool at once and
    /// many writes of one path cannot keep those of other paths out. A caller
    /// dropped after its write started does not stop it: the caller's
    /// request seam keeps a change running once it acted (`api::detach`),
    /// so its outcome record follows the write. A leader's fence, if the
    /// caller runs under one, goes with the write. On sled the write runs
    /// in place.
    pub async fn put_async(
        self: &Arc<Self>,
        proof: Authorized,
        req: PutRequest,
        now_ms: u64,
        fresh: bool,
    ) -> Result<u64, SecretsError> {
        if !self.barrier.is_shared_store() {
            return self.put_fenced(&proof, req, now_ms, fresh);
        }
        let slot = Arc::clone(&self.turns[self.stripe_of(&req.path)])
            .acquire_owned()
            .await
            .map_err(|_| SecretsError::WriteStopped)?; // never closed
        let store = Arc::clone(self);
        let fence = crate::storage::cluster::current();
        tokio::task::spawn_blocking(move || {
            let _slot = slot;
            crate::storage::cluster::blocking(fence, || {
                store.put_fenced(&proof, req, now_ms, fresh)
            })
        })
        .await
        .map_err(|_| SecretsError::WriteStopped)?
    }

    /// One try of a write: `None` when, on a shared store, a record it read
    /// changed before the write (nothing was written), or a check-and-set
    /// failed on records from the cache (checked again against the store).
    fn put_once(
        &self,
        req: &PutRequest,
        max_versions: Option<u32>,
        now_ms: u64,
        fresh: bool,
        shared: bool,
    ) -> Result<Option<u64>, SecretsError> {
        let meta_k = meta_key(&req.path);
        let (mut meta, stamp) = match self.barrier.get_stamped_fenced(&meta_k, fresh)? {
            Some((raw, stamp)) => (
                MetaRecord::decode(raw.as_slice()).map_err(|_| SecretsError::Corrupt)?,
                Some(stamp),
            ),
            None => (
                MetaRecord {
                    max_versions: self.limits.default_max_versions,
                    created_at_ms: now_ms,
                    ..MetaRecord::default()
                },
                None,
            ),
        };
        let staged_before = fingerprint::staged(&meta);
        if let Some(expected) = req.cas {
            if expected != meta.newest {
                if fresh {
                    return Ok(None);
                }
                return Err(SecretsError::CasMismatch {
                    expected,
                    actual: meta.newest,
                });
            }
        }
        if let Some(n) = max_versions {
            meta.max_versions = n;
        }
        if let Some(owner) = &req.owner {
            meta.owner.clone_from(owner);
        }
        let version = meta.newest + 1;
        meta.newest = version;
        meta.updated_at_ms = now_ms;
        meta.versions.push(VersionRecord {
            version,
            created_at_ms: now_ms,
            ..Default::default()
        });
        match req.stage {
            Stage::Current => {
                if meta.current != 0 {
                    meta.previous = meta.current;
                }
                meta.current = version;
            }
            Stage::Pending => meta.pending = version,
            Stage::Previous => return Err(InputError::BadStage.into()),
        }
        // On a shared store the pruned versions' data goes in the guarded
        // transaction (etcd: 127 operations), so at most `PRUNE_PER_WRITE`
        // go per write; the rest stay listed (readable, destroyable) and
        // go with the next writes.
        let pruned = prune(&mut meta, if shared { PRUNE_PER_WRITE } else { usize::MAX });

        let mut fields = FieldsRecord {
            fields: req
                .data
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_vec()))
                .collect(),
        };
        let encoded = Zeroizing::new(fields.encode_to_vec());
        fields.fields.values_mut().for_each(|v| v.zeroize());
        let data_k = data_key(&req.path, version);
        // Before the metadata is encoded: it may list the new fingerprints.
        let prints = self.print_ops_fenced(
            &req.path,
            &staged_before,
            None,
            &mut meta,
            Some((version, &req.data)),
            fresh,
        )?;
        let meta_bytes = meta.encode_to_vec();
        if !shared {
            self.write_in_order(
                &req.path,
                &meta,
                (&meta_k, &meta_bytes),
                (&data_k, &encoded),
                &prints,
            )?;
            return Ok(Some(version));
        }
        let pruned_keys: Vec<String> = pruned.iter().map(|v| data_key(&req.path, *v)).collect();
        let mut ops = vec![
            PlainOp::Put(&meta_k, &meta_bytes),
            PlainOp::Put(&data_k, &encoded),
        ];
        ops.extend(pruned_keys.iter().map(|k| PlainOp::Delete(k)));
        prints.extend_batch(&mut ops);
        let mut expect = vec![(meta_k.as_str(), stamp.as_ref())];
        expect.extend(prints.read.iter().map(|(k, s)| (k.as_str(), s.as_ref())));
        if !self.barrier.batch_if(&expect, &ops)? {
            return Ok(None);
        }
        Ok(Some(version))
    }

    /// A new version's records on a store of this node alone (sled), one at
    /// a time, in an order after which a crash at any point leaves readers
    /// the old secret or the new one, never a mixture.
    ///
    /// Not one batch: sled takes a store-wide lock for a batch, which stops
    /// every other read and write, and writes its log buffer out twice for
    /// it, so a batched Put cost about twice the server CPU of this (see the
    /// README, "Sixth round: durable Put on sled without a batch"). The
    /// path's write lock is held by the caller, so no other write of the
    /// path runs between. Every value is encrypted before the first write
    /// (`Barrier::write_in_order`), so a seal or a refused key meanwhile
    /// writes nothing.
    ///
    /// 1. the version's data: no metadata names the version yet, so no read
    ///    finds it (a crash here leaves a record the next write of the same
    ///    version number replaces);
    /// 2. the version's list of fingerprints, then the fingerprints: a match
    ///    counts only a fingerprint that the version's list names while the
    ///    metadata stages the version (`match_value`), so fingerprints of an
    ///    unfinished write are never reported, and the next write of the
    ///    same version number finds them by that list and drops them;
    /// 3. the metadata: the write takes effect;
    /// 4. what the new metadata no longer names: data of versions it does
    ///    not list, and fingerprints of versions it does not stage. These
    ///    are found by listing the path's keys, not only from what this
    ///    write pruned, so what an earlier write cut off by a crash left
    ///    behind goes too.
    fn write_in_order(
        &self,
        path: &SecretPath,
        meta: &MetaRecord,
        (meta_k, meta_bytes): (&str, &[u8]),
        (data_k, encoded): (&str, &[u8]),
        prints: &fingerprint::PrintOps,
    ) -> Result<(), SecretsError> {
        let unlisted = self.unlisted_data(path, meta)?;
        let strays = self.stray_prints(path, meta, prints)?;
        let mut steps = vec![PlainOp::Put(data_k, encoded)];
        steps.extend(prints.puts.iter().map(|(k, v)| PlainOp::Put(k, v)));
        steps.push(PlainOp::Put(meta_k, meta_bytes));
        steps.extend(
            unlisted
                .iter()
                .chain(&prints.deletes)
                .chain(&strays)
                .map(|k| PlainOp::Delete(k)),
        );
        #[cfg(test)]
        let stopped = {
            let stop = self.crash_after.load(std::sync::atomic::Ordering::SeqCst);
            let stopped = steps.len() > stop;
            steps.truncate(stop);
            stopped
        };
        self.barrier.write_in_order(&steps)?;
        #[cfg(test)]
        if stopped {
            return Err(SecretsError::Corrupt);
        }
        Ok(())
    }

    /// The data keys of `path` whose version `meta` does not list: the
    /// versions this write prunes, and any an earlier write left behind.
    fn unlisted_data(
        &self,
        path: &SecretPath,
        meta: &MetaRecord,
    ) -> Result<Vec<String>, SecretsError> {
        let mut out = Vec::new();
        for (key, version) in self.versioned_keys(DATA, path)? {
            if meta.version(version).is_none() {
                out.push(key);
            }
        }
        Ok(out)
    }

    /// The keys `<kind><path>#<version>` the store holds, with their
    /// versions (a key whose version does not parse is `Corrupt`).
    fn versioned_keys(
        &self,
        kind: &str,
        path: &SecretPath,
    ) -> Result<Vec<(String, u64)>, SecretsError> {
        let prefix = format!("{kind}{path}#");
        self.barrier
            .scan_keys(&prefix)?
            .into_iter()
            .map(|key| {
                let version = key[prefix.len()..]
                    .parse()
                    .map_err(|_| SecretsError::Corrupt)?;
                Ok((key, version))
            })
            .collect()
    }

    /// Reads one version.
    pub fn get(
        &self,
        path: &SecretPath,
        selector: Selector,
    ) -> Result<SecretVersion, SecretsError> {
        self.get_fenced(path, selector, false)
    }

    /// Reads one version for a request whose cache fence said `fresh`
    /// (`Barrier::cache_fence`, taken once at the request's start): on etcd
    /// the stored records may then come from the read cache, which holds
    /// every change acknowledged before the request began.
    pub fn get_fenced(
        &self,
        path: &SecretPath,
        selector: Selector,
        fresh: bool,
    ) -> Result<SecretVersion, SecretsError> {
        let meta = self.metadata_fenced(path, fresh)?;
        let version = match selector {
            Selector::Version(0) => return Err(InputError::BadVersion.into()),
            Selector::Version(v) => v,
            Selector::Stage(stage) => match meta.staged(stage) {
                0 => return Err(SecretsError::NoSuchStage(stage.as_str())),
                v => v,
            },
        };
        let record = meta
            .version(version)
            .ok_or(SecretsError::NoSuchVersion(version))?;
        if record.destroyed {
            return Err(SecretsError::Destroyed(version));
        }
        if record.deleted_at_ms != 0 {
            return Err(SecretsError::Deleted(version));
        }
        let raw = self
            .barrier
            .get_fenced(&data_key(path, version), fresh)?
            .ok_or(SecretsError::Corrupt)?;
        let fields = FieldsRecord::decode(raw.as_slice()).map_err(|_| SecretsError::Corrupt)?;
        let data = fields
            .fields
            .into_iter()
            .map(|(k, v)| (k, SecretBytes::new(v)))
            .collect();
        Ok(SecretVersion {
            version,
            stage: meta.stage_of(version),
            created_at_ms: record.created_at_ms,
            data,
        })
    }

    /// Paths under a prefix (segment-wise: `app` lists `app` and `app/...`,
    /// not `apple`) that `visible` admits: the caller's own check of each
    /// path (this module knows nothing of policies).
    pub fn list(
        &self,
        prefix: &ListPrefix,
        visible: impl Fn(&str) -> bool,
    ) -> Result<Vec<String>, SecretsError> {
        #[cfg(test)]
        self.during_list.run();
        let keys = match prefix.path() {
            None => self.barrier.scan_keys(META)?,
            Some(p) => {
                let mut keys = self.barrier.scan_keys(&format!("{META}{p}/"))?;
                if self.barrier.get(&format!("{META}{p}"))?.is_some() {
                    keys.insert(0, format!("{META}{p}"));
                }
                keys
            }
        };
        Ok(keys
            .into_iter()
            .filter_map(|k| k.strip_prefix(META).map(str::to_owned))
            .filter(|path| visible(path))
            .collect())
    }

    /// Soft-deletes a version (default: current). Undelete brings it back.
    /// `proof` is `delete` on the path.
    pub fn delete(
        &self,
        proof: &Authorized,
        path: &SecretPath,
        version: Option<u64>,
        now_ms: u64,
    ) -> Result<u64, SecretsError> {
        require(proof, Capability::Delete, path)?;
        self.update_version(path, version, |meta, v| {
            let record = meta.version_mut(v).ok_or(SecretsError::NoSuchVersion(v))?;
            if record.destroyed {
                return Err(SecretsError::Destroyed(v));
            }
            if record.deleted_at_ms == 0 {
                record.deleted_at_ms = now_ms;
            }
            meta.updated_at_ms = now_ms;
            Ok(None)
        })
    }

    /// Brings back a soft-deleted version. `proof` is `write` on the path.
    pub fn undelete(
        &self,
        proof: &Authorized,
        path: &SecretPath,
        version: u64,
        now_ms: u64,
    ) -> Result<u64, SecretsError> {
        require(proof, Capability::Write, path)?;
        self.update_version(path, Some(version), |meta, v| {
            let record = meta.version_mut(v).ok_or(SecretsError::NoSuchVersion(v))?;
            if record.destroyed {
                return Err(SecretsError::Destroyed(v));
            }
            record.deleted_at_ms = 0;
            meta.updated_at_ms = now_ms;
            Ok(None)
        })
    }

    /// Removes a version's data for good; its metadata stays, marked
    /// destroyed. `proof` is `destroy` on the path.
    pub fn destroy(
        &self,
        proof: &Authorized,
        path: &SecretPath,
        version: u64,
        now_ms: u64,
    ) -> Result<u64, SecretsError> {
        require(proof, Capability::Destroy, path)?;
        self.update_version(path, Some(version), |meta, v| {
            let record = meta.version_mut(v).ok_or(SecretsError::NoSuchVersion(v))?;
            record.destroyed = true;
            meta.updated_at_ms = now_ms;
            Ok(Some(v))
        })
    }

    /// Reads the metadata, applies `change` to version `version` (default:
    /// current) and writes it back with the data and fingerprint records
    /// the change touches. On a shared store (etcd) other nodes write the
    /// same records and this node's stripe lock does not stop them: the
    /// write applies only if the metadata and the fingerprint records it
    /// relied on are still the ones read, else it is made again from a new
    /// read (as a put is), so a version another node wrote in between, or a
    /// destroy it made, is never lost.
    fn update_version(
        &self,
        path: &SecretPath,
        version: Option<u64>,
        change: impl Fn(&mut MetaRecord, u64) -> Result<Option<u64>, SecretsError>,
    ) -> Result<u64, SecretsError> {
        if version == Some(0) {
            return Err(InputError::BadVersion.into());
        }
        let _guard = self.stripe(path);
        let shared = self.barrier.is_shared_store();
        let meta_k = meta_key(path);
        for _ in 0..PUT_ATTEMPTS {
            let (mut meta, stamp) = self.metadata_stamped(&meta_k)?;
            let v = match version {
                Some(v) => v,
                None if meta.current != 0 => meta.current,
                None => return Err(SecretsError::NoSuchStage("current")),
            };
            let staged_before = fingerprint::staged(&meta);
            let remove = change(&mut meta, v)?;
            let removed_key = remove.map(|v| data_key(path, v));
            let prints = self.print_ops(path, &staged_before, Some(v), &mut meta, None)?;
            let meta_bytes = meta.encode_to_vec();
            let mut ops = vec![PlainOp::Put(&meta_k, &meta_bytes)];
            if let Some(k) = &removed_key {
                ops.push(PlainOp::Delete(k));
            }
            prints.extend_batch(&mut ops);
            if self.write_if_unchanged(shared, &meta_k, &stamp, &prints, &ops)? {
                return Ok(v);
            }
        }
        Err(SecretsError::Contended)
    }

    /// The metadata of `meta_k` read from the store (never a cache), with
    /// the stamp a guarded write compares.
    fn metadata_stamped(
        &self,
        meta_k: &str,
    ) -> Result<(MetaRecord, crate::barrier::Stamp), SecretsError> {
        let (raw, stamp) = self
            .barrier
            .get_stamped(meta_k)?
            .ok_or(SecretsError::NotFound)?;
        let meta = MetaRecord::decode(raw.as_slice()).map_err(|_| SecretsError::Corrupt)?;
        Ok((meta, stamp))
    }

    /// Writes `ops`: on a shared store only if the metadata still holds
    /// `stamp` and every fingerprint record `prints` read is unchanged
    /// (false: nothing written, read again); elsewhere at once (the stripe
    /// lock serialises this process's writers).
    fn write_if_unchanged(
        &self,
        shared: bool,
        meta_k: &str,
        stamp: &crate::barrier::Stamp,
        prints: &fingerprint::PrintOps,
        ops: &[PlainOp<'_>],
    ) -> Result<bool, SecretsError> {
        if !shared {
            self.barrier.batch(ops)?;
            return Ok(true);
        }
        let mut expect = vec![(meta_k, Some(stamp))];
        expect.extend(prints.read.iter().map(|(k, s)| (k.as_str(), s.as_ref())));
        Ok(self.barrier.batch_if(&expect, ops)?)
    }

    /// Moves `pending` to `current` (the old current becomes `previous`).
    pub fn promote_pending(
        &self,
        path: &SecretPath,
        version: u64,
        now_ms: u64,
    ) -> Result<(), SecretsError> {
        self.update_version(path, Some(version), |meta, v| {
            if meta.pending != v {
                return Err(SecretsError::NoSuchStage("pending"));
            }
            meta.previous = meta.current;
            meta.current = v;
            meta.pending = 0;
            meta.updated_at_ms = now_ms;
            Ok(None)
        })?;
        self.announce(path, version, now_ms);
        Ok(())
    }

    /// Drops the `pending` stage (a rotation that did not verify).
    pub fn clear_pending(&self, path: &SecretPath, now_ms: u64) -> Result<(), SecretsError> {
        let _guard = self.stripe(path);
        let shared = self.barrier.is_shared_store();
        let meta_k = meta_key(path);
        for _ in 0..PUT_ATTEMPTS {
            let (mut meta, stamp) = self.metadata_stamped(&meta_k)?;
            let staged_before = fingerprint::staged(&meta);
            meta.pending = 0;
            meta.updated_at_ms = now_ms;
            let prints = self.print_ops(path, &staged_before, None, &mut meta, None)?;
            let meta_bytes = meta.encode_to_vec();
            let mut ops = vec![PlainOp::Put(&meta_k, &meta_bytes)];
            prints.extend_batch(&mut ops);
            if self.write_if_unchanged(shared, &meta_k, &stamp, &prints, &ops)? {
                return Ok(());
            }
        }
        Err(SecretsError::Contended)
    }

    /// Data keys of every version of a path, for tests and tools.
    pub fn data_keys(&self, path: &SecretPath) -> Result<Vec<String>, SecretsError> {
        Ok(self.barrier.scan_keys(&data_prefix(path))?)
    }

    pub async fn durable(&self) -> Result<(), SecretsError> {
        Ok(self.barrier.durable().await?)
    }
}

/// Versions one write on a shared store prunes at most: their data's
/// deletes share its guarded transaction (etcd: 127 operations) with its
/// own records and fingerprint changes.
const PRUNE_PER_WRITE: usize = 64;

/// Drops the oldest versions beyond `max_versions`, never one that holds a
/// stage, at most `limit` of them; returns the versions whose data must be
/// deleted.
fn prune(meta: &mut MetaRecord, limit: usize) -> Vec<u64> {
    let max = meta.max_versions.max(1) as usize;
    let mut removed = Vec::new();
    while meta.versions.len() > max && removed.len() < limit {
        let Some(pos) = meta
            .versions
            .iter()
            .position(|v| meta.stage_of(v.version).is_none())
        else {
            break;
        };
        removed.push(meta.versions.remove(pos).version);
    }
    removed
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::barrier::BarrierOptions;
    use crate::clock::ShutdownTrigger;
    use crate::storage::SledBackend;

    fn store() -> (tempfile::TempDir, SecretStore) {
        let dir = tempfile::tempdir().unwrap();
        let backend = SledBackend::open(dir.path()).unwrap();
        let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
        let shares = barrier.init(1, 1).unwrap();
        barrier.unseal(&shares[0].0).unwrap();
        (
            dir,
            SecretStore::new(Arc::new(barrier), DataLimits::default()),
        )
    }

    /// Which paths share a lock stripe is drawn anew for each store: the
    /// same 64 paths fall on other stripes in a second store, so nobody can
    /// compute, from the code alone, paths whose writes queue behind a
    /// victim's.
    #[test]
    fn lock_stripes_are_keyed_per_store() {
        let ((_d1, one), (_d2, two)) = (store(), store());
        let paths: Vec<SecretPath> = (0..64)
            .map(|i| SecretPath::parse(&format!("app/p{i}")).unwrap())
            .collect();
        let stripes = |s: &SecretStore| paths.iter().map(|p| s.stripe_of(p)).collect::<Vec<_>>();
        assert_eq!(stripes(&one), stripes(&one), "a store's choice is stable");
        assert_ne!(stripes(&one), stripes(&two));
    }

    /// The hand-built storage keys are the ones `format!` made before, so
    /// every stored version is still found (and versions still sort).
    #[test]
    fn storage_keys_are_unchanged() {
        let path = SecretPath::parse("app/db").unwrap();
        assert_eq!(meta_key(&path), format!("{META}{path}"));
        for version in [0, 1, 9, 10, 12_345, u64::MAX - 1, u64::MAX] {
            assert_eq!(
                data_key(&path, version),
                format!("{DATA}{path}#{version:020}")
            );
        }
        assert_eq!(path.resource(), format!("secret/{path}"));
    }

    fn put(store: &SecretStore, path: &str) -> u64 {
        let mut data = SecretData::new();
        data.insert("v".into(), SecretBytes::from("x"));
        let proof = crate::policy::PolicySet::compile([&crate::policy::Policy::root()])
            .unwrap()
            .authorize(&format!("secret/{path}"), Capability::Write)
            .unwrap();
        store
            .put(
                &proof,
                PutRequest {
                    path: SecretPath::parse(path).unwrap(),
                    data,
                    cas: None,
                    max_versions: None,
                    owner: None,
                    stage: Stage::Current,
                },
                1_000,
            )
            .unwrap()
    }

    #[test]
    fn a_filter_names_paths_and_what_is_under_prefixes() {
        let mut filter = WatchFilter::default();
        assert!(filter.is_empty());
        filter.add_path(&SecretPath::parse("app/db").unwrap());
        filter.add_prefix(&ListPrefix::parse("team").unwrap());
        assert_eq!(filter.len(), 2);
        for (path, named) in [
            ("app/db", true),
            ("app/db/x", false),
            ("app/dbx", false),
            ("team", true),
            ("team/a/b", true),
            ("team-b/a", false),
            ("other", false),
        ] {
            assert_eq!(filter.matches(path), named, "{path}");
        }
        let mut everything = WatchFilter::default();
        everything.add_prefix(&ListPrefix::parse("").unwrap());
        assert!(everything.matches("any/path"));
    }

    #[tokio::test]
    async fn a_watch_yields_the_named_changes_then_ends_at_shutdown() {
        let (_dir, store) = store();
        let mut filter = WatchFilter::default();
        filter.add_prefix(&ListPrefix::parse("app").unwrap());
        let stop = ShutdownTrigger::new();
        let mut watch = store.watch(filter, stop.signal());
        put(&store, "other/x");
        let version = put(&store, "app/db");
        match watch.next().await {
            Watched::Changed(change) => {
                assert_eq!(change.path.as_str(), "app/db");
                assert_eq!(change.version, version);
            }
            other => panic!("expected the change of app/db, got {other:?}"),
        }
        stop.trigger();
        assert_eq!(watch.next().await, Watched::Ended);
    }

    #[tokio::test]
    async fn a_watcher_that_falls_behind_is_told() {
        let (_dir, store) = store();
        let mut filter = WatchFilter::default();
        filter.add_path(&SecretPath::parse("app/db").unwrap());
        let mut watch = store.watch(filter, Shutdown::never());
        for _ in 0..=WATCH_BACKLOG {
            store.announce(&SecretPath::parse("app/db").unwrap(), 1, 0);
        }
        assert_eq!(watch.next().await, Watched::FellBehind);
    }
}
