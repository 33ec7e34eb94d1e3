//! Tests of OIDC login through the module's public surface: tokens signed
//! with keys made at run time, and key sets served by a real HTTPS server
//! on 127.0.0.1.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::rand::SystemRandom;
use ring::signature::{
    EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair, RsaPublicKeyComponents,
    ECDSA_P256_SHA256_FIXED_SIGNING, RSA_PKCS1_SHA256,
};
use serde_json::{json, Value};

use super::*;

const ISSUER: &str = "https://token.actions.example.test";
const AUDIENCE: &str = "https://keyward.example.test";
const NOW: i64 = 1_760_000_000;
const SUBJECT: &str = "repo:acme/app:ref:refs/heads/main";

// ---------------------------------------------------------------------------
// Test kit: signing keys, tokens, key sets.

enum KeyKind {
    Rsa(Arc<RsaKeyPair>),
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
}

struct Signer {
    kid: &'static str,
    key: KeyKind,
}

impl Signer {
    fn rsa(kid: &'static str) -> Self {
        Self {
            kid,
            key: KeyKind::Rsa(rsa_key_pair()),
        }
    }

    fn ec(kid: &'static str) -> Self {
        let rng = SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
            .unwrap();
        Self {
            kid,
            key: KeyKind::Ec(pair),
        }
    }

    fn ed(kid: &'static str) -> Self {
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
        Self {
            kid,
            key: KeyKind::Ed(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap()),
        }
    }

    fn alg(&self) -> &'static str {
        match self.key {
            KeyKind::Rsa(_) => "RS256",
            KeyKind::Ec(_) => "ES256",
            KeyKind::Ed(_) => "EdDSA",
        }
    }

    fn sign(&self, message: &[u8]) -> Vec<u8> {
        let rng = SystemRandom::new();
        match &self.key {
            KeyKind::Rsa(pair) => {
                let mut signature = vec![0; pair.public().modulus_len()];
                pair.sign(&RSA_PKCS1_SHA256, &rng, message, &mut signature)
                    .unwrap();
                signature
            }
            KeyKind::Ec(pair) => pair.sign(&rng, message).unwrap().as_ref().to_vec(),
            KeyKind::Ed(pair) => pair.sign(message).as_ref().to_vec(),
        }
    }

    /// The public JWK, with this signer's kid.
    fn jwk(&self) -> Value {
        match &self.key {
            KeyKind::Rsa(pair) => {
                let public = RsaPublicKeyComponents::<Vec<u8>>::from(pair.public());
                json!({"kty": "RSA", "kid": self.kid, "use": "sig", "alg": "RS256",
                       "n": b64(&public.n), "e": b64(&public.e)})
            }
            KeyKind::Ec(pair) => {
                let point = pair.public_key().as_ref();
                assert_eq!(point.len(), 65);
                json!({"kty": "EC", "crv": "P-256", "kid": self.kid,
                       "x": b64(&point[1..33]), "y": b64(&point[33..])})
            }
            KeyKind::Ed(pair) => {
                json!({"kty": "OKP", "crv": "Ed25519", "kid": self.kid,
                       "x": b64(pair.public_key().as_ref())})
            }
        }
    }

    /// A token with this signer's alg and kid.
    fn token(&self, claims: &Value) -> String {
        self.token_with_header(
            &json!({"typ": "JWT", "alg": self.alg(), "kid": self.kid}),
            claims,
        )
    }

    fn token_with_header(&self, header: &Value, claims: &Value) -> String {
        let input = signing_input(header, claims);
        let signature = self.sign(input.as_bytes());
        format!("{input}.{}", b64(&signature))
    }
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn signing_input(header: &Value, claims: &Value) -> String {
    format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    )
}

/// One 2048-bit RSA key per test run, made with the openssl CLI (ring
/// cannot generate RSA keys) and converted to PKCS#8 DER for ring.
fn rsa_key_pair() -> Arc<RsaKeyPair> {
    static KEY: OnceLock<Arc<RsaKeyPair>> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let pem = dir.path().join("rsa.pem");
        let der = dir.path().join("rsa.der");
        let run = |args: &[&std::ffi::OsStr]| {
            let status = std::process::Command::new("openssl")
                .args(args)
                .stderr(std::process::Stdio::null())
                .status()
                .unwrap_or_else(|e| {
                    panic!("the openssl CLI is needed to make RSA test keys ({e}); install the `openssl` package")
                });
            assert!(status.success(), "openssl {args:?} failed: {status}");
        };
        run(&["genrsa".as_ref(), "-out".as_ref(), pem.as_os_str(), "2048".as_ref()]);
        run(&[
            "pkcs8".as_ref(),
            "-topk8".as_ref(),
            "-nocrypt".as_ref(),
            "-in".as_ref(),
            pem.as_os_str(),
            "-outform".as_ref(),
            "DER".as_ref(),
            "-out".as_ref(),
            der.as_os_str(),
        ]);
        let der = std::fs::read(&der).unwrap();
        Arc::new(RsaKeyPair::from_pkcs8(&der).expect("openssl made a key ring refuses"))
    })
    .clone()
}

