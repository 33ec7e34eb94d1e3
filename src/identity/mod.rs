//! The inventory of non-human identities and their login bindings.
//!
//! Storage prefix `identities/` (through the barrier only):
//! - `identities/record/<name>`: an [`IdentityRecord`];
//! - `identities/role/<role-id>`: the name of the identity with that role-id;
//! - `identities/secret-id/<hex keyed hash>`: a [`SecretIdRecord`]; the
//!   secret-id itself is never stored, only HMAC-SHA256 under a key derived
//!   from the keyring (`identities/secret-id-hash`), as tokens are;
//! - `identities/sid-of/<name>/<hex keyed hash>`: index of an identity's
//!   secret-ids (so delete does not scan every secret-id);
//! - `identities/cert/<subject|spiffe>/<hex of the value>`: the identity a
//!   certificate binding names (a subject by its canonical, escaped RFC 4514
//!   text, [`Dn::canonical`]; logins then compare the RDN structure);
//! - `identities/issuer/<name>`: an OIDC issuer ([`IssuerRecord`]);
//! - `identities/throttle/<slot>`: login throttle counts shared between
//!   nodes on a shared store ([`shared_throttle`]).
//!
//! Tokens are not this module's: disabling, expiring or deleting an identity
//! asks the token store (through [`TokenRevoker`]) to revoke every token of
//! the identity. It must not read `tokens/`, `policies/` or `usage/`.
//!
//! Every change to an identity record is written only over the record it
//! read (`IdentityStore::modify_record`): on a shared store (etcd) another
//! node may write the record between the read and the write, and a change
//! must never write back what it read before (an update undoing a disable).
//! A change that loses is applied again to the record read again, three
//! tries at most ([`IdentityError::Contended`]).
//!
//! [`login`] turns presented credentials into a [`login::Grant`]; the caller
//! issues the token.

mod bridge;
pub mod dn;
pub mod expiry;
pub mod login;
mod secret_id;
pub mod shared_throttle;
pub mod throttle_metrics;

#[cfg(test)]
mod issuer_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use prost::Message;

use crate::barrier::{Barrier, BarrierError, PlainOp, Stamp};
use crate::cidr::Cidr;

pub use dn::{Dn, DnAttribute};
pub use secret_id::{SecretIdText, SECRET_ID_PREFIX};

const RECORD_PREFIX: &str = "identities/record/";
const ROLE_PREFIX: &str = "identities/role/";
const SECRET_ID_RECORD_PREFIX: &str = "identities/secret-id/";
const SECRET_IDS_OF_PREFIX: &str = "identities/sid-of/";
/// Compare-and-swap attempts on one secret-id record before giving up.
const SPEND_ATTEMPTS: usize = 64;
/// How many times a change to an identity record reads the record again
/// when another node wrote it between the read and the write, before the
/// change is refused with [`IdentityError::Contended`].
const RECORD_TRIES: usize = 3;
/// The same for the changes that take access away (disable, delete): a
/// caller who keeps writing the record on another node (its description,
/// with `write` on it) must not be able to keep an identity enabled by
/// making each try of its disable lose.
const REVOKING_TRIES: usize = 32;
const CERT_PREFIX: &str = "identities/cert/";
const ISSUER_PREFIX: &str = "identities/issuer/";

/// Longest identity name, in bytes.
pub const MAX_NAME_LEN: usize = 128;
/// Most policies, bindings or CIDR blocks on one record.
pub const MAX_LIST: usize = 64;
/// Longest owner, description, subject or claim text, in bytes.
pub const MAX_TEXT: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("invalid identity name: 1 to {MAX_NAME_LEN} characters of [A-Za-z0-9._-], starting with a letter or digit, and not 'root'")]
    InvalidName,
    #[error("unknown identity kind '{0}': one of service-account, bot, api-client, ci-runner, workload, ai-agent")]
    InvalidKind(String),
    #[error("invalid input: {0}")]
    Invalid(String),
    #[error("no such identity")]
    NotFound,
    #[error("the identity has no such binding")]
    NoSuchBinding,
    #[error("the identity changed while the request was checked; try again")]
    PoliciesChanged,
    #[error("the identity has no secret-id with that accessor")]
    NoSuchSecretId,
    /// The identity's record changed between the read and the write at
    /// every try (other nodes of a shared store writing it at once).
    #[error("the identity changed while the change was applied, at every try; try again")]
    Contended,
    #[error("identity {0} is disabled: enable it before making a secret-id")]
    Disabled(String),
    /// Past its `expires_at`: it can no longer log in, so it gets no new
    /// credential either.
    #[error("identity {0} has expired: extend its expiry before making a secret-id")]
    Expired(String),
    #[error("identity {0} already exists")]
    AlreadyExists(String),
    #[error("the binding is already held by identity {0}")]
    BindingTaken(String),
    #[error("no such policy: {0}")]
    UnknownPolicy(String),
    #[error("no such OIDC issuer: {0}")]
    UnknownIssuer(String),
    #[error("stored identity data is corrupt")]
    Corrupt,
    #[error("token store: {0}")]
    Tokens(String),
    #[error("certificate store: {0}")]
    Certificates(String),
    #[error(transparent)]
    Barrier(#[from] BarrierError),
}

/// What an identity is; governance counts by it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum IdentityKind {
    ServiceAccount,
    Bot,
    ApiClient,
    CiRunner,
    Workload,
    AiAgent,
}

impl IdentityKind {
    pub const ALL: [IdentityKind; 6] = [
        Self::ServiceAccount,
        Self::Bot,
        Self::ApiClient,
        Self::CiRunner,
        Self::Workload,
        Self::AiAgent,
    ];

    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        Self::ALL
            .into_iter()
            .find(|k| k.as_str() == text)
            .ok_or_else(|| IdentityError::InvalidKind(printable(text)))
    }

    pub const fn as_str(self) -> &'static str {
        match self {
            Self::ServiceAccount => "service-account",
            Self::Bot => "bot",
            Self::ApiClient => "api-client",
            Self::CiRunner => "ci-runner",
            Self::Workload => "workload",
            Self::AiAgent => "ai-agent",
        }
    }
}

impl fmt::Display for IdentityKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// User text as it may appear in an error: short, no control characters.
fn printable(text: &str) -> String {
    text.chars()
        .take(64)
        .flat_map(char::escape_debug)
        .collect::<String>()
}

/// A valid identity name: also a valid resource path segment
/// (`identity/<name>`), and never `root` (the root token's identity).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdentityName(String);

impl IdentityName {
    pub fn parse(text: &str) -> Result<Self, IdentityError> {
        let bytes = text.as_bytes();
        let ok = !bytes.is_empty()
            && bytes.len() <= MAX_NAME_LEN
            && bytes[0].is_ascii_alphanumeric()
            && bytes
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
            && text != "root";
        if ok {
            Ok(Self(text.to_owned()))
        } else {
            Err(IdentityError::InvalidName)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The resource policies name it by: `identity/<name>`.
    pub fn resource(&self) -> String {
        format!("identity/{}", self.0)
    }
}

impl fmt::Display for IdentityName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A stored identity.
#[derive(Clone, PartialEq, Message)]
pub struct IdentityRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub kind: String,
    #[prost(string, tag = "3")]
    pub owner: String,
    #[prost(string, tag = "4")]
    pub description: String,
    #[prost(string, repeated, tag = "5")]
    pub policies: Vec<String>,
    /// 0: never expires.
    #[prost(uint64, tag = "6")]
    pub expires_at_ms: u64,
    #[prost(bool, tag = "7")]
    pub disabled: bool,
    #[prost(uint64, tag = "8")]
    pub created_at_ms: u64,
    /// Last successful login (token use is recorded by `usage`).
    #[prost(uint64, tag = "9")]
    pub last_login_ms: u64,
    #[prost(string, tag = "10")]
    pub role_id: String,
    #[prost(message, repeated, tag = "11")]
    pub cert_bindings: Vec<CertBinding>,
    #[prost(message, repeated, tag = "12")]
    pub oidc_bindings: Vec<OidcBinding>,
    /// Set once the tokens of an expired identity have been revoked.
    #[prost(bool, tag = "13")]
    pub expiry_handled: bool,
    /// Labels an operator gives the identity (`identity metadata`), public
    /// like its owner: OIDC role claim templates may put them in identity
    /// tokens, so they must never hold a secret.
    #[prost(btree_map = "string, string", tag = "14")]
    pub metadata: std::collections::BTreeMap<String, String>,
}

impl IdentityRecord {
    pub fn kind(&self) -> Result<IdentityKind, IdentityError> {
        IdentityKind::parse(&self.kind).map_err(|_| IdentityError::Corrupt)
    }

