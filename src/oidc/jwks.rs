//! JWK Sets (RFC 7517) parsed into the few key kinds keyward verifies with.
//!
//! Each usable key is bound to exactly one algorithm: RSA keys to RS256
//! (modulus of 2048 to 8192 bits), EC P-256 keys to ES256, OKP Ed25519 keys
//! to EdDSA. Other key types and curves (including symmetric `oct` keys,
//! which must never verify anything here) are skipped. A key whose `alg`,
//! `use` or `key_ops` member rules out that one algorithm is skipped too.
//! A supported key that is malformed or weak, or one that carries private
//! material, makes the whole set an error: it shows a misconfigured issuer,
//! and the operator should see it when the issuer is configured.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde_json::{Map, Value};

use super::error::{printable_kid, JwksError};

/// The signature algorithms keyward accepts. Everything else, `none`,
/// HMAC (HS*) and RSA-PSS (PS*) included, is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// ECDSA on P-256 with SHA-256, fixed-length `r || s` signature.
    Es256,
    /// Ed25519.
    EdDsa,
}

impl Algorithm {
    /// The JOSE `alg` name, if it is one keyward accepts (case-sensitive).
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "RS256" => Some(Self::Rs256),
            "ES256" => Some(Self::Es256),
            "EdDSA" => Some(Self::EdDsa),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Rs256 => "RS256",
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
        }
    }
}

/// Public key bytes in the form ring takes them.
#[derive(Clone, PartialEq, Eq)]
pub(crate) enum KeyMaterial {
    /// Big-endian modulus and exponent, without leading zeros.
    Rsa { n: Vec<u8>, e: Vec<u8> },
    /// Uncompressed point `0x04 || x || y` (65 bytes).
    P256 { point: Vec<u8> },
    /// The 32-byte public key.
    Ed25519 { x: Vec<u8> },
}

impl KeyMaterial {
    fn algorithm(&self) -> Algorithm {
        match self {
            Self::Rsa { .. } => Algorithm::Rs256,
            Self::P256 { .. } => Algorithm::Es256,
            Self::Ed25519 { .. } => Algorithm::EdDsa,
        }
    }
}

/// One usable verification key.
#[derive(Clone)]
pub struct Jwk {
    kid: Option<String>,
    material: KeyMaterial,
}

impl Jwk {
    pub fn kid(&self) -> Option<&str> {
        self.kid.as_deref()
    }

    /// The one algorithm this key verifies.
    pub fn algorithm(&self) -> Algorithm {
        self.material.algorithm()
    }

    pub(crate) fn material(&self) -> &KeyMaterial {
        &self.material
    }
}

impl std::fmt::Debug for Jwk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Jwk")
            .field("kid", &self.kid)
            .field("alg", &self.algorithm().name())
            .finish()
    }
}

/// The usable keys of an issuer's JWK Set. Never empty.
#[derive(Debug, Clone)]
pub struct Jwks {
    keys: Vec<Jwk>,
}

/// Why one key of the set could not be used.
enum Refusal {
    /// Unknown type, curve or restriction: leave it out.
    Skip,
    /// A supported key that is broken: refuse the set.
    Invalid(&'static str),
}

const RSA_MIN_BITS: usize = 2048;
const RSA_MAX_BITS: usize = 8192;

impl Jwks {
    /// Parses a JWK Set document (`{"keys": [...]}`).
    pub fn parse(json: &[u8]) -> Result<Self, JwksError> {
        let doc: Value =
            serde_json::from_slice(json).map_err(|e| JwksError::Syntax(e.to_string()))?;
        let entries = doc
            .as_object()
            .and_then(|o| o.get("keys"))
            .and_then(Value::as_array)
            .ok_or_else(|| JwksError::Syntax("expected an object with a \"keys\" array".into()))?;

        let mut keys: Vec<Jwk> = Vec::new();
        for entry in entries {
            let Some(member) = entry.as_object() else {
                return Err(JwksError::Syntax("a key is not a JSON object".into()));
            };
            let kid = match member.get("kid") {
                None => None,
                Some(Value::String(kid)) => Some(kid.clone()),
                Some(_) => {
                    return Err(JwksError::InvalidKey {
                        kid: "(non-string kid)".into(),
                        reason: "kid is not a string",
                    })
                }
            };
            let material = match key_material(member) {
                Ok(material) => material,
                Err(Refusal::Skip) => {
                    tracing::debug!(kid = %printable_kid(kid.as_deref()), "JWKS key skipped");
                    continue;
                }
                Err(Refusal::Invalid(reason)) => {
                    return Err(JwksError::InvalidKey {
                        kid: printable_kid(kid.as_deref()),
                        reason,
                    })
                }
            };
            let key = Jwk { kid, material };
            if key.kid.is_some()
                && keys
                    .iter()
                    .any(|k| k.kid == key.kid && k.algorithm() == key.algorithm())
            {
                return Err(JwksError::DuplicateKey(printable_kid(key.kid())));
            }
            keys.push(key);
        }
        if keys.is_empty() {
            return Err(JwksError::NoUsableKeys);
        }
        Ok(Self { keys })
    }

