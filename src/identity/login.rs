//! Login: role-id + secret-id, client certificate, OIDC/JWT. Each method
//! checks the presented credential against the inventory and hands back a
//! [`Grant`] (who, which policies, how long at most); the caller issues the
//! token. Brute force is throttled here, in memory: repeated failures of one
//! role-id from one source, or from one source at all, lock that pair (or
//! that source) out for a back-off period (see [`ThrottleConfig`]), and
//! every failure is counted by identity and source for governance. On a
//! shared store (etcd) the counts are also shared between nodes, in bounded
//! batches (see [`super::shared_throttle`]).
//!
//! Owns no storage prefix: it reads and writes through [`IdentityStore`].
//! Time is a parameter.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use super::shared_throttle::{SharedThrottle, Stored};
use super::{Dn, IdentityError, IdentityRecord, IdentityStore};
use crate::oidc::{JwksCache, OidcError};
use crate::pki::{PkiError, PkiStore};

/// TTL of a login token when the request names none.
pub const DEFAULT_LOGIN_TTL: Duration = Duration::from_secs(60 * 60);
/// Longest life of a login token (and its renewals).
pub const MAX_LOGIN_TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Clock skew allowed on a JWT's `exp` and `nbf`.
pub const JWT_LEEWAY_SECS: i64 = 30;

/// Identity name under which failures of unknown credentials are counted.
pub const UNKNOWN_IDENTITY: &str = "(unknown)";

#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// Unknown role-id, wrong, expired, used-up or out-of-range secret-id,
    /// disabled or expired identity: all look the same to the caller.
    #[error("login failed: invalid credentials")]
    Invalid,
    #[error("too many failed logins; try again in {0} s")]
    Locked(u64),
    /// More attempts of this role-id from this source (or from this source)
    /// are being judged at once than it has failures left: none failed.
    #[error(
        "too many logins of this role-id from this address (or from this address) in flight \
         at once; try again in 1 s"
    )]
    Busy,
    #[error("no client certificate was presented on this connection")]
    NoCertificate,
    /// The presented chain no longer passes the check of a handshake made
    /// now: expired, revoked, or its CA no longer trusted.
    #[error("the client certificate is no longer valid (expired, revoked or untrusted)")]
    CertificateRefused,
    /// Issued by this PKI for another identity, or before its names were
    /// bound to this one.
    #[error(
        "this certificate was issued for another identity, or before its name was bound to this \
         one: issue a new one"
    )]
    IssuedForAnother,
    /// The PKI's inventory could not be read.
    #[error(transparent)]
    Inventory(PkiError),
    #[error("no identity is bound to this certificate")]
    UnboundCertificate,
    #[error("no enabled identity is bound to this token's claims")]
    UnboundToken,
    #[error("more than one identity is bound to this token's claims; make the bindings narrower")]
    Ambiguous,
    #[error("login failed: {0}")]
    Oidc(OidcError),
    /// The issuer's keys could not be had (a server-side problem).
    #[error("the issuer's key set is unavailable: {0}")]
    KeysUnavailable(OidcError),
    #[error(transparent)]
    Identity(#[from] IdentityError),
}

/// What a successful login entitles to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    pub identity: String,
    pub policies: Vec<String>,
    /// The token must not outlive this (identity expiry, JWT `exp`).
    pub hard_expiry_ms: Option<u64>,
    pub method: &'static str,
}

/// The TTL of a login token: `requested` (0: the default), capped.
pub fn token_ttl(requested_secs: u64) -> Duration {
    if requested_secs == 0 {
        DEFAULT_LOGIN_TTL
    } else {
        Duration::from_secs(requested_secs).min(MAX_LOGIN_TTL)
    }
}

fn min_expiry(a: Option<u64>, b: Option<u64>) -> Option<u64> {
    match (a, b) {
        (Some(x), Some(y)) => Some(x.min(y)),
        (x, None) => x,
        (None, y) => y,
    }
}

fn identity_expiry(record: &IdentityRecord) -> Option<u64> {
    (record.expires_at_ms != 0).then_some(record.expires_at_ms)
}

