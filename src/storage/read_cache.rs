//! A bounded in-memory cache of stored values (ciphertext, exactly as the
//! store holds them) for a store that other nodes write (etcd), kept right
//! by the store's change feed (`coherence`).
//!
//! A module asks for it with `Backend::cache_reads(prefix)` (the secrets
//! module does, for `secrets/meta/` and `secrets/data/`). From then on, on
//! etcd:
//!
//! - every write under the prefix bumps the change marker (it is tracked,
//!   as the token and policy prefixes are), so the request fence covers it;
//! - every event the watch delivers for a key under it removes that key's
//!   entry (unless the entry already holds that revision or a later one),
//!   and a new watch session empties the cache;
//! - a read for a request whose fence held (`Backend::get_fenced` with
//!   `fresh`) is answered from the cache when it holds the key; any other
//!   read goes to etcd and may fill the cache.
//!
//! **The insert rule.** Each of 4,096 buckets (by key hash) remembers the
//! highest revision of a change the watch delivered for one of its keys. A
//! value written at revision `m` is inserted only if that highest revision
//! is not above `m`, and if no new watch session started since just before
//! the read (or the write) that produced it. So a value older than a
//! delivered change of its key is never inserted: the change's event either
//! came before the insert (refused) or comes after it (and removes the
//! entry). A new session emptied the cache after reading its start
//! revision `S`, and what is read after that shows everything up to `S`.
//! This node's own writes go in at their transaction's revision the same
//! way (write-through). (`coherence` has the whole argument for the token
//! and policy caches; this cache follows the same steps, with revisions in
//! place of a generation count.)

//! **Bounds.** At most `max_entries` entries and `max_bytes` bytes (key,
//! value and a fixed per-entry overhead); the least recently used entries
//! go first. A value larger than an eighth of `max_bytes` is never cached.
//! Plaintext is never held here: the barrier decrypts each answer anew.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;

/// Buckets of the insert rule.
const BUCKETS: usize = 4096;
/// Bytes counted for each entry beyond its key and value (map and order
/// bookkeeping, roughly).
pub const ENTRY_OVERHEAD: usize = 96;

/// The default bounds (see `EtcdOptions`).
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;
pub const DEFAULT_MAX_ENTRIES: usize = 65_536;

/// What the cache did so far, and what it holds (for `/metrics` and tests).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReadCacheFigures {
    pub entries: u64,
    pub bytes: u64,
    pub max_entries: u64,
    pub max_bytes: u64,
    pub hits: u64,
    pub misses: u64,
    pub inserted: u64,
    /// Inserts refused by the insert rule.
    pub refused: u64,
    /// Entries pushed out by the bounds.
    pub evicted: u64,
    /// Entries removed by a change the watch delivered.
    pub invalidated: u64,
    /// Times the whole cache was emptied (a new watch session).
    pub resets: u64,
}

/// The cache's metrics, shared with `/metrics` (clones share the values).
#[derive(Clone, Default)]
pub struct ReadCacheMetrics {
    pub entries: Gauge,
    pub bytes: Gauge,
    pub hits: Counter,
    pub misses: Counter,
    pub evicted: Counter,
    pub invalidated: Counter,
    pub refused: Counter,
}

struct Entry {
    value: Vec<u8>,
    /// The etcd revision that wrote this value (its `mod_revision`).
    revision: i64,
    /// Position in the least-recently-used order.
    used: u64,
}

/// A key, held once and shared by the map and the eviction order (so the
/// bytes counted are the bytes held: a second copy in the order would be
/// up to 512 bytes a path beyond the bound).
type Key = Arc<[u8]>;

#[derive(Default)]
struct State {
    map: HashMap<Key, Entry>,
    /// use sequence -> key: the least recently used first.
    order: BTreeMap<u64, Key>,
    seq: u64,
    bytes: usize,
    /// Per bucket: the highest revision of a delivered change of its keys.
    delivered: Vec<i64>,
    /// Bumped by every reset (a new watch session).
    era: u64,
    inserted: u64,
    resets: u64,
}

/// A ticket taken just before a read from (or a write to) the store: the
/// insert of its value is refused if the cache was reset since.
#[derive(Debug, Clone, Copy)]
pub struct Ticket {
    era: u64,
}

/// See the module doc.
pub struct ReadCache {
    max_bytes: usize,
    max_entries: usize,
    prefixes: RwLock<Vec<Vec<u8>>>,
    state: Mutex<State>,
    metrics: ReadCacheMetrics,
    /// Picks a key's bucket under keys drawn at random for this process, so
    /// that nobody can choose keys that share a victim key's bucket.
    bucket_keys: std::collections::hash_map::RandomState,
}

impl std::fmt::Debug for ReadCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the keys or values.
        f.debug_struct("ReadCache")
            .field("figures", &self.figures())
            .finish_non_exhaustive()
    }
}

fn cost(key: &[u8], value: &[u8]) -> usize {
    key.len() + value.len() + ENTRY_OVERHEAD
}

