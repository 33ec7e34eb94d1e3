//! Login: role-id + secret-id, client certificate, OIDC/JWT. Each method
//! checks the presented credential against the inventory and hands back a
//! [`Grant`] (who, which policies, how long at most); the caller issues the
//! token. Brute force is throttled here, in memory: repeated failures for one
//! role-id or one source address lock it out for a back-off period, and every
//! failure is counted by identity and source for governance.
//!
//! Owns no storage prefix: it reads and writes through [`IdentityStore`].
//! Time is a parameter.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use super::{IdentityError, IdentityRecord, IdentityStore};
use crate::oidc::{JwksCache, OidcError};

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
    #[error("no client certificate was presented on this connection")]
    NoCertificate,
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
#[derive(Debug, Clone, Copy)]
pub struct ThrottleConfig {
    /// Failures of one role-id before it is locked out.
    pub role_failures: u32,
    /// Failures from one source address before it is locked out (higher:
    /// many clients may share an address).
    pub source_failures: u32,
    /// Failures older than this are forgotten.
    pub window_ms: u64,
    /// First lock-out; doubles with each further failure, up to `max_backoff_ms`.
    pub backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Keys tracked at most (memory bound).
    pub max_keys: usize,
}

impl Default for ThrottleConfig {
    fn default() -> Self {
        Self {
            role_failures: 5,
            source_failures: 20,
            window_ms: 15 * 60 * 1000,
            backoff_ms: 30 * 1000,
            max_backoff_ms: 15 * 60 * 1000,
            max_keys: 100_000,
        }
    }
}

#[derive(Debug, Clone, Copy, Default)]
struct Strikes {
    failures: u32,
    last_ms: u64,
    locked_until_ms: u64,
}

/// Failure counts and lock-outs by key (`role:<id>`, `src:<ip>`).
#[derive(Debug, Default)]
pub struct Throttle {
    config: ThrottleConfig,
    strikes: Mutex<HashMap<String, Strikes>>,
}