/// Brute-force limits.
///
/// Failures are counted per role-id *and source* together, and per source
/// alone; never per role-id alone. Knowing a role-id (which is not a secret)
/// therefore lets a caller lock out only itself: the service that owns the
/// role-id, logging in from another address, is not affected. There is no
/// global ceiling per role-id: a secret-id has 256 random bits, so spreading
/// guesses over many sources gains nothing, while such a ceiling would give
/// back the lock-out this design takes away. A source is an IPv4 address or
/// an IPv6 /64 (one host usually holds a whole /64); IPv4-mapped IPv6
/// addresses count as the IPv4 address.
#[derive(Debug, Clone, Copy)]
pub struct ThrottleConfig {
    /// Failures of one role-id from one source before that pair is locked out.
    pub role_source_failures: u32,
    /// Failures from one source, whatever the role-id or method, before the
    /// source is locked out (higher: many clients may share an address).
    pub source_failures: u32,
    /// Failures older than this are forgotten.
    pub window_ms: u64,
    /// First lock-out; doubles with each further failure, up to `max_backoff_ms`.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Entries (role-id and source pairs, sources) tracked at most: past it,
    /// the least recently touched entry is forgotten to make room.
    pub max_keys: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            role_source_failures: 5,
            source_failures: 20,
            window_ms: 15 * 60 * 1000,
            backoff_ms: 30 * 1000,
            max_backoff_ms: 15 * 60 * 1000,
            max_keys: 100_000,
        }
    }
}

/// Where a login came from, as the throttle counts it: an IPv4 address, an
/// IPv6 /64, or unknown (no peer address, e.g. over a Unix socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SourceNet {
    V4(std::net::Ipv4Addr),
    /// The upper 64 bits of an IPv6 address.
    V6(u64),
    Unknown,
}

impl SourceNet {
    pub fn of(source: Option<IpAddr>) -> Self {
        match source.map(|ip| ip.to_canonical()) {
            Some(IpAddr::V4(v4)) => Self::V4(v4),
            Some(IpAddr::V6(v6)) => Self::V6((u128::from(v6) >> 64) as u64),
            None => Self::Unknown,
        }
    }
}

/// What the throttle counts failures of.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ThrottleKey {
    /// One role-id (cut to 64 characters; real ones have 32) from one source.
    RoleSource(Box<str>, SourceNet),
    Source(SourceNet),
}

impl ThrottleKey {
    pub fn role_source(role_id: &str, source: SourceNet) -> Self {
        let cut: String = role_id.chars().take(64).collect();
        Self::RoleSource(cut.into_boxed_str(), source)
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Strikes {
    failures: u32,
    last_failure_ms: u64,
    locked_until_ms: u64,
    /// Attempts admitted and not yet settled.
    in_flight: u32,
    /// Position in the eviction order.
    touched: (u64, u64),
}

impl Strikes {
    /// Forgets failures older than the window (unless still locked).
    fn age(&mut self, now_ms: u64, window_ms: u64) {
        if self.failures != 0
            && now_ms.saturating_sub(self.last_failure_ms) >= window_ms
            && self.locked_until_ms <= now_ms
        {
            self.failures = 0;
        }
    }
}

#[derive(Debug, Default)]
struct ThrottleState {
    map: HashMap<ThrottleKey, Strikes>,
    /// (last touched ms, sequence) -> key: the oldest entry is evicted first.
    order: BTreeMap<(u64, u64), ThrottleKey>,
    seq: u64,
}

impl ThrottleState {
    /// The entry of `key`, made if missing (evicting the least recently
    /// touched entries past `max_keys`), marked as touched now.
    fn touch(&mut self, key: &ThrottleKey, now_ms: u64, max_keys: usize) -> &mut Strikes {
        self.seq += 1;
        let position = (now_ms, self.seq);
        if let Some(s) = self.map.get(key) {
            self.order.remove(&s.touched);
        } else {
            while self.map.len() >= max_keys.max(1) {
                let Some((_, oldest)) = self.order.pop_first() else {
                    break;
                };
                self.map.remove(&oldest);
            }
        }
        self.order.insert(position, key.clone());
        let s = self.map.entry(key.clone()).or_default();
        s.touched = position;
        s
    }
}

/// Why [`Throttle::admit`] refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Locked out after failures: seconds to wait.
    Locked(u64),
    /// As many attempts in flight as failures left (none need have failed):
    /// a burst is judged a few at a time.
    Busy,
}

/// Failure counts, lock-outs and attempts in flight, by [`ThrottleKey`].
///
/// Checking and counting are one step: [`Throttle::admit`] reserves a place
/// for the attempt under the same lock that checks the count, so a burst of
/// concurrent attempts cannot all pass the check before any failure is
/// counted. Of a key with `n` failures and limit `l`, at most `l - n`
/// attempts are admitted at once (one at a time after a lock-out expires).
#[derive(Debug, Default)]
pub struct Throttle {
    config: ThrottleConfig,
    state: Mutex<ThrottleState>,
}

/// An admitted login attempt: settle it with [`Attempt::failed`] or
/// [`Attempt::succeeded`]; dropped unsettled (the server could not decide),
/// it counts as neither.
#[derive(Debug)]
pub struct Attempt<'a> {
    throttle: &'a Throttle,
    keys: Vec<(ThrottleKey, u32)>,
    settled: bool,
}