fn jwks_json(signers: &[&Signer]) -> Vec<u8> {
    let keys: Vec<Value> = signers.iter().map(|s| s.jwk()).collect();
    json!({ "keys": keys }).to_string().into_bytes()
}

fn jwks(signers: &[&Signer]) -> Jwks {
    Jwks::parse(&jwks_json(signers)).unwrap()
}

fn issuer_with(source: JwksSource) -> IssuerConfig {
    IssuerConfig::new("github", ISSUER, AUDIENCE, source).unwrap()
}

fn issuer() -> IssuerConfig {
    issuer_with(JwksSource::File("/nonexistent/jwks.json".into()))
}

/// Claims shaped like a GitHub Actions token.
fn claims() -> Value {
    json!({
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": SUBJECT,
        "repository": "acme/app",
        "ref": "refs/heads/main",
        "run_attempt": 1,
        "ephemeral": true,
        "iat": NOW - 10,
        "nbf": NOW - 10,
        "exp": NOW + 300,
    })
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn check(token: &str, set: &Jwks) -> Result<VerifiedJwt, OidcError> {
    verify(token, &issuer(), set, NOW, 0)
}

// ---------------------------------------------------------------------------
// verify: algorithms and keys.

#[test]
fn valid_tokens_of_each_algorithm_verify() {
    let (rsa, ec, ed) = (Signer::rsa("rsa-1"), Signer::ec("ec-1"), Signer::ed("ed-1"));
    let set = jwks(&[&rsa, &ec, &ed]);
    for signer in [&rsa, &ec, &ed] {
        let verified = check(&signer.token(&claims()), &set)
            .unwrap_or_else(|e| panic!("{}: {e}", signer.alg()));
        assert_eq!(verified.subject(), SUBJECT);
        assert_eq!(verified.expires_at_unix(), NOW + 300);
        assert_eq!(verified.claims()["repository"], "acme/app");
    }
}

#[test]
fn a_token_without_kid_uses_the_only_key_but_not_one_of_several() {
    let (ed, ec) = (Signer::ed("ed-1"), Signer::ec("ec-1"));
    let token = ed.token_with_header(&json!({"alg": "EdDSA"}), &claims());
    assert!(check(&token, &jwks(&[&ed])).is_ok());
    assert!(matches!(
        check(&token, &jwks(&[&ed, &ec])),
        Err(OidcError::UnknownKey)
    ));
}

#[test]
fn unknown_kid_is_refused() {
    let (ed, other) = (Signer::ed("ed-1"), Signer::ed("ed-2"));
    let token = other.token(&claims());
    assert!(matches!(
        check(&token, &jwks(&[&ed])),
        Err(OidcError::UnknownKey)
    ));
}

#[test]
fn kid_naming_a_key_of_another_type_is_refused() {
    let (rsa, ec) = (Signer::rsa("shared"), Signer::ec("ec-1"));
    let set = jwks(&[&rsa]);
    // An ES256 token whose kid names the RSA key.
    let token = ec.token_with_header(&json!({"alg": "ES256", "kid": "shared"}), &claims());
    assert!(matches!(
        check(&token, &set),
        Err(OidcError::WrongKeyType("ES256"))
    ));
    // And an RS256 header over an EdDSA key.
    let ed = Signer::ed("ed-1");
    let set = jwks(&[&ed]);
    let token = rsa.token_with_header(&json!({"alg": "RS256", "kid": "ed-1"}), &claims());
    assert!(matches!(
        check(&token, &set),
        Err(OidcError::WrongKeyType("RS256"))
    ));
}

#[test]
fn flipped_signature_byte_is_refused() {
    let (rsa, ec, ed) = (Signer::rsa("rsa-1"), Signer::ec("ec-1"), Signer::ed("ed-1"));
    let set = jwks(&[&rsa, &ec, &ed]);
    for signer in [&rsa, &ec, &ed] {
        let token = signer.token(&claims());
        let (input, signature) = token.rsplit_once('.').unwrap();
        let mut signature = URL_SAFE_NO_PAD.decode(signature).unwrap();
        signature[5] ^= 0x01;
        let token = format!("{input}.{}", b64(&signature));
        assert!(
            matches!(check(&token, &set), Err(OidcError::BadSignature)),
            "{}",
            signer.alg()
        );
    }
}

#[test]
fn payload_changed_after_signing_is_refused() {
    let ed = Signer::ed("ed-1");
    let token = ed.token(&claims());
    let parts: Vec<&str> = token.split('.').collect();
    let forged = with(claims(), "repository", json!("acme/prod-infra"));
    let token = format!(
        "{}.{}.{}",
        parts[0],
        b64(forged.to_string().as_bytes()),
        parts[2]
    );
    assert!(matches!(
        check(&token, &jwks(&[&ed])),
        Err(OidcError::BadSignature)
    ));
}

#[test]
fn alg_none_is_refused() {
    let ed = Signer::ed("ed-1");
    let set = jwks(&[&ed]);
    for header in [
        json!({"alg": "none", "kid": "ed-1"}),
        json!({"alg": "none"}),
        json!({"alg": "None"}),
    ] {
        let token = format!("{}.", signing_input(&header, &claims()));
        let err = check(&token, &set).unwrap_err();
        assert!(
            matches!(err, OidcError::UnsupportedAlgorithm(_)),
            "{header}: {err}"
        );
    }
}

#[test]
fn hs256_signed_with_the_rsa_public_key_is_refused() {
    // The classic confusion: a verifier that takes `alg` from the header
    // would use the public key bytes as an HMAC secret.
    let rsa = Signer::rsa("rsa-1");
    let set = jwks(&[&rsa]);
    let KeyKind::Rsa(pair) = &rsa.key else {
        unreachable!()
    };
    let public_der = pair.public().as_ref().to_vec();
    let jwk_text = rsa.jwk().to_string();
    for secret in [public_der.as_slice(), jwk_text.as_bytes()] {
        let input = signing_input(&json!({"alg": "HS256", "kid": "rsa-1"}), &claims());
        let hmac = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret),
            input.as_bytes(),
        );
        let token = format!("{input}.{}", b64(hmac.as_ref()));
        let err = check(&token, &set).unwrap_err();
        assert!(
            matches!(&err, OidcError::UnsupportedAlgorithm(alg) if alg == "HS256"),
            "{err}"
        );
    }
}

