//! keyward as an OIDC issuer: signing keys, roles, identity tokens (JWTs)
//! and the discovery document and JWKS that relying parties fetch.
//!
//! Storage (through the barrier, encrypted like every value):
//! - `federation/keys/<kid>` -> [`KeyRecord`]: the PKCS#8 private key, the
//!   public key, when it was made, when it stopped signing (0: it signs
//!   now), and a time no earlier than the `exp` of every token it signed;
//! - `federation/roles/<name>` -> [`RoleRecord`].
//!
//! Key lifetime: one key signs; `rotate` makes a new one and retires the
//! old, which stays in the JWKS until `max_exp_ms` (every token it signed
//! has expired), then leaves it (and storage, at the next rotation or
//! prune). `max_exp_ms` is raised in steps of [`EXP_STEP_MS`] ahead of the
//! tokens, so a burst of tokens writes the key record once, not per token.
//!
//! Private keys live in memory only while unsealed (`on_seal` drops them).
//! The JWT encoding is base64url JSON (RFC 7515 compact), as `oidc::jwt`
//! reads it; signatures are ring's (ES256: P-256 fixed `r || s`; EdDSA).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use prost::Message;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, ECDSA_P256_SHA256_FIXED_SIGNING,
};
use serde_json::{json, Map, Value};
use zeroize::Zeroizing;

use crate::barrier::{Barrier, BarrierError};

const KEYS_PREFIX: &str = "federation/keys/";
const ROLES_PREFIX: &str = "federation/roles/";
/// `max_exp_ms` runs this far ahead of the tokens a key signed.
pub const EXP_STEP_MS: u64 = 5 * 60 * 1000;
/// The longest life a role may give its tokens.
pub const MAX_ROLE_TTL_SECS: u64 = 24 * 3600;
/// Claims a role may not set: the issuer sets them.
const RESERVED_CLAIMS: &[&str] = &[
    "iss", "sub", "aud", "iat", "nbf", "exp", "jti", "kind", "owner", "azp", "act", "may_act",
];
/// What a claim template may name, besides `identity.metadata.KEY`.
const TEMPLATE_FIELDS: &[&str] = &["identity.name", "identity.kind", "identity.owner"];
/// A template names one metadata label as `{{identity.metadata.KEY}}`.
const METADATA_FIELD: &str = "identity.metadata.";

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("oidc_provider.issuer and oidc_provider.trust_domain must be configured to issue identity tokens")]
    NotConfigured,
    #[error("no such OIDC role")]
    NoRole,
    #[error("invalid OIDC role: {0}")]
    BadRole(String),
    #[error("audience '{0}' is not one of the role's audiences")]
    UnknownAudience(String),
    #[error("the role has several audiences: name one with --audience")]
    AudienceNeeded,
    #[error("the TTL ({asked}s) is longer than the role's max TTL ({max}s)")]
    TtlTooLong { asked: u64, max: u64 },
    #[error(
        "only identities of the inventory, enabled and not past their expiry, get identity tokens"
    )]
    NotAnIdentity,
    #[error("the caller's token expires before the identity token could start")]
    CallerExpiring,
    #[error("claim '{claim}' of this role names metadata label '{key}', which the identity does not have (set it with 'keyward identity metadata')")]
    MissingMetadata { claim: String, key: String },
    #[error("the signing key could not be made or used")]
    Crypto,
    #[error("a stored federation record is corrupt")]
    Corrupt,
    #[error(transparent)]
    Barrier(#[from] BarrierError),
}

/// A signing key as stored.
#[derive(Clone, PartialEq, Message)]
pub struct KeyRecord {
    #[prost(string, tag = "1")]
    pub kid: String,
    /// `ES256` or `EdDSA`.
    #[prost(string, tag = "2")]
    pub alg: String,
    #[prost(bytes = "vec", tag = "3")]
    pub pkcs8: Vec<u8>,
    #[prost(bytes = "vec", tag = "4")]
    pub public: Vec<u8>,
    #[prost(uint64, tag = "5")]
    pub created_at_ms: u64,
    /// 0: the key signs now.
    #[prost(uint64, tag = "6")]
    pub retired_at_ms: u64,
    /// No token this key signed expires after this.
    #[prost(uint64, tag = "7")]
    pub max_exp_ms: u64,
}