impl Throttle {
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            state: Mutex::new(ThrottleState::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, ThrottleState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Admits an attempt counted under each `(key, limit)`, or refuses it
    /// while one of them is locked out ([`Refusal::Locked`]) or has as many
    /// attempts in flight as it has failures left ([`Refusal::Busy`]).
    pub fn admit(
        &self,
        keys: Vec<(ThrottleKey, u32)>,
        now_ms: u64,
    ) -> Result<Attempt<'_>, Refusal> {
        let cfg = self.config;
        let mut state = self.state();
        for (key, limit) in &keys {
            let limit = (*limit).max(1);
            if let Some(s) = state.map.get_mut(key) {
                s.age(now_ms, cfg.window_ms);
                if s.locked_until_ms > now_ms {
                    return Err(Refusal::Locked(
                        (s.locked_until_ms - now_ms).div_ceil(1000).max(1),
                    ));
                }
                let allowance = limit.saturating_sub(s.failures).max(1);
                if s.in_flight >= allowance {
                    return Err(Refusal::Busy);
                }
            }
        }
        for (key, _) in &keys {
            let s = state.touch(key, now_ms, cfg.max_keys);
            s.in_flight = s.in_flight.saturating_add(1);
        }
        drop(state);
        Ok(Attempt {
            throttle: self,
            keys,
            settled: false,
        })
    }

    /// Whether `key` has failures within the window, or a lock-out, now.
    pub fn counts(&self, key: &ThrottleKey, now_ms: u64) -> bool {
        let cfg = self.config;
        self.state().map.get(key).is_some_and(|s| {
            s.locked_until_ms > now_ms
                || (s.failures != 0 && now_ms.saturating_sub(s.last_failure_ms) < cfg.window_ms)
        })
    }

    /// How many keys are locked out at `now_ms`: (role-id and source
    /// pairs, sources), counting lock-outs read from the shared record too.
    pub fn locked(&self, now_ms: u64) -> (usize, usize) {
        let state = self.state();
        let locked = state.map.iter().filter(|(_, s)| s.locked_until_ms > now_ms);
        locked.fold((0, 0), |(pairs, sources), (key, _)| match key {
            ThrottleKey::RoleSource(..) => (pairs + 1, sources),
            ThrottleKey::Source(_) => (pairs, sources + 1),
        })
    }

    /// How many entries are tracked (for tests of the memory bound).
    pub fn tracked(&self) -> usize {
        self.state().map.len()
    }

    /// Takes in a count another node shared: the entry of `key` keeps the
    /// larger failure count and the later lock-out end.
    pub fn absorb(&self, key: &ThrottleKey, shared: &Stored, now_ms: u64) {
        let cfg = self.config;
        let mut state = self.state();
        let s = state.touch(key, now_ms, cfg.max_keys);
        s.age(now_ms, cfg.window_ms);
        if shared.failures > s.failures {
            s.failures = shared.failures;
            s.last_failure_ms = s.last_failure_ms.max(shared.last_failure_ms);
        }
        s.locked_until_ms = s.locked_until_ms.max(shared.locked_until_ms);
    }
}