#[test]
fn other_algorithms_are_refused_and_hostile_names_not_echoed() {
    let rsa = Signer::rsa("rsa-1");
    let set = jwks(&[&rsa]);
    for alg in [
        "PS256", "RS384", "RS512", "ES384", "HS512", "rs256", "ES256K",
    ] {
        // Signed with the real RSA key, so only the alg rule can refuse it.
        let token = rsa.token_with_header(&json!({"alg": alg, "kid": "rsa-1"}), &claims());
        let err = check(&token, &set).unwrap_err();
        assert!(
            matches!(&err, OidcError::UnsupportedAlgorithm(shown) if shown == alg),
            "{alg}: {err}"
        );
    }
    let token = rsa.token_with_header(
        &json!({"alg": "RS256\n<script>", "kid": "rsa-1"}),
        &claims(),
    );
    let err = check(&token, &set).unwrap_err();
    assert!(!err.to_string().contains("script"), "{err}");
}

#[test]
fn keys_in_the_token_header_are_never_trusted() {
    // An attacker's own key, embedded in the header as `jwk` and pointed to
    // by `jku`, with the kid of the issuer's real key.
    let (real, attacker) = (Signer::ed("ed-1"), Signer::ed("ed-1"));
    let header = json!({"alg": "EdDSA", "kid": "ed-1", "jwk": attacker.jwk(),
                        "jku": "https://attacker.example/jwks"});
    let token = attacker.token_with_header(&header, &claims());
    assert!(matches!(
        check(&token, &jwks(&[&real])),
        Err(OidcError::BadSignature)
    ));
}

#[test]
fn crit_headers_and_duplicate_members_are_refused() {
    let ed = Signer::ed("ed-1");
    let set = jwks(&[&ed]);
    let token = ed.token_with_header(
        &json!({"alg": "EdDSA", "kid": "ed-1", "crit": ["b64"], "b64": false}),
        &claims(),
    );
    assert!(matches!(
        check(&token, &set),
        Err(OidcError::MalformedToken(_))
    ));

    // Two `aud` members: a parser keeping the first and one keeping the
    // last would disagree. Built by hand, serde_json would merge them.
    let payload = format!(
        r#"{{"iss":"{ISSUER}","aud":"someone-else","aud":"{AUDIENCE}","sub":"x","exp":{}}}"#,
        NOW + 60
    );
    let header = r#"{"alg":"EdDSA","kid":"ed-1"}"#;
    let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
    let token = format!("{input}.{}", b64(&ed.sign(input.as_bytes())));
    assert!(matches!(
        check(&token, &set),
        Err(OidcError::MalformedToken(_))
    ));

    let header = r#"{"alg":"HS256","alg":"EdDSA","kid":"ed-1"}"#;
    let input = format!(
        "{}.{}",
        b64(header.as_bytes()),
        b64(claims().to_string().as_bytes())
    );
    let token = format!("{input}.{}", b64(&ed.sign(input.as_bytes())));
    assert!(matches!(
        check(&token, &set),
        Err(OidcError::MalformedToken(_))
    ));
}