/// A role as stored.
#[derive(Clone, PartialEq, Message)]
pub struct RoleRecord {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, repeated, tag = "2")]
    pub audiences: Vec<String>,
    #[prost(uint64, tag = "3")]
    pub max_ttl_secs: u64,
    #[prost(btree_map = "string, string", tag = "4")]
    pub claims: BTreeMap<String, String>,
}

impl RoleRecord {
    /// Checks a role as given by an operator; the error names the rule.
    pub fn validate(&self) -> Result<(), IssuerError> {
        let bad = |m: &str| Err(IssuerError::BadRole(m.to_owned()));
        if crate::policy::validate_name(&self.name).is_err() {
            return bad("the name must match [a-z0-9][a-z0-9_-]{0,63}");
        }
        if self.audiences.is_empty() || self.audiences.len() > 16 {
            return bad("give 1 to 16 audiences");
        }
        if self.audiences.iter().any(|a| {
            a.is_empty() || a.len() > 256 || a.chars().any(|c| c.is_control() || c.is_whitespace())
        }) {
            return bad("an audience is 1 to 256 characters, without spaces or control characters");
        }
        if self.max_ttl_secs == 0 || self.max_ttl_secs > MAX_ROLE_TTL_SECS {
            return bad("the max TTL is 1s to 24h");
        }
        if self.claims.len() > 32 {
            return bad("at most 32 claims");
        }
        for (key, template) in &self.claims {
            if key.is_empty()
                || key.len() > 64
                || !key
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
            {
                return bad("a claim name is 1 to 64 of [A-Za-z0-9_.-]");
            }
            if RESERVED_CLAIMS.contains(&key.as_str()) {
                return Err(IssuerError::BadRole(format!(
                    "claim '{key}' is set by the issuer, not by a role"
                )));
            }
            if template.len() > 1024 {
                return bad("a claim template is at most 1024 bytes");
            }
            check_template(template)?;
        }
        Ok(())
    }
}

/// Every `{{...}}` of a template names an identity field this issuer knows.
fn check_template(template: &str) -> Result<(), IssuerError> {
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            return Err(IssuerError::BadRole(
                "a claim template has '{{' without '}}'".into(),
            ));
        };
        let field = after[..end].trim();
        let metadata_key = field
            .strip_prefix(METADATA_FIELD)
            .is_some_and(|key| crate::identity::check_metadata_key(key).is_ok());
        if !TEMPLATE_FIELDS.contains(&field) && !metadata_key {
            return Err(IssuerError::BadRole(format!(
                "a claim template may use {{{{identity.name}}}}, {{{{identity.kind}}}}, {{{{identity.owner}}}} and {{{{identity.metadata.KEY}}}}; not '{}'",
                field.chars().take(64).collect::<String>()
            )));
        }
        rest = &after[end + 2..];
    }
    Ok(())
}

/// What a template may read of an identity: its name, kind, owner and
/// metadata labels, all public (`identity get` shows them); never a secret,
/// a secret-id or a token, which this type does not hold.
#[derive(Debug, Clone)]
pub struct IdentityFacts<'a> {
    pub name: &'a str,
    pub kind: &'a str,
    pub owner: &'a str,
    pub metadata: &'a BTreeMap<String, String>,
}

