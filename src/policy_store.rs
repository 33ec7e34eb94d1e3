//! Policy storage: named policies as TOML, plus the compiled form the request
//! path checks.
//!
//! Storage prefix `policies/` (through the barrier only; this module must not
//! touch any other prefix): `policies/<name>` -> the policy's TOML text. The
//! built-in `root` policy is not stored and can be neither changed nor deleted.
//!
//! Compiled policies and compiled sets (one per distinct list of policy names,
//! as tokens carry them) are cached; a put or delete clears the cache, so the
//! next request compiles again. A name in a list that no longer exists grants
//! nothing. A compile that raced a put or delete is not cached: the cache
//! carries a generation that every clear bumps, and a result is inserted only
//! if the generation read before its storage read is still current.
//!
//! On a shared store (etcd) the cache is kept right by the store's watch: a
//! change of any `policies/` key by any node clears it, and a request uses it
//! only after its cache fence (`storage::coherence`); the `*_fenced` calls
//! take the fence a request took at its start.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::barrier::{Barrier, BarrierError};
use crate::policy::{
    Authorized, Capability, CompiledPolicy, Decision, Policy, PolicyError, PolicySet, ROOT_POLICY,
};
use crate::token::{PolicyNames, TokenError};

const PREFIX: &str = "policies/";
/// Distinct policy lists kept compiled; past this the cache starts again.
const MAX_CACHED_SETS: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum PolicyStoreError {
    #[error("the built-in root policy cannot be changed or deleted")]
    RootImmutable,
    #[error("policy not found")]
    NotFound,
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error("stored policy '{0}' is corrupt")]
    Corrupt(String),
    /// The proof handed to a write is for another policy or capability (a
    /// bug in the caller: it checked one thing and wrote another).
    #[error("the write's authorization is for another policy or capability")]
    WrongProof,
    #[error(transparent)]
    Barrier(#[from] BarrierError),
}

/// The granting policy's name and rule path, shared with the compiled set.
pub type GrantNames<'a> = (&'a Arc<str>, &'a Arc<str>);

/// The policies of one token, compiled, with what usage recording needs to
/// name the rule that granted.
#[derive(Debug)]
pub struct CompiledSet {
    set: PolicySet,
    /// Policy names, in the order of the set.
    names: Vec<Arc<str>>,
    /// Rule paths per policy, in file order.
    rule_paths: Vec<Vec<Arc<str>>>,
    /// A delegated token's set: the actor's policies, which must allow too
    /// (and both sides skip rules written with `delegated = false`).
    actor: Option<Arc<CompiledSet>>,
}

impl CompiledSet {
    pub fn set(&self) -> &PolicySet {
        &self.set
    }

    /// Checks without allocating; on a grant, the names of the granting
    /// policy and rule path (shared, not copied).
    pub fn check(&self, resource: &str, capability: Capability) -> Option<GrantNames<'_>> {
        if !self.actor_allows(resource, capability) {
            return None;
        }
        match self
            .set
            .check_as(resource, capability, self.actor.is_some())
        {
            Decision::Allowed { policy, rule } => self.grant(policy, rule),
            Decision::Denied => None,
        }
    }

    /// Whether this is a delegated token's set (subject and actor sides).
    pub fn is_delegated(&self) -> bool {
        self.actor.is_some()
    }

    /// For a delegated token: the actor's side allows it too. True for any
    /// other token.
    fn actor_allows(&self, resource: &str, capability: Capability) -> bool {
        self.actor
            .as_ref()
            .is_none_or(|actor| actor.set.check_as(resource, capability, true).is_allowed())
    }

    /// [`CompiledSet::check`], minting the proof a domain write requires.
    pub fn authorize(
        &self,
        resource: &str,
        capability: Capability,
    ) -> Option<(Authorized, GrantNames<'_>)> {
        if !self.actor_allows(resource, capability) {
            return None;
        }
        let proof = self
            .set
            .authorize_as(resource, capability, self.actor.is_some())?;
        let (policy, rule) = proof.rule()?;
        let grant = self.grant(policy, rule)?;
        Some((proof, grant))
    }

    fn grant(&self, policy: u16, rule: u16) -> Option<GrantNames<'_>> {
        let p = usize::from(policy);
        let name = self.names.get(p)?;
        let path = self.rule_paths.get(p)?.get(usize::from(rule))?;
        Some((name, path))
    }
}