#[test]
fn malformed_compact_serialisations_are_refused() {
    let ed = Signer::ed("ed-1");
    let set = jwks(&[&ed]);
    let token = ed.token(&claims());
    let (header, rest) = token.split_once('.').unwrap();
    let (payload, signature) = rest.split_once('.').unwrap();
    let cases = [
        String::new(),
        "a.b".to_owned(),
        format!("{token}.extra"),
        format!("{header}=.{payload}.{signature}"),
        format!("{header}.{payload}.{signature}="),
        format!("{header}.{payload}.+{signature}"),
        format!("{}.{payload}.{signature}", b64(b"[1,2]")),
        format!("{header}.{}.{}", b64(b"\"str\""), signature),
        "x".repeat(MAX_JWT_LEN + 1),
    ];
    for case in cases {
        let err = check(&case, &set).unwrap_err();
        assert!(
            matches!(err, OidcError::MalformedToken(_) | OidcError::BadSignature),
            "{err}"
        );
    }
    // A JSON string payload is properly signed but still not a claim set.
    let input = format!(
        "{}.{}",
        b64(br#"{"alg":"EdDSA","kid":"ed-1"}"#),
        b64(b"\"str\"")
    );
    let token = format!("{input}.{}", b64(&ed.sign(input.as_bytes())));
    assert!(matches!(
        check(&token, &set),
        Err(OidcError::MalformedToken(_))
    ));
}

// ---------------------------------------------------------------------------
// verify: claims.

#[test]
fn wrong_issuer_is_refused() {
    let ed = Signer::ed("ed-1");
    let set = jwks(&[&ed]);
    for iss in [
        json!("https://evil.example.test"),
        json!(format!("{ISSUER}/")),
        json!(1),
    ] {
        let token = ed.token(&with(claims(), "iss", iss));
        assert!(matches!(check(&token, &set), Err(OidcError::WrongIssuer)));
    }
    let token = ed.token(&without(claims(), "iss"));
    assert!(matches!(
        check(&token, &set),
        Err(OidcError::MissingClaim("iss"))
    ));
}

#[test]
fn wrong_audience_is_refused() {
    let ed = Signer::ed("ed-1");
    let set = jwks(&[&ed]);
    for aud in [
        json!("https://other.example.test"),
        json!([]),
        json!(["a", "b"]),
        json!(7),
    ] {
        let token = ed.token(&with(claims(), "aud", aud));
        assert!(matches!(check(&token, &set), Err(OidcError::WrongAudience)));
    }
    let token = ed.token(&without(claims(), "aud"));
    assert!(matches!(
        check(&token, &set),
        Err(OidcError::MissingClaim("aud"))
    ));
}

#[test]
fn audience_may_be_an_array() {
    let ed = Signer::ed("ed-1");
    let token = ed.token(&with(
        claims(),
        "aud",
        json!(["sts.amazonaws.com", AUDIENCE]),
    ));
    assert!(check(&token, &jwks(&[&ed])).is_ok());
}

#[test]
fn expiry_is_enforced_with_leeway() {
    let ed = Signer::ed("ed-1");
    let set = jwks(&[&ed]);
    let token = ed.token(&with(claims(), "exp", json!(NOW - 30)));
    assert!(matches!(
        verify(&token, &issuer(), &set, NOW, 0),
        Err(OidcError::Expired)
    ));
    assert!(matches!(
        verify(&token, &issuer(), &set, NOW, 30),
        Err(OidcError::Expired)
    ));
    let verified = verify(&token, &issuer(), &set, NOW, 60).unwrap();
    assert_eq!(verified.expires_at_unix(), NOW - 30);
    // exp == now is already expired; a negative leeway counts as none.
    let token = ed.token(&with(claims(), "exp", json!(NOW)));
    assert!(matches!(
        verify(&token, &issuer(), &set, NOW, -100),
        Err(OidcError::Expired)
    ));
    // A fractional NumericDate rounds down: NOW + 0.5 is already expired.
    let token = ed.token(&with(claims(), "exp", json!(NOW as f64 + 1.5)));
    assert_eq!(check(&token, &set).unwrap().expires_at_unix(), NOW + 1);
    let token = ed.token(&with(claims(), "exp", json!(NOW as f64 + 0.5)));
    assert!(matches!(check(&token, &set), Err(OidcError::Expired)));
    let token = ed.token(&without(claims(), "exp"));
    assert!(matches!(
        check(&token, &set),
        Err(OidcError::MissingClaim("exp"))
    ));
    let token = ed.token(&with(claims(), "exp", json!("tomorrow")));
    assert!(matches!(
        check(&token, &set),
        Err(OidcError::MalformedToken(_))
    ));
}

#[test]
fn not_before_in_the_future_is_refused() {
    let ed = Signer::ed("ed-1");
    let set = jwks(&[&ed]);
    let token = ed.token(&with(claims(), "nbf", json!(NOW + 60)));
    assert!(matches!(
        verify(&token, &issuer(), &set, NOW, 0),
        Err(OidcError::NotYetValid)
    ));
    assert!(verify(&token, &issuer(), &set, NOW, 60).is_ok());
    // nbf and iat are optional; sub is not.
    let token = ed.token(&without(without(claims(), "nbf"), "iat"));
    assert!(check(&token, &set).is_ok());
    let token = ed.token(&without(claims(), "sub"));
    assert!(matches!(
        check(&token, &set),
        Err(OidcError::MissingClaim("sub"))
    ));
}

#[test]
fn bound_claims_match_exactly_and_name_the_key() {
    let ed = Signer::ed("ed-1");
    let verified = check(&ed.token(&claims()), &jwks(&[&ed])).unwrap();
    let bind = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    assert!(verified
        .bound_claims_match(&bind(&[
            ("repository", "acme/app"),
            ("ref", "refs/heads/main"),
            ("run_attempt", "1"),
            ("ephemeral", "true"),
        ]))
        .is_ok());
    assert!(verified.bound_claims_match(&[]).is_ok());

    let err = verified
        .bound_claims_match(&bind(&[
            ("repository", "acme/app"),
            ("ref", "refs/heads/release"),
            ("run_attempt", "2"),
        ]))
        .unwrap_err();
    assert!(matches!(&err, OidcError::ClaimMismatch(key) if key == "ref"));
    assert!(!err.to_string().contains("refs/heads"), "{err}");

    // Exact only: no prefix or glob; a missing claim is a mismatch.
    assert!(!verified.claim_matches("ref", "refs/heads/*"));
    assert!(!verified.claim_matches("repository", "acme/"));
    assert!(!verified.claim_matches("run_attempt", "\"1\""));
    assert!(matches!(
        verified.bound_claims_match(&bind(&[("environment", "prod")])),
        Err(OidcError::ClaimMismatch(key)) if key == "environment"
    ));
}

#[test]
fn error_messages_never_contain_the_token_or_claim_values() {
    let (ed, ec) = (Signer::ed("ed-1"), Signer::ec("ec-1"));
    let set = jwks(&[&ed]);
    let secretish = "repo:acme/secret-project:environment:prod";
    let base = with(claims(), "sub", json!(secretish));
    let tokens = [
        ed.token(&with(base.clone(), "aud", json!("x"))),
        ed.token(&with(base.clone(), "iss", json!(secretish))),
        ed.token(&with(base.clone(), "exp", json!(NOW - 1000))),
        ed.token(&with(base.clone(), "exp", json!(secretish))),
        ed.token(&with(base.clone(), "nbf", json!(NOW + 1000))),
        ec.token(&base),
        ec.token_with_header(&json!({"alg": "ES256", "kid": "ed-1"}), &base),
        format!("{}x", ed.token(&base)),
    ];
    for token in tokens {
        let err = check(&token, &set).unwrap_err();
        for shown in [err.to_string(), format!("{err:?}")] {
            assert!(!shown.contains(secretish), "{shown}");
            assert!(!shown.contains(&token), "{shown}");
            assert!(!shown.contains(token.split('.').nth(1).unwrap()), "{shown}");
        }
    }
}

// ---------------------------------------------------------------------------
// JwksCache: files and HTTPS.

#[tokio::test]
async fn file_sources_are_cached_for_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let (one, two) = (Signer::ed("ed-1"), Signer::ed("ed-2"));
    std::fs::write(&path, jwks_json(&[&one])).unwrap();
    let source = JwksSource::File(path.clone());

    let cache = JwksCache::new(None)
        .unwrap()
        .with_jwks_dir(Some(dir.path()));
    assert_eq!(
        cache.jwks(&source).await.unwrap().keys()[0].kid(),
        Some("ed-1")
    );
    std::fs::write(&path, jwks_json(&[&two])).unwrap();
    assert_eq!(
        cache.jwks(&source).await.unwrap().keys()[0].kid(),
        Some("ed-1")
    );
    assert_eq!(
        cache.refresh(&source).await.unwrap().keys()[0].kid(),
        Some("ed-2")
    );

    let uncached = JwksCache::new(None)
        .unwrap()
        .with_jwks_dir(Some(dir.path()))
        .with_ttl(Duration::ZERO);
    std::fs::write(&path, jwks_json(&[&one])).unwrap();
    assert_eq!(
        uncached.jwks(&source).await.unwrap().keys()[0].kid(),
        Some("ed-1")
    );
    std::fs::write(&path, jwks_json(&[&two])).unwrap();
    assert_eq!(
        uncached.jwks(&source).await.unwrap().keys()[0].kid(),
        Some("ed-2")
    );

    let missing = JwksSource::File(dir.path().join("missing.json"));
    assert!(matches!(
        cache.jwks(&missing).await,
        Err(OidcError::Jwks(JwksError::Read { .. }))
    ));
    std::fs::write(&path, vec![b' '; 2000]).unwrap();
    let small = JwksCache::new(None)
        .unwrap()
        .with_jwks_dir(Some(dir.path()))
        .with_max_bytes(1000);
    assert!(matches!(
        small.jwks(&source).await,
        Err(OidcError::Jwks(JwksError::TooLarge(1000)))
    ));
}

