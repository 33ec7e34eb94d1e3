//! `[storage.etcd]`: how to reach an etcd cluster. Always compiled (the
//! configuration names it); the backend itself needs the `etcd` feature.

use std::path::PathBuf;

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
    /// Bounds of the read cache of secrets (`storage.etcd.read_cache_bytes`,
    /// `read_cache_entries`; 0 turns it off): see `storage::read_cache`.
    pub read_cache_bytes: usize,
    pub read_cache_entries: usize,
}

impl EtcdOptions {
    /// Plaintext endpoints under `prefix` (loopback tests).
    pub fn plaintext(endpoints: Vec<String>, prefix: impl Into<String>) -> Self {
        Self {
            endpoints,
            prefix: prefix.into(),
            ca: None,
            cert: None,
            key: None,
            read_cache_bytes: super::read_cache::DEFAULT_MAX_BYTES,
            read_cache_entries: super::read_cache::DEFAULT_MAX_ENTRIES,
        }
    }
}