impl ReadCache {
    /// A cache of at most `max_entries` entries and `max_bytes` bytes; a
    /// bound of 0 turns the cache off.
    pub fn new(max_bytes: usize, max_entries: usize) -> Self {
        Self {
            max_bytes,
            max_entries,
            prefixes: RwLock::new(Vec::new()),
            state: Mutex::new(State {
                delivered: vec![0; BUCKETS],
                ..State::default()
            }),
            metrics: ReadCacheMetrics::default(),
            bucket_keys: std::collections::hash_map::RandomState::new(),
        }
    }

    fn bucket_of(&self, key: &[u8]) -> usize {
        use std::hash::BuildHasher;
        (self.bucket_keys.hash_one(key) as usize) % BUCKETS
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics under this lock; the state is whole whatever happened.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Serves keys under `prefix` from now on; false if it already did.
    pub fn add_prefix(&self, prefix: &str) -> bool {
        let mut prefixes = self
            .prefixes
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        if prefixes.iter().any(|p| p == prefix.as_bytes()) {
            return false;
        }
        prefixes.push(prefix.as_bytes().to_vec());
        true
    }

    /// Whether `key` is under a cached prefix (and the cache is on).
    pub fn covers(&self, key: &[u8]) -> bool {
        self.max_bytes > 0
            && self.max_entries > 0
            && self
                .prefixes
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .any(|p| key.starts_with(p))
    }

    /// The stored value of `key`, if the cache holds it (a hit moves it to
    /// the back of the eviction order).
    pub fn get(&self, key: &[u8]) -> Option<Vec<u8>> {
        let mut state = self.state();
        let state = &mut *state;
        let Some(entry) = state.map.get_mut(key) else {
            self.metrics.misses.inc();
            return None;
        };
        state.seq += 1;
        if let Some(k) = state.order.remove(&entry.used) {
            state.order.insert(state.seq, k);
        }
        entry.used = state.seq;
        self.metrics.hits.inc();
        Some(entry.value.clone())
    }

    /// Take this just before reading (or writing) a key in the store.
    pub fn ticket(&self) -> Ticket {
        Ticket {
            era: self.state().era,
        }
    }

    /// Inserts `value` of `key`, written at etcd revision `revision`, as read
    /// (or written) under `ticket`; refused by the insert rule (a reset since
    /// the ticket, or a delivered change of the key's bucket above
    /// `revision`), and never over an entry of a later revision.
    pub fn insert(&self, key: &[u8], value: &[u8], revision: i64, ticket: Ticket) {
        let size = cost(key, value);
        if size > self.max_bytes / 8 {
            return;
        }
        let mut state = self.state();
        if state.era != ticket.era || state.delivered[self.bucket_of(key)] > revision {
            self.metrics.refused.inc();
            return;
        }
        if let Some(old) = state.map.get(key) {
            if old.revision >= revision {
                return;
            }
        }
        Self::remove_locked(&mut state, key);
        state.seq += 1;
        let used = state.seq;
        let shared: Key = Arc::from(key);
        state.order.insert(used, Arc::clone(&shared));
        state.map.insert(
            shared,
            Entry {
                value: value.to_vec(),
                revision,
                used,
            },
        );
        state.bytes += size;
        state.inserted += 1;
        while state.map.len() > self.max_entries || state.bytes > self.max_bytes {
            let Some((_, oldest)) = state.order.pop_first() else {
                break;
            };
            if let Some(entry) = state.map.remove(&*oldest) {
                state.bytes -= cost(&oldest, &entry.value);
                self.metrics.evicted.inc();
            }
        }
        self.publish(&state);
    }

    fn remove_locked(state: &mut State, key: &[u8]) -> bool {
        match state.map.remove(key) {
            Some(entry) => {
                state.order.remove(&entry.used);
                state.bytes -= cost(key, &entry.value);
                true
            }
            None => false,
        }
    }

    fn publish(&self, state: &State) {
        self.metrics
            .entries
            .set(i64::try_from(state.map.len()).unwrap_or(i64::MAX));
        self.metrics
            .bytes
            .set(i64::try_from(state.bytes).unwrap_or(i64::MAX));
    }

    /// The watch delivered a change of `key` at `revision`: the entry goes
    /// unless it already holds that revision or a later one, and the key's
    /// bucket remembers the revision either way.
    pub fn changed(&self, key: &[u8], revision: i64) {
        let mut state = self.state();
        let bucket = self.bucket_of(key);
        state.delivered[bucket] = state.delivered[bucket].max(revision);
        let stale = state.map.get(key).is_some_and(|e| e.revision < revision);
        if stale && Self::remove_locked(&mut state, key) {
            self.metrics.invalidated.inc();
        }
        self.publish(&state);
    }

    /// Forgets everything (a new watch session); tickets taken before are
    /// refused.
    pub fn reset(&self) {
        let mut state = self.state();
        state.map.clear();
        state.order.clear();
        state.bytes = 0;
        state.era += 1;
        state.resets += 1;
        self.publish(&state);
    }

    /// The metrics, to register with `/metrics`.
    pub fn metrics(&self) -> ReadCacheMetrics {
        self.metrics.clone()
    }

    pub fn figures(&self) -> ReadCacheFigures {
        let state = self.state();
        ReadCacheFigures {
            entries: state.map.len() as u64,
            bytes: state.bytes as u64,
            max_entries: self.max_entries as u64,
            max_bytes: self.max_bytes as u64,
            hits: self.metrics.hits.get(),
            misses: self.metrics.misses.get(),
            inserted: state.inserted,
            refused: self.metrics.refused.get(),
            evicted: self.metrics.evicted.get(),
            invalidated: self.metrics.invalidated.get(),
            resets: state.resets,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cache() -> ReadCache {
        let c = ReadCache::new(64 * 1024, 4);
        c.add_prefix("secrets/");
        c
    }

    fn fill(c: &ReadCache, key: &[u8], value: &[u8], revision: i64) {
        let t = c.ticket();
        c.insert(key, value, revision, t);
    }

    /// Buckets are drawn anew for each cache (see `bucket_keys`).
    #[test]
    fn buckets_are_keyed_per_cache() {
        let (one, two) = (cache(), cache());
        let keys: Vec<Vec<u8>> = (0..64)
            .map(|i| format!("secrets/meta/k{i}").into_bytes())
            .collect();
        let buckets = |c: &ReadCache| keys.iter().map(|k| c.bucket_of(k)).collect::<Vec<_>>();
        assert_eq!(buckets(&one), buckets(&one));
        assert_ne!(buckets(&one), buckets(&two));
    }

    #[test]
    fn only_covered_keys_and_hits_after_an_insert() {
        let c = cache();
        assert!(c.covers(b"secrets/data/a#1"));
        assert!(!c.covers(b"tokens/x"));
        assert_eq!(c.get(b"secrets/meta/a"), None);
        fill(&c, b"secrets/meta/a", b"v1", 5);
        assert_eq!(c.get(b"secrets/meta/a"), Some(b"v1".to_vec()));
        let f = c.figures();
        assert_eq!((f.hits, f.misses, f.entries), (1, 1, 1));
        assert!(!ReadCache::new(0, 10).covers(b"secrets/x"));
    }

    #[test]
    fn a_value_read_before_a_change_is_not_inserted_after_it() {
        let c = cache();
        let t = c.ticket();
        // The read is in flight; the watch delivers a change of the key.
        c.changed(b"secrets/meta/a", 9);
        c.insert(b"secrets/meta/a", b"old", 8, t);
        assert_eq!(c.get(b"secrets/meta/a"), None);
        assert_eq!(c.figures().refused, 1);
        // The value of that change (or a later one) goes in: this node's
        // own write whose event came before its answer, say.
        c.insert(b"secrets/meta/a", b"new", 9, t);
        assert_eq!(c.get(b"secrets/meta/a"), Some(b"new".to_vec()));
        // A reset refuses what was read before it.
        let t = c.ticket();
        c.reset();
        c.insert(b"secrets/meta/b", b"old", 10, t);
        assert_eq!(c.get(b"secrets/meta/b"), None);
    }

    #[test]
    fn a_change_removes_older_entries_only() {
        let c = cache();
        fill(&c, b"secrets/meta/a", b"v7", 7);
        c.changed(b"secrets/meta/a", 7);
        assert_eq!(c.get(b"secrets/meta/a"), Some(b"v7".to_vec()));
        c.changed(b"secrets/meta/a", 8);
        assert_eq!(c.get(b"secrets/meta/a"), None);
        assert_eq!(c.figures().invalidated, 1);
        // An older value never replaces a newer entry.
        fill(&c, b"secrets/meta/a", b"v9", 9);
        fill(&c, b"secrets/meta/a", b"v8", 8);
        assert_eq!(c.get(b"secrets/meta/a"), Some(b"v9".to_vec()));
    }

    #[test]
    fn the_bounds_hold_and_the_least_recently_used_go_first() {
        let c = cache();
        for i in 0..4u8 {
            fill(
                &c,
                &[b's', b'e', b'c', b'r', b'e', b't', b's', b'/', i],
                b"v",
                1,
            );
        }
        // Touch the first: the second is now the oldest.
        assert!(c.get(b"secrets/\x00").is_some());
        fill(&c, b"secrets/\x09", b"v", 1);
        assert_eq!(c.figures().entries, 4);
        assert!(c.get(b"secrets/\x01").is_none());
        assert!(c.get(b"secrets/\x00").is_some());
        // Bytes: 64 KiB; a value over an eighth of it is not cached, and
        // many mid-size values stay within the bound.
        let big = vec![0u8; 9 * 1024];
        fill(&c, b"secrets/big", &big, 1);
        assert!(c.get(b"secrets/big").is_none());
        let c = ReadCache::new(64 * 1024, 1000);
        c.add_prefix("secrets/");
        let mid = vec![0u8; 7 * 1024];
        for i in 0..40u32 {
            fill(&c, format!("secrets/{i}").as_bytes(), &mid, 1);
            assert!(c.figures().bytes <= 64 * 1024);
        }
        assert!(c.figures().evicted > 0);
    }
}