/// A JWKS endpoint on 127.0.0.1 over TLS, stopped when dropped.
struct JwksServer {
    url: HttpsUrl,
    body: Arc<Mutex<Vec<u8>>>,
    hits: Arc<AtomicUsize>,
    requests: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl JwksServer {
    fn set_body(&self, body: Vec<u8>) {
        *self.body.lock().unwrap() = body;
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

async fn start_jwks_server(
    certs: &crate::pki::CertPaths,
    body: Vec<u8>,
    chunked: bool,
) -> JwksServer {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&certs.server)
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_file(&certs.server_key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();

    let body = Arc::new(Mutex::new(body));
    let hits = Arc::new(AtomicUsize::new(0));
    let requests = Arc::new(Mutex::new(Vec::new()));
    let (served, counted, logged) = (body.clone(), hits.clone(), requests.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            // A client that refuses our certificate ends the handshake.
            let Ok(mut tls) = acceptor.accept(tcp).await else {
                continue;
            };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") && request.len() < 8192 {
                match tls.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            counted.fetch_add(1, Ordering::SeqCst);
            logged
                .lock()
                .unwrap()
                .push(String::from_utf8_lossy(&request).into_owned());
            let body = served.lock().unwrap().clone();
            let mut response = if chunked {
                let mut response =
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
                        .to_vec();
                for chunk in body.chunks(100) {
                    response.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                    response.extend_from_slice(chunk);
                    response.extend_from_slice(b"\r\n");
                }
                response.extend_from_slice(b"0\r\n\r\n");
                response
            } else {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                )
                .into_bytes()
            };
            if !chunked {
                response.extend_from_slice(&body);
            }
            let _ = tls.write_all(&response).await;
            let _ = tls.shutdown().await;
        }
    });
    JwksServer {
        url: HttpsUrl::parse(&format!("https://127.0.0.1:{port}/.well-known/jwks")).unwrap(),
        body,
        hits,
        requests,
        task,
    }
}

