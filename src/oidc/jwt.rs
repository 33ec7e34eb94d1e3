//! Verification of one compact JWS (RFC 7515) carrying JWT claims (RFC 7519).
//!
//! Order matters: the header is parsed only to learn `alg` and `kid`; the
//! signature is checked before the payload is even decoded; the claims are
//! then checked against the issuer's configuration. Keys come only from the
//! configured key set: `jku`, `jwk`, `x5u` and `x5c` headers are ignored, and
//! a header with `crit` is refused (keyward understands no extension).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{
    RsaPublicKeyComponents, UnparsedPublicKey, ECDSA_P256_SHA256_FIXED, ED25519,
    RSA_PKCS1_2048_8192_SHA256,
};
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde_json::{Map, Value};

use super::error::printable_alg;
use super::jwks::{Algorithm, Jwk, Jwks, KeyMaterial};
use super::{IssuerConfig, OidcError};

/// Longest token accepted, in bytes. CI tokens are 1-2 KiB; the limit bounds
/// the work a hostile caller can ask for.
pub const MAX_JWT_LEN: usize = 32 * 1024;

/// Claims of a token whose signature and registered claims were checked.
/// Only [`verify`] makes one.
#[derive(Debug, Clone)]
pub struct VerifiedJwt {
    subject: String,
    expires_at_unix: i64,
    claims: Map<String, Value>,
}

impl VerifiedJwt {
    /// The `sub` claim.
    pub fn subject(&self) -> &str {
        &self.subject
    }

    /// The `exp` claim, in seconds since the Unix epoch. A login token made
    /// from this JWT should not outlive it.
    pub fn expires_at_unix(&self) -> i64 {
        self.expires_at_unix
    }

    /// Every claim of the token.
    pub fn claims(&self) -> &Map<String, Value> {
        &self.claims
    }

    /// Whether claim `key` equals `expected` exactly. A string claim is
    /// compared as is; any other claim by its compact JSON text (`42`,
    /// `true`, `["a","b"]`). There are no globs or prefixes: a bound claim
    /// such as `ref=refs/heads/main` must match the whole value.
    pub fn claim_matches(&self, key: &str, expected: &str) -> bool {
        match self.claims.get(key) {
            None => false,
            Some(Value::String(value)) => value == expected,
            Some(other) => {
                // Not `*other == expected`: serde_json compares a Value with
                // a str only when the Value is a string.
                let text = other.to_string();
                text == expected
            }
        }
    }

    /// Checks every bound claim `(key, value)`; the error names the first
    /// key that is missing or differs, never a value.
    pub fn bound_claims_match(&self, bound: &[(String, String)]) -> Result<(), OidcError> {
        match bound
            .iter()
            .find(|(key, expected)| !self.claim_matches(key, expected))
        {
            Some((key, _)) => Err(OidcError::ClaimMismatch(key.clone())),
            None => Ok(()),
        }
    }
}

/// Verifies `jwt` against `issuer` with the keys of `jwks`.
///
/// `now_unix` is the current time in seconds since the Unix epoch;
/// `leeway_secs` (negative counts as 0) allows for clock skew on `exp` and
/// `nbf`. `iat` is optional and, when present, must be a number; it is not
/// compared with `now`.
pub fn verify(
    jwt: &str,
    issuer: &IssuerConfig,
    jwks: &Jwks,
    now_unix: i64,
    leeway_secs: i64,
) -> Result<VerifiedJwt, OidcError> {
    if jwt.len() > MAX_JWT_LEN {
        return Err(OidcError::MalformedToken("token is too long"));
    }
    let mut parts = jwt.split('.');
    let (Some(header_b64), Some(payload_b64), Some(signature_b64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(OidcError::MalformedToken(
            "not a compact JWS of three parts",
        ));
    };

    let header = parse_object(&decode(header_b64, "header is not base64url")?)
        .ok_or(OidcError::MalformedToken("header is not a JSON object"))?;
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(OidcError::MalformedToken("header has no alg string"))?;
    let alg = Algorithm::from_name(alg_name)
        .ok_or_else(|| OidcError::UnsupportedAlgorithm(printable_alg(alg_name)))?;
    if header.contains_key("crit") {
        return Err(OidcError::MalformedToken(
            "header has critical extensions (crit)",
        ));
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(kid)) => Some(kid.as_str()),
        Some(_) => return Err(OidcError::MalformedToken("header kid is not a string")),
    };
    let key = jwks.select(kid, alg)?;

    let signature = decode(signature_b64, "signature is not base64url")?;
    // The signing input is the encoded header and payload as received.
    let signed_len = header_b64.len() + 1 + payload_b64.len();
    let signing_input = jwt
        .get(..signed_len)
        .ok_or(OidcError::MalformedToken("not a compact JWS"))?;
    check_signature(key, signing_input.as_bytes(), &signature)?;

    let claims = parse_object(&decode(payload_b64, "payload is not base64url")?)
        .ok_or(OidcError::MalformedToken("claims are not a JSON object"))?;
    check_claims(claims, issuer, now_unix, leeway_secs.max(0))
}