/// A stored policy and its compiled form.
type Entry = Arc<(Policy, Arc<CompiledPolicy>)>;

#[derive(Default)]
struct Cache {
    /// `None`: known not to exist.
    policies: HashMap<String, Option<Entry>>,
    sets: HashMap<Vec<String>, Arc<CompiledSet>>,
    /// Bumped by every `clear_cache`. A compile reads it (under the lock,
    /// with its cache miss) before it reads storage, and inserts its result
    /// only if it is unchanged, checked under the write lock: a put or
    /// delete that cleared the cache in between must not have the stale
    /// policy put back.
    generation: u64,
}

/// A cheap handle: clones share one store and one cache.
#[derive(Clone)]
pub struct PolicyStore {
    inner: Arc<Inner>,
}

struct Inner {
    barrier: Arc<Barrier>,
    cache: RwLock<Cache>,
}

impl Inner {
    fn clear_cache(&self) {
        let mut cache = self.cache.write().unwrap_or_else(|e| e.into_inner());
        cache.policies.clear();
        cache.sets.clear();
        cache.generation = cache.generation.wrapping_add(1);
    }

    /// Whether results may be cached: always on a store this process owns;
    /// on a shared store only where its watch clears the cache.
    fn may_cache(&self) -> bool {
        !self.barrier.is_shared_store() || self.barrier.coherence().is_some()
    }
}

/// A policy with its compiled form, as the cache keeps it.
fn compiled_entry(policy: Policy) -> Entry {
    let compiled = Arc::new(CompiledPolicy::compile(&policy));
    Arc::new((policy, compiled))
}

impl PolicyStore {
    pub fn new(barrier: Arc<Barrier>) -> Self {
        let inner = Arc::new(Inner {
            barrier,
            cache: RwLock::new(Cache::default()),
        });
        if let Some(coherence) = inner.barrier.coherence() {
            // On a shared store: a policy changed by any node (seen by the
            // store's watch) clears the cache, and so does a new watch. Weak:
            // the store (through the barrier) holds these callbacks.
            let changed = Arc::downgrade(&inner);
            let reset = Arc::downgrade(&inner);
            coherence.track(
                PREFIX,
                Arc::new(move |_key: &str| {
                    if let Some(inner) = changed.upgrade() {
                        inner.clear_cache();
                    }
                }),
                Arc::new(move || {
                    if let Some(inner) = reset.upgrade() {
                        inner.clear_cache();
                    }
                }),
            );
        }
        Self { inner }
    }

    fn clear_cache(&self) {
        self.inner.clear_cache();
    }

    /// Whether the cache may serve a request starting now: the request's
    /// fence (`Barrier::cache_fence`).
    fn fence(&self) -> bool {
        self.inner.barrier.cache_fence()
    }

    /// Caches a compiled policy read at `generation`; refused (false) if the
    /// cache was cleared since.
    fn insert_policy_if_current(&self, generation: u64, name: &str, entry: Option<Entry>) -> bool {
        if !self.inner.may_cache() {
            return false;
        }
        let mut cache = self.inner.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.generation != generation {
            return false;
        }
        cache.policies.insert(name.to_owned(), entry);
        true
    }

    /// Caches a compiled set begun at `generation`; refused (false) if the
    /// cache was cleared since.
    fn insert_set_if_current(
        &self,
        generation: u64,
        names: &[String],
        set: Arc<CompiledSet>,
    ) -> bool {
        if !self.inner.may_cache() {
            return false;
        }
        let mut cache = self.inner.cache.write().unwrap_or_else(|e| e.into_inner());
        if cache.generation != generation {
            return false;
        }
        if cache.sets.len() >= MAX_CACHED_SETS {
            cache.sets.clear();
        }
        cache.sets.insert(names.to_vec(), set);
        true
    }

