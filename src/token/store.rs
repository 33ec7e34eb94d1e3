//! The token store: issued tokens, found by keyed hashes of their text.
//!
//! Storage prefix `tokens/` (through the barrier only; this module must not
//! touch any other prefix):
//! - `tokens/accessor/<accessor>` -> the `TokenRecord`;
//! - `tokens/ttl/<hex identity name>/<16 hex digits, big-endian ms>/<accessor>`
//!   -> the parent's accessor (empty for none): each identity's tokens in
//!   expiry order (`ffff...` for never). Both the identity index (revoking
//!   an identity reads its part) and the sweeper's time-ordered index (it
//!   keeps the earliest expiry of each identity in memory: one read per
//!   identity, in the background, after an unseal);
//! - `tokens/children/<parent accessor>/<child accessor>` -> empty;
//! - on a shared store only, `tokens/revoking/<accessor>` -> the time (ms,
//!   8 bytes big-endian) a revocation marked the token's record `revoking`;
//!   written in one transaction with that mark, deleted with the token's
//!   keys. The sweeper finishes the revocation of every token it lists
//!   (`sweep_revoking`), and a child issue checks its lineage against it;
//! - tokens stored before derived accessors (`TokenRecord::derived` false)
//!   have instead `tokens/hash/<hex HMAC of the token text>` -> the
//!   accessor, `tokens/identity/<hex identity name>/<accessor>` and
//!   `tokens/expiry/<16 hex digits>/<accessor>` (the old global index, swept
//!   until it is empty); read and removed, never written for new tokens.
//!
//! Two keys per token (three for a child): with a million tokens, what sled
//! holds in memory for its pages is what start-up costs (README, Benchmarks).
//!
//! A token's accessor is derived from its text: base62 drawn from
//! HMAC-SHA256 under a keyring key (purpose `auth/token-accessor`), so a use
//! reads one record. The record also holds the token's HMAC under a second
//! key (purpose `auth/token-hash`), checked in constant time on every use.
//! Neither key is stored, so the data folder alone does not let anyone test
//! a guessed token offline, and an accessor (shown to operators, written to
//! the audit log) tells nothing of the token. Nothing is loaded at start-up.
//!
//! An issue writes its records one by one in an order whose every prefix is
//! harmless (`tokens/ttl/` entry, children link, record last;
//! `Barrier::write_in_order`), not as one atomic batch, which in sled costs
//! two synchronous log writes and stalls every other request. A crash can
//! leave the first one or two of them, never a usable token without its
//! index entries; the sweeper removes the leftovers a grace period after their
//! expiry (an issue still writing looks the same until then).
//!
//! A revoke deletes a tree children first, each token's records in the same
//! atomic batch as the `tokens/children/` link to it, so a revoke cut short by
//! a storage error never leaves a usable token unreachable from its parent.
//!
//! The last use of a limited token marks its record `spent` with an expiry
//! of now (its index entry moved there first, the old one deleted after), then
//! revokes it: a revocation cut short leaves a token every node refuses and
//! the sweeper finds due at once (see `mark_spent`).
//!
//! Every write that links records (issuing a child, revoke, renew, a counted
//! use, the sweeper) holds one mutex, so a child can never be linked under a
//! parent being revoked by this process. Issuing a token without a parent
//! links nothing and takes no lock; reads of unlimited tokens take none
//! either.
//!
//! On a shared store (etcd) another node revokes without that mutex. There a
//! child's record is written only if its parent's (and actor's) record is
//! still the one read, and no token of its lineage (the tokens above its
//! parent) is being revoked, in the same transaction (`store_issued`: the
//! anchors). A revocation first marks the tree top-down (`mark_tree`): each
//! token's record is rewritten `revoking` (every node refuses it from then
//! on, as if it were gone), with its `tokens/revoking/` entry, and only then
//! are its children read. A marked token's bytes changed, so no child can
//! be written under it any more: the children read after the mark are all
//! there will ever be, and the tree the marks cover is the tree deleted
//! after (children first, as above). A revocation cut short after a mark
//! (a crash) leaves marked tokens, which every node refuses and the
//! sweeper finishes. On sled none of this runs: no mark, no lineage.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use prost::Message;
use tokio::sync::Notify;

use crate::barrier::{Barrier, BarrierError, PlainOp, Stamp};
use crate::cidr::Cidr;
use crate::clock::{Clock, Shutdown};
use crate::policy::ROOT_POLICY;
use crate::token::cache::{self, VerifiedTokens};
use crate::token::format::{accessor_from, TokenSecret};

const HASH_PREFIX: &str = "tokens/hash/";
const ACCESSOR_PREFIX: &str = "tokens/accessor/";
const CHILDREN_PREFIX: &str = "tokens/children/";
const IDENTITY_PREFIX: &str = "tokens/identity/";
const EXPIRY_PREFIX: &str = "tokens/expiry/";
/// `tokens/ttl/<hex identity>/<16 hex digits, ms>/<accessor>`.
const TTL_PREFIX: &str = "tokens/ttl/";
/// The expiry written in the key of a token that never expires: it sorts
/// after every real one, so the sweeper never reaches it.
const NEVER: u64 = u64::MAX;
/// Compare-and-swap attempts on one token record before giving up (each
/// conflict is another node's use, renewal or revocation winning).
const USE_ATTEMPTS: usize = 64;
/// The first key after every `tokens/expiry/...` key (`0` follows `/`).
const EXPIRY_END: &str = "tokens/expiry0";
/// The foundation's prefix for the root token; migrated at unseal.
const LEGACY_PREFIX: &str = "auth/token/";
/// Key derivation purpose of the token hash key (shared with the foundation).
const HASH_PURPOSE: &str = "auth/token-hash";
/// Key derivation purpose of the key accessors are derived under.
const ACCESSOR_PURPOSE: &str = "auth/token-accessor";
/// Expired index entries handled per sweep step.
const SWEEP_BATCH: usize = 256;
/// Deletes per storage batch when revoking a tree; a token's own keys are
/// never split across batches.
const REVOKE_BATCH_OPS: usize = 1024;
/// On a shared store: `tokens/revoking/<accessor>`, a token marked by a
/// revocation that has not deleted it yet.
const REVOKING_PREFIX: &str = "tokens/revoking/";
/// How long after its mark the sweeper leaves a marked token to the
/// revocation that marked it (which may still be running on another node)
/// before it finishes the revocation itself.
const REVOKING_GRACE_MS: u64 = 30_000;
/// On a shared store the sweeper looks at `tokens/revoking/` at least this
/// often: a mark left by another node (which crashed) wakes nothing here.
const REVOKING_RECHECK_MS: u64 = 30_000;
/// Conditional tries of a revocation's mark on one record before it is
/// written over the latest record read (`TokenStore::mark`).
const MARK_TRIES: usize = 3;
/// The most ancestors a token's record lists above its parent (its
/// `lineage`, on a shared store); a deeper token keeps the nearest. One
/// etcd comparison each when it issues a child.
const MAX_LINEAGE: usize = 64;
/// How long past its expiry an index entry without a record is left alone
/// (its issue may still be writing) before the sweeper drops it.
const ORPHAN_GRACE_MS: u64 = 60_000;
/// The longest the sweeper sleeps without looking again.
const MAX_SLEEP: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// Unknown, revoked, expired or malformed: one answer for all.
    #[error("the token is not valid")]
    Invalid,
    #[error("the token is not valid from this source address")]
    SourceNotAllowed,
    #[error("no such token")]
    NotFound,
    #[error("the parent token is not valid")]
    ParentInvalid,
    #[error("the actor token is not valid")]
    ActorInvalid,
    #[error("policy '{0}' is not held by the parent token")]
    NotSubset(String),
    #[error("the child's CIDR blocks must lie inside the parent token's")]
    CidrNotSubset,
    #[error("policy '{0}' does not exist")]
    UnknownPolicy(String),
    #[error("invalid token request: {0}")]
    InvalidRequest(&'static str),
    /// The parent's or actor's record kept changing while a child was
    /// written (renewals on other nodes of a shared store).
    #[error("the parent or actor token changed while the token was issued; try again")]
    Contended,
    #[error("stored token record is corrupt")]
    Corrupt,
    #[error("the system random number generator failed")]
    Random,
    #[error(transparent)]
    Barrier(#[from] BarrierError),
}

/// What a new token should be (the contract with the identity work).
#[derive(Debug, Clone)]
pub struct TokenRequest {
    /// Inventory name of the owner; "root" for the root token.
    pub identity: String,
    /// Validated names; each must exist (or be "root").
    pub policies: Vec<String>,
    /// Requested life; clamped to `max_ttl`. Zero only for `method: "root"`
    /// (the token never expires).
    pub ttl: Duration,
    /// Cap on the life including renewals, from creation; zero = `ttl`.
    pub max_ttl: Duration,
    /// Absolute cap (ms since the epoch), e.g. a JWT's `exp`.
    pub hard_expiry_ms: Option<u64>,
    /// 0 = unlimited.
    pub uses: u32,
    pub cidrs: Vec<Cidr>,
    /// None for login tokens (children of nobody).
    pub parent_accessor: Option<String>,
    /// "root" | "token" | "approle" | "cert" | "oidc"
    pub method: &'static str,
}

/// A token just made; `token` is shown to its owner once.
#[derive(Debug)]
pub struct IssuedToken {
    pub token: TokenSecret,
    /// The time the token was made at (its `created_at`).
    pub issued_at_ms: u64,
    pub accessor: String,
    /// 0 when the token never expires (the root token).
    pub expires_at_ms: u64,
    pub policies: Vec<String>,
    pub identity: String,
}

/// A token whose total allowed life exceeds a threshold (governance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LongLived {
    pub accessor: String,
    pub identity: String,
    /// Total allowed life in seconds; `u64::MAX` when it never expires.
    pub ttl_seconds: u64,
}

/// A stored token, under `tokens/accessor/`: found by its accessor, which
/// for a token issued now is derived from the token text.
#[derive(Clone, PartialEq, Message)]
pub struct TokenRecord {
    #[prost(string, tag = "1")]
    pub accessor: String,
    #[prost(string, tag = "2")]
    pub identity: String,
    #[prost(string, repeated, tag = "3")]
    pub policies: Vec<String>,
    #[prost(uint64, tag = "4")]
    pub created_at_ms: u64,
    /// 0 = never.
    #[prost(uint64, tag = "5")]
    pub expires_at_ms: u64,
    /// The default renew increment.
    #[prost(uint64, tag = "6")]
    pub ttl_ms: u64,
    /// Renewals never go past this; 0 = never expires.
    #[prost(uint64, tag = "7")]
    pub max_expiry_ms: u64,
    /// Uses left; 0 = unlimited.
    #[prost(uint32, tag = "8")]
    pub uses_remaining: u32,
    #[prost(uint32, tag = "9")]
    pub uses_total: u32,
    #[prost(string, repeated, tag = "10")]
    pub cidrs: Vec<String>,
    #[prost(string, tag = "11")]
    pub parent_accessor: String,
    #[prost(string, tag = "12")]
    pub method: String,
    /// Hex HMAC of the token text, checked on every use (and, for a token
    /// stored before derived accessors, the key of its `tokens/hash/` record).
    #[prost(string, tag = "13")]
    pub hash: String,
    /// As requested, for governance.
    #[prost(uint64, tag = "14")]
    pub max_ttl_ms: u64,
    #[prost(uint64, tag = "15")]
    pub hard_expiry_ms: u64,
    /// Issued with a derived accessor and indexed under `tokens/ttl/`;
    /// false: the layout before (`tokens/hash/`, `tokens/identity/`,
    /// `tokens/expiry/`).
    #[prost(bool, tag = "16")]
    pub derived: bool,
    /// An exchange-only token (RFC 8693 `may_act`): the one identity that
    /// may exchange it; it is refused for any other use.
    #[prost(string, tag = "17")]
    pub may_act: String,
    /// A delegated token: the actor's identity and token (revoking that
    /// token revokes this one) and the actor token's policies, which must
    /// allow every use too.
    #[prost(string, tag = "18")]
    pub actor_identity: String,
    #[prost(string, tag = "19")]
    pub actor_accessor: String,
    #[prost(string, repeated, tag = "20")]
    pub actor_policies: Vec<String>,
    /// The last use of a limited token was counted (by compare-and-swap,
    /// so on exactly one node) and its revocation is under way: the token
    /// is refused as if expired.
    #[prost(bool, tag = "21")]
    pub spent: bool,
    /// A revocation marked this token (on a shared store, before it read its
    /// children): it is refused everywhere as if it were gone, and no child
    /// is issued under it. `spent` is set with it, so that a node of an
    /// earlier release (a rolling upgrade) refuses it too.
    #[prost(bool, tag = "22")]
    pub revoking: bool,
    /// On a shared store: the tokens above this token's parent (its
    /// grandparent first, then up), at most `MAX_LINEAGE`. This record was
    /// written only while none of them had a `tokens/revoking/` entry, in
    /// the same transaction (`store_issued`; a mark of the parent fails the
    /// parent's anchor), so a revocation stops every issue below its root
    /// from the root's mark on. Empty on sled, for a token without a parent
    /// and for a child of one.
    #[prost(string, repeated, tag = "23")]
    pub lineage: Vec<String>,
}

