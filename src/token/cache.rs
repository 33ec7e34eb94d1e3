//! The verified-token cache: tokens already checked against their stored
//! record, so the next use of the same token skips the read, the decryption,
//! the decoding and the second HMAC.
//!
//! Owns no storage prefix and reads none: `store` fills it after a full
//! check and empties it whenever a token record is removed or changed.
//!
//! # What it holds and why that is safe
//!
//! - The key is the token's HMAC under the token hash key (the same value
//!   the record stores and every use checks), never the token text; finding
//!   an entry is therefore the same proof as the constant-time comparison
//!   with the stored HMAC. The hash key exists only while unsealed, and the
//!   cache is emptied at seal and at unseal.
//! - Only tokens without a use limit are cached: a counted use always goes
//!   to storage, under the store's write lock.
//! - Expiry and the CIDR binding are checked on every hit, against the
//!   clock of the call, as on the full path. An entry past its expiry is a
//!   miss: the full path then revokes the token, as before.
//! - Revocation takes effect on the very next request: every path that
//!   removes or rewrites a token record (revoke, and on a shared store its
//!   `revoking` mark, written before anything is removed; the revocation of
//!   an identity's tokens on disable, delete, expiry or narrowing; the last
//!   use of a limited token; renew; the sweeper) holds an
//!   [`InvalidateOnDrop`] naming those tokens across its storage writes, so
//!   however the writes end, their entries are gone before it returns, and a
//!   generation is bumped. A use that read the record before a revoke and
//!   tries to cache it after is refused by the generation it noted before its
//!   read, so a revoked token never comes back. Seal and unseal empty the
//!   whole cache.
//! - The token's audit HMAC (`audit::TokenMac`) is kept with its entry so
//!   a record does not compute it again; it goes with the entry, and one
//!   made under an older audit key is never used (the audit log checks the
//!   key's generation).
//! - Policies are not cached here: a token names its policies and the caller
//!   compiles them from the policy store on every use, so a policy change is
//!   seen at once too.
//!
//! On sled one process owns the store (sled locks its folder), so no other
//! writer can revoke behind this cache's back. On etcd other nodes can: the
//! store's watch removes the entry of every `tokens/accessor/` record any
//! node changes (the same `InvalidateOnDrop`, so the generation rule holds;
//! a revocation's `revoking` mark is such a change, seen as fast as a delete),
//! and a request reads the cache only after its cache fence has seen the
//! watch deliver every change acknowledged before the request began
//! (`storage::coherence`).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, PoisonError, RwLock};

use crate::audit::TokenMac;
use crate::cidr::Cidr;

use super::store::{TokenError, TokenRecord, TokenUse};

/// The most tokens held; a full cache is emptied and fills again.
pub const CAPACITY: usize = 16_384;

/// A token's HMAC under the token hash key: the key of an entry.
pub type Tag = [u8; 32];

/// The HMAC of `token` under the hash key, as the cache keys it.
pub fn tag(hash_key: &ring::hmac::Key, token: &str) -> Tag {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::hmac::sign(hash_key, token.as_bytes()).as_ref());
    out
}

struct Entry {
    /// Shared with every hit: a use copies only what its caller keeps.
    record: Arc<TokenRecord>,
    cidrs: Vec<Cidr>,
    /// The token's audit HMAC, once a record has computed it; bound to the
    /// audit key's generation (see `audit::TokenMac`), gone with the entry.
    audit_mac: Arc<TokenMac>,
}

#[derive(Default)]
struct Table {
    /// Bumped by every invalidation.
    generation: u64,
    entries: HashMap<Tag, Entry>,
    /// The tag of each cached accessor, so a revoke removes its entries only.
    tags: HashMap<String, Tag>,
}

/// Verified, unlimited tokens by their HMAC. See the module doc.
#[derive(Default)]
pub struct VerifiedTokens {
    table: RwLock<Table>,
}