    pub fn keys(&self) -> &[Jwk] {
        &self.keys
    }

    /// The key for a token's `kid` and `alg`. A token without `kid` may use
    /// the set's only key; with several keys it names none.
    pub(crate) fn select(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
    ) -> Result<&Jwk, super::OidcError> {
        use super::OidcError;
        let candidates: Vec<&Jwk> = match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None => match self.keys.as_slice() {
                [only] => vec![only],
                _ => Vec::new(),
            },
        };
        if candidates.is_empty() {
            return Err(OidcError::UnknownKey);
        }
        candidates
            .into_iter()
            .find(|k| k.algorithm() == alg)
            .ok_or(OidcError::WrongKeyType(alg.name()))
    }
}

fn key_material(member: &Map<String, Value>) -> Result<KeyMaterial, Refusal> {
    let kty = member.get("kty").and_then(Value::as_str);
    let implied = match kty {
        Some("RSA") => Algorithm::Rs256,
        Some("EC") => Algorithm::Es256,
        Some("OKP") => Algorithm::EdDsa,
        _ => return Err(Refusal::Skip),
    };
    // The curve first: an X25519 or P-384 key is another kind, not a broken one.
    if implied != Algorithm::Rs256 {
        let wanted = if implied == Algorithm::Es256 {
            "P-256"
        } else {
            "Ed25519"
        };
        if member.get("crv").and_then(Value::as_str) != Some(wanted) {
            return Err(Refusal::Skip);
        }
    }
    if let Some(alg) = member.get("alg") {
        if alg.as_str() != Some(implied.name()) {
            return Err(Refusal::Skip);
        }
    }
    if let Some(usage) = member.get("use") {
        if usage.as_str() != Some("sig") {
            return Err(Refusal::Skip);
        }
    }
    if let Some(ops) = member.get("key_ops") {
        let verifies = ops
            .as_array()
            .is_some_and(|ops| ops.iter().any(|op| op.as_str() == Some("verify")));
        if !verifies {
            return Err(Refusal::Skip);
        }
    }
    if member.contains_key("d") {
        return Err(Refusal::Invalid(
            "the published key contains private key material (d)",
        ));
    }
    match implied {
        Algorithm::Rs256 => {
            let n = strip_leading_zeros(b64_member(member, "n")?);
            let e = strip_leading_zeros(b64_member(member, "e")?);
            let bits = bit_length(&n);
            if bits < RSA_MIN_BITS {
                return Err(Refusal::Invalid("RSA modulus is shorter than 2048 bits"));
            }
            if bits > RSA_MAX_BITS {
                return Err(Refusal::Invalid("RSA modulus is longer than 8192 bits"));
            }
            // ring wants an odd exponent >= 3 that fits its limits; 65537 is usual.
            let odd = e.last().is_some_and(|b| b & 1 == 1);
            if !odd || e.len() > 4 || (e.len() == 1 && e[0] < 3) {
                return Err(Refusal::Invalid("RSA exponent is not usable"));
            }
            Ok(KeyMaterial::Rsa { n, e })
        }
        Algorithm::Es256 => {
            let x = b64_member(member, "x")?;
            let y = b64_member(member, "y")?;
            if x.len() != 32 || y.len() != 32 {
                return Err(Refusal::Invalid("P-256 coordinates must be 32 bytes each"));
            }
            let mut point = Vec::with_capacity(65);
            point.push(0x04);
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            Ok(KeyMaterial::P256 { point })
        }
        Algorithm::EdDsa => {
            let x = b64_member(member, "x")?;
            if x.len() != 32 {
                return Err(Refusal::Invalid("Ed25519 public key must be 32 bytes"));
            }
            Ok(KeyMaterial::Ed25519 { x })
        }
    }
}

fn b64_member(member: &Map<String, Value>, name: &'static str) -> Result<Vec<u8>, Refusal> {
    let text = member
        .get(name)
        .and_then(Value::as_str)
        .ok_or(Refusal::Invalid(match name {
            "n" => "missing or non-string n",
            "e" => "missing or non-string e",
            "x" => "missing or non-string x",
            _ => "missing or non-string y",
        }))?;
    URL_SAFE_NO_PAD
        .decode(text)
        .map_err(|_| Refusal::Invalid("a key member is not unpadded base64url"))
}

fn strip_leading_zeros(mut bytes: Vec<u8>) -> Vec<u8> {
    let zeros = bytes.iter().take_while(|b| **b == 0).count();
    bytes.drain(..zeros);
    bytes
}