fn decode(part: &str, what: &'static str) -> Result<Vec<u8>, OidcError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| OidcError::MalformedToken(what))
}

fn check_signature(key: &Jwk, message: &[u8], signature: &[u8]) -> Result<(), OidcError> {
    let checked = match key.material() {
        KeyMaterial::Rsa { n, e } => {
            RsaPublicKeyComponents { n, e }.verify(&RSA_PKCS1_2048_8192_SHA256, message, signature)
        }
        KeyMaterial::P256 { point } => {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point).verify(message, signature)
        }
        KeyMaterial::Ed25519 { x } => {
            UnparsedPublicKey::new(&ED25519, x).verify(message, signature)
        }
    };
    checked.map_err(|_| OidcError::BadSignature)
}

fn check_claims(
    claims: Map<String, Value>,
    issuer: &IssuerConfig,
    now: i64,
    leeway: i64,
) -> Result<VerifiedJwt, OidcError> {
    match claims.get("iss") {
        None => return Err(OidcError::MissingClaim("iss")),
        Some(Value::String(iss)) if iss == issuer.issuer_url() => {}
        Some(_) => return Err(OidcError::WrongIssuer),
    }

    let audience = issuer.audience();
    let audience_ok = match claims.get("aud") {
        None => return Err(OidcError::MissingClaim("aud")),
        Some(Value::String(aud)) => aud == audience,
        Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(audience)),
        Some(_) => false,
    };
    if !audience_ok {
        return Err(OidcError::WrongAudience);
    }

    let exp = match claims.get("exp") {
        None => return Err(OidcError::MissingClaim("exp")),
        Some(v) => numeric_date(v).ok_or(OidcError::MalformedToken("exp is not a number"))?,
    };
    if exp <= now.saturating_sub(leeway) {
        return Err(OidcError::Expired);
    }
    if let Some(v) = claims.get("nbf") {
        let nbf = numeric_date(v).ok_or(OidcError::MalformedToken("nbf is not a number"))?;
        if nbf > now.saturating_add(leeway) {
            return Err(OidcError::NotYetValid);
        }
    }
    if let Some(v) = claims.get("iat") {
        numeric_date(v).ok_or(OidcError::MalformedToken("iat is not a number"))?;
    }

    let subject = match claims.get("sub") {
        None => return Err(OidcError::MissingClaim("sub")),
        Some(Value::String(sub)) if !sub.is_empty() => sub.clone(),
        Some(_) => return Err(OidcError::MalformedToken("sub is not a non-empty string")),
    };
    Ok(VerifiedJwt {
        subject,
        expires_at_unix: exp,
        claims,
    })
}

/// A NumericDate (RFC 7519 §2): seconds, possibly fractional, rounded down
/// (for `exp` the safe direction; for `nbf` under a second early).
fn numeric_date(value: &Value) -> Option<i64> {
    let Value::Number(n) = value else {
        return None;
    };
    if let Some(i) = n.as_i64() {
        return Some(i);
    }
    if n.as_u64().is_some() {
        return Some(i64::MAX);
    }
    let f = n.as_f64()?;
    // `as` saturates; finite is all that is left to check.
    f.is_finite().then(|| f.floor() as i64)
}

/// Parses a JSON object, refusing duplicate members at the top level, where
/// `alg`, `iss`, `aud` and the bound claims live: two parsers must never read
/// two different tokens out of one.
fn parse_object(json: &[u8]) -> Option<Map<String, Value>> {
    let mut de = serde_json::Deserializer::from_slice(json);
    let map = (&mut de).deserialize_map(StrictObject).ok()?;
    de.end().ok()?;
    Some(map)
}

struct StrictObject;

impl<'de> Visitor<'de> for StrictObject {
    type Value = Map<String, Value>;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object without duplicate members")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<Self::Value, A::Error> {
        let mut map = Map::new();
        while let Some(key) = access.next_key::<String>()? {
            if map.contains_key(&key) {
                return Err(A::Error::custom("duplicate member"));
            }
            let value: Value = access.next_value()?;
            map.insert(key, value);
        }
        Ok(map)
    }
}