/// Forgets some tokens when dropped: held across a write that removes or
/// rewrites their records, so they are forgotten however the write ends.
#[must_use = "the tokens are forgotten when this is dropped"]
pub struct InvalidateOnDrop<'a> {
    cache: &'a VerifiedTokens,
    accessors: Vec<&'a str>,
}

impl Drop for InvalidateOnDrop<'_> {
    fn drop(&mut self) {
        let mut table = self.cache.write();
        table.generation = table.generation.wrapping_add(1);
        for accessor in &self.accessors {
            if let Some(tag) = table.tags.remove(*accessor) {
                table.entries.remove(&tag);
            }
        }
    }
}

impl VerifiedTokens {
    pub fn new() -> Self {
        Self::default()
    }

    /// The generation to hand to [`Self::insert`]: read it before reading
    /// the record that will be inserted.
    pub fn generation(&self) -> u64 {
        self.read().generation
    }

    /// The answer `TokenStore::use_token` gives for the token with this tag,
    /// if it is cached and not expired at `now_ms` (a cached token has no use
    /// limit, so no use is counted); `None` sends the caller to storage.
    pub fn get(
        &self,
        tag: &Tag,
        source: Option<IpAddr>,
        now_ms: u64,
    ) -> Option<Result<TokenUse, TokenError>> {
        let table = self.read();
        let entry = table.entries.get(tag)?;
        let expires = entry.record.expires_at_ms;
        if expires != 0 && now_ms >= expires {
            return None;
        }
        if !Cidr::any_contains(&entry.cidrs, source) {
            return Some(Err(TokenError::SourceNotAllowed));
        }
        Some(Ok(TokenUse {
            record: entry.record.clone(),
            counted: false,
            last_use: false,
            audit_mac: Some(entry.audit_mac.clone()),
        }))
    }

    /// Caches a token just verified against storage, unless a record was
    /// removed or changed since `generation` was read, or it has a use limit.
    pub fn insert(&self, tag: Tag, record: &TokenRecord, cidrs: Vec<Cidr>, generation: u64) {
        // A spent token, or one a revocation marked (the caller refused it
        // already), is never cached.
        if record.uses_total != 0 || record.uses_remaining != 0 || record.spent || record.revoking {
            return;
        }
        let mut table = self.write();
        if table.generation != generation {
            return;
        }
        if table.entries.len() >= CAPACITY {
            table.entries.clear();
            table.tags.clear();
        }
        let mut record = record.clone();
        // Not needed on a hit; the key already is this HMAC.
        record.hash = String::new();
        table.tags.insert(record.accessor.clone(), tag);
        table.entries.insert(
            tag,
            Entry {
                record: Arc::new(record),
                cidrs,
                audit_mac: Arc::new(TokenMac::new()),
            },
        );
    }

    /// Forgets every token (at seal and unseal).
    pub fn invalidate(&self) {
        let mut table = self.write();
        table.generation = table.generation.wrapping_add(1);
        table.entries.clear();
        table.tags.clear();
    }