/// Fills a template's fields, in one pass (a value that looks like a
/// field is not expanded again). A metadata label the identity lacks is an
/// error naming `claim` and the key: nothing is issued.
fn render(claim: &str, template: &str, who: &IdentityFacts<'_>) -> Result<String, IssuerError> {
    let mut out = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(start) = rest.find("{{") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find("}}") else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let field = after[..end].trim();
        match field {
            "identity.name" => out.push_str(who.name),
            "identity.kind" => out.push_str(who.kind),
            "identity.owner" => out.push_str(who.owner),
            _ => {
                if let Some(key) = field.strip_prefix(METADATA_FIELD) {
                    let value =
                        who.metadata
                            .get(key)
                            .ok_or_else(|| IssuerError::MissingMetadata {
                                claim: claim.to_owned(),
                                key: key.to_owned(),
                            })?;
                    out.push_str(value);
                }
            }
        }
        rest = &after[end + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// A key pair ready to sign.
enum Pair {
    Es256(EcdsaKeyPair),
    EdDsa(Ed25519KeyPair),
}

struct LiveKey {
    record: KeyRecord,
    pair: Pair,
}

impl LiveKey {
    fn open(record: KeyRecord) -> Result<Self, IssuerError> {
        let rng = SystemRandom::new();
        let pair = match record.alg.as_str() {
            "ES256" => Pair::Es256(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &record.pkcs8, &rng)
                    .map_err(|_| IssuerError::Corrupt)?,
            ),
            "EdDSA" => Pair::EdDsa(
                Ed25519KeyPair::from_pkcs8(&record.pkcs8).map_err(|_| IssuerError::Corrupt)?,
            ),
            _ => return Err(IssuerError::Corrupt),
        };
        Ok(Self { record, pair })
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, IssuerError> {
        match &self.pair {
            Pair::Es256(p) => p
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| IssuerError::Crypto),
            Pair::EdDsa(p) => Ok(p.sign(message).as_ref().to_vec()),
        }
    }
}

/// A new key record (`alg` ES256 or EdDSA), made with ring.
fn new_key(alg: &str, now_ms: u64) -> Result<KeyRecord, IssuerError> {
    let rng = SystemRandom::new();
    let (pkcs8, public) = match alg {
        "EdDSA" => {
            let doc = Zeroizing::new(
                Ed25519KeyPair::generate_pkcs8(&rng)
                    .map_err(|_| IssuerError::Crypto)?
                    .as_ref()
                    .to_vec(),
            );
            let pair = Ed25519KeyPair::from_pkcs8(&doc).map_err(|_| IssuerError::Crypto)?;
            let public = pair.public_key().as_ref().to_vec();
            (doc, public)
        }
        _ => {
            let doc = Zeroizing::new(
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|_| IssuerError::Crypto)?
                    .as_ref()
                    .to_vec(),
            );
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &doc, &rng)
                .map_err(|_| IssuerError::Crypto)?;
            let public = pair.public_key().as_ref().to_vec();
            (doc, public)
        }
    };
    // The kid: the first 16 bytes of SHA-256 of the public key, base64url.
    let digest = ring::digest::digest(&ring::digest::SHA256, &public);
    let kid = URL_SAFE_NO_PAD.encode(&digest.as_ref()[..16]);
    Ok(KeyRecord {
        kid,
        alg: if alg == "EdDSA" { "EdDSA" } else { "ES256" }.to_owned(),
        pkcs8: pkcs8.to_vec(),
        public,
        created_at_ms: now_ms,
        retired_at_ms: 0,
        max_exp_ms: 0,
    })
}

/// One public key as a JWK (RFC 7517): never anything private.
pub fn public_jwk(record: &KeyRecord) -> Value {
    match record.alg.as_str() {
        "EdDSA" => json!({
            "kty": "OKP", "crv": "Ed25519", "use": "sig", "alg": "EdDSA",
            "kid": record.kid, "x": URL_SAFE_NO_PAD.encode(&record.public),
        }),
        _ => {
            // Uncompressed point: 0x04 || x || y.
            let (x, y) = record
                .public
                .get(1..)
                .map(|xy| xy.split_at(xy.len() / 2))
                .unwrap_or((&[], &[]));
            json!({
                "kty": "EC", "crv": "P-256", "use": "sig", "alg": "ES256",
                "kid": record.kid, "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y),
            })
        }
    }
}

/// The JWKS: the public keys published at `now_ms` (the signing key and
/// every retired key whose tokens may still be live), newest first.
pub fn jwks_json(keys: &[KeyRecord], now_ms: u64) -> String {
    let mut published: Vec<&KeyRecord> = keys.iter().filter(|k| is_published(k, now_ms)).collect();
    published.sort_by_key(|k| std::cmp::Reverse(k.created_at_ms));
    json!({ "keys": published.into_iter().map(public_jwk).collect::<Vec<_>>() }).to_string()
}