    pub fn is_expired(&self, now_ms: u64) -> bool {
        self.expires_at_ms != 0 && self.expires_at_ms <= now_ms
    }

    /// Whether it may log in now: enabled and not expired.
    pub fn is_active(&self, now_ms: u64) -> bool {
        !self.disabled && !self.is_expired(now_ms)
    }
}

/// A certificate the identity logs in with: by subject DN or by SPIFFE ID.
#[derive(Clone, PartialEq, Message)]
pub struct CertBinding {
    /// The DN's canonical text ([`Dn::canonical`]), shown and used for the
    /// storage key; empty when `spiffe_id` is set.
    #[prost(string, tag = "1")]
    pub subject: String,
    #[prost(string, tag = "2")]
    pub spiffe_id: String,
    /// The DN as structure, parsed when the binding was made; what a
    /// certificate's subject is compared with. Empty in bindings made
    /// before it existed: their `subject` (which could hold no escapes) is
    /// parsed instead.
    #[prost(message, repeated, tag = "3")]
    pub rdns: Vec<StoredRdn>,
}

#[derive(Clone, PartialEq, Message)]
pub struct StoredRdn {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<StoredAttribute>,
}

#[derive(Clone, PartialEq, Message)]
pub struct StoredAttribute {
    #[prost(string, tag = "1")]
    pub oid: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

impl CertBinding {
    fn subject(dn: &Dn) -> Self {
        Self {
            subject: dn.canonical(),
            spiffe_id: String::new(),
            rdns: dn
                .rdns()
                .iter()
                .map(|rdn| StoredRdn {
                    attributes: rdn
                        .iter()
                        .map(|a| StoredAttribute {
                            oid: a.oid.clone(),
                            value: a.value.clone(),
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn spiffe(id: &str) -> Self {
        Self {
            subject: String::new(),
            spiffe_id: id.to_owned(),
            rdns: Vec::new(),
        }
    }

    /// The subject DN of a binding by subject, as structure.
    pub fn dn(&self) -> Option<Dn> {
        if !self.spiffe_id.is_empty() {
            return None;
        }
        if self.rdns.is_empty() {
            return Dn::parse(&self.subject).ok();
        }
        Dn::from_rdns(
            self.rdns
                .iter()
                .map(|rdn| {
                    rdn.attributes
                        .iter()
                        .map(|a| DnAttribute {
                            oid: a.oid.clone(),
                            value: a.value.clone(),
                        })
                        .collect()
                })
                .collect(),
        )
    }
}

#[derive(Clone, PartialEq, Message)]
pub struct ClaimPair {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(string, tag = "2")]
    pub value: String,
}

/// Bound claims `(key, value)`, all of which must match.
pub type ClaimSet = Vec<(String, String)>;

/// JWTs of `issuer` whose claims all match log in as the identity.
#[derive(Clone, PartialEq, Message)]
pub struct OidcBinding {
    #[prost(string, tag = "1")]
    pub issuer: String,
    #[prost(message, repeated, tag = "2")]
    pub claims: Vec<ClaimPair>,
}

impl OidcBinding {
    pub fn claim_pairs(&self) -> Vec<(String, String)> {
        self.claims
            .iter()
            .map(|c| (c.key.clone(), c.value.clone()))
            .collect()
    }
}

/// A stored secret-id: found by the keyed hash of its text.
#[derive(Clone, PartialEq, Message)]
pub struct SecretIdRecord {
    #[prost(string, tag = "1")]
    pub identity: String,
    #[prost(string, tag = "2")]
    pub role_id: String,
    #[prost(uint64, tag = "3")]
    pub created_at_ms: u64,
    /// 0: never expires.
    #[prost(uint64, tag = "4")]
    pub expires_at_ms: u64,
    /// 0: unlimited.
    #[prost(uint32, tag = "5")]
    pub uses_left: u32,
    #[prost(string, repeated, tag = "6")]
    pub cidrs: Vec<String>,
    /// A short non-secret handle for reports (`sid_` + 12 hex of the hash).
    #[prost(string, tag = "7")]
    pub handle: String,
}

/// A stored OIDC issuer.
#[derive(Clone, PartialEq, Message)]
pub struct IssuerRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub issuer_url: String,
    #[prost(string, tag = "3")]
    pub jwks_file: String,
    #[prost(string, tag = "4")]
    pub jwks_url: String,
    #[prost(string, tag = "5")]
    pub audience: String,
}

impl IssuerRecord {
    /// The checked form the `oidc` module verifies with.
    pub fn config(&self) -> Result<crate::oidc::IssuerConfig, crate::oidc::OidcError> {
        use crate::oidc::{HttpsUrl, IssuerConfig, JwksSource};
        let source = if self.jwks_url.is_empty() {
            JwksSource::File(self.jwks_file.clone().into())
        } else {
            JwksSource::Url(HttpsUrl::parse(&self.jwks_url)?)
        };
        IssuerConfig::new(&self.name, &self.issuer_url, &self.audience, source)
    }
}

/// What the token store does for this module. `TokenStore` implements it.
pub trait TokenRevoker {
    /// Revokes every token of `identity`; returns how many.
    fn revoke_identity(&self, identity: &str, now_ms: u64) -> Result<u32, IdentityError>;
}

/// Revokes the certificates issued to log in as identities, when their
/// expiry passes. `PkiStore` implements it.
pub trait CertificateRevoker {
    /// Revokes the valid certificates issued for any of `identities`;
    /// returns how many.
    fn revoke_issued_for(&self, identities: &[&str], now_ms: u64) -> Result<u32, IdentityError>;
}

/// What one expiry sweep revoked, and for how many identities it failed
/// (each is tried again at the next sweep).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Swept {
    pub tokens: u32,
    pub certificates: u32,
    pub failed: u32,
}

/// Whether a policy exists. `PolicyStore` implements it.
pub trait PolicyCatalog {
    fn policy_exists(&self, name: &str) -> Result<bool, IdentityError>;
}

/// A new identity, parsed.
#[derive(Debug, Clone)]
pub struct NewIdentity {
    pub name: IdentityName,
    pub kind: IdentityKind,
    pub owner: String,
    pub description: String,
    pub policies: Vec<String>,
    /// 0: never.
    pub expires_at_ms: u64,
}

/// Changes to an identity; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct IdentityUpdate {
    pub owner: Option<String>,
    pub description: Option<String>,
    pub policies: Option<Vec<String>>,
    /// `Some(0)`: never expires.
    pub expires_at_ms: Option<u64>,
    /// The policies the caller was checked against (for a change that gives
    /// access back): the update is refused if the identity's policies are no
    /// longer these when it is applied.
    pub checked_policies: Option<Vec<String>>,
    /// The owner and expiry (ms, 0: never) the caller read when it was judged
    /// to grant nothing (its owner unchanged, its expiry no later): the
    /// update is refused if either is no longer that when it is applied,
    /// so a stale value never lands over another's change unchecked.
    pub judged_on: Option<(String, u64)>,
}

/// Which binding `unbind` removes, as `identity get` lists them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unbind {
    /// A subject DN (compared as structure, so any spelling of it).
    CertSubject(String),
    CertSpiffe(String),
    /// Every OIDC binding of the identity to this issuer.
    OidcIssuer(String),
}

/// Filters of `list`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub kind: Option<IdentityKind>,
    pub no_owner: bool,
    /// Only identities unused for at least this long; 0: no filter.
    pub dormant_ms: u64,
}

/// A secret-id as made: the text is shown once.
pub struct NewSecretId {
    pub role_id: String,
    pub secret_id: SecretIdText,
    /// 0: never.
    pub expires_at_ms: u64,
}

/// How a secret-id is limited.
#[derive(Debug, Clone, Default)]
pub struct SecretIdSpec {
    /// 0: never expires.
    pub ttl_ms: u64,
    /// 0: unlimited.
    pub uses: u32,
    pub cidrs: Vec<Cidr>,
}

/// When an identity was last used: the later of its last login and its last
/// token use (from `usage`).
pub fn last_used_ms(record: &IdentityRecord, token_use_ms: Option<u64>) -> u64 {
    record.last_login_ms.max(token_use_ms.unwrap_or(0))
}

/// Whether `record` has been unused for at least `dormant_ms` (never used
/// counts from its creation).
pub fn is_dormant(record: &IdentityRecord, last_used: u64, dormant_ms: u64, now_ms: u64) -> bool {
    let since = if last_used == 0 {
        record.created_at_ms
    } else {
        last_used
    };
    now_ms.saturating_sub(since) >= dormant_ms
}

/// Metadata labels per identity, key length and value length.
pub const MAX_METADATA: usize = 32;
pub const MAX_METADATA_KEY: usize = 64;
pub const MAX_METADATA_VALUE: usize = 256;

/// A metadata key: 1 to [`MAX_METADATA_KEY`] of `[a-z0-9_-]`.
pub fn check_metadata_key(key: &str) -> Result<(), IdentityError> {
    if key.is_empty()
        || key.len() > MAX_METADATA_KEY
        || !key
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'_' | b'-'))
    {
        return Err(IdentityError::Invalid(format!(
            "a metadata key is 1 to {MAX_METADATA_KEY} of [a-z0-9_-]"
        )));
    }
    Ok(())
}