impl TokenRecord {
    fn is_expired(&self, now_ms: u64) -> bool {
        self.spent || self.revoking || (self.expires_at_ms != 0 && now_ms >= self.expires_at_ms)
    }

    fn cidr_blocks(&self) -> Result<Vec<Cidr>, TokenError> {
        self.cidrs
            .iter()
            .map(|c| c.parse().map_err(|_| TokenError::Corrupt))
            .collect()
    }

    /// The public view.
    pub fn info(&self) -> TokenInfo {
        TokenInfo {
            accessor: self.accessor.clone(),
            identity: self.identity.clone(),
            policies: self.policies.clone(),
            created_at_ms: self.created_at_ms,
            expires_at_ms: self.expires_at_ms,
            max_expiry_ms: self.max_expiry_ms,
            uses_remaining: self.uses_remaining,
            cidrs: self.cidrs.clone(),
            parent_accessor: self.parent_accessor.clone(),
            method: self.method.clone(),
            may_act: self.may_act.clone(),
            actor_identity: self.actor_identity.clone(),
            actor_accessor: self.actor_accessor.clone(),
            actor_policies: self.actor_policies.clone(),
        }
    }

    /// A delegated token (made by an exchange).
    pub fn is_delegated(&self) -> bool {
        !self.actor_accessor.is_empty()
    }

    /// An exchange-only token (`may_act`).
    pub fn is_exchange_only(&self) -> bool {
        !self.may_act.is_empty()
    }
}

/// What a lookup shows (never the token text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub accessor: String,
    pub identity: String,
    pub policies: Vec<String>,
    pub created_at_ms: u64,
    /// 0 = never.
    pub expires_at_ms: u64,
    /// 0 = never.
    pub max_expiry_ms: u64,
    /// 0 = unlimited.
    pub uses_remaining: u32,
    pub cidrs: Vec<String>,
    pub parent_accessor: String,
    pub method: String,
    /// Exchange-only token: the identity that may exchange it ("" if none).
    pub may_act: String,
    /// Delegated token: the actor's identity and token ("" if none).
    pub actor_identity: String,
    pub actor_accessor: String,
    pub actor_policies: Vec<String>,
}

/// The RFC 8693 parts of a new token (none for an ordinary token).
#[derive(Debug, Clone, Default)]
pub struct Delegation {
    /// An exchange-only token that this identity alone may exchange.
    pub may_act: Option<String>,
    /// A delegated token: the actor's token (accessor), which must be live
    /// and which bounds its life; revoking it revokes this token.
    pub actor_accessor: Option<String>,
}

/// The answer to "may this token be used now, from here?".
#[derive(Debug, Clone)]
pub struct TokenUse {
    /// The token's record; on a hit of the verified-token cache, the cached
    /// one itself (no copy).
    pub record: Arc<TokenRecord>,
    /// A use was counted (and stored); the caller should wait for
    /// `Barrier::durable` before acting.
    pub counted: bool,
    /// The use counted was the token's last: counting it revoked the token.
    pub last_use: bool,
    /// The token's audit HMAC kept by the verified-token cache (a hit); `None`
    /// on the full path.
    pub audit_mac: Option<Arc<crate::audit::TokenMac>>,
}

/// Told of the tokens a revoke removed (with their children, with their
/// identity, at expiry), after they are gone: the leases they hold end
/// with them (`lease::LeaseStore` implements it; set in `core`).
pub trait RevokeListener: Send + Sync {
    fn tokens_revoked(&self, accessors: &[&str]);
}

/// Whether a policy name exists; the store asks it on issue.
pub trait PolicyNames: Send + Sync {
    fn policy_exists(&self, name: &str) -> Result<bool, TokenError>;
}

/// A cheap handle: clones share one store.
#[derive(Clone)]
pub struct TokenStore {
    inner: Arc<Inner>,
}

struct TokenKeys {
    hash: ring::hmac::Key,
    accessor: ring::hmac::Key,
}

struct Inner {
    barrier: Arc<Barrier>,
    policies: Arc<dyn PolicyNames>,
    /// What the sweeper and the gate judge expiry by.
    clock: Clock,
    /// Present while unsealed.
    keys: RwLock<Option<TokenKeys>>,
    writes: Mutex<()>,
    /// The turn of a child or delegated issue made on the runtime
    /// ([`TokenStore::issue_on_runtime`]), taken before `writes`.
    child_turn: tokio::sync::Mutex<()>,
    /// Wakes the sweeper: a new expiry earlier than its planned wake, an unseal.
    wake: Notify,
    /// When the sleeping sweeper plans to wake (ms; `u64::MAX`: nothing
    /// planned); the sweep's start time while it runs (the heads it misses
    /// then are looked at when it ends). An issue wakes it only for an
    /// expiry before this, so a stream of logins does not sweep once per
    /// login.
    sweep_planned_ms: AtomicU64,
    /// The earliest expiry of each identity's part of `tokens/ttl/`.
    heads: Mutex<Heads>,
    /// Unlimited tokens already verified (`token::cache`); shared with the
    /// store's change feed on etcd, which forgets changed records.
    verified: Arc<VerifiedTokens>,
    /// Told of every revoked token ([`TokenStore::set_revoke_listener`]).
    revoked: std::sync::OnceLock<Arc<dyn RevokeListener>>,
    #[cfg(test)]
    hooks: TestHooks,
}

/// Points inside a write where a test runs code, to interleave two stores
/// (two nodes) deterministically.
#[cfg(test)]
#[derive(Default)]
struct TestHooks {
    /// In an anchored issue, after the index entries, before the record.
    before_anchored_write: crate::test_hook::Hook,
    /// In a revocation, after planning a tree, before deleting it.
    after_revoke_plan: crate::test_hook::Hook,
    /// In a revocation on a shared store, after each token's mark (or its
    /// read, marked or gone already), before its children are read.
    after_mark: crate::test_hook::Hook,
    /// In a renewal on a shared store, after the record's read, before its
    /// write.
    before_renew_write: crate::test_hook::Hook,
    /// In a revocation's mark, after the record's read, before its write.
    before_mark_write: crate::test_hook::Hook,
    /// The next mint's token text instead of a random one (a generator that
    /// repeats itself).
    replay_mint: Mutex<Option<String>>,
}

/// Where the sweeper looks next: per identity (hex, as in the keys), a time
/// no later than its first `tokens/ttl/` entry. Filled from storage by the
/// sweeper (one read per identity), lowered by every issue and renew. An identity
/// being swept collects the expiries issued meanwhile in `during_sweep`, so
/// an entry written behind the sweeper's scan is never lost from view.
#[derive(Default)]
struct Heads {
    loaded: bool,
    by_identity: HashMap<String, u64>,
    order: BTreeSet<(u64, String)>,
    during_sweep: HashMap<String, u64>,
}

impl Heads {
    fn set(&mut self, identity: &str, at_ms: u64) {
        if let Some(old) = self.by_identity.insert(identity.to_owned(), at_ms) {
            self.order.remove(&(old, identity.to_owned()));
        }
        if at_ms != NEVER {
            self.order.insert((at_ms, identity.to_owned()));
        }
    }

    fn lower(&mut self, identity: &str, at_ms: u64) {
        if let Some(pending) = self.during_sweep.get_mut(identity) {
            *pending = (*pending).min(at_ms);
        }
        let current = self.by_identity.get(identity).copied().unwrap_or(NEVER);
        if at_ms < current {
            self.set(identity, at_ms);
        }
    }

    fn earliest(&self) -> Option<u64> {
        self.order.first().map(|(at, _)| *at)
    }

    /// Takes the identity with the earliest head if it is due, and starts
    /// collecting the expiries issued for it while it is swept.
    fn start_sweep(&mut self, now_ms: u64) -> Option<(u64, String)> {
        let (at, identity) = self.order.first().cloned()?;
        if at > now_ms {
            return None;
        }
        self.order.remove(&(at, identity.clone()));
        self.during_sweep.insert(identity.clone(), NEVER);
        Some((at, identity))
    }

    /// Ends the sweep of `identity`: its head is `next` as the sweep found
    /// it, or an earlier expiry issued meanwhile.
    fn finish_sweep(&mut self, identity: &str, next: u64) {
        let pending = self.during_sweep.remove(identity).unwrap_or(NEVER);
        self.set(identity, next.min(pending));
    }
}

fn duration_ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// A key of the index of tokens stored before `tokens/ttl/` (read only).
fn expiry_key(expires_at_ms: u64, accessor: &str) -> String {
    format!("{EXPIRY_PREFIX}{expires_at_ms:016x}/{accessor}")
}

fn ttl_prefix_hex(identity_hex: &str) -> String {
    format!("{TTL_PREFIX}{identity_hex}/")
}

/// A token's index entries, as its issue writes them before its record:
/// its `tokens/ttl/` entry (naming its parent) and its links under its
/// parent and its actor.
fn own_links(record: &TokenRecord) -> Vec<(String, Vec<u8>)> {
    let ttl = ttl_key(&record.identity, record.expires_at_ms, &record.accessor);
    let mut links = vec![(ttl, record.parent_accessor.as_bytes().to_vec())];
    if !record.parent_accessor.is_empty() {
        let key = format!(
            "{CHILDREN_PREFIX}{}/{}",
            record.parent_accessor, record.accessor
        );
        links.push((key, Vec::new()));
    }
    if record.is_delegated() {
        let key = format!(
            "{CHILDREN_PREFIX}{}/{}",
            record.actor_accessor, record.accessor
        );
        links.push((key, Vec::new()));
    }
    links
}

/// The `tokens/ttl/` key of a token (`0` = never expires).
fn ttl_key(identity: &str, expires_at_ms: u64, accessor: &str) -> String {
    let at = if expires_at_ms == 0 {
        NEVER
    } else {
        expires_at_ms
    };
    format!(
        "{}{at:016x}/{accessor}",
        ttl_prefix_hex(&hex::encode(identity.as_bytes()))
    )
}

/// (hex identity, expiry, accessor) of a `tokens/ttl/` key.
fn parse_ttl_key(key: &str) -> Option<(&str, u64, &str)> {
    let rest = key.strip_prefix(TTL_PREFIX)?;
    let (identity_hex, rest) = rest.split_once('/')?;
    let (at, accessor) = rest.split_once('/')?;
    if identity_hex.is_empty() || at.len() != 16 || accessor.is_empty() {
        return None;
    }
    Some((identity_hex, u64::from_str_radix(at, 16).ok()?, accessor))
}

/// The first key after every key that starts with `prefix` (which ends in
/// `/`; `0` follows `/`).
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.strip_suffix('/').unwrap_or(prefix).to_owned();
    end.push('0');
    end
}

fn identity_prefix(identity: &str) -> String {
    format!("{IDENTITY_PREFIX}{}/", hex::encode(identity.as_bytes()))
}

/// The smaller of two "0 = never" times.
fn min_time(a: u64, b: u64) -> u64 {
    match (a, b) {
        (0, b) => b,
        (a, 0) => a,
        (a, b) => a.min(b),
    }
}