fn is_published(key: &KeyRecord, now_ms: u64) -> bool {
    key.retired_at_ms == 0 || now_ms < key.max_exp_ms
}

/// The OpenID Connect discovery document of `issuer`.
pub fn discovery_json(issuer: &str, algorithms: &[&str]) -> String {
    json!({
        "issuer": issuer,
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": algorithms,
        "claims_supported": ["iss", "sub", "aud", "iat", "nbf", "exp", "jti", "kind", "owner"],
    })
    .to_string()
}

/// What to put in one identity token.
#[derive(Debug, Clone)]
pub struct TokenClaims<'a> {
    pub issuer: &'a str,
    pub trust_domain: &'a str,
    pub who: IdentityFacts<'a>,
    pub audience: &'a str,
    pub role: &'a RoleRecord,
    pub now_ms: u64,
    pub exp_ms: u64,
    pub jti: &'a str,
}

/// The claims of an identity token, as JSON.
pub fn claims_json(c: &TokenClaims<'_>) -> Result<Map<String, Value>, IssuerError> {
    let mut claims = Map::new();
    for (key, template) in &c.role.claims {
        claims.insert(key.clone(), Value::String(render(key, template, &c.who)?));
    }
    let now = c.now_ms / 1000;
    claims.insert("iss".into(), json!(c.issuer));
    claims.insert(
        "sub".into(),
        json!(format!(
            "spiffe://{}/{}/{}",
            c.trust_domain, c.who.kind, c.who.name
        )),
    );
    claims.insert("aud".into(), json!(c.audience));
    claims.insert("iat".into(), json!(now));
    claims.insert("nbf".into(), json!(now));
    claims.insert("exp".into(), json!(c.exp_ms / 1000));
    claims.insert("jti".into(), json!(c.jti));
    claims.insert("kind".into(), json!(c.who.kind));
    claims.insert("owner".into(), json!(c.who.owner));
    Ok(claims)
}

/// Signing keys and roles of one vault.
pub struct Issuer {
    barrier: Arc<Barrier>,
    /// The signing key, loaded on first use after an unseal.
    active: Mutex<Option<Arc<LiveKey>>>,
}

impl Issuer {
    pub fn new(barrier: Arc<Barrier>) -> Self {
        Self {
            barrier,
            active: Mutex::new(None),
        }
    }