impl Throttle {
    pub fn new(config: ThrottleConfig) -> Self {
        Self {
            config,
            strikes: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Strikes>> {
        self.strikes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// `Err(seconds)` while `key` is locked out.
    pub fn check(&self, key: &str, now_ms: u64) -> Result<(), u64> {
        match self.map().get(key) {
            Some(s) if s.locked_until_ms > now_ms => {
                Err((s.locked_until_ms - now_ms).div_ceil(1000).max(1))
            }
            _ => Ok(()),
        }
    }

    /// Counts a failure of `key`; at `limit` failures it is locked out.
    pub fn fail(&self, key: &str, limit: u32, now_ms: u64) {
        let cfg = self.config;
        let mut map = self.map();
        if map.len() >= cfg.max_keys && !map.contains_key(key) {
            map.retain(|_, s| {
                now_ms.saturating_sub(s.last_ms) < cfg.window_ms || s.locked_until_ms > now_ms
            });
            if map.len() >= cfg.max_keys {
                map.retain(|_, s| s.locked_until_ms > now_ms);
            }
        }
        let s = map.entry(key.to_owned()).or_default();
        if now_ms.saturating_sub(s.last_ms) >= cfg.window_ms && s.locked_until_ms <= now_ms {
            s.failures = 0;
        }
        s.failures = s.failures.saturating_add(1);
        s.last_ms = now_ms;
        if s.failures >= limit.max(1) {
            let doublings = (s.failures - limit.max(1)).min(20);
            let backoff = cfg
                .backoff_ms
                .saturating_mul(1u64 << doublings)
                .min(cfg.max_backoff_ms);
            s.locked_until_ms = now_ms.saturating_add(backoff);
        }
    }

    /// Forgets the failures of `key` (after a success).
    pub fn clear(&self, key: &str) {
        self.map().remove(key);
    }
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
}

fn role_key(role_id: &str) -> String {
    let cut: String = role_id.chars().take(128).collect();
    format!("role:{cut}")
}

fn source_key(source: Option<IpAddr>) -> String {
    match source {
        Some(ip) => format!("src:{ip}"),
        None => "src:unknown".to_owned(),
    }
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
        }
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

    fn check_throttle(&self, keys: &[&str], now_ms: u64) -> Result<(), LoginError> {
        for key in keys {
            self.throttle
                .check(key, now_ms)
                .map_err(LoginError::Locked)?;
        }
        Ok(())
    }

    /// Counts a failure for governance and the throttle.
    fn failed(
        &self,
        identity: &str,
        role: Option<&str>,
        source: Option<IpAddr>,
        now_ms: u64,
        error: LoginError,
    ) -> LoginError {
        self.count_failure(identity, source);
        if let Some(role) = role {
            self.throttle.fail(role, self.config.role_failures, now_ms);
        }
        self.throttle
            .fail(&source_key(source), self.config.source_failures, now_ms);
        error
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
        let role = role_key(role_id);
        let src = source_key(source);
        if let Err(e) = self.check_throttle(&[&role, &src], now_ms) {
            let who = store.by_role_id(role_id)?.map(|r| r.name);
            self.count_failure(who.as_deref().unwrap_or(UNKNOWN_IDENTITY), source);
            return Err(e);
        }
        let identity = match store.by_role_id(role_id)? {
            Some(record) if record.is_active(now_ms) => record,
            Some(record) => {
                return Err(self.failed(
                    &record.name,
                    Some(&role),
                    source,
                    now_ms,
                    LoginError::Invalid,
                ))
            }
            None => {
                return Err(self.failed(
                    UNKNOWN_IDENTITY,
                    Some(&role),
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
                    Some(&role),
                    source,
                    now_ms,
                    LoginError::Invalid,
                ))
            }
        }
        self.throttle.clear(&role);
        store.record_login(&identity, now_ms)?;
        Ok(Grant {
            hard_expiry_ms: identity_expiry(&identity),
            identity: identity.name,
            policies: identity.policies,
            method: "approle",
        })
    }

    /// Client certificate login: `leaf` is the DER of the connection's peer
    /// certificate, already verified against `tls.client_ca` by the TLS layer.
    pub fn cert(
        &self,
        store: &IdentityStore,
        leaf: Option<&[u8]>,
        source: Option<IpAddr>,
        now_ms: u64,
    ) -> Result<Grant, LoginError> {
        let src = source_key(source);
        if let Err(e) = self.check_throttle(&[&src], now_ms) {
            self.count_failure(UNKNOWN_IDENTITY, source);
            return Err(e);
        }
        let Some(der) = leaf else {
            return Err(self.failed(
                UNKNOWN_IDENTITY,
                None,
                source,
                now_ms,
                LoginError::NoCertificate,
            ));
        };
        let names = match cert_names(der) {
            Some(names) => names,
            None => {
                return Err(self.failed(
                    UNKNOWN_IDENTITY,
                    None,
                    source,
                    now_ms,
                    LoginError::UnboundCertificate,
                ))
            }
        };
        let identity = match store.by_cert(names.subject.as_deref(), &names.spiffe_ids)? {
            Some(record) if record.is_active(now_ms) => record,
            Some(record) => {
                return Err(self.failed(&record.name, None, source, now_ms, LoginError::Invalid))
            }
            None => {
                return Err(self.failed(
                    UNKNOWN_IDENTITY,
                    None,
                    source,
                    now_ms,
                    LoginError::UnboundCertificate,
                ))
            }
        };
        store.record_login(&identity, now_ms)?;
        Ok(Grant {
            hard_expiry_ms: identity_expiry(&identity),
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
        let src = source_key(source);
        if let Err(e) = self.check_throttle(&[&src], now_ms) {
            self.count_failure(UNKNOWN_IDENTITY, source);
            return Err(e);
        }
        let Some(record) = store.issuer(issuer)? else {
            return Err(self.failed(UNKNOWN_IDENTITY, None, source, now_ms, LoginError::Invalid));
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
                    None,
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
            [one] => return Err(self.failed(&one.name, None, source, now_ms, LoginError::Invalid)),
            [] => {
                return Err(self.failed(
                    UNKNOWN_IDENTITY,
                    None,
                    source,
                    now_ms,
                    LoginError::UnboundToken,
                ))
            }
            _ => {
                return Err(self.failed(
                    UNKNOWN_IDENTITY,
                    None,
                    source,
                    now_ms,
                    LoginError::Ambiguous,
                ))
            }
        };
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
    /// `K=V,...` as [`super::normalise_dn`] writes it, when it can.
    pub subject: Option<String>,
    pub spiffe_ids: Vec<String>,
}

/// The subject DN and SPIFFE IDs (URI SANs) of a DER certificate.
pub fn cert_names(der: &[u8]) -> Option<CertNames> {
    use x509_parser::extensions::GeneralName;
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let registry = x509_parser::objects::oid_registry();
    let mut parts = Vec::new();
    let mut complete = true;
    for attr in cert.subject().iter_attributes() {
        match (
            x509_parser::objects::oid2abbrev(attr.attr_type(), registry),
            attr.as_str(),
        ) {
            (Ok(key), Ok(value)) => parts.push(format!("{key}={value}")),
            _ => complete = false,
        }
    }
    let subject = if complete && !parts.is_empty() {
        super::normalise_dn(&parts.join(",")).ok()
    } else {
        None
    };
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
    Some(CertNames {
        subject,
        spiffe_ids,
    })
}