/// What a token's parent (or the request's hard expiry) bounds it by.
/// The addresses both lists of CIDR blocks allow (an empty list allows
/// every address). Two blocks are either disjoint or one lies within the
/// other, so the overlap is the blocks of each side that lie within a block
/// of the other.
fn cidr_intersection(a: &[Cidr], b: &[Cidr]) -> Vec<Cidr> {
    if a.is_empty() {
        return b.to_vec();
    }
    if b.is_empty() {
        return a.to_vec();
    }
    let mut out: Vec<Cidr> = Vec::new();
    for (inner, outer) in [(a, b), (b, a)] {
        for c in inner {
            if outer.iter().any(|o| c.within(o)) && !out.contains(c) {
                out.push(*c);
            }
        }
    }
    out
}

/// A token minted by [`TokenStore::mint`], not yet stored.
struct Minted {
    token: TokenSecret,
    accessor: String,
    hash: String,
}

/// What [`TokenStore::revoke_plan`] (or, on a shared store,
/// [`TokenStore::mark_tree`]) found to delete.
struct RevokePlan {
    /// How many tokens the revocation counts: on sled the records the
    /// batches remove; on a shared store the tokens whose mark it wrote.
    count: u32,
    /// Deletes to apply in order, each batch atomic.
    batches: Vec<Vec<String>>,
}

/// Whose `revoking` mark a token carries ([`TokenStore::mark`]).
enum Mark {
    /// This call wrote it.
    Written(TokenRecord),
    /// Another revocation did (perhaps one cut short).
    Found(TokenRecord),
    /// No record: revoked already, or an issue that will never write it.
    NoRecord,
}

/// A token's `tokens/revoking/` key (shared store).
fn revoking_key(accessor: &str) -> String {
    format!("{REVOKING_PREFIX}{accessor}")
}