    /// Stores (or replaces) a policy. `Policy::parse` has validated it;
    /// `proof` is `write` on `policy/<name>`.
    pub fn put(&self, proof: &Authorized, policy: &Policy) -> Result<(), PolicyStoreError> {
        if policy.is_root() {
            return Err(PolicyStoreError::RootImmutable);
        }
        require(proof, Capability::Write, policy.name())?;
        self.inner.barrier.put(
            &format!("{PREFIX}{}", policy.name()),
            policy.to_toml().as_bytes(),
        )?;
        self.clear_cache();
        Ok(())
    }

    pub fn get(&self, name: &str) -> Result<Option<Policy>, PolicyStoreError> {
        if name == ROOT_POLICY {
            return Ok(Some(Policy::root()));
        }
        if crate::policy::validate_name(name).is_err() {
            return Ok(None);
        }
        match self.inner.barrier.get(&format!("{PREFIX}{name}"))? {
            Some(raw) => {
                let text = std::str::from_utf8(&raw)
                    .map_err(|_| PolicyStoreError::Corrupt(name.to_owned()))?;
                Policy::parse(name, text)
                    .map(Some)
                    .map_err(|_| PolicyStoreError::Corrupt(name.to_owned()))
            }
            None => Ok(None),
        }
    }

    /// Whether a policy of this name is stored (every token issue and
    /// login asks, for each policy the token will carry). On a store this
    /// process owns it is answered from the cache of compiled policies
    /// where that holds the name; otherwise read, and a policy that is
    /// there and parses is cached as a token's list would have it. This
    /// check caches no name that is not there, so names a caller makes up
    /// cannot fill the cache (a token's list may still hold a policy
    /// deleted since: its compile caches that absence). A stored policy
    /// that does not parse exists (it can be deleted or replaced) and is not
    /// cached. On a shared store it is one read: the cache would cost a
    /// fence per call there.
    pub fn exists(&self, name: &str) -> Result<bool, PolicyStoreError> {
        if name == ROOT_POLICY {
            return Ok(true);
        }
        if crate::policy::validate_name(name).is_err() {
            return Ok(false);
        }
        if self.inner.barrier.is_shared_store() {
            return Ok(self
                .inner
                .barrier
                .get(&format!("{PREFIX}{name}"))?
                .is_some());
        }
        let generation = {
            let cache = self.inner.cache.read().unwrap_or_else(|e| e.into_inner());
            if let Some(hit) = cache.policies.get(name) {
                return Ok(hit.is_some());
            }
            cache.generation
        };
        match self.get(name) {
            Ok(Some(policy)) => {
                self.insert_policy_if_current(generation, name, Some(compiled_entry(policy)));
                Ok(true)
            }
            Ok(None) => Ok(false),
            Err(PolicyStoreError::Corrupt(_)) => Ok(true),
            Err(e) => Err(e),
        }
    }