#[tokio::test]
async fn jwks_over_https_is_fetched_cached_and_refetched_on_unknown_kid() {
    let dir = tempfile::tempdir().unwrap();
    let certs = crate::pki::ensure_dev_certs(dir.path()).unwrap();
    let (one, two, never) = (Signer::ed("ed-1"), Signer::ec("ec-2"), Signer::ed("ed-9"));

    for chunked in [false, true] {
        let server = start_jwks_server(&certs, jwks_json(&[&one]), chunked).await;
        let issuer = issuer_with(JwksSource::Url(server.url.clone()));
        let cache = JwksCache::new(Some(&certs.ca))
            .unwrap()
            .danger_allow_private_hosts(true)
            .with_min_refetch_interval(Duration::ZERO);

        let verified = cache
            .verify(&one.token(&claims()), &issuer, NOW, 0)
            .await
            .unwrap();
        assert_eq!(verified.subject(), SUBJECT);
        assert!(cache
            .verify(&one.token(&claims()), &issuer, NOW, 0)
            .await
            .is_ok());
        assert_eq!(server.hits(), 1, "the second login must use the cache");
        let request = server.requests.lock().unwrap()[0].clone();
        assert!(
            request.starts_with("GET /.well-known/jwks HTTP/1.1\r\n"),
            "{request}"
        );
        assert!(request.contains(&format!("\r\nHost: 127.0.0.1:{}\r\n", server.url.port())));

        // The issuer rotates to a new key: the unknown kid triggers one refetch.
        server.set_body(jwks_json(&[&two]));
        let verified = cache
            .verify(&two.token(&claims()), &issuer, NOW, 0)
            .await
            .unwrap();
        assert_eq!(verified.subject(), SUBJECT);
        assert_eq!(server.hits(), 2);
        // A kid the issuer never had: one refetch, then UnknownKey.
        assert!(matches!(
            cache.verify(&never.token(&claims()), &issuer, NOW, 0).await,
            Err(OidcError::UnknownKey)
        ));
        assert_eq!(server.hits(), 3);
        // Other failures never refetch.
        assert!(matches!(
            cache
                .verify(
                    &two.token(&with(claims(), "aud", json!("x"))),
                    &issuer,
                    NOW,
                    0
                )
                .await,
            Err(OidcError::WrongAudience)
        ));
        assert_eq!(server.hits(), 3);

        // With the default interval a fresh set is not fetched again.
        let cache = JwksCache::new(Some(&certs.ca))
            .unwrap()
            .danger_allow_private_hosts(true);
        assert!(cache
            .verify(&two.token(&claims()), &issuer, NOW, 0)
            .await
            .is_ok());
        assert!(matches!(
            cache.verify(&never.token(&claims()), &issuer, NOW, 0).await,
            Err(OidcError::UnknownKey)
        ));
        assert_eq!(server.hits(), 4);
    }
}