/// Groups of deletes (each a token's keys, or a stray link), children's
/// after their parents', as atomic batches of at most `max_ops`, in the order
/// to apply: each group after every group of its descendants, never split.
fn revoke_batches(mut groups: Vec<Vec<String>>, max_ops: usize) -> Vec<Vec<String>> {
    // Every token was reached from its parent, after it: reversed, each
    // group comes after all of its descendants'.
    groups.reverse();
    let mut batches: Vec<Vec<String>> = Vec::new();
    let mut current: Vec<String> = Vec::new();
    for group in groups {
        if !current.is_empty() && current.len().saturating_add(group.len()) > max_ops {
            batches.push(std::mem::take(&mut current));
        }
        current.extend(group);
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

/// Adds a token's own keys to its revocation group: its record and index
/// entries, and the links to it from its parent and actor.
fn push_token_keys(acc: &str, record: &TokenRecord, group: &mut Vec<String>) {
    group.push(format!("{ACCESSOR_PREFIX}{acc}"));
    if record.derived {
        group.push(ttl_key(&record.identity, record.expires_at_ms, acc));
    } else {
        group.push(format!("{HASH_PREFIX}{}", record.hash));
        group.push(format!("{}{acc}", identity_prefix(&record.identity)));
        if record.expires_at_ms != 0 {
            group.push(expiry_key(record.expires_at_ms, acc));
        }
    }
    for linked_from in [&record.parent_accessor, &record.actor_accessor] {
        if linked_from.is_empty() {
            continue;
        }
        let own_link = format!("{CHILDREN_PREFIX}{linked_from}/{acc}");
        if !group.contains(&own_link) {
            group.push(own_link);
        }
    }
    if record.revoking {
        group.push(revoking_key(acc));
    }
}

/// The accessors whose records a revocation's batches delete.
fn revoked_accessors(batches: &[Vec<String>]) -> impl Iterator<Item = &str> {
    batches
        .iter()
        .flatten()
        .filter_map(|key| key.strip_prefix(ACCESSOR_PREFIX))
}

/// Whether an issue links the new token under another (a parent or an
/// actor), and so is made under the store's write lock.
fn takes_write_lock(req: &TokenRequest, delegation: &Delegation) -> bool {
    req.parent_accessor.is_some() || delegation.actor_accessor.is_some()
}

/// A record a new token hangs from (its parent's, its actor's), as read
/// when the token was bounded by it: on a shared store the token's record is
/// written only if this one is still stored unchanged (`store_issued`).
struct Anchor {
    key: String,
    stamp: Stamp,
}

/// How many times an issue reads its parent and actor again when one of
/// their records changed between the read and the write (a renewal on another
/// node) before it gives up with [`TokenError::Contended`].
const ANCHOR_TRIES: usize = 3;

struct Bounds {
    /// The latest the token may live to (ms; 0: unbounded).
    cap_ms: u64,
    cidrs: Vec<Cidr>,
    /// The new token's `lineage` (on a shared store).
    lineage: Vec<String>,
}

/// A new token's expiry, maximum expiry and TTL (ms; all 0: never expires).
#[derive(Clone, Copy)]
struct Lifetime {
    expires_at_ms: u64,
    max_expiry_ms: u64,
    ttl_ms: u64,
}

impl Lifetime {
    /// The life a request asks for, within `cap_ms`: the TTL within the
    /// maximum TTL (the TTL when none is given), both ending by the cap.
    fn of(req: &TokenRequest, cap_ms: u64, now_ms: u64) -> Result<Self, TokenError> {
        if cap_ms != 0 && cap_ms <= now_ms {
            return Err(TokenError::InvalidRequest(
                "the token would already be expired",
            ));
        }
        if req.never_expires() && cap_ms == 0 {
            return Ok(Self {
                expires_at_ms: 0,
                max_expiry_ms: 0,
                ttl_ms: 0,
            });
        }
        let max_ttl = if req.max_ttl.is_zero() {
            req.ttl
        } else {
            req.max_ttl
        };
        let ttl = req.ttl.min(max_ttl);
        let max_expiry_ms = min_time(now_ms.saturating_add(duration_ms(max_ttl)), cap_ms);
        Ok(Self {
            expires_at_ms: min_time(now_ms.saturating_add(duration_ms(ttl)), max_expiry_ms),
            max_expiry_ms,
            ttl_ms: duration_ms(ttl),
        })
    }
}

impl TokenRequest {
    /// A root token without a TTL never expires (no other token may).
    fn never_expires(&self) -> bool {
        self.method == "root" && self.ttl.is_zero()
    }
}

impl TokenStore {
    pub fn new(barrier: Arc<Barrier>, policies: Arc<dyn PolicyNames>, clock: Clock) -> Self {
        let verified = Arc::new(VerifiedTokens::new());
        if let Some(coherence) = barrier.coherence() {
            // On a shared store: a change of a record by any node (seen by
            // the store's watch) forgets that token; a new watch, all.
            let changed = verified.clone();
            let reset = verified.clone();
            coherence.track(
                ACCESSOR_PREFIX,
                Arc::new(move |key: &str| {
                    if let Some(accessor) = key.strip_prefix(ACCESSOR_PREFIX) {
                        drop(changed.invalidate_on_drop([accessor]));
                    }
                }),
                Arc::new(move || reset.invalidate()),
            );
        }
        Self {
            inner: Arc::new(Inner {
                barrier,
                policies,
                clock,
                keys: RwLock::new(None),
                writes: Mutex::new(()),
                child_turn: tokio::sync::Mutex::new(()),
                wake: Notify::new(),
                sweep_planned_ms: AtomicU64::new(u64::MAX),
                heads: Mutex::new(Heads::default()),
                verified,
                revoked: std::sync::OnceLock::new(),
                #[cfg(test)]
                hooks: TestHooks::default(),
            }),
        }
    }

    fn barrier(&self) -> &Barrier {
        &self.inner.barrier
    }

    /// Sets (once) who is told of revoked tokens.
    pub fn set_revoke_listener(&self, listener: Arc<dyn RevokeListener>) {
        let _ = self.inner.revoked.set(listener);
    }

    /// The clock this store's expiries are judged by.
    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    fn heads(&self) -> std::sync::MutexGuard<'_, Heads> {
        self.inner.heads.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Tells the sweeper of a new expiry, if it comes before its planned wake.
    fn expiry_added(&self, at_ms: u64) {
        if at_ms < self.inner.sweep_planned_ms.load(Ordering::Acquire) {
            self.inner.wake.notify_one();
        }
    }

    /// Loads the hash and accessor keys after an unseal and moves a
    /// foundation root token (`auth/token/`) into this store.
    pub fn on_unseal(&self, now_ms: u64) -> Result<(), TokenError> {
        let key = |purpose| -> Result<ring::hmac::Key, TokenError> {
            let key = self.barrier().derive_key(purpose)?;
            Ok(ring::hmac::Key::new(
                ring::hmac::HMAC_SHA256,
                key.as_slice(),
            ))
        };
        let keys = TokenKeys {
            hash: key(HASH_PURPOSE)?,
            accessor: key(ACCESSOR_PURPOSE)?,
        };
        *self.inner.keys.write().unwrap_or_else(|e| e.into_inner()) = Some(keys);
        self.inner.verified.invalidate();
        self.migrate_legacy(now_ms)?;
        self.inner.wake.notify_one();
        Ok(())
    }

    pub fn on_seal(&self) {
        *self.inner.keys.write().unwrap_or_else(|e| e.into_inner()) = None;
        self.inner.verified.invalidate();
    }

    fn migrate_legacy(&self, now_ms: u64) -> Result<(), TokenError> {
        let legacy = self.barrier().scan_prefix(LEGACY_PREFIX)?;
        if legacy.is_empty() {
            return Ok(());
        }
        let _guard = self.inner.writes.lock().unwrap_or_else(|e| e.into_inner());
        for (key, value) in legacy {
            let hash = key.trim_start_matches(LEGACY_PREFIX).to_owned();
            let mut record =
                TokenRecord::decode(value.as_slice()).map_err(|_| TokenError::Corrupt)?;
            record.hash = hash.clone();
            if record.method.is_empty() {
                record.method = "root".into();
            }
            if record.created_at_ms == 0 {
                record.created_at_ms = now_ms;
            }
            let encoded = record.encode_to_vec();
            let hash_key = format!("{HASH_PREFIX}{hash}");
            let acc_key = format!("{ACCESSOR_PREFIX}{}", record.accessor);
            let id_key = format!("{}{}", identity_prefix(&record.identity), record.accessor);
            self.barrier().batch(&[
                PlainOp::Put(&hash_key, record.accessor.as_bytes()),
                PlainOp::Put(&acc_key, &encoded),
                PlainOp::Put(&id_key, b""),
                PlainOp::Delete(&key),
            ])?;
        }
        Ok(())
    }

    fn with_keys<T>(
        &self,
        f: impl FnOnce(&TokenKeys) -> Result<T, TokenError>,
    ) -> Result<T, TokenError> {
        let guard = self.inner.keys.read().unwrap_or_else(|e| e.into_inner());
        f(guard
            .as_ref()
            .ok_or(TokenError::Barrier(BarrierError::Sealed))?)
    }

    fn hash(&self, token: &str) -> Result<String, TokenError> {
        self.with_keys(|keys| {
            Ok(hex::encode(
                ring::hmac::sign(&keys.hash, token.as_bytes()).as_ref(),
            ))
        })
    }

    /// The accessor of `token`: base62 drawn from HMAC(counter || token),
    /// one counter value per 32 bytes asked for.
    fn derive_accessor(&self, token: &str) -> Result<String, TokenError> {
        self.with_keys(|keys| {
            let mut counter = 0u32;
            accessor_from(|buf| {
                for chunk in buf.chunks_mut(ring::digest::SHA256_OUTPUT_LEN) {
                    let mut ctx = ring::hmac::Context::with_key(&keys.accessor);
                    ctx.update(&counter.to_be_bytes());
                    ctx.update(token.as_bytes());
                    let tag = ctx.sign();
                    chunk.copy_from_slice(&tag.as_ref()[..chunk.len()]);
                    counter = counter.wrapping_add(1);
                }
                Ok(())
            })
            .map_err(|_| TokenError::Corrupt)
        })
    }

    fn record(&self, accessor: &str) -> Result<Option<TokenRecord>, TokenError> {
        Ok(self.record_stamped(accessor)?.map(|(record, _)| record))
    }

    /// [`TokenStore::record`] with the stamp of the stored record, for a
    /// write conditional on it.
    fn record_stamped(&self, accessor: &str) -> Result<Option<(TokenRecord, Stamp)>, TokenError> {
        match self
            .barrier()
            .get_stamped(&format!("{ACCESSOR_PREFIX}{accessor}"))?
        {
            Some((raw, stamp)) => TokenRecord::decode(raw.as_slice())
                .map(|record| Some((record, stamp)))
                .map_err(|_| TokenError::Corrupt),
            None => Ok(None),
        }
    }

    /// The record of a token text, if the token is known: one read for a
    /// derived accessor, two for a token from before (`tokens/hash/`).
    fn find(&self, token: &str) -> Result<Option<TokenRecord>, TokenError> {
        if TokenSecret::parse(token).is_err() {
            return Ok(None);
        }
        // The stored HMAC must match too (in constant time, by ring).
        let verified = |record: TokenRecord| -> Result<Option<TokenRecord>, TokenError> {
            let Ok(tag) = hex::decode(&record.hash) else {
                return Err(TokenError::Corrupt);
            };
            self.with_keys(
                |keys| Ok(ring::hmac::verify(&keys.hash, token.as_bytes(), &tag).is_ok()),
            )
            .map(|same| same.then_some(record))
        };
        // The HMAC decides, not `derived`: a record rewritten by an older
        // binary (which drops fields it does not know) is still this token.
        if let Some(record) = self.record(&self.derive_accessor(token)?)? {
            if let Some(record) = verified(record)? {
                return Ok(Some(record));
            }
        }
        let hash_key = format!("{HASH_PREFIX}{}", self.hash(token)?);
        let Some(raw) = self.barrier().get(&hash_key)? else {
            return Ok(None);
        };
        let accessor = String::from_utf8(raw.to_vec()).map_err(|_| TokenError::Corrupt)?;
        match self.record(&accessor)? {
            Some(record) => verified(record),
            None => Ok(None),
        }
    }

    /// Makes a token. A child's policies must be a subset of its parent's
    /// (a parent holding `root` may give anything) and it never outlives the
    /// parent's maximum life.
    pub fn issue(&self, req: TokenRequest, now_ms: u64) -> Result<IssuedToken, TokenError> {
        self.issue_with(req, Delegation::default(), now_ms)
    }

    /// [`Self::issue_with`] for a handler on the runtime, at the store's
    /// clock. A child or delegated token is made under the store's write
    /// lock, a `std` mutex that blocks the thread waiting for it; here such
    /// an issue first waits for its turn among the others made on the
    /// runtime (a `tokio` mutex), so that a waiting issue gives its worker
    /// to other requests instead of blocking it (on 2 cores one blocked
    /// worker is half the server). The policies are checked and the token
    /// minted before the turn; the time is read under the write lock. (The
    /// turn's holder still waits for the lock while a revocation, a renewal
    /// or a counted use holds it.)
    pub async fn issue_on_runtime(
        &self,
        req: TokenRequest,
        delegation: Delegation,
    ) -> Result<IssuedToken, TokenError> {
        let policies = self.checked_policies(&req)?;
        let minted = self.mint()?;
        let _turn = match takes_write_lock(&req, &delegation) {
            true => Some(self.inner.child_turn.lock().await),
            false => None,
        };
        self.issue_minted(req, delegation, policies, minted, None)
    }

    /// [`TokenStore::issue`] of an exchange-only or a delegated token. A
    /// delegated token also lives no longer than its actor's token, holds its
    /// policies as `actor_policies` and is linked under it as a child, so
    /// revoking either token (or disabling either identity) revokes it.
    pub fn issue_with(
        &self,
        req: TokenRequest,
        delegation: Delegation,
        now_ms: u64,
    ) -> Result<IssuedToken, TokenError> {
        let policies = self.checked_policies(&req)?;
        let minted = self.mint()?;
        self.issue_minted(req, delegation, policies, minted, Some(now_ms))
    }

    /// Stores a minted token for `req`, at `now_ms` (`None`: the store's
    /// clock, read under the write lock). The secret, its accessor and hash
    /// are minted before the lock: they depend on nothing it protects, and
    /// a child issue holds it against every other child issue and
    /// revocation of this store.
    fn issue_minted(
        &self,
        req: TokenRequest,
        delegation: Delegation,
        policies: Vec<String>,
        minted: Minted,
        now_ms: Option<u64>,
    ) -> Result<IssuedToken, TokenError> {
        // The write lock keeps a child from being linked under a parent being
        // revoked by this process. A token without a parent links to nothing:
        // a login (the hot path) does not queue behind other writes. (A login
        // checks its identity again once the token is stored, for a disable
        // or delete that ran meanwhile.) Other processes on a shared store are
        // kept out by the anchors (`store_issued`).
        let _guard = takes_write_lock(&req, &delegation)
            .then(|| self.inner.writes.lock().unwrap_or_else(|e| e.into_inner()));
        let (mut policies, mut minted) = (policies, minted);
        for _ in 0..ANCHOR_TRIES {
            let now_ms = now_ms.unwrap_or_else(|| self.inner.clock.now_ms());
            let (token, record, anchors) =
                self.linked_record(&req, &delegation, policies, minted, now_ms)?;
            if self.store_issued(&record, &anchors)? {
                return Ok(IssuedToken {
                    token,
                    issued_at_ms: now_ms,
                    accessor: record.accessor,
                    expires_at_ms: record.expires_at_ms,
                    policies: record.policies,
                    identity: req.identity,
                });
            }
            // A parent or actor record changed (a renewal on another node, a
            // revocation's mark) or went (a revocation) since it was read:
            // read it again. A token above the parent being revoked refuses
            // the child as its parent's mark would.
            if self.lineage_revoking(&record.lineage)? {
                return Err(TokenError::ParentInvalid);
            }
            policies = record.policies;
            minted = Minted {
                token,
                accessor: record.accessor,
                hash: record.hash,
            };
        }
        Err(TokenError::Contended)
    }

    /// A minted token's record for `req` at `now_ms`, bounded by its parent
    /// and actor (read now), with the stamps of their records: the anchors
    /// its write is conditional on where another process may revoke them.
    fn linked_record(
        &self,
        req: &TokenRequest,
        delegation: &Delegation,
        policies: Vec<String>,
        minted: Minted,
        now_ms: u64,
    ) -> Result<(TokenSecret, TokenRecord, Vec<Anchor>), TokenError> {
        // Kept only where another process may revoke (see `store_issued`).
        let mut anchors = self.barrier().is_shared_store().then(Vec::new);
        let mut bounds = self.parent_bounds(req, &policies, now_ms, &mut anchors)?;
        let actor = match &delegation.actor_accessor {
            Some(acc) => {
                let (actor, stamp) = self
                    .record_stamped(acc)?
                    .filter(|(a, _)| !a.is_expired(now_ms))
                    .ok_or(TokenError::ActorInvalid)?;
                if actor.is_delegated() || actor.is_exchange_only() {
                    return Err(TokenError::ActorInvalid);
                }
                // As for a parent: one counted use must not buy an uncounted
                // token (the delegated one) that acts for as long.
                if actor.uses_total != 0 {
                    return Err(TokenError::InvalidRequest(
                        "a token with a use limit cannot act for another (exchange a token \
                         without one)",
                    ));
                }
                if let Some(anchors) = &mut anchors {
                    anchors.push(Anchor {
                        key: format!("{ACCESSOR_PREFIX}{acc}"),
                        stamp,
                    });
                }
                bounds.cap_ms = min_time(bounds.cap_ms, actor.expires_at_ms);
                // Bound to the source addresses both tokens allow: an
                // agent's token bound to a network must not yield a token
                // with the agent's rights usable from anywhere.
                let actor_cidrs = actor.cidr_blocks()?;
                if !actor_cidrs.is_empty() {
                    bounds.cidrs = cidr_intersection(&bounds.cidrs, &actor_cidrs);
                    if bounds.cidrs.is_empty() {
                        return Err(TokenError::InvalidRequest(
                            "the subject token's and the actor token's CIDR blocks do not overlap",
                        ));
                    }
                }
                Some(actor)
            }
            None => None,
        };
        let life = Lifetime::of(req, bounds.cap_ms, now_ms)?;
        let (token, mut record) =
            self.new_record(minted, req, policies, bounds.cidrs, life, now_ms);
        record.lineage = bounds.lineage;
        record.may_act = delegation.may_act.clone().unwrap_or_default();
        if let Some(actor) = actor {
            record.actor_identity = actor.identity;
            record.actor_accessor = actor.accessor;
            record.actor_policies = actor.policies;
        }
        Ok((token, record, anchors.unwrap_or_default()))
    }

    /// The request's policies, each once, every one known; refuses a request
    /// without a TTL (but the root token's) or an identity.
    fn checked_policies(&self, req: &TokenRequest) -> Result<Vec<String>, TokenError> {
        if req.ttl.is_zero() && !req.never_expires() {
            return Err(TokenError::InvalidRequest("the TTL must be at least 1s"));
        }
        if req.identity.is_empty() {
            return Err(TokenError::InvalidRequest("the token needs an identity"));
        }
        let mut seen = HashSet::new();
        let policies: Vec<String> = req
            .policies
            .iter()
            .filter(|p| seen.insert(p.as_str()))
            .cloned()
            .collect();
        for policy in &policies {
            if policy != ROOT_POLICY && !self.inner.policies.policy_exists(policy)? {
                return Err(TokenError::UnknownPolicy(policy.clone()));
            }
        }
        Ok(policies)
    }

    /// What the parent (if any) allows: its policies must include the
    /// child's, the child is bound to (a subset of) its CIDR blocks and ends
    /// by its maximum life. Called under the write lock.
    fn parent_bounds(
        &self,
        req: &TokenRequest,
        policies: &[String],
        now_ms: u64,
        anchors: &mut Option<Vec<Anchor>>,
    ) -> Result<Bounds, TokenError> {
        let mut bounds = Bounds {
            cap_ms: req.hard_expiry_ms.unwrap_or(0),
            cidrs: req.cidrs.clone(),
            lineage: Vec::new(),
        };
        let Some(parent_accessor) = &req.parent_accessor else {
            return Ok(bounds);
        };
        let (parent, stamp) = self
            .record_stamped(parent_accessor)?
            .filter(|(p, _)| !p.is_expired(now_ms))
            .ok_or(TokenError::ParentInvalid)?;
        if let Some(anchors) = anchors {
            anchors.push(Anchor {
                key: format!("{ACCESSOR_PREFIX}{parent_accessor}"),
                stamp,
            });
        }
        if parent.is_delegated() {
            return Err(TokenError::InvalidRequest(
                "a delegated token cannot issue child tokens or be exchanged again",
            ));
        }
        if parent.uses_total != 0 {
            return Err(TokenError::InvalidRequest(
                "a token with a use limit cannot issue child tokens",
            ));
        }
        if !parent.policies.iter().any(|p| p == ROOT_POLICY) {
            if let Some(extra) = policies.iter().find(|p| !parent.policies.contains(p)) {
                return Err(TokenError::NotSubset(extra.clone()));
            }
        }
        // A child is bound at least as tightly as its parent.
        let parent_cidrs = parent.cidr_blocks()?;
        if !parent_cidrs.is_empty() {
            if bounds.cidrs.is_empty() {
                bounds.cidrs = parent_cidrs;
            } else if !bounds
                .cidrs
                .iter()
                .all(|c| parent_cidrs.iter().any(|outer| c.within(outer)))
            {
                return Err(TokenError::CidrNotSubset);
            }
        }
        bounds.cap_ms = min_time(bounds.cap_ms, parent.max_expiry_ms);
        if anchors.is_some() && !parent.parent_accessor.is_empty() {
            // The tokens above the parent: checked, with the parent's own
            // record, when the child's record is written (`store_issued`).
            bounds.lineage = std::iter::once(&parent.parent_accessor)
                .chain(&parent.lineage)
                .take(MAX_LINEAGE)
                .cloned()
                .collect();
        }
        Ok(bounds)
    }

    /// A new token: its secret, its accessor (derived from it) and its hash.
    /// An accessor already stored (143 random bits: never seen) is refused
    /// rather than overwritten, but not here: no read checks that it is
    /// new; the record's write does
    /// (`store_issued` writes it only where no record is), in the same
    /// step on sled and in the same transaction on etcd (a root token on
    /// sled: a read, then its atomic batch).
    fn mint(&self) -> Result<Minted, TokenError> {
        #[cfg(test)]
        let token = {
            let replay = self.inner.hooks.replay_mint.lock();
            match replay.unwrap_or_else(|e| e.into_inner()).take() {
                Some(text) => TokenSecret::parse(&text).map_err(|_| TokenError::Random)?,
                None => TokenSecret::generate().map_err(|_| TokenError::Random)?,
            }
        };
        #[cfg(not(test))]
        let token = TokenSecret::generate().map_err(|_| TokenError::Random)?;
        let accessor = self.derive_accessor(token.expose())?;
        let hash = self.hash(token.expose())?;
        Ok(Minted {
            token,
            accessor,
            hash,
        })
    }

    /// A minted token's record (not stored yet).
    fn new_record(
        &self,
        minted: Minted,
        req: &TokenRequest,
        policies: Vec<String>,
        cidrs: Vec<Cidr>,
        life: Lifetime,
        now_ms: u64,
    ) -> (TokenSecret, TokenRecord) {
        let Minted {
            token,
            accessor,
            hash,
        } = minted;
        let record = TokenRecord {
            accessor,
            identity: req.identity.clone(),
            policies,
            created_at_ms: now_ms,
            expires_at_ms: life.expires_at_ms,
            ttl_ms: life.ttl_ms,
            max_expiry_ms: life.max_expiry_ms,
            uses_remaining: req.uses,
            uses_total: req.uses,
            cidrs: cidrs.iter().map(|c| c.to_string()).collect(),
            parent_accessor: req.parent_accessor.clone().unwrap_or_default(),
            method: req.method.to_owned(),
            hash,
            max_ttl_ms: duration_ms(req.max_ttl),
            hard_expiry_ms: req.hard_expiry_ms.unwrap_or(0),
            derived: true,
            ..TokenRecord::default()
        };
        (token, record)
    }

    /// Writes a new token's index entries and record, in the order a crash
    /// may cut (see `Barrier::write_in_order`): the index entry first (its
    /// value names the parent), so that whatever prefix survives is found
    /// and removed by the sweeper; the record last, so that a token is
    /// usable only once its index entries are. Returns false, having
    /// written nothing that lasts, when an anchor's record changed or went
    /// (on a shared store).
    fn store_issued(&self, record: &TokenRecord, anchors: &[Anchor]) -> Result<bool, TokenError> {
        let encoded = record.encode_to_vec();
        let acc_key = format!("{ACCESSOR_PREFIX}{}", record.accessor);
        let links = own_links(record);
        let mut ops: Vec<PlainOp<'_>> = links
            .iter()
            .map(|(key, value)| PlainOp::Put(key, value))
            .collect();
        ops.push(PlainOp::Put(&acc_key, &encoded));
        // Another process on a shared store (etcd) may be revoking the
        // parent or actor: it holds no lock of ours. The record, which makes
        // the token usable, is written only if their records are still the
        // ones read, in the same transaction; a revocation marks a token's
        // record (which changes it) before it reads its children
        // (`mark_tree`), so a child either fails here or is read there.
        // (No anchors on a store one process owns: its write lock does it.)
        // The lineage's marks are checked in it too: a revocation marks its
        // root first, so from then on no child is written anywhere below
        // it, however deep.
        let unmarked: Vec<String> = record.lineage.iter().map(|a| revoking_key(a)).collect();
        // The record itself is written only where none is: a second token
        // with the same accessor (a random generator that repeats itself)
        // must not take over the first one's record.
        let expect: Vec<(&str, Option<&Stamp>)> = anchors
            .iter()
            .map(|a| (a.key.as_str(), Some(&a.stamp)))
            .chain(unmarked.iter().map(|key| (key.as_str(), None)))
            .chain(std::iter::once((acc_key.as_str(), None)))
            .collect();
        let anchored = expect.len() > 1;
        if record.expires_at_ms != 0 {
            // The head first: a head earlier than the entries is harmless,
            // an entry the heads do not cover would be found only after a
            // restart.
            self.heads().lower(
                &hex::encode(record.identity.as_bytes()),
                record.expires_at_ms,
            );
            let Some((last, links)) = ops.split_last() else {
                unreachable!("the record is always the last operation")
            };
            if !anchored && self.barrier().is_shared_store() {
                // One transaction for the entries and the record (on etcd
                // a compare-and-swap would be a second, ungrouped one).
                if !self.barrier().batch_if(&expect, &ops)? {
                    return Err(self.taken(&acc_key, &[])?);
                }
            } else {
                self.barrier().write_in_order(links)?;
                #[cfg(test)]
                if anchored {
                    self.inner.hooks.before_anchored_write.run();
                }
                let written = match anchored {
                    true => self
                        .barrier()
                        .batch_if(&expect, std::slice::from_ref(last))?,
                    false => self
                        .barrier()
                        .compare_and_swap(&acc_key, None, Some(&encoded))?,
                };
                if !written {
                    if anchored {
                        if let Some(e) = self.taken_or_moved(&acc_key, links)? {
                            return Err(e);
                        }
                        self.remove_unanchored(links);
                        return Ok(false);
                    }
                    return Err(self.taken(&acc_key, links)?);
                }
            }
            self.expiry_added(record.expires_at_ms);
        } else if !self.barrier().batch_if(&expect, &ops)? {
            // Nothing would sweep a partial write of a token that never
            // expires (root tokens): those stay atomic. (On sled the check
            // and the write are two steps, and a root issue takes no lock.)
            if let Some(e) = self.taken_or_moved(&acc_key, &[])? {
                return Err(e);
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// After a conditional write of a new record failed where only the
    /// accessor's absence was expected: [`Self::taken_or_moved`]. Found
    /// gone again (the other token revoked meanwhile), the entries `written`
    /// are removed; the accessor is refused all the same.
    fn taken(&self, acc_key: &str, written: &[PlainOp<'_>]) -> Result<TokenError, TokenError> {
        if let Some(e) = self.taken_or_moved(acc_key, written)? {
            return Ok(e);
        }
        self.remove_unanchored(written);
        Ok(TokenError::Random)
    }

    /// After a conditional write of a new record failed: the error to
    /// return if its accessor is taken (a random generator that repeated
    /// itself; no retry can help), `None` if an anchor moved instead. Where
    /// it is taken, the index entries `written` for the refused token are
    /// put back as the other token's own were, or removed where they are
    /// not its own: left, they would end it with another identity's or
    /// parent's revocation.
    fn taken_or_moved(
        &self,
        acc_key: &str,
        written: &[PlainOp<'_>],
    ) -> Result<Option<TokenError>, TokenError> {
        let Some(raw) = self.barrier().get(acc_key)? else {
            return Ok(None);
        };
        let other = TokenRecord::decode(raw.as_slice()).map_err(|_| TokenError::Corrupt)?;
        let own = own_links(&other);
        let undo: Vec<PlainOp<'_>> = written
            .iter()
            .map(|op| {
                let key = match op {
                    PlainOp::Put(key, _) | PlainOp::Delete(key) => *key,
                };
                match own.iter().find(|(k, _)| k == key) {
                    Some((_, value)) => PlainOp::Put(key, value.as_slice()),
                    None => PlainOp::Delete(key),
                }
            })
            .collect();
        // Read once. A renewal of the other token in this instant moves its
        // `tokens/ttl/` entry: an old one put back is swept; were the refused
        // token's entry the same as the new one (same identity, the same
        // millisecond of expiry), it would be removed, and the other token
        // would end only at its record's expiry, unswept and out of reach
        // of its identity's revocation. Both need the generator repeated.
        if !undo.is_empty() {
            if let Err(e) = self.barrier().batch(&undo) {
                tracing::warn!(error = %e, "could not undo the index entries of a refused repeated token");
                return Err(e.into());
            }
        }
        Ok(Some(TokenError::Random))
    }

    /// Deletes the index entries of a token whose record was not written
    /// (its parent or actor changed or went). Nothing reaches them; if
    /// this fails the sweeper removes them after their expiry.
    fn remove_unanchored(&self, written: &[PlainOp<'_>]) {
        let deletes: Vec<PlainOp<'_>> = written
            .iter()
            .map(|op| match op {
                PlainOp::Put(key, _) | PlainOp::Delete(key) => PlainOp::Delete(key),
            })
            .collect();
        if let Err(e) = self.barrier().batch(&deletes) {
            tracing::warn!(error = %e, "could not remove the index entries of a token not issued; the sweeper will");
        }
    }

    /// Checks a token for one use: known, not expired, from an allowed
    /// source; counts the use of a limited token (the last one revokes it).
    pub fn use_token(
        &self,
        token: &str,
        source: Option<IpAddr>,
        now_ms: u64,
    ) -> Result<TokenUse, TokenError> {
        let fresh = self.inner.barrier.cache_fence();
        self.use_token_fenced(token, source, now_ms, fresh)
    }

    /// Whether the caches may serve a request starting now
    /// (`Barrier::cache_fence`): taken once per request and handed to
    /// [`Self::use_token_fenced`] and the policy store.
    pub fn cache_fence(&self) -> bool {
        self.inner.barrier.cache_fence()
    }

    /// [`Self::use_token`] for a request whose cache fence was taken at its
    /// start: `fresh` false reads the record from storage.
    pub fn use_token_fenced(
        &self,
        token: &str,
        source: Option<IpAddr>,
        now_ms: u64,
        fresh: bool,
    ) -> Result<TokenUse, TokenError> {
        let tag = self.with_keys(|keys| Ok(cache::tag(&keys.hash, token)))?;
        let generation = self.inner.verified.generation();
        if fresh {
            if let Some(hit) = self.inner.verified.get(&tag, source, now_ms) {
                return hit;
            }
        }
        let record = self.find(token)?.ok_or(TokenError::Invalid)?;
        let accessor = record.accessor.clone();
        if record.is_expired(now_ms) {
            // Do not wait for the sweeper; a failure here is the sweeper's job.
            // A token marked by a revocation is left to it (or, if it was cut
            // short, to the sweeper): a use must not start another.
            if !record.revoking {
                let _ = self.revoke(&accessor);
            }
            return Err(TokenError::Invalid);
        }
        let cidrs = record.cidr_blocks()?;
        if !Cidr::any_contains(&cidrs, source) {
            return Err(TokenError::SourceNotAllowed);
        }
        if record.uses_remaining == 0 {
            // On a shared store the cache is filled only where the store's
            // watch empties it (`storage::coherence`); a hit is used only
            // after the request's fence.
            if !self.inner.barrier.is_shared_store() || self.inner.barrier.coherence().is_some() {
                self.inner.verified.insert(tag, &record, cidrs, generation);
            }
            return Ok(TokenUse {
                record: Arc::new(record),
                counted: false,
                last_use: false,
                audit_mac: None,
            });
        }
        let (record, last_use) = self.count_use(&accessor, now_ms)?;
        Ok(TokenUse {
            record: Arc::new(record),
            counted: true,
            last_use,
            audit_mac: None,
        })
    }

    /// Counts one use of a limited token by compare-and-swap on its record,
    /// so that uses on several nodes (etcd) never share a count: each
    /// counted use wrote a record another use must have read. The last use
    /// marks the record `spent` the same way (every node refuses it from
    /// then on) and then revokes the token. A conflict means another use,
    /// renewal or revocation won: read again and retry. The flag says the
    /// use was the last.
    fn count_use(&self, accessor: &str, now_ms: u64) -> Result<(TokenRecord, bool), TokenError> {
        let _guard = self.inner.writes.lock().unwrap_or_else(|e| e.into_inner());
        let acc_key = format!("{ACCESSOR_PREFIX}{accessor}");
        for _ in 0..USE_ATTEMPTS {
            let Some((raw, stamp)) = self.barrier().get_stamped(&acc_key)? else {
                return Err(TokenError::Invalid);
            };
            let mut record =
                TokenRecord::decode(raw.as_slice()).map_err(|_| TokenError::Corrupt)?;
            if record.is_expired(now_ms) {
                return Err(TokenError::Invalid);
            }
            match record.uses_remaining {
                0 => return Ok((record, false)),
                1 => {
                    let expires_at_ms = record.expires_at_ms;
                    if !self.mark_spent(&acc_key, &stamp, &mut record, now_ms)? {
                        continue;
                    }
                    self.revoke_locked(accessor)?;
                    // The use itself sees the token as it was before the mark.
                    record.expires_at_ms = expires_at_ms;
                    record.spent = false;
                    record.uses_remaining = 0;
                    return Ok((record, true));
                }
                n => {
                    record.uses_remaining = n - 1;
                    let encoded = record.encode_to_vec();
                    if (self.barrier()).compare_and_swap(&acc_key, Some(&stamp), Some(&encoded))? {
                        return Ok((record, false));
                    }
                }
            }
        }
        Err(TokenError::Barrier(BarrierError::Storage(
            crate::storage::StorageError::Busy(
                "the token's use count changed at every attempt; try again".into(),
            ),
        )))
    }

    /// Marks `record` (read at `stamp`) `spent` by compare-and-swap, and
    /// makes it due for the sweeper at `now_ms`: its expiry becomes `now_ms`
    /// and its index entry moves there. So if the revocation that follows is
    /// cut short (a crash, a storage error), the sweeper finishes it at its
    /// next pass, and after a restart right after it loaded the index (on
    /// etcd, on the leader), instead of at the token's old expiry (never, for
    /// a token that never expires). Until then the token itself is refused
    /// everywhere; its children work until the sweep.
    ///
    /// Write order, each prefix harmless: the new index entry (an entry whose
    /// record says otherwise is stale, and the sweeper drops it), the record
    /// by compare-and-swap, then the old entry's delete (left behind by a
    /// crash: stale, dropped the same way). `false`: another write won the
    /// compare-and-swap; nothing of the record changed.
    fn mark_spent(
        &self,
        acc_key: &str,
        stamp: &crate::barrier::Stamp,
        record: &mut TokenRecord,
        now_ms: u64,
    ) -> Result<bool, TokenError> {
        let due = now_ms.max(1);
        let (old_key, new_key, value) = if record.derived {
            (
                Some(ttl_key(
                    &record.identity,
                    record.expires_at_ms,
                    &record.accessor,
                )),
                ttl_key(&record.identity, due, &record.accessor),
                record.parent_accessor.clone(),
            )
        } else {
            (
                (record.expires_at_ms != 0)
                    .then(|| expiry_key(record.expires_at_ms, &record.accessor)),
                expiry_key(due, &record.accessor),
                String::new(),
            )
        };
        let old_key = old_key.filter(|old| *old != new_key);
        if record.derived {
            self.heads()
                .lower(&hex::encode(record.identity.as_bytes()), due);
        }
        self.barrier().put(&new_key, value.as_bytes())?;
        let before = (record.spent, record.expires_at_ms);
        record.spent = true;
        record.expires_at_ms = due;
        let spent = record.encode_to_vec();
        if !(self.barrier()).compare_and_swap(acc_key, Some(stamp), Some(&spent))? {
            (record.spent, record.expires_at_ms) = before;
            return Ok(false);
        }
        if let Some(old) = old_key {
            self.barrier().delete(&old)?;
        }
        self.expiry_added(due);
        Ok(true)
    }

    /// Test hook: the state a crash leaves between the last use's `spent`
    /// mark and its revocation. Counts the last use of the limited token
    /// `accessor` exactly as a use does, marks it spent, and stops there.
    /// Fails unless the token has exactly one use left.
    #[doc(hidden)]
    pub fn danger_test_mark_spent_without_revoking(
        &self,
        accessor: &str,
        now_ms: u64,
    ) -> Result<(), TokenError> {
        let _guard = self.inner.writes.lock().unwrap_or_else(|e| e.into_inner());
        let acc_key = format!("{ACCESSOR_PREFIX}{accessor}");
        let (raw, stamp) = self
            .barrier()
            .get_stamped(&acc_key)?
            .ok_or(TokenError::NotFound)?;
        let mut record = TokenRecord::decode(raw.as_slice()).map_err(|_| TokenError::Corrupt)?;
        if record.uses_remaining != 1 || record.is_expired(now_ms) {
            return Err(TokenError::InvalidRequest("not a token with one use left"));
        }
        if !self.mark_spent(&acc_key, &stamp, &mut record, now_ms)? {
            return Err(TokenError::InvalidRequest("the record changed meanwhile"));
        }
        let _forget = self.inner.verified.invalidate_on_drop([accessor]);
        Ok(())
    }

    /// Test hook: the state a crash leaves right after a revocation's marks
    /// (a shared store). Marks the tree under `accessor` exactly as a
    /// revocation does, then stops (deletes nothing); returns how many marks
    /// it wrote. Refused on a store one process owns, which has no marks.
    #[doc(hidden)]
    pub fn danger_test_mark_without_revoking(&self, accessor: &str) -> Result<u32, TokenError> {
        if !self.barrier().is_shared_store() {
            return Err(TokenError::InvalidRequest(
                "marks are written on a shared store only",
            ));
        }
        let _guard = self.inner.writes.lock().unwrap_or_else(|e| e.into_inner());
        let max_ops = REVOKE_BATCH_OPS.min(self.barrier().max_batch_ops());
        let marked_at = self.inner.clock.now_ms();
        Ok(self.mark_tree(accessor, marked_at, false, max_ops)?.count)
    }

    /// The record of a token, by its text; `None` if unknown or expired.
    pub fn lookup_token(&self, token: &str, now_ms: u64) -> Result<Option<TokenInfo>, TokenError> {
        Ok(self
            .find(token)?
            .filter(|r| !r.is_expired(now_ms))
            .map(|r| r.info()))
    }

    /// The record of a token, by accessor; `None` if unknown or expired.
    pub fn lookup_accessor(
        &self,
        accessor: &str,
        now_ms: u64,
    ) -> Result<Option<TokenInfo>, TokenError> {
        Ok(self
            .record(accessor)?
            .filter(|r| !r.is_expired(now_ms))
            .map(|r| r.info()))
    }

    /// The accessor of a token text, if the token is known.
    pub fn accessor_for(&self, token: &str) -> Result<Option<String>, TokenError> {
        Ok(self.find(token)?.map(|record| record.accessor))
    }

    /// Extends a token's life to now + `increment` (default: its TTL), never
    /// past its maximum life. A token that never expires is left as it is.
    pub fn renew(
        &self,
        accessor: &str,
        increment: Option<Duration>,
        now_ms: u64,
    ) -> Result<TokenInfo, TokenError> {
        let _guard = self.inner.writes.lock().unwrap_or_else(|e| e.into_inner());
        if self.inner.barrier.is_shared_store() {
            return self.renew_shared(accessor, increment, now_ms);
        }
        let mut record = self
            .record(accessor)?
            .filter(|r| !r.is_expired(now_ms))
            .ok_or(TokenError::NotFound)?;
        if record.expires_at_ms == 0 {
            return Ok(record.info());
        }
        let increment = increment.map_or(record.ttl_ms, duration_ms);
        if increment == 0 {
            return Err(TokenError::InvalidRequest(
                "the increment must be at least 1s",
            ));
        }
        let expires = min_time(now_ms.saturating_add(increment), record.max_expiry_ms);
        let _forget = self.inner.verified.invalidate_on_drop([accessor]);
        let (old_key, new_key) = if record.derived {
            (
                ttl_key(&record.identity, record.expires_at_ms, accessor),
                ttl_key(&record.identity, expires, accessor),
            )
        } else {
            (
                expiry_key(record.expires_at_ms, accessor),
                expiry_key(expires, accessor),
            )
        };
        let value = if record.derived {
            record.parent_accessor.clone()
        } else {
            String::new()
        };
        record.expires_at_ms = expires;
        let acc_key = format!("{ACCESSOR_PREFIX}{accessor}");
        let encoded = record.encode_to_vec();
        self.barrier().batch(&[
            PlainOp::Delete(&old_key),
            PlainOp::Put(&new_key, value.as_bytes()),
            PlainOp::Put(&acc_key, &encoded),
        ])?;
        if record.derived {
            self.heads()
                .lower(&hex::encode(record.identity.as_bytes()), expires);
        }
        self.expiry_added(expires);
        Ok(record.info())
    }

    /// `renew` on a shared store: the record is written by compare-and-swap
    /// (a plain write could undo a use counted meanwhile on another node).
    /// The new expiry entry is written first and the old one removed last,
    /// so a crash or a lost race leaves at most a stale entry, which the
    /// sweeper drops.
    /// Caller holds `writes`.
    fn renew_shared(
        &self,
        accessor: &str,
        increment: Option<Duration>,
        now_ms: u64,
    ) -> Result<TokenInfo, TokenError> {
        let acc_key = format!("{ACCESSOR_PREFIX}{accessor}");
        for _ in 0..USE_ATTEMPTS {
            let Some((raw, stamp)) = self.barrier().get_stamped(&acc_key)? else {
                return Err(TokenError::NotFound);
            };
            let mut record =
                TokenRecord::decode(raw.as_slice()).map_err(|_| TokenError::Corrupt)?;
            if record.is_expired(now_ms) {
                return Err(TokenError::NotFound);
            }
            if record.expires_at_ms == 0 {
                return Ok(record.info());
            }
            let increment = increment.map_or(record.ttl_ms, duration_ms);
            if increment == 0 {
                return Err(TokenError::InvalidRequest(
                    "the increment must be at least 1s",
                ));
            }
            let expires = min_time(now_ms.saturating_add(increment), record.max_expiry_ms);
            let (old_key, new_key, value) = if record.derived {
                (
                    ttl_key(&record.identity, record.expires_at_ms, accessor),
                    ttl_key(&record.identity, expires, accessor),
                    record.parent_accessor.clone(),
                )
            } else {
                (
                    expiry_key(record.expires_at_ms, accessor),
                    expiry_key(expires, accessor),
                    String::new(),
                )
            };
            let moved = old_key != new_key;
            if moved {
                self.barrier().put(&new_key, value.as_bytes())?;
            }
            record.expires_at_ms = expires;
            let encoded = record.encode_to_vec();
            #[cfg(test)]
            self.inner.hooks.before_renew_write.run();
            // Conditional on the record read: a revocation's mark written
            // meanwhile is never written over (the next read refuses it).
            if !(self.barrier()).compare_and_swap(&acc_key, Some(&stamp), Some(&encoded))? {
                // The entry just written stays: another node's renewal may
                // have written the same one, and a stale entry is harmless
                // (the sweeper checks the record and drops it).
                continue;
            }
            if moved {
                self.barrier().delete(&old_key)?;
            }
            if record.derived {
                self.heads()
                    .lower(&hex::encode(record.identity.as_bytes()), expires);
            }
            self.expiry_added(expires);
            return Ok(record.info());
        }
        Err(TokenError::Barrier(BarrierError::Storage(
            crate::storage::StorageError::Busy(
                "the token record changed at every attempt; try again".into(),
            ),
        )))
    }

    /// The token a lineage without an inventory identity (the root
    /// token's: every token it issues, and their children, is `root`) is
    /// counted under for per-identity budgets: the ancestor of `accessor`
    /// issued directly by a token that has no parent, or `accessor` itself
    /// when it has no parent or was issued so. Walks at most 64 levels up.
    pub fn lineage_head(&self, accessor: &str) -> Result<String, TokenError> {
        let mut current = accessor.to_owned();
        for _ in 0..64 {
            let Some(record) = self.record(&current)? else {
                break;
            };
            if record.parent_accessor.is_empty() {
                break;
            }
            let Some(parent) = self.record(&record.parent_accessor)? else {
                break;
            };
            if parent.parent_accessor.is_empty() {
                break;
            }
            current = record.parent_accessor;
        }
        Ok(current)
    }

    /// Whether `ancestor` is a strict ancestor of `accessor` (its parent,
    /// grandparent, ...). Walks at most 64 levels up.
    pub fn is_descendant(&self, accessor: &str, ancestor: &str) -> Result<bool, TokenError> {
        let mut current = accessor.to_owned();
        for _ in 0..64 {
            let Some(record) = self.record(&current)? else {
                return Ok(false);
            };
            if record.parent_accessor.is_empty() {
                return Ok(false);
            }
            if record.parent_accessor == ancestor {
                return Ok(true);
            }
            current = record.parent_accessor;
        }
        Ok(false)
    }

    /// Revokes a token and, recursively, its children; returns how many
    /// tokens were removed (0 if it was already gone). On a shared store:
    /// how many this revocation marked, so two revocations of overlapping
    /// trees on two nodes count each token once.
    pub fn revoke(&self, accessor: &str) -> Result<u32, TokenError> {
        let _guard = self.inner.writes.lock().unwrap_or_else(|e| e.into_inner());
        self.revoke_locked(accessor)
    }

    fn revoke_locked(&self, accessor: &str) -> Result<u32, TokenError> {
        self.revoke_tree(accessor, false)
    }

    /// Revokes the tree under `accessor`. On a shared store it marks the
    /// tree first (`mark_tree`); `finishing` (the sweeper, after a
    /// revocation cut short) also counts the tokens it finds marked already.
    fn revoke_tree(&self, accessor: &str, finishing: bool) -> Result<u32, TokenError> {
        // etcd takes at most 127 operations in one atomic batch.
        let max_ops = REVOKE_BATCH_OPS.min(self.barrier().max_batch_ops());
        let plan = if self.barrier().is_shared_store() {
            let marked_at = self.inner.clock.now_ms();
            self.mark_tree(accessor, marked_at, finishing, max_ops)?
        } else {
            self.revoke_plan(accessor, max_ops)?
        };
        #[cfg(test)]
        self.inner.hooks.after_revoke_plan.run();
        self.apply_revoke(&plan.batches)?;
        Ok(plan.count)
    }

    /// Applies a revocation's batches in order and tells the verified-token
    /// cache and the listener of the tokens they removed.
    fn apply_revoke(&self, batches: &[Vec<String>]) -> Result<(), TokenError> {
        let _forget = (self.inner.verified).invalidate_on_drop(revoked_accessors(batches));
        for batch in batches {
            let ops: Vec<PlainOp<'_>> = batch.iter().map(|k| PlainOp::Delete(k)).collect();
            self.barrier().batch(&ops)?;
        }
        if let Some(listener) = self.inner.revoked.get() {
            let gone: Vec<&str> = revoked_accessors(batches).collect();
            listener.tokens_revoked(&gone);
        }
        Ok(())
    }

    /// The deletes that revoke `root` and its descendants, as batches to
    /// apply in order, and how many tokens they remove (a store one process
    /// owns: its write lock keeps child issues out meanwhile).
    ///
    /// Each token's keys form one group: its record and `tokens/ttl/` entry
    /// (or, stored before, its hash, identity and expiry entries) together
    /// with the `tokens/children/...` link that leads to it. Groups are
    /// ordered children before parents and never split across batches (a
    /// batch is atomic), so if a batch fails part-way every token still
    /// usable keeps the link from its parent, which is still there too:
    /// revoking again finds it.
    fn revoke_plan(&self, root: &str, max_ops: usize) -> Result<RevokePlan, TokenError> {
        self.walk_tree(root, max_ops, |acc| {
            let record = self.record(acc)?;
            let counted = record.is_some();
            Ok((record, counted))
        })
    }

    /// The walk of [`Self::revoke_plan`] and [`Self::mark_tree`]: `visit`
    /// reads (or marks) each token reached, and says whether it counts,
    /// before that token's children are read; returns the deletes, one
    /// group per token (its keys with the link that found it), as ordered
    /// batches ([`revoke_batches`]).
    fn walk_tree(
        &self,
        root: &str,
        max_ops: usize,
        mut visit: impl FnMut(&str) -> Result<(Option<TokenRecord>, bool), TokenError>,
    ) -> Result<RevokePlan, TokenError> {
        // (accessor, the link key it was found by), each after its parent.
        let mut pending: Vec<(String, Option<String>)> = vec![(root.to_owned(), None)];
        let mut seen = HashSet::new();
        let mut groups: Vec<Vec<String>> = Vec::new();
        let mut count = 0u32;
        while let Some((acc, link)) = pending.pop() {
            if !seen.insert(acc.clone()) {
                // Reached twice (a corrupt index, or a delegated token under
                // its parent and its actor): the extra link goes in a group
                // of its own, deleted before the token's group; the link
                // that found it first stays until that group.
                if let Some(link) = link {
                    groups.push(vec![link]);
                }
                continue;
            }
            let (record, counted) = visit(&acc)?;
            if counted {
                count = count.saturating_add(1);
            }
            for (child, child_link) in self.children_links(&acc)? {
                pending.push((child, Some(child_link)));
            }
            let mut group: Vec<String> = link.into_iter().collect();
            if let Some(record) = &record {
                push_token_keys(&acc, record, &mut group);
            }
            if !group.is_empty() {
                groups.push(group);
            }
        }
        Ok(RevokePlan {
            count,
            batches: revoke_batches(groups, max_ops),
        })
    }

    /// On a shared store, the first step of a revocation, and its plan: marks
    /// every token of the tree under `root` `revoking`, top-down, reading a
    /// token's children only once it is marked (the marks say `marked_at`,
    /// for the sweeper); returns the deletes, grouped
    /// and ordered as [`Self::revoke_plan`]'s, and how many marks it wrote
    /// (with `finishing`, also the tokens it found marked).
    ///
    /// Why this closes the tree: a child's record is written only if its
    /// parent's record is still the one read (`store_issued`), and a mark
    /// changes it. So a child whose record is not stored when its parent's
    /// children are read (after the mark) never will be; the link to it goes
    /// with the tree. And from the root's mark on no token below it gets a
    /// child at all, however deep: each child issue also checks that none
    /// of its lineage is marked. What the walk read is therefore the whole
    /// tree, for good: no second look, and no chase (a holder issuing
    /// children of its newest child on other nodes is refused from the
    /// root's mark on). A token reached without a record is gone already,
    /// or its issue will never write it.
    ///
    /// Each mark is one transaction: the record rewritten `revoking`, with
    /// its `tokens/revoking/` entry ([`Self::mark`]). Every node refuses a
    /// marked token from that write on, and the sweeper finishes a
    /// revocation cut short after it (a crash).
    fn mark_tree(
        &self,
        root: &str,
        marked_at: u64,
        finishing: bool,
        max_ops: usize,
    ) -> Result<RevokePlan, TokenError> {
        self.walk_tree(root, max_ops, |acc| {
            let visited = match self.mark(acc, marked_at)? {
                Mark::Written(record) => (Some(record), true),
                Mark::Found(record) => (Some(record), finishing),
                Mark::NoRecord => (None, false),
            };
            #[cfg(test)]
            self.inner.hooks.after_mark.run();
            // Only after the mark are the token's children read (by the
            // walk): they are all it will have.
            Ok(visited)
        })
    }

    /// Marks the record of `acc` `revoking` (and `spent`) at `marked_at`,
    /// with its `tokens/revoking/` entry, in one transaction conditional on
    /// the record read; reads again when another write won (a renewal, a
    /// counted use, another revocation's mark, which it then reports).
    ///
    /// After `MARK_TRIES` lost tries the mark is written over the latest
    /// record read, unconditionally: a holder renewing its token on other
    /// nodes as fast as it can must not make its revocation fail. What that
    /// write may undo (a later expiry, a use counted) no longer matters for
    /// a token being revoked, and every write of a record that could follow
    /// it is conditional on the record it read, so nothing writes over the
    /// mark. (If the record went meanwhile, the mark writes it again, marked:
    /// refused, and deleted by this revocation or the sweeper.)
    fn mark(&self, acc: &str, marked_at: u64) -> Result<Mark, TokenError> {
        let acc_key = format!("{ACCESSOR_PREFIX}{acc}");
        let index_key = revoking_key(acc);
        let at = marked_at.to_be_bytes();
        // Forgotten here however the write ends; other nodes' caches by the
        // store's watch (the record changed), as for a delete.
        let _forget = self.inner.verified.invalidate_on_drop([acc]);
        let mut tries = 0;
        loop {
            let Some((mut record, stamp)) = self.record_stamped(acc)? else {
                return Ok(Mark::NoRecord);
            };
            if record.revoking {
                return Ok(Mark::Found(record));
            }
            record.revoking = true;
            record.spent = true;
            let encoded = record.encode_to_vec();
            let ops = [
                PlainOp::Put(&acc_key, &encoded),
                PlainOp::Put(&index_key, &at),
            ];
            #[cfg(test)]
            self.inner.hooks.before_mark_write.run();
            tries += 1;
            if tries > MARK_TRIES {
                self.barrier().batch(&ops)?;
                return Ok(Mark::Written(record));
            }
            if (self.barrier()).batch_if(&[(acc_key.as_str(), Some(&stamp))], &ops)? {
                return Ok(Mark::Written(record));
            }
        }
    }

    /// Whether a token of `lineage` is marked by a revocation (read after a
    /// child's conditional write failed, to tell a revocation above the
    /// parent from a renewal).
    fn lineage_revoking(&self, lineage: &[String]) -> Result<bool, TokenError> {
        for acc in lineage {
            if self.barrier().get(&revoking_key(acc))?.is_some() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The children linked under `acc`: (child accessor, link key).
    fn children_links(&self, acc: &str) -> Result<Vec<(String, String)>, TokenError> {
        let prefix = format!("{CHILDREN_PREFIX}{acc}/");
        Ok(self
            .barrier()
            .scan_keys(&prefix)?
            .into_iter()
            .filter_map(|key| Some((key.strip_prefix(&prefix)?.to_owned(), key.clone())))
            .collect())
    }

    /// Revokes every token (and its children) of this identity; returns how many.
    pub fn revoke_identity(&self, identity: &str, _now_ms: u64) -> Result<u32, TokenError> {
        let _guard = self.inner.writes.lock().unwrap_or_else(|e| e.into_inner());
        let mut count = 0u32;
        let prefix = ttl_prefix_hex(&hex::encode(identity.as_bytes()));
        for key in self.barrier().scan_keys(&prefix)? {
            match parse_ttl_key(&key) {
                Some((_, _, accessor)) => {
                    // No record: an issue still writing (which this must not
                    // undo: its record would then be found by nothing), or one
                    // a crash cut short. The sweeper drops the latter.
                    count = count.saturating_add(self.revoke_locked(accessor)?);
                }
                None => self.barrier().delete(&key)?,
            }
        }
        // Tokens stored before `tokens/ttl/`.
        let legacy = identity_prefix(identity);
        for key in self.barrier().scan_keys(&legacy)? {
            if let Some(accessor) = key.strip_prefix(&legacy) {
                count = count.saturating_add(self.revoke_locked(accessor)?);
            }
        }
        Ok(count)
    }

    /// How many unexpired tokens `identity` holds, counted from its expiry
    /// index (keys only: no record is read or decrypted), so a request may
    /// ask it. Tokens stored before the index (0.2.x) are not counted.
    pub fn live_count_of(&self, identity: &str, now_ms: u64) -> Result<usize, TokenError> {
        let prefix = ttl_prefix_hex(&hex::encode(identity.as_bytes()));
        Ok(self
            .barrier()
            .scan_keys(&prefix)?
            .iter()
            .filter_map(|key| parse_ttl_key(key))
            .filter(|(_, at, _)| *at > now_ms)
            .count())
    }

    /// Tokens whose total allowed life (max_ttl, or ttl when larger) exceeds
    /// `threshold`. Reads every live token: for the governance report, never
    /// for a request.
    pub fn long_lived(
        &self,
        threshold: Duration,
        now_ms: u64,
    ) -> Result<Vec<LongLived>, TokenError> {
        let threshold_ms = duration_ms(threshold);
        let mut out = Vec::new();
        for (_, raw) in self.barrier().scan_prefix(ACCESSOR_PREFIX)? {
            let record = TokenRecord::decode(raw.as_slice()).map_err(|_| TokenError::Corrupt)?;
            if record.is_expired(now_ms) {
                continue;
            }
            let life_ms = if record.max_expiry_ms == 0 {
                u64::MAX
            } else {
                record.max_ttl_ms.max(record.ttl_ms)
            };
            if life_ms > threshold_ms {
                out.push(LongLived {
                    accessor: record.accessor,
                    identity: record.identity,
                    ttl_seconds: if life_ms == u64::MAX {
                        u64::MAX
                    } else {
                        life_ms / 1000
                    },
                });
            }
        }
        Ok(out)
    }

    /// Revokes the tokens whose expiry has passed, at most `SWEEP_BATCH` of
    /// them per call, earliest identity first; returns the next expiry still
    /// ahead, if any. Reads only index heads: one key per identity the first
    /// time (`load_heads`), then the due part of each due identity.
    pub fn sweep(&self, now_ms: u64) -> Result<SweepOutcome, TokenError> {
        let marked = self.sweep_revoking(now_ms)?;
        if marked.more_due {
            return Ok(marked);
        }
        let legacy = self.sweep_legacy(now_ms)?;
        if legacy.more_due {
            return Ok(SweepOutcome {
                revoked: legacy.revoked.saturating_add(marked.revoked),
                ..legacy
            });
        }
        self.load_heads()?;
        let mut revoked = legacy.revoked.saturating_add(marked.revoked);
        let mut budget = SWEEP_BATCH;
        loop {
            let picked = self.heads().start_sweep(now_ms);
            let Some((at, identity)) = picked else {
                break;
            };
            let swept = self.sweep_identity(&identity, now_ms, budget);
            match swept {
                Ok((n, next, used)) => {
                    self.heads().finish_sweep(&identity, next);
                    revoked = revoked.saturating_add(n);
                    budget = budget.saturating_sub(used.max(1));
                }
                Err(e) => {
                    self.heads().finish_sweep(&identity, at);
                    return Err(e);
                }
            }
            if budget == 0 {
                return Ok(SweepOutcome {
                    revoked,
                    next_ms: None,
                    more_due: true,
                });
            }
        }
        let earliest = self.heads().earliest();
        let next = [legacy.next_ms, earliest, marked.next_ms]
            .into_iter()
            .flatten()
            .min();
        Ok(SweepOutcome {
            revoked,
            next_ms: next,
            more_due: false,
        })
    }

    /// On a shared store: finishes the revocation of each token listed under
    /// `tokens/revoking/` whose mark is older than `REVOKING_GRACE_MS` (a
    /// revocation cut short, most likely by a crash of its node; a younger
    /// one is left to the revocation still running), at most `SWEEP_BATCH`
    /// of them. Its `next_ms` is when to look again: when the first mark
    /// left comes of age, and at most `REVOKING_RECHECK_MS` from now (another
    /// node's mark wakes nothing here). Nothing on sled, which has no marks.
    fn sweep_revoking(&self, now_ms: u64) -> Result<SweepOutcome, TokenError> {
        if !self.barrier().is_shared_store() {
            return Ok(SweepOutcome {
                revoked: 0,
                next_ms: None,
                more_due: false,
            });
        }
        let entries = self.barrier().scan_range(
            REVOKING_PREFIX,
            &prefix_end(REVOKING_PREFIX),
            SWEEP_BATCH,
        )?;
        let mut revoked = 0u32;
        let mut next = now_ms.saturating_add(REVOKING_RECHECK_MS);
        for (key, value) in &entries {
            let accessor = key.strip_prefix(REVOKING_PREFIX).unwrap_or_default();
            let marked_at = <[u8; 8]>::try_from(value.as_slice()).map_or(0, u64::from_be_bytes);
            let due = marked_at.saturating_add(REVOKING_GRACE_MS);
            if due > now_ms {
                next = next.min(due);
                continue;
            }
            let _guard = self.inner.writes.lock().unwrap_or_else(|e| e.into_inner());
            match self.record(accessor)? {
                Some(record) if record.revoking && !accessor.is_empty() => {
                    // Deletes this entry with the token.
                    revoked = revoked.saturating_add(self.revoke_tree(accessor, true)?);
                }
                // The record went without its entry (deleted by a node that
                // does not know the index) or never had the mark: stale.
                _ => self.barrier().delete(key)?,
            }
        }
        Ok(SweepOutcome {
            revoked,
            next_ms: Some(next),
            more_due: entries.len() == SWEEP_BATCH,
        })
    }

    /// Sweeps the due head of one identity's `tokens/ttl/` entries (at most
    /// `budget`); returns what it revoked, the identity's next expiry
    /// (`now_ms` if more may be due, `NEVER` if none is left) and how many
    /// entries it handled.
    fn sweep_identity(
        &self,
        identity_hex: &str,
        now_ms: u64,
        budget: usize,
    ) -> Result<(u32, u64, usize), TokenError> {
        let prefix = ttl_prefix_hex(identity_hex);
        let entries = self
            .barrier()
            .scan_range(&prefix, &prefix_end(&prefix), budget)?;
        let mut revoked = 0u32;
        // The earliest time an entry left in its grace period is due again.
        let mut again = NEVER;
        for (used, (key, value)) in entries.iter().enumerate() {
            let Some((_, at, accessor)) = parse_ttl_key(key) else {
                self.barrier().delete(key)?;
                continue;
            };
            if at > now_ms {
                return Ok((revoked, at.min(again), used));
            }
            let _guard = self.inner.writes.lock().unwrap_or_else(|e| e.into_inner());
            // Look again under the lock: a renew may have moved the entry.
            match self.record(accessor)? {
                Some(record) if record.is_expired(now_ms) => {
                    revoked = revoked.saturating_add(self.revoke_locked(accessor)?);
                }
                // A renew moved it (this entry is stale), or nothing to do.
                Some(_) => {}
                // Revoked since the scan (with a parent, say): nothing left.
                None if self.barrier().get(key)?.is_none() => continue,
                // An issue still writing (it takes no lock) whose expiry
                // passed meanwhile: leave it to a later round.
                None if at.saturating_add(ORPHAN_GRACE_MS) > now_ms => {
                    again = again.min(at.saturating_add(ORPHAN_GRACE_MS));
                    continue;
                }
                // An issue cut short by a crash: the record was never
                // written, but its children link may have been.
                None => self.drop_orphans(accessor, value)?,
            }
            // Gone with the token already, or stale: make sure.
            self.barrier().delete(key)?;
        }
        let next = match (entries.len() == budget, again) {
            // Full: more may be due at once.
            (true, NEVER) => now_ms,
            // Full, with entries in their grace period at its start, which
            // the next scan reads again: not at once, but soon.
            (true, again) => again.min(now_ms.saturating_add(1000)),
            (false, again) => again,
        };
        Ok((revoked, next, entries.len()))
    }

    /// Fills the per-identity heads from storage, once: the first
    /// `tokens/ttl/` key of each identity, one read each.
    fn load_heads(&self) -> Result<(), TokenError> {
        if self.heads().loaded {
            return Ok(());
        }
        let end = prefix_end(TTL_PREFIX);
        let mut cursor = TTL_PREFIX.to_owned();
        loop {
            let first = self.barrier().scan_range(&cursor, &end, 1)?;
            let Some((key, _)) = first.first() else {
                break;
            };
            let Some((identity_hex, at, _)) = parse_ttl_key(key) else {
                // Not a key this store writes: step over it.
                cursor = format!("{key}\0");
                continue;
            };
            self.heads().lower(identity_hex, at);
            cursor = prefix_end(&ttl_prefix_hex(identity_hex));
        }
        self.heads().loaded = true;
        Ok(())
    }

    /// The index of tokens stored before `tokens/ttl/`: walked from its start
    /// until it is empty.
    fn sweep_legacy(&self, now_ms: u64) -> Result<SweepOutcome, TokenError> {
        let head = self
            .barrier()
            .scan_range(EXPIRY_PREFIX, EXPIRY_END, SWEEP_BATCH)?;
        let mut revoked = 0u32;
        for (key, _) in &head {
            let rest = key.strip_prefix(EXPIRY_PREFIX).unwrap_or_default();
            let (time, accessor) = rest.split_once('/').unwrap_or((rest, ""));
            let at = u64::from_str_radix(time, 16).unwrap_or(0);
            if at > now_ms {
                return Ok(SweepOutcome {
                    revoked,
                    next_ms: Some(at),
                    more_due: false,
                });
            }
            let _guard = self.inner.writes.lock().unwrap_or_else(|e| e.into_inner());
            // Look again under the lock: a renew may have moved the expiry.
            if self.record(accessor)?.is_some_and(|r| r.is_expired(now_ms)) {
                revoked = revoked.saturating_add(self.revoke_locked(accessor)?);
            }
            // Gone already, or a stale or bad entry: drop it.
            self.barrier().delete(key)?;
        }
        Ok(SweepOutcome {
            revoked,
            next_ms: None,
            more_due: head.len() == SWEEP_BATCH,
        })
    }

    /// Deletes the children link a `tokens/ttl/` entry's value names for
    /// `accessor`, whose record does not exist.
    fn drop_orphans(&self, accessor: &str, value: &[u8]) -> Result<(), TokenError> {
        match std::str::from_utf8(value) {
            Ok(parent) if !parent.is_empty() && !parent.contains('/') => {
                self.barrier()
                    .delete(&format!("{CHILDREN_PREFIX}{parent}/{accessor}"))?;
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The background sweeper: sleeps until the next expiry in the index (or
    /// a new, earlier one, or an unseal), revokes what is due, until
    /// `shutdown`.
    pub async fn run_sweeper(self, shutdown: Shutdown) {
        loop {
            if shutdown.is_triggered() {
                return;
            }
            let store = self.clone();
            let now = self.inner.clock.now_ms();
            // While it sweeps, no new token (all expire after `now`) wakes
            // it; what they add to the heads is looked at once it is done.
            self.inner.sweep_planned_ms.store(now, Ordering::Release);
            let outcome = tokio::task::spawn_blocking(move || store.sweep(now)).await;
            let swept = matches!(outcome, Ok(Ok(_)));
            let wait = match outcome {
                Ok(Ok(o)) if o.more_due => Some(Duration::ZERO),
                Ok(Ok(SweepOutcome {
                    next_ms: Some(next),
                    ..
                })) => Some(Duration::from_millis(next.saturating_sub(now)).min(MAX_SLEEP)),
                Ok(Ok(_)) => None,
                Ok(Err(TokenError::Barrier(BarrierError::Sealed)))
                | Ok(Err(TokenError::Barrier(BarrierError::NotInitialized))) => None,
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "token expiry sweep failed; retrying");
                    Some(Duration::from_secs(5))
                }
                Err(e) => {
                    tracing::warn!(error = %e, "token expiry sweep panicked; retrying");
                    Some(Duration::from_secs(5))
                }
            };
            let planned = wait.map_or(u64::MAX, |d| now.saturating_add(duration_ms(d)));
            self.inner
                .sweep_planned_ms
                .store(planned, Ordering::Release);
            // A head lowered after the sweep last read them, before `planned`
            // was stored, woke nobody: look again at once.
            if swept && self.heads().earliest().is_some_and(|at| at < planned) {
                continue;
            }
            let sleep = async {
                match wait {
                    Some(d) => self.inner.clock.sleep(d).await,
                    None => std::future::pending::<()>().await,
                }
            };
            tokio::select! {
                _ = sleep => {}
                _ = self.inner.wake.notified() => {}
                _ = shutdown.wait() => return,
            }
        }
    }
}

/// What one sweep step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SweepOutcome {
    pub revoked: u32,
    /// The first expiry still in the future; on a shared store, no later
    /// than the next look at `tokens/revoking/`.
    pub next_ms: Option<u64>,
    /// The batch was full: sweep again at once.
    pub more_due: bool,
}

#[cfg(test)]
mod tests;