fn check_text(what: &str, text: &str) -> Result<(), IdentityError> {
    if text.len() > MAX_TEXT || text.chars().any(char::is_control) {
        return Err(IdentityError::Invalid(format!(
            "{what} must be at most {MAX_TEXT} bytes without control characters"
        )));
    }
    Ok(())
}

/// A SPIFFE ID: `spiffe://trust-domain/path`.
pub fn check_spiffe_id(text: &str) -> Result<(), IdentityError> {
    let ok = text
        .strip_prefix("spiffe://")
        .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        && text.len() <= 2048
        && text.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(())
    } else {
        Err(IdentityError::Invalid(
            "SPIFFE ID must be spiffe://TRUST-DOMAIN/PATH".into(),
        ))
    }
}

fn cert_key(binding: &CertBinding) -> String {
    if binding.spiffe_id.is_empty() {
        format!("{CERT_PREFIX}subject/{}", hex::encode(&binding.subject))
    } else {
        format!("{CERT_PREFIX}spiffe/{}", hex::encode(&binding.spiffe_id))
    }
}

/// A change to one identity record, as [`IdentityStore::modify_record`]
/// applies it: the record as read, changed in place, and what is written
/// with it.
struct Draft {
    record: IdentityRecord,
    write: RecordWrite,
    /// Written before the record, in order (`None`: deleted), in batches
    /// that fit the store, the record in the last. A try that loses keeps
    /// the batches before the last: each must be harmless without the
    /// record's write.
    before: Vec<(String, Option<Vec<u8>>)>,
    /// Other keys the change read: the record is written only if they
    /// still hold what it read (`None`: absent).
    expect: Vec<(String, Option<Stamp>)>,
}

/// What becomes of the record a [`Draft`] changed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum RecordWrite {
    /// Written back as changed (the default).
    Put,
    /// Nothing is written: the change found nothing to do.
    Keep,
    /// Removed.
    Delete,
}

/// The identity store.
pub struct IdentityStore {
    barrier: Arc<Barrier>,
    /// Serialises read-modify-write of records and secret-ids (use counts,
    /// bindings), so two logins cannot both spend a secret-id's last use.
    write_lock: Mutex<()>,
    /// Woken when an expiry is set, so the sweeper can sleep until the next one.
    expiry_set: tokio::sync::Notify,
    /// Tests: run once inside `modify_record`, between a try's read of the
    /// record and its conditional write.
    #[cfg(test)]
    before_record_write: crate::test_hook::Hook,
}

impl IdentityStore {
    pub fn new(barrier: Arc<Barrier>) -> Self {
        Self {
            barrier,
            write_lock: Mutex::new(()),
            expiry_set: tokio::sync::Notify::new(),
            #[cfg(test)]
            before_record_write: crate::test_hook::Hook::default(),
        }
    }

    /// Resolves when an identity's expiry was set or changed since the last call.
    pub async fn expiry_changed(&self) {
        self.expiry_set.notified().await;
    }