fn bit_length(be: &[u8]) -> usize {
    match be.first() {
        None => 0,
        Some(first) => (be.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
mod tests {
    use super::*;

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    fn ed_key(kid: &str) -> Value {
        serde_json::json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(&[7; 32])})
    }

    fn rsa_key(kid: &str, modulus_bytes: usize) -> Value {
        let mut n = vec![0xC5; modulus_bytes];
        n[modulus_bytes - 1] = 0x01;
        serde_json::json!({"kty": "RSA", "kid": kid, "n": b64(&n), "e": "AQAB"})
    }

    fn parse(keys: Vec<Value>) -> Result<Jwks, JwksError> {
        Jwks::parse(serde_json::json!({ "keys": keys }).to_string().as_bytes())
    }

    #[test]
    fn unknown_types_and_curves_are_skipped() {
        let set = parse(vec![
            serde_json::json!({"kty": "oct", "kid": "hmac", "k": b64(b"secret")}),
            serde_json::json!({"kty": "EC", "crv": "P-384", "kid": "p384", "x": "AA", "y": "AA"}),
            serde_json::json!({"kty": "OKP", "crv": "X25519", "kid": "x", "x": b64(&[1; 32])}),
            serde_json::json!({"kid": "no-kty"}),
            ed_key("ed"),
        ])
        .unwrap();
        let kids: Vec<_> = set.keys().iter().map(|k| k.kid()).collect();
        assert_eq!(kids, vec![Some("ed")]);
    }

    #[test]
    fn alg_use_and_key_ops_restrict_a_key() {
        let mut rs384 = rsa_key("rs384", 256);
        rs384["alg"] = "RS384".into();
        let mut ps256 = rsa_key("ps256", 256);
        ps256["alg"] = "PS256".into();
        let mut enc = rsa_key("enc", 256);
        enc["use"] = "enc".into();
        let mut sign_only = ed_key("sign-only");
        sign_only["key_ops"] = serde_json::json!(["sign"]);
        let mut rs256 = rsa_key("rs256", 256);
        rs256["alg"] = "RS256".into();
        rs256["use"] = "sig".into();
        let set = parse(vec![rs384, ps256, enc, sign_only, rs256]).unwrap();
        assert_eq!(set.keys().len(), 1);
        assert_eq!(set.keys()[0].kid(), Some("rs256"));
        assert_eq!(set.keys()[0].algorithm(), Algorithm::Rs256);
    }

    #[test]
    fn weak_or_broken_supported_keys_refuse_the_set() {
        let short = parse(vec![rsa_key("short", 128), ed_key("ok")]).unwrap_err();
        assert!(matches!(short, JwksError::InvalidKey { ref kid, .. } if kid == "short"));
        assert!(short.to_string().contains("2048"));

        let mut bad_b64 = ed_key("bad");
        bad_b64["x"] = "not base64!".into();
        assert!(matches!(
            parse(vec![bad_b64]),
            Err(JwksError::InvalidKey { .. })
        ));

        let mut padded = ed_key("padded");
        padded["x"] = format!("{}=", b64(&[7; 32])).into();
        assert!(matches!(
            parse(vec![padded]),
            Err(JwksError::InvalidKey { .. })
        ));

        let short_ec = serde_json::json!({"kty": "EC", "crv": "P-256", "x": b64(&[1; 31]), "y": b64(&[1; 32])});
        assert!(matches!(
            parse(vec![short_ec]),
            Err(JwksError::InvalidKey { .. })
        ));

        let mut even_e = rsa_key("even", 256);
        even_e["e"] = b64(&[2]).into();
        assert!(matches!(
            parse(vec![even_e]),
            Err(JwksError::InvalidKey { .. })
        ));

        let mut private = ed_key("leaked");
        private["d"] = b64(&[9; 32]).into();
        let err = parse(vec![private]).unwrap_err();
        assert!(err.to_string().contains("private"), "{err}");
    }

    #[test]
    fn rsa_modulus_with_leading_zero_is_accepted() {
        let mut n = vec![0u8];
        n.extend(vec![0xC5; 256]);
        let key = serde_json::json!({"kty": "RSA", "kid": "z", "n": b64(&n), "e": "AQAB"});
        let set = parse(vec![key]).unwrap();
        let KeyMaterial::Rsa { n, .. } = set.keys()[0].material() else {
            panic!("not RSA")
        };
        assert_eq!(n.len(), 256);
    }

    #[test]
    fn sets_without_usable_keys_or_with_duplicates_are_refused() {
        assert!(matches!(parse(vec![]), Err(JwksError::NoUsableKeys)));
        assert!(matches!(
            parse(vec![ed_key("same"), ed_key("same")]),
            Err(JwksError::DuplicateKey(kid)) if kid == "same"
        ));
        // One kid for two key types is allowed (RFC 7517 §4.5).
        assert_eq!(
            parse(vec![ed_key("same"), rsa_key("same", 256)])
                .unwrap()
                .keys()
                .len(),
            2
        );
        assert!(matches!(Jwks::parse(b"[]"), Err(JwksError::Syntax(_))));
        assert!(matches!(
            Jwks::parse(b"{\"keys\": [1]}"),
            Err(JwksError::Syntax(_))
        ));
        assert!(matches!(
            Jwks::parse(b"not json"),
            Err(JwksError::Syntax(_))
        ));
    }
}