#[tokio::test]
async fn https_fetch_failures_are_jwks_errors() {
    let dir = tempfile::tempdir().unwrap();
    let certs = crate::pki::ensure_dev_certs(&dir.path().join("a")).unwrap();
    let other = crate::pki::ensure_dev_certs(&dir.path().join("b")).unwrap();
    let ed = Signer::ed("ed-1");
    let server = start_jwks_server(&certs, jwks_json(&[&ed]), false).await;
    let source = JwksSource::Url(server.url.clone());

    // A certificate from another CA.
    let err = JwksCache::new(Some(&other.ca))
        .unwrap()
        .danger_allow_private_hosts(true)
        .jwks(&source)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, OidcError::Jwks(JwksError::Fetch { reason, .. }) if reason.starts_with("TLS")),
        "{err}"
    );

    // No CA at all: HTTPS sources cannot be fetched.
    assert!(matches!(
        JwksCache::new(None).unwrap().jwks(&source).await,
        Err(OidcError::Jwks(JwksError::NoTrustRoots(_)))
    ));

    // A response over the size limit.
    server.set_body(vec![b' '; 5000]);
    assert!(matches!(
        JwksCache::new(Some(&certs.ca))
            .unwrap()
            .danger_allow_private_hosts(true)
            .with_max_bytes(4000)
            .jwks(&source)
            .await,
        Err(OidcError::Jwks(JwksError::TooLarge(4000)))
    ));

    // A body that is not a key set.
    server.set_body(b"<html>maintenance</html>".to_vec());
    assert!(matches!(
        JwksCache::new(Some(&certs.ca))
            .unwrap()
            .danger_allow_private_hosts(true)
            .jwks(&source)
            .await,
        Err(OidcError::Jwks(JwksError::Syntax(_)))
    ));

    // A CA file without a certificate.
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "").unwrap();
    assert!(matches!(
        JwksCache::new(Some(&empty)),
        Err(OidcError::Jwks(JwksError::Ca { .. }))
    ));
}

#[tokio::test]
async fn closed_port_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let certs = crate::pki::ensure_dev_certs(dir.path()).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    drop(listener);
    let source =
        JwksSource::Url(HttpsUrl::parse(&format!("https://127.0.0.1:{port}/jwks")).unwrap());
    // A refused connection is a Fetch error, not a wait for the deadline.
    let cache = JwksCache::new(Some(&certs.ca))
        .unwrap()
        .danger_allow_private_hosts(true)
        .with_timeout(Duration::from_secs(60));
    let err = cache.jwks(&source).await.unwrap_err();
    assert!(
        matches!(&err, OidcError::Jwks(JwksError::Fetch { url, .. }) if url.contains(&port.to_string())),
        "{err}"
    );
}

#[tokio::test]
async fn silent_server_hits_the_deadline() {
    let dir = tempfile::tempdir().unwrap();
    let certs = crate::pki::ensure_dev_certs(dir.path()).unwrap();
    // Accepts TCP and never answers the TLS handshake.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((tcp, _)) = listener.accept().await {
            open.push(tcp);
        }
    });
    let source =
        JwksSource::Url(HttpsUrl::parse(&format!("https://127.0.0.1:{port}/jwks")).unwrap());
    let cache = JwksCache::new(Some(&certs.ca))
        .unwrap()
        .danger_allow_private_hosts(true)
        .with_timeout(Duration::from_millis(300));
    let err = cache.jwks(&source).await.unwrap_err();
    held.abort();
    assert!(
        matches!(err, OidcError::Jwks(JwksError::Timeout { .. })),
        "{err}"
    );
}

// ---------------------------------------------------------------------------
// Failed loads back off; logins learn nothing of the cause; only public
// addresses; only regular files under the jwks folder.

/// A TCP listener on 127.0.0.1 that counts connections and drops each.
async fn counting_listener() -> (u16, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counted = accepted.clone();
    let task = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            drop(tcp);
        }
    });
    (port, accepted, task)
}

#[tokio::test(start_paused = true)]
async fn failed_loads_back_off_doubling_to_the_ceiling() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    let source = JwksSource::File(path.clone());
    let cache = JwksCache::files_only()
        .with_jwks_dir(Some(dir.path()))
        .with_failure_backoff(Duration::from_secs(5), Duration::from_secs(20));
    let backing_off = |r: Result<Arc<Jwks>, OidcError>| {
        matches!(r, Err(OidcError::Jwks(JwksError::BackingOff(_))))
    };

    // Missing: a read error, then no new attempt for 5 s even though the
    // file is there now.
    assert!(matches!(
        cache.jwks(&source).await,
        Err(OidcError::Jwks(JwksError::Read { .. }))
    ));
    std::fs::write(&path, "not json").unwrap();
    assert!(backing_off(cache.jwks(&source).await));
    tokio::time::advance(Duration::from_millis(4_900)).await;
    assert!(backing_off(cache.refresh(&source).await));
    // Tried again after 5 s: fails (not a key set); 10 s of quiet now.
    tokio::time::advance(Duration::from_millis(100)).await;
    assert!(matches!(
        cache.jwks(&source).await,
        Err(OidcError::Jwks(JwksError::Syntax(_)))
    ));
    tokio::time::advance(Duration::from_secs(9)).await;
    assert!(backing_off(cache.jwks(&source).await));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(!backing_off(cache.jwks(&source).await));
    // 20 s, then the ceiling: 20 s again.
    tokio::time::advance(Duration::from_secs(19)).await;
    assert!(backing_off(cache.jwks(&source).await));
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(!backing_off(cache.jwks(&source).await));
    tokio::time::advance(Duration::from_secs(19)).await;
    assert!(backing_off(cache.jwks(&source).await));
    // A good load clears the back-off.
    let ed = Signer::ed("ed-1");
    std::fs::write(&path, jwks_json(&[&ed])).unwrap();
    tokio::time::advance(Duration::from_secs(1)).await;
    assert!(cache.jwks(&source).await.is_ok());
    assert!(cache.refresh(&source).await.is_ok());
}

