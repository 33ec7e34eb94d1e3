//! `[storage.etcd]`: how to reach an etcd cluster. Always compiled (the
//! configuration names it); the backend itself needs the `etcd` feature.

use std::path::PathBuf;
use std::time::Duration;

/// How often the leader compacts etcd's history by default
/// (`storage.etcd.compact_every`).
pub const DEFAULT_COMPACT_EVERY: Duration = Duration::from_secs(5 * 60);
/// How much history a compaction keeps by default
/// (`storage.etcd.compact_retain`).
pub const DEFAULT_COMPACT_RETAIN: Duration = Duration::from_secs(3600);
/// The least time between two of a node's cache-fence reads by default
/// (`storage.etcd.fence_interval_us`): see `storage::coherence`.
pub const DEFAULT_FENCE_INTERVAL: Duration = Duration::from_millis(2);
/// The most `storage.etcd.fence_interval_us` may be: well under the
/// fence's own bound (`coherence::FENCE_WAIT`, 2 s).
pub const MAX_FENCE_INTERVAL: Duration = Duration::from_millis(100);

/// How to reach the cluster (`[storage.etcd]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    /// `http://host:port` or `https://host:port`, one per member.
    pub endpoints: Vec<String>,
    /// Every key of this vault starts with it.
    pub prefix: String,
    /// The CA that signed the members' certificates (turns TLS on).
    pub ca: Option<PathBuf>,
    /// Client certificate and key for mTLS (both or neither).
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// How often the elected leader compacts etcd's history
    /// (`storage.etcd.compact_every`); `None` (`0` or `off`) leaves it to
    /// etcd's own `--auto-compaction-*`.
    pub compact_every: Option<Duration>,
    /// The history a compaction keeps: it compacts at the revision the
    /// leader saw this long ago (`storage.etcd.compact_retain`; `0` keeps
    /// none, compacting at the current revision).
    pub compact_retain: Duration,
    /// Bounds of the read cache of secrets (`storage.etcd.read_cache_bytes`,
    /// `read_cache_entries`; 0 turns it off): see `storage::read_cache`.
    pub read_cache_bytes: usize,
    pub read_cache_entries: usize,
    /// The least time between two cache-fence reads of this node
    /// (`storage.etcd.fence_interval_us`; 0: a new read as soon as the
    /// last one is answered): see `storage::coherence`.
    pub fence_interval: Duration,
    /// Whether this node takes a read lease (`storage.etcd.read_lease`,
    /// on by default): while it holds one, its requests use the caches
    /// with no fence read, and writers on every node wait for its
    /// acknowledgement (see `storage::members`).
    pub read_lease: bool,
}

impl EtcdOptions {
    /// Plaintext endpoints under `prefix` (loopback tests), compaction at
    /// its defaults.
    pub fn plaintext(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        Self {
            endpoints,
            prefix: prefix.into(),
            ca: None,
            cert: None,
            key: None,
            compact_every: Some(DEFAULT_COMPACT_EVERY),
            compact_retain: DEFAULT_COMPACT_RETAIN,
            read_cache_bytes: super::read_cache::DEFAULT_MAX_BYTES,
            read_cache_entries: super::read_cache::DEFAULT_MAX_ENTRIES,
            fence_interval: DEFAULT_FENCE_INTERVAL,
            read_lease: true,
        }
    }
}