    /// Every policy name, `root` first, then in name order.
    pub fn list(&self) -> Result<Vec<String>, PolicyStoreError> {
        let mut names = vec![ROOT_POLICY.to_owned()];
        for key in self.inner.barrier.scan_keys(PREFIX)? {
            if let Some(name) = key.strip_prefix(PREFIX) {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    /// Deletes a policy; `NotFound` if there was none. `proof` is `delete`
    /// on `policy/<name>`.
    pub fn delete(&self, proof: &Authorized, name: &str) -> Result<(), PolicyStoreError> {
        if name == ROOT_POLICY {
            return Err(PolicyStoreError::RootImmutable);
        }
        require(proof, Capability::Delete, name)?;
        if !self.exists(name)? {
            return Err(PolicyStoreError::NotFound);
        }
        self.inner.barrier.delete(&format!("{PREFIX}{name}"))?;
        self.clear_cache();
        Ok(())
    }

    fn compiled(&self, name: &str, fresh: bool) -> Result<Option<Entry>, PolicyStoreError> {
        let generation = {
            let cache = self.inner.cache.read().unwrap_or_else(|e| e.into_inner());
            if let Some(hit) = cache.policies.get(name).filter(|_| fresh) {
                return Ok(hit.clone());
            }
            cache.generation
        };
        let entry = self.get(name)?.map(compiled_entry);
        // A refused insert still answers this request with what storage held
        // when it was read; only the cache must not keep it.
        self.insert_policy_if_current(generation, name, entry.clone());
        Ok(entry)
    }

    /// The compiled set for a token's policy list; cached, so after the first
    /// request with a given list this is one hash lookup and no allocation.
    pub fn compiled_set(&self, names: &[String]) -> Result<Arc<CompiledSet>, PolicyStoreError> {
        self.compiled_set_fenced(names, self.fence())
    }

    /// [`Self::compiled_set`] for a request whose cache fence was taken at
    /// its start (`Barrier::cache_fence`): `fresh` false compiles from
    /// storage.
    pub fn compiled_set_fenced(
        &self,
        names: &[String],
        fresh: bool,
    ) -> Result<Arc<CompiledSet>, PolicyStoreError> {
        let generation = {
            let cache = self.inner.cache.read().unwrap_or_else(|e| e.into_inner());
            if let Some(set) = cache.sets.get(names).filter(|_| fresh) {
                return Ok(set.clone());
            }
            cache.generation
        };
        let mut compiled = Vec::with_capacity(names.len());
        let mut set_names = Vec::with_capacity(names.len());
        let mut rule_paths = Vec::with_capacity(names.len());
        for name in names {
            if let Some(entry) = self.compiled(name, fresh)? {
                let (policy, compiled_policy) = &*entry;
                compiled.push(compiled_policy.clone());
                set_names.push(Arc::<str>::from(name.as_str()));
                rule_paths.push(
                    policy
                        .rules()
                        .iter()
                        .map(|r| Arc::<str>::from(r.path()))
                        .collect(),
                );
            }
        }
        let set = Arc::new(CompiledSet {
            set: PolicySet::new(compiled)?,
            names: set_names,
            rule_paths,
            actor: None,
        });
        self.insert_set_if_current(generation, names, set.clone());
        Ok(set)
    }

    /// The set of a delegated token: `subject` policies (whose grants are
    /// recorded) and `actor` policies, both of which must allow; cached like
    /// any set (under a key no plain list can have: names hold no NUL).
    pub fn delegated_set(
        &self,
        subject: &[String],
        actor: &[String],
    ) -> Result<Arc<CompiledSet>, PolicyStoreError> {
        self.delegated_set_fenced(subject, actor, self.fence())
    }

    /// [`Self::delegated_set`] with the request's cache fence.
    pub fn delegated_set_fenced(
        &self,
        subject: &[String],
        actor: &[String],
        fresh: bool,
    ) -> Result<Arc<CompiledSet>, PolicyStoreError> {
        let mut key = Vec::with_capacity(subject.len() + actor.len() + 1);
        key.extend_from_slice(subject);
        key.push("\0actor".to_owned());
        key.extend_from_slice(actor);
        let generation = {
            let cache = self.inner.cache.read().unwrap_or_else(|e| e.into_inner());
            if let Some(set) = cache.sets.get(&key).filter(|_| fresh) {
                return Ok(set.clone());
            }
            cache.generation
        };
        let subject = self.compiled_set_fenced(subject, fresh)?;
        let actor = self.compiled_set_fenced(actor, fresh)?;
        let set = Arc::new(CompiledSet {
            set: subject.set.clone(),
            names: subject.names.clone(),
            rule_paths: subject.rule_paths.clone(),
            actor: Some(actor),
        });
        self.insert_set_if_current(generation, &key, set.clone());
        Ok(set)
    }
}

/// Refuses a write whose proof is not `capability` on `policy/<name>`.
fn require(proof: &Authorized, capability: Capability, name: &str) -> Result<(), PolicyStoreError> {
    if proof.grants_under(capability, "policy", name) {
        Ok(())
    } else {
        Err(PolicyStoreError::WrongProof)
    }
}

impl PolicyNames for PolicyStore {
    fn policy_exists(&self, name: &str) -> Result<bool, TokenError> {
        self.exists(name).map_err(|e| match e {
            PolicyStoreError::Barrier(b) => TokenError::Barrier(b),
            _ => TokenError::Corrupt,
        })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::barrier::BarrierOptions;
    use crate::policy::Capability;
    use crate::storage::SledBackend;

    pub(crate) fn unsealed_barrier() -> (tempfile::TempDir, Arc<Barrier>) {
        let dir = tempfile::tempdir().unwrap();
        let backend = SledBackend::open(dir.path()).unwrap();
        let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
        let shares = barrier.init(1, 1).unwrap();
        barrier.unseal(&shares[0].0).unwrap();
        (dir, Arc::new(barrier))
    }

    fn policy(name: &str, toml: &str) -> Policy {
        Policy::parse(name, toml).unwrap()
    }

    /// A proof as a root token's check mints it.
    fn proof(capability: Capability, name: &str) -> Authorized {
        PolicySet::compile([&Policy::root()])
            .unwrap()
            .authorize(&format!("policy/{name}"), capability)
            .unwrap()
    }

    fn put(store: &PolicyStore, p: &Policy) -> Result<(), PolicyStoreError> {
        store.put(&proof(Capability::Write, p.name()), p)
    }

    fn delete(store: &PolicyStore, name: &str) -> Result<(), PolicyStoreError> {
        store.delete(&proof(Capability::Delete, name), name)
    }

    #[test]
    fn a_write_needs_the_proof_for_its_policy_and_capability() {
        let (_dir, barrier) = unsealed_barrier();
        let store = PolicyStore::new(barrier);
        let p = policy(
            "app",
            "[[rule]]\npath = \"secret/app/**\"\ncapabilities = [\"read\"]\n",
        );
        for wrong in [
            proof(Capability::Write, "other"),
            proof(Capability::Read, "app"),
            proof(Capability::Write, "app/x"),
        ] {
            assert!(matches!(
                store.put(&wrong, &p),
                Err(PolicyStoreError::WrongProof)
            ));
        }
        assert!(!store.exists("app").unwrap());
        store.put(&proof(Capability::Write, "app"), &p).unwrap();
        assert!(matches!(
            store.delete(&proof(Capability::Write, "app"), "app"),
            Err(PolicyStoreError::WrongProof)
        ));
        assert!(store.exists("app").unwrap());
        store
            .delete(&proof(Capability::Delete, "app"), "app")
            .unwrap();
        assert!(!store.exists("app").unwrap());
    }

    #[test]
    fn put_get_list_delete() {
        let (_dir, barrier) = unsealed_barrier();
        let store = PolicyStore::new(barrier);
        let p = policy(
            "app",
            "[[rule]]\npath = \"secret/app/**\"\ncapabilities = [\"read\"]\n",
        );
        assert!(!store.exists("app").unwrap());
        put(&store, &p).unwrap();
        assert!(store.exists("app").unwrap());
        assert_eq!(store.get("app").unwrap(), Some(p));
        assert_eq!(store.list().unwrap(), vec!["root", "app"]);
        delete(&store, "app").unwrap();
        assert!(store.get("app").unwrap().is_none());
        assert!(matches!(
            delete(&store, "app"),
            Err(PolicyStoreError::NotFound)
        ));
    }

    #[test]
    fn root_is_builtin_and_immutable() {
        let (_dir, barrier) = unsealed_barrier();
        let store = PolicyStore::new(barrier);
        assert!(store.exists("root").unwrap());
        assert_eq!(store.get("root").unwrap(), Some(Policy::root()));
        assert!(matches!(
            put(&store, &Policy::root()),
            Err(PolicyStoreError::RootImmutable)
        ));
        assert!(matches!(
            delete(&store, "root"),
            Err(PolicyStoreError::RootImmutable)
        ));
    }

    #[test]
    fn exists_follows_put_and_delete_and_caches_only_what_is_there() {
        let (_dir, barrier) = unsealed_barrier();
        let store = PolicyStore::new(barrier.clone());
        let cached = |store: &PolicyStore| store.inner.cache.read().unwrap().policies.len();
        for i in 0..100 {
            assert!(!store.exists(&format!("made-up-{i}")).unwrap());
        }
        assert_eq!(cached(&store), 0, "absent names are not cached");
        let app = "[[rule]]\npath = \"secret/app/*\"\ncapabilities = [\"read\"]\n";
        put(&store, &policy("app", app)).unwrap();
        assert!(store.exists("app").unwrap());
        assert_eq!(cached(&store), 1);
        // The second answer is the cache's: the record removed behind the
        // store's back (no clear) is not seen.
        barrier.delete("policies/app").unwrap();
        assert!(store.exists("app").unwrap());
        // A delete through the store clears it.
        put(&store, &policy("app", app)).unwrap();
        delete(&store, "app").unwrap();
        assert!(!store.exists("app").unwrap());
        // A stored policy that does not parse exists, is not cached, and
        // can be deleted.
        barrier.put("policies/broken", b"not toml [[").unwrap();
        assert!(store.exists("broken").unwrap());
        assert_eq!(cached(&store), 0);
        delete(&store, "broken").unwrap();
        assert!(!store.exists("broken").unwrap());
    }

    #[test]
    fn compiled_cache_follows_put_and_delete() {
        let (_dir, barrier) = unsealed_barrier();
        let store = PolicyStore::new(barrier);
        let names = vec!["app".to_owned()];
        put(
            &store,
            &policy(
                "app",
                "[[rule]]\npath = \"secret/app/*\"\ncapabilities = [\"read\"]\n",
            ),
        )
        .unwrap();
        let set = store.compiled_set(&names).unwrap();
        let (p, path) = set.check("secret/app/db", Capability::Read).unwrap();
        assert_eq!((&**p, &**path), ("app", "secret/app/*"));
        assert!(Arc::ptr_eq(&set, &store.compiled_set(&names).unwrap()));
        put(
            &store,
            &policy(
                "app",
                "[[rule]]\npath = \"secret/other/*\"\ncapabilities = [\"read\"]\n",
            ),
        )
        .unwrap();
        let set = store.compiled_set(&names).unwrap();
        assert!(set.check("secret/app/db", Capability::Read).is_none());
        assert!(set.check("secret/other/db", Capability::Read).is_some());
        delete(&store, "app").unwrap();
        let set = store.compiled_set(&names).unwrap();
        assert!(set.check("secret/other/db", Capability::Read).is_none());
    }
    #[test]
    fn stale_compile_is_not_cached_after_a_concurrent_write() {
        let (_dir, barrier) = unsealed_barrier();
        let store = PolicyStore::new(barrier);
        let names = vec!["app".to_owned()];
        let wide = "[[rule]]\npath = \"secret/app/*\"\ncapabilities = [\"read\"]\n";
        let narrow = "[[rule]]\npath = \"secret/app/public\"\ncapabilities = [\"read\"]\n";
        put(&store, &policy("app", wide)).unwrap();

        // A compile reads the generation and the stored (wide) policy...
        let generation = store.inner.cache.read().unwrap().generation;
        let stale_policy = store.get("app").unwrap().unwrap();
        let stale_compiled = Arc::new(CompiledPolicy::compile(&stale_policy));
        let stale_entry = Arc::new((stale_policy.clone(), stale_compiled.clone()));
        let stale_set = Arc::new(CompiledSet {
            set: PolicySet::new(vec![stale_compiled]).unwrap(),
            names: vec![Arc::from("app")],
            rule_paths: vec![vec![Arc::from("secret/app/*")]],
            actor: None,
        });
        // ...then a put narrows it and clears the cache before the insert.
        put(&store, &policy("app", narrow)).unwrap();
        assert!(!store.insert_policy_if_current(generation, "app", Some(stale_entry)));
        assert!(!store.insert_set_if_current(generation, &names, stale_set));
        {
            let cache = store.inner.cache.read().unwrap();
            assert!(cache.policies.is_empty());
            assert!(cache.sets.is_empty());
        }
        let set = store.compiled_set(&names).unwrap();
        assert!(set.check("secret/app/db", Capability::Read).is_none());
        assert!(set.check("secret/app/public", Capability::Read).is_some());

        // The same race against a delete: nothing may grant afterwards.
        let generation = store.inner.cache.read().unwrap().generation;
        let set_before = store.compiled_set(&names).unwrap();
        delete(&store, "app").unwrap();
        assert!(!store.insert_set_if_current(generation, &names, set_before));
        assert!(!store.insert_policy_if_current(generation, "app", None));
        let set = store.compiled_set(&names).unwrap();
        assert!(set.check("secret/app/public", Capability::Read).is_none());

        // With no write in between, the insert is taken.
        let generation = store.inner.cache.read().unwrap().generation;
        assert!(store.insert_policy_if_current(generation, "app", None));
        assert!(store
            .inner
            .cache
            .read()
            .unwrap()
            .policies
            .contains_key("app"));
    }
}