impl Attempt<'_> {
    /// The keys this attempt counts under, with their limits.
    pub fn keys(&self) -> &[(ThrottleKey, u32)] {
        &self.keys
    }

    /// Counts a failure under each key; at its limit a key is locked out.
    pub fn failed(mut self, now_ms: u64) {
        self.settled = true;
        let cfg = self.throttle.config;
        let mut state = self.throttle.state();
        for (key, limit) in &self.keys {
            let limit = (*limit).max(1);
            let s = state.touch(key, now_ms, cfg.max_keys);
            s.in_flight = s.in_flight.saturating_sub(1);
            s.age(now_ms, cfg.window_ms);
            s.failures = s.failures.saturating_add(1);
            s.last_failure_ms = now_ms;
            if s.failures >= limit {
                let doublings = (s.failures - limit).min(20);
                let backoff = cfg
                    .backoff_ms
                    .saturating_mul(1u64 << doublings)
                    .min(cfg.max_backoff_ms);
                s.locked_until_ms = now_ms.saturating_add(backoff);
            }
        }
    }

    /// Ends the attempt; a role-id's failures from this source are forgotten
    /// (the source's own count stays: others may share the address).
    pub fn succeeded(mut self) {
        self.settled = true;
        let mut state = self.throttle.state();
        for (key, _) in &self.keys {
            if let Some(s) = state.map.get_mut(key) {
                s.in_flight = s.in_flight.saturating_sub(1);
                if matches!(key, ThrottleKey::RoleSource(..)) {
                    s.failures = 0;
                    s.locked_until_ms = 0;
                }
            }
        }
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.settled {
            return;
        }
        let mut state = self.throttle.state();
        for (key, _) in &self.keys {
            if let Some(s) = state.map.get_mut(key) {
                s.in_flight = s.in_flight.saturating_sub(1);
            }
        }
    }
}

/// An admitted attempt, and whether the shared record (on a shared store)
/// may hold a count of its role-id from its source.
struct Admitted<'a> {
    attempt: Attempt<'a>,
    shared_role_count: bool,
}

/// One login failure count for governance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedLogins {
    pub identity: String,
    pub source: String,
    pub count: u64,
}

/// The login methods and their shared brute-force state.
pub struct Login {
    throttle: Throttle,
    config: ThrottleConfig,
    failures: Mutex<HashMap<(String, String), u64>>,
    jwks: JwksCache,
    /// On a shared store: the counts shared with the other nodes.
    shared: Option<Arc<SharedThrottle>>,
}

fn source_text(source: Option<IpAddr>) -> String {
    source.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string())
}

impl Login {
    pub fn new(jwks: JwksCache, config: ThrottleConfig) -> Self {
        Self {
            throttle: Throttle::new(config),
            config,
            failures: Mutex::new(HashMap::new()),
            jwks,
            shared: None,
        }
    }

    /// Shares the throttle counts with other nodes through `shared`.
    pub fn with_shared(mut self, shared: Arc<SharedThrottle>) -> Self {
        self.shared = Some(shared);
        self
    }

    /// The shared counts, if any (its flusher runs as a server task).
    pub fn shared(&self) -> Option<Arc<SharedThrottle>> {
        self.shared.clone()
    }

    /// Keys of this node's throttle locked out at `now_ms`: (role-id and
    /// source pairs, sources).
    pub fn locked(&self, now_ms: u64) -> (usize, usize) {
        self.throttle.locked(now_ms)
    }

    /// Failed logins so far, by identity and source, in order.
    pub fn failed_logins(&self) -> Vec<FailedLogins> {
        let map = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<FailedLogins> = map
            .iter()
            .map(|((identity, source), count)| FailedLogins {
                identity: identity.clone(),
                source: source.clone(),
                count: *count,
            })
            .collect();
        out.sort_by(|a, b| (&a.identity, &a.source).cmp(&(&b.identity, &b.source)));
        out
    }

    fn count_failure(&self, identity: &str, source: Option<IpAddr>) {
        let mut map = self.failures.lock().unwrap_or_else(PoisonError::into_inner);
        // Bounded like the throttle: past the cap, new pairs count as unknown.
        let key = if map.len() >= self.config.max_keys {
            (UNKNOWN_IDENTITY.to_owned(), "other".to_owned())
        } else {
            (identity.to_owned(), source_text(source))
        };
        *map.entry(key).or_insert(0) += 1;
    }