    /// Forgets the tokens named by `accessors` when the returned guard is
    /// dropped: take it before writing their records.
    pub fn invalidate_on_drop<'a>(
        &'a self,
        accessors: impl IntoIterator<Item = &'a str>,
    ) -> InvalidateOnDrop<'a> {
        InvalidateOnDrop {
            cache: self,
            accessors: accessors.into_iter().collect(),
        }
    }

    /// How many tokens are cached (tests).
    pub fn len(&self) -> usize {
        self.read().entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Table> {
        // Nothing panics under this lock; the table is whole whatever happened.
        self.table.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Table> {
        self.table.write().unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn record(expires_at_ms: u64, uses: u32) -> TokenRecord {
        TokenRecord {
            accessor: "kwa_a".into(),
            identity: "svc".into(),
            policies: vec!["app".into()],
            expires_at_ms,
            uses_remaining: uses,
            uses_total: uses,
            hash: "ab".repeat(32),
            ..TokenRecord::default()
        }
    }

    fn valid(hit: Option<Result<TokenUse, TokenError>>) -> Option<TokenRecord> {
        match hit? {
            Ok(used) => {
                assert!(!used.counted);
                Some(TokenRecord::clone(&used.record))
            }
            Err(e) => panic!("refused: {e}"),
        }
    }

    #[test]
    fn a_hit_until_expiry_and_without_the_stored_hmac() {
        let cache = VerifiedTokens::new();
        let g = cache.generation();
        cache.insert([1; 32], &record(1_000, 0), Vec::new(), g);
        let hit = valid(cache.get(&[1; 32], None, 999)).unwrap();
        assert_eq!(hit.accessor, "kwa_a");
        assert!(hit.hash.is_empty());
        assert!(cache.get(&[1; 32], None, 1_000).is_none());
        assert!(cache.get(&[2; 32], None, 0).is_none());
    }

    #[test]
    fn limited_tokens_are_never_cached() {
        let cache = VerifiedTokens::new();
        cache.insert([1; 32], &record(0, 3), Vec::new(), cache.generation());
        assert!(cache.is_empty());
    }

    #[test]
    fn invalidate_empties_and_refuses_reads_from_before() {
        let cache = VerifiedTokens::new();
        let g = cache.generation();
        cache.insert([1; 32], &record(0, 0), Vec::new(), g);
        assert!(valid(cache.get(&[1; 32], None, 5)).is_some());
        // A use read generation `g`, then a revoke ran, then it inserts.
        cache.invalidate();
        assert!(cache.get(&[1; 32], None, 5).is_none());
        cache.insert([1; 32], &record(0, 0), Vec::new(), g);
        assert!(cache.get(&[1; 32], None, 5).is_none());
        // A use that began after the revoke caches as usual.
        cache.insert([1; 32], &record(0, 0), Vec::new(), cache.generation());
        assert!(cache.get(&[1; 32], None, 5).is_some());
    }

    #[test]
    fn a_revoke_forgets_its_tokens_and_refuses_reads_from_before() {
        let cache = VerifiedTokens::new();
        let g = cache.generation();
        let mut other = record(0, 0);
        other.accessor = "kwa_b".into();
        cache.insert([1; 32], &record(0, 0), Vec::new(), g);
        cache.insert([2; 32], &other, Vec::new(), g);
        drop(cache.invalidate_on_drop(["kwa_a"]));
        assert!(cache.get(&[1; 32], None, 5).is_none());
        assert!(valid(cache.get(&[2; 32], None, 5)).is_some());
        // A use that read its record before the revoke does not bring it back.
        cache.insert([1; 32], &record(0, 0), Vec::new(), g);
        assert!(cache.get(&[1; 32], None, 5).is_none());
    }

    #[test]
    fn the_cidr_binding_is_checked_on_every_hit() {
        let cache = VerifiedTokens::new();
        let blocks = vec!["10.0.0.0/8".parse::<Cidr>().unwrap()];
        cache.insert([1; 32], &record(0, 0), blocks, cache.generation());
        let inside: IpAddr = "10.1.2.3".parse().unwrap();
        let outside: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(valid(cache.get(&[1; 32], Some(inside), 5)).is_some());
        assert!(matches!(
            cache.get(&[1; 32], Some(outside), 5),
            Some(Err(TokenError::SourceNotAllowed))
        ));
        assert!(matches!(
            cache.get(&[1; 32], None, 5),
            Some(Err(TokenError::SourceNotAllowed))
        ));
    }

    /// Through the store: a token used (and so cached) stops working on the
    /// very next use after each way of revoking it.
    mod through_the_store {
        use std::sync::Arc;
        use std::time::Duration;

        use crate::barrier::{Barrier, BarrierOptions};
        use crate::storage::SledBackend;
        use crate::token::{PolicyNames, TokenError, TokenRequest, TokenStore};

        struct Names;

        impl PolicyNames for Names {
            fn policy_exists(&self, _: &str) -> Result<bool, TokenError> {
                Ok(true)
            }
        }

        const T0: u64 = 1_000_000;

        fn store() -> (tempfile::TempDir, TokenStore) {
            let dir = tempfile::tempdir().unwrap();
            let backend = SledBackend::open(dir.path()).unwrap();
            let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
            let shares = barrier.init(1, 1).unwrap();
            barrier.unseal(&shares[0].0).unwrap();
            let store = TokenStore::new(
                Arc::new(barrier),
                Arc::new(Names),
                crate::clock::Clock::system(),
            );
            store.on_unseal(T0).unwrap();
            (dir, store)
        }

        fn req(identity: &str, parent: Option<&str>) -> TokenRequest {
            TokenRequest {
                identity: identity.into(),
                policies: vec!["app".into()],
                ttl: Duration::from_secs(60),
                max_ttl: Duration::from_secs(600),
                hard_expiry_ms: None,
                uses: 0,
                cidrs: vec![],
                parent_accessor: parent.map(str::to_owned),
                method: "token",
            }
        }

        fn usable(store: &TokenStore, token: &str, now: u64) -> bool {
            match store.use_token(token, None, now) {
                Ok(used) => !used.counted,
                Err(TokenError::Invalid) => false,
                Err(e) => panic!("{e}"),
            }
        }

        #[test]
        fn revoke_revoke_identity_and_expiry_are_seen_at_once() {
            let (_d, s) = store();
            let parent = s.issue(req("svc", None), T0).unwrap();
            let child = s.issue(req("svc", Some(&parent.accessor)), T0).unwrap();
            let other = s.issue(req("other", None), T0).unwrap();
            for t in [&parent, &child, &other] {
                assert!(usable(&s, t.token.expose(), T0));
                assert!(usable(&s, t.token.expose(), T0 + 1));
            }
            // Revoking the parent revokes the cached child too.
            assert_eq!(s.revoke(&parent.accessor).unwrap(), 2);
            assert!(!usable(&s, child.token.expose(), T0 + 2));
            assert!(!usable(&s, parent.token.expose(), T0 + 2));
            assert!(usable(&s, other.token.expose(), T0 + 2));
            // Disabling an identity revokes its tokens.
            assert_eq!(s.revoke_identity("other", T0).unwrap(), 1);
            assert!(!usable(&s, other.token.expose(), T0 + 3));
            // Expiry: cached or not, a token past its expiry is refused.
            let short = s.issue(req("svc", None), T0).unwrap();
            assert!(usable(&s, short.token.expose(), T0));
            assert!(!usable(&s, short.token.expose(), T0 + 60_000));
        }

        #[test]
        fn renew_and_seal_are_seen_at_once() {
            let (_d, s) = store();
            let t = s.issue(req("svc", None), T0).unwrap();
            let used = s.use_token(t.token.expose(), None, T0).unwrap();
            assert_eq!(used.record.expires_at_ms, T0 + 60_000);
            s.renew(&t.accessor, Some(Duration::from_secs(300)), T0 + 1)
                .unwrap();
            let used = s.use_token(t.token.expose(), None, T0 + 2).unwrap();
            assert_eq!(used.record.expires_at_ms, T0 + 1 + 300_000);
            s.on_seal();
            assert!(matches!(
                s.use_token(t.token.expose(), None, T0 + 3),
                Err(TokenError::Barrier(_))
            ));
        }
    }

    #[test]
    fn a_full_cache_starts_over() {
        let cache = VerifiedTokens::new();
        let g = cache.generation();
        for i in 0..CAPACITY {
            let mut tag = [0u8; 32];
            tag[..8].copy_from_slice(&(i as u64).to_be_bytes());
            cache.insert(tag, &record(0, 0), Vec::new(), g);
        }
        assert_eq!(cache.len(), CAPACITY);
        cache.insert([9; 32], &record(0, 0), Vec::new(), g);
        assert_eq!(cache.len(), 1);
    }
}