    /// Drops the private key from memory.
    pub fn on_seal(&self) {
        *self.active.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    pub fn keys(&self) -> Result<Vec<KeyRecord>, IssuerError> {
        self.barrier
            .scan_prefix(KEYS_PREFIX)?
            .into_iter()
            .map(|(_, raw)| KeyRecord::decode(raw.as_slice()).map_err(|_| IssuerError::Corrupt))
            .collect()
    }

    fn store_key(&self, key: &KeyRecord) -> Result<(), IssuerError> {
        self.barrier
            .put(&format!("{KEYS_PREFIX}{}", key.kid), &key.encode_to_vec())?;
        Ok(())
    }

    /// The signing key: the stored one that is not retired, or a new one.
    fn signing_key(&self, alg: &str, now_ms: u64) -> Result<Arc<LiveKey>, IssuerError> {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(key) = active.as_ref() {
            return Ok(key.clone());
        }
        let stored = self
            .keys()?
            .into_iter()
            .filter(|k| k.retired_at_ms == 0)
            .max_by_key(|k| k.created_at_ms);
        let record = match stored {
            Some(record) => record,
            None => {
                let record = new_key(alg, now_ms)?;
                self.store_key(&record)?;
                record
            }
        };
        let key = Arc::new(LiveKey::open(record)?);
        *active = Some(key.clone());
        Ok(key)
    }

    /// Makes a new signing key and retires the others (they stay published
    /// until their tokens have expired); drops keys no longer published.
    /// Returns the new key's id.
    pub fn rotate(&self, alg: &str, now_ms: u64) -> Result<String, IssuerError> {
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        let record = new_key(alg, now_ms)?;
        self.store_key(&record)?;
        for mut old in self.keys()? {
            if old.kid == record.kid {
                continue;
            }
            if old.retired_at_ms == 0 {
                old.retired_at_ms = now_ms;
                // The in-memory key may know a later exp than the stored one.
                if let Some(live) = active.as_ref().filter(|l| l.record.kid == old.kid) {
                    old.max_exp_ms = old.max_exp_ms.max(live.record.max_exp_ms);
                }
                self.store_key(&old)?;
            } else if !is_published(&old, now_ms) {
                self.barrier.delete(&format!("{KEYS_PREFIX}{}", old.kid))?;
            }
        }
        let kid = record.kid.clone();
        *active = Some(Arc::new(LiveKey::open(record)?));
        Ok(kid)
    }

    /// Removes stored keys that have left the JWKS; returns how many.
    pub fn prune(&self, now_ms: u64) -> Result<usize, IssuerError> {
        let mut removed = 0;
        for old in self.keys()? {
            if !is_published(&old, now_ms) {
                self.barrier.delete(&format!("{KEYS_PREFIX}{}", old.kid))?;
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// When the signing key is due for rotation (`period` after it was
    /// made), if there is one.
    pub fn next_rotation_ms(&self, period_ms: u64) -> Result<Option<u64>, IssuerError> {
        Ok(self
            .keys()?
            .into_iter()
            .filter(|k| k.retired_at_ms == 0)
            .map(|k| k.created_at_ms.saturating_add(period_ms))
            .min())
    }

    /// Signs one identity token; returns the compact JWT.
    pub fn sign(
        &self,
        alg: &str,
        claims: &TokenClaims<'_>,
    ) -> Result<Zeroizing<String>, IssuerError> {
        // First: a template that cannot be filled stores and signs nothing.
        let payload = Value::Object(claims_json(claims)?);
        let mut key = self.signing_key(alg, claims.now_ms)?;
        if claims.exp_ms > key.record.max_exp_ms {
            // Raise the stored bound ahead of the token, in steps.
            let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(live) = active.as_ref().filter(|l| l.record.kid == key.record.kid) {
                if claims.exp_ms > live.record.max_exp_ms {
                    let mut record = live.record.clone();
                    record.max_exp_ms = claims.exp_ms.saturating_add(EXP_STEP_MS);
                    self.store_key(&record)?;
                    let refreshed = Arc::new(LiveKey::open(record)?);
                    *active = Some(refreshed.clone());
                    key = refreshed;
                } else {
                    key = live.clone();
                }
            } else {
                // Rotated meanwhile: sign with the new key.
                drop(active);
                return self.sign(alg, claims);
            }
        }
        let header = json!({"alg": key.record.alg, "kid": key.record.kid, "typ": "JWT"});
        let mut text = String::new();
        text.push_str(&URL_SAFE_NO_PAD.encode(header.to_string()));
        text.push('.');
        text.push_str(&URL_SAFE_NO_PAD.encode(payload.to_string()));
        let signature = key.sign(text.as_bytes())?;
        text.push('.');
        text.push_str(&URL_SAFE_NO_PAD.encode(signature));
        Ok(Zeroizing::new(text))
    }

    pub fn put_role(&self, role: &RoleRecord) -> Result<(), IssuerError> {
        role.validate()?;
        self.barrier.put(
            &format!("{ROLES_PREFIX}{}", role.name),
            &role.encode_to_vec(),
        )?;
        Ok(())
    }

    pub fn role(&self, name: &str) -> Result<Option<RoleRecord>, IssuerError> {
        if crate::policy::validate_name(name).is_err() {
            return Ok(None);
        }
        match self.barrier.get(&format!("{ROLES_PREFIX}{name}"))? {
            Some(raw) => RoleRecord::decode(raw.as_slice())
                .map(Some)
                .map_err(|_| IssuerError::Corrupt),
            None => Ok(None),
        }
    }
}

/// The `exp` (in milliseconds, a whole second) of an identity token asked
/// for at `now_ms` with `ttl_seconds`: never past the caller's token nor
/// the identity's expiry (each 0 when there is none; the identity's is a
/// second line, as bringing it forward revokes the identity's tokens).
/// `None` when nothing would be left of it.
pub fn token_exp(
    now_ms: u64,
    ttl_seconds: u64,
    caller_expires_ms: u64,
    identity_expires_ms: u64,
) -> Option<u64> {
    let mut exp = now_ms.saturating_add(ttl_seconds.saturating_mul(1000));
    for limit in [caller_expires_ms, identity_expires_ms] {
        if limit != 0 {
            exp = exp.min(limit);
        }
    }
    exp -= exp % 1000;
    (exp > now_ms - now_ms % 1000).then_some(exp)
}

/// Picks the audience and TTL of a request against its role.
pub fn choose(
    role: &RoleRecord,
    audience: Option<&str>,
    ttl_secs: Option<u64>,
) -> Result<(String, u64), IssuerError> {
    let audience = match audience {
        Some(a) if role.audiences.iter().any(|r| r == a) => a.to_owned(),
        Some(a) => {
            return Err(IssuerError::UnknownAudience(
                a.chars().take(256).filter(|c| !c.is_control()).collect(),
            ))
        }
        None if role.audiences.len() == 1 => role.audiences[0].clone(),
        None => return Err(IssuerError::AudienceNeeded),
    };
    let ttl = match ttl_secs {
        Some(t) if t > role.max_ttl_secs => {
            return Err(IssuerError::TtlTooLong {
                asked: t,
                max: role.max_ttl_secs,
            })
        }
        Some(t) => t,
        None => role.max_ttl_secs,
    };
    Ok((audience, ttl))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;
    use crate::barrier::BarrierOptions;
    use crate::storage::SledBackend;

    #[test]
    fn an_identity_tokens_exp_is_capped_by_the_caller_and_the_identity() {
        let now = 1_700_000_000_500;
        // The role's TTL alone, to the whole second.
        assert_eq!(token_exp(now, 600, 0, 0), Some(1_700_000_600_000));
        // The caller's token ends first.
        assert_eq!(
            token_exp(now, 600, now + 30_000, 0),
            Some(1_700_000_030_000)
        );
        // The identity's expiry ends first, though the caller's token lives on.
        assert_eq!(
            token_exp(now, 600, now + 3_600_000, now + 120_000),
            Some(1_700_000_120_000)
        );
        // Nothing left: within the current second.
        assert_eq!(token_exp(now, 600, now + 400, 0), None);
        assert_eq!(token_exp(now, 600, 0, now + 200), None);
    }

    fn issuer() -> (tempfile::TempDir, Issuer) {
        let dir = tempfile::tempdir().unwrap();
        let backend = SledBackend::open(dir.path()).unwrap();
        let barrier = Barrier::new(Arc::new(backend), BarrierOptions::default()).unwrap();
        let shares = barrier.init(1, 1).unwrap();
        barrier.unseal(&shares[0].0).unwrap();
        (dir, Issuer::new(Arc::new(barrier)))
    }

    fn role() -> RoleRecord {
        RoleRecord {
            name: "cloud".into(),
            audiences: vec!["sts.example".into(), "other".into()],
            max_ttl_secs: 600,
            claims: [("team".to_owned(), "{{identity.owner}}-x".to_owned())].into(),
        }
    }

    static META: std::sync::LazyLock<BTreeMap<String, String>> = std::sync::LazyLock::new(|| {
        [
            ("env".to_owned(), "prod".to_owned()),
            ("looks".to_owned(), "{{identity.owner}}".to_owned()),
        ]
        .into()
    });

    fn claims<'a>(role: &'a RoleRecord, now_ms: u64, exp_ms: u64) -> TokenClaims<'a> {
        TokenClaims {
            issuer: "https://kw.example",
            trust_domain: "example.org",
            who: IdentityFacts {
                name: "ci-1",
                kind: "ci-runner",
                owner: "team-a",
                metadata: &META,
            },
            audience: "sts.example",
            role,
            now_ms,
            exp_ms,
            jti: "j1",
        }
    }

    /// Verifies with `oidc::jwt`'s key-set parser and ring, as a relying
    /// party would (the integration tests use an outside library too).
    fn verify(token: &str, jwks: &str) -> Value {
        let parts: Vec<&str> = token.split('.').collect();
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        let set: Value = serde_json::from_str(jwks).unwrap();
        let jwk = set["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == header["kid"])
            .expect("the kid is published");
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
        let mut point = vec![4u8];
        point.extend(x);
        point.extend(y);
        let key = ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_FIXED,
            point,
        );
        let message = format!("{}.{}", parts[0], parts[1]);
        key.verify(
            message.as_bytes(),
            &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
        )
        .expect("signature");
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap()
    }

    #[test]
    fn signs_tokens_the_published_key_verifies() {
        let (_d, issuer) = issuer();
        let r = role();
        let token = issuer
            .sign("ES256", &claims(&r, 1_000_000, 1_600_000))
            .unwrap();
        let jwks = jwks_json(&issuer.keys().unwrap(), 1_000_000);
        assert!(!jwks.contains("\"d\""), "no private part: {jwks}");
        let c = verify(&token, &jwks);
        assert_eq!(c["sub"], "spiffe://example.org/ci-runner/ci-1");
        assert_eq!(c["iss"], "https://kw.example");
        assert_eq!(c["aud"], "sts.example");
        assert_eq!(c["exp"], 1600);
        assert_eq!(c["team"], "team-a-x");
        assert_eq!(c["kind"], "ci-runner");
        // The stored private key is not in the JWKS or the token.
        let stored = issuer.keys().unwrap();
        let d = URL_SAFE_NO_PAD.encode(&stored[0].pkcs8);
        assert!(!jwks.contains(&d[..20]));
    }

    #[test]
    fn an_old_key_stays_published_until_its_tokens_expire() {
        let (_d, issuer) = issuer();
        let r = role();
        let t0 = 10_000_000;
        let old = issuer.sign("ES256", &claims(&r, t0, t0 + 600_000)).unwrap();
        let new_kid = issuer.rotate("ES256", t0 + 1000).unwrap();
        let new = issuer
            .sign("ES256", &claims(&r, t0 + 2000, t0 + 602_000))
            .unwrap();
        let keys = issuer.keys().unwrap();
        assert_eq!(keys.len(), 2);
        // Both verify while the old token lives.
        let jwks = jwks_json(&keys, t0 + 599_000);
        verify(&old, &jwks);
        verify(&new, &jwks);
        // Once every token the old key signed has expired (plus the step),
        // it leaves the JWKS, then storage.
        let gone_at = t0 + 600_000 + EXP_STEP_MS;
        let jwks = jwks_json(&keys, gone_at);
        let set: Value = serde_json::from_str(&jwks).unwrap();
        assert_eq!(set["keys"].as_array().unwrap().len(), 1);
        assert_eq!(set["keys"][0]["kid"], new_kid.as_str());
        assert_eq!(issuer.prune(gone_at - 1).unwrap(), 0);
        assert_eq!(issuer.prune(gone_at).unwrap(), 1);
        assert_eq!(issuer.keys().unwrap().len(), 1);
    }

    #[test]
    fn roles_and_requests_are_checked() {
        let r = role();
        r.validate().unwrap();
        let mut bad = r.clone();
        bad.claims.insert("sub".into(), "x".into());
        assert!(bad.validate().unwrap_err().to_string().contains("'sub'"));
        let mut bad = r.clone();
        bad.claims.insert("k".into(), "{{secret.value}}".into());
        assert!(bad.validate().is_err());
        let mut bad = r.clone();
        bad.max_ttl_secs = MAX_ROLE_TTL_SECS + 1;
        assert!(bad.validate().is_err());
        let mut bad = r.clone();
        bad.audiences.clear();
        assert!(bad.validate().is_err());
        assert_eq!(
            choose(&r, Some("other"), None).unwrap(),
            ("other".into(), 600)
        );
        assert!(matches!(
            choose(&r, Some("nope"), None),
            Err(IssuerError::UnknownAudience(a)) if a == "nope"
        ));
        assert!(matches!(
            choose(&r, None, None),
            Err(IssuerError::AudienceNeeded)
        ));
        assert!(matches!(
            choose(&r, Some("other"), Some(601)),
            Err(IssuerError::TtlTooLong {
                asked: 601,
                max: 600
            })
        ));
    }

    #[test]
    fn templates_name_metadata_labels_and_nothing_secret() {
        let (_d, signer) = issuer();
        let mut r = role();
        r.claims = [
            (
                "env".to_owned(),
                "{{identity.metadata.env}}/{{ identity.name }}".to_owned(),
            ),
            ("raw".to_owned(), "{{identity.metadata.looks}}".to_owned()),
        ]
        .into();
        r.validate().unwrap();
        let token = signer
            .sign("ES256", &claims(&r, 1_000_000, 1_600_000))
            .unwrap();
        let jwks = jwks_json(&signer.keys().unwrap(), 1_000_000);
        let c = verify(&token, &jwks);
        assert_eq!(c["env"], "prod/ci-1");
        // A label that looks like a field is not expanded again.
        assert_eq!(c["raw"], "{{identity.owner}}");
        // A label the identity lacks: a clear error, and nothing signed or
        // stored (no key was made for it).
        let (_d2, fresh) = issuer();
        let mut missing = role();
        missing.claims = [("team".to_owned(), "{{identity.metadata.team}}".to_owned())].into();
        missing.validate().unwrap();
        let e = fresh
            .sign("ES256", &claims(&missing, 1_000_000, 1_600_000))
            .unwrap_err();
        assert!(
            matches!(&e, IssuerError::MissingMetadata { claim, key } if claim == "team" && key == "team"),
            "{e}"
        );
        assert!(e.to_string().contains("'team'"), "{e}");
        assert!(fresh.keys().unwrap().is_empty());
        // Only the identity's public fields may be named: not a secret, a
        // token, a secret-id, the role-id, the whole metadata map, or a
        // malformed key.
        for bad in [
            "{{secret.password}}",
            "{{secret/data/app/db}}",
            "{{token}}",
            "{{identity.token}}",
            "{{identity.secret_id}}",
            "{{identity.role_id}}",
            "{{identity.metadata}}",
            "{{identity.metadata.}}",
            "{{identity.metadata.Bad Key}}",
            "{{identity.metadata.a.b}}",
            "{{identity.metadata.env",
        ] {
            let mut b = role();
            b.claims = [("k".to_owned(), bad.to_owned())].into();
            assert!(
                matches!(b.validate(), Err(IssuerError::BadRole(_))),
                "{bad} was accepted"
            );
        }
    }

    #[test]
    fn eddsa_keys_publish_okp_jwks() {
        let (_d, issuer) = issuer();
        let r = role();
        let token = issuer
            .sign("EdDSA", &claims(&r, 1_000_000, 1_600_000))
            .unwrap();
        let jwks: Value =
            serde_json::from_str(&jwks_json(&issuer.keys().unwrap(), 1_000_000)).unwrap();
        assert_eq!(jwks["keys"][0]["kty"], "OKP");
        let parts: Vec<&str> = token.split('.').collect();
        let x = URL_SAFE_NO_PAD
            .decode(jwks["keys"][0]["x"].as_str().unwrap())
            .unwrap();
        ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, x)
            .verify(
                format!("{}.{}", parts[0], parts[1]).as_bytes(),
                &URL_SAFE_NO_PAD.decode(parts[2]).unwrap(),
            )
            .unwrap();
    }

    #[test]
    fn the_discovery_document_points_at_the_jwks() {
        let doc: Value =
            serde_json::from_str(&discovery_json("https://kw.example", &["ES256"])).unwrap();
        assert_eq!(doc["issuer"], "https://kw.example");
        assert_eq!(doc["jwks_uri"], "https://kw.example/.well-known/jwks.json");
    }
}