    /// Admits an attempt from `source` (and of `role_id`, for role-id
    /// login), or refuses it while locked out, counting the refusal for
    /// governance under `identity`.
    fn admit(
        &self,
        role_id: Option<&str>,
        source: Option<IpAddr>,
        now_ms: u64,
        identity: impl FnOnce() -> Result<String, IdentityError>,
    ) -> Result<Admitted<'_>, LoginError> {
        let net = SourceNet::of(source);
        let mut keys = Vec::with_capacity(2);
        if let Some(role_id) = role_id {
            keys.push((
                ThrottleKey::role_source(role_id, net),
                self.config.role_source_failures,
            ));
        }
        keys.push((ThrottleKey::Source(net), self.config.source_failures));
        // Whether the shared record may hold a count of this role-id from
        // this source (a success must then clear it there): it was
        // unreadable, or the count here (this node's own failures, flushed
        // or not, and what it took in from the record) is not zero.
        let mut shared_role_count = false;
        if let Some(shared) = &self.shared {
            // What the other nodes counted (flushed so far). A read error
            // leaves this node's own count to decide.
            for (key, _) in &keys {
                match shared.stored(key, now_ms) {
                    Ok(Some(stored)) => self.throttle.absorb(key, &stored, now_ms),
                    Ok(None) => {}
                    Err(error) => {
                        shared_role_count |= matches!(key, ThrottleKey::RoleSource(..));
                        tracing::warn!(%error, "shared login throttle unreadable");
                    }
                }
            }
            shared_role_count |= keys.iter().any(|(key, _)| {
                matches!(key, ThrottleKey::RoleSource(..)) && self.throttle.counts(key, now_ms)
            });
        }
        match self.throttle.admit(keys, now_ms) {
            Ok(attempt) => Ok(Admitted {
                attempt,
                shared_role_count,
            }),
            Err(refusal) => {
                self.count_failure(&identity()?, source);
                Err(match refusal {
                    Refusal::Locked(seconds) => LoginError::Locked(seconds),
                    Refusal::Busy => LoginError::Busy,
                })
            }
        }
    }

    /// Counts a failure for governance and the throttle.
    fn failed(
        &self,
        identity: &str,
        attempt: Attempt<'_>,
        source: Option<IpAddr>,
        now_ms: u64,
        error: LoginError,
    ) -> LoginError {
        self.count_failure(identity, source);
        if let Some(shared) = &self.shared {
            for (key, limit) in attempt.keys() {
                shared.note_failure(key, *limit, now_ms);
            }
        }
        attempt.failed(now_ms);
        error
    }

    /// Ends a successful attempt: the role-id's failures from this source
    /// are forgotten in memory and, on a shared store, in the shared record
    /// too (otherwise the next admission would read them back). When
    /// neither the shared record (as read at admission) nor this node held
    /// a count of the role-id from this source (the usual case), there is
    /// nothing to clear and no storage request is made: a failure another
    /// node flushed in between happened alongside this success and may
    /// stay counted, as it would on one node had it been judged after it.
    fn succeeded(&self, admitted: Admitted<'_>, now_ms: u64) {
        let Admitted {
            attempt,
            shared_role_count,
        } = admitted;
        if let Some(shared) = &self.shared {
            for (key, _) in attempt.keys() {
                if !matches!(key, ThrottleKey::RoleSource(..)) {
                    continue;
                }
                let cleared = if shared_role_count {
                    shared.succeeded(key, now_ms)
                } else {
                    shared.forget_pending(key)
                };
                if let Err(error) = cleared {
                    tracing::warn!(%error, "shared login throttle not reset");
                }
            }
        }
        attempt.succeeded();
    }

    /// Counts a refusal that happened before any credential was checked
    /// (a locked-out caller, or a request the server could not handle).
    pub fn note_refusal(&self, identity: &str, source: Option<IpAddr>) {
        self.count_failure(identity, source);
    }

    /// Role-id + secret-id login.
    pub fn approle(
        &self,
        store: &IdentityStore,
        role_id: &str,
        secret_id: &str,
        source: Option<IpAddr>,
        now_ms: u64,
    ) -> Result<Grant, LoginError> {
        let admitted = self.admit(Some(role_id), source, now_ms, || {
            Ok(store
                .by_role_id(role_id)?
                .map_or_else(|| UNKNOWN_IDENTITY.to_owned(), |r| r.name))
        })?;
        let identity = match store.by_role_id(role_id)? {
            Some(record) if record.is_active(now_ms) => record,
            Some(record) => {
                return Err(self.failed(
                    &record.name,
                    admitted.attempt,
                    source,
                    now_ms,
                    LoginError::Invalid,
                ))
            }
            None => {
                return Err(self.failed(
                    UNKNOWN_IDENTITY,
                    admitted.attempt,
                    source,
                    now_ms,
                    LoginError::Invalid,
                ))
            }
        };
        match store.spend_secret_id(role_id, secret_id, source, now_ms)? {
            Some(spent) if spent.identity == identity.name => {}
            _ => {
                return Err(self.failed(
                    &identity.name,
                    admitted.attempt,
                    source,
                    now_ms,
                    LoginError::Invalid,
                ))
            }
        }
        self.succeeded(admitted, now_ms);
        store.record_login(&identity, now_ms)?;
        Ok(Grant {
            hard_expiry_ms: identity_expiry(&identity),
            identity: identity.name,
            policies: identity.policies,
            method: "approle",
        })
    }

    /// Client certificate login: `chain` is the DER of the certificates the
    /// connection presented, leaf first (empty: none). The TLS layer
    /// verified it at the handshake, but a connection can outlive that: one
    /// held open, or resumed (a resumed handshake does not verify again).
    /// So the chain is checked again against `trust` as it is now (expiry,
    /// CRL), and the token never outlives the certificate.
    ///
    /// A certificate this PKI issued logs in only as the identity it was
    /// issued for: the issue checked that its requester held that
    /// identity's policies, and a binding made later must not hand the
    /// certificate an identity nobody checked it for.
    pub fn cert(
        &self,
        store: &IdentityStore,
        pki: &PkiStore,
        chain: &[Vec<u8>],
        source: Option<IpAddr>,
        now_ms: u64,
    ) -> Result<Grant, LoginError> {
        let attempt = self
            .admit(None, source, now_ms, || Ok(UNKNOWN_IDENTITY.to_owned()))?
            .attempt;
        let Some(der) = chain.first() else {
            return Err(self.failed(
                UNKNOWN_IDENTITY,
                attempt,
                source,
                now_ms,
                LoginError::NoCertificate,
            ));
        };
        if !pki.trust().recheck(chain, now_ms) {
            return Err(self.failed(
                UNKNOWN_IDENTITY,
                attempt,
                source,
                now_ms,
                LoginError::CertificateRefused,
            ));
        }
        let names = match cert_names(der) {
            Some(names) => names,
            None => {
                return Err(self.failed(
                    UNKNOWN_IDENTITY,
                    attempt,
                    source,
                    now_ms,
                    LoginError::UnboundCertificate,
                ))
            }
        };
        let identity = match store.by_cert(names.subject.as_ref(), &names.spiffe_ids)? {
            Some(record) if record.is_active(now_ms) => record,
            Some(record) => {
                return Err(self.failed(&record.name, attempt, source, now_ms, LoginError::Invalid))
            }
            None => {
                return Err(self.failed(
                    UNKNOWN_IDENTITY,
                    attempt,
                    source,
                    now_ms,
                    LoginError::UnboundCertificate,
                ))
            }
        };
        if let Some(issued) = pki
            .issued_for(&names.serial)
            .map_err(LoginError::Inventory)?
        {
            // The inventory is shared by every node: a revocation on another
            // node is known here before this node's CRL is refreshed.
            let refused = if issued.revoked_at_ms != 0 {
                Some(LoginError::CertificateRefused)
            } else if issued.identity != identity.name {
                Some(LoginError::IssuedForAnother)
            } else {
                None
            };
            if let Some(refused) = refused {
                return Err(self.failed(&identity.name, attempt, source, now_ms, refused));
            }
        }
        attempt.succeeded();
        store.record_login(&identity, now_ms)?;
        Ok(Grant {
            hard_expiry_ms: min_expiry(identity_expiry(&identity), names.not_after_ms),
            identity: identity.name,
            policies: identity.policies,
            method: "cert",
        })
    }

    /// OIDC/JWT login with a token of the stored issuer `issuer`.
    pub async fn oidc(
        &self,
        store: &IdentityStore,
        issuer: &str,
        jwt: &str,
        source: Option<IpAddr>,
        now_ms: u64,
    ) -> Result<Grant, LoginError> {
        let attempt = self
            .admit(None, source, now_ms, || Ok(UNKNOWN_IDENTITY.to_owned()))?
            .attempt;
        let Some(record) = store.issuer(issuer)? else {
            return Err(self.failed(
                UNKNOWN_IDENTITY,
                attempt,
                source,
                now_ms,
                LoginError::Invalid,
            ));
        };
        let config = record
            .config()
            .map_err(|_| LoginError::Identity(IdentityError::Corrupt))?;
        let now_unix = i64::try_from(now_ms / 1000).unwrap_or(i64::MAX);
        let verified = match self
            .jwks
            .verify(jwt, &config, now_unix, JWT_LEEWAY_SECS)
            .await
        {
            Ok(v) => v,
            // The issuer being unreachable is not the caller's failure.
            Err(e @ OidcError::Jwks(_)) => return Err(LoginError::KeysUnavailable(e)),
            Err(e) => {
                return Err(self.failed(
                    UNKNOWN_IDENTITY,
                    attempt,
                    source,
                    now_ms,
                    LoginError::Oidc(e),
                ))
            }
        };
        let matching: Vec<IdentityRecord> = store
            .oidc_candidates(issuer)?
            .into_iter()
            .filter(|(_, bindings)| {
                bindings
                    .iter()
                    .any(|claims| verified.bound_claims_match(claims).is_ok())
            })
            .map(|(record, _)| record)
            .collect();
        let identity = match matching.as_slice() {
            [one] if one.is_active(now_ms) => one.clone(),
            [one] => {
                return Err(self.failed(&one.name, attempt, source, now_ms, LoginError::Invalid))
            }
            [] => {
                return Err(self.failed(
                    UNKNOWN_IDENTITY,
                    attempt,
                    source,
                    now_ms,
                    LoginError::UnboundToken,
                ))
            }
            _ => {
                return Err(self.failed(
                    UNKNOWN_IDENTITY,
                    attempt,
                    source,
                    now_ms,
                    LoginError::Ambiguous,
                ))
            }
        };
        attempt.succeeded();
        store.record_login(&identity, now_ms)?;
        let jwt_exp = u64::try_from(verified.expires_at_unix())
            .unwrap_or(0)
            .saturating_mul(1000);
        Ok(Grant {
            hard_expiry_ms: min_expiry(identity_expiry(&identity), Some(jwt_exp)),
            identity: identity.name,
            policies: identity.policies,
            method: "oidc",
        })
    }
}

/// The names of a certificate that bindings can match.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct CertNames {
    /// The subject's RDNs, when every value is a string.
    pub subject: Option<Dn>,
    pub spiffe_ids: Vec<String>,
    /// The end of the certificate's validity, in ms since the epoch (none
    /// before the epoch).
    pub not_after_ms: Option<u64>,
    /// The serial number's bytes in lower-case hex (the PKI inventory's
    /// key).
    pub serial: String,
}

/// The subject DN and SPIFFE IDs (URI SANs) of a DER certificate.
pub fn cert_names(der: &[u8]) -> Option<CertNames> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let subject = Dn::from_x509(cert.subject());
    let mut spiffe_ids = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(uri) = name {
                if uri.starts_with("spiffe://") {
                    spiffe_ids.push((*uri).to_owned());
                }
            }
        }
    }
    let not_after_ms = u64::try_from(cert.validity().not_after.timestamp())
        .ok()
        .map(|secs| secs.saturating_mul(1000));
    Some(CertNames {
        subject,
        spiffe_ids,
        not_after_ms,
        serial: hex::encode(cert.raw_serial()),
    })
}