#[tokio::test]
async fn a_login_is_told_one_generic_message_and_backs_off() {
    let dir = tempfile::tempdir().unwrap();
    let certs = crate::pki::ensure_dev_certs(dir.path()).unwrap();
    let (port, accepted, task) = counting_listener().await;
    let url = HttpsUrl::parse(&format!("https://127.0.0.1:{port}/jwks")).unwrap();
    let issuer = issuer_with(JwksSource::Url(url));
    let cache = JwksCache::new(Some(&certs.ca))
        .unwrap()
        .danger_allow_private_hosts(true);
    let token = Signer::ed("ed-1").token(&claims());
    for _ in 0..5 {
        let err = cache.verify(&token, &issuer, NOW, 0).await.unwrap_err();
        assert!(
            matches!(err, OidcError::Jwks(JwksError::Unavailable)),
            "{err}"
        );
        let shown = err.to_string();
        assert!(!shown.contains(&port.to_string()), "{shown}");
        assert!(!shown.contains("127.0.0.1"), "{shown}");
    }
    task.abort();
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "one connection in all");
}

#[tokio::test]
async fn concurrent_logins_share_one_load() {
    let dir = tempfile::tempdir().unwrap();
    let certs = crate::pki::ensure_dev_certs(dir.path()).unwrap();
    let ed = Signer::ed("ed-1");
    let server = start_jwks_server(&certs, jwks_json(&[&ed]), false).await;
    let issuer = issuer_with(JwksSource::Url(server.url.clone()));
    let cache = Arc::new(
        JwksCache::new(Some(&certs.ca))
            .unwrap()
            .danger_allow_private_hosts(true),
    );
    let token = Arc::new(ed.token(&claims()));
    let logins: Vec<_> = (0..8)
        .map(|_| {
            let (cache, issuer, token) = (cache.clone(), issuer.clone(), token.clone());
            tokio::spawn(async move { cache.verify(&token, &issuer, NOW, 0).await.is_ok() })
        })
        .collect();
    for login in logins {
        assert!(login.await.unwrap());
    }
    assert_eq!(server.hits(), 1);
}

#[tokio::test]
async fn non_public_hosts_are_refused_before_connecting() {
    let dir = tempfile::tempdir().unwrap();
    let certs = crate::pki::ensure_dev_certs(dir.path()).unwrap();
    let (port, accepted, task) = counting_listener().await;
    for host in ["127.0.0.1", "[::ffff:127.0.0.1]", "localhost"] {
        let url = HttpsUrl::parse(&format!("https://{host}:{port}/jwks")).unwrap();
        let cache = JwksCache::new(Some(&certs.ca)).unwrap();
        let err = cache.jwks(&JwksSource::Url(url)).await.unwrap_err();
        assert!(
            matches!(
                &err,
                OidcError::Jwks(JwksError::PrivateAddress {
                    kind: "loopback",
                    ..
                })
            ),
            "{host}: {err}"
        );
    }
    task.abort();
    assert_eq!(accepted.load(Ordering::SeqCst), 0);
}

#[cfg(unix)]
#[tokio::test]
async fn files_outside_the_folder_or_not_regular_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let jwks_dir = dir.path().join("jwks");
    std::fs::create_dir(&jwks_dir).unwrap();
    let ed = Signer::ed("ed-1");
    let outside = dir.path().join("outside.json");
    std::fs::write(&outside, jwks_json(&[&ed])).unwrap();
    std::os::unix::fs::symlink(&outside, jwks_dir.join("link.json")).unwrap();
    let fifo = jwks_dir.join("fifo.json");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());

    let cache = JwksCache::files_only().with_jwks_dir(Some(&jwks_dir));
    let load = |path: std::path::PathBuf| {
        let cache = &cache;
        async move { cache.jwks(&JwksSource::File(path)).await.unwrap_err() }
    };
    for path in [
        outside.clone(),
        jwks_dir.join("link.json"),
        jwks_dir.join("../outside.json"),
    ] {
        let err = load(path.clone()).await;
        assert!(
            matches!(err, OidcError::Jwks(JwksError::OutsideJwksDir)),
            "{}: {err}",
            path.display()
        );
    }
    // A FIFO nobody writes to would block an open for ever.
    let err = tokio::time::timeout(Duration::from_secs(60), load(fifo))
        .await
        .expect("reading a FIFO hung");
    assert!(
        matches!(err, OidcError::Jwks(JwksError::NotRegularFile(_))),
        "{err}"
    );
    // Without a folder no file is read.
    let err = JwksCache::files_only()
        .jwks(&JwksSource::File(outside))
        .await
        .unwrap_err();
    assert!(
        matches!(err, OidcError::Jwks(JwksError::NoJwksDir)),
        "{err}"
    );
}