    /// The earliest expiry not yet handled (identities whose tokens the
    /// sweeper has still to revoke), if any.
    pub fn next_expiry_ms(&self) -> Result<Option<u64>, IdentityError> {
        Ok(self
            .all()?
            .iter()
            .filter(|r| r.expires_at_ms != 0 && !r.expiry_handled)
            .map(|r| r.expires_at_ms)
            .min())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.write_lock
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    fn decode<M: Message + Default>(bytes: &[u8]) -> Result<M, IdentityError> {
        M::decode(bytes).map_err(|_| IdentityError::Corrupt)
    }

    pub fn get(&self, name: &str) -> Result<Option<IdentityRecord>, IdentityError> {
        match self.barrier.get(&format!("{RECORD_PREFIX}{name}"))? {
            Some(raw) => Ok(Some(Self::decode(&raw)?)),
            None => Ok(None),
        }
    }

    fn require(&self, name: &IdentityName) -> Result<IdentityRecord, IdentityError> {
        self.get(name.as_str())?.ok_or(IdentityError::NotFound)
    }

    /// Applies `change` to the stored record of `name` and writes the
    /// result only over the record read (with what `change` adds, in one
    /// conditional write: `Barrier::batch_in_chunks_if`). When another node
    /// wrote the record meanwhile, `change` runs again on the record read
    /// again, [`RECORD_TRIES`] times at most, then the change is refused
    /// with [`IdentityError::Contended`]. Under the store's lock: on a store
    /// this process owns, the first try is written. Returns the record as
    /// written (or as read, if nothing was) and what `change` returned.
    fn modify_record<T>(
        &self,
        name: &str,
        change: impl FnMut(&mut Draft) -> Result<T, IdentityError>,
    ) -> Result<(IdentityRecord, T), IdentityError> {
        self.modify_record_tries(name, RECORD_TRIES, change)
    }

    /// [`Self::modify_record`] with `tries` tries. A change that leaves the
    /// record as read and adds no write is not written (so a caller writing
    /// nothing new does not make other changes retry).
    fn modify_record_tries<T>(
        &self,
        name: &str,
        tries: usize,
        mut change: impl FnMut(&mut Draft) -> Result<T, IdentityError>,
    ) -> Result<(IdentityRecord, T), IdentityError> {
        let key = format!("{RECORD_PREFIX}{name}");
        let _guard = self.lock();
        for _ in 0..tries {
            let (raw, stamp) = self
                .barrier
                .get_stamped(&key)?
                .ok_or(IdentityError::NotFound)?;
            let mut draft = Draft {
                record: Self::decode(&raw)?,
                write: RecordWrite::Put,
                before: Vec::new(),
                expect: Vec::new(),
            };
            let read = draft.record.clone();
            let out = change(&mut draft)?;
            let unchanged = draft.write == RecordWrite::Put
                && draft.record == read
                && draft.before.is_empty()
                && draft.expect.is_empty();
            if draft.write == RecordWrite::Keep || unchanged {
                return Ok((draft.record, out));
            }
            let bytes = draft.record.encode_to_vec();
            let mut ops: Vec<PlainOp<'_>> = draft
                .before
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => PlainOp::Put(k, v),
                    None => PlainOp::Delete(k),
                })
                .collect();
            ops.push(match draft.write {
                RecordWrite::Delete => PlainOp::Delete(&key),
                _ => PlainOp::Put(&key, &bytes),
            });
            let mut expect: Vec<(&str, Option<&Stamp>)> = vec![(&key, Some(&stamp))];
            expect.extend(draft.expect.iter().map(|(k, s)| (k.as_str(), s.as_ref())));
            #[cfg(test)]
            self.before_record_write.run();
            if self.barrier.batch_in_chunks_if(&expect, &ops)? {
                return Ok((draft.record, out));
            }
        }
        Err(IdentityError::Contended)
    }

    /// Every identity, in name order.
    pub fn all(&self) -> Result<Vec<IdentityRecord>, IdentityError> {
        self.barrier
            .scan_prefix(RECORD_PREFIX)?
            .iter()
            .map(|(_, raw)| Self::decode(raw))
            .collect()
    }

    fn check_policies(
        policies: &[String],
        catalog: &dyn PolicyCatalog,
    ) -> Result<Vec<String>, IdentityError> {
        if policies.len() > MAX_LIST {
            return Err(IdentityError::Invalid(format!(
                "at most {MAX_LIST} policies"
            )));
        }
        let mut out: Vec<String> = Vec::with_capacity(policies.len());
        for p in policies {
            if !catalog.policy_exists(p)? {
                return Err(IdentityError::UnknownPolicy(printable(p)));
            }
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        Ok(out)
    }

    pub fn create(
        &self,
        new: NewIdentity,
        catalog: &dyn PolicyCatalog,
        now_ms: u64,
    ) -> Result<IdentityRecord, IdentityError> {
        check_text("owner", &new.owner)?;
        check_text("description", &new.description)?;
        let policies = Self::check_policies(&new.policies, catalog)?;
        let _guard = self.lock();
        if self.get(new.name.as_str())?.is_some() {
            return Err(IdentityError::AlreadyExists(new.name.to_string()));
        }
        let role_id = secret_id::new_role_id()?;
        let record = IdentityRecord {
            name: new.name.to_string(),
            kind: new.kind.as_str().to_owned(),
            owner: new.owner,
            description: new.description,
            policies,
            expires_at_ms: new.expires_at_ms,
            disabled: false,
            created_at_ms: now_ms,
            last_login_ms: 0,
            role_id: role_id.clone(),
            cert_bindings: Vec::new(),
            oidc_bindings: Vec::new(),
            expiry_handled: false,
            metadata: Default::default(),
        };
        let bytes = record.encode_to_vec();
        let record_key = format!("{RECORD_PREFIX}{}", record.name);
        let role_key = format!("{ROLE_PREFIX}{role_id}");
        // Only where no record is: on a shared store another node may have
        // created the name since the read above (its lock is its own).
        #[cfg(test)]
        self.before_record_write.run();
        let written = self.barrier.batch_if(
            &[(record_key.as_str(), None)],
            &[
                PlainOp::Put(&record_key, &bytes),
                PlainOp::Put(&role_key, record.name.as_bytes()),
            ],
        )?;
        if !written {
            return Err(IdentityError::AlreadyExists(new.name.to_string()));
        }
        if record.expires_at_ms != 0 {
            self.expiry_set.notify_one();
        }
        Ok(record)
    }

    /// Identities matching `filter`; `token_use` gives the last token use of
    /// an identity (from `usage`).
    pub fn list(
        &self,
        filter: &ListFilter,
        token_use: &dyn Fn(&str) -> Option<u64>,
        now_ms: u64,
    ) -> Result<Vec<IdentityRecord>, IdentityError> {
        let mut out = Vec::new();
        for record in self.all()? {
            if filter.kind.is_some_and(|k| record.kind != k.as_str()) {
                continue;
            }
            if filter.no_owner && !record.owner.is_empty() {
                continue;
            }
            let last = last_used_ms(&record, token_use(&record.name));
            if filter.dormant_ms != 0 && !is_dormant(&record, last, filter.dormant_ms, now_ms) {
                continue;
            }
            out.push(record);
        }
        Ok(out)
    }

    /// Applies `update`. An expiry moved into the past revokes the tokens.
    pub fn update(
        &self,
        name: &IdentityName,
        update: IdentityUpdate,
        catalog: &dyn PolicyCatalog,
        tokens: &dyn TokenRevoker,
        now_ms: u64,
    ) -> Result<IdentityRecord, IdentityError> {
        let policies = update
            .policies
            .as_ref()
            .map(|p| Self::check_policies(p, catalog))
            .transpose()?;
        if let Some(owner) = &update.owner {
            check_text("owner", owner)?;
        }
        if let Some(description) = &update.description {
            check_text("description", description)?;
        }
        // Tokens carry the policies they were issued with, and their
        // identity's expiry as it was: a narrowed identity must not keep
        // wider tokens alive, nor one whose expiry was brought forward
        // tokens that outlive it. Revoked before the record is
        // written (a crash between the two leaves no token of the old record)
        // and again after it (for a login that ran in between).
        let (record, revoke) = self.modify_record(name.as_str(), |draft| {
            let record = &mut draft.record;
            if update
                .checked_policies
                .as_ref()
                .is_some_and(|checked| *checked != record.policies)
            {
                return Err(IdentityError::PoliciesChanged);
            }
            if update.judged_on.as_ref().is_some_and(|(owner, expiry)| {
                *owner != record.owner || *expiry != record.expires_at_ms
            }) {
                // The caller was judged to grant nothing on an owner and an
                // expiry another change has replaced since: judged again.
                return Err(IdentityError::PoliciesChanged);
            }
            if let Some(owner) = &update.owner {
                record.owner.clone_from(owner);
            }
            if let Some(description) = &update.description {
                record.description.clone_from(description);
            }
            let policies_changed = policies.as_ref().is_some_and(|p| *p != record.policies);
            if let Some(p) = &policies {
                record.policies.clone_from(p);
            }
            // An expiry brought forward: a token issued before it may live
            // (or be renewed, or have children) past it.
            let mut sooner = false;
            if let Some(expires) = update.expires_at_ms {
                sooner =
                    expires != 0 && (record.expires_at_ms == 0 || expires < record.expires_at_ms);
                record.expires_at_ms = expires;
                record.expiry_handled = false;
            }
            // An expiry already passed is left to the sweep to finish (it
            // takes back the identity's certificates too), woken below.
            let revoke = sooner || record.is_expired(now_ms) || policies_changed;
            if revoke {
                tokens.revoke_identity(&record.name, now_ms)?;
            }
            Ok(revoke)
        })?;
        if update.expires_at_ms.is_some() {
            self.expiry_set.notify_one();
        }
        // The second pass needs no identity lock: logins (which take it to
        // spend a secret-id) need not wait for it.
        if revoke {
            tokens.revoke_identity(&record.name, now_ms)?;
        }
        Ok(record)
    }

    /// Sets and removes metadata labels of an identity (removals first).
    /// Keys are 1 to [`MAX_METADATA_KEY`] of `[a-z0-9_-]`; values at most
    /// [`MAX_METADATA_VALUE`] bytes without control characters; at most
    /// [`MAX_METADATA`] labels. Grants nothing, so no token is revoked.
    pub fn set_metadata(
        &self,
        name: &IdentityName,
        set: std::collections::BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<IdentityRecord, IdentityError> {
        self.set_metadata_checked(name, set, remove, None)
    }

    /// [`Self::set_metadata`], refused with `PoliciesChanged` if
    /// `checked_policies` (those the caller was checked against: labels can
    /// be claims of the identity's tokens) are no longer the identity's
    /// when it is applied.
    pub fn set_metadata_checked(
        &self,
        name: &IdentityName,
        set: std::collections::BTreeMap<String, String>,
        remove: &[String],
        checked_policies: Option<&[String]>,
    ) -> Result<IdentityRecord, IdentityError> {
        for key in set.keys().chain(remove.iter()) {
            check_metadata_key(key)?;
        }
        for value in set.values() {
            if value.len() > MAX_METADATA_VALUE || value.chars().any(char::is_control) {
                return Err(IdentityError::Invalid(format!(
                    "a metadata value must be at most {MAX_METADATA_VALUE} bytes without control characters"
                )));
            }
        }
        let (record, ()) = self.modify_record(name.as_str(), |draft| {
            if checked_policies.is_some_and(|checked| checked != draft.record.policies.as_slice()) {
                return Err(IdentityError::PoliciesChanged);
            }
            let metadata = &mut draft.record.metadata;
            for key in remove {
                metadata.remove(key);
            }
            metadata.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
            if metadata.len() > MAX_METADATA {
                return Err(IdentityError::Invalid(format!(
                    "an identity has at most {MAX_METADATA} metadata labels"
                )));
            }
            Ok(())
        })?;
        Ok(record)
    }

    /// Disables (revoking every token at once, and every secret-id unless
    /// `keep_secret_ids`) or enables an identity. A secret-id revoked here
    /// does not come back with a later enable: a leaked one stays dead.
    /// Returns the record and how many tokens and secret-ids were revoked.
    pub fn set_disabled(
        &self,
        name: &IdentityName,
        disabled: bool,
        keep_secret_ids: bool,
        tokens: &dyn TokenRevoker,
        now_ms: u64,
    ) -> Result<(IdentityRecord, u32, u32), IdentityError> {
        self.set_disabled_checked(name, disabled, keep_secret_ids, None, tokens, now_ms)
    }

    /// [`Self::set_disabled`], refused with `PoliciesChanged` if
    /// `checked_policies` (those the caller of an enable was checked
    /// against) are no longer the identity's when it is applied.
    pub fn set_disabled_checked(
        &self,
        name: &IdentityName,
        disabled: bool,
        keep_secret_ids: bool,
        checked_policies: Option<&[String]>,
        tokens: &dyn TokenRevoker,
        now_ms: u64,
    ) -> Result<(IdentityRecord, u32, u32), IdentityError> {
        // Tokens are revoked before the record says disabled, so that a crash
        // between the two cannot leave a disabled identity with the tokens it
        // had, and again after it, for a login that ran in between (only a
        // crash right after the write can spare such a token).
        let mut revoked = 0;
        if disabled {
            self.require(name)?;
            revoked += tokens.revoke_identity(name.as_str(), now_ms)?;
        }
        // The secret-ids first (each record before its index entry), the
        // record last, in batches that fit the store: a disabled identity
        // never keeps the secret-ids the operator revoked, and a disable cut
        // short leaves it enabled, with fewer of them. A try that lost to
        // another node's write of the record deleted the secret-ids of its
        // batches before the last; the next try reads the record again and
        // deletes what is left.
        let mut secret_ids = std::collections::BTreeSet::new();
        let tries = if disabled {
            REVOKING_TRIES
        } else {
            RECORD_TRIES
        };
        let (record, ()) = self.modify_record_tries(name.as_str(), tries, |draft| {
            if checked_policies.is_some_and(|checked| checked != draft.record.policies.as_slice()) {
                return Err(IdentityError::PoliciesChanged);
            }
            draft.record.disabled = disabled;
            if disabled && !keep_secret_ids {
                let keys = self.secret_id_keys(&draft.record.name)?;
                secret_ids.extend(
                    keys.iter()
                        .filter(|k| k.starts_with(SECRET_ID_RECORD_PREFIX))
                        .cloned(),
                );
                draft.before = keys.into_iter().map(|k| (k, None)).collect();
            }
            Ok(())
        })?;
        if disabled && !keep_secret_ids {
            // Once more, after the disabled record is stored: a secret-id
            // written meanwhile (on any node) is found here, or its maker
            // reads the disabled record and takes it back
            // (`create_secret_id`).
            let keys = self.secret_id_keys(&record.name)?;
            secret_ids.extend(
                keys.iter()
                    .filter(|k| k.starts_with(SECRET_ID_RECORD_PREFIX))
                    .cloned(),
            );
            let ops: Vec<PlainOp<'_>> = keys.iter().map(|k| PlainOp::Delete(k)).collect();
            self.barrier.batch_in_chunks(&ops)?;
        }
        let secret_ids = u32::try_from(secret_ids.len()).unwrap_or(u32::MAX);
        if disabled {
            revoked += tokens.revoke_identity(&record.name, now_ms)?;
        }
        Ok((record, revoked, secret_ids))
    }

    /// The storage keys of an identity's secret-ids: each record and its
    /// index entry.
    fn secret_id_keys(&self, identity: &str) -> Result<Vec<String>, IdentityError> {
        let index = format!("{SECRET_IDS_OF_PREFIX}{identity}/");
        let mut keys = Vec::new();
        for key in self.barrier.scan_keys(&index)? {
            if let Some(hash) = key.strip_prefix(&index) {
                keys.push(format!("{SECRET_ID_RECORD_PREFIX}{hash}"));
            }
            keys.push(key);
        }
        Ok(keys)
    }

    /// The live secret-ids of an identity, by accessor (their `handle`);
    /// never their text, which is not stored.
    pub fn list_secret_ids(
        &self,
        name: &IdentityName,
        now_ms: u64,
    ) -> Result<Vec<SecretIdRecord>, IdentityError> {
        let record = self.require(name)?;
        let index = format!("{SECRET_IDS_OF_PREFIX}{}/", record.name);
        let mut out = Vec::new();
        for key in self.barrier.scan_keys(&index)? {
            let Some(hash) = key.strip_prefix(&index) else {
                continue;
            };
            if let Some(raw) = self
                .barrier
                .get(&format!("{SECRET_ID_RECORD_PREFIX}{hash}"))?
            {
                let sid: SecretIdRecord = Self::decode(&raw)?;
                if sid.expires_at_ms == 0 || sid.expires_at_ms > now_ms {
                    out.push(sid);
                }
            }
        }
        out.sort_by(|a, b| (a.created_at_ms, &a.handle).cmp(&(b.created_at_ms, &b.handle)));
        Ok(out)
    }

    /// Revokes one secret-id of an identity by its accessor. Tokens it was
    /// already exchanged for are not revoked.
    pub fn revoke_secret_id(
        &self,
        name: &IdentityName,
        accessor: &str,
    ) -> Result<(), IdentityError> {
        let hex_part = accessor
            .strip_prefix("sid_")
            .filter(|h| h.len() == 12 && h.bytes().all(|b| b.is_ascii_hexdigit()))
            .map(str::to_ascii_lowercase)
            .ok_or(IdentityError::NoSuchSecretId)?;
        let _guard = self.lock();
        let record = self.require(name)?;
        let index = format!("{SECRET_IDS_OF_PREFIX}{}/", record.name);
        let mut ops_keys = Vec::new();
        for key in self.barrier.scan_keys(&format!("{index}{hex_part}"))? {
            if let Some(hash) = key.strip_prefix(&index) {
                ops_keys.push(format!("{SECRET_ID_RECORD_PREFIX}{hash}"));
            }
            ops_keys.push(key);
        }
        if ops_keys.is_empty() {
            return Err(IdentityError::NoSuchSecretId);
        }
        let ops: Vec<PlainOp<'_>> = ops_keys.iter().map(|k| PlainOp::Delete(k)).collect();
        self.barrier.batch(&ops)?;
        Ok(())
    }

    /// Deletes an identity, its secret-ids and bindings, and revokes its tokens.
    pub fn delete(
        &self,
        name: &IdentityName,
        tokens: &dyn TokenRevoker,
        now_ms: u64,
    ) -> Result<u32, IdentityError> {
        // As for a disable: revoked before and after the records go.
        self.require(name)?;
        let mut revoked = tokens.revoke_identity(name.as_str(), now_ms)?;
        // Secret-ids and bindings first, the role index and the record last,
        // in batches that fit the store: a delete cut short leaves the
        // identity, with less of what it held. The record goes only as read:
        // a binding another node added meanwhile is read again and deleted.
        self.modify_record_tries(name.as_str(), REVOKING_TRIES, |draft| {
            let record = &draft.record;
            let mut keys = self.secret_id_keys(&record.name)?;
            for binding in &record.cert_bindings {
                // Only while it still names this identity: after a delete
                // cut short, another identity may have bound it since.
                let key = cert_key(binding);
                let holder = self.barrier.get(&key)?;
                if holder.is_some_and(|h| h.as_slice() == record.name.as_bytes()) {
                    keys.push(key);
                }
            }
            keys.push(format!("{ROLE_PREFIX}{}", record.role_id));
            draft.before = keys.into_iter().map(|k| (k, None)).collect();
            draft.write = RecordWrite::Delete;
            Ok(())
        })?;
        revoked += tokens.revoke_identity(name.as_str(), now_ms)?;
        Ok(revoked)
    }

    /// Revokes the tokens of identities whose expiry has passed, and the
    /// certificates issued to log in as them (once each); returns how many
    /// of each were revoked. Tokens also carry the identity's expiry as a
    /// hard limit, so for them this is the second line, not the first; a
    /// certificate is also used outside keyward, where only the CRL tells
    /// that its identity is gone.
    ///
    /// The certificates of every identity due go in one call (one pass over
    /// the inventory, one CRL). With `catch_up`, those of identities whose
    /// expiry was handled already are revoked too: versions before 0.6.15
    /// left them valid (the sweep's first pass in a process does it). An
    /// identity is marked handled only once its tokens and the certificates
    /// are revoked; one whose tokens or mark fail is counted, logged and
    /// left for the next sweep, and the others go on.
    pub fn sweep_expired(
        &self,
        tokens: &dyn TokenRevoker,
        certificates: &dyn CertificateRevoker,
        now_ms: u64,
        catch_up: bool,
    ) -> Result<Swept, IdentityError> {
        let expired: Vec<IdentityRecord> = self
            .all()?
            .into_iter()
            .filter(|r| r.is_expired(now_ms))
            .collect();
        let mut swept = Swept::default();
        let mut due = Vec::new();
        for record in expired.iter().filter(|r| !r.expiry_handled) {
            match tokens.revoke_identity(&record.name, now_ms) {
                Ok(n) => {
                    swept.tokens += n;
                    due.push(record.name.as_str());
                }
                Err(error) => {
                    swept.failed += 1;
                    tracing::warn!(identity = %record.name, %error, "expiry sweep: the identity's tokens were not revoked");
                }
            }
        }
        let certified: Vec<&str> = if catch_up {
            expired.iter().map(|r| r.name.as_str()).collect()
        } else {
            due.clone()
        };
        if !certified.is_empty() {
            swept.certificates = certificates.revoke_issued_for(&certified, now_ms)?;
        }
        for name in due {
            let handled = self.modify_record(name, |draft| {
                let fresh = &mut draft.record;
                // Not if its expiry moved (or another node marked it).
                if fresh.is_expired(now_ms) && !fresh.expiry_handled {
                    fresh.expiry_handled = true;
                } else {
                    draft.write = RecordWrite::Keep;
                }
                Ok(())
            });
            match handled {
                // Deleted since: its delete revoked its tokens.
                Ok(_) | Err(IdentityError::NotFound) => {}
                Err(error) => {
                    swept.failed += 1;
                    tracing::warn!(identity = %name, %error, "expiry sweep: the identity was not marked handled");
                }
            }
        }
        Ok(swept)
    }

    /// Makes a secret-id for role-id login; its text is returned once.
    pub fn create_secret_id(
        &self,
        name: &IdentityName,
        spec: SecretIdSpec,
        now_ms: u64,
    ) -> Result<NewSecretId, IdentityError> {
        if spec.cidrs.len() > MAX_LIST {
            return Err(IdentityError::Invalid(format!(
                "at most {MAX_LIST} CIDR blocks"
            )));
        }
        // Written first, then the record read: a disable stores the
        // disabled record and then deletes the secret-ids it finds
        // (`set_disabled_checked`), so either that read sees the disable
        // (and this secret-id is taken back) or the disable's scan comes
        // after this write and finds it. No lock and no write of the
        // record: making secret-ids holds up no other change.
        let record = self.require(name)?;
        if record.disabled {
            return Err(IdentityError::Disabled(record.name));
        }
        if record.is_expired(now_ms) {
            return Err(IdentityError::Expired(record.name));
        }
        let text = SecretIdText::generate()?;
        let hash = self.secret_id_hash(&text)?;
        let expires_at_ms = if spec.ttl_ms == 0 {
            0
        } else {
            now_ms.saturating_add(spec.ttl_ms)
        };
        let stored = SecretIdRecord {
            identity: record.name.clone(),
            role_id: record.role_id.clone(),
            created_at_ms: now_ms,
            expires_at_ms,
            uses_left: spec.uses,
            cidrs: spec.cidrs.iter().map(ToString::to_string).collect(),
            handle: format!("sid_{}", &hash[..12]),
        };
        let bytes = stored.encode_to_vec();
        let key = format!("{SECRET_ID_RECORD_PREFIX}{hash}");
        let index = format!("{SECRET_IDS_OF_PREFIX}{}/{hash}", record.name);
        self.barrier
            .batch(&[PlainOp::Put(&key, &bytes), PlainOp::Put(&index, b"")])?;
        #[cfg(test)]
        self.before_record_write.run();
        let now = self.get(&record.name)?;
        if now
            .as_ref()
            .is_none_or(|r| r.disabled || r.role_id != record.role_id || r.is_expired(now_ms))
        {
            // Disabled, expired (or deleted, or made again) since: taken back.
            self.barrier
                .batch(&[PlainOp::Delete(&key), PlainOp::Delete(&index)])?;
            return Err(match now {
                Some(r) if r.is_expired(now_ms) && !r.disabled => {
                    IdentityError::Expired(record.name)
                }
                Some(_) => IdentityError::Disabled(record.name),
                None => IdentityError::NotFound,
            });
        }
        Ok(NewSecretId {
            role_id: record.role_id,
            secret_id: text,
            expires_at_ms,
        })
    }

    fn secret_id_hash(&self, text: &SecretIdText) -> Result<String, IdentityError> {
        let key = self.barrier.derive_key("identities/secret-id-hash")?;
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.as_slice());
        Ok(hex::encode(
            ring::hmac::sign(&key, text.expose().as_bytes()).as_ref(),
        ))
    }

    /// Every stored secret-id (for governance: expiry dates, never the text).
    pub fn secret_ids(&self) -> Result<Vec<SecretIdRecord>, IdentityError> {
        self.barrier
            .scan_prefix(SECRET_ID_RECORD_PREFIX)?
            .iter()
            .map(|(_, raw)| Self::decode(raw))
            .collect()
    }

    /// The identity of a role-id, if any.
    pub fn by_role_id(&self, role_id: &str) -> Result<Option<IdentityRecord>, IdentityError> {
        if role_id.is_empty() || role_id.len() > 128 {
            return Ok(None);
        }
        match self.barrier.get(&format!("{ROLE_PREFIX}{role_id}"))? {
            Some(name) => {
                let name = std::str::from_utf8(&name).map_err(|_| IdentityError::Corrupt)?;
                self.get(name)
            }
            None => Ok(None),
        }
    }

    /// Checks a role-id + secret-id pair and spends one use of the secret-id.
    /// `Ok(None)` for every refusal, whatever its reason (unknown, expired,
    /// used up, wrong role, wrong source), so a caller learns nothing.
    pub fn spend_secret_id(
        &self,
        role_id: &str,
        secret_id: &str,
        source: Option<IpAddr>,
        now_ms: u64,
    ) -> Result<Option<SecretIdRecord>, IdentityError> {
        let Ok(text) = SecretIdText::parse(secret_id) else {
            return Ok(None);
        };
        let hash = self.secret_id_hash(&text)?;
        let key = format!("{SECRET_ID_RECORD_PREFIX}{hash}");
        let _guard = self.lock();
        // Counted by compare-and-swap on the record, so that presentations
        // on several nodes (etcd) never share a use: a conflict means
        // another use (or a revocation) won; read again.
        for _ in 0..SPEND_ATTEMPTS {
            let Some((raw, stamp)) = self.barrier.get_stamped(&key)? else {
                return Ok(None);
            };
            let mut record: SecretIdRecord = Self::decode(&raw)?;
            let index = format!("{SECRET_IDS_OF_PREFIX}{}/{hash}", record.identity);
            if record.expires_at_ms != 0 && record.expires_at_ms <= now_ms {
                self.barrier
                    .batch(&[PlainOp::Delete(&key), PlainOp::Delete(&index)])?;
                return Ok(None);
            }
            if record.role_id != role_id {
                return Ok(None);
            }
            let cidrs: Vec<Cidr> = record
                .cidrs
                .iter()
                .map(|c| c.parse().map_err(|_| IdentityError::Corrupt))
                .collect::<Result<_, _>>()?;
            if !Cidr::any_contains(&cidrs, source) {
                return Ok(None);
            }
            match record.uses_left {
                0 => return Ok(Some(record)),
                1 => {
                    // The last use: removing the record is the use.
                    if !self.barrier.compare_and_swap(&key, Some(&stamp), None)? {
                        continue;
                    }
                    // An index entry without its record is skipped by every
                    // reader; failing the login for it would waste the use.
                    if let Err(error) = self.barrier.delete(&index) {
                        tracing::warn!(%error, "a used-up secret-id's index entry stays");
                    }
                    record.uses_left = 0;
                    return Ok(Some(record));
                }
                n => {
                    record.uses_left = n - 1;
                    let encoded = record.encode_to_vec();
                    if self
                        .barrier
                        .compare_and_swap(&key, Some(&stamp), Some(&encoded))?
                    {
                        return Ok(Some(record));
                    }
                }
            }
        }
        Err(IdentityError::Barrier(BarrierError::Storage(
            crate::storage::StorageError::Busy(
                "the secret-id's use count changed at every attempt; try again".into(),
            ),
        )))
    }

    /// Notes a successful login of `seen`, the record as the login read it.
    pub fn record_login(&self, seen: &IdentityRecord, now_ms: u64) -> Result<(), IdentityError> {
        // Within the second of the last noted login: nothing to write, and no
        // need to read the record again under the lock.
        if now_ms.saturating_sub(seen.last_login_ms) < 1000 {
            return Ok(());
        }
        // Only over the record read: on a shared store another node may
        // have written it since (a disable), and a login must never write
        // back what it read before.
        let noted = self.modify_record(&seen.name, |draft| {
            // One write per second at most per identity: login throughput is
            // not spent on a timestamp nobody reads at millisecond precision.
            if now_ms.saturating_sub(draft.record.last_login_ms) < 1000 {
                draft.write = RecordWrite::Keep;
            } else {
                draft.record.last_login_ms = now_ms;
            }
            Ok(())
        });
        match noted {
            // Deleted since the login read it, or changed at every try:
            // the login stands, the time waits for the next one.
            Ok(_) | Err(IdentityError::NotFound | IdentityError::Contended) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Binds a certificate (subject DN or SPIFFE ID) to an identity. A DN
    /// is parsed here, once, into the structure logins compare with.
    pub fn bind_cert(
        &self,
        name: &IdentityName,
        subject: Option<&str>,
        spiffe_id: Option<&str>,
    ) -> Result<IdentityRecord, IdentityError> {
        let binding = match (subject, spiffe_id) {
            (Some(dn), None) => CertBinding::subject(&Dn::parse(dn)?),
            (None, Some(id)) => {
                check_spiffe_id(id)?;
                CertBinding::spiffe(id)
            }
            _ => {
                return Err(IdentityError::Invalid(
                    "give exactly one of a subject DN or a SPIFFE ID".into(),
                ))
            }
        };
        let key = cert_key(&binding);
        let (record, ()) = self.modify_record(name.as_str(), |draft| {
            let holder = self.barrier.get_stamped(&key)?;
            if let Some((holder, _)) = &holder {
                if holder.as_slice() != draft.record.name.as_bytes() {
                    return Err(IdentityError::BindingTaken(
                        String::from_utf8_lossy(holder).into_owned(),
                    ));
                }
            }
            let record = &mut draft.record;
            if !record.cert_bindings.iter().any(|b| cert_key(b) == key) {
                if record.cert_bindings.len() >= MAX_LIST {
                    return Err(IdentityError::Invalid(format!(
                        "at most {MAX_LIST} certificate bindings"
                    )));
                }
                record.cert_bindings.push(binding.clone());
            }
            // The index entry with the record, in one batch, and only while
            // it is as read: another node may be binding the certificate
            // to another identity.
            draft
                .before
                .push((key.clone(), Some(record.name.clone().into_bytes())));
            draft
                .expect
                .push((key.clone(), holder.map(|(_, stamp)| stamp)));
            Ok(())
        })?;
        Ok(record)
    }

    /// The identity bound to a certificate's SPIFFE ID or subject, if any
    /// (SPIFFE IDs first: they are the stronger name). The subject is the
    /// certificate's own RDNs; a binding matches only if its parsed DN is
    /// the same structure.
    pub fn by_cert(
        &self,
        subject: Option<&Dn>,
        spiffe_ids: &[String],
    ) -> Result<Option<IdentityRecord>, IdentityError> {
        for id in spiffe_ids {
            let probe = CertBinding::spiffe(id);
            if let Some(record) = self.cert_holder(&probe)? {
                if record.cert_bindings.iter().any(|b| b.spiffe_id == *id) {
                    return Ok(Some(record));
                }
            }
        }
        if let Some(dn) = subject {
            let probe = CertBinding::subject(dn);
            if let Some(record) = self.cert_holder(&probe)? {
                if record
                    .cert_bindings
                    .iter()
                    .any(|b| b.dn().as_ref() == Some(dn))
                {
                    return Ok(Some(record));
                }
            }
        }
        Ok(None)
    }

    fn cert_holder(&self, binding: &CertBinding) -> Result<Option<IdentityRecord>, IdentityError> {
        match self.barrier.get(&cert_key(binding))? {
            Some(name) => {
                let name = std::str::from_utf8(&name).map_err(|_| IdentityError::Corrupt)?;
                self.get(name)
            }
            None => Ok(None),
        }
    }

    /// Removes one binding (the certificate subject or SPIFFE ID given, or
    /// every OIDC binding to an issuer). Tokens already issued through it
    /// are not revoked: disable the identity for that.
    pub fn unbind(
        &self,
        name: &IdentityName,
        which: &Unbind,
    ) -> Result<IdentityRecord, IdentityError> {
        let dn = match which {
            Unbind::CertSubject(text) => Some(Dn::parse(text)?),
            _ => None,
        };
        let (record, ()) = self.modify_record(name.as_str(), |draft| {
            let record = &mut draft.record;
            let held = (record.cert_bindings.len(), record.oidc_bindings.len());
            let mut freed: Vec<String> = Vec::new();
            match which {
                Unbind::CertSubject(_) => record.cert_bindings.retain(|b| {
                    let hit = b.spiffe_id.is_empty() && b.dn() == dn;
                    if hit {
                        freed.push(cert_key(b));
                    }
                    !hit
                }),
                Unbind::CertSpiffe(id) => record.cert_bindings.retain(|b| {
                    let hit = b.spiffe_id == *id;
                    if hit {
                        freed.push(cert_key(b));
                    }
                    !hit
                }),
                Unbind::OidcIssuer(issuer) => record.oidc_bindings.retain(|b| b.issuer != *issuer),
            }
            if (record.cert_bindings.len(), record.oidc_bindings.len()) == held {
                return Err(IdentityError::NoSuchBinding);
            }
            // The index entries with the record: one batch (a record holds
            // at most 64 certificate bindings).
            draft.before = freed.into_iter().map(|k| (k, None)).collect();
            Ok(())
        })?;
        Ok(record)
    }

    /// Binds JWTs of an issuer with these claims to an identity.
    pub fn bind_oidc(
        &self,
        name: &IdentityName,
        issuer: &str,
        claims: Vec<(String, String)>,
    ) -> Result<IdentityRecord, IdentityError> {
        if claims.is_empty() || claims.len() > MAX_LIST {
            return Err(IdentityError::Invalid(format!(
                "give 1 to {MAX_LIST} bound claims KEY=VALUE (a binding without claims would admit every token of the issuer)"
            )));
        }
        for (k, v) in &claims {
            if k.is_empty() {
                return Err(IdentityError::Invalid("a claim key is empty".into()));
            }
            check_text("claim", k)?;
            check_text("claim value", v)?;
        }
        if self.issuer(issuer)?.is_none() {
            return Err(IdentityError::UnknownIssuer(printable(issuer)));
        }
        let binding = OidcBinding {
            issuer: issuer.to_owned(),
            claims: claims
                .into_iter()
                .map(|(key, value)| ClaimPair { key, value })
                .collect(),
        };
        let (record, ()) = self.modify_record(name.as_str(), |draft| {
            let record = &mut draft.record;
            if !record.oidc_bindings.contains(&binding) {
                if record.oidc_bindings.len() >= MAX_LIST {
                    return Err(IdentityError::Invalid(format!(
                        "at most {MAX_LIST} OIDC bindings"
                    )));
                }
                record.oidc_bindings.push(binding.clone());
            }
            Ok(())
        })?;
        Ok(record)
    }

    /// Identities with a binding to `issuer`, with that binding's claims.
    pub fn oidc_candidates(
        &self,
        issuer: &str,
    ) -> Result<Vec<(IdentityRecord, Vec<ClaimSet>)>, IdentityError> {
        let mut out = Vec::new();
        for record in self.all()? {
            let bound: Vec<ClaimSet> = record
                .oidc_bindings
                .iter()
                .filter(|b| b.issuer == issuer)
                .map(OidcBinding::claim_pairs)
                .collect();
            if !bound.is_empty() {
                out.push((record, bound));
            }
        }
        Ok(out)
    }

    /// Stores (or replaces) an OIDC issuer; the record is checked first.
    ///
    /// Whoever sets an issuer's key set, URL or audience decides who can log
    /// in as every identity bound to it. So unless the stored issuer is
    /// already exactly this one, `may_rebind` is asked about the policies of
    /// every identity with a binding that names the issuer, and its refusal
    /// ends the put. That holds whether or not an issuer of the name is
    /// stored now: bindings outlive their issuer, so re-creating a removed
    /// issuer that bindings still name needs the same as changing it. The
    /// check and the write happen under the store's lock, so no binding can
    /// be added between them.
    ///
    /// A `jwks_file` must name a regular file under `jwks_dir`
    /// (`oidc.jwks_dir`; without one, files are refused); its real path is
    /// stored.
    pub fn put_issuer<E: From<IdentityError>>(
        &self,
        mut issuer: IssuerRecord,
        jwks_dir: Option<&Path>,
        may_rebind: impl FnOnce(&[String]) -> Result<(), E>,
    ) -> Result<IssuerRecord, E> {
        use crate::oidc::{confine_jwks_file, JwksError};
        if IdentityName::parse(&issuer.name).is_err() {
            return Err(IdentityError::Invalid(
                "issuer name: 1 to 128 characters of [A-Za-z0-9._-]".into(),
            )
            .into());
        }
        if issuer.jwks_file.is_empty() == issuer.jwks_url.is_empty() {
            return Err(IdentityError::Invalid(
                "give exactly one of a JWKS file or a JWKS URL".into(),
            )
            .into());
        }
        if !issuer.jwks_file.is_empty() {
            let invalid = |e: JwksError| IdentityError::Invalid(e.to_string());
            let dir = jwks_dir.ok_or_else(|| invalid(JwksError::NoJwksDir))?;
            let real = confine_jwks_file(dir, Path::new(&issuer.jwks_file)).map_err(invalid)?;
            issuer.jwks_file = real
                .to_str()
                .ok_or_else(|| IdentityError::Invalid("the JWKS file path is not UTF-8".into()))?
                .to_owned();
        }
        issuer
            .config()
            .map_err(|e| IdentityError::Invalid(e.to_string()))?;
        let _guard = self.lock();
        if self.issuer(&issuer.name)?.as_ref() != Some(&issuer) {
            may_rebind(&self.policies_bound_to(&issuer.name)?)?;
        }
        self.barrier
            .put(
                &format!("{ISSUER_PREFIX}{}", issuer.name),
                &issuer.encode_to_vec(),
            )
            .map_err(IdentityError::from)?;
        Ok(issuer)
    }

    /// Every policy held by an identity with a binding to `issuer`, sorted.
    fn policies_bound_to(&self, issuer: &str) -> Result<Vec<String>, IdentityError> {
        let mut held = std::collections::BTreeSet::new();
        for record in self.all()? {
            if record.oidc_bindings.iter().any(|b| b.issuer == issuer) {
                held.extend(record.policies);
            }
        }
        Ok(held.into_iter().collect())
    }

    pub fn issuer(&self, name: &str) -> Result<Option<IssuerRecord>, IdentityError> {
        match self.barrier.get(&format!("{ISSUER_PREFIX}{name}"))? {
            Some(raw) => Ok(Some(Self::decode(&raw)?)),
            None => Ok(None),
        }
    }

    pub fn issuers(&self) -> Result<Vec<IssuerRecord>, IdentityError> {
        self.barrier
            .scan_prefix(ISSUER_PREFIX)?
            .iter()
            .map(|(_, raw)| Self::decode(raw))
            .collect()
    }
}
